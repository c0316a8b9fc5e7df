//! OSC address space: bytes or a decoded message in, `InputEvent`s out, and a clear reason for
//! everything refused. Nothing here panics on any input; `fuzz/` holds it to that.

use std::net::SocketAddr;

use nannou_osc::rosc::{OscBundle, OscMessage, OscPacket, OscTime, OscType};

use super::{InputEvent, TimedEvent, When};

/// Bundles nested deeper than this are refused rather than walked.
pub const MAX_BUNDLE_DEPTH: usize = 8;
/// Longest accepted string argument (scene names, named inputs).
pub const MAX_STRING: usize = 256;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DispatchError {
    #[error("undecodable packet: {0}")]
    Decode(String),
    #[error("unknown address {0:?}")]
    UnknownAddress(String),
    #[error("{addr}: expected {expected}, got {got}")]
    WrongArgs {
        addr: String,
        expected: &'static str,
        got: String,
    },
    #[error("{addr}: argument {index} is {value}, expected a finite number in {range}")]
    BadValue {
        addr: String,
        index: usize,
        value: String,
        range: &'static str,
    },
    #[error(
        "{addr}: {value:?} is not a scene name: the name of a scene file without .toml, of \
         letters, digits, '_' or '-'"
    )]
    BadSceneName { addr: String, value: String },
    #[error("{addr}: argument {index} is {value}, expected a whole number in {range}")]
    NotWhole {
        addr: String,
        index: usize,
        value: String,
        range: &'static str,
    },
    #[error(
        "a bundle's time tag is {ahead:.0} s ahead of the engine's clock (at most \
         {MAX_AHEAD_SECONDS} s is taken): is the sender's clock set?"
    )]
    TooFarAhead { ahead: f64 },
    #[error("bundle nested deeper than {MAX_BUNDLE_DEPTH}")]
    TooDeep,
}

/// A time tag further ahead than this is a sender whose clock is wrong, not a plan: what it
/// sends would be held, unheard, for hours.
pub const MAX_AHEAD_SECONDS: u32 = 60;

/// Maps an OSC time tag to a position on the engine's sample clock.
pub trait Clock {
    /// `None` for "immediately" (the time tag 1) or a clock that is not running.
    fn sample_for(&self, tag: OscTime) -> Option<u64>;

    /// How far `sample` is ahead of the clock now, in seconds.
    fn seconds_ahead(&self, _sample: u64) -> f64 {
        0.0
    }
}

/// A clock for contexts without one (offline replay): every tag means "now".
pub struct NoClock;

impl Clock for NoClock {
    fn sample_for(&self, _tag: OscTime) -> Option<u64> {
        None
    }
}

/// Decodes one UDP payload and dispatches every message in it.
/// Good messages land in `out`; each refused one is returned in `errors`.
pub fn dispatch_packet(
    bytes: &[u8],
    from: SocketAddr,
    clock: &dyn Clock,
    out: &mut Vec<TimedEvent>,
    errors: &mut Vec<DispatchError>,
) {
    // rosc decodes nested bundles by recursion, so a hostile packet is measured before it is
    // decoded: 64 KiB of nested bundle headers would otherwise be thousands of stack frames.
    if nested_deeper_than(bytes, MAX_BUNDLE_DEPTH) {
        errors.push(DispatchError::TooDeep);
        return;
    }
    match nannou_osc::rosc::decoder::decode_udp(bytes) {
        Ok((rest, packet)) => {
            dispatch_osc(&packet, from, clock, When::Now, 0, out, errors);
            // rosc stops at a bundle element that claims more bytes than are left and returns
            // what it decoded before it: those messages stand, and the rest is refused.
            if !rest.is_empty() {
                errors.push(DispatchError::Decode(format!(
                    "{} bytes at the end of the packet could not be read (a bundle element \
                     larger than what follows it?)",
                    rest.len()
                )));
            }
        }
        Err(e) => errors.push(DispatchError::Decode(e.to_string())),
    }
}

const BUNDLE_TAG: &[u8] = b"#bundle\0";

