//! Device lifecycle against the in-tree front-end over real sockets, memfd memory and
//! eventfds: QEMU's and DPDK's message orders, frames both ways, GET_VRING_BASE, two queue
//! pairs, the pairs a guest can receive on, reconnect in both socket roles.

mod frontend;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use std::thread;
use std::time::Duration;

use frontend::*;
use virtq::net::Gather;
use virtq::testing::Buf;
use virtq::VirtioFeatures;
use virtq_vhost_user::backend::{Backend, BackendHandle, DeviceHandler, NoHandler, SocketSpec};
use virtq_vhost_user::connection::Reconnect;
use virtq_vhost_user::device::DeviceConfig;
use virtq_vhost_user::net::{
    parse_header, NetDevice, NetEvent, NetModel, TxBurst, TxFrame, COPY_LIMIT, MAX_TX_FRAME, TX_HEAD, TX_SNAPSHOT,
};

fn sock_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("virtq-vu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.sock"))
}

struct Running {
    handle: BackendHandle,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// One virtio-net device to serve: name, configuration, socket, callbacks.
type NetSpec<'a> = (&'a str, DeviceConfig<NetModel>, SocketSpec, Box<dyn DeviceHandler<NetModel>>);

fn start(devices: Vec<NetSpec<'_>>) -> (Running, Vec<NetDevice>) {
    let mut b = Backend::new().unwrap();
    let nets = devices.into_iter().map(|(n, c, s, h)| b.add_device(n, c, s, h).unwrap()).collect();
    let handle = b.handle();
    let thread = thread::spawn(move || b.run().unwrap());
    (Running { handle, thread: Some(thread) }, nets)
}

fn server(path: &std::path::Path) -> SocketSpec {
    SocketSpec::Server { path: path.to_path_buf(), mode: None }
}

const NO_MRG: u64 = NET_FEATURES & !(1 << 15);

/// Guest TX: the driver posts `count` frames (12-byte header + frame, two descriptors) on the
/// TX queue of `pair`, kicks, and the device dequeues exactly them.
fn guest_tx(g: &mut Guest<'_>, fe: &Frontend, net: &NetDevice, pair: u16, count: u8) {
    let q = 2 * pair as usize + 1;
    g.drv[q].reset_alloc();
    for i in 0..count {
        let f = frame(i, 60 + i as usize);
        g.drv[q].add_chain(&[Buf::readable(&[0u8; 12]), Buf::readable(&f)]);
    }
    fe.kick(q);
    let mut bufs: Vec<TxFrame> = (0..8).map(|_| TxFrame::with_capacity(MAX_TX_FRAME)).collect();
    let mut got = Vec::new();
    wait("TX frames", || {
        let n = net.dequeue_burst(pair, &mut bufs);
        got.extend(bufs[..n].iter().map(|b| b.frame().to_vec()));
        (got.len() >= count as usize).then_some(())
    });
    for (i, f) in got.iter().enumerate() {
        assert_eq!(f, &frame(i as u8, 60 + i), "frame {i}");
    }
    g.seen[q] = g.seen[q].wrapping_add(count as u16);
    assert_eq!(g.drv[q].used_idx(), g.seen[q], "every TX chain completed");
}

/// Guest RX: the driver posts buffers on the RX queue of `pair`; the device enqueues frames
/// and the guest reads them back (header with num_buffers, then the frame).
fn guest_rx(g: &mut Guest<'_>, fe: &Frontend, net: &NetDevice, pair: u16, count: u8, mrg: bool) {
    let q = 2 * pair as usize;
    let drv = &mut g.drv[q];
    drv.reset_alloc();
    let mut addr_of = std::collections::HashMap::new();
    let buf_len = if mrg { 512u32 } else { 1526 };
    for _ in 0..(count as usize * if mrg { 4 } else { 1 }) {
        let mut a = [0u64];
        let head = drv.build_chain(&[Buf::writable(buf_len)], &mut a);
        drv.publish(head);
        addr_of.insert(head as u32, a[0]);
    }
    let frames: Vec<Vec<u8>> = (0..count).map(|i| frame(i, 1000 + i as usize)).collect();
    let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
    assert_eq!(net.enqueue_burst(pair, &refs), count as usize);
    assert!(fe.wait_call(q, Duration::from_secs(10)), "RX interrupt");
    for (i, f) in frames.iter().enumerate() {
        let (id, len) = drv.used_elem(g.seen[q]);
        let mut first = vec![0u8; len as usize];
        drv.read(addr_of[&id], &mut first);
        let nbufs = u16::from_le_bytes([first[10], first[11]]);
        let mut data = first[12..].to_vec();
        for k in 1..nbufs {
            let (id, len) = drv.used_elem(g.seen[q].wrapping_add(k));
            let mut b = vec![0u8; len as usize];
            drv.read(addr_of[&id], &mut b);
            data.extend_from_slice(&b);
        }
        if !mrg {
            assert_eq!(nbufs, 1);
        }
        assert_eq!(&data, f, "RX frame {i}");
        g.seen[q] = g.seen[q].wrapping_add(nbufs);
    }
    assert_eq!(drv.used_idx(), g.seen[q]);
}

#[test]
fn qemu_message_order_frames_both_ways_with_and_without_mrg_rxbuf() {
    for (name, features, mrg) in [("qemu-mrg", NET_FEATURES, true), ("qemu-nomrg", NO_MRG, false)] {
        let path = sock_path(name);
        let (_run, nets) =
            start(vec![(name, DeviceConfig::new(NetModel::default()), server(&path), Box::new(NoHandler))]);
        let fe = Frontend::connect(&path, 2, 256);
        let mut g = Guest::new(&fe);
        let acked = fe.qemu_start(features);
        assert_eq!(acked & (1 << 15) != 0, mrg);
        let net = &nets[0];
        wait("rings ready", || net.queue_ready(1).then_some(()));
        guest_tx(&mut g, &fe, net, 0, 5);
        guest_rx(&mut g, &fe, net, 0, 3, mrg);
        assert_eq!(net.stats(1).packets, 5);
        assert_eq!(net.stats(0).packets, 3);
        // GET_VRING_BASE stops the ring and reports the next avail index.
        assert_eq!(fe.get_vring_base(1), 5);
        assert!(!net.queue_ready(1));
    }
}

