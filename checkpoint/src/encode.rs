//! Primary side: encode a staged epoch on worker threads and send it.
//!
//! The engine copies an epoch's dirty pages out of guest memory into one contiguous
//! staging buffer while the guest is paused (its `memory::copy_pages`, the one page copy
//! of pre-copy and epochs; [`StagedPages`]: the buffer plus the page frame numbers). After the guest resumes, [`EpochEncoder::encode`] splits the pages over
//! `workers` scoped threads. Each worker encodes its pages (against the
//! [`DeltaCache`] when one is given) straight into `Pages` frames of at most
//! `max_frame_len` bytes and hands finished frames over a bounded channel to the calling
//! thread, which passes whatever frames are ready to the sink in one batch (one
//! `SENDMSG` for the transport). The bounded channel means a slow network stalls the
//! workers instead of piling up frames (invariant 4).
//!
//! Pages are split between workers by delta-cache shard (`shard_of(pfn) % workers`), so
//! two workers never touch the same shard. Each worker also digests its pages; the parts
//! are merged into the epoch digest that `EpochCommit` carries.
//!
//! [`send_epoch`] and [`send_sync`] glue the encoder to a [`FrameSender`]. If anything
//! fails after encoding started, the delta cache is cleared: it may remember pages the
//! backup never received.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{bounded, Sender};
use thiserror::Error;

use crate::codec::{as_page, encode_page, Encoding};
use crate::delta_cache::DeltaCache;
use crate::digest::Digest;
use crate::protocol::{
    state_frame_header, Message, PagesFrameBuilder, ProtocolError, ENTRY_HEADER_LEN, HEADER_LEN,
    MAX_PAYLOAD_LEN, OUTPUT_FIXED_LEN,
};
use crate::transport::{FrameSender, TransportError};
use crate::PAGE_SIZE;

/// Most frames handed to the sink in one batch.
const MAX_BATCH: usize = 64;

/// Errors of encoding and sending an epoch.
#[derive(Debug, Error)]
pub enum EncodeError {
    /// The staging buffer does not hold one page per pfn.
    #[error("staged epoch has {pfns} page frame numbers but {bytes} bytes of pages (expected {expected})")]
    BadStaging {
        /// Number of pfns.
        pfns: usize,
        /// Bytes in the buffer.
        bytes: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// An encoder thread panicked.
    #[error("an encoder worker thread panicked")]
    WorkerPanicked,
    /// The sink (transport) failed.
    #[error("sending the epoch failed: {0}")]
    Transport(#[from] TransportError),
    /// A message could not be encoded.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// An epoch's dirty pages copied out of guest memory: `pfns[i]`'s content is
/// `data[i * 4096..(i + 1) * 4096]`.
#[derive(Debug, Clone, Copy)]
pub struct StagedPages<'a> {
    pfns: &'a [u64],
    data: &'a [u8],
}

impl<'a> StagedPages<'a> {
    /// Checks that `data` holds exactly one page per pfn.
    pub fn new(pfns: &'a [u64], data: &'a [u8]) -> Result<Self, EncodeError> {
        let expected = pfns.len() * PAGE_SIZE;
        if data.len() != expected {
            return Err(EncodeError::BadStaging {
                pfns: pfns.len(),
                bytes: data.len(),
                expected,
            });
        }
        Ok(Self { pfns, data })
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pfns.len()
    }

    /// Whether there is no page.
    pub fn is_empty(&self) -> bool {
        self.pfns.is_empty()
    }

    /// Page `i` and its pfn.
    fn page(&self, i: usize) -> Option<(u64, &'a [u8; PAGE_SIZE])> {
        let page = as_page(self.data.get(i * PAGE_SIZE..(i + 1) * PAGE_SIZE)?)?;
        Some((*self.pfns.get(i)?, page))
    }
}

/// Which frames to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// `Pages` frames of an epoch; deltas against the cache.
    Epoch(u64),
    /// `SyncPages` frames (pre-copy); no deltas, and the cache forgets the pages sent.
    Sync {
        /// Guest bytes of the round already sent before these pages.
        bytes_done: u64,
        /// Guest bytes of the whole round.
        bytes_total: u64,
    },
}

/// Encoder settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderConfig {
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Largest frame produced, header included (clamped to hold at least one page).
    pub max_frame_len: usize,
    /// Frames that may wait between the workers and the sink.
    pub queue_depth: usize,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            max_frame_len: 256 << 10,
            queue_depth: 8,
        }
    }
}

