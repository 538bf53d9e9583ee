//! Fuzzing of every decoder that reads bytes from the network: the frame header, each
//! message, page batches, the page codec, and backup staging fed whole message sequences.
//!
//! Inputs are valid encodings made by the real encoders (the seed corpus, plus the byte
//! files in `tests/corpus/`), mutated (bit flips, truncations, extensions, splices, length
//! fields overwritten with huge values, frames re-sealed so the damage gets past the CRC),
//! and fully random bytes. Each target asserts: no panic, no allocation out of proportion
//! to the input, an error that says something for bad input, a round trip for good input.
//!
//! `LOCKSTEP_FUZZ_CASES=100000 cargo test --release -p checkpoint --test fuzz_decoders`
//! runs longer than the bounded default (see docs/fuzzing.md).

use bytes::Bytes;
use checkpoint::codec::{decode_page, encode_page, Encoding};
use checkpoint::digest::Digest;
use checkpoint::protocol::{
    frame_crc, FrameHeader, Hello, MemoryRegion, Message, PagesFrameBuilder, HEADER_LEN,
    MAX_PAYLOAD_LEN,
};
use checkpoint::staging::{Staging, Step};
use checkpoint::PAGE_SIZE;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryMmap};

#[path = "support/fuzz.rs"]
mod fuzz;

use fuzz::{apply, config, measured, Mutation};

/// What decoding `input_len` bytes may allocate at once: proportional to the input, plus
/// slack for error texts and a page or two.
fn alloc_bound(input_len: usize) -> usize {
    2 * input_len + 64 * 1024
}

// ---------------------------------------------------------------------------------------
// Case counts, mutations.

fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(0x7f),
        Just(0xff),
        Just(0x1000),
        Just(0xffff),
        Just(0x0010_0000),
        Just(0x0100_0000),
        Just(0x7fff_ffff),
        Just(u32::MAX),
        any::<u32>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        1 => any::<usize>().prop_map(|keep| Mutation::Truncate { keep }),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..32))
            .prop_map(|(at, bytes)| Mutation::Splice { at, bytes }),
        1 => (any::<usize>(), 1usize..32).prop_map(|(at, n)| Mutation::Remove { at, n }),
        2 => (any::<usize>(), interesting_u32()).prop_map(|(at, v)| Mutation::Word { at, v }),
        1 => (any::<usize>(), any::<u64>()).prop_map(|(at, v)| Mutation::Quad { at, v }),
    ]
}

/// Makes a damaged frame self-consistent again (payload length and CRC), so the damage
/// reaches the payload decoders instead of stopping at the checksum.
fn reseal(frame: &mut [u8]) {
    if frame.len() < HEADER_LEN {
        return;
    }
    let payload_len = (frame.len() - HEADER_LEN) as u32;
    frame[16..20].copy_from_slice(&payload_len.to_le_bytes());
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(&frame[..HEADER_LEN]);
    let crc = frame_crc(&hb, &frame[HEADER_LEN..]);
    frame[20..24].copy_from_slice(&crc.to_le_bytes());
}

/// Seeds mutated (and re-sealed, most of the time), or random bytes.
fn damaged(seeds: Vec<Vec<u8>>, max_random: usize) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..max_random),
        1 => (0..n).prop_map({
            let seeds = seeds.clone();
            move |i| seeds[i].clone()
        }),
        6 => (
            0..n,
            0..n,
            prop::collection::vec(mutation(), 1..6),
            any::<bool>(),
            any::<usize>(),
        )
            .prop_map(move |(i, j, muts, keep_crc, cut)| {
                let mut b = seeds[i].clone();
                // Now and then, graft the tail of another seed (a random splice).
                if cut % 5 == 0 && !seeds[j].is_empty() {
                    let from = cut % seeds[j].len();
                    b.extend_from_slice(&seeds[j][from..]);
                }
                for m in &muts {
                    apply(&mut b, m);
                }
                if !keep_crc {
                    reseal(&mut b);
                }
                b
            }),
    ]
}

// ---------------------------------------------------------------------------------------
// Seed corpus: frames from the real encoders.

