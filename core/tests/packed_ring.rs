//! Packed-ring device obligations (VIRTIO 1.2 §2.8) and the hostile families as they apply to
//! the packed layout: wrap-counter confusion, a buffer made available twice, ids out of range,
//! chains that never end or run into descriptors that are not available, the indirect rules of
//! §2.8.7, and the chain rules the walk shares with the split ring. Driven by the in-tree
//! packed driver (`virtq::testing::PackedDriver`).

mod common;

use common::{features, Guest, GPA};
use virtq::chain::ChainError;
use virtq::desc::DescFlags;
use virtq::packed::{
    PackedQueue, RingPosition, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED,
};
use virtq::queue::{QueueError, RingPart};
use virtq::testing::{packed_layout, Buf, PackedDesc, PackedDriver};
use virtq::{Chain, PopError, QueueConfig, RegionTable, SplitQueue, VirtioFeatures, Virtqueue};

const SIZE: u16 = 8;

type Mem = RegionTable<8>;

fn setup(g: &Guest, size: u16) -> (QueueConfig, PackedDriver<'_, Mem>) {
    let (cfg, data) = packed_layout(GPA, size);
    let end = GPA + g.mem.regions()[0].len();
    (cfg, PackedDriver::new(&g.mem, cfg, data, end - data))
}

fn packed(g: &Guest, cfg: QueueConfig, f: VirtioFeatures) -> PackedQueue<'_, Mem> {
    PackedQueue::new(&g.mem, cfg, f).expect("valid packed queue")
}

fn pop_ok<'m>(q: &mut PackedQueue<'m, Mem>) -> Chain<'m, 32> {
    let mut c = Chain::new();
    assert!(matches!(q.pop_into(&mut c), Ok(Some(_))));
    c
}

fn pop_err(q: &mut PackedQueue<'_, Mem>) -> PopError {
    let mut c = Chain::<32>::new();
    q.pop_into(&mut c).expect_err("chain should be rejected")
}

fn avail(wrap: bool) -> u16 {
    PackedDriver::<Mem>::avail_bits(wrap)
}

// ---- set-up (§2.8, §2.8.10 alignment) ------------------------------------------------------

#[test]
fn setup_accepts_any_size_up_to_32768_not_only_powers_of_two() {
    let g = Guest::new(1 << 20);
    for size in [1u16, 3, 5, 100, 1000, 1024] {
        let (cfg, _) = packed_layout(GPA, size);
        assert!(PackedQueue::<_>::new(&g.mem, cfg, features()).is_ok(), "size {size}");
    }
    for size in [0u16, 1025] {
        let (mut cfg, _) = packed_layout(GPA, 16);
        cfg.size = size;
        assert_eq!(PackedQueue::<_>::new(&g.mem, cfg, features()).err(), Some(QueueError::InvalidSize { size }));
    }
    let (cfg, _) = packed_layout(GPA, 32768);
    assert!(PackedQueue::<_, 32768>::new(&g.mem, cfg, features()).is_ok());
    assert_eq!(virtq::packed::validate_packed_size(32769), Err(QueueError::InvalidSize { size: 32769 }));
}

#[test]
fn setup_checks_alignment_mapping_and_overlap() {
    let g = Guest::new(1 << 16);
    let (cfg, _) = packed_layout(GPA, SIZE);
    let bad = [
        (
            QueueConfig { desc_table: cfg.desc_table + 8, ..cfg },
            QueueError::Misaligned { part: RingPart::DescTable, addr: cfg.desc_table + 8 },
        ),
        (
            QueueConfig { avail_ring: cfg.avail_ring + 2, ..cfg },
            QueueError::Misaligned { part: RingPart::AvailRing, addr: cfg.avail_ring + 2 },
        ),
        (
            QueueConfig { used_ring: cfg.used_ring + 1, ..cfg },
            QueueError::Misaligned { part: RingPart::UsedRing, addr: cfg.used_ring + 1 },
        ),
        // The device area inside the descriptor ring, and on the driver area.
        (QueueConfig { used_ring: cfg.desc_table + 16, ..cfg }, QueueError::Overlap { part: RingPart::UsedRing }),
        (QueueConfig { used_ring: cfg.avail_ring, ..cfg }, QueueError::Overlap { part: RingPart::UsedRing }),
    ];
    for (c, e) in bad {
        assert_eq!(PackedQueue::<_>::new(&g.mem, c, features()).err(), Some(e));
    }
    let outside = QueueConfig { used_ring: GPA + (1 << 16), ..cfg };
    assert!(matches!(
        PackedQueue::<_>::new(&g.mem, outside, features()).err(),
        Some(QueueError::Unmapped { part: RingPart::UsedRing, .. })
    ));
}

// ---- §2.8.1, §2.8.6: taking chains, buffer ids, used descriptors -------------------------------

#[test]
fn empty_ring_pops_nothing() {
    let g = Guest::new(1 << 16);
    let (cfg, _drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    assert_eq!(q.pop_read(&mut [0u8; 8]), Ok(None));
    assert!(!q.publish(), "publishing nothing never notifies");
}

#[test]
fn a_chain_is_read_and_its_used_descriptor_carries_id_len_and_the_wrap_counter() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    let id = drv.add_chain_with_id(&[Buf::readable(b"hello "), Buf::readable(b"world"), Buf::writable(4)], 5);
    let c = pop_ok(&mut q);
    assert_eq!((c.head(), c.readable().len(), c.writable().len()), (5, 2, 1));
    assert_eq!((c.readable_len(), c.writable_len()), (11, 4));
    let mut buf = [0u8; 11];
    assert_eq!(c.read_at(0, &mut buf), 11);
    assert_eq!(&buf, b"hello world");
    assert_eq!(c.write_at(0, b"ok!!"), 4);
    q.push(id, 4);
    assert_eq!(drv.pop_used(), None, "not visible before publish");
    assert!(q.publish());
    assert_eq!(drv.pop_used(), Some((5, 4)));
    // §2.8.1: the used descriptor is written where the chain started, AVAIL = USED = 1.
    let d = drv.read_desc(0);
    assert_eq!((d.id, d.len, d.flags & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)), (5, 4, 0x8080));
    assert_eq!(q.next_used(), RingPosition { index: 3, wrap: true }, "moved past the chain's 3 descriptors");
    assert_eq!(q.next_avail(), RingPosition { index: 3, wrap: true });
}

