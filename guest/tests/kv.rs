//! Host-side tests of the kv workload's pure parts: the RESP parser and the commands,
//! the session that bounds a connection's buffers, and the hash table, included from
//! `src/` by path (the driver and smoltcp glue in `kv.rs` only run under the VMM).
//! Expected replies are the bytes redis-server 7.0 sends (the end-to-end test
//! `kv_replies_match_redis_server_byte_for_byte` compares against a real one).
//!
//! The memory limits are tested in `oom.rs`, over the guest's own allocator; here the
//! data limit is never reached.

extern crate alloc;

#[path = "../src/workloads/kv/commands.rs"]
mod commands;
#[path = "../src/workloads/kv/resp.rs"]
mod resp;
#[path = "../src/workloads/kv/session.rs"]
mod session;
#[path = "../src/workloads/kv/table.rs"]
mod table;

/// The system allocator has no data limit.
mod heap {
    pub fn for_data<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

use std::collections::HashMap;

use commands::string_match;
use resp::{format_i64, parse, parse_i64, Kind, Parse, Partial, ProtocolError};
use session::{Session, OUTPUT_HIGH};
use table::Table;

const OOM: &str = "-OOM command not allowed when used memory > 'maxmemory'.\r\n";

/// A request as `redis-cli` encodes it: an array of bulk strings.
fn command(args: &[&str]) -> Vec<u8> {
    command_bytes(&args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>())
}

fn command_bytes(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Feeds `input` to `session` in chunks of `chunk` bytes as the kv driver does (replies
/// are taken out before more input goes in); the replies, and whether the session
/// ended the connection.
fn drive(session: &mut Session, store: &mut Table, input: &[u8], chunk: usize) -> (Vec<u8>, bool) {
    let mut replies = Vec::new();
    let mut at = 0;
    loop {
        let out = session.output().to_vec();
        replies.extend_from_slice(&out);
        session.sent(out.len());
        if session.closing() {
            return (replies, true);
        }
        if session.resume(store) {
            continue;
        }
        if at >= input.len() {
            return (replies, false);
        }
        let end = (at + chunk).min(input.len());
        let n = session.receive(&input[at..end], store);
        assert!(
            n > 0 || !session.output().is_empty(),
            "the session took nothing and has nothing to send"
        );
        at += n;
    }
}

/// Runs `input` on a fresh session over `store`: the replies as text, and whether the
/// connection was closed.
fn run(store: &mut Table, input: &[u8]) -> (String, bool) {
    let mut session = Session::new(1 << 20);
    let (out, closed) = drive(&mut session, store, input, 16 << 10);
    (String::from_utf8(out).unwrap(), closed)
}

/// The reply to one complete request.
fn reply(store: &mut Table, args: &[&str]) -> String {
    let (out, closed) = run(store, &command(args));
    assert!(!closed, "{args:?} closed the connection");
    out
}

#[test]
fn finds_where_a_multibulk_request_ends() {
    let input = command(&["SET", "key", "va\r\nlue"]);
    assert_eq!(
        parse(&input),
        Parse::Request {
            len: input.len(),
            kind: Kind::Multibulk { argc: 3 }
        }
    );
    let mut ranges = Vec::new();
    resp::multibulk_args(&input, 3, &mut ranges).unwrap();
    let args: Vec<&[u8]> = ranges.iter().map(|&(s, e)| &input[s..e]).collect();
    assert_eq!(args, [&b"SET"[..], b"key", b"va\r\nlue"]);
}

#[test]
fn a_partial_request_is_incomplete_at_every_split() {
    let input = command(&["SET", "key:000000000042", "xxx"]);
    for cut in 0..input.len() {
        assert!(
            matches!(parse(&input[..cut]), Parse::Partial(_)),
            "cut at {cut}: {:?}",
            parse(&input[..cut])
        );
    }
    // Where it stopped, for a request that has to be dropped as it arrives.
    assert_eq!(
        parse(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10\r\nabc"),
        Parse::Partial(Partial::Body {
            start: 25,
            len: 10,
            after: 0
        })
    );
    assert_eq!(
        parse(b"*3\r\n$3\r\nSET\r\n$1"),
        Parse::Partial(Partial::Header { at: 13, args: 2 })
    );
}

#[test]
fn inline_requests_split_as_redis_does() {
    let mut store = Table::new();
    let (out, _) = run(
        &mut store,
        b"  set  k \t v\nGET k\r\nSET q \"a b\\x41\\n\" \r\nGET q\r\nSET 'x\\'y' ok\r\nGET \"x'y\"\r\n",
    );
    assert_eq!(
        out,
        "+OK\r\n$1\r\nv\r\n+OK\r\n$5\r\na bA\n\r\n+OK\r\n$2\r\nok\r\n"
    );
    // A quote opened inside a word, the escapes that are no escapes.
    let (out, _) = run(
        &mut store,
        b"SET \"a\" b\"c\"\r\nGET a\r\nECHO \"\\xZZ\\q\"\r\n",
    );
    assert_eq!(out, "+OK\r\n$2\r\nbc\r\n$4\r\nxZZq\r\n");
    // Blank lines are no requests.
    let (out, closed) = run(&mut store, b"\r\n \t \r\n\nPING\r\n");
    assert_eq!((out.as_str(), closed), ("+PONG\r\n", false));
    for bad in [
        &b"ECHO \"abc\r\n"[..],
        b"ECHO \"abc\"def\r\n",
        b"ECHO 'a\r\n",
    ] {
        let (out, closed) = run(&mut store, bad);
        assert_eq!(out, "-ERR Protocol error: unbalanced quotes in request\r\n");
        assert!(closed);
    }
}

#[test]
fn malformed_requests_get_redis_protocol_errors_and_close() {
    for (input, error) in [
        (&b"*x\r\n"[..], "invalid multibulk length"),
        (b"*\r\n", "invalid multibulk length"),
        (b"*2147483648\r\n", "invalid multibulk length"),
        (b"*2\r\n:1\r\n", "expected '$', got ':'"),
        (b"*1\r\n\r\n", "expected '$', got ' '"),
        (b"*1\r\n$-5\r\n", "invalid bulk length"),
        (b"*1\r\n$x\r\n", "invalid bulk length"),
        (b"*1\r\n$536870913\r\n", "invalid bulk length"),
    ] {
        let mut store = Table::new();
        let (out, closed) = run(&mut store, input);
        assert_eq!(
            out,
            format!("-ERR Protocol error: {error}\r\n"),
            "{:?}",
            String::from_utf8_lossy(input)
        );
        assert!(closed);
    }
    let mut store = Table::new();
    let long = vec![b'a'; resp::MAX_INLINE + 1];
    let (out, closed) = run(&mut store, &long);
    assert_eq!(out, "-ERR Protocol error: too big inline request\r\n");
    assert!(closed);
    let mut long = b"*1\r\n$".to_vec();
    long.resize(resp::MAX_INLINE + 10, b'1');
    let (out, _) = run(&mut store, &long);
    assert_eq!(out, "-ERR Protocol error: too big bulk count string\r\n");
    let mut error = Vec::new();
    ProtocolError::ExpectedDollar(0).write(&mut error);
    assert_eq!(error, b"-ERR Protocol error: expected '$', got '\r\n");
}

#[test]
fn the_two_bytes_after_an_argument_are_not_checked() {
    // redis-server takes `PIN`, skips `Gx`, and reads on from there (inline).
    let mut store = Table::new();
    let (out, closed) = run(&mut store, b"*1\r\n$3\r\nPINGxx*1\r\n$4\r\nPING\r\n");
    assert_eq!(
        out,
        "-ERR unknown command 'PIN', with args beginning with: \r\n\
         -ERR unknown command 'x*1', with args beginning with: \r\n\
         -ERR unknown command '$4', with args beginning with: \r\n+PONG\r\n"
    );
    assert!(!closed);
}

#[test]
fn pipelined_requests_all_run_and_a_partial_one_waits() {
    let mut store = Table::new();
    let mut session = Session::new(1 << 20);
    let mut input = Vec::new();
    for i in 0..16 {
        input.extend(command(&["SET", &format!("k{i}"), &format!("v{i}")]));
    }
    input.extend(command(&["GET", "k7"]));
    input.extend(b"PING\r\n");
    let partial = command(&["GET", "k3"]);
    input.extend(&partial[..partial.len() - 3]);

    let (out, closed) = drive(&mut session, &mut store, &input, 1 << 20);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("{}$2\r\nv7\r\n+PONG\r\n", "+OK\r\n".repeat(16))
    );
    assert!(!closed);
    // The rest arrives: the partial request completes.
    let (out, _) = drive(&mut session, &mut store, &partial[partial.len() - 3..], 1);
    assert_eq!(out, b"$2\r\nv3\r\n");
}

#[test]
fn byte_by_byte_arrival_gives_the_same_replies() {
    let mut input = Vec::new();
    for args in [
        &["SET", "a", "1"][..],
        &["INCR", "a"],
        &["GET", "a"],
        &["DEL", "a", "b"],
    ] {
        input.extend(command(args));
    }
    input.extend(b"PING\r\nECHO \"x y\"\r\n");
    let mut store = Table::new();
    let mut session = Session::new(1 << 20);
    let (out, _) = drive(&mut session, &mut store, &input, 1);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "+OK\r\n:2\r\n$1\r\n2\r\n:1\r\n+PONG\r\n$3\r\nx y\r\n"
    );
}

#[test]
fn commands_reply_as_redis_does() {
    let mut s = Table::new();
    let mut check = |args: &[&str], expected: &str| {
        assert_eq!(reply(&mut s, args), expected, "{args:?}");
    };
    check(&["PING"], "+PONG\r\n");
    check(&["ping", "hello"], "$5\r\nhello\r\n");
    check(&["ECHO", ""], "$0\r\n\r\n");
    check(&["SELECT", "0"], "+OK\r\n");
    check(&["SELECT", "1"], "-ERR DB index is out of range\r\n");
    check(&["SELECT", "-1"], "-ERR DB index is out of range\r\n");
    check(
        &["SELECT", "x"],
        "-ERR value is not an integer or out of range\r\n",
    );
    check(
        &["SELECT", "99999999999"],
        "-ERR value is out of range, value must between -2147483648 and 2147483647\r\n",
    );
    check(&["GET", "k"], "$-1\r\n");
    check(&["set", "k", "v"], "+OK\r\n");
    check(&["GET", "k"], "$1\r\nv\r\n");
    check(&["SET", "", ""], "+OK\r\n");
    check(&["GET", ""], "$0\r\n\r\n");
    check(&["EXISTS", "k", "nope", "k", ""], ":3\r\n");
    check(&["TYPE", "k"], "+string\r\n");
    check(&["TYPE", "nope"], "+none\r\n");
    check(&["DBSIZE"], ":2\r\n");
    check(&["INCR", "n"], ":1\r\n");
    check(&["INCRBY", "n", "41"], ":42\r\n");
    check(&["DECR", "n"], ":41\r\n");
    check(&["DECRBY", "n", "-1"], ":42\r\n");
    check(&["GET", "n"], "$2\r\n42\r\n");
    check(
        &["INCR", "k"],
        "-ERR value is not an integer or out of range\r\n",
    );
    check(
        &["INCRBY", "n", "1.5"],
        "-ERR value is not an integer or out of range\r\n",
    );
    check(
        &["DECRBY", "n", "-9223372036854775808"],
        "-ERR decrement would overflow\r\n",
    );
    check(&["SET", "max", "9223372036854775807"], "+OK\r\n");
    check(
        &["INCR", "max"],
        "-ERR increment or decrement would overflow\r\n",
    );
    check(&["DECR", "max"], ":9223372036854775806\r\n");
    check(&["SET", "m", "-0"], "+OK\r\n");
    check(
        &["INCR", "m"],
        "-ERR value is not an integer or out of range\r\n",
    );
    check(&["MSET", "a", "1", "b", "2", "a", "3"], "+OK\r\n");
    check(
        &["MGET", "a", "b", "nope"],
        "*3\r\n$1\r\n3\r\n$1\r\n2\r\n$-1\r\n",
    );
    check(&["MSETNX", "a", "1", "c", "2"], ":0\r\n");
    check(&["MSETNX", "c", "1", "d", "2"], ":1\r\n");
    check(&["SETNX", "c", "x"], ":0\r\n");
    check(&["SETNX", "e", "x"], ":1\r\n");
    check(&["GETSET", "e", "y"], "$1\r\nx\r\n");
    check(&["GETSET", "f", "y"], "$-1\r\n");
    check(&["GETDEL", "f"], "$1\r\ny\r\n");
    check(&["GETDEL", "f"], "$-1\r\n");
    check(&["APPEND", "g", "ab"], ":2\r\n");
    check(&["APPEND", "g", "cd"], ":4\r\n");
    check(&["STRLEN", "g"], ":4\r\n");
    check(&["STRLEN", "nope"], ":0\r\n");
    check(&["DEL", "a", "b", "a", "zz"], ":2\r\n");
    check(&["UNLINK", "c", "d"], ":2\r\n");
    check(&["KEYS", "[g]*"], "*1\r\n$1\r\ng\r\n");
    check(&["KEYS", "nothing*"], "*0\r\n");
    check(&["CONFIG", "GET", "save"], "*2\r\n$4\r\nsave\r\n$0\r\n\r\n");
    check(
        &["config", "get", "APPENDONLY"],
        "*2\r\n$10\r\nAPPENDONLY\r\n$2\r\nno\r\n",
    );
    check(
        &["CONFIG", "GET", "save", "SAVE", "appendonl?"],
        "*4\r\n$10\r\nappendonly\r\n$2\r\nno\r\n$4\r\nsave\r\n$0\r\n\r\n",
    );
    check(&["CONFIG", "GET", "maxmemory"], "*0\r\n");
    check(
        &["CONFIG", "SET", "a", "b"],
        "-ERR unknown subcommand 'SET'. Try CONFIG HELP.\r\n",
    );
    check(&["FLUSHALL", "x"], "-ERR syntax error\r\n");
    check(&["FLUSHDB", "ASYNC"], "+OK\r\n");
    check(&["DBSIZE"], ":0\r\n");
}

#[test]
fn set_takes_redis_options() {
    let mut s = Table::new();
    let mut check = |args: &[&str], expected: &str| {
        assert_eq!(reply(&mut s, args), expected, "{args:?}");
    };
    check(&["SET", "k", "v", "NX"], "+OK\r\n");
    check(&["SET", "k", "w", "nx"], "$-1\r\n");
    check(&["SET", "k", "w", "XX", "GET"], "$1\r\nv\r\n");
    check(&["SET", "new", "w", "XX"], "$-1\r\n");
    check(&["SET", "new", "w", "GET", "NX"], "$-1\r\n");
    check(&["GET", "new"], "$1\r\nw\r\n");
    check(&["SET", "k", "v", "NX", "NX"], "$-1\r\n");
    check(&["SET", "k", "v", "KEEPTTL"], "+OK\r\n");
    check(&["SET", "k", "v", "NX", "XX"], "-ERR syntax error\r\n");
    check(&["SET", "k", "v", "EX"], "-ERR syntax error\r\n");
    check(
        &["SET", "k", "v", "EX", "1", "PX", "5"],
        "-ERR syntax error\r\n",
    );
    check(
        &["SET", "k", "v", "KEEPTTL", "EX", "1"],
        "-ERR syntax error\r\n",
    );
    check(&["SET", "k", "v", "FOO"], "-ERR syntax error\r\n");
    check(
        &["SET", "k", "v", "EX", "x"],
        "-ERR value is not an integer or out of range\r\n",
    );
    check(
        &["SET", "k", "v", "PX", "0"],
        "-ERR invalid expire time in 'set' command\r\n",
    );
    check(
        &["SET", "k", "v", "EX", "9223372036854776"],
        "-ERR invalid expire time in 'set' command\r\n",
    );
    // Keys never expire here: an expiry is refused, and nothing is stored.
    check(
        &["SET", "k2", "v", "EX", "10"],
        "-ERR expiring keys are not supported by this server\r\n",
    );
    check(&["EXISTS", "k2"], ":0\r\n");
}

#[test]
fn errors_name_the_command_and_arguments_as_redis_does() {
    let mut s = Table::new();
    assert_eq!(
        reply(&mut s, &["FOO"]),
        "-ERR unknown command 'FOO', with args beginning with: \r\n"
    );
    assert_eq!(
        reply(&mut s, &["foo", "a", "", "b c"]),
        "-ERR unknown command 'foo', with args beginning with: 'a' '' 'b c' \r\n"
    );
    assert_eq!(
        reply(&mut s, &["a\r\nb", "x\ny"]),
        "-ERR unknown command 'a  b', with args beginning with: 'x y' \r\n"
    );
    // Text stops at a NUL, as a C string would.
    let (out, _) = run(&mut s, &command_bytes(&[b"fo\0oo", b"x\0y"]));
    assert_eq!(
        out,
        "-ERR unknown command 'fo', with args beginning with: 'x' \r\n"
    );
    // The name is cut at 128 bytes; the arguments stop once their text reaches 128.
    let long = "n".repeat(200);
    let a130 = "a".repeat(130);
    let (a120, b10) = ("a".repeat(120), "b".repeat(10));
    assert_eq!(
        reply(&mut s, &[&long, &a130, "b"]),
        format!(
            "-ERR unknown command '{}', with args beginning with: '{}' \r\n",
            "n".repeat(128),
            "a".repeat(128)
        )
    );
    assert_eq!(
        reply(&mut s, &["BAR", &a120, &b10, "c"]),
        format!(
            "-ERR unknown command 'BAR', with args beginning with: '{a120}' '{}' \r\n",
            "b".repeat(5)
        )
    );
    for (args, name) in [
        (&["GET"][..], "get"),
        (&["GET", "a", "b"], "get"),
        (&["SET", "a"], "set"),
        (&["INCR"], "incr"),
        (&["INCRBY", "a"], "incrby"),
        (&["DEL"], "del"),
        (&["EXISTS"], "exists"),
        (&["DBSIZE", "x"], "dbsize"),
        (&["MSET", "a"], "mset"),
        (&["MSET", "a", "1", "b"], "mset"),
        (&["MSETNX", "a"], "msetnx"),
        (&["MGET"], "mget"),
        (&["PING", "a", "b"], "ping"),
        (&["ECHO"], "echo"),
        (&["ECHO", "a", "b"], "echo"),
        (&["SELECT"], "select"),
        (&["KEYS"], "keys"),
        (&["TYPE"], "type"),
        (&["CONFIG"], "config"),
        (&["CONFIG", "GET"], "config|get"),
        (&["config", "get"], "config|get"),
    ] {
        assert_eq!(
            reply(&mut s, args),
            format!("-ERR wrong number of arguments for '{name}' command\r\n"),
            "{args:?}"
        );
    }
    assert_eq!(reply(&mut s, &["DBSIZE"]), ":0\r\n");
}

#[test]
fn quit_replies_and_closes() {
    let mut s = Table::new();
    let mut input = command(&["QUIT", "whatever"]);
    input.extend(command(&["PING"]));
    let mut session = Session::new(1 << 20);
    let (out, closed) = drive(&mut session, &mut s, &input, 4096);
    assert_eq!(out, b"+OK\r\n");
    assert!(closed);
    // The socket takes the next connection: a fresh start.
    session.reset();
    let (out, closed) = drive(&mut session, &mut s, b"PING\r\n", 4096);
    assert_eq!((&out[..], closed), (&b"+PONG\r\n"[..], false));
}

#[test]
fn integers_read_and_print_as_redis_does() {
    for (text, value) in [
        ("0", Some(0)),
        ("-1", Some(-1)),
        ("42", Some(42)),
        ("9223372036854775807", Some(i64::MAX)),
        ("-9223372036854775808", Some(i64::MIN)),
        ("9223372036854775808", None),
        ("-0", None),
        ("007", None),
        ("+1", None),
        (" 1", None),
        ("1 ", None),
        ("", None),
        ("-", None),
        ("1.5", None),
    ] {
        assert_eq!(parse_i64(text.as_bytes()), value, "{text:?}");
    }
    for value in [0, 7, -7, 10, i64::MAX, i64::MIN] {
        let mut buf = [0u8; 20];
        assert_eq!(format_i64(value, &mut buf), value.to_string().as_bytes());
    }
}

#[test]
fn globs_match_as_redis_does() {
    for (pattern, text, expected) in [
        // redis-server's glob does not match the empty string with `*` (KEYS * lists
        // the empty key through a shortcut).
        ("*", "", false),
        ("a*", "a", true),
        ("*", "abc", true),
        ("a*", "abc", true),
        ("*c", "abc", true),
        ("a*b*c", "aXbYc", true),
        ("a?c", "abc", true),
        ("a?c", "ac", false),
        ("[abc]", "b", true),
        ("[^abc]", "b", false),
        ("[a-c]x", "bx", true),
        ("[c-a]x", "bx", true),
        ("[a-]", "a", true),
        ("a[", "a[", false),
        ("a\\[", "a[", true),
        ("\\", "\\", true),
        ("[\\]]", "]", true),
        ("key:*", "key:000001", true),
        ("key:*", "other", false),
        ("**a", "ba", true),
    ] {
        assert_eq!(
            string_match(pattern.as_bytes(), text.as_bytes()),
            expected,
            "{pattern:?} on {text:?}"
        );
    }
}

#[test]
fn replies_never_outgrow_their_bound() {
    let mut s = Table::new();
    let big = "v".repeat(5000);
    reply(&mut s, &["SET", "big", &big]);
    reply(&mut s, &["MSET", "a", &big, "b", "1"]);
    for args in [
        &["GET", "big"][..],
        &["MGET", "big", "a", "b", "nope"],
        &["GETSET", "a", "x"],
        &["SET", "big", "y", "GET"],
        &["GETDEL", "b"],
        &["ECHO", &big],
        &["PING", &big],
        &["KEYS", "*"],
        &["CONFIG", "GET", &big, "save", "appendonly"],
        &[&big, &big, &big],
    ] {
        let input = command(args);
        let Parse::Request {
            kind: Kind::Multibulk { argc },
            ..
        } = parse(&input)
        else {
            panic!("a complete request");
        };
        let mut ranges = Vec::new();
        resp::multibulk_args(&input, argc, &mut ranges).unwrap();
        let args = resp::Args::new(&input, &ranges);
        let bound = resp::reply_bound(&args, &s);
        let mut out = Vec::new();
        resp::execute(&args, &mut s, &mut out);
        assert!(out.len() <= bound, "{} > {bound}", out.len());
    }
}

#[test]
fn replies_wait_in_bounded_output() {
    // Pipelined GETs of a big value: the session stops running requests once the
    // output is full, and goes on as it drains.
    let mut store = Table::new();
    let value = "x".repeat(10_000);
    store.set(b"big", value.as_bytes()).unwrap();
    let mut input = Vec::new();
    for _ in 0..100 {
        input.extend(command(&["GET", "big"]));
    }
    let mut session = Session::new(1 << 20);
    assert_eq!(session.receive(&input, &mut store), input.len());
    assert!(session.output().len() < OUTPUT_HIGH + 11_000);
    assert_eq!(
        session.receive(b"PING\r\n", &mut store),
        0,
        "full output takes no input"
    );
    let mut replies = Vec::new();
    loop {
        let out = session.output().to_vec();
        assert!(out.len() < OUTPUT_HIGH + 11_000);
        replies.extend_from_slice(&out);
        session.sent(out.len());
        if !session.resume(&mut store) {
            break;
        }
    }
    assert_eq!(
        replies,
        format!("$10000\r\n{value}\r\n").repeat(100).as_bytes()
    );
}

#[test]
fn a_request_above_the_size_limit_is_dropped_with_an_oom_error() {
    let mut store = Table::new();
    let mut session = Session::new(100 << 10);
    let big = vec![b'z'; 200 << 10];
    let mut input = command(&["SET", "a", "1"]);
    input.extend(command_bytes(&[b"SET", b"big", &big]));
    input.extend(command_bytes(&[b"MSET", b"x", &big, b"y", &big]));
    input.extend(b"PING\r\n");
    input.extend(command(&["GET", "a"]));
    // Any chunking: the framing is followed through headers and bodies cut anywhere.
    for chunk in [1, 7, 4096, 1 << 20] {
        let (out, closed) = drive(&mut session, &mut store, &input, chunk);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("+OK\r\n{OOM}{OOM}+PONG\r\n$1\r\n1\r\n"),
            "chunks of {chunk}"
        );
        assert!(!closed);
        assert!(!store.contains(b"big") && !store.contains(b"x"));
    }
    // A malformed header inside a dropped request is still a protocol error.
    let mut input = b"*4\r\n$3\r\nSET\r\n$3\r\nbig\r\n$204800\r\n".to_vec();
    input.extend(&big);
    input.extend(b"\r\n#1\r\nx\r\n");
    let (out, closed) = drive(&mut session, &mut store, &input, 4096);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "-ERR Protocol error: expected '$', got '#'\r\n"
    );
    assert!(closed);
}

