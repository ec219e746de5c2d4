//! A guest-side test driver: builds split rings in guest memory exactly as a virtio driver
//! does, so tests, fuzz targets, benches and examples can drive the device side — including
//! with malformed rings and chains no well-behaved driver would build.
//!
//! Enabled by the `testing` feature (and in this crate's own tests). No allocation: it writes
//! through any [`GuestMemory`].

use core::sync::atomic::Ordering;

use zerocopy::IntoBytes;

use crate::desc::{DescFlags, Descriptor, RawDescriptor, DESC_SIZE};
use crate::mem::{load_u16, load_u32, store_u16, GuestMemory};
use crate::queue::QueueConfig;

/// One buffer of a chain to build: its length, direction, and optional contents.
#[derive(Clone, Copy, Debug)]
pub struct Buf<'a> {
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub write: bool,
    /// Contents to store (readable buffers); `None` leaves the memory as it is.
    pub data: Option<&'a [u8]>,
}

impl<'a> Buf<'a> {
    /// A device-readable buffer holding `data`.
    pub fn readable(data: &'a [u8]) -> Self {
        Buf { len: data.len() as u32, write: false, data: Some(data) }
    }

    /// A device-writable buffer of `len` bytes.
    pub fn writable(len: u32) -> Self {
        Buf { len, write: true, data: None }
    }
}

/// The driver side of one split queue in guest memory.
pub struct TestDriver<'m, M: GuestMemory + ?Sized> {
    mem: &'m M,
    cfg: QueueConfig,
    avail_idx: u16,
    next_desc: u16,
    data_base: u64,
    data_len: u64,
    data_next: u64,
}

impl<'m, M: GuestMemory + ?Sized> TestDriver<'m, M> {
    /// Zeroes the rings of `cfg` and prepares to allocate buffers (and indirect tables) from
    /// the guest range `[data_base, data_base + data_len)`.
    pub fn new(mem: &'m M, cfg: QueueConfig, data_base: u64, data_len: u64) -> Self {
        let d = TestDriver { mem, cfg, avail_idx: 0, next_desc: 0, data_base, data_len, data_next: data_base };
        d.fill(cfg.desc_table, cfg.desc_table_len(), 0);
        d.fill(cfg.avail_ring, cfg.avail_ring_len(), 0);
        d.fill(cfg.used_ring, cfg.used_ring_len(), 0);
        d
    }

    /// The queue configuration the driver built.
    pub fn config(&self) -> QueueConfig {
        self.cfg
    }

