//! `lockstep certs`: a pair's CA and node certificates for the replication link's TLS.
//!
//! For small setups and tests; a site with its own PKI issues the same shape itself: each
//! node's certificate carries the pair's name (`--name`) as a DNS subject alternative name,
//! for both TLS client and server use (docs/security.md).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Args;

use super::{usage, CliError};
use engine::replication::DEFAULT_NAME;

/// Longest validity `--days` accepts (about 100 years).
const MAX_DAYS: u32 = 36_500;

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// the directory to write to (made if missing; existing files are never replaced)
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// the pair's name, as both nodes' --name (default lockstep)
    #[arg(long, value_name = "NAME", allow_hyphen_values = true)]
    name: Option<String>,
    /// the nodes to issue certificates for, comma-separated (default node1,node2)
    #[arg(long, value_name = "A,B", value_delimiter = ',')]
    nodes: Vec<String>,
    /// validity in days from now (default 365)
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    days: Option<i64>,
}

/// Writes `DIR/ca.pem`, and `DIR/NODE.pem` and `DIR/NODE.key` (mode 0600) for each node.
pub fn run(a: CertsArgs) -> Result<ExitCode, CliError> {
    let dir = a.out.ok_or_else(|| usage("--out DIR is required"))?;
    let name = a.name.unwrap_or_else(|| DEFAULT_NAME.to_string());
    let nodes = if a.nodes.is_empty() {
        vec!["node1".to_string(), "node2".to_string()]
    } else {
        a.nodes
    };
    for n in &nodes {
        if n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || n.starts_with('.')
        {
            return Err(usage(format!(
                "--nodes: '{n}' is no node name (letters, digits, '-', '_' and '.')"
            )));
        }
    }
    if nodes.iter().any(|n| n == "ca") {
        return Err(usage(
            "--nodes: 'ca' names the CA's file (ca.pem): choose another node name",
        ));
    }
    if let Some(dup) = nodes
        .iter()
        .find(|n| nodes.iter().filter(|m| m == n).count() > 1)
    {
        return Err(usage(format!("--nodes: '{dup}' is named twice")));
    }
    let days = match a.days {
        None => 365,
        Some(d) if (1..=i64::from(MAX_DAYS)).contains(&d) => d,
        Some(d) => return Err(usage(format!("--days {d}: must be from 1 to {MAX_DAYS}"))),
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
    // Valid from an hour ago: clocks of two nodes differ a little.
    let set = checkpoint::tls::generate(&name, &refs, now - 3600, now + days * 86400)
        .map_err(|e| usage(e.to_string()))?;

    let mut files = vec![(dir.join("ca.pem"), set.ca.clone(), 0o644)];
    for (node, cert, key) in &set.nodes {
        files.push((dir.join(format!("{node}.pem")), cert.clone(), 0o644));
        files.push((dir.join(format!("{node}.key")), key.clone(), 0o600));
    }
    if let Some((p, _, _)) = files.iter().find(|(p, _, _)| p.exists()) {
        return Err(CliError::Failed(format!(
            "{} exists: lockstep certs never replaces a file (choose another --out)",
            p.display()
        )));
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| CliError::Failed(format!("cannot make {}: {e}", dir.display())))?;
    for (path, pem, mode) in &files {
        write_new(path, pem.as_bytes(), *mode)
            .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", path.display())))?;
    }
    println!(
        "pair '{name}': CA {}; valid {days} days",
        dir.join("ca.pem").display()
    );
    for node in &nodes {
        println!(
            "  {node}: --name {name} --tls-ca {} --tls-cert {} --tls-key {}",
            dir.join("ca.pem").display(),
            dir.join(format!("{node}.pem")).display(),
            dir.join(format!("{node}.key")).display()
        );
    }
    println!("copy each node's .pem and .key to that node only; the CA's key is not kept");
    Ok(ExitCode::SUCCESS)
}

/// Creates `path` (failing if it exists) with `mode`, and writes `data` to it.
fn write_new(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}
