//! The 16550 UART at 0x3f8 (vm-superio), writing the guest's console to stdout or a file.
//!
//! The reference guest polls the line status register and takes no interrupts: its UART
//! has no interrupt line. A Linux guest's UART raises IRQ 4 (COM1's ISA line) through an
//! irqfd. Output is buffered per line: vm-superio flushes after every byte, which would
//! cost a syscall per character.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// The console or the UART state could not be set up.
#[derive(Debug, Error)]
pub enum SerialError {
    /// The console file could not be opened.
    #[error("cannot open console file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The error from the file system.
        source: io::Error,
    },
    /// A saved UART state does not fit a 16550.
    #[error("serial state has {0} bytes of input, more than the 16550 FIFO holds")]
    BadState(usize),
}

/// Where the guest's serial output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Console {
    /// The host's standard output.
    Stdout,
    /// A file, appended to.
    File(PathBuf),
    /// Nowhere.
    Null,
}

impl Console {
    /// Parses `--console`: `stdout`, `none` (or `null`), or a file path.
    pub fn parse(s: &str) -> Console {
        match s {
            "stdout" => Console::Stdout,
            "none" | "null" => Console::Null,
            path => Console::File(PathBuf::from(path)),
        }
    }

    /// Opens the console; `append` keeps what an earlier run wrote to the file.
    fn open(&self, append: bool) -> Result<ConsoleWriter, SerialError> {
        let out: Box<dyn Write + Send> = match self {
            Console::Stdout => Box::new(io::stdout()),
            Console::Null => Box::new(io::sink()),
            Console::File(path) => Box::new(open_file(path, append)?),
        };
        Ok(ConsoleWriter {
            out,
            line: Vec::with_capacity(256),
            shared: matches!(self, Console::Stdout),
            mid_line: false,
        })
    }
}

fn open_file(path: &Path, append: bool) -> Result<File, SerialError> {
    let mut o = OpenOptions::new();
    o.create(true);
    if append {
        o.append(true);
    } else {
        o.write(true).truncate(true);
    }
    o.open(path).map_err(|source| SerialError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Buffers until a newline; `flush` from the UART is ignored, [`ConsoleWriter::flush_now`]
/// and drop write out the rest.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    /// Stdout, which lockstep's own lines (`final epoch=...`) share.
    shared: bool,
    /// What was written out last did not end a line.
    mid_line: bool,
}

impl ConsoleWriter {
    /// Writes out what is buffered; on stdout, a line the guest left unfinished is ended,
    /// so that what lockstep prints next starts a line of its own.
    pub fn finish_line(&mut self) {
        self.flush_now();
        if self.shared && self.mid_line {
            let _ = self.out.write_all(b"\n");
            let _ = self.out.flush();
            self.mid_line = false;
        }
    }

    /// Writes out what is buffered, even without a full line.
    pub fn flush_now(&mut self) {
        if let Some(&last) = self.line.last() {
            // The console is best effort: a closed stdout must not stop the guest.
            let _ = self.out.write_all(&self.line);
            self.mid_line = last != b'\n';
            self.line.clear();
        }
        let _ = self.out.flush();
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.line.len() >= 4096 {
            self.flush_now();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        self.flush_now();
    }
}

/// The UART's interrupt line: an eventfd registered as an irqfd, or none (the guest polls).
pub struct SerialIrq(pub Option<vmm_sys_util::eventfd::EventFd>);

impl Trigger for SerialIrq {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        match &self.0 {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }
}

/// The 16550 UART on COM1 (vm-superio), with its interrupt line if the guest has one.
pub struct SerialDevice {
    uart: Serial<SerialIrq, NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    /// A reset UART writing to `console`.
    pub fn new(console: &Console, irq: SerialIrq) -> Result<SerialDevice, SerialError> {
        Ok(SerialDevice {
            uart: Serial::new(irq, console.open(false)?),
        })
    }

    /// A UART in a saved state; output is appended to the console.
    pub fn restore(
        console: &Console,
        state: &SerialState,
        irq: SerialIrq,
    ) -> Result<SerialDevice, SerialError> {
        let uart = Serial::from_state(state, irq, NoEvents, console.open(true)?)
            .map_err(|_| SerialError::BadState(state.in_buffer.len()))?;
        Ok(SerialDevice { uart })
    }

    /// A guest read of the register at `offset` from the base port.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// A guest write of `value` to the register at `offset` from the base port.
    pub fn write(&mut self, offset: u8, value: u8) {
        // A write error means the console is gone; the guest keeps running.
        let _ = self.uart.write(offset, value);
    }

    /// The UART's registers and buffered input, for a checkpoint.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// Writes out the console's buffered output (ending an unfinished line on stdout).
    pub fn flush(&mut self) {
        self.uart.writer_mut().finish_line();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn writer(shared: bool) -> (ConsoleWriter, Shared) {
        let out = Shared::default();
        let w = ConsoleWriter {
            out: Box::new(out.clone()),
            line: Vec::new(),
            shared,
            mid_line: false,
        };
        (w, out)
    }

    #[test]
    fn an_unfinished_line_on_stdout_is_ended_before_lockstep_prints() {
        // Byte by byte, as the UART writes, and all at once.
        for chunks in [
            &[&b"done\ndirty: ms=3000 pages"[..]][..],
            &[&b"d"[..], &b"\n"[..], &b"x"[..]][..],
        ] {
            let (mut w, out) = writer(true);
            for c in chunks {
                w.write_all(c).unwrap();
            }
            w.finish_line();
            let text = out.0.lock().unwrap().clone();
            assert!(text.ends_with(b"pages\n") || text == b"d\nx\n", "{text:?}");
            w.finish_line();
            assert_eq!(
                *out.0.lock().unwrap(),
                text,
                "a finished line is not ended twice"
            );
        }
        // A file gets the guest's bytes as they are.
        let (mut f, out) = writer(false);
        f.write_all(b"partial").unwrap();
        f.finish_line();
        assert_eq!(*out.0.lock().unwrap(), b"partial");
    }
}
