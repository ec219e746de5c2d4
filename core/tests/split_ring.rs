//! Split-ring device obligations (VIRTIO 1.2 §2.7; spec-obligations §6.1) and hostile-input
//! families 1–8 (shared/reference/hostile-inputs.md), driven by the in-tree test driver.

mod common;

use common::{features, queue, setup, Guest, GPA};
use virtq::chain::ChainError;
use virtq::desc::{DescFlags, Descriptor};
use virtq::queue::{QueueError, RingPart};
use virtq::testing::{layout, Buf};
use virtq::{Chain, MemError, PopError, QueueConfig, SplitQueue, VirtioFeatures};

const SIZE: u16 = 16;

fn desc(addr: u64, len: u32, flags: DescFlags, next: u16) -> Descriptor {
    Descriptor { addr, len, flags, next }
}

/// Pops one chain, expecting success.
fn pop_ok<'m>(q: &mut SplitQueue<'m, virtq::RegionTable<8>>) -> Chain<'m, 32> {
    let mut c = Chain::new();
    assert!(matches!(q.pop_into(&mut c), Ok(Some(_))));
    c
}

fn pop_err(q: &mut SplitQueue<'_, virtq::RegionTable<8>>) -> PopError {
    let mut c = Chain::<32>::new();
    q.pop_into(&mut c).expect_err("chain should be rejected")
}

// ---- §2.7 queue set-up --------------------------------------------------------------------

#[test]
fn setup_rejects_sizes_that_are_not_powers_of_two_up_to_32768() {
    let g = Guest::new(1 << 20);
    for size in [0u16, 3, 100, 32769, 65535] {
        let (mut cfg, _) = layout(GPA, 16);
        cfg.size = size;
        assert_eq!(SplitQueue::new(&g.mem, cfg, features()).err(), Some(QueueError::InvalidSize { size }));
    }
    let (cfg, _) = layout(GPA, 32768);
    assert!(SplitQueue::new(&g.mem, cfg, features()).is_ok());
    let (cfg, _) = layout(GPA, 1);
    assert!(SplitQueue::new(&g.mem, cfg, features()).is_ok());
}

#[test]
fn the_size_rule_accepts_exactly_the_sixteen_powers_of_two() {
    let ok: Vec<u16> = (0..=u16::MAX).filter(|&s| virtq::queue::validate_size(s).is_ok()).collect();
    assert_eq!(ok, (0..16).map(|b| 1u16 << b).collect::<Vec<_>>());
    assert_eq!(virtq::queue::validate_size(0), Err(QueueError::InvalidSize { size: 0 }));
}

#[test]
fn setup_checks_ring_alignment_16_2_4() {
    let g = Guest::new(1 << 16);
    let (cfg, _) = layout(GPA, SIZE);
    let cases = [
        (QueueConfig { desc_table: cfg.desc_table + 8, ..cfg }, RingPart::DescTable, cfg.desc_table + 8),
        (QueueConfig { avail_ring: cfg.avail_ring + 1, ..cfg }, RingPart::AvailRing, cfg.avail_ring + 1),
        (QueueConfig { used_ring: cfg.used_ring + 2, ..cfg }, RingPart::UsedRing, cfg.used_ring + 2),
    ];
    for (c, part, addr) in cases {
        assert_eq!(SplitQueue::new(&g.mem, c, features()).err(), Some(QueueError::Misaligned { part, addr }));
    }
}

#[test]
fn setup_requires_all_rings_inside_guest_memory() {
    let g = Guest::new(0x2000);
    let (cfg, _) = layout(GPA, SIZE);
    let outside = QueueConfig { used_ring: GPA + 0x2000 - 8, ..cfg };
    assert!(matches!(
        SplitQueue::new(&g.mem, outside, features()).err(),
        Some(QueueError::Unmapped { part: RingPart::UsedRing, error: MemError::Unmapped { .. } })
    ));
    let wild = QueueConfig { desc_table: u64::MAX - 15, ..cfg };
    assert!(matches!(
        SplitQueue::new(&g.mem, wild, features()).err(),
        Some(QueueError::Unmapped { part: RingPart::DescTable, .. })
    ));
}

#[test]
fn setup_rejects_a_ring_split_across_two_regions() {
    let mut g = Guest::new(0x1000);
    g.add_region(GPA + 0x1000, 0x1000);
    let (cfg, _) = layout(GPA, SIZE);
    let across = QueueConfig { desc_table: GPA + 0x1000 - 0x80, ..cfg };
    assert!(matches!(
        SplitQueue::new(&g.mem, across, features()).err(),
        Some(QueueError::Unmapped { part: RingPart::DescTable, error: MemError::NotContiguous { .. } })
    ));
}

