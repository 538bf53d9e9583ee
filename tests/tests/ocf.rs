//! The Pacemaker resource agent, `ocf:lockstep:lockstep` (ocf/lockstep), outside a
//! cluster: installed by scripts/install-ocf, then resource-agents' own `ocf-tester`
//! drives it through every action (start, monitor, promote = a fresh boot of the guest,
//! demote, notify, stop, again and again) against real lockstep processes, in a network
//! namespace of its own (the guest's tap is there). Its meta-data is checked against
//! OCF's DTD by ocf-tester (xmllint).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::link::PairTls;
use tests::{kvm_required, lockstep_bin, one_at_a_time, Netns, TempDir};

const AGENT: &str = "/usr/lib/ocf/resource.d/lockstep/lockstep";

/// Installs the agent once per test run (the tests share the one installed file).
fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(install_now);
}

fn install_now() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-ocf");
    let out = Command::new(&script)
        .output()
        .expect("run scripts/install-ocf");
    assert!(
        out.status.success(),
        "install-ocf: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ocf_tester_passes_on_the_resource_agent() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    install();
    let dir = TempDir::new("ocf");
    let ns = Netns::create("lsocf").expect("network namespace");
    let host = String::from_utf8(Command::new("uname").arg("-n").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    let opts = [
        format!("binary={}", lockstep_bin().display()),
        format!("nodes={host}=127.0.0.1:7650 peer=127.0.0.1:7651"),
        "net=tap=tap0".into(),
        "guest_args=workload=dirty pages_per_ms=1 wss=1M seconds=100000".into(),
        "mem=64M".into(),
        format!("state_dir={}", dir.arg("state")),
        // Outside a cluster: no cluster property to consult, no peer to hand a guest to.
        "fresh_boot=always".into(),
        "unprotected_demote=stop".into(),
        "extra_args=--connect-timeout-s 1".into(),
        "insecure=true".into(),
    ];
    let mut args = vec!["-n".to_string(), "vm".to_string()];
    for o in &opts {
        args.extend(["-o".to_string(), o.clone()]);
    }
    args.push(AGENT.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ns
        .command(Path::new("/usr/sbin/ocf-tester"), &args)
        .output()
        .expect("run ocf-tester");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(dir.join("state/lockstep.log")).unwrap_or_default();
    assert!(
        out.status.success() && text.contains("passed all tests"),
        "ocf-tester failed:\n{text}\n== lockstep log\n{log}"
    );
    // The promotions booted real guests, and the demotions (no backup to hand over to)
    // stopped them; every stop ended the process.
    assert!(log.matches("stopped by request").count() >= 2, "{log}");
    assert!(log.contains("listening on 127.0.0.1:7650"), "{log}");
    assert!(
        !dir.join("state/lockstep.pid").exists(),
        "the last stop left a pid file"
    );
}

#[test]
fn the_agent_refuses_incomplete_parameters_with_the_ocf_codes() {
    install();
    let run = |env: &[(&str, &str)], action: &str| -> i32 {
        let mut c = Command::new(AGENT);
        c.arg(action)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        for (k, v) in env {
            c.env(k, v);
        }
        c.status().expect("run the agent").code().unwrap_or(-1)
    };
    let bin = lockstep_bin().display().to_string();
    let base = [
        ("OCF_ROOT", "/usr/lib/ocf"),
        ("OCF_RESOURCE_INSTANCE", "vm"),
        ("OCF_RESKEY_binary", bin.as_str()),
        ("OCF_RESKEY_CRM_meta_on_node", "node1"),
        ("OCF_RESKEY_net", "tap=tap0"),
    ];
    // OCF_ERR_CONFIGURED (6): no nodes, this node not among them, no peer, no net.
    for nodes in [
        "",
        "node2=10.0.0.2:7600 node3=10.0.0.3:7600",
        "node1=10.0.0.1:7600",
    ] {
        let mut env = base.to_vec();
        env.push(("OCF_RESKEY_nodes", nodes));
        assert_eq!(run(&env, "validate-all"), 6, "nodes='{nodes}'");
    }
    let mut env: Vec<_> = base
        .iter()
        .filter(|(k, _)| *k != "OCF_RESKEY_net")
        .copied()
        .collect();
    env.push(("OCF_RESKEY_nodes", "node1=a:1 node2=b:2"));
    assert_eq!(run(&env, "validate-all"), 6, "no net");
    // OCF_ERR_INSTALLED (5): no such binary.
    let mut env: Vec<_> = base
        .iter()
        .filter(|(k, _)| *k != "OCF_RESKEY_binary")
        .copied()
        .collect();
    env.extend([
        ("OCF_RESKEY_binary", "/nonexistent/lockstep"),
        ("OCF_RESKEY_nodes", "node1=a:1 node2=b:2"),
    ]);
    assert_eq!(run(&env, "validate-all"), 5);
    // The link: neither TLS nor insecure, both, or a certificate directory without this
    // node's files.
    let dir = TempDir::new("ocf-validate");
    let certs = dir.join("tls");
    PairTls::make(lockstep_bin(), &certs, "vm").unwrap_or_else(|e| panic!("{e}"));
    let certs = certs.display().to_string();
    let mut env = base.to_vec();
    env.push(("OCF_RESKEY_nodes", "node1=a:1 node2=b:2"));
    assert_eq!(run(&env, "validate-all"), 6, "no tls_dir, no insecure");
    let mut both = env.clone();
    both.extend([
        ("OCF_RESKEY_tls_dir", certs.as_str()),
        ("OCF_RESKEY_insecure", "true"),
    ]);
    assert_eq!(run(&both, "validate-all"), 6, "tls_dir and insecure");
    let mut other_node = env.clone();
    other_node.retain(|(k, _)| *k != "OCF_RESKEY_CRM_meta_on_node");
    other_node.extend([
        ("OCF_RESKEY_CRM_meta_on_node", "node3"),
        ("OCF_RESKEY_nodes", "node3=a:1 node2=b:2"),
        ("OCF_RESKEY_tls_dir", certs.as_str()),
    ]);
    assert_eq!(
        run(&other_node, "validate-all"),
        5,
        "no certificate for node3"
    );
    // A complete set validates; a stopped instance monitors as not running (7).
    env.push(("OCF_RESKEY_tls_dir", certs.as_str()));
    env.push(("OCF_RESKEY_state_dir", "/nonexistent-lockstep-state"));
    assert_eq!(run(&env, "validate-all"), 0);
    assert_eq!(run(&env, "monitor"), 7);
    assert_eq!(run(&env, "stop"), 0, "stopping a stopped instance succeeds");
    assert_eq!(
        run(&env, "frobnicate"),
        3,
        "an unknown action is unimplemented"
    );
}

/// The agent of `node` ("node1", "node2") in `ns`: runs `action` with the pair's
/// parameters (two backups on loopback ports, each node on its own tap) and returns its
/// exit status.
fn agent(ns: &Netns, dir: &TempDir, node: &str, action: &str, heartbeat_ms: u32) -> i32 {
    let tap = if node == "node1" {
        "tap=tap0"
    } else {
        "tap=tap1"
    };
    let bin = lockstep_bin().display().to_string();
    let state = dir.arg(node);
    let extra = format!("--heartbeat-timeout-ms {heartbeat_ms}");
    let certs = dir.join("tls");
    if !certs.exists() {
        PairTls::make(lockstep_bin(), &certs, "vm").unwrap_or_else(|e| panic!("{e}"));
    }
    let tls = certs.display().to_string();
    let env = [
        ("OCF_ROOT", "/usr/lib/ocf"),
        ("OCF_RESOURCE_INSTANCE", "vm:0"),
        ("OCF_RESKEY_binary", bin.as_str()),
        ("OCF_RESKEY_CRM_meta_on_node", node),
        ("OCF_RESKEY_CRM_meta_timeout", "30000"),
        (
            "OCF_RESKEY_nodes",
            "node1=127.0.0.1:7670 node2=127.0.0.1:7671",
        ),
        ("OCF_RESKEY_net", tap),
        (
            "OCF_RESKEY_guest_args",
            "workload=dirty pages_per_ms=1 wss=1M seconds=100000",
        ),
        ("OCF_RESKEY_mem", "64M"),
        ("OCF_RESKEY_state_dir", state.as_str()),
        ("OCF_RESKEY_fresh_boot", "always"),
        ("OCF_RESKEY_extra_args", extra.as_str()),
        ("OCF_RESKEY_tls_dir", tls.as_str()),
    ];
    let mut c = ns.command(Path::new(AGENT), &[action]);
    c.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (k, v) in env {
        c.env(k, v);
    }
    c.status().expect("run the agent").code().unwrap_or(-1)
}

#[test]
fn a_promotion_waits_for_the_backup_to_notice_its_primary_is_gone() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    install();
    let dir = TempDir::new("ocf-pair");
    let ns = Netns::create("lsocp").expect("network namespace");
    let out = ns
        .command(
            Path::new("ip"),
            &["tuntap", "add", "dev", "tap1", "mode", "tap"],
        )
        .output()
        .expect("ip tuntap");
    assert!(out.status.success(), "{out:?}");
    let hb = 3000;
    assert_eq!(agent(&ns, &dir, "node1", "start", hb), 0);
    assert_eq!(agent(&ns, &dir, "node2", "start", hb), 0);
    assert_eq!(agent(&ns, &dir, "node1", "promote", hb), 0, "a fresh boot");
    // The Promoted monitor protects the guest with node2's backup.
    let deadline = Instant::now() + Duration::from_secs(30);
    let sock2 = dir.join("node2/api.sock");
    loop {
        assert_eq!(agent(&ns, &dir, "node1", "monitor", hb), 8);
        if tests::ctl::status(&sock2)["committed_epoch"]
            .as_u64()
            .is_some()
        {
            break;
        }
        assert!(Instant::now() < deadline, "node2 never synced");
        std::thread::sleep(Duration::from_millis(300));
    }
    // The primary's node "fenced": its process stopped dead. The cluster promotes node2
    // before node2's heartbeat timeout (3 s) says the primary is gone: the promotion
    // waits for it rather than refusing (a refusal would lead to a stop of the only copy).
    let pid: i32 = std::fs::read_to_string(dir.join("node1/lockstep.pid"))
        .expect("node1's pid file")
        .trim()
        .parse()
        .expect("a pid");
    // SAFETY: kill(2) with a pid read from the agent's pid file and a valid signal.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let t = Instant::now();
    let rc = agent(&ns, &dir, "node2", "promote", hb);
    let took = t.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(rc, 0, "the promotion of node2");
    assert!(
        took >= Duration::from_millis(1500),
        "it did not wait: {took:?}"
    );
    assert_eq!(agent(&ns, &dir, "node2", "monitor", hb), 8);
    println!("promotion waited {took:?} for the backup to notice its primary was gone");
    assert_eq!(agent(&ns, &dir, "node2", "stop", hb), 0);
    assert_eq!(agent(&ns, &dir, "node1", "stop", hb), 0);
}
