//! Operator requests from the control socket to the role that runs: `protect` (a running,
//! unprotected guest starts replicating to a new backup), `switchover` (a planned
//! hand-over from the primary to its backup) and `failover` (promotion of a backup on the
//! operator's word, still only after fencing).
//!
//! The control socket's thread calls [`submit`]: the request is checked against what the
//! process is doing now (its [`status`](super::status)) and either refused at once, with an
//! HTTP status and a reason, or left pending. The role's own loop takes it when it can act
//! on it (between two epochs, or in the backup's receive loop) and reports how it went
//! with [`finish`]; [`last`] is what `GET /status` shows of it. At most one request is
//! pending or under way at a time.
//!
//! The procedures follow QEMU COLO's: `x-colo-lost-heartbeat` (operator failover) and the
//! re-protect that follows a failover, and a planned switchover as a final checkpoint.

use std::sync::Mutex;

use super::status::{self, GuestState, Protection, Role};

/// What an operator asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Start replicating the running guest to the backup listening at `peer` (`host:port`).
    Protect {
        /// The new backup's address.
        peer: String,
        /// Whom the process's fence agent fences, should this backup be lost, when the
        /// new backup is not on the node the agent was set up for.
        fence: FenceTarget,
    },
    /// Planned switchover: final epoch, the backup promotes, this side then does `then`.
    Switchover {
        /// What the old primary does once the backup runs the guest.
        then: AfterSwitchover,
    },
    /// Promote this backup now (after fencing the primary).
    Failover,
}

/// A protect's fence target: the process's fence agent, aimed at the new backup's node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FenceTarget {
    /// The new backup's node as the fence device knows it (replaces `--peer-node`).
    pub peer_node: Option<String>,
    /// The agent's options for that node (replace the `--fence-arg`s), checked as they are.
    pub args: Option<Vec<(String, String)>>,
}

impl FenceTarget {
    /// Whether it changes anything.
    pub fn is_set(&self) -> bool {
        self.peer_node.is_some() || self.args.is_some()
    }
}

/// What the old primary does after a switchover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterSwitchover {
    /// Its process ends.
    Stop,
    /// It becomes the new backup, listening at `listen`; the promoted side protects the
    /// guest to it.
    Backup {
        /// Where the new backup listens (`host:port`).
        listen: String,
    },
}

impl Request {
    /// The endpoint's name: `protect`, `switchover` or `failover`.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Protect { .. } => "protect",
            Request::Switchover { .. } => "switchover",
            Request::Failover => "failover",
        }
    }
}

/// Where a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestState {
    /// Accepted, not taken up by the role yet.
    Pending,
    /// Under way (a protect's initial sync, a switchover's final epoch, fencing).
    Running,
    /// Done.
    Done,
    /// Failed; nothing it would have changed was changed (see the detail).
    Failed,
}

impl RequestState {
    /// The name in the JSON status.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Running => "running",
            RequestState::Done => "done",
            RequestState::Failed => "failed",
        }
    }
}

/// The last request and how it went, for `GET /status`.
#[derive(Clone, Debug)]
pub struct RequestReport {
    /// The request's kind (`protect`, `switchover`, `failover`).
    pub kind: &'static str,
    /// Where it is.
    pub state: RequestState,
    /// What it asked for, or how it ended.
    pub detail: String,
    /// A counter: each accepted request gets the next number.
    pub id: u64,
}

/// A request that cannot be carried out now: the HTTP status and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// 400 for a malformed request, 409 for one that does not fit the process's state.
    pub code: u16,
    /// One line, naming what is in the way.
    pub message: String,
}

fn conflict(message: impl Into<String>) -> Refusal {
    Refusal {
        code: 409,
        message: message.into(),
    }
}

struct Control {
    pending: Option<Request>,
    last: Option<RequestReport>,
    next_id: u64,
    /// Why this backup cannot promote on an operator's request, if it cannot.
    no_failover: Option<String>,
    /// Whether the primary role has a fence agent (that a protect may aim elsewhere).
    fence_agent: bool,
    /// Why this process may not protect its guest, if it may not.
    no_protect: Option<String>,
}

static CONTROL: Mutex<Control> = Mutex::new(Control {
    pending: None,
    last: None,
    next_id: 1,
    no_failover: Some(String::new()),
    fence_agent: false,
    no_protect: None,
});