#[test]
fn fused_copies_read_and_write_in_the_walk() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    drv.add_chain(&[Buf::readable(b"abc"), Buf::readable(b"def")]);
    let mut buf = [0u8; 16];
    let c = q.pop_read(&mut buf).unwrap().unwrap();
    assert_eq!((c.bytes, c.readable_len, &buf[..6]), (6, 6, &b"abcdef"[..]));
    q.push(c.head, 0);
    drv.add_chain(&[Buf::writable(2), Buf::writable(10)]);
    let c = q.pop_write(b"0123456789").unwrap().unwrap();
    assert_eq!((c.bytes, c.writable_len), (10, 12));
    q.push(c.head, c.bytes);
    assert!(q.publish());
    assert_eq!(drv.pop_used(), Some((0, 0)));
    assert_eq!(drv.pop_used(), Some((1, 10)));
}

#[test]
fn chains_follow_the_wrap_counters_over_many_rounds() {
    let g = Guest::new(1 << 18);
    let (cfg, mut drv) = setup(&g, 5);
    let mut q = packed(&g, cfg, features());
    let mut buf = [0u8; 64];
    for round in 0..40u32 {
        let n = 1 + (round % 3) as usize;
        let bufs: Vec<Buf<'_>> = (0..n).map(|_| Buf::readable(b"xy")).collect();
        drv.reset_alloc();
        let id = drv.add_chain(&bufs);
        let c = q.pop_read(&mut buf).unwrap().expect("chain available");
        assert_eq!((c.head, c.readable_len), (id, 2 * n as u32));
        q.push(c.head, round);
        assert!(q.publish());
        assert_eq!(drv.pop_used(), Some((id, round)));
        assert_eq!(q.pop_read(&mut buf), Ok(None), "round {round}: a stale descriptor is not available");
        assert_eq!(q.next_avail(), drv.next_position());
        assert_eq!(q.next_used(), drv.used_position());
    }
}

#[test]
fn more_completions_than_the_shadow_holds_stay_invisible_until_publish() {
    // The queue keeps completions and stores them to the ring in groups (when its list of 32
    // is full, and at publish); the batch's first descriptor's flags still go last, so the
    // driver sees nothing before `publish` and everything, in order, after it. Two rounds of
    // 40 on a ring of 48, so the second crosses the wrap.
    let g = Guest::new(1 << 18);
    let (cfg, mut drv) = setup(&g, 48);
    let mut q = packed(&g, cfg, features());
    let mut buf = [0u8; 8];
    for round in 0..2u32 {
        drv.reset_alloc();
        let ids: Vec<u16> = (0..40).map(|_| drv.add_chain(&[Buf::readable(b"abc")])).collect();
        for (k, &id) in ids.iter().enumerate() {
            let c = q.pop_read(&mut buf).unwrap().expect("chain available");
            assert_eq!(c.head, id);
            q.push(c.head, 1000 * round + k as u32);
            assert_eq!(drv.pop_used(), None, "round {round}, chain {k}: nothing visible before publish");
        }
        assert!(q.publish());
        for (k, &id) in ids.iter().enumerate() {
            assert_eq!(drv.pop_used(), Some((id, 1000 * round + k as u32)), "round {round}, chain {k}");
        }
        assert_eq!(drv.pop_used(), None);
        assert_eq!(q.next_used(), drv.used_position());
    }
}

#[test]
fn out_of_order_completions_skip_each_buffers_own_descriptors() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    let a = drv.add_chain(&[Buf::readable(b"a"), Buf::readable(b"a"), Buf::readable(b"a")]);
    let b = drv.add_chain(&[Buf::writable(8)]);
    let ca = pop_ok(&mut q);
    let cb = pop_ok(&mut q);
    q.push(cb.head(), 8);
    q.push(ca.head(), 0);
    assert!(q.publish());
    assert_eq!(drv.pop_used(), Some((b, 8)));
    assert_eq!(drv.pop_used(), Some((a, 0)));
    assert_eq!(q.next_used(), RingPosition { index: 4, wrap: true });
}

#[test]
fn in_order_batch_writes_one_used_descriptor_and_skips_the_whole_batch() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features() | VirtioFeatures::IN_ORDER);
    let ids: Vec<u16> = (0..3).map(|_| drv.add_chain(&[Buf::readable(b"p"), Buf::writable(4)])).collect();
    let mut last = 0;
    for _ in 0..3 {
        last = pop_ok(&mut q).head();
    }
    assert!(q.push_in_order_batch(last, 7, 3));
    assert!(q.publish());
    // The driver sees one used descriptor for the last id; with IN_ORDER it knows the batch's
    // earlier buffers are used too and skips all six descriptors.
    drv.set_chain_len(ids[2], 6);
    assert_eq!(drv.pop_used(), Some((ids[2], 7)));
    assert_eq!(drv.pop_used(), None);
    assert_eq!(q.next_used(), RingPosition { index: 6, wrap: true });
    // Without IN_ORDER the batch form is refused.
    let (cfg2, mut drv2) = setup(&g, SIZE);
    let mut q2 = packed(&g, cfg2, features());
    drv2.add_chain(&[Buf::readable(b"p")]);
    let h = pop_ok(&mut q2).head();
    assert!(!q2.push_in_order_batch(h, 0, 1));
}

