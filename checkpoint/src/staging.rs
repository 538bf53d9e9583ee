//! Backup side: receive an epoch into a staging area, verify it whole, apply it in one step.
//!
//! Guest memory on the backup only ever holds a committed epoch (DESIGN.md invariant 1).
//! An epoch's pages are decoded into a staging buffer as its frames arrive; XOR deltas
//! decode against the backup's committed page, read from guest memory (which the epoch has
//! not touched yet). When `EpochCommit` arrives, [`Staging`] checks that
//!
//! - the epoch is the last committed one plus one (no duplicate, no gap),
//! - every frame belonged to it and the number of `Pages` frames matches,
//! - the number of pages matches `EpochBegin` and `EpochCommit`, no page came twice, and
//!   every page lies inside guest memory,
//! - the state blob arrived and has the announced length,
//! - the digest of the decoded pages and the state equals the primary's,
//!
//! and only then copies the staged pages into guest memory and makes the state blob the
//! committed state. The caller then sends `Ack`. Any failure discards the open epoch and
//! leaves memory and state exactly at the last committed epoch; the error says why (the
//! caller sends `Nack` with it). Nothing is written to guest memory before the commit
//! check, so a truncated stream (primary death mid-epoch) changes nothing either.
//!
//! Before the first commit, `SyncPages` (pre-copy) are written straight into guest memory:
//! there is no committed epoch yet to protect, and epoch 1 makes the image consistent.
//!
//! The guest's network output of an epoch (`Output` frames, between `EpochBegin` and
//! `EpochCommit`) is staged with it, counted in its digest, and kept once the epoch
//! commits: [`Staging::committed_output`] is every frame of the committed epochs whose
//! output the primary may not have let out yet (those after the last epoch an `Output`
//! frame said was released). A promoted backup sends them before its guest runs.
//!
//! Memory bound (invariant 4): a page may appear once per epoch, so staging holds at most
//! as many pages as guest RAM has; the state blob is bounded by `max_state_len`; an
//! epoch's output by [`MAX_EPOCH_OUTPUT`], the output kept by [`MAX_KEPT_OUTPUT`] (the
//! oldest epochs' output goes first: the primary most likely let it out long ago).
//!
//! Zero pages cost nothing on a backup whose guest memory starts out as fresh anonymous
//! memory ([`Staging::with_zeroed_memory`]): staging keeps one bit per page that says
//! whether the page may hold anything but zeros, and a zero page for a page known to be
//! zero is not written at all (writing it would make the kernel allocate and clear a page
//! only for us to clear it again). A mostly-empty guest's pre-copy then costs the backup
//! little more than receiving it.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;
use thiserror::Error;
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::codec::{as_page_mut, decode_page, CodecError, Encoding};
use crate::digest::{digest_guest_memory, Digest, DigestError, DigestValue};
use crate::disk::{DiskSink, StagedWrite};
use crate::protocol::{Message, MessageKind, PageBatch};
use crate::PAGE_SIZE;

/// Why an epoch (or a message) was rejected. The backup stays on its committed epoch.
#[derive(Debug, Error)]
pub enum StagingError {
    /// `EpochBegin` for an epoch that is not the next one.
    #[error("epoch {got} rejected: expected epoch {expected} (last committed {committed})")]
    OutOfOrder {
        /// Epoch received.
        got: u64,
        /// Epoch expected.
        expected: u64,
        /// Last committed epoch.
        committed: u64,
    },
    /// `EpochBegin` while another epoch was still open.
    #[error("epoch {got} began while epoch {open} was still open (its EpochCommit never came); epoch {open} discarded")]
    StillOpen {
        /// Epoch received.
        got: u64,
        /// Epoch that was open.
        open: u64,
    },
    /// A frame of an epoch that is not open.
    #[error("{kind:?} frame for epoch {got}, but {open}")]
    NotOpen {
        /// Kind of the frame.
        kind: MessageKind,
        /// Epoch of the frame.
        got: u64,
        /// What is open, in words.
        open: String,
    },
    /// An announced size exceeds the limits.
    #[error("epoch {epoch} rejected: {what} is {got}, more than the limit {max}")]
    TooLarge {
        /// The epoch.
        epoch: u64,
        /// What is too large.
        what: &'static str,
        /// Announced size.
        got: u64,
        /// Limit.
        max: u64,
    },
    /// A page lies outside guest memory.
    #[error("epoch {epoch} rejected: page {pfn:#x} lies outside guest memory")]
    OutOfRange {
        /// The epoch.
        epoch: u64,
        /// The page frame number.
        pfn: u64,
    },
    /// A page came twice in one epoch.
    #[error("epoch {epoch} rejected: page {pfn:#x} sent twice")]
    DuplicatePage {
        /// The epoch.
        epoch: u64,
        /// The page frame number.
        pfn: u64,
    },
    /// A page failed to decode.
    #[error("epoch {epoch} rejected: page {pfn:#x}: {source}")]
    Decode {
        /// The epoch.
        epoch: u64,
        /// The page frame number.
        pfn: u64,
        /// The codec's complaint.
        source: CodecError,
    },
    /// `Output` that says the epoch's own output was let out already.
    #[error(
        "epoch {epoch} rejected: its Output says epoch {released}'s output was already let out"
    )]
    OutputReleased {
        /// The epoch.
        epoch: u64,
        /// The released epoch it named.
        released: u64,
    },
    /// The state blob came twice.
    #[error("epoch {epoch} rejected: state sent twice")]
    DuplicateState {
        /// The epoch.
        epoch: u64,
    },
    /// The commit does not match what arrived.
    #[error(
        "epoch {epoch} rejected at commit: {what}: announced {announced}, received {received}"
    )]
    Mismatch {
        /// The epoch.
        epoch: u64,
        /// What differs.
        what: &'static str,
        /// What `EpochBegin` / `EpochCommit` announced.
        announced: String,
        /// What arrived.
        received: String,
    },
    /// The digest of the decoded epoch differs from the primary's.
    #[error(
        "epoch {epoch} rejected at commit: digest mismatch: primary {expected}, decoded {got}"
    )]
    Digest {
        /// The epoch.
        epoch: u64,
        /// Digest from `EpochCommit`.
        expected: DigestValue,
        /// Digest of what was decoded.
        got: DigestValue,
    },
    /// `SyncPages` after the first commit, or while an epoch is open.
    #[error("pre-copy pages refused: {0}")]
    SyncRefused(String),
    /// A message that has no place in the replication stream.
    #[error("unexpected {0:?} message during replication")]
    Unexpected(MessageKind),
    /// `End` that does not match the committed epoch.
    #[error("End at epoch {got} but the last committed epoch is {committed}")]
    EndMismatch {
        /// Epoch in `End`.
        got: u64,
        /// Last committed epoch.
        committed: u64,
    },
    /// Guest memory could not be read or written (a pre-validated access failed).
    #[error("guest memory access at gpa {gpa:#x} failed while {during}: {source}")]
    Memory {
        /// Address.
        gpa: u64,
        /// What was being done.
        during: &'static str,
        /// The error.
        source: vm_memory::GuestMemoryError,
    },
    /// Digesting guest memory failed.
    #[error(transparent)]
    DigestRead(#[from] DigestError),
    /// A disk frame does not fit this backup's disks.
    #[error("epoch {epoch} rejected: {reason}")]
    DiskRange {
        /// The epoch (0: the initial sync).
        epoch: u64,
        /// What does not fit.
        reason: String,
    },
    /// The backup's disks could not take a verified epoch or sync data: replication cannot
    /// go on (the message says which epoch the images hold).
    #[error("the backup's disk failed: {0}")]
    Disk(String),
}

