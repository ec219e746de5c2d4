//! AF_PACKET queues with memory-mapped `TPACKET_V3` receive rings (kernel
//! `Documentation/networking/packet_mmap.rst`, `net/packet/af_packet.c`).
//!
//! Receive: a ring of [`BLOCKS`] blocks of [`BLOCK_SIZE`] bytes per socket. The kernel fills a
//! block with frames of any size and hands it over when it is full or after
//! [`RETIRE_TIMEOUT_MS`] (so an idle link adds at most that much latency, rounded up to a
//! jiffy); the poller reads every frame of the block in place and gives the block back. The
//! socket has `PACKET_VNET_HDR`: in front of each frame (at `tp_mac - 10`) the kernel writes a
//! `struct virtio_net_hdr` for the skb, so what the host stack hands over offloaded (a veth
//! whose peer has TSO passes 64 KiB GSO skbs, partial checksums) arrives whole, described by
//! its header, instead of as a giant frame with a wrong checksum. A block holds a 64 KiB GSO
//! frame; a larger one (BIG TCP) is cut short by the kernel, and dropped and counted here.
//! `PACKET_IGNORE_OUTGOING` keeps what the port sends out of its own rings.
//!
//! VLAN: the kernel strips an accelerated tag from the frame and reports it in the ring
//! header (`TP_STATUS_VLAN_VALID`); it is put back in place (the 4 bytes before the frame are
//! the header, already copied), so frames arrive as they were on the wire, and `csum_start`,
//! which the kernel computes with the tag counted, matches.
//!
//! Several queues join one fanout group (`PACKET_FANOUT_HASH`: a flow stays on one queue).
//!
//! Transmit: `sendmmsg`, one call per burst of up to [`TX_BATCH`] frames, each behind a zero
//! virtio-net header (the socket has `PACKET_VNET_HDR`, which applies to both directions).
//! Not a `PACKET_TX_RING`: with one syscall per burst either way, the ring would save the
//! per-frame copy into an skb only by making every send wait on the kernel releasing slots,
//! and would add a second layout to validate. sendmmsg keeps no state between bursts, so there
//! is no transmit lock at all: the kernel serializes senders on the socket.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use virtq_vhost_user::limited;

use super::{setsockopt, socket, Mmap, NIC_HDR_LEN};

/// Bytes per ring block: room for a 64 KiB GSO frame and its headers.
pub const BLOCK_SIZE: usize = 128 << 10;
/// Blocks per ring (2 MiB a queue).
pub const BLOCKS: usize = 16;
/// `tp_retire_blk_tov`: a block that is not full is handed over after this many milliseconds.
pub const RETIRE_TIMEOUT_MS: u32 = 1;
/// Frames per `sendmmsg`.
pub const TX_BATCH: usize = 32;
/// `tp_frame_size`: for V3 only a unit of the ring's geometry (frames are packed).
const FRAME_UNIT: usize = 2048;
/// The kernel's `struct virtio_net_hdr` (without `num_buffers`).
const VNET_HDR_LEN: usize = 10;
/// Block descriptor: version, offset_to_priv, then `tpacket_hdr_v1` at 8: block_status,
/// num_pkts, offset_to_first_pkt, blk_len...
const BD_STATUS: usize = 8;
const BD_NUM_PKTS: usize = 12;
const BD_FIRST: usize = 16;
const BD_LEN: usize = 48;
const HDR3: usize = std::mem::size_of::<libc::tpacket3_hdr>();
const _: () = assert!(HDR3 == 48 && std::mem::size_of::<libc::tpacket_block_desc>() == BD_LEN);
const _: () = assert!(BLOCK_SIZE > 65535 + 18 + 128 && BLOCK_SIZE.is_multiple_of(FRAME_UNIT));

/// One AF_PACKET socket bound to the interface, with its receive ring.
pub(super) struct PacketQueue {
    fd: OwnedFd,
    rx: Mutex<RxRing>,
    /// Kernel drops read so far (`PACKET_STATISTICS` resets the kernel's counters on read).
    drops: AtomicU64,
}

