//! virtq-blk end to end: the in-tree vhost-user front-end (real socket, memfd guest memory,
//! eventfds, the core's test driver on the rings) drives real requests against a temporary
//! image file, through the library's control loop and this crate's data path, and the image
//! is checked on disk. Also the binary's conventions: `--print-capabilities`, `--fd`, SIGTERM.

#[path = "../../vhost-user/tests/frontend/mod.rs"]
mod frontend;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use frontend::*;
use virtq::testing::{Buf, TestDriver};
use virtq::{RegionTable, VirtioFeatures};
use virtq_blk::device::BURST;
use virtq_blk::{run_data_path, BlkDevice, BlkModel, Image};
use virtq_vhost_user::backend::{Backend, BackendHandle, NoHandler, SocketSpec};
use virtq_vhost_user::device::DeviceConfig;

const IN: u32 = 0;
const OUT: u32 = 1;
const FLUSH: u32 = 4;
const GET_ID: u32 = 8;
const DISCARD: u32 = 11;
const WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// 1 MiB image: 2048 sectors.
const IMAGE_LEN: usize = 1 << 20;

fn blk_features() -> u64 {
    (VirtioFeatures::VERSION_1
        | VirtioFeatures::RING_INDIRECT_DESC
        | VirtioFeatures::BLK_FLUSH
        | VirtioFeatures::BLK_SEG_MAX
        | VirtioFeatures::BLK_DISCARD
        | VirtioFeatures::BLK_WRITE_ZEROES
        | VirtioFeatures::BLK_CONFIG_WCE
        | VirtioFeatures::BLK_MQ)
        .bits()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_mul(37) ^ (i as u8).wrapping_mul(11) ^ (i >> 9) as u8).collect()
}

