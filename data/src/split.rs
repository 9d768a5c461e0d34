//! The deterministic train/validation split: the hub data set has only `train`, so a slice is
//! held out by a stable hash of `conv_id` (FNV-1a 64), identical across runs and machines.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Valid,
}

/// FNV-1a, 64 bit: stable and platform-independent (unlike `std`'s randomised hasher).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Which split a conversation belongs to, holding out about `valid_fraction` of them.
pub fn split_of(conv_id: &str, valid_fraction: f64) -> Split {
    let bucket = fnv1a(conv_id.as_bytes()) % 1_000_000;
    if (bucket as f64) < valid_fraction * 1_000_000.0 {
        Split::Valid
    } else {
        Split::Train
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_values() {
        // Fixed expectations: the split must never change between versions or machines.
        assert_eq!(fnv1a(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn fraction_is_respected() {
        let n = 20_000;
        let valid = (0..n)
            .filter(|i| split_of(&format!("conv-{i}"), 0.02) == Split::Valid)
            .count();
        assert!(
            (300..500).contains(&valid),
            "{valid} of {n} held out for 2%"
        );
        assert!((0..n).all(|i| split_of(&format!("conv-{i}"), 0.0) == Split::Train));
        assert!((0..n).all(|i| split_of(&format!("conv-{i}"), 1.0) == Split::Valid));
    }
}
