//! Guest memory: address translation behind a trait, a fixed-capacity region table, and the
//! atomic accessors used for every ring index and flag.
//!
//! Guest memory is shared with an untrusted driver that may write it at any time. The core
//! therefore never forms a Rust reference (`&[u8]`, `&T`) into it: ring fields are accessed with
//! single atomic-width loads and stores (the lesson of RUSTSEC-2020-0157), descriptors are copied
//! out with atomic loads, and payload bytes are moved with `copy_nonoverlapping` between a host
//! pointer obtained from [`GuestMemory::translate`] and a caller buffer.

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU16, AtomicU32, Ordering};

/// A host view of part of guest memory: `len` bytes at `ptr`, contiguous in host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRange {
    /// Host address of the first byte.
    pub ptr: NonNull<u8>,
    /// Number of bytes contiguous in host memory from `ptr` (at least 1).
    pub len: usize,
}

/// Why a guest address range could not be translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum MemError {
    /// No region contains this guest address.
    Unmapped {
        /// The first guest address that is not backed by a region.
        addr: u64,
    },
    /// The range is mapped but not contiguous in host memory (it spans two regions) where the
    /// core needs one contiguous array (a ring or an indirect table).
    NotContiguous {
        /// Guest address where host contiguity ends.
        addr: u64,
    },
    /// `addr + len` does not fit in 64 bits.
    Overflow {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemError::Unmapped { addr } => write!(f, "guest address {addr:#x} is not mapped"),
            MemError::NotContiguous { addr } => {
                write!(f, "guest range is not host-contiguous at {addr:#x}")
            }
            MemError::Overflow { addr, len } => {
                write!(f, "guest range {addr:#x}+{len:#x} overflows 64 bits")
            }
        }
    }
}

/// Translation of guest addresses to host memory.
///
/// A buffer that spans several regions is translated piece by piece: each call returns the
/// host address of `addr` and how many bytes from there are contiguous, so the caller never
/// reads or writes past the end of a region.
///
/// # Safety
/// Implementors guarantee that for every `Ok(range)` returned by [`translate`](Self::translate),
/// `range.ptr` is valid for reads and writes of `range.len` bytes for as long as the `&self`
/// borrow used for the call lives, that `1 <= range.len <= len`, and that the memory is not
/// accessed through Rust references elsewhere in this process (only raw-pointer, atomic or
/// volatile access, because the guest may write it concurrently). The core checks alignment of
/// the returned pointers itself.
///
/// # Memory that can be taken away
/// "Valid for reads and writes" means an access never faults, even if whoever provides the
/// memory withdraws it while the borrow lives (a vhost-user front-end that shrinks the file
/// backing guest RAM, a PCIe window that goes away). A translator over such memory must make
/// the access complete anyway, for example by putting zero pages in its place the moment it
/// faults (`virtq-vhost-user`'s `memory::fault` does that for `SIGBUS`), and must tell its
/// owner out of band, so that the owner stops the device. It may not promise that the bytes
/// read are the guest's: the core already treats every byte of guest memory as hostile, so
/// zeroes (an empty available ring, a zero descriptor) only ever produce a typed error or an
/// empty ring, never an access outside the translated ranges. A translator must never unmap
/// memory it has handed out while the `&self` borrow lives.
pub unsafe trait GuestMemory {
    /// Translates guest address `addr` for an access of up to `len` bytes (`len >= 1`).
    fn translate(&self, addr: u64, len: u64) -> Result<HostRange, MemError>;

    /// The inverse of [`translate`](Self::translate): the guest address of host address
    /// `host`, if it lies in memory this translator hands out. Write tracking
    /// ([`crate::dirty`]) reports the buffers the device wrote with it; a translator that
    /// answers `None` (the default) cannot have its buffer writes tracked.
    fn guest_address(&self, _host: NonNull<u8>) -> Option<u64> {
        None
    }

    /// Translates `[addr, addr + len)` and requires it to be contiguous in host memory.
    /// Used for rings and indirect tables, which the core accesses as one array.
    fn translate_contiguous(&self, addr: u64, len: u64) -> Result<NonNull<u8>, MemError> {
        let r = self.translate(addr, len)?;
        if (r.len as u64) < len {
            let end = addr + r.len as u64;
            // Distinguish a range running off guest memory from one crossing into another region.
            self.translate(end, 1)?;
            return Err(MemError::NotContiguous { addr: end });
        }
        Ok(r.ptr)
    }
}

