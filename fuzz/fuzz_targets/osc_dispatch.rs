//! Any bytes on the OSC port: decode, dispatch, map time tags onto a running clock, and check the
//! sender against allow lists, as the receiver thread does. Nothing may panic.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use roomscore::audio::Telemetry;
use roomscore::input::access::{Access, AllowList};
use roomscore::input::dispatch::dispatch_packet;
use roomscore::input::osc::{event_address, LiveClock};

struct Fixture {
    clock: LiveClock,
    access: Access,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let telemetry = Arc::new(Telemetry::default());
        telemetry.sample_clock.store(48_000 * 3600, Relaxed);
        Fixture {
            clock: LiveClock {
                telemetry,
                sample_rate: 48_000.0,
            },
            access: Access {
                sensors: AllowList::parse(["10.0.0.0/8"]).unwrap(),
                control: AllowList::parse(["10.1.0.0/16"]).unwrap(),
            },
        }
    })
}

fuzz_target!(|data: &[u8]| {
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
});
