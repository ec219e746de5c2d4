//! virtio-net TX header parsing and RX placement, with and without MRG_RXBUF, over arbitrary
//! chains (sizes, directions, counts) and frames.
//!
//! Invariants: no panic; a placed frame's `num_buffers` equals the buffers it used and its
//! bytes read back exactly; a frame that was not placed published nothing but the completion
//! of malformed chains; TX parse never accepts a chain without a frame; a chain taken in
//! place (`pop_gather_uncompleted`, its copy extended by `Segments::take_front`, checked by
//! `parse_tx_copied` as a whole frame, read back through a `Gather`) gets the same verdict and
//! the same bytes as the copying paths.
#![no_main]

use std::ptr::NonNull;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtq::net::{self, FrameSource, Gather, RxError, RxScratch, VirtioNetHdr};
use virtq::testing::{layout, Buf, TestDriver};
use virtq::{Chain, CopiedChain, Region, RegionTable, Segments, SplitQueue, VirtioFeatures};

const GPA: u64 = 0x10_0000;
const MEM: usize = 1 << 20;

#[derive(Arbitrary, Debug)]
struct Input {
    mrg: bool,
    version_1: bool,
    /// RX buffers: each a list of (len, writable).
    rx: Vec<Vec<(u16, bool)>>,
    frames: Vec<u16>,
    /// TX chains: header bytes and lengths of the pieces.
    tx: Vec<(Vec<u8>, Vec<u16>)>,
    csum: bool,
}