#[test]
fn indirect_chain_is_walked_through_its_table() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    let id = drv.add_indirect_chain(&[Buf::readable(b"head"), Buf::readable(b"er"), Buf::writable(6)]);
    let c = pop_ok(&mut q);
    assert_eq!((c.head(), c.readable_len(), c.writable_len(), c.readable().len()), (id, 6, 6, 2));
    q.push(id, 6);
    assert!(q.publish());
    assert_eq!(drv.pop_used(), Some((id, 6)));
    assert_eq!(q.next_used(), RingPosition { index: 1, wrap: true });
}

#[test]
fn a_detached_queue_resumes_where_it_stopped() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    drv.add_chain(&[Buf::readable(b"1")]);
    let c = pop_ok(&mut q);
    let detached = q.detach();
    // SAFETY: the same memory, unchanged.
    let mut q = unsafe { detached.attach(&g.mem) };
    q.push(c.head(), 1);
    assert!(q.publish());
    assert_eq!(drv.pop_used(), Some((c.head(), 1)));
}

// ---- §2.8.10 event suppression --------------------------------------------------------------

#[test]
fn driver_event_flags_decide_notifications() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    let complete_one = |q: &mut PackedQueue<'_, Mem>, drv: &mut PackedDriver<'_, Mem>| {
        drv.reset_alloc();
        drv.add_chain(&[Buf::readable(b"x")]);
        let c = pop_ok(q);
        q.push(c.head(), 0);
        let n = q.publish();
        drv.pop_used().unwrap();
        n
    };
    drv.set_driver_event(0, RING_EVENT_FLAGS_DISABLE);
    assert!(!complete_one(&mut q, &mut drv));
    drv.set_driver_event(0, RING_EVENT_FLAGS_ENABLE);
    assert!(complete_one(&mut q, &mut drv));
    // DESC without EVENT_IDX negotiated, and the reserved value 3: notify (never stall).
    drv.set_driver_event(0, RING_EVENT_FLAGS_DESC);
    assert!(complete_one(&mut q, &mut drv));
    drv.set_driver_event(0, 3);
    assert!(complete_one(&mut q, &mut drv));
}

#[test]
fn desc_event_notifies_exactly_when_the_event_descriptor_is_used_across_the_wrap() {
    let g = Guest::new(1 << 16);
    let size = 4;
    let (cfg, mut drv) = setup(&g, size);
    let mut q = packed(&g, cfg, features() | VirtioFeatures::RING_EVENT_IDX);
    // Ask for a notification when the used descriptor at slot 1 of round wrap=0 (the second
    // round) is written.
    let event = RingPosition { index: 1, wrap: false }.to_bits();
    drv.set_driver_event(event, RING_EVENT_FLAGS_DESC);
    let mut notified = Vec::new();
    for _ in 0..10 {
        drv.reset_alloc();
        drv.add_chain(&[Buf::readable(b"x")]);
        let c = pop_ok(&mut q);
        let at = q.next_used();
        q.push(c.head(), 0);
        if q.publish() {
            notified.push(at);
        }
        drv.pop_used().unwrap();
    }
    assert_eq!(notified, vec![RingPosition { index: 1, wrap: false }]);
}

#[test]
fn device_event_structure_follows_enable_and_disable() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    q.disable_notifications();
    assert_eq!(drv.device_event().1, RING_EVENT_FLAGS_DISABLE);
    assert_eq!(q.enable_notifications(), Ok(false));
    assert_eq!(drv.device_event().1, RING_EVENT_FLAGS_ENABLE);
    drv.add_chain(&[Buf::readable(b"x")]);
    assert_eq!(q.enable_notifications(), Ok(true), "a buffer arrived: process it before sleeping");

    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features() | VirtioFeatures::RING_EVENT_IDX);
    drv.add_chain(&[Buf::readable(b"x")]);
    let c = pop_ok(&mut q);
    q.push(c.head(), 0);
    let _ = q.publish();
    assert_eq!(q.enable_notifications(), Ok(false));
    assert_eq!(drv.device_event(), (RingPosition { index: 1, wrap: true }.to_bits(), RING_EVENT_FLAGS_DESC));
}

// ---- one API over both layouts ---------------------------------------------------------------

/// A device written once over [`Virtqueue`]: echoes every readable byte back as the used
/// length.
fn drain<'m, Q: Virtqueue<'m>>(q: &mut Q) -> (Vec<(u16, u32)>, bool) {
    let mut buf = [0u8; 256];
    let mut seen = Vec::new();
    while let Some(c) = q.pop_read(&mut buf).unwrap() {
        seen.push((c.head, c.readable_len));
        q.push(c.head, c.readable_len);
    }
    (seen, q.publish())
}

#[test]
fn one_device_runs_on_both_layouts() {
    let g = Guest::new(1 << 18);
    let (cfg, mut pdrv) = setup(&g, SIZE);
    let mut pq = packed(&g, cfg, features());
    let a = pdrv.add_chain(&[Buf::readable(b"abc")]);
    let b = pdrv.add_indirect_chain(&[Buf::readable(b"de"), Buf::readable(b"f")]);
    assert_eq!(drain(&mut pq), (vec![(a, 3), (b, 3)], true));

    let (scfg, sdata) = virtq::testing::layout(GPA + 0x10000, 16);
    let mut sdrv = virtq::testing::TestDriver::new(&g.mem, scfg, sdata, 0x10000);
    let mut sq = SplitQueue::new(&g.mem, scfg, features()).unwrap();
    let h = sdrv.add_chain(&[Buf::readable(b"abcd")]);
    assert_eq!(drain(&mut sq), (vec![(h, 4)], true));
}

