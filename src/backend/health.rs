//! Passive and active health of one backend address, and the order a session tries them in:
//! pure state over [`Instant`]s, so back-off and selection are tested without sockets.
//!
//! A failure (refused, timed out, no greeting, TLS or STARTTLS failed) takes an address out of
//! rotation for a back-off that doubles with each failure in a row; a success (a session's or an
//! active check's) puts it back at once.

use std::time::Duration;

use tokio::time::Instant;

/// The first back-off: long enough that a burst of sessions does not hammer a dead server
/// (each would wait out its connect timeout), short enough that a restart is noticed at once.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest back-off: a backend down for maintenance is retried every minute, so its return
/// is seen within a minute even without active checks.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Most addresses one session tries: enough to step over two dead servers, few enough that a
/// client whose every backend is black-holed hears back within a few connect timeouts.
pub const MAX_ATTEMPTS: usize = 3;

/// One address's health.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Failures in a row; 0: up.
    failures: u32,
    /// Not tried before this, unless every other address is down too.
    retry_at: Option<Instant>,
}

impl Health {
    pub fn is_up(&self) -> bool {
        self.failures == 0
    }

    /// Whether a session may try it now (up, or its back-off ran out).
    pub fn available(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| now >= at)
    }

    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Records a failure; returns the back-off now in force.
    pub fn failed(&mut self, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let backoff = backoff(self.failures);
        self.retry_at = Some(now + backoff);
        backoff
    }

    /// Records a success; returns whether the address was down before.
    pub fn succeeded(&mut self) -> bool {
        let was_down = !self.is_up();
        self.failures = 0;
        self.retry_at = None;
        was_down
    }
}

/// [`FIRST_BACKOFF`] doubled for each failure after the first, at most [`MAX_BACKOFF`].
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_BACKOFF
        .saturating_mul(1u32 << doublings)
        .min(MAX_BACKOFF)
}

/// What the planner knows of one address.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Sessions on it now.
    pub active: u32,
    pub health: Health,
}

/// The order one session tries addresses in (indexes into `candidates`), at most
/// [`MAX_ATTEMPTS`]: least connections first among those available, ties broken by a rotation
/// that moves one step per session so an idle pool is still spread round-robin; then, whatever
/// happened, the unavailable address whose back-off ends first, so that when every backend is
/// down a session still probes one (a single-backend listener behaves as before: every session
/// tries its backend) and a backend's return is noticed without active checks.
pub fn plan(candidates: &[Candidate], rotation: usize, now: Instant) -> Vec<usize> {
    let n = candidates.len();
    if n == 0 {
        return Vec::new();
    }
    let offset = rotation % n;
    let turn = |i: usize| (i + n - offset) % n;
    let mut available: Vec<usize> = (0..n)
        .filter(|&i| candidates.get(i).is_some_and(|c| c.health.available(now)))
        .collect();
    available.sort_by_key(|&i| (candidates.get(i).map_or(u32::MAX, |c| c.active), turn(i)));
    let resting = (0..n)
        .filter(|&i| candidates.get(i).is_some_and(|c| !c.health.available(now)))
        .min_by_key(|&i| (candidates.get(i).and_then(|c| c.health.retry_at()), turn(i)));
    available.truncate(
        MAX_ATTEMPTS
            .saturating_sub(usize::from(resting.is_some()))
            .max(1),
    );
    available.extend(resting);
    available.truncate(MAX_ATTEMPTS);
    available
}

