//! `virtq` device for ringbench: the core's `SplitQueue` over a one-region `RegionTable`.
//!
//! # Contract (what `lib.rs` / `main.rs` rely on)
//!
//! `VirtqDevice::new(&setup)` is called once per process, outside the measured part. The
//! mapping `[setup.host_base, + setup.mem_size)` stays valid for `'a`; guest physical address
//! `g` is host address `host_base + (g - gpa_base)`. Between `run_batch` calls the harness
//! writes `avail.idx` and `used_event` through raw pointers, so no reference into guest memory
//! is kept across calls (the core never forms one).
//!
//! `run_batch(batch)`: the driver has just published exactly `batch` (= 32) new chains. The
//! device discovers them through the avail ring, walks and validates each chain, copies (TX:
//! every readable byte into a local 2 KiB buffer, used len 0; RX: the first `chain_len` bytes
//! of `rx_frame()` into the writable buffers, used len = bytes written), completes each chain,
//! publishes `used.idx` once, and returns the EVENT_IDX notification decision.
//!
//! The device uses the core's fused walk-and-copy paths (`pop_read`/`pop_write`): the same
//! work rust-vmm's device does per descriptor (walk, then `read_slice`/`write_slice`), with one
//! validation pass and no segment list.

use std::hint::black_box;
use std::ptr::NonNull;

use virtq::{Region, RegionTable, SplitQueue, VirtioFeatures};

use crate::{rx_frame, Device, Dir, Setup, FRAME_BUF};

/// Device side driven by the `virtq` core.
pub struct VirtqDevice<'a> {
    queue: SplitQueue<'a, RegionTable<1>>,
    dir: Dir,
    chain_len: usize,
    rx: [u8; FRAME_BUF],
    tx: [u8; FRAME_BUF],
    tx_len: usize,
}

impl<'a> VirtqDevice<'a> {
    /// Attaches to the queue described by `setup`.
    pub fn new(setup: &'a Setup) -> Self {
        let mut table = RegionTable::new();
        let host = NonNull::new(setup.host_base).expect("mapping is non-null");
        // SAFETY: the harness keeps `[host_base, + mem_size)` mapped for `'a` and only touches
        // it through raw pointers (see the contract above).
        let region = unsafe { Region::new(setup.gpa_base, host, setup.mem_size as u64) };
        table.add(region).expect("one region");
        // The device owns its memory table for the life of the process, like a firmware's
        // static table; leaking the small table once keeps the queue's borrow simple.
        let table: &'a RegionTable<1> = Box::leak(Box::new(table));
        let cfg = virtq::QueueConfig {
            size: setup.queue_size,
            desc_table: setup.desc_table,
            avail_ring: setup.avail_ring,
            used_ring: setup.used_ring,
        };
        let features = VirtioFeatures::from_bits_retain(setup.features);
        let queue = SplitQueue::new(table, cfg, features).expect("valid queue");
        VirtqDevice { queue, dir: setup.dir, chain_len: setup.chain_len, rx: rx_frame(), tx: [0; FRAME_BUF], tx_len: 0 }
    }
}

impl Device for VirtqDevice<'_> {
    fn run_batch(&mut self, batch: u16) -> bool {
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
}
