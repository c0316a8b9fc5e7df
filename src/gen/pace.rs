//! Whether a composer keeps up with the music. Live, a source that composes a step more slowly
//! than the music plays one falls further behind each step; its notes come late, then not at
//! all, and the room goes quiet while the model is still, by its own account, running. A kiosk
//! on a slow box meets that as surely as a failing model, so it is treated as one.
//!
//! Two things must hold together before a source is given up: its steps come too late to sound
//! on time, and its own median step takes most of a step's time at the tempo now playing. The
//! median ignores a host stall (one step that took seconds); lateness alone would blame the
//! source for a stall that made every source late. Both must last several windows, so a burst
//! of rollbacks on a source near the line is ridden out.
//!
//! A source given up this way is kept, not dropped: a performer who pushed the tempo up brings
//! it down again, and the model comes back once a step of its would take well under a step's
//! time (`fits`) at the tempo then playing, after `RETRY_AFTER` at least, and twice as long after
//! each time it was given up again in the same scene (`retry_after`), so a tempo or a host that
//! hovers on the line switches composers, and logs it, at most about once an hour after a while;
//! each hour it then keeps up halves that wait again (`Backoff`).
//! Its step is timed again when it may come back (the host may have become quieter).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::STEPS_PER_BEAT;

/// Steps whose decoding time the median is taken over.
const DECODES_KEPT: usize = 32;
/// How often the verdict is reached.
const WINDOW: Duration = Duration::from_secs(2);
/// Windows in a row that must find the source behind and slow.
const STRIKES: u32 = 3;
/// A median step over this share of a step's time leaves too little for rollbacks, which
/// decode the steps ahead again, and for the host's drift.
const LOAD_LIMIT: f64 = 0.8;
/// A source given up is taken back under this share of a step's time...
const RETRY_LOAD: f64 = 0.5;
/// ...and no sooner than this after it was given up the first time...
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
/// ...doubled each time after, up to this many times...
const RETRY_DOUBLINGS: u32 = 7;
/// ...and halved again for each span this long that a source taken back keeps up, so one bad
/// afternoon does not leave a kiosk that runs one scene for months waiting an hour each time.
pub const FORGIVE_AFTER: Duration = Duration::from_secs(3600);
/// Steps of a set-aside source timed, one before each step committed, once it may come back; the
/// fastest counts. The first step after a long rest can take twice its usual time (tract: 105 ms
/// against 43-51), and timing several at once would hold up the commits.
pub const RETIMED_STEPS: u32 = 3;

/// How long a source given up for the `times`-th time (from 1) waits before it may come back,
/// `first` the first time.
pub fn retry_after(first: Duration, times: u32) -> Duration {
    first * 2u32.pow(times.saturating_sub(1).min(RETRY_DOUBLINGS))
}

/// How long a source given up waits before it may come back (see `retry_after`), counting the
/// times it was given up and forgiving one for each `forgive_after` it keeps up once back.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    first: Duration,
    forgive_after: Duration,
    times: u32,
    /// Since when the source taken back has kept up (since it came back, or was last forgiven).
    kept_since: Option<Instant>,
}

impl Backoff {
    pub fn new(first: Duration, forgive_after: Duration) -> Self {
        Self {
            first,
            forgive_after,
            times: 0,
            kept_since: None,
        }
    }

    /// The source was given up again: how long it waits now.
    pub fn given_up(&mut self) -> Duration {
        self.times += 1;
        self.kept_since = None;
        self.wait()
    }

    /// How long a source given up waits, by the times counted now.
    pub fn wait(&self) -> Duration {
        retry_after(self.first, self.times)
    }

    pub fn taken_back(&mut self, now: Instant) {
        self.kept_since = Some(now);
    }

    /// The source taken back still keeps up at `now`.
    pub fn keeping_up(&mut self, now: Instant) {
        if let Some(since) = self.kept_since {
            if self.times > 0 && now.duration_since(since) >= self.forgive_after {
                self.times -= 1;
                self.kept_since = Some(now);
            }
        }
    }
}

/// A step's time at `bpm`, in seconds.
pub fn step_time(bpm: f64) -> f64 {
    60.0 / (bpm.max(1.0) * STEPS_PER_BEAT as f64)
}

/// The time under which a source's step keeps up at `bpm` with room to spare.
pub fn fit_limit(bpm: f64) -> Duration {
    Duration::from_secs_f64(RETRY_LOAD * step_time(bpm))
}

/// Whether a source whose median step is `median` would keep up at `bpm` with room to spare.
pub fn fits(median: Duration, bpm: f64) -> bool {
    median < fit_limit(bpm)
}