// ---- hostile: wrap-counter confusion, availability ------------------------------------------------

#[test]
fn wrap_counter_confusion_descriptors_of_the_wrong_round_are_not_available() {
    let g = Guest::new(1 << 16);
    let (cfg, drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    let addr = cfg.used_ring + 64;
    // Round 1 needs AVAIL=1, USED=0. Neither "available in round 0" nor "used" bits are taken.
    for flags in [VIRTQ_DESC_F_USED, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED, 0] {
        drv.write_desc(0, PackedDesc { addr, len: 4, id: 0, flags });
        assert_eq!(q.pop_read(&mut [0u8; 8]), Ok(None), "flags {flags:#x}");
    }
    assert_eq!(q.next_avail(), RingPosition::START);
    drv.write_desc(0, PackedDesc { addr, len: 4, id: 0, flags: VIRTQ_DESC_F_AVAIL });
    assert!(q.pop_read(&mut [0u8; 8]).unwrap().is_some());
}

#[test]
fn prefetch_is_a_hint_that_changes_nothing_whatever_the_ring_holds() {
    let g = Guest::new(1 << 16);
    let (cfg, drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    let snapshot = |drv: &PackedDriver<'_, Mem>| (0..SIZE).map(|s| drv.read_desc(s)).collect::<Vec<_>>();
    // Nothing available yet, then slots a hostile driver filled: unmapped and overflowing
    // addresses, an available descriptor of the wrong round.
    q.prefetch();
    let hostile = [
        PackedDesc { addr: u64::MAX, len: 64, id: 0, flags: VIRTQ_DESC_F_AVAIL },
        PackedDesc { addr: 0, len: 0, id: 7, flags: VIRTQ_DESC_F_AVAIL },
        PackedDesc { addr: GPA + (1 << 40), len: 4096, id: 3, flags: VIRTQ_DESC_F_AVAIL },
        PackedDesc { addr: GPA, len: 16, id: 2, flags: VIRTQ_DESC_F_USED },
    ];
    for (slot, d) in hostile.into_iter().enumerate() {
        drv.write_desc(slot as u16 + 1, d);
    }
    let before = snapshot(&drv);
    for _ in 0..3 {
        q.prefetch();
        Virtqueue::prefetch(&q);
    }
    assert_eq!(snapshot(&drv), before, "the ring is not written");
    assert_eq!((q.next_avail(), q.next_used()), (RingPosition::START, RingPosition::START));
    // A real chain at slot 0 is still taken as if no hint had been given.
    drv.write_desc(0, PackedDesc { addr: cfg.used_ring + 64, len: 4, id: 1, flags: VIRTQ_DESC_F_AVAIL });
    let c = q.pop_read(&mut [0u8; 8]).unwrap().expect("slot 0 available");
    assert_eq!((c.head, c.bytes), (1, 4));
    q.prefetch();
    // Rings no longer than the distance looked ahead.
    for size in [1u16, 2, 3] {
        let g = Guest::new(1 << 16);
        let (cfg, mut drv) = setup(&g, size);
        let mut q = packed(&g, cfg, features());
        drv.add_chain(&[Buf::readable(b"x")]);
        q.prefetch();
        assert!(q.pop_read(&mut [0u8; 8]).unwrap().is_some(), "size {size}");
        q.prefetch();
    }
    // The split ring's is the trait's default: nothing.
    let g = Guest::new(1 << 16);
    let (scfg, _) = virtq::testing::layout(GPA, 8);
    let sq = SplitQueue::new(&g.mem, scfg, features()).unwrap();
    Virtqueue::prefetch(&sq);
}

#[test]
fn a_descriptor_left_available_from_the_last_round_is_not_taken_again() {
    let g = Guest::new(1 << 16);
    let size = 2;
    let (cfg, mut drv) = setup(&g, size);
    let mut q = packed(&g, cfg, features());
    drv.add_chain(&[Buf::readable(b"a")]);
    drv.add_chain(&[Buf::readable(b"b")]);
    for _ in 0..2 {
        let c = pop_ok(&mut q);
        q.push(c.head(), 0);
    }
    // The device wrapped: its driver-ring counter is 0 now. Rewrite slot 0 exactly as it was in
    // round 1 (AVAIL=1, USED=0): stale, not available.
    let d = drv.read_desc(0);
    drv.write_desc(0, PackedDesc { flags: VIRTQ_DESC_F_AVAIL, ..d });
    assert_eq!(q.pop_read(&mut [0u8; 8]), Ok(None));
    assert_eq!(q.next_avail(), RingPosition { index: 0, wrap: false });
}

#[test]
fn a_buffer_id_made_available_twice_is_consumed_and_not_completed() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    drv.add_chain_with_id(&[Buf::readable(b"first")], 3);
    drv.add_chain_with_id(&[Buf::readable(b"again")], 3);
    drv.add_chain_with_id(&[Buf::readable(b"next")], 4);
    let first = pop_ok(&mut q);
    assert_eq!(pop_err(&mut q), PopError::IdInUse { id: 3 });
    assert_eq!(pop_ok(&mut q).head(), 4);
    q.push(first.head(), 5);
    q.push(4, 4);
    assert!(q.publish());
    drv.set_chain_len(3, 1);
    assert_eq!(drv.pop_used(), Some((3, 5)));
    assert_eq!(drv.pop_used(), Some((4, 4)));
    assert_eq!(drv.pop_used(), None);
}

#[test]
fn a_buffer_id_out_of_range_consumes_the_chain_and_completes_nothing() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    drv.add_chain_with_id(&[Buf::readable(b"a"), Buf::readable(b"b")], SIZE);
    let good = drv.add_chain_with_id(&[Buf::readable(b"c")], 1);
    assert_eq!(pop_err(&mut q), PopError::HeadOutOfRange { head: SIZE });
    assert_eq!(pop_ok(&mut q).head(), good);
    q.push(good, 0);
    assert!(q.publish());
    // The good chain's used descriptor is at slot 0: nothing was written for the bad one.
    let d = drv.read_desc(0);
    assert_eq!(d.id, good);
    assert_eq!(q.next_avail(), RingPosition { index: 3, wrap: true });
}

