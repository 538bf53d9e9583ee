//! One client connection, without its socket: the bytes received and not yet run, the
//! replies not yet sent, and the rules that keep both bounded.
//!
//! - Replies: requests run only while less than [`OUTPUT_HIGH`] bytes of replies wait,
//!   and each one only once the output has room for its whole reply
//!   (`resp::reply_bound`); when that room cannot be had, the request waits for the
//!   output to drain, or, when nothing waits, gets the OOM error. The output keeps
//!   [`resp::SMALL_REPLY`] bytes of room at all times, so an error can always be sent.
//! - Input: a request is kept until it is complete, up to `max_request` bytes. A
//!   larger one, or one for which the input cannot grow, is read and dropped as it
//!   arrives (its framing is followed, so the connection stays in step) and gets the
//!   OOM error; so does a request whose arguments cannot be listed.
//!
//! Nothing here allocates infallibly after [`Session::new`]. Pure `alloc` code: the
//! host tests include it by path.

use alloc::vec::Vec;

use super::resp::{self, Args, Flow, Kind, Parse, Partial, ProtocolError, OOM, SMALL_REPLY};
use super::table::Table;

/// Where write commands are logged before their replies leave (the append-only file of
/// `aof=on`). A session calls `record` for each write it runs, in order, as it queues
/// the reply; whoever sends replies calls `sync` before any leaves, so one sync makes
/// the writes of many requests (of many connections) durable at once. A journal that
/// cannot make a record durable does not return (the service stops rather than
/// acknowledge it).
pub trait Journal {
    /// Whether a record of the command `args` fits in the log.
    fn has_room(&self, args: &Args<'_>) -> bool;
    /// Logs the command `args`, which changed (or may have changed) the store; durable
    /// once [`Journal::sync`] returns.
    fn record(&mut self, args: &Args<'_>);
    /// Makes every record so far durable.
    fn sync(&mut self);
}

/// No journal: nothing is logged.
impl Journal for () {
    fn has_room(&self, _args: &Args<'_>) -> bool {
        true
    }
    fn record(&mut self, _args: &Args<'_>) {}
    fn sync(&mut self) {}
}

/// The reply to a write when the log has no room for it, as redis-server words an AOF
/// write error.
pub const AOF_FULL: &[u8] = b"-MISCONF Errors writing to the AOF file: No space left on device\r\n";

/// Requests stop running while this many bytes of replies wait to be sent.
pub const OUTPUT_HIGH: usize = 64 << 10;
/// A buffer that grew past this is given back once it is empty.
const SHRINK_ABOVE: usize = 128 << 10;
/// The room the input, the arguments and the unquoted inline text keep at all times, so
/// that short requests are still read and run when memory is exhausted.
const INPUT_KEEP: usize = 256;
const ARGS_KEEP: usize = 16;

pub struct Session {
    /// Received bytes not yet run: requests from the start.
    input: Vec<u8>,
    /// The input length from which parsing the partial request again is useful.
    wanted: usize,
    /// Replies, sent up to `sent`.
    output: Vec<u8>,
    sent: usize,
    /// Complete requests wait in `input` (the output was full).
    stalled: bool,
    /// Close once the output is sent: no more input is read (QUIT, protocol error).
    closing: bool,
    /// A request being dropped as it arrives.
    discard: Option<Discard>,
    max_request: usize,
    /// The arguments of the request being run, and the unquoted text of an inline one.
    ranges: Vec<(usize, usize)>,
    scratch: Vec<u8>,
}

impl Session {
    /// A session that keeps requests of up to `max_request` bytes (at least
    /// `resp::MAX_INLINE` + 2, so that an inline request is never dropped half-read).
    pub fn new(max_request: usize) -> Session {
        Session {
            input: Vec::with_capacity(INPUT_KEEP),
            wanted: 0,
            output: Vec::with_capacity(SMALL_REPLY),
            sent: 0,
            stalled: false,
            closing: false,
            discard: None,
            max_request: max_request.max(resp::MAX_INLINE + 2),
            ranges: Vec::with_capacity(ARGS_KEEP),
            scratch: Vec::with_capacity(INPUT_KEEP),
        }
    }

    /// Forgets the connection (a new one comes next).
    pub fn reset(&mut self) {
        self.input.clear();
        self.wanted = 0;
        self.output.clear();
        self.sent = 0;
        self.stalled = false;
        self.closing = false;
        self.discard = None;
        self.trim();
    }

    /// Replies waiting to be sent.
    pub fn output(&self) -> &[u8] {
        &self.output[self.sent..]
    }

    /// `n` bytes of [`Session::output`] were sent.
    pub fn sent(&mut self, n: usize) {
        self.sent += n;
        if self.sent >= self.output.len() {
            self.output.clear();
            self.sent = 0;
            self.trim();
        }
    }

    /// The connection is to be closed once the output is sent.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Gives back the memory of big buffers that are empty, keeping the small room each
    /// one always has if memory allows (after a big buffer is freed, it does).
    fn trim(&mut self) {
        fn shrink<T>(buffer: &mut Vec<T>, above: usize, keep: usize) {
            if buffer.is_empty() && buffer.capacity() > above {
                *buffer = Vec::new();
                let _ = buffer.try_reserve_exact(keep);
            }
        }
        shrink(&mut self.input, SHRINK_ABOVE, INPUT_KEEP);
        shrink(&mut self.output, SHRINK_ABOVE, SMALL_REPLY);
        self.ranges.clear();
        shrink(&mut self.ranges, SHRINK_ABOVE / 16, ARGS_KEEP);
        self.scratch.clear();
        shrink(&mut self.scratch, SHRINK_ABOVE, INPUT_KEEP);
    }

    /// Takes received bytes and runs the requests they complete; how many bytes it took.
    /// It takes none while replies wait to be sent: the rest stays in the socket.
    #[allow(dead_code)] // the host tests' entry; the guest passes its journal
    pub fn receive(&mut self, data: &[u8], store: &mut Table) -> usize {
        self.receive_logged(data, store, &mut ())
    }

    /// [`Session::receive`], logging each write command to `journal` before its reply is
    /// queued.
    pub fn receive_logged(
        &mut self,
        data: &[u8],
        store: &mut Table,
        journal: &mut dyn Journal,
    ) -> usize {
        if self.closing {
            // redis-server reads nothing more from a client it is closing.
            return data.len();
        }
        if self.stalled || !self.output().is_empty() {
            return 0;
        }
        let mut used = 0;
        while used < data.len() && !self.closing {
            if let Some(discard) = &mut self.discard {
                let (n, step) = discard.skip(&data[used..]);
                used += n;
                match step {
                    Step::More => {}
                    Step::Done => {
                        self.discard = None;
                        self.answer(OOM);
                    }
                    Step::Error(error) => self.protocol_error(error),
                }
                continue;
            }
            let rest = &data[used..];
            // All of it, or what the room the input has takes.
            let take = match self.input.try_reserve(rest.len()) {
                Ok(()) => rest.len(),
                Err(_) => rest.len().min(self.input.capacity() - self.input.len()),
            };
            if take == 0 {
                self.no_room_for_input();
                continue;
            }
            self.input.extend_from_slice(&rest[..take]);
            used += take;
            self.run(store, journal);
            if self.stalled {
                break;
            }
        }
        used
    }

    /// Runs requests that waited for the output to drain; whether any ran.
    #[allow(dead_code)] // as `receive`
    pub fn resume(&mut self, store: &mut Table) -> bool {
        self.resume_logged(store, &mut ())
    }

    /// [`Session::resume`] with a journal, as [`Session::receive_logged`].
    pub fn resume_logged(&mut self, store: &mut Table, journal: &mut dyn Journal) -> bool {
        if !self.stalled || !self.output().is_empty() {
            return false;
        }
        self.run(store, journal)
    }

    /// The input cannot grow: the partial request at its start is dropped as it
    /// arrives and gets the OOM error; or, when it cannot be followed (an inline
    /// request, an array's count), the connection gets the OOM error and is closed.
    fn no_room_for_input(&mut self) {
        match resp::parse(&self.input) {
            Parse::Partial(partial @ (Partial::Header { .. } | Partial::Body { .. })) => {
                self.start_discard(partial);
            }
            _ => {
                self.answer(OOM);
                self.close();
            }
        }
    }

    /// Appends a short reply outside of a request (the output keeps room for a few,
    /// and `receive` starts with an empty output). Should even that fail, the
    /// connection is closed: better than a client out of step.
    fn answer(&mut self, reply: &[u8]) {
        if self.output.try_reserve(reply.len()).is_ok() {
            self.output.extend_from_slice(reply);
        } else {
            self.close();
        }
    }

    /// Drops the partial request that fills `input` and follows the rest of it as it
    /// arrives.
    fn start_discard(&mut self, partial: Partial) {
        let discard = match partial {
            Partial::Body { start, len, after } => Discard {
                body: len + 2 - (self.input.len() - start),
                args: after,
                header: Header::default(),
            },
            Partial::Header { at, args } => {
                let mut header = Header::default();
                for &b in &self.input[at..] {
                    header.push(b);
                }
                Discard {
                    body: 0,
                    args,
                    header,
                }
            }
            Partial::Line => unreachable!("only an array request can be followed"),
        };
        self.input.clear();
        self.wanted = 0;
        self.trim();
        self.discard = Some(discard);
    }

    fn protocol_error(&mut self, error: ProtocolError) {
        if self.output.try_reserve(SMALL_REPLY).is_ok() {
            error.write(&mut self.output);
        }
        self.close();
    }

    fn close(&mut self) {
        self.closing = true;
        self.stalled = false;
        self.discard = None;
        self.input.clear();
        self.trim();
    }

    /// Runs the complete requests at the start of `input` while the output has room;
    /// whether any ran.
    fn run(&mut self, store: &mut Table, journal: &mut dyn Journal) -> bool {
        let mut at = 0;
        let mut ran = false;
        self.stalled = false;
        while !self.closing {
            if self.output.len() >= OUTPUT_HIGH {
                self.stalled = true;
                break;
            }
            if self.input.len() < self.wanted {
                break;
            }
            let parsed = resp::parse(&self.input[at..]);
            let (len, kind) = match parsed {
                Parse::Request { len, kind } => (len, kind),
                Parse::Partial(partial) => {
                    let have = self.input.len() - at;
                    self.wanted = at + partial.wanted(have);
                    let too_big = match partial {
                        Partial::Body { start, len, .. } => start + len + 2 > self.max_request,
                        Partial::Header { .. } => have > self.max_request,
                        Partial::Line => false,
                    };
                    if too_big {
                        self.input.drain(..at);
                        at = 0;
                        self.start_discard(partial);
                    }
                    break;
                }
                Parse::Error(error) => {
                    self.protocol_error(error);
                    at = 0;
                    break;
                }
            };
            // Room for an error at least; the output keeps that much when it is empty.
            if self.output.try_reserve(SMALL_REPLY).is_err() {
                if self.output.is_empty() {
                    self.close();
                    at = 0;
                } else {
                    self.stalled = true;
                }
                break;
            }
            if len > self.max_request {
                // Refused whether it arrived whole or in parts.
                self.output.extend_from_slice(OOM);
                at += len;
                ran = true;
                continue;
            }
            match self.step(at, len, kind, store, journal) {
                Some(flow) => {
                    at += len;
                    ran = true;
                    if flow == Flow::Close {
                        self.close();
                        at = 0;
                    }
                }
                None => {
                    self.stalled = true;
                    break;
                }
            }
        }
        self.input.drain(..at);
        self.wanted = self.wanted.saturating_sub(at);
        if self.input.is_empty() {
            self.wanted = 0;
        }
        self.trim();
        ran
    }

    /// Runs the request of `len` bytes at `at`: its flow, or `None` when its reply has
    /// to wait for the output to drain.
    fn step(
        &mut self,
        at: usize,
        len: usize,
        kind: Kind,
        store: &mut Table,
        journal: &mut dyn Journal,
    ) -> Option<Flow> {
        let request = &self.input[at..at + len];
        let listed = match kind {
            Kind::Empty => return Some(Flow::Continue),
            Kind::Multibulk { argc } => resp::multibulk_args(request, argc, &mut self.ranges),
            Kind::Inline { line_end, argc } => resp::inline_args(
                &request[..line_end],
                argc,
                &mut self.scratch,
                &mut self.ranges,
            ),
        };
        if listed.is_err() {
            self.output.extend_from_slice(OOM);
            return Some(Flow::Continue);
        }
        let buf = match kind {
            Kind::Inline { .. } => &self.scratch[..],
            _ => request,
        };
        let args = Args::new(buf, &self.ranges);
        let bound = resp::reply_bound(&args, store);
        if self.output.try_reserve(bound).is_err() {
            if !self.output.is_empty() {
                return None;
            }
            self.output.extend_from_slice(OOM);
            return Some(Flow::Continue);
        }
        let write = resp::is_write(&args);
        if write && !journal.has_room(&args) {
            self.output.extend_from_slice(AOF_FULL);
            return Some(Flow::Continue);
        }
        let start = self.output.len();
        let flow = resp::execute(&args, store, &mut self.output);
        // An error reply changed nothing (arity, syntax, type, OOM): not logged.
        if write && self.output.get(start) != Some(&b'-') {
            journal.record(&args);
        }
        Some(flow)
    }
}

/// A request dropped as it arrives: the framing of an array of bulk strings, followed
/// without keeping the bytes.
struct Discard {
    /// Bytes still to drop of the current argument, its CRLF included.
    body: usize,
    /// Arguments whose header is still to come.
    args: usize,
    /// The header being read.
    header: Header,
}

enum Step {
    /// The request goes on in the next bytes.
    More,
    /// The request is over: it gets the OOM error.
    Done,
    Error(ProtocolError),
}

/// A header line `$<len>\r` plus the one byte after it, which redis-server skips
/// unchecked. A valid one has at most 22 bytes before the `\r`.
#[derive(Default)]
struct Header {
    bytes: [u8; 24],
    len: usize,
    /// The `\r` was seen: the next byte ends the header.
    cr: bool,
}

impl Header {
    /// Takes one byte; true when the header is complete.
    fn push(&mut self, b: u8) -> bool {
        if self.cr {
            return true;
        }
        if b == b'\r' {
            self.cr = true;
        } else {
            if self.len < self.bytes.len() {
                self.bytes[self.len] = b;
            }
            self.len += 1;
        }
        false
    }

    /// The argument length it announces.
    fn parse(&self) -> Result<usize, ProtocolError> {
        let first = if self.len == 0 { b'\r' } else { self.bytes[0] };
        if first != b'$' {
            return Err(ProtocolError::ExpectedDollar(first));
        }
        if self.len > self.bytes.len() {
            return Err(ProtocolError::InvalidBulkLength);
        }
        match resp::parse_i64(&self.bytes[1..self.len]) {
            Some(len) if (0..=resp::MAX_BULK as i64).contains(&len) => Ok(len as usize),
            _ => Err(ProtocolError::InvalidBulkLength),
        }
    }
}

impl Discard {
    /// Drops the bytes of the request at the start of `data`: how many, and what next.
    fn skip(&mut self, data: &[u8]) -> (usize, Step) {
        let mut used = 0;
        loop {
            if self.body > 0 {
                let n = self.body.min(data.len() - used);
                self.body -= n;
                used += n;
                if self.body > 0 {
                    return (used, Step::More);
                }
            }
            if self.args == 0 {
                return (used, Step::Done);
            }
            let Some(&b) = data.get(used) else {
                return (used, Step::More);
            };
            used += 1;
            if self.header.push(b) {
                match self.header.parse() {
                    Ok(len) => {
                        self.body = len + 2;
                        self.args -= 1;
                        self.header = Header::default();
                    }
                    Err(error) => return (used, Step::Error(error)),
                }
            } else if self.header.len > resp::MAX_INLINE {
                return (used, Step::Error(ProtocolError::TooBigBulkCount));
            }
        }
    }
}
