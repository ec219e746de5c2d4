//! One device-side API over both ring layouts (VIRTIO 1.2 §2.7 split, §2.8 packed), so that a
//! device is written once: [`Virtqueue`], implemented by [`SplitQueue`] and [`PackedQueue`].
//!
//! Both take chains through the same walk (`crate::chain`), which owns the rules of §2.7.5 /
//! §2.8.7 for both; they differ in where descriptors come from, how a chain is found, and how a
//! completion is written. What a device sees is the same: a [`Chain`] or a [`CopiedChain`]
//! whose `head` is the token to complete (the split ring's head index, the packed ring's
//! buffer id), the same [`PopError`] policy (a malformed chain was already completed with
//! `len` 0), and one notification decision per [`publish`](Virtqueue::publish).
//!
//! The fused pops (`pop_read`, `pop_gather_uncompleted`, `pop_write_logged`, and the receive
//! path's `pop_first_writable`) are written here once for both layouts: each runs one of
//! `crate::chain`'s visitors over the layout's walk of its next chain (`sealed::Walk`, the one
//! thing in them that differs by layout), and the queues' inherent methods delegate to them.
//!
//! ```ignore
//! fn drain_tx<'m, Q: Virtqueue<'m>>(q: &mut Q, buf: &mut [u8]) -> bool {
//!     while let Ok(Some(c)) = q.pop_read(buf) {
//!         consume(&buf[..c.bytes as usize]);
//!         q.push(c.head, 0);
//!     }
//!     q.publish()
//! }
//! ```

use crate::chain::{gather_into, read_into, write_from, Chain, ChainError, Segments, WalkSummary};
use crate::dirty::{NoLog, WriteLog};
use crate::mem::GuestMemory;
use core::borrow::BorrowMut;
use core::ptr::NonNull;

use crate::packed::{DetachedPackedQueue, PackedQueue, ReadBatch, BATCH};
use crate::queue::{CopiedChain, PopError, SplitQueue};

