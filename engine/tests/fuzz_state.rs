//! Fuzzing of the decoders that read the state format from disk or from a checkpoint:
//! the sealed header, `MachineState::from_blob`, and the snapshot directory reader
//! (`snapshot::read` and `Snapshot::load_memory`) on damaged `state.bin` / `memory.bin`.
//!
//! The seed corpus is made by the real encoders from arbitrary machine states; it is then
//! mutated (bit flips, truncations, extensions, splices, length and count fields
//! overwritten with huge values, and re-sealed so the damage gets past the CRC), or
//! replaced with random bytes. No KVM needed.
//!
//! `LOCKSTEP_FUZZ_CASES=100000 cargo test --release -p engine --test fuzz_state` runs
//! longer than the bounded default (see docs/fuzzing.md).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use engine::devices::virtio::block::BlockState;
use engine::devices::virtio::VirtioState;
use engine::machine::Platform;
use engine::persist::state::MachineState;
use engine::persist::{seal, unseal, FORMAT_VERSION, HEADER_LEN};
use engine::snapshot::{self, MEMORY_FILE, STATE_FILE};
use engine::vstate::memory::GuestMemory;
use engine::vstate::vcpu::VcpuState;
use engine::vstate::vm::VmState;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use virtio_queue::QueueState;
use vm_memory::{Bytes as _, GuestAddress};
use vm_superio::serial::SerialState;
use zerocopy::FromBytes;

#[path = "../../checkpoint/tests/support/fuzz.rs"]
mod fuzz;

use fuzz::{apply, config, measured, Mutation};

// ---------------------------------------------------------------------------------------
// Arbitrary machine states.

/// Deterministic filler for the KVM structures (any bytes are a valid value of each).
fn pod<T: FromBytes>(seed: &mut u64) -> T {
    let mut b = vec![0u8; std::mem::size_of::<T>()];
    for x in b.iter_mut() {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *x = *seed as u8;
    }
    T::read_from_bytes(&b).unwrap()
}

#[derive(Debug, Clone)]
struct Shape {
    seed: u64,
    mem_size: u64,
    msrs: Vec<usize>,
    serial_in: Vec<u8>,
    virtio: Vec<(u32, usize, Vec<u8>)>,
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(0usize..6, 1..4),
        prop::collection::vec(any::<u8>(), 0..24),
        prop::collection::vec(
            (
                any::<u32>(),
                0usize..4,
                prop::collection::vec(any::<u8>(), 0..40),
            ),
            0..3,
        ),
    )
        .prop_map(|(seed, mem_size, msrs, serial_in, virtio)| Shape {
            seed: seed | 1,
            mem_size,
            msrs,
            serial_in,
            virtio,
        })
}

fn machine(s: &Shape) -> MachineState {
    let mut seed = s.seed;
    let vcpus = s
        .msrs
        .iter()
        .map(|&n| VcpuState {
            regs: pod(&mut seed),
            sregs: pod(&mut seed),
            fpu: kvm_bindings::kvm_fpu {
                // Only the fields the format keeps (the padding is not stored).
                fpr: pod(&mut seed),
                fcw: pod(&mut seed),
                fsw: pod(&mut seed),
                ftwx: pod(&mut seed),
                last_opcode: pod(&mut seed),
                last_ip: pod(&mut seed),
                last_dp: pod(&mut seed),
                xmm: pod(&mut seed),
                mxcsr: pod(&mut seed),
                ..Default::default()
            },
            xsave: pod(&mut seed),
            xcrs: pod(&mut seed),
            msrs: (0..n).map(|_| pod(&mut seed)).collect(),
            lapic: pod(&mut seed),
            events: pod(&mut seed),
            mp_state: pod(&mut seed),
            debugregs: pod(&mut seed),
        })
        .collect();
    let vm = VmState {
        pic_master: pod(&mut seed),
        pic_slave: pod(&mut seed),
        ioapic: pod(&mut seed),
        pit: pod(&mut seed),
        clock: pod(&mut seed),
    };
    let serial = SerialState {
        in_buffer: s.serial_in.clone(),
        scratch: seed as u8,
        line_status: (seed >> 8) as u8,
        ..SerialState::default()
    };
    let virtio = s
        .virtio
        .iter()
        .map(|(id, queues, device)| VirtioState {
            device_id: *id,
            status: id.rotate_left(3),
            driver_features: u64::from(*id) << 7,
            queues: (0..*queues)
                .map(|q| QueueState {
                    max_size: 256,
                    size: 128 + q as u16,
                    next_avail: q as u16 * 3,
                    next_used: q as u16 * 5,
                    ready: q % 2 == 0,
                    event_idx_enabled: q % 3 == 0,
                    desc_table: 0x1000 * q as u64,
                    avail_ring: 0x2000 * q as u64,
                    used_ring: 0x3000 * q as u64,
                })
                .collect(),
            device: device.clone(),
            ..VirtioState::default()
        })
        .collect();
    MachineState {
        platform: if seed % 2 == 0 {
            Platform::Reference
        } else {
            Platform::Linux
        },
        cpuid: (0..1 + s.msrs.len()).map(|_| pod(&mut seed)).collect(),
        mem_size: s.mem_size,
        vcpus,
        vm,
        serial,
        virtio,
    }
}

