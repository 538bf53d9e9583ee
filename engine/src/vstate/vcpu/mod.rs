//! vCPU threads and their run-state machine.
//!
//! Each vCPU runs on its own thread and is driven over a channel: every command gets exactly
//! one response. States:
//!
//! ```text
//!            Resume                 guest writes the exit port,
//!  Paused ----------> Running ---> crashes, or Stop ---------> Exited
//!    ^                   |
//!    +------ Pause ------+   (immediate_exit + signal; pending PIO/MMIO completed)
//! ```
//!
//! A pause sets `kvm_run.immediate_exit` from a signal handler on the vCPU thread, so a
//! `KVM_RUN` that is entered after the signal returns at once, and one that was running
//! returns with `EINTR`. Before parking, the thread re-enters `KVM_RUN` with
//! `immediate_exit` set: KVM completes a pending port or MMIO read and returns without
//! running guest code, so the saved registers describe a point between two instructions.

use std::cell::Cell;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender, TryRecvError};
use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use thiserror::Error;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

mod state;
mod throttle;

use state::readable_msrs;
pub use state::VcpuState;
pub use throttle::{Throttle, Throttler, THROTTLE_SLICE};

use crate::boot::abi::{EXIT_PORT, IDLE_PORT};
use crate::boot::linux::acpi;
use crate::devices::Bus;
use crate::vstate::memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

/// The i8042 keyboard controller's command port.
const I8042_COMMAND_PORT: u16 = 0x64;
/// The i8042 command that pulses the CPU's reset line (Linux's `reboot=k`).
const I8042_PULSE_RESET: u8 = 0xfe;

/// A vCPU failed, or did not answer as the run-state machine expects.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// A KVM ioctl on the vCPU failed.
    #[error("vCPU {index}: KVM ioctl {what} failed: {source}")]
    Kvm {
        /// The vCPU.
        index: u32,
        /// The ioctl.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM set or got fewer MSRs than asked.
    #[error("vCPU {index}: KVM accepted only {set} of {total} MSRs (stopped at MSR {msr:#x})")]
    Msrs {
        /// The vCPU.
        index: u32,
        /// How many it took.
        set: usize,
        /// How many were asked.
        total: usize,
        /// The first MSR it did not take.
        msr: u32,
    },
    /// The vCPU's thread could not be started.
    #[error("vCPU {index}: cannot start its thread: {source}")]
    Spawn {
        /// The vCPU.
        index: u32,
        /// The error from spawning the thread.
        source: std::io::Error,
    },
    /// The kick signal's handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// The vCPU did not answer a command in time.
    #[error("vCPU {index}: no answer to {command} within {timeout:?}")]
    Timeout {
        /// The vCPU.
        index: u32,
        /// The command.
        command: &'static str,
        /// How long the controller waited.
        timeout: Duration,
    },
    /// The vCPU's thread has ended.
    #[error("vCPU {index}: thread is gone")]
    Gone {
        /// The vCPU.
        index: u32,
    },
    /// The command needs a paused vCPU.
    #[error("vCPU {index}: {command} is not allowed while the vCPU is running")]
    Running {
        /// The vCPU.
        index: u32,
        /// The command.
        command: &'static str,
    },
    /// The vCPU answered with something else than the command calls for.
    #[error("vCPU {index}: unexpected answer to {command}")]
    Protocol {
        /// The vCPU.
        index: u32,
        /// The command.
        command: &'static str,
    },
}

/// Commands to a vCPU thread. Each gets exactly one [`VcpuResponse`].
pub enum VcpuCommand {
    /// Stop at an instruction boundary (answer: `Paused`).
    Pause,
    /// Run the guest (answer: `Resumed`).
    Resume,
    /// Save the registers of a paused vCPU (answer: `State`).
    Save,
    /// Load registers into a paused vCPU (answer: `Restored`).
    Restore(Box<VcpuState>),
    /// End the thread (answer: `Stopped`).
    Stop,
}

/// A vCPU thread's answer to a [`VcpuCommand`].
pub enum VcpuResponse {
    /// The vCPU is paused.
    Paused,
    /// The vCPU runs.
    Resumed,
    /// The vCPU's state.
    State(Box<VcpuState>),
    /// The state was loaded.
    Restored,
    /// The thread ends.
    Stopped,
    /// The command failed.
    Error(VcpuError),
}

