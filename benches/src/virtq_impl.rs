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
use std::os::fd::{FromRawFd, OwnedFd};
use std::ptr::NonNull;

use virtq::{net, Region, RegionTable, SplitQueue, VirtioFeatures};
use virtq_vhost_user::memory::dirty::{DirtyLog, LOG_PAGE};
use virtq_vhost_user::vring::RingLog;

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

/// `--impl virtq-log`: the same device marking every write it makes in a vhost-user dirty log
/// (a memfd covering all of guest memory), as a back-end does while its VM migrates. A type of
/// its own, so that the plain device's code is not changed by the logged path next to it.
pub struct VirtqLogDevice<'a> {
    dev: VirtqDevice<'a>,
    log: DirtyLog,
    used_ring: u64,
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

impl<'a> VirtqLogDevice<'a> {
    /// Attaches to the queue described by `setup`, with a fresh dirty log.
    pub fn new(setup: &'a Setup) -> Self {
        VirtqLogDevice { dev: VirtqDevice::new(setup), log: dirty_log(setup), used_ring: setup.used_ring }
    }
}

/// A dirty log covering all of `setup`'s guest memory, in a memfd as a front-end gives it.
fn dirty_log(setup: &Setup) -> DirtyLog {
    let bytes = (setup.gpa_base + setup.mem_size as u64).div_ceil(LOG_PAGE * 8);
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned at once below.
    let raw = unsafe { libc::memfd_create(c"ringbench-log".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sizing our own memfd.
    assert_eq!(unsafe { libc::ftruncate(raw, bytes as libc::off_t) }, 0);
    DirtyLog::new(bytes, 0, fd).expect("dirty log")
}

impl Device for VirtqLogDevice<'_> {
    fn run_batch(&mut self, batch: u16) -> bool {
        let log = RingLog { log: &self.log, used: Some(self.used_ring), packed: None, log_kick: None };
        let d = &mut self.dev;
        for _ in 0..batch {
            match d.dir {
                // Guest TX writes only the used ring, logged at publish.
                Dir::Tx => {
                    let c = d.queue.pop_read(&mut d.tx).expect("well-formed chain").expect("a full batch");
                    d.tx_len = c.bytes as usize;
                    black_box(&d.tx[..d.tx_len]);
                    d.queue.push(c.head, 0);
                }
                Dir::Rx => {
                    let c = d
                        .queue
                        .pop_write_logged(&d.rx[..d.chain_len], &log)
                        .expect("well-formed chain")
                        .expect("a full batch");
                    d.queue.push(c.head, c.bytes);
                }
            }
        }
        d.queue.publish_logged(&log)
    }

    fn tx_frame(&self) -> &[u8] {
        self.dev.tx_frame()
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

/// `--impl virtq-net` / `virtq-net-log`: the product's virtio-net path over the same queue, as
/// `virtq-net` runs it per burst. RX places the batch with `net::receive_burst` (a zeroed
/// virtio-net header, then `rx_frame()[12..chain_len]`, `MRG_RXBUF` negotiated), or with
/// `net::receive_burst_logged` into a dirty log; TX pops with `pop_read` and applies the
/// core's TX rules (`net::parse_tx_copied`). The harness checks the bytes after the header.
pub struct VirtqNetDevice<'a> {
    dev: VirtqDevice<'a>,
    /// While "migrating": the dirty log and the used ring's guest address.
    log: Option<(DirtyLog, u64)>,
    features: VirtioFeatures,
}

impl<'a> VirtqNetDevice<'a> {
    /// Attaches to the queue described by `setup`; with `log`, writes are marked in a fresh
    /// dirty log as `VirtqLogDevice` does.
    pub fn new(setup: &'a Setup, log: bool) -> Self {
        let log = log.then(|| (dirty_log(setup), setup.used_ring));
        let features = VirtioFeatures::from_bits_retain(setup.features) | VirtioFeatures::NET_MRG_RXBUF;
        VirtqNetDevice { dev: VirtqDevice::new(setup), log, features }
    }
}

impl Device for VirtqNetDevice<'_> {
    fn run_batch(&mut self, batch: u16) -> bool {
        let d = &mut self.dev;
        let features = self.features;
        match d.dir {
            Dir::Tx => {
                for _ in 0..batch {
                    let c = d.queue.pop_read(&mut d.tx).expect("well-formed chain").expect("a full batch");
                    let pkt = net::parse_tx_copied(&c, &d.tx, features).expect("a zeroed header and a frame");
                    d.tx_len = c.bytes as usize;
                    black_box(pkt);
                    d.queue.push(c.head, 0);
                }
            }
            Dir::Rx => {
                let hdr_len = net::header_len(features);
                let frame = &d.rx[hdr_len..d.chain_len];
                let mut scratch: net::RxScratch<'_> = net::RxScratch::new();
                let zero = net::VirtioNetHdr::default();
                let burst = match &self.log {
                    None => net::receive_burst(&mut d.queue, &mut scratch, features, batch as usize, |_| (zero, frame)),
                    Some((log, used)) => {
                        let log = RingLog { log, used: Some(*used), packed: None, log_kick: None };
                        net::receive_burst_logged(
                            &mut d.queue,
                            &mut scratch,
                            features,
                            batch as usize,
                            |_| (zero, frame),
                            &log,
                        )
                    }
                };
                assert_eq!(burst.placed, batch as usize, "{burst:?}");
            }
        }
        match &self.log {
            None => d.queue.publish(),
            Some((log, used)) => {
                d.queue.publish_logged(&RingLog { log, used: Some(*used), packed: None, log_kick: None })
            }
        }
    }

    fn tx_frame(&self) -> &[u8] {
        self.dev.tx_frame()
    }

    fn header_len(&self) -> usize {
        net::header_len(self.features)
    }
}
