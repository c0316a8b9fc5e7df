//! `roomscore play`: the live engine. Threads: the output (cpal's callback, or the null output's
//! timer), the OSC receiver, the conductor (control loop, ~200 Hz, and at once on any input),
//! the composer (fills the note queue ahead of the playhead), the recorder, the audio device's
//! calls (`output::Supervisor`: each find, open or close of the device), and the main thread,
//! which waits for signals: SIGINT/SIGTERM fade out and stop, SIGHUP reloads the scene.
//! With `--inputs`, the conductor and composer give way to a replay (`crate::replay`): the
//! renderer's lockstep a few blocks ahead of the device.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{select, Receiver, Sender};
use nannou_osc::rosc::{OscMessage, OscPacket, OscType};

use crate::audio::Command;
use crate::input::access::{Access, AllowList};
use crate::input::log::LogWriter;
use crate::input::osc::{self, LiveClock, OscStats, OscThread};
use crate::input::TimedEvent;
use crate::output::{self, AtStart, OutputRequest, SharedEngine, Supervisor};
use crate::record::Recorder;
use crate::render::Lockstep;
use crate::replay::{self, ReplayMsg};
use crate::scene::Scene;
use crate::session::{self, BuildOptions, Composer, ComposerMsg, Conductor, Outcome, Parts};
use crate::systemd::Notifier;
use crate::watchdog::{Heartbeats, Watchdog};

const TICK: Duration = Duration::from_millis(5);
const FADE_SECONDS: f32 = 1.0;
/// How long the stop waits for room in a thread's queue of control messages: one that is stuck
/// is then not told, and is left behind by `join_within`.
const STOP_SEND: Duration = Duration::from_secs(1);

#[derive(clap::Args, Debug, Clone)]
pub struct PlayArgs {
    /// Scene file; default scenes/gallery.toml.
    #[arg(long, default_value = "scenes/gallery.toml")]
    pub scene: PathBuf,
    /// Output device name (see `roomscore devices`), or `null` for no device.
    #[arg(long)]
    pub output: Option<String>,
    /// Audio host: alsa or jack (default: the system's default host).
    #[arg(long)]
    pub host: Option<String>,
    /// Frames per audio buffer.
    #[arg(long, default_value_t = 256)]
    pub buffer: u32,
    /// Hz, 8000..=384000; default the device's (48000 with no device).
    #[arg(long, value_parser = clap::value_parser!(u32).range(8_000..=384_000))]
    pub sample_rate: Option<u32>,
    /// Where to listen for OSC.
    #[arg(long, default_value = "0.0.0.0:9000")]
    pub osc: SocketAddr,
    /// Record what plays into this WAV file. A file an earlier run left there is kept, renamed
    /// to `<name>.<UTC time it was last written>.wav`.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Write every accepted OSC message to this JSON Lines file (replay with `render --inputs`).
    /// A log an earlier run left there is kept, renamed as `--record`'s file is.
    #[arg(long)]
    pub log_inputs: Option<PathBuf>,
    /// Replay an input log on the device: the renderer's lockstep runs a few blocks ahead of the
    /// output, so the samples are those `render --inputs` gives for the same log and seed.
    #[arg(long)]
    pub inputs: Option<PathBuf>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop (with the usual fade) after this many seconds.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Accept OSC only from these networks (CIDR). Default: loopback and private networks.
    #[arg(long, num_args = 1.., value_name = "CIDR")]
    pub osc_allow: Vec<String>,
    /// Accept control messages (scene, tempo, volume, note, status) only from these networks,
    /// within --osc-allow. Default: the same as --osc-allow.
    #[arg(long, num_args = 1.., value_name = "CIDR")]
    pub control_allow: Vec<String>,
}

/// Loopback, private and link-local networks: a kiosk's sensors live there, and an engine that
/// finds itself on a public address should not take orders from the internet.
pub const DEFAULT_ALLOW: [&str; 8] = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
];