#[test]
fn dpdk_message_order_works_and_ring_restarts_from_base() {
    let path = sock_path("dpdk");
    let (_run, nets) =
        start(vec![("dpdk", DeviceConfig::new(NetModel::default()), server(&path), Box::new(NoHandler))]);
    let fe = Frontend::connect(&path, 2, 256);
    let mut g = Guest::new(&fe);
    fe.dpdk_start(NET_FEATURES);
    let net = &nets[0];
    wait("rings ready", || net.queue_ready(1).then_some(()));
    guest_tx(&mut g, &fe, net, 0, 3);
    let base = fe.get_vring_base(1);
    assert_eq!(base, 3);
    // Restart the TX ring at the reported base: the used index is re-read from the guest.
    fe.send(SET_VRING_BASE, 0, &state(1, base), &[]);
    let kick = fe.queues[1].kick.try_clone().unwrap();
    fe.send(SET_VRING_KICK, 0, &u64p(1), &[std::os::fd::AsRawFd::as_raw_fd(&kick)]);
    wait("ring restarted", || net.queue_ready(1).then_some(()));
    guest_tx(&mut g, &fe, net, 0, 4);
}

/// Packed rings (§2.8) through vhost-user: frames both ways over several laps of an 8-entry
/// ring (the wrap counters toggle), `GET_VRING_BASE` answers both positions with their wrap
/// counters (vhost-user.rst "Vring descriptor indices for packed virtqueues"), and a ring
/// restarted from that answer carries on where it stopped, as after a migration or a
/// back-end restart. Also as DPDK sends it: only the available position (used = avail).
#[test]
fn packed_rings_carry_frames_and_resume_from_get_vring_base() {
    use virtq::testing::PackedDriver;
    use virtq::RingPosition;
    let path = sock_path("packed");
    let (_run, nets) =
        start(vec![("packed", DeviceConfig::new(NetModel::default()), server(&path), Box::new(NoHandler))]);
    let fe = Frontend::connect(&path, 2, 8);
    // The split layout's areas hold a packed ring of the same size (descriptors, then two
    // 4-byte event structures, all suitably aligned).
    let pcfg = |i: usize| fe.queues[i].cfg;
    let mut rx = PackedDriver::new(&fe.ram.table, pcfg(0), fe.queues[0].data_base, fe.queues[0].data_len);
    let mut tx = PackedDriver::new(&fe.ram.table, pcfg(1), fe.queues[1].data_base, fe.queues[1].data_len);
    let acked = fe.dpdk_start(NET_FEATURES | F_RING_PACKED);
    assert!(acked & F_RING_PACKED != 0, "packed offered and negotiated");
    let net = &nets[0];
    wait("rings ready", || (net.queue_ready(0) && net.queue_ready(1)).then_some(()));
    let mut bufs: Vec<TxFrame> = (0..8).map(|_| TxFrame::with_capacity(MAX_TX_FRAME)).collect();
    let mut round = |rx: &mut PackedDriver<'_, _>, tx: &mut PackedDriver<'_, _>, r: u8| {
        // Guest TX: 3 frames of two descriptors each (6 of the 8 slots).
        tx.reset_alloc();
        for i in 0..3u8 {
            tx.add_chain(&[Buf::readable(&[0u8; 12]), Buf::readable(&frame(r.wrapping_add(i), 60 + i as usize))]);
        }
        fe.kick(1);
        let mut got = Vec::new();
        wait("TX frames", || {
            let n = net.dequeue_burst(0, &mut bufs);
            got.extend(bufs[..n].iter().map(|b| b.frame().to_vec()));
            (got.len() >= 3).then_some(())
        });
        for (i, f) in got.iter().enumerate() {
            assert_eq!(f, &frame(r.wrapping_add(i as u8), 60 + i), "round {r} TX frame {i}");
        }
        for _ in 0..3 {
            assert!(tx.pop_used().is_some(), "round {r}: TX chain completed");
        }
        // Guest RX: 2 frames of 1000 bytes into mergeable 512-byte buffers (2 buffers each).
        rx.reset_alloc();
        let mut addr_of = std::collections::HashMap::new();
        for k in 0..4u64 {
            let id = rx.add_chain(&[Buf::writable(512)]);
            addr_of.insert(id, fe.queues[0].data_base + 512 * k);
        }
        let frames: Vec<Vec<u8>> = (0..2u8).map(|i| frame(r.wrapping_add(i), 1000 + i as usize)).collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        assert_eq!(net.enqueue_burst(0, &refs), 2, "round {r}");
        for (i, f) in frames.iter().enumerate() {
            let (id, len) = rx.pop_used().expect("used buffer");
            assert!(addr_of.contains_key(&id), "round {r}: id {id} len {len} not posted: {addr_of:?}");
            let mut first = vec![0u8; len as usize];
            rx.read(addr_of[&id], &mut first);
            let nbufs = u16::from_le_bytes([first[10], first[11]]);
            let mut data = first[12..].to_vec();
            for _ in 1..nbufs {
                let (id, len) = rx.pop_used().expect("merged buffer");
                let mut b = vec![0u8; len as usize];
                rx.read(addr_of[&id], &mut b);
                data.extend_from_slice(&b);
            }
            assert_eq!(&data, f, "round {r} RX frame {i}");
        }
        // Every buffer posted was used (2 + 2).
        assert!(rx.pop_used().is_none());
    };
    for r in 0..5 {
        round(&mut rx, &mut tx, r);
    }
    // 5 rounds of 6 TX descriptors on an 8-entry ring: slot 30 % 8 = 6 in the 4th lap (wrap
    // counter 0 after 3 toggles).
    let at = |d: &PackedDriver<'_, _>| d.next_position();
    assert_eq!(at(&tx), RingPosition { index: 6, wrap: false });
    let expect = |p: RingPosition| u32::from(p.to_bits()) | u32::from(p.to_bits()) << 16;
    let base_tx = fe.get_vring_base(1);
    assert_eq!(base_tx, expect(at(&tx)), "TX position and wrap counters");
    let base_rx = fe.get_vring_base(0);
    assert_eq!(base_rx, expect(at(&rx)), "RX position and wrap counters");
    assert!(!net.queue_ready(1));
    // Restart both rings: TX from the full answer, RX from the available half only (DPDK).
    let restart = |i: usize, base: u32| {
        fe.send(SET_VRING_BASE, 0, &state(i as u32, base), &[]);
        let kick = fe.queues[i].kick.try_clone().unwrap();
        fe.send(SET_VRING_KICK, 0, &u64p(i as u64), &[std::os::fd::AsRawFd::as_raw_fd(&kick)]);
    };
    restart(1, base_tx);
    restart(0, base_rx & 0xffff);
    wait("rings restarted", || (net.queue_ready(0) && net.queue_ready(1)).then_some(()));
    for r in 5..8 {
        round(&mut rx, &mut tx, r);
    }
    // A position outside the ring is refused when the ring would start: it stays stopped and
    // the connection stays up (the front-end asked for a reply).
    let _ = fe.get_vring_base(1);
    assert_eq!(fe.acked(SET_VRING_BASE, &state(1, 0x8009), &[]), 0, "stored, judged at start");
    let kick = std::os::fd::AsRawFd::as_raw_fd(&fe.queues[1].kick);
    assert_ne!(fe.acked(SET_VRING_KICK, &u64p(1), &[kick]), 0, "slot 9 of an 8-entry ring");
    assert!(!net.queue_ready(1));
    fe.sync();
    assert_eq!(net.stats(1).errors + net.stats(0).errors, 0);
}

