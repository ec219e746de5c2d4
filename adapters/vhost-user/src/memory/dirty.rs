//! The dirty page log of live migration (vhost-user.rst "Migration").
//!
//! During a live migration the front-end copies guest RAM while the guest runs, and must copy
//! again every page written after its copy. The back-end's own writes into guest memory (RX
//! buffers, used rings) bypass the front-end's dirty tracking, so the back-end reports them in
//! a log the front-end shares: `VHOST_USER_SET_LOG_BASE` (with
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`) carries a memfd and a "Log description" (`mmap_size`,
//! `mmap_offset`). The log is a bitmap, one bit per [`LOG_PAGE`] (4 KiB) of guest physical
//! address space from address 0: page `p` is bit `p % 8` of byte `p / 8`. The front-end clears
//! bits while the back-end sets them ("Use atomic operations, as the log may be concurrently
//! manipulated"), so every bit is set with an atomic `fetch_or`.
//!
//! Marking starts when `VHOST_F_LOG_ALL` is negotiated ("To start/stop logging of data/used
//! ring writes, the front-end may send messages `VHOST_USER_SET_FEATURES` with
//! `VHOST_F_LOG_ALL` and `VHOST_USER_SET_VRING_ADDR` with `VHOST_VRING_F_LOG`"); the device
//! hands the data path a [`DirtyLog`] exactly then ([`crate::vring::VringShared::log`]).
//!
//! ## Hostile input (family 16)
//! The log is a file the front-end owns, described by numbers it chooses. DPDK 22.11 maps
//! whatever it is told and dies (SIGSEGV or SIGBUS) on the first write past the end of the
//! file. Here, before anything is mapped: `mmap_size` must not be 0, `mmap_offset +
//! mmap_size` and its page rounding must not overflow, and the fd must be a regular file at
//! least `mmap_offset + mmap_size` bytes long ([`LogError`]). After mapping, a bit for a page
//! past the end of the log is never written, only counted ([`DirtyLog::pages_outside`]); and a
//! log whose file shrinks under the mapping is registered with the [`fault`]
//! handler like guest memory, so the resulting `SIGBUS` turns the log into zero pages and a
//! flag ([`DirtyLog::faulted`]) instead of killing the process.

use std::fmt;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use super::fault;
use super::mapping::{FileMapping, MapError};

/// `VHOST_LOG_PAGE`: the guest memory covered by one bit of the log.
pub const LOG_PAGE: u64 = 0x1000;

/// Why a `VHOST_USER_SET_LOG_BASE` log was refused. Nothing stays mapped after any of these,
/// and the fd is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogError {
    /// `mmap_size` is 0: a log that covers no page.
    ZeroSize,
    /// `mmap_offset + mmap_size`, or the mapping length (that end rounded up to the page
    /// size), does not fit in 64 bits or in the host address space (CVE-2020-10722 is DPDK's
    /// instance of the first).
    Overflow {
        /// `mmap_size`.
        size: u64,
        /// `mmap_offset`.
        offset: u64,
    },
    /// `fstat` on the log fd failed.
    Fstat {
        /// The `errno` value.
        errno: i32,
    },
    /// The fd is not a regular file (memfd, tmpfs or hugetlbfs file), so its size cannot be
    /// checked.
    NotAFile {
        /// `st_mode & S_IFMT`.
        file_type: u32,
    },
    /// The file is shorter than `mmap_offset + mmap_size`: a write to the tail would raise
    /// `SIGBUS`.
    FdTooSmall {
        /// `mmap_size`.
        size: u64,
        /// `mmap_offset`.
        offset: u64,
        /// `st_size` of the fd.
        file_size: u64,
    },
    /// `mmap` failed.
    Mmap {
        /// The `errno` value.
        errno: i32,
    },
    /// The process already maps [`fault::MAX_REGIONS`] regions, the most the `SIGBUS` handler
    /// can tell apart; a log it cannot protect is not mapped.
    FaultTableFull,
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let os = |errno: i32| std::io::Error::from_raw_os_error(errno);
        match self {
            LogError::ZeroSize => f.write_str("dirty log: mmap_size is 0"),
            LogError::Overflow { size, offset } => {
                write!(f, "dirty log: mmap_offset {offset:#x} + mmap_size {size:#x} overflows the address space")
            }
            LogError::Fstat { errno } => write!(f, "dirty log: fstat failed: {}", os(*errno)),
            LogError::NotAFile { file_type } => {
                write!(f, "dirty log: the fd is not a regular file (type {file_type:#o})")
            }
            LogError::FdTooSmall { size, offset, file_size } => write!(
                f,
                "dirty log: mmap_offset {offset:#x} + mmap_size {size:#x} is past the end of its file ({file_size:#x} bytes)"
            ),
            LogError::Mmap { errno } => write!(f, "dirty log: mmap failed: {}", os(*errno)),
            LogError::FaultTableFull => {
                write!(f, "dirty log: the process already maps {} guest memory regions", fault::MAX_REGIONS)
            }
        }
    }
}

