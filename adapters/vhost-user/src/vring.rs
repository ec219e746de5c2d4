//! Vrings: the per-ring state the front-end configures (vhost-user.rst "Ring states"), and the
//! part the data path uses.
//!
//! "Rings have two independent states: started/stopped, and enabled/disabled."
//! - A ring starts on `SET_VRING_KICK` (with its size, addresses and the memory table known)
//!   and stops on `GET_VRING_BASE`, which returns the next available index.
//! - Enabled/disabled is tracked independently, including `SET_VRING_ENABLE` that arrives
//!   before `SET_FEATURES` (QEMU sends it then) and the rule that `SET_FEATURES` without
//!   `VHOST_USER_F_PROTOCOL_FEATURES` enables every ring.
//! - Started and disabled: TX is drained and dropped, RX gets nothing (no side effects).
//! - Started and faulted: a ring that cannot go on ([`RingFault`]: the available index jumped,
//!   the ring no longer fits the memory table, or the guest memory lost its pages) stops being
//!   served once. Its error eventfd (`SET_VRING_ERR`) is signalled, the fault is counted, and
//!   the ring is left alone (no polling, no logging) until the front-end sets it up again
//!   (`GET_VRING_BASE`, then `SET_VRING_KICK`) or resets the device; a ring that no longer fit
//!   the memory table also gets another try on the next table. It still answers
//!   `GET_VRING_BASE` with its position. What each fault costs and what the front-end sees is
//!   in the one error-policy table, the *Error policy* section of the repository's README.
//!
//! The control thread owns [`Vring`]; the data path sees only [`VringShared`] through an
//! `Arc<Mutex<_>>` that it locks once per burst, never per packet.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use virtq::avail::AvailIndexError;
use virtq::packed::DEFAULT_IDS;
use virtq::queue::{validate_size, MAX_QUEUE_SIZE};
use virtq::{
    DetachedPackedQueue, DetachedQueue, GuestMemory, PackedQueue, QueueConfig, QueueError, RingPosition, SplitQueue,
    VirtioFeatures,
};

use crate::memory::dirty::DirtyLog;
use crate::memory::{fault, GuestMemoryMap, MemoryFault};

/// Why a started ring stopped being served until it is set up again (see the module
/// documentation for what follows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingFault {
    /// `avail.idx` is more than the queue size ahead of (or behind) the device's position
    /// (§2.7.13.3: the driver never makes more than the queue size available).
    AvailIndex(AvailIndexError),
    /// The ring addresses no longer validate against the memory table (a region holding the
    /// ring was removed or replaced).
    Invalid(QueueError),
    /// The guest memory's file shrank under the mapping ([`crate::memory::fault`]).
    Memory(MemoryFault),
    /// The data path asked for the other ring layout than the one negotiated (a device model
    /// that serves split rings only and offered `VIRTIO_F_RING_PACKED` anyway).
    Layout,
    /// A chain the driver made available has no id to complete it with (a head or buffer id
    /// out of range, or a buffer id already in flight) on a ring where that loses the driver's
    /// place: with `VIRTIO_F_IN_ORDER` a completion stands for every chain before it, and on a
    /// packed ring the used position must move in step with the available one (§2.8.6). The
    /// rule is the core's ([`virtq::PopError::unreturnable_on`]); guest TX and guest RX
    /// ([`virtq::net::RxError::Ring`]) both fault the ring on such a chain.
    Unreturnable {
        /// The head index or buffer id.
        head: u16,
    },
}

impl RingFault {
    /// The fault a chain the core refused with `e` on `vq` puts the ring in, or `None` where
    /// the burst goes on (after completing a malformed chain, [`virtq::PopError::Chain`], with
    /// len 0 in its order, or skipping a slot with nothing to complete on a split ring without
    /// `IN_ORDER`). One owner for every device's bursts (guest TX both ways, virtq-blk); the
    /// rules are the core's: an invalid available index, and a chain that cannot be completed
    /// where that loses the driver's place ([`virtq::PopError::unreturnable_on`]). What the
    /// burst took before is still completed.
    #[inline(always)]
    pub fn on_pop_error<'m, Q: virtq::Virtqueue<'m>>(vq: &Q, e: &virtq::PopError) -> Option<RingFault> {
        match e {
            virtq::PopError::AvailIndex(e) => Some(RingFault::AvailIndex(*e)),
            e => e.unreturnable_on(vq).map(|head| RingFault::Unreturnable { head }),
        }
    }
}

impl std::fmt::Display for RingFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingFault::AvailIndex(e) => write!(f, "{}", virtq::PopError::AvailIndex(*e)),
            RingFault::Invalid(e) => write!(f, "ring no longer valid: {e}"),
            RingFault::Memory(e) => write!(f, "guest memory lost: {e}"),
            RingFault::Layout => f.write_str("the ring's layout (split or packed) is not the one this device serves"),
            RingFault::Unreturnable { head } => write!(
                f,
                "chain {head} cannot be completed (id out of range or in flight) on an IN_ORDER or packed ring"
            ),
        }
    }
}

