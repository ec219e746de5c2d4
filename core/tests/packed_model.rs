//! Property test of the packed ring against a reference model: steps of random chains
//! (direct or indirect, random buffers and directions, buffer ids, and one of several
//! deliberate breaks), popped by the device through all three pop paths, completed in a random
//! order, published, and read back by the driver, over many rounds of the ring so that both
//! wrap counters turn. The model predicts each chain's result exactly (the bytes and lengths,
//! or the [`PopError`]), the used descriptors the driver sees (ids, lengths, order), and where
//! both sides' ring positions end up.

mod common;

use common::{Guest, GPA};
use proptest::prelude::*;
use virtq::chain::ChainError;
use virtq::desc::DescFlags;
use virtq::testing::{packed_layout, PackedDesc, PackedDriver};
use virtq::{Chain, PackedQueue, PopError, RegionTable, RingPosition, VirtioFeatures};

const MEM: usize = 1 << 18;
const UNMAPPED: u64 = 0x9000_0000;

fn config() -> ProptestConfig {
    ProptestConfig {
        // Miri runs every case through its interpreter: a handful exercises the same paths.
        cases: if cfg!(miri) { 2 } else { 256 },
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Break {
    None,
    /// The buffer id is ≥ the queue size.
    IdOutOfRange,
    /// The id of an earlier chain of the step that is still in flight.
    IdInUse,
    /// NEXT on the last descriptor (only for the last chain of a step).
    Truncated,
    /// The first buffer is outside guest memory.
    Unmapped,
    /// A writable buffer before a readable one.
    ReadableAfterWritable,
    /// An indirect table of 24 bytes.
    IndirectLength,
}

#[derive(Clone, Debug)]
struct Spec {
    indirect: bool,
    bufs: Vec<(u32, bool)>,
    brk: Break,
    /// Which pop path the device uses: chain, fused read, fused write.
    path: u8,
}

fn spec() -> impl Strategy<Value = Spec> {
    let bufs = prop::collection::vec((0u32..200, any::<bool>()), 1..4).prop_map(|mut v| {
        v.sort_by_key(|&(_, w)| w);
        v
    });
    let brk = prop_oneof![
        8 => Just(Break::None),
        1 => Just(Break::IdOutOfRange),
        1 => Just(Break::IdInUse),
        1 => Just(Break::Truncated),
        1 => Just(Break::Unmapped),
        1 => Just(Break::ReadableAfterWritable),
        1 => Just(Break::IndirectLength),
    ];
    (any::<bool>(), bufs, brk, 0u8..3).prop_map(|(indirect, bufs, brk, path)| Spec { indirect, bufs, brk, path })
}

#[derive(Debug, PartialEq)]
enum Expect {
    Ok { readable: Vec<u8>, writable_len: u32 },
    Err(PopError),
}

type Driver<'m> = PackedDriver<'m, RegionTable<8>>;

/// Writes `s` at the driver's position with buffer id `id` (the head's flags last) and
/// returns what the device must make of it.
fn build(drv: &mut Driver<'_>, s: &Spec, id: u16, size: u16, seed: u8) -> Expect {
    let start = drv.next_position();
    let mut bufs = s.bufs.clone();
    if s.brk == Break::ReadableAfterWritable {
        bufs.insert(0, (1, true));
        if bufs.iter().all(|&(_, w)| w) {
            bufs.push((1, false));
        }
    }
    let mut readable = Vec::new();
    let mut writable_len = 0;
    // Buffer descriptors (addr, len, flags without the AVAIL/USED pair).
    let mut descs = Vec::new();
    for (i, &(len, write)) in bufs.iter().enumerate() {
        let (addr, len) =
            if i == 0 && s.brk == Break::Unmapped { (UNMAPPED, len.max(1)) } else { (drv.alloc(len as u64), len) };
        if write {
            writable_len += len;
        } else if addr != UNMAPPED {
            let data: Vec<u8> = (0..len).map(|k| seed.wrapping_add(i as u8).wrapping_add(k as u8)).collect();
            drv.write(addr, &data);
            readable.extend_from_slice(&data);
        }
        descs.push((addr, len, if write { DescFlags::WRITE.bits() } else { 0 }));
    }
    // Ring descriptors.
    let indirect = s.indirect && s.brk != Break::Truncated;
    let ring: Vec<(u64, u32, u16)> = if indirect {
        let table = drv.alloc(16 * descs.len() as u64);
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[14..].copy_from_slice(&flags.to_le_bytes());
            drv.write(table + 16 * i as u64, &raw);
        }
        let len = if s.brk == Break::IndirectLength { 24 } else { 16 * descs.len() as u32 };
        vec![(table, len, DescFlags::INDIRECT.bits())]
    } else {
        let n = descs.len();
        descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                let next = i + 1 < n || s.brk == Break::Truncated;
                (a, l, f | if next { DescFlags::NEXT.bits() } else { 0 })
            })
            .collect()
    };
    let n = ring.len() as u16;
    let mut pos = start;
    let mut head = None;
    for &(addr, len, flags) in &ring {
        let d = PackedDesc { addr, len, id, flags: flags | Driver::avail_bits(pos.wrap) };
        if head.is_none() {
            head = Some((pos.index, d));
        } else {
            drv.write_desc(pos.index, d);
        }
        pos = if pos.index + 1 == size {
            RingPosition { index: 0, wrap: !pos.wrap }
        } else {
            RingPosition { index: pos.index + 1, wrap: pos.wrap }
        };
    }
    let (slot, d) = head.unwrap();
    drv.write_desc(slot, d);
    drv.skip(n);
    if id < size && s.brk != Break::IdInUse {
        drv.set_chain_len(id, n);
    }
    let chain_err = |error| Expect::Err(PopError::Chain { head: id, error });
    let entries = descs.len() as u32;
    match s.brk {
        Break::IdOutOfRange => Expect::Err(PopError::HeadOutOfRange { head: id }),
        Break::IdInUse => Expect::Err(PopError::IdInUse { id }),
        Break::IndirectLength if indirect => chain_err(ChainError::IndirectLength { len: 24 }),
        // The table limit defaults to the queue size.
        _ if indirect && entries > size as u32 => chain_err(ChainError::IndirectTooLarge { entries }),
        Break::Truncated if n == size => chain_err(ChainError::ChainTooLong),
        Break::Truncated => chain_err(ChainError::NotAvailable { index: pos.index }),
        Break::Unmapped => chain_err(ChainError::Unmapped { addr: UNMAPPED }),
        Break::ReadableAfterWritable => chain_err(ChainError::ReadableAfterWritable),
        _ => Expect::Ok { readable, writable_len },
    }
}

