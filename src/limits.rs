//! Per-address limits shared by every listener: how many sessions one client address may hold
//! open before it has authenticated (`limits.connections_per_ip`).
//!
//! Only sessions that have not authenticated count. Every abuse of a front proxy found so far
//! (silent sockets, slow trickles, handshake floods) happens before login, while an office behind
//! one NAT address legitimately holds hundreds of authenticated IMAP IDLE connections that the
//! backend already admitted. So a session takes a [`PerIpGuard`] at accept and gives it back when
//! the backend accepts its login (or when it closes, whichever comes first).
//!
//! IPv6 addresses count by /64: one subscriber line or host is normally given a whole /64
//! (RFC 6177 §2, RFC 7934), so counting single IPv6 addresses would let one client rotate through
//! 2^64 of them.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// What one client address counts as: an IPv4 address, or the /64 prefix of an IPv6 address.
/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, seen on dual-stack sockets) is the IPv4
/// client it stands for, so a client counts the same on either kind of listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpKey {
    V4(Ipv4Addr),
    /// The upper 64 bits of the address.
    V6Prefix(u64),
}

impl IpKey {
    pub fn of(ip: IpAddr) -> IpKey {
        match ip {
            IpAddr::V4(v4) => IpKey::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpKey::V4(v4),
                None => IpKey::V6Prefix((v6.to_bits() >> 64) as u64),
            },
        }
    }
}

/// Counts the unauthenticated sessions of each client address across all listeners. Cheap to
/// clone: clones share one table.
#[derive(Clone, Debug)]
pub struct PerIpLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// 0: no limit.
    limit: u32,
    /// Only addresses with at least one counted session have an entry, so the table is never
    /// larger than the number of open unauthenticated sessions (itself bounded by the
    /// listeners' `max_connections`).
    counts: Mutex<HashMap<IpKey, u32>>,
}

impl Inner {
    /// The table stays consistent whatever a panicking holder did (each change is one
    /// statement), so a poisoned lock is still usable.
    fn counts(&self) -> MutexGuard<'_, HashMap<IpKey, u32>> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl PerIpLimiter {
    /// `limit` sessions per address; 0 turns the limit off.
    pub fn new(limit: u32) -> PerIpLimiter {
        PerIpLimiter {
            inner: Arc::new(Inner {
                limit,
                counts: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Counts one more session for `ip`, or `None` if the address is at its limit. The session
    /// counts until the guard is dropped. With the limit off the guard counts nothing.
    pub fn try_acquire(&self, ip: IpAddr) -> Option<PerIpGuard> {
        if self.inner.limit == 0 {
            return Some(PerIpGuard { held: None });
        }
        let key = IpKey::of(ip);
        let mut counts = self.inner.counts();
        let count = counts.entry(key).or_insert(0);
        if *count >= self.inner.limit {
            return None;
        }
        *count += 1;
        Some(PerIpGuard {
            held: Some((self.inner.clone(), key)),
        })
    }

    /// Unauthenticated sessions counted for `ip` now.
    pub fn count(&self, ip: IpAddr) -> u32 {
        self.inner
            .counts()
            .get(&IpKey::of(ip))
            .copied()
            .unwrap_or(0)
    }

    /// Addresses with at least one counted session (the table's size).
    pub fn addresses(&self) -> usize {
        self.inner.counts().len()
    }
}

/// One counted session; dropping it (at login or close) uncounts it.
#[derive(Debug)]
pub struct PerIpGuard {
    held: Option<(Arc<Inner>, IpKey)>,
}

impl Drop for PerIpGuard {
    fn drop(&mut self) {
        let Some((inner, key)) = self.held.take() else {
            return;
        };
        let mut counts = inner.counts();
        if let Some(count) = counts.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_addresses_count_one_by_one() {
        assert_eq!(IpKey::of(ip("192.0.2.1")), IpKey::of(ip("192.0.2.1")));
        assert_ne!(IpKey::of(ip("192.0.2.1")), IpKey::of(ip("192.0.2.2")));
    }

    #[test]
    fn ipv6_addresses_count_by_slash_64() {
        assert_eq!(
            IpKey::of(ip("2001:db8:1:2::1")),
            IpKey::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_eq!(
            IpKey::of(ip("2001:db8:1:2::1")),
            IpKey::V6Prefix(0x2001_0db8_0001_0002)
        );
        assert_ne!(
            IpKey::of(ip("2001:db8:1:2::1")),
            IpKey::of(ip("2001:db8:1:3::1"))
        );
    }

    #[test]
    fn an_ipv4_mapped_address_counts_as_its_ipv4_address() {
        assert_eq!(
            IpKey::of(ip("::ffff:192.0.2.1")),
            IpKey::V4("192.0.2.1".parse().unwrap())
        );
        // The deprecated IPv4-compatible form (RFC 4291 §2.5.5.1) is an ordinary IPv6 address.
        assert!(matches!(IpKey::of(ip("::192.0.2.1")), IpKey::V6Prefix(0)));
    }

    #[test]
    fn the_limit_refuses_only_the_address_that_reached_it() {
        let limiter = PerIpLimiter::new(2);
        let a = limiter.try_acquire(ip("192.0.2.1")).unwrap();
        let b = limiter.try_acquire(ip("192.0.2.1")).unwrap();
        assert!(limiter.try_acquire(ip("192.0.2.1")).is_none());
        // A mapped address is the same client.
        assert!(limiter.try_acquire(ip("::ffff:192.0.2.1")).is_none());
        let other = limiter.try_acquire(ip("192.0.2.2")).unwrap();
        assert_eq!(limiter.count(ip("192.0.2.1")), 2);
        drop(a);
        let c = limiter.try_acquire(ip("192.0.2.1")).unwrap();
        drop((b, c, other));
    }

    #[test]
    fn one_ipv6_slash_64_shares_one_count() {
        let limiter = PerIpLimiter::new(1);
        let _a = limiter.try_acquire(ip("2001:db8::1")).unwrap();
        assert!(limiter.try_acquire(ip("2001:db8::2")).is_none());
        assert!(limiter.try_acquire(ip("2001:db8:0:1::1")).is_some());
    }

    #[test]
    fn released_addresses_leave_the_table() {
        let limiter = PerIpLimiter::new(3);
        let guards: Vec<_> = (0..100u8)
            .map(|i| limiter.try_acquire(IpAddr::from([10, 0, 0, i])).unwrap())
            .collect();
        assert_eq!(limiter.addresses(), 100);
        drop(guards);
        assert_eq!(limiter.addresses(), 0);
        assert_eq!(limiter.count(ip("10.0.0.1")), 0);
    }

    #[test]
    fn zero_turns_the_limit_off_and_keeps_no_table() {
        let limiter = PerIpLimiter::new(0);
        let guards: Vec<_> = (0..1000)
            .map(|_| limiter.try_acquire(ip("192.0.2.1")).unwrap())
            .collect();
        assert_eq!(limiter.addresses(), 0);
        drop(guards);
    }
}