/// The order one session tries addresses in when the order is given (indexes into
/// `candidates`, `preferred` a permutation of them): a user's affinity order, or the backends a
/// user is mapped to. As [`plan`], but the available addresses keep `preferred`'s order
/// instead of least connections: those available in that order, then, whatever happened, the
/// unavailable one whose back-off ends first (the earlier in `preferred` on a tie), so a
/// resting first choice is probed and taken back as soon as it answers; at most
/// [`MAX_ATTEMPTS`].
pub fn plan_in_order(candidates: &[Candidate], preferred: &[usize], now: Instant) -> Vec<usize> {
    let mut available: Vec<usize> = preferred
        .iter()
        .copied()
        .filter(|&i| candidates.get(i).is_some_and(|c| c.health.available(now)))
        .collect();
    let resting = preferred
        .iter()
        .enumerate()
        .filter(|(_, i)| {
            candidates
                .get(**i)
                .is_some_and(|c| !c.health.available(now))
        })
        .min_by_key(|(rank, i)| (candidates.get(**i).and_then(|c| c.health.retry_at()), *rank))
        .map(|(_, i)| *i);
    available.truncate(
        MAX_ATTEMPTS
            .saturating_sub(usize::from(resting.is_some()))
            .max(1),
    );
    available.extend(resting);
    available.truncate(MAX_ATTEMPTS);
    available
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(active: u32) -> Candidate {
        Candidate {
            active,
            health: Health::default(),
        }
    }

    fn down(now: Instant, failures: u32) -> Candidate {
        let mut health = Health::default();
        for _ in 0..failures {
            health.failed(now);
        }
        Candidate { active: 0, health }
    }

    #[test]
    fn backoff_doubles_from_one_second_up_to_a_minute() {
        let table = [(1, 1), (2, 2), (3, 4), (4, 8), (6, 32), (7, 60), (1000, 60)];
        for (failures, secs) in table {
            assert_eq!(backoff(failures), Duration::from_secs(secs), "{failures}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_backend_rests_then_returns_and_a_success_resets_it() {
        let mut h = Health::default();
        assert!(h.is_up() && h.available(Instant::now()));
        assert_eq!(h.failed(Instant::now()), Duration::from_secs(1));
        assert_eq!(h.failed(Instant::now()), Duration::from_secs(2));
        assert!(!h.available(Instant::now()));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(h.available(Instant::now()) && !h.is_up());
        assert!(h.succeeded());
        assert!(h.is_up() && !h.succeeded());
    }

    #[tokio::test(start_paused = true)]
    async fn least_connections_first_with_rotating_ties() {
        let now = Instant::now();
        let c = [up(2), up(0), up(0)];
        assert_eq!(plan(&c, 0, now), [1, 2, 0]);
        assert_eq!(plan(&c, 2, now), [2, 1, 0]);
        let idle = [up(0), up(0), up(0)];
        let firsts: Vec<usize> = (0..6).map(|r| plan(&idle, r, now)[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn resting_backends_are_skipped_but_one_is_probed_last() {
        let now = Instant::now();
        let c = [down(now, 3), up(5), down(now, 1), up(0)];
        assert_eq!(plan(&c, 0, now), [3, 1, 2]);
        let all_down = [down(now, 2), down(now, 1)];
        assert_eq!(plan(&all_down, 0, now), [1]);
        let one = [down(now, 4)];
        assert_eq!(plan(&one, 7, now), [0]);
        assert!(plan(&[], 0, now).is_empty());
        let many: Vec<Candidate> = (0..10).map(|_| up(0)).collect();
        assert_eq!(plan(&many, 0, now).len(), MAX_ATTEMPTS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_given_order_is_kept_resting_ones_skipped_and_one_probed_last() {
        let now = Instant::now();
        // Least connections plays no part: the order is the user's.
        let c = [up(9), up(0), up(5), up(1)];
        assert_eq!(plan_in_order(&c, &[2, 0, 3, 1], now), [2, 0, 3]);
        // The first choice rests: the second, third, then the first is probed last.
        let c = [down(now, 1), up(0), up(0), up(0)];
        assert_eq!(plan_in_order(&c, &[0, 1, 2, 3], now), [1, 2, 0]);
        // Once its back-off ends it is first again.
        tokio::time::advance(backoff(1)).await;
        assert_eq!(plan_in_order(&c, &[0, 1, 2, 3], Instant::now()), [0, 1, 2]);
        // Every one resting: the one back first, the earlier in the order on a tie.
        let now = Instant::now();
        let all_down = [down(now, 2), down(now, 1), down(now, 1)];
        assert_eq!(plan_in_order(&all_down, &[2, 1, 0], now), [2]);
        assert!(plan_in_order(&[], &[], now).is_empty());
        assert_eq!(plan_in_order(&[up(0)], &[0], now), [0]);
    }
}