/// `VIRTIO_F_IN_ORDER` (DPDK virtio-user negotiates it): guest TX chains are completed a run
/// at a time, one used element for the run's last chain with the used index moved past all
/// (§2.7.8.2), and a malformed chain in the middle is completed in its place, after the run
/// before it and before the run after it, so the driver sees completions in ring order.
#[test]
fn in_order_tx_completes_runs_at_once_and_a_bad_chain_in_place() {
    const F_IN_ORDER: u64 = 1 << 35;
    let path = sock_path("inorder");
    let (_run, nets) =
        start(vec![("inorder", DeviceConfig::new(NetModel::default()), server(&path), Box::new(NoHandler))]);
    let fe = Frontend::connect(&path, 2, 16);
    let mut g = Guest::new(&fe);
    assert!(fe.dpdk_start(NET_FEATURES | F_IN_ORDER) & F_IN_ORDER != 0, "IN_ORDER offered");
    let net = &nets[0];
    wait("rings ready", || net.queue_ready(1).then_some(()));
    let tx = &mut g.drv[1];
    // Used elements the device does not write keep this marker.
    let used = tx.config().used_ring;
    tx.write(used + 4, &[0xff; 8 * 16]);
    let mut heads = Vec::new();
    for i in 0..5u8 {
        let f = frame(i, 60);
        let head = tx.build_chain(&[Buf::readable(&[0u8; 12]), Buf::readable(&f)], &mut [0, 0]);
        if i == 2 {
            // The frame's buffer outside guest memory: a malformed chain (§2.7.5).
            let mut d = tx.read_desc(head + 1);
            d.addr = 0x7fff_0000_0000;
            tx.write_desc(head + 1, d);
        }
        tx.publish(head);
        heads.push(head);
    }
    fe.kick(1);
    let mut bufs: Vec<TxFrame> = (0..8).map(|_| TxFrame::with_capacity(MAX_TX_FRAME)).collect();
    let mut got = 0;
    wait("TX frames", || {
        got += net.dequeue_burst(0, &mut bufs);
        (tx.used_idx() == 5).then_some(())
    });
    assert_eq!(got, 4, "four good frames");
    assert_eq!(net.stats(1).errors, 1, "one malformed chain");
    // The run before the bad chain ends at slot 1, the bad chain is at slot 2, the run after
    // it ends at slot 4.
    assert_eq!(tx.used_elem(1), (heads[1] as u32, 0));
    assert_eq!(tx.used_elem(2), (heads[2] as u32, 0));
    assert_eq!(tx.used_elem(4), (heads[4] as u32, 0));
    // One element per run: the slots of the runs' other chains were not written.
    assert_eq!(tx.used_elem(0), (u32::MAX, u32::MAX));
    assert_eq!(tx.used_elem(3), (u32::MAX, u32::MAX));
}

#[test]
fn two_queue_pairs_carry_traffic_independently() {
    let path = sock_path("mq");
    let mut cfg = DeviceConfig::new(NetModel::default());
    cfg.model.queue_pairs = 2;
    let (_run, nets) = start(vec![("mq", cfg, server(&path), Box::new(NoHandler))]);
    let fe = Frontend::connect(&path, 4, 128);
    let mut g = Guest::new(&fe);
    let acked = fe.qemu_start(NET_FEATURES | (1 << 22));
    assert!(acked & (1 << 22) != 0, "MQ negotiated");
    let net = &nets[0];
    wait("rings ready", || net.queue_ready(3).then_some(()));
    guest_tx(&mut g, &fe, net, 1, 4);
    guest_tx(&mut g, &fe, net, 0, 2);
    guest_rx(&mut g, &fe, net, 1, 2, true);
    assert_eq!((net.stats(1).packets, net.stats(3).packets), (2, 4));
}

#[test]
fn server_device_serves_a_new_front_end_after_a_disconnect() {
    let path = sock_path("reconnect-server");
    let h = Counting::default();
    let (ready, destroyed) = (h.ready.clone(), h.destroyed.clone());
    let (_run, nets) = start(vec![("s", DeviceConfig::new(NetModel::default()), server(&path), Box::new(h))]);
    let net = &nets[0];
    for round in 1..=3 {
        let fe = Frontend::connect(&path, 2, 64);
        let mut g = Guest::new(&fe);
        fe.qemu_start(NET_FEATURES);
        wait("ready", || (ready.load(Ordering::SeqCst) == round).then_some(()));
        guest_tx(&mut g, &fe, net, 0, 2);
        drop(g);
        drop(fe); // mid-traffic disconnect
        wait("destroyed", || (destroyed.load(Ordering::SeqCst) == round).then_some(()));
        assert!(!net.queue_ready(1));
    }
}

#[test]
fn client_device_reconnects_to_a_front_end_that_restarts() {
    let path = sock_path("reconnect-client");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let reconnect = Reconnect { enabled: true, initial: Duration::from_millis(20), max: Duration::from_millis(200) };
    let spec = SocketSpec::Client { path: path.clone(), reconnect };
    let (_run, nets) = start(vec![("c", DeviceConfig::new(NetModel::default()), spec, Box::new(NoHandler))]);
    let net = &nets[0];
    for _ in 0..2 {
        let (sock, _) = listener.accept().unwrap();
        let fe = Frontend::with_socket(sock, 2, 64);
        let mut g = Guest::new(&fe);
        fe.dpdk_start(NET_FEATURES);
        wait("ready", || net.queue_ready(1).then_some(()));
        guest_tx(&mut g, &fe, net, 0, 3);
        drop(g);
        drop(fe);
    }
    // The front-end goes away for a while: the back-end keeps retrying with backoff and
    // connects when it is back.
    drop(listener);
    std::fs::remove_file(&path).unwrap();
    thread::sleep(Duration::from_millis(300));
    let listener = UnixListener::bind(&path).unwrap();
    let (sock, _) = listener.accept().unwrap();
    let fe = Frontend::with_socket(sock, 2, 64);
    let mut g = Guest::new(&fe);
    fe.dpdk_start(NET_FEATURES);
    wait("ready", || net.queue_ready(1).then_some(()));
    guest_tx(&mut g, &fe, net, 0, 1);
}

#[test]
fn features_offered_follow_the_configuration() {
    let path = sock_path("features");
    let mut cfg = DeviceConfig::new(NetModel::default());
    cfg.model.features = VirtioFeatures::VERSION_1 | VirtioFeatures::RING_EVENT_IDX;
    let (_run, _nets) = start(vec![("f", cfg, server(&path), Box::new(NoHandler))]);
    let fe = Frontend::connect(&path, 2, 64);
    let f = fe.get_u64(GET_FEATURES);
    assert_eq!(f, (1 << 32) | (1 << 29) | F_PROTOCOL_FEATURES);
    // Acknowledging a feature that was not offered closes the connection (no REPLY_ACK).
    fe.send(SET_FEATURES, 0, &u64p(f | (1 << 15)), &[]);
    assert!(fe.closed_by_backend(Duration::from_secs(10)));
}

