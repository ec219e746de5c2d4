//! Guest-side test drivers: build split rings ([`TestDriver`]) and packed rings
//! ([`PackedDriver`]) in guest memory exactly as a virtio driver does, so tests, fuzz targets, benches and examples can drive the device side — including
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
        guest_write(self.mem, gpa, bytes)
    }

    /// Reads guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) {
        guest_read(self.mem, gpa, buf)
    }

    fn fill(&self, gpa: u64, len: u64, byte: u8) {
        guest_fill(self.mem, gpa, len, byte)
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

/// Largest packed queue [`PackedDriver`] drives (its per-id table of chain lengths).
pub const PACKED_DRIVER_IDS: usize = 1024;

/// A packed-ring descriptor as a driver writes it (§2.8.13); `flags` holds every bit, the
/// AVAIL/USED pair included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedDesc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Buffer id.
    pub id: u16,
    /// Flags, AVAIL/USED included.
    pub flags: u16,
}

/// The driver side of one packed queue in guest memory (§2.8.21 "Driver Requirements"): it
/// makes chains available with the head's flags stored last (release), reads used
/// descriptors, and writes the driver event suppression structure. Hostile tests write raw
/// descriptors with [`write_desc`](Self::write_desc).
pub struct PackedDriver<'m, M: GuestMemory + ?Sized> {
    mem: &'m M,
    cfg: QueueConfig,
    /// Where the next descriptor goes, with the driver-ring wrap counter.
    next: crate::packed::RingPosition,
    /// Where the next used descriptor is expected, with the device-ring wrap counter.
    used: crate::packed::RingPosition,
    next_id: u16,
    descs: [u16; PACKED_DRIVER_IDS],
    data_base: u64,
    data_len: u64,
    data_next: u64,
}

impl<'m, M: GuestMemory + ?Sized> PackedDriver<'m, M> {
    /// Zeroes the ring and both event suppression structures of `cfg` (laid out as
    /// [`packed_layout`] does) and allocates buffers from `[data_base, data_base + data_len)`.
    pub fn new(mem: &'m M, cfg: QueueConfig, data_base: u64, data_len: u64) -> Self {
        assert!(cfg.size as usize <= PACKED_DRIVER_IDS, "queue too large for the test driver");
        let d = PackedDriver {
            mem,
            cfg,
            next: crate::packed::RingPosition::START,
            used: crate::packed::RingPosition::START,
            next_id: 0,
            descs: [0; PACKED_DRIVER_IDS],
            data_base,
            data_len,
            data_next: data_base,
        };
        guest_fill(mem, cfg.desc_table, DESC_SIZE as u64 * cfg.size as u64, 0);
        guest_fill(mem, cfg.avail_ring, 4, 0);
        guest_fill(mem, cfg.used_ring, 4, 0);
        d
    }

    /// The queue configuration the driver built.
    pub fn config(&self) -> QueueConfig {
        self.cfg
    }

