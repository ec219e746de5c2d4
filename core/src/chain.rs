//! Descriptor chains (VIRTIO 1.2 §2.7.5.2, §2.7.5.3): the walk from a head through direct
//! descriptors and at most one indirect table, producing a translated, validated list of
//! device-readable segments followed by device-writable segments.
//!
//! The walk is bounded without any allocation: each table (the queue's descriptor table, or one
//! indirect table) may be visited at most as many times as it has entries, which rejects loops
//! of any shape, including a zero-length self-loop (hostile-inputs family 2). Every descriptor is
//! copied out once (`desc::read_descriptor`, with single atomic loads) before its fields are checked.

use core::fmt;
use core::marker::PhantomData;
use core::ptr::NonNull;

use crate::desc::{read_descriptor, DescFlags, DESC_SIZE};
use crate::dirty::{log_host, WriteLog};
use crate::mem::{copy_bytes, GuestMemory, MemError};

/// Default capacity of a [`Chain`]'s segment list.
pub const DEFAULT_SEGMENTS: usize = 32;

/// A chain that broke a rule of §2.7.5. Each variant names the rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ChainError {
    /// A `next` index (or the head) is not below the table's entry count (family 1).
    NextOutOfRange {
        /// The offending index.
        index: u16,
    },
    /// More descriptors than the table holds were visited: a loop, or a chain longer than the
    /// queue size (§2.7.5.2 "MUST NOT create a descriptor chain longer than the Queue Size").
    ChainTooLong,
    /// A device-readable descriptor follows a device-writable one (§2.7.5.2).
    ReadableAfterWritable,
    /// The chain's total length exceeds 2^32 bytes (§2.7.5.2).
    TotalLengthOverflow,
    /// A buffer's `addr + len` overflows 64 bits (family 5).
    AddressOverflow {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// Part of a buffer is not in guest memory.
    Unmapped {
        /// The guest address that could not be translated.
        addr: u64,
    },
    /// `VIRTQ_DESC_F_INDIRECT` inside an indirect table (§2.7.5.3.1).
    NestedIndirect,
    /// `VIRTQ_DESC_F_INDIRECT` together with `VIRTQ_DESC_F_NEXT` (§2.7.5.3.1).
    IndirectWithNext,
    /// `VIRTQ_DESC_F_INDIRECT` without `VIRTIO_F_INDIRECT_DESC` negotiated (§2.7.5.3.1).
    IndirectNotNegotiated,
    /// An indirect table whose length is 0 or not a multiple of 16 (§2.7.5.3: the table is
    /// `struct virtq_desc desc[len / 16]`).
    IndirectLength {
        /// The table's `len`.
        len: u32,
    },
    /// An indirect table with more entries than the configured limit (default: queue size).
    IndirectTooLarge {
        /// Number of entries.
        entries: u32,
    },
    /// An indirect table that is not contiguous in host memory (crosses a region boundary).
    IndirectNotContiguous {
        /// Guest address of the table.
        addr: u64,
    },
    /// The chain has more non-empty buffer pieces than the segment list holds.
    TooManySegments,
    /// Packed ring (§2.8.6, §2.8.4): a descriptor after the first of a chain (the previous one
    /// had `VIRTQ_DESC_F_NEXT`) was not made available in the device's current round: its
    /// AVAIL/USED flags do not match the driver-ring wrap counter. The driver makes the first
    /// descriptor of a chain available last, so the rest must already be available.
    NotAvailable {
        /// Ring slot of the descriptor that is not available.
        index: u16,
    },
    /// Packed ring (§2.8.7): a descriptor with `VIRTQ_DESC_F_INDIRECT` inside a list linked by
    /// `VIRTQ_DESC_F_NEXT` ("A driver MUST NOT write direct descriptors with DESC_F_INDIRECT
    /// set in a scatter-gather list linked by VIRTQ_DESC_F_NEXT").
    IndirectInChain,
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainError::NextOutOfRange { index } => write!(f, "descriptor index {index} out of range"),
            ChainError::ChainTooLong => f.write_str("descriptor chain loops or exceeds the table size"),
            ChainError::ReadableAfterWritable => f.write_str("device-readable descriptor after a device-writable one"),
            ChainError::TotalLengthOverflow => f.write_str("chain longer than 2^32 bytes"),
            ChainError::AddressOverflow { addr, len } => {
                write!(f, "buffer {addr:#x}+{len:#x} overflows the address space")
            }
            ChainError::Unmapped { addr } => write!(f, "buffer address {addr:#x} is not in guest memory"),
            ChainError::NestedIndirect => f.write_str("indirect descriptor inside an indirect table"),
            ChainError::IndirectWithNext => f.write_str("descriptor has both INDIRECT and NEXT"),
            ChainError::IndirectNotNegotiated => f.write_str("indirect descriptor without VIRTIO_F_INDIRECT_DESC"),
            ChainError::IndirectLength { len } => {
                write!(f, "indirect table length {len} is 0 or not a multiple of 16")
            }
            ChainError::IndirectTooLarge { entries } => {
                write!(f, "indirect table with {entries} entries exceeds the limit")
            }
            ChainError::IndirectNotContiguous { addr } => {
                write!(f, "indirect table at {addr:#x} is not contiguous in host memory")
            }
            ChainError::TooManySegments => f.write_str("chain has more segments than the device accepts"),
            ChainError::NotAvailable { index } => {
                write!(f, "descriptor {index} in the middle of a chain is not available")
            }
            ChainError::IndirectInChain => f.write_str("indirect descriptor inside a chain of descriptors"),
        }
    }
}