impl StagingError {
    /// Whether the backup cannot go on replicating after this error (its disks failed);
    /// other errors reject one epoch and replication goes on.
    pub fn is_fatal(&self) -> bool {
        matches!(self, StagingError::Disk(_))
    }
}

/// What the caller should do after [`Staging::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing yet (the epoch is still arriving).
    Continue,
    /// Disk initial-sync progress of disk `disk`.
    DiskSync {
        /// The disk.
        disk: u32,
        /// Bytes of the disk's sync sent so far.
        bytes_done: u64,
        /// Bytes the disk's sync sends.
        bytes_total: u64,
    },
    /// Pre-copy progress.
    Sync {
        /// Guest bytes sent so far.
        bytes_done: u64,
        /// Guest bytes in the round.
        bytes_total: u64,
    },
    /// `epoch` is committed: send `Ack {epoch}`.
    Committed {
        /// The epoch.
        epoch: u64,
    },
    /// The primary is alive; its last epoch.
    Heartbeat {
        /// The epoch.
        epoch: u64,
    },
    /// Replication ended cleanly at `epoch`; compare the digests.
    End {
        /// The final epoch.
        epoch: u64,
        /// The primary's digest of RAM and state.
        primary: DigestValue,
        /// Ours.
        local: DigestValue,
    },
}

#[derive(Debug)]
struct OpenEpoch {
    epoch: u64,
    page_count: u64,
    state_len: u64,
    frames: u32,
    disk_frames: u32,
    disk_bytes: u64,
    state: Option<Bytes>,
    digest: Digest,
    /// The guest's network frames of the epoch, in order, and their bytes.
    output: Vec<Bytes>,
    output_bytes: usize,
    /// The newest released epoch its `Output` frames named.
    released: u64,
}

/// Most bytes of network output one epoch may carry (the primary's egress buffer holds at
/// most 16 MiB in all).
pub const MAX_EPOCH_OUTPUT: usize = 32 << 20;
/// Most bytes of committed epochs' output kept for a promotion.
pub const MAX_KEPT_OUTPUT: usize = 64 << 20;

/// The backup's staging area and committed-epoch bookkeeping.
#[derive(Debug)]
pub struct Staging {
    committed_epoch: u64,
    committed_state: Bytes,
    open: Option<OpenEpoch>,
    /// Decoded pages of the open epoch, `PAGE_SIZE` bytes each, reused across epochs.
    data: Vec<u8>,
    pfns: Vec<u64>,
    seen: HashSet<u64>,
    /// Per staged page of the open epoch: whether it arrived as a zero page.
    zero: Vec<bool>,
    max_pages: u64,
    max_state_len: usize,
    /// One bit per page frame: set when the page may hold non-zero bytes. `None`: nothing
    /// is known about guest memory, every page is written.
    maybe_nonzero: Option<Vec<u64>>,
    /// Zero pages not written because the page was known to be zero already.
    skipped_zero: u64,
    /// The sizes of the guest's disks, in bytes, and where their data goes.
    disk_sizes: Vec<u64>,
    disks: Option<Box<dyn DiskSink>>,
    /// The open epoch's disk writes, in the order sent.
    writes: Vec<StagedWrite>,
    /// Output of committed epochs the primary may still hold, oldest first: (epoch, frames).
    kept_output: VecDeque<(u64, Vec<Bytes>)>,
    kept_output_bytes: usize,
    /// The newest epoch whose output the primary said it had let out.
    released: u64,
}

impl std::fmt::Debug for dyn DiskSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskSink")
    }
}

/// Bytes of disk writes one epoch may carry (the primary's guest cannot write more in an
/// epoch at any realistic rate; the bound keeps staging's memory bounded).
pub const MAX_EPOCH_DISK_BYTES: u64 = 256 << 20;

impl Staging {
    /// Staging for guest memory `mem` (which bounds the pages per epoch) and state blobs of
    /// at most `max_state_len` bytes. Nothing is committed yet (epoch 0).
    pub fn new<M: GuestMemoryBackend>(mem: &M, max_state_len: usize) -> Self {
        let max_pages = mem.iter().map(|r| r.len() / PAGE_SIZE as u64).sum();
        Self {
            committed_epoch: 0,
            committed_state: Bytes::new(),
            open: None,
            data: Vec::new(),
            pfns: Vec::new(),
            seen: HashSet::new(),
            zero: Vec::new(),
            max_pages,
            max_state_len,
            maybe_nonzero: None,
            skipped_zero: 0,
            disk_sizes: Vec::new(),
            disks: None,
            writes: Vec::new(),
            kept_output: VecDeque::new(),
            kept_output_bytes: 0,
            released: 0,
        }
    }

    /// The guest's disks: their sizes in bytes (as in `Hello`) and the sink that keeps
    /// the backup's images.
    pub fn with_disks(mut self, sizes: Vec<u64>, sink: Box<dyn DiskSink>) -> Self {
        self.disk_sizes = sizes;
        self.disks = Some(sink);
        self
    }

