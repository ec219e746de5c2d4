//! The NIC uplink port: a Linux network interface (a physical NIC, a veth, a bond...) whose
//! frames the switch sends and receives directly, below the host's IP stack.
//!
//! Two ways in, chosen per interface ([`NicModeChoice`]):
//!
//! - **AF_XDP** ([`xdp`]; kernel `Documentation/networking/af_xdp.rst`): one XDP socket per
//!   queue, a UMEM owned by the port, and a five-instruction XDP program that redirects every
//!   frame of a bound queue to its socket. Zero-copy where the driver supports it, copy mode
//!   elsewhere; native (driver) XDP, else generic (skb) XDP. The program is attached with a BPF
//!   link, so the kernel detaches it when the last fd of the link closes: on drop, on a crash,
//!   on SIGKILL. The interface is left as found.
//! - **AF_PACKET** ([`packet`]; `Documentation/networking/packet_mmap.rst`): a memory-mapped
//!   `TPACKET_V3` receive ring per queue with `PACKET_VNET_HDR`, so offloaded (GSO,
//!   partial-checksum) frames of the host stack arrive whole, with their virtio-net header.
//!   Slower, works on every interface, and side by side with an XDP program someone else
//!   attached.
//!
//! `auto` tries AF_XDP and falls back to AF_PACKET, logging one line why. On a veth or TUN it
//! takes AF_PACKET straight away: XDP does not say which frames carry a partial checksum
//! (CHECKSUM_PARTIAL, for the device to finish), and a local stack on the other side of such
//! an interface sends those; on a wire every frame is complete.
//!
//! Either way the port must accept frames for the guests' MAC addresses, so it holds a
//! promiscuous membership (`PACKET_ADD_MEMBERSHIP`, `PACKET_MR_PROMISC`) on an AF_PACKET socket
//! of its own: the kernel counts such memberships and drops this one when the socket closes,
//! however the process ends. `IFF_PROMISC` is never set (a crash would leave it set).
//!
//! Threads: [`NicQueue`] is `Send + Sync`. Its receive side is meant to be polled by one thread
//! (a second one would wait on a lock); its transmit side may be called from any thread, under
//! its own lock, taken once per burst.
//!
//! What the switch gets, and must know:
//!
//! - AF_XDP frames are plain: the header is all zeros, frames are at most the MTU (an MTU
//!   whose frames do not fit a UMEM frame, [`xdp::MAX_RX_FRAME`], is refused: `auto` takes
//!   AF_PACKET). The bound queues' traffic no longer reaches the host stack: the interface is
//!   the switch's. With fewer queues than the interface has, frames the NIC steers to the other
//!   queues go to the host stack instead (`ethtool -L IF combined N` to match). Generic XDP
//!   sees frames after GRO, so on a NIC with GRO on an aggregated frame larger than a UMEM
//!   frame may be dropped by the kernel ([`NicQueue::kernel_drops`]).
//! - AF_PACKET frames may be offloaded, as the kernel's header says: `gso_type` TCPV4, TCPV6
//!   or UDP_L4 (possibly with the ECN bit) with frames up to 64 KiB, `NEEDS_CSUM` with
//!   `csum_start`/`csum_offset` counted from the start of the frame, or `DATA_VALID` (checksum
//!   already verified, from a NIC with receive checksum offload). The switch segments and
//!   completes them for receivers that did not negotiate those offloads. The host stack keeps
//!   receiving everything, and what the host itself sends on the interface is not seen by the
//!   port (`PACKET_IGNORE_OUTGOING`).
//! - Frames given to [`NicQueue::send_burst`] must be complete (checksums done, no GSO) and
//!   at most MTU + 14 bytes (+ 4 with a VLAN tag). Larger ones are refused by AF_PACKET
//!   (counted in `tx_drops`); through AF_XDP what becomes of them is up to the driver.
//!
//! Everything needs root, or rather CAP_NET_RAW (sockets), CAP_NET_ADMIN (promiscuous
//! membership, attaching XDP) and CAP_BPF or CAP_SYS_ADMIN (loading the XDP program); the UMEM
//! is locked memory (CAP_IPC_LOCK or a large enough `RLIMIT_MEMLOCK`).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};

pub mod packet;
pub mod xdp;

