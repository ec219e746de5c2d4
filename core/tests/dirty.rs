//! Write tracking ([`virtq::dirty`]): with a logger, every byte the device writes into guest
//! memory is reported, and nothing else is. Each case fills guest memory with a byte the device
//! never writes, runs the device with a recording logger, then compares the bytes that changed
//! with the bytes reported: they must be the same set (buffers by guest address, the used ring
//! by offset), and so must the 4 KiB pages a migration would copy.

mod common;

use std::cell::RefCell;

use common::{Guest, GPA};
use virtq::net::{receive_burst, receive_burst_logged, RxScratch, VirtioNetHdr};
use virtq::testing::{layout, packed_layout, Buf, PackedDriver, TestDriver};
use virtq::{NoLog, PackedQueue, QueueConfig, RegionTable, SplitQueue, VirtioFeatures, WriteLog};

/// A byte no device write produces here (frames are built from 0..0x80, headers are small).
const FILL: u8 = 0xA5;

#[derive(Default)]
struct Recorder {
    buffers: RefCell<Vec<(u64, u64)>>,
    used: RefCell<Vec<(u64, u64)>>,
    /// Packed rings: the descriptor ring and the device area, by offset.
    descs: RefCell<Vec<(u64, u64)>>,
    device: RefCell<Vec<(u64, u64)>>,
}

impl WriteLog for Recorder {
    fn buffer(&self, addr: u64, len: u64) {
        assert!(len > 0, "empty report");
        self.buffers.borrow_mut().push((addr, len));
    }
    fn used_ring(&self, offset: u64, len: u64) {
        assert!(len > 0, "empty report");
        self.used.borrow_mut().push((offset, len));
    }
    fn descriptor_ring(&self, offset: u64, len: u64) {
        assert!(len > 0, "empty report");
        self.descs.borrow_mut().push((offset, len));
    }
    fn device_area(&self, offset: u64, len: u64) {
        assert!(len > 0, "empty report");
        self.device.borrow_mut().push((offset, len));
    }
}

impl Recorder {
    /// Every range reported, as guest addresses (the used ring at `cfg.used_ring`), merged.
    fn ranges(&self, cfg: &QueueConfig) -> Vec<(u64, u64)> {
        let b = self.buffers.borrow();
        let u = self.used.borrow();
        let used = u.iter().map(|&(o, l)| (cfg.used_ring + o, l));
        let d = self.descs.borrow();
        let descs = d.iter().map(|&(o, l)| (cfg.desc_table + o, l));
        let e = self.device.borrow();
        // A packed ring's device area is at `used_ring` too (`QueueConfig`'s naming).
        let device = e.iter().map(|&(o, l)| (cfg.used_ring + o, l));
        merge(b.iter().copied().chain(used).chain(descs).chain(device).map(|(a, l)| (a, a + l)).collect())
    }
}

/// Sorts half-open ranges and merges those that overlap or touch.
fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// All of guest memory, region by region: (guest address, bytes).
fn snapshot(g: &Guest, drv: &TestDriver<'_, RegionTable<8>>) -> Vec<(u64, Vec<u8>)> {
    g.mem
        .regions()
        .iter()
        .map(|r| {
            let mut v = vec![0u8; r.len() as usize];
            drv.read(r.gpa(), &mut v);
            (r.gpa(), v)
        })
        .collect()
}

/// The ranges of bytes that differ, merged. Whole 64-byte chunks are compared first (one
/// slice comparison each, which keeps the test quick under Miri), bytes only where a chunk
/// differs.
fn changed(before: &[(u64, Vec<u8>)], after: &[(u64, Vec<u8>)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for ((gpa, a), (_, b)) in before.iter().zip(after) {
        for (c, (x, y)) in a.chunks(64).zip(b.chunks(64)).enumerate() {
            if x != y {
                let base = gpa + 64 * c as u64;
                out.extend(
                    x.iter()
                        .zip(y)
                        .enumerate()
                        .filter(|(_, (p, q))| p != q)
                        .map(|(i, _)| (base + i as u64, base + i as u64 + 1)),
                );
            }
        }
    }
    merge(out)
}

fn pages(ranges: &[(u64, u64)]) -> Vec<u64> {
    let mut p: Vec<u64> = ranges.iter().flat_map(|&(a, b)| (a >> 12)..=((b - 1) >> 12)).collect();
    p.dedup();
    p
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_add(seed) & 0x7f).collect()
}

