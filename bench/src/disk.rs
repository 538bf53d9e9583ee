//! `bench disk`: what disk replication costs, each figure against the same thing
//! unprotected, in one run.
//!
//! 1. The kv guest with `aof=on` (every SET appended to its disk and flushed before the
//!    reply) under redis-benchmark: SET throughput and p50/p99 latency, unprotected and
//!    protected (early checkpoints), per client count.
//! 2. The `disk` workload writing 4 KiB blocks flat out for `--seconds`: writes per second
//!    the guest completed, unprotected and protected.
//! 3. The initial disk sync of an `--image`-sized image full of data to an empty backup
//!    image (the rate, compare included), then of the now equal images (compare only).
//!
//! Everything runs in a network namespace the benchmark creates and deletes.

use std::path::Path;
use std::time::{Duration, Instant};

use harness::{wait_for_line, Netns, Proc};

use crate::args::Args;
use crate::net::{measure, Figures, Mode};
use crate::BenchError;

pub const OPTIONS: &[&str] = &["requests", "clients", "interval-ms", "seconds", "image"];

pub fn run(args: &Args) -> Result<(), BenchError> {
    let requests: u64 = args.number("requests", 5000, 100)?;
    let clients = crate::net::client_counts(args)?;
    let interval: u64 = args.number("interval-ms", 25, 1)?;
    let seconds: u64 = args.number("seconds", 5, 1)?;
    let image_mib: u64 = args.number("image", 256, 16)?;
    let bin = harness::try_lockstep_bin().map_err(BenchError::Usage)?;
    let work = std::env::temp_dir().join(format!("lockstep-bench-disk-{}", std::process::id()));
    std::fs::create_dir_all(&work)
        .map_err(|e| BenchError::Failed(format!("{}: {e}", work.display())))?;
    let ns = Netns::create("lsbdisk").map_err(BenchError::Failed)?;
    let result = (|| {
        let mut kv = Vec::new();
        for mode in [Mode::Unprotected, Mode::Early] {
            eprintln!("bench disk: kv aof=on, {} ...", mode.name());
            let r = measure(
                &ns,
                bin,
                &work,
                mode,
                requests,
                &clients,
                interval,
                Some(64 << 20),
            )
            .map(|(r, _)| r)
            .map_err(|e| BenchError::Failed(format!("kv aof=on, {}: {e}", mode.name())))?;
            kv.push((mode, r));
        }
        eprintln!("bench disk: the disk workload, unprotected and protected ...");
        let unprotected = disk_workload(&ns, bin, &work, false, seconds, interval)?;
        let protected = disk_workload(&ns, bin, &work, true, seconds, interval)?;
        eprintln!("bench disk: initial sync of a {image_mib} MiB image ...");
        let sync = initial_sync(&ns, bin, &work, image_mib << 20)?;
        Ok::<_, BenchError>((kv, unprotected, protected, sync))
    })();
    drop(ns);
    let _ = std::fs::remove_dir_all(&work);
    let (kv, unprotected, protected, sync) = result?;
    for (i, &c) in clients.iter().enumerate() {
        println!(
            "\nkv guest with aof=on (each SET appended to the disk and flushed before its \
             reply): redis-benchmark -n {requests} -c {c} -t set; epochs of {interval} ms\n"
        );
        println!(
            "| mode | SET/s | p50 ms | p99 ms | throughput ratio | p50 added ms | p99 added ms |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        let base: Figures = kv[0].1[i][0];
        for (mode, r) in &kv {
            let f = r[i][0];
            println!(
                "| {} | {:.0} | {:.3} | {:.3} | {:.2} | {:+.3} | {:+.3} |",
                mode.name(),
                f.rps,
                f.p50_ms,
                f.p99_ms,
                f.rps / base.rps,
                f.p50_ms - base.p50_ms,
                f.p99_ms - base.p99_ms
            );
        }
    }
    println!(
        "\nthe disk workload (4 KiB blocks written, flushed every 8, read back and verified) \
         for {seconds} s; epochs of {interval} ms\n"
    );
    println!("| mode | writes/s | ratio |");
    println!("| --- | ---: | ---: |");
    println!("| unprotected | {unprotected:.0} | 1.00 |");
    println!(
        "| protected | {protected:.0} | {:.2} |",
        protected / unprotected.max(1e-9)
    );
    println!("\ninitial disk sync over the namespace's loopback (insecure link)\n");
    println!("| case | MiB | seconds | MiB/s |");
    println!("| --- | ---: | ---: | ---: |");
    for (case, mib, secs) in sync {
        println!(
            "| {case} | {mib:.0} | {secs:.2} | {:.0} |",
            mib / secs.max(1e-9)
        );
    }
    Ok(())
}

fn spawn(
    ns: &Netns,
    bin: &Path,
    work: &Path,
    name: &str,
    args: &[&str],
) -> Result<Proc, BenchError> {
    Proc::spawn(
        ns.command(bin, args),
        work.join(format!("{name}.out")),
        work.join(format!("{name}.err")),
    )
    .map_err(BenchError::Failed)
}

fn image(path: &Path, bytes: u64) -> Result<String, BenchError> {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(bytes))
        .map_err(|e| BenchError::Failed(format!("{}: {e}", path.display())))?;
    Ok(format!("path={}", path.display()))
}