/// One host-contiguous piece of a guest buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment<'m> {
    ptr: NonNull<u8>,
    len: u32,
    _mem: PhantomData<&'m ()>,
}

impl Segment<'_> {
    const EMPTY: Self = Segment { ptr: NonNull::dangling(), len: 0, _mem: PhantomData };

    /// A piece the walk translated: `ptr` valid for `len` bytes of guest memory for `'m`.
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn piece(ptr: NonNull<u8>, len: u32) -> Self {
        Segment { ptr, len, _mem: PhantomData }
    }

    /// Host address of the first byte. Guest memory: access it only through raw pointers.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes (never 0: empty descriptors produce no segment).
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Always false; segments are never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A validated descriptor chain: its head index and its buffers, translated to host memory,
/// as device-readable segments followed by device-writable segments.
///
/// The segment list has a fixed capacity `N` (no allocation). Reuse one `Chain` across pops:
/// [`SplitQueue::pop_into`](crate::SplitQueue::pop_into) clears and refills it in place.
#[derive(Debug)]
pub struct Chain<'m, const N: usize = DEFAULT_SEGMENTS> {
    head: u16,
    /// `segments[..len]` are valid; readable ones first (`..readable`), then writable ones.
    segments: [Segment<'m>; N],
    len: usize,
    readable: usize,
    readable_len: u32,
    writable_len: u32,
}

// SAFETY: a chain's segments point into guest memory borrowed for `'m`; the data may be
// accessed from whichever thread holds the chain, as the memory is shared with the guest anyway
// and only accessed through raw pointers.
unsafe impl<const N: usize> Send for Chain<'_, N> {}

impl<const N: usize> Default for Chain<'_, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'m, const N: usize> Chain<'m, N> {
    /// An empty chain, ready to be filled by a pop.
    pub const fn new() -> Self {
        Chain { head: 0, segments: [Segment::EMPTY; N], len: 0, readable: 0, readable_len: 0, writable_len: 0 }
    }

    /// The head descriptor index: the `id` to put in the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Device-readable segments, in chain order.
    pub fn readable(&self) -> &[Segment<'m>] {
        &self.segments[..self.readable]
    }

    /// Device-writable segments, in chain order.
    pub fn writable(&self) -> &[Segment<'m>] {
        &self.segments[self.readable..self.len]
    }

    /// Total bytes in device-readable buffers.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }

    /// Total bytes in device-writable buffers.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }

    /// Copies device-readable bytes starting at byte `offset` of the readable part into `buf`;
    /// returns how many bytes were copied (less than `buf.len()` at the end of the chain).
    #[inline]
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> usize {
        copy_segments(self.readable(), offset, buf.len(), |seg, at, n, done| {
            // SAFETY: `seg` is valid for `seg.len()` bytes (GuestMemory contract, lifetime 'm),
            // `at + n <= seg.len()` and `done + n <= buf.len()` (copy_segments); guest memory
            // never overlaps a caller's Rust buffer.
            unsafe { copy_bytes(seg.as_ptr().add(at), buf.as_mut_ptr().add(done), n) }
        })
    }

    /// Copies `data` into the device-writable part starting at byte `offset`; returns how many
    /// bytes were written (less than `data.len()` if the writable part is too short).
    #[inline]
    pub fn write_at(&self, offset: usize, data: &[u8]) -> usize {
        copy_segments(self.writable(), offset, data.len(), |seg, at, n, done| {
            // SAFETY: as in `read_at`, with the roles of source and destination swapped. The
            // segment is device-writable, so writing it is allowed (§2.7.5.1).
            unsafe { copy_bytes(data.as_ptr().add(done), seg.as_ptr().add(at), n) }
        })
    }

    /// Copies bytes `[from, from + n)` of `src` into the device-writable part starting at byte
    /// `offset`; returns how many bytes were written (less than `n` if the writable part is
    /// too short). [`write_at`](Self::write_at) for a frame that may still be in another
    /// chain's buffers ([`crate::net::Gather`]). `from + n` must not exceed `src.len()`.
    #[cfg_attr(not(feature = "small"), inline(always))]
    pub(crate) fn write_frame<S: crate::net::FrameSource>(
        &self,
        offset: usize,
        src: &S,
        from: usize,
        n: usize,
    ) -> usize {
        debug_assert!(from + n <= src.len());
        copy_segments(self.writable(), offset, n, |seg, at, k, done| {
            // SAFETY: `seg` is valid for writes of `seg.len()` bytes (GuestMemory contract,
            // lifetime 'm) and device-writable (§2.7.5.1), `at + k <= seg.len()`, and
            // `from + done + k <= from + n <= src.len()` (copy_segments, the caller).
            unsafe { src.copy_out(from + done, seg.as_ptr().add(at), k) }
        })
    }

    /// Reports to `log`, as guest ranges of `mem` (the memory this chain was walked in), the
    /// `len` bytes of the device-writable part from byte `offset` on: what a device that wrote
    /// them through [`write_at`](Self::write_at) or the segments reports ([`crate::dirty`]).
    pub fn log_written<M: GuestMemory + ?Sized, L: WriteLog>(&self, mem: &M, offset: usize, len: usize, log: &L) {
        if !L::ENABLED {
            return;
        }
        copy_segments(self.writable(), offset, len, |seg, at, n, _| {
            // `at < seg.len()`: the pointer stays inside the segment.
            log_host(mem, log, seg.as_ptr().wrapping_add(at), n)
        });
    }
}

