//! A running VM: KVM, guest memory, devices and vCPU threads, with the operations every
//! role needs — boot, pause, capture, restore, resume.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver};
use kvm_ioctls::VcpuFd;
use thiserror::Error;

use crate::boot::linux::{self as linux_boot, LinuxBoot, LinuxBootError};
use crate::boot::{self, BootError, BootParams};
use crate::devices::disk::{BlockDevice, DiskConfig, DiskError};
use crate::devices::serial::{Console, SerialDevice, SerialError, SerialIrq};
use crate::devices::tap::TapError;
use crate::devices::{disk_base, lock, Bus, Devices, NetConfig, NetDevice};
use crate::persist::state::MachineState;
use crate::vstate::dirty::{DirtyError, DirtySet, DirtyTracker};
use crate::vstate::dirty_ring::DirtyRing;
use crate::vstate::memory::{self, GuestMemory, MemoryError};
use crate::vstate::vcpu::{
    self, Throttle, Throttler, VcpuCommand, VcpuError, VcpuEvent, VcpuHandle, Waker,
};
use crate::vstate::vm::{Vm, VmError};

/// Building, running, capturing or restoring a machine failed.
#[derive(Debug, Error)]
pub enum MachineError {
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The VM could not be created, or its state saved or restored.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU failed or did not answer.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The guest could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The Linux kernel could not be loaded.
    #[error(transparent)]
    LinuxBoot(#[from] LinuxBootError),
    /// An interrupt line could not be wired (an eventfd, or `KVM_IRQFD`).
    #[error("cannot wire IRQ {gsi} ({what}): {source}")]
    Irq {
        /// The GSI.
        gsi: u32,
        /// The device.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A saved CPUID is not one KVM takes.
    #[error("cannot restore: the saved CPUID has {0} entries, more than KVM takes")]
    Cpuid(usize),
    /// The serial console could not be set up.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// A captured state is for another RAM size than the memory given (both in bytes).
    #[error("cannot restore: state is for {state} bytes of RAM, memory has {memory}")]
    RamSize {
        /// Bytes of RAM the state is for.
        state: u64,
        /// Bytes of RAM the memory has.
        memory: u64,
    },
    /// A combination of options this machine does not offer (yet).
    #[error("{0}")]
    Unsupported(&'static str),
    /// The saved devices do not fit the devices configured now.
    #[error("cannot restore: {0}")]
    Restore(#[from] crate::devices::DevicesRestoreError),
    /// Dirty-page tracking failed.
    #[error("dirty-page tracking: {0}")]
    Dirty(#[from] DirtyError),
    /// The tap device could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] DiskError),
}

/// What a machine is made of.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// Bytes of guest RAM (a multiple of 4 KiB).
    pub mem_size: u64,
    /// How many vCPUs.
    pub vcpus: u32,
    /// Where the serial console writes.
    pub console: Console,
    /// The virtio-net device, if any.
    pub net: Option<NetConfig>,
    /// The virtio-blk devices (`--disk`), in order.
    pub disks: Vec<DiskConfig>,
    /// Track dirty pages with a dirty ring of this many entries per vCPU (else the bitmap).
    pub dirty_ring: Option<u32>,
}

/// What a machine runs; it decides how the devices are wired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// The reference guest: entered at CPL3, polls its devices, takes no interrupts.
    Reference,
    /// A Linux kernel: the 16550 on IRQ 4 and virtio-mmio device `i` on IRQ
    /// [`LINUX_VIRTIO_IRQ`]` + i`, each through an irqfd into the in-kernel PIC and IOAPIC
    /// (KVM's default routing: GSI n is PIC pin n for n < 16 and IOAPIC pin n).
    Linux,
}

impl Platform {
    /// Its number in the state format.
    pub fn code(self) -> u32 {
        match self {
            Platform::Reference => 0,
            Platform::Linux => 1,
        }
    }

    /// The platform of a state-format number.
    pub fn from_code(code: u32) -> Option<Platform> {
        match code {
            0 => Some(Platform::Reference),
            1 => Some(Platform::Linux),
            _ => None,
        }
    }
}

/// COM1's ISA interrupt line.
pub const LINUX_SERIAL_IRQ: u32 = 4;
/// The first virtio-mmio device's interrupt line (the next device takes the next line).
pub const LINUX_VIRTIO_IRQ: u32 = 5;

/// The guest a machine boots.
#[derive(Clone, Debug)]
pub enum Guest {
    /// The reference guest or another ELF built to its contract ([`crate::boot::abi`]).
    Reference {
        /// The ELF image (the built-in guest is [`crate::BUILTIN_GUEST`]).
        image: Vec<u8>,
        /// The guest's command line, handed to it in the boot info.
        args: String,
    },
    /// A Linux kernel with its initramfs and command line.
    Linux(LinuxBoot),
}

/// A machine to boot: its shape and its guest.
#[derive(Clone, Debug)]
pub struct BootConfig {
    /// The guest.
    pub guest: Guest,
    /// The machine's shape.
    pub machine: MachineConfig,
}

/// How long the last pause took, from the request until every vCPU acknowledged.
#[derive(Clone, Copy, Debug, Default)]
pub struct PauseTiming {
    /// Until every vCPU was parked.
    pub parked: Duration,
    /// Until the state was captured too (equal to `parked` without capture).
    pub captured: Duration,
}

/// A VM: KVM, guest memory, devices, vCPU threads, and how its dirty pages are tracked.
pub struct Machine {
    // Declared before the vCPUs: the throttler signals their threads, so it must stop
    // before they are joined.
    throttler: Option<Throttler>,
    throttle: Arc<Throttle>,
    // Dropping the handles stops and joins the vCPU threads (which own the vCPU fds and
    // use the memory) before the VM and memory go away.
    vcpus: Vec<VcpuHandle>,
    events: Receiver<VcpuEvent>,
    devices: Arc<Devices>,
    waker: Waker,
    vm: Vm,
    platform: Platform,
    /// The CPUID every vCPU was given (before its APIC id was set).
    cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    running: bool,
    resume_acks_pending: bool,
    /// Who tracks the dirty pages: the bitmap, or the vCPUs' dirty rings.
    dirty: DirtyTracker,
}

/// How a new machine tracks dirty pages: `ring` entries of a dirty ring per vCPU, or the
/// VM's dirty bitmap.
fn dirty_tracker(
    vm: &Vm,
    fds: &[kvm_ioctls::VcpuFd],
    ring: Option<u32>,
) -> Result<DirtyTracker, MachineError> {
    Ok(match ring {
        Some(entries) => DirtyTracker::Ring(std::sync::Mutex::new(
            fds.iter()
                .enumerate()
                .map(|(i, fd)| DirtyRing::map(fd, i as u32, entries))
                .collect::<Result<Vec<_>, _>>()
                .map_err(DirtyError::from)?,
        )),
        None => DirtyTracker::Bitmap(vm.dirty_log()),
    })
}

impl Machine {
    /// Creates the VM, loads `image` and sets every vCPU at the guest's entry, paused.
    pub fn boot(cfg: &MachineConfig, image: &[u8], cmdline: &str) -> Result<Machine, MachineError> {
        let vm = Vm::with_dirty_ring(memory::create(cfg.mem_size)?, cfg.dirty_ring)?;
        let cpuid = vm.supported_cpuid()?;
        let kvmclock = has_kvmclock(&cpuid);
        let fds = vcpu::create_all(vm.fd(), &cpuid, cfg.vcpus)?;
        let dirty = dirty_tracker(&vm, &fds, cfg.dirty_ring)?;
        let tsc_khz = fds[0].get_tsc_khz().map_err(|source| VcpuError::Kvm {
            index: 0,
            what: "KVM_GET_TSC_KHZ",
            source,
        })?;
        let net = cfg
            .net
            .as_ref()
            .map(|n| NetDevice::new(n, vm.memory().clone()))
            .transpose()?;
        let disks = open_disks(&cfg.disks, vm.memory())?;
        let virtio: Vec<_> = net
            .iter()
            .map(NetDevice::info)
            .chain(disks.iter().map(BlockDevice::info))
            .collect();
        let params = BootParams {
            cmdline,
            vcpu_count: cfg.vcpus,
            tsc_khz: u64::from(tsc_khz),
            kvmclock,
            virtio: &virtio,
        };
        let loaded = boot::load(vm.memory(), image, &params)?;
        for (index, fd) in fds.iter().enumerate() {
            set_boot_registers(fd, index as u32, loaded.entry)?;
            if kvmclock {
                enable_kvmclock(fd, index as u32)?;
            }
        }
        let devices = Arc::new(Devices {
            serial: std::sync::Mutex::new(SerialDevice::new(&cfg.console, SerialIrq(None))?),
            net,
            disks,
        });
        let mut machine = Machine::assemble(vm, fds, devices, Platform::Reference, &cpuid)?;
        machine.dirty = dirty;
        Ok(machine)
    }

    /// Boots what `cfg` says: the reference guest or a Linux kernel.
    pub fn start(cfg: &BootConfig) -> Result<Machine, MachineError> {
        match &cfg.guest {
            Guest::Reference { image, args } => Machine::boot(&cfg.machine, image, args),
            Guest::Linux(boot) => Machine::boot_linux(&cfg.machine, boot),
        }
    }

    /// Creates the VM, loads a Linux kernel (and its initramfs) and sets the boot vCPU at
    /// the kernel's entry, paused; the other vCPUs wait for the kernel's INIT/SIPI. The
    /// virtio devices are in the ACPI tables' DSDT, and the command line gets a
    /// `virtio_mmio.device=` entry for each (read by kernels built with
    /// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, which need no ACPI).
    pub fn boot_linux(cfg: &MachineConfig, boot: &LinuxBoot) -> Result<Machine, MachineError> {
        if !cfg.disks.is_empty() {
            // The virtio-blk device's interrupt line and ACPI entry for a Linux guest are
            // not wired yet (the reference guest polls).
            return Err(MachineError::Unsupported(
                "--disk is not available with --kernel yet (the reference guest only)",
            ));
        }
        let vm = Vm::with_dirty_ring(memory::create(cfg.mem_size)?, cfg.dirty_ring)?;
        let cpuid = linux_boot::cpu::linux_cpuid(vm.supported_cpuid()?, cfg.vcpus);
        let fds = vcpu::create_all(vm.fd(), &cpuid, cfg.vcpus)?;
        let dirty = dirty_tracker(&vm, &fds, cfg.dirty_ring)?;
        let net = cfg
            .net
            .as_ref()
            .map(|n| NetDevice::new(n, vm.memory().clone()))
            .transpose()?;
        let mut cmdline = boot.cmdline.clone();
        for (i, n) in net.iter().enumerate() {
            let info = n.info();
            cmdline.push_str(&format!(
                " virtio_mmio.device={}K@{:#x}:{}",
                info.size >> 10,
                info.base,
                LINUX_VIRTIO_IRQ + i as u32
            ));
        }
        let cmdline = cmdline.trim_start().to_string();
        let acpi_devices: Vec<_> = net
            .iter()
            .enumerate()
            .map(|(i, n)| linux_boot::acpi::MmioDevice {
                base: n.info().base,
                size: n.info().size,
                irq: LINUX_VIRTIO_IRQ + i as u32,
            })
            .collect();
        let loaded = linux_boot::load(vm.memory(), boot, &cmdline, cfg.vcpus, &acpi_devices)?;
        crate::info!(
            "Linux kernel ({}, {}); command line of {} bytes; initramfs {}",
            loaded.format,
            loaded.entry,
            cmdline.len(),
            loaded
                .initramfs
                .map_or("none".to_string(), |(a, s)| format!("{s} bytes at {a:#x}"))
        );
        set_linux_boot_registers(&fds[0], &loaded.entry)?;
        let serial = linux_irqs(&vm, net.as_ref())?;
        let devices = Arc::new(Devices {
            serial: std::sync::Mutex::new(SerialDevice::new(&cfg.console, serial)?),
            net,
            disks: Vec::new(),
        });
        let mut machine = Machine::assemble(vm, fds, devices, Platform::Linux, &cpuid)?;
        machine.dirty = dirty;
        Ok(machine)
    }

    /// Creates a VM from a captured state and guest RAM that already holds that state's
    /// memory. Paused.
    pub fn restore(
        state: &MachineState,
        console: &Console,
        net: Option<&NetConfig>,
        disks: &[DiskConfig],
        memory: GuestMemory,
    ) -> Result<Machine, MachineError> {
        let ram = memory::ram_size(&memory);
        if ram != state.mem_size {
            return Err(MachineError::RamSize {
                state: state.mem_size,
                memory: ram,
            });
        }
        let vm = Vm::new(memory)?;
        vm.restore_state(&state.vm)?;
        let cpuid = kvm_bindings::CpuId::from_entries(&state.cpuid)
            .map_err(|_| MachineError::Cpuid(state.cpuid.len()))?;
        let fds = vcpu::create_all(vm.fd(), &cpuid, state.vcpus.len() as u32)?;
        let net = net
            .map(|n| NetDevice::new(n, vm.memory().clone()))
            .transpose()?;
        let disks = open_disks(disks, vm.memory())?;
        let serial = match state.platform {
            Platform::Reference => SerialIrq(None),
            Platform::Linux => linux_irqs(&vm, net.as_ref())?,
        };
        let devices = Arc::new(Devices {
            serial: std::sync::Mutex::new(SerialDevice::restore(console, &state.serial, serial)?),
            net,
            disks,
        });
        devices.restore_virtio(&state.virtio)?;
        let machine = Machine::assemble(vm, fds, devices, state.platform, &cpuid)?;
        for (h, s) in machine.vcpus.iter().zip(&state.vcpus) {
            h.restore(Box::new(s.clone()))?;
        }
        Ok(machine)
    }

    fn assemble(
        vm: Vm,
        fds: Vec<VcpuFd>,
        devices: Arc<Devices>,
        platform: Platform,
        cpuid: &kvm_bindings::CpuId,
    ) -> Result<Machine, MachineError> {
        let (events_tx, events) = unbounded();
        let bus: Arc<dyn Bus> = devices.clone();
        let throttle = Arc::new(Throttle::default());
        let (vcpus, waker) = vcpu::spawn_all(
            vm.memory(),
            fds,
            vm.msr_list(),
            bus,
            events_tx,
            Arc::clone(&throttle),
        )?;
        if let Some(n) = &devices.net {
            n.start(waker.clone());
        }
        for d in &devices.disks {
            d.start(waker.clone());
        }
        Ok(Machine {
            throttler: None,
            throttle,
            vcpus,
            events,
            devices,
            waker,
            running: false,
            resume_acks_pending: false,
            dirty: DirtyTracker::Bitmap(vm.dirty_log()),
            vm,
            platform,
            cpuid: cpuid.as_slice().to_vec(),
        })
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemory {
        self.vm.memory()
    }

    /// Replaces `set` with every page dirtied since the last harvest, by the dirty ring
    /// or the bitmap, whichever the machine was created with, ORed with the pages the VMM
    /// and devices wrote.
    pub fn harvest(&self, set: &mut DirtySet) -> Result<(), MachineError> {
        Ok(self.dirty.harvest(self.vm.fd(), self.memory(), set)?)
    }

    /// How many pages the guest dirtied since the last harvest, counted without harvesting
    /// them; `None` where that cannot be done without a harvest (the dirty ring, or a
    /// kernel without manual dirty-log protect). There the ring's size bounds what one
    /// epoch can hold instead: a full ring stops its vCPU until the next harvest.
    pub fn dirty_count(&self) -> Result<Option<u64>, MachineError> {
        Ok(self.dirty.count(self.vm.fd(), self.memory())?)
    }

    /// Holds the running vCPUs for `pct`% of the time (0 = never, at most 99), in slices
    /// of [`vcpu::THROTTLE_SLICE`] of run: pre-copy's auto-converge.
    pub fn set_throttle(&mut self, pct: u32) {
        if pct > 0 && self.throttler.is_none() {
            let threads = self.vcpus.iter().filter_map(VcpuHandle::pthread).collect();
            self.throttler = Some(Throttler::start(Arc::clone(&self.throttle), threads));
        }
        if let Some(t) = &self.throttler {
            t.set(pct);
        }
    }

    /// The share of time the vCPUs are held (see [`Machine::set_throttle`]).
    pub fn throttle(&self) -> u32 {
        self.throttle.percent()
    }

    /// What the machine runs.
    pub fn platform(&self) -> Platform {
        self.platform
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// How many vCPUs the machine has.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Wakes vCPUs waiting on the idle port.
    pub fn waker(&self) -> &Waker {
        &self.waker
    }

    /// Whether the vCPUs were last told to run (not paused).
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Starts or continues every vCPU and waits for every acknowledgement.
    pub fn resume(&mut self) -> Result<(), MachineError> {
        self.resume_nowait()?;
        self.collect_resume_acks()
    }

    /// Starts or continues every vCPU without waiting for the acknowledgements: the
    /// guest runs as soon as each vCPU thread reads the command. The acks are collected
    /// by the next pause, capture or resume (each command still gets its answer).
    pub fn resume_nowait(&mut self) -> Result<(), MachineError> {
        self.collect_resume_acks()?;
        self.devices.thaw();
        for h in &self.vcpus {
            h.send(VcpuCommand::Resume)?;
        }
        self.resume_acks_pending = true;
        self.running = true;
        Ok(())
    }

    fn collect_resume_acks(&mut self) -> Result<(), MachineError> {
        if std::mem::take(&mut self.resume_acks_pending) {
            for h in &self.vcpus {
                h.expect_resumed()?;
            }
        }
        Ok(())
    }

    /// Stops every vCPU at an instruction boundary; returns once all have acknowledged.
    pub fn pause(&mut self) -> Result<PauseTiming, MachineError> {
        self.collect_resume_acks()?;
        let start = Instant::now();
        for h in &self.vcpus {
            h.send(VcpuCommand::Pause)?;
        }
        for h in &self.vcpus {
            h.expect_paused()?;
        }
        self.devices.freeze();
        self.running = false;
        let parked = start.elapsed();
        Ok(PauseTiming {
            parked,
            captured: parked,
        })
    }

    /// Pauses and captures the whole machine state. The capture is pipelined: each vCPU
    /// thread saves its own registers right after parking.
    pub fn pause_and_capture(&mut self) -> Result<(MachineState, PauseTiming), MachineError> {
        self.collect_resume_acks()?;
        let start = Instant::now();
        for h in &self.vcpus {
            h.send(VcpuCommand::Pause)?;
            h.send(VcpuCommand::Save)?;
        }
        for h in &self.vcpus {
            h.expect_paused()?;
        }
        self.devices.freeze();
        self.running = false;
        let parked = start.elapsed();
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for h in &self.vcpus {
            vcpus.push(*h.expect_state()?);
        }
        let state = self.capture_rest(vcpus)?;
        Ok((
            state,
            PauseTiming {
                parked,
                captured: start.elapsed(),
            },
        ))
    }

    /// Captures the state of a paused machine.
    pub fn capture(&self) -> Result<MachineState, MachineError> {
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for h in &self.vcpus {
            h.send(VcpuCommand::Save)?;
            vcpus.push(*h.expect_state()?);
        }
        self.capture_rest(vcpus)
    }

    fn capture_rest(&self, vcpus: Vec<vcpu::VcpuState>) -> Result<MachineState, MachineError> {
        Ok(MachineState {
            platform: self.platform,
            cpuid: self.cpuid.clone(),
            mem_size: memory::ram_size(self.memory()),
            vcpus,
            vm: self.vm.save_state()?,
            serial: lock(&self.devices.serial).state(),
            virtio: self.devices.save_virtio(),
        })
    }

    /// The next thing a vCPU reported (guest exit or crash), if any within `timeout`.
    pub fn wait_event(&self, timeout: Duration) -> Option<VcpuEvent> {
        if timeout.is_zero() {
            // A look without waiting: the channel's timed wait would set up a blocking
            // receive for nothing (pre-copy looks once a step).
            return self.events.try_recv().ok();
        }
        self.events.recv_timeout(timeout).ok()
    }

    /// As [`wait_event`](Self::wait_event), but also returns (with `None`) as soon as
    /// `wake` has a message, which it takes.
    pub fn wait_event_or(&self, wake: &Receiver<()>, timeout: Duration) -> Option<VcpuEvent> {
        if timeout.is_zero() {
            return self.events.try_recv().ok();
        }
        crossbeam_channel::select! {
            recv(self.events) -> e => e.ok(),
            recv(wake) -> _ => None,
            default(timeout) => None,
        }
    }

    /// The virtio-net device, if the machine has one.
    pub fn net(&self) -> Option<&NetDevice> {
        self.devices.net.as_ref()
    }

    /// The virtio-blk devices, in `--disk` order.
    pub fn disks(&self) -> &[BlockDevice] {
        &self.devices.disks
    }

    /// Writes out the serial console's buffered output.
    pub fn flush_console(&self) {
        lock(&self.devices.serial).flush();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.flush_console();
    }
}

/// Opens and locks each `--disk` image and builds its device.
fn open_disks(disks: &[DiskConfig], mem: &GuestMemory) -> Result<Vec<BlockDevice>, DiskError> {
    disks
        .iter()
        .enumerate()
        .map(|(i, d)| BlockDevice::new(d, disk_base(i), mem.clone()))
        .collect()
}

/// KVM's paravirtual clock (`KVM_FEATURE_CLOCKSOURCE2` in CPUID leaf 0x4000_0001).
fn has_kvmclock(cpuid: &kvm_bindings::CpuId) -> bool {
    const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
    cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == 0x4000_0001 && e.eax & KVM_FEATURE_CLOCKSOURCE2 != 0)
}

/// Turns kvmclock on for a vCPU: KVM keeps its time record at the address the boot info
/// gives the guest. The MSR is part of the vCPU state, so a restored or promoted vCPU
/// keeps it, and `KVM_SET_CLOCK` makes the clock go on from where it was captured (see
/// `Vm::restore_state` for why the guest does not simply read the TSC).
fn enable_kvmclock(fd: &VcpuFd, index: u32) -> Result<(), VcpuError> {
    const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    let entry = kvm_bindings::kvm_msr_entry {
        index: MSR_KVM_SYSTEM_TIME_NEW,
        data: boot::pvclock_addr(index) | 1,
        ..Default::default()
    };
    let msrs = kvm_bindings::Msrs::from_entries(&[entry]).map_err(|_| VcpuError::Msrs {
        index,
        set: 0,
        total: 1,
        msr: MSR_KVM_SYSTEM_TIME_NEW,
    })?;
    match fd.set_msrs(&msrs) {
        Ok(1) => Ok(()),
        Ok(n) => Err(VcpuError::Msrs {
            index,
            set: n,
            total: 1,
            msr: MSR_KVM_SYSTEM_TIME_NEW,
        }),
        Err(source) => Err(VcpuError::Kvm {
            index,
            what: "KVM_SET_MSRS (kvmclock)",
            source,
        }),
    }
}

fn set_boot_registers(fd: &VcpuFd, index: u32, entry: u64) -> Result<(), VcpuError> {
    let err = |what| {
        move |source| VcpuError::Kvm {
            index,
            what,
            source,
        }
    };
    let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    fd.set_sregs(&boot::initial_sregs(sregs))
        .map_err(err("KVM_SET_SREGS"))?;
    fd.set_regs(&boot::initial_regs(entry, index))
        .map_err(err("KVM_SET_REGS"))?;
    fd.set_fpu(&boot::initial_fpu())
        .map_err(err("KVM_SET_FPU"))?;
    // With the in-kernel LAPIC, application processors start UNINITIALIZED (waiting for
    // INIT/SIPI); every vCPU of the reference guest starts at the entry at once.
    let runnable = kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    };
    fd.set_mp_state(runnable).map_err(err("KVM_SET_MP_STATE"))?;
    Ok(())
}

/// Wires a Linux guest's interrupt lines: an irqfd for the 16550 on IRQ 4 (returned for the
/// UART) and one for each virtio device from IRQ [`LINUX_VIRTIO_IRQ`] on (given to it).
fn linux_irqs(vm: &Vm, net: Option<&NetDevice>) -> Result<SerialIrq, MachineError> {
    let irqfd = |gsi: u32, what: &'static str| {
        let err = move |source| MachineError::Irq { gsi, what, source };
        let fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(err)?;
        vm.fd()
            .register_irqfd(&fd, gsi)
            .map_err(|e| err(std::io::Error::from_raw_os_error(e.errno())))?;
        Ok::<_, MachineError>(fd)
    };
    if let Some(n) = net {
        n.set_irq(irqfd(LINUX_VIRTIO_IRQ, "virtio-net")?);
    }
    Ok(SerialIrq(Some(irqfd(LINUX_SERIAL_IRQ, "serial")?)))
}

/// The boot vCPU at a Linux kernel's entry (see [`linux_boot::cpu`]).
fn set_linux_boot_registers(fd: &VcpuFd, entry: &linux_boot::Entry) -> Result<(), VcpuError> {
    let err = |what| {
        move |source| VcpuError::Kvm {
            index: 0,
            what,
            source,
        }
    };
    let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    fd.set_sregs(&linux_boot::cpu::initial_sregs(sregs, entry))
        .map_err(err("KVM_SET_SREGS"))?;
    fd.set_regs(&linux_boot::cpu::initial_regs(entry))
        .map_err(err("KVM_SET_REGS"))?;
    fd.set_fpu(&boot::initial_fpu())
        .map_err(err("KVM_SET_FPU"))?;
    let entries = linux_boot::cpu::boot_msrs();
    let msrs = kvm_bindings::Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
        index: 0,
        set: 0,
        total: entries.len(),
        msr: entries[0].index,
    })?;
    match fd.set_msrs(&msrs) {
        Ok(n) if n == entries.len() => Ok(()),
        Ok(n) => Err(VcpuError::Msrs {
            index: 0,
            set: n,
            total: entries.len(),
            msr: entries[n].index,
        }),
        Err(source) => Err(VcpuError::Kvm {
            index: 0,
            what: "KVM_SET_MSRS (boot MSRs)",
            source,
        }),
    }
}
