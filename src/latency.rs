//! `roomscore latency`: how long a `/roomscore/note` takes from leaving an OSC client to its first
//! sample on the output, measured with JACK's frame clock at both ends. The probe is a JACK client
//! listening to the engine's output ports in the same graph cycle the engine writes them; it
//! notes the frame time just before each send and the frame of the first non-silent sample that
//! follows. With `--tagged`, each note goes in a bundle time-tagged a little ahead, and the
//! probe reports how far from the requested sample it landed instead.
//!
//! Run it against `play --host jack --scene scenes/latency.toml`, whose band is silent and whose
//! performer voice is dry, so the first non-zero sample is the note's.

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use nannou_osc::rosc::{encoder, OscBundle, OscMessage, OscPacket, OscTime, OscType};

#[derive(clap::Args, Debug)]
pub struct LatencyArgs {
    /// The engine's OSC address.
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub osc: SocketAddr,
    /// Notes to measure.
    #[arg(long, default_value_t = 500)]
    pub notes: usize,
    /// Send each note in a bundle time-tagged this many milliseconds ahead, and report how far
    /// from the requested sample it lands.
    #[arg(long)]
    pub tagged: Option<f64>,
    /// Every this many notes, hold the probe's own JACK callback long enough for an xrun,
    /// so the notes after it show whether timing recovers.
    #[arg(long)]
    pub xrun_every: Option<usize>,
    /// A sample louder than this is a note's first.
    #[arg(long, default_value_t = 1e-6)]
    pub threshold: f32,
    /// Write every measurement here (CSV).
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

/// What the probe's JACK callback shares with the sender.
#[derive(Default)]
struct Shared {
    armed: AtomicBool,
    /// The frame of the first loud sample since armed; `u64::MAX` until found.
    onset: AtomicU64,
    /// Consecutive cycles with nothing above the threshold.
    quiet_cycles: AtomicU32,
    stall: AtomicBool,
    xruns: AtomicU32,
    /// When the last xrun was reported, on CLOCK_MONOTONIC_RAW in microseconds.
    last_xrun_us: AtomicU64,
    /// Cycles the probe ran a `LATE` share of a period or more after JACK's stamp for them, and
    /// when the last one ran (CLOCK_MONOTONIC_RAW, µs).
    late_cycles: AtomicU32,
    last_late_us: AtomicU64,
    /// Cycles whose times JACK did not give: their lag is unknown, and counted as none.
    untimed_cycles: AtomicU32,
    /// The most a cycle ran behind its stamp while a note was awaited, in µs.
    max_lag_us: AtomicU64,
}

/// JACK's frame clock (its DLL) takes a few seconds to settle after an xrun; notes measured
/// within this long after one are reported apart.
const RELOCK: Duration = Duration::from_secs(5);

/// JACK stamps each cycle's start through its DLL. After a stall the stamps trail the real
/// wake-ups for a while (a 15 ms SIGSTOP of jackd: 12.8 ms behind, back under 0.5 ms within about
/// half a second), and `frame_time`, read by the sender on the same DLL, names a
/// frame the graph has not reached: the note then measures as heard before it was sent, by up to
/// that lag. A stall need not be reported as an xrun in time (seen in CI: -8.65 ms, with no xrun
/// within 5 s before the note was measured); the lag shows in the cycle itself. Normally the probe
/// runs 0.1-0.5 ms after its stamp, even with both cores training a model; a cycle this share of
/// a period or more behind is late, and so is any note it touches.
const LATE: f64 = 0.25;

/// Now on JACK2's clock (CLOCK_MONOTONIC_RAW), in the microseconds JACK stamps its cycles in.
fn jack_now_us() -> u64 {
    crate::clock::Timebase::MonotonicRaw.now_ns() / 1000
}

struct XrunCounter(Arc<Shared>);

impl jack::NotificationHandler for XrunCounter {
    fn xrun(&mut self, _: &jack::Client) -> jack::Control {
        self.0.xruns.fetch_add(1, Relaxed);
        let now = jack_now_us();
        self.0.last_xrun_us.store(now, Relaxed);
        jack::Control::Continue
    }
}

pub fn run(args: LatencyArgs) -> anyhow::Result<()> {
    let (client, _) = jack::Client::new("roomscore-latency", jack::ClientOptions::NO_START_SERVER)
        .context("connecting to the JACK server (is jackd running? JACK_DEFAULT_SERVER?)")?;
    let rate = client.sample_rate() as f64;
    // JACK2 stamps its cycles on CLOCK_MONOTONIC_RAW; wall-clock tags are placed on it.
    let raw = crate::clock::Timebase::MonotonicRaw;
    let skew = client.time() as i64 - jack_now_us() as i64;
    if skew.abs() > 1000 {
        bail!("JACK's clock is {skew} µs from CLOCK_MONOTONIC_RAW; tagged times cannot be placed");
    }
    let engine_ports: Vec<String> = client
        .port_by_name("system:playback_1")
        .map(|p| p.get_connections())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| !p.starts_with("roomscore-latency"))
        .collect();
    let Some(source) = engine_ports.first().cloned() else {
        bail!("nothing plays into system:playback_1; start `roomscore play --host jack` first");
    };
    let playback_latency = client
        .port_by_name(&source)
        .map(|p| p.get_latency_range(jack::LatencyType::Playback).1)
        .unwrap_or(0) as i64;
    let input = client.register_port("in", jack::AudioIn::default())?;
    let input_name = input.name()?;
    let shared = Arc::new(Shared {
        onset: AtomicU64::new(u64::MAX),
        ..Shared::default()
    });
    let cb = shared.clone();
    let threshold = args.threshold;
    let period_us = (client.buffer_size() as f64 / rate * 1e6) as u64;
    let late_us = (LATE * period_us as f64) as u64;
    let process = jack::contrib::ClosureProcessHandler::new(
        move |_: &jack::Client, ps: &jack::ProcessScope| {
            // Acquire pairs with the arming's Release: the lag reset before it is seen first.
            let awaited = cb.armed.load(Acquire) && cb.onset.load(Relaxed) == u64::MAX;
            match ps.cycle_times() {
                Ok(t) => {
                    let now = jack_now_us();
                    let lag = now.saturating_sub(t.current_usecs);
                    // Before the onset is published (Release below), so the sender reads the lag
                    // of the very cycle the note was heard in.
                    if awaited {
                        cb.max_lag_us.fetch_max(lag, Relaxed);
                    }
                    if lag >= late_us {
                        cb.late_cycles.fetch_add(1, Relaxed);
                        cb.last_late_us.store(now, Relaxed);
                    }
                }
                Err(_) => {
                    cb.untimed_cycles.fetch_add(1, Relaxed);
                }
            }
            let samples = input.as_slice(ps);
            let loud = samples.iter().position(|s| s.abs() > threshold);
            if awaited {
                if let Some(i) = loud {
                    cb.onset
                        .store(ps.last_frame_time() as u64 + i as u64, Release);
                }
            }
            if loud.is_some() {
                cb.quiet_cycles.store(0, Relaxed);
            } else {
                cb.quiet_cycles.fetch_add(1, Relaxed);
            }
            if cb.stall.swap(false, Relaxed) {
                // Four periods late: the server records an xrun for everyone in the graph.
                std::thread::sleep(Duration::from_millis(25));
            }
            jack::Control::Continue
        },
    );
    let active = client.activate_async(XrunCounter(shared.clone()), process)?;
    let jc = active.as_client();
    jc.connect_ports_by_name(&source, &input_name)
        .with_context(|| format!("connecting {source} to the probe"))?;
    println!(
        "probe on {source} at {rate} Hz, {} frames a cycle; its playback latency {playback_latency} frames",
        jc.buffer_size()
    );