/// Walks `segs` from byte `offset`, calling `copy(segment, offset_in_segment, n, done_so_far)`
/// for each piece, up to `total` bytes. Returns the bytes covered.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) fn copy_segments(
    segs: &[Segment<'_>],
    mut offset: usize,
    total: usize,
    mut copy: impl FnMut(&Segment<'_>, usize, usize, usize),
) -> usize {
    let mut done = 0;
    for seg in segs {
        if done == total {
            break;
        }
        let len = seg.len();
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(total - done);
        copy(seg, offset, n, done);
        done += n;
        offset = 0;
    }
    done
}

/// Device-readable segments of several chains, kept in one list (capacity `N`, no
/// allocation): what [`SplitQueue::pop_gather_uncompleted`](crate::SplitQueue::pop_gather_uncompleted)
/// appends to, for a device that takes a burst of chains and reads their buffers later
/// ([`crate::net::Gather`]). Only the walk adds to it, so every segment in it is a piece of
/// guest memory a driver offered for reading.
#[derive(Debug)]
pub struct Segments<'m, const N: usize> {
    list: heapless::Vec<Segment<'m>, N>,
}

impl<const N: usize> Default for Segments<'_, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'m, const N: usize> Segments<'m, N> {
    /// An empty list.
    pub const fn new() -> Self {
        Segments { list: heapless::Vec::new() }
    }

    /// The segments, in the order they were added.
    #[inline]
    pub fn as_slice(&self) -> &[Segment<'m>] {
        &self.list
    }

    /// Number of segments.
    #[inline]
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether the list is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Copies the first bytes of the segments from `start` on into `dst` (as many as they
    /// hold, up to `dst.len()`) and drops them from the list: the first segment left there
    /// starts where the copy stopped. Returns how many bytes were copied. For a device that
    /// needs more of a frame in its private copy than the walk took ([`crate::net::Gather`]):
    /// the bytes copied are then read from the copy only.
    #[cfg_attr(not(feature = "small"), inline(always))]
    pub fn take_front(&mut self, start: usize, dst: &mut [u8]) -> usize {
        // The usual case: the first segment holds them all (a frame's first bytes).
        if let Some(seg) = self.list.get_mut(start) {
            let n = dst.len();
            if (seg.len as usize) > n {
                // SAFETY: `seg` is a piece the walk translated, valid for reads of `seg.len > n`
                // bytes of guest memory for 'm; `dst` is valid for `n` bytes; guest memory never
                // overlaps a Rust buffer.
                unsafe { copy_bytes(seg.ptr.as_ptr(), dst.as_mut_ptr(), n) };
                // SAFETY: `n < seg.len`: still inside the piece, `seg.len - n` bytes from there.
                seg.ptr = unsafe { NonNull::new_unchecked(seg.ptr.as_ptr().add(n)) };
                seg.len -= n as u32;
                return n;
            }
        }
        self.take_front_pieces(start, dst)
    }

    /// [`take_front`](Self::take_front) over several segments.
    #[inline(never)]
    fn take_front_pieces(&mut self, start: usize, dst: &mut [u8]) -> usize {
        let (mut done, mut used) = (0usize, 0usize);
        let Some(tail) = self.list.get_mut(start..) else { return 0 };
        for seg in tail.iter_mut() {
            if done == dst.len() {
                break;
            }
            let n = (seg.len as usize).min(dst.len() - done);
            // SAFETY: `seg` is a piece the walk translated, valid for reads of `seg.len` bytes
            // of guest memory for 'm, `n <= seg.len`; `done + n <= dst.len()`; guest memory
            // never overlaps a Rust buffer.
            unsafe { copy_bytes(seg.ptr.as_ptr(), dst.as_mut_ptr().add(done), n) };
            done += n;
            if n == seg.len as usize {
                used += 1;
            } else {
                // SAFETY: `n < seg.len`: still inside the piece, `seg.len - n` bytes from there.
                seg.ptr = unsafe { NonNull::new_unchecked(seg.ptr.as_ptr().add(n)) };
                seg.len -= n as u32;
            }
        }
        let left = tail.len() - used;
        tail.rotate_left(used);
        self.list.truncate(start + left);
        done
    }

    /// Forgets the segments from `len` on (those of a chain the device does not keep).
    pub fn truncate(&mut self, len: usize) {
        self.list.truncate(len);
    }
}