fn hdr(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn seg(sector: u64, num_sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = sector.to_le_bytes().to_vec();
    s.extend_from_slice(&num_sectors.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

fn unique(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("virtq-blk-{name}-{}-{n}", std::process::id()))
}

/// A back-end serving a fresh image (filled with `pattern(0xA5, ..)`) on its own socket, with
/// the data path on a thread.
struct Rig {
    socket: PathBuf,
    image: PathBuf,
    dev: BlkDevice,
    handle: BackendHandle,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Rig {
    fn new(name: &str, queues: u16, read_only: bool) -> Rig {
        Rig::build(name, queues, read_only, IMAGE_LEN as u64, true)
    }

    /// An image of `len` bytes: the pattern in its first [`IMAGE_LEN`], sparse after that. Without
    /// `data_path` no thread serves the rings: the test calls `process` itself.
    fn build(name: &str, queues: u16, read_only: bool, len: u64, data_path: bool) -> Rig {
        let image = unique(&format!("{name}.img"));
        std::fs::write(&image, pattern(0xA5, IMAGE_LEN)).unwrap();
        std::fs::OpenOptions::new().write(true).open(&image).unwrap().set_len(len.max(IMAGE_LEN as u64)).unwrap();
        let socket = unique(&format!("{name}.sock"));
        let img = Arc::new(Image::open(&image, read_only).unwrap());
        let model = BlkModel::new(img, queues, "virtq-test-disk");
        let mut b = Backend::new().unwrap();
        let spec = SocketSpec::Server { path: socket.clone(), mode: None };
        let dev = b.add_device(name, DeviceConfig::new(model), spec, Box::new(NoHandler)).unwrap();
        let handle = b.handle();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = vec![thread::spawn(move || b.run().unwrap())];
        if data_path {
            let (d, s) = (vec![dev.clone()], Arc::clone(&stop));
            threads.push(thread::spawn(move || run_data_path(&d, &s, false)));
        }
        Rig { socket, image, dev, handle, stop, threads }
    }

    fn on_disk(&self, offset: usize, len: usize) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()[offset..offset + len].to_vec()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

type Driver<'a> = TestDriver<'a, RegionTable<1>>;

/// Publishes `bufs` as one chain on queue `q`, kicks, waits for its completion and returns
/// (used length, the last writable byte, the buffers' guest addresses).
fn submit(fe: &Frontend, drv: &mut Driver<'_>, q: usize, bufs: &[Buf<'_>]) -> (u32, Option<u8>, Vec<u64>) {
    submit_edited(fe, drv, q, bufs, |_, _| {})
}

/// The byte [`submit`] presets where the status byte goes: a value the device never writes.
const UNWRITTEN: u8 = 0xEE;

/// [`submit`], with `edit(driver, head)` run on the chain after it is built and before it is
/// published: a hostile driver breaking it ([`desc_of`] finds its descriptors).
fn submit_edited(
    fe: &Frontend,
    drv: &mut Driver<'_>,
    q: usize,
    bufs: &[Buf<'_>],
    edit: impl FnOnce(&Driver<'_>, u16),
) -> (u32, Option<u8>, Vec<u64>) {
    let mut addrs = vec![0u64; bufs.len()];
    let head = drv.build_chain(bufs, &mut addrs);
    let last = bufs.iter().rposition(|b| b.write && b.len > 0);
    if let Some(i) = last {
        drv.write(addrs[i] + bufs[i].len as u64 - 1, &[UNWRITTEN]);
    }
    edit(drv, head);
    let before = drv.used_idx();
    drv.publish(head);
    fe.kick(q);
    wait("the request's completion", || (drv.used_idx() != before).then_some(()));
    let (id, len) = drv.used_elem(before);
    assert_eq!(id, head as u32);
    let status = last.map(|i| {
        let mut b = [0u8];
        drv.read(addrs[i] + bufs[i].len as u64 - 1, &mut b);
        b[0]
    });
    (len, status, addrs)
}

/// The index of the `i`-th descriptor of the direct chain at `head` (`build_chain` takes
/// consecutive indices, wrapping).
fn desc_of(drv: &Driver<'_>, head: u16, i: u16) -> u16 {
    ((head as u32 + i as u32) % drv.config().size as u32) as u16
}

/// Moves the `i`-th buffer of the chain at `head` outside guest memory.
fn unmap_buffer(drv: &Driver<'_>, head: u16, i: u16) {
    let idx = desc_of(drv, head, i);
    let d = drv.read_desc(idx);
    drv.write_desc(idx, virtq::desc::Descriptor { addr: 0x10_0000_0000, ..d });
}

fn read_guest(drv: &Driver<'_>, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    drv.read(addr, &mut v);
    v
}

#[test]
fn writes_reach_the_image_and_reads_bring_them_back() {
    let rig = Rig::new("rw", 1, false);
    let fe = Frontend::connect(&rig.socket, 1, 64);
    let mut drv = fe.drivers().remove(0);
    let acked = fe.qemu_start(blk_features());
    assert!(acked & VirtioFeatures::BLK_FLUSH.bits() != 0);

    // Three sectors over two data buffers, header and status apart (Linux's layout).
    let data = pattern(1, 1536);
    let h = hdr(OUT, 10);
    let (len, status, _) = submit(
        &fe,
        &mut drv,
        0,
        &[Buf::readable(&h), Buf::readable(&data[..1024]), Buf::readable(&data[1024..]), Buf::writable(1)],
    );
    assert_eq!((len, status), (1, Some(S_OK)));
    let h = hdr(FLUSH, 0);
    assert_eq!(submit(&fe, &mut drv, 0, &[Buf::readable(&h), Buf::writable(1)]).1, Some(S_OK));
    assert_eq!(rig.on_disk(10 * 512, 1536), data, "on disk after FLUSH");
    assert_eq!(rig.on_disk(9 * 512, 512), pattern(0xA5, IMAGE_LEN)[9 * 512..10 * 512], "neighbours untouched");

    // Read back into three buffers of other sizes, the last one shared with the status byte.
    let h = hdr(IN, 10);
    let (len, status, addrs) =
        submit(&fe, &mut drv, 0, &[Buf::readable(&h), Buf::writable(100), Buf::writable(900), Buf::writable(537)]);
    assert_eq!((len, status), (1537, Some(S_OK)));
    let mut got = read_guest(&drv, addrs[1], 100);
    got.extend(read_guest(&drv, addrs[2], 900));
    got.extend(read_guest(&drv, addrs[3], 536));
    assert_eq!(got, data);

    // The device ID, NUL-padded.
    let h = hdr(GET_ID, 0);
    let (len, status, addrs) = submit(&fe, &mut drv, 0, &[Buf::readable(&h), Buf::writable(20), Buf::writable(1)]);
    assert_eq!((len, status), (21, Some(S_OK)));
    assert_eq!(read_guest(&drv, addrs[1], 20), b"virtq-test-disk\0\0\0\0\0");

    let c = rig.dev.stats(0);
    assert_eq!((c.requests, c.written_bytes, c.read_bytes, c.errors), (4, 1536, 1536, 0));
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeroes_on_disk() {
    let rig = Rig::new("zero", 1, false);
    let fe = Frontend::connect(&rig.socket, 1, 64);
    let mut drv = fe.drivers().remove(0);
    fe.qemu_start(blk_features());
    // One segment per request (max_write_zeroes_seg).
    for (sector, sectors, flags) in [(4, 8, 0), (100, 16, 1)] {
        // UNMAP (flags 1): a punched hole, still zeroes.
        let mut b = hdr(WRITE_ZEROES, 0);
        b.extend(seg(sector, sectors, flags));
        assert_eq!(submit(&fe, &mut drv, 0, &[Buf::readable(&b), Buf::writable(1)]).1, Some(S_OK));
    }
    assert!(rig.on_disk(4 * 512, 8 * 512).iter().all(|&x| x == 0));
    assert!(rig.on_disk(100 * 512, 16 * 512).iter().all(|&x| x == 0));
    assert_eq!(rig.on_disk(12 * 512, 512), pattern(0xA5, IMAGE_LEN)[12 * 512..13 * 512]);
    let mut b = hdr(DISCARD, 0);
    b.extend(seg(200, 8, 0));
    assert_eq!(submit(&fe, &mut drv, 0, &[Buf::readable(&b), Buf::writable(1)]).1, Some(S_OK));
    // Discarding with UNMAP is refused as unsupported, and nothing is discarded.
    let mut b = hdr(DISCARD, 0);
    b.extend(seg(300, 8, 1));
    assert_eq!(submit(&fe, &mut drv, 0, &[Buf::readable(&b), Buf::writable(1)]).1, Some(S_UNSUPP));
    assert_eq!(rig.on_disk(300 * 512, 4096), pattern(0xA5, IMAGE_LEN)[300 * 512..300 * 512 + 4096]);
}

#[test]
fn hostile_requests_get_an_error_status_and_the_queue_keeps_moving() {
    let rig = Rig::new("hostile", 1, false);
    let fe = Frontend::connect(&rig.socket, 1, 64);
    let mut drv = fe.drivers().remove(0);
    fe.qemu_start(blk_features());
    let before = std::fs::read(&rig.image).unwrap();
    let junk = pattern(9, 4096);
    let far = seg(2040, 9, 0);
    let cases: Vec<(Vec<u8>, Vec<Buf<'_>>, u8)> = vec![
        // Beyond capacity, overflowing, not whole sectors, wrong direction.
        (hdr(OUT, 2047), vec![Buf::readable(&junk[..1024])], S_IOERR),
        (hdr(OUT, u64::MAX), vec![Buf::readable(&junk[..512])], S_IOERR),
        (hdr(OUT, 0), vec![Buf::readable(&junk[..700])], S_IOERR),
        (hdr(IN, 0), vec![Buf::readable(&junk[..512])], S_IOERR),
        (hdr(OUT, 0), vec![Buf::readable(&junk[..512]), Buf::writable(512)], S_IOERR),
        // Unknown types.
        (hdr(2, 0), vec![], S_UNSUPP),
        (hdr(14, 0), vec![], S_UNSUPP),
        // Too many segments, a segment beyond capacity.
        (hdr(DISCARD, 0), vec![Buf::readable(&[0; 16 * 33])], S_IOERR),
        (hdr(WRITE_ZEROES, 0), vec![Buf::readable(&far)], S_IOERR),
        // GET_ID into too small a buffer.
        (hdr(GET_ID, 0), vec![Buf::writable(8)], S_IOERR),
    ];
    for (h, data, want) in &cases {
        let mut bufs = vec![Buf::readable(h)];
        bufs.extend(data.iter().copied());
        bufs.push(Buf::writable(1));
        let (len, status, _) = submit(&fe, &mut drv, 0, &bufs);
        assert_eq!((len, status), (1, Some(*want)), "header {:?}", &h[..4]);
    }
    // A header cut short, and no status byte at all (used length 0).
    let h = hdr(IN, 0);
    assert_eq!(submit(&fe, &mut drv, 0, &[Buf::readable(&h[..9]), Buf::writable(513)]).1, Some(S_IOERR));
    assert_eq!(submit(&fe, &mut drv, 0, &[Buf::readable(&h)]).0, 0);
    // A chain the walk refuses (next out of range): completed with 0 by the core.
    let mut addr = [0u64; 2];
    let head = drv.build_chain(&[Buf::readable(&h), Buf::writable(513)], &mut addr);
    drv.write_desc(
        head,
        virtq::desc::Descriptor { addr: addr[0], len: 16, flags: virtq::desc::DescFlags::NEXT, next: 999 },
    );
    let used = drv.used_idx();
    drv.publish(head);
    fe.kick(0);
    wait("the broken chain back", || (drv.used_idx() != used).then_some(()));
    assert_eq!(drv.used_elem(used), (head as u32, 0));
    drv.reset_alloc();

    // Nothing was written, and a good request is still served.
    assert_eq!(std::fs::read(&rig.image).unwrap(), before);
    let h = hdr(IN, 2047);
    let (len, status, addrs) = submit(&fe, &mut drv, 0, &[Buf::readable(&h), Buf::writable(512), Buf::writable(1)]);
    assert_eq!((len, status), (513, Some(S_OK)));
    assert_eq!(read_guest(&drv, addrs[1], 512), before[2047 * 512..]);
    assert_eq!(rig.dev.stats(0).errors, cases.len() as u64 + 3);
}

#[test]
fn chains_the_walk_refuses_get_io_error_in_their_status_byte_when_they_have_one() {
    // §5.2.6: the driver reads the status byte whatever else happened; one left unwritten
    // hands it a stale status, OK as likely as not. A queue of 256, so that a chain can have
    // more buffers than the device takes.
    let rig = Rig::new("refused", 1, false);
    let fe = Frontend::connect(&rig.socket, 1, 256);
    let mut drv = fe.drivers().remove(0);
    fe.qemu_start(blk_features());
    let before = std::fs::read(&rig.image).unwrap();
    let data = pattern(4, 512);
    let h = hdr(OUT, 0);
    // A readable data buffer after a writable one (§2.7.5.2): the status byte is still last.
    let bufs = [Buf::readable(&h), Buf::writable(512), Buf::readable(&data), Buf::writable(1)];
    let (len, status, _) = submit(&fe, &mut drv, 0, &bufs);
    assert_eq!((len, status), (1, Some(S_IOERR)), "readable after writable");
    // A data buffer outside guest memory.
    let bufs = [Buf::readable(&h), Buf::readable(&data), Buf::writable(1)];
    let (len, status, _) = submit_edited(&fe, &mut drv, 0, &bufs, |d, head| unmap_buffer(d, head, 1));
    assert_eq!((len, status), (1, Some(S_IOERR)), "data outside guest memory");
    // More buffers than the device takes (seg_max is 126; the chain's list holds 160).
    let many = pattern(5, 198 * 512);
    let mut bufs = vec![Buf::readable(&h)];
    bufs.extend(many.chunks(512).map(Buf::readable));
    bufs.push(Buf::writable(1));
    let (len, status, _) = submit(&fe, &mut drv, 0, &bufs);
    assert_eq!((len, status), (1, Some(S_IOERR)), "200 buffers");

    // No usable status byte: used length 0, and nothing written where the status would be.
    let bufs = [Buf::readable(&h), Buf::readable(&data), Buf::writable(1)];
    let (len, status, _) = submit_edited(&fe, &mut drv, 0, &bufs, |d, head| unmap_buffer(d, head, 2));
    assert_eq!((len, status), (0, Some(UNWRITTEN)), "the status buffer outside guest memory");
    let (len, status, _) = submit(&fe, &mut drv, 0, &[Buf::readable(&h), Buf::writable(1), Buf::readable(&data)]);
    assert_eq!((len, status), (0, Some(UNWRITTEN)), "a readable buffer last");
    let (len, status, _) = submit_edited(&fe, &mut drv, 0, &bufs, |d, head| {
        // The last descriptor leads back to the head: the chain has no end.
        let idx = desc_of(d, head, 2);
        let desc = d.read_desc(idx);
        d.write_desc(
            idx,
            virtq::desc::Descriptor { flags: desc.flags | virtq::desc::DescFlags::NEXT, next: head, ..desc },
        );
    });
    assert_eq!((len, status), (0, Some(UNWRITTEN)), "a loop");

    assert_eq!(std::fs::read(&rig.image).unwrap(), before, "nothing written to the image");
    assert_eq!(rig.dev.stats(0).errors, 6);
    let h = hdr(IN, 0);
    let (len, status, addrs) = submit(&fe, &mut drv, 0, &[Buf::readable(&h), Buf::writable(512), Buf::writable(1)]);
    assert_eq!((len, status), (513, Some(S_OK)), "the queue keeps moving");
    assert_eq!(read_guest(&drv, addrs[1], 512), before[..512]);
}

#[test]
fn discard_and_write_zeroes_beyond_the_advertised_limits_are_refused() {
    // §5.2.6.1: the driver MUST NOT exceed max_*_sectors / max_*_seg; a request that does is
    // refused whole (IOERR), before any segment is acted on. 20 MiB: room for a request at the
    // limit (16 MiB) that is within capacity.
    let rig = Rig::build("zero-limits", 1, false, 20 << 20, true);
    let fe = Frontend::connect(&rig.socket, 1, 64);
    let mut drv = fe.drivers().remove(0);
    fe.qemu_start(blk_features());
    let before = std::fs::read(&rig.image).unwrap();
    for (kind, flags) in [(WRITE_ZEROES, 0), (WRITE_ZEROES, 1), (DISCARD, 0)] {
        let mut b = hdr(kind, 0);
        b.extend(seg(0, 32769, flags));
        let (len, status, _) = submit(&fe, &mut drv, 0, &[Buf::readable(&b), Buf::writable(1)]);
        assert_eq!((len, status), (1, Some(S_IOERR)), "type {kind}: one sector over the limit");
        let mut b = hdr(kind, 0);
        b.extend(seg(0, 8, flags));
        b.extend(seg(64, 8, flags));
        let (len, status, _) = submit(&fe, &mut drv, 0, &[Buf::readable(&b), Buf::writable(1)]);
        assert_eq!((len, status), (1, Some(S_IOERR)), "type {kind}: two segments");
    }
    assert_eq!(std::fs::read(&rig.image).unwrap(), before, "nothing zeroed or discarded");
    assert_eq!(rig.dev.stats(0).errors, 6);
    // At the limit: 16 MiB zeroed by one request, the sectors before it untouched.
    let mut b = hdr(WRITE_ZEROES, 0);
    b.extend(seg(1024, 32768, 0));
    assert_eq!(submit(&fe, &mut drv, 0, &[Buf::readable(&b), Buf::writable(1)]).1, Some(S_OK));
    let after = std::fs::read(&rig.image).unwrap();
    assert!(after[512 * 1024..512 * (1024 + 32768)].iter().all(|&x| x == 0));
    assert_eq!(after[..512 * 1024], before[..512 * 1024]);
}

#[test]
fn a_burst_ends_after_64_mib_of_zeroing_so_other_rings_get_their_turn() {
    // Six write-zeroes requests at the limit (16 MiB each, UNMAP: holes, cheap on any file
    // system) wait in one ring; no data-path thread, the test runs the bursts.
    let rig = Rig::build("zero-burst", 1, false, 100 << 20, false);
    let fe = Frontend::connect(&rig.socket, 1, 64);
    let mut drv = fe.drivers().remove(0);
    fe.qemu_start(blk_features());
    let mut status = Vec::new();
    for i in 0..6u64 {
        let mut b = hdr(WRITE_ZEROES, 0);
        b.extend(seg(2048 + i * 32768, 32768, 1));
        let mut addrs = [0u64; 2];
        let head = drv.build_chain(&[Buf::readable(&b), Buf::writable(1)], &mut addrs);
        drv.write(addrs[1], &[UNWRITTEN]);
        drv.publish(head);
        status.push(addrs[1]);
    }
    let first = wait("the ring to start", || Some(rig.dev.process(0, BURST)).filter(|&n| n != 0));
    assert_eq!(first, 4, "64 MiB in four requests, then the burst ends");
    assert_eq!(rig.dev.process(0, BURST), 2);
    for (i, &at) in status.iter().enumerate() {
        assert_eq!(drv.used_elem(i as u16).1, 1);
        assert_eq!(read_guest(&drv, at, 1), [S_OK]);
    }
}

#[test]
fn a_read_only_device_offers_ro_refuses_writes_and_serves_reads() {
    let rig = Rig::new("ro", 1, true);
    let fe = Frontend::connect(&rig.socket, 1, 64);
    let mut drv = fe.drivers().remove(0);
    let offered = fe.get_u64(GET_FEATURES);
    assert!(offered & VirtioFeatures::BLK_RO.bits() != 0);
    assert_eq!(offered & (VirtioFeatures::BLK_DISCARD | VirtioFeatures::BLK_WRITE_ZEROES).bits(), 0);
    // The driver ignores RO: the device refuses writes anyway (§5.2.6.2).
    fe.qemu_start(blk_features());
    let data = pattern(3, 512);
    let h = hdr(OUT, 0);
    assert_eq!(submit(&fe, &mut drv, 0, &[Buf::readable(&h), Buf::readable(&data), Buf::writable(1)]).1, Some(S_IOERR));
    let mut b = hdr(WRITE_ZEROES, 0);
    b.extend(seg(0, 1, 0));
    assert_eq!(submit(&fe, &mut drv, 0, &[Buf::readable(&b), Buf::writable(1)]).1, Some(S_UNSUPP), "not negotiated");
    assert_eq!(rig.on_disk(0, 512), pattern(0xA5, IMAGE_LEN)[..512]);
    let h = hdr(IN, 1);
    let (_, status, addrs) = submit(&fe, &mut drv, 0, &[Buf::readable(&h), Buf::writable(512), Buf::writable(1)]);
    assert_eq!(status, Some(S_OK));
    assert_eq!(read_guest(&drv, addrs[1], 512), pattern(0xA5, IMAGE_LEN)[512..1024]);
}

#[test]
fn every_request_queue_is_served() {
    let rig = Rig::new("mq", 2, false);
    let fe = Frontend::connect(&rig.socket, 2, 64);
    let mut drvs = fe.drivers();
    assert_eq!(fe.get_u64(GET_QUEUE_NUM), 2);
    fe.qemu_start(blk_features());
    for (q, drv) in drvs.iter_mut().enumerate() {
        let data = pattern(q as u8 + 10, 4096);
        let h = hdr(OUT, 64 * q as u64);
        assert_eq!(submit(&fe, drv, q, &[Buf::readable(&h), Buf::readable(&data), Buf::writable(1)]).1, Some(S_OK));
        assert_eq!(rig.on_disk(64 * 512 * q, 4096), data);
        assert_eq!(rig.dev.stats(q).written_bytes, 4096);
    }
}

/// GET_CONFIG: `struct virtio_blk_config` as the front-end reads it.
fn get_config(fe: &Frontend, offset: u32, size: u32) -> Vec<u8> {
    let mut p = offset.to_ne_bytes().to_vec();
    p.extend_from_slice(&size.to_ne_bytes());
    p.extend_from_slice(&0u32.to_ne_bytes());
    p.extend(vec![0u8; size as usize]);
    fe.send(GET_CONFIG, 0, &p, &[]);
    let (req, _, reply) = fe.reply();
    assert_eq!(req, GET_CONFIG);
    reply[12..].to_vec()
}

#[test]
fn the_config_space_is_virtio_blk_config_and_writeback_is_writable() {
    let rig = Rig::new("config", 2, false);
    let fe = Frontend::connect(&rig.socket, 2, 64);
    fe.qemu_start(blk_features());
    // Until the front-end has read `writeback` on this connection, writes are made stable
    // before they complete: a front-end reconnecting to a running guest may hold a 0 the
    // driver wrote to a back-end that died.
    fe.sync();
    assert!(!rig.dev.writeback());
    // QEMU reads the whole structure its headers know (60, 72 or 96 bytes).
    let c = get_config(&fe, 0, 96);
    fe.sync();
    assert!(rig.dev.writeback(), "the driver saw writeback = 1");
    assert_eq!(c.len(), 96);
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), (IMAGE_LEN / 512) as u64);
    assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), virtq_blk::device::SEG_MAX);
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
    assert_eq!(c[32], 1, "writeback");
    assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
    let field = |at: usize| u32::from_le_bytes(c[at..at + 4].try_into().unwrap());
    assert_eq!((field(36), field(40)), (32768, 1), "max_discard_sectors, max_discard_seg");
    assert_eq!((field(48), field(52), c[56]), (32768, 1, 1), "max_write_zeroes_sectors, _seg, _may_unmap");
    // The driver switches to writethrough (QEMU forwards the `wce` write as SET_CONFIG).
    let mut p = 32u32.to_ne_bytes().to_vec();
    p.extend_from_slice(&1u32.to_ne_bytes());
    p.extend_from_slice(&0u32.to_ne_bytes());
    p.push(0);
    assert_eq!(fe.acked(SET_CONFIG, &p, &[]), 0);
    assert_eq!(get_config(&fe, 32, 1), [0]);
    assert!(!rig.dev.writeback());
    // Capacity is read-only.
    let mut p = 0u32.to_ne_bytes().to_vec();
    p.extend_from_slice(&8u32.to_ne_bytes());
    p.extend_from_slice(&0u32.to_ne_bytes());
    p.extend_from_slice(&[0xff; 8]);
    assert_ne!(fe.acked(SET_CONFIG, &p, &[]), 0);
}

const SET_CONFIG: u32 = 25;

// ---- the binary ----------------------------------------------------------------------------

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_virtq-blk"))
}

#[test]
fn print_capabilities_names_the_block_type_and_its_options() {
    // vhost-user.rst "Backend program conventions": the capabilities as JSON on stdout and a
    // successful exit, whatever other options come with it.
    for extra in [&[][..], &["--socket-path", "/nonexistent/dir/s.sock", "--fd", "3"][..]] {
        let out = std::process::Command::new(bin()).arg("--print-capabilities").args(extra).output().unwrap();
        assert!(out.status.success(), "{extra:?}");
        let s = String::from_utf8(out.stdout).unwrap();
        let t = s.trim();
        assert!(t.starts_with('{') && t.ends_with('}'), "one JSON object: {s}");
        assert!(t.contains("\"type\": \"block\""), "{s}");
        assert!(t.contains("\"features\": [") && t.contains("\"read-only\"") && t.contains("\"blk-file\""), "{s}");
        assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `virtq-blk` with `args`, inheriting `fd` (the parent's number for it; `--fd` names it).
fn spawn_with_fd(fd: std::os::fd::RawFd, args: &[&str]) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(bin());
    cmd.args(args).stderr(std::process::Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only calls fcntl, which
    // is async-signal-safe, on a number it holds by value; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // The standard library opens every fd close-on-exec; this one must reach the
            // program, as a management layer passes it.
            // SAFETY: fcntl on a number this process holds open; no memory is passed.
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd.spawn().unwrap()
}

#[test]
fn the_binary_serves_a_listening_socket_passed_as_fd() {
    use std::os::fd::AsRawFd;
    // QEMU's convention for back-end programs: the parent binds and listens, the back-end
    // inherits the socket and accepts on it (`--fd`).
    let image = unique("fd.img");
    std::fs::write(&image, vec![0u8; IMAGE_LEN]).unwrap();
    let socket = unique("fd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let fd = listener.as_raw_fd();
    let mut child =
        spawn_with_fd(fd, &["--fd", &fd.to_string(), "--image", image.to_str().unwrap(), "--serial", "by-fd"]);
    // From here only the child holds the socket: a connection that works is its.
    drop(listener);
    {
        let fe = Frontend::connect(&socket, 1, 64);
        let offered = fe.get_u64(GET_FEATURES);
        let blk = (VirtioFeatures::VERSION_1
            | VirtioFeatures::BLK_SEG_MAX
            | VirtioFeatures::BLK_BLK_SIZE
            | VirtioFeatures::BLK_FLUSH
            | VirtioFeatures::BLK_CONFIG_WCE
            | VirtioFeatures::BLK_DISCARD
            | VirtioFeatures::BLK_WRITE_ZEROES)
            .bits()
            | F_PROTOCOL_FEATURES;
        assert_eq!(offered & blk, blk, "offered {offered:#x}");
        assert_eq!(offered & (VirtioFeatures::BLK_RO | VirtioFeatures::BLK_MQ).bits(), 0, "writable, one queue");
        let mut drv = fe.drivers().remove(0);
        fe.qemu_start(blk_features());
        let h = hdr(GET_ID, 0);
        let (_, status, addrs) = submit(&fe, &mut drv, 0, &[Buf::readable(&h), Buf::writable(20), Buf::writable(1)]);
        assert_eq!(status, Some(S_OK));
        assert_eq!(read_guest(&drv, addrs[1], 6), b"by-fd\0");
        // SAFETY: sends SIGTERM to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        assert!(status.success(), "{status:?}");
    }
    assert!(socket.exists(), "the socket file is the parent's: left in place");
    std::fs::remove_file(socket).unwrap();
    std::fs::remove_file(image).unwrap();
}

#[test]
fn an_fd_that_is_not_a_listening_socket_is_refused_at_start() {
    use std::os::fd::AsRawFd;
    let image = unique("badfd.img");
    std::fs::write(&image, vec![0u8; IMAGE_LEN]).unwrap();
    let img = image.to_str().unwrap();
    let exits = |mut child: std::process::Child| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("virtq-blk kept running on a bad --fd");
            }
            thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(!status.success(), "{status:?}");
    };
    // Negative, and a number that is not open in the child.
    for fd in ["-1", "1000"] {
        let child = std::process::Command::new(bin())
            .args([&format!("--fd={fd}")[..], "--image", img])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        exits(child);
    }
    // A regular file, and a unix socket that is not listening.
    let file = std::fs::File::open(&image).unwrap();
    exits(spawn_with_fd(file.as_raw_fd(), &["--fd", &file.as_raw_fd().to_string(), "--image", img]));
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    exits(spawn_with_fd(a.as_raw_fd(), &["--fd", &a.as_raw_fd().to_string(), "--image", img]));
    std::fs::remove_file(image).unwrap();
}

#[test]
fn the_binary_serves_an_image_and_exits_cleanly_on_sigterm() {
    let image = unique("bin.img");
    std::fs::write(&image, vec![0u8; IMAGE_LEN]).unwrap();
    let socket = unique("bin.sock");
    let mut child = std::process::Command::new(bin())
        .args(["--socket-path", socket.to_str().unwrap(), "--blk-file", image.to_str().unwrap(), "--queues", "2"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        let fe = Frontend::connect(&socket, 2, 64);
        let mut drvs = fe.drivers();
        fe.qemu_start(blk_features());
        let data = pattern(7, 8192);
        let h = hdr(OUT, 8);
        assert_eq!(
            submit(&fe, &mut drvs[1], 1, &[Buf::readable(&h), Buf::readable(&data), Buf::writable(1)]).1,
            Some(S_OK)
        );
        let h = hdr(FLUSH, 0);
        assert_eq!(submit(&fe, &mut drvs[1], 1, &[Buf::readable(&h), Buf::writable(1)]).1, Some(S_OK));
        assert_eq!(std::fs::read(&image).unwrap()[4096..4096 + 8192], data[..]);
        // SAFETY: sends SIGTERM to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        assert!(status.success(), "{status:?}");
    }
    assert!(!socket.exists(), "socket file removed");
    std::fs::remove_file(image).unwrap();
}

#[test]
fn a_request_of_seg_max_segments_in_an_indirect_table_fits_a_128_entry_queue() {
    // Linux's layout at the limit: header, SEG_MAX data buffers, status, in one indirect table
    // of 128 entries on a queue of 128 (QEMU's vhost-user-blk default). A larger seg_max made
    // the chain walk refuse such tables (caught by the guest matrix).
    let rig = Rig::new("segmax", 1, false);
    let fe = Frontend::connect(&rig.socket, 1, 128);
    let mut drv = fe.drivers().remove(0);
    fe.qemu_start(blk_features());
    let n = virtq_blk::device::SEG_MAX as usize;
    let data = pattern(5, n * 512);
    let h = hdr(OUT, 0);
    let mut bufs = vec![Buf::readable(&h)];
    bufs.extend(data.chunks(512).map(Buf::readable));
    bufs.push(Buf::writable(1));
    assert_eq!(bufs.len(), 128);
    let before = drv.used_idx();
    drv.add_indirect_chain(&bufs);
    fe.kick(0);
    wait("the indirect request", || (drv.used_idx() != before).then_some(()));
    assert_eq!(drv.used_elem(before).1, 1, "completed with its status byte");
    assert_eq!(rig.on_disk(0, n * 512), data);
    assert_eq!(rig.dev.stats(0).errors, 0);
}

// ---- inflight I/O tracking -------------------------------------------------------------------

const SET_INFLIGHT_FD: u32 = 32;
const PF_INFLIGHT_SHMFD: u64 = 1 << 12;

/// The front-end's inflight area (what QEMU keeps from `GET_INFLIGHT_FD`): one queue of 64
/// entries, `region_size(64)` bytes, mapped here too so the test can look inside.
struct Area {
    fd: std::os::fd::OwnedFd,
    ptr: *mut u8,
    len: usize,
}

impl Area {
    fn new() -> Area {
        let len = virtq_blk::inflight::region_size(64) as usize;
        let fd = memfd("virtq-test-inflight", len);
        // SAFETY: a fresh shared mapping of our own memfd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Area { fd, ptr: ptr.cast(), len }
    }
    fn u16(&self, off: usize) -> u16 {
        // SAFETY: inside our mapping; the back-end writes with atomics, a plain read is a test
        // snapshot after the request completed.
        unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<u16>()) }
    }
    fn entry(&self, head: u16) -> (u8, u64) {
        let e = 16 + 16 * head as usize;
        // SAFETY: as `u16`.
        unsafe {
            (std::ptr::read_volatile(self.ptr.add(e)), std::ptr::read_volatile(self.ptr.add(e + 8).cast::<u64>()))
        }
    }
    fn set_entry(&self, head: u16, inflight: u8, counter: u64) {
        let e = 16 + 16 * head as usize;
        // SAFETY: as `u16`; the back-end's ring is stopped while the test writes.
        unsafe {
            std::ptr::write_volatile(self.ptr.add(e + 8).cast::<u64>(), counter);
            std::ptr::write_volatile(self.ptr.add(e), inflight);
        }
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn inflight_payload(len: usize) -> Vec<u8> {
    let mut p = (len as u64).to_ne_bytes().to_vec();
    p.extend_from_slice(&0u64.to_ne_bytes());
    p.extend_from_slice(&1u16.to_ne_bytes());
    p.extend_from_slice(&64u16.to_ne_bytes());
    p.extend_from_slice(&[0; 4]);
    p
}

#[test]
fn requests_in_flight_when_a_ring_stopped_are_served_again_when_it_starts() {
    use std::os::fd::AsRawFd;
    let rig = Rig::new("inflight", 1, false);
    let fe = Frontend::connect(&rig.socket, 1, 64);
    let mut drv = fe.drivers().remove(0);
    let area = Area::new();
    assert!(fe.get_u64(GET_PROTOCOL_FEATURES) & PF_INFLIGHT_SHMFD != 0, "offered");
    fe.send(SET_PROTOCOL_FEATURES, 0, &u64p(PF_MQ | PF_REPLY_ACK | PF_CONFIG | PF_INFLIGHT_SHMFD), &[]);
    fe.send(SET_OWNER, 0, &[], &[]);
    let acked = (blk_features() & fe.get_u64(GET_FEATURES)) | F_PROTOCOL_FEATURES;
    fe.send(SET_FEATURES, 0, &u64p(acked), &[]);
    // An area the device cannot use is refused (too small for one queue of 64).
    assert_ne!(fe.acked(SET_INFLIGHT_FD, &inflight_payload(64), &[area.fd.as_raw_fd()]), 0);
    assert_eq!(fe.acked(SET_INFLIGHT_FD, &inflight_payload(area.len), &[area.fd.as_raw_fd()]), 0);
    assert_eq!(fe.acked(SET_MEM_TABLE, &fe.mem_table_payload(), &[fe.ram.fd.as_raw_fd()]), 0);
    fe.start_queue(0);
    fe.send(SET_VRING_ENABLE, 0, &state(0, 1), &[]);

    // A request is recorded while in flight and cleared once in the used ring.
    let data = pattern(21, 1024);
    let h = hdr(OUT, 0);
    let (_, status, _) = submit(&fe, &mut drv, 0, &[Buf::readable(&h), Buf::readable(&data), Buf::writable(1)]);
    assert_eq!(status, Some(S_OK));
    let first = drv.used_elem(0).0 as u16;
    assert_eq!((area.u16(8), area.u16(10), area.u16(14)), (1, 64, 1), "version, desc_num, used_idx");
    assert_eq!(area.u16(12), first, "last_batch_head");
    assert_eq!(area.entry(first), (0, 0), "completed; counter 0");

    // The ring stops (as when a back-end dies); a request was taken by the back-end and never
    // completed: it is in the available ring and marked in flight, and the front-end's base
    // is past it. The ring starts again: the request is served.
    let base = fe.get_vring_base(0);
    assert_eq!(base, 1);
    let data = pattern(22, 2048);
    let h = hdr(OUT, 100);
    let mut addrs = [0u64; 3];
    let head = drv.build_chain(&[Buf::readable(&h), Buf::readable(&data), Buf::writable(1)], &mut addrs);
    drv.publish(head);
    area.set_entry(head, 1, 1);
    fe.send(SET_VRING_BASE, 0, &state(0, 2), &[]);
    let kick = fe.queues[0].kick.as_raw_fd();
    fe.send(SET_VRING_KICK, 0, &u64p(0), &[kick]);
    wait("the request in flight served again", || (drv.used_idx() == 2).then_some(()));
    assert_eq!(drv.used_elem(1), (head as u32, 1));
    assert_eq!(read_guest(&drv, addrs[2], 1), [S_OK]);
    assert_eq!(rig.on_disk(100 * 512, 2048), data);
    assert_eq!(area.entry(head).0, 0, "no longer in flight");
    assert_eq!(area.u16(14), 2);
}

#[test]
fn the_binary_connects_as_a_client_to_a_listening_front_end() {
    let image = unique("client.img");
    std::fs::write(&image, vec![0u8; IMAGE_LEN]).unwrap();
    let socket = unique("client.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["--client", "--socket-path", socket.to_str().unwrap(), "--image", image.to_str().unwrap()])
        .args(["--read-only", "--serial", "ro-disk"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (sock, _) = listener.accept().unwrap();
    {
        let fe = Frontend::with_socket(sock, 1, 64);
        let mut drv = fe.drivers().remove(0);
        assert!(fe.get_u64(GET_FEATURES) & VirtioFeatures::BLK_RO.bits() != 0, "--read-only offers RO");
        fe.qemu_start(blk_features() | VirtioFeatures::BLK_RO.bits());
        let h = hdr(GET_ID, 0);
        let (_, status, addrs) = submit(&fe, &mut drv, 0, &[Buf::readable(&h), Buf::writable(20), Buf::writable(1)]);
        assert_eq!(status, Some(S_OK));
        assert_eq!(read_guest(&drv, addrs[1], 7), b"ro-disk");
        let h = hdr(OUT, 0);
        let data = pattern(1, 512);
        assert_eq!(
            submit(&fe, &mut drv, 0, &[Buf::readable(&h), Buf::readable(&data), Buf::writable(1)]).1,
            Some(S_IOERR)
        );
        // SAFETY: sends SIGTERM to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert!(child.wait().unwrap().success());
    }
    assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 0), "nothing written");
    std::fs::remove_file(image).unwrap();
    let _ = std::fs::remove_file(socket);
}

#[test]
fn repeated_set_inflight_fd_keeps_one_mapping_and_no_fd() {
    use std::os::fd::AsRawFd;
    // DPDK CVE-2020-10726 / CVE-2022-0669: inflight requests in a loop leaked fds and mappings.
    // Counted by memfd name, so tests running alongside do not disturb the counts.
    let name = "virtq-test-inflight-repeat";
    let len = virtq_blk::inflight::region_size(64) as usize;
    let rig = Rig::new("inflight-repeat", 1, false);
    let fe = Frontend::connect(&rig.socket, 1, 64);
    fe.send(SET_PROTOCOL_FEATURES, 0, &u64p(PF_REPLY_ACK | PF_INFLIGHT_SHMFD), &[]);
    for _ in 0..50 {
        let fd = memfd(name, len);
        assert_eq!(fe.acked(SET_INFLIGHT_FD, &inflight_payload(len), &[fd.as_raw_fd()]), 0);
        // Refused ones leak nothing either: more queues than the device has.
        let mut p = inflight_payload(len);
        p[16..18].copy_from_slice(&9u16.to_ne_bytes());
        assert_ne!(fe.acked(SET_INFLIGHT_FD, &p, &[fd.as_raw_fd()]), 0);
    }
    assert_eq!((fds_named(name), maps_named(name)), (0, 1), "only the last area is mapped, no fd kept");
    // Not negotiated: refused, and the fd closed.
    drop(fe);
    let fe = Frontend::connect(&rig.socket, 1, 64);
    wait("the disconnect's reset to unmap the area", || (maps_named(name) == 0).then_some(()));
    fe.send(SET_PROTOCOL_FEATURES, 0, &u64p(PF_REPLY_ACK), &[]);
    let fd = memfd(name, len);
    assert_ne!(fe.acked(SET_INFLIGHT_FD, &inflight_payload(len), &[fd.as_raw_fd()]), 0);
    drop(fd);
    assert_eq!((fds_named(name), maps_named(name)), (0, 0));
}