/// A virtqueue's device side, whichever its layout. See the module documentation; each method
/// is documented on [`SplitQueue`] and [`PackedQueue`], which implement it with their inherent
/// methods of the same name.
pub trait Virtqueue<'m> {
    /// The guest memory buffers are translated in.
    type Memory: GuestMemory + ?Sized + 'm;

    /// The ring's layout: `true` for a packed ring (§2.8, [`PackedQueue`]), `false` for a split
    /// one (§2.7, [`SplitQueue`]). Rules that differ by layout read it here, e.g.
    /// [`PopError::unreturnable_on`].
    const PACKED: bool;

    /// The guest memory buffers are translated in.
    fn memory(&self) -> &'m Self::Memory;

    /// Queue size.
    fn size(&self) -> u16;

    /// Whether `VIRTIO_F_IN_ORDER` was negotiated.
    fn in_order(&self) -> bool;

    /// Takes the next chain into `chain`: `Ok(Some(head))` (the buffer id on a packed ring),
    /// `Ok(None)` when none is available.
    fn pop_into<const N: usize>(&mut self, chain: &mut Chain<'m, N>) -> Result<Option<u16>, PopError>;

    /// Takes the next chain, copying its device-readable part into `buf` as it is validated.
    fn pop_read(&mut self, buf: &mut [u8]) -> Result<Option<CopiedChain>, PopError>;

    /// [`pop_read`](Self::pop_read) leaving a malformed chain uncompleted, for the caller to
    /// complete in its own order (IN_ORDER batches).
    fn pop_read_uncompleted(&mut self, buf: &mut [u8]) -> Result<Option<CopiedChain>, PopError>;

    /// Takes the next chain, writing `data` into its device-writable part as it is validated.
    fn pop_write(&mut self, data: &[u8]) -> Result<Option<CopiedChain>, PopError> {
        self.pop_write_logged(data, &NoLog)
    }

    /// [`pop_write`](Self::pop_write), reporting every piece written to `log`.
    fn pop_write_logged<L: WriteLog>(&mut self, data: &[u8], log: &L) -> Result<Option<CopiedChain>, PopError>;

    /// Completes the chain `head` with `len` bytes written (visible at the next publish).
    fn push(&mut self, head: u16, len: u32);

    /// IN_ORDER batched completion; `false` (nothing written) without IN_ORDER.
    #[must_use]
    fn push_in_order_batch(&mut self, last_head: u16, last_len: u32, count: u16) -> bool;

    /// Makes the completions visible; `true` if the driver must be notified.
    #[must_use]
    fn publish(&mut self) -> bool;

    /// [`publish`](Self::publish), reporting the ring writes it made visible to `log`.
    #[must_use]
    fn publish_logged<L: WriteLog>(&mut self, log: &L) -> bool;

    /// Reports the notification-suppression field the device writes to `log` (after
    /// [`disable_notifications`](Self::disable_notifications) or
    /// [`enable_notifications`](Self::enable_notifications) while tracking writes).
    fn log_suppression<L: WriteLog>(&self, log: &L);

    /// Asks the driver not to notify the device.
    fn disable_notifications(&mut self);

    /// Asks the driver to notify again; `Ok(true)` if buffers arrived meanwhile.
    fn enable_notifications(&mut self) -> Result<bool, PopError>;

    /// A hint for a device that copies chain after chain out of large buffers: ask the CPU
    /// for the first lines of a buffer a few chains ahead ([`PackedQueue::prefetch`]). The
    /// split ring's does nothing: its next buffers sit behind the available ring and the
    /// descriptor table, two more dependent loads, and no measurement asked for it there.
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn prefetch(&self) {}

    /// Whether [`pop_read_batch`](Self::pop_read_batch) can take more than nothing: `true`
    /// for a packed ring. A constant, so that a burst loop written for both layouts compiles
    /// the batch out of the split ring's.
    const BATCHES: bool = false;

    /// Takes up to `bufs.len()` chains of one device-readable descriptor at once, as that
    /// many [`pop_read_uncompleted`](Self::pop_read_uncompleted) calls would
    /// ([`PackedQueue::pop_read_batch`]); an empty batch says only that the next chain is
    /// for the single pop. The split ring's takes nothing.
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn pop_read_batch(&mut self, bufs: &mut [&mut [u8]]) -> ReadBatch {
        let _ = bufs;
        ReadBatch::default()
    }
}

/// Implements [`Virtqueue`] by forwarding to the inherent methods, which stay the fast path
/// for code written against one layout.
macro_rules! forward_virtqueue {
    () => {
        type Memory = M;
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn memory(&self) -> &'m M {
            Self::memory(self)
        }
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn size(&self) -> u16 {
            Self::size(self)
        }
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn in_order(&self) -> bool {
            Self::in_order(self)
        }
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn pop_into<const N: usize>(&mut self, chain: &mut Chain<'m, N>) -> Result<Option<u16>, PopError> {
            Self::pop_into(self, chain)
        }
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn pop_read(&mut self, buf: &mut [u8]) -> Result<Option<CopiedChain>, PopError> {
            Self::pop_read(self, buf)
        }
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn pop_read_uncompleted(&mut self, buf: &mut [u8]) -> Result<Option<CopiedChain>, PopError> {
            Self::pop_read_uncompleted(self, buf)
        }
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn pop_write_logged<L: WriteLog>(&mut self, data: &[u8], log: &L) -> Result<Option<CopiedChain>, PopError> {
            Self::pop_write_logged(self, data, log)
        }
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn push(&mut self, head: u16, len: u32) {
            Self::push(self, head, len)
        }
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn push_in_order_batch(&mut self, last_head: u16, last_len: u32, count: u16) -> bool {
            Self::push_in_order_batch(self, last_head, last_len, count)
        }
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn publish(&mut self) -> bool {
            Self::publish(self)
        }
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn publish_logged<L: WriteLog>(&mut self, log: &L) -> bool {
            Self::publish_logged(self, log)
        }
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn log_suppression<L: WriteLog>(&self, log: &L) {
            Self::log_suppression(self, log)
        }
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn disable_notifications(&mut self) {
            Self::disable_notifications(self)
        }
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn enable_notifications(&mut self) -> Result<bool, PopError> {
            Self::enable_notifications(self)
        }
    };
}

