//! Packed-ring chain walks over arbitrary descriptor rings (VIRTIO 1.2 §2.8): any flags
//! (AVAIL/USED in every combination, NEXT chains that run on or into unavailable
//! descriptors, indirect tables), any buffer ids, any starting positions and wrap counters,
//! any driver event suppression state, through all three consumers (segment lists, fused read,
//! fused write), the batch pop of transmit buffers, the virtio-net receive path (single and
//! mergeable buffers, whose reservations are given back with `rewind` when the ring runs
//! short; frame by frame and in bursts, which take receive buffers in batches) and both
//! completion forms (one by one, IN_ORDER batches).
//!
//! Invariants: no panic; every segment lies inside guest memory; every pop that does not find
//! the ring empty consumes at least one descriptor (the queue never stalls on a bad chain); a
//! popped buffer id is below the queue size; an empty ring stays empty when popped again.
#![no_main]

use std::ptr::NonNull;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtq::testing::{packed_layout, PackedDesc, PackedDriver};
use virtq::{Chain, PackedQueue, PopError, Region, RegionTable, RingPosition, VirtioFeatures};

const GPA: u64 = 0x1_0000;
const MEM: usize = 1 << 16;

#[derive(Arbitrary, Debug)]
struct Input {
    size: u8,
    /// Descriptors: (address selector, raw address, len, id, flags).
    desc: Vec<(bool, u64, u32, u16, u16)>,
    /// Device positions to start from: avail slot and wrap, used slot and wrap.
    avail: (u16, bool),
    used: (u16, bool),
    driver_event: (u16, u16),
    features: u8,
    consumer: Vec<u8>,
    /// Bytes for indirect tables and buffers, written at the start of the data area.
    data: Vec<u8>,
}

fuzz_target!(|inp: Input| {
    let mut backing = vec![0u64; MEM / 8];
    let base = backing.as_mut_ptr().cast::<u8>();
    let mut mem = RegionTable::<2>::new();
    // SAFETY: `backing` outlives `mem` and every queue built on it, and is only accessed
    // through raw pointers while they exist.
    mem.add(unsafe { Region::new(GPA, NonNull::new(base).unwrap(), MEM as u64) }).unwrap();
    let size = 1 + (inp.size % 64) as u16;
    let (cfg, data) = packed_layout(GPA, size);
    let drv = PackedDriver::new(&mem, cfg, data, GPA + MEM as u64 - data);
    let n = inp.data.len().min((GPA + MEM as u64 - data) as usize);
    drv.write(data, &inp.data[..n]);
    for (i, &(inside, addr, len, id, flags)) in inp.desc.iter().take(size as usize).enumerate() {
        let addr = if inside { GPA + addr % MEM as u64 } else { addr };
        let len = if inside { len % 4096 } else { len };
        drv.write_desc(i as u16, PackedDesc { addr, len, id, flags });
    }
    drv.set_driver_event(inp.driver_event.0, inp.driver_event.1);
    let mut f = VirtioFeatures::VERSION_1;
    if inp.features & 1 != 0 {
        f |= VirtioFeatures::RING_INDIRECT_DESC;
    }
    if inp.features & 2 != 0 {
        f |= VirtioFeatures::RING_EVENT_IDX;
    }
    if inp.features & 4 != 0 {
        f |= VirtioFeatures::IN_ORDER;
    }
    let Ok(mut q) = PackedQueue::<_, 64>::new(&mem, cfg, f) else { return };
    q.set_positions(
        RingPosition { index: inp.avail.0 % size, wrap: inp.avail.1 },
        RingPosition { index: inp.used.0 % size, wrap: inp.used.1 },
    );
    let (lo, hi) = (base as usize, base as usize + MEM);
    let mut chain = Chain::<8>::new();
    let mut buf = vec![0u8; 4096];
    let mut scratch: virtq::net::RxScratch<'_, 8> = virtq::net::RxScratch::new();
    let frame = [0x5au8; 3000];
    let mut last_ok = None;
    let mut ok_count = 0u16;
    for step in 0..(2 * size as usize + 2) {
        let consumer = inp.consumer.get(step).copied().unwrap_or(0);
        let before = q.next_avail();
        if consumer % 5 == 3 {
            // virtio-net receive: whatever it meets, it must leave the queue consistent (the
            // next pops below check progress and ranges again).
            let mut nf = f | VirtioFeatures::VERSION_1;
            if consumer & 16 != 0 {
                nf |= VirtioFeatures::NET_MRG_RXBUF;
            }
            let len = (consumer as usize * 37) % frame.len();
            let hdr = virtq::net::VirtioNetHdr::default();
            if consumer & 32 != 0 {
                // A burst: the receive buffers are taken in batches.
                let _ = virtq::net::receive_burst(&mut q, &mut scratch, nf, 3, |_| (hdr, &frame[..len]));
            } else {
                let _ = virtq::net::receive(&mut q, &mut scratch, nf, &hdr, &frame[..len]);
            }
            continue;
        }
        if consumer % 5 == 4 && consumer & 32 != 0 {
            // The batch pop takes only whole, valid chains, and consumes nothing when it takes
            // none (the single pops below meet what it left).
            let mut bufs = [[0u8; 64]; virtq::packed::BATCH];
            let [a, b, c, d] = &mut bufs;
            let got = q.pop_read_batch(&mut [&mut a[..], &mut b[..], &mut c[..], &mut d[..]]);
            if got.as_slice().is_empty() {
                assert_eq!(q.next_avail(), before, "an empty batch consumes nothing");
            }
            for c in got.as_slice() {
                assert!(c.head < size && c.bytes <= 64 && c.bytes <= c.readable_len && c.writable_len == 0);
                q.push(c.head, 0);
            }
            continue;
        }
        let r = match consumer % 3 {
            0 => q.pop_into(&mut chain).map(|ok| {
                ok.map(|_| {
                    for s in chain.readable().iter().chain(chain.writable()) {
                        let p = s.as_ptr() as usize;
                        assert!(p >= lo && p + s.len() <= hi, "segment outside guest memory");
                    }
                    (chain.head(), chain.writable_len())
                })
            }),
            1 => q.pop_read(&mut buf).map(|c| c.map(|c| (c.head, 0))),
            _ => q.pop_write(&buf[..1500]).map(|c| c.map(|c| (c.head, c.bytes))),
        };
        match r {
            Ok(None) => {
                assert_eq!(q.next_avail(), before, "an empty ring consumes nothing");
                assert_eq!(q.pop_read(&mut buf), Ok(None));
                break;
            }
            Ok(Some((id, len))) => {
                assert!(id < size);
                if q.in_order() && consumer & 4 != 0 {
                    last_ok = Some((id, len));
                    ok_count += 1;
                } else {
                    q.push(id, len);
                }
            }
            Err(PopError::Chain { head, .. }) => assert!(head < size),
            Err(PopError::HeadOutOfRange { head }) => assert!(head >= size),
            Err(PopError::IdInUse { id }) => assert!(id < size),
            Err(PopError::AvailIndex(_)) => unreachable!("the packed ring has no available index"),
        }
        assert_ne!(q.next_avail(), before, "a pop that found a chain consumed its descriptors");
        if consumer & 8 != 0 {
            let _ = q.publish();
        }
    }
    if let Some((id, len)) = last_ok {
        assert!(q.push_in_order_batch(id, len, ok_count));
    }
    let _ = q.publish();
    let _ = q.enable_notifications();
    q.disable_notifications();
    drop(q);
    drop(drv);
    drop(mem);
    drop(backing);
});
