//! TCP transport over io_uring: frames out, messages in.
//!
//! A [`Connection`] is a TCP stream with two halves, each with its own small io_uring:
//!
//! - [`FrameSender`] sends many frames with one `SENDMSG` submission (one iovec per frame,
//!   up to `IOV_MAX` per submit), resubmitting the rest after a short send. Encoded epoch
//!   frames are sent as they are, without copying; single messages are encoded into a
//!   reusable buffer.
//! - [`FrameReceiver`] reads into one reusable [`BytesMut`]: it validates the header as soon
//!   as its 24 bytes are there (so a bad length is refused before any payload is read),
//!   waits for exactly the announced payload, and hands out messages whose payloads are
//!   zero-copy slices of that buffer. Reads are as large as the buffer allows, so small
//!   frames (acks, heartbeats) that arrive together cost one submission.
//!
//! The API is blocking: each call submits and waits for its completion. Timeouts are
//! io_uring linked timeouts (`IORING_OP_LINK_TIMEOUT`), so [`FrameReceiver::recv`] can
//! give up after a heartbeat interval. The receive timeout measures silence, not the
//! frame: every read that brings bytes starts it again, so a large frame arriving slowly
//! over a busy link never counts as a dead peer ([`FrameReceiver::last_activity`] says
//! when bytes last came). A receive timeout loses nothing: bytes of a frame already read
//! stay buffered and the next call continues. A send timeout or any protocol error leaves
//! the stream unusable ([`TransportError::Broken`] afterwards).
//!
//! The halves can be split ([`Connection::split`]) and used from two threads: the primary
//! sends epochs on one and reads acks on the other.
//!
//! Over TLS ([`crate::tls::LinkSecurity`]) the halves share the rustls session behind a mutex: the
//! sender encrypts its frames in [`TLS_CHUNK`] pieces into a ciphertext buffer that goes
//! out with the same `SENDMSG` path; the receiver reads ciphertext into a buffer of its own
//! and decrypts it into the frame buffer. Each lock is held for one piece, so acks and
//! heartbeats pass between the pieces of a large epoch.

use std::io;
use std::io::{BufRead, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
// libc rather than rustix here: the io-uring crate's API takes libc's `iovec` and `msghdr`,
// and io_uring completions carry raw negative errno values, named with libc's constants.
use io_uring::{opcode, squeue, types, IoUring};
use thiserror::Error;

use crate::protocol::{decode_frame, FrameHeader, Message, ProtocolError, HEADER_LEN};

/// Most iovecs in one `SENDMSG`.
const IOV_MAX: usize = 1024;
/// Smallest read the receiver asks for.
const RECV_CHUNK: usize = 256 << 10;
/// Plaintext encrypted per lock of a TLS session (a few TLS records).
pub const TLS_CHUNK: usize = 64 << 10;
/// Ciphertext gathered before a `SENDMSG` over TLS.
const TLS_SEND_BATCH: usize = 1 << 20;
/// Submission queue entries per ring (an operation and its linked timeout at most).
const RING_ENTRIES: u32 = 8;

const OP_TAG: u64 = 1;
const TIMER_TAG: u64 = 2;

/// Errors of the transport.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The io_uring instance could not be created.
    #[error("io_uring setup failed: {0}")]
    Setup(#[source] io::Error),
    /// Connecting to the peer failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// Accepting a connection failed.
    #[error("cannot accept a connection: {0}")]
    Accept(#[source] io::Error),
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The peer closed the connection between frames.
    #[error("peer closed the connection")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error(
        "peer closed the connection in the middle of a frame ({have} of {need} bytes received)"
    )]
    ClosedMidFrame {
        /// Bytes of the frame received.
        have: usize,
        /// Bytes of the whole frame (header only, if the header was incomplete).
        need: usize,
    },
    /// No complete frame arrived in time; the connection is still usable.
    #[error("no frame from the peer within {0:?}")]
    Timeout(Duration),
    /// The peer did not take our data in time; the stream is now unusable.
    #[error("the peer took no data for {0:?}; connection abandoned")]
    SendTimeout(Duration),
    /// The peer was reached but failed the TLS handshake, or TLS failed on an
    /// established connection (a record that does not authenticate: altered, replayed or
    /// reordered bytes). Retrying would not help.
    #[error("TLS with {peer}: {cause}")]
    Tls {
        /// The peer's address.
        peer: String,
        /// What went wrong, for an operator.
        cause: String,
    },
    /// The peer took part in the TLS handshake but did not finish it in time (a busy or
    /// a stalled peer: worth trying again, unlike [`TransportError::Tls`]).
    #[error("TLS with {peer}: the handshake did not finish within {after:?}")]
    HandshakeTimeout {
        /// The peer's address.
        peer: String,
        /// How long it was given.
        after: Duration,
    },
    /// A frame failed validation.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// An earlier error left the stream in an unknown state.
    #[error("connection is unusable after an earlier error")]
    Broken,
}