/// Bytes of the virtio-net header handed with every received frame
/// (`struct virtio_net_hdr_mrg_rxbuf`, with `num_buffers` 0).
pub const NIC_HDR_LEN: usize = 12;

/// How the port reaches the interface, as asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicModeChoice {
    /// AF_XDP if it can be set up, else AF_PACKET (one log line says why).
    Auto,
    /// AF_XDP or fail.
    Xdp,
    /// AF_PACKET (`TPACKET_V3`).
    Packet,
}

/// A NIC port as configured: `IFNAME[,mode=auto|xdp|packet][,queues=N]` ([`parse_nic`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicSpec {
    /// The interface name (1 to 15 bytes).
    pub ifname: String,
    /// How to reach it.
    pub mode: NicModeChoice,
    /// Queues to open; `None`: as many as the interface has receive queues (combined or rx
    /// channels, `ethtool -l`), or 1 when the driver does not say.
    pub queues: Option<u16>,
}

/// Parses `IFNAME[,mode=auto|xdp|packet][,queues=N]` (N from 1 to 256).
pub fn parse_nic(spec: &str) -> Result<NicSpec, String> {
    let mut parts = spec.split(',');
    let ifname = parts.next().unwrap_or("").to_string();
    if ifname.is_empty() || ifname.len() > 15 || ifname.contains('=') || ifname.contains('/') {
        return Err(format!("{spec:?}: the interface name comes first and has 1 to 15 bytes"));
    }
    if ifname.bytes().any(|b| b.is_ascii_whitespace() || b == 0) {
        return Err(format!("{spec:?}: bad interface name {ifname:?}"));
    }
    let mut nic = NicSpec { ifname, mode: NicModeChoice::Auto, queues: None };
    let (mut seen_mode, mut seen_queues) = (false, false);
    for opt in parts {
        match opt.split_once('=') {
            Some(("mode", v)) if !seen_mode => {
                seen_mode = true;
                nic.mode = match v {
                    "auto" => NicModeChoice::Auto,
                    "xdp" => NicModeChoice::Xdp,
                    "packet" => NicModeChoice::Packet,
                    _ => return Err(format!("{spec:?}: mode is auto, xdp or packet, not {v:?}")),
                };
            }
            Some(("queues", v)) if !seen_queues => {
                seen_queues = true;
                match v.parse::<u16>() {
                    Ok(n @ 1..=256) => nic.queues = Some(n),
                    _ => return Err(format!("{spec:?}: queues is a number from 1 to 256, not {v:?}")),
                }
            }
            Some(("mode" | "queues", _)) => return Err(format!("{spec:?}: {opt:?} given twice")),
            _ => return Err(format!("{spec:?}: unknown option {opt:?} (mode=, queues=)")),
        }
    }
    Ok(nic)
}

/// How an open port actually reaches its interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicMode {
    /// AF_XDP sockets.
    Xdp {
        /// The XDP program runs in the driver (`XDP_FLAGS_DRV_MODE`); otherwise it is generic
        /// XDP (`XDP_FLAGS_SKB_MODE`), after the kernel built an skb.
        native: bool,
        /// The sockets are bound with `XDP_ZEROCOPY`: the NIC writes into and reads from the
        /// UMEM directly. Otherwise (`XDP_COPY`) the kernel copies each frame.
        zero_copy: bool,
    },
    /// AF_PACKET with `TPACKET_V3` rings.
    Packet,
}

impl fmt::Display for NicMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NicMode::Xdp { native, zero_copy } => write!(
                f,
                "af_xdp ({}, {})",
                if *native { "native" } else { "generic" },
                if *zero_copy { "zero-copy" } else { "copy" }
            ),
            NicMode::Packet => f.write_str("af_packet (TPACKET_V3)"),
        }
    }
}

/// Counters of one queue, updated once per burst.
#[derive(Debug, Default)]
pub struct NicCounters {
    /// Frames delivered by [`NicQueue::recv_burst`].
    pub rx: AtomicU64,
    /// Frames handed to the kernel by [`NicQueue::send_burst`].
    pub tx: AtomicU64,
    /// Received frames dropped here: too large for the ring (cut short), or a descriptor the
    /// kernel wrote that does not hold up.
    pub rx_drops: AtomicU64,
    /// Frames [`NicQueue::send_burst`] dropped: ring or socket buffer full, or too large.
    pub tx_drops: AtomicU64,
}

