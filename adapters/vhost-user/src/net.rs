//! The virtio-net data path: burst operations on a device's queues, as DPDK's
//! `rte_vhost_dequeue_burst` / `rte_vhost_enqueue_burst`, made safe.
//!
//! Queue numbering follows virtio-net (§5.1.2): pair `n` has its receive queue (device → guest)
//! at index `2n` and its transmit queue (guest → device) at `2n + 1`.
//!
//! Each burst locks the ring's shared state once, builds a validated queue view over the
//! current memory table, moves up to a batch of frames, publishes the used index once and
//! signals the guest at most once (when its notification suppression asks for it). Nothing is
//! allocated per frame.
//!
//! Frames from one guest to another longer than [`COPY_LIMIT`] are copied once:
//! [`NetDevice::forward_burst`] hands them over while they are still in the sender's buffers
//! ([`InPlaceFrame`]), the receiver's burst ([`NetDevice::enqueue_gather_burst_outcome`])
//! copies them from there, and the sender's chains are completed after every copy.
//! Shorter frames cost fewer instructions copied out first, as [`NetDevice::dequeue_burst`]
//! copies every frame for destinations that need it in one piece (a TAP).
//!
//! Lock order: a transmit ring's lock, then receive rings' locks. [`NetDevice::forward_burst`]
//! holds its transmit ring's lock while the receivers' bursts of a burst in place run; nothing takes a transmit
//! ring's lock while it holds a receive ring's, so data-plane threads that forward to each
//! other cannot deadlock (and a device that sends to itself takes its two rings in that order
//! too).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtq::net::header::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE};
use virtq::net::offload::MAX_HEADERS_LEN;
use virtq::net::{self, FrameSource, Gather, OffloadFrame, RxScratch, VirtioNetHdr};
use virtq::packed::BATCH;
use virtq::{CopiedChain, PopError, Segments, VirtioFeatures, Virtqueue};
use zerocopy_shim::read_header;

use crate::limited_by;
use crate::ratelimit::RateLimit;
use crate::vring::{RingFault, RingLog, VringShared};

mod model;
pub use model::{NetConfig, NetEvent, NetModel};

/// Largest frame a GSO packet can make: 65535 bytes of IP payload behind an IPv6 header (40),
/// an Ethernet header and one VLAN tag (18). A guest that negotiated HOST_TSO4/6 may send
/// frames this large, and a TAP with TSO enabled may hand them over.
pub const MAX_GSO_FRAME: usize = 65535 + 40 + 18;

/// Largest frame plus header a TX buffer must hold to take any packet: a [`MAX_GSO_FRAME`]
/// frame behind the 12-byte virtio-net header.
pub const MAX_TX_FRAME: usize = MAX_GSO_FRAME + 12;

/// The frame a back-end sends for `SEND_RARP` (vhost-user.rst "Migration"; what QEMU's
/// `qemu_announce_self` and DPDK's `make_rarp_packet` send): an Ethernet broadcast from `mac`,
/// EtherType RARP (0x8035), a reverse request (opcode 3) for `mac`, padded to 60 bytes. A
/// switch that sees it learns that `mac` is now behind the port it came from.
pub fn rarp_announce(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    // htype Ethernet, ptype IPv4, hlen 6, plen 4, op 3 (reverse request).
    f[14..22].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]);
    f[22..28].copy_from_slice(&mac); // sender hardware address
    f[32..38].copy_from_slice(&mac); // target hardware address; both IPs 0
    f
}

/// What an enqueue burst did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enqueued {
    /// Frames placed (the rest were dropped and counted).
    pub placed: usize,
    /// The burst stopped before its last frame: the ring ran out of buffers, or is stopped,
    /// disabled or faulted. Frames refused one by one (too large, an offload the guest did
    /// not negotiate) do not set it.
    pub full: bool,
}

/// Per-queue counters.
#[derive(Debug, Default)]
pub struct QueueStats {
    packets: AtomicU64,
    bytes: AtomicU64,
    drops: AtomicU64,
    errors: AtomicU64,
    bursts: AtomicU64,
}

/// A snapshot of [`QueueStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueCounters {
    /// Frames moved.
    pub packets: u64,
    /// Frame bytes moved (without virtio-net headers).
    pub bytes: u64,
    /// Frames dropped: TX on a disabled ring, RX without buffers, too large, or refused.
    pub drops: u64,
    /// Malformed chains or headers from the guest; on RX also frames too large for the
    /// guest's buffers and headers with offloads it did not negotiate.
    pub errors: u64,
    /// Bursts that moved at least one frame: `packets / bursts` is the average batch, which
    /// shows whether the data path keeps up with the guest in small batches or large ones.
    pub bursts: u64,
    /// Times the ring faulted and stopped being served until the front-end set it up again
    /// ([`RingFault`]).
    pub faults: u64,
}