/// What an encode produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeSummary {
    /// Pages encoded.
    pub pages: u64,
    /// Frames produced.
    pub frames: u32,
    /// Frame bytes produced (headers included).
    pub bytes: u64,
    /// Pages per encoding, indexed by `Encoding as usize`.
    pub by_encoding: [u64; Encoding::ALL.len()],
    /// Digest of the pages (finish it with the state blob for `EpochCommit`).
    pub digest: Digest,
    /// Bytes of `Output` frames (the guest's network output, headers included), part of
    /// `bytes`.
    pub output_bytes: u64,
}

impl EncodeSummary {
    fn merge(&mut self, o: &EncodeSummary) {
        self.pages += o.pages;
        for (a, b) in self.by_encoding.iter_mut().zip(o.by_encoding) {
            *a += b;
        }
        self.digest.merge(&o.digest);
    }

    /// Pages sent with `enc`.
    pub fn count(&self, enc: Encoding) -> u64 {
        self.by_encoding[enc as usize]
    }
}

/// Encodes staged pages into frames on worker threads.
#[derive(Debug, Clone)]
pub struct EpochEncoder {
    cfg: EncoderConfig,
    cache: Option<Arc<DeltaCache>>,
}

impl EpochEncoder {
    /// An encoder; with a cache, epoch pages are sent as deltas where that is smaller.
    pub fn new(cfg: EncoderConfig, cache: Option<Arc<DeltaCache>>) -> Self {
        let min = HEADER_LEN + 16 + 4 + ENTRY_HEADER_LEN + PAGE_SIZE;
        let cfg = EncoderConfig {
            workers: cfg.workers.max(1),
            max_frame_len: cfg.max_frame_len.clamp(min, MAX_PAYLOAD_LEN),
            queue_depth: cfg.queue_depth.max(1),
        };
        Self { cfg, cache }
    }

    /// The delta cache, if any.
    pub fn cache(&self) -> Option<&Arc<DeltaCache>> {
        self.cache.as_ref()
    }

    /// Encodes `staged` into frames of `kind`, handing batches of finished frames to
    /// `sink` in the calling thread. Stops at the first sink error, clearing the cache.
    pub fn encode(
        &self,
        kind: FrameKind,
        staged: &StagedPages<'_>,
        mut sink: impl FnMut(&[Bytes]) -> Result<(), TransportError>,
    ) -> Result<EncodeSummary, EncodeError> {
        let workers = self.cfg.workers.min(staged.len()).max(1);
        let (tx, rx) = bounded::<Bytes>(self.cfg.queue_depth);
        let progress = AtomicU64::new(0);
        let r = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let tx = tx.clone();
                    let progress = &progress;
                    s.spawn(move || self.work(w, workers, kind, staged, &tx, progress))
                })
                .collect();
            drop(tx);
            let mut total = EncodeSummary::default();
            let mut sink_result = Ok(());
            let mut batch = Vec::with_capacity(MAX_BATCH);
            while let Ok(frame) = rx.recv() {
                batch.push(frame);
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(f) => batch.push(f),
                        Err(_) => break,
                    }
                }
                total.frames += batch.len() as u32;
                total.bytes += batch.iter().map(|f| f.len() as u64).sum::<u64>();
                sink_result = sink(&batch);
                batch.clear();
                if sink_result.is_err() {
                    break;
                }
            }
            // Workers blocked on a full channel see it closed and stop.
            drop(rx);
            let mut panicked = false;
            for h in handles {
                match h.join() {
                    Ok(part) => total.merge(&part),
                    Err(_) => panicked = true,
                }
            }
            sink_result?;
            if panicked {
                return Err(EncodeError::WorkerPanicked);
            }
            Ok(total)
        });
        if r.is_err() {
            if let Some(c) = &self.cache {
                c.clear();
            }
        }
        r
    }

    fn owner(&self, i: usize, pfn: u64, workers: usize) -> usize {
        match &self.cache {
            Some(c) => c.shard_of(pfn) % workers,
            None => i % workers,
        }
    }

    fn work(
        &self,
        w: usize,
        workers: usize,
        kind: FrameKind,
        staged: &StagedPages<'_>,
        tx: &Sender<Bytes>,
        progress: &AtomicU64,
    ) -> EncodeSummary {
        let mut sum = EncodeSummary::default();
        let cap = self.cfg.max_frame_len;
        let new_builder = || match kind {
            FrameKind::Epoch(e) => PagesFrameBuilder::pages(e, cap),
            FrameKind::Sync { .. } => PagesFrameBuilder::sync(cap),
        };
        let finish = |b: PagesFrameBuilder| match kind {
            FrameKind::Epoch(_) => b.finish(),
            FrameKind::Sync {
                bytes_done,
                bytes_total,
            } => {
                let mine = u64::from(b.count()) * PAGE_SIZE as u64;
                let done = progress.fetch_add(mine, Ordering::Relaxed) + mine;
                b.finish_sync(bytes_done + done, bytes_total)
            }
        };
        let mut builder: Option<PagesFrameBuilder> = None;
        for i in 0..staged.len() {
            let Some((pfn, page)) = staged.page(i) else {
                break;
            };
            if self.owner(i, pfn, workers) != w {
                continue;
            }
            let b = builder.get_or_insert_with(new_builder);
            let enc = b.push(pfn, |out| match (kind, &self.cache) {
                (FrameKind::Epoch(_), Some(c)) => c.encode(pfn, page, out),
                (_, cache) => {
                    if let Some(c) = cache {
                        c.forget(pfn);
                    }
                    encode_page(page, None, out)
                }
            });
            sum.pages += 1;
            sum.by_encoding[enc as usize] += 1;
            // Pre-copy pages carry no digest: epoch 1's commit makes the image consistent.
            if matches!(kind, FrameKind::Epoch(_)) {
                sum.digest.add_page(pfn * PAGE_SIZE as u64, page);
            }
            if b.frame_len() + ENTRY_HEADER_LEN + PAGE_SIZE > cap {
                if let Some(b) = builder.take() {
                    if tx.send(finish(b)).is_err() {
                        return sum;
                    }
                }
            }
        }
        if let Some(b) = builder.take() {
            let _ = tx.send(finish(b));
        }
        sum
    }
}

