//! The audio thread's side of the engine. `AudioEngine::process` is the callback: it takes note
//! events and commands from bounded queues, places them on their sample, renders the rig and
//! the sample layers, and publishes the clock. It never allocates, locks, blocks or logs.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::rig::{Rig, PERFORMER};
use super::telemetry::Telemetry;
use crate::gen::NoteEvent;

/// Largest span rendered at once; host buffers larger than this are rendered in pieces.
pub const MAX_FRAMES: usize = 4096;
/// Events the audio thread holds while they wait for their sample.
pub const PENDING_CAPACITY: usize = 2048;
/// Capacity of the queue from the generator.
pub const NOTE_QUEUE: usize = 1024;
/// Capacity of the command queue from the control thread.
pub const COMMAND_QUEUE: usize = 1024;
const SCENE_CROSSFADE_SECONDS: f32 = 1.5;

/// What the control thread asks of the audio thread.
pub enum Command {
    /// A performer's note; `at` places it on a sample (from an OSC time tag), else now.
    Note {
        note: LiveNote,
        at: Option<u64>,
    },
    /// A new scene's rig; the old one fades out and is sent back to be dropped.
    SwapRig(Box<Rig>),
    /// Fades everything to silence over this many seconds (shutdown, closing hours).
    FadeOut(f32),
    FadeIn(f32),
    ReleaseAll,
}

/// A performer's note. Immediate ones go straight from the thread that received them (the OSC
/// thread) to the audio thread on a live lane, so they do not wait for a second thread to wake;
/// time-tagged ones go through the control thread as `Command::Note`.
#[derive(Clone, Copy, Debug)]
pub struct LiveNote {
    pub pitch: u8,
    pub velocity: f32,
    pub on: bool,
}

impl LiveNote {
    /// From MIDI numbers: velocity 0 is a note-off.
    pub fn new(pitch: u8, velocity: u8) -> Self {
        LiveNote {
            pitch,
            velocity: velocity as f32 / 127.0,
            on: velocity > 0,
        }
    }
}

/// Capacity of each live lane.
pub const LIVE_LANE: usize = 1024;
/// Live lanes an engine can have (each receiving thread needs its own single-producer queue).
const MAX_LIVE_LANES: usize = 4;

/// The tempo the control thread asks for, read once per callback.
#[derive(Debug)]
pub struct TempoTarget(std::sync::atomic::AtomicU64);

impl TempoTarget {
    pub fn new(bpm: f64) -> Self {
        Self(std::sync::atomic::AtomicU64::new(bpm.to_bits()))
    }
    pub fn set(&self, bpm: f64) {
        if bpm.is_finite() && bpm > 0.0 {
            self.0.store(bpm.to_bits(), Relaxed);
        }
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
}

#[derive(Clone, Copy, Debug)]
enum At {
    Beat(f64),
    Sample(u64),
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    at: At,
    tag: u8,
    pitch: u8,
    velocity: f32,
    on: bool,
}

impl Pending {
    fn performer(note: LiveNote, at: u64) -> Self {
        Pending {
            at: At::Sample(at),
            tag: PERFORMER,
            pitch: note.pitch,
            velocity: note.velocity,
            on: note.on,
        }
    }
}

/// Renders the sample layers (kira) into a stereo interleaved buffer.
pub trait LayerRenderer: Send {
    fn start_block(&mut self);
    fn render(&mut self, out: &mut [f32]);
}

pub struct AudioEngine {
    sample_rate: f32,
    rig: Box<Rig>,
    fading_rig: Option<Box<Rig>>,
    crossfade: u32,
    crossfade_len: u32,
    notes: rtrb::Consumer<NoteEvent>,
    commands: rtrb::Consumer<Command>,
    live: Vec<rtrb::Consumer<LiveNote>>,
    garbage: rtrb::Producer<Box<Rig>>,
    pending: Vec<Pending>,
    tempo: Arc<TempoTarget>,
    beat: f64,
    clock: u64,
    telemetry: Arc<Telemetry>,
    layers: Option<Box<dyn LayerRenderer>>,
    layer_buf: Vec<f32>,
    left: Vec<f32>,
    right: Vec<f32>,
    old_left: Vec<f32>,
    old_right: Vec<f32>,
    fade_gain: f32,
    fade_step: f32,
    recorder: Option<rtrb::Producer<f32>>,
}

/// The other ends of the engine's queues.
pub struct EngineQueues {
    pub notes: rtrb::Producer<NoteEvent>,
    pub commands: rtrb::Producer<Command>,
    pub garbage: rtrb::Consumer<Box<Rig>>,
}

impl AudioEngine {
    pub fn new(
        rig: Rig,
        sample_rate: f32,
        tempo: Arc<TempoTarget>,
        telemetry: Arc<Telemetry>,
        layers: Option<Box<dyn LayerRenderer>>,
        recorder: Option<rtrb::Producer<f32>>,
    ) -> (AudioEngine, EngineQueues) {
        let (notes_tx, notes) = rtrb::RingBuffer::new(NOTE_QUEUE);
        let (commands_tx, commands) = rtrb::RingBuffer::new(COMMAND_QUEUE);
        let (garbage, garbage_rx) = rtrb::RingBuffer::new(8);
        telemetry.set_tempo(tempo.get());
        telemetry.output_delay.store(rig.output_delay, Relaxed);
        let engine = AudioEngine {
            sample_rate,
            rig: Box::new(rig),
            fading_rig: None,
            crossfade: 0,
            crossfade_len: (SCENE_CROSSFADE_SECONDS * sample_rate) as u32,
            notes,
            commands,
            live: Vec::with_capacity(MAX_LIVE_LANES),
            garbage,
            pending: Vec::with_capacity(PENDING_CAPACITY),
            tempo,
            beat: 0.0,
            clock: 0,
            telemetry,
            layers,
            layer_buf: vec![0.0; MAX_FRAMES * 2],
            left: vec![0.0; 64],
            right: vec![0.0; 64],
            old_left: vec![0.0; 64],
            old_right: vec![0.0; 64],
            fade_gain: 1.0,
            fade_step: 0.0,
            recorder,
        };
        (
            engine,
            EngineQueues {
                notes: notes_tx,
                commands: commands_tx,
                garbage: garbage_rx,
            },
        )
    }

