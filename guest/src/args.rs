//! The guest command line: `key=value` pairs separated by spaces, e.g.
//! `workload=dirty pages_per_ms=100 wss=64M seconds=5`.

use core::fmt;

/// The key that selects the workload; every workload accepts it.
pub const WORKLOAD_KEY: &str = "workload";

/// What is wrong with the command line or with the values in it. Printed as the
/// `error: ...` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgError<'a> {
    NotKeyValue(&'a str),
    MissingWorkload,
    UnknownWorkload(&'a str),
    UnknownKey {
        workload: &'static str,
        key: &'a str,
        value: &'a str,
    },
    Duplicate {
        key: &'a str,
        value: &'a str,
    },
    Missing {
        workload: &'static str,
        key: &'static str,
        /// What the value is, e.g. `N` or `panic|fault`.
        placeholder: &'static str,
    },
    Malformed {
        key: &'static str,
        value: &'a str,
        expected: &'static str,
    },
    Invalid {
        key: &'static str,
        value: &'a str,
        reason: &'static str,
    },
    DoesNotFit {
        wss: &'a str,
        free: u64,
    },
    PagePerVcpu {
        wss: &'a str,
        vcpus: u32,
    },
    TooLittleRam {
        workload: &'static str,
        need: &'static str,
        free: u64,
    },
    /// The workload needs a device the VMM did not give the guest.
    NoDevice {
        workload: &'static str,
        device: &'static str,
        flag: &'static str,
    },
}

impl fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ArgError::NotKeyValue(token) => {
                write!(f, "malformed argument \"{token}\": expected key=value")
            }
            ArgError::MissingWorkload => write!(
                f,
                "missing workload= (expected one of {})",
                crate::workloads::NAMES
            ),
            ArgError::UnknownWorkload(name) => write!(
                f,
                "unknown workload={name} (expected one of {})",
                crate::workloads::NAMES
            ),
            ArgError::UnknownKey {
                workload,
                key,
                value,
            } => write!(f, "unknown key {key}={value} for workload={workload}"),
            ArgError::Duplicate { key, value } => {
                write!(f, "duplicate key {key}={value}")
            }
            ArgError::Missing {
                workload,
                key,
                placeholder,
            } => write!(f, "workload={workload} needs {key}={placeholder}"),
            ArgError::Malformed {
                key,
                value,
                expected,
            } => write!(f, "malformed value {key}={value}: expected {expected}"),
            ArgError::Invalid { key, value, reason } => write!(f, "{key}={value} {reason}"),
            ArgError::DoesNotFit { wss, free } => {
                write!(
                    f,
                    "wss={wss} does not fit in {free} bytes of free guest RAM"
                )
            }
            ArgError::PagePerVcpu { wss, vcpus } => {
                write!(
                    f,
                    "wss={wss} is less than one 4K page for each of {vcpus} vCPUs"
                )
            }
            ArgError::TooLittleRam {
                workload,
                need,
                free,
            } => write!(
                f,
                "workload={workload} needs at least {need} of free guest RAM ({free} bytes free)"
            ),
            ArgError::NoDevice {
                workload,
                device,
                flag,
            } => write!(f, "workload={workload} needs a {device} device ({flag})"),
        }
    }
}

/// The `key=value` pairs of a command line, in order.
pub fn pairs(cmdline: &str) -> impl Iterator<Item = Result<(&str, &str), ArgError<'_>>> {
    cmdline
        .split_ascii_whitespace()
        .map(|token| match token.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key, value)),
            _ => Err(ArgError::NotKeyValue(token)),
        })
}

/// The value of `workload=`.
pub fn workload(cmdline: &str) -> Result<&str, ArgError<'_>> {
    let mut found = None;
    for pair in pairs(cmdline) {
        let (key, value) = pair?;
        if key == WORKLOAD_KEY {
            if found.is_some() {
                return Err(ArgError::Duplicate { key, value });
            }
            found = Some(value);
        }
    }
    found.ok_or(ArgError::MissingWorkload)
}