impl QueueStats {
    fn add(&self, packets: u64, bytes: u64, drops: u64, errors: u64) {
        if packets != 0 {
            self.bursts.fetch_add(1, Ordering::Relaxed);
            self.packets.fetch_add(packets, Ordering::Relaxed);
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        if drops != 0 {
            self.drops.fetch_add(drops, Ordering::Relaxed);
        }
        if errors != 0 {
            self.errors.fetch_add(errors, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> QueueCounters {
        QueueCounters {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            drops: self.drops.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            bursts: self.bursts.load(Ordering::Relaxed),
            faults: 0,
        }
    }
}

/// A frame taken from a guest's transmit queue: the virtio-net header and the frame, in a
/// caller-owned buffer that is reused from burst to burst.
#[derive(Debug)]
pub struct TxFrame {
    buf: Vec<u8>,
    len: usize,
    hdr_len: usize,
    /// For a frame with a partial checksum or a GSO type: its header checked against the
    /// frame ([`net::check_frame`]) and normalised.
    offload: Option<OffloadFrame>,
}

impl TxFrame {
    /// A buffer for frames up to `capacity` bytes including the virtio-net header (use
    /// [`MAX_TX_FRAME`] to accept every frame; larger chains are dropped and counted).
    pub fn with_capacity(capacity: usize) -> TxFrame {
        TxFrame { buf: vec![0; capacity], len: 0, hdr_len: 0, offload: None }
    }

    /// For a frame the guest sent with a partial checksum (`NEEDS_CSUM`) or as a GSO frame:
    /// its header, checked against the frame's own headers and normalised
    /// ([`net::check_frame`]), and where those headers are. `None` for a frame without
    /// offloads, whose header is all zeroes as far as a receiver is concerned.
    #[inline]
    pub fn offload(&self) -> Option<&OffloadFrame> {
        self.offload.as_ref()
    }

    /// The Ethernet frame.
    #[inline]
    pub fn frame(&self) -> &[u8] {
        &self.buf[self.hdr_len..self.len]
    }

    /// The virtio-net header the guest sent with it (validated, §5.1.6.2).
    pub fn header(&self) -> VirtioNetHdr {
        read_header(&self.buf[..self.hdr_len])
    }

    /// The header and frame as they came from the guest.
    pub fn raw(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Most frames one [`NetDevice::forward_burst`] takes.
pub const FORWARD_BURST: usize = 32;

/// The cut-over of [`NetDevice::forward_burst`]: a transmitted chain whose device-readable
/// part (virtio-net header and frame) is at most this many bytes is copied out whole and
/// completed at once, then copied into its receivers' buffers (two copies: the copy path);
/// a longer one is handed over in place and copied once, straight from the sender's buffers
/// into each receiver's. The same length decides, per burst, which way the next burst of a
/// ring is taken (see `forward_burst`).
///
/// Handing a frame over in place costs bookkeeping a copied frame does not have: a list of
/// its pieces, a completion deferred until the copies are done, a copy into the receiver
/// made of two parts (the copy of the headers, then the sender's buffers). That is paid back
/// only by the copy it saves, so only for long frames. `benches/switchbench.sh` (callgrind,
/// Ir per frame, a burst of 32 frames per pass, dirty log off), copy path / in place:
/// 512 B 771 / 858, 1024 B 867 / 906, 1300 B 921 / 930, 1400 B 938 / 942, 1450 B 963 / 954,
/// 1500 B 963 / 954 (the copy path steps up where `memcpy` changes strategy). Frames up to
/// 1400 bytes keep the copy path; full-size frames (1514 bytes at an MTU of 1500), jumbo
/// frames and GSO frames (up to 64 KiB, where the copy saved is most of the cost) take the
/// one copy.
pub const COPY_LIMIT: usize = 12 + 1400;

/// The bytes of a chain handed over in place that are copied nonetheless: the virtio-net
/// header and the frame's first 18 bytes, all a switch reads (the Ethernet header and a VLAN
/// tag: the forwarding decision, the MTU check). A frame with offloads has its copy extended
/// to [`TX_SNAPSHOT`] before [`net::check_frame`] reads it. (Every frame this short is copied
/// whole: [`COPY_LIMIT`].)
pub const TX_HEAD: usize = 12 + 18;

/// Bytes of a chain handed over in place that [`net::check_frame`] may read: the virtio-net
/// header and the frame's first [`MAX_HEADERS_LEN`] bytes, read from the copy only.
pub const TX_SNAPSHOT: usize = 12 + MAX_HEADERS_LEN;

/// Buffer pieces past the copies of the chains [`NetDevice::forward_burst`] hands over in
/// place, per frame of a burst: Linux sends a frame in one piece, or a GSO frame as its
/// header and linear part then up to `MAX_SKB_FRAGS` (17 by default) fragments. A chain that
/// finds no room for its pieces is valid all the same: it is copied out whole
/// ([`virtq::SplitQueue::pop_gather_uncompleted`]).
const TX_SEGMENTS: usize = 20;

/// A burst [`NetDevice::forward_burst`] hands over.
#[derive(Clone, Copy, Debug)]
pub enum TxBurst<'a, 'g> {
    /// Taken by [`NetDevice::dequeue_burst`]: every frame copied out whole and its chain
    /// completed; the frames are the device's.
    Copied(&'a [TxFrame]),
    /// Taken by the walk that leaves frames longer than [`COPY_LIMIT`] in the guest's
    /// transmit buffers: every frame of the burst, in ring order, each as an [`InPlaceFrame`]
    /// (those copied out too). The chains left in place are completed once `deliver`
    /// returns.
    InPlace(&'a [InPlaceFrame<'g>]),
}

/// A frame [`NetDevice::forward_burst`] hands over in a [`TxBurst::InPlace`] burst: its
/// offloads, checked, and its bytes ([`Gather`]): its first bytes (at least [`TX_HEAD`], or
/// [`TX_SNAPSHOT`] for a frame with offloads) from the copy they were checked on, the rest
/// still in the guest's transmit buffers; or all of it from a copy ([`Gather::slice`]) for a
/// frame no longer than [`COPY_LIMIT`]. Small (a burst of them is passed around by value):
/// the header itself is not kept, a receiver needs only its offloads.
#[derive(Clone, Copy, Debug)]
pub struct InPlaceFrame<'a> {
    offload: Option<&'a OffloadFrame>,
    bytes: Gather<'a>,
}

impl<'a> InPlaceFrame<'a> {
    /// For a frame the guest sent with a partial checksum (`NEEDS_CSUM`) or as a GSO frame:
    /// its header (validated, §5.1.6.2) checked against the frame's own headers, in the copy,
    /// and normalised ([`net::check_frame`]). `None` for a frame without offloads, whose
    /// header is all zeroes as far as a receiver is concerned.
    pub fn offload(&self) -> Option<&'a OffloadFrame> {
        self.offload
    }

    /// The frame's first bytes: the copy every decision about the frame reads, and what a
    /// receiver gets in their place.
    pub fn head(&self) -> &'a [u8] {
        self.bytes.head()
    }

    /// The whole frame, for a receive burst ([`NetDevice::enqueue_gather_burst_outcome`]) or a copy
    /// ([`Gather::read_into`]).
    pub fn bytes(&self) -> Gather<'a> {
        self.bytes
    }

    /// The frame's length in bytes (without the virtio-net header).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the frame is empty (never: a chain holding only a header is refused).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Publishes a TX burst's completions (guest TX writes only the used ring), marking them in
/// the dirty log while the front-end migrates, and kicks the log's reader if the burst took
/// anything. Returns whether the driver is to be notified. One branch per burst when not
/// migrating.
#[inline(always)]
fn publish_tx<'m, Q: Virtqueue<'m>>(vq: &mut Q, log: &Option<RingLog<'_>>, taken: usize) -> bool {
    match log {
        None => vq.publish(),
        Some(log) => {
            let notify = vq.publish_logged(log);
            if taken != 0 {
                log.kick();
            }
            notify
        }
    }
}

/// [`Virtqueue::BATCHES`] of `vq`'s layout, for a burst loop that [`crate::with_ring!`] compiles
/// for both (a constant there: the split ring's loop has no batch path).
#[inline(always)]
fn batches<'m, Q: Virtqueue<'m>>(_: &Q) -> bool {
    Q::BATCHES
}

/// Completes `taken` (every chain a burst took, in ring order, each with whether it was
/// malformed) with `len` 0, as [`NetDevice::dequeue_burst`] does as it goes: with `IN_ORDER`
/// a run of good chains as one batch (§2.7.8.2 / §2.8.9), a malformed chain on its own
/// after the run before it, so that completions stay in ring order.
#[inline(always)]
fn complete_tx<'m, Q: Virtqueue<'m>>(vq: &mut Q, taken: &Taken, in_order: bool) {
    let heads = &taken.heads[..taken.len];
    let Some(&last) = heads.last() else { return };
    if in_order && taken.bad == 0 {
        // The usual burst: one run, one used entry.
        let _ = vq.push_in_order_batch(last, 0, heads.len() as u16);
        return;
    }
    if !in_order {
        for &head in heads {
            vq.push(head, 0);
        }
        return;
    }
    let mut run: Option<(u16, u16)> = None;
    for (i, &head) in heads.iter().enumerate() {
        if taken.bad & (1 << i) != 0 {
            if let Some((last, k)) = run.take() {
                let _ = vq.push_in_order_batch(last, 0, k);
            }
            vq.push(head, 0);
        } else {
            run = Some((head, run.map_or(1, |(_, k)| k + 1)));
        }
    }
    if let Some((last, k)) = run {
        let _ = vq.push_in_order_batch(last, 0, k);
    }
}

/// The chains one [`NetDevice::forward_burst`] took whose completion waits for the copies, in
/// ring order: their heads (buffer ids), and which were malformed (bit `i` of `bad`).
struct Taken {
    heads: [u16; FORWARD_BURST],
    bad: u32,
    len: usize,
}

// One bit of `Taken::bad` per chain of a burst.
const _: () = assert!(FORWARD_BURST <= 32);

impl Taken {
    fn new() -> Taken {
        Taken { heads: [0; FORWARD_BURST], bad: 0, len: 0 }
    }

    #[inline(always)]
    fn push(&mut self, head: u16, bad: bool) {
        if let Some(h) = self.heads.get_mut(self.len) {
            *h = head;
            self.bad |= u32::from(bad) << self.len;
            self.len += 1;
        }
    }
}

/// Reads a virtio-net header from its wire form: 12 bytes, or the 10-byte legacy layout
/// (`num_buffers` then reads as 0). Shorter input reads as zeroes past its end. For headers
/// that come from elsewhere, e.g. a TAP with `IFF_VNET_HDR`, before
/// [`NetDevice::enqueue_burst_with_headers`].
pub fn parse_header(bytes: &[u8]) -> VirtioNetHdr {
    read_header(bytes)
}

/// Small helpers around the core's zerocopy header type.
mod zerocopy_shim {
    use virtq::net::VirtioNetHdr;

    /// Reads a 10- or 12-byte header (missing `num_buffers` reads as 0). Fixed-size copies
    /// only: a variable-length one costs a `memset` and a `memcpy` call per frame.
    #[inline]
    pub fn read_header(bytes: &[u8]) -> VirtioNetHdr {
        let mut b = [0u8; 12];
        if let Some(full) = bytes.get(..12) {
            b.copy_from_slice(full);
        } else if let Some(legacy) = bytes.get(..10) {
            b[..10].copy_from_slice(legacy);
        }
        VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16::from_le_bytes([b[2], b[3]]).into(),
            gso_size: u16::from_le_bytes([b[4], b[5]]).into(),
            csum_start: u16::from_le_bytes([b[6], b[7]]).into(),
            csum_offset: u16::from_le_bytes([b[8], b[9]]).into(),
            num_buffers: u16::from_le_bytes([b[10], b[11]]).into(),
        }
    }
}

struct Queue {
    shared: Arc<Mutex<VringShared>>,
    stats: QueueStats,
    /// A transmit queue whose last [`NetDevice::forward_burst`] averaged more than
    /// [`COPY_LIMIT`] bytes a frame: its next burst is taken by the walk that leaves long
    /// frames in place. Only the thread that polls the ring reads and writes it.
    in_place: AtomicBool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VringShared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After a transmit burst that took `n` frames of `bytes` bytes (without their virtio-net
    /// headers): the way [`NetDevice::forward_burst`] takes the next ([`Queue::in_place`]).
    #[inline(always)]
    fn note_burst(&self, n: usize, bytes: u64) {
        if n != 0 {
            self.in_place.store(bytes > (n * (COPY_LIMIT - 12)) as u64, Ordering::Relaxed);
        }
    }
}

/// A vhost-user virtio-net device as the data path sees it. Cheap to clone; stays valid
/// across front-end reconnects (bursts simply move nothing while the rings are stopped).
#[derive(Clone)]
pub struct NetDevice {
    inner: Arc<NetInner>,
}

struct NetInner {
    name: String,
    queues: Vec<Queue>,
    /// Bit `n`: the receive queue of pair `n` is started and enabled ([`NetDevice::queue_ready`]),
    /// as of the last [`NetDevice::update_rx_pairs`]. Written by the control thread only; the
    /// data path reads it once per burst to pick a receive queue the guest uses.
    rx_pairs: AtomicU64,
    /// This device's limit for the line a dropped TX frame logs (every device may log it).
    tx_drops_log: RateLimit,
    /// This device's limit for the line a ring fault logs ([`NetDevice::fail`]): a front-end
    /// that breaks its rings over and over silences its own lines, not another device's.
    faults_log: RateLimit,
}

impl std::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice").field("name", &self.inner.name).field("queues", &self.inner.queues.len()).finish()
    }
}

impl NetDevice {
    /// Wraps a device's vrings (from [`crate::device::VhostUserDevice::vring_shared`]).
    pub fn new(name: &str, vrings: Vec<Arc<Mutex<VringShared>>>) -> NetDevice {
        let queues = vrings
            .into_iter()
            .map(|shared| Queue { shared, stats: QueueStats::default(), in_place: AtomicBool::new(false) })
            .collect();
        NetDevice {
            inner: Arc::new(NetInner {
                name: name.to_string(),
                queues,
                rx_pairs: AtomicU64::new(0),
                tx_drops_log: RateLimit::new(),
                faults_log: RateLimit::new(),
            }),
        }
    }

