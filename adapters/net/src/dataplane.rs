//! The forwarding loop: takes bursts from every vhost-user port and TAP, and delivers them to
//! the port's back-end (its TAP, the switch, or back to itself), batching per destination so
//! that each destination queue is locked and notified once per burst.
//!
//! The ports and the switch are a [`Fabric`] that one or more data-plane threads
//! ([`Dataplane`], one per `--pmd-cpus` CPU) share; each ring is polled by one thread, and ports
//! come and go while the threads run.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtq::net::header::VIRTIO_NET_HDR_F_NEEDS_CSUM;
use virtq::net::header::VIRTIO_NET_HDR_GSO_NONE;
use virtq::net::{check_frame, complete_csum, Delivery, FrameSource, Gather, OffloadFrame, Segmenter, VirtioNetHdr};
use virtq::VirtioFeatures;
use virtq_vhost_user::limited;
use virtq_vhost_user::net::{
    parse_header, rarp_announce, Enqueued, InPlaceFrame, NetDevice, TxBurst, TxFrame, MAX_TX_FRAME,
};

use crate::generate;
use crate::nic::{Nic, NicQueue, Sent, NIC_HDR_LEN};
use crate::switch::{Forward, PortId, Switch};
use crate::tap::{TapQueue, TAP_BUF_LEN, TAP_HDR_LEN};

/// Frames per burst.
pub const BURST: usize = 32;

/// What a vhost-user port is connected to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortBackend {
    /// The L2 switch shared by every switch port and switch TAP.
    Switch,
    /// Frames go back to the guest they came from.
    Reflect,
    /// A host TAP device of this name (one TAP queue per queue pair).
    Tap(String),
    /// Frames from the guest are counted and discarded (a benchmark sink, like testpmd's
    /// `rxonly`).
    Sink,
    /// The guest receives a UDP frame of this many bytes whenever it has a free buffer (a
    /// benchmark source, like testpmd's `txonly`); what it sends is counted and discarded.
    Source(usize),
}

/// MAC addresses a port's front-end asked to announce (`SEND_RARP` after a live migration),
/// handed from the control thread to the data plane.
#[derive(Debug, Default)]
pub struct Announcements {
    pending: AtomicBool,
    macs: Mutex<Vec<[u8; 6]>>,
}

impl Announcements {
    /// Queues `mac` (control thread).
    pub fn push(&self, mac: [u8; 6]) {
        self.macs.lock().unwrap_or_else(|p| p.into_inner()).push(mac);
        self.pending.store(true, Ordering::Release);
    }

