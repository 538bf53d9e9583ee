//! The guest's way out: frames from the virtio-net TX queue go to the tap directly
//! (unprotected) or through the `netbuffer` egress buffer, tagged with the open epoch and
//! released only when the backup acknowledges it (output commit, invariant 2).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::Sender;
use netbuffer::{EgressBuffer, Limits, Mode, Pushed, Stats};

use super::lock;
use super::tap::Tap;

/// Held output is bounded by these (then the device stops taking from the TX queue).
pub const HELD_PACKETS: usize = 4096;
/// Bytes of held output beyond which the device stops taking from the TX queue (16 MiB).
pub const HELD_BYTES: usize = 16 << 20;

/// What the egress path did with the frames it let out.
#[derive(Default, Clone, Copy, Debug)]
pub struct EgressCounters {
    /// Frames written to the tap.
    pub sent: u64,
    /// Frames the tap refused (counted as lost on the wire).
    pub tap_errors: u64,
}

/// The guest's output path: to the tap at once, or held per epoch (see the module).
pub struct Egress {
    tap: Arc<Tap>,
    buffer: Mutex<(EgressBuffer, EgressCounters)>,
    open_epoch: AtomicU64,
    /// Frames held that belong to the open epoch (no checkpoint covers them yet).
    open_frames: AtomicU64,
    /// Which protection the held frames belong to: each [`protect`](Self::protect) starts a
    /// new one (a new backup, epochs from 1 again); changed and read under `buffer`'s lock.
    session: AtomicU64,
    /// Told (without blocking) when the open epoch's first frame is held: the epoch loop
    /// sleeps until then instead of looking for output.
    waker: Mutex<Option<Sender<()>>>,
}

impl Egress {
    /// Unprotected: every frame goes out at once.
    pub fn new(tap: Arc<Tap>) -> Egress {
        let limits = Limits {
            max_packets: HELD_PACKETS,
            max_bytes: HELD_BYTES,
        };
        let buffer = EgressBuffer::new(limits, Mode::PassThrough).expect("non-zero limits");
        Egress {
            tap,
            buffer: Mutex::new((buffer, EgressCounters::default())),
            open_epoch: AtomicU64::new(1),
            open_frames: AtomicU64::new(0),
            session: AtomicU64::new(0),
            waker: Mutex::new(None),
        }
    }

    /// From now on, `waker` gets a message (if it has room) whenever a frame is held while
    /// no other frame of the open epoch was: output now waits for a checkpoint.
    pub fn wake_on_output(&self, waker: Sender<()>) {
        *lock(&self.waker) = Some(waker);
    }

    /// Holds output from now on; frames are tagged with the open epoch. Returns the new
    /// protection's session: only releases for it count (see [`release`](Self::release)).
    pub fn protect(&self) -> u64 {
        let mut g = lock(&self.buffer);
        let session = self.session.fetch_add(1, Ordering::SeqCst) + 1;
        let released =
            g.0.set_mode(Mode::Protected, Instant::now())
                .collect::<Vec<_>>();
        self.transmit(&mut g.1, released);
        session
    }

    /// Stops holding: everything held goes out, in order (the backup is gone and the
    /// primary continues unprotected).
    pub fn unprotect(&self) {
        let mut g = lock(&self.buffer);
        let released =
            g.0.set_mode(Mode::PassThrough, Instant::now())
                .collect::<Vec<_>>();
        self.transmit(&mut g.1, released);
    }

    /// The epoch that frames sent from now on belong to (set while the guest is paused).
    /// Changed under the buffer's lock, which [`send`](Self::send) reads it under: once
    /// this returns, no frame can join the epoch before it any more.
    pub fn set_open_epoch(&self, epoch: u64) {
        let _g = lock(&self.buffer);
        self.open_epoch.store(epoch, Ordering::SeqCst);
        self.open_frames.store(0, Ordering::SeqCst);
    }

