//! `switchbench`: virtq-net's data plane between two guests, in-process and deterministic.
//!
//! Two switch ports of the product's data plane (`virtq_net::dataplane::Dataplane`, devices
//! configured by `virtq_net::port::device_config` and served by the vhost-user control loop),
//! each connected to an in-tree front-end over a real unix socket with memfd guest memory.
//! Guest A sends bursts of 32 frames to guest B, which posts 32 receive buffers per burst;
//! every step is one `Dataplane::poll_once`, which takes A's burst, switches it and places it
//! in B's buffers (and polls B's empty TX ring, as the product does).
//!
//! Run under `valgrind --tool=callgrind --toggle-collect='*switchbench*step*'` (what
//! `benches/switchbench.sh` does): only the data plane's work is counted, not the guests',
//! and every step moves exactly one full burst, so instructions per frame do not depend on
//! timing as `IR=1 benches/vs-dpdk.sh` does (its bursts are as full as the front-end keeps
//! them).
//!
//! `switchbench --size BYTES [--mrg on|off] [--log] [--steps N] [--threads 1|2]`: `--log` runs
//! as while both guests migrate: `LOG_SHMFD` and `LOG_ALL` negotiated, a dirty log set,
//! `VRING_F_LOG` on every ring. `--tso` instead of `--size`: the TCP stream of two Linux guests
//! that negotiated TSO, both ways as Linux does (`CSUM`, `HOST_TSO4`, `GUEST_CSUM`,
//! `GUEST_TSO4`, `MRG_RXBUF`): every frame a 64 KiB GSO frame ([`TSO_FRAME`] bytes, 45
//! segments of 1448 bytes) sent as Linux's `virtio_net` sends one (its header and the
//! frame's headers in one buffer, then the payload in 4 KiB page fragments, behind an
//! indirect table), received into 4 KiB mergeable buffers (16 per frame) on rings of 1024. `--threads 2`: A's ring is polled by one data-plane thread and
//! B's by another (`--pmd-cpus` with two CPUs), so every frame is handed between threads; a
//! step is one pass of each (run one after the other here: callgrind counts instructions, not
//! the cache traffic between CPUs, which `vs-dpdk.sh`-style timed runs show). It prints the
//! wall-clock time of the passes alone per frame (`ns_per_frame`): a timing, as noisy as the
//! machine it runs on.

#[path = "../../adapters/vhost-user/tests/frontend/mod.rs"]
mod frontend;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use frontend::*;
use virtq::testing::{Buf, TestDriver};
use virtq::RegionTable;
use virtq_net::dataplane::{Announcements, Dataplane, Fabric, Port, PortBackend};
use virtq_net::port::{device_config, PortSpec};
use virtq_vhost_user::backend::{Backend, NoHandler, SocketSpec};
use virtq_vhost_user::net::NetDevice;

/// Frames per step: one burst of the data plane.
const BURST: u16 = 32;
/// VERSION_1, INDIRECT_DESC, EVENT_IDX, MAC; MRG_RXBUF with `--mrg on`.
const FEATURES: u64 = (1 << 32) | (1 << 28) | (1 << 29) | (1 << 5);
const F_MRG_RXBUF: u64 = 1 << 15;
/// With `--tso`: CSUM, GUEST_CSUM, GUEST_TSO4, HOST_TSO4 (and MRG_RXBUF).
const F_TSO: u64 = (1 << 0) | (1 << 1) | (1 << 7) | (1 << 11);
/// A `--tso` frame: Ethernet, IPv4 and TCP with timestamps (66 bytes of headers, Linux's),
/// then 45 segments of 1448 bytes: 65,226 bytes, an IP datagram just under 64 KiB.
const TSO_FRAME: usize = 66 + 45 * 1448;
/// Its GSO size (an MSS of 1460 less the 12 bytes of timestamps).
const TSO_MSS: u16 = 1448;
/// Receive buffers with `--tso`: 4 KiB, the most Linux posts per mergeable buffer.
const TSO_RX_BUF: u32 = 4096;
const F_LOG_ALL: u64 = 1 << 26;
const PF_LOG_SHMFD: u64 = 1 << 1;
/// `VHOST_VRING_F_LOG` in SET_VRING_ADDR's flags.
const VRING_F_LOG: u32 = 1;
const MAC_A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0b];