/// Why a vring request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VringError {
    /// `SET_VRING_NUM` with 0, a non-power of two, or more than 32768 (family 17; the rule is
    /// the core's [`validate_size`], §2.7). Holds the value as received, untruncated.
    InvalidSize(u32),
    /// `SET_VRING_BASE` above 0xffff for a split ring (family 17).
    InvalidBase(u32),
    /// A request that needs a stopped ring arrived while it is started.
    Started,
    /// The ring cannot start: its size, addresses or the memory table are missing, or the
    /// addresses do not validate (unaligned, outside memory, overlapping — family 17).
    CannotStart(StartError),
    /// The ring cannot start on a memory table that lost its pages: the front-end must send a
    /// new one (or reset the device) first.
    MemoryFaulted(MemoryFault),
    /// `SET_VRING_ADDR` with `VHOST_VRING_F_LOG` and a `log_guest_addr` whose used ring (of the
    /// largest size) would run past 2^64 (family 16).
    LogAddrOverflow(u64),
}

impl std::fmt::Display for VringError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VringError::InvalidSize(n) => write!(f, "vring size {n} is not a power of two in 1..={MAX_QUEUE_SIZE}"),
            VringError::InvalidBase(b) => write!(f, "vring base {b} does not fit 16 bits"),
            VringError::Started => f.write_str("the ring is started"),
            VringError::CannotStart(why) => write!(f, "cannot start ring: {why}"),
            VringError::MemoryFaulted(m) => write!(f, "cannot start ring: guest memory lost: {m}"),
            VringError::LogAddrOverflow(a) => {
                write!(f, "used ring log address {a:#x} + the used ring's length overflows 64 bits")
            }
        }
    }
}

impl std::error::Error for VringError {}

/// Why `SET_VRING_KICK` could not start a ring ([`VringError::CannotStart`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartError {
    /// No `SET_VRING_NUM` yet.
    NoSize,
    /// No `SET_VRING_ADDR` yet.
    NoAddresses,
    /// No memory table yet.
    NoMemory,
    /// The core refused the ring against the memory table (§2.7 layout, family 17).
    Invalid(QueueError),
    /// A packed ring's `SET_VRING_BASE` names a slot at or past the ring's size.
    Position(u32),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::NoSize => f.write_str("no SET_VRING_NUM"),
            StartError::NoAddresses => f.write_str("no SET_VRING_ADDR"),
            StartError::NoMemory => f.write_str("no memory table"),
            StartError::Invalid(e) => write!(f, "{e}"),
            StartError::Position(b) => write!(f, "packed ring position {b:#010x} is outside the ring"),
        }
    }
}

/// Ring addresses from `SET_VRING_ADDR` (front-end virtual addresses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VringAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// `log_guest_addr` when the flags have `VHOST_VRING_F_LOG`, `None` otherwise: the guest
    /// physical address at which used-ring writes are logged ("Migration").
    pub log: Option<u64>,
}

/// The largest used ring, in bytes: flags, idx, 32768 elements of 8 bytes, avail_event
/// (§2.7.8). `log_guest_addr` is checked against this length whatever the ring's size, since
/// `SET_VRING_NUM` may come after `SET_VRING_ADDR` (or change later).
pub const MAX_USED_RING_LEN: u64 = 6 + 8 * MAX_QUEUE_SIZE as u64;

/// How the back-end learns of new buffers.
#[derive(Debug, Default)]
pub enum Kick {
    /// No `SET_VRING_KICK` yet.
    #[default]
    None,
    /// An eventfd the front-end writes.
    EventFd(Arc<OwnedFd>),
    /// `SET_VRING_KICK` with the invalid-fd flag: the back-end polls the ring.
    Polling,
}

/// The largest packed ring served: the in-flight table of each packed ring holds one entry
/// per buffer id (4 bytes). QEMU's virtio-net queues are at most 1024 entries.
pub const MAX_PACKED_QUEUE_SIZE: u16 = DEFAULT_IDS as u16;

/// A packed ring's queue as the data path borrows it for a burst: its state stays in place
/// (boxed in the ring) instead of moving in and out per burst.
pub type PackedView<'a, 'm> = PackedQueue<'m, GuestMemoryMap, DEFAULT_IDS, &'a mut DetachedPackedQueue<DEFAULT_IDS>>;

/// A started ring as the data path sees it.
#[derive(Debug)]
pub struct ActiveRing {
    /// The memory table the ring was started (or last re-mapped) with. Private: the cached
    /// view's pointers are into it, so it changes only through [`set_memory`](Self::set_memory),
    /// which drops the view.
    mem: Arc<GuestMemoryMap>,
    /// Size and front-end addresses.
    pub config: QueueConfig,
    /// Negotiated features.
    pub features: VirtioFeatures,
    /// `VIRTIO_F_RING_PACKED` was negotiated: the ring is a packed one (§2.8).
    packed: bool,
    /// A packed ring's descriptor ring and device area as guest addresses, where its used
    /// descriptors and event suppression writes are logged (`None` until found).
    packed_gpas: Option<(u64, u64)>,
    /// The queue validated against `mem`, kept between bursts: it holds the ring's positions.
    /// `None` after a memory table change or a fault (and then `parked` holds them).
    view: Option<CachedView>,
    /// The next available and next used positions while there is no `view` (split: indices;
    /// packed: [`RingPosition::to_bits`], slot and wrap counter in bit 15); stale otherwise.
    /// So the position is held once: the data path never copies it back and forth.
    parked: (u16, u16),
    /// Set once the ring cannot go on; cleared only by stopping and starting it again.
    fault: Option<RingFault>,
    /// [`fault::generation`] when `mem` was last checked for lost pages.
    seen_faults: u64,
}

