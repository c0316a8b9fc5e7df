//! Keeps the room playing whatever happens to the sound card. When the device goes (a USB card
//! pulled, the JACK server gone, a stream that stops calling back) the null output takes the
//! engine at once, so the clock, the composer and OSC carry on; the device is tried again with
//! a growing pause, and when it answers at the engine's rate the engine moves back to it. One
//! that answers at another rate cannot take a graph built for this one: under a service manager
//! the engine then stops to be started again at the device's rate (`restart_for`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{negotiate, start_cpal, NullOutput, Output, OutputRequest, SharedEngine};
use crate::audio::Telemetry;

const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(8);
/// A device stream whose clock has not moved for this long is treated as gone, whether or not
/// the host said so: some drivers block instead of reporting an unplugged card.
const STALL: Duration = Duration::from_millis(1500);
/// A lost stream still closing after this long is reported, once.
const SLOW_CLOSE: Duration = Duration::from_secs(5);

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
    /// What alsa-lib says as devices are tried, logged at debug level instead of on stderr.
    alsa_errors: Option<super::AlsaErrors>,
    /// The lost stream, closing on a thread of its own.
    closing: Option<Closing>,
}

struct Closing {
    thread: std::thread::JoinHandle<()>,
    since: Instant,
    /// Whether a slow close was reported.
    reported: bool,
}

impl Supervisor {
    /// Takes over an output already started (or the null output when the device was missing at
    /// start-up, in which case the device is looked for again from the first poll).
    pub fn new(
        request: Option<OutputRequest>,
        current: Output,
        engine: SharedEngine,
        telemetry: Arc<Telemetry>,
        sample_rate: u32,
        frames: u32,
    ) -> Self {
        let on_device = matches!(current, Output::Cpal { .. });
        telemetry.on_device.store(on_device, Relaxed);
        let clock = telemetry.sample_clock.load(Relaxed);
        Supervisor {
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
            closing: None,
        }
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

    /// Call often (every few tens of milliseconds) from the thread that owns the streams.
    pub fn poll(&mut self) {
        if let Some(e) = &mut self.alsa_errors {
            e.drain();
        }
        let now = Instant::now();
        let clock = self.telemetry.sample_clock.load(Relaxed);
        if clock != self.clock_seen.0 {
            self.clock_seen = (clock, now);
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
                if self.request.is_some() && now >= self.next_try && self.lost_stream_closed() {
                    self.try_device();
                }
            }
        }
    }

    fn fall_back(&mut self, why: &str) {
        self.telemetry.device_losses.fetch_add(1, Relaxed);
        self.telemetry.on_device.store(false, Relaxed);
        let gone = std::mem::replace(
            &mut self.current,
            Output::Null(NullOutput::start(
                self.engine.clone(),
                self.telemetry.clone(),
                self.sample_rate,
                self.frames,
            )),
        );
        tracing::warn!(
            "audio device lost ({why}): playing on against the null output, retrying from {} ms",
            FIRST_RETRY.as_millis()
        );
        // Closing a dead stream can take a while (JACK waits for its server); the null output
        // is already running, so the room does not wait with it.
        match std::thread::Builder::new()
            .name("close-lost-stream".into())
            .spawn(move || drop(gone))
        {
            Ok(thread) => {
                self.closing = Some(Closing {
                    thread,
                    since: Instant::now(),
                    reported: false,
                })
            }
            Err(e) => tracing::warn!("closing the lost stream: {e}"),
        }
        self.backoff = FIRST_RETRY;
        self.next_try = Instant::now() + FIRST_RETRY;
        self.last_failure = None;
    }

    /// Whether the lost stream has closed. The device is not opened again before: JACK (libjack
    /// and the `jack` crate) opens and closes clients under one process-wide lock, so an open
    /// would wait on this thread for the close, and would share the library's state for the
    /// server that went with a client of the server that came back.
    fn lost_stream_closed(&mut self) -> bool {
        let Some(closing) = &mut self.closing else {
            return true;
        };
        if !closing.thread.is_finished() {
            if !closing.reported && closing.since.elapsed() >= SLOW_CLOSE {
                closing.reported = true;
                tracing::warn!(
                    "the lost audio stream has not closed in {} s; the device is tried again \
                     once it has",
                    SLOW_CLOSE.as_secs()
                );
            }
            return false;
        }
        if let Some(closing) = self.closing.take() {
            let took = closing.since.elapsed();
            if closing.thread.join().is_err() {
                tracing::warn!("closing the lost audio stream panicked");
            }
            tracing::debug!("the lost audio stream closed in {} ms", took.as_millis());
        }
        true
    }

    fn try_device(&mut self) {
        let Some(req) = &self.request else { return };
        let req = OutputRequest {
            sample_rate: Some(self.sample_rate),
            ..req.clone()
        };
        let attempt = negotiate(&req).and_then(|n| {
            if n.sample_rate != self.sample_rate {
                let message = format!(
                    "offers {} Hz, and the engine runs at {} Hz",
                    n.sample_rate, self.sample_rate
                );
                if self.restart_on_rate {
                    self.restart_for = Some(format!(
                        "audio device {} is back but {message}: stopping, to be started again \
                         at its rate",
                        n.name
                    ));
                }
                return Err(super::OutputError::Device {
                    device: n.name.clone(),
                    message: format!("{message}; restart the engine to play on it"),
                });
            }
            start_cpal(&n, self.engine.clone(), self.telemetry.clone())
        });
        match attempt {
            Ok(output) => {
                // The null output stops (joins its thread) as it is replaced; from here the
                // device's callback drives the engine.
                self.current = output;
                self.telemetry.on_device.store(true, Relaxed);
                self.clock_seen = (self.telemetry.sample_clock.load(Relaxed), Instant::now());
                self.backoff = FIRST_RETRY;
                self.last_failure = None;
                tracing::info!("audio device back: playing on {}", self.current.describe());
            }
            Err(e) => {
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
