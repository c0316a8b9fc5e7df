//! One mapping at run time: normalise the input, smooth it, shape it, scale it.

use crate::scene::Mapping;

/// A one-pole smoother with a time constant in seconds.
#[derive(Clone, Debug)]
pub struct Smoother {
    pub tau: f32,
    pub value: f32,
}

impl Smoother {
    pub fn new(tau: f32, value: f32) -> Self {
        Self { tau, value }
    }

    pub fn step(&mut self, target: f32, dt: f32) -> f32 {
        if self.tau <= 0.0 || !self.value.is_finite() {
            self.value = target;
        } else {
            let a = 1.0 - (-dt.max(0.0) / self.tau).exp();
            self.value += a * (target - self.value);
        }
        self.value
    }
}

pub struct MappingState {
    pub mapping: Mapping,
    smoother: Smoother,
}

impl MappingState {
    pub fn new(mapping: Mapping) -> Self {
        let smoother = Smoother::new(mapping.smooth, 0.0);
        Self { mapping, smoother }
    }

    fn normalise(&self, x: f32) -> f32 {
        let (lo, hi) = self.mapping.input_range;
        ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    }

    pub fn reset(&mut self, raw: f32) {
        self.smoother.value = self.normalise(raw);
    }

    /// Feeds the input's raw value and returns the target value.
    pub fn step(&mut self, raw: f32, dt: f32) -> f32 {
        let x = self.smoother.step(self.normalise(raw), dt);
        let y = self.mapping.curve.apply(x);
        let (a, b) = self.mapping.range;
        a + (b - a) * y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pole_reaches_63_percent_in_one_time_constant() {
        let mut s = Smoother::new(1.0, 0.0);
        let mut v = 0.0;
        for _ in 0..1000 {
            v = s.step(1.0, 0.001);
        }
        assert!((v - (1.0 - (-1.0f32).exp())).abs() < 1e-3, "{v}");
        let mut instant = Smoother::new(0.0, 0.0);
        assert_eq!(instant.step(0.7, 0.001), 0.7);
    }
}