struct Args {
    size: usize,
    tso: bool,
    mrg: bool,
    log: bool,
    steps: u32,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args { size: 64, tso: false, mrg: true, log: false, steps: 1000, threads: 1 };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--log" {
            a.log = true;
            continue;
        }
        if k == "--tso" {
            a.tso = true;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--size" => a.size = v.parse().map_err(|_| format!("bad size {v}"))?,
            "--mrg" => a.mrg = v != "off",
            "--steps" => a.steps = v.parse().map_err(|_| format!("bad steps {v}"))?,
            "--threads" => {
                a.threads = match v.as_str() {
                    "1" => 1,
                    "2" => 2,
                    _ => return Err(format!("--threads {v}: 1 or 2")),
                }
            }
            _ => return Err(format!("unknown option {k}")),
        }
    }
    if a.tso {
        if !a.mrg {
            return Err("--tso needs --mrg on (Linux receives GSO frames in mergeable buffers)".into());
        }
        a.size = TSO_FRAME;
    } else if !(60..=1514).contains(&a.size) {
        return Err(format!("--size {} out of 60..=1514", a.size));
    }
    Ok(a)
}

/// An Ethernet frame of `len` bytes from `src` to `dst` (experimental ethertype).
fn eth(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.extend((14..len).map(|i| i as u8));
    f
}

/// A `--tso` frame from `src` to `dst` and its virtio-net header as Linux's `virtio_net` writes
/// it for a TSO packet: `NEEDS_CSUM` with the TCP checksum at 34 + 16, `GSO_TCPV4`,
/// `hdr_len` 66, `gso_size` [`TSO_MSS`]; the checksum field holds the pseudo-header sum (not
/// computed here: nothing on the way checks it).
fn tso_frame(dst: [u8; 6], src: [u8; 6]) -> ([u8; 12], Vec<u8>) {
    let ip_len = (TSO_FRAME - 14) as u16;
    let mut f = Vec::with_capacity(TSO_FRAME);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    // IPv4: no options, DF, TTL 64, TCP, 10.0.0.1 -> 10.0.0.2.
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&ip_len.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    // TCP, 32 bytes (data offset 8): ACK|PSH, then NOP NOP and a timestamp option.
    f.extend_from_slice(&[0x13, 0x88, 0x9c, 0x40, 0, 0, 0, 1, 0, 0, 0, 1, 0x80, 0x18, 0x01, 0xf5, 0, 0, 0, 0]);
    f.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    assert_eq!(f.len(), 66);
    f.extend((66..TSO_FRAME).map(|i| (i * 7) as u8));
    let mut h = [0u8; 12];
    h[0] = 1; // NEEDS_CSUM
    h[1] = 1; // GSO_TCPV4
    h[2..4].copy_from_slice(&66u16.to_le_bytes());
    h[4..6].copy_from_slice(&TSO_MSS.to_le_bytes());
    h[6..8].copy_from_slice(&34u16.to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes());
    (h, f)
}

