//! Disks end to end: the virtio-blk device over real image files in temp dirs, driven by
//! the reference guest's `disk` workload (checksummed blocks written, read back and
//! verified) and by the kv guest with `aof=on` (its log replayed by a new guest booted
//! from the disk alone); a snapshot taken during disk I/O and restored on its own copy of
//! the disk; bad images refused with one line. Disk replication is tested in
//! replication.rs and failover.rs.
//!
//! The kv test creates its own network namespace with a tap (10.0.0.1/24 on the host
//! side, the guest at 10.0.0.2), runs lockstep and the client inside it, and deletes it
//! afterwards.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use harness::{wait_for_line, Kv, Netns, Proc, Reply};
use tests::{kvm_required, lockstep, lockstep_bin, read_console, TempDir};

/// One disk test at a time: each runs a guest doing I/O flat out.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serialize() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

use tests::sparse_image as image;

/// A journal saying its image is being synced from a primary (the layout in
/// engine/src/devices/journal.rs: magic, kind 2, zeros, CRC32 of the rest).
fn syncing_journal() -> Vec<u8> {
    let mut b = b"LKSJRNL1".to_vec();
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&[0u8; 20]);
    let crc = crc32(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// CRC-32 (IEEE), bit by bit.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The `key=<n>` value of the last console line starting with `prefix`.
fn last_value(console: &str, prefix: &str, key: &str) -> Option<u64> {
    let line = console.lines().rev().find(|l| l.starts_with(prefix))?;
    line.split([' ', '(', ')'])
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// `disk: verified <n> blocks ...`
fn verified(console: &str) -> Option<u64> {
    console.lines().find_map(|l| {
        l.strip_prefix("disk: verified ")?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

fn run_disk(dir: &TempDir, console: &str, disk: &str, guest_args: &str) -> tests::Run {
    lockstep(&[
        "run",
        "--guest",
        "builtin",
        "--guest-args",
        guest_args,
        "--disk",
        disk,
        "--console",
        &dir.arg(console),
    ])
}

#[test]
fn disk_workload_writes_reads_flushes_and_verifies_its_blocks() {
    if !kvm_required() {
        return;
    }
    let _one = serialize();
    let dir = TempDir::new("disk-workload");
    let img = dir.join("disk.img");
    image(&img, 16 << 20);
    let disk = format!("path={}", img.display());

    let run = run_disk(
        &dir,
        "write.txt",
        &disk,
        "workload=disk blocks=1024 rate=0 seconds=2 flush_every=8",
    );
    run.assert_success();
    let console = read_console(&dir.join("write.txt"));
    assert!(
        console.contains("disk: capacity=16777216 id=disk.img blocks=1024"),
        "{console}"
    );
    let writes = last_value(&console, "disk: verified", "writes").expect("a verified line");
    let reads = last_value(&console, "disk: verified", "reads").unwrap();
    let flushes = last_value(&console, "disk: verified", "flushes").unwrap();
    assert!(writes >= 200, "too few writes in 2 s: {console}");
    assert!(
        reads >= writes.min(1024),
        "every written block is read back: {console}"
    );
    assert!(flushes >= writes / 8, "a flush every 8 writes: {console}");
    assert_eq!(verified(&console), Some(writes.min(1024)), "{console}");
    assert!(console.contains("disk: done") && !console.contains("MISMATCH"));

    // The blocks are on the image itself, whole: block 0 starts with the magic, and a
    // fresh guest finds every block it can check, none damaged.
    let bytes = fs::read(&img).unwrap();
    assert_eq!(&bytes[..8], b"LKBLK001");
    let written = writes.min(1024);
    let run = run_disk(
        &dir,
        "check.txt",
        &format!("{disk},readonly"),
        "workload=disk blocks=1024 mode=check",
    );
    run.assert_success();
    let check = read_console(&dir.join("check.txt"));
    assert!(
        check.contains(&format!(
            "disk: check blocks=1024 written={written} damaged=0"
        )),
        "{check}"
    );

    // One byte changed in block 5: the check finds it and fails.
    let mut damaged = bytes.clone();
    damaged[5 * 4096 + 100] ^= 0x40;
    fs::write(&img, &damaged).unwrap();
    let run = run_disk(
        &dir,
        "damaged.txt",
        &disk,
        "workload=disk blocks=1024 mode=check",
    );
    assert_eq!(run.code(), Some(5), "{run:?}");
    let check = read_console(&dir.join("damaged.txt"));
    assert!(check.contains("damaged=1"), "{check}");

    // A read-only disk: the device says so, the workload refuses to write.
    let run = run_disk(
        &dir,
        "ro.txt",
        &format!("{disk},readonly"),
        "workload=disk blocks=16 mode=write",
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(read_console(&dir.join("ro.txt")).contains("read-only"));
    assert_eq!(
        fs::read(&img).unwrap(),
        damaged,
        "a read-only disk was written"
    );
}

#[test]
fn a_snapshot_during_disk_io_restores_with_no_write_lost_or_repeated() {
    if !kvm_required() {
        return;
    }
    let _one = serialize();
    let dir = TempDir::new("disk-snapshot");
    let img = dir.join("disk.img");
    image(&img, 8 << 20);
    let disk = format!("path={}", img.display());
    let snap = dir.arg("snap");
    // As fast as it can: a request is in flight nearly all the time.
    let run = lockstep(&[
        "run",
        "--guest",
        "builtin",
        "--guest-args",
        "workload=disk blocks=512 rate=0 seconds=3 flush_every=4",
        "--disk",
        &disk,
        "--console",
        &dir.arg("first.txt"),
        "--snapshot-after-ms",
        "1200",
        "--snapshot-to",
        &snap,
    ]);
    run.assert_success();
    assert!(
        run.stderr.contains("snapshot written") && run.stderr.contains("1 disk image copies"),
        "{run:?}"
    );
    let first = read_console(&dir.join("first.txt"));
    assert!(
        first.contains("disk: ms=1000") && first.contains("disk: verified"),
        "the run did not go on after its snapshot: {first}"
    );
    // The image went on changing; the snapshot's copy did not.
    assert_ne!(
        fs::read(&img).unwrap(),
        fs::read(Path::new(&snap).join("disk0.img")).unwrap()
    );

    // Another image size: refused, naming both sizes.
    let small = dir.join("small.img");
    image(&small, 4 << 20);
    lockstep(&[
        "restore",
        &snap,
        "--disk",
        &format!("path={}", small.display()),
    ])
    .assert_one_line_error(&["differs", "8388608 bytes", "4194304 bytes"]);

    // On the snapshot's own copy of the disk: the guest goes on where it was, and every
    // block it wrote before and after the snapshot is the generation its memory says.
    let run = lockstep(&["restore", &snap, "--console", &dir.arg("second.txt")]);
    assert!(run.stderr.contains("the snapshot's copy"), "{run:?}");
    run.assert_success();
    let second = read_console(&dir.join("second.txt"));
    assert!(
        !second.contains("MISMATCH") && second.contains("disk: done"),
        "{second}"
    );
    let writes = last_value(&second, "disk: verified", "writes").unwrap();
    let before = last_value(&first, "disk: ms=", "writes").unwrap();
    assert!(writes > before, "no write after the restore: {second}");
    assert_eq!(verified(&second), Some(writes.min(512)), "{second}");
}

#[test]
fn kv_with_aof_keeps_every_acknowledged_write_for_a_new_guest_on_the_disk() {
    if !kvm_required() {
        return;
    }
    let _one = serialize();
    let dir = TempDir::new("disk-aof");
    let ns = Netns::create("lsdisk").expect("network namespace");
    let img = dir.join("kv.img");
    image(&img, 32 << 20);
    let disk = format!("path={}", img.display());
    let start = |name: &str| -> Proc {
        let console = dir.join(&format!("{name}.txt"));
        let p = Proc::spawn(
            ns.command(
                lockstep_bin(),
                &[
                    "run",
                    "--guest",
                    "builtin",
                    "--net",
                    "tap=tap0",
                    "--disk",
                    &disk,
                    "--guest-args",
                    "workload=kv ip=10.0.0.2/24 aof=on",
                    "--console",
                    &dir.arg(&format!("{name}.txt")),
                ],
            ),
            dir.join(&format!("{name}.out")),
            dir.join(&format!("{name}.err")),
        )
        .expect("start lockstep");
        assert!(
            wait_for_line(&console, "kv: listening", Duration::from_secs(20), || true),
            "{name}: no kv guest: {}",
            read_console(&console)
        );
        p
    };
    let connect_with = |timeout: Duration| {
        let stream = ns
            .connect("10.0.0.2:6379", Duration::from_secs(10))
            .expect("connect to the guest");
        Kv::new(stream, timeout).unwrap()
    };
    let connect = || connect_with(Duration::from_secs(10));
    let bulk = |s: &str| Reply::Bulk(Some(s.as_bytes().to_vec()));

    let mut first = start("first");
    assert!(read_console(&dir.join("first.txt")).contains("kv: aof: new log"));
    let mut kv = connect();
    let mut model = std::collections::BTreeMap::new();
    for i in 0..200 {
        let (k, v) = (
            format!("key:{i}"),
            format!("value {i} {}", "x".repeat(i * 7)),
        );
        assert_eq!(
            kv.call(&["SET", &k, &v]).unwrap(),
            Reply::Simple("OK".into())
        );
        model.insert(k, v);
    }
    assert_eq!(
        kv.call(&["SET", "n", "41"]).unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(kv.call(&["INCR", "n"]).unwrap(), Reply::Int(42));
    model.insert("n".into(), "42".into());
    assert_eq!(
        kv.call(&["APPEND", "key:3", "+more"]).unwrap(),
        Reply::Int(model["key:3"].len() as i64 + 5)
    );
    model.get_mut("key:3").unwrap().push_str("+more");
    assert_eq!(
        kv.call(&["DEL", "key:7", "key:8", "nothere"]).unwrap(),
        Reply::Int(2)
    );
    model.remove("key:7");
    model.remove("key:8");
    // An error changes nothing and is not logged (its replay would fail alike).
    assert!(matches!(
        kv.call(&["INCR", "key:1"]).unwrap(),
        Reply::Error(_)
    ));
    // A value larger than the 4 KiB blocks the log is written in.
    let big = "B".repeat(100_000);
    assert_eq!(
        kv.call(&["SET", "big", &big]).unwrap(),
        Reply::Simple("OK".into())
    );
    model.insert("big".into(), big);

    // Every write above was acknowledged: the machine is killed outright.
    first.kill9();
    drop(kv);

    // A new guest, booted from nothing but the same image.
    let second = start("second");
    let console = read_console(&dir.join("second.txt"));
    assert!(
        console.contains("kv: aof: replayed 205 commands"),
        "the log did not hold the 205 writes: {console}"
    );
    let mut kv = connect();
    assert_eq!(
        kv.call(&["DBSIZE"]).unwrap(),
        Reply::Int(model.len() as i64)
    );
    for (k, v) in &model {
        assert_eq!(kv.call(&["GET", k]).unwrap(), bulk(v), "key {k}");
    }
    assert_eq!(kv.call(&["GET", "key:7"]).unwrap(), Reply::Bulk(None));

    // Killed in the middle of a stream of writes: every INCR acknowledged before the
    // kill is on the disk; the one in flight at most is extra.
    let mut second = second;
    let pid = second.pid();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        // SAFETY: kill(2) on the pid of a child this test started and still owns.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    });
    // A short read timeout: a killed guest never answers nor resets the connection.
    let mut kv = connect_with(Duration::from_secs(1));
    let mut acked = 0i64;
    while let Ok(Reply::Int(n)) = kv.call(&["INCR", "ctr"]) {
        assert_eq!(n, acked + 1, "INCR skipped a value");
        acked = n;
    }
    killer.join().unwrap();
    second.kill9();
    assert!(acked > 20, "too few writes before the kill: {acked}");
    drop(kv);
    let third = start("third");
    let mut kv = connect();
    let Reply::Bulk(Some(ctr)) = kv.call(&["GET", "ctr"]).unwrap() else {
        panic!("the counter is gone");
    };
    let ctr: i64 = String::from_utf8(ctr).unwrap().parse().unwrap();
    assert!(
        ctr == acked || ctr == acked + 1,
        "{acked} INCRs were acknowledged, the new guest has {ctr}"
    );
    assert_eq!(kv.call(&["GET", "n"]).unwrap(), bulk("42"));
    drop(third);
}

/// Waits until `file` shows `needle`.
fn wait_for(file: &Path, needle: &str) {
    assert!(
        wait_for_line(file, needle, Duration::from_secs(20), || true),
        "{} did not show '{needle}': {}",
        file.display(),
        fs::read_to_string(file).unwrap_or_default()
    );
}

#[test]
fn bad_disks_get_one_line_errors() {
    if !kvm_required() {
        return;
    }
    let _one = serialize();
    let dir = TempDir::new("disk-errors");
    let run = |disk: &str| {
        lockstep(&[
            "run",
            "--guest",
            "builtin",
            "--guest-args",
            "workload=disk blocks=16 seconds=1",
            "--disk",
            disk,
        ])
    };
    let missing = dir.join("missing.img");
    run(&format!("path={}", missing.display())).assert_one_line_error(&[
        "missing.img",
        "cannot open",
        "No such file",
    ]);
    run(&format!("path={}", dir.path().display())).assert_one_line_error(&["is a directory"]);
    let ro = dir.join("ro.img");
    image(&ro, 2 << 20);
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o444)).unwrap();
    run(&format!("path={}", ro.display())).assert_one_line_error(&[
        "ro.img",
        "read-only",
        ",readonly",
    ]);
    let small = dir.join("small.img");
    image(&small, 64 << 10);
    run(&format!("path={}", small.display())).assert_one_line_error(&[
        "small.img",
        "65536 bytes",
        "at least",
    ]);
    run("file=/tmp/x").assert_one_line_error(&["--disk", "path=FILE"]);
    // One image named twice, by a second name.
    let twice = dir.join("twice.img");
    image(&twice, 2 << 20);
    let alias = dir.join("alias.img");
    std::os::unix::fs::symlink(&twice, &alias).unwrap();
    lockstep(&[
        "run",
        "--guest",
        "builtin",
        "--disk",
        &format!("path={}", twice.display()),
        "--disk",
        &format!("path={}", alias.display()),
    ])
    .assert_one_line_error(&["twice.img", "alias.img", "name the same image"]);
    // An image that is not whole sectors: it works, and the log says what the guest lacks.
    let odd = dir.join("odd.img");
    image(&odd, (1 << 20) + 100);
    let r = run(&format!("path={}", odd.display()));
    r.assert_success();
    assert!(
        r.stderr.contains("not a whole number of 512-byte sectors")
            && r.stderr.contains("the last 100 are out of its reach"),
        "{r:?}"
    );

    // An image that holds fewer blocks than asked: the guest says so.
    let img = dir.join("disk.img");
    image(&img, 1 << 20);
    let r = lockstep(&[
        "run",
        "--guest",
        "builtin",
        "--guest-args",
        "workload=disk blocks=1000",
        "--disk",
        &format!("path={}", img.display()),
    ]);
    assert_eq!(r.code(), Some(2), "{r:?}");
    assert!(
        r.stdout
            .contains("needs 4096000 bytes, the disk has 1048576"),
        "{r:?}"
    );

    // A second lockstep on an image in use.
    let sock = dir.join("first.sock");
    let mut first = tests::ctl::spawn(
        &dir,
        "first",
        &[
            "run",
            "--guest",
            "builtin",
            "--guest-args",
            "workload=disk blocks=64 rate=50 seconds=60",
            "--disk",
            &format!("path={}", img.display()),
            "--console",
            &dir.arg("first.txt"),
            "--api-sock",
            tests::ctl::path(&sock),
        ],
    );
    wait_for(&dir.join("first.txt"), "disk: capacity=");
    run(&format!("path={}", img.display()))
        .assert_one_line_error(&["disk.img", "in use by another lockstep"]);
    run(&format!("path={},readonly", img.display())).assert_one_line_error(&["disk.img", "in use"]);
    // A backup cannot keep its copy in it either.
    let disk = format!("path={}", img.display());
    let backup = |disk: &str| {
        lockstep(&[
            "backup",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--disk",
            disk,
        ])
    };
    backup(&disk).assert_one_line_error(&["disk.img", "in use by another lockstep"]);
    first.kill9();

    // A backup's images are checked as a run's are, before any primary is heard.
    backup(&format!("path={}", missing.display()))
        .assert_one_line_error(&["missing.img", "No such file"]);
    backup(&format!("path={}", small.display())).assert_one_line_error(&["small.img", "at least"]);
    // An image a backup left in the middle of its initial sync matches no epoch: a run
    // refuses it, a backup takes it (its sync repairs it).
    fs::write(
        format!("{}.lockstep-journal", img.display()),
        syncing_journal(),
    )
    .unwrap();
    run(&disk).assert_one_line_error(&["disk.img", "middle of an initial sync"]);

    // kv aof=on without a disk: the guest names what it needs.
    let r = lockstep(&[
        "run",
        "--guest",
        "builtin",
        "--guest-args",
        "workload=kv ip=10.0.0.2/24 aof=on",
    ]);
    assert_eq!(r.code(), Some(2), "{r:?}");
    assert!(
        r.stdout
            .contains("workload=kv aof=on needs a virtio-blk device (--disk)"),
        "{r:?}"
    );
}

/// What disk replication will build on: with writes recorded, the writes taken at each
/// capture (an epoch's end, the device frozen) rebuild the image exactly, from a blank
/// one, while the guest writes flat out across the captures.
#[test]
fn the_writes_taken_at_each_capture_rebuild_the_image() {
    use engine::devices::disk::DiskConfig;
    use engine::devices::serial::Console;
    use engine::machine::{Machine, MachineConfig};
    use engine::vstate::vcpu::VcpuEvent;

    if !kvm_required() {
        return;
    }
    let _one = serialize();
    let dir = TempDir::new("disk-epochs");
    let img = dir.join("disk.img");
    const SIZE: usize = 4 << 20;
    image(&img, SIZE as u64);
    let cfg = MachineConfig {
        mem_size: 64 << 20,
        vcpus: 1,
        console: Console::File(dir.join("console.txt")),
        net: None,
        disks: vec![DiskConfig {
            path: img.clone(),
            readonly: false,
        }],
        dirty_ring: None,
    };
    let mut m = Machine::boot(
        &cfg,
        engine::BUILTIN_GUEST,
        "workload=disk blocks=512 rate=0 seconds=2 flush_every=4",
    )
    .expect("boot");
    m.disks()[0].record_writes(true);
    let mut mirror = vec![0u8; SIZE];
    let mut apply = |writes: Vec<engine::devices::virtio::block::DiskWrite>| -> usize {
        for w in &writes {
            assert!(
                w.offset % 4096 == 0 && w.data.len() == 4096,
                "a whole block"
            );
            let at = w.offset as usize;
            mirror[at..at + w.data.len()].copy_from_slice(&w.data);
        }
        writes.len()
    };
    m.resume().expect("resume");
    let (mut epochs, mut writes, mut busy) = (0, 0, 0);
    let status = loop {
        match m.wait_event(Duration::from_millis(10)) {
            Some(VcpuEvent::GuestExit { status, .. }) => break status,
            Some(other) => panic!("the guest stopped: {other:?}"),
            None => {}
        }
        m.pause_and_capture().expect("capture");
        let n = apply(m.disks()[0].take_writes());
        writes += n;
        busy += usize::from(n > 0);
        epochs += 1;
        m.resume().expect("resume");
    };
    m.pause().expect("pause");
    writes += apply(m.disks()[0].take_writes());
    m.flush_console();
    let console = read_console(&dir.join("console.txt"));
    assert_eq!(status, 0, "{console}");
    assert!(console.contains("disk: verified 512 blocks"), "{console}");
    assert!(
        epochs >= 20 && busy >= epochs / 2,
        "{epochs} epochs, {busy} with writes"
    );
    let reported = last_value(&console, "disk: verified", "writes").unwrap() as usize;
    assert_eq!(
        writes, reported,
        "every write the guest made was recorded, once"
    );
    assert!(
        mirror == fs::read(&img).unwrap(),
        "the recorded writes do not rebuild the image"
    );
}
