//! The end-to-end tests of lockstep live in `tests/tests/`; they drive the real `lockstep`
//! binary and the engine's Machine API with the shared [`harness`], re-exported here, and
//! speak to the control socket with [`ctl`].
//!
//! `cargo test --release --workspace` from a fresh clone works: the first test that needs
//! the binary runs `cargo build -p lockstep --bin lockstep` once per test executable (a
//! no-op when it is up to date). `LOCKSTEP_BIN=/path/to/lockstep` skips the build and
//! tests that binary instead.

pub use harness::*;

pub mod ctl;

/// A sparse disk image of `bytes` bytes at `path` (all zeros until written).
pub fn sparse_image(path: &std::path::Path, bytes: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(bytes))
        .expect("create an image");
}