fn control() -> std::sync::MutexGuard<'static, Control> {
    CONTROL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a backup may promote on `POST /failover`: `None` when it may (fencing is
/// configured), or why not.
pub fn set_failover_refusal(why: Option<String>) {
    control().no_failover = why;
}

/// Whether the process's primary role has a fence agent, which a protect's
/// [`FenceTarget`] may aim at the new backup's node.
pub fn set_fence_agent(present: bool) {
    control().fence_agent = present;
}

/// Why a protect would be unsafe here (`None`: it is not): a guest with a network device
/// whose process cannot fence a lost backup would hold its output for good.
pub fn set_protect_refusal(why: Option<String>) {
    control().no_protect = why;
}

/// Checks `req` against what the process does now and leaves it pending for the role, or
/// refuses it (nothing changes then). Returns the request's id.
pub fn submit(req: Request) -> Result<u64, Refusal> {
    let s = status::report();
    let mut c = control();
    if let Some(last) = c
        .last
        .as_ref()
        .filter(|l| matches!(l.state, RequestState::Pending | RequestState::Running))
    {
        return Err(conflict(format!(
            "a {} request is {} (see GET /status)",
            last.kind,
            last.state.as_str()
        )));
    }
    match &req {
        Request::Protect { peer, fence } => {
            check_address("peer", peer)?;
            if fence.is_set() && !c.fence_agent {
                return Err(conflict(
                    "this process has no fence agent (--fence-cmd or --fence cluster) to aim \
                     at the new backup's node",
                ));
            }
            if fence
                .peer_node
                .as_deref()
                .is_some_and(|n| n.trim().is_empty() || n.contains(['\n', '\r']))
            {
                return Err(Refusal {
                    code: 400,
                    message: "\"peer_node\" cannot be empty or hold a line break".into(),
                });
            }
            if s.role == Role::Backup {
                return Err(conflict(
                    "this process is a backup: protect is for the process that runs the guest",
                ));
            }
            if s.guest != GuestState::Running {
                return Err(conflict(format!(
                    "the guest is {}: only a running guest can be protected",
                    s.guest.as_str()
                )));
            }
            match s.protection {
                Protection::Unprotected => {}
                Protection::UnprotectedHeld => {
                    return Err(conflict(
                        "the guest's output is held until the lost backup is fenced: a new \
                         backup may protect it only after that",
                    ))
                }
                p => {
                    return Err(conflict(format!(
                        "the guest is already {} by a backup",
                        if p == Protection::Syncing {
                            "being synced"
                        } else {
                            "protected"
                        }
                    )))
                }
            }
            if let Some(why) = &c.no_protect {
                return Err(conflict(why.clone()));
            }
        }
        Request::Switchover { then } => {
            if let AfterSwitchover::Backup { listen } = then {
                check_address("listen", listen)?;
            }
            if s.role != Role::Primary || s.protection != Protection::Protected {
                return Err(conflict(format!(
                    "switchover needs a primary with a protected guest; this process is {} \
                     and its guest {}",
                    s.role.as_str(),
                    s.protection.as_str()
                )));
            }
        }
        Request::Failover => {
            if s.role != Role::Backup {
                return Err(conflict(format!(
                    "failover promotes a backup; this process is {}",
                    s.role.as_str()
                )));
            }
            if let Some(why) = &c.no_failover {
                return Err(conflict(why.clone()));
            }
            if s.committed_epoch.is_none() {
                return Err(conflict(
                    "this backup holds no committed epoch yet: nothing to promote",
                ));
            }
        }
    }
    let id = c.next_id;
    c.next_id += 1;
    c.last = Some(RequestReport {
        kind: req.kind(),
        state: RequestState::Pending,
        detail: describe(&req),
        id,
    });
    c.pending = Some(req);
    Ok(id)
}

fn describe(req: &Request) -> String {
    match req {
        Request::Protect { peer, fence } => match &fence.peer_node {
            Some(node) => format!("protect to the backup at {peer} (node {node})"),
            None => format!("protect to the backup at {peer}"),
        },
        Request::Switchover {
            then: AfterSwitchover::Stop,
        } => "switchover; then this process stops".into(),
        Request::Switchover {
            then: AfterSwitchover::Backup { listen },
        } => format!("switchover; then this process becomes the backup at {listen}"),
        Request::Failover => "failover: fence the primary, then promote".into(),
    }
}

/// `host:port` with a port number: the shape of every address a request carries. A
/// protect's `peer` is one to connect to: not an unspecified host (where a backup listens).
pub fn check_address(field: &str, addr: &str) -> Result<(), Refusal> {
    let ok = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
        && !addr.chars().any(char::is_whitespace);
    let host = addr.rsplit_once(':').map_or("", |(host, _)| host);
    let ip = host.trim_start_matches('[').trim_end_matches(']').parse();
    if ok && field == "peer" && ip.is_ok_and(|ip: std::net::IpAddr| ip.is_unspecified()) {
        return Err(Refusal {
            code: 400,
            message: format!(
                "\"{field}\": '{addr}': the backup's address to connect to; {host} is where it \
                 listens, not where it is reached"
            ),
        });
    }
    if ok {
        Ok(())
    } else {
        Err(Refusal {
            code: 400,
            message: format!("\"{field}\": '{addr}' is not host:port"),
        })
    }
}

/// Takes the pending request if `wanted` accepts it (the role that can act on it).
pub fn take(wanted: impl Fn(&Request) -> bool) -> Option<Request> {
    let mut c = control();
    if !c.pending.as_ref().is_some_and(wanted) {
        return None;
    }
    if let Some(last) = &mut c.last {
        last.state = RequestState::Running;
    }
    c.pending.take()
}

/// The request taken last ended: `Ok` with what was done, or `Err` with why it failed.
pub fn finish(result: Result<String, String>) {
    let mut c = control();
    if let Some(last) = &mut c.last {
        let (state, detail) = match result {
            Ok(d) => (RequestState::Done, d),
            Err(d) => (RequestState::Failed, d),
        };
        last.state = state;
        last.detail = detail;
    }
}

/// Drops a request still pending because the process changed role before it was taken.
pub fn drop_pending(why: &str) {
    let mut c = control();
    if c.pending.take().is_some() {
        if let Some(last) = &mut c.last {
            last.state = RequestState::Failed;
            last.detail = format!("not carried out: {why}");
        }
    }
}

/// The last request and where it is.
pub fn last() -> Option<RequestReport> {
    control().last.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked() {
        for bad in ["", "host", ":80", "h:", "h:0", "h:99999", "h :1"] {
            assert_eq!(check_address("peer", bad).unwrap_err().code, 400, "{bad}");
        }
        for good in ["127.0.0.1:7600", "[::1]:7600", "backup.example:1"] {
            check_address("peer", good).unwrap();
        }
        // Where a backup listens, not where it is reached.
        for unspecified in ["0.0.0.0:7600", "[::]:7600"] {
            let why = check_address("peer", unspecified).unwrap_err().message;
            assert!(why.contains("where it listens"), "{why}");
            check_address("listen", unspecified).unwrap();
        }
    }
}
