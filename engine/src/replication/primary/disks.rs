//! The disks' initial sync on the primary, while the guest runs: compare the images
//! chunk by chunk with the backup's sums, send the chunks that differ, then what the guest
//! wrote meanwhile, and from the switch on keep the guest's writes for the epochs.
//!
//! ```text
//! track written chunks -> backup's sums -> send differing chunks -> resend written ones
//! (rounds, while they shrink) -> memory pre-copy -> switch to keeping writes, resend the
//! chunks written up to the switch -> epoch 1 carries the writes since the switch
//! ```
//!
//! No write is missed: a write completes under the device's lock and either marks its
//! chunk before the take that reads the marks (the chunk is read and sent after it
//! completed) or is kept as a write for epoch 1, which the backup applies after every
//! sync chunk. A chunk read while a write to it was under way is marked and sent again.

use super::*;
use checkpoint::disk::{chunk_count, chunk_sum, read_chunk, SumsReceiver};
use checkpoint::protocol::DISK_CHUNK;

/// Resend rounds while the guest's disk writes keep coming; the rest goes at the switch.
const DISK_ROUNDS: usize = 8;
/// A round this small ends the resends: the rest waits for the switch.
const DISK_ROUND_DONE: usize = 16;

/// How a disk's sync went.
#[derive(Default)]
pub(super) struct DiskSyncFigures {
    pub(super) bytes: u64,
    pub(super) chunks: u64,
}

