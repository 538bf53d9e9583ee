//! The Redis protocol (RESP2) as redis-server 7.0 reads it, and the commands of the kv
//! service, with redis-server's reply bytes.
//!
//! Requests are arrays of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`) or inline lines
//! (`SET k "a b"\r\n`, split as `sdssplitargs` does). [`parse`] finds where one request
//! ends (or that it is partial, or malformed: the `-ERR Protocol error: ...` redis-server
//! sends before it closes the connection), the session collects its arguments and
//! [`execute`] runs it.
//!
//! Commands (strings only, one database; `commands.rs`): PING, ECHO, QUIT, SELECT, SET (NX, XX, GET,
//! KEEPTTL; an expiry is refused), GET, GETSET, GETDEL, SETNX, MSET, MSETNX, MGET,
//! APPEND, STRLEN, INCR, DECR, INCRBY, DECRBY, DEL, UNLINK, EXISTS, TYPE, KEYS, DBSIZE,
//! FLUSHALL, FLUSHDB, CONFIG GET. Anything else gets redis-server's unknown-command
//! error. A write that cannot get memory gets redis-server's `-OOM` error and changes
//! nothing.
//!
//! The commands themselves are in `commands.rs`; their items are re-exported here.
//!
//! Pure `alloc` code: the host tests include it by path.

use alloc::vec::Vec;

use super::table::NoMemory;

pub use super::commands::{execute, is_write, reply_bound, Flow};

/// The longest bulk string a request may announce (redis-server's `proto-max-bulk-len`).
pub const MAX_BULK: usize = 512 << 20;
/// The longest inline request, or header line, without its end (redis-server's
/// `PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE: usize = 64 << 10;
/// Room enough for any reply that carries no stored data or long client text (errors,
/// integers, `+OK`, the OOM error).
pub const SMALL_REPLY: usize = 512;

/// redis-server's reply to a write when memory is full.
pub const OOM: &[u8] = b"-OOM command not allowed when used memory > 'maxmemory'.\r\n";

/// What [`parse`] found at the start of its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parse {
    /// A complete request of `len` bytes.
    Request { len: usize, kind: Kind },
    /// The request is not complete yet.
    Partial(Partial),
    /// A malformed request: send the error and close the connection.
    Error(ProtocolError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No arguments (a blank line, `*0`, `*-1`): nothing to run.
    Empty,
    /// An inline request: its line is the input's `..line_end`, `argc` arguments.
    Inline { line_end: usize, argc: usize },
    /// An array of `argc` bulk strings.
    Multibulk { argc: usize },
}

/// Where the parser stopped in a partial request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partial {
    /// In an inline request or the count line of an array.
    Line,
    /// In the header (`$<len>\r\n`) of an argument that starts at `at`; `args` arguments,
    /// this one included, are still to come.
    Header { at: usize, args: usize },
    /// In the bytes of an argument: `len` bytes from `start`, then CRLF; `after` more
    /// arguments follow it.
    Body {
        start: usize,
        len: usize,
        after: usize,
    },
}

impl Partial {
    /// The input length from which parsing again can get further, given `have` bytes.
    pub fn wanted(self, have: usize) -> usize {
        match self {
            Partial::Body { start, len, .. } => start + len + 2,
            _ => have + 1,
        }
    }
}

/// The protocol errors of redis-server, each closing the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    TooBigInline,
    UnbalancedQuotes,
    TooBigCount,
    InvalidCount,
    TooBigBulkCount,
    /// A header that does not start with `$`: the byte it starts with.
    ExpectedDollar(u8),
    InvalidBulkLength,
}

impl ProtocolError {
    /// Appends the error reply.
    pub fn write(self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"-ERR Protocol error: ");
        let text: &[u8] = match self {
            ProtocolError::TooBigInline => b"too big inline request",
            ProtocolError::UnbalancedQuotes => b"unbalanced quotes in request",
            ProtocolError::TooBigCount => b"too big mbulk count string",
            ProtocolError::InvalidCount => b"invalid multibulk length",
            ProtocolError::TooBigBulkCount => b"too big bulk count string",
            ProtocolError::InvalidBulkLength => b"invalid bulk length",
            ProtocolError::ExpectedDollar(byte) => {
                out.extend_from_slice(b"expected '$', got '");
                // redis-server formats with %c into a C string: a NUL ends the message,
                // and line breaks become spaces.
                if byte != 0 {
                    out.push(no_line_break(byte));
                    out.push(b'\'');
                }
                b""
            }
        };
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\n");
    }
}

/// The first `\r` of `buf` from `from`, as redis-server's `strchr` finds it: a NUL byte
/// before it ends the search.
fn find_cr(buf: &[u8], from: usize) -> Option<usize> {
    let at = from + buf[from..].iter().position(|&b| b == b'\r' || b == 0)?;
    (buf[at] == b'\r').then_some(at)
}

