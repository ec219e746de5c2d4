//! Descriptors (VIRTIO 1.2 §2.7.5): the guest's layout, the flags, and the device's private
//! copy.
//!
//! A descriptor is read from guest memory exactly once, with atomic loads, into a
//! [`Descriptor`] value; everything after that (validation, translation, the chain walk) uses
//! the copy, so a guest rewriting the table later cannot change what was validated
//! (hostile-inputs family 7, DPDK CVE-2020-14375).

#[cfg(target_has_atomic = "64")]
use core::sync::atomic::AtomicU64;
use core::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use bitflags::bitflags;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::mem::{load_u16, load_u32};

/// Size of one descriptor in the table, in bytes.
pub const DESC_SIZE: usize = 16;

bitflags! {
    /// `struct virtq_desc.flags` (§2.7.5). Unknown bits are retained and ignored.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct DescFlags: u16 {
        /// `VIRTQ_DESC_F_NEXT`: the buffer continues via the `next` field.
        const NEXT = 1;
        /// `VIRTQ_DESC_F_WRITE`: the buffer is device write-only (otherwise device read-only).
        const WRITE = 2;
        /// `VIRTQ_DESC_F_INDIRECT`: the buffer holds a table of descriptors (§2.7.5.3).
        const INDIRECT = 4;
    }
}

/// `struct virtq_desc` exactly as the driver lays it out in guest memory (little-endian).
/// Used by drivers (the test driver) to write tables; the device side reads with
/// `read_descriptor` (atomic loads into a [`Descriptor`]) instead of referencing this type in guest memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RawDescriptor {
    /// Guest physical address of the buffer.
    pub addr: U64,
    /// Length of the buffer in bytes.
    pub len: U32,
    /// [`DescFlags`] bits.
    pub flags: U16,
    /// Index of the next descriptor when `NEXT` is set.
    pub next: U16,
}

impl From<Descriptor> for RawDescriptor {
    fn from(d: Descriptor) -> Self {
        RawDescriptor {
            addr: U64::new(d.addr),
            len: U32::new(d.len),
            flags: U16::new(d.flags.bits()),
            next: U16::new(d.next),
        }
    }
}

/// The device's private copy of one descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Descriptor {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// Flags, unknown bits retained.
    pub flags: DescFlags,
    /// Next descriptor index (meaningful only with [`DescFlags::NEXT`]).
    pub next: u16,
}

impl Descriptor {
    /// Decodes the two little-endian 64-bit words of a descriptor.
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn from_words(lo: u64, hi: u64) -> Descriptor {
        Descriptor {
            addr: lo,
            len: hi as u32,
            flags: DescFlags::from_bits_retain((hi >> 32) as u16),
            next: (hi >> 48) as u16,
        }
    }
}

/// Copies descriptor `index` out of the table at `table`.
///
/// Two relaxed 64-bit atomic loads when the host address is 8-aligned (always, for tables in
/// page-aligned mappings at the 16-aligned guest addresses the spec requires), four 32-bit
/// loads on targets without 64-bit atomics, byte-wise atomic loads for an unaligned address
/// (an indirect table, whose alignment the spec does not constrain). Ordering
/// with respect to the driver's writes comes from the acquire load of `avail.idx` that made the
/// chain visible.
///
/// # Safety
/// `table` must be valid for reads of `(index + 1) * 16` bytes and only accessed atomically or
/// by the guest; `aligned8` must be true only if `table` is 8-aligned.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) unsafe fn read_descriptor(table: *mut u8, index: u16, aligned8: bool) -> Descriptor {
    // SAFETY: in bounds by the caller's contract.
    let p = unsafe { table.add(index as usize * DESC_SIZE) };
    #[cfg(not(target_has_atomic = "64"))]
    let _ = aligned8;
    // `table` 8-aligned implies every entry is (entries are 16 bytes).
    #[cfg(target_has_atomic = "64")]
    if aligned8 {
        // SAFETY: 16 valid bytes at an 8-aligned address, accessed only atomically.
        let (lo, hi) = unsafe {
            (
                AtomicU64::from_ptr(p.cast::<u64>()).load(Ordering::Relaxed),
                AtomicU64::from_ptr(p.cast::<u64>().add(1)).load(Ordering::Relaxed),
            )
        };
        return Descriptor::from_words(u64::from_le(lo), u64::from_le(hi));
    }
    if (p as usize).is_multiple_of(4) {
        // Targets without 64-bit atomics (Cortex-M), or a 4-aligned indirect table.
        let mut w = [0u32; 4];
        for (i, word) in w.iter_mut().enumerate() {
            // SAFETY: word `i < 4` of the descriptor, 4-aligned, valid by the caller's contract.
            *word = u32::from_le(unsafe { AtomicU32::from_ptr(p.cast::<u32>().add(i)) }.load(Ordering::Relaxed));
        }
        let lo = w[0] as u64 | (w[1] as u64) << 32;
        let hi = w[2] as u64 | (w[3] as u64) << 32;
        return Descriptor::from_words(lo, hi);
    }
    let mut b = [0u8; DESC_SIZE];
    for (i, byte) in b.iter_mut().enumerate() {
        // SAFETY: byte `i < 16` of the descriptor, valid by the caller's contract; a byte is
        // always aligned.
        *byte = unsafe { AtomicU8::from_ptr(p.add(i)) }.load(Ordering::Relaxed);
    }
    let lo = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let hi = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    Descriptor::from_words(lo, hi)
}