    /// Checks that `len` bytes at `offset` lie inside disk `disk`.
    fn disk_range(
        &self,
        epoch: u64,
        disk: u32,
        offset: u64,
        len: usize,
    ) -> Result<(), StagingError> {
        let Some(&size) = self.disk_sizes.get(disk as usize) else {
            return Err(StagingError::DiskRange {
                epoch,
                reason: format!(
                    "data for disk {disk}, but the guest has {} disks",
                    self.disk_sizes.len()
                ),
            });
        };
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(StagingError::DiskRange {
                epoch,
                reason: format!(
                    "{len} bytes at offset {offset} lie outside disk {disk} ({size} bytes)"
                ),
            });
        }
        Ok(())
    }

    /// Declares that guest memory is all zeros now (fresh anonymous memory): zero pages
    /// are then written only where a page may hold something else.
    pub fn with_zeroed_memory<M: GuestMemoryBackend>(mut self, mem: &M) -> Self {
        let end = mem.iter().map(|r| r.last_addr().0 + 1).max().unwrap_or(0);
        let pages = end.div_ceil(PAGE_SIZE as u64);
        self.maybe_nonzero = Some(vec![0; pages.div_ceil(64) as usize]);
        self
    }

    /// Zero pages that were not written because the page already was zero.
    pub fn skipped_zero_pages(&self) -> u64 {
        self.skipped_zero
    }

    /// Whether page `pfn` is known to hold only zeros.
    fn known_zero(&self, pfn: u64) -> bool {
        known_zero(self.maybe_nonzero.as_deref(), pfn)
    }

    /// Writes `page` to page `pfn` (at `gpa`), unless it is zero and the page already is;
    /// keeps the known-zero bits.
    fn write_page<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        pfn: u64,
        gpa: u64,
        page: &[u8],
        is_zero: bool,
        during: &'static str,
    ) -> Result<(), StagingError> {
        if is_zero && self.known_zero(pfn) {
            self.skipped_zero += 1;
            return Ok(());
        }
        mem.write_slice(page, GuestAddress(gpa))
            .map_err(|source| StagingError::Memory {
                gpa,
                during,
                source,
            })?;
        if let Some(w) = self
            .maybe_nonzero
            .as_mut()
            .and_then(|bits| bits.get_mut((pfn / 64) as usize))
        {
            let bit = 1 << (pfn % 64);
            if is_zero {
                *w &= !bit;
            } else {
                *w |= bit;
            }
        }
        Ok(())
    }

    /// The committed content of page `pfn` (the base of a delta): zeros without a read
    /// when the page is known to be zero.
    fn base_page<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        pfn: u64,
        gpa: u64,
        page: &mut [u8; PAGE_SIZE],
    ) -> Result<(), StagingError> {
        if self.known_zero(pfn) {
            page.fill(0);
            Ok(())
        } else {
            read_page(mem, gpa, page)
        }
    }

    /// The last committed epoch (0: none yet).
    pub fn committed_epoch(&self) -> u64 {
        self.committed_epoch
    }

    /// The state blob of the last committed epoch.
    pub fn committed_state(&self) -> &Bytes {
        &self.committed_state
    }

    /// The network frames of the committed epochs after the newest epoch whose output the
    /// primary said it had let out, oldest first, in the order the guest sent them: what
    /// the primary may have held back when it died.
    pub fn committed_output(&self) -> impl Iterator<Item = &Bytes> + '_ {
        self.kept_output.iter().flat_map(|(_, f)| f.iter())
    }

    /// The committed epochs whose output [`committed_output`](Self::committed_output)
    /// holds, oldest first.
    pub fn committed_output_epochs(&self) -> Vec<u64> {
        self.kept_output.iter().map(|(e, _)| *e).collect()
    }

    /// The epoch being received, if any.
    pub fn open_epoch(&self) -> Option<u64> {
        self.open.as_ref().map(|o| o.epoch)
    }

    /// Discards the open epoch, if any (e.g. the connection dropped mid-epoch).
    pub fn abort(&mut self) {
        self.open = None;
        self.writes.clear();
        self.data.clear();
        self.pfns.clear();
        self.seen.clear();
        self.zero.clear();
    }

    /// Runs `f`; on error, discards the open epoch before returning the error.
    fn or_abort<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, StagingError>,
    ) -> Result<T, StagingError> {
        let r = f(self);
        if r.is_err() {
            self.abort();
        }
        r
    }

    /// Handles one message of the replication stream.
    pub fn handle<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        msg: Message,
    ) -> Result<Step, StagingError> {
        match msg {
            Message::SyncPages {
                bytes_done,
                bytes_total,
                pages,
            } => {
                self.sync_pages(mem, &pages)?;
                Ok(Step::Sync {
                    bytes_done,
                    bytes_total,
                })
            }
            Message::EpochBegin {
                epoch,
                page_count,
                state_len,
            } => self
                .begin(epoch, page_count, state_len)
                .map(|()| Step::Continue),
            Message::Pages { epoch, pages } => {
                self.pages(mem, epoch, &pages).map(|()| Step::Continue)
            }
            Message::State { epoch, bytes } => self.state(epoch, bytes).map(|()| Step::Continue),
            Message::DiskWrites {
                epoch,
                disk,
                writes,
            } => self
                .disk_writes(epoch, disk, writes)
                .map(|()| Step::Continue),
            Message::DiskSync {
                disk,
                offset,
                bytes_done,
                bytes_total,
                data,
            } => {
                self.disk_sync(disk, offset, &data)?;
                Ok(Step::DiskSync {
                    disk,
                    bytes_done,
                    bytes_total,
                })
            }
            Message::Output {
                epoch,
                released,
                frames,
            } => self
                .output(epoch, released, &frames)
                .map(|()| Step::Continue),
            Message::EpochCommit {
                epoch,
                page_count,
                frame_count,
                disk_frames,
                state_len,
                digest,
            } => self
                .commit(
                    mem,
                    epoch,
                    Counts {
                        pages: page_count,
                        frames: frame_count,
                        disk_frames,
                        state_len,
                    },
                    digest,
                )
                .map(|epoch| Step::Committed { epoch }),
            Message::Heartbeat { epoch } => Ok(Step::Heartbeat { epoch }),
            Message::End { epoch, digest } => {
                if epoch != self.committed_epoch || self.open.is_some() {
                    self.abort();
                    return Err(StagingError::EndMismatch {
                        got: epoch,
                        committed: self.committed_epoch,
                    });
                }
                Ok(Step::End {
                    epoch,
                    primary: DigestValue(digest),
                    local: self.digest(mem)?,
                })
            }
            other => Err(StagingError::Unexpected(other.kind())),
        }
    }

    /// Digest of guest memory plus the committed state (what `final ... digest=` prints).
    pub fn digest<M: GuestMemoryBackend>(&self, mem: &M) -> Result<DigestValue, StagingError> {
        Ok(digest_guest_memory(mem, &self.committed_state)?)
    }

    /// Writes pre-copy pages straight into guest memory (only before the first commit).
    pub fn sync_pages<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        pages: &PageBatch,
    ) -> Result<(), StagingError> {
        if self.committed_epoch != 0 {
            return Err(StagingError::SyncRefused(format!(
                "epoch {} is already committed",
                self.committed_epoch
            )));
        }
        if let Some(o) = &self.open {
            return Err(StagingError::SyncRefused(format!(
                "epoch {} is open",
                o.epoch
            )));
        }
        let mut page = [0u8; PAGE_SIZE];
        // A mostly untouched guest sends mostly zero pages for pages known to be zero:
        // each costs this range check and a bit test, so the check avoids vm-memory's
        // region lookup for pages that lie inside one region.
        let runs = page_runs(mem);
        for e in pages.iter() {
            let gpa = if runs.iter().any(|&(a, b)| (a..b).contains(&e.pfn)) {
                e.pfn * PAGE_SIZE as u64
            } else {
                page_gpa(mem, e.pfn).ok_or(StagingError::OutOfRange {
                    epoch: 0,
                    pfn: e.pfn,
                })?
            };
            let is_zero = e.encoding == Encoding::Zero;
            if is_zero && self.known_zero(e.pfn) {
                self.skipped_zero += 1;
                continue;
            }
            if e.encoding.is_delta() {
                self.base_page(mem, e.pfn, gpa, &mut page)?;
            }
            decode_page(e.encoding, e.payload, &mut page).map_err(|source| {
                StagingError::Decode {
                    epoch: 0,
                    pfn: e.pfn,
                    source,
                }
            })?;
            self.write_page(mem, e.pfn, gpa, &page, is_zero, "writing a pre-copy page")?;
        }
        Ok(())
    }

    /// Writes initial-sync bytes straight into the backup's image of `disk` (only before
    /// the first commit, like pre-copy pages).
    pub fn disk_sync(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<(), StagingError> {
        if self.committed_epoch != 0 || self.open.is_some() {
            return Err(StagingError::SyncRefused(format!(
                "disk sync data after epoch {} began",
                self.committed_epoch + 1
            )));
        }
        self.disk_range(0, disk, offset, data.len())?;
        match self.disks.as_mut() {
            Some(sink) => sink.sync(disk, offset, data).map_err(StagingError::Disk),
            None => Err(StagingError::Unexpected(MessageKind::DiskSync)),
        }
    }

    /// Stages a batch of the open epoch's disk writes.
    pub fn disk_writes(
        &mut self,
        epoch: u64,
        disk: u32,
        writes: Vec<(u64, Bytes)>,
    ) -> Result<(), StagingError> {
        self.or_abort(|s| {
            s.check_open(MessageKind::DiskWrites, epoch)?;
            for (offset, data) in &writes {
                s.disk_range(epoch, disk, *offset, data.len())?;
            }
            let Some(open) = s.open.as_mut() else {
                return Ok(());
            };
            open.disk_frames += 1;
            for (offset, data) in writes {
                open.disk_bytes += data.len() as u64;
                if open.disk_bytes > MAX_EPOCH_DISK_BYTES {
                    return Err(StagingError::TooLarge {
                        epoch,
                        what: "disk writes (bytes)",
                        got: open.disk_bytes,
                        max: MAX_EPOCH_DISK_BYTES,
                    });
                }
                open.digest
                    .add_disk_write(disk, s.writes.len() as u64, offset, &data);
                s.writes.push(StagedWrite { disk, offset, data });
            }
            Ok(())
        })
    }

    /// Opens `epoch`, which must be the next one.
    pub fn begin(
        &mut self,
        epoch: u64,
        page_count: u64,
        state_len: u64,
    ) -> Result<(), StagingError> {
        self.or_abort(|s| {
            if let Some(o) = &s.open {
                return Err(StagingError::StillOpen {
                    got: epoch,
                    open: o.epoch,
                });
            }
            let expected = s.committed_epoch + 1;
            if epoch != expected {
                return Err(StagingError::OutOfOrder {
                    got: epoch,
                    expected,
                    committed: s.committed_epoch,
                });
            }
            let too_large = |what, got, max| StagingError::TooLarge {
                epoch,
                what,
                got,
                max,
            };
            if page_count > s.max_pages {
                return Err(too_large("page count", page_count, s.max_pages));
            }
            if state_len > s.max_state_len as u64 {
                return Err(too_large("state length", state_len, s.max_state_len as u64));
            }
            s.open = Some(OpenEpoch {
                epoch,
                page_count,
                state_len,
                frames: 0,
                disk_frames: 0,
                disk_bytes: 0,
                state: None,
                digest: Digest::new(),
                output: Vec::new(),
                output_bytes: 0,
                released: 0,
            });
            Ok(())
        })
    }

    fn check_open(&self, kind: MessageKind, epoch: u64) -> Result<(), StagingError> {
        match &self.open {
            Some(o) if o.epoch == epoch => Ok(()),
            other => Err(StagingError::NotOpen {
                kind,
                got: epoch,
                open: match other {
                    Some(o) => format!("epoch {} is open", o.epoch),
                    None => format!("no epoch is open (last committed {})", self.committed_epoch),
                },
            }),
        }
    }

    /// Decodes a batch of the open epoch's pages into staging.
    pub fn pages<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        epoch: u64,
        pages: &PageBatch,
    ) -> Result<(), StagingError> {
        self.or_abort(|s| {
            s.check_open(MessageKind::Pages, epoch)?;
            let Some(open) = s.open.as_mut() else {
                return Ok(());
            };
            open.frames += 1;
            let staged = s.pfns.len() as u64 + u64::from(pages.len());
            if staged > open.page_count {
                return Err(StagingError::Mismatch {
                    epoch,
                    what: "page count",
                    announced: open.page_count.to_string(),
                    received: format!("at least {staged}"),
                });
            }
            for e in pages.iter() {
                let pfn = e.pfn;
                let gpa = page_gpa(mem, pfn).ok_or(StagingError::OutOfRange { epoch, pfn })?;
                if !s.seen.insert(pfn) {
                    return Err(StagingError::DuplicatePage { epoch, pfn });
                }
                let at = s.data.len();
                s.data.resize(at + PAGE_SIZE, 0);
                let Some(slot) = as_page_mut(&mut s.data[at..]) else {
                    return Ok(());
                };
                if e.encoding.is_delta() {
                    if known_zero(s.maybe_nonzero.as_deref(), pfn) {
                        slot.fill(0);
                    } else {
                        read_page(mem, gpa, slot)?;
                    }
                }
                decode_page(e.encoding, e.payload, slot)
                    .map_err(|source| StagingError::Decode { epoch, pfn, source })?;
                open.digest.add_page(gpa, slot);
                s.pfns.push(pfn);
                s.zero.push(e.encoding == Encoding::Zero);
            }
            Ok(())
        })
    }

    /// Stages some of the open epoch's network output (frames copied out of the message:
    /// they may be kept long after the receive buffer is reused).
    pub fn output(
        &mut self,
        epoch: u64,
        released: u64,
        frames: &[Bytes],
    ) -> Result<(), StagingError> {
        self.or_abort(|s| {
            s.check_open(MessageKind::Output, epoch)?;
            let Some(open) = s.open.as_mut() else {
                return Ok(());
            };
            if released >= epoch {
                return Err(StagingError::OutputReleased { epoch, released });
            }
            let bytes = open.output_bytes + frames.iter().map(Bytes::len).sum::<usize>();
            if bytes > MAX_EPOCH_OUTPUT {
                return Err(StagingError::TooLarge {
                    epoch,
                    what: "network output",
                    got: bytes as u64,
                    max: MAX_EPOCH_OUTPUT as u64,
                });
            }
            for f in frames {
                open.digest.add_output(open.output.len() as u64, f);
                open.output.push(Bytes::copy_from_slice(f));
            }
            open.output_bytes = bytes;
            open.released = open.released.max(released);
            Ok(())
        })
    }

    /// Keeps a newly committed epoch's output; forgets what the primary let out.
    fn keep_output(&mut self, epoch: u64, released: u64, output: Vec<Bytes>, bytes: usize) {
        self.released = self.released.max(released);
        while self
            .kept_output
            .front()
            .is_some_and(|(e, _)| *e <= self.released)
        {
            self.drop_oldest_output();
        }
        if output.is_empty() {
            return;
        }
        self.kept_output.push_back((epoch, output));
        self.kept_output_bytes += bytes;
        while self.kept_output_bytes > MAX_KEPT_OUTPUT {
            self.drop_oldest_output();
        }
    }

    fn drop_oldest_output(&mut self) {
        if let Some((_, f)) = self.kept_output.pop_front() {
            self.kept_output_bytes -= f.iter().map(Bytes::len).sum::<usize>();
        }
    }

    /// Stages the open epoch's state blob.
    pub fn state(&mut self, epoch: u64, bytes: Bytes) -> Result<(), StagingError> {
        self.or_abort(|s| {
            s.check_open(MessageKind::State, epoch)?;
            let Some(open) = s.open.as_mut() else {
                return Ok(());
            };
            if open.state.is_some() {
                return Err(StagingError::DuplicateState { epoch });
            }
            if bytes.len() as u64 != open.state_len {
                return Err(StagingError::Mismatch {
                    epoch,
                    what: "state length",
                    announced: open.state_len.to_string(),
                    received: bytes.len().to_string(),
                });
            }
            open.state = Some(bytes);
            Ok(())
        })
    }

    /// Verifies the open epoch against its `EpochCommit` and applies it whole; returns the
    /// newly committed epoch.
    pub fn commit<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        epoch: u64,
        counts: Counts,
        digest: u64,
    ) -> Result<u64, StagingError> {
        let Counts {
            pages: page_count,
            frames: frame_count,
            disk_frames,
            state_len,
        } = counts;
        self.or_abort(|s| {
            s.check_open(MessageKind::EpochCommit, epoch)?;
            let Some(open) = s.open.take() else {
                return Ok(s.committed_epoch);
            };
            let mismatch = |what, announced: String, received: String| StagingError::Mismatch {
                epoch,
                what,
                announced,
                received,
            };
            let staged = s.pfns.len() as u64;
            if page_count != open.page_count || staged != page_count {
                return Err(mismatch(
                    "page count",
                    format!("{} at begin, {page_count} at commit", open.page_count),
                    staged.to_string(),
                ));
            }
            if frame_count != open.frames {
                return Err(mismatch(
                    "Pages frame count",
                    frame_count.to_string(),
                    open.frames.to_string(),
                ));
            }
            if disk_frames != open.disk_frames {
                return Err(mismatch(
                    "DiskWrites frame count",
                    disk_frames.to_string(),
                    open.disk_frames.to_string(),
                ));
            }
            let Some(state) = open.state else {
                return Err(mismatch(
                    "state",
                    format!("{state_len} bytes"),
                    "no State frame".into(),
                ));
            };
            if state_len != open.state_len {
                return Err(mismatch(
                    "state length",
                    format!("{} at begin, {state_len} at commit", open.state_len),
                    state.len().to_string(),
                ));
            }
            let got = open.digest.finish(&state);
            if got.0 != digest {
                return Err(StagingError::Digest {
                    epoch,
                    expected: DigestValue(digest),
                    got,
                });
            }
            // Verified: the disks first (their journal makes them all-or-nothing), then
            // memory in one step. Every address was checked when staged.
            // Every epoch goes to the sink, with writes or without (the first one ends
            // the disks' initial sync).
            let writes = std::mem::take(&mut s.writes);
            match s.disks.as_mut() {
                Some(sink) => sink.commit(epoch, &writes).map_err(StagingError::Disk)?,
                None if !writes.is_empty() => {
                    return Err(StagingError::Unexpected(MessageKind::DiskWrites))
                }
                None => {}
            }
            let (pfns, data, zero) = (
                std::mem::take(&mut s.pfns),
                std::mem::take(&mut s.data),
                std::mem::take(&mut s.zero),
            );
            let mut applied = Ok(());
            for ((&pfn, page), &is_zero) in pfns.iter().zip(data.chunks_exact(PAGE_SIZE)).zip(&zero)
            {
                let gpa = pfn * PAGE_SIZE as u64;
                applied = s.write_page(
                    mem,
                    pfn,
                    gpa,
                    page,
                    is_zero,
                    "applying a verified epoch (memory may now be inconsistent)",
                );
                if applied.is_err() {
                    break;
                }
            }
            // Keep the buffers' capacity for the next epoch.
            (s.pfns, s.data, s.zero) = (pfns, data, zero);
            applied?;
            s.committed_epoch = epoch;
            s.committed_state = state;
            s.keep_output(epoch, open.released, open.output, open.output_bytes);
            s.abort();
            Ok(epoch)
        })
    }
}

