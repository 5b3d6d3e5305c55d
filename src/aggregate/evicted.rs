//! Which keys a partition evicted.
//!
//! Besides what earlier owners stored (see `Earlier` in the state), a
//! partition has in ClickHouse only what this process wrote and then
//! evicted. A key never evicted is not among that, so it need not be read
//! back: a workload that keeps making new keys (new products, new minutes)
//! then reads nothing. Remembering every evicted
//! key would cost memory the eviction is there to save, so this is a Bloom
//! filter: a key it says was evicted may not have been (about one in a
//! hundred), which costs a read that finds nothing; a key it says was not
//! evicted never was. It grows as a chain of filters, each twice the last.

use std::hash::{BuildHasher, Hash};

use foldhash::fast::FixedState;

/// Bits per key a filter is sized for, and probes per key: about 1 %
/// false positives when full.
const BITS_PER_KEY: usize = 10;
const PROBES: u64 = 7;
/// The first filter's keys.
const FIRST: usize = 4_096;

#[derive(Default)]
pub(super) struct Evicted {
    filters: Vec<Filter>,
}

struct Filter {
    bits: Vec<u64>,
    keys: usize,
    capacity: usize,
}

impl Evicted {
    pub(super) fn insert<K: Hash>(&mut self, key: &K) {
        let full = self.filters.last().is_none_or(|f| f.keys >= f.capacity);
        if full {
            let capacity = self.filters.last().map_or(FIRST, |f| f.capacity * 2);
            self.filters.push(Filter {
                bits: vec![0; (capacity * BITS_PER_KEY).div_ceil(64)],
                keys: 0,
                capacity,
            });
        }
        let filter = self.filters.last_mut().expect("pushed above");
        let bits = filter.bits.len() as u64 * 64;
        for bit in probes(key, bits) {
            filter.bits[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        filter.keys += 1;
    }

    pub(super) fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// False only for a key never inserted.
    pub(super) fn may_contain<K: Hash>(&self, key: &K) -> bool {
        self.filters.iter().any(|filter| {
            let bits = filter.bits.len() as u64 * 64;
            probes(key, bits).all(|bit| filter.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
        })
    }
}

/// The bits `key` sets in a filter of `bits` bits: two hashes, combined
/// (Kirsch and Mitzenmacher).
fn probes<K: Hash>(key: &K, bits: u64) -> impl Iterator<Item = u64> {
    let first = FixedState::with_seed(0x9e37_79b9_7f4a_7c15).hash_one(key);
    let second = FixedState::with_seed(0xc2b2_ae3d_27d4_eb4f).hash_one(key) | 1;
    (0..PROBES).map(move |i| first.wrapping_add(i.wrapping_mul(second)) % bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inserted_key_is_always_found_and_few_others_are() {
        let mut evicted = Evicted::default();
        assert!(!evicted.may_contain(&1_i64));
        // Past the first filters, so that the chain grows.
        for key in 0..50_000_i64 {
            evicted.insert(&key);
        }
        assert!(evicted.filters.len() > 2);
        assert!((0..50_000_i64).all(|key| evicted.may_contain(&key)));
        let false_positives = (1_000_000..1_100_000_i64)
            .filter(|key| evicted.may_contain(key))
            .count();
        // About 1 % per filter, and a key is looked up in each.
        assert!(false_positives < 5_000, "{false_positives} of 100,000");
    }
}
