//! Invariant 3 — at most one guest of a pair runs — as it depends on fence agents: what
//! lockstep sends them, which options it keeps to itself, how it reads and times them, and
//! `scripts/fence-pidfile` held to the ClusterLabs fence-agents conventions. A real agent
//! from Debian's `fence-agents` package shows it gets past its option checks.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tests::pair::{fence_agent, strings, Pair};
use tests::{kvm_required, lockstep, one_at_a_time, TempDir, Watchdog};

/// A process to fence: `sleep 300`, killed on drop.
struct Victim(Child);

impl Victim {
    fn start() -> Victim {
        Victim(
            Command::new("sleep")
                .arg("300")
                .spawn()
                .expect("start sleep"),
        )
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn alive(&mut self) -> bool {
        self.0.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `scripts/fence-pidfile` with `stdin`; returns (exit code, stdout, stderr).
fn agent(stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(fence_agent())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run scripts/fence-pidfile");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invariant3_an_agent_that_cannot_identify_its_victim_fails() {
    let dir = TempDir::new("fence-identify");
    let mut victim = Victim::start();
    let good = dir.join("v.pid");
    std::fs::write(&good, format!("{}\n", victim.pid())).unwrap();
    std::fs::write(dir.join("empty.pid"), "").unwrap();
    std::fs::write(dir.join("junk.pid"), "12ab\n").unwrap();
    std::fs::write(dir.join("init.pid"), "1\n").unwrap();
    let cases = [
        // The input: a typo in the path.
        format!("action=off\npidfile={}\n", dir.arg("v.pi")),
        format!("action=off\npidfile={}\n", dir.arg("empty.pid")),
        format!("action=off\npidfile={}\n", dir.arg("junk.pid")),
        format!("action=off\npidfile={}\n", dir.arg("init.pid")),
        format!("action=off\npidfile={}\n", dir.path().display()),
        "action=off\n".to_string(),
        // fencing.py does not strip the key: "pidfile " is another, unknown option.
        format!("action=off\npidfile ={}\n", good.display()),
        format!("action=reboot\npidfile={}\n", dir.arg("v.pi")),
        format!("action=status\npidfile={}\n", dir.arg("v.pi")),
        format!("action=monitor\npidfile={}\n", dir.arg("v.pi")),
    ];
    for input in &cases {
        let (code, _, err) = agent(input);
        assert_ne!(code, 0, "{input:?} succeeded");
        assert_ne!(code, 2, "{input:?} claimed the victim is off");
        assert!(!err.is_empty(), "{input:?}: no reason on stderr");
        assert!(victim.alive(), "{input:?} killed the victim");
    }
}

#[test]
fn invariant3_a_pid_given_to_another_process_is_never_killed() {
    let dir = TempDir::new("fence-reuse");
    let mut other = Victim::start();
    let path = dir.join("v.pid");
    std::fs::write(&path, format!("{}\n", other.pid())).unwrap();
    // The file is older than the process now holding the pid: it named one that died.
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(hour_ago)
        .unwrap();
    let p = path.to_str().unwrap();
    let (code, out, _) = agent(&format!("action=status\npidfile={p}\n"));
    assert_eq!((code, out.trim()), (2, "Status: OFF"));
    assert_eq!(agent(&format!("action=off\npidfile={p}\n")).0, 0);
    assert!(
        other.alive(),
        "an unrelated process holding the pid was killed"
    );
}

#[test]
fn invariant3_an_orderly_end_removes_the_pid_file() {
    // A stale file from a clean run must not vouch for a victim: lockstep removes its own
    // on an orderly end (here a backup stopped by SIGTERM while it waits for a primary).
    let dir = TempDir::new("fence-pidfile-end");
    let path = dir.join("b.pid");
    let mut b = Command::new(tests::lockstep_bin())
        .args([
            "backup",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--pid-file",
        ])
        .arg(&path)
        .stderr(Stdio::null())
        .spawn()
        .expect("start a backup");
    let t = std::time::Instant::now();
    while !path.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        std::fs::read_to_string(&path).unwrap().trim(),
        b.id().to_string()
    );
    // SAFETY: kill(2) takes no pointers; the child is not reaped yet.
    unsafe { libc::kill(b.id() as libc::pid_t, libc::SIGTERM) };
    let status = b.wait().unwrap();
    assert!(
        !path.exists(),
        "the pid file outlived an orderly end ({status})"
    );
}

#[test]
fn invariant3_the_agent_reads_options_as_fence_agents_do() {
    let dir = TempDir::new("fence-parse");
    for (i, input) in [
        "action=off\r\npidfile=PID\r\n",
        "  action=off  \n\tpidfile=PID \n",
        "# comment\n\naction=off\npidfile=\"PID\"\n",
        "action=status\npidfile=/nonexistent\npidfile=PID\naction=off\n",
        "option=off\nplug=node-a\npidfile=PID",
    ]
    .iter()
    .enumerate()
    {
        let mut victim = Victim::start();
        let path = dir.join(&format!("v{i}.pid"));
        std::fs::write(&path, format!("{}\n", victim.pid())).unwrap();
        let input = input.replace("PID", path.to_str().unwrap());
        let (code, _, err) = agent(&input);
        assert_eq!(code, 0, "{input:?}: {err}");
        assert!(!victim.alive(), "{input:?}: the victim still runs");
        // Already gone is off too, and says so again.
        assert_eq!(agent(&input).0, 0, "{input:?} twice");
    }
}

#[test]
fn invariant3_the_agents_actions_and_exit_codes_follow_the_convention() {
    let dir = TempDir::new("fence-actions");
    let mut victim = Victim::start();
    let pid = dir.join("v.pid");
    std::fs::write(&pid, format!("{}\n", victim.pid())).unwrap();
    let p = pid.to_str().unwrap();
    let run = |action: &str| agent(&format!("action={action}\nplug=vm1\npidfile={p}\n"));

    let (code, out, _) = run("status");
    assert_eq!((code, out.trim()), (0, "Status: ON"));
    assert_eq!(run("monitor").0, 0);
    assert_eq!(run("validate-all").0, 0);
    let (code, out, _) = run("list");
    assert_eq!((code, out.trim()), (0, format!("vm1,{p}").as_str()));
    assert_eq!(run("on").0, 1, "nothing to power on");
    assert_eq!(run("dance").0, 1, "an unknown action");
    assert!(victim.alive());
    assert_eq!(run("reboot").0, 0);
    assert!(!victim.alive(), "reboot did not switch the victim off");
    let (code, out, _) = run("status");
    assert_eq!((code, out.trim()), (2, "Status: OFF"));

    // Metadata as the ClusterLabs agents print it: well-formed XML with the action
    // parameter, the parameters and the actions (Pacemaker's fencer reads it).
    let (code, xml, err) = agent("action=metadata\n");
    assert_eq!(code, 0, "{err}");
    for needle in [
        "<resource-agent name=\"fence-pidfile\"",
        "<parameter name=\"action\"",
        "<getopt mixed=\"-o, --action=[action]\" />",
        "<parameter name=\"pidfile\" unique=\"0\" required=\"1\">",
        "<parameter name=\"plug\"",
        "<action name=\"off\" />",
        "<action name=\"reboot\" />",
        "<action name=\"monitor\" />",
        "<action name=\"metadata\" />",
    ] {
        assert!(xml.contains(needle), "metadata lacks {needle}:\n{xml}");
    }
    let mut py = Command::new("python3")
        .args([
            "-c",
            "import sys, xml.dom.minidom; xml.dom.minidom.parse(sys.stdin)",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("python3 (installed with fence-agents) checks the XML");
    py.stdin.take().unwrap().write_all(xml.as_bytes()).unwrap();
    assert!(py.wait().unwrap().success(), "metadata is not XML:\n{xml}");
}

#[test]
fn invariant3_no_fence_arg_changes_what_is_asked_or_of_whom() {
    for arg in [
        "action=monitor",
        "action=status",
        "option=status",
        "ACTION=reboot",
        " action =on",
        "nodename=someone-else",
        "port=someone-else",
        "plug=someone-else",
        "missing_as_off=1",
        "missing-as-off=1",
        "port_as_ip=1",
        "plug_separator=,",
        // fencing.py prints and exits 0 before any action for these.
        "help=1",
        "version=1",
        "ip=1.2.3.4\naction=on",
    ] {
        for role in [
            &[
                "backup",
                "--insecure",
                "--listen",
                "127.0.0.1:1",
                "--net",
                "tap=t0",
                "--fence-cmd",
                "true",
                "--peer-node",
                "vm1",
            ][..],
            &[
                "primary",
                "--insecure",
                "--peer",
                "127.0.0.1:1",
                "--guest",
                "builtin",
                "--fence-cmd",
                "true",
                "--peer-node",
                "vm1",
            ][..],
        ] {
            let mut args = role.to_vec();
            args.extend(["--fence-arg", arg]);
            let run = lockstep(&args);
            let line = run.assert_one_line_error(&["--fence-arg"]).to_string();
            assert_eq!(run.code(), Some(2), "{arg:?}: {line}");
        }
    }
    let run = lockstep(&[
        "primary",
        "--insecure",
        "--peer",
        "127.0.0.1:1",
        "--guest",
        "builtin",
        "--on-backup-loss",
        "continue",
        "--fence-cmd",
        "true",
    ]);
    run.assert_one_line_error(&["--fence-cmd", "--on-backup-loss fence"]);
    // Whom to fence cannot be blank, and agent options without an agent are a mistake,
    // not something to ignore.
    for args in [
        &["--fence-cmd", "true", "--peer-node", " "][..],
        &["--fence-delay-ms", "10"][..],
        &["--fence-arg", "ip=1.2.3.4"][..],
        &["--peer-node", "vm1"][..],
        &["--fence", "none", "--peer-node", "vm1"][..],
        &[
            "--fence-cmd",
            "true",
            "--peer-node",
            "vm1",
            "--fence-timeout-s",
            "0",
        ][..],
    ] {
        let mut all = vec![
            "backup",
            "--insecure",
            "--listen",
            "127.0.0.1:1",
            "--net",
            "tap=t0",
        ];
        all.extend_from_slice(args);
        let run = lockstep(&all);
        run.assert_one_line_error(&["--"]);
        assert_eq!(run.code(), Some(2), "{args:?}");
    }
}

/// A backup whose primary is SIGKILLed, fencing with `fence`; returns the backup's log
/// once it promoted or `limit` passed.
fn backup_fencing_a_killed_primary(prefix: &str, fence: &[&str], limit: Duration) -> String {
    let _one = one_at_a_time();
    let _dog = Watchdog::start(prefix, Duration::from_secs(120));
    let mut p = Pair::start(prefix, false, |_| (strings(fence), vec![]));
    p.primary.kill9();
    harness::wait_for_line(&p.dir.join("backup.err"), "PROMOTED", limit, || {
        p.backup.try_wait().is_none()
    });
    p.backup.log()
}

#[test]
fn invariant3_a_talkative_agent_is_not_taken_for_a_hung_one() {
    if !kvm_required() {
        return;
    }
    // The input: 100,000 bytes on stderr, exit 0 at once; and the same on stdout.
    let log = backup_fencing_a_killed_primary(
        "lsft",
        &[
            "--fence-cmd",
            "head -c 100000 /dev/zero | tr '\\0' e >&2; head -c 100000 /dev/zero | tr '\\0' o; exit 0",
            "--peer-node",
            "primary-node",
            "--fence-timeout-s",
            "3",
        ],
        Duration::from_secs(20),
    );
    assert!(
        log.contains("fenced the old primary 'primary-node' (attempt 1)"),
        "{log}"
    );
    assert!(log.contains("PROMOTED"), "{log}");
    assert!(!log.contains("did not finish"), "{log}");
    // What it wrote is in the log, bounded.
    let line = log
        .lines()
        .find(|l| l.contains("fenced the old primary"))
        .unwrap();
    assert!(
        line.contains("stderr: eeee") && line.contains("more bytes]"),
        "{line}"
    );
    assert!(
        line.len() < 10_000,
        "{} bytes of agent output logged",
        line.len()
    );
}

/// Debian's fence-agents (the test script installs them).
fn need_fence_agents() -> &'static str {
    let path = "/usr/sbin/fence_virsh";
    assert!(
        std::path::Path::new(path).exists(),
        "{path} not found: install Debian's fence-agents (scripts/test does)"
    );
    path
}

#[test]
fn invariant3_a_real_fence_agent_is_told_whom_to_fence() {
    if !kvm_required() {
        return;
    }
    let virsh = need_fence_agents();
    // The input, as lockstep now sends it: the victim as nodename= and plug=.
    // No sshd answers on 127.0.0.1 in the test's namespace, so the agent must get past
    // its option checks to its login, fail there, and the backup must not promote.
    let log = backup_fencing_a_killed_primary(
        "lsfv",
        &[
            "--fence-cmd",
            virsh,
            "--peer-node",
            "vm1",
            "--fence-arg",
            "ip=127.0.0.1",
            "--fence-arg",
            "username=root",
            "--fence-arg",
            "identity_file=/etc/hostname",
            "--fence-arg",
            "login_timeout=2",
            "--fence-arg",
            "shell_timeout=2",
            "--fence-timeout-s",
            "20",
        ],
        Duration::from_secs(8),
    );
    assert!(log.contains("FENCING FAILED (attempt 1)"), "{log}");
    assert!(
        !log.contains("PROMOTED"),
        "promoted without fencing:\n{log}"
    );
    assert!(
        !log.contains("plug number or machine identification"),
        "fence_virsh was not told which machine to fence:\n{log}"
    );
    assert!(
        log.contains("Unable to connect/login to fencing device"),
        "fence_virsh did not get as far as its login:\n{log}"
    );
}
