//! Inflight I/O tracking (vhost-user.rst "Inflight I/O tracking", split virtqueue layout):
//! the back-end records in a memory area the front-end keeps (`GET_INFLIGHT_FD` /
//! `SET_INFLIGHT_FD`) which requests it has taken from a ring and not yet completed, so that
//! a back-end that was killed and restarted serves them again and the guest loses nothing.
//!
//! The area holds one region per queue, `QueueRegionSplit` followed by `desc_num`
//! `DescStateSplit` entries:
//!
//! ```text
//! QueueRegionSplit { u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx; DescStateSplit desc[]; }
//! DescStateSplit   { u8 inflight; u8 padding[5]; u16 next; u64 counter; }
//! ```
//!
//! each region rounded up to 64 bytes. The back-end follows the spec's steps: on taking a
//! chain, `desc[head].counter` = the queue's counter (then incremented) and `inflight` = 1;
//! on completing a batch, the heads are linked from `last_batch_head` through `next`, the used
//! index is published, then their `inflight` is cleared and `used_idx` set. At start
//! ([`QueueRegion::recover`]), a last batch whose `used_idx` differs from the ring's is
//! cleared, and the entries still in flight are served again in `counter` order.
//!
//! virtq-blk completes requests in the order it takes them, so the entries in flight are
//! always the ones the available ring holds from the used index on, in that order; serving
//! them again in `counter` order is serving the ring again from the used index.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};

use virtq::queue::MAX_QUEUE_SIZE;
use virtq_vhost_user::memory::mapping::{FileMapping, MapError};
use virtq_vhost_user::message::Inflight;

/// `version` of a region this back-end set up (0: never used).
pub const INFLIGHT_VERSION: u16 = 1;
/// Bytes of `QueueRegionSplit` before its entries.
const REGION_HEADER: u64 = 16;
/// Bytes of one `DescStateSplit`.
const DESC_STATE: u64 = 16;
/// Regions start on this boundary (as QEMU's libvhost-user and DPDK lay them out).
const ALIGN: u64 = 64;

/// Field offsets in `QueueRegionSplit`.
const FEATURES: u64 = 0;
const VERSION: u64 = 8;
const DESC_NUM: u64 = 10;
const LAST_BATCH_HEAD: u64 = 12;
const USED_IDX: u64 = 14;
/// Field offsets in `DescStateSplit`.
const INFLIGHT: u64 = 0;
const NEXT: u64 = 6;
const COUNTER: u64 = 8;

/// Bytes of one queue's region for a queue of `queue_size` entries.
pub fn region_size(queue_size: u16) -> u64 {
    (REGION_HEADER + DESC_STATE * queue_size as u64).div_ceil(ALIGN) * ALIGN
}

/// Why a `GET_INFLIGHT_FD` or `SET_INFLIGHT_FD` was refused.
#[derive(Debug)]
pub enum InflightError {
    /// `num_queues` is 0 or more than the device has (DPDK `6442c329b9`: an out-of-range count
    /// was an out-of-bounds write).
    NumQueues {
        /// Requested.
        num_queues: u16,
        /// The device's queues.
        max: usize,
    },
    /// `queue_size` is 0 or above 32768.
    QueueSize(u16),
    /// `mmap_size` smaller than the regions need, or `mmap_offset + mmap_size` overflowing.
    Size {
        /// `mmap_offset`.
        offset: u64,
        /// `mmap_size`.
        size: u64,
        /// Bytes the regions need.
        needed: u64,
    },
    /// `mmap_offset` not a multiple of 64: the regions' fields would be misaligned.
    Misaligned(u64),
    /// The area could not be created.
    Create(io::Error),
    /// The front-end's file could not be mapped.
    Map(MapError),
}

impl std::fmt::Display for InflightError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InflightError::NumQueues { num_queues, max } => {
                write!(f, "inflight area for {num_queues} queues, the device has {max}")
            }
            InflightError::QueueSize(n) => write!(f, "inflight area for queues of {n} entries"),
            InflightError::Size { offset, size, needed } => {
                write!(f, "inflight area of {size} bytes at offset {offset}, {needed} needed")
            }
            InflightError::Misaligned(o) => write!(f, "inflight area at offset {o}, not a multiple of {ALIGN}"),
            InflightError::Create(e) => write!(f, "inflight area: {e}"),
            InflightError::Map(e) => write!(f, "inflight area: cannot map: {e:?}"),
        }
    }
}

