//! The replication link's TLS for the tests and the demo: a pair's certificates, made by
//! `lockstep certs` (the command users run), and the options that give them to a node.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A pair's certificates in a directory of their own.
#[derive(Debug, Clone)]
pub struct PairTls {
    dir: PathBuf,
}

impl PairTls {
    /// Runs `bin certs` for the pair `name` and nodes `node1`, `node2` into `dir` (made);
    /// an error says what `lockstep certs` said.
    pub fn make(bin: &Path, dir: &Path, name: &str) -> Result<PairTls, String> {
        let out = Command::new(bin)
            .args(["certs", "--name", name, "--nodes", "node1,node2", "--out"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run {} certs: {e}", bin.display()))?;
        if !out.status.success() {
            return Err(format!(
                "lockstep certs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(PairTls {
            dir: dir.to_path_buf(),
        })
    }

    /// The pair's certificates already in `dir` (made by [`PairTls::make`] before).
    pub fn existing(dir: &Path) -> Option<PairTls> {
        dir.join("ca.pem").exists().then(|| PairTls {
            dir: dir.to_path_buf(),
        })
    }

    /// `--tls-ca`, `--tls-cert` and `--tls-key` for `node` (`node1` or `node2`).
    pub fn args(&self, node: &str) -> Vec<String> {
        let file = |f: String| self.dir.join(f).to_string_lossy().into_owned();
        vec![
            "--tls-ca".into(),
            file("ca.pem".into()),
            "--tls-cert".into(),
            file(format!("{node}.pem")),
            "--tls-key".into(),
            file(format!("{node}.key")),
        ]
    }
}

/// The TLS options of `node` for a pair named `lockstep` (the default) whose certificates
/// live in `<dir>/tls`, made on first use; panics (failing the test) if they cannot be.
pub fn tls_args(dir: &Path, node: &str) -> Vec<String> {
    let tls = dir.join("tls");
    let pair = PairTls::existing(&tls).map_or_else(
        || PairTls::make(crate::bin::lockstep_bin(), &tls, "lockstep"),
        Ok,
    );
    match pair {
        Ok(p) => p.args(node),
        Err(e) => panic!("{e}"),
    }
}

/// What [`TamperProxy`] does to one TLS record of the client's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tamper {
    /// Flips one bit of the record's payload.
    Flip,
    /// Sends the record twice.
    Replay,
    /// Sends the record after the next one.
    Reorder,
    /// Leaves the record out.
    Drop,
}

/// A man in the middle for tests: forwards the server's bytes as they are and the client's
/// TLS records one by one (a TLS record: 5-byte header, then its length), tampering with
/// the record after the `after`-th application-data record (content type 23). Serves one
/// connection.
#[derive(Debug)]
pub struct TamperProxy {
    /// Where the client connects.
    pub addr: std::net::SocketAddr,
    tampered: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl TamperProxy {
    /// Takes one connection on `listener` and forwards it to the stream `connect` opens.
    pub fn start(
        listener: std::net::TcpListener,
        connect: impl FnOnce() -> std::io::Result<std::net::TcpStream> + Send + 'static,
        tamper: Tamper,
        after: usize,
    ) -> std::io::Result<TamperProxy> {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        let addr = listener.local_addr()?;
        let tampered = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = tampered.clone();
        std::thread::spawn(move || {
            let Ok((mut client, _)) = listener.accept() else {
                return;
            };
            let Ok(mut up) = connect() else {
                return;
            };
            // Records go on one by one, small ones (acks, heartbeats) at once.
            let _ = (client.set_nodelay(true), up.set_nodelay(true));
            if let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), up.try_clone()) {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut u2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Write);
                });
            }
            let mut data = 0;
            let mut held: Option<Vec<u8>> = None;
            while let Some(mut r) = tls_record(&mut client) {
                if r[0] == 23 {
                    data += 1;
                    if data == after {
                        flag.store(true, Ordering::SeqCst);
                        match tamper {
                            Tamper::Flip => {
                                let at = 5 + (r.len() - 5) / 2;
                                r[at] ^= 0x01;
                            }
                            Tamper::Replay => {
                                let _ = up.write_all(&r);
                            }
                            Tamper::Reorder => {
                                held = Some(r);
                                continue;
                            }
                            Tamper::Drop => continue,
                        }
                    }
                }
                if up.write_all(&r).is_err() {
                    break;
                }
                if let Some(h) = held.take() {
                    let _ = up.write_all(&h);
                }
            }
            let _ = up.shutdown(std::net::Shutdown::Write);
        });
        Ok(TamperProxy { addr, tampered })
    }

    /// Whether the tampering happened (the client sent that many records).
    pub fn tampered(&self) -> bool {
        self.tampered.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Reads one TLS record (None at the end of the stream).
fn tls_record(from: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut h = [0u8; 5];
    from.read_exact(&mut h).ok()?;
    let len = u16::from_be_bytes([h[3], h[4]]) as usize;
    let mut r = h.to_vec();
    r.resize(5 + len, 0);
    from.read_exact(&mut r[5..]).ok()?;
    Some(r)
}
