//! A packed virtqueue, device side (VIRTIO 1.2 §2.8): one descriptor ring that the driver and
//! the device both write, the two event suppression structures, and the chain walk over the
//! ring, over guest memory borrowed for `'m`.
//!
//! ```text
//! struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }          // §2.8.13, ring of `size`
//! struct pvirtq_event_suppress { le16 desc /* off:15, wrap:1 */; le16 flags; } // §2.8.10
//! ```
//!
//! [`QueueConfig`] carries the three areas as vhost-user and the PCI transport name them:
//! `desc_table` is the descriptor ring, `avail_ring` the driver area (the driver's event
//! suppression structure, which the device reads) and `used_ring` the device area (the device's
//! event suppression structure, which the device writes).
//!
//! ## How a chain is taken
//! 1. The flags of the descriptor at the device's position are loaded with acquire; the
//!    descriptor is available when its AVAIL bit equals the device's driver-ring wrap counter
//!    and its USED bit does not (§2.8.1). The acquire orders every later read of the chain after
//!    the driver's release of those flags (§2.8.21.1: the driver makes the first descriptor of a
//!    chain available last, after a write barrier).
//! 2. The chain's extent is found from the flags (`extent`): consecutive descriptors
//!    (wrapping at the ring's end, toggling the wrap counter) while `VIRTQ_DESC_F_NEXT` is set,
//!    each one loaded with acquire and required to be available, bounded by the ring size. The
//!    `id` of the last one is the buffer id (§2.8.6). The first descriptor is read whole here,
//!    once, and the walk takes it from this read (its flags are the acquire load of step 1).
//! 3. The descriptors are consumed (the position moves past them) before anything else can
//!    fail, and the chain's buffers are walked by the one walk both layouts share
//!    ([`crate::chain`]'s `walk_source`, with this module's `PackedCursor` as the source of
//!    descriptors): readable before writable, the 2^32 total, address overflow, translation, and
//!    the indirect rules of §2.8.7.
//!
//! ## Error policy
//! The packed ring's rows of the one error-policy table (the *Error policy* section of the
//! repository's README): a buffer id out of range ([`PopError::HeadOutOfRange`]) or already in
//! flight ([`PopError::IdInUse`], not checked with `VIRTIO_F_IN_ORDER`) consumes the chain's
//! descriptors and completes nothing, which on a packed ring loses the driver's place: the
//! device must stop serving the queue ([`PopError::unreturnable_on`]); any other malformed chain ([`PopError::Chain`]) consumes
//! its descriptors and completes the buffer id of the last one with `len` 0 (visible at the
//! next [`PackedQueue::publish`]). What is consumed follows from step 2 above: a chain that
//! does not end within the ring size is cut at the ring size ([`ChainError::ChainTooLong`]),
//! one that runs into a descriptor that is not available is cut before it
//! ([`ChainError::NotAvailable`]).

use core::borrow::BorrowMut;
use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};

use crate::chain::{
    fail, indirect_table, translate_whole, walk_source, walk_source_into, Chain, ChainError, ChainLimits, DescSource,
    DescTable, Failed, Segments, WalkDesc, WalkSummary,
};
use crate::desc::{read_packed, read_packed_aligned, DescFlags, DESC_SIZE};
use crate::dirty::{NoLog, WriteLog};
use crate::event::vring_need_event;
use crate::features::VirtioFeatures;
use crate::log::log_warn;
use crate::mem::{copy_bytes, load_u16, store_u16, store_u32, GuestMemory};
use crate::queue::{BatchBuffer, CopiedChain, PopError, QueueConfig, QueueError, RingPart, MAX_QUEUE_SIZE};
use crate::ring::{self, sealed::Walk};

/// `VIRTQ_DESC_F_AVAIL` (§2.8.1): equal to the driver's wrap counter when the driver makes a
/// descriptor available.
pub const VIRTQ_DESC_F_AVAIL: u16 = 1 << 7;
/// `VIRTQ_DESC_F_USED` (§2.8.1): the inverse of the wrap counter when available, equal to it
/// when the device has used the descriptor.
pub const VIRTQ_DESC_F_USED: u16 = 1 << 15;

/// `RING_EVENT_FLAGS_ENABLE` (§2.8.10): notifications enabled.
pub const RING_EVENT_FLAGS_ENABLE: u16 = 0;
/// `RING_EVENT_FLAGS_DISABLE` (§2.8.10): notifications disabled.
pub const RING_EVENT_FLAGS_DISABLE: u16 = 1;
/// `RING_EVENT_FLAGS_DESC` (§2.8.10, only with `VIRTIO_F_EVENT_IDX`): notify when the
/// descriptor at `desc_event_off` in the round `desc_event_wrap` is made available / used.
pub const RING_EVENT_FLAGS_DESC: u16 = 2;

/// Bytes of one event suppression structure (§2.8.10).
pub const EVENT_SUPPRESS_SIZE: u64 = 4;

/// Default capacity of a [`PackedQueue`]'s in-flight table: the largest queue size it accepts.
pub const DEFAULT_IDS: usize = 1024;

/// Checks a packed queue's size: §2.8 "Packed Virtqueues" allows any size up to 2^15 (not only
/// powers of two); 0 is no queue.
pub const fn validate_packed_size(size: u16) -> Result<(), QueueError> {
    if size != 0 && size <= MAX_QUEUE_SIZE {
        Ok(())
    } else {
        Err(QueueError::InvalidSize { size })
    }
}

/// Whether a descriptor with `flags` is available in the round whose wrap counter is `wrap`
/// (§2.8.1: AVAIL equal to the wrap counter, USED different from it). The one owner of this
/// rule: a descriptor the device used in the previous round (both bits equal to the old
/// counter) or written by a driver confused about the round is not available.
#[cfg_attr(not(feature = "small"), inline(always))]
pub fn is_available(flags: u16, wrap: bool) -> bool {
    // AVAIL equal to the counter and USED different: the pair is exactly AVAIL (counter 1) or
    // exactly USED (counter 0). One mask and one compare.
    let want = if wrap { VIRTQ_DESC_F_AVAIL } else { VIRTQ_DESC_F_USED };
    flags & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) == want
}

/// A position in the descriptor ring: a slot and the wrap counter of the round (§2.8.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RingPosition {
    /// Slot, below the queue size.
    pub index: u16,
    /// Wrap counter: starts at 1 (`true`) and toggles each time the position passes the end.
    pub wrap: bool,
}

impl RingPosition {
    /// The start of a fresh ring: slot 0, wrap counter 1 (§2.8.1).
    pub const START: RingPosition = RingPosition { index: 0, wrap: true };

    /// The position `n ≤ size` slots back.
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn back(self, n: u16, size: u16) -> RingPosition {
        if n > self.index {
            RingPosition { index: (self.index as u32 + size as u32 - n as u32) as u16, wrap: !self.wrap }
        } else {
            RingPosition { index: self.index - n, wrap: self.wrap }
        }
    }

    /// The position `n ≤ size` slots further on.
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn advance(self, n: u16, size: u16) -> RingPosition {
        let i = self.index as u32 + n as u32;
        if i >= size as u32 {
            RingPosition { index: (i - size as u32) as u16, wrap: !self.wrap }
        } else {
            RingPosition { index: i as u16, wrap: self.wrap }
        }
    }

    /// The 16-bit encoding vhost-user and the event suppression structure use: the slot in
    /// bits 0..15, the wrap counter in bit 15.
    pub fn to_bits(self) -> u16 {
        self.index | (self.wrap as u16) << 15
    }

