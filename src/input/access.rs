//! OSC access control: which source addresses may talk to the engine. `--osc-allow` lists the
//! networks (CIDRs) whose packets are heard at all; `--control-allow` further narrows who may
//! use the performer controls (scene, tempo, volume, note, status), so gallery sensors on the
//! room's network cannot change the scene while the front-of-house laptop can. An empty list
//! allows everyone, which keeps the default of a studio setup: no flags, no surprises.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a CIDR given on the command line was refused; each variant quotes the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{text:?}: bad address {addr:?} (expected IPv4 like 10.0.0.0 or IPv6 like fe80::)")]
    BadAddress { text: String, addr: String },
    #[error("{text:?}: bad prefix length {prefix:?} (expected a whole number)")]
    BadPrefix { text: String, prefix: String },
    #[error("{text:?}: prefix /{prefix} too long for {family} (at most /{max})")]
    PrefixTooLong {
        text: String,
        prefix: String,
        family: &'static str,
        max: u8,
    },
}

/// A network: an address and how many leading bits of it matter. Host bits are cleared on
/// parse, so `10.0.0.5/24` is the same network as `10.0.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `None` when `prefix` is longer than the address family allows.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        // A mapped-IPv6 network is an IPv4 network in disguise; storing it as IPv4 lets
        // `contains` compare like with like.
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix - 96),
                None => (addr, prefix),
            },
            _ => (addr, prefix),
        };
        let addr = match addr {
            IpAddr::V4(a) if prefix <= 32 => {
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(prefix)))
            }
            IpAddr::V6(a) if prefix <= 128 => {
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(prefix)))
            }
            _ => return None,
        };
        Some(Cidr { addr, prefix })
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside this network. IPv4-mapped IPv6 addresses (what a dual-stack
    /// socket reports for IPv4 senders) are compared as the IPv4 address they carry.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask32(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask128(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

// `checked_shl` because shifting a u32 by 32 overflows, and /0 must mean "all addresses".
fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| CidrError::BadAddress {
            text: text.to_string(),
            addr: addr_text.to_string(),
        })?;
        let (family, max) = match addr {
            IpAddr::V4(_) => ("IPv4", 32u8),
            IpAddr::V6(_) => ("IPv6", 128u8),
        };
        let prefix = match prefix_text {
            None => max,
            Some(p) => {
                let bad = || CidrError::BadPrefix {
                    text: text.to_string(),
                    prefix: p.to_string(),
                };
                // u32::from_str accepts a leading '+', which no CIDR notation does.
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                // All digits, so a parse failure can only be overflow: too long, like /33.
                match p.parse::<u8>() {
                    Ok(n) if n <= max => n,
                    _ => {
                        return Err(CidrError::PrefixTooLong {
                            text: text.to_string(),
                            prefix: p.to_string(),
                            family,
                            max,
                        })
                    }
                }
            }
        };
        Cidr::new(addr, prefix).ok_or_else(|| CidrError::PrefixTooLong {
            text: text.to_string(),
            prefix: prefix.to_string(),
            family,
            max,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A set of networks; empty means everyone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    pub nets: Vec<Cidr>,
}

impl AllowList {
    /// Parses every item, stopping at the first bad one.
    pub fn parse<I, S>(items: I) -> Result<Self, CidrError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let nets = items
            .into_iter()
            .map(|s| s.as_ref().parse())
            .collect::<Result<_, _>>()?;
        Ok(AllowList { nets })
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        self.nets.is_empty() || self.nets.iter().any(|n| n.contains(ip))
    }
}

/// Which list refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// `--osc-allow`
    Sensors,
    /// `--control-allow`
    Control,
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Gate::Sensors => "--osc-allow",
            Gate::Control => "--control-allow",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("OSC {addr:?} from {ip} denied: not in {gate}")]
pub struct Denied {
    pub ip: IpAddr,
    pub addr: String,
    pub gate: Gate,
}

/// The performer controls: addresses that change what the room hears or reveal engine state.
pub const CONTROL_ADDRESSES: [&str; 5] = [
    "/roomscore/scene",
    "/roomscore/tempo",
    "/roomscore/volume",
    "/roomscore/note",
    "/roomscore/status",
];

