//! AF_XDP queues (kernel `Documentation/networking/af_xdp.rst`), with raw syscalls: no libbpf,
//! no compiler for BPF, nothing a fresh machine lacks.
//!
//! Per port: an `XSKMAP` holding one XDP socket per queue, and a hand-assembled program of
//! five instructions that redirects every frame to the socket of the queue it arrived on, or
//! passes it to the host stack when that queue has none:
//!
//! ```c
//! return bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS);
//! ```
//!
//! The program is attached with `BPF_LINK_CREATE`, native mode first, generic mode if the
//! driver has no XDP. A link, unlike the older netlink attachment, belongs to its fd: when the
//! last fd closes, on drop or when the process dies, the kernel detaches the program. An interface that already has a program is left alone (`EBUSY`/`EEXIST`).
//!
//! Per queue: a UMEM of [`FRAMES`] frames of [`FRAME_SIZE`] bytes, mmap'd anonymous memory the
//! socket registers (`XDP_UMEM_REG`). The first [`RX_FRAMES`] belong to the receive side (the
//! fill and RX rings), the others to the transmit side (TX and completion rings), so the two
//! sides, each behind its own lock, never share a frame. The socket is bound with
//! `XDP_ZEROCOPY` where the driver supports it, else `XDP_COPY`, and always with
//! `XDP_USE_NEED_WAKEUP`: the rings are polled and the kernel is kicked (`recvfrom`/`sendto`)
//! only when a ring's flag asks for it.
//!
//! What the kernel writes in the rings is checked before use: a descriptor whose address or
//! length falls outside the frame the queue handed over, or that names a frame the kernel does
//! not hold, is dropped and counted.
//!
//! AF_XDP carries no offload metadata here: frames are plain (the header is all zeros), and
//! larger than [`MAX_RX_FRAME`] they are dropped by the kernel (no multi-buffer support). On a
//! veth the kernel turns the peer's TSO off while a program is attached, so the peer segments.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use virtq_vhost_user::limited;

use super::{setsockopt, socket, Mmap, NicMode, NIC_HDR_LEN};

/// `AF_XDP` (defined here: not every libc target has it).
const AF_XDP: libc::c_int = 44;

/// Bytes per UMEM frame (one page: the largest aligned chunk).
pub const FRAME_SIZE: usize = 4096;
/// UMEM frames per queue (8 MiB of locked memory per queue).
pub const FRAMES: usize = 2048;
/// Frames of the receive side; the rest are the transmit side's.
pub const RX_FRAMES: usize = FRAMES / 2;
/// Frames of the transmit side.
pub const TX_FRAMES: usize = FRAMES - RX_FRAMES;
/// Entries of each ring: as many as frames on its side, so a ring can hold every frame and
/// never overflows.
const RING: u32 = RX_FRAMES as u32;
const _: () = assert!(RX_FRAMES == TX_FRAMES && RING.is_power_of_two());

/// Headroom the kernel keeps in front of a received frame (`XDP_PACKET_HEADROOM`).
const XDP_PACKET_HEADROOM: usize = 256;
/// The largest frame a queue receives: the rest of a UMEM frame.
pub const MAX_RX_FRAME: usize = FRAME_SIZE - XDP_PACKET_HEADROOM;

// bpf(2) commands, types and flags (include/uapi/linux/bpf.h, if_link.h).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const XDP_PASS: i32 = 2;
const BPF_FUNC_REDIRECT_MAP: i32 = 51;
/// `src_reg` of a 64-bit immediate load that names a map by fd (the verifier replaces the fd
/// with the map's address).
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct BpfInsn {
    code: u8,
    /// `dst_reg` in the low nibble, `src_reg` in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> BpfInsn {
    BpfInsn { code, regs: dst | (src << 4), off, imm }
}

/// The XDP program, hand-assembled:
///
/// ```c
/// int xsk_redirect(struct xdp_md *ctx) {
///     return bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS);
/// }
/// ```
///
/// The low bits of the helper's flags are the action when the map has no socket for the key,
/// so frames of a queue without a socket go on to the host stack. The map's fd is patched into
/// instruction 1 at load time.
const PROGRAM: [BpfInsn; 6] = [
    // r2 = *(u32 *)(r1 + 16): r1 is ctx; offset 16 is xdp_md.rx_queue_index (the key).
    // BPF_LDX | BPF_MEM | BPF_W.
    insn(0x61, 2, 1, 16, 0),
    // r1 = &xsks_map: BPF_LD | BPF_IMM | BPF_DW, a two-slot 64-bit immediate whose src_reg
    // BPF_PSEUDO_MAP_FD says the immediate is a map fd (filled in by `load_program`).
    insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, 0),
    // The immediate's upper 32 bits (zero).
    insn(0x00, 0, 0, 0, 0),
    // r3 = XDP_PASS (the flags: the fallback action): BPF_ALU64 | BPF_MOV | BPF_K.
    insn(0xb7, 3, 0, 0, XDP_PASS),
    // r0 = bpf_redirect_map(r1, r2, r3): BPF_JMP | BPF_CALL.
    insn(0x85, 0, 0, 0, BPF_FUNC_REDIRECT_MAP),
    // return r0: BPF_JMP | BPF_EXIT.
    insn(0x95, 0, 0, 0, 0),
];

