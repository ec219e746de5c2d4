//! The raw image file a block device serves: its size in sectors and the operations of
//! VIRTIO 1.2 §5.2.6 on it.
//!
//! Reads and writes are vectored (`preadv`/`pwritev`) over the host pieces of the guest's
//! data buffers (`virtq::blk::data_pieces`), so data moves between the page cache and guest
//! memory with no copy in between. Writes go to the page cache; `flush` is `fdatasync`, which
//! makes every completed write stable (§5.2.6.2).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtq::blk::SECTOR_SIZE;

/// Largest number of iovecs one `preadv`/`pwritev` takes (Linux `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Bytes of zeroes written per `pwrite` where the file system cannot zero a range itself.
const ZERO_CHUNK: usize = 64 << 10;

/// The source of those writes: static, so a write-zeroes request allocates nothing.
static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// A raw image file.
#[derive(Debug)]
pub struct Image {
    file: File,
    path: PathBuf,
    capacity: u64,
    read_only: bool,
}

impl Image {
    /// Opens `path` (a regular file or a block device) for reading and, unless `read_only`,
    /// writing. Its size, rounded down to whole sectors, is the device's capacity; a tail of
    /// less than a sector is not served.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Image> {
        let mut file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        // `seek` rather than `metadata().len()`: a block device's metadata length is 0.
        let size = file.seek(SeekFrom::End(0))?;
        Ok(Image { file, path: path.to_path_buf(), capacity: size / SECTOR_SIZE, read_only })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the image was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads into `iov` from byte `offset`, all of it or an error (a short read means the
    /// file shrank under the device: `UnexpectedEof`).
    ///
    /// # Safety
    /// Every iovec must describe memory valid for writes of its length for the duration of
    /// the call, which no Rust reference covers (guest memory, written by the kernel).
    pub unsafe fn read_vectored_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<usize> {
        // SAFETY: forwarded from the caller.
        unsafe { self.transfer(iov, offset, false) }
    }

    /// Writes `iov` at byte `offset`, all of it or an error.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for reads of its length for the duration of the
    /// call.
    pub unsafe fn write_vectored_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<usize> {
        // SAFETY: forwarded from the caller.
        unsafe { self.transfer(iov, offset, true) }
    }

    /// `preadv`/`pwritev` until `iov` is done, resuming after partial transfers and `EINTR`.
    ///
    /// # Safety
    /// As [`Image::read_vectored_at`] (reads) or [`Image::write_vectored_at`] (writes).
    unsafe fn transfer(&self, iov: &mut [libc::iovec], mut offset: u64, write: bool) -> io::Result<usize> {
        let fd = self.file.as_raw_fd();
        let mut start = 0;
        let mut done = 0usize;
        while start < iov.len() && iov[start].iov_len == 0 {
            start += 1;
        }
        while start < iov.len() {
            let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            let count = (iov.len() - start).min(IOV_MAX) as libc::c_int;
            let rest = iov[start..].as_ptr();
            let n = if write {
                // SAFETY: `rest` points at `count` iovecs the caller vouches for (readable).
                unsafe { libc::pwritev(fd, rest, count, off) }
            } else {
                // SAFETY: `rest` points at `count` iovecs the caller vouches for (writable).
                unsafe { libc::preadv(fd, rest, count, off) }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "image ends before the request"));
            }
            let mut n = n as usize;
            done += n;
            offset += n as u64;
            while n > 0 {
                let v = &mut iov[start];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    start += 1;
                } else {
                    // Resume inside this piece; the pointer stays inside it.
                    v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                    v.iov_len -= n;
                    n = 0;
                }
            }
            while start < iov.len() && iov[start].iov_len == 0 {
                start += 1;
            }
        }
        Ok(done)
    }

    /// Makes every completed write stable (`fdatasync`).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Discards `len` bytes at `offset`: the range is deallocated (`FALLOC_FL_PUNCH_HOLE`,
    /// size kept). Discard is advisory (§5.2.6.2 "MAY deallocate"): a file system without hole
    /// punching leaves the data as it is.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Err(e) if unsupported(&e) => Ok(()),
            r => r,
        }
    }

    /// Makes `len` bytes at `offset` read as zeroes (§5.2.6.2 "reads of the specified ranges
    /// of sectors MUST return zeroes", with or without unmap). With `unmap` (the driver allows
    /// deallocation, `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`) the range is deallocated: a
    /// punched hole reads as zeroes. Without it the range stays allocated, zeroed in place by
    /// the file system (`FALLOC_FL_ZERO_RANGE`), so that later writes to it cannot fail for
    /// want of space. Where the file system has neither, zeroes are written in chunks of
    /// 64 KiB; the caller bounds `len` (the device's `max_write_zeroes_sectors`).
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            match self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
                Err(e) if unsupported(&e) => {}
                r => return r,
            }
        }
        match self.fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Err(e) if unsupported(&e) => self.write_zeroes_by_hand(offset, len),
            r => r,
        }
    }

    fn write_zeroes_by_hand(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        while offset < end {
            let n = (end - offset).min(ZERO_CHUNK as u64) as usize;
            self.file.write_all_at(&ZEROES[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (off, len) = match (i64::try_from(offset), i64::try_from(len)) {
            (Ok(o), Ok(l)) => (o, l),
            _ => return Err(io::Error::from_raw_os_error(libc::EOVERFLOW)),
        };
        loop {
            // SAFETY: fallocate on our own fd; no memory is passed.
            if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// The file system (or device) does not do this `fallocate` mode.
fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(len: usize) -> (PathBuf, Image) {
        let path = std::env::temp_dir().join(format!("virtq-blk-image-{}-{len}", std::process::id()));
        std::fs::write(&path, (0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>()).unwrap();
        let img = Image::open(&path, false).unwrap();
        (path, img)
    }

    #[test]
    fn vectored_io_resumes_across_pieces_and_zeroes_read_back() {
        let (path, img) = temp(8192 + 100);
        assert_eq!(img.capacity(), 16, "the 100-byte tail is not a sector");
        let mut a = vec![0u8; 700];
        let mut b = vec![0u8; 324];
        let mut iov = [
            libc::iovec { iov_base: a.as_mut_ptr().cast(), iov_len: a.len() },
            libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 },
            libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() },
        ];
        // SAFETY: both buffers live and are not otherwise borrowed during the call.
        assert_eq!(unsafe { img.read_vectored_at(&mut iov, 512) }.unwrap(), 1024);
        assert_eq!(a[0], (512 % 251) as u8);
        assert_eq!(b[323], ((512 + 1023) % 251) as u8);
        img.write_zeroes(1024, 1024, false).unwrap();
        img.write_zeroes(4096, 512, true).unwrap();
        img.discard(6144, 512).unwrap();
        img.flush().unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[1024..2048].iter().all(|&x| x == 0));
        assert!(data[4096..4608].iter().all(|&x| x == 0));
        assert_eq!(data.len(), 8192 + 100, "sizes are kept");
        // Past the end: an error, not a short success.
        let mut c = vec![0u8; 512];
        let mut iov = [libc::iovec { iov_base: c.as_mut_ptr().cast(), iov_len: 512 }];
        // SAFETY: as above.
        assert!(unsafe { img.read_vectored_at(&mut iov, 8192 + 100) }.is_err());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn write_zeroes_stays_allocated_without_unmap_and_the_fallback_writes_bounded_chunks() {
        use std::os::unix::fs::MetadataExt;
        const MIB: u64 = 1 << 20;
        let (path, img) = temp(4 * MIB as usize + 512);
        let blocks = || std::fs::metadata(&path).unwrap().blocks();
        let full = blocks();
        // No unmap: zeroed in place (or written), never deallocated.
        img.write_zeroes(0, MIB, false).unwrap();
        assert!(blocks() >= full, "{} blocks after zeroing, {full} before", blocks());
        // Unmap: a hole where the file system punches them.
        img.write_zeroes(MIB, MIB, true).unwrap();
        let after_unmap = blocks();
        // The fallback, over more than one chunk and a piece of one, between untouched bytes.
        let (at, len) = (2 * MIB + 512, (3 * ZERO_CHUNK + 1024) as u64);
        img.write_zeroes_by_hand(at, len).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[..(2 * MIB) as usize].iter().all(|&x| x == 0));
        let (at, end) = (at as usize, (at + len) as usize);
        assert!(data[at..end].iter().all(|&x| x == 0));
        assert_eq!(data[at - 1], ((at - 1) % 251) as u8);
        assert_eq!(data[end], (end % 251) as u8);
        let punches = !matches!(img.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 3 * MIB, 4096), Err(e) if unsupported(&e));
        if punches {
            assert!(after_unmap + MIB / 512 / 2 <= full, "{after_unmap} blocks after unmap, {full} before");
        }
        assert_eq!(data.len() as u64, 4 * MIB + 512, "sizes are kept");
        std::fs::remove_file(path).unwrap();
    }
}
