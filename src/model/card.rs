//! The model card: the JSON file beside every `.onnx` model that says everything the engine needs
//! to know about it (vocabulary, voices and ranges, conditioning layout and normalisation, styles,
//! context length, ONNX names and shapes, architecture, the file's sha256). The engine reads
//! nothing about a model from anywhere else, so a retrained model with another vocabulary or
//! another conditioning layout runs without code changes as long as its card says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ModelError;

/// The conditioning attributes the engine knows how to fill.
#[derive(Clone, Debug, Deserialize)]
pub struct ScalarAttr {
    pub index: usize,
    pub known_flag_index: usize,
    /// Raw units that normalise to 0 and 1 (clipped).
    pub range: [f32; 2],
    /// The measurement window, in steps, centred on the step.
    pub window_steps: usize,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ModeAttr {
    pub index: usize,
    pub known_flag_index: usize,
    pub ks_major: [f64; 12],
    pub ks_minor: [f64; 12],
    pub window_steps: usize,
}

#[derive(Clone, Debug, Deserialize)]
pub struct StyleAttr {
    pub indices: Vec<usize>,
    pub order: Vec<String>,
}

/// The key's tonic, one-hot over the pitch classes (C first); absent from cards of models
/// trained without it.
#[derive(Clone, Debug, Deserialize)]
pub struct TonicAttr {
    pub indices: Vec<usize>,
    pub known_flag_index: usize,
}

/// The key as a pitch-class profile (C first): `m * major[(pc - tonic) % 12] + (1 - m) *
/// minor[..]` for mode value `m`, filled only when tonic and mode are both known. Absent from
/// cards of models trained without it.
#[derive(Clone, Debug, Deserialize)]
pub struct KeyAttr {
    pub indices: Vec<usize>,
    pub major: [f32; 12],
    pub minor: [f32; 12],
}

#[derive(Clone, Debug, Deserialize)]
pub struct CondLayout {
    pub dim: usize,
    pub names: Vec<String>,
    pub density: ScalarAttr,
    pub register: ScalarAttr,
    pub mode: ModeAttr,
    pub style: StyleAttr,
    #[serde(default)]
    pub tonic: Option<TonicAttr>,
    #[serde(default)]
    pub key: Option<KeyAttr>,
    /// The vector of the published evaluation protocol (everything unknown, style chorale).
    pub eval_vector: Vec<f32>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Vocabulary {
    pub size: usize,
    pub silence: i64,
    pub bos: i64,
    pub pitch_offset: i64,
    pub pitch_min: u8,
    pub pitch_max: u8,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Voices {
    pub names: Vec<String>,
    pub start_id: i64,
    pub n_ids: i64,
    #[serde(default)]
    pub ranges_seen_in_training_data_before_transposition:
        Option<BTreeMap<String, Option<[u8; 2]>>>,
    #[serde(default)]
    pub transposition_augmentation_semitones: Option<[i32; 2]>,
}

/// A dimension in the card's ONNX shapes: a number, or a symbol such as "T" or "P+T".
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Symbol(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) => f.write_str(s),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct Io {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<Dim>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Onnx {
    pub opset: i64,
    pub inputs: Vec<Io>,
    pub outputs: Vec<Io>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Architecture {
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    #[serde(default)]
    pub d_model: Option<usize>,
    #[serde(default)]
    pub params: Option<u64>,
}

/// A graph that mixes the network's readings of its input moved by several transpositions
/// (models/train/model.py `TransposeMix`). The engine needs only the cache's head count: the
/// shifts' caches are folded into the head axis, and the logits output is already the mixture.
#[derive(Clone, Debug, Deserialize)]
pub struct TransposeMix {
    pub shifts: Vec<i32>,
    pub cache_heads: usize,
}

/// The card format this engine reads: 3 is the graph that takes past_len (the cache slots in use)
/// and pos (the rotary position of the first new token) apart, with a cache buffer of any
/// capacity, and gives back only the new keys and values (2 had no pos: its positions were
/// past_len .., so a full cache had to slide into another buffer; `ring.py` upgrades it).
pub const FORMAT_VERSION: u32 = 3;

#[derive(Clone, Debug, Deserialize)]
pub struct Card {
    pub name: String,
    pub format_version: u32,
    pub file: String,
    pub sha256: String,
    pub vocabulary: Vocabulary,
    pub voices: Voices,
    pub styles: Vec<String>,
    pub conditioning: CondLayout,
    pub context_length: usize,
    pub max_positions: usize,
    /// How the keys were rotated: the engine turns them back when positions reach
    /// `max_positions`.
    #[serde(default)]
    pub rotary: Option<Rotary>,
    pub onnx: Onnx,
    pub architecture: Architecture,
    #[serde(default)]
    pub transposition_mix: Option<TransposeMix>,
    /// Kept whole for `roomscore model info` and for the measured figures.
    #[serde(skip)]
    pub raw: serde_json::Value,
    #[serde(skip)]
    pub path: PathBuf,
}

/// Rotary positions: key dims `i` and `i + head_dim/2` rotate together by `position * inv_freq[i]`,
/// `inv_freq[i] = base ^ (-i / (head_dim/2))`.
#[derive(Clone, Debug, Deserialize)]
pub struct Rotary {
    pub base: f64,
    pub pairs: String,
}

impl Rotary {
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f64> {
        let half = head_dim / 2;
        (0..half)
            .map(|i| self.base.powf(-(i as f64) / half as f64))
            .collect()
    }
}

/// The ONNX names by role; the names themselves come from the card. Inputs: tokens, voices, cond
/// ([B, T(, dim)]: B sequences of T tokens), past_len, pos, then one key and one value buffer per
/// layer, [B, heads, capacity, head_dim], whose first past_len slots are in use. Outputs:
/// logits, then the new tokens' keys and values per layer, [B, heads, T, head_dim], which the
/// caller writes into its buffers: a graph that gave the whole cache back copied it twice per
/// token.
#[derive(Clone, Debug)]
pub struct IoNames {
    pub tokens: String,
    pub voices: String,
    pub cond: String,
    pub past_len: String,
    pub pos: String,
    pub logits: String,
    /// One name per layer each.
    pub past_k: Vec<String>,
    pub past_v: Vec<String>,
    pub new_k: Vec<String>,
    pub new_v: Vec<String>,
}

/// Where a model's card lives: `X.json` beside `X.onnx`.
pub fn card_path_for(model: &Path) -> PathBuf {
    model.with_extension("json")
}

impl Card {
    /// Reads and validates the card at `path`.
    pub fn load(path: &Path) -> Result<Card, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Card::parse(&text, path)
    }

    /// Parses and validates card text; `path` names the card in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Card, ModelError> {
        let raw: serde_json::Value = serde_json::from_str(text).map_err(|e| ModelError::Card {
            path: path.to_path_buf(),
            field: "(json)".into(),
            message: e.to_string(),
        })?;
        // serde_path_to_error is not a dependency; deserialising through the Value and naming
        // serde's message is enough, since serde names the missing or mistyped field itself.
        let mut card: Card = serde_json::from_value(raw.clone()).map_err(|e| ModelError::Card {
            path: path.to_path_buf(),
            field: field_of(&e.to_string()),
            message: e.to_string(),
        })?;
        card.raw = raw;
        card.path = path.to_path_buf();
        card.validate()?;
        Ok(card)
    }

    fn bad(&self, field: &str, message: impl Into<String>) -> ModelError {
        ModelError::Card {
            path: self.path.clone(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn validate(&self) -> Result<(), ModelError> {
        if self.format_version != FORMAT_VERSION {
            return Err(self.bad(
                "format_version",
                format!(
                    "{} is not the version this engine reads ({FORMAT_VERSION}); \
                     models/train/export.py then models/train/ring.py write it",
                    self.format_version
                ),
            ));
        }
        if self.sha256.len() != 64 || !self.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(self.bad("sha256", "not 64 hex digits"));
        }
        let v = &self.vocabulary;
        if v.pitch_min > v.pitch_max || v.pitch_max > 127 {
            return Err(self.bad("vocabulary.pitch_min/pitch_max", "not a MIDI range"));
        }
        let span = (v.pitch_max - v.pitch_min) as i64 + 1;
        if v.pitch_offset < 0 || (v.pitch_offset + span) as usize != v.size {
            return Err(self.bad(
                "vocabulary.size",
                format!(
                    "{} != pitch_offset {} + {} pitches",
                    v.size, v.pitch_offset, span
                ),
            ));
        }
        for (name, id) in [("silence", v.silence), ("bos", v.bos)] {
            if id < 0 || id >= v.pitch_offset || (name == "bos" && id == v.silence) {
                return Err(self.bad(
                    &format!("vocabulary.{name}"),
                    format!("{id} collides with a pitch token or the other special token"),
                ));
            }
        }
        if self.voices.names.len() != crate::gen::VOICES {
            return Err(self.bad(
                "voices.names",
                format!(
                    "{} voices; the engine plays {}",
                    self.voices.names.len(),
                    crate::gen::VOICES
                ),
            ));
        }
        if self.voices.start_id < crate::gen::VOICES as i64
            || self.voices.start_id >= self.voices.n_ids
        {
            return Err(self.bad(
                "voices.start_id",
                "must be a voice id after the four voices",
            ));
        }
        let c = &self.conditioning;
        if c.names.len() != c.dim {
            return Err(self.bad(
                "conditioning.names",
                format!("{} names for dim {}", c.names.len(), c.dim),
            ));
        }
        if c.eval_vector.len() != c.dim {
            return Err(self.bad(
                "conditioning.eval_vector",
                format!("length {} != dim {}", c.eval_vector.len(), c.dim),
            ));
        }
        for (name, a) in [("density", &c.density), ("register", &c.register)] {
            if a.index >= c.dim || a.known_flag_index >= c.dim {
                return Err(self.bad(&format!("conditioning.{name}.index"), "outside the vector"));
            }
            if !a.range.iter().all(|x| x.is_finite()) || a.range[1] <= a.range[0] {
                return Err(self.bad(&format!("conditioning.{name}.range"), "empty range"));
            }
            if a.window_steps == 0 {
                return Err(self.bad(&format!("conditioning.{name}.window_steps"), "zero"));
            }
        }
        if c.mode.index >= c.dim || c.mode.known_flag_index >= c.dim {
            return Err(self.bad("conditioning.mode.index", "outside the vector"));
        }
        if c.style.indices.len() != c.style.order.len()
            || c.style.indices.iter().any(|&i| i >= c.dim)
        {
            return Err(self.bad(
                "conditioning.style",
                "indices and order disagree or point outside the vector",
            ));
        }
        if let Some(t) = &c.tonic {
            if t.indices.len() != 12
                || t.indices
                    .iter()
                    .chain([&t.known_flag_index])
                    .any(|&i| i >= c.dim)
            {
                return Err(self.bad(
                    "conditioning.tonic",
                    "needs 12 indices (C to B) and a known flag, all inside the vector",
                ));
            }
        }
        if let Some(k) = &c.key {
            if c.tonic.is_none() || k.indices.len() != 12 || k.indices.iter().any(|&i| i >= c.dim) {
                return Err(self.bad(
                    "conditioning.key",
                    "needs a tonic section and 12 indices (C to B) inside the vector",
                ));
            }
            if !k.major.iter().chain(&k.minor).all(|x| x.is_finite()) {
                return Err(self.bad("conditioning.key", "a profile value is not a number"));
            }
        }
        if c.style.order != self.styles {
            return Err(self.bad("conditioning.style.order", "differs from styles"));
        }
        let Some(r) = &self.rotary else {
            return Err(self.bad(
                "rotary",
                "missing: the engine turns cached keys back by it when positions reach max_positions",
            ));
        };
        {
            if r.pairs != "halves" || !(r.base.is_finite() && r.base > 1.0) {
                return Err(self.bad(
                    "rotary",
                    format!(
                        "pairs {:?}, base {}: the engine knows pairs = \"halves\" with a base above 1",
                        r.pairs, r.base
                    ),
                ));
            }
            if !self.architecture.head_dim.is_multiple_of(2) {
                return Err(self.bad(
                    "architecture.head_dim",
                    "rotary pairs need an even head_dim",
                ));
            }
        }
        if self.context_length < 8 || self.context_length > self.max_positions {
            return Err(self.bad(
                "context_length",
                format!(
                    "{} (max_positions {})",
                    self.context_length, self.max_positions
                ),
            ));
        }
        let a = &self.architecture;
        if a.layers == 0 || a.heads == 0 || a.head_dim == 0 {
            return Err(self.bad(
                "architecture",
                "layers, heads and head_dim must be positive",
            ));
        }
        let (ins, outs) = (self.onnx.inputs.len(), self.onnx.outputs.len());
        if ins != 5 + 2 * a.layers || outs != 1 + 2 * a.layers {
            return Err(self.bad(
                "onnx.inputs/outputs",
                format!(
                    "{ins} inputs and {outs} outputs: expected tokens, voices, cond, past_len, pos \
                     and a key and a value per layer in ({} more), logits and the new keys and \
                     values out",
                    2 * a.layers
                ),
            ));
        }
        if let Some(m) = &self.transposition_mix {
            if m.shifts.is_empty() || m.cache_heads != a.heads * m.shifts.len() {
                return Err(self.bad(
                    "transposition_mix.cache_heads",
                    format!(
                        "{} for {} shifts of {} heads: expected heads x shifts",
                        m.cache_heads,
                        m.shifts.len(),
                        a.heads
                    ),
                ));
            }
        }
        let heads = self.cache_heads();
        // B: sequences per pass (1, or guidance's 2), T: tokens per pass.
        let b = || Dim::Symbol("B".into());
        let cache = |len: &str| {
            vec![
                b(),
                Dim::Fixed(heads as i64),
                Dim::Symbol(len.into()),
                Dim::Fixed(a.head_dim as i64),
            ]
        };
        let t = || Dim::Symbol("T".into());
        let mut expect: Vec<(&Io, &str, Vec<Dim>, String)> = Vec::new();
        for (list, first, side, len) in [
            (&self.onnx.inputs, 5, "inputs", "capacity"),
            (&self.onnx.outputs, 1, "outputs", "T"),
        ] {
            for (k, io) in list.iter().enumerate().skip(first) {
                let field = format!("onnx.{side}[{k}] (cache)");
                expect.push((io, "float32", cache(len), field));
            }
        }
        let fixed: [(&Io, &str, Vec<Dim>, &str); 6] = [
            (
                &self.onnx.inputs[0],
                "int64",
                vec![b(), t()],
                "onnx.inputs[0] (tokens)",
            ),
            (
                &self.onnx.inputs[1],
                "int64",
                vec![b(), t()],
                "onnx.inputs[1] (voices)",
            ),
            (
                &self.onnx.inputs[2],
                "float32",
                vec![b(), t(), Dim::Fixed(c.dim as i64)],
                "onnx.inputs[2] (cond)",
            ),
            (
                &self.onnx.inputs[3],
                "int64",
                vec![Dim::Fixed(1)],
                "onnx.inputs[3] (past_len)",
            ),
            (
                &self.onnx.inputs[4],
                "int64",
                vec![Dim::Fixed(1)],
                "onnx.inputs[4] (pos)",
            ),
            (
                &self.onnx.outputs[0],
                "float32",
                vec![b(), t(), Dim::Fixed(v.size as i64)],
                "onnx.outputs[0] (logits)",
            ),
        ];
        let fixed = fixed
            .into_iter()
            .map(|(io, d, s, f)| (io, d, s, f.to_string()));
        for (io, dtype, shape, field) in fixed.chain(expect) {
            let field = field.as_str();
            if io.dtype != dtype {
                return Err(self.bad(
                    field,
                    format!("{} has dtype {}, expected {dtype}", io.name, io.dtype),
                ));
            }
            // Symbols are names only; fixed sizes must agree with the rest of the card.
            let agrees = io.shape.len() == shape.len()
                && io.shape.iter().zip(&shape).all(|(a, b)| match (a, b) {
                    (Dim::Fixed(x), Dim::Fixed(y)) => x == y,
                    (Dim::Symbol(_), Dim::Symbol(_)) => true,
                    _ => false,
                });
            if !agrees {
                return Err(self.bad(
                    field,
                    format!("{} has shape {:?}, expected {:?}", io.name, io.shape, shape),
                ));
            }
        }
        Ok(())
    }

    pub fn io_names(&self) -> IoNames {
        let i = |k: usize| self.onnx.inputs[k].name.clone();
        // validate() has held the counts to 5 + 2n inputs and 1 + 2n outputs.
        let n = self.architecture.layers;
        let names = |list: &[Io]| list.iter().map(|io| io.name.clone()).collect::<Vec<_>>();
        let (past, new) = (
            names(&self.onnx.inputs[5..]),
            names(&self.onnx.outputs[1..]),
        );
        IoNames {
            tokens: i(0),
            voices: i(1),
            cond: i(2),
            past_len: i(3),
            pos: i(4),
            logits: self.onnx.outputs[0].name.clone(),
            past_k: past[..n].to_vec(),
            past_v: past[n..].to_vec(),
            new_k: new[..n].to_vec(),
            new_v: new[n..].to_vec(),
        }
    }

    /// Heads per sequence in the cache buffers: the network's, times the shifts of a
    /// transposition mixture.
    pub fn cache_heads(&self) -> usize {
        self.transposition_mix
            .as_ref()
            .map_or(self.architecture.heads, |m| m.cache_heads)
    }

    /// The model file the card describes (its `file`, beside the card).
    pub fn model_path(&self) -> PathBuf {
        self.path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(&self.file)
    }

    pub fn pitch_token(&self, pitch: u8) -> Option<i64> {
        let v = &self.vocabulary;
        (v.pitch_min..=v.pitch_max)
            .contains(&pitch)
            .then(|| v.pitch_offset + (pitch - v.pitch_min) as i64)
    }

    pub fn token_pitch(&self, token: i64) -> Option<u8> {
        let v = &self.vocabulary;
        let p = token - v.pitch_offset + v.pitch_min as i64;
        (token >= v.pitch_offset && p <= v.pitch_max as i64).then_some(p as u8)
    }

    pub fn token_of(&self, t: crate::gen::Token) -> Result<i64, ModelError> {
        match t {
            None => Ok(self.vocabulary.silence),
            Some(p) => self.pitch_token(p).ok_or_else(|| {
                self.bad(
                    "vocabulary",
                    format!("pitch {p} is outside the model's range"),
                )
            }),
        }
    }

    /// The range a voice may sing in: the engine's voice range, inside the pitches the model saw
    /// in training (widened by its transposition augmentation) and inside its vocabulary.
    pub fn voice_range(&self, voice: usize) -> (u8, u8) {
        let (mut lo, mut hi) = crate::gen::rules::VOICE_RANGES[voice];
        let v = &self.vocabulary;
        lo = lo.max(v.pitch_min);
        hi = hi.min(v.pitch_max);
        let seen = self
            .voices
            .ranges_seen_in_training_data_before_transposition
            .as_ref()
            .and_then(|m| m.get(&self.voices.names[voice]).copied().flatten());
        if let Some([slo, shi]) = seen {
            let [down, up] = self
                .voices
                .transposition_augmentation_semitones
                .unwrap_or([0, 0]);
            let slo = (slo as i32 + down.min(0)).clamp(0, 127) as u8;
            let shi = (shi as i32 + up.max(0)).clamp(0, 127) as u8;
            // Only narrow when the two overlap; a card whose training ranges miss the engine's
            // range entirely still gets the engine's range rather than nothing.
            if slo.max(lo) <= shi.min(hi) {
                lo = lo.max(slo);
                hi = hi.min(shi);
            }
        }
        (lo, hi)
    }

    /// One of the measured figures, when the card has it (`evaluation.figures.<key>`).
    pub fn figure(&self, key: &str) -> Option<f64> {
        self.raw
            .get("evaluation")?
            .get("figures")?
            .get(key)?
            .as_f64()
    }
}

/// Pulls the field name out of a serde message such as "missing field `x`".
fn field_of(message: &str) -> String {
    message
        .split('`')
        .nth(1)
        .map(str::to_string)
        .unwrap_or_else(|| "(structure)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn shipped() -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/roomscore-satb.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn parse(v: &Value) -> Result<Card, ModelError> {
        Card::parse(&v.to_string(), Path::new("models/x.json"))
    }

    #[test]
    fn the_cache_comes_a_key_and_a_value_per_layer() {
        let card = parse(&shipped()).unwrap();
        let names = card.io_names();
        let layers = card.architecture.layers;
        assert_eq!(names.past_len, "past_len");
        assert_eq!(names.pos, "pos");
        assert_eq!(names.past_k.len(), layers);
        assert_eq!(names.new_v.len(), layers);
        assert_eq!(names.past_v[0], "past_v_0");
        assert_eq!(names.new_k[layers - 1], format!("new_k_{}", layers - 1));
    }

    #[test]
    fn a_card_of_another_format_is_named() {
        let mut v = shipped();
        v["format_version"] = json!(1);
        let err = parse(&v).unwrap_err().to_string();
        assert!(err.contains("format_version"), "{err}");
        assert!(err.contains("export.py"), "{err}");
    }

    #[test]
    fn a_missing_cache_tensor_is_named() {
        let mut v = shipped();
        let inputs = v["onnx"]["inputs"].as_array_mut().unwrap();
        inputs.pop();
        let left = inputs.len();
        let err = parse(&v).unwrap_err().to_string();
        assert!(err.contains("onnx.inputs/outputs"), "{err}");
        assert!(err.contains(&format!("{left} inputs")), "{err}");

        let mut v = shipped();
        v["onnx"]["outputs"][3]["shape"][1] = json!(8);
        let err = parse(&v).unwrap_err().to_string();
        assert!(err.contains("onnx.outputs[3] (cache)"), "{err}");
    }

    #[test]
    fn a_mixture_reads_its_cache_heads_and_a_wrong_count_is_named() {
        let mut v = shipped();
        let heads = v["architecture"]["heads"].as_u64().unwrap() as usize;
        let cache = |v: &mut Value, n: usize| {
            for side in ["inputs", "outputs"] {
                let list = v["onnx"][side].as_array_mut().unwrap();
                let first = if side == "inputs" { 5 } else { 1 };
                for io in list.iter_mut().skip(first) {
                    io["shape"][1] = json!(n);
                }
            }
        };
        cache(&mut v, 3 * heads);
        // The graph's cache has three times the heads: without the mixture that is a mismatch.
        let err = parse(&v).unwrap_err().to_string();
        assert!(err.contains("(cache)"), "{err}");

        v["transposition_mix"] = json!({"shifts": [-1, 0, 1], "cache_heads": 3 * heads});
        assert_eq!(parse(&v).unwrap().cache_heads(), 3 * heads);

        v["transposition_mix"]["cache_heads"] = json!(2 * heads);
        let err = parse(&v).unwrap_err().to_string();
        assert!(err.contains("transposition_mix.cache_heads"), "{err}");
        assert!(err.contains("3 shifts"), "{err}");
    }

    #[test]
    fn a_key_profile_outside_the_vector_or_without_a_tonic_is_named() {
        let profile = json!([1.0, 0.0, 0.3, 0.0, 0.5, 0.4, 0.1, 0.7, 0.0, 0.3, 0.0, 0.2]);
        let with_key = |first: usize| {
            let mut v = shipped();
            let indices: Vec<usize> = (first..first + 12).collect();
            v["conditioning"]["key"] =
                json!({"indices": indices, "major": profile, "minor": profile});
            v
        };
        assert!(parse(&with_key(0)).unwrap().conditioning.key.is_some());

        let dim = shipped()["conditioning"]["dim"].as_u64().unwrap() as usize;
        let err = parse(&with_key(dim - 6)).unwrap_err().to_string();
        assert!(err.contains("conditioning.key"), "{err}");

        let mut v = with_key(0);
        v["conditioning"].as_object_mut().unwrap().remove("tonic");
        let err = parse(&v).unwrap_err().to_string();
        assert!(err.contains("conditioning.key"), "{err}");
    }
}