/// A validated queue between bursts.
#[derive(Debug)]
enum CachedView {
    Split(DetachedQueue),
    /// Boxed: its in-flight table is 4 KiB.
    Packed(Box<DetachedPackedQueue<DEFAULT_IDS>>),
}

// SAFETY: the view's pointers are into the shared mappings of `ActiveRing::mem` (an
// `Arc<GuestMemoryMap>`, itself Send and Sync), which the `ActiveRing` owning the view keeps
// alive; it is only used under the ring's mutex, by one thread at a time.
unsafe impl Send for CachedView {}

/// The part of a ring shared with the data path.
#[derive(Debug, Default)]
pub struct VringShared {
    /// `Some` while the ring is started.
    pub active: Option<ActiveRing>,
    /// Enabled (`SET_VRING_ENABLE`, or implied by `SET_FEATURES` without protocol features).
    pub enabled: bool,
    /// Call eventfd (`SET_VRING_CALL`), if any.
    pub call: Option<Arc<OwnedFd>>,
    /// Kick eventfd, for data paths that sleep.
    pub kick: Option<Arc<OwnedFd>>,
    /// Error eventfd (`SET_VRING_ERR`), signalled when the ring faults.
    pub err: Option<Arc<OwnedFd>>,
    /// How many times the ring faulted ([`VringShared::fail`]).
    pub faults: u64,
    /// The dirty page log (vhost-user.rst "Migration"): `Some` exactly while
    /// `VHOST_F_LOG_ALL` is negotiated and `VHOST_USER_SET_LOG_BASE` gave a log. While it is,
    /// the data path calls [`DirtyLog::mark`]`(gpa, len)` after every write into a descriptor
    /// buffer ("All the modifications to memory pointed by vring 'descriptor' should be
    /// marked"), and, if [`log_guest_addr`](Self::log_guest_addr) is `Some`,
    /// `mark(log_guest_addr + offset, len)` after every write of `len` bytes at `offset` in the
    /// used ring.
    ///
    /// Read it under the same lock as the burst that writes, never from a copy kept across
    /// bursts: the control thread replaces it (a new `SET_LOG_BASE`, logging switched off)
    /// under this lock before it answers the front-end, which then syncs and frees the old
    /// log.
    pub log: Option<Arc<DirtyLog>>,
    /// The `SET_LOG_FD` eventfd, while [`log`](Self::log) is set and the front-end gave one:
    /// signalled once after each burst that marked the log ([`RingLog::kick`]).
    pub log_kick: Option<Arc<OwnedFd>>,
    /// `log_guest_addr` of `SET_VRING_ADDR` when its flags have `VHOST_VRING_F_LOG`: where
    /// used-ring writes are logged ("the write to first byte of the used ring is logged at this
    /// offset from log start"). `None`: used-ring writes are not logged.
    pub log_guest_addr: Option<u64>,
}

/// The dirty log as a ring's data path writes it ([`virtq::WriteLog`]): buffers by guest
/// address, the used ring at the ring's `log_guest_addr` (vhost-user.rst "Migration": used-ring
/// writes are logged there when `SET_VRING_ADDR` set `VHOST_VRING_F_LOG`).
#[derive(Clone, Copy, Debug)]
pub struct RingLog<'a> {
    /// The log.
    pub log: &'a DirtyLog,
    /// Guest address of the used ring, if the front-end asked for its writes to be logged.
    pub used: Option<u64>,
    /// A packed ring's descriptor ring and device area, as guest addresses: the device writes
    /// both (used descriptors in place, its event suppression structure), so both are logged
    /// whenever logging is on. QEMU's `log_guest_addr` names only the device area for a
    /// packed ring, so these are found from the ring addresses and the memory table.
    pub packed: Option<(u64, u64)>,
    /// The `SET_LOG_FD` eventfd, if the front-end gave one ([`VringShared::log_kick`]).
    pub log_kick: Option<&'a OwnedFd>,
}

impl RingLog<'_> {
    /// Tells the front-end that the log was modified (`SET_LOG_FD`), if it asked to be told:
    /// call once after a burst that wrote guest memory while logging.
    #[inline]
    pub fn kick(&self) {
        if let Some(k) = self.log_kick {
            signal(k);
        }
    }
}

impl virtq::WriteLog for RingLog<'_> {
    #[inline(always)]
    fn buffer(&self, addr: u64, len: u64) {
        self.log.mark(addr, len);
    }

    #[inline(always)]
    fn used_ring(&self, offset: u64, len: u64) {
        if let Some(base) = self.used {
            self.log.mark(base.wrapping_add(offset), len);
        }
    }

    #[inline(always)]
    fn descriptor_ring(&self, offset: u64, len: u64) {
        if let Some((desc, _)) = self.packed {
            self.log.mark(desc.wrapping_add(offset), len);
        }
    }

    #[inline(always)]
    fn device_area(&self, offset: u64, len: u64) {
        if let Some((_, device)) = self.packed {
            self.log.mark(device.wrapping_add(offset), len);
        }
    }
}

