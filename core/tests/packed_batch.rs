//! The packed ring's batch pops against single pops, on twin guests: the same ring contents,
//! one device taking chains in batches ([`PackedQueue::pop_read_batch`] for transmit buffers,
//! the net receive burst's batches of receive buffers), the other one chain at a time
//! (`pop_read_uncompleted`, `net::receive` frame by frame). Every chain kind a batch must leave
//! to the single pop (two descriptors, indirect, the other direction, not available, an id out
//! of range or taken twice, an empty, unmapped, overflowing or region-spanning buffer, a
//! receive buffer too small for the frame) is put at every position of a batch, on rings of
//! size 8 and 6 entered at every slot (so batches meet the ring's end), with and without
//! `VIRTIO_F_IN_ORDER` (with it, transmit chains are completed in runs with one used
//! descriptor, as the adapter completes them, so the used position jumps to the end a batch
//! recorded for a run's last chain). The two devices must report the same chains, bytes and
//! errors, end at the same positions, and leave guest memory (ring, buffers) byte for byte the
//! same.

mod common;

use common::{features, Guest, GPA};
use virtq::net::{self, RxBurst, RxError, RxScratch, VirtioNetHdr};
use virtq::packed::{PackedQueue, BATCH};
use virtq::testing::{packed_layout, Buf, PackedDesc, PackedDriver};
use virtq::{CopiedChain, PopError, RegionTable, VirtioFeatures};

type Mem = RegionTable<8>;

/// Each of the two regions.
const REGION: usize = 1 << 13;
/// The second region, right after the first: a buffer across the boundary takes two
/// translations.
const REGION2: u64 = GPA + REGION as u64;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Good,
    /// Longer than the device's copy buffer (transmit) or than one frame (receive).
    Long,
    TwoDescs,
    Indirect,
    OtherDirection,
    NotAvailable,
    IdOutOfRange,
    IdTwice,
    Empty,
    Unmapped,
    Overflow,
    AcrossRegions,
    /// A receive buffer shorter than header and frame (the mergeable path's), or a readable
    /// one of 8 bytes.
    Small,
    /// A receive buffer shorter than the virtio-net header (unusable: completed empty).
    Tiny,
    /// A good chain; the receive side's frame for it is longer than one buffer.
    BigFrame,
    /// A good chain; the receive side's frame for it asks for an offload the driver did not
    /// negotiate (refused, taking no buffer).
    OffloadFrame,
}

const KINDS: [Kind; 16] = [
    Kind::Good,
    Kind::Long,
    Kind::TwoDescs,
    Kind::Indirect,
    Kind::OtherDirection,
    Kind::NotAvailable,
    Kind::IdOutOfRange,
    Kind::IdTwice,
    Kind::Empty,
    Kind::Unmapped,
    Kind::Overflow,
    Kind::AcrossRegions,
    Kind::Small,
    Kind::Tiny,
    Kind::BigFrame,
    Kind::OffloadFrame,
];

/// Bytes of each transmitted chain (a `Long` one: more than the device's 64-byte buffers).
const TX_LEN: usize = 40;

fn guest() -> Guest {
    let mut g = Guest::new(REGION);
    g.add_region(REGION2, REGION);
    g
}

fn driver(g: &Guest, size: u16) -> PackedDriver<'_, Mem> {
    let (cfg, data) = packed_layout(GPA, size);
    PackedDriver::new(&g.mem, cfg, data, REGION2 - 64 - data)
}

fn memory(drv: &PackedDriver<'_, Mem>) -> Vec<u8> {
    let mut m = vec![0u8; 2 * REGION];
    drv.read(GPA, &mut m);
    m
}