#[test]
fn setup_rejects_a_used_ring_overlapping_what_the_device_only_reads() {
    let g = Guest::new(1 << 16);
    let (cfg, _) = layout(GPA, SIZE);
    let over_desc = QueueConfig { used_ring: cfg.desc_table + 16, ..cfg };
    assert_eq!(
        SplitQueue::new(&g.mem, over_desc, features()).err(),
        Some(QueueError::Overlap { part: RingPart::DescTable })
    );
    let over_avail = QueueConfig { used_ring: cfg.avail_ring, ..cfg };
    assert_eq!(
        SplitQueue::new(&g.mem, over_avail, features()).err(),
        Some(QueueError::Overlap { part: RingPart::AvailRing })
    );
}

// ---- chains, segments, used ring ------------------------------------------------------------

#[test]
fn empty_ring_and_spurious_kick_pop_nothing() {
    let g = Guest::new(1 << 16);
    let (cfg, _drv) = setup(&g, SIZE);
    let mut q = queue(&g, cfg, features());
    let mut c = Chain::<8>::new();
    assert_eq!(q.pop_into(&mut c), Ok(None));
    assert_eq!(q.pop_into(&mut c), Ok(None));
    assert!(!q.publish(), "nothing published, nothing to notify");
}

#[test]
fn readable_then_writable_chain_is_exposed_as_two_segment_lists() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let data: Vec<u8> = (0..100u8).collect();
    let mut addrs = [0u64; 3];
    let head =
        drv.build_chain(&[Buf::readable(&data[..40]), Buf::readable(&data[40..]), Buf::writable(64)], &mut addrs);
    drv.publish(head);
    let mut q = queue(&g, cfg, features());
    let c = pop_ok(&mut q);
    assert_eq!(c.head(), head);
    assert_eq!(c.readable().len(), 2);
    assert_eq!(c.writable().len(), 1);
    assert_eq!((c.readable_len(), c.writable_len()), (100, 64));
    let mut out = [0u8; 128];
    assert_eq!(c.read_at(0, &mut out), 100);
    assert_eq!(&out[..100], &data[..]);
    assert_eq!(c.read_at(95, &mut out[..10]), 5);
    assert_eq!(&out[..5], &data[95..]);
    assert_eq!(c.write_at(10, &[0xab; 100]), 54);
    let mut back = [0u8; 64];
    drv.read(addrs[2], &mut back);
    assert_eq!(&back[..10], &[0; 10]);
    assert!(back[10..].iter().all(|&b| b == 0xab));
    // The device never wrote into the readable buffers.
    let mut ro = [0u8; 40];
    drv.read(addrs[0], &mut ro);
    assert_eq!(&ro[..], &data[..40]);
}

#[test]
fn used_len_is_written_before_used_idx_is_published() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let h = drv.add_chain(&[Buf::writable(32)]);
    let mut q = queue(&g, cfg, features());
    let c = pop_ok(&mut q);
    q.push(c.head(), 17);
    // Written but not yet visible: used.idx unchanged.
    assert_eq!(drv.used_elem(0), (h as u32, 17));
    assert_eq!(drv.used_idx(), 0);
    assert!(q.publish(), "no suppression: the driver is notified");
    assert_eq!(drv.used_idx(), 1);
}

#[test]
fn a_detached_queue_resumes_where_it_stopped() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let h0 = drv.add_chain(&[Buf::writable(32)]);
    let h1 = drv.add_chain(&[Buf::writable(32)]);
    let mut q = queue(&g, cfg, features());
    let c = pop_ok(&mut q);
    assert_eq!(c.head(), h0);
    q.push(h0, 5);
    // Detached with one element pushed but not yet published: nothing is lost.
    let d = q.detach();
    assert_eq!((d.next_avail(), d.next_used(), d.config().size), (1, 1, SIZE));
    assert_eq!(drv.used_idx(), 0);
    // SAFETY: attached to the same guest memory it was created on, which outlives `q`.
    let mut q = unsafe { d.attach(&g.mem) };
    let c = pop_ok(&mut q);
    assert_eq!(c.head(), h1);
    q.push(h1, 7);
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 2);
    assert_eq!((drv.used_elem(0), drv.used_elem(1)), ((h0 as u32, 5), (h1 as u32, 7)));
    let mut c = Chain::<8>::new();
    assert_eq!(q.pop_into(&mut c), Ok(None));
}