/// Finds the end of the request at the start of `buf`, as redis-server's
/// `processInlineBuffer` and `processMultibulkBuffer` do.
pub fn parse(buf: &[u8]) -> Parse {
    match buf.first() {
        None => Parse::Partial(Partial::Line),
        Some(b'*') => parse_multibulk(buf),
        Some(_) => parse_inline(buf),
    }
}

fn parse_inline(buf: &[u8]) -> Parse {
    let newline = buf.iter().position(|&b| b == b'\n' || b == 0);
    let Some(newline) = newline.filter(|&at| buf[at] == b'\n') else {
        if buf.len() > MAX_INLINE {
            return Parse::Error(ProtocolError::TooBigInline);
        }
        return Parse::Partial(Partial::Line);
    };
    let mut line_end = newline;
    if line_end > 0 && buf[line_end - 1] == b'\r' {
        line_end -= 1;
    }
    match split_inline(&buf[..line_end], None) {
        Err(()) => Parse::Error(ProtocolError::UnbalancedQuotes),
        Ok(0) => Parse::Request {
            len: newline + 1,
            kind: Kind::Empty,
        },
        Ok(argc) => Parse::Request {
            len: newline + 1,
            kind: Kind::Inline { line_end, argc },
        },
    }
}

fn parse_multibulk(buf: &[u8]) -> Parse {
    let Some(cr) = find_cr(buf, 0) else {
        if buf.len() > MAX_INLINE {
            return Parse::Error(ProtocolError::TooBigCount);
        }
        return Parse::Partial(Partial::Line);
    };
    // The line ends with two bytes (CRLF; the second is not checked, as in redis-server).
    if cr + 2 > buf.len() {
        return Parse::Partial(Partial::Line);
    }
    let count = match parse_i64(&buf[1..cr]) {
        Some(count) if count <= i64::from(i32::MAX) => count,
        _ => return Parse::Error(ProtocolError::InvalidCount),
    };
    let mut at = cr + 2;
    if count <= 0 {
        return Parse::Request {
            len: at,
            kind: Kind::Empty,
        };
    }
    let count = count as usize;
    for i in 0..count {
        let Some(cr) = find_cr(buf, at) else {
            if buf.len() - at > MAX_INLINE {
                return Parse::Error(ProtocolError::TooBigBulkCount);
            }
            return Parse::Partial(Partial::Header {
                at,
                args: count - i,
            });
        };
        if cr + 2 > buf.len() {
            return Parse::Partial(Partial::Header {
                at,
                args: count - i,
            });
        }
        if buf[at] != b'$' {
            return Parse::Error(ProtocolError::ExpectedDollar(buf[at]));
        }
        let len = match parse_i64(&buf[at + 1..cr]) {
            Some(len) if (0..=MAX_BULK as i64).contains(&len) => len as usize,
            _ => return Parse::Error(ProtocolError::InvalidBulkLength),
        };
        let start = cr + 2;
        // The body is followed by two bytes that redis-server skips unchecked.
        if buf.len() - start < len + 2 {
            return Parse::Partial(Partial::Body {
                start,
                len,
                after: count - i - 1,
            });
        }
        at = start + len + 2;
    }
    Parse::Request {
        len: at,
        kind: Kind::Multibulk { argc: count },
    }
}

/// The arguments of a complete array request of `argc` bulk strings at the start of
/// `buf`, as `(start, end)` ranges into it.
pub fn multibulk_args(
    buf: &[u8],
    argc: usize,
    ranges: &mut Vec<(usize, usize)>,
) -> Result<(), NoMemory> {
    ranges.clear();
    ranges.try_reserve_exact(argc).map_err(|_| NoMemory)?;
    let mut at = find_cr(buf, 0).expect("a complete request") + 2;
    for _ in 0..argc {
        let cr = find_cr(buf, at).expect("a complete request");
        let len = parse_i64(&buf[at + 1..cr]).expect("a checked length") as usize;
        ranges.push((cr + 2, cr + 2 + len));
        at = cr + 2 + len + 2;
    }
    Ok(())
}

