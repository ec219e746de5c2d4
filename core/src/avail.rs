//! The driver → device half of a split queue (VIRTIO 1.2 §2.7.6, §2.7.7, §2.7.10 device side of
//! available-buffer notification suppression).
//!
//! ```text
//! struct virtq_avail { le16 flags; le16 idx; le16 ring[size]; le16 used_event; }
//! ```
//! This half reads `avail.idx` and `avail.ring`, and owns the device's kick-suppression fields,
//! which live in the used ring's memory: `used.flags` (`VIRTQ_USED_F_NO_NOTIFY`) and
//! `avail_event` (`used.ring[size]`).

use core::num::Wrapping;
use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};

use crate::mem::{load_u16, store_u16};

/// `VIRTQ_USED_F_NO_NOTIFY`: the device asks the driver not to kick (without EVENT_IDX).
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Why the available ring cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct AvailIndexError {
    /// `avail.idx` as read from guest memory.
    pub avail_idx: u16,
    /// The device's next index to consume.
    pub next_avail: u16,
}

/// The available ring, device side.
#[derive(Debug)]
pub struct AvailRing {
    /// `struct virtq_avail` in host memory (2-aligned, `6 + 2 * size` bytes).
    avail: NonNull<u8>,
    /// `struct virtq_used` in host memory, for `used.flags` and `avail_event`.
    used: NonNull<u8>,
    /// Queue size - 1: ring slots are free-running indices masked with it (the size is a
    /// power of two, §2.7).
    mask: u16,
    event_idx: bool,
    /// Next ring slot the device will consume (free-running, §2.7.6).
    next_avail: Wrapping<u16>,
    /// Last `avail.idx` read from the guest and validated.
    shadow_idx: Wrapping<u16>,
}

// SAFETY: the pointers refer to guest memory that is only accessed atomically; the struct may
// move to another thread with the queue that owns it (the memory's lifetime is enforced by the
// queue's `'m` borrow).
unsafe impl Send for AvailRing {}

impl AvailRing {
    /// # Safety
    /// `avail` must be valid for `6 + 2 * size` bytes and 2-aligned, `used` valid for
    /// `6 + 8 * size` bytes and 4-aligned, both for as long as this value is used; `size`
    /// must be a power of two in 1..=32768 (slot indices are masked with `size - 1`).
    pub(crate) unsafe fn new(avail: NonNull<u8>, used: NonNull<u8>, size: u16, event_idx: bool) -> AvailRing {
        AvailRing { avail, used, mask: size - 1, event_idx, next_avail: Wrapping(0), shadow_idx: Wrapping(0) }
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.mask + 1
    }

    /// The next available-ring index the device will consume (the value `GET_VRING_BASE`
    /// reports).
    pub fn next_avail(&self) -> u16 {
        self.next_avail.0
    }

    /// Sets the next index to consume (`SET_VRING_BASE`, or resuming a saved queue).
    pub fn set_next_avail(&mut self, idx: u16) {
        self.next_avail = Wrapping(idx);
        self.shadow_idx = Wrapping(idx);
    }

    /// Reads `avail.idx` (acquire: the ring entries and descriptors the driver published before
    /// its release/`wmb` + idx store are visible after this load, §2.7.13) and validates it.
    ///
    /// `avail.idx - next_avail > size` is a driver error (§2.7.6: the 16-bit index always
    /// distinguishes full from empty because size ≤ 32768); the index is not trusted and nothing
    /// is consumed (hostile-inputs family 3, rust-vmm `InvalidAvailRingIndex`).
    #[inline]
    pub fn refresh(&mut self) -> Result<u16, AvailIndexError> {
        // SAFETY: `avail + 2` is the 2-aligned `idx` field inside the validated ring.
        let idx = Wrapping(unsafe { load_u16(self.avail.as_ptr().add(2), Ordering::Acquire) });
        let pending = (idx - self.next_avail).0;
        if pending > self.mask + 1 {
            return Err(AvailIndexError { avail_idx: idx.0, next_avail: self.next_avail.0 });
        }
        self.shadow_idx = idx;
        Ok(pending)
    }

