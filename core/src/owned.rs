//! Queues that own their guest memory, for a device that keeps memory and queues in one struct.
//!
//! [`SplitQueue`] and [`PackedQueue`] borrow their memory (`&'m M`): the right shape for one
//! burst, but a device struct cannot hold both the memory and a queue that borrows it. Keeping
//! the validated state between bursts ([`DetachedQueue`], [`DetachedPackedQueue`]) and
//! attaching it again is `unsafe`, because the compiler cannot know that the memory the state
//! was validated against is still there and unchanged.
//!
//! [`OwnedSplitQueue`] and [`OwnedPackedQueue`] make that promise themselves: they own the
//! memory (or a handle to it) next to the state, never hand out `&mut` to it, and lend the
//! queue out per use. The memory must be [`StableMemory`]: its translations stay valid for as
//! long as the value lives, wherever it is moved (a [`RegionTable`] is: its regions point at
//! memory outside it). A device that needs a new memory table takes the memory back
//! ([`OwnedSplitQueue::into_parts`]) and sets the queue up again.
//!
//! ```
//! use std::ptr::NonNull;
//!
//! use virtq::owned::OwnedSplitQueue;
//! use virtq::testing::{layout, Buf, TestDriver};
//! use virtq::{Region, RegionTable, VirtioFeatures};
//!
//! /// A device with its memory and its queue in one struct, no lifetimes, no `unsafe`.
//! struct Echo {
//!     queue: OwnedSplitQueue<RegionTable<4>>,
//!     served: u32,
//! }
//!
//! impl Echo {
//!     /// One burst: every available chain read and completed, one publish.
//!     fn poll(&mut self) -> bool {
//!         let served = &mut self.served;
//!         self.queue.with(|q| {
//!             let mut buf = [0u8; 256];
//!             while let Ok(Some(c)) = q.pop_read(&mut buf) {
//!                 q.push(c.head, 0);
//!                 *served += 1;
//!             }
//!             q.publish()
//!         })
//!     }
//! }
//!
//! const GPA: u64 = 0x10_0000;
//! const LEN: usize = 64 * 1024;
//! let mut ram = vec![0u64; LEN / 8];
//! let host = NonNull::new(ram.as_mut_ptr().cast::<u8>()).unwrap();
//! let mut mem = RegionTable::<4>::new();
//! // SAFETY: `ram` outlives `mem` and every queue set up over it, and is accessed only through
//! // the table from here on.
//! mem.add(unsafe { Region::new(GPA, host, LEN as u64) }).unwrap();
//! let (cfg, data) = layout(GPA, 16);
//!
//! // The driver's view of the same memory (in a real device: the other side of a DMA window).
//! let driver_mem = mem.clone();
//! let mut driver = TestDriver::new(&driver_mem, cfg, data, GPA + LEN as u64 - data);
//! driver.add_chain(&[Buf::readable(b"hello")]);
//!
//! let queue = OwnedSplitQueue::new(mem, cfg, VirtioFeatures::VERSION_1).unwrap();
//! let mut dev = Box::new(Echo { queue, served: 0 }); // moved: the queue does not care
//! dev.poll();
//! assert_eq!((dev.served, driver.used_idx()), (1, 1));
//! ```

use crate::mem::{GuestMemory, RegionTable};
use crate::packed::{DetachedPackedQueue, PackedQueue, DEFAULT_IDS};
use crate::queue::{DetachedQueue, QueueConfig, QueueError, SplitQueue};
use crate::VirtioFeatures;

/// Guest memory whose translations stay valid, and keep their meaning, for as long as the
/// value lives: what a queue kept next to its memory ([`OwnedSplitQueue`],
/// [`OwnedPackedQueue`]) relies on between uses.
///
/// # Safety
/// Beyond [`GuestMemory`]'s contract (which holds a range valid while the `&self` borrow used
/// to translate it lives), implementors guarantee that every range [`GuestMemory::translate`]
/// returns stays valid for reads and writes, and translates the same guest addresses, until
/// the value is dropped, even after that borrow ended and after the value was moved; and that
/// nothing changes its translations through a shared reference (no interior mutability of the
/// table). Memory that can be taken away must be made to complete accesses anyway, as the
/// [`GuestMemory`] contract already requires.
pub unsafe trait StableMemory: GuestMemory {}

// SAFETY: a region's host range stays valid for as long as any table holding it, or any range
// translated through it, is in use (the `Region::new` contract), and it is memory outside the
// table, so moving the table moves nothing it points at; regions change only through `&mut`.
unsafe impl<const N: usize> StableMemory for RegionTable<N> {}

