//! The kv service's commands, with redis-server 7.0's reply bytes: the command table
//! (names and arities as redis-server has them), [`execute`], the bound on a reply
//! ([`reply_bound`]) that lets a session make room before it runs a request, and the
//! handlers. The protocol they are read with is in `resp.rs`.
//!
//! Pure `alloc` code: the host tests include it by path.

use alloc::vec::Vec;

use super::resp::{format_i64, no_line_break, parse_i64, Args, MAX_BULK, OOM, SMALL_REPLY};
use super::table::{NoMemory, Table};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Close the connection once the replies are sent (QUIT).
    Close,
}

type Handler = fn(&Args<'_>, &mut Table, &mut Vec<u8>) -> Result<(), NoMemory>;

struct Command {
    /// Lower case, as redis-server names it in errors (`config|get` for a subcommand).
    name: &'static str,
    /// redis-server's arity: `n` exactly n arguments (the name included), `-n` at least n.
    arity: i32,
    run: Handler,
}

const fn command(name: &'static str, arity: i32, run: Handler) -> Command {
    Command { name, arity, run }
}

const COMMANDS: &[Command] = &[
    command("get", 2, get),
    command("set", -3, set),
    command("ping", -1, ping),
    command("echo", 2, echo),
    command("select", 2, select),
    command("incr", 2, |args, store, out| incr_by(args, store, out, 1)),
    command("decr", 2, |args, store, out| incr_by(args, store, out, -1)),
    command("incrby", 3, incrby),
    command("decrby", 3, decrby),
    command("mset", -3, mset),
    command("msetnx", -3, msetnx),
    command("mget", -2, mget),
    command("setnx", 3, setnx),
    command("getset", 3, getset),
    command("getdel", 2, getdel),
    command("append", 3, append),
    command("strlen", 2, strlen),
    command("del", -2, del),
    command("unlink", -2, del),
    command("exists", -2, exists),
    command("type", 2, type_of),
    command("keys", 2, keys),
    command("dbsize", 1, dbsize),
    command("flushall", -1, flush),
    command("flushdb", -1, flush),
];

/// The commands that may change the store: what `aof=on` logs.
const WRITE_COMMANDS: &[&str] = &[
    "set", "setnx", "getset", "getdel", "mset", "msetnx", "append", "incr", "decr", "incrby",
    "decrby", "del", "unlink", "flushall", "flushdb",
];

/// Whether `args` names a command that may change the store.
pub fn is_write(args: &Args<'_>) -> bool {
    let name = args.get(0);
    WRITE_COMMANDS
        .iter()
        .any(|w| w.as_bytes().eq_ignore_ascii_case(name))
}

/// CONFIG, a command with subcommands.
const CONFIG: Command = command("config", -2, |_, _, _| Ok(()));
const CONFIG_SUBCOMMANDS: &[Command] = &[command("config|get", -3, config_get)];

/// The configuration parameters CONFIG GET knows, with the values of a server without
/// persistence (`redis-benchmark` asks for `save` and `appendonly` when it starts).
const CONFIG_VALUES: [(&[u8], &[u8]); 2] = [(b"appendonly", b"no"), (b"save", b"")];

fn lookup<'c>(table: &'c [Command], name: &[u8], prefix: &str) -> Option<&'c Command> {
    table.iter().find(|command| {
        let bare = &command.name.as_bytes()[prefix.len()..];
        bare.eq_ignore_ascii_case(name)
    })
}

