//! The control loop: room inputs in, `Controls` out. Each scene mapping reads one input, smooths
//! it, shapes it with a curve and scales it into its target's range.

mod mapping;

pub use mapping::{MappingState, Smoother};

use std::collections::BTreeMap;

use crate::scene::{InputName, Scene, Target};

/// The conditioning the composer reads beside every step. `None` means "unknown": the model was
/// trained with condition dropout, so unknown attributes leave it free.
#[derive(Clone, Debug, PartialEq)]
pub struct Conditioning {
    /// Onsets per beat, all four voices together.
    pub density: Option<f32>,
    /// Mean MIDI pitch of sounding notes.
    pub register: Option<f32>,
    /// Weight of major against minor, 0 = minor, 1 = major.
    pub major: Option<f32>,
    /// Style weights by name; empty means unknown style.
    pub styles: Vec<(String, f32)>,
    /// Pitch class of the key's tonic (0 = C); the scene's key.
    pub tonic: Option<u8>,
}

impl Conditioning {
    pub fn unknown() -> Self {
        Self {
            density: None,
            register: None,
            major: None,
            styles: Vec::new(),
            tonic: None,
        }
    }

    /// Whether `other` differs enough that already-decoded steps should be thrown away.
    pub fn differs(&self, other: &Conditioning) -> bool {
        fn opt(a: Option<f32>, b: Option<f32>, tol: f32) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => (a - b).abs() > tol,
                (None, None) => false,
                _ => true,
            }
        }
        opt(self.density, other.density, 0.1)
            || opt(self.register, other.register, 0.5)
            || opt(self.major, other.major, 0.05)
            || self.tonic != other.tonic
            || self.styles.len() != other.styles.len()
            || self
                .styles
                .iter()
                .zip(&other.styles)
                .any(|(a, b)| a.0 != b.0 || (a.1 - b.1).abs() > 0.05)
    }
}

/// The tempo range the engine plays, in BPM, whatever a scene, its mappings or an operator ask.
pub const MIN_TEMPO: f64 = 20.0;
pub const MAX_TEMPO: f64 = 300.0;

/// The fastest tempo `scene` reaches by its own mappings, from its base tempo: a room that moves
/// most drives the composer hardest. An operator's `/roomscore/tempo` may move the base beyond.
pub fn fastest_tempo(scene: &Scene) -> f64 {
    let factors = scene.mappings.iter().filter(|m| m.to == Target::Tempo);
    // Mappings onto one target add up (see `tick`); each gives a value within its range.
    let factor = factors
        .map(|m| m.range.0.max(m.range.1) as f64)
        .reduce(|a, b| a + b)
        .unwrap_or(1.0);
    (scene.tempo * factor).clamp(MIN_TEMPO, MAX_TEMPO)
}

/// Everything the control loop decides, once per tick.
#[derive(Clone, Debug, PartialEq)]
pub struct Controls {
    pub cond: Conditioning,
    pub tempo: f64,
    pub volume: f32,
    pub reverb: f32,
    pub velocity: f32,
    pub temperature: f32,
    /// Per instrument, Hz.
    pub cutoff: Vec<f32>,
    /// Per instrument, dB.
    pub gain_db: Vec<f32>,
    /// Per layer, 0..1 of its scene gain.
    pub layer_level: Vec<f32>,
}

/// The control loop's state: the last raw value of every input and one smoother per mapping.
pub struct ControlLoop {
    inputs: BTreeMap<InputName, f32>,
    mappings: Vec<MappingState>,
    base_tempo: f64,
    base_volume: f32,
    /// What `/roomscore/tempo` and `/roomscore/volume` set: they hold across scene changes,
    /// over each scene's own.
    operator_tempo: Option<f64>,
    operator_volume: Option<f32>,
    /// Extra gain for opening hours and shutdown fades, 0..1.
    pub hours_gain: f32,
    scene_name: String,
    defaults: Controls,
}

