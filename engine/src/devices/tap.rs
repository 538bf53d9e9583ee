//! A Linux tap device: the host side of the guest's network card.
//!
//! Opened by name with `IFF_TAP | IFF_NO_PI` (frames without a packet-info prefix and
//! without a vnet header: the virtio-net header is added and stripped by the device).
//! The interface must already exist (`ip tuntap add dev NAME mode tap`) or is created if
//! the process may; it is never configured by lockstep.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use thiserror::Error;

/// The tap device could not be opened.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name is empty or too long for an interface name.
    #[error("tap name '{0}' is empty or longer than 15 bytes")]
    BadName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    Open(io::Error),
    /// `TUNSETIFF` refused the name (no such tap, or no permission).
    #[error("cannot attach to tap device '{name}': {source}")]
    Attach {
        /// The tap's name.
        name: String,
        /// The error from `TUNSETIFF`.
        source: io::Error,
    },
}

// From <linux/if_tun.h>, which neither rustix nor libc carries.
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
/// `_IOW('T', 202, int)` (the kernel declares it with `int` but reads an `ifreq`).
const TUNSETIFF: rustix::ioctl::Opcode = 0x4004_54ca;
/// How long a busy tap (attached by another process) is waited for.
const BUSY_WAIT: Duration = Duration::from_secs(3);
/// Bytes of an interface name, its terminating NUL included (`IFNAMSIZ`).
const IFNAMSIZ: usize = 16;

#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

/// An open tap device.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap device `name`, non-blocking, without packet information headers.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= IFNAMSIZ {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(
                (rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::CLOEXEC).bits() as i32,
            )
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        // A tap is attached to one file at a time: one still held by a process that is
        // ending (a primary handing the guest over, or one just killed) is busy for a
        // moment, and is waited for.
        let deadline = Instant::now() + BUSY_WAIT;
        loop {
            let mut req = IfReq {
                name: [0; IFNAMSIZ],
                flags: IFF_TAP | IFF_NO_PI,
                _pad: [0; 22],
            };
            req.name[..name.len()].copy_from_slice(name.as_bytes());
            // SAFETY: TUNSETIFF reads and writes an `ifreq`; `req` is a correctly sized,
            // initialized `#[repr(C)]` ifreq that lives across the call.
            let attach = unsafe {
                rustix::ioctl::ioctl(
                    &file,
                    rustix::ioctl::Updater::<TUNSETIFF, IfReq>::new(&mut req),
                )
            };
            match attach {
                Ok(()) => break,
                Err(rustix::io::Errno::BUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(TapError::Attach {
                        name: name.to_string(),
                        source: e.into(),
                    })
                }
            }
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The tap device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame; `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            match (&self.file).write(frame) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until a frame can be read, for at most `timeout_ms` milliseconds.
    pub fn wait_readable(&self, timeout_ms: i32) -> bool {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let ms = i64::from(timeout_ms.max(0));
        let timeout = Timespec {
            tv_sec: ms / 1000,
            tv_nsec: (ms % 1000) * 1_000_000,
        };
        let mut fds = [PollFd::new(&self.file, PollFlags::IN)];
        poll(&mut fds, Some(&timeout)).unwrap_or(0) > 0
    }
}
