//! Hostile input against a running engine, over real UDP: 20,000 packets a second for 30
//! seconds, a mix of good sensor messages, notes, time-tagged bundles, NaN and infinities,
//! out-of-range values, wrong types, giant strings, bundles nested past the limit, a packet of
//! thousands of nested bundle headers, raw garbage, and senders outside the allow list.
//!
//! The engine must keep playing (notes keep counting up and the recording has no gap), count
//! what it refused, keep its memory bounded, and answer `/roomscore/status` afterwards. Its own
//! binary, so no other test shares the machine while it runs.

#[path = "it/common.rs"]
#[allow(dead_code)]
mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use nannou_osc::rosc::{encoder, OscBundle, OscMessage, OscPacket, OscTime, OscType};

const RATE: u64 = 20_000;
const SECONDS: u64 = 30;

fn message(addr: &str, args: Vec<OscType>) -> OscPacket {
    OscPacket::Message(OscMessage {
        addr: addr.into(),
        args,
    })
}

fn bytes(p: &OscPacket) -> Vec<u8> {
    encoder::encode(p).unwrap()
}

/// One payload of the mix, and how many refusals (invalid messages) the engine should count.
struct Payload {
    bytes: Vec<u8>,
    invalid: u64,
    /// Sent from the address outside the allow list.
    outsider: bool,
}

fn mix() -> Vec<Payload> {
    let good = |p: OscPacket| Payload {
        bytes: bytes(&p),
        invalid: 0,
        outsider: false,
    };
    let bad = |p: OscPacket| Payload {
        bytes: bytes(&p),
        invalid: 1,
        outsider: false,
    };
    let f = OscType::Float;
    let mut nested = message("/roomscore/movement", vec![f(0.5)]);
    for _ in 0..12 {
        nested = OscPacket::Bundle(OscBundle {
            timetag: OscTime::from((0, 1)),
            content: vec![nested],
        });
    }
    let mut headers = Vec::new();
    let levels = 3000;
    for i in 0..levels {
        headers.extend_from_slice(b"#bundle\0\0\0\0\0\0\0\0\x01");
        headers.extend_from_slice(&(((levels - i - 1) * 20) as u32).to_be_bytes());
    }
    let tagged = |secs_ahead: f64| {
        let t = std::time::SystemTime::now() + Duration::from_secs_f64(secs_ahead);
        OscPacket::Bundle(OscBundle {
            timetag: OscTime::try_from(t).unwrap(),
            content: vec![
                message("/roomscore/note", vec![OscType::Int(72), OscType::Int(40)]),
                message("/roomscore/movement", vec![f(f32::NAN)]),
            ],
        })
    };
    vec![
        good(message("/roomscore/movement", vec![f(0.8)])),
        good(message("/roomscore/mood", vec![f(0.3), f(0.6)])),
        good(message("/roomscore/presence", vec![OscType::Int(4)])),
        good(message("/roomscore/in/depth", vec![f(0.4)])),
        good(message("/roomscore/movement", vec![OscType::Double(0.2)])),
        bad(message("/roomscore/movement", vec![f(f32::NAN)])),
        bad(message("/roomscore/movement", vec![f(f32::INFINITY)])),
        bad(message(
            "/roomscore/mood",
            vec![f(f32::NEG_INFINITY), f(0.5)],
        )),
        bad(message("/roomscore/volume", vec![f(1e30)])),
        bad(message("/roomscore/tempo", vec![f(-5.0)])),
        bad(message("/roomscore/presence", vec![OscType::Int(i32::MIN)])),
        bad(message(
            "/roomscore/note",
            vec![OscType::Int(9999), OscType::Int(-3)],
        )),
        bad(message(
            "/roomscore/mood",
            vec![OscType::String("happy".into())],
        )),
        bad(message(
            "/roomscore/movement",
            vec![OscType::Blob(vec![7; 512])],
        )),
        bad(message("/roomscore/movement", vec![])),
        bad(message(
            "/roomscore/scene",
            vec![OscType::String("x".repeat(60_000))],
        )),
        bad(message(
            &format!("/roomscore/in/{}", "a".repeat(30_000)),
            vec![f(0.5)],
        )),
        bad(message("/nowhere/at/all", vec![f(0.5)])),
        bad(nested),
        Payload {
            bytes: headers,
            invalid: 1,
            outsider: false,
        },
        Payload {
            bytes: b"\xff\xfe not osc at all".to_vec(),
            invalid: 1,
            outsider: false,
        },
        Payload {
            bytes: vec![0; 3],
            invalid: 1,
            outsider: false,
        },
        // A note a second ahead and a NaN beside it: one good, one refused.
        Payload {
            invalid: 1,
            outsider: false,
            ..good(tagged(1.0))
        },
        Payload {
            outsider: true,
            ..good(message("/roomscore/movement", vec![f(0.9)]))
        },
    ]
}