    /// The device's name (its socket path, or what the owner chose).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Number of queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        (self.inner.queues.len() / 2) as u16
    }

    /// Counters of virtqueue `index`.
    pub fn stats(&self, index: usize) -> QueueCounters {
        self.inner
            .queues
            .get(index)
            .map(|q| QueueCounters { faults: q.lock().faults, ..q.stats.snapshot() })
            .unwrap_or_default()
    }

    /// The features the guest negotiated, as the receive queue of pair `pair` runs with them;
    /// `None` while that queue is not started. A forwarding data path asks once per burst,
    /// and only for a burst holding frames with offloads (to decide, per receiver, what
    /// [`net::OffloadFrame::delivery`] takes).
    pub fn rx_features(&self, pair: u16) -> Option<VirtioFeatures> {
        let q = self.inner.queues.get(2 * pair as usize)?;
        let s = q.lock();
        s.active.as_ref().map(|a| a.features)
    }

    /// Counts `n` frames for the receive queue of pair `pair` as dropped before they reached
    /// it (e.g. larger than the port's MTU, or an offload its guest lacks with no fallback).
    pub fn count_rx_drops(&self, pair: u16, n: u64) {
        if let Some(q) = self.inner.queues.get(2 * pair as usize) {
            q.stats.add(0, 0, n, 0);
        }
    }