#[test]
fn a_chain_that_never_ends_is_cut_at_the_ring_size_and_returned() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    let addr = drv.alloc(16);
    // Every descriptor available with NEXT: the chain would go round forever.
    for slot in 0..SIZE {
        drv.write_desc(slot, PackedDesc { addr, len: 1, id: slot, flags: avail(true) | DescFlags::NEXT.bits() });
    }
    assert_eq!(pop_err(&mut q), PopError::Chain { head: SIZE - 1, error: ChainError::ChainTooLong });
    assert_eq!(q.next_avail(), RingPosition { index: 0, wrap: false }, "the whole ring was consumed");
    assert!(q.publish());
    drv.set_chain_len(SIZE - 1, SIZE);
    assert_eq!(drv.pop_used(), Some((SIZE - 1, 0)));
}

#[test]
fn a_chain_running_into_a_descriptor_that_is_not_available_stops_before_it() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    let addr = drv.alloc(16);
    drv.write_desc(1, PackedDesc { addr, len: 1, id: 9, flags: 0 });
    drv.write_desc(0, PackedDesc { addr, len: 1, id: 2, flags: avail(true) | DescFlags::NEXT.bits() });
    assert_eq!(pop_err(&mut q), PopError::Chain { head: 2, error: ChainError::NotAvailable { index: 1 } });
    assert_eq!(q.next_avail(), RingPosition { index: 1, wrap: true });
    assert_eq!(q.pop_read(&mut [0u8; 4]), Ok(None));
    assert!(q.publish());
    assert_eq!(drv.pop_used(), Some((2, 0)));
}

#[test]
fn a_malformed_chain_is_completed_with_len_0_and_the_queue_moves_on() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    let w = drv.alloc(8);
    let r = drv.alloc(8);
    // Readable after writable (§2.8.13 / §2.7.4.2 as for the split ring).
    drv.write_desc(1, PackedDesc { addr: r, len: 8, id: 6, flags: avail(true) });
    drv.write_desc(0, PackedDesc { addr: w, len: 8, id: 0, flags: avail(true) | 3 });
    drv.set_chain_len(6, 2);
    drv.skip(2);
    let ok = drv.add_chain(&[Buf::readable(b"fine")]);
    assert_eq!(pop_err(&mut q), PopError::Chain { head: 6, error: ChainError::ReadableAfterWritable });
    let c = pop_ok(&mut q);
    assert_eq!(c.head(), ok);
    q.push(ok, 0);
    assert!(q.publish());
    assert_eq!(drv.pop_used(), Some((6, 0)));
    assert_eq!(drv.pop_used(), Some((ok, 0)));
}

#[test]
fn buffer_rules_shared_with_the_split_ring() {
    let g = Guest::new(1 << 16);
    let cases: [(u64, u32, ChainError); 2] = [
        (u64::MAX - 2, 8, ChainError::AddressOverflow { addr: u64::MAX - 2, len: 8 }),
        (0x9000_0000, 8, ChainError::Unmapped { addr: 0x9000_0000 }),
    ];
    for (addr, len, e) in cases {
        let (cfg, drv) = setup(&g, SIZE);
        let mut q = packed(&g, cfg, features());
        drv.write_desc(0, PackedDesc { addr, len, id: 1, flags: avail(true) });
        assert_eq!(pop_err(&mut q), PopError::Chain { head: 1, error: e });
    }
    // Zero-length buffers are accepted and give no segment.
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    let a = drv.alloc(16);
    drv.write_desc(1, PackedDesc { addr: a, len: 0, id: 1, flags: avail(true) });
    drv.write_desc(0, PackedDesc { addr: a, len: 0, id: 0, flags: avail(true) | DescFlags::NEXT.bits() });
    let c = pop_ok(&mut q);
    assert_eq!((c.head(), c.readable_len(), c.readable().len()), (1, 0, 0));
}

#[test]
fn total_chain_length_above_2_pow_32() {
    // As the split ring's test: a 4 GiB region that is only translated, never touched.
    let g = Guest::new(1 << 16);
    let (cfg, drv) = setup(&g, SIZE);
    let mut mem = g.mem.clone();
    let huge = 0x1_0000_0000u64;
    // SAFETY: the 4 GiB region is only translated, never dereferenced, in this test.
    mem.add(unsafe { virtq::Region::new(huge, g.mem.regions()[0].host(), 1 << 32) }).unwrap();
    drv.write_desc(1, PackedDesc { addr: huge, len: 0x8000_0000, id: 1, flags: avail(true) });
    drv.write_desc(0, PackedDesc { addr: huge, len: 0x8000_0000, id: 0, flags: avail(true) | DescFlags::NEXT.bits() });
    let mut q = PackedQueue::<_>::new(&mem, cfg, features()).unwrap();
    let mut c = Chain::<4>::new();
    assert_eq!(q.pop_into(&mut c), Err(PopError::Chain { head: 1, error: ChainError::TotalLengthOverflow }));
    drv.write_desc(3, PackedDesc { addr: huge, len: 0x7fff_ffff, id: 2, flags: avail(true) });
    drv.write_desc(2, PackedDesc { addr: huge, len: 0x8000_0000, id: 0, flags: avail(true) | DescFlags::NEXT.bits() });
    assert!(matches!(q.pop_into(&mut c), Ok(Some(_))));
    assert_eq!((c.head(), c.readable_len()), (2, u32::MAX));
}

