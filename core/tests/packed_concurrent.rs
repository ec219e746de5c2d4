//! A hostile guest that keeps rewriting the packed descriptor ring (addresses, lengths, ids,
//! flags with every AVAIL/USED combination) and the driver event suppression structure from
//! another thread while the device takes chains, completes them and publishes (hostile-inputs
//! family 7, TOCTOU, on the layout both sides write). Runs under Miri in CI, which checks that
//! the device's accesses to guest memory are free of data races and undefined behaviour: the
//! guest writes each field at its own width, as drivers do and as the device reads and writes
//! them. Natively it runs many more rounds.
//!
//! Invariants: no panic; every segment lies inside guest memory; every buffer id handed out is
//! below the queue size; every pop that finds a chain consumes at least one descriptor.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use virtq::testing::packed_layout;
use virtq::{Chain, PackedQueue, PopError, Region, RegionTable, VirtioFeatures};

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
    fn ptr(&self, gpa: u64, len: usize) -> *mut u8 {
        let off = (gpa - GPA) as usize;
        assert!(off + len <= self.words * 8 && off.is_multiple_of(len));
        // SAFETY: in bounds of the allocation.
        unsafe { self.base.cast::<u8>().add(off) }
    }
    fn u64_at(&self, gpa: u64) -> &AtomicU64 {
        // SAFETY: in bounds, aligned, only accessed atomically at this granularity.
        unsafe { AtomicU64::from_ptr(self.ptr(gpa, 8).cast()) }
    }
    fn u32_at(&self, gpa: u64) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { AtomicU32::from_ptr(self.ptr(gpa, 4).cast()) }
    }
    fn u16_at(&self, gpa: u64) -> &AtomicU16 {
        // SAFETY: as above.
        unsafe { AtomicU16::from_ptr(self.ptr(gpa, 2).cast()) }
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
fn device_survives_a_guest_rewriting_the_packed_ring_concurrently() {
    let rounds = if cfg!(miri) { 40 } else { 20_000 };
    let words = MEM / 8;
    let backing = Box::into_raw(vec![0u64; words].into_boxed_slice()).cast::<u64>();
    let shared = Arc::new(Shared { base: backing, words });
    let mut mem = RegionTable::<1>::new();
    // SAFETY: the allocation outlives `mem` and the queue (freed at the end, after the guest
    // thread is joined); accessed only through raw pointers and atomics.
    mem.add(unsafe { Region::new(GPA, NonNull::new(backing.cast::<u8>()).unwrap(), MEM as u64) }).unwrap();
    let (cfg, data) = packed_layout(GPA, SIZE);
    let data_end = GPA + MEM as u64;

    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
        thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut writes = 0u32;
            while !stop.load(Ordering::Relaxed) || writes < 64 {
                let r = rng.next();
                let at = cfg.desc_table + 16 * ((r >> 8) % SIZE as u64);
                match r % 8 {
                    0 => {
                        let addr = if r & (1 << 20) != 0 {
                            data + (rng.next() % (data_end - data - MAX_LEN))
                        } else {
                            rng.next()
                        };
                        shared.u64_at(at).store(addr, Ordering::Relaxed);
                    }
                    1 => shared.u32_at(at + 8).store((rng.next() % MAX_LEN) as u32, Ordering::Relaxed),
                    2 => shared.u16_at(at + 12).store((rng.next() % (SIZE as u64 + 4)) as u16, Ordering::Relaxed),
                    // Flags: NEXT/WRITE/INDIRECT in any mix, AVAIL/USED in any of the four
                    // states, published with release as a driver does.
                    3..=5 => {
                        let f = rng.next();
                        let flags =
                            (f & 7) as u16 | if f & 8 != 0 { 0x80 } else { 0 } | if f & 16 != 0 { 0x8000 } else { 0 };
                        shared.u16_at(at + 14).store(flags, Ordering::Release);
                    }
                    // The driver event suppression structure.
                    6 => shared.u16_at(cfg.avail_ring).store(rng.next() as u16, Ordering::Relaxed),
                    _ => shared.u16_at(cfg.avail_ring + 2).store((rng.next() % 4) as u16, Ordering::Relaxed),
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
        let f = VirtioFeatures::VERSION_1 | VirtioFeatures::RING_INDIRECT_DESC | VirtioFeatures::RING_EVENT_IDX;
        let mut q = PackedQueue::<_, 16>::new(&mem, cfg, f).unwrap();
        let mut chain = Chain::<8>::new();
        let mut buf = vec![0u8; 4096];
        for i in 0..rounds {
            // The prefetch hint reads the ring ahead while the guest rewrites it.
            q.prefetch();
            let before = q.next_avail();
            let r = match i % 3 {
                0 => q.pop_into(&mut chain).map(|ok| {
                    ok.map(|_| {
                        for s in chain.readable().iter().chain(chain.writable()) {
                            let p = s.as_ptr() as usize;
                            assert!(p >= lo && p + s.len() <= hi, "segment outside guest memory");
                        }
                        chain.head()
                    })
                }),
                1 => q.pop_read(&mut buf).map(|c| c.map(|c| c.head)),
                _ => q.pop_write(&buf[..256]).map(|c| c.map(|c| c.head)),
            };
            match r {
                Ok(None) => assert_eq!(q.next_avail(), before),
                Ok(Some(id)) => {
                    assert!(id < SIZE);
                    q.push(id, 0);
                }
                Err(PopError::Chain { head, .. }) => assert!(head < SIZE),
                Err(PopError::IdInUse { id }) => assert!(id < SIZE),
                Err(PopError::HeadOutOfRange { head }) => assert!(head >= SIZE),
                Err(PopError::AvailIndex(_)) => unreachable!("the packed ring has no available index"),
            }
            if !matches!(r, Ok(None)) {
                assert_ne!(q.next_avail(), before, "a chain found is a chain consumed");
            }
            if i % 8 == 7 {
                let _ = q.publish();
                let _ = q.enable_notifications();
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
    drop(mem);
    // SAFETY: both users are gone; the pointer came from Box::into_raw of `words` u64s.
    drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(backing, words)) });
}