impl std::error::Error for InflightError {}

fn check(num_queues: u16, queue_size: u16, max_queues: usize) -> Result<u64, InflightError> {
    if num_queues == 0 || num_queues as usize > max_queues {
        return Err(InflightError::NumQueues { num_queues, max: max_queues });
    }
    if queue_size == 0 || queue_size as u32 > MAX_QUEUE_SIZE as u32 {
        return Err(InflightError::QueueSize(queue_size));
    }
    Ok(num_queues as u64 * region_size(queue_size))
}

/// `GET_INFLIGHT_FD`: a new zeroed area for `req.num_queues` queues of `req.queue_size`
/// entries, in a memfd sealed against shrinking and growing. Returns the reply payload and
/// the fd for the front-end, which keeps it and hands it back with `SET_INFLIGHT_FD`.
pub fn create(req: &Inflight, max_queues: usize) -> Result<(Inflight, OwnedFd), InflightError> {
    let size = check(req.num_queues, req.queue_size, max_queues)?;
    let name = c"virtq-blk-inflight";
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned at once.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(InflightError::Create(io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = i64::try_from(size).map_err(|_| InflightError::Create(io::Error::from_raw_os_error(libc::EFBIG)))?;
    // SAFETY: plain syscalls on our own fd.
    let ok = unsafe {
        libc::ftruncate(fd.as_raw_fd(), len) == 0
            && libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            ) == 0
    };
    if !ok {
        return Err(InflightError::Create(io::Error::last_os_error()));
    }
    Ok((Inflight { mmap_size: size, mmap_offset: 0, num_queues: req.num_queues, queue_size: req.queue_size }, fd))
}

/// The area a front-end handed over with `SET_INFLIGHT_FD`, mapped.
#[derive(Debug)]
pub struct InflightArea {
    map: FileMapping,
    offset: u64,
    num_queues: u16,
    queue_size: u16,
}

impl InflightArea {
    /// Maps the area of `SET_INFLIGHT_FD` after checking its description against the
    /// device (`max_queues`) and against itself (sizes, overflow).
    pub fn map(fd: OwnedFd, desc: &Inflight, max_queues: usize) -> Result<InflightArea, InflightError> {
        let needed = check(desc.num_queues, desc.queue_size, max_queues)?;
        let bad = InflightError::Size { offset: desc.mmap_offset, size: desc.mmap_size, needed };
        if desc.mmap_size < needed {
            return Err(bad);
        }
        let end = desc.mmap_offset.checked_add(needed).ok_or(bad)?;
        if !desc.mmap_offset.is_multiple_of(ALIGN) {
            return Err(InflightError::Misaligned(desc.mmap_offset));
        }
        let map = FileMapping::new(fd, end, 0, true).map_err(InflightError::Map)?;
        Ok(InflightArea { map, offset: desc.mmap_offset, num_queues: desc.num_queues, queue_size: desc.queue_size })
    }

    /// Entries per queue region (`queue_size` of the area's description).
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `index`'s region, if the area has one.
    pub fn queue(&self, index: usize) -> Option<QueueRegion<'_>> {
        if index >= self.num_queues as usize || self.map.faulted().is_some() {
            return None;
        }
        let at = self.offset + index as u64 * region_size(self.queue_size);
        // `at + region_size <= offset + needed <= the mapping's length` (`map`).
        let base = self.map.base().as_ptr().wrapping_add(at as usize);
        Some(QueueRegion { base, desc_num: self.queue_size, _area: std::marker::PhantomData })
    }
}

/// One queue's `QueueRegionSplit` (see the module documentation). Every field is accessed
/// with atomics: the memory is shared with the front-end.
#[derive(Clone, Copy, Debug)]
pub struct QueueRegion<'a> {
    base: *mut u8,
    /// Entries mapped for this region (the area's `queue_size`; the region's own `desc_num`
    /// field is the front-end's to corrupt and never used as a bound).
    desc_num: u16,
    _area: std::marker::PhantomData<&'a InflightArea>,
}