    /// Writes `bytes` at guest address `gpa` (may span regions). Panics if unmapped: test only.
    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        let mut done = 0;
        while done < bytes.len() {
            let r = self
                .mem
                .translate(gpa + done as u64, (bytes.len() - done) as u64)
                .expect("test driver wrote outside guest memory");
            let n = r.len.min(bytes.len() - done);
            // SAFETY: `r.ptr` is valid for `r.len >= n` bytes (GuestMemory contract).
            unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr().add(done), r.ptr.as_ptr(), n) };
            done += n;
        }
    }

    /// Reads guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) {
        let mut done = 0;
        while done < buf.len() {
            let r = self
                .mem
                .translate(gpa + done as u64, (buf.len() - done) as u64)
                .expect("test driver read outside guest memory");
            let n = r.len.min(buf.len() - done);
            // SAFETY: as in `write`.
            unsafe { core::ptr::copy_nonoverlapping(r.ptr.as_ptr(), buf.as_mut_ptr().add(done), n) };
            done += n;
        }
    }

    fn fill(&self, gpa: u64, len: u64, byte: u8) {
        let chunk = [byte; 64];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(64) as usize;
            self.write(gpa + off, &chunk[..n]);
            off += n as u64;
        }
    }

    fn ptr(&self, gpa: u64, len: u64) -> *mut u8 {
        self.mem.translate_contiguous(gpa, len).expect("ring field outside guest memory").as_ptr()
    }

    /// Writes descriptor `index` of the queue's table.
    pub fn write_desc(&self, index: u16, d: Descriptor) {
        self.write_desc_at(self.cfg.desc_table, index, d);
    }

    /// Writes entry `index` of a descriptor table at `table` (e.g. an indirect table).
    pub fn write_desc_at(&self, table: u64, index: u16, d: Descriptor) {
        self.write(table + index as u64 * DESC_SIZE as u64, RawDescriptor::from(d).as_bytes());
    }

    /// Allocates `len` bytes (16-aligned) from the data area.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let at = self.data_next;
        let end = at + len.max(1);
        assert!(end <= self.data_base + self.data_len, "test driver data area exhausted");
        self.data_next = (end + 15) & !15;
        at
    }

    /// Frees every buffer allocated so far (the caller knows none is in flight).
    pub fn reset_alloc(&mut self) {
        self.data_next = self.data_base;
    }

    /// Puts `head` in the next available-ring slot without publishing it.
    pub fn stage(&mut self, head: u16) {
        let slot = (self.avail_idx & (self.cfg.size - 1)) as u64;
        self.write(self.cfg.avail_ring + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Advances the driver's own available index by `n` without writing anything, as if `n`
    /// chains had been made available and consumed long ago (to test index wrap-around).
    pub fn skip(&mut self, n: u16) {
        self.avail_idx = self.avail_idx.wrapping_add(n);
    }

    /// Publishes every staged head: `avail.idx` store with release (§2.7.13 "memory barrier
    /// before the idx update").
    pub fn kick(&self) {
        self.set_avail_idx(self.avail_idx);
    }

    /// Stages and publishes `head`.
    pub fn publish(&mut self, head: u16) {
        self.stage(head);
        self.kick();
    }

    /// Stores an arbitrary `avail.idx` (for hostile tests). Later `stage` calls continue from
    /// the driver's own count, not from this value.
    pub fn set_avail_idx(&self, idx: u16) {
        let p = self.ptr(self.cfg.avail_ring + 2, 2);
        // SAFETY: `p` is the 2-aligned `avail.idx` field inside guest memory.
        unsafe { store_u16(p, idx, Ordering::Release) };
    }

    /// The driver's own available index.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Sets `avail.flags`.
    pub fn set_avail_flags(&self, flags: u16) {
        self.write(self.cfg.avail_ring, &flags.to_le_bytes());
    }

    /// Sets `used_event` (`avail.ring[size]`).
    pub fn set_used_event(&self, v: u16) {
        self.write(self.cfg.avail_ring + 4 + 2 * self.cfg.size as u64, &v.to_le_bytes());
    }

    /// Reads `used.idx` (acquire).
    pub fn used_idx(&self) -> u16 {
        let p = self.ptr(self.cfg.used_ring + 2, 2);
        // SAFETY: `p` is the 2-aligned `used.idx` field inside guest memory.
        unsafe { load_u16(p, Ordering::Acquire) }
    }

    /// Reads `used.flags`.
    pub fn used_flags(&self) -> u16 {
        let p = self.ptr(self.cfg.used_ring, 2);
        // SAFETY: `p` is the 2-aligned `used.flags` field inside guest memory.
        unsafe { load_u16(p, Ordering::Relaxed) }
    }

    /// Reads `avail_event` (`used.ring[size]`).
    pub fn avail_event(&self) -> u16 {
        let p = self.ptr(self.cfg.used_ring + 4 + 8 * self.cfg.size as u64, 2);
        // SAFETY: `p` is the 2-aligned `avail_event` field inside guest memory.
        unsafe { load_u16(p, Ordering::Relaxed) }
    }

    /// Reads used element `i` (free-running index): `(id, len)`.
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let slot = (i & (self.cfg.size - 1)) as u64;
        let p = self.ptr(self.cfg.used_ring + 4 + 8 * slot, 8);
        // SAFETY: `p` is the 4-aligned used element inside guest memory.
        unsafe { (load_u32(p, Ordering::Relaxed), load_u32(p.add(4), Ordering::Relaxed)) }
    }

    fn next_descs(&mut self, n: u16) -> u16 {
        let first = self.next_desc;
        self.next_desc = ((self.next_desc as u32 + n as u32) % self.cfg.size as u32) as u16;
        first
    }

    /// Builds a chain of direct descriptors (indices allocated round-robin, wrapping) over
    /// freshly allocated buffers, and returns `(head, buffer addresses)` without publishing.
    pub fn build_chain(&mut self, bufs: &[Buf<'_>], addrs: &mut [u64]) -> u16 {
        let n = bufs.len() as u16;
        let first = self.next_descs(n);
        for (i, b) in bufs.iter().enumerate() {
            let idx = ((first as u32 + i as u32) % self.cfg.size as u32) as u16;
            let next = ((idx as u32 + 1) % self.cfg.size as u32) as u16;
            let addr = self.alloc(b.len as u64);
            if let Some(data) = b.data {
                self.write(addr, data);
            }
            if let Some(a) = addrs.get_mut(i) {
                *a = addr;
            }
            let mut flags = DescFlags::empty();
            if b.write {
                flags |= DescFlags::WRITE;
            }
            if i + 1 < bufs.len() {
                flags |= DescFlags::NEXT;
            }
            self.write_desc(idx, Descriptor { addr, len: b.len, flags, next });
        }
        first
    }

    /// Builds and publishes a direct chain; returns the head.
    pub fn add_chain(&mut self, bufs: &[Buf<'_>]) -> u16 {
        let head = self.build_chain(bufs, &mut []);
        self.publish(head);
        head
    }

    /// Builds and publishes a one-descriptor chain referring to an indirect table holding
    /// `bufs`; returns the head.
    pub fn add_indirect_chain(&mut self, bufs: &[Buf<'_>]) -> u16 {
        let head = self.build_indirect_chain(bufs);
        self.publish(head);
        head
    }

    /// Reads descriptor `index` of the queue's table.
    pub fn read_desc(&self, index: u16) -> Descriptor {
        let mut raw = RawDescriptor::default();
        self.read(self.cfg.desc_table + index as u64 * DESC_SIZE as u64, raw.as_mut_bytes());
        Descriptor {
            addr: raw.addr.get(),
            len: raw.len.get(),
            flags: DescFlags::from_bits_retain(raw.flags.get()),
            next: raw.next.get(),
        }
    }

    /// Builds, without publishing, a one-descriptor chain referring to an indirect table
    /// holding `bufs`; returns the head.
    pub fn build_indirect_chain(&mut self, bufs: &[Buf<'_>]) -> u16 {
        let table = self.alloc((bufs.len() * DESC_SIZE) as u64);
        for (i, b) in bufs.iter().enumerate() {
            let addr = self.alloc(b.len as u64);
            if let Some(data) = b.data {
                self.write(addr, data);
            }
            let mut flags = DescFlags::empty();
            if b.write {
                flags |= DescFlags::WRITE;
            }
            if i + 1 < bufs.len() {
                flags |= DescFlags::NEXT;
            }
            self.write_desc_at(table, i as u16, Descriptor { addr, len: b.len, flags, next: i as u16 + 1 });
        }
        let head = self.next_descs(1);
        self.write_desc(
            head,
            Descriptor { addr: table, len: (bufs.len() * DESC_SIZE) as u32, flags: DescFlags::INDIRECT, next: 0 },
        );
        head
    }
}

/// Lays out a queue of `size` at `base` (desc table, then avail ring, then used ring, each
/// aligned as §2.7 requires) and returns its configuration and the first free address after it.
pub fn layout(base: u64, size: u16) -> (QueueConfig, u64) {
    let desc_table = (base + 15) & !15;
    let avail_ring = desc_table + DESC_SIZE as u64 * size as u64;
    let used_ring = (avail_ring + 6 + 2 * size as u64 + 3) & !3;
    let end = used_ring + 6 + 8 * size as u64;
    (QueueConfig { size, desc_table, avail_ring, used_ring }, (end + 15) & !15)
}