/// A small io_uring that runs one operation at a time, optionally with a linked timeout.
struct Ring {
    ring: Option<IoUring>,
}

impl Ring {
    fn new() -> Result<Self, TransportError> {
        let ring = IoUring::new(RING_ENTRIES).map_err(TransportError::Setup)?;
        Ok(Self { ring: Some(ring) })
    }

    /// Submits `op` (linked to a timeout if given), waits until the kernel has completed
    /// it, and returns its result (negative errno on failure, `-ECANCELED` on timeout).
    ///
    /// # Safety
    ///
    /// Every buffer `op` points to must stay valid, and not be accessed otherwise, until
    /// this returns. It returns only once the operation has completed, or after dropping
    /// the ring when the kernel refused the submission (unsubmitted entries then never run).
    unsafe fn run(
        &mut self,
        op: squeue::Entry,
        timeout: Option<&types::Timespec>,
    ) -> Result<i32, TransportError> {
        let ring = self.ring.as_mut().ok_or(TransportError::Broken)?;
        let op = op.user_data(OP_TAG);
        let (op, timer, expected) = match timeout {
            Some(ts) => (
                op.flags(squeue::Flags::IO_LINK),
                Some(opcode::LinkTimeout::new(ts).build().user_data(TIMER_TAG)),
                2,
            ),
            None => (op, None, 1),
        };
        {
            let mut sq = ring.submission();
            // SAFETY: the caller keeps op's buffers alive until we return, and we return
            // only after its completion (below). The queue is empty between calls (every
            // call reaps all it submits), so pushing two entries into eight slots succeeds.
            let pushed = unsafe { sq.push(&op) };
            let pushed = pushed.and_then(|()| match &timer {
                // SAFETY: the timespec is borrowed for this whole call, which outlives the
                // timer's completion.
                Some(t) => unsafe { sq.push(t) },
                None => Ok(()),
            });
            if pushed.is_err() {
                // An entry left in the queue would later run against freed buffers:
                // give the ring up instead.
                drop(sq);
                self.ring = None;
                return Err(TransportError::Io {
                    op: "queueing an io_uring operation",
                    source: io::Error::other("submission queue full"),
                });
            }
        }
        let mut result = None;
        let mut seen = 0;
        while seen < expected {
            if let Err(e) = ring.submit_and_wait(expected - seen) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Dropping the ring discards anything the kernel did not take.
                self.ring = None;
                return Err(TransportError::Io {
                    op: "io_uring_enter",
                    source: e,
                });
            }
            for cqe in ring.completion() {
                seen += 1;
                if cqe.user_data() == OP_TAG {
                    result = Some(cqe.result());
                }
            }
        }
        Ok(result.unwrap_or(-libc::EIO))
    }
}

/// A TLS session shared by the two halves of a connection.
#[derive(Clone)]
pub(crate) struct Session {
    inner: Arc<Mutex<rustls::Connection>>,
    peer: String,
}

impl Session {
    fn new(conn: rustls::Connection, peer: String) -> Self {
        Session {
            inner: Arc::new(Mutex::new(conn)),
            peer,
        }
    }

