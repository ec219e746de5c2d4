//! Guest-side writer: lays out one split virtqueue and its pre-built descriptor chains in the
//! guest memory, with plain stores through the host mapping. It depends on neither device
//! implementation (it only uses vm-memory to create the mapping and find its host address).
//!
//! Memory map (guest physical, region base `GPA_BASE`, 4 MiB anonymous mmap):
//!
//! | offset   | what                                                         |
//! |----------|--------------------------------------------------------------|
//! | 0x0000   | descriptor table, 256 × 16 B                                 |
//! | 0x1000   | avail ring: flags, idx, ring\[256\], used_event (518 B)        |
//! | 0x2000   | used ring: flags, idx, ring\[256\] × 8 B, avail_event (2054 B) |
//! | 0x3000   | indirect tables, 256 × 64 B (only `indirect4`)               |
//! | 0x8000.. | data buffers, each 64-byte aligned and padded, never shared  |

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::{Dir, Setup, Shape, FEATURES};

/// Guest physical address of the single memory region (deliberately not 0).
pub const GPA_BASE: u64 = 0x1_0000;
/// Size of the guest memory region.
pub const MEM_SIZE: usize = 4 << 20;
/// Queue size negotiated by the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Chains published (and consumed) per batch.
pub const BATCH: u16 = 32;
/// virtio-net header length (`struct virtio_net_hdr_v1` without the hash/RSC extensions).
pub const NET_HDR_LEN: usize = 12;

/// Split virtqueue descriptor flags (virtio 1.2, 2.7.5).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Buffer is device write-only.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Buffer holds an indirect descriptor table.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

const DESC_OFF: u64 = 0x0000;
const AVAIL_OFF: u64 = 0x1000;
const USED_OFF: u64 = 0x2000;
const INDIRECT_OFF: u64 = 0x3000;
const BUF_OFF: u64 = 0x8000;
const INDIRECT_ENTRIES: u16 = 4;

/// One guest buffer of a chain, in chain order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Ground truth for one avail ring slot: the head the driver put there and the buffers of its
/// chain in order.
#[derive(Clone, Debug)]
pub struct Chain {
    /// Descriptor index written into the avail ring slot.
    pub head: u16,
    /// The chain's buffers, in the order a device walks them.
    pub segs: Vec<Seg>,
}

/// Byte `off` of TX buffer number `buf_no` (what the guest put there).
pub fn tx_byte(buf_no: usize, off: usize) -> u8 {
    (buf_no.wrapping_mul(29) ^ off.wrapping_mul(7) ^ (off >> 8)) as u8
}

/// Plain little-endian writes into the host mapping of the region.
struct GuestWriter {
    host: *mut u8,
    gpa_base: u64,
    size: usize,
}

impl GuestWriter {
    fn ptr(&self, gpa: u64, len: usize) -> *mut u8 {
        let off = gpa.checked_sub(self.gpa_base).expect("gpa below region") as usize;
        assert!(off.checked_add(len).is_some_and(|end| end <= self.size), "gpa {gpa:#x}+{len} outside region");
        // SAFETY: `off + len <= size` was just checked, so the pointer stays inside the mapping.
        unsafe { self.host.add(off) }
    }

    fn bytes(&self, gpa: u64, data: &[u8]) {
        let p = self.ptr(gpa, data.len());
        // SAFETY: `p..p+len` is inside the mapping (checked by `ptr`), and `data` is a local
        // buffer, so the ranges cannot overlap. No reference into the mapping is alive.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) }
    }

    fn u16(&self, gpa: u64, v: u16) {
        self.bytes(gpa, &v.to_le_bytes());
    }

    fn desc(&self, table: u64, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.bytes(table + u64::from(idx) * 16, &d);
    }
}

/// Bump allocator for data buffers: 64-byte aligned, padded to 64, never reused.
struct BufAlloc {
    next: u64,
    end: u64,
    count: usize,
}

impl BufAlloc {
    fn alloc(&mut self, len: usize) -> (u64, usize) {
        let gpa = self.next;
        self.next += (len as u64).div_ceil(64) * 64;
        assert!(self.next <= self.end, "buffers do not fit in the region");
        self.count += 1;
        (gpa, self.count - 1)
    }
}

