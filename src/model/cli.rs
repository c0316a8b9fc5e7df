//! `roomscore model …`: print the card (`info`), score the JSB benchmark (`eval`), check that
//! the conditioning steers what comes out (`control`) and time a decoding step (`bench`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use super::card::{card_path_for, Card};
use super::features::{features, grid_key, spearman};
use super::runtime::{self, BackendKind, BACKEND_ENV};
use super::source::ModelSource;
use super::{eval, Model};
use crate::control::Conditioning;
use crate::gen::{steps_in, NoteSource, SamplingParams, Step};
use crate::music::Mode;

#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    #[command(subcommand)]
    pub cmd: ModelCmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum ModelCmd {
    /// Print the model card (and whether the file matches its hash).
    Info {
        /// The .onnx file or its .json card [default: models/roomscore-satb-mix.onnx]
        model: Option<PathBuf>,
        /// Print the card's JSON as it is.
        #[arg(long)]
        json: bool,
    },
    /// Mean NLL per token on the JSB Chorales, teacher-forced, by the card's protocol.
    Eval {
        /// Jsb16thSeparated.json, or the folder that holds it
        #[arg(long)]
        jsb: PathBuf,
        #[arg(long, default_value = "test")]
        split: String,
        #[arg(long)]
        model: Option<PathBuf>,
        /// Score only the first N pieces.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Sweep density, register and mode; measure what comes out the way the training data was
    /// measured; print Spearman's rho per attribute and the major/minor hit rate.
    Control {
        #[arg(long)]
        model: Option<PathBuf>,
        /// Steps generated per setting.
        #[arg(long, default_value_t = 64)]
        steps: usize,
        /// Generations per setting (2 leaves rho at the mercy of sampling noise).
        #[arg(long, default_value_t = 4)]
        reps: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0.95)]
        top_p: f32,
        #[arg(long, default_value = "chorale")]
        style: String,
        /// As a scene's `max_hold_beats`: no voice holds a note or rest longer (0 = the model alone).
        #[arg(long, default_value_t = 0.0)]
        max_hold_beats: f32,
        /// As a scene's `guidance`: classifier-free guidance weight; the default is the chorale
        /// scene's, 1 measures the conditioned model alone.
        #[arg(long, default_value_t = 3.0)]
        guidance: f32,
    },
    /// Per-step (4 tokens) decoding latency and tokens/s on one thread, per available backend.
    Bench {
        #[arg(long)]
        model: Option<PathBuf>,
        /// Steps timed, from an empty cache (full from step 128 on; its keys are turned back at
        /// step 512, then every 384, and those count too). 1000 leave the shipped models 880 with the cache full:
        /// a p99 of their 9 slowest, not 3.
        #[arg(long, default_value_t = 1000)]
        steps: usize,
        /// Also time steps under classifier-free guidance at this weight (a token's two sequences
        /// decoded together; the default is the chorale scene's); 1 times plain steps alone.
        #[arg(long, default_value_t = 3.0)]
        guidance: f32,
        /// Time only the backend this process runs (how `bench` runs each backend).
        #[arg(long, hide = true)]
        this_process: bool,
    },
}

