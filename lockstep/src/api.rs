//! The control socket (`--api-sock PATH`): HTTP/1.1 with JSON bodies on a Unix socket, as
//! Firecracker and cloud-hypervisor serve theirs, and its client (`lockstep ctl`).
//!
//! One request per connection (`Connection: close`), each connection served on a thread of
//! its own (at most [`MAX_CLIENTS`] at once; beyond, `503` at once), with one deadline for
//! the whole request, so a slow or stuck client never holds the socket for another. The
//! endpoints read the engine's shared status, set its stop flag, or leave a request for
//! the role (`protect`, `switchover`, `failover`: checked at once, answered
//! `202 Accepted`, carried out by the role, followed in `GET /status`'s `request`), so
//! nothing here ever waits for the guest or the replication roles.
//!
//! Requests are parsed with `httparse` (the parser under hyper: a request line, headers and
//! a `Content-Length` body are all this API needs, without an async runtime or a server
//! framework in a VMM process); bodies are JSON through `serde_json`.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use engine::replication::control::{self, AfterSwitchover, FenceTarget, Request, RequestReport};
use engine::replication::fence::parse_fence_arg;
use engine::replication::status::{self, StatusReport};
use engine::warn;

/// Largest request accepted (headers and body).
const MAX_REQUEST: usize = 64 << 10;

/// How long a client may take to send its whole request (from the connection's accept),
/// and the client to wait for the whole answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once; one more is answered `503` and closed.
pub const MAX_CLIENTS: usize = 16;

/// The control socket, served while the value lives; dropped on an orderly end, the
/// socket file is removed.
pub struct ApiServer {
    path: PathBuf,
}

/// The control socket, or the metrics endpoint, could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process answers on the socket.
    #[error("--api-sock {0}: in use by another process")]
    InUse(PathBuf),
    /// The path exists and is no socket: never removed.
    #[error("--api-sock {0}: exists and is not a socket")]
    NotSocket(PathBuf),
    /// Binding failed.
    #[error("--api-sock {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `--metrics ADDR:PORT` cannot be served (see [`crate::metrics`]).
    #[error("--metrics {addr}: {why}")]
    Metrics {
        /// The address given.
        addr: String,
        /// Why.
        why: String,
    },
}

