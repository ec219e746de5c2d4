//! virtio-blk request parsing (`virtq::blk`, VIRTIO 1.2 §5.2.6) over arbitrary chains: header
//! bytes, buffer sizes and directions, discard / write-zeroes segments, capacities, features.
//!
//! Invariants: no panic; an accepted IN/OUT request lies within capacity in whole sectors and
//! its data pieces add up to its data length, inside guest memory; accepted segments lie
//! within capacity and their limits; every completion's used length is at most the writable
//! length, and the status byte written is the chain's last writable byte (none: used length
//! 0, and only for a chain without writable bytes). A chain the walk refuses (buffers in any
//! order) gets IOERR in its last byte when that byte is device-writable, used length 0
//! otherwise, and nothing else is written.
#![no_main]

use std::ptr::NonNull;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtq::blk::{self, BlkConfig, DiscardSegment, Limits, RequestError, RequestType, Status};
use virtq::testing::{layout, Buf, TestDriver};
use virtq::{Chain, Region, RegionTable, SplitQueue, VirtioFeatures};

const GPA: u64 = 0x10_0000;
const MEM: usize = 1 << 20;

#[derive(Arbitrary, Debug)]
struct Input {
    capacity: u64,
    read_only: bool,
    discard: bool,
    write_zeroes: bool,
    max_sectors: u32,
    max_segments: u8,
    /// Chains: (bytes of the first readable buffer, then the other buffers as (len, writable),
    /// kept in the order given instead of readable-first).
    chains: Vec<(Vec<u8>, Vec<(u16, bool)>, bool)>,
}

fuzz_target!(|inp: Input| {
    let mut backing = vec![0u64; MEM / 8];
    let base = backing.as_mut_ptr().cast::<u8>();
    let mut mem = RegionTable::<1>::new();
    // SAFETY: `backing` outlives `mem` and the queue; raw-pointer access only.
    mem.add(unsafe { Region::new(GPA, NonNull::new(base).unwrap(), MEM as u64) }).unwrap();
    let (cfg, data) = layout(GPA, 64);
    let mut drv = TestDriver::new(&mem, cfg, data, GPA + MEM as u64 - data);
    let mut features = VirtioFeatures::VERSION_1 | VirtioFeatures::RING_INDIRECT_DESC;
    if inp.discard {
        features |= VirtioFeatures::BLK_DISCARD;
    }
    if inp.write_zeroes {
        features |= VirtioFeatures::BLK_WRITE_ZEROES;
    }
    let config = BlkConfig {
        capacity: inp.capacity,
        max_discard_sectors: inp.max_sectors,
        max_discard_seg: inp.max_segments as u32,
        max_write_zeroes_sectors: inp.max_sectors,
        max_write_zeroes_seg: inp.max_segments as u32,
        ..BlkConfig::default()
    };
    let limits = Limits::new(&config, features, inp.read_only);
    let mut q = SplitQueue::new(&mem, cfg, features).unwrap();
    let mut descs = 0usize;
    // Per head: the guest address of the chain's last byte if its last non-empty buffer is
    // device-writable (where a refused chain's status goes), and the writable bytes before it.
    let mut ends = [None; 64];
    for (first, rest, any_order) in inp.chains.iter().take(16) {
        let n = 1 + rest.len().min(6);
        if descs + n > 64 {
            break;
        }
        descs += n;
        let first: Vec<u8> = first.iter().copied().take(4096).collect();
        let mut bufs = vec![Buf::readable(&first)];
        bufs.extend(rest.iter().take(6).map(|&(len, w)| Buf { len: (len % 8192) as u32, write: w, data: None }));
        // Readable buffers first, as a driver must, unless the input asks for the order the
        // walk refuses.
        if !any_order {
            bufs.sort_by_key(|b| b.write);
        }
        let mut addrs = [0u64; 8];
        let head = drv.build_chain(&bufs, &mut addrs);
        ends[head as usize] =
            bufs.iter().rposition(|b| b.len > 0).filter(|&i| bufs[i].write).map(|i| addrs[i] + bufs[i].len as u64 - 1);
        if let Some(at) = ends[head as usize] {
            drv.write(at, &[0xEE]);
        }
        drv.publish(head);
    }
    let mut chain: Chain<'_, 16> = Chain::new();
    let lo = base as usize;
    let hi = lo + MEM;
    loop {
        match q.pop_into_uncompleted(&mut chain) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(virtq::PopError::Chain { head, error }) => {
                let used = blk::complete_malformed(&q, head, error);
                let mut b = [0u8];
                if let Some(at) = ends[head as usize] {
                    drv.read(at, &mut b);
                }
                match ends[head as usize] {
                    Some(_) => assert_eq!((used, b[0]), (1, Status::IoErr as u8)),
                    None => assert_eq!(used, 0),
                }
                q.push(head, used);
                continue;
            }
            Err(_) => continue,
        }
        let w = chain.writable_len();
        let used = match blk::parse(&chain, &limits) {
            Ok(req) => {
                if matches!(req.kind, RequestType::In | RequestType::Out) {
                    assert_eq!(req.data_len % 512, 0);
                    let end = req.sector.checked_add(req.data_len as u64 / 512).unwrap();
                    assert!(end <= inp.capacity);
                    let mut total = 0usize;
                    for (ptr, len) in blk::data_pieces(&chain, &req) {
                        assert!(ptr as usize >= lo && ptr as usize + len <= hi, "piece outside guest memory");
                        total += len;
                    }
                    assert_eq!(total, req.data_len as usize);
                }
                let mut out = [DiscardSegment::default(); 8];
                let status = match req.kind {
                    RequestType::Discard | RequestType::WriteZeroes => {
                        match blk::read_segments(&chain, &req, &limits, &mut out) {
                            Ok(segs) => {
                                for s in segs {
                                    assert!(s.sector + s.num_sectors as u64 <= inp.capacity);
                                    assert!(s.num_sectors <= inp.max_sectors);
                                    assert!(!(s.unmap && req.kind == RequestType::Discard));
                                }
                                Status::Ok
                            }
                            Err(e) => e.status().unwrap(),
                        }
                    }
                    _ => Status::Ok,
                };
                blk::complete(&chain, 0, status)
            }
            Err(e) => {
                assert_eq!(e == RequestError::NoStatus, w == 0);
                blk::complete_error(&chain, &e)
            }
        };
        assert!(used <= w);
        assert_eq!(used == 0, w == 0);
        q.push(chain.head(), used);
    }
    let _ = q.publish();
});
