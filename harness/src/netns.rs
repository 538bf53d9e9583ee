//! Network namespaces: a private network with a tap for a guest, and sockets made inside it.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Runs a command to completion; an error names it.
pub(crate) fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!(
            "'{}' failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A namespace with `tap0` at 10.0.0.1/24 and loopback up, its name `prefix` made
    /// unique.
    pub fn create(prefix: &str) -> Result<Netns, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let ns = Netns::empty(&name)?;
        for cmd in [
            &["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"][..],
            &["ip", "addr", "add", "10.0.0.1/24", "dev", "tap0"],
            &["ip", "link", "set", "tap0", "up"],
        ] {
            let mut full = vec!["ip", "netns", "exec", &ns.name];
            full.extend_from_slice(cmd);
            sh(&full)?;
        }
        Ok(ns)
    }

    /// A namespace named exactly `name` with only loopback, up (no tap, no address).
    pub fn empty(name: &str) -> Result<Netns, String> {
        sh(&["ip", "netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        sh(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `program args...` inside the namespace (`ip netns exec` execs it: same pid).
    pub fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(program)
            .args(args);
        c
    }

    /// Runs `f` on a thread that entered the namespace; sockets it creates live there,
    /// whichever thread uses them afterwards.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                use std::os::fd::AsFd;
                let ns = std::fs::File::open(&path)?;
                // setns(2) changes only this thread's network namespace, and the thread
                // ends with the scope.
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
        })
    }

    /// A TCP connection from inside the namespace.
    pub fn connect(&self, addr: &str, timeout: Duration) -> io::Result<TcpStream> {
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| io::Error::other(format!("bad address {addr}")))?;
        self.within(|| TcpStream::connect_timeout(&addr, timeout))
    }

    /// A listener inside the namespace.
    pub fn listen(&self, addr: &str) -> io::Result<TcpListener> {
        self.within(|| TcpListener::bind(addr))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