// ---- hostile: §2.8.7 indirect rules ------------------------------------------------------------

/// One indirect-table entry to write: buffer length, flags.
type Entry = (u32, u16);

fn indirect_table(drv: &mut PackedDriver<'_, Mem>, entries: &[Entry]) -> u64 {
    let t = drv.alloc(16 * entries.len() as u64 + 16);
    for (i, &(len, flags)) in entries.iter().enumerate() {
        let b = drv.alloc(len as u64);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&b.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[14..].copy_from_slice(&flags.to_le_bytes());
        drv.write(t + 16 * i as u64, &raw);
    }
    t
}

#[test]
fn indirect_with_next_is_rejected() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    let t = indirect_table(&mut drv, &[(4, 0)]);
    let b = drv.alloc(4);
    drv.write_desc(1, PackedDesc { addr: b, len: 4, id: 3, flags: avail(true) });
    let flags = avail(true) | DescFlags::INDIRECT.bits() | DescFlags::NEXT.bits();
    drv.write_desc(0, PackedDesc { addr: t, len: 16, id: 0, flags });
    assert_eq!(pop_err(&mut q), PopError::Chain { head: 3, error: ChainError::IndirectWithNext });
}

#[test]
fn indirect_inside_a_chain_is_rejected() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    let t = indirect_table(&mut drv, &[(4, 0)]);
    let b = drv.alloc(4);
    drv.write_desc(1, PackedDesc { addr: t, len: 16, id: 2, flags: avail(true) | DescFlags::INDIRECT.bits() });
    drv.write_desc(0, PackedDesc { addr: b, len: 4, id: 0, flags: avail(true) | DescFlags::NEXT.bits() });
    assert_eq!(pop_err(&mut q), PopError::Chain { head: 2, error: ChainError::IndirectInChain });
}

#[test]
fn indirect_table_rules() {
    let g = Guest::new(1 << 16);
    let cases: [(&[Entry], u32, ChainError); 4] = [
        (&[(4, 0)], 0, ChainError::IndirectLength { len: 0 }),
        (&[(4, 0), (4, 0)], 24, ChainError::IndirectLength { len: 24 }),
        (&[(4, DescFlags::INDIRECT.bits())], 16, ChainError::NestedIndirect),
        (&[(4, 0); 9], 16 * 9, ChainError::IndirectTooLarge { entries: 9 }),
    ];
    for (entries, len, e) in cases {
        let (cfg, mut drv) = setup(&g, SIZE);
        let mut q = packed(&g, cfg, features());
        let t = indirect_table(&mut drv, entries);
        drv.write_desc(0, PackedDesc { addr: t, len, id: 4, flags: avail(true) | DescFlags::INDIRECT.bits() });
        assert_eq!(pop_err(&mut q), PopError::Chain { head: 4, error: e });
        assert!(q.publish());
        assert_eq!(drv.pop_used(), Some((4, 0)));
    }
    // Not negotiated.
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, VirtioFeatures::VERSION_1);
    let t = indirect_table(&mut drv, &[(4, 0)]);
    drv.write_desc(0, PackedDesc { addr: t, len: 16, id: 4, flags: avail(true) | DescFlags::INDIRECT.bits() });
    assert_eq!(pop_err(&mut q), PopError::Chain { head: 4, error: ChainError::IndirectNotNegotiated });
}

#[test]
fn indirect_entries_are_consecutive_next_and_ids_in_the_table_are_ignored() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    // NEXT set on the first entry, not on the second, nothing on the third: all three count
    // (§2.8.7: only WRITE is valid in the table; the others are reserved and ignored).
    let t = indirect_table(&mut drv, &[(2, DescFlags::NEXT.bits()), (3, 0), (5, DescFlags::WRITE.bits())]);
    drv.write_desc(0, PackedDesc { addr: t, len: 48, id: 7, flags: avail(true) | DescFlags::INDIRECT.bits() });
    let c = pop_ok(&mut q);
    assert_eq!((c.head(), c.readable_len(), c.writable_len()), (7, 5, 5));
    // Readable after writable is still a rule inside the table.
    let t = indirect_table(&mut drv, &[(2, DescFlags::WRITE.bits()), (3, 0)]);
    drv.write_desc(1, PackedDesc { addr: t, len: 32, id: 1, flags: avail(true) | DescFlags::INDIRECT.bits() });
    assert_eq!(pop_err(&mut q), PopError::Chain { head: 1, error: ChainError::ReadableAfterWritable });
}

// ---- virtio-net receive over the packed ring (the same helpers as the split ring) ------------

fn mrg() -> VirtioFeatures {
    features() | VirtioFeatures::NET_MRG_RXBUF
}

/// Reads the `num_buffers` field of the header at guest address `at`.
fn num_buffers(drv: &PackedDriver<'_, Mem>, at: u64) -> u16 {
    let mut b = [0u8; 2];
    drv.read(at + 10, &mut b);
    u16::from_le_bytes(b)
}