fn test_page(seed: u8) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    for (i, b) in p.iter_mut().enumerate() {
        *b = seed.wrapping_mul(31).wrapping_add((i % 97) as u8);
    }
    p
}

/// A page batch with one page of each encoding.
fn batch_frames() -> Vec<Bytes> {
    let base = test_page(1);
    let mut sparse = base;
    sparse[100] ^= 0x5a;
    sparse[3000] ^= 0x01;
    let mut random = [0u8; PAGE_SIZE];
    let mut x = 0x9e37_79b9_u32;
    for b in random.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    // Mostly zeros: a zero-run coding of the page itself.
    let mut sparse_page = [0u8; PAGE_SIZE];
    sparse_page[8..16].copy_from_slice(b"lockstep");
    sparse_page[2048] = 7;
    let mut pages = PagesFrameBuilder::pages(7, 64 << 10);
    let mut sync = PagesFrameBuilder::sync(64 << 10);
    let mut encs = Vec::new();
    for (pfn, (page, base)) in [
        ([0u8; PAGE_SIZE], None),
        (random, None),
        (test_page(2), None),
        (sparse, Some(&base)),
        (test_page(9), Some(&base)),
        (sparse_page, None),
    ]
    .iter()
    .enumerate()
    {
        encs.push(pages.push(pfn as u64, |out| encode_page(page, *base, out)));
        sync.push(pfn as u64, |out| encode_page(page, *base, out));
    }
    for e in Encoding::ALL {
        assert!(encs.contains(&e), "the corpus lacks a {e:?} page: {encs:?}");
    }
    vec![pages.finish(), sync.finish_sync(4096, 1 << 20)]
}

fn sample_messages() -> Vec<Message> {
    vec![
        Message::Hello(
            Hello::new(
                2,
                vec![
                    MemoryRegion {
                        gpa: 0,
                        len: 512 << 20,
                    },
                    MemoryRegion {
                        gpa: 4 << 30,
                        len: 1 << 30,
                    },
                ],
                42,
            )
            .with_disks(vec![
                checkpoint::protocol::DiskInfo {
                    size: 64 << 20,
                    readonly: false,
                },
                checkpoint::protocol::DiskInfo {
                    size: 1 << 20,
                    readonly: true,
                },
            ]),
        ),
        Message::HelloOk,
        Message::Refuse {
            reason: "vCPU count differs: backup 2, primary 4".into(),
        },
        Message::EpochBegin {
            epoch: 7,
            page_count: 3,
            state_len: 5,
        },
        Message::State {
            epoch: 7,
            bytes: Bytes::from_static(b"state"),
        },
        Message::EpochCommit {
            epoch: 7,
            page_count: 3,
            frame_count: 1,
            disk_frames: 0,
            state_len: 5,
            digest: 0xdead_beef_cafe_f00d,
        },
        Message::Ack { epoch: 7 },
        Message::Nack {
            epoch: 8,
            reason: "digest mismatch: é".into(),
        },
        Message::Heartbeat { epoch: 7 },
        Message::End {
            epoch: 7,
            digest: 1,
        },
        Message::Handover {
            epoch: 7,
            new_backup: "10.0.0.9:7600".into(),
        },
        Message::Handover {
            epoch: 7,
            new_backup: String::new(),
        },
        Message::Leave {
            epoch: 7,
            reason: "disk full".into(),
        },
        Message::DiskSums {
            disk: 1,
            first: 64,
            sums: vec![[0xab; 16], [0xcd; 16]],
        },
        Message::DiskSync {
            disk: 0,
            offset: 1 << 20,
            bytes_done: 4096,
            bytes_total: 8192,
            data: Bytes::from(vec![5u8; 4096]),
        },
        Message::DiskWrites {
            epoch: 7,
            disk: 0,
            writes: vec![
                (512, Bytes::from(vec![1u8; 512])),
                (8192, Bytes::from(vec![2u8; 1024])),
            ],
        },
        Message::Output {
            epoch: 7,
            released: 6,
            frames: vec![
                Bytes::from_static(&[0x52; 60]),
                Bytes::from_static(&[1; 1514]),
            ],
        },
    ]
}