    fn lock(&self) -> MutexGuard<'_, rustls::Connection> {
        // A half that panicked leaves the session as consistent as rustls left it; the
        // other half's next record check decides whether the link is still good.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn error(&self, cause: String) -> TransportError {
        TransportError::Tls {
            peer: self.peer.clone(),
            cause,
        }
    }

    /// Moves every record the session has ready to send into `out`.
    fn drain(&self, s: &mut rustls::Connection, out: &mut Vec<u8>) -> Result<(), TransportError> {
        while s.wants_write() {
            s.write_tls(out).map_err(|source| TransportError::Io {
                op: "taking TLS records",
                source,
            })?;
        }
        Ok(())
    }

    /// Decrypts `cipher` (all of it: a record cut short stays in the session until its
    /// rest arrives) and appends the plaintext to `out`. Returns false once the peer has
    /// closed the session (`close_notify`).
    fn decrypt(&self, mut cipher: &[u8], out: &mut BytesMut) -> Result<bool, TransportError> {
        let mut s = self.lock();
        loop {
            // Drained first: rustls refuses ciphertext while its plaintext buffer is full.
            loop {
                let mut reader = s.reader();
                match reader.fill_buf() {
                    Ok([]) => return Ok(false),
                    Ok(chunk) => {
                        let n = chunk.len();
                        out.extend_from_slice(chunk);
                        reader.consume(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
                    Err(e) => return Err(self.error(e.to_string())),
                }
            }
            if cipher.is_empty() {
                return Ok(true);
            }
            s.read_tls(&mut cipher)
                .map_err(|e| self.error(e.to_string()))?;
            if let Err(e) = s.process_new_packets() {
                return Err(self.error(crate::tls::describe(&e)));
            }
        }
    }
}

fn deadline_left(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

/// Counters of a [`FrameSender`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendStats {
    /// Frames sent.
    pub frames: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// `SENDMSG` submissions (a short send costs one more).
    pub submits: u64,
}

/// The sending half of a connection.
pub struct FrameSender {
    stream: Arc<TcpStream>,
    ring: Ring,
    scratch: BytesMut,
    /// The TLS session and the ciphertext waiting to go out, over TLS.
    tls: Option<(Session, Vec<u8>)>,
    timeout: Option<Duration>,
    broken: bool,
    stats: SendStats,
}

impl std::fmt::Debug for FrameSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSender")
            .field("peer", &self.stream.peer_addr().ok())
            .field("stats", &self.stats)
            .finish()
    }
}

impl FrameSender {
    /// Gives up on a send when the peer takes no data for `timeout` (None: wait forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Counters since the connection was made.
    pub fn stats(&self) -> SendStats {
        self.stats
    }

