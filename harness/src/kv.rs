//! A Redis-protocol (RESP) client, for the kv guest.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One RESP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
}

/// A Redis-protocol client over one TCP connection.
pub struct Kv {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Kv {
    pub fn new(stream: TcpStream, timeout: Duration) -> io::Result<Kv> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Kv {
            stream,
            buf: Vec::new(),
        })
    }

    /// Queues one command (send it with [`Kv::send_raw`]).
    pub fn encode(out: &mut Vec<u8>, args: &[&str]) {
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends one command and reads its reply.
    pub fn call(&mut self, args: &[&str]) -> io::Result<Reply> {
        let mut out = Vec::new();
        Kv::encode(&mut out, args);
        self.send_raw(&out)?;
        self.reply()
    }

    /// Reads the next reply.
    pub fn reply(&mut self) -> io::Result<Reply> {
        loop {
            if let Some((reply, used)) = parse_reply(&self.buf)? {
                self.buf.drain(..used);
                return Ok(reply);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Parses one reply from the front of `buf`: `None` until it is complete.
fn parse_reply(buf: &[u8]) -> io::Result<Option<(Reply, usize)>> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = String::from_utf8_lossy(&buf[1..end]).into_owned();
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad reply line {line:?}"),
        )
    };
    let reply = match buf.first() {
        Some(b'+') => Reply::Simple(line),
        Some(b'-') => Reply::Error(line),
        Some(b':') => Reply::Int(line.parse().map_err(|_| bad())?),
        Some(b'$') => {
            let len: i64 = line.parse().map_err(|_| bad())?;
            if len < 0 {
                return Ok(Some((Reply::Bulk(None), end + 2)));
            }
            let start = end + 2;
            let stop = start + len as usize;
            if buf.len() < stop + 2 {
                return Ok(None);
            }
            return Ok(Some((
                Reply::Bulk(Some(buf[start..stop].to_vec())),
                stop + 2,
            )));
        }
        _ => return Err(bad()),
    };
    Ok(Some((reply, end + 2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies() {
        assert_eq!(
            parse_reply(b"+OK\r\n").unwrap(),
            Some((Reply::Simple("OK".into()), 5))
        );
        assert_eq!(
            parse_reply(b":42\r\n:1").unwrap(),
            Some((Reply::Int(42), 5))
        );
        assert_eq!(parse_reply(b"$3\r\nab").unwrap(), None);
        assert_eq!(
            parse_reply(b"$3\r\nabc\r\n").unwrap(),
            Some((Reply::Bulk(Some(b"abc".to_vec())), 9))
        );
        assert_eq!(
            parse_reply(b"$-1\r\n").unwrap(),
            Some((Reply::Bulk(None), 5))
        );
        assert_eq!(parse_reply(b"+O").unwrap(), None);
        assert!(parse_reply(b"?x\r\n").is_err());
    }
}