/// `models/roomscore-satb-mix.onnx` (`DEFAULT_MODEL_FILE`) under the working directory, else
/// under the source tree.
pub fn default_model() -> PathBuf {
    let rel = Path::new("models").join(super::DEFAULT_MODEL_FILE);
    if rel.exists() {
        return rel;
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(&rel);
    if built.exists() {
        built
    } else {
        rel
    }
}

pub fn run(args: ModelArgs) -> anyhow::Result<()> {
    match args.cmd {
        ModelCmd::Info { model, json } => info(&model.unwrap_or_else(default_model), json),
        ModelCmd::Eval {
            jsb,
            split,
            model,
            limit,
        } => eval_cmd(&model.unwrap_or_else(default_model), &jsb, &split, limit),
        ModelCmd::Control {
            model,
            steps,
            reps,
            seed,
            temperature,
            top_p,
            style,
            max_hold_beats,
            guidance,
        } => control(
            &model.unwrap_or_else(default_model),
            steps,
            reps,
            seed,
            &style,
            Decoding {
                params: SamplingParams { temperature, top_p },
                max_hold: steps_in(max_hold_beats),
                guidance,
            },
        ),
        ModelCmd::Bench {
            model,
            steps,
            guidance,
            this_process,
        } => {
            let model = model.unwrap_or_else(default_model);
            if this_process {
                bench_here(&model, steps, guidance)
            } else {
                bench_all(&model, steps, guidance)
            }
        }
    }
}

fn info(path: &Path, json: bool) -> anyhow::Result<()> {
    let card = Card::load(&card_path_for(path))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&card.raw)?);
        return Ok(());
    }
    let onnx = card.model_path();
    let hash = match std::fs::read(&onnx) {
        Ok(bytes) => {
            use sha2::Digest;
            let actual = super::hex(&sha2::Sha256::digest(&bytes));
            if actual == card.sha256 {
                format!(
                    "{} (matches {}, {} bytes)",
                    card.sha256,
                    onnx.display(),
                    bytes.len()
                )
            } else {
                format!("{} (MISMATCH: {} is {actual})", card.sha256, onnx.display())
            }
        }
        Err(e) => format!("{} ({}: {e})", card.sha256, onnx.display()),
    };
    let v = &card.vocabulary;
    let a = &card.architecture;
    let c = &card.conditioning;
    println!("model        {} ({})", card.name, card.path.display());
    println!("file         {}", card.file);
    println!("sha256       {hash}");
    println!(
        "vocabulary   {} tokens: silence {}, BOS {}, MIDI {}..={} at {}..",
        v.size, v.silence, v.bos, v.pitch_min, v.pitch_max, v.pitch_offset
    );
    for (i, name) in card.voices.names.iter().enumerate() {
        let (lo, hi) = card.voice_range(i);
        println!("voice {i}      {name:<8} id {i}, sampled in MIDI {lo}..={hi}");
    }
    println!("styles       {}", card.styles.join(", "));
    println!("conditioning {} floats: {}", c.dim, c.names.join(", "));
    println!(
        "             density {:?} onsets/beat over {} steps; register {:?} MIDI over {} steps; mode K-S over {} steps",
        c.density.range, c.density.window_steps, c.register.range, c.register.window_steps, c.mode.window_steps
    );
    if c.tonic.is_some() {
        println!("             tonic: the key's pitch class, one-hot (the scene's key in play)");
    }
    if c.key.is_some() {
        println!(
            "             key: the mode's Krumhansl-Schmuckler profile turned to the tonic, 0..1 \
             (filled when tonic and mode are both known)"
        );
    }
    println!(
        "context      {} tokens (max positions {}); a full cache {}",
        card.context_length,
        card.max_positions,
        match &card.rotary {
            Some(r) => format!(
                "is a ring: each token overwrites the oldest (rotary base {}, pairs {})",
                r.base, r.pairs
            ),
            None => "cannot be kept (no rotary section)".into(),
        }
    );
    println!(
        "architecture {} layers, {} heads x {}, d_model {}, {} parameters",
        a.layers,
        a.heads,
        a.head_dim,
        a.d_model
            .map(|d| d.to_string())
            .unwrap_or_else(|| "?".into()),
        a.params
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into())
    );
    if let Some(m) = &card.transposition_mix {
        let shifts: Vec<String> = m
            .shifts
            .iter()
            .map(|&k| if k == 0 { "0".into() } else { format!("{k:+}") })
            .collect();
        println!(
            "mixture      the network reads its input moved by {} semitones and the graph gives the \
             mean of the {} distributions, moved back ({} sequences per pass, {} under guidance)",
            shifts.join(", "),
            m.shifts.len(),
            m.shifts.len(),
            2 * m.shifts.len()
        );
    }
    if let Some(c) = card.raw.get("calibration").filter(|c| !c.is_null()) {
        let num = |k: &str| c.get(k).and_then(serde_json::Value::as_f64);
        if let Some(t) = num("temperature") {
            let fit = match (num("valid_nll_before"), num("valid_nll_after")) {
                (Some(b), Some(a)) => format!(" (JSB valid {b} -> {a})"),
                _ => String::new(),
            };
            println!(
                "calibration  logits divided by {t}, fitted on JSB valid and folded into the \
                 output layer{fit}"
            );
        }
    }
    let io = |v: &[super::card::Io]| {
        v.iter()
            .map(|i| {
                let dims: Vec<String> = i.shape.iter().map(ToString::to_string).collect();
                format!("{} {} [{}]", i.name, i.dtype, dims.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    println!(
        "onnx         opset {}; in: {}",
        card.onnx.opset,
        io(&card.onnx.inputs)
    );
    println!("             out: {}", io(&card.onnx.outputs));
    if let Some(figs) = card
        .raw
        .get("evaluation")
        .and_then(|e| e.get("figures"))
        .and_then(|f| f.as_object())
    {
        for (k, v) in figs {
            println!("figure       {k} = {v}");
        }
    }
    Ok(())
}

fn eval_cmd(model: &Path, jsb: &Path, split: &str, limit: Option<usize>) -> anyhow::Result<()> {
    let mut m = Model::open(model)?;
    // Given the benchmark's folder, the file in it.
    let file = jsb.join("Jsb16thSeparated.json");
    let jsb = if jsb.is_dir() { &file } else { jsb };
    let mut pieces = eval::load_jsb(jsb, split, &m.card)?;
    if let Some(n) = limit {
        pieces.truncate(n);
    }
    let t0 = Instant::now();
    let (nll, n) = eval::score_split(&mut m.net, &m.card, &pieces)?;
    let backend = runtime::backend()?;
    println!(
        "JSB {split}: mean NLL {nll:.4} nats/token over {n} tokens ({} pieces; {:.1} s on {})",
        pieces.len(),
        t0.elapsed().as_secs_f64(),
        backend.kind.name()
    );
    if limit.is_none() {
        if let Some(py) = m.card.figure(&format!("jsb_{split}_nll")) {
            println!(
                "model card (Python, onnxruntime): {py:.5}; difference {:+.5}",
                nll - py
            );
        }
    }
    Ok(())
}

/// Generates `steps` steps from a fresh composition under `cond`.
fn generate(
    src: &mut ModelSource,
    cond: &Conditioning,
    params: &SamplingParams,
    steps: usize,
    start: u64,
) -> anyhow::Result<Vec<Step>> {
    src.start_at(start);
    (0..steps)
        .map(|_| src.next_step(cond, params).map_err(anyhow::Error::from))
        .collect()
}

/// How `control` decodes, as a scene would.
struct Decoding {
    params: SamplingParams,
    /// Steps a voice may hold (0 = any).
    max_hold: usize,
    guidance: f32,
}

fn control(
    model: &Path,
    steps: usize,
    reps: usize,
    seed: u64,
    style: &str,
    decoding: Decoding,
) -> anyhow::Result<()> {
    let Decoding {
        params,
        max_hold,
        guidance,
    } = decoding;
    let m = Model::open(model)?;
    let card = m.card.clone();
    // No scale lock: the point is to hear what the model does with the mode it is asked for.
    let mut src = ModelSource::new(m, 0, false, Mode::Major, seed)
        .with_max_hold(max_hold)
        .with_guidance(guidance);
    let base = Conditioning {
        density: None,
        register: None,
        major: None,
        styles: vec![(style.to_string(), 1.0)],
        tonic: None,
    };
    let mut run = 0u64;
    let sweeps: [(&str, &[f32]); 2] = [
        ("density", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        ("register", &[54.0, 58.0, 62.0, 66.0, 70.0]),
    ];
    for (attr, values) in sweeps {
        let (mut asked, mut got) = (Vec::new(), Vec::new());
        let mut pairs = Vec::new();
        for &val in values {
            for _ in 0..reps {
                let mut cond = base.clone();
                match attr {
                    "density" => cond.density = Some(val),
                    _ => cond.register = Some(val),
                }
                run += 1;
                let grid = generate(&mut src, &cond, &params, steps, run * 100_000)?;
                let f = features(&grid, &card);
                let meas = if attr == "density" {
                    mean(f.density.iter().map(|&x| x as f64))
                } else {
                    mean(
                        f.register
                            .iter()
                            .filter(|x| x.is_finite())
                            .map(|&x| x as f64),
                    )
                };
                asked.push(val as f64);
                got.push(meas);
                pairs.push(format!("{val}->{meas:.2}"));
            }
        }
        println!(
            "{attr:<9} rho {:.3}   (asked->measured: {})",
            spearman(&asked, &got),
            pairs.join(" ")
        );
    }
    let backend = runtime::backend()?.kind.name();
    let how = format!(
        "{steps} steps each, temperature {}, top-p {}, style {style}, holds {}, guidance {}, \
         {backend} backend",
        params.temperature,
        params.top_p,
        match max_hold {
            0 => "free".to_string(),
            n => format!("at most {n} steps"),
        },
        match guidance {
            1.0 => "off".to_string(),
            w => format!("{w}"),
        }
    );
    // As a scene asks: the mode alone (key unknown), and with the scene's tonic beside it.
    let mut asks: Vec<(&str, Vec<Option<u8>>)> = vec![("key unknown", vec![None; reps * 2])];
    if card.conditioning.tonic.is_some() {
        // Tonics round the circle of fifths, so every rep asks for another key.
        let tonics = (0..reps * 2).map(|i| Some((i * 7 % 12) as u8)).collect();
        asks.push(("with tonic", tonics));
    }
    for (label, tonics) in asks {
        let (mut hits, mut keys, mut n) = (0, 0, 0);
        let mut detail = Vec::new();
        for (mode, major) in [("major", 1.0f32), ("minor", 0.0)] {
            let mut h = 0;
            for &tonic in &tonics {
                let mut cond = base.clone();
                cond.major = Some(major);
                cond.tonic = tonic;
                run += 1;
                let grid = generate(&mut src, &cond, &params, steps, run * 100_000)?;
                let heard = grid_key(&grid, &card);
                if heard.is_some_and(|k| k.mode == major as i8) {
                    h += 1;
                    if tonic.is_some() && heard.map(|k| k.tonic) == tonic {
                        keys += 1;
                    }
                }
                n += 1;
            }
            hits += h;
            detail.push(format!("{mode} {h}/{}", tonics.len()));
        }
        let key_rate = match tonics[0] {
            Some(_) => format!(", whole key (tonic and mode) {keys}/{n}"),
            None => String::new(),
        };
        println!(
            "mode      hit rate {:.3}   {label}: {}{key_rate}; {how}",
            hits as f64 / n as f64,
            detail.join(", "),
        );
    }
    Ok(())
}

fn mean(it: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = it.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// "p50 .. ms  p99 .. ms  max .. ms" of step times sorted in ms.
fn spread(sorted: &[f64]) -> String {
    format!(
        "p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
        percentile(sorted, 0.5),
        percentile(sorted, 0.99),
        sorted.last().copied().unwrap_or(0.0)
    )
}

/// Times `steps` decoding steps in this process's backend, plain and (unless `guidance` is 1)
/// guided.
fn bench_here(model: &Path, steps: usize, guidance: f32) -> anyhow::Result<()> {
    let mut weights = vec![1.0];
    if guidance != 1.0 {
        weights.push(guidance);
    }
    for w in weights {
        bench_one(model, steps, w)?;
    }
    Ok(())
}

fn bench_one(model: &Path, steps: usize, guidance: f32) -> anyhow::Result<()> {
    let m = Model::open(model)?;
    // 8 warm-up steps of 4 tokens come first; from this timed step on the cache is full, or
    // within 8 steps of it, which is where an installation spends its months.
    let full_from = (m.card.context_length / 4).saturating_sub(8);
    let backend = runtime::backend()?.clone();
    let mut src = ModelSource::new(m, 0, true, Mode::Major, 1).with_guidance(guidance);
    let cond = Conditioning {
        density: Some(3.0),
        register: Some(62.0),
        major: Some(1.0),
        styles: vec![("chorale".into(), 1.0)],
        tonic: Some(0),
    };
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
    };
    for _ in 0..8 {
        src.next_step(&cond, &params)?;
    }
    src.start_at(0);
    let mut times = Vec::with_capacity(steps);
    let mut cpu = Vec::with_capacity(steps);
    let stolen_before = stolen_ms();
    let t0 = Instant::now();
    let mut turned = Vec::new();
    for i in 0..steps {
        let (t, c, before) = (Instant::now(), thread_cpu_ms(), src.turned());
        src.next_step(&cond, &params)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        cpu.push(thread_cpu_ms() - c);
        if src.turned() != before {
            turned.push(i);
        }
    }
    let total = t0.elapsed().as_secs_f64();
    let stolen = stolen_ms().zip(stolen_before).map(|(a, b)| a - b);
    let (at_turns, above) = cost_against_before(&times, &turned);
    let sorted_from = |x: &[f64], from: usize| {
        let mut v = x[from.min(x.len())..].to_vec();
        v.sort_by(f64::total_cmp);
        v
    };
    let (full, full_cpu) = (sorted_from(&times, full_from), sorted_from(&cpu, full_from));
    times.sort_by(f64::total_cmp);
    let how = match guidance {
        1.0 => "plain ".to_string(),
        w => format!("w={w:<4}"),
    };
    let name = backend.kind.name();
    println!(
        "{name:<6} {how} per step (4 tokens): {}  {:.0} tokens/s  ({steps} steps, 1 thread; {backend})",
        spread(&times),
        (steps * 4) as f64 / total,
    );
    if full.len() >= 100 {
        println!(
            "{name:<6} {how} full cache, steps {full_from}..{steps} (turns included): {}",
            spread(&full),
        );
        // A step's wall time counts whatever else the machine did meanwhile; its CPU time on this
        // thread does not, so a p99 far above the CPU time's was the machine, not the step.
        println!(
            "{name:<6} {how} full cache, CPU time on this thread: {}",
            spread(&full_cpu),
        );
    }
    if !above.is_empty() {
        println!(
            "{name:<6} {how} steps that turned the cached keys back ({}): p50 {:.3} ms, {:+.3} ms (median) against the 4 steps before each",
            turned.len(),
            percentile(&at_turns, 0.5),
            percentile(&above, 0.5),
        );
    }
    if let Some(ms) = stolen {
        println!(
            "{name:<6} {how} the hypervisor took {ms:.0} ms of CPU from this machine during the {:.1} s",
            total
        );
    }
    Ok(())
}

/// The times of the steps at `marked`, and what each took beyond the steps before it (the mean
/// of the middle two of the four before), both sorted. The steps before share the drift of the
/// machine's speed, which over a run moves a step's time more than one step's extra work does.
fn cost_against_before(times: &[f64], marked: &[usize]) -> (Vec<f64>, Vec<f64>) {
    let mut at: Vec<f64> = marked.iter().map(|&i| times[i]).collect();
    let mut above: Vec<f64> = marked
        .iter()
        .filter(|&&i| i >= 4)
        .map(|&i| {
            let mut before = times[i - 4..i].to_vec();
            before.sort_by(f64::total_cmp);
            times[i] - (before[1] + before[2]) / 2.0
        })
        .collect();
    at.sort_by(f64::total_cmp);
    above.sort_by(f64::total_cmp);
    (at, above)
}

/// CPU time this thread has used, in milliseconds.
fn thread_cpu_ms() -> f64 {
    crate::clock::clock_ns(libc::CLOCK_THREAD_CPUTIME_ID) as f64 * 1e-6
}

/// The time a hypervisor has taken from all of this machine's CPUs since boot (the `steal`
/// column of /proc/stat), in milliseconds; None where there is no such file or column.
fn stolen_ms() -> Option<f64> {
    let ticks = steal_ticks(&std::fs::read_to_string("/proc/stat").ok()?)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks * 1e3 / hz as f64)
}

/// The `steal` column of /proc/stat's first line (all CPUs), in clock ticks. Kernels before
/// 2.6.11 end the line sooner.
fn steal_ticks(stat: &str) -> Option<f64> {
    let mut cols = stat.lines().next()?.split_whitespace();
    if cols.next()? != "cpu" {
        return None;
    }
    cols.nth(7)?.parse().ok()
}

/// Runs the benchmark once per available backend, each in its own process (`ort` holds one
/// backend per process).
fn bench_all(model: &Path, steps: usize, guidance: f32) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the roomscore binary")?;
    let mut kinds = Vec::new();
    match runtime::find_dylib() {
        Some((path, _)) => kinds.push((BackendKind::OnnxRuntime, Some(path))),
        None => println!("ort    not available: no libonnxruntime found"),
    }
    kinds.push((BackendKind::Tract, None));
    for (kind, _) in kinds {
        let status = std::process::Command::new(&exe)
            .args(["model", "bench", "--this-process", "--steps"])
            .arg(steps.to_string())
            .arg("--guidance")
            .arg(guidance.to_string())
            .arg("--model")
            .arg(model)
            .env(BACKEND_ENV, kind.name())
            .env("OMP_NUM_THREADS", "1")
            .status()
            .with_context(|| format!("running {}", exe.display()))?;
        if !status.success() {
            anyhow::bail!("the {} benchmark failed ({status})", kind.name());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_the_eighth_count_of_the_all_cpus_line() {
        let stat =
            "cpu  1512 0 2241 718917 584 0 26 940 0 0\ncpu0 700 0 1100 359000 300 0 13 470 0 0\n";
        assert_eq!(steal_ticks(stat), Some(940.0));
        // A kernel too old to count steal, and a file that is not /proc/stat.
        assert_eq!(steal_ticks("cpu  1512 0 2241 718917 584 0 26\n"), None);
        assert_eq!(steal_ticks("intr 1 2 3 4 5 6 7 8 9\n"), None);
        assert_eq!(steal_ticks(""), None);
    }

    #[test]
    fn thread_cpu_time_grows_with_work_on_this_thread() {
        let before = thread_cpu_ms();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
        std::hint::black_box(x);
        assert!(thread_cpu_ms() > before);
    }

    #[test]
    fn a_marked_step_is_measured_against_the_steps_before_it() {
        // The machine slowed down at step 5 and stayed slow: the turn at 9 cost nothing, the one
        // at 4 cost 2 ms, and one too early to have four steps before it is left out.
        let times = [1.0, 1.0, 1.0, 1.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0];
        let (at, above) = cost_against_before(&times, &[2, 4, 9]);
        assert_eq!(at, [1.0, 2.0, 3.0]);
        assert_eq!(above, [0.0, 2.0]);
    }
}
