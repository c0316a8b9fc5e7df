//! Keeps the room playing whatever happens to the sound card. When the device goes (a USB card
//! pulled, the JACK server gone, a stream that stops calling back) the null output takes the
//! engine at once, so the clock, the composer and OSC carry on; the device is tried again with
//! a growing pause, and when it answers at the engine's rate the engine moves back to it. One
//! that answers at another rate cannot take a graph built for this one: under a service manager
//! the engine then stops to be started again at the device's rate (`restart_for`).
//!
//! Every call that finds, opens or closes a device is made on a thread of its own, one at a
//! time, and the thread that polls only looks in on it. A device that stops answering without
//! a word (a JACK server that hangs, a USB card half gone) can hold such a call for good, and
//! the thread that polls is the one that answers signals and feeds the watchdog. One at a time,
//! because JACK (libjack and the `jack` crate) opens and closes clients under one process-wide
//! lock: a second call would only wait behind the first. At start-up the engine waits
//! `START_WAIT` for the device to be found and opened; one that has not answered by then is
//! left to its call, and the engine starts on the null output, as if it had been lost.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{
    build_cpal, negotiate, Negotiated, NullOutput, Output, OutputError, OutputRequest, SharedEngine,
};
use crate::audio::Telemetry;

const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(8);
/// A device stream whose clock has not moved for this long is treated as gone, whether or not
/// the host said so: some drivers block instead of reporting an unplugged card.
const STALL: Duration = Duration::from_millis(1500);
/// A device call still running after this long is reported, once.
const SLOW_CALL: Duration = Duration::from_secs(5);
/// How long a stop waits for the device to close before leaving it to end with the process.
const CLOSE_AT_STOP: Duration = Duration::from_secs(2);
/// How long start-up waits for the device to be found, and then to be opened.
pub const START_WAIT: Duration = Duration::from_secs(5);
const TRYING: &str = "trying the device";
const FINDING: &str = "looking for the device at the start";
const OPENING: &str = "opening the device at the start";

/// A call into the device at start-up that did not answer within `START_WAIT`. The engine
/// starts on the null output, and the supervisor tries the device once the call has ended.
pub struct Unanswered(DeviceCall);

impl Unanswered {
    /// Says that play starts without the device.
    pub fn warn(self) -> Self {
        tracing::warn!(
            "{self}: playing on against the null output, and on the device once it answers"
        );
        self
    }
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the audio device has not answered ({} for {} s)",
            self.0.what,
            START_WAIT.as_secs()
        )
    }
}

/// What start-up found of the device, for the supervisor to start from.
pub enum AtStart {
    /// None wanted (`--output null`) or none found: the null output, and a device wanted is
    /// looked for from the first poll.
    Null,
    /// The device's stream, open and not yet playing.
    Opened(Output),
    /// The null output until the call ends.
    Unanswered(Unanswered),
}

/// A failed call into the device whose own error was lost: its thread panicked or could not
/// be started.
fn call_failed(what: &str, why: impl std::fmt::Display) -> OutputError {
    OutputError::Device {
        device: "?".into(),
        message: format!("{what}: {why}"),
    }
}

/// Finds the device and a configuration for it (`negotiate`), waiting at most `START_WAIT`.
pub fn find_at_start(req: &OutputRequest) -> Result<Result<Negotiated, OutputError>, Unanswered> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let asked = req.clone();
    let call = DeviceCall::spawn(FINDING, move || {
        // Sent before the thread ends; one that answers too late drops what it found here.
        let _ = tx.send(negotiate(&asked));
        None
    });
    let call = match call {
        Ok(call) => call,
        Err(e) => return Ok(Err(call_failed(FINDING, format!("no thread for it: {e}")))),
    };
    if !crate::watchdog::finished_within(&call.thread, START_WAIT) {
        return Err(Unanswered(call.unanswered_at_start()));
    }
    call.join();
    Ok(rx
        .try_recv()
        .unwrap_or_else(|_| Err(call_failed(FINDING, "panicked"))))
}

