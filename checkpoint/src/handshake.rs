//! The opening exchange: the primary says what it protects, the backup accepts or refuses.
//!
//! The backup compares the primary's [`Hello`] with its own configuration: protocol version,
//! page size, vCPU count, guest id, feature flags and memory layout must all match. On any
//! difference it sends `Refuse` naming every difference and fails; the primary receives
//! the same reason and fails with it. A peer speaking another protocol version is refused
//! the same way (its frames cannot be decoded, so the header version alone decides).

use std::time::Duration;

use thiserror::Error;

use crate::protocol::{Hello, Message, ProtocolError, PROTOCOL_VERSION};
use crate::transport::{Connection, TransportError};

/// Errors of the handshake.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// The backup refused us (primary side).
    #[error("the backup refused replication: {0}")]
    RefusedByBackup(String),
    /// We refused the primary (backup side).
    #[error("refused the primary: {0}")]
    RefusedPrimary(String),
    /// The peer sent something other than the expected message.
    #[error("expected {expected} during the handshake, got a {got:?} frame")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// Kind received.
        got: crate::protocol::MessageKind,
    },
    /// The transport failed.
    #[error("handshake failed: {0}")]
    Transport(#[from] TransportError),
}

/// Primary side: sends `hello`, waits up to `timeout` for the backup's answer.
pub fn primary_handshake(
    conn: &mut Connection,
    hello: &Hello,
    timeout: Duration,
) -> Result<(), HandshakeError> {
    conn.send(&Message::Hello(hello.clone()))?;
    match conn.recv(Some(timeout))? {
        Message::HelloOk => Ok(()),
        Message::Refuse { reason } => Err(HandshakeError::RefusedByBackup(reason)),
        Message::Leave { .. } => Err(HandshakeError::RefusedByBackup(
            "it is stopping (it left before the handshake completed)".into(),
        )),
        other => Err(HandshakeError::Unexpected {
            expected: "HelloOk or Refuse",
            got: other.kind(),
        }),
    }
}

/// Backup side: waits up to `timeout` for the primary's `Hello`, compares it with `local`,
/// and answers `HelloOk` (returning the primary's hello) or `Refuse`.
pub fn backup_handshake(
    conn: &mut Connection,
    local: &Hello,
    timeout: Duration,
) -> Result<Hello, HandshakeError> {
    let reason = match conn.recv(Some(timeout)) {
        Ok(Message::Hello(peer)) => {
            let diffs = local.differences(&peer, "backup", "primary");
            if diffs.is_empty() {
                conn.send(&Message::HelloOk)?;
                return Ok(peer);
            }
            diffs.join("; ")
        }
        Ok(other) => {
            return Err(HandshakeError::Unexpected {
                expected: "Hello",
                got: other.kind(),
            })
        }
        Err(TransportError::Protocol(ProtocolError::Version { got })) => {
            format!("protocol version differs: backup {PROTOCOL_VERSION}, primary {got}")
        }
        Err(e) => return Err(e.into()),
    };
    // Best effort: the refusal is also our own error, whether or not the primary hears it.
    let _ = conn.send(&Message::Refuse {
        reason: reason.clone(),
    });
    Err(HandshakeError::RefusedPrimary(reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MemoryRegion, HEADER_LEN};
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    fn hello(vcpus: u32, ram: u64) -> Hello {
        Hello::new(vcpus, vec![MemoryRegion { gpa: 0, len: ram }], 7)
    }

    fn run(
        primary: Hello,
        backup: Hello,
    ) -> (Result<(), HandshakeError>, Result<Hello, HandshakeError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let b = std::thread::spawn(move || {
            let mut c = Connection::accept(&l).unwrap();
            backup_handshake(&mut c, &backup, Duration::from_secs(10))
        });
        let mut c = Connection::connect(addr, Duration::from_secs(5)).unwrap();
        let p = primary_handshake(&mut c, &primary, Duration::from_secs(10));
        (p, b.join().unwrap())
    }

    #[test]
    fn matching_configurations_are_accepted() {
        let (p, b) = run(hello(2, 1 << 29), hello(2, 1 << 29));
        p.unwrap();
        assert_eq!(b.unwrap(), hello(2, 1 << 29));
    }

    #[test]
    fn mismatches_are_refused_on_both_sides_naming_the_difference() {
        let (p, b) = run(hello(4, 1 << 29), hello(2, 1 << 28));
        let want = "vCPU count differs: backup 2, primary 4; memory layout differs: \
                    backup [0x0+0x10000000], primary [0x0+0x20000000]";
        assert_eq!(
            p.unwrap_err().to_string(),
            format!("the backup refused replication: {want}")
        );
        assert_eq!(
            b.unwrap_err().to_string(),
            format!("refused the primary: {want}")
        );
    }

    #[test]
    fn another_protocol_version_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut raw = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let mut c = Connection::accept(&l).unwrap();
        let mut frame = Message::Hello(hello(2, 1 << 29))
            .to_frame()
            .unwrap()
            .to_vec();
        frame[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        raw.write_all(&frame).unwrap();
        let err = backup_handshake(&mut c, &hello(2, 1 << 29), Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "refused the primary: protocol version differs: backup {PROTOCOL_VERSION}, primary {}",
                PROTOCOL_VERSION + 1
            )
        );
        // The refusal reached the peer as a well-formed frame.
        let mut buf = vec![0u8; HEADER_LEN];
        std::io::Read::read_exact(&mut raw, &mut buf).unwrap();
        assert_eq!(buf[6], crate::protocol::MessageKind::Refuse as u8);
    }

    #[test]
    fn a_backup_that_stops_during_the_handshake_is_named_as_stopping() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let b = std::thread::spawn(move || {
            let mut c = Connection::accept(&l).unwrap();
            c.send(&Message::Leave {
                epoch: 0,
                reason: String::new(),
            })
            .unwrap();
        });
        let mut c = Connection::connect(addr, Duration::from_secs(5)).unwrap();
        let err = primary_handshake(&mut c, &hello(2, 1 << 29), Duration::from_secs(10));
        b.join().unwrap();
        assert_eq!(
            err.unwrap_err().to_string(),
            "the backup refused replication: it is stopping (it left before the handshake \
             completed)"
        );
    }
}
