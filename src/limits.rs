//! Per-address limits shared by every listener: how many sessions one client address may hold
//! open before it has authenticated (`limits.connections_per_ip`), and how many login attempts
//! that did not succeed it may have in a sliding window before its further attempts are refused
//! locally (`limits.auth_failures_per_ip` within `limits.auth_failure_window`,
//! [`AuthThrottle`]: charged when sent, refunded on success).
//!
//! Only sessions that have not authenticated count. Every abuse of a front proxy found so far
//! (silent sockets, slow trickles, handshake floods) happens before login, while an office behind
//! one NAT address legitimately holds hundreds of authenticated IMAP IDLE connections that the
//! backend already admitted. So a session takes a [`PerIpGuard`] at accept and gives it back when
//! the backend accepts its login (or when it closes, whichever comes first).
//!
//! IPv6 addresses count by /64: one subscriber line or host is normally given a whole /64
//! (RFC 6177 §2, RFC 7934), so counting single IPv6 addresses would let one client rotate through
//! 2^64 of them. IPv6 addresses that embed an IPv4 client through a NAT64 count as that IPv4
//! address ([`IpKey`]); IPv4-mapped ones never get here, admission made them IPv4 already.
//!
//! With `shared_state` both counts are also kept in Redis/Valkey ([`crate::shared_state`]), so
//! the replicas of one deployment enforce one limit: the local table still answers first (an
//! address this replica already refuses costs no round trip), then the store decides; when the
//! store is down or slow the local answer stands, exactly as without `shared_state`.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::shared_state::SharedState;

/// What one client address counts as: an IPv4 address, or the /64 prefix of an IPv6 address.
///
/// IPv6 addresses that stand for an IPv4 client count as that IPv4 address, so a client counts
/// the same however it reaches mailfront, and the clients behind a NAT64 are not lumped into
/// the translator's one /64. IPv4-mapped addresses (`::ffff:a.b.c.d`, RFC 4291 §2.5.5.2, seen on
/// dual-stack sockets) arrive as IPv4 already: admission (`src/admission.rs`) makes every
/// client address canonical once, before any count. Here:
/// - the NAT64 well-known prefix `64:ff9b::/96` (RFC 6052 §2.1), whose last 32 bits are the
///   IPv4 address (RFC 6052 §2.2, the /96 row);
/// - the local-use prefix `64:ff9b:1::/48` (RFC 8215 §3). Operators carve their translation
///   prefix out of it; mailfront assumes a /96 there too, as is usual, and takes the last 32
///   bits. With a shorter prefix RFC 6052 §2.2 puts the IPv4 address elsewhere (from bit 48 for
///   a /48, around the reserved octet at bits 64..72), and the last 32 bits are then mostly the
///   zero suffix: clients would share keys and be counted together, never one client spread
///   over many keys.
///
/// The deprecated IPv4-compatible form (`::a.b.c.d`, RFC 4291 §2.5.5.1) is an ordinary IPv6
/// address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpKey {
    V4(Ipv4Addr),
    /// The upper 64 bits of the address.
    V6Prefix(u64),
}

/// How the key is written in the shared store: `192.0.2.1`, or `2001:db8:1:2::/64`.
impl std::fmt::Display for IpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IpKey::V4(v4) => write!(f, "{v4}"),
            IpKey::V6Prefix(prefix) => {
                write!(f, "{}/64", Ipv6Addr::from_bits(u128::from(*prefix) << 64))
            }
        }
    }
}

/// `64:ff9b::/96`, the NAT64 well-known prefix (RFC 6052 §2.1), shifted right by 32 bits.
const NAT64_WELL_KNOWN: u128 = 0x0064_ff9b_0000_0000_0000_0000;
/// `64:ff9b:1::/48`, the NAT64 local-use prefix (RFC 8215 §3), shifted right by 80 bits.
const NAT64_LOCAL_USE: u128 = 0x0064_ff9b_0001;

