//! The whole replication pipeline over loopback, through the public API only: handshake,
//! pre-copy, epochs with deltas under an in-flight window, acks, and the final digest check.

use std::net::TcpListener;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use checkpoint::delta_cache::DeltaCache;
use checkpoint::digest::digest_regions;
use checkpoint::encode::{
    send_epoch, send_sync, EncoderConfig, EpochEncoder, EpochOutput, StagedPages,
};
use checkpoint::handshake::{backup_handshake, primary_handshake};
use checkpoint::inflight::{InFlight, SharedInFlight};
use checkpoint::protocol::{Hello, MemoryRegion, Message};
use checkpoint::staging::{Staging, Step};
use checkpoint::transport::Connection;
use checkpoint::PAGE_SIZE;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const PAGES: usize = 256;
const EPOCHS: u64 = 12;
const WAIT: Duration = Duration::from_secs(30);

fn hello() -> Hello {
    Hello::new(
        1,
        vec![MemoryRegion {
            gpa: 0,
            len: (PAGES * PAGE_SIZE) as u64,
        }],
        0x5eed,
    )
}

/// What the backup ended with: the final epoch, the primary's and its own digests, and
/// the output it keeps for a promotion.
type Ended = (u64, String, String, Vec<Vec<u8>>);

fn backup(listener: TcpListener) -> Ended {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), PAGES * PAGE_SIZE)]).unwrap();
    let mut conn = Connection::accept(&listener).unwrap();
    backup_handshake(&mut conn, &hello(), WAIT).unwrap();
    let mut staging = Staging::new(&mem, 1 << 20);
    loop {
        let msg = conn.recv(Some(WAIT)).unwrap();
        match staging.handle(&mem, msg).unwrap() {
            Step::Committed { epoch } => conn.send(&Message::Ack { epoch }).unwrap(),
            Step::End {
                epoch,
                primary,
                local,
            } => {
                let kept = staging.committed_output().map(|f| f.to_vec()).collect();
                return (epoch, primary.to_string(), local.to_string(), kept);
            }
            Step::Continue | Step::Sync { .. } | Step::DiskSync { .. } | Step::Heartbeat { .. } => {
            }
        }
    }
}

#[test]
fn backup_ends_with_exactly_the_primary_state() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let backup = thread::spawn(move || backup(listener));

    let mut conn = Connection::connect(addr, WAIT).unwrap();
    primary_handshake(&mut conn, &hello(), WAIT).unwrap();
    let (mut tx, mut rx) = conn.split();
    let window = Arc::new(SharedInFlight::new(InFlight::new(2, 64 << 20, 0)));
    let acks = {
        let window = window.clone();
        thread::spawn(move || {
            let mut acked = 0;
            while acked < EPOCHS {
                match rx.recv(Some(WAIT)).unwrap() {
                    Message::Ack { epoch } => {
                        window.acked(epoch).unwrap();
                        acked = epoch;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        })
    };

    let mut ram = vec![0u8; PAGES * PAGE_SIZE];
    for (i, b) in ram.iter_mut().enumerate() {
        *b = ((i / 8) % 251) as u8;
    }
    let cache = Arc::new(DeltaCache::new(128, 4));
    let encoder = EpochEncoder::new(EncoderConfig::default(), Some(cache.clone()));
    let all: Vec<u64> = (0..PAGES as u64).collect();
    let total = ram.len() as u64;
    send_sync(
        &mut tx,
        &encoder,
        &StagedPages::new(&all, &ram).unwrap(),
        0,
        total,
    )
    .unwrap();

    let mut state = Vec::new();
    let mut deltas = 0;
    for epoch in 1..=EPOCHS {
        // The guest dirties a few pages; the engine stages them while it is paused.
        let pfns: Vec<u64> = (0..PAGES as u64)
            .filter(|p| p % 16 == epoch % 16 || *p < 4)
            .collect();
        for &p in &pfns {
            let at = p as usize * PAGE_SIZE + (epoch as usize * 64) % PAGE_SIZE;
            ram[at..at + 8].copy_from_slice(&epoch.to_le_bytes());
        }
        let mut staged = Vec::with_capacity(pfns.len() * PAGE_SIZE);
        for &p in &pfns {
            staged.extend_from_slice(&ram[p as usize * PAGE_SIZE..][..PAGE_SIZE]);
        }
        state = format!("vcpu state at epoch {epoch}").into_bytes();

        assert!(window.wait_for_room(staged.len() as u64, WAIT));
        window.lock().sent(epoch, staged.len() as u64).unwrap();
        let staged = StagedPages::new(&pfns, &staged).unwrap();
        // The guest's network output of the epoch; the primary says it let out the output
        // of the epoch three before.
        let frames = output_of(epoch);
        let output = EpochOutput {
            released: epoch.saturating_sub(3),
            frames: &frames,
        };
        let summary = send_epoch(&mut tx, &encoder, epoch, &staged, &[], &state, output).unwrap();
        assert!(summary.output_bytes > 0);
        assert_eq!(summary.pages, pfns.len() as u64);
        deltas += summary.by_encoding[3] + summary.by_encoding[4];
    }
    assert!(window.wait_acked(EPOCHS, WAIT));
    acks.join().unwrap();
    assert!(deltas > 0, "re-dirtied pages go out as XOR deltas");

    let digest = digest_regions([(0, &ram[..])], &state);
    tx.send(&Message::End {
        epoch: EPOCHS,
        digest: digest.0,
    })
    .unwrap();
    let (epoch, primary, local, kept) = backup.join().unwrap();
    assert_eq!(epoch, EPOCHS);
    assert_eq!(primary, digest.to_string());
    assert_eq!(local, primary, "final epoch={epoch} digests differ");
    // The backup keeps the output of the epochs after the last one let out.
    let expected: Vec<Vec<u8>> = (EPOCHS - 2..=EPOCHS)
        .flat_map(output_of)
        .map(|f| f.to_vec())
        .collect();
    assert_eq!(kept, expected);
}

/// The frames the guest "sent" during `epoch`: one or two, of different sizes.
fn output_of(epoch: u64) -> Vec<bytes::Bytes> {
    (0..1 + epoch % 2)
        .map(|i| bytes::Bytes::from(format!("frame {i} of epoch {epoch}").repeat(i as usize + 1)))
        .collect()
}
