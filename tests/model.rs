//! The trained model through the real runtime: ONNX Runtime from the repository's `.venv` when it
//! is there (`.venv/bin/pip install onnxruntime==1.31.1`), else tract — no mocks. The card must
//! agree with the graph, incremental decoding with a full pass, rollback with a fresh decode, the
//! Rust NLL with the Python one on the committed fixture; broken or missing models must be clear
//! errors, and `play` must fall back to the rule-based source and keep playing.
//!
//! The model is the default one, `models/roomscore-satb-mix.onnx` (override with
//! `ROOMSCORE_TEST_MODEL`), the fixture `models/fixtures/jsb_test_slice.roomscore-satb-mix.json`
//! (override with `ROOMSCORE_TEST_FIXTURE`).

use std::path::{Path, PathBuf};
use std::process::Command;

use roomscore::control::Conditioning;
use roomscore::gen::{Heard, NoteSource, SamplingParams, Step};
use roomscore::model::{eval, Cache, Model, ModelError, ModelSource, EVICTED_KEPT};
use roomscore::music::Mode;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_path() -> PathBuf {
    std::env::var_os("ROOMSCORE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            root()
                .join("models")
                .join(roomscore::model::DEFAULT_MODEL_FILE)
        })
}

fn fixture() -> serde_json::Value {
    let p = std::env::var_os("ROOMSCORE_TEST_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // export.py names a model's fixture after it.
            let name = Path::new(roomscore::model::DEFAULT_MODEL_FILE)
                .file_stem()
                .unwrap();
            let name = format!("jsb_test_slice.{}.json", name.to_string_lossy());
            root().join("models/fixtures").join(name)
        });
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn open() -> Model {
    // Tests run from the package root, where the `.venv` with onnxruntime lives.
    std::env::set_current_dir(root()).unwrap();
    Model::open(&model_path()).unwrap_or_else(|e| panic!("{e}"))
}

fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// The tokens and voices of the fixture's first piece.
fn first_piece(fx: &serde_json::Value) -> (Vec<i64>, Vec<i64>) {
    let piece = &fx["pieces"][0];
    (ints(&piece["tokens"]), ints(&piece["voices"]))
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn card_and_vocabulary_agree_with_the_graph() {
    let mut m = open();
    let card = m.card.clone();
    let (inputs, outputs) = m.net.signature();
    let names =
        |v: &[(String, String, Vec<i64>)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    let mut have: Vec<String> = names(&inputs);
    let mut want: Vec<String> = card.onnx.inputs.iter().map(|i| i.name.clone()).collect();
    have.sort();
    want.sort();
    assert_eq!(have, want, "input names");
    let mut have: Vec<String> = names(&outputs);
    let mut want: Vec<String> = card.onnx.outputs.iter().map(|i| i.name.clone()).collect();
    have.sort();
    want.sort();
    assert_eq!(have, want, "output names");
    // The cond input's last dimension, where the graph states it, is the card's.
    let cond_in = inputs
        .iter()
        .find(|i| i.0 == card.onnx.inputs[2].name)
        .unwrap();
    if let Some(&d) = cond_in.2.last().filter(|d| **d >= 0) {
        assert_eq!(d as usize, card.conditioning.dim);
    }
    // Vocabulary size from the logits actually produced.
    let t = [
        card.vocabulary.bos,
        card.pitch_token(60).unwrap(),
        card.vocabulary.silence,
    ];
    let v = [card.voices.start_id, 0, 1];
    let cond: Vec<f32> = card.conditioning.eval_vector.repeat(3);
    let mut cache = Cache::empty();
    let logits = m.net.forward(&t, &v, &cond, &mut cache).unwrap();
    assert_eq!(logits.len(), 3 * card.vocabulary.size);
    assert_eq!(cache.len(), 3);
    assert_eq!(
        cache.keys().len(),
        card.architecture.layers * card.cache_heads() * 3 * card.architecture.head_dim
    );
    // Every pitch token maps back to its pitch; specials are not pitches.
    for p in card.vocabulary.pitch_min..=card.vocabulary.pitch_max {
        assert_eq!(card.token_pitch(card.pitch_token(p).unwrap()), Some(p));
    }
    assert_eq!(card.token_pitch(card.vocabulary.silence), None);
    assert_eq!(card.token_pitch(card.vocabulary.bos), None);
    assert_eq!(
        card.pitch_token(card.vocabulary.pitch_max).unwrap() as usize,
        card.vocabulary.size - 1
    );
}

#[test]
fn a_guided_pair_in_one_pass_gives_the_logits_of_two_passes() {
    // Guidance sends the conditioned and the unconditional sequence together (a batch of two
    // under ONNX Runtime, two passes over halves of one cache under tract); each must come out
    // as it would alone, over a prefix and then token by token on the caches.
    let mut m = open();
    let card = m.card.clone();
    let n = 40;
    let (tokens, voices) = first_piece(&fixture());
    let (tokens, voices) = (&tokens[..n], &voices[..n]);
    let asked = roomscore::model::source::cond_vector(&card, &cond(5.0, 66.0, 0.0)).repeat(n);
    let unknown = vec![0.0f32; card.conditioning.dim * n];
    let (dim, vocab, split) = (card.conditioning.dim, card.vocabulary.size, 32);
    let (mut pair, mut alone_a, mut alone_u) = (Cache::empty(), Cache::empty(), Cache::empty());
    for (from, to) in [(0, split), (split, split + 1), (split + 1, n)] {
        let (t, v) = (&tokens[from..to], &voices[from..to]);
        let (a, u) = (&asked[from * dim..to * dim], &unknown[from * dim..to * dim]);
        let both = m.net.forward_streams(t, v, &[a, u], &mut pair).unwrap();
        let one_a = m.net.forward(t, v, a, &mut alone_a).unwrap();
        let one_u = m.net.forward(t, v, u, &mut alone_u).unwrap();
        let half = (to - from) * vocab;
        assert_eq!(both.len(), 2 * half);
        let d = max_diff(&both[..half], &one_a).max(max_diff(&both[half..], &one_u));
        assert!(
            d < 1e-4,
            "tokens {from}..{to}: the pair differs from two passes by {d}"
        );
        // What was asked must matter, or this test could not tell the two apart.
        assert!(max_diff(&one_a, &one_u) > 1e-2);
    }
    assert_eq!(pair.len(), n);
    assert_eq!(pair.streams(), 2);
    // The same tokens cached twice over, [layers, streams, heads, len, head_dim].
    assert_eq!(pair.keys().len(), 2 * alone_a.keys().len());
}

#[test]
fn a_cache_given_another_shape_gets_the_room_asked_for() {
    // Every pass reads the cache's whole room, so room beyond the context is time lost on
    // every step: a source that turned guided once ran each step at twice the context.
    let m = open();
    let ctx = m.card.context_length;
    let mut c = Cache::with_capacity(&m.net, 1, ctx);
    assert_eq!((c.streams(), c.capacity()), (1, ctx));
    m.net.reserve(&mut c, 2, ctx);
    assert_eq!((c.streams(), c.capacity()), (2, ctx));
    m.net.reserve(&mut c, 1, ctx);
    assert_eq!((c.streams(), c.capacity()), (1, ctx));
    // The same shape growing past its room still doubles, so token-by-token growth stays cheap.
    m.net.reserve(&mut c, 1, ctx + 1);
    assert_eq!(c.capacity(), 2 * ctx);
    // A ring keeps its room: a full one overwrites its oldest slot instead.
    let mut ring = Cache::ring(&m.net, 1, ctx - 1);
    m.net.reserve(&mut ring, 1, ctx + 1);
    assert_eq!(ring.capacity(), ctx - 1);
}

#[test]
fn incremental_decoding_gives_the_logits_of_a_full_pass_and_of_python() {
    let mut m = open();
    let card = m.card.clone();
    let fx = fixture();
    let n = 72;
    let (tokens, voices) = first_piece(&fx);
    let (tokens, voices) = (&tokens[..n], &voices[..n]);
    let cvec = floats(&fx["cond"]);
    let cond = cvec.repeat(n);
    let vocab = card.vocabulary.size;
    let mut full_cache = Cache::empty();
    let full = m
        .net
        .forward(tokens, voices, &cond, &mut full_cache)
        .unwrap();

    // Python's logits for the same pass (onnxruntime, rounded to 1e-6).
    for (i, row) in fx["reference_logits"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let py = floats(row);
        let d = max_diff(&full[i * vocab..(i + 1) * vocab], &py);
        assert!(
            d < 1e-4,
            "position {i}: Rust vs Python logits differ by {d}"
        );
    }

    // One token at a time, then four at a time (a step), like the source and the exporter.
    let mut cache = Cache::empty();
    let mut inc = Vec::new();
    let mut i = 0;
    while i < n {
        let j = if i < 9 { i + 1 } else { (i + 4).min(n) };
        let cd = cvec.repeat(j - i);
        inc.extend(
            m.net
                .forward(&tokens[i..j], &voices[i..j], &cd, &mut cache)
                .unwrap(),
        );
        i = j;
    }
    let d = max_diff(&inc, &full);
    assert!(d < 1e-4, "incremental vs full logits differ by {d}");
    assert!(max_diff(&cache.keys(), &full_cache.keys()) < 1e-4);
    assert!(max_diff(&cache.values(), &full_cache.values()) < 1e-4);

    // A truncated cache continues exactly like the prefix it keeps.
    let r = 40;
    let mut cut = full_cache.clone();
    assert!(m.net.truncate(&mut cut, r));
    let tail = m
        .net
        .forward(&tokens[r..], &voices[r..], &cvec.repeat(n - r), &mut cut)
        .unwrap();
    let d = max_diff(&tail, &full[r * vocab..]);
    assert!(d < 1e-4, "truncated-cache continuation differs by {d}");
}

fn cond(density: f32, register: f32, major: f32) -> Conditioning {
    Conditioning {
        density: Some(density),
        register: Some(register),
        major: Some(major),
        styles: vec![("chorale".into(), 1.0)],
        tonic: None,
    }
}

const P: SamplingParams = SamplingParams {
    temperature: 1.0,
    top_p: 0.95,
};

/// `steps`, as heard under `c` throughout.
fn heard_under(steps: &[Step], c: &Conditioning) -> Vec<Heard> {
    let cond = std::sync::Arc::new(c.clone());
    steps
        .iter()
        .map(|&step| Heard {
            step,
            cond: cond.clone(),
        })
        .collect()
}

fn decode(src: &mut ModelSource, c: &Conditioning, n: usize) -> Vec<Step> {
    (0..n).map(|_| src.next_step(c, &P).unwrap()).collect()
}

#[test]
fn rollback_gives_the_continuation_of_a_fresh_decode() {
    rollback_matches_a_fresh_decode(1.0);
}

#[test]
fn rollback_under_guidance_rolls_back_both_caches() {
    rollback_matches_a_fresh_decode(2.0);
}

fn rollback_matches_a_fresh_decode(guidance: f32) {
    let a = cond(2.0, 60.0, 1.0);
    let b = cond(6.0, 68.0, 0.0);
    let source = || ModelSource::new(open(), 5, true, Mode::Major, 42).with_guidance(guidance);
    // Before the ring is full; back across the step where it fills (the context holds
    // context/4 steps), so that the slots taken back are free again and others hold once more
    // what they held; back a few steps long after; and back as far as the overwrites kept reach
    // (64 steps), which a rollback never goes in a room.
    let ctx_steps = open().card.context_length / 4;
    let kept_steps = EVICTED_KEPT / 4;
    for (ahead, back_to, then) in [
        (20usize, 12usize, 10usize),
        (ctx_steps + 6, ctx_steps - 4, 14),
        (ctx_steps + 84, ctx_steps + 74, 12),
        (ctx_steps + 20 + kept_steps, ctx_steps + 20, 6),
    ] {
        let mut rolled = source();
        let first = decode(&mut rolled, &a, ahead);
        rolled.rollback(back_to as u64).unwrap();
        assert_eq!(rolled.position(), back_to as u64);
        let after = decode(&mut rolled, &b, then);

        let mut fresh = source();
        let prefix = decode(&mut fresh, &a, back_to);
        assert_eq!(prefix, first[..back_to], "same seed, same prefix");
        let expected = decode(&mut fresh, &b, then);
        assert_eq!(after, expected, "rollback to {back_to} after {ahead} steps");
        // The source actually made music, inside the scale (F major: tonic 5).
        let scale = roomscore::music::PitchSet::scale(5, Mode::Major);
        let minor = roomscore::music::PitchSet::scale(5, Mode::Minor);
        assert!(first.iter().flatten().flatten().count() > 0);
        assert!(first.iter().flatten().flatten().all(|&p| scale.contains(p)));
        assert!(after.iter().flatten().flatten().all(|&p| minor.contains(p)));
    }
}

#[test]
fn a_model_taken_back_carries_on_what_the_room_heard() {
    // Sampled greedily (top-p 0 keeps the top token alone), the next steps depend on the
    // context alone, not on the RNG: handed the steps another composition played, the source
    // goes on as that composition itself would.
    let greedy = SamplingParams {
        temperature: 1.0,
        top_p: 0.0,
    };
    let c = cond(4.0, 62.0, 1.0);
    for guidance in [1.0, 2.0] {
        let source = || ModelSource::new(open(), 5, true, Mode::Major, 42).with_guidance(guidance);
        let mut own = source();
        let heard = decode(&mut own, &c, 40);
        let expected: Vec<Step> = (0..12)
            .map(|_| own.next_step(&c, &greedy).unwrap())
            .collect();

        // Heard a few steps at a time, as the generator hands them over.
        let mut back = source();
        decode(&mut back, &cond(1.0, 70.0, 0.0), 7);
        back.start_at(0);
        for chunk in heard_under(&heard, &c).chunks(4) {
            back.hear(chunk).unwrap();
        }
        assert_eq!(back.position(), 40);
        let carried: Vec<Step> = (0..12)
            .map(|_| back.next_step(&c, &greedy).unwrap())
            .collect();
        assert_eq!(carried, expected, "guidance {guidance}");

        // Not what a fresh start would play: the context is what decides.
        let mut fresh = source();
        fresh.start_at(40);
        let afresh: Vec<Step> = (0..12)
            .map(|_| fresh.next_step(&c, &greedy).unwrap())
            .collect();
        assert_ne!(afresh, expected, "guidance {guidance}");
    }
}

#[test]
fn heard_steps_take_the_conditioning_they_were_heard_under() {
    // Each step composed under its own conditioning, and heard under the same, all at once or
    // a few a call: the context is the one decoding built, token for token, so greedy steps
    // after it are the same.
    let greedy = SamplingParams {
        temperature: 1.0,
        top_p: 0.0,
    };
    let conds: Vec<Conditioning> = (0..24)
        .map(|i| {
            let x = i as f32 / 23.0;
            cond(1.0 + 7.0 * x, 56.0 + 14.0 * (1.0 - x), (i % 2) as f32)
        })
        .collect();
    let last = cond(5.0, 64.0, 1.0);
    let source = || ModelSource::new(open(), 2, false, Mode::Major, 11);
    let mut own = source();
    let heard: Vec<Step> = conds
        .iter()
        .map(|c| own.next_step(c, &P).unwrap())
        .collect();
    let expected: Vec<Step> = (0..8)
        .map(|_| own.next_step(&last, &greedy).unwrap())
        .collect();
    let each: Vec<Heard> = heard
        .iter()
        .zip(&conds)
        .map(|(&step, c)| Heard {
            step,
            cond: std::sync::Arc::new(c.clone()),
        })
        .collect();
    for chunk in [24, 4, 1] {
        let mut back = source();
        back.start_at(0);
        for part in each.chunks(chunk) {
            back.hear(part).unwrap();
        }
        let carried: Vec<Step> = (0..8)
            .map(|_| back.next_step(&last, &greedy).unwrap())
            .collect();
        assert_eq!(carried, expected, "heard {chunk} a call");
    }
    // Heard under one conditioning throughout, the context differs, and so do the steps.
    let mut flat = source();
    flat.start_at(0);
    flat.hear(&heard_under(&heard, &last)).unwrap();
    let other: Vec<Step> = (0..8)
        .map(|_| flat.next_step(&last, &greedy).unwrap())
        .collect();
    assert_ne!(other, expected);
}

#[test]
fn a_model_hears_any_music_and_more_than_its_context() {
    let c = cond(4.0, 62.0, 0.0);
    let mut src = ModelSource::new(open(), 0, false, Mode::Major, 3);
    // Pitches no vocabulary holds (an octave or more in, or a rest), and more steps than the
    // context takes, at once and a few at a time: past the context, the last context of it
    // stays.
    let heard: Vec<Step> = (0..300u32)
        .map(|i| {
            let p = (i % 128) as u8;
            [Some(p), Some(127 - p), None, Some(p / 2)]
        })
        .collect();
    let ctx_steps = open().card.context_length / 4;
    for chunk in [300, 3] {
        src.start_at(700);
        for part in heard_under(&heard, &c).chunks(chunk) {
            src.hear(part).unwrap();
        }
        assert_eq!(src.position(), 1000);
        // Its own steps cannot be rolled back into what it heard.
        assert!(src.rollback(999).is_err());
        // On past another context, and back a few steps.
        let first = decode(&mut src, &c, ctx_steps);
        assert_eq!(src.position(), (1000 + ctx_steps) as u64);
        src.rollback(1000 + ctx_steps as u64 - 6).unwrap();
        let again = decode(&mut src, &c, 6);
        assert_eq!(again, first[ctx_steps - 6..]);
        assert!(first.iter().flatten().flatten().count() > 0);
    }
}

#[test]
fn guidance_weight_zero_is_the_unconditional_model() {
    // At w = 0 only the unconditional pass speaks, so what is asked cannot matter; at w = 1 and
    // w = 3 it must. Same seed throughout, so any difference comes from the logits.
    let (low, high) = (cond(1.0, 54.0, 0.0), cond(6.0, 70.0, 1.0));
    let run = |w: f32, c: &Conditioning| {
        let mut src = ModelSource::new(open(), 0, false, Mode::Major, 11).with_guidance(w);
        decode(&mut src, c, 24)
    };
    assert_eq!(run(0.0, &low), run(0.0, &high));
    assert_ne!(run(1.0, &low), run(1.0, &high));
    assert_ne!(run(3.0, &high), run(1.0, &high));
}

#[test]
fn voices_stay_in_their_ranges() {
    let m = open();
    let card = m.card.clone();
    let mut src = ModelSource::new(m, 0, false, Mode::Major, 7);
    let steps = decode(&mut src, &cond(4.0, 64.0, 1.0), 48);
    for step in &steps {
        for (v, p) in step.iter().enumerate() {
            if let Some(p) = p {
                let (lo, hi) = card.voice_range(v);
                assert!(
                    (lo..=hi).contains(p),
                    "voice {v} sang {p} outside {lo}..={hi}"
                );
            }
        }
    }
}

fn copy_card_to(dir: &Path, onnx_bytes: &[u8], fix_hash: bool) -> PathBuf {
    let card_src = model_path().with_extension("json");
    let mut card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(card_src).unwrap()).unwrap();
    card["file"] = "broken.onnx".into();
    if fix_hash {
        use sha2::Digest;
        let h: String = sha2::Sha256::digest(onnx_bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        card["sha256"] = h.into();
    }
    let onnx = dir.join("broken.onnx");
    std::fs::write(&onnx, onnx_bytes).unwrap();
    std::fs::write(dir.join("broken.json"), card.to_string()).unwrap();
    onnx
}

#[test]
fn corrupt_and_missing_models_are_clear_errors() {
    std::env::set_current_dir(root()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(model_path()).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x5A;

    // Bytes changed under the card: the hash says so, naming the file.
    let onnx = copy_card_to(dir.path(), &bad, false);
    let err = Model::open(&onnx)
        .err()
        .expect("corrupt model must not open");
    assert!(matches!(err, ModelError::HashMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&onnx.display().to_string()) && msg.contains("sha256"),
        "{msg}"
    );

    // Garbage whose card matches it: the runtime refuses it, naming the file.
    let onnx = copy_card_to(dir.path(), b"this is not an ONNX model", true);
    let err = Model::open(&onnx).err().expect("garbage must not open");
    let msg = err.to_string();
    assert!(msg.contains(&onnx.display().to_string()), "{msg}");
    assert!(matches!(err, ModelError::Load { .. }), "{msg}");

    // No file at all.
    let missing = dir.path().join("nowhere.onnx");
    let msg = Model::open(&missing).err().unwrap().to_string();
    assert!(msg.contains(&missing.display().to_string()), "{msg}");

    // A card with a missing field names the field.
    std::fs::write(dir.path().join("nocard.onnx"), &good).unwrap();
    std::fs::write(dir.path().join("nocard.json"), r#"{"name": "x"}"#).unwrap();
    let msg = Model::open(&dir.path().join("nocard.onnx"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("nocard.json") && msg.contains("format_version"),
        "{msg}"
    );
}

#[test]
fn play_falls_back_to_the_rules_when_the_model_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let scene = dir.path().join("scene.toml");
    std::fs::write(
        &scene,
        r#"
[scene]
name = "missing-model"
tempo = 120
key = "C"

[generator]
source = "model"
model = "no/such/model.onnx"

[[instrument]]
name = "pad"
kind = "pad"
voices = ["soprano", "alto", "tenor", "bass"]
"#,
    )
    .unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(env!("CARGO_BIN_EXE_roomscore"))
        .args(["play", "--output", "null", "--seconds", "2", "--osc"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--scene")
        .arg(&scene)
        .current_dir(root())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let all = format!("{stdout}\n{stderr}");
    assert!(all.contains("rule-based"), "no fallback line:\n{all}");
    assert!(
        all.contains("model.onnx"),
        "the fallback line should name the file:\n{all}"
    );
}

#[test]
fn rust_nll_equals_python_nll_on_the_fixture() {
    let mut m = open();
    let card = m.card.clone();
    let fx = fixture();
    assert_eq!(
        fx["context_length"].as_u64().unwrap() as usize,
        card.context_length
    );
    let cvec = floats(&fx["cond"]);
    assert_eq!(cvec, card.conditioning.eval_vector);
    let (mut total, mut count) = (0.0, 0);
    for piece in fx["pieces"].as_array().unwrap() {
        let tokens = ints(&piece["tokens"]);
        let voices = ints(&piece["voices"]);
        let (t, c, windows) =
            eval::score_sequence(&mut m.net, &card, &tokens, &voices, &cvec).unwrap();
        let py_windows: Vec<(usize, usize, usize)> = piece["windows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                let w = ints(w);
                (w[0] as usize, w[1] as usize, w[2] as usize)
            })
            .collect();
        assert_eq!(windows, py_windows, "windows");
        assert_eq!(c as u64, piece["tokens_scored"].as_u64().unwrap());
        total += t;
        count += c;
    }
    let rust = total / count as f64;
    let python = fx["mean_nll"].as_f64().unwrap();
    assert!(
        (rust - python).abs() < 0.002,
        "Rust NLL {rust:.5} vs Python {python:.5}"
    );
}

/// The first piece of the fixture with a conditioning that moves, so that no two positions
/// are alike: (tokens, voices, conditioning per token).
fn moving_piece(card: &roomscore::model::Card) -> (Vec<i64>, Vec<i64>, Vec<f32>) {
    let (tokens, voices) = first_piece(&fixture());
    let c = &card.conditioning;
    let cond = (0..tokens.len())
        .flat_map(|i| {
            let mut v = c.eval_vector.clone();
            v[c.density.index] = (i % 7) as f32 / 7.0;
            v[c.density.known_flag_index] = 1.0;
            v
        })
        .collect();
    (tokens, voices, cond)
}

/// Feeds tokens [from, to) into `cache` a pass of `each` at most; returns their logits.
fn feed_in(
    m: &mut Model,
    piece: &(Vec<i64>, Vec<i64>, Vec<f32>),
    cache: &mut Cache,
    (from, to, each): (usize, usize, usize),
) -> Vec<f32> {
    let d = m.card.conditioning.dim;
    let mut out = Vec::new();
    let mut i = from;
    while i < to {
        let j = (i + each).min(to);
        let (t, v, c) = (&piece.0[i..j], &piece.1[i..j], &piece.2[i * d..j * d]);
        out.extend(m.net.forward(t, v, c, cache).unwrap());
        i = j;
    }
    out
}

#[test]
fn a_full_ring_hears_the_window_before_each_token_and_nothing_older() {
    // In a ring of 20 slots every layer hears the 20 tokens before, so what decides a token's
    // logits reaches back layers x 20 tokens and no further. Two pieces that differ in their
    // first 20 tokens alone must give the same logits from there on, bit for bit, and other
    // ones just after the change; a cache that keeps everything hears the change to the end.
    // How the ring was fed (one pass filling it, passes of 4 split where it fills, then one at
    // a time) must not matter.
    let mut m = open();
    let a = moving_piece(&m.card);
    let vocab = m.card.vocabulary.size;
    let (slots, n, changed) = (20usize, 150usize, 20usize);
    let reach = changed + m.card.architecture.layers * slots;
    assert!(reach + 20 < n);
    let mut b = a.clone();
    // Other music in the same voices (40 tokens on is 10 steps on).
    let later = b.0[1 + 40..changed + 40].to_vec();
    b.0[1..changed].copy_from_slice(&later);

    let mut ring_a = Cache::ring(&m.net, 1, slots);
    let la = feed_in(&mut m, &a, &mut ring_a, (0, n, 1));
    let mut ring_b = Cache::ring(&m.net, 1, slots);
    let lb = feed_in(&mut m, &b, &mut ring_b, (0, n, 1));
    assert_eq!(la[reach * vocab..], lb[reach * vocab..]);
    let near = max_diff(
        &la[changed * vocab..(changed + 4) * vocab],
        &lb[changed * vocab..(changed + 4) * vocab],
    );
    assert!(
        near > 1e-2,
        "the change was not heard right after it ({near})"
    );

    let (mut all_a, mut all_b) = (Cache::empty(), Cache::empty());
    let fa = feed_in(&mut m, &a, &mut all_a, (0, n, n));
    let fb = feed_in(&mut m, &b, &mut all_b, (0, n, n));
    let far = max_diff(&fa[reach * vocab..], &fb[reach * vocab..]);
    assert!(
        far > 1e-2,
        "a whole context did not hear the change ({far})"
    );

    let mut chunked = Cache::ring(&m.net, 1, slots);
    let mut lc = feed_in(&mut m, &a, &mut chunked, (0, 15, 15));
    lc.extend(feed_in(&mut m, &a, &mut chunked, (15, 70, 4)));
    lc.extend(feed_in(&mut m, &a, &mut chunked, (70, n, 1)));
    assert_eq!((chunked.len(), chunked.added()), (slots, n));
    let d = max_diff(&lc, &la);
    assert!(
        d < 1e-4,
        "fed in passes of other sizes, the logits differ by {d}"
    );
}

#[test]
fn each_token_of_a_full_ring_lies_in_its_slot_at_its_position() {
    // Layer 0's keys and values depend on a token, its voice, its conditioning and its position
    // alone: once the ring has wrapped, slot j must hold the layer-0 keys a full pass gives the
    // last token i with i = j mod slots. That pins which slot each token overwrites and the
    // position it takes.
    let mut m = open();
    let piece = moving_piece(&m.card);
    let (slots, n) = (40usize, 107usize);
    let mut ring = Cache::ring(&m.net, 1, slots);
    feed_in(&mut m, &piece, &mut ring, (0, n, 1));
    let mut full = Cache::empty();
    feed_in(&mut m, &piece, &mut full, (0, n, n));
    let (heads, d) = (m.card.cache_heads(), m.card.architecture.head_dim);
    let (rk, fk) = (ring.keys(), full.keys());
    let (rv, fv) = (ring.values(), full.values());
    for h in 0..heads {
        for j in 0..slots {
            let i = (n - 1) - ((n - 1 - j) % slots);
            let r = (h * slots + j) * d;
            let f = (h * n + i) * d;
            let dk = max_diff(&rk[r..r + d], &fk[f..f + d]);
            let dv = max_diff(&rv[r..r + d], &fv[f..f + d]);
            assert!(
                dk < 1e-4 && dv < 1e-4,
                "head {h} slot {j} token {i}: {dk} {dv}"
            );
        }
    }
}

#[test]
fn taking_tokens_back_from_a_ring_puts_back_what_they_overwrote() {
    // Fed 100 tokens one at a time into a ring of 40, taken back 30 and fed 30 others: the
    // logits must be those of a ring that never had the 30, bit for bit, or a rolled-back
    // composition would differ from a fresh one.
    let mut m = open();
    let piece = moving_piece(&m.card);
    let d = m.card.conditioning.dim;
    let mut other = piece.clone();
    for (i, c) in other.2.chunks_exact_mut(d).enumerate() {
        c[m.card.conditioning.density.index] = 1.0 - (i % 5) as f32 / 5.0;
    }
    let slots = 40;
    let mut rolled = Cache::ring(&m.net, 1, slots);
    feed_in(&mut m, &piece, &mut rolled, (0, 100, 1));
    let before = (rolled.keys(), rolled.values());
    assert!(m.net.truncate(&mut rolled, 70));
    assert_eq!(
        (rolled.len(), rolled.added(), rolled.position()),
        (slots, 70, 70)
    );
    let after = feed_in(&mut m, &other, &mut rolled, (70, 100, 1));

    let mut straight = Cache::ring(&m.net, 1, slots);
    feed_in(&mut m, &piece, &mut straight, (0, 70, 1));
    let expected = feed_in(&mut m, &other, &mut straight, (70, 100, 1));
    assert_eq!(after, expected);
    assert_eq!(rolled.keys(), straight.keys());
    assert_eq!(rolled.values(), straight.values());
    assert_ne!(
        rolled.keys(),
        before.0,
        "the other tokens left the ring as it was"
    );

    // Back into slots that were never overwritten: they are simply free again, and hold what a
    // ring fed those 25 alone holds.
    assert!(m.net.truncate(&mut rolled, 25));
    assert_eq!((rolled.len(), rolled.added()), (25, 25));
    let mut short = Cache::ring(&m.net, 1, slots);
    feed_in(&mut m, &piece, &mut short, (0, 25, 1));
    assert_eq!(rolled.keys(), short.keys());
    assert_eq!(rolled.values(), short.values());

    // Further back than the kept overwrites reach: refused, the ring as it was.
    let mut long = Cache::ring(&m.net, 1, slots);
    let n = slots + EVICTED_KEPT + 10;
    let long_piece = (
        piece.0.repeat(n / piece.0.len() + 1),
        piece.1.repeat(n / piece.1.len() + 1),
        piece.2.repeat(n / piece.0.len() + 1),
    );
    feed_in(&mut m, &long_piece, &mut long, (0, n, 1));
    let kept = long.keys();
    assert!(!m.net.truncate(&mut long, n - EVICTED_KEPT - 1));
    assert_eq!((long.added(), long.keys()), (n, kept));
    assert!(m.net.truncate(&mut long, n - EVICTED_KEPT));
}

#[test]
fn turning_the_keys_back_at_the_end_of_the_rotation_tables_changes_nothing_heard() {
    // A months-long run reaches the end of the graph's rotation tables every few hundred steps
    // and turns every cached key back. Lowered to 64 positions here, a ring of 40 turns every
    // 24 tokens; its logits must be those of a ring that never turns, and a rollback across a
    // turn must put back the overwrites turned as well.
    let mut m = open();
    let piece = moving_piece(&m.card);
    let (slots, n) = (40usize, 140usize);
    let mut plain = Cache::ring(&m.net, 1, slots);
    let expected = feed_in(&mut m, &piece, &mut plain, (0, n, 1));
    assert_eq!(plain.turned(), 0);

    let mut turned = Cache::ring(&m.net, 1, slots);
    m.net.limit_positions(64);
    let got = feed_in(&mut m, &piece, &mut turned, (0, n, 1));
    assert!(turned.turned() >= 3, "turned {} times", turned.turned());
    assert!(turned.position() <= 64);
    let d = max_diff(&got, &expected);
    assert!(d < 1e-4, "turned vs never turned logits differ by {d}");

    // Back 30 tokens, across the last turn, and on again: as the ring that never turned; then
    // back further than the position the ring has reached, which turns it forward first.
    let back_to = n - 30;
    assert!(m.net.truncate(&mut turned, back_to));
    assert!(m.net.truncate(&mut plain, back_to));
    let again = feed_in(&mut m, &piece, &mut turned, (back_to, n, 1));
    let vocab = m.card.vocabulary.size;
    let d = max_diff(&again, &expected[back_to * vocab..]);
    assert!(d < 1e-4, "rolled back across a turn, logits differ by {d}");
    let (far, position) = (n - 90, turned.position());
    assert!(90 > position, "{position}");
    assert!(m.net.truncate(&mut turned, far));
    let again = feed_in(&mut m, &piece, &mut turned, (far, n, 1));
    let d = max_diff(&again, &expected[far * vocab..]);
    assert!(
        d < 1e-4,
        "rolled back below position 0, logits differ by {d}"
    );
}

#[test]
fn a_long_composition_keeps_few_tokens_and_rolls_back_across_turns() {
    // With the rotation tables taken to end at 700 positions, the ring turns its keys back every
    // 189 tokens, about 47 steps, so 1800 steps see dozens of turns; a room runs for months, so
    // what the source keeps of its tokens must stay bounded; a rollback across the last turn
    // must compose again what it composed; and one far back must still find its context.
    let mut m = open();
    m.net.limit_positions(700);
    let slots = m.card.context_length - 1;
    let c = cond(4.0, 62.0, 1.0);
    let mut src = ModelSource::new(m, 0, false, Mode::Major, 9);
    let n = 1800usize;
    let (mut steps, mut turned_at) = (Vec::new(), Vec::new());
    for i in 0..n {
        let before = src.turned();
        steps.push(src.next_step(&c, &P).unwrap());
        if src.turned() != before {
            turned_at.push(i);
        }
    }
    assert!(turned_at.len() >= 30, "turned at {turned_at:?}");
    // At most: the steps history can roll back to, the context before the oldest of them and
    // the kept overwrites' reach, and the 4096 tokens compaction waits for before it drops.
    let tokens = 1 + 4 * n;
    let most = 4 * roomscore::gen::history::HISTORY + slots + EVICTED_KEPT + 4096 + 4;
    assert!(tokens > most, "long enough to have dropped tokens");
    assert!(
        src.tokens_kept() <= most,
        "{} of {tokens} tokens kept",
        src.tokens_kept()
    );
    let last = *turned_at.last().unwrap();
    let back_to = last - 2;
    assert!(
        n - back_to <= EVICTED_KEPT / 4,
        "the last turn at step {last}"
    );
    src.rollback(back_to as u64).unwrap();
    let again = decode(&mut src, &c, n - back_to);
    assert_eq!(again, steps[back_to..]);

    // Back 480 steps, further than the kept overwrites reach and long after the last prime: a
    // fresh pass over the context before that step (its tokens kept by compaction), and on.
    let far = n - 480;
    src.rollback(far as u64).unwrap();
    assert_eq!(src.position(), far as u64);
    let on = decode(&mut src, &c, 8);
    assert!(on.iter().flatten().flatten().count() > 0);
}

#[test]
fn no_voice_holds_longer_than_the_scene_allows() {
    let runs = |steps: &[Step]| -> usize {
        let mut longest = 0;
        for v in 0..4 {
            let mut run = 0;
            for (i, s) in steps.iter().enumerate() {
                run = if i > 0 && steps[i - 1][v] == s[v] {
                    run + 1
                } else {
                    1
                };
                longest = longest.max(run);
            }
        }
        longest
    };
    // A sparse, low ask: without a limit the model settles on one chord.
    let still = cond(1.0, 56.0, 1.0);
    let mut free = ModelSource::new(open(), 2, false, Mode::Major, 3);
    let unlimited = runs(&decode(&mut free, &still, 64));
    let mut held = ModelSource::new(open(), 2, false, Mode::Major, 3).with_max_hold(6);
    let limited = runs(&decode(&mut held, &still, 64));
    assert!(limited <= 6, "a voice held for {limited} steps");
    assert!(
        unlimited > 6,
        "the check needs a model that holds when let: {unlimited}"
    );
}

#[test]
fn the_engine_builds_the_conditioning_vectors_python_builds() {
    let m = open();
    let fx = fixture();
    let cases = fx["cond_cases"]
        .as_array()
        .expect("the fixture carries Python's conditioning vectors");
    assert!(!cases.is_empty());
    let f = |v: &serde_json::Value| v.as_f64().map(|x| x as f32);
    for case in cases {
        let cond = Conditioning {
            density: f(&case["density"]),
            register: f(&case["register"]),
            major: f(&case["mode"]),
            styles: case["style"]
                .as_str()
                .map(|s| vec![(s.to_string(), 1.0)])
                .unwrap_or_default(),
            tonic: case["tonic"].as_u64().map(|t| t as u8),
        };
        let ours = roomscore::model::source::cond_vector(&m.card, &cond);
        let python = floats(&case["vector"]);
        assert_eq!(ours.len(), python.len(), "{case}");
        for (i, (a, b)) in ours.iter().zip(&python).enumerate() {
            assert!(
                (a - b).abs() < 1e-6,
                "column {} ({}): engine {a}, Python {b}, for {case}",
                i,
                m.card.conditioning.names[i]
            );
        }
    }
}

/// `model info` is the card as a person reads it: the file's hash checked against the card, the
/// context the engine will keep, and a calibration folded into the graph, when the card has one.
#[test]
fn model_info_prints_the_card() {
    let card = open().card;
    let out = Command::new(env!("CARGO_BIN_EXE_roomscore"))
        .args(["model", "info"])
        .arg(model_path())
        .current_dir(root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{} (matches", card.sha256)),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("context      {} tokens", card.context_length)),
        "{stdout}"
    );
    match card.raw["calibration"]["temperature"].as_f64() {
        Some(t) => assert!(
            stdout.contains(&format!("calibration  logits divided by {t},")),
            "{stdout}"
        ),
        None => assert!(!stdout.contains("calibration"), "{stdout}"),
    }
    // A mixture says how many passes a step costs; a plain network prints no such line.
    match &card.transposition_mix {
        Some(m) => assert!(
            stdout.contains(&format!(
                "mean of the {} distributions, moved back ({} sequences per pass",
                m.shifts.len(),
                m.shifts.len()
            )),
            "{stdout}"
        ),
        None => assert!(!stdout.contains("mixture"), "{stdout}"),
    }
}

#[test]
fn model_eval_reads_the_benchmark_file_and_prints_pythons_nll() {
    // The fixture's pieces written back as the benchmark's file (MIDI pitches, -1 silence):
    // `model eval` reads, windows and scores them as Python did.
    let card = open().card;
    let fx = fixture();
    let pieces: Vec<Vec<[i64; 4]>> = fx["pieces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            ints(&p["tokens"])[1..]
                .chunks(4)
                .map(|step| {
                    std::array::from_fn(|v| card.token_pitch(step[v]).map_or(-1, i64::from))
                })
                .collect()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("Jsb16thSeparated.json");
    std::fs::write(&file, serde_json::json!({ "test": pieces }).to_string()).unwrap();
    let eval = |jsb: &Path| {
        Command::new(env!("CARGO_BIN_EXE_roomscore"))
            .args(["model", "eval", "--split", "test", "--model"])
            .arg(model_path())
            .arg("--jsb")
            .arg(jsb)
            .current_dir(root())
            .output()
            .unwrap()
    };
    // The file, as the README has it, or the folder that holds it.
    for jsb in [file.as_path(), dir.path()] {
        let out = eval(jsb);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let nll: f64 = stdout
            .split("mean NLL ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no NLL in {stdout}"));
        // Printed to 4 places; the issue asks for 0.002, the engine is within 1e-5.
        let python = fx["mean_nll"].as_f64().unwrap();
        assert!((nll - python).abs() < 2e-4, "{nll} against {python}");
        let tokens = fx["tokens_scored"].as_u64().unwrap();
        assert!(
            stdout.contains(&format!("over {tokens} tokens (2 pieces;")),
            "{stdout}"
        );
    }

    // A file that is not the benchmark's: where, and what.
    std::fs::write(
        &file,
        r#"{"test": [[[60, 55, 52, 48], [60, "x", 52, 48]]]}"#,
    )
    .unwrap();
    let out = eval(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&file.display().to_string())
            && stderr.contains("test[0][1][1] is not a number"),
        "{stderr}"
    );
    let out = eval(&dir.path().join("missing.json"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("missing.json"),
        "{stderr}"
    );
    std::fs::write(&file, r#"{"train": []}"#).unwrap();
    let out = eval(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(r#"no split "test""#), "{stderr}");
}
