//! The key-value store: a hash table from byte strings to byte strings, open addressing
//! with linear probing and backward-shift deletion (no tombstones), at most 3/4 full.
//!
//! Every allocation that stores client data (keys, values, the slot array) is fallible
//! and held to the heap's data limit (`heap::for_data`): a change that cannot get its
//! memory returns [`NoMemory`] and leaves the table exactly as it was.
//!
//! Pure `alloc` code: the host tests include it by path (with a `heap` module of their
//! own).

use alloc::vec::Vec;

use crate::heap;

/// The smallest slot array (a power of two).
const MIN_SLOTS: usize = 16;

/// The memory a change needed could not be had; nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoMemory;

struct Entry {
    hash: u64,
    key: Vec<u8>,
    value: Vec<u8>,
}

/// Slots per segment: as many as fit in a 4 KiB block.
const SEGMENT: usize = 4096 / core::mem::size_of::<Option<Entry>>();

/// The slot array, in segments of one 4 KiB block each rather than one block: growing
/// the table then needs no large contiguous block, which a heap fragmented by the
/// values stored may not have even though it merges freed blocks.
struct Slots {
    segments: Vec<Vec<Option<Entry>>>,
    /// Slots: 0 or a power of two.
    len: usize,
}

impl Slots {
    const fn new() -> Slots {
        Slots {
            segments: Vec::new(),
            len: 0,
        }
    }

    /// `len` empty slots, in memory held to the data limit.
    fn empty(len: usize) -> Result<Slots, NoMemory> {
        let count = len.div_ceil(SEGMENT);
        let mut segments: Vec<Vec<Option<Entry>>> = Vec::new();
        heap::for_data(|| segments.try_reserve_exact(count)).map_err(|_| NoMemory)?;
        for _ in 0..count {
            let mut segment = Vec::new();
            heap::for_data(|| segment.try_reserve_exact(SEGMENT)).map_err(|_| NoMemory)?;
            segment.resize_with(SEGMENT, || None);
            segments.push(segment);
        }
        Ok(Slots { segments, len })
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn iter(&self) -> impl Iterator<Item = &Option<Entry>> {
        self.segments.iter().flatten().take(self.len)
    }

    fn into_entries(self) -> impl Iterator<Item = Entry> {
        self.segments.into_iter().flatten().flatten()
    }
}

impl core::ops::Index<usize> for Slots {
    type Output = Option<Entry>;

    fn index(&self, i: usize) -> &Option<Entry> {
        &self.segments[i / SEGMENT][i % SEGMENT]
    }
}

impl core::ops::IndexMut<usize> for Slots {
    fn index_mut(&mut self, i: usize) -> &mut Option<Entry> {
        &mut self.segments[i / SEGMENT][i % SEGMENT]
    }
}

/// A map from byte-string keys to byte-string values.
pub struct Table {
    slots: Slots,
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

/// A copy of `bytes` in memory held to the data limit.
pub fn copy(bytes: &[u8]) -> Result<Vec<u8>, NoMemory> {
    let mut copy = Vec::new();
    heap::for_data(|| copy.try_reserve_exact(bytes.len())).map_err(|_| NoMemory)?;
    copy.extend_from_slice(bytes);
    Ok(copy)
}

/// Sets `stored` to `value`, in place when that does not waste much of its memory;
/// `stored` is unchanged on failure.
fn replace(stored: &mut Vec<u8>, value: &[u8]) -> Result<(), NoMemory> {
    let fits = value.len() <= stored.capacity();
    if !fits || value.len() < stored.capacity() / 4 {
        match copy(value) {
            Ok(new) => {
                *stored = new;
                return Ok(());
            }
            Err(NoMemory) if !fits => return Err(NoMemory),
            // Shrinking may stay in place when a smaller block cannot be had.
            Err(NoMemory) => {}
        }
    }
    stored.clear();
    stored.extend_from_slice(value);
    Ok(())
}

impl Default for Table {
    fn default() -> Self {
        Self::new()
    }
}

impl Table {
    /// An empty table; it allocates on the first insert.
    pub const fn new() -> Table {
        Table {
            slots: Slots::new(),
            len: 0,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The slot holding `key`.
    fn find(&self, key: &[u8], hash: u64) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        loop {
            match &self.slots[i] {
                None => return None,
                Some(entry) if entry.hash == hash && *entry.key == *key => return Some(i),
                Some(_) => i = (i + 1) & mask,
            }
        }
    }

    /// The empty slot where a new key of this hash goes (there must be room).
    fn vacant(&self, hash: u64) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        while self.slots[i].is_some() {
            i = (i + 1) & mask;
        }
        i
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let i = self.find(key, hash(key))?;
        self.slots[i].as_ref().map(|entry| entry.value.as_slice())
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.find(key, hash(key)).is_some()
    }

