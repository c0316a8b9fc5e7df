//! Where a sample is in time. The audio thread publishes, once a buffer, which sample the buffer
//! starts with and when that sample reaches the output, on the system's monotonic clock; the OSC
//! thread turns a time tag (wall-clock, NTP) into a sample through it. Anchoring on the host's
//! own timestamps, refreshed every buffer, keeps tagged notes on their sample without drift, and
//! puts them back on it at the first buffer after an xrun.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The kernel clocks hosts stamp buffers with: ALSA's are `CLOCK_MONOTONIC` by default, JACK2's
/// `CLOCK_MONOTONIC_RAW`. The two part by the NTP correction (tens of ppm), which is a
/// hundred milliseconds after an hour of uptime, so the anchor says which one it is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timebase {
    Monotonic,
    MonotonicRaw,
}

impl Timebase {
    fn id(self) -> libc::clockid_t {
        match self {
            Timebase::Monotonic => libc::CLOCK_MONOTONIC,
            Timebase::MonotonicRaw => libc::CLOCK_MONOTONIC_RAW,
        }
    }

    /// Nanoseconds on this clock now.
    pub fn now_ns(self) -> u64 {
        clock_ns(self.id())
    }
}

/// Nanoseconds on kernel clock `id` now: one of the clocks every Linux has (the monotonic ones,
/// or a thread's CPU time).
pub fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; callers name clocks every Linux has.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Seconds from the NTP epoch (1900) to the Unix epoch (1970).
const NTP_TO_UNIX: i128 = 2_208_988_800;

/// An NTP time stamp (an OSC time tag: seconds since 1900 and a 32-bit fraction) as signed
/// nanoseconds since the Unix epoch. Total: tags before 1970 are simply negative, where the
/// standard library's `SystemTime` arithmetic (and rosc's conversion into it) would panic.
pub fn ntp_to_unix_ns(seconds: u32, fraction: u32) -> i128 {
    (seconds as i128 - NTP_TO_UNIX) * 1_000_000_000 + ((fraction as i128 * 1_000_000_000) >> 32)
}

/// A wall-clock time as signed nanoseconds since the Unix epoch.
pub fn unix_ns(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

/// The time on `clock` of a wall-clock instant (nanoseconds since the Unix epoch), read
/// against both clocks now.
pub fn wall_to(clock: Timebase, unix_ns_then: i128) -> i128 {
    let on_clock = clock.now_ns() as i128;
    let wall = unix_ns(SystemTime::now());
    on_clock + unix_ns_then - wall
}

/// A host timestamp this close to one of the kernel clocks is taken to be on it; otherwise
/// (cpal's ALSA host counts from the stream's creation) it is re-based on the clock read now.
const SAME_CLOCK: Duration = Duration::from_millis(50);

/// When a buffer reaches the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlaysAt {
    pub ns: u64,
    pub clock: Timebase,
    /// The host's own timestamp (JACK's are filtered by its DLL), so successive ones also give
    /// the device's true sample rate; `false` when re-based on a clock read in the callback.
    pub host_stamped: bool,
}

impl PlaysAt {
    /// Now on `clock`, for outputs with no timestamps of their own.
    pub fn now(clock: Timebase) -> PlaysAt {
        PlaysAt {
            ns: clock.now_ns(),
            clock,
            host_stamped: false,
        }
    }
}

/// When the buffer being rendered now reaches the output, and on which clock, from the host's
/// `callback` and `playback` timestamps (nanoseconds, any epoch).
pub fn playback_time(host_callback_ns: u64, host_playback_ns: u64) -> PlaysAt {
    let ahead = host_playback_ns.saturating_sub(host_callback_ns);
    let mut best = (u64::MAX, Timebase::Monotonic, 0);
    for clock in [Timebase::MonotonicRaw, Timebase::Monotonic] {
        let now = clock.now_ns();
        let off = now.abs_diff(host_callback_ns);
        if off < best.0 {
            best = (off, clock, now);
        }
    }
    let (off, clock, now) = best;
    if off < SAME_CLOCK.as_nanos() as u64 {
        PlaysAt {
            ns: host_playback_ns,
            clock,
            host_stamped: true,
        }
    } else {
        PlaysAt {
            ns: now + ahead,
            clock,
            host_stamped: false,
        }
    }
}