/// The command `args` names, or the error redis-server gives when there is none or the
/// arguments do not fit its arity.
fn resolve(args: &Args<'_>, out: &mut Vec<u8>) -> Option<&'static Command> {
    let name = args.get(0);
    let command = if CONFIG.name.as_bytes().eq_ignore_ascii_case(name) {
        match args.len() {
            1 => &CONFIG,
            _ => match lookup(CONFIG_SUBCOMMANDS, args.get(1), "config|") {
                Some(sub) => sub,
                None => {
                    out.extend_from_slice(b"-ERR unknown subcommand '");
                    c_text(out, args.get(1), 128);
                    out.extend_from_slice(b"'. Try CONFIG HELP.\r\n");
                    return None;
                }
            },
        }
    } else {
        match lookup(COMMANDS, name, "") {
            Some(command) => command,
            None => {
                unknown_command(out, args);
                return None;
            }
        }
    };
    let argc = args.len() as i64;
    let arity = i64::from(command.arity);
    if (arity > 0 && argc != arity) || argc < -arity {
        arity_error(out, command.name);
        return None;
    }
    Some(command)
}

/// Runs one request (`args` not empty), appending its reply to `out`, which must have
/// room for [`reply_bound`] bytes.
pub fn execute(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Flow {
    // QUIT is answered before any lookup, whatever its arguments (redis-server 7.0).
    if args.get(0).eq_ignore_ascii_case(b"quit") {
        out.extend_from_slice(b"+OK\r\n");
        return Flow::Close;
    }
    let Some(command) = resolve(args, out) else {
        return Flow::Continue;
    };
    let mark = out.len();
    if (command.run)(args, store, out).is_err() {
        // Nothing changed: the reply is the OOM error alone.
        out.truncate(mark);
        out.extend_from_slice(OOM);
    }
    Flow::Continue
}

/// Bytes of a bulk reply's framing, an integer reply, or a nil, at most.
const FRAMING: usize = 32;

fn value_bound(store: &Table, key: &[u8]) -> usize {
    FRAMING + store.get(key).map_or(0, <[u8]>::len)
}

/// At most how many bytes the reply to `args` takes (run against `store` as it is): a
/// reply is either its data or an error, never both.
pub fn reply_bound(args: &Args<'_>, store: &Table) -> usize {
    let name = args.get(0);
    let is = |command: &str| name.eq_ignore_ascii_case(command.as_bytes());
    let data = if args.len() < 2 {
        0
    } else if is("get") || is("getset") || is("getdel") || is("set") {
        value_bound(store, args.get(1))
    } else if is("mget") {
        FRAMING
            + args
                .iter_from(1)
                .map(|key| value_bound(store, key))
                .sum::<usize>()
    } else if is("echo") || is("ping") {
        FRAMING + args.get(1).len()
    } else if is("keys") {
        let pattern = args.get(1);
        let keys = store.keys().filter(|key| keys_match(pattern, key));
        FRAMING + keys.map(|key| FRAMING + key.len()).sum::<usize>()
    } else if is("config") {
        // CONFIG GET answers with the parameter names as given.
        let names = args.iter_from(2).map(|name| FRAMING * 2 + name.len());
        FRAMING + names.sum::<usize>()
    } else {
        0
    };
    data.max(SMALL_REPLY)
}

// The replies.

fn ok(out: &mut Vec<u8>) {
    out.extend_from_slice(b"+OK\r\n");
}

fn nil(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// `-ERR <message>`.
fn error(out: &mut Vec<u8>, message: &str) {
    out.extend_from_slice(b"-ERR ");
    out.extend_from_slice(message.as_bytes());
    out.extend_from_slice(b"\r\n");
}

const NOT_AN_INTEGER: &str = "value is not an integer or out of range";
const SYNTAX: &str = "syntax error";

fn arity_error(out: &mut Vec<u8>, command: &str) {
    out.extend_from_slice(b"-ERR wrong number of arguments for '");
    out.extend_from_slice(command.as_bytes());
    out.extend_from_slice(b"' command\r\n");
}

/// Client text as redis-server puts it in an error line with `%.<max>s`: up to the
/// first NUL, at most `max` bytes, line breaks as spaces. Returns the bytes written.
fn c_text(out: &mut Vec<u8>, text: &[u8], max: usize) -> usize {
    let text = &text[..text.iter().position(|&b| b == 0).unwrap_or(text.len())];
    let text = &text[..text.len().min(max)];
    out.extend(text.iter().map(|&b| no_line_break(b)));
    text.len()
}

/// `-ERR unknown command 'NAME', with args beginning with: 'a' 'b' `: the arguments
/// until their text reaches 128 bytes, as redis-server 7 writes it.
fn unknown_command(out: &mut Vec<u8>, args: &Args<'_>) {
    out.extend_from_slice(b"-ERR unknown command '");
    c_text(out, args.get(0), 128);
    out.extend_from_slice(b"', with args beginning with: ");
    let mut written = 0;
    for arg in args.iter_from(1) {
        if written >= 128 {
            break;
        }
        out.push(b'\'');
        written += c_text(out, arg, 128 - written) + 3;
        out.extend_from_slice(b"' ");
    }
    out.extend_from_slice(b"\r\n");
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

fn bulk_or_nil(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(value) => bulk(out, value),
        None => nil(out),
    }
}

// The commands. Each has its arity checked; on `Err(NoMemory)` its reply is replaced by
// the OOM error, so a command changes the store only once it cannot fail any more.

fn get(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    bulk_or_nil(out, store.get(args.get(1)));
    Ok(())
}

fn set(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    // The options as redis-server's parseExtendedStringArgumentsOrReply takes them.
    let (mut nx, mut xx, mut get, mut keep_ttl) = (false, false, false, false);
    let mut expiry: Option<(&[u8], &[u8])> = None;
    let mut j = 3;
    while j < args.len() {
        let option = args.get(j);
        let has_next = j + 1 < args.len();
        let is = |name: &str| option.eq_ignore_ascii_case(name.as_bytes());
        if is("nx") && !xx {
            nx = true;
        } else if is("xx") && !nx {
            xx = true;
        } else if is("get") {
            get = true;
        } else if is("keepttl") && expiry.is_none() {
            keep_ttl = true;
        } else if (is("ex") || is("px") || is("exat") || is("pxat"))
            && !keep_ttl
            && expiry.is_none_or(|(unit, _)| unit.eq_ignore_ascii_case(option))
            && has_next
        {
            expiry = Some((option, args.get(j + 1)));
            j += 1;
        } else {
            error(out, SYNTAX);
            return Ok(());
        }
        j += 1;
    }
    if let Some((unit, value)) = expiry {
        let seconds = unit.eq_ignore_ascii_case(b"ex") || unit.eq_ignore_ascii_case(b"exat");
        match parse_i64(value) {
            None => error(out, NOT_AN_INTEGER),
            Some(time) if time <= 0 || (seconds && time > i64::MAX / 1000) => {
                error(out, "invalid expire time in 'set' command")
            }
            // Keys never expire in this store: refuse rather than keep the key forever.
            Some(_) => error(out, "expiring keys are not supported by this server"),
        }
        return Ok(());
    }
    let (key, value) = (args.get(1), args.get(2));
    let old = store.get(key);
    let found = old.is_some();
    if get {
        bulk_or_nil(out, old);
    }
    if (nx && found) || (xx && !found) {
        if !get {
            nil(out);
        }
        return Ok(());
    }
    store.set(key, value)?;
    if !get {
        ok(out);
    }
    Ok(())
}

fn ping(args: &Args<'_>, _: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    match args.len() {
        1 => out.extend_from_slice(b"+PONG\r\n"),
        2 => bulk(out, args.get(1)),
        _ => arity_error(out, "ping"),
    }
    Ok(())
}

fn echo(args: &Args<'_>, _: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    bulk(out, args.get(1));
    Ok(())
}

/// There is one database, 0: other indexes get the error of a server with
/// `databases 1`.
fn select(args: &Args<'_>, _: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    match parse_i64(args.get(1)) {
        None => error(out, NOT_AN_INTEGER),
        Some(index) if i32::try_from(index).is_err() => error(
            out,
            "value is out of range, value must between -2147483648 and 2147483647",
        ),
        Some(0) => ok(out),
        Some(_) => error(out, "DB index is out of range"),
    }
    Ok(())
}

fn incr_by(
    args: &Args<'_>,
    store: &mut Table,
    out: &mut Vec<u8>,
    delta: i64,
) -> Result<(), NoMemory> {
    let key = args.get(1);
    let current = match store.get(key) {
        None => 0,
        Some(value) => match parse_i64(value) {
            Some(current) => current,
            None => {
                error(out, NOT_AN_INTEGER);
                return Ok(());
            }
        },
    };
    let Some(next) = current.checked_add(delta) else {
        error(out, "increment or decrement would overflow");
        return Ok(());
    };
    let mut digits = [0u8; 20];
    store.set(key, format_i64(next, &mut digits))?;
    integer(out, next);
    Ok(())
}

fn incrby(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    match parse_i64(args.get(2)) {
        Some(delta) => incr_by(args, store, out, delta),
        None => {
            error(out, NOT_AN_INTEGER);
            Ok(())
        }
    }
}

fn decrby(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    match parse_i64(args.get(2)) {
        Some(i64::MIN) => error(out, "decrement would overflow"),
        Some(delta) => return incr_by(args, store, out, -delta),
        None => error(out, NOT_AN_INTEGER),
    }
    Ok(())
}

/// The key/value pairs of MSET and MSETNX, or their arity error.
fn pairs<'a>(
    args: &Args<'a>,
    out: &mut Vec<u8>,
    name: &str,
) -> Option<impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone + 'a> {
    if args.len() % 2 == 0 {
        arity_error(out, name);
        return None;
    }
    let keys = args.iter_from(1).step_by(2);
    let values = args.iter_from(2).step_by(2);
    Some(keys.zip(values))
}