impl VringShared {
    /// The dirty log this ring's writes go to, while logging is on (`LOG_ALL` and a log base):
    /// borrow it for one burst, under the ring's lock.
    #[inline]
    pub fn ring_log(&self) -> Option<RingLog<'_>> {
        let packed = self.active.as_ref().and_then(|a| a.packed_gpas);
        self.log.as_deref().map(|log| RingLog {
            log,
            used: self.log_guest_addr,
            packed,
            log_kick: self.log_kick.as_deref(),
        })
    }

    /// What a burst needs, borrowed together: the started ring, whether it is enabled, and its
    /// dirty log while logging is on.
    #[inline]
    pub fn burst_parts(&mut self) -> (Option<&mut ActiveRing>, bool, Option<RingLog<'_>>) {
        let packed = self.active.as_ref().and_then(|a| a.packed_gpas);
        let log_kick = self.log_kick.as_deref();
        let log = self.log.as_deref().map(|log| RingLog { log, used: self.log_guest_addr, packed, log_kick });
        (self.active.as_mut(), self.enabled, log)
    }

    /// Marks the started ring as faulted: it is no longer served, its error eventfd is
    /// signalled and the fault counted. Returns `true` if the ring was running and is now
    /// faulted (the caller logs it, once); `false` if it was stopped or had already faulted.
    ///
    /// Whatever went wrong, if the memory lost its pages that is the cause: a ring read from
    /// zero pages looks broken too (an available index of 0), and the fault is recorded as
    /// [`RingFault::Memory`].
    pub fn fail(&mut self, fault: RingFault) -> bool {
        let Some(a) = self.active.as_mut() else { return false };
        if a.fault.is_some() {
            return false;
        }
        let fault = match (fault, a.mem.faulted()) {
            (RingFault::Memory(_), _) | (_, None) => fault,
            (_, Some(m)) => RingFault::Memory(m),
        };
        a.fault = Some(fault);
        // The validated queue goes (its pointers may be into lost pages); the position stays.
        a.park();
        self.faults += 1;
        if let Some(e) = &self.err {
            signal(e);
        }
        true
    }
}

impl ActiveRing {
    /// Starts a ring over `mem`: validates its layout once (the queue kept for the data path's
    /// first burst) and resumes at `base` (`SET_VRING_BASE`; `None`: a fresh ring). A split
    /// ring resumes its used index from the guest's used ring, a packed ring both positions
    /// from `base` (vhost-user.rst "Vring descriptor indices for packed virtqueues").
    pub fn start(
        mem: &Arc<GuestMemoryMap>,
        config: QueueConfig,
        features: VirtioFeatures,
        base: Option<u32>,
    ) -> Result<ActiveRing, StartError> {
        let packed = features.contains(VirtioFeatures::RING_PACKED);
        let m: &GuestMemoryMap = mem;
        let view = if packed {
            if config.size > MAX_PACKED_QUEUE_SIZE {
                return Err(StartError::Invalid(QueueError::InvalidSize { size: config.size }));
            }
            let (avail, used) = packed_positions(base.unwrap_or(FRESH_PACKED_BASE), config.size)?;
            let q: PackedQueue<'_, GuestMemoryMap> =
                PackedQueue::with_ring_memory(m, m.frontend(), config, features).map_err(StartError::Invalid)?;
            let mut d = Box::new(q.detach());
            // SAFETY: `d` was just validated over `mem`, which the ring keeps.
            unsafe { d.attach_mut(m) }.set_positions(avail, used);
            CachedView::Packed(d)
        } else {
            // A base a packed ring left (before the front-end renegotiated a split ring without
            // a new SET_VRING_BASE) is not a split ring's index.
            let base = base.unwrap_or(0);
            let avail = u16::try_from(base).map_err(|_| StartError::Position(base))?;
            let mut q = SplitQueue::with_ring_memory(m, m.frontend(), config, features).map_err(StartError::Invalid)?;
            q.set_next_avail(avail);
            CachedView::Split(q.detach())
        };
        let packed_gpas = if packed { packed_gpas(mem, &config) } else { None };
        Ok(ActiveRing {
            mem: Arc::clone(mem),
            config,
            features,
            packed,
            packed_gpas,
            view: Some(view),
            parked: (0, 0),
            fault: None,
            seen_faults: 0,
        })
    }

    /// The next available and next used positions: a split ring's indices; a packed ring's
    /// slots with their wrap counters in bit 15 ([`RingPosition::to_bits`]).
    pub fn positions(&self) -> (u16, u16) {
        match &self.view {
            None => self.parked,
            Some(CachedView::Split(d)) => (d.next_avail(), d.next_used()),
            Some(CachedView::Packed(d)) => (d.next_avail().to_bits(), d.next_used().to_bits()),
        }
    }

    /// Drops the validated queue, keeping its positions for the next one.
    fn park(&mut self) {
        self.parked = self.positions();
        self.view = None;
    }

