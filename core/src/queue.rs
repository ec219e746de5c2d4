//! A split virtqueue, device side (VIRTIO 1.2 §2.7): validated set-up, the available half
//! ([`AvailRing`]), the used half ([`UsedRing`]) and the chain walk, over guest memory borrowed
//! for `'m`.
//!
//! ## Error policy
//! Every pop that fails says in its [`PopError`] what the queue did: a bad `avail.idx`
//! ([`PopError::AvailIndex`]) consumes nothing and repeats until the driver fixes it; a head
//! index out of range ([`PopError::HeadOutOfRange`]) consumes its slot and completes nothing
//! (with `VIRTIO_F_IN_ORDER` that loses the driver's place, and the queue cannot go on:
//! [`PopError::unreturnable_on`]); any other malformed chain ([`PopError::Chain`]) consumes its slot and completes the head at
//! once with used `len` 0 (visible at the next [`SplitQueue::publish`]; not with
//! [`SplitQueue::pop_read_uncompleted`] or [`SplitQueue::pop_into_uncompleted`], whose caller
//! completes it, after writing what it can into it, such as a status byte:
//! [`SplitQueue::write_last_byte`]), so the queue never stalls. The reasons, and the
//! policy of the packed ring and of the vhost-user back-end, are one table: the *Error policy*
//! section of the repository's README.

use core::fmt;
use core::ptr::NonNull;

use crate::avail::{AvailIndexError, AvailRing};
use crate::chain::{
    last_writable_byte, walk, walk_pieces, Chain, ChainError, ChainLimits, DescTable, Segments, WalkSummary,
};
use crate::desc::DESC_SIZE;
use crate::dirty::{NoLog, WriteLog};
use crate::features::VirtioFeatures;
use crate::log::log_warn;
use crate::mem::{copy_bytes, GuestMemory, MemError};
use crate::ring::{self, sealed::Walk, Virtqueue};
use crate::used::UsedRing;

/// Largest queue size the spec allows (§2.7: "The maximum Queue Size value is 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Checks a split queue's size (§2.7 "Split Virtqueues": "Queue Size value is always a power
/// of 2. The maximum Queue Size value is 32768."). 0 is refused as well: it is no queue, and
/// the ring halves index slots with the mask `size - 1`.
///
/// The one owner of this rule. [`SplitQueue::new`] and [`SplitQueue::with_ring_memory`] apply
/// it, and so should a transport that learns the size before the queue is set up (vhost-user's
/// `SET_VRING_NUM`), so that a size is judged the same wherever it arrives. A transport whose
/// size field is wider than 16 bits must refuse larger values itself, not truncate them.
pub const fn validate_size(size: u16) -> Result<(), QueueError> {
    // `is_power_of_two` is false for 0. Every power of two a `u16` holds is ≤ 32768, so the
    // maximum follows from the type; it is compared anyway so the check reads as the rule.
    if size.is_power_of_two() && size <= MAX_QUEUE_SIZE {
        Ok(())
    } else {
        Err(QueueError::InvalidSize { size })
    }
}

/// Where the driver placed a queue (guest addresses, or front-end addresses for vhost-user
/// rings) and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct QueueConfig {
    /// Queue size: a power of two, 1..=32768.
    pub size: u16,
    /// Descriptor table, 16-aligned, `16 * size` bytes.
    pub desc_table: u64,
    /// Available ring, 2-aligned, `6 + 2 * size` bytes.
    pub avail_ring: u64,
    /// Used ring, 4-aligned, `6 + 8 * size` bytes.
    pub used_ring: u64,
}

impl QueueConfig {
    /// Bytes of the descriptor table.
    pub fn desc_table_len(&self) -> u64 {
        DESC_SIZE as u64 * self.size as u64
    }

    /// Bytes of the available ring including `used_event`.
    pub fn avail_ring_len(&self) -> u64 {
        6 + 2 * self.size as u64
    }

    /// Bytes of the used ring including `avail_event`.
    pub fn used_ring_len(&self) -> u64 {
        6 + 8 * self.size as u64
    }
}

/// The three areas of a split queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RingPart {
    /// The descriptor table.
    DescTable,
    /// The available ring.
    AvailRing,
    /// The used ring.
    UsedRing,
}