impl IpKey {
    pub fn of(ip: IpAddr) -> IpKey {
        match ip {
            IpAddr::V4(v4) => IpKey::V4(v4),
            IpAddr::V6(v6) => {
                let bits = v6.to_bits();
                if bits >> 32 == NAT64_WELL_KNOWN || bits >> 80 == NAT64_LOCAL_USE {
                    // The last 32 bits (the /96 embedding of RFC 6052 §2.2).
                    return IpKey::V4(Ipv4Addr::from_bits(bits as u32));
                }
                IpKey::V6Prefix((bits >> 64) as u64)
            }
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
    /// `shared_state`, when configured.
    shared: Option<Arc<SharedState>>,
    /// Of `counts`, the sessions also counted in the shared store (the ones to release there,
    /// and what each lease refresh rewrites this replica's hash from).
    remote: Mutex<HashMap<IpKey, u32>>,
}

impl Inner {
    /// The table stays consistent whatever a panicking holder did (each change is one
    /// statement), so a poisoned lock is still usable.
    fn counts(&self) -> MutexGuard<'_, HashMap<IpKey, u32>> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn remote(&self) -> MutexGuard<'_, HashMap<IpKey, u32>> {
        self.remote.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl PerIpLimiter {
    /// `limit` sessions per address; 0 turns the limit off.
    #[cfg(test)]
    pub(crate) fn new(limit: u32) -> PerIpLimiter {
        PerIpLimiter::with_shared(limit, None)
    }

    /// As [`PerIpLimiter::new`], also counting in `shared` ([`PerIpGuard::share`]).
    pub fn with_shared(limit: u32, shared: Option<Arc<SharedState>>) -> PerIpLimiter {
        PerIpLimiter {
            inner: Arc::new(Inner {
                limit: AtomicU32::new(limit),
                counts: Mutex::new(HashMap::new()),
                shared,
                remote: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The sessions this replica has counted in the shared store, by address: what its lease
    /// refresh writes there.
    pub fn shared_slots(&self) -> Vec<(IpKey, u32)> {
        self.inner
            .remote()
            .iter()
            .map(|(key, count)| (*key, *count))
            .collect()
    }

    /// Counts one more session for `ip`, or `None` if the address is at its limit. The session
    /// counts until the guard is dropped. With the limit off the guard counts nothing.
    pub fn try_acquire(&self, ip: IpAddr) -> Option<PerIpGuard> {
        let limit = self.limit();
        if limit == 0 {
            return Some(PerIpGuard {
                held: None,
                remote: false,
            });
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
            remote: false,
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
    #[cfg(test)]
    pub(crate) fn count(&self, ip: IpAddr) -> u32 {
        self.inner
            .counts()
            .get(&IpKey::of(ip))
            .copied()
            .unwrap_or(0)
    }

    /// Addresses with at least one counted session (the table's size).
    #[cfg(test)]
    pub(crate) fn addresses(&self) -> usize {
        self.inner.counts().len()
    }
}

/// One counted session; dropping it (at login or close) uncounts it.
#[derive(Debug)]
pub struct PerIpGuard {
    held: Option<(Arc<Inner>, IpKey)>,
    /// Also counted in the shared store.
    remote: bool,
}

impl PerIpGuard {
    /// With `shared_state`, counts the session in the shared store too, if the live replicas
    /// together hold fewer than the limit for its address (one round trip). `false`: they do,
    /// and the session must be refused (dropping the guard uncounts it locally). With the store
    /// down or slow the local count, already taken, is the answer: `true`.
    pub async fn share(&mut self) -> bool {
        let Some((inner, key)) = &self.held else {
            return true;
        };
        let Some(shared) = &inner.shared else {
            return true;
        };
        match shared
            .acquire(*key, inner.limit.load(Ordering::Relaxed))
            .await
        {
            Some(true) => {
                *inner.remote().entry(*key).or_insert(0) += 1;
                self.remote = true;
                true
            }
            Some(false) => false,
            None => true,
        }
    }
}

impl Drop for PerIpGuard {
    fn drop(&mut self) {
        let Some((inner, key)) = self.held.take() else {
            return;
        };
        if self.remote {
            let mut remote = inner.remote();
            if let Some(count) = remote.get_mut(&key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    remote.remove(&key);
                }
            }
            drop(remote);
            if let Some(shared) = &inner.shared {
                shared.release(key);
            }
        }
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
/// header (about 64 bytes with the map's slot) plus at most `auth_failures_per_ip` charges of
/// 24 bytes each (an instant and an id): with the default of 10 the table stays near
/// 16,384 × 304 bytes, about 5 MiB, however many addresses an attacker uses (and the
/// configuration caps the limit at [`MAX_AUTH_FAILURES_PER_IP`], about 38 MiB). Past it, the
/// address whose latest charge is oldest is forgotten first.
pub const AUTH_THROTTLE_ADDRESSES: usize = 16_384;

/// The largest `limits.auth_failures_per_ip` the configuration accepts: the per-address queue
/// holds that many charges, and a throttle that waits for more than 100 wrong passwords from
/// one address protects nothing.
pub const MAX_AUTH_FAILURES_PER_IP: u32 = 100;

/// Login attempts per client address in a sliding window, across all listeners and protocols.
/// Cheap to clone: clones share one table.
///
/// An attempt is charged when it is sent, before the backend has checked anything
/// ([`AuthThrottle::try_charge`]), and the charge is a reservation: the backend's success, or an
/// answer that says no credential was checked, gives it back ([`AuthThrottle::refund`]); a
/// failure, or a session that ends before the verdict, keeps it. So what the limit counts is
/// the attempts that were not refunded, and two properties hold by construction rather than by
/// timing:
/// - A client that hangs up before a slow failure (Dovecot's `auth_failure_delay`) still pays:
///   the charge was taken before the password left.
/// - Concurrent sessions cannot all pass one check before any of them is counted: checking the
///   count and adding the charge is one step under one lock, so at most `limit` attempts from
///   one address are ever unrefunded within a window, however many sessions race.
///
/// Once an address has `limit` unrefunded charges younger than `window`, its further attempts
/// are refused here and never reach the backend, until its oldest charge leaves the window.
///
/// The reservation is shaped so that it can become one atomic step of a shared store: per
/// address a sorted set scored by time whose members are charge ids. With Redis, a Lua script
/// doing `ZREMRANGEBYSCORE key -inf now-window`, `ZCARD key`, and if below the limit
/// `ZADD key now id` (plus `PEXPIRE key window`) is `try_charge`, and `ZREM key id` is `refund`.
///
/// Memory is bounded: at most [`AUTH_THROTTLE_ADDRESSES`] addresses, each with at most `limit`
/// charges (a charge is refused, not added, once an address has `limit`).
#[derive(Clone, Debug)]
pub struct AuthThrottle {
    inner: Arc<ThrottleInner>,
}

/// One login attempt charged by [`AuthThrottle::try_charge`]: give it to
/// [`AuthThrottle::refund`] when the attempt turns out not to count. Dropping it keeps the
/// attempt counted until it leaves the window: that is what a session that ends before the
/// backend's verdict does. Not `Clone`, so it is refunded at most once.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "dropping a charge keeps the attempt counted; refund it if it does not count"]
pub struct AuthCharge {
    /// `None` when the throttle is off: nothing was charged.
    entry: Option<(IpKey, u64)>,
    /// The charge's id in the shared store, when it was charged there too.
    remote: Option<String>,
}

#[derive(Debug)]
struct ThrottleInner {
    /// 0: off. This and `window_ns` change in place on a reload ([`AuthThrottle::set_limits`]).
    limit: AtomicU32,
    /// The window in nanoseconds.
    window_ns: AtomicU64,
    capacity: usize,
    table: Mutex<Table>,
    /// `shared_state`, when configured.
    shared: Option<Arc<SharedState>>,
}

/// The charges of each address, oldest first, and the source of charge ids.
#[derive(Debug, Default)]
struct Table {
    charges: HashMap<IpKey, VecDeque<Charged>>,
    /// The id of the next charge: unique for the throttle's life (2^64 charges do not happen),
    /// so a refund removes its own charge even after later ones were added or older ones left.
    next_id: u64,
}

/// One charge in the table.
#[derive(Debug, Clone, Copy)]
struct Charged {
    at: Instant,
    id: u64,
}

impl ThrottleInner {
    /// Every change leaves the table consistent, so a poisoned lock is still usable.
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the charges of `charges` that left the window.
    fn expire(&self, charges: &mut VecDeque<Charged>, now: Instant) {
        let window = self.window();
        while charges
            .front()
            .is_some_and(|c| now.saturating_duration_since(c.at) >= window)
        {
            charges.pop_front();
        }
    }

    /// The limit now (0: off); a reload may change it ([`AuthThrottle::set_limits`]).
    fn limit(&self) -> usize {
        usize::try_from(self.limit.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.load(Ordering::Relaxed))
    }
}

impl AuthThrottle {
    /// `limit` attempts per address within `window`; a `limit` of 0 turns the throttle off.
    pub fn new(limit: u32, window: Duration) -> AuthThrottle {
        AuthThrottle::build(limit, window, AUTH_THROTTLE_ADDRESSES, None)
    }

    /// As [`AuthThrottle::new`], remembering at most `capacity` addresses (at least one).
    #[cfg(test)]
    pub(crate) fn with_capacity(limit: u32, window: Duration, capacity: usize) -> AuthThrottle {
        AuthThrottle::build(limit, window, capacity, None)
    }

    /// As [`AuthThrottle::new`], also counting in `shared` ([`AuthThrottle::charge`]).
    pub fn with_shared(
        limit: u32,
        window: Duration,
        shared: Option<Arc<SharedState>>,
    ) -> AuthThrottle {
        AuthThrottle::build(limit, window, AUTH_THROTTLE_ADDRESSES, shared)
    }

    fn build(
        limit: u32,
        window: Duration,
        capacity: usize,
        shared: Option<Arc<SharedState>>,
    ) -> AuthThrottle {
        AuthThrottle {
            inner: Arc::new(ThrottleInner {
                limit: AtomicU32::new(limit),
                window_ns: AtomicU64::new(nanos(window)),
                capacity: capacity.max(1),
                table: Mutex::new(Table::default()),
                shared,
            }),
        }
    }

    /// [`AuthThrottle::try_charge`], then, with `shared_state`, the same charge in the shared
    /// store, whose answer decides ([`crate::shared_state::CHARGE`]: at most `limit` unrefunded
    /// charges per address within the window across all replicas, concurrent sessions included).
    /// An address this replica already refuses costs no round trip; any other costs one. With
    /// the store down or slow, the local answer stands.
    pub async fn charge(&self, ip: IpAddr) -> Option<AuthCharge> {
        let mut charge = self.try_charge(ip)?;
        let (Some(shared), Some((key, _))) = (&self.inner.shared, charge.entry) else {
            return Some(charge);
        };
        let id = shared.charge_id();
        match shared
            .charge(
                key,
                &id,
                self.inner.limit.load(Ordering::Relaxed),
                self.inner.window(),
            )
            .await
        {
            Some(true) => {
                charge.remote = Some(id);
                Some(charge)
            }
            Some(false) => {
                self.refund(charge);
                None
            }
            None => Some(charge),
        }
    }

    /// Charges one login attempt from `ip`, or `None` if the address already has `limit`
    /// unrefunded charges in the window: then the attempt must not go out. Checking and charging
    /// are one step under the table's lock, so concurrent sessions never pass the limit
    /// together. With the throttle off every attempt is granted and nothing is kept.
    pub fn try_charge(&self, ip: IpAddr) -> Option<AuthCharge> {
        let inner = &self.inner;
        if inner.limit() == 0 {
            return Some(AuthCharge {
                entry: None,
                remote: None,
            });
        }
        let key = IpKey::of(ip);
        let now = Instant::now();
        let mut table = inner.table();
        if let Some(charges) = table.charges.get_mut(&key) {
            inner.expire(charges, now);
            if charges.len() >= inner.limit() {
                return None;
            }
        } else if table.charges.len() >= inner.capacity {
            evict_stalest(&mut table.charges);
        }
        let id = table.next_id;
        table.next_id = table.next_id.wrapping_add(1);
        table
            .charges
            .entry(key)
            .or_insert_with(|| VecDeque::with_capacity(inner.limit().min(16)))
            .push_back(Charged { at: now, id });
        Some(AuthCharge {
            entry: Some((key, id)),
            remote: None,
        })
    }

    /// Gives back `charge`: the attempt succeeded, or no credential was checked. Removes exactly
    /// that charge, wherever it is in its address's queue; one that already left the window (or
    /// whose address was evicted) is simply gone.
    pub fn refund(&self, charge: AuthCharge) {
        let Some((key, id)) = charge.entry else {
            return;
        };
        if let (Some(shared), Some(remote)) = (&self.inner.shared, charge.remote) {
            shared.refund(key, remote);
        }
        let mut table = self.inner.table();
        let Some(charges) = table.charges.get_mut(&key) else {
            return;
        };
        if let Some(at) = charges.iter().position(|c| c.id == id) {
            charges.remove(at);
        }
        if charges.is_empty() {
            table.charges.remove(&key);
        }
    }

    /// Whether `ip`'s next login attempt would be refused now.
    pub fn throttled(&self, ip: IpAddr) -> bool {
        let inner = &self.inner;
        if inner.limit() == 0 {
            return false;
        }
        let mut table = inner.table();
        let Some(charges) = table.charges.get_mut(&IpKey::of(ip)) else {
            return false;
        };
        inner.expire(charges, Instant::now());
        if charges.is_empty() {
            table.charges.remove(&IpKey::of(ip));
            return false;
        }
        charges.len() >= inner.limit()
    }

    /// A reload's new limit and window: the charges remembered stay and are judged by them.
    pub fn set_limits(&self, limit: u32, window: Duration) {
        self.inner.window_ns.store(nanos(window), Ordering::Relaxed);
        self.inner.limit.store(limit, Ordering::Relaxed);
    }

    /// Addresses remembered now (the table's size).
    #[cfg(test)]
    pub(crate) fn addresses(&self) -> usize {
        self.inner.table().charges.len()
    }
}

/// A window as nanoseconds for an atomic; a window past u64 nanoseconds (584 years) saturates.
fn nanos(window: Duration) -> u64 {
    u64::try_from(window.as_nanos()).unwrap_or(u64::MAX)
}

/// Forgets the address whose newest charge is oldest (least recently charged). A linear scan,
/// but only when the table is full, and only under a flood of attempts from distinct addresses;
/// 16,384 entries take some tens of microseconds.
fn evict_stalest(table: &mut HashMap<IpKey, VecDeque<Charged>>) {
    let stalest = table
        .iter()
        .min_by_key(|(_, charges)| charges.back().map(|c| c.at))
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

    /// An address as admission hands it over (`src/admission.rs`): IPv4-mapped made IPv4.
    fn admitted(s: &str) -> IpAddr {
        crate::admission::canonical(std::net::SocketAddr::new(ip(s), 1)).ip()
    }

    #[test]
    fn an_ipv4_mapped_address_counts_as_its_ipv4_address() {
        assert_eq!(
            IpKey::of(admitted("::ffff:192.0.2.1")),
            IpKey::V4("192.0.2.1".parse().unwrap())
        );
        // The deprecated IPv4-compatible form (RFC 4291 §2.5.5.1) is an ordinary IPv6 address.
        assert!(matches!(IpKey::of(ip("::192.0.2.1")), IpKey::V6Prefix(0)));
        assert!(matches!(
            IpKey::of(admitted("::192.0.2.1")),
            IpKey::V6Prefix(0)
        ));
    }

    #[test]
    fn the_limit_refuses_only_the_address_that_reached_it() {
        let limiter = PerIpLimiter::new(2);
        let a = limiter.try_acquire(ip("192.0.2.1")).unwrap();
        let b = limiter.try_acquire(ip("192.0.2.1")).unwrap();
        assert!(limiter.try_acquire(ip("192.0.2.1")).is_none());
        // A mapped address is the same client.
        assert!(limiter.try_acquire(admitted("::ffff:192.0.2.1")).is_none());
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

    #[test]
    fn nat64_addresses_count_as_their_embedded_ipv4_address() {
        let v4 = IpKey::V4("192.0.2.33".parse().unwrap());
        // RFC 6052 §2.4's example: 192.0.2.33 in the well-known prefix.
        assert_eq!(IpKey::of(ip("64:ff9b::192.0.2.33")), v4);
        assert_eq!(IpKey::of(ip("64:ff9b::c000:221")), v4);
        // The local-use prefix of RFC 8215, with the usual /96 inside it.
        assert_eq!(IpKey::of(ip("64:ff9b:1::c000:221")), v4);
        assert_eq!(IpKey::of(ip("64:ff9b:1:abcd:0:1:c000:221")), v4);
        // The same client whichever way it came: IPv4, mapped, NAT64.
        assert_eq!(IpKey::of(ip("192.0.2.33")), v4);
        assert_eq!(IpKey::of(admitted("::ffff:192.0.2.33")), v4);
        // Two clients behind one translator are two keys.
        assert_ne!(
            IpKey::of(ip("64:ff9b::192.0.2.33")),
            IpKey::of(ip("64:ff9b::192.0.2.34"))
        );
        // Next to the prefixes: ordinary IPv6, by /64.
        assert_eq!(
            IpKey::of(ip("64:ff9b:0:0:1::c000:221")),
            IpKey::V6Prefix(0x0064_ff9b_0000_0000)
        );
        assert_eq!(
            IpKey::of(ip("64:ff9b:2::c000:221")),
            IpKey::V6Prefix(0x0064_ff9b_0002_0000)
        );
        assert_eq!(
            IpKey::of(ip("65:ff9b::c000:221")),
            IpKey::V6Prefix(0x0065_ff9b_0000_0000)
        );
    }

    #[test]
    fn nat64_clients_share_limits_with_their_ipv4_address() {
        let limiter = PerIpLimiter::new(1);
        let _a = limiter.try_acquire(ip("192.0.2.33")).unwrap();
        assert!(limiter.try_acquire(ip("64:ff9b::192.0.2.33")).is_none());
        assert!(limiter.try_acquire(ip("64:ff9b:1::192.0.2.33")).is_none());
        assert!(limiter.try_acquire(ip("64:ff9b::192.0.2.34")).is_some());
        let throttle = AuthThrottle::new(1, WINDOW);
        let _c = throttle.try_charge(ip("64:ff9b::192.0.2.33")).unwrap();
        assert!(throttle.try_charge(ip("192.0.2.33")).is_none());
        assert!(throttle.try_charge(admitted("::ffff:192.0.2.33")).is_none());
        assert!(throttle.try_charge(ip("64:ff9b::192.0.2.34")).is_some());
    }

    const WINDOW: Duration = Duration::from_secs(60);

    /// The charges the table holds for `ip` now (expired ones included until touched).
    fn held(throttle: &AuthThrottle, ip: IpAddr) -> Vec<u64> {
        throttle
            .inner
            .table()
            .charges
            .get(&IpKey::of(ip))
            .map(|q| q.iter().map(|c| c.id).collect())
            .unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn charges_slide_out_of_the_window_and_spare_other_addresses() {
        let throttle = AuthThrottle::new(2, WINDOW);
        let a = ip("192.0.2.1");
        let _first = throttle.try_charge(a).unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        let _second = throttle.try_charge(a).unwrap();
        assert!(throttle.throttled(a));
        assert!(throttle.try_charge(a).is_none(), "refused, and not added");
        assert_eq!(held(&throttle, a).len(), 2);
        // A mapped address is the same client; another address is not.
        assert!(throttle.try_charge(admitted("::ffff:192.0.2.1")).is_none());
        assert!(!throttle.throttled(ip("192.0.2.2")));
        // The first charge leaves the window 60 s after it was taken, the second 30 s later.
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(throttle.try_charge(a).is_none());
        tokio::time::advance(Duration::from_secs(1)).await;
        let _third = throttle.try_charge(a).unwrap();
        assert!(throttle.try_charge(a).is_none());
        tokio::time::advance(WINDOW).await;
        assert!(!throttle.throttled(a));
        assert_eq!(
            throttle.addresses(),
            0,
            "an address with no charges left is forgotten"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refund_removes_its_own_charge_even_after_later_ones() {
        let throttle = AuthThrottle::new(3, WINDOW);
        let a = ip("192.0.2.1");
        let first = throttle.try_charge(a).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let second = throttle.try_charge(a).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let third = throttle.try_charge(a).unwrap();
        let ids = held(&throttle, a);
        assert_eq!(ids.len(), 3);
        // The middle one: the oldest must stay, since it leaves the window first.
        throttle.refund(second);
        assert_eq!(held(&throttle, a), vec![ids[0], ids[2]]);
        let fourth = throttle.try_charge(a).unwrap();
        assert!(throttle.try_charge(a).is_none());
        throttle.refund(first);
        throttle.refund(fourth);
        assert_eq!(held(&throttle, a), vec![ids[2]]);
        throttle.refund(third);
        assert_eq!(
            throttle.addresses(),
            0,
            "the last refund forgets the address"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refund_after_the_window_or_an_eviction_touches_nothing_else() {
        let throttle = AuthThrottle::with_capacity(2, WINDOW, 1);
        let a = ip("192.0.2.1");
        let old = throttle.try_charge(a).unwrap();
        tokio::time::advance(WINDOW).await;
        let new = throttle.try_charge(a).unwrap();
        // The old charge expired when the new one was taken; refunding it removes nothing.
        throttle.refund(old);
        assert_eq!(held(&throttle, a).len(), 1);
        // A second address evicts the first (capacity 1); the refund of its charge is a no-op.
        let b = ip("192.0.2.2");
        let _other = throttle.try_charge(b).unwrap();
        throttle.refund(new);
        assert_eq!(held(&throttle, b).len(), 1);
        assert_eq!(throttle.addresses(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_a_charge_keeps_it() {
        let throttle = AuthThrottle::new(2, WINDOW);
        let a = ip("192.0.2.1");
        let _ = throttle.try_charge(a);
        let _ = throttle.try_charge(a);
        assert!(throttle.try_charge(a).is_none());
        tokio::time::advance(WINDOW).await;
        assert!(throttle.try_charge(a).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_holds_at_most_limit_charges() {
        let throttle = AuthThrottle::new(3, WINDOW);
        let a = ip("192.0.2.1");
        let granted = (0..1000).filter_map(|_| throttle.try_charge(a)).count();
        assert_eq!(granted, 3);
        assert_eq!(held(&throttle, a).len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_forgets_the_address_charged_longest_ago() {
        let throttle = AuthThrottle::with_capacity(1, WINDOW, 4);
        for i in 1..=4u8 {
            let _ = throttle.try_charge(IpAddr::from([10, 0, 0, i]));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // 10.0.0.1's charge is refunded and charged again: now 10.0.0.2 is the stalest.
        let again = throttle.try_charge(ip("10.0.0.1"));
        assert!(again.is_none(), "10.0.0.1 is at its limit");
        let first = AuthCharge {
            entry: Some((
                IpKey::of(ip("10.0.0.1")),
                held(&throttle, ip("10.0.0.1"))[0],
            )),
            remote: None,
        };
        throttle.refund(first);
        let _ = throttle.try_charge(ip("10.0.0.1")).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let _ = throttle.try_charge(ip("10.0.0.5")).unwrap();
        assert_eq!(throttle.addresses(), 4);
        assert!(!throttle.throttled(ip("10.0.0.2")));
        for kept in ["10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5"] {
            assert!(throttle.throttled(ip(kept)), "{kept}");
        }
        for i in 0..=255u8 {
            let _ = throttle.try_charge(IpAddr::from([10, 0, 1, i]));
        }
        assert_eq!(throttle.addresses(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn one_ipv6_slash_64_shares_one_charge_count() {
        let throttle = AuthThrottle::new(2, WINDOW);
        let _a = throttle.try_charge(ip("2001:db8::1")).unwrap();
        let _b = throttle.try_charge(ip("2001:db8::ffff")).unwrap();
        assert!(throttle.try_charge(ip("2001:db8::2")).is_none());
        assert!(!throttle.throttled(ip("2001:db8:0:1::1")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_limit_turns_the_throttle_off_and_keeps_no_table() {
        let throttle = AuthThrottle::new(0, WINDOW);
        for _ in 0..100 {
            let charge = throttle.try_charge(ip("192.0.2.1")).unwrap();
            if charge.entry.is_some() {
                panic!("charged with the throttle off");
            }
        }
        assert!(!throttle.throttled(ip("192.0.2.1")));
        assert_eq!(throttle.addresses(), 0);
    }

    /// The race the reservation closes: many sessions of one address charging at once never get
    /// more than `limit` attempts out, whatever the interleaving. Refunds race too.
    #[test]
    fn concurrent_charges_never_exceed_the_limit() {
        const LIMIT: u32 = 3;
        for round in 0..20 {
            let throttle = AuthThrottle::new(LIMIT, Duration::from_secs(3600));
            let start = std::sync::Barrier::new(16);
            let granted = std::sync::atomic::AtomicU32::new(0);
            // Every thread's charges, kept until all are done, so none is refunded by accident.
            let kept = Mutex::new(Vec::new());
            std::thread::scope(|scope| {
                for t in 0..16 {
                    let (throttle, start, granted, kept) = (&throttle, &start, &granted, &kept);
                    scope.spawn(move || {
                        start.wait();
                        for i in 0..50 {
                            let Some(charge) = throttle.try_charge(ip("192.0.2.1")) else {
                                continue;
                            };
                            // In odd rounds some attempts "succeed" and give their charge back.
                            if round % 2 == 1 && (t + i) % 7 == 0 {
                                throttle.refund(charge);
                            } else {
                                granted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                kept.lock().unwrap().push(charge);
                            }
                        }
                    });
                }
            });
            assert_eq!(
                granted.load(std::sync::atomic::Ordering::SeqCst),
                LIMIT,
                "round {round}: kept charges"
            );
            assert_eq!(held(&throttle, ip("192.0.2.1")).len(), 3);
        }
    }
}