/// The checked-in corpus files (frames found worth keeping), then every message kind.
fn frame_corpus() -> Vec<Vec<u8>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    let mut seeds: Vec<Vec<u8>> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    seeds.extend(batch_frames().iter().map(|b| b.to_vec()));
    seeds.extend(
        sample_messages()
            .iter()
            .map(|m| m.to_frame().unwrap().to_vec()),
    );
    seeds
}

// ---------------------------------------------------------------------------------------
// Targets.

/// Decodes `input` as a frame and checks everything that must hold either way.
fn check_frame(input: &[u8]) -> Result<(), TestCaseError> {
    let buf = Bytes::copy_from_slice(input);
    let (r, largest) = measured(|| Message::decode(&buf));
    prop_assert!(
        largest <= alloc_bound(input.len()),
        "decoding {} bytes allocated {largest} bytes at once",
        input.len()
    );
    match r {
        Ok((msg, used)) => {
            prop_assert!(used <= input.len() && used >= HEADER_LEN);
            // Round trip: what decoded encodes to a frame that decodes to the same.
            let frame = msg
                .to_frame()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let (again, n) =
                Message::decode(&frame).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&again, &msg);
            prop_assert_eq!(n, frame.len());
            // Frames are canonical: one message, one encoding.
            prop_assert_eq!(&frame[..], &input[..used]);
            if let Message::Pages { pages, .. } | Message::SyncPages { pages, .. } = &msg {
                // The iterator sees exactly the entries the parser counted, and every
                // payload goes through the page codec without panicking.
                prop_assert_eq!(pages.iter().count() as u64, u64::from(pages.len()));
                let mut dest = test_page(3);
                for e in pages.iter() {
                    let _ = decode_page(e.encoding, e.payload, &mut dest);
                }
            }
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(2048))]

    /// Any 24 bytes: the parser accepts exactly the well-formed headers, and what it
    /// accepts re-encodes to the same bytes.
    #[test]
    fn frame_header_parse(input in prop_oneof![
        prop::array::uniform24(any::<u8>()),
        damaged(frame_corpus(), 24).prop_map(|v| {
            let mut h = [0u8; HEADER_LEN];
            let n = v.len().min(HEADER_LEN);
            h[..n].copy_from_slice(&v[..n]);
            h
        }),
    ]) {
        match FrameHeader::parse(&input) {
            Ok(h) => {
                prop_assert_eq!(h.to_bytes(), input);
                prop_assert!(h.message_kind().is_ok());
                prop_assert_eq!(h.flags, 0);
                prop_assert!(h.payload_len as usize <= MAX_PAYLOAD_LEN);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// Whole frames of every kind, damaged or random.
    #[test]
    fn message_decode(input in damaged(frame_corpus(), 256)) {
        check_frame(&input)?;
    }

    /// `Pages` and `SyncPages` frames only: page batch parsing and the entries' codec.
    #[test]
    fn page_batch_decode(
        input in damaged(batch_frames().iter().map(|b| b.to_vec()).collect(), 64)
    ) {
        check_frame(&input)?;
    }

    /// Frames whose header announces more than the buffer holds (up to the maximum):
    /// an `Incomplete` error, no allocation of the announced size.
    #[test]
    fn message_decode_announced_length(
        seed in 0usize..64,
        len in prop_oneof![Just(MAX_PAYLOAD_LEN as u32), Just(u32::MAX), any::<u32>()],
    ) {
        let seeds = frame_corpus();
        let mut f = seeds[seed % seeds.len()].clone();
        f[16..20].copy_from_slice(&len.to_le_bytes());
        check_frame(&f)?;
    }
}

/// A page from a few shapes: zero, random, mostly `base` with a few bytes changed.
fn page_pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let page = || prop::collection::vec(any::<u8>(), PAGE_SIZE);
    prop_oneof![
        (page(), page()),
        page().prop_map(|b| (vec![0; PAGE_SIZE], b)),
        (
            page(),
            prop::collection::vec((0..PAGE_SIZE, any::<u8>()), 0..80)
        )
            .prop_map(|(base, edits)| {
                let mut p = base.clone();
                for (at, v) in edits {
                    p[at] = v;
                }
                (p, base)
            }),
        (any::<u8>(), page()).prop_map(|(s, base)| (test_page(s).to_vec(), base)),
        // Mostly zeros (a few runs of bytes): the zero-run coding of the page (`Rle`),
        // against a random base or a base that is the page with a few changes.
        (
            prop::collection::vec(
                (0..PAGE_SIZE, prop::collection::vec(any::<u8>(), 1..64)),
                0..12
            ),
            page(),
            any::<bool>(),
        )
            .prop_map(|(runs, base, near)| {
                let mut p = vec![0u8; PAGE_SIZE];
                for (at, bytes) in runs {
                    let end = (at + bytes.len()).min(PAGE_SIZE);
                    p[at..end].copy_from_slice(&bytes[..end - at]);
                }
                let base = if near {
                    let mut b = p.clone();
                    b[PAGE_SIZE / 2] ^= 1;
                    b
                } else {
                    base
                };
                (p, base)
            }),
    ]
}

fn as_page(v: &[u8]) -> &[u8; PAGE_SIZE] {
    v.try_into().unwrap()
}

proptest! {
    #![proptest_config(config(1024))]

    /// Every page encodes and decodes back to itself, with and without a base.
    #[test]
    fn page_codec_round_trips((page, base) in page_pair(), with_base in any::<bool>()) {
        let (page, base) = (as_page(&page), as_page(&base));
        let mut out = Vec::new();
        let enc = encode_page(page, with_base.then_some(base), &mut out);
        prop_assert!(out.len() <= PAGE_SIZE);
        let mut dest = *base;
        decode_page(enc, &out, &mut dest).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(dest == *page, "{enc:?} did not round-trip");
    }

    /// Damaged or random payloads under any encoding byte: an error leaves the page
    /// untouched, success writes a whole page, never a panic.
    #[test]
    fn page_codec_decode(
        (page, base) in page_pair(),
        muts in prop::collection::vec(mutation(), 0..5),
        enc_byte in prop_oneof![4 => 0u8..Encoding::ALL.len() as u8, 1 => any::<u8>()],
        random in prop::option::weighted(0.2, prop::collection::vec(any::<u8>(), 0..4200)),
    ) {
        let (page, base) = (as_page(&page), as_page(&base));
        let mut payload = Vec::new();
        encode_page(page, Some(base), &mut payload);
        for m in &muts {
            apply(&mut payload, m);
        }
        let payload = random.unwrap_or(payload);
        let Ok(enc) = Encoding::from_u8(enc_byte) else {
            prop_assert!(enc_byte as usize >= Encoding::ALL.len());
            return Ok(());
        };
        let mut dest = *base;
        let (r, largest) = measured(|| decode_page(enc, &payload, &mut dest));
        prop_assert!(largest <= alloc_bound(payload.len()));
        match r {
            Ok(()) => {
                if enc == Encoding::Zero {
                    prop_assert!(dest == [0; PAGE_SIZE]);
                }
                if enc == Encoding::Raw {
                    prop_assert_eq!(&dest[..], &payload[..]);
                }
            }
            Err(e) => {
                prop_assert!(dest == *base, "a failed {enc:?} decode changed the page: {e}");
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Staging: arbitrary message sequences against a backup that has committed epoch 1.

const PAGES: u64 = 16;
type Mem = GuestMemoryMmap<()>;

fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), PAGES as usize * PAGE_SIZE)]).unwrap()
}

