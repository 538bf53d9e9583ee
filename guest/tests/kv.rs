//! Host-side tests of the kv workload's pure parts: the RESP parser, the commands and
//! the hash table, included from `src/` by path (the driver and smoltcp glue in
//! `kv.rs` only run under the VMM).

extern crate alloc;

#[path = "../src/workloads/kv/resp.rs"]
mod resp;
#[path = "../src/workloads/kv/table.rs"]
mod table;

use std::collections::HashMap;

use resp::{format_i64, parse, parse_i64, serve, Served};
use table::Table;

/// A request as `redis-cli` encodes it: an array of bulk strings.
fn command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    out
}

/// Runs `input` on `store`; the replies as text, and what `serve` said.
fn run(store: &mut Table, input: &[u8]) -> (String, Served) {
    let mut out = Vec::new();
    let served = serve(input, store, &mut out);
    (String::from_utf8(out).unwrap(), served)
}

/// The reply to one complete request.
fn reply(store: &mut Table, args: &[&str]) -> String {
    let input = command(args);
    let (out, served) = run(store, &input);
    assert_eq!(served.consumed, input.len(), "{args:?}");
    out
}

#[test]
fn parses_a_multibulk_request() {
    let input = command(&["SET", "key", "va\r\nlue"]);
    let mut args = Vec::new();
    assert_eq!(parse(&input, &mut args), Ok(Some(input.len())));
    assert_eq!(args, [&b"SET"[..], b"key", b"va\r\nlue"]);
}

#[test]
fn a_partial_request_is_incomplete_at_every_split() {
    let input = command(&["SET", "key:000000000042", "xxx"]);
    for cut in 0..input.len() {
        let mut args = Vec::new();
        assert_eq!(parse(&input[..cut], &mut args), Ok(None), "cut at {cut}");
    }
}

#[test]
fn parses_inline_requests() {
    let mut args = Vec::new();
    assert_eq!(parse(b"PING\r\n", &mut args), Ok(Some(6)));
    assert_eq!(args, [&b"PING"[..]]);
    args.clear();
    assert_eq!(parse(b"  set  k \t v\nGET", &mut args), Ok(Some(13)));
    assert_eq!(args, [&b"set"[..], b"k", b"v"]);
    args.clear();
    assert_eq!(parse(b"PING", &mut args), Ok(None));
    assert_eq!(parse(b"\r\n", &mut args), Ok(Some(2)));
    assert!(args.is_empty());
}

#[test]
fn empty_requests_are_skipped() {
    let mut store = Table::new();
    let (out, served) = run(&mut store, b"*0\r\n\r\n*-1\r\nPING\r\n");
    assert_eq!(out, "+PONG\r\n");
    assert_eq!(served.consumed, 17);
    assert!(!served.close);
}

#[test]
fn malformed_requests_are_protocol_errors_that_close() {
    for input in [
        &b"*x\r\n"[..],
        b"*2\r\n:1\r\n",
        b"*1\r\n$-5\r\n",
        b"*1\r\n$3\r\nGETXX",
        b"*1\r\n$99999999999\r\n",
        b"*99999999999\r\n",
    ] {
        let mut store = Table::new();
        let (out, served) = run(&mut store, input);
        assert!(out.starts_with("-ERR Protocol error: "), "{out}");
        assert!(served.close);
        assert_eq!(served.consumed, input.len());
    }
    let mut store = Table::new();
    let long = vec![b'a'; resp::MAX_INLINE + 1];
    let (out, served) = run(&mut store, &long);
    assert_eq!(out, "-ERR Protocol error: too big inline request\r\n");
    assert!(served.close);
}

#[test]
fn pipelined_requests_all_run_and_a_partial_one_waits() {
    let mut store = Table::new();
    let mut input = Vec::new();
    for i in 0..16 {
        input.extend(command(&["SET", &format!("k{i}"), &format!("v{i}")]));
    }
    input.extend(command(&["GET", "k7"]));
    input.extend(b"PING\r\n");
    let complete = input.len();
    let partial = command(&["GET", "k3"]);
    input.extend(&partial[..partial.len() - 3]);

    let (out, served) = run(&mut store, &input);
    assert_eq!(
        out,
        format!("{}$2\r\nv7\r\n+PONG\r\n", "+OK\r\n".repeat(16))
    );
    assert_eq!(served.consumed, complete);
    assert!(!served.close);

    // The rest arrives: the partial request completes.
    let mut rest = input[complete..].to_vec();
    rest.extend(&partial[partial.len() - 3..]);
    let (out, served) = run(&mut store, &rest);
    assert_eq!(out, "$2\r\nv3\r\n");
    assert_eq!(served.consumed, rest.len());
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
    input.extend(b"PING\r\n");
    let mut store = Table::new();
    let mut buffer = Vec::new();
    let mut replies = String::new();
    for &byte in &input {
        buffer.push(byte);
        let (out, served) = run(&mut store, &buffer);
        buffer.drain(..served.consumed);
        replies += &out;
    }
    assert!(buffer.is_empty());
    assert_eq!(replies, "+OK\r\n:2\r\n$1\r\n2\r\n:1\r\n+PONG\r\n");
}

