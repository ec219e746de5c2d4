//! Hostile front-ends: families 12–18 of hostile-inputs.md (message header, fds, vring
//! indices, memory table, dirty log, ring addresses, sequencing) against a real `Backend` over
//! real sockets, memfds and eventfds.
//!
//! Every case runs on a `Backend` serving two devices: the hostile one, and a good one whose
//! front-end passes a guest TX + RX round after every hostile case (one misbehaving
//! connection must not disturb the others). Every case asserts the outcome device.rs's error
//! policy prescribes: a REPLY_ACK with a non-zero status when the front-end set NEED_REPLY and
//! the reply is not mandatory, otherwise the connection closed without a reply. Every fd sent
//! is checked to be closed (pipe read ends: writing to the pipe fails once every copy is
//! closed) or counted by memfd name in `/proc/self/fd` and `/proc/self/maps`.
//!
//! `every_case_in_sequence_leaks_no_fd_or_mapping` runs every case twice, alone (the others
//! hold the shared side of `SERIAL`), and compares the process's fd and mapping counts.

mod frontend;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

use frontend::*;
use virtq::testing::{Buf, PackedDriver};
use virtq_vhost_user::backend::{Backend, BackendHandle, SocketSpec};
use virtq_vhost_user::device::DeviceConfig;
use virtq_vhost_user::net::{Enqueued, NetDevice, NetModel, TxFrame, MAX_TX_FRAME};
use virtq_vhost_user::vring::RingFault;

// Request codes and feature bits the front-end helper does not define (vhost-user.rst).
const SET_LOG_FD: u32 = 7;
const SET_CONFIG: u32 = 25;
const SET_INFLIGHT_FD: u32 = 32;
const PF_LOG_SHMFD: u64 = 1 << 1;
const PF_INFLIGHT_SHMFD: u64 = 1 << 12;
const PF_RARP: u64 = 1 << 2;
const PF_BACKEND_REQ: u64 = 1 << 5;
const PF_RESET_DEVICE: u64 = 1 << 13;
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const BACKEND_CONFIG_CHANGE: u32 = 2;
/// Device status bits (VIRTIO 1.2 §2.1).
const S_ACKNOWLEDGE: u64 = 1;
const S_DRIVER: u64 = 2;
const S_DRIVER_OK: u64 = 4;
const S_FEATURES_OK: u64 = 8;
const S_NEEDS_RESET: u64 = 0x40;
const F_LOG_ALL: u64 = 1 << 26;
const F_MRG_RXBUF: u64 = 1 << 15;
/// `VIRTIO_F_IN_ORDER`.
const F_IN_ORDER: u64 = 1 << 35;
/// Bit 8 of the SET_VRING_KICK/CALL/ERR payload: no fd.
const INVALID_FD: u64 = 1 << 8;
/// VERSION_1, RING_INDIRECT_DESC, RING_EVENT_IDX, MRG_RXBUF, MAC.
/// The largest request payload: GET/SET_CONFIG with 256 bytes of config (12 + 256).
const MAX_PAYLOAD: u32 = 268;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// Tests hold the shared side; the global leak test holds the exclusive side, so that nothing
/// else opens fds or maps memory while it counts.
static SERIAL: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    SERIAL.read().unwrap_or_else(|p| p.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    SERIAL.write().unwrap_or_else(|p| p.into_inner())
}

/// Every line logged in this process (the back-ends run in it), for the cases that count
/// what a fault logs.
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        LINES.lock().unwrap_or_else(|p| p.into_inner()).push(record.args().to_string());
    }

    fn flush(&self) {}
}

/// How many lines logged so far contain `what`; lines are captured from the first call on.
fn logged(what: &str) -> usize {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&Capture).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Warn);
    });
    LINES.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|l| l.contains(what)).count()
}

