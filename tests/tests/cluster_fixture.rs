//! The 2-node cluster fixture ([`harness::cluster`]) with Pacemaker's own promotable
//! clone, `ocf:pacemaker:Stateful`: both nodes come online and one instance is promoted;
//! the promoted node powered off is fenced and the other promoted; the powered-off node
//! rejoins as unpromoted; a cut cluster link leaves exactly one node, the promoted one
//! (priority-fencing-delay lets it win the fence race, even when it is not the DC); the
//! link restored, the fenced node rejoins; a graceful stop fences nobody. And the guest
//! segment is wired: the client namespace reaches each node's bridge, and a lockstep pair
//! across the nodes (no Pacemaker) keeps one client connection through a power-off of
//! the primary's node, found by the heartbeat (a powered-off node is silent) and fenced
//! with the cluster's fence agent.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use tests::cluster::{self, Cluster, Node, Options, Status};
use tests::pair::{backup_cmd, primary_cmd, wait_log, Load};
use tests::{kvm_required, one_at_a_time, TempDir, Watchdog};

const CLONE: &str = "st-clone";

/// Pacemaker's Stateful agent as a promotable clone, one instance per node; the
/// `priority` meta attribute is what priority-fencing-delay weighs. `{PROVIDER}`: where
/// the agent is installed.
const STATEFUL_CLONE: &str = r#"<clone id="st-clone">
  <meta_attributes id="st-clone-meta">
    <nvpair id="st-clone-promotable" name="promotable" value="true"/>
    <nvpair id="st-clone-promoted-max" name="promoted-max" value="1"/>
    <nvpair id="st-clone-promoted-node-max" name="promoted-node-max" value="1"/>
    <nvpair id="st-clone-clone-max" name="clone-max" value="2"/>
    <nvpair id="st-clone-clone-node-max" name="clone-node-max" value="1"/>
    <nvpair id="st-clone-notify" name="notify" value="true"/>
    <nvpair id="st-clone-priority" name="priority" value="10"/>
  </meta_attributes>
  <primitive id="st" class="ocf" provider="{PROVIDER}" type="Stateful">
    <operations>
      <op id="st-mon-p" name="monitor" interval="3s" role="Promoted"/>
      <op id="st-mon-u" name="monitor" interval="4s" role="Unpromoted"/>
    </operations>
  </primitive>
</clone>"#;

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Whether the link `dev` in namespace `ns` is administratively up.
fn link_up(ns: &str, dev: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", dev])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    let flags = text.split(['<', '>']).nth(1).unwrap_or_default();
    flags.split(',').any(|f| f == "UP")
}

/// Promoted on `p`, unpromoted on the other node, both online.
fn settled(s: &Status, p: Node) -> bool {
    s.both_online() && s.promoted_on(CLONE) == Some(p) && s.unpromoted_on(CLONE) == vec![p.other()]
}