fn access(args: &PlayArgs) -> anyhow::Result<Access> {
    let sensors = if args.osc_allow.is_empty() {
        AllowList::parse(DEFAULT_ALLOW)?
    } else {
        AllowList::parse(&args.osc_allow).context("--osc-allow")?
    };
    let control = if args.control_allow.is_empty() {
        sensors.clone()
    } else {
        AllowList::parse(&args.control_allow).context("--control-allow")?
    };
    Ok(Access { sensors, control })
}

enum ControlMsg {
    Reload,
    FadeOut(f32),
    Stop,
}

pub fn run(args: PlayArgs) -> anyhow::Result<()> {
    // Everything that can be wrong with the set-up is found before any sound.
    let scene = Scene::load(&args.scene)?;
    let access = access(&args)?;
    let replay = match &args.inputs {
        Some(p) => crate::input::log::read(p)?,
        None => Vec::new(),
    };
    let scenes_dir = args
        .scene
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    // Before any thread starts, so that a SIGHUP (a reload) early in the start cannot end the
    // process, which is what it does by default.
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("setting up signal handling")?;
    // Besides: the start's waits for the device see a stop without waiting out (`Signals` is
    // read only once play runs), so that a service stopped then is not killed mid-start.
    let stopping = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register(sig, stopping.clone()).context("setting up signal handling")?;
    }
    // What alsa-lib says on this thread: a device stream is played (started) here.
    let alsa_errors = output::AlsaErrors::capture();
    let socket = osc::bind(args.osc)?;
    lock_memory();
    let req = OutputRequest {
        device: args.output.clone().filter(|d| d != "null"),
        host: args.host.clone(),
        buffer: args.buffer,
        sample_rate: args.sample_rate,
    };
    // Found on a thread of its own: a device that does not answer (a frozen JACK server) is left
    // to its call, and the engine starts on the null output.
    let found = match args.output.as_deref() {
        Some("null") => None,
        _ => match output::find_at_start(&req, &|| stopping.load(Relaxed)) {
            output::Found::Missing(e) => {
                tracing::warn!(
                    "no audio device ({e}); playing on, paced in real time, against the null output"
                );
                None
            }
            output::Found::Unanswered(u) => {
                Some(output::Found::Unanswered(unanswered(u, &stopping)))
            }
            device => Some(device),
        },
    };
    if stopping.load(Relaxed) {
        // Nothing plays yet, so there is nothing to fade or record.
        tracing::info!("stopped during the start, before anything played");
        return Ok(());
    }
    // After the stop above, which then leaves no empty log behind in place of an earlier one.
    let input_log = match &args.log_inputs {
        Some(p) => {
            keep_earlier(p, "input log")?;
            Some(LogWriter::create(p)?)
        }
        None => None,
    };
    let sample_rate = match &found {
        Some(output::Found::Device(n)) => n.sample_rate,
        _ => args.sample_rate.unwrap_or(48_000),
    };
    let mut parts = session::build(
        scene,
        BuildOptions {
            sample_rate: sample_rate as f32,
            seed: args.seed,
            score: None,
            recorder: None,
            scenes_dir: &scenes_dir,
        },
    )?;
    // After the build, so that a start that fails there (and is tried again every 2 s by the
    // service) leaves no empty recording behind to be kept.
    let recorder = match &args.record {
        Some(p) => {
            keep_earlier(p, "recording")?;
            let (r, tx) = Recorder::start(p, sample_rate, 4.0)?;
            parts.engine.set_recorder(Some(tx));
            Some(r)
        }
        None => None,
    };
    let telemetry = parts.conductor.telemetry.clone();
    let scene_name = parts.conductor.scene.name.clone();
    let stats = Arc::new(OscStats::default());
    let (input_tx, input_rx) = crossbeam_channel::bounded::<TimedEvent>(4096);
    let reply = socket
        .try_clone()
        .context("cloning the OSC socket for replies")?;
    let notifier = Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!("systemd notification disabled: {e}");
        Notifier::disabled()
    });
    let started = Instant::now();
    let outputs = Outputs {
        found,
        stopping,
        wanted: (args.output.as_deref() != Some("null")).then_some(req),
        telemetry: telemetry.clone(),
        sample_rate,
        frames: args.buffer,
        restart_on_rate: notifier.is_enabled(),
        alsa_errors,
    };

    // Immediate performer notes skip the control loop in live play; a replay applies every
    // input in lockstep instead.
    let mut lane = None;
    // Live, the composer has a thread of its own; a replay composes on the thread that feeds
    // the watchdog. The main thread is last either way.
    let watched: &[&str] = match args.inputs {
        Some(_) => &["main"],
        None => &["composer", "main"],
    };
    let hearts = Heartbeats::new(watched);
    let main_heart = watched.len() - 1;
    let (mut out, work) = match &args.inputs {
        Some(path) => {
            // A replay: the renderer's lockstep, a few blocks ahead of the device.
            let events = crate::input::log::to_events(path, &replay, sample_rate).0;
            let step = Lockstep::new(parts, events, sample_rate);
            let source = step.composer.source_name().to_string();
            let (ctl_tx, ctl_rx) = crossbeam_channel::bounded::<ReplayMsg>(16);
            let stats = stats.clone();
            let mut watchdog = Watchdog::new(&notifier, hearts.clone());
            let _ = notifier.ready();
            let hook = move |step: &Lockstep, outcome: Option<Outcome>| match outcome {
                Some(Outcome::Status(addr)) => {
                    send_status(&step.conductor, &reply, addr, &stats, started)
                }
                Some(_) => {}
                None => {
                    // The OSC thread's limit on timed inputs reads this count.
                    stats
                        .scheduled
                        .store(step.conductor.scheduled_len(), Relaxed);
                    watchdog.feed(&notifier, &step.conductor)
                }
            };
            let replay::Replay { player, thread } = replay::start(step, input_rx, ctl_rx, hook)?;
            let out = outputs.start(Arc::new(Mutex::new(player)));
            tracing::info!(
                scene = %scene_name, source, osc = %args.osc, inputs = %path.display(),
                "replaying on {}", out.describe()
            );
            (
                out,
                Work::Replay {
                    ctl: ctl_tx,
                    thread,
                },
            )
        }
        None => {
            let Parts {
                mut engine,
                conductor,
                mut composer,
            } = parts;
            lane = engine.live_lane();
            // The first notes are queued before the first callback, so none of them starts late.
            composer.fill(0.0);
            composer.watch_pace();
            let source = composer.source_name().to_string();
            let engine = Arc::new(Mutex::new(engine));
            let out = outputs.start(engine.clone());
            tracing::info!(scene = %scene_name, source, osc = %args.osc, "playing on {}", out.describe());
            let (comp_tx, comp_rx) = crossbeam_channel::bounded::<ComposerMsg>(256);
            let comp_tel = telemetry.clone();
            let comp_hearts = hearts.clone();
            let composer_thread = std::thread::Builder::new()
                .name("composer".into())
                .spawn(move || composer_loop(composer, comp_rx, comp_tel, &comp_hearts))?;
            let (ctl_tx, ctl_rx) = crossbeam_channel::bounded::<ControlMsg>(16);
            let ctl_stats = stats.clone();
            let watchdog = Watchdog::new(&notifier, hearts.clone());
            let control_thread =
                std::thread::Builder::new()
                    .name("conductor".into())
                    .spawn(move || {
                        conductor_loop(
                            conductor, input_rx, ctl_rx, comp_tx, reply, ctl_stats, started,
                            notifier, watchdog,
                        )
                    })?;
            (
                out,
                Work::Live {
                    ctl: ctl_tx,
                    engine,
                    threads: [control_thread, composer_thread],
                },
            )
        }
    };
    let osc_thread = OscThread::spawn(
        socket,
        LiveClock {
            telemetry: telemetry.clone(),
            sample_rate: sample_rate as f64,
        },
        input_tx,
        stats.clone(),
        access,
        input_log,
        lane,
    )?;

    // A thread that died: the room is shut down as on a signal, the recording closed, and then
    // the process fails, so that the service manager starts it again.
    let died = wait_for_stop(
        signals,
        || hearts.turn(main_heart),
        || work.reload(),
        || work.stopped(),
        args.seconds,
        &mut out,
    );
    work.fade_out(FADE_SECONDS);
    std::thread::sleep(Duration::from_secs_f32(FADE_SECONDS + 0.15));
    drop(osc_thread);
    // The thread that panicked, rather than one that stopped because it had.
    let died = work.stop(out).err().or(died);
    if let Some(r) = recorder {
        let frames = r.finish()?;
        tracing::info!(
            "recording closed: {frames} frames ({:.1} s)",
            frames as f64 / sample_rate as f64
        );
    }
    let dropped = telemetry.record_dropped.load(Relaxed);
    if dropped > 0 {
        tracing::warn!("the recorder missed {dropped} samples");
    }
    tracing::info!(
        notes = telemetry.notes_played.load(Relaxed),
        xruns = telemetry.xruns.load(Relaxed),
        osc_invalid = stats.invalid.load(Relaxed),
        osc_dropped = stats.dropped.load(Relaxed),
        "stopped"
    );
    match died {
        Some(why) => Err(anyhow::anyhow!(
            "{why}; exiting with an error so that the service manager starts the engine again"
        )),
        None => Ok(()),
    }
}