    /// Decodes [`to_bits`](Self::to_bits); `None` if the slot is not below `size`.
    pub fn from_bits(bits: u16, size: u16) -> Option<RingPosition> {
        let index = bits & 0x7fff;
        (index < size).then_some(RingPosition { index, wrap: bits & 0x8000 != 0 })
    }
}

/// A chain's extent in the ring, found from the descriptors' flags.
#[derive(Clone, Copy, Debug)]
struct Extent {
    /// Descriptors the chain occupies (consumed, whatever else is wrong with it).
    descs: u16,
    /// The buffer id: the `id` of its last descriptor.
    id: u16,
    /// Why the chain ended where it did, if it did not end at a descriptor without NEXT.
    error: Option<ChainError>,
    /// The first descriptor, read once: the walk takes it from here instead of reading the
    /// ring again (most chains are one descriptor).
    head: Head,
}

/// A chain's first descriptor as [`extent`] read it: its flags are the acquire load that found
/// it available, so the chain's extent (NEXT) and its first buffer (WRITE, INDIRECT) are
/// judged on one read of them.
#[derive(Clone, Copy, Debug)]
struct Head {
    addr: u64,
    len: u32,
    flags: u16,
}

/// Finds the chain that starts at `start` (§2.8.6): `None` if the descriptor there is not
/// available; otherwise its consecutive descriptors while `VIRTQ_DESC_F_NEXT` is set, each
/// loaded with acquire and required to be available ([`ChainError::NotAvailable`]), at most
/// `size` of them ([`ChainError::ChainTooLong`]: §2.8.6 "MUST NOT create a descriptor chain
/// longer than the Queue Size", and a NEXT flag on every descriptor would otherwise never end).
///
/// # Safety
/// `ring` must be valid for `16 * size` bytes, 4-aligned, accessed only atomically or by the
/// guest; `start.index < size`.
#[cfg_attr(not(feature = "small"), inline(always))]
unsafe fn extent(ring: NonNull<u8>, size: u16, start: RingPosition) -> Option<Extent> {
    let p = ring.as_ptr();
    let mut pos = start;
    let mut descs = 0u16;
    let mut id = 0u16;
    let mut head = Head { addr: 0, len: 0, flags: 0 };
    // One loop for the first descriptor and the rest: written as a first read and a loop for
    // the rest, it cost the burst functions it is inlined into registers, and a split-ring
    // path compiled into the same function 9 instructions per frame (switchbench), or, with
    // the rest out of line, multi-descriptor chains 40 (ringbench 2desc).
    loop {
        // SAFETY: `pos.index < size`: its `flags` at offset 14 are a 2-aligned field inside
        // the validated ring. Acquire: the descriptor's body and the buffers it names were
        // written before the driver's release of these flags (§2.8.21.1).
        let flags = unsafe { load_u16(p.add(pos.index as usize * DESC_SIZE + 14), Ordering::Acquire) };
        if !is_available(flags, pos.wrap) {
            if descs == 0 {
                return None;
            }
            return Some(Extent { descs, id, error: Some(ChainError::NotAvailable { index: pos.index }), head });
        }
        // SAFETY: slot `pos.index` of the validated, 4-aligned ring; ordered after the acquire
        // load of its flags.
        let (addr, len, this_id) = unsafe { read_packed_aligned(p.add(pos.index as usize * DESC_SIZE)) };
        id = this_id;
        if descs == 0 {
            head = Head { addr, len, flags };
        }
        descs += 1;
        if flags & DescFlags::NEXT.bits() == 0 {
            return Some(Extent { descs, id, error: None, head });
        }
        if descs == size {
            return Some(Extent { descs, id, error: Some(ChainError::ChainTooLong), head });
        }
        pos = pos.advance(1, size);
    }
}

/// The packed ring as a [`DescSource`] for the shared chain walk: the `left` descriptors of a
/// chain's extent, consecutive from `slot` (wrapping at `size`), or the entries of the one
/// indirect table the chain refers to.
struct PackedCursor {
    ring: NonNull<u8>,
    size: u16,
    /// The chain's first descriptor, as `extent` read it (returned while `first`).
    head: Head,
    slot: u16,
    /// Ring descriptors of the chain not yet returned, counting the current one.
    left: u16,
    /// Whether no ring descriptor was returned yet (an indirect descriptor must be the first,
    /// and only, one: §2.8.7).
    first: bool,
    table: DescTable,
    /// Next entry of `table`.
    index: u32,
    in_indirect: bool,
}

impl DescSource for PackedCursor {
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn next<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        limits: &ChainLimits,
        err: &mut Option<ChainError>,
    ) -> Result<WalkDesc, Failed> {
        loop {
            if self.in_indirect {
                // `index < entries` (checked by `advance`); the table was translated whole.
                // SAFETY: entry `index` lies inside the `16 * entries` bytes of the table.
                let p = unsafe { self.table.ptr.as_ptr().add(self.index as usize * DESC_SIZE) };
                // SAFETY: 16 valid bytes at `p`, inside the table.
                let (addr, len, _, flags) = unsafe { read_packed(p) };
                // §2.8.7: "The driver MUST NOT set any flags except DESC_F_WRITE within an
                // indirect descriptor". A nested table is refused as in the split ring; NEXT
                // and the id are ignored (the table's entries are consecutive).
                if flags & DescFlags::INDIRECT.bits() != 0 {
                    return Err(fail(err, ChainError::NestedIndirect));
                }
                return Ok(WalkDesc { addr, len, flags: flags & DescFlags::WRITE.bits(), next: 0 });
            }
            let first = core::mem::replace(&mut self.first, false);
            let (addr, len, flags) = if first {
                (self.head.addr, self.head.len, self.head.flags)
            } else {
                // SAFETY: `slot < size` and the ring is valid for `16 * size` bytes. Ordered
                // after the acquire loads of `extent`. The flags are read again here: the
                // extent fixed the chain's length from NEXT; WRITE and INDIRECT are judged on
                // this copy.
                let (addr, len, _, flags) =
                    unsafe { read_packed(self.ring.as_ptr().add(self.slot as usize * DESC_SIZE)) };
                (addr, len, flags)
            };
            if flags & DescFlags::INDIRECT.bits() != 0 {
                if !first {
                    return Err(fail(err, ChainError::IndirectInChain));
                }
                self.table = match indirect_table(mem, addr, len, flags, false, limits) {
                    Ok(table) => table,
                    Err(e) => return Err(fail(err, e)),
                };
                self.index = 0;
                self.in_indirect = true;
                continue;
            }
            return Ok(WalkDesc { addr, len, flags, next: 0 });
        }
    }

    /// §2.8.6: a chain's descriptors are consecutive in the ring; its extent was fixed from the
    /// flags before the walk. An indirect table's entries are consecutive too (§2.8.7).
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn advance(&mut self, _: &WalkDesc) -> bool {
        if self.in_indirect {
            self.index += 1;
            return self.index < self.table.entries;
        }
        self.left -= 1;
        if self.left == 0 {
            return false;
        }
        self.slot += 1;
        if self.slot == self.size {
            self.slot = 0;
        }
        true
    }
}

/// A buffer taken and not yet completed: how many ring descriptors it occupied, where the
/// ring position was after it, and which buffer was taken before it (the chain of takes that
/// `rewind` walks back).
#[derive(Clone, Copy, Debug)]
struct InFlight {
    /// 0: not in flight.
    descs: u16,
    /// [`RingPosition::to_bits`] of the position after the chain (IN_ORDER batches jump there).
    end: u16,
    /// The buffer id taken just before this one, or [`NO_ID`].
    prev: u16,
}

impl InFlight {
    const NONE: InFlight = InFlight { descs: 0, end: 0, prev: NO_ID };
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight::NONE
    }
}