/// Writes chain `i` of a script: `kind`, device-writable buffers if `write`.
fn add(drv: &mut PackedDriver<'_, Mem>, kind: Kind, i: usize, write: bool, ids: &mut Vec<u16>) {
    let data: Vec<u8> = (0..3 * TX_LEN).map(|k| (i * 31 + k) as u8).collect();
    // Receive buffers hold a frame of `frames` with its header, except where noted.
    let buf = |len: usize, w: bool| if w { Buf::writable(len as u32 * 3) } else { Buf::readable(&data[..len]) };
    let size = drv.config().size;
    let id = drv.next_id();
    let id = match kind {
        Kind::IdOutOfRange => size,
        Kind::IdTwice => *ids.last().unwrap_or(&id),
        _ => id,
    };
    ids.push(id);
    let pos = drv.next_position();
    let raw = |drv: &mut PackedDriver<'_, Mem>, addr: u64, len: u32| {
        let flags = PackedDriver::<Mem>::avail_bits(pos.wrap) | if write { 2 } else { 0 };
        drv.write_desc(pos.index, PackedDesc { addr, len, id, flags });
        drv.set_chain_len(id, 1);
        drv.skip(1);
    };
    match kind {
        Kind::Good | Kind::IdOutOfRange | Kind::IdTwice | Kind::BigFrame | Kind::OffloadFrame => {
            drv.add_chain_with_id(&[buf(TX_LEN, write)], id);
        }
        Kind::Long => {
            drv.add_chain_with_id(&[buf(3 * TX_LEN, write)], id);
        }
        Kind::Small => {
            let small = if write { Buf::writable(20) } else { Buf::readable(&data[..8]) };
            drv.add_chain_with_id(&[small], id);
        }
        Kind::Tiny => {
            let tiny = if write { Buf::writable(8) } else { Buf::readable(&data[..4]) };
            drv.add_chain_with_id(&[tiny], id);
        }
        Kind::TwoDescs => {
            drv.add_chain_with_id(&[buf(TX_LEN / 2, write), buf(TX_LEN / 2, write)], id);
        }
        Kind::Indirect => {
            // `add_indirect_chain` takes the next id itself; `id` stays unused.
            ids.pop();
            ids.push(drv.add_indirect_chain(&[buf(TX_LEN, write)]));
        }
        Kind::OtherDirection => {
            drv.add_chain_with_id(&[buf(TX_LEN, !write)], id);
        }
        Kind::NotAvailable => {
            let flags = PackedDriver::<Mem>::avail_bits(!pos.wrap);
            drv.write_desc(pos.index, PackedDesc { addr: drv.config().used_ring, len: 4, id, flags });
            drv.skip(1);
        }
        Kind::Empty => raw(drv, REGION2 - 64, 0),
        Kind::Unmapped => raw(drv, 0x9000_0000, 64),
        Kind::Overflow => raw(drv, u64::MAX - 8, 64),
        Kind::AcrossRegions => {
            if !write {
                drv.write(REGION2 - 24, &data[..TX_LEN]);
            }
            raw(drv, REGION2 - 24, TX_LEN as u32)
        }
    }
}

/// Takes `pre` good chains and completes them, so that the script starts at slot `pre`.
fn enter_at(q: &mut PackedQueue<'_, Mem>, drv: &mut PackedDriver<'_, Mem>, pre: u16) {
    for _ in 0..pre {
        drv.add_chain(&[Buf::readable(b"pre")]);
        let c = q.pop_read(&mut [0u8; 8]).unwrap().unwrap();
        q.push(c.head, 0);
    }
    let _ = q.publish();
    while drv.pop_used().is_some() {}
    drv.reset_alloc();
}

#[derive(Debug, PartialEq)]
enum Event {
    Chain(CopiedChain, Vec<u8>),
    Err(PopError),
}

/// Drains the transmit ring, in batches or one chain at a time; returns what was taken and how
/// many chains the batches took. Without IN_ORDER each chain is completed as it is taken; with
/// it, as the adapter does, runs of chains are completed with one used descriptor of len 0
/// (`push_in_order_batch`, which moves the used position to the end the pop recorded for the
/// run's last chain), a run ending before any error (a malformed chain is then completed alone,
/// len 0) and at the end, and here also every third chain (the test's own cut, so that runs
/// end inside batches and across them).
fn drain_tx(q: &mut PackedQueue<'_, Mem>, batch: bool, in_order: bool) -> (Vec<Event>, usize) {
    let (mut events, mut batched) = (Vec::new(), 0);
    // (last id, chains) of the run not completed yet.
    let mut run: Option<(u16, u16)> = None;
    let took = |q: &mut PackedQueue<'_, Mem>, c: &CopiedChain, run: &mut Option<(u16, u16)>| {
        if !in_order {
            q.push(c.head, c.bytes);
            return;
        }
        let k = run.map_or(0, |(_, k)| k) + 1;
        *run = Some((c.head, k));
        if k == 3 {
            end_run(q, run);
        }
    };
    loop {
        if batch {
            let mut bufs = [[0u8; 64]; BATCH];
            let [a, b, c, d] = &mut bufs;
            let got = q.pop_read_batch(&mut [&mut a[..], &mut b[..], &mut c[..], &mut d[..]]);
            for (c, buf) in got.as_slice().iter().zip(&bufs) {
                events.push(Event::Chain(*c, buf[..c.bytes as usize].to_vec()));
                took(q, c, &mut run);
            }
            batched += got.as_slice().len();
            if !got.as_slice().is_empty() {
                continue;
            }
        }
        let mut buf = [0u8; 64];
        match q.pop_read_uncompleted(&mut buf) {
            Ok(None) => break,
            Ok(Some(c)) => {
                events.push(Event::Chain(c, buf[..c.bytes as usize].to_vec()));
                took(q, &c, &mut run);
            }
            Err(e) => {
                events.push(Event::Err(e));
                end_run(q, &mut run);
                if let PopError::Chain { head, .. } = e {
                    q.push(head, 0);
                }
            }
        }
    }
    end_run(q, &mut run);
    (events, batched)
}