/// The visitor of `pop_gather_uncompleted` (both layouts): copies the device-readable pieces
/// into `buf` until its first `head` bytes are filled (`*copied` of them), as [`read_into`]
/// does, and appends to `segments` what of them is past the copy (the rest of the piece the
/// copy cut, then the pieces after it; nothing for a chain the copy holds whole). If the list
/// runs out of room, the chain is copied into `buf` after all, as far as `buf` goes, and
/// nothing of it stays listed ([`Spill::overflow`]). `head <= buf.len()`.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) fn gather_into<'a, 'm, const N: usize>(
    buf: &'a mut [u8],
    head: usize,
    copied: &'a mut usize,
    segments: &'a mut Segments<'m, N>,
) -> impl FnMut(NonNull<u8>, u32, bool, u64) -> Result<(), ChainError> + use<'a, 'm, N> {
    *copied = 0;
    debug_assert!(head <= buf.len());
    let mut spill = Spill { dst: buf.as_mut_ptr(), len: buf.len(), start: segments.len(), overflowed: false };
    // Where the copy stops: `head`, or all of `buf` once the list has overflowed.
    let mut cap = head;
    #[cfg_attr(not(feature = "small"), inline(always))]
    move |ptr, len, writable, _| {
        if !writable {
            let room = cap - *copied;
            if len as usize <= room {
                // SAFETY: as in `read_into`: `ptr` is valid for `len` bytes of guest memory,
                // `*copied + len <= cap <= buf.len()` keeps the destination inside `buf`, and
                // guest memory never overlaps a Rust buffer.
                unsafe { copy_bytes(ptr.as_ptr(), spill.dst.add(*copied), len as usize) };
                *copied += len as usize;
            } else {
                // What fits (nothing, once the copy is full: the pieces after it are only
                // listed), then the rest listed.
                let piece = if room == 0 {
                    Segment::piece(ptr, len)
                } else {
                    // SAFETY: as above, `room < len` bytes.
                    unsafe { copy_bytes(ptr.as_ptr(), spill.dst.add(*copied), room) };
                    *copied += room;
                    // SAFETY: `room < len`: `ptr + room` is inside the piece, which the walk
                    // translated for `len` bytes of the memory borrowed for 'm; what remains
                    // is `len - room`.
                    Segment::piece(unsafe { NonNull::new_unchecked(ptr.as_ptr().add(room)) }, len - room as u32)
                };
                if spill.overflowed || segments.list.push(piece).is_err() {
                    // SAFETY: `piece` is valid for its length of guest memory for 'm;
                    // `spill.dst` for writes of `spill.len` bytes, `buf`'s.
                    unsafe { spill.overflow(piece, copied, segments) };
                    cap = spill.len;
                }
            }
        }
        Ok(())
    }
}

/// The state of [`gather_into`] for a chain whose pieces do not all find room in the list.
struct Spill {
    /// The copy buffer and its length.
    dst: *mut u8,
    len: usize,
    /// Where this chain's pieces start in the list.
    start: usize,
    /// The list ran out of room: the chain is copied into the buffer instead.
    overflowed: bool,
}

impl Spill {
    /// A piece that finds the list full, or comes after one that did: copies the chain's
    /// pieces listed so far into the buffer after the copy (the first time), then `piece`, as
    /// far as the buffer goes (a longer chain is cut: `*copied` falls short of its readable
    /// length). Out of line: a chain of more pieces than the list keeps, which Linux never
    /// sends.
    ///
    /// # Safety
    /// `piece` is valid for reads of its length of guest memory for 'm; `dst` is valid for
    /// writes of `len` bytes (this struct's), Rust memory, `*copied <= len` of them written.
    #[cold]
    #[inline(never)]
    unsafe fn overflow<'m, const N: usize>(
        &mut self,
        piece: Segment<'m>,
        copied: &mut usize,
        segments: &mut Segments<'m, N>,
    ) {
        if !self.overflowed {
            self.overflowed = true;
            // SAFETY: `dst` is valid for `self.len` bytes, `*copied <= self.len` written.
            let dst = unsafe { core::slice::from_raw_parts_mut(self.dst.add(*copied), self.len - *copied) };
            *copied += segments.take_front(self.start, dst);
            segments.truncate(self.start);
        }
        let n = (self.len - *copied).min(piece.len as usize);
        // SAFETY: `piece` is valid for `piece.len >= n` bytes of guest memory; `*copied + n <=
        // self.len`; guest memory never overlaps a Rust buffer.
        unsafe { copy_bytes(piece.ptr.as_ptr(), self.dst.add(*copied), n) };
        *copied += n;
    }
}

/// A descriptor table in host memory: the queue's, or an indirect one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DescTable {
    pub(crate) ptr: NonNull<u8>,
    pub(crate) entries: u32,
}

impl DescTable {
    pub(crate) fn new(ptr: NonNull<u8>, entries: u32) -> Self {
        DescTable { ptr, entries }
    }
}