/// What `EpochCommit` says was sent in its epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Pages.
    pub pages: u64,
    /// `Pages` frames.
    pub frames: u32,
    /// `DiskWrites` frames.
    pub disk_frames: u32,
    /// Length of the state blob.
    pub state_len: u64,
}

/// Whether the known-zero bits (a clear bit: the page holds only zeros) say page `pfn`
/// is zero; with no bits, nothing is known.
fn known_zero(maybe_nonzero: Option<&[u64]>, pfn: u64) -> bool {
    maybe_nonzero.is_some_and(|bits| {
        bits.get((pfn / 64) as usize)
            .is_some_and(|w| w & (1 << (pfn % 64)) == 0)
    })
}

/// The whole pages of each region of guest memory, as page frame numbers `[first, end)`.
fn page_runs<M: GuestMemoryBackend>(mem: &M) -> Vec<(u64, u64)> {
    let page = PAGE_SIZE as u64;
    mem.iter()
        .map(|r| {
            let start = r.start_addr().0;
            (start.div_ceil(page), (start + r.len()) / page)
        })
        .collect()
}

/// The gpa of page `pfn` if the whole page lies inside guest memory.
fn page_gpa<M: GuestMemoryBackend>(mem: &M, pfn: u64) -> Option<u64> {
    let gpa = pfn.checked_mul(PAGE_SIZE as u64)?;
    GuestMemoryBackend::check_range(mem, GuestAddress(gpa), PAGE_SIZE).then_some(gpa)
}