    /// Moves the ring to these positions (encoded as [`positions`](Self::positions) gives
    /// them), e.g. a block device resubmitting its in-flight requests from the used position.
    /// Nothing may be in flight: the validated queue is dropped and the next burst validates
    /// the ring again at these positions.
    pub fn set_positions(&mut self, avail: u16, used: u16) {
        self.view = None;
        self.parked = (avail, used);
    }

    /// The memory table the ring runs on.
    pub fn memory(&self) -> &Arc<GuestMemoryMap> {
        &self.mem
    }

    /// Whether the ring is a packed one (§2.8): serve it with [`with_packed`](Self::with_packed)
    /// (or [`with_ring!`](crate::with_ring), which picks).
    #[inline]
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// The position `GET_VRING_BASE` answers (vhost-user.rst "Vring descriptor indices"):
    /// a split ring's next available index; for a packed ring the next available slot in bits
    /// 0..15, the driver-ring wrap counter in bit 15, the next used slot in bits 16..31 and
    /// the device-ring wrap counter in bit 31.
    pub fn base(&self) -> u32 {
        let (avail, used) = self.positions();
        if self.packed {
            u32::from(avail) | u32::from(used) << 16
        } else {
            u32::from(avail)
        }
    }

    /// The fault that stopped this ring, if any: a data path skips a faulted ring with this one
    /// check.
    #[inline]
    pub fn fault(&self) -> Option<&RingFault> {
        self.fault.as_ref()
    }

    /// Continues on a new memory table: the ring addresses are validated again at the next
    /// burst. A ring that faulted because its addresses did not fit the previous table
    /// ([`RingFault::Invalid`]) gets that chance too: a front-end that replaces a region with
    /// `REM_MEM_REG` then `ADD_MEM_REG` leaves a moment without it, which a busy-polling data
    /// path may see.
    pub fn set_memory(&mut self, mem: &Arc<GuestMemoryMap>) {
        self.park();
        self.mem = Arc::clone(mem);
        if self.packed {
            self.packed_gpas = packed_gpas(mem, &self.config);
        }
        if matches!(self.fault, Some(RingFault::Invalid(_))) {
            self.fault = None;
        }
    }