fn snapshot(mem: &Mem) -> Vec<u8> {
    let mut v = vec![0u8; PAGES as usize * PAGE_SIZE];
    mem.read_slice(&mut v, GuestAddress(0)).unwrap();
    v
}

/// The frames of a well-formed epoch: pages against `base` (the backup's memory).
fn epoch_frames(
    epoch: u64,
    pages: &[(u64, [u8; PAGE_SIZE])],
    state: &[u8],
    base: &Mem,
) -> Vec<Bytes> {
    let mut d = Digest::new();
    let mut frames = Vec::new();
    for chunk in pages.chunks(2) {
        let mut b = PagesFrameBuilder::pages(epoch, 64 << 10);
        for (pfn, p) in chunk {
            let mut old = [0u8; PAGE_SIZE];
            base.read_slice(&mut old, GuestAddress(pfn * PAGE_SIZE as u64))
                .unwrap();
            b.push(*pfn, |out| encode_page(p, Some(&old), out));
            d.add_page(pfn * PAGE_SIZE as u64, p);
        }
        frames.push(b.finish());
    }
    let mut msgs = vec![Message::EpochBegin {
        epoch,
        page_count: pages.len() as u64,
        state_len: state.len() as u64,
    }
    .to_frame()
    .unwrap()];
    let frame_count = frames.len() as u32;
    msgs.extend(frames);
    msgs.push(
        Message::State {
            epoch,
            bytes: Bytes::copy_from_slice(state),
        }
        .to_frame()
        .unwrap(),
    );
    msgs.push(
        Message::EpochCommit {
            epoch,
            page_count: pages.len() as u64,
            frame_count,
            disk_frames: 0,
            state_len: state.len() as u64,
            digest: d.finish(state).0,
        }
        .to_frame()
        .unwrap(),
    );
    msgs
}