#[test]
fn batched_completion_publishes_once() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let heads: Vec<u16> = (0..5).map(|_| drv.add_chain(&[Buf::readable(&[1; 8])])).collect();
    let mut q = queue(&g, cfg, features());
    let mut c = Chain::<4>::new();
    let mut popped = vec![];
    while q.pop_into(&mut c).unwrap().is_some() {
        popped.push(c.head());
        q.push(c.head(), 0);
        assert_eq!(drv.used_idx(), 0);
    }
    assert_eq!(popped, heads);
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 5);
    for (i, h) in heads.iter().enumerate() {
        assert_eq!(drv.used_elem(i as u16), (*h as u32, 0));
    }
}

#[test]
fn zero_length_descriptors_are_accepted_and_produce_no_segment() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    drv.add_chain(&[Buf::readable(&[]), Buf::readable(&[7; 4]), Buf::writable(0)]);
    let mut q = queue(&g, cfg, features());
    let c = pop_ok(&mut q);
    assert_eq!(c.readable().len(), 1);
    assert!(c.writable().is_empty());
    assert_eq!((c.readable_len(), c.writable_len()), (4, 0));
}

#[test]
fn a_chain_with_more_pieces_than_the_segment_list_is_rejected_and_completed() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let bufs = [Buf::readable(&[1; 4]); 5];
    let head = drv.add_chain(&bufs);
    let mut q = queue(&g, cfg, features());
    let mut c = Chain::<4>::new();
    assert_eq!(q.pop_into(&mut c), Err(PopError::Chain { head, error: ChainError::TooManySegments }));
    assert!(q.publish());
    assert_eq!(drv.used_elem(0), (head as u32, 0));
}

// ---- family 1: indices out of range ---------------------------------------------------------

#[test]
fn family1_head_index_out_of_range_consumes_the_slot_and_completes_nothing() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    drv.publish(SIZE); // head == size
    drv.publish(0xffff);
    let good = drv.add_chain(&[Buf::readable(&[1; 4])]);
    let mut q = queue(&g, cfg, features());
    assert_eq!(pop_err(&mut q), PopError::HeadOutOfRange { head: SIZE });
    assert_eq!(pop_err(&mut q), PopError::HeadOutOfRange { head: 0xffff });
    assert_eq!(pop_ok(&mut q).head(), good);
    assert!(!q.publish(), "nothing was completed");
    assert_eq!(drv.used_idx(), 0);
}

#[test]
fn family1_next_out_of_range_is_a_typed_error_and_the_head_is_returned() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let buf = drv.alloc(16);
    drv.write_desc(3, desc(buf, 16, DescFlags::NEXT, SIZE));
    drv.publish(3);
    let mut q = queue(&g, cfg, features());
    assert_eq!(pop_err(&mut q), PopError::Chain { head: 3, error: ChainError::NextOutOfRange { index: SIZE } });
    assert!(q.publish());
    assert_eq!((drv.used_idx(), drv.used_elem(0)), (1, (3, 0)));
}

// ---- family 2: loops and chain length -------------------------------------------------------

#[test]
fn family2_zero_length_self_loop_terminates() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    drv.write_desc(5, desc(GPA, 0, DescFlags::NEXT, 5));
    drv.publish(5);
    let mut q = queue(&g, cfg, features());
    assert_eq!(pop_err(&mut q), PopError::Chain { head: 5, error: ChainError::ChainTooLong });
}

#[test]
fn family2_two_cycle_terminates() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let b = drv.alloc(8);
    drv.write_desc(1, desc(b, 8, DescFlags::NEXT, 2));
    drv.write_desc(2, desc(b, 8, DescFlags::NEXT, 1));
    drv.publish(1);
    let mut q = queue(&g, cfg, features());
    assert_eq!(pop_err(&mut q), PopError::Chain { head: 1, error: ChainError::ChainTooLong });
}

#[test]
fn family2_chain_of_exactly_queue_size_is_valid_and_one_more_is_not() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let b = drv.alloc(4);
    for i in 0..SIZE {
        let last = i == SIZE - 1;
        let flags = if last { DescFlags::empty() } else { DescFlags::NEXT };
        drv.write_desc(i, desc(b, 1, flags, i + 1));
    }
    drv.publish(0);
    let mut q = queue(&g, cfg, features());
    let c = pop_ok(&mut q);
    assert_eq!((c.readable_len(), c.readable().len()), (SIZE as u32, SIZE as usize));
    // Size + 1: the last descriptor points back to the first (the only way to exceed size).
    drv.write_desc(SIZE - 1, desc(b, 1, DescFlags::NEXT, 0));
    drv.publish(0);
    assert_eq!(pop_err(&mut q), PopError::Chain { head: 0, error: ChainError::ChainTooLong });
}

