//! Maps keyed by the scheduler's own sequential ids (contexts, passes,
//! batches). The standard map hashes with SipHash, which resists keys an
//! attacker picks; these keys are counters the scheduler hands out, so one
//! multiplication spreads them as well, at a fraction of the cost of the
//! several lookups every pass makes per step.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

pub type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Fibonacci hashing of one `u64`: the product's high bits (which the map
/// uses first) depend on every bit of the id.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by the maps above; anything else still
        // hashes correctly, byte by byte.
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_ids_round_trip() {
        let mut m = IdMap::default();
        for id in 0..10_000u64 {
            m.insert(id, id * 2);
        }
        assert!((0..10_000u64).all(|id| m[&id] == id * 2));
        assert_eq!(m.remove(&7), Some(14));
        assert!(!m.contains_key(&7));
    }
}