/// Completes the IN_ORDER run, if any: one used descriptor for its last chain.
fn end_run(q: &mut PackedQueue<'_, Mem>, run: &mut Option<(u16, u16)>) {
    if let Some((last, k)) = run.take() {
        assert!(q.push_in_order_batch(last, 0, k), "IN_ORDER was negotiated");
    }
}

/// The frames the receive side places: 60 bytes each, distinct, with a plain header; the
/// one at `at` as `kind` asks.
fn frames(n: usize, at: usize, kind: Kind) -> Vec<(VirtioNetHdr, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let len = if i == at && kind == Kind::BigFrame { 300 } else { 60 };
            let mut hdr = VirtioNetHdr::default();
            if i == at && kind == Kind::OffloadFrame {
                hdr.flags = virtq::net::header::VIRTIO_NET_HDR_F_NEEDS_CSUM;
            }
            (hdr, (0..len).map(|k| (i * 7 + k) as u8).collect())
        })
        .collect()
}

/// Places `frames` with one receive burst, or with `net::receive` frame by frame, folded into
/// the burst's report.
fn fill_rx(
    q: &mut PackedQueue<'_, Mem>,
    f: VirtioFeatures,
    frames: &[(VirtioNetHdr, Vec<u8>)],
    burst: bool,
) -> RxBurst {
    let mut s: RxScratch<'_> = RxScratch::new();
    if burst {
        return net::receive_burst(q, &mut s, f, frames.len(), |i| (frames[i].0, &frames[i].1[..]));
    }
    let mut out = RxBurst::default();
    for (hdr, frame) in frames {
        match net::receive(q, &mut s, f, hdr, frame) {
            Ok(o) => {
                out.placed += 1;
                out.bytes += frame.len() as u64;
                out.bad_chains += u32::from(o.bad_chains);
            }
            Err(RxError::FrameTooLarge { .. } | RxError::TooManyBuffers | RxError::OffloadNotNegotiated) => {
                out.refused += 1
            }
            Err(e) => {
                out.stopped = Some(e);
                break;
            }
        }
    }
    out
}