/// Copies a packed-ring descriptor (§2.8.13: `le64 addr; le32 len; le16 id; le16 flags`) at
/// `p` out as `(addr, len, id, flags)`, one relaxed atomic load per field, of the field's own
/// size: the driver writes the fields one by one and the device writes `len`, `id` and
/// `flags` of used descriptors at the same places, so every location is accessed at one width
/// by both sides (a descriptor ring is written concurrently, unlike a split table). Ordering
/// comes from the acquire load of the chain's flags that made it available. A `p` that is not
/// 4-aligned (an indirect table, whose alignment the spec does not constrain, and which only
/// the driver writes, before making it available) is read byte by byte.
///
/// # Safety
/// `p` must be valid for reads of 16 bytes and only accessed atomically or by the guest.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) unsafe fn read_packed(p: *mut u8) -> (u64, u32, u16, u16) {
    if (p as usize).is_multiple_of(4) {
        // SAFETY: 16 valid bytes at a 4-aligned address.
        let (addr, len, id) = unsafe { read_packed_aligned(p) };
        // SAFETY: `flags` at 14, 2-aligned inside the 16 valid bytes.
        return (addr, len, id, unsafe { load_u16(p.add(14), Ordering::Relaxed) });
    }
    let mut b = [0u8; DESC_SIZE];
    for (i, byte) in b.iter_mut().enumerate() {
        // SAFETY: byte `i < 16` of the descriptor, valid by the caller's contract.
        *byte = unsafe { AtomicU8::from_ptr(p.add(i)) }.load(Ordering::Relaxed);
    }
    (
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        u16::from_le_bytes([b[12], b[13]]),
        u16::from_le_bytes([b[14], b[15]]),
    )
}

/// `addr`, `len` and `id` of the packed descriptor at a 4-aligned `p` (a slot of a descriptor
/// ring, which is validated 4-aligned in host memory), read as [`read_packed`] reads them; for
/// a caller that already holds the flags (loaded with acquire to find the descriptor
/// available, §2.8.1), so that the chain is judged on that one load of them.
///
/// # Safety
/// `p` must be 4-aligned, valid for reads of 16 bytes and only accessed atomically or by the
/// guest.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) unsafe fn read_packed_aligned(p: *mut u8) -> (u64, u32, u16) {
    // SAFETY: 16 valid bytes at a 4-aligned address: `addr` (8-aligned on the 64-bit path),
    // `len` at 8 and `id` at 12 are aligned for their sizes.
    unsafe {
        #[cfg(target_has_atomic = "64")]
        let addr = if (p as usize).is_multiple_of(8) {
            u64::from_le(AtomicU64::from_ptr(p.cast::<u64>()).load(Ordering::Relaxed))
        } else {
            load_u32(p, Ordering::Relaxed) as u64 | (load_u32(p.add(4), Ordering::Relaxed) as u64) << 32
        };
        #[cfg(not(target_has_atomic = "64"))]
        let addr = load_u32(p, Ordering::Relaxed) as u64 | (load_u32(p.add(4), Ordering::Relaxed) as u64) << 32;
        (addr, load_u32(p.add(8), Ordering::Relaxed), load_u16(p.add(12), Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_layout_round_trips_aligned_and_unaligned() {
        let d = Descriptor {
            addr: 0x1122_3344_5566_7788,
            len: 0x99aa_bbcc,
            flags: DescFlags::NEXT | DescFlags::WRITE | DescFlags::from_bits_retain(0x8000),
            next: 0xbeef,
        };
        let raw = RawDescriptor::from(d);
        let mut buf = [0u64; 8];
        let bytes = buf.as_mut_bytes();
        bytes[..16].copy_from_slice(raw.as_bytes());
        bytes[17..33].copy_from_slice(raw.as_bytes());
        bytes[36..52].copy_from_slice(raw.as_bytes());
        let base = bytes.as_mut_ptr();
        // SAFETY: both reads stay inside `buf`.
        unsafe {
            assert_eq!(read_descriptor(base, 0, true), d);
            assert_eq!(read_descriptor(base, 0, false), d);
            assert_eq!(read_descriptor(base.add(17), 0, false), d);
            assert_eq!(read_descriptor(base.add(36), 0, false), d);
        }
        assert_eq!(core::mem::size_of::<RawDescriptor>(), DESC_SIZE);
    }

    #[test]
    fn packed_layout_reads_aligned_and_unaligned() {
        let mut raw = [0u8; DESC_SIZE];
        raw[..8].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        raw[8..12].copy_from_slice(&0x99aa_bbccu32.to_le_bytes());
        raw[12..14].copy_from_slice(&0xbeefu16.to_le_bytes());
        raw[14..].copy_from_slice(&0x8083u16.to_le_bytes());
        let mut buf = [0u64; 8];
        let bytes = buf.as_mut_bytes();
        for at in [0, 20, 41] {
            bytes[at..at + DESC_SIZE].copy_from_slice(&raw);
        }
        let base = bytes.as_mut_ptr();
        for at in [0, 20, 41] {
            // SAFETY: 16 bytes inside `buf`.
            let d = unsafe { read_packed(base.add(at)) };
            assert_eq!(d, (0x1122_3344_5566_7788, 0x99aa_bbcc, 0xbeef, 0x8083), "offset {at}");
        }
    }
}
