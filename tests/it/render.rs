//! Offline rendering: determinism, and the room's inputs audibly steering the music.

use std::path::Path;

use roomscore::midi;
use roomscore::music::{estimate_key, Mode};

use super::common::*;

fn log(dir: &Path, name: &str, lines: &[&str]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n")).unwrap();
    p.display().to_string()
}

#[test]
fn same_arguments_give_byte_identical_wavs() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = log(
        dir.path(),
        "in.jsonl",
        &[
            r#"{"t": 1.0, "addr": "/roomscore/movement", "args": [0.9]}"#,
            r#"{"t": 3.0, "addr": "/roomscore/mood", "args": [-0.7, 0.8]}"#,
            r#"{"t": 4.0, "addr": "/roomscore/note", "args": [72, 110]}"#,
        ],
    );
    let gallery = scene("gallery");
    let g = gallery.to_str().unwrap();
    let mut files = Vec::new();
    for (i, seed) in ["7", "7", "8"].iter().enumerate() {
        let out = dir.path().join(format!("r{i}.wav"));
        render(&[
            "--scene",
            g,
            "--seconds",
            "8",
            "--seed",
            seed,
            "--inputs",
            &inputs,
            "--out",
            out.to_str().unwrap(),
        ]);
        files.push(std::fs::read(&out).unwrap());
    }
    assert!(files[0].len() > 8 * 48_000 * 8, "8 s of stereo f32");
    assert!(files[0] == files[1], "same seed, same bytes");
    assert!(files[0] != files[2], "another seed, other music");
}

/// Notes per second and the key heard, from the MIDI file a render wrote.
fn analyse(midi_path: &Path, seconds: f64) -> (f64, Mode, f32) {
    let score = midi::read(midi_path).unwrap();
    let onsets = score.events.iter().filter(|e| e.on).count();
    // Weight each pitch class by how long it sounds.
    let mut hist = [0f32; 12];
    let mut open: std::collections::HashMap<(u8, u8), f64> = Default::default();
    for e in &score.events {
        if e.on {
            open.insert((e.voice, e.pitch), e.beat);
        } else if let Some(start) = open.remove(&(e.voice, e.pitch)) {
            hist[(e.pitch % 12) as usize] += (e.beat - start) as f32;
        }
    }
    let (_, mode, r) = estimate_key(&hist).expect("notes were played");
    (onsets as f64 / seconds, mode, r)
}

fn render_with(dir: &Path, name: &str, lines: &[&str], seconds: &str) -> std::path::PathBuf {
    let inputs = log(dir, &format!("{name}.jsonl"), lines);
    let mid = dir.join(format!("{name}.mid"));
    let gallery = scene("gallery");
    render(&[
        "--scene",
        gallery.to_str().unwrap(),
        "--seconds",
        seconds,
        "--seed",
        "3",
        "--inputs",
        &inputs,
        "--out",
        dir.join(format!("{name}.wav")).to_str().unwrap(),
        "--midi",
        mid.to_str().unwrap(),
    ]);
    mid
}

