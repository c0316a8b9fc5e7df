//! Scenes: what plays, how the room steers it, and how loud. A scene file (TOML) is parsed into
//! `raw` structs, then validated into a `Scene`; nothing downstream sees unvalidated values.

mod error;
pub mod locate;
mod raw;
mod validate;

use std::path::{Path, PathBuf};

pub use error::{Problem, SceneError};

use crate::music::Mode;

/// The four voices of the model contract, in raster order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Voice {
    Soprano = 0,
    Alto = 1,
    Tenor = 2,
    Bass = 3,
}

impl Voice {
    pub const ALL: [Voice; 4] = [Voice::Soprano, Voice::Alto, Voice::Tenor, Voice::Bass];

    pub fn parse(s: &str) -> Option<Voice> {
        match s {
            "soprano" | "s" => Some(Voice::Soprano),
            "alto" | "a" => Some(Voice::Alto),
            "tenor" | "t" => Some(Voice::Tenor),
            "bass" | "b" => Some(Voice::Bass),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        ["soprano", "alto", "tenor", "bass"][self as usize]
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// The rule-based walk: always available, the fallback for the model.
    Rules,
    /// The trained ONNX model, falling back to rules when it cannot run.
    Model,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GeneratorSettings {
    pub source: SourceKind,
    pub model: Option<PathBuf>,
    /// Base conditioning when no mapping targets it: onsets per beat over all voices.
    pub density: f32,
    /// Base mean pitch (MIDI).
    pub register: f32,
    pub mode: Mode,
    pub style: String,
    pub temperature: f32,
    pub top_p: f32,
    /// How far ahead of the playhead notes are committed to the audio thread, in beats.
    pub lookahead: f64,
    /// Keep generated pitches inside the scene's key.
    pub scale_lock: bool,
    /// The model may not hold a note or a rest in one voice longer than this (0 = no limit):
    /// sampled holds feed on themselves, and a still room would get one chord for minutes.
    pub max_hold_beats: f32,
    /// Classifier-free guidance weight for the model (1 = off). Above 1 the room's asks are
    /// heard more clearly, at the cost of an unconditional sequence decoded beside the
    /// conditioned one (about 1.6 times the step under ONNX Runtime, twice under tract).
    pub guidance: f32,
    pub velocity: f32,
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstrumentKind {
    Pad,
    Pluck,
    Bell,
    Bass,
}

impl InstrumentKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pad" => Some(Self::Pad),
            "pluck" => Some(Self::Pluck),
            "bell" => Some(Self::Bell),
            "bass" => Some(Self::Bass),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Instrument {
    pub name: String,
    pub kind: InstrumentKind,
    pub voices: Vec<Voice>,
    pub polyphony: usize,
    pub gain_db: f32,
    pub attack: f32,
    pub decay: f32,
    pub sustain: f32,
    pub release: f32,
    pub cutoff: f32,
    pub octave: i8,
    pub pan: f32,
    pub spread: f32,
    pub performer: bool,
}

/// A room input a mapping reads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InputName {
    Movement,
    Valence,
    Arousal,
    Presence,
    /// `/roomscore/in/<name>`
    Named(String),
}

impl InputName {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "movement" => Some(Self::Movement),
            "valence" => Some(Self::Valence),
            "arousal" => Some(Self::Arousal),
            "presence" => Some(Self::Presence),
            _ => {
                let name = s.strip_prefix("in.")?;
                valid_name(name).then(|| Self::Named(name.to_string()))
            }
        }
    }

    /// The range a raw value of this input is expected in, when the mapping does not say.
    pub fn default_range(&self) -> (f32, f32) {
        match self {
            Self::Valence => (-1.0, 1.0),
            Self::Presence => (0.0, 10.0),
            _ => (0.0, 1.0),
        }
    }
}

pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// What a mapping drives.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Density,
    Register,
    /// Major weight, 0 = minor, 1 = major.
    Mode,
    /// A factor on the base tempo.
    Tempo,
    /// A factor on the master volume.
    Volume,
    Reverb,
    Velocity,
    Temperature,
    Style(String),
    Cutoff(usize),
    Gain(usize),
    Layer(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Curve {
    Linear,
    Square,
    Sqrt,
    Smoothstep,
    Step,
}

impl Curve {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "linear" => Some(Self::Linear),
            "square" | "exp" => Some(Self::Square),
            "sqrt" | "log" => Some(Self::Sqrt),
            "smoothstep" | "smooth" => Some(Self::Smoothstep),
            "step" => Some(Self::Step),
            _ => None,
        }
    }