// SAFETY: forwards to `T`, whose guarantee holds for the lifetime of the inner borrow, which is
// at least the lifetime of the outer one.
unsafe impl<T: GuestMemory + ?Sized> GuestMemory for &T {
    #[inline]
    fn translate(&self, addr: u64, len: u64) -> Result<HostRange, MemError> {
        (**self).translate(addr, len)
    }
    #[inline]
    fn guest_address(&self, host: NonNull<u8>) -> Option<u64> {
        (**self).guest_address(host)
    }
}

/// One guest memory region backed by host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    gpa: u64,
    len: u64,
    host: NonNull<u8>,
}

impl Region {
    /// Describes `len` bytes of guest memory at guest address `gpa`, backed by host memory at
    /// `host`.
    ///
    /// # Safety
    /// `host` must be valid for reads and writes of `len` bytes for as long as any
    /// [`RegionTable`] holding this region (or any range translated through it) is in use, and
    /// the memory must not be accessed through Rust references while it is.
    pub unsafe fn new(gpa: u64, host: NonNull<u8>, len: u64) -> Region {
        Region { gpa, len, host }
    }

    /// Guest address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a zero-length region (never accepted into a [`RegionTable`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host address of the first byte.
    pub fn host(&self) -> NonNull<u8> {
        self.host
    }

    /// One past the last guest address; `None` if that overflows.
    fn end(&self) -> Option<u64> {
        self.gpa.checked_add(self.len)
    }
}

/// Why a region could not be added to a [`RegionTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RegionError {
    /// The table already holds its capacity of regions.
    Full,
    /// The region has length 0.
    Empty,
    /// `gpa + len` overflows 64 bits, or the host range would wrap the address space.
    Overflow,
    /// The region overlaps one already in the table.
    Overlap {
        /// Guest address of the region it overlaps.
        existing_gpa: u64,
    },
    /// No region starts at that guest address.
    NotFound,
}

impl fmt::Display for RegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionError::Full => f.write_str("region table is full"),
            RegionError::Empty => f.write_str("region has length 0"),
            RegionError::Overflow => f.write_str("region end overflows"),
            RegionError::Overlap { existing_gpa } => {
                write!(f, "region overlaps the region at {existing_gpa:#x}")
            }
            RegionError::NotFound => f.write_str("no such region"),
        }
    }
}

/// A fixed-capacity table of up to `N` non-overlapping guest memory regions, sorted by guest
/// address. No allocation; lookups are a linear scan for small tables.
#[derive(Clone, Debug, Default)]
pub struct RegionTable<const N: usize> {
    regions: heapless::Vec<Region, N>,
}

impl<const N: usize> RegionTable<N> {
    /// An empty table.
    pub const fn new() -> Self {
        RegionTable { regions: heapless::Vec::new() }
    }

    /// Adds a region, rejecting empty, overflowing and overlapping regions and a full table.
    pub fn add(&mut self, region: Region) -> Result<(), RegionError> {
        if region.len == 0 {
            return Err(RegionError::Empty);
        }
        let end = region.end().ok_or(RegionError::Overflow)?;
        // The host range must not wrap either: `host + len - 1` has to be addressable.
        if (region.host.as_ptr() as usize)
            .checked_add(usize::try_from(region.len - 1).map_err(|_| RegionError::Overflow)?)
            .is_none()
        {
            return Err(RegionError::Overflow);
        }
        let pos = self.regions.partition_point(|r| r.gpa < region.gpa);
        if let Some(next) = self.regions.get(pos) {
            if next.gpa < end {
                return Err(RegionError::Overlap { existing_gpa: next.gpa });
            }
        }
        if pos > 0 {
            let prev = &self.regions[pos - 1];
            // `prev.end()` cannot overflow: it was checked when `prev` was added.
            if prev.gpa + prev.len > region.gpa {
                return Err(RegionError::Overlap { existing_gpa: prev.gpa });
            }
        }
        self.regions.insert(pos, region).map_err(|_| RegionError::Full)
    }

    /// Removes the region that starts at `gpa`, returning it.
    pub fn remove(&mut self, gpa: u64) -> Result<Region, RegionError> {
        let pos = self.regions.iter().position(|r| r.gpa == gpa).ok_or(RegionError::NotFound)?;
        Ok(self.regions.remove(pos))
    }