/// Descriptors `s` takes in the ring (as `build` lays it out).
fn ring_len(s: &Spec) -> u16 {
    if s.indirect && s.brk != Break::Truncated {
        1
    } else {
        (s.bufs.len() + if s.brk == Break::ReadableAfterWritable { 2 } else { 0 }) as u16
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn packed_ring_matches_the_model(
        size in prop_oneof![Just(3u16), Just(5), Just(8)],
        steps in prop::collection::vec((prop::collection::vec(spec(), 1..5), any::<u64>(), any::<u8>()), 1..12),
        in_order in any::<bool>(),
    ) {
        let g = Guest::new(MEM);
        let (cfg, data) = packed_layout(GPA, size);
        let mut drv = PackedDriver::new(&g.mem, cfg, data, MEM as u64 - (data - GPA));
        let mut f = VirtioFeatures::VERSION_1 | VirtioFeatures::RING_INDIRECT_DESC;
        if in_order {
            f |= VirtioFeatures::IN_ORDER;
        }
        let mut q = PackedQueue::<_>::new(&g.mem, cfg, f).unwrap();
        let mut chain = Chain::<8>::new();
        let mut buf = vec![0u8; 1024];
        for (specs, perm, seed) in steps {
            drv.reset_alloc();
            // What fits in the ring this step (nothing is in flight between steps).
            let mut room = size;
            let mut chosen = Vec::new();
            for s in specs {
                let n = ring_len(&s);
                if n <= room {
                    room -= n;
                    chosen.push(s);
                }
            }
            let last = chosen.len().saturating_sub(1);
            let mut expects = Vec::new();
            let mut ids = Vec::new();
            // With IN_ORDER only well-formed chains: the error policy completes a malformed
            // chain at once, which is out of order while earlier chains are in flight (as in
            // the split ring), and a chain whose id is out of range is never completed, which
            // leaves a gap no batch of an in-order driver accounts for.
            let mut end_of_last_ok = None;
            for (i, s) in chosen.iter_mut().enumerate() {
                if (s.brk == Break::Truncated && i != last)
                    || in_order
                {
                    s.brk = Break::None;
                }
                // A duplicate must name a chain that is still in flight: an earlier good one.
                // With IN_ORDER the device does not look for duplicates.
                let dup_of = expects.iter().position(|e| matches!(e, Expect::Ok { .. }));
                if s.brk == Break::IdInUse && (dup_of.is_none() || in_order) {
                    s.brk = Break::None;
                }
                let id = match s.brk {
                    Break::IdOutOfRange => size + i as u16,
                    Break::IdInUse => ids[dup_of.unwrap()],
                    _ => i as u16,
                };
                let e = build(&mut drv, s, id, size, seed.wrapping_add(i as u8));
                if matches!(e, Expect::Ok { .. }) {
                    end_of_last_ok = Some(drv.next_position());
                }
                expects.push(e);
                ids.push(id);
            }
            // Pop everything; errors' completions (len 0) are written at once, in pop order.
            let mut used_expect = Vec::new();
            let mut ok = Vec::new();
            for (s, e) in chosen.iter().zip(&expects) {
                // A hint only: whatever the ring holds ahead, it changes nothing below.
                q.prefetch();
                let got = match s.path {
                    0 => q.pop_into(&mut chain).map(|some| {
                        prop_assert!(some.is_some());
                        let mut r = vec![0u8; chain.readable_len() as usize];
                        chain.read_at(0, &mut r);
                        Ok((chain.head(), r, chain.writable_len()))
                    }),
                    1 => q.pop_read(&mut buf).map(|c| {
                        let c = c.expect("a chain");
                        Ok((c.head, buf[..c.bytes as usize].to_vec(), c.writable_len))
                    }),
                    _ => q.pop_write(&buf[..64]).map(|c| {
                        let c = c.expect("a chain");
                        prop_assert_eq!(c.bytes, c.writable_len.min(64));
                        Ok((c.head, vec![], c.writable_len))
                    }),
                };
                match (got, e) {
                    (Ok(r), Expect::Ok { readable, writable_len }) => {
                        let (head, bytes, wlen) = r?;
                        if s.path != 2 {
                            prop_assert_eq!(&bytes, readable);
                        }
                        prop_assert_eq!(wlen, *writable_len);
                        ok.push((head, wlen));
                    }
                    (Err(got), Expect::Err(want)) => {
                        prop_assert_eq!(got, *want);
                        if let PopError::Chain { head, .. } = got {
                            used_expect.push((head, 0));
                        }
                    }
                    (got, want) => prop_assert!(false, "got {:?}, model {:?}", got.map(|r| r.map(|r| r.0)), want),
                }
            }
            prop_assert_eq!(q.pop_read(&mut buf), Ok(None));
            // Complete the good ones in a random order (IN_ORDER: in order, as one batch).
            if in_order && !ok.is_empty() {
                // The batch's earlier buffers are implied by the last one's used descriptor; the
                // driver learns the batch length from its own bookkeeping.
                let &(last_id, last_len) = ok.last().unwrap();
                prop_assert!(q.push_in_order_batch(last_id, last_len, ok.len() as u16));
                used_expect.push((last_id, last_len));
            } else {
                let mut order: Vec<usize> = (0..ok.len()).collect();
                let mut p = perm;
                for i in (1..order.len()).rev() {
                    order.swap(i, (p % (i as u64 + 1)) as usize);
                    p /= i as u64 + 1;
                }
                for &i in &order {
                    q.push(ok[i].0, ok[i].1);
                    used_expect.push(ok[i]);
                }
            }
            let notify = q.publish();
            prop_assert_eq!(notify, !used_expect.is_empty());
            let mut seen = Vec::new();
            if let (true, Some(end)) = (in_order, end_of_last_ok) {
                // One used descriptor for the batch, which spans from the driver's used
                // position to the end of the last chain.
                let start = drv.used_position();
                let span = if end.wrap == start.wrap { end.index - start.index } else { end.index + size - start.index };
                drv.set_chain_len(ok.last().unwrap().0, span);
            }
            while let Some(u) = drv.pop_used() {
                seen.push(u);
            }
            prop_assert_eq!(seen, used_expect);
            prop_assert_eq!(q.next_avail(), drv.next_position());
            prop_assert_eq!(q.next_used(), drv.used_position());
            // A chain that was consumed and never completed (id out of range or in use) is a
            // gap the driver never gets back: the device's used position stays behind by its
            // descriptors, and a driver that reuses those slots (as this one would) has its
            // next chains overwritten by used descriptors. The run ends there.
            if chosen.iter().any(|s| matches!(s.brk, Break::IdOutOfRange | Break::IdInUse)) {
                break;
            }
        }
    }
}
