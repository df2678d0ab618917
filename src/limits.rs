//! Per-address limits shared by every listener: how many sessions one client address may hold
//! open before it has authenticated (`limits.connections_per_ip`), and how many failed logins
//! it may have in a sliding window before its further attempts are refused locally
//! (`limits.auth_failures_per_ip` within `limits.auth_failure_window`, [`AuthThrottle`]).
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

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

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
    /// 0: no limit. Changed in place by a reload ([`PerIpLimiter::set_limit`]).
    limit: AtomicU32,
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
                limit: AtomicU32::new(limit),
                counts: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Counts one more session for `ip`, or `None` if the address is at its limit. The session
    /// counts until the guard is dropped. With the limit off the guard counts nothing.
    pub fn try_acquire(&self, ip: IpAddr) -> Option<PerIpGuard> {
        let limit = self.limit();
        if limit == 0 {
            return Some(PerIpGuard { held: None });
        }
        let key = IpKey::of(ip);
        let mut counts = self.inner.counts();
        let count = counts.entry(key).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(PerIpGuard {
            held: Some((self.inner.clone(), key)),
        })
    }

    /// The limit now.
    pub fn limit(&self) -> u32 {
        self.inner.limit.load(Ordering::Relaxed)
    }

    /// A reload's new limit, for sessions admitted from now on; the table and its counts stay
    /// (sessions over a lowered limit go on, and the address gets no new one until below it).
    /// Sessions admitted while the limit was 0 were not counted and never will be.
    pub fn set_limit(&self, limit: u32) {
        self.inner.limit.store(limit, Ordering::Relaxed);
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

/// How many client addresses [`AuthThrottle`] remembers at most. An entry is a key and a queue
/// header (about 64 bytes with the map's slot) plus at most `auth_failures_per_ip` instants of
/// 16 bytes each: with the default of 10 failures the table stays near 16,384 × 224 bytes,
/// about 3.5 MiB, however many addresses an attacker uses (and the configuration caps the
/// limit at [`MAX_AUTH_FAILURES_PER_IP`], about 27 MiB). Past it, the address whose latest
/// failure is oldest is forgotten first.
pub const AUTH_THROTTLE_ADDRESSES: usize = 16_384;

/// The largest `limits.auth_failures_per_ip` the configuration accepts: the per-address queue
/// holds that many instants, and a throttle that waits for more than 100 wrong passwords from
/// one address protects nothing.
pub const MAX_AUTH_FAILURES_PER_IP: u32 = 100;

/// Failed logins per client address in a sliding window, across all listeners and protocols:
/// once an address has `limit` failures younger than `window`, its further attempts are refused
/// here and never reach the backend, until its oldest failure leaves the window. Cheap to
/// clone: clones share one table.
///
/// Memory is bounded: at most [`AUTH_THROTTLE_ADDRESSES`] addresses, each with at most `limit`
/// instants (only the newest `limit` decide whether an address is throttled).
#[derive(Clone, Debug)]
pub struct AuthThrottle {
    inner: Arc<ThrottleInner>,
}

#[derive(Debug)]
struct ThrottleInner {
    /// 0: off. This and `window_ns` change in place on a reload ([`AuthThrottle::set_limits`]).
    limit: AtomicU32,
    /// The window in nanoseconds.
    window_ns: AtomicU64,
    capacity: usize,
    table: Mutex<HashMap<IpKey, VecDeque<Instant>>>,
}

impl ThrottleInner {
    /// Every change leaves the table consistent, so a poisoned lock is still usable.
    fn table(&self) -> MutexGuard<'_, HashMap<IpKey, VecDeque<Instant>>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.load(Ordering::Relaxed))
    }

    /// Drops the failures of `times` that left the window.
    fn expire(&self, times: &mut VecDeque<Instant>, now: Instant) {
        let window = self.window();
        while times
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            times.pop_front();
        }
    }
}

impl AuthThrottle {
    /// `limit` failures per address within `window`; a `limit` of 0 turns the throttle off.
    pub fn new(limit: u32, window: Duration) -> AuthThrottle {
        AuthThrottle::with_capacity(limit, window, AUTH_THROTTLE_ADDRESSES)
    }

