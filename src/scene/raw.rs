//! The scene file as written: plain serde structs that mirror the TOML, with unknown keys
//! rejected. Nothing here is trusted; `validate` turns it into a `Scene`.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScene {
    pub scene: RawMeta,
    #[serde(default)]
    pub generator: RawGenerator,
    #[serde(default, rename = "instrument")]
    pub instruments: Vec<RawInstrument>,
    #[serde(default, rename = "mapping")]
    pub mappings: Vec<RawMapping>,
    #[serde(default, rename = "layer")]
    pub layers: Vec<RawLayer>,
    #[serde(default)]
    pub master: RawMaster,
    #[serde(default)]
    pub hours: Option<RawHours>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMeta {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_tempo")]
    pub tempo: f64,
    #[serde(default = "default_key")]
    pub key: String,
}

fn default_tempo() -> f64 {
    72.0
}
fn default_key() -> String {
    "C".into()
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawGenerator {
    pub source: Option<String>,
    pub model: Option<String>,
    pub density: Option<f32>,
    pub register: Option<f32>,
    pub mode: Option<String>,
    pub style: Option<String>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub lookahead: Option<f64>,
    pub scale_lock: Option<bool>,
    pub max_hold_beats: Option<f32>,
    pub guidance: Option<f32>,
    pub velocity: Option<f32>,
    pub seed: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInstrument {
    pub name: String,
    pub kind: String,
    #[serde(default)]
    pub voices: Vec<String>,
    pub polyphony: Option<i64>,
    pub gain_db: Option<f32>,
    pub attack: Option<f32>,
    pub decay: Option<f32>,
    pub sustain: Option<f32>,
    pub release: Option<f32>,
    pub cutoff: Option<f32>,
    pub octave: Option<i64>,
    pub pan: Option<f32>,
    pub spread: Option<f32>,
    pub performer: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMapping {
    pub from: String,
    pub to: String,
    pub range: Option<[f32; 2]>,
    pub input_range: Option<[f32; 2]>,
    pub curve: Option<String>,
    pub smooth: Option<f32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLayer {
    pub name: String,
    pub file: String,
    pub gain_db: Option<f32>,
    #[serde(rename = "loop")]
    pub looped: Option<bool>,
    pub fade: Option<f32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMaster {
    pub volume: Option<f32>,
    pub reverb: Option<f32>,
    pub room: Option<f32>,
    pub reverb_time: Option<f32>,
    pub ceiling_db: Option<f32>,
    pub limiter_lookahead_ms: Option<f32>,
    pub performer_hold: Option<f32>,
    pub polyphony: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHours {
    pub open: String,
    pub close: String,
    pub outside: Option<String>,
    pub fade: Option<f32>,
}