/// Why a queue could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum QueueError {
    /// Size 0, not a power of two, or above 32768 (§2.7; [`validate_size`]).
    InvalidSize {
        /// The size given.
        size: u16,
    },
    /// A ring's guest address is not aligned as §2.7 requires (16 / 2 / 4 bytes).
    Misaligned {
        /// Which ring.
        part: RingPart,
        /// Its address.
        addr: u64,
    },
    /// A ring is not entirely inside guest memory, or not host-contiguous.
    Unmapped {
        /// Which ring.
        part: RingPart,
        /// Translation failure.
        error: MemError,
    },
    /// A ring's host address is not aligned for atomic access (a memory back-end problem).
    HostMisaligned {
        /// Which ring.
        part: RingPart,
    },
    /// The used ring overlaps the descriptor table or the available ring: the device would
    /// write what it must only read (§2.7.5.1 "MUST NOT write to any descriptor table entry").
    Overlap {
        /// The ring the used ring overlaps.
        part: RingPart,
    },
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::InvalidSize { size } => {
                write!(f, "queue size {size} is not a power of two in 1..={MAX_QUEUE_SIZE}")
            }
            QueueError::Misaligned { part, addr } => write!(f, "{part:?} at {addr:#x} is misaligned"),
            QueueError::Unmapped { part, error } => write!(f, "{part:?}: {error}"),
            QueueError::HostMisaligned { part } => {
                write!(f, "{part:?} host mapping is misaligned")
            }
            QueueError::Overlap { part } => write!(f, "used ring overlaps the {part:?}"),
        }
    }
}

/// A chain could not be taken from the available ring. See the module's error policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PopError {
    /// `avail.idx` is invalid; nothing was consumed.
    AvailIndex(AvailIndexError),
    /// The ring slot held a head index ≥ queue size (packed ring: the chain's buffer id
    /// ≥ queue size); the slot (the chain's descriptors) was consumed. Fatal to the queue
    /// where [`PopError::unreturnable_on`] says so.
    HeadOutOfRange {
        /// The head index read from the ring.
        head: u16,
    },
    /// Packed ring (§2.8): the chain's buffer id is already in flight (the driver made a
    /// buffer available twice); its descriptors were consumed, nothing was completed
    /// ([`crate::packed`]'s error policy). Fatal to the queue ([`PopError::unreturnable_on`]).
    IdInUse {
        /// The buffer id.
        id: u16,
    },
    /// The chain at `head` is malformed; it was completed with used `len` 0.
    Chain {
        /// The chain's head index (already completed).
        head: u16,
        /// What was wrong.
        error: ChainError,
    },
}

impl PopError {
    /// The head index or buffer id of the chain this error consumed without completing it, if
    /// on `queue` that loses the driver's place; `None` otherwise. `Some` means the queue cannot
    /// go on: the device must stop serving it (the vhost-user back-end faults the ring with
    /// `RingFault::Unreturnable`; [`crate::net::receive`] stops with
    /// [`RxError::Ring`](crate::net::RxError::Ring)). `None` for every other error, and on a
    /// split ring without `VIRTIO_F_IN_ORDER`, where the slot is consumed and the queue goes on
    /// (the module's error policy).
    ///
    /// The one owner of this rule; every device path that meets these errors asks it. A chain
    /// whose head index or buffer id is out of range ([`PopError::HeadOutOfRange`]) or already
    /// in flight ([`PopError::IdInUse`]) has no id to complete it with, and completing nothing
    /// for it breaks what the driver relies on where completions are positional:
    /// - with `VIRTIO_F_IN_ORDER` (§2.7.8.2 split, §2.8.9 packed) a used entry also completes
    ///   every buffer made available before it ("the skipped buffers … are assumed to have
    ///   been used"): the next completion would tell the driver that this chain was used, and
    ///   every later one would be matched to the wrong buffer;
    /// - on a packed ring (§2.8.6: the device skips forward by the chain's descriptors as it
    ///   completes a buffer id) the chain's descriptors are never covered by a used
    ///   descriptor: the used position falls behind the available one for good, and the driver
    ///   never gets those descriptors back.
    ///
    /// Without IN_ORDER a split ring's used entries name their heads, so skipping the slot
    /// misleads no one.
    #[cfg_attr(not(feature = "small"), inline(always))]
    pub fn unreturnable_on<'m, Q: Virtqueue<'m>>(&self, queue: &Q) -> Option<u16> {
        match *self {
            PopError::HeadOutOfRange { head } | PopError::IdInUse { id: head } if Q::PACKED || queue.in_order() => {
                Some(head)
            }
            _ => None,
        }
    }
}