impl ApiServer {
    /// Binds `path` (a stale socket file left by a killed process is replaced) and serves
    /// it on a thread of its own.
    pub fn start(path: &Path) -> Result<ApiServer, ApiError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ApiError::NotSocket(path.to_path_buf()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept(listener))
            .map_err(|source| ApiError::Bind {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(ApiServer {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An HTTP answer: status code and JSON body, and for a `405` the method the endpoint
/// takes (its `Allow:` header).
#[derive(Debug, PartialEq)]
pub struct Reply {
    pub code: u16,
    pub body: Value,
    pub allow: Option<&'static str>,
}

fn error(code: u16, msg: impl Into<String>) -> Reply {
    Reply {
        code,
        body: json!({ "error": msg.into() }),
        allow: None,
    }
}

fn ok(code: u16, body: Value) -> Reply {
    Reply {
        code,
        body,
        allow: None,
    }
}

/// The accept loop: each connection on a thread of its own, at most [`MAX_CLIENTS`] at
/// once (the others are answered `503` at once, so a `ctl status` never waits behind
/// clients that are slow to send).
fn accept(listener: UnixListener) {
    each_on_its_thread(
        listener.incoming(),
        "control socket",
        busy,
        |stream, accepted| serve(stream, accepted + IO_TIMEOUT),
    );
}

/// Serves each connection of `incoming` on a thread of its own with `serve(stream, the
/// accept time)`, at most [`MAX_CLIENTS`] at once; beyond, `busy(stream)` answers at once.
/// `what` names the server in the log. Shared by the control socket and the metrics
/// endpoint.
pub fn each_on_its_thread<S: Send + 'static>(
    incoming: impl Iterator<Item = std::io::Result<S>>,
    what: &'static str,
    busy: fn(S),
    serve: fn(S, Instant),
) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    for stream in incoming {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!("{what}: accept: {e}");
                // Out of descriptors, say: do not spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let accepted = Instant::now();
        if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            busy(stream);
            continue;
        }
        let guard = InFlight(in_flight.clone());
        let spawned = std::thread::Builder::new()
            .name("client".into())
            .spawn(move || {
                let _guard = guard;
                serve(stream, accepted);
            });
        if let Err(e) = spawned {
            // The closure, its stream and its guard are dropped: the client sees the
            // connection closed.
            warn!("{what}: cannot start a thread for a client: {e}");
        }
    }
}

/// Answers `503` without waiting for anything: a small answer fits the socket's buffer,
/// and what the client already sent is taken in before the socket closes (closed with
/// bytes unread, it would reset the client's connection before it read the answer).
fn busy(mut stream: UnixStream) {
    let _ = stream.set_nonblocking(true);
    send(
        &mut stream,
        &error(
            503,
            format!("{MAX_CLIENTS} requests are already being served; try again"),
        ),
    );
    let mut chunk = [0u8; 4096];
    let mut taken = 0;
    while taken < MAX_REQUEST {
        match stream.read(&mut chunk) {
            Ok(n) if n > 0 => taken += n,
            _ => break,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// One connection counted in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves one connection: the request must be in by `deadline`.
fn serve(mut stream: UnixStream, deadline: Instant) {
    let reply = match read_request(&mut stream, deadline) {
        Ok((method, path, body)) => route(&method, &path, &body),
        Err(r) => r,
    };
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    send(&mut stream, &reply);
}

/// Writes `reply` as an HTTP answer (errors ignored: the client went away).
fn send(stream: &mut UnixStream, reply: &Reply) {
    let body = reply.body.to_string();
    let allow = match reply.allow {
        Some(method) => format!("Allow: {method}\r\n"),
        None => String::new(),
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        reply.code,
        reason(reply.code),
        body.len()
    );
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()));
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Reads into `buf` what the stream has, waiting no later than `deadline`: the bytes read
/// (0 at the end of the stream), or the error reply (`408` once the deadline passed).
fn read_some(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    what: &str,
) -> Result<usize, Reply> {
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out(what));
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(timed_out(what));
            }
            Err(e) => return Err(error(400, format!("{what}: {e}"))),
        }
    }
}

fn timed_out(what: &str) -> Reply {
    error(
        408,
        format!(
            "{what}: timed out (the whole request must arrive within {} s)",
            IO_TIMEOUT.as_secs()
        ),
    )
}

/// Reads one request by `deadline`: method, path and body; a malformed one is the error
/// reply.
fn read_request(
    stream: &mut UnixStream,
    deadline: Instant,
) -> Result<(String, String, Vec<u8>), Reply> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or_default().to_string();
                let path = req.path.unwrap_or_default().to_string();
                let mut len = 0usize;
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        // A chunked body read as none would be a request cut short.
                        return Err(error(
                            411,
                            "Transfer-Encoding is not supported: send Content-Length",
                        ));
                    }
                    if h.name.eq_ignore_ascii_case("content-length") {
                        len = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or_else(|| error(400, "bad Content-Length"))?;
                    }
                }
                if head_len.saturating_add(len) > MAX_REQUEST {
                    return Err(error(413, "request too large"));
                }
                while buf.len() < head_len + len {
                    if read_some(stream, &mut buf, deadline, "reading the body")? == 0 {
                        return Err(error(400, "body shorter than Content-Length"));
                    }
                }
                return Ok((method, path, buf[head_len..head_len + len].to_vec()));
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(error(400, format!("bad HTTP request: {e}"))),
        }
        if buf.len() >= MAX_REQUEST {
            return Err(error(413, "request too large"));
        }
        if read_some(stream, &mut buf, deadline, "reading the request")? == 0 {
            return Err(error(400, "incomplete HTTP request"));
        }
    }
}

/// The endpoints: path, method, and whether a JSON body is taken.
const ENDPOINTS: &[(&str, &str)] = &[
    ("/status", "GET"),
    ("/stop", "POST"),
    ("/protect", "POST"),
    ("/switchover", "POST"),
    ("/failover", "POST"),
];