#[test]
fn net_receive_places_a_frame_in_one_packed_buffer() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, mrg());
    let id = drv.add_chain(&[Buf::writable(1526)]);
    let buf = drv.read_desc(0).addr;
    let frame: Vec<u8> = (0..64u8).collect();
    let mut s: virtq::net::RxScratch<'_> = virtq::net::RxScratch::new();
    let out = virtq::net::receive(&mut q, &mut s, mrg(), &virtq::net::VirtioNetHdr::default(), &frame).unwrap();
    assert_eq!((out.buffers, out.bytes), (1, 76));
    assert!(q.publish());
    assert_eq!(drv.pop_used(), Some((id, 76)));
    assert_eq!(num_buffers(&drv, buf), 1);
    let mut got = [0u8; 64];
    drv.read(buf + 12, &mut got);
    assert_eq!(&got[..], &frame[..]);
}

#[test]
fn net_receive_merges_packed_buffers_and_gives_them_back_when_short() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, mrg());
    let frame: Vec<u8> = (0..100u8).collect();
    let hdr = virtq::net::VirtioNetHdr::default();
    let mut s: virtq::net::RxScratch<'_> = virtq::net::RxScratch::new();
    // 112 bytes in buffers of 40: three needed, two there. Both are given back.
    let a = drv.add_chain(&[Buf::writable(40)]);
    let b = drv.add_chain(&[Buf::writable(20), Buf::writable(20)]);
    assert_eq!(virtq::net::receive(&mut q, &mut s, mrg(), &hdr, &frame), Err(virtq::net::RxError::NoBuffers));
    assert_eq!(q.next_avail(), RingPosition::START, "the reservations were given back");
    assert!(!q.publish());
    let c = drv.add_chain(&[Buf::writable(40)]);
    let out = virtq::net::receive(&mut q, &mut s, mrg(), &hdr, &frame).unwrap();
    assert_eq!((out.buffers, out.bytes), (3, 112));
    assert!(q.publish());
    assert_eq!(drv.pop_used(), Some((a, 40)));
    assert_eq!(drv.pop_used(), Some((b, 40)));
    assert_eq!(drv.pop_used(), Some((c, 32)));
    assert_eq!(num_buffers(&drv, drv.read_desc(0).addr), 3);
    // The frame's bytes continue across the buffers: 28 in the first, 40 in the second's two
    // pieces, the last 32 in the third.
    let mut got = [0u8; 20];
    drv.read(drv.read_desc(2).addr, &mut got);
    assert_eq!(&got[..], &frame[48..68]);
    assert_eq!(q.next_used(), RingPosition { index: 4, wrap: true });
}

#[test]
fn net_receive_burst_runs_on_the_packed_ring_across_the_wrap() {
    let g = Guest::new(1 << 18);
    let (cfg, mut drv) = setup(&g, 4);
    let mut q = packed(&g, cfg, mrg());
    let frame = [7u8; 30];
    let mut s: virtq::net::RxScratch<'_> = virtq::net::RxScratch::new();
    for round in 0..6 {
        drv.reset_alloc();
        let ids: Vec<u16> = (0..3).map(|_| drv.add_chain(&[Buf::writable(64)])).collect();
        let burst =
            virtq::net::receive_burst(&mut q, &mut s, mrg(), 4, |_| (virtq::net::VirtioNetHdr::default(), &frame[..]));
        assert_eq!((burst.placed, burst.stopped), (3, Some(virtq::net::RxError::NoBuffers)), "round {round}");
        assert!(q.publish());
        for id in ids {
            assert_eq!(drv.pop_used(), Some((id, 42)));
        }
    }
}

/// `pop_gather_uncompleted` on a packed ring: a chain that fits the copy is copied whole and
/// leaves nothing listed; of a longer one the first bytes are copied and the readable pieces
/// past them kept in order, after the pieces of the chains before; `take_front` moves more
/// into the copy. A chain whose pieces find no room in the list is copied after all, nothing of it
/// kept. Buffer ids to complete; the frame reads back through a `Gather` as the driver
/// wrote it.
#[test]
fn pop_gather_keeps_the_pieces_of_several_chains() {
    use virtq::net::{FrameSource, Gather};
    use virtq::Segments;
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, features());
    let data: Vec<u8> = (0..200u8).collect();
    let s = drv.add_chain(&[Buf::readable(&data[..8]), Buf::readable(&data[8..20])]);
    let a = drv.add_chain(&[Buf::readable(&data[..10]), Buf::readable(&data[10..150]), Buf::readable(&data[150..])]);
    let b = drv.add_chain(&[Buf::readable(&data[..50]), Buf::readable(&data[50..60])]);
    let mut segs: Segments<'_, 3> = Segments::new();
    let mut buf = [0u8; 256];
    let c = q.pop_gather_uncompleted(&mut buf, 32, &mut segs).unwrap().unwrap();
    assert_eq!((c.head, c.bytes, c.readable_len), (s, 20, 20), "copied whole");
    assert!(segs.is_empty(), "nothing listed");
    assert_eq!(buf[..20], data[..20]);
    let c = q.pop_gather_uncompleted(&mut buf, 32, &mut segs).unwrap().unwrap();
    assert_eq!((c.head, c.bytes, c.readable_len, c.writable_len), (a, 32, 200, 0));
    assert_eq!(buf[..32], data[..32]);
    // Kept: what the copy did not take, the second piece's last 118 bytes, and the third.
    let kept: Vec<usize> = segs.as_slice().iter().map(|s| s.len()).collect();
    assert_eq!(kept, [118, 50]);
    assert_eq!(segs.take_front(0, &mut buf[32..38]), 6);
    let gather = Gather::new(&buf[4..38], segs.as_slice(), 162);
    let mut back = [0u8; 196];
    assert_eq!(gather.read_into(&mut back), 196);
    assert_eq!(back[..], data[4..]);
    // Two pieces past the copy and a list with room for one more: copied after all, nothing
    // of it kept, the other chain's pieces left as they were.
    let mut buf2 = [0u8; 64];
    let c = q.pop_gather_uncompleted(&mut buf2, 8, &mut segs).unwrap().unwrap();
    assert_eq!((c.head, c.bytes, c.readable_len), (b, 60, 60));
    assert_eq!(buf2[..60], data[..60]);
    assert_eq!(segs.len(), 2);
    q.push(s, 0);
    q.push(a, 0);
    q.push(b, 0);
    assert!(q.publish());
    assert_eq!((drv.pop_used(), drv.pop_used(), drv.pop_used()), (Some((s, 0)), Some((a, 0)), Some((b, 0))));
}