fuzz_target!(|inp: Input| {
    let mut backing = vec![0u64; MEM / 8];
    let base = backing.as_mut_ptr().cast::<u8>();
    let mut mem = RegionTable::<1>::new();
    // SAFETY: `backing` outlives `mem` and the queues; raw-pointer access only.
    mem.add(unsafe { Region::new(GPA, NonNull::new(base).unwrap(), MEM as u64) }).unwrap();
    let (rxcfg, next) = layout(GPA, 64);
    let (txcfg, data) = layout(next, 64);
    let half = (GPA + MEM as u64 - data) / 2;
    let mut rxd = TestDriver::new(&mem, rxcfg, data, half);
    let mut txd = TestDriver::new(&mem, txcfg, data + half, half);
    let mut f = VirtioFeatures::RING_INDIRECT_DESC;
    if inp.version_1 {
        f |= VirtioFeatures::VERSION_1;
    }
    if inp.mrg {
        f |= VirtioFeatures::NET_MRG_RXBUF;
    }
    if inp.csum {
        f |= VirtioFeatures::NET_CSUM;
    }
    // RX: buffers, then frames.
    let mut heads = std::collections::HashMap::new();
    // Descriptors are allocated round-robin from the 64-entry table: stop before a chain
    // would overwrite an earlier one's descriptors.
    let mut descs = 0usize;
    for b in inp.rx.iter().take(63) {
        if descs + b.len().min(6) > 64 {
            break;
        }
        descs += b.len().min(6);
        let bufs: Vec<Buf<'_>> =
            b.iter().take(6).map(|&(len, w)| Buf { len: (len % 2048) as u32, write: w, data: None }).collect();
        if bufs.is_empty() {
            continue;
        }
        let mut addrs = vec![0u64; bufs.len()];
        let head = rxd.build_chain(&bufs, &mut addrs);
        rxd.publish(head);
        heads.insert(head as u32, (addrs, bufs.iter().map(|b| (b.len, b.write)).collect::<Vec<_>>()));
    }
    let mut rxq = SplitQueue::new(&mem, rxcfg, f).unwrap();
    let mut scratch: RxScratch<'_, 8> = RxScratch::new();
    let hdr_len = net::header_len(f);
    for &len in inp.frames.iter().take(16) {
        let frame: Vec<u8> = (0..len % 9000).map(|i| i as u8 ^ 0x5a).collect();
        let before = rxq.next_used();
        match net::receive(&mut rxq, &mut scratch, f, &VirtioNetHdr::default(), &frame) {
            Ok(out) => {
                assert!(out.buffers >= 1);
                assert!(inp.mrg || out.buffers == 1);
                assert_eq!(out.bytes as usize, hdr_len + frame.len());
                let after = rxq.next_used();
                assert_eq!(after.wrapping_sub(before), out.buffers + out.completed_empty);
                // Read the packet back: first used entry of the packet is after the bad ones.
                let first = before.wrapping_add(out.completed_empty);
                let mut got = Vec::new();
                for k in 0..out.buffers {
                    let (id, used_len) = rxd.used_elem(first.wrapping_add(k));
                    let (addrs, bufs) = &heads[&id];
                    let mut left = used_len as usize;
                    for (a, &(blen, w)) in addrs.iter().zip(bufs) {
                        if !w || left == 0 {
                            continue;
                        }
                        let n = (blen as usize).min(left);
                        let mut b = vec![0u8; n];
                        rxd.read(*a, &mut b);
                        got.extend_from_slice(&b);
                        left -= n;
                    }
                }
                if inp.mrg || inp.version_1 {
                    assert_eq!(u16::from_le_bytes([got[10], got[11]]), out.buffers, "num_buffers");
                }
                assert_eq!(&got[hdr_len..], &frame[..]);
            }
            Err(RxError::NoBuffers) | Err(RxError::FrameTooLarge { .. }) | Err(RxError::TooManyBuffers) => {}
            Err(RxError::Ring(_)) | Err(RxError::OffloadNotNegotiated) => {}
        }
    }
    let _ = rxq.publish();
    // TX: header + pieces.
    let mut descs = 0usize;
    for (h, pieces) in inp.tx.iter().take(16) {
        if descs + 1 + pieces.len().min(4) > 64 {
            break;
        }
        descs += 1 + pieces.len().min(4);
        let mut chunks: Vec<Vec<u8>> = vec![h.iter().copied().take(16).collect()];
        for &p in pieces.iter().take(4) {
            chunks.push(vec![0xab; (p % 2000) as usize]);
        }
        let bufs: Vec<Buf<'_>> = chunks.iter().map(|c| Buf::readable(c)).collect();
        txd.add_chain(&bufs);
    }
    let mut txq = SplitQueue::new(&mem, txcfg, f).unwrap();
    // A second device view of the same ring takes each chain the way the vhost-user data path
    // does (pop_read + parse_tx_copied): both must reach the same verdict and frame.
    let mut fused = SplitQueue::new(&mem, txcfg, f).unwrap();
    // A third takes them in place, as virtq-net's switch does (a copy of the first bytes, the
    // segments kept for the frame to be read from later).
    let mut gathered = SplitQueue::new(&mem, txcfg, f).unwrap();
    // The copy of a chain taken in place: its first 30 bytes (virtq-net's `TX_HEAD`), in a
    // buffer as long as the copying path's (the same length limit).
    const HEAD: usize = 30;
    let mut snap = vec![0u8; 1 << 17];
    let mut whole = vec![0u8; 16384];
    let mut chain = Chain::<8>::new();
    let mut frame = vec![0u8; 16384];
    let mut copy = vec![0u8; 1 << 17];
    while let Ok(Some(_)) = txq.pop_into(&mut chain) {
        let segments = net::parse_tx(&chain, f);
        if let Ok(pkt) = segments {
            assert!(pkt.frame_len > 0);
            assert_eq!(pkt.frame_len as usize + pkt.header_len, chain.readable_len() as usize);
            let n = pkt.read_frame(&chain, &mut frame);
            assert_eq!(n, (pkt.frame_len as usize).min(frame.len()));
        }
        {
            let c = match fused.pop_read(&mut copy) {
                Ok(Some(c)) => c,
                other => panic!("pop_into took a chain that pop_read did not: {other:?}"),
            };
            assert_eq!(c.head, chain.head());
            let copied = net::parse_tx_copied(&c, &copy, f);
            assert_eq!(copied, segments, "the fused TX path agrees with the segment path");
            if let Ok(pkt) = copied {
                let n = pkt.read_frame(&chain, &mut frame);
                assert_eq!(frame[..n], copy[pkt.header_len..pkt.header_len + n]);
            }
        }
        {
            let mut segs: Segments<'_, 16> = Segments::new();
            let c = match gathered.pop_gather_uncompleted(&mut snap, HEAD, &mut segs) {
                Ok(Some(c)) => c,
                other => panic!("pop_into took a chain that pop_gather_uncompleted did not: {other:?}"),
            };
            let mut k = c.bytes as usize;
            if k < HEAD {
                k += segs.take_front(0, &mut snap[k..HEAD]);
            }
            assert!(k >= HEAD.min(c.readable_len as usize), "the copy holds the first {HEAD} bytes");
            let head = net::parse_tx_copied(&CopiedChain { bytes: c.readable_len, ..c }, &snap, f);
            assert_eq!(head, segments, "the in-place TX path agrees with the segment path");
            if let Ok(pkt) = head {
                let h = pkt.header_len;
                let g = Gather::new(&snap[h..k], segs.as_slice(), c.readable_len as usize - k);
                assert_eq!(g.len(), pkt.frame_len as usize);
                let n = g.read_into(&mut whole);
                let m = pkt.read_frame(&chain, &mut frame);
                assert_eq!(whole[..n.min(m)], frame[..n.min(m)]);
            }
        }
        txq.push(chain.head(), 0);
    }
    let _ = txq.publish();
    drop(rxq);
    drop(txq);
    drop(rxd);
    drop(txd);
    drop(mem);
    drop(backing);
});