/// No buffer id (ids are below the queue size, at most 32768).
const NO_ID: u16 = u16::MAX;

/// Chains a batch pop ([`PackedQueue::pop_read_batch`]) takes at most: four, a line of
/// descriptors where the ring is 64-aligned, as DPDK's vhost batches do (`PACKED_BATCH_SIZE`).
pub const BATCH: usize = 4;

/// The chains a batch pop took, in ring order (see [`PackedQueue::pop_read_batch`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadBatch {
    len: usize,
    chains: [CopiedChain; BATCH],
}

impl ReadBatch {
    /// The chains taken, as [`PackedQueue::pop_read`] would have returned them one by one.
    #[inline]
    pub fn as_slice(&self) -> &[CopiedChain] {
        // `len <= BATCH`: only `take_batch`'s count, which `max` bounds, is stored.
        &self.chains[..self.len.min(BATCH)]
    }
}

/// How far past the next descriptor [`PackedQueue::prefetch`] looks: called after each chain
/// taken, it asks for the fourth one after it, as DPDK's batches of four do.
pub const PREFETCH_AHEAD: u16 = 3;

/// Completions a [`PackedQueue`] keeps before storing them to the ring.
const SHADOW: usize = 32;
// `shadow_len` is a `u8`.
const _: () = assert!(SHADOW <= u8::MAX as usize);

/// A used descriptor not stored in the ring yet (see `DetachedPackedQueue::shadow`).
#[derive(Clone, Copy, Debug)]
struct UsedShadow {
    len: u32,
    slot: u16,
    id: u16,
    flags: u16,
}

/// A [`PackedQueue`] between bursts: its validated state without the borrow of guest memory
/// (see [`PackedQueue::detach`]).
#[derive(Debug)]
pub struct DetachedPackedQueue<const IDS: usize = DEFAULT_IDS> {
    ring: NonNull<u8>,
    driver: NonNull<u8>,
    device: NonNull<u8>,
    size: u16,
    limits: ChainLimits,
    in_order: bool,
    event_idx: bool,
    /// Next descriptor to take, and the device's copy of the driver-ring wrap counter.
    avail: RingPosition,
    /// Where the next used descriptor goes, and the device-ring wrap counter.
    used: RingPosition,
    /// `used` at the last publish: the start of the window a notification decision covers.
    signalled: RingPosition,
    /// The buffer id taken last and not completed since, or [`NO_ID`].
    last_taken: u16,
    /// Slot and flags of the first used descriptor completed since the last publish: its flags
    /// are stored last, by `publish`, so the driver sees the batch at once (the rest carry
    /// theirs once `store_used` stored them, but the driver reads the ring in order and stops
    /// at the first).
    pending: Option<(u16, u16)>,
    /// Completions not stored in the ring yet, in ring order: stored together when the list
    /// is full and at `publish`, as DPDK's shadow used ring does. The driver polls the line of
    /// its next used descriptor; storing into the ring chain by chain, interleaved with the
    /// reads of the next available descriptors, made every store to a line the driver had
    /// just read wait for it, and x86 commits stores in order, so the burst waited with it
    /// (loop64-mrg-packed in benches/README.md).
    shadow: [UsedShadow; SHADOW],
    shadow_len: u8,
    /// Per buffer id: the descriptors its chain took (§2.8.6: "The driver needs to keep track
    /// of the size of the list corresponding to each buffer ID, to be able to skip to where
    /// the next used descriptor is written by the device"; the device must skip the same).
    inflight: [InFlight; IDS],
    config: QueueConfig,
}

/// Records buffer `$id` as taken by the `$q` (a `&mut DetachedPackedQueue`), its chain
/// `$descs` descriptors ending before `$q.avail` (the caller moved the position past it
/// first): the one owner of the rules on a chain's buffer id (§2.8.6), which single pops
/// (`take`) and batch pops (`take_batch`) both run. An id out of range (`$out_of_range`, with
/// [`PopError::HeadOutOfRange`] in `$e`) or, if `$in_use` asks, already in flight
/// (`$twice`, with [`PopError::IdInUse`]; single pops do not ask with `VIRTIO_F_IN_ORDER`, see
/// the module's error policy) records nothing; both must leave the block.
///
/// A macro, not a method: the single pop's code is then what it was before batches, and a
/// method (inlined) changed the code of the adapter's burst function, which holds both
/// layouts, enough to cost the split ring's 10 instructions a frame (switchbench 64 B).
macro_rules! claim {
    ($q:expr, $id:expr, $descs:expr, $in_use:expr, |$e:ident| $out_of_range:expr, $twice:expr) => {
        if $id >= $q.size {
            let $e = PopError::HeadOutOfRange { head: $id };
            $out_of_range
        }
        // SAFETY: `id < size`, and `size <= IDS` (checked when the queue was set up; the size
        // never changes).
        let entry = unsafe { $q.inflight.get_unchecked_mut($id as usize) };
        // Not asked: the entry's load is skipped too.
        if $in_use && entry.descs != 0 {
            let $e = PopError::IdInUse { id: $id };
            $twice
        }
        *entry = InFlight { descs: $descs, end: $q.avail.to_bits(), prev: $q.last_taken };
        $q.last_taken = $id;
    };
}

impl<const IDS: usize> DetachedPackedQueue<IDS> {
    /// Stores the shadow list's used descriptors in the ring: every body first, then the flags
    /// (AVAIL = USED = the device-ring wrap counter, §2.8.1), each with release, except the
    /// batch's first (`pending`), whose flags `publish` stores last (§2.8.21.3: the driver reads
    /// the ring in order and stops at the first descriptor not used).
    // Out of line: once per publish and per 32 completions. Inlined into every burst loop
    // (both layouts are compiled into one function by the adapter), it cost the split ring's
    // switch path 22 instructions per 64-byte frame (switchbench).
    #[inline(never)]
    fn store_used(&mut self) {
        let n = (self.shadow_len as usize).min(SHADOW);
        self.shadow_len = 0;
        let first = self.pending.map(|(slot, _)| slot);
        let ring = self.ring.as_ptr();
        for e in &self.shadow[..n] {
            // SAFETY: `e.slot < size` (a used position): the descriptor's `len` (offset 8,
            // 4-aligned) and `id` (offset 12, 2-aligned) are inside the validated, 4-aligned
            // ring. Relaxed: the release stores of the flags below order them.
            unsafe {
                let d = ring.add(e.slot as usize * DESC_SIZE);
                store_u32(d.add(8), e.len, Ordering::Relaxed);
                store_u16(d.add(12), e.id, Ordering::Relaxed);
            }
        }
        for e in &self.shadow[..n] {
            // Between two publishes the used positions are distinct (a driver cannot make a
            // slot available again before it has seen it used), so this is the batch's first.
            // A hostile driver that does (more than `size` descriptors completed in one batch)
            // only tears its own batch: every slot is a used position, inside the ring.
            if Some(e.slot) == first {
                continue;
            }
            // SAFETY: `flags` at offset 14 of the same descriptor, 2-aligned. Release: its
            // `len` and `id` (and the buffer contents) are visible before it is used.
            unsafe { store_u16(ring.add(e.slot as usize * DESC_SIZE + 14), e.flags, Ordering::Release) };
        }
    }

    /// The configuration the queue was set up with.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// The next descriptor to take, with the driver-ring wrap counter (as
    /// [`PackedQueue::next_avail`]).
    pub fn next_avail(&self) -> RingPosition {
        self.avail
    }

    /// Where the next used descriptor goes, with the device-ring wrap counter (as
    /// [`PackedQueue::next_used`]).
    pub fn next_used(&self) -> RingPosition {
        self.used
    }