struct Backup {
    staging: Staging,
    mem: Mem,
    /// Memory once epoch 1 is committed, and once epoch 2 (the seeds) would be.
    after1: Vec<u8>,
    after2: Vec<u8>,
}

/// Staging as the backup makes it (`zeroed`: fresh memory known to be zero) or without
/// that knowledge.
fn staging(mem: &Mem, zeroed: bool) -> Staging {
    let s = Staging::new(mem, 1 << 16);
    if zeroed {
        s.with_zeroed_memory(mem)
    } else {
        s
    }
}

/// A backup after pre-copy and epoch 1, and the frames of a good epoch 2 (plus a pre-copy
/// batch, which must now be refused).
fn committed_once(zeroed: bool) -> (Backup, Vec<Vec<u8>>) {
    let mem = memory();
    let mut staging = staging(&mem, zeroed);
    let mut sync = PagesFrameBuilder::sync(1 << 20);
    for pfn in 0..PAGES {
        let p = test_page(pfn as u8);
        sync.push(pfn, |out| encode_page(&p, None, out));
    }
    let sync = sync.finish_sync(1, 2);
    staging
        .handle(&mem, Message::decode(&sync).unwrap().0)
        .unwrap();
    let mut p3 = test_page(3);
    p3[7] ^= 0x40;
    let e1 = epoch_frames(1, &[(3, p3), (4, [0; PAGE_SIZE])], b"state-1", &mem);
    let mut last = Step::Continue;
    for f in &e1 {
        last = staging.handle(&mem, Message::decode(f).unwrap().0).unwrap();
    }
    assert_eq!(last, Step::Committed { epoch: 1 });
    let after1 = snapshot(&mem);

    let mut p5 = test_page(5);
    p5[4000] ^= 0xff;
    let e2 = epoch_frames(
        2,
        &[
            (5, p5),
            (0, [0; PAGE_SIZE]),
            (9, test_page(200)),
            (15, test_page(7)),
        ],
        b"state-2",
        &mem,
    );
    // What epoch 2 leaves in memory, found by applying it to a copy.
    let copy = memory();
    let mut s2 = self::staging(&copy, zeroed);
    // The copy's staging must be at epoch 1 as well: replay the same history.
    s2.handle(&copy, Message::decode(&sync).unwrap().0).unwrap();
    for f in &e1 {
        s2.handle(&copy, Message::decode(f).unwrap().0).unwrap();
    }
    for f in &e2 {
        s2.handle(&copy, Message::decode(f).unwrap().0).unwrap();
    }
    assert_eq!(s2.committed_epoch(), 2);
    let after2 = snapshot(&copy);

    let mut seeds: Vec<Vec<u8>> = e2.iter().map(|b| b.to_vec()).collect();
    seeds.push(sync.to_vec());
    seeds.push(Message::Heartbeat { epoch: 1 }.to_frame().unwrap().to_vec());
    seeds.push(
        Message::End {
            epoch: 1,
            digest: 0,
        }
        .to_frame()
        .unwrap()
        .to_vec(),
    );
    (
        Backup {
            staging,
            mem,
            after1,
            after2,
        },
        seeds,
    )
}