/// RX on a packed ring meets a chain with no id to complete it: a buffer id out of range on the
/// fast path. Completing nothing for it would leave its descriptors behind the used position
/// for good (§2.8.6), so the burst stops with the typed error (`PopError::unreturnable_on`):
/// the frame before it is placed, the chain after it is not taken.
#[test]
fn net_receive_burst_stops_on_a_buffer_id_out_of_range() {
    let g = Guest::new(1 << 16);
    let (cfg, mut drv) = setup(&g, SIZE);
    let mut q = packed(&g, cfg, mrg());
    let frame = [7u8; 30];
    let mut s: virtq::net::RxScratch<'_> = virtq::net::RxScratch::new();
    let a = drv.add_chain(&[Buf::writable(64)]);
    drv.add_chain_with_id(&[Buf::writable(64)], SIZE);
    drv.add_chain(&[Buf::writable(64)]);
    let burst =
        virtq::net::receive_burst(&mut q, &mut s, mrg(), 3, |_| (virtq::net::VirtioNetHdr::default(), &frame[..]));
    let stop = virtq::net::RxError::Ring(PopError::HeadOutOfRange { head: SIZE });
    assert_eq!(
        burst,
        virtq::net::RxBurst { placed: 1, bytes: 30, refused: 0, bad_chains: 0, stopped: Some(stop) },
        "stopped at the bad id, not counted as a bad chain skipped"
    );
    assert_eq!(q.next_avail(), RingPosition { index: 2, wrap: true }, "the chain after it was not taken");
    assert!(q.publish());
    assert_eq!(drv.pop_used(), Some((a, 42)));
    assert_eq!(drv.pop_used(), None, "nothing completed for the bad chain or after it");
}

/// The same in the middle of a merged packet, for a buffer id in flight and one out of range:
/// the buffer reserved for the frame before the bad chain cannot be given back (the bad chain
/// after it is consumed), so it is completed with len 0, in ring order; `receive` stops with
/// the typed error.
#[test]
fn net_receive_returns_reserved_buffers_empty_and_stops_on_an_unreturnable_chain() {
    for (bad_id, error) in [(0, PopError::IdInUse { id: 0 }), (SIZE + 3, PopError::HeadOutOfRange { head: SIZE + 3 })] {
        let g = Guest::new(1 << 16);
        let (cfg, mut drv) = setup(&g, SIZE);
        let mut q = packed(&g, cfg, mrg());
        let hdr = virtq::net::VirtioNetHdr::default();
        let mut s: virtq::net::RxScratch<'_> = virtq::net::RxScratch::new();
        // 112 bytes in buffers of 40: the first is reserved (id 0, in flight), then the bad one.
        let a = drv.add_chain(&[Buf::writable(40)]);
        assert_eq!(a, 0);
        drv.add_chain_with_id(&[Buf::writable(40)], bad_id);
        drv.add_chain(&[Buf::writable(40)]);
        drv.add_chain(&[Buf::writable(40)]);
        let frame: Vec<u8> = (0..100u8).collect();
        assert_eq!(virtq::net::receive(&mut q, &mut s, mrg(), &hdr, &frame), Err(virtq::net::RxError::Ring(error)));
        assert_eq!(q.next_avail(), RingPosition { index: 2, wrap: true }, "{error:?}");
        assert!(q.publish());
        assert_eq!(drv.pop_used(), Some((a, 0)), "{error:?}: the reserved buffer, returned empty");
        assert_eq!(drv.pop_used(), None, "{error:?}");
        let mut got = [0u8; 40];
        drv.read(drv.read_desc(0).addr, &mut got);
        assert_eq!(got, [0u8; 40], "{error:?}: nothing written into it");
    }
}

/// The rule's one owner, `PopError::unreturnable_on`: a chain with no id to complete it stops
/// a packed ring and an IN_ORDER split ring, never a plain split ring; no other error does.
#[test]
fn unreturnable_chains_stop_packed_and_in_order_rings_only() {
    let g = Guest::new(1 << 16);
    let (cfg, _) = setup(&g, SIZE);
    let (scfg, _) = virtq::testing::layout(GPA + 0x8000, SIZE);
    let in_order = features() | VirtioFeatures::IN_ORDER;
    let chain = PopError::Chain { head: 1, error: ChainError::ChainTooLong };
    let avail = PopError::AvailIndex(virtq::avail::AvailIndexError { avail_idx: 100, next_avail: 0 });
    let cases = [PopError::HeadOutOfRange { head: SIZE }, PopError::IdInUse { id: 2 }];
    for f in [features(), in_order] {
        let p = packed(&g, cfg, f);
        let s = SplitQueue::new(&g.mem, scfg, f).unwrap();
        assert_eq!(cases.map(|e| e.unreturnable_on(&p)), [Some(SIZE), Some(2)], "packed, {f:?}");
        let want = if f == in_order { [Some(SIZE), Some(2)] } else { [None, None] };
        assert_eq!(cases.map(|e| e.unreturnable_on(&s)), want, "split, {f:?}");
        for e in [chain, avail] {
            assert_eq!((e.unreturnable_on(&p), e.unreturnable_on(&s)), (None, None), "{e:?}");
        }
    }
}