/// Answers one request.
pub fn route(method: &str, path: &str, body: &[u8]) -> Reply {
    let path = path.split('?').next().unwrap_or_default();
    let Some(&(_, allowed)) = ENDPOINTS.iter().find(|(p, _)| *p == path) else {
        return error(404, format!("no such endpoint: {path}"));
    };
    if method != allowed {
        return Reply {
            allow: Some(allowed),
            ..error(405, format!("{path} takes {allowed}, not {method}"))
        };
    }
    // A body, when there is one, must be a JSON object.
    let body: serde_json::Map<String, Value> = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Map::new()
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => m,
            Ok(other) => return error(400, format!("the body must be a JSON object, not {other}")),
            Err(e) => return error(400, format!("bad JSON body: {e}")),
        }
    };
    let request = match path {
        "/status" => {
            return ok(
                200,
                status_json(&status::report(), control::last().as_ref()),
            )
        }
        "/stop" => {
            if let Err(r) = fields(&body, &[]) {
                return r;
            }
            engine::info!("stop requested on the control socket");
            engine::replication::request_stop();
            return ok(200, json!({ "stopping": true }));
        }
        "/protect" => match protect_request(&body) {
            Ok(r) => r,
            Err(r) => return r,
        },
        "/switchover" => {
            match fields(&body, &["listen"]).and_then(|()| string(&body, "listen", false)) {
                Ok(Some(listen)) => Request::Switchover {
                    then: AfterSwitchover::Backup { listen },
                },
                Ok(None) => Request::Switchover {
                    then: AfterSwitchover::Stop,
                },
                Err(r) => return r,
            }
        }
        _ => {
            if let Err(r) = fields(&body, &[]) {
                return r;
            }
            Request::Failover
        }
    };
    let kind = request.kind();
    match control::submit(request) {
        Ok(id) => {
            engine::info!("{kind} requested on the control socket (request {id})");
            ok(202, json!({ "accepted": kind, "id": id }))
        }
        Err(refusal) => error(refusal.code, refusal.message),
    }
}