/// The guest's network output of one epoch, shipped with it (`Output` frames).
#[derive(Debug, Clone, Copy, Default)]
pub struct EpochOutput<'a> {
    /// The last epoch whose output the primary had let out (0: none).
    pub released: u64,
    /// The frames the guest sent during the epoch, in order.
    pub frames: &'a [Bytes],
}

impl EpochOutput<'_> {
    /// The `Output` messages that carry these frames for `epoch`: none without frames,
    /// more than one when they do not fit one frame's payload.
    pub fn messages(&self, epoch: u64) -> Vec<Message> {
        let mut out = Vec::new();
        let mut chunk: Vec<Bytes> = Vec::new();
        let mut len = OUTPUT_FIXED_LEN;
        for f in self.frames.iter().filter(|f| !f.is_empty()) {
            if !chunk.is_empty() && len + 4 + f.len() > MAX_PAYLOAD_LEN {
                out.push(Message::Output {
                    epoch,
                    released: self.released,
                    frames: std::mem::take(&mut chunk),
                });
                len = OUTPUT_FIXED_LEN;
            }
            len += 4 + f.len();
            chunk.push(f.clone());
        }
        if !chunk.is_empty() {
            out.push(Message::Output {
                epoch,
                released: self.released,
                frames: chunk,
            });
        }
        out
    }
}

/// Sends one epoch: `EpochBegin`, the encoded pages, `Output` (only when the guest sent
/// something during the epoch), `State`, `EpochCommit`. The digest covers the pages, the
/// output and the state.
pub fn send_epoch(
    sender: &mut FrameSender,
    encoder: &EpochEncoder,
    epoch: u64,
    staged: &StagedPages<'_>,
    disks: &[Vec<(u64, bytes::Bytes)>],
    state: &[u8],
    output: EpochOutput<'_>,
) -> Result<EncodeSummary, EncodeError> {
    sender.send(&Message::EpochBegin {
        epoch,
        page_count: staged.len() as u64,
        state_len: state.len() as u64,
    })?;
    let r = encoder
        .encode(FrameKind::Epoch(epoch), staged, |frames| {
            sender.send_frames(frames)
        })
        .and_then(|mut summary| {
            let disk_frames = crate::disk::write_messages(epoch, disks, &mut summary.digest);
            for m in &disk_frames {
                let frame = m.to_frame()?;
                sender.send_frames(&[&frame[..]])?;
                summary.bytes += frame.len() as u64;
            }
            let mut output_frames = BytesMut::new();
            let mut index = 0u64;
            for m in output.messages(epoch) {
                if let Message::Output { frames, .. } = &m {
                    for f in frames {
                        summary.digest.add_output(index, f);
                        index += 1;
                    }
                }
                m.encode(&mut output_frames)?;
            }
            summary.output_bytes = output_frames.len() as u64;
            let state_header = state_frame_header(epoch, state)?;
            let mut commit = BytesMut::new();
            Message::EpochCommit {
                epoch,
                page_count: summary.pages,
                frame_count: summary.frames,
                disk_frames: disk_frames.len() as u32,
                state_len: state.len() as u64,
                digest: summary.digest.finish(state).0,
            }
            .encode(&mut commit)?;
            sender.send_frames(&[&output_frames[..], &state_header[..], state, &commit[..]])?;
            summary.bytes +=
                (output_frames.len() + state_header.len() + state.len() + commit.len()) as u64;
            Ok(summary)
        });
    if r.is_err() {
        if let Some(c) = encoder.cache() {
            c.clear();
        }
    }
    r
}