/// One input of a sequence: a good frame, a damaged one, or a message made up from
/// scratch (for paths the decoders can't reach through damage, such as odd epochs).
#[derive(Debug, Clone)]
enum Input {
    Seed(usize),
    Bytes(Vec<u8>),
    Begin {
        epoch: u64,
        pages: u64,
        state: u64,
    },
    Commit {
        epoch: u64,
        pages: u64,
        frames: u32,
        state: u64,
        digest: u64,
    },
    State {
        epoch: u64,
        len: usize,
    },
}

fn input(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Input> {
    let n = seeds.len();
    let epoch = || prop_oneof![0u64..4, Just(u64::MAX), any::<u64>()];
    let count = || prop_oneof![0u64..20, Just(u64::MAX), any::<u64>()];
    prop_oneof![
        6 => (0..n).prop_map(Input::Seed),
        6 => damaged(seeds, 128).prop_map(Input::Bytes),
        1 => (epoch(), count(), count())
            .prop_map(|(epoch, pages, state)| Input::Begin { epoch, pages, state }),
        1 => (epoch(), count(), any::<u32>(), count(), any::<u64>()).prop_map(
            |(epoch, pages, frames, state, digest)| Input::Commit { epoch, pages, frames, state, digest }
        ),
        1 => (epoch(), 0usize..16).prop_map(|(epoch, len)| Input::State { epoch, len }),
    ]
}

fn message_of(i: &Input, seeds: &[Vec<u8>]) -> Option<Message> {
    let decoded = |b: &[u8]| {
        Message::decode(&Bytes::copy_from_slice(b))
            .ok()
            .map(|m| m.0)
    };
    match *i {
        Input::Seed(k) => decoded(&seeds[k]),
        Input::Bytes(ref b) => decoded(b),
        Input::Begin {
            epoch,
            pages,
            state,
        } => Some(Message::EpochBegin {
            epoch,
            page_count: pages,
            state_len: state,
        }),
        Input::Commit {
            epoch,
            pages,
            frames,
            state,
            digest,
        } => Some(Message::EpochCommit {
            epoch,
            page_count: pages,
            frame_count: frames,
            disk_frames: 0,
            state_len: state,
            digest,
        }),
        Input::State { epoch, len } => Some(Message::State {
            epoch,
            bytes: Bytes::from(vec![0x5a; len]),
        }),
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Whatever arrives, staging never panics, guest memory and the committed state change
    /// only when a whole verified epoch commits, and the only epoch that can commit is the
    /// genuine epoch 2.
    #[test]
    fn staging_message_sequences(
        seq in prop::collection::vec(input(committed_once(true).1), 1..16),
        zeroed in any::<bool>(),
    ) {
        let (mut b, seeds) = committed_once(zeroed);
        for i in &seq {
            let Some(msg) = message_of(i, &seeds) else { continue };
            let before = (b.staging.committed_epoch(), b.staging.committed_state().clone());
            let (r, largest) = measured(|| b.staging.handle(&b.mem, msg));
            prop_assert!(largest <= 512 * 1024, "staging allocated {largest} bytes at once");
            let now = snapshot(&b.mem);
            match r {
                Ok(Step::Committed { epoch }) => {
                    prop_assert_eq!(epoch, 2);
                    prop_assert_eq!(b.staging.committed_epoch(), 2);
                    prop_assert_eq!(&b.staging.committed_state()[..], b"state-2");
                    prop_assert!(now == b.after2, "epoch 2 committed other memory");
                }
                other => {
                    if let Err(e) = &other {
                        prop_assert!(!e.to_string().is_empty());
                    }
                    prop_assert_eq!(
                        (b.staging.committed_epoch(), b.staging.committed_state().clone()),
                        before.clone()
                    );
                    let expected = if before.0 == 2 { &b.after2 } else { &b.after1 };
                    prop_assert!(&now == expected, "memory changed without a commit: {other:?}");
                }
            }
        }
    }
}

/// The frames a fresh backup sees first: a pre-copy batch, then a good epoch 1.
fn first_frames() -> Vec<Vec<u8>> {
    let mut sync = PagesFrameBuilder::sync(1 << 20);
    for pfn in 0..PAGES {
        let p = if pfn % 3 == 0 {
            [0; PAGE_SIZE]
        } else {
            test_page(pfn as u8)
        };
        sync.push(pfn, |out| encode_page(&p, None, out));
    }
    let mut seeds = vec![sync.finish_sync(1, 2).to_vec()];
    let mut p3 = test_page(3);
    p3[7] ^= 0x40;
    // Deltas against the pre-copied contents (as the primary's cache would make them).
    let pre = memory();
    for pfn in 0..PAGES {
        let p = if pfn % 3 == 0 {
            [0; PAGE_SIZE]
        } else {
            test_page(pfn as u8)
        };
        pre.write_slice(&p, GuestAddress(pfn * PAGE_SIZE as u64))
            .unwrap();
    }
    let e1 = epoch_frames(1, &[(3, p3), (6, test_page(1))], b"state-1", &pre);
    seeds.extend(e1.iter().map(|b| b.to_vec()));
    seeds
}

proptest! {
    #![proptest_config(config(512))]

    /// A fresh backup (pre-copy allowed) fed damaged pre-copy batches and epochs: never a
    /// panic, errors that say something, and nothing but epoch 1 ever commits.
    #[test]
    fn staging_from_scratch(
        seq in prop::collection::vec(input(first_frames()), 1..16),
        zeroed in any::<bool>(),
    ) {
        let seeds = first_frames();
        let mem = memory();
        let mut s = staging(&mem, zeroed);
        for i in &seq {
            let Some(msg) = message_of(i, &seeds) else { continue };
            let (r, largest) = measured(|| s.handle(&mem, msg));
            prop_assert!(largest <= 512 * 1024, "staging allocated {largest} bytes at once");
            match r {
                Ok(Step::Committed { epoch }) => prop_assert_eq!(epoch, 1),
                Ok(_) => {}
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            prop_assert!(s.committed_epoch() <= 1);
        }
    }
}

/// The seeds alone, in order, commit epoch 2 (the corpus is valid).
#[test]
fn staging_seed_epoch_commits() {
    let (mut b, seeds) = committed_once(true);
    let mut last = Step::Continue;
    for f in &seeds[..seeds.len() - 3] {
        last = b
            .staging
            .handle(
                &b.mem,
                Message::decode(&Bytes::copy_from_slice(f)).unwrap().0,
            )
            .unwrap();
    }
    assert_eq!(last, Step::Committed { epoch: 2 });
    assert!(snapshot(&b.mem) == b.after2);
}

/// The checked-in corpus files are hostile frames (counts and lengths far beyond the
/// frame, under a valid CRC): each is refused as malformed, without a large allocation.
#[test]
fn corpus_files_are_refused() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let (r, largest) = measured(|| Message::decode(&Bytes::from(bytes.clone())));
        let err = r.expect_err(&path.display().to_string());
        assert!(
            err.to_string().starts_with("malformed "),
            "{}: {err}",
            path.display()
        );
        assert!(largest <= alloc_bound(bytes.len()), "{}", path.display());
        n += 1;
    }
    assert!(n >= 3);
}

/// The fresh backup's seeds, in order, commit epoch 1 (that corpus is valid too).
#[test]
fn staging_first_frames_commit() {
    for zeroed in [false, true] {
        let mem = memory();
        let mut s = staging(&mem, zeroed);
        let mut last = Step::Continue;
        for f in first_frames() {
            last = s
                .handle(&mem, Message::decode(&Bytes::from(f)).unwrap().0)
                .unwrap();
        }
        assert_eq!(last, Step::Committed { epoch: 1 });
    }
}

// ---------------------------------------------------------------------------------------
// The transport: a byte stream from a peer, read frame by frame off a real socket.

proptest! {
    #![proptest_config(config(48))]

    /// Frames (good and damaged) back to back on a TCP connection, cut anywhere: the
    /// receiver yields exactly what decoding the same bytes in one piece yields, then an
    /// error; its buffers stay within the largest legal frame.
    #[test]
    fn transport_recv_stream(
        frames in prop::collection::vec(damaged(frame_corpus(), 64), 1..8),
    ) {
        use std::io::Write as _;
        use std::net::{TcpListener, TcpStream};
        use std::time::Duration;
        use checkpoint::transport::Connection;

        let stream: Vec<u8> = frames.concat();
        // What one-shot decoding makes of the stream.
        let mut expected = Vec::new();
        let mut rest = Bytes::from(stream.clone());
        while let Ok((m, used)) = Message::decode(&rest) {
            expected.push(m);
            let _ = rest.split_to(used);
        }

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(&stream);
        });
        let (sock, _) = listener.accept().unwrap();
        let mut conn = Connection::from_stream(sock).unwrap();
        let mut got = Vec::new();
        let (err, largest) = measured(|| loop {
            match conn.recv(Some(Duration::from_secs(10))) {
                Ok(m) => got.push(m),
                Err(e) => break e,
            }
        });
        writer.join().unwrap();
        prop_assert_eq!(&got, &expected);
        prop_assert!(!err.to_string().is_empty());
        prop_assert!(
            largest <= 2 * (MAX_PAYLOAD_LEN + HEADER_LEN),
            "the receiver allocated {largest} bytes at once"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Regressions: inputs the targets above found, exactly as found.

/// `message_decode` found a `Refuse` frame whose header epoch was 1 accepted as the same
/// message as with epoch 0 (the kinds without an epoch ignored the field): two encodings
/// of one message. Now refused as malformed.
#[test]
fn regression_refuse_with_an_epoch() {
    let input: [u8; 63] = [
        76, 75, 83, 80, 1, 0, 3, 0, 1, 0, 0, 0, 0, 0, 0, 0, 39, 0, 0, 0, 65, 32, 141, 226, 118, 67,
        80, 85, 32, 99, 111, 117, 110, 116, 32, 100, 105, 102, 102, 101, 114, 115, 58, 32, 98, 97,
        99, 107, 117, 112, 32, 50, 44, 32, 112, 114, 105, 109, 97, 114, 121, 32, 52,
    ];
    // Found at protocol version 1: the version is brought to this build's.
    let mut input = input.to_vec();
    input[4..6].copy_from_slice(&checkpoint::protocol::PROTOCOL_VERSION.to_le_bytes());
    reseal(&mut input);
    let err = Message::decode(&Bytes::copy_from_slice(&input)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed Refuse frame at epoch 1: header epoch is 1, this kind carries none (expected 0)"
    );
    check_frame(&input).unwrap();
}

/// The same for every kind without an epoch, and for the reserved fields of `Hello` and
/// `EpochCommit` (ignored before, so a frame with them set decoded to the same message).
#[test]
fn regression_non_canonical_fields_are_refused() {
    let hello = sample_messages()[0].to_frame().unwrap().to_vec();
    let mut cases = Vec::new();
    for seed in [
        hello.clone(),
        sample_messages()[1].to_frame().unwrap().to_vec(),
        batch_frames()[1].to_vec(),
    ] {
        let mut f = seed;
        f[8] = 1; // header epoch
        cases.push((f, "header epoch is 1, this kind carries none"));
    }
    // Version 2 gave Hello's reserved u16 to the disk count and EpochCommit's reserved
    // u32 to the disk frame count; a disk's flags and DiskSync's reserved u32 are checked.
    let mut h = hello;
    h[HEADER_LEN + 32 + 2 * 16 + 8] = 2; // the first disk's flags: an unknown one
    cases.push((h, "disk 0 has unknown flags 0x2"));
    let mut sync = Message::DiskSync {
        disk: 0,
        offset: 0,
        bytes_done: 1,
        bytes_total: 1,
        data: Bytes::from_static(b"x"),
    }
    .to_frame()
    .unwrap()
    .to_vec();
    sync[HEADER_LEN + 4] = 0x80; // DiskSync's reserved u32
    cases.push((sync, "reserved field is 0x80"));
    for (mut f, why) in cases {
        reseal(&mut f);
        let err = Message::decode(&Bytes::from(f)).unwrap_err().to_string();
        assert!(err.starts_with("malformed ") && err.contains(why), "{err}");
    }
}
