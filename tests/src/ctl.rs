//! The control socket as the tests speak to it: `lockstep ctl ... status --json` parsed,
//! and raw HTTP requests with their status code and JSON body.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::Value;

use crate::lockstep;

/// A path as a command-line argument.
pub fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `lockstep ctl --api-sock SOCK status --json`, parsed.
pub fn status(sock: &Path) -> Value {
    let run = lockstep(&["ctl", "--api-sock", path(sock), "status", "--json"]);
    run.assert_success();
    serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {run:?}"))
}

/// One raw HTTP request on the socket: the status code and the JSON body.
pub fn raw(sock: &Path, request: &str) -> (u16, Value) {
    let mut s = UnixStream::connect(sock).expect("connect to the control socket");
    s.write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    let code = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer}"));
    let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
    assert!(head.contains("application/json"), "{head}");
    (
        code,
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}")),
    )
}

/// `POST path` with `body` (JSON or anything else, sent as it is).
pub fn post(sock: &Path, path: &str, body: &str) -> (u16, Value) {
    raw(
        sock,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// A port free on 127.0.0.1 now (for a listener the test starts next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `lockstep ARGS` in the background, its output in `<dir>/<name>.out` and `.err`.
pub fn spawn(dir: &crate::TempDir, name: &str, args: &[&str]) -> crate::Proc {
    let mut cmd = std::process::Command::new(crate::lockstep_bin());
    cmd.args(args);
    crate::Proc::spawn(
        cmd,
        dir.join(&format!("{name}.out")),
        dir.join(&format!("{name}.err")),
    )
    .expect("start lockstep")
}

/// Waits until `lockstep ctl status` answers on `sock` (the process is up and serves its
/// control socket); fails the test after `limit`.
pub fn wait_answer(sock: &Path, limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    while !lockstep(&["ctl", "--api-sock", path(sock), "status"])
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no answer on {sock:?} within {limit:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A `lockstep backup` waiting for a primary (on a port of its own) with its control
/// socket at `<dir>/<name>.sock`: it serves the socket without KVM. Returns once it
/// answers.
pub fn idle_backup(dir: &crate::TempDir, name: &str) -> (crate::Proc, std::path::PathBuf) {
    let sock = dir.join(&format!("{name}.sock"));
    let backup = spawn(
        dir,
        name,
        &[
            "backup",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--api-sock",
            path(&sock),
        ],
    );
    wait_answer(&sock, std::time::Duration::from_secs(20));
    (backup, sock)
}
