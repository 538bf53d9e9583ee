//! Disks on the replication link: the chunk sums of the initial sync, the framing of an
//! epoch's disk writes, and the backup's side of both ([`DiskSink`]).
//!
//! Remus replicated a guest's disk with its memory, one epoch at a time (DRBD in its
//! "protocol D", later blktap's remus driver); lockstep does the same: the writes the
//! guest completed during epoch E travel inside epoch E, are verified with it and reach
//! the backup's image when E commits, never before. So the backup's image always holds a
//! committed epoch, the same one as its memory.
//!
//! Before the first epoch, the images are compared chunk by chunk ([`DISK_CHUNK`] bytes,
//! a truncated SHA-256 each): the backup sends its sums, the primary sends only the chunks
//! whose sums differ. Equal images cost one read of each, and nothing on the link.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use bytes::Bytes;

use crate::digest::Digest;
use crate::protocol::{Message, DISK_CHUNK, DISK_SUM_LEN, MAX_PAYLOAD_LEN};
use crate::protocol::{DISK_WRITES_HEADER_LEN, DISK_WRITE_ENTRY_LEN};

/// A chunk's sum: the first [`DISK_SUM_LEN`] bytes of the SHA-256 of its bytes.
pub type ChunkSum = [u8; DISK_SUM_LEN];

/// Sums per `DiskSums` frame (1 MiB of sums: 64 GiB of image).
pub const SUMS_PER_FRAME: usize = 1 << 16;

/// Payload bytes of a `DiskWrites` frame before another write no longer joins it (4 MiB);
/// a single write may exceed it up to the protocol's frame limit.
const WRITES_FRAME_TARGET: usize = 4 << 20;

/// The number of chunks of an image of `size` bytes.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(DISK_CHUNK)
}

/// The sum of one chunk's bytes.
pub fn chunk_sum(bytes: &[u8]) -> ChunkSum {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut sum = [0u8; DISK_SUM_LEN];
    sum.copy_from_slice(&d.as_ref()[..DISK_SUM_LEN]);
    sum
}

/// Reads chunk `index` of `file` (an image of `size` bytes) into `buf`; returns its
/// length (the last chunk may be short).
pub fn read_chunk(file: &File, size: u64, index: u64, buf: &mut Vec<u8>) -> io::Result<usize> {
    let offset = index * DISK_CHUNK;
    let len = size.saturating_sub(offset).min(DISK_CHUNK) as usize;
    buf.resize(len, 0);
    file.read_exact_at(&mut buf[..len], offset)?;
    Ok(len)
}

/// The sums of every chunk of `file`, an image of `size` bytes; `progress` is called with
/// the bytes read so far after each chunk.
pub fn image_sums(
    file: &File,
    size: u64,
    mut progress: impl FnMut(u64),
) -> io::Result<Vec<ChunkSum>> {
    let mut buf = Vec::with_capacity(DISK_CHUNK as usize);
    let mut sums = Vec::with_capacity(chunk_count(size) as usize);
    for i in 0..chunk_count(size) {
        let n = read_chunk(file, size, i, &mut buf)?;
        sums.push(chunk_sum(&buf[..n]));
        progress(i * DISK_CHUNK + n as u64);
    }
    Ok(sums)
}

/// `DiskSums` messages carrying `sums` of disk `disk`.
pub fn sums_messages(disk: u32, sums: &[ChunkSum]) -> Vec<Message> {
    sums.chunks(SUMS_PER_FRAME)
        .enumerate()
        .map(|(i, part)| Message::DiskSums {
            disk,
            first: (i * SUMS_PER_FRAME) as u64,
            sums: part.to_vec(),
        })
        .collect()
}

/// Collects the `DiskSums` of every disk as they arrive (on the primary).
#[derive(Debug)]
pub struct SumsReceiver {
    sums: Vec<Vec<Option<ChunkSum>>>,
    missing: u64,
}

impl SumsReceiver {
    /// Expects the sums of disks of these sizes (bytes).
    pub fn new(sizes: &[u64]) -> SumsReceiver {
        let sums: Vec<Vec<Option<ChunkSum>>> = sizes
            .iter()
            .map(|&s| vec![None; chunk_count(s) as usize])
            .collect();
        let missing = sums.iter().map(|s| s.len() as u64).sum();
        SumsReceiver { sums, missing }
    }

    /// Takes one `DiskSums`; an error names what does not fit.
    pub fn take(&mut self, disk: u32, first: u64, part: Vec<ChunkSum>) -> Result<(), String> {
        let Some(slots) = self.sums.get_mut(disk as usize) else {
            return Err(format!("sums for disk {disk}, which does not exist"));
        };
        let end = first.saturating_add(part.len() as u64);
        if end > slots.len() as u64 {
            return Err(format!(
                "sums of chunks {first}..{end} of disk {disk}, which has {} chunks",
                slots.len()
            ));
        }
        for (slot, sum) in slots[first as usize..end as usize].iter_mut().zip(part) {
            if slot.replace(sum).is_some() {
                return Err(format!("disk {disk}: a chunk's sum came twice"));
            }
            self.missing -= 1;
        }
        Ok(())
    }

