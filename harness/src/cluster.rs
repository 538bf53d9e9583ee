//! A 2-node Pacemaker/Corosync cluster on one machine, for tests: every address and
//! packet lives in namespaces the fixture creates, and everything is torn down on drop.
//!
//! # What [`Cluster::new`] builds
//!
//! ```text
//!   node1 netns (+ its own mount/uts ns)          node2 netns (+ its own mount/uts ns)
//!   clink 10.250.0.1/24 ------- cluster link -------- clink 10.250.0.2/24
//!   (corosync, and lockstep's replication)
//!   br0 ─┬─ tap0   (the guest, 10.0.0.2)            br0 ─┬─ tap0
//!        └─ seg ──────────┐                               └─ seg ─────┐
//!                         │        client netns               │
//!                         └── seg1 ─ br0 10.0.0.1/24 ─ seg2 ──┘
//! ```
//!
//! - Three network namespaces with a unique name prefix (`lsc<pid>x<n>r<r>`): [`Node::One`]
//!   and [`Node::Two`] and a client namespace ([`Cluster::client_ns`], a [`Netns`], so
//!   [`Load`](crate::pair::Load), [`Kv`](crate::kv::Kv) and [`Netns::connect`] work from
//!   it; the guest is at [`GUEST_IP`]).
//! - The cluster link, a veth between the nodes ([`Node::cluster_addr`]); corosync runs
//!   on it, and so can lockstep's replication. [`Cluster::cut_link`] /
//!   [`Cluster::restore_link`] take it down and up.
//! - The guest segment: a bridge `br0` in each node with a tap `tap0` enslaved (created
//!   with `ip tuntap add dev tap0 mode tap`, up, no address: lockstep attaches to it by
//!   name), joined by a veth to the client's bridge. A guest on either node is reachable
//!   from the client namespace at [`GUEST_IP`]; when it moves, its RARP teaches the
//!   bridges. [`Cluster::probe_segment`] proves the wiring without a guest.
//! - Per node, a private tree in the fixture's directory ([`Cluster::node_dir`]) that the
//!   node's mount namespace binds over `/etc/corosync`, `/var/lib/corosync`,
//!   `/var/lib/pacemaker`, `/var/log/corosync` and `/var/log/pacemaker`, with a fresh
//!   tmpfs on `/run` and `/dev/shm` at each boot: a 2-node `corosync.conf` (knet, token
//!   1000 ms) and a seeded `cib.xml` (dc-deadtime, stonith-enabled=true,
//!   priority-fencing-delay from [`Options`]; the only resource is the stonith device,
//!   `fence`).
//! - A fence agent, `/usr/sbin/fence_lockstep_<prefix>` (pacemaker-fenced finds agents
//!   there; removed on drop). `off` and `reboot` "power off" the node as
//!   [`Cluster::power_off`] does: its links down, then SIGSTOP and SIGKILL to every
//!   process in its network namespace (found by the namespace's inode). It does not power
//!   nodes on: [`Cluster::start_node`] does. Each call is a line of
//!   `<dir>/fence.log` ([`Cluster::fence_calls`]).
//!
//! A node "boots" ([`Cluster::start_node`]) as `setsid ip netns exec NS unshare --mount
//! --uts --propagation private -- sh boot.sh`, which mounts its tree, sets the hostname
//! (`node1`, `node2`) and runs `corosync -f` and `pacemakerd -f`. [`Cluster::power_off`]
//! takes its links down, then stops and kills every process in its network namespace
//! (the resources it ran included): it goes silent, as a machine that lost power (left
//! up, the namespace's kernel would close the dead processes' TCP connections at once).
//! [`Cluster::stop_node`] is a graceful shutdown. Commands run on a node
//! through `nsenter -t <boot pid> -n -m -u` ([`Cluster::command`], [`Cluster::exec`]):
//! `crm_mon`, `cibadmin`, `crm_resource`, `crm_attribute`, `stonith_admin`...
//!
//! The cluster's state comes from `crm_mon --output-as=xml`, parsed into a [`Status`]
//! ([`Cluster::status`], [`Cluster::wait_for`], [`Cluster::promoted_on`]). On a panic,
//! drop prints the tails of both nodes' logs (pacemaker.log, corosync.log), the fence
//! log and `crm_mon` of the running nodes ([`Cluster::dump_logs`]), and the fixture's
//! directory is kept ([`TempDir`]).
//!
//! Resources run inside the nodes: pacemaker-execd runs their agents in the node's
//! namespaces, so a lockstep started by one listens on the node's
//! [`cluster_addr`](Node::cluster_addr) and attaches to its [`TAP`].
//! [`Cluster::install_ocf_agent`] installs an agent under a provider of this cluster's
//! own (so that concurrent clusters do not share it), [`Cluster::cib_create`] adds
//! resources and constraints.
//!
//! Drop kills every process in the three namespaces, deletes them (and with them the
//! veths, bridges and taps) and removes the fence agent and what [`Cluster::install`]
//! installed. A test process that dies
//! without unwinding (SIGKILL, abort) leaves its cluster behind; the names never collide
//! with a later one, and [`Cluster::new`] removes the leftovers of test processes that
//! are gone ([`sweep_leftovers`]).
//!
//! The machine has two cores: hold [`one_at_a_time`](crate::one_at_a_time) for the whole
//! test, and tests run as root.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use harness::cluster::{Cluster, Node};
//!
//! let cluster = Cluster::start("example");
//! cluster.wait_for(Node::One, "both nodes online", Duration::from_secs(30), |s| {
//!     s.both_online()
//! });
//! // A promotable clone; `priority` lets the node with the promoted instance win a fence
//! // race (priority-fencing-delay).
//! cluster
//!     .cib_create("resources", r#"<clone id="st-clone">
//!   <meta_attributes id="st-clone-meta">
//!     <nvpair id="st-clone-promotable" name="promotable" value="true"/>
//!     <nvpair id="st-clone-priority" name="priority" value="10"/>
//!   </meta_attributes>
//!   <primitive id="st" class="ocf" provider="pacemaker" type="Stateful"/>
//! </clone>"#)
//!     .expect("add the clone");
//! let s = cluster.wait_for(Node::One, "a promoted instance", Duration::from_secs(20), |s| {
//!     s.promoted_on("st-clone").is_some()
//! });
//! let promoted = s.promoted_on("st-clone").unwrap();
//! cluster.power_off(promoted);
//! let survivor = promoted.other();
//! cluster.wait_for(survivor, "the survivor promoted", Duration::from_secs(30), |s| {
//!     s.promoted_on("st-clone") == Some(survivor)
//! });
//! assert!(cluster.fence_calls().iter().any(|c| c.powered_off(promoted)));
//! let out = cluster.exec(survivor, &["crm_resource", "--list"]).unwrap();
//! println!("{}", out.stdout);
//! ```

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::process::{kill_process, Pid, Signal};

use crate::netns::sh;

use crate::netns::Netns;
use crate::run::Run;
use crate::tempdir::TempDir;

/// The guest's address on the guest segment (behind `tap0` of the node running it).
pub const GUEST_IP: &str = "10.0.0.2";
/// The client namespace's address on the guest segment (on its bridge).
pub const CLIENT_IP: &str = "10.0.0.1";
/// The address [`Cluster::probe_segment`] puts on a node's `br0` for a moment.
pub const PROBE_IP: &str = "10.0.0.3";
/// The name of the bridge in each node namespace (and in the client namespace).
pub const BRIDGE: &str = "br0";
/// The name of the tap in each node namespace, enslaved to [`BRIDGE`].
pub const TAP: &str = "tap0";
/// The name of the cluster link's veth in each node namespace.
pub const LINK: &str = "clink";
/// The name of the veth in each node namespace that joins its `br0` to the client's.
pub const UPLINK: &str = "seg";
/// The id of the stonith device in the seeded CIB.
pub const FENCE_DEVICE: &str = "fence";

/// How long [`Cluster::exec`] lets a command run.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// One of the two cluster nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    One,
    Two,
}

impl Node {
    pub const BOTH: [Node; 2] = [Node::One, Node::Two];