/// Limits the device applies to chains beyond the spec's structural rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainLimits {
    /// Whether `VIRTIO_F_INDIRECT_DESC` was negotiated.
    pub indirect: bool,
    /// Largest indirect table accepted, in entries (default: the queue size; hostile-inputs
    /// family 4, propolis #1188).
    pub max_indirect_entries: u32,
}

/// What a walk found besides the pieces it handed to its visitor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkSummary {
    /// Total bytes in device-readable buffers.
    pub readable_len: u32,
    /// Total bytes in device-writable buffers.
    pub writable_len: u32,
}

/// Walks the chain starting at `head` of `table`, handing every host-contiguous piece of every
/// non-empty buffer to `piece(ptr, len, writable, addr)` in chain order, `addr` being the
/// piece's guest address (so that a visitor reporting writes to a [`crate::WriteLog`] needs no
/// inverse lookup). This is the one place the
/// rules of §2.7.5 are enforced; [`Chain`] (segment lists) and the queue's fused copy paths
/// are visitors.
///
/// Rules checked, each with its own [`ChainError`]: index range (§2.7.5.2), loop/length bound,
/// readable-before-writable, total length ≤ 2^32, address overflow, translation of every byte,
/// indirect rules (§2.7.5.3.1: not nested, not with NEXT, negotiated, `len` a non-zero multiple
/// of 16, host-contiguous, within the limit). Zero or more direct descriptors followed by one
/// indirect descriptor are accepted; the WRITE flag of the indirect-referring descriptor is
/// ignored (§2.7.5.3.2 "MUST ignore the write-only flag"). Zero-length buffers are accepted and
/// produce no piece.
///
/// A visitor may act on pieces before the walk has seen the whole chain (a fused copy); if the
/// walk then fails, the caller discards what the visitor did and completes the head with len 0.
/// Writing device-writable pieces early is harmless: the driver offered them for writing.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) fn walk_pieces<M, F>(
    mem: &M,
    table: DescTable,
    head: u16,
    limits: &ChainLimits,
    piece: F,
) -> Result<WalkSummary, ChainError>
where
    M: GuestMemory + ?Sized,
    F: FnMut(NonNull<u8>, u32, bool, u64) -> Result<(), ChainError>,
{
    walk_source(mem, Cursor { table, index: head, budget: table.entries, in_indirect: false }, limits, piece)
}

/// Where a walk reads its descriptors from: the layout-specific half of the chain rules.
///
/// [`walk_pieces`] (the split ring's queue table, §2.7.5) and the packed ring's descriptor ring
/// (§2.8.6, `crate::packed`) differ only in how the next descriptor of a chain is found and
/// how it is laid out; everything else (readable before writable, the 2^32 total, address
/// overflow, translation, the indirect table's own rules in [`indirect_table`]) is
/// [`walk_source`]'s, once, for both.
pub(crate) trait DescSource {
    /// Reads the chain's next buffer descriptor, following an indirect descriptor into its
    /// table; errors are recorded in `err` (see [`fail`]).
    fn next<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        limits: &ChainLimits,
        err: &mut Option<ChainError>,
    ) -> Result<WalkDesc, Failed>;

    /// Whether the chain continues after `d`, the descriptor [`next`](Self::next) returned
    /// last; if it does, the source moves to the successor.
    fn advance(&mut self, d: &WalkDesc) -> bool;
}

/// The visitor of `pop_read` (both layouts): copies each device-readable piece into `buf`,
/// after the `*copied` bytes before it (a piece that does not fit is cut: the walk's summary
/// still tells the whole readable length). `*copied` starts at 0.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) fn read_into<'a>(
    buf: &'a mut [u8],
    copied: &'a mut usize,
) -> impl FnMut(NonNull<u8>, u32, bool, u64) -> Result<(), ChainError> + 'a {
    *copied = 0;
    // The buffer as a pointer and length held by value (`move`): the visitor is called from
    // two places in the walk, and a slice re-borrowed there costs its bounds on every piece.
    let dst = buf.as_mut_ptr();
    let cap = buf.len();
    #[cfg_attr(not(feature = "small"), inline(always))]
    move |ptr, len, writable, _| {
        if !writable {
            let n = (len as usize).min(cap - *copied);
            // SAFETY: `ptr` is valid for `len >= n` bytes of guest memory (GuestMemory contract,
            // for the walk's borrow); `*copied + n <= cap`, so the destination is inside `buf`,
            // borrowed for 'a; guest memory never overlaps a Rust buffer.
            unsafe { copy_bytes(ptr.as_ptr(), dst.add(*copied), n) };
            *copied += n;
        }
        Ok(())
    }
}