/// How long a thread of the engine has to stop once asked: one stuck inside a call (a model's
/// that never returns) is left to end with the process, which then exits with an error,
/// instead of waiting until the service manager kills it.
const JOIN_WITHIN: Duration = Duration::from_secs(5);

/// Joins `t` once it has stopped, within `JOIN_WITHIN`. Err says why play ends with an error:
/// it panicked, or it did not stop.
fn join_within<T>(t: std::thread::JoinHandle<T>) -> Result<T, String> {
    let name = thread_name(&t);
    if !crate::watchdog::finished_within(&t, JOIN_WITHIN) {
        tracing::error!(
            "the {name} thread did not stop within {} s (stuck in a call?); leaving it",
            JOIN_WITHIN.as_secs()
        );
        return Err(format!("the {name} thread did not stop when asked"));
    }
    t.join().map_err(|_| thread_stopped(&name))
}

/// Why play ends with an error when a thread of the engine stopped.
fn thread_stopped(name: &str) -> String {
    format!("the {name} thread stopped while playing (a panic is in the log above)")
}

/// Moves the file an earlier run wrote at `path` aside (`crate::aside`), and says where.
fn keep_earlier(path: &Path, what: &str) -> anyhow::Result<()> {
    let moved = crate::aside::move_aside(path)
        .with_context(|| format!("{}: cannot move the earlier {what} aside", path.display()))?;
    if let Some(to) = moved {
        tracing::info!(
            "the earlier {what} {} is kept as {}",
            path.display(),
            to.display()
        );
    }
    Ok(())
}