/// Minutes after local midnight now, in the box's time zone (`TZ`, else /etc/localtime).
pub fn local_minute() -> u32 {
    // SAFETY: `time(NULL)` only returns; `localtime_r` writes into the `tm` we own.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return ((t / 60) % 1440) as u32;
        }
        (tm.tm_hour * 60 + tm.tm_min) as u32
    }
}

/// A measured rate further than this from the nominal one is a skipped cycle, not the device.
const RATE_TOLERANCE: f64 = 0.02;

/// One sample's time, written by the audio thread and read by anyone, without locks: a
/// sequence lock over two numbers (one writer; readers retry the rare torn read).
#[derive(Debug, Default)]
pub struct Anchor {
    seq: AtomicU64,
    sample: AtomicU64,
    nanos: AtomicU64,
    raw: AtomicBool,
    /// Nanoseconds per sample as the host's stamps measure it (f64 bits); 0 for nominal.
    ns_per_sample: AtomicU64,
    /// The writer's previous anchor, for the rate.
    last_sample: AtomicU64,
    last_nanos: AtomicU64,
}

impl Anchor {
    /// Audio thread only.
    pub fn store(&self, sample: u64, at: PlaysAt, sample_rate: f64) {
        let PlaysAt {
            ns: nanos, clock, ..
        } = at;
        let (ls, ln) = (
            self.last_sample.load(Ordering::Relaxed),
            self.last_nanos.load(Ordering::Relaxed),
        );
        let nominal = 1e9 / sample_rate;
        let rate = if at.host_stamped && sample > ls && nanos > ln && ln != 0 {
            let r = (nanos - ln) as f64 / (sample - ls) as f64;
            ((r / nominal - 1.0).abs() < RATE_TOLERANCE).then_some(r)
        } else {
            None
        };
        self.last_sample.store(sample, Ordering::Relaxed);
        self.last_nanos.store(nanos, Ordering::Relaxed);
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.sample.store(sample, Ordering::Relaxed);
        self.nanos.store(nanos, Ordering::Relaxed);
        self.raw
            .store(clock == Timebase::MonotonicRaw, Ordering::Relaxed);
        self.ns_per_sample
            .store(rate.unwrap_or(0.0).to_bits(), Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// The latest (sample, nanoseconds, on which clock, measured nanoseconds per sample or 0),
    /// or `None` before the first buffer.
    pub fn load(&self) -> Option<(u64, u64, Timebase, f64)> {
        loop {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let sample = self.sample.load(Ordering::Relaxed);
            let nanos = self.nanos.load(Ordering::Relaxed);
            let clock = if self.raw.load(Ordering::Relaxed) {
                Timebase::MonotonicRaw
            } else {
                Timebase::Monotonic
            };
            let rate = f64::from_bits(self.ns_per_sample.load(Ordering::Relaxed));
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return (s1 != 0).then_some((sample, nanos, clock, rate));
            }
        }
    }

    /// The sample that reaches the output at wall-clock time `t` (nanoseconds since the Unix
    /// epoch): counted from the latest anchor at the device's measured rate where the host
    /// stamps buffers, else the nominal one.
    pub fn sample_at(&self, t: i128, sample_rate: f64) -> Option<u64> {
        let (sample, nanos, clock, ns_per_sample) = self.load()?;
        let per = if ns_per_sample > 0.0 {
            ns_per_sample
        } else {
            1e9 / sample_rate
        };
        let s = sample as f64 + (wall_to(clock, t) - nanos as i128) as f64 / per;
        // Saturating float-to-int casts: any tag, however far off, gives some sample.
        Some(s.round().max(0.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_maps_to_its_sample_through_the_anchor() {
        let a = Anchor::default();
        let now = unix_ns(SystemTime::now());
        assert_eq!(a.sample_at(now, 48_000.0), None);
        let t0 = Timebase::Monotonic.now_ns() + 1_000_000_000;
        let at = PlaysAt {
            ns: t0,
            clock: Timebase::Monotonic,
            host_stamped: false,
        };
        a.store(48_000, at, 48_000.0);
        assert_eq!(a.load(), Some((48_000, t0, Timebase::Monotonic, 0.0)));
        // The anchored sample plays a second from now; 10 ms after that is 480 samples later.
        let at = now + 1_010_000_000;
        let s = a.sample_at(at, 48_000.0).unwrap() as i64;
        assert!((s - 48_480).abs() <= 2, "{s}");
    }

    #[test]
    fn wall_clock_times_land_on_each_kernel_clock() {
        for clock in [Timebase::Monotonic, Timebase::MonotonicRaw] {
            let later = unix_ns(SystemTime::now() + Duration::from_millis(50));
            let ahead = wall_to(clock, later) - clock.now_ns() as i128;
            assert!(
                (40_000_000..=50_000_000).contains(&ahead),
                "{clock:?} {ahead}"
            );
        }
    }

    #[test]
    fn host_timestamps_are_placed_on_their_clock_or_rebased() {
        // JACK-like: stamped on CLOCK_MONOTONIC_RAW; kept as the host gave it.
        let now = Timebase::MonotonicRaw.now_ns();
        let at = playback_time(now, now + 5_333_333);
        assert_eq!((at.ns, at.host_stamped), (now + 5_333_333, true));
        if Timebase::Monotonic.now_ns().abs_diff(now) > SAME_CLOCK.as_nanos() as u64 {
            assert_eq!(at.clock, Timebase::MonotonicRaw);
        }
        // ALSA-like: counted from the stream's start, far from either clock; re-based.
        let at = playback_time(1_000, 5_334_000);
        let now = at.clock.now_ns();
        assert!(!at.host_stamped);
        assert!(at.ns > now && at.ns - now <= 5_334_000, "{} {now}", at.ns);
    }

    #[test]
    fn any_ntp_time_stamp_converts_without_panicking() {
        assert_eq!(ntp_to_unix_ns(2_208_988_800, 0), 0);
        assert_eq!(ntp_to_unix_ns(2_208_988_801, 1 << 31), 1_500_000_000);
        // 1900, and the last second of the era: far off, but numbers, not panics.
        assert_eq!(ntp_to_unix_ns(0, 0), -2_208_988_800_000_000_000);
        assert!(ntp_to_unix_ns(u32::MAX, u32::MAX) > 0);
        let a = Anchor::default();
        a.store(0, PlaysAt::now(Timebase::Monotonic), 48_000.0);
        assert_eq!(a.sample_at(ntp_to_unix_ns(0, 0), 48_000.0), Some(0));
        assert!(a.sample_at(ntp_to_unix_ns(u32::MAX, 0), 48_000.0).is_some());
    }

    #[test]
    fn host_stamps_give_the_device_rate_and_skipped_cycles_do_not() {
        let a = Anchor::default();
        let stamped = |ns| PlaysAt {
            ns,
            clock: Timebase::MonotonicRaw,
            host_stamped: true,
        };
        let t0 = Timebase::MonotonicRaw.now_ns();
        // A device running 0.5 % slow: 256 frames take 5.36 ms instead of 5.333.
        a.store(0, stamped(t0), 48_000.0);
        a.store(256, stamped(t0 + 5_360_000), 48_000.0);
        let per = a.load().unwrap().3;
        assert!((per - 5_360_000.0 / 256.0).abs() < 1e-6, "{per}");
        // An xrun: 256 frames rendered while four cycles passed. Back to nominal.
        a.store(512, stamped(t0 + 5_360_000 * 5), 48_000.0);
        assert_eq!(a.load().unwrap().3, 0.0);
    }
}
