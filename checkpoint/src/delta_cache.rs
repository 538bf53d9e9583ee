//! The primary's memory of what the backup holds: the last content sent for recently sent
//! pages, the base of XOR deltas.
//!
//! Bounded (capacity in pages, fixed at creation) with CLOCK eviction: a hit sets the
//! page's reference bit, eviction sweeps a hand over the slots, clearing bits until it finds
//! a clear one. A miss only means "no XOR base": the page goes out whole.
//!
//! The cache is split into shards by page frame number, each behind its own mutex. The
//! epoch encoder gives each worker the pages of a disjoint set of shards (see
//! [`DeltaCache::shard_of`]), so workers never contend.
//!
//! Correctness rule: an entry must equal what the backup will hold once the epochs sent so
//! far commit. [`DeltaCache::encode`] updates the entry with every page it encodes;
//! [`DeltaCache::forget`] drops it when a page is sent without the cache. After any
//! transport failure, [`DeltaCache::clear`] it before resynchronizing (the backup's epoch
//! digest check would refuse a wrong base anyway, never apply it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::codec::{encode_page, Encoding};
use crate::PAGE_SIZE;

/// Hit and miss counters of a [`DeltaCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups that found a base.
    pub hits: u64,
    /// Lookups that found none.
    pub misses: u64,
    /// Pages evicted to make room.
    pub evictions: u64,
}

/// A bounded, sharded cache of page contents keyed by page frame number.
#[derive(Debug)]
pub struct DeltaCache {
    shards: Box<[Mutex<Shard>]>,
    capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

#[derive(Debug, Default)]
struct Shard {
    capacity: usize,
    /// Slot contents, `PAGE_SIZE` bytes each; grows up to `capacity` slots.
    data: Vec<u8>,
    pfns: Vec<u64>,
    referenced: Vec<bool>,
    index: HashMap<u64, usize>,
    hand: usize,
}

impl Shard {
    fn get(&mut self, pfn: u64) -> Option<&[u8; PAGE_SIZE]> {
        let slot = *self.index.get(&pfn)?;
        self.referenced[slot] = true;
        self.data[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE]
            .try_into()
            .ok()
    }

    /// Stores `page` for `pfn`; returns whether another page was evicted.
    fn put(&mut self, pfn: u64, page: &[u8; PAGE_SIZE]) -> bool {
        if self.capacity == 0 {
            return false;
        }
        let mut evicted = false;
        let slot = if let Some(&slot) = self.index.get(&pfn) {
            slot
        } else if self.pfns.len() < self.capacity {
            self.data.extend_from_slice(page);
            self.pfns.push(pfn);
            self.referenced.push(false);
            let slot = self.pfns.len() - 1;
            self.index.insert(pfn, slot);
            return false;
        } else {
            while self.referenced[self.hand] {
                self.referenced[self.hand] = false;
                self.hand = (self.hand + 1) % self.capacity;
            }
            let slot = self.hand;
            self.hand = (self.hand + 1) % self.capacity;
            self.index.remove(&self.pfns[slot]);
            self.index.insert(pfn, slot);
            self.pfns[slot] = pfn;
            evicted = true;
            slot
        };
        self.referenced[slot] = false;
        self.data[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE].copy_from_slice(page);
        evicted
    }

    fn forget(&mut self, pfn: u64) {
        // The slot stays allocated; it is simply never found and is reused first.
        if let Some(slot) = self.index.remove(&pfn) {
            self.pfns[slot] = u64::MAX;
            self.referenced[slot] = false;
            self.hand = slot;
        }
    }

