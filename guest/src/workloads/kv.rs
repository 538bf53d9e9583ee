//! `workload=kv ip=A.B.C.D/NN port=P [gw=A.B.C.D]`: a Redis-protocol key-value service
//! over the virtio-net device, smoltcp and the guest heap.
//!
//! vCPU 0 brings up the device, prints `kv: listening on <ip>:<port> mac=<mac>` and then
//! runs the network forever: it polls the interface, moves bytes between the TCP
//! sockets and each connection's `session` (buffers, bounded; `resp` parses and runs
//! the requests; all pure and host-tested), and parks on the idle port when nothing is
//! due (the VMM wakes it early when a frame arrives). The other vCPUs idle. The data
//! lives in a hash table (`table`) in guest RAM, so checkpoints and failover carry it
//! along with the TCP state.
//!
//! Memory: stored data may take the heap up to its data limit (7/8 of it); the rest
//! serves requests. A write that would pass the limit gets redis-server's `-OOM` error
//! and changes nothing, so a client cannot stop the service by filling memory.

mod aof;
mod commands;
mod resp;
mod session;
mod table;

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use smoltcp::iface::{self, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Address};

use crate::abi::{VIRTIO_ID_BLOCK, VIRTIO_ID_NET};
use crate::args::{self, ArgError};
use crate::boot::Boot;
use crate::heap;
use crate::ports::{exit, idle, idle_forever};
use crate::println;
use crate::time::{rdtsc, Clock, TimeSource};
use crate::virtio::blk::VirtioBlk;
use crate::virtio::net::VirtioNet;

use aof::Aof;
use session::{Journal, Session};

pub const NAME: &str = "kv";

/// Status when the virtio-net device cannot be brought up.
const EXIT_DEVICE: u32 = 4;
/// The free RAM the service needs at least (sockets, rings, buffers, some data).
const MIN_FREE: u64 = 16 << 20;
/// TCP sockets, each listening until a client connects and again after it leaves.
/// smoltcp has no listen backlog: a SYN that finds no listening socket is refused. A
/// client that reconnects all its connections at once (`redis-benchmark` between two
/// tests) needs a socket for each new connection while the old ones still close, so
/// there are twice as many as the clients we expect (`redis-benchmark -c 50`) and more.
const SOCKETS: usize = 128;
const SOCKET_RX_BYTES: usize = 16 << 10;
const SOCKET_TX_BYTES: usize = 16 << 10;
/// The part of the memory kept from stored data for serving requests (1/8), and its
/// least size. A request is kept in memory up to half of it; a larger one is refused
/// with the OOM error.
const RESERVE_DIVISOR: usize = 8;
const MIN_RESERVE: usize = 2 << 20;
/// The longest the network vCPU parks before it looks at the interface again.
const MAX_IDLE_US: u64 = 1000;

pub struct Config {
    ip: [u8; 4],
    prefix: u8,
    port: u16,
    gateway: Option<[u8; 4]>,
    /// MMIO base of the virtio-net device.
    net_base: u64,
    /// `aof=on`: the MMIO base of the virtio-blk device the log is on.
    aof: Option<u64>,
}