    /// Every key, in table order.
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.slots
            .iter()
            .flatten()
            .map(|entry| entry.key.as_slice())
    }

    /// Makes room for `additional` new keys, so that inserting them does not allocate.
    pub fn reserve(&mut self, additional: usize) -> Result<(), NoMemory> {
        if additional == 0 {
            return Ok(());
        }
        let needed = self.len.checked_add(additional).ok_or(NoMemory)?;
        let fits = |slots: usize| {
            (needed.checked_mul(4).zip(slots.checked_mul(3))).is_some_and(|(n, s)| n <= s)
        };
        if !self.slots.is_empty() && fits(self.slots.len()) {
            return Ok(());
        }
        let mut slots = self.slots.len().max(MIN_SLOTS);
        while !fits(slots) {
            slots = slots.checked_mul(2).ok_or(NoMemory)?;
        }
        let bigger = Slots::empty(slots)?;
        let old = core::mem::replace(&mut self.slots, bigger);
        for entry in old.into_entries() {
            let i = self.vacant(entry.hash);
            self.slots[i] = Some(entry);
        }
        Ok(())
    }

    /// Adds a key that is not in the table, with its value already copied.
    fn insert_new(&mut self, key: &[u8], hash: u64, value: Vec<u8>) -> Result<(), NoMemory> {
        let key = copy(key)?;
        self.reserve(1)?;
        let i = self.vacant(hash);
        self.slots[i] = Some(Entry { hash, key, value });
        self.len += 1;
        Ok(())
    }

    /// Sets `key` to `value`, reusing the old value's memory when it has room.
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), NoMemory> {
        let h = hash(key);
        match self.find(key, h) {
            Some(i) => {
                let entry = self.slots[i].as_mut().expect("found slot is full");
                replace(&mut entry.value, value)
            }
            None => self.insert_new(key, h, copy(value)?),
        }
    }

    /// Appends `suffix` to the value of `key` (an absent key counts as empty); the new
    /// length.
    pub fn append(&mut self, key: &[u8], suffix: &[u8]) -> Result<usize, NoMemory> {
        let h = hash(key);
        match self.find(key, h) {
            Some(i) => {
                let value = &mut self.slots[i].as_mut().expect("found slot is full").value;
                // Amortised growth: repeated appends do not copy the value each time.
                heap::for_data(|| value.try_reserve(suffix.len())).map_err(|_| NoMemory)?;
                value.extend_from_slice(suffix);
                Ok(value.len())
            }
            None => {
                self.insert_new(key, h, copy(suffix)?)?;
                Ok(suffix.len())
            }
        }
    }

    /// Sets every pair, in order (a later pair for the same key wins), or none of them
    /// when memory runs out.
    pub fn set_all<'a, I>(&mut self, pairs: I) -> Result<(), NoMemory>
    where
        I: Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
    {
        // Everything the pairs need is allocated before anything changes: a copy of
        // each value, a copy of each key that is not in the table yet, and the slots.
        let count = pairs.clone().count();
        let mut staged: Vec<(Option<Vec<u8>>, Vec<u8>)> = Vec::new();
        heap::for_data(|| staged.try_reserve_exact(count)).map_err(|_| NoMemory)?;
        let mut new_keys = 0;
        for (key, value) in pairs.clone() {
            let key = match self.contains(key) {
                true => None,
                false => {
                    new_keys += 1;
                    Some(copy(key)?)
                }
            };
            staged.push((key, copy(value)?));
        }
        self.reserve(new_keys)?;
        for ((key, _), (key_copy, value)) in pairs.zip(staged) {
            let h = hash(key);
            match self.find(key, h) {
                Some(i) => self.slots[i].as_mut().expect("found slot is full").value = value,
                None => {
                    let key = key_copy.expect("a key absent before is copied");
                    let i = self.vacant(h);
                    self.slots[i] = Some(Entry {
                        hash: h,
                        key,
                        value,
                    });
                    self.len += 1;
                }
            }
        }
        Ok(())
    }

    /// Removes `key`; whether it was there.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        let Some(mut hole) = self.find(key, hash(key)) else {
            return false;
        };
        self.slots[hole] = None;
        self.len -= 1;
        // Backward shift: pull later entries of the probe run into the hole unless
        // that would put them before their home slot.
        let mask = self.slots.len() - 1;
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

    /// Removes every key and gives all the memory back.
    pub fn clear(&mut self) {
        self.slots = Slots::new();
        self.len = 0;
    }
}