    pub fn sample_rate(&self) -> f32 {
        self.sample_rate
    }

    pub fn clock(&self) -> u64 {
        self.clock
    }

    /// Voices sounding in the current rig.
    pub fn active_voices(&self) -> usize {
        self.rig.active_voices()
    }

    /// Replaces the queue to the recorder, returning the old one.
    pub fn set_recorder(
        &mut self,
        recorder: Option<rtrb::Producer<f32>>,
    ) -> Option<rtrb::Producer<f32>> {
        std::mem::replace(&mut self.recorder, recorder)
    }

    /// A new lane for immediate performer notes, for one receiving thread. Call it while setting
    /// up, before the engine moves to the audio thread; `None` once all lanes are taken.
    pub fn live_lane(&mut self) -> Option<rtrb::Producer<LiveNote>> {
        if self.live.len() == MAX_LIVE_LANES {
            return None;
        }
        let (tx, rx) = rtrb::RingBuffer::new(LIVE_LANE);
        self.live.push(rx);
        Some(tx)
    }

    fn push_pending(&mut self, p: Pending) {
        if self.pending.len() < PENDING_CAPACITY {
            self.pending.push(p);
        } else {
            self.telemetry.events_dropped.fetch_add(1, Relaxed);
        }
    }

    fn take_queues(&mut self) {
        for lane in 0..self.live.len() {
            while self.pending.len() < PENDING_CAPACITY {
                let Ok(note) = self.live[lane].pop() else {
                    break;
                };
                self.pending.push(Pending::performer(note, self.clock));
            }
        }
        // Leave notes in their queue when the pending list is full: the queue is the back-pressure.
        while self.pending.len() < PENDING_CAPACITY {
            let Ok(ev) = self.notes.pop() else { break };
            self.pending.push(Pending {
                at: At::Beat(ev.beat),
                tag: ev.voice,
                pitch: ev.pitch,
                velocity: ev.velocity,
                on: ev.on,
            });
        }
        while let Ok(cmd) = self.commands.pop() {
            match cmd {
                Command::Note { note, at } => {
                    self.push_pending(Pending::performer(note, at.unwrap_or(self.clock)))
                }
                Command::SwapRig(new) => {
                    self.telemetry.output_delay.store(new.output_delay, Relaxed);
                    let mut old = std::mem::replace(&mut self.rig, new);
                    old.release_all();
                    // A rig still fading from an earlier swap goes straight back.
                    if let Some(older) = self.fading_rig.replace(old) {
                        if let Err(rtrb::PushError::Full(r)) = self.garbage.push(older) {
                            // No room to send it back: keep fading it instead of freeing here.
                            self.fading_rig = Some(r);
                        }
                    }
                    self.crossfade = 0;
                }
                Command::FadeOut(seconds) => {
                    self.fade_step = -1.0 / (seconds.max(0.001) * self.sample_rate);
                }
                Command::FadeIn(seconds) => {
                    self.fade_step = 1.0 / (seconds.max(0.001) * self.sample_rate);
                }
                Command::ReleaseAll => {
                    self.rig.release_all();
                    self.pending.retain(|p| !p.on);
                }
            }
        }
    }