impl Primary<'_> {
    /// Starts tracking written chunks, waits for the backup's sums and sends every chunk
    /// that differs, then what the guest wrote meanwhile.
    pub(super) fn sync_disks(&mut self) -> Result<(), PrimaryError> {
        if self.machine.disks().is_empty() {
            return Ok(());
        }
        for d in self.machine.disks() {
            d.track_chunks(DISK_CHUNK);
        }
        let sizes: Vec<u64> = self.machine.disks().iter().map(|d| d.image().1).collect();
        let sums = self.backup_sums(&sizes)?;
        for (d, &size) in sizes.iter().enumerate() {
            let t = Instant::now();
            let file = self.disk_file(d)?;
            let theirs = sums.of(d);
            let mut buf = Vec::with_capacity(DISK_CHUNK as usize);
            let mut differ = Vec::new();
            let mut last_report = Instant::now();
            for c in 0..chunk_count(size) {
                self.heartbeats.check_in(0);
                let n = read_chunk(&file, size, c, &mut buf).map_err(|e| self.disk_error(d, e))?;
                if theirs.get(c as usize).copied().flatten() != Some(chunk_sum(&buf[..n])) {
                    differ.push(c);
                }
                if last_report.elapsed() >= Duration::from_secs(1) {
                    last_report = Instant::now();
                    info!(
                        "disk {d}: compared {} of {} MiB with the backup's image",
                        (c * DISK_CHUNK) >> 20,
                        size >> 20
                    );
                    self.drain_acks()?;
                }
            }
            let compared = t.elapsed();
            if differ.is_empty() {
                info!(
                    "disk {d}: the backup's image is equal ({} MiB compared by SHA-256 chunk \
                     sums in {} ms): nothing to send",
                    size >> 20,
                    compared.as_millis()
                );
            } else {
                info!(
                    "disk {d}: {} of {} chunks differ from the backup's image ({} ms to compare): \
                     sending {} MiB",
                    differ.len(),
                    chunk_count(size),
                    compared.as_millis(),
                    (differ.len() as u64 * DISK_CHUNK).min(size) >> 20
                );
            }
            let mut figures = self.send_chunks(d, &file, size, &differ, "initial sync")?;
            for round in 1..=DISK_ROUNDS {
                let dirty = self.machine.disks()[d].take_dirty_chunks();
                if dirty.is_empty() {
                    break;
                }
                let f =
                    self.send_chunks(d, &file, size, &dirty, &format!("resend round {round}"))?;
                figures.bytes += f.bytes;
                figures.chunks += f.chunks;
                if dirty.len() <= DISK_ROUND_DONE {
                    break;
                }
            }
            let secs = t.elapsed().as_secs_f64().max(1e-6);
            info!(
                "disk {d} initial sync: {} MiB in {} chunks in {:.2} s ({:.0} MiB/s, compare \
                 included)",
                figures.bytes >> 20,
                figures.chunks,
                secs,
                figures.bytes as f64 / secs / (1 << 20) as f64
            );
        }
        Ok(())
    }

    /// The end of the disks' sync, just before epoch 1: each disk keeps its writes for the
    /// epochs from now on, and the chunks written since the last round are sent.
    pub(super) fn finish_disk_sync(&mut self) -> Result<(), PrimaryError> {
        for d in 0..self.machine.disks().len() {
            let rest = self.machine.disks()[d].record_writes(true);
            if rest.is_empty() {
                continue;
            }
            let file = self.disk_file(d)?;
            let size = self.machine.disks()[d].image().1;
            self.send_chunks(d, &file, size, &rest, "written during the memory sync")?;
        }
        Ok(())
    }

    /// The backup's sums of every disk, as they arrive on the ack stream.
    fn backup_sums(&mut self, sizes: &[u64]) -> Result<SumsReceiver, PrimaryError> {
        let mut sums = SumsReceiver::new(sizes);
        while !sums.complete() {
            self.heartbeats.check_in(0);
            match self.acks.recv_timeout(WAIT_SLICE) {
                Ok(AckEvent::DiskSums {
                    disk,
                    first,
                    sums: part,
                }) => {
                    sums.take(disk, first, part).map_err(|e| {
                        PrimaryError::BackupLost(BackupLoss::Protocol(format!(
                            "the backup's disk sums: {e}"
                        )))
                    })?;
                }
                Ok(AckEvent::Lost(why)) => return Err(PrimaryError::BackupLost(why)),
                Ok(AckEvent::Nack { epoch, reason }) => {
                    return Err(PrimaryError::Rejected { epoch, reason })
                }
                Ok(_) => {
                    return Err(PrimaryError::BackupLost(BackupLoss::Protocol(
                        "an answer before the backup's disk sums".into(),
                    )))
                }
                Err(_) if stop_requested() => {
                    return Err(PrimaryError::BackupLost(BackupLoss::Protocol(
                        "stopped while waiting for the backup's disk sums".into(),
                    )))
                }
                Err(_) => {}
            }
        }
        Ok(sums)
    }

    /// Sends `chunks` of disk `d` (an image of `size` bytes read through `file`) as
    /// `DiskSync` frames, with progress.
    fn send_chunks(
        &mut self,
        d: usize,
        file: &std::fs::File,
        size: u64,
        chunks: &[u64],
        what: &str,
    ) -> Result<DiskSyncFigures, PrimaryError> {
        let total: u64 = chunks
            .iter()
            .map(|&c| size.saturating_sub(c * DISK_CHUNK).min(DISK_CHUNK))
            .sum();
        let mut buf = Vec::with_capacity(DISK_CHUNK as usize);
        let mut done = 0u64;
        let t = Instant::now();
        let mut last_report = Instant::now();
        for &c in chunks {
            self.heartbeats.check_in(0);
            let n = read_chunk(file, size, c, &mut buf).map_err(|e| self.disk_error(d, e))?;
            done += n as u64;
            let msg = Message::DiskSync {
                disk: d as u32,
                offset: c * DISK_CHUNK,
                bytes_done: done,
                bytes_total: total,
                data: bytes::Bytes::copy_from_slice(&buf[..n]),
            };
            {
                let mut link = self.link();
                link.tx.send(&msg)?;
                link.sent();
            }
            if last_report.elapsed() >= Duration::from_millis(500) || done == total {
                last_report = Instant::now();
                let secs = t.elapsed().as_secs_f64().max(1e-6);
                let rate = done as f64 / secs;
                info!(
                    "disk {d} {what}: {} of {} MiB sent ({:.0} MiB/s, {:.1} s left)",
                    done >> 20,
                    total >> 20,
                    rate / (1 << 20) as f64,
                    (total - done) as f64 / rate.max(1.0)
                );
                self.drain_acks()?;
            }
        }
        Ok(DiskSyncFigures {
            bytes: done,
            chunks: chunks.len() as u64,
        })
    }

    fn disk_file(&self, d: usize) -> Result<std::fs::File, PrimaryError> {
        self.machine.disks()[d]
            .image_file()
            .map_err(|e| self.disk_error(d, e))
    }

    fn disk_error(&self, d: usize, e: std::io::Error) -> PrimaryError {
        PrimaryError::Disk(format!(
            "disk {d} ({}): reading the image for the initial sync: {e}",
            self.machine.disks()[d].image().0.display()
        ))
    }
}