/// `union bpf_attr` for `BPF_MAP_CREATE` (the fields used; the kernel zero-extends).
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `union bpf_attr` for `BPF_MAP_UPDATE_ELEM`.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_PROG_LOAD`.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_LINK_CREATE`.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// `bpf(cmd, attr, sizeof(*attr))`; a non-negative result is a new fd for the commands that
/// create one.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, fully initialized `bpf_attr` prefix of the given size; the
    // kernel only reads it (and the memory its pointers name, which the callers keep alive).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>() as u32) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn bpf_fd<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: BPF_MAP_CREATE, BPF_PROG_LOAD and BPF_LINK_CREATE return a new fd (O_CLOEXEC)
    // that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

fn name16(s: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..s.len().min(15)].copy_from_slice(&s.as_bytes()[..s.len().min(15)]);
    b
}

/// An attached XDP program: released (link first, which detaches it) on drop.
pub(super) struct XdpProgram {
    _link: OwnedFd,
    map: OwnedFd,
    _prog: OwnedFd,
}

/// The XSKMAP, key: queue index, value: socket fd.
fn create_map(entries: u32) -> io::Result<OwnedFd> {
    let attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_XSKMAP,
        key_size: 4,
        value_size: 4,
        max_entries: entries,
        map_name: name16("virtq_xsks"),
        ..Default::default()
    };
    bpf_fd(BPF_MAP_CREATE, &attr).map_err(|e| io::Error::new(e.kind(), format!("creating the XSKMAP: {e}")))
}

/// Loads [`PROGRAM`] with `map` patched in. On failure the verifier's log is in the error.
fn load_program(map: &OwnedFd) -> io::Result<OwnedFd> {
    let mut insns = PROGRAM;
    insns[1].imm = map.as_raw_fd();
    let license = c"Dual MIT/GPL";
    let mut log = vec![0u8; 4096];
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name16("virtq_xsk"),
        prog_ifindex: 0,
        // What libbpf sets for an "xdp" section: a program for BPF_LINK_CREATE with BPF_XDP.
        expected_attach_type: BPF_XDP,
    };
    bpf_fd(BPF_PROG_LOAD, &attr).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        io::Error::new(e.kind(), format!("loading the XDP program: {e}: {}", text.trim()))
    })
}

/// Attaches `prog` to the interface with a BPF link: native mode, else generic. Returns the
/// link and whether it is native. An interface that already has a program is an error of kind
/// `AddrInUse` (the program is never replaced).
fn attach(prog: &OwnedFd, ifindex: u32) -> io::Result<(OwnedFd, bool)> {
    let mut native_err = None;
    for (flags, native) in [(XDP_FLAGS_DRV_MODE, true), (XDP_FLAGS_SKB_MODE, false)] {
        let attr =
            LinkCreateAttr { prog_fd: prog.as_raw_fd() as u32, target_ifindex: ifindex, attach_type: BPF_XDP, flags };
        match bpf_fd(BPF_LINK_CREATE, &attr) {
            Ok(link) => return Ok((link, native)),
            // Another program (a link or a netlink attachment, native or generic): leave it.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EEXIST)) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("the interface already has an XDP program ({e}); it is left in place"),
                ));
            }
            // No native XDP in the driver (EOPNOTSUPP), or not in this configuration (a veth
            // whose MTU is too large for single-page XDP: ERANGE): try generic.
            Err(e) if native => native_err = Some(e),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "attaching XDP: native: {}, generic: {e}",
                        native_err.map_or_else(String::new, |e| e.to_string())
                    ),
                ))
            }
        }
    }
    unreachable!("the generic attempt returns")
}

