//! IP networks in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`, or a bare address for one
//! host), for `listeners[].proxy_protocol_from`.

use std::fmt;
use std::net::IpAddr;

/// One network. Addresses are compared as given: admission (`src/admission.rs`) has already
/// made an IPv4-mapped IPv6 peer (`::ffff:a.b.c.d`, from a dual-stack socket) the IPv4 address it
/// stands for, so it matches the IPv4 networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Parses `addr/prefix` or a bare address; host bits must be zero, so a typo like
    /// `10.0.0.1/8` is caught rather than silently widened.
    pub fn parse(s: &str) -> Result<Network, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && (p == "0" || !p.starts_with('0')) => n,
                _ => return Err(format!("{s:?}: the prefix length must be 0-{max}")),
            },
        };
        let net = Network { addr, prefix };
        if net.masked(addr) != addr {
            return Err(format!(
                "{s:?} has host bits set (did you mean {}?)",
                Network {
                    addr: net.masked(addr),
                    prefix
                }
            ));
        }
        Ok(net)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && self.masked(ip) == self.addr
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Whether any of `networks` holds `ip`.
pub fn any_contains(networks: &[Network], ip: IpAddr) -> bool {
    networks.iter().any(|n| n.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_hold_their_addresses_and_nothing_else() {
        let n = Network::parse("10.0.0.0/8").unwrap();
        assert!(n.contains(ip("10.1.2.3")));
        // A mapped peer matches as admission hands it over: as the IPv4 address it stands for.
        let mapped = crate::admission::canonical("[::ffff:10.1.2.3]:1".parse().unwrap());
        assert!(n.contains(mapped.ip()));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(!n.contains(ip("::a01:203")));
        let host = Network::parse("127.0.0.1").unwrap();
        assert_eq!(host.to_string(), "127.0.0.1/32");
        assert!(host.contains(ip("127.0.0.1")) && !host.contains(ip("127.0.0.2")));
        let v6 = Network::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::1")));
        let all = Network::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("203.0.113.9")) && !all.contains(ip("2001:db8::1")));
        assert!(Network::parse("::/0").unwrap().contains(ip("2001:db8::1")));
    }

    #[test]
    fn bad_networks_are_refused_with_a_reason() {
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/08",
            "ten",
            "::/129",
            "",
        ] {
            assert!(Network::parse(bad).is_err(), "{bad}");
        }
        assert!(
            Network::parse("10.0.0.1/8")
                .unwrap_err()
                .contains("10.0.0.0/8")
        );
    }
}