    /// The queue again, over `mem`.
    ///
    /// # Safety
    /// As for [`DetachedQueue::attach`](crate::DetachedQueue::attach).
    pub unsafe fn attach<'m, M: GuestMemory + ?Sized>(self, mem: &'m M) -> PackedQueue<'m, M, IDS> {
        PackedQueue { mem, q: self }
    }

    /// The queue over `mem`, borrowing this state instead of moving it: a device that keeps
    /// its detached queues in place (the in-flight table is `4 * IDS` bytes, which
    /// [`attach`](Self::attach) and [`PackedQueue::detach`] would copy per burst) works on
    /// them through this.
    ///
    /// # Safety
    /// As for [`attach`](Self::attach).
    pub unsafe fn attach_mut<'a, 'm, M: GuestMemory + ?Sized>(
        &'a mut self,
        mem: &'m M,
    ) -> PackedQueue<'m, M, IDS, &'a mut DetachedPackedQueue<IDS>> {
        PackedQueue { mem, q: self }
    }
}

/// A packed virtqueue, device side, over guest memory `M` borrowed for `'m`; `IDS` bounds the
/// queue size (the in-flight table holds one entry per buffer id, 4 bytes each).
///
/// Its methods are the [`SplitQueue`](crate::SplitQueue)'s, with the buffer id where the split
/// ring has the head index, so a device is written once over [`crate::ring::Virtqueue`].
#[derive(Debug)]
pub struct PackedQueue<
    'm,
    M: GuestMemory + ?Sized,
    const IDS: usize = DEFAULT_IDS,
    S: BorrowMut<DetachedPackedQueue<IDS>> = DetachedPackedQueue<IDS>,
> {
    mem: &'m M,
    q: S,
}

impl<'m, M: GuestMemory + ?Sized, const IDS: usize> PackedQueue<'m, M, IDS> {
    /// Sets up a queue whose rings and buffers are both addressed in `mem`, at the start of a
    /// fresh ring (both wrap counters 1, slot 0).
    pub fn new(mem: &'m M, config: QueueConfig, features: VirtioFeatures) -> Result<Self, QueueError> {
        Self::with_ring_memory(mem, mem, config, features)
    }

    /// Sets up a queue whose ring addresses are translated by `rings` and whose buffers are
    /// translated by `mem` (as [`SplitQueue::with_ring_memory`](crate::SplitQueue::with_ring_memory)).
    ///
    /// Checks: the size (1..=32768 and at most `IDS`), the alignments of §2.8.10 (descriptor
    /// ring 16, both event suppression structures 4), that every area is mapped and
    /// host-contiguous, and that no two areas overlap (the device writes the ring and the
    /// device area; it must not write what only the driver writes).
    pub fn with_ring_memory<R: GuestMemory + ?Sized>(
        mem: &'m M,
        rings: &'m R,
        config: QueueConfig,
        features: VirtioFeatures,
    ) -> Result<Self, QueueError> {
        let size = config.size;
        validate_packed_size(size)?;
        if size as usize > IDS {
            return Err(QueueError::InvalidSize { size });
        }
        let parts = [
            (RingPart::DescTable, config.desc_table, DESC_SIZE as u64 * size as u64, 16u64),
            (RingPart::AvailRing, config.avail_ring, EVENT_SUPPRESS_SIZE, 4),
            (RingPart::UsedRing, config.used_ring, EVENT_SUPPRESS_SIZE, 4),
        ];
        let mut ptrs = [NonNull::dangling(); 3];
        for (i, &(part, addr, len, align)) in parts.iter().enumerate() {
            if addr % align != 0 {
                return Err(QueueError::Misaligned { part, addr });
            }
            let ptr = rings.translate_contiguous(addr, len).map_err(|error| QueueError::Unmapped { part, error })?;
            // The device stores `len` (u32) and `id`/`flags` (u16) atomically.
            if !(ptr.as_ptr() as usize).is_multiple_of(4) {
                return Err(QueueError::HostMisaligned { part });
            }
            ptrs[i] = ptr;
        }
        for (i, &(_, a, alen, _)) in parts.iter().enumerate() {
            for &(part, b, blen, _) in &parts[i + 1..] {
                if a < b + blen && b < a + alen {
                    return Err(QueueError::Overlap { part });
                }
            }
        }
        Ok(PackedQueue {
            mem,
            q: DetachedPackedQueue {
                ring: ptrs[0],
                driver: ptrs[1],
                device: ptrs[2],
                size,
                limits: ChainLimits {
                    indirect: features.contains(VirtioFeatures::RING_INDIRECT_DESC),
                    max_indirect_entries: size as u32,
                },
                in_order: features.contains(VirtioFeatures::IN_ORDER),
                event_idx: features.contains(VirtioFeatures::RING_EVENT_IDX),
                avail: RingPosition::START,
                used: RingPosition::START,
                signalled: RingPosition::START,
                last_taken: NO_ID,
                pending: None,
                shadow: [UsedShadow { len: 0, slot: 0, id: 0, flags: 0 }; SHADOW],
                shadow_len: 0,
                inflight: [InFlight::NONE; IDS],
                config,
            },
        })
    }

    /// Gives up the borrow of guest memory and keeps everything else (see
    /// [`SplitQueue::detach`](crate::SplitQueue::detach)).
    pub fn detach(self) -> DetachedPackedQueue<IDS> {
        self.q
    }
}

impl<'m, M: GuestMemory + ?Sized, const IDS: usize, S: BorrowMut<DetachedPackedQueue<IDS>>> PackedQueue<'m, M, IDS, S> {
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn st(&self) -> &DetachedPackedQueue<IDS> {
        self.q.borrow()
    }

    #[cfg_attr(not(feature = "small"), inline(always))]
    fn st_mut(&mut self) -> &mut DetachedPackedQueue<IDS> {
        self.q.borrow_mut()
    }

    /// The configuration the queue was set up with.
    pub fn config(&self) -> &QueueConfig {
        &self.st().config
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.st().size
    }

