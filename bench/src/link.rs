//! `bench link`: what mutual TLS on the replication link costs, TLS ÷ `--insecure` in
//! one run, on real processes over loopback.
//!
//! Each trial runs the built-in guest's `hash` workload (`--wss`, 512 MiB of
//! pseudo-random data rewritten round after round: pages that neither the zero-page path
//! nor compression make cheap) in `lockstep run`, lets it fill its working set (`--fill`
//! seconds), then starts a backup and protects the running guest (`lockstep ctl protect`):
//!
//! 1. **Initial sync**: the `ctl protect` wall time until the pair is protected (the
//!    backup committed epoch 1), and the bytes the primary sent for it; their quotient is
//!    the sync's rate on the wire.
//! 2. **Epoch stream**: the next `--seconds` of epochs (25 ms): bytes on the wire per
//!    second (`lockstep_wire_bytes_total` from `--metrics`, before and after), and the
//!    commit latency p50/p99 of those epochs (`/status`).
//!
//! 3. **Link capacity**: the transport alone, no guest: 1 MiB frames of random pages sent
//!    back to back over loopback (`--capacity-mib`, 512) through the same
//!    `Connection` the processes use, received and decoded on another thread: MiB/s, and
//!    the time of each frame's send p50/p99. This is the headroom above what the guest
//!    and the backup's apply let the processes use.
//!
//! Trials alternate insecure / TLS (`--trials` of each) so that the machine's drift hits
//! both alike; the table gives each mode's median over its trials and the ratios TLS ÷
//! insecure (rates: higher is better; latencies: lower is better).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::link::PairTls;
use harness::Proc;

use crate::args::Args;
use crate::runs::work_dir;
use crate::BenchError;

pub const OPTIONS: &[&str] = &["trials", "seconds", "wss", "fill", "capacity-mib"];

/// The guest's memory: the working set and room for the rest.
const MEM: &str = "1G";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Insecure,
    Tls,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Insecure => "insecure",
            Mode::Tls => "TLS 1.3 (mutual)",
        }
    }
}

/// One trial's figures.
#[derive(Debug, Clone, Copy)]
struct Trial {
    sync_s: f64,
    sync_mib: f64,
    stream_mib_s: f64,
    epochs: f64,
    commit_p50_us: f64,
    commit_p99_us: f64,
}