/// The visitor of `pop_write_logged` (both layouts): writes `data` into the device-writable
/// pieces in order, after the `*written` bytes before, reporting each piece written to `log`.
/// Inlined into the walk, which calls it from two places: left to LLVM, the visitor with the
/// report stayed a call per piece (ringbench, 2desc 64 rx with a log: about 20 instructions per
/// piece). `*written` starts at 0.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) fn write_from<'a, L: WriteLog>(
    data: &'a [u8],
    written: &'a mut usize,
    log: &'a L,
) -> impl FnMut(NonNull<u8>, u32, bool, u64) -> Result<(), ChainError> + 'a {
    *written = 0;
    #[cfg_attr(not(feature = "small"), inline(always))]
    move |ptr, len, writable, addr| {
        if writable {
            let n = (len as usize).min(data.len() - *written);
            // SAFETY: `ptr` is valid for `len >= n` bytes of guest memory, `data[*written..][..n]`
            // is the source; the piece is device-writable, so writing it is allowed (§2.7.4,
            // §2.8.13).
            unsafe { copy_bytes(data.as_ptr().add(*written), ptr.as_ptr(), n) };
            if L::ENABLED && n != 0 {
                log.buffer(addr, n as u64);
            }
            *written += n;
        }
        Ok(())
    }
}

/// [`walk_pieces`] over any [`DescSource`].
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) fn walk_source<M, S, F>(
    mem: &M,
    source: S,
    limits: &ChainLimits,
    piece: F,
) -> Result<WalkSummary, ChainError>
where
    M: GuestMemory + ?Sized,
    S: DescSource,
    F: FnMut(NonNull<u8>, u32, bool, u64) -> Result<(), ChainError>,
{
    let mut error = None;
    match walk_checked(mem, source, limits, piece, &mut error) {
        Ok(sum) => Ok(sum),
        // `Failed` is only made by `fail`, which records the error first.
        Err(Failed) => Err(error.unwrap_or(ChainError::ChainTooLong)),
    }
}

/// A walk step failed; the [`ChainError`] is in the walk's error slot (see [`fail`]). Keeping
/// the error's payload out of the walk's return values keeps them small: the walk's hot path
/// carries no enum of addresses and indices from step to step.
pub(crate) struct Failed;

/// Records `e` in the walk's error slot.
#[cold]
#[inline(never)]
pub(crate) fn fail(slot: &mut Option<ChainError>, e: ChainError) -> Failed {
    *slot = Some(e);
    Failed
}

/// [`walk_source`], with errors recorded in `err`.
#[cfg_attr(not(feature = "small"), inline(always))]
fn walk_checked<M, S, F>(
    mem: &M,
    mut cursor: S,
    limits: &ChainLimits,
    mut piece: F,
    err: &mut Option<ChainError>,
) -> Result<WalkSummary, Failed>
where
    M: GuestMemory + ?Sized,
    S: DescSource,
    F: FnMut(NonNull<u8>, u32, bool, u64) -> Result<(), ChainError>,
{
    // Two loops, one per part of the chain: device-readable buffers, then device-writable ones
    // (§2.7.5.2 "MUST place any device-writable descriptor elements after any device-readable
    // descriptor elements"). Which part the walk is in is the loop it runs in, and the visitor
    // sees a constant `writable`. Sums of at most 2 * 32768 32-bit lengths (queue table plus one
    // indirect table) cannot overflow u64; the 2^32 limit is checked once at the end.
    let mut readable = 0u64;
    let first_writable = loop {
        let d = cursor.next(mem, limits, err)?;
        if d.flags & DescFlags::WRITE.bits() != 0 {
            break d;
        }
        readable += d.len as u64;
        buffer(mem, d.addr, d.len, false, &mut piece, err)?;
        if !cursor.advance(&d) {
            return summary(readable, 0, err);
        }
    };
    let mut d = first_writable;
    let mut writable = 0u64;
    loop {
        writable += d.len as u64;
        buffer(mem, d.addr, d.len, true, &mut piece, err)?;
        if !cursor.advance(&d) {
            return summary(readable, writable, err);
        }
        d = cursor.next(mem, limits, err)?;
        if d.flags & DescFlags::WRITE.bits() == 0 {
            return Err(fail(err, ChainError::ReadableAfterWritable));
        }
    }
}

/// The chain's totals, after the 2^32 limit on its total length (§2.7.5.2).
#[cfg_attr(not(feature = "small"), inline(always))]
fn summary(readable: u64, writable: u64, err: &mut Option<ChainError>) -> Result<WalkSummary, Failed> {
    if readable + writable > u32::MAX as u64 {
        return Err(fail(err, ChainError::TotalLengthOverflow));
    }
    Ok(WalkSummary { readable_len: readable as u32, writable_len: writable as u32 })
}

/// A descriptor as the walk uses it: flags as raw bits.
#[derive(Clone, Copy)]
pub(crate) struct WalkDesc {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) flags: u16,
    /// Split ring: the `next` field; unused by the packed ring, whose chains are consecutive.
    pub(crate) next: u16,
}

/// Where the walk is: the table it reads (the queue's, or the one indirect table), the next
/// index, and how many more visits that table allows.
struct Cursor {
    table: DescTable,
    index: u16,
    /// Visits left in `table`: a longer walk must revisit an entry (a loop), or is longer than
    /// the table (§2.7.5.2 "MUST NOT create a descriptor chain longer than the Queue Size").
    budget: u32,
    in_indirect: bool,
}

