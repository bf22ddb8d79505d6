//! The arithmetic of reading the kernel's per-CPU counter maps, kept apart from the maps so it is
//! tested on its own: per-CPU counters summed, what each key gained since the previous read, which
//! idle keys leave the map, and loss counters that never go backwards.

use std::collections::HashMap;
use std::hash::Hash;

use netiso_common::{Counters, LOSS_COUNTERS};

/// A key whose counters moved since the previous read.
#[derive(Debug, PartialEq, Eq)]
pub struct Change<K> {
    pub key: K,
    pub counters: Counters,
    /// First seen by user space (new, or back after it was evicted).
    pub new_key: bool,
    pub delta_packets: u64,
    pub delta_bytes: u64,
}

/// What user space knows of one map's keys: their packets and bytes at the previous read. Every
/// key is looked up at every read, so it is hashed with foldhash (seeded at random per map, as
/// SipHash is, and several times cheaper).
pub struct Ledger<K> {
    known: HashMap<K, (u64, u64), foldhash::fast::RandomState>,
}

impl<K> Default for Ledger<K> {
    fn default() -> Self {
        Ledger { known: HashMap::default() }
    }
}

impl<K: Copy + Eq + Hash> Ledger<K> {
    /// Takes one read of the map (each key with its summed counters) at `now_ns`. Returns the keys
    /// that are new or saw packets since the previous read, and the keys idle for longer than
    /// `idle_ns` with their counters as read, which the caller removes from the map (a later
    /// packet makes them new again) or [`keep`](Self::keep)s.
    pub fn read(
        &mut self,
        entries: impl IntoIterator<Item = (K, Counters)>,
        now_ns: u64,
        idle_ns: u64,
    ) -> (Vec<Change<K>>, Vec<(K, Counters)>) {
        let mut changes = Vec::new();
        let mut idle = Vec::new();
        for (key, counters) in entries {
            let previous = self.known.get(&key).copied();
            let (before_packets, before_bytes) = previous.unwrap_or((0, 0));
            // A key evicted and re-created between two reads restarts from zero.
            let (delta_packets, delta_bytes) = if counters.packets >= before_packets {
                (counters.packets - before_packets, counters.bytes.saturating_sub(before_bytes))
            } else {
                (counters.packets, counters.bytes)
            };
            if previous.is_none() || delta_packets > 0 {
                changes.push(Change { key, counters, new_key: previous.is_none(), delta_packets, delta_bytes });
            }
            if now_ns.saturating_sub(counters.last_seen_ns) > idle_ns {
                self.known.remove(&key);
                idle.push((key, counters));
            } else {
                self.known.insert(key, (counters.packets, counters.bytes));
            }
        }
        (changes, idle)
    }
}

impl<K: Copy + Eq + Hash> Ledger<K> {
    /// An idle key that saw a packet after all, between its read and its removal: it stays, and
    /// the next read counts what it gained since `read`.
    pub fn keep(&mut self, key: K, read: &Counters) {
        self.known.insert(key, (read.packets, read.bytes));
    }
}

/// How long a key may stay idle in a map that holds `entries` keys of `capacity`: `idle_ns`, or,
/// while the map is more than half full, `pressed_ns`. A scan or a flood brings new keys faster
/// than idle ones would otherwise leave, and a key idle that long has had its counts read: what
/// the map loses is only that a later packet of the key starts a new record.
pub fn idle_limit(entries: usize, capacity: u32, idle_ns: u64, pressed_ns: u64) -> u64 {
    if entries as u64 * 2 > u64::from(capacity) { idle_ns.min(pressed_ns) } else { idle_ns }
}

/// Sums per-CPU counters: totals add up, first/last seen span the CPUs that saw packets.
pub fn sum<'a>(per_cpu: impl Iterator<Item = &'a Counters>) -> Counters {
    let mut total = Counters::default();
    for c in per_cpu.filter(|c| c.packets > 0) {
        if total.packets == 0 || c.first_seen_ns < total.first_seen_ns {
            total.first_seen_ns = c.first_seen_ns;
        }
        if c.last_seen_ns >= total.last_seen_ns {
            total.last_seen_ns = c.last_seen_ns;
            total.ifindex = c.ifindex;
        }
        total.packets += c.packets;
        total.bytes += c.bytes;
        total.tcp_flags |= c.tcp_flags;
    }
    // Flows stamp later packets with the coarse clock, which may lag the precise first sighting.
    total.last_seen_ns = total.last_seen_ns.max(total.first_seen_ns);
    total
}