impl ControlLoop {
    pub fn new(scene: &Scene) -> Self {
        let g = &scene.generator;
        let defaults = Controls {
            cond: Conditioning {
                density: Some(g.density),
                register: Some(g.register),
                major: Some(match g.mode {
                    crate::music::Mode::Major => 1.0,
                    crate::music::Mode::Minor => 0.0,
                }),
                styles: vec![(g.style.clone(), 1.0)],
                tonic: Some(scene.tonic),
            },
            tempo: scene.tempo,
            volume: scene.master.volume,
            reverb: scene.master.reverb,
            velocity: g.velocity,
            temperature: g.temperature,
            cutoff: scene.instruments.iter().map(|i| i.cutoff).collect(),
            gain_db: scene.instruments.iter().map(|i| i.gain_db).collect(),
            layer_level: vec![1.0; scene.layers.len()],
        };
        let mut this = Self {
            inputs: BTreeMap::new(),
            mappings: scene
                .mappings
                .iter()
                .cloned()
                .map(MappingState::new)
                .collect(),
            base_tempo: scene.tempo,
            base_volume: scene.master.volume,
            operator_tempo: None,
            operator_volume: None,
            hours_gain: 1.0,
            scene_name: scene.name.clone(),
            defaults,
        };
        for m in &mut this.mappings {
            let x = this
                .inputs
                .get(&m.mapping.from)
                .copied()
                .unwrap_or_else(|| default_input(&m.mapping.from));
            m.reset(x);
        }
        this
    }

    /// Carries the room's inputs, and the tempo and volume the operator set (if any; otherwise
    /// the new scene's own play), over into a new scene.
    pub fn switch_scene(&mut self, scene: &Scene) {
        let inputs = std::mem::take(&mut self.inputs);
        let (tempo, volume) = (self.operator_tempo, self.operator_volume);
        let hours = self.hours_gain;
        *self = Self::new(scene);
        if let Some(bpm) = tempo {
            self.set_tempo(bpm);
        }
        if let Some(v) = volume {
            self.set_volume(v);
        }
        self.hours_gain = hours;
        for (k, v) in inputs {
            self.set_input(k, v);
        }
        for m in &mut self.mappings {
            let x = self
                .inputs
                .get(&m.mapping.from)
                .copied()
                .unwrap_or_else(|| default_input(&m.mapping.from));
            m.reset(x);
        }
    }

    pub fn scene_name(&self) -> &str {
        &self.scene_name
    }

    pub fn set_input(&mut self, name: InputName, value: f32) {
        if value.is_finite() {
            self.inputs.insert(name, value);
        }
    }

    pub fn input(&self, name: &InputName) -> Option<f32> {
        self.inputs.get(name).copied()
    }

    pub fn set_tempo(&mut self, bpm: f64) {
        if bpm.is_finite() {
            self.base_tempo = bpm.clamp(MIN_TEMPO, MAX_TEMPO);
            self.operator_tempo = Some(self.base_tempo);
        }
    }

    pub fn set_volume(&mut self, v: f32) {
        if v.is_finite() {
            self.base_volume = v.clamp(0.0, 1.0);
            self.operator_volume = Some(self.base_volume);
        }
    }

    /// A tempo that is the scene's to start from (a score's), not the operator's: it does not
    /// hold across scene changes.
    pub fn set_scene_tempo(&mut self, bpm: f64) {
        if bpm.is_finite() {
            self.base_tempo = bpm.clamp(MIN_TEMPO, MAX_TEMPO);
        }
    }

    /// Back to the scene's own tempo and volume; returns what the operator had set, for
    /// `restore_operator`.
    pub fn forget_operator(&mut self) -> (Option<f64>, Option<f32>) {
        (self.base_tempo, self.base_volume) = (self.defaults.tempo, self.defaults.volume);
        (self.operator_tempo.take(), self.operator_volume.take())
    }

    /// Sets again what `forget_operator` returned.
    pub fn restore_operator(&mut self, (tempo, volume): (Option<f64>, Option<f32>)) {
        if let Some(bpm) = tempo {
            self.set_tempo(bpm);
        }
        if let Some(v) = volume {
            self.set_volume(v);
        }
    }

    pub fn base_tempo(&self) -> f64 {
        self.base_tempo
    }

    pub fn base_volume(&self) -> f32 {
        self.base_volume
    }