#[test]
fn cluster_fails_over_rejoins_and_survives_a_split() {
    let _one = one_at_a_time();
    let _watchdog = Watchdog::start("the cluster fixture test", Duration::from_secs(240));
    let t = Instant::now();
    let cluster = Cluster::start("fixture");

    // The guest segment: the client namespace reaches each node's br0.
    for node in Node::BOTH {
        let took = cluster
            .probe_segment(node)
            .unwrap_or_else(|e| panic!("guest segment to {node}: {e}"));
        eprintln!("guest segment: client -> {node} br0 in {took:?}");
    }

    cluster.wait_for(
        Node::One,
        "both nodes online",
        Duration::from_secs(30),
        Status::both_online,
    );
    let online = t.elapsed();

    // Installed as a test installs its own agent: under a provider of the cluster's own.
    let provider = cluster
        .install_ocf_agent(Path::new("/usr/lib/ocf/resource.d/pacemaker/Stateful"))
        .unwrap_or_else(|e| panic!("{e}"));
    cluster
        .cib_create(
            "resources",
            &STATEFUL_CLONE.replace("{PROVIDER}", &provider),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let t = Instant::now();
    let s = cluster.wait_for(
        Node::One,
        "one instance promoted, the other unpromoted",
        Duration::from_secs(20),
        |s| s.promoted_on(CLONE).is_some_and(|p| settled(s, p)),
    );
    let first_promotion = t.elapsed();
    let promoted = s.promoted_on(CLONE).unwrap();
    let other = promoted.other();
    eprintln!("{promoted} promoted, {other} unpromoted");

    // Power off the promoted node: the other fences it and is promoted.
    let (t, at) = (Instant::now(), SystemTime::now());
    cluster.power_off(promoted);
    cluster.wait_for(
        other,
        "the survivor promoted after the crash",
        Duration::from_secs(30),
        |s| s.promoted_on(CLONE) == Some(other) && !s.online(promoted),
    );
    let failover = t.elapsed();
    let fence = cluster
        .fence_calls()
        .into_iter()
        .find(|c| c.at >= at && c.powered_off(promoted))
        .unwrap_or_else(|| {
            panic!(
                "no off/reboot of {promoted} in the fence log:\n{}",
                std::fs::read_to_string(cluster.fence_log()).unwrap_or_default()
            )
        });
    assert_eq!(fence.by, other.name(), "{fence:?}");
    let fenced_after = fence.at.duration_since(at).unwrap_or_default();
    assert!(!cluster.is_running(promoted));

    // The powered-off node boots again and rejoins as unpromoted.
    let t = Instant::now();
    cluster.start_node(promoted);
    cluster.wait_for(
        other,
        "the powered-off node back as unpromoted",
        Duration::from_secs(30),
        |s| settled(s, other),
    );
    let rejoin = t.elapsed();

    // Cut the cluster link: each node wants the other fenced, and the node with the
    // promoted instance wins the race (priority-fencing-delay delays the other's request).
    // The hard case: the promoted node is not the DC, so it must win an election and run
    // the scheduler first. The DC is the node that survived the crash; move the promoted
    // instance to the other one.
    let dc = other;
    let (promoted, unpromoted) = (dc.other(), dc);
    cluster
        .cib_create(
            "constraints",
            &format!(
                r#"<rsc_location id="promoted-on-{promoted}" rsc="{CLONE}" role="Promoted" node="{promoted}" score="100"/>"#
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let s = cluster.wait_for(
        dc,
        "the promoted instance moved off the DC",
        Duration::from_secs(30),
        |s| settled(s, promoted),
    );
    eprintln!(
        "split: {promoted} promoted, DC {}",
        s.dc.as_deref().unwrap_or("none")
    );
    let (t, at) = (Instant::now(), SystemTime::now());
    cluster.cut_link();
    let deadline = t + Duration::from_secs(30);
    while cluster.is_running(unpromoted) {
        assert!(
            Instant::now() < deadline,
            "{unpromoted} not fenced within 30 s of the split"
        );
        assert!(
            cluster.is_running(promoted),
            "the promoted node {promoted} lost the fence race"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let split_fenced = t.elapsed();
    // The fence agent unplugged it before the kill.
    let ns = &cluster.node_ns(unpromoted).name;
    assert!(
        !link_up(ns, cluster::LINK) && !link_up(ns, cluster::UPLINK),
        "the fenced {unpromoted} still has a link up"
    );
    cluster.wait_for(
        promoted,
        "the promoted node alone, still promoted",
        Duration::from_secs(20),
        |s| s.promoted_on(CLONE) == Some(promoted) && !s.online(unpromoted),
    );
    // Past the priority-fencing-delay the loser had asked for: nothing fences the winner.
    std::thread::sleep(Duration::from_secs(2));
    assert!(cluster.is_running(promoted), "{promoted} was fenced too");
    let calls = cluster.fence_calls();
    let after: Vec<_> = calls.iter().filter(|c| c.at >= at).collect();
    assert!(
        after
            .iter()
            .any(|c| c.powered_off(unpromoted) && c.by == promoted.name()),
        "no off/reboot of {unpromoted} by {promoted} in the fence log: {after:#?}"
    );
    assert!(
        !after.iter().any(|c| c.powered_off(promoted)),
        "{promoted} was fenced: {after:#?}"
    );

    // Restore the link and boot the fenced node: the cluster is whole again.
    cluster.restore_link();
    let t = Instant::now();
    cluster.start_node(unpromoted);
    cluster.wait_for(
        promoted,
        "the fenced node back as unpromoted",
        Duration::from_secs(30),
        |s| settled(s, promoted),
    );
    let healed = t.elapsed();

    // A graceful shutdown is not a failure: nobody is fenced.
    let (t, at) = (Instant::now(), SystemTime::now());
    assert!(
        cluster.stop_node(unpromoted, Duration::from_secs(30)),
        "{unpromoted} did not stop gracefully"
    );
    let stopped = t.elapsed();
    cluster.wait_for(
        promoted,
        "the stopped node offline, the other still promoted",
        Duration::from_secs(10),
        |s| s.promoted_on(CLONE) == Some(promoted) && !s.online(unpromoted),
    );
    let fenced: Vec<_> = cluster
        .fence_calls()
        .into_iter()
        .filter(|c| c.at >= at && (c.powered_off(Node::One) || c.powered_off(Node::Two)))
        .collect();
    assert!(
        fenced.is_empty(),
        "fencing after a graceful stop: {fenced:#?}"
    );

    eprintln!(
        "cluster timings: both online {} after start; first promotion {}; crash -> fenced {} \
         (by {}), -> {other} promoted {}; rejoin as unpromoted {}; split -> {unpromoted} \
         fenced {} (by {promoted}, promoted, not DC); healed {}; graceful stop {}",
        secs(online),
        secs(first_promotion),
        secs(fenced_after),
        fence.by,
        secs(failover),
        secs(rejoin),
        secs(split_fenced),
        secs(healed),
        secs(stopped),
    );
}

#[test]
fn lockstep_pair_spans_the_nodes() {
    if !kvm_required() {
        return;
    }
    let _one = one_at_a_time();
    let _watchdog = Watchdog::start("the cross-node pair test", Duration::from_secs(120));
    // The namespaces only: no node booted, lockstep runs in them directly.
    let cluster = Cluster::new("pair", Options::default());
    let dir = TempDir::new("cluster-pair");
    let listen = format!("{}:7600", Node::Two.cluster_addr());
    let agent = format!("/usr/sbin/{}", cluster.fence_agent());
    let _backup = backup_cmd(
        cluster.node_ns(Node::Two),
        &dir,
        &listen,
        &["--fence-cmd", &agent, "--peer-node", Node::One.name()],
    );
    let _primary = primary_cmd(cluster.node_ns(Node::One), &dir, &listen, &[]);
    wait_log(
        &dir.join("backup.err"),
        "epoch 1 committed",
        Duration::from_secs(30),
    );
    let t0 = Instant::now();
    let load = Load::start(cluster.client_ns());
    load.wait_for_replies(100, Duration::from_secs(15));

    let (t, at) = (Instant::now(), SystemTime::now());
    cluster.power_off(Node::One);
    wait_log(&dir.join("backup.err"), "PROMOTED", Duration::from_secs(30));
    let promoted = t.elapsed();
    // 100 more replies on the same connection, from the guest on node2.
    load.wait_for_replies(load.replies_since(t0) + 100, Duration::from_secs(15));
    let after = load.replies_since(t);
    let (acked, lost, gap) = load.finish();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    let log = std::fs::read_to_string(dir.join("backup.err")).unwrap_or_default();
    assert!(
        log.contains("no data for"),
        "the backup did not find the loss by its heartbeat (a powered-off node must be \
         silent):\n{log}"
    );
    assert!(
        cluster
            .fence_calls()
            .iter()
            .any(|c| c.at >= at && c.powered_off(Node::One)),
        "no off of node1 in the fence log:\n{}",
        std::fs::read_to_string(cluster.fence_log()).unwrap_or_default()
    );
    eprintln!(
        "cross-node pair: node1 powered off -> backup on node2 promoted {}; {acked} writes \
         acknowledged over one connection ({after} after the power-off), none lost; longest \
         gap {}",
        secs(promoted),
        secs(gap)
    );
}