/// Whether any chain of bundles in `bytes` is more than `limit` deep, walked with a stack of
/// our own instead of recursion. Malformed sizes end the walk of that bundle; the decoder
/// refuses them afterwards.
fn nested_deeper_than(bytes: &[u8], limit: usize) -> bool {
    let mut stack = vec![(bytes, 1usize)];
    while let Some((b, depth)) = stack.pop() {
        if !b.starts_with(BUNDLE_TAG) {
            continue;
        }
        if depth > limit {
            return true;
        }
        // Tag (8 bytes) and time tag (8), then elements, each a big-endian size and content.
        let mut rest = b.get(16..).unwrap_or_default();
        while let Some((size, tail)) = rest.split_first_chunk::<4>() {
            let n = u32::from_be_bytes(*size) as usize;
            let Some(element) = tail.get(..n) else { break };
            stack.push((element, depth + 1));
            rest = &tail[n..];
        }
    }
    false
}

fn dispatch_osc(
    packet: &OscPacket,
    from: SocketAddr,
    clock: &dyn Clock,
    when: When,
    depth: usize,
    out: &mut Vec<TimedEvent>,
    errors: &mut Vec<DispatchError>,
) {
    match packet {
        OscPacket::Message(m) => match message(m, from) {
            Ok(event) => out.push(TimedEvent { when, event }),
            Err(e) => errors.push(e),
        },
        OscPacket::Bundle(OscBundle { timetag, content }) => {
            if depth >= MAX_BUNDLE_DEPTH {
                errors.push(DispatchError::TooDeep);
                return;
            }
            // A nested bundle's tag may not be earlier than its parent's; take the later one.
            let when = match clock.sample_for(*timetag) {
                Some(s) => match when {
                    When::Sample(parent) => When::Sample(parent.max(s)),
                    When::Now => When::Sample(s),
                },
                None => when,
            };
            if let When::Sample(s) = when {
                let ahead = clock.seconds_ahead(s);
                if ahead > f64::from(MAX_AHEAD_SECONDS) {
                    // Each message it holds is refused, and counted.
                    let n = content.iter().map(messages_in).sum::<usize>();
                    errors.extend((0..n).map(|_| DispatchError::TooFarAhead { ahead }));
                    return;
                }
            }
            for p in content {
                dispatch_osc(p, from, clock, when, depth + 1, out, errors);
            }
        }
    }
}

fn messages_in(p: &OscPacket) -> usize {
    match p {
        OscPacket::Message(_) => 1,
        OscPacket::Bundle(b) => b.content.iter().map(messages_in).sum(),
    }
}

fn number(arg: &OscType) -> Option<f64> {
    match arg {
        OscType::Float(f) => Some(*f as f64),
        OscType::Double(d) => Some(*d),
        OscType::Int(i) => Some(*i as f64),
        OscType::Long(l) => Some(*l as f64),
        OscType::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => None,
    }
}

fn type_list(args: &[OscType]) -> String {
    if args.is_empty() {
        return "no arguments".into();
    }
    args.iter()
        .map(|a| match a {
            OscType::Int(_) => "i",
            OscType::Float(_) => "f",
            OscType::String(_) => "s",
            OscType::Blob(_) => "b",
            OscType::Time(_) => "t",
            OscType::Long(_) => "h",
            OscType::Double(_) => "d",
            OscType::Char(_) => "c",
            OscType::Color(_) => "r",
            OscType::Midi(_) => "m",
            OscType::Bool(true) => "T",
            OscType::Bool(false) => "F",
            OscType::Array(_) => "[]",
            OscType::Nil => "N",
            OscType::Inf => "I",
        })
        .collect::<Vec<_>>()
        .join("")
}

struct Args<'a> {
    addr: &'a str,
    args: &'a [OscType],
}