/// One queue of a NIC port: an XDP socket bound to one queue of the interface, or one
/// AF_PACKET socket (several of them share the interface's traffic through a fanout group).
pub struct NicQueue {
    index: u16,
    counters: NicCounters,
    kind: QueueKind,
}

enum QueueKind {
    // Boxed: its rings' bookkeeping is ten times the size of an AF_PACKET queue.
    Xdp(Box<xdp::XskQueue>),
    Packet(packet::PacketQueue),
}

impl fmt::Debug for NicQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NicQueue").field("index", &self.index).field("counters", &self.counters).finish()
    }
}

impl NicQueue {
    /// This queue's number: the interface's receive queue for AF_XDP, the fanout member for
    /// AF_PACKET.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Its counters.
    pub fn counters(&self) -> &NicCounters {
        &self.counters
    }

    /// Receives up to `max` frames, calling `f(hdr, frame)` for each, where `hdr` is the
    /// 12-byte virtio-net header (`struct virtio_net_hdr_mrg_rxbuf` layout, `num_buffers` 0)
    /// describing offloads of that frame (all zero for a plain frame), and `frame` the Ethernet
    /// frame. Frames stay valid only during the call (ring memory is recycled after it).
    /// Returns the number of frames delivered. Never blocks (one thread polls a queue; `f` must
    /// not call `recv_burst` on the same queue, it would wait on itself).
    pub fn recv_burst(&self, max: usize, mut f: impl FnMut(&[u8; NIC_HDR_LEN], &[u8])) -> usize {
        let (n, dropped) = match &self.kind {
            QueueKind::Xdp(q) => q.recv_burst(max, &mut f),
            QueueKind::Packet(q) => q.recv_burst(max, &mut f),
        };
        add(&self.counters.rx, n as u64);
        add(&self.counters.rx_drops, dropped);
        n
    }

    /// Frames the kernel dropped on their way to this queue since it was opened: its ring
    /// was full, or (AF_XDP) it had no free frame (`XDP_STATISTICS` `rx_dropped` +
    /// `rx_ring_full`; AF_PACKET: `PACKET_STATISTICS` `tp_drops`). A system call: for
    /// statistics, not for every burst.
    pub fn kernel_drops(&self) -> u64 {
        match &self.kind {
            QueueKind::Xdp(q) => q.kernel_drops(),
            QueueKind::Packet(q) => q.kernel_drops(),
        }
    }

    /// Sends plain, complete frames (no offloads: the switch segments and completes checksums
    /// in software before), each at most the interface's MTU plus its Ethernet header (see
    /// the module documentation for larger ones). A full ring drops, never blocks: see
    /// [`Sent`] for what was sent, dropped, and whether the queue ran out of room.
    pub fn send_burst<'a>(&self, frames: impl Iterator<Item = &'a [u8]>) -> Sent {
        let s = match &self.kind {
            QueueKind::Xdp(q) => q.send_burst(frames),
            QueueKind::Packet(q) => q.send_burst(frames),
        };
        add(&self.counters.tx, s.sent);
        add(&self.counters.tx_drops, s.dropped);
        s
    }

    /// Finishes what earlier bursts left: completed transmit frames are taken back, and
    /// frames still queued are kicked to the kernel again (an AF_XDP kick that met `EBUSY`
    /// or `ENOBUFS` is not retried until the next burst, which may never come: the last ACK
    /// of a flow). For the data-plane thread's housekeeping; AF_PACKET sends synchronously
    /// and has nothing to finish.
    pub fn flush_tx(&self) {
        if let QueueKind::Xdp(q) = &self.kind {
            q.send_burst(std::iter::empty());
        }
    }
}

/// What [`NicQueue::send_burst`] did with a burst.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Frames handed to the kernel.
    pub sent: u64,
    /// Frames dropped: refused one by one (empty, larger than a UMEM frame, or refused by the
    /// kernel, e.g. `EMSGSIZE`), or because the queue was full.
    pub dropped: u64,
    /// The queue ran out of room (AF_XDP: no free transmit frame or ring entry; AF_PACKET:
    /// `EAGAIN`/`ENOBUFS`): frames after that point were dropped without being tried. A
    /// sender with more frames for this queue stops; a frame refused on its own does not
    /// set it.
    pub full: bool,
}