#[test]
fn family2_cycle_inside_an_indirect_table_terminates() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let table = drv.alloc(64);
    let b = drv.alloc(8);
    drv.write_desc_at(table, 0, desc(b, 8, DescFlags::NEXT, 1));
    drv.write_desc_at(table, 1, desc(b, 0, DescFlags::NEXT, 0));
    drv.write_desc(0, desc(table, 32, DescFlags::INDIRECT, 0));
    drv.publish(0);
    let mut q = queue(&g, cfg, features());
    assert_eq!(pop_err(&mut q), PopError::Chain { head: 0, error: ChainError::ChainTooLong });
}

// ---- family 3: avail index ------------------------------------------------------------------

#[test]
fn family3_avail_idx_jumping_beyond_queue_size_consumes_nothing_and_recovers() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let h = drv.add_chain(&[Buf::readable(&[1; 4])]);
    drv.set_avail_idx(SIZE + 1);
    let mut q = queue(&g, cfg, features());
    let e = pop_err(&mut q);
    assert!(matches!(e, PopError::AvailIndex(a) if a.avail_idx == SIZE + 1 && a.next_avail == 0), "{e:?}");
    assert_eq!(q.next_avail(), 0);
    // Exactly `size` ahead is legal (a full ring).
    drv.set_avail_idx(SIZE);
    assert_eq!(pop_ok(&mut q).head(), h);
}

#[test]
fn family3_avail_idx_moving_backwards_is_rejected() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    drv.add_chain(&[Buf::readable(&[1; 4])]);
    drv.add_chain(&[Buf::readable(&[1; 4])]);
    let mut q = queue(&g, cfg, features());
    pop_ok(&mut q);
    pop_ok(&mut q);
    drv.set_avail_idx(1);
    assert!(matches!(pop_err(&mut q), PopError::AvailIndex(a) if a.avail_idx == 1 && a.next_avail == 2));
}

#[test]
fn family3_index_wraps_at_0xffff_with_chains_in_flight() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = queue(&g, cfg, features());
    // Pretend 0xfffd chains were processed already.
    drv.skip(0xfffd);
    q.set_next_avail(0xfffd);
    let heads: Vec<u16> = (0..6).map(|_| drv.add_chain(&[Buf::readable(&[9; 2])])).collect();
    assert_eq!(drv.avail_idx(), 3);
    let mut got = vec![];
    let mut c = Chain::<4>::new();
    while q.pop_into(&mut c).unwrap().is_some() {
        got.push(c.head());
    }
    assert_eq!(got, heads);
    assert_eq!(q.next_avail(), 3);
}

#[test]
fn family3_duplicate_head_is_processed_without_panic() {
    // The device cannot tell a re-published head from a new one without tracking every head in
    // flight; it processes both and completes both, and the driver sees its own error.
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let h = drv.add_chain(&[Buf::readable(&[1; 4])]);
    drv.publish(h);
    let mut q = queue(&g, cfg, features());
    for _ in 0..2 {
        let c = pop_ok(&mut q);
        q.push(c.head(), 0);
    }
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 2);
}

// ---- family 4: indirect descriptors ---------------------------------------------------------

fn indirect_case(
    f: VirtioFeatures,
    build: impl FnOnce(&mut virtq::testing::TestDriver<'_, virtq::RegionTable<8>>) -> u16,
) -> Result<u32, PopError> {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, SIZE);
    let head = build(&mut drv);
    drv.publish(head);
    let mut q = queue(&g, cfg, f);
    let mut c = Chain::<32>::new();
    q.pop_into(&mut c).map(|_| c.readable_len() + c.writable_len())
}

#[test]
fn family4_indirect_and_next_on_one_descriptor() {
    let r = indirect_case(features(), |d| {
        let t = d.alloc(32);
        d.write_desc(0, desc(t, 32, DescFlags::INDIRECT | DescFlags::NEXT, 1));
        0
    });
    assert_eq!(r, Err(PopError::Chain { head: 0, error: ChainError::IndirectWithNext }));
}

#[test]
fn family4_nested_indirect() {
    let r = indirect_case(features(), |d| {
        let t = d.alloc(32);
        let t2 = d.alloc(16);
        d.write_desc_at(t, 0, desc(t2, 16, DescFlags::INDIRECT, 0));
        d.write_desc(0, desc(t, 32, DescFlags::INDIRECT, 0));
        0
    });
    assert_eq!(r, Err(PopError::Chain { head: 0, error: ChainError::NestedIndirect }));
}