/// Sends pre-copy pages as `SyncPages` frames with progress figures (the summary's digest
/// stays empty: pre-copy pages are not digested).
pub fn send_sync(
    sender: &mut FrameSender,
    encoder: &EpochEncoder,
    staged: &StagedPages<'_>,
    bytes_done: u64,
    bytes_total: u64,
) -> Result<EncodeSummary, EncodeError> {
    encoder.encode(
        FrameKind::Sync {
            bytes_done,
            bytes_total,
        },
        staged,
        |frames| sender.send_frames(frames),
    )
}

/// Sends pre-copy pages known to hold only zeros (found so without reading them, see the
/// engine's page map) as `SyncPages` frames of zero pages: `bytes_done` of the round's
/// `bytes_total` were sent before them. Nothing is read, encoded or digested; the delta
/// cache forgets the pages, as for any pre-copy page.
pub fn send_sync_zeros(
    sender: &mut FrameSender,
    encoder: &EpochEncoder,
    pfns: &[u64],
    bytes_done: u64,
    bytes_total: u64,
) -> Result<EncodeSummary, EncodeError> {
    encoder.zero_sync_frames(pfns, bytes_done, bytes_total, |frames| {
        sender.send_frames(frames)
    })
}

impl EpochEncoder {
    /// The `SyncPages` frames of zero pages for `pfns` (see [`send_sync_zeros`]), handed
    /// to `sink` in batches, on the calling thread (an entry costs a few bytes and no page
    /// access, a worker thread would cost more than it saves).
    pub fn zero_sync_frames(
        &self,
        pfns: &[u64],
        bytes_done: u64,
        bytes_total: u64,
        mut sink: impl FnMut(&[Bytes]) -> Result<(), TransportError>,
    ) -> Result<EncodeSummary, EncodeError> {
        if let Some(c) = self.cache.as_ref().filter(|c| !c.is_empty()) {
            for &pfn in pfns {
                c.forget(pfn);
            }
        }
        let cap = self.cfg.max_frame_len;
        // Entries that fit one frame besides its header, progress and count.
        let per_frame = ((cap - HEADER_LEN - 16 - 4) / ENTRY_HEADER_LEN).max(1);
        let mut sum = EncodeSummary::default();
        let mut done = bytes_done;
        let mut batch = Vec::with_capacity(MAX_BATCH);
        for chunk in pfns.chunks(per_frame) {
            let mut b = PagesFrameBuilder::sync(HEADER_LEN + 20 + chunk.len() * ENTRY_HEADER_LEN);
            for &pfn in chunk {
                b.push(pfn, |_| Encoding::Zero);
            }
            done += (chunk.len() * PAGE_SIZE) as u64;
            let frame = b.finish_sync(done, bytes_total);
            sum.pages += chunk.len() as u64;
            sum.by_encoding[Encoding::Zero as usize] += chunk.len() as u64;
            sum.frames += 1;
            sum.bytes += frame.len() as u64;
            batch.push(frame);
            if batch.len() == MAX_BATCH {
                sink(&batch)?;
                batch.clear();
            }
        }
        if !batch.is_empty() {
            sink(&batch)?;
        }
        Ok(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode_page;
    use crate::digest::digest_regions;
    use crate::staging::{Staging, Step};
    use std::collections::HashMap;
    use vm_memory::{Bytes as _, GuestAddress, GuestMemoryMmap};

    const PAGES: usize = 96;

    /// A primary RAM model with pages of every flavour.
    fn ram() -> Vec<u8> {
        let mut ram = vec![0u8; PAGES * PAGE_SIZE];
        let mut x = 0x1234_5678_9abc_def1u64;
        for (i, p) in ram.chunks_exact_mut(PAGE_SIZE).enumerate() {
            match i % 4 {
                0 => {}
                1 => p
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = (j % 13) as u8),
                _ => p.iter_mut().for_each(|b| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }),
            }
        }
        ram
    }

