//! `roomscore doctor`: checks what a kiosk needs (audio output, ONNX Runtime, the model and its
//! card, whether this machine composes a model scene's steps in time, the OSC port, the scenes)
//! and says, for each problem, what is wrong and how to fix it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::control::ControlLoop;
use crate::output::{self, OutputRequest};
use crate::scene::{Scene, SourceKind};

#[derive(clap::Args, Debug, Clone)]
pub struct DoctorArgs {
    /// Scenes to check; default the service's scene (see --env), else every scene in scenes/.
    #[arg(long)]
    pub scene: Vec<PathBuf>,
    /// Default the service's, else 0.0.0.0:9000.
    #[arg(long)]
    pub osc: Option<SocketAddr>,
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub output: Option<String>,
    /// The service's settings (ROOMSCORE_OUTPUT, _HOST, _OSC, _SCENE, ORT_DYLIB_PATH), so that
    /// what is checked is what the service runs; default /etc/roomscore/roomscore.env when it
    /// exists. Options given here win over it.
    #[arg(long)]
    pub env: Option<PathBuf>,
}

/// Where install.sh puts the service's settings.
const SERVICE_ENV: &str = "/etc/roomscore/roomscore.env";

/// `KEY=VALUE` lines as systemd's `EnvironmentFile=` reads them: `#` and `;` start comments,
/// and a value may be quoted. A line that is none of these is an error naming it.
fn parse_env(text: &str) -> (Vec<(String, String)>, Vec<String>) {
    let (mut vars, mut bad) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() && !k.trim().contains(' ') => {
                let v = v.trim();
                let unquoted = ['"', '\'']
                    .iter()
                    .find_map(|&q| v.strip_prefix(q)?.strip_suffix(q))
                    .unwrap_or(v);
                vars.push((k.trim().to_string(), unquoted.to_string()));
            }
            _ => bad.push(format!("line {}: {line:?} is not KEY=VALUE", i + 1)),
        }
    }
    (vars, bad)
}

/// Fills in what the command line left out from the service's settings, and points the model
/// runtime at the ONNX Runtime the service uses.
fn apply_env(r: &mut Report, args: &mut DoctorArgs) {
    let path = match &args.env {
        Some(p) => p.clone(),
        None if Path::new(SERVICE_ENV).exists() => PathBuf::from(SERVICE_ENV),
        None => return,
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            r.problem(
                "service settings",
                format!("{}: {e}", path.display()),
                "run doctor with sudo (the file is readable by root and the service only)",
            );
            return;
        }
    };
    let (vars, bad) = parse_env(&text);
    for b in bad {
        r.problem(
            "service settings",
            format!("{}: {b}", path.display()),
            "systemd skips such a line: write it as KEY=VALUE",
        );
    }
    for (k, v) in vars {
        match k.as_str() {
            "ROOMSCORE_OUTPUT" if args.output.is_none() => args.output = Some(v),
            "ROOMSCORE_HOST" if args.host.is_none() => args.host = Some(v),
            "ROOMSCORE_SCENE" if args.scene.is_empty() => args.scene = vec![PathBuf::from(v)],
            "ROOMSCORE_OSC" if args.osc.is_none() => match v.parse() {
                Ok(a) => args.osc = Some(a),
                Err(e) => r.problem(
                    "service settings",
                    format!("{}: ROOMSCORE_OSC={v:?}: {e}", path.display()),
                    "write it as ADDRESS:PORT, e.g. 0.0.0.0:9000",
                ),
            },
            // Read by the model runtime; doctor is one thread at this point.
            "ORT_DYLIB_PATH" if !v.is_empty() => std::env::set_var(k, v),
            _ => {}
        }
    }
    r.ok(
        "service settings",
        format!("read from {} (options given here win)", path.display()),
    );
}

struct Report {
    problems: usize,
}