    /// Encodes `msg` into the reusable buffer and sends it.
    pub fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        let r = msg
            .encode(&mut buf)
            .map_err(TransportError::from)
            .and_then(|()| self.send_frames(&[&buf[..]]));
        self.scratch = buf;
        r
    }

    /// Sends complete frames back to back, as few submissions as possible.
    pub fn send_frames<B: AsRef<[u8]>>(&mut self, frames: &[B]) -> Result<(), TransportError> {
        if self.broken {
            return Err(TransportError::Broken);
        }
        let r = self.send_all(frames);
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    fn send_all<B: AsRef<[u8]>>(&mut self, frames: &[B]) -> Result<(), TransportError> {
        let total: u64 = frames.iter().map(|f| f.as_ref().len() as u64).sum();
        match self.tls.take() {
            None => self.send_raw(frames)?,
            Some((session, mut cipher)) => {
                let r = self.send_encrypted(&session, &mut cipher, frames);
                self.tls = Some((session, cipher));
                r?
            }
        }
        self.stats.frames += frames.len() as u64;
        self.stats.bytes += total;
        Ok(())
    }

    /// Encrypts `frames` piece by piece and sends the records, a batch at a time.
    fn send_encrypted<B: AsRef<[u8]>>(
        &mut self,
        session: &Session,
        cipher: &mut Vec<u8>,
        frames: &[B],
    ) -> Result<(), TransportError> {
        cipher.clear();
        for frame in frames {
            for piece in frame.as_ref().chunks(TLS_CHUNK) {
                let mut s = session.lock();
                // The session has no buffer limit: it takes the whole piece.
                s.writer()
                    .write_all(piece)
                    .map_err(|source| TransportError::Io {
                        op: "encrypting a frame",
                        source,
                    })?;
                session.drain(&mut s, cipher)?;
                drop(s);
                if cipher.len() >= TLS_SEND_BATCH {
                    self.send_raw(&[&cipher[..]])?;
                    cipher.clear();
                }
            }
        }
        // Records the receiving half queued (a key update's answer) go out too.
        let mut s = session.lock();
        session.drain(&mut s, cipher)?;
        drop(s);
        if !cipher.is_empty() {
            self.send_raw(&[&cipher[..]])?;
            cipher.clear();
        }
        Ok(())
    }

    fn send_raw<B: AsRef<[u8]>>(&mut self, frames: &[B]) -> Result<(), TransportError> {
        let mut iov: Vec<libc::iovec> = frames
            .iter()
            .map(|f| f.as_ref())
            .filter(|f| !f.is_empty())
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        let ts = self.timeout.map(types::Timespec::from);
        let mut idx = 0;
        while idx < iov.len() {
            let count = (iov.len() - idx).min(IOV_MAX);
            let msg = libc::msghdr {
                msg_name: std::ptr::null_mut(),
                msg_namelen: 0,
                msg_iov: iov[idx..].as_mut_ptr(),
                msg_iovlen: count,
                msg_control: std::ptr::null_mut(),
                msg_controllen: 0,
                msg_flags: 0,
            };
            let op = opcode::SendMsg::new(types::Fd(self.stream.as_raw_fd()), &msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build();
            self.stats.submits += 1;
            // SAFETY: `msg`, the iovecs it points to and the frames they point to are all
            // borrowed or owned by this frame and outlive `run`, which waits for completion.
            let res = unsafe { self.ring.run(op, ts.as_ref()) }?;
            let mut sent = match res {
                n if n > 0 => n as usize,
                0 => return Err(TransportError::Closed),
                e if e == -libc::ECANCELED && self.timeout.is_some() => {
                    return Err(TransportError::SendTimeout(
                        self.timeout.unwrap_or_default(),
                    ))
                }
                e if e == -libc::EPIPE || e == -libc::ECONNRESET => {
                    return Err(TransportError::Closed)
                }
                e => {
                    return Err(TransportError::Io {
                        op: "sendmsg",
                        source: io::Error::from_raw_os_error(-e),
                    })
                }
            };
            // Skip what went out; a partly sent iovec keeps its tail.
            while sent > 0 && idx < iov.len() {
                let v = &mut iov[idx];
                if sent >= v.iov_len {
                    sent -= v.iov_len;
                    idx += 1;
                } else {
                    v.iov_base = (v.iov_base as *mut u8).wrapping_add(sent) as *mut libc::c_void;
                    v.iov_len -= sent;
                    sent = 0;
                }
            }
        }
        Ok(())
    }

    /// Shuts the socket down both ways; a receiver blocked on it returns `Closed`.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// The receiving half of a connection.
pub struct FrameReceiver {
    stream: Arc<TcpStream>,
    ring: Ring,
    /// Plaintext: the frames being received.
    buf: BytesMut,
    /// The TLS session and the buffer ciphertext is read into, over TLS.
    tls: Option<(Session, Vec<u8>)>,
    /// Header of the frame being received, once its bytes are in.
    pending: Option<FrameHeader>,
    broken: bool,
    /// When bytes last arrived (or the connection was made).
    last_activity: Instant,
    /// The longest wait between two arrivals of bytes so far, as this side saw it (its own
    /// scheduling delays included: an upper bound of the peer's silence).
    longest_silence: Duration,
}

impl std::fmt::Debug for FrameReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReceiver")
            .field("peer", &self.stream.peer_addr().ok())
            .field("buffered", &self.buf.len())
            .finish()
    }
}

impl FrameReceiver {
    /// When bytes last arrived from the peer (or the connection was made): a frame still
    /// arriving is a sign of life although no whole message came yet.
    pub fn last_activity(&self) -> Instant {
        self.last_activity
    }

    /// The longest silence between two arrivals of bytes so far (see the field).
    pub fn longest_silence(&self) -> Duration {
        self.longest_silence
    }

    /// Receives the next message; `timeout` bounds the silence while waiting for it (None:
    /// wait forever): any bytes arriving start it again.
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Message, TransportError> {
        if self.broken {
            return Err(TransportError::Broken);
        }
        let r = self.recv_inner(timeout);
        if matches!(
            r,
            Err(TransportError::Protocol(_) | TransportError::Io { .. })
        ) {
            self.broken = true;
        }
        r
    }