impl Config {
    pub fn parse<'a>(cmdline: &'a str, boot: &Boot) -> Result<Self, ArgError<'a>> {
        let mut ip = None;
        let mut port = 6379;
        let mut gateway = None;
        let mut aof = false;
        args::parse_keys(cmdline, NAME, &["ip", "port", "gw", "aof"], |key, value| {
            match key {
                "aof" => {
                    aof = match value {
                        "on" => true,
                        "off" => false,
                        _ => {
                            return Err(ArgError::Malformed {
                                key,
                                value,
                                expected: "on or off",
                            })
                        }
                    }
                }
                "ip" => ip = Some(args::parse_ipv4_cidr(key, value)?),
                "port" => {
                    port = u16::try_from(args::parse_u64(key, value)?)
                        .ok()
                        .filter(|port| *port != 0)
                        .ok_or(ArgError::Invalid {
                            key,
                            value,
                            reason: "is not a TCP port (1..=65535)",
                        })?;
                }
                _ => gateway = Some((args::parse_ipv4(key, value)?, value)),
            }
            Ok(())
        })?;
        let (ip, prefix) = ip.ok_or(ArgError::Missing {
            workload: NAME,
            key: "ip",
            placeholder: "A.B.C.D/NN",
        })?;
        if let Some((gw, text)) = gateway {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            if u32::from_be_bytes(gw) & mask != u32::from_be_bytes(ip) & mask {
                return Err(ArgError::Invalid {
                    key: "gw",
                    value: text,
                    reason: "is outside the subnet given by ip=",
                });
            }
        }
        let aof = if aof {
            let disk = boot
                .virtio
                .iter()
                .find(|device| device.device_id == VIRTIO_ID_BLOCK)
                .ok_or(ArgError::NoDevice {
                    workload: "kv aof=on",
                    device: "virtio-blk",
                    flag: "--disk",
                })?;
            Some(disk.base)
        } else {
            None
        };
        let net_base = boot
            .virtio
            .iter()
            .find(|device| device.device_id == VIRTIO_ID_NET)
            .ok_or(ArgError::NoDevice {
                workload: NAME,
                device: "virtio-net",
                flag: "--net",
            })?
            .base;
        if boot.free_bytes() < MIN_FREE {
            return Err(ArgError::TooLittleRam {
                workload: NAME,
                need: "16M",
                free: boot.free_bytes(),
            });
        }
        Ok(Config {
            ip,
            prefix,
            port,
            gateway: gateway.map(|(gw, _)| gw),
            net_base,
            aof,
        })
    }
}

pub fn run(boot: &Boot, config: &Config) -> ! {
    if !boot.is_leader() {
        idle_forever();
    }
    // SAFETY: free RAM from `heap_start` to the end of RAM belongs to the workload, and
    // in this one only vCPU 0 uses it, through the allocator.
    unsafe { heap::init(boot.heap_start, boot.ram_size) };
    // What clients store may fill memory up to the data limit; the rest is for serving
    // requests, so that a full store still reads them and answers with the OOM error.
    // Only stored data counts against the limit (not the sockets and buffers), so it is
    // set once they are allocated, to what they leave less the reserve.
    let heap_size = heap::usage().size;
    let reserve = (heap_size / RESERVE_DIVISOR).max(MIN_RESERVE);
    let max_request = reserve / 2;
    let clock = Clock::starting_now(TimeSource::new(boot));
    let now = || Instant::from_micros(clock.now_us() as i64);

    // SAFETY: the boot info lists this device; nothing else in the guest drives it.
    let mut device = match unsafe { VirtioNet::new(config.net_base) } {
        Ok(device) => device,
        Err(err) => {
            println!("error: {err}");
            exit(EXIT_DEVICE)
        }
    };
    let mac = device.mac();
    let mut iface_config = iface::Config::new(EthernetAddress(mac).into());
    iface_config.random_seed = rdtsc();
    let mut iface = Interface::new(iface_config, &mut device, now());
    let ip = Ipv4Address::from(config.ip);
    iface.update_ip_addrs(|addrs| {
        addrs
            .push(IpCidr::new(IpAddress::Ipv4(ip), config.prefix))
            .expect("room for one address");
    });
    if let Some(gw) = config.gateway {
        iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::from(gw))
            .expect("room for the default route");
    }

    let storage: Vec<SocketStorage<'static>> = (0..SOCKETS).map(|_| SocketStorage::EMPTY).collect();
    let mut sockets = SocketSet::new(Box::leak(storage.into_boxed_slice()));
    let mut conns: Vec<Conn> = (0..SOCKETS)
        .map(|_| Conn {
            handle: sockets.add(new_socket()),
            session: Session::new(max_request),
        })
        .collect();
    let mut store = table::Table::new();
    let data_limit = heap_size.saturating_sub(heap::usage().used + reserve);
    heap::set_data_limit(data_limit);
    // The log replayed before any client is served.
    let mut aof = config.aof.map(|base| {
        // SAFETY: the boot info lists this device; nothing else in the guest drives it.
        let disk = match unsafe { VirtioBlk::new(base) } {
            Ok(disk) => disk,
            Err(err) => {
                println!("error: {err}");
                exit(EXIT_DEVICE)
            }
        };
        let capacity = disk.capacity();
        let (aof, replayed) = Aof::open(disk, &mut store);
        if replayed.fresh {
            println!("kv: aof: new log on a disk of {capacity} bytes");
        } else {
            println!(
                "kv: aof: replayed {} commands ({} bytes of log)",
                replayed.commands, replayed.bytes
            );
        }
        aof
    });
    // Listening before saying so: a client that connects at once is not refused.
    for conn in &conns {
        let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
        socket.listen(config.port).expect("a new socket can listen");
    }

    println!("kv: listening on {ip}:{} mac={}", config.port, Mac(mac));
    println!(
        "kv: {} MiB of memory, data up to {} MiB, requests up to {} MiB",
        heap_size >> 20,
        data_limit >> 20,
        max_request >> 20
    );
    loop {
        let timestamp = now();
        let changed = iface.poll(timestamp, &mut device, &mut sockets);
        let mut progress = false;
        let journal: &mut dyn Journal = match &mut aof {
            Some(aof) => aof,
            None => &mut (),
        };
        // Every connection runs what it has, then the writes they made are made durable
        // at once, then the replies go out (and further requests run, synced before
        // their replies leave in turn).
        for send in [false, true] {
            if send {
                journal.sync();
            }
            for conn in &mut conns {
                progress |= conn.pump(
                    sockets.get_mut(conn.handle),
                    config.port,
                    &mut store,
                    journal,
                    send,
                );
            }
        }
        device.flush();
        if progress || changed == iface::PollResult::SocketStateChanged || device.rx_ready() {
            continue;
        }
        let delay = iface
            .poll_delay(timestamp, &sockets)
            .map_or(MAX_IDLE_US, |delay| delay.total_micros().min(MAX_IDLE_US));
        if delay > 0 {
            idle(delay as u32);
        }
    }
}

