//! A sample-accurate ADSR envelope computed on the audio thread. fundsp's `adsr_live` samples its
//! gate every 2 ms with jitter; notes here must start on their sample, so the envelope is ours.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Stage {
    Idle,
    Attack,
    Decay,
    Sustain,
    Release,
}

#[derive(Clone, Debug)]
pub struct Envelope {
    stage: Stage,
    level: f32,
    attack_step: f32,
    decay_coef: f32,
    sustain: f32,
    release_samples: f32,
    release_step: f32,
}

/// Below this an envelope in decay or release counts as finished.
const SILENT: f32 = 1.0e-4;

impl Envelope {
    pub fn new(sample_rate: f32, attack: f32, decay: f32, sustain: f32, release: f32) -> Self {
        let attack_samples = (attack * sample_rate).max(1.0);
        // Decay is exponential towards the sustain level, reaching ~1% of the way in `decay`.
        let decay_coef = (-4.6 / (decay * sample_rate).max(1.0)).exp();
        Self {
            stage: Stage::Idle,
            level: 0.0,
            attack_step: 1.0 / attack_samples,
            decay_coef,
            sustain,
            release_samples: (release * sample_rate).max(1.0),
            release_step: 0.0,
        }
    }

    pub fn is_idle(&self) -> bool {
        self.stage == Stage::Idle
    }

    pub fn is_releasing(&self) -> bool {
        self.stage == Stage::Release
    }

    pub fn level(&self) -> f32 {
        self.level
    }

    /// Starts the attack from the current level, so a retrigger does not click.
    pub fn gate_on(&mut self) {
        self.stage = Stage::Attack;
    }

    pub fn gate_off(&mut self) {
        self.release_over(self.release_samples);
    }

    /// Releases over `samples`, e.g. a few milliseconds when the voice is stolen.
    pub fn release_over(&mut self, samples: f32) {
        if self.stage != Stage::Idle {
            self.stage = Stage::Release;
            self.release_step = self.level / samples.max(1.0);
        }
    }

    #[inline]
    pub fn next(&mut self) -> f32 {
        match self.stage {
            Stage::Idle => {}
            Stage::Attack => {
                self.level += self.attack_step;
                if self.level >= 1.0 {
                    self.level = 1.0;
                    self.stage = Stage::Decay;
                }
            }
            Stage::Decay => {
                self.level = self.sustain + (self.level - self.sustain) * self.decay_coef;
                if (self.level - self.sustain).abs() < SILENT {
                    self.level = self.sustain;
                    self.stage = if self.sustain <= SILENT {
                        Stage::Idle
                    } else {
                        Stage::Sustain
                    };
                }
            }
            Stage::Sustain => {}
            Stage::Release => {
                self.level -= self.release_step;
                if self.level <= SILENT {
                    self.level = 0.0;
                    self.stage = Stage::Idle;
                }
            }
        }
        self.level
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attack_starts_on_the_sample_and_release_ends() {
        let mut e = Envelope::new(1000.0, 0.01, 0.1, 0.5, 0.02);
        assert_eq!(e.next(), 0.0);
        e.gate_on();
        assert!((e.next() - 0.1).abs() < 1e-6, "first sample already rises");
        for _ in 0..9 {
            e.next();
        }
        assert_eq!(e.level(), 1.0);
        for _ in 0..2000 {
            e.next();
        }
        assert!((e.level() - 0.5).abs() < 1e-3);
        e.gate_off();
        let mut n = 0;
        while !e.is_idle() {
            let before = e.level();
            assert!(e.next() <= before);
            n += 1;
        }
        assert!((19..=21).contains(&n), "{n}");
    }

    #[test]
    fn percussive_envelopes_finish_by_themselves() {
        let mut e = Envelope::new(1000.0, 0.001, 0.2, 0.0, 0.1);
        e.gate_on();
        let mut n = 0;
        while !e.is_idle() && n < 10_000 {
            e.next();
            n += 1;
        }
        assert!(e.is_idle());
    }
}