    /// Removes every region.
    pub fn clear(&mut self) {
        self.regions.clear();
    }

    /// The regions, sorted by guest address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// True if the table holds no region.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }
}

// SAFETY: every region was created through `Region::new`, whose contract makes its host range
// valid for `len` bytes while the table is in use; `translate` only returns pointers inside one
// region and lengths that stay inside it (`off < r.len`, `n <= r.len - off`). A range that
// starts inside a region never overflows there: region ends were checked by `add`.
unsafe impl<const N: usize> GuestMemory for RegionTable<N> {
    #[inline]
    fn translate(&self, addr: u64, len: u64) -> Result<HostRange, MemError> {
        for r in self.regions.iter() {
            // One unsigned comparison: `addr < r.gpa` wraps to a huge offset.
            let off = addr.wrapping_sub(r.gpa);
            if off < r.len {
                let n = len.min(r.len - off);
                // SAFETY: `off < r.len` and the region's host range is valid for `r.len`
                // bytes (Region::new contract; `add` checked it does not wrap), so the offset
                // pointer stays in bounds and is non-null.
                let ptr = unsafe { NonNull::new_unchecked(r.host.as_ptr().add(off as usize)) };
                return Ok(HostRange { ptr, len: n as usize });
            }
        }
        if addr.checked_add(len).is_none() {
            return Err(MemError::Overflow { addr, len });
        }
        Err(MemError::Unmapped { addr })
    }

    #[inline]
    fn guest_address(&self, host: NonNull<u8>) -> Option<u64> {
        let h = host.as_ptr() as usize;
        self.regions.iter().find_map(|r| {
            let off = h.wrapping_sub(r.host.as_ptr() as usize) as u64;
            (off < r.len).then(|| r.gpa + off)
        })
    }
}

/// Copies `n` bytes between guest memory and a device buffer (either direction).
///
/// Pieces of up to 128 bytes (headers, small frames with their header, the pieces of small
/// chains) are copied inline with overlapping unaligned 8/16-byte moves, which avoids a
/// `memcpy` call and the register spills around it on the per-descriptor path, and lets the
/// CPU see the loads of the next frame's descriptor while this frame's lines are still
/// coming (a 64-byte frame behind its 12-byte header is 76 bytes); larger ones call `memcpy`.
/// Overlapping stores write some bytes twice with the same value, which is harmless.
///
/// # Safety
/// `src` valid for reads and `dst` for writes of `n` bytes; the ranges do not overlap (only
/// the `memcpy` arm, above 128 bytes, relies on it: the others load before they store, with
/// unaligned reads and writes, which is sound for overlapping ranges; see [`move_bytes`]).
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) unsafe fn copy_bytes(src: *const u8, dst: *mut u8, n: usize) {
    use core::ptr::{read_unaligned as rd, write_unaligned as wr};
    // SAFETY: every access is within `[0, n)` of both ranges, by the bounds of each arm (e.g.
    // for 8 <= n <= 16, offsets 0..8 and n-8..n); unaligned accesses use read/write_unaligned.
    unsafe {
        if n > 128 {
            core::ptr::copy_nonoverlapping(src, dst, n);
        } else if n > 64 {
            let v: [u128; 8] = [
                rd(src.cast::<u128>()),
                rd(src.add(16).cast::<u128>()),
                rd(src.add(32).cast::<u128>()),
                rd(src.add(48).cast::<u128>()),
                rd(src.add(n - 64).cast::<u128>()),
                rd(src.add(n - 48).cast::<u128>()),
                rd(src.add(n - 32).cast::<u128>()),
                rd(src.add(n - 16).cast::<u128>()),
            ];
            for (k, off) in [0, 16, 32, 48, n - 64, n - 48, n - 32, n - 16].into_iter().enumerate() {
                wr(dst.add(off).cast::<u128>(), v[k]);
            }
        } else if n > 32 {
            let a = rd(src.cast::<u128>());
            let b = rd(src.add(16).cast::<u128>());
            let c = rd(src.add(n - 32).cast::<u128>());
            let d = rd(src.add(n - 16).cast::<u128>());
            wr(dst.cast::<u128>(), a);
            wr(dst.add(16).cast::<u128>(), b);
            wr(dst.add(n - 32).cast::<u128>(), c);
            wr(dst.add(n - 16).cast::<u128>(), d);
        } else if n > 16 {
            let (a, b) = (rd(src.cast::<u128>()), rd(src.add(n - 16).cast::<u128>()));
            wr(dst.cast::<u128>(), a);
            wr(dst.add(n - 16).cast::<u128>(), b);
        } else if n >= 8 {
            let (a, b) = (rd(src.cast::<u64>()), rd(src.add(n - 8).cast::<u64>()));
            wr(dst.cast::<u64>(), a);
            wr(dst.add(n - 8).cast::<u64>(), b);
        } else if n >= 4 {
            let (a, b) = (rd(src.cast::<u32>()), rd(src.add(n - 4).cast::<u32>()));
            wr(dst.cast::<u32>(), a);
            wr(dst.add(n - 4).cast::<u32>(), b);
        } else {
            for i in 0..n {
                *dst.add(i) = *src.add(i);
            }
        }
    }
}

