//! `aof=on`: the kv service's append-only file on the first virtio-blk disk.
//!
//! Every write command that changed the store (an error reply changed nothing) is
//! appended to the log, and the log is written and flushed (VIRTIO_BLK_T_FLUSH) before
//! any reply leaves (group commit: the service syncs once per round over its
//! connections, then sends); at start the log is replayed into the empty store. So a guest booted fresh from the disk
//! alone has every write it acknowledged.
//!
//! Layout: bytes 0..4096 hold the header (`magic "LKAOF001"`, a random `log id`, and an
//! FNV-1a checksum of both, as three little-endian u64); the log starts at byte 4096 as
//! records `len: u32, check: u32, payload[len]`, the payload being the command as a RESP
//! array of bulk strings and `check` the low 32 bits of FNV-1a over the log id, `len`
//! and the payload. Replay stops at the first record that is empty, runs past the disk
//! or fails its check: that is the end of the log (a write torn by a crash, never
//! acknowledged, ends it too; the next append overwrites it). A disk without a valid
//! header gets a new one, with a new log id, so records of an older log are never taken
//! for this one's.
//!
//! Appends rewrite the log's last, partial 4 KiB block with the new record (whole
//! sectors, as the device requires), in writes of at most 1 MiB. A disk error stops the
//! guest (exit 5) before the reply of the write it could not log leaves.

use alloc::vec;
use alloc::vec::Vec;

use super::commands::Flow;
use super::resp::{self, Args, Kind, Parse};
use super::session::Journal;
use super::table::Table;
use crate::ports::exit;
use crate::println;
use crate::time::rdtsc;
use crate::virtio::blk::{IoError, VirtioBlk};

const MAGIC: u64 = u64::from_le_bytes(*b"LKAOF001");
const LOG_START: u64 = 4096;
const BLOCK: u64 = 4096;
const RECORD_HEADER: usize = 8;
/// The largest write sent to the device at once.
const MAX_WRITE: usize = 1 << 20;
/// Bytes read from the disk at a time during replay.
const WINDOW: usize = 64 << 10;
const EXIT_DISK: u32 = 5;

fn fnv(h: u64, bytes: &[u8]) -> u64 {
    let mut h = h;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn record_check(log_id: u64, payload: &[u8]) -> u32 {
    let h = fnv(FNV_START, &log_id.to_le_bytes());
    let h = fnv(h, &(payload.len() as u32).to_le_bytes());
    fnv(h, payload) as u32
}

fn disk_failed(what: &str, err: IoError) -> ! {
    println!("kv: aof: {what} failed: {err}; stopping");
    exit(EXIT_DISK)
}

/// The open log: where it ends, and its last partial block in memory.
pub struct Aof {
    disk: VirtioBlk,
    log_id: u64,
    /// The byte offset of the first byte of `tail` on the disk (a multiple of 4096).
    tail_start: u64,
    /// The log's bytes from `tail_start` to its end (less than one block between appends).
    tail: Vec<u8>,
    /// Commands logged since the start.
    pub records: u64,
    /// Syncs (device writes and flushes) since the start.
    pub syncs: u64,
    /// Records appended to `tail` and not yet written and flushed.
    unsynced: bool,
}

/// What the replay found.
pub struct Replayed {
    pub commands: u64,
    pub bytes: u64,
    /// A new log was started (no valid header on the disk).
    pub fresh: bool,
}

impl Aof {
    /// Opens the log on `disk` and replays it into `store`, or starts a new one.
    pub fn open(mut disk: VirtioBlk, store: &mut Table) -> (Aof, Replayed) {
        if disk.readonly() {
            println!("error: aof=on needs a writable disk (the disk is read-only)");
            exit(2);
        }
        if disk.capacity() < LOG_START + BLOCK {
            println!(
                "error: aof=on needs a disk of at least {} bytes, the disk has {}",
                LOG_START + BLOCK,
                disk.capacity()
            );
            exit(2);
        }
        let mut head = vec![0u8; BLOCK as usize];
        disk.read(0, &mut head)
            .unwrap_or_else(|e| disk_failed("reading the header", e));
        let word = |i: usize| u64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().unwrap());
        let valid = word(0) == MAGIC && fnv(FNV_START, &head[..16]) == word(2);
        if !valid {
            let log_id = rdtsc() ^ 0x5bd1_e995_0000_0000;
            head.fill(0);
            head[0..8].copy_from_slice(&MAGIC.to_le_bytes());
            head[8..16].copy_from_slice(&log_id.to_le_bytes());
            let check = fnv(FNV_START, &head[..16]);
            head[16..24].copy_from_slice(&check.to_le_bytes());
            // The first log block zeroed, so that nothing of an older log follows.
            let first = vec![0u8; BLOCK as usize];
            disk.write(LOG_START, &first)
                .unwrap_or_else(|e| disk_failed("starting the log", e));
            disk.write(0, &head)
                .unwrap_or_else(|e| disk_failed("writing the header", e));
            disk.flush()
                .unwrap_or_else(|e| disk_failed("flushing the header", e));
            let aof = Aof {
                disk,
                log_id,
                tail_start: LOG_START,
                tail: Vec::new(),
                records: 0,
                syncs: 0,
                unsynced: false,
            };
            return (
                aof,
                Replayed {
                    commands: 0,
                    bytes: 0,
                    fresh: true,
                },
            );
        }
        let log_id = word(1);
        let mut reader = Reader {
            window: Vec::new(),
            start: 0,
        };
        let mut at = LOG_START;
        let mut commands = 0;
        let mut output = Vec::new();
        let mut ranges = Vec::new();
        while let Some(header) = reader.bytes(&mut disk, at, RECORD_HEADER) {
            let len = u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
            let check = u32::from_le_bytes(header[4..8].try_into().unwrap());
            if len == 0 {
                break;
            }
            let Some(payload) = reader.bytes(&mut disk, at + RECORD_HEADER as u64, len) else {
                break;
            };
            if record_check(log_id, payload) != check {
                break;
            }
            let Parse::Request {
                kind: Kind::Multibulk { argc },
                len: parsed,
            } = resp::parse(payload)
            else {
                break;
            };
            if parsed != len || resp::multibulk_args(payload, argc, &mut ranges).is_err() {
                break;
            }
            let args = Args::new(payload, &ranges);
            output.clear();
            let _: Flow = resp::execute(&args, store, &mut output);
            commands += 1;
            at += (RECORD_HEADER + len) as u64;
        }
        let tail_start = at / BLOCK * BLOCK;
        let tail = reader
            .bytes(&mut disk, tail_start, (at - tail_start) as usize)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        let aof = Aof {
            disk,
            log_id,
            tail_start,
            tail,
            records: 0,
            syncs: 0,
            unsynced: false,
        };
        (
            aof,
            Replayed {
                commands,
                bytes: at - LOG_START,
                fresh: false,
            },
        )
    }

    /// The byte offset where the log ends.
    fn end(&self) -> u64 {
        self.tail_start + self.tail.len() as u64
    }

    fn record_len(args: &Args<'_>) -> usize {
        let mut len = RECORD_HEADER + 1 + digits(args.len());
        for i in 0..args.len() {
            let a = args.get(i).len();
            len += 2 + 1 + digits(a) + 2 + a + 2;
        }
        len + 2
    }
}