impl Report {
    fn ok(&self, what: &str, detail: impl std::fmt::Display) {
        println!("ok       {what}: {detail}");
    }

    fn problem(&mut self, what: &str, detail: impl std::fmt::Display, fix: &str) {
        self.problems += 1;
        println!("PROBLEM  {what}: {detail}\n         fix: {fix}");
    }
}

fn scenes(args: &DoctorArgs) -> Vec<PathBuf> {
    if !args.scene.is_empty() {
        return args.scene.clone();
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir("scenes")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Runs every check; returns the number of problems found.
pub fn run(mut args: DoctorArgs) -> usize {
    let mut r = Report { problems: 0 };
    apply_env(&mut r, &mut args);
    let osc = args
        .osc
        .unwrap_or_else(|| "0.0.0.0:9000".parse().expect("an address"));

    let req = OutputRequest {
        device: args.output.clone(),
        host: args.host.clone(),
        buffer: 256,
        sample_rate: None,
    };
    match output::find_at_start(&req, &|| false) {
        output::Found::Unanswered(unanswered) => r.problem(
            "audio output",
            unanswered,
            "the audio server or card hangs: restart the JACK server (or whatever holds the \
             card), or unplug and replug the card; play starts on the null output meanwhile",
        ),
        output::Found::Device(n) => r.ok(
            "audio output",
            format!(
                "{} device {:?}, {} ch, {} Hz",
                n.host, n.name, n.channels, n.sample_rate
            ),
        ),
        output::Found::Missing(e) => r.problem(
            "audio output",
            e,
            "plug in the sound card and check `aplay -l` and `roomscore devices`; \
             without one, play runs against the null output (silent)",
        ),
    }

    match crate::model::runtime::backend() {
        Ok(b) => r.ok("model runtime", b),
        Err(e) => r.problem(
            "model runtime",
            e,
            "python3 -m venv .venv && .venv/bin/pip install onnxruntime==1.31.1, or set ORT_DYLIB_PATH",
        ),
    }

    match std::net::UdpSocket::bind(osc) {
        Ok(_) => r.ok("OSC port", format!("{osc} is free")),
        Err(e) => r.problem(
            "OSC port",
            format!("{osc}: {e}"),
            "stop what uses the port (`ss -ulpn`), e.g. a running roomscore service, or pass --osc",
        ),
    }

    let list = scenes(&args);
    if list.is_empty() {
        r.problem(
            "scenes",
            "no scene files found",
            "run from the installation directory, or pass --scene",
        );
    }
    let mut models: Vec<PathBuf> = Vec::new();
    let mut composed: Vec<Scene> = Vec::new();
    for path in &list {
        match Scene::load(path) {
            Ok(s) => {
                r.ok("scene", format!("{} ({})", path.display(), s.name));
                if s.generator.source == SourceKind::Model {
                    let m = crate::model::scene_model_path(&s);
                    if !models.contains(&m) {
                        models.push(m);
                    }
                    composed.push(s);
                }
            }
            Err(e) => r.problem(
                "scene",
                e,
                "fix the field named above; `roomscore check FILE` re-checks",
            ),
        }
    }
    for m in models {
        check_model(&mut r, &m);
    }
    for s in &composed {
        check_pace(&mut r, s);
    }
    if r.problems == 0 {
        println!("no problems found");
    } else {
        println!("{} problem(s) found", r.problems);
    }
    r.problems
}

fn check_model(r: &mut Report, path: &Path) {
    match crate::model::Model::open(path) {
        Ok(m) => r.ok(
            "model",
            format!(
                "{} verified against its card {}",
                path.display(),
                m.card.path.display()
            ),
        ),
        Err(e) => r.problem(
            "model",
            e,
            "restore models/ from the repository (the card's sha256 must match the .onnx file); \
             meanwhile the engine plays the rule-based composer",
        ),
    }
}

/// Steps composed before the timed ones: past the point where the model's context is full and
/// each token overwrites the oldest in its cache, which is the step a long-running room pays.
const UNTIMED_STEPS: usize = 128;
const TIMED_STEPS: usize = 64;

/// Times a model scene's composer on this machine, as the scene runs it (its model, guidance
/// and sampling), against the time a step lasts at the fastest tempo the scene's mappings reach.
fn check_pace(r: &mut Report, scene: &Scene) {
    let what = format!("composer pace ({})", scene.name);
    let mut source = match crate::model::load_source(scene, scene.generator.seed) {
        Ok(s) => s,
        // The model check above has said why.
        Err(_) => return,
    };
    let controls = ControlLoop::new(scene).tick(0.0);
    let params = crate::session::sampling(&controls, scene);
    let mut times = Vec::with_capacity(TIMED_STEPS);
    for i in 0..UNTIMED_STEPS + TIMED_STEPS {
        let t = Instant::now();
        if let Err(e) = source.next_step(&controls.cond, &params) {
            r.problem(
                &what,
                e,
                "the engine would play the rule-based source; `roomscore model info` and \
                 `roomscore model bench` show more",
            );
            return;
        }
        if i >= UNTIMED_STEPS {
            times.push(t.elapsed());
        }
    }
    times.sort_unstable();
    let (median, slowest) = (times[times.len() / 2], times[times.len() - 1]);
    // The room's busiest minutes set the pace the composer must hold, not the scene's base.
    let bpm = crate::control::fastest_tempo(scene);
    let step = crate::gen::step_time(bpm);
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let reach = if (bpm - scene.tempo).abs() >= 0.5 {
        format!(
            "{bpm:.0} BPM, the fastest the scene's tempo mapping reaches from its {:.0}",
            scene.tempo
        )
    } else {
        format!("the scene's {bpm:.0} BPM")
    };
    let fastest = crate::gen::fastest_fitting(median);
    let keeps_up = if fastest >= crate::control::MAX_TEMPO {
        format!(
            "it keeps up at any tempo the engine plays (to {:.0} BPM)",
            crate::control::MAX_TEMPO
        )
    } else {
        format!("it keeps up to {fastest:.0} BPM")
    };
    let detail = format!(
        "a step in {:.1} ms (median of {TIMED_STEPS} with a full context; slowest {:.1} ms), \
         against {:.0} ms a step at {reach}: {:.1}x headroom; {keeps_up}",
        ms(median),
        ms(slowest),
        step * 1e3,
        step / median.as_secs_f64()
    );
    // The share of a step the engine takes a set-aside composer back under: the margin a room
    // needs for rollbacks and the host's drift.
    if !crate::gen::fits(median, bpm) {
        r.problem(
            &what,
            detail,
            "set the scene's `model` to the network alone (models/roomscore-satb.onnx), lower \
             `guidance`, or slow the scene or narrow its tempo mapping; live, the engine replaces \
             a model that cannot keep up with the rule-based source",
        );
    } else {
        r.ok(&what, detail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_settings_are_read_as_systemd_reads_them() {
        let text = "# comment\n; another\n\nROOMSCORE_OUTPUT=default\nROOMSCORE_HOST = \"alsa\"\n\
                    ORT_DYLIB_PATH='/opt/roomscore/venv/lib/libonnxruntime.so'\n\
                    ROOMSCORE_EXTRA_ARGS=--seed 3\nnot a setting\n";
        let (vars, bad) = parse_env(text);
        assert_eq!(
            vars,
            [
                ("ROOMSCORE_OUTPUT", "default"),
                ("ROOMSCORE_HOST", "alsa"),
                (
                    "ORT_DYLIB_PATH",
                    "/opt/roomscore/venv/lib/libonnxruntime.so"
                ),
                ("ROOMSCORE_EXTRA_ARGS", "--seed 3"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(bad, ["line 8: \"not a setting\" is not KEY=VALUE"]);
    }
}