/// A small deterministic generator for the table model test.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn table_matches_a_model_under_random_operations() {
    let mut table = Table::new();
    let mut model: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for step in 0..200_000u64 {
        // Few distinct keys so that inserts, overwrites and removals all happen, long
        // probe runs included.
        let key = format!("key:{}", rng.next() % 5000).into_bytes();
        match rng.next() % 6 {
            0 | 1 => {
                let value = step.to_string().repeat((step % 5) as usize).into_bytes();
                table.set(&key, &value).unwrap();
                model.insert(key, value);
            }
            2 => {
                let suffix = step.to_string().into_bytes();
                let len = table.append(&key, &suffix).unwrap();
                let value = model.entry(key).or_default();
                value.extend_from_slice(&suffix);
                assert_eq!(len, value.len());
            }
            3 => {
                let other = format!("key:{}", rng.next() % 5000).into_bytes();
                let pairs = [
                    (&key[..], &b"p1"[..]),
                    (&other[..], b"p2"),
                    (&key[..], b"p3"),
                ];
                table.set_all(pairs.iter().copied()).unwrap();
                model.insert(other, b"p2".to_vec());
                model.insert(key, b"p3".to_vec());
            }
            4 => assert_eq!(table.remove(&key), model.remove(&key).is_some()),
            _ => assert_eq!(table.get(&key), model.get(&key).map(Vec::as_slice)),
        }
        assert_eq!(table.len(), model.len());
    }
    for (key, value) in &model {
        assert_eq!(table.get(key), Some(value.as_slice()));
        assert!(table.contains(key));
    }
    assert_eq!(table.keys().count(), model.len());
    // Empty it completely: every removal must keep the others reachable.
    let keys: Vec<_> = model.keys().cloned().collect();
    for (i, key) in keys.iter().enumerate() {
        assert!(table.remove(key));
        assert!(!table.remove(key));
        if i % 97 == 0 {
            for other in &keys[i + 1..] {
                assert!(table.contains(other));
            }
        }
    }
    assert_eq!(table.len(), 0);
    table.set(b"again", b"1").unwrap();
    table.clear();
    assert_eq!((table.len(), table.get(b"again")), (0, None));
}

