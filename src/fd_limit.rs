//! The open-files limit (RLIMIT_NOFILE): raised at start from the soft limit to the hard one,
//! and compared with what the listeners' `max_connections` can take, so a proxy that would run
//! out of descriptors under load says so at start instead of failing accepts
//! (`Too many open files`) in the middle of a flood.
//!
//! Many systems start services with a soft limit of 1024 and a far higher hard limit (systemd:
//! 1024 / 524288); the soft limit is there for programs that use `select(2)`, which mailfront
//! does not, so taking the hard limit is safe and what nginx's `worker_rlimit_nofile` and
//! HAProxy do.

/// Descriptors that are not sessions: the listening sockets, the metrics endpoint and its
/// scrapes, stdio, certificate and ticket key files during a reload, DNS look-ups and backend
/// health checks. A few dozen at most; 64 leaves room.
pub const OTHER_DESCRIPTORS: u64 = 64;

/// A resource limit pair; `None` is unlimited (RLIM_INFINITY).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// Descriptors the configured listeners may need at once: 1.5 per session of every listener's
/// `max_connections` (rounded up), plus [`OTHER_DESCRIPTORS`]. Why 1.5: every session has its
/// client socket, and one connected to its backend has a second. Sessions that never get a
/// backend (refused, idle in cleartext before STARTTLS, failed or stalled handshakes) hold one,
/// so a full listener averages between 1 and 2: 1.5 is a planning figure for a warning, not a
/// bound.
pub fn needed(max_connections: impl IntoIterator<Item = usize>) -> u64 {
    let sessions = max_connections
        .into_iter()
        .map(|m| u64::try_from(m).unwrap_or(u64::MAX))
        .fold(0u64, u64::saturating_add);
    // sessions × 1.5 as sessions + ⌈sessions / 2⌉: exact, and saturating instead of wrapping.
    sessions
        .saturating_add(sessions.div_ceil(2))
        .saturating_add(OTHER_DESCRIPTORS)
}

/// The soft limit to set, if raising it is possible: the hard limit when that is finite and
/// above the soft one. An unlimited hard limit is left alone: no system takes an unlimited
/// number of open files (Linux refuses more than `fs.nr_open`, macOS more than OPEN_MAX), so
/// there is no value to ask for that is sure to be accepted.
pub fn raise_target(limit: Limit) -> Option<u64> {
    let hard = limit.hard?;
    match limit.soft {
        Some(soft) if soft < hard => Some(hard),
        _ => None,
    }
}

/// The soft limit, when it is below what the listeners may need.
pub fn shortfall(soft: Option<u64>, needed: u64) -> Option<u64> {
    soft.filter(|&soft| soft < needed)
}

/// What [`raise`] did.
#[derive(Debug)]
pub struct Raised {
    pub before: Limit,
    pub after: Limit,
    /// Why the soft limit could not be raised, when it could not.
    pub error: Option<std::io::Error>,
}

/// Raises this process's RLIMIT_NOFILE soft limit to its hard limit (see [`raise_target`]).
pub fn raise() -> Raised {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let read = || {
        let now = getrlimit(Resource::Nofile);
        Limit {
            soft: now.current,
            hard: now.maximum,
        }
    };
    let before = read();
    let error = raise_target(before).and_then(|target| {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: before.hard,
            },
        )
        .err()
        .map(std::io::Error::from)
    });
    Raised {
        before,
        after: read(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_counts_one_and_a_half_descriptors_rounded_up_plus_the_reserve() {
        assert_eq!(needed([]), OTHER_DESCRIPTORS);
        assert_eq!(needed([1]), 2 + OTHER_DESCRIPTORS);
        assert_eq!(needed([2]), 3 + OTHER_DESCRIPTORS);
        // The shipped example: four listeners at the default 10,000.
        assert_eq!(needed([10_000; 4]), 60_000 + OTHER_DESCRIPTORS);
        assert_eq!(needed([10_000, 1]), 15_002 + OTHER_DESCRIPTORS);
        // No overflow, whatever is configured.
        assert_eq!(needed([usize::MAX, usize::MAX]), u64::MAX);
    }

    #[test]
    fn the_soft_limit_is_raised_to_a_finite_hard_limit_only() {
        let limit = |soft, hard| Limit { soft, hard };
        assert_eq!(
            raise_target(limit(Some(1024), Some(524_288))),
            Some(524_288)
        );
        assert_eq!(raise_target(limit(Some(4096), Some(4096))), None);
        assert_eq!(raise_target(limit(Some(1024), None)), None);
        assert_eq!(raise_target(limit(None, None)), None);
    }

    #[test]
    fn a_shortfall_is_a_finite_soft_limit_below_the_need() {
        assert_eq!(shortfall(Some(1024), needed([10_000])), Some(1024));
        assert_eq!(shortfall(Some(1_048_576), needed([10_000; 4])), None);
        assert_eq!(shortfall(Some(15_064), needed([10_000])), None);
        assert_eq!(shortfall(Some(15_063), needed([10_000])), Some(15_063));
        assert_eq!(shortfall(None, u64::MAX), None);
    }

    #[test]
    fn raising_leaves_the_soft_limit_at_or_above_where_it_was() {
        let raised = raise();
        assert!(raised.error.is_none(), "{:?}", raised.error);
        assert_eq!(raised.after.hard, raised.before.hard);
        if raise_target(raised.before).is_some() {
            assert_eq!(raised.after.soft, raised.before.hard);
        } else {
            assert_eq!(raised.after.soft, raised.before.soft);
        }
    }
}
