//! `bench net`: redis-benchmark GET and SET against the kv guest, unprotected, protected
//! with early checkpoints, and protected without — throughput and p50/p99 latency, each as
//! a ratio against unprotected, all in one run. Each client count of `--clients` (default
//! 20 and 1) is a table of its own: with one client, one connection, each request waits
//! for its reply, so "p50/p99 added" is what output commit adds to a request/response.
//!
//! Everything runs in a network namespace the benchmark creates (a tap at 10.0.0.1/24, the
//! guest at 10.0.0.2) and deletes afterwards; the backup listens on the namespace's own
//! loopback.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::{wait_for_line, Netns, Proc};
use thiserror::Error;

use crate::args::Args;
use crate::BenchError;

pub const OPTIONS: &[&str] = &["requests", "clients", "interval-ms"];

#[derive(Debug, Error)]
pub enum NetError {
    #[error("{0}")]
    Setup(String),
    #[error("{mode}: {why}")]
    Run { mode: &'static str, why: String },
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Figures {
    pub(crate) rps: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

#[derive(Clone, Copy)]
pub(crate) enum Mode {
    Unprotected,
    Early,
    NoEarly,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Unprotected => "unprotected",
            Mode::Early => "protected, early checkpoint",
            Mode::NoEarly => "protected, no early checkpoint",
        }
    }
}

/// `--clients LIST`: the redis-benchmark client counts (default 20 and 1).
pub(crate) fn client_counts(args: &Args) -> Result<Vec<u64>, BenchError> {
    match args.get("clients") {
        None => Ok(vec![20, 1]),
        Some(list) => list
            .split(',')
            .map(|c| c.trim().parse().ok().filter(|&n: &u64| n >= 1))
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| {
                BenchError::Usage(format!(
                    "--clients {list}: expected client counts, e.g. 20,1"
                ))
            }),
    }
}

pub fn run_bench(args: &Args) -> Result<(), BenchError> {
    let requests: u64 = args.number("requests", 5000, 100)?;
    let clients = client_counts(args)?;
    let interval: u64 = args.number("interval-ms", 25, 1)?;
    let bin = harness::try_lockstep_bin().map_err(BenchError::Usage)?;
    let work = std::env::temp_dir().join(format!("lockstep-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&work)
        .map_err(|e| NetError::Setup(format!("{}: {e}", work.display())))?;
    let ns = Netns::create("lsbench").map_err(NetError::Setup)?;
    let mut results = Vec::new();
    let mut links = Vec::new();
    for mode in [Mode::Unprotected, Mode::Early, Mode::NoEarly] {
        eprintln!("bench net: {} ...", mode.name());
        let (r, link) = measure(&ns, bin, &work, mode, requests, &clients, interval, None)
            .map_err(|why| NetError::Run {
                mode: mode.name(),
                why,
            })?;
        results.push((mode, r));
        links.extend(link.map(|l| (mode, l)));
    }
    drop(ns);
    let _ = std::fs::remove_dir_all(&work);
    for (i, &c) in clients.iter().enumerate() {
        let rows: Vec<(Mode, [Figures; 2])> = results.iter().map(|(m, r)| (*m, r[i])).collect();
        print_table(&rows, requests, c, interval);
    }
    println!(
        "\nThe replication link over each protected run (the primary's statistics at its end): \
         all bytes sent, and the guest's network output shipped with its epochs (`Output` \
         frames) among them\n"
    );
    println!("| mode | epochs | MiB sent | output MiB | output share | commit p50 / p99 µs |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (mode, l) in links {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "| {} | {} | {:.2} | {} | {} | {} / {} |",
            mode.name(),
            l.epochs,
            mib(l.wire_bytes),
            l.output_bytes
                .map_or("-".to_string(), |b| format!("{:.2}", mib(b))),
            l.output_bytes.map_or("-".to_string(), |b| format!(
                "{:.1}%",
                b as f64 * 100.0 / l.wire_bytes.max(1) as f64
            )),
            l.commit_us.0,
            l.commit_us.1
        );
    }
    Ok(())
}

/// What a protected run sent to its backup.
pub(crate) struct LinkBytes {
    epochs: u64,
    wire_bytes: u64,
    /// `None` from a build that does not ship output.
    output_bytes: Option<u64>,
    /// Pause start until the ack, p50 and p99 (µs), over the whole run.
    commit_us: (u64, u64),
}

/// The figures of the last statistics line in a primary's log.
fn link_bytes(log: &str) -> Option<LinkBytes> {
    let line = log.lines().rev().find(|l| l.contains("wire_bytes="))?;
    let field = |name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))?
            .parse()
            .ok()
    };
    // `commit_us p50=.. p99=..`: the two words after `commit_us`.
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "commit_us")?;
    let after = |i: usize, name: &str| -> Option<u64> {
        words.get(at + i)?.strip_prefix(name)?.parse().ok()
    };
    Some(LinkBytes {
        epochs: field("epochs=")?,
        wire_bytes: field("wire_bytes=")?,
        output_bytes: field("output_bytes="),
        commit_us: (after(1, "p50=")?, after(2, "p99=")?),
    })
}