    fn recv_inner(&mut self, timeout: Option<Duration>) -> Result<Message, TransportError> {
        let mut deadline = timeout.map(|t| Instant::now() + t);
        // Over TLS, records that came with the handshake's last flight are in the session.
        self.decrypt(0)?;
        loop {
            if let Some(msg) = self.take_frame()? {
                return Ok(msg);
            }
            let need = self
                .pending
                .map_or(HEADER_LEN, |h| h.frame_len())
                .saturating_sub(self.buf.len());
            self.buf.reserve(need.max(RECV_CHUNK));
            // Over TLS the read goes to the ciphertext buffer, else straight to the frames.
            let target: &mut [std::mem::MaybeUninit<u8>] = match &mut self.tls {
                Some((_, cipher)) => {
                    cipher.clear();
                    cipher.reserve(RECV_CHUNK);
                    cipher.spare_capacity_mut()
                }
                None => self.buf.spare_capacity_mut(),
            };
            let len = target.len().min(u32::MAX as usize) as u32;
            let ptr = target.as_mut_ptr().cast::<u8>();
            // Past the deadline (or a zero timeout): one last look at what has already
            // arrived, without waiting. A process that was stopped or starved past its
            // deadline must not call a peer silent while its bytes wait in the socket.
            let left = deadline_left(deadline);
            let dont_wait = left == Some(Duration::ZERO);
            let op = opcode::Recv::new(types::Fd(self.stream.as_raw_fd()), ptr, len)
                .flags(if dont_wait { libc::MSG_DONTWAIT } else { 0 })
                .build();
            let ts = left.filter(|_| !dont_wait).map(types::Timespec::from);
            // SAFETY: the receive targets the spare capacity of `self.buf` (or of the
            // ciphertext buffer), which is not touched (nor reallocated) until `run`
            // returns after the completion.
            let res = unsafe { self.ring.run(op, ts.as_ref()) }?;
            match res {
                n if n > 0 => {
                    let n = n as usize;
                    let now = Instant::now();
                    self.longest_silence = self
                        .longest_silence
                        .max(now.saturating_duration_since(self.last_activity));
                    self.last_activity = now;
                    deadline = timeout.map(|t| self.last_activity + t);
                    if !self.decrypt(n)? {
                        return Err(self.closed());
                    }
                }
                0 => return Err(self.closed()),
                e if e == -libc::ECANCELED && timeout.is_some() => {
                    return Err(TransportError::Timeout(timeout.unwrap_or_default()))
                }
                e if (e == -libc::EAGAIN || e == -libc::EWOULDBLOCK) && dont_wait => {
                    return Err(TransportError::Timeout(timeout.unwrap_or_default()))
                }
                e if e == -libc::ECONNRESET => return Err(TransportError::Closed),
                e => {
                    return Err(TransportError::Io {
                        op: "recv",
                        source: io::Error::from_raw_os_error(-e),
                    })
                }
            }
        }
    }

    /// Takes in `n` bytes the kernel just wrote into the spare capacity of the read's
    /// target: frame bytes as they are, or ciphertext to decrypt into the frame buffer.
    /// Returns false once the peer closed the TLS session.
    fn decrypt(&mut self, n: usize) -> Result<bool, TransportError> {
        match &mut self.tls {
            None => {
                // SAFETY: the kernel initialized `n` bytes of the spare capacity.
                unsafe { self.buf.set_len(self.buf.len() + n) };
                Ok(true)
            }
            Some((session, cipher)) => {
                // SAFETY: the kernel initialized `n` bytes of the spare capacity (the
                // buffer was cleared before the read).
                unsafe { cipher.set_len(n) };
                session.decrypt(cipher, &mut self.buf)
            }
        }
    }

    /// The error for a peer that closed the connection: between frames or within one.
    fn closed(&self) -> TransportError {
        if self.buf.is_empty() {
            TransportError::Closed
        } else {
            TransportError::ClosedMidFrame {
                have: self.buf.len(),
                need: self.pending.map_or(HEADER_LEN, |h| h.frame_len()),
            }
        }
    }

    /// Takes a complete frame off the buffer, validating the header as soon as it is in.
    fn take_frame(&mut self) -> Result<Option<Message>, TransportError> {
        if self.pending.is_none() {
            let Some(hb) = self.buf.first_chunk::<HEADER_LEN>() else {
                return Ok(None);
            };
            self.pending = Some(FrameHeader::parse(hb)?);
        }
        let Some(header) = self.pending else {
            return Ok(None);
        };
        if self.buf.len() < header.frame_len() {
            return Ok(None);
        }
        self.pending = None;
        let frame: Bytes = self.buf.split_to(header.frame_len()).freeze();
        Ok(Some(decode_frame(&header, frame.slice(HEADER_LEN..))?))
    }

