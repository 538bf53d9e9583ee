//! Host-side tests of the guest's pure parts (command-line parsing, the hash
//! arithmetic), which are included here from `src/` by path: the guest binary itself
//! is `no_std` and only runs under the VMM (end-to-end tests live in `/tests`).

#[path = "../../engine/src/boot/abi.rs"]
#[allow(dead_code)]
mod abi;
#[path = "../src/args.rs"]
#[allow(dead_code)]
mod args;
#[path = "../src/workloads/hash/compute.rs"]
mod compute;
#[path = "../src/time.rs"]
#[allow(dead_code)]
mod time;

/// What `time.rs` takes from the guest's boot info.
mod boot {
    pub struct Boot {
        pub kvmclock: u64,
        pub tsc_khz: u64,
    }
}

/// What `args.rs` takes from the guest's `workloads` module.
mod workloads {
    pub const NAMES: &str = "counter, dirty, hash, kv, disk, crash";
}

use args::{parse_keys, parse_size, parse_u64, workload, ArgError};
use compute::{compute_block, fold, init_block, Block};

fn parse_dirty(cmdline: &str) -> Result<(Option<u64>, Option<u64>), String> {
    let mut wss = None;
    let mut seconds = None;
    parse_keys(cmdline, "dirty", &["wss", "seconds"], |key, value| {
        match key {
            "wss" => wss = Some(parse_size(key, value)?.bytes),
            _ => seconds = Some(parse_u64(key, value)?),
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok((wss, seconds))
}

#[test]
fn finds_the_workload() {
    assert_eq!(workload("workload=hash rounds=2"), Ok("hash"));
    assert_eq!(workload("  rounds=2\tworkload=dirty \n"), Ok("dirty"));
    assert_eq!(workload(""), Err(ArgError::MissingWorkload));
    assert_eq!(workload("rounds=2"), Err(ArgError::MissingWorkload));
    assert!(matches!(
        workload("workload=a workload=b"),
        Err(ArgError::Duplicate {
            key: "workload",
            value: "b"
        })
    ));
    assert_eq!(
        workload("workload=hash junk"),
        Err(ArgError::NotKeyValue("junk"))
    );
}

#[test]
fn parses_sizes_and_counts() {
    assert_eq!(
        parse_dirty("workload=dirty wss=4096"),
        Ok((Some(4096), None))
    );
    assert_eq!(
        parse_dirty("wss=64M seconds=5"),
        Ok((Some(64 << 20), Some(5)))
    );
    assert_eq!(parse_dirty("wss=2k"), Ok((Some(2048), None)));
    assert_eq!(parse_dirty("wss=1G"), Ok((Some(1 << 30), None)));
    assert_eq!(parse_dirty("seconds=0"), Ok((None, Some(0))));
}

#[test]
fn rejects_bad_arguments_naming_them() {
    let err = |cmdline| parse_dirty(cmdline).unwrap_err();
    assert_eq!(
        err("wss=12Q"),
        "malformed value wss=12Q: expected bytes or a size with a K, M or G suffix"
    );
    assert!(err("wss=").starts_with("malformed value wss=:"));
    assert!(err("wss=M").starts_with("malformed value wss=M:"));
    assert!(err("wss=99999999999999999999G").starts_with("malformed value wss="));
    assert!(err("seconds=-1").starts_with("malformed value seconds=-1:"));
    assert!(err("seconds=1.5").starts_with("malformed value seconds=1.5:"));
    assert_eq!(err("limit=3"), "unknown key limit=3 for workload=dirty");
    assert_eq!(err("seconds=1 seconds=2"), "duplicate key seconds=2");
    assert_eq!(err("=3"), "malformed argument \"=3\": expected key=value");
    assert_eq!(
        ArgError::DoesNotFit {
            wss: "64G",
            free: 1000
        }
        .to_string(),
        "wss=64G does not fit in 1000 bytes of free guest RAM"
    );
}

/// The hash as the guest computes it, with the blocks of each round split among
/// `vcpus` threads the way `Boot::shard` splits them.
fn hash(blocks: usize, rounds: u64, vcpus: u64) -> u64 {
    let mut a: Vec<Block> = (0..blocks as u64).map(init_block).collect();
    let mut b = vec![Block([0; 8]); blocks];
    for round in 1..=rounds {
        let (src, dst) = if round % 2 == 1 {
            (&a, &mut b)
        } else {
            (&b, &mut a)
        };
        let src: &[Block] = src;
        std::thread::scope(|s| {
            let mut rest = &mut dst[..];
            let mut start = 0;
            for v in 1..=vcpus {
                let end = (blocks as u64 * v / vcpus) as usize;
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(end - start);
                rest = tail;
                s.spawn(move || {
                    for (i, block) in (start..).zip(mine.iter_mut()) {
                        *block = compute_block(i, round, src);
                    }
                });
                start = end;
            }
        });
    }
    fold(if rounds % 2 == 1 { &b } else { &a })
}

#[test]
fn hash_does_not_depend_on_the_vcpu_count() {
    for (blocks, rounds) in [(1, 3), (7, 2), (1000, 5)] {
        let one = hash(blocks, rounds, 1);
        for vcpus in [2, 3, 16] {
            assert_eq!(
                hash(blocks, rounds, vcpus),
                one,
                "{blocks} blocks, {rounds} rounds"
            );
        }
    }
}

#[test]
fn hash_depends_on_rounds_and_size() {
    let base = hash(1024, 4, 1);
    assert_ne!(hash(1024, 5, 1), base);
    assert_ne!(hash(1025, 4, 1), base);
    assert_ne!(hash(1024, 0, 1), base);
}

/// Pins the algorithm: end-to-end tests and recorded runs compare printed hashes, so a
/// change here must be deliberate. `wss=1M rounds=1` is 8192 blocks per buffer.
#[test]
fn hash_is_stable() {
    assert_eq!(format!("{:016x}", hash(8192, 1, 2)), "8192914102b2cee0");
}

#[test]
fn parses_ipv4_addresses() {
    use args::{parse_ipv4, parse_ipv4_cidr};
    assert_eq!(
        parse_ipv4_cidr("ip", "10.0.0.2/24"),
        Ok(([10, 0, 0, 2], 24))
    );
    assert_eq!(parse_ipv4_cidr("ip", "0.0.0.0/0"), Ok(([0, 0, 0, 0], 0)));
    assert_eq!(parse_ipv4("gw", "255.255.255.255"), Ok([255; 4]));
    for bad in [
        "10.0.0.2",
        "10.0.0.2/33",
        "10.0.0/24",
        "10.0.0.256/24",
        "10.0.0.2.1/8",
        "a.b.c.d/8",
        "10.0.0.2/",
        "10..0.2/8",
        "10.0.0.0002/8",
    ] {
        let err = parse_ipv4_cidr("ip", bad).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "malformed value ip={bad}: expected an IPv4 address"
            )),
            "{err}"
        );
    }
    assert!(parse_ipv4("gw", "10.0.0.1/24").is_err());
    assert_eq!(
        ArgError::NoDevice {
            workload: "kv",
            device: "virtio-net",
            flag: "--net"
        }
        .to_string(),
        "workload=kv needs a virtio-net device (--net)"
    );
}