    /// The queued addresses, if any (data plane; one atomic load when there are none).
    fn take(&self) -> Vec<[u8; 6]> {
        if !self.pending.swap(false, Ordering::Acquire) {
            return Vec::new();
        }
        std::mem::take(&mut *self.macs.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A port of the data plane.
pub enum Port {
    /// A vhost-user device.
    Vhost {
        /// The device.
        dev: NetDevice,
        /// Its back-end.
        backend: PortBackend,
        /// Its TAP queues, for `PortBackend::Tap`.
        tap: Vec<TapQueue>,
        /// RARP announcements its front-end asked for.
        announce: Arc<Announcements>,
        /// Its MTU (advertised with `VIRTIO_NET_F_MTU`): the switch delivers no larger frame
        /// to it, but GSO frames its guest takes as they are.
        mtu: u16,
    },
    /// A TAP device attached to the switch.
    SwitchTap {
        /// Its name.
        name: String,
        /// Its queues.
        queues: Vec<TapQueue>,
        /// Its counters, shared with whoever reports statistics.
        counters: Arc<TapCounters>,
    },
    /// A host network interface attached to the switch (`--nic`), through AF_XDP or
    /// AF_PACKET; its queues carry their own counters.
    Nic(Nic),
}

/// Counters of a TAP attached to the switch (updated once per burst).
#[derive(Debug, Default)]
pub struct TapCounters {
    /// Frames read from the TAP.
    pub rx: AtomicU64,
    /// Frames written to the TAP.
    pub tx: AtomicU64,
    /// Frames the TAP could not take.
    pub drops: AtomicU64,
}

/// A port as the data plane holds it: the port, and which data-plane thread polls each of its
/// rings.
pub struct PortEntry {
    /// The port.
    pub port: Port,
    /// For each queue pair (vhost-user; its TAP queue too for a tap port) or queue (a TAP on
    /// the switch), the index of the thread that polls it. Fixed when the port is added, so a
    /// front-end that reconnects finds its rings on the same threads.
    pub threads: Vec<usize>,
}

/// What every data-plane thread shares: the ports and the switch. Ports come and go at run time
/// ([`Fabric::add`], [`Fabric::remove`]); each thread picks up a change at its next pass (one
/// atomic load per pass when nothing changed).
///
/// Threads share no lock per frame. The switch's table is locked once per burst, for the
/// forwarding decisions of the whole burst; a burst for a port that another thread polls is
/// handed over by placing it in that port's receive ring, whose lock is taken once per burst
/// (as for any delivery).
pub struct Fabric {
    ports: Mutex<PortTable>,
    /// Bumped on every change of `ports`.
    generation: AtomicU64,
    switch: Mutex<Switch>,
    threads: Vec<Arc<ThreadStats>>,
}

/// The ports, by [`PortId`]. A removed port leaves `None`; its number is reused only once
/// every thread has let go of it ([`Fabric::remove`]).
#[derive(Default)]
struct PortTable {
    ports: Vec<Option<Arc<PortEntry>>>,
    /// Numbers of removed ports that every thread has let go of and whose addresses the
    /// switch forgot: the next ports take them, so that the table (and the per-burst work
    /// over it) grows with the ports alive, not with every port ever added.
    free: Vec<PortId>,
    /// Rings assigned so far: the next ring goes to thread `assigned % threads`.
    assigned: usize,
}

/// Counters of one data-plane thread (as OVS's `pmd-stats-show`): time spent on passes that
/// moved frames and on passes that found none, in the units of [`ThreadStats::CLOCK`].
#[derive(Debug, Default)]
pub struct ThreadStats {
    /// The CPU it is pinned to, if any.
    pub cpu: Option<usize>,
    /// Clock units spent in passes that moved frames.
    pub busy: AtomicU64,
    /// Clock units spent in passes that moved none, sleeping included.
    pub idle: AtomicU64,
    /// Frames moved (taken from a ring, a TAP or a NIC, or generated).
    pub frames: AtomicU64,
    /// Ring groups this thread polls: queue pairs of vhost-user ports, queues of switch TAPs.
    pub rings: AtomicU64,
    /// The fabric generation whose ports this thread polls (see [`Fabric::remove`]).
    seen: AtomicU64,
    /// The thread is in [`Dataplane::run`].
    running: AtomicBool,
}

impl ThreadStats {
    /// The unit of `busy` and `idle`: CPU time-stamp counter cycles on x86_64, nanoseconds
    /// elsewhere.
    pub const CLOCK: &'static str = if cfg!(target_arch = "x86_64") { "tsc-cycles" } else { "ns" };
}

/// A reading of the clock of [`ThreadStats::CLOCK`].
#[inline]
fn clock() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC reads the time-stamp counter; it has no memory effects and every
        // x86_64 CPU has it.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        use std::sync::OnceLock;
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

impl Fabric {
    /// An empty fabric for `threads` data-plane threads (at least one), pinned to `cpus[i]`
    /// where given.
    pub fn new(threads: usize, cpus: &[usize]) -> Arc<Fabric> {
        let threads = (0..threads.max(1))
            .map(|i| Arc::new(ThreadStats { cpu: cpus.get(i).copied(), ..ThreadStats::default() }))
            .collect();
        Arc::new(Fabric {
            ports: Mutex::default(),
            generation: AtomicU64::new(0),
            // 4096 addresses, at most 1024 behind one port (Linux bridge's `max_learned`, per port).
            switch: Mutex::new(Switch::new(Duration::from_secs(300), 4096, 1024)),
            threads,
        })
    }

    /// Number of data-plane threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// The counters of thread `i`.
    pub fn thread_stats(&self, i: usize) -> &ThreadStats {
        &self.threads[i]
    }

    /// Adds a port; its rings are assigned to the threads round-robin, continuing from the
    /// last port's. Returns its number.
    pub fn add(&self, port: Port) -> PortId {
        let mut t = self.lock();
        let rings = match &port {
            Port::Vhost { dev, .. } => dev.queue_pairs() as usize,
            Port::SwitchTap { queues, .. } => queues.len(),
            Port::Nic(nic) => nic.queues().len(),
        };
        let n = self.threads.len();
        let threads: Vec<usize> = (0..rings).map(|r| (t.assigned + r) % n).collect();
        t.assigned += rings;
        for &th in &threads {
            self.threads[th].rings.fetch_add(1, Ordering::Relaxed);
        }
        let entry = Some(Arc::new(PortEntry { port, threads }));
        let id = match t.free.pop() {
            Some(id) => {
                t.ports[id] = entry;
                id
            }
            None => {
                t.ports.push(entry);
                t.ports.len() - 1
            }
        };
        self.generation.fetch_add(1, Ordering::Release);
        id
    }

    /// Removes port `id`: waits until every running data-plane thread has let go of it (each
    /// does at its next pass, within a millisecond or a burst; at most 2 s), then forgets the
    /// addresses the switch learned behind it, so that no burst still in flight learns them
    /// again. Returns the entry, so that the caller releases the port (closes a NIC, a TAP)
    /// on its own thread rather than a data-plane thread. A burst in flight to the port
    /// before that goes to a device already stopped (counted as drops) or to a NIC or TAP
    /// still open.
    pub fn remove(&self, id: PortId) -> Option<Arc<PortEntry>> {
        let (entry, generation) = {
            let mut t = self.lock();
            let entry = t.ports.get_mut(id)?.take()?;
            (entry, self.generation.fetch_add(1, Ordering::Release) + 1)
        };
        for &th in &entry.threads {
            self.threads[th].rings.fetch_sub(1, Ordering::Relaxed);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut released = true;
        while self
            .threads
            .iter()
            .any(|t| t.running.load(Ordering::Acquire) && t.seen.load(Ordering::Acquire) < generation)
        {
            if Instant::now() > deadline {
                limited!(warn, "virtq-net: a data-plane thread did not let go of port {id} within 2 s");
                released = false;
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        self.switch.lock().unwrap_or_else(|p| p.into_inner()).forget_port(id);
        // A number some thread may still use for the old port is not given to a new one.
        if released {
            self.lock().free.push(id);
        }
        Some(entry)
    }

    /// The ports, by number (`None`: removed).
    pub fn ports(&self) -> Vec<Option<Arc<PortEntry>>> {
        self.lock().ports.clone()
    }

    /// Addresses the switch refused to learn (its limits, [`Switch::new`]).
    pub fn refused_addresses(&self) -> u64 {
        self.switch.lock().unwrap_or_else(|p| p.into_inner()).refused()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PortTable> {
        self.ports.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One ring (or ring group) a thread polls.
#[derive(Clone, Copy, Debug)]
enum Ring {
    /// A vhost-user port's pair: its TX queue, its TAP queue for a tap port, its generator
    /// for a source port.
    Pair(PortId, u16),
    /// A queue of a TAP on the switch.
    SwitchTap(PortId, usize),
    /// A queue of a NIC on the switch.
    Nic(PortId, usize),
}

/// One data-plane thread: the rings it polls, the ports as it last saw them, reusable buffers.
pub struct Dataplane {
    fabric: Arc<Fabric>,
    /// This thread's index in the fabric.
    index: usize,
    /// The fabric's generation `ports` was taken at.
    generation: u64,
    ports: Vec<Option<Arc<PortEntry>>>,
    rings: Vec<Ring>,
    /// Frames taken from a guest's ring: copied out whole, or the copy of the first bytes of
    /// a frame handed over in place (`NetDevice::forward_burst`).
    frames: Vec<TxFrame>,
    /// Where frames completed or segmented for a receiver are written.
    fallback: Fallback,
    tap_bufs: Vec<Vec<u8>>,
    /// Per destination port, indices of the frames of the current burst going there.
    dest: Vec<Vec<usize>>,
    /// Ports with a `Source` back-end and the frame each one offers.
    sources: Vec<(PortId, Vec<u8>)>,
    busy_poll: bool,
    /// Counters not yet published to the fabric's [`ThreadStats`]: busy, idle, frames.
    pending: (u64, u64, u64),
}

/// How often the data plane re-asks every ring not to kick (rings started since get it too).
const SUPPRESS_EVERY: Duration = Duration::from_millis(100);

impl Dataplane {
    /// A data plane of one thread over `ports` (what a single-threaded user, a test or a
    /// benchmark wants); with `busy_poll` it never sleeps.
    pub fn new(ports: Vec<Port>, busy_poll: bool) -> Dataplane {
        let fabric = Fabric::new(1, &[]);
        for p in ports {
            fabric.add(p);
        }
        Dataplane::worker(fabric, 0, busy_poll)
    }

    /// Thread `index` of `fabric`.
    pub fn worker(fabric: Arc<Fabric>, index: usize, busy_poll: bool) -> Dataplane {
        let mut dp = Dataplane {
            fabric,
            index,
            generation: u64::MAX,
            ports: Vec::new(),
            rings: Vec::new(),
            frames: (0..BURST).map(|_| TxFrame::with_capacity(MAX_TX_FRAME)).collect(),
            fallback: Fallback::new(),
            tap_bufs: (0..BURST).map(|_| vec![0u8; TAP_BUF_LEN]).collect(),
            dest: Vec::new(),
            sources: Vec::new(),
            busy_poll,
            pending: (0, 0, 0),
        };
        dp.refresh();
        dp
    }

    /// Takes the fabric's ports again if they changed since the last look: the rings this
    /// thread polls, and the destinations it can deliver to. Allocates, but only when a port
    /// was added or removed.
    #[cold]
    fn refresh(&mut self) {
        // Ports and generation read under the table's lock, so they belong together.
        let (ports, generation) = {
            let t = self.fabric.lock();
            (t.ports.clone(), self.fabric.generation.load(Ordering::Acquire))
        };
        // The old entries go before the thread says it has let go of them.
        self.ports = ports;
        self.generation = generation;
        self.fabric.threads[self.index].seen.store(generation, Ordering::Release);
        self.rings.clear();
        self.sources.clear();
        for (p, e) in self.ports.iter().enumerate() {
            let Some(e) = e else { continue };
            let mine = e.threads.iter().enumerate().filter(|&(_, &t)| t == self.index).map(|(r, _)| r);
            match &e.port {
                Port::Vhost { backend, .. } => {
                    self.rings.extend(mine.map(|r| Ring::Pair(p, r as u16)));
                    if let PortBackend::Source(size) = backend {
                        self.sources.push((p, generate::udp_frame(*size)));
                    }
                }
                Port::SwitchTap { .. } => self.rings.extend(mine.map(|q| Ring::SwitchTap(p, q))),
                Port::Nic(_) => self.rings.extend(mine.map(|q| Ring::Nic(p, q))),
            }
        }
        // (`vec![v; n]` would clone, and clones have no capacity: no allocation per burst.)
        self.dest = (0..self.ports.len()).map(|_| Vec::with_capacity(BURST)).collect();
    }

    /// Runs until `stop` is set. Busy-polls while there is traffic, then backs off with short
    /// sleeps (up to 1 ms) unless busy-polling was asked for. The rings are polled, never
    /// waited on, so the guest is asked not to kick at all (§2.7.10): a kick costs it a VM exit
    /// or a syscall per batch.
    pub fn run(&mut self, stop: &AtomicBool) {
        let me = Arc::clone(&self.fabric.threads[self.index]);
        me.running.store(true, Ordering::Release);
        if let Some(cpu) = self.fabric.threads[self.index].cpu {
            if let Err(e) = pin_to_cpu(cpu) {
                limited!(warn, "virtq-net: data-plane thread {}: pinning to CPU {cpu}: {e}", self.index);
            }
        }
        let mut idle = 0u32;
        let mut loops = 0u32;
        let mut last_expire = Instant::now();
        let mut last_suppress: Option<Instant> = None;
        let mut then = clock();
        while !stop.load(Ordering::Relaxed) {
            // Housekeeping reads the clock, which costs as much as moving a few frames: only
            // every 1024 passes, or when about to sleep. (Reading it on every idle pass of a
            // busy-polling loop took 30% of the back-end's samples in `perf record -e
            // cpu-clock` of the tx64 benchmark.) The cycle counter read per pass for the
            // statistics is cheaper (RDTSC, no vDSO call).
            loops = loops.wrapping_add(1);
            let sleeping = !self.busy_poll && idle > 64;
            if sleeping || loops.is_multiple_of(1024) {
                if last_suppress.is_none_or(|t| t.elapsed() >= SUPPRESS_EVERY) {
                    self.suppress_kicks();
                    last_suppress = Some(Instant::now());
                }
                self.announce();
                self.flush_nics();
                // One thread ages the shared table.
                if self.index == 0 && last_expire.elapsed() > Duration::from_secs(10) {
                    self.fabric.switch.lock().unwrap_or_else(|p| p.into_inner()).expire(Instant::now());
                    last_expire = Instant::now();
                }
                self.publish();
            }
            let work = self.poll_once();
            if work > 0 {
                idle = 0;
            } else {
                idle = idle.saturating_add(1);
                if !self.busy_poll && idle > 64 {
                    let us = (idle as u64 - 64).min(1000);
                    std::thread::sleep(Duration::from_micros(us));
                } else {
                    std::hint::spin_loop();
                }
            }
            let now = clock();
            let spent = now.wrapping_sub(then);
            then = now;
            if work > 0 {
                self.pending.0 += spent;
                self.pending.2 += work as u64;
            } else {
                self.pending.1 += spent;
            }
        }
        self.publish();
        me.running.store(false, Ordering::Release);
    }

    /// Adds what this thread counted since the last time to its [`ThreadStats`].
    fn publish(&mut self) {
        let s = &self.fabric.threads[self.index];
        let (busy, idle, frames) = std::mem::take(&mut self.pending);
        s.busy.fetch_add(busy, Ordering::Relaxed);
        s.idle.fetch_add(idle, Ordering::Relaxed);
        s.frames.fetch_add(frames, Ordering::Relaxed);
    }

    /// Sends the RARP broadcasts front-ends asked for (`SEND_RARP`, after a live migration)
    /// into each port's network, as if the guest had sent them: through the switch (which
    /// learns the address on this port and floods the frame to every other port and TAP), or
    /// to the port's TAP. Checked with the housekeeping, at most about a millisecond late, by
    /// the thread that polls the port's first pair.
    fn announce(&mut self) {
        for p in 0..self.ports.len() {
            let Some(e) = &self.ports[p] else { continue };
            if e.threads.first() != Some(&self.index) {
                continue;
            }
            let Port::Vhost { announce, backend, tap, dev, .. } = &e.port else { continue };
            for mac in announce.take() {
                let frame = rarp_announce(mac);
                match backend {
                    PortBackend::Switch => {
                        let f = [SwitchFrame { frame: &frame[..], offload: None }];
                        switch_burst(
                            &self.fabric.switch,
                            &mut self.dest,
                            &self.ports,
                            p,
                            0,
                            &f,
                            |f| *f,
                            &mut self.fallback,
                        );
                    }
                    PortBackend::Tap(name) => {
                        if let Some(q) = tap.first() {
                            if let Err(e) = q.write(&[0u8; TAP_HDR_LEN], &frame) {
                                limited!(warn, "virtq-net: TAP {name}: announce: {e}");
                            }
                        }
                    }
                    // Not attached to a network: nobody to tell.
                    PortBackend::Reflect | PortBackend::Sink | PortBackend::Source(_) => {}
                }
                limited!(info, "{}: announced {mac:02x?} (RARP)", dev.name());
            }
        }
    }

    /// Finishes the transmit side of the NIC queues this thread polls ([`NicQueue::flush_tx`]).
    fn flush_nics(&self) {
        for r in &self.rings {
            let Ring::Nic(p, q) = *r else { continue };
            if let Some(PortEntry { port: Port::Nic(nic), .. }) = self.ports[p].as_deref() {
                if let Some(queue) = nic.queues().get(q) {
                    queue.flush_tx();
                }
            }
        }
    }

    /// Asks the guest not to kick on every ring of the pairs this thread polls.
    fn suppress_kicks(&self) {
        for r in &self.rings {
            let Ring::Pair(p, pair) = *r else { continue };
            if let Some(PortEntry { port: Port::Vhost { dev, .. }, .. }) = self.ports[p].as_deref() {
                dev.suppress_kicks(2 * pair as usize);
                dev.suppress_kicks(2 * pair as usize + 1);
            }
        }
    }

    /// One pass over every ring this thread polls; returns the number of frames moved.
    pub fn poll_once(&mut self) -> usize {
        if self.fabric.generation.load(Ordering::Relaxed) != self.generation {
            self.refresh();
        }
        // Out of `self` for the pass, so that a port can be borrowed while the buffers are
        // written (cloning an `Arc` per ring and pass would cost two atomic operations).
        let ports = std::mem::take(&mut self.ports);
        let mut work = 0;
        for i in 0..self.rings.len() {
            work += match self.rings[i] {
                Ring::Pair(p, pair) => self.poll_pair(&ports, p, pair),
                Ring::SwitchTap(p, q) => self.poll_switch_tap(&ports, p, q),
                Ring::Nic(p, q) => self.poll_nic(&ports, p, q),
            };
        }
        self.ports = ports;
        work
    }

    /// A vhost-user pair: what its guest sends, what its TAP queue has for it (tap port), what
    /// its generator offers it (source port).
    fn poll_pair(&mut self, ports: &[Option<Arc<PortEntry>>], p: PortId, pair: u16) -> usize {
        let Some(PortEntry { port: Port::Vhost { dev, backend, tap, .. }, .. }) = ports[p].as_deref() else {
            return 0;
        };
        let mut work = self.poll_vhost(ports, p, dev, backend, tap, pair);
        match backend {
            PortBackend::Tap(name) => {
                if let Some(q) = tap.get(pair as usize) {
                    work += self.poll_port_tap(dev, name, q, pair);
                }
            }
            PortBackend::Source(_) => work += self.poll_source(p, dev, pair),
            _ => {}
        }
        work
    }

    fn poll_vhost(
        &mut self,
        ports: &[Option<Arc<PortEntry>>],
        p: PortId,
        dev: &NetDevice,
        backend: &PortBackend,
        tap: &[TapQueue],
        pair: u16,
    ) -> usize {
        // To another guest (or back to this one): a long frame is copied once, from the
        // sender's buffers into the receivers', and the sender's chain completed after; a
        // short one is copied out first, which costs fewer instructions
        // (`NetDevice::forward_burst`, `COPY_LIMIT`). While a burst in place is delivered the
        // sender's ring stays locked; the receivers' rings are locked after it, as everywhere
        // (the lock order of `virtq_vhost_user::net`).
        match backend {
            PortBackend::Switch => {
                let (switch, dest, fallback) = (&self.fabric.switch, &mut self.dest, &mut self.fallback);
                return dev.forward_burst(pair, &mut self.frames, |burst| match burst {
                    TxBurst::Copied(frames) => {
                        // Each frame's slice and offload computed once, in place (returning
                        // the array by value would copy it).
                        let mut burst = [SwitchFrame { frame: &[][..], offload: None }; BURST];
                        for (slot, f) in burst.iter_mut().zip(frames) {
                            *slot = SwitchFrame::from(f);
                        }
                        let n = frames.len().min(BURST);
                        switch_burst(switch, dest, ports, p, pair, &burst[..n], |f| *f, fallback);
                    }
                    TxBurst::InPlace(frames) => {
                        switch_burst(switch, dest, ports, p, pair, frames, SwitchFrame::from, fallback)
                    }
                });
            }
            PortBackend::Reflect => {
                return dev.forward_burst(pair, &mut self.frames, |burst| {
                    let to = dev.rx_pair(pair).unwrap_or(pair);
                    match burst {
                        TxBurst::Copied(frames) => {
                            let (refs, n) = burst_refs(frames.iter().map(|f| f.frame()));
                            dev.enqueue_burst(to, &refs[..n]);
                        }
                        TxBurst::InPlace(frames) => {
                            let mut burst = [Gather::default(); BURST];
                            for (slot, f) in burst.iter_mut().zip(frames) {
                                *slot = f.bytes();
                            }
                            dev.enqueue_gather_burst_outcome(to, &burst[..frames.len().min(BURST)]);
                        }
                    }
                });
            }
            _ => {}
        }
        let n = dev.dequeue_burst(pair, &mut self.frames);
        if n == 0 {
            return 0;
        }
        match backend {
            // Counted by the device's TX statistics; nothing else to do.
            PortBackend::Sink | PortBackend::Source(_) => {}
            // Taken above.
            PortBackend::Switch | PortBackend::Reflect => {}
            PortBackend::Tap(_) => {
                // The TAP queues attached are those of the pairs that can receive
                // (`PortHandler::rx_pairs_changed`): write to one of them.
                let q = dev.rx_pair(pair).unwrap_or(pair);
                if let Some(q) = tap.get(q as usize % tap.len().max(1)) {
                    for f in &self.frames[..n] {
                        let hdr = tap_header(f.raw(), f.frame());
                        if let Err(e) = q.write(&hdr, f.frame()) {
                            limited!(warn, "virtq-net: TAP write: {e}");
                        }
                    }
                }
            }
        }
        n
    }

    /// Offers a `Source` port's frame to its guest, a burst on `pair`; returns the frames
    /// placed. Offers the guest had no buffer for are counted as drops by the device (the
    /// generator's back-pressure, like testpmd's `TX-dropped`).
    fn poll_source(&mut self, p: PortId, dev: &NetDevice, pair: u16) -> usize {
        let Some((_, frame)) = self.sources.iter().find(|(s, _)| *s == p) else { return 0 };
        let refs: [&[u8]; BURST] = [frame.as_slice(); BURST];
        dev.enqueue_burst(pair, &refs)
    }

    fn poll_switch_tap(&mut self, ports: &[Option<Arc<PortEntry>>], p: PortId, q: usize) -> usize {
        let Some(PortEntry { port: Port::SwitchTap { queues, name, counters }, .. }) = ports[p].as_deref() else {
            return 0;
        };
        let mut lens = [0usize; BURST];
        let n = read_tap_burst(&queues[q], &mut self.tap_bufs, &mut lens, name);
        if n == 0 {
            return 0;
        }
        counters.rx.fetch_add(n as u64, Ordering::Relaxed);
        // The TAP's offloads are off (TUNSETOFFLOAD 0): the kernel hands over plain frames.
        let bufs = &self.tap_bufs[..n];
        let frame = |i: usize| SwitchFrame { frame: &bufs[i][TAP_HDR_LEN..lens[i]], offload: None };
        let idx: [usize; BURST] = std::array::from_fn(|i| i);
        switch_burst(
            &self.fabric.switch,
            &mut self.dest,
            ports,
            p,
            q as u16,
            &idx[..n],
            |&i| frame(i),
            &mut self.fallback,
        );
        n
    }

    /// Frames from a NIC queue into the switch. A frame with offloads (AF_PACKET hands over the
    /// host stack's GSO and partial-checksum frames with their header) is checked against its
    /// headers like a guest's ([`check_frame`]) and then delivered as each receiver's features
    /// require; one that does not hold up is dropped and counted. The ring memory is recycled
    /// when `recv_burst` returns, so the burst is copied out first (as a TAP's is read).
    fn poll_nic(&mut self, ports: &[Option<Arc<PortEntry>>], p: PortId, q: usize) -> usize {
        let Some(PortEntry { port: Port::Nic(nic), .. }) = ports[p].as_deref() else { return 0 };
        let Some(queue) = nic.queues().get(q) else { return 0 };
        let mut lens = [0usize; BURST];
        let mut hdrs = [[0u8; NIC_HDR_LEN]; BURST];
        let mut n = 0;
        let bufs = &mut self.tap_bufs;
        let mut too_large = 0u64;
        queue.recv_burst(BURST, |hdr, frame| {
            // A TAP buffer holds a 64 KiB GSO frame; a larger one (BIG TCP) is dropped here.
            if n < BURST && frame.len() < bufs[n].len() {
                bufs[n][..frame.len()].copy_from_slice(frame);
                (lens[n], hdrs[n]) = (frame.len(), *hdr);
                n += 1;
            } else {
                too_large += 1;
            }
        });
        if too_large > 0 {
            queue.counters().rx_drops.fetch_add(too_large, Ordering::Relaxed);
            limited!(
                warn,
                "virtq-net: nic {}: {too_large} frame(s) larger than a 64 KiB GSO frame dropped",
                nic.name()
            );
        }
        if n == 0 {
            return 0;
        }
        let mut offloads: [Option<OffloadFrame>; BURST] = [None; BURST];
        let mut idx = [0usize; BURST];
        let mut kept = 0;
        for i in 0..n {
            let h = parse_header(&hdrs[i]);
            if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 || h.gso_type != VIRTIO_NET_HDR_GSO_NONE {
                match check_frame(&h, &bufs[i][..lens[i]], lens[i]) {
                    Ok(of) => offloads[i] = Some(of),
                    Err(e) => {
                        limited!(warn, "virtq-net: nic {}: frame dropped: {e}", nic.name());
                        queue.counters().rx_drops.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
            }
            idx[kept] = i;
            kept += 1;
        }
        let bufs = &self.tap_bufs;
        let frame = |i: usize| SwitchFrame { frame: &bufs[i][..lens[i]], offload: offloads[i].as_ref() };
        switch_burst(
            &self.fabric.switch,
            &mut self.dest,
            ports,
            p,
            q as u16,
            &idx[..kept],
            |&i| frame(i),
            &mut self.fallback,
        );
        n
    }

    /// Frames from a port's own TAP (`PortBackend::Tap`) to its guest, each with the header
    /// the TAP gave it: partial checksums and GSO frames pass through as the guest negotiated
    /// them (the TAP's offloads follow the guest's features, see `tap::offload_flags`); a
    /// header the guest cannot take is refused by the device and counted.
    ///
    /// TAP queue `n` feeds pair `n` while the guest receives on it; a queue whose pair it does
    /// not use is detached from the TAP (so the kernel steers no new frame there), and what it
    /// still holds, or what arrives before the detach, goes to a pair the guest uses.
    fn poll_port_tap(&mut self, dev: &NetDevice, name: &str, q: &TapQueue, pair: u16) -> usize {
        let mut lens = [0usize; BURST];
        let n = read_tap_burst(q, &mut self.tap_bufs, &mut lens, name);
        if n > 0 {
            let mut burst: [(VirtioNetHdr, &[u8]); BURST] = [(VirtioNetHdr::default(), &[]); BURST];
            for (slot, (buf, &len)) in burst.iter_mut().zip(self.tap_bufs.iter().zip(&lens)).take(n) {
                *slot = (parse_header(&buf[..TAP_HDR_LEN]), &buf[TAP_HDR_LEN..len]);
            }
            let to = dev.rx_pair(pair).unwrap_or(pair);
            dev.enqueue_burst_with_headers(to, &burst[..n]);
        }
        n
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed `cpu_set_t` is the empty set; CPU_SET writes one bit within it (a
    // `cpu` past the set's size is refused below, before the call).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "CPU number too large"));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A frame crossing the switch: its bytes, and for a frame its sender gave offloads (a
/// partial checksum, a GSO type) the header checked against the frame.
///
/// The bytes are a slice, for a frame the switch holds (from a TAP or a NIC, or copied out of
/// its sender's ring), or a [`Gather`], for one still in its sender's buffers
/// ([`TxBurst::InPlace`]). Every decision (forwarding, the MTU) reads their head
/// ([`FrameSource::head`]): all of a slice, the switch's copy of a gathered frame's first
/// bytes, which its sender cannot rewrite.
#[derive(Clone, Copy, Debug)]
pub struct SwitchFrame<'a, S = &'a [u8]> {
    /// The Ethernet frame.
    pub frame: S,
    /// Its offloads ([`TxFrame::offload`], [`InPlaceFrame::offload`]); `None` for a plain
    /// frame.
    pub offload: Option<&'a OffloadFrame>,
}

impl<'a> From<&'a TxFrame> for SwitchFrame<'a> {
    fn from(f: &'a TxFrame) -> SwitchFrame<'a> {
        SwitchFrame { frame: f.frame(), offload: f.offload() }
    }
}

impl<'a, 'g: 'a> From<&'a InPlaceFrame<'g>> for SwitchFrame<'a, Gather<'a>> {
    fn from(f: &'a InPlaceFrame<'g>) -> SwitchFrame<'a, Gather<'a>> {
        SwitchFrame { frame: f.bytes(), offload: f.offload() }
    }
}

/// The frames the switch delivers ([`SwitchFrame`]): slices, or [`Gather`]s. The switch's
/// code is the same for both, compiled for each, so that frames it holds cost what they cost
/// before frames could stay in their sender's buffers.
trait SwitchBytes: FrameSource + Default {
    /// Places `entries` (each with its header: a frame of the burst, or one the switch
    /// wrote into a fallback buffer) with `rx` ([`Receiver::put`]).
    fn put(rx: &impl Receiver, entries: &[(VirtioNetHdr, Src<Self>)], fb: &Fallback) -> Enqueued;
    /// A guest's receive burst of such frames ([`NetDevice::enqueue_burst_outcome`]).
    fn enqueue(dev: &NetDevice, pair: u16, frames: &[Self]) -> Enqueued;
    /// A guest's receive burst of such frames, each with its header
    /// ([`NetDevice::enqueue_burst_with_headers_outcome`]).
    fn enqueue_with_headers(dev: &NetDevice, pair: u16, frames: &[(VirtioNetHdr, Self)]) -> Enqueued;
}

impl SwitchBytes for &[u8] {
    fn enqueue(dev: &NetDevice, pair: u16, frames: &[Self]) -> Enqueued {
        dev.enqueue_burst_outcome(pair, frames)
    }
    fn enqueue_with_headers(dev: &NetDevice, pair: u16, frames: &[(VirtioNetHdr, Self)]) -> Enqueued {
        dev.enqueue_burst_with_headers_outcome(pair, frames)
    }
    fn put(rx: &impl Receiver, entries: &[(VirtioNetHdr, Src<Self>)], fb: &Fallback) -> Enqueued {
        let mut burst: [(VirtioNetHdr, &[u8]); BURST] = [(VirtioNetHdr::default(), &[]); BURST];
        for (slot, (h, src)) in burst.iter_mut().zip(entries) {
            *slot = match *src {
                Src::Frame(f) => (*h, f),
                Src::Scratch(k, n) => (*h, &fb.bufs[k][..n]),
            };
        }
        rx.put(&burst[..entries.len().min(BURST)])
    }
}

impl SwitchBytes for Gather<'_> {
    fn enqueue(dev: &NetDevice, pair: u16, frames: &[Self]) -> Enqueued {
        dev.enqueue_gather_burst_outcome(pair, frames)
    }
    fn enqueue_with_headers(dev: &NetDevice, pair: u16, frames: &[(VirtioNetHdr, Self)]) -> Enqueued {
        dev.enqueue_gather_burst_with_headers_outcome(pair, frames)
    }
    fn put(rx: &impl Receiver, entries: &[(VirtioNetHdr, Src<Self>)], fb: &Fallback) -> Enqueued {
        let mut burst: [(VirtioNetHdr, Gather<'_>); BURST] = [(VirtioNetHdr::default(), Gather::default()); BURST];
        for (slot, (h, src)) in burst.iter_mut().zip(entries) {
            *slot = match *src {
                Src::Frame(f) => (*h, f),
                Src::Scratch(k, n) => (*h, Gather::slice(&fb.bufs[k][..n])),
            };
        }
        rx.put(&burst[..entries.len().min(BURST)])
    }
}

/// Switches one burst that entered on port `ingress` (`get` gives each element's frame):
/// learns and decides under one lock of the switch, then sends each destination its frames in
/// one batch.
#[allow(clippy::too_many_arguments)]
fn switch_burst<'a, T, S: SwitchBytes + 'a>(
    switch: &Mutex<Switch>,
    dest: &mut [Vec<usize>],
    ports: &[Option<Arc<PortEntry>>],
    ingress: PortId,
    pair: u16,
    frames: &'a [T],
    get: impl Fn(&'a T) -> SwitchFrame<'a, S> + Copy,
    fallback: &mut Fallback,
) {
    let now = Instant::now();
    for d in dest.iter_mut() {
        d.clear();
    }
    {
        let mut switch = switch.lock().unwrap_or_else(|p| p.into_inner());
        for (i, f) in frames.iter().enumerate() {
            match switch.forward(ingress, get(f).frame.head(), now) {
                // A port removed since this thread last looked has no entry: dropped.
                Forward::Port(to) => {
                    if let Some(d) = dest.get_mut(to) {
                        d.push(i);
                    }
                }
                Forward::Flood => {
                    for (to, d) in dest.iter_mut().enumerate() {
                        if to != ingress && ports[to].as_deref().is_some_and(|e| is_switch_port(&e.port)) {
                            d.push(i);
                        }
                    }
                }
                Forward::Drop => {}
            }
        }
    }
    for (to, d) in dest.iter().enumerate() {
        if d.is_empty() {
            continue;
        }
        if let Some(e) = &ports[to] {
            deliver(&e.port, pair, d.iter().map(|&i| get(&frames[i])), fallback);
        }
    }
}

/// Up to [`BURST`] frame slices in a stack array (no allocation on the data path).
fn burst_refs<'a>(frames: impl Iterator<Item = &'a [u8]>) -> ([&'a [u8]; BURST], usize) {
    let mut refs: [&[u8]; BURST] = [&[]; BURST];
    let mut n = 0;
    for (slot, f) in refs.iter_mut().zip(frames) {
        *slot = f;
        n += 1;
    }
    (refs, n)
}

/// Reads up to one burst of frames (virtio-net header + frame) from a TAP queue into `bufs`,
/// their lengths into `lens`; frames no longer than the header, and frames that filled the
/// whole buffer (the kernel cuts what does not fit), are skipped.
fn read_tap_burst(q: &TapQueue, bufs: &mut [Vec<u8>], lens: &mut [usize; BURST], name: &str) -> usize {
    let mut n = 0;
    while n < BURST {
        match q.read(&mut bufs[n]) {
            Ok(Some(len)) if len >= bufs[n].len() => {
                limited!(warn, "virtq-net: TAP {name}: frame of {len}+ bytes dropped (larger than a 64 KiB GSO frame)");
            }
            Ok(Some(len)) if len > TAP_HDR_LEN => {
                lens[n] = len;
                n += 1;
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                limited!(warn, "virtq-net: TAP {name} read: {e}");
                break;
            }
        }
    }
    n
}

fn is_switch_port(p: &Port) -> bool {
    matches!(p, Port::SwitchTap { .. } | Port::Nic(_) | Port::Vhost { backend: PortBackend::Switch, .. })
}

/// Sends a batch to one switch port: to a guest ([`deliver_to_guest`]), or written to a TAP
/// with each frame's header (the kernel completes checksums and segments what it has to).
fn deliver<'a, S: SwitchBytes + 'a>(
    port: &Port,
    pair: u16,
    frames: impl Iterator<Item = SwitchFrame<'a, S>> + Clone,
    fallback: &mut Fallback,
) {
    match port {
        Port::Vhost { dev, mtu, .. } => {
            // With no pair to receive on, the burst goes to a stopped or disabled queue, which
            // drops and counts it.
            let to = dev.rx_pair(pair).unwrap_or(pair % dev.queue_pairs().max(1));
            deliver_to_receiver(&GuestQueue { dev, to, mtu: *mtu }, frames, fallback)
        }
        Port::Nic(nic) => {
            if let Some(q) = nic.queues().get(pair as usize % nic.queues().len().max(1)) {
                // The NIC's buffers for frames still in their sender's buffers, lent to it
                // for this batch (moved out and back: no allocation).
                let rx =
                    NicTx { q, mtu: nic.mtu(), copies: std::cell::RefCell::new(std::mem::take(&mut fallback.nic)) };
                deliver_to_receiver(&rx, frames, fallback);
                fallback.nic = rx.copies.into_inner();
            }
        }
        Port::SwitchTap { queues, name, counters } => {
            let q = &queues[pair as usize % queues.len()];
            let (mut tx, mut drops) = (0, 0);
            for f in frames {
                let hdr = f.offload.map_or([0u8; TAP_HDR_LEN], |of| tap_vnet_header(&of.header));
                // A write takes the frame in one piece: one still in its sender's buffers is
                // copied out first.
                let frame = match f.frame.contiguous() {
                    Some(frame) => frame,
                    None => {
                        let n = f.frame.read_into(&mut fallback.whole);
                        &fallback.whole[..n]
                    }
                };
                match q.write(&hdr, frame) {
                    Ok(true) => tx += 1,
                    Ok(false) => drops += 1,
                    Err(e) => {
                        drops += 1;
                        limited!(warn, "virtq-net: TAP {name} write: {e}");
                    }
                }
            }
            counters.tx.fetch_add(tx, Ordering::Relaxed);
            counters.drops.fetch_add(drops, Ordering::Relaxed);
        }
    }
}

/// A header as a TAP with `IFF_VNET_HDR` takes it: the 10 bytes of `struct virtio_net_hdr`,
/// little-endian, `num_buffers` (bytes 10..12) 0.
fn tap_vnet_header(h: &VirtioNetHdr) -> [u8; TAP_HDR_LEN] {
    let mut b = [0u8; TAP_HDR_LEN];
    b[0] = h.flags;
    b[1] = h.gso_type;
    b[2..4].copy_from_slice(&h.hdr_len.get().to_le_bytes());
    b[4..6].copy_from_slice(&h.gso_size.get().to_le_bytes());
    b[6..8].copy_from_slice(&h.csum_start.get().to_le_bytes());
    b[8..10].copy_from_slice(&h.csum_offset.get().to_le_bytes());
    b
}

/// Whether a frame of `len` bytes starting with `head` (at least its first 14 bytes, or all
/// of it) fits an MTU of `mtu` bytes: its length past the Ethernet header (and one 802.1Q
/// tag, which the MTU does not count).
#[inline]
fn fits_mtu(len: usize, head: &[u8], mtu: u16) -> bool {
    let max = 14 + mtu as usize;
    // 802.1Q (0x8100) or 802.1ad (0x88a8): one tag. `head` holds byte 13 of any frame
    // longer than `max`.
    len <= max || (len <= max + 4 && matches!((head[12], head[13]), (0x81, 0x00) | (0x88, 0xa8)))
}

/// Most segments the switch cuts from one GSO frame for a receiver without the offload: a
/// 64 KiB TCP frame at an MSS of 256 (real stacks send 536 and more), and twice Linux's
/// `UDP_MAX_SEGMENTS` (128) for USO. Larger counts come only from a sender with a tiny
/// `gso_size`; their frames are dropped and counted.
const MAX_SEGMENTS: u32 = 256;

/// A destination of the switch that takes frames as its features allow: a guest's receive
/// queue, a NIC queue. [`deliver_to_receiver`] completes or segments what it cannot take.
trait Receiver {
    /// The offloads it accepts frames with (the guest's negotiated features); `None` while it
    /// cannot receive (its frames are counted as drops).
    fn features(&self) -> Option<VirtioFeatures>;
    /// Its MTU: the largest frame it takes that is not a GSO frame it negotiated.
    fn mtu(&self) -> u16;
    /// Places plain frames (no offloads); returns how many it took.
    fn put_plain<S: SwitchBytes>(&self, frames: &[S]) -> usize;
    /// Places frames, each with the header it is delivered with: how many it took, and
    /// whether it ran out of room (frames refused one by one leave room for the next).
    fn put<S: SwitchBytes>(&self, frames: &[(VirtioNetHdr, S)]) -> Enqueued;
    /// Counts `n` frames dropped for it.
    fn count_drops(&self, n: u64);
}

/// A guest's receive queue (pair `to`).
struct GuestQueue<'d> {
    dev: &'d NetDevice,
    to: u16,
    mtu: u16,
}

impl Receiver for GuestQueue<'_> {
    fn features(&self) -> Option<VirtioFeatures> {
        self.dev.rx_features(self.to)
    }
    fn mtu(&self) -> u16 {
        self.mtu
    }
    fn put_plain<S: SwitchBytes>(&self, frames: &[S]) -> usize {
        S::enqueue(self.dev, self.to, frames).placed
    }
    fn put<S: SwitchBytes>(&self, frames: &[(VirtioNetHdr, S)]) -> Enqueued {
        S::enqueue_with_headers(self.dev, self.to, frames)
    }
    fn count_drops(&self, n: u64) {
        self.dev.count_rx_drops(self.to, n);
    }
}

/// A NIC queue: it takes plain, complete frames only (no offloads), up to its MTU; the switch
/// completes checksums and segments GSO frames for it.
struct NicTx<'q> {
    q: &'q NicQueue,
    mtu: u16,
    /// Where frames still in their sender's buffers are copied whole before they are sent
    /// ([`Fallback::nic`]), allocated the first time one needs it.
    copies: std::cell::RefCell<Vec<Vec<u8>>>,
}

impl NicTx<'_> {
    /// Sends `frames`: those the switch holds as they are; if some are still in their
    /// sender's buffers, every frame copied whole first.
    fn send<'f, S: FrameSource + 'f>(&self, frames: impl Iterator<Item = &'f S> + Clone) -> Sent {
        if frames.clone().all(|f| f.contiguous().is_some()) {
            return self.q.send_burst(frames.filter_map(|f| f.contiguous()));
        }
        let mut copies = self.copies.borrow_mut();
        if copies.is_empty() {
            *copies = (0..BURST).map(|_| vec![0u8; MAX_TX_FRAME]).collect();
        }
        let mut lens = [0usize; BURST];
        for ((f, buf), len) in frames.zip(copies.iter_mut()).zip(lens.iter_mut()) {
            *len = f.read_into(buf);
        }
        self.q.send_burst(copies.iter().zip(&lens).filter(|(_, &n)| n > 0).map(|(b, &n)| &b[..n]))
    }
}

impl Receiver for NicTx<'_> {
    fn features(&self) -> Option<VirtioFeatures> {
        Some(VirtioFeatures::empty())
    }
    fn mtu(&self) -> u16 {
        self.mtu
    }
    fn put_plain<S: SwitchBytes>(&self, frames: &[S]) -> usize {
        self.send(frames.iter()).sent as usize
    }
    fn put<S: SwitchBytes>(&self, frames: &[(VirtioNetHdr, S)]) -> Enqueued {
        // Without offloads every header is a plain one: the frames are complete.
        let s = self.send(frames.iter().map(|(_, f)| f));
        Enqueued { placed: s.sent as usize, full: s.full }
    }
    fn count_drops(&self, n: u64) {
        self.q.counters().tx_drops.fetch_add(n, Ordering::Relaxed);
    }
}

/// Sends a batch to a receiver (a guest: on the pair matching the ingress queue among those
/// it receives on): one burst, or several when frames are segmented for it.
///
/// Each frame with offloads gets what the receiver's features call for
/// ([`OffloadFrame::delivery`], §5.1.6.4.1): its header as it is (with what the receiver may
/// not see cleared), its checksum completed in a copy, or segments written into the
/// fallback's buffers. A frame larger than the port's MTU that is not a GSO frame the guest
/// takes as it is, is dropped and counted, as is a frame with an offload that has no
/// fallback. Segmenting stops when the guest has no more buffers: a guest that sends GSO
/// frames with a tiny `gso_size` costs the switch at most what the receiver can take.
fn deliver_to_receiver<'a, S: SwitchBytes + 'a>(
    rx: &impl Receiver,
    frames: impl Iterator<Item = SwitchFrame<'a, S>> + Clone,
    fb: &mut Fallback,
) {
    let mtu = rx.mtu();
    // The usual burst: plain frames within the MTU, delivered with a zero header.
    let mut refs = [S::default(); BURST];
    let mut n = 0;
    for f in frames.clone() {
        if f.offload.is_some() || !fits_mtu(f.frame.len(), f.frame.head(), mtu) {
            n = usize::MAX;
            break;
        }
        refs[n] = f.frame;
        n += 1;
    }
    if n != usize::MAX {
        rx.put_plain(&refs[..n]);
        return;
    }
    let Some(features) = rx.features() else {
        rx.count_drops(frames.count() as u64);
        return;
    };
    let mut out = OutBurst::default();
    let mut drops = 0u64;
    'frames: for f in frames {
        let Some(of) = f.offload else {
            if fits_mtu(f.frame.len(), f.frame.head(), mtu) {
                out.push_frame(rx, fb, VirtioNetHdr::default(), f.frame);
            } else {
                drops += 1;
            }
            continue;
        };
        match of.delivery(features) {
            Delivery::Pass(h) => {
                // A GSO frame of one segment is a plain frame to the receiver (Linux:
                // "too small packets are not really GSO ones"): the MTU applies.
                let gso = h.gso_type != VIRTIO_NET_HDR_GSO_NONE && of.segments() > 1;
                if !gso && !fits_mtu(f.frame.len(), f.frame.head(), mtu) {
                    drops += 1;
                } else {
                    out.push_frame(rx, fb, h, f.frame);
                }
            }
            Delivery::CompleteCsum(h) => {
                if !fits_mtu(f.frame.len(), f.frame.head(), mtu) {
                    drops += 1;
                    continue;
                }
                if !out.make_room(rx, fb) {
                    drops += 1;
                    continue;
                }
                // Completed in a copy (the checksum covers the payload, so the sum is taken
                // over the bytes that land; the headers it relies on are the checked ones).
                let k = out.scratch;
                let buf = &mut fb.bufs[k][..f.frame.len()];
                f.frame.read_into(buf);
                match complete_csum(&of.header, buf) {
                    Ok(_) => out.push_scratch(h, k, f.frame.len()),
                    Err(_) => drops += 1,
                }
            }
            Delivery::Segment(csum) => {
                // A sender's tiny `gso_size` must not turn one frame into thousands of
                // segments for the switch to cut (64 KiB at `gso_size` 1 is 65,000).
                if of.segments() > MAX_SEGMENTS {
                    limited!(
                        warn,
                        "virtq-net: switch: GSO frame of {} segments dropped (at most {MAX_SEGMENTS})",
                        of.segments()
                    );
                    drops += 1;
                    continue;
                }
                // Cut from the frame in one piece: one still in its sender's buffers is copied
                // out first, and only its headers are the ones checked (the segments' headers
                // are written from `of`, the payload is the sender's).
                let frame = match f.frame.contiguous() {
                    Some(frame) => frame,
                    None => {
                        let n = f.frame.read_into(&mut fb.whole);
                        &fb.whole[..n]
                    }
                };
                let Ok(seg) = Segmenter::new(of, frame, csum) else {
                    drops += 1;
                    continue;
                };
                let h = seg.segment_header();
                let count = seg.count();
                for i in 0..count {
                    // A frame that cannot land whole counts as one drop, whatever its segments.
                    if !out.make_room(rx, fb) {
                        // The guest is out of buffers: the rest of this frame cannot land.
                        drops += 1;
                        continue 'frames;
                    }
                    let k = out.scratch;
                    match seg.write_segment(i, frame, &mut fb.bufs[k]) {
                        Ok(n) if fits_mtu(n, &fb.bufs[k][..n], mtu) => out.push_scratch(h, k, n),
                        _ => {
                            drops += 1;
                            continue 'frames;
                        }
                    }
                }
            }
            Delivery::Drop => drops += 1,
        }
    }
    out.flush(rx, fb);
    if drops > 0 {
        rx.count_drops(drops);
    }
}

/// Buffers for frames the switch writes itself: a checksum completed in a copy, segments cut
/// from a GSO frame. One per frame of a burst, each large enough for any frame; and one for a
/// frame still in its sender's buffers that is needed in one piece (to cut segments from, to
/// write to a TAP).
pub struct Fallback {
    bufs: Vec<Vec<u8>>,
    whole: Vec<u8>,
    /// A NIC queue's copies of frames still in their sender's buffers (`NicTx`), allocated
    /// the first time a NIC needs them.
    nic: Vec<Vec<u8>>,
}

impl Fallback {
    fn new() -> Fallback {
        // Zeroed allocations: pages are touched only when a frame is written there.
        Fallback {
            bufs: (0..BURST).map(|_| vec![0u8; MAX_TX_FRAME]).collect(),
            whole: vec![0u8; MAX_TX_FRAME],
            nic: Vec::new(),
        }
    }
}

/// Where an outgoing frame's bytes are: the frame as it crossed the switch, or a fallback
/// buffer.
#[derive(Clone, Copy)]
enum Src<S> {
    Frame(S),
    Scratch(usize, usize),
}

/// A burst being gathered for one guest, flushed when full.
struct OutBurst<S> {
    entries: [(VirtioNetHdr, Src<S>); BURST],
    len: usize,
    /// The next free fallback buffer (buffers are used in order within a burst).
    scratch: usize,
    /// Whether every flush so far placed all its frames.
    room: bool,
}

impl<S: SwitchBytes> Default for OutBurst<S> {
    fn default() -> Self {
        OutBurst {
            entries: [(VirtioNetHdr::default(), Src::Frame(S::default())); BURST],
            len: 0,
            scratch: 0,
            room: true,
        }
    }
}

impl<S: SwitchBytes> OutBurst<S> {
    /// Makes room for one more frame, flushing a full burst; `false` once the guest ran out
    /// of buffers (a flush placed fewer frames than it held).
    fn make_room(&mut self, rx: &impl Receiver, fb: &Fallback) -> bool {
        if self.len == BURST {
            self.flush(rx, fb);
        }
        self.room
    }

    fn push_frame(&mut self, rx: &impl Receiver, fb: &Fallback, h: VirtioNetHdr, frame: S) {
        if self.make_room(rx, fb) {
            self.entries[self.len] = (h, Src::Frame(frame));
            self.len += 1;
        } else {
            rx.count_drops(1);
        }
    }

    /// Adds the frame just written to fallback buffer `k` (the one `scratch` named).
    fn push_scratch(&mut self, h: VirtioNetHdr, k: usize, len: usize) {
        self.entries[self.len] = (h, Src::Scratch(k, len));
        self.len += 1;
        self.scratch = k + 1;
    }

    /// Enqueues what was gathered, each frame with its header.
    fn flush(&mut self, rx: &impl Receiver, fb: &Fallback) {
        if self.len == 0 {
            return;
        }
        // Frames the receiver refused one by one (too large for its buffers) leave it room for
        // the rest; a receiver out of buffers does not.
        self.room &= !S::put(rx, &self.entries[..self.len], fb).full;
        self.len = 0;
        self.scratch = 0;
    }
}

/// The TAP's 12-byte header for a guest frame: the guest's header (10 or 12 bytes, already
/// validated against the negotiated features, so `NEEDS_CSUM` only with CSUM and a GSO type
/// only with its HOST_* feature) with `num_buffers` zeroed. Checksum and GSO fields go to the
/// TAP unchanged: the kernel finishes the checksum or segments the frame (up to a 64 KiB GSO
/// frame, [`MAX_TX_FRAME`]) where it has to.
fn tap_header(raw: &[u8], frame: &[u8]) -> [u8; TAP_HDR_LEN] {
    let hdr_len = raw.len() - frame.len();
    let mut h = [0u8; TAP_HDR_LEN];
    let n = hdr_len.min(10);
    h[..n].copy_from_slice(&raw[..n]);
    h
}

/// The in-tree vhost-user front-end, for the tests below that run the data plane against
/// guests in this process.
#[cfg(test)]
#[path = "../../vhost-user/tests/frontend/mod.rs"]
mod test_frontend;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_header_passes_the_guest_header_through_with_num_buffers_zeroed() {
        // A TCPv4 GSO frame of 64 KiB: NEEDS_CSUM, gso_type 1, hdr_len 66, gso_size 1448,
        // csum_start 34, csum_offset 16, num_buffers 7 (which a TAP must not see).
        let hdr = [1u8, 1, 66, 0, 0xa8, 0x05, 34, 0, 16, 0, 7, 0];
        let frame = vec![0x5au8; 65535 + 14];
        let raw: Vec<u8> = hdr.iter().copied().chain(frame.iter().copied()).collect();
        let t = tap_header(&raw, &raw[12..]);
        assert_eq!(t[..10], hdr[..10], "offload fields unchanged");
        assert_eq!(t[10..], [0, 0], "num_buffers zeroed");
        assert!(raw.len() <= MAX_TX_FRAME, "a 64 KiB GSO frame fits a TX buffer");
        // The 10-byte legacy header: the same fields, num_buffers 0.
        let raw10: Vec<u8> = hdr[..10].iter().copied().chain(frame[..60].iter().copied()).collect();
        let t = tap_header(&raw10, &raw10[10..]);
        assert_eq!(t[..10], hdr[..10]);
        assert_eq!(t[10..], [0, 0]);
    }

    /// The switch decides where a frame goes on its copy of the frame's first bytes, not on
    /// the sender's buffers, which the sender can rewrite while the frame crosses: a
    /// full-size frame for B, handed over in place (A's ring is in the in-place way after a
    /// first full-size frame, copied out), whose destination A rewrites to C once the burst
    /// is taken (before the switch looks at it) still goes to B, with the headers as they
    /// were checked; C gets nothing. Only the bytes past the copy show what A wrote. Were the
    /// decision made on A's buffers, C would get the frame.
    #[test]
    fn the_switch_decides_on_the_copy_of_the_headers_not_on_the_senders_buffers() {
        use test_frontend::*;
        use virtq::testing::Buf;
        use virtq_vhost_user::backend::{Backend, NoHandler, SocketSpec};

        use crate::port::{device_config, PortSpec};

        const MAC: [[u8; 6]; 3] =
            [[0x52, 0x54, 0, 0, 0, 0x0a], [0x52, 0x54, 0, 0, 0, 0x0b], [0x52, 0x54, 0, 0, 0, 0x0c]];
        let eth = |dst: [u8; 6], src: [u8; 6], len: usize| -> Vec<u8> {
            let mut f = dst.to_vec();
            f.extend_from_slice(&src);
            f.extend_from_slice(&0x88b5u16.to_be_bytes());
            f.extend((14..len).map(|i| i as u8));
            f
        };
        let dir = std::env::temp_dir().join(format!("virtq-net-snapshot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut backend = Backend::new().unwrap();
        let fabric = Fabric::new(1, &[]);
        let mut devs = Vec::new();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let path = dir.join(format!("{name}.sock"));
            let spec = PortSpec {
                path: path.clone(),
                client: false,
                backend: PortBackend::Switch,
                queues: 1,
                mac: None,
                mtu: 1500,
                mrg: true,
                packed: false,
                offload: true,
            };
            let cfg = device_config(&spec, i + 1);
            let dev =
                backend.add_device(name, cfg, SocketSpec::Server { path, mode: None }, Box::new(NoHandler)).unwrap();
            fabric.add(Port::Vhost {
                dev: dev.clone(),
                backend: PortBackend::Switch,
                tap: Vec::new(),
                announce: Arc::new(Announcements::default()),
                mtu: 1500,
            });
            devs.push(dev);
        }
        let handle = backend.handle();
        let control = std::thread::spawn(move || backend.run());
        let fes: Vec<Frontend> =
            ["a", "b", "c"].iter().map(|n| Frontend::connect(&dir.join(format!("{n}.sock")), 2, 64)).collect();
        let mut guests: Vec<Guest<'_>> = fes.iter().map(Guest::new).collect();
        for fe in &fes {
            fe.qemu_start(NET_FEATURES);
        }
        wait("rings ready", || {
            devs.iter().all(|d| d.queue_ready(0) && d.queue_ready(1) && d.rx_pair(0).is_some()).then_some(())
        });
        // B and C have spoken: the switch knows where they are.
        {
            let mut sw = fabric.switch.lock().unwrap();
            let now = Instant::now();
            sw.forward(1, &eth(MAC[0], MAC[1], 60), now);
            sw.forward(2, &eth(MAC[0], MAC[2], 60), now);
        }
        let mut rx_addr = Vec::new();
        for g in &mut guests[1..] {
            for _ in 0..2 {
                let mut a = [0u64];
                let head = g.drv[0].build_chain(&[Buf::writable(2048)], &mut a);
                g.drv[0].publish(head);
                rx_addr.push(a[0]);
            }
        }
        let frame = eth(MAC[1], MAC[0], 1500);
        let ports = fabric.ports();
        let mut dest = vec![Vec::new(); ports.len()];
        let mut fallback = Fallback::new();
        let mut frames: Vec<TxFrame> = (0..BURST).map(|_| TxFrame::with_capacity(MAX_TX_FRAME)).collect();
        // The first full-size frame: copied out (A's ring starts the copy way).
        let mut addrs = [0u64; 2];
        let head = guests[0].drv[1].build_chain(&[Buf::readable(&[0u8; 12]), Buf::readable(&frame)], &mut addrs);
        guests[0].drv[1].publish(head);
        let mut moved = 0;
        wait("A's first frame", || {
            moved += devs[0].forward_burst(0, &mut frames, |burst| match burst {
                TxBurst::Copied(frames) => {
                    let get = |f| SwitchFrame::from(f);
                    switch_burst(&fabric.switch, &mut dest, &ports, 0, 0, frames, get, &mut fallback)
                }
                TxBurst::InPlace(_) => panic!("a ring starts the copy way"),
            });
            (moved > 0).then_some(())
        });
        // The second: in place.
        let head = guests[0].drv[1].build_chain(&[Buf::readable(&[0u8; 12]), Buf::readable(&frame)], &mut addrs);
        guests[0].drv[1].publish(head);
        let a_tx = &guests[0].drv[1];
        let mut moved = 0;
        wait("A's second frame", || {
            moved += devs[0].forward_burst(0, &mut frames, |burst| match burst {
                TxBurst::InPlace(frames) => {
                    // A turns its frame towards C, and rewrites the bytes from 300 on.
                    a_tx.write(addrs[1], &MAC[2]);
                    a_tx.write(addrs[1] + 300, &[0x77; 1200]);
                    switch_burst(&fabric.switch, &mut dest, &ports, 0, 0, frames, SwitchFrame::from, &mut fallback);
                }
                TxBurst::Copied(_) => panic!("after a full-size frame, the in-place way"),
            });
            (moved > 0).then_some(())
        });
        let (b_rx, c_rx) = (&guests[1].drv[0], &guests[2].drv[0]);
        assert_eq!(c_rx.used_idx(), 0, "C got nothing: the rewrite came after the copy");
        assert_eq!(b_rx.used_idx(), 2, "B got both frames it was sent");
        let mut got = vec![0u8; 12 + 1500];
        b_rx.read(rx_addr[0], &mut got);
        assert_eq!(&got[12..], &frame[..], "the first frame as sent");
        b_rx.read(rx_addr[1], &mut got);
        let mut want = frame.clone();
        want[300..].fill(0x77);
        assert_eq!(&got[12..], &want[..], "the headers as checked, the payload past the copy as A left it");
        assert_eq!(a_tx.used_idx(), 2, "A's chains completed after the copies");

        drop(guests);
        drop(fes);
        handle.shutdown();
        control.join().unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod fabric_tests {
    use super::*;

    fn port(name: &str) -> Port {
        let dev = NetDevice::new(name, (0..2).map(|_| Arc::default()).collect());
        Port::Vhost { dev, backend: PortBackend::Switch, tap: Vec::new(), announce: Arc::default(), mtu: 1500 }
    }

    #[test]
    fn a_removed_ports_number_is_taken_by_the_next_port_and_rings_stay_round_robin() {
        let f = Fabric::new(2, &[]);
        let ids: Vec<PortId> = ["a", "b", "c"].iter().map(|n| f.add(port(n))).collect();
        assert_eq!(ids, [0, 1, 2]);
        let threads = |id: PortId| f.ports()[id].as_ref().unwrap().threads.clone();
        assert_eq!((threads(0), threads(1), threads(2)), (vec![0], vec![1], vec![0]));
        assert!(f.remove(1).is_some());
        assert!(f.remove(1).is_none(), "removed once");
        assert_eq!(f.thread_stats(1).rings.load(Ordering::Relaxed), 0);
        // No thread runs, so none holds port 1: its number is free again.
        assert_eq!(f.add(port("d")), 1);
        assert_eq!(f.ports().len(), 3, "the table did not grow");
        assert_eq!(threads(1), vec![1], "round-robin goes on where it was");
    }
}

#[cfg(test)]
mod receiver_tests {
    use std::cell::{Cell, RefCell};

    use super::*;

    /// A receiver with room for everything that refuses, one by one, frames longer than its
    /// buffers (as a guest without MRG_RXBUF and 2 KiB buffers refuses a jumbo frame).
    struct SmallBuffers {
        got: RefCell<Vec<usize>>,
        refused: Cell<usize>,
        drops: Cell<u64>,
    }

    impl Receiver for SmallBuffers {
        fn features(&self) -> Option<VirtioFeatures> {
            Some(VirtioFeatures::empty())
        }
        fn mtu(&self) -> u16 {
            9000
        }
        fn put_plain<S: SwitchBytes>(&self, frames: &[S]) -> usize {
            let fit = frames.iter().filter(|f| f.len() <= 2048).count();
            self.got.borrow_mut().extend(frames.iter().map(|f| f.len()).filter(|&n| n <= 2048));
            self.refused.set(self.refused.get() + frames.len() - fit);
            fit
        }
        fn put<S: SwitchBytes>(&self, frames: &[(VirtioNetHdr, S)]) -> Enqueued {
            let refs: Vec<S> = frames.iter().map(|(_, f)| *f).collect();
            Enqueued { placed: self.put_plain(&refs), full: false }
        }
        fn count_drops(&self, n: u64) {
            self.drops.set(self.drops.get() + n);
        }
    }

    /// A TCP/IPv4 frame of `payload` bytes with a TSO header (NEEDS_CSUM, GSO TCPV4, MSS
    /// `mss`), its TCP checksum field holding the pseudo-header sum as a driver leaves it.
    fn tso_frame(payload: usize, mss: u16) -> (VirtioNetHdr, Vec<u8>) {
        let total = 40 + payload;
        let mut f = vec![0x52, 0x54, 0, 0, 0, 0x0b, 0x52, 0x54, 0, 0, 0, 0x0a, 0x08, 0x00];
        f.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 1, 0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(&[
            0x13, 0x88, 0x17, 0x70, 0, 0, 0x03, 0xe8, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
        ]);
        f.extend((0..payload).map(|i| i as u8));
        let h = parse_header(&[1, 1, 54, 0, mss as u8, (mss >> 8) as u8, 34, 0, 16, 0, 0, 0]);
        (h, f)
    }

    /// Session 7's review: a frame the receiver refused on its own (too large for its
    /// buffers) used to end the delivery as if the receiver were out of buffers, so the
    /// segments cut after it in the same batch were dropped. Now only a receiver out of room
    /// stops it: every segment of the TSO frame arrives.
    #[test]
    fn a_frame_refused_alone_does_not_stop_the_rest_of_the_delivery() {
        let jumbo = vec![0u8; 3000];
        let (h, tso) = tso_frame(40 * 1000, 1000);
        let of = check_frame(&h, &tso, tso.len()).expect("a valid TSO frame");
        assert_eq!(of.segments(), 40);
        let frames =
            [SwitchFrame { frame: &jumbo[..], offload: None }, SwitchFrame { frame: &tso[..], offload: Some(&of) }];
        let rx = SmallBuffers { got: RefCell::default(), refused: Cell::new(0), drops: Cell::new(0) };
        let mut fb = Fallback::new();
        deliver_to_receiver(&rx, frames.iter().copied(), &mut fb);
        assert_eq!(rx.refused.get(), 1, "the jumbo frame, refused by the receiver");
        assert_eq!(rx.got.borrow().len(), 40, "every segment, the ones after the first flush included");
        assert!(rx.got.borrow().iter().all(|&n| n == 14 + 40 + 1000));
        assert_eq!(rx.drops.get(), 0);
    }
}