    /// The fault that stopped virtqueue `index`, while it is started and faulted.
    pub fn fault(&self, index: usize) -> Option<RingFault> {
        self.inner.queues.get(index).and_then(|q| q.lock().active.as_ref().and_then(|a| a.fault().copied()))
    }

    /// Records a fault of virtqueue `index` found by a burst (see [`VringShared::fail`]), and
    /// logs it once. A lost memory table is logged by the control loop, for the whole device.
    fn fail(&self, index: usize, s: &mut VringShared, fault: RingFault) {
        let memory = |s: &VringShared| {
            s.active.as_ref().and_then(|a| a.fault()).is_some_and(|f| matches!(f, RingFault::Memory(_)))
        };
        if s.fail(fault) && !memory(s) {
            limited_by!(
                self.inner.faults_log,
                warn,
                "{}: queue {index} stopped: {fault}; it restarts when the front-end sets it up again or resets the device",
                self.inner.name
            );
        }
    }

    /// The kick eventfd of virtqueue `index`, while the ring is started with one (for data
    /// paths that sleep instead of polling).
    pub fn kick_fd(&self, index: usize) -> Option<Arc<OwnedFd>> {
        let q = self.inner.queues.get(index)?;
        let s = q.shared.lock().unwrap_or_else(|p| p.into_inner());
        s.kick.clone()
    }

    /// Whether virtqueue `index` is started and enabled.
    pub fn queue_ready(&self, index: usize) -> bool {
        self.inner.queues.get(index).is_some_and(|q| {
            let s = q.shared.lock().unwrap_or_else(|p| p.into_inner());
            s.active.is_some() && s.enabled
        })
    }

    /// Recomputes which pairs can receive ([`NetDevice::rx_pairs`]) from the rings' state, for
    /// the control loop after every request and reset (the only times a ring is started,
    /// stopped, enabled or disabled). Returns the new set if it changed.
    ///
    /// The rule has one owner, [`NetDevice::queue_ready`]: the data path reads its result as
    /// one atomic per burst instead of locking every receive queue to find one the guest uses.
    /// [`crate::backend::Backend`] calls it; a control loop of its own must too (until then
    /// the set is empty and [`NetDevice::rx_pair`] gives `None`).
    pub fn update_rx_pairs(&self) -> Option<u64> {
        let pairs = (0..self.queue_pairs().min(64)).filter(|&p| self.queue_ready(2 * p as usize));
        let mask = pairs.fold(0u64, |m, p| m | 1 << p);
        let old = self.inner.rx_pairs.swap(mask, Ordering::Release);
        (old != mask).then_some(mask)
    }

    /// The pairs whose receive queue is started and enabled, bit `n` for pair `n` (the first 64
    /// pairs), as of the last [`NetDevice::update_rx_pairs`].
    pub fn rx_pairs(&self) -> u64 {
        self.inner.rx_pairs.load(Ordering::Acquire)
    }

    /// The receive pair for frames meant for pair `pair` (e.g. the pair they came in on):
    /// the `(pair % n)`-th of the `n` pairs the guest can receive on ([`NetDevice::rx_pairs`]),
    /// `None` if there is none. A driver may use fewer pairs than the device has (`ethtool -L
    /// eth0 combined 1`); a frame sent to a pair it disabled would be dropped. With every pair
    /// enabled, and whenever the enabled pairs are `0..n` (how Linux and DPDK reduce them),
    /// an enabled `pair` maps to itself.
    ///
    /// One atomic load per call and no lock: call it once per burst.
    #[inline]
    pub fn rx_pair(&self, pair: u16) -> Option<u16> {
        nth_pair(self.inner.rx_pairs.load(Ordering::Relaxed), pair)
    }

    /// Busy-poll mode for virtqueue `index`: asks the guest not to kick (`NO_NOTIFY`, or a
    /// stale `avail_event` with EVENT_IDX), saving it a VM exit per batch while the data path
    /// polls anyway.
    pub fn suppress_kicks(&self, index: usize) {
        let Some(q) = self.inner.queues.get(index) else { return };
        let mut s = q.lock();
        if let (Some(a), _, log) = s.burst_parts() {
            let _ = crate::with_ring!(a, |vq| {
                vq.disable_notifications();
                if let Some(log) = &log {
                    vq.log_suppression(log);
                    log.kick();
                }
            });
        }
    }