fn vm_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Counts how often this machine wakes a real-time thread later than `period`: a stall no
/// process can hide, which the engine then rightly counts as an xrun. `None` when real-time
/// scheduling is not granted (then nothing excuses an xrun).
fn watch_stalls(
    period: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Option<u32>> {
    std::thread::spawn(move || {
        let param = libc::sched_param { sched_priority: 80 };
        // SAFETY: sets this thread's own scheduling policy; no memory is shared.
        if unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) }
            != 0
        {
            return None;
        }
        let mut stalls = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            std::thread::sleep(Duration::from_millis(1));
            if t.elapsed() > period {
                stalls += 1;
            }
        }
        Some(stalls)
    })
}

#[test]
fn a_flood_of_mixed_packets_is_survived_counted_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("flood.wav");
    let port = free_port();
    let osc = format!("127.0.0.1:{port}");
    // 127.0.0.2 is loopback too, but outside the allow list: the outsider.
    let mut child = spawn_play(
        &[
            "--output",
            "null",
            "--osc",
            &osc,
            "--osc-allow",
            "127.0.0.1/32",
            "--record",
            rec.to_str().unwrap(),
        ],
        &[],
    );
    let pid = child.id();
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let before = wait_for_status(&probe, port);
    std::thread::sleep(Duration::from_secs(2));
    let rss_before = vm_kb(pid, "VmRSS:");

    let payloads = mix();
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    let outsider = UdpSocket::bind("127.0.0.2:0").unwrap();
    let to: SocketAddr = osc.parse().unwrap();
    let (mut sent, mut expected_invalid, mut expected_denied) = (0u64, 0u64, 0u64);
    // The null output's period: 256 frames at 48 kHz.
    let stop_watch = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_stalls(Duration::from_micros(5_333), stop_watch.clone());
    let started = Instant::now();
    let mut during = Vec::new();
    let mut next_status = started + Duration::from_secs(5);
    while started.elapsed() < Duration::from_secs(SECONDS) {
        // Catch up to the rate at millisecond resolution.
        let due = (started.elapsed().as_secs_f64() * RATE as f64) as u64;
        while sent < due {
            let p = &payloads[(sent % payloads.len() as u64) as usize];
            let sock = if p.outsider { &outsider } else { &sender };
            if sock.send_to(&p.bytes, to).is_ok() {
                if p.outsider {
                    expected_denied += 1;
                } else {
                    expected_invalid += p.invalid;
                }
            }
            sent += 1;
        }
        if Instant::now() >= next_status {
            // Answers during the flood are a bonus (its reply can be lost in the queue); the
            // notes it reports show the music going on.
            if let Some(s) = status(&probe, port) {
                during.push(s.notes);
            }
            next_status += Duration::from_secs(5);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let flood_secs = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let after = wait_for_status(&probe, port);
    let rss_after = vm_kb(pid, "VmRSS:");
    let peak = vm_kb(pid, "VmHWM:");
    let out = terminate(&mut child);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    eprintln!(
        "flood: {sent} packets in {flood_secs:.1} s ({:.0}/s); engine counted invalid {}, \
         denied {}, dropped {}, xruns {}, notes {} -> {} (during: {during:?}); \
         expected invalid {expected_invalid}, denied {expected_denied}; \
         RSS {rss_before} -> {rss_after} KiB, peak {peak} KiB",
        sent as f64 / flood_secs,
        after.invalid,
        after.denied,
        after.dropped,
        after.xruns,
        before.notes,
        after.notes
    );
    assert!(
        sent as f64 >= 0.95 * (RATE * SECONDS) as f64,
        "sent only {sent}"
    );
    // What the kernel dropped from a full socket buffer never reaches the engine, so the
    // counts can fall short of what was sent, never exceed it; most must arrive.
    let invalid = after.invalid as u64;
    assert!(
        invalid <= expected_invalid && invalid as f64 >= 0.8 * expected_invalid as f64,
        "invalid {invalid} of {expected_invalid} sent"
    );
    let denied = after.denied as u64;
    assert!(
        denied <= expected_denied && denied as f64 >= 0.8 * expected_denied as f64,
        "denied {denied} of {expected_denied} sent"
    );
    // The music went on through the flood: notes kept coming.
    assert!(
        after.notes > before.notes + 20,
        "notes {} -> {} during the flood",
        before.notes,
        after.notes
    );
    stop_watch.store(true, std::sync::atomic::Ordering::Relaxed);
    match watcher.join().unwrap() {
        // Each underrun must be matched by a stall of the machine itself.
        Some(stalls) => assert!(
            after.xruns as u32 <= stalls,
            "{} underruns during the flood, and the machine stalled a real-time thread only {stalls} times",
            after.xruns
        ),
        None => assert_eq!(after.xruns, 0, "underruns during the flood"),
    }
    // Bounded memory: the engine's queues are fixed in size, so a flood may not grow it.
    assert!(
        rss_after < rss_before + 8 * 1024 && peak < rss_before + 16 * 1024,
        "RSS {rss_before} -> {rss_after} KiB, peak {peak} KiB"
    );
    // The recording is whole: as long as the engine ran, within a tenth of a second.
    let (spec, samples) = read_wav(&rec);
    let recorded = samples.len() as f64 / spec.channels as f64 / spec.sample_rate as f64;
    assert!(
        recorded >= flood_secs + 2.0,
        "recording holds {recorded:.1} s for a {flood_secs:.1} s flood"
    );
    assert!(samples.iter().all(|s| s.is_finite()));
}