/// redis-benchmark's SET and GET figures per client count against the kv guest run as
/// `mode`; with `disk` (bytes), the guest has a fresh disk of that size and logs every
/// write on it before replying (`aof=on`), and a protected guest's backup keeps a copy.
#[allow(clippy::too_many_arguments)]
pub(crate) fn measure(
    ns: &Netns,
    bin: &Path,
    work: &Path,
    mode: Mode,
    requests: u64,
    clients: &[u64],
    interval: u64,
    disk: Option<u64>,
) -> Result<(Vec<[Figures; 2]>, Option<LinkBytes>), String> {
    let kv = KvGuest::start(ns, bin, work, mode, interval, disk)?;
    let figures = clients
        .iter()
        .map(|&c| redis_benchmark(ns, requests, c))
        .collect::<Result<Vec<_>, String>>()?;
    Ok((figures, kv.stop()))
}

/// The kv guest at 10.0.0.2 in a namespace, run as a [`Mode`]: its `lockstep` processes.
pub(crate) struct KvGuest {
    mode: Mode,
    procs: Vec<Proc>,
}

impl KvGuest {
    /// Starts the guest as `mode` (see [`measure`] for `disk`) and returns once it listens
    /// and a protected guest's initial sync is over.
    pub(crate) fn start(
        ns: &Netns,
        bin: &Path,
        work: &Path,
        mode: Mode,
        interval: u64,
        disk: Option<u64>,
    ) -> Result<KvGuest, String> {
        let console = work.join(format!("console-{}", mode as u8));
        let _ = std::fs::remove_file(&console);
        let image = |name: &str| -> Result<String, String> {
            let path = work.join(format!("{name}-{}.img", mode as u8));
            std::fs::File::create(&path)
                .and_then(|f| f.set_len(disk.unwrap_or(0)))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(format!("path={}", path.display()))
        };
        let (guest_disk, backup_disk) = match disk {
            Some(_) => (Some(image("guest")?), Some(image("backup")?)),
            None => (None, None),
        };
        let mut kv = vec![
            "--guest",
            "builtin",
            "--net",
            "tap=tap0",
            "--guest-args",
            if disk.is_some() {
                "workload=kv ip=10.0.0.2/24 aof=on"
            } else {
                "workload=kv ip=10.0.0.2/24"
            },
        ];
        if let Some(d) = &guest_disk {
            kv.extend(["--disk", d]);
        }
        let console_arg = console.display().to_string();
        let spawn = |name: &str, args: Vec<&str>| {
            Proc::spawn(
                ns.command(bin, &args),
                work.join(format!("{name}.out")),
                work.join(format!("{name}.err")),
            )
        };
        let mut procs = Vec::new();
        match mode {
            Mode::Unprotected => {
                let mut args = vec!["run"];
                args.extend(kv.iter().copied());
                args.extend(["--console", &console_arg]);
                procs.push(spawn("run", args)?);
            }
            Mode::Early | Mode::NoEarly => {
                let mut args = vec!["backup", "--insecure", "--listen", "127.0.0.1:7600"];
                if let Some(d) = &backup_disk {
                    args.extend(["--disk", d]);
                }
                procs.push(spawn("backup", args)?);
                let interval = interval.to_string();
                let mut args = vec![
                    "primary",
                    "--insecure",
                    "--peer",
                    "127.0.0.1:7600",
                    "--interval-ms",
                    &interval,
                ];
                args.extend(kv.iter().copied());
                args.extend(["--console", &console_arg]);
                if let Mode::NoEarly = mode {
                    args.push("--no-early-checkpoint");
                }
                procs.push(spawn("primary", args)?);
            }
        }
        let limit = Duration::from_secs(30);
        if !wait_for_line(&console, "kv: listening", limit, || true) {
            return Err(format!(
                "the guest did not say 'kv: listening' within {limit:?}"
            ));
        }
        // Let the initial sync finish before measuring.
        std::thread::sleep(Duration::from_secs(2));
        Ok(KvGuest { mode, procs })
    }