struct RxRing {
    map: Mmap,
    /// The block being read, whether it is ours, frames left in it and the next one's offset.
    block: usize,
    open: bool,
    left: u32,
    off: usize,
}

fn ctx(q: u16, what: &'static str) -> impl Fn(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("AF_PACKET queue {q}: {what}: {e}"))
}

/// Opens `queues` sockets on the interface (a fanout group when more than one).
pub(super) fn open(ifindex: u32, queues: u16) -> io::Result<Vec<PacketQueue>> {
    let mut out = Vec::with_capacity(queues as usize);
    let mut fanout: Option<libc::c_int> = None;
    for q in 0..queues {
        // Protocol 0: nothing is received before the ring is set up and the socket bound.
        let fd = socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, 0).map_err(ctx(q, "socket"))?;
        let one: libc::c_int = 1;
        let v3 = libc::tpacket_versions::TPACKET_V3 as libc::c_int;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VERSION, &v3).map_err(ctx(q, "TPACKET_V3"))?;
        // Before the ring: the kernel refuses to change the header once a ring exists.
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &one).map_err(ctx(q, "PACKET_VNET_HDR"))?;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &one)
            .map_err(ctx(q, "PACKET_IGNORE_OUTGOING"))?;
        let req = libc::tpacket_req3 {
            tp_block_size: BLOCK_SIZE as u32,
            tp_block_nr: BLOCKS as u32,
            tp_frame_size: FRAME_UNIT as u32,
            tp_frame_nr: (BLOCKS * BLOCK_SIZE / FRAME_UNIT) as u32,
            tp_retire_blk_tov: RETIRE_TIMEOUT_MS,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req).map_err(ctx(q, "PACKET_RX_RING"))?;
        let map = Mmap::new(BLOCKS * BLOCK_SIZE, libc::MAP_SHARED | libc::MAP_POPULATE, fd.as_raw_fd(), 0)
            .map_err(ctx(q, "mmap of the ring"))?;
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex as libc::c_int;
        // SAFETY: a sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of_val(&sll) as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(ctx(q, "bind")(io::Error::last_os_error()));
        }
        if queues > 1 {
            join_fanout(&fd, &mut fanout).map_err(ctx(q, "PACKET_FANOUT"))?;
        }
        out.push(PacketQueue {
            fd,
            rx: Mutex::new(RxRing { map, block: 0, open: false, left: 0, off: 0 }),
            drops: AtomicU64::new(0),
        });
    }
    Ok(out)
}

/// Joins the port's fanout group, which the first socket creates with an id the kernel picks
/// (`PACKET_FANOUT_FLAG_UNIQUEID`). Outgoing frames are ignored by the group as a whole (the
/// sockets' own `PACKET_IGNORE_OUTGOING` no longer applies once they are members).
fn join_fanout(fd: &OwnedFd, group: &mut Option<libc::c_int>) -> io::Result<()> {
    let arg = match *group {
        Some(arg) => arg,
        None => {
            let flags = libc::PACKET_FANOUT_FLAG_UNIQUEID | libc::PACKET_FANOUT_FLAG_IGNORE_OUTGOING;
            ((libc::PACKET_FANOUT_HASH | flags) << 16) as libc::c_int
        }
    };
    setsockopt(fd, libc::SOL_PACKET, libc::PACKET_FANOUT, &arg)?;
    if group.is_none() {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of_val(&v) as libc::socklen_t;
        // SAFETY: the kernel writes one int into `v`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_FANOUT,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // id | type << 16 | flags << 24, the ephemeral UNIQUEID flag already dropped.
        *group = Some(v);
    }
    Ok(())
}