fn add(c: &AtomicU64, n: u64) {
    if n > 0 {
        c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An open NIC port. Dropping it releases everything (XDP link, program and map, sockets,
/// rings, UMEM, the promiscuous membership): the interface is left as found.
pub struct Nic {
    name: String,
    mode: NicMode,
    /// The interface's MTU, as last read ([`Nic::refresh_mtu`]).
    mtu: AtomicU16,
    // Declared (and so dropped) first: the program stops redirecting to the sockets before
    // they close, and the interface's traffic goes back to the host stack.
    _xdp: Option<xdp::XdpProgram>,
    queues: Vec<NicQueue>,
    _promisc: OwnedFd,
}

impl fmt::Debug for Nic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nic").field("name", &self.name).field("mode", &self.mode).field("queues", &self.queues).finish()
    }
}

impl Nic {
    /// Opens the interface `spec.ifname` of the calling thread's network namespace. `Auto`
    /// tries AF_XDP and falls back to AF_PACKET, logging one line why; `Xdp` fails where
    /// `Auto` would fall back, with the reason. An interface that already has an XDP program is
    /// never touched (AF_PACKET for `Auto`, an error for `Xdp`).
    pub fn open(spec: &NicSpec) -> io::Result<Nic> {
        let name = spec.ifname.clone();
        let ifindex = ifindex(&name)?;
        let promisc = promisc_membership(ifindex)?;
        let iface_queues = interface_queues(&promisc, &name);
        let queues = spec.queues.unwrap_or(iface_queues).max(1);
        let mtu = interface_mtu(&promisc, &name)?;
        let driver = interface_driver(&promisc, &name);
        // XDP gives no checksum state: a frame a local stack sent with a partial checksum
        // (CHECKSUM_PARTIAL, left for the device to finish) reaches the XDP socket unfinished.
        // Frames from a wire are complete; frames through a virtual device whose other side is
        // a local stack (a veth into a container, a TUN) are not. AF_PACKET's virtio-net
        // header says which frames need their checksum finished.
        let partial_csums = matches!(driver.as_deref(), Some("veth" | "tun"));
        if partial_csums && spec.mode == NicModeChoice::Xdp {
            log::warn!(
                "nic {name}: a {} interface hands over its peer's partial checksums, which AF_XDP cannot tell from complete ones: frames from a local stack behind it may reach guests with wrong checksums (mode=packet or auto avoids it)",
                driver.as_deref().unwrap_or("")
            );
        }
        let xdp_err = match spec.mode {
            NicModeChoice::Packet => None,
            NicModeChoice::Auto if partial_csums => Some(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "a {} interface carries its peer's partial checksums, which XDP does not report",
                    driver.as_deref().unwrap_or("")
                ),
            )),
            NicModeChoice::Auto | NicModeChoice::Xdp => match xdp::open(ifindex, queues, iface_queues, mtu) {
                Ok((prog, qs, mode)) => {
                    let queues = wrap(qs.into_iter().map(|q| QueueKind::Xdp(Box::new(q))));
                    log::info!("nic {name}: {mode}, {} queue(s)", queues.len());
                    return Ok(Nic {
                        name,
                        mode,
                        mtu: AtomicU16::new(mtu_u16(mtu)),
                        _xdp: Some(prog),
                        queues,
                        _promisc: promisc,
                    });
                }
                Err(e) if spec.mode == NicModeChoice::Xdp => {
                    return Err(io::Error::new(e.kind(), format!("nic {name}: AF_XDP: {e}")));
                }
                Err(e) => Some(e),
            },
        };
        let qs = packet::open(ifindex, queues)?;
        let queues = wrap(qs.into_iter().map(QueueKind::Packet));
        match xdp_err {
            Some(e) => log::info!(
                "nic {name}: AF_XDP unavailable ({e}); using af_packet (TPACKET_V3), {} queue(s)",
                queues.len()
            ),
            None => log::info!("nic {name}: af_packet (TPACKET_V3), {} queue(s)", queues.len()),
        }
        Ok(Nic {
            name,
            mode: NicMode::Packet,
            mtu: AtomicU16::new(mtu_u16(mtu)),
            _xdp: None,
            queues,
            _promisc: promisc,
        })
    }

    /// How the port reaches its interface.
    pub fn mode(&self) -> NicMode {
        self.mode
    }

    /// Its queues.
    pub fn queues(&self) -> &[NicQueue] {
        &self.queues
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface's MTU: the largest frame (past the Ethernet header) the switch sends it
    /// that is not cut into segments first. Read when the port is opened and again by
    /// [`Nic::refresh_mtu`], so an `ip link set mtu` is followed.
    pub fn mtu(&self) -> u16 {
        self.mtu.load(Ordering::Relaxed)
    }

    /// Reads the interface's MTU again (a system call: for a periodic check, not for every
    /// burst) and returns `Some((old, new))` if it changed. An interface that cannot be
    /// asked (renamed, gone) keeps the MTU it had.
    pub fn refresh_mtu(&self) -> Option<(u16, u16)> {
        let new = mtu_u16(interface_mtu(&self._promisc, &self.name).ok()?);
        let old = self.mtu.swap(new, Ordering::Relaxed);
        (old != new).then_some((old, new))
    }
}

