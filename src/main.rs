//! The `roomscore` command line: play, render, check, devices, bench.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[cfg(feature = "rt-check")]
#[global_allocator]
static ALLOC: assert_no_alloc::AllocDisabler = assert_no_alloc::AllocDisabler;

#[derive(Parser)]
#[command(
    name = "roomscore",
    version,
    about = "A real-time generative music engine for rooms"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Play a scene live until SIGINT/SIGTERM.
    Play(roomscore::play::PlayArgs),
    /// Render a scene offline into a WAV (and MIDI) file.
    Render(RenderArgs),
    /// Validate scene files.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// List audio hosts and output devices.
    Devices,
    /// Measure render speed and audio-callback cost.
    Bench(roomscore::bench::BenchArgs),
    /// The trained model: card, JSB evaluation, control check, decoding benchmark.
    Model(roomscore::model::cli::ModelArgs),
    /// Check audio output, ONNX Runtime, the model, the OSC port and the scenes.
    Doctor(roomscore::doctor::DoctorArgs),
    /// Measure OSC-note-to-output latency against a running engine, on JACK's frame clock.
    #[cfg(feature = "jack")]
    Latency(roomscore::latency::LatencyArgs),
}

#[derive(clap::Args)]
struct RenderArgs {
    #[arg(long, default_value = "scenes/gallery.toml")]
    scene: PathBuf,
    #[arg(long)]
    seconds: f64,
    /// Input log (JSON Lines) to replay.
    #[arg(long)]
    inputs: Option<PathBuf>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    out: PathBuf,
    /// Also write the notes as a MIDI file.
    #[arg(long)]
    midi: Option<PathBuf>,
    /// Play this MIDI file through the scene's instruments instead of the generator.
    #[arg(long)]
    score: Option<PathBuf>,
    /// Hz, 8000..=384000.
    #[arg(long, default_value_t = 48_000, value_parser = clap::value_parser!(u32).range(8_000..=384_000))]
    sample_rate: u32,
}

fn main() -> ExitCode {
    roomscore::logging::init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("roomscore: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause once: the library's errors already name their cause in
/// their own message ("x.toml: cannot read scene file: No such file"), which `{:#}` would repeat.
fn report(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !msg.contains(&cause) {
            msg = format!("{msg}: {cause}");
        }
    }
    msg
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Play(args) => roomscore::play::run(args).map(|_| ExitCode::SUCCESS),
        Cmd::Doctor(args) => Ok(if roomscore::doctor::run(args) == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
        Cmd::Model(args) => roomscore::model::cli::run(args).map(|_| ExitCode::SUCCESS),
        #[cfg(feature = "jack")]
        Cmd::Latency(args) => roomscore::latency::run(args).map(|_| ExitCode::SUCCESS),
        Cmd::Render(a) => {
            if !(a.seconds.is_finite() && a.seconds > 0.0 && a.seconds <= 86_400.0) {
                anyhow::bail!("--seconds {} must be between 0 and 86400", a.seconds);
            }
            let opts = roomscore::render::RenderOptions {
                scene: a.scene,
                seconds: a.seconds,
                inputs: a.inputs,
                seed: a.seed,
                sample_rate: a.sample_rate,
                score: a.score,
            };
            let started = std::time::Instant::now();
            let r = roomscore::render::render(&opts)?;
            let elapsed = started.elapsed().as_secs_f64();
            roomscore::render::write_wav(&a.out, &r.samples, r.sample_rate)?;
            let lufs = roomscore::loudness::integrated_lufs(&r.samples, 2, r.sample_rate);
            let dc = roomscore::loudness::dc_offset(&r.samples, 2);
            println!(
                "loudness {} LUFS integrated, sample peak {:.2} dBFS, DC offset {:.1e} / {:.1e}",
                lufs.map_or("(silent)".to_string(), |l| format!("{l:.1}")),
                roomscore::loudness::sample_peak_dbfs(&r.samples),
                dc.first().copied().unwrap_or(0.0),
                dc.get(1).copied().unwrap_or(0.0)
            );
            if let Some(m) = &a.midi {
                roomscore::midi::write(m, &r.notes, &r.tempi)
                    .with_context(|| format!("writing {}", m.display()))?;
            }
            println!(
                "rendered {:.1} s of {} in {:.2} s ({:.0}x real time), source {}, {} notes ({:.2}/s), {} inputs applied, {} failed where applied (the scene kept), {} refused -> {}",
                a.seconds,
                opts.scene.display(),
                elapsed,
                a.seconds / elapsed.max(1e-9),
                r.source,
                r.notes.iter().filter(|n| n.on).count(),
                roomscore::render::notes_per_second(&r.notes, a.seconds),
                r.inputs_applied - r.inputs_failed,
                r.inputs_failed,
                r.inputs_refused,
                a.out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { files } => {
            let mut ok = true;
            for f in files {
                match roomscore::scene::Scene::load(&f) {
                    Ok(s) => println!(
                        "{}: ok (scene {:?}, {} instruments, {} mappings, {} layers)",
                        f.display(),
                        s.name,
                        s.instruments.len(),
                        s.mappings.len(),
                        s.layers.len()
                    ),
                    Err(e) => {
                        ok = false;
                        eprintln!("{e}");
                    }
                }
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Devices => {
            roomscore::output::list_devices()?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(args) => roomscore::bench::run(args).map(|_| ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::report;

    fn gone() -> anyhow::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no such file").into()
    }

    #[test]
    fn a_cause_the_message_already_names_is_said_once() {
        let e = gone().context("x.toml: cannot read scene file: no such file");
        assert_eq!(report(&e), "x.toml: cannot read scene file: no such file");
    }

    #[test]
    fn a_cause_the_message_leaves_out_is_added() {
        let e = gone().context("reading x.toml");
        assert_eq!(report(&e), "reading x.toml: no such file");
    }
}