    /// Writes `bytes` at guest address `gpa`.
    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        guest_write(self.mem, gpa, bytes)
    }

    /// Reads guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) {
        guest_read(self.mem, gpa, buf)
    }

    /// Allocates `len` bytes (16-aligned) from the data area.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let at = self.data_next;
        let end = at + len.max(1);
        assert!(end <= self.data_base + self.data_len, "test driver data area exhausted");
        self.data_next = (end + 15) & !15;
        at
    }

    /// Frees every buffer allocated so far.
    pub fn reset_alloc(&mut self) {
        self.data_next = self.data_base;
    }

    /// The flags bits that make a descriptor available in the round of wrap counter `wrap`
    /// (§2.8.1: AVAIL = wrap, USED = !wrap).
    pub fn avail_bits(wrap: bool) -> u16 {
        if wrap {
            crate::packed::VIRTQ_DESC_F_AVAIL
        } else {
            crate::packed::VIRTQ_DESC_F_USED
        }
    }

    fn desc_ptr(&self, slot: u16) -> *mut u8 {
        self.mem
            .translate_contiguous(self.cfg.desc_table + slot as u64 * DESC_SIZE as u64, DESC_SIZE as u64)
            .expect("ring outside guest memory")
            .as_ptr()
    }

    /// Writes descriptor `slot` of the ring: body first, then `flags` with release (what
    /// makes a descriptor available, §2.8.21.1).
    pub fn write_desc(&self, slot: u16, d: PackedDesc) {
        let p = self.desc_ptr(slot);
        self.write(self.cfg.desc_table + slot as u64 * DESC_SIZE as u64, &d.addr.to_le_bytes());
        self.write(self.cfg.desc_table + slot as u64 * DESC_SIZE as u64 + 8, &d.len.to_le_bytes());
        self.write(self.cfg.desc_table + slot as u64 * DESC_SIZE as u64 + 12, &d.id.to_le_bytes());
        // SAFETY: `p + 14` is the 2-aligned `flags` field of a descriptor in guest memory.
        unsafe { store_u16(p.add(14), d.flags, Ordering::Release) };
    }

    /// Reads descriptor `slot` of the ring.
    pub fn read_desc(&self, slot: u16) -> PackedDesc {
        let mut b = [0u8; DESC_SIZE];
        self.read(self.cfg.desc_table + slot as u64 * DESC_SIZE as u64, &mut b);
        PackedDesc {
            addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            id: u16::from_le_bytes([b[12], b[13]]),
            flags: u16::from_le_bytes([b[14], b[15]]),
        }
    }

    /// Where the driver will put its next descriptor.
    pub fn next_position(&self) -> crate::packed::RingPosition {
        self.next
    }

    /// Where the driver expects the next used descriptor.
    pub fn used_position(&self) -> crate::packed::RingPosition {
        self.used
    }

    /// Moves the driver's position on by `n` slots without writing anything (the descriptors
    /// there keep whatever they hold): for hostile tests that wrote them by hand.
    pub fn skip(&mut self, n: u16) {
        for _ in 0..n {
            self.next = advance(self.next, self.cfg.size);
        }
    }

    /// Allocates the next buffer id (round robin over the queue size).
    pub fn next_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = (self.next_id + 1) % self.cfg.size;
        id
    }

    /// Makes a chain of direct descriptors over fresh buffers available with buffer id `id`:
    /// every descriptor but the first, then the first's flags (release). Returns `id`.
    pub fn add_chain_with_id(&mut self, bufs: &[Buf<'_>], id: u16) -> u16 {
        let head = self.next;
        let mut head_flags = 0;
        for (i, b) in bufs.iter().enumerate() {
            let addr = self.alloc(b.len as u64);
            if let Some(data) = b.data {
                self.write(addr, data);
            }
            let mut flags = Self::avail_bits(self.next.wrap);
            if b.write {
                flags |= DescFlags::WRITE.bits();
            }
            if i + 1 < bufs.len() {
                flags |= DescFlags::NEXT.bits();
            }
            let d = PackedDesc { addr, len: b.len, id, flags };
            if i == 0 {
                // The head becomes available last (§2.8.21.1).
                self.write_desc(self.next.index, PackedDesc { flags: !flags & 0x8080, ..d });
                head_flags = flags;
            } else {
                self.write_desc(self.next.index, d);
            }
            self.next = advance(self.next, self.cfg.size);
        }
        if let Some(n) = self.descs.get_mut(id as usize) {
            *n = bufs.len() as u16;
        }
        let mut first = self.read_desc(head.index);
        first.flags = head_flags;
        self.write_desc(head.index, first);
        id
    }

    /// [`add_chain_with_id`](Self::add_chain_with_id) with the next id.
    pub fn add_chain(&mut self, bufs: &[Buf<'_>]) -> u16 {
        let id = self.next_id();
        self.add_chain_with_id(bufs, id)
    }

    /// Makes available one descriptor referring to an indirect table holding `bufs`
    /// (§2.8.7: consecutive entries, only WRITE set). Returns the buffer id.
    pub fn add_indirect_chain(&mut self, bufs: &[Buf<'_>]) -> u16 {
        let table = self.alloc((bufs.len() * DESC_SIZE) as u64);
        for (i, b) in bufs.iter().enumerate() {
            let addr = self.alloc(b.len as u64);
            if let Some(data) = b.data {
                self.write(addr, data);
            }
            let flags = if b.write { DescFlags::WRITE.bits() } else { 0 };
            let mut raw = [0u8; DESC_SIZE];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&b.len.to_le_bytes());
            raw[14..].copy_from_slice(&flags.to_le_bytes());
            self.write(table + (i * DESC_SIZE) as u64, &raw);
        }
        let id = self.next_id();
        let flags = Self::avail_bits(self.next.wrap) | DescFlags::INDIRECT.bits();
        self.write_desc(self.next.index, PackedDesc { addr: table, len: (bufs.len() * DESC_SIZE) as u32, id, flags });
        self.next = advance(self.next, self.cfg.size);
        if let Some(n) = self.descs.get_mut(id as usize) {
            *n = 1;
        }
        id
    }

    /// Records that buffer `id`'s chain takes `descs` descriptors (for chains written by hand
    /// with [`write_desc`](Self::write_desc)), so that [`pop_used`](Self::pop_used) skips
    /// them.
    pub fn set_chain_len(&mut self, id: u16, descs: u16) {
        self.descs[id as usize] = descs;
    }

    /// Takes the next used descriptor, if the device wrote one (§2.8.1: AVAIL = USED = the
    /// device-ring wrap counter), and moves past its buffer's descriptors: `(id, len)`.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let p = self.desc_ptr(self.used.index);
        // SAFETY: `p + 14` is the 2-aligned `flags` field of a descriptor in guest memory.
        let flags = unsafe { load_u16(p.add(14), Ordering::Acquire) };
        let used = (flags & crate::packed::VIRTQ_DESC_F_USED != 0) == self.used.wrap
            && (flags & crate::packed::VIRTQ_DESC_F_AVAIL != 0) == self.used.wrap;
        if !used {
            return None;
        }
        let d = self.read_desc(self.used.index);
        let n = self.descs.get(d.id as usize).copied().unwrap_or(1).max(1);
        for _ in 0..n {
            self.used = advance(self.used, self.cfg.size);
        }
        Some((d.id, d.len))
    }

    /// Writes the driver event suppression structure (§2.8.10): `desc` (offset | wrap << 15)
    /// and `flags`.
    pub fn set_driver_event(&self, off_wrap: u16, flags: u16) {
        self.write(self.cfg.avail_ring, &off_wrap.to_le_bytes());
        self.write(self.cfg.avail_ring + 2, &flags.to_le_bytes());
    }

    /// Reads the device event suppression structure: `(desc, flags)`.
    pub fn device_event(&self) -> (u16, u16) {
        let mut b = [0u8; 4];
        self.read(self.cfg.used_ring, &mut b);
        (u16::from_le_bytes([b[0], b[1]]), u16::from_le_bytes([b[2], b[3]]))
    }
}

