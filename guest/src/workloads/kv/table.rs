//! The key-value store: a hash table from byte strings to byte strings, open addressing
//! with linear probing and backward-shift deletion (no tombstones), at most 3/4 full.
//!
//! Pure `alloc` code: the host tests include it by path.

use alloc::boxed::Box;
use alloc::vec::Vec;

/// The smallest table, in slots (a power of two).
const MIN_SLOTS: usize = 16;

struct Entry {
    hash: u64,
    key: Box<[u8]>,
    value: Vec<u8>,
}

/// A map from byte-string keys to byte-string values.
pub struct Table {
    slots: Vec<Option<Entry>>,
    len: usize,
}

/// FNV-1a over the bytes, then the murmur3 finaliser so that the low bits (the slot
/// index) depend on every byte.
pub fn hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

impl Default for Table {
    fn default() -> Self {
        Self::new()
    }
}

impl Table {
    pub fn new() -> Table {
        Table {
            slots: empty_slots(MIN_SLOTS),
            len: 0,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn find(&self, key: &[u8], hash: u64) -> Result<usize, usize> {
        let mask = self.mask();
        let mut i = hash as usize & mask;
        loop {
            match &self.slots[i] {
                None => return Err(i),
                Some(entry) if entry.hash == hash && *entry.key == *key => return Ok(i),
                Some(_) => i = (i + 1) & mask,
            }
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let i = self.find(key, hash(key)).ok()?;
        self.slots[i].as_ref().map(|entry| entry.value.as_slice())
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.find(key, hash(key)).is_ok()
    }

    /// Sets `key` to `value`, reusing the old value's memory when it has room.
    pub fn insert(&mut self, key: &[u8], value: &[u8]) {
        let h = hash(key);
        match self.find(key, h) {
            Ok(i) => {
                let entry = self.slots[i].as_mut().expect("found slot is full");
                entry.value.clear();
                entry.value.extend_from_slice(value);
            }
            Err(mut i) => {
                if (self.len + 1) * 4 > self.slots.len() * 3 {
                    self.grow();
                    i = self.find(key, h).expect_err("the key is not in the table");
                }
                self.slots[i] = Some(Entry {
                    hash: h,
                    key: key.into(),
                    value: value.to_vec(),
                });
                self.len += 1;
            }
        }
    }

    /// Removes `key`; whether it was there.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        let Ok(mut hole) = self.find(key, hash(key)) else {
            return false;
        };
        self.slots[hole] = None;
        self.len -= 1;
        // Backward shift: pull later entries of the probe run into the hole unless
        // that would put them before their home slot.
        let mask = self.mask();
        let mut i = (hole + 1) & mask;
        while let Some(entry) = &self.slots[i] {
            let home = entry.hash as usize & mask;
            // The entry may move to `hole` if `home` is not cyclically in (hole, i].
            let distance_to_i = i.wrapping_sub(home) & mask;
            let distance_to_hole = i.wrapping_sub(hole) & mask;
            if distance_to_i >= distance_to_hole {
                self.slots[hole] = self.slots[i].take();
                hole = i;
            }
            i = (i + 1) & mask;
        }
        true
    }

    fn grow(&mut self) {
        let bigger = empty_slots(self.slots.len() * 2);
        let old = core::mem::replace(&mut self.slots, bigger);
        let mask = self.mask();
        for entry in old.into_iter().flatten() {
            let mut i = entry.hash as usize & mask;
            while self.slots[i].is_some() {
                i = (i + 1) & mask;
            }
            self.slots[i] = Some(entry);
        }
    }
}

fn empty_slots(n: usize) -> Vec<Option<Entry>> {
    let mut slots = Vec::with_capacity(n);
    slots.resize_with(n, || None);
    slots
}