impl std::error::Error for LogError {}

/// A mapped dirty log: `mmap(NULL, round_up(mmap_offset + mmap_size), PROT_READ | PROT_WRITE,
/// MAP_SHARED, fd, 0)`, the bitmap starting `mmap_offset` bytes in. Unmapped when dropped.
///
/// Shared between the control thread (which replaces it on the next `SET_LOG_BASE`) and the
/// data paths (which hold it through an `Arc` while they mark), so the mapping lives until the
/// last of them lets go. This type never forms a Rust reference to plain bytes of the shared
/// bitmap: each bit is set through a raw pointer, as one atomic `fetch_or`.
#[derive(Debug)]
pub struct DirtyLog {
    /// The mapping of the log's file up to its end (`mapping::FileMapping`: size checks,
    /// `SIGBUS` registration, unmapped when dropped).
    map: super::mapping::FileMapping,
    /// `base + mmap_offset`: byte 0 of the bitmap.
    bitmap: NonNull<u8>,
    /// `mmap_size`: bytes of bitmap.
    size: u64,
    /// `mmap_offset`.
    offset: u64,
    /// Pages covered: `size * 8` (saturating; a log that large covers every page anyway).
    pages: u64,
    /// Pages asked for past the end of the bitmap, never written.
    outside: AtomicU64,
}