fn thread_name<T>(t: &std::thread::JoinHandle<T>) -> String {
    t.thread().name().unwrap_or("unnamed").to_string()
}

/// Keeps every page of the process in RAM, now and to come, so the audio thread never waits
/// on a page fault. Best effort: without the right (`LimitMEMLOCK`, or root) it plays on.
fn lock_memory() {
    // SAFETY: mlockall takes flags only and changes no memory we hold references into.
    let r = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
    if r == 0 {
        tracing::debug!("memory locked");
    } else {
        tracing::info!(
            "memory not locked ({}): page faults may cost the audio thread; raise LimitMEMLOCK",
            std::io::Error::last_os_error()
        );
    }
}

/// What feeds the output: live, the conductor and the composer on threads of their own; or a
/// replay's lockstep on one.
enum Work {
    Live {
        ctl: Sender<ControlMsg>,
        engine: Arc<Mutex<crate::audio::AudioEngine>>,
        threads: [std::thread::JoinHandle<()>; 2],
    },
    Replay {
        ctl: Sender<ReplayMsg>,
        thread: std::thread::JoinHandle<Lockstep>,
    },
}

impl Work {
    /// SIGHUP: load the file of the scene that plays again.
    fn reload(&self) {
        let sent = match self {
            Work::Live { ctl, .. } => ctl.try_send(ControlMsg::Reload).is_ok(),
            Work::Replay { ctl, .. } => ctl.try_send(ReplayMsg::Reload).is_ok(),
        };
        if !sent {
            tracing::warn!("SIGHUP: the thread that reloads has not taken the ones before");
        }
    }