/// Sets up AF_XDP on `queues` queues of the interface: the program, its map and one socket per
/// queue. `iface_queues` is the interface's receive queue count, `mtu` its MTU.
pub(super) fn open(
    ifindex: u32,
    queues: u16,
    iface_queues: u16,
    mtu: u32,
) -> io::Result<(XdpProgram, Vec<XskQueue>, NicMode)> {
    // An Ethernet header and a VLAN tag on top of the MTU must fit a frame.
    if mtu as usize + 18 > MAX_RX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("MTU {mtu} is larger than an AF_XDP frame here holds ({MAX_RX_FRAME} bytes with headers)"),
        ));
    }
    if queues > iface_queues {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{queues} queues asked for, the interface has {iface_queues}"),
        ));
    }
    let map = create_map(iface_queues as u32)?;
    let prog = load_program(&map)?;
    let (link, native) = attach(&prog, ifindex)?;
    let program = XdpProgram { _link: link, map, _prog: prog };
    let mut zero_copy = true;
    let mut socks = Vec::with_capacity(queues as usize);
    for q in 0..queues as u32 {
        let x = match XskQueue::new(ifindex, q, zero_copy) {
            Ok(x) => x,
            // The driver cannot do zero-copy (EOPNOTSUPP, EINVAL): copy mode for every queue.
            Err(_) if zero_copy && q == 0 => {
                zero_copy = false;
                XskQueue::new(ifindex, q, false)?
            }
            Err(e) => return Err(e),
        };
        let attr = MapElemAttr {
            map_fd: program.map.as_raw_fd() as u32,
            _pad: 0,
            key: (&q as *const u32) as u64,
            value: (&(x.fd.as_raw_fd() as u32) as *const u32) as u64,
            flags: 0,
        };
        bpf(BPF_MAP_UPDATE_ELEM, &attr).map_err(|e| io::Error::new(e.kind(), format!("XSKMAP[{q}]: {e}")))?;
        socks.push(x);
    }
    Ok((program, socks, NicMode::Xdp { native, zero_copy }))
}

/// One mmap'd ring of an XDP socket: producer, consumer, flags and `RING` entries.
struct Ring {
    map: Mmap,
    producer: usize,
    consumer: usize,
    flags: usize,
    desc: usize,
}

impl Ring {
    /// Maps the ring at page offset `pgoff` of the socket, laid out as `off` says.
    fn map(fd: &OwnedFd, off: &libc::xdp_ring_offset, entry: usize, pgoff: u64) -> io::Result<Ring> {
        let len = off.desc as usize + RING as usize * entry;
        let fits = |o: u64, align: usize| (o as usize).is_multiple_of(align) && o as usize + 4 <= len;
        if !(fits(off.producer, 4) && fits(off.consumer, 4) && fits(off.flags, 4) && fits(off.desc, 8)) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "XDP_MMAP_OFFSETS out of the ring"));
        }
        let map = Mmap::new(len, libc::MAP_SHARED | libc::MAP_POPULATE, fd.as_raw_fd(), pgoff as libc::off_t)?;
        Ok(Ring {
            map,
            producer: off.producer as usize,
            consumer: off.consumer as usize,
            flags: off.flags as usize,
            desc: off.desc as usize,
        })
    }

    fn word(&self, at: usize) -> &AtomicU32 {
        // SAFETY: `at` was checked against the mapping's length and alignment in `map`; the
        // word is shared with the kernel, which only uses it atomically (smp_load_acquire /
        // smp_store_release), as we do.
        unsafe { &*self.map.ptr().add(at).cast::<AtomicU32>() }
    }

    fn producer(&self) -> &AtomicU32 {
        self.word(self.producer)
    }

    fn consumer(&self) -> &AtomicU32 {
        self.word(self.consumer)
    }

    /// Hands every receive frame to the kernel (this being the fill ring of a new socket).
    fn prime(&self) {
        for i in 0..RX_FRAMES as u32 {
            // SAFETY: a fill ring entry (a u64 UMEM address), written before the producer
            // store that publishes it.
            unsafe { self.entry::<u64>(i).write_volatile(i as u64 * FRAME_SIZE as u64) };
        }
        self.producer().store(RX_FRAMES as u32, Ordering::Release);
    }

    fn needs_wakeup(&self) -> bool {
        self.word(self.flags).load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    /// Pointer to entry `i` (any index: it is masked) of `T`s.
    fn entry<T>(&self, i: u32) -> *mut T {
        let at = self.desc + (i & (RING - 1)) as usize * std::mem::size_of::<T>();
        debug_assert!(at + std::mem::size_of::<T>() <= self.map.len);
        // SAFETY: the mapping holds RING entries of the ring's entry size from `desc` (checked
        // in `map`), and callers use the `T` the ring was mapped for.
        unsafe { self.map.ptr().add(at).cast::<T>() }
    }
}