/// [`copy_bytes`] for ranges that may overlap: guest memory to guest memory, where a driver
/// can make a buffer it gives for reading overlap one it gives for writing (a port that
/// sends a guest's frames back to it). The bytes that land are then unspecified, as they are
/// whenever a driver writes a buffer the device reads; the copy stays within both ranges.
///
/// # Safety
/// `src` valid for reads and `dst` for writes of `n` bytes.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) unsafe fn move_bytes(src: *const u8, dst: *mut u8, n: usize) {
    // SAFETY: the caller's contract, which is `copy_bytes`'s but for overlap: `ptr::copy`
    // (memmove) allows it, and below 129 bytes `copy_bytes` loads every byte before it stores
    // (or copies byte by byte), with raw unaligned accesses, for which overlap is sound.
    unsafe {
        if n > 128 {
            core::ptr::copy(src, dst, n);
        } else {
            copy_bytes(src, dst, n);
        }
    }
}

/// Writes a virtio-net header of `n` bytes (`8 <= n <= 16`: the 10- or 12-byte header) to
/// guest memory at `dst`, but only if the bytes there differ.
///
/// The driver reads every header it receives (`num_buffers` with MRG_RXBUF), and a driver
/// that recycles its buffers gets most of them back holding the very header the device
/// wrote last time (zero flags, `num_buffers` 1). Reading first keeps that cache line shared
/// between the two CPUs instead of moving it to the device and back for each frame; DPDK's
/// vhost does the same (`ASSIGN_UNLESS_EQUAL`). Measured with `benches/vs-dpdk.sh`
/// (rx64-mrg), see CHANGELOG.
///
/// # Safety
/// `src` valid for reads and `dst` for reads and writes of `n` bytes; the ranges do not
/// overlap.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) unsafe fn store_header(src: *const u8, dst: *mut u8, n: usize) {
    use core::ptr::{read_unaligned as rd, write_unaligned as wr};
    debug_assert!((8..=16).contains(&n));
    // SAFETY: offsets 0..8 and n-8..n lie within `[0, n)` of both ranges (8 <= n), and the
    // accesses are unaligned-safe; `dst` is readable and writable by the caller's contract.
    unsafe {
        let (a, b) = (rd(src.cast::<u64>()), rd(src.add(n - 8).cast::<u64>()));
        if rd(dst.cast::<u64>()) != a || rd(dst.add(n - 8).cast::<u64>()) != b {
            wr(dst.cast::<u64>(), a);
            wr(dst.add(n - 8).cast::<u64>(), b);
        }
    }
}

/// Loads a little-endian `u16` ring field with the given ordering.
///
/// # Safety
/// `p` must be valid for 2 bytes, 2-aligned, and accessed only atomically or by the guest.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) unsafe fn load_u16(p: *mut u8, order: Ordering) -> u16 {
    // SAFETY: guaranteed by the caller (valid, aligned, only atomic accesses in this process).
    u16::from_le(unsafe { AtomicU16::from_ptr(p.cast::<u16>()) }.load(order))
}

/// Stores a little-endian `u16` ring field with the given ordering.
///
/// # Safety
/// As for [`load_u16`].
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) unsafe fn store_u16(p: *mut u8, v: u16, order: Ordering) {
    // SAFETY: guaranteed by the caller (valid, aligned, only atomic accesses in this process).
    unsafe { AtomicU16::from_ptr(p.cast::<u16>()) }.store(v.to_le(), order)
}