/// Whether `addr` needs `--control-allow`. An address with OSC pattern characters counts as
/// control, because a pattern like `/roomscore/*` would reach the controls if dispatch ever
/// expands patterns; refusing it to sensors costs nothing today.
pub fn is_control(addr: &str) -> bool {
    CONTROL_ADDRESSES.contains(&addr)
        || (addr.starts_with("/roomscore/") && addr.contains(['*', '?', '[', ']', '{', '}']))
}

/// Both lists together; the default lets everything through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub sensors: AllowList,
    pub control: AllowList,
}

impl Access {
    /// Every message must come from `sensors`; control messages must also come from
    /// `control`, so `--control-allow` can only narrow `--osc-allow`, never widen it.
    pub fn check(&self, ip: IpAddr, addr: &str) -> Result<(), Denied> {
        let deny = |gate| {
            Err(Denied {
                ip,
                addr: addr.to_string(),
                gate,
            })
        };
        if !self.sensors.allows(ip) {
            return deny(Gate::Sensors);
        }
        if is_control(addr) && !self.control.allows(ip) {
            return deny(Gate::Control);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_v4_and_v6_cidrs() {
        let c = cidr("192.168.1.0/24");
        assert_eq!((c.addr(), c.prefix()), (ip("192.168.1.0"), 24));
        assert_eq!(cidr("10.0.0.5").prefix(), 32);
        assert_eq!(cidr("::1/128"), cidr("::1"));
        let c = cidr("fe80::/10");
        assert_eq!((c.addr(), c.prefix()), (ip("fe80::"), 10));
        assert_eq!(cidr("0.0.0.0/0").prefix(), 0);
        assert_eq!(cidr("::/0").prefix(), 0);
    }

    #[test]
    fn host_bits_are_cleared() {
        assert_eq!(cidr("10.0.0.5/24"), cidr("10.0.0.0/24"));
        assert_eq!(cidr("10.0.0.5/24").to_string(), "10.0.0.0/24");
        assert_eq!(cidr("fe80::1234/10").to_string(), "fe80::/10");
    }

    #[test]
    fn mapped_v6_networks_become_v4() {
        assert_eq!(cidr("::ffff:10.0.0.0/104"), cidr("10.0.0.0/8"));
    }

    #[test]
    fn bad_address_is_quoted() {
        let e = "192.168.1.300/24".parse::<Cidr>().unwrap_err();
        assert_eq!(
            e,
            CidrError::BadAddress {
                text: "192.168.1.300/24".into(),
                addr: "192.168.1.300".into()
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("\"192.168.1.300/24\"") && msg.contains("bad address"),
            "{msg}"
        );
        for bad in [
            "",
            "/24",
            "localhost",
            "fe80::1%eth0",
            " 10.0.0.1",
            "10.0.0.1/24/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn bad_or_long_prefix_says_why() {
        let e = "10.0.0.0/33".parse::<Cidr>().unwrap_err();
        assert!(
            matches!(e, CidrError::PrefixTooLong { ref prefix, max: 32, .. } if prefix == "33")
        );
        let msg = e.to_string();
        assert!(
            msg.contains("\"10.0.0.0/33\"") && msg.contains("too long"),
            "{msg}"
        );
        let e = "::/129".parse::<Cidr>().unwrap_err();
        assert!(
            matches!(e, CidrError::PrefixTooLong { ref prefix, max: 128, .. } if prefix == "129")
        );
        // A huge prefix is "too long", not an overflow wrapping into a small one.
        let e = "::/4294967424".parse::<Cidr>().unwrap_err();
        assert!(matches!(e, CidrError::PrefixTooLong { .. }), "{e}");
        for bad in [
            "10.0.0.0/",
            "10.0.0.0/x",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/ 8",
        ] {
            let e = bad.parse::<Cidr>().unwrap_err();
            assert!(matches!(e, CidrError::BadPrefix { .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn contains_respects_prefix_and_family() {
        let lan = cidr("192.168.1.0/24");
        assert!(lan.contains(ip("192.168.1.0")));
        assert!(lan.contains(ip("192.168.1.255")));
        assert!(!lan.contains(ip("192.168.2.1")));
        assert!(!lan.contains(ip("::1")));
        assert!(cidr("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(!cidr("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        let ll = cidr("fe80::/10");
        assert!(ll.contains(ip("fe80::1")));
        assert!(ll.contains(ip("febf:ffff::1")));
        assert!(!ll.contains(ip("fec0::1")));
        assert!(cidr("10.0.0.5").contains(ip("10.0.0.5")));
        assert!(!cidr("10.0.0.5").contains(ip("10.0.0.6")));
    }

    #[test]
    fn mapped_v6_senders_match_v4_nets() {
        let list = AllowList::parse(["10.0.0.0/8"]).unwrap();
        assert!(list.allows(ip("::ffff:10.0.0.1")));
        assert!(!list.allows(ip("::ffff:11.0.0.1")));
        // IPv4-compatible (not mapped) addresses are real IPv6 and must not slip through.
        assert!(!list.allows(ip("::10.0.0.1")));
    }

    #[test]
    fn empty_list_allows_all() {
        let list = AllowList::default();
        assert!(list.allows(ip("203.0.113.9")));
        assert!(list.allows(ip("::1")));
        let list = AllowList::parse(["127.0.0.1", "::1"]).unwrap();
        assert!(list.allows(ip("127.0.0.1")));
        assert!(list.allows(ip("::1")));
        assert!(!list.allows(ip("127.0.0.2")));
    }

    #[test]
    fn allow_list_parse_reports_the_bad_item() {
        let e = AllowList::parse(["10.0.0.0/8", "10.0.0.0/40"]).unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/40"), "{e}");
    }

    #[test]
    fn control_addresses_are_recognised() {
        for a in CONTROL_ADDRESSES {
            assert!(is_control(a), "{a}");
        }
        assert!(is_control("/roomscore/*"));
        assert!(is_control("/roomscore/{scene,tempo}"));
        for a in [
            "/roomscore/movement",
            "/roomscore/in/door",
            "/roomscore/scene/x",
            "/other",
        ] {
            assert!(!is_control(a), "{a}");
        }
    }

    #[test]
    fn check_gates_sensors_then_control() {
        let access = Access {
            sensors: AllowList::parse(["192.168.1.0/24"]).unwrap(),
            control: AllowList::parse(["192.168.1.10"]).unwrap(),
        };
        let desk = ip("192.168.1.10");
        let sensor = ip("192.168.1.50");
        let outsider = ip("10.0.0.1");

        assert_eq!(access.check(desk, "/roomscore/scene"), Ok(()));
        assert_eq!(access.check(desk, "/roomscore/movement"), Ok(()));
        assert_eq!(access.check(sensor, "/roomscore/movement"), Ok(()));
        assert_eq!(access.check(sensor, "/roomscore/in/door"), Ok(()));

        let e = access.check(sensor, "/roomscore/tempo").unwrap_err();
        assert_eq!(e.gate, Gate::Control);
        assert_eq!(
            e.to_string(),
            "OSC \"/roomscore/tempo\" from 192.168.1.50 denied: not in --control-allow"
        );
        for a in ["/roomscore/volume", "/roomscore/note", "/roomscore/status"] {
            assert_eq!(access.check(sensor, a).unwrap_err().gate, Gate::Control);
        }

        let e = access.check(outsider, "/roomscore/movement").unwrap_err();
        assert_eq!(e.gate, Gate::Sensors);
        assert!(e.to_string().contains("--osc-allow"), "{e}");
    }

    #[test]
    fn control_allow_cannot_widen_osc_allow() {
        let access = Access {
            sensors: AllowList::parse(["192.168.1.0/24"]).unwrap(),
            control: AllowList::parse(["10.0.0.1"]).unwrap(),
        };
        let e = access
            .check(ip("10.0.0.1"), "/roomscore/scene")
            .unwrap_err();
        assert_eq!(e.gate, Gate::Sensors);
    }

    #[test]
    fn empty_control_list_defers_to_sensors() {
        let access = Access {
            sensors: AllowList::parse(["192.168.1.0/24"]).unwrap(),
            control: AllowList::default(),
        };
        assert_eq!(access.check(ip("192.168.1.7"), "/roomscore/scene"), Ok(()));
        assert!(Access::default()
            .check(ip("::1"), "/roomscore/scene")
            .is_ok());
    }
}
