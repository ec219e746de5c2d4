//! A front-end's file mapped into this process: guest memory regions ([`super::MappedRegion`])
//! and the dirty log ([`super::dirty::DirtyLog`]) are both this, and every rule about mapping
//! a file a hostile front-end handed over lives here once:
//! - the file is mapped from offset 0 (offsets need not be page-aligned), `MAP_SHARED`, up to
//!   the end the caller needs rounded to the page size, or to `st_blksize` when that is a larger
//!   power of two (the huge page size on hugetlbfs, whose mappings are unmapped in whole pages);
//! - a regular file (memfd, tmpfs, hugetlbfs) must be at least that long, or touching the tail
//!   would raise `SIGBUS`; other fd types are left to `mmap`, or refused where the caller needs
//!   a size to check;
//! - the mapping is registered with the `SIGBUS` handler ([`super::fault`]) before anything can
//!   touch it, and unregistered before it is unmapped;
//! - it is excluded from core dumps (guest data, and sizes of gigabytes);
//! - the fd is closed once mapped: the mapping keeps the file alive, and a back-end with many
//!   devices would otherwise hold an fd per region.

use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;

use super::fault;

/// Why a file could not be mapped (each user turns it into its own typed error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// `fstat` failed.
    Fstat {
        /// `errno`.
        errno: i32,
    },
    /// Not a regular file, where the caller needs a size to check.
    NotAFile {
        /// `st_mode & S_IFMT`.
        file_type: u32,
    },
    /// The file is shorter than the end the caller needs.
    TooSmall {
        /// The file's size.
        file_size: u64,
    },
    /// The page-rounded length overflows or does not fit the address space.
    Length,
    /// `mmap` failed.
    Mmap {
        /// `errno`.
        errno: i32,
    },
    /// The `SIGBUS` handler's table is full.
    FaultTableFull,
}

/// See the module documentation. Device models map front-end files with it too (virtq-blk's
/// `GET/SET_INFLIGHT_FD` area), so the rules stay in one place.
#[derive(Debug)]
pub struct FileMapping {
    base: NonNull<u8>,
    len: usize,
    shrink_sealed: bool,
    fault: Option<fault::FaultGuard>,
}

// SAFETY: a `FileMapping` exclusively owns its mapping; `munmap` may run on any thread, and
// `&FileMapping` only exposes the base pointer and plain values, never references into the
// shared memory.
unsafe impl Send for FileMapping {}
// SAFETY: as above; nothing is mutated through `&self`.
unsafe impl Sync for FileMapping {}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().filter(|p| p.is_power_of_two()).unwrap_or(4096)
}

impl FileMapping {
    /// Maps `fd` from offset 0 to at least `end` bytes (`end > 0`), `flags` added to
    /// `MAP_SHARED`. With `regular_only`, an fd that is not a regular file is refused. `fd` is
    /// closed before this returns, in every case.
    pub fn new(fd: OwnedFd, end: u64, flags: libc::c_int, regular_only: bool) -> Result<FileMapping, MapError> {
        let mut st = MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `fd` is an open descriptor (OwnedFd) and `st` is valid for one `struct stat`.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return Err(MapError::Fstat { errno: errno() });
        }
        // SAFETY: fstat returned 0, so it initialised `st`.
        let st = unsafe { st.assume_init() };
        let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
        if regular_only && !regular {
            return Err(MapError::NotAFile { file_type: st.st_mode & libc::S_IFMT });
        }
        let page = page_size();
        let align = u64::try_from(st.st_blksize).ok().filter(|b| b.is_power_of_two() && *b > page).unwrap_or(page);
        let len = end
            .checked_add(align - 1)
            .map(|e| e & !(align - 1))
            .and_then(|l| usize::try_from(l).ok())
            .filter(|&l| l > 0 && l <= isize::MAX as usize)
            .ok_or(MapError::Length)?;
        if regular {
            let file_size = u64::try_from(st.st_size).unwrap_or(0);
            if file_size < end {
                return Err(MapError::TooSmall { file_size });
            }
        }
        // A memfd sealed with F_SEAL_SHRINK cannot lose the pages mapped here (other files
        // answer EINVAL and count as unsealed).
        // SAFETY: F_GET_SEALS only reads the fd's seals.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        let shrink_sealed = seals >= 0 && seals & libc::F_SEAL_SHRINK != 0;

        // SAFETY: a new mapping chosen by the kernel (no MAP_FIXED), so no existing memory is
        // affected; `fd` is open; `len > 0`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | flags,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MapError::Mmap { errno: errno() });
        }
        // The mapping holds its own reference to the file.
        drop(fd);
        let Some(base) = NonNull::new(p.cast::<u8>()) else {
            // Only MAP_FIXED can map page 0; never use it regardless.
            // SAFETY: `p` .. `p + len` was mapped just above and nothing refers to it.
            unsafe { libc::munmap(p, len) };
            return Err(MapError::Mmap { errno: libc::EINVAL });
        };
        let mut m = FileMapping { base, len, shrink_sealed, fault: None };
        // On error `m` drops here and unmaps.
        m.fault = Some(fault::register(base.as_ptr(), len).map_err(|_| MapError::FaultTableFull)?);
        // SAFETY: the range is exactly our own mapping; MADV_DONTDUMP only changes dump policy.
        if unsafe { libc::madvise(p, len, libc::MADV_DONTDUMP) } != 0 {
            crate::limited!(warn, "madvise(MADV_DONTDUMP) failed: {}", std::io::Error::last_os_error());
        }
        Ok(m)
    }

    /// Start of the mapping (file offset 0).
    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// Length of the mapping.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// `F_SEAL_SHRINK` was set on the fd when it was mapped.
    pub(crate) fn shrink_sealed(&self) -> bool {
        self.shrink_sealed
    }

    /// `Some(address)` of the first access that found the file's pages gone.
    pub fn faulted(&self) -> Option<usize> {
        self.fault.as_ref().and_then(|f| f.faulted())
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // Unregister first: once unmapped, the addresses may be reused by another mapping.
        drop(self.fault.take());
        // SAFETY: `base`/`len` are exactly what mmap returned/was given; `drop` runs once and
        // the type is not Clone. Its owners hand out pointers into it only under borrows of
        // themselves, so none outlives it.
        if unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) } != 0 {
            log::error!("munmap failed: {}", std::io::Error::last_os_error());
        }
    }
}