/// `POST /protect`'s body: `peer`, and optionally the fence agent's target for the new
/// backup (`peer_node`, `fence_args`: a list of `key=value`, checked as `--fence-arg`).
fn protect_request(body: &serde_json::Map<String, Value>) -> Result<Request, Reply> {
    fields(body, &["peer", "peer_node", "fence_args"])?;
    let peer = string(body, "peer", true)?.unwrap_or_default();
    let peer_node = string(body, "peer_node", false)?;
    let args = match body.get("fence_args") {
        None => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|v| match v {
                    Value::String(kv) => {
                        parse_fence_arg(kv).map_err(|e| error(400, format!("\"fence_args\": {e}")))
                    }
                    other => Err(error(
                        400,
                        format!("\"fence_args\" holds strings key=value, not {other}"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(other) => {
            return Err(error(
                400,
                format!("\"fence_args\" must be a list of \"key=value\", not {other}"),
            ))
        }
    };
    Ok(Request::Protect {
        peer,
        fence: FenceTarget { peer_node, args },
    })
}

/// Refuses fields other than `known` (a misspelt one would otherwise be ignored).
fn fields(body: &serde_json::Map<String, Value>, known: &[&str]) -> Result<(), Reply> {
    match body.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) if known.is_empty() => Err(error(
            400,
            format!("unknown field \"{k}\": this endpoint takes no body"),
        )),
        Some(k) => Err(error(
            400,
            format!("unknown field \"{k}\" (expected {})", known.join(", ")),
        )),
        None => Ok(()),
    }
}

/// The string field `key`: an error when it is missing and `required`, or not a string.
fn string(
    body: &serde_json::Map<String, Value>,
    key: &str,
    required: bool,
) -> Result<Option<String>, Reply> {
    match body.get(key) {
        None if required => Err(error(400, format!("missing field \"{key}\""))),
        None => Ok(None),
        Some(Value::String(v)) => Ok(Some(v.clone())),
        Some(other) => Err(error(
            400,
            format!("\"{key}\" must be a string, not {other}"),
        )),
    }
}

/// `GET /status`'s body (README, "Control socket").
pub fn status_json(r: &StatusReport, request: Option<&RequestReport>) -> Value {
    json!({
        "role": r.role.as_str(),
        "guest": r.guest.as_str(),
        "name": r.name,
        "committed_epoch": r.committed_epoch,
        "acked_epoch": r.acked_epoch,
        "protection": r.protection.as_str(),
        "last_role_change": r.last_role_change,
        "pause_p50_us": r.pause_us.0,
        "pause_p99_us": r.pause_us.1,
        "commit_p50_us": r.commit_us.0,
        "commit_p99_us": r.commit_us.1,
        "held_frames": r.held_frames,
        "lag_epochs": r.lag_epochs,
        "lag_ms": r.lag_ms,
        "request": request.map(|q| json!({
            "id": q.id,
            "kind": q.kind,
            "state": q.state.as_str(),
            "detail": q.detail,
        })),
    })
}

/// One request to a control socket: the status code and the JSON body.
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: &Value,
) -> Result<(u16, Value), String> {
    let at = sock.display();
    // A file or a directory at the path refuses the connection as if nobody listened:
    // say what it is instead.
    if let Ok(meta) = std::fs::metadata(sock) {
        let kind = meta.file_type();
        if !kind.is_socket() {
            let what = if kind.is_dir() {
                "a directory"
            } else if kind.is_file() {
                "a regular file"
            } else {
                "a special file"
            };
            return Err(format!(
                "--api-sock {at}: not a socket ({what}; the process's --api-sock PATH)"
            ));
        }
    }
    let mut s =
        UnixStream::connect(sock).map_err(|e| format!("--api-sock {at}: cannot connect: {e}"))?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let timed_out = |doing: &str| {
        format!(
            "--api-sock {at}: {doing}: timed out after {} s (the process does not answer)",
            IO_TIMEOUT.as_secs()
        )
    };
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    // A server that answered without reading (503: too busy) may have closed already: its
    // answer is still to be read.
    let sent = match s.write_all(req.as_bytes()) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return Err(timed_out("sending"))
        }
        Err(e) => Err(format!("--api-sock {at}: sending: {e}")),
    };
    // The whole answer by one deadline.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out("reading the answer"));
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut chunk) {
            Ok(0) => break Ok(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(timed_out("reading the answer"))
            }
            Err(e) => break Err(format!("--api-sock {at}: reading the answer: {e}")),
        }
    };
    // A whole answer counts, however the connection ended after it.
    match answer(&buf) {
        Some(whole) => whole.map_err(|why| format!("--api-sock {at}: {why}")),
        None => {
            sent?;
            read?;
            Err(format!("--api-sock {at}: not an HTTP answer"))
        }
    }
}

/// The status code and JSON body of a whole HTTP answer in `buf`; `None` when the answer
/// is not whole (the head cut short, the body shorter than its `Content-Length`).
fn answer(buf: &[u8]) -> Option<Result<(u16, Value), String>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let body = &buf[head_len..];
    if length.is_some_and(|n| body.len() < n) {
        return None;
    }
    let code = resp.code.unwrap_or(0);
    Some(
        serde_json::from_slice(&body[..length.unwrap_or(body.len())])
            .map(|v| (code, v))
            .map_err(|e| format!("bad JSON in the answer: {e}")),
    )
}