/// One script on twin guests: `chains` chains, `kind` at `at` and good ones elsewhere,
/// entered at slot `pre` of a ring of `size`.
fn twins(size: u16, pre: u16, at: usize, kind: Kind, f: VirtioFeatures, write: bool) {
    let chains = size as usize - 2;
    let what = format!("size {size}, entered at {pre}, {kind:?} at {at}, {f:?}, writable {write}");
    let run = |batch: bool| {
        let g = guest();
        let mut drv = driver(&g, size);
        let mut q = PackedQueue::<'_, Mem>::new(&g.mem, drv.config(), f).unwrap();
        enter_at(&mut q, &mut drv, pre);
        let mut ids = Vec::new();
        for i in 0..chains {
            add(&mut drv, if i == at { kind } else { Kind::Good }, i, write, &mut ids);
        }
        let (events, batched) = if write {
            let burst = fill_rx(&mut q, f, &frames(chains, at, kind), batch);
            // Chains the burst did not use are given back: the next pops see them again.
            let (rest, _) = drain_tx(&mut q, false, false);
            (vec![format!("{burst:?}"), format!("{rest:?}")], 0)
        } else {
            let (events, batched) = drain_tx(&mut q, batch, f.contains(VirtioFeatures::IN_ORDER));
            (vec![format!("{events:?}")], batched)
        };
        let _ = q.publish();
        let mut used = Vec::new();
        while let Some(u) = drv.pop_used() {
            used.push(u);
        }
        (events, batched, q.next_avail(), q.next_used(), used, memory(&drv))
    };
    let (b, s) = (run(true), run(false));
    assert_eq!(b.0, s.0, "{what}: what the device took");
    assert_eq!((b.2, b.3), (s.2, s.3), "{what}: positions");
    // With IN_ORDER a driver's walk (`pop_used`) skips only the run's last chain past its
    // used descriptor, so it stops after the first run; the comparison of all guest memory
    // below covers the rest of the ring, byte for byte.
    assert_eq!(b.4, s.4, "{what}: used descriptors");
    assert!(b.5 == s.5, "{what}: guest memory differs");
    // The batch path was taken: on the transmit side, every good chain before the first one
    // it must leave, and the chains after that one, are the batch's.
    if !write && kind == Kind::Good {
        assert_eq!(b.1, chains, "{what}: every chain by batch");
    }
    if !write && at > 0 {
        assert!(b.1 >= at.min(BATCH).min((size - pre) as usize), "{what}: batched {}", b.1);
    }
}

/// Mergeable receive buffers, with and without IN_ORDER, and single ones (where a frame
/// longer than its buffer is refused).
fn feature_sets() -> [VirtioFeatures; 3] {
    let f = features() | VirtioFeatures::NET_MRG_RXBUF;
    [f, f | VirtioFeatures::IN_ORDER, features()]
}

/// Every script, or under Miri (which interprets every access) the ring of 6 entered where
/// the first batch meets its end, with the odd chain second, without IN_ORDER.
fn scripts(write: bool) {
    let sizes: &[u16] = if cfg!(miri) { &[6] } else { &[8, 6] };
    for &size in sizes {
        let pres: Vec<u16> = if cfg!(miri) { vec![size - 3] } else { (0..size).collect() };
        let ats: Vec<usize> = if cfg!(miri) { vec![1] } else { (0..size as usize - 2).collect() };
        for &pre in &pres {
            for &at in &ats {
                for kind in KINDS {
                    for f in feature_sets().into_iter().take(if cfg!(miri) { 1 } else { 3 }) {
                        twins(size, pre, at, kind, f, write);
                    }
                }
            }
        }
    }
}

#[test]
fn transmit_batches_take_what_single_pops_take() {
    scripts(false);
}

#[test]
fn receive_bursts_take_what_frame_by_frame_receives_take() {
    scripts(true);
}

/// A batch stops at the ring's end and takes the rest from slot 0 with the other wrap
/// counter; the split ring has no batch.
#[test]
fn a_batch_never_wraps_and_the_split_ring_has_none() {
    let g = guest();
    let mut drv = driver(&g, 6);
    let mut q = PackedQueue::<'_, Mem>::new(&g.mem, drv.config(), features()).unwrap();
    enter_at(&mut q, &mut drv, 4);
    for i in 0..4 {
        drv.add_chain(&[Buf::readable(&[i as u8; 8])]);
    }
    let mut bufs = [[0u8; 8]; BATCH];
    let [a, b, c, d] = &mut bufs;
    let got = q.pop_read_batch(&mut [&mut a[..], &mut b[..], &mut c[..], &mut d[..]]);
    assert_eq!(got.as_slice().len(), 2, "slots 4 and 5");
    assert_eq!(q.next_avail(), virtq::RingPosition { index: 0, wrap: false });
    let [a, b, c, d] = &mut bufs;
    let got = q.pop_read_batch(&mut [&mut a[..], &mut b[..], &mut c[..], &mut d[..]]);
    assert_eq!(got.as_slice().len(), 2, "slots 0 and 1 of the next round");
    assert_eq!(bufs[1], [3u8; 8]);

    let (scfg, _) = virtq::testing::layout(GPA, 8);
    let mut sq = virtq::SplitQueue::new(&g.mem, scfg, features()).unwrap();
    let got = virtq::Virtqueue::pop_read_batch(&mut sq, &mut [&mut [0u8; 8][..]]);
    assert!(got.as_slice().is_empty());
}