#[test]
fn table_keys_are_bytes() {
    let mut table = Table::new();
    table.set(b"", b"empty key").unwrap();
    table.set(b"\0\xff", b"binary").unwrap();
    assert_eq!(table.get(b""), Some(&b"empty key"[..]));
    assert_eq!(table.get(b"\0\xff"), Some(&b"binary"[..]));
    assert_eq!(table.get(b"\0"), None);
    assert_ne!(table::hash(b"ab"), table::hash(b"ba"));
}

/// Records the commands a session logs, as `aof=on` would append them; `room` false
/// plays a full log.
struct Recorder {
    logged: Vec<Vec<String>>,
    room: bool,
}

impl session::Journal for Recorder {
    fn has_room(&self, _args: &resp::Args<'_>) -> bool {
        self.room
    }
    fn record(&mut self, args: &resp::Args<'_>) {
        let args = (0..args.len())
            .map(|i| String::from_utf8_lossy(args.get(i)).into_owned())
            .collect();
        self.logged.push(args);
    }
    fn sync(&mut self) {}
}

#[test]
fn the_journal_gets_each_write_that_changed_the_store_before_its_reply() {
    let mut store = Table::new();
    let mut session = Session::new(1 << 20);
    let mut log = Recorder {
        logged: Vec::new(),
        room: true,
    };
    let mut input = Vec::new();
    for args in [
        &["SET", "a", "1"][..],
        &["GET", "a"],
        &["INCR", "a"],
        &["SET", "s", "text"],
        &["INCR", "s"],
        &["set", "a"],
        &["NOSUCH", "x"],
        &["DEL", "s", "zz"],
        &["MSET", "m", "1", "n", "2"],
        &["PING"],
        &["FLUSHALL"],
    ] {
        input.extend(command(args));
    }
    assert_eq!(
        session.receive_logged(&input, &mut store, &mut log),
        input.len()
    );
    let logged: Vec<String> = log.logged.iter().map(|a| a.join(" ")).collect();
    assert_eq!(
        logged,
        [
            "SET a 1",
            "INCR a",
            "SET s text",
            "DEL s zz",
            "MSET m 1 n 2",
            "FLUSHALL"
        ],
        "errors (INCR of text, SET without value, unknown commands) and reads are not logged"
    );

    // A full log: the write is refused, with redis-server's words, and changes nothing.
    log.room = false;
    let set = command(&["SET", "k", "v"]);
    session.sent(session.output().len());
    assert_eq!(
        session.receive_logged(&set, &mut store, &mut log),
        set.len()
    );
    assert_eq!(
        session.output(),
        session::AOF_FULL,
        "a full log refuses the write"
    );
    assert_eq!(reply(&mut store, &["EXISTS", "k"]), ":0\r\n");
    assert_eq!(log.logged.len(), 6);
}