/// Opens the stream of a device found (`build_cpal`), not yet playing, waiting at most
/// `START_WAIT`.
pub fn open_at_start(
    found: Negotiated,
    engine: SharedEngine,
    telemetry: Arc<Telemetry>,
) -> Result<Result<Output, OutputError>, Unanswered> {
    let call = DeviceCall::spawn(OPENING, move || Some(build_cpal(&found, engine, telemetry)));
    let call = match call {
        Ok(call) => call,
        Err(e) => return Ok(Err(call_failed(OPENING, format!("no thread for it: {e}")))),
    };
    if !crate::watchdog::finished_within(&call.thread, START_WAIT) {
        return Err(Unanswered(call.unanswered_at_start()));
    }
    Ok(call
        .join()
        .unwrap_or_else(|| Err(call_failed(OPENING, "panicked"))))
}

pub struct Supervisor {
    /// What to reopen; `None` when the operator asked for the null output.
    request: Option<OutputRequest>,
    engine: SharedEngine,
    telemetry: Arc<Telemetry>,
    sample_rate: u32,
    frames: u32,
    current: Output,
    next_try: Instant,
    backoff: Duration,
    last_failure: Option<String>,
    clock_seen: (u64, Instant),
    /// Whether a device at another rate ends play, for a restart at its rate.
    restart_on_rate: bool,
    restart_for: Option<String>,
    /// What alsa-lib says on the polling thread, logged at debug level instead of on stderr.
    alsa_errors: Option<super::AlsaErrors>,
    /// The device call under way: the lost stream closing, or a try of the device.
    call: Option<DeviceCall>,
}

/// A call into the audio host, on a thread of its own.
struct DeviceCall {
    thread: JoinHandle<Option<Result<Output, OutputError>>>,
    /// `closing the lost stream`, `trying the device`.
    what: &'static str,
    since: Instant,
    /// Whether a slow call was reported.
    reported: bool,
}

impl DeviceCall {
    /// `f` returns the output a try opened, or `None` for a close.
    fn spawn(
        what: &'static str,
        f: impl FnOnce() -> Option<Result<Output, OutputError>> + Send + 'static,
    ) -> std::io::Result<Self> {
        let thread = std::thread::Builder::new()
            .name("audio-device".into())
            .spawn(move || {
                // alsa-lib's errors are kept per thread; these are logged as the call ends.
                let _alsa = super::AlsaErrors::capture();
                f()
            })?;
        Ok(DeviceCall {
            thread,
            what,
            since: Instant::now(),
            reported: false,
        })
    }

    /// Start-up goes on without this call, and says so (`Unanswered`'s `Display`): it needs no
    /// report of its own.
    fn unanswered_at_start(mut self) -> Self {
        self.reported = true;
        self
    }

    /// Reports, once, a call that has not returned in `SLOW_CALL`.
    fn report_if_slow(&mut self) {
        if !self.reported && self.since.elapsed() >= SLOW_CALL {
            self.reported = true;
            tracing::warn!(
                "the audio device has not answered ({} for {} s): the room plays on, and \
                 the device is tried again once the call returns",
                self.what,
                SLOW_CALL.as_secs()
            );
        }
    }

    /// What the call gave. A try that panicked in the host's code failed, and is tried again
    /// later like any other.
    fn join(self) -> Option<Result<Output, OutputError>> {
        tracing::debug!("{} took {} ms", self.what, self.since.elapsed().as_millis());
        let what = self.what;
        self.thread.join().unwrap_or_else(|_| {
            matches!(what, TRYING | OPENING).then(|| Err(call_failed(what, "panicked")))
        })
    }
}

