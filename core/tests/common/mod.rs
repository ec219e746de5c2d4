//! Shared set-up for the integration tests: guest memory made of host buffers, and a queue
//! laid out in it with the in-tree test driver.
#![allow(dead_code)]

use std::ptr::NonNull;

use virtq::testing::{layout, TestDriver};
use virtq::{QueueConfig, Region, RegionTable, SplitQueue, VirtioFeatures};

/// Guest RAM: one or more host buffers mapped at guest addresses.
pub struct Guest {
    // Backing store as raw allocations (u64 for 8-byte alignment): never touched through
    // references or moved as Boxes while the table is in use, so the table's raw pointers stay
    // valid under Stacked Borrows. Freed in Drop.
    bufs: Vec<*mut [u64]>,
    pub mem: RegionTable<8>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        for &b in &self.bufs {
            // SAFETY: each pointer came from Box::into_raw in `add_region` and is freed once.
            drop(unsafe { Box::from_raw(b) });
        }
    }
}

pub const GPA: u64 = 0x10_0000;

impl Guest {
    /// One region of `len` bytes at [`GPA`].
    pub fn new(len: usize) -> Guest {
        let mut g = Guest { bufs: Vec::new(), mem: RegionTable::new() };
        g.add_region(GPA, len);
        g
    }

    /// Adds a region of `len` bytes at `gpa`, backed by a fresh zeroed buffer.
    pub fn add_region(&mut self, gpa: u64, len: usize) {
        let buf = Box::into_raw(vec![0u64; len.div_ceil(8)].into_boxed_slice());
        let host = NonNull::new(buf.cast::<u8>()).unwrap();
        // SAFETY: the allocation lives until `self` is dropped and is only accessed through
        // the table's raw pointers.
        let region = unsafe { Region::new(gpa, host, len as u64) };
        self.mem.add(region).unwrap();
        self.bufs.push(buf);
    }
}

/// Default test queue: size 16 at [`GPA`], data area after it.
pub fn setup(guest: &Guest, size: u16) -> (QueueConfig, TestDriver<'_, RegionTable<8>>) {
    let (cfg, data) = layout(GPA, size);
    let region_end = GPA + guest.mem.regions()[0].len();
    let drv = TestDriver::new(&guest.mem, cfg, data, region_end - data);
    (cfg, drv)
}

pub fn features() -> VirtioFeatures {
    VirtioFeatures::VERSION_1 | VirtioFeatures::RING_INDIRECT_DESC
}

pub fn queue<'m>(guest: &'m Guest, cfg: QueueConfig, f: VirtioFeatures) -> SplitQueue<'m, RegionTable<8>> {
    SplitQueue::new(&guest.mem, cfg, f).expect("valid queue")
}
