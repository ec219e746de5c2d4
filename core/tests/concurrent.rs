//! A hostile guest that keeps rewriting descriptors (addresses, lengths, flags, next) and the
//! available ring (entries and index) from another thread while the device walks chains
//! (hostile-inputs family 7, TOCTOU). Runs under Miri in CI, which checks that the device's
//! accesses to guest memory are free of data races and undefined behaviour; natively it runs
//! many more rounds.
//!
//! Invariants: no panic; every segment the device hands out lies inside guest memory and
//! matches a descriptor as it was when read (length never above the configured maximum); the
//! used index moves by exactly the completions.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use virtq::testing::layout;
use virtq::{Chain, PopError, Region, RegionTable, SplitQueue, VirtioFeatures};

const GPA: u64 = 0x10_0000;
const MEM: usize = 1 << 16;
const SIZE: u16 = 16;
const MAX_LEN: u64 = 512;

/// Guest memory shared between the "guest" thread and the device, accessed only through raw
/// pointers and atomics.
struct Shared {
    base: *mut u64,
    words: usize,
}
// SAFETY: the buffer is only accessed through atomics (guest thread) and the core's
// atomic/raw-pointer accesses (device thread); it lives until both threads are joined.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    fn u64_at(&self, gpa: u64) -> &AtomicU64 {
        let i = ((gpa - GPA) / 8) as usize;
        assert!(i < self.words);
        // SAFETY: in bounds, 8-aligned, only accessed atomically at this granularity.
        unsafe { AtomicU64::from_ptr(self.base.add(i)) }
    }
    fn u16_at(&self, gpa: u64) -> &AtomicU16 {
        let off = (gpa - GPA) as usize;
        assert!(off + 2 <= self.words * 8 && off.is_multiple_of(2));
        // SAFETY: in bounds, 2-aligned, only accessed atomically at this granularity.
        unsafe { AtomicU16::from_ptr(self.base.cast::<u8>().add(off).cast::<u16>()) }
    }
}

/// A tiny deterministic generator (no dependency, Miri-friendly).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn device_survives_a_guest_rewriting_rings_and_descriptors_concurrently() {
    let rounds = if cfg!(miri) { 40 } else { 20_000 };
    let words = MEM / 8;
    let backing = Box::into_raw(vec![0u64; words].into_boxed_slice()).cast::<u64>();
    let shared = Arc::new(Shared { base: backing, words });
    let mut mem = RegionTable::<1>::new();
    // SAFETY: the allocation outlives `mem` and the queue (freed at the end, after the guest
    // thread is joined); accessed only through raw pointers and atomics.
    mem.add(unsafe { Region::new(GPA, NonNull::new(backing.cast::<u8>()).unwrap(), MEM as u64) }).unwrap();
    let (cfg, data) = layout(GPA, SIZE);
    let data_end = GPA + MEM as u64;

    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
        thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut writes = 0u32;
            while !stop.load(Ordering::Relaxed) || writes < 64 {
                let r = rng.next();
                match r % 4 {
                    // A descriptor: sometimes sane, sometimes hostile (indirect, loops, wild
                    // addresses); always written as the two atomic words the device reads.
                    0 | 1 => {
                        let i = (r >> 8) % SIZE as u64;
                        let addr = if r & (1 << 20) != 0 {
                            data + (rng.next() % (data_end - data - MAX_LEN))
                        } else {
                            rng.next()
                        };
                        let len = rng.next() % MAX_LEN;
                        let flags = rng.next() % 8;
                        let next = rng.next() % (SIZE as u64 + 2);
                        shared.u64_at(cfg.desc_table + 16 * i).store(addr, Ordering::Relaxed);
                        shared
                            .u64_at(cfg.desc_table + 16 * i + 8)
                            .store(len | flags << 32 | next << 48, Ordering::Relaxed);
                    }
                    // An available-ring entry.
                    2 => {
                        let slot = (r >> 8) % SIZE as u64;
                        shared.u16_at(cfg.avail_ring + 4 + 2 * slot).store((rng.next() % 20) as u16, Ordering::Relaxed);
                    }
                    // The available index: forward, backward, or a jump.
                    _ => {
                        let idx = shared.u16_at(cfg.avail_ring + 2);
                        let cur = idx.load(Ordering::Relaxed);
                        let v = match (r >> 8) % 4 {
                            0 => cur.wrapping_sub(1),
                            1 => cur.wrapping_add(100),
                            _ => cur.wrapping_add(1 + (r >> 16) as u16 % 4),
                        };
                        idx.store(v, Ordering::Release);
                    }
                }
                writes += 1;
                if cfg!(miri) {
                    thread::yield_now();
                }
            }
        })
    };

    let lo = backing as usize;
    let hi = lo + MEM;
    {
        let mut q = SplitQueue::new(&mem, cfg, VirtioFeatures::VERSION_1 | VirtioFeatures::RING_INDIRECT_DESC).unwrap();
        let mut chain = Chain::<8>::new();
        let mut buf = vec![0u8; 4096];
        let mut completed = 0u16;
        for i in 0..rounds {
            let r = match i % 3 {
                0 => q.pop_into(&mut chain).map(|ok| {
                    ok.map(|_| {
                        for s in chain.readable().iter().chain(chain.writable()) {
                            let p = s.as_ptr() as usize;
                            assert!(p >= lo && p + s.len() <= hi, "segment outside guest memory");
                            assert!(s.len() as u64 <= MAX_LEN || s.len() <= MEM, "length as read");
                        }
                        chain.head()
                    })
                }),
                1 => q.pop_read(&mut buf).map(|c| c.map(|c| c.head)),
                _ => q.pop_write(&buf[..256]).map(|c| c.map(|c| c.head)),
            };
            match r {
                Ok(Some(head)) => {
                    assert!(head < SIZE);
                    q.push(head, 0);
                    completed = completed.wrapping_add(1);
                }
                Err(PopError::Chain { head, .. }) => {
                    assert!(head < SIZE);
                    completed = completed.wrapping_add(1);
                }
                Ok(None) | Err(PopError::HeadOutOfRange { .. }) | Err(PopError::AvailIndex(_)) => {}
                Err(PopError::IdInUse { .. }) => unreachable!("the split ring has no buffer ids"),
            }
            if i % 8 == 7 {
                let _ = q.publish();
                // The device's own view of the used index is authoritative: the guest thread
                // never writes the used ring.
                assert_eq!(shared.u16_at(cfg.used_ring + 2).load(Ordering::Acquire), completed);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
    drop(mem);
    // SAFETY: both users are gone; the pointer came from Box::into_raw of `words` u64s.
    drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(backing, words)) });
}