#[test]
fn kvmclock_records_scale_tsc_ticks_to_nanoseconds() {
    let mut info = abi::PvClockTimeInfo {
        tsc_timestamp: 1_000,
        system_time: 5_000_000,
        tsc_to_system_mul: 1 << 31, // x 0.5
        tsc_shift: 1,               // x 2
        ..Default::default()
    };
    assert_eq!(time::pvclock_ns(&info, 1_000), 5_000_000);
    assert_eq!(time::pvclock_ns(&info, 3_000), 5_002_000);
    // A 2.5 GHz TSC as KVM describes it: shift -1, mul 0.8 * 2^32.
    info.tsc_shift = -1;
    info.tsc_to_system_mul = 3_435_973_837;
    assert_eq!(
        time::pvclock_ns(&info, 1_000 + 2_500_000_000),
        5_000_000 + 1_000_000_000
    );
}

#[test]
fn a_clock_without_kvmclock_counts_from_its_start_on_the_tsc() {
    let boot = boot::Boot {
        kvmclock: 0,
        tsc_khz: 1_000_000,
    };
    let clock = time::Clock::starting_now(time::TimeSource::new(&boot));
    let a = clock.ns();
    let b = clock.ns();
    assert!(b >= a, "{a} then {b}");
    assert!(
        clock.now_ms() < 60_000,
        "a clock that just started reads seconds, not ages"
    );
    assert!(clock.us_until_ms(1_000_000) > 0);
}
