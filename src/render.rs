//! Offline rendering: the live engine's very graph, stepped on a virtual clock as fast as it
//! goes. Inputs from a log are applied at the first block at or after their time, and the
//! control loop, the composer and the audio engine advance in lockstep, so the same scene, log
//! and seed give the same samples, byte for byte.

use std::path::{Path, PathBuf};

use crate::input::log::{self, LogError};
use crate::input::{TimedEvent, When};
use crate::midi::{self, MidiError};
use crate::scene::{Scene, SceneError};
use crate::session::{self, BuildOptions, Outcome, Parts, SessionError};

/// Frames per block: the control rate of a render (5.3 ms at 48 kHz).
pub const BLOCK: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Scene(#[from] SceneError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Midi(#[from] MidiError),
    #[error("{path}: cannot write WAV: {message}")]
    Wav { path: PathBuf, message: String },
    #[error("{path}:{line}: {message}")]
    Input {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

pub struct RenderOptions {
    pub scene: PathBuf,
    pub seconds: f64,
    pub inputs: Option<PathBuf>,
    pub seed: Option<u64>,
    pub sample_rate: u32,
    pub score: Option<PathBuf>,
}

/// What a render produced.
pub struct Rendered {
    /// Interleaved stereo.
    pub samples: Vec<f32>,
    pub sample_rate: u32,
    pub notes: Vec<crate::gen::NoteEvent>,
    pub tempi: Vec<(f64, f64)>,
    pub source: String,
    pub inputs_applied: usize,
    pub inputs_refused: usize,
}

pub fn render(opts: &RenderOptions) -> Result<Rendered, RenderError> {
    let scene = Scene::load(&opts.scene)?;
    let scenes_dir = opts
        .scene
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let score = opts.score.as_deref().map(midi::read).transpose()?;
    let (inputs, refused) = match &opts.inputs {
        Some(p) => log::to_events(p, &log::read(p)?, opts.sample_rate),
        None => (Vec::new(), 0),
    };
    let Parts {
        mut engine,
        mut conductor,
        mut composer,
    } = session::build(
        scene,
        BuildOptions {
            sample_rate: opts.sample_rate as f32,
            seed: opts.seed,
            score,
            recorder: None,
            scenes_dir: &scenes_dir,
        },
    )?;
    composer.capture = Some(Vec::new());

    let total = (opts.seconds.max(0.0) * opts.sample_rate as f64).round() as usize;
    let mut samples = vec![0f32; total * 2];
    let dt = BLOCK as f32 / opts.sample_rate as f32;
    let mut next_input = 0;
    let mut done = 0;
    while done < total {
        let n = (total - done).min(BLOCK);
        let now = done as u64;
        while let Some((sample, event)) = inputs.get(next_input) {
            if *sample > now {
                break;
            }
            next_input += 1;
            let beat = conductor.telemetry.beat();
            let ev = TimedEvent {
                when: When::Now,
                event: event.clone(),
            };
            match conductor.handle(ev)? {
                Outcome::Composer(msg) => composer.handle(msg, beat),
                Outcome::Nothing | Outcome::Status(_) => {}
            }
        }
        let (msg, _) = conductor.tick(dt)?;
        let beat = conductor.telemetry.beat();
        composer.handle(msg, beat);
        composer.fill(beat);
        engine.process(&mut samples[done * 2..(done + n) * 2], 2);
        done += n;
    }
    Ok(Rendered {
        samples,
        sample_rate: opts.sample_rate,
        notes: composer.capture.take().unwrap_or_default(),
        tempi: conductor.tempo_log.clone(),
        source: composer.source_name().to_string(),
        inputs_applied: next_input,
        inputs_refused: refused,
    })
}

/// Writes interleaved stereo f32 samples as a 32-bit float WAV.
pub fn write_wav(path: &Path, samples: &[f32], sample_rate: u32) -> Result<(), RenderError> {
    let err = |e: hound::Error| RenderError::Wav {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut w =
        hound::WavWriter::create(path, crate::record::wav_spec(sample_rate)).map_err(err)?;
    for &s in samples {
        w.write_sample(s).map_err(err)?;
    }
    w.finalize().map_err(err)
}

/// Onsets per second over all voices, from note events: how busy the music is.
pub fn notes_per_second(notes: &[crate::gen::NoteEvent], seconds: f64) -> f64 {
    notes.iter().filter(|n| n.on).count() as f64 / seconds.max(1e-9)
}