fn read_page<M: GuestMemoryBackend>(
    mem: &M,
    gpa: u64,
    page: &mut [u8; PAGE_SIZE],
) -> Result<(), StagingError> {
    mem.read_slice(page, GuestAddress(gpa))
        .map_err(|source| StagingError::Memory {
            gpa,
            during: "reading the base of a delta",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta_cache::DeltaCache;
    use crate::protocol::PagesFrameBuilder;
    use vm_memory::GuestMemoryMmap;

    const PAGES: u64 = 32;

    type Page = [u8; PAGE_SIZE];

    fn page(seed: u8) -> Page {
        let mut p = [0u8; PAGE_SIZE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = seed.wrapping_mul(31).wrapping_add((i % 97) as u8);
        }
        p
    }

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), PAGES as usize * PAGE_SIZE)]).unwrap()
    }

    fn frames_of(epoch: u64, pages: &[(u64, Page)], cache: &DeltaCache) -> Vec<Message> {
        pages
            .chunks(3)
            .map(|chunk| {
                let mut b = PagesFrameBuilder::pages(epoch, 64 << 10);
                for (pfn, p) in chunk {
                    b.push(*pfn, |out| cache.encode(*pfn, p, out));
                }
                Message::decode(&b.finish()).unwrap().0
            })
            .collect()
    }

    /// The messages of a well-formed epoch, deltas against what `cache` remembers.
    fn epoch(epoch: u64, pages: &[(u64, Page)], state: &[u8], cache: &DeltaCache) -> Vec<Message> {
        let mut d = Digest::new();
        for (pfn, p) in pages {
            d.add_page(pfn * PAGE_SIZE as u64, p);
        }
        let frames = frames_of(epoch, pages, cache);
        let mut msgs = vec![Message::EpochBegin {
            epoch,
            page_count: pages.len() as u64,
            state_len: state.len() as u64,
        }];
        let frame_count = frames.len() as u32;
        msgs.extend(frames);
        msgs.push(Message::State {
            epoch,
            bytes: Bytes::copy_from_slice(state),
        });
        msgs.push(Message::EpochCommit {
            epoch,
            page_count: pages.len() as u64,
            frame_count,
            disk_frames: 0,
            state_len: state.len() as u64,
            digest: d.finish(state).0,
        });
        msgs
    }

    fn feed(
        s: &mut Staging,
        mem: &GuestMemoryMmap<()>,
        msgs: Vec<Message>,
    ) -> Result<Step, StagingError> {
        let mut last = Step::Continue;
        for m in msgs {
            last = s.handle(mem, m)?;
        }
        Ok(last)
    }

    fn read(mem: &GuestMemoryMmap<()>, pfn: u64) -> Page {
        let mut p = [0u8; PAGE_SIZE];
        mem.read_slice(&mut p, GuestAddress(pfn * PAGE_SIZE as u64))
            .unwrap();
        p
    }

    /// Sync + epoch 1 committed; returns the staging, memory and the primary's cache.
    fn committed_once() -> (Staging, GuestMemoryMmap<()>, DeltaCache) {
        let mem = memory();
        let mut s = Staging::new(&mem, 1 << 20);
        let cache = DeltaCache::new(64, 2);
        let mut b = PagesFrameBuilder::sync(1 << 20);
        for pfn in 0..PAGES {
            let p = page(pfn as u8);
            b.push(pfn, |out| cache.encode(pfn, &p, out));
        }
        let sync = Message::decode(&b.finish_sync(1, 2)).unwrap().0;
        assert_eq!(
            s.handle(&mem, sync).unwrap(),
            Step::Sync {
                bytes_done: 1,
                bytes_total: 2
            }
        );
        let mut p3 = page(3);
        p3[7] ^= 0x40;
        let step = feed(
            &mut s,
            &mem,
            epoch(1, &[(3, p3), (4, [0; PAGE_SIZE])], b"state-1", &cache),
        );
        assert_eq!(step.unwrap(), Step::Committed { epoch: 1 });
        assert!(read(&mem, 3) == p3 && read(&mem, 4) == [0; PAGE_SIZE]);
        (s, mem, cache)
    }

    /// Feeds `msgs`, expects a rejection containing `why`, and proves memory and state are
    /// still epoch 1's.
    fn rejected(msgs: Vec<Message>, why: &str, setup: (Staging, GuestMemoryMmap<()>, DeltaCache)) {
        let (mut s, mem, _) = setup;
        let before = s.digest(&mem).unwrap();
        let err = feed(&mut s, &mem, msgs).unwrap_err().to_string();
        assert!(err.contains(why), "error {err:?} does not contain {why:?}");
        assert_eq!(s.committed_epoch(), 1);
        assert_eq!(&s.committed_state()[..], b"state-1");
        assert_eq!(s.open_epoch(), None, "open epoch discarded");
        assert_eq!(s.digest(&mem).unwrap(), before, "memory changed");
    }

    fn good_epoch_2(cache: &DeltaCache) -> Vec<Message> {
        let mut p5 = page(5);
        p5[100..110].fill(9);
        epoch(
            2,
            &[(5, p5), (6, page(66)), (7, page(77)), (8, page(88))],
            b"state-2",
            cache,
        )
    }

    #[test]
    fn epochs_commit_whole_with_deltas_against_committed_pages() {
        let (mut s, mem, cache) = committed_once();
        let msgs = good_epoch_2(&cache);
        assert!(
            msgs.iter().any(|m| matches!(m, Message::Pages { pages, .. }
            if pages.iter().any(|e| e.encoding.is_delta()))),
            "deltas are exercised"
        );
        // Nothing reaches memory before the commit.
        let n = msgs.len();
        let mut msgs = msgs.into_iter();
        for m in msgs.by_ref().take(n - 1) {
            assert_eq!(s.handle(&mem, m).unwrap(), Step::Continue);
        }
        assert!(read(&mem, 6) == page(6));
        assert_eq!(
            s.handle(&mem, msgs.next().unwrap()).unwrap(),
            Step::Committed { epoch: 2 }
        );
        assert!(read(&mem, 6) == page(66) && read(&mem, 8) == page(88));
        assert_eq!(&s.committed_state()[..], b"state-2");

        let local = s.digest(&mem).unwrap();
        let end = s
            .handle(
                &mem,
                Message::End {
                    epoch: 2,
                    digest: local.0,
                },
            )
            .unwrap();
        assert_eq!(
            end,
            Step::End {
                epoch: 2,
                primary: local,
                local
            }
        );
    }

    /// An epoch of one page with `frames` as its output, `released` in its `Output`
    /// frame; `digest_output` false leaves the output out of the primary's digest.
    fn epoch_with_output(
        epoch_no: u64,
        released: u64,
        frames: &[&[u8]],
        digest_output: bool,
        cache: &DeltaCache,
    ) -> Vec<Message> {
        let pages = [(9, page(epoch_no as u8))];
        let state = format!("state-{epoch_no}");
        let mut msgs = epoch(epoch_no, &pages, state.as_bytes(), cache);
        let frames: Vec<Bytes> = frames.iter().map(|f| Bytes::copy_from_slice(f)).collect();
        if let Some(Message::EpochCommit { digest, .. }) = msgs.last_mut() {
            let mut d = Digest::new();
            d.add_page(9 * PAGE_SIZE as u64, &pages[0].1);
            if digest_output {
                for (i, f) in frames.iter().enumerate() {
                    d.add_output(i as u64, f);
                }
            }
            *digest = d.finish(state.as_bytes()).0;
        }
        if !frames.is_empty() {
            let at = msgs.len() - 2;
            msgs.insert(
                at,
                Message::Output {
                    epoch: epoch_no,
                    released,
                    frames,
                },
            );
        }
        msgs
    }

    fn kept(s: &Staging) -> Vec<&[u8]> {
        s.committed_output().map(|f| &f[..]).collect()
    }

    #[test]
    fn committed_output_is_kept_until_the_primary_let_it_out() {
        let (mut s, mem, cache) = committed_once();
        let step = feed(
            &mut s,
            &mem,
            epoch_with_output(2, 1, &[b"a", b"bb"], true, &cache),
        );
        assert_eq!(step.unwrap(), Step::Committed { epoch: 2 });
        assert_eq!(kept(&s), [&b"a"[..], b"bb"]);
        // An epoch without output keeps what is there.
        feed(&mut s, &mem, epoch_with_output(3, 1, &[], true, &cache)).unwrap();
        feed(&mut s, &mem, epoch_with_output(4, 1, &[b"c"], true, &cache)).unwrap();
        assert_eq!(kept(&s), [&b"a"[..], b"bb", b"c"]);
        assert_eq!(s.committed_output_epochs(), [2, 4]);
        // The primary let out epochs up to 3: only epoch 4's and 5's remain.
        feed(&mut s, &mem, epoch_with_output(5, 3, &[b"d"], true, &cache)).unwrap();
        assert_eq!(kept(&s), [&b"c"[..], b"d"]);
        assert_eq!(s.committed_output_epochs(), [4, 5]);
    }

    #[test]
    fn output_counts_in_the_digest_and_is_checked() {
        // The output arrived, but the primary's digest did not cover it: rejected, and
        // nothing of it kept.
        let setup = committed_once();
        let msgs = epoch_with_output(2, 1, &[b"reply"], false, &setup.2);
        rejected(msgs, "digest mismatch", setup);
        // A frame changed on the way.
        let setup = committed_once();
        let mut msgs = epoch_with_output(2, 1, &[b"reply"], true, &setup.2);
        for m in &mut msgs {
            if let Message::Output { frames, .. } = m {
                frames[0] = Bytes::from_static(b"rePly");
            }
        }
        rejected(msgs, "digest mismatch", setup);
        // Output of another epoch, or one that claims to be let out already.
        let setup = committed_once();
        let mut msgs = epoch_with_output(2, 1, &[b"x"], true, &setup.2);
        msgs.insert(
            1,
            Message::Output {
                epoch: 3,
                released: 1,
                frames: vec![Bytes::from_static(b"y")],
            },
        );
        rejected(msgs, "Output frame for epoch 3", setup);
        let setup = committed_once();
        rejected(
            epoch_with_output(2, 2, &[b"x"], true, &setup.2),
            "its Output says epoch 2's output was already let out",
            setup,
        );
        let (mut s, mem, cache) = committed_once();
        let mut msgs = epoch_with_output(2, 1, &[b"x"], true, &cache);
        msgs.truncate(msgs.len() - 1);
        feed(&mut s, &mem, msgs).unwrap();
        s.abort();
        assert_eq!(
            kept(&s),
            Vec::<&[u8]>::new(),
            "an aborted epoch's output is not kept"
        );
    }

    #[test]
    fn zero_pages_of_zeroed_memory_are_not_written_but_every_page_ends_right() {
        let mem = memory();
        let mut s = Staging::new(&mem, 1 << 20).with_zeroed_memory(&mem);
        let cache = DeltaCache::new(64, 2);
        // Pre-copy: even pages zero, odd pages data.
        let mut b = PagesFrameBuilder::sync(1 << 20);
        let mut expected = vec![[0u8; PAGE_SIZE]; PAGES as usize];
        for pfn in 0..PAGES {
            let p = if pfn % 2 == 0 {
                [0; PAGE_SIZE]
            } else {
                page(pfn as u8)
            };
            expected[pfn as usize] = p;
            b.push(pfn, |out| cache.encode(pfn, &p, out));
        }
        let sync = Message::decode(&b.finish_sync(1, 1)).unwrap().0;
        s.handle(&mem, sync).unwrap();
        assert_eq!(s.skipped_zero_pages(), PAGES / 2);
        // Epoch 1: a data page becomes zero (must be written), a zero page stays zero
        // (skipped), a zero page gets data, and a delta against a known-zero page.
        let mut p6 = [0u8; PAGE_SIZE];
        p6[100] = 7;
        cache.remember(8, &[0; PAGE_SIZE]);
        let mut p8 = [0u8; PAGE_SIZE];
        p8[5] = 1;
        let pages = [(1, [0; PAGE_SIZE]), (2, [0; PAGE_SIZE]), (6, p6), (8, p8)];
        let msgs = epoch(1, &pages, b"state-1", &cache);
        assert!(
            msgs.iter().any(|m| matches!(m, Message::Pages { pages, .. }
            if pages.iter().any(|e| e.pfn == 8 && e.encoding.is_delta()))),
            "page 8 goes as a delta"
        );
        assert_eq!(
            feed(&mut s, &mem, msgs).unwrap(),
            Step::Committed { epoch: 1 }
        );
        assert_eq!(s.skipped_zero_pages(), PAGES / 2 + 1, "only page 2 skipped");
        for (pfn, p) in pages {
            expected[pfn as usize] = p;
        }
        for pfn in 0..PAGES {
            assert!(read(&mem, pfn) == expected[pfn as usize], "page {pfn}");
        }
        // Page 1 is known zero again: another zero for it is skipped.
        let msgs = epoch(2, &[(1, [0; PAGE_SIZE])], b"state-2", &cache);
        assert_eq!(
            feed(&mut s, &mem, msgs).unwrap(),
            Step::Committed { epoch: 2 }
        );
        assert_eq!(s.skipped_zero_pages(), PAGES / 2 + 2);
        // Without the declaration, every page is written.
        let (s, _, _) = committed_once();
        assert_eq!(s.skipped_zero_pages(), 0);
    }

    #[test]
    fn missing_pages_frame_is_rejected() {
        let setup = committed_once();
        let mut msgs = good_epoch_2(&setup.2);
        msgs.remove(2); // second Pages frame
        rejected(msgs, "page count", setup);
    }

    #[test]
    fn missing_state_is_rejected() {
        let setup = committed_once();
        let mut msgs = good_epoch_2(&setup.2);
        msgs.retain(|m| !matches!(m, Message::State { .. }));
        rejected(msgs, "no State frame", setup);
    }

    #[test]
    fn wrong_frame_count_is_rejected() {
        let setup = committed_once();
        let mut msgs = good_epoch_2(&setup.2);
        if let Some(Message::EpochCommit { frame_count, .. }) = msgs.last_mut() {
            *frame_count += 1;
        }
        rejected(msgs, "Pages frame count: announced 3, received 2", setup);
    }

    #[test]
    fn digest_mismatch_is_rejected() {
        let setup = committed_once();
        let mut msgs = good_epoch_2(&setup.2);
        if let Some(Message::EpochCommit { digest, .. }) = msgs.last_mut() {
            *digest ^= 1;
        }
        rejected(msgs, "digest mismatch", setup);
    }

    #[test]
    fn delta_against_a_base_the_backup_lacks_is_caught_by_the_digest() {
        let setup = committed_once();
        // The primary's cache believes page 9 holds something it never sent.
        setup.2.remember(9, &page(200));
        let mut p9 = page(200);
        p9[0] ^= 1;
        let msgs = epoch(2, &[(9, p9)], b"s", &setup.2);
        rejected(msgs, "digest mismatch", setup);
    }

    #[test]
    fn duplicate_and_out_of_order_epochs_are_rejected() {
        let setup = committed_once();
        let msgs = epoch(1, &[(1, page(1))], b"x", &setup.2);
        rejected(
            msgs,
            "epoch 1 rejected: expected epoch 2 (last committed 1)",
            setup,
        );
        let setup = committed_once();
        let msgs = epoch(3, &[(1, page(1))], b"x", &setup.2);
        rejected(msgs, "epoch 3 rejected: expected epoch 2", setup);
    }

    #[test]
    fn duplicate_page_out_of_range_page_and_corrupt_page_are_rejected() {
        let setup = committed_once();
        let msgs = epoch(
            2,
            &[(5, page(1)), (6, page(2)), (5, page(3))],
            b"x",
            &setup.2,
        );
        rejected(msgs, "page 0x5 sent twice", setup);

        let setup = committed_once();
        let msgs = epoch(2, &[(PAGES, page(1))], b"x", &setup.2);
        rejected(msgs, "page 0x20 lies outside guest memory", setup);

        let setup = committed_once();
        let mut msgs = good_epoch_2(&setup.2);
        // Re-frame the first batch with a raw page cut short.
        let mut b = PagesFrameBuilder::pages(2, 1 << 16);
        b.push(5, |out| {
            out.extend_from_slice(&[1, 2, 3]);
            crate::codec::Encoding::Raw
        });
        msgs[1] = Message::decode(&b.finish()).unwrap().0;
        rejected(msgs, "page 0x5: Raw page payload has 3 bytes", setup);
    }

    #[test]
    fn frames_of_another_epoch_and_interleaved_epochs_are_rejected() {
        let setup = committed_once();
        let mut msgs = good_epoch_2(&setup.2);
        if let Some(Message::State { epoch, .. }) = msgs.get_mut(3) {
            *epoch = 7;
        }
        rejected(msgs, "State frame for epoch 7, but epoch 2 is open", setup);

        let setup = committed_once();
        let mut msgs = good_epoch_2(&setup.2);
        msgs.truncate(3);
        msgs.extend(epoch(3, &[(1, page(1))], b"x", &setup.2));
        rejected(msgs, "epoch 3 began while epoch 2 was still open", setup);
    }

    #[test]
    fn truncated_epoch_changes_nothing_and_the_next_attempt_commits() {
        let (mut s, mem, cache) = committed_once();
        let before = s.digest(&mem).unwrap();
        let msgs = good_epoch_2(&cache);
        let n = msgs.len();
        feed(&mut s, &mem, msgs.into_iter().take(n - 1).collect()).unwrap();
        s.abort(); // the connection dropped
        assert_eq!(s.digest(&mem).unwrap(), before);
        assert_eq!(s.committed_epoch(), 1);
        // A full resend of epoch 2 (without deltas, as after a reconnect) commits.
        cache.clear();
        let step = feed(&mut s, &mem, good_epoch_2(&cache)).unwrap();
        assert_eq!(step, Step::Committed { epoch: 2 });
    }

    #[test]
    fn sync_after_commit_and_oversized_epochs_are_refused() {
        let (mut s, mem, _) = committed_once();
        let sync = Message::decode(&PagesFrameBuilder::sync(64).finish_sync(0, 0))
            .unwrap()
            .0;
        let err = s.handle(&mem, sync).unwrap_err().to_string();
        assert_eq!(err, "pre-copy pages refused: epoch 1 is already committed");
        let err = s.begin(2, PAGES + 1, 0).unwrap_err().to_string();
        assert_eq!(
            err,
            "epoch 2 rejected: page count is 33, more than the limit 32"
        );
        assert!(s.begin(2, 1, 2 << 20).is_err());
        let err = s
            .handle(
                &mem,
                Message::End {
                    epoch: 5,
                    digest: 0,
                },
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "End at epoch 5 but the last committed epoch is 1"
        );
        assert!(matches!(
            s.handle(&mem, Message::HelloOk),
            Err(StagingError::Unexpected(MessageKind::HelloOk))
        ));
    }

    /// An image in memory, the epochs committed to it, and whether commits fail.
    type MemImage = (Vec<u8>, Vec<u64>, bool);

    #[derive(Clone, Default)]
    struct MemDisk {
        image: std::sync::Arc<std::sync::Mutex<MemImage>>,
    }

    impl DiskSink for MemDisk {
        fn sync(&mut self, _disk: u32, offset: u64, data: &[u8]) -> Result<(), String> {
            let mut g = self.image.lock().unwrap();
            g.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn commit(&mut self, epoch: u64, writes: &[StagedWrite]) -> Result<(), String> {
            let mut g = self.image.lock().unwrap();
            if g.2 {
                return Err(format!("no space: the image holds epoch {}", epoch - 1));
            }
            for w in writes {
                g.0[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
            }
            g.1.push(epoch);
            Ok(())
        }
    }

    /// `epoch(...)` with disk writes on disk 0 before the state.
    fn epoch_with_writes(e: u64, writes: Vec<(u64, Bytes)>, cache: &DeltaCache) -> Vec<Message> {
        // Whole pages: several attempts at one epoch must not encode deltas against each
        // other (the backup holds none of them).
        cache.clear();
        let mut msgs = epoch(e, &[(1, page(e as u8))], b"st", cache);
        let mut d = Digest::new();
        d.add_page(PAGE_SIZE as u64, &page(e as u8));
        let frames = crate::disk::write_messages(e, &[writes], &mut d);
        let n = frames.len() as u32;
        let at = msgs.len() - 2;
        msgs.splice(at..at, frames);
        if let Some(Message::EpochCommit {
            disk_frames,
            digest,
            ..
        }) = msgs.last_mut()
        {
            *disk_frames = n;
            *digest = d.finish(b"st").0;
        }
        msgs
    }

    #[test]
    fn disk_writes_reach_the_image_only_with_a_verified_epoch() {
        let (s, mem, cache) = committed_once();
        let disk = MemDisk::default();
        disk.image.lock().unwrap().0 = vec![0; 8192];
        let mut s = Staging {
            committed_epoch: 0,
            ..s
        }
        .with_disks(vec![8192], Box::new(disk.clone()));
        // Initial sync data goes straight in before the first commit.
        s.handle(
            &mem,
            Message::DiskSync {
                disk: 0,
                offset: 0,
                bytes_done: 512,
                bytes_total: 512,
                data: Bytes::from(vec![9u8; 512]),
            },
        )
        .unwrap();
        assert_eq!(disk.image.lock().unwrap().0[..512], [9u8; 512]);
        let w = |o: u64, b: u8| (o, Bytes::from(vec![b; 512]));
        feed(
            &mut s,
            &mem,
            epoch_with_writes(1, vec![w(0, 1), w(0, 2), w(4096, 3)], &cache),
        )
        .unwrap();
        {
            let g = disk.image.lock().unwrap();
            assert_eq!(
                (g.0[0], g.0[4096], g.1.clone()),
                (2, 3, vec![1]),
                "in order, once"
            );
        }
        // A damaged write: the digest refuses the epoch, the image is untouched.
        let mut bad = epoch_with_writes(2, vec![w(512, 7)], &cache);
        for m in bad.iter_mut() {
            if let Message::DiskWrites { writes, .. } = m {
                writes[0].0 = 1024;
            }
        }
        let e = feed(&mut s, &mem, bad).unwrap_err();
        assert!(matches!(e, StagingError::Digest { .. }), "{e}");
        assert_eq!(disk.image.lock().unwrap().0[1024], 0);
        // Outside the disk, a missing frame, sync after the first commit: refused.
        let e = feed(&mut s, &mem, epoch_with_writes(2, vec![w(8192, 1)], &cache)).unwrap_err();
        assert!(e.to_string().contains("outside disk 0 (8192 bytes)"), "{e}");
        let mut missing = epoch_with_writes(2, vec![w(512, 1)], &cache);
        missing.retain(|m| !matches!(m, Message::DiskWrites { .. }));
        let e = feed(&mut s, &mem, missing).unwrap_err();
        assert!(e.to_string().contains("DiskWrites frame count"), "{e}");
        let e = s.disk_sync(0, 0, &[1; 512]).unwrap_err();
        assert!(matches!(e, StagingError::SyncRefused(_)), "{e}");
        // The sink fails: the epoch is refused, fatally, and memory stays at epoch 1.
        let before = read(&mem, 1);
        disk.image.lock().unwrap().2 = true;
        let e = feed(&mut s, &mem, epoch_with_writes(2, vec![w(512, 1)], &cache)).unwrap_err();
        assert!(
            e.is_fatal() && e.to_string().contains("holds epoch 1"),
            "{e}"
        );
        assert_eq!(read(&mem, 1), before);
        assert_eq!(s.committed_epoch(), 1);
        disk.image.lock().unwrap().2 = false;
        feed(&mut s, &mem, epoch_with_writes(2, vec![w(512, 5)], &cache)).unwrap();
        assert_eq!(disk.image.lock().unwrap().0[512], 5);
    }
}