fn digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

fn push_number(out: &mut Vec<u8>, n: usize) {
    let mut buf = [0u8; 20];
    let text = resp::format_i64(n as i64, &mut buf);
    out.extend_from_slice(text);
}

impl Journal for Aof {
    fn has_room(&self, args: &Args<'_>) -> bool {
        self.end() + Aof::record_len(args) as u64 <= self.disk.capacity()
    }

    fn record(&mut self, args: &Args<'_>) {
        let start = self.tail.len();
        // Room first: a log that cannot grow in memory stops the service rather than
        // acknowledge a write it did not log.
        if self.tail.try_reserve(Aof::record_len(args) + 512).is_err() {
            println!("kv: aof: no memory for a log record; stopping");
            exit(EXIT_DISK);
        }
        self.tail.extend_from_slice(&[0; RECORD_HEADER]);
        self.tail.push(b'*');
        push_number(&mut self.tail, args.len());
        self.tail.extend_from_slice(b"\r\n");
        for i in 0..args.len() {
            let a = args.get(i);
            self.tail.push(b'$');
            push_number(&mut self.tail, a.len());
            self.tail.extend_from_slice(b"\r\n");
            self.tail.extend_from_slice(a);
            self.tail.extend_from_slice(b"\r\n");
        }
        let payload_len = self.tail.len() - start - RECORD_HEADER;
        let check = record_check(self.log_id, &self.tail[start + RECORD_HEADER..]);
        self.tail[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
        self.tail[start + 4..start + 8].copy_from_slice(&check.to_le_bytes());
        self.records += 1;
        self.unsynced = true;
    }

    fn sync(&mut self) {
        if !core::mem::take(&mut self.unsynced) {
            return;
        }
        // Whole sectors from the tail's block on, zeros after the end.
        let len = self.tail.len();
        let padded = len.next_multiple_of(512);
        self.tail.resize(padded, 0);
        let mut at = 0;
        while at < padded {
            let n = (padded - at).min(MAX_WRITE);
            let offset = self.tail_start + at as u64;
            if let Err(e) = self.disk.write(offset, &self.tail[at..at + n]) {
                disk_failed("appending", e);
            }
            at += n;
        }
        self.tail.truncate(len);
        if let Err(e) = self.disk.flush() {
            disk_failed("flushing", e);
        }
        self.syncs += 1;
        // Keep only the last partial block in memory.
        let whole = len / BLOCK as usize * BLOCK as usize;
        if whole > 0 {
            self.tail.drain(..whole);
            self.tail_start += whole as u64;
        }
    }
}

/// A window of the disk, read in whole sectors, for the replay.
struct Reader {
    window: Vec<u8>,
    /// The disk offset of `window[0]`.
    start: u64,
}

impl Reader {
    /// `len` bytes at disk offset `at`, or `None` past the end of the disk.
    fn bytes<'a>(&'a mut self, disk: &mut VirtioBlk, at: u64, len: usize) -> Option<&'a [u8]> {
        let end = at.checked_add(len as u64)?;
        if end > disk.capacity() {
            return None;
        }
        let inside = at >= self.start && end <= self.start + self.window.len() as u64;
        if !inside {
            let start = at / 512 * 512;
            let want = ((end - start) as usize).max(WINDOW).next_multiple_of(512);
            let want = want.min((disk.capacity() - start) as usize);
            self.window.clear();
            if self.window.try_reserve(want).is_err() {
                println!("kv: aof: no memory to replay a record of {len} bytes; stopping");
                exit(EXIT_DISK);
            }
            self.window.resize(want, 0);
            for (i, chunk) in self.window.chunks_mut(MAX_WRITE).enumerate() {
                disk.read(start + (i * MAX_WRITE) as u64, chunk)
                    .unwrap_or_else(|e| disk_failed("replaying", e));
            }
            self.start = start;
        }
        let from = (at - self.start) as usize;
        Some(&self.window[from..from + len])
    }
}
