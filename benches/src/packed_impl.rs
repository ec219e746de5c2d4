//! `--impl virtq-packed`: the core's `PackedQueue` (VIRTIO 1.2 §2.8) over the same buffers and
//! chains as the split scenarios, so the two layouts compare chain for chain.
//!
//! At set-up the descriptor table the split layout wrote is rewritten in place as a packed
//! descriptor ring (the chain of split head `h` occupies ring slots `h..h + n`, its buffer id
//! is `h`; an indirect table's entries get the packed layout too), the driver area asks for
//! `DESC` notifications (EVENT_IDX) and the split driver's fields are left alone.
//!
//! Each `run_batch` does the packed driver's work first, as a driver has to in this layout:
//! for each of the 32 chains, make its descriptors available again (the device overwrote the
//! first with a used descriptor: `len`, `id`, then the flags with release, the head's last),
//! and re-arm the driver area's event offset at the device's used position (as Linux's
//! `virtqueue_enable_cb_prepare_packed` does), so every batch needs one notification. That
//! driver work is part of the instructions counted (a split driver's is two stores per
//! batch). Then the device pops, copies and completes the 32 chains and publishes once, as
//! `VirtqDevice` does on the split ring.

use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};

use virtq::packed::{PackedQueue, RING_EVENT_FLAGS_DESC, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED};
use virtq::{QueueConfig, Region, RegionTable, VirtioFeatures};

use crate::layout::{Chain, QUEUE_SIZE, VIRTQ_DESC_F_INDIRECT};
use crate::{rx_frame, Device, Dir, Setup, FRAME_BUF};

/// Driver area (`struct pvirtq_event_suppress`, 4 bytes) and device area: inside the split
/// used ring's page, past its 2054 bytes, so neither layout's fields overlap.
const DRIVER_AREA_OFF: u64 = 0x2c00;
const DEVICE_AREA_OFF: u64 = 0x2c10;

/// One ring slot as the driver makes it available: `len` and the flags without AVAIL/USED.
#[derive(Clone, Copy)]
struct SlotInit {
    len: u32,
    flags: u16,
}

/// Device side on the packed ring, plus the driver's per-batch work (see the module docs).
pub struct VirtqPackedDevice<'a> {
    queue: PackedQueue<'a, RegionTable<1>, { QUEUE_SIZE as usize }>,
    dir: Dir,
    chain_len: usize,
    rx: [u8; FRAME_BUF],
    tx: [u8; FRAME_BUF],
    tx_len: usize,
    // Driver state.
    ring: *mut u8,
    driver_area: *mut u8,
    slots: Vec<SlotInit>,
    /// Descriptors per chain (1 or 2) and chains per ring round.
    descs: u16,
    /// The driver's next slot and wrap counter.
    next: u16,
    wrap: bool,
    /// Chains in the last batch (for `check_ring`, which walks back from `next`).
    last_batch: u16,
}

