//! roomscore: a real-time generative music engine for rooms.
//!
//! The flow, from the room to the speakers: `input` (OSC, input logs) → `control` (scene
//! mappings) → `gen` (the composer, ahead of the playhead) → `audio` (voices, samples, master,
//! on the real-time thread) → `output` (cpal, or the null output) or `render` (offline).

pub mod aside;
pub mod audio;
pub mod clock;
pub mod control;
pub mod gen;
pub mod input;
pub mod midi;
pub mod model;
pub mod music;
pub mod render;
pub mod rng;
pub mod scene;
pub mod session;

pub use model::load_source as model_source;
pub mod bench;
pub mod doctor;
#[cfg(feature = "jack")]
pub mod latency;
pub mod logging;
pub mod loudness;
pub mod output;
pub mod play;
pub mod record;
pub mod replay;
pub mod systemd;
pub mod watchdog;
