//! The versioned state format on the state of a real paused VM: an exact round trip, and
//! every kind of damage refused with the matching `PersistError`.

use std::time::Duration;

use engine::devices::serial::Console;
use engine::machine::{Machine, MachineConfig};
use engine::persist::state::MachineState;
use engine::persist::{seal, unseal, PersistError, FORMAT_VERSION, HEADER_LEN};
use tests::kvm_required;

/// Boots a two-vCPU guest that dirties memory, lets it run, and captures it paused.
fn captured_state() -> MachineState {
    let cfg = MachineConfig {
        mem_size: 64 << 20,
        vcpus: 2,
        console: Console::Null,
        net: None,
        disks: Vec::new(),
        dirty_ring: None,
    };
    let mut m = Machine::boot(
        &cfg,
        engine::BUILTIN_GUEST,
        "workload=dirty pages_per_ms=100 wss=4M seconds=60",
    )
    .expect("boot");
    m.resume().expect("resume");
    // Let the guest get going; it must not stop on its own within this.
    if let Some(event) = m.wait_event(Duration::from_millis(200)) {
        panic!("the guest stopped early: {event:?}");
    }
    let (state, _) = m.pause_and_capture().expect("pause and capture");
    state
}

fn rejected(blob: &[u8]) -> PersistError {
    match MachineState::from_blob(blob) {
        Ok(_) => panic!("a damaged blob ({} bytes) was accepted", blob.len()),
        Err(e) => e,
    }
}

#[test]
fn real_state_round_trips_and_damage_is_refused() {
    if !kvm_required() {
        return;
    }
    let state = captured_state();
    assert_eq!(state.mem_size, 64 << 20);
    assert_eq!(state.vcpus.len(), 2);
    for (i, v) in state.vcpus.iter().enumerate() {
        assert_ne!(v.regs.rip, 0, "vCPU {i} has no RIP: not a real capture");
        assert_eq!(v.sregs.cs.dpl, 3, "vCPU {i} should be at CPL3");
    }
    assert_ne!(
        state.vcpus[0].regs.rsp, state.vcpus[1].regs.rsp,
        "each vCPU has its own stack"
    );

    // Round trip: decoding and re-encoding gives the same bytes, field for field.
    let blob = state.to_blob();
    let back = MachineState::from_blob(&blob).expect("decode a fresh blob");
    assert_eq!(back.to_blob(), blob, "re-encoded blob differs");
    assert_eq!(back.mem_size, state.mem_size);
    for (a, b) in back.vcpus.iter().zip(&state.vcpus) {
        assert_eq!(a.regs.rip, b.regs.rip);
        assert_eq!(a.regs.rsp, b.regs.rsp);
        assert_eq!(a.sregs.cr3, b.sregs.cr3);
        assert_eq!(a.msrs.len(), b.msrs.len());
    }
    assert_eq!(back.serial.line_status, state.serial.line_status);
    assert_eq!(back.platform, engine::machine::Platform::Reference);
    assert_eq!(back.cpuid.len(), state.cpuid.len());
    assert!(
        state.cpuid.iter().any(|e| e.function == 0x4000_0000),
        "the CPUID the vCPUs got includes KVM's leaves"
    );

    let payload = unseal(&blob).expect("unseal").to_vec();
    assert_eq!(&blob[..8], b"LKSTATE\0");
    assert_eq!(blob.len(), HEADER_LEN + payload.len());

    // A flipped bit anywhere in the payload: checksum error.
    let step = (payload.len() / 64).max(1);
    for at in (HEADER_LEN..blob.len())
        .step_by(step)
        .chain([blob.len() - 1])
    {
        let mut bad = blob.clone();
        bad[at] ^= 0x10;
        assert!(
            matches!(rejected(&bad), PersistError::Checksum { .. }),
            "flipped payload byte {at}: expected a checksum error, got {:?}",
            rejected(&bad)
        );
    }
    // A flipped bit in the header's checksum field.
    let mut bad = blob.clone();
    bad[24] ^= 0x01;
    assert!(matches!(rejected(&bad), PersistError::Checksum { .. }));

    // Bad magic.
    let mut bad = blob.clone();
    bad[0] ^= 0x01;
    assert_eq!(rejected(&bad), PersistError::BadMagic);

    // Another version, older or newer.
    for version in [FORMAT_VERSION + 1, FORMAT_VERSION - 1, u32::MAX] {
        let mut bad = blob.clone();
        bad[8..12].copy_from_slice(&version.to_le_bytes());
        assert_eq!(rejected(&bad), PersistError::Version { found: version });
    }

    // Truncated: short payloads, a header cut short, an empty blob; and one byte too many.
    let len = payload.len() as u64;
    for cut in [1, 100, payload.len()] {
        assert_eq!(
            rejected(&blob[..blob.len() - cut]),
            PersistError::Truncated {
                expected: len,
                found: len - cut as u64
            }
        );
    }
    assert_eq!(rejected(&blob[..HEADER_LEN - 1]), PersistError::BadMagic);
    assert_eq!(rejected(&[]), PersistError::BadMagic);
    let mut long = blob.clone();
    long.push(0);
    assert_eq!(
        rejected(&long),
        PersistError::Truncated {
            expected: len,
            found: len + 1
        }
    );

    // A well-sealed payload that is cut short or has trailing bytes: malformed, never a
    // panic or a wild allocation.
    for cut in [1, 8, payload.len() / 2, payload.len() - 12] {
        let short = seal(&payload[..payload.len() - cut]);
        assert!(
            matches!(rejected(&short), PersistError::Malformed(_)),
            "payload cut by {cut}: {:?}",
            rejected(&short)
        );
    }
    let mut trailing = payload.clone();
    trailing.extend_from_slice(&[0; 3]);
    assert!(matches!(
        rejected(&seal(&trailing)),
        PersistError::Malformed(_)
    ));
    // An unknown platform, a huge CPUID count, a huge vCPU count (after the platform, the
    // CPUID entries and the memory size).
    let mut bad = payload.clone();
    bad[0..4].copy_from_slice(&7u32.to_le_bytes());
    assert_eq!(
        rejected(&seal(&bad)),
        PersistError::Malformed("platform 7".to_string())
    );
    let mut huge = payload.clone();
    huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(rejected(&seal(&huge)), PersistError::Malformed(_)));
    let vcpus_at =
        8 + state.cpuid.len() * std::mem::size_of::<kvm_bindings::kvm_cpuid_entry2>() + 8;
    assert_eq!(
        u32::from_le_bytes(payload[vcpus_at..vcpus_at + 4].try_into().unwrap()),
        2
    );
    let mut huge = payload.clone();
    huge[vcpus_at..vcpus_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(rejected(&seal(&huge)), PersistError::Malformed(_)));
}