impl Supervisor {
    /// Starts play from what start-up found: the device's stream, or the null output, in which
    /// case a device wanted is looked for from the first poll, or once the call it has not
    /// answered has ended.
    pub fn new(
        request: Option<OutputRequest>,
        at_start: AtStart,
        engine: SharedEngine,
        telemetry: Arc<Telemetry>,
        sample_rate: u32,
        frames: u32,
    ) -> Self {
        let null = || {
            Output::Null(NullOutput::start(
                engine.clone(),
                telemetry.clone(),
                sample_rate,
                frames,
            ))
        };
        let (current, call) = match at_start {
            AtStart::Opened(output) => (output, None),
            AtStart::Null => (null(), None),
            AtStart::Unanswered(Unanswered(call)) => (null(), Some(call)),
        };
        let clock = telemetry.sample_clock.load(Relaxed);
        let mut supervisor = Supervisor {
            request,
            engine,
            telemetry,
            sample_rate,
            frames,
            current,
            next_try: Instant::now() + FIRST_RETRY,
            backoff: FIRST_RETRY,
            last_failure: None,
            clock_seen: (clock, Instant::now()),
            restart_on_rate: false,
            restart_for: None,
            alsa_errors: None,
            call,
        };
        if let Err(e) = supervisor.current.play() {
            tracing::warn!("{e}; playing on against the null output");
            supervisor.leave_device();
        }
        let on_device = matches!(supervisor.current, Output::Cpal { .. });
        supervisor.telemetry.on_device.store(on_device, Relaxed);
        supervisor
    }

    /// Logs what alsa-lib says on this thread (see `AlsaErrors`), from each poll on.
    pub fn with_alsa_errors(mut self, errors: super::AlsaErrors) -> Self {
        self.alsa_errors = Some(errors);
        self
    }

    /// A device found at another rate than the engine's ends play (`restart_for` says why):
    /// for an engine a service manager starts again, which then opens the device at its rate.
    /// Otherwise the engine plays on against the null output and says how to get the device.
    pub fn restart_on_rate_change(mut self) -> Self {
        self.restart_on_rate = true;
        self
    }

    /// Why play should end so that the engine is started again, if it should.
    pub fn restart_for(&self) -> Option<&str> {
        self.restart_for.as_deref()
    }

    pub fn describe(&self) -> String {
        self.current.describe()
    }

    /// Call often (every few tens of milliseconds), from the thread that answers signals.
    pub fn poll(&mut self) {
        if let Some(e) = &mut self.alsa_errors {
            e.drain();
        }
        let now = Instant::now();
        let clock = self.telemetry.sample_clock.load(Relaxed);
        if clock != self.clock_seen.0 {
            self.clock_seen = (clock, now);
        }
        if let Some(call) = &mut self.call {
            if !call.thread.is_finished() {
                call.report_if_slow();
                return;
            }
            if let Some(tried) = self.call.take().and_then(DeviceCall::join) {
                self.tried(tried);
            }
        }
        match &self.current {
            Output::Cpal { .. } => {
                let stalled = now.duration_since(self.clock_seen.1) > STALL;
                if self.current.is_lost() || stalled {
                    let why = self
                        .current
                        .lost_reason()
                        .unwrap_or_else(|| format!("no callback for {} ms", STALL.as_millis()));
                    self.fall_back(&why);
                }
            }
            Output::Null(_) => {
                if self.request.is_some() && now >= self.next_try {
                    self.try_device();
                }
            }
        }
    }

    /// Stops the output. A device that does not close within `CLOSE_AT_STOP` (it has stopped
    /// answering since the last poll) is left to end with the process, so that a stop is never
    /// held up by it; so is a device call under way.
    pub fn stop(self) {
        let closing = DeviceCall::spawn("closing the device at the stop", move || {
            drop(self.current);
            None
        });
        let closing = match closing {
            Ok(c) => c,
            // The output was closed here, as the thread could not take it.
            Err(e) => return tracing::warn!("closing the device at the stop: {e}"),
        };
        if crate::watchdog::finished_within(&closing.thread, CLOSE_AT_STOP) {
            closing.join();
        } else {
            tracing::warn!(
                "the audio device did not close within {} s of the stop; leaving it",
                CLOSE_AT_STOP.as_secs()
            );
        }
    }

