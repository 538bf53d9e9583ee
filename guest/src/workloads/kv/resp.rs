//! The Redis protocol (RESP2) subset that `redis-cli` and `redis-benchmark` speak by
//! default, and the commands of the kv service.
//!
//! Requests are arrays of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`) or inline
//! lines (`PING\r\n`). [`serve`] runs every complete request in its input (pipelining)
//! and leaves a partial one for later. Commands: PING, SET, GET, INCR, DEL, EXISTS,
//! DBSIZE, MSET, CONFIG GET, QUIT; anything else gets `-ERR unknown command '<name>'`.
//! A malformed request gets `-ERR Protocol error: ...` and the connection is closed, as
//! Redis does.
//!
//! Pure `alloc` code: the host tests include it by path.

use alloc::vec::Vec;

use super::table::Table;

/// The largest bulk string accepted (a value or key), in bytes.
pub const MAX_BULK: usize = 16 << 20;
/// The most arguments one request may have.
pub const MAX_ARGS: usize = 1 << 20;
/// The longest inline request or header line without its end, in bytes.
pub const MAX_INLINE: usize = 64 << 10;

/// What [`serve`] did with its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// Bytes of input consumed (complete requests); the rest is a partial request.
    pub consumed: usize,
    /// The connection must be closed once the replies are sent (QUIT, protocol error).
    pub close: bool,
}

/// Runs every complete request at the start of `input` against `store`, appending the
/// replies to `out`.
pub fn serve(input: &[u8], store: &mut Table, out: &mut Vec<u8>) -> Served {
    let mut consumed = 0;
    let mut args = Vec::new();
    loop {
        args.clear();
        match parse(&input[consumed..], &mut args) {
            Ok(Some(used)) => {
                consumed += used;
                if args.is_empty() {
                    continue;
                }
                if execute(&args, store, out) == Flow::Close {
                    return Served {
                        consumed,
                        close: true,
                    };
                }
            }
            Ok(None) => {
                return Served {
                    consumed,
                    close: false,
                }
            }
            Err(message) => {
                error(out, message.as_bytes());
                return Served {
                    consumed: input.len(),
                    close: true,
                };
            }
        }
    }
}

/// Parses one request from the start of `buf` into `args`: `Ok(Some(bytes used))`, with
/// `args` empty for an empty request (a blank line, `*0`); `Ok(None)` when the request
/// is not complete yet; `Err(message)` for a malformed one.
pub fn parse<'a>(buf: &'a [u8], args: &mut Vec<&'a [u8]>) -> Result<Option<usize>, &'static str> {
    match buf.first() {
        None => Ok(None),
        Some(b'*') => parse_multibulk(buf, args),
        Some(_) => parse_inline(buf, args),
    }
}

fn parse_inline<'a>(
    buf: &'a [u8],
    args: &mut Vec<&'a [u8]>,
) -> Result<Option<usize>, &'static str> {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > MAX_INLINE {
            return Err("Protocol error: too big inline request");
        }
        return Ok(None);
    };
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    args.extend(
        line.split(|b| matches!(b, b' ' | b'\t' | b'\r'))
            .filter(|word| !word.is_empty()),
    );
    Ok(Some(end + 1))
}

/// A `\r\n`-terminated line starting at `at`: its text and the offset after it.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, &'static str> {
    let rest = &buf[at..];
    match rest.windows(2).position(|w| w == b"\r\n") {
        Some(end) => Ok(Some((&rest[..end], at + end + 2))),
        None if rest.len() > MAX_INLINE => Err("Protocol error: too big header line"),
        None => Ok(None),
    }
}

fn parse_multibulk<'a>(
    buf: &'a [u8],
    args: &mut Vec<&'a [u8]>,
) -> Result<Option<usize>, &'static str> {
    let Some((header, mut at)) = line(buf, 1)? else {
        return Ok(None);
    };
    let count = parse_i64(header).ok_or("Protocol error: invalid multibulk length")?;
    if count <= 0 {
        return Ok(Some(at));
    }
    if count as u64 > MAX_ARGS as u64 {
        return Err("Protocol error: invalid multibulk length");
    }
    for _ in 0..count {
        match buf.get(at) {
            None => return Ok(None),
            Some(b'$') => {}
            Some(_) => return Err("Protocol error: expected '$'"),
        }
        let Some((header, start)) = line(buf, at + 1)? else {
            return Ok(None);
        };
        let len = parse_i64(header)
            .filter(|len| (0..=MAX_BULK as i64).contains(len))
            .ok_or("Protocol error: invalid bulk length")? as usize;
        let end = start + len;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err("Protocol error: bulk string not followed by CRLF");
        }
        args.push(&buf[start..end]);
        at = end + 2;
    }
    Ok(Some(at))
}

/// A decimal integer as Redis reads one: optional `-`, no leading zeros or `+`, no
/// spaces, within `i64`.
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