struct RxSide {
    fill: Ring,
    rx: Ring,
    /// Our fill producer and RX consumer (the rings' own words are only stored to).
    fill_prod: u32,
    rx_cons: u32,
    /// Which receive frames the kernel holds (in the fill ring or being written): only those
    /// may come back in the RX ring.
    with_kernel: Vec<bool>,
    /// Received frames waiting for room in the fill ring. The kernel publishes the RX
    /// producer before it releases the fill entries it consumed (`xsk_flush`), so a burst may
    /// find less room than frames; they go back as soon as room appears, never lost.
    /// Capacity `RX_FRAMES`: it never grows.
    to_fill: Vec<u32>,
}

impl RxSide {
    /// Gives the kernel every frame waiting in `to_fill` that the fill ring has room for.
    fn refill(&mut self) {
        if self.to_fill.is_empty() {
            return;
        }
        let fill_cons = self.fill.consumer().load(Ordering::Acquire);
        let room = RING.saturating_sub(self.fill_prod.wrapping_sub(fill_cons)) as usize;
        let n = room.min(self.to_fill.len());
        for k in 0..n {
            let frame = self.to_fill[k];
            // SAFETY: a fill ring entry the kernel has consumed (room checked), published by
            // the producer store below.
            unsafe { self.fill.entry::<u64>(self.fill_prod).write_volatile(u64::from(frame) * FRAME_SIZE as u64) };
            self.fill_prod = self.fill_prod.wrapping_add(1);
            self.with_kernel[frame as usize] = true;
        }
        self.to_fill.drain(..n);
        if n > 0 {
            self.fill.producer().store(self.fill_prod, Ordering::Release);
        }
    }
}

struct TxSide {
    tx: Ring,
    comp: Ring,
    tx_prod: u32,
    comp_cons: u32,
    /// Free transmit frames (UMEM frame numbers); never more than `TX_FRAMES`, so it never
    /// grows past its capacity.
    free: Vec<u32>,
    /// Which transmit frames the kernel holds: only those may come back as completions.
    with_kernel: Vec<bool>,
}

/// An AF_XDP socket bound to one queue of the interface, with its UMEM and rings.
pub(super) struct XskQueue {
    fd: OwnedFd,
    rx: Mutex<RxSide>,
    tx: Mutex<TxSide>,
    umem: Mmap,
}

impl XskQueue {
    fn new(ifindex: u32, queue: u32, zero_copy: bool) -> io::Result<XskQueue> {
        let ctx = |what: &str| {
            let what = what.to_string();
            move |e: io::Error| io::Error::new(e.kind(), format!("queue {queue}: {what}: {e}"))
        };
        let fd = socket(AF_XDP, libc::SOCK_RAW, 0).map_err(ctx("AF_XDP socket"))?;
        let len = FRAMES * FRAME_SIZE;
        let umem =
            Mmap::new(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE, -1, 0).map_err(ctx("UMEM"))?;
        let reg = libc::xdp_umem_reg {
            addr: umem.ptr() as u64,
            len: len as u64,
            chunk_size: FRAME_SIZE as u32,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(&fd, libc::SOL_XDP, libc::XDP_UMEM_REG, &reg).map_err(ctx("XDP_UMEM_REG"))?;
        for opt in [libc::XDP_UMEM_FILL_RING, libc::XDP_UMEM_COMPLETION_RING, libc::XDP_RX_RING, libc::XDP_TX_RING] {
            setsockopt(&fd, libc::SOL_XDP, opt, &RING).map_err(ctx("ring size"))?;
        }
        // SAFETY: all-zero is a valid xdp_mmap_offsets (plain integers).
        let mut off: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
        let mut optlen = std::mem::size_of_val(&off) as libc::socklen_t;
        // SAFETY: the kernel writes at most `optlen` bytes into `off`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
                (&mut off as *mut libc::xdp_mmap_offsets).cast(),
                &mut optlen,
            )
        };
        if rc < 0 || optlen as usize != std::mem::size_of_val(&off) {
            // Kernels before 5.4 answer without the flags words (no need_wakeup): not supported.
            return Err(ctx("XDP_MMAP_OFFSETS")(io::Error::new(
                io::ErrorKind::Unsupported,
                "no ring flags (kernel < 5.4)",
            )));
        }
        let desc = std::mem::size_of::<libc::xdp_desc>();
        let rx = Ring::map(&fd, &off.rx, desc, libc::XDP_PGOFF_RX_RING as u64).map_err(ctx("RX ring"))?;
        let tx = Ring::map(&fd, &off.tx, desc, libc::XDP_PGOFF_TX_RING as u64).map_err(ctx("TX ring"))?;
        let fill = Ring::map(&fd, &off.fr, 8, libc::XDP_UMEM_PGOFF_FILL_RING).map_err(ctx("fill ring"))?;
        let comp = Ring::map(&fd, &off.cr, 8, libc::XDP_UMEM_PGOFF_COMPLETION_RING).map_err(ctx("completion ring"))?;