#[test]
fn event_driven_data_path_sleeps_until_the_guest_kicks() {
    let path = sock_path("event-driven");
    let (_run, nets) = start(vec![("e", DeviceConfig::new(NetModel::default()), server(&path), Box::new(NoHandler))]);
    let fe = Frontend::connect(&path, 2, 64);
    let mut g = Guest::new(&fe);
    fe.qemu_start(NET_FEATURES);
    let net = &nets[0];
    wait("rings ready", || net.queue_ready(1).then_some(()));
    // Drain the start-up wake-up, then nothing to do: the wait times out.
    net.wait_for_work(1, Duration::from_millis(10));
    assert!(!net.wait_for_work(1, Duration::from_millis(50)), "no work, no kick");
    // EVENT_IDX: the device asked to be kicked at its current position.
    assert_eq!(g.drv[1].avail_event(), 0);
    // The guest posts a frame and kicks from another thread while the device sleeps.
    g.drv[1].add_chain(&[Buf::readable(&[0u8; 12]), Buf::readable(&frame(0, 60))]);
    let kick = fe.queues[1].kick.try_clone().unwrap();
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        frontend::eventfd_write(&kick);
    });
    assert!(net.wait_for_work(1, Duration::from_secs(10)), "woken by the kick");
    t.join().unwrap();
    let mut bufs: Vec<TxFrame> = (0..4).map(|_| TxFrame::with_capacity(MAX_TX_FRAME)).collect();
    assert_eq!(net.dequeue_burst(0, &mut bufs), 1);
    // Buffers already waiting when the device enables kicks: no sleep at all.
    g.drv[1].add_chain(&[Buf::readable(&[0u8; 12]), Buf::readable(&frame(1, 60))]);
    assert!(net.wait_for_work(1, Duration::from_secs(5)));
    assert_eq!(net.dequeue_burst(0, &mut bufs), 1);
    // Busy-poll mode: kicks suppressed (EVENT_IDX keeps used.flags 0 and stops moving
    // avail_event).
    net.suppress_kicks(1);
    assert_eq!(g.drv[1].used_flags(), 0);
}