    fn clear(&mut self) {
        let capacity = self.capacity;
        *self = Shard {
            capacity,
            ..Shard::default()
        };
    }
}

impl DeltaCache {
    /// A cache of at most `capacity_pages` pages in `shards` shards (at least one).
    /// Memory grows with use up to `capacity_pages * 4 KiB` plus the index.
    pub fn new(capacity_pages: usize, shards: usize) -> Self {
        let shards = shards.max(1);
        let per_shard = capacity_pages.div_ceil(shards);
        let shards = (0..shards)
            .map(|_| {
                Mutex::new(Shard {
                    capacity: per_shard,
                    ..Shard::default()
                })
            })
            .collect();
        Self {
            shards,
            capacity: capacity_pages,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The capacity asked for at creation, in pages.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard that holds `pfn`.
    pub fn shard_of(&self, pfn: u64) -> usize {
        (pfn % self.shards.len() as u64) as usize
    }

    fn shard(&self, pfn: u64) -> MutexGuard<'_, Shard> {
        // A poisoned shard only means another encoder panicked; its data is still pages.
        self.shards[self.shard_of(pfn)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Encodes `page` of frame `pfn` against the cached base (if any), appends the payload
    /// to `out`, and remembers `page` as what the backup will hold.
    pub fn encode(&self, pfn: u64, page: &[u8; PAGE_SIZE], out: &mut Vec<u8>) -> Encoding {
        let mut shard = self.shard(pfn);
        let enc = match shard.get(pfn) {
            Some(base) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                encode_page(page, Some(base), out)
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                encode_page(page, None, out)
            }
        };
        if shard.put(pfn, page) {
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        enc
    }

    /// Remembers `page` as the backup's content of `pfn`.
    pub fn remember(&self, pfn: u64, page: &[u8; PAGE_SIZE]) {
        if self.shard(pfn).put(pfn, page) {
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Copies the cached content of `pfn` into `dst`; false on a miss.
    pub fn lookup(&self, pfn: u64, dst: &mut [u8; PAGE_SIZE]) -> bool {
        match self.shard(pfn).get(pfn) {
            Some(p) => {
                dst.copy_from_slice(p);
                true
            }
            None => false,
        }
    }

    /// Drops the entry of `pfn` (its content was sent without going through the cache).
    pub fn forget(&self, pfn: u64) {
        self.shard(pfn).forget(pfn);
    }

    /// Drops every entry and releases the page memory.
    pub fn clear(&self) {
        for s in self.shards.iter() {
            s.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// Number of pages cached now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).index.len())
            .sum()
    }

    /// Whether the cache holds no page.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hit, miss and eviction counters since creation.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode_page;

    fn page(v: u8) -> [u8; PAGE_SIZE] {
        let mut p = [v; PAGE_SIZE];
        p[0] = v.wrapping_add(1);
        p
    }

    #[test]
    fn second_send_of_a_page_is_a_delta_against_the_first() {
        let cache = DeltaCache::new(16, 4);
        let mut out = Vec::new();
        let first = page(3);
        assert_eq!(cache.encode(7, &first, &mut out), Encoding::Lz4);
        let mut second = first;
        second[100] = 0xEE;
        out.clear();
        let enc = cache.encode(7, &second, &mut out);
        assert_eq!(enc, Encoding::XorRle);
        let mut backup = first;
        decode_page(enc, &out, &mut backup).unwrap();
        assert!(backup == second);
        assert_eq!(cache.stats().hits, 1);
        assert_eq!(cache.stats().misses, 1);
        let mut got = [0u8; PAGE_SIZE];
        assert!(cache.lookup(7, &mut got) && got == second);
    }

    #[test]
    fn capacity_is_never_exceeded_and_clock_keeps_referenced_pages() {
        let cache = DeltaCache::new(4, 1);
        for pfn in 0..4 {
            cache.remember(pfn, &page(pfn as u8));
        }
        // Reference pfn 0 and 1; inserting two more must evict 2 and 3.
        let mut buf = [0u8; PAGE_SIZE];
        assert!(cache.lookup(0, &mut buf));
        assert!(cache.lookup(1, &mut buf));
        cache.remember(10, &page(10));
        cache.remember(11, &page(11));
        assert_eq!(cache.len(), 4);
        assert!(cache.lookup(0, &mut buf) && buf == page(0));
        assert!(cache.lookup(1, &mut buf) && buf == page(1));
        assert!(!cache.lookup(2, &mut buf));
        assert!(!cache.lookup(3, &mut buf));
        assert!(cache.lookup(11, &mut buf) && buf == page(11));
        for pfn in 100..200 {
            cache.remember(pfn, &page(pfn as u8));
            assert!(cache.len() <= 4);
        }
        assert!(cache.stats().evictions >= 100);
    }

    #[test]
    fn forget_and_clear_drop_entries_and_zero_capacity_caches_nothing() {
        let cache = DeltaCache::new(2, 1);
        let mut buf = [0u8; PAGE_SIZE];
        cache.remember(1, &page(1));
        cache.remember(2, &page(2));
        assert!(cache.lookup(2, &mut buf)); // referenced: would survive one sweep anyway
        cache.forget(1);
        assert!(!cache.lookup(1, &mut buf));
        // The forgotten slot is reused first, without evicting pfn 2.
        cache.remember(3, &page(3));
        assert_eq!(cache.stats().evictions, 1);
        assert!(cache.lookup(2, &mut buf) && buf == page(2));
        assert!(cache.lookup(3, &mut buf) && buf == page(3));
        cache.clear();
        assert!(cache.is_empty());

        let none = DeltaCache::new(0, 4);
        none.remember(1, &page(1));
        assert!(!none.lookup(1, &mut buf));
        assert_eq!(none.encode(1, &page(1), &mut Vec::new()), Encoding::Lz4);
    }

    #[test]
    fn concurrent_encoders_on_disjoint_shards() {
        let cache = DeltaCache::new(64, 4);
        std::thread::scope(|s| {
            for w in 0..2u64 {
                let cache = &cache;
                s.spawn(move || {
                    let mut out = Vec::new();
                    for round in 0..3u8 {
                        for pfn in (0..32).filter(|p| cache.shard_of(*p) % 2 == w as usize) {
                            out.clear();
                            cache.encode(pfn, &page(round), &mut out);
                        }
                    }
                });
            }
        });
        assert_eq!(cache.len(), 32);
        let mut buf = [0u8; PAGE_SIZE];
        assert!(cache.lookup(31, &mut buf) && buf == page(2));
    }
}
