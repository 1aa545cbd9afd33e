//! "The function's work", defined once for every function of the demo and
//! the benchmarks (the SDK's stages and the plain HTTP `spright-fn` alike),
//! so modes compare the same work: hash the payload `rounds` times
//! (64-bit FNV-1a), then transform it in place (ASCII upper case), then the
//! caller forwards it. `rounds == 0` does nothing at all, which leaves the
//! pure transport.

/// 64-bit FNV-1a.
pub mod fnv1a {
    pub const START: u64 = 0xcbf2_9ce4_8422_2325;

    #[must_use]
    pub fn feed(mut h: u64, bytes: &[u8]) -> u64 {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
}

/// What [`apply`] does, for tables and help texts.
pub const DESCRIPTION: &str =
    "each function hashes the body (FNV-1a) `work` times, upper-cases it in place and forwards it";

/// Does the work on `payload`: `rounds` hashes, then one in-place transform
/// (none of either when `rounds` is 0). Returns the last hash (`START` when
/// nothing was hashed); round `n` hashes on from round `n - 1`'s value.
pub fn apply(payload: &mut [u8], rounds: u32) -> u64 {
    let mut h = fnv1a::START;
    if rounds == 0 {
        return h;
    }
    for _ in 0..rounds {
        // Chained, so no round can be optimised away.
        h = fnv1a::feed(h, payload);
    }
    payload.make_ascii_uppercase();
    // Callers may drop the hash; the rounds must run all the same (equal
    // work with the C and Python stages, which keep theirs).
    std::hint::black_box(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_rounds_leave_the_payload_alone() {
        let mut b = *b"abc";
        assert_eq!(apply(&mut b, 0), fnv1a::START);
        assert_eq!(&b, b"abc");
        let h = apply(&mut b, 2);
        assert_eq!(h, fnv1a::feed(fnv1a::feed(fnv1a::START, b"abc"), b"abc"));
        assert_eq!(&b, b"ABC");
    }
}