#[test]
fn commands_reply_as_redis_does() {
    let mut s = Table::new();
    assert_eq!(reply(&mut s, &["PING"]), "+PONG\r\n");
    assert_eq!(reply(&mut s, &["ping", "hello"]), "$5\r\nhello\r\n");
    assert_eq!(reply(&mut s, &["GET", "k"]), "$-1\r\n");
    assert_eq!(reply(&mut s, &["set", "k", "v"]), "+OK\r\n");
    assert_eq!(reply(&mut s, &["GET", "k"]), "$1\r\nv\r\n");
    assert_eq!(reply(&mut s, &["SET", "empty", ""]), "+OK\r\n");
    assert_eq!(reply(&mut s, &["GET", "empty"]), "$0\r\n\r\n");
    assert_eq!(reply(&mut s, &["EXISTS", "k", "nope", "k"]), ":2\r\n");
    assert_eq!(reply(&mut s, &["DBSIZE"]), ":2\r\n");
    assert_eq!(reply(&mut s, &["INCR", "n"]), ":1\r\n");
    assert_eq!(reply(&mut s, &["INCR", "n"]), ":2\r\n");
    assert_eq!(reply(&mut s, &["GET", "n"]), "$1\r\n2\r\n");
    assert_eq!(
        reply(&mut s, &["INCR", "k"]),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(reply(&mut s, &["SET", "neg", "-10"]), "+OK\r\n");
    assert_eq!(reply(&mut s, &["INCR", "neg"]), ":-9\r\n");
    assert_eq!(
        reply(&mut s, &["SET", "max", "9223372036854775807"]),
        "+OK\r\n"
    );
    assert_eq!(
        reply(&mut s, &["INCR", "max"]),
        "-ERR increment or decrement would overflow\r\n"
    );
    assert_eq!(reply(&mut s, &["MSET", "a", "1", "b", "2"]), "+OK\r\n");
    assert_eq!(reply(&mut s, &["GET", "b"]), "$1\r\n2\r\n");
    assert_eq!(reply(&mut s, &["DEL", "a", "b", "a", "zz"]), ":2\r\n");
    assert_eq!(reply(&mut s, &["DBSIZE"]), ":5\r\n");
    assert_eq!(
        reply(&mut s, &["CONFIG", "GET", "save"]),
        "*2\r\n$4\r\nsave\r\n$0\r\n\r\n"
    );
    assert_eq!(
        reply(&mut s, &["config", "get", "APPENDONLY"]),
        "*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n"
    );
    assert_eq!(reply(&mut s, &["CONFIG", "GET", "maxmemory"]), "*0\r\n");
    assert_eq!(
        reply(&mut s, &["FLUSHALL"]),
        "-ERR unknown command 'FLUSHALL'\r\n"
    );
    assert_eq!(
        reply(&mut s, &["a\r\nb"]),
        "-ERR unknown command 'a  b'\r\n"
    );
}

#[test]
fn wrong_arity_is_an_error_not_a_crash() {
    let mut s = Table::new();
    for (args, name) in [
        (&["GET"][..], "get"),
        (&["GET", "a", "b"], "get"),
        (&["SET", "a"], "set"),
        (&["INCR"], "incr"),
        (&["DEL"], "del"),
        (&["EXISTS"], "exists"),
        (&["DBSIZE", "x"], "dbsize"),
        (&["MSET", "a"], "mset"),
        (&["MSET", "a", "1", "b"], "mset"),
        (&["PING", "a", "b"], "ping"),
        (&["CONFIG"], "config"),
    ] {
        assert_eq!(
            reply(&mut s, args),
            format!("-ERR wrong number of arguments for '{name}' command\r\n"),
            "{args:?}"
        );
    }
    assert_eq!(
        reply(&mut s, &["SET", "a", "1", "EX", "5"]),
        "-ERR syntax error\r\n"
    );
    assert_eq!(reply(&mut s, &["DBSIZE"]), ":0\r\n");
}

#[test]
fn quit_replies_and_closes() {
    let mut s = Table::new();
    let mut input = command(&["QUIT"]);
    let quit_len = input.len();
    input.extend(command(&["PING"]));
    let (out, served) = run(&mut s, &input);
    assert_eq!(out, "+OK\r\n");
    assert_eq!(
        served,
        Served {
            consumed: quit_len,
            close: true
        }
    );
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
        match rng.next() % 4 {
            0 | 1 => {
                let value = step.to_string().repeat((step % 5) as usize).into_bytes();
                table.insert(&key, &value);
                model.insert(key, value);
            }
            2 => assert_eq!(table.remove(&key), model.remove(&key).is_some()),
            _ => assert_eq!(table.get(&key), model.get(&key).map(Vec::as_slice)),
        }
        assert_eq!(table.len(), model.len());
    }
    for (key, value) in &model {
        assert_eq!(table.get(key), Some(value.as_slice()));
        assert!(table.contains(key));
    }
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
}

#[test]
fn table_keys_are_bytes() {
    let mut table = Table::new();
    table.insert(b"", b"empty key");
    table.insert(b"\0\xff", b"binary");
    assert_eq!(table.get(b""), Some(&b"empty key"[..]));
    assert_eq!(table.get(b"\0\xff"), Some(&b"binary"[..]));
    assert_eq!(table.get(b"\0"), None);
    assert_ne!(table::hash(b"ab"), table::hash(b"ba"));
}