#[test]
fn family4_indirect_table_lengths_0_unaligned_and_too_large() {
    for (len, err) in [
        (0u32, ChainError::IndirectLength { len: 0 }),
        (24, ChainError::IndirectLength { len: 24 }),
        (17, ChainError::IndirectLength { len: 17 }),
        (SIZE as u32 * 16 + 16, ChainError::IndirectTooLarge { entries: SIZE as u32 + 1 }),
        (65537 * 16, ChainError::IndirectTooLarge { entries: 65537 }),
    ] {
        let r = indirect_case(features(), |d| {
            let t = d.alloc(16);
            d.write_desc(0, desc(t, len, DescFlags::INDIRECT, 0));
            0
        });
        assert_eq!(r, Err(PopError::Chain { head: 0, error: err }), "len {len}");
    }
}

#[test]
fn family4_indirect_table_unmapped_or_crossing_a_region_boundary() {
    let r = indirect_case(features(), |d| {
        d.write_desc(0, desc(0x7000_0000, 32, DescFlags::INDIRECT, 0));
        0
    });
    assert_eq!(r, Err(PopError::Chain { head: 0, error: ChainError::Unmapped { addr: 0x7000_0000 } }));

    let mut g = Guest::new(0x4000);
    g.add_region(GPA + 0x4000, 0x1000);
    let (cfg, mut drv) = setup(&g, SIZE);
    let t = GPA + 0x4000 - 16; // 2 entries: one in each region
    drv.write_desc(0, desc(t, 32, DescFlags::INDIRECT, 0));
    drv.publish(0);
    let mut q = queue(&g, cfg, features());
    assert_eq!(pop_err(&mut q), PopError::Chain { head: 0, error: ChainError::IndirectNotContiguous { addr: t } });
}

#[test]
fn family4_write_flag_on_the_indirect_descriptor_is_ignored() {
    // §2.7.5.3.2: "The device MUST ignore the write-only flag (flags&VIRTQ_DESC_F_WRITE) in the
    // descriptor that refers to an indirect table."
    let r = indirect_case(features(), |d| {
        let t = d.alloc(32);
        let b = d.alloc(64);
        d.write_desc_at(t, 0, desc(b, 10, DescFlags::NEXT, 1));
        d.write_desc_at(t, 1, desc(b + 32, 20, DescFlags::WRITE, 0));
        d.write_desc(0, desc(t, 32, DescFlags::INDIRECT | DescFlags::WRITE, 0));
        0
    });
    assert_eq!(r, Ok(30));
}

#[test]
fn family4_direct_descriptors_followed_by_one_indirect_are_accepted() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let t = drv.alloc(32);
    let b = drv.alloc(64);
    drv.write(b, &[0x11; 64]);
    drv.write_desc_at(t, 0, desc(b + 8, 8, DescFlags::NEXT, 1));
    drv.write_desc_at(t, 1, desc(b + 40, 24, DescFlags::WRITE, 0));
    drv.write_desc(4, desc(b, 8, DescFlags::NEXT, 9));
    drv.write_desc(9, desc(t, 32, DescFlags::INDIRECT, 0));
    drv.publish(4);
    let mut q = queue(&g, cfg, features());
    let c = pop_ok(&mut q);
    assert_eq!((c.readable_len(), c.writable_len(), c.readable().len(), c.writable().len()), (16, 24, 2, 1));
}

#[test]
fn family4_indirect_without_the_feature_is_rejected() {
    let r = indirect_case(VirtioFeatures::VERSION_1, |d| d.add_indirect_chain(&[Buf::readable(&[1; 8])]));
    assert_eq!(r, Err(PopError::Chain { head: 0, error: ChainError::IndirectNotNegotiated }));
}

#[test]
fn indirect_table_limit_is_configurable() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let bufs = [Buf::readable(&[3; 2]); 4];
    let h = drv.add_indirect_chain(&bufs);
    drv.add_indirect_chain(&bufs);
    let mut q = queue(&g, cfg, features());
    q.set_max_indirect_entries(3);
    assert_eq!(pop_err(&mut q), PopError::Chain { head: h, error: ChainError::IndirectTooLarge { entries: 4 } });
    q.set_max_indirect_entries(4);
    assert_eq!(pop_ok(&mut q).readable_len(), 8);
}

// ---- family 5: addresses and lengths --------------------------------------------------------