/// Runs one request (`args` not empty).
fn execute(args: &[&[u8]], store: &mut Table, out: &mut Vec<u8>) -> Flow {
    let name = args[0];
    let argc = args.len();
    let is = |command: &str| name.eq_ignore_ascii_case(command.as_bytes());
    if is("get") {
        if argc != 2 {
            return arity(out, "get");
        }
        match store.get(args[1]) {
            Some(value) => bulk(out, value),
            None => out.extend_from_slice(b"$-1\r\n"),
        }
    } else if is("set") {
        match argc {
            3 => {
                store.insert(args[1], args[2]);
                out.extend_from_slice(b"+OK\r\n");
            }
            0..3 => return arity(out, "set"),
            _ => error(out, b"syntax error"),
        }
    } else if is("ping") {
        match argc {
            1 => out.extend_from_slice(b"+PONG\r\n"),
            2 => bulk(out, args[1]),
            _ => return arity(out, "ping"),
        }
    } else if is("incr") {
        if argc != 2 {
            return arity(out, "incr");
        }
        let current = match store.get(args[1]) {
            None => Some(0),
            Some(value) => parse_i64(value),
        };
        let Some(current) = current else {
            error(out, b"value is not an integer or out of range");
            return Flow::Continue;
        };
        let Some(next) = current.checked_add(1) else {
            error(out, b"increment or decrement would overflow");
            return Flow::Continue;
        };
        let mut digits = [0u8; 20];
        store.insert(args[1], format_i64(next, &mut digits));
        integer(out, next);
    } else if is("mset") {
        if argc < 3 || argc % 2 == 0 {
            return arity(out, "mset");
        }
        for pair in args[1..].chunks_exact(2) {
            store.insert(pair[0], pair[1]);
        }
        out.extend_from_slice(b"+OK\r\n");
    } else if is("del") {
        if argc < 2 {
            return arity(out, "del");
        }
        let removed = args[1..].iter().filter(|key| store.remove(key)).count();
        integer(out, removed as i64);
    } else if is("exists") {
        if argc < 2 {
            return arity(out, "exists");
        }
        let found = args[1..].iter().filter(|key| store.contains(key)).count();
        integer(out, found as i64);
    } else if is("dbsize") {
        if argc != 1 {
            return arity(out, "dbsize");
        }
        integer(out, store.len() as i64);
    } else if is("config") {
        config(args, out);
    } else if is("quit") {
        out.extend_from_slice(b"+OK\r\n");
        return Flow::Close;
    } else {
        out.extend_from_slice(b"-ERR unknown command '");
        printable(out, name);
        out.extend_from_slice(b"'\r\n");
    }
    Flow::Continue
}

/// `CONFIG GET parameter...`: `redis-benchmark` asks for `save` and `appendonly` when it
/// starts. Those two get the values of a server without persistence; any other
/// parameter matches nothing.
fn config(args: &[&[u8]], out: &mut Vec<u8>) {
    if args.len() < 2 {
        arity(out, "config");
        return;
    }
    if !args[1].eq_ignore_ascii_case(b"get") {
        out.extend_from_slice(b"-ERR unknown subcommand '");
        printable(out, args[1]);
        out.extend_from_slice(b"'. Try CONFIG HELP.\r\n");
        return;
    }
    if args.len() < 3 {
        arity(out, "config|get");
        return;
    }
    const KNOWN: [(&[u8], &[u8]); 2] = [(b"save", b""), (b"appendonly", b"no")];
    let found: Vec<_> = KNOWN
        .iter()
        .filter(|(name, _)| args[2..].iter().any(|p| p.eq_ignore_ascii_case(name)))
        .collect();
    array(out, found.len() * 2);
    for (name, value) in found {
        bulk(out, name);
        bulk(out, value);
    }
}

fn arity(out: &mut Vec<u8>, command: &str) -> Flow {
    out.extend_from_slice(b"-ERR wrong number of arguments for '");
    out.extend_from_slice(command.as_bytes());
    out.extend_from_slice(b"' command\r\n");
    Flow::Continue
}

fn error(out: &mut Vec<u8>, message: &[u8]) {
    out.extend_from_slice(b"-ERR ");
    out.extend_from_slice(message);
    out.extend_from_slice(b"\r\n");
}

/// At most 128 bytes of client text for an error line, without line breaks.
fn printable(out: &mut Vec<u8>, text: &[u8]) {
    out.extend(text.iter().take(128).map(|&b| match b {
        b'\r' | b'\n' => b' ',
        b => b,
    }));
}

fn integer(out: &mut Vec<u8>, value: i64) {
    let mut digits = [0u8; 20];
    out.push(b':');
    out.extend_from_slice(format_i64(value, &mut digits));
    out.extend_from_slice(b"\r\n");
}

fn array(out: &mut Vec<u8>, len: usize) {
    let mut digits = [0u8; 20];
    out.push(b'*');
    out.extend_from_slice(format_i64(len as i64, &mut digits));
    out.extend_from_slice(b"\r\n");
}

fn bulk(out: &mut Vec<u8>, value: &[u8]) {
    let mut digits = [0u8; 20];
    out.push(b'$');
    out.extend_from_slice(format_i64(value.len() as i64, &mut digits));
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
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