/// Runs `f` between two snapshots with a fresh recorder and checks that the bytes reported are
/// exactly the bytes changed (as merged ranges), and so the pages.
fn check(g: &Guest, drv: &TestDriver<'_, RegionTable<8>>, cfg: &QueueConfig, f: impl FnOnce(&Recorder)) {
    let before = snapshot(g, drv);
    let log = Recorder::default();
    f(&log);
    let after = snapshot(g, drv);
    let mut changed = changed(&before, &after);
    // `used.idx` is one 16-bit store: if it moved, both bytes were written (its high byte
    // rarely changes).
    let idx = cfg.used_ring + 2;
    if changed.iter().any(|&(a, b)| a < idx + 2 && idx < b) {
        changed.push((idx, idx + 2));
        changed = merge(changed);
    }
    let reported = log.ranges(cfg);
    let hex = |v: &[(u64, u64)]| v.iter().map(|(a, b)| format!("{a:#x}..{b:#x}")).collect::<Vec<_>>().join(" ");
    assert_eq!(hex(&reported), hex(&changed), "reported ranges = written ranges");
    assert_eq!(pages(&reported), pages(&changed));
}

/// Guest memory in two adjacent regions, so that buffers cross from one to the other: rings at
/// [`GPA`], data from `data` on.
fn guest() -> Guest {
    let mut g = Guest::new(0x4000);
    g.add_region(GPA + 0x4000, 0x4000);
    g
}

fn rx_features(mrg: bool) -> VirtioFeatures {
    let f = VirtioFeatures::VERSION_1 | VirtioFeatures::RING_INDIRECT_DESC;
    if mrg {
        f | VirtioFeatures::NET_MRG_RXBUF
    } else {
        f
    }
}

/// Posts `bufs` one-buffer chains of `len` bytes (or, with `indirect`, one indirect chain of
/// two buffers per chain), each filled with [`FILL`].
fn post(drv: &mut TestDriver<'_, RegionTable<8>>, n: usize, len: u32, indirect: bool) {
    // Fill the whole data area first (indirect tables are allocated there): every buffer starts
    // as FILL.
    let (_, data) = layout(GPA, 16);
    let end = GPA + 0x8000;
    drv.write(data + 0x800, &vec![FILL; (end - data - 0x800) as usize]);
    // And the used ring but for `idx`: the device's elements and suppression fields then always
    // differ from what was there.
    let cfg = drv.config();
    drv.write(cfg.used_ring, &[FILL; 2]);
    drv.write(cfg.used_ring + 4, &[FILL; 8 * 16 + 2]);
    for _ in 0..n {
        let head = if indirect {
            drv.add_indirect_chain(&[Buf::writable(len / 2), Buf::writable(len - len / 2)])
        } else {
            drv.add_chain(&[Buf::writable(len)])
        };
        let _ = head;
    }
}

fn rx_case(mrg: bool, indirect: bool, frames: &[usize], buf_len: u32, nbufs: usize) {
    let g = guest();
    let (cfg, _) = layout(GPA, 16);
    let (_, data) = layout(GPA, 16);
    // Buffers from the middle of region 1 on, crossing into region 2.
    let mut drv = TestDriver::new(&g.mem, cfg, data + 0x800, GPA + 0x8000 - data - 0x800);
    let f = rx_features(mrg);
    let mut q = SplitQueue::new(&g.mem, cfg, f).unwrap();
    post(&mut drv, nbufs, buf_len, indirect);
    let frames: Vec<Vec<u8>> = frames.iter().enumerate().map(|(i, &l)| frame(l, i as u8)).collect();
    let zero = VirtioNetHdr::default();
    check(&g, &drv, &cfg, |log| {
        let mut s: RxScratch<'_> = RxScratch::new();
        let b = receive_burst_logged(&mut q, &mut s, f, frames.len(), |i| (zero, frames[i].as_slice()), log);
        assert_eq!(b.placed, frames.len(), "{b:?}");
        let _ = q.publish_logged(log);
    });
}