    /// The guest memory buffers are translated in.
    pub fn memory(&self) -> &'m M {
        self.mem
    }

    /// Sets the largest indirect table accepted, in entries (default: the queue size).
    pub fn set_max_indirect_entries(&mut self, entries: u32) {
        self.st_mut().limits.max_indirect_entries = entries;
    }

    /// Whether `VIRTIO_F_IN_ORDER` was negotiated.
    pub fn in_order(&self) -> bool {
        self.st().in_order
    }

    /// The next descriptor the device will look at, with the driver-ring wrap counter.
    pub fn next_avail(&self) -> RingPosition {
        self.st().avail
    }

    /// Where the next used descriptor will be written, with the device-ring wrap counter.
    pub fn next_used(&self) -> RingPosition {
        self.st().used
    }

    /// Resumes at `avail` / `used` (vhost-user `SET_VRING_BASE` for packed rings). Forgets
    /// every buffer in flight.
    pub fn set_positions(&mut self, avail: RingPosition, used: RingPosition) {
        let q = self.st_mut();
        let size = q.size;
        q.avail = RingPosition { index: avail.index % size, wrap: avail.wrap };
        q.used = RingPosition { index: used.index % size, wrap: used.wrap };
        q.signalled = q.used;
        q.last_taken = NO_ID;
        q.pending = None;
        q.shadow_len = 0;
        q.inflight = [InFlight::NONE; IDS];
    }

    /// Takes the next chain into `chain` (cleared first; its [`Chain::head`] is the buffer
    /// id). `Ok(Some(id))` with the buffer id, `Ok(None)` when no descriptor is available, like
    /// [`pop_read`](Self::pop_read) and [`pop_write`](Self::pop_write).
    ///
    /// On [`PopError::Chain`] the buffer id was already completed with len 0 (see the module's
    /// error policy): log it and keep popping.
    #[inline]
    pub fn pop_into<const N: usize>(&mut self, chain: &mut Chain<'m, N>) -> Result<Option<u16>, PopError> {
        Ok(self.pop_chain(chain, true)?.then(|| chain.head()))
    }

    /// [`pop_into`](Self::pop_into), but a malformed chain is handed back without being
    /// completed (as [`SplitQueue`](crate::SplitQueue)'s): the caller completes its id (len
    /// 0) or gives it back with [`rewind`](Self::rewind).
    pub(crate) fn pop_uncompleted<const N: usize>(&mut self, chain: &mut Chain<'m, N>) -> Result<bool, PopError> {
        self.pop_chain(chain, false)
    }

    #[cfg_attr(not(feature = "small"), inline(always))]
    fn pop_chain<const N: usize>(&mut self, chain: &mut Chain<'m, N>, complete_bad: bool) -> Result<bool, PopError> {
        let Some((id, cursor)) = self.take(complete_bad)? else {
            return Ok(false);
        };
        if let Err(error) = walk_source_into(self.mem, cursor, id, &self.st().limits, chain) {
            if complete_bad {
                return Err(self.fail_chain(id, error));
            }
            return Err(PopError::Chain { head: id, error });
        }
        Ok(true)
    }

    /// Gives back the last `n` chains taken and not completed (the net receive path's
    /// reservations, §5.1.6.4: no partial packet): the position moves back to the first of
    /// them. Only chains taken after the last completion may be given back; the walk back
    /// stops at the first that is not in flight.
    pub fn rewind(&mut self, n: u16) {
        let q = self.st_mut();
        for _ in 0..n {
            let id = q.last_taken;
            let Some(&entry) = q.inflight.get(id as usize) else {
                return;
            };
            if entry.descs == 0 {
                return;
            }
            // The end was recorded by a pop of this queue, so its slot is below the size.
            let end = RingPosition::from_bits(entry.end, q.size).unwrap_or(q.avail);
            q.avail = end.back(entry.descs, q.size);
            q.last_taken = entry.prev;
            q.inflight[id as usize] = InFlight::NONE;
        }
    }

    /// Takes the next chain, returned by value (see [`pop_into`](Self::pop_into)).
    pub fn pop<const N: usize>(&mut self) -> Result<Option<Chain<'m, N>>, PopError> {
        let mut chain = Chain::new();
        Ok(self.pop_into(&mut chain)?.map(|_| chain))
    }

    /// Takes the next chain and copies its device-readable part into `buf` in the same pass
    /// that validates it (as [`SplitQueue::pop_read`](crate::SplitQueue::pop_read));
    /// [`CopiedChain::head`] is the buffer id.
    #[cfg_attr(not(feature = "small"), inline(always))]
    pub fn pop_read(&mut self, buf: &mut [u8]) -> Result<Option<CopiedChain>, PopError> {
        ring::pop_read::<_, true>(self, buf)
    }

    /// [`pop_read`](Self::pop_read), but a malformed chain ([`PopError::Chain`]) is not
    /// completed: the caller completes its buffer id (len 0) itself, in its order (as
    /// [`SplitQueue::pop_read_uncompleted`](crate::SplitQueue::pop_read_uncompleted)).
    #[cfg_attr(not(feature = "small"), inline(always))]
    pub fn pop_read_uncompleted(&mut self, buf: &mut [u8]) -> Result<Option<CopiedChain>, PopError> {
        ring::pop_read::<_, false>(self, buf)
    }

    /// [`pop_read_uncompleted`](Self::pop_read_uncompleted) for a device that may leave a
    /// frame where it is until it has placed it elsewhere ([`crate::net::Gather`]): copies the
    /// chain's first `head` device-readable bytes into `buf` ([`CopiedChain::bytes`] of them)
    /// and appends to `segments` the device-readable pieces past them (the part of a piece
    /// the copy did not take, then the pieces after it; nothing for a chain the copy holds
    /// whole), in the same pass that validates the chain: the frame is `buf[..bytes]` then
    /// those pieces ([`Gather::new`](crate::net::Gather::new)); [`Segments::take_front`]
    /// moves more of it into the copy. A chain whose pieces do not all find room in
    /// `segments` is copied into `buf` after all, as far as `buf` goes (so `bytes` falls short
    /// of [`CopiedChain::readable_len`] with nothing listed only for a chain longer than
    /// `buf`, as with `pop_read_uncompleted`). The chain is not completed: its buffers stay
    /// the device's until the caller pushes it, after its last read of them. `head` is held
    /// to `buf.len()`.
    #[cfg_attr(not(feature = "small"), inline(always))]
    pub fn pop_gather_uncompleted<const P: usize>(
        &mut self,
        buf: &mut [u8],
        head: usize,
        segments: &mut Segments<'m, P>,
    ) -> Result<Option<CopiedChain>, PopError> {
        ring::pop_gather_uncompleted(self, buf, head, segments)
    }

    /// Takes the next chain and writes `data` into its device-writable part in the same pass
    /// that validates it (as [`SplitQueue::pop_write`](crate::SplitQueue::pop_write)).
    #[cfg_attr(not(feature = "small"), inline(always))]
    pub fn pop_write(&mut self, data: &[u8]) -> Result<Option<CopiedChain>, PopError> {
        self.pop_write_logged(data, &NoLog)
    }

    /// [`pop_write`](Self::pop_write), reporting every piece written to `log` as a guest range.
    #[cfg_attr(not(feature = "small"), inline(always))]
    pub fn pop_write_logged<L: WriteLog>(&mut self, data: &[u8], log: &L) -> Result<Option<CopiedChain>, PopError> {
        ring::pop_write_logged(self, data, log)
    }

    /// Finds the next available chain's extent and consumes its descriptors; returns its
    /// buffer id and the cursor the walk reads its descriptors from, or the error policy's
    /// outcome for a chain whose extent or id is bad (completed only if `complete_bad`).
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn take(&mut self, complete_bad: bool) -> Result<Option<(u16, PackedCursor)>, PopError> {
        let q = self.st_mut();
        let start = q.avail;
        // SAFETY: the ring was validated for `16 * size` bytes, 4-aligned, at set-up, and
        // `avail.index < size` always holds.
        let Some(ext) = (unsafe { extent(q.ring, q.size, start) }) else {
            return Ok(None);
        };
        q.avail = start.advance(ext.descs, q.size);
        let id = ext.id;
        claim!(
            q,
            id,
            ext.descs,
            !q.in_order,
            |e| {
                log_warn!("virtq: packed buffer id {=u16} out of range", id);
                return Err(e);
            },
            {
                log_warn!("virtq: packed buffer id {=u16} made available twice", id);
                return Err(e);
            }
        );
        if let Some(error) = ext.error {
            if complete_bad {
                return Err(self.fail_chain(id, error));
            }
            return Err(PopError::Chain { head: id, error });
        }
        let cursor = PackedCursor {
            ring: q.ring,
            size: q.size,
            head: ext.head,
            slot: start.index,
            left: ext.descs,
            first: true,
            table: DescTable::new(NonNull::dangling(), 0),
            index: 0,
            in_indirect: false,
        };
        Ok(Some((id, cursor)))
    }

    /// Takes up to `max` (at most [`BATCH`]) chains at once, consecutive from the device's
    /// position, handing the `i`-th to `emit(i, chain)`; returns how many. It takes the chains
    /// a single pop would take, with the same outcome, and only those whose outcome it can
    /// tell from one descriptor: available (§2.8.1), neither `NEXT` nor `INDIRECT`, `WRITE`
    /// as `writable` asks (the readable buffer of a transmitted frame, the writable one of a
    /// receive buffer), a non-empty buffer that one translation covers ([`translate_whole`]),
    /// and a buffer id `claim!` accepts (and with `VIRTIO_F_IN_ORDER`, not one this batch
    /// took already). It stops before the first chain that is not such, and before the
    /// ring's end (a batch never wraps), and consumes nothing it does not return: the single
    /// pop takes that chain next, and gives it its outcome (an error included). So a batch
    /// changes how many descriptors are read per call, never which chains are taken or what
    /// is reported (`core/tests/packed_batch.rs` holds both users, transmit and receive, to
    /// that, chain kind by kind).
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn take_batch(&mut self, writable: bool, max: usize, mut emit: impl FnMut(usize, BatchBuffer)) -> usize {
        let mem = self.mem;
        let q = self.st_mut();
        let start = q.avail;
        let (size, ring) = (q.size, q.ring.as_ptr());
        // `avail.index < size`: at least one slot before the ring's end.
        let max = max.min(BATCH).min((size - start.index) as usize);
        let write = if writable { DescFlags::WRITE.bits() } else { 0 };
        let kind = DescFlags::NEXT.bits() | DescFlags::INDIRECT.bits() | DescFlags::WRITE.bits();
        // The ids this batch took (`NO_ID` is no id: ids are below the size).
        let mut ids = [NO_ID; BATCH];
        let mut n = 0;
        while n < max {
            let slot = start.index + n as u16;
            // SAFETY: `slot < size` (`max` stops at the ring's end): its `flags` at offset 14
            // are a 2-aligned field inside the validated ring. Acquire, as `extent`'s: the
            // descriptor's body and its buffer were written before the driver's release.
            let p = unsafe { ring.add(slot as usize * DESC_SIZE) };
            // SAFETY: as above.
            let flags = unsafe { load_u16(p.add(14), Ordering::Acquire) };
            if !is_available(flags, start.wrap) || flags & kind != write {
                break;
            }
            // SAFETY: slot `slot` of the validated, 4-aligned ring; ordered after the acquire
            // load of its flags.
            let (addr, len, id) = unsafe { read_packed_aligned(p) };
            // The walk's `buffer` gives an empty or overflowing buffer its own outcome.
            if len == 0 || addr.checked_add(len as u64).is_none() {
                break;
            }
            let Some(ptr) = translate_whole(mem, addr, len) else {
                break;
            };
            // With IN_ORDER the in-flight table is not asked (an in-order batch completion
            // leaves the ids before its last one recorded), but a batch claims its chains
            // before any is completed, where singles may complete one before taking the next:
            // an id already taken by this batch is left to the single pop.
            // (The batch's earlier ids are in `ids[..3]`, the rest `NO_ID`; unrolled, as a
            // loop over `ids[..n]` it cost the receive echo 17 instructions a frame.)
            const _: () = assert!(BATCH == 4, "the comparisons below cover a batch of four");
            if q.in_order && (ids[0] == id || ids[1] == id || ids[2] == id) {
                break;
            }
            // The position after this chain (the next slot, or the ring's start in the next
            // round after its last slot), which `claim!` records; back to the chain's own if
            // its id is refused.
            let at = RingPosition { index: slot, wrap: start.wrap };
            q.avail = at.advance(1, size);
            claim!(
                q,
                id,
                1,
                !q.in_order,
                |_e| {
                    q.avail = at;
                    break;
                },
                {
                    q.avail = at;
                    break;
                }
            );
            if let Some(i) = ids.get_mut(n) {
                *i = id;
            }
            emit(n, BatchBuffer { head: id, len, ptr, addr });
            n += 1;
        }
        n
    }

    /// Takes up to `bufs.len()` (at most [`BATCH`]) chains at once and copies the
    /// device-readable part of the `i`-th into `bufs[i]`, as that many calls of
    /// [`pop_read_uncompleted`](Self::pop_read_uncompleted) would, but in one pass over the
    /// descriptors: the chains' buffers are translated and prefetched together, with those
    /// of the next four descriptors as far as the driver made them available, then copied
    /// (DPDK's `virtio_dev_tx_batch_packed` prefetches its batch's). It takes only chains of
    /// one device-readable descriptor, and stops before any other (a malformed one
    /// included), which the single pop then takes: an empty batch is no answer, call
    /// `pop_read_uncompleted` after it. Nothing is completed.
    // Out of line, as `pop_writable_batch`: it is called once per four chains, and both
    // layouts' burst loops are compiled into one function by the adapter, whose split-ring
    // path must not pay for it in registers.
    #[inline(never)]
    pub fn pop_read_batch(&mut self, bufs: &mut [&mut [u8]]) -> ReadBatch {
        let mut taken = [BatchBuffer::NONE; BATCH];
        let n = self.take_batch(false, bufs.len(), |i, c| {
            if let Some(t) = taken.get_mut(i) {
                *t = c;
            }
        });
        let taken = &taken[..n.min(BATCH)];
        for c in taken {
            prefetch_buffer(c.ptr);
        }
        // And the next four descriptors' (the next batch's, in the usual ring of one
        // descriptor per chain), whose misses then overlap with this batch's copies (the PVP
        // echo, `pvp64-mrg-packed`: 1.05 against this batch's alone, benches/README.md).
        if n != 0 {
            let q = self.st();
            // SAFETY: the ring was validated for `16 * size` bytes, 4-aligned, at set-up, and
            // `avail.index < size` always holds.
            unsafe { prefetch_ahead(self.mem, q.ring, q.size, q.avail, 0, BATCH as u16) };
        }
        let mut out = ReadBatch::default();
        for (c, buf) in taken.iter().zip(bufs.iter_mut()) {
            let n = (c.len as usize).min(buf.len());
            // SAFETY: `c.ptr` is valid for reads of `c.len >= n` bytes of guest memory for 'm
            // (translated whole by `take_batch`); `buf` is Rust memory of at least `n` bytes,
            // never overlapping guest memory.
            unsafe { copy_bytes(c.ptr.as_ptr(), buf.as_mut_ptr(), n) };
            if let Some(o) = out.chains.get_mut(out.len) {
                *o = CopiedChain { head: c.head, bytes: n as u32, readable_len: c.len, writable_len: 0 };
                out.len += 1;
            }
        }
        out
    }

    /// The receive path's batch pop: up to `max` (at most [`BATCH`]) chains of one
    /// device-writable descriptor into `out`, as that many calls of `pop_first_writable`
    /// would take them; returns how many (see `take_batch`).
    #[inline(never)]
    pub(crate) fn pop_writable_batch(&mut self, max: usize, out: &mut [BatchBuffer; BATCH]) -> usize {
        self.take_batch(true, max, |i, c| {
            if let Some(o) = out.get_mut(i) {
                *o = c;
            }
        })
    }

    /// A hint to the CPU, for a device that copies chain after chain out of large buffers:
    /// load the first two cache lines of the buffer of the descriptor [`PREFETCH_AHEAD`]
    /// slots past the next one, if the driver has made it available. Each buffer's first
    /// lines were last written by the driver's CPU (the virtio-net header and the frame's
    /// headers): fetched on demand, one cross-CPU transfer follows the other, each after a
    /// long copy; asked for a few chains ahead, they overlap with the copies in between. DPDK's
    /// vhost does the same in its packed-ring batches (`virtio_dev_tx_batch_packed`: prefetch
    /// four buffers, then copy them); without it, guest TX of 1518-byte frames through
    /// virtq-net fell behind DPDK's, at 1518 bytes and echoing 64-byte frames alike
    /// (`benches/README.md`, vs-dpdk). The hint costs about 45 instructions (translating an
    /// address).
    ///
    /// Nothing is consumed, validated or trusted: the descriptor is read as a pop reads one
    /// (its flags with acquire, then its address), the address is only translated, and a
    /// prefetch cannot fault, so a hostile or half-written descriptor costs a wasted hint at
    /// most. Does nothing where there is no prefetch instruction to emit (only x86-64 has
    /// one here) and under Miri.
    #[inline]
    pub fn prefetch(&self) {
        let q = self.st();
        // SAFETY: the ring was validated for `16 * size` bytes, 4-aligned, at set-up, and
        // `avail.index < size` always holds.
        unsafe { prefetch_ahead(self.mem, q.ring, q.size, q.avail, PREFETCH_AHEAD, 1) };
    }

    /// Buffer `id`'s in-flight record, if it was taken and not completed.
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn in_flight(&self, id: u16) -> Option<InFlight> {
        let q = self.st();
        if id >= q.size {
            return None;
        }
        // SAFETY: `id < size <= IDS` (checked when the queue was set up).
        let entry = unsafe { *q.inflight.get_unchecked(id as usize) };
        (entry.descs != 0).then_some(entry)
    }

    /// Completes a malformed chain's buffer id with len 0 (the error policy).
    #[cold]
    fn fail_chain(&mut self, id: u16, error: ChainError) -> PopError {
        log_warn!("virtq: malformed packed chain, buffer id {=u16}: {}", id, error);
        self.push(id, 0);
        PopError::Chain { head: id, error }
    }

    /// Completes buffer `id` (one taken by a pop and not completed yet): a used descriptor
    /// `{id, len}` at the device's position (kept in the shadow list until stored, at the
    /// latest by `publish`), and moves past as many descriptors as the buffer's chain took
    /// (§2.8.6). Visible at the next [`publish`](Self::publish). An id
    /// that is not in flight is ignored: writing it would desynchronise the driver.
    #[inline]
    pub fn push(&mut self, id: u16, len: u32) {
        let Some(entry) = self.in_flight(id) else {
            return;
        };
        self.write_used(id, len);
        let q = self.st_mut();
        q.used = q.used.advance(entry.descs, q.size);
        // Cleared, so a `rewind` walking back through `prev` links stops here: a completed
        // chain cannot be given back.
        q.inflight[id as usize] = InFlight::NONE;
    }

    /// IN_ORDER batched completion (§2.8.9 "In-order use of descriptors": "the device can
    /// write out a single used descriptor with the Buffer ID corresponding to the last
    /// descriptor in the batch", then skip the batch's descriptors): one used descriptor for
    /// `last_id`, the position moved past `last_id`'s chain. Returns `false` and writes nothing
    /// if IN_ORDER was not negotiated.
    #[must_use]
    pub fn push_in_order_batch(&mut self, last_id: u16, last_len: u32, count: u16) -> bool {
        if !self.st().in_order {
            return false;
        }
        let Some(entry) = self.in_flight(last_id) else {
            return true;
        };
        if count == 0 {
            return true;
        }
        self.write_used(last_id, last_len);
        let q = self.st_mut();
        // The end was recorded by a pop of this queue, so its slot is below the size.
        q.used = RingPosition::from_bits(entry.end, q.size).unwrap_or(q.used);
        q.inflight[last_id as usize] = InFlight::NONE;
        true
    }

    /// Completes `id` at the device's position: kept in the shadow list, which
    /// [`DetachedPackedQueue::store_used`] stores to the ring when full and `publish` at the
    /// latest. The first completion since the last publish is also `pending`: its flags are
    /// stored last, by `publish`.
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn write_used(&mut self, id: u16, len: u32) {
        let q = self.st_mut();
        if q.shadow_len as usize == SHADOW {
            q.store_used();
        }
        let slot = q.used.index;
        let flags = if q.used.wrap { VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED } else { 0 };
        if q.pending.is_none() {
            q.pending = Some((slot, flags));
        }
        // Below `SHADOW`: stored out just above when full.
        let i = q.shadow_len as usize;
        if let Some(e) = q.shadow.get_mut(i) {
            *e = UsedShadow { len, slot, id, flags };
            q.shadow_len += 1;
        }
    }

    /// Makes every completion since the last call visible (the first used descriptor's flags,
    /// stored last with release) and returns whether the driver must be notified, from the
    /// driver's event suppression structure (§2.8.10): `ENABLE` notifies, `DISABLE` does not,
    /// `DESC` (with `VIRTIO_F_EVENT_IDX`) notifies when the used descriptor at its offset and
    /// wrap counter was among those just published. Publishing nothing never notifies.
    #[must_use]
    #[inline]
    pub fn publish(&mut self) -> bool {
        let q = self.st_mut();
        if q.shadow_len != 0 {
            q.store_used();
        }
        let Some((slot, flags)) = q.pending.take() else {
            return false;
        };
        // SAFETY: `flags` of descriptor `slot < size` in the validated ring. Release: every
        // used descriptor's body and the buffers before it (§2.8.21.3).
        unsafe { store_u16(q.ring.as_ptr().add(slot as usize * DESC_SIZE + 14), flags, Ordering::Release) };
        let old = q.signalled;
        let new = q.used;
        q.signalled = new;
        // Store-load ordering: the used flags must be visible before the driver's suppression
        // state is read, or a driver that just enabled notifications could be missed.
        fence(Ordering::SeqCst);
        // SAFETY: the driver area's `flags` (offset 2) and `desc` (offset 0), 2-aligned
        // inside the validated 4-byte structure.
        let (event_flags, off_wrap) = unsafe {
            (load_u16(q.driver.as_ptr().add(2), Ordering::Relaxed), load_u16(q.driver.as_ptr(), Ordering::Relaxed))
        };
        match event_flags & 3 {
            RING_EVENT_FLAGS_DISABLE => false,
            RING_EVENT_FLAGS_DESC if q.event_idx => packed_need_event(off_wrap, old, new, q.size),
            // ENABLE; DESC without EVENT_IDX and the reserved value 3 notify too: a spurious
            // notification costs the driver a look, a missing one can stall it.
            _ => true,
        }
    }

    /// [`publish`](Self::publish), then reports to `log` the used descriptors written since
    /// the last publish: the descriptor ring from the position then to the position now, as
    /// one range or two where it wraps. With `VIRTIO_F_IN_ORDER` a batch's skipped
    /// descriptors are inside the range though not written (a superset, at most the pages
    /// the batch spans).
    #[must_use]
    pub fn publish_logged<L: WriteLog>(&mut self, log: &L) -> bool {
        let (old, any) = (self.st().signalled, self.st().pending.is_some());
        let notify = self.publish();
        if L::ENABLED && any {
            let q = self.st();
            let (start, end) = (old.index as u64, q.used.index as u64);
            let d = DESC_SIZE as u64;
            if end > start {
                log.descriptor_ring(start * d, (end - start) * d);
            } else {
                // Wrapped (or a whole lap: `end == start`).
                log.descriptor_ring(start * d, (q.size as u64 - start) * d);
                if end != 0 {
                    log.descriptor_ring(0, end * d);
                }
            }
        }
        notify
    }

    /// Reports to `log` the device area, which
    /// [`disable_notifications`](Self::disable_notifications) and
    /// [`enable_notifications`](Self::enable_notifications) write (§2.8.10). Call it after
    /// either while tracking writes.
    pub fn log_suppression<L: WriteLog>(&self, log: &L) {
        log.device_area(0, EVENT_SUPPRESS_SIZE);
    }

    /// Asks the driver not to notify (device area `flags` = `DISABLE`, §2.8.10).
    pub fn disable_notifications(&mut self) {
        // SAFETY: the device area's `flags`, 2-aligned inside the validated structure.
        unsafe { store_u16(self.st().device.as_ptr().add(2), RING_EVENT_FLAGS_DISABLE, Ordering::Relaxed) };
    }

    /// Asks the driver to notify again (with `VIRTIO_F_EVENT_IDX`: when the descriptor at the
    /// device's position is made available, `DESC` mode; otherwise `ENABLE`), then looks at
    /// that descriptor again. `Ok(true)` means a buffer arrived meanwhile and must be processed
    /// before sleeping (the full fence closes the race with a driver that read the old state).
    pub fn enable_notifications(&mut self) -> Result<bool, PopError> {
        let q = self.st_mut();
        let dev = q.device.as_ptr();
        if q.event_idx {
            // SAFETY: the device area's `desc` and `flags`, 2-aligned inside the structure.
            unsafe {
                store_u16(dev, q.avail.to_bits(), Ordering::Relaxed);
                store_u16(dev.add(2), RING_EVENT_FLAGS_DESC, Ordering::Relaxed);
            }
        } else {
            // SAFETY: as above.
            unsafe { store_u16(dev.add(2), RING_EVENT_FLAGS_ENABLE, Ordering::Relaxed) };
        }
        fence(Ordering::SeqCst);
        // SAFETY: `flags` of descriptor `avail.index < size` in the validated ring.
        let flags =
            unsafe { load_u16(q.ring.as_ptr().add(q.avail.index as usize * DESC_SIZE + 14), Ordering::Acquire) };
        Ok(is_available(flags, q.avail.wrap))
    }
}