    fn collect(
        enc: &EpochEncoder,
        kind: FrameKind,
        pfns: &[u64],
        data: &[u8],
    ) -> (EncodeSummary, Vec<Message>) {
        let staged = StagedPages::new(pfns, data).unwrap();
        let mut frames = Vec::new();
        let summary = enc
            .encode(kind, &staged, |batch| {
                frames.extend(batch.iter().cloned());
                Ok(())
            })
            .unwrap();
        assert_eq!(summary.frames as usize, frames.len());
        assert_eq!(
            summary.bytes,
            frames.iter().map(|f| f.len() as u64).sum::<u64>()
        );
        let msgs = frames
            .iter()
            .map(|f| {
                assert!(f.len() <= enc.cfg.max_frame_len);
                Message::decode(f).unwrap().0
            })
            .collect();
        (summary, msgs)
    }

    #[test]
    fn every_page_is_encoded_once_and_decodes_back() {
        let ram = ram();
        let pfns: Vec<u64> = (0..PAGES as u64).rev().collect(); // any order
        let data: Vec<u8> = pfns
            .iter()
            .flat_map(|&p| ram[p as usize * PAGE_SIZE..][..PAGE_SIZE].to_vec())
            .collect();
        for workers in [1, 2, 3] {
            let cfg = EncoderConfig {
                workers,
                max_frame_len: 20 << 10,
                queue_depth: 1,
            };
            let enc = EpochEncoder::new(cfg, Some(Arc::new(DeltaCache::new(256, 6))));
            let (summary, msgs) = collect(&enc, FrameKind::Epoch(4), &pfns, &data);
            assert_eq!(summary.pages, PAGES as u64);
            assert!(summary.frames > 1, "small frames force several");
            assert_eq!(summary.count(Encoding::Zero), (PAGES / 4) as u64);
            let mut seen = HashMap::new();
            for m in msgs {
                let Message::Pages { epoch: 4, pages } = m else {
                    panic!("{m:?}");
                };
                for e in pages.iter() {
                    let mut page = [0u8; PAGE_SIZE];
                    decode_page(e.encoding, e.payload, &mut page).unwrap();
                    assert!(seen.insert(e.pfn, page).is_none(), "pfn {} twice", e.pfn);
                }
            }
            assert_eq!(seen.len(), PAGES);
            for (pfn, page) in seen {
                assert!(page[..] == ram[pfn as usize * PAGE_SIZE..][..PAGE_SIZE]);
            }
            let mut d = Digest::new();
            for &p in &pfns {
                d.add_page(
                    p * PAGE_SIZE as u64,
                    &ram[p as usize * PAGE_SIZE..][..PAGE_SIZE],
                );
            }
            assert_eq!(summary.digest, d);
        }
    }

    #[test]
    fn sync_frames_carry_progress_and_the_cache_forgets_their_pages() {
        let ram = ram();
        let pfns: Vec<u64> = (0..PAGES as u64).collect();
        let cache = Arc::new(DeltaCache::new(256, 4));
        cache.remember(5, &[9u8; PAGE_SIZE]);
        let cfg = EncoderConfig {
            workers: 2,
            max_frame_len: 64 << 10,
            queue_depth: 2,
        };
        let enc = EpochEncoder::new(cfg, Some(cache.clone()));
        let kind = FrameKind::Sync {
            bytes_done: 1000,
            bytes_total: 5000,
        };
        let (summary, msgs) = collect(&enc, kind, &pfns, &ram);
        assert_eq!(
            summary.count(Encoding::XorRle) + summary.count(Encoding::XorLz4),
            0
        );
        assert!(cache.is_empty(), "sync pages must not leave stale bases");
        let mut max_done = 0;
        for m in msgs {
            let Message::SyncPages {
                bytes_done,
                bytes_total,
                ..
            } = m
            else {
                panic!("{m:?}");
            };
            assert_eq!(bytes_total, 5000);
            max_done = max_done.max(bytes_done);
        }
        assert_eq!(max_done, 1000 + (PAGES * PAGE_SIZE) as u64);
    }

