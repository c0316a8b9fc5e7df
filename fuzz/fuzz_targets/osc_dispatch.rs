//! Any bytes on the OSC port: decode, dispatch, map time tags onto a running clock, and check the
//! sender against the allow lists, as the receiver thread does. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = roomscore::input::fuzzing::receive(data);
});