/// Prints `line` on stdout. A closed stdout (`lockstep ctl status | head -1`) is not worth
/// a panic: what cannot be written is dropped.
pub fn say(line: impl std::fmt::Display) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Follows request `id` in `GET /status` until it is done (`Ok`), failed or `limit` passed
/// (`Err`), printing where it is as it changes (or the final status as JSON with `json`).
pub fn wait_request(
    sock: &Path,
    action: &str,
    id: u64,
    limit: Duration,
    json: bool,
) -> Result<std::process::ExitCode, String> {
    let deadline = std::time::Instant::now() + limit;
    let mut shown = String::new();
    let mut last_seen: Option<Value> = None;
    loop {
        let v = match request(sock, "GET", "/status", &Value::Null) {
            Ok((_, v)) => v,
            // A switchover that ends with the process: it ended after the hand-over.
            Err(_) if action == "switchover" && last_seen.is_some() => {
                say("switchover: this process has ended; its guest now runs on the backup (see the backup's status)");
                return Ok(std::process::ExitCode::SUCCESS);
            }
            Err(e) => return Err(e),
        };
        let q = &v["request"];
        if q["id"].as_u64() != Some(id) {
            return Err(format!(
                "{action}: request {id} is no longer the process's last request"
            ));
        }
        let state = q["state"].as_str().unwrap_or("-");
        let line = format!(
            "{action}: {state}: {} (role {}, protection {})",
            q["detail"].as_str().unwrap_or("-"),
            v["role"].as_str().unwrap_or("-"),
            v["protection"].as_str().unwrap_or("-")
        );
        // A failure is said once, by the error line the caller prints.
        if line != shown && !json && state != "failed" {
            say(&line);
            shown = line;
        }
        match state {
            "done" => {
                if json {
                    say(&v);
                }
                return Ok(std::process::ExitCode::SUCCESS);
            }
            "failed" => {
                if json {
                    say(&v);
                }
                return Err(format!(
                    "{action} failed: {} (role {}, protection {})",
                    q["detail"].as_str().unwrap_or("-"),
                    v["role"].as_str().unwrap_or("-"),
                    v["protection"].as_str().unwrap_or("-")
                ));
            }
            _ => {}
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "{action}: not done within {limit:?} (it goes on; see ctl status)"
            ));
        }
        last_seen = Some(v);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `lockstep ctl status`'s human output.