    /// Advances every smoother by `dt` seconds and computes the controls.
    pub fn tick(&mut self, dt: f32) -> Controls {
        let mut c = self.defaults.clone();
        c.tempo = self.base_tempo;
        c.volume = self.base_volume;
        // Mappings onto one target add up; a target with no mapping keeps the scene's value.
        let mut sums: BTreeMap<TargetKey, f32> = BTreeMap::new();
        for m in &mut self.mappings {
            let x = self
                .inputs
                .get(&m.mapping.from)
                .copied()
                .unwrap_or_else(|| default_input(&m.mapping.from));
            let y = m.step(x, dt);
            *sums.entry(TargetKey::of(&m.mapping.to)).or_insert(0.0) += y;
        }
        let mut styles: Vec<(String, f32)> = Vec::new();
        for (key, y) in sums {
            match key {
                TargetKey::Density => c.cond.density = Some(y.clamp(0.0, 16.0)),
                TargetKey::Register => c.cond.register = Some(y.clamp(30.0, 96.0)),
                TargetKey::Mode => c.cond.major = Some(y.clamp(0.0, 1.0)),
                TargetKey::Tempo => {
                    c.tempo = (self.base_tempo * y as f64).clamp(MIN_TEMPO, MAX_TEMPO)
                }
                TargetKey::Volume => c.volume = (self.base_volume * y).clamp(0.0, 1.0),
                TargetKey::Reverb => c.reverb = y.clamp(0.0, 1.0),
                TargetKey::Velocity => c.velocity = y.clamp(0.0, 1.0),
                TargetKey::Temperature => c.temperature = y.clamp(0.05, 3.0),
                TargetKey::Style(name) => styles.push((name, y.clamp(0.0, 1.0))),
                TargetKey::Cutoff(i) => c.cutoff[i] = y.clamp(40.0, 20000.0),
                TargetKey::Gain(i) => c.gain_db[i] = y.clamp(-60.0, 12.0),
                TargetKey::Layer(i) => c.layer_level[i] = y.clamp(0.0, 1.0),
            }
        }
        if !styles.is_empty() {
            c.cond.styles = styles;
        }
        c.volume *= self.hours_gain;
        c
    }
}

