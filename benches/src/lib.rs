//! Device-side split-virtqueue benchmark harness (`ringbench`).
//!
//! Two device implementations (`virtq`, rust-vmm's `virtio-queue`) and a `memcpy` floor run
//! over the *same* guest memory, laid out once by [`layout::build`]. Each batch the
//! [`Driver`] publishes [`layout::BATCH`] pre-built chains by bumping `avail.idx` (one Release
//! store) after re-arming `used_event`; the [`Device`] pops them, copies the payload, completes
//! them and does one notification check.
//!
//! Event-index policy (fixed, documented here): before each batch the driver writes
//! `used_event = U`, where `U` is the used index it last saw (the device has drained everything,
//! so `U` is also the avail index before the bump). This is what Linux's
//! `virtqueue_enable_cb_prepare` does. After the device publishes `U + 32`,
//! `vring_need_event(U, U + 32, U)` is true, so every batch needs exactly one notification and
//! the check is really computed each time. The harness asserts that count at the end.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU16, Ordering};

use vm_memory::{GuestAddress, GuestMemoryMmap};

pub mod layout;
pub mod memcpy_impl;
pub mod packed_impl;
pub mod rustvmm_impl;
pub mod virtq_impl;

pub use layout::{Chain, Seg, BATCH, GPA_BASE, MEM_SIZE, NET_HDR_LEN, QUEUE_SIZE};

/// VIRTIO_F_INDIRECT_DESC (bit 28).
pub const VIRTIO_F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_F_EVENT_IDX (bit 29).
pub const VIRTIO_F_EVENT_IDX: u64 = 1 << 29;
/// VIRTIO_F_VERSION_1 (bit 32).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Features negotiated in every scenario.
pub const FEATURES: u64 = VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX | VIRTIO_F_VERSION_1;

/// Size of the device-local frame buffer (TX destination, RX source).
pub const FRAME_BUF: usize = 2048;

/// Chain shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// One descriptor of `size` bytes; 256 chains, avail slot i → head i.
    OneDesc,
    /// 12-byte header descriptor + `size`-byte data descriptor (NEXT); 128 chains,
    /// avail slot i → head 2·(i mod 128).
    TwoDesc,
    /// Head with F_INDIRECT → 4-entry table: 12-byte header + `size` split in 3 pieces.
    Indirect4,
}

impl Shape {
    /// Command-line / report name.
    pub fn name(self) -> &'static str {
        match self {
            Shape::OneDesc => "1desc",
            Shape::TwoDesc => "2desc",
            Shape::Indirect4 => "indirect4",
        }
    }
}

/// Direction, from the device's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// All descriptors device-readable; the device reads every byte, used len 0.
    Tx,
    /// All descriptors device-writable; the device fills every byte, used len = bytes written.
    Rx,
}

impl Dir {
    /// Command-line / report name.
    pub fn name(self) -> &'static str {
        match self {
            Dir::Tx => "tx",
            Dir::Rx => "rx",
        }
    }
}

/// Everything a device needs to attach to the queue. All addresses are guest physical.
///
/// The region `[gpa_base, gpa_base + mem_size)` is mapped at host address `host_base` and stays
/// mapped (and at the same address) for as long as the `Setup` lives. The harness itself only
/// touches guest memory through raw pointers (never long-lived references): `avail.idx` and
/// `used_event` are written with atomic stores between `run_batch` calls, and the used ring and
/// RX buffers are read back after the last batch for verification.
#[derive(Debug)]
pub struct Setup {
    /// Host address of guest physical address `gpa_base`.
    pub host_base: *mut u8,
    /// Guest physical address of the region base (0x1_0000).
    pub gpa_base: u64,
    /// Region length in bytes (4 MiB).
    pub mem_size: usize,
    /// Descriptor table (16-byte aligned; here 4 KiB aligned).
    pub desc_table: u64,
    /// Avail ring: flags, idx, ring\[queue_size\], used_event.
    pub avail_ring: u64,
    /// Used ring: flags, idx, ring\[queue_size\], avail_event.
    pub used_ring: u64,
    /// Negotiated queue size (256).
    pub queue_size: u16,
    /// Negotiated feature bits ([`FEATURES`]: INDIRECT_DESC | EVENT_IDX | VERSION_1).
    pub features: u64,
    /// Chain shape (informational: a device must discover chains from the rings).
    pub shape: Shape,
    /// Payload size (informational).
    pub size: usize,
    /// Direction: TX = read all readable bytes, RX = fill all writable bytes.
    pub dir: Dir,
    /// Total buffer bytes of every chain (`size`, or `size + 12` with a header descriptor).
    /// For RX this is how many bytes of the frame ([`rx_frame`]) the device writes per chain.
    pub chain_len: usize,
}