    /// As [`AuthThrottle::new`], remembering at most `capacity` addresses (at least one).
    pub fn with_capacity(limit: u32, window: Duration, capacity: usize) -> AuthThrottle {
        AuthThrottle {
            inner: Arc::new(ThrottleInner {
                limit: AtomicU32::new(limit),
                window_ns: AtomicU64::new(nanos(window)),
                capacity: capacity.max(1),
                table: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A reload's new limit and window; the failures remembered stay and are judged by them.
    pub fn set_limits(&self, limit: u32, window: Duration) {
        self.inner.window_ns.store(nanos(window), Ordering::Relaxed);
        self.inner.limit.store(limit, Ordering::Relaxed);
    }

    /// Whether `ip`'s further login attempts are refused now.
    pub fn throttled(&self, ip: IpAddr) -> bool {
        self.remaining(ip) == 0
    }

    /// How many more failures `ip` may have before it is throttled (`u32::MAX` when the
    /// throttle is off). A session's machine counts down from this itself, so failures seen
    /// within one read (pipelined logins) are counted before the next attempt goes out.
    pub fn remaining(&self, ip: IpAddr) -> u32 {
        let inner = &self.inner;
        let limit = inner.limit();
        if limit == 0 {
            return u32::MAX;
        }
        let key = IpKey::of(ip);
        let mut table = inner.table();
        let Some(times) = table.get_mut(&key) else {
            return limit;
        };
        inner.expire(times, Instant::now());
        if times.is_empty() {
            table.remove(&key);
            return limit;
        }
        let used = u32::try_from(times.len()).unwrap_or(u32::MAX);
        limit.saturating_sub(used)
    }

    /// Counts a backend's refusal of a login from `ip`.
    pub fn record_failure(&self, ip: IpAddr) {
        let inner = &self.inner;
        let limit = inner.limit();
        if limit == 0 {
            return;
        }
        let key = IpKey::of(ip);
        let now = Instant::now();
        let keep = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut table = inner.table();
        if !table.contains_key(&key) && table.len() >= inner.capacity {
            evict_stalest(&mut table);
        }
        let times = table
            .entry(key)
            .or_insert_with(|| VecDeque::with_capacity(keep));
        inner.expire(times, now);
        times.push_back(now);
        // Only the newest `limit` failures can keep the address throttled: older ones leave the
        // window first.
        while times.len() > keep {
            times.pop_front();
        }
    }

    /// Addresses remembered now (the table's size).
    pub fn addresses(&self) -> usize {
        self.inner.table().len()
    }
}

/// Forgets the address whose newest failure is oldest (least recently failed). A linear scan,
/// but only when the table is full, and only under a flood of failures from distinct addresses;
/// 16,384 entries take some tens of microseconds.
/// A window as nanoseconds for an atomic; a window past u64 nanoseconds (584 years) saturates.
fn nanos(window: Duration) -> u64 {
    u64::try_from(window.as_nanos()).unwrap_or(u64::MAX)
}

fn evict_stalest(table: &mut HashMap<IpKey, VecDeque<Instant>>) {
    let stalest = table
        .iter()
        .min_by_key(|(_, times)| times.back().copied())
        .map(|(key, _)| *key);
    if let Some(key) = stalest {
        table.remove(&key);
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

    const WINDOW: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn the_throttle_slides_its_window_and_spares_other_addresses() {
        let throttle = AuthThrottle::new(2, WINDOW);
        let a = ip("192.0.2.1");
        assert_eq!(throttle.remaining(a), 2);
        throttle.record_failure(a);
        tokio::time::advance(Duration::from_secs(30)).await;
        throttle.record_failure(a);
        assert!(throttle.throttled(a));
        // A mapped address is the same client; another address is not.
        assert!(throttle.throttled(ip("::ffff:192.0.2.1")));
        assert!(!throttle.throttled(ip("192.0.2.2")));
        // The first failure leaves the window 60 s after it happened, the second 30 s later.
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(throttle.throttled(a));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(throttle.remaining(a), 1);
        throttle.record_failure(a);
        assert!(throttle.throttled(a));
        tokio::time::advance(WINDOW).await;
        assert_eq!(throttle.remaining(a), 2);
        assert_eq!(
            throttle.addresses(),
            0,
            "an address with no failures left is forgotten"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_throttle_keeps_at_most_limit_failures_per_address() {
        let throttle = AuthThrottle::new(3, WINDOW);
        let a = ip("192.0.2.1");
        for _ in 0..1000 {
            throttle.record_failure(a);
        }
        assert!(throttle.throttled(a));
        let kept = throttle.inner.table().get(&IpKey::of(a)).map(VecDeque::len);
        assert_eq!(kept, Some(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_throttle_table_forgets_the_address_that_failed_longest_ago() {
        let throttle = AuthThrottle::with_capacity(1, WINDOW, 4);
        for i in 1..=4u8 {
            throttle.record_failure(IpAddr::from([10, 0, 0, i]));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // 10.0.0.1 failed again most recently, so 10.0.0.2 is the stalest.
        throttle.record_failure(ip("10.0.0.1"));
        tokio::time::advance(Duration::from_secs(1)).await;
        throttle.record_failure(ip("10.0.0.5"));
        assert_eq!(throttle.addresses(), 4);
        assert!(!throttle.throttled(ip("10.0.0.2")));
        for kept in ["10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5"] {
            assert!(throttle.throttled(ip(kept)), "{kept}");
        }
        for i in 0..=255u8 {
            throttle.record_failure(IpAddr::from([10, 0, 1, i]));
        }
        assert_eq!(throttle.addresses(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn one_ipv6_slash_64_shares_one_failure_count() {
        let throttle = AuthThrottle::new(2, WINDOW);
        throttle.record_failure(ip("2001:db8::1"));
        throttle.record_failure(ip("2001:db8::ffff"));
        assert!(throttle.throttled(ip("2001:db8::2")));
        assert!(!throttle.throttled(ip("2001:db8:0:1::1")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_failure_limit_turns_the_throttle_off_and_keeps_no_table() {
        let throttle = AuthThrottle::new(0, WINDOW);
        for _ in 0..100 {
            throttle.record_failure(ip("192.0.2.1"));
        }
        assert!(!throttle.throttled(ip("192.0.2.1")));
        assert_eq!(throttle.remaining(ip("192.0.2.1")), u32::MAX);
        assert_eq!(throttle.addresses(), 0);
    }
}