    fn fade_out(&self, seconds: f32) {
        match self {
            Work::Live { ctl, .. } => drop(ctl.try_send(ControlMsg::FadeOut(seconds))),
            Work::Replay { ctl, .. } => {
                drop(ctl.try_send(ReplayMsg::Command(Command::FadeOut(seconds))))
            }
        }
    }

    /// The name of a thread that has stopped, if one has.
    fn stopped(&self) -> Option<String> {
        match self {
            Work::Live { threads, .. } => threads.iter().find(|t| t.is_finished()).map(thread_name),
            Work::Replay { thread, .. } => thread.is_finished().then(|| thread_name(thread)),
        }
    }

    /// Stops the threads, then the output, and then takes the recorder's queue from the engine
    /// so that the writer sees the end of all that played. Err says why play ends with an
    /// error: a thread panicked, or did not stop.
    fn stop(self, out: Supervisor) -> Result<(), String> {
        match self {
            Work::Live {
                ctl,
                engine,
                threads,
            } => {
                let _ = ctl.send_timeout(ControlMsg::Stop, STOP_SEND);
                let joined = threads.into_iter().map(join_within).collect::<Vec<_>>();
                out.stop();
                if let Ok(mut e) = engine.lock() {
                    drop(e.set_recorder(None));
                }
                // When both failed, the composer's failure is reported: a panic in what
                // composes says more than a conductor that did not stop after it.
                joined
                    .into_iter()
                    .rev()
                    .find_map(Result::err)
                    .map_or(Ok(()), Err)
            }
            Work::Replay { ctl, thread } => {
                let _ = ctl.send_timeout(ReplayMsg::Stop, STOP_SEND);
                let step = join_within(thread);
                out.stop();
                step.map(|mut step| drop(step.engine.set_recorder(None)))
            }
        }
    }
}

/// How to start the output for whatever renders.
struct Outputs {
    /// What start-up's search found; `None` for the null output, asked for or for want of a
    /// device.
    found: Option<output::Found>,
    /// A stop asked for during the start.
    stopping: Arc<AtomicBool>,
    wanted: Option<OutputRequest>,
    telemetry: Arc<crate::audio::Telemetry>,
    sample_rate: u32,
    frames: u32,
    /// Under a service manager, which starts the engine again at a device's new rate.
    restart_on_rate: bool,
    alsa_errors: output::AlsaErrors,
}

impl Outputs {
    fn start(self, target: SharedEngine) -> Supervisor {
        let stopping = || self.stopping.load(Relaxed);
        let at_start = match self.found {
            // A stop since the search: no stream is opened only to be closed.
            Some(output::Found::Device(_)) if stopping() => AtStart::Null,
            Some(output::Found::Device(n)) => {
                match output::open_at_start(n, target.clone(), self.telemetry.clone(), &stopping) {
                    Ok(Ok(opened)) => AtStart::Opened(opened),
                    Ok(Err(e)) => {
                        tracing::warn!("{e}; playing on against the null output");
                        AtStart::Null
                    }
                    Err(u) => AtStart::Unanswered(unanswered(u, &self.stopping)),
                }
            }
            Some(output::Found::Unanswered(u)) => AtStart::Unanswered(u),
            Some(output::Found::Missing(_)) | None => AtStart::Null,
        };
        // `--output null` means no device at all; otherwise a missing or lost one is looked for.
        let supervisor = Supervisor::new(
            self.wanted,
            at_start,
            target,
            self.telemetry,
            self.sample_rate,
            self.frames,
        )
        .with_alsa_errors(self.alsa_errors);
        if self.restart_on_rate {
            supervisor.restart_on_rate_change()
        } else {
            supervisor
        }
    }
}