    /// Shuts the socket down both ways.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// A TCP connection to `addr` (any of its addresses), each try given `timeout`.
pub(crate) fn connect_stream(
    addr: impl ToSocketAddrs,
    timeout: Duration,
) -> Result<TcpStream, TransportError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| TransportError::Connect {
            addr: "(unresolvable address)".into(),
            source,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address to connect to");
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(TransportError::Connect {
        addr: addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        source: last,
    })
}

/// A framed connection to the peer.
#[derive(Debug)]
pub struct Connection {
    /// Sending half.
    pub sender: FrameSender,
    /// Receiving half.
    pub receiver: FrameReceiver,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
}

impl Connection {
    /// Wraps a connected stream (sets `TCP_NODELAY`), in clear.
    pub fn from_stream(stream: TcpStream) -> Result<Self, TransportError> {
        Self::wrap(stream, None)
    }

    /// Wraps a connected stream whose TLS handshake `session` has completed.
    pub(crate) fn from_tls_stream(
        stream: TcpStream,
        session: rustls::Connection,
    ) -> Result<Self, TransportError> {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "the peer".to_string(), |p| p.to_string());
        Self::wrap(stream, Some(Session::new(session, peer)))
    }

    fn wrap(stream: TcpStream, tls: Option<Session>) -> Result<Self, TransportError> {
        stream
            .set_nodelay(true)
            .map_err(|source| TransportError::Io {
                op: "setting TCP_NODELAY",
                source,
            })?;
        let peer = stream.peer_addr().ok();
        let local = stream.local_addr().ok();
        let stream = Arc::new(stream);
        Ok(Self {
            sender: FrameSender {
                stream: stream.clone(),
                ring: Ring::new()?,
                scratch: BytesMut::with_capacity(4096),
                tls: tls.clone().map(|s| (s, Vec::new())),
                timeout: None,
                broken: false,
                stats: SendStats::default(),
            },
            receiver: FrameReceiver {
                stream,
                ring: Ring::new()?,
                buf: BytesMut::with_capacity(RECV_CHUNK),
                tls: tls.map(|s| (s, Vec::with_capacity(RECV_CHUNK))),
                pending: None,
                broken: false,
                last_activity: Instant::now(),
                longest_silence: Duration::ZERO,
            },
            peer,
            local,
        })
    }

    /// Connects to `addr` in clear, giving up after `timeout`.
    pub fn connect(addr: impl ToSocketAddrs, timeout: Duration) -> Result<Self, TransportError> {
        Self::from_stream(connect_stream(addr, timeout)?)
    }

    /// Whether the connection is encrypted and authenticated (TLS).
    pub fn is_secure(&self) -> bool {
        self.sender.tls.is_some()
    }

    /// Accepts one connection on `listener`.
    pub fn accept(listener: &TcpListener) -> Result<Self, TransportError> {
        let (stream, _) = listener.accept().map_err(TransportError::Accept)?;
        Self::from_stream(stream)
    }