pub fn human_status(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    let n = |k: &str| v[k].as_u64().map_or("-".to_string(), |n| n.to_string());
    let name = s("name");
    let mut out = format!(
        "role:        {}{}\nguest:       {}\nprotection:  {}\n",
        s("role"),
        if name.is_empty() {
            String::new()
        } else {
            format!(" (pair '{name}')")
        },
        s("guest"),
        s("protection"),
    );
    out += &format!(
        "epochs:      committed {}, acknowledged {}\n",
        n("committed_epoch"),
        n("acked_epoch")
    );
    if !v["lag_epochs"].is_null() {
        out += &format!(
            "lag:         {} epochs unacknowledged, the oldest {} ms\n",
            n("lag_epochs"),
            n("lag_ms")
        );
    }
    // Epoch pauses and commits are the replicating side's: elsewhere they would be zeros
    // that mean nothing (the JSON keeps them, as documented).
    if v["role"] == "primary" {
        out += &format!(
            "pause:       p50 {} us, p99 {} us (last minute)\ncommit:      p50 {} us, p99 {} us (last minute)\n",
            n("pause_p50_us"),
            n("pause_p99_us"),
            n("commit_p50_us"),
            n("commit_p99_us")
        );
    }
    out += &format!("held output: {} frames\n", n("held_frames"));
    out += &format!(
        "last change: {}",
        v["last_role_change"].as_str().unwrap_or("none")
    );
    if let Some(q) = v["request"].as_object() {
        out += &format!(
            "\nrequest:     {} {}: {}",
            q["kind"].as_str().unwrap_or("-"),
            q["state"].as_str().unwrap_or("-"),
            q["detail"].as_str().unwrap_or("-")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use engine::replication::status::Role;

    use super::*;

    /// A socket path of this test process's own.
    fn sock_path(what: &str) -> PathBuf {
        std::env::temp_dir().join(format!("lockstep-api-{what}-{}.sock", std::process::id()))
    }

    /// `request` on a raw connection to `path`: the answer's status line and headers.
    fn raw(path: &Path, request: &[u8]) -> String {
        let mut s = UnixStream::connect(path).expect("connect");
        s.write_all(request).expect("send");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("read");
        answer
    }

    #[test]
    fn a_405_names_the_endpoints_own_method() {
        assert_eq!(route("POST", "/status", b"").allow, Some("GET"));
        assert_eq!(route("GET", "/stop", b"").allow, Some("POST"));
        assert_eq!(route("DELETE", "/failover", b"").allow, Some("POST"));
        assert_eq!(route("GET", "/status", b"").allow, None);
        let path = sock_path("allow");
        let _server = ApiServer::start(&path).expect("serve");
        let answer = raw(&path, b"GET /protect HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
        assert!(answer.contains("\r\nAllow: POST\r\n"), "{answer}");
        let answer = raw(&path, b"PUT /status HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(answer.contains("\r\nAllow: GET\r\n"), "{answer}");
    }

    #[test]
    fn a_chunked_body_is_refused_not_read_as_none() {
        let (mut client, mut server) = UnixStream::pair().expect("pair");
        client
            .write_all(
                b"POST /stop HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5\r\n{\"a\":\r\n0\r\n\r\n",
            )
            .expect("send");
        let r = read_request(&mut server, Instant::now() + IO_TIMEOUT).expect_err("refused");
        assert_eq!(r.code, 411, "{}", r.body);
        assert!(
            r.body["error"].as_str().unwrap().contains("Content-Length"),
            "{}",
            r.body
        );
    }

    #[test]
    fn one_deadline_for_the_whole_request() {
        // A client that sends a byte every 50 ms never lets a per-read timeout expire.
        let (mut client, mut server) = UnixStream::pair().expect("pair");
        let trickle = std::thread::spawn(move || {
            for b in b"GET /status HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" {
                if client.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let t = Instant::now();
        let r = read_request(&mut server, t + Duration::from_millis(400)).expect_err("too slow");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(r.code, 408, "{}", r.body);
        let why = r.body["error"].as_str().unwrap();
        assert!(
            why.contains("timed out") && !why.contains("os error"),
            "{why}"
        );
        drop(server);
        trickle.join().unwrap();
    }

    #[test]
    fn slow_clients_do_not_hold_the_socket_for_others() {
        let path = sock_path("slow");
        let _server = ApiServer::start(&path).expect("serve");
        // Clients that sent part of a request and wait: each holds a thread, not the socket.
        let mut stuck: Vec<UnixStream> = (0..3)
            .map(|_| {
                let mut s = UnixStream::connect(&path).expect("connect");
                s.write_all(b"GET /sta").expect("send");
                s
            })
            .collect();
        let t = Instant::now();
        let (code, body) = request(&path, "GET", "/status", &Value::Null).expect("status");
        assert_eq!(code, 200, "{body}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // Beyond MAX_CLIENTS in flight, the next is told so at once.
        stuck.extend((3..MAX_CLIENTS).map(|_| {
            let mut s = UnixStream::connect(&path).expect("connect");
            s.write_all(b"GET /sta").expect("send");
            s
        }));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (code, body) = request(&path, "GET", "/status", &Value::Null).expect("answer");
            if code == 503 {
                assert!(
                    body["error"].as_str().unwrap().contains("try again"),
                    "{body}"
                );
                break;
            }
            // The last stuck clients may not be counted yet.
            assert!(
                Instant::now() < deadline,
                "no 503 with {MAX_CLIENTS} clients stuck"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Gone, they free their places.
        drop(stuck);
        let deadline = Instant::now() + Duration::from_secs(5);
        while request(&path, "GET", "/status", &Value::Null).map(|(c, _)| c) != Ok(200) {
            assert!(Instant::now() < deadline, "the socket did not recover");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn the_client_says_what_is_in_the_way() {
        let dir = std::env::temp_dir().join(format!("lockstep-api-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"").unwrap();
        for (path, what) in [(&dir, "a directory"), (&file, "a regular file")] {
            let e = request(path, "GET", "/status", &Value::Null).expect_err("no socket");
            assert!(e.contains("not a socket") && e.contains(what), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        // A server that never answers: "timed out", not EAGAIN's "os error 11".
        let path = sock_path("mute");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let t = Instant::now();
        let e = request(&path, "GET", "/status", &Value::Null).expect_err("no answer");
        assert!(e.contains("timed out") && !e.contains("os error"), "{e}");
        assert!(t.elapsed() < IO_TIMEOUT + Duration::from_secs(2));
        drop(listener);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn routes_and_errors() {
        assert_eq!(route("GET", "/status", b"").code, 200);
        assert_eq!(route("GET", "/nope", b"").code, 404);
        assert_eq!(route("POST", "/status", b"").code, 405);
        assert_eq!(route("GET", "/stop", b"").code, 405);
        let bad = route("GET", "/status", b"{oops");
        assert_eq!(bad.code, 400);
        assert!(bad.body["error"].as_str().unwrap().contains("JSON"));
        assert!(route("DELETE", "/x", b"").body["error"].is_string());
    }

    #[test]
    fn requests_are_checked_before_anything_changes() {
        let code = |path: &str, body: &str| route("POST", path, body.as_bytes()).code;
        // Malformed: 400, whatever the state.
        assert_eq!(code("/protect", ""), 400);
        assert_eq!(code("/protect", r#"{"peer": 7600}"#), 400);
        assert_eq!(code("/protect", r#"{"peer": "nohost"}"#), 400);
        assert_eq!(code("/protect", r#"{"peer": "h:1", "per": "h:2"}"#), 400);
        assert_eq!(code("/protect", r#"["h:1"]"#), 400);
        assert_eq!(
            code("/protect", r#"{"peer": "h:1", "fence_args": "a=b"}"#),
            400
        );
        assert_eq!(
            code("/protect", r#"{"peer": "h:1", "fence_args": [1]}"#),
            400
        );
        assert_eq!(
            code(
                "/protect",
                r#"{"peer": "h:1", "fence_args": ["action=on"]}"#
            ),
            400
        );
        assert_eq!(code("/protect", r#"{"peer": "h:1", "peer_node": 3}"#), 400);
        assert_eq!(code("/switchover", r#"{"listen": "x"}"#), 400);
        assert_eq!(code("/failover", r#"{"force": true}"#), 400);
        assert_eq!(code("/stop", r#"{"now": true}"#), 400);
        // Well formed but out of place here (a paused standalone guest): 409.
        let r = route("POST", "/protect", br#"{"peer": "127.0.0.1:7600"}"#);
        assert_eq!(r.code, 409, "{}", r.body);
        assert!(
            r.body["error"].as_str().unwrap().contains("paused"),
            "{}",
            r.body
        );
        let r = route("POST", "/failover", b"");
        assert_eq!(r.code, 409);
        assert!(
            r.body["error"].as_str().unwrap().contains("backup"),
            "{}",
            r.body
        );
        assert_eq!(code("/switchover", ""), 409);
        assert!(control::last().is_none(), "nothing was accepted");
    }

    #[test]
    fn human_status_names_the_role_and_epochs() {
        let v = status_json(&status::report(), None);
        let h = human_status(&v);
        assert!(h.contains("role:"), "{h}");
        assert!(h.contains("acknowledged"), "{h}");
        assert!(v["lag_ms"].is_null() && !h.contains("lag:"), "{h}");
    }

    #[test]
    fn pause_and_commit_figures_are_the_primarys_alone() {
        let mut r = status::report();
        r.pause_us = (120, 900);
        for (role, shown) in [
            (Role::Primary, true),
            (Role::Backup, false),
            (Role::Promoted, false),
            (Role::Standalone, false),
        ] {
            r.role = role;
            let v = status_json(&r, None);
            assert_eq!(v["pause_p50_us"], 120, "the JSON keeps them");
            let h = human_status(&v);
            assert_eq!(h.contains("pause:"), shown, "{h}");
            assert_eq!(h.contains("commit:"), shown, "{h}");
        }
    }

    #[test]
    fn a_primary_reports_its_lag() {
        let mut r = status::report();
        (r.lag_epochs, r.lag_ms) = (Some(3), Some(75));
        let v = status_json(&r, None);
        assert_eq!((&v["lag_epochs"], &v["lag_ms"]), (&3.into(), &75.into()));
        let h = human_status(&v);
        assert!(
            h.contains("lag:         3 epochs unacknowledged, the oldest 75 ms"),
            "{h}"
        );
    }
}