impl<'m, M: GuestMemory + ?Sized> Virtqueue<'m> for SplitQueue<'m, M> {
    const PACKED: bool = false;
    forward_virtqueue!();
}

impl<'m, M: GuestMemory + ?Sized, const IDS: usize, S: BorrowMut<DetachedPackedQueue<IDS>>> Virtqueue<'m>
    for PackedQueue<'m, M, IDS, S>
{
    const PACKED: bool = true;
    forward_virtqueue!();
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn prefetch(&self) {
        Self::prefetch(self)
    }
    const BATCHES: bool = true;
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn pop_read_batch(&mut self, bufs: &mut [&mut [u8]]) -> ReadBatch {
        Self::pop_read_batch(self, bufs)
    }
}

/// The body of both layouts' `pop_read` (`COMPLETE_BAD`) and `pop_read_uncompleted` (not):
/// [`read_into`] over the layout's walk.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) fn pop_read<'m, Q: sealed::Walk<'m>, const COMPLETE_BAD: bool>(
    q: &mut Q,
    buf: &mut [u8],
) -> Result<Option<CopiedChain>, PopError> {
    let mut done = 0usize;
    let r = q.pop_with::<_, COMPLETE_BAD>(read_into(buf, &mut done));
    r.map(|o| o.map(|(head, sum)| CopiedChain::new(head, done, sum)))
}

/// The body of both layouts' `pop_gather_uncompleted`: [`gather_into`] over the layout's walk,
/// the chain left uncompleted if malformed, and none of its pieces left in `segments` then.
/// `'m` ties the pieces listed to the queue's borrow of guest memory.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) fn pop_gather_uncompleted<'m, Q: sealed::Walk<'m>, const P: usize>(
    q: &mut Q,
    buf: &mut [u8],
    head: usize,
    segments: &mut Segments<'m, P>,
) -> Result<Option<CopiedChain>, PopError> {
    let start = segments.len();
    let head = head.min(buf.len());
    let mut done = 0usize;
    match q.pop_with::<_, false>(gather_into(buf, head, &mut done, segments)) {
        Ok(Some((h, sum))) => Ok(Some(CopiedChain::new(h, done, sum))),
        Ok(None) => Ok(None),
        Err(e) => {
            segments.truncate(start);
            Err(e)
        }
    }
}

/// The body of both layouts' `pop_write_logged`: [`write_from`] over the layout's walk.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) fn pop_write_logged<'m, Q: sealed::Walk<'m>, L: WriteLog>(
    q: &mut Q,
    data: &[u8],
    log: &L,
) -> Result<Option<CopiedChain>, PopError> {
    let mut done = 0usize;
    let r = q.pop_with::<_, true>(write_from(data, &mut done, log));
    r.map(|o| o.map(|(head, sum)| CopiedChain::new(head, done, sum)))
}

/// A queue the virtio-net receive path ([`crate::net::receive`] and friends) can fill: both
/// layouts are. Name it to write a device generic over the layout:
///
/// ```ignore
/// fn reflect<'m, R: RxQueue<'m>, T: Virtqueue<'m>>(rx: &mut R, tx: &mut T) { /* ... */ }
/// ```
///
/// Sealed: its operations are the crate's own contract with the receive path.
pub trait RxQueue<'m>: sealed::RxOps<'m> {}

impl<'m, Q: sealed::RxOps<'m>> RxQueue<'m> for Q {}

/// What the virtio-net receive path needs of a queue beyond [`Virtqueue`]: reserving chains
/// without completing malformed ones, giving reservations back, and the one-pass look at a
/// chain's first buffer; and what the fused pops need of a layout, its walk ([`Walk`]).
/// Sealed: implemented by both queues, named by no one outside the crate, so these stay
/// crate-internal contracts.
pub(crate) mod sealed {
    use super::*;
    use crate::queue::{BatchBuffer, FirstWritable};

