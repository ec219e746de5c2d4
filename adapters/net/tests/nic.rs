//! The NIC uplink port (`virtq_net::nic`) on a veth pair the test creates between two network
//! namespaces of its own: the port's end in one (`A`), the peer in the other (`B`), where the
//! test's own AF_PACKET socket sends and receives. Both modes, AF_XDP and AF_PACKET: frames
//! byte-exact both ways, GSO from the kernel stack with its virtio-net header, the interface
//! left as found on drop and on SIGKILL, and `auto` next to someone else's XDP program.
//!
//! Needs root (namespaces, XDP, raw sockets). Outside CI an unprivileged run skips; CI runs as
//! root and never skips.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use virtq_net::nic::{parse_nic, Nic, NicMode, NIC_HDR_LEN};

mod netns;
use netns::{in_netns, run, veth, Veth};

fn output(cmd: &str) -> String {
    let o = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(o.status.success(), "{cmd}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn open_nic(v: &Veth, opts: &str) -> std::io::Result<Nic> {
    let spec = parse_nic(&format!("{}{opts}", v.a)).unwrap();
    in_netns(&v.ns_a, move || Nic::open(&spec))
}

/// The test's own raw socket on `b` (in `ns_b`), blind to what it sends itself.
fn raw_socket(v: &Veth) -> OwnedFd {
    let b = v.b.clone();
    in_netns(&v.ns_b, move || {
        // SAFETY: plain syscalls on a fresh socket; the fd is owned at once.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(fd);
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_IGNORE_OUTGOING,
                (&one as *const i32).cast(),
                4,
            );
            let name = std::ffi::CString::new(b).unwrap();
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of_val(&sll) as u32,
            );
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            fd
        }
    })
}

fn raw_send(fd: &OwnedFd, frame: &[u8]) {
    // SAFETY: sends from a live buffer.
    let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(n, frame.len() as isize, "send: {}", std::io::Error::last_os_error());
}

/// The next frame of the test's ethertype the raw socket receives within `timeout`.
fn raw_recv(fd: &OwnedFd, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 70000];
    while Instant::now() < deadline {
        // SAFETY: receives into a live buffer, without waiting.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            thread::sleep(Duration::from_millis(1));
            continue;
        }
        let f = &buf[..n as usize];
        if is_ours(f) {
            return Some(f.to_vec());
        }
    }
    None
}

/// IEEE 802 local experimental ethertype: nothing else on the link uses it.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Whether `f` is one of the test's frames (its ethertype, behind a VLAN tag or not, or a
/// UDP datagram to [`UDP_PORT`]), not something else the kernel sent.
fn is_ours(f: &[u8]) -> bool {
    (f.len() >= 14 && f[12..14] == ETHERTYPE)
        || (f.len() >= 18 && f[12..14] == [0x81, 0] && f[16..18] == ETHERTYPE)
        || (f.len() >= 42 && f[12..14] == [8, 0] && f[23] == 17 && f[36..38] == UDP_PORT.to_be_bytes())
}

/// The destination port of [`udp_frame`]s.
const UDP_PORT: u16 = 9;

/// An IPv4/UDP frame for a guest's MAC from source port `sport` (flows differ by port, so
/// they spread over queues).
fn udp_frame(sport: u16) -> Vec<u8> {
    let mut f = GUEST_MAC.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xbb, 0x08, 0x00]);
    let payload = 32u16;
    f.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 192, 0, 2, 1, 192, 0, 2, 99]);
    f[16..18].copy_from_slice(&(20 + 8 + payload).to_be_bytes());
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&UDP_PORT.to_be_bytes());
    f.extend_from_slice(&(8 + payload).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend((0..payload).map(|i| i as u8));
    f
}

/// `frame` with an 802.1Q tag (priority 1, VLAN 100) after the addresses.
fn vlan_tagged(f: &[u8]) -> Vec<u8> {
    let mut t = f[..12].to_vec();
    t.extend_from_slice(&[0x81, 0x00, 0x20, 0x64]);
    t.extend_from_slice(&f[12..]);
    t
}