// SAFETY: a shared reference cannot outlive its referent, whose guarantee covers it.
unsafe impl<T: StableMemory + ?Sized> StableMemory for &T {}

/// A split queue (§2.7) that owns its guest memory `M` and lends itself out per use
/// ([`with`](Self::with)); see the [module documentation](self).
#[derive(Debug)]
pub struct OwnedSplitQueue<M: StableMemory> {
    mem: M,
    /// `None` only while lent out (and put back even if the user's closure panics).
    q: Option<DetachedQueue>,
}

impl<M: StableMemory> OwnedSplitQueue<M> {
    /// Sets up the queue over `mem`, as [`SplitQueue::new`] (validated: size, alignment,
    /// bounds, overlap).
    pub fn new(mem: M, config: QueueConfig, features: VirtioFeatures) -> Result<Self, QueueError> {
        let q = SplitQueue::new(&mem, config, features)?.detach();
        Ok(OwnedSplitQueue { mem, q: Some(q) })
    }

    /// Runs `f` on the queue: the whole [`SplitQueue`] API for the length of the call (a
    /// burst: pop, push, publish). The queue's state is kept between calls.
    pub fn with<R>(&mut self, f: impl FnOnce(&mut SplitQueue<'_, M>) -> R) -> R {
        /// Puts the state back when the call ends, however it ends.
        struct Lent<'a, 'm, M: GuestMemory> {
            home: &'a mut Option<DetachedQueue>,
            q: Option<SplitQueue<'m, M>>,
        }
        impl<M: GuestMemory> Drop for Lent<'_, '_, M> {
            fn drop(&mut self) {
                if let Some(q) = self.q.take() {
                    *self.home = Some(q.detach());
                }
            }
        }
        let d = self.q.take().expect("the queue state is always home between calls");
        // SAFETY: `d` was validated over `self.mem` (in `new`, or detached from a queue over it
        // by `Lent::drop`), which this value owns, never lends out mutably and has not dropped;
        // `M: StableMemory` keeps every range it translated valid and meaning the same.
        let q = unsafe { d.attach(&self.mem) };
        let mut lent = Lent { home: &mut self.q, q: Some(q) };
        f(lent.q.as_mut().expect("just set"))
    }

    /// The guest memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// The configuration the queue was set up with.
    pub fn config(&self) -> &QueueConfig {
        self.q.as_ref().expect("the queue state is always home between calls").config()
    }

    /// The memory and the queue's state (its positions: [`DetachedQueue::next_avail`],
    /// [`DetachedQueue::next_used`]), e.g. to set the queue up again over a new memory table.
    pub fn into_parts(mut self) -> (M, DetachedQueue) {
        let q = self.q.take().expect("the queue state is always home between calls");
        (self.mem, q)
    }
}

/// A packed queue (§2.8) that owns its guest memory `M`; its state (with the in-flight table,
/// `4 * IDS` bytes) stays in place and the queue borrows it per use ([`queue`](Self::queue)).
/// See the [module documentation](self).
#[derive(Debug)]
pub struct OwnedPackedQueue<M: StableMemory, const IDS: usize = DEFAULT_IDS> {
    mem: M,
    q: DetachedPackedQueue<IDS>,
}

impl<M: StableMemory, const IDS: usize> OwnedPackedQueue<M, IDS> {
    /// Sets up the queue over `mem`, as [`PackedQueue::new`].
    pub fn new(mem: M, config: QueueConfig, features: VirtioFeatures) -> Result<Self, QueueError> {
        let q = PackedQueue::<M, IDS>::new(&mem, config, features)?.detach();
        Ok(OwnedPackedQueue { mem, q })
    }

    /// The queue, for as long as this borrow lasts: the whole [`PackedQueue`] API.
    pub fn queue(&mut self) -> PackedQueue<'_, M, IDS, &mut DetachedPackedQueue<IDS>> {
        // SAFETY: `self.q` was validated over `self.mem` (in `new`), which this value owns,
        // never lends out mutably and has not dropped; `M: StableMemory` keeps every range it
        // translated valid and meaning the same.
        unsafe { self.q.attach_mut(&self.mem) }
    }

    /// The guest memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// The memory and the queue's state, e.g. to set the queue up again over a new memory
    /// table at the same positions.
    pub fn into_parts(self) -> (M, DetachedPackedQueue<IDS>) {
        (self.mem, self.q)
    }
}