impl From<AvailIndexError> for PopError {
    fn from(e: AvailIndexError) -> Self {
        PopError::AvailIndex(e)
    }
}

impl fmt::Display for PopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PopError::AvailIndex(e) => {
                write!(f, "avail.idx {} is more than the queue size ahead of {}", e.avail_idx, e.next_avail)
            }
            PopError::HeadOutOfRange { head } => write!(f, "head index {head} out of range"),
            PopError::IdInUse { id } => write!(f, "buffer id {id} is already in flight"),
            PopError::Chain { head, error } => write!(f, "chain at head {head}: {error}"),
        }
    }
}

/// A chain taken by [`SplitQueue::pop_read`] or [`SplitQueue::pop_write`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopiedChain {
    /// Head index: the `id` to complete.
    pub head: u16,
    /// Bytes copied (out of the readable part, or into the writable part).
    pub bytes: u32,
    /// Total bytes in the chain's device-readable buffers.
    pub readable_len: u32,
    /// Total bytes in the chain's device-writable buffers.
    pub writable_len: u32,
}

impl CopiedChain {
    pub(crate) fn new(head: u16, bytes: usize, sum: WalkSummary) -> Self {
        CopiedChain { head, bytes: bytes as u32, readable_len: sum.readable_len, writable_len: sum.writable_len }
    }
}

/// A split virtqueue, device side, over guest memory `M` borrowed for `'m`.
///
/// Typical device loop:
/// ```ignore
/// let mut chain = Chain::<16>::new();
/// while let Some(head) = queue.pop_into(&mut chain)? {   // PopError::Chain: logged, head already completed
///     let n = process(&chain);
///     queue.push(head, n);
/// }
/// if queue.publish() { notify_driver(); }
/// ```
#[derive(Debug)]
pub struct SplitQueue<'m, M: GuestMemory + ?Sized> {
    mem: &'m M,
    /// Everything but the borrow of guest memory (what [`detach`](Self::detach) keeps).
    q: DetachedQueue,
}

/// A chain taken by `pop_first_writable`: its head, its totals, and its first buffer's host
/// range if that buffer is device-writable.
#[doc(hidden)]
pub struct FirstWritable {
    pub head: u16,
    pub sum: WalkSummary,
    /// The first piece if it is device-writable: host pointer, length, guest address.
    pub first: Option<(NonNull<u8>, u32, u64)>,
}

/// A chain of one descriptor taken by a packed ring's batch pop (`PackedQueue::take_batch`):
/// its buffer id, and its buffer's length and host and guest addresses, translated whole.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct BatchBuffer {
    pub head: u16,
    pub len: u32,
    pub ptr: NonNull<u8>,
    pub addr: u64,
}

impl BatchBuffer {
    /// A placeholder for arrays of them (a batch's unused slots).
    pub(crate) const NONE: BatchBuffer = BatchBuffer { head: 0, len: 0, ptr: NonNull::dangling(), addr: 0 };
}

/// A [`SplitQueue`] between bursts: its validated state without the borrow of guest memory
/// (see [`SplitQueue::detach`]). It holds host pointers into the rings, so it is neither `Send`
/// nor usable on its own; [`attach`](Self::attach) turns it back into a queue.
#[derive(Debug)]
pub struct DetachedQueue {
    desc: DescTable,
    avail: AvailRing,
    used: UsedRing,
    limits: ChainLimits,
    in_order: bool,
    notify_on_empty: bool,
    config: QueueConfig,
}

impl DetachedQueue {
    /// The configuration the queue was set up with.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Next available index to consume.
    pub fn next_avail(&self) -> u16 {
        self.avail.next_avail()
    }

    /// Next used index.
    pub fn next_used(&self) -> u16 {
        self.used.next_used()
    }

