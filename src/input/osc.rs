//! The OSC receiver thread: a UDP socket, decode and dispatch, and a bounded channel to the
//! control loop. Refused messages are counted and logged at most once a second; a full channel
//! is counted too, never silently dropped.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use nannou_osc::rosc::OscTime;

use super::access::Access;
use super::dispatch::{self, Clock};
use super::log::LogWriter;
use super::InputEvent;
use super::{TimedEvent, When};
use crate::audio::{LiveNote, Telemetry};

/// Counters for the wire, shared with `/roomscore/status`.
#[derive(Default, Debug)]
pub struct OscStats {
    pub packets: AtomicU64,
    pub messages: AtomicU64,
    /// Undecodable packets, unknown addresses, wrong types, bad values.
    pub invalid: AtomicU64,
    /// Good messages the control loop had no room for.
    pub dropped: AtomicU64,
    /// Messages from senders outside the allow lists.
    pub denied: AtomicU64,
    /// Timed inputs waiting in the control loop for their time, as it last said.
    pub scheduled: AtomicUsize,
}

/// Timed inputs held for later at most: every control tick looks through them, and a sender
/// that floods the engine with bundles (a minute ahead at most, see
/// `dispatch::MAX_AHEAD_SECONDS`) must not grow that without bound. Those beyond are dropped
/// here, before the input log, and counted. (The control loop may hold a few more: those
/// already in the channel, 4,096 at most, as the count reaches it.)
pub const MAX_SCHEDULED: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum OscError {
    #[error("OSC: cannot listen on {addr}: {source} (is another roomscore, or another program, using that port?)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub fn bind(addr: SocketAddr) -> Result<UdpSocket, OscError> {
    let socket = UdpSocket::bind(addr).map_err(|source| OscError::Bind { addr, source })?;
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|source| OscError::Bind { addr, source })?;
    Ok(socket)
}

/// Maps OSC time tags onto the sample clock, from the audio thread's latest callback.
pub struct LiveClock {
    pub telemetry: Arc<Telemetry>,
    pub sample_rate: f64,
}

impl LiveClock {
    /// The sample playing now, estimated from the last callback's clock and time.
    pub fn now_sample(&self) -> u64 {
        self.telemetry.sample_clock.load(Relaxed)
    }
}

impl Clock for LiveClock {
    fn sample_for(&self, tag: OscTime) -> Option<u64> {
        // The tag 0x0000000000000001 means "immediately".
        if tag.seconds == 0 && tag.fractional <= 1 {
            return None;
        }
        let when = crate::clock::ntp_to_unix_ns(tag.seconds, tag.fractional);
        let delay = self.telemetry.output_delay.load(Relaxed) as u64;
        match self.telemetry.anchor.sample_at(when, self.sample_rate) {
            Some(s) => Some(s.saturating_sub(delay)),
            // Before the first buffer: from the clock as it stands.
            None => {
                let ahead = when - crate::clock::unix_ns(SystemTime::now());
                let s = self.now_sample() as f64 + ahead as f64 * self.sample_rate / 1e9;
                Some(s.max(0.0) as u64)
            }
        }
    }

    fn seconds_ahead(&self, sample: u64) -> f64 {
        (sample as f64 - self.now_sample() as f64) / self.sample_rate
    }
}