#[test]
fn family5_address_plus_length_overflowing_u64() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    drv.write_desc(0, desc(u64::MAX - 4, 16, DescFlags::empty(), 0));
    drv.publish(0);
    let mut q = queue(&g, cfg, features());
    assert_eq!(
        pop_err(&mut q),
        PopError::Chain { head: 0, error: ChainError::AddressOverflow { addr: u64::MAX - 4, len: 16 } }
    );
}

#[test]
fn family5_range_partly_outside_every_region() {
    let g = Guest::new(0x4000);
    let (cfg, mut drv) = setup(&g, SIZE);
    drv.write_desc(0, desc(GPA + 0x4000 - 8, 16, DescFlags::empty(), 0));
    drv.publish(0);
    let mut q = queue(&g, cfg, features());
    assert_eq!(pop_err(&mut q), PopError::Chain { head: 0, error: ChainError::Unmapped { addr: GPA + 0x4000 } });
}

#[test]
fn family5_buffer_spanning_two_regions_becomes_two_segments() {
    let mut g = Guest::new(0x4000);
    g.add_region(GPA + 0x4000, 0x1000);
    let (cfg, mut drv) = setup(&g, SIZE);
    let data: Vec<u8> = (0..32u8).collect();
    let at = GPA + 0x4000 - 12;
    drv.write(at, &data);
    drv.write_desc(0, desc(at, 32, DescFlags::empty(), 0));
    drv.publish(0);
    let mut q = queue(&g, cfg, features());
    let c = pop_ok(&mut q);
    assert_eq!(c.readable().iter().map(|s| s.len()).collect::<Vec<_>>(), vec![12, 20]);
    let mut out = [0u8; 32];
    assert_eq!(c.read_at(0, &mut out), 32);
    assert_eq!(&out[..], &data[..]);
}

#[test]
fn family5_fused_copies_follow_a_buffer_across_two_regions() {
    // pop_read / pop_write validate and copy in one pass; a buffer that one translation does
    // not cover goes through the walk's split path and must still copy exactly its bytes.
    let mut g = Guest::new(0x4000);
    g.add_region(GPA + 0x4000, 0x1000);
    let (cfg, mut drv) = setup(&g, SIZE);
    let data: Vec<u8> = (0..40u8).collect();
    let readable_at = GPA + 0x4000 - 12;
    let writable_at = GPA + 0x4000 - 20;
    drv.write(readable_at, &data);
    drv.write_desc(0, desc(readable_at, 40, DescFlags::empty(), 0));
    drv.publish(0);
    drv.write_desc(1, desc(writable_at, 48, DescFlags::WRITE, 0));
    drv.publish(1);
    let mut q = queue(&g, cfg, features());

    let mut buf = [0u8; 64];
    let c = q.pop_read(&mut buf).unwrap().unwrap();
    assert_eq!((c.head, c.bytes, c.readable_len, c.writable_len), (0, 40, 40, 0));
    assert_eq!(&buf[..40], &data[..]);

    // The writable buffer crosses the same boundary (and reuses the readable one's memory).
    drv.write(writable_at, &[0u8; 48]);
    let frame: Vec<u8> = (100..140u8).collect();
    let c = q.pop_write(&frame).unwrap().unwrap();
    assert_eq!((c.head, c.bytes, c.readable_len, c.writable_len), (1, 40, 0, 48));
    let mut back = [0u8; 48];
    drv.read(writable_at, &mut back);
    assert_eq!(&back[..40], &frame[..]);
    assert_eq!(&back[40..], &[0u8; 8], "nothing written past the frame");
}

#[test]
fn family5_total_chain_length_above_2_pow_32() {
    // Two descriptors of 2^31 bytes each over a 4 GiB region whose backing is never touched:
    // the walk rejects the chain on the length sum (checked once, when the walk ends) and never
    // accesses the buffers (a chain is only walked, not read, here).
    let g = Guest::new(1 << 16);
    let (cfg, drv) = setup(&g, SIZE);
    let mut mem = g.mem.clone();
    let huge_gpa = 0x1_0000_0000u64;
    let host = g.mem.regions()[0].host();
    // SAFETY: the 4 GiB region is only translated, never dereferenced, in this test.
    mem.add(unsafe { virtq::Region::new(huge_gpa, host, 1 << 32) }).unwrap();
    drv.write_desc(0, desc(huge_gpa, 0x8000_0000, DescFlags::NEXT, 1));
    drv.write_desc(1, desc(huge_gpa, 0x8000_0000, DescFlags::empty(), 0));
    let mut drv = drv;
    drv.publish(0);
    let mut q = SplitQueue::new(&mem, cfg, features()).unwrap();
    let mut c = Chain::<4>::new();
    assert_eq!(q.pop_into(&mut c), Err(PopError::Chain { head: 0, error: ChainError::TotalLengthOverflow }));
    // Exactly 2^32 - 1 in total is allowed.
    drv.write_desc(2, desc(huge_gpa, 0x8000_0000, DescFlags::NEXT, 3));
    drv.write_desc(3, desc(huge_gpa, 0x7fff_ffff, DescFlags::empty(), 0));
    drv.publish(2);
    assert!(matches!(q.pop_into(&mut c), Ok(Some(_))));
    assert_eq!(c.readable_len(), u32::MAX);
}

