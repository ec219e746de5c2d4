//! rust-vmm device: `virtio-queue` 0.18 `Queue` over `vm-memory` 0.18 `GuestMemoryMmap`,
//! used the way rust-vmm based devices (cloud-hypervisor, vhost-device-*) use it:
//! `pop_descriptor_chain` per chain, iterate the chain's descriptors, `read_slice` /
//! `write_slice` at each descriptor's address, `add_used` per chain (which also stores
//! `used.idx` with Release — that is the crate's design), then `needs_notification` once per
//! batch.

use std::hint::black_box;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{rx_frame, Device, Dir, Setup, FRAME_BUF, VIRTIO_F_EVENT_IDX};

/// Device side driven by rust-vmm's `virtio_queue::Queue`.
pub struct RustVmmDevice<'a> {
    mem: &'a GuestMemoryMmap,
    queue: Queue,
    dir: Dir,
    chain_len: usize,
    /// TX: destination of the copies. RX: the frame written into each chain.
    buf: [u8; FRAME_BUF],
    tx_len: usize,
}

impl<'a> RustVmmDevice<'a> {
    /// Configures the queue as a VMM would after the driver set FEATURES_OK and DRIVER_OK.
    pub fn new(mem: &'a GuestMemoryMmap, setup: &Setup) -> Self {
        let mut queue = Queue::new(setup.queue_size).expect("queue max size");
        queue.try_set_size(setup.queue_size).expect("queue size");
        queue.try_set_desc_table_address(GuestAddress(setup.desc_table)).expect("desc table");
        queue.try_set_avail_ring_address(GuestAddress(setup.avail_ring)).expect("avail ring");
        queue.try_set_used_ring_address(GuestAddress(setup.used_ring)).expect("used ring");
        // Indirect descriptors need no switch (always accepted); VERSION_1 changes nothing here.
        queue.set_event_idx(setup.features & VIRTIO_F_EVENT_IDX != 0);
        queue.set_ready(true);
        assert!(queue.is_valid(mem), "rust-vmm rejects the queue layout");
        RustVmmDevice {
            mem,
            queue,
            dir: setup.dir,
            chain_len: setup.chain_len,
            buf: match setup.dir {
                Dir::Tx => [0u8; FRAME_BUF],
                Dir::Rx => rx_frame(),
            },
            tx_len: 0,
        }
    }

    #[inline(always)]
    fn tx_chain(&mut self) {
        let chain = self.queue.pop_descriptor_chain(self.mem).expect("avail ring unexpectedly empty");
        let head = chain.head_index();
        let mut off = 0usize;
        for desc in chain {
            assert!(!desc.is_write_only(), "TX chain with a writable descriptor");
            let len = desc.len() as usize;
            let dst = self.buf.get_mut(off..off + len).expect("TX chain longer than the frame buffer");
            self.mem.read_slice(dst, desc.addr()).expect("TX buffer outside guest memory");
            off += len;
        }
        self.tx_len = off;
        black_box(&self.buf[..off]);
        self.queue.add_used(self.mem, head, 0).expect("add_used");
    }

    #[inline(always)]
    fn rx_chain(&mut self) {
        let chain = self.queue.pop_descriptor_chain(self.mem).expect("avail ring unexpectedly empty");
        let head = chain.head_index();
        let frame = black_box(&self.buf[..self.chain_len]);
        let mut off = 0usize;
        for desc in chain {
            assert!(desc.is_write_only(), "RX chain with a read-only descriptor");
            let n = (desc.len() as usize).min(frame.len() - off);
            self.mem.write_slice(&frame[off..off + n], desc.addr()).expect("RX buffer outside guest memory");
            off += n;
            if off == frame.len() {
                break;
            }
        }
        assert_eq!(off, frame.len(), "RX chain too short for the frame");
        self.queue.add_used(self.mem, head, off as u32).expect("add_used");
    }
}

impl Device for RustVmmDevice<'_> {
    fn run_batch(&mut self, batch: u16) -> bool {
        match self.dir {
            Dir::Tx => (0..batch).for_each(|_| self.tx_chain()),
            Dir::Rx => (0..batch).for_each(|_| self.rx_chain()),
        }
        self.queue.needs_notification(self.mem).expect("needs_notification")
    }

    fn tx_frame(&self) -> &[u8] {
        &self.buf[..self.tx_len]
    }
}
