//! Sound: the voice pools and their fundsp graphs, the sample layers through kira, the master
//! section, and the engine that runs them on the audio thread.

mod engine;
mod envelope;
mod ftz;
mod instrument;
mod layers;
mod rig;
mod telemetry;
mod voices;

pub use engine::{
    AudioEngine, Command, EngineQueues, LayerRenderer, LiveNote, TempoTarget, MAX_FRAMES,
};
pub use layers::{LayerError, Layers};
pub use rig::{Rig, RigHandle, PERFORMER};
pub use telemetry::Telemetry;