// ---- family 6: direction --------------------------------------------------------------------

#[test]
fn family6_readable_after_writable_is_rejected() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let head = drv.add_chain(&[Buf::writable(8), Buf::readable(&[1; 8])]);
    let mut q = queue(&g, cfg, features());
    assert_eq!(pop_err(&mut q), PopError::Chain { head, error: ChainError::ReadableAfterWritable });
    assert!(q.publish());
    assert_eq!(drv.used_elem(0), (head as u32, 0));
}

// ---- family 7: TOCTOU ---------------------------------------------------------------------

#[test]
fn family7_rewriting_descriptors_after_the_walk_changes_nothing() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut addrs = [0u64; 1];
    let head = drv.build_chain(&[Buf::readable(&[5; 16])], &mut addrs);
    drv.publish(head);
    let mut q = queue(&g, cfg, features());
    let c = pop_ok(&mut q);
    // The guest now points the descriptor at the used ring with a huge length.
    drv.write_desc(head, desc(cfg.used_ring, 0xffff_0000, DescFlags::WRITE, 0));
    assert_eq!(c.readable_len(), 16);
    assert!(c.writable().is_empty());
    let mut out = [0u8; 64];
    assert_eq!(c.read_at(0, &mut out), 16);
    assert_eq!(&out[..16], &[5; 16]);
}

// ---- family 8 and §2.7.7/§2.7.10: notification suppression ----------------------------------

fn one_completion(
    f: VirtioFeatures,
    prep: impl FnOnce(&virtq::testing::TestDriver<'_, virtq::RegionTable<8>>),
) -> bool {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    drv.add_chain(&[Buf::readable(&[1; 4])]);
    prep(&drv);
    let mut q = queue(&g, cfg, f);
    let c = pop_ok(&mut q);
    q.push(c.head(), 0);
    q.publish()
}

#[test]
fn no_interrupt_flag_suppresses_without_event_idx_and_other_bits_are_ignored() {
    let f = features();
    assert!(one_completion(f, |d| d.set_avail_flags(0)));
    assert!(!one_completion(f, |d| d.set_avail_flags(1)));
    assert!(one_completion(f, |d| d.set_avail_flags(0xfffe)), "only bit 0 means anything");
    assert!(!one_completion(f, |d| d.set_avail_flags(0xffff)));
    // used_event is ignored without EVENT_IDX.
    assert!(one_completion(f, |d| d.set_used_event(100)));
}

#[test]
fn event_idx_notifies_exactly_when_used_event_is_crossed() {
    let f = features() | VirtioFeatures::RING_EVENT_IDX;
    assert!(one_completion(f, |d| d.set_used_event(0)));
    assert!(!one_completion(f, |d| d.set_used_event(1)));
    assert!(!one_completion(f, |d| d.set_used_event(0xffff)), "family 8: used_event 0xffff");
    // With EVENT_IDX the NO_INTERRUPT bit is ignored (§2.7.10).
    assert!(one_completion(f, |d| {
        d.set_used_event(0);
        d.set_avail_flags(1)
    }));
}

#[test]
fn event_idx_batched_publication_uses_the_window_formula() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let f = features() | VirtioFeatures::RING_EVENT_IDX;
    for _ in 0..8 {
        drv.add_chain(&[Buf::readable(&[1; 4])]);
    }
    let mut q = queue(&g, cfg, f);
    fn batch(q: &mut SplitQueue<'_, virtq::RegionTable<8>>, n: usize) -> bool {
        let mut c = Chain::<4>::new();
        for _ in 0..n {
            assert!(q.pop_into(&mut c).unwrap().is_some());
            q.push(c.head(), 0);
        }
        q.publish()
    }
    drv.set_used_event(2);
    assert!(batch(&mut q, 4), "0..4 crosses 2");
    assert!(!batch(&mut q, 2), "4..6 does not cross 2");
    // Family 8: used_event = used.idx - 1 (already passed): no notification for 6..7.
    drv.set_used_event(5);
    assert!(!batch(&mut q, 0), "publishing nothing never notifies");
    assert!(!batch(&mut q, 1));
    drv.set_used_event(7);
    assert!(batch(&mut q, 1), "7..8 crosses 7");
}

