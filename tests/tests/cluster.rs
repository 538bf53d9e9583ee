//! lockstep under a real 2-node Pacemaker cluster ([`harness::cluster`]): the resource
//! agent `ocf:lockstep:lockstep` (ocf/lockstep) as a promotable clone running the kv
//! guest, a client in its own namespace writing over ONE TCP connection to the guest on
//! the bridged segment, and a stonith device that powers a node off (links down, every
//! process killed at once). In order:
//!
//! 1. start: a fresh boot on one node, protected by the other's backup;
//! 2. the Promoted node crashes: Pacemaker fences it and promotes the backup (lockstep
//!    waits for that, `--fence cluster`); the connection survives, no acknowledged write
//!    is lost; the failover time (crash -> first reply) is printed;
//! 3. the crashed node boots again: its instance starts as a backup and the Promoted
//!    monitor protects the guest with it (re-protected);
//! 4. `crm_resource --move --promoted`: a switchover (demote = hand-over) with no client
//!    error;
//! 5. the Unpromoted node goes to standby: no fencing (its backup leaves in order); back
//!    from standby, a move to it at once waits for its sync, then switches over;
//! 6. the link between the nodes is cut: exactly one guest runs (the Promoted node wins
//!    the fence race), and the client goes on.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tests::cluster::{Cluster, Node, Options, Status};
use tests::link::PairTls;
use tests::pair::{ms, Load};
use tests::trial::KV_ARGS;
use tests::{kvm_required, lockstep_bin, one_at_a_time, TempDir, Watchdog};

const CLONE: &str = "vm-clone";
const SOCK: &str = "/run/resource-agents/lockstep-vm/api.sock";

/// The lockstep clone; `{PROVIDER}` is where the agent is installed, `{BIN}` the binary,
/// `{TLS}` the directory of the pair's certificates.
const LOCKSTEP_CLONE: &str = r#"<clone id="vm-clone">
  <meta_attributes id="vm-clone-meta">
    <nvpair id="vm-clone-promotable" name="promotable" value="true"/>
    <nvpair id="vm-clone-promoted-max" name="promoted-max" value="1"/>
    <nvpair id="vm-clone-promoted-node-max" name="promoted-node-max" value="1"/>
    <nvpair id="vm-clone-clone-max" name="clone-max" value="2"/>
    <nvpair id="vm-clone-clone-node-max" name="clone-node-max" value="1"/>
    <nvpair id="vm-clone-notify" name="notify" value="true"/>
    <nvpair id="vm-clone-priority" name="priority" value="10"/>
  </meta_attributes>
  <primitive id="vm" class="ocf" provider="{PROVIDER}" type="lockstep">
    <instance_attributes id="vm-ia">
      <nvpair id="vm-binary" name="binary" value="{BIN}"/>
      <nvpair id="vm-nodes" name="nodes" value="node1=10.250.0.1:7600 node2=10.250.0.2:7600"/>
      <nvpair id="vm-net" name="net" value="tap=tap0"/>
      <nvpair id="vm-guest-args" name="guest_args" value="{ARGS}"/>
      <nvpair id="vm-mem" name="mem" value="128M"/>
      <nvpair id="vm-tls-dir" name="tls_dir" value="{TLS}"/>
    </instance_attributes>
    <operations>
      <op id="vm-start" name="start" interval="0" timeout="60s"/>
      <op id="vm-stop" name="stop" interval="0" timeout="60s"/>
      <op id="vm-promote" name="promote" interval="0" timeout="60s"/>
      <op id="vm-demote" name="demote" interval="0" timeout="90s"/>
      <op id="vm-mon-p" name="monitor" interval="2s" role="Promoted" timeout="30s"/>
      <op id="vm-mon-u" name="monitor" interval="3s" role="Unpromoted" timeout="30s"/>
    </operations>
  </primitive>
</clone>"#;

/// `lockstep ctl status --json` on `node` (its instance's control socket).
fn lockstep_status(cluster: &Cluster, node: Node) -> Option<Value> {
    let bin = lockstep_bin().display().to_string();
    let run = cluster
        .exec(node, &[&bin, "ctl", "--api-sock", SOCK, "status", "--json"])
        .ok()?;
    serde_json::from_str(run.stdout.trim()).ok()
}