    /// Ends the guest; a protected run ends in order, so that the primary logs its
    /// statistics, and returns what it sent to its backup.
    pub(crate) fn stop(mut self) -> Option<LinkBytes> {
        match self.mode {
            Mode::Unprotected => None,
            Mode::Early | Mode::NoEarly => self.procs.last_mut().and_then(|p| {
                p.terminate(Duration::from_secs(10));
                link_bytes(&p.log())
            }),
        }
    }
}

/// redis-benchmark's SET and GET figures with `clients` connections.
pub(crate) fn redis_benchmark(
    ns: &Netns,
    requests: u64,
    clients: u64,
) -> Result<[Figures; 2], String> {
    let out = Command::new("timeout")
        .arg("300")
        .args([
            "ip",
            "netns",
            "exec",
            &ns.name,
            "redis-benchmark",
            "-h",
            "10.0.0.2",
            "--csv",
        ])
        .args([
            "-n",
            &requests.to_string(),
            "-c",
            &clients.to_string(),
            "-t",
            "set,get",
        ])
        .output()
        .map_err(|e| format!("cannot run redis-benchmark: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok([parse(&text, "SET")?, parse(&text, "GET")?])
}

/// A row of redis-benchmark's CSV: test, rps, avg, min, p50, p95, p99, max.
fn parse(csv: &str, test: &str) -> Result<Figures, String> {
    let line = csv
        .lines()
        .find(|l| l.starts_with(&format!("\"{test}\"")))
        .ok_or_else(|| format!("no {test} row in redis-benchmark's output: {csv}"))?;
    let f: Vec<f64> = line
        .split(',')
        .skip(1)
        .map(|v| v.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    if f.len() < 7 {
        return Err(format!("short {test} row: {line}"));
    }
    Ok(Figures {
        rps: f[0],
        p50_ms: f[3],
        p99_ms: f[5],
    })
}

fn print_table(results: &[(Mode, [Figures; 2])], requests: u64, clients: u64, interval: u64) {
    println!(
        "\nredis-benchmark -n {requests} -c {clients} against the kv guest; epochs of {interval} ms \
         when protected{}\n",
        if clients == 1 {
            " (one connection: request -> reply, what output commit adds to each)"
        } else {
            ""
        }
    );
    println!("| mode | test | requests/s | p50 ms | p99 ms | throughput ratio | p50 added ms | p99 added ms |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let base = results.first().map(|r| r.1).unwrap_or_default();
    for (mode, figs) in results {
        for (i, test) in ["SET", "GET"].iter().enumerate() {
            let f = figs[i];
            let b = base[i];
            println!(
                "| {} | {test} | {:.0} | {:.3} | {:.3} | {:.2} | {:+.3} | {:+.3} |",
                mode.name(),
                f.rps,
                f.p50_ms,
                f.p99_ms,
                f.rps / b.rps,
                f.p50_ms - b.p50_ms,
                f.p99_ms - b.p99_ms
            );
        }
    }
}