    /// Its name in the cluster (and its hostname): `node1`, `node2`.
    pub fn name(self) -> &'static str {
        match self {
            Node::One => "node1",
            Node::Two => "node2",
        }
    }

    pub fn from_name(name: &str) -> Option<Node> {
        Node::BOTH.into_iter().find(|n| n.name() == name)
    }

    pub fn other(self) -> Node {
        match self {
            Node::One => Node::Two,
            Node::Two => Node::One,
        }
    }

    /// Its address on the cluster link (corosync's ring0, lockstep's replication).
    pub fn cluster_addr(self) -> &'static str {
        match self {
            Node::One => "10.250.0.1",
            Node::Two => "10.250.0.2",
        }
    }

    fn index(self) -> usize {
        match self {
            Node::One => 0,
            Node::Two => 1,
        }
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The cluster-wide settings of the seeded configuration.
#[derive(Clone, Debug)]
pub struct Options {
    /// corosync's totem token timeout.
    pub token_ms: u32,
    /// Pacemaker's `dc-deadtime` (its default, 20 s, delays the first election).
    pub dc_deadtime: String,
    /// Pacemaker's `priority-fencing-delay`: how long the fencing of the node with the
    /// highest resource priority (the promoted instance of a clone with a `priority`
    /// meta attribute) waits, so that in a split the promoted node fences first. It also
    /// delays the fencing of a crashed promoted node.
    pub priority_fencing_delay: String,
    /// More `crm_config` properties, name and value.
    pub properties: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            token_ms: 1000,
            dc_deadtime: "2s".into(),
            priority_fencing_delay: "2s".into(),
            properties: Vec::new(),
        }
    }
}

/// `ip -n NS args...`.
fn ip(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut full = vec!["ip", "-n", ns];
    full.extend_from_slice(args);
    sh(&full)
}

/// The inode of a named network namespace: how the fence agent and [`pids_in`] find its
/// processes (`/proc/PID/ns/net` reads `net:[INODE]`).
fn netns_inode(name: &str) -> Result<u64, String> {
    let path = format!("/run/netns/{name}");
    std::fs::metadata(&path)
        .map(|m| m.ino())
        .map_err(|e| format!("cannot stat {path}: {e}"))
}

/// Every live process whose network namespace has inode `ino` (zombies have none).
fn pids_in(ino: u64) -> Vec<i32> {
    let want = format!("net:[{ino}]");
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|l| l.as_os_str() == want.as_str())
        })
        .collect()
}

fn signal(pid: i32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = kill_process(pid, sig);
    }
}