#[test]
fn rx_one_buffer_per_frame() {
    rx_case(false, false, &[60, 1000, 1500, 200], 1536, 6);
}

#[test]
fn rx_mergeable_frames_over_several_buffers_across_regions() {
    rx_case(true, false, &[60, 3000, 5000, 100], 1024, 14);
}

#[test]
fn rx_indirect_chains() {
    rx_case(false, true, &[60, 1400, 900], 1536, 4);
    rx_case(true, true, &[2500, 60], 1024, 6);
}

/// The used ring wraps: slots at the end and at the start, and `used.idx`, are reported.
#[test]
fn used_ring_that_wraps() {
    let g = guest();
    let (cfg, data) = layout(GPA, 16);
    let mut drv = TestDriver::new(&g.mem, cfg, data + 0x800, GPA + 0x8000 - data - 0x800);
    let f = rx_features(false);
    let mut q = SplitQueue::new(&g.mem, cfg, f).unwrap();
    let zero = VirtioNetHdr::default();
    let small = frame(60, 1);
    // 12 frames, then 8 more: the second batch's slots are 12..16 and 0..4.
    for round in [12usize, 8] {
        drv.reset_alloc();
        post(&mut drv, round, 256, false);
        check(&g, &drv, &cfg, |log| {
            let mut s: RxScratch<'_> = RxScratch::new();
            let b = receive_burst_logged(&mut q, &mut s, f, round, |_| (zero, small.as_slice()), log);
            assert_eq!(b.placed, round);
            let _ = q.publish_logged(log);
        });
    }
}

/// `pop_write_logged` and the suppression field (`used.flags` without EVENT_IDX,
/// `avail_event` with it).
#[test]
fn pop_write_and_notification_suppression() {
    for event_idx in [false, true] {
        let g = guest();
        let (cfg, data) = layout(GPA, 16);
        let mut drv = TestDriver::new(&g.mem, cfg, data + 0x800, GPA + 0x8000 - data - 0x800);
        let f = if event_idx { rx_features(false) | VirtioFeatures::RING_EVENT_IDX } else { rx_features(false) };
        let mut q = SplitQueue::new(&g.mem, cfg, f).unwrap();
        post(&mut drv, 2, 3000, false);
        let payload = frame(2500, 3);
        check(&g, &drv, &cfg, |log| {
            let c = q.pop_write_logged(&payload, log).unwrap().unwrap();
            q.push(c.head, c.bytes);
            let _ = q.publish_logged(log);
        });
        // With EVENT_IDX the device writes `avail_event`: move it so that the write shows.
        let _ = q.pop_write(&payload).unwrap().unwrap();
        check(&g, &drv, &cfg, |log| {
            if event_idx {
                let _ = q.enable_notifications();
            } else {
                q.disable_notifications();
            }
            q.log_suppression(log);
        });
    }
}

/// With [`NoLog`] the logged burst is the plain one: same placement, same used ring.
#[test]
fn no_log_is_the_plain_burst() {
    let run = |logged: bool| {
        let g = guest();
        let (cfg, data) = layout(GPA, 16);
        let mut drv = TestDriver::new(&g.mem, cfg, data + 0x800, GPA + 0x8000 - data - 0x800);
        let f = rx_features(true);
        let mut q = SplitQueue::new(&g.mem, cfg, f).unwrap();
        post(&mut drv, 10, 1024, false);
        let frames: Vec<Vec<u8>> = [60usize, 3000, 700].iter().map(|&l| frame(l, 9)).collect();
        let zero = VirtioNetHdr::default();
        let mut s: RxScratch<'_> = RxScratch::new();
        let b = if logged {
            receive_burst_logged(&mut q, &mut s, f, 3, |i| (zero, frames[i].as_slice()), &NoLog)
        } else {
            receive_burst(&mut q, &mut s, f, 3, |i| (zero, frames[i].as_slice()))
        };
        let notify = if logged { q.publish_logged(&NoLog) } else { q.publish() };
        (b, notify, snapshot(&g, &drv))
    };
    assert_eq!(run(true), run(false));
}