// The packed ring's walk for the fused pops (`crate::ring`): the chain's extent and buffer id
// from the descriptor ring (`take`, §2.8.6), then the walk over its descriptors.
impl<'m, M: GuestMemory + ?Sized, const IDS: usize, S: BorrowMut<DetachedPackedQueue<IDS>>> Walk<'m>
    for PackedQueue<'m, M, IDS, S>
{
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn pop_with<F, const COMPLETE_BAD: bool>(&mut self, piece: F) -> Result<Option<(u16, WalkSummary)>, PopError>
    where
        F: FnMut(NonNull<u8>, u32, bool, u64) -> Result<(), ChainError>,
    {
        let Some((id, cursor)) = self.take(COMPLETE_BAD)? else {
            return Ok(None);
        };
        match walk_source(self.mem, cursor, &self.st().limits, piece) {
            Ok(sum) => Ok(Some((id, sum))),
            Err(error) if COMPLETE_BAD => Err(self.fail_chain(id, error)),
            Err(error) => {
                log_warn!("virtq: malformed packed chain, buffer id {=u16}: {}", id, error);
                Err(PopError::Chain { head: id, error })
            }
        }
    }
}

/// [`PackedQueue::prefetch`] and the batch pop's look ahead: the buffers of the `count`
/// descriptors from `from` slots past `next`, as far as the driver made them available. Given
/// the queue's state by value and kept out of line (`cold` only places it so): inlined into a
/// burst loop, or called with a reference to the queue, it cost the loop registers and memory
/// round trips on every chain.
///
/// # Safety
/// `ring` must be valid for `16 * size` bytes, 4-aligned, accessed only atomically or by
/// the guest; `next.index < size`.
#[cold]
#[inline(never)]
unsafe fn prefetch_ahead<M: GuestMemory + ?Sized>(
    mem: &M,
    ring: NonNull<u8>,
    size: u16,
    next: RingPosition,
    from: u16,
    count: u16,
) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        // The slots looked at are distinct (and none is `next` itself when `from` is not 0).
        if size < from + count {
            return;
        }
        let mut pos = next.advance(from, size);
        for _ in 0..count {
            // SAFETY: `pos.index < size`, a slot of the ring (the caller's contract).
            let p = unsafe { ring.as_ptr().add(pos.index as usize * DESC_SIZE) };
            // SAFETY: `flags` at 14 of that slot, 2-aligned.
            let flags = unsafe { load_u16(p.add(14), Ordering::Acquire) };
            if !is_available(flags, pos.wrap) {
                return;
            }
            // SAFETY: as above; ordered after the acquire load of the flags.
            let (addr, _, _) = unsafe { read_packed_aligned(p) };
            let Ok(r) = mem.translate(addr, 1) else {
                return;
            };
            prefetch_buffer(r.ptr);
            pos = pos.advance(1, size);
        }
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    let _ = (mem, ring, size, next, from, count);
}