/// The fastest tempo, in BPM, at which a source whose median step is `median` `fits`.
pub fn fastest_fitting(median: Duration) -> f64 {
    RETRY_LOAD * 60.0 / (STEPS_PER_BEAT as f64 * median.as_secs_f64().max(1e-9))
}

/// A source that could not keep up: why, and its median step then.
#[derive(Debug)]
pub struct Behind {
    pub why: String,
    pub median: Duration,
}

/// Watches one source's decoding against the tempo.
#[derive(Debug)]
pub struct Pace {
    decodes: VecDeque<Duration>,
    window_start: Option<Instant>,
    late_in_window: u32,
    late_in_strikes: u32,
    strikes: u32,
    /// When the first window of the strikes now counted began.
    strikes_since: Option<Instant>,
}

impl Default for Pace {
    fn default() -> Self {
        Self::new()
    }
}

impl Pace {
    pub fn new() -> Self {
        Self {
            decodes: VecDeque::with_capacity(DECODES_KEPT),
            window_start: None,
            late_in_window: 0,
            late_in_strikes: 0,
            strikes: 0,
            strikes_since: None,
        }
    }

    /// One step's decoding took `took`.
    pub fn decoded(&mut self, took: Duration) {
        if self.decodes.len() == DECODES_KEPT {
            self.decodes.pop_front();
        }
        self.decodes.push_back(took);
    }

    /// A step was committed after its own beat had passed.
    pub fn late(&mut self) {
        self.late_in_window += 1;
    }

    /// The median of the recent steps' decoding.
    pub fn median(&self) -> Option<Duration> {
        let mut d: Vec<Duration> = self.decodes.iter().copied().collect();
        if d.is_empty() {
            return None;
        }
        d.sort_unstable();
        Some(d[d.len() / 2])
    }