    fn fall_back(&mut self, why: &str) {
        self.telemetry.device_losses.fetch_add(1, Relaxed);
        self.telemetry.on_device.store(false, Relaxed);
        self.leave_device();
        tracing::warn!(
            "audio device lost ({why}): playing on against the null output, retrying from {} ms",
            FIRST_RETRY.as_millis()
        );
        self.backoff = FIRST_RETRY;
        self.next_try = Instant::now() + FIRST_RETRY;
        self.last_failure = None;
    }

    /// Hands the engine to the null output and closes the device's stream.
    fn leave_device(&mut self) {
        let gone = std::mem::replace(
            &mut self.current,
            Output::Null(NullOutput::start(
                self.engine.clone(),
                self.telemetry.clone(),
                self.sample_rate,
                self.frames,
            )),
        );
        // Closing a dead stream can take a while (JACK waits for its server), and the device
        // is not tried again before it has closed.
        match DeviceCall::spawn("closing the lost stream", move || {
            drop(gone);
            None
        }) {
            Ok(call) => self.call = Some(call),
            Err(e) => tracing::warn!("closing the lost stream: {e}"),
        }
    }

    fn try_device(&mut self) {
        let Some(req) = &self.request else { return };
        let req = OutputRequest {
            sample_rate: Some(self.sample_rate),
            ..req.clone()
        };
        let rate = self.sample_rate;
        let engine = self.engine.clone();
        let telemetry = self.telemetry.clone();
        let call = DeviceCall::spawn(TRYING, move || {
            Some(negotiate(&req).and_then(|n| {
                if n.sample_rate != rate {
                    return Err(OutputError::OtherRate {
                        device: n.name.clone(),
                        offered: n.sample_rate,
                        running: rate,
                    });
                }
                // Played once the null output has stopped, so that the two never both drive
                // the engine.
                build_cpal(&n, engine, telemetry)
            }))
        });
        match call {
            Ok(call) => self.call = Some(call),
            Err(e) => self.tried(Err(call_failed(TRYING, format!("no thread for it: {e}")))),
        }
    }

    /// Takes what a try of the device gave.
    fn tried(&mut self, tried: Result<Output, OutputError>) {
        let played = tried.and_then(|output| {
            // The null output stops (joins its thread) as it is replaced; from here the
            // device's callback drives the engine, once it plays.
            self.current = output;
            let played = self.current.play();
            if played.is_err() {
                self.leave_device();
            }
            played
        });
        match played {
            Ok(()) => {
                self.telemetry.on_device.store(true, Relaxed);
                self.clock_seen = (self.telemetry.sample_clock.load(Relaxed), Instant::now());
                self.backoff = FIRST_RETRY;
                self.last_failure = None;
                tracing::info!("audio device back: playing on {}", self.current.describe());
            }
            Err(e) => {
                if let OutputError::OtherRate {
                    device,
                    offered,
                    running,
                } = &e
                {
                    if self.restart_on_rate {
                        self.restart_for = Some(format!(
                            "audio device {device:?} is back but offers {offered} Hz, and the \
                             engine runs at {running} Hz: stopping, to be started again at its rate"
                        ));
                    }
                }
                let message = e.to_string();
                if self.last_failure.as_deref() != Some(message.as_str()) {
                    tracing::warn!(
                        "audio device still unavailable ({message}); retrying, at most every {} s",
                        MAX_RETRY.as_secs()
                    );
                } else {
                    tracing::debug!("audio device still unavailable: {message}");
                }
                self.last_failure = Some(message);
                self.backoff = (self.backoff * 2).min(MAX_RETRY);
                self.next_try = Instant::now() + self.backoff;
            }
        }
    }
}