fn mset(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    if let Some(pairs) = pairs(args, out, "mset") {
        store.set_all(pairs)?;
        ok(out);
    }
    Ok(())
}

fn msetnx(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    if let Some(pairs) = pairs(args, out, "msetnx") {
        if pairs.clone().any(|(key, _)| store.contains(key)) {
            integer(out, 0);
        } else {
            store.set_all(pairs)?;
            integer(out, 1);
        }
    }
    Ok(())
}

fn mget(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    array(out, args.len() - 1);
    for key in args.iter_from(1) {
        bulk_or_nil(out, store.get(key));
    }
    Ok(())
}

fn setnx(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    if store.contains(args.get(1)) {
        integer(out, 0);
    } else {
        store.set(args.get(1), args.get(2))?;
        integer(out, 1);
    }
    Ok(())
}

fn getset(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    bulk_or_nil(out, store.get(args.get(1)));
    store.set(args.get(1), args.get(2))
}

fn getdel(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    bulk_or_nil(out, store.get(args.get(1)));
    store.remove(args.get(1));
    Ok(())
}

fn append(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    let (key, suffix) = (args.get(1), args.get(2));
    let current = store.get(key).map_or(0, <[u8]>::len);
    if current + suffix.len() > MAX_BULK {
        error(
            out,
            "string exceeds maximum allowed size (proto-max-bulk-len)",
        );
        return Ok(());
    }
    let len = store.append(key, suffix)?;
    integer(out, len as i64);
    Ok(())
}