fn advance(p: crate::packed::RingPosition, size: u16) -> crate::packed::RingPosition {
    if p.index + 1 == size {
        crate::packed::RingPosition { index: 0, wrap: !p.wrap }
    } else {
        crate::packed::RingPosition { index: p.index + 1, wrap: p.wrap }
    }
}

/// Lays out a packed queue of `size` at `base`: the descriptor ring (16-aligned), the driver
/// area and the device area (4-aligned, 4 bytes each); returns the configuration and the first
/// free address after it.
pub fn packed_layout(base: u64, size: u16) -> (QueueConfig, u64) {
    let desc_table = (base + 15) & !15;
    let avail_ring = desc_table + DESC_SIZE as u64 * size as u64;
    let used_ring = avail_ring + 4;
    (QueueConfig { size, desc_table, avail_ring, used_ring }, (used_ring + 4 + 15) & !15)
}

fn guest_write<M: GuestMemory + ?Sized>(mem: &M, gpa: u64, bytes: &[u8]) {
    let mut done = 0;
    while done < bytes.len() {
        let r = mem
            .translate(gpa + done as u64, (bytes.len() - done) as u64)
            .expect("test driver wrote outside guest memory");
        let n = r.len.min(bytes.len() - done);
        // SAFETY: `r.ptr` is valid for `r.len >= n` bytes (GuestMemory contract).
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr().add(done), r.ptr.as_ptr(), n) };
        done += n;
    }
}

fn guest_read<M: GuestMemory + ?Sized>(mem: &M, gpa: u64, buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        let r =
            mem.translate(gpa + done as u64, (buf.len() - done) as u64).expect("test driver read outside guest memory");
        let n = r.len.min(buf.len() - done);
        // SAFETY: as in `guest_write`.
        unsafe { core::ptr::copy_nonoverlapping(r.ptr.as_ptr(), buf.as_mut_ptr().add(done), n) };
        done += n;
    }
}

fn guest_fill<M: GuestMemory + ?Sized>(mem: &M, gpa: u64, len: u64, byte: u8) {
    let chunk = [byte; 64];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(64) as usize;
        guest_write(mem, gpa + off, &chunk[..n]);
        off += n as u64;
    }
}
