//! `roomscore bench`: how fast the engine renders each shipped scene offline (as a multiple of
//! real time, on one thread), and what one audio callback costs with 32 sounding voices (as a
//! share of the buffer period).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::audio::{AudioEngine, Command, Rig, Telemetry, TempoTarget};
use crate::render::{render, RenderOptions};
use crate::scene::Scene;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Seconds of music to render per scene.
    #[arg(long, default_value_t = 60.0)]
    pub seconds: f64,
    /// Scene files; default every scene in scenes/.
    #[arg(long)]
    pub scene: Vec<PathBuf>,
    /// Audio callbacks to time.
    #[arg(long, default_value_t = 4000)]
    pub callbacks: usize,
    #[arg(long, default_value_t = 256)]
    pub buffer: usize,
}

/// A scene with 32 voices that sustain, so that all of them keep sounding while timed.
const VOICES_SCENE: &str = r#"
[scene]
name = "bench32"
[[instrument]]
name = "pad"
kind = "pad"
voices = ["soprano"]
polyphony = 8
sustain = 0.8
[[instrument]]
name = "pluck"
kind = "pluck"
voices = ["alto"]
polyphony = 8
sustain = 0.8
[[instrument]]
name = "bell"
kind = "bell"
voices = ["tenor"]
polyphony = 8
sustain = 0.8
[[instrument]]
name = "bass"
kind = "bass"
voices = ["bass"]
polyphony = 8
sustain = 0.8
[master]
reverb = 0.3
"#;

pub struct CallbackCost {
    pub voices: usize,
    pub period_ms: f64,
    pub mean_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Times `callbacks` calls of the audio callback with 32 voices sounding.
pub fn callback_cost(
    buffer: usize,
    callbacks: usize,
    sample_rate: f32,
) -> anyhow::Result<CallbackCost> {
    let scene = Scene::parse(VOICES_SCENE, Path::new("bench32.toml"))?;
    let (rig, _handle) = Rig::build(&scene, sample_rate);
    let (mut engine, mut queues) = AudioEngine::new(
        rig,
        sample_rate,
        Arc::new(TempoTarget::new(90.0)),
        Arc::new(Telemetry::default()),
        None,
        None,
    );
    let mut out = vec![0f32; buffer * 2];
    let mut voices = 0;
    let mut times = Vec::with_capacity(callbacks);
    for i in 0..callbacks {
        // Keep every voice busy: re-strike the whole pool now and then.
        if i % 200 == 0 {
            for v in 0..4u8 {
                for k in 0..8u8 {
                    let e = crate::gen::NoteEvent {
                        beat: 0.0,
                        voice: v,
                        pitch: 40 + v * 9 + k * 2,
                        velocity: 0.7,
                        on: true,
                    };
                    let _ = queues.notes.push(e);
                }
            }
        }
        let t = Instant::now();
        engine.process(&mut out, 2);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if i == 100 {
            voices = engine_voices(&engine);
        }
    }
    let _ = queues.commands.push(Command::ReleaseAll);
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    Ok(CallbackCost {
        voices,
        period_ms: buffer as f64 / sample_rate as f64 * 1e3,
        mean_ms: mean,
        p99_ms: times[(times.len() * 99 / 100).min(times.len() - 1)],
        max_ms: *times.last().unwrap_or(&0.0),
    })
}

fn engine_voices(e: &AudioEngine) -> usize {
    e.active_voices()
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let scenes = if args.scene.is_empty() {
        let mut v: Vec<PathBuf> = std::fs::read_dir("scenes")?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        v.sort();
        v
    } else {
        args.scene.clone()
    };
    println!(
        "machine: {} logical CPUs; render runs on one thread",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "offline render, {:.0} s of music per scene at 48 kHz:",
        args.seconds
    );
    for path in scenes {
        let t = Instant::now();
        let r = render(&RenderOptions {
            scene: path.clone(),
            seconds: args.seconds,
            inputs: None,
            seed: None,
            sample_rate: 48_000,
            score: None,
        })?;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "  {:<28} {:>7.1}x real time  ({:.2} s wall, {} notes, source {})",
            path.display(),
            args.seconds / secs,
            secs,
            r.notes.iter().filter(|n| n.on).count(),
            r.source
        );
    }
    let c = callback_cost(args.buffer, args.callbacks, 48_000.0)?;
    println!(
        "audio callback, {} frames ({:.2} ms period), {} sounding voices, {} callbacks:",
        args.buffer, c.period_ms, c.voices, args.callbacks
    );
    println!(
        "  mean {:.3} ms ({:.2} %), p99 {:.3} ms ({:.2} %), max {:.3} ms ({:.2} %)",
        c.mean_ms,
        c.mean_ms / c.period_ms * 100.0,
        c.p99_ms,
        c.p99_ms / c.period_ms * 100.0,
        c.max_ms,
        c.max_ms / c.period_ms * 100.0
    );
    Ok(())
}