/// Frame the RX device writes into every chain (its first `Setup::chain_len` bytes).
pub fn rx_frame() -> [u8; FRAME_BUF] {
    let mut f = [0u8; FRAME_BUF];
    for (i, b) in f.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(13).wrapping_add(5) ^ (i >> 8) as u8;
    }
    f
}

/// A device-side implementation under test. See `virtq_impl.rs` for the full contract.
pub trait Device {
    /// Pop exactly `batch` chains (the driver has just made exactly that many available),
    /// copy their payload (TX: into a local [`FRAME_BUF`] buffer; RX: the first `chain_len`
    /// bytes of [`rx_frame`] into the chain), add one used entry per chain (TX len 0, RX len =
    /// bytes written), publish the used index, and do one EVENT_IDX notification check.
    /// Returns whether the driver must be notified.
    fn run_batch(&mut self, batch: u16) -> bool;

    /// The bytes read from the most recently processed TX chain (empty for RX). Called once,
    /// after the run, for verification.
    fn tx_frame(&self) -> &[u8];

    /// RX: bytes at the start of every chain that are the device's own (a virtio-net header),
    /// not `rx_frame()`'s; verification skips them.
    fn header_len(&self) -> usize {
        0
    }

    /// Checks what the device wrote to its ring beyond what [`Workload::verify`] reads (the
    /// packed ring's used descriptors). Called once, after the run.
    fn check_ring(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Guest memory plus the queue/chain layout of one scenario.
pub struct Workload {
    /// The guest memory (one anonymous mmap region).
    pub mem: GuestMemoryMmap,
    /// Device-facing description of the queue.
    pub setup: Setup,
    /// Ground truth per avail ring slot.
    pub chains: Vec<Chain>,
}

impl Workload {
    /// Maps the memory and lays out the queue and chains.
    pub fn new(shape: Shape, size: usize, dir: Dir) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(GPA_BASE), MEM_SIZE)]).expect("mmap guest memory");
        let (setup, chains) = layout::build(&mem, shape, size, dir);
        Workload { mem, setup, chains }
    }

    fn host_ptr(&self, gpa: u64, len: usize) -> *mut u8 {
        let off = (gpa - self.setup.gpa_base) as usize;
        assert!(off + len <= self.setup.mem_size);
        // SAFETY: bounds checked above; the pointer stays inside the mapping.
        unsafe { self.setup.host_base.add(off) }
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        let p = self.host_ptr(gpa, 2) as *const AtomicU16;
        // SAFETY: in bounds and 2-byte aligned (all ring fields are); the mapping outlives
        // `self`; guest memory is only ever accessed through raw pointers or atomics.
        u16::from_le(unsafe { (*p).load(Ordering::Acquire) })
    }

    fn read_bytes(&self, gpa: u64, len: usize) -> Vec<u8> {
        let p = self.host_ptr(gpa, len);
        let mut v = vec![0u8; len];
        // SAFETY: `p..p+len` is inside the mapping; `v` is a fresh allocation.
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) };
        v
    }

    /// Creates the driver for this workload.
    pub fn driver(&self) -> Driver<'_> {
        let q = u64::from(self.setup.queue_size);
        Driver {
            avail_idx: self.host_ptr(self.setup.avail_ring + 2, 2) as *const AtomicU16,
            used_event: self.host_ptr(self.setup.avail_ring + 4 + 2 * q, 2) as *const AtomicU16,
            next: 0,
            _mem: PhantomData,
        }
    }

    /// Checks, after `total` chains were processed: the used index and the last
    /// `min(total, queue_size)` used entries (if `check_used`), the bytes of the last TX chain,
    /// and the RX buffers of the chains of the last batch.
    pub fn verify(&self, dev: &dyn Device, total: u64, check_used: bool) -> Result<(), String> {
        let q = u64::from(self.setup.queue_size);
        let used_len = match self.setup.dir {
            Dir::Tx => 0,
            Dir::Rx => self.setup.chain_len as u32,
        };
        if check_used {
            let idx = self.read_u16(self.setup.used_ring + 2);
            if idx != total as u16 {
                return Err(format!("used.idx = {idx}, expected {}", total as u16));
            }
            for c in total.saturating_sub(q)..total {
                let e = self.read_bytes(self.setup.used_ring + 4 + 8 * (c % q), 8);
                let id = u32::from_le_bytes(e[0..4].try_into().unwrap());
                let len = u32::from_le_bytes(e[4..8].try_into().unwrap());
                let want = u32::from(self.chains[(c % q) as usize].head);
                if id != want || len != used_len {
                    return Err(format!(
                        "used entry of chain #{c}: id {id} len {len}, expected id {want} len {used_len}"
                    ));
                }
            }
        }
        if total == 0 {
            return Ok(());
        }
        match self.setup.dir {
            Dir::Tx => {
                let last = &self.chains[((total - 1) % q) as usize];
                let want: Vec<u8> = last.segs.iter().flat_map(|s| self.read_bytes(s.gpa, s.len as usize)).collect();
                if dev.tx_frame() != want.as_slice() {
                    return Err(format!(
                        "TX frame of the last chain differs ({} bytes read, {} expected)",
                        dev.tx_frame().len(),
                        want.len()
                    ));
                }
            }
            Dir::Rx => {
                let frame = rx_frame();
                let skip = dev.header_len();
                for c in total.saturating_sub(u64::from(BATCH))..total {
                    let mut off = 0usize;
                    for s in &self.chains[(c % q) as usize].segs {
                        let got = self.read_bytes(s.gpa, s.len as usize);
                        let from = skip.saturating_sub(off).min(got.len());
                        if got[from..] != frame[off + from..off + s.len as usize] {
                            return Err(format!("RX buffer {:#x} of chain #{c} differs", s.gpa));
                        }
                        off += s.len as usize;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The guest driver's per-batch work: re-arm `used_event`, then publish `n` more chains.
pub struct Driver<'a> {
    avail_idx: *const AtomicU16,
    used_event: *const AtomicU16,
    next: u16,
    /// The pointers point into the workload's mapping.
    _mem: PhantomData<&'a Workload>,
}

impl Driver<'_> {
    /// Sets `used_event` to the used index last seen (= avail index before the bump, as the
    /// device drains every batch), then advances `avail.idx` by `n` with one Release store.
    #[inline]
    pub fn publish(&mut self, n: u16) {
        // SAFETY: `used_event` points at a 2-byte aligned u16 inside the mapping, which
        // outlives the driver (`'a` borrows the `Workload`); guest memory is only accessed
        // through atomics or raw pointers, never through references.
        unsafe { (*self.used_event).store(self.next.to_le(), Ordering::Relaxed) };
        self.next = self.next.wrapping_add(n);
        // SAFETY: as above, for `avail.idx`.
        unsafe { (*self.avail_idx).store(self.next.to_le(), Ordering::Release) };
    }
}

/// Which implementation to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    /// Our core (`virtq_impl.rs`).
    Virtq,
    /// Our core with write tracking into a vhost-user dirty log (every used-ring and buffer
    /// write marked), as while a VM migrates.
    VirtqLog,
    /// The core's virtio-net path as virtq-net runs it (`net::receive_burst`,
    /// `net::parse_tx_copied`).
    VirtqNet,
    /// [`Impl::VirtqNet`] with a dirty log (`net::receive_burst_logged`).
    VirtqNetLog,
    /// rust-vmm `virtio-queue` 0.18 (`rustvmm_impl.rs`).
    RustVmm,
    /// Copies only (`memcpy_impl.rs`).
    Memcpy,
    /// Our core on the packed ring (`packed_impl.rs`), same buffers and chains.
    VirtqPacked,
}

impl Impl {
    /// Whether the device writes the split used ring that [`Workload::verify`] checks.
    pub fn writes_split_used_ring(self) -> bool {
        !matches!(self, Impl::Memcpy | Impl::VirtqPacked)
    }
}

impl Impl {
    /// Instantiates the device for `w`.
    pub fn device<'a>(self, w: &'a Workload) -> Box<dyn Device + 'a> {
        match self {
            Impl::Virtq => Box::new(virtq_impl::VirtqDevice::new(&w.setup)),
            Impl::VirtqLog => Box::new(virtq_impl::VirtqLogDevice::new(&w.setup)),
            Impl::VirtqNet => Box::new(virtq_impl::VirtqNetDevice::new(&w.setup, false)),
            Impl::VirtqNetLog => Box::new(virtq_impl::VirtqNetDevice::new(&w.setup, true)),
            Impl::RustVmm => Box::new(rustvmm_impl::RustVmmDevice::new(&w.mem, &w.setup)),
            Impl::Memcpy => Box::new(memcpy_impl::MemcpyDevice::new(&w.setup, &w.chains)),
            Impl::VirtqPacked => Box::new(packed_impl::VirtqPackedDevice::new(&w.setup, &w.chains)),
        }
    }
}