/// The arguments of an inline request whose line is `line` (found by [`parse`], `argc`
/// arguments), unquoted into `scratch`, as `(start, end)` ranges into it.
pub fn inline_args(
    line: &[u8],
    argc: usize,
    scratch: &mut Vec<u8>,
    ranges: &mut Vec<(usize, usize)>,
) -> Result<(), NoMemory> {
    scratch.clear();
    ranges.clear();
    scratch
        .try_reserve_exact(line.len())
        .map_err(|_| NoMemory)?;
    ranges.try_reserve_exact(argc).map_err(|_| NoMemory)?;
    split_inline(line, Some((scratch, ranges))).expect("a checked line");
    Ok(())
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Where [`split_inline`] writes the arguments: their bytes, and a range for each.
type SplitOut<'a> = (&'a mut Vec<u8>, &'a mut Vec<(usize, usize)>);

/// redis-server's `sdssplitargs`: words separated by blanks, `"double quotes"` with
/// `\n \r \t \b \a \xHH` escapes, `'single quotes'` with `\'`; a closing quote must be
/// followed by a blank or the end. Counts the arguments, and writes them to `out` when
/// given (which must have room: as many bytes as the line, a range per argument).
fn split_inline(line: &[u8], mut out: Option<SplitOut<'_>>) -> Result<usize, ()> {
    // The line is a C string to redis-server: a NUL ends it.
    let line = &line[..line.iter().position(|&b| b == 0).unwrap_or(line.len())];
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    fn push(out: &mut Option<SplitOut<'_>>, b: u8) {
        if let Some((scratch, _)) = out {
            scratch.push(b);
        }
    }
    let mut argc = 0;
    let mut p = 0;
    loop {
        while p < line.len() && is_space(line[p]) {
            p += 1;
        }
        if p >= line.len() {
            return Ok(argc);
        }
        let start = out.as_ref().map_or(0, |(scratch, _)| scratch.len());
        let (mut in_double, mut in_single) = (false, false);
        loop {
            let c = at(p);
            if in_double {
                if c == b'\\' && at(p + 1) == b'x' {
                    if let (Some(hi), Some(lo)) = (hex_value(at(p + 2)), hex_value(at(p + 3))) {
                        push(&mut out, hi * 16 + lo);
                        p += 4;
                        continue;
                    }
                }
                if c == b'\\' && at(p + 1) != 0 {
                    p += 1;
                    let escaped = match at(p) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    };
                    push(&mut out, escaped);
                } else if c == b'"' {
                    if at(p + 1) != 0 && !is_space(at(p + 1)) {
                        return Err(());
                    }
                    p += 1;
                    break;
                } else if c == 0 {
                    return Err(());
                } else {
                    push(&mut out, c);
                }
            } else if in_single {
                if c == b'\\' && at(p + 1) == b'\'' {
                    p += 1;
                    push(&mut out, b'\'');
                } else if c == b'\'' {
                    if at(p + 1) != 0 && !is_space(at(p + 1)) {
                        return Err(());
                    }
                    p += 1;
                    break;
                } else if c == 0 {
                    return Err(());
                } else {
                    push(&mut out, c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => {
                        if c != 0 {
                            p += 1;
                        }
                        break;
                    }
                    b'"' => in_double = true,
                    b'\'' => in_single = true,
                    _ => push(&mut out, c),
                }
            }
            p += 1;
        }
        if let Some((scratch, ranges)) = &mut out {
            ranges.push((start, scratch.len()));
        }
        argc += 1;
    }
}

/// A decimal integer as redis-server's `string2ll` reads one: optional `-`, no leading
/// zeros or `+`, no spaces, within `i64`.
pub fn parse_i64(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix(b"-") {
        Some(digits) => (true, digits),
        None => (false, text),
    };
    match digits {
        [] => return None,
        [b'0'] => return (!negative).then_some(0),
        [b'0', ..] => return None,
        _ => {}
    }
    let mut value: i64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        let digit = i64::from(b - b'0');
        value = value.checked_mul(10)?;
        value = if negative {
            value.checked_sub(digit)?
        } else {
            value.checked_add(digit)?
        };
    }
    Some(value)
}

/// The arguments of one request: ranges into the buffer that holds them.
#[derive(Clone, Copy)]
pub struct Args<'a> {
    buf: &'a [u8],
    ranges: &'a [(usize, usize)],
}

impl<'a> Args<'a> {
    pub fn new(buf: &'a [u8], ranges: &'a [(usize, usize)]) -> Args<'a> {
        Args { buf, ranges }
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn get(&self, i: usize) -> &'a [u8] {
        let (start, end) = self.ranges[i];
        &self.buf[start..end]
    }

    /// The arguments from `from` on.
    pub fn iter_from(&self, from: usize) -> impl Iterator<Item = &'a [u8]> + Clone + 'a {
        let buf = self.buf;
        self.ranges[from.min(self.ranges.len())..]
            .iter()
            .map(move |&(start, end)| &buf[start..end])
    }
}

/// `value` in decimal, written at the end of `buf` (20 bytes hold any `i64`).
pub fn format_i64(value: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    let mut rest = value.unsigned_abs();
    loop {
        at -= 1;
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if value < 0 {
        at -= 1;
        buf[at] = b'-';
    }
    &buf[at..]
}

pub(super) fn no_line_break(b: u8) -> u8 {
    match b {
        b'\r' | b'\n' => b' ',
        b => b,
    }
}