    /// Number of entries known to be available without reading guest memory again.
    #[inline]
    pub fn pending(&self) -> u16 {
        (self.shadow_idx - self.next_avail).0
    }

    /// Takes the next head index from the ring, or `None` if the ring is empty. The head is not
    /// validated here (the chain walk checks it against the queue size).
    #[inline]
    pub fn next_head(&mut self) -> Result<Option<u16>, AvailIndexError> {
        if self.shadow_idx == self.next_avail && self.refresh()? == 0 {
            return Ok(None);
        }
        let slot = (self.next_avail.0 & self.mask) as usize;
        // SAFETY: `slot < size`, so `4 + 2 * slot` is a 2-aligned entry of `ring[size]`. Relaxed
        // suffices: the acquire load of `idx` in `refresh` ordered this read after the driver's
        // write of the entry.
        let head = unsafe { load_u16(self.avail.as_ptr().add(4 + 2 * slot), Ordering::Relaxed) };
        self.next_avail += 1;
        Ok(Some(head))
    }

    /// Gives back the last `n` heads taken (a mergeable RX packet that did not find enough
    /// buffers, §5.1.6.4: no partial packet is published). Only heads that were not completed
    /// may be given back.
    pub fn rewind(&mut self, n: u16) {
        self.next_avail -= n;
    }

    /// Whether `VIRTIO_F_EVENT_IDX` is in use (which suppression field the device writes).
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Asks the driver not to kick (§2.7.10). Without EVENT_IDX sets `used.flags` to
    /// `NO_NOTIFY`; with EVENT_IDX the device must keep `used.flags` 0 and simply stops moving
    /// `avail_event`, so this does nothing.
    pub fn disable_notifications(&mut self) {
        if !self.event_idx {
            // SAFETY: `used + 0` is the 2-aligned `flags` field of the validated used ring.
            unsafe { store_u16(self.used.as_ptr(), VIRTQ_USED_F_NO_NOTIFY, Ordering::Relaxed) };
        }
    }

    /// Asks the driver to kick on the next available buffer, then re-reads `avail.idx`.
    ///
    /// Returns `Ok(true)` if buffers arrived meanwhile: the caller must process them instead of
    /// sleeping, because the driver may have checked the suppression field before this store
    /// and skipped its kick. The full fence between the store and the re-read closes that race
    /// (Linux `vhost_enable_notify`, libvhost-user `vu_queue_set_notification`).
    pub fn enable_notifications(&mut self) -> Result<bool, AvailIndexError> {
        if self.event_idx {
            let at = 4 + 8 * (self.mask as usize + 1);
            // SAFETY: `avail_event` = `used.ring[size]`, 2-aligned, inside the validated ring.
            unsafe { store_u16(self.used.as_ptr().add(at), self.next_avail.0, Ordering::Relaxed) };
        } else {
            // SAFETY: `used.flags`, as in `disable_notifications`.
            unsafe { store_u16(self.used.as_ptr(), 0, Ordering::Relaxed) };
        }
        // Store-load ordering: our suppression store must be visible before we re-read idx.
        fence(Ordering::SeqCst);
        Ok(self.refresh()? > 0)
    }

    /// With EVENT_IDX, publishes `avail_event = next_avail` without a fence: "kick me when you
    /// add the entry at my current position". Busy-polling devices call this once per batch so
    /// that a driver whose device later sleeps does not need a stale event index.
    pub fn update_avail_event(&mut self) {
        if self.event_idx {
            let at = 4 + 8 * (self.mask as usize + 1);
            // SAFETY: `avail_event`, as in `enable_notifications`.
            unsafe { store_u16(self.used.as_ptr().add(at), self.next_avail.0, Ordering::Relaxed) };
        }
    }
}
