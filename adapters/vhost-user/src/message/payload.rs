//! "Payload": the structures front-end requests carry and their wire forms (native byte order).
//! Decoding a whole request is [`super::decode`]; these are its building blocks, also used to
//! encode replies.

use super::MEMORY_REGION_SIZE;
use crate::memory::MemoryRegionDesc;

/// The wire form of "Memory region description" (32 bytes: `guest_phys_addr`, `memory_size`,
/// `userspace_addr`, `mmap_offset`, native byte order). The type is the memory map's own
/// ([`MemoryRegionDesc`], one type from the wire to the map); only its encoding lives here,
/// with the rest of the wire layout.
impl MemoryRegionDesc {
    /// Decodes the 32-byte wire form. No check: see [`MemoryRegionDesc::validate`].
    pub fn from_bytes(bytes: &[u8; MEMORY_REGION_SIZE]) -> MemoryRegionDesc {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(w)
        };
        MemoryRegionDesc {
            guest_phys_addr: word(0),
            memory_size: word(1),
            userspace_addr: word(2),
            mmap_offset: word(3),
        }
    }

    /// The 32-byte wire form.
    pub fn to_bytes(&self) -> [u8; MEMORY_REGION_SIZE] {
        let mut out = [0u8; MEMORY_REGION_SIZE];
        for (i, v) in [self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset].iter().enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
        }
        out
    }
}

/// "Inflight description" (`GET_INFLIGHT_FD` request and reply, `SET_INFLIGHT_FD` request).
/// 24 bytes on the wire: C alignment pads the two `u16` to 8 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Inflight {
    /// Size of the inflight tracking area.
    pub mmap_size: u64,
    /// Offset of the area from the start of the fd.
    pub mmap_offset: u64,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Size of each virtqueue.
    pub queue_size: u16,
}

impl Inflight {
    /// Size on the wire.
    pub const SIZE: usize = 24;

    /// The 24-byte wire form (padding zeroed).
    pub fn to_bytes(&self) -> [u8; Inflight::SIZE] {
        let mut out = [0u8; Inflight::SIZE];
        out[0..8].copy_from_slice(&self.mmap_size.to_ne_bytes());
        out[8..16].copy_from_slice(&self.mmap_offset.to_ne_bytes());
        out[16..18].copy_from_slice(&self.num_queues.to_ne_bytes());
        out[18..20].copy_from_slice(&self.queue_size.to_ne_bytes());
        out
    }
}

/// "An IOTLB message" (`struct vhost_iotlb_msg`), 32 bytes on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IotlbMessage {
    /// I/O virtual address programmed by the guest.
    pub iova: u64,
    /// Size of the range.
    pub size: u64,
    /// Front-end virtual address the range maps to.
    pub user_addr: u64,
    /// Permissions: [`IotlbMessage::PERM_NONE`] … [`IotlbMessage::PERM_RW`]. Kept raw.
    pub perm: u8,
    /// Message type: [`IotlbMessage::MISS`] … [`IotlbMessage::ACCESS_FAIL`]. Kept raw.
    pub msg_type: u8,
}

impl IotlbMessage {
    /// Permission: no access.
    pub const PERM_NONE: u8 = 0;
    /// Permission: read.
    pub const PERM_RO: u8 = 1;
    /// Permission: write.
    pub const PERM_WO: u8 = 2;
    /// Permission: read/write.
    pub const PERM_RW: u8 = 3;
    /// Type 1: IOTLB miss (back-end → front-end).
    pub const MISS: u8 = 1;
    /// Type 2: IOTLB update.
    pub const UPDATE: u8 = 2;
    /// Type 3: IOTLB invalidate.
    pub const INVALIDATE: u8 = 3;
    /// Type 4: access failure (back-end → front-end).
    pub const ACCESS_FAIL: u8 = 4;
}

/// Bits 0–7 of the `SET_VRING_KICK/CALL/ERR` payload: the vring index.
pub const VRING_INDEX_MASK: u64 = 0xff;
/// Bit 8 of the `SET_VRING_KICK/CALL/ERR` payload: "the invalid FD flag … set when there is no
/// file descriptor in the ancillary data".
pub const VRING_INVALID_FD_FLAG: u64 = 1 << 8;

/// `SET_VRING_ADDR` flags bit 0, `VHOST_VRING_F_LOG`: log used-ring writes ("Migration").
pub const VRING_F_LOG: u32 = 1 << 0;

/// "Virtio device config space" flags value 0: a front-end write of writable fields.
pub const CONFIG_FLAGS_WRITABLE: u32 = 0;
/// "Virtio device config space" flags value 1: a write for live migration (may touch
/// read-only fields).
pub const CONFIG_FLAGS_MIGRATION: u32 = 1;