pub fn run(args: &Args) -> Result<(), BenchError> {
    let trials = args.number("trials", 3.0, 1.0)? as usize;
    let seconds = args.number("seconds", 5.0, 1.0)?;
    let fill = args.number("fill", 8.0, 0.0)?;
    let wss = args.get("wss").unwrap_or("512M").to_string();
    let bin = harness::try_lockstep_bin().map_err(BenchError::Failed)?;
    let dir = work_dir().map_err(BenchError::Failed)?;
    let mut rows: Vec<(Mode, Result<Trial, String>)> = Vec::new();
    for t in 0..trials {
        for mode in [Mode::Insecure, Mode::Tls] {
            eprintln!(
                "bench link: trial {} of {trials}, {}: fill {fill} s, protect, {seconds} s of epochs...",
                t + 1,
                mode.name()
            );
            let sub = dir.join(format!("link-{t}-{mode:?}"));
            let r = trial(bin, &sub, mode, &wss, fill, seconds);
            if let Err(e) = &r {
                eprintln!("bench link: {}: {e}", mode.name());
            }
            rows.push((mode, r));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    report(&rows, trials, &wss, seconds);
    let mib = args.number("capacity-mib", 512.0, 16.0)? as usize;
    let mut caps: Vec<(Mode, Result<Capacity, String>)> = Vec::new();
    for t in 0..trials {
        for mode in [Mode::Insecure, Mode::Tls] {
            eprintln!(
                "bench link: capacity trial {} of {trials}, {}: {mib} MiB...",
                t + 1,
                mode.name()
            );
            caps.push((mode, capacity(mode, mib)));
        }
    }
    report_capacity(&caps, trials, mib);
    rows.extend(
        caps.into_iter()
            .filter_map(|(m, r)| r.err().map(|e| (m, Err(e)))),
    );
    let failed = rows.iter().filter(|(_, r)| r.is_err()).count();
    if failed > 0 {
        return Err(BenchError::Failed(format!(
            "{failed} of {} trials failed",
            rows.len()
        )));
    }
    Ok(())
}

fn report(rows: &[(Mode, Result<Trial, String>)], trials: usize, wss: &str, seconds: f64) {
    println!(
        "\n## Replication link: TLS ÷ insecure (hash workload, {wss} of random pages, {MEM} \
         guest, 25 ms epochs; median of {trials} trials each)\n"
    );
    println!(
        "| link | initial sync (s) | sync on the wire (MiB) | sync rate (MiB/s) | epoch stream \
         (MiB/s) | epochs in {seconds} s | commit p50 (ms) | commit p99 (ms) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let median = |mode: Mode, f: fn(&Trial) -> f64| -> Option<f64> {
        let mut v: Vec<f64> = rows
            .iter()
            .filter(|(m, _)| *m == mode)
            .filter_map(|(_, r)| r.as_ref().ok().map(f))
            .collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[(v.len() - 1) / 2])
    };
    let cols: [fn(&Trial) -> f64; 7] = [
        |t| t.sync_s,
        |t| t.sync_mib,
        |t| t.sync_mib / t.sync_s,
        |t| t.stream_mib_s,
        |t| t.epochs,
        |t| t.commit_p50_us / 1000.0,
        |t| t.commit_p99_us / 1000.0,
    ];
    for mode in [Mode::Insecure, Mode::Tls] {
        let cells: Vec<String> = cols
            .iter()
            .map(|f| median(mode, *f).map_or("failed".into(), |v| format!("{v:.2}")))
            .collect();
        println!("| {} | {} |", mode.name(), cells.join(" | "));
    }
    let ratio = |f: fn(&Trial) -> f64, invert: bool| -> String {
        match (median(Mode::Tls, f), median(Mode::Insecure, f)) {
            (Some(t), Some(i)) if t > 0.0 && i > 0.0 => {
                format!("{:.2}×", if invert { i / t } else { t / i })
            }
            _ => "-".into(),
        }
    };
    println!(
        "\nThroughput TLS ÷ insecure: initial sync {} (time⁻¹), sync rate {}, epoch stream {}; \
         commit latency TLS ÷ insecure: p50 {}, p99 {} (goal: throughput ≥ 0.8×).",
        ratio(|t| t.sync_s, true),
        ratio(|t| t.sync_mib / t.sync_s, false),
        ratio(|t| t.stream_mib_s, false),
        ratio(|t| t.commit_p50_us, false),
        ratio(|t| t.commit_p99_us, false),
    );
    for (mode, r) in rows {
        if let Err(e) = r {
            println!("\nA {} trial failed: {e}", mode.name());
        }
    }
}

fn link_args(dir: &Path, mode: Mode, node: &str) -> Result<Vec<String>, String> {
    match mode {
        Mode::Insecure => Ok(vec!["--insecure".into()]),
        Mode::Tls => {
            let certs = dir.join("tls");
            let pair = match PairTls::existing(&certs) {
                Some(p) => p,
                None => PairTls::make(harness::try_lockstep_bin()?, &certs, "lockstep")?,
            };
            Ok(pair.args(node))
        }
    }
}

fn spawn(bin: &Path, dir: &Path, name: &str, args: &[String]) -> Result<Proc, String> {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    Proc::spawn(
        cmd,
        dir.join(format!("{name}.out")),
        dir.join(format!("{name}.err")),
    )
}

fn ctl(bin: &Path, sock: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin)
        .arg("ctl")
        .arg("--api-sock")
        .arg(sock)
        .args(args)
        .output()
        .map_err(|e| format!("lockstep ctl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "lockstep ctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `lockstep_wire_bytes_total` from the metrics endpoint at `addr`.
fn wire_bytes(addr: &str) -> Result<f64, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("metrics {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    body.lines()
        .find_map(|l| l.strip_prefix("lockstep_wire_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "no lockstep_wire_bytes_total in the metrics".to_string())
}

fn free_addr() -> Result<String, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.to_string())
        .map_err(|e| e.to_string())
}

fn trial(
    bin: &Path,
    dir: &Path,
    mode: Mode,
    wss: &str,
    fill: f64,
    seconds: f64,
) -> Result<Trial, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let sock = dir.join("run.sock");
    let metrics = free_addr()?;
    let mut args: Vec<String> = [
        "run",
        "--mem",
        MEM,
        "--guest",
        "builtin",
        "--guest-args",
        &format!("workload=hash rounds=1000000 wss={wss}"),
        "--console",
        "none",
        "--interval-ms",
        "25",
        "--api-sock",
        &sock.to_string_lossy(),
        "--metrics",
        &metrics,
    ]
    .map(String::from)
    .to_vec();
    args.extend(link_args(dir, mode, "node1")?);
    let mut run = spawn(bin, dir, "run", &args)?;
    let result = protect_and_measure(bin, dir, mode, &sock, &metrics, fill, seconds);
    let _ = ctl(bin, &sock, &["stop"]);
    if run.wait_for(Duration::from_secs(30)).is_none() {
        run.kill9();
    }
    result.map_err(|e| format!("{e}\n{}", harness::pair::tail(&run.log(), 5)))
}

fn protect_and_measure(
    bin: &Path,
    dir: &Path,
    mode: Mode,
    sock: &Path,
    metrics: &str,
    fill: f64,
    seconds: f64,
) -> Result<Trial, String> {
    let started = Instant::now();
    while ctl(bin, sock, &["status"]).is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            return Err("the run did not answer on its control socket".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs_f64(fill));
    let listen = free_addr()?;
    let mut args: Vec<String> = ["backup", "--listen", &listen, "--console", "none"]
        .map(String::from)
        .to_vec();
    args.extend(link_args(dir, mode, "node2")?);
    let mut backup = spawn(bin, dir, "backup", &args)?;
    if !harness::wait_for_line(
        &backup.stderr,
        "listening on",
        Duration::from_secs(10),
        || true,
    ) {
        backup.kill9();
        return Err(format!("the backup did not start: {}", backup.log()));
    }
    let before = wire_bytes(metrics)?;
    let t = Instant::now();
    let protected = ctl(bin, sock, &["protect", "--peer", &listen]);
    let sync_s = t.elapsed().as_secs_f64();
    let result = protected.and_then(|_| {
        let synced = wire_bytes(metrics)?;
        let epoch0 = status_u64(bin, sock, "acked_epoch")?;
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(seconds));
        let after = wire_bytes(metrics)?;
        let took = t.elapsed().as_secs_f64();
        let status = ctl(bin, sock, &["status", "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&status).map_err(|e| e.to_string())?;
        let num = |k: &str| v[k].as_f64().ok_or_else(|| format!("no {k} in {status}"));
        Ok(Trial {
            sync_s,
            sync_mib: (synced - before) / 1048576.0,
            stream_mib_s: (after - synced) / 1048576.0 / took,
            epochs: num("acked_epoch")? - epoch0 as f64,
            commit_p50_us: num("commit_p50_us")?,
            commit_p99_us: num("commit_p99_us")?,
        })
    });
    backup.kill9();
    result
}

fn status_u64(bin: &Path, sock: &Path, key: &str) -> Result<u64, String> {
    let status = ctl(bin, sock, &["status", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&status).map_err(|e| e.to_string())?;
    v[key]
        .as_u64()
        .ok_or_else(|| format!("no {key} in {status}"))
}

/// One capacity trial: MiB/s end to end, and each frame's send time.
#[derive(Debug, Clone)]
struct Capacity {
    mib_s: f64,
    send_ms: Vec<f64>,
}

/// The link alone: `mib` MiB of 1 MiB page frames over loopback, insecure or TLS.
fn capacity(mode: Mode, mib: usize) -> Result<Capacity, String> {
    use ::checkpoint::codec::encode_page;
    use ::checkpoint::protocol::PagesFrameBuilder;
    use ::checkpoint::tls::{generate, LinkSecurity, TlsIdentity};
    use std::sync::Arc;

    let (client, server) = match mode {
        Mode::Insecure => (LinkSecurity::Insecure, LinkSecurity::Insecure),
        Mode::Tls => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let set = generate("lockstep", &["node1", "node2"], now - 60, now + 3600)
                .map_err(|e| e.to_string())?;
            let id = |i: usize| -> Result<LinkSecurity, String> {
                let (_, cert, key) = &set.nodes[i];
                let src = ("--tls-cert", Path::new("memory"));
                let pems = [
                    (cert.as_bytes(), src),
                    (key.as_bytes(), src),
                    (set.ca.as_bytes(), src),
                ];
                TlsIdentity::from_pem(pems, "lockstep")
                    .map(|t| LinkSecurity::Tls(Arc::new(t)))
                    .map_err(|e| e.to_string())
            };
            (id(0)?, id(1)?)
        }
    };
    // 16 distinct frames of 256 random pages (1 MiB each), sent round robin.
    let frames: Vec<bytes::Bytes> = (0..16u64)
        .map(|f| {
            let mut b = PagesFrameBuilder::pages(1, 1 << 20);
            let mut x = (f << 40) | 0x9e37_79b9;
            for i in 0..256u64 {
                let mut p = [0u8; 4096];
                for w in p.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
                b.push(i, |out| encode_page(&p, None, out));
            }
            b.finish()
        })
        .collect();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let receiver = std::thread::spawn(move || -> Result<(), String> {
        let mut conn = server.accept(&listener).map_err(|e| e.to_string())?;
        for _ in 0..mib {
            conn.recv(Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    let mut conn = client
        .connect(addr, Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut send_ms = Vec::with_capacity(mib);
    for i in 0..mib {
        let t = Instant::now();
        conn.send_frames(&[&frames[i % frames.len()]])
            .map_err(|e| e.to_string())?;
        send_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    receiver
        .join()
        .map_err(|_| "the receiving thread panicked".to_string())??;
    let bytes: usize = (0..mib).map(|i| frames[i % frames.len()].len()).sum();
    Ok(Capacity {
        mib_s: bytes as f64 / 1048576.0 / started.elapsed().as_secs_f64(),
        send_ms,
    })
}

fn report_capacity(caps: &[(Mode, Result<Capacity, String>)], trials: usize, mib: usize) {
    println!(
        "\n## Link capacity: the transport alone, {mib} MiB of 1 MiB frames of random pages \
         over loopback (median of {trials} trials; send p50/p99 over every frame of them)\n"
    );
    println!("| link | MiB/s | frame send p50 (ms) | frame send p99 (ms) |");
    println!("|---|---:|---:|---:|");
    let mut rate = [None, None];
    for (k, mode) in [Mode::Insecure, Mode::Tls].into_iter().enumerate() {
        let ok: Vec<&Capacity> = caps
            .iter()
            .filter(|(m, _)| *m == mode)
            .filter_map(|(_, r)| r.as_ref().ok())
            .collect();
        if ok.is_empty() {
            println!("| {} | failed | | |", mode.name());
            continue;
        }
        let mut rates: Vec<f64> = ok.iter().map(|c| c.mib_s).collect();
        rates.sort_by(f64::total_cmp);
        let mut sends: Vec<f64> = ok.iter().flat_map(|c| c.send_ms.iter().copied()).collect();
        sends.sort_by(f64::total_cmp);
        let at = |p: f64| sends[((sends.len() - 1) as f64 * p).round() as usize];
        rate[k] = Some(rates[(rates.len() - 1) / 2]);
        println!(
            "| {} | {:.0} | {:.3} | {:.3} |",
            mode.name(),
            rates[(rates.len() - 1) / 2],
            at(0.5),
            at(0.99)
        );
    }
    if let [Some(i), Some(t)] = rate {
        println!("\nLink capacity TLS ÷ insecure: {:.2}×.", t / i);
    }
}