impl<'a> VirtqPackedDevice<'a> {
    /// Rewrites the split layout of `setup` as a packed ring and attaches to it.
    pub fn new(setup: &'a Setup, chains: &[Chain]) -> Self {
        let host = NonNull::new(setup.host_base).expect("mapping is non-null");
        let at = |gpa: u64| -> *mut u8 {
            let off = (gpa - setup.gpa_base) as usize;
            assert!(off + 16 <= setup.mem_size);
            // SAFETY: inside the mapping (checked above).
            unsafe { setup.host_base.add(off) }
        };
        let q = setup.queue_size;
        let descs = if chains.iter().any(|c| c.segs.len() == 2) { 2 } else { 1 };
        // Read each slot's split descriptor (len, flags) and rewrite it: id = head, flags in
        // the upper half; the AVAIL/USED bits are set when the driver makes it available.
        let mut slots = Vec::with_capacity(q as usize);
        for slot in 0..q {
            let p = at(setup.desc_table + 16 * u64::from(slot));
            // SAFETY: 16 bytes of the descriptor table inside the mapping; nothing else runs.
            unsafe {
                let len = u32::from_le(p.add(8).cast::<u32>().read());
                let flags = u16::from_le(p.add(12).cast::<u16>().read());
                let head = slot - slot % descs;
                p.add(12).cast::<u16>().write(head.to_le());
                p.add(14).cast::<u16>().write(0);
                slots.push(SlotInit { len, flags });
                if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                    let table = u64::from_le(p.cast::<u64>().read());
                    for e in 0..(len / 16) as usize {
                        let t = at(table + 16 * e as u64);
                        let f = u16::from_le(t.add(12).cast::<u16>().read()) & 2;
                        t.add(12).cast::<u16>().write(0);
                        t.add(14).cast::<u16>().write(f.to_le());
                    }
                }
            }
        }
        let mut table = RegionTable::new();
        // SAFETY: the harness keeps the mapping valid for 'a and touches it only through raw
        // pointers.
        table.add(unsafe { Region::new(setup.gpa_base, host, setup.mem_size as u64) }).expect("one region");
        let table: &'a RegionTable<1> = Box::leak(Box::new(table));
        let cfg = QueueConfig {
            size: q,
            desc_table: setup.desc_table,
            avail_ring: setup.gpa_base + DRIVER_AREA_OFF,
            used_ring: setup.gpa_base + DEVICE_AREA_OFF,
        };
        let features = VirtioFeatures::from_bits_retain(setup.features);
        let queue = PackedQueue::new(table, cfg, features).expect("valid packed queue");
        let driver_area = at(cfg.avail_ring);
        // SAFETY: the driver area's `flags`, 2-aligned, inside the mapping.
        unsafe {
            AtomicU16::from_ptr(driver_area.add(2).cast()).store(RING_EVENT_FLAGS_DESC.to_le(), Ordering::Relaxed)
        };
        VirtqPackedDevice {
            queue,
            dir: setup.dir,
            chain_len: setup.chain_len,
            rx: rx_frame(),
            tx: [0; FRAME_BUF],
            tx_len: 0,
            ring: at(setup.desc_table),
            driver_area,
            slots,
            descs,
            next: 0,
            wrap: true,
            last_batch: 0,
        }
    }

    /// The driver: re-arms the used-event offset at the next used position, then makes the
    /// next `batch` chains available, each chain's head last.
    #[inline(always)]
    fn driver_publish(&mut self, batch: u16) {
        let q = QUEUE_SIZE;
        let used = self.next | (self.wrap as u16) << 15;
        // SAFETY: the driver area's `desc`, 2-aligned, inside the mapping.
        unsafe { AtomicU16::from_ptr(self.driver_area.cast()).store(used.to_le(), Ordering::Relaxed) };
        self.last_batch = batch;
        for _ in 0..batch {
            let head = self.next;
            let avail = if self.wrap { VIRTQ_DESC_F_AVAIL } else { VIRTQ_DESC_F_USED };
            // SAFETY (all stores): slots `head..head + descs` of the ring inside the mapping,
            // at their fields' alignments, accessed only atomically while the device runs.
            unsafe {
                for s in 1..self.descs {
                    let d = self.ring.add(16 * usize::from(head + s));
                    let flags = self.slots[usize::from(head + s)].flags | avail;
                    AtomicU16::from_ptr(d.add(14).cast()).store(flags.to_le(), Ordering::Release);
                }
                let d = self.ring.add(16 * usize::from(head));
                let init = self.slots[usize::from(head)];
                AtomicU32::from_ptr(d.add(8).cast()).store(init.len.to_le(), Ordering::Relaxed);
                AtomicU16::from_ptr(d.add(12).cast()).store(head.to_le(), Ordering::Relaxed);
                AtomicU16::from_ptr(d.add(14).cast()).store((init.flags | avail).to_le(), Ordering::Release);
            }
            self.next += self.descs;
            if self.next == q {
                self.next = 0;
                self.wrap = !self.wrap;
            }
        }
    }
}

impl Device for VirtqPackedDevice<'_> {
    fn run_batch(&mut self, batch: u16) -> bool {
        self.driver_publish(batch);
        for _ in 0..batch {
            match self.dir {
                Dir::Tx => {
                    let c = self.queue.pop_read(&mut self.tx).expect("well-formed chain").expect("a full batch");
                    self.tx_len = c.bytes as usize;
                    black_box(&self.tx[..self.tx_len]);
                    self.queue.push(c.head, 0);
                }
                Dir::Rx => {
                    let c = self
                        .queue
                        .pop_write(&self.rx[..self.chain_len])
                        .expect("well-formed chain")
                        .expect("a full batch");
                    self.queue.push(c.head, c.bytes);
                }
            }
        }
        self.queue.publish()
    }

    fn tx_frame(&self) -> &[u8] {
        &self.tx[..self.tx_len]
    }

    fn check_ring(&self) -> Result<(), String> {
        let want_len = match self.dir {
            Dir::Tx => 0,
            Dir::Rx => self.chain_len as u32,
        };
        let (mut head, mut wrap) = (self.next, self.wrap);
        for _ in 0..self.last_batch {
            if head == 0 {
                head = QUEUE_SIZE;
                wrap = !wrap;
            }
            head -= self.descs;
            let d = self.ring.wrapping_add(16 * usize::from(head));
            // SAFETY: a descriptor of the ring inside the mapping; the device is idle.
            let (len, id, flags) = unsafe {
                (
                    u32::from_le(AtomicU32::from_ptr(d.add(8).cast()).load(Ordering::Acquire)),
                    u16::from_le(AtomicU16::from_ptr(d.add(12).cast()).load(Ordering::Acquire)),
                    u16::from_le(AtomicU16::from_ptr(d.add(14).cast()).load(Ordering::Acquire)),
                )
            };
            let used = if wrap { VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED } else { 0 };
            if (len, id, flags & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) != (want_len, head, used) {
                return Err(format!(
                    "used descriptor at slot {head}: len {len} id {id} flags {flags:#x}, expected len {want_len} id {head} flags {used:#x}"
                ));
            }
        }
        Ok(())
    }
}