fn new_socket() -> tcp::Socket<'static> {
    let rx = tcp::SocketBuffer::new(Box::leak(vec![0u8; SOCKET_RX_BYTES].into_boxed_slice()));
    let tx = tcp::SocketBuffer::new(Box::leak(vec![0u8; SOCKET_TX_BYTES].into_boxed_slice()));
    let mut socket = tcp::Socket::new(rx, tx);
    // Replies go out at once, as Redis sets TCP_NODELAY.
    socket.set_nagle_enabled(false);
    socket
}

/// One TCP socket and the connection it carries.
struct Conn {
    handle: SocketHandle,
    session: Session,
}

impl Conn {
    /// Moves bytes between the socket and the session; whether anything moved. With
    /// `send` false it only runs requests (their replies wait for the journal's sync).
    fn pump(
        &mut self,
        socket: &mut tcp::Socket<'_>,
        port: u16,
        store: &mut table::Table,
        journal: &mut dyn Journal,
        send: bool,
    ) -> bool {
        match socket.state() {
            State::Closed => {
                self.session.reset();
                socket.listen(port).expect("a closed socket can listen");
                return false;
            }
            State::Listen => {
                self.session.reset();
                return false;
            }
            _ => {}
        }
        let session = &mut self.session;
        let mut progress = false;
        loop {
            if send && !session.output().is_empty() && socket.can_send() {
                // No reply leaves before the writes run so far are durable.
                journal.sync();
                let n = socket.send_slice(session.output()).unwrap_or(0);
                session.sent(n);
                progress |= n > 0;
            }
            if !session.output().is_empty() {
                // Read no more requests until the replies so far have gone out.
                break;
            }
            if session.closing() {
                socket.close();
                break;
            }
            if session.resume_logged(store, journal) {
                progress = true;
                continue;
            }
            if !socket.can_recv() {
                break;
            }
            let n = socket
                .recv(|data| {
                    let n = session.receive_logged(data, store, journal);
                    (n, n)
                })
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            progress = true;
        }
        // The client has closed its side and every reply is out: close ours.
        if socket.state() == State::CloseWait && session.output().is_empty() && !socket.can_recv() {
            socket.close();
        }
        progress
    }
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`.
struct Mac([u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}