    /// The offset (in samples from now) of an event, given the samples per beat.
    fn offset_of(&self, at: At, samples_per_beat: f64) -> i64 {
        match at {
            At::Beat(b) => ((b - self.beat) * samples_per_beat).ceil() as i64,
            At::Sample(s) => s as i64 - self.clock as i64,
        }
    }

    /// Fills an interleaved buffer of `channels` channels. This is the audio callback.
    pub fn process(&mut self, out: &mut [f32], channels: usize) {
        let _ftz = super::ftz::FlushDenormals::new();
        let channels = channels.max(1);
        let frames = out.len() / channels;
        self.take_queues();
        let mut done = 0;
        while done < frames {
            let n = (frames - done).min(MAX_FRAMES);
            self.process_span(&mut out[done * channels..(done + n) * channels], channels);
            done += n;
        }
        self.telemetry.callbacks.fetch_add(1, Relaxed);
    }

    fn process_span(&mut self, out: &mut [f32], channels: usize) {
        let frames = out.len() / channels;
        let bpm = self.tempo.get().clamp(1.0, 1000.0);
        let samples_per_beat = self.sample_rate as f64 * 60.0 / bpm;
        self.telemetry.set_tempo(bpm);

        let layer_out = &mut self.layer_buf[..frames * 2];
        match &mut self.layers {
            Some(l) => {
                l.start_block();
                l.render(layer_out);
            }
            None => layer_out.fill(0.0),
        }

        let mut pos = 0;
        let mut peak = 0f32;
        while pos < frames {
            // Fire everything due now; find the next event inside this span.
            let mut next = frames.min(pos + 64);
            // One pass, in the order they came (firing a note-off queued after its note-on
            // before it would leave the note sounding): what is due fires, the rest moves down.
            let mut kept = 0;
            for i in 0..self.pending.len() {
                let p = self.pending[i];
                let off = self.offset_of(p.at, samples_per_beat);
                if off <= 0 {
                    if off < -1 && p.on {
                        self.telemetry.notes_late.fetch_add(1, Relaxed);
                    }
                    let stolen = self.rig.note(p.tag, p.pitch, p.velocity, p.on, self.clock);
                    if stolen > 0 {
                        self.telemetry.voices_stolen.fetch_add(stolen, Relaxed);
                    }
                    if p.on {
                        self.telemetry.notes_played.fetch_add(1, Relaxed);
                    }
                } else {
                    next = next.min(pos + off as usize);
                    self.pending[kept] = p;
                    kept += 1;
                }
            }
            self.pending.truncate(kept);
            let n = next - pos;

            let mut ll = [0f32; 64];
            let mut lr = [0f32; 64];
            for k in 0..n {
                ll[k] = self.layer_buf[(pos + k) * 2];
                lr[k] = self.layer_buf[(pos + k) * 2 + 1];
            }
            self.rig.render(
                n,
                self.clock,
                &ll[..n],
                &lr[..n],
                &mut self.left,
                &mut self.right,
            );
            if let Some(old) = &mut self.fading_rig {
                let zero = [0f32; 64];
                old.render(
                    n,
                    self.clock,
                    &zero[..n],
                    &zero[..n],
                    &mut self.old_left,
                    &mut self.old_right,
                );
                for k in 0..n {
                    let x =
                        ((self.crossfade + k as u32) as f32 / self.crossfade_len as f32).min(1.0);
                    // Equal-power crossfade between the scenes.
                    let (g_old, g_new) = (
                        (x * std::f32::consts::FRAC_PI_2).cos(),
                        (x * std::f32::consts::FRAC_PI_2).sin(),
                    );
                    self.left[k] = self.left[k] * g_new + self.old_left[k] * g_old;
                    self.right[k] = self.right[k] * g_new + self.old_right[k] * g_old;
                }
                self.crossfade += n as u32;
                if self.crossfade >= self.crossfade_len {
                    if let Some(old) = self.fading_rig.take() {
                        if let Err(rtrb::PushError::Full(r)) = self.garbage.push(old) {
                            self.fading_rig = Some(r);
                        }
                    }
                }
            }

            for k in 0..n {
                if self.fade_step != 0.0 {
                    self.fade_gain = (self.fade_gain + self.fade_step).clamp(0.0, 1.0);
                    if self.fade_gain == 0.0 || self.fade_gain == 1.0 {
                        self.fade_step = 0.0;
                    }
                }
                let (l, r) = (
                    self.left[k] * self.fade_gain,
                    self.right[k] * self.fade_gain,
                );
                let (l, r) = (sanitize(l), sanitize(r));
                peak = peak.max(l.abs()).max(r.abs());
                let frame = &mut out[(pos + k) * channels..(pos + k + 1) * channels];
                if channels == 1 {
                    frame[0] = 0.5 * (l + r);
                } else {
                    frame[0] = l;
                    frame[1] = r;
                    for c in &mut frame[2..] {
                        *c = 0.0;
                    }
                }
                if let Some(rec) = &mut self.recorder {
                    if rec.slots() >= 2 {
                        let _ = rec.push(l);
                        let _ = rec.push(r);
                    } else {
                        self.telemetry.record_dropped.fetch_add(2, Relaxed);
                    }
                }
            }
            self.beat += n as f64 / samples_per_beat;
            self.clock += n as u64;
            pos = next;
        }
        self.telemetry.note_peak(peak);
        self.telemetry.sample_clock.store(self.clock, Relaxed);
        self.telemetry.set_beat(self.beat);
        self.telemetry
            .voices_active
            .store(self.rig.active_voices() as u32, Relaxed);
    }
}

/// A NaN or infinity from a misbehaving graph must never reach the speakers.
#[inline]
fn sanitize(x: f32) -> f32 {
    if x.is_finite() {
        x.clamp(-1.0, 1.0)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::scene::Scene;
    use crate::session::{test_parts, test_scene};

    fn engine(scene: &str) -> AudioEngine {
        engine_of(test_scene(scene))
    }

    fn engine_of(scene: Scene) -> AudioEngine {
        test_parts(scene, 1).engine
    }

    fn first_sound(out: &[f32]) -> Option<usize> {
        out.chunks(2).position(|f| f[0] != 0.0 || f[1] != 0.0)
    }

    #[test]
    fn a_live_note_sounds_at_the_start_of_the_next_buffer() {
        // The latency scene: a silent band, a dry voice and no limiter lookahead.
        let mut e = engine("latency");
        let mut lane = e.live_lane().unwrap();
        let mut out = vec![0f32; 256 * 2];
        e.process(&mut out, 2);
        assert_eq!(first_sound(&out), None, "the band should be silent");
        lane.push(LiveNote::new(69, 100)).unwrap();
        e.process(&mut out, 2);
        let first = first_sound(&out).expect("the note should sound in this buffer");
        // One sample of limiter delay, and a pluck's first sample may itself be zero.
        assert!(first <= 2, "first sample at frame {first}");
        assert_eq!(e.telemetry.notes_played.load(Relaxed), 1);
    }

    #[test]
    fn lookahead_is_the_scenes_and_is_reported_as_output_delay() {
        assert_eq!(engine("latency").rig.output_delay, 1);
        // The default, a quarter of a millisecond.
        assert_eq!(engine("gallery").rig.output_delay, 12);
    }

    #[test]
    fn live_lanes_are_limited() {
        let mut e = engine("latency");
        let lanes: Vec<_> = (0..MAX_LIVE_LANES).map(|_| e.live_lane()).collect();
        assert!(lanes.iter().all(Option::is_some));
        assert!(e.live_lane().is_none());
    }

    /// A note struck and released within one buffer (a fast trill, a bundle with both) is
    /// released: events due together sound in the order they came.
    #[test]
    fn events_due_together_sound_in_the_order_they_came() {
        // The performer's part on a pad, which holds a note until it is released.
        let mut scene = test_scene("performer");
        let lead = scene.instruments.iter_mut().find(|i| i.performer).unwrap();
        (lead.kind, lead.sustain) = (crate::scene::InstrumentKind::Pad, 1.0);
        // Held performer notes end by themselves after this; not within the test.
        scene.master.performer_hold = 600.0;
        let mut e = engine_of(scene);
        let mut lane = e.live_lane().unwrap();
        let mut out = vec![0f32; 256 * 2];
        e.process(&mut out, 2);
        let base = e.active_voices();
        for (pitch, velocity) in [(62, 100), (60, 100), (60, 0)] {
            lane.push(LiveNote::new(pitch, velocity)).unwrap();
        }
        e.process(&mut out, 2);
        lane.push(LiveNote::new(62, 0)).unwrap();
        // Four seconds: every release has ended.
        for _ in 0..750 {
            e.process(&mut out, 2);
        }
        assert_eq!(e.telemetry.notes_played.load(Relaxed), 2);
        assert_eq!(e.active_voices(), base, "a note was left sounding");
    }
}
