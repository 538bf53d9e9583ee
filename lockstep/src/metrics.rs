//! The metrics endpoint (`--metrics ADDR:PORT`): `GET /metrics` answers the engine's
//! metrics ([`engine::replication::metrics`], listed in docs/metrics.md) in the Prometheus
//! text format, version 0.0.4. Any other path is 404, any other method on `/metrics` 405.
//!
//! The HTTP part is a std `TcpListener`, each connection on a thread of its own (at most
//! [`crate::api::MAX_CLIENTS`] at once), requests parsed with `httparse` as the control socket's ([`crate::api`]) are: a
//! scrape is one small GET every few seconds, and an async runtime and web framework would
//! bring a dependency tree, threads and allocations of their own into a VMM process for
//! it. Nothing here waits for the guest or the replication roles: a scrape reads atomics
//! and the shared status. One request per connection (`Connection: close`); a client that
//! does not send its request within [`IO_TIMEOUT`] is dropped.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

use engine::info;
use engine::replication::metrics;

use crate::api::ApiError;

/// Largest request head accepted.
const MAX_REQUEST: usize = 16 << 10;

/// How long a client may take to send its request, or to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The metrics endpoint, served on a thread of its own until the process ends.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
}

impl MetricsServer {
    /// The address served (with the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// `--metrics ADDR:PORT`: served from now on (`None`: no endpoint).
pub fn serve(addr: Option<&str>) -> Result<Option<MetricsServer>, ApiError> {
    let server = addr.map(start).transpose()?;
    if let Some(s) = &server {
        info!("metrics at http://{}/metrics", s.local_addr());
    }
    Ok(server)
}

/// Listens on `addr` (`ADDR:PORT`; a host name resolves to its first address) and serves
/// `GET /metrics` there.
pub fn start(addr: &str) -> Result<MetricsServer, ApiError> {
    let fail = |why: String| ApiError::Metrics {
        addr: addr.to_string(),
        why,
    };
    let target = addr
        .to_socket_addrs()
        .map_err(|e| fail(format!("not an address ({e}); expected ADDR:PORT")))?
        .next()
        .ok_or_else(|| fail("resolves to no address; expected ADDR:PORT".into()))?;
    let listener = TcpListener::bind(target).map_err(|e| fail(format!("cannot listen: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| fail(format!("cannot listen: {e}")))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            crate::api::each_on_its_thread(
                listener.incoming(),
                "metrics endpoint",
                |s| {
                    answer(
                        s,
                        Some(plain(503, "", "too many scrapes at once; try again")),
                    )
                },
                |s, _| answer(s, None),
            )
        })
        .map_err(|e| fail(format!("cannot start its thread: {e}")))?;
    Ok(MetricsServer { addr: local })
}

/// One answer: status code, reason, extra headers, content type and body.
#[derive(Debug, PartialEq)]
struct Reply {
    code: u16,
    headers: &'static str,
    content_type: &'static str,
    body: String,
}

fn plain(code: u16, headers: &'static str, body: &str) -> Reply {
    Reply {
        code,
        headers,
        content_type: "text/plain; charset=utf-8",
        body: format!("{body}\n"),
    }
}

/// Answers one connection: `reply` when given (busy), else the request's.
fn answer(mut stream: TcpStream, reply: Option<Reply>) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let reply = match reply {
        Some(r) => r,
        None => match read_head(&mut stream) {
            Ok((method, path)) => route(&method, &path),
            Err(r) => r,
        },
    };
    let reason = match reply.code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Request Header Fields Too Large",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
        reply.code,
        reply.content_type,
        reply.body.len(),
        reply.headers,
    );
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(reply.body.as_bytes()));
}

/// The endpoint: `GET /metrics` (a query string is ignored), nothing else.
fn route(method: &str, path: &str) -> Reply {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    match (method, path) {
        ("GET", "/metrics") => Reply {
            code: 200,
            headers: "",
            content_type: metrics::CONTENT_TYPE,
            body: metrics::encode(),
        },
        (_, "/metrics") => plain(405, "Allow: GET\r\n", "only GET /metrics"),
        _ => plain(404, "", "not found: the metrics are at GET /metrics"),
    }
}

/// Reads a request head: method and path; a malformed one is the error reply. A body is
/// never read (no endpoint takes one; the connection closes after the answer).
fn read_head(stream: &mut TcpStream) -> Result<(String, String), Reply> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                return Ok((
                    req.method.unwrap_or_default().to_string(),
                    req.path.unwrap_or_default().to_string(),
                ))
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(plain(400, "", &format!("bad HTTP request: {e}"))),
        }
        if buf.len() >= MAX_REQUEST {
            return Err(plain(431, "", "request head too large"));
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(plain(400, "", "incomplete HTTP request")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(plain(400, "", &format!("reading the request: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One raw request to `addr`: the whole answer.
    fn raw(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn serves_get_metrics_and_nothing_else() {
        let server = start("127.0.0.1:0").unwrap();
        let addr = server.local_addr();
        let ok = raw(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{ok}"
        );
        assert!(ok.contains("\r\n\r\n# HELP lockstep_"), "{ok}");
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
        let query = raw(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert!(query.starts_with("HTTP/1.1 200 "), "{query}");
        for (request, code) in [
            ("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "405"),
            ("HEAD /metrics HTTP/1.1\r\n\r\n", "405"),
            ("GET / HTTP/1.1\r\n\r\n", "404"),
            ("GET /status HTTP/1.1\r\n\r\n", "404"),
            ("DELETE /x HTTP/1.1\r\n\r\n", "404"),
            ("NOT HTTP\r\n\r\n", "400"),
        ] {
            let a = raw(addr, request);
            assert!(
                a.starts_with(&format!("HTTP/1.1 {code} ")),
                "{request:?}: {a}"
            );
        }
        assert!(raw(addr, "PUT /metrics HTTP/1.1\r\n\r\n").contains("Allow: GET\r\n"));
    }

    #[test]
    fn a_bad_address_or_a_port_in_use_is_one_line_naming_the_option() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        for bad in [addr.as_str(), "nonsense", "127.0.0.1:99999", "127.0.0.1"] {
            let e = start(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--metrics {bad}: ")), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = start(&addr).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
    }
}