// ---------------------------------------------------------------------------------------
// Mutations.

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(0xff),
        Just(0x1_0000),
        Just(0x7fff_ffff),
        Just(u64::from(u32::MAX)),
        Just(1 << 40),
        Just(i64::MAX as u64),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        1 => any::<usize>().prop_map(|keep| Mutation::Truncate { keep }),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..32))
            .prop_map(|(at, bytes)| Mutation::Splice { at, bytes }),
        1 => (any::<usize>(), 1usize..64).prop_map(|(at, n)| Mutation::Remove { at, n }),
        2 => (any::<usize>(), any::<u32>()).prop_map(|(at, v)| Mutation::Word { at, v }),
        2 => (any::<usize>(), interesting_u64()).prop_map(|(at, v)| Mutation::Quad { at, v }),
    ]
}

/// Damage to a sealed blob: mutations of the payload, re-sealed (so they reach the state
/// decoder) unless `raw`, in which case the header may be hit too.
fn damage(blob: &[u8], muts: &[Mutation], raw: bool) -> Vec<u8> {
    if raw || blob.len() < HEADER_LEN {
        let mut b = blob.to_vec();
        for m in muts {
            apply(&mut b, m);
        }
        return b;
    }
    let mut payload = blob[HEADER_LEN..].to_vec();
    for m in muts {
        apply(&mut payload, m);
    }
    seal(&payload)
}