    /// The queue again, over `mem`.
    ///
    /// # Safety
    /// The ring ranges validated when the queue was created must still be mapped, valid and
    /// unchanged in meaning for `'m`, and `mem` must translate buffer addresses under the
    /// same [`GuestMemory`] contract as the memory the queue was created with. Keeping the
    /// memory object alive (for example an `Arc` held next to this value) and attaching to
    /// that same object satisfies both; after the memory table changes, set the queue up again
    /// with [`SplitQueue::with_ring_memory`] instead.
    pub unsafe fn attach<'m, M: GuestMemory + ?Sized>(self, mem: &'m M) -> SplitQueue<'m, M> {
        SplitQueue { mem, q: self }
    }
}

impl<'m, M: GuestMemory + ?Sized> SplitQueue<'m, M> {
    /// Sets up a queue whose rings and buffers are both addressed in `mem`.
    ///
    /// The next available index starts at 0 and the next used index is read from `used.idx`
    /// in guest memory; see [`set_next_avail`](Self::set_next_avail) to resume elsewhere.
    pub fn new(mem: &'m M, config: QueueConfig, features: VirtioFeatures) -> Result<Self, QueueError> {
        Self::with_ring_memory(mem, mem, config, features)
    }

    /// Sets up a queue whose ring addresses are translated by `rings` (e.g. vhost-user front-end
    /// virtual addresses) and whose buffers are translated by `mem` (guest physical addresses).
    pub fn with_ring_memory<R: GuestMemory + ?Sized>(
        mem: &'m M,
        rings: &'m R,
        config: QueueConfig,
        features: VirtioFeatures,
    ) -> Result<Self, QueueError> {
        let size = config.size;
        validate_size(size)?;
        let parts = [
            (RingPart::DescTable, config.desc_table, config.desc_table_len(), 16u64),
            (RingPart::AvailRing, config.avail_ring, config.avail_ring_len(), 2),
            (RingPart::UsedRing, config.used_ring, config.used_ring_len(), 4),
        ];
        let mut ptrs = [NonNull::dangling(); 3];
        for (i, &(part, addr, len, align)) in parts.iter().enumerate() {
            if addr % align != 0 {
                return Err(QueueError::Misaligned { part, addr });
            }
            let ptr = rings.translate_contiguous(addr, len).map_err(|error| QueueError::Unmapped { part, error })?;
            // Atomic accesses need the host address aligned too (descriptor reads fall back to
            // byte loads, so the table only needs what the used/avail rings need).
            if !(ptr.as_ptr() as usize).is_multiple_of(align.min(4) as usize) {
                return Err(QueueError::HostMisaligned { part });
            }
            ptrs[i] = ptr;
        }
        // The used ring is the only area the device writes; it must not overlap the others.
        let used = (config.used_ring, config.used_ring + config.used_ring_len());
        for &(part, addr, len, _) in &parts[..2] {
            if addr < used.1 && used.0 < addr + len {
                return Err(QueueError::Overlap { part });
            }
        }
        let event_idx = features.contains(VirtioFeatures::RING_EVENT_IDX);
        // SAFETY: both rings were translated as contiguous host ranges of their full lengths,
        // checked for alignment, and stay valid for 'm (GuestMemory contract).
        let (avail, mut used) = unsafe {
            (AvailRing::new(ptrs[1], ptrs[2], size, event_idx), UsedRing::new(ptrs[2], ptrs[1], size, event_idx))
        };
        used.sync_from_guest();
        Ok(SplitQueue {
            mem,
            q: DetachedQueue {
                desc: DescTable::new(ptrs[0], size as u32),
                avail,
                used,
                limits: ChainLimits {
                    indirect: features.contains(VirtioFeatures::RING_INDIRECT_DESC),
                    max_indirect_entries: size as u32,
                },
                in_order: features.contains(VirtioFeatures::IN_ORDER),
                notify_on_empty: features.contains(VirtioFeatures::NOTIFY_ON_EMPTY),
                config,
            },
        })
    }

    /// Gives up the borrow of guest memory and keeps everything else: the validated ring
    /// pointers, the indices and their shadows, the negotiated options. A device that runs
    /// the queue in bursts keeps this between bursts instead of validating the ring addresses
    /// again each time (3 translations and the overlap checks: about 180 instructions per
    /// burst in `virtq-net`), and [`DetachedQueue::attach`]es it to the same memory for the
    /// next burst.
    pub fn detach(self) -> DetachedQueue {
        self.q
    }