    /// Shapes x in [0, 1].
    pub fn apply(self, x: f32) -> f32 {
        let x = x.clamp(0.0, 1.0);
        match self {
            Self::Linear => x,
            Self::Square => x * x,
            Self::Sqrt => x.sqrt(),
            Self::Smoothstep => x * x * (3.0 - 2.0 * x),
            Self::Step => {
                if x >= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Mapping {
    pub from: InputName,
    pub to: Target,
    pub range: (f32, f32),
    pub input_range: (f32, f32),
    pub curve: Curve,
    /// One-pole time constant in seconds; 0 follows the input at once.
    pub smooth: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    pub name: String,
    pub file: PathBuf,
    pub gain_db: f32,
    pub looped: bool,
    pub fade: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Master {
    pub volume: f32,
    pub reverb: f32,
    pub room: f32,
    pub reverb_time: f32,
    pub ceiling_db: f32,
    /// Seconds the master limiter looks ahead; every performer note waits this long (0 = one
    /// sample, with an instant attack).
    pub limiter_lookahead: f32,
    /// A performer's note with no note-off is released after this many seconds.
    pub performer_hold: f32,
}

/// What the scene does outside its opening hours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outside {
    /// Volume down to nothing, engine keeps running.
    Silent,
    /// Volume down to a quarter.
    Quiet,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hours {
    /// Minutes after local midnight.
    pub open: u32,
    pub close: u32,
    pub outside: Outside,
    /// Seconds the fade takes at closing and at opening.
    pub fade: f32,
}

impl Hours {
    /// Whether `minute` (after midnight) is inside the opening hours; handles hours past midnight.
    pub fn is_open(&self, minute: u32) -> bool {
        if self.open <= self.close {
            (self.open..self.close).contains(&minute)
        } else {
            minute >= self.open || minute < self.close
        }
    }

    /// The volume factor for `minute`: 1 inside the hours, 0 or a quarter outside.
    pub fn gain_at(&self, minute: u32) -> f32 {
        match (self.is_open(minute), self.outside) {
            (true, _) => 1.0,
            (false, Outside::Silent) => 0.0,
            (false, Outside::Quiet) => 0.25,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub name: String,
    pub description: String,
    pub tempo: f64,
    pub tonic: u8,
    pub generator: GeneratorSettings,
    pub instruments: Vec<Instrument>,
    pub mappings: Vec<Mapping>,
    pub layers: Vec<Layer>,
    pub master: Master,
    pub hours: Option<Hours>,
    pub path: PathBuf,
}

impl Scene {
    pub fn load(path: impl AsRef<Path>) -> Result<Scene, SceneError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| SceneError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates scene text; `path` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Scene, SceneError> {
        validate::parse(text, path)
    }

    pub fn instrument_index(&self, name: &str) -> Option<usize> {
        self.instruments.iter().position(|i| i.name == name)
    }

    /// The instrument that `/roomscore/note` plays.
    pub fn performer_index(&self) -> usize {
        self.instruments
            .iter()
            .position(|i| i.performer)
            .unwrap_or(0)
    }
}

/// Where the scene named `name` lives: a path as given, else `scenes/<name>.toml`.
pub fn resolve(name: &str, scenes_dir: &Path) -> PathBuf {
    let p = Path::new(name);
    if p.extension().is_some() || p.components().count() > 1 {
        p.to_path_buf()
    } else {
        scenes_dir.join(format!("{name}.toml"))
    }
}