    /// A layout's walk of its next chain, the one part of the fused pops that differs by
    /// layout; implemented in each layout's module (`crate::queue`, `crate::packed`), with
    /// the ring state it reads.
    pub trait Walk<'m> {
        /// Takes the next chain (`Ok(None)` when none is available) and hands every
        /// host-contiguous piece of its buffers to `piece(ptr, len, writable, addr)` in chain
        /// order, in the pass that validates it (`crate::chain`'s walk); returns its head index
        /// (the buffer id on a packed ring) and its totals. A malformed chain is completed with
        /// len 0 only if `COMPLETE_BAD`; what `piece` did with it is the caller's to discard.
        fn pop_with<F, const COMPLETE_BAD: bool>(&mut self, piece: F) -> Result<Option<(u16, WalkSummary)>, PopError>
        where
            F: FnMut(NonNull<u8>, u32, bool, u64) -> Result<(), ChainError>;
    }

    /// See the module's documentation.
    pub trait RxOps<'m>: Virtqueue<'m> + Walk<'m> {
        /// The next chain, validated in one pass, with its first buffer if device-writable;
        /// malformed chains are completed with len 0. Written here once for both layouts,
        /// over their walk; the receive path places a packet that fits one buffer with it,
        /// writing nothing before the whole chain has been validated.
        // Always inlined: the net receive path's fast path calls it once per frame; left to
        // LLVM behind the trait it stayed a call (ringbench virtq-net 1desc 64 rx: +33
        // instructions per chain).
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn pop_first_writable(&mut self) -> Result<Option<FirstWritable>, PopError> {
            let mut first = None;
            let mut pieces = 0u32;
            self.pop_with::<_, true>(|ptr, len, writable, addr| {
                if pieces == 0 && writable {
                    first = Some((ptr, len, addr));
                }
                pieces += 1;
                Ok(())
            })
            .map(|o| o.map(|(head, sum)| FirstWritable { head, sum, first }))
        }
        /// Takes up to `max` (at most [`BATCH`]) chains of one device-writable descriptor at
        /// once into `out`, as that many [`pop_first_writable`](Self::pop_first_writable)
        /// calls would take them, and returns how many; none says only that the next chain
        /// is for `pop_first_writable` (`PackedQueue::take_batch`). Takes nothing on a split
        /// ring ([`Virtqueue::BATCHES`]).
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn pop_writable_batch(&mut self, max: usize, out: &mut [BatchBuffer; BATCH]) -> usize {
            let _ = (max, out);
            0
        }
        /// [`Virtqueue::pop_into`] leaving a malformed chain uncompleted.
        fn pop_uncompleted<const N: usize>(&mut self, chain: &mut Chain<'m, N>) -> Result<bool, PopError>;
        /// Gives back the last `n` chains taken and not completed.
        fn rewind(&mut self, n: u16);
    }

    macro_rules! forward_rx {
        () => {
            #[cfg_attr(not(feature = "small"), inline(always))]
            fn pop_uncompleted<const N: usize>(&mut self, chain: &mut Chain<'m, N>) -> Result<bool, PopError> {
                Self::pop_uncompleted(self, chain)
            }
            #[cfg_attr(not(feature = "small"), inline(always))]
            fn rewind(&mut self, n: u16) {
                Self::rewind(self, n)
            }
        };
    }

    impl<'m, M: GuestMemory + ?Sized> RxOps<'m> for SplitQueue<'m, M> {
        forward_rx!();
    }

    impl<'m, M: GuestMemory + ?Sized, const IDS: usize, S: BorrowMut<DetachedPackedQueue<IDS>>> RxOps<'m>
        for PackedQueue<'m, M, IDS, S>
    {
        forward_rx!();
        #[cfg_attr(not(feature = "small"), inline(always))]
        fn pop_writable_batch(&mut self, max: usize, out: &mut [BatchBuffer; BATCH]) -> usize {
            Self::pop_writable_batch(self, max, out)
        }
    }
}