/// An MTU as the switch counts it (virtio-net's MTU field is 16 bits).
fn mtu_u16(mtu: impl TryInto<u16>) -> u16 {
    mtu.try_into().unwrap_or(u16::MAX)
}

fn wrap(kinds: impl Iterator<Item = QueueKind>) -> Vec<NicQueue> {
    kinds.enumerate().map(|(i, kind)| NicQueue { index: i as u16, counters: NicCounters::default(), kind }).collect()
}

/// The interface's index in the calling thread's network namespace.
fn ifindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: a NUL-terminated string that outlives the call.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::new(io::ErrorKind::NotFound, format!("no interface {name:?}"))),
        i => Ok(i),
    }
}

/// A fresh socket, owned.
fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new fd nobody else owns.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `setsockopt` of a plain value.
fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: `val` is a live `T` and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The promiscuous membership (`packet(7)`, `PACKET_MR_PROMISC`) on a socket of protocol 0,
/// which receives nothing: the kernel counts it in the interface's promiscuity and drops it
/// when the socket closes (`packet_flush_mclist`), on any exit.
fn promisc_membership(ifindex: u32) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0)?;
    let mreq = libc::packet_mreq {
        mr_ifindex: ifindex as libc::c_int,
        mr_type: libc::PACKET_MR_PROMISC as libc::c_ushort,
        mr_alen: 0,
        mr_address: [0; 8],
    };
    setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
        .map_err(|e| io::Error::new(e.kind(), format!("promiscuous membership: {e}")))?;
    Ok(fd)
}

#[repr(C)]
struct IfReqData {
    name: [u8; 16],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

#[repr(C)]
struct IfReqInt {
    name: [u8; 16],
    value: libc::c_int,
    _pad: [u8; 20],
}

fn ifname_bytes(name: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    let n = name.len().min(15);
    b[..n].copy_from_slice(&name.as_bytes()[..n]);
    b
}

/// The interface's receive queues: combined channels, else rx channels (`ETHTOOL_GCHANNELS`),
/// else 1 (drivers without channels have one queue).
fn interface_queues(sock: &OwnedFd, name: &str) -> u16 {
    const ETHTOOL_GCHANNELS: u32 = 0x3c;
    // struct ethtool_channels: cmd, max_rx, max_tx, max_other, max_combined, rx_count,
    // tx_count, other_count, combined_count.
    let mut ch = [0u32; 9];
    ch[0] = ETHTOOL_GCHANNELS;
    let mut req = IfReqData { name: ifname_bytes(name), data: ch.as_mut_ptr().cast(), _pad: [0; 16] };
    // SAFETY: SIOCETHTOOL reads an ifreq whose data points at a struct ethtool_channels (nine
    // u32, `ch`), which it fills; both live through the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
    if rc < 0 {
        return 1;
    }
    let n = if ch[8] > 0 { ch[8] } else { ch[5] };
    n.clamp(1, 256) as u16
}

/// The interface's driver name (`ETHTOOL_GDRVINFO`: `veth`, `ixgbe`, ...), if it says.
fn interface_driver(sock: &OwnedFd, name: &str) -> Option<String> {
    const ETHTOOL_GDRVINFO: u32 = 0x03;
    // struct ethtool_drvinfo: cmd, then driver[32], version[32], fw_version[32],
    // bus_info[32], erom_version[32], reserved2[12], and five u32 counts: 196 bytes.
    let mut info = [0u32; 49];
    info[0] = ETHTOOL_GDRVINFO;
    let mut req = IfReqData { name: ifname_bytes(name), data: info.as_mut_ptr().cast(), _pad: [0; 16] };
    // SAFETY: SIOCETHTOOL reads an ifreq whose data points at a struct ethtool_drvinfo (196
    // bytes, `info`), which it fills; both live through the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) } < 0 {
        return None;
    }
    let bytes: Vec<u8> = info[1..9].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    std::str::from_utf8(&bytes[..end]).ok().map(str::to_string)
}