/// What each loss counter added since `reported`; never negative, whatever the counters did.
pub fn loss_deltas(
    totals: &[u64; LOSS_COUNTERS as usize],
    reported: &[u64; LOSS_COUNTERS as usize],
) -> [u64; LOSS_COUNTERS as usize] {
    std::array::from_fn(|i| totals[i].saturating_sub(reported[i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(packets: u64, bytes: u64, first_seen_ns: u64, last_seen_ns: u64) -> Counters {
        Counters { packets, bytes, first_seen_ns, last_seen_ns, ..Default::default() }
    }

    #[test]
    fn a_map_more_than_half_full_lets_keys_go_sooner() {
        assert_eq!(idle_limit(8192, 16384, 60_000, 2_000), 60_000, "half full: the usual timeout");
        assert_eq!(idle_limit(8193, 16384, 60_000, 2_000), 2_000);
        assert_eq!(idle_limit(16384, 16384, 1_000, 2_000), 1_000, "never longer than asked");
    }

    #[test]
    fn per_cpu_counters_sum_to_the_span_of_all_cpus() {
        let a = Counters { ifindex: 3, tcp_flags: 0x02, ..counters(2, 200, 50, 90) };
        let b = Counters { ifindex: 4, tcp_flags: 0x10, ..counters(1, 60, 40, 95) };
        let total = sum([a, Counters::default(), b].iter());
        assert_eq!(
            (total.packets, total.bytes, total.first_seen_ns, total.last_seen_ns, total.ifindex, total.tcp_flags),
            (3, 260, 40, 95, 4, 0x12)
        );
    }

    #[test]
    fn a_coarse_last_seen_never_precedes_the_first_packet() {
        let total = sum([counters(1, 60, 100, 90)].iter());
        assert_eq!(total.last_seen_ns, 100);
    }

    #[test]
    fn a_key_is_reported_new_then_by_what_it_gained_and_not_while_quiet() {
        let mut ledger = Ledger::default();
        let (changes, idle) = ledger.read([(7u32, counters(2, 120, 10, 20))], 30, 1_000);
        assert_eq!(
            changes,
            vec![Change {
                key: 7,
                counters: counters(2, 120, 10, 20),
                new_key: true,
                delta_packets: 2,
                delta_bytes: 120
            }]
        );
        assert!(idle.is_empty());
        let (changes, _) = ledger.read([(7u32, counters(2, 120, 10, 20))], 40, 1_000);
        assert!(changes.is_empty(), "no packets since the previous read");
        let (changes, _) = ledger.read([(7u32, counters(5, 300, 10, 50))], 60, 1_000);
        assert_eq!((changes[0].new_key, changes[0].delta_packets, changes[0].delta_bytes), (false, 3, 180));
    }

    #[test]
    fn an_idle_key_leaves_and_comes_back_new() {
        let mut ledger = Ledger::default();
        let (_, idle) = ledger.read([(1u32, counters(1, 60, 10, 10)), (2, counters(1, 60, 10, 900))], 1_000, 500);
        assert_eq!(idle, vec![(1, counters(1, 60, 10, 10))], "only the key idle for longer than the timeout leaves");
        let (changes, _) = ledger.read([(1u32, counters(1, 60, 1_100, 1_100))], 1_200, 500);
        assert!(changes[0].new_key);
    }

    #[test]
    fn an_idle_key_kept_after_a_late_packet_counts_from_its_read() {
        let mut ledger = Ledger::default();
        ledger.read([(1u32, counters(1, 60, 10, 10))], 20, 1_000);
        let (_, idle) = ledger.read([(1u32, counters(1, 60, 10, 10))], 2_000, 500);
        let (key, read) = idle[0];
        // A packet arrived between the read and the removal: the key stays.
        ledger.keep(key, &read);
        let (changes, _) = ledger.read([(1u32, counters(2, 120, 10, 2_001))], 2_002, 500);
        assert_eq!((changes[0].new_key, changes[0].delta_packets, changes[0].delta_bytes), (false, 1, 60));
    }

    #[test]
    fn a_key_recreated_between_reads_counts_from_zero() {
        let mut ledger = Ledger::default();
        ledger.read([(1u32, counters(10, 600, 10, 20))], 30, 1_000);
        // Evicted by the kernel (map full, LRU) and created again with fewer packets.
        let (changes, _) = ledger.read([(1u32, counters(3, 180, 40, 50))], 60, 1_000);
        assert_eq!((changes[0].new_key, changes[0].delta_packets, changes[0].delta_bytes), (false, 3, 180));
    }

    #[test]
    fn loss_deltas_never_go_negative() {
        assert_eq!(loss_deltas(&[5, 3, 0, 9], &[2, 3, 0, 4]), [3, 0, 0, 5]);
        // A counter that went back (a map read anew) reports no loss rather than wrapping.
        assert_eq!(loss_deltas(&[1, 0, 0, 0], &[7, 0, 0, 0]), [0, 0, 0, 0]);
    }
}