/// Builds the queue and all chains for a scenario in `mem` and returns the device-facing
/// `Setup` plus the per-avail-slot ground truth.
pub fn build(mem: &GuestMemoryMmap, shape: Shape, size: usize, dir: Dir) -> (Setup, Vec<Chain>) {
    assert!(size > 0 && size + NET_HDR_LEN <= crate::FRAME_BUF);
    let host_base = mem.get_host_address(GuestAddress(GPA_BASE)).expect("region base has no host address");
    let w = GuestWriter { host: host_base, gpa_base: GPA_BASE, size: MEM_SIZE };
    let desc_table = GPA_BASE + DESC_OFF;
    let avail_ring = GPA_BASE + AVAIL_OFF;
    let used_ring = GPA_BASE + USED_OFF;
    let mut bufs = BufAlloc { next: GPA_BASE + BUF_OFF, end: GPA_BASE + MEM_SIZE as u64, count: 0 };
    let wflag = match dir {
        Dir::Tx => 0,
        Dir::Rx => VIRTQ_DESC_F_WRITE,
    };
    // Allocate one buffer; TX buffers get a recognisable pattern, RX buffers stay zero.
    let mut buffer = |len: usize| -> Seg {
        let (gpa, no) = bufs.alloc(len);
        if dir == Dir::Tx {
            let data: Vec<u8> = (0..len).map(|off| tx_byte(no, off)).collect();
            w.bytes(gpa, &data);
        }
        Seg { gpa, len: len as u32 }
    };

    let q = QUEUE_SIZE;
    // Distinct chains, indexed by head.
    let mut by_head: Vec<Option<Vec<Seg>>> = vec![None; q as usize];
    match shape {
        Shape::OneDesc => {
            for head in 0..q {
                let s = buffer(size);
                w.desc(desc_table, head, s.gpa, s.len, wflag, 0);
                by_head[head as usize] = Some(vec![s]);
            }
        }
        Shape::TwoDesc => {
            for c in 0..q / 2 {
                let head = 2 * c;
                let hdr = buffer(NET_HDR_LEN);
                let data = buffer(size);
                w.desc(desc_table, head, hdr.gpa, hdr.len, wflag | VIRTQ_DESC_F_NEXT, head + 1);
                w.desc(desc_table, head + 1, data.gpa, data.len, wflag, 0);
                by_head[head as usize] = Some(vec![hdr, data]);
            }
        }
        Shape::Indirect4 => {
            let piece = size / 3;
            let pieces = [piece, piece, size - 2 * piece];
            for head in 0..q {
                let table = GPA_BASE + INDIRECT_OFF + u64::from(head) * 64;
                let mut segs = vec![buffer(NET_HDR_LEN)];
                segs.extend(pieces.iter().map(|&p| buffer(p)));
                for (i, s) in segs.iter().enumerate() {
                    let i = i as u16;
                    let last = i + 1 == INDIRECT_ENTRIES;
                    let flags = wflag | if last { 0 } else { VIRTQ_DESC_F_NEXT };
                    let next = if last { 0 } else { i + 1 };
                    w.desc(table, i, s.gpa, s.len, flags, next);
                }
                // The device ignores F_WRITE on a descriptor that refers to an indirect table,
                // so the driver does not set it (virtio 1.2, 2.7.5.3.1).
                w.desc(desc_table, head, table, u32::from(INDIRECT_ENTRIES) * 16, VIRTQ_DESC_F_INDIRECT, 0);
                by_head[head as usize] = Some(segs);
            }
        }
    }

    // A TX chain starts with a zeroed virtio-net header (no offloads), as a driver sends it,
    // so that a device applying the TX rules (`--impl virtq-net`) takes the usual path.
    if dir == Dir::Tx {
        for segs in by_head.iter().flatten() {
            let first = &segs[0];
            w.bytes(first.gpa, &[0; NET_HDR_LEN][..NET_HDR_LEN.min(first.len as usize)]);
        }
    }

    // Avail ring: flags 0, idx 0, every slot pre-filled, used_event 0.
    let chains: Vec<Chain> = (0..q)
        .map(|slot| {
            let head = match shape {
                Shape::OneDesc | Shape::Indirect4 => slot,
                Shape::TwoDesc => 2 * (slot % (q / 2)),
            };
            w.u16(avail_ring + 4 + 2 * u64::from(slot), head);
            Chain { head, segs: by_head[head as usize].clone().expect("slot maps to no chain") }
        })
        .collect();
    w.u16(avail_ring, 0);
    w.u16(avail_ring + 2, 0);
    w.u16(avail_ring + 4 + 2 * u64::from(q), 0);
    // Used ring: flags 0, idx 0, avail_event 0 (the mmap is zeroed, this is explicit).
    w.u16(used_ring, 0);
    w.u16(used_ring + 2, 0);
    w.u16(used_ring + 4 + 8 * u64::from(q), 0);

    let chain_len = match shape {
        Shape::OneDesc => size,
        Shape::TwoDesc | Shape::Indirect4 => size + NET_HDR_LEN,
    };
    let setup = Setup {
        host_base,
        gpa_base: GPA_BASE,
        mem_size: MEM_SIZE,
        desc_table,
        avail_ring,
        used_ring,
        queue_size: q,
        features: FEATURES,
        shape,
        size,
        dir,
        chain_len,
    };
    (setup, chains)
}