    /// Runs `f` on a queue view of the ring, then saves its indices. `Err` (and `f` is not
    /// run) if the ring cannot be served: it already faulted, its addresses no longer validate
    /// against the memory (e.g. after a memory table change), or the memory lost its pages.
    /// Pass a new fault to [`VringShared::fail`].
    ///
    /// The view is validated once per memory table and kept between bursts (measured: the
    /// validation was about 180 instructions per burst, a quarter of an empty poll). Lost
    /// pages cost one load per burst: the process-wide fault count is compared with the one
    /// seen last, and only a change makes the ring look at its memory table.
    pub fn with_queue<R>(&mut self, f: impl FnOnce(&mut SplitQueue<'_, GuestMemoryMap>) -> R) -> Result<R, RingFault> {
        if self.packed {
            return Err(RingFault::Layout);
        }
        self.check()?;
        let mem: &GuestMemoryMap = &self.mem;
        let mut q = match self.view.take() {
            // SAFETY: the view was created over `self.mem`, the same `GuestMemoryMap`, which
            // this ring still holds (a new table drops it in `set_memory`), so the ring ranges
            // it validated are still mapped.
            Some(CachedView::Split(d)) => unsafe { d.attach(mem) },
            _ => {
                let mut q = SplitQueue::with_ring_memory(mem, mem.frontend(), self.config, self.features)
                    .map_err(RingFault::Invalid)?;
                q.set_next_avail(self.parked.0);
                q.set_next_used(self.parked.1);
                q
            }
        };
        let r = f(&mut q);
        self.view = Some(CachedView::Split(q.detach()));
        Ok(r)
    }

    /// [`with_queue`](Self::with_queue) for a packed ring (§2.8): `f` gets the queue, its
    /// state borrowed in place. `Err(RingFault::Layout)` on a split ring.
    pub fn with_packed<R>(&mut self, f: impl FnOnce(&mut PackedView<'_, '_>) -> R) -> Result<R, RingFault> {
        if !self.packed {
            return Err(RingFault::Layout);
        }
        self.check()?;
        let ActiveRing { mem, config, features, view, parked, .. } = self;
        let mem: &GuestMemoryMap = mem;
        if view.is_none() {
            let (avail, used) = *parked;
            let size = config.size;
            let (Some(a), Some(u)) = (RingPosition::from_bits(avail, size), RingPosition::from_bits(used, size)) else {
                // Positions that do not fit the ring (a SET_VRING_BASE the ring's rules
                // refuse) cannot be served.
                return Err(RingFault::Invalid(QueueError::InvalidSize { size }));
            };
            let q: PackedQueue<'_, GuestMemoryMap> =
                PackedQueue::with_ring_memory(mem, mem.frontend(), *config, *features).map_err(RingFault::Invalid)?;
            let mut d = Box::new(q.detach());
            // SAFETY: `d` was just validated over `mem`.
            unsafe { d.attach_mut(mem) }.set_positions(a, u);
            *view = Some(CachedView::Packed(d));
        }
        let Some(CachedView::Packed(d)) = view else { unreachable!("a packed ring holds a packed view") };
        // SAFETY: the state was validated over `self.mem`, which this ring still holds (a new
        // table drops it in `set_memory`), so the ring ranges are still mapped.
        let mut q = unsafe { d.attach_mut(mem) };
        Ok(f(&mut q))
    }

    /// Whether the ring can be served now (see [`with_queue`](Self::with_queue)).
    #[inline(always)]
    fn check(&mut self) -> Result<(), RingFault> {
        if let Some(fault) = self.fault {
            return Err(fault);
        }
        let generation = fault::generation();
        if generation != self.seen_faults {
            if let Some(m) = self.mem.faulted() {
                // Not marked seen: every call reports it until `VringShared::fail` records it.
                return Err(RingFault::Memory(m));
            }
            self.seen_faults = generation;
        }
        Ok(())
    }
}

/// A packed ring's descriptor ring and device area as guest addresses (front-end addresses
/// translated, then looked up in the memory table); `None` if either is not in guest memory.
fn packed_gpas(mem: &GuestMemoryMap, config: &QueueConfig) -> Option<(u64, u64)> {
    let gpa = |va: u64, len: u64| {
        let p = mem.frontend().translate_contiguous(va, len).ok()?;
        mem.guest_address(p)
    };
    Some((gpa(config.desc_table, 16 * u64::from(config.size))?, gpa(config.used_ring, 4)?))
}

/// Runs `$body` on the started ring `$active`'s queue, bound to `$vq`, whichever its layout:
/// the body is compiled once per layout ([`ActiveRing::with_queue`],
/// [`ActiveRing::with_packed`]), so each is as fast as code written for it alone. Evaluates to
/// `Result<R, RingFault>`.
#[macro_export]
macro_rules! with_ring {
    ($active:expr, |$vq:ident| $body:expr) => {{
        let active: &mut $crate::vring::ActiveRing = $active;
        if active.is_packed() {
            active.with_packed(|$vq| $body)
        } else {
            active.with_queue(|$vq| $body)
        }
    }};
}

/// The position of a fresh packed ring, as `SET_VRING_BASE` would give it: both positions at
/// slot 0 with wrap counter 1 (§2.8.1).
const FRESH_PACKED_BASE: u32 = 0x8000_8000;

/// A packed ring's positions from `SET_VRING_BASE` (see [`ActiveRing::base`]), as
/// [`RingPosition::to_bits`] encodes them. QEMU before 8.2 and DPDK send and expect only the
/// available position (the upper 16 bits 0): the used position is then the same, which it is
/// whenever the ring stopped with nothing in flight, as this library's devices stop. The
/// encoding is lossy for one case: a ring stopped with the used position at slot 0, wrap 0,
/// behind a different available position (a chain consumed and never completed, which the
/// net device turns into a ring fault instead, [`RingFault::Unreturnable`]) reads back with
/// the used position at the available one.
fn packed_positions(base: u32, size: u16) -> Result<(RingPosition, RingPosition), StartError> {
    let avail = base as u16;
    let used = if base >> 16 == 0 { avail } else { (base >> 16) as u16 };
    match (RingPosition::from_bits(avail, size), RingPosition::from_bits(used, size)) {
        (Some(a), Some(u)) => Ok((a, u)),
        _ => Err(StartError::Position(base)),
    }
}

/// Ends a burst (every device's data path): records a fault found on the way (`result`'s, the
/// ring could not be served; `broken`, the burst met one) through `fail`, which logs it, then,
/// with the ring unlocked, signals the guest if the burst's publish asked for it.
#[inline(always)]
pub fn finish_burst(
    mut s: MutexGuard<'_, VringShared>,
    result: Result<bool, RingFault>,
    broken: Option<RingFault>,
    mut fail: impl FnMut(&mut VringShared, RingFault),
) {
    let notify = match result {
        Ok(notify) => notify,
        Err(fault) => {
            fail(&mut s, fault);
            false
        }
    };
    if let Some(fault) = broken {
        fail(&mut s, fault);
    }
    let call = if notify { s.call.clone() } else { None };
    drop(s);
    if let Some(c) = call {
        signal(&c);
    }
}

/// Signals an eventfd (a call to the guest). Errors are ignored: a front-end that closed its
/// end simply gets no interrupt.
pub fn signal(fd: &OwnedFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from `one` to an eventfd we own.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// One vring, control side.
#[derive(Debug)]
pub struct Vring {
    num: Option<u16>,
    addrs: Option<VringAddrs>,
    /// `SET_VRING_BASE` as received (split: the next available index; packed: both positions,
    /// see [`ActiveRing::base`]), or the position `GET_VRING_BASE` stopped the ring at; `None`
    /// until either (a fresh ring: index 0, or for a packed ring slot 0 with both wrap
    /// counters 1, §2.8.1).
    base: Option<u32>,
    kick: Kick,
    shared: Arc<Mutex<VringShared>>,
}

impl Default for Vring {
    fn default() -> Self {
        Vring { num: None, addrs: None, base: None, kick: Kick::None, shared: Arc::default() }
    }
}

impl Vring {
    /// The state shared with the data path.
    pub fn shared(&self) -> &Arc<Mutex<VringShared>> {
        &self.shared
    }

    fn lock(&self) -> MutexGuard<'_, VringShared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the ring is started.
    pub fn started(&self) -> bool {
        self.lock().active.is_some()
    }

    /// Whether the ring is enabled.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// `SET_VRING_NUM`: the size, judged by the core's rule ([`validate_size`], §2.7). The
    /// wire field is a `u32`; a value above `u16::MAX` is refused as received, never truncated
    /// (65536 would wrap to 0, 0x1_0040 to the valid 64).
    pub fn set_num(&mut self, num: u32) -> Result<(), VringError> {
        let size = u16::try_from(num).map_err(|_| VringError::InvalidSize(num))?;
        validate_size(size).map_err(|_| VringError::InvalidSize(num))?;
        if self.started() {
            return Err(VringError::Started);
        }
        self.num = Some(size);
        Ok(())
    }

    /// `SET_VRING_ADDR` (validated against memory when the ring starts).
    ///
    /// On a started ring only the logging part may change: QEMU switches used-ring logging on
    /// and off for a running device by sending the same addresses again with or without
    /// `VHOST_VRING_F_LOG` (vhost-user.rst "Migration"). Different ring addresses on a started
    /// ring are refused ([`VringError::Started`]).
    pub fn set_addrs(&mut self, addrs: VringAddrs) -> Result<(), VringError> {
        if let Some(log) = addrs.log {
            // Only overflow can be judged here: "this value might be outside the legal guest
            // physical address range", and the log may not be set yet; `DirtyLog::mark`
            // skips pages past its end.
            log.checked_add(MAX_USED_RING_LEN).ok_or(VringError::LogAddrOverflow(log))?;
        }
        let mut s = self.lock();
        if s.active.is_some() {
            let same = |a: &VringAddrs| (a.desc, a.avail, a.used) == (addrs.desc, addrs.avail, addrs.used);
            if !self.addrs.as_ref().is_some_and(same) {
                return Err(VringError::Started);
            }
        }
        s.log_guest_addr = addrs.log;
        drop(s);
        self.addrs = Some(addrs);
        Ok(())
    }

    /// Gives the data path the dirty log to mark, or none (see [`VringShared::log`]), and the
    /// eventfd to signal after marking it ([`VringShared::log_kick`]).
    pub fn set_log(&mut self, log: Option<&Arc<DirtyLog>>, kick: Option<&Arc<OwnedFd>>) {
        let mut s = self.lock();
        s.log = log.cloned();
        s.log_kick = kick.cloned();
    }

    /// `SET_VRING_BASE` (vhost-user.rst "Vring descriptor indices"): for a split ring the next
    /// available index, at most 0xffff; for a packed ring (`features` has
    /// `VIRTIO_F_RING_PACKED`) the positions as [`ActiveRing::base`] encodes them, checked
    /// against the ring's size when it starts.
    pub fn set_base(&mut self, base: u32, features: VirtioFeatures) -> Result<(), VringError> {
        if !features.contains(VirtioFeatures::RING_PACKED) && base > 0xffff {
            return Err(VringError::InvalidBase(base));
        }
        if self.started() {
            return Err(VringError::Started);
        }
        self.base = Some(base);
        Ok(())
    }

    /// `SET_VRING_CALL`: replaces the call eventfd (`None`: no interrupts).
    pub fn set_call(&mut self, fd: Option<OwnedFd>) {
        self.lock().call = fd.map(Arc::new);
    }

    /// `SET_VRING_ERR`: the eventfd signalled when the ring faults (closed on replacement or
    /// reset).
    pub fn set_err(&mut self, fd: Option<OwnedFd>) {
        self.lock().err = fd.map(Arc::new);
    }

    /// Marks the ring faulted ([`VringShared::fail`]); `true` if it was running until now.
    pub fn fail(&mut self, fault: RingFault) -> bool {
        self.lock().fail(fault)
    }

    /// The fault that stopped the started ring, if any.
    pub fn fault(&self) -> Option<RingFault> {
        self.lock().active.as_ref().and_then(|a| a.fault)
    }

    /// `SET_VRING_ENABLE`, or the implicit enable of `SET_FEATURES`. Returns whether the state
    /// changed. Enabling a started ring also wakes the data path, so buffers (and a kick) that
    /// arrived while it was disabled are not lost (rust-vmm/vhost #247).
    pub fn set_enabled(&mut self, enabled: bool) -> bool {
        let mut s = self.lock();
        let changed = s.enabled != enabled;
        s.enabled = enabled;
        if changed && enabled {
            if let Some(k) = &s.kick {
                signal(k);
            }
        }
        changed
    }

    /// `SET_VRING_KICK`: records the kick source and starts the ring (vhost-user.rst: "The
    /// back-end must start a ring upon receiving a kick"). The used index is read from guest
    /// memory at start (rust-vmm/vhost #180).
    pub fn set_kick(
        &mut self,
        fd: Option<OwnedFd>,
        mem: Option<&Arc<GuestMemoryMap>>,
        features: VirtioFeatures,
    ) -> Result<(), VringError> {
        self.kick = match fd {
            Some(fd) => Kick::EventFd(Arc::new(fd)),
            None => Kick::Polling,
        };
        let kick = match &self.kick {
            Kick::EventFd(k) => Some(Arc::clone(k)),
            _ => None,
        };
        {
            // Already started (hostile-inputs family 18, tests/hostile.rs
            // `family18_kick_again_on_a_started_ring_keeps_its_position`): only the kick source
            // changes. Restarting would rewind `next_avail` to the last SET_VRING_BASE and hand
            // chains the guest already got back to the device again (size, addresses and
            // features cannot change while started).
            let mut s = self.lock();
            if s.active.is_some() {
                s.kick = kick;
                if let Some(k) = &s.kick {
                    signal(k);
                }
                return Ok(());
            }
        }
        let num = self.num.ok_or(VringError::CannotStart(StartError::NoSize))?;
        let addrs = self.addrs.ok_or(VringError::CannotStart(StartError::NoAddresses))?;
        let mem = mem.ok_or(VringError::CannotStart(StartError::NoMemory))?;
        if let Some(m) = mem.faulted() {
            return Err(VringError::MemoryFaulted(m));
        }
        let config = QueueConfig { size: num, desc_table: addrs.desc, avail_ring: addrs.avail, used_ring: addrs.used };
        let active = ActiveRing::start(mem, config, features, self.base).map_err(VringError::CannotStart)?;
        let mut s = self.lock();
        s.kick = kick;
        s.active = Some(active);
        if let Some(k) = &s.kick {
            // Buffers may already be waiting: have the data path look once.
            signal(k);
        }
        Ok(())
    }

    /// `GET_VRING_BASE`: stops the ring and returns its position ([`ActiveRing::base`]); a
    /// ring that never had a position answers a fresh ring's for the layout of `features`
    /// (a packed ring's slot 0 with both wrap counters 1, §2.8.1).
    pub fn stop_with(&mut self, features: VirtioFeatures) -> u32 {
        let base = self.stop();
        if self.base.is_none() && features.contains(VirtioFeatures::RING_PACKED) {
            return FRESH_PACKED_BASE;
        }
        base
    }

    /// Stops the ring and returns its position ([`ActiveRing::base`]; 0 if it never had one).
    pub fn stop(&mut self) -> u32 {
        let active = {
            let mut s = self.lock();
            s.kick = None;
            s.active.take()
        };
        if let Some(a) = active {
            self.base = Some(a.base());
        }
        self.kick = Kick::None;
        self.base.unwrap_or(0)
    }

    /// A new memory table: a started ring continues on it (its addresses are re-validated per
    /// burst by the data path).
    pub fn set_memory(&mut self, mem: &Arc<GuestMemoryMap>) {
        if let Some(a) = self.lock().active.as_mut() {
            a.set_memory(mem);
        }
    }

    /// Features changed (`SET_FEATURES` while started is refused by the device; this only
    /// records the value for the next start).
    pub fn reset(&mut self) {
        self.stop();
        self.num = None;
        self.addrs = None;
        self.base = None;
        let mut s = self.lock();
        s.call = None;
        s.err = None;
        s.enabled = false;
        s.log = None;
        s.log_kick = None;
        s.log_guest_addr = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_and_base_are_validated_without_truncation() {
        let mut v = Vring::default();
        // 0x1_0040 and 0x1_8000 truncate to valid sizes (64, 32768).
        for bad in [0u32, 3, 32767, 65535, 65536, 0x1_0040, 0x1_8000, u32::MAX] {
            assert_eq!(v.set_num(bad), Err(VringError::InvalidSize(bad)));
        }
        assert_eq!(v.set_num(32768), Ok(()));
        assert_eq!(v.set_base(0x1_0000, VirtioFeatures::empty()), Err(VringError::InvalidBase(0x1_0000)));
        assert_eq!(v.set_base(0xffff, VirtioFeatures::empty()), Ok(()));
        // A packed ring's base carries both positions; judged against the size at start.
        assert_eq!(v.set_base(0x8003_8005, VirtioFeatures::RING_PACKED), Ok(()));
        let bits = |r: Result<(RingPosition, RingPosition), StartError>| r.map(|(a, u)| (a.to_bits(), u.to_bits()));
        assert_eq!(bits(packed_positions(0x8003_8005, 8)), Ok((0x8005, 0x8003)));
        assert_eq!(bits(packed_positions(0x8005, 8)), Ok((0x8005, 0x8005)), "used = avail when only avail is given");
        assert_eq!(bits(packed_positions(0x8008, 8)), Err(StartError::Position(0x8008)));
        assert_eq!(bits(packed_positions(0x0009_8000, 8)), Err(StartError::Position(0x0009_8000)));
    }

    #[test]
    fn kick_without_configuration_records_the_source_but_does_not_start() {
        let mut v = Vring::default();
        assert_eq!(v.set_kick(None, None, VirtioFeatures::empty()), Err(VringError::CannotStart(StartError::NoSize)));
        assert!(!v.started());
        assert!(matches!(v.kick, Kick::Polling));
    }

    #[test]
    fn enable_is_independent_of_start() {
        let mut v = Vring::default();
        assert!(v.set_enabled(true));
        assert!(!v.set_enabled(true));
        assert!(v.enabled() && !v.started());
        assert_eq!(v.stop(), 0);
        assert!(v.enabled(), "stopping does not disable");
    }
}