/// Something a vCPU reports on its own: the VM's run is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest wrote `status` to the exit port.
    GuestExit {
        /// The vCPU that wrote it.
        vcpu: u32,
        /// The exit status.
        status: u32,
    },
    /// The guest cannot go on (triple fault, KVM internal error, failed entry).
    Crashed {
        /// The vCPU that stopped.
        vcpu: u32,
        /// Why.
        message: String,
    },
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// `KVM_RUN` returned because a kick signal arrived (`EINTR`) or `immediate_exit` was set
/// before entry (`EAGAIN`).
fn interrupted(e: &kvm_ioctls::Error) -> bool {
    use rustix::io::Errno;
    e.errno() == Errno::INTR.raw_os_error() || e.errno() == Errno::AGAIN.raw_os_error()
}

// The kick is a real-time signal sent to one thread: the handler's types and
// `pthread_kill` come from libc, as rustix wraps neither (its signal API lives in its
// unstable `runtime` module).
extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU thread
        // while it owns the VcpuFd and cleared before the fd is dropped. A volatile byte
        // store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
    fence(Ordering::SeqCst);
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), handle_kick));
    result.map_err(VcpuError::Signal)
}

/// The controller's side of a vCPU thread.
pub struct VcpuHandle {
    /// The vCPU's index, from 0.
    pub index: u32,
    commands: Sender<VcpuCommand>,
    responses: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
}