fn strlen(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    integer(out, store.get(args.get(1)).map_or(0, <[u8]>::len) as i64);
    Ok(())
}

fn del(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    let removed = args.iter_from(1).filter(|key| store.remove(key)).count();
    integer(out, removed as i64);
    Ok(())
}

fn exists(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    let found = args.iter_from(1).filter(|key| store.contains(key)).count();
    integer(out, found as i64);
    Ok(())
}

fn type_of(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    match store.contains(args.get(1)) {
        true => out.extend_from_slice(b"+string\r\n"),
        false => out.extend_from_slice(b"+none\r\n"),
    }
    Ok(())
}

/// KEYS pattern: the matching keys in table order (not redis-server's order).
fn keys(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    let pattern = args.get(1);
    let matching = || store.keys().filter(|key| keys_match(pattern, key));
    array(out, matching().count());
    for key in matching() {
        bulk(out, key);
    }
    Ok(())
}

fn dbsize(_: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    integer(out, store.len() as i64);
    Ok(())
}

/// FLUSHALL and FLUSHDB [ASYNC|SYNC]: the same with one database; always synchronous.
fn flush(args: &Args<'_>, store: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    let mode_ok = match args.len() {
        1 => true,
        2 => {
            args.get(1).eq_ignore_ascii_case(b"sync") || args.get(1).eq_ignore_ascii_case(b"async")
        }
        _ => false,
    };
    if !mode_ok {
        error(out, SYNTAX);
        return Ok(());
    }
    store.clear();
    ok(out);
    Ok(())
}

/// CONFIG GET parameter...: the known parameters that match (a name, case-insensitive,
/// answered as given; or a glob pattern, answered with the parameter's own name), each
/// once.
fn config_get(args: &Args<'_>, _: &mut Table, out: &mut Vec<u8>) -> Result<(), NoMemory> {
    let mut found: [Option<&[u8]>; CONFIG_VALUES.len()] = [None; CONFIG_VALUES.len()];
    for asked in args.iter_from(2) {
        let glob = asked.iter().any(|b| matches!(b, b'[' | b'*' | b'?'));
        for (i, (name, _)) in CONFIG_VALUES.iter().enumerate() {
            if found[i].is_some() {
                continue;
            }
            if !glob && asked.eq_ignore_ascii_case(name) {
                found[i] = Some(asked);
            } else if glob && string_match_nocase(asked, name) {
                found[i] = Some(name);
            }
        }
    }
    array(out, found.iter().flatten().count() * 2);
    for (name, (_, value)) in found.iter().zip(CONFIG_VALUES) {
        if let Some(name) = name {
            bulk(out, name);
            bulk(out, value);
        }
    }
    Ok(())
}