#[test]
fn disable_and_enable_notifications_without_event_idx_use_used_flags() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = queue(&g, cfg, features());
    q.disable_notifications();
    assert_eq!(drv.used_flags(), 1);
    assert_eq!(q.enable_notifications(), Ok(false));
    assert_eq!(drv.used_flags(), 0);
    // The race: the driver adds a buffer right after the device's last empty check, seeing
    // NO_NOTIFY and not kicking. Re-enabling re-checks and reports it.
    q.disable_notifications();
    drv.add_chain(&[Buf::readable(&[1; 4])]);
    assert_eq!(q.enable_notifications(), Ok(true));
}

#[test]
fn enable_notifications_with_event_idx_writes_avail_event_and_keeps_flags_zero() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let f = features() | VirtioFeatures::RING_EVENT_IDX;
    drv.add_chain(&[Buf::readable(&[1; 4])]);
    drv.add_chain(&[Buf::readable(&[1; 4])]);
    let mut q = queue(&g, cfg, f);
    pop_ok(&mut q);
    q.disable_notifications();
    assert_eq!(drv.used_flags(), 0, "with EVENT_IDX used.flags stays 0");
    assert_eq!(q.enable_notifications(), Ok(true), "one chain still pending");
    assert_eq!(drv.avail_event(), 1);
    pop_ok(&mut q);
    assert_eq!(q.enable_notifications(), Ok(false));
    assert_eq!(drv.avail_event(), 2);
}

#[test]
fn notify_on_empty_notifies_when_the_ring_runs_dry_despite_suppression() {
    let f = features() | VirtioFeatures::NOTIFY_ON_EMPTY;
    assert!(one_completion(f, |d| d.set_avail_flags(1)));
    // Not empty: suppression holds.
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    drv.add_chain(&[Buf::readable(&[1; 4])]);
    drv.add_chain(&[Buf::readable(&[1; 4])]);
    drv.set_avail_flags(1);
    let mut q = queue(&g, cfg, f);
    let c = pop_ok(&mut q);
    q.push(c.head(), 0);
    assert!(!q.publish());
}

// ---- IN_ORDER and ring state ------------------------------------------------------------------

#[test]
fn in_order_batch_writes_one_element_and_advances_idx_by_the_batch() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let heads: Vec<u16> = (0..4).map(|_| drv.add_chain(&[Buf::readable(&[1; 4])])).collect();
    let mut q = queue(&g, cfg, features() | VirtioFeatures::IN_ORDER);
    for _ in 0..4 {
        pop_ok(&mut q);
    }
    assert!(q.push_in_order_batch(heads[3], 0, 4));
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 4);
    assert_eq!(drv.used_elem(3), (heads[3] as u32, 0));

    let mut plain = queue(&g, cfg, features());
    assert!(!plain.push_in_order_batch(heads[3], 0, 4), "refused without IN_ORDER");
}

#[test]
fn next_used_is_read_from_guest_memory_at_setup() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    for _ in 0..3 {
        drv.add_chain(&[Buf::readable(&[1; 4])]);
    }
    {
        let mut q = queue(&g, cfg, features());
        for _ in 0..3 {
            let c = pop_ok(&mut q);
            q.push(c.head(), 0);
        }
        let _ = q.publish();
    }
    // A new queue over the same rings (reconnect, SET_VRING_BASE) continues at used.idx 3.
    let mut q = queue(&g, cfg, features());
    assert_eq!(q.next_used(), 3);
    q.set_next_avail(3);
    drv.add_chain(&[Buf::readable(&[1; 4])]);
    let c = pop_ok(&mut q);
    q.push(c.head(), 0);
    let _ = q.publish();
    assert_eq!(drv.used_idx(), 4);
}

#[test]
fn rewind_gives_back_heads_that_were_not_completed() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let a = drv.add_chain(&[Buf::writable(8)]);
    let b = drv.add_chain(&[Buf::writable(8)]);
    let mut q = queue(&g, cfg, features());
    pop_ok(&mut q);
    pop_ok(&mut q);
    q.rewind(2);
    assert_eq!(pop_ok(&mut q).head(), a);
    assert_eq!(pop_ok(&mut q).head(), b);
}
