//! Write tracking: every byte the device writes into guest memory, reported to a logger the
//! owner provides, for live migration (vhost-user.rst "Migration": the back-end logs the pages
//! it writes so that the front-end copies them again) and for DPUs whose host migrates a VM.
//!
//! What the device writes:
//! - the used ring: used elements and `used.idx` ([`SplitQueue::publish_logged`](crate::SplitQueue::publish_logged)), and the
//!   notification-suppression field it owns, `used.flags` or `avail_event`
//!   ([`SplitQueue::log_suppression`](crate::SplitQueue::log_suppression));
//! - for a packed ring, the used descriptors written in place in the descriptor ring
//!   ([`PackedQueue::publish_logged`](crate::PackedQueue::publish_logged)) and the device area
//!   ([`PackedQueue::log_suppression`](crate::PackedQueue::log_suppression));
//! - device-writable buffers: virtio-net receive buffers with their header and `num_buffers`
//!   ([`crate::net::receive_burst_logged`], [`crate::net::receive_logged`]), and
//!   [`SplitQueue::pop_write_logged`](crate::SplitQueue::pop_write_logged); a device that writes through a chain's segments itself
//!   reports them with [`Chain::log_written`](crate::Chain::log_written).
//!
//! Buffers are reported as guest ranges (the addresses descriptors hold), found with
//! [`GuestMemory::guest_address`]; the used ring by offset from its start, because its guest
//! address may live in another address space (vhost-user gives it separately, as
//! `log_guest_addr`). Each write is reported after it was made, so a logger that marks pages
//! with a release store (or after a fence) never lets a migration copy a page before the write
//! it marks.
//!
//! Without a logger the data path runs the same code with [`NoLog`], whose
//! [`WriteLog::ENABLED`] is `false`: every report compiles away, and choosing between the two
//! costs the caller one branch per burst.

use core::ptr::NonNull;

use crate::mem::GuestMemory;

/// Receives the guest memory the device wrote.
pub trait WriteLog {
    /// `false` only for loggers that drop everything ([`NoLog`]): the reports compile away.
    const ENABLED: bool = true;

    /// The device wrote `len` bytes of a buffer at guest address `addr` (in the address space
    /// of descriptor addresses).
    fn buffer(&self, addr: u64, len: u64);

    /// The device wrote `len` bytes of the used ring (`struct virtq_used`) at `offset` from its
    /// start: `flags` at 0, `idx` at 2, `ring[i]` at `4 + 8 i`, `avail_event` at
    /// `4 + 8 size` (§2.7.8).
    fn used_ring(&self, offset: u64, len: u64);

    /// Packed rings (§2.8): the device wrote `len` bytes of the descriptor ring at `offset`
    /// from its start. Used descriptors are written in place (`len`, `id` and `flags` at
    /// `16 i + 8 .. 16 i + 16`, §2.8.13).
    fn descriptor_ring(&self, offset: u64, len: u64);

    /// Packed rings (§2.8.10): the device wrote `len` bytes of its event suppression
    /// structure (the device area) at `offset`.
    fn device_area(&self, offset: u64, len: u64);
}

/// The logger of a device that tracks nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoLog;

impl WriteLog for NoLog {
    const ENABLED: bool = false;
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn buffer(&self, _: u64, _: u64) {}
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn used_ring(&self, _: u64, _: u64) {}
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn descriptor_ring(&self, _: u64, _: u64) {}
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn device_area(&self, _: u64, _: u64) {}
}

impl<L: WriteLog + ?Sized> WriteLog for &L {
    const ENABLED: bool = L::ENABLED;
    #[inline]
    fn buffer(&self, addr: u64, len: u64) {
        (**self).buffer(addr, len)
    }
    #[inline]
    fn used_ring(&self, offset: u64, len: u64) {
        (**self).used_ring(offset, len)
    }
    #[inline]
    fn descriptor_ring(&self, offset: u64, len: u64) {
        (**self).descriptor_ring(offset, len)
    }
    #[inline]
    fn device_area(&self, offset: u64, len: u64) {
        (**self).device_area(offset, len)
    }
}

/// Reports `len` bytes written at host address `ptr` (inside a range `mem` translated) as a
/// guest range. A host range that `translate` returned lies in one region, so one inverse
/// lookup covers it.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) fn log_host<M: GuestMemory + ?Sized, L: WriteLog>(mem: &M, log: &L, ptr: *const u8, len: usize) {
    if !L::ENABLED || len == 0 {
        return;
    }
    if let Some(gpa) = NonNull::new(ptr.cast_mut()).and_then(|p| mem.guest_address(p)) {
        log.buffer(gpa, len as u64);
    }
}
