//! The rule-based composer: a per-voice constrained random walk over the scene's scale, with a
//! simple chord progression underneath. It reads the same conditioning the model does (density,
//! register, major/minor) and never fails, so it is the engine's fallback.

use super::history::History;
use super::{NoteSource, SamplingParams, SourceError, Step, Token, STEPS_PER_BEAT, VOICES};
use crate::control::Conditioning;
use crate::music::{Mode, PitchSet};
use crate::rng::Rng;

/// Lowest and highest pitch each voice may sing (the JSB Chorales' ranges, a little widened).
pub const VOICE_RANGES: [(u8, u8); VOICES] = [(57, 84), (50, 76), (45, 69), (33, 64)];
/// Each voice's distance from the mean register.
const VOICE_OFFSETS: [f32; VOICES] = [10.0, 3.0, -4.0, -13.0];
/// Relative activity per voice: the melody moves most, the bass least.
const VOICE_ACTIVITY: [f32; VOICES] = [1.3, 1.0, 0.9, 0.8];
/// Chords as scale degrees (0-based) of their root, for the progression walk.
const PROGRESSION: [&[usize]; 7] = [
    &[3, 4, 5, 1], // I -> IV V vi ii
    &[4, 6],       // ii -> V vii
    &[5, 3],       // iii -> vi IV
    &[4, 0, 1],    // IV -> V I ii
    &[0, 5, 3],    // V -> I vi IV
    &[1, 3, 4],    // vi -> ii IV V
    &[0],          // vii -> I
];

#[derive(Clone, Debug)]
struct State {
    rng: Rng,
    prev: Step,
    chord_root: usize,
    position: u64,
}

pub struct RuleSource {
    tonic: u8,
    scale_lock: bool,
    state: State,
    /// Snapshots taken before each step, so rollback can replay the same randomness.
    history: History<State>,
}

impl RuleSource {
    pub fn new(tonic: u8, scale_lock: bool, seed: u64) -> Self {
        Self {
            tonic,
            scale_lock,
            state: State {
                rng: Rng::new(seed ^ 0x0005_EED0_FA11),
                prev: [None; VOICES],
                chord_root: 0,
                position: 0,
            },
            history: History::default(),
        }
    }

    /// Starts from step `position` with the given sounding tokens (when taking over from a model).
    pub fn resume_at(&mut self, position: u64, sounding: Step) {
        self.state.position = position;
        self.state.prev = sounding;
        self.history.clear();
    }

    fn chord_tones(&self, mode: Mode, root: usize) -> [u8; 3] {
        let iv = mode.intervals();
        let mut tones = [0u8; 3];
        for (k, t) in tones.iter_mut().enumerate() {
            let mut pc = self.tonic + iv[(root + 2 * k) % 7];
            // Harmonic minor: the dominant's third is the raised leading tone.
            if mode == Mode::Minor && root == 4 && k == 1 {
                pc += 1;
            }
            *t = pc % 12;
        }
        tones
    }
}

fn metric_weight(step: u64) -> f32 {
    match step % (STEPS_PER_BEAT * 4) {
        0 => 2.2,
        s if s % STEPS_PER_BEAT == 0 => 1.6,
        s if s % 2 == 0 => 0.8,
        _ => 0.4,
    }
}

impl NoteSource for RuleSource {
    fn name(&self) -> &str {
        "rules"
    }

    fn position(&self) -> u64 {
        self.state.position
    }

    fn next_step(
        &mut self,
        cond: &Conditioning,
        params: &SamplingParams,
    ) -> Result<Step, SourceError> {
        self.history.push(self.state.clone());

        let density = cond.density.unwrap_or(3.0).clamp(0.0, 16.0);
        let register = cond.register.unwrap_or(62.0).clamp(36.0, 84.0);
        let mode = Mode::from_major_weight(cond.major.unwrap_or(1.0));
        let pos = self.state.position;
        let scale = if self.scale_lock {
            PitchSet::scale(self.tonic, mode)
        } else {
            PitchSet::all()
        };

        // Harmonic rhythm: a new chord every bar, or every half bar when the music is busy.
        let chord_len = if density > 5.0 { 8 } else { 16 };
        let new_chord = pos.is_multiple_of(chord_len);
        if new_chord && pos > 0 {
            let options = PROGRESSION[self.state.chord_root];
            let i = (self.state.rng.next_f32() * options.len() as f32) as usize;
            self.state.chord_root = options[i.min(options.len() - 1)];
        }
        let chord = self.chord_tones(mode, self.state.chord_root);

        // Temperature widens the walk: more leaps, less pull towards chord tones.
        let temp = params.temperature.clamp(0.05, 3.0);
        let mut step: Step = self.state.prev;
        let per_voice_per_step = density / (VOICES as f32 * STEPS_PER_BEAT as f32);
        let rest_chance = (0.35 - density * 0.08).clamp(0.0, 0.35);
        for v in 0..VOICES {
            let mut p_onset = per_voice_per_step * VOICE_ACTIVITY[v] * metric_weight(pos);
            // A voice holding a note that left the scale (mode change) moves on at once.
            let out_of_scale = matches!(self.state.prev[v], Some(p) if !scale.contains(p));
            if out_of_scale || (new_chord && v == 3) {
                p_onset = p_onset.max(0.9);
            }
            if self.state.rng.next_f32() >= p_onset.min(1.0) {
                continue;
            }
            if !out_of_scale && self.state.rng.next_f32() < rest_chance && v != 0 {
                step[v] = None;
                continue;
            }
            let (lo, hi) = VOICE_RANGES[v];
            let target = register + VOICE_OFFSETS[v];
            let from = self.state.prev[v].map(|p| p as f32).unwrap_or(target);
            // The voice above caps this one: no crossing.
            let ceiling = if v > 0 { step[v - 1].unwrap_or(hi) } else { hi };
            let mut weights = [0.0f32; 128];
            for pitch in lo..=hi.min(ceiling) {
                if !scale.contains(pitch) {
                    continue;
                }
                let leap = (pitch as f32 - from).abs();
                let mut w = (-leap / (2.5 * temp)).exp();
                w *= (-((pitch as f32 - target) / 6.0).powi(2)).exp();
                if chord.contains(&(pitch % 12)) {
                    w *= 1.0 + 3.0 * metric_weight(pos) / temp;
                }
                if Some(pitch) == self.state.prev[v] {
                    w *= 0.3;
                }
                weights[pitch as usize] = w;
            }
            let choice: Token = self.state.rng.weighted(&weights).map(|p| p as u8);
            step[v] = choice.or(step[v]);
        }
        self.state.prev = step;
        self.state.position += 1;
        Ok(step)
    }