/// QEMU's start sequence (the front-end module's `qemu_start`), with the dirty log when `log`:
/// `LOG_SHMFD`, a log base covering guest memory, `LOG_ALL`, and `VRING_F_LOG` with each
/// ring's used-ring address as `log_guest_addr`. Returns the dirty log's memfd (kept open).
fn start(fe: &Frontend, features: u64, log: bool) -> Option<std::os::fd::OwnedFd> {
    let offered = fe.get_u64(GET_FEATURES);
    let pf = fe.get_u64(GET_PROTOCOL_FEATURES);
    let mut want = pf & (PF_MQ | PF_REPLY_ACK | PF_CONFIG | PF_STATUS);
    if log {
        assert!(pf & PF_LOG_SHMFD != 0, "LOG_SHMFD offered");
        want |= PF_LOG_SHMFD;
    }
    fe.send(SET_PROTOCOL_FEATURES, 0, &u64p(want), &[]);
    fe.send(SET_OWNER, 0, &[], &[]);
    for i in 0..fe.queues.len() {
        fe.send(SET_VRING_CALL, 0, &u64p(i as u64), &[fe.queues[i].call.as_raw_fd()]);
        fe.send(SET_VRING_ENABLE, 0, &state(i as u32, 1), &[]);
    }
    let mut acked = (features & offered) | F_PROTOCOL_FEATURES;
    if log {
        assert!(offered & F_LOG_ALL != 0, "LOG_ALL offered");
        acked |= F_LOG_ALL;
    }
    fe.send(SET_FEATURES, 0, &u64p(acked), &[]);
    let mt = fe.mem_table_payload();
    assert_eq!(fe.acked(SET_MEM_TABLE, &mt, &[fe.ram.fd.as_raw_fd()]), 0, "SET_MEM_TABLE acked");
    let log_fd = log.then(|| {
        // One bit per 4 KiB page of guest memory (GPA + len), rounded up.
        let bytes = (GPA as usize + fe.ram.len).div_ceil(4096 * 8).next_multiple_of(4096);
        let fd = memfd("switchbench-log", bytes);
        let mut p = (bytes as u64).to_ne_bytes().to_vec();
        p.extend_from_slice(&0u64.to_ne_bytes());
        fe.send(SET_LOG_BASE, 0, &p, &[fd.as_raw_fd()]);
        let (req, _, _) = fe.reply();
        assert_eq!(req, SET_LOG_BASE, "SET_LOG_BASE answered");
        fd
    });
    for i in 0..fe.queues.len() {
        if log {
            let c = fe.queues[i].cfg;
            let size = c.size as u32;
            fe.send(SET_VRING_NUM, 0, &state(i as u32, size), &[]);
            fe.send(SET_VRING_BASE, 0, &state(i as u32, 0), &[]);
            let addr = vring_addr(
                i as u32,
                VRING_F_LOG,
                fe.ram.uaddr(c.desc_table),
                fe.ram.uaddr(c.used_ring),
                fe.ram.uaddr(c.avail_ring),
                c.used_ring,
            );
            fe.send(SET_VRING_ADDR, 0, &addr, &[]);
            fe.send(SET_VRING_KICK, 0, &u64p(i as u64), &[fe.queues[i].kick.as_raw_fd()]);
            fe.send(SET_VRING_CALL, 0, &u64p(i as u64), &[fe.queues[i].call.as_raw_fd()]);
        } else {
            fe.start_queue(i);
        }
    }
    log_fd
}