    /// The configuration the queue was set up with.
    pub fn config(&self) -> &QueueConfig {
        &self.q.config
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.q.config.size
    }

    /// The guest memory buffers are translated in.
    pub fn memory(&self) -> &'m M {
        self.mem
    }

    /// Sets the largest indirect table accepted, in entries (default: the queue size).
    pub fn set_max_indirect_entries(&mut self, entries: u32) {
        self.q.limits.max_indirect_entries = entries;
    }

    /// The available half.
    pub fn avail(&mut self) -> &mut AvailRing {
        &mut self.q.avail
    }

    /// The used half.
    pub fn used(&mut self) -> &mut UsedRing {
        &mut self.q.used
    }

    /// Next available index to consume.
    pub fn next_avail(&self) -> u16 {
        self.q.avail.next_avail()
    }

    /// Sets the next available index (vhost-user `SET_VRING_BASE`, or resuming).
    pub fn set_next_avail(&mut self, idx: u16) {
        self.q.avail.set_next_avail(idx);
    }

    /// Continues at used index `idx` instead of the `used.idx` read at set-up: a device that
    /// rebuilds its queue view per batch keeps its own shadow of the used index rather than
    /// trusting the guest-writable field every time.
    pub fn set_next_used(&mut self, idx: u16) {
        self.q.used.set_next_used(idx);
    }

    /// Next used index (what `used.idx` will be after the pending elements are published).
    pub fn next_used(&self) -> u16 {
        self.q.used.next_used()
    }

    /// Whether `VIRTIO_F_IN_ORDER` was negotiated.
    pub fn in_order(&self) -> bool {
        self.q.in_order
    }

    /// Takes the next chain into `chain` (cleared first). `Ok(Some(head))` with the chain's
    /// head (also [`Chain::head`]), `Ok(None)` when the ring is empty, like
    /// [`pop_read`](Self::pop_read) and [`pop_write`](Self::pop_write).
    ///
    /// On [`PopError::Chain`] the head was already completed with len 0 (see the module's error
    /// policy): log it and keep popping.
    #[inline]
    pub fn pop_into<const N: usize>(&mut self, chain: &mut Chain<'m, N>) -> Result<Option<u16>, PopError> {
        let Some(head) = self.q.avail.next_head()? else {
            return Ok(None);
        };
        self.walk_head(head, chain, true)?;
        Ok(Some(head))
    }

    /// [`pop_into`](Self::pop_into), but a malformed chain ([`PopError::Chain`]) is not
    /// completed: the caller completes its head itself, in its own order, after answering in it
    /// what it can. A device whose requests end in a status byte writes that byte first
    /// ([`write_last_byte`](Self::write_last_byte); virtio-blk: [`crate::blk::complete_malformed`]),
    /// so that the driver does not read a stale status as the request's outcome.
    #[inline]
    pub fn pop_into_uncompleted<const N: usize>(&mut self, chain: &mut Chain<'m, N>) -> Result<Option<u16>, PopError> {
        Ok(self.pop_uncompleted(chain)?.then(|| chain.head()))
    }

    /// Writes `byte` into the last byte of the chain at `head` if the chain ends in a non-empty
    /// device-writable buffer whose last byte is in guest memory, and returns that byte's guest
    /// address (for a device that logs its writes, [`crate::dirty`]); `None` writes nothing.
    ///
    /// For a chain the walk refused ([`PopError::Chain`], taken with
    /// [`pop_into_uncompleted`](Self::pop_into_uncompleted)): the chain is followed again
    /// without the rules on its buffers (readable after writable, total length, translation of
    /// the others, the segment list's size), only far enough to find its end; a loop, an index
    /// out of range or a bad indirect table leaves no end to find. The byte written is always
    /// in a buffer the driver offered for writing (§2.7.5.1), whatever the chain looks like now.
    pub fn write_last_byte(&self, head: u16, byte: u8) -> Option<u64> {
        let (ptr, addr) = last_writable_byte(self.mem, self.q.desc, head, &self.q.limits)?;
        // SAFETY: `ptr` is valid for one byte of guest memory borrowed for 'm (translated for
        // that one byte, GuestMemory contract); the source is a local; guest memory never
        // overlaps it. The byte belongs to a device-writable buffer, so writing it is allowed.
        unsafe { copy_bytes(&byte, ptr.as_ptr(), 1) };
        Some(addr)
    }

    /// Takes the next chain and copies its device-readable part into `buf` in the same pass
    /// that validates it, without building a segment list: the fastest way for a device that
    /// consumes whole chains (virtio-net TX into a local buffer).
    ///
    /// `Ok(None)` when the ring is empty. The chain is not completed: push `head` when done.
    /// If `buf` is shorter than the readable part, the first `buf.len()` bytes are copied and
    /// [`CopiedChain::readable_len`] tells how much there was. On [`PopError::Chain`] the head
    /// was completed with len 0 and `buf` holds garbage.
    #[cfg_attr(not(feature = "small"), inline(always))]
    pub fn pop_read(&mut self, buf: &mut [u8]) -> Result<Option<CopiedChain>, PopError> {
        ring::pop_read::<_, true>(self, buf)
    }

    /// [`pop_read`](Self::pop_read), but a malformed chain ([`PopError::Chain`]) is not
    /// completed: the caller completes its head (len 0) itself, in the order it completes the
    /// others. A device that completes chains in batches under `VIRTIO_F_IN_ORDER`
    /// ([`push_in_order_batch`](Self::push_in_order_batch)) needs this: a bad chain completed
    /// inside the pop would land before the batch taken ahead of it.
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
    /// that validates it (device-readable buffers are skipped, never written). The fastest way
    /// to fill a receive buffer from one contiguous frame.
    ///
    /// `Ok(None)` when the ring is empty. The chain is not completed: push `head` with
    /// [`CopiedChain::bytes`]. If the writable part is shorter than `data`, it is filled and
    /// [`CopiedChain::writable_len`] tells its size.
    #[cfg_attr(not(feature = "small"), inline(always))]
    pub fn pop_write(&mut self, data: &[u8]) -> Result<Option<CopiedChain>, PopError> {
        self.pop_write_logged(data, &NoLog)
    }

    /// [`pop_write`](Self::pop_write), reporting every piece written to `log` as a guest
    /// range ([`crate::dirty`]).
    #[cfg_attr(not(feature = "small"), inline(always))]
    pub fn pop_write_logged<L: WriteLog>(&mut self, data: &[u8], log: &L) -> Result<Option<CopiedChain>, PopError> {
        ring::pop_write_logged(self, data, log)
    }

    /// Takes the next chain, returned by value. Prefer [`pop_into`](Self::pop_into) with a
    /// reused [`Chain`] on hot paths: a chain with many segments is large to move.
    pub fn pop<const N: usize>(&mut self) -> Result<Option<Chain<'m, N>>, PopError> {
        let mut chain = Chain::new();
        Ok(self.pop_into(&mut chain)?.map(|_| chain))
    }

    /// Like [`pop_into`](Self::pop_into) but a malformed chain is handed back as an error
    /// without being completed, so a caller that gathers several chains for one packet can
    /// decide the order of completions. The caller must complete `head` (len 0) itself.
    pub(crate) fn pop_uncompleted<const N: usize>(&mut self, chain: &mut Chain<'m, N>) -> Result<bool, PopError> {
        let Some(head) = self.q.avail.next_head()? else {
            return Ok(false);
        };
        self.walk_head(head, chain, false)?;
        Ok(true)
    }

    #[inline]
    fn walk_head<const N: usize>(
        &mut self,
        head: u16,
        chain: &mut Chain<'m, N>,
        complete_bad: bool,
    ) -> Result<(), PopError> {
        if head >= self.q.config.size {
            log_warn!("virtq: head index {=u16} out of range", head);
            return Err(PopError::HeadOutOfRange { head });
        }
        if let Err(error) = walk(self.mem, self.q.desc, head, &self.q.limits, chain) {
            log_warn!("virtq: malformed chain at head {=u16}: {}", head, error);
            if complete_bad {
                self.q.used.push(head, 0);
            }
            return Err(PopError::Chain { head, error });
        }
        Ok(())
    }

    /// Gives back the last `n` heads taken and not completed.
    pub fn rewind(&mut self, n: u16) {
        self.q.avail.rewind(n);
    }

    /// Completes a chain: writes the used element `{head, len}` (visible at the next
    /// [`publish`](Self::publish)). `len` = bytes written into the device-writable part.
    #[inline]
    pub fn push(&mut self, head: u16, len: u32) {
        self.q.used.push(head, len);
    }

    /// IN_ORDER batched completion of `count` chains ending with `last_head`
    /// (§2.7.8.2). Falls back to nothing special if IN_ORDER was not negotiated: then every
    /// chain must be pushed individually, so this returns `false` and writes nothing.
    #[must_use]
    pub fn push_in_order_batch(&mut self, last_head: u16, last_len: u32, count: u16) -> bool {
        if !self.q.in_order {
            return false;
        }
        self.q.used.push_in_order_batch(last_head, last_len, count);
        true
    }

    /// Publishes all pushed completions with one `used.idx` store and returns whether the
    /// driver must be notified (EVENT_IDX or `NO_INTERRUPT`, §2.7.10, plus
    /// `VIRTIO_F_NOTIFY_ON_EMPTY`: notify when the device ran out of buffers, §6.3.2).
    #[must_use]
    #[inline]
    pub fn publish(&mut self) -> bool {
        let had_new = self.q.used.unpublished() != 0;
        let notify = self.q.used.publish();
        if !notify && had_new && self.q.notify_on_empty {
            return matches!(self.q.avail.refresh(), Ok(0));
        }
        notify
    }

    /// [`publish`](Self::publish), reporting to `log` the used elements and `used.idx` it
    /// wrote ([`crate::dirty`]).
    #[must_use]
    #[inline]
    pub fn publish_logged<L: WriteLog>(&mut self, log: &L) -> bool {
        let old = self.q.used.published();
        let notify = self.publish();
        self.q.used.log_published(old, log);
        notify
    }

    /// Reports to `log` the notification-suppression field the device writes (§2.7.10):
    /// `avail_event` with `VIRTIO_F_EVENT_IDX`, `used.flags` without. Call it after
    /// [`disable_notifications`](Self::disable_notifications) or
    /// [`enable_notifications`](Self::enable_notifications) while tracking writes.
    pub fn log_suppression<L: WriteLog>(&self, log: &L) {
        if self.q.avail.event_idx() {
            log.used_ring(4 + 8 * self.size() as u64, 2);
        } else {
            log.used_ring(0, 2);
        }
    }

    /// Asks the driver not to kick (§2.7.10).
    pub fn disable_notifications(&mut self) {
        self.q.avail.disable_notifications();
    }

    /// Asks the driver to kick again; `Ok(true)` means buffers arrived meanwhile and must be
    /// processed before sleeping (the re-check race is closed with a full fence).
    pub fn enable_notifications(&mut self) -> Result<bool, PopError> {
        Ok(self.q.avail.enable_notifications()?)
    }
}

// The split ring's walk for the fused pops (`crate::ring`): the head from the available ring
// (§2.7.6), then the walk from it through the descriptor table (§2.7.5).
impl<'m, M: GuestMemory + ?Sized> Walk<'m> for SplitQueue<'m, M> {
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn pop_with<F, const COMPLETE_BAD: bool>(&mut self, piece: F) -> Result<Option<(u16, WalkSummary)>, PopError>
    where
        F: FnMut(NonNull<u8>, u32, bool, u64) -> Result<(), ChainError>,
    {
        let Some(head) = self.q.avail.next_head()? else {
            return Ok(None);
        };
        if head >= self.q.config.size {
            log_warn!("virtq: head index {=u16} out of range", head);
            return Err(PopError::HeadOutOfRange { head });
        }
        match walk_pieces(self.mem, self.q.desc, head, &self.q.limits, piece) {
            Ok(sum) => Ok(Some((head, sum))),
            Err(error) => {
                log_warn!("virtq: malformed chain at head {=u16}: {}", head, error);
                if COMPLETE_BAD {
                    self.q.used.push(head, 0);
                }
                Err(PopError::Chain { head, error })
            }
        }
    }
}
