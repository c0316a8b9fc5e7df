//! systemd's watchdog (`WatchdogSec=`), fed only while the engine is whole: the audio clock
//! moves, and every thread the room depends on goes round its loop. A thread stuck inside one
//! call (a model that never returns, a bug that holds the main thread) stops the pings, and
//! systemd restarts the engine; before, the clock kept moving and the room played on without
//! its composer until someone came.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::session::Conductor;
use crate::systemd::Notifier;

/// The threads the watchdog vouches for besides the one that feeds it. Each marks every turn
/// of its loop.
pub struct Heartbeats {
    since: Instant,
    turns: Vec<(&'static str, AtomicU64)>,
}

impl Heartbeats {
    pub fn new(names: &[&'static str]) -> Arc<Self> {
        Arc::new(Heartbeats {
            since: Instant::now(),
            turns: names.iter().map(|&n| (n, AtomicU64::new(0))).collect(),
        })
    }

    /// Thread `i` (in the order named) went round its loop.
    pub fn turn(&self, i: usize) {
        if let Some((_, t)) = self.turns.get(i) {
            t.store(self.since.elapsed().as_millis() as u64, Relaxed);
        }
    }

    /// The first thread that has not gone round for longer than `within`, and for how long.
    fn stalled(&self, within: Duration) -> Option<(&'static str, Duration)> {
        let now = self.since.elapsed();
        self.turns.iter().find_map(|(name, t)| {
            let idle = now.saturating_sub(Duration::from_millis(t.load(Relaxed)));
            (idle > within).then_some((*name, idle))
        })
    }
}

/// Feeds systemd's watchdog while the engine is whole, and keeps the unit's status line
/// current.
pub struct Watchdog {
    interval: Option<Duration>,
    last: Instant,
    last_clock: u64,
    hearts: Arc<Heartbeats>,
}

impl Watchdog {
    pub fn new(n: &Notifier, hearts: Arc<Heartbeats>) -> Self {
        Watchdog {
            interval: n.watchdog_interval(),
            last: Instant::now(),
            last_clock: 0,
            hearts,
        }
    }

    pub fn feed(&mut self, n: &Notifier, c: &Conductor) {
        let every = self.interval.unwrap_or(Duration::from_secs(10));
        if !n.is_enabled() || self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let clock = c.now_sample();
        let t = &c.telemetry;
        let _ = n.status(&format!(
            "scene {}, {} notes, {} xruns, source {}",
            c.scene.name,
            t.notes_played.load(Relaxed),
            t.xruns.load(Relaxed),
            c.source_name.lock().map(|s| s.clone()).unwrap_or_default()
        ));
        let clock_moved = clock > self.last_clock;
        self.last_clock = clock;
        if self.interval.is_none() {
            return;
        }
        // A whole period (twice the ping interval) without a turn: stuck, not slow.
        if let Some((name, idle)) = self.hearts.stalled(2 * every) {
            tracing::error!(
                "the {name} thread has not gone round its loop for {:.1} s: no watchdog ping, \
                 so that systemd restarts the engine",
                idle.as_secs_f64()
            );
        } else if clock_moved {
            let _ = n.watchdog();
        } else {
            tracing::error!("the audio clock has not moved since the last watchdog ping");
        }
    }
}

/// Whether `thread` has finished, waiting at most `within` for it: a stop that must not wait
/// on a thread stuck in a call looks with this before it joins.
pub fn finished_within<T>(thread: &std::thread::JoinHandle<T>, within: Duration) -> bool {
    finished_within_unless(thread, within, || false)
}

/// As `finished_within`, but it stops waiting as soon as `give_up` says so.
pub fn finished_within_unless<T>(
    thread: &std::thread::JoinHandle<T>,
    within: Duration,
    give_up: impl Fn() -> bool,
) -> bool {
    let deadline = Instant::now() + within;
    while !thread.is_finished() && Instant::now() < deadline && !give_up() {
        std::thread::sleep(Duration::from_millis(10));
    }
    thread.is_finished()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_stops_turning_is_named() {
        let hearts = Heartbeats::new(&["composer", "main"]);
        hearts.turn(0);
        hearts.turn(1);
        assert_eq!(hearts.stalled(Duration::from_millis(200)), None);
        std::thread::sleep(Duration::from_millis(300));
        hearts.turn(1);
        let (name, idle) = hearts.stalled(Duration::from_millis(200)).unwrap();
        assert_eq!(name, "composer");
        assert!(idle >= Duration::from_millis(300), "{idle:?}");
    }
}