impl DescSource for Cursor {
    /// Reads the descriptor at `index`, following an indirect descriptor into its table
    /// (§2.7.5.3), and returns the next buffer descriptor.
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn next<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        limits: &ChainLimits,
        err: &mut Option<ChainError>,
    ) -> Result<WalkDesc, Failed> {
        loop {
            if self.index as u32 >= self.table.entries {
                return Err(fail(err, ChainError::NextOutOfRange { index: self.index }));
            }
            if self.budget == 0 {
                return Err(fail(err, ChainError::ChainTooLong));
            }
            self.budget -= 1;
            // The table's alignment is tested here rather than kept in the walk's state, which
            // leaves one more register for the loop.
            let table = self.table.ptr.as_ptr();
            // SAFETY: `index < table.entries` and the table is valid for `entries * 16` bytes
            // (queue set-up validated the queue's table; an indirect table is translated as a
            // whole before use); the last argument is the table's own 8-byte alignment (entries
            // are 16 bytes, so an 8-aligned table has 8-aligned entries).
            let d = unsafe { read_descriptor(table, self.index, (table as usize).is_multiple_of(8)) };
            let flags = d.flags.bits();
            if flags & DescFlags::INDIRECT.bits() != 0 {
                self.table = match indirect_table(mem, d.addr, d.len, flags, self.in_indirect, limits) {
                    Ok(table) => table,
                    Err(e) => return Err(fail(err, e)),
                };
                self.budget = self.table.entries;
                self.index = 0;
                self.in_indirect = true;
                continue;
            }
            return Ok(WalkDesc { addr: d.addr, len: d.len, flags, next: d.next });
        }
    }

    /// §2.7.5.2: `VIRTQ_DESC_F_NEXT` continues the chain at `next`.
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn advance(&mut self, d: &WalkDesc) -> bool {
        if d.flags & DescFlags::NEXT.bits() == 0 {
            return false;
        }
        self.index = d.next;
        true
    }
}

/// Checks and translates one buffer, handing its host pieces to `piece`. Zero-length buffers
/// produce no piece. The usual buffer lies in one region and takes one translation; a buffer
/// that spans regions (or fails to translate) goes to [`buffer_split`].
#[cfg_attr(not(feature = "small"), inline(always))]
fn buffer<M, F>(
    mem: &M,
    addr: u64,
    len: u32,
    writable: bool,
    piece: &mut F,
    err: &mut Option<ChainError>,
) -> Result<(), Failed>
where
    M: GuestMemory + ?Sized,
    F: FnMut(NonNull<u8>, u32, bool, u64) -> Result<(), ChainError>,
{
    if addr.checked_add(len as u64).is_none() {
        return Err(fail(err, ChainError::AddressOverflow { addr, len }));
    }
    if len == 0 {
        return Ok(());
    }
    if let Some(ptr) = translate_whole(mem, addr, len) {
        return piece(ptr, len, writable, addr).map_err(|e| fail(err, e));
    }
    buffer_split(mem, addr, len, writable, piece).map_err(|e| fail(err, e))
}

/// The usual buffer's translation, shared by [`buffer`] and the packed ring's batch pops: the
/// host address of `len` bytes at `addr` if one translation covers them all, `None` where the
/// buffer spans regions or does not translate (for the walk's [`buffer_split`], which tells
/// which). The caller has checked that `addr + len` does not overflow.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) fn translate_whole<M: GuestMemory + ?Sized>(mem: &M, addr: u64, len: u32) -> Option<NonNull<u8>> {
    match mem.translate(addr, len as u64) {
        // Never trust the translator beyond what was asked (RUSTSEC-2023-0056): only a range
        // at least as long as the buffer covers it.
        Ok(r) if r.len as u64 >= len as u64 => Some(r.ptr),
        _ => None,
    }
}

/// The rest of [`buffer`]: a buffer whose first translation did not cover it, translated again
/// from its start and handed over piece by piece. Out of line to keep the walk loop small.
#[cold]
#[inline(never)]
fn buffer_split<M, F>(mem: &M, addr: u64, len: u32, writable: bool, piece: &mut F) -> Result<(), ChainError>
where
    M: GuestMemory + ?Sized,
    F: FnMut(NonNull<u8>, u32, bool, u64) -> Result<(), ChainError>,
{
    let mut left = len as u64;
    let mut at = addr;
    loop {
        let range = mem.translate(at, left).map_err(|e| buffer_error(e, at, len))?;
        // Never trust the translator beyond what was asked (RUSTSEC-2023-0056).
        let n = (range.len as u64).min(left);
        if n == 0 {
            return Err(ChainError::Unmapped { addr: at });
        }
        piece(range.ptr, n as u32, writable, at)?;
        left -= n;
        at += n;
        if left == 0 {
            return Ok(());
        }
    }
}

/// Walks the chain at `head` into `out`'s segment lists (see [`walk_pieces`]). On error `out`
/// is left empty (with `head` set).
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) fn walk<'m, M: GuestMemory + ?Sized, const N: usize>(
    mem: &'m M,
    table: DescTable,
    head: u16,
    limits: &ChainLimits,
    out: &mut Chain<'m, N>,
) -> Result<(), ChainError> {
    let cursor = Cursor { table, index: head, budget: table.entries, in_indirect: false };
    walk_source_into(mem, cursor, head, limits, out)
}

