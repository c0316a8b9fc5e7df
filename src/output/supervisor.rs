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
/// How long start-up waits for the device to be found, and then to be opened (and `devices` for
/// each host's list).
pub(crate) const START_WAIT: Duration = Duration::from_secs(5);
const TRYING: &str = "trying the device";
const FINDING: &str = "looking for the device at the start";
const OPENING: &str = "opening the device at the start";

/// What a call into the device gave.
enum Answer {
    /// Start-up's search: the device, and a configuration for it.
    Found(Result<Negotiated, OutputError>),
    /// A stream opened, not yet playing: a try, or start-up's open.
    Opened(Result<Output, OutputError>),
    Closed,
    /// A call that opens nothing panicked in the host's code, or no thread could be started
    /// for a call at start-up.
    Failed(OutputError),
}

/// A failed call into the device whose own error was lost.
fn call_failed(what: &str, why: impl std::fmt::Display) -> OutputError {
    OutputError::Device {
        device: "?".into(),
        message: format!("{what}: {why}"),
    }
}

/// A call into the device at start-up that did not answer within `START_WAIT`, or that start-up
/// stopped waiting for because play is stopping. The engine starts on the null output, and the
/// supervisor tries the device once the call has ended.
pub struct Unanswered(DeviceCall);

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

/// What start-up's search found.
pub enum Found {
    Device(Negotiated),
    Missing(OutputError),
    Unanswered(Unanswered),
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

/// Runs `f` on a device thread and waits for its answer, at most `START_WAIT` and only while
/// `stopping` says no: a stop asked for meanwhile is answered at once, not after the wait.
fn call_at_start(
    what: &'static str,
    opens: bool,
    stopping: &dyn Fn() -> bool,
    f: impl FnOnce() -> Answer + Send + 'static,
) -> Result<Answer, Unanswered> {
    let mut call = match DeviceCall::spawn(what, opens, f) {
        Ok(call) => call,
        Err(e) => {
            return Ok(Answer::Failed(call_failed(
                what,
                format!("no thread for it: {e}"),
            )))
        }
    };
    if !crate::watchdog::finished_within_unless(&call.thread, START_WAIT, stopping) {
        // Start-up says so itself (`Unanswered`'s `Display`), unless it is stopping.
        call.reported = true;
        return Err(Unanswered(call));
    }
    Ok(call.join())
}

/// Finds the device and a configuration for it (`negotiate`), waiting as `call_at_start` does.
pub fn find_at_start(req: &OutputRequest, stopping: &dyn Fn() -> bool) -> Found {
    let asked = req.clone();
    match call_at_start(FINDING, false, stopping, move || {
        Answer::Found(negotiate(&asked))
    }) {
        Ok(Answer::Found(Ok(found))) => Found::Device(found),
        Ok(Answer::Found(Err(e)) | Answer::Failed(e)) => Found::Missing(e),
        Ok(Answer::Opened(_) | Answer::Closed) => {
            Found::Missing(call_failed(FINDING, "it answered something else"))
        }
        Err(unanswered) => Found::Unanswered(unanswered),
    }
}

/// Opens the stream of a device found (`build_cpal`), not yet playing, waiting as
/// `call_at_start` does.
pub fn open_at_start(
    found: Negotiated,
    engine: SharedEngine,
    telemetry: Arc<Telemetry>,
    stopping: &dyn Fn() -> bool,
) -> Result<Result<Output, OutputError>, Unanswered> {
    match call_at_start(OPENING, true, stopping, move || {
        Answer::Opened(build_cpal(&found, engine, telemetry))
    })? {
        Answer::Opened(opened) => Ok(opened),
        Answer::Failed(e) => Ok(Err(e)),
        Answer::Found(_) | Answer::Closed => {
            Ok(Err(call_failed(OPENING, "it answered something else")))
        }
    }
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
    /// The device call under way: a stream closing, a try of the device, or start-up's search
    /// or open that did not answer in time.
    call: Option<DeviceCall>,
}

/// A call into the audio host, on a thread of its own.
struct DeviceCall {
    thread: JoinHandle<Answer>,
    /// `closing the lost stream`, `trying the device`, ...
    what: &'static str,
    since: Instant,
    /// Whether a slow call was reported.
    reported: bool,
    /// Whether it opens a stream: one that panicked is then a failed try of the device.
    opens: bool,
}

impl DeviceCall {
    fn spawn(
        what: &'static str,
        opens: bool,
        f: impl FnOnce() -> Answer + Send + 'static,
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
            opens,
        })
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

    fn join(self) -> Answer {
        tracing::debug!("{} took {} ms", self.what, self.since.elapsed().as_millis());
        let (what, opens) = (self.what, self.opens);
        self.thread.join().unwrap_or_else(|_| {
            let e = call_failed(what, "panicked");
            if opens {
                Answer::Opened(Err(e))
            } else {
                Answer::Failed(e)
            }
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
        if let Some(mut call) = self.call.take() {
            if !call.thread.is_finished() {
                call.report_if_slow();
                self.call = Some(call);
                return;
            }
            match call.join() {
                Answer::Opened(tried) => self.tried(tried),
                Answer::Failed(e) => tracing::warn!("{e}"),
                // A search that answered too late: the device is tried again, at this rate.
                Answer::Found(_) | Answer::Closed => {}
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
        let closing = DeviceCall::spawn("closing the device at the stop", false, move || {
            drop(self.current);
            Answer::Closed
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
        match DeviceCall::spawn("closing the lost stream", false, move || {
            drop(gone);
            Answer::Closed
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
        let call = DeviceCall::spawn(TRYING, true, move || {
            Answer::Opened(negotiate(&req).and_then(|n| {
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