fn wait_ready(dev: &NetDevice) {
    let t0 = Instant::now();
    while !(dev.queue_ready(0) && dev.queue_ready(1)) {
        assert!(t0.elapsed() < Duration::from_secs(5), "{}: rings not started", dev.name());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A guest's side of the benchmark: sends from its TX ring, posts and reclaims RX buffers.
struct Guest<'a> {
    rx: TestDriver<'a, RegionTable<1>>,
    tx: TestDriver<'a, RegionTable<1>>,
    rx_seen: u16,
    tx_seen: u16,
}

impl<'a> Guest<'a> {
    fn new(fe: &'a Frontend) -> Guest<'a> {
        let mut d = fe.drivers().into_iter();
        let (rx, tx) = (d.next().unwrap(), d.next().unwrap());
        Guest { rx, tx, rx_seen: 0, tx_seen: 0 }
    }

    /// Makes `n` TX chains of one descriptor (header + frame, as Linux and DPDK send) and
    /// publishes them with one index update. The data area is reused from its start: every
    /// earlier chain was completed (checked by `reclaim`).
    fn send(&mut self, n: u16, hdr: &[u8], frame: &[u8]) {
        let mut pkt = hdr.to_vec();
        pkt.extend_from_slice(frame);
        self.tx.reset_alloc();
        for _ in 0..n {
            let head = self.tx.build_chain(&[Buf::readable(&pkt)], &mut []);
            self.tx.stage(head);
        }
        self.tx.kick();
    }

    /// Makes `n` TX chains as Linux sends a TSO packet (`virtio_net`'s `xmit_skb` with the
    /// header pushed in front of the linear part, `INDIRECT_DESC`): one indirect table whose
    /// first buffer holds the virtio-net header and the frame's 66 bytes of headers, then the
    /// payload in 4 KiB page fragments (16 for a [`TSO_FRAME`]: 17 pieces, Linux's
    /// `MAX_SKB_FRAGS` + 1 at most).
    fn send_tso(&mut self, n: u16, hdr: &[u8], frame: &[u8]) {
        let mut first = hdr.to_vec();
        first.extend_from_slice(&frame[..66]);
        let bufs: Vec<Buf<'_>> =
            std::iter::once(Buf::readable(&first)).chain(frame[66..].chunks(4096).map(Buf::readable)).collect();
        self.tx.reset_alloc();
        for _ in 0..n {
            let head = self.tx.build_indirect_chain(&bufs);
            self.tx.stage(head);
        }
        self.tx.kick();
    }

    /// Posts `n` receive buffers of `len` bytes (one descriptor each).
    fn post(&mut self, n: u16, len: u32) -> Vec<u64> {
        self.rx.reset_alloc();
        let mut addrs = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let mut a = [0u64];
            let head = self.rx.build_chain(&[Buf::writable(len)], &mut a);
            self.rx.stage(head);
            addrs.push(a[0]);
        }
        self.rx.kick();
        addrs
    }

    /// Checks that `tx` and `rx` chains were completed since the last call.
    fn reclaim(&mut self, tx: u16, rx: u16) -> Result<(), String> {
        let (t, r) = (self.tx.used_idx(), self.rx.used_idx());
        if t.wrapping_sub(self.tx_seen) != tx || r.wrapping_sub(self.rx_seen) != rx {
            return Err(format!(
                "completed {} TX and {} RX chains, expected {tx} and {rx}",
                t.wrapping_sub(self.tx_seen),
                r.wrapping_sub(self.rx_seen)
            ));
        }
        self.tx_seen = t;
        self.rx_seen = r;
        Ok(())
    }
}

/// One data-plane pass: what callgrind counts (`--toggle-collect`).
#[inline(never)]
fn step(dps: &mut [Dataplane]) -> usize {
    dps.iter_mut().map(|dp| dp.poll_once()).sum()
}

fn run(a: &Args) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("switchbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = bench(a, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn bench(a: &Args, dir: &Path) -> Result<(), String> {
    let mut backend = Backend::new().map_err(|e| e.to_string())?;
    let mut ports = Vec::new();
    let mut devs = Vec::new();
    let socks = [dir.join("a.sock"), dir.join("b.sock")];
    for (i, path) in socks.iter().enumerate() {
        let spec = PortSpec {
            path: path.clone(),
            client: false,
            backend: PortBackend::Switch,
            queues: 1,
            mac: None,
            mtu: 1500,
            mrg: a.mrg,
            packed: false,
            offload: true,
        };
        let dev = backend
            .add_device(
                &path.display().to_string(),
                device_config(&spec, i + 1),
                SocketSpec::Server { path: path.clone(), mode: None },
                Box::new(NoHandler),
            )
            .map_err(|e| e.to_string())?;
        devs.push(dev.clone());
        ports.push(Port::Vhost {
            dev,
            backend: PortBackend::Switch,
            tap: Vec::new(),
            announce: Arc::new(Announcements::default()),
            mtu: spec.mtu,
        });
    }
    let handle = backend.handle();
    let control = std::thread::spawn(move || backend.run());

    let features = FEATURES | if a.mrg { F_MRG_RXBUF } else { 0 } | if a.tso { F_TSO } else { 0 };
    // With --tso, B posts 16 buffers per frame: 512 a burst.
    let ring = if a.tso { 1024 } else { 256 };
    let (fa, fb) = (Frontend::connect(&socks[0], 2, ring), Frontend::connect(&socks[1], 2, ring));
    let (mut ga, mut gb) = (Guest::new(&fa), Guest::new(&fb));
    let _log_a = start(&fa, features, a.log);
    let _log_b = start(&fb, features, a.log);
    wait_ready(&devs[0]);
    wait_ready(&devs[1]);
    // Ports are assigned to the threads round-robin: with two, A's pair to thread 0 and B's
    // to thread 1.
    let fabric = Fabric::new(a.threads, &[]);
    for p in ports {
        fabric.add(p);
    }
    let mut dp: Vec<Dataplane> = (0..a.threads).map(|i| Dataplane::worker(Arc::clone(&fabric), i, true)).collect();

    // B speaks first, so that the switch knows where MAC_B is (A's frames are unicast).
    // VERSION_1: the 12-byte header with or without MRG_RXBUF (§5.1.6).
    let hdr = &[0u8; 12][..];
    ga.post(1, 2048);
    gb.send(1, hdr, &eth(MAC_A, MAC_B, 60));
    step(&mut dp);
    ga.reclaim(0, 1)?;
    gb.reclaim(1, 0)?;

    let (tx_hdr, frame) = if a.tso { tso_frame(MAC_B, MAC_A) } else { ([0u8; 12], eth(MAC_B, MAC_A, a.size)) };
    // Receive buffers per frame: one, or with --tso as many 4 KiB ones as header and frame fill.
    let (per_frame, buf_len) =
        if a.tso { ((12 + frame.len()).div_ceil(TSO_RX_BUF as usize) as u16, TSO_RX_BUF) } else { (1, 2048) };
    let mut moved = 0usize;
    let mut last = Vec::new();
    // Wall-clock time in the data plane's passes only (the guests' side excluded).
    let mut in_steps = Duration::ZERO;
    for _ in 0..a.steps {
        last = gb.post(BURST * per_frame, buf_len);
        if a.tso {
            ga.send_tso(BURST, &tx_hdr, &frame);
        } else {
            ga.send(BURST, &tx_hdr, &frame);
        }
        let t0 = Instant::now();
        moved += step(&mut dp);
        in_steps += t0.elapsed();
        ga.reclaim(BURST, 0)?;
        gb.reclaim(0, BURST * per_frame)?;
    }
    // B got A's frame in every frame's buffers of the last burst, behind a header with
    // num_buffers set (and with --tso, the GSO header passed through: B negotiated it).
    let last_addrs = last.clone();
    for bufs in last.chunks(per_frame as usize) {
        let mut got = Vec::with_capacity(bufs.len() * buf_len as usize);
        for &addr in bufs {
            let mut b = vec![0u8; buf_len as usize];
            gb.rx.read(addr, &mut b);
            got.extend_from_slice(&b);
        }
        let want_hdr = [tx_hdr[0], tx_hdr[1], tx_hdr[2], tx_hdr[3], tx_hdr[4], tx_hdr[5]];
        if got[12..12 + frame.len()] != frame[..]
            || got[10..12] != per_frame.to_le_bytes()
            || (a.tso && got[..6] != want_hdr)
        {
            return Err(format!("B's buffers at {:#x} do not hold A's frame", bufs[0]));
        }
    }
    // With the log: the pages of B's buffers are marked (the back-end wrote them).
    if let Some(fd) = &_log_b {
        for &addr in &last_addrs {
            let page = addr / 4096;
            let mut byte = [0u8];
            // SAFETY: reads one byte of our own memfd into a local buffer.
            let n = unsafe { libc::pread(fd.as_raw_fd(), byte.as_mut_ptr().cast(), 1, (page / 8) as libc::off_t) };
            if n != 1 || byte[0] & (1 << (page % 8)) == 0 {
                return Err(format!("the dirty log does not mark B's buffer at {addr:#x}"));
            }
        }
    }
    let expected = a.steps as usize * BURST as usize;
    if moved != expected {
        return Err(format!("moved {moved} frames, expected {expected}"));
    }
    println!(
        "frames={moved} steps={} size={} tso={} mrg={} log={} threads={} ns_per_frame={:.1}",
        a.steps,
        a.size,
        a.tso,
        a.mrg,
        a.log,
        a.threads,
        in_steps.as_nanos() as f64 / moved.max(1) as f64
    );
    // Front-ends hang up before the control loop stops (the guests' drivers borrow them).
    drop(dp);
    let _ = (ga, gb);
    drop((fa, fb));
    handle.shutdown();
    control.join().map_err(|_| "control loop panicked".to_string())?.map_err(|e| e.to_string())?;
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "switchbench: {e}\nusage: switchbench --size BYTES|--tso [--mrg on|off] [--log] [--steps N] [--threads 1|2]"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("switchbench: {e}");
        std::process::exit(1);
    }
}