        fill.prime();

        let mode = if zero_copy { libc::XDP_ZEROCOPY } else { libc::XDP_COPY };
        let sa = libc::sockaddr_xdp {
            sxdp_family: AF_XDP as u16,
            sxdp_flags: mode | libc::XDP_USE_NEED_WAKEUP,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        // SAFETY: a sockaddr_xdp of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_xdp).cast(),
                std::mem::size_of_val(&sa) as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(ctx(if zero_copy { "bind (zero-copy)" } else { "bind (copy)" })(io::Error::last_os_error()));
        }
        Ok(XskQueue::assemble(fd, umem, [fill, rx, tx, comp]))
    }

    /// The queue over its socket, UMEM and rings (fill, RX, TX, completion), the fill ring
    /// already holding every receive frame.
    fn assemble(fd: OwnedFd, umem: Mmap, [fill, rx, tx, comp]: [Ring; 4]) -> XskQueue {
        let rx = RxSide {
            fill,
            rx,
            fill_prod: RX_FRAMES as u32,
            rx_cons: 0,
            with_kernel: vec![true; RX_FRAMES],
            to_fill: Vec::with_capacity(RX_FRAMES),
        };
        let tx = TxSide {
            tx,
            comp,
            tx_prod: 0,
            comp_cons: 0,
            free: (RX_FRAMES as u32..FRAMES as u32).rev().collect(),
            with_kernel: vec![false; TX_FRAMES],
        };
        XskQueue { fd, rx: Mutex::new(rx), tx: Mutex::new(tx), umem }
    }

    /// See [`super::NicQueue::recv_burst`]; returns (delivered, dropped).
    pub(super) fn recv_burst(&self, max: usize, f: &mut impl FnMut(&[u8; NIC_HDR_LEN], &[u8])) -> (usize, u64) {
        let mut guard = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *guard;
        let prod = st.rx.producer().load(Ordering::Acquire);
        // More than RING entries would be a kernel bug: never read past what the ring holds.
        let avail = prod.wrapping_sub(st.rx_cons).min(RING).min(max.min(RING as usize) as u32);
        if avail == 0 {
            st.refill();
            if st.fill.needs_wakeup() {
                self.wake_rx();
            }
            return (0, 0);
        }
        let (mut delivered, mut dropped) = (0usize, 0u64);
        const HDR: [u8; NIC_HDR_LEN] = [0; NIC_HDR_LEN];
        for i in 0..avail {
            // SAFETY: an RX ring entry below the producer (read after the acquire load).
            let d = unsafe { st.rx.entry::<libc::xdp_desc>(st.rx_cons.wrapping_add(i)).read_volatile() };
            let frame = d.addr / FRAME_SIZE as u64;
            let (at, len) = ((d.addr % FRAME_SIZE as u64) as usize, d.len as usize);
            if frame >= RX_FRAMES as u64 || !st.with_kernel[frame as usize] {
                // Not a frame the kernel held: nothing to deliver or recycle.
                dropped += 1;
                continue;
            }
            let frame = frame as usize;
            st.with_kernel[frame] = false;
            if len == 0 || at + len > FRAME_SIZE {
                dropped += 1;
            } else {
                // SAFETY: the bytes lie inside receive frame `frame` of our UMEM (checked
                // above), which the kernel gave back and gets again only after this burst.
                let data = unsafe { std::slice::from_raw_parts(self.umem.ptr().add(d.addr as usize), len) };
                f(&HDR, data);
                delivered += 1;
            }
            // Back to the kernel through the fill ring, now or as soon as it has room.
            st.to_fill.push(frame as u32);
        }
        st.rx_cons = st.rx_cons.wrapping_add(avail);
        st.rx.consumer().store(st.rx_cons, Ordering::Release);
        st.refill();
        if st.fill.needs_wakeup() {
            self.wake_rx();
        }
        if dropped > 0 {
            limited!(warn, "AF_XDP queue: {dropped} receive descriptor(s) outside their frame dropped");
        }
        (delivered, dropped)
    }

    /// See [`super::NicQueue::kernel_drops`].
    pub(super) fn kernel_drops(&self) -> u64 {
        // SAFETY: all-zero is a valid xdp_statistics (plain integers).
        let mut st: libc::xdp_statistics = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of_val(&st) as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `st`.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_STATISTICS,
                (&mut st as *mut libc::xdp_statistics).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return 0;
        }
        // A kernel that answers with the older, shorter struct leaves rx_ring_full at zero.
        st.rx_dropped + st.rx_ring_full
    }

    /// Asks the kernel to refill from the fill ring (`recvfrom`, non-blocking).
    fn wake_rx(&self) {
        // SAFETY: a zero-length, non-blocking recvfrom without buffers: only a wake-up.
        unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
    }

    /// See [`super::NicQueue::send_burst`].
    pub(super) fn send_burst<'a>(&self, frames: impl Iterator<Item = &'a [u8]>) -> super::Sent {
        let mut guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *guard;
        // Completed frames come back first.
        let prod = st.comp.producer().load(Ordering::Acquire);
        let done = prod.wrapping_sub(st.comp_cons).min(RING);
        for i in 0..done {
            // SAFETY: a completion ring entry below the producer.
            let addr = unsafe { st.comp.entry::<u64>(st.comp_cons.wrapping_add(i)).read_volatile() };
            let frame = addr / FRAME_SIZE as u64;
            if addr % FRAME_SIZE as u64 == 0 && (RX_FRAMES as u64..FRAMES as u64).contains(&frame) {
                let k = frame as usize - RX_FRAMES;
                if st.with_kernel[k] {
                    st.with_kernel[k] = false;
                    st.free.push(frame as u32);
                }
            }
        }
        st.comp_cons = st.comp_cons.wrapping_add(done);
        st.comp.consumer().store(st.comp_cons, Ordering::Release);

        let tx_cons = st.tx.consumer().load(Ordering::Acquire);
        let mut room = RING.saturating_sub(st.tx_prod.wrapping_sub(tx_cons));
        let (mut sent, mut dropped, mut too_big, mut full) = (0u64, 0u64, 0usize, false);
        for f in frames {
            if full {
                dropped += 1;
                continue;
            }
            if f.is_empty() || f.len() > FRAME_SIZE {
                too_big = f.len();
                dropped += 1;
                continue;
            }
            let frame = match st.free.last() {
                Some(&frame) if room > 0 => frame,
                _ => {
                    // No frame or ring entry until the kernel completes some: the rest of the
                    // burst is dropped too.
                    full = true;
                    dropped += 1;
                    continue;
                }
            };
            st.free.pop();
            let addr = frame as usize * FRAME_SIZE;
            // SAFETY: transmit frame `frame` of our UMEM is free (not with the kernel), and
            // `f` fits in it.
            unsafe { std::ptr::copy_nonoverlapping(f.as_ptr(), self.umem.ptr().add(addr), f.len()) };
            let d = libc::xdp_desc { addr: addr as u64, len: f.len() as u32, options: 0 };
            // SAFETY: a TX ring entry the kernel has consumed (room checked), published by the
            // producer store below.
            unsafe { st.tx.entry::<libc::xdp_desc>(st.tx_prod).write_volatile(d) };
            st.tx_prod = st.tx_prod.wrapping_add(1);
            st.with_kernel[frame as usize - RX_FRAMES] = true;
            room -= 1;
            sent += 1;
        }
        if sent > 0 {
            st.tx.producer().store(st.tx_prod, Ordering::Release);
        }
        if st.tx_prod != st.tx.consumer().load(Ordering::Acquire) && st.tx.needs_wakeup() {
            self.wake_tx();
        }
        if too_big > 0 {
            limited!(warn, "AF_XDP queue: a {too_big}-byte frame does not fit a {FRAME_SIZE}-byte UMEM frame: dropped");
        }
        super::Sent { sent, dropped, full }
    }

    /// Kicks transmission (`sendto`, non-blocking). In copy mode one call sends at most a
    /// batch (32 frames) and answers `EAGAIN` when more wait, so it is repeated a few times.
    fn wake_tx(&self) {
        for _ in 0..RING / 32 {
            // SAFETY: a zero-length, non-blocking sendto without buffers: only a kick.
            let rc = unsafe {
                libc::sendto(self.fd.as_raw_fd(), std::ptr::null(), 0, libc::MSG_DONTWAIT, std::ptr::null(), 0)
            };
            if rc >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
                // Sent, or the device is busy (EBUSY, ENOBUFS, ENETDOWN): the next burst kicks
                // again.
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring in anonymous memory, playing the kernel's part in a test.
    fn fake_ring(entry: usize) -> Ring {
        let len = 256 + RING as usize * entry;
        let map = Mmap::new(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0).unwrap();
        Ring { map, producer: 0, consumer: 64, flags: 128, desc: 256 }
    }

    /// A queue whose rings and UMEM are plain memory the test writes as a (hostile) kernel
    /// would; its socket is a UDP one (no ring flag asks for a kick anyway).
    fn fake_queue() -> XskQueue {
        let fd = socket(libc::AF_INET, libc::SOCK_DGRAM, 0).unwrap();
        let umem = Mmap::new(FRAMES * FRAME_SIZE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0).unwrap();
        let d = std::mem::size_of::<libc::xdp_desc>();
        let rings = [fake_ring(8), fake_ring(d), fake_ring(d), fake_ring(8)];
        rings[0].prime();
        XskQueue::assemble(fd, umem, rings)
    }

    fn desc(addr: usize, len: u32) -> libc::xdp_desc {
        libc::xdp_desc { addr: addr as u64, len, options: 0 }
    }

    /// The kernel produces RX descriptors `d` (after `st.rx_cons`).
    fn kernel_rx(q: &XskQueue, d: &[libc::xdp_desc]) {
        let st = q.rx.lock().unwrap();
        for (i, d) in d.iter().enumerate() {
            // SAFETY: an entry of the fake ring.
            unsafe { st.rx.entry::<libc::xdp_desc>(st.rx_cons + i as u32).write(*d) };
        }
        st.rx.producer().store(st.rx_cons + d.len() as u32, Ordering::Release);
    }

    #[test]
    fn receive_descriptors_outside_their_frame_are_dropped_not_followed() {
        let q = fake_queue();
        // SAFETY: plain memory of the fake UMEM.
        unsafe { q.umem.ptr().add(3 * FRAME_SIZE + 256).write_bytes(0xab, 60) };
        kernel_rx(
            &q,
            &[
                desc(3 * FRAME_SIZE + 256, 60),   // frame 3: fine
                desc(5000 * FRAME_SIZE, 60),      // past the UMEM
                desc(RX_FRAMES * FRAME_SIZE, 60), // a transmit frame
                desc(4 * FRAME_SIZE + 4000, 200), // runs past its frame
                desc(5 * FRAME_SIZE, 0),          // empty
                desc(3 * FRAME_SIZE + 256, 60),   // frame 3 again: not with the kernel
                desc(usize::MAX - 10, u32::MAX),  // wraps
            ],
        );
        let mut got = Vec::new();
        assert_eq!(q.recv_burst(64, &mut |h, f| got.push((*h, f.to_vec()))), (1, 6));
        assert_eq!(got, vec![([0u8; NIC_HDR_LEN], vec![0xab; 60])]);
        let st = q.rx.lock().unwrap();
        assert_eq!(st.rx.consumer().load(Ordering::Acquire), 7, "every descriptor consumed");
        // The kernel took no fill entry: the fill ring was full, nothing was written over.
        assert_eq!(st.fill_prod, RX_FRAMES as u32, "no fill entry overwritten");
        assert!(!st.with_kernel[3] && !st.with_kernel[4] && st.with_kernel[6]);
        // Frames 3 (delivered) and 4, 5 (dropped, but ours again) wait for room, not lost.
        assert_eq!(st.to_fill, [3, 4, 5]);
        drop(st);
        // The kernel releases fill entries (as `xsk_flush` does after publishing RX): the
        // next call, even with nothing received, gives the frames back.
        q.rx.lock().unwrap().fill.consumer().store(3, Ordering::Release);
        assert_eq!(q.recv_burst(64, &mut |_, _| {}), (0, 0));
        let st = q.rx.lock().unwrap();
        assert!(st.to_fill.is_empty() && st.with_kernel[3] && st.with_kernel[4] && st.with_kernel[5]);
        assert_eq!(st.fill.producer().load(Ordering::Acquire), RX_FRAMES as u32 + 3);
    }

    #[test]
    fn received_frames_go_back_to_the_fill_ring_once_the_kernel_has_room() {
        let q = fake_queue();
        q.rx.lock().unwrap().fill.consumer().store(2, Ordering::Release);
        kernel_rx(&q, &[desc(7 * FRAME_SIZE + 256, 100), desc(9 * FRAME_SIZE + 256, 1514)]);
        assert_eq!(q.recv_burst(64, &mut |_, _| {}), (2, 0));
        let st = q.rx.lock().unwrap();
        assert_eq!(st.fill.producer().load(Ordering::Acquire), RX_FRAMES as u32 + 2);
        // SAFETY: entries of the fake ring.
        let back = unsafe {
            [st.fill.entry::<u64>(RX_FRAMES as u32).read(), st.fill.entry::<u64>(RX_FRAMES as u32 + 1).read()]
        };
        assert_eq!(back, [7 * FRAME_SIZE as u64, 9 * FRAME_SIZE as u64], "frame starts, not packet addresses");
        drop(st);
        // A producer that ran far ahead: at most a ring's worth is read. The two entries
        // written above name frames the kernel holds again, so they pass (the kernel is
        // believed about its own frames); the zeroed rest names frame 0 with length 0.
        q.rx.lock().unwrap().rx.producer().store(1 << 30, Ordering::Release);
        let (n, dropped) = q.recv_burst(usize::MAX, &mut |_, _| {});
        assert_eq!((n, dropped), (2, RING as u64 - 2));
    }

    #[test]
    fn completions_the_kernel_invents_free_nothing() {
        let q = fake_queue();
        let f = [0x11u8; 100];
        let big = vec![0u8; FRAME_SIZE + 1];
        let frames: Vec<&[u8]> = vec![&f, &f, &big, &[], &f];
        assert_eq!(
            q.send_burst(frames.into_iter()),
            super::super::Sent { sent: 3, dropped: 2, full: false },
            "too large and empty frames dropped, each on its own: the queue is not full"
        );
        let st = q.tx.lock().unwrap();
        assert_eq!(st.tx.producer().load(Ordering::Acquire), 3);
        // SAFETY: entries of the fake rings.
        let sent: Vec<libc::xdp_desc> = (0..3).map(|i| unsafe { st.tx.entry::<libc::xdp_desc>(i).read() }).collect();
        for d in &sent {
            assert!(d.addr as usize >= RX_FRAMES * FRAME_SIZE && d.len == 100, "transmit frames only");
            // SAFETY: inside the fake UMEM (just checked).
            assert_eq!(unsafe { *q.umem.ptr().add(d.addr as usize + 99) }, 0x11);
        }
        // The kernel completes: a receive frame, an unaligned address, one real frame twice,
        // and a frame never sent.
        let comps =
            [0, sent[0].addr + 1, sent[0].addr, sent[0].addr, (FRAMES - 1) as u64 * FRAME_SIZE as u64, u64::MAX];
        for (i, a) in comps.iter().enumerate() {
            // SAFETY: entries of the fake ring.
            unsafe { st.comp.entry::<u64>(i as u32).write(*a) };
        }
        st.comp.producer().store(comps.len() as u32, Ordering::Release);
        st.tx.consumer().store(3, Ordering::Release);
        let free_before = st.free.len();
        drop(st);
        assert_eq!(q.send_burst(std::iter::empty()), super::super::Sent::default());
        let st = q.tx.lock().unwrap();
        assert_eq!(st.free.len(), free_before + 1, "one frame came back, once");
        assert_eq!(st.comp.consumer().load(Ordering::Acquire), comps.len() as u32);
        drop(st);
        // The kernel consumes nothing more: the ring (RING entries, 3 consumed) fills, the rest
        // is dropped, nothing blocks.
        let many = vec![&f[..]; RING as usize + 10];
        let s = q.send_burst(many.into_iter());
        assert_eq!(s.sent + s.dropped, RING as u64 + 10);
        assert_eq!(s.sent, (TX_FRAMES - 2) as u64, "every free frame, no more");
        assert!(s.full, "out of frames: the queue is full");
    }

    #[test]
    fn the_program_encodes_as_the_kernel_expects() {
        // `struct bpf_insn` in memory: code, dst_reg | src_reg << 4, off (le16), imm (le32);
        // helper 51 (0x33) is bpf_redirect_map.
        let bytes: Vec<u8> = PROGRAM
            .iter()
            .flat_map(|i| {
                let mut b = vec![i.code, i.regs];
                b.extend_from_slice(&i.off.to_le_bytes());
                b.extend_from_slice(&i.imm.to_le_bytes());
                b
            })
            .collect();
        let want: [[u8; 8]; 6] = [
            [0x61, 0x12, 0x10, 0, 0, 0, 0, 0],
            [0x18, 0x11, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0xb7, 0x03, 0, 0, 0x02, 0, 0, 0],
            [0x85, 0, 0, 0, 0x33, 0, 0, 0],
            [0x95, 0, 0, 0, 0, 0, 0, 0],
        ];
        assert_eq!(bytes, want.concat());
        assert_eq!(std::mem::size_of::<BpfInsn>(), 8);
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 72);
    }
}
