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
    /// Logged inputs that were valid messages but failed where they were applied (a scene
    /// change to a file that does not load): the live engine kept its scene, and so did this.
    pub inputs_failed: usize,
}

/// The conductor, the composer and the audio engine stepped together, one block at a time, with
/// logged inputs applied at the first block at or after their sample. `render` runs it as fast
/// as it goes; `play --inputs` runs it just ahead of the device, so both give the same samples.
pub struct Lockstep {
    pub engine: crate::audio::AudioEngine,
    pub conductor: crate::session::Conductor,
    pub composer: crate::session::Composer,
    inputs: Vec<(u64, crate::input::InputEvent)>,
    next_input: usize,
    failed: usize,
    sample_rate: u32,
    dt: f32,
    done: u64,
}

impl Lockstep {
    pub fn new(
        parts: Parts,
        inputs: Vec<(u64, crate::input::InputEvent)>,
        sample_rate: u32,
    ) -> Self {
        Lockstep {
            engine: parts.engine,
            conductor: parts.conductor,
            composer: parts.composer,
            inputs,
            next_input: 0,
            failed: 0,
            sample_rate,
            dt: BLOCK as f32 / sample_rate as f32,
            done: 0,
        }
    }

    /// Logged inputs applied so far (those that failed among them).
    pub fn inputs_applied(&self) -> usize {
        self.next_input
    }

    /// Logged inputs that failed where they were applied, so far.
    pub fn inputs_failed(&self) -> usize {
        self.failed
    }

    /// Applies an input now: what is for the composer goes to it at the current beat; any
    /// other outcome (a status request) is returned for the caller to answer.
    pub fn apply(&mut self, ev: TimedEvent) -> Result<Outcome, SessionError> {
        match self.conductor.handle(ev)? {
            Outcome::Composer(msg) => {
                self.to_composer(msg);
                Ok(Outcome::Nothing)
            }
            other => Ok(other),
        }
    }

    /// Hands the composer a message at the current beat.
    pub fn to_composer(&mut self, msg: crate::session::ComposerMsg) {
        let beat = self.conductor.telemetry.beat();
        self.composer.handle(msg, beat);
    }

    /// Renders the next `out.len() / 2` frames (at most `BLOCK`), interleaved stereo. An input
    /// that fails (a scene change to a file that does not load) is logged and the scene that
    /// plays is kept, as the live engine did when the message came: a replay of a night holds
    /// to what the room heard, and never stops. Returns what is left for the caller of the
    /// timed inputs that fell due (status requests to answer); usually nothing, which costs no
    /// allocation.
    pub fn block(&mut self, out: &mut [f32]) -> Vec<Outcome> {
        let now = self.done;
        while let Some((sample, event)) = self.inputs.get(self.next_input) {
            if *sample > now {
                break;
            }
            let at = *sample as f64 / self.sample_rate as f64;
            self.next_input += 1;
            let ev = TimedEvent {
                when: When::Now,
                event: event.clone(),
            };
            // A logged status request has no one to answer.
            if let Err(e) = self.apply(ev) {
                self.failed += 1;
                session::log_scene_kept(&format_args!("input log at {at:.3} s: {e}"));
            }
        }
        let (msg, due) = self.conductor.tick(self.dt);
        let mut left = Vec::new();
        for o in due {
            match o {
                // A timed scene change: the composer takes the new scene's piece.
                Ok(Outcome::Composer(m)) => self.to_composer(m),
                Ok(Outcome::Nothing) => {}
                Ok(other) => left.push(other),
                Err(e) => {
                    self.failed += 1;
                    session::log_scene_kept(&e);
                }
            }
        }
        let beat = self.conductor.telemetry.beat();
        self.composer.handle(msg, beat);
        self.composer.fill(beat);
        self.engine.process(out, 2);
        self.done += (out.len() / 2) as u64;
        left
    }
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
    let parts = session::build(
        scene,
        BuildOptions {
            sample_rate: opts.sample_rate as f32,
            seed: opts.seed,
            score,
            recorder: None,
            scenes_dir: &scenes_dir,
        },
    )?;
    let mut step = Lockstep::new(parts, inputs, opts.sample_rate);
    step.composer.capture = Some(Vec::new());

    let total = (opts.seconds.max(0.0) * opts.sample_rate as f64).round() as usize;
    let mut samples = vec![0f32; total * 2];
    for chunk in samples.chunks_mut(BLOCK * 2) {
        // Offline, a logged status request has no one to answer.
        let _ = step.block(chunk);
    }
    Ok(Rendered {
        samples,
        sample_rate: opts.sample_rate,
        notes: step.composer.capture.take().unwrap_or_default(),
        tempi: step.conductor.tempo_log.clone(),
        source: step.composer.source_name().to_string(),
        inputs_applied: step.inputs_applied(),
        inputs_refused: refused,
        inputs_failed: step.inputs_failed(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::InputEvent;

    /// A time-tagged scene change that falls due inside a block (a live bundle during `play
    /// --inputs`) hands the composer the new scene's piece, as an immediate one does.
    #[test]
    fn a_timed_scene_change_reaches_the_composer() {
        let parts = session::test_parts(session::test_scene("gallery"), 2);
        let mut step = Lockstep::new(parts, Vec::new(), 48_000);
        assert_eq!(step.composer.source_name(), "rules");
        let ev = TimedEvent {
            when: When::Sample(4_800),
            event: InputEvent::Scene("chorale".into()),
        };
        assert!(matches!(step.apply(ev), Ok(Outcome::Nothing)), "held");
        let mut out = vec![0f32; BLOCK * 2];
        for _ in 0..40 {
            assert!(step.block(&mut out).is_empty());
        }
        assert_eq!(step.conductor.scene.name, "chorale");
        // The chorale composes with the model (ONNX Runtime, or tract where it is absent).
        assert_eq!(step.composer.source_name(), "model");
    }
}