/// A frame of `len` bytes for a guest's MAC (not the interface's: the port is promiscuous),
/// its payload numbered by `seq`.
fn frame(len: usize, seq: u8) -> Vec<u8> {
    let mut f = GUEST_MAC.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xbb]);
    f.extend_from_slice(&ETHERTYPE);
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seq)));
    f
}

/// Polls every queue of the port until `want` frames of the test's ethertype arrived or 3 s
/// passed; returns them with their headers.
fn collect(nic: &Nic, want: usize) -> Vec<([u8; NIC_HDR_LEN], Vec<u8>)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while got.len() < want && Instant::now() < deadline {
        let mut n = 0;
        for q in nic.queues() {
            n += q.recv_burst(32, |h, f| {
                if is_ours(f) {
                    got.push((*h, f.to_vec()));
                }
            });
        }
        if n == 0 {
            thread::sleep(Duration::from_millis(1));
        }
    }
    got
}

/// Frames sent into the interface come out of `recv_burst` byte-exact, in order, with an
/// all-zero header; frames given to `send_burst` reach the peer byte-exact.
fn frames_both_ways(v: &Veth, opts: &str, sizes: &[usize], want: &str) {
    let nic = open_nic(v, opts).expect("open");
    assert_eq!(nic.mode().to_string().split(' ').next(), Some(want), "mode {}", nic.mode());
    eprintln!("{}: {}", nic.name(), nic.mode());
    let raw = raw_socket(v);
    let mut sent: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &len)| frame(len, i as u8)).collect();
    // Tagged: the kernel takes the tag out of the frame before AF_PACKET sees it, into the
    // ring header; the port puts it back.
    sent.push(vlan_tagged(&frame(200, 50)));
    for f in &sent {
        raw_send(&raw, f);
    }
    let got = collect(&nic, sent.len());
    assert_eq!(got.len(), sent.len(), "frames received");
    for ((h, f), s) in got.iter().zip(&sent) {
        assert_eq!(h, &[0u8; NIC_HDR_LEN], "plain frame, zero header");
        assert!(f == s, "{}-byte frame received as {} bytes, or changed", s.len(), f.len());
    }
    let rx: u64 = nic.queues().iter().map(|q| q.counters().rx.load(std::sync::atomic::Ordering::Relaxed)).sum();
    assert!(rx >= sent.len() as u64, "rx counter");

    let out: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &len)| frame(len, 100 + i as u8)).collect();
    let q = &nic.queues()[0];
    let s = q.send_burst(out.iter().map(|f| &f[..]));
    assert_eq!((s.sent, s.dropped, s.full), (out.len() as u64, 0, false));
    for f in &out {
        let r = raw_recv(&raw, Duration::from_secs(3)).unwrap_or_else(|| panic!("{}-byte frame not received", f.len()));
        assert!(&r == f, "{}-byte frame arrived as {} bytes, or changed", f.len(), r.len());
    }
    assert_eq!(q.counters().tx.load(std::sync::atomic::Ordering::Relaxed), out.len() as u64);
}

#[test]
fn af_xdp_carries_frames_both_ways_byte_exact() {
    let Some(v) = veth("x", 1500) else { return };
    frames_both_ways(&v, ",mode=xdp", &[60, 1514, 60, 1000], "af_xdp");
}

#[test]
fn af_packet_carries_frames_both_ways_byte_exact_jumbo_included() {
    let Some(v) = veth("p", 9000) else { return };
    frames_both_ways(&v, ",mode=packet", &[60, 1514, 9014, 60], "af_packet");
}