// SAFETY: the region points into a shared mapping owned by the `InflightArea` it borrows, and
// is only accessed through atomics.
unsafe impl Send for QueueRegion<'_> {}

impl QueueRegion<'_> {
    fn u16_at(&self, off: u64) -> &AtomicU16 {
        // SAFETY: `off` is one of the header's u16 fields or inside an entry (callers check
        // the index against `desc_num`), so it lies in the mapped region, which lives as long
        // as the borrowed area; the region starts 64-aligned (a page-aligned mapping, an
        // `mmap_offset` checked to be a multiple of 64 in `map`, regions a multiple of 64
        // long) and the field is 2-aligned in it. Shared memory another process may write:
        // atomics only.
        unsafe { AtomicU16::from_ptr(self.base.add(off as usize).cast()) }
    }

    fn u64_at(&self, off: u64) -> &AtomicU64 {
        // SAFETY: as `u16_at`, for an 8-aligned u64 field.
        unsafe { AtomicU64::from_ptr(self.base.add(off as usize).cast()) }
    }

    fn u8_at(&self, off: u64) -> &AtomicU8 {
        // SAFETY: as `u16_at`, for a byte.
        unsafe { AtomicU8::from_ptr(self.base.add(off as usize)) }
    }

    fn entry(&self, head: u16) -> u64 {
        REGION_HEADER + head as u64 * DESC_STATE
    }

    /// Takes chain `head` (step 1–4 of "When receiving available buffers"): its counter, then
    /// `inflight` = 1.
    pub fn take(&self, head: u16, counter: u64) {
        if head >= self.desc_num {
            return;
        }
        let e = self.entry(head);
        self.u64_at(e + COUNTER).store(counter, Ordering::Relaxed);
        self.u8_at(e + INFLIGHT).store(1, Ordering::Release);
    }

    /// Links `heads`, the batch about to be published, from `last_batch_head` (steps 1–3 of
    /// "When supplying used buffers"). Call before the used index moves.
    pub fn link_batch(&self, heads: &[u16]) {
        for &head in heads.iter().filter(|&&h| h < self.desc_num) {
            let last = self.u16_at(LAST_BATCH_HEAD);
            let prev = last.load(Ordering::Relaxed);
            self.u16_at(self.entry(head) + NEXT).store(prev, Ordering::Relaxed);
            last.store(head, Ordering::Release);
        }
    }

    /// After the used index moved to `used_idx`: the batch is no longer in flight (steps 6–7).
    pub fn complete_batch(&self, heads: &[u16], used_idx: u16) {
        for &head in heads.iter().filter(|&&h| h < self.desc_num) {
            self.u8_at(self.entry(head) + INFLIGHT).store(0, Ordering::Release);
        }
        self.u16_at(USED_IDX).store(used_idx, Ordering::Release);
    }

    /// At ring start (`used_idx`: the used ring's index, read from guest memory; `size`: the
    /// ring's size): sets a fresh region up, or repairs the last batch and counts the entries
    /// still in flight. Returns `None` if the region cannot serve this ring (its size
    /// differs), else the number of entries in flight and the counter to go on from.
    pub fn recover(&self, used_idx: u16, size: u16) -> Option<(u16, u64)> {
        if size != self.desc_num {
            return None;
        }
        if self.u16_at(VERSION).load(Ordering::Acquire) == 0 {
            // Never used: `features` 0, `version` 1, `desc_num`, nothing in flight.
            self.u64_at(FEATURES).store(0, Ordering::Relaxed);
            self.u16_at(DESC_NUM).store(self.desc_num, Ordering::Relaxed);
            self.u16_at(LAST_BATCH_HEAD).store(0, Ordering::Relaxed);
            self.u16_at(USED_IDX).store(used_idx, Ordering::Relaxed);
            self.u16_at(VERSION).store(INFLIGHT_VERSION, Ordering::Release);
            return Some((0, 0));
        }
        let recorded = self.u16_at(USED_IDX).load(Ordering::Acquire);
        if recorded != used_idx {
            // The last batch reached the used ring but its entries were not cleared: clear
            // them, following `next` from `last_batch_head` (at most the queue size of them,
            // whatever the front-end's memory says).
            let batch = used_idx.wrapping_sub(recorded).min(self.desc_num);
            let mut head = self.u16_at(LAST_BATCH_HEAD).load(Ordering::Acquire);
            for _ in 0..batch {
                if head >= self.desc_num {
                    break;
                }
                self.u8_at(self.entry(head) + INFLIGHT).store(0, Ordering::Release);
                head = self.u16_at(self.entry(head) + NEXT).load(Ordering::Acquire);
            }
            self.u16_at(USED_IDX).store(used_idx, Ordering::Release);
        }
        let (mut inflight, mut counter) = (0u16, 0u64);
        for head in 0..self.desc_num {
            let e = self.entry(head);
            if self.u8_at(e + INFLIGHT).load(Ordering::Acquire) == 1 {
                inflight += 1;
                counter = counter.max(self.u64_at(e + COUNTER).load(Ordering::Relaxed).wrapping_add(1));
            }
        }
        Some((inflight, counter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(queues: u16, size: u16) -> InflightArea {
        let req = Inflight { num_queues: queues, queue_size: size, ..Inflight::default() };
        let (desc, fd) = create(&req, 4).unwrap();
        assert_eq!(desc.mmap_size, queues as u64 * region_size(size));
        InflightArea::map(fd, &desc, 4).unwrap()
    }

    #[test]
    fn regions_are_64_byte_aligned_and_sized_for_their_entries() {
        assert_eq!(region_size(1), 64);
        assert_eq!(region_size(128), 2048 + 64);
        assert_eq!(region_size(256), 4096 + 64);
    }

    #[test]
    fn descriptions_the_device_cannot_hold_are_refused() {
        let req = |n, s| Inflight { num_queues: n, queue_size: s, ..Inflight::default() };
        assert!(matches!(create(&req(0, 128), 2), Err(InflightError::NumQueues { .. })));
        assert!(matches!(create(&req(3, 128), 2), Err(InflightError::NumQueues { .. })));
        assert!(matches!(create(&req(1, 0), 2), Err(InflightError::QueueSize(0))));
        let (mut desc, fd) = create(&req(2, 128), 2).unwrap();
        desc.mmap_size -= 1;
        assert!(matches!(InflightArea::map(fd, &desc, 2), Err(InflightError::Size { .. })));
        let (mut desc, fd) = create(&req(1, 128), 2).unwrap();
        desc.mmap_offset = u64::MAX - 10;
        assert!(matches!(InflightArea::map(fd, &desc, 2), Err(InflightError::Size { .. })));
        let (mut desc, fd) = create(&req(1, 128), 2).unwrap();
        desc.mmap_offset = 8;
        assert!(matches!(InflightArea::map(fd, &desc, 2), Err(InflightError::Misaligned(8))));
        let (mut desc, fd) = create(&req(1, 128), 2).unwrap();
        desc.mmap_offset = 4096; // past the end of the file
        assert!(matches!(InflightArea::map(fd, &desc, 2), Err(InflightError::Map(MapError::TooSmall { .. }))));
    }

    #[test]
    fn a_crash_between_publishing_and_clearing_leaves_only_the_unfinished_requests() {
        let a = area(1, 8);
        let r = a.queue(0).unwrap();
        assert_eq!(r.recover(0, 8), Some((0, 0)), "fresh region");
        assert_eq!(r.recover(0, 16), None, "another ring size");
        // Burst 1: heads 3 and 5 taken and completed (used idx 0 -> 2).
        r.take(3, 0);
        r.take(5, 1);
        r.link_batch(&[3, 5]);
        r.complete_batch(&[3, 5], 2);
        // Burst 2: heads 1, 2, 7 taken; 1 and 2 published (used idx 4) but the back-end dies
        // before clearing them; 7 never completed.
        r.take(1, 2);
        r.take(2, 3);
        r.take(7, 4);
        r.link_batch(&[1, 2]);
        // The restarted back-end: used idx 4 in guest memory, the region says 2.
        assert_eq!(r.recover(4, 8), Some((1, 5)), "only head 7 is still in flight");
        assert_eq!(r.recover(4, 8), Some((1, 5)), "recovery is idempotent");
        assert!(a.queue(1).is_none());
    }
}
