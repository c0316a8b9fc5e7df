//! The OSC receiver's path from bytes to events, as one call, for the fuzz target
//! (`fuzz/fuzz_targets/osc_dispatch.rs`) and the test that replays its corpus on stable Rust.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};

use super::access::{Access, AllowList};
use super::dispatch::dispatch_packet;
use super::osc::{event_address, LiveClock};
use crate::audio::Telemetry;
use crate::clock::{PlaysAt, Timebase};

struct Fixture {
    clock: LiveClock,
    access: Access,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let telemetry = Arc::new(Telemetry::default());
        // An engine an hour in, with a buffer anchored, so time tags go through the anchor.
        telemetry.sample_clock.store(48_000 * 3600, Relaxed);
        telemetry.output_delay.store(48, Relaxed);
        telemetry
            .anchor
            .store(48_000 * 3600, PlaysAt::now(Timebase::Monotonic), 48_000.0);
        Fixture {
            clock: LiveClock {
                telemetry,
                sample_rate: 48_000.0,
            },
            access: Access {
                sensors: AllowList::parse(["10.0.0.0/8"]).expect("CIDR"),
                control: AllowList::parse(["10.1.0.0/16"]).expect("CIDR"),
            },
        }
    })
}

/// One UDP payload from an allowed sender, decoded, dispatched, time-mapped and checked
/// against the control allow list, as the receiver thread does. Returns how many events came
/// out and how many messages were refused.
pub fn receive(data: &[u8]) -> (usize, usize) {
    let f = fixture();
    let from = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), 9000);
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    dispatch_packet(data, from, &f.clock, &mut out, &mut errors);
    for ev in &out {
        let _ = f.access.check(from.ip(), event_address(&ev.event));
    }
    for e in &errors {
        let _ = e.to_string();
    }
    (out.len(), errors.len())
}