    /// The frames held for `epoch` (copies of the handles; they stay held) and the last
    /// epoch released (0: none, or not before `epoch`), for protection `session`: what the
    /// primary ships with the epoch so that a promoted backup can send what a dead
    /// primary still held. Nothing for another session or when output is not held.
    pub fn held_of(&self, session: u64, epoch: u64) -> (u64, Vec<Bytes>) {
        let g = lock(&self.buffer);
        if self.session.load(Ordering::SeqCst) != session || g.0.mode() != Mode::Protected {
            return (0, Vec::new());
        }
        let released = g.0.acked_epoch().filter(|&a| a < epoch).unwrap_or(0);
        (released, g.0.held_of(epoch).cloned().collect())
    }

    /// Writes frames to the tap at once, bypassing the buffer: a promoted backup's copy of
    /// the output a dead primary may have held. Returns how many the tap took.
    pub fn replay(&self, frames: &[Bytes]) -> usize {
        let mut g = lock(&self.buffer);
        let before = g.1.sent;
        self.transmit(&mut g.1, frames.iter().cloned());
        (g.1.sent - before) as usize
    }

    /// Whether the guest produced output that waits for a checkpoint not yet taken.
    pub fn open_output(&self) -> bool {
        self.open_frames.load(Ordering::SeqCst) > 0
    }

    /// Whether a frame of `len` bytes fits among the held frames.
    pub fn has_room(&self, len: usize) -> bool {
        lock(&self.buffer).0.has_room(len)
    }

    /// Frames held for an unacknowledged epoch.
    pub fn held(&self) -> usize {
        lock(&self.buffer).0.len()
    }

    /// Sends or holds one frame. A frame refused for lack of room is handed back.
    pub fn send(&self, frame: Bytes) -> Result<(), Bytes> {
        let mut g = lock(&self.buffer);
        let epoch = self.open_epoch.load(Ordering::SeqCst);
        match g.0.push(epoch, frame, Instant::now()) {
            Ok(Pushed::Transmit(f)) => {
                self.transmit(&mut g.1, [f]);
                Ok(())
            }
            Ok(Pushed::Held) => {
                if self.open_frames.fetch_add(1, Ordering::SeqCst) == 0 {
                    if let Some(w) = lock(&self.waker).as_ref() {
                        // Full: a wake-up is pending already.
                        let _ = w.try_send(());
                    }
                }
                Ok(())
            }
            Err(e) => match e.into_packet() {
                Some(f) => Err(f),
                None => Ok(()),
            },
        }
    }

    /// The backup committed `epoch`: its frames (and earlier ones) go out, in order.
    pub fn release(&self, session: u64, epoch: u64) {
        let mut g = lock(&self.buffer);
        // An ack of an earlier protection (a backup given up on, answering late) says
        // nothing about this one's epochs.
        if self.session.load(Ordering::SeqCst) != session {
            return;
        }
        let released = g.0.release(epoch, Instant::now()).collect::<Vec<_>>();
        self.transmit(&mut g.1, released);
    }

    /// What was sent and refused so far.
    pub fn counters(&self) -> EgressCounters {
        lock(&self.buffer).1
    }

    /// Frames held now.
    pub fn held_frames(&self) -> u64 {
        lock(&self.buffer).0.len() as u64
    }

    /// The buffer's figures (held now, hold times) and what was sent and refused, read
    /// together.
    pub fn stats(&self) -> (Stats, EgressCounters) {
        let g = lock(&self.buffer);
        (*g.0.stats(), g.1)
    }

    /// Hold time p50/p99 in µs and the number of frames ever held.
    pub fn hold_times(&self) -> (u64, u64, u64) {
        let g = lock(&self.buffer);
        let s = g.0.stats();
        let us = |d: Option<std::time::Duration>| d.map_or(0, |d| d.as_micros() as u64);
        (
            us(s.hold_time.p50()),
            us(s.hold_time.p99()),
            s.pushed_packets,
        )
    }

    fn transmit(&self, c: &mut EgressCounters, frames: impl IntoIterator<Item = Bytes>) {
        for f in frames {
            // A tap that refuses a frame is a lossy wire: TCP retransmits.
            match self.tap.write_frame(&f) {
                Ok(()) => c.sent += 1,
                Err(_) => c.tap_errors += 1,
            }
        }
    }
}