/// Walks the pairs of the command line other than `workload=`, handing each to `set`
/// with its key as spelled in `keys`. Rejects keys not in `keys` and repeated keys.
pub fn parse_keys<'a>(
    cmdline: &'a str,
    workload: &'static str,
    keys: &[&'static str],
    mut set: impl FnMut(&'static str, &'a str) -> Result<(), ArgError<'a>>,
) -> Result<(), ArgError<'a>> {
    debug_assert!(keys.len() <= 64);
    let mut seen = 0u64;
    for pair in pairs(cmdline) {
        let (key, value) = pair?;
        if key == WORKLOAD_KEY {
            continue;
        }
        let Some(index) = keys.iter().position(|known| *known == key) else {
            return Err(ArgError::UnknownKey {
                workload,
                key,
                value,
            });
        };
        if seen & (1 << index) != 0 {
            return Err(ArgError::Duplicate { key, value });
        }
        seen |= 1 << index;
        set(keys[index], value)?;
    }
    Ok(())
}

/// A decimal count, e.g. `limit=10`.
pub fn parse_u64<'a>(key: &'static str, value: &'a str) -> Result<u64, ArgError<'a>> {
    digits(value).ok_or(ArgError::Malformed {
        key,
        value,
        expected: "a non-negative decimal integer",
    })
}

/// A size in bytes: plain bytes or a K, M or G suffix (powers of 1024), e.g. `wss=64M`.
pub fn parse_size<'a>(key: &'static str, value: &'a str) -> Result<Size<'a>, ArgError<'a>> {
    let malformed = ArgError::Malformed {
        key,
        value,
        expected: "bytes or a size with a K, M or G suffix",
    };
    let (number, shift) = match value.as_bytes().last() {
        Some(b'k' | b'K') => (&value[..value.len() - 1], 10),
        Some(b'm' | b'M') => (&value[..value.len() - 1], 20),
        Some(b'g' | b'G') => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    let number = digits(number).ok_or(malformed)?;
    let bytes = number.checked_mul(1 << shift).ok_or(malformed)?;
    Ok(Size { bytes, text: value })
}

/// An IPv4 address in dotted-quad form, e.g. `gw=10.0.0.1`.
pub fn parse_ipv4<'a>(key: &'static str, value: &'a str) -> Result<[u8; 4], ArgError<'a>> {
    ipv4(value).ok_or(ArgError::Malformed {
        key,
        value,
        expected: "an IPv4 address such as 10.0.0.1",
    })
}

/// An IPv4 address with a prefix length, e.g. `ip=10.0.0.2/24`.
pub fn parse_ipv4_cidr<'a>(
    key: &'static str,
    value: &'a str,
) -> Result<([u8; 4], u8), ArgError<'a>> {
    let malformed = ArgError::Malformed {
        key,
        value,
        expected: "an IPv4 address with a prefix length such as 10.0.0.2/24",
    };
    let (addr, prefix) = value.split_once('/').ok_or(malformed)?;
    let addr = ipv4(addr).ok_or(malformed)?;
    let prefix = digits(prefix).filter(|p| *p <= 32).ok_or(malformed)?;
    Ok((addr, prefix as u8))
}

fn ipv4(text: &str) -> Option<[u8; 4]> {
    let mut addr = [0u8; 4];
    let mut parts = text.split('.');
    for byte in &mut addr {
        let part = parts.next()?;
        if part.len() > 3 {
            return None;
        }
        *byte = u8::try_from(digits(part)?).ok()?;
    }
    parts.next().is_none().then_some(addr)
}

/// A size with the text it was given as, to name it in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size<'a> {
    pub bytes: u64,
    pub text: &'a str,
}

fn digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.bytes().try_fold(0u64, |acc, b| {
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}