/// Runs `batches` batches; returns the number of batches that asked for a notification.
#[inline(never)]
pub fn run(driver: &mut Driver, dev: &mut dyn Device, batches: u64) -> u64 {
    let mut notifications = 0u64;
    for _ in 0..batches {
        driver.publish(BATCH);
        notifications += u64::from(std::hint::black_box(dev.run_batch(BATCH)));
    }
    notifications
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(imp: Impl, shape: Shape, size: usize, dir: Dir) {
        let w = Workload::new(shape, size, dir);
        let mut driver = w.driver();
        let mut dev = imp.device(&w);
        // 20 batches = 640 chains: wraps the 256-entry rings twice.
        let n = run(&mut driver, dev.as_mut(), 20);
        assert_eq!(n, 20, "{imp:?} {shape:?} {size} {dir:?}: notifications");
        w.verify(dev.as_ref(), 20 * u64::from(BATCH), imp.writes_split_used_ring())
            .and_then(|()| dev.check_ring())
            .unwrap_or_else(|e| panic!("{imp:?} {shape:?} {size} {dir:?}: {e}"));
    }

    #[test]
    fn every_impl_all_scenarios() {
        for imp in [
            Impl::Virtq,
            Impl::VirtqLog,
            Impl::VirtqNet,
            Impl::VirtqNetLog,
            Impl::RustVmm,
            Impl::Memcpy,
            Impl::VirtqPacked,
        ] {
            for shape in [Shape::OneDesc, Shape::TwoDesc, Shape::Indirect4] {
                for size in [64, 1500] {
                    for dir in [Dir::Tx, Dir::Rx] {
                        check(imp, shape, size, dir);
                    }
                }
            }
        }
    }

    #[test]
    fn verify_catches_a_device_that_skips_the_used_ring() {
        // The memcpy floor does not complete chains: checking its used ring must fail.
        let w = Workload::new(Shape::TwoDesc, 64, Dir::Rx);
        let mut driver = w.driver();
        let mut dev = Impl::Memcpy.device(&w);
        run(&mut driver, dev.as_mut(), 3);
        assert!(w.verify(dev.as_ref(), 3 * u64::from(BATCH), true).is_err());
        // ... and claiming more chains than were written must fail for RX data too.
        assert!(w.verify(dev.as_ref(), 4 * u64::from(BATCH), false).is_err());
    }

    #[test]
    fn used_event_is_rearmed_each_batch() {
        let w = Workload::new(Shape::OneDesc, 64, Dir::Tx);
        let mut d = w.driver();
        d.publish(BATCH);
        d.publish(BATCH);
        let q = u64::from(QUEUE_SIZE);
        assert_eq!(w.read_u16(w.setup.avail_ring + 2), 2 * BATCH);
        assert_eq!(w.read_u16(w.setup.avail_ring + 4 + 2 * q), BATCH);
    }
}