/// Says that play starts without the device, which has not answered (unless the wait ended
/// because play is stopping, which says so itself).
fn unanswered(u: output::Unanswered, stopping: &AtomicBool) -> output::Unanswered {
    if !stopping.load(Relaxed) {
        tracing::warn!(
            "{u}: playing on against the null output, and on the device once it answers"
        );
    }
    u
}

/// Plays until a signal, `seconds`, a thread of the engine stopping (`died` names it), or a
/// device that asks for a restart; in the last two cases, returns why play ends with an error.
/// Meanwhile it watches over the device (`Supervisor::poll`), which never holds it up.
fn wait_for_stop(
    mut signals: signal_hook::iterator::Signals,
    beat: impl Fn(),
    mut on_hup: impl FnMut(),
    died: impl Fn() -> Option<String>,
    seconds: Option<f64>,
    out: &mut Supervisor,
) -> Option<String> {
    use signal_hook::consts::SIGHUP;
    let deadline = seconds.map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    loop {
        for sig in signals.pending() {
            match sig {
                SIGHUP => on_hup(),
                _ => {
                    tracing::info!("signal {sig}: fading out");
                    return None;
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        if let Some(name) = died() {
            tracing::error!("the {name} thread stopped: shutting down");
            return Some(thread_stopped(&name));
        }
        out.poll();
        if let Some(why) = out.restart_for() {
            tracing::error!("{why}");
            return Some(why.to_string());
        }
        beat();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Honoured by debug builds only (the tests'): the thread that composes (the composer's, or a
/// replay's) panics this many seconds in, as a bug in it would, so that a test sees the engine
/// shut down and fail, not play silence.
pub(crate) const PANIC_AFTER_ENV: &str = "ROOMSCORE_TEST_COMPOSER_PANIC_AFTER";

/// Honoured by debug builds only: the composer thread hangs (inside a call that never returns,
/// as a model's might) this many seconds in, so that a test sees the watchdog go unfed.
const HANG_AFTER_ENV: &str = "ROOMSCORE_TEST_COMPOSER_HANG_AFTER";

/// When the composing thread is to panic, if a test asked for it (`PANIC_AFTER_ENV`).
pub(crate) fn test_panic_at() -> Option<Instant> {
    test_fault_at(PANIC_AFTER_ENV)
}

/// When the fault a test asked for through `var` is due; never in release builds.
fn test_fault_at(var: &str) -> Option<Instant> {
    cfg!(debug_assertions)
        .then(|| std::env::var(var).ok()?.parse::<f64>().ok())
        .flatten()
        .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)))
}

fn composer_loop(
    mut composer: Composer,
    rx: Receiver<ComposerMsg>,
    telemetry: Arc<crate::audio::Telemetry>,
    hearts: &Heartbeats,
) {
    let panic_at = test_panic_at();
    let hang_at = test_fault_at(HANG_AFTER_ENV);
    loop {
        if panic_at.is_some_and(|t| Instant::now() >= t) {
            panic!("{PANIC_AFTER_ENV} is set: the composer thread panics, as a bug would");
        }
        if hang_at.is_some_and(|t| Instant::now() >= t) {
            tracing::warn!("{HANG_AFTER_ENV} is set: the composer thread hangs, as a bug would");
            loop {
                std::thread::park();
            }
        }
        hearts.turn(0);
        match rx.recv_timeout(Duration::from_millis(2)) {
            Ok(msg) => {
                composer.handle(msg, telemetry.beat());
                while let Ok(msg) = rx.try_recv() {
                    composer.handle(msg, telemetry.beat());
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
        composer.fill_live(telemetry.beat(), telemetry.tempo());
    }
}

#[allow(clippy::too_many_arguments)]
fn conductor_loop(
    mut conductor: Conductor,
    inputs: Receiver<TimedEvent>,
    ctl: Receiver<ControlMsg>,
    composer: Sender<ComposerMsg>,
    reply: UdpSocket,
    stats: Arc<OscStats>,
    started: Instant,
    notifier: Notifier,
    mut watchdog: Watchdog,
) {
    let _ = notifier.ready();
    let mut last_tick = Instant::now();
    let mut outcomes: Vec<Outcome> = Vec::new();
    loop {
        let wait = TICK.saturating_sub(last_tick.elapsed());
        select! {
            recv(inputs) -> ev => {
                if let Ok(ev) = ev {
                    match conductor.handle(ev) {
                        Ok(o) => outcomes.push(o),
                        Err(e) => session::log_scene_kept(&e),
                    }
                }
            }
            recv(ctl) -> msg => match msg {
                Ok(ControlMsg::Reload) => {
                    let _ = notifier.reloading();
                    match conductor.reload() {
                        Ok(m) => outcomes.push(Outcome::Composer(m)),
                        Err(e) => session::log_scene_kept(&format_args!("SIGHUP: {e}")),
                    }
                    let _ = notifier.ready();
                }
                Ok(ControlMsg::FadeOut(s)) => {
                    let _ = notifier.stopping();
                    conductor.send(Command::FadeOut(s));
                }
                Ok(ControlMsg::Stop) | Err(_) => return,
            },
            default(wait) => {}
        }
        if last_tick.elapsed() >= TICK {
            let dt = last_tick.elapsed().as_secs_f32();
            last_tick = Instant::now();
            conductor.follow_hours(crate::clock::local_minute(), dt);
            let (msg, due) = conductor.tick(dt);
            for o in due {
                match o {
                    Ok(o) => outcomes.push(o),
                    Err(e) => session::log_scene_kept(&e),
                }
            }
            let _ = composer.try_send(msg);
            watchdog.feed(&notifier, &conductor);
        }
        stats.scheduled.store(conductor.scheduled_len(), Relaxed);
        for o in outcomes.drain(..) {
            match o {
                Outcome::Nothing => {}
                Outcome::Composer(m) => {
                    if composer.send(m).is_err() {
                        return;
                    }
                }
                Outcome::Status(addr) => send_status(&conductor, &reply, addr, &stats, started),
            }
        }
    }
}

/// Replies `/roomscore/status` with: scene (s), tempo (f), notes played (i), dropped messages
/// (i), xruns (i), source (s), invalid messages (i), late notes (i), sounding voices (i),
/// seconds playing (f), audio load peak in percent (f), output (s: `device` or `null`), times
/// the device was lost (i), messages refused by the allow lists (i).
fn send_status(
    c: &Conductor,
    socket: &UdpSocket,
    to: SocketAddr,
    stats: &OscStats,
    started: Instant,
) {
    let t = &c.telemetry;
    let clamp = |v: u64| v.min(i32::MAX as u64) as i32;
    let msg = OscMessage {
        addr: "/roomscore/status".into(),
        args: vec![
            OscType::String(c.scene.name.clone()),
            OscType::Float(t.tempo() as f32),
            OscType::Int(clamp(t.notes_played.load(Relaxed))),
            OscType::Int(clamp(
                stats.dropped.load(Relaxed) + c.commands_full + c.scheduled_full,
            )),
            OscType::Int(clamp(t.xruns.load(Relaxed))),
            OscType::String(c.source_name.lock().map(|s| s.clone()).unwrap_or_default()),
            OscType::Int(clamp(stats.invalid.load(Relaxed))),
            OscType::Int(clamp(t.notes_late.load(Relaxed))),
            OscType::Int(t.voices_active.load(Relaxed) as i32),
            OscType::Float(started.elapsed().as_secs_f32()),
            OscType::Float(t.load_max_ppm.load(Relaxed) as f32 / 1e4),
            OscType::String(
                if t.on_device.load(Relaxed) {
                    "device"
                } else {
                    "null"
                }
                .into(),
            ),
            OscType::Int(clamp(t.device_losses.load(Relaxed))),
            OscType::Int(clamp(stats.denied.load(Relaxed))),
        ],
    };
    match nannou_osc::rosc::encoder::encode(&OscPacket::Message(msg)) {
        Ok(bytes) => {
            if let Err(e) = socket.send_to(&bytes, to) {
                tracing::warn!("status reply to {to}: {e}");
            }
        }
        Err(e) => tracing::warn!("status reply: {e}"),
    }
}