    /// Once a window has passed: why the source cannot keep up at `bpm`, once it has been behind
    /// and slow for `STRIKES` windows in a row; `None` otherwise.
    pub fn verdict(&mut self, now: Instant, bpm: f64) -> Option<Behind> {
        let start = *self.window_start.get_or_insert(now);
        if now.duration_since(start) < WINDOW {
            return None;
        }
        self.window_start = Some(now);
        let late = std::mem::take(&mut self.late_in_window);
        let since = *self.strikes_since.get_or_insert(start);
        let step = step_time(bpm);
        let median = self.median()?;
        let load = median.as_secs_f64() / step;
        if late == 0 || load < LOAD_LIMIT {
            self.strikes = 0;
            self.late_in_strikes = 0;
            self.strikes_since = None;
            return None;
        }
        self.strikes += 1;
        self.late_in_strikes += late;
        (self.strikes >= STRIKES).then(|| Behind {
            median,
            why: format!(
                "a step takes {:.1} ms (the median of the last {}), and at \
                 {bpm:.0} BPM the music needs one every {:.1} ms; {} steps came after their time \
                 in the last {} s",
                median.as_secs_f64() * 1e3,
                self.decodes.len(),
                step * 1e3,
                self.late_in_strikes,
                now.duration_since(since).as_secs_f64().round(),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, s: f64) -> Instant {
        start + Duration::from_secs_f64(s)
    }

    /// Windows of 8 steps at 120 BPM (a step is 125 ms), each step decoded in `decode_ms`, one
    /// of them late where `late(window)`: the window that gives the source up, if one does.
    fn run(decode_ms: u64, late: impl Fn(u32) -> bool) -> (Option<u32>, Option<String>) {
        let start = Instant::now();
        let mut pace = Pace::new();
        assert!(
            pace.verdict(start, 120.0).is_none(),
            "the first call opens a window"
        );
        for w in 1..=12 {
            for _ in 0..8 {
                pace.decoded(Duration::from_millis(decode_ms));
            }
            if late(w) {
                pace.late();
            }
            if let Some(behind) = pace.verdict(at(start, 2.0 * w as f64), 120.0) {
                assert_eq!(behind.median, Duration::from_millis(decode_ms));
                return (Some(w), Some(behind.why));
            }
        }
        (None, None)
    }

    #[test]
    fn a_source_behind_and_slow_is_given_up_after_three_windows() {
        let (window, why) = run(110, |_| true);
        assert_eq!(window, Some(3));
        let why = why.unwrap();
        assert!(why.contains("110.0 ms"), "{why}");
        assert!(why.contains("every 125.0 ms"), "{why}");
        assert!(why.contains("120 BPM"), "{why}");
        assert!(
            why.contains("3 steps came after their time in the last 6 s"),
            "{why}"
        );
    }

    #[test]
    fn lateness_from_a_stall_is_not_the_sources_fault() {
        // Late steps in every window, but the source's median step is 5 ms of the 125.
        assert_eq!(run(5, |_| true).0, None);
        // A step that took seconds does not move the median.
        let mut pace = Pace::new();
        pace.decoded(Duration::from_secs(3));
        for _ in 0..8 {
            pace.decoded(Duration::from_millis(5));
        }
        assert_eq!(pace.median(), Some(Duration::from_millis(5)));
    }

    #[test]
    fn a_slow_source_that_stays_on_time_is_kept() {
        assert_eq!(run(110, |_| false).0, None);
    }

    #[test]
    fn one_window_on_time_starts_the_count_again() {
        assert_eq!(run(110, |w| w % 3 != 0).0, None);
        assert_eq!(run(110, |w| w > 3).0, Some(6));
    }

    #[test]
    fn no_verdict_before_a_step_was_decoded() {
        let start = Instant::now();
        let mut pace = Pace::new();
        pace.late();
        assert!(pace.verdict(start, 120.0).is_none());
        assert!(pace.verdict(at(start, 2.5), 120.0).is_none());
        assert_eq!(pace.median(), None);
    }

    #[test]
    fn each_time_a_source_is_given_up_it_waits_twice_as_long_up_to_an_hour() {
        let waits: Vec<u64> = (1..=10)
            .map(|n| retry_after(RETRY_AFTER, n).as_secs())
            .collect();
        assert_eq!(waits, [30, 60, 120, 240, 480, 960, 1920, 3840, 3840, 3840]);
    }

    #[test]
    fn each_span_kept_up_forgives_one_give_up() {
        let start = Instant::now();
        let hour = Duration::from_secs(3600);
        let mut b = Backoff::new(RETRY_AFTER, hour);
        assert_eq!(b.wait(), RETRY_AFTER);
        // Keeping up before anything was given up forgives nothing.
        b.keeping_up(at(start, 7200.0));
        assert_eq!(b.given_up().as_secs(), 30);
        assert_eq!(b.given_up().as_secs(), 60);
        assert_eq!(b.given_up().as_secs(), 120);
        // Parked: no span kept up has begun.
        b.keeping_up(at(start, 9000.0));
        assert_eq!(b.wait().as_secs(), 120);
        b.taken_back(at(start, 10_000.0));
        b.keeping_up(at(start, 10_000.0 + 3599.0));
        assert_eq!(b.wait().as_secs(), 120);
        b.keeping_up(at(start, 10_000.0 + 3600.0));
        assert_eq!(b.wait().as_secs(), 60);
        // The next hour is counted from then, not from when it came back.
        b.keeping_up(at(start, 10_000.0 + 7000.0));
        assert_eq!(b.wait().as_secs(), 60);
        b.keeping_up(at(start, 10_000.0 + 7200.0));
        assert_eq!(b.wait().as_secs(), 30);
        // Given up again: counted from where forgiveness left it, and the hour starts over
        // only once it is back.
        assert_eq!(b.given_up().as_secs(), 60);
        b.keeping_up(at(start, 30_000.0));
        assert_eq!(b.wait().as_secs(), 60);
        b.taken_back(at(start, 30_000.0));
        b.keeping_up(at(start, 40_000.0));
        b.keeping_up(at(start, 50_000.0));
        assert_eq!(b.wait().as_secs(), 30);
        b.keeping_up(at(start, 60_000.0));
        assert_eq!(b.wait().as_secs(), 30, "never below the first wait");
    }

    #[test]
    fn a_source_fits_under_half_a_step() {
        // 120 BPM: 125 ms a step.
        assert!(fits(Duration::from_millis(62), 120.0));
        assert!(!fits(Duration::from_millis(63), 120.0));
        // 300 BPM: 50 ms.
        assert!(!fits(Duration::from_millis(49), 300.0));
        assert!(fits(Duration::from_millis(24), 300.0));
    }

    #[test]
    fn the_fastest_fitting_tempo_is_where_fits_turns() {
        // Half of a 50 ms step: 300 BPM.
        assert!((fastest_fitting(Duration::from_millis(25)) - 300.0).abs() < 1e-9);
        for ms in [0.3, 4.0, 49.0, 230.0] {
            let median = Duration::from_secs_f64(ms / 1e3);
            let bpm = fastest_fitting(median);
            assert!(fits(median, bpm * 0.99), "{ms} ms at {bpm}");
            assert!(!fits(median, bpm * 1.01), "{ms} ms at {bpm}");
        }
    }
}
