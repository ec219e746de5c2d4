//! Descriptor-chain walks over arbitrary guest memory and ring state (direct, indirect, loops,
//! wrap-around), through all three consumers (segment lists, fused read, fused write).
//!
//! Invariants: no panic; every segment lies inside guest memory; the used index moves forward
//! by exactly the number of completions; a popped head is below the queue size and is
//! completed exactly once.
#![no_main]

use std::ptr::NonNull;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtq::testing::{layout, TestDriver};
use virtq::{Chain, PopError, Region, RegionTable, SplitQueue, VirtioFeatures};

const GPA: u64 = 0x1_0000;
const MEM: usize = 1 << 16;

#[derive(Arbitrary, Debug)]
struct Input {
    size_log2: u8,
    /// Descriptors: (address selector, raw address, len, flags, next).
    desc: Vec<(bool, u64, u32, u16, u16)>,
    ring: Vec<u16>,
    avail_idx: u16,
    start: u16,
    used_event: u16,
    avail_flags: u16,
    features: u8,
    consumer: u8,
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
    let size = 1u16 << (inp.size_log2 % 7);
    let (cfg, data) = layout(GPA, size);
    let mut drv = TestDriver::new(&mem, cfg, data, GPA + MEM as u64 - data);
    let n = inp.data.len().min((GPA + MEM as u64 - data) as usize);
    drv.write(data, &inp.data[..n]);
    for (i, &(inside, addr, len, flags, next)) in inp.desc.iter().take(size as usize).enumerate() {
        let addr = if inside { GPA + addr % MEM as u64 } else { addr };
        let len = if inside { len % 4096 } else { len };
        drv.write_desc(
            i as u16,
            virtq::desc::Descriptor { addr, len, flags: virtq::desc::DescFlags::from_bits_retain(flags), next },
        );
    }
    drv.skip(inp.start);
    for h in inp.ring.iter().take(size as usize) {
        drv.stage(*h);
    }
    drv.set_avail_idx(inp.avail_idx);
    drv.set_used_event(inp.used_event);
    drv.set_avail_flags(inp.avail_flags);
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
    if inp.features & 8 != 0 {
        f |= VirtioFeatures::NOTIFY_ON_EMPTY;
    }
    let Ok(mut q) = SplitQueue::new(&mem, cfg, f) else { return };
    q.set_next_avail(inp.start);
    let used_before = drv.used_idx();
    let (lo, hi) = (base as usize, base as usize + MEM);
    let mut chain = Chain::<8>::new();
    let mut buf = vec![0u8; 4096];
    let mut completed = 0u16;
    for _ in 0..(2 * size as usize + 2) {
        let r = match inp.consumer % 3 {
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
            _ => q.pop_write(&buf[..1500]).map(|c| c.map(|c| c.head)),
        };
        match r {
            Ok(Some(head)) => {
                assert!(head < size);
                q.push(head, 0);
                completed += 1;
            }
            Ok(None) => break,
            Err(PopError::Chain { head, .. }) => {
                assert!(head < size);
                completed += 1;
            }
            Err(PopError::HeadOutOfRange { head }) => assert!(head >= size),
            Err(PopError::AvailIndex(_)) => break,
            Err(PopError::IdInUse { .. }) => unreachable!("the split ring has no buffer ids"),
        }
    }
    let _ = q.publish();
    assert_eq!(drv.used_idx(), used_before.wrapping_add(completed));
    drop(q);
    drop(drv);
    drop(mem);
    drop(backing);
});