/// Asks the CPU for the first two cache lines of a buffer at `ptr` (the virtio-net header and
/// a frame's headers). Nothing where there is no prefetch instruction to emit (only x86-64 has
/// one here) and under Miri.
#[cfg_attr(not(feature = "small"), inline(always))]
fn prefetch_buffer(ptr: NonNull<u8>) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let line = ptr.as_ptr().cast::<i8>().cast_const();
        // SAFETY: `_mm_prefetch` needs SSE, which every x86-64 CPU has (it is in the target's
        // baseline). A prefetch is a hint: it does not fault and accesses nothing the program
        // can observe, whatever the address (the second line may lie past the buffer).
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(line);
            _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(64));
        }
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    let _ = ptr;
}

/// The notification decision of `DESC` mode (§2.8.10, the packed form of `vring_need_event`):
/// did the used descriptors published between positions `old` and `new` include the one at
/// `off_wrap`'s offset in its round? Positions of the round before `new`'s are taken as
/// offsets minus `size`, so one comparison covers a window that wraps.
#[inline]
pub fn packed_need_event(off_wrap: u16, old: RingPosition, new: RingPosition, size: u16) -> bool {
    let mut old_i = old.index;
    if new.index <= old.index {
        old_i = old_i.wrapping_sub(size);
    }
    let mut off = off_wrap & 0x7fff;
    if (off_wrap & 0x8000 != 0) != new.wrap {
        off = off.wrapping_sub(size);
    }
    vring_need_event(off, new.index, old_i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn availability_follows_the_wrap_counter() {
        assert!(is_available(VIRTQ_DESC_F_AVAIL, true));
        assert!(!is_available(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED, true));
        assert!(!is_available(0, true));
        assert!(is_available(VIRTQ_DESC_F_USED, false));
        assert!(!is_available(0, false));
        assert!(!is_available(VIRTQ_DESC_F_AVAIL, false));
    }

    #[test]
    fn positions_wrap_and_encode() {
        let p = RingPosition { index: 3, wrap: true };
        assert_eq!(p.advance(2, 5), RingPosition { index: 0, wrap: false });
        assert_eq!(p.advance(1, 5), RingPosition { index: 4, wrap: true });
        assert_eq!(p.advance(5, 5), RingPosition { index: 3, wrap: false });
        assert_eq!(RingPosition::from_bits(p.to_bits(), 5), Some(p));
        assert_eq!(RingPosition::from_bits(0x8005, 5), None);
    }

    #[test]
    fn need_event_equals_brute_force_over_rounds() {
        let size = 6u16;
        // Every start, batch length and event position in the current or previous round.
        for start in 0..2 * size {
            let old = RingPosition { index: start % size, wrap: start < size };
            for n in 1..=size {
                let new = old.advance(n, size);
                for off in 0..size {
                    for wrap in [false, true] {
                        let want = (0..n).any(|k| old.advance(k, size) == RingPosition { index: off, wrap });
                        let bits = RingPosition { index: off, wrap }.to_bits();
                        assert_eq!(packed_need_event(bits, old, new, size), want, "{old:?} +{n} event {off}/{wrap}");
                    }
                }
            }
        }
    }
}