    /// The peer's address, if known.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// This side's address of the connection, if known.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        self.sender.send(msg)
    }

    /// Sends complete frames in as few submissions as possible.
    pub fn send_frames<B: AsRef<[u8]>>(&mut self, frames: &[B]) -> Result<(), TransportError> {
        self.sender.send_frames(frames)
    }

    /// Receives the next message within `timeout`.
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Message, TransportError> {
        self.receiver.recv(timeout)
    }

    /// When bytes last arrived from the peer.
    pub fn last_activity(&self) -> Instant {
        self.receiver.last_activity()
    }

    /// The longest silence between two arrivals of bytes so far.
    pub fn longest_silence(&self) -> Duration {
        self.receiver.longest_silence()
    }

    /// The two halves, for use from two threads.
    pub fn split(self) -> (FrameSender, FrameReceiver) {
        (self.sender, self.receiver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode_page;
    use crate::protocol::PagesFrameBuilder;
    use crate::PAGE_SIZE;
    use std::io::Write;

    fn pair() -> (Connection, Connection) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || Connection::accept(&l).unwrap());
        let c = Connection::connect(addr, Duration::from_secs(5)).unwrap();
        (c, t.join().unwrap())
    }

    /// A raw socket on one end, a `Connection` on the other.
    fn raw_pair() -> (TcpStream, Connection) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let raw = TcpStream::connect(addr).unwrap();
        (raw, Connection::accept(&l).unwrap())
    }

    fn pages_frame(epoch: u64, n: u64) -> Bytes {
        let mut b = PagesFrameBuilder::pages(epoch, 1 << 20);
        for i in 0..n {
            let mut p = [0u8; PAGE_SIZE];
            for (j, x) in p.iter_mut().enumerate() {
                *x = (j as u64 * 31 + i * 7) as u8 ^ (j >> 5) as u8;
            }
            b.push(i, |out| encode_page(&p, None, out));
        }
        b.finish()
    }

    #[test]
    fn frames_arrive_bit_exact_in_order() {
        let (mut a, mut b) = pair();
        let frames: Vec<Bytes> = (0..40).map(|e| pages_frame(e, 1 + e % 5)).collect();
        let big = pages_frame(99, 300); // larger than the socket buffer: short sends
        let sender = std::thread::spawn(move || {
            a.send(&Message::Heartbeat { epoch: 1 }).unwrap();
            a.send_frames(&frames).unwrap();
            a.send_frames(&[big.clone(), Message::Ack { epoch: 5 }.to_frame().unwrap()])
                .unwrap();
            assert_eq!(a.sender.stats().frames, 43);
            (a, frames, big)
        });
        assert_eq!(
            b.recv(Some(Duration::from_secs(10))).unwrap(),
            Message::Heartbeat { epoch: 1 }
        );
        let mut got = Vec::new();
        for _ in 0..41 {
            got.push(b.recv(Some(Duration::from_secs(10))).unwrap());
        }
        assert_eq!(
            b.recv(Some(Duration::from_secs(10))).unwrap(),
            Message::Ack { epoch: 5 }
        );
        let (_a, frames, big) = sender.join().unwrap();
        for (m, f) in got.iter().zip(frames.iter().chain([&big])) {
            assert_eq!(&m.to_frame().unwrap(), f, "frame re-encodes bit-exact");
        }
    }

    #[test]
    fn partial_frames_are_reassembled() {
        let (mut raw, mut conn) = raw_pair();
        let frame = pages_frame(3, 2);
        let t = std::thread::spawn(move || {
            for chunk in frame.chunks(7) {
                raw.write_all(chunk).unwrap();
                raw.flush().unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            (raw, frame)
        });
        let msg = conn.recv(Some(Duration::from_secs(10))).unwrap();
        let (_raw, frame) = t.join().unwrap();
        assert_eq!(msg.to_frame().unwrap(), frame);
    }

    #[test]
    fn receive_timeout_fires_and_keeps_partial_frame() {
        let (mut raw, mut conn) = raw_pair();
        let err = conn.recv(Some(Duration::from_millis(30))).unwrap_err();
        assert!(matches!(err, TransportError::Timeout(_)), "{err}");
        // Half a frame, then a timeout, then the rest: the frame still arrives whole.
        let frame = Message::End {
            epoch: 4,
            digest: 77,
        }
        .to_frame()
        .unwrap();
        raw.write_all(&frame[..10]).unwrap();
        let err = conn.recv(Some(Duration::from_millis(30))).unwrap_err();
        assert!(matches!(err, TransportError::Timeout(_)), "{err}");
        raw.write_all(&frame[10..]).unwrap();
        assert_eq!(
            conn.recv(Some(Duration::from_secs(10))).unwrap(),
            Message::End {
                epoch: 4,
                digest: 77
            }
        );
    }

    #[test]
    fn a_zero_timeout_takes_what_already_arrived() {
        let (mut raw, mut conn) = raw_pair();
        let err = conn.recv(Some(Duration::ZERO)).unwrap_err();
        assert!(matches!(err, TransportError::Timeout(_)), "{err}");
        let frame = Message::Heartbeat { epoch: 3 }.to_frame().unwrap();
        raw.write_all(&frame).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // A receiver that comes back after its deadline (stopped, starved) still sees the
        // bytes that wait in the socket instead of calling the peer silent.
        assert_eq!(
            conn.recv(Some(Duration::ZERO)).unwrap(),
            Message::Heartbeat { epoch: 3 }
        );
    }

    #[test]
    fn a_frame_that_keeps_arriving_does_not_time_out() {
        let (mut raw, mut conn) = raw_pair();
        let frame = pages_frame(9, 4);
        let t = std::thread::spawn(move || {
            // The whole frame takes ~0.5 s, far longer than the receive timeout, but
            // bytes never stop for more than ~20 ms.
            let n = frame.len().div_ceil(25);
            for chunk in frame.chunks(n) {
                raw.write_all(chunk).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            (raw, frame)
        });
        let before = conn.last_activity();
        let msg = conn.recv(Some(Duration::from_millis(150))).unwrap();
        let (raw, frame) = t.join().unwrap();
        assert_eq!(msg.to_frame().unwrap(), frame);
        assert!(conn.last_activity() > before);
        assert!(conn.longest_silence() > Duration::ZERO);
        // Silence still times out.
        let err = conn.recv(Some(Duration::from_millis(50))).unwrap_err();
        assert!(matches!(err, TransportError::Timeout(_)), "{err}");
        drop(raw);
    }

    #[test]
    fn peer_close_is_a_clean_error() {
        let (raw, mut conn) = raw_pair();
        drop(raw);
        assert!(matches!(
            conn.recv(Some(Duration::from_secs(10))).unwrap_err(),
            TransportError::Closed
        ));

        let (mut raw, mut conn) = raw_pair();
        let frame = Message::Ack { epoch: 1 }.to_frame().unwrap();
        raw.write_all(&frame[..30.min(frame.len() - 1)]).unwrap();
        drop(raw);
        let err = conn.recv(Some(Duration::from_secs(10))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "peer closed the connection in the middle of a frame (23 of 24 bytes received)"
        );

        // Sending to a closed peer fails (EPIPE / ECONNRESET), it does not kill the process.
        let (raw, mut conn) = raw_pair();
        drop(raw);
        let frame = pages_frame(1, 64);
        let mut failed = false;
        for _ in 0..200 {
            if conn.send_frames(&[&frame]).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "sending into a closed connection never failed");
        assert!(matches!(
            conn.send_frames(&[&frame]),
            Err(TransportError::Broken)
        ));
    }

    #[test]
    fn corrupt_frames_are_refused_and_poison_the_receiver() {
        let (mut raw, mut conn) = raw_pair();
        let mut frame = Message::Ack { epoch: 17 }.to_frame().unwrap().to_vec();
        frame[12] ^= 1; // epoch byte: CRC no longer matches
        raw.write_all(&frame).unwrap();
        let err = conn.recv(Some(Duration::from_secs(10))).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("frame checksum mismatch at epoch "),
            "{err}"
        );
        assert!(matches!(
            conn.recv(Some(Duration::from_secs(1))),
            Err(TransportError::Broken)
        ));

        // A huge announced length is refused from the header alone.
        let (mut raw, mut conn) = raw_pair();
        let mut frame = Message::Ack { epoch: 1 }.to_frame().unwrap().to_vec();
        frame[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        raw.write_all(&frame).unwrap();
        assert!(matches!(
            conn.recv(Some(Duration::from_secs(10))),
            Err(TransportError::Protocol(ProtocolError::TooLarge { .. }))
        ));
    }

    #[test]
    fn split_halves_work_from_two_threads() {
        let (a, mut b) = pair();
        let (mut tx, mut rx) = a.split();
        let t = std::thread::spawn(move || {
            for e in 1..=20 {
                tx.send(&Message::Heartbeat { epoch: e }).unwrap();
            }
            tx
        });
        for e in 1..=20 {
            assert_eq!(
                b.recv(Some(Duration::from_secs(10))).unwrap(),
                Message::Heartbeat { epoch: e }
            );
            b.send(&Message::Ack { epoch: e }).unwrap();
        }
        for e in 1..=20 {
            assert_eq!(
                rx.recv(Some(Duration::from_secs(10))).unwrap(),
                Message::Ack { epoch: e }
            );
        }
        let tx = t.join().unwrap();
        tx.shutdown();
        assert!(matches!(
            b.recv(Some(Duration::from_secs(10))),
            Err(TransportError::Closed)
        ));
    }
}
