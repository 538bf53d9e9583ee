//! The control socket (`--api-sock PATH`): HTTP/1.1 with JSON bodies on a Unix socket, as
//! Firecracker and cloud-hypervisor serve theirs, and its client (`lockstep ctl`).
//!
//! One request per connection (`Connection: close`), served one at a time on a thread of
//! its own: the endpoints only read the engine's shared status or set its stop flag, so
//! nothing here ever waits for the guest or the replication roles.
//!
//! Requests are parsed with `httparse` (the parser under hyper: a request line, headers and
//! a `Content-Length` body are all this API needs, without an async runtime or a server
//! framework in a VMM process); bodies are JSON through `serde_json`.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use engine::replication::status::{self, StatusReport};
use engine::warn;

/// Largest request accepted (headers and body).
const MAX_REQUEST: usize = 64 << 10;

/// How long a client may take to send its request, and the client to wait for an answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The control socket, served while the value lives; dropped on an orderly end, the
/// socket file is removed.
pub struct ApiServer {
    path: PathBuf,
}

/// The control socket could not be set up.
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
            .spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(s) => serve(s),
                        Err(e) => warn!("control socket: accept: {e}"),
                    }
                }
            })
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

/// An HTTP answer: status code and JSON body.
#[derive(Debug, PartialEq)]
pub struct Reply {
    pub code: u16,
    pub body: Value,
}

fn error(code: u16, msg: impl Into<String>) -> Reply {
    Reply {
        code,
        body: json!({ "error": msg.into() }),
    }
}

fn serve(mut stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let reply = match read_request(&mut stream) {
        Ok((method, path, body)) => route(&method, &path, &body),
        Err(r) => r,
    };
    let body = reply.body.to_string();
    let allow = match reply.code {
        405 => "Allow: GET, POST\r\n",
        _ => "",
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
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        _ => "Error",
    }
}

/// Reads one request: method, path and body; a malformed one is the error reply.
fn read_request(stream: &mut UnixStream) -> Result<(String, String, Vec<u8>), Reply> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or_default().to_string();
                let path = req.path.unwrap_or_default().to_string();
                let mut len = 0usize;
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        len = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or_else(|| error(400, "bad Content-Length"))?;
                    }
                }
                if head_len + len > MAX_REQUEST {
                    return Err(error(413, "request too large"));
                }
                while buf.len() < head_len + len {
                    match stream.read(&mut chunk) {
                        Ok(0) => return Err(error(400, "body shorter than Content-Length")),
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        Err(e) => return Err(error(400, format!("reading the body: {e}"))),
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
        match stream.read(&mut chunk) {
            Ok(0) => return Err(error(400, "incomplete HTTP request")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(error(400, format!("reading the request: {e}"))),
        }
    }
}

/// Answers one request.
pub fn route(method: &str, path: &str, body: &[u8]) -> Reply {
    let path = path.split('?').next().unwrap_or_default();
    let allowed = match path {
        "/status" => "GET",
        "/stop" => "POST",
        _ => return error(404, format!("no such endpoint: {path}")),
    };
    if method != allowed {
        return error(405, format!("{path} takes {allowed}, not {method}"));
    }
    // A body, when there is one, must be JSON (none of these endpoints needs one).
    if !body.iter().all(u8::is_ascii_whitespace) {
        if let Err(e) = serde_json::from_slice::<Value>(body) {
            return error(400, format!("bad JSON body: {e}"));
        }
    }
    match path {
        "/status" => Reply {
            code: 200,
            body: status_json(&status::report()),
        },
        _ => {
            engine::info!("stop requested on the control socket");
            engine::replication::request_stop();
            Reply {
                code: 200,
                body: json!({ "stopping": true }),
            }
        }
    }
}

/// `GET /status`'s body (README, "Control socket").
pub fn status_json(r: &StatusReport) -> Value {
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
    })
}

/// One request to a control socket: the status code and the JSON body.
pub fn request(sock: &Path, method: &str, path: &str) -> Result<(u16, Value), String> {
    let mut s = UnixStream::connect(sock)
        .map_err(|e| format!("--api-sock {}: cannot connect: {e}", sock.display()))?;
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    let req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("--api-sock {}: sending: {e}", sock.display()))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .map_err(|e| format!("--api-sock {}: reading the answer: {e}", sock.display()))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(&buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(format!("--api-sock {}: not an HTTP answer", sock.display())),
    };
    let code = resp.code.unwrap_or(0);
    let body = serde_json::from_slice(&buf[head_len..])
        .map_err(|e| format!("--api-sock {}: bad JSON in the answer: {e}", sock.display()))?;
    Ok((code, body))
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
    out += &format!(
        "pause:       p50 {} us, p99 {} us\ncommit:      p50 {} us, p99 {} us\n",
        n("pause_p50_us"),
        n("pause_p99_us"),
        n("commit_p50_us"),
        n("commit_p99_us")
    );
    out += &format!("held output: {} frames\n", n("held_frames"));
    out += &format!(
        "last change: {}",
        v["last_role_change"].as_str().unwrap_or("none")
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn human_status_names_the_role_and_epochs() {
        let v = status_json(&status::report());
        let h = human_status(&v);
        assert!(h.contains("role:"), "{h}");
        assert!(h.contains("acknowledged"), "{h}");
    }
}
