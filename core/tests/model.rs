//! Property tests: the device side against a simple reference model.
//!
//! 1. `well_formed_and_malformed_chains_match_the_model`: random chains (direct or indirect,
//!    random buffer sizes and directions), some deliberately broken in one of several ways. The
//!    model predicts, per chain, either the exact readable bytes and writable length or the
//!    exact [`ChainError`]; the device must agree, and the used ring must hold every head once,
//!    in order, with the model's length (0 for a broken chain).
//! 2. `garbage_rings_never_escape_guest_memory`: descriptor table, avail ring and indices filled
//!    with arbitrary bytes. The device must not panic, every segment must lie inside guest
//!    memory, the used index must only move forward, and every completion must be for a head
//!    the device popped.

mod common;

use common::{Guest, GPA};
use proptest::prelude::*;
use virtq::chain::ChainError;
use virtq::desc::{DescFlags, Descriptor};
use virtq::testing::{layout, Buf, TestDriver};
use virtq::{Chain, PopError, RegionTable, SplitQueue, VirtioFeatures};

const SIZE: u16 = 64;
const MEM: usize = 1 << 18;

fn config() -> ProptestConfig {
    ProptestConfig {
        // Miri runs every case through its interpreter: a handful exercises the same paths.
        cases: if cfg!(miri) { 3 } else { 256 },
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[derive(Clone, Copy, Debug)]
enum Break {
    None,
    NextOutOfRange,
    SelfLoop,
    ReadableAfterWritable,
    Unmapped,
    IndirectWithNext,
    IndirectLength,
}

#[derive(Clone, Debug)]
struct Spec {
    indirect: bool,
    /// (length, writable) in chain order; readable ones first.
    bufs: Vec<(u32, bool)>,
    brk: Break,
}

fn spec() -> impl Strategy<Value = Spec> {
    let bufs = prop::collection::vec((0u32..300, any::<bool>()), 1..5).prop_map(|mut v| {
        v.sort_by_key(|&(_, w)| w);
        v
    });
    let brk = prop_oneof![
        6 => Just(Break::None),
        1 => Just(Break::NextOutOfRange),
        1 => Just(Break::SelfLoop),
        1 => Just(Break::ReadableAfterWritable),
        1 => Just(Break::Unmapped),
        1 => Just(Break::IndirectWithNext),
        1 => Just(Break::IndirectLength),
    ];
    (any::<bool>(), bufs, brk).prop_map(|(indirect, bufs, brk)| Spec { indirect, bufs, brk })
}

/// What the model expects of one chain.
#[derive(Debug, PartialEq)]
enum Expect {
    Ok { readable: Vec<u8>, writable_len: u32 },
    Err(ChainError),
}

/// Builds `s` in the driver's memory (without publishing) and returns its head and expectation.
fn build(drv: &mut TestDriver<'_, RegionTable<8>>, s: &Spec, seed: u8) -> (u16, Expect) {
    let data: Vec<Vec<u8>> = s
        .bufs
        .iter()
        .enumerate()
        .map(|(i, &(len, _))| (0..len).map(|j| seed ^ (i as u8) ^ j as u8).collect())
        .collect();
    let bufs: Vec<Buf<'_>> = s
        .bufs
        .iter()
        .zip(&data)
        .map(|(&(len, write), d)| if write { Buf::writable(len) } else { Buf::readable(d) })
        .collect();
    let readable: Vec<u8> =
        s.bufs.iter().zip(&data).filter(|((_, w), _)| !w).flat_map(|(_, d)| d.iter().copied()).collect();
    let writable_len: u32 = s.bufs.iter().filter(|b| b.1).map(|b| b.0).sum();
    let ok = Expect::Ok { readable, writable_len };

    if !s.indirect {
        let mut addrs = vec![0u64; bufs.len()];
        let head = drv.build_chain(&bufs, &mut addrs);
        let n = bufs.len() as u16;
        let last = (head + n - 1) % SIZE;
        let last_desc =
            |len: u32, flags: DescFlags, next: u16| Descriptor { addr: addrs[n as usize - 1], len, flags, next };
        let (last_len, last_write) = s.bufs[n as usize - 1];
        let wflag = if last_write { DescFlags::WRITE } else { DescFlags::empty() };
        let expect = match s.brk {
            Break::None | Break::IndirectWithNext | Break::IndirectLength => ok,
            Break::NextOutOfRange => {
                drv.write_desc(last, last_desc(last_len, wflag | DescFlags::NEXT, SIZE + 3));
                Expect::Err(ChainError::NextOutOfRange { index: SIZE + 3 })
            }
            Break::SelfLoop => {
                drv.write_desc(last, last_desc(0, wflag | DescFlags::NEXT, last));
                Expect::Err(ChainError::ChainTooLong)
            }
            Break::ReadableAfterWritable => {
                // The chain built above is left unpublished; a dedicated one breaks the rule.
                let h = drv.build_chain(&[Buf::writable(8), Buf::readable(&[1; 8])], &mut []);
                return (h, Expect::Err(ChainError::ReadableAfterWritable));
            }
            Break::Unmapped => {
                drv.write_desc(
                    last,
                    Descriptor { addr: GPA + MEM as u64, len: last_len.max(1), flags: wflag, next: 0 },
                );
                Expect::Err(ChainError::Unmapped { addr: GPA + MEM as u64 })
            }
        };
        return (head, expect);
    }

    let head = drv.build_indirect_chain(&bufs);
    let expect = match s.brk {
        Break::IndirectWithNext => {
            let mut d = drv.read_desc(head);
            d.flags |= DescFlags::NEXT;
            drv.write_desc(head, d);
            Expect::Err(ChainError::IndirectWithNext)
        }
        Break::IndirectLength => {
            let mut d = drv.read_desc(head);
            d.len += 8;
            drv.write_desc(head, d);
            Expect::Err(ChainError::IndirectLength { len: d.len })
        }
        _ => ok,
    };
    (head, expect)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn well_formed_and_malformed_chains_match_the_model(specs in prop::collection::vec(spec(), 1..8), event_idx: bool) {
        let g = Guest::new(MEM);
        let (cfg, data) = layout(GPA, SIZE);
        let mut drv = TestDriver::new(&g.mem, cfg, data, GPA + MEM as u64 - data);
        let mut f = VirtioFeatures::VERSION_1 | VirtioFeatures::RING_INDIRECT_DESC;
        if event_idx {
            f |= VirtioFeatures::RING_EVENT_IDX;
        }
        let mut expected = vec![];
        for (i, s) in specs.iter().enumerate() {
            let (head, e) = build(&mut drv, s, i as u8);
            drv.stage(head);
            expected.push((head, e));
        }
        drv.kick();
        let mut q = SplitQueue::new(&g.mem, cfg, f).unwrap();
        let mut chain = Chain::<16>::new();
        let mut buf = vec![0u8; 2048];
        let mut used = vec![];
        for (head, e) in &expected {
            match (q.pop_into(&mut chain), e) {
                (Ok(Some(got)), Expect::Ok { readable, writable_len }) => {
                    prop_assert_eq!(got, *head);
                    prop_assert_eq!(chain.head(), *head);
                    let n = chain.read_at(0, &mut buf);
                    prop_assert_eq!(&buf[..n], &readable[..]);
                    prop_assert_eq!(chain.writable_len(), *writable_len);
                    q.push(*head, *writable_len);
                    used.push((*head as u32, *writable_len));
                }
                (Err(PopError::Chain { head: h, error }), Expect::Err(want)) => {
                    prop_assert_eq!(h, *head);
                    prop_assert_eq!(error, *want);
                    used.push((*head as u32, 0));
                }
                (got, want) => prop_assert!(false, "head {}: got {:?}, model {:?}", head, got, want),
            }
        }
        prop_assert_eq!(q.pop_into(&mut chain), Ok(None));
        let _ = q.publish();
        prop_assert_eq!(drv.used_idx(), used.len() as u16);
        for (i, u) in used.iter().enumerate() {
            prop_assert_eq!(drv.used_elem(i as u16), *u);
        }
    }

    #[test]
    fn garbage_rings_never_escape_guest_memory(
        table in prop::collection::vec(any::<u8>(), 16 * SIZE as usize),
        ring in prop::collection::vec(any::<u16>(), SIZE as usize),
        avail_idx: u16,
        start: u16,
        indirect: bool,
    ) {
        let g = Guest::new(MEM);
        let (cfg, data) = layout(GPA, SIZE);
        let mut drv = TestDriver::new(&g.mem, cfg, data, GPA + MEM as u64 - data);
        // Point some descriptors into guest memory so that walks get past translation.
        let mut table = table;
        for (i, d) in table.chunks_mut(16).enumerate() {
            if i % 3 == 0 {
                let addr = GPA + (u64::from_le_bytes(d[..8].try_into().unwrap()) % MEM as u64);
                d[..8].copy_from_slice(&addr.to_le_bytes());
                let len = u32::from_le_bytes(d[8..12].try_into().unwrap()) % 512;
                d[8..12].copy_from_slice(&len.to_le_bytes());
            }
        }
        drv.write(cfg.desc_table, &table);
        drv.skip(start);
        for h in &ring {
            drv.stage(h % (SIZE + 4));
        }
        drv.set_avail_idx(avail_idx);
        let mut f = VirtioFeatures::VERSION_1 | VirtioFeatures::RING_EVENT_IDX;
        if indirect {
            f |= VirtioFeatures::RING_INDIRECT_DESC;
        }
        let mut q = SplitQueue::new(&g.mem, cfg, f).unwrap();
        q.set_next_avail(start);
        let lo = g.mem.regions()[0].host().as_ptr() as usize;
        let hi = lo + MEM;
        let mut chain = Chain::<8>::new();
        let mut completed = 0u16;
        for _ in 0..2 * SIZE {
            match q.pop_into(&mut chain) {
                Ok(Some(_)) => {
                    for s in chain.readable().iter().chain(chain.writable()) {
                        let p = s.as_ptr() as usize;
                        prop_assert!(p >= lo && p + s.len() <= hi, "segment outside guest memory");
                    }
                    prop_assert!(chain.head() < SIZE);
                    q.push(chain.head(), 0);
                    completed += 1;
                }
                Ok(None) => break,
                Err(PopError::Chain { head, .. }) => {
                    prop_assert!(head < SIZE);
                    completed += 1;
                }
                Err(PopError::HeadOutOfRange { head }) => prop_assert!(head >= SIZE),
                Err(PopError::IdInUse { .. }) => unreachable!("the split ring has no buffer ids"),
                Err(PopError::AvailIndex(e)) => {
                    prop_assert!(e.avail_idx.wrapping_sub(e.next_avail) > SIZE);
                    break;
                }
            }
        }
        let _ = q.publish();
        prop_assert_eq!(drv.used_idx(), completed);
        prop_assert!(completed <= SIZE);
    }
}
