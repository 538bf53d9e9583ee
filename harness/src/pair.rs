//! A protected pair of real `lockstep` processes in a network namespace, for the failover
//! and fencing tests: the kv guest behind a tap (10.0.0.1/24 host side, the guest at
//! 10.0.0.2), a client that keeps ONE TCP connection and checks every reply, a proxy on
//! the replication link that can be cut, and the fence agent wired in both directions.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::kv::{Kv, Reply};
use crate::link::{Tamper, TamperProxy};
use crate::netns::Netns;
use crate::process::Proc;
use crate::trial::{GUEST_ADDR, KV_ARGS};

use crate::{lockstep_bin, TempDir};

/// `scripts/fence-pidfile`, the single-host fence agent.
pub fn fence_agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fence-pidfile")
}

/// The options that make one side fence the other with `scripts/fence-pidfile`: `victim`
/// is "primary" or "backup", whose pid file is `<dir>/<victim>.pid`.
pub fn fence_args(dir: &TempDir, victim: &str) -> Vec<String> {
    vec![
        "--fence-cmd".into(),
        fence_agent().to_str().expect("UTF-8 path").into(),
        "--peer-node".into(),
        format!("{victim}-node"),
        "--fence-arg".into(),
        format!("pidfile={}", dir.arg(&format!("{victim}.pid"))),
    ]
}

/// Owned copies of `args`, for [`Pair::start`].
pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Milliseconds, for reports.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A client writing `SET k<i> <i>` / `INCR counter` over one connection until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<LoadState>>,
    thread: Option<std::thread::JoinHandle<Option<Kv>>>,
}

#[derive(Default)]
pub struct LoadState {
    replies: Vec<Instant>,
    acked: Vec<u64>,
    error: Option<String>,
}