/// Waits until `node`'s lockstep status satisfies `ok`; returns it.
fn wait_lockstep(
    cluster: &Cluster,
    node: Node,
    what: &str,
    limit: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = lockstep_status(cluster, node);
        if let Some(s) = s.as_ref().filter(|s| ok(s)) {
            return s.clone();
        }
        if Instant::now() >= deadline {
            cluster.dump_logs();
            panic!("{node}: not {what} within {limit:?}; last status: {s:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The guest runs on `node`, protected by the other node's backup.
fn protected_on(cluster: &Cluster, node: Node, limit: Duration) {
    wait_lockstep(cluster, node, "running the protected guest", limit, |s| {
        s["guest"] == "running" && s["protection"] == "protected"
    });
    wait_lockstep(
        cluster,
        node.other(),
        "the backup with a committed epoch",
        limit,
        |s| s["role"] == "backup" && s["committed_epoch"].as_u64().is_some(),
    );
}

/// Promoted on `p`, unpromoted on the other node, both online.
fn settled(s: &Status, p: Node) -> bool {
    s.both_online() && s.promoted_on(CLONE) == Some(p) && s.unpromoted_on(CLONE) == vec![p.other()]
}

/// `crm_resource --move --promoted` to `node`: waits until the guest runs there, protected
/// by the other node, then clears the move's constraint. Returns how long it took.
fn move_promoted(cluster: &Cluster, node: Node) -> Duration {
    let t = Instant::now();
    cluster
        .exec_any(&[
            "crm_resource",
            "--move",
            "--promoted",
            "--resource",
            CLONE,
            "--node",
            node.name(),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    cluster.wait_for(
        node,
        "promoted on the node it was moved to",
        Duration::from_secs(90),
        |s| settled(s, node),
    );
    protected_on(cluster, node, Duration::from_secs(60));
    let took = t.elapsed();
    cluster
        .exec_any(&["crm_resource", "--clear", "--resource", CLONE])
        .unwrap_or_else(|e| panic!("{e}"));
    took
}

fn guest_runs(cluster: &Cluster, node: Node) -> bool {
    lockstep_status(cluster, node).is_some_and(|s| s["guest"] == "running")
}

#[test]
fn a_protected_guest_under_pacemaker_survives_crash_rejoin_switchover_and_split() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let _watchdog = Watchdog::start("the Pacemaker test", Duration::from_secs(300));
    let cluster = Cluster::new("lockstep", Options::default());
    for node in Node::BOTH {
        cluster.start_node(node);
    }
    cluster.wait_for(
        Node::One,
        "both nodes online",
        Duration::from_secs(30),
        Status::both_online,
    );
    let agent = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ocf/lockstep");
    let provider = cluster
        .install_ocf_agent(&agent)
        .unwrap_or_else(|e| panic!("{e}"));
    // The replication link is TLS, with certificates for the nodes as the cluster names them.
    let tls = TempDir::new("cluster-tls");
    let certs = tls.join("vm");
    PairTls::make(lockstep_bin(), &certs, "vm").unwrap_or_else(|e| panic!("{e}"));
    let clone = LOCKSTEP_CLONE
        .replace("{TLS}", &certs.display().to_string())
        .replace("{PROVIDER}", &provider)
        .replace("{BIN}", &lockstep_bin().display().to_string())
        .replace("{ARGS}", KV_ARGS);
    cluster
        .cib_create("resources", &clone)
        .unwrap_or_else(|e| panic!("{e}"));

    // 1. A fresh boot on one node, protected by the other.
    let t = Instant::now();
    let s = cluster.wait_for(
        Node::One,
        "the guest promoted on one node",
        Duration::from_secs(60),
        |s| s.promoted_on(CLONE).is_some_and(|p| settled(s, p)),
    );
    let first = s.promoted_on(CLONE).unwrap();
    protected_on(&cluster, first, Duration::from_secs(60));
    let started = t.elapsed();
    let load = Load::start(cluster.client_ns());
    load.wait_for_replies(100, Duration::from_secs(20));

    // 2. The Promoted node crashes.
    let (crash, crash_at) = (Instant::now(), SystemTime::now());
    cluster.power_off(first);
    let second = first.other();
    cluster.wait_for(
        second,
        "the survivor promoted",
        Duration::from_secs(60),
        |s| s.promoted_on(CLONE) == Some(second) && !s.online(first),
    );
    let promoted_after = crash.elapsed();
    load.wait_for_replies_since(crash, 50, Duration::from_secs(90));
    // The client's wait across the crash: its last reply before the node went silent to
    // its first from the promoted guest (TCP's retransmission backoff included), the
    // longest wait since the power-off began.
    let first_reply = load.longest_gap_within(crash, Instant::now());
    assert!(
        cluster
            .fence_calls()
            .iter()
            .any(|c| c.at >= crash_at && c.powered_off(first)),
        "the crashed node was not fenced"
    );
    assert!(load.error().is_none(), "client: {:?}", load.error());

    // 3. The crashed node boots again and becomes the backup: the guest is re-protected.
    let t = Instant::now();
    cluster.start_node(first);
    cluster.wait_for(
        second,
        "the rejoined node unpromoted",
        Duration::from_secs(60),
        |s| settled(s, second),
    );
    protected_on(&cluster, second, Duration::from_secs(60));
    let reprotected = t.elapsed();
    load.wait_for_replies_since(t, 50, Duration::from_secs(90));

    // 4. A planned switchover back to the first node.
    let t = Instant::now();
    let switched = move_promoted(&cluster, first);
    let switch_gap = load.longest_gap_within(t, Instant::now());
    load.wait_for_replies_since(t, 50, Duration::from_secs(90));
    assert!(load.error().is_none(), "client: {:?}", load.error());

    // 5. The Unpromoted node goes to standby: its backup stops in order and tells the
    //    primary, which needs no fencing; back from standby, it is the backup again, and
    //    a switchover to it at once (before it is synced) waits for the sync.
    let (t, standby_at) = (Instant::now(), SystemTime::now());
    cluster
        .exec_any(&["crm_standby", "--node", second.name(), "--update", "on"])
        .unwrap_or_else(|e| panic!("{e}"));
    wait_lockstep(
        &cluster,
        first,
        "unprotected after its backup left",
        Duration::from_secs(30),
        |s| s["protection"] == "unprotected",
    );
    load.wait_for_replies_since(t, 50, Duration::from_secs(30));
    let standby_gap = load.longest_gap_within(t, Instant::now());
    assert!(
        !cluster
            .fence_calls()
            .iter()
            .any(|c| c.at >= standby_at && (c.powered_off(first) || c.powered_off(second))),
        "a standby fenced a node"
    );
    assert!(
        cluster.is_running(second),
        "the standby node was powered off"
    );
    cluster
        .exec_any(&["crm_standby", "--node", second.name(), "--update", "off"])
        .unwrap_or_else(|e| panic!("{e}"));
    let t = Instant::now();
    cluster.wait_for(
        first,
        "the standby node back, unpromoted",
        Duration::from_secs(60),
        |s| s.unpromoted_on(CLONE) == vec![second],
    );
    move_promoted(&cluster, second);
    let moved_back = t.elapsed();
    load.wait_for_replies_since(t, 50, Duration::from_secs(90));
    assert!(load.error().is_none(), "client: {:?}", load.error());
    // The split below wants the first node promoted: move the guest back once more.
    move_promoted(&cluster, first);

    // 6. The link between the nodes is cut: exactly one guest runs.
    let (cut, cut_at) = (Instant::now(), SystemTime::now());
    cluster.cut_link();
    let deadline = cut + Duration::from_secs(30);
    while cluster.is_running(second) {
        assert!(
            Instant::now() < deadline,
            "{second} not fenced after the split"
        );
        assert!(
            cluster.is_running(first),
            "the Promoted node lost the fence race"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let split_fenced = cut.elapsed();
    assert!(guest_runs(&cluster, first), "no guest runs on {first}");
    assert!(
        !cluster
            .fence_calls()
            .iter()
            .any(|c| c.at >= cut_at && c.powered_off(first)),
        "the Promoted node was fenced"
    );
    load.wait_for_replies_since(cut, 50, Duration::from_secs(90));
    let split_gap = load.longest_gap_within(cut, Instant::now());
    let s = wait_lockstep(
        &cluster,
        first,
        "unprotected after fencing its backup",
        Duration::from_secs(30),
        |s| s["protection"] == "unprotected",
    );
    assert_eq!(s["guest"], "running", "{s}");

    let (acked, lost, gap) = load.finish();
    println!(
        "pacemaker: fresh boot protected {:.1} s after the clone was added; crash -> promoted \
         {:.1} s, the client's wait across it {:.1} s (failover under Pacemaker); rejoin -> re-protected \
         {:.1} s; switchover {:.1} s (client waited {:.0} ms); standby of the backup's node: no fencing, \
         client waited {:.0} ms; back from standby and promoted there at once {:.1} s; split -> backup's node fenced \
         {:.1} s (client waited {:.0} ms); {acked} writes over one connection, {} lost, \
         longest gap {:.0} ms",
        started.as_secs_f64(),
        promoted_after.as_secs_f64(),
        first_reply.as_secs_f64(),
        reprotected.as_secs_f64(),
        switched.as_secs_f64(),
        ms(switch_gap),
        ms(standby_gap),
        moved_back.as_secs_f64(),
        split_fenced.as_secs_f64(),
        ms(split_gap),
        lost.len(),
        ms(gap)
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}
