//! The device → driver half of a split queue (VIRTIO 1.2 §2.7.8, §2.7.7 device side of
//! used-buffer notification suppression).
//!
//! ```text
//! struct virtq_used { le16 flags; le16 idx; struct { le32 id; le32 len; } ring[size]; le16 avail_event; }
//! ```
//! This half writes used elements and `used.idx`, and reads the driver's interrupt-suppression
//! fields, which live in the available ring's memory: `avail.flags`
//! (`VIRTQ_AVAIL_F_NO_INTERRUPT`) and `used_event` (`avail.ring[size]`).

use core::num::Wrapping;
use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};

use crate::dirty::WriteLog;
use crate::event::vring_need_event;
use crate::mem::{load_u16, store_u16, store_u32};

/// `VIRTQ_AVAIL_F_NO_INTERRUPT`: the driver asks not to be interrupted (without EVENT_IDX).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// The used ring, device side.
#[derive(Debug)]
pub struct UsedRing {
    used: NonNull<u8>,
    avail: NonNull<u8>,
    /// Queue size - 1: ring slots are free-running indices masked with it (the size is a
    /// power of two, §2.7).
    mask: u16,
    event_idx: bool,
    /// Slot of the next used element (free-running).
    next_used: Wrapping<u16>,
    /// `used.idx` as last published.
    published: Wrapping<u16>,
}

// SAFETY: as for `AvailRing`: guest memory accessed only atomically, lifetime held by the queue.
unsafe impl Send for UsedRing {}

impl UsedRing {
    /// # Safety
    /// As for [`AvailRing::new`](crate::avail::AvailRing).
    pub(crate) unsafe fn new(used: NonNull<u8>, avail: NonNull<u8>, size: u16, event_idx: bool) -> UsedRing {
        UsedRing { used, avail, mask: size - 1, event_idx, next_used: Wrapping(0), published: Wrapping(0) }
    }

    /// Reads `used.idx` from guest memory and continues from there (§2.7 / vhost-user
    /// `SET_VRING_BASE`: "the device is supposed to read the next index in the used ring from
    /// the respective vring structure in guest memory"; rust-vmm/vhost #180).
    pub fn sync_from_guest(&mut self) -> u16 {
        // SAFETY: `used + 2` is the 2-aligned `idx` field of the validated ring.
        let idx = unsafe { load_u16(self.used.as_ptr().add(2), Ordering::Acquire) };
        self.next_used = Wrapping(idx);
        self.published = Wrapping(idx);
        idx
    }

    /// Continues at `idx` as if `used.idx` were `idx` and everything before it published
    /// (resuming a queue whose shadow index the device kept).
    pub fn set_next_used(&mut self, idx: u16) {
        self.next_used = Wrapping(idx);
        self.published = Wrapping(idx);
    }

    /// Index the next used element will take.
    pub fn next_used(&self) -> u16 {
        self.next_used.0
    }

    /// Number of elements written but not yet published.
    pub fn unpublished(&self) -> u16 {
        (self.next_used - self.published).0
    }

    /// `used.idx` as last published.
    pub fn published(&self) -> u16 {
        self.published.0
    }

    /// Reports to `log` what publishing from `old` to the current `used.idx` wrote: the used
    /// elements of slots `old..idx` (one range, or two where they wrap around the ring) and
    /// `used.idx`. With IN_ORDER batches the slots a batch skipped are reported too (a superset
    /// inside the used ring).
    pub fn log_published<L: WriteLog>(&self, old: u16, log: &L) {
        let count = self.published.0.wrapping_sub(old) as u64;
        if !L::ENABLED || count == 0 {
            return;
        }
        let size = self.mask as u64 + 1;
        let first = (old & self.mask) as u64;
        let head = count.min(size - first);
        log.used_ring(4 + 8 * first, 8 * head);
        if count > head {
            log.used_ring(4, 8 * (count - head).min(first));
        }
        log.used_ring(2, 2);
    }

    /// Writes one used element `{id: head, len}` (not yet visible to the driver: see
    /// [`publish`](Self::publish)). `len` is the number of bytes written into the chain's
    /// device-writable part (§2.7.8.1).
    #[inline]
    pub fn push(&mut self, head: u16, len: u32) {
        let slot = (self.next_used.0 & self.mask) as usize;
        // SAFETY: `slot < size`, so the element at `4 + 8 * slot` is inside the validated,
        // 4-aligned ring. Relaxed: the release store of `idx` in `publish` orders these.
        unsafe {
            let e = self.used.as_ptr().add(4 + 8 * slot);
            store_u32(e, head as u32, Ordering::Relaxed);
            store_u32(e.add(4), len, Ordering::Relaxed);
        }
        self.next_used += 1;
    }

    /// IN_ORDER batched completion (§2.7.8.2): one element for the last of `count` buffers,
    /// used `idx` advanced by `count`. The device asserts that the `count - 1` skipped buffers
    /// were used completely; use it only when `VIRTIO_F_IN_ORDER` was negotiated.
    #[inline]
    pub fn push_in_order_batch(&mut self, last_head: u16, last_len: u32, count: u16) {
        if count == 0 {
            return;
        }
        self.next_used += count - 1;
        self.push(last_head, last_len);
    }

    /// Publishes every element pushed since the last call with one `used.idx` store, then
    /// decides whether the driver wants a notification (§2.7.10).
    ///
    /// Returns `true` if the driver must be notified. Publishing nothing never notifies.
    #[inline]
    pub fn publish(&mut self) -> bool {
        let old = self.published;
        let new = self.next_used;
        if old == new {
            return false;
        }
        // SAFETY: `used + 2` is the 2-aligned `idx` field. Release: the elements (and the
        // buffer contents the device wrote) are visible before the new index (§2.7.8.1: "MUST
        // set len prior to updating the used idx").
        unsafe { store_u16(self.used.as_ptr().add(2), new.0, Ordering::Release) };
        self.published = new;
        // Store-load ordering: the idx store must be visible before we read the driver's
        // suppression state, or we could miss a driver that just re-enabled interrupts
        // (Linux `vhost_notify`'s smp_mb, rust-vmm `needs_notification`).
        fence(Ordering::SeqCst);
        if self.event_idx {
            let at = 4 + 2 * (self.mask as usize + 1);
            // SAFETY: `used_event` = `avail.ring[size]`, 2-aligned, inside the validated ring.
            let used_event = unsafe { load_u16(self.avail.as_ptr().add(at), Ordering::Relaxed) };
            vring_need_event(used_event, new.0, old.0)
        } else {
            // SAFETY: `avail.flags`, 2-aligned, at the start of the validated ring.
            let flags = unsafe { load_u16(self.avail.as_ptr(), Ordering::Relaxed) };
            // §2.7.7: without EVENT_IDX only bit 0 means anything; other bits are ignored.
            flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
        }
    }
}