/// A packed ring (§2.8): its used descriptors are written in place in the descriptor ring,
/// reported as the descriptors between two publishes (whole descriptors: the device writes
/// bytes 8..16 of each, so the pages are the same), and the device area after the
/// suppression changes. Over several rounds, so the used descriptors wrap. The bytes the
/// device changed all lie in reported ranges, and the pages are exactly the pages written.
#[test]
fn packed_rx_used_descriptors_and_device_area() {
    for mrg in [false, true] {
        let g = guest();
        let (cfg, data) = packed_layout(GPA, 16);
        let base = data + 0x800;
        let mut drv = PackedDriver::new(&g.mem, cfg, base, GPA + 0x8000 - base);
        let f = rx_features(mrg) | VirtioFeatures::RING_PACKED | VirtioFeatures::RING_EVENT_IDX;
        let mut q: PackedQueue<'_, _> = PackedQueue::new(&g.mem, cfg, f).unwrap();
        let zero = VirtioNetHdr::default();
        // 2 or 3 frames a round (3 or 4 buffers with mergeable buffers): the used
        // descriptors wrap in the middle of a publish.
        for round in 0..8u8 {
            let lens = &[60usize, 1500, 700][..2 + round as usize % 2];
            drv.reset_alloc();
            drv.write(base, &vec![FILL; (GPA + 0x8000 - base) as usize]);
            // The device's part of every descriptor, so that what it writes always differs.
            for slot in 0..16u64 {
                drv.write(cfg.desc_table + 16 * slot + 8, &[FILL; 6]);
            }
            drv.write(cfg.used_ring, &[FILL; 4]);
            // Exactly the buffers the frames take, so the driver never runs out of slots.
            for _ in 0..lens.len() + mrg as usize {
                drv.add_chain(&[Buf::writable(if mrg { 1024 } else { 1600 })]);
            }
            let frames: Vec<Vec<u8>> = lens.iter().map(|&l| frame(l, round)).collect();
            let read = |a: u64, b: &mut [u8]| drv.read(a, b);
            let before = snapshot_with(&g, read);
            let log = Recorder::default();
            let mut s: RxScratch<'_> = RxScratch::new();
            let b = receive_burst_logged(&mut q, &mut s, f, frames.len(), |i| (zero, frames[i].as_slice()), &log);
            assert_eq!(b.placed, frames.len(), "{b:?}");
            let _ = q.publish_logged(&log);
            q.disable_notifications();
            q.log_suppression(&log);
            let after = snapshot_with(&g, |a, b| drv.read(a, b));
            let changed = changed(&before, &after);
            let reported = log.ranges(&cfg);
            for &(a, b) in &changed {
                assert!(
                    reported.iter().any(|&(x, y)| x <= a && b <= y),
                    "mrg {mrg} round {round}: {a:#x}..{b:#x} written, not reported ({reported:x?})"
                );
            }
            assert_eq!(pages(&reported), pages(&changed), "mrg {mrg} round {round}");
            let mut used = 0;
            while drv.pop_used().is_some() {
                used += 1;
            }
            assert_eq!(used, lens.len() + mrg as usize, "every buffer used");
        }
    }
}

fn snapshot_with(g: &Guest, read: impl Fn(u64, &mut [u8])) -> Vec<(u64, Vec<u8>)> {
    g.mem
        .regions()
        .iter()
        .map(|r| {
            let mut v = vec![0u8; r.len() as usize];
            read(r.gpa(), &mut v);
            (r.gpa(), v)
        })
        .collect()
}