    // Connecting the probe can itself cost an xrun; start once JACK's clock has settled.
    std::thread::sleep(Duration::from_millis(200));
    loop {
        let last = shared.last_xrun_us.load(Relaxed);
        let since = Duration::from_micros(jack_now_us().saturating_sub(last));
        if last == 0 || since >= RELOCK {
            break;
        }
        std::thread::sleep(RELOCK - since);
    }
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(args.osc)?;
    let mut rows: Vec<Row> = Vec::with_capacity(args.notes);
    let mut misses = 0;
    let mut rng = crate::rng::Rng::new(0x1a7e);
    for n in 0..args.notes {
        if args
            .xrun_every
            .is_some_and(|k| k > 0 && n > 0 && n % k == 0)
        {
            shared.stall.store(true, Relaxed);
            std::thread::sleep(Duration::from_millis(100));
        }
        // Wait for the last note to die away (at least 40 ms of silence), then a random gap,
        // so sends fall anywhere within a cycle.
        let deadline = Instant::now() + Duration::from_secs(5);
        while shared.quiet_cycles.load(Relaxed) < 8 {
            if Instant::now() > deadline {
                bail!(
                    "the output never went quiet: use scenes/latency.toml (silent band, dry voice)"
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_micros(1000 + rng.next_u64() % 20_000));
        shared.onset.store(u64::MAX, Relaxed);
        shared.max_lag_us.store(0, Relaxed);
        shared.armed.store(true, Release);
        let armed_us = jack_now_us();
        let note = OscMessage {
            addr: "/roomscore/note".into(),
            args: vec![OscType::Int(72), OscType::Int(100)],
        };
        let (packet, expected) = match args.tagged {
            None => {
                let packet = encoder::encode(&OscPacket::Message(note))?;
                let sent = jc.frame_time() as i64;
                (packet, sent)
            }
            Some(ms) => {
                let at = SystemTime::now() + Duration::from_secs_f64(ms / 1000.0);
                let tag = OscTime::try_from(at).map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let packet = encoder::encode(&OscPacket::Bundle(OscBundle {
                    timetag: tag,
                    content: vec![OscPacket::Message(note)],
                }))?;
                // Where that time falls in the graph: JACK's own frame mapping, less the
                // latency from the engine's ports to the device, which the engine aims through.
                let at_us = (crate::clock::wall_to(raw, crate::clock::unix_ns(at)) / 1000) as u64;
                (packet, jc.time_to_frames(at_us) as i64 - playback_latency)
            }
        };
        // For immediate notes the frame time was read just before this: the packet leaves now.
        sock.send(&packet)?;
        let deadline = Instant::now() + Duration::from_millis(500);
        let onset = loop {
            let o = shared.onset.load(Acquire);
            if o != u64::MAX {
                break Some(o);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_micros(500));
        };
        shared.armed.store(false, Relaxed);
        match onset {
            // Frame times are 32-bit and wrap; differences are taken in that width.
            Some(o) => {
                let frames = (o as u32).wrapping_sub(expected as u32) as i32 as f64;
                let xrun = shared.last_xrun_us.load(Relaxed);
                let now = jack_now_us();
                let lag_us = shared.max_lag_us.load(Relaxed);
                // The cycle running when the note left may have had its callback before the
                // arming, so its lag is not in `max_lag_us`: a late one shows as a late cycle
                // within two periods before the arming.
                let late_before = shared.last_late_us.load(Relaxed) + 2 * period_us >= armed_us;
                rows.push(Row {
                    note: n,
                    frames,
                    set_apart: (xrun != 0 && now.saturating_sub(xrun) < RELOCK.as_micros() as u64)
                        || lag_us >= late_us
                        || late_before,
                    lag_us,
                });
            }
            None => misses += 1,
        }
    }
    let xruns = shared.xruns.load(Relaxed);
    let late = shared.late_cycles.load(Relaxed);
    let untimed = shared.untimed_cycles.load(Relaxed);
    drop(active);

    if let Some(path) = &args.csv {
        let mut csv = String::from("note,frames,set_apart,lag_frames\n");
        for r in &rows {
            // Whole frames up: the bound a test holds the note to must not be rounded tighter.
            let lag = (r.lag_us as f64 * rate / 1e6).ceil();
            writeln!(
                csv,
                "{},{},{},{lag}",
                r.note,
                r.frames,
                u8::from(r.set_apart)
            )?;
        }
        std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))?;
    }
    if rows.is_empty() {
        bail!("no note was heard ({misses} sent)");
    }
    let set_apart = rows.iter().filter(|r| r.set_apart).count();
    println!(
        "{} notes measured, {misses} not heard; {xruns} xruns, {late} cycles {:.2} ms or more \
         behind JACK's stamp; {set_apart} notes set apart (within {} s after an xrun, or touched \
         by a late cycle)",
        rows.len(),
        late_us as f64 / 1000.0,
        RELOCK.as_secs()
    );
    if untimed > 0 {
        println!("JACK gave no cycle times for {untimed} cycles: their lag counts as 0");
    }
    let all: Vec<f64> = rows.iter().map(|r| r.frames).collect();
    let clean: Vec<f64> = rows
        .iter()
        .filter(|r| !r.set_apart)
        .map(|r| r.frames)
        .collect();
    for (label, d) in [("all notes", all), ("JACK's clock settled", clean)] {
        if d.is_empty() {
            continue;
        }
        let s = Summary::of(d);
        let ms = |f: f64| f / rate * 1000.0;
        match args.tagged {
            None => println!(
                "immediate, {label} ({}): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, min {:.2} ms, \
                 jitter (sd) {:.2} ms; the device adds {:.2} ms after the ports",
                s.n,
                ms(s.p50),
                ms(s.p99),
                ms(s.max),
                ms(s.min),
                ms(s.sd),
                ms(playback_latency as f64)
            ),
            Some(ahead) => println!(
                "tagged {ahead} ms ahead, {label} ({}): error p50 {:+} samples, p99 {:+}, min {:+}, \
                 max {:+}; {} within one sample",
                s.n, s.p50, s.p99, s.min, s.max, s.within_one
            ),
        }
    }
    Ok(())
}

/// One note's measurement.
struct Row {
    note: usize,
    /// Immediate: frames from the send to the first loud sample. Tagged: from the requested
    /// sample to it.
    frames: f64,
    /// Measured within `RELOCK` after an xrun, or touched by a late cycle: JACK's clock was not to
    /// be trusted.
    set_apart: bool,
    /// The most a cycle ran behind JACK's stamp for it while the note was awaited (from the
    /// arming to the onset).
    lag_us: u64,
}

struct Summary {
    n: usize,
    p50: f64,
    p99: f64,
    min: f64,
    max: f64,
    sd: f64,
    within_one: usize,
}

impl Summary {
    fn of(mut d: Vec<f64>) -> Summary {
        d.sort_by(f64::total_cmp);
        let q = |p: f64| d[((d.len() - 1) as f64 * p).round() as usize];
        let mean = d.iter().sum::<f64>() / d.len() as f64;
        Summary {
            n: d.len(),
            p50: q(0.5),
            p99: q(0.99),
            min: q(0.0),
            max: q(1.0),
            sd: (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / d.len() as f64).sqrt(),
            within_one: d.iter().filter(|x| x.abs() <= 1.0).count(),
        }
    }
}
