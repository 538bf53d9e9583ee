//! Emulated devices and the bus that routes vCPU port and MMIO exits to them.

pub mod serial;

use std::sync::Mutex;

use crate::boot::abi::SERIAL_PORT;
use serial::SerialDevice;

/// Where vCPU threads send the port and MMIO accesses that KVM hands to userspace.
pub trait Bus: Send + Sync {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]);
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// The VM's devices.
pub struct Devices {
    pub serial: Mutex<SerialDevice>,
}

const SERIAL_PORTS: std::ops::Range<u16> = SERIAL_PORT..SERIAL_PORT + 8;

impl Bus for Devices {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if SERIAL_PORTS.contains(&port) && data.len() == 1 {
            data[0] = lock(&self.serial).read((port - SERIAL_PORT) as u8);
        } else {
            // Nothing there: an open bus reads as all ones.
            data.fill(0xff);
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if SERIAL_PORTS.contains(&port) && data.len() == 1 {
            lock(&self.serial).write((port - SERIAL_PORT) as u8, data[0]);
        }
    }

    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
}

/// Locks a device mutex; a device is plain data, so a panic elsewhere leaves it usable.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