/// [`walk`] over any [`DescSource`]; `head` is what the chain reports as its
/// [`Chain::head`] (the split ring's head index, the packed ring's buffer id).
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) fn walk_source_into<'m, M: GuestMemory + ?Sized, S: DescSource, const N: usize>(
    mem: &'m M,
    source: S,
    head: u16,
    limits: &ChainLimits,
    out: &mut Chain<'m, N>,
) -> Result<(), ChainError> {
    let mut segs = 0usize;
    let mut readable = 0usize;
    let segments = &mut out.segments;
    let result = walk_source(mem, source, limits, |ptr, len, writable, _| {
        let seg = segments.get_mut(segs).ok_or(ChainError::TooManySegments)?;
        *seg = Segment { ptr, len, _mem: PhantomData };
        segs += 1;
        readable += !writable as usize;
        Ok(())
    });
    out.head = head;
    let sum = match result {
        Ok(sum) => sum,
        Err(e) => {
            out.len = 0;
            out.readable = 0;
            out.readable_len = 0;
            out.writable_len = 0;
            return Err(e);
        }
    };
    out.len = segs;
    out.readable = readable;
    out.readable_len = sum.readable_len;
    out.writable_len = sum.writable_len;
    Ok(())
}

/// The last byte of the chain at `head` of `table`, if the chain ends in a device-writable
/// buffer: where a device whose requests end in a status byte (virtio-blk §5.2.6 "the last
/// device-writable byte") answers a chain the walk refused. A driver reads that byte whatever
/// the device did with the rest, so leaving it unwritten would hand it a stale status.
///
/// The chain is followed as [`walk_pieces`] follows it (index range, the loop bound, the
/// indirect rules: without them there is no "last" descriptor), but the rules on its buffers
/// are not applied: readable after writable, the 2^32 total, untranslatable or overflowing
/// buffers other than the last one, more pieces than a segment list holds. Zero-length
/// buffers are skipped, as the walk skips them. `None` when the chain cannot be followed to
/// its end, when its last non-empty buffer is device-readable, or when that buffer's last byte
/// is not in guest memory. Otherwise the byte's host pointer (valid for one byte of guest
/// memory, for as long as `mem` is) and its guest address.
///
/// The descriptors are read again, so a driver that rewrote them since the walk gets the
/// byte its current chain ends in: always a byte of a buffer it offered for writing.
pub(crate) fn last_writable_byte<M: GuestMemory + ?Sized>(
    mem: &M,
    table: DescTable,
    head: u16,
    limits: &ChainLimits,
) -> Option<(NonNull<u8>, u64)> {
    let mut cursor = Cursor { table, index: head, budget: table.entries, in_indirect: false };
    let mut err = None;
    let mut last = None;
    loop {
        let d = cursor.next(mem, limits, &mut err).ok()?;
        if d.len != 0 {
            last = Some((d.addr, d.len, d.flags));
        }
        if !cursor.advance(&d) {
            break;
        }
    }
    let (addr, len, flags) = last?;
    if flags & DescFlags::WRITE.bits() == 0 {
        return None;
    }
    // `len >= 1`; a last byte beyond 2^64 is in no memory.
    let at = addr.checked_add(len as u64 - 1)?;
    let r = mem.translate(at, 1).ok()?;
    // Never trust the translator beyond what was asked (RUSTSEC-2023-0056).
    (r.len >= 1).then_some((r.ptr, at))
}

/// Validates a descriptor with `VIRTQ_DESC_F_INDIRECT` and translates its table (§2.7.5.3.1).
/// Out of line: it runs at most once per chain, and keeping it out of the walk loop keeps the
/// loop's state in registers.
#[inline(never)]
pub(crate) fn indirect_table<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: u64,
    len: u32,
    flags: u16,
    in_indirect: bool,
    limits: &ChainLimits,
) -> Result<DescTable, ChainError> {
    if in_indirect {
        return Err(ChainError::NestedIndirect);
    }
    if !limits.indirect {
        return Err(ChainError::IndirectNotNegotiated);
    }
    if flags & DescFlags::NEXT.bits() != 0 {
        return Err(ChainError::IndirectWithNext);
    }
    if len == 0 || !(len as usize).is_multiple_of(DESC_SIZE) {
        return Err(ChainError::IndirectLength { len });
    }
    let entries = len / DESC_SIZE as u32;
    if entries > limits.max_indirect_entries {
        return Err(ChainError::IndirectTooLarge { entries });
    }
    let ptr = mem.translate_contiguous(addr, len as u64).map_err(|e| match e {
        MemError::Unmapped { addr } => ChainError::Unmapped { addr },
        MemError::NotContiguous { .. } => ChainError::IndirectNotContiguous { addr },
        MemError::Overflow { addr, .. } => ChainError::AddressOverflow { addr, len },
    })?;
    Ok(DescTable::new(ptr, entries))
}

#[cold]
fn buffer_error(e: MemError, addr: u64, len: u32) -> ChainError {
    match e {
        MemError::Unmapped { addr } | MemError::NotContiguous { addr } => ChainError::Unmapped { addr },
        MemError::Overflow { .. } => ChainError::AddressOverflow { addr, len },
    }
}
