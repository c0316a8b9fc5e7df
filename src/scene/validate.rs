//! Raw TOML in, validated `Scene` out. Every check records the field's path so the error can be
//! located in the file; all problems are reported at once, not just the first.

use std::path::{Path, PathBuf};

use super::locate::{key, line_col, path_to_string, span_of, Seg};
use super::raw::{RawInstrument, RawLayer, RawMapping, RawScene};
use super::*;
use crate::music::parse_tonic;

struct Checker<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn fail(&mut self, path: &[Seg], message: impl Into<String>) {
        let (line, column) = match span_of(self.text, path) {
            Some(span) => {
                let (l, c) = line_col(self.text, span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        self.problems.push(Problem {
            field: path_to_string(path),
            message: message.into(),
            line,
            column,
        });
    }

    /// Checks `value` is finite and in `[lo, hi]`, returning it (or `lo` after recording).
    fn range<T>(&mut self, path: &[Seg], value: T, lo: T, hi: T) -> T
    where
        T: PartialOrd + Copy + std::fmt::Display + Finite,
    {
        if !value.finite() || value < lo || value > hi {
            self.fail(
                path,
                format!("value {value} is out of range (expected {lo} to {hi})"),
            );
            lo
        } else {
            value
        }
    }
}

trait Finite {
    fn finite(&self) -> bool;
}
impl Finite for f32 {
    fn finite(&self) -> bool {
        self.is_finite()
    }
}
impl Finite for f64 {
    fn finite(&self) -> bool {
        self.is_finite()
    }
}
impl Finite for i64 {
    fn finite(&self) -> bool {
        true
    }
}

fn p(parts: &[Seg]) -> Vec<Seg> {
    parts.to_vec()
}

pub(super) fn parse(text: &str, path: &Path) -> Result<Scene, SceneError> {
    let raw: RawScene = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let (line, column) = match e.span() {
                Some(span) => {
                    let (l, c) = line_col(text, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            return Err(SceneError::Invalid {
                path: path.to_path_buf(),
                problems: vec![Problem {
                    field: String::new(),
                    message: e.message().trim().to_string(),
                    line,
                    column,
                }],
            });
        }
    };
    let base_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut c = Checker {
        text,
        problems: Vec::new(),
    };
    let scene = build(&mut c, raw, path, &base_dir);
    if c.problems.is_empty() {
        Ok(scene)
    } else {
        Err(SceneError::Invalid {
            path: path.to_path_buf(),
            problems: c.problems,
        })
    }
}

fn build(c: &mut Checker, raw: RawScene, path: &Path, base_dir: &Path) -> Scene {
    let meta = &raw.scene;
    if !valid_name(&meta.name) {
        c.fail(
            &[key("scene"), key("name")],
            format!(
                "name {:?} must be 1-64 letters, digits, '_' or '-'",
                meta.name
            ),
        );
    }
    let tempo = c.range(
        &[key("scene"), key("tempo")],
        meta.tempo,
        crate::control::MIN_TEMPO,
        crate::control::MAX_TEMPO,
    );
    let tonic = parse_tonic(&meta.key).unwrap_or_else(|| {
        c.fail(
            &[key("scene"), key("key")],
            format!(
                "key {:?} is not a tonic such as \"C\", \"F#\" or \"Bb\"",
                meta.key
            ),
        );
        0
    });

    let g = &raw.generator;
    let gp = |f: &str| p(&[key("generator"), key(f)]);
    let source = match g.source.as_deref() {
        None | Some("rules") => SourceKind::Rules,
        Some("model") => SourceKind::Model,
        Some(other) => {
            c.fail(
                &gp("source"),
                format!("source {other:?} is not \"rules\" or \"model\""),
            );
            SourceKind::Rules
        }
    };
    let model = match (&g.model, source) {
        (Some(m), _) => Some(base_dir.join(m)),
        (None, SourceKind::Model) => Some(crate::model::default_model_beside(base_dir)),
        (None, SourceKind::Rules) => None,
    };
    let mode = match g.mode.as_deref() {
        None | Some("major") => Mode::Major,
        Some("minor") => Mode::Minor,
        Some(other) => {
            c.fail(
                &gp("mode"),
                format!("mode {other:?} is not \"major\" or \"minor\""),
            );
            Mode::Major
        }
    };
    let style = g.style.clone().unwrap_or_else(|| "chorale".into());
    if !valid_name(&style) {
        c.fail(&gp("style"), format!("style {style:?} is not a valid name"));
    }
    let generator = GeneratorSettings {
        source,
        model,
        density: c.range(&gp("density"), g.density.unwrap_or(3.0), 0.0, 16.0),
        register: c.range(&gp("register"), g.register.unwrap_or(62.0), 30.0, 96.0),
        mode,
        style,
        temperature: c.range(&gp("temperature"), g.temperature.unwrap_or(0.9), 0.05, 3.0),
        top_p: c.range(&gp("top_p"), g.top_p.unwrap_or(0.95), 0.05, 1.0),
        lookahead: c.range(&gp("lookahead"), g.lookahead.unwrap_or(0.5), 0.05, 8.0),
        scale_lock: g.scale_lock.unwrap_or(true),
        max_hold_beats: c.range(
            &gp("max_hold_beats"),
            g.max_hold_beats.unwrap_or(0.0),
            0.0,
            64.0,
        ),
        guidance: c.range(&gp("guidance"), g.guidance.unwrap_or(1.0), 0.0, 8.0),
        velocity: c.range(&gp("velocity"), g.velocity.unwrap_or(0.7), 0.0, 1.0),
        seed: g.seed.unwrap_or(1),
    };

    let mut instruments = Vec::new();
    if raw.instruments.is_empty() {
        c.fail(
            &[key("instrument")],
            "a scene needs at least one [[instrument]]",
        );
    }
    for (i, ri) in raw.instruments.iter().enumerate() {
        instruments.push(instrument(c, i, ri));
    }
    for (i, inst) in instruments.iter().enumerate() {
        if instruments[..i].iter().any(|o| o.name == inst.name) {
            c.fail(
                &[key("instrument"), Seg::Index(i), key("name")],
                format!("instrument name {:?} is used twice", inst.name),
            );
        }
    }
    if instruments.iter().filter(|i| i.performer).count() > 1 {
        c.fail(
            &[key("instrument")],
            "only one instrument may be the performer",
        );
    }

    let mut layers = Vec::new();
    for (i, rl) in raw.layers.iter().enumerate() {
        layers.push(layer(c, i, rl, base_dir));
    }

    let mut mappings = Vec::new();
    for (i, rm) in raw.mappings.iter().enumerate() {
        if let Some(m) = mapping(c, i, rm, &instruments, &layers) {
            mappings.push(m);
        }
    }

    let m = &raw.master;
    let mp = |f: &str| p(&[key("master"), key(f)]);
    if m.polyphony.is_some() {
        c.fail(
            &mp("polyphony"),
            "polyphony is set per instrument ([[instrument]] polyphony)",
        );
    }
    let master = Master {
        volume: c.range(&mp("volume"), m.volume.unwrap_or(0.8), 0.0, 1.0),
        reverb: c.range(&mp("reverb"), m.reverb.unwrap_or(0.25), 0.0, 1.0),
        room: c.range(&mp("room"), m.room.unwrap_or(20.0), 5.0, 100.0),
        reverb_time: c.range(&mp("reverb_time"), m.reverb_time.unwrap_or(3.0), 0.1, 30.0),
        ceiling_db: c.range(&mp("ceiling_db"), m.ceiling_db.unwrap_or(-1.0), -24.0, 0.0),
        limiter_lookahead: c.range(
            &mp("limiter_lookahead_ms"),
            m.limiter_lookahead_ms.unwrap_or(0.25),
            0.0,
            5.0,
        ) / 1000.0,
        performer_hold: c.range(
            &mp("performer_hold"),
            m.performer_hold.unwrap_or(4.0),
            0.05,
            60.0,
        ),
    };

    let hours = raw.hours.as_ref().map(|h| {
        let hp = |f: &str| p(&[key("hours"), key(f)]);
        let mut clock = |f: &str, s: &str| {
            parse_clock(s).unwrap_or_else(|| {
                c.fail(&hp(f), format!("time {s:?} is not HH:MM (24-hour)"));
                0
            })
        };
        let open = clock("open", &h.open);
        let close = clock("close", &h.close);
        let outside = match h.outside.as_deref() {
            None | Some("silent") => Outside::Silent,
            Some("quiet") => Outside::Quiet,
            Some(other) => {
                c.fail(
                    &hp("outside"),
                    format!("outside {other:?} is not \"silent\" or \"quiet\""),
                );
                Outside::Silent
            }
        };
        Hours {
            open,
            close,
            outside,
            fade: c.range(&hp("fade"), h.fade.unwrap_or(10.0), 0.1, 600.0),
        }
    });

    Scene {
        name: meta.name.clone(),
        description: meta.description.clone(),
        tempo,
        tonic,
        generator,
        instruments,
        mappings,
        layers,
        master,
        hours,
        path: path.to_path_buf(),
    }
}

fn parse_clock(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
}

fn instrument(c: &mut Checker, i: usize, ri: &RawInstrument) -> Instrument {
    let ip = |f: &str| p(&[key("instrument"), Seg::Index(i), key(f)]);
    if !valid_name(&ri.name) {
        c.fail(
            &ip("name"),
            format!(
                "name {:?} must be 1-64 letters, digits, '_' or '-'",
                ri.name
            ),
        );
    }
    let kind = InstrumentKind::parse(&ri.kind).unwrap_or_else(|| {
        c.fail(
            &ip("kind"),
            format!(
                "kind {:?} is not one of \"pad\", \"pluck\", \"bell\", \"bass\"",
                ri.kind
            ),
        );
        InstrumentKind::Pad
    });
    let mut voices = Vec::new();
    for (j, v) in ri.voices.iter().enumerate() {
        match Voice::parse(v) {
            Some(voice) if voices.contains(&voice) => c.fail(
                &[
                    key("instrument"),
                    Seg::Index(i),
                    key("voices"),
                    Seg::Index(j),
                ],
                format!("voice {v:?} is listed twice"),
            ),
            Some(voice) => voices.push(voice),
            None => c.fail(
                &[
                    key("instrument"),
                    Seg::Index(i),
                    key("voices"),
                    Seg::Index(j),
                ],
                format!("voice {v:?} is not one of \"soprano\", \"alto\", \"tenor\", \"bass\""),
            ),
        }
    }
    let performer = ri.performer.unwrap_or(false);
    if voices.is_empty() && !performer {
        c.fail(
            &ip("voices"),
            "an instrument plays at least one voice, or is the performer",
        );
    }
    let (attack, decay, sustain, release) = match kind {
        InstrumentKind::Pad => (0.8, 0.5, 0.8, 2.0),
        InstrumentKind::Pluck => (0.004, 0.6, 0.0, 0.3),
        InstrumentKind::Bell => (0.003, 2.0, 0.0, 1.0),
        InstrumentKind::Bass => (0.01, 0.3, 0.8, 0.25),
    };
    let default_cutoff = match kind {
        InstrumentKind::Pad => 1800.0,
        InstrumentKind::Pluck => 3000.0,
        InstrumentKind::Bell => 8000.0,
        InstrumentKind::Bass => 900.0,
    };
    Instrument {
        name: ri.name.clone(),
        kind,
        voices,
        polyphony: c.range(&ip("polyphony"), ri.polyphony.unwrap_or(8), 1, 64) as usize,
        gain_db: c.range(&ip("gain_db"), ri.gain_db.unwrap_or(-12.0), -60.0, 12.0),
        attack: c.range(&ip("attack"), ri.attack.unwrap_or(attack), 0.001, 10.0),
        decay: c.range(&ip("decay"), ri.decay.unwrap_or(decay), 0.001, 20.0),
        sustain: c.range(&ip("sustain"), ri.sustain.unwrap_or(sustain), 0.0, 1.0),
        release: c.range(&ip("release"), ri.release.unwrap_or(release), 0.005, 20.0),
        cutoff: c.range(
            &ip("cutoff"),
            ri.cutoff.unwrap_or(default_cutoff),
            40.0,
            20000.0,
        ),
        octave: c.range(&ip("octave"), ri.octave.unwrap_or(0), -3, 3) as i8,
        pan: c.range(&ip("pan"), ri.pan.unwrap_or(0.0), -1.0, 1.0),
        spread: c.range(&ip("spread"), ri.spread.unwrap_or(0.3), 0.0, 1.0),
        performer,
    }
}

fn layer(c: &mut Checker, i: usize, rl: &RawLayer, base_dir: &Path) -> Layer {
    let lp = |f: &str| p(&[key("layer"), Seg::Index(i), key(f)]);
    if !valid_name(&rl.name) {
        c.fail(
            &lp("name"),
            format!("name {:?} is not a valid name", rl.name),
        );
    }
    let file = base_dir.join(&rl.file);
    match std::fs::File::open(&file) {
        Ok(f) => {
            if f.metadata().map(|m| !m.is_file()).unwrap_or(true) {
                c.fail(
                    &lp("file"),
                    format!("sample {} is not a file", file.display()),
                );
            }
        }
        Err(e) => c.fail(
            &lp("file"),
            format!("sample file {} cannot be read: {e}", file.display()),
        ),
    }
    Layer {
        name: rl.name.clone(),
        file,
        gain_db: c.range(&lp("gain_db"), rl.gain_db.unwrap_or(-18.0), -60.0, 12.0),
        looped: rl.looped.unwrap_or(true),
        fade: c.range(&lp("fade"), rl.fade.unwrap_or(4.0), 0.0, 60.0),
    }
}

fn mapping(
    c: &mut Checker,
    i: usize,
    rm: &RawMapping,
    instruments: &[Instrument],
    layers: &[Layer],
) -> Option<Mapping> {
    let mp = |f: &str| p(&[key("mapping"), Seg::Index(i), key(f)]);
    let from = InputName::parse(&rm.from).or_else(|| {
        c.fail(
            &mp("from"),
            format!(
                "input {:?} is not movement, valence, arousal, presence or in.<name>",
                rm.from
            ),
        );
        None
    });
    let (to, lo, hi) = match parse_target(&rm.to, instruments, layers) {
        Ok(t) => t,
        Err(msg) => {
            c.fail(&mp("to"), msg);
            return None;
        }
    };
    let range = match rm.range {
        Some([a, b]) => {
            let a = c.range(&mp("range"), a, lo, hi);
            let b = c.range(&mp("range"), b, lo, hi);
            (a, b)
        }
        None => (lo, hi),
    };
    let from = from?;
    let input_range = match rm.input_range {
        Some([a, b]) if a.is_finite() && b.is_finite() && a != b => (a, b),
        Some([a, b]) => {
            c.fail(
                &mp("input_range"),
                format!("input_range [{a}, {b}] must be two different finite numbers"),
            );
            from.default_range()
        }
        None => from.default_range(),
    };
    let curve = match rm.curve.as_deref() {
        None => Curve::Linear,
        Some(s) => Curve::parse(s).unwrap_or_else(|| {
            c.fail(
                &mp("curve"),
                format!("curve {s:?} is not linear, square, sqrt, smoothstep or step"),
            );
            Curve::Linear
        }),
    };
    let smooth = c.range(&mp("smooth"), rm.smooth.unwrap_or(1.0), 0.0, 60.0);
    Some(Mapping {
        from,
        to,
        range,
        input_range,
        curve,
        smooth,
    })
}

/// Parses a target name and returns it with the range its values must lie in.
fn parse_target(
    s: &str,
    instruments: &[Instrument],
    layers: &[Layer],
) -> Result<(Target, f32, f32), String> {
    let simple = match s {
        "density" => Some((Target::Density, 0.0, 16.0)),
        "register" => Some((Target::Register, 30.0, 96.0)),
        "mode" => Some((Target::Mode, 0.0, 1.0)),
        "tempo" => Some((Target::Tempo, 0.25, 4.0)),
        "volume" => Some((Target::Volume, 0.0, 2.0)),
        "reverb" => Some((Target::Reverb, 0.0, 1.0)),
        "velocity" => Some((Target::Velocity, 0.0, 1.0)),
        "temperature" => Some((Target::Temperature, 0.05, 3.0)),
        _ => None,
    };
    if let Some(t) = simple {
        return Ok(t);
    }
    let (kind, name) = s.split_once('.').ok_or_else(|| {
        format!(
            "target {s:?} is not density, register, mode, tempo, volume, reverb, velocity, \
             temperature, style.<name>, cutoff.<instrument>, gain.<instrument> or layer.<name>"
        )
    })?;
    let instrument = || {
        instruments
            .iter()
            .position(|i| i.name == name)
            .ok_or_else(|| format!("target {s:?} names no instrument of this scene"))
    };
    match kind {
        "style" if valid_name(name) => Ok((Target::Style(name.to_string()), 0.0, 1.0)),
        "cutoff" => Ok((Target::Cutoff(instrument()?), 40.0, 20000.0)),
        "gain" => Ok((Target::Gain(instrument()?), -60.0, 12.0)),
        "layer" => {
            let idx = layers
                .iter()
                .position(|l| l.name == name)
                .ok_or_else(|| format!("target {s:?} names no layer of this scene"))?;
            Ok((Target::Layer(idx), 0.0, 1.0))
        }
        _ => Err(format!("target {s:?} is not a known target")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[scene]
name = "t"
tempo = 90
key = "D"

[[instrument]]
name = "pad"
kind = "pad"
voices = ["alto", "tenor"]

[[mapping]]
from = "movement"
to = "density"
range = [1.0, 6.0]
"#;

    fn parse(text: &str) -> Result<Scene, SceneError> {
        Scene::parse(text, Path::new("scenes/t.toml"))
    }

    #[test]
    fn good_scene_validates() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.tonic, 2);
        assert_eq!(s.instruments[0].voices, vec![Voice::Alto, Voice::Tenor]);
        assert_eq!(s.mappings[0].to, Target::Density);
        assert_eq!(s.mappings[0].range, (1.0, 6.0));
    }

    #[test]
    fn unknown_key_names_line() {
        let text = GOOD.replace("tempo = 90", "tempo = 90\ntempi = 3");
        let err = parse(&text).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("scenes/t.toml:5:1: unknown field `tempi`"),
            "{msg}"
        );
        assert!(msg.contains("tempi"), "{msg}");
    }

    #[test]
    fn out_of_range_names_field_and_line() {
        let text = GOOD.replace(
            "voices = [\"alto\", \"tenor\"]",
            "voices = [\"alto\", \"tenor\"]\npolyphony = 500",
        );
        let err = parse(&text).unwrap_err();
        let p = &err.problems()[0];
        assert_eq!(p.field, "instrument[0].polyphony");
        assert_eq!(p.line, Some(11));
        assert!(p.message.contains("500"), "{}", p.message);
    }

    #[test]
    fn limiter_lookahead_is_milliseconds_within_reason() {
        let s = parse(&format!("{GOOD}\n[master]\nlimiter_lookahead_ms = 0.0\n")).unwrap();
        assert_eq!(s.master.limiter_lookahead, 0.0);
        assert_eq!(parse(GOOD).unwrap().master.limiter_lookahead, 0.00025);
        let err = parse(&format!("{GOOD}\n[master]\nlimiter_lookahead_ms = 50\n")).unwrap_err();
        let p = &err.problems()[0];
        assert_eq!(p.field, "master.limiter_lookahead_ms");
        assert!(p.message.contains("50"), "{}", p.message);
    }

    #[test]
    fn guidance_defaults_off_and_is_bounded() {
        assert_eq!(parse(GOOD).unwrap().generator.guidance, 1.0);
        let text = format!("{GOOD}\n[generator]\nguidance = -1.5\n");
        let err = parse(&text).unwrap_err();
        let p = &err.problems()[0];
        assert_eq!(p.field, "generator.guidance");
        assert!(p.message.contains("-1.5"), "{}", p.message);
        let text = format!("{GOOD}\n[generator]\nguidance = 2.5\n");
        assert_eq!(parse(&text).unwrap().generator.guidance, 2.5);
    }

    #[test]
    fn a_model_scene_without_a_model_plays_the_shipped_default() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenes");
        let text = format!("{GOOD}\n[generator]\nsource = \"model\"\n");
        let s = Scene::parse(&text, &dir.join("t.toml")).unwrap();
        let model = s.generator.model.expect("a model scene resolves a model");
        assert!(
            model.ends_with(crate::model::DEFAULT_MODEL_FILE),
            "{}",
            model.display()
        );
        assert!(model.is_file(), "{} is not shipped", model.display());
    }

    #[test]
    fn all_problems_reported_with_lines() {
        let text = GOOD
            .replace("key = \"D\"", "key = \"H\"")
            .replace("to = \"density\"", "to = \"cutoff.flute\"");
        let err = parse(&text).unwrap_err();
        let fields: Vec<_> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["scene.key", "mapping[0].to"]);
        assert_eq!(err.problems()[0].line, Some(5));
        assert_eq!(err.problems()[1].line, Some(14));
    }

    #[test]
    fn missing_sample_file_is_an_error() {
        let text = format!("{GOOD}\n[[layer]]\nname = \"bed\"\nfile = \"no/such.wav\"\n");
        let err = parse(&text).unwrap_err();
        let p = &err.problems()[0];
        assert_eq!(p.field, "layer[0].file");
        assert!(p.message.contains("no/such.wav"), "{}", p.message);
        assert_eq!(p.line, Some(19));
    }

    #[test]
    fn hours_and_clock() {
        assert_eq!(parse_clock("09:30"), Some(570));
        assert_eq!(parse_clock("24:00"), None);
        assert_eq!(parse_clock("9:30"), None);
        let h = Hours {
            open: 22 * 60,
            close: 2 * 60,
            outside: Outside::Silent,
            fade: 10.0,
        };
        assert!(h.is_open(23 * 60) && h.is_open(60) && !h.is_open(12 * 60));
    }
}