/// A memfd name no other test uses.
fn uniq(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("vqh-{tag}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// One `Backend` on its own thread with two devices: `hostile` and `good`.
struct Harness {
    hostile: NetDevice,
    good: NetDevice,
    path: PathBuf,
    good_path: PathBuf,
    ready: Arc<AtomicUsize>,
    destroyed: Arc<AtomicUsize>,
    handle: BackendHandle,
    thread: Option<thread::JoinHandle<()>>,
}

impl Harness {
    fn new(name: &str) -> Harness {
        let dir = std::env::temp_dir().join(format!("virtq-vu-hostile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.sock"));
        let good_path = dir.join(format!("{name}-good.sock"));
        let counting = Counting::default();
        let (ready, destroyed) = (Arc::clone(&counting.ready), Arc::clone(&counting.destroyed));
        let mut b = Backend::new().unwrap();
        let server = |p: &PathBuf| SocketSpec::Server { path: p.clone(), mode: None };
        let hostile =
            b.add_device("hostile", DeviceConfig::new(NetModel::default()), server(&path), Box::new(counting)).unwrap();
        let good = b.add_device(
            "good",
            DeviceConfig::new(NetModel::default()),
            server(&good_path),
            Box::new(Counting::default()),
        );
        let good = good.unwrap();
        let handle = b.handle();
        let thread = thread::spawn(move || b.run().unwrap());
        Harness { hostile, good, path, good_path, ready, destroyed, handle, thread: Some(thread) }
    }

    /// A front-end on the hostile socket; its guest RAM memfd is named after `tag`.
    /// A hostile front-end's connection, with `REPLY_ACK` negotiated so that the cases can
    /// ask for acks (vhost-user.rst: an ack only where it was negotiated).
    fn connect(&self, tag: &str) -> (Frontend, String) {
        let name = uniq(tag);
        let fe = Frontend::connect_named(&self.path, 2, 64, &name);
        fe.send(SET_PROTOCOL_FEATURES, 0, &u64p(PF_REPLY_ACK), &[]);
        (fe, name)
    }

    /// Waits until neither this process's fds nor its mappings refer to memfd `name`.
    fn no_leak(&self, name: &str) {
        wait(&format!("memfd {name} closed and unmapped"), || {
            (fds_named(name) == 0 && maps_named(name) == 0).then_some(())
        });
    }

    /// The hostile front-end hangs up; the back-end lets go of all it held.
    fn hang_up(&self, fe: Frontend, name: &str) {
        fe.hang_up();
        self.no_leak(name);
    }

    /// The back-end closed the connection (without replying) and let go of all it held.
    fn expect_close(&self, fe: Frontend, name: &str, what: &str) {
        fe.expect_closed_without_reply(what);
        drop(fe);
        self.no_leak(name);
    }

    /// The hostile device serves a new front-end: rings start and a frame goes through.
    fn serves_again(&self) {
        let (fe, name) = self.connect("again");
        let mut g = Guest::new(&fe);
        let acked = fe.qemu_start(NET_FEATURES);
        assert_eq!(acked, NET_FEATURES | F_PROTOCOL_FEATURES);
        wait("hostile device ready", || (self.hostile.queue_ready(0) && self.hostile.queue_ready(1)).then_some(()));
        guest_tx(&mut g, &fe, &self.hostile, 1);
        drop(g);
        self.hang_up(fe, &name);
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// The guest posts `count` frames (12-byte header + frame, two descriptors) on TX queue 1
/// and kicks. Returns the frames.
fn post_tx(g: &mut Guest<'_>, fe: &Frontend, count: u8) -> Vec<Vec<u8>> {
    g.drv[1].reset_alloc();
    let frames: Vec<Vec<u8>> = (0..count).map(|i| frame(i, 60 + i as usize)).collect();
    for f in &frames {
        g.drv[1].add_chain(&[Buf::readable(&[0u8; 12]), Buf::readable(f)]);
    }
    fe.kick(1);
    frames
}

/// The device dequeues exactly `expected` from TX queue 1, and the guest sees every chain
/// completed.
fn take_tx(g: &mut Guest<'_>, net: &NetDevice, expected: &[Vec<u8>]) {
    let mut bufs: Vec<TxFrame> = (0..8).map(|_| TxFrame::with_capacity(MAX_TX_FRAME)).collect();
    let mut got = Vec::new();
    wait("TX frames", || {
        let n = net.dequeue_burst(0, &mut bufs);
        got.extend(bufs[..n].iter().map(|b| b.frame().to_vec()));
        (got.len() >= expected.len()).then_some(())
    });
    assert_eq!(net.dequeue_burst(0, &mut bufs), 0, "nothing more than what the guest posted");
    assert_eq!(got, expected, "TX frames");
    g.seen[1] = g.seen[1].wrapping_add(expected.len() as u16);
    assert_eq!(g.drv[1].used_idx(), g.seen[1], "every TX chain completed once");
}

fn guest_tx(g: &mut Guest<'_>, fe: &Frontend, net: &NetDevice, count: u8) {
    let frames = post_tx(g, fe, count);
    take_tx(g, net, &frames);
}

/// Guest RX on queue 0: the guest posts `per_frame` buffers of `buf_len` bytes per frame and
/// asks for an interrupt; the device places `count` frames, each in exactly `per_frame`
/// buffers (`num_buffers`), and the guest reads them back.
fn guest_rx(g: &mut Guest<'_>, fe: &Frontend, net: &NetDevice, count: u8, buf_len: u32, per_frame: u16) {
    let drv = &mut g.drv[0];
    drv.reset_alloc();
    drv.set_used_event(g.seen[0]);
    let mut addr_of = HashMap::new();
    for _ in 0..count as usize * per_frame as usize {
        let mut a = [0u64];
        let head = drv.build_chain(&[Buf::writable(buf_len)], &mut a);
        drv.publish(head);
        addr_of.insert(head as u32, a[0]);
    }
    let frames: Vec<Vec<u8>> = (0..count).map(|i| frame(i, 1000 + i as usize)).collect();
    let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
    assert_eq!(net.enqueue_burst(0, &refs), count as usize, "every RX frame placed");
    assert!(fe.wait_call(0, Duration::from_secs(10)), "RX interrupt");
    for (i, f) in frames.iter().enumerate() {
        let mut data = Vec::new();
        let mut nbufs = 0;
        for k in 0..per_frame {
            let (id, len) = drv.used_elem(g.seen[0].wrapping_add(k));
            let mut b = vec![0u8; len as usize];
            drv.read(addr_of[&id], &mut b);
            if k == 0 {
                nbufs = u16::from_le_bytes([b[10], b[11]]);
                b.drain(..12);
            }
            data.extend_from_slice(&b);
        }
        assert_eq!(nbufs, per_frame, "num_buffers of RX frame {i}");
        assert_eq!(&data, f, "RX frame {i}");
        g.seen[0] = g.seen[0].wrapping_add(per_frame);
    }
    assert_eq!(drv.used_idx(), g.seen[0]);
}

/// The well-behaved device and its front-end.
struct Good<'a> {
    fe: &'a Frontend,
    guest: Guest<'a>,
    net: NetDevice,
    rounds: u64,
}

impl<'a> Good<'a> {
    fn start(fe: &'a Frontend, net: &NetDevice) -> Self {
        let guest = Guest::new(fe);
        fe.qemu_start(NET_FEATURES);
        wait("good device ready", || (net.queue_ready(0) && net.queue_ready(1)).then_some(()));
        Good { fe, guest, net: net.clone(), rounds: 0 }
    }

    /// A guest TX + RX round.
    fn round(&mut self) {
        guest_tx(&mut self.guest, self.fe, &self.net, 3);
        guest_rx(&mut self.guest, self.fe, &self.net, 2, 2048, 1);
        self.rounds += 1;
        assert_eq!(self.net.stats(1).packets, 3 * self.rounds);
        assert_eq!(self.net.stats(0).packets, 2 * self.rounds);
        assert_eq!((self.net.stats(1).errors, self.net.stats(0).errors), (0, 0));
    }
}

type Case = fn(&Harness, &mut Good<'_>);

/// Runs one case on a fresh back-end: the good device passes traffic before and after, and
/// the hostile device serves a well-behaved front-end afterwards.
fn run_case(name: &str, case: Case) {
    let _serial = shared();
    let h = Harness::new(name);
    let good_fe = Frontend::connect_named(&h.good_path, 2, 64, &uniq("good"));
    let mut good = Good::start(&good_fe, &h.good);
    good.round();
    case(&h, &mut good);
    good.round();
    h.serves_again();
    good.round();
}

// ---------------------------------------------------------------------------------------------
// Front-end helpers for the cases
// ---------------------------------------------------------------------------------------------

fn raw(fds: &[OwnedFd]) -> Vec<RawFd> {
    fds.iter().map(|f| f.as_raw_fd()).collect()
}

/// Every probe's read end (sent, then dropped here) is closed in the back-end too, within
/// 2 s of the answer (a loaded CI machine once saw one still open right at the ack).
fn assert_probes_closed(what: &str, writers: &mut [std::io::PipeWriter]) {
    for (i, w) in writers.iter_mut().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !probe_closed(w) {
            assert!(Instant::now() < deadline, "{what}: fd {i} sent to the back-end is still open there");
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Feature negotiation (QEMU's order, without enables): protocol features `pf` (REPLY_ACK is
/// added), virtio features `features` ∩ offered plus PROTOCOL_FEATURES. Returns the latter.
fn negotiate(fe: &Frontend, pf: u64, features: u64) -> u64 {
    let offered = fe.get_u64(GET_FEATURES);
    let pf = pf | PF_REPLY_ACK;
    assert_eq!(fe.get_u64(GET_PROTOCOL_FEATURES) & pf, pf, "protocol features offered");
    assert_eq!(fe.ack_status(SET_PROTOCOL_FEATURES, &u64p(pf), &[]), 0);
    fe.send(SET_OWNER, 0, &[], &[]);
    let acked = (features & offered) | F_PROTOCOL_FEATURES;
    assert_eq!(fe.ack_status(SET_FEATURES, &u64p(acked), &[]), 0);
    acked
}

fn set_mem(fe: &Frontend) {
    let fd = fe.ram.fd.as_raw_fd();
    assert_eq!(fe.ack_status(SET_MEM_TABLE, &fe.mem_table_payload(), &[fd]), 0, "SET_MEM_TABLE");
}

fn enable(fe: &Frontend, i: u32) {
    assert_eq!(fe.ack_status(SET_VRING_ENABLE, &state(i, 1), &[]), 0, "SET_VRING_ENABLE {i}");
}

/// NUM, BASE 0, ADDR, CALL, each acknowledged (the ring is not started).
fn configure_ring(fe: &Frontend, i: usize) {
    configure_ring_at(fe, i, 0);
}

/// [`configure_ring`] with `SET_VRING_BASE` `base` (a fresh packed ring: 0x8000_8000).
fn configure_ring_at(fe: &Frontend, i: usize, base: u32) {
    let size = fe.queues[i].cfg.size as u32;
    assert_eq!(fe.ack_status(SET_VRING_NUM, &state(i as u32, size), &[]), 0);
    assert_eq!(fe.ack_status(SET_VRING_BASE, &state(i as u32, base), &[]), 0);
    assert_eq!(fe.ack_status(SET_VRING_ADDR, &fe.vring_addr_payload(i), &[]), 0);
    let call = fe.queues[i].call.as_raw_fd();
    assert_eq!(fe.ack_status(SET_VRING_CALL, &u64p(i as u64), &[call]), 0);
}

/// SET_VRING_KICK with NEED_REPLY and ring `i`'s eventfd: the REPLY_ACK status.
fn kick_status(fe: &Frontend, i: usize) -> u64 {
    let kick = fe.queues[i].kick.as_raw_fd();
    fe.ack_status(SET_VRING_KICK, &u64p(i as u64), &[kick])
}

/// A front-end with negotiated features, its memory table, both rings started and enabled.
fn started(h: &Harness, tag: &str) -> (Frontend, String) {
    let (fe, name) = h.connect(tag);
    negotiate(&fe, PF_MQ, NET_FEATURES);
    set_mem(&fe);
    for i in 0..2 {
        enable(&fe, i as u32);
        configure_ring(&fe, i);
        assert_eq!(kick_status(&fe, i), 0, "ring {i} starts");
    }
    assert!(h.hostile.queue_ready(0) && h.hostile.queue_ready(1));
    (fe, name)
}

// ---------------------------------------------------------------------------------------------
// Family 12: the message header
// ---------------------------------------------------------------------------------------------

fn f12_short_header_then_close(h: &Harness, good: &mut Good<'_>) {
    // Half a header, with an fd on it: the control loop waits for the rest without stalling
    // the other device.
    let (fe, name) = h.connect("f12-short");
    let (rd, mut wr) = probe();
    fe.send_raw(&raw_header(GET_FEATURES, 1, 0)[..5], &[rd.as_raw_fd()]);
    drop(rd);
    good.round();
    assert!(!probe_closed(&mut wr), "the fd of a message still being read is held");
    // Then the front-end goes away: the truncated message is dropped with its fd.
    fe.sock.shutdown(std::net::Shutdown::Write).unwrap();
    h.expect_close(fe, &name, "short header then EOF");
    assert_probes_closed("short header", &mut [wr]);
    good.round();

    // A complete header promising 8 payload bytes, 3 of them sent.
    let (fe, name) = h.connect("f12-short-payload");
    let mut m = message(SET_FEATURES, 0, &u64p(1 << 32));
    m.truncate(12 + 3);
    fe.send_raw(&m, &[]);
    fe.sock.shutdown(std::net::Shutdown::Write).unwrap();
    h.expect_close(fe, &name, "short payload then EOF");
}

fn f12_size_above_max_payload(h: &Harness, good: &mut Good<'_>) {
    // The largest legitimate payload is framed: SET_CONFIG with 256 bytes (refused: the
    // config space is read-only) gets its REPLY_ACK.
    let (fe, name) = h.connect("f12-size-max");
    let mut p = Vec::new();
    for v in [0u32, 256, 0] {
        p.extend_from_slice(&v.to_ne_bytes());
    }
    p.extend_from_slice(&[0u8; 256]);
    assert_eq!(p.len() as u32, MAX_PAYLOAD);
    assert_ne!(fe.ack_status(SET_CONFIG, &p, &[]), 0);
    assert_eq!(fe.ack_status(SET_OWNER, &[], &[]), 0, "connection still up");
    h.hang_up(fe, &name);
    // One byte more, or much more, is refused before any payload is read: closed.
    for size in [MAX_PAYLOAD + 1, 4096, u32::MAX] {
        for flags in [1, 1 | NEED_REPLY] {
            let (fe, name) = h.connect("f12-size");
            fe.send_raw(&raw_header(SET_CONFIG, flags, size), &[]);
            h.expect_close(fe, &name, &format!("size {size}"));
            good.round();
        }
    }
}

fn f12_version_not_1(h: &Harness, good: &mut Good<'_>) {
    for flags in [0, 2, 3, 2 | NEED_REPLY, NEED_REPLY] {
        let (fe, name) = h.connect("f12-version");
        fe.send_raw(&raw_header(GET_FEATURES, flags, 0), &[]);
        h.expect_close(fe, &name, &format!("flags {flags:#x}"));
        good.round();
    }
}

fn f12_reply_bit_on_a_request(h: &Harness, good: &mut Good<'_>) {
    for (request, flags) in [(GET_FEATURES, 1 | 4), (SET_OWNER, 1 | 4 | NEED_REPLY)] {
        let (fe, name) = h.connect("f12-reply");
        fe.send_raw(&raw_header(request, flags, 0), &[]);
        h.expect_close(fe, &name, &format!("request {request} flags {flags:#x}"));
        good.round();
    }
}

fn f12_unknown_request_code(h: &Harness, good: &mut Good<'_>) {
    // Without and with payload, with NEED_REPLY, with an fd: framed, then closed (an unknown
    // request has no REPLY_ACK to give).
    for (request, flags, len, fd) in
        [(999, 0, 0, false), (999, 0, 16, false), (999, NEED_REPLY, 0, false), (999, 0, 40, true), (0, 0, 0, false)]
    {
        let (fe, name) = h.connect("f12-unknown");
        let (rd, wr) = probe();
        let fds = if fd { vec![rd.as_raw_fd()] } else { vec![] };
        fe.send(request, flags, &vec![0xa5u8; len], &fds);
        drop(rd);
        h.expect_close(fe, &name, &format!("request {request} with {len} bytes"));
        if fd {
            assert_probes_closed("unknown request", &mut [wr]);
        }
        good.round();
    }
}

fn f12_reserved_flag_bits(h: &Harness, good: &mut Good<'_>) {
    for flags in [1 | 0x10, 1 | 0x100 | NEED_REPLY, 1 | 0x8000_0000] {
        let (fe, name) = h.connect("f12-flags");
        fe.send_raw(&raw_header(SET_OWNER, flags, 0), &[]);
        h.expect_close(fe, &name, &format!("flags {flags:#x}"));
        good.round();
    }
}

// ---------------------------------------------------------------------------------------------
// Family 13: file descriptors
// ---------------------------------------------------------------------------------------------

fn f13_fds_on_a_message_that_takes_none(h: &Harness, good: &mut Good<'_>) {
    // GET_FEATURES (reply mandatory) with 2 fds: closed, both fds closed.
    let (fe, name) = h.connect("f13-none");
    let (rds, mut wrs) = probes(2);
    fe.send(GET_FEATURES, 0, &[], &raw(&rds));
    drop(rds);
    h.expect_close(fe, &name, "GET_FEATURES with 2 fds");
    assert_probes_closed("GET_FEATURES", &mut wrs);
    good.round();

    // With NEED_REPLY on a request without mandatory reply: REPLY_ACK failure, the
    // connection stays, and the fd (a pipe, then a memfd) is closed.
    let (fe, name) = h.connect("f13-none-ack");
    let (rd, wr) = probe();
    assert_ne!(fe.ack_status(SET_OWNER, &[], &[rd.as_raw_fd()]), 0);
    drop(rd);
    assert_probes_closed("SET_OWNER", &mut [wr]);
    let m = uniq("f13-memfd");
    let mfd = memfd(&m, 4096);
    assert_ne!(fe.ack_status(SET_VRING_NUM, &state(0, 64), &[mfd.as_raw_fd()]), 0);
    drop(mfd);
    assert_eq!(fds_named(&m), 0, "memfd sent with SET_VRING_NUM closed");
    assert_eq!(fe.ack_status(SET_OWNER, &[], &[]), 0, "connection still up");
    h.hang_up(fe, &name);
}

fn f13_mem_table_fd_count_mismatch(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f13-mt");
    let m = uniq("f13-mt-region");
    let mfd = memfd(&m, 2 << 20);
    let r0 = region(0x1_0000_0000, 1 << 20, 0x7100_0000_0000, 0);
    let r1 = region(0x1_0010_0000, 1 << 20, 0x7100_0010_0000, 1 << 20);
    let dups = |n: usize| (0..n).map(|_| mfd.try_clone().unwrap()).collect::<Vec<_>>();
    for (regions, nfds) in [(vec![r0.clone()], 0), (vec![r0.clone()], 2), (vec![r0.clone(), r1.clone()], 1)] {
        let fds = dups(nfds);
        let p = mem_table(regions.len() as u32, &regions);
        assert_ne!(fe.ack_status(SET_MEM_TABLE, &p, &raw(&fds)), 0, "{} regions, {nfds} fds", regions.len());
        drop(fds);
        assert_eq!((fds_named(&m), maps_named(&m)), (1, 0), "every fd closed, nothing mapped");
    }
    good.round();
    // The right count is accepted on the same connection.
    let fds = dups(2);
    assert_eq!(fe.ack_status(SET_MEM_TABLE, &mem_table(2, &[r0, r1]), &raw(&fds)), 0);
    drop(fds);
    assert_eq!((fds_named(&m), maps_named(&m)), (1, 2), "two regions mapped, their fds closed");
    drop(mfd);
    h.hang_up(fe, &name);
    h.no_leak(&m);
}

fn f13_more_than_8_fds(h: &Harness, good: &mut Good<'_>) {
    // The kernel truncates the ancillary data (MSG_CTRUNC): closed, and every fd received or
    // not is closed.
    let m = uniq("f13-9fds");
    let mfd = memfd(&m, 16 << 12);
    let regions: Vec<Vec<u8>> =
        (0..8u64).map(|i| region(i << 12, 1 << 12, 0x7200_0000_0000 + (i << 12), i << 12)).collect();
    for (request, payload, n) in
        [(GET_FEATURES, vec![], 9), (SET_VRING_CALL, u64p(0), 10), (SET_MEM_TABLE, mem_table(8, &regions), 16)]
    {
        let (fe, name) = h.connect("f13-9fds");
        let (rds, mut wrs) = probes(n);
        fe.send(request, NEED_REPLY, &payload, &raw(&rds));
        drop(rds);
        h.expect_close(fe, &name, &format!("request {request} with {n} fds"));
        assert_probes_closed("more than 8 fds", &mut wrs);
        good.round();
    }
    // Nine memfd copies on a SET_MEM_TABLE of eight regions: nothing mapped, all closed.
    let (fe, name) = h.connect("f13-9fds-mt");
    let fds: Vec<OwnedFd> = (0..9).map(|_| mfd.try_clone().unwrap()).collect();
    fe.send(SET_MEM_TABLE, NEED_REPLY, &mem_table(8, &regions), &raw(&fds));
    drop(fds);
    h.expect_close(fe, &name, "SET_MEM_TABLE with 9 fds");
    assert_eq!((fds_named(&m), maps_named(&m)), (1, 0));
}

fn f13_vring_fd_flag(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f13-flag");
    for request in [SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR] {
        // Invalid-fd flag AND an fd.
        let (rd, wr) = probe();
        assert_ne!(fe.ack_status(request, &u64p(INVALID_FD), &[rd.as_raw_fd()]), 0, "request {request}: flag + fd");
        drop(rd);
        assert_probes_closed("flag + fd", &mut [wr]);
        // Neither flag nor fd.
        assert_ne!(fe.ack_status(request, &u64p(0), &[]), 0, "request {request}: no flag, no fd");
        // Two fds.
        let (rds, mut wrs) = probes(2);
        assert_ne!(fe.ack_status(request, &u64p(1), &raw(&rds)), 0, "request {request}: two fds");
        drop(rds);
        assert_probes_closed("two fds", &mut wrs);
    }
    // The flag without an fd is valid (no interrupts / no error notification).
    assert_eq!(fe.ack_status(SET_VRING_CALL, &u64p(INVALID_FD | 1), &[]), 0);
    assert_eq!(fe.ack_status(SET_VRING_ERR, &u64p(INVALID_FD), &[]), 0);
    // An fd and no flag is valid if it is an eventfd (the data path writes call, error and
    // log fds: a pipe would fill and block it): a pipe is refused and closed, for every fd the
    // data path writes or polls.
    for request in [SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR, SET_LOG_FD] {
        let (rd, wr) = probe();
        let payload = if request == SET_LOG_FD { vec![] } else { u64p(1) };
        assert_ne!(fe.ack_status(request, &payload, &[rd.as_raw_fd()]), 0, "request {request}: a pipe");
        drop(rd);
        assert_probes_closed("a pipe as an eventfd", &mut [wr]);
    }
    let (call, tag) = event_probe();
    assert_eq!(fe.ack_status(SET_VRING_CALL, &u64p(1), &[call.as_raw_fd()]), 0);
    drop(call);
    assert_eq!(event_probe_held(tag), 1, "the call fd is kept");
    assert_eq!(fe.ack_status(SET_VRING_CALL, &u64p(INVALID_FD | 1), &[]), 0, "replaced");
    assert_eq!(event_probe_held(tag), 0, "the replaced call fd is closed");
    good.round();
    h.hang_up(fe, &name);

    // Without NEED_REPLY: closed.
    let (fe, name) = h.connect("f13-flag-close");
    let (rd, wr) = probe();
    fe.send(SET_VRING_KICK, 0, &u64p(INVALID_FD), &[rd.as_raw_fd()]);
    drop(rd);
    h.expect_close(fe, &name, "SET_VRING_KICK with flag and fd");
    assert_probes_closed("kick flag + fd", &mut [wr]);
}

/// `struct VhostUserInflight`: mmap_size, mmap_offset, num_queues, queue_size, padding.
fn inflight(mmap_size: u64, mmap_offset: u64, num_queues: u16, queue_size: u16) -> Vec<u8> {
    let mut p = mmap_size.to_ne_bytes().to_vec();
    p.extend_from_slice(&mmap_offset.to_ne_bytes());
    p.extend_from_slice(&num_queues.to_ne_bytes());
    p.extend_from_slice(&queue_size.to_ne_bytes());
    p.extend_from_slice(&[0; 4]);
    p
}

fn f13_inflight_fds(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f13-inflight");
    assert_eq!(fe.get_u64(GET_PROTOCOL_FEATURES) & PF_INFLIGHT_SHMFD, 0, "INFLIGHT_SHMFD not offered");
    assert_ne!(fe.ack_status(SET_PROTOCOL_FEATURES, &u64p(PF_REPLY_ACK | PF_INFLIGHT_SHMFD), &[]), 0);
    let p = inflight(0, 0, 2, 64);
    // GET_INFLIGHT_FD: without fds (not offered), with one, with two.
    for n in 0..3 {
        let (rds, mut wrs) = probes(n);
        assert_ne!(fe.ack_status(GET_INFLIGHT_FD, &p, &raw(&rds)), 0, "GET_INFLIGHT_FD with {n} fds");
        drop(rds);
        assert_probes_closed("GET_INFLIGHT_FD", &mut wrs);
    }
    // SET_INFLIGHT_FD: with its one fd (a memfd: nothing of it may stay), with two.
    let m = uniq("f13-inflight-memfd");
    let mfd = memfd(&m, 4096);
    assert_ne!(fe.ack_status(SET_INFLIGHT_FD, &inflight(4096, 0, 2, 64), &[mfd.as_raw_fd()]), 0);
    drop(mfd);
    assert_eq!((fds_named(&m), maps_named(&m)), (0, 0));
    let (rds, mut wrs) = probes(2);
    assert_ne!(fe.ack_status(SET_INFLIGHT_FD, &inflight(4096, 0, 2, 64), &raw(&rds)), 0);
    drop(rds);
    assert_probes_closed("SET_INFLIGHT_FD", &mut wrs);
    assert_eq!(fe.ack_status(SET_OWNER, &[], &[]), 0, "connection still up");
    good.round();
    h.hang_up(fe, &name);

    // Without NEED_REPLY: closed, fd closed.
    for request in [GET_INFLIGHT_FD, SET_INFLIGHT_FD] {
        let (fe, name) = h.connect("f13-inflight-close");
        let (rd, wr) = probe();
        fe.send(request, 0, &inflight(4096, 0, 2, 64), &[rd.as_raw_fd()]);
        drop(rd);
        h.expect_close(fe, &name, &format!("request {request} with an fd"));
        assert_probes_closed("inflight", &mut [wr]);
    }
}

// ---------------------------------------------------------------------------------------------
// Family 14: vring indices
// ---------------------------------------------------------------------------------------------

/// Indices ≥ the 2 vrings of a one-pair device whose u8 or u16 truncation is ring 1 (after
/// two plainly out-of-range ones), and ring 0.
const TO_RING_1: [u32; 6] = [2, u32::MAX, 0x101, 0x1_0001, 0x8000_0001, 0xff01];
const TO_RING_0: [u32; 5] = [2, 255, 0x100, 0x1_0000, 0x8000_0000];

fn f14_vring_index_out_of_range(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f14-index");
    let mut g = Guest::new(&fe);
    negotiate(&fe, PF_MQ, NET_FEATURES);
    set_mem(&fe);
    // Ring 1 gets its addresses, ring 0 its size; then every bad index tries to supply the
    // missing piece, or a base, or an enable.
    assert_eq!(fe.ack_status(SET_VRING_ADDR, &fe.vring_addr_payload(1), &[]), 0);
    assert_eq!(fe.ack_status(SET_VRING_NUM, &state(0, 64), &[]), 0);
    for idx in TO_RING_1 {
        assert_ne!(fe.ack_status(SET_VRING_NUM, &state(idx, 64), &[]), 0, "SET_VRING_NUM {idx:#x}");
        assert_ne!(fe.ack_status(SET_VRING_BASE, &state(idx, 7), &[]), 0, "SET_VRING_BASE {idx:#x}");
        assert_ne!(fe.ack_status(SET_VRING_ENABLE, &state(idx, 1), &[]), 0, "SET_VRING_ENABLE {idx:#x}");
    }
    for idx in TO_RING_0 {
        let mut addr = fe.vring_addr_payload(0);
        addr[..4].copy_from_slice(&idx.to_ne_bytes());
        assert_ne!(fe.ack_status(SET_VRING_ADDR, &addr, &[]), 0, "SET_VRING_ADDR {idx:#x}");
    }
    // None of them reached ring 0 or 1.
    assert_ne!(kick_status(&fe, 1), 0, "ring 1 has no size: SET_VRING_NUM did not reach it");
    assert_ne!(kick_status(&fe, 0), 0, "ring 0 has no addresses: SET_VRING_ADDR did not reach it");
    assert_eq!(fe.get_vring_base(1), 0, "SET_VRING_BASE did not reach ring 1");
    for i in 0..2 {
        configure_ring(&fe, i);
        assert_eq!(kick_status(&fe, i), 0);
    }
    assert!(!h.hostile.queue_ready(1), "SET_VRING_ENABLE did not reach ring 1");
    enable(&fe, 0);
    enable(&fe, 1);
    assert!(h.hostile.queue_ready(0) && h.hostile.queue_ready(1));

    // KICK/CALL/ERR: an index of 2..=255 is out of range, and any bit above the flag is
    // refused (no u64 → u8 truncation onto ring 1). Each fd is closed, not installed.
    for request in [SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR] {
        for value in [2u64, 255, 0x201, 0x1_0001, 0x1_0000_0001, 1 << 63 | 1] {
            let (rd, wr) = probe();
            assert_ne!(fe.ack_status(request, &u64p(value), &[rd.as_raw_fd()]), 0, "{request} {value:#x}");
            drop(rd);
            assert_probes_closed(&format!("request {request} value {value:#x}"), &mut [wr]);
        }
    }
    // The rings kept their configuration and move frames.
    guest_tx(&mut g, &fe, &h.hostile, 2);
    guest_rx(&mut g, &fe, &h.hostile, 2, 2048, 1);
    drop(g);
    good.round();
    h.hang_up(fe, &name);

    // GET_VRING_BASE (reply mandatory): closed without a reply, also for an index whose
    // truncation is a started ring.
    for idx in [2, 0x1_0001, 0x101] {
        let (fe, name) = started(h, "f14-get-base");
        fe.send(GET_VRING_BASE, NEED_REPLY, &state(idx, 0), &[]);
        h.expect_close(fe, &name, &format!("GET_VRING_BASE {idx:#x}"));
        good.round();
    }
    // Without NEED_REPLY every other request closes too.
    let (fe, name) = h.connect("f14-close");
    fe.send(SET_VRING_NUM, 0, &state(0x1_0001, 64), &[]);
    h.expect_close(fe, &name, "SET_VRING_NUM 0x10001");
}

// ---------------------------------------------------------------------------------------------
// Family 15: the memory table
// ---------------------------------------------------------------------------------------------

fn f15_mem_table_region_count(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f15-count");
    let m = uniq("f15-count-region");
    let mfd = memfd(&m, 16 << 12);
    let regions: Vec<Vec<u8>> =
        (0..9u64).map(|i| region(i << 12, 1 << 12, 0x7300_0000_0000 + (i << 12), i << 12)).collect();
    let dups = |n: usize| (0..n).map(|_| mfd.try_clone().unwrap()).collect::<Vec<_>>();
    // num_regions 0, without and with an fd.
    for n in 0..2 {
        let fds = dups(n);
        assert_ne!(fe.ack_status(SET_MEM_TABLE, &mem_table(0, &[]), &raw(&fds)), 0, "0 regions, {n} fds");
    }
    // num_regions 9 over 8 regions' bytes and 8 fds; num_regions 1 over 2 regions' bytes.
    let fds = dups(8);
    assert_ne!(fe.ack_status(SET_MEM_TABLE, &mem_table(9, &regions[..8]), &raw(&fds)), 0, "num_regions 9");
    drop(fds);
    let fds = dups(1);
    assert_ne!(fe.ack_status(SET_MEM_TABLE, &mem_table(1, &regions[..2]), &raw(&fds)), 0, "payload too long");
    drop(fds);
    assert_eq!((fds_named(&m), maps_named(&m)), (1, 0), "every fd closed, nothing mapped");
    // Eight is the limit and works.
    let fds = dups(8);
    assert_eq!(fe.ack_status(SET_MEM_TABLE, &mem_table(8, &regions[..8]), &raw(&fds)), 0, "8 regions");
    drop(fds);
    assert_eq!((fds_named(&m), maps_named(&m)), (1, 8));
    good.round();
    // Nine regions do not fit in a message (296 > 268 bytes): closed before the payload.
    fe.send(SET_MEM_TABLE, NEED_REPLY, &mem_table(9, &regions), &[]);
    h.expect_close(fe, &name, "SET_MEM_TABLE with 9 regions");
    drop(mfd);
    h.no_leak(&m);
}

/// Which fd a region of a memory table is sent with.
#[derive(Clone, Copy, PartialEq)]
enum RegionFd {
    Ram,
    A,
    B,
}

/// A memory table to send: each region with its fd.
type Table = Vec<(Vec<u8>, RegionFd)>;

fn f15_mem_table_invalid_regions(h: &Harness, good: &mut Good<'_>) {
    // The hostile device runs traffic on its own table; every bad table is refused and the
    // old one stays in use.
    let (fe, name) = started(h, "f15-regions");
    let mut g = Guest::new(&fe);
    guest_tx(&mut g, &fe, &h.hostile, 2);

    const LEN: u64 = 1 << 20;
    let (a, b) = (uniq("f15-a"), uniq("f15-b"));
    let (fa, fb) = (memfd(&a, LEN as usize), memfd(&b, LEN as usize));
    let ram = (fe.mem_table_payload()[8..].to_vec(), RegionFd::Ram);
    let (gpa, ua) = (0x2_0000_0000u64, 0x7400_0000_0000u64);
    use RegionFd::{A, B};
    let cases: Vec<(&str, Table)> = vec![
        ("memory_size 0", vec![ram.clone(), (region(gpa, 0, ua, 0), A)]),
        ("gpa + size overflows", vec![ram.clone(), (region(u64::MAX - 0xfff, 0x2000, ua, 0), A)]),
        ("uaddr + size overflows", vec![ram.clone(), (region(gpa, 0x2000, u64::MAX - 0xfff, 0), A)]),
        ("mmap_offset + size overflows", vec![ram.clone(), (region(gpa, 0x2000, ua, u64::MAX - 0xfff), A)]),
        ("region larger than the memfd", vec![ram.clone(), (region(gpa, LEN + 0x1000, ua, 0), A)]),
        ("mmap_offset + size past the memfd", vec![ram.clone(), (region(gpa, LEN, ua, 0x1000), A)]),
        ("gpa overlap, two memfds", vec![(region(gpa, LEN, ua, 0), A), (region(gpa + LEN / 2, LEN, ua + LEN, 0), B)]),
        ("uaddr overlap, two memfds", vec![(region(gpa, LEN, ua, 0), A), (region(gpa + LEN, LEN, ua + LEN / 2, 0), B)]),
        ("overlaps the guest RAM", vec![ram.clone(), (region(GPA + 0x1000, 0x1000, ua, 0), A)]),
    ];
    let fd_of = |w: RegionFd| match w {
        RegionFd::Ram => fe.ram.fd.try_clone().unwrap(),
        A => fa.try_clone().unwrap(),
        B => fb.try_clone().unwrap(),
    };
    for (what, table) in cases {
        let regions: Vec<Vec<u8>> = table.iter().map(|(r, _)| r.clone()).collect();
        let fds: Vec<OwnedFd> = table.iter().map(|&(_, w)| fd_of(w)).collect();
        assert_ne!(fe.ack_status(SET_MEM_TABLE, &mem_table(regions.len() as u32, &regions), &raw(&fds)), 0, "{what}");
        drop(fds);
        assert_eq!((fds_named(&a), maps_named(&a), fds_named(&b), maps_named(&b)), (1, 0, 1, 0), "{what}");
        assert_eq!(maps_named(&name), 2, "{what}: the old table stays mapped (front-end + back-end)");
        guest_tx(&mut g, &fe, &h.hostile, 1);
    }
    good.round();
    // Guest RAM plus two regions from two memfds, adjacent in both spaces: accepted, and the
    // old table is unmapped.
    let table = [ram, (region(gpa, LEN, ua, 0), A), (region(gpa + LEN, LEN, ua + LEN, 0), B)];
    let regions: Vec<Vec<u8>> = table.iter().map(|(r, _)| r.clone()).collect();
    let fds: Vec<OwnedFd> = table.iter().map(|&(_, w)| fd_of(w)).collect();
    assert_eq!(fe.ack_status(SET_MEM_TABLE, &mem_table(3, &regions), &raw(&fds)), 0);
    drop(fds);
    assert_eq!((maps_named(&a), maps_named(&b), maps_named(&name)), (1, 1, 2));
    guest_tx(&mut g, &fe, &h.hostile, 1);
    drop((g, fa, fb));
    h.hang_up(fe, &name);
    h.no_leak(&a);
    h.no_leak(&b);
}

fn f15_rem_mem_reg_unknown_region(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f15-rem");
    negotiate(&fe, PF_CONFIGURE_MEM_SLOTS, NET_FEATURES);
    let m = uniq("f15-rem-region");
    let mfd = memfd(&m, 2 << 12);
    let r = region(0x3_0000_0000, 1 << 12, 0x7500_0000_0000, 0);
    // Nothing mapped yet.
    assert_ne!(fe.ack_status(REM_MEM_REG, &single_region(&r), &[]), 0, "REM_MEM_REG before any region");
    let (rd, wr) = probe();
    assert_ne!(fe.ack_status(REM_MEM_REG, &single_region(&r), &[rd.as_raw_fd()]), 0);
    drop(rd);
    assert_probes_closed("REM_MEM_REG fd", &mut [wr]);
    assert_eq!(fe.ack_status(ADD_MEM_REG, &single_region(&r), &[mfd.as_raw_fd()]), 0);
    assert_eq!(maps_named(&m), 1);
    // Unknown: another guest address, user address or size.
    for other in [
        region(0x3_0000_1000, 1 << 12, 0x7500_0000_0000, 0),
        region(0x3_0000_0000, 1 << 12, 0x7500_0000_1000, 0),
        region(0x3_0000_0000, 2 << 12, 0x7500_0000_0000, 0),
        region(0x3_0000_0000, 1 << 11, 0x7500_0000_0000, 0),
    ] {
        assert_ne!(fe.ack_status(REM_MEM_REG, &single_region(&other), &[]), 0);
        assert_eq!(maps_named(&m), 1, "an unknown region removes nothing");
    }
    good.round();
    // The right one, with another mmap offset (ignored) and a tolerated fd that must be
    // closed unused.
    let (rd, wr) = probe();
    let same = region(0x3_0000_0000, 1 << 12, 0x7500_0000_0000, 0x1000);
    assert_eq!(fe.ack_status(REM_MEM_REG, &single_region(&same), &[rd.as_raw_fd()]), 0);
    drop(rd);
    assert_probes_closed("REM_MEM_REG fd", &mut [wr]);
    assert_eq!(maps_named(&m), 0, "removed region unmapped");
    assert_ne!(fe.ack_status(REM_MEM_REG, &single_region(&r), &[]), 0, "removing twice");
    drop(mfd);
    h.hang_up(fe, &name);
    h.no_leak(&m);
}

fn f15_more_add_mem_reg_than_max_slots(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f15-slots");
    negotiate(&fe, PF_CONFIGURE_MEM_SLOTS, NET_FEATURES);
    let slots = fe.get_u64(GET_MAX_MEM_SLOTS);
    assert_eq!(slots, 32);
    let m = uniq("f15-slots-region");
    let mfd = memfd(&m, (slots as usize + 1) << 12);
    let r = |i: u64| region(0x4_0000_0000 + (i << 12), 1 << 12, 0x7600_0000_0000 + (i << 12), i << 12);
    for i in 0..slots {
        assert_eq!(fe.ack_status(ADD_MEM_REG, &single_region(&r(i)), &[mfd.as_raw_fd()]), 0, "region {i}");
    }
    assert_eq!((fds_named(&m), maps_named(&m)), (1, slots as usize));
    assert_ne!(fe.ack_status(ADD_MEM_REG, &single_region(&r(slots)), &[mfd.as_raw_fd()]), 0, "one too many");
    assert_eq!((fds_named(&m), maps_named(&m)), (1, slots as usize), "the extra region's fd closed, not mapped");
    good.round();
    // ADD_MEM_REG takes exactly one fd.
    let free = region(0x5_0000_0000, 1 << 12, 0x7700_0000_0000, 0);
    assert_eq!(fe.ack_status(REM_MEM_REG, &single_region(&r(0)), &[]), 0);
    assert_ne!(fe.ack_status(ADD_MEM_REG, &single_region(&free), &[]), 0, "no fd");
    let two = [mfd.try_clone().unwrap(), mfd.try_clone().unwrap()];
    assert_ne!(fe.ack_status(ADD_MEM_REG, &single_region(&free), &raw(&two)), 0, "two fds");
    drop(two);
    // The freed slot takes a region again.
    assert_eq!(fe.ack_status(ADD_MEM_REG, &single_region(&r(slots)), &[mfd.as_raw_fd()]), 0);
    assert_eq!((fds_named(&m), maps_named(&m)), (1, slots as usize));
    drop(mfd);
    h.hang_up(fe, &name);
    h.no_leak(&m);
}

// ---------------------------------------------------------------------------------------------
// Family 16: the dirty log
// ---------------------------------------------------------------------------------------------

/// "Log description": mmap_size, mmap_offset.
fn log_desc(size: u64, offset: u64) -> Vec<u8> {
    let mut p = size.to_ne_bytes().to_vec();
    p.extend_from_slice(&offset.to_ne_bytes());
    p
}

/// `VHOST_VRING_F_LOG` in the flags of SET_VRING_ADDR.
const VRING_F_LOG: u32 = 1;

/// SET_LOG_BASE of `len` bytes of memfd `name` (the fd is closed here once sent). With
/// LOG_SHMFD negotiated the reply is mandatory: request code SET_LOG_BASE, a u64 0.
fn set_log_base(fe: &Frontend, name: &str, len: u64, flags: u32) {
    let fd = memfd(name, len as usize);
    fe.send(SET_LOG_BASE, flags, &log_desc(len, 0), &[fd.as_raw_fd()]);
    drop(fd);
    let (req, f, p) = fe.reply();
    assert_eq!((req, f, p), (SET_LOG_BASE, 0x5, u64p(0)), "SET_LOG_BASE answered once, success");
}

/// SET_VRING_ADDR of ring `i` at its own addresses, with `flags` and `log_guest_addr`.
fn vring_addr_logged(fe: &Frontend, i: usize, flags: u32, log: u64) -> Vec<u8> {
    let c = fe.queues[i].cfg;
    vring_addr(i as u32, flags, fe.ram.uaddr(c.desc_table), fe.ram.uaddr(c.used_ring), fe.ram.uaddr(c.avail_ring), log)
}

/// The start address of this process's mapping of memfd `name` (the back-end's log).
fn mapping_of(name: &str) -> *mut u8 {
    let tag = format!("/memfd:{name} ");
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let line = maps.lines().find(|l| format!("{l} ").contains(&tag)).expect("log mapped");
    let start = line.split('-').next().unwrap();
    usize::from_str_radix(start, 16).unwrap() as *mut u8
}

/// Refused logs: offered features, SET_LOG_BASE without LOG_SHMFD (acked non-zero), and with
/// it, logs that do not fit their file or overflow, size 0, no fd: the connection closes (a
/// mandatory reply carries no status QEMU reads), nothing is mapped, every fd is closed.
fn f16_set_log_base_refused(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f16-log");
    assert_eq!(fe.get_u64(GET_FEATURES) & F_LOG_ALL, F_LOG_ALL, "LOG_ALL offered");
    assert_eq!(fe.get_u64(GET_PROTOCOL_FEATURES) & PF_LOG_SHMFD, PF_LOG_SHMFD, "LOG_SHMFD offered");
    // LOG_SHMFD not negotiated: refused, the connection stays.
    let m = uniq("f16-log-memfd");
    let mfd = memfd(&m, 0x1000);
    assert_ne!(fe.ack_status(SET_LOG_BASE, &log_desc(0x1000, 0), &[mfd.as_raw_fd()]), 0);
    drop(mfd);
    assert_eq!(fe.ack_status(SET_OWNER, &[], &[]), 0, "connection still up");
    h.no_leak(&m);
    h.hang_up(fe, &name);
    good.round();

    for (what, file, size, offset) in [
        ("file smaller than the log", 0x1000, 0x2000, 0),
        ("offset + size past the file", 0x1000, 0x800, 0x801),
        ("size 0", 0x1000, 0, 0),
        ("offset > size", 0x1000, 0x10, 0x800),
        ("size + offset overflows", 0x1000, u64::MAX - 1, 2),
        ("both huge", 0x1000, u64::MAX, u64::MAX),
    ] {
        let (fe, name) = h.connect("f16-log-bad");
        negotiate(&fe, PF_LOG_SHMFD, NET_FEATURES | F_LOG_ALL);
        let mfd = memfd(&m, file);
        fe.send(SET_LOG_BASE, NEED_REPLY, &log_desc(size, offset), &[mfd.as_raw_fd()]);
        drop(mfd);
        h.expect_close(fe, &name, what);
        h.no_leak(&m);
        good.round();
    }
    let (fe, name) = h.connect("f16-log-nofd");
    negotiate(&fe, PF_LOG_SHMFD, NET_FEATURES);
    fe.send(SET_LOG_BASE, 0, &log_desc(0x1000, 0), &[]);
    h.expect_close(fe, &name, "SET_LOG_BASE without fd");
}

/// LOG_ALL acknowledged, no SET_LOG_BASE ever: the device runs unlogged (one warning), status
/// and features answer as usual.
fn f16_log_all_without_log_base(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f16-nolog");
    let acked = negotiate(&fe, PF_MQ | PF_STATUS | PF_LOG_SHMFD, NET_FEATURES | F_LOG_ALL);
    assert_eq!(acked & F_LOG_ALL, F_LOG_ALL);
    set_mem(&fe);
    for i in 0..2 {
        enable(&fe, i as u32);
        configure_ring(&fe, i);
        assert_eq!(
            fe.ack_status(SET_VRING_ADDR, &vring_addr_logged(&fe, i, VRING_F_LOG, fe.queues[i].cfg.used_ring), &[]),
            0
        );
        assert_eq!(kick_status(&fe, i), 0, "ring {i} starts");
    }
    fe.send(SET_STATUS, 0, &u64p(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK), &[]);
    assert_eq!(fe.get_u64(GET_STATUS), S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    let mut g = Guest::new(&fe);
    guest_tx(&mut g, &fe, &h.hostile, 2);
    guest_rx(&mut g, &fe, &h.hostile, 2, 2048, 1);
    good.round();
    drop(g);
    h.hang_up(fe, &name);
}

/// SET_LOG_BASE replaced twice: each new log unmaps the one before; SET_LOG_FD replaced closes
/// the old eventfd; RESET_DEVICE and a disconnect release the log and the fd.
fn f16_log_base_and_log_fd_replaced(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f16-replace");
    negotiate(&fe, PF_LOG_SHMFD | PF_RESET_DEVICE, NET_FEATURES | F_LOG_ALL);
    let logs = [uniq("f16-log-a"), uniq("f16-log-b"), uniq("f16-log-c")];
    let mapped = |n: &str| (fds_named(n), maps_named(n));
    set_log_base(&fe, &logs[0], 0x1000, 0);
    assert_eq!(mapped(&logs[0]), (0, 1), "mapped, fd closed once mapped");
    // With NEED_REPLY (and REPLY_ACK): still one reply.
    set_log_base(&fe, &logs[1], 0x2000, NEED_REPLY);
    fe.sync();
    assert_eq!(mapped(&logs[0]), (0, 0), "the first log is released");
    assert_eq!(mapped(&logs[1]), (0, 1));

    let (fds, tags): (Vec<OwnedFd>, Vec<u64>) = (0..3).map(|_| event_probe()).unzip();
    assert_eq!(fe.ack_status(SET_LOG_FD, &[], &[fds[0].as_raw_fd()]), 0);
    assert_eq!(fe.ack_status(SET_LOG_FD, &[], &[fds[1].as_raw_fd()]), 0);
    let [a, b, c] = fds.try_into().unwrap();
    drop((a, b));
    assert_eq!(event_probe_held(tags[0]), 0, "the replaced SET_LOG_FD is closed");
    assert_eq!(event_probe_held(tags[1]), 1, "the current SET_LOG_FD is kept");
    // Status 0 keeps both (they belong to the migration); RESET_DEVICE releases them.
    fe.send(SET_STATUS, 0, &u64p(0), &[]);
    fe.sync();
    assert_eq!(mapped(&logs[1]), (0, 1));
    assert_eq!(fe.ack_status(RESET_DEVICE, &[], &[]), 0);
    assert_eq!(event_probe_held(tags[1]), 0, "SET_LOG_FD closed by RESET_DEVICE");
    assert_eq!(mapped(&logs[1]), (0, 0), "RESET_DEVICE releases the log");
    good.round();

    // A disconnect releases them too.
    set_log_base(&fe, &logs[2], 0x1000, 0);
    assert_eq!(fe.ack_status(SET_LOG_FD, &[], &[c.as_raw_fd()]), 0);
    drop(c);
    h.hang_up(fe, &name);
    assert_eq!(event_probe_held(tags[2]), 0, "SET_LOG_FD closed by the disconnect");
    for l in &logs {
        h.no_leak(l);
    }
}

/// Migration with running rings, as QEMU does it: SET_LOG_BASE, SET_FEATURES with LOG_ALL and
/// SET_VRING_ADDR with VRING_F_LOG while the rings run (allowed), traffic throughout, then
/// logging off again. Any other change while started is still refused. The SET_LOG_FD
/// eventfd is signalled after bursts that marked the log, and no longer once logging is off.
fn f16_log_all_toggled_while_running(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f16-toggle");
    let r = running(h, fe, name, PF_MQ | PF_LOG_SHMFD);
    let fe = &r.fe;
    let acked = NET_FEATURES | F_PROTOCOL_FEATURES;
    let mut g = Guest::new(fe);
    guest_tx(&mut g, fe, &h.hostile, 1);
    let log = uniq("f16-toggle-log");
    set_log_base(fe, &log, 0x1000, 0);
    let log_kick = eventfd();
    assert_eq!(fe.ack_status(SET_LOG_FD, &[], &[log_kick.as_raw_fd()]), 0);
    guest_tx(&mut g, fe, &h.hostile, 1);
    assert_eq!(eventfd_read(&log_kick), 0, "not signalled before LOG_ALL");
    assert_eq!(fe.ack_status(SET_FEATURES, &u64p(acked | F_LOG_ALL), &[]), 0, "LOG_ALL on while running");
    for i in 0..2 {
        let used = fe.queues[i].cfg.used_ring;
        assert_eq!(
            fe.ack_status(SET_VRING_ADDR, &vring_addr_logged(fe, i, VRING_F_LOG, used), &[]),
            0,
            "VRING_F_LOG on ring {i}"
        );
    }
    guest_tx(&mut g, fe, &h.hostile, 2);
    assert!(eventfd_read(&log_kick) > 0, "SET_LOG_FD signalled after a TX burst that logged");
    guest_rx(&mut g, fe, &h.hostile, 2, 2048, 1);
    assert!(eventfd_read(&log_kick) > 0, "SET_LOG_FD signalled after an RX burst that logged");
    // Still refused while started: other features, other ring addresses, a log address whose
    // used ring would wrap.
    assert_ne!(fe.ack_status(SET_FEATURES, &u64p((acked | F_LOG_ALL) & !F_MRG_RXBUF), &[]), 0);
    assert_ne!(fe.ack_status(SET_FEATURES, &u64p(acked & !F_MRG_RXBUF), &[]), 0);
    let c = fe.queues[0].cfg;
    let moved = vring_addr(
        0,
        VRING_F_LOG,
        fe.ram.uaddr(c.desc_table) + 0x1000,
        fe.ram.uaddr(c.used_ring),
        fe.ram.uaddr(c.avail_ring),
        0,
    );
    assert_ne!(fe.ack_status(SET_VRING_ADDR, &moved, &[]), 0, "other addresses on a started ring");
    assert_ne!(fe.ack_status(SET_VRING_ADDR, &vring_addr_logged(fe, 0, VRING_F_LOG, u64::MAX - 0x100), &[]), 0);
    // MRG_RXBUF is still in force: a 1000-byte frame is merged over two 512-byte buffers.
    guest_rx(&mut g, fe, &h.hostile, 1, 512, 2);
    good.round();
    // Logging off, as QEMU ends a migration that was cancelled.
    for i in 0..2 {
        assert_eq!(fe.ack_status(SET_VRING_ADDR, &vring_addr_logged(fe, i, 0, 0), &[]), 0);
    }
    assert_eq!(fe.ack_status(SET_FEATURES, &u64p(acked), &[]), 0, "LOG_ALL off while running");
    let _ = eventfd_read(&log_kick);
    guest_tx(&mut g, fe, &h.hostile, 2);
    assert_eq!(eventfd_read(&log_kick), 0, "not signalled with logging off");
    drop(g);
    let Running { fe, name, .. } = r;
    h.hang_up(fe, &name);
    h.no_leak(&log);
}

/// The front-end shrinks the log's file to 0 under running rings with logging on. A write to
/// the log (here by this test, through the back-end's own mapping, standing in for the data
/// path's `DirtyLog::mark`) raises SIGBUS: the handler turns the log into zero pages, the
/// process survives, both devices keep their traffic, and a new SET_LOG_BASE is accepted.
fn f16_log_file_shrunk_under_running_rings(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f16-shrink");
    let r = running(h, fe, name, PF_MQ | PF_LOG_SHMFD);
    let fe = &r.fe;
    // The device's counters live across connections: compare with what they were.
    let faults = || (0..2).map(|q| h.hostile.stats(q).faults).sum::<u64>();
    let before = faults();
    let log = uniq("f16-shrink-log");
    let lfd = memfd(&log, 0x2000);
    fe.send(SET_LOG_BASE, 0, &log_desc(0x2000, 0), &[lfd.as_raw_fd()]);
    assert_eq!(fe.reply().0, SET_LOG_BASE);
    assert_eq!(fe.ack_status(SET_FEATURES, &u64p(NET_FEATURES | F_PROTOCOL_FEATURES | F_LOG_ALL), &[]), 0);
    let base = mapping_of(&log);
    // SAFETY: ftruncate of our own memfd.
    assert_eq!(unsafe { libc::ftruncate(lfd.as_raw_fd(), 0) }, 0);
    drop(lfd);
    // SAFETY: `base + 0x1000` is inside the back-end's live mapping of the log (the device
    // holds it until the hang-up below), now past the end of its file: the access faults and
    // the back-end's SIGBUS handler completes it on a zero page. The byte is written with a
    // volatile write, as an atomic OR into shared memory would.
    unsafe { base.add(0x1000).write_volatile(1) };
    assert_eq!(maps_named(&log), 0, "the handler replaced the log's mapping with zero pages");
    let mut g = Guest::new(fe);
    guest_tx(&mut g, fe, &h.hostile, 2);
    guest_rx(&mut g, fe, &h.hostile, 1, 2048, 1);
    good.round();
    assert_eq!(faults(), before, "the rings did not fault");
    // A new log replaces the lost one.
    set_log_base(fe, &uniq("f16-shrink-log2"), 0x1000, 0);
    guest_tx(&mut g, fe, &h.hostile, 1);
    drop(g);
    let Running { fe, name, .. } = r;
    h.hang_up(fe, &name);
    h.no_leak(&log);
}

/// Bytes of log for the test front-end's guest memory: one bit per 4 KiB page up to the end of
/// its 16 MiB at GPA (1 GiB).
const LOG_BYTES: u64 = (GPA + (16 << 20)) / 0x1000 / 8;

/// The pages set in the log file `fd` (the front-end's view of the bitmap).
fn logged_pages(fd: &OwnedFd) -> std::collections::BTreeSet<u64> {
    let mut bits = vec![0u8; LOG_BYTES as usize];
    // SAFETY: reads into `bits` from our own memfd.
    let n = unsafe { libc::pread(fd.as_raw_fd(), bits.as_mut_ptr().cast(), bits.len(), 0) };
    assert_eq!(n, bits.len() as isize);
    let mut pages = std::collections::BTreeSet::new();
    for (i, b) in bits.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                pages.insert(i as u64 * 8 + bit);
            }
        }
    }
    pages
}

fn pages_of(addr: u64, len: u64) -> impl Iterator<Item = u64> {
    (addr / 0x1000)..=((addr + len - 1) / 0x1000)
}

/// Logging on (LOG_ALL, SET_LOG_BASE, VRING_F_LOG with each used ring's guest address): guest
/// TX and RX traffic, single and merged buffers, set exactly the pages of the receive buffers
/// the device wrote and of the used-ring slots and indices it wrote; the avail rings,
/// descriptor tables and TX buffers, which only the guest writes, stay clear. Then the log's
/// file shrinks to 0 under the running rings: the data path's next mark faults, the handler
/// makes it zero pages, and the device goes on serving unlogged.
fn dirty_log_marks_exactly_what_the_device_wrote(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f16-exact");
    let r = running(h, fe, name, PF_MQ | PF_LOG_SHMFD);
    let fe = &r.fe;
    let mut g = Guest::new(fe);
    let log = uniq("f16-exact-log");
    let lfd = memfd(&log, LOG_BYTES as usize);
    fe.send(SET_LOG_BASE, 0, &log_desc(LOG_BYTES, 0), &[lfd.as_raw_fd()]);
    assert_eq!(fe.reply().0, SET_LOG_BASE);
    assert_eq!(fe.ack_status(SET_FEATURES, &u64p(NET_FEATURES | F_PROTOCOL_FEATURES | F_LOG_ALL), &[]), 0);
    for i in 0..2 {
        let used = fe.queues[i].cfg.used_ring;
        assert_eq!(fe.ack_status(SET_VRING_ADDR, &vring_addr_logged(fe, i, VRING_F_LOG, used), &[]), 0);
    }
    let (tx0, rx0) = (g.seen[1], g.seen[0]);
    guest_tx(&mut g, fe, &h.hostile, 3);
    guest_rx(&mut g, fe, &h.hostile, 2, 2048, 1);
    guest_rx(&mut g, fe, &h.hostile, 1, 512, 2);
    let mut want = std::collections::BTreeSet::new();
    for (q, from) in [(0usize, rx0), (1, tx0)] {
        let cfg = fe.queues[q].cfg;
        want.extend(pages_of(cfg.used_ring + 2, 2));
        let mut i = from;
        while i != g.seen[q] {
            let slot = (i % cfg.size) as u64;
            want.extend(pages_of(cfg.used_ring + 4 + 8 * slot, 8));
            if q == 0 {
                let (id, len) = g.drv[0].used_elem(i);
                want.extend(pages_of(g.drv[0].read_desc(id as u16).addr, len as u64));
            }
            i = i.wrapping_add(1);
        }
    }
    assert_eq!(logged_pages(&lfd), want, "logged pages = pages the device wrote");

    // The log's file shrinks under the running rings: the next burst's mark faults.
    // SAFETY: ftruncate of our own memfd.
    assert_eq!(unsafe { libc::ftruncate(lfd.as_raw_fd(), 0) }, 0);
    guest_rx(&mut g, fe, &h.hostile, 1, 2048, 1);
    wait("log mapping replaced", || (maps_named(&log) == 0).then_some(()));
    guest_tx(&mut g, fe, &h.hostile, 2);
    guest_rx(&mut g, fe, &h.hostile, 2, 2048, 1);
    good.round();
    drop(g);
    drop(lfd);
    let Running { fe, name, .. } = r;
    h.hang_up(fe, &name);
    h.no_leak(&log);
}

// ---------------------------------------------------------------------------------------------
// Family 17: ring addresses, size, base
// ---------------------------------------------------------------------------------------------

fn f17_vring_addr_outside_unaligned_overlapping(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f17-addr");
    let mut g = Guest::new(&fe);
    negotiate(&fe, PF_MQ, NET_FEATURES);
    set_mem(&fe);
    enable(&fe, 0);
    enable(&fe, 1);
    configure_ring(&fe, 1);
    let cfg = fe.queues[1].cfg;
    let (d, a, u) = (fe.ram.uaddr(cfg.desc_table), fe.ram.uaddr(cfg.avail_ring), fe.ram.uaddr(cfg.used_ring));
    let (start, end) = (fe.ram.uaddr(GPA), fe.ram.uaddr(GPA) + fe.ram.len as u64);
    let cases = [
        ("desc table outside memory", (end, a, u)),
        ("desc table crossing the end of memory", (end - 512, a, u)),
        ("avail ring below memory", (d, start - 0x1000, u)),
        ("used ring outside memory", (d, a, end + 0x1000)),
        ("address + length wraps", (u64::MAX - 15, a, u)),
        ("desc table unaligned", (d + 8, a, u)),
        ("avail ring unaligned", (d, a + 1, u)),
        ("used ring unaligned", (d, a, u + 2)),
        ("used ring overlapping the desc table", (d, a, d + 512)),
        ("used ring overlapping the avail ring", (d, a, a)),
    ];
    for (what, (desc, avail, used)) in cases {
        // The addresses are checked when the ring starts: SET_VRING_ADDR is accepted, the
        // kick that would start the ring is refused, and the ring stays stopped.
        assert_eq!(fe.ack_status(SET_VRING_ADDR, &vring_addr(1, 0, desc, used, avail, 0), &[]), 0, "{what}");
        assert_ne!(kick_status(&fe, 1), 0, "{what}: the ring must not start");
        assert!(!h.hostile.queue_ready(1), "{what}");
        let mut bufs = [TxFrame::with_capacity(MAX_TX_FRAME)];
        assert_eq!(h.hostile.dequeue_burst(0, &mut bufs), 0);
    }
    good.round();
    // A correct SET_VRING_ADDR and kick start the ring.
    assert_eq!(fe.ack_status(SET_VRING_ADDR, &fe.vring_addr_payload(1), &[]), 0);
    assert_eq!(kick_status(&fe, 1), 0);
    assert!(h.hostile.queue_ready(1));
    guest_tx(&mut g, &fe, &h.hostile, 3);
    // A started ring refuses new addresses and keeps going.
    assert_ne!(fe.ack_status(SET_VRING_ADDR, &vring_addr(1, 0, end, u, a, 0), &[]), 0);
    guest_tx(&mut g, &fe, &h.hostile, 2);
    drop(g);
    h.hang_up(fe, &name);

    // Without NEED_REPLY, the kick that cannot start the ring closes the connection.
    let (fe, name) = h.connect("f17-addr-close");
    negotiate(&fe, PF_MQ, NET_FEATURES);
    set_mem(&fe);
    configure_ring(&fe, 1);
    let cfg = fe.queues[1].cfg;
    let (d, a) = (fe.ram.uaddr(cfg.desc_table), fe.ram.uaddr(cfg.avail_ring));
    assert_eq!(fe.ack_status(SET_VRING_ADDR, &vring_addr(1, 0, d, d, a, 0), &[]), 0);
    fe.send(SET_VRING_KICK, 0, &u64p(1), &[fe.queues[1].kick.as_raw_fd()]);
    h.expect_close(fe, &name, "kick with overlapping rings");
}

fn f17_vring_num_and_base_out_of_range(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f17-num");
    let mut g = Guest::new(&fe);
    negotiate(&fe, PF_MQ, NET_FEATURES);
    set_mem(&fe);
    enable(&fe, 1);
    configure_ring(&fe, 1); // size 64
    for num in [0, 3, 100, 32767, 65536, 32768 * 2, 0x1_0040, u32::MAX] {
        assert_ne!(fe.ack_status(SET_VRING_NUM, &state(1, num), &[]), 0, "SET_VRING_NUM {num}");
    }
    // 32768 is the largest; then back to the real size.
    assert_eq!(fe.ack_status(SET_VRING_NUM, &state(1, 32768), &[]), 0);
    assert_eq!(fe.ack_status(SET_VRING_NUM, &state(1, 64), &[]), 0);
    for base in [0x1_0000, 0x1_0005, u32::MAX] {
        assert_ne!(fe.ack_status(SET_VRING_BASE, &state(1, base), &[]), 0, "SET_VRING_BASE {base:#x}");
    }
    assert_eq!(fe.get_vring_base(1), 0, "not truncated to 16 bits");
    good.round();
    // The refused values changed nothing: the ring starts at 0 with 64 entries and works
    // across a wrap of its slots.
    assert_eq!(kick_status(&fe, 1), 0);
    for _ in 0..12 {
        guest_tx(&mut g, &fe, &h.hostile, 8);
    }
    assert_eq!(fe.get_vring_base(1), 96);
    drop(g);
    h.hang_up(fe, &name);

    let (fe, name) = h.connect("f17-num-close");
    fe.send(SET_VRING_NUM, 0, &state(1, 3), &[]);
    h.expect_close(fe, &name, "SET_VRING_NUM 3");
}

// ---------------------------------------------------------------------------------------------
// Family 18: sequencing
// ---------------------------------------------------------------------------------------------

fn f18_repeated_requests_do_not_leak(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f18-repeat");
    negotiate(&fe, PF_MQ, NET_FEATURES);
    for _ in 0..1000 {
        fe.send(SET_VRING_NUM, 0, &state(1, 64), &[]);
        fe.send(SET_VRING_ADDR, 0, &fe.vring_addr_payload(1), &[]);
        fe.send(SET_VRING_BASE, 0, &state(1, 0), &[]);
    }
    fe.sync();
    for _ in 0..50 {
        assert_ne!(fe.ack_status(GET_INFLIGHT_FD, &inflight(0, 0, 2, 64), &[]), 0);
    }
    // Each CALL/ERR/KICK fd replaces (and closes) the previous one.
    let mut current = Vec::new();
    for request in [SET_VRING_CALL, SET_VRING_ERR, SET_VRING_KICK] {
        let mut tags = Vec::new();
        for _ in 0..50 {
            let (fd, tag) = event_probe();
            // The kick cannot start the ring (no memory table yet): refused, its fd kept as
            // the ring's kick source all the same.
            let status = fe.ack_status(request, &u64p(1), &[fd.as_raw_fd()]);
            assert_eq!(status != 0, request == SET_VRING_KICK, "request {request}");
            tags.push(tag);
        }
        let last = tags.pop().unwrap();
        for t in &tags {
            assert_eq!(event_probe_held(*t), 0, "request {request}: a replaced fd is closed");
        }
        assert_eq!(event_probe_held(last), 1, "request {request}: the current fd is kept");
        current.push(last);
    }
    // Repeated memory tables: only the current one stays mapped.
    for _ in 0..20 {
        set_mem(&fe);
    }
    assert_eq!(maps_named(&name), 2, "front-end + one back-end mapping");
    good.round();
    h.hang_up(fe, &name);
    for t in current {
        assert_eq!(event_probe_held(t), 0, "fds held until the disconnect are closed");
    }
}

fn f18_kick_before_mem_table(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f18-kick-early");
    let mut g = Guest::new(&fe);
    negotiate(&fe, PF_MQ, NET_FEATURES);
    for i in 0..2 {
        enable(&fe, i as u32);
        configure_ring(&fe, i);
        assert_ne!(kick_status(&fe, i), 0, "ring {i} cannot start without memory");
    }
    assert!(!h.hostile.queue_ready(0) && !h.hostile.queue_ready(1));
    set_mem(&fe);
    assert!(!h.hostile.queue_ready(1), "a memory table alone does not start a ring");
    good.round();
    for i in 0..2 {
        assert_eq!(kick_status(&fe, i), 0, "ring {i} starts");
    }
    assert!(h.hostile.queue_ready(0) && h.hostile.queue_ready(1));
    guest_tx(&mut g, &fe, &h.hostile, 3);
    guest_rx(&mut g, &fe, &h.hostile, 2, 2048, 1);
    drop(g);
    h.hang_up(fe, &name);

    let (fe, name) = h.connect("f18-kick-early-close");
    negotiate(&fe, PF_MQ, NET_FEATURES);
    configure_ring(&fe, 1);
    fe.send(SET_VRING_KICK, 0, &u64p(1), &[fe.queues[1].kick.as_raw_fd()]);
    h.expect_close(fe, &name, "kick before the memory table");
}

fn f18_set_features_after_rings_started(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("f18-features");
    let mut g = Guest::new(&fe);
    let acked = fe.qemu_start(NET_FEATURES);
    wait("hostile ready", || (h.hostile.queue_ready(0) && h.hostile.queue_ready(1)).then_some(()));
    guest_tx(&mut g, &fe, &h.hostile, 2);
    assert_ne!(fe.ack_status(SET_FEATURES, &u64p(acked & !F_MRG_RXBUF), &[]), 0, "features change while started");
    assert_ne!(fe.ack_status(SET_FEATURES, &u64p(acked & !F_PROTOCOL_FEATURES), &[]), 0);
    assert_eq!(fe.ack_status(SET_FEATURES, &u64p(acked), &[]), 0, "the same features again are fine");
    // MRG_RXBUF is still in force: a 1000-byte frame is merged over two 512-byte buffers.
    guest_rx(&mut g, &fe, &h.hostile, 1, 512, 2);
    guest_tx(&mut g, &fe, &h.hostile, 2);
    good.round();
    // Without NEED_REPLY: closed.
    fe.send(SET_FEATURES, 0, &u64p(acked & !F_MRG_RXBUF), &[]);
    drop(g);
    h.expect_close(fe, &name, "SET_FEATURES while started");
}

fn f18_get_vring_base_twice(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = started(h, "f18-base");
    let mut g = Guest::new(&fe);
    guest_tx(&mut g, &fe, &h.hostile, 3);
    assert_eq!(fe.get_vring_base(1), 3);
    assert_eq!(fe.get_vring_base(1), 3, "a stopped ring reports the same base");
    assert!(!h.hostile.queue_ready(1));
    // A stopped ring is not processed.
    let frames = post_tx(&mut g, &fe, 2);
    let mut bufs = [TxFrame::with_capacity(MAX_TX_FRAME)];
    assert_eq!(h.hostile.dequeue_burst(0, &mut bufs), 0);
    assert_eq!(g.drv[1].used_idx(), 3);
    good.round();
    // Restarted at the base, it takes the frames posted meanwhile.
    assert_eq!(fe.ack_status(SET_VRING_BASE, &state(1, 3), &[]), 0);
    assert_eq!(kick_status(&fe, 1), 0);
    take_tx(&mut g, &h.hostile, &frames);
    drop(g);
    h.hang_up(fe, &name);
}

fn f18_kick_again_on_a_started_ring(h: &Harness, good: &mut Good<'_>) {
    // SET_VRING_KICK on a started ring replaces the kick source; it must not rewind the ring
    // to the last SET_VRING_BASE (that would hand chains the guest already got back to the
    // device again).
    let (fe, name) = started(h, "f18-rekick");
    let mut g = Guest::new(&fe);
    guest_tx(&mut g, &fe, &h.hostile, 3);
    assert_eq!(kick_status(&fe, 1), 0);
    guest_tx(&mut g, &fe, &h.hostile, 2);
    assert_eq!(fe.ack_status(SET_VRING_KICK, &u64p(1 | INVALID_FD), &[]), 0);
    guest_tx(&mut g, &fe, &h.hostile, 2);
    assert_eq!(fe.get_vring_base(1), 7);
    good.round();
    drop(g);
    h.hang_up(fe, &name);
}

fn f18_reconnect_mid_traffic(h: &Harness, good: &mut Good<'_>) {
    let packets = h.hostile.stats(1).packets;
    let ready = h.ready.load(Ordering::SeqCst);
    let (fe, name) = h.connect("f18-reconnect");
    let mut g = Guest::new(&fe);
    fe.qemu_start(NET_FEATURES);
    wait("hostile ready", || (h.ready.load(Ordering::SeqCst) == ready + 1).then_some(()));
    // Every earlier teardown was dispatched before this connection's Ready.
    let destroyed = h.destroyed.load(Ordering::SeqCst);
    let frames = post_tx(&mut g, &fe, 8);
    let mut bufs: Vec<TxFrame> = (0..3).map(|_| TxFrame::with_capacity(MAX_TX_FRAME)).collect();
    assert_eq!(h.hostile.dequeue_burst(0, &mut bufs), 3);
    for (b, f) in bufs.iter().zip(&frames) {
        assert_eq!(b.frame(), f.as_slice());
    }
    // The front-end dies with 5 frames queued.
    drop(g);
    drop(fe);
    wait("hostile torn down", || (h.destroyed.load(Ordering::SeqCst) == destroyed + 1).then_some(()));
    assert!(!h.hostile.queue_ready(0) && !h.hostile.queue_ready(1));
    assert_eq!(h.hostile.dequeue_burst(0, &mut bufs), 0);
    assert_eq!(h.hostile.enqueue_burst(0, &[frame(0, 100).as_slice()]), 0);
    h.no_leak(&name);
    good.round();
    // A new front-end on the same socket: only its own frames.
    let (fe, name) = h.connect("f18-reconnect-new");
    let mut g = Guest::new(&fe);
    fe.qemu_start(NET_FEATURES);
    wait("hostile ready again", || (h.ready.load(Ordering::SeqCst) == ready + 2).then_some(()));
    guest_tx(&mut g, &fe, &h.hostile, 4);
    guest_rx(&mut g, &fe, &h.hostile, 2, 2048, 1);
    assert_eq!(h.hostile.stats(1).packets, packets + 3 + 4);
    drop(g);
    h.hang_up(fe, &name);
}

// ---------------------------------------------------------------------------------------------
// Ring enable: rust-vmm/vhost #247 and #227
// ---------------------------------------------------------------------------------------------

fn kick_before_enable_is_not_lost(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("vhost247");
    let mut g = Guest::new(&fe);
    negotiate(&fe, PF_MQ, NET_FEATURES);
    set_mem(&fe);
    for i in 0..2 {
        configure_ring(&fe, i);
        assert_eq!(kick_status(&fe, i), 0);
    }
    // Started, and disabled (PROTOCOL_FEATURES negotiated, no SET_VRING_ENABLE yet).
    assert!(!h.hostile.queue_ready(0) && !h.hostile.queue_ready(1));
    // No RX on a disabled ring, even with a buffer posted.
    let mut addr = [0u64];
    let rx_head = g.drv[0].build_chain(&[Buf::writable(2048)], &mut addr);
    g.drv[0].publish(rx_head);
    assert_eq!(h.hostile.enqueue_burst(0, &[frame(9, 1000).as_slice()]), 0);
    assert_eq!(g.drv[0].used_idx(), 0);
    // The guest transmits and kicks; a worker consumes the kick while the ring is disabled.
    let frames = post_tx(&mut g, &fe, 3);
    let kick = h.hostile.kick_fd(1).expect("a started ring has its kick fd");
    assert!(eventfd_read(&kick) > 0, "the guest kicked");
    assert_eq!(eventfd_read(&kick), 0, "kick consumed");
    enable(&fe, 1);
    enable(&fe, 0);
    // Enabling wakes a data path sleeping on the kick fd, and the frames are there.
    let mut pfd = libc::pollfd { fd: kick.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one valid pollfd.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 1000) }, 1, "enabling re-signals the kick");
    take_tx(&mut g, &h.hostile, &frames);
    // The RX buffer posted while disabled takes the next frame.
    assert_eq!(h.hostile.enqueue_burst(0, &[frame(9, 1000).as_slice()]), 1);
    assert_eq!(g.drv[0].used_elem(0), (rx_head as u32, 12 + 1000));
    let mut data = vec![0u8; 1000];
    g.drv[0].read(addr[0] + 12, &mut data);
    assert_eq!(data, frame(9, 1000));
    drop(g);
    good.round();
    h.hang_up(fe, &name);
}

fn set_features_without_protocol_features_enables_rings(h: &Harness, good: &mut Good<'_>) {
    // A front-end that never negotiates PROTOCOL_FEATURES: no SET_VRING_ENABLE, no REPLY_ACK.
    let (fe, name) = h.connect("vhost227");
    let mut g = Guest::new(&fe);
    let offered = fe.get_u64(GET_FEATURES);
    fe.send(SET_OWNER, 0, &[], &[]);
    fe.send(SET_FEATURES, 0, &u64p(NET_FEATURES & offered), &[]);
    fe.send(SET_MEM_TABLE, 0, &fe.mem_table_payload(), &[fe.ram.fd.as_raw_fd()]);
    fe.start_queue(0);
    fe.start_queue(1);
    fe.sync();
    assert!(h.hostile.queue_ready(0) && h.hostile.queue_ready(1), "SET_FEATURES enabled every ring");
    guest_tx(&mut g, &fe, &h.hostile, 3);
    guest_rx(&mut g, &fe, &h.hostile, 2, 2048, 1);
    // A restart (GET_VRING_BASE, SET_VRING_BASE, SET_VRING_KICK) keeps it enabled (#227: the
    // kick must not disable it).
    let base = fe.get_vring_base(1);
    assert_eq!(base, 3);
    fe.send(SET_VRING_BASE, 0, &state(1, base), &[]);
    fe.send(SET_VRING_KICK, 0, &u64p(1), &[fe.queues[1].kick.as_raw_fd()]);
    fe.sync();
    assert!(h.hostile.queue_ready(1));
    guest_tx(&mut g, &fe, &h.hostile, 2);
    drop(g);
    good.round();
    h.hang_up(fe, &name);
}

// ---------------------------------------------------------------------------------------------
// Faults of a running device: guest memory that disappears, rings that cannot go on
// ---------------------------------------------------------------------------------------------

/// A started device whose rings have error eventfds and whose front-end negotiated `pf`
/// (plus REPLY_ACK) and, with BACKEND_REQ, sent the back-end channel (returned).
struct Running {
    fe: Frontend,
    name: String,
    errs: [OwnedFd; 2],
    channel: Option<std::os::unix::net::UnixStream>,
}

fn running(h: &Harness, fe: Frontend, name: String, pf: u64) -> Running {
    running_with(h, fe, name, pf, NET_FEATURES)
}

/// [`running`] with virtio features `features` (each must be offered); a packed ring
/// (`F_RING_PACKED`) starts fresh, both wrap counters 1 (§2.8.1).
fn running_with(h: &Harness, fe: Frontend, name: String, pf: u64, features: u64) -> Running {
    let acked = negotiate(&fe, pf, features);
    assert_eq!(acked & features, features, "features offered");
    let base = if features & F_RING_PACKED != 0 { 0x8000_8000 } else { 0 };
    let channel = (pf & PF_BACKEND_REQ != 0).then(|| {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(fe.ack_status(SET_BACKEND_REQ_FD, &[], &[theirs.as_raw_fd()]), 0);
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        ours
    });
    set_mem(&fe);
    let errs = [eventfd(), eventfd()];
    for (i, err) in errs.iter().enumerate() {
        assert_eq!(fe.ack_status(SET_VRING_ERR, &u64p(i as u64), &[err.as_raw_fd()]), 0);
        enable(&fe, i as u32);
        configure_ring_at(&fe, i, base);
        assert_eq!(kick_status(&fe, i), 0, "ring {i} starts");
    }
    assert!(h.hostile.queue_ready(0) && h.hostile.queue_ready(1));
    Running { fe, name, errs, channel }
}

/// The front-end shrinks its guest memory file to 0 under running rings and kicks (what
/// killed the whole process with SIGBUS before): the access that faults completes on zero
/// pages, that device alone stops (both rings faulted once, error eventfds signalled,
/// NEEDS_RESET, link down, a config change on the back-end channel), nothing more is moved or
/// logged for it, the good device keeps its traffic, and the device cannot restart on the lost
/// memory. `ram` is the hostile front-end's guest memory (memfd or hugetlbfs).
fn memory_shrinks_under_running_rings(h: &Harness, good: &mut Good<'_>, fe: Frontend, name: String) {
    let r = running(h, fe, name, PF_MQ | PF_BACKEND_REQ | PF_CONFIG | PF_STATUS);
    let fe = &r.fe;
    // The device's counters live across connections: compare with what they were.
    let before = [h.hostile.stats(0), h.hostile.stats(1)];
    let mut g = Guest::new(fe);
    guest_tx(&mut g, fe, &h.hostile, 2);
    // One more frame is posted; then the memory goes, before the device read it.
    post_tx(&mut g, fe, 1);
    drop(g);
    // From here on nothing in this process touches the front-end's own mapping (it would
    // fault too, and it is not a guest region of the back-end).
    // SAFETY: truncating our own memfd.
    assert_eq!(unsafe { libc::ftruncate(fe.ram.fd.as_raw_fd(), 0) }, 0);
    fe.kick(1);
    let mut bufs: Vec<TxFrame> = (0..8).map(|_| TxFrame::with_capacity(MAX_TX_FRAME)).collect();
    // This thread is the hostile device's data path: its burst reads the avail ring and faults.
    assert_eq!(h.hostile.dequeue_burst(0, &mut bufs), 0, "a lost ring reads as empty");
    wait("hostile device stopped", || {
        (0..2).all(|q| matches!(h.hostile.fault(q), Some(RingFault::Memory(_)))).then_some(())
    });
    good.round();
    for (i, e) in r.errs.iter().enumerate() {
        assert_eq!(eventfd_read(e), 1, "ring {i}: error eventfd signalled once");
    }
    let mut m = [0u8; 12];
    std::io::Read::read_exact(&mut r.channel.as_ref().unwrap(), &mut m).expect("config change message");
    assert_eq!(m[..4], BACKEND_CONFIG_CHANGE.to_ne_bytes(), "BACKEND_CONFIG_CHANGE_MSG");
    assert_eq!(m[4..], [1, 0, 0, 0, 0, 0, 0, 0], "version 1, no NEED_REPLY, no payload");
    assert_eq!(fe.get_u64(GET_STATUS) & S_NEEDS_RESET, S_NEEDS_RESET, "NEEDS_RESET");
    fe.send(GET_CONFIG, 0, &config_req(6, 2), &[]);
    let (_, _, c) = fe.reply();
    assert_eq!(c[12..14], [0, 0], "link down in the config space");
    // The faulted rings are left alone: bursts move nothing and count nothing more.
    let frame = [0u8; 60];
    for _ in 0..100 {
        assert_eq!(h.hostile.dequeue_burst(0, &mut bufs), 0);
        assert_eq!(h.hostile.enqueue_burst(0, &[&frame[..]]), 0);
    }
    let faults = [0, 1].map(|q| h.hostile.stats(q).faults - before[q].faults);
    assert_eq!(faults, [1, 1], "each ring faulted once");
    assert_eq!(h.hostile.stats(1).packets - before[1].packets, 2);
    for e in &r.errs {
        assert_eq!(eventfd_read(e), 0, "no second error signal");
    }
    good.round();
    // The position is still answered (two chains consumed), and the lost memory cannot start
    // a ring again.
    assert_eq!(fe.get_vring_base(1), 2);
    assert_ne!(kick_status(fe, 1), 0, "no restart on lost memory");
    // A device reset (status 0) clears NEEDS_RESET and drops the lost memory.
    fe.send(SET_STATUS, 0, &u64p(0), &[]);
    assert_eq!(fe.get_u64(GET_STATUS), 0);
    let Running { fe, name, .. } = r;
    h.hang_up(fe, &name);
}

fn memfd_shrinks_under_running_rings(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("shrink");
    memory_shrinks_under_running_rings(h, good, fe, name);
}

fn config_req(offset: u32, size: u32) -> Vec<u8> {
    let mut p = Vec::new();
    for v in [offset, size, 0] {
        p.extend_from_slice(&v.to_ne_bytes());
    }
    p.extend_from_slice(&vec![0u8; size as usize]);
    p
}

/// `avail.idx` jumps by more than the queue size: the ring stops once (one error signal, one
/// fault counted) instead of being re-polled and logged forever; the front-end sets it up
/// again (GET_VRING_BASE, then the ring from that base) and it serves again.
fn ring_fault_stops_once_and_restarts(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("ring-fault");
    let r = running(h, fe, name, PF_MQ);
    let fe = &r.fe;
    let faults_before = h.hostile.stats(1).faults;
    let mut g = Guest::new(fe);
    guest_tx(&mut g, fe, &h.hostile, 1);
    g.drv[1].set_avail_idx(g.drv[1].avail_idx().wrapping_add(1000));
    fe.kick(1);
    let mut bufs: Vec<TxFrame> = (0..8).map(|_| TxFrame::with_capacity(MAX_TX_FRAME)).collect();
    for _ in 0..1000 {
        assert_eq!(h.hostile.dequeue_burst(0, &mut bufs), 0);
    }
    assert!(matches!(h.hostile.fault(1), Some(RingFault::AvailIndex(_))));
    assert_eq!(h.hostile.fault(0), None, "the other ring is not affected");
    assert_eq!(eventfd_read(&r.errs[1]), 1, "error eventfd signalled once");
    assert_eq!(eventfd_read(&r.errs[0]), 0);
    assert_eq!(h.hostile.stats(1).faults - faults_before, 1);
    good.round();
    // RX still works on the same device.
    guest_rx(&mut g, fe, &h.hostile, 1, 2048, 1);
    // Set up again: stop (the position is the last chain consumed), repair the index, start.
    let base = fe.get_vring_base(1);
    assert_eq!(base, 1);
    g.drv[1].set_avail_idx(base as u16);
    let size = fe.queues[1].cfg.size as u32;
    assert_eq!(fe.ack_status(SET_VRING_NUM, &state(1, size), &[]), 0);
    assert_eq!(fe.ack_status(SET_VRING_BASE, &state(1, base), &[]), 0);
    assert_eq!(fe.ack_status(SET_VRING_ADDR, &fe.vring_addr_payload(1), &[]), 0);
    assert_eq!(kick_status(fe, 1), 0, "the ring starts again");
    assert_eq!(h.hostile.fault(1), None);
    g.seen[1] = base as u16;
    guest_tx(&mut g, fe, &h.hostile, 2);
    drop(g);
    let Running { fe, name, .. } = r;
    h.hang_up(fe, &name);
}

/// Guest TX on an IN_ORDER ring meets a head out of range, which has no id to complete it: a
/// later completion would complete it too (§2.7.8.2), so the ring faults once
/// (`RingFault::Unreturnable`, the core's rule `PopError::unreturnable_on`) instead of going
/// on: the run of chains before it is completed, nothing after it is taken, one log line, one
/// error signal, one error counted, and later bursts leave the ring alone. Guest RX on the
/// same device and the other device keep working.
fn tx_unreturnable_chain_faults_an_in_order_ring(h: &Harness, good: &mut Good<'_>) {
    const BAD_HEAD: u16 = 1001;
    let line = format!("hostile: queue 1 stopped: chain {BAD_HEAD} cannot be completed");
    let logged_before = logged(&line);
    let (fe, name) = h.connect("tx-unreturnable");
    let r = running_with(h, fe, name, PF_MQ, NET_FEATURES | F_IN_ORDER);
    let fe = &r.fe;
    let before = [h.hostile.stats(0), h.hostile.stats(1)];
    let mut g = Guest::new(fe);
    let frames = post_tx(&mut g, fe, 2);
    let tx = &mut g.drv[1];
    tx.stage(BAD_HEAD);
    tx.kick();
    tx.add_chain(&[Buf::readable(&[0u8; 12]), Buf::readable(&frame(9, 60))]);
    fe.kick(1);
    let mut bufs: Vec<TxFrame> = (0..8).map(|_| TxFrame::with_capacity(MAX_TX_FRAME)).collect();
    let n = h.hostile.dequeue_burst(0, &mut bufs);
    assert_eq!(bufs[..n].iter().map(|b| b.frame().to_vec()).collect::<Vec<_>>(), frames, "the frames before it");
    assert_eq!(h.hostile.fault(1), Some(RingFault::Unreturnable { head: BAD_HEAD }));
    assert_eq!(h.hostile.fault(0), None, "the RX ring is not affected");
    assert_eq!(g.drv[1].used_idx(), 2, "the run before it completed, nothing for it or after it");
    for _ in 0..100 {
        assert_eq!(h.hostile.dequeue_burst(0, &mut bufs), 0);
    }
    assert_eq!(g.drv[1].used_idx(), 2);
    assert_eq!(eventfd_read(&r.errs[1]), 1, "error eventfd signalled once");
    assert_eq!(eventfd_read(&r.errs[0]), 0);
    let after = h.hostile.stats(1);
    assert_eq!(
        (after.faults, after.errors, after.packets),
        (before[1].faults + 1, before[1].errors + 1, before[1].packets + 2)
    );
    assert_eq!(logged(&line) - logged_before, 1, "one log line: {line}");
    guest_rx(&mut g, fe, &h.hostile, 2, 2048, 1);
    assert_eq!(h.hostile.stats(0).errors, before[0].errors);
    good.round();
    drop(g);
    let Running { fe, name, .. } = r;
    h.hang_up(fe, &name);
}

/// Guest RX on a packed ring meets a receive buffer whose id is out of range: completing
/// nothing for it leaves its descriptors behind the used position for good (§2.8.6), so the
/// ring faults once (`RingFault::Unreturnable`), as guest TX does: the frame placed before it
/// reaches the guest, the buffer reserved for the next frame before it is returned empty (in
/// ring order), nothing after it is taken; one log line, one error signal, one error counted,
/// and later bursts leave the ring alone. Guest TX on the same device (packed too) and the
/// other device keep working.
fn rx_unreturnable_chain_faults_a_packed_ring(h: &Harness, good: &mut Good<'_>) {
    const BAD_ID: u16 = 1000;
    let line = format!("hostile: queue 0 stopped: chain {BAD_ID} cannot be completed");
    let logged_before = logged(&line);
    let (fe, name) = h.connect("rx-unreturnable");
    let r = running_with(h, fe, name, PF_MQ, NET_FEATURES | F_RING_PACKED);
    let fe = &r.fe;
    let before = [h.hostile.stats(0), h.hostile.stats(1)];
    let q = |i: usize| &fe.queues[i];
    let mut rx = PackedDriver::new(&fe.ram.table, q(0).cfg, q(0).data_base, q(0).data_len);
    let mut tx = PackedDriver::new(&fe.ram.table, q(1).cfg, q(1).data_base, q(1).data_len);
    // The first frame fits `a` (the fast path); the second needs two buffers (mergeable): `b`
    // is reserved, then the bad id stops it.
    let a = rx.add_chain(&[Buf::writable(2048)]);
    let a_addr = rx.read_desc(0).addr;
    let b = rx.add_chain(&[Buf::writable(512)]);
    rx.add_chain_with_id(&[Buf::writable(512)], BAD_ID);
    rx.add_chain(&[Buf::writable(512)]);
    let frames = [frame(1, 60), frame(2, 1000), frame(3, 60)];
    let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
    let net = &h.hostile;
    assert_eq!(net.enqueue_burst_outcome(0, &refs), Enqueued { placed: 1, full: true });
    assert_eq!(net.fault(0), Some(RingFault::Unreturnable { head: BAD_ID }));
    assert_eq!(net.fault(1), None, "the TX ring is not affected");
    assert!(fe.wait_call(0, Duration::from_secs(10)), "what was completed is signalled");
    assert_eq!(rx.pop_used(), Some((a, 72)));
    let mut got = vec![0u8; 60];
    rx.read(a_addr + 12, &mut got);
    assert_eq!(got, frames[0]);
    assert_eq!(rx.pop_used(), Some((b, 0)), "the buffer reserved before the bad id, returned empty");
    assert_eq!(rx.pop_used(), None, "nothing for the bad id or after it");
    for _ in 0..100 {
        assert_eq!(net.enqueue_burst_outcome(0, &refs), Enqueued { placed: 0, full: true });
    }
    assert_eq!(rx.pop_used(), None);
    assert_eq!(eventfd_read(&r.errs[0]), 1, "error eventfd signalled once");
    assert_eq!(eventfd_read(&r.errs[1]), 0);
    let after = net.stats(0);
    assert_eq!(
        (after.faults, after.errors, after.packets),
        (before[0].faults + 1, before[0].errors + 1, before[0].packets + 1)
    );
    assert_eq!(logged(&line) - logged_before, 1, "one log line: {line}");
    // Guest TX on the same device.
    let f = frame(4, 60);
    let id = tx.add_chain(&[Buf::readable(&[0u8; 12]), Buf::readable(&f)]);
    fe.kick(1);
    let mut bufs: Vec<TxFrame> = (0..8).map(|_| TxFrame::with_capacity(MAX_TX_FRAME)).collect();
    let n = wait("TX frame", || Some(net.dequeue_burst(0, &mut bufs)).filter(|&n| n > 0));
    assert_eq!((n, bufs[0].frame()), (1, &f[..]));
    assert_eq!(tx.pop_used(), Some((id, 0)));
    assert_eq!(net.stats(1).errors, before[1].errors);
    good.round();
    let Running { fe, name, .. } = r;
    h.hang_up(fe, &name);
}

/// The ring's region goes away (`REM_MEM_REG`) and comes back (`ADD_MEM_REG`), as QEMU does when
/// it changes a region: a burst in between faults the ring (`RingFault::Invalid`), and the new
/// table that fits it again brings it back without a ring set-up.
fn ring_serves_again_once_its_region_is_back(h: &Harness, good: &mut Good<'_>) {
    let (fe, name) = h.connect("region-back");
    let r = running(h, fe, name, PF_MQ | PF_CONFIGURE_MEM_SLOTS);
    let fe = &r.fe;
    let mut g = Guest::new(fe);
    guest_tx(&mut g, fe, &h.hostile, 1);
    let ram = region(GPA, fe.ram.len as u64, fe.ram.uaddr(GPA), 0);
    assert_eq!(fe.ack_status(REM_MEM_REG, &single_region(&ram), &[]), 0);
    let mut bufs: Vec<TxFrame> = (0..8).map(|_| TxFrame::with_capacity(MAX_TX_FRAME)).collect();
    assert_eq!(h.hostile.dequeue_burst(0, &mut bufs), 0);
    assert!(matches!(h.hostile.fault(1), Some(RingFault::Invalid(_))), "{:?}", h.hostile.fault(1));
    assert_eq!(fe.ack_status(ADD_MEM_REG, &single_region(&ram), &[fe.ram.fd.as_raw_fd()]), 0);
    assert_eq!(h.hostile.fault(1), None, "a table the ring fits again clears the fault");
    guest_tx(&mut g, fe, &h.hostile, 2);
    guest_rx(&mut g, fe, &h.hostile, 1, 2048, 1);
    good.round();
    drop(g);
    let Running { fe, name, .. } = r;
    h.hang_up(fe, &name);
}

/// Device status and the features around it: status 0 resets the device but keeps the ring
/// positions for QEMU's GET_VRING_BASE that follows it; FEATURES_OK without SET_FEATURES reads
/// back clear; SET_CONFIG writes the MAC and refuses every other field; RESET_DEVICE is offered
/// and forgets positions; RARP is not offered (no migration yet); acks only where REPLY_ACK
/// was negotiated.
fn status_config_and_acks(h: &Harness, good: &mut Good<'_>) {
    // No REPLY_ACK negotiated: NEED_REPLY gets no ack; the next reply is the GET's own.
    let fe = Frontend::connect_named(&h.path, 2, 64, &uniq("no-ack"));
    let name = uniq("unused");
    fe.send(SET_OWNER, NEED_REPLY, &[], &[]);
    let pf = fe.get_u64(GET_PROTOCOL_FEATURES);
    assert_eq!(
        pf & (PF_RESET_DEVICE | PF_STATUS | PF_CONFIG | PF_BACKEND_REQ),
        PF_RESET_DEVICE | PF_STATUS | PF_CONFIG | PF_BACKEND_REQ
    );
    assert_eq!(pf & PF_RARP, 0, "not offered: not honoured yet");
    drop(fe);
    let _ = name;
    good.round();

    let (fe, name) = h.connect("status");
    negotiate(&fe, PF_MQ | PF_STATUS | PF_CONFIG | PF_RESET_DEVICE, NET_FEATURES);
    // FEATURES_OK stays: SET_FEATURES succeeded (in negotiate).
    fe.send(SET_STATUS, 0, &u64p(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK), &[]);
    assert_eq!(fe.get_u64(GET_STATUS), S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    // The MAC is writable through SET_CONFIG, nothing else is.
    let mac = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];
    let mut p = config_req(0, 6);
    p[12..].copy_from_slice(&mac);
    assert_eq!(fe.ack_status(SET_CONFIG, &p, &[]), 0);
    fe.send(GET_CONFIG, 0, &config_req(0, 6), &[]);
    assert_eq!(fe.reply().2[12..], mac);
    assert_ne!(fe.ack_status(SET_CONFIG, &config_req(6, 2), &[]), 0, "status is read-only");
    assert_ne!(fe.ack_status(SET_CONFIG, &config_req(4, 4), &[]), 0, "past the MAC");
    // Rings run and consume; then status 0 (QEMU's stop order): the device stops and the
    // following GET_VRING_BASE still answers the position.
    drop(fe);
    h.no_leak(&name);
    let (fe, name) = h.connect("status-stop");
    let r = running(h, fe, name, PF_MQ | PF_STATUS | PF_RESET_DEVICE);
    let fe = &r.fe;
    let mut g = Guest::new(fe);
    guest_tx(&mut g, fe, &h.hostile, 3);
    fe.send(SET_STATUS, 0, &u64p(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK), &[]);
    fe.send(SET_STATUS, 0, &u64p(0), &[]);
    assert_eq!(fe.get_u64(GET_STATUS), 0);
    assert!(!h.hostile.queue_ready(1), "status 0 stops the rings");
    assert_eq!(fe.get_vring_base(1), 3, "the position survives status 0");
    // FEATURES_OK before any SET_FEATURES (features were reset): refused.
    fe.send(SET_STATUS, 0, &u64p(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK), &[]);
    assert_eq!(fe.get_u64(GET_STATUS), S_ACKNOWLEDGE | S_DRIVER, "FEATURES_OK refused");
    // RESET_DEVICE forgets positions.
    assert_eq!(fe.ack_status(RESET_DEVICE, &[], &[]), 0);
    assert_eq!(fe.get_vring_base(1), 0);
    drop(g);
    let Running { fe, name, .. } = r;
    h.hang_up(fe, &name);
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

const CASES: [(&str, Case); 36] = [
    ("f12 short header", f12_short_header_then_close),
    ("f12 size", f12_size_above_max_payload),
    ("f12 version", f12_version_not_1),
    ("f12 reply bit", f12_reply_bit_on_a_request),
    ("f12 unknown request", f12_unknown_request_code),
    ("f12 reserved flags", f12_reserved_flag_bits),
    ("f13 fds on fd-less request", f13_fds_on_a_message_that_takes_none),
    ("f13 mem table fd count", f13_mem_table_fd_count_mismatch),
    ("f13 more than 8 fds", f13_more_than_8_fds),
    ("f13 invalid fd flag", f13_vring_fd_flag),
    ("f13 inflight fds", f13_inflight_fds),
    ("f14 vring index", f14_vring_index_out_of_range),
    ("f15 region count", f15_mem_table_region_count),
    ("f15 invalid regions", f15_mem_table_invalid_regions),
    ("f15 REM_MEM_REG", f15_rem_mem_reg_unknown_region),
    ("f15 ADD_MEM_REG slots", f15_more_add_mem_reg_than_max_slots),
    ("f16 SET_LOG_BASE refused", f16_set_log_base_refused),
    ("f16 LOG_ALL without log", f16_log_all_without_log_base),
    ("f16 log and log fd replaced", f16_log_base_and_log_fd_replaced),
    ("f16 LOG_ALL toggled while running", f16_log_all_toggled_while_running),
    ("f16 log file shrunk", f16_log_file_shrunk_under_running_rings),
    ("f17 SET_VRING_ADDR", f17_vring_addr_outside_unaligned_overlapping),
    ("f17 SET_VRING_NUM/BASE", f17_vring_num_and_base_out_of_range),
    ("f18 repeated requests", f18_repeated_requests_do_not_leak),
    ("f18 kick before memory", f18_kick_before_mem_table),
    ("f18 SET_FEATURES while started", f18_set_features_after_rings_started),
    ("f18 GET_VRING_BASE twice", f18_get_vring_base_twice),
    ("f18 kick again", f18_kick_again_on_a_started_ring),
    ("f18 reconnect", f18_reconnect_mid_traffic),
    ("vhost #247", kick_before_enable_is_not_lost),
    ("vhost #227", set_features_without_protocol_features_enables_rings),
    ("memfd shrinks under running rings", memfd_shrinks_under_running_rings),
    ("f16 dirty log exact", dirty_log_marks_exactly_what_the_device_wrote),
    ("ring fault stops once", ring_fault_stops_once_and_restarts),
    ("region back", ring_serves_again_once_its_region_is_back),
    ("status, config, acks", status_config_and_acks),
];

#[test]
fn guest_memory_file_shrinking_under_running_rings_stops_only_that_device() {
    run_case("shrink", memfd_shrinks_under_running_rings);
}

/// The same attack on hugetlbfs memory (`MFD_HUGETLB`), where the machine has free huge pages
/// (ci/test.sh reserves some; elsewhere the case says it was skipped).
#[test]
fn hugetlbfs_memory_truncated_under_running_rings_stops_only_that_device() {
    run_case("shrink-huge", |h, good| {
        let name = uniq("huge");
        let Some(ram) = GuestRam::hugetlb(16 << 20, &name) else {
            eprintln!("SKIPPED: no free 2 MiB huge pages for a hugetlbfs memfd (echo 16 > /proc/sys/vm/nr_hugepages)");
            return;
        };
        let sock = std::os::unix::net::UnixStream::connect(&h.path).unwrap();
        let fe = Frontend::with_ram(sock, 2, 64, ram);
        fe.send(SET_PROTOCOL_FEATURES, 0, &u64p(PF_REPLY_ACK), &[]);
        memory_shrinks_under_running_rings(h, good, fe, name);
    });
}

/// `require_sealed_memory`: a memory table whose memfd could shrink is refused (and unmapped,
/// its fd closed); one sealed with F_SEAL_SHRINK starts, and the seal keeps the attack of
/// `guest_memory_file_shrinking_*` from happening at all (ftruncate fails).
#[test]
fn sealed_memory_can_be_required() {
    let _serial = shared();
    let dir = std::env::temp_dir().join(format!("virtq-vu-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sealed.sock");
    let mut b = Backend::new().unwrap();
    let config = DeviceConfig { require_sealed_memory: true, ..DeviceConfig::new(NetModel::default()) };
    let net = b.add_device(
        "sealed",
        config,
        SocketSpec::Server { path: path.clone(), mode: None },
        Box::new(Counting::default()),
    );
    let net = net.unwrap();
    let handle = b.handle();
    let thread = thread::spawn(move || b.run().unwrap());

    let name = uniq("unsealed");
    let fe = Frontend::connect_named(&path, 2, 64, &name);
    negotiate(&fe, PF_MQ, NET_FEATURES);
    let fd = fe.ram.fd.as_raw_fd();
    assert_ne!(fe.ack_status(SET_MEM_TABLE, &fe.mem_table_payload(), &[fd]), 0, "unsealed memory refused");
    assert_ne!(kick_status(&fe, 0), 0, "no memory table: no ring");
    wait(&format!("memfd {name} unmapped and closed"), || {
        (fds_named(&name) == 1 && maps_named(&name) == 1).then_some(())
    });
    drop(fe);

    let name = uniq("sealed");
    let sock = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let fe = Frontend::with_ram(sock, 2, 64, GuestRam::sealed(16 << 20, &name));
    let mut g = Guest::new(&fe);
    negotiate(&fe, PF_MQ, NET_FEATURES);
    set_mem(&fe);
    for i in 0..2 {
        enable(&fe, i as u32);
        configure_ring(&fe, i);
        assert_eq!(kick_status(&fe, i), 0);
    }
    guest_tx(&mut g, &fe, &net, 2);
    // SAFETY: our own memfd; the seal refuses the shrink.
    assert_ne!(unsafe { libc::ftruncate(fe.ram.fd.as_raw_fd(), 0) }, 0, "a sealed memfd cannot shrink");
    guest_tx(&mut g, &fe, &net, 1);
    drop(g);
    fe.hang_up();
    handle.shutdown();
    thread.join().unwrap();
}

#[test]
fn a_ring_serves_again_once_its_region_is_back() {
    run_case("region-back", ring_serves_again_once_its_region_is_back);
}

#[test]
fn a_ring_that_cannot_go_on_stops_once_and_restarts_when_set_up_again() {
    run_case("ring-fault", ring_fault_stops_once_and_restarts);
}

// The two cases below count log lines, so they run alone on a fresh back-end and not in
// `CASES`: in the sequence, earlier faults of the same device use up its log limit.

#[test]
fn tx_chain_that_cannot_be_completed_faults_an_in_order_ring_once() {
    run_case("tx-unreturnable", tx_unreturnable_chain_faults_an_in_order_ring);
}

#[test]
fn rx_chain_that_cannot_be_completed_faults_a_packed_ring_once() {
    run_case("rx-unreturnable", rx_unreturnable_chain_faults_a_packed_ring);
}

#[test]
fn status_zero_resets_features_ok_is_checked_config_mac_is_writable_acks_follow_reply_ack() {
    run_case("status", status_config_and_acks);
}

#[test]
fn family12_short_header_then_close() {
    run_case("f12-short", f12_short_header_then_close);
}

#[test]
fn family12_size_above_max_payload_closes() {
    run_case("f12-size", f12_size_above_max_payload);
}

#[test]
fn family12_version_not_1_closes() {
    run_case("f12-version", f12_version_not_1);
}

#[test]
fn family12_reply_bit_on_a_request_closes() {
    run_case("f12-reply", f12_reply_bit_on_a_request);
}

#[test]
fn family12_unknown_request_code_closes() {
    run_case("f12-unknown", f12_unknown_request_code);
}

#[test]
fn family12_reserved_flag_bits_close() {
    run_case("f12-flags", f12_reserved_flag_bits);
}

#[test]
fn family13_fds_on_a_message_that_takes_none_are_closed() {
    run_case("f13-none", f13_fds_on_a_message_that_takes_none);
}

#[test]
fn family13_mem_table_fd_count_must_match_num_regions() {
    run_case("f13-mt", f13_mem_table_fd_count_mismatch);
}

#[test]
fn family13_more_than_8_fds_close_and_all_are_closed() {
    run_case("f13-9fds", f13_more_than_8_fds);
}

#[test]
fn family13_invalid_fd_flag_with_fd_or_neither() {
    run_case("f13-flag", f13_vring_fd_flag);
}

#[test]
fn family13_inflight_fd_requests_are_refused_and_fds_closed() {
    run_case("f13-inflight", f13_inflight_fds);
}

#[test]
fn family14_vring_index_out_of_range_or_truncated() {
    run_case("f14-index", f14_vring_index_out_of_range);
}

#[test]
fn family15_mem_table_with_0_or_9_regions() {
    run_case("f15-count", f15_mem_table_region_count);
}

#[test]
fn family15_invalid_or_overlapping_regions_keep_the_old_table() {
    run_case("f15-regions", f15_mem_table_invalid_regions);
}

#[test]
fn family15_rem_mem_reg_of_an_unknown_region() {
    run_case("f15-rem", f15_rem_mem_reg_unknown_region);
}

#[test]
fn family15_more_add_mem_reg_than_max_mem_slots() {
    run_case("f15-slots", f15_more_add_mem_reg_than_max_slots);
}

#[test]
fn family16_set_log_base_refused_for_a_log_past_its_file_overflowing_or_empty() {
    run_case("f16-log", f16_set_log_base_refused);
}

#[test]
fn family16_log_all_without_set_log_base_runs_unlogged() {
    run_case("f16-nolog", f16_log_all_without_log_base);
}

#[test]
fn family16_set_log_base_and_set_log_fd_replaced_release_the_old_ones() {
    run_case("f16-replace", f16_log_base_and_log_fd_replaced);
}

#[test]
fn family16_log_all_toggled_while_rings_run() {
    run_case("f16-toggle", f16_log_all_toggled_while_running);
}

#[test]
fn family16_dirty_log_marks_exactly_what_the_device_wrote_and_survives_its_file_shrinking() {
    run_case("f16-exact", dirty_log_marks_exactly_what_the_device_wrote);
}

#[test]
fn family16_log_file_shrunk_under_running_rings_is_survived() {
    run_case("f16-shrink", f16_log_file_shrunk_under_running_rings);
}

#[test]
fn family17_vring_addr_outside_unaligned_or_overlapping_does_not_start() {
    run_case("f17-addr", f17_vring_addr_outside_unaligned_overlapping);
}

#[test]
fn family17_vring_num_and_base_out_of_range() {
    run_case("f17-num", f17_vring_num_and_base_out_of_range);
}

#[test]
fn family18_repeated_requests_do_not_leak() {
    run_case("f18-repeat", f18_repeated_requests_do_not_leak);
}

#[test]
fn family18_kick_before_the_memory_table() {
    run_case("f18-kick-early", f18_kick_before_mem_table);
}

#[test]
fn family18_set_features_after_rings_started_is_refused() {
    run_case("f18-features", f18_set_features_after_rings_started);
}

#[test]
fn family18_get_vring_base_twice() {
    run_case("f18-base", f18_get_vring_base_twice);
}

#[test]
fn family18_kick_again_on_a_started_ring_keeps_its_position() {
    run_case("f18-rekick", f18_kick_again_on_a_started_ring);
}

#[test]
fn family18_reconnect_mid_traffic() {
    run_case("f18-reconnect", f18_reconnect_mid_traffic);
}

#[test]
fn kick_before_set_vring_enable_is_not_lost_rust_vmm_vhost_247() {
    run_case("vhost-247", kick_before_enable_is_not_lost);
}

#[test]
fn set_features_without_protocol_features_enables_rings_rust_vmm_vhost_227() {
    run_case("vhost-227", set_features_without_protocol_features_enables_rings);
}

/// The process's open fds (link targets) and mappings (permissions and path), for a
/// before/after comparison.
fn snapshot() -> (Vec<String>, Vec<String>) {
    let fds = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.display().to_string())
        .collect();
    let maps = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            format!("{} {}", f.get(1).unwrap_or(&""), f.get(5..).map(|p| p.join(" ")).unwrap_or_default())
        })
        .collect();
    (fds, maps)
}

/// Entries of `a` not in `b` (as multisets).
fn minus(a: &[String], b: &[String]) -> Vec<String> {
    let mut rest: Vec<&String> = b.iter().collect();
    a.iter()
        .filter(|x| match rest.iter().position(|y| y == x) {
            Some(i) => {
                rest.swap_remove(i);
                false
            }
            None => true,
        })
        .cloned()
        .collect()
}

#[test]
fn every_case_in_sequence_leaks_no_fd_or_mapping() {
    // Alone in the process: every other test in this binary waits.
    let _serial = exclusive();
    let h = Harness::new("sequence");
    let good_fe = Frontend::connect_named(&h.good_path, 2, 64, &uniq("good"));
    let mut good = Good::start(&good_fe, &h.good);
    let run_all = |good: &mut Good<'_>| {
        for (what, case) in CASES {
            let t = Instant::now();
            case(&h, good);
            good.round();
            h.serves_again();
            // A hang detector, not a timing test: generous so that a loaded machine passes.
            let ms = t.elapsed().as_millis();
            assert!(ms < 30_000, "{what} took {ms} ms");
        }
    };
    // A first pass warms up what is allocated once (allocator arenas, lazy statics).
    run_all(&mut good);
    let (fds, maps) = snapshot();
    run_all(&mut good);
    // Teardown of the last case may still be finishing on the control thread.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (fds2, maps2) = loop {
        let (f, m) = snapshot();
        if (f.len() == fds.len() && m.len() == maps.len()) || Instant::now() > deadline {
            break (f, m);
        }
        thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(fds2.len(), fds.len(), "fds: opened {:?}, closed {:?}", minus(&fds2, &fds), minus(&fds, &fds2));
    assert_eq!(
        maps2.len(),
        maps.len(),
        "mappings: added {:?}, removed {:?}",
        minus(&maps2, &maps),
        minus(&maps, &maps2)
    );
}
