//! The generator: a `NoteSource` composes the 4-voice grid step by step (16th notes, S A T B);
//! the `Generator` turns steps into timed note events ahead of the playhead, rolls back what it
//! decoded ahead when the room changes the conditioning, and falls back to the rule-based source
//! when a model fails or, live, cannot keep up with the music.

mod generator;
pub mod history;
mod pace;
pub mod rules;

pub use generator::{Generator, GeneratorStats};
pub use pace::{fastest_fitting, fits, step_time};

use std::sync::Arc;

use crate::control::Conditioning;

/// Grid steps per beat: the model contract's 16th-note grid.
pub const STEPS_PER_BEAT: u64 = 4;
pub const VOICES: usize = 4;

/// The nearest whole number of grid steps to `beats` (none for a negative span).
pub fn steps_in(beats: f32) -> usize {
    (beats.max(0.0) * STEPS_PER_BEAT as f32).round() as usize
}

/// A pitch, or `None` for silence. A voice that keeps its pitch on the next step holds the note.
pub type Token = Option<u8>;
/// One grid step: soprano, alto, tenor, bass.
pub type Step = [Token; VOICES];

/// A step the room heard: the voices that sounded (a note a late step could not start is a rest
/// until the voice moves on), and the conditioning in force when it was committed.
#[derive(Clone, Debug, PartialEq)]
pub struct Heard {
    pub step: Step,
    pub cond: Arc<Conditioning>,
}

/// Sampling settings that can change while playing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{source_name}: {message}")]
    Failed {
        source_name: String,
        message: String,
    },
}

/// Something that composes the grid. Steps are asked for in order; `rollback` rewinds.
pub trait NoteSource: Send {
    fn name(&self) -> &str;

    /// The index of the step the next `next_step` call produces.
    fn position(&self) -> u64;

    /// Composes the step at `position()` under `cond`, and advances.
    fn next_step(
        &mut self,
        cond: &Conditioning,
        params: &SamplingParams,
    ) -> Result<Step, SourceError>;

    /// Forgets every step from `step` on, so that the next call composes `step` again
    /// (with whatever conditioning it is then given). `step` is at most `position()`.
    fn rollback(&mut self, step: u64) -> Result<(), SourceError>;

    /// Begins a fresh composition whose first step is `step` (a scene change mid-piece).
    fn start_at(&mut self, step: u64);

    /// Takes `heard`, steps another source played, in as the steps from `position()` on, each
    /// under its own conditioning, as if it had composed them, and moves on past them: a source
    /// taken back after another one played carries that music on instead of starting a piece of
    /// its own. The generator hands them over a few at a time, so each call costs about one
    /// step. A rollback cannot reach back across them, and after an error the source is not to
    /// be used again (the generator drops it). By default a source starts afresh after them.
    fn hear(&mut self, heard: &[Heard]) -> Result<(), SourceError> {
        self.start_at(self.position() + heard.len() as u64);
        Ok(())
    }
}

/// What the audio thread receives: a note starting or ending at a beat.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoteEvent {
    pub beat: f64,
    /// 0..4 = soprano..bass.
    pub voice: u8,
    pub pitch: u8,
    /// 0..1; 0 for note-offs.
    pub velocity: f32,
    pub on: bool,
}