fn check_blob(blob: &[u8]) -> Result<(), TestCaseError> {
    let (r, largest) = measured(|| MachineState::from_blob(blob));
    prop_assert!(
        largest <= 2 * blob.len() + 64 * 1024,
        "decoding a {}-byte blob allocated {largest} bytes at once",
        blob.len()
    );
    match r {
        Ok(s) => {
            // Blobs are canonical: one state, one encoding.
            prop_assert_eq!(&s.to_blob()[..], blob);
            let again = s.to_blob();
            let back = MachineState::from_blob(&again)
                .map_err(|e| TestCaseError::fail(format!("re-encoded blob refused: {e}")))?;
            prop_assert_eq!(back.to_blob(), again);
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    /// Valid states round-trip exactly.
    #[test]
    fn state_blob_round_trips(s in shape()) {
        let blob = machine(&s).to_blob();
        let back = MachineState::from_blob(&blob)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back.to_blob(), blob);
    }

    /// Damaged blobs (re-sealed or not) and random bytes: an error or a state that
    /// re-encodes consistently; never a panic or an outsized allocation.
    #[test]
    fn state_blob_decode(
        s in shape(),
        muts in prop::collection::vec(mutation(), 1..6),
        raw in prop::bool::weighted(0.25),
        random in prop::option::weighted(0.1, prop::collection::vec(any::<u8>(), 0..2048)),
    ) {
        let blob = machine(&s).to_blob();
        let input = match random {
            Some(r) if r.len() % 2 == 0 => r,
            // Random bytes behind a valid header, to reach the decoder.
            Some(r) => seal(&r),
            None => damage(&blob, &muts, raw),
        };
        check_blob(&input)?;
    }

    /// The sealed header alone: any bytes, and sealed payloads with the header damaged.
    /// What is accepted has the right magic, version, length and CRC for its payload (the
    /// two reserved words are not checked).
    #[test]
    fn sealed_header(
        input in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..96),
            (
                prop::collection::vec(any::<u8>(), 0..64),
                prop::collection::vec(mutation(), 1..3),
            )
                .prop_map(|(p, muts)| {
                    let mut b = seal(&p);
                    let mut head = b[..HEADER_LEN].to_vec();
                    for m in &muts {
                        apply(&mut head, m);
                    }
                    b.splice(..HEADER_LEN, head);
                    b
                }),
        ],
    ) {
        match unseal(&input) {
            Ok(p) => prop_assert_eq!(seal(p), input),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The snapshot directory.

const MEM: usize = 16 * 4096;

fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
}

fn scratch_dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "lockstep-fuzz-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Writes a snapshot of a state shaped by `s` and memory filled from `fill`.
fn written_snapshot(s: &Shape, fill: u8) -> (PathBuf, Vec<u8>) {
    let mut shape = s.clone();
    shape.mem_size = MEM as u64;
    let mem = guest_memory();
    let contents: Vec<u8> = (0..MEM)
        .map(|i| if i % 4096 < 2048 { 0 } else { (i as u8) ^ fill })
        .collect();
    mem.write_slice(&contents, GuestAddress(0)).unwrap();
    let dir = scratch_dir();
    snapshot::write(&dir, &machine(&shape), &mem, &[]).unwrap();
    (dir, contents)
}

proptest! {
    #![proptest_config(config(128))]

    /// A snapshot with a damaged `state.bin` and/or `memory.bin`: `read` and `load_memory`
    /// fail with an error naming the file, or (damage undone by luck, or a re-sealed state
    /// that still decodes) succeed; never a panic. Damaged memory is always refused.
    #[test]
    fn snapshot_directory(
        s in shape(),
        fill in any::<u8>(),
        state_muts in prop::collection::vec(mutation(), 0..4),
        state_raw in any::<bool>(),
        mem_muts in prop::collection::vec(mutation(), 0..3),
    ) {
        let (dir, contents) = written_snapshot(&s, fill);
        let state_path = dir.join(STATE_FILE);
        let mem_path = dir.join(MEMORY_FILE);
        let state = std::fs::read(&state_path).unwrap();
        let damaged_state = damage(&state, &state_muts, state_raw);
        std::fs::write(&state_path, &damaged_state).unwrap();
        let mut memory = std::fs::read(&mem_path).unwrap();
        for m in &mem_muts {
            apply(&mut memory, m);
        }
        std::fs::write(&mem_path, &memory).unwrap();

        let (r, largest) = measured(|| {
            let snap = snapshot::read(&dir)?;
            let mem = guest_memory();
            snap.load_memory(&mem)?;
            let mut back = vec![0u8; MEM];
            mem.read_slice(&mut back, GuestAddress(0)).unwrap();
            Ok::<_, snapshot::SnapshotError>(back)
        });
        let _ = std::fs::remove_dir_all(&dir);
        prop_assert!(
            largest <= 2 * (damaged_state.len() + memory.len()) + (2 << 20),
            "reading the snapshot allocated {largest} bytes at once"
        );
        match r {
            Ok(back) => {
                prop_assert!(memory == contents, "damaged memory.bin was accepted");
                prop_assert!(back == contents, "loaded memory differs from memory.bin");
            }
            Err(e) => {
                let text = e.to_string();
                prop_assert!(
                    text.contains(STATE_FILE) || text.contains(MEMORY_FILE) || memory != contents,
                    "the error does not name the file: {text}"
                );
                if state_muts.is_empty() && mem_muts.is_empty() {
                    return Err(TestCaseError::fail(format!("an intact snapshot was refused: {text}")));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Regressions: inputs the targets above found, exactly as found.

/// `sealed_header` found a blob with its second reserved header word set accepted as if it
/// were 0 (two encodings of one blob). Now refused.
#[test]
fn regression_sealed_header_reserved_word() {
    let mut input = [0u8; HEADER_LEN];
    input[..8].copy_from_slice(b"LKSTATE\0");
    // Found at version 2; the current version, so that the reserved word is what fails.
    input[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    input[28] = 1;
    assert_eq!(
        unseal(&input).unwrap_err().to_string(),
        "state payload is malformed: header reserved field at offset 28 is 0x1, expected 0"
    );
    let mut first = input;
    (first[12], first[28]) = (0x80, 0);
    assert!(unseal(&first)
        .unwrap_err()
        .to_string()
        .contains("offset 12"));
}

/// `state_blob_decode` found a one-bit flip (re-sealed) that decoded to the same state as
/// the original: the FPU's padding byte was dropped on decode. Now refused.
#[test]
fn regression_fpu_padding_bit() {
    let s = Shape {
        seed: 1,
        mem_size: 0,
        msrs: vec![0, 4, 2],
        serial_in: vec![0; 14],
        virtio: vec![(0, 2, vec![0; 16]), (0, 1, vec![0; 5])],
    };
    // The flip was found under format 2; the same byte of the first vCPU's FPU in the
    // current layout: platform, CPUID count, CPUID entries, memory size, vCPU count, regs,
    // sregs, the x87 registers, FCW and FSW, then FTW's padding byte.
    let cpuid_entries = 1 + s.msrs.len();
    let at = 4
        + 4
        + cpuid_entries * std::mem::size_of::<kvm_bindings::kvm_cpuid_entry2>()
        + 8
        + 4
        + std::mem::size_of::<kvm_bindings::kvm_regs>()
        + std::mem::size_of::<kvm_bindings::kvm_sregs>()
        + 8 * 16
        + 4
        + 1;
    let blob = damage(
        &machine(&s).to_blob(),
        &[Mutation::Flip { at, bit: 0 }],
        false,
    );
    let err = MachineState::from_blob(&blob).err().expect("refused");
    assert_eq!(
        err.to_string(),
        "state payload is malformed: fpu: padding byte is 0x1, expected 0"
    );
}

/// The same kind of dropped bits in a virtqueue's flags byte (bits 2 to 7).
#[test]
fn regression_virtqueue_flag_bits() {
    let s = Shape {
        seed: 1,
        mem_size: 0,
        msrs: vec![0],
        serial_in: vec![],
        virtio: vec![(0, 1, vec![])],
    };
    let blob = machine(&s).to_blob();
    let payload = unseal(&blob).unwrap();
    // The last virtqueue's flags byte: 3 u64 rings and the device bytes' u64 length after it.
    let at = payload.len() - 8 - 3 * 8 - 1;
    let mut p = payload.to_vec();
    p[at] |= 0x04;
    let err = MachineState::from_blob(&seal(&p)).err().expect("refused");
    assert!(err.to_string().contains("virtqueue flags"), "{err}");
}

// ---------------------------------------------------------------------------------------
// virtio-blk's device bytes (`BlockState`), inside `VirtioState::device`.

fn block_state() -> impl Strategy<Value = BlockState> {
    (any::<u64>(), any::<bool>(), "[ -~é]{0,80}").prop_map(|(sectors, readonly, path)| BlockState {
        sectors,
        readonly,
        path,
    })
}

proptest! {
    #![proptest_config(config(512))]

    /// Valid virtio-blk states round-trip exactly, alone and inside a machine state.
    #[test]
    fn block_state_round_trips(b in block_state(), s in shape()) {
        let bytes = b.to_bytes();
        prop_assert_eq!(BlockState::from_bytes(&bytes), Ok(b));
        let mut m = machine(&s);
        m.virtio.push(VirtioState {
            device_id: 2,
            device: bytes.clone(),
            ..VirtioState::default()
        });
        let back = MachineState::from_blob(&m.to_blob())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back.virtio.last().unwrap().device, &bytes);
    }

    /// Damaged virtio-blk states and random bytes: an error, or a state that re-encodes
    /// to exactly the bytes it was read from (one state, one encoding); never a panic.
    #[test]
    fn block_state_decode(
        b in block_state(),
        muts in prop::collection::vec(mutation(), 1..6),
        random in prop::option::weighted(0.2, prop::collection::vec(any::<u8>(), 0..64)),
    ) {
        let input = match random {
            Some(r) => r,
            None => {
                let mut bytes = b.to_bytes();
                for m in &muts {
                    apply(&mut bytes, m);
                }
                bytes
            }
        };
        match BlockState::from_bytes(&input) {
            Ok(s) => prop_assert_eq!(s.to_bytes(), input),
            Err(e) => prop_assert!(e.to_string().contains("virtio-blk")),
        }
    }
}