/// A frame refused on its own (larger than the interface's MTU: `EMSGSIZE` for AF_PACKET,
/// larger than a UMEM frame for AF_XDP) is dropped and counted, but does not make the queue
/// "full": the frames after it are sent, and a sender segmenting for this port goes on.
#[test]
fn a_frame_refused_on_its_own_is_not_a_full_queue() {
    for (tag, opts, big) in [("rp", ",mode=packet", 1514 + 200), ("rx", ",mode=xdp", 4096 + 100)] {
        let Some(v) = veth(tag, 1500) else { return };
        let raw = raw_socket(&v);
        let nic = open_nic(&v, opts).unwrap_or_else(|e| panic!("{opts}: {e}"));
        let out = [frame(60, 1), frame(big, 2), frame(60, 3)];
        let s = nic.queues()[0].send_burst(out.iter().map(|f| &f[..]));
        assert_eq!((s.sent, s.dropped, s.full), (2, 1, false), "{opts}: {s:?}");
        for seq in [1u8, 3] {
            let want = frame(60, seq);
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let r = raw_recv(&raw, Duration::from_secs(3))
                    .unwrap_or_else(|| panic!("{opts}: frame {seq} not received"));
                if r == want {
                    break;
                }
                assert!(Instant::now() < deadline, "{opts}: frame {seq} not received");
            }
        }
    }
}

/// `ip -d link show` of the port's interface: shows `xdp`/`xdpgeneric` and the promiscuity
/// count.
fn link_state(v: &Veth) -> String {
    output(&format!("ip -n {} -d link show dev {}", v.ns_a, v.a))
}

fn promiscuity(state: &str) -> u32 {
    let w: Vec<&str> = state.split_whitespace().collect();
    let i = w.iter().position(|&x| x == "promiscuity").expect("promiscuity in ip -d link");
    w[i + 1].parse().unwrap()
}

fn has_xdp(state: &str) -> bool {
    state.contains("prog/xdp") || state.split_whitespace().any(|w| w == "xdp" || w == "xdpgeneric")
}