/// Writes per second the `disk` workload completed in `seconds`, protected or not.
fn disk_workload(
    ns: &Netns,
    bin: &Path,
    work: &Path,
    protected: bool,
    seconds: u64,
    interval: u64,
) -> Result<f64, BenchError> {
    let tag = if protected {
        "protected"
    } else {
        "unprotected"
    };
    let console = work.join(format!("disk-{tag}.txt"));
    let guest_disk = image(&work.join(format!("disk-{tag}.img")), 64 << 20)?;
    let guest_args = format!("workload=disk blocks=4096 rate=0 seconds={seconds} flush_every=8");
    let console_arg = console.display().to_string();
    let interval = interval.to_string();
    let mut guest = vec![
        "--guest",
        "builtin",
        "--guest-args",
        &guest_args,
        "--disk",
        &guest_disk,
        "--console",
        &console_arg,
    ];
    let mut procs = Vec::new();
    let mut main = if protected {
        let backup_disk = image(&work.join("disk-backup.img"), 64 << 20)?;
        procs.push(spawn(
            ns,
            bin,
            work,
            "disk-backup",
            &[
                "backup",
                "--insecure",
                "--listen",
                "127.0.0.1:7610",
                "--disk",
                &backup_disk,
            ],
        )?);
        let mut args = vec![
            "primary",
            "--insecure",
            "--peer",
            "127.0.0.1:7610",
            "--interval-ms",
            &interval,
        ];
        args.append(&mut guest);
        spawn(ns, bin, work, "disk-primary", &args)?
    } else {
        let mut args = vec!["run"];
        args.append(&mut guest);
        spawn(ns, bin, work, "disk-run", &args)?
    };
    let deadline = Instant::now() + Duration::from_secs(seconds + 60);
    while main.try_wait().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    main.terminate(Duration::from_secs(2));
    drop(procs);
    let out = std::fs::read_to_string(&console).unwrap_or_default();
    // `disk: verified <n> blocks (writes=W reads=R flushes=F)` at the end.
    let writes = out
        .lines()
        .rev()
        .find(|l| l.starts_with("disk: verified"))
        .and_then(|l| {
            l.split(['(', ' ', ')'])
                .find_map(|w| w.strip_prefix("writes=")?.parse::<f64>().ok())
        })
        .ok_or_else(|| {
            BenchError::Failed(format!(
                "the {tag} disk workload did not finish: {}\n{}",
                out.trim(),
                main.log()
            ))
        })?;
    Ok(writes / seconds as f64)
}

/// The initial sync of an image full of data to an empty one, then of the two equal
/// images: (case, MiB, seconds) each, from the primary's log.
fn initial_sync(
    ns: &Netns,
    bin: &Path,
    work: &Path,
    bytes: u64,
) -> Result<Vec<(&'static str, f64, f64)>, BenchError> {
    let p = work.join("sync-primary.img");
    let b = work.join("sync-backup.img");
    // Data everywhere (not zeros, not compressible: the link compresses nothing of disks).
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&p).map_err(|e| BenchError::Failed(e.to_string()))?,
        );
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..bytes >> 20 {
            for w in block.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block)
                .map_err(|e| BenchError::Failed(e.to_string()))?;
        }
    }
    let backup_disk = image(&b, bytes)?;
    let primary_disk = format!("path={}", p.display());
    let mut out = Vec::new();
    for case in ["empty backup image", "equal images (compare only)"] {
        let backup = spawn(
            ns,
            bin,
            work,
            "sync-backup",
            &[
                "backup",
                "--insecure",
                "--listen",
                "127.0.0.1:7620",
                "--disk",
                &backup_disk,
            ],
        )?;
        let err = work.join("sync-backup.err");
        if !wait_for_line(&err, "listening on", Duration::from_secs(20), || true) {
            return Err(BenchError::Failed("the sync backup did not start".into()));
        }
        let mut primary = spawn(
            ns,
            bin,
            work,
            "sync-primary",
            &[
                "primary",
                "--insecure",
                "--peer",
                "127.0.0.1:7620",
                "--mem",
                "64M",
                "--guest",
                "builtin",
                "--guest-args",
                "workload=dirty pages_per_ms=1 wss=1M seconds=1",
                "--console",
                "none",
                "--disk",
                &primary_disk,
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(600);
        while primary.try_wait().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        primary.terminate(Duration::from_secs(2));
        drop(backup);
        let log = primary.log();
        let secs = |line: &str, after: &str, unit: &str| -> Option<f64> {
            let rest = line.split(after).nth(1)?;
            rest.split(unit).next()?.trim().parse().ok()
        };
        let figure = if case.starts_with("equal") {
            log.lines()
                .find(|l| l.contains("the backup's image is equal"))
                .and_then(|l| secs(l, "chunk sums in ", " ms"))
                .map(|ms| (bytes as f64 / (1 << 20) as f64, ms / 1000.0))
        } else {
            log.lines()
                .find(|l| l.contains("disk 0 initial sync:") && l.contains("chunks in"))
                .and_then(|l| {
                    let mib: f64 = secs(l, "initial sync: ", " MiB")?;
                    Some((mib, secs(l, "chunks in ", " s")?))
                })
        };
        let (mib, s) = figure.ok_or_else(|| {
            BenchError::Failed(format!(
                "{case}: no sync figures in the primary's log:\n{log}"
            ))
        })?;
        out.push((case, mib, s));
    }
    Ok(out)
}
