//! Inputs from the room and the stage: OSC over UDP, and input logs (JSON Lines) that replay a
//! night in the gallery. Everything becomes an `InputEvent` before the control loop sees it.

pub mod access;
pub mod dispatch;
pub mod fuzzing;
pub mod log;
pub mod osc;

use std::net::SocketAddr;

/// One thing the room or a performer asked for.
#[derive(Clone, Debug, PartialEq)]
pub enum InputEvent {
    Movement(f32),
    Mood {
        valence: f32,
        arousal: f32,
    },
    Presence(i32),
    Scene(String),
    Tempo(f32),
    Volume(f32),
    /// Sound a note now on the performer instrument; velocity 0 releases it.
    Note {
        pitch: u8,
        velocity: u8,
    },
    /// `/roomscore/in/<name>`
    Named(String, f32),
    /// Reply with the engine's status to this address.
    Status(SocketAddr),
}

/// When an event should take effect.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum When {
    Now,
    /// An absolute position on the engine's sample clock (from an OSC time tag).
    Sample(u64),
}

#[derive(Clone, Debug, PartialEq)]
pub struct TimedEvent {
    pub when: When,
    pub event: InputEvent,
}
