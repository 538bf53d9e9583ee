//! The arithmetic of the hash workload, free of any guest detail (so that a host program
//! can include this file to check results and timings).
//!
//! Two buffers of `n` 64-byte blocks. Round `r` computes every block `i` of the new
//! buffer from block `i` of the previous one and from `READS` more blocks of it, each
//! chosen by the data read so far: a dependent chain of random reads over the whole
//! previous buffer. Block `i` depends only on `(i, r, previous buffer)`, so the result
//! does not depend on which vCPU computes which block.

/// One 64-byte block (a cache line).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block(pub [u64; 8]);

/// Data-dependent reads per block and round.
pub const READS: usize = 4;

const SEED: u64 = 0x6c6f_636b_7374_6570; // "lockstep"

/// The splitmix64 finaliser: a cheap bijective 64-bit mix.
#[inline(always)]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Maps a 64-bit value uniformly onto `0..n`.
#[inline(always)]
fn reduce(x: u64, n: usize) -> usize {
    ((u128::from(x) * n as u128) >> 64) as usize
}

/// Block `i` of the first buffer.
pub fn init_block(i: u64) -> Block {
    let mut block = Block([0; 8]);
    for (lane, word) in block.0.iter_mut().enumerate() {
        *word = mix(SEED ^ (i << 3 | lane as u64));
    }
    block
}

/// Block `i` of round `round`'s output, from the previous round's buffer `src`.
#[inline(always)]
pub fn compute_block(i: usize, round: u64, src: &[Block]) -> Block {
    let mut state = src[i].0;
    let mut x = mix(SEED ^ (i as u64) ^ round.rotate_left(40));
    for _ in 0..READS {
        let other = &src[reduce(x, src.len())].0;
        for lane in 0..8 {
            state[lane] = (state[lane] ^ other[lane])
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(23)
                .wrapping_add(x);
        }
        x = mix(x ^ state[0] ^ state[5]);
    }
    Block(state)
}

/// Folds a buffer into one 64-bit value.
pub fn fold(buffer: &[Block]) -> u64 {
    let mut h = SEED ^ buffer.len() as u64;
    for block in buffer {
        for &word in &block.0 {
            h = (h ^ word)
                .wrapping_mul(0xff51_afd7_ed55_8ccd)
                .rotate_left(29);
        }
    }
    mix(h)
}