impl Args<'_> {
    fn expect_len(&self, n: usize, expected: &'static str) -> Result<(), DispatchError> {
        if self.args.len() != n {
            return Err(self.wrong(expected));
        }
        Ok(())
    }

    fn wrong(&self, expected: &'static str) -> DispatchError {
        DispatchError::WrongArgs {
            addr: self.addr.to_string(),
            expected,
            got: type_list(self.args),
        }
    }

    fn num(
        &self,
        i: usize,
        lo: f64,
        hi: f64,
        range: &'static str,
        expected: &'static str,
    ) -> Result<f64, DispatchError> {
        let v = number(&self.args[i]).ok_or_else(|| self.wrong(expected))?;
        if !v.is_finite() || v < lo || v > hi {
            return Err(DispatchError::BadValue {
                addr: self.addr.to_string(),
                index: i,
                value: format!("{v}"),
                range,
            });
        }
        Ok(v)
    }

    /// `num`, and a whole number (MIDI's pitches and velocities).
    fn whole(
        &self,
        i: usize,
        lo: f64,
        hi: f64,
        range: &'static str,
        expected: &'static str,
    ) -> Result<f64, DispatchError> {
        let v = self.num(i, lo, hi, range, expected)?;
        if v.fract() != 0.0 {
            return Err(DispatchError::NotWhole {
                addr: self.addr.to_string(),
                index: i,
                // As it was sent: an f32's 0.8, not the f64 it widens to.
                value: match self.args[i] {
                    OscType::Float(f) => format!("{f}"),
                    _ => format!("{v}"),
                },
                range,
            });
        }
        Ok(v)
    }
}

