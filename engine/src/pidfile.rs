//! The pid file a fence agent on the same host uses to find a lockstep process
//! (`--pid-file PATH`, `scripts/fence-pidfile`).

use std::path::{Path, PathBuf};

use thiserror::Error;

/// The pid file could not be written.
#[derive(Debug, Error)]
#[error("cannot write the pid file {path}: {source}")]
pub struct PidFileError {
    /// The pid file.
    pub path: PathBuf,
    /// The error from the file system.
    pub source: std::io::Error,
}

/// This process's pid in a file, `PID\n`, for as long as the value lives.
///
/// Dropped on an orderly end (the process is about to exit), the file is removed, so that
/// a file left behind always names a process that was killed or crashed, and a stale file
/// from an earlier clean run cannot vouch for a victim. A process that is SIGKILLed leaves
/// it: the agent finds the pid gone, which is what fencing needs to know.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes the file (replacing an old one) in one step: the pid goes to a temporary file
    /// beside it, which is then renamed over `path`, so a reader (a fence agent, a script
    /// waiting for the file) never sees it empty or half written.
    pub fn create(path: &Path) -> Result<PidFile, PidFileError> {
        let error = |source| PidFileError {
            path: path.to_path_buf(),
            source,
        };
        let name = path
            .file_name()
            .ok_or_else(|| error(std::io::Error::other("not a file name")))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        std::fs::write(&tmp, format!("{}\n", std::process::id())).map_err(error)?;
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(error(e));
        }
        Ok(PidFile {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Only our own: another process may have written its pid there since.
        let ours = std::fs::read_to_string(&self.path)
            .is_ok_and(|s| s.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_then_removed_unless_someone_else_took_it_over() {
        let dir = std::env::temp_dir().join(format!("lockstep-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.pid");
        let f = PidFile::create(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["p.pid"], "the temporary file was left behind");
        drop(f);
        assert!(!path.exists());
        let f = PidFile::create(&path).unwrap();
        std::fs::write(&path, "1\n").unwrap();
        drop(f);
        assert!(path.exists(), "another process's pid file was removed");
        let e = PidFile::create(&dir.join("no/such/dir/p.pid")).unwrap_err();
        assert!(
            e.to_string().starts_with("cannot write the pid file"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
