//! What the audio thread tells everyone else, as atomics: the sample clock, the beat, what it
//! played and what went wrong. Written by one thread, read by any.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

#[derive(Default, Debug)]
pub struct Telemetry {
    /// Frames rendered since the engine started.
    pub sample_clock: AtomicU64,
    /// The playhead in beats, as f64 bits.
    beat_bits: AtomicU64,
    /// The tempo the transport runs at, as f64 bits.
    tempo_bits: AtomicU64,
    pub notes_played: AtomicU64,
    /// Notes that arrived after their time and were played at once.
    pub notes_late: AtomicU64,
    /// Events the audio thread could not hold (its pending list was full).
    pub events_dropped: AtomicU64,
    pub voices_stolen: AtomicU64,
    pub voices_active: AtomicU32,
    /// Output underruns reported by the host, or gaps seen in the callback timing.
    pub xruns: AtomicU64,
    pub callbacks: AtomicU64,
    /// Worst callback time as a share of its period, in millionths.
    pub load_max_ppm: AtomicU32,
    /// Recent callback time as a share of its period, in millionths.
    pub load_ppm: AtomicU32,
    /// Peak output level since last read, as f32 bits.
    peak_bits: AtomicU32,
    /// Samples the recorder could not take (its queue was full).
    pub record_dropped: AtomicU64,
    /// Callbacks that found the engine busy (being moved between outputs) and played silence.
    pub busy_callbacks: AtomicU64,
    /// Whether a sound device (not the null output) drives the engine now.
    pub on_device: AtomicBool,
    /// Times the device was lost and the null output took over.
    pub device_losses: AtomicU64,
    /// The sample that starts the buffer being rendered, and when it reaches the output.
    pub anchor: crate::clock::Anchor,
    /// Samples from a note's start to its sound at the output (the master limiter's lookahead);
    /// time-tagged events are started this much early so they are heard on their time.
    pub output_delay: AtomicU32,
}

impl Telemetry {
    pub fn beat(&self) -> f64 {
        f64::from_bits(self.beat_bits.load(Relaxed))
    }

    pub fn set_beat(&self, beat: f64) {
        self.beat_bits.store(beat.to_bits(), Relaxed);
    }

    pub fn tempo(&self) -> f64 {
        f64::from_bits(self.tempo_bits.load(Relaxed))
    }

    pub fn set_tempo(&self, bpm: f64) {
        self.tempo_bits.store(bpm.to_bits(), Relaxed);
    }

    pub fn note_peak(&self, peak: f32) {
        let old = f32::from_bits(self.peak_bits.load(Relaxed));
        if peak > old {
            self.peak_bits.store(peak.to_bits(), Relaxed);
        }
    }

    /// The peak since the last call, and resets it.
    pub fn take_peak(&self) -> f32 {
        f32::from_bits(self.peak_bits.swap(0f32.to_bits(), Relaxed))
    }
}
