//! The floor: exactly the byte copies a device must do per chain, with no ring logic.
//! Buffer host addresses and lengths are precomputed per avail slot (from the layout's ground
//! truth); per chain the device only walks that flat list and copies (`ptr::copy_nonoverlapping`,
//! which is also what vm-memory uses for copies longer than 8 bytes).

use std::hint::black_box;
use std::marker::PhantomData;

use crate::{rx_frame, Chain, Device, Dir, Setup, FRAME_BUF};

/// Copy-only "device".
pub struct MemcpyDevice<'a> {
    dir: Dir,
    /// All segments of all avail slots, in slot order: (host pointer, length).
    segs: Vec<(*mut u8, usize)>,
    /// `segs[starts[s]..starts[s + 1]]` are the segments of avail slot `s`.
    starts: Vec<usize>,
    slot: usize,
    buf: [u8; FRAME_BUF],
    tx_len: usize,
    /// `segs` point into the mapping described by the `Setup`.
    _mem: PhantomData<&'a Setup>,
}

impl<'a> MemcpyDevice<'a> {
    /// Precomputes the host address of every buffer of every chain.
    pub fn new(setup: &'a Setup, chains: &[Chain]) -> Self {
        let mut segs = Vec::new();
        let mut starts = vec![0];
        for c in chains {
            for s in &c.segs {
                let off = (s.gpa - setup.gpa_base) as usize;
                assert!(off + s.len as usize <= setup.mem_size);
                // SAFETY: `off + len <= mem_size` was just checked, so the pointer stays within
                // the mapping, which stays mapped for `'a`.
                segs.push((unsafe { setup.host_base.add(off) }, s.len as usize));
            }
            assert!(c.segs.iter().map(|s| s.len as usize).sum::<usize>() <= FRAME_BUF);
            starts.push(segs.len());
        }
        MemcpyDevice {
            dir: setup.dir,
            segs,
            starts,
            slot: 0,
            buf: match setup.dir {
                Dir::Tx => [0u8; FRAME_BUF],
                Dir::Rx => rx_frame(),
            },
            tx_len: 0,
            _mem: PhantomData,
        }
    }
}

impl Device for MemcpyDevice<'_> {
    fn run_batch(&mut self, batch: u16) -> bool {
        let slots = self.starts.len() - 1;
        for _ in 0..batch {
            let segs = &self.segs[self.starts[self.slot]..self.starts[self.slot + 1]];
            self.slot = if self.slot + 1 == slots { 0 } else { self.slot + 1 };
            let mut off = 0usize;
            match self.dir {
                Dir::Tx => {
                    for &(p, len) in segs {
                        // SAFETY: `p..p+len` is inside the mapping (checked in `new`), and
                        // `off + len <= FRAME_BUF` because a chain's total length is (also
                        // checked in `new`); the local buffer cannot overlap the mmap.
                        unsafe { std::ptr::copy_nonoverlapping(p, self.buf.as_mut_ptr().wrapping_add(off), len) };
                        off += len;
                    }
                    self.tx_len = off;
                    black_box(&self.buf[..off]);
                }
                Dir::Rx => {
                    let frame = black_box(&self.buf);
                    for &(p, len) in segs {
                        // SAFETY: as above, with source and destination swapped.
                        unsafe { std::ptr::copy_nonoverlapping(frame.as_ptr().wrapping_add(off), p, len) };
                        off += len;
                    }
                }
            }
        }
        true
    }

    fn tx_frame(&self) -> &[u8] {
        &self.buf[..self.tx_len]
    }
}