// SAFETY: a `DirtyLog` exclusively owns its mapping; `munmap` may run on any thread. Through
// `&DirtyLog` the bitmap is only written with atomic read-modify-writes via raw pointers (the
// front-end writes it concurrently anyway), and the other fields are plain values or atomics.
unsafe impl Send for DirtyLog {}
// SAFETY: as above; `mark` only does atomic operations on the shared memory.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// Checks the "Log description" of `VHOST_USER_SET_LOG_BASE` against the fd and maps it.
    /// `fd` is closed before this returns, whether or not mapping succeeded.
    ///
    /// The mapping starts at file offset 0 (`mmap_offset` need not be page-aligned) and is
    /// `mmap_offset + mmap_size` rounded up to the page size, or to `st_blksize` when that is
    /// a larger power of two (the huge page size on hugetlbfs).
    pub fn new(size: u64, offset: u64, fd: OwnedFd) -> Result<DirtyLog, LogError> {
        if size == 0 {
            return Err(LogError::ZeroSize);
        }
        let overflow = LogError::Overflow { size, offset };
        let file_end = offset.checked_add(size).ok_or(overflow)?;
        // Only a regular file has a size to check; anything else could fault past an end we
        // cannot see.
        let map = FileMapping::new(fd, file_end, 0, true).map_err(|e| match e {
            MapError::Fstat { errno } => LogError::Fstat { errno },
            MapError::NotAFile { file_type } => LogError::NotAFile { file_type },
            MapError::TooSmall { file_size } => LogError::FdTooSmall { size, offset, file_size },
            MapError::Length => overflow,
            MapError::Mmap { errno } => LogError::Mmap { errno },
            MapError::FaultTableFull => LogError::FaultTableFull,
        })?;
        // `offset < file_end <= mapping length <= isize::MAX`, so it fits in usize.
        // SAFETY: `offset` is inside the mapping, so the result is too (hence non-null).
        let bitmap = unsafe { map.base().add(offset as usize) };
        let log = DirtyLog { map, bitmap, size, offset, pages: size.saturating_mul(8), outside: AtomicU64::new(0) };
        log::debug!("dirty log mapped: {size:#x} bytes at offset {offset:#x} ({} pages)", log.pages);
        Ok(log)
    }

    /// `mmap_size`: bytes of bitmap.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// `mmap_offset`: where the bitmap starts in the file.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Guest pages the log covers (`mmap_size * 8`): guest physical addresses below
    /// `pages() * LOG_PAGE` can be marked.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks every [`LOG_PAGE`] that `[gpa, gpa + len)` touches as dirty: call it after the
    /// device wrote those bytes of guest memory (a range that runs past 2^64 is cut there).
    /// `len == 0` marks nothing.
    ///
    /// Each bit is set with an atomic `fetch_or` (`Release`, so that the data written before
    /// is visible to a front-end that sees the bit), one per byte of bitmap touched. Pages
    /// past the end of the log are skipped and counted ([`pages_outside`](Self::pages_outside)).
    /// After the log's file shrank ([`faulted`](Self::faulted)) the marks land on the zero
    /// pages the fault handler put in its place: harmless, and nobody reads them.
    ///
    /// A range inside one page, what the data path marks almost always (a small frame, a used
    /// element), costs one shift, one compare and one atomic OR.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        if first == gpa.wrapping_add(len - 1) / LOG_PAGE && first < self.pages {
            // SAFETY: as in `mark_pages`: `first / 8 < size`, inside the live mapping.
            unsafe { AtomicU8::from_ptr(self.bitmap.as_ptr().add((first / 8) as usize)) }
                .fetch_or(1 << (first % 8), Ordering::Release);
            return;
        }
        self.mark_pages(gpa, len);
    }

    /// [`mark`](Self::mark) for a range over several pages, or past the end of the log.
    #[inline(never)]
    fn mark_pages(&self, gpa: u64, len: u64) {
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        if last >= self.pages {
            let from = first.max(self.pages);
            self.outside.fetch_add(last - from + 1, Ordering::Relaxed);
            if first >= self.pages {
                return;
            }
        }
        // `pages >= 1` here (`first < pages`), and `last < pages <= size * 8`.
        let last = last.min(self.pages - 1);
        let mut page = first;
        while page <= last {
            let byte = page / 8;
            let bit = page % 8;
            let end = last.min(byte * 8 + 7);
            let bits = end - page + 1;
            let mask = (((1u16 << bits) - 1) << bit) as u8;
            // `byte <= last / 8 < size`, and `size <= mapping_len - offset` fits in usize.
            // SAFETY: `bitmap + byte` is inside the mapping, which lives as long as `self`
            // (it may have been replaced by zero pages, still mapped). `AtomicU8` has the size
            // and alignment of `u8`, and the only reference formed is the transient
            // `&AtomicU8` of this one call: an `UnsafeCell` type, so the front-end's concurrent
            // atomic writes to the same byte are allowed.
            unsafe { AtomicU8::from_ptr(self.bitmap.as_ptr().add(byte as usize)) }.fetch_or(mask, Ordering::Release);
            page = end + 1;
        }
    }

    /// How many pages [`mark`](Self::mark) was asked to mark past the end of the log, and left
    /// alone. Non-zero means the log is too small for the guest memory the device writes: a
    /// front-end bug (the log "should be large enough to cover all known guest addresses").
    pub fn pages_outside(&self) -> u64 {
        self.outside.load(Ordering::Relaxed)
    }

    /// `Some(host address)` of the first access that found the log's file shrunk under the
    /// mapping. The log then holds zero pages that nobody reads; [`mark`](Self::mark) writes
    /// there harmlessly.
    pub fn faulted(&self) -> Option<usize> {
        self.map.faulted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn memfd(name: &str, size: u64) -> OwnedFd {
        let cname = CString::new(name).unwrap();
        // SAFETY: `cname` is NUL-terminated.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `fd` is open.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) }, 0);
        fd
    }

    fn count(dir_or_maps: &str, name: &str) -> usize {
        let needle = format!("/memfd:{name} (deleted)");
        if dir_or_maps == "maps" {
            std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| l.ends_with(&needle)).count()
        } else {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|t| t.to_str() == Some(needle.as_str()))
                .count()
        }
    }

    /// The front-end's view of the log: a second mapping of the same file.
    struct View {
        ptr: *mut u8,
        len: usize,
    }

    // SAFETY: the mapping is only accessed through atomics, from any thread.
    unsafe impl Send for View {}
    // SAFETY: as above.
    unsafe impl Sync for View {}

    impl View {
        fn new(fd: &OwnedFd, len: usize) -> View {
            // SAFETY: a new shared mapping of our own memfd.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            View { ptr: p.cast(), len }
        }
        fn byte(&self, i: usize) -> &AtomicU8 {
            assert!(i < self.len);
            // SAFETY: inside our mapping, alive while `self` is; atomics only.
            unsafe { AtomicU8::from_ptr(self.ptr.add(i)) }
        }
        fn bytes(&self, range: std::ops::Range<usize>) -> Vec<u8> {
            range.map(|i| self.byte(i).load(Ordering::Acquire)).collect()
        }
        fn clear(&self) {
            for i in 0..self.len {
                self.byte(i).store(0, Ordering::Release);
            }
        }
    }

    impl Drop for View {
        fn drop(&mut self) {
            // SAFETY: our own mapping, unmapped once.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    #[test]
    fn marks_exactly_the_pages_a_range_touches() {
        let name = "virtq-dirty-bits";
        let fd = memfd(name, 0x2000);
        // Bitmap of 16 bytes (128 pages) starting at file offset 0x1003: unaligned on purpose.
        let log = DirtyLog::new(16, 0x1003, fd.try_clone().unwrap()).unwrap();
        let view = View::new(&fd, 0x2000);
        let at = |i: usize| 0x1003 + i;
        assert_eq!(log.pages(), 128);

        // Inside one page.
        log.mark(0x5010, 8);
        assert_eq!(view.bytes(at(0)..at(2)), [0b0010_0000, 0]);
        // The last byte of a page, and the first of the next: one bit each.
        view.clear();
        log.mark(0x7fff, 1);
        log.mark(0x9000, 1);
        assert_eq!(view.bytes(at(0)..at(2)), [0b1000_0000, 0b0000_0010]);
        // Across page boundaries and across a bitmap byte: pages 6..=9.
        view.clear();
        log.mark(0x6fff, 0x3001);
        assert_eq!(view.bytes(at(0)..at(2)), [0b1100_0000, 0b0000_0011]);
        // A long range: pages 3..=20 (one fetch_or per byte).
        view.clear();
        log.mark(0x3000, 18 * LOG_PAGE);
        assert_eq!(view.bytes(at(0)..at(3)), [0b1111_1000, 0xff, 0b0001_1111]);
        // len 0 marks nothing, even at an address that would.
        view.clear();
        log.mark(0x5000, 0);
        assert_eq!(view.bytes(at(0)..at(16)), [0; 16]);
        // The last page of the log.
        log.mark(127 * LOG_PAGE + 0xfff, 1);
        assert_eq!(view.bytes(at(15)..at(16)), [0x80]);
        assert_eq!(log.pages_outside(), 0);
        // Bytes around the bitmap are never touched.
        assert_eq!(view.byte(at(0) - 1).load(Ordering::Relaxed), 0);
        assert_eq!(view.byte(at(16)).load(Ordering::Relaxed), 0);

        // Past the end: the pages inside are marked, the others counted, nothing written
        // after the bitmap.
        view.clear();
        log.mark(126 * LOG_PAGE, 4 * LOG_PAGE);
        assert_eq!(view.bytes(at(15)..at(16)), [0xc0]);
        assert_eq!(log.pages_outside(), 2);
        log.mark(1 << 40, 1);
        log.mark(u64::MAX, u64::MAX);
        assert_eq!(log.pages_outside(), 2 + 1 + 1);
        // A range running past 2^64 is cut there: page 0 is not marked by wrapping around.
        view.clear();
        log.mark(u64::MAX - 10, 100);
        assert_eq!(view.bytes(at(0)..at(16)), [0; 16]);
        assert_eq!(view.byte(at(16)).load(Ordering::Relaxed), 0);
        drop(log);
        drop(view);
        assert_eq!(count("maps", name), 0, "unmapped on drop");
    }

    #[test]
    fn descriptions_past_the_file_or_overflowing_are_refused_before_mapping() {
        let name = "virtq-dirty-refuse";
        let fd = memfd(name, 0x1000);
        let new = |size, offset| DirtyLog::new(size, offset, fd.try_clone().unwrap()).err();
        assert_eq!(new(0, 0), Some(LogError::ZeroSize));
        assert_eq!(new(0x1001, 0), Some(LogError::FdTooSmall { size: 0x1001, offset: 0, file_size: 0x1000 }));
        assert_eq!(new(0x800, 0x801), Some(LogError::FdTooSmall { size: 0x800, offset: 0x801, file_size: 0x1000 }));
        assert_eq!(new(u64::MAX, 1), Some(LogError::Overflow { size: u64::MAX, offset: 1 }));
        // The end fits in 64 bits, its page rounding does not.
        assert_eq!(new(1, u64::MAX - 1), Some(LogError::Overflow { size: 1, offset: u64::MAX - 1 }));
        assert_eq!(new(0x1000, 0), None, "exactly the file");
        assert_eq!(count("maps", name), 0);
        // Not a regular file: a pipe.
        let (rd, _wr) = std::io::pipe().unwrap();
        assert!(matches!(DirtyLog::new(0x10, 0, OwnedFd::from(rd)), Err(LogError::NotAFile { .. })));
        drop(fd);
        assert_eq!(count("fd", name), 0, "every fd handed over was closed");
    }

    #[test]
    fn the_fd_is_closed_once_mapped_and_the_mapping_released_on_drop() {
        let name = "virtq-dirty-fd";
        let log = DirtyLog::new(0x1000, 0, memfd(name, 0x1000)).unwrap();
        assert_eq!((count("fd", name), count("maps", name)), (0, 1));
        let shared = Arc::new(log);
        let other = Arc::clone(&shared);
        drop(shared);
        assert_eq!(count("maps", name), 1, "still held");
        drop(other);
        assert_eq!(count("maps", name), 0);
    }

    /// The front-end collects the log by taking bytes (atomic exchange with 0, as QEMU's
    /// `vhost_log_sync`) while the device marks: every mark is either collected or still in
    /// the log at the end, and a page marked after the last collection reads set.
    #[test]
    fn a_concurrent_clearer_loses_no_bit() {
        let name = "virtq-dirty-race";
        let fd = memfd(name, 64);
        let log = Arc::new(DirtyLog::new(64, 0, fd.try_clone().unwrap()).unwrap());
        let view = Arc::new(View::new(&fd, 64));
        let stop = Arc::new(AtomicBool::new(false));
        let collector = {
            let (view, stop) = (Arc::clone(&view), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut collected = [0u8; 64];
                while !stop.load(Ordering::Acquire) {
                    for (i, c) in collected.iter_mut().enumerate() {
                        *c |= view.byte(i).swap(0, Ordering::AcqRel);
                    }
                }
                collected
            })
        };
        // Every page of the log is marked at least once, in ranges of 1..=9 pages.
        let mut page = 0u64;
        let mut round = 0u64;
        while page < 512 {
            let n = (1 + round % 9).min(512 - page);
            log.mark(page * LOG_PAGE + round % LOG_PAGE, n * LOG_PAGE - round % LOG_PAGE);
            page += n;
            round += 1;
        }
        stop.store(true, Ordering::Release);
        let collected = collector.join().unwrap();
        let union: Vec<u8> = collected.iter().zip(view.bytes(0..64)).map(|(c, v)| c | v).collect();
        assert_eq!(union, [0xff; 64], "a mark was lost to a concurrent collection");
        // After the collector's last collection: what is marked now reads set.
        log.mark(0, 512 * LOG_PAGE);
        assert_eq!(view.bytes(0..64), [0xff; 64]);
        assert_eq!(log.pages_outside(), 0);
        // Per-bit: a page marked while another thread keeps clearing *other* bits of the same
        // byte survives (a read-modify-write without atomics would lose it).
        view.clear();
        let stop = Arc::new(AtomicBool::new(false));
        let clearer = {
            let (view, stop) = (Arc::clone(&view), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    // Clears bits 1..=7 of byte 0, never bit 0.
                    view.byte(0).fetch_and(0x01, Ordering::AcqRel);
                }
            })
        };
        for i in 0..100_000u64 {
            log.mark((1 + i % 7) * LOG_PAGE, 1);
            if i == 50_000 {
                log.mark(0, 1);
            }
        }
        stop.store(true, Ordering::Release);
        clearer.join().unwrap();
        assert_eq!(view.byte(0).load(Ordering::Acquire) & 1, 1, "page 0 stays marked");
    }

    /// The front-end shrinks the log's file under the mapping: the write that would have
    /// raised SIGBUS lands on a zero page, the log reports it, and marks stop.
    #[test]
    fn a_log_whose_file_shrinks_faults_and_stops_marking() {
        let name = "virtq-dirty-shrink";
        let fd = memfd(name, 0x3000);
        let log = DirtyLog::new(0x2000, 0x1000, fd.try_clone().unwrap()).unwrap();
        log.mark(0, 1);
        assert_eq!(log.faulted(), None);
        // SAFETY: our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 0x1000) }, 0);
        // Page 0x8000 * 8 is in bitmap byte 0x1000, at file offset 0x2000: past the new end.
        log.mark(0x1000 * 8 * LOG_PAGE, 1);
        assert!(log.faulted().is_some(), "the SIGBUS was caught and charged to the log");
        log.mark(0, 0x10_0000);
        assert_eq!(log.pages_outside(), 0);
        drop(log);
        assert_eq!(count("maps", name), 0);
    }

    #[test]
    fn log_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<DirtyLog>();
        assert_send_sync::<Arc<DirtyLog>>();
    }
}
