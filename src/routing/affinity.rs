//! `user_affinity`: rendezvous (highest random weight) hashing of a login name over a list of
//! backend addresses, so every session of one user reaches one backend with no shared state.
//!
//! Each backend gets a score, a hash of (name, address); the user's preference order is the
//! backends by descending score ([`order`]). Properties the pool relies on (Thaler and Ravishankar,
//! "Using name-based mappings to increase hit rates", IEEE/ACM ToN 6(1), 1998):
//!
//! - every replica with the same address list computes the same order, whatever order the list
//!   is in (the score depends on the pair only), so no director ring and no Redis are needed;
//! - when the first choice is out of rotation the user goes to the second, the same one on
//!   every replica, and back to the first once it returns;
//! - adding a backend to N moves only the names whose new backend scores highest, about
//!   1/(N+1) of them, and each of those to the new backend; removing one moves only its names.
//!
//! Names are compared case-insensitively (ASCII lowercase, the domain too), as Dovecot's `%Lu`
//! does. Pure: no clock, no sockets.

use std::net::{IpAddr, SocketAddr};

/// FNV-1a 64-bit offset basis and prime (the FNV specification, draft-eastlake-fnv §2).
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Separates the name from the address in the hashed bytes, so ("ab", 1.2.3.4) and
/// ("a", b‖1.2.3.4) can never hash alike: no login name a gate accepts contains NUL.
const SEPARATOR: u8 = 0;

/// The preference order of `backends` for the login name `user`: indexes into `backends`, the
/// first being the user's backend, each later one where the user goes while every earlier one
/// is out of rotation. A permutation of `0..backends.len()`; empty for an empty list.
///
/// The score is FNV-1a 64 over (lowercased name, NUL, address family, address octets, port in
/// network order), then the splitmix64 finalizer. Why not std's `DefaultHasher`: its algorithm
/// may change between Rust releases, and `RandomState` keys differ per process, so two replicas
/// (or one replica across an upgrade) would disagree. FNV-1a is fixed by its specification and
/// fast on short keys but mixes its last octets poorly into the high bits; splitmix64's
/// finalizer (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
/// OOPSLA 2014) gives every input bit an even chance to flip every output bit. Neither needs a
/// secret: a client choosing its own login name gains nothing from predicting its backend.
/// Equal scores (a 2⁻⁶⁴ event) fall back to the address order, so the result stays the same on
/// every replica.
pub fn order(user: &[u8], backends: &[SocketAddr]) -> Vec<usize> {
    let name = user
        .iter()
        .fold(FNV_OFFSET, |h, b| fnv_step(h, b.to_ascii_lowercase()));
    let name = fnv_step(name, SEPARATOR);
    let mut scored: Vec<(u64, SocketAddr, usize)> = backends
        .iter()
        .enumerate()
        .map(|(i, addr)| (score(name, addr), *addr, i))
        .collect();
    // Highest score first; the address breaks ties, never the position in the list.
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, _, i)| i).collect()
}

/// The score of one backend for a name already hashed into `name`.
fn score(name: u64, addr: &SocketAddr) -> u64 {
    let mut h = name;
    match addr.ip() {
        IpAddr::V4(v4) => {
            h = fnv_step(h, 4);
            for b in v4.octets() {
                h = fnv_step(h, b);
            }
        }
        IpAddr::V6(v6) => {
            h = fnv_step(h, 6);
            for b in v6.octets() {
                h = fnv_step(h, b);
            }
        }
    }
    for b in addr.port().to_be_bytes() {
        h = fnv_step(h, b);
    }
    splitmix64(h)
}

