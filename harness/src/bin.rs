//! The `lockstep` binary under test: `LOCKSTEP_BIN`, or built once with cargo into the
//! target directory and profile of the running executable.
//!
//! A test executable is `<target>/<profile>/deps/<name>-<hash>`, the benchmark
//! `<target>/<profile>/bench`; either way `cargo build -p lockstep --bin lockstep` puts the
//! binary at `<target>/<profile>/lockstep` (a no-op when it is up to date).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The `lockstep` binary, built on first use; panics (failing the test) if it cannot be.
pub fn lockstep_bin() -> &'static Path {
    match try_lockstep_bin() {
        Ok(bin) => bin,
        Err(e) => panic!("{e}"),
    }
}

/// The `lockstep` binary, built on first use (once per process); an error says why not.
pub fn try_lockstep_bin() -> Result<&'static Path, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("LOCKSTEP_BIN") {
        Some(path) => Ok(PathBuf::from(path)),
        None => build_lockstep(),
    })
    .as_ref()
    .map(PathBuf::as_path)
    .map_err(Clone::clone)
}

/// Builds `lockstep` into the target directory and profile the running executable was
/// built in.
fn build_lockstep() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let unexpected = || format!("unexpected executable path {}", exe.display());
    let mut profile_dir = exe.parent().ok_or_else(unexpected)?;
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir = profile_dir.parent().ok_or_else(unexpected)?;
    }
    let target_dir = profile_dir.parent().ok_or_else(unexpected)?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(unexpected)?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace directory")?;

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--quiet", "-p", "lockstep", "--bin", "lockstep"])
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run cargo to build lockstep: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building lockstep failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let bin = profile_dir.join("lockstep");
    if !bin.is_file() {
        return Err(format!(
            "cargo built lockstep, but {} does not exist",
            bin.display()
        ));
    }
    Ok(bin)
}