/// Waits (at most 5 s) for the interface to be as `before`. Not at once: a process started by
/// a concurrent test holds copies of every fd between its fork and its exec (`O_CLOEXEC` acts
/// only at exec), so the last close of a socket or link may be that child's, a little later.
fn wait_as_found(v: &Veth, before: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while link_state(v) != before {
        assert!(Instant::now() < deadline, "{what}: not left as found: {}", link_state(v));
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_interface_is_left_as_found_on_drop() {
    let Some(v) = veth("d", 1500) else { return };
    let before = link_state(&v);
    assert!(!has_xdp(&before) && promiscuity(&before) == 0, "{before}");
    for opts in [",mode=xdp", ",mode=packet"] {
        let nic = open_nic(&v, opts).expect("open");
        let during = link_state(&v);
        assert_eq!(promiscuity(&during), 1, "{opts}: promiscuous while open: {during}");
        assert_eq!(has_xdp(&during), opts.contains("xdp"), "{opts}: {during}");
        drop(nic);
        wait_as_found(&v, &before, opts);
    }
}

/// Not a test of its own: the child process of `the_interface_is_left_as_found_on_sigkill`
/// (it does nothing unless `VIRTQ_NIC_HOLD` is set). Opens the port and waits to be killed.
#[test]
fn sigkill_helper() {
    let Ok(what) = std::env::var("VIRTQ_NIC_HOLD") else { return };
    let (ns, spec) = what.split_once(' ').unwrap();
    let spec = parse_nic(spec).unwrap();
    let nic = in_netns(ns, move || Nic::open(&spec).expect("open"));
    // Straight to the pipe: the test harness captures `println!` even with --nocapture in
    // some versions.
    let mut out = std::io::stdout();
    std::io::Write::write_all(&mut out, format!("holding {}\n", nic.mode()).as_bytes()).unwrap();
    std::io::Write::flush(&mut out).unwrap();
    loop {
        thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn the_interface_is_left_as_found_on_sigkill() {
    let Some(v) = veth("k", 1500) else { return };
    let before = link_state(&v);
    for mode in ["xdp", "packet"] {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "sigkill_helper", "--nocapture", "--test-threads=1"])
            .env("VIRTQ_NIC_HOLD", format!("{} {},mode={mode}", v.ns_a, v.a))
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the helper");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // The harness prints "test sigkill_helper ... " before the line, without a newline.
        // The child's output is read on a thread: a helper that hangs costs a timeout, not the
        // test run.
        thread::spawn(move || {
            let ready = BufReader::new(stdout).lines().map_while(Result::ok).find(|l| l.contains("holding "));
            let _ = tx.send(ready);
        });
        let ready = rx.recv_timeout(Duration::from_secs(30)).ok().flatten();
        let during = link_state(&v);
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        assert!(ready.is_some(), "{mode}: the helper did not open the port");
        assert_eq!(promiscuity(&during), 1, "{mode}: {during}");
        assert_eq!(has_xdp(&during), mode == "xdp", "{mode}: {during}");
        // The kernel closes the fds of a dead process at exit; the link goes with the last one.
        wait_as_found(&v, &before, mode);
    }
}

#[test]
fn auto_falls_back_to_af_packet_next_to_another_xdp_program() {
    let Some(v) = veth("o", 1500) else { return };
    let first = open_nic(&v, ",mode=xdp").expect("the first port takes XDP");
    assert!(matches!(first.mode(), NicMode::Xdp { .. }));
    let second = open_nic(&v, ",mode=auto").expect("auto opens next to it");
    assert_eq!(second.mode(), NicMode::Packet);
    assert_eq!(second.mode().to_string(), "af_packet (TPACKET_V3)");
    let held = link_state(&v);
    assert!(has_xdp(&held) && promiscuity(&held) == 2, "{held}");
    let e = open_nic(&v, ",mode=xdp").expect_err("mode=xdp must not replace the program");
    assert!(e.to_string().contains("already has an XDP program"), "{e}");
    drop(second);
    // The first port's program is still there, and still works.
    assert!(has_xdp(&link_state(&v)));
    let raw = raw_socket(&v);
    raw_send(&raw, &frame(60, 1));
    assert_eq!(collect(&first, 1).len(), 1);
}

/// An MTU whose frames an AF_XDP frame cannot hold: `xdp` refuses with the reason, `auto`
/// takes AF_PACKET. A later MTU change is followed.
#[test]
fn jumbo_mtu_is_af_packet_territory() {
    let Some(v) = veth("j", 9000) else { return };
    let e = open_nic(&v, ",mode=xdp").expect_err("MTU 9000 on AF_XDP");
    assert!(e.to_string().contains("MTU 9000"), "{e}");
    let nic = open_nic(&v, "").expect("auto");
    assert_eq!(nic.mode(), NicMode::Packet);
    assert!(!has_xdp(&link_state(&v)));
    // A later `ip link set mtu` is followed: the switch's MTU check uses the new one.
    assert_eq!((nic.mtu(), nic.refresh_mtu()), (9000, None));
    assert!(run(&format!("ip -n {} link set dev {} mtu 1500", v.ns_a, v.a)));
    assert_eq!((nic.refresh_mtu(), nic.mtu()), (Some((9000, 1500)), 1500));
    assert_eq!(nic.refresh_mtu(), None, "unchanged since");
}

/// A TCP stream from the peer's kernel (the veth has TSO on, so the stack hands it 64 KiB GSO
/// skbs) reaches the AF_PACKET port as GSO frames larger than the MTU, each with a consistent
/// virtio-net header: TCPv4 GSO, a segment size, a partial checksum at the TCP header. Then the
/// same for a UDP GSO send (`UDP_SEGMENT`).
#[test]
fn af_packet_receives_gso_frames_from_the_stack_with_their_header() {
    let Some(v) = veth("g", 1500) else { return };
    assert!(run(&format!("ip -n {} addr add 192.0.2.2/24 dev {}", v.ns_a, v.a)));
    assert!(run(&format!("ip -n {} addr add 192.0.2.1/24 dev {}", v.ns_b, v.b)));
    let nic = open_nic(&v, ",mode=packet").expect("open");
    let listener = in_netns(&v.ns_a, || std::net::TcpListener::bind("192.0.2.2:0").unwrap());
    let port = listener.local_addr().unwrap().port();
    let reader = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        std::io::copy(&mut s, &mut std::io::sink()).unwrap()
    });
    let mut c = in_netns(&v.ns_b, move || std::net::TcpStream::connect(("192.0.2.2", port)).unwrap());
    std::io::Write::write_all(&mut c, &vec![0x5a; 1 << 20]).unwrap();
    drop(c);
    assert_eq!(reader.join().unwrap(), 1 << 20);
    let mut gso = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && gso == 0 {
        for q in nic.queues() {
            q.recv_burst(64, |h, f| {
                if h[1] == 0 {
                    assert!(f.len() <= 1514, "a {}-byte frame without GSO type: {h:?}", f.len());
                    return;
                }
                assert_eq!(h[1], 1, "VIRTIO_NET_HDR_GSO_TCPV4");
                assert!(f.len() > 1514, "a GSO frame is larger than the MTU: {}", f.len());
                assert_eq!(&f[12..14], &[8, 0], "IPv4");
                assert_eq!(f[23], 6, "TCP");
                let (hdr_len, gso_size) = (u16::from_le_bytes([h[2], h[3]]), u16::from_le_bytes([h[4], h[5]]));
                let (csum_start, csum_offset) = (u16::from_le_bytes([h[6], h[7]]), u16::from_le_bytes([h[8], h[9]]));
                assert_eq!(h[0] & 1, 1, "VIRTIO_NET_HDR_F_NEEDS_CSUM");
                assert_eq!((csum_start, csum_offset), (34, 16), "checksum at the TCP header");
                assert!(gso_size > 0 && gso_size <= 1460, "gso_size {gso_size}");
                assert!(hdr_len as usize >= 54 && (hdr_len as usize) < f.len(), "hdr_len {hdr_len}");
                assert_eq!(&h[10..], &[0, 0], "num_buffers 0");
                gso += 1;
            });
        }
        thread::sleep(Duration::from_millis(1));
    }
    assert!(gso > 0, "no GSO frame arrived");

    // UDP GSO (UDP_SEGMENT): one 8000-byte send in 1000-byte datagrams arrives as one frame,
    // VIRTIO_NET_HDR_GSO_UDP_L4.
    let udp = in_netns(&v.ns_b, || std::net::UdpSocket::bind("192.0.2.1:0").unwrap());
    let seg: libc::c_int = 1000;
    // SAFETY: setsockopt of an int on our socket (UDP_SEGMENT = 103, SOL_UDP = 17).
    let rc = unsafe { libc::setsockopt(udp.as_raw_fd(), libc::SOL_UDP, 103, (&seg as *const i32).cast(), 4) };
    assert_eq!(rc, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
    udp.send_to(&[0x77; 8000], "192.0.2.2:9").unwrap();
    let mut found = None;
    let deadline = Instant::now() + Duration::from_secs(3);
    while found.is_none() && Instant::now() < deadline {
        for q in nic.queues() {
            q.recv_burst(64, |h, f| {
                if f.len() > 42 && f[12..14] == [8, 0] && f[23] == 17 && f[36..38] == [0, 9] {
                    found = Some((*h, f.len()));
                }
            });
        }
        thread::sleep(Duration::from_millis(1));
    }
    let (h, len) = found.expect("the UDP GSO frame arrived");
    assert_eq!(h[1], 5, "VIRTIO_NET_HDR_GSO_UDP_L4: {h:?}");
    assert_eq!(len, 14 + 20 + 8 + 8000, "one frame for the whole send");
    assert_eq!(u16::from_le_bytes([h[4], h[5]]), 1000, "gso_size");
    assert_eq!(
        (h[0] & 1, u16::from_le_bytes([h[6], h[7]]), u16::from_le_bytes([h[8], h[9]])),
        (1, 34, 6),
        "partial UDP checksum"
    );
}

/// Two queues on a two-queue veth (the default: every queue of the interface), for each mode:
/// flows spread over both queues (AF_XDP: the queue the peer's hash picked; AF_PACKET: a
/// fanout group), and every frame arrives once.
#[test]
fn both_queues_of_a_multiqueue_interface_receive() {
    let Some(v) = veth("m", 1500) else { return };
    // Recreate the pair with two queues a side.
    assert!(run(&format!("ip -n {} link del {}", v.ns_a, v.a)));
    assert!(run(&format!(
        "ip link add {} numtxqueues 2 numrxqueues 2 netns {} type veth peer name {} numtxqueues 2 numrxqueues 2 netns {}",
        v.a, v.ns_a, v.b, v.ns_b
    )));
    assert!(run(&format!("ip -n {} link set {} up && ip -n {} link set {} up", v.ns_a, v.a, v.ns_b, v.b)));
    for (opts, want) in [(",mode=xdp", "af_xdp"), (",mode=packet", "af_packet")] {
        let nic = open_nic(&v, opts).expect("open");
        assert_eq!(nic.mode().to_string().split(' ').next(), Some(want));
        assert_eq!(nic.queues().len(), 2, "{opts}: every queue of the interface by default");
        let raw = raw_socket(&v);
        let sent: Vec<Vec<u8>> = (0..64).map(|i| udp_frame(1000 + i)).collect();
        for f in &sent {
            raw_send(&raw, f);
        }
        let mut got = Vec::new();
        let mut per_queue = [0usize; 2];
        let deadline = Instant::now() + Duration::from_secs(3);
        while got.len() < sent.len() && Instant::now() < deadline {
            for (i, q) in nic.queues().iter().enumerate() {
                q.recv_burst(32, |_, f| {
                    if is_ours(f) {
                        per_queue[i] += 1;
                        got.push(f.to_vec());
                    }
                });
            }
            thread::sleep(Duration::from_millis(1));
        }
        got.sort();
        let mut want_frames = sent.clone();
        want_frames.sort();
        assert!(got == want_frames, "{opts}: {} of {} frames, per queue {per_queue:?}", got.len(), sent.len());
        assert!(per_queue.iter().all(|&n| n > 0), "{opts}: 64 flows on one queue: {per_queue:?}");
    }
}

/// Not a check, a measurement (`cargo test --release -p virtq-net --test nic -- --ignored
/// --nocapture`): 60-byte frames from a second port on the peer end, sent in bursts of 32 by
/// one thread, received in bursts of 64 by another, for each mode, over 2 s.
#[test]
#[ignore]
fn throughput() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    for mode in ["xdp", "packet"] {
        let Some(v) = veth("t", 1500) else { return };
        let rx = open_nic(&v, &format!(",mode={mode}")).expect("open");
        let spec = parse_nic(&format!("{},mode={mode}", v.b)).unwrap();
        let tx = Arc::new(in_netns(&v.ns_b, move || Nic::open(&spec)).expect("open the peer"));
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let (tx, stop) = (tx.clone(), stop.clone());
            thread::spawn(move || {
                let f = frame(60, 0);
                let burst = vec![&f[..]; 32];
                let (mut sent, mut dropped) = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    let s = tx.queues()[0].send_burst(burst.iter().copied());
                    (sent, dropped) = (sent + s.sent, dropped + s.dropped);
                }
                (sent, dropped)
            })
        };
        thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        let mut got = 0u64;
        while t.elapsed() < Duration::from_secs(2) {
            got += rx.queues()[0].recv_burst(64, |_, _| {}) as u64;
        }
        let secs = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let (sent, dropped) = sender.join().unwrap();
        eprintln!(
            "{} -> {}: received {:.2} Mframes/s through recv_burst (sender: {:.2} Mframes/s, {dropped} dropped; receiving queue: {} dropped by the kernel)",
            tx.mode(),
            rx.mode(),
            got as f64 / secs / 1e6,
            sent as f64 / (secs + 0.2) / 1e6,
            rx.queues()[0].kernel_drops()
        );
        eprintln!("{}", output(&format!("ip -n {} -s link show dev {}", v.ns_a, v.a)));
    }
}