/// A 12-byte virtio-net header: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
fn net_hdr(flags: u8, gso_type: u8, hdr_len: u16, gso_size: u16, start: u16, offset: u16, nbufs: u16) -> [u8; 12] {
    let mut h = [flags, gso_type, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    for (i, v) in [hdr_len, gso_size, start, offset, nbufs].into_iter().enumerate() {
        h[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
    }
    h
}

/// Per-frame headers on RX: offload fields reach the guest as given and num_buffers is the
/// device's; a header with an offload the driver did not negotiate never reaches it (dropped,
/// counted as an error), except DATA_VALID, which is cleared for a driver without GUEST_CSUM.
#[test]
fn enqueue_with_headers_passes_offloads_through_and_refuses_unnegotiated_ones() {
    const NEEDS_CSUM: u8 = 1;
    const DATA_VALID: u8 = 2;
    const GSO_TCPV4: u8 = 1;
    const GUEST_CSUM: u64 = 1 << 1;
    for (name, guest_csum) in [("hdr-guest-csum", true), ("hdr-no-guest-csum", false)] {
        let path = sock_path(name);
        let mut cfg = DeviceConfig::new(NetModel::default());
        cfg.model.features |= VirtioFeatures::NET_CSUM
            | VirtioFeatures::NET_GUEST_CSUM
            | VirtioFeatures::NET_GUEST_TSO4
            | VirtioFeatures::NET_HOST_TSO4;
        let (_run, nets) = start(vec![(name, cfg, server(&path), Box::new(NoHandler))]);
        let net = &nets[0];
        let fe = Frontend::connect(&path, 2, 64);
        let mut g = Guest::new(&fe);
        // GUEST_TSO4 is offered but not acknowledged; GUEST_CSUM only in the first round.
        let acked = fe.qemu_start(NET_FEATURES | if guest_csum { GUEST_CSUM } else { 0 });
        assert_eq!(acked & GUEST_CSUM != 0, guest_csum);
        assert_eq!(acked & (1 << 7), 0, "GUEST_TSO4 not acknowledged");
        wait("rings ready", || net.queue_ready(0).then_some(()));
        let drv = &mut g.drv[0];
        let mut addr_of = std::collections::HashMap::new();
        for _ in 0..8 {
            let mut a = [0u64];
            let head = drv.build_chain(&[Buf::writable(2048)], &mut a);
            drv.publish(head);
            addr_of.insert(head as u32, a[0]);
        }
        let partial = net_hdr(NEEDS_CSUM, 0, 42, 0, 34, 6, 0);
        let tso = net_hdr(NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16, 0);
        let valid = net_hdr(DATA_VALID, 0, 0, 0, 0, 0, 0);
        let stale_nbufs = net_hdr(0, 0, 0, 0, 0, 0, 99);
        let frames: Vec<Vec<u8>> = (0..4).map(|i| frame(i, 100 + i as usize)).collect();
        let burst: Vec<_> = [partial, tso, valid, stale_nbufs]
            .iter()
            .zip(&frames)
            .map(|(h, f)| (parse_header(h), f.as_slice()))
            .collect();
        // What the guest must see, in order: (frame index, header as delivered).
        let mut want = Vec::new();
        if guest_csum {
            // hdr_len means nothing without GSO: delivered as 0 (the core's delivery rules).
            want.push((0, net_hdr(NEEDS_CSUM, 0, 0, 0, 34, 6, 1)));
        }
        want.push((2, net_hdr(if guest_csum { DATA_VALID } else { 0 }, 0, 0, 0, 0, 0, 1)));
        want.push((3, net_hdr(0, 0, 0, 0, 0, 0, 1)));
        assert_eq!(net.enqueue_burst_with_headers(0, &burst), want.len(), "{name}");
        assert!(fe.wait_call(0, Duration::from_secs(10)), "RX interrupt");
        assert_eq!(drv.used_idx(), want.len() as u16, "{name}: refused frames use no buffer");
        for (k, (i, hdr)) in want.iter().enumerate() {
            let (id, len) = drv.used_elem(k as u16);
            let mut b = vec![0u8; len as usize];
            drv.read(addr_of[&id], &mut b);
            assert_eq!(b[..12], hdr[..], "{name}: header of frame {i}");
            assert_eq!(b[12..], frames[*i][..], "{name}: frame {i}");
        }
        let refused = 4 - want.len() as u64;
        let st = net.stats(0);
        assert_eq!((st.packets, st.drops, st.errors), (want.len() as u64, refused, refused), "{name}");
        // The zero-header burst still works next to it.
        let f = frame(9, 64);
        assert_eq!(net.enqueue_burst(0, &[&f]), 1);
    }
}

/// Records `rx_pairs_changed` callbacks and counts `device_ready` / `device_destroyed`.
#[derive(Default, Clone)]
struct PairLog {
    changes: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    ready: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    destroyed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl DeviceHandler<NetModel> for PairLog {
    fn event(&mut self, dev: &NetDevice, event: NetEvent) {
        if let NetEvent::RxPairsChanged(pairs) = event {
            assert_eq!(dev.rx_pairs(), pairs, "the data path sees the set before the callback");
            self.changes.lock().unwrap().push(pairs);
        }
    }
    fn device_ready(&mut self, _: &NetDevice) {
        self.ready.fetch_add(1, Ordering::SeqCst);
    }
    fn device_destroyed(&mut self, _: &NetDevice) {
        self.destroyed.fetch_add(1, Ordering::SeqCst);
    }
}

/// Which pairs can receive follows what the front-end does to the rings, in QEMU's order
/// (enables before the rings start, so the set grows as SET_VRING_KICK starts them, with no
/// enable after): SET_VRING_ENABLE 0 on one pair (the guest's `ethtool -L combined 1`) takes
/// it out, and frames meant for it go to the other pair; the device stays ready while any pair
/// is usable, pair 1 alone included; GET_VRING_BASE and a disconnect empty the set.
#[test]
fn receive_pairs_follow_enable_start_stop_and_reset() {
    let path = sock_path("rx-pairs");
    let mut cfg = DeviceConfig::new(NetModel::default());
    cfg.model.queue_pairs = 2;
    let h = PairLog::default();
    let (_run, nets) = start(vec![("rx-pairs", cfg, server(&path), Box::new(h.clone()))]);
    let net = &nets[0];
    let changes = || h.changes.lock().unwrap().clone();
    let fe = Frontend::connect(&path, 4, 128);
    let mut g = Guest::new(&fe);
    fe.qemu_start(NET_FEATURES | (1 << 22));
    fe.sync();
    assert_eq!(net.rx_pairs(), 0b11);
    assert_eq!(changes(), [0b01, 0b11], "pair 0 started first, then pair 1 (kicks after the enables)");
    assert_eq!((net.rx_pair(0), net.rx_pair(1)), (Some(0), Some(1)));
    assert_eq!(h.ready.load(Ordering::SeqCst), 1);

    // The guest stops using pair 1: its frames go to pair 0, which receives them.
    fe.send(SET_VRING_ENABLE, 0, &state(2, 0), &[]);
    fe.send(SET_VRING_ENABLE, 0, &state(3, 0), &[]);
    fe.sync();
    assert_eq!(net.rx_pairs(), 0b01);
    assert_eq!((net.rx_pair(0), net.rx_pair(1)), (Some(0), Some(0)));
    let to = net.rx_pair(1).unwrap();
    guest_rx(&mut g, &fe, net, to, 3, true);
    assert_eq!(net.stats(2).drops, 0, "nothing was offered to the disabled queue");

    // Pair 1 back, pair 0 gone: still ready (pair 1 alone is usable), everything to pair 1.
    fe.send(SET_VRING_ENABLE, 0, &state(2, 1), &[]);
    fe.send(SET_VRING_ENABLE, 0, &state(3, 1), &[]);
    fe.send(SET_VRING_ENABLE, 0, &state(0, 0), &[]);
    fe.send(SET_VRING_ENABLE, 0, &state(1, 0), &[]);
    fe.sync();
    assert_eq!(net.rx_pairs(), 0b10);
    assert_eq!((net.rx_pair(0), net.rx_pair(1)), (Some(1), Some(1)));
    assert_eq!(h.destroyed.load(Ordering::SeqCst), 0, "a usable pair keeps the device ready");
    guest_rx(&mut g, &fe, net, net.rx_pair(0).unwrap(), 2, true);

    // Stopping the last receive queue leaves nothing to deliver to: frames are dropped and
    // counted by the caller, as for a stopped device.
    fe.get_vring_base(2);
    fe.sync(); // the reply goes out before the control loop dispatches the change
    assert_eq!(net.rx_pairs(), 0);
    assert_eq!(net.rx_pair(0), None);
    assert_eq!(h.destroyed.load(Ordering::SeqCst), 1);
    assert_eq!(changes(), [0b01, 0b11, 0b01, 0b11, 0b10, 0]);

    // A reconnect starts from nothing again.
    drop(g);
    fe.hang_up();
    let fe = Frontend::connect(&path, 4, 128);
    fe.dpdk_start(NET_FEATURES | (1 << 22));
    fe.sync();
    assert_eq!(net.rx_pairs(), 0b11);
}

/// Reads the next frame guest RX ring `drv` received (after `*seen` used entries), merged
/// buffers joined, without its header; `addr_of` maps buffer ids to addresses.
fn rx_frame(
    drv: &virtq::testing::TestDriver<'_, virtq::RegionTable<1>>,
    seen: &mut u16,
    addr_of: &std::collections::HashMap<u32, u64>,
) -> Vec<u8> {
    let (id, len) = drv.used_elem(*seen);
    let mut first = vec![0u8; len as usize];
    drv.read(addr_of[&id], &mut first);
    let nbufs = u16::from_le_bytes([first[10], first[11]]);
    let mut data = first[12..].to_vec();
    for k in 1..nbufs {
        let (id, len) = drv.used_elem(seen.wrapping_add(k));
        let mut b = vec![0u8; len as usize];
        drv.read(addr_of[&id], &mut b);
        data.extend_from_slice(&b);
    }
    *seen = seen.wrapping_add(nbufs);
    data
}

/// Posts `n` receive buffers of `len` bytes; returns their addresses by id.
fn post_rx(
    drv: &mut virtq::testing::TestDriver<'_, virtq::RegionTable<1>>,
    n: usize,
    len: u32,
) -> std::collections::HashMap<u32, u64> {
    drv.reset_alloc();
    let mut addr_of = std::collections::HashMap::new();
    for _ in 0..n {
        let mut a = [0u64];
        let head = drv.build_chain(&[Buf::writable(len)], &mut a);
        drv.publish(head);
        addr_of.insert(head as u32, a[0]);
    }
    addr_of
}

/// Frames for `forward_burst`: slots of the largest frame.
fn tx_frames() -> Vec<TxFrame> {
    (0..32).map(|_| TxFrame::with_capacity(MAX_TX_FRAME)).collect()
}

/// Hands one frame of `len` bytes from `tx` over `net`'s pair 0 and delivers it to `rx`'s
/// device (pair 0): a burst taken the copy way, after which a ring is taken the in-place way
/// (its frames averaged more than `COPY_LIMIT`).
fn warm_up(net: &NetDevice, to: &NetDevice, kick: impl Fn(), add: impl FnOnce(&[u8]), len: usize) -> Vec<u8> {
    let f = frame(9, len);
    let one: Vec<u8> = [0u8; 12].iter().chain(&f).copied().collect();
    add(&one);
    kick();
    let mut frames = tx_frames();
    let mut handed = 0;
    wait("the first frame", || {
        handed += net.forward_burst(0, &mut frames, |burst| match burst {
            TxBurst::Copied(fr) => {
                let refs: Vec<&[u8]> = fr.iter().map(|f| f.frame()).collect();
                assert_eq!(to.enqueue_burst(0, &refs), 1);
            }
            TxBurst::InPlace(_) => panic!("a ring starts the copy way"),
        });
        (handed != 0).then_some(())
    });
    f
}

/// One copy between two guests (`NetDevice::forward_burst`): once A's ring is taken the
/// in-place way, A's frames reach B's buffers straight from A's TX buffers, byte for byte: a
/// 1500-byte frame whose header and frame are split over six descriptors; a 200-byte frame
/// in one descriptor (no longer than `COPY_LIMIT`: copied out whole, its chain completed at
/// once); and a 1500-byte frame in an indirect table of 151 pieces (more than the 20 a chain
/// may have to stay in place: copied out whole); a malformed chain among them is counted
/// and completed. A's chains left in place are completed only after `deliver` returns.
/// What A writes into its buffers while the frames are handed over reaches only the bytes
/// past the copy of the first 18 (the headers every decision was made on, for a frame
/// without offloads).
#[test]
fn forward_burst_copies_each_frame_once_and_completes_after() {
    let (pa, pb) = (sock_path("fwd-a"), sock_path("fwd-b"));
    let cfg = || DeviceConfig::new(NetModel::default());
    let (_run, nets) = start(vec![
        ("fwd-a", cfg(), server(&pa), Box::new(NoHandler)),
        ("fwd-b", cfg(), server(&pb), Box::new(NoHandler)),
    ]);
    let (fa, fb) = (Frontend::connect(&pa, 2, 256), Frontend::connect(&pb, 2, 256));
    let (mut ga, mut gb) = (Guest::new(&fa), Guest::new(&fb));
    fa.qemu_start(NET_FEATURES | (1 << 28));
    fb.qemu_start(NET_FEATURES);
    let (a, b) = (&nets[0], &nets[1]);
    wait("rings ready", || (a.queue_ready(1) && b.queue_ready(0)).then_some(()));
    let addr_of = post_rx(&mut gb.drv[0], 8, 2048);
    let first = warm_up(a, b, || fa.kick(1), |one| _ = ga.drv[1].add_chain(&[Buf::readable(one)]), 1500);

    let hdr = [0u8; 12];
    let f0 = frame(1, 1500);
    let tx = &mut ga.drv[1];
    let mut addrs = [0u64; 6];
    let head0 = tx.build_chain(
        &[
            Buf::readable(&hdr[..5]),
            Buf::readable(&hdr[5..]),
            Buf::readable(&f0[..100]),
            Buf::readable(&f0[100..137]),
            Buf::readable(&f0[137..1037]),
            Buf::readable(&f0[1037..]),
        ],
        &mut addrs,
    );
    tx.publish(head0);
    let f1 = frame(2, 200);
    let one: Vec<u8> = hdr.iter().chain(&f1).copied().collect();
    tx.add_chain(&[Buf::readable(&one)]);
    // The frame's buffer outside guest memory: a malformed chain (§2.7.5).
    let bad = tx.build_chain(&[Buf::readable(&hdr), Buf::readable(&f1)], &mut [0, 0]);
    let mut d = tx.read_desc(bad + 1);
    d.addr = 0x7fff_0000_0000;
    tx.write_desc(bad + 1, d);
    tx.publish(bad);
    let f2 = frame(3, 1500);
    let pieces: Vec<Buf<'_>> = std::iter::once(Buf::readable(&hdr)).chain(f2.chunks(10).map(Buf::readable)).collect();
    assert_eq!(pieces.len(), 151);
    tx.add_indirect_chain(&pieces);
    fa.kick(1);

    let mut frames = tx_frames();
    let mut handed = 0;
    wait("A's frames", || {
        handed += a.forward_burst(0, &mut frames, |burst| {
            let TxBurst::InPlace(frames) = burst else { panic!("after a full-size frame, the in-place way") };
            assert_eq!(frames.len(), 3);
            // Only the first frame's chain: this burst's completions are published after.
            assert_eq!(ga.drv[1].used_idx(), 1, "nothing completed while the frames are handed over");
            // A rewrites its first frame's buffers now: the first piece (its first 18 bytes
            // inside the copy, the rest past it) and the third (past it).
            ga.drv[1].write(addrs[2], &[0xEE; 100]);
            ga.drv[1].write(addrs[4], &[0xEE; 900]);
            assert_eq!(frames[0].head(), &f0[..TX_HEAD - 12], "the copy the decisions read");
            assert_eq!(frames[0].len(), 1500);
            assert_eq!(frames[1].bytes().contiguous(), Some(&f1[..]), "copied out whole");
            assert_eq!(frames[2].bytes().contiguous(), Some(&f2[..]), "too many pieces: copied out whole");
            assert!(frames.iter().all(|f| f.offload().is_none()));
            let burst: Vec<Gather<'_>> = frames.iter().map(|f| f.bytes()).collect();
            assert_eq!(b.enqueue_gather_burst_outcome(0, &burst).placed, 3);
        });
        (handed != 0).then_some(())
    });
    assert_eq!(handed, 3);
    assert_eq!(ga.drv[1].used_idx(), 5, "every chain completed after the copies, the bad one too");
    assert_eq!((a.stats(1).packets, a.stats(1).errors), (4, 1));
    let mut want0 = f0.clone();
    want0[TX_HEAD - 12..100].fill(0xEE);
    want0[137..1037].fill(0xEE);
    let mut seen = 0;
    assert_eq!(rx_frame(&gb.drv[0], &mut seen, &addr_of), first, "the first frame");
    assert_eq!(rx_frame(&gb.drv[0], &mut seen, &addr_of), want0, "split frame");
    assert_eq!(rx_frame(&gb.drv[0], &mut seen, &addr_of), f1, "one descriptor");
    assert_eq!(rx_frame(&gb.drv[0], &mut seen, &addr_of), f2, "151 pieces");
    // That burst averaged less than `COPY_LIMIT` a frame: the next is taken the copy way.
    tx_frames_copy_way(a, &mut ga.drv[1], || fa.kick(1));
}

/// `forward_burst` after a burst of short frames hands the next over as `TxBurst::Copied`.
fn tx_frames_copy_way(
    net: &NetDevice,
    tx: &mut virtq::testing::TestDriver<'_, virtq::RegionTable<1>>,
    kick: impl Fn(),
) {
    let one: Vec<u8> = [0u8; 12].iter().chain(&frame(4, 100)).copied().collect();
    tx.add_chain(&[Buf::readable(&one)]);
    kick();
    let mut frames = tx_frames();
    let mut handed = 0;
    wait("a short frame", || {
        handed += net.forward_burst(0, &mut frames, |burst| assert!(matches!(burst, TxBurst::Copied(_))));
        (handed != 0).then_some(())
    });
    const { assert!(COPY_LIMIT >= 12 + 100) };
}

/// Guest TX on a packed ring in batches of four single-descriptor chains (the core's
/// `pop_read_batch`), with and without `VIRTIO_F_IN_ORDER`: a frame dropped at any position
/// of a batch (a chain shorter than the virtio-net header, or a TSO header that its frame's
/// own headers do not bear out, which the offload check refuses) is counted and completed, the
/// frames after it in the batch move down in the burst, and every frame comes out once, in
/// ring order; every chain is completed. On a disabled ring the batches' frames are all
/// dropped, counted and completed.
#[test]
fn packed_tx_batches_keep_frames_in_order_around_dropped_ones() {
    use virtq::testing::PackedDriver;
    const F_CSUM: u64 = 1 << 0;
    const F_HOST_TSO4: u64 = 1 << 11;
    const F_IN_ORDER: u64 = 1 << 35;
    for (k, extra) in [0, F_IN_ORDER].into_iter().enumerate() {
        let path = sock_path(&format!("packed-batch-{k}"));
        // Checksum and TSO offered, so that a TSO header reaches the offload check.
        let mut cfg = DeviceConfig::new(NetModel::default());
        cfg.model.features |= VirtioFeatures::NET_CSUM | VirtioFeatures::NET_HOST_TSO4;
        let (_run, nets) = start(vec![("packed-batch", cfg, server(&path), Box::new(NoHandler))]);
        let fe = Frontend::connect(&path, 2, 16);
        let pcfg = |i: usize| fe.queues[i].cfg;
        let mut tx = PackedDriver::new(&fe.ram.table, pcfg(1), fe.queues[1].data_base, fe.queues[1].data_len);
        let want_features = F_RING_PACKED | F_CSUM | F_HOST_TSO4 | extra;
        let acked = fe.dpdk_start(NET_FEATURES | want_features);
        assert_eq!(acked & want_features, want_features);
        let net = &nets[0];
        wait("rings ready", || net.queue_ready(1).then_some(()));
        let mut bufs: Vec<TxFrame> = (0..32).map(|_| TxFrame::with_capacity(MAX_TX_FRAME)).collect();
        let mut errors = 0;
        // Seven chains per round (a batch and three), the bad one at position `bad` of the
        // first batch: short in the first four rounds, in the next four a TSO frame whose
        // header is valid on its own (so the parse accepts it) but whose frame is not IPv4
        // TCP (so `check_frame` refuses it); over the rounds the batches meet the end of the
        // 16-entry ring.
        for round in 0..8usize {
            let (bad, short) = (round % 4, round < 4);
            tx.reset_alloc();
            let (mut want, mut ids) = (Vec::new(), Vec::new());
            for i in 0..7usize {
                let f = frame((round * 7 + i) as u8, 60 + i);
                let mut one: Vec<u8> = [0u8; 12].iter().chain(&f).copied().collect();
                if i == bad && short {
                    ids.push(tx.add_chain(&[Buf::readable(&[0u8; 8])]));
                    continue;
                }
                if i == bad {
                    use virtq::net::header::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4};
                    one[..12].copy_from_slice(&net_hdr(
                        VIRTIO_NET_HDR_F_NEEDS_CSUM,
                        VIRTIO_NET_HDR_GSO_TCPV4,
                        54,
                        1448,
                        34,
                        16,
                        0,
                    ));
                } else {
                    want.push(f);
                }
                ids.push(tx.add_chain(&[Buf::readable(&one)]));
            }
            fe.kick(1);
            let mut got = Vec::new();
            wait("TX frames", || {
                let n = net.dequeue_burst(0, &mut bufs);
                got.extend(bufs[..n].iter().map(|b| b.frame().to_vec()));
                (got.len() >= want.len()).then_some(())
            });
            let what = format!("{} chain at {bad}, features {extra:#x}", if short { "short" } else { "refused TSO" });
            assert_eq!(got, want, "{what}");
            errors += 1;
            assert_eq!(net.stats(1).errors, errors, "{what}");
            expect_completed(&mut tx, &ids, extra != 0, &what);
        }
        // The ring disabled (SET_VRING_ENABLE 0): the guest's frames are taken, dropped and
        // counted (vhost-user.rst: "process and discard any TX packets"), batches included.
        fe.send(SET_VRING_ENABLE, 0, &state(1, 0), &[]);
        fe.sync();
        tx.reset_alloc();
        let ids: Vec<u16> =
            (0..7u8).map(|i| tx.add_chain(&[Buf::readable(&[&[0u8; 12][..], &frame(i, 60)].concat())])).collect();
        fe.kick(1);
        wait("TX frames dropped", || {
            assert_eq!(net.dequeue_burst(0, &mut bufs), 0, "a disabled ring hands out no frame");
            (net.stats(1).drops == 7).then_some(())
        });
        assert_eq!(net.stats(1).errors, errors);
        expect_completed(&mut tx, &ids, extra != 0, &format!("disabled ring, features {extra:#x}"));
    }
}

/// Every chain of `ids` completed, in ring order; with IN_ORDER as one batch: one used
/// descriptor, the last chain's, that the driver skips the batch past (§2.8.9).
fn expect_completed(
    tx: &mut virtq::testing::PackedDriver<'_, virtq::RegionTable<1>>,
    ids: &[u16],
    in_order: bool,
    what: &str,
) {
    if in_order {
        let last = *ids.last().unwrap();
        tx.set_chain_len(last, ids.len() as u16);
        assert_eq!(tx.pop_used().map(|(id, _)| id), Some(last), "{what}");
        assert_eq!(tx.pop_used(), None, "{what}");
    } else {
        let used: Vec<u16> = std::iter::from_fn(|| tx.pop_used().map(|(id, _)| id)).collect();
        assert_eq!(used, ids, "{what}");
    }
    assert_eq!(tx.used_position(), tx.next_position(), "{what}: every chain completed");
}

/// `forward_burst` on a packed ring with `VIRTIO_F_IN_ORDER`, delivering back to the sender's
/// own receive queue from inside `deliver` (a reflecting port: the TX ring's lock, then the RX
/// ring's, of one device): once the ring is taken the in-place way, full-size frames over
/// two descriptors come back byte-exact, and the TX ring gets its completions after them, in
/// ring order around a malformed chain.
#[test]
fn forward_burst_reflects_on_a_packed_in_order_ring() {
    use virtq::testing::PackedDriver;
    const F_IN_ORDER: u64 = 1 << 35;
    let path = sock_path("fwd-packed");
    let (_run, nets) =
        start(vec![("fwd-packed", DeviceConfig::new(NetModel::default()), server(&path), Box::new(NoHandler))]);
    let fe = Frontend::connect(&path, 2, 16);
    let pcfg = |i: usize| fe.queues[i].cfg;
    let mut rx = PackedDriver::new(&fe.ram.table, pcfg(0), fe.queues[0].data_base, fe.queues[0].data_len);
    let mut tx = PackedDriver::new(&fe.ram.table, pcfg(1), fe.queues[1].data_base, fe.queues[1].data_len);
    let acked = fe.dpdk_start(NET_FEATURES | F_RING_PACKED | F_IN_ORDER);
    assert!(acked & F_RING_PACKED != 0 && acked & F_IN_ORDER != 0);
    let net = &nets[0];
    wait("rings ready", || (net.queue_ready(0) && net.queue_ready(1)).then_some(()));
    let mut addr_of = std::collections::HashMap::new();
    for k in 0..5u64 {
        let id = rx.add_chain(&[Buf::writable(2048)]);
        addr_of.insert(id, fe.queues[0].data_base + 2048 * k);
    }
    let first = warm_up(net, net, || fe.kick(1), |one| _ = tx.add_chain(&[Buf::readable(one)]), 1500);
    let frames: Vec<Vec<u8>> = (0..4u8).map(|i| frame(i, 1450 + 10 * i as usize)).collect();
    for (i, f) in frames.iter().enumerate() {
        if i == 2 {
            // A write-only buffer in a TX chain: malformed (family 6 is the walk's "readable
            // after writable"): completed in its place.
            tx.add_chain(&[Buf::writable(64), Buf::readable(&[0u8; 12])]);
        }
        tx.add_chain(&[Buf::readable(&[0u8; 12]), Buf::readable(f)]);
    }
    fe.kick(1);
    let mut slots = tx_frames();
    let mut handed = 0;
    wait("frames", || {
        handed += net.forward_burst(0, &mut slots, |burst| {
            let TxBurst::InPlace(fr) = burst else { panic!("after a full-size frame, the in-place way") };
            let burst: Vec<Gather<'_>> = fr.iter().map(|f| f.bytes()).collect();
            assert_eq!(net.enqueue_gather_burst_outcome(0, &burst).placed, fr.len());
        });
        (handed == 4).then_some(())
    });
    for (i, f) in std::iter::once(&first).chain(&frames).enumerate() {
        let (id, len) = rx.pop_used().expect("frame back");
        let mut b = vec![0u8; len as usize];
        rx.read(addr_of[&id], &mut b);
        assert_eq!(&b[12..], &f[..], "frame {i}");
    }
    assert!(rx.pop_used().is_none());
    // Six chains taken and every one completed: stopped, the ring answers its used position
    // at its available one, both where the driver will put its next chain.
    let p = tx.next_position().to_bits() as u32;
    assert_eq!(fe.get_vring_base(1), p | p << 16);
    assert_eq!(net.stats(1).errors, 1);
}

/// `forward_burst` with a frame left in place whose headers reach past its copy (IPv6, a
/// hop-by-hop option, TCP: 82 bytes) and a partial checksum: its copy is extended to the
/// headers `check_frame` reads (the first 256 bytes), across the descriptors the frame is
/// split over, so the check passes and the receiver gets the frame byte for byte.
#[test]
fn forward_burst_extends_the_copy_of_a_frame_with_offloads() {
    const NEEDS_CSUM: u8 = 1;
    let path = sock_path("fwd-csum");
    let mut cfg = DeviceConfig::new(NetModel::default());
    cfg.model.features |= VirtioFeatures::NET_CSUM;
    let (_run, nets) = start(vec![("fwd-csum", cfg, server(&path), Box::new(NoHandler))]);
    let fe = Frontend::connect(&path, 2, 64);
    let mut g = Guest::new(&fe);
    assert!(fe.qemu_start(NET_FEATURES | 1) & 1 != 0, "CSUM acknowledged");
    let net = &nets[0];
    wait("rings ready", || (net.queue_ready(0) && net.queue_ready(1)).then_some(()));
    let addr_of = post_rx(&mut g.drv[0], 4, 2048);
    let first = warm_up(net, net, || fe.kick(1), |one| _ = g.drv[1].add_chain(&[Buf::readable(one)]), 1500);
    // Ethernet, IPv6 (next header: hop-by-hop), an 8-byte hop-by-hop header (next: TCP), TCP.
    let payload: Vec<u8> = (0..1400u32).map(|i| (i * 7 + 1) as u8).collect();
    let mut f = vec![0x52, 0x54, 0, 0, 0, 0x0b, 0x52, 0x54, 0, 0, 0, 0x0a, 0x86, 0xdd];
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((8 + 20 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 64]);
    f.extend((0..32).map(|i| i as u8));
    f.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
    f.extend_from_slice(&[0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend_from_slice(&payload);
    assert!(12 + f.len() > COPY_LIMIT, "left in place");
    let hdr = net_hdr(NEEDS_CSUM, 0, 0, 0, 62, 16, 0);
    // The header alone, then the frame over three descriptors: cut at 40 and at 100.
    g.drv[1].add_chain(&[
        Buf::readable(&hdr),
        Buf::readable(&f[..40]),
        Buf::readable(&f[40..100]),
        Buf::readable(&f[100..]),
    ]);
    fe.kick(1);
    let mut slots = tx_frames();
    let mut handed = 0;
    wait("the frame", || {
        handed += net.forward_burst(0, &mut slots, |burst| {
            let TxBurst::InPlace(frames) = burst else { panic!("after a full-size frame, the in-place way") };
            assert_eq!(frames.len(), 1);
            assert_eq!(frames[0].head(), &f[..TX_SNAPSHOT - 12], "the copy extended to the headers check_frame reads");
            let of = frames[0].offload().expect("a frame with offloads, checked");
            assert_eq!((of.header.csum_start.get(), of.header.csum_offset.get()), (62, 16));
            let burst: Vec<Gather<'_>> = frames.iter().map(|f| f.bytes()).collect();
            assert_eq!(net.enqueue_gather_burst_outcome(0, &burst).placed, 1);
        });
        (handed != 0).then_some(())
    });
    assert_eq!(net.stats(1).errors, 0);
    let mut seen = 0;
    assert_eq!(rx_frame(&g.drv[0], &mut seen, &addr_of), first, "the first frame");
    assert_eq!(rx_frame(&g.drv[0], &mut seen, &addr_of), f, "byte for byte");
}