pub struct OscThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl OscThread {
    pub fn spawn(
        socket: UdpSocket,
        clock: LiveClock,
        tx: crossbeam_channel::Sender<TimedEvent>,
        stats: Arc<OscStats>,
        access: Access,
        mut log: Option<LogWriter>,
        mut lane: Option<rtrb::Producer<LiveNote>>,
    ) -> Result<OscThread, OscError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("osc-in".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65_536];
                let mut events = Vec::new();
                let mut errors = Vec::new();
                let mut last_warn = Instant::now() - Duration::from_secs(2);
                let mut unreported = 0u64;
                let mut last_denied_warn = Instant::now() - Duration::from_secs(2);
                while !stop2.load(Relaxed) {
                    let (len, from) = match socket.recv_from(&mut buf) {
                        Ok(r) => r,
                        Err(_) => continue,
                    };
                    stats.packets.fetch_add(1, Relaxed);
                    // A sender outside the allow list never reaches the decoder.
                    if !access.sensors.allows(from.ip()) {
                        stats.denied.fetch_add(1, Relaxed);
                        if last_denied_warn.elapsed() >= Duration::from_secs(1) {
                            tracing::warn!("OSC: refused a packet from {from}: not in --osc-allow");
                            last_denied_warn = Instant::now();
                        }
                        continue;
                    }
                    events.clear();
                    errors.clear();
                    // The fuzzer holds this path to "no panic"; should one slip through anyway,
                    // it costs one packet, not the room's only ear.
                    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        dispatch::dispatch_packet(
                            &buf[..len],
                            from,
                            &clock,
                            &mut events,
                            &mut errors,
                        )
                    }));
                    if decoded.is_err() {
                        events.clear();
                        errors.clear();
                        errors.push(dispatch::DispatchError::Decode(
                            "the decoder panicked on this packet".into(),
                        ));
                    }
                    for ev in events.drain(..) {
                        stats.messages.fetch_add(1, Relaxed);
                        if let Err(denied) = access.check(from.ip(), event_address(&ev.event)) {
                            stats.denied.fetch_add(1, Relaxed);
                            if last_denied_warn.elapsed() >= Duration::from_secs(1) {
                                tracing::warn!("{denied}");
                                last_denied_warn = Instant::now();
                            }
                            continue;
                        }
                        // Logged only once it is on its way: a message dropped here (a full
                        // queue, or too many waiting for their time) was never heard, so a
                        // replay must not hear it either.
                        let line = log.as_ref().and_then(|_| loggable(&ev));
                        let (now, when) = (clock.now_sample(), ev.when);
                        let note = match (ev.when, &ev.event) {
                            (When::Now, InputEvent::Note { pitch, velocity }) => {
                                Some(LiveNote::new(*pitch, *velocity))
                            }
                            _ => None,
                        };
                        // What the control loop holds for later: a note only until its lead.
                        let lead = match ev.event {
                            InputEvent::Note { .. } => crate::session::note_lead(clock.sample_rate),
                            _ => 0,
                        };
                        let for_later = matches!(ev.when, When::Sample(s) if s > now + lead);
                        let sent = match (&mut lane, note) {
                            // An immediate note goes straight to the audio thread: through the
                            // control loop it would wait for that thread to wake as well.
                            (Some(lane), Some(note)) => lane.push(note).is_ok(),
                            _ if for_later && stats.scheduled.load(Relaxed) >= MAX_SCHEDULED => {
                                false
                            }
                            // Disconnected means the control loop has stopped (shutdown):
                            // nothing is lost that anyone would still hear.
                            _ => !matches!(
                                tx.try_send(ev),
                                Err(crossbeam_channel::TrySendError::Full(_))
                            ),
                        };
                        if !sent {
                            stats.dropped.fetch_add(1, Relaxed);
                            continue;
                        }
                        if let (Some(w), Some(line)) = (&mut log, line) {
                            // A tag already past is applied on arrival, and logged then: at
                            // the tag's time, a replay would apply it before inputs it came
                            // after.
                            let t = match when {
                                When::Sample(s) => s.max(now),
                                When::Now => now,
                            } as f64
                                / clock.sample_rate;
                            if let Err(e) = w.write(t, &line) {
                                // The event itself still plays.
                                tracing::error!("input log: {e}; logging stops");
                                log = None;
                            }
                        }
                    }
                    if !errors.is_empty() {
                        stats.invalid.fetch_add(errors.len() as u64, Relaxed);
                        unreported += errors.len() as u64;
                        if last_warn.elapsed() >= Duration::from_secs(1) {
                            tracing::warn!(
                                from = %from,
                                "OSC: refused {unreported} message(s); latest: {}",
                                errors[0]
                            );
                            last_warn = Instant::now();
                            unreported = 0;
                        }
                    }
                }
            })
            .expect("spawn OSC thread");
        Ok(OscThread {
            stop,
            thread: Some(thread),
        })
    }
}

/// The OSC address an event came in on, for the allow lists.
pub fn event_address(ev: &InputEvent) -> &'static str {
    match ev {
        InputEvent::Movement(_) => "/roomscore/movement",
        InputEvent::Mood { .. } => "/roomscore/mood",
        InputEvent::Presence(_) => "/roomscore/presence",
        InputEvent::Scene(_) => "/roomscore/scene",
        InputEvent::Tempo(_) => "/roomscore/tempo",
        InputEvent::Volume(_) => "/roomscore/volume",
        InputEvent::Note { .. } => "/roomscore/note",
        InputEvent::Named(..) => "/roomscore/in/",
        InputEvent::Status(_) => "/roomscore/status",
    }
}

/// The message behind an event, for the input log (status requests are not replayed).
fn loggable(ev: &TimedEvent) -> Option<nannou_osc::rosc::OscMessage> {
    use super::InputEvent as E;
    use nannou_osc::rosc::{OscMessage, OscType as T};
    let (addr, args) = match &ev.event {
        E::Movement(v) => ("/roomscore/movement".to_string(), vec![T::Float(*v)]),
        E::Mood { valence, arousal } => (
            "/roomscore/mood".to_string(),
            vec![T::Float(*valence), T::Float(*arousal)],
        ),
        E::Presence(n) => ("/roomscore/presence".to_string(), vec![T::Int(*n)]),
        E::Scene(s) => ("/roomscore/scene".to_string(), vec![T::String(s.clone())]),
        E::Tempo(b) => ("/roomscore/tempo".to_string(), vec![T::Float(*b)]),
        E::Volume(v) => ("/roomscore/volume".to_string(), vec![T::Float(*v)]),
        E::Note { pitch, velocity } => (
            "/roomscore/note".to_string(),
            vec![T::Int(*pitch as i32), T::Int(*velocity as i32)],
        ),
        E::Named(n, v) => (format!("/roomscore/in/{n}"), vec![T::Float(*v)]),
        E::Status(_) => return None,
    };
    Some(OscMessage { addr, args })
}

impl Drop for OscThread {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
