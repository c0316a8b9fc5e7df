//! A fixed pool of voices per instrument, built before playing starts. Note-ons take an idle
//! voice, else steal the quietest releasing one, else the oldest; a stolen voice fades out over
//! a few milliseconds before the new note starts, so stealing never clicks.

use fundsp::prelude32::*;

use super::envelope::Envelope;
use super::instrument::voice_unit;
use crate::music::midi_to_hz;
use crate::scene::Instrument;

/// Samples a stolen voice takes to fade out before its new note starts (3 ms at 48 kHz).
const STEAL_FADE: f32 = 0.003;

struct Voice {
    unit: Box<dyn AudioUnit>,
    freq: Shared,
    env: Envelope,
    /// Who started the note (0..4 = soprano..bass, 4 = performer) and its pitch.
    tag: u8,
    pitch: u8,
    gain: f32,
    started: u64,
    pan_l: f32,
    pan_r: f32,
    /// A note waiting for this stolen voice to fade out: (tag, pitch, velocity).
    next: Option<(u8, u8, f32)>,
    /// Release automatically at this sample (performer notes without a note-off).
    hold_until: Option<u64>,
}

pub struct VoicePool {
    voices: Vec<Voice>,
    input: BufferArray<U1>,
    output: BufferArray<U1>,
    octave: i8,
    steal_samples: f32,
    counter: u64,
    pub stolen: u64,
}

fn pan_gains(pan: f32) -> (f32, f32) {
    let angle = (pan.clamp(-1.0, 1.0) + 1.0) * std::f32::consts::FRAC_PI_4;
    (angle.cos(), angle.sin())
}

impl VoicePool {
    pub fn new(inst: &Instrument, cutoff: &Shared, sample_rate: f32) -> Self {
        let voices = (0..inst.polyphony)
            .map(|i| {
                let freq = shared(220.0);
                // Spread voices across the stereo field around the instrument's pan.
                let offset = if inst.polyphony > 1 {
                    (i as f32 / (inst.polyphony - 1) as f32) * 2.0 - 1.0
                } else {
                    0.0
                };
                let (pan_l, pan_r) = pan_gains(inst.pan + inst.spread * offset * 0.5);
                Voice {
                    unit: voice_unit(inst.kind, &freq, cutoff, sample_rate),
                    freq,
                    env: Envelope::new(
                        sample_rate,
                        inst.attack,
                        inst.decay,
                        inst.sustain,
                        inst.release,
                    ),
                    tag: 0,
                    pitch: 0,
                    gain: 0.0,
                    started: 0,
                    pan_l,
                    pan_r,
                    next: None,
                    hold_until: None,
                }
            })
            .collect();
        Self {
            voices,
            input: BufferArray::new(),
            output: BufferArray::new(),
            octave: inst.octave,
            steal_samples: STEAL_FADE * sample_rate,
            counter: 0,
            stolen: 0,
        }
    }

    pub fn active(&self) -> usize {
        self.voices.iter().filter(|v| !v.env.is_idle()).count()
    }

    fn start(voice: &mut Voice, tag: u8, pitch: u8, velocity: f32, octave: i8, order: u64) {
        let sounding = (pitch as i32 + 12 * octave as i32).clamp(0, 127);
        voice.freq.set(midi_to_hz(sounding as f32));
        voice.tag = tag;
        voice.pitch = pitch;
        voice.gain = velocity.clamp(0.0, 1.0).powf(1.5);
        voice.started = order;
        voice.hold_until = None;
        voice.env.gate_on();
    }

    /// Starts a note; returns whether a sounding voice had to be stolen.
    pub fn note_on(&mut self, tag: u8, pitch: u8, velocity: f32, hold_until: Option<u64>) -> bool {
        self.counter += 1;
        let order = self.counter;
        let octave = self.octave;
        // Re-striking a pitch that is still sounding in the same part reuses its voice.
        let idle = self
            .voices
            .iter()
            .position(|v| v.tag == tag && v.pitch == pitch && !v.env.is_idle())
            .or_else(|| {
                self.voices
                    .iter()
                    .position(|v| v.env.is_idle() && v.next.is_none())
            });
        if let Some(i) = idle {
            let v = &mut self.voices[i];
            v.next = None;
            Self::start(v, tag, pitch, velocity, octave, order);
            v.hold_until = hold_until;
            return false;
        }
        // Steal: the quietest releasing voice, else the oldest.
        let victim = self
            .voices
            .iter()
            .enumerate()
            .filter(|(_, v)| v.env.is_releasing())
            .min_by(|a, b| a.1.env.level().total_cmp(&b.1.env.level()))
            .or_else(|| {
                self.voices
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, v)| v.started)
            })
            .map(|(i, _)| i)
            .unwrap_or(0);
        let v = &mut self.voices[victim];
        v.env.release_over(self.steal_samples);
        v.next = Some((tag, pitch, velocity));
        v.started = order;
        v.hold_until = hold_until;
        self.stolen += 1;
        true
    }

    pub fn note_off(&mut self, tag: u8, pitch: u8) {
        for v in &mut self.voices {
            if v.next.map(|n| (n.0, n.1)) == Some((tag, pitch)) {
                v.next = None;
            } else if v.tag == tag && v.pitch == pitch && !v.env.is_idle() && !v.env.is_releasing()
            {
                v.env.gate_off();
            }
        }
    }

    pub fn release_all(&mut self) {
        for v in &mut self.voices {
            v.next = None;
            v.env.gate_off();
        }
    }

    /// Adds `n` (at most 64) samples of every sounding voice into `left`/`right`, scaled by `gain`.
    /// `now` is the sample clock at the start of this span, for held performer notes.
    pub fn render(&mut self, n: usize, now: u64, gain: f32, left: &mut [f32], right: &mut [f32]) {
        let octave = self.octave;
        for v in &mut self.voices {
            if let Some(until) = v.hold_until {
                if now >= until {
                    v.hold_until = None;
                    v.env.gate_off();
                }
            }
            if v.env.is_idle() {
                match v.next.take() {
                    Some((tag, pitch, vel)) => {
                        let order = v.started;
                        let hold = v.hold_until;
                        Self::start(v, tag, pitch, vel, octave, order);
                        v.hold_until = hold;
                    }
                    None => continue,
                }
            }
            for e in self.input.channel_f32_mut(0).iter_mut().take(n) {
                *e = v.env.next();
            }
            v.unit
                .process(n, &self.input.buffer_ref(), &mut self.output.buffer_mut());
            let env = self.input.channel_f32(0);
            let out = self.output.channel_f32(0);
            let g = v.gain * gain;
            let (gl, gr) = (g * v.pan_l, g * v.pan_r);
            for i in 0..n {
                let s = out[i] * env[i];
                left[i] += s * gl;
                right[i] += s * gr;
            }
        }
    }
}