/// How long the controller waits for a vCPU's answer before calling it stuck.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl VcpuHandle {
    /// Sends a command and makes sure the vCPU leaves `KVM_RUN` to read it.
    pub fn send(&self, command: VcpuCommand) -> Result<(), VcpuError> {
        self.commands
            .send(command)
            .map_err(|_| VcpuError::Gone { index: self.index })?;
        self.kick();
        Ok(())
    }

    /// The vCPU thread's pthread, for a [`Throttler`].
    pub fn pthread(&self) -> Option<libc::pthread_t> {
        use std::os::unix::thread::JoinHandleExt;
        self.thread
            .as_ref()
            .map(|t| t.as_pthread_t() as libc::pthread_t)
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // The thread has not been joined, so its pthread handle is valid; a thread that
            // already returned makes pthread_kill fail with ESRCH, which is harmless here.
            let _ = t.kill(kick_signal());
        }
    }

    /// Waits for the answer to `command`, at most [`ANSWER_TIMEOUT`].
    pub fn recv(&self, command: &'static str) -> Result<VcpuResponse, VcpuError> {
        match self.responses.recv_timeout(ANSWER_TIMEOUT) {
            Ok(VcpuResponse::Error(e)) => Err(e),
            Ok(r) => Ok(r),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(VcpuError::Timeout {
                index: self.index,
                command,
                timeout: ANSWER_TIMEOUT,
            }),
            Err(_) => Err(VcpuError::Gone { index: self.index }),
        }
    }

    /// Pauses and waits for the acknowledgement.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.send(VcpuCommand::Pause)?;
        self.expect_paused()
    }

    /// Waits for the answer to a `Pause` sent earlier.
    pub fn expect_paused(&self) -> Result<(), VcpuError> {
        match self.recv("pause")? {
            VcpuResponse::Paused => Ok(()),
            _ => Err(VcpuError::Protocol {
                index: self.index,
                command: "pause",
            }),
        }
    }

    /// Waits for the answer to a `Save` sent earlier.
    pub fn expect_state(&self) -> Result<Box<VcpuState>, VcpuError> {
        match self.recv("save")? {
            VcpuResponse::State(s) => Ok(s),
            _ => Err(VcpuError::Protocol {
                index: self.index,
                command: "save",
            }),
        }
    }

    /// Resumes and waits for the acknowledgement.
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.send(VcpuCommand::Resume)?;
        self.expect_resumed()
    }

    /// Waits for the answer to a `Resume` sent earlier.
    pub fn expect_resumed(&self) -> Result<(), VcpuError> {
        match self.recv("resume")? {
            VcpuResponse::Resumed => Ok(()),
            _ => Err(VcpuError::Protocol {
                index: self.index,
                command: "resume",
            }),
        }
    }

    /// Loads `state` into the paused vCPU and waits for the acknowledgement.
    pub fn restore(&self, state: Box<VcpuState>) -> Result<(), VcpuError> {
        self.send(VcpuCommand::Restore(state))?;
        match self.recv("restore")? {
            VcpuResponse::Restored => Ok(()),
            _ => Err(VcpuError::Protocol {
                index: self.index,
                command: "restore",
            }),
        }
    }

    /// Stops the thread and joins it.
    pub fn stop(&mut self) {
        if self.send(VcpuCommand::Stop).is_ok() {
            let _ = self.responses.recv_timeout(ANSWER_TIMEOUT);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Wakes vCPUs that wait on the idle port (a device has something for the guest).
#[derive(Clone)]
pub struct Waker(Vec<Sender<()>>);

impl Waker {
    /// Wakes every vCPU parked on the idle port.
    pub fn wake_all(&self) {
        for w in &self.0 {
            let _ = w.try_send(());
        }
    }
}

enum Flow {
    Continue,
    Stop,
}

struct VcpuThread {
    index: u32,
    fd: VcpuFd,
    /// Guest RAM, read to show the code at a RIP KVM could not emulate.
    mem: GuestMemory,
    msrs: Vec<u32>,
    bus: Arc<dyn Bus>,
    commands: Receiver<VcpuCommand>,
    responses: Sender<VcpuResponse>,
    events: Sender<VcpuEvent>,
    wake: Receiver<()>,
    exited: bool,
    throttle: Arc<Throttle>,
    /// The last throttle tick this vCPU saw.
    tick: u64,
}

/// Creates `count` vCPUs with the host's supported CPUID (each with its own APIC id).
pub fn create_all(
    vm: &kvm_ioctls::VmFd,
    cpuid: &CpuId,
    count: u32,
) -> Result<Vec<VcpuFd>, VcpuError> {
    (0..count)
        .map(|index| {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(|source| VcpuError::Kvm {
                    index,
                    what: "KVM_CREATE_VCPU",
                    source,
                })?;
            let mut cpuid = cpuid.clone();
            set_apic_id(&mut cpuid, index);
            fd.set_cpuid2(&cpuid).map_err(|source| VcpuError::Kvm {
                index,
                what: "KVM_SET_CPUID2",
                source,
            })?;
            Ok(fd)
        })
        .collect()
}

/// Starts one thread per vCPU, each parked (Paused) until its first Resume. Returns the
/// handles and a waker for vCPUs waiting on the idle port.
pub fn spawn_all(
    mem: &GuestMemory,
    fds: Vec<VcpuFd>,
    msr_list: &[u32],
    bus: Arc<dyn Bus>,
    events: Sender<VcpuEvent>,
    throttle: Arc<Throttle>,
) -> Result<(Vec<VcpuHandle>, Waker), VcpuError> {
    install_kick_handler()?;
    let mut handles = Vec::new();
    let mut wakers = Vec::new();
    for (index, fd) in fds.into_iter().enumerate() {
        let index = index as u32;
        let msrs = readable_msrs(&fd, index, msr_list)?;
        let (cmd_tx, cmd_rx) = unbounded();
        let (resp_tx, resp_rx) = unbounded();
        let (wake_tx, wake_rx) = bounded(1);
        let thread = VcpuThread {
            index,
            fd,
            mem: mem.clone(),
            msrs,
            bus: Arc::clone(&bus),
            commands: cmd_rx,
            responses: resp_tx,
            events: events.clone(),
            wake: wake_rx,
            exited: false,
            throttle: Arc::clone(&throttle),
            tick: 0,
        };
        let join = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || thread.run())
            .map_err(|source| VcpuError::Spawn { index, source })?;
        handles.push(VcpuHandle {
            index,
            commands: cmd_tx,
            responses: resp_rx,
            thread: Some(join),
        });
        wakers.push(wake_tx);
    }
    Ok((handles, Waker(wakers)))
}

/// Gives each vCPU its own APIC id in CPUID leaves 0x1 and 0xb.
fn set_apic_id(cpuid: &mut CpuId, index: u32) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
}