/// Whether KEYS `pattern` lists `key`: `*` alone lists every key, the empty one too
/// (which the glob itself does not match).
fn keys_match(pattern: &[u8], key: &[u8]) -> bool {
    pattern == b"*" || string_match(pattern, key)
}

/// redis-server's glob matching (`stringmatchlen`): `*`, `?`, `[...]` with ranges and
/// `^`, `\` escapes.
pub fn string_match(pattern: &[u8], text: &[u8]) -> bool {
    let mut skip_longer = false;
    glob(pattern, text, false, &mut skip_longer)
}

fn string_match_nocase(pattern: &[u8], text: &[u8]) -> bool {
    let mut skip_longer = false;
    glob(pattern, text, true, &mut skip_longer)
}

/// A port of `stringmatchlen_impl`: bytes compare as C `char`s (signed), and reading
/// past the end of the pattern sees the NUL that ends it in redis-server.
fn glob(mut p: &[u8], mut s: &[u8], nocase: bool, skip_longer: &mut bool) -> bool {
    let at = |p: &[u8], i: usize| p.get(i).copied().unwrap_or(0);
    let fold = |b: u8| if nocase { b.to_ascii_lowercase() } else { b };
    while !p.is_empty() && !s.is_empty() {
        match p[0] {
            b'*' => {
                while p.len() > 1 && p[1] == b'*' {
                    p = &p[1..];
                }
                if p.len() == 1 {
                    return true;
                }
                while !s.is_empty() {
                    if glob(&p[1..], s, nocase, skip_longer) {
                        return true;
                    }
                    if *skip_longer {
                        return false;
                    }
                    s = &s[1..];
                }
                *skip_longer = true;
                return false;
            }
            b'?' => s = &s[1..],
            b'[' => {
                p = &p[1..];
                let not = at(p, 0) == b'^';
                if not {
                    p = &p[1..];
                }
                let mut matched = false;
                // `p` may run out: redis-server then steps back onto the last byte, so
                // that the common step after the match leaves the pattern empty.
                let mut back = false;
                loop {
                    if at(p, 0) == b'\\' && p.len() >= 2 {
                        p = &p[1..];
                        if fold(p[0]) == fold(s[0]) {
                            matched = true;
                        }
                    } else if at(p, 0) == b']' && !p.is_empty() {
                        break;
                    } else if p.is_empty() {
                        back = true;
                        break;
                    } else if p.len() >= 3 && p[1] == b'-' {
                        let (mut start, mut end) = (p[0] as i8, p[2] as i8);
                        let mut c = s[0] as i8;
                        if start > end {
                            core::mem::swap(&mut start, &mut end);
                        }
                        if nocase {
                            start = (start as u8).to_ascii_lowercase() as i8;
                            end = (end as u8).to_ascii_lowercase() as i8;
                            c = (c as u8).to_ascii_lowercase() as i8;
                        }
                        p = &p[2..];
                        if c >= start && c <= end {
                            matched = true;
                        }
                    } else if fold(p[0]) == fold(s[0]) {
                        matched = true;
                    }
                    p = &p[1..];
                }
                if not {
                    matched = !matched;
                }
                if !matched {
                    return false;
                }
                s = &s[1..];
                if back {
                    // The pattern is used up; the loop's step would go past its end.
                    if s.is_empty() {
                        return true;
                    }
                    return false;
                }
            }
            b'\\' if p.len() >= 2 => {
                p = &p[1..];
                if fold(p[0]) != fold(s[0]) {
                    return false;
                }
                s = &s[1..];
            }
            c => {
                if fold(c) != fold(s[0]) {
                    return false;
                }
                s = &s[1..];
            }
        }
        p = &p[1..];
        if s.is_empty() {
            while !p.is_empty() && p[0] == b'*' {
                p = &p[1..];
            }
            break;
        }
    }
    p.is_empty() && s.is_empty()
}