    fn rollback(&mut self, step: u64) -> Result<(), SourceError> {
        if step >= self.state.position {
            return Ok(());
        }
        let back = (self.state.position - step) as usize;
        if let Some(before) = self.history.back(back) {
            self.state = before;
        } else {
            self.state.position = step;
            self.history.clear();
        }
        Ok(())
    }

    fn start_at(&mut self, step: u64) {
        self.resume_at(step, [None; VOICES]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(density: f32, register: f32, major: f32) -> Conditioning {
        Conditioning {
            density: Some(density),
            register: Some(register),
            major: Some(major),
            styles: vec![],
            tonic: None,
        }
    }

    const P: SamplingParams = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
    };

    fn run(src: &mut RuleSource, c: &Conditioning, n: usize) -> Vec<Step> {
        (0..n).map(|_| src.next_step(c, &P).unwrap()).collect()
    }

    fn onsets(steps: &[Step]) -> usize {
        let mut n = 0;
        let mut prev: Step = [None; 4];
        for s in steps {
            for v in 0..4 {
                if s[v].is_some() && s[v] != prev[v] {
                    n += 1;
                }
            }
            prev = *s;
        }
        n
    }

    #[test]
    fn density_register_and_mode_are_honoured() {
        let sparse = run(&mut RuleSource::new(0, true, 3), &cond(1.0, 62.0, 1.0), 512);
        let dense = run(&mut RuleSource::new(0, true, 3), &cond(6.0, 62.0, 1.0), 512);
        assert!(
            onsets(&dense) > 2 * onsets(&sparse),
            "{} vs {}",
            onsets(&dense),
            onsets(&sparse)
        );

        let mean = |steps: &[Step]| {
            let v: Vec<f32> = steps
                .iter()
                .flatten()
                .flatten()
                .map(|&p| p as f32)
                .collect();
            v.iter().sum::<f32>() / v.len() as f32
        };
        let low = run(&mut RuleSource::new(0, true, 3), &cond(3.0, 52.0, 1.0), 512);
        let high = run(&mut RuleSource::new(0, true, 3), &cond(3.0, 70.0, 1.0), 512);
        assert!(
            mean(&high) > mean(&low) + 8.0,
            "{} vs {}",
            mean(&high),
            mean(&low)
        );

        let minor = run(&mut RuleSource::new(0, true, 3), &cond(3.0, 62.0, 0.0), 256);
        let c_minor = PitchSet::scale(0, Mode::Minor);
        for s in &minor[16..] {
            for p in s.iter().flatten() {
                assert!(c_minor.contains(*p), "{p} outside C minor");
            }
        }
    }

    #[test]
    fn voices_stay_in_range_and_do_not_cross() {
        let steps = run(
            &mut RuleSource::new(5, true, 9),
            &cond(8.0, 66.0, 1.0),
            1000,
        );
        for s in steps {
            for v in 0..4 {
                if let Some(p) = s[v] {
                    assert!((VOICE_RANGES[v].0..=VOICE_RANGES[v].1).contains(&p));
                }
            }
        }
    }

    #[test]
    fn rollback_replays_the_same_steps() {
        let c = cond(4.0, 62.0, 1.0);
        let mut a = RuleSource::new(0, true, 11);
        let first = run(&mut a, &c, 40);
        a.rollback(25).unwrap();
        assert_eq!(a.position(), 25);
        let again = run(&mut a, &c, 15);
        assert_eq!(&first[25..], &again[..]);
    }
}
