//! checkpoint

pub mod codec;
pub mod delta_cache;
pub mod digest;
pub mod encode;
pub mod handshake;
pub mod inflight;
pub mod protocol;
pub mod staging;
pub mod transport;

/// Size of a guest page: the unit of dirty tracking, encoding and transfer.
pub const PAGE_SIZE: usize = 4096;