/// One message to one event.
pub fn message(m: &OscMessage, from: SocketAddr) -> Result<InputEvent, DispatchError> {
    let a = Args {
        addr: &m.addr,
        args: &m.args,
    };
    match m.addr.as_str() {
        "/roomscore/movement" => {
            a.expect_len(1, "f (0..1)")?;
            Ok(InputEvent::Movement(
                a.num(0, 0.0, 1.0, "0..1", "f (0..1)")? as f32,
            ))
        }
        "/roomscore/mood" => {
            a.expect_len(2, "f f (valence -1..1, arousal 0..1)")?;
            Ok(InputEvent::Mood {
                valence: a.num(0, -1.0, 1.0, "-1..1", "f f")? as f32,
                arousal: a.num(1, 0.0, 1.0, "0..1", "f f")? as f32,
            })
        }
        "/roomscore/presence" => {
            a.expect_len(1, "i (visitors)")?;
            Ok(InputEvent::Presence(
                a.num(0, 0.0, 10_000.0, "0..10000", "i (visitors)")? as i32,
            ))
        }
        "/roomscore/scene" => match m.args.as_slice() {
            [OscType::String(s)] if s.len() <= MAX_STRING && crate::scene::valid_name(s) => {
                Ok(InputEvent::Scene(s.clone()))
            }
            [OscType::String(s)] => Err(DispatchError::BadSceneName {
                addr: m.addr.clone(),
                value: s.chars().take(64).collect(),
            }),
            _ => Err(a.wrong("s (scene name)")),
        },
        "/roomscore/tempo" => {
            a.expect_len(1, "f (BPM)")?;
            Ok(InputEvent::Tempo(
                a.num(0, 20.0, 300.0, "20..300", "f (BPM)")? as f32,
            ))
        }
        "/roomscore/volume" => {
            a.expect_len(1, "f (0..1)")?;
            Ok(InputEvent::Volume(
                a.num(0, 0.0, 1.0, "0..1", "f (0..1)")? as f32
            ))
        }
        "/roomscore/note" => {
            a.expect_len(2, "i i (pitch, velocity)")?;
            // A fader's 0.8 would become velocity 0, a silent note-off: refused instead.
            Ok(InputEvent::Note {
                pitch: a.whole(0, 0.0, 127.0, "0..127", "i i")? as u8,
                velocity: a.whole(1, 0.0, 127.0, "0..127", "i i")? as u8,
            })
        }
        "/roomscore/status" => Ok(InputEvent::Status(from)),
        addr => {
            if let Some(name) = addr.strip_prefix("/roomscore/in/") {
                if name.len() <= MAX_STRING && crate::scene::valid_name(name) {
                    a.expect_len(1, "f")?;
                    let v = a.num(0, -1e9, 1e9, "-1e9..1e9", "f")?;
                    return Ok(InputEvent::Named(name.to_string(), v as f32));
                }
            }
            let mut shown: String = addr.chars().take(64).collect();
            if addr.len() > shown.len() {
                shown.push('…');
            }
            Err(DispatchError::UnknownAddress(shown))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nannou_osc::rosc::encoder;

    fn from() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    fn msg(addr: &str, args: Vec<OscType>) -> Result<InputEvent, DispatchError> {
        message(
            &OscMessage {
                addr: addr.into(),
                args,
            },
            from(),
        )
    }

    #[test]
    fn address_space() {
        assert_eq!(
            msg("/roomscore/movement", vec![OscType::Float(0.8)]),
            Ok(InputEvent::Movement(0.8))
        );
        assert_eq!(
            msg("/roomscore/presence", vec![OscType::Int(3)]),
            Ok(InputEvent::Presence(3))
        );
        assert_eq!(
            msg("/roomscore/note", vec![OscType::Int(60), OscType::Int(100)]),
            Ok(InputEvent::Note {
                pitch: 60,
                velocity: 100
            })
        );
        assert_eq!(
            msg("/roomscore/in/door", vec![OscType::Double(2.0)]),
            Ok(InputEvent::Named("door".into(), 2.0))
        );
        assert_eq!(
            msg("/roomscore/status", vec![]),
            Ok(InputEvent::Status(from()))
        );
    }

    #[test]
    fn refusals_say_why() {
        let e = msg("/roomscore/movement", vec![OscType::Float(f32::NAN)]).unwrap_err();
        assert!(e.to_string().contains("NaN"), "{e}");
        let e = msg("/roomscore/movement", vec![OscType::Float(f32::INFINITY)]).unwrap_err();
        assert!(matches!(e, DispatchError::BadValue { .. }));
        let e = msg("/roomscore/mood", vec![OscType::String("happy".into())]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/roomscore/mood: expected f f (valence -1..1, arousal 0..1), got s"
        );
        let e = msg("/roomscore/volume", vec![OscType::Float(3.0)]).unwrap_err();
        assert!(e.to_string().contains("0..1"), "{e}");
        let long = format!("/x/{}", "a".repeat(10_000));
        let e = msg(&long, vec![]).unwrap_err();
        assert!(e.to_string().len() < 120, "{e}");
        assert!(msg("/roomscore/in/../etc", vec![OscType::Float(1.0)]).is_err());
        let e = msg(
            "/roomscore/scene",
            vec![OscType::String("../scenes/night".into())],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "/roomscore/scene: \"../scenes/night\" is not a scene name: the name of a scene file \
             without .toml, of letters, digits, '_' or '-'"
        );
        // A 0..1 fader sent as a velocity would be a silent note-off.
        let e = msg(
            "/roomscore/note",
            vec![OscType::Int(60), OscType::Float(0.8)],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "/roomscore/note: argument 1 is 0.8, expected a whole number in 0..127"
        );
        assert_eq!(
            msg(
                "/roomscore/note",
                vec![OscType::Float(60.0), OscType::Double(100.0)]
            ),
            Ok(InputEvent::Note {
                pitch: 60,
                velocity: 100
            })
        );
    }

    /// A clock at sample 48,000 of 48 kHz, on which a tag's seconds are samples / 1000.
    struct At48k;
    impl Clock for At48k {
        fn sample_for(&self, tag: OscTime) -> Option<u64> {
            Some(u64::from(tag.seconds) * 1000)
        }
        fn seconds_ahead(&self, sample: u64) -> f64 {
            (sample as f64 - 48_000.0) / 48_000.0
        }
    }

    #[test]
    fn a_bundle_tagged_far_ahead_is_refused_for_each_message_in_it() {
        let movement = OscPacket::Message(OscMessage {
            addr: "/roomscore/movement".into(),
            args: vec![OscType::Float(0.5)],
        });
        let bundle = |samples: u32| {
            let inner = OscPacket::Bundle(OscBundle {
                timetag: OscTime::from((0, 1)),
                content: vec![movement.clone()],
            });
            OscPacket::Bundle(OscBundle {
                timetag: OscTime::from((samples / 1000, 0)),
                content: vec![movement.clone(), inner],
            })
        };
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        // 60 s ahead is taken; 61 s is not.
        let taken = encoder::encode(&bundle(48_000 * 61)).unwrap();
        dispatch_packet(&taken, from(), &At48k, &mut out, &mut errors);
        assert_eq!((out.len(), errors.len()), (2, 0));
        assert!(out.iter().all(|e| e.when == When::Sample(48_000 * 61)));
        out.clear();
        let refused = encoder::encode(&bundle(48_000 * 62)).unwrap();
        dispatch_packet(&refused, from(), &At48k, &mut out, &mut errors);
        assert!(out.is_empty());
        assert_eq!(errors, vec![DispatchError::TooFarAhead { ahead: 61.0 }; 2]);
        assert!(
            errors[0].to_string().contains("61 s ahead"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn bundles_and_garbage() {
        let inner = OscPacket::Message(OscMessage {
            addr: "/roomscore/movement".into(),
            args: vec![OscType::Float(0.5)],
        });
        let mut packet = inner;
        for _ in 0..(MAX_BUNDLE_DEPTH + 2) {
            packet = OscPacket::Bundle(OscBundle {
                timetag: OscTime::from((0, 1)),
                content: vec![packet],
            });
        }
        let bytes = encoder::encode(&packet).unwrap();
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        dispatch_packet(&bytes, from(), &NoClock, &mut out, &mut errors);
        assert!(out.is_empty());
        assert_eq!(errors, vec![DispatchError::TooDeep]);

        out.clear();
        errors.clear();
        // Exactly at the limit is accepted.
        let mut packet = OscPacket::Message(OscMessage {
            addr: "/roomscore/movement".into(),
            args: vec![OscType::Float(0.5)],
        });
        for _ in 0..MAX_BUNDLE_DEPTH {
            packet = OscPacket::Bundle(OscBundle {
                timetag: OscTime::from((0, 1)),
                content: vec![packet],
            });
        }
        let bytes = encoder::encode(&packet).unwrap();
        dispatch_packet(&bytes, from(), &NoClock, &mut out, &mut errors);
        assert_eq!((out.len(), errors.len()), (1, 0));

        // A bundle whose second element claims 9,999 bytes, with 3 left: the first stands.
        errors.clear();
        let good = encoder::encode(&OscPacket::Message(OscMessage {
            addr: "/roomscore/movement".into(),
            args: vec![OscType::Float(0.5)],
        }))
        .unwrap();
        let mut bytes = BUNDLE_TAG.to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
        bytes.extend_from_slice(&(good.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&good);
        bytes.extend_from_slice(&9_999u32.to_be_bytes());
        bytes.extend_from_slice(b"abc");
        out.clear();
        dispatch_packet(&bytes, from(), &NoClock, &mut out, &mut errors);
        assert_eq!(out.len(), 1);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().contains("7 bytes at the end"),
            "{}",
            errors[0]
        );

        errors.clear();
        out.clear();
        dispatch_packet(b"\xff\x00garbage", from(), &NoClock, &mut out, &mut errors);
        assert!(out.is_empty());
        assert!(matches!(errors[0], DispatchError::Decode(_)));
    }

    /// A whole UDP payload of nested bundle headers, each claiming the rest: refused by the
    /// pre-scan on a small stack, before the recursive decoder sees it.
    #[test]
    fn a_packet_of_nested_headers_is_refused_without_recursion() {
        let levels = 4000;
        let mut bytes = Vec::new();
        for i in 0..levels {
            bytes.extend_from_slice(BUNDLE_TAG);
            bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
            let remaining = (levels - i - 1) * 20;
            bytes.extend_from_slice(&(remaining as u32).to_be_bytes());
        }
        let result = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || {
                let (mut out, mut errors) = (Vec::new(), Vec::new());
                dispatch_packet(&bytes, from(), &NoClock, &mut out, &mut errors);
                (out.len(), errors)
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(result, (0, vec![DispatchError::TooDeep]));
    }
}