fn fnv_step(h: u64, byte: u8) -> u64 {
    (h ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
}

/// splitmix64's output function (the finalizer of MurmurHash3's 64-bit variant, with
/// Stafford's "Mix13" constants).
fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, 10 + i as u8], 143)))
            .collect()
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("user{i}@example.org")).collect()
    }

    fn first(user: &str, list: &[SocketAddr]) -> SocketAddr {
        list[order(user.as_bytes(), list)[0]]
    }

    #[test]
    fn one_user_one_backend_whatever_the_list_order() {
        let list = backends(5);
        let chosen = first("alice@example.org", &list);
        for _ in 0..10 {
            assert_eq!(first("alice@example.org", &list), chosen);
        }
        // Another replica configured with the same backends in another order agrees.
        let mut reversed = list.clone();
        reversed.reverse();
        assert_eq!(first("alice@example.org", &reversed), chosen);
        let full: Vec<SocketAddr> = order(b"alice@example.org", &list)
            .into_iter()
            .map(|i| list[i])
            .collect();
        let full_reversed: Vec<SocketAddr> = order(b"alice@example.org", &reversed)
            .into_iter()
            .map(|i| reversed[i])
            .collect();
        assert_eq!(full, full_reversed);
    }

    #[test]
    fn the_order_is_a_permutation() {
        for n in [0, 1, 2, 7, 64] {
            let list = backends(n);
            for user in names(50) {
                let mut o = order(user.as_bytes(), &list);
                o.sort_unstable();
                assert_eq!(o, (0..n as usize).collect::<Vec<_>>(), "{user} over {n}");
            }
        }
    }

    #[test]
    fn removing_the_first_choice_gives_the_second() {
        let list = backends(6);
        for user in names(200) {
            let o = order(user.as_bytes(), &list);
            let second = list[o[1]];
            let without: Vec<SocketAddr> =
                list.iter().copied().filter(|a| *a != list[o[0]]).collect();
            assert_eq!(first(&user, &without), second, "{user}");
            // And the rest of the order is unchanged.
            let rest: Vec<SocketAddr> = o[1..].iter().map(|&i| list[i]).collect();
            let after: Vec<SocketAddr> = order(user.as_bytes(), &without)
                .into_iter()
                .map(|i| without[i])
                .collect();
            assert_eq!(rest, after, "{user}");
        }
    }

    #[test]
    fn adding_a_backend_moves_about_one_in_n_plus_one_and_only_to_it() {
        let users = names(1000);
        for n in [2u16, 4, 9] {
            let before = backends(n);
            let after = backends(n + 1);
            let added = after[n as usize];
            let mut moved = 0;
            for user in &users {
                let was = first(user, &before);
                let now = first(user, &after);
                if was != now {
                    moved += 1;
                    assert_eq!(now, added, "{user} moved to an old backend");
                }
            }
            // Expected 1000/(n+1); the binomial standard deviation is at most 16 here, and the
            // tolerance is four of them.
            let expected = 1000 / (i32::from(n) + 1);
            assert!(
                (moved - expected).abs() <= 64,
                "{n} -> {}: {moved} moved, expected about {expected}",
                n + 1
            );
        }
    }

    #[test]
    fn names_spread_evenly() {
        let list = backends(4);
        let mut counts = [0i32; 4];
        for user in names(1000) {
            counts[order(user.as_bytes(), &list)[0]] += 1;
        }
        for c in counts {
            assert!((c - 250).abs() <= 60, "{counts:?}");
        }
    }

    #[test]
    fn names_are_compared_case_insensitively_domain_too() {
        let list = backends(8);
        for user in names(100) {
            let upper = user.to_ascii_uppercase();
            let mixed = user.replace("example", "ExAmPlE");
            assert_eq!(
                order(user.as_bytes(), &list),
                order(upper.as_bytes(), &list)
            );
            assert_eq!(
                order(user.as_bytes(), &list),
                order(mixed.as_bytes(), &list)
            );
        }
    }

    #[test]
    fn the_hash_is_fixed_across_releases() {
        // Replicas of different versions must agree during a rolling upgrade: these values are
        // part of the contract. A change here moves every user.
        let list = [
            "10.0.0.1:143".parse().unwrap(),
            "10.0.0.2:143".parse().unwrap(),
            "[2001:db8::1]:143".parse().unwrap(),
        ];
        assert_eq!(order(b"alice@example.org", &list), FIXED_ALICE);
        assert_eq!(order(b"bob@example.org", &list), FIXED_BOB);
        assert_eq!(fnv_step(FNV_OFFSET, b'a'), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(splitmix64(0), 0);
        assert_eq!(splitmix64(1), 0x5692_161d_100b_05e5);
    }

    const FIXED_ALICE: [usize; 3] = [1, 2, 0];
    const FIXED_BOB: [usize; 3] = [0, 2, 1];
}