/// SIGSTOP, then SIGKILL, every process in the namespace, until none is left: stopped
/// first, none of them can respawn another. Returns the pids still there at `limit`.
fn kill_all_in(ino: u64, limit: Duration) -> Result<(), Vec<i32>> {
    let deadline = Instant::now() + limit;
    loop {
        let pids = pids_in(ino);
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(pids);
        }
        for pid in &pids {
            signal(*pid, Signal::STOP);
        }
        for pid in &pids {
            signal(*pid, Signal::KILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` is a process that has not exited (a zombie has).
fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (comm) STATE ...": comm may hold spaces and parentheses.
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The last `n` lines of a file, or a note that there is none.
fn tail_of(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let s = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// The last `n` lines of a Pacemaker log at level notice or above (its info lines are
/// mostly CIB diffs).
fn notices_of(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let s = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = s
                .lines()
                .filter(|l| {
                    !["\tinfo: ", "\tdebug: ", "\ttrace: "]
                        .iter()
                        .any(|lv| l.contains(lv))
                })
                .collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// Runs `cmd` to completion within `limit`, capturing its output; kills it at the limit.
fn run_for(mut cmd: Command, limit: Duration) -> Result<Run, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    fn reader(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    }
    let stdout = reader(child.stdout.take().expect("piped stdout"));
    let stderr = reader(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} did not finish within {limit:?}; killed it"));
            }
            Err(e) => return Err(format!("waiting for {what}: {e}")),
        }
    };
    Ok(Run {
        what,
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Where test processes register the clusters they own: a lock file per cluster, held
/// (flock) while its owner lives. [`sweep_leftovers`] removes the clusters whose lock is
/// free.
const REGISTRY: &str = "/run/lockstep-test-clusters";

/// Removes what test processes that died without unwinding left behind: the processes in
/// their namespaces, the namespaces and the fence agents. A cluster counts as left behind
/// when no process holds its lock file in `/run/lockstep-test-clusters`. [`Cluster::new`]
/// calls it.
pub fn sweep_leftovers() {
    let Ok(dir) = std::fs::read_dir(REGISTRY) else {
        return;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let Some(prefix) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".lock"))
            .map(str::to_string)
        else {
            continue;
        };
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        else {
            continue;
        };
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            continue; // its owner is alive
        }
        for suffix in ["n1", "n2", "cl"] {
            let ns = format!("{prefix}{suffix}");
            if let Ok(ino) = netns_inode(&ns) {
                let _ = kill_all_in(ino, Duration::from_secs(10));
                let _ = sh(&["ip", "netns", "del", &ns]);
            }
        }
        let _ = std::fs::remove_file(agent_path(&prefix));
        // What Cluster::install put outside the fixture's directory, a path a line.
        let mut recorded = String::new();
        let _ = (&file).read_to_string(&mut recorded);
        for line in recorded.lines().filter(|l| !l.is_empty()) {
            remove_installed(Path::new(line));
        }
        let _ = std::fs::remove_file(&path);
        eprintln!("cluster: removed the leftovers of test cluster {prefix}");
    }
}

fn agent_path(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/usr/sbin/fence_lockstep_{prefix}"))
}

/// A file installed outside the fixture's directory, removed on drop.
struct Installed(PathBuf);

impl Drop for Installed {
    fn drop(&mut self) {
        remove_installed(&self.0);
    }
}

/// Removes an installed file, and its directory if that is an OCF provider directory of
/// this fixture's (`/usr/lib/ocf/resource.d/lockstep_test_...`) and now empty.
fn remove_installed(path: &Path) {
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        if dir.parent() == Some(Path::new(OCF_ROOT))
            && dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("lockstep_test_"))
        {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Where Pacemaker finds OCF resource agents: `<OCF_ROOT>/<provider>/<type>`.
pub const OCF_ROOT: &str = "/usr/lib/ocf/resource.d";

/// The lock file that marks a cluster as owned by a live process; removed on drop.
struct Registration {
    path: PathBuf,
    file: std::fs::File,
}

impl Registration {
    fn new(prefix: &str) -> Result<Registration, String> {
        std::fs::create_dir_all(REGISTRY).map_err(|e| format!("cannot create {REGISTRY}: {e}"))?;
        let path = Path::new(REGISTRY).join(format!("{prefix}.lock"));
        let file = std::fs::File::create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
        Ok(Registration { path, file })
    }

    /// Records a path installed outside the fixture's directory, for [`sweep_leftovers`].
    fn record(&self, installed: &Path) {
        let _ = writeln!(&self.file, "{}", installed.display());
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One node: its network namespace (with the inode that identifies it), its directory and
/// the boot process of its current run.
struct NodeSlot {
    node: Node,
    ns: Netns,
    ino: u64,
    dir: PathBuf,
    boot: Mutex<Option<Child>>,
}

impl NodeSlot {
    /// The boot process's pid while it runs (a child that exited is reaped here).
    fn anchor(&self) -> Option<i32> {
        let mut boot = self.boot.lock().unwrap_or_else(|e| e.into_inner());
        let exited = match boot.as_mut() {
            None => return None,
            Some(child) => !matches!(child.try_wait(), Ok(None)),
        };
        if exited {
            *boot = None;
            return None;
        }
        read_pid(&self.dir.join("boot.pid"))
    }

    /// Whether the boot process of the last start has exited (true if none was started).
    fn exited(&self) -> bool {
        let mut boot = self.boot.lock().unwrap_or_else(|e| e.into_inner());
        boot.as_mut()
            .is_none_or(|child| !matches!(child.try_wait(), Ok(None)))
    }

    fn reap(&self) {
        let mut boot = self.boot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = boot.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A 2-node Pacemaker cluster in namespaces (see the [module docs](self)).
pub struct Cluster {
    // Drop order: the processes are killed in `drop`, then the namespaces go, then the
    // agent and the lock file, then the directory.
    nodes: [NodeSlot; 2],
    client: Netns,
    prefix: String,
    agent: Installed,
    installed: Mutex<Vec<Installed>>,
    registration: Registration,
    options: Options,
    dir: TempDir,
}

/// The script a node boots with, inside its namespaces: `sh boot.sh NODE DIR`.
const BOOT_SH: &str = r#"#!/bin/sh
# Boots one node of a lockstep test cluster (harness/src/cluster.rs). Runs inside
#   ip netns exec NS unshare --mount --uts --propagation private -- sh boot.sh NODE DIR
# DIR is the node's private tree; /run and /dev/shm are fresh at each boot (libqb's IPC
# lives in abstract sockets of the netns and ring buffers in /dev/shm).
set -e
NODE=$1
R=$2
hostname "$NODE"
ip link set lo up
mount --bind "$R/etc-corosync" /etc/corosync
mount --bind "$R/var-lib-corosync" /var/lib/corosync
mount --bind "$R/var-lib-pacemaker" /var/lib/pacemaker
mount --bind "$R/var-log-corosync" /var/log/corosync
mount --bind "$R/var-log-pacemaker" /var/log/pacemaker
mount -t tmpfs -o mode=755,size=64m tmpfs /run
mkdir -p /run/lock
mount -t tmpfs -o size=256m tmpfs /dev/shm
echo $$ > "$R/boot.pid"
export PCMK_logfile=/var/log/pacemaker/pacemaker.log
export PCMK_debug=no
echo "$(date +%s.%N) booting $NODE"
corosync -f > /var/log/corosync/stdout.log 2>&1 &
echo $! > "$R/corosync.pid"
i=0
while [ $i -lt 100 ] && ! corosync-cfgtool -s > /dev/null 2>&1; do
    sleep 0.1
    i=$((i + 1))
done
echo "$(date +%s.%N) corosync up"
pacemakerd -f > /var/log/pacemaker/stdout.log 2>&1 &
echo $! > "$R/pacemakerd.pid"
wait
echo "$(date +%s.%N) stopped"
"#;

/// The fence agent, with `@DIR@`, `@INO1@`, `@INO2@` and `@NAME@` filled in.
const FENCE_AGENT: &str = r#"#!/bin/sh
# @NAME@: the fence agent of one lockstep test cluster (harness/src/cluster.rs), removed
# when the test ends. It "powers off" a node: its links down (@LINK@, @UPLINK@), then
# SIGSTOP and SIGKILL to every process in the node's network namespace (found by its
# inode: the fencer runs this inside another node, whose /run hides /run/netns). Options arrive as key=value lines on stdin (or -o ACTION).
# Each call is a line of @DIR@/fence.log:
#   <unix time> by=<host> action=<action> target=<node> rc=<exit status> pids=<killed>
LOG='@DIR@/fence.log'
action=reboot
target=
case "${1:-}" in
    -o | --action) action=${2:-} ;;
    --action=*) action=${1#--action=} ;;
esac
if [ ! -t 0 ]; then
    while IFS= read -r line || [ -n "$line" ]; do
        case "$line" in
            action=* | option=*) action=${line#*=} ;;
            plug=* | port=*) target=${line#*=} ;;
            nodename=*) [ -n "$target" ] || target=${line#*=} ;;
        esac
    done
fi
log() {
    echo "$(date +%s.%N) by=$(hostname) action=$action target=$target rc=$1 pids=$2" >> "$LOG"
}
inode() {
    case "$1" in
        node1) echo @INO1@ ;;
        node2) echo @INO2@ ;;
    esac
}
pids_of() {
    ls -l /proc/[0-9]*/ns/net 2> /dev/null |
        awk -v want="net:[$1]" '$NF == want { split($(NF - 2), p, "/"); printf "%s ", p[3] }'
}
case "$action" in
    metadata)
        cat << 'XML'
<?xml version="1.0" ?>
<resource-agent name="@NAME@" shortdesc="Powers off a node of a lockstep test cluster">
<longdesc>Fence agent of a lockstep test cluster: powers a node off by stopping, then killing, every process in its network namespace.</longdesc>
<parameters>
  <parameter name="action" unique="0" required="1">
    <getopt mixed="-o, --action=[action]"/>
    <content type="string" default="reboot"/>
    <shortdesc lang="en">Fencing action</shortdesc>
  </parameter>
  <parameter name="plug" unique="0" required="0" obsoletes="port">
    <getopt mixed="-n, --plug=[id]"/>
    <content type="string"/>
    <shortdesc lang="en">The node to act on</shortdesc>
  </parameter>
  <parameter name="port" unique="0" required="0" deprecated="1">
    <getopt mixed="-n, --plug=[id]"/>
    <content type="string"/>
    <shortdesc lang="en">The node to act on</shortdesc>
  </parameter>
</parameters>
<actions>
  <action name="on" automatic="0"/>
  <action name="off"/>
  <action name="reboot"/>
  <action name="status"/>
  <action name="list"/>
  <action name="monitor"/>
  <action name="metadata"/>
  <action name="validate-all"/>
</actions>
</resource-agent>
XML
        exit 0
        ;;
    monitor | validate-all)
        log 0 ""
        exit 0
        ;;
    list)
        echo node1
        echo node2
        log 0 ""
        exit 0
        ;;
    status)
        ino=$(inode "$target")
        [ -n "$ino" ] || { log 1 ""; exit 1; }
        if [ -n "$(pids_of "$ino")" ]; then log 0 ""; exit 0; fi
        log 2 ""
        exit 2
        ;;
    off | reboot)
        ino=$(inode "$target")
        [ -n "$ino" ] || { log 1 ""; exit 1; }
        # Unplugged first, the node goes silent: the kernel of its namespace, which
        # outlives the processes, sends no FIN or RST for their sockets.
        first=$(pids_of "$ino")
        first=${first%% *}
        if [ -n "$first" ]; then
            nsenter -t "$first" -n sh -c 'ip link set @LINK@ down; ip link set @UPLINK@ down' 2> /dev/null
        fi
        killed=
        i=0
        while [ $i -lt 100 ]; do
            p=$(pids_of "$ino")
            [ -n "$p" ] || break
            kill -STOP $p 2> /dev/null
            kill -KILL $p 2> /dev/null
            killed="$killed$p"
            sleep 0.05
            i=$((i + 1))
        done
        if [ -n "$(pids_of "$ino")" ]; then log 1 "$killed"; exit 1; fi
        log 0 "$killed"
        exit 0
        ;;
    *)
        # "on" included: a node is powered on by the test (Cluster::start_node).
        log 1 ""
        exit 1
        ;;
esac
"#;

impl Cluster {
    /// A cluster with both nodes booting: [`Cluster::new`] with the default [`Options`],
    /// then [`Cluster::start_node`] of each. Wait for them with [`Cluster::wait_for`].
    pub fn start(name: &str) -> Cluster {
        let c = Cluster::new(name, Options::default());
        c.start_node(Node::One);
        c.start_node(Node::Two);
        c
    }

    /// The namespaces, the node trees and the fence agent, with no node running; panics
    /// if any of it cannot be made (what was made is removed). `name` goes into the
    /// directory's name.
    pub fn new(name: &str, options: Options) -> Cluster {
        Cluster::try_new(name, options).unwrap_or_else(|e| panic!("cluster fixture: {e}"))
    }

    fn try_new(name: &str, options: Options) -> Result<Cluster, String> {
        sweep_leftovers();
        static N: AtomicU32 = AtomicU32::new(0);
        let r = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos() % 1000)
            .unwrap_or(0);
        let prefix = format!(
            "lsc{}x{}r{r}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let registration = Registration::new(&prefix)?;
        let dir = TempDir::new(&format!("cluster-{name}"));
        let ns1 = Netns::empty(&format!("{prefix}n1"))?;
        let ns2 = Netns::empty(&format!("{prefix}n2"))?;
        let client = Netns::empty(&format!("{prefix}cl"))?;

        // The cluster link.
        sh(&[
            "ip", "link", "add", LINK, "netns", &ns1.name, "type", "veth", "peer", "name", LINK,
            "netns", &ns2.name,
        ])?;
        for (ns, node) in [(&ns1, Node::One), (&ns2, Node::Two)] {
            ip(
                &ns.name,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", node.cluster_addr()),
                    "dev",
                    LINK,
                ],
            )?;
            ip(&ns.name, &["link", "set", LINK, "up"])?;
        }

        // The guest segment.
        ip(&client.name, &["link", "add", BRIDGE, "type", "bridge"])?;
        ip(
            &client.name,
            &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", BRIDGE],
        )?;
        ip(&client.name, &["link", "set", BRIDGE, "up"])?;
        for (ns, seg) in [(&ns1, "seg1"), (&ns2, "seg2")] {
            ip(&ns.name, &["link", "add", BRIDGE, "type", "bridge"])?;
            ip(&ns.name, &["link", "set", BRIDGE, "up"])?;
            sh(&[
                "ip", "netns", "exec", &ns.name, "ip", "tuntap", "add", "dev", TAP, "mode", "tap",
            ])?;
            ip(&ns.name, &["link", "set", TAP, "master", BRIDGE])?;
            ip(&ns.name, &["link", "set", TAP, "up"])?;
            sh(&[
                "ip",
                "link",
                "add",
                UPLINK,
                "netns",
                &ns.name,
                "type",
                "veth",
                "peer",
                "name",
                seg,
                "netns",
                &client.name,
            ])?;
            ip(&ns.name, &["link", "set", UPLINK, "master", BRIDGE])?;
            ip(&ns.name, &["link", "set", UPLINK, "up"])?;
            ip(&client.name, &["link", "set", seg, "master", BRIDGE])?;
            ip(&client.name, &["link", "set", seg, "up"])?;
        }

        // The node trees.
        let corosync_conf = corosync_conf(&prefix, &options);
        for node in Node::BOTH {
            let r = dir.join(node.name());
            for sub in [
                "etc-corosync",
                "var-lib-corosync",
                "var-log-corosync",
                "var-lib-pacemaker/cib",
                "var-lib-pacemaker/pengine",
                "var-lib-pacemaker/blackbox",
                "var-lib-pacemaker/cores",
                "var-log-pacemaker/bundles",
            ] {
                std::fs::create_dir_all(r.join(sub))
                    .map_err(|e| format!("cannot create {}/{sub}: {e}", r.display()))?;
            }
            if Path::new("/etc/corosync/uidgid.d").is_dir() {
                sh(&[
                    "cp",
                    "-a",
                    "/etc/corosync/uidgid.d",
                    &r.join("etc-corosync").to_string_lossy(),
                ])?;
            }
            write(&r.join("etc-corosync/corosync.conf"), &corosync_conf, 0o644)?;
            write(
                &r.join("var-lib-pacemaker/cib/cib.xml"),
                &seed_cib(&prefix, &options),
                0o600,
            )?;
            for sub in ["var-lib-pacemaker", "var-log-pacemaker"] {
                sh(&[
                    "chown",
                    "-R",
                    "hacluster:haclient",
                    &r.join(sub).to_string_lossy(),
                ])?;
            }
            for sub in ["cib", "pengine", "blackbox", "cores"] {
                set_mode(&r.join("var-lib-pacemaker").join(sub), 0o750)?;
            }
            set_mode(&r.join("var-log-pacemaker"), 0o770)?;
        }
        write(&dir.join("boot.sh"), BOOT_SH, 0o755)?;
        write(&dir.join("fence.log"), "", 0o644)?;

        // The fence agent.
        let agent_name = format!("fence_lockstep_{prefix}");
        let agent = Installed(agent_path(&prefix));
        let script = FENCE_AGENT
            .replace("@DIR@", &dir.path().to_string_lossy())
            .replace("@INO1@", &netns_inode(&ns1.name)?.to_string())
            .replace("@INO2@", &netns_inode(&ns2.name)?.to_string())
            .replace("@NAME@", &agent_name)
            .replace("@LINK@", LINK)
            .replace("@UPLINK@", UPLINK);
        write(&agent.0, &script, 0o755)?;

        let slot = |node: Node, ns: Netns| -> Result<NodeSlot, String> {
            Ok(NodeSlot {
                node,
                ino: netns_inode(&ns.name)?,
                ns,
                dir: dir.join(node.name()),
                boot: Mutex::new(None),
            })
        };
        Ok(Cluster {
            nodes: [slot(Node::One, ns1)?, slot(Node::Two, ns2)?],
            client,
            prefix,
            agent,
            installed: Mutex::new(Vec::new()),
            registration,
            options,
            dir,
        })
    }

    fn slot(&self, node: Node) -> &NodeSlot {
        &self.nodes[node.index()]
    }

    /// The fixture's directory (node trees, boot script, fence log, CIB fragments).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A node's private tree: `etc-corosync/`, `var-lib-pacemaker/`,
    /// `var-log-pacemaker/pacemaker.log`, `var-log-corosync/corosync.log`, `boot.log`...
    pub fn node_dir(&self, node: Node) -> &Path {
        &self.slot(node).dir
    }

    pub fn pacemaker_log(&self, node: Node) -> PathBuf {
        self.node_dir(node).join("var-log-pacemaker/pacemaker.log")
    }

    pub fn corosync_log(&self, node: Node) -> PathBuf {
        self.node_dir(node).join("var-log-corosync/corosync.log")
    }

    /// The unique prefix of this cluster's namespace names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The options the cluster was seeded with.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The `type` of the stonith device (the fence agent's name, `fence_lockstep_...`).
    pub fn fence_agent(&self) -> &str {
        self.agent
            .0
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }

    /// The client namespace: a bridge with [`CLIENT_IP`]/24 on the guest segment.
    pub fn client_ns(&self) -> &Netns {
        &self.client
    }

    /// A node's network namespace ([`Netns::listen`], [`Netns::within`]... work in it; for
    /// its mount namespace too, use [`Cluster::command`]).
    pub fn node_ns(&self, node: Node) -> &Netns {
        &self.slot(node).ns
    }

    /// Boots a node (its links up; fresh `/run` and `/dev/shm`; its `/var/lib/pacemaker`,
    /// with the CIB, persists like a disk). Returns once its namespaces are set up, before corosync and
    /// Pacemaker are; panics if it is running already or does not boot.
    pub fn start_node(&self, node: Node) {
        let s = self.slot(node);
        assert!(s.anchor().is_none(), "{node} is running already");
        // Whatever is left in its namespace (a process a test started there) goes first.
        if let Err(left) = kill_all_in(s.ino, Duration::from_secs(10)) {
            panic!("{node}: processes {left:?} survive SIGKILL");
        }
        s.reap();
        for f in ["boot.pid", "corosync.pid", "pacemakerd.pid"] {
            let _ = std::fs::remove_file(s.dir.join(f));
        }
        // Plugged back in (a cut cluster link stays cut: its other end is down).
        for link in [LINK, UPLINK] {
            ip(&s.ns.name, &["link", "set", link, "up"]).unwrap_or_else(|e| panic!("{node}: {e}"));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.dir.join("boot.log"))
            .unwrap_or_else(|e| panic!("cannot open {node}'s boot.log: {e}"));
        let err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot open {node}'s boot.log: {e}"));
        let mut cmd = Command::new("setsid");
        cmd.args(["ip", "netns", "exec", &s.ns.name])
            .args([
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "--",
            ])
            .arg("/bin/sh")
            .arg(self.dir.join("boot.sh"))
            .arg(node.name())
            .arg(&s.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {node}: {e}"));
        *s.boot.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while read_pid(&s.dir.join("boot.pid")).is_none() {
            if s.exited() && read_pid(&s.dir.join("boot.pid")).is_none() {
                panic!(
                    "{node} did not boot:\n{}",
                    tail_of(&s.dir.join("boot.log"), 20)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{node} did not boot within 20 s:\n{}",
                tail_of(&s.dir.join("boot.log"), 20)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the node is booted (its boot process lives: not powered off, stopped or
    /// fenced).
    pub fn is_running(&self, node: Node) -> bool {
        self.slot(node).anchor().is_some()
    }

    /// "Power off": the node's links down ([`LINK`], [`UPLINK`]), then SIGSTOP and
    /// SIGKILL to every process in its network namespace (Pacemaker, corosync, the
    /// resources they ran, anything a test started there); returns when none is left.
    /// Unplugged first, the node goes silent like a machine that lost power: the kernel of
    /// its namespace, which outlives the processes, would otherwise close their TCP
    /// connections (FIN, RST) and peers would learn of the loss at once. The links come
    /// back with [`Cluster::start_node`]. The fence agent does the same.
    pub fn power_off(&self, node: Node) {
        let s = self.slot(node);
        self.unplug(node);
        if let Err(left) = kill_all_in(s.ino, Duration::from_secs(10)) {
            panic!("{node}: processes {left:?} survive SIGKILL");
        }
        s.reap();
    }

    /// Takes the node's links down (its end of the cluster link, its uplink to the guest
    /// segment).
    fn unplug(&self, node: Node) {
        for link in [LINK, UPLINK] {
            let _ = ip(&self.node_ns(node).name, &["link", "set", link, "down"]);
        }
    }

    /// A graceful shutdown: SIGTERM to pacemakerd (which stops the node's resources
    /// first), then to corosync; powers the node off if that takes longer than `limit`,
    /// and unplugs it in any case (as [`Cluster::power_off`] leaves it). Returns whether
    /// it was graceful.
    pub fn stop_node(&self, node: Node, limit: Duration) -> bool {
        let s = self.slot(node);
        if s.anchor().is_none() {
            self.power_off(node);
            return true;
        }
        let deadline = Instant::now() + limit;
        let wait_gone = |pid: i32| {
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            !alive(pid)
        };
        let mut graceful = true;
        for daemon in ["pacemakerd", "corosync"] {
            if let Some(pid) = read_pid(&s.dir.join(format!("{daemon}.pid"))) {
                signal(pid, Signal::TERM);
                graceful &= wait_gone(pid);
            }
        }
        if let Some(pid) = read_pid(&s.dir.join("boot.pid")) {
            graceful &= wait_gone(pid);
        }
        graceful &= pids_in(s.ino).is_empty();
        self.power_off(node);
        graceful
    }

    /// `program` to run inside the node's network, mount and uts namespaces (`nsenter -t
    /// <boot pid> -n -m -u -- program`); add arguments with `.arg`/`.args`. Panics if
    /// the node is not running.
    pub fn command(&self, node: Node, program: &str) -> Command {
        let pid = self
            .slot(node)
            .anchor()
            .unwrap_or_else(|| panic!("{node} is not running"));
        let mut c = Command::new("nsenter");
        c.args(["-t", &pid.to_string(), "-n", "-m", "-u", "--", program]);
        c
    }

    /// Runs `args` on the node to completion (at most [`EXEC_TIMEOUT`]) and captures its
    /// output; an error when the node is not running or the command cannot run or hangs.
    /// A non-zero exit is not an error: look at [`Run::status`] (or
    /// [`Run::assert_success`]).
    pub fn exec(&self, node: Node, args: &[&str]) -> Result<Run, String> {
        self.exec_for(node, args, EXEC_TIMEOUT)
    }

    /// [`Cluster::exec`] with another time limit.
    pub fn exec_for(&self, node: Node, args: &[&str], limit: Duration) -> Result<Run, String> {
        let Some(pid) = self.slot(node).anchor() else {
            return Err(format!("{node} is not running"));
        };
        let mut c = Command::new("nsenter");
        c.args(["-t", &pid.to_string(), "-n", "-m", "-u", "--"])
            .args(args);
        run_for(c, limit)
    }

    /// [`Cluster::exec`] on the first running node, which must exit 0: for cluster-wide
    /// commands (`cibadmin`, `crm_resource`, `crm_attribute`). The error shows the output.
    pub fn exec_any(&self, args: &[&str]) -> Result<Run, String> {
        let node = Node::BOTH
            .into_iter()
            .find(|n| self.is_running(*n))
            .ok_or("no node is running")?;
        let run = self.exec(node, args)?;
        if !run.status.success() {
            return Err(format!(
                "{} on {node} failed ({}):\n{}{}",
                args.join(" "),
                run.status,
                run.stdout,
                run.stderr
            ));
        }
        Ok(run)
    }

    /// `crm_mon -1` on the node: the human view (an error when it fails).
    pub fn crm_mon(&self, node: Node) -> Result<String, String> {
        let run = self.exec_for(node, &["crm_mon", "-1", "-r"], Duration::from_secs(10))?;
        if run.status.success() {
            Ok(run.stdout)
        } else {
            Err(format!(
                "crm_mon failed ({}): {}",
                run.status,
                run.stderr.trim()
            ))
        }
    }

    /// The cluster as the node sees it (`crm_mon -1 -r --output-as=xml`); an error until
    /// its Pacemaker answers.
    pub fn status(&self, node: Node) -> Result<Status, String> {
        let run = self.exec_for(
            node,
            &["crm_mon", "-1", "-r", "--output-as=xml"],
            Duration::from_secs(10),
        )?;
        if !run.status.success() {
            return Err(format!(
                "crm_mon failed ({}): {}{}",
                run.status,
                run.stderr.trim(),
                first_error(&run.stdout)
            ));
        }
        Ok(Status::parse(&run.stdout))
    }

    /// Polls the node's [`Status`] until `pred` holds, and returns it; panics after
    /// `limit` with `what` and the node's last `crm_mon` (drop then prints the logs).
    pub fn wait_for(
        &self,
        node: Node,
        what: &str,
        limit: Duration,
        pred: impl FnMut(&Status) -> bool,
    ) -> Status {
        self.try_wait_for(node, limit, pred).unwrap_or_else(|last| {
            panic!(
                "{what}: not seen on {node} within {limit:?}; its last crm_mon:\n{}\n{last}",
                self.crm_mon(node).unwrap_or_else(|e| e)
            )
        })
    }

    /// [`Cluster::wait_for`] without the panic: the error is the last failure of
    /// `crm_mon`, or an empty string if it answered.
    pub fn try_wait_for(
        &self,
        node: Node,
        limit: Duration,
        mut pred: impl FnMut(&Status) -> bool,
    ) -> Result<Status, String> {
        let deadline = Instant::now() + limit;
        loop {
            let last = match self.status(node) {
                Ok(s) if pred(&s) => return Ok(s),
                Ok(_) => String::new(),
                Err(e) => e,
            };
            if Instant::now() >= deadline || crate::interrupted() {
                return Err(last);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Where the promoted instance of `resource` (a promotable clone's id or its
    /// primitive's) runs, as the first running node that answers sees it.
    pub fn promoted_on(&self, resource: &str) -> Option<Node> {
        Node::BOTH
            .into_iter()
            .filter(|n| self.is_running(*n))
            .find_map(|n| self.status(n).ok())
            .and_then(|s| s.promoted_on(resource))
    }

    /// Adds `xml` (one element, or several) to a section of the CIB (`resources`,
    /// `constraints`, `crm_config`...) with `cibadmin --create -o SECTION --xml-file`, on
    /// the first running node.
    pub fn cib_create(&self, section: &str, xml: &str) -> Result<(), String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = self
            .dir
            .join(&format!("cib-{}.xml", N.fetch_add(1, Ordering::SeqCst)));
        write(&path, xml, 0o644)?;
        let path = path.to_string_lossy();
        self.exec_any(&["cibadmin", "--create", "-o", section, "--xml-file", &path])
            .map(|_| ())
    }

    /// Replaces the whole `resources` section with `xml` (a `<resources>` element; keep
    /// the stonith device, [`Cluster::fence_device_xml`], in it).
    pub fn cib_replace_resources(&self, xml: &str) -> Result<(), String> {
        let path = self.dir.join("cib-resources.xml");
        write(&path, xml, 0o644)?;
        let path = path.to_string_lossy();
        self.exec_any(&[
            "cibadmin",
            "--replace",
            "-o",
            "resources",
            "--xml-file",
            &path,
        ])
        .map(|_| ())
    }

    /// Installs a file outside the fixture's directory (an agent, a configuration a
    /// resource reads), with `mode`; it is removed on drop, and by [`sweep_leftovers`]
    /// should the test process die without unwinding. Missing directories are created.
    /// Two clusters at a time (tests of different processes) must not install the same
    /// path: make it unique, as [`Cluster::install_ocf_agent`] does.
    pub fn install(&self, path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        self.registration.record(path);
        let installed = Installed(path.to_path_buf());
        std::fs::write(path, contents)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        set_mode(path, mode)?;
        self.installed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(installed);
        Ok(())
    }

    /// Installs the OCF resource agent `agent` (a file) for this cluster, under a provider
    /// of its own (`/usr/lib/ocf/resource.d/lockstep_test_<prefix>/<file name>`), removed
    /// on drop; returns the provider, for the primitive's `provider` attribute
    /// (`<primitive class="ocf" provider="..." type="<file name>">`). Pacemaker runs it
    /// inside the node's namespaces, so what it starts sees the node's network (its
    /// [`Node::cluster_addr`], [`TAP`]).
    pub fn install_ocf_agent(&self, agent: &Path) -> Result<String, String> {
        let name = agent
            .file_name()
            .ok_or_else(|| format!("{}: not a file", agent.display()))?;
        let contents =
            std::fs::read(agent).map_err(|e| format!("cannot read {}: {e}", agent.display()))?;
        let provider = format!("lockstep_test_{}", self.prefix);
        let path = Path::new(OCF_ROOT).join(&provider).join(name);
        self.install(&path, &contents, 0o755)?;
        Ok(provider)
    }

    /// The stonith device's primitive, as seeded.
    pub fn fence_device_xml(&self) -> String {
        fence_device_xml(self.fence_agent())
    }

    /// Takes the cluster link down (both ends): corosync's token is lost on both sides.
    pub fn cut_link(&self) {
        for node in Node::BOTH {
            ip(&self.node_ns(node).name, &["link", "set", LINK, "down"])
                .unwrap_or_else(|e| panic!("cut the link: {e}"));
        }
    }

    /// Brings the cluster link back up.
    pub fn restore_link(&self) {
        for node in Node::BOTH {
            ip(&self.node_ns(node).name, &["link", "set", LINK, "up"])
                .unwrap_or_else(|e| panic!("restore the link: {e}"));
        }
    }

    /// Proves the guest segment between the client and `node` is wired: puts [`PROBE_IP`]
    /// on the node's `br0` for a moment, and a TCP connection from the client namespace
    /// reaches a listener there. Returns how long the connection and one exchange took.
    pub fn probe_segment(&self, node: Node) -> Result<Duration, String> {
        let ns = &self.node_ns(node).name;
        let cidr = format!("{PROBE_IP}/24");
        ip(ns, &["addr", "add", &cidr, "dev", BRIDGE])?;
        let result = self.probe_once(node);
        let _ = ip(ns, &["addr", "del", &cidr, "dev", BRIDGE]);
        // The next probe's 10.0.0.3 is another node's bridge.
        let _ = ip(&self.client.name, &["neigh", "flush", "to", PROBE_IP]);
        result
    }

    fn probe_once(&self, node: Node) -> Result<Duration, String> {
        let listener = self
            .node_ns(node)
            .listen(&format!("{PROBE_IP}:0"))
            .map_err(|e| format!("listen on {PROBE_IP} in {node}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("listener: {e}"))?;
        let limit = Duration::from_secs(5);
        let server = std::thread::spawn(move || -> Result<(), String> {
            let deadline = Instant::now() + limit;
            loop {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false).map_err(|e| e.to_string())?;
                        return conn
                            .write_all(b"lockstep cluster segment\n")
                            .map_err(|e| e.to_string());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            return Err("no connection arrived".into());
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        });
        let t = Instant::now();
        let got = self
            .client
            .connect(&addr.to_string(), limit)
            .and_then(|mut c| {
                c.set_read_timeout(Some(limit))?;
                let mut s = String::new();
                c.read_to_string(&mut s)?;
                Ok(s)
            })
            .map_err(|e| format!("from the client namespace to {addr} on {node}: {e}"));
        let took = t.elapsed();
        let served = server
            .join()
            .unwrap_or_else(|_| Err("listener thread panicked".into()));
        let got = got?;
        served.map_err(|e| format!("listener on {node}: {e}"))?;
        if got != "lockstep cluster segment\n" {
            return Err(format!("from {node}: unexpected bytes {got:?}"));
        }
        Ok(took)
    }

    /// The fence log: one line per call of the fence agent.
    pub fn fence_log(&self) -> PathBuf {
        self.dir.join("fence.log")
    }

    /// Every call of the fence agent so far, oldest first.
    pub fn fence_calls(&self) -> Vec<FenceCall> {
        std::fs::read_to_string(self.fence_log())
            .unwrap_or_default()
            .lines()
            .filter_map(FenceCall::parse)
            .collect()
    }

    /// Prints what explains a failure to stderr: per node the tails of pacemaker.log (its
    /// notices, warnings and errors), corosync.log and boot.log, and `crm_mon -1` and
    /// lockstep's log if it runs, and the fence log.
    pub fn dump_logs(&self) {
        let mut out = String::new();
        for node in Node::BOTH {
            let s = self.slot(node);
            out += &format!(
                "===== {node} ({}) =====\n",
                if self.is_running(node) {
                    "running"
                } else {
                    "not running"
                }
            );
            let log = self.pacemaker_log(node);
            out += &format!(
                "----- {node} {} (last 60 lines of level notice and above)\n{}\n",
                log.display(),
                notices_of(&log, 60)
            );
            for (path, n) in [(self.corosync_log(node), 30), (s.dir.join("boot.log"), 10)] {
                out += &format!(
                    "----- {node} {} (last {n} lines)\n{}\n",
                    path.display(),
                    tail_of(&path, n)
                );
            }
            if self.is_running(node) {
                out += &format!(
                    "----- {node} crm_mon -1\n{}\n",
                    self.crm_mon(node).unwrap_or_else(|e| e)
                );
                // lockstep's own log lives in the node's /run (HA_RSCTMP), gone at reboot.
                let logs = self.exec_for(
                    node,
                    &[
                        "sh",
                        "-c",
                        "for f in /run/resource-agents/*/lockstep.log; do [ -f \"$f\" ] && \
                         echo \"----- $f (last 40 lines)\" && tail -n 40 \"$f\"; done",
                    ],
                    Duration::from_secs(10),
                );
                out += &match logs {
                    Ok(run) => run.stdout,
                    Err(e) => format!("----- {node} lockstep.log: {e}\n"),
                };
            }
        }
        out += &format!(
            "===== fence log =====\n{}\n",
            tail_of(&self.fence_log(), 50)
        );
        eprintln!("{out}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for s in &self.nodes {
            if let Err(left) = kill_all_in(s.ino, Duration::from_secs(10)) {
                eprintln!("cluster: {}: processes {left:?} survive SIGKILL", s.node);
            }
            s.reap();
        }
        if let Ok(ino) = netns_inode(&self.client.name) {
            let _ = kill_all_in(ino, Duration::from_secs(10));
        }
        // The fields go next: the namespaces (with their links, bridges and taps), the
        // fence agent, the lock file, the directory.
    }
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))
}

fn corosync_conf(prefix: &str, o: &Options) -> String {
    let nodes: String = Node::BOTH
        .iter()
        .enumerate()
        .map(|(i, n)| {
            format!(
                "    node {{\n        name: {}\n        nodeid: {}\n        ring0_addr: {}\n    }}\n",
                n.name(),
                i + 1,
                n.cluster_addr()
            )
        })
        .collect();
    format!(
        "# A lockstep test cluster (harness/src/cluster.rs).
totem {{
    version: 2
    cluster_name: {prefix}
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: {}
}}
nodelist {{
{nodes}}}
quorum {{
    provider: corosync_votequorum
    two_node: 1
}}
logging {{
    to_logfile: yes
    logfile: /var/log/corosync/corosync.log
    to_stderr: no
    to_syslog: no
    timestamp: on
}}
",
        o.token_ms
    )
}

fn fence_device_xml(agent: &str) -> String {
    format!(
        r#"<primitive id="{FENCE_DEVICE}" class="stonith" type="{agent}">
  <instance_attributes id="{FENCE_DEVICE}-ia">
    <nvpair id="{FENCE_DEVICE}-hosts" name="pcmk_host_list" value="node1 node2"/>
  </instance_attributes>
  <operations><op id="{FENCE_DEVICE}-monitor" name="monitor" interval="60s"/></operations>
</primitive>"#
    )
}

fn seed_cib(prefix: &str, o: &Options) -> String {
    let mut props = vec![
        ("dc-deadtime".to_string(), o.dc_deadtime.clone()),
        ("stonith-enabled".to_string(), "true".to_string()),
        (
            "priority-fencing-delay".to_string(),
            o.priority_fencing_delay.clone(),
        ),
    ];
    props.extend(o.properties.iter().cloned());
    let nvpairs: String = props
        .iter()
        .map(|(k, v)| {
            format!(
                "        <nvpair id=\"opt-{k}\" name=\"{}\" value=\"{}\"/>\n",
                xml_escape(k),
                xml_escape(v)
            )
        })
        .collect();
    format!(
        r#"<cib crm_feature_set="3.16.1" validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
{nvpairs}      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources>
{}
    </resources>
    <constraints/>
  </configuration>
  <status/>
</cib>
"#,
        fence_device_xml(&format!("fence_lockstep_{prefix}"))
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The first `<error>` text of a failed `crm_mon --output-as=xml`, or "".
fn first_error(xml: &str) -> String {
    let Some(start) = xml.find("<error>") else {
        return String::new();
    };
    let rest = &xml[start + 7..];
    let end = rest.find("</error>").unwrap_or(rest.len());
    format!(" ({})", xml_unescape(&rest[..end]))
}

/// One call of the fence agent (a line of [`Cluster::fence_log`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FenceCall {
    /// When it finished.
    pub at: SystemTime,
    /// The node whose fencer ran it.
    pub by: String,
    /// `off`, `reboot`, `status`, `monitor`, `list`...
    pub action: String,
    /// The node acted on ("" for monitor and list).
    pub target: String,
    /// Its exit status (0: done; 2 for status: off).
    pub rc: i32,
    /// The pids it killed.
    pub pids: String,
}

impl FenceCall {
    fn parse(line: &str) -> Option<FenceCall> {
        let (t, rest) = line.split_once(' ')?;
        let secs: f64 = t.parse().ok()?;
        let field = |key: &str| -> String {
            rest.split(' ')
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_default()
                .to_string()
        };
        let pids = rest
            .split_once("pids=")
            .map(|(_, p)| p.trim().to_string())
            .unwrap_or_default();
        Some(FenceCall {
            at: UNIX_EPOCH + Duration::from_secs_f64(secs),
            by: field("by"),
            action: field("action"),
            target: field("target"),
            rc: field("rc").parse().ok()?,
            pids,
        })
    }

    /// Whether this call powered `node` off (a successful `off` or `reboot` of it).
    pub fn powered_off(&self, node: Node) -> bool {
        self.rc == 0 && self.target == node.name() && matches!(&*self.action, "off" | "reboot")
    }
}

/// A node as `crm_mon` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub name: String,
    pub online: bool,
    pub standby: bool,
    pub pending: bool,
    pub unclean: bool,
    pub shutdown: bool,
    pub is_dc: bool,
}

/// A resource (or one instance of a clone) as `crm_mon` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceStatus {
    /// The primitive's id (the same for every instance of a clone).
    pub id: String,
    /// The enclosing clone's or group's id.
    pub parent: Option<String>,
    /// `ocf:pacemaker:Stateful`, `stonith:fence_...`
    pub agent: String,
    /// `Started`, `Stopped`, `Promoted`, `Unpromoted`...
    pub role: String,
    pub active: bool,
    pub failed: bool,
    /// The nodes it runs on.
    pub nodes: Vec<String>,
}

impl ResourceStatus {
    /// Whether it is `name`: its own id or its clone's (group's).
    pub fn is(&self, name: &str) -> bool {
        self.id == name || self.parent.as_deref() == Some(name)
    }

    pub fn promoted(&self) -> bool {
        matches!(&*self.role, "Promoted" | "Master")
    }

    pub fn unpromoted(&self) -> bool {
        matches!(&*self.role, "Unpromoted" | "Slave")
    }
}

/// An entry of `crm_mon`'s fencing history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FenceEvent {
    pub action: String,
    pub target: String,
    /// The node that carried it out.
    pub executioner: String,
    /// `success`, `failed`, `pending`.
    pub status: String,
    pub completed: String,
}

/// A failed operation in `crm_mon`'s failures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Failure {
    /// `<resource>_<action>_<interval>`.
    pub op_key: String,
    pub node: String,
    pub exitstatus: String,
    pub exitreason: String,
}

/// The cluster as one node sees it: `crm_mon --output-as=xml`, parsed.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// The designated controller's name, when there is one.
    pub dc: Option<String>,
    pub nodes: Vec<NodeStatus>,
    pub resources: Vec<ResourceStatus>,
    pub fence_history: Vec<FenceEvent>,
    pub failures: Vec<Failure>,
    /// The XML it was parsed from.
    pub xml: String,
}

impl Status {
    /// Parses `crm_mon --output-as=xml` (what it does not know, it skips).
    pub fn parse(xml: &str) -> Status {
        let mut st = Status {
            xml: xml.to_string(),
            ..Status::default()
        };
        // Open elements: name, id.
        let mut stack: Vec<(String, Option<String>)> = Vec::new();
        // The index of the open <resource> element in st.resources, if one is open.
        let mut open_resource: Option<usize> = None;
        for tag in tags(xml) {
            let (name, attrs, kind) = match tag {
                Tag::Close(name) => {
                    if stack.last().is_some_and(|(n, _)| *n == name) {
                        stack.pop();
                    }
                    if name == "resource" {
                        open_resource = None;
                    }
                    continue;
                }
                Tag::Open(name, attrs) => (name, attrs, true),
                Tag::Empty(name, attrs) => (name, attrs, false),
            };
            let get = |k: &str| -> String {
                attrs
                    .iter()
                    .find(|(a, _)| a == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let flag = |k: &str| get(k) == "true";
            let parent = stack.last().map(|(n, _)| n.as_str()).unwrap_or("");
            match (name.as_str(), parent) {
                ("current_dc", _) if flag("present") => st.dc = Some(get("name")),
                ("node", "nodes") => st.nodes.push(NodeStatus {
                    name: get("name"),
                    online: flag("online"),
                    standby: flag("standby"),
                    pending: flag("pending"),
                    unclean: flag("unclean"),
                    shutdown: flag("shutdown"),
                    is_dc: flag("is_dc"),
                }),
                ("resource", _) if stack.iter().any(|(n, _)| n == "resources") => {
                    let container = stack
                        .iter()
                        .rev()
                        .take_while(|(n, _)| n != "resources")
                        .find(|(n, _)| matches!(n.as_str(), "clone" | "group" | "bundle"))
                        .and_then(|(_, id)| id.clone());
                    st.resources.push(ResourceStatus {
                        id: get("id"),
                        parent: container,
                        agent: get("resource_agent"),
                        role: get("role"),
                        active: flag("active"),
                        failed: flag("failed"),
                        nodes: Vec::new(),
                    });
                    if kind {
                        open_resource = Some(st.resources.len() - 1);
                    }
                }
                ("node", "resource") => {
                    if let Some(i) = open_resource {
                        st.resources[i].nodes.push(get("name"));
                    }
                }
                ("fence_event", _) => st.fence_history.push(FenceEvent {
                    action: get("action"),
                    target: get("target"),
                    executioner: get("executioner"),
                    status: get("status"),
                    completed: get("completed"),
                }),
                ("failure", _) => st.failures.push(Failure {
                    op_key: get("op_key"),
                    node: get("node"),
                    exitstatus: get("exitstatus"),
                    exitreason: get("exitreason"),
                }),
                _ => {}
            }
            if kind {
                let id = attrs
                    .iter()
                    .find(|(a, _)| a == "id")
                    .map(|(_, v)| v.clone());
                stack.push((name, id));
            }
        }
        st
    }

    pub fn node(&self, node: Node) -> Option<&NodeStatus> {
        self.nodes.iter().find(|n| n.name == node.name())
    }

    /// Whether the node is online (a member running Pacemaker, not pending).
    pub fn online(&self, node: Node) -> bool {
        self.node(node).is_some_and(|n| n.online && !n.pending)
    }

    /// The nodes that are online.
    pub fn both_online(&self) -> bool {
        self.online(Node::One) && self.online(Node::Two)
    }

    pub fn online_nodes(&self) -> Vec<Node> {
        Node::BOTH.into_iter().filter(|n| self.online(*n)).collect()
    }

    /// The instances of `resource` (a primitive's id, or its clone's or group's).
    pub fn instances<'a>(&'a self, resource: &'a str) -> impl Iterator<Item = &'a ResourceStatus> {
        self.resources.iter().filter(move |r| r.is(resource))
    }

    /// Where the promoted instance of `resource` runs.
    pub fn promoted_on(&self, resource: &str) -> Option<Node> {
        self.instances(resource)
            .filter(|r| r.promoted())
            .flat_map(|r| r.nodes.iter())
            .find_map(|n| Node::from_name(n))
    }

    /// Where unpromoted instances of `resource` run.
    pub fn unpromoted_on(&self, resource: &str) -> Vec<Node> {
        self.instances(resource)
            .filter(|r| r.unpromoted())
            .flat_map(|r| r.nodes.iter())
            .filter_map(|n| Node::from_name(n))
            .collect()
    }

    /// Where instances of `resource` run, in any role.
    pub fn running_on(&self, resource: &str) -> Vec<Node> {
        self.instances(resource)
            .filter(|r| r.active)
            .flat_map(|r| r.nodes.iter())
            .filter_map(|n| Node::from_name(n))
            .collect()
    }

    /// The role of `resource` on `node` ("Stopped" if it does not run there).
    pub fn role_on(&self, resource: &str, node: Node) -> String {
        self.instances(resource)
            .find(|r| r.nodes.iter().any(|n| n == node.name()))
            .map(|r| r.role.clone())
            .unwrap_or_else(|| "Stopped".into())
    }
}

/// One tag of an XML document.
enum Tag {
    Open(String, Vec<(String, String)>),
    Empty(String, Vec<(String, String)>),
    Close(String),
}

/// The tags of an XML document, in order (text, comments, declarations skipped). Enough
/// for `crm_mon`'s output: no DTD, no CDATA in the parts read.
fn tags(xml: &str) -> Vec<Tag> {
    let b = xml.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let is_name = |c: u8| !(c.is_ascii_whitespace() || c == b'/' || c == b'>' || c == b'=');
    while let Some(off) = xml[i..].find('<') {
        i += off + 1;
        if xml[i..].starts_with("!--") {
            i = xml[i..].find("-->").map_or(b.len(), |e| i + e + 3);
            continue;
        }
        if xml[i..].starts_with('?') || xml[i..].starts_with('!') {
            i = xml[i..].find('>').map_or(b.len(), |e| i + e + 1);
            continue;
        }
        let close = b.get(i) == Some(&b'/');
        if close {
            i += 1;
        }
        let start = i;
        while i < b.len() && is_name(b[i]) {
            i += 1;
        }
        let name = xml[start..i].to_string();
        if close {
            i = xml[i..].find('>').map_or(b.len(), |e| i + e + 1);
            out.push(Tag::Close(name));
            continue;
        }
        let mut attrs = Vec::new();
        let mut empty = false;
        loop {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            match b.get(i) {
                None => break,
                Some(b'>') => {
                    i += 1;
                    break;
                }
                Some(b'/') => {
                    empty = true;
                    i += 1;
                    continue;
                }
                Some(_) => {}
            }
            let ks = i;
            while i < b.len() && is_name(b[i]) {
                i += 1;
            }
            let key = xml[ks..i].to_string();
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if b.get(i) != Some(&b'=') {
                if i == ks {
                    i += 1; // not an attribute: skip the byte
                }
                continue;
            }
            i += 1;
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            let Some(&q) = b.get(i).filter(|c| **c == b'"' || **c == b'\'') else {
                continue;
            };
            i += 1;
            let vs = i;
            while i < b.len() && b[i] != q {
                i += 1;
            }
            attrs.push((key, xml_unescape(&xml[vs..i])));
            i += 1;
        }
        out.push(if empty {
            Tag::Empty(name, attrs)
        } else {
            Tag::Open(name, attrs)
        });
    }
    out
}

fn xml_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&#10;", "\n")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRM_MON: &str = r#"<?xml version="1.0"?>
<pacemaker-result api-version="2.25" request="crm_mon -1 -r --output-as=xml">
  <summary>
    <stack type="corosync"/>
    <current_dc present="true" version="2.1.5" name="node2" id="2" with_quorum="true"/>
  </summary>
  <nodes>
    <node name="node1" id="1" online="true" standby="false" pending="false" unclean="false" shutdown="false" is_dc="false" type="member"/>
    <node name="node2" id="2" online="false" standby="false" pending="false" unclean="true" shutdown="false" is_dc="true" type="member"/>
  </nodes>
  <resources>
    <resource id="fence" resource_agent="stonith:fence_x" role="Started" active="true" failed="false" nodes_running_on="1">
      <node name="node1" id="1" cached="true"/>
    </resource>
    <clone id="st-clone" multi_state="true" unique="false">
      <resource id="st" resource_agent="ocf:pacemaker:Stateful" role="Promoted" active="true" failed="false" nodes_running_on="1">
        <node name="node1" id="1" cached="true"/>
      </resource>
      <resource id="st" resource_agent="ocf:pacemaker:Stateful" role="Stopped" active="false" failed="false" nodes_running_on="0"/>
    </clone>
  </resources>
  <node_history>
    <node name="node1">
      <resource_history id="st" orphan="false" migration-threshold="1000000"/>
    </node>
  </node_history>
  <failures>
    <failure op_key="st_monitor_3000" node="node1" exitstatus="not running" exitreason="gone &amp; back &lt;here&gt;" status="complete"/>
  </failures>
  <fence_history>
    <fence_event status="success" action="reboot" target="node2" executioner="node1" origin="node1" completed="2026-11-30 14:00:00Z"/>
  </fence_history>
  <status code="0" message="OK"/>
</pacemaker-result>
"#;

    #[test]
    fn parses_crm_mon_xml() {
        let s = Status::parse(CRM_MON);
        assert_eq!(s.dc.as_deref(), Some("node2"));
        assert_eq!(s.nodes.len(), 2);
        assert!(s.online(Node::One));
        assert!(!s.online(Node::Two));
        assert!(s.node(Node::Two).unwrap().unclean);
        assert_eq!(s.online_nodes(), vec![Node::One]);
        assert_eq!(s.resources.len(), 3);
        assert_eq!(s.promoted_on("st-clone"), Some(Node::One));
        assert_eq!(s.promoted_on("st"), Some(Node::One));
        assert_eq!(s.promoted_on("fence"), None);
        assert!(s.unpromoted_on("st").is_empty());
        assert_eq!(s.running_on("fence"), vec![Node::One]);
        assert_eq!(s.role_on("st", Node::Two), "Stopped");
        assert_eq!(s.role_on("st-clone", Node::One), "Promoted");
        assert_eq!(s.resources[1].parent.as_deref(), Some("st-clone"));
        assert_eq!(s.resources[0].parent, None);
        assert_eq!(s.failures.len(), 1);
        assert_eq!(s.failures[0].exitreason, "gone & back <here>");
        assert_eq!(s.fence_history.len(), 1);
        assert_eq!(s.fence_history[0].target, "node2");
        assert_eq!(s.fence_history[0].executioner, "node1");
    }

    #[test]
    fn parses_fence_log_lines() {
        let c = FenceCall::parse(
            "1764511200.123456789 by=node1 action=reboot target=node2 rc=0 pids=12 34 ",
        )
        .unwrap();
        assert_eq!(c.by, "node1");
        assert_eq!(c.action, "reboot");
        assert_eq!(c.target, "node2");
        assert_eq!(c.rc, 0);
        assert_eq!(c.pids, "12 34");
        assert!(c.powered_off(Node::Two));
        assert!(!c.powered_off(Node::One));
        let m =
            FenceCall::parse("1764511200.5 by=node2 action=monitor target= rc=0 pids=").unwrap();
        assert_eq!(m.target, "");
        assert!(!m.powered_off(Node::Two));
    }

    #[test]
    fn seeds_a_valid_configuration() {
        let o = Options::default();
        let cib = seed_cib("lscX", &o);
        assert!(cib.contains(r#"name="priority-fencing-delay" value="2s""#));
        assert!(cib.contains(r#"type="fence_lockstep_lscX""#));
        let conf = corosync_conf("lscX", &o);
        assert!(conf.contains("token: 1000"));
        assert!(conf.contains("ring0_addr: 10.250.0.2"));
        let tags = tags(&cib);
        assert!(matches!(&tags[0], Tag::Open(n, _) if n == "cib"));
    }
}