impl PacketQueue {
    /// See [`super::NicQueue::recv_burst`]; returns (delivered, dropped).
    pub(super) fn recv_burst(&self, max: usize, f: &mut impl FnMut(&[u8; NIC_HDR_LEN], &[u8])) -> (usize, u64) {
        let mut guard = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *guard;
        let (mut delivered, mut dropped, mut cut, mut bad) = (0usize, 0u64, 0usize, false);
        while delivered < max {
            let block = st.block * BLOCK_SIZE;
            // SAFETY: `block` is the start of one of the BLOCKS blocks of the mapping.
            let bd = unsafe { st.map.ptr().add(block) };
            // SAFETY: the block status word (aligned, inside the block) is shared with the
            // kernel, which stores it with release semantics (smp_wmb + store) when it hands
            // the block over; an acquire load orders the reads of the block after it.
            let status = unsafe { &*bd.add(BD_STATUS).cast::<AtomicU32>() };
            if !st.open {
                if status.load(Ordering::Acquire) & libc::TP_STATUS_USER == 0 {
                    break;
                }
                // SAFETY: words of the block descriptor, inside the block, which is ours now.
                let (n, first) = unsafe {
                    (bd.add(BD_NUM_PKTS).cast::<u32>().read_volatile(), bd.add(BD_FIRST).cast::<u32>().read_volatile())
                };
                (st.open, st.left, st.off) = (true, n, first as usize);
            }
            if st.left == 0 {
                // Done with the block: back to the kernel.
                status.store(libc::TP_STATUS_KERNEL, Ordering::Release);
                st.block = (st.block + 1) % BLOCKS;
                st.open = false;
                continue;
            }
            let off = st.off;
            if off < BD_LEN || !off.is_multiple_of(4) || off + HDR3 > BLOCK_SIZE {
                // The kernel's offsets do not hold: skip the rest of the block.
                (dropped, bad, st.left) = (dropped + st.left as u64, true, 0);
                continue;
            }
            // SAFETY: a tpacket3_hdr inside the block (checked above; 4-byte aligned as the
            // struct requires), ours until the block goes back.
            let h = unsafe { bd.add(off).cast::<libc::tpacket3_hdr>().read_volatile() };
            let (mac, snap) = (h.tp_mac as usize, h.tp_snaplen as usize);
            let start = off + mac;
            if mac < HDR3 + VNET_HDR_LEN || snap < 14 || start + snap > BLOCK_SIZE {
                dropped += 1;
                bad = true;
            } else if snap < h.tp_len as usize {
                // Cut short: larger than a block holds.
                dropped += 1;
                cut = h.tp_len as usize;
            } else {
                let mut hdr = [0u8; NIC_HDR_LEN];
                // SAFETY: the virtio-net header the kernel wrote before the frame (mac >=
                // HDR3 + 10, so inside this frame's slot); num_buffers stays 0.
                unsafe { std::ptr::copy_nonoverlapping(bd.add(start - VNET_HDR_LEN), hdr.as_mut_ptr(), VNET_HDR_LEN) };
                let (mut first, mut len) = (start, snap);
                if h.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                    let tpid =
                        if h.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 { h.hv1.tp_vlan_tpid } else { 0x8100 };
                    let mut tag = [0u8; 4];
                    tag[..2].copy_from_slice(&tpid.to_be_bytes());
                    tag[2..].copy_from_slice(&(h.hv1.tp_vlan_tci as u16).to_be_bytes());
                    // SAFETY: the 4 bytes before the frame are the end of the header, copied
                    // out above and inside the block; the MAC addresses move there and the tag
                    // follows them: the frame then starts 4 bytes earlier.
                    unsafe {
                        std::ptr::copy(bd.add(start), bd.add(start - 4), 12);
                        std::ptr::copy_nonoverlapping(tag.as_ptr(), bd.add(start + 8), 4);
                    }
                    (first, len) = (start - 4, snap + 4);
                }
                // SAFETY: inside the block (checked above), which the kernel does not touch
                // until we give it back.
                let frame = unsafe { std::slice::from_raw_parts(bd.add(first), len) };
                f(&hdr, frame);
                delivered += 1;
            }
            st.left -= 1;
            if st.left > 0 {
                let next = h.tp_next_offset as usize;
                if next < HDR3 {
                    (dropped, bad, st.left) = (dropped + st.left as u64, true, 0);
                } else {
                    st.off = off + next;
                }
            }
        }
        if cut > 0 {
            limited!(warn, "AF_PACKET: a {cut}-byte frame is larger than a ring block ({BLOCK_SIZE} bytes): dropped");
        }
        if bad {
            limited!(warn, "AF_PACKET: a ring block with offsets outside it: its frames dropped");
        }
        (delivered, dropped)
    }

    /// See [`super::NicQueue::kernel_drops`].
    pub(super) fn kernel_drops(&self) -> u64 {
        // SAFETY: all-zero is a valid tpacket_stats_v3 (plain integers).
        let mut st: libc::tpacket_stats_v3 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of_val(&st) as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `st`.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats_v3).cast(),
                &mut len,
            )
        };
        let new = if rc < 0 { 0 } else { st.tp_drops as u64 };
        self.drops.fetch_add(new, Ordering::Relaxed) + new
    }

    /// See [`super::NicQueue::send_burst`].
    pub(super) fn send_burst<'a>(&self, frames: impl Iterator<Item = &'a [u8]>) -> super::Sent {
        static ZERO_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];
        let (mut sent, mut dropped, mut full) = (0u64, 0u64, false);
        let mut frames = frames.peekable();
        while frames.peek().is_some() {
            if full {
                // The socket buffer or device queue is full: the rest is not tried.
                dropped += frames.count() as u64;
                break;
            }
            // SAFETY: all-zero iovecs and mmsghdrs are valid (null pointers, zero lengths).
            let mut iov: [[libc::iovec; 2]; TX_BATCH] = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let mut msgs: [libc::mmsghdr; TX_BATCH] = unsafe { std::mem::zeroed() };
            let mut n = 0;
            for f in frames.by_ref().take(TX_BATCH) {
                iov[n][0] = libc::iovec { iov_base: ZERO_HDR.as_ptr() as *mut _, iov_len: VNET_HDR_LEN };
                iov[n][1] = libc::iovec { iov_base: f.as_ptr() as *mut _, iov_len: f.len() };
                n += 1;
            }
            for (m, v) in msgs.iter_mut().zip(iov.iter_mut()).take(n) {
                m.msg_hdr.msg_iov = v.as_mut_ptr();
                m.msg_hdr.msg_iovlen = 2;
            }
            let mut i = 0;
            while i < n {
                // SAFETY: `n - i` messages whose iovecs point at the header and frames, all
                // alive through the call; the kernel only reads them (and writes msg_len).
                let rc = unsafe {
                    libc::sendmmsg(
                        self.fd.as_raw_fd(),
                        msgs[i..].as_mut_ptr(),
                        (n - i) as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                if rc > 0 {
                    i += rc as usize;
                    sent += rc as u64;
                    continue;
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    // Socket buffer or device queue full: the rest of the batch is dropped.
                    Some(libc::EAGAIN | libc::ENOBUFS) => {
                        dropped += (n - i) as u64;
                        i = n;
                        full = true;
                    }
                    Some(libc::EINTR) => {}
                    // This frame is refused (EMSGSIZE: larger than the MTU; ENETDOWN...).
                    _ => {
                        limited!(warn, "AF_PACKET: a {}-byte frame not sent: {e}", iov[i][1].iov_len);
                        dropped += 1;
                        i += 1;
                    }
                }
            }
        }
        super::Sent { sent, dropped, full }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queue whose ring is plain memory the test writes as a (hostile) kernel would.
    fn fake_queue() -> PacketQueue {
        let fd = socket(libc::AF_INET, libc::SOCK_DGRAM, 0).unwrap();
        let map = Mmap::new(BLOCKS * BLOCK_SIZE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0).unwrap();
        PacketQueue {
            fd,
            rx: Mutex::new(RxRing { map, block: 0, open: false, left: 0, off: 0 }),
            drops: AtomicU64::new(0),
        }
    }

    fn put_u32(q: &PacketQueue, at: usize, v: u32) {
        let st = q.rx.lock().unwrap();
        assert!(at + 4 <= st.map.len);
        // SAFETY: inside the fake ring.
        unsafe { st.map.ptr().add(at).cast::<u32>().write_unaligned(v) };
    }

    /// Block `b` handed to user space with `n` frames, the first at `first`.
    fn block(q: &PacketQueue, b: usize, n: u32, first: u32) {
        put_u32(q, b * BLOCK_SIZE + BD_NUM_PKTS, n);
        put_u32(q, b * BLOCK_SIZE + BD_FIRST, first);
        put_u32(q, b * BLOCK_SIZE + BD_STATUS, libc::TP_STATUS_USER);
    }

    /// A frame header at `off` of block `b`: next offset, mac offset, snaplen, len.
    fn pkt(q: &PacketQueue, b: usize, off: usize, next: u32, mac: u16, snap: u32, len: u32) {
        let at = b * BLOCK_SIZE + off;
        put_u32(q, at, next);
        put_u32(q, at + 12, snap);
        put_u32(q, at + 16, len);
        put_u32(q, at + 20, 0);
        put_u32(q, at + 24, mac as u32);
    }

    #[test]
    fn frames_and_blocks_the_kernel_describes_wrongly_are_dropped() {
        let q = fake_queue();
        // Block 0: a good frame with a header, one cut short, one whose data would start
        // inside its own ring header, then an offset of 0 for the fourth.
        block(&q, 0, 4, 48);
        pkt(&q, 0, 48, 2048, 100, 60, 60);
        {
            let st = q.rx.lock().unwrap();
            // SAFETY: inside the fake ring.
            unsafe {
                let p = st.map.ptr().add(48 + 100 - VNET_HDR_LEN);
                std::ptr::copy_nonoverlapping([1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10].as_ptr(), p, 10);
                p.add(10).write_bytes(0xcd, 60);
            }
        }
        pkt(&q, 0, 48 + 2048, 2048, 100, 100, 70000);
        pkt(&q, 0, 48 + 4096, 0, 20, 60, 60);
        // Block 1: a first frame past the end of the block, a million frames claimed.
        block(&q, 1, 1_000_000, (BLOCK_SIZE - 8) as u32);
        // Block 2: a frame running past the block.
        block(&q, 2, 1, 48);
        pkt(&q, 2, 48, 0, 100, BLOCK_SIZE as u32, BLOCK_SIZE as u32);
        // Block 3 still the kernel's.
        let mut got = Vec::new();
        let (n, dropped) = q.recv_burst(64, &mut |h, f| got.push((*h, f.to_vec())));
        assert_eq!(n, 1);
        assert_eq!(dropped, 3 + 1_000_000 + 1, "cut, bad start, lost offset; block 1 as claimed; block 2");
        assert_eq!(got, vec![([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0], vec![0xcd; 60])]);
        let st = q.rx.lock().unwrap();
        assert_eq!(st.block, 3, "three blocks read and given back");
        for b in 0..3 {
            // SAFETY: inside the fake ring.
            let status = unsafe { st.map.ptr().add(b * BLOCK_SIZE + BD_STATUS).cast::<u32>().read() };
            assert_eq!(status, libc::TP_STATUS_KERNEL);
        }
    }

    #[test]
    fn a_burst_stops_at_max_and_resumes_inside_the_block() {
        let q = fake_queue();
        block(&q, 0, 3, 48);
        for i in 0..3 {
            let next = if i < 2 { 256 } else { 0 };
            pkt(&q, 0, 48 + 256 * i, next, 100, 60 + i as u32, 60 + i as u32);
        }
        let mut lens = Vec::new();
        assert_eq!(q.recv_burst(2, &mut |_, f| lens.push(f.len())), (2, 0));
        assert_eq!(q.recv_burst(2, &mut |_, f| lens.push(f.len())), (1, 0));
        assert_eq!(lens, [60, 61, 62]);
        assert_eq!(q.recv_burst(2, &mut |_, _| {}), (0, 0));
        assert_eq!(q.rx.lock().unwrap().block, 1);
    }
}