    #[test]
    fn zero_sync_frames_carry_progress_and_zero_what_the_backup_wrote() {
        let ram = ram();
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), PAGES * PAGE_SIZE)]).unwrap();
        let mut staging = Staging::new(&mem, 1 << 16).with_zeroed_memory(&mem);
        let cache = Arc::new(DeltaCache::new(256, 2));
        cache.remember(3, &[9u8; PAGE_SIZE]);
        let cfg = EncoderConfig {
            workers: 2,
            // The smallest frame: one page of data, or 373 zero pages.
            max_frame_len: 0,
            queue_depth: 2,
        };
        let enc = EpochEncoder::new(cfg, Some(cache.clone()));
        let per_frame = (enc.cfg.max_frame_len - HEADER_LEN - 20) / ENTRY_HEADER_LEN;
        assert_eq!(per_frame, 373);
        // Round 0: every page with its data.
        let all: Vec<u64> = (0..PAGES as u64).collect();
        let round0 = FrameKind::Sync {
            bytes_done: 0,
            bytes_total: (PAGES * PAGE_SIZE) as u64,
        };
        for m in collect(&enc, round0, &all, &ram).1 {
            staging.handle(&mem, m).unwrap();
        }
        // Frames of zero pages: as many entries as fit, progress counting each frame.
        let page = PAGE_SIZE as u64;
        let many: Vec<u64> = (1000..1800).collect();
        let mut frames = Vec::new();
        let summary = enc
            .zero_sync_frames(&many, 7 * page, 900 * page, |batch| {
                frames.extend(batch.iter().cloned());
                Ok(())
            })
            .unwrap();
        assert_eq!((summary.pages, summary.frames), (800, 3));
        assert_eq!(summary.count(Encoding::Zero), 800);
        assert_eq!(
            summary.bytes,
            frames.iter().map(|f| f.len() as u64).sum::<u64>()
        );
        let mut dones = Vec::new();
        let mut pfns = Vec::new();
        for f in &frames {
            assert!(f.len() <= enc.cfg.max_frame_len);
            let Message::SyncPages {
                bytes_done, pages, ..
            } = Message::decode(f).unwrap().0
            else {
                panic!("not SyncPages");
            };
            dones.push(bytes_done / page);
            pfns.extend(pages.iter().map(|e| e.pfn));
        }
        assert_eq!(dones, [7 + 373, 7 + 746, 807]);
        assert_eq!(pfns, many);

        // Round 1: 25 pages the primary found zero without reading them, among them pages
        // the backup holds data for: they must be zeroed.
        let zeros: Vec<u64> = (40..65).collect();
        let total = (zeros.len() * PAGE_SIZE) as u64;
        let mut frames = Vec::new();
        enc.zero_sync_frames(&zeros, 0, total, |batch| {
            frames.extend(batch.iter().cloned());
            Ok(())
        })
        .unwrap();
        assert!(cache.is_empty(), "zero pages must not leave stale bases");
        let mut dones = Vec::new();
        for f in &frames {
            let (m, _) = Message::decode(f).unwrap();
            let Message::SyncPages {
                bytes_done,
                bytes_total,
                pages,
            } = &m
            else {
                panic!("{m:?}");
            };
            assert_eq!(*bytes_total, total);
            assert!(pages
                .iter()
                .all(|e| e.encoding == Encoding::Zero && e.payload.is_empty()));
            dones.push(*bytes_done);
            staging.handle(&mem, m).unwrap();
        }
        assert_eq!(dones, [total]);
        let mut backup = vec![0u8; PAGES * PAGE_SIZE];
        mem.read_slice(&mut backup, GuestAddress(0)).unwrap();
        let mut expected = ram.clone();
        expected[40 * PAGE_SIZE..65 * PAGE_SIZE].fill(0);
        assert!(backup == expected);
        // A zero page outside guest memory is refused, not skipped.
        let mut frames = Vec::new();
        enc.zero_sync_frames(&[PAGES as u64], 0, page, |batch| {
            frames.extend(batch.iter().cloned());
            Ok(())
        })
        .unwrap();
        let err = staging
            .handle(&mem, Message::decode(&frames[0]).unwrap().0)
            .unwrap_err();
        assert!(err.to_string().contains("outside guest memory"), "{err}");
    }

    #[test]
    fn encoder_and_staging_keep_the_backup_equal_to_the_primary() {
        let mut primary = ram();
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), PAGES * PAGE_SIZE)]).unwrap();
        let mut staging = Staging::new(&mem, 1 << 16);
        let cache = Arc::new(DeltaCache::new(32, 4)); // smaller than RAM: evictions
        let enc = EpochEncoder::new(EncoderConfig::default(), Some(cache.clone()));
        let all: Vec<u64> = (0..PAGES as u64).collect();
        let (_, sync) = collect(
            &enc,
            FrameKind::Sync {
                bytes_done: 0,
                bytes_total: 1,
            },
            &all,
            &primary,
        );
        for m in sync {
            staging.handle(&mem, m).unwrap();
        }
        let mut deltas = 0;
        for epoch in 1..=6u64 {
            // Dirty a hot set plus a varying set of pages with small edits.
            let pfns: Vec<u64> = (0..PAGES as u64)
                .filter(|p| *p < 16 || (p * 7 + epoch) % 5 == 0)
                .collect();
            for &p in &pfns {
                let at = p as usize * PAGE_SIZE + (epoch as usize * 131) % PAGE_SIZE;
                primary[at] = primary[at].wrapping_add(epoch as u8 + 1);
            }
            let data: Vec<u8> = pfns
                .iter()
                .flat_map(|&p| primary[p as usize * PAGE_SIZE..][..PAGE_SIZE].to_vec())
                .collect();
            let state = format!("state of epoch {epoch}").into_bytes();
            let (summary, frames) = collect(&enc, FrameKind::Epoch(epoch), &pfns, &data);
            deltas += summary.count(Encoding::XorRle) + summary.count(Encoding::XorLz4);
            let mut msgs = vec![Message::EpochBegin {
                epoch,
                page_count: pfns.len() as u64,
                state_len: state.len() as u64,
            }];
            msgs.extend(frames);
            msgs.push(Message::State {
                epoch,
                bytes: Bytes::from(state.clone()),
            });
            msgs.push(Message::EpochCommit {
                epoch,
                page_count: summary.pages,
                frame_count: summary.frames,
                disk_frames: 0,
                state_len: state.len() as u64,
                digest: summary.digest.finish(&state).0,
            });
            let mut last = Step::Continue;
            for m in msgs {
                last = staging.handle(&mem, m).unwrap();
            }
            assert_eq!(last, Step::Committed { epoch });
            assert_eq!(
                staging.digest(&mem).unwrap(),
                digest_regions([(0, &primary[..])], &state),
                "backup differs from primary after epoch {epoch}"
            );
        }
        assert!(deltas > 0, "later epochs are sent as deltas");
        let mut backup = vec![0u8; PAGES * PAGE_SIZE];
        mem.read_slice(&mut backup, GuestAddress(0)).unwrap();
        assert!(backup == primary);
    }

    #[test]
    fn sink_failure_stops_the_workers_and_clears_the_cache() {
        let ram = ram();
        let pfns: Vec<u64> = (0..PAGES as u64).collect();
        let cache = Arc::new(DeltaCache::new(256, 2));
        let cfg = EncoderConfig {
            workers: 2,
            max_frame_len: 8 << 10,
            queue_depth: 1,
        };
        let enc = EpochEncoder::new(cfg, Some(cache.clone()));
        let staged = StagedPages::new(&pfns, &ram).unwrap();
        let mut calls = 0;
        let r = enc.encode(FrameKind::Epoch(1), &staged, |_| {
            calls += 1;
            if calls == 2 {
                Err(TransportError::Closed)
            } else {
                Ok(())
            }
        });
        assert!(matches!(
            r,
            Err(EncodeError::Transport(TransportError::Closed))
        ));
        assert_eq!(calls, 2);
        assert!(cache.is_empty());
        assert!(matches!(
            StagedPages::new(&pfns, &ram[1..]),
            Err(EncodeError::BadStaging { .. })
        ));
    }

    #[test]
    fn empty_epoch_produces_no_frames() {
        let enc = EpochEncoder::new(EncoderConfig::default(), None);
        let (summary, msgs) = collect(&enc, FrameKind::Epoch(1), &[], &[]);
        assert_eq!((summary.pages, summary.frames, msgs.len()), (0, 0, 0));
    }
}