    /// Whether every chunk's sum arrived.
    pub fn complete(&self) -> bool {
        self.missing == 0
    }

    /// The sums of disk `disk` (`None` for a chunk not received).
    pub fn of(&self, disk: usize) -> &[Option<ChunkSum>] {
        &self.sums[disk]
    }
}

/// The `DiskWrites` messages of `epoch` for `disks[d]` = the writes of disk `d` in
/// completion order, added to `digest` in the order sent (as the backup will).
pub fn write_messages(
    epoch: u64,
    disks: &[Vec<(u64, Bytes)>],
    digest: &mut Digest,
) -> Vec<Message> {
    let mut out = Vec::new();
    let mut seq = 0u64;
    for (d, writes) in disks.iter().enumerate() {
        let mut frame: Vec<(u64, Bytes)> = Vec::new();
        let mut len = DISK_WRITES_HEADER_LEN;
        for (offset, data) in writes {
            let add = DISK_WRITE_ENTRY_LEN + data.len();
            let over = len + add > WRITES_FRAME_TARGET || len + add > MAX_PAYLOAD_LEN;
            if !frame.is_empty() && over {
                out.push(Message::DiskWrites {
                    epoch,
                    disk: d as u32,
                    writes: std::mem::take(&mut frame),
                });
                len = DISK_WRITES_HEADER_LEN;
            }
            digest.add_disk_write(d as u32, seq, *offset, data);
            seq += 1;
            frame.push((*offset, data.clone()));
            len += add;
        }
        if !frame.is_empty() {
            out.push(Message::DiskWrites {
                epoch,
                disk: d as u32,
                writes: frame,
            });
        }
    }
    out
}

/// A write of a verified epoch, for [`DiskSink::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedWrite {
    /// The disk (index in `Hello`).
    pub disk: u32,
    /// Byte offset in the image.
    pub offset: u64,
    /// The bytes.
    pub data: Bytes,
}

/// The backup's disks, as staging drives them.
pub trait DiskSink: Send {
    /// Writes initial-sync bytes straight into disk `disk`'s image (before the first
    /// commit; range already checked against the image's size).
    fn sync(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<(), String>;

    /// Makes the disks hold committed epoch `epoch` (called for every epoch, `writes`
    /// empty when it wrote nothing): `writes` in order, all of them or,
    /// after a crash, none (the implementation's journal). Called once the epoch is
    /// verified and before its memory is applied; an error rejects the epoch and ends
    /// replication (the message says which epoch the images hold).
    fn commit(&mut self, epoch: u64, writes: &[StagedWrite]) -> Result<(), String>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Message;

    #[test]
    fn writes_split_into_frames_that_decode_and_digest_alike() {
        let big = Bytes::from(vec![7u8; 3 << 20]);
        let small = Bytes::from(vec![1u8; 512]);
        let disks = vec![
            vec![
                (0, big.clone()),
                (512, small.clone()),
                (1 << 20, big.clone()),
            ],
            vec![],
            vec![(4096, small.clone())],
        ];
        let mut d1 = Digest::new();
        let msgs = write_messages(9, &disks, &mut d1);
        // 3 MiB + 3 MiB do not share a 4 MiB frame; disk 2 gets its own.
        assert_eq!(msgs.len(), 3);
        let mut d2 = Digest::new();
        let mut seq = 0;
        for m in &msgs {
            let frame = m.to_frame().unwrap();
            let (back, _) = Message::decode(&frame).unwrap();
            assert_eq!(&back, m);
            let Message::DiskWrites { disk, writes, .. } = back else {
                panic!("{back:?}")
            };
            for (o, data) in writes {
                d2.add_disk_write(disk, seq, o, &data);
                seq += 1;
            }
        }
        assert_eq!(d1, d2);
        // Order matters.
        let mut d3 = Digest::new();
        let swapped = vec![vec![(512, small.clone()), (0, big.clone()), (1 << 20, big)]];
        write_messages(9, &swapped, &mut d3);
        assert_ne!(d1.finish(b""), d3.finish(b""));
    }

    #[test]
    fn sums_arrive_in_parts_and_refuse_what_does_not_fit() {
        let sizes = [3 * DISK_CHUNK + 5, DISK_CHUNK];
        let mut r = SumsReceiver::new(&sizes);
        assert_eq!(r.of(0).len(), 4);
        r.take(0, 0, vec![[1; 16]; 2]).unwrap();
        assert!(!r.complete());
        r.take(0, 2, vec![[2; 16]; 2]).unwrap();
        assert!(r.take(0, 3, vec![[2; 16]]).unwrap_err().contains("twice"));
        assert!(r
            .take(1, 0, vec![[3; 16]; 2])
            .unwrap_err()
            .contains("1 chunks"));
        assert!(r.take(2, 0, vec![[3; 16]]).is_err());
        r.take(1, 0, vec![[3; 16]]).unwrap();
        assert!(r.complete());
        assert_eq!(chunk_sum(b"abc"), chunk_sum(b"abc"));
        assert_ne!(chunk_sum(b"abc"), chunk_sum(b"abd"));
    }
}