impl Load {
    pub fn start(ns: &Netns) -> Load {
        let stream = ns
            .connect(GUEST_ADDR, Duration::from_secs(20))
            .expect("connect to the kv guest");
        let mut kv = Kv::new(stream, Duration::from_secs(20)).expect("socket options");
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(LoadState::default()));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            let mut last = 0i64;
            while !sp.load(Ordering::SeqCst) {
                i += 1;
                let r = kv
                    .call(&["SET", &format!("k{i}"), &i.to_string()])
                    .and_then(|r| Ok((r, kv.call(&["INCR", "counter"])?)));
                let mut s = st.lock().unwrap();
                match r {
                    Ok((Reply::Simple(ok), Reply::Int(n))) if ok == "OK" && n == last + 1 => {
                        last = n;
                        s.acked.push(i);
                        s.replies.push(Instant::now());
                    }
                    Ok(other) => {
                        s.error = Some(format!("unexpected replies {other:?} (counter {last})"));
                        return None;
                    }
                    Err(e) => {
                        s.error = Some(format!("{e} ({:?})", e.kind()));
                        return None;
                    }
                }
            }
            Some(kv)
        });
        Load {
            stop,
            state,
            thread: Some(thread),
        }
    }

    /// When the first reply after `t` arrived, if one did.
    pub fn first_reply_since(&self, t: Instant) -> Option<Instant> {
        let s = self.state.lock().unwrap();
        s.replies.iter().find(|r| **r > t).copied()
    }

    /// The longest wait between two consecutive replies that overlaps `[from, to]` (a
    /// wait that began before `from` counts: it is what the client saw of an event there).
    pub fn longest_gap_within(&self, from: Instant, to: Instant) -> Duration {
        let s = self.state.lock().unwrap();
        s.replies
            .windows(2)
            .filter(|w| w[1] > from && w[0] < to)
            .map(|w| w[1].duration_since(w[0]))
            .max()
            .unwrap_or_default()
    }

    pub fn replies_since(&self, t: Instant) -> usize {
        let s = self.state.lock().unwrap();
        s.replies.iter().filter(|r| **r > t).count()
    }

    /// Waits until `n` replies arrived (a loaded machine may take a while for the first
    /// ones); fails the test if they do not within `limit` or the client failed.
    pub fn wait_for_replies(&self, n: usize, limit: Duration) {
        let t = Instant::now();
        loop {
            let got = self.state.lock().unwrap().replies.len();
            if got >= n {
                return;
            }
            assert!(
                self.error().is_none(),
                "the client failed: {:?}",
                self.error()
            );
            assert!(
                t.elapsed() < limit,
                "only {got} replies within {limit:?} of the client's start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `n` replies arrived after `t`; fails the test if they do not within
    /// `limit` of `t`, or the client failed.
    pub fn wait_for_replies_since(&self, t: Instant, n: usize, limit: Duration) {
        while self.replies_since(t) < n {
            assert_eq!(self.error(), None, "the client failed");
            assert!(
                t.elapsed() < limit,
                "fewer than {n} replies within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn error(&self) -> Option<String> {
        self.state.lock().unwrap().error.clone()
    }

    /// Stops, then reads back every acknowledged key; returns (acknowledged, lost, the
    /// longest gap between replies).
    pub fn finish(mut self) -> (usize, Vec<u64>, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        let kv = self.thread.take().unwrap().join().expect("load thread");
        let s = self.state.lock().unwrap();
        assert!(s.error.is_none(), "the client failed: {:?}", s.error);
        let mut kv = kv.expect("client connection");
        let mut lost = Vec::new();
        for chunk in s.acked.chunks(100) {
            let mut out = Vec::new();
            for i in chunk {
                Kv::encode(&mut out, &["GET", &format!("k{i}")]);
            }
            kv.send_raw(&out).expect("send the read-back");
            for i in chunk {
                match kv.reply().expect("read-back reply") {
                    Reply::Bulk(Some(v)) if v == i.to_string().as_bytes() => {}
                    _ => lost.push(*i),
                }
            }
        }
        let gap = s
            .replies
            .windows(2)
            .map(|w| w[1].duration_since(w[0]))
            .max()
            .unwrap_or_default();
        (s.acked.len(), lost, gap)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// `lockstep primary` running the kv guest on tap0, pid file `<dir>/primary.pid`, log in
/// `<dir>/primary.err`.
pub fn primary_cmd(ns: &Netns, dir: &TempDir, peer: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "primary",
        "--peer",
        peer,
        "--guest",
        "builtin",
        "--guest-args",
        KV_ARGS,
        "--net",
        "tap=tap0",
        "--pid-file",
    ];
    let pid = dir.arg("primary.pid");
    let console = dir.arg("primary.console");
    args.push(&pid);
    args.extend(["--console", &console]);
    let tls = crate::link::tls_args(dir.path(), "node1");
    args.extend(tls.iter().map(String::as_str));
    args.extend_from_slice(extra);
    Proc::spawn(
        ns.command(lockstep_bin(), &args),
        dir.join("primary.out"),
        dir.join("primary.err"),
    )
    .expect("start the primary")
}

/// `lockstep backup` on tap0, pid file `<dir>/backup.pid`; returns once it listens.
pub fn backup_cmd(ns: &Netns, dir: &TempDir, listen: &str, extra: &[&str]) -> Proc {
    backup_cmd_named(ns, dir, "backup", listen, extra)
}

/// `lockstep backup` on tap0 under the file names `<dir>/<name>.pid`, `.console`, `.out`
/// and `.err` (a third process next to a pair: a new backup); returns once it listens.
pub fn backup_cmd_named(
    ns: &Netns,
    dir: &TempDir,
    name: &str,
    listen: &str,
    extra: &[&str],
) -> Proc {
    let console = dir.arg(&format!("{name}.console"));
    let mut args = vec![
        "backup",
        "--listen",
        listen,
        "--net",
        "tap=tap0",
        "--console",
        &console,
        "--pid-file",
    ];
    let pid = dir.arg(&format!("{name}.pid"));
    args.push(&pid);
    let tls = crate::link::tls_args(dir.path(), "node2");
    args.extend(tls.iter().map(String::as_str));
    args.extend_from_slice(extra);
    let err = dir.join(&format!("{name}.err"));
    let p = Proc::spawn(
        ns.command(lockstep_bin(), &args),
        dir.join(&format!("{name}.out")),
        err.clone(),
    )
    .unwrap_or_else(|e| panic!("start the backup '{name}': {e}"));
    assert!(
        crate::wait_for_line(&err, "listening on", Duration::from_secs(10), || true),
        "the backup '{name}' did not start:\n{}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    p
}

/// Fails the test unless `file` shows `needle` within `limit`.
pub fn wait_log(file: &Path, needle: &str, limit: Duration) {
    assert!(
        crate::wait_for_line(file, needle, limit, || true),
        "{} did not show '{needle}' within {limit:?}:\n{}",
        file.display(),
        std::fs::read_to_string(file).unwrap_or_default()
    );
}

/// A TCP proxy inside the namespace that can be cut: after `cut`, it keeps both
/// connections open and reads everything, but forwards nothing.
pub struct Proxy {
    cut: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(ns: &Netns, listen: &str, upstream: &str) -> Proxy {
        let listener = ns.listen(listen).expect("proxy listener");
        let cut = Arc::new(AtomicBool::new(false));
        let ns_name = ns.name.clone();
        let upstream = upstream.to_string();
        let c = cut.clone();
        std::thread::spawn(move || {
            // The namespace is the test's: this copy must not delete it when dropped.
            let ns = std::mem::ManuallyDrop::new(Netns { name: ns_name });
            for conn in listener.incoming() {
                let Ok(down) = conn else { break };
                let Ok(up) = ns.connect(&upstream, Duration::from_secs(5)) else {
                    break;
                };
                for (mut from, mut to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = vec![0u8; 1 << 16];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if !c.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Proxy { cut }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
}

/// A started pair under load: backup and primary with the extra options `args` gives for
/// the pair's directory (backup's, primary's), epoch 1 committed, and the client past its
/// first 50 replies. With `proxy`, the primary reaches the backup through a [`Proxy`] that
/// can be cut.
pub struct Pair {
    pub dir: TempDir,
    pub ns: Netns,
    pub backup: Proc,
    pub primary: Proc,
    pub proxy: Option<Proxy>,
    /// The man in the middle, for [`Link::Tampered`].
    pub tamper: Option<TamperProxy>,
    pub load: Load,
}

/// How the primary reaches the backup.
#[derive(Clone, Copy, Debug)]
pub enum Link {
    /// Directly.
    Direct,
    /// Through a [`Proxy`] that can be cut.
    Proxy,
    /// Through a [`TamperProxy`] that tampers with the record after that many data records.
    Tampered(Tamper, usize),
}

impl Pair {
    pub fn start(
        prefix: &str,
        proxy: bool,
        args: impl FnOnce(&TempDir) -> (Vec<String>, Vec<String>),
    ) -> Pair {
        let link = if proxy { Link::Proxy } else { Link::Direct };
        Pair::start_through(prefix, link, args)
    }

    /// [`Pair::start`] with the primary reaching the backup as `link` says.
    pub fn start_through(
        prefix: &str,
        link: Link,
        args: impl FnOnce(&TempDir) -> (Vec<String>, Vec<String>),
    ) -> Pair {
        let dir = TempDir::new(prefix);
        let ns = Netns::create(prefix).expect("network namespace");
        let (backup_extra, primary_extra) = args(&dir);
        let backup_extra: Vec<&str> = backup_extra.iter().map(String::as_str).collect();
        let primary_extra: Vec<&str> = primary_extra.iter().map(String::as_str).collect();
        let backup = backup_cmd(&ns, &dir, "127.0.0.1:7600", &backup_extra);
        let (mut proxy, mut tamper) = (None, None);
        match link {
            Link::Direct => {}
            Link::Proxy => proxy = Some(Proxy::start(&ns, "127.0.0.1:7601", "127.0.0.1:7600")),
            Link::Tampered(how, after) => {
                let listener = ns.listen("127.0.0.1:7601").expect("proxy listener");
                let ns_name = ns.name.clone();
                let connect = move || {
                    // The namespace is the test's: this copy must not delete it when dropped.
                    let ns = std::mem::ManuallyDrop::new(Netns { name: ns_name });
                    ns.connect("127.0.0.1:7600", Duration::from_secs(5))
                };
                tamper =
                    Some(TamperProxy::start(listener, connect, how, after).expect("tamper proxy"));
            }
        }
        let peer = if matches!(link, Link::Direct) {
            "127.0.0.1:7600"
        } else {
            "127.0.0.1:7601"
        };
        let primary = primary_cmd(&ns, &dir, peer, &primary_extra);
        wait_log(
            &dir.join("backup.err"),
            "epoch 1 committed",
            Duration::from_secs(30),
        );
        let load = Load::start(&ns);
        load.wait_for_replies(50, Duration::from_secs(15));
        Pair {
            dir,
            ns,
            backup,
            primary,
            proxy,
            tamper,
            load,
        }
    }
}