/// The value an input has before anything has been heard from the room.
fn default_input(name: &InputName) -> f32 {
    match name {
        InputName::Valence => 0.0,
        other => other.default_range().0,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TargetKey {
    Density,
    Register,
    Mode,
    Tempo,
    Volume,
    Reverb,
    Velocity,
    Temperature,
    Style(String),
    Cutoff(usize),
    Gain(usize),
    Layer(usize),
}

impl TargetKey {
    fn of(t: &Target) -> Self {
        match t {
            Target::Density => Self::Density,
            Target::Register => Self::Register,
            Target::Mode => Self::Mode,
            Target::Tempo => Self::Tempo,
            Target::Volume => Self::Volume,
            Target::Reverb => Self::Reverb,
            Target::Velocity => Self::Velocity,
            Target::Temperature => Self::Temperature,
            Target::Style(s) => Self::Style(s.clone()),
            Target::Cutoff(i) => Self::Cutoff(*i),
            Target::Gain(i) => Self::Gain(*i),
            Target::Layer(i) => Self::Layer(*i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn scene() -> Scene {
        Scene::parse(
            r#"
[scene]
name = "t"
tempo = 100
[generator]
density = 2.0
[[instrument]]
name = "pad"
kind = "pad"
voices = ["soprano"]
[[mapping]]
from = "movement"
to = "density"
range = [1.0, 5.0]
smooth = 0.0
[[mapping]]
from = "presence"
to = "density"
range = [0.0, 2.0]
input_range = [0, 4]
smooth = 0.0
[[mapping]]
from = "valence"
to = "mode"
range = [0.0, 1.0]
smooth = 0.5
[[mapping]]
from = "in.door"
to = "tempo"
range = [1.0, 1.5]
smooth = 0.0
"#,
            Path::new("t.toml"),
        )
        .unwrap()
    }

    #[test]
    fn mappings_add_and_scale() {
        let mut c = ControlLoop::new(&scene());
        let ctl = c.tick(0.01);
        assert_eq!(ctl.cond.density, Some(1.0));
        c.set_input(InputName::Movement, 0.5);
        c.set_input(InputName::Presence, 2.0);
        let ctl = c.tick(0.01);
        assert!((ctl.cond.density.unwrap() - 4.0).abs() < 1e-5);
        c.set_input(InputName::Named("door".into()), 1.0);
        assert!((c.tick(0.01).tempo - 150.0).abs() < 1e-6);
        c.set_tempo(80.0);
        assert!((c.tick(0.01).tempo - 120.0).abs() < 1e-6);
    }

    #[test]
    fn smoothing_takes_time_and_nan_is_ignored() {
        let mut c = ControlLoop::new(&scene());
        // valence 0 is the middle of -1..1.
        assert_eq!(c.tick(0.01).cond.major, Some(0.5));
        c.set_input(InputName::Valence, -1.0);
        c.set_input(InputName::Valence, f32::NAN);
        assert_eq!(c.input(&InputName::Valence), Some(-1.0));
        let after = c.tick(0.05).cond.major.unwrap();
        let expected = 0.5 * (-0.1f32).exp();
        assert!(
            (after - expected).abs() < 1e-5,
            "0.05 s into a 0.5 s smoother: {after}"
        );
        let mut last = 1.0;
        for _ in 0..500 {
            last = c.tick(0.01).cond.major.unwrap();
        }
        assert!(last < 1e-4, "{last}");
    }

    #[test]
    fn the_fastest_tempo_is_where_the_mappings_take_the_base_at_their_top() {
        let sc = scene();
        let fastest = fastest_tempo(&sc);
        assert!((fastest - 150.0).abs() < 1e-9, "{fastest}");
        // The loop, with the mapped input at its top, plays that tempo.
        let mut c = ControlLoop::new(&sc);
        c.set_input(InputName::Named("door".into()), 1.0);
        assert!((c.tick(0.01).tempo - fastest).abs() < 1e-6);

        // Two mappings add up, an inverted range counts by its larger end, and the engine's
        // ceiling holds.
        let mut two = sc.clone();
        let mut slow_down = two.mappings.last().unwrap().clone();
        slow_down.range = (0.5, 0.25);
        two.mappings.push(slow_down);
        assert!((fastest_tempo(&two) - 200.0).abs() < 1e-9);
        two.tempo = 290.0;
        assert_eq!(fastest_tempo(&two), MAX_TEMPO);

        let mut none = sc;
        none.mappings.retain(|m| m.to != Target::Tempo);
        assert_eq!(fastest_tempo(&none), 100.0);
    }

    /// A scene brings its own tempo and volume, unless the operator set one over OSC: that one
    /// holds across scene changes, until a reload takes the file's.
    #[test]
    fn the_operators_tempo_and_volume_hold_across_scenes_and_nothing_else() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenes");
        let gallery = Scene::load(root.join("gallery.toml")).unwrap();
        let night = Scene::load(root.join("night.toml")).unwrap();
        assert!((gallery.master.volume - night.master.volume).abs() > 0.1);
        let mut c = ControlLoop::new(&gallery);
        c.switch_scene(&night);
        assert_eq!(c.base_volume(), night.master.volume);
        assert_eq!(c.base_tempo(), night.tempo);

        c.set_volume(0.3);
        c.set_tempo(150.0);
        c.switch_scene(&gallery);
        assert_eq!((c.base_volume(), c.base_tempo()), (0.3, 150.0));
        let operator = c.forget_operator();
        assert_eq!(c.base_volume(), gallery.master.volume);
        assert_eq!(c.base_tempo(), gallery.tempo);
        c.switch_scene(&night);
        assert_eq!(c.base_volume(), night.master.volume);
        // A reload that failed gives them back.
        c.restore_operator(operator);
        assert_eq!((c.base_volume(), c.base_tempo()), (0.3, 150.0));
        // A score's tempo is the scene's to start from, not the operator's.
        let mut c = ControlLoop::new(&gallery);
        c.set_scene_tempo(90.0);
        assert_eq!(c.base_tempo(), 90.0);
        c.switch_scene(&night);
        assert_eq!(c.base_tempo(), night.tempo);
    }
}