/// The interface's MTU (`SIOCGIFMTU`).
fn interface_mtu(sock: &OwnedFd, name: &str) -> io::Result<u32> {
    let mut req = IfReqInt { name: ifname_bytes(name), value: 0, _pad: [0; 20] };
    // SAFETY: SIOCGIFMTU fills ifr_mtu (an int after the name) of an ifreq, which `IfReqInt`
    // lays out at full size.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(req.value.max(0) as u32)
}

/// A shared or anonymous memory mapping, unmapped on drop.
struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a mapping is plain memory; who reads or writes which part of it, and when, is
// synchronized by the rings' owners (a Mutex per direction, the rings' atomics).
unsafe impl Send for Mmap {}
// SAFETY: as above.
unsafe impl Sync for Mmap {}

impl Mmap {
    /// `mmap(NULL, len, PROT_READ | PROT_WRITE, flags, fd, offset)`.
    fn new(len: usize, flags: libc::c_int, fd: libc::c_int, offset: libc::off_t) -> io::Result<Mmap> {
        // SAFETY: a fresh mapping chosen by the kernel; nothing else is touched.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, offset) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap { ptr: NonNull::new(p.cast()).expect("mmap does not return NULL"), len })
    }

    fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; nothing refers to it past its owner.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_nic_accepts_the_documented_forms() {
        let s = parse_nic("eth0").unwrap();
        assert_eq!(s, NicSpec { ifname: "eth0".into(), mode: NicModeChoice::Auto, queues: None });
        let s = parse_nic("enp3s0f1,mode=xdp,queues=4").unwrap();
        assert_eq!(s, NicSpec { ifname: "enp3s0f1".into(), mode: NicModeChoice::Xdp, queues: Some(4) });
        let s = parse_nic("veth-long-name1,queues=1,mode=packet").unwrap();
        assert_eq!(s, NicSpec { ifname: "veth-long-name1".into(), mode: NicModeChoice::Packet, queues: Some(1) });
        assert_eq!(parse_nic("x,mode=auto").unwrap().mode, NicModeChoice::Auto);
        assert_eq!(parse_nic("x,queues=256").unwrap().queues, Some(256));
    }

    #[test]
    fn parse_nic_refuses_bad_specs() {
        for bad in [
            "",
            ",mode=xdp",
            "mode=xdp",
            "a-name-of-16-byt",
            "eth0,mode=dpdk",
            "eth0,mode=",
            "eth0,queues=0",
            "eth0,queues=257",
            "eth0,queues=-1",
            "eth0,queues=two",
            "eth0,mtu=9000",
            "eth0,",
            "eth0,mode=xdp,mode=packet",
            "eth0,queues=1,queues=2",
            "eth 0",
        ] {
            assert!(parse_nic(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn modes_print_what_runs() {
        assert_eq!(NicMode::Xdp { native: true, zero_copy: true }.to_string(), "af_xdp (native, zero-copy)");
        assert_eq!(NicMode::Xdp { native: false, zero_copy: false }.to_string(), "af_xdp (generic, copy)");
        assert_eq!(NicMode::Packet.to_string(), "af_packet (TPACKET_V3)");
    }

    #[test]
    fn queues_and_ports_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<NicQueue>();
        send_sync::<Nic>();
    }
}