#[test]
fn more_movement_gives_denser_music() {
    let dir = tempfile::tempdir().unwrap();
    let still = render_with(
        dir.path(),
        "still",
        &[r#"{"t": 0.0, "addr": "/roomscore/movement", "args": [0.0]}"#],
        "60",
    );
    let busy = render_with(
        dir.path(),
        "busy",
        &[r#"{"t": 0.0, "addr": "/roomscore/movement", "args": [1.0]}"#],
        "60",
    );
    let (still_rate, _, _) = analyse(&still, 60.0);
    let (busy_rate, _, _) = analyse(&busy, 60.0);
    assert!(
        busy_rate > 2.0 * still_rate,
        "movement 1.0 gives {busy_rate:.2} notes/s, movement 0.0 gives {still_rate:.2}"
    );
}

#[test]
fn mood_changes_the_mode() {
    let dir = tempfile::tempdir().unwrap();
    let happy = render_with(
        dir.path(),
        "happy",
        &[
            r#"{"t": 0.0, "addr": "/roomscore/mood", "args": [0.9, 0.5]}"#,
            r#"{"t": 0.0, "addr": "/roomscore/movement", "args": [0.6]}"#,
        ],
        "60",
    );
    let sad = render_with(
        dir.path(),
        "sad",
        &[
            r#"{"t": 0.0, "addr": "/roomscore/mood", "args": [-0.9, 0.5]}"#,
            r#"{"t": 0.0, "addr": "/roomscore/movement", "args": [0.6]}"#,
        ],
        "60",
    );
    let (_, happy_mode, _) = analyse(&happy, 60.0);
    let (_, sad_mode, _) = analyse(&sad, 60.0);
    assert_eq!(happy_mode, Mode::Major);
    assert_eq!(sad_mode, Mode::Minor);
}

#[test]
fn a_score_plays_through_the_scene_instruments() {
    let dir = tempfile::tempdir().unwrap();
    let first = render_with(
        dir.path(),
        "first",
        &[r#"{"t": 0.0, "addr": "/roomscore/movement", "args": [0.5]}"#],
        "10",
    );
    let out = dir.path().join("score.wav");
    let again = dir.path().join("again.mid");
    let perf = scene("performer");
    let stdout = render(&[
        "--scene",
        perf.to_str().unwrap(),
        "--seconds",
        "10",
        "--score",
        first.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--midi",
        again.to_str().unwrap(),
    ]);
    assert!(stdout.contains("source score"), "{stdout}");
    let a = midi::read(&first).unwrap();
    let b = midi::read(&again).unwrap();
    let ons = |s: &midi::Score| -> Vec<(u8, u8)> {
        s.events
            .iter()
            .filter(|e| e.on)
            .map(|e| (e.voice, e.pitch))
            .collect()
    };
    assert!(!ons(&a).is_empty());
    assert_eq!(ons(&a), ons(&b), "the score's notes are what played");
    let (_, samples) = read_wav(&out);
    assert!(
        samples.iter().any(|s| s.abs() > 0.01),
        "the score is audible"
    );
}

/// A night's log can hold a scene change that failed live (a file renamed since, a typo from a
/// patch): the engine kept its scene then, so a render of the log keeps it too, renders the
/// whole length, and says how many inputs failed.
#[test]
fn a_logged_scene_change_that_fails_keeps_the_scene_as_the_room_did() {
    let dir = tempfile::tempdir().unwrap();
    let good = [
        r#"{"t": 0.2, "addr": "/roomscore/movement", "args": [0.9]}"#,
        r#"{"t": 1.5, "addr": "/roomscore/mood", "args": [-0.7, 0.8]}"#,
    ];
    let with_bad = [
        good[0],
        r#"{"t": 1.0, "addr": "/roomscore/scene", "args": ["no-such-scene"]}"#,
        good[1],
    ];
    let gallery = scene("gallery");
    let mut wavs = Vec::new();
    let mut outs = Vec::new();
    for (name, lines) in [("good", &good[..]), ("bad", &with_bad[..])] {
        let out = dir.path().join(format!("{name}.wav"));
        outs.push(render(&[
            "--scene",
            gallery.to_str().unwrap(),
            "--seconds",
            "3",
            "--seed",
            "4",
            "--inputs",
            &log(dir.path(), &format!("{name}.jsonl"), lines),
            "--out",
            out.to_str().unwrap(),
        ]));
        wavs.push(read_wav(&out).1);
    }
    assert_eq!(wavs[1].len(), 3 * 48_000 * 2, "the whole length rendered");
    assert!(wavs[0] == wavs[1], "the failed change changed nothing");
    assert!(
        outs[0].contains("2 inputs applied, 0 failed"),
        "{}",
        outs[0]
    );
    assert!(
        outs[1].contains("2 inputs applied, 1 failed"),
        "{}",
        outs[1]
    );
}

/// A change to a model scene: the model hears the bar the room last heard and composes on from
/// it, without failing over to the rules, and the render stays byte for byte repeatable.
#[test]
fn a_model_scene_switched_to_carries_on_from_the_scene_before() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = log(
        dir.path(),
        "to-chorale.jsonl",
        &[r#"{"t": 4.0, "addr": "/roomscore/scene", "args": ["chorale"]}"#],
    );
    let gallery = scene("gallery");
    let mut wavs = Vec::new();
    for i in 0..2 {
        let wav = dir.path().join(format!("{i}.wav"));
        let out = std::process::Command::new(bin())
            .current_dir(root())
            .env("RUST_LOG", "info")
            .args([
                "render",
                "--scene",
                gallery.to_str().unwrap(),
                "--seconds",
                "7",
                "--seed",
                "3",
                "--inputs",
                &inputs,
                "--out",
                wav.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{}: {stderr}", out.status);
        assert!(stdout.contains("source model"), "{stdout}");
        assert!(!stderr.contains("failed"), "{stderr}");
        assert!(
            stderr.contains("source=\"model\"")
                && stderr.contains("carrying on from the last 16 steps the room heard"),
            "{stderr}"
        );
        wavs.push(std::fs::read(&wav).unwrap());
    }
    assert!(wavs[0] == wavs[1]);
}