impl VcpuThread {
    fn err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Kvm {
            index,
            what,
            source,
        }
    }

    fn run(mut self) {
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run()));
        if let Flow::Continue = self.park() {
            self.run_loop();
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }

    fn run_loop(&mut self) {
        loop {
            match self.commands.try_recv() {
                Ok(cmd) => {
                    if let Flow::Stop = self.handle_running(cmd) {
                        return;
                    }
                    continue;
                }
                Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => {}
            }
            if self.exited {
                if let Flow::Stop = self.park() {
                    return;
                }
                continue;
            }
            if let Some(hold) = self.throttle.due(&mut self.tick) {
                if let Flow::Stop = self.throttle_hold(hold) {
                    return;
                }
                continue;
            }
            if let Flow::Stop = self.run_once() {
                return;
            }
        }
    }

    fn reply(&self, r: VcpuResponse) {
        let _ = self.responses.send(r);
    }

    /// A command that arrives while the vCPU runs.
    fn handle_running(&mut self, cmd: VcpuCommand) -> Flow {
        match cmd {
            VcpuCommand::Pause => {
                self.complete_pending_io();
                self.reply(VcpuResponse::Paused);
                self.park()
            }
            VcpuCommand::Resume => {
                self.reply(VcpuResponse::Resumed);
                Flow::Continue
            }
            VcpuCommand::Save => {
                self.reply(VcpuResponse::Error(VcpuError::Running {
                    index: self.index,
                    command: "save",
                }));
                Flow::Continue
            }
            VcpuCommand::Restore(_) => {
                self.reply(VcpuResponse::Error(VcpuError::Running {
                    index: self.index,
                    command: "restore",
                }));
                Flow::Continue
            }
            VcpuCommand::Stop => {
                self.reply(VcpuResponse::Stopped);
                Flow::Stop
            }
        }
    }

    /// Paused (or exited): answers commands until Resume or Stop.
    fn park(&mut self) -> Flow {
        while let Ok(cmd) = self.commands.recv() {
            match cmd {
                VcpuCommand::Pause => self.reply(VcpuResponse::Paused),
                VcpuCommand::Save => match self.save() {
                    Ok(s) => self.reply(VcpuResponse::State(Box::new(s))),
                    Err(e) => self.reply(VcpuResponse::Error(e)),
                },
                VcpuCommand::Restore(s) => match self.restore(&s) {
                    Ok(()) => {
                        self.exited = false;
                        self.reply(VcpuResponse::Restored)
                    }
                    Err(e) => self.reply(VcpuResponse::Error(e)),
                },
                VcpuCommand::Resume => {
                    self.reply(VcpuResponse::Resumed);
                    return Flow::Continue;
                }
                VcpuCommand::Stop => {
                    self.reply(VcpuResponse::Stopped);
                    return Flow::Stop;
                }
            }
        }
        Flow::Stop
    }

    /// Re-enters KVM_RUN with immediate_exit set: KVM finishes a pending PIO/MMIO read
    /// (writes the data into the guest's registers, advances RIP) and returns EINTR without
    /// running guest code.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if interrupted(&e) => {}
            Ok(_) => crate::warn!(
                "vCPU {}: unexpected exit while completing I/O before a pause",
                self.index
            ),
            Err(e) => crate::warn!(
                "vCPU {}: KVM_RUN failed while completing I/O: {e}",
                self.index
            ),
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    fn crash(&mut self, message: String) {
        self.exited = true;
        let _ = self.events.send(VcpuEvent::Crashed {
            vcpu: self.index,
            message,
        });
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    fn run_once(&mut self) -> Flow {
        let bus = Arc::clone(&self.bus);
        let mut idle = None;
        let mut exit_status = None;
        let mut crash = None;
        let mut stopped = None;
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(EXIT_PORT, data) => exit_status = Some(le_u32(data)),
                VcpuExit::IoOut(IDLE_PORT, data) => idle = Some(le_u32(data)),
                VcpuExit::IoOut(acpi::SLEEP_CONTROL_PORT, &[v])
                    if v & acpi::SLP_EN != 0 && (v >> 2) & 7 == acpi::S5_SLEEP_TYPE =>
                {
                    crate::info!(
                        "vCPU {}: the guest powered off (ACPI S5): stopping",
                        self.index
                    );
                    exit_status = Some(0);
                }
                VcpuExit::IoOut(I8042_COMMAND_PORT, [I8042_PULSE_RESET]) => {
                    crate::info!(
                        "vCPU {}: the guest reset the machine (i8042 pulse reset): stopping",
                        self.index
                    );
                    exit_status = Some(0);
                }
                VcpuExit::IoOut(port, data) => bus.pio_write(port, data),
                VcpuExit::IoIn(port, data) => bus.pio_read(port, data),
                VcpuExit::MmioRead(addr, data) => bus.mmio_read(addr, data),
                VcpuExit::MmioWrite(addr, data) => bus.mmio_write(addr, data),
                VcpuExit::Hlt => crash = Some("halted (hlt at CPL0)".to_string()),
                VcpuExit::InternalError => stopped = Some(self.internal_error()),
                VcpuExit::Shutdown => crash = Some("triple fault (shutdown exit)".to_string()),
                VcpuExit::FailEntry(reason, cpu) => {
                    crash = Some(format!(
                        "VM entry failed: hardware reason {reason:#x} on host cpu {cpu}"
                    ))
                }
                VcpuExit::SystemEvent(kind, _) => crash = Some(format!("system event {kind}")),
                VcpuExit::Intr => {}
                // KVM_EXIT_DIRTY_RING_FULL: the guest waits until the next harvest resets
                // the ring (that is the throttle keeping memory bounded).
                VcpuExit::Unsupported(31) => std::thread::sleep(Duration::from_micros(500)),
                other => crash = Some(format!("unhandled exit {other:?}")),
            },
            Err(e) if interrupted(&e) => {
                self.fd.set_kvm_immediate_exit(0);
            }
            Err(e) => crash = Some(format!("KVM_RUN failed: {e}")),
        }
        if let Some(message) = crash {
            let rip = self.rip();
            self.crash(format!("guest crashed at RIP={rip:#x}: {message}"));
        } else if let Some(message) = stopped {
            self.crash(message);
        } else if let Some(status) = exit_status {
            self.exited = true;
            let _ = self.events.send(VcpuEvent::GuestExit {
                vcpu: self.index,
                status,
            });
        } else if let Some(us) = idle {
            return self.idle(Duration::from_micros(u64::from(us)));
        }
        Flow::Continue
    }

    /// The one line that says why KVM stopped the guest with `KVM_EXIT_INTERNAL_ERROR`:
    /// for an emulation failure (suberror 1), the instruction KVM could not emulate is at
    /// RIP (a guest-virtual address).
    fn internal_error(&mut self) -> String {
        const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
        // SAFETY: KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
        // member KVM filled; it is plain integers, valid for any bit pattern.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let rip = self.rip();
        if suberror == KVM_INTERNAL_ERROR_EMULATION {
            let code: Vec<String> = self
                .code_at(rip)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let code = match code.is_empty() {
                true => String::new(),
                false => format!("code {}; ", code.join(" ")),
            };
            format!(
                "guest stopped: KVM could not emulate the instruction at RIP={rip:#x} \
                 ({code}KVM_EXIT_INTERNAL_ERROR, suberror 1: emulation failure)"
            )
        } else {
            format!(
                "guest stopped: KVM internal error at RIP={rip:#x} (KVM_EXIT_INTERNAL_ERROR, \
                 suberror {suberror})"
            )
        }
    }

    /// The 15 bytes (the longest x86 instruction) at guest-virtual `rip`, each translated by
    /// KVM's walk of the guest's page tables (`KVM_TRANSLATE`); fewer where the walk ends.
    fn code_at(&self, rip: u64) -> Vec<u8> {
        let mut code = Vec::with_capacity(15);
        for gva in (0..15).map(|i| rip.wrapping_add(i)) {
            let Ok(t) = self.fd.translate_gva(gva) else {
                break;
            };
            let mut byte = [0u8];
            if t.valid == 0
                || self
                    .mem
                    .read_slice(&mut byte, GuestAddress(t.physical_address))
                    .is_err()
            {
                break;
            }
            code.push(byte[0]);
        }
        code
    }

    /// Sits out a throttle sleep, answering commands at once (any command ends the
    /// sleep; a pause parks the vCPU), and ending early when the throttle is lifted.
    fn throttle_hold(&mut self, hold: Duration) -> Flow {
        let until = std::time::Instant::now() + hold;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || self.throttle.percent() == 0 {
                return Flow::Continue;
            }
            select! {
                recv(self.commands) -> cmd => return match cmd {
                    Ok(cmd) => self.handle_running(cmd),
                    Err(_) => Flow::Stop,
                },
                default(left.min(THROTTLE_SLICE)) => {}
            }
        }
    }

    /// The guest's `hlt`: wait for a device event, a command or the timeout.
    fn idle(&mut self, timeout: Duration) -> Flow {
        select! {
            recv(self.commands) -> cmd => match cmd {
                Ok(cmd) => self.handle_running(cmd),
                Err(_) => Flow::Stop,
            },
            recv(self.wake) -> _ => Flow::Continue,
            default(timeout) => Flow::Continue,
        }
    }
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}