    /// Event-driven mode for virtqueue `index`: re-enables kicks and sleeps on the kick
    /// eventfd until the guest kicks or `timeout` passes. Returns `true` if there may be work
    /// (a kick came, or buffers were already waiting: the re-check after enabling closes the
    /// race with a guest that looked at the suppression field just before), `false` on
    /// timeout or while the ring is stopped.
    pub fn wait_for_work(&self, index: usize, timeout: std::time::Duration) -> bool {
        let Some(q) = self.inner.queues.get(index) else { return false };
        let kick = {
            let mut s = q.lock();
            let kick = s.kick.clone();
            let (Some(a), _, log) = s.burst_parts() else { return false };
            let enabled = crate::with_ring!(a, |vq| {
                let r = vq.enable_notifications();
                if let Some(log) = &log {
                    vq.log_suppression(log);
                    log.kick();
                }
                r
            });
            match enabled {
                Ok(Ok(true)) => return true,
                Ok(Ok(false)) => {}
                Ok(Err(PopError::AvailIndex(e))) => {
                    self.fail(index, &mut s, RingFault::AvailIndex(e));
                    return false;
                }
                Ok(Err(_)) => return true,
                Err(fault) => {
                    // Nothing to wait for until the front-end sets the ring up again.
                    self.fail(index, &mut s, fault);
                    drop(s);
                    std::thread::sleep(timeout);
                    return false;
                }
            }
            kick
        };
        let Some(kick) = kick else {
            // Polling ring (no kick fd): nothing to sleep on.
            std::thread::sleep(timeout.min(std::time::Duration::from_millis(1)));
            return true;
        };
        let mut pfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&*kick), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll on one valid pollfd for at most `ms` milliseconds.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n == 1 {
            let mut v = 0u64;
            // SAFETY: drains the eventfd counter into `v` (8 bytes); the fd is non-blocking or
            // readable, so this does not block.
            unsafe { libc::read(pfd.fd, (&mut v as *mut u64).cast(), 8) };
            return true;
        }
        false
    }

    /// Takes up to `frames.len()` frames the guest transmitted on pair `pair`. Returns how many
    /// of `frames` were filled. Malformed chains and headers are completed, dropped and
    /// counted as errors; on a started but disabled ring frames are drained and dropped
    /// (vhost-user.rst: "process and discard any TX packets").
    ///
    /// A function of its own ([`NetDevice::forward_burst`] calls it too: inlined there, its
    /// ring closure was not, and the copy path cost 10 instructions a frame more).
    #[inline(never)]
    pub fn dequeue_burst(&self, pair: u16, frames: &mut [TxFrame]) -> usize {
        let index = 2 * pair as usize + 1;
        let Some(q) = self.inner.queues.get(index) else { return 0 };
        let mut s = q.lock();
        let (Some(active), enabled, log) = s.burst_parts() else { return 0 };
        if active.fault().is_some() {
            return 0;
        }
        let features = active.features;
        let in_order = features.contains(VirtioFeatures::IN_ORDER);
        let mut broken = None;
        let (mut n, mut bytes, mut drops, mut errors) = (0usize, 0u64, 0u64, 0u64);
        let max = frames.len();
        let result = crate::with_ring!(active, |vq| {
            let mut taken = 0;
            // With IN_ORDER every chain is completed in the order taken, so a run of them is
            // completed at once (§2.7.8.2 / §2.8.9: one used entry for the last, the used
            // index moved past all): `(last head, count)`. A malformed chain ends the run, so
            // that completions stay in ring order.
            let mut run: Option<(u16, u16)> = None;
            // A chain taken, its readable part copied into `frames[$slot]` (`$slot >= n`): a
            // frame kept as `frames[n]`, or completed and dropped.
            macro_rules! took {
                ($c:expr, $slot:expr) => {
                    'chain: {
                        let c: CopiedChain = $c;
                        taken += 1;
                        if in_order {
                            run = Some((c.head, run.map_or(1, |(_, k)| k + 1)));
                        } else {
                            vq.push(c.head, 0);
                        }
                        if !enabled {
                            drops += 1;
                            break 'chain;
                        }
                        let frame = &mut frames[$slot];
                        // §5.1.6.2: the core's TX rules, the ones its tests and fuzzers run.
                        let Ok(pkt) = net::parse_tx_copied(&c, &frame.buf, features) else {
                            errors += 1;
                            break 'chain;
                        };
                        frame.hdr_len = pkt.header_len;
                        frame.len = pkt.header_len + pkt.frame_len as usize;
                        // A frame with offloads: its header must describe the frame, which a
                        // receiver's stack and the software fallback rely on. Checked on the
                        // copy, so the guest cannot change what was checked.
                        frame.offload = None;
                        // `flags` and `gso_type` are the header's first two bytes.
                        if frame.buf[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 || frame.buf[1] != VIRTIO_NET_HDR_GSO_NONE {
                            match net::check_frame(&pkt.header, frame.frame(), frame.len - frame.hdr_len) {
                                Ok(of) => frame.offload = Some(of),
                                Err(e) => {
                                    limited_by!(
                                        self.inner.tx_drops_log,
                                        warn,
                                        "{}: TX frame dropped: {e}",
                                        self.inner.name
                                    );
                                    errors += 1;
                                    break 'chain;
                                }
                            }
                        }
                        bytes += u64::from(pkt.frame_len);
                        // A frame copied past a dropped one moves down, so that the frames
                        // kept are `frames[..n]`.
                        if $slot != n {
                            frames.swap(n, $slot);
                        }
                        n += 1;
                    }
                };
            }
            while taken < max {
                // Packed rings: four chains of one descriptor at once, their buffers
                // prefetched together before the copies (the core's `pop_read_batch`); any
                // other chain, and what is left, is the single pop's.
                if batches(vq) && max - taken >= BATCH {
                    if let [a, b, c, d, ..] = &mut frames[n..] {
                        let got =
                            vq.pop_read_batch(&mut [&mut a.buf[..], &mut b.buf[..], &mut c.buf[..], &mut d.buf[..]]);
                        if !got.as_slice().is_empty() {
                            let base = n;
                            for (j, &c) in got.as_slice().iter().enumerate() {
                                took!(c, base + j);
                            }
                            continue;
                        }
                    }
                }
                match vq.pop_read_uncompleted(&mut frames[n].buf) {
                    Ok(Some(c)) => {
                        // A buffer a few chains ahead, so that the next frames' cross-CPU
                        // misses overlap this one's copy (packed rings only; benches/README.md).
                        vq.prefetch();
                        took!(c, n);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        taken += 1;
                        errors += 1;
                        // The run so far is still completed below.
                        if let Some(fault) = RingFault::on_pop_error(vq, &e) {
                            broken = Some(fault);
                            break;
                        }
                        // Completed with len 0 (the core's error policy), after the run.
                        if let PopError::Chain { head, .. } = e {
                            if let Some((last, k)) = run.take() {
                                let _ = vq.push_in_order_batch(last, 0, k);
                            }
                            vq.push(head, 0);
                        }
                    }
                }
            }
            if let Some((last, k)) = run {
                let _ = vq.push_in_order_batch(last, 0, k);
            }
            publish_tx(vq, &log, taken)
        });
        self.finish_burst(index, s, result, broken);
        q.stats.add(n as u64, bytes, drops, errors);
        q.note_burst(n, bytes);
        n
    }

    /// Takes up to [`FORWARD_BURST`] frames (and no more than `frames` holds) the guest
    /// transmitted on pair `pair`, for a data path that forwards them to other guests, and
    /// hands them to `deliver`. Returns how many frames were handed over.
    ///
    /// The cut-over between the two ways to take them ([`COPY_LIMIT`], where the figures
    /// are) is made per burst, on what the ring's last burst held: frames averaging at most
    /// `COPY_LIMIT` bytes (the usual small frames) are taken by [`NetDevice::dequeue_burst`]
    /// itself, each copied out whole and completed at once, and handed over as
    /// [`TxBurst::Copied`] once the ring is unlocked: their cost is that of the copy path to
    /// the instruction. After a burst of longer frames (a TCP stream's full-size or GSO
    /// frames), the next is taken by the walk that leaves each frame longer than
    /// `COPY_LIMIT` in the guest's buffers, to be copied once, straight into its receivers'
    /// ([`NetDevice::enqueue_gather_burst_outcome`]), and completed after `deliver` returns
    /// ([`TxBurst::InPlace`], with the ring locked); the shorter frames of that burst are
    /// still copied out whole. A burst is made of one kind of frames far more often than not
    /// (a stream's data one way, its ACKs the other), and either way every frame arrives:
    /// the choice only decides how many copies it costs. (Deciding per frame in one walk
    /// instead cost the copy path 7 instructions a frame, 1 %, in register pressure.)
    ///
    /// Everything about a frame is decided on a copy: the whole frame, or for a frame in place
    /// its first bytes ([`TX_HEAD`], extended to [`TX_SNAPSHOT`] for a frame with offloads).
    /// Both take the same rules: the header rules ([`net::parse_tx_copied`], which holds both
    /// to a frame of `MAX_TX_FRAME` at most), the offload check ([`net::check_frame`]), and
    /// whatever `deliver` reads from [`InPlaceFrame::head`] (a switch's forwarding). A
    /// receiver gets those bytes from the copy too, so a guest that rewrites its buffers
    /// while the frame is copied changes only its payload. The rest is read through the
    /// segments the chain walk validated (a buffer outside guest memory is a malformed chain,
    /// completed and counted as here always), from the mapping whose `SIGBUS` is caught
    /// ([`crate::memory::fault`]): the transmit ring holds that mapping, and it stays locked
    /// until the copies are done. A chain whose pieces do not find room in its list (20, more
    /// than Linux sends) is copied out whole.
    ///
    /// While a [`TxBurst::InPlace`] burst is delivered the transmit ring stays locked:
    /// `deliver` may lock receive rings (of any device, this one's too), never a transmit
    /// ring (the module's lock order). Malformed chains and headers, and frames on a disabled
    /// ring, are handled as by [`NetDevice::dequeue_burst`]; with `IN_ORDER` completions stay
    /// in ring order (those after a frame in place wait for it). `frames` should hold
    /// [`MAX_TX_FRAME`] bytes each, as for `dequeue_burst`.
    pub fn forward_burst(&self, pair: u16, frames: &mut [TxFrame], deliver: impl FnOnce(TxBurst<'_, '_>)) -> usize {
        let Some(q) = self.inner.queues.get(2 * pair as usize + 1) else { return 0 };
        if q.in_place.load(Ordering::Relaxed) {
            return self.forward_in_place(pair, frames, deliver);
        }
        let max = frames.len().min(FORWARD_BURST);
        let n = self.dequeue_burst(pair, &mut frames[..max]);
        if n != 0 {
            deliver(TxBurst::Copied(&frames[..n]));
        }
        n
    }

    /// The burst of [`NetDevice::forward_burst`] that leaves frames longer than
    /// [`COPY_LIMIT`] in place: a slot of `frames` per chain taken (its copy) with a list of
    /// the pieces past the copy, and every frame handed over as an [`InPlaceFrame`] as it is
    /// taken.
    fn forward_in_place(&self, pair: u16, frames: &mut [TxFrame], deliver: impl FnOnce(TxBurst<'_, '_>)) -> usize {
        let index = 2 * pair as usize + 1;
        let Some(q) = self.inner.queues.get(index) else { return 0 };
        let mut s = q.lock();
        let (Some(active), enabled, log) = s.burst_parts() else { return 0 };
        if active.fault().is_some() {
            return 0;
        }
        let features = active.features;
        let in_order = features.contains(VirtioFeatures::IN_ORDER);
        let mut broken = None;
        let (mut n, mut bytes, mut drops, mut errors) = (0usize, 0u64, 0u64, 0u64);
        let result = crate::with_ring!(active, |vq| {
            let mut taken = 0;
            // With IN_ORDER a run of chains is completed at once (§2.7.8.2 / §2.8.9: one used
            // entry for the last, the used index moved past all): `(last head, count)`. A
            // malformed chain ends the run, so that completions stay in ring order.
            let mut run: Option<(u16, u16)> = None;
            // The chains whose completion waits for the copies, in ring order: the frames
            // in place, and with IN_ORDER every chain after the first of them.
            let mut held = Taken::new();
            // A chain completed as it is taken (in ring order behind what `held` keeps).
            macro_rules! complete {
                ($head:expr) => {
                    if !in_order {
                        vq.push($head, 0);
                    } else if held.len == 0 {
                        run = Some(($head, run.map_or(1, |(_, k)| k + 1)));
                    } else {
                        held.push($head, false);
                    }
                };
            }
            // Per chain taken, a slot: a frame's copy and the list of its pieces past the
            // copy (none for a chain copied whole). A frame handed over borrows its slot.
            let mut lists: [Segments<'_, TX_SEGMENTS>; FORWARD_BURST] = core::array::from_fn(|_| Segments::new());
            let mut burst: heapless::Vec<InPlaceFrame<'_>, FORWARD_BURST> = heapless::Vec::new();
            for (frame, list) in frames.iter_mut().zip(lists.iter_mut()) {
                // The first bytes a frame left in place keeps copied, the rest listed.
                match vq.pop_gather_uncompleted(&mut frame.buf, TX_HEAD, list) {
                    Ok(Some(c)) => {
                        taken += 1;
                        let mut copied = c.bytes as usize;
                        // A short chain is copied out whole after all.
                        let len = c.readable_len as usize;
                        if copied < len && len <= COPY_LIMIT.min(frame.buf.len()) {
                            copied += list.take_front(0, &mut frame.buf[copied..len]);
                        }
                        // The copy holds the chain whole: the frame is the device's from here
                        // on. (A chain longer than the buffer is cut, and refused below.)
                        let whole = copied == len;
                        if whole {
                            complete!(c.head);
                        }
                        // A chain left in place that is not handed over is completed now.
                        macro_rules! drop_chain {
                            () => {
                                if !whole {
                                    complete!(c.head);
                                }
                            };
                        }
                        if !enabled {
                            drops += 1;
                            drop_chain!();
                            continue;
                        }
                        // §5.1.6.2: the core's TX rules, the ones its tests and fuzzers run,
                        // on the copy, whose header they read. A frame in place is not cut:
                        // its copy and the pieces past it hold it whole (`bytes` is all of
                        // it), and it is held to the same limit as one copied out (the
                        // buffer's length, a 64 KiB GSO frame), so that no receiver or
                        // fallback buffer needs more.
                        let whole_chain = CopiedChain { bytes: c.readable_len, ..c };
                        let Ok(pkt) = net::parse_tx_copied(&whole_chain, &frame.buf, features) else {
                            errors += 1;
                            drop_chain!();
                            continue;
                        };
                        frame.hdr_len = pkt.header_len;
                        // The copy: the whole frame, or the first bytes of one in place.
                        frame.len = copied;
                        // A frame with offloads: its header must describe the frame, which a
                        // receiver's stack and the software fallback rely on. Checked on the
                        // copy (extended first to every header `check_frame` may read, for a
                        // frame in place), so the guest cannot change what was checked.
                        frame.offload = None;
                        // `flags` and `gso_type` are the header's first two bytes.
                        if frame.buf[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 || frame.buf[1] != VIRTIO_NET_HDR_GSO_NONE {
                            let end = TX_SNAPSHOT.min(frame.buf.len());
                            if !whole && frame.len < end {
                                frame.len += list.take_front(0, &mut frame.buf[frame.len..end]);
                            }
                            let head = &frame.buf[frame.hdr_len..frame.len];
                            match net::check_frame(&pkt.header, head, pkt.frame_len as usize) {
                                Ok(of) => frame.offload = Some(of),
                                Err(e) => {
                                    limited_by!(
                                        self.inner.tx_drops_log,
                                        warn,
                                        "{}: TX frame dropped: {e}",
                                        self.inner.name
                                    );
                                    errors += 1;
                                    drop_chain!();
                                    continue;
                                }
                            }
                        }
                        if !whole {
                            held.push(c.head, false);
                        }
                        bytes += u64::from(pkt.frame_len);
                        // From here on the slot is only read: the frame handed over borrows it.
                        // `frame.len <= readable_len`: the copy is part of the chain.
                        let rest = (c.readable_len as usize).saturating_sub(frame.len);
                        let (frame, list): (&TxFrame, &Segments<'_, TX_SEGMENTS>) = (frame, list);
                        let head = frame.buf.get(frame.hdr_len..frame.len).unwrap_or(&[]);
                        let bytes = if whole { Gather::slice(head) } else { Gather::new(head, list.as_slice(), rest) };
                        // A slot per chain taken, at most FORWARD_BURST: always room.
                        if burst.push(InPlaceFrame { offload: frame.offload.as_ref(), bytes }).is_ok() {
                            n += 1;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        taken += 1;
                        errors += 1;
                        // What was taken before is still delivered and completed.
                        if let Some(fault) = RingFault::on_pop_error(vq, &e) {
                            broken = Some(fault);
                            break;
                        }
                        // Completed with len 0 (the core's error policy), after the run, or
                        // in order behind the frames in place.
                        if let PopError::Chain { head, .. } = e {
                            if in_order && held.len != 0 {
                                held.push(head, true);
                            } else {
                                if let Some((last, k)) = run.take() {
                                    let _ = vq.push_in_order_batch(last, 0, k);
                                }
                                vq.push(head, 0);
                            }
                        }
                    }
                }
            }
            // The run before the first frame in place, if any: copied chains, in ring order.
            if let Some((last, k)) = run {
                let _ = vq.push_in_order_batch(last, 0, k);
            }
            // Handed over with the ring locked (even a burst whose frames were all copied out:
            // its slots are not `frames[..n]`), the chains left in place completed once every
            // copy is made.
            if n != 0 {
                deliver(TxBurst::InPlace(&burst));
            }
            complete_tx(vq, &held, in_order);
            publish_tx(vq, &log, taken)
        });
        self.finish_burst(index, s, result, broken);
        q.stats.add(n as u64, bytes, drops, errors);
        q.note_burst(n, bytes);
        n
    }

    /// Gives `frames` to the guest on pair `pair` (each with a zero virtio-net header, or with
    /// `MRG_RXBUF` as merged buffers). Returns how many were placed; the rest found no buffers
    /// (or the ring is stopped or disabled) and are dropped and counted by the caller's choice:
    /// they are counted here as drops.
    pub fn enqueue_burst(&self, pair: u16, frames: &[&[u8]]) -> usize {
        self.enqueue_burst_outcome(pair, frames).placed
    }

    /// [`NetDevice::enqueue_burst`], telling apart frames refused one by one (too large for
    /// the guest's buffers) from a ring that ran out of buffers: a sender with more frames
    /// for this guest stops only on the latter.
    pub fn enqueue_burst_outcome(&self, pair: u16, frames: &[&[u8]]) -> Enqueued {
        let zero = VirtioNetHdr::default();
        self.enqueue(pair, frames.len(), |i| (zero, frames[i]))
    }

    /// Like [`NetDevice::enqueue_burst`], each frame with its own virtio-net header, e.g. the
    /// one a TAP with `IFF_VNET_HDR` handed over with it ([`parse_header`]). The header's
    /// offload fields (`flags`, `gso_type`, `hdr_len`, `gso_size`, `csum_start`,
    /// `csum_offset`) reach the guest as given; `num_buffers` is set here.
    ///
    /// A header that asks for an offload the driver did not negotiate (§5.1.6.4.1:
    /// `NEEDS_CSUM` without `GUEST_CSUM`, a GSO type without its `GUEST_TSO4`/`TSO6`/`UFO`/
    /// `USO` feature, the ECN bit without `GUEST_ECN`, `RSC_INFO`) never reaches the guest:
    /// the frame is dropped and counted as an error (and a drop). The one exception is
    /// `DATA_VALID`, a hint that does not change the frame: without `GUEST_CSUM` it is
    /// cleared ("the device MUST set flags to zero") and the frame is delivered, so a TAP
    /// that marks a frame it already checked still reaches a driver without checksum offload.
    /// Both rules are the core's ([`virtq::net::receive_burst`]).
    pub fn enqueue_burst_with_headers(&self, pair: u16, frames: &[(VirtioNetHdr, &[u8])]) -> usize {
        self.enqueue_burst_with_headers_outcome(pair, frames).placed
    }

    /// [`NetDevice::enqueue_burst_with_headers`] with the [`Enqueued`] outcome.
    pub fn enqueue_burst_with_headers_outcome(&self, pair: u16, frames: &[(VirtioNetHdr, &[u8])]) -> Enqueued {
        self.enqueue(pair, frames.len(), |i| frames[i])
    }

    /// [`NetDevice::enqueue_burst_outcome`] for frames that may still be in another guest's
    /// transmit buffers ([`InPlaceFrame::bytes`], [`TxBurst::InPlace`]): each is copied from
    /// there into this guest's buffers, once. The same rules; the receive burst is the same
    /// code, compiled for [`Gather`] frames (in this crate, as the slices' is, so that both
    /// are inlined alike).
    pub fn enqueue_gather_burst_outcome(&self, pair: u16, frames: &[Gather<'_>]) -> Enqueued {
        let zero = VirtioNetHdr::default();
        self.enqueue(pair, frames.len(), |i| (zero, frames[i]))
    }

    /// [`NetDevice::enqueue_burst_with_headers_outcome`] for frames that may still be in
    /// another guest's transmit buffers ([`NetDevice::enqueue_gather_burst_outcome`]).
    pub fn enqueue_gather_burst_with_headers_outcome(
        &self,
        pair: u16,
        frames: &[(VirtioNetHdr, Gather<'_>)],
    ) -> Enqueued {
        self.enqueue(pair, frames.len(), |i| frames[i])
    }

    /// The RX burst behind every enqueue variant: `frame(i)` is the header and frame of the
    /// `i`-th of `count` frames.
    #[inline(always)]
    fn enqueue<S: FrameSource>(&self, pair: u16, count: usize, frame: impl Fn(usize) -> (VirtioNetHdr, S)) -> Enqueued {
        let index = 2 * pair as usize;
        let Some(q) = self.inner.queues.get(index) else { return Enqueued { placed: 0, full: true } };
        let mut s = q.lock();
        let (Some(active), true, log) = s.burst_parts() else {
            drop(s);
            q.stats.add(0, 0, count as u64, 0);
            return Enqueued { placed: 0, full: true };
        };
        if active.fault().is_some() {
            drop(s);
            q.stats.add(0, 0, count as u64, 0);
            return Enqueued { placed: 0, full: true };
        }
        let features: VirtioFeatures = active.features;
        let mut burst = net::RxBurst::default();
        let result = crate::with_ring!(active, |vq| {
            let mut scratch: RxScratch<'_> = RxScratch::new();
            // While migrating, every buffer and used-ring write is marked in the dirty log;
            // otherwise this is the same code without it (one branch per burst).
            match &log {
                None => {
                    burst = net::receive_burst(vq, &mut scratch, features, count, frame);
                    vq.publish()
                }
                Some(log) => {
                    burst = net::receive_burst_logged(vq, &mut scratch, features, count, frame, log);
                    let notify = vq.publish_logged(log);
                    // Buffers reserved and given back were written (and marked) too.
                    if count != 0 {
                        log.kick();
                    }
                    notify
                }
            }
        });
        let (n, bytes) = (burst.placed, burst.bytes);
        let mut errors = burst.refused as u64 + u64::from(burst.bad_chains);
        let broken = match burst.stopped {
            Some(net::RxError::Ring(PopError::AvailIndex(e))) => Some(RingFault::AvailIndex(e)),
            // The core stops on a chain with no id to complete it only where that loses the
            // driver's place (`PopError::unreturnable_on`), as guest TX does above. The chain
            // counts as an error, as it does where the burst goes on past it.
            Some(net::RxError::Ring(PopError::HeadOutOfRange { head } | PopError::IdInUse { id: head })) => {
                errors += 1;
                Some(RingFault::Unreturnable { head })
            }
            _ => None,
        };
        let unserved = result.is_err();
        self.finish_burst(index, s, result, broken);
        q.stats.add(n as u64, bytes, (count - n) as u64, errors);
        // A ring that could not be served at all (a fault found at this burst) takes nothing
        // more either.
        Enqueued { placed: n, full: burst.stopped.is_some() || unserved }
    }

    /// After a burst: records a fault found on the way and signals the guest if its
    /// notification suppression asked for it ([`crate::vring::finish_burst`]).
    #[inline(always)]
    fn finish_burst(
        &self,
        index: usize,
        s: std::sync::MutexGuard<'_, VringShared>,
        result: Result<bool, RingFault>,
        broken: Option<RingFault>,
    ) {
        crate::vring::finish_burst(s, result, broken, |s, fault| self.fail(index, s, fault));
    }
}

/// The `(pair % n)`-th set bit of `mask`, which has `n` bits set; `None` for an empty mask.
#[inline]
fn nth_pair(mask: u64, pair: u16) -> Option<u16> {
    let n = mask.count_ones();
    if n == 0 {
        return None;
    }
    let mut m = mask;
    for _ in 0..u32::from(pair) % n {
        m &= m - 1; // clears the lowest set bit
    }
    Some(m.trailing_zeros() as u16)
}

#[cfg(test)]
mod tests {
    use super::nth_pair;

    #[test]
    fn frames_for_a_disabled_pair_go_to_the_enabled_ones() {
        assert_eq!(nth_pair(0, 0), None, "no pair can receive");
        // Every pair enabled: each pair maps to itself, larger indices wrap.
        for p in 0..4 {
            assert_eq!(nth_pair(0b1111, p), Some(p));
        }
        assert_eq!(nth_pair(0b1111, 6), Some(2));
        // `ethtool -L combined 1` on a 2-pair device: everything to pair 0.
        assert_eq!((nth_pair(0b01, 0), nth_pair(0b01, 1)), (Some(0), Some(0)));
        // Only pair 1 enabled.
        assert_eq!((nth_pair(0b10, 0), nth_pair(0b10, 1)), (Some(1), Some(1)));
        // Pairs 1 and 3 of 4: spread over both, never onto 0 or 2.
        let got: Vec<_> = (0..4).map(|p| nth_pair(0b1010, p)).collect();
        assert_eq!(got, [Some(1), Some(3), Some(1), Some(3)]);
        // The 64th pair is reachable.
        assert_eq!(nth_pair(1 << 63, 5), Some(63));
        assert_eq!(nth_pair(u64::MAX, 63), Some(63));
    }
}