/// Stores a little-endian `u32` ring field with the given ordering.
///
/// # Safety
/// `p` must be valid for 4 bytes, 4-aligned, and accessed only atomically or by the guest.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) unsafe fn store_u32(p: *mut u8, v: u32, order: Ordering) {
    // SAFETY: guaranteed by the caller (valid, aligned, only atomic accesses in this process).
    unsafe { AtomicU32::from_ptr(p.cast::<u32>()) }.store(v.to_le(), order)
}

/// Loads a little-endian `u32` ring field with the given ordering.
///
/// # Safety
/// As for [`store_u32`].
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) unsafe fn load_u32(p: *mut u8, order: Ordering) -> u32 {
    // SAFETY: guaranteed by the caller (valid, aligned, only atomic accesses in this process).
    u32::from_le(unsafe { AtomicU32::from_ptr(p.cast::<u32>()) }.load(order))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    fn region(gpa: u64, buf: &mut [u8]) -> Region {
        // SAFETY: the test buffers outlive the tables built from them.
        unsafe { Region::new(gpa, NonNull::new(buf.as_mut_ptr()).unwrap(), buf.len() as u64) }
    }

    #[test]
    fn add_rejects_empty_overflow_overlap_and_full() {
        let mut a = vec![0u8; 0x1000];
        let mut b = vec![0u8; 0x1000];
        let mut t = RegionTable::<2>::new();
        assert_eq!(t.add(region(0x1000, &mut a[..0])), Err(RegionError::Empty));
        assert_eq!(t.add(region(u64::MAX - 0x10, &mut a)), Err(RegionError::Overflow));
        t.add(region(0x1000, &mut a)).unwrap();
        assert_eq!(t.add(region(0x1800, &mut b)), Err(RegionError::Overlap { existing_gpa: 0x1000 }));
        assert_eq!(t.add(region(0x0800, &mut b)), Err(RegionError::Overlap { existing_gpa: 0x1000 }));
        t.add(region(0x2000, &mut b)).unwrap();
        let mut c = vec![0u8; 16];
        assert_eq!(t.add(region(0x9000, &mut c)), Err(RegionError::Full));
        assert_eq!(t.remove(0x1234), Err(RegionError::NotFound));
        t.remove(0x1000).unwrap();
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn copy_bytes_copies_exactly_n_bytes_for_every_size() {
        let src: std::vec::Vec<u8> = (0..200u8).collect();
        for n in 0..150 {
            let mut dst = vec![0xeeu8; 200];
            // SAFETY: both buffers hold 200 >= n bytes and do not overlap.
            unsafe { copy_bytes(src.as_ptr().add(3), dst.as_mut_ptr().add(5), n) };
            assert_eq!(&dst[5..5 + n], &src[3..3 + n], "n = {n}");
            assert!(dst[..5].iter().chain(&dst[5 + n..]).all(|&b| b == 0xee), "n = {n}");
        }
    }

    #[test]
    fn translate_reports_contiguous_length_across_regions() {
        let mut a = vec![0u8; 0x1000];
        let mut b = vec![0u8; 0x1000];
        let mut t = RegionTable::<4>::new();
        t.add(region(0x2000, &mut b)).unwrap();
        t.add(region(0x1000, &mut a)).unwrap();
        // Spans both regions: first piece ends at the region boundary.
        let r = t.translate(0x1ff0, 0x20).unwrap();
        assert_eq!(r.len, 0x10);
        assert_eq!(r.ptr.as_ptr(), a.as_mut_ptr().wrapping_add(0xff0));
        let r = t.translate(0x2000, 0x10).unwrap();
        assert_eq!(r.ptr.as_ptr(), b.as_mut_ptr());
        // The last byte of a region is translatable (the Firecracker #1296 off-by-one).
        assert_eq!(t.translate(0x2fff, 1).unwrap().len, 1);
        assert_eq!(t.translate(0x3000, 1), Err(MemError::Unmapped { addr: 0x3000 }));
        assert_eq!(t.translate(0xfff, 1), Err(MemError::Unmapped { addr: 0xfff }));
        assert!(matches!(t.translate(u64::MAX, 2), Err(MemError::Overflow { .. })));
        assert!(t.translate_contiguous(0x1ff0, 0x20).is_err());
        assert!(t.translate_contiguous(0x1000, 0x1000).is_ok());
    }
}
