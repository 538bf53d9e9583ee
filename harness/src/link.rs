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
