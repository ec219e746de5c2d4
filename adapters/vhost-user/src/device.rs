//! The back-end's protocol state machine for one vhost-user connection: every front-end
//! request decoded by [`crate::message`] is applied here to the device state (features, memory
//! table, vrings, status, config space) and answered.
//!
//! No I/O happens here: [`VhostUserDevice::handle`] takes a decoded message and returns what to
//! send and whether to close, so tests and fuzzers drive it directly.
//!
//! ## Error policy
//! A request that fails (malformed payload, out-of-range vring index, a feature that was not
//! offered, a ring that cannot start, …) is logged with its typed error. If the front-end asked
//! for a reply (`NEED_REPLY`) it gets a REPLY_ACK with a non-zero status and the connection
//! stays up; a failed request whose reply is mandatory (the `GET_*` family), or any failure
//! without `NEED_REPLY`, closes the connection, which tears down this device only
//! (vhost-user.rst: "If back-end detects some error such as incompatible features, it may
//! also close the connection"). A REPLY_ACK is sent only where `REPLY_ACK` was negotiated
//! and the request set `NEED_REPLY` ("Communication"); requests with a mandatory reply get
//! their reply regardless.
//!
//! `SET_LOG_BASE` is the exception to the REPLY_ACK rule: with `LOG_SHMFD` negotiated its
//! reply is mandatory, and QEMU reads only the reply's request code, not a status. A refused
//! log (a file too small for `mmap_offset + mmap_size`, an overflowing description, size 0:
//! [`crate::memory::dirty::LogError`]) therefore closes the connection, so that the front-end
//! fails the migration instead of running it without a log.
//!
//! ## Dirty page logging (vhost-user.rst "Migration")
//! - `SET_LOG_BASE` (only with `LOG_SHMFD` negotiated) maps a new [`DirtyLog`] and answers
//!   with a `u64` 0; the previous log is unmapped once no ring holds it. `SET_LOG_FD` keeps its
//!   eventfd ([`VhostUserDevice::log_fd`]), closing the previous one.
//! - The data path finds the log in [`VringShared::log`]: `Some` exactly while
//!   `VHOST_F_LOG_ALL` is negotiated and a log is set. `SET_FEATURES` may switch
//!   `VHOST_F_LOG_ALL` on and off while rings run (every other change is still refused), and
//!   `SET_VRING_ADDR` may switch `VHOST_VRING_F_LOG` on a started ring if its addresses stay
//!   the same ([`VringShared::log_guest_addr`]). `VHOST_F_LOG_ALL` without a log logs one
//!   warning: nothing is marked, and a migration relying on it loses pages.
//! - Disconnect and `RESET_DEVICE` unmap the log and close the log fd; `SET_STATUS` 0 keeps
//!   them (they belong to the migration) but clears `VHOST_F_LOG_ALL` with the other features.
//! - A log whose file shrinks under the mapping is caught like guest memory
//!   ([`crate::memory::fault`]): one log line ([`VhostUserDevice::check_log`]), nothing more
//!   is marked, the device keeps running.
//!
//! ## Device status (`VHOST_USER_PROTOCOL_F_STATUS`)
//! - `SET_STATUS` 0 is a device reset (§2.1: "Writing 0 into this field resets the device"):
//!   every ring stops and is disabled, negotiated features are forgotten, and the device
//!   becomes not ready. Ring positions are kept as the next `GET_VRING_BASE` answers, because
//!   QEMU sends status 0 *before* it stops the rings with `GET_VRING_BASE` and uses the
//!   answer to resume (migration, `vm stop`/`cont`); a reset that forgot them would make the
//!   guest's buffers be served twice. `RESET_DEVICE` forgets them too.
//! - `FEATURES_OK` is kept only if `SET_FEATURES` succeeded first; otherwise the bit reads
//!   back clear from `GET_STATUS`, which is how a device refuses features (§3.1.1 step 6).
//! - `NEEDS_RESET` (§2.1.2) is set by the device when its guest memory was lost
//!   ([`VhostUserDevice::check_memory`]) and stays set until the front-end resets the device
//!   (status 0, `RESET_DEVICE`, or a new connection). Where `CONFIG` and `BACKEND_REQ` are
//!   negotiated the front-end is also sent `BACKEND_CONFIG_CHANGE_MSG` ("the device MUST send
//!   a device configuration change notification to the driver").

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use log::debug;
use virtq::VirtioFeatures;

use crate::limited;
use crate::memory::dirty::{DirtyLog, LogError};
use crate::memory::{GuestMemoryMap, MemoryError, MemoryFault, DEFAULT_MAX_MEM_SLOTS};
use crate::message::{
    encode_ack, encode_backend_request, encode_get_config_error, encode_get_config_reply, encode_get_status_reply,
    encode_u64_reply, encode_vring_state_reply, FrontendMessage, Header, MessageError, ProtocolFeatures as Pf, Request,
    BACKEND_CONFIG_CHANGE_MSG, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VRING_F_LOG,
};
use crate::vring::{RingFault, Vring, VringAddrs, VringError, VringShared};

/// `VIRTIO_CONFIG_S_DRIVER_OK` in the device status byte (§2.1).
pub const STATUS_DRIVER_OK: u8 = 4;
/// `VIRTIO_CONFIG_S_FEATURES_OK` (§2.1).
pub const STATUS_FEATURES_OK: u8 = 8;
/// `VIRTIO_CONFIG_S_NEEDS_RESET` (§2.1): the device hit an error it cannot recover from.
pub const STATUS_NEEDS_RESET: u8 = 0x40;

/// `VIRTIO_NET_S_LINK_UP` in the virtio-net config `status` (§5.1.4).
const NET_S_LINK_UP: u16 = 1;
/// Offset and length of `mac` in `struct virtio_net_config` (§5.1.4).
const NET_CONFIG_MAC: std::ops::Range<usize> = 0..6;

/// The virtio-net configuration space the back-end presents (`GET_CONFIG`, VIRTIO 1.2
/// §5.1.4 `struct virtio_net_config`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// `mac` (with `VIRTIO_NET_F_MAC`).
    pub mac: [u8; 6],
    /// `status`: `VIRTIO_NET_S_LINK_UP` = 1.
    pub status: u16,
    /// `mtu` (with `VIRTIO_NET_F_MTU`).
    pub mtu: u16,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig { mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56], status: 1, mtu: 1500 }
    }
}

/// What a device offers and how it is laid out.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Virtio features offered (`VHOST_USER_F_PROTOCOL_FEATURES` is added).
    pub features: VirtioFeatures,
    /// Protocol features offered.
    pub protocol_features: Pf,
    /// Queue pairs (virtio-net: RX queue `2n`, TX queue `2n + 1`).
    pub queue_pairs: u16,
    /// Config space contents.
    pub net: NetConfig,
    /// Memory slots for `CONFIGURE_MEM_SLOTS`.
    pub max_mem_slots: usize,
    /// Refuse guest memory that the front-end could shrink: every region must be a memfd
    /// sealed with `F_SEAL_SHRINK` (QEMU's `memory-backend-memfd` seals by default). A lost
    /// region cannot happen by truncation (a hole punched in a hugetlbfs file whose pool is
    /// empty still can, and still costs only the device: [`crate::memory::fault`]).
    pub require_sealed_memory: bool,
}

impl DeviceConfig {
    /// The features a virtio-net back-end on this library supports by default.
    ///
    /// Live migration: `VHOST_F_LOG_ALL` and `LOG_SHMFD` are offered, so that a front-end can
    /// have the device's writes logged ([`crate::memory::dirty`]); the data path marks the log
    /// it finds in [`VringShared::log`].
    ///
    /// `VIRTIO_F_IN_ORDER` (§2.7.8.2) is offered because [`crate::net::NetDevice`] uses every
    /// buffer in the order it was made available (bad chains included: they are completed
    /// with len 0 in place). A driver that negotiates it (DPDK virtio-user) recycles its
    /// descriptors without a free list. An application that completes chains out of order
    /// through its own queue views must remove it.
    pub fn net_default() -> DeviceConfig {
        DeviceConfig {
            features: VirtioFeatures::VERSION_1
                | VirtioFeatures::IN_ORDER
                | VirtioFeatures::RING_INDIRECT_DESC
                | VirtioFeatures::RING_EVENT_IDX
                | VirtioFeatures::NET_MRG_RXBUF
                | VirtioFeatures::NET_MAC
                | VirtioFeatures::NET_MTU
                | VirtioFeatures::NET_STATUS
                | VirtioFeatures::NOTIFY_ON_EMPTY
                | VHOST_F_LOG_ALL,
            // Each of these is honoured end to end (see the module documentation). `RARP`
            // (announcing the guest after migration) is not offered yet.
            protocol_features: Pf::MQ
                | Pf::LOG_SHMFD
                | Pf::REPLY_ACK
                | Pf::CONFIG
                | Pf::STATUS
                | Pf::BACKEND_REQ
                | Pf::CONFIGURE_MEM_SLOTS
                | Pf::NET_MTU
                | Pf::RESET_DEVICE,
            queue_pairs: 1,
            net: NetConfig::default(),
            max_mem_slots: DEFAULT_MAX_MEM_SLOTS,
            require_sealed_memory: false,
        }
    }

    /// Virtio features offered on the wire.
    pub fn offered_features(&self) -> VirtioFeatures {
        let mut f = self.features;
        if self.queue_pairs > 1 {
            f |= VirtioFeatures::NET_MQ;
        }
        f | VHOST_USER_F_PROTOCOL_FEATURES
    }
}

/// Something the owner of the device should know about (turned into callbacks by the
/// control loop).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// `SET_FEATURES` accepted.
    FeaturesChanged(VirtioFeatures),
    /// A vring was enabled or disabled.
    VringStateChanged {
        /// Vring index.
        index: u16,
        /// New state.
        enabled: bool,
    },
    /// Both vrings of at least one queue pair are started and enabled: traffic can flow.
    Ready,
    /// The device stopped being ready (rings stopped, reset, or disconnect).
    NotReady,
    /// `SEND_RARP` (after a live migration): announce this MAC address into the network the
    /// device is attached to ([`crate::net::rarp_announce`]), so that switches learn the
    /// guest's new location. Only with the `RARP` protocol feature, which a device offers
    /// only if its owner does that ([`crate::backend::DeviceHandler::announce`]).
    Announce([u8; 6]),
}

/// Why a request failed.
#[derive(Debug)]
pub enum RequestError {
    /// The message itself is malformed.
    Message(MessageError),
    /// A vring index ≥ the number of vrings (family 14).
    VringIndex(u32),
    /// Acknowledged features that were not offered (`SET_PROTOCOL_FEATURES`).
    FeaturesNotOffered(Pf),
    /// `SET_FEATURES` that the virtio rules refuse: a bit not offered, or a feature without
    /// one it depends on (§5.1.3.1).
    Features(virtq::features::FeatureError),
    /// `SET_FEATURES` while rings are started that changes more than `VHOST_F_LOG_ALL`
    /// (family 18).
    FeaturesWhileStarted,
    /// A request that needs a protocol feature the front-end did not negotiate
    /// (`SET_LOG_BASE` without `LOG_SHMFD`).
    NotNegotiated(Request),
    /// The dirty log of `SET_LOG_BASE` was refused (family 16).
    Log(LogError),
    /// A vring request failed.
    Vring(VringError),
    /// The memory table was rejected.
    Memory(MemoryError),
    /// A request for a feature this back-end does not offer.
    NotSupported(Request),
    /// `GET_CONFIG` / `SET_CONFIG` outside the config space, or a read-only field.
    Config,
    /// `NET_SET_MTU` above the MTU the device offers.
    Mtu(u16),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Message(e) => write!(f, "{e}"),
            RequestError::VringIndex(i) => write!(f, "vring index {i} out of range"),
            RequestError::FeaturesNotOffered(b) => write!(f, "protocol features {:#x} were not offered", b.bits()),
            RequestError::Features(e) => write!(f, "{e}"),
            RequestError::FeaturesWhileStarted => {
                f.write_str("SET_FEATURES changing more than VHOST_F_LOG_ALL while rings are started")
            }
            RequestError::NotNegotiated(r) => write!(f, "{r} needs a protocol feature that was not negotiated"),
            RequestError::Log(e) => write!(f, "{e}"),
            RequestError::Vring(e) => write!(f, "{e}"),
            RequestError::Memory(e) => write!(f, "{e}"),
            RequestError::NotSupported(r) => write!(f, "{r} is not supported"),
            RequestError::Config => f.write_str("config space access out of range or read-only"),
            RequestError::Mtu(m) => write!(f, "MTU {m} is above the device's"),
        }
    }
}

impl std::error::Error for RequestError {}

/// What to do after a request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Response {
    /// Bytes to send back (a reply or REPLY_ACK), if any.
    pub reply: Option<Vec<u8>>,
    /// Close the connection (after sending `reply`).
    pub close: bool,
}

/// Protocol state of one vhost-user device.
#[derive(Debug)]
pub struct VhostUserDevice {
    config: DeviceConfig,
    acked_features: VirtioFeatures,
    features_set: bool,
    acked_protocol: Pf,
    mem: Option<Arc<GuestMemoryMap>>,
    vrings: Vec<Vring>,
    backend_req: Option<OwnedFd>,
    status: u8,
    /// The memory fault already reported by [`check_memory`](Self::check_memory).
    memory_fault: Option<MemoryFault>,
    /// The MAC the device was configured with: a reset forgets what `SET_CONFIG` wrote, so the
    /// next front-end on the socket does not inherit the last one's.
    configured_mac: [u8; 6],
    /// The dirty log of the last `SET_LOG_BASE` (vhost-user.rst "Migration"). Handed to the
    /// rings only while `VHOST_F_LOG_ALL` is negotiated ([`update_log`](Self::update_log)).
    log: Option<Arc<DirtyLog>>,
    /// `SET_LOG_FD`: the eventfd "to inform the front-end that the log has been modified".
    log_fd: Option<OwnedFd>,
    /// The log's fault was reported by [`check_log`](Self::check_log).
    log_fault_reported: bool,
    /// `VHOST_F_LOG_ALL` without a log was reported (once until either changes).
    log_missing_reported: bool,
    ready: bool,
    events: Vec<DeviceEvent>,
}

impl VhostUserDevice {
    /// A device in its initial state: no features, no memory, rings stopped and disabled.
    pub fn new(config: DeviceConfig) -> Self {
        let n = config.queue_pairs as usize * 2;
        let configured_mac = config.net.mac;
        VhostUserDevice {
            configured_mac,
            vrings: (0..n).map(|_| Vring::default()).collect(),
            config,
            acked_features: VirtioFeatures::empty(),
            features_set: false,
            acked_protocol: Pf::empty(),
            mem: None,
            backend_req: None,
            status: 0,
            memory_fault: None,
            log: None,
            log_fd: None,
            log_fault_reported: false,
            log_missing_reported: false,
            ready: false,
            events: Vec::new(),
        }
    }

    /// The device's configuration.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// Shared vring state, for the data path (index = virtqueue index).
    pub fn vring_shared(&self) -> Vec<Arc<Mutex<VringShared>>> {
        self.vrings.iter().map(|v| Arc::clone(v.shared())).collect()
    }

    /// Features acknowledged by `SET_FEATURES`.
    pub fn acked_features(&self) -> VirtioFeatures {
        self.acked_features
    }

    /// Events since the last call.
    pub fn take_events(&mut self) -> Vec<DeviceEvent> {
        std::mem::take(&mut self.events)
    }

    /// Whether at least one queue pair is started and enabled.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Back to the initial state (disconnect, `RESET_DEVICE`): rings stopped, fds closed,
    /// memory and dirty log unmapped once the data path lets go of them.
    pub fn reset(&mut self) {
        for v in &mut self.vrings {
            v.reset();
        }
        self.acked_features = VirtioFeatures::empty();
        self.features_set = false;
        self.acked_protocol = Pf::empty();
        self.mem = None;
        self.memory_fault = None;
        self.log = None;
        self.log_fd = None;
        self.backend_req = None;
        self.status = 0;
        self.config.net.mac = self.configured_mac;
        self.update_log();
        self.update_ready();
    }

    /// The dirty log the data path marks, if logging is on: the one in every ring's
    /// [`VringShared::log`].
    pub fn dirty_log(&self) -> Option<&Arc<DirtyLog>> {
        self.log.as_ref().filter(|_| self.acked_features.contains(VHOST_F_LOG_ALL))
    }

    /// The eventfd of `SET_LOG_FD`, if any: signal it after marking the log to "inform the
    /// front-end that the log has been modified" (optional; QEMU does not send one).
    pub fn log_fd(&self) -> Option<BorrowedFd<'_>> {
        self.log_fd.as_ref().map(|fd| fd.as_fd())
    }

    /// Looks for a dirty log whose file shrank under its mapping ([`crate::memory::fault`]);
    /// call it when the fault handler signals. Returns the faulting host address the first
    /// time, for the caller to log: from then on nothing is logged, so a migration in
    /// progress loses the pages the device writes (the front-end truncated its own log). The
    /// rings keep running; a new `SET_LOG_BASE` brings logging back.
    pub fn check_log(&mut self) -> Option<usize> {
        let addr = self.log.as_ref()?.faulted()?;
        if self.log_fault_reported {
            return None;
        }
        self.log_fault_reported = true;
        Some(addr)
    }

    /// Hands every ring the dirty log to mark: the log of `SET_LOG_BASE` while
    /// `VHOST_F_LOG_ALL` is negotiated, otherwise none. The one place [`VringShared::log`] is
    /// written; called after every request that changes either (and after a reset).
    ///
    /// `VHOST_F_LOG_ALL` without a log is worth one warning, not an error: QEMU's
    /// `vhost_dev_start` during a migration sends `SET_FEATURES` with it, starts the rings, and
    /// only then `SET_LOG_BASE`.
    fn update_log(&mut self) {
        let log_all = self.acked_features.contains(VHOST_F_LOG_ALL);
        let log = self.log.as_ref().filter(|_| log_all);
        for v in &mut self.vrings {
            v.set_log(log);
        }
        if log_all && self.log.is_none() {
            if !self.log_missing_reported {
                self.log_missing_reported = true;
                limited!(
                    warn,
                    "vhost-user: VHOST_F_LOG_ALL negotiated but no SET_LOG_BASE (yet): the device's writes to guest memory are not logged until one arrives; a front-end that migrates without sending one loses those pages (a front-end bug)"
                );
            }
        } else {
            self.log_missing_reported = false;
        }
    }

    /// The device status byte (`GET_STATUS`), including the device's own `NEEDS_RESET`.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Looks for guest memory that lost its pages ([`crate::memory::fault`]); call it when the
    /// fault handler signals. The first time a fault of the current memory table is seen, the
    /// device stops: every started ring faults (its error eventfd is signalled), the status
    /// gets `NEEDS_RESET`, the link reads down in the config space, and the fault is returned
    /// for the caller to log and to tell the front-end ([`config_change_notice`]). Later calls
    /// return `None` until a new memory table or a reset.
    ///
    /// [`config_change_notice`]: Self::config_change_notice
    pub fn check_memory(&mut self) -> Option<MemoryFault> {
        let fault = self.mem.as_ref()?.faulted()?;
        if self.memory_fault == Some(fault) {
            return None;
        }
        self.memory_fault = Some(fault);
        for v in &mut self.vrings {
            v.fail(RingFault::Memory(fault));
        }
        self.status |= STATUS_NEEDS_RESET;
        Some(fault)
    }

    /// The back-end request channel and `BACKEND_CONFIG_CHANGE_MSG`, where the front-end
    /// negotiated both `BACKEND_REQ` and `CONFIG` and sent the channel: what the owner sends to
    /// tell the front-end that the status or config space changed. Never with `NEED_REPLY`,
    /// so that the control loop does not wait on a front-end.
    pub fn config_change_notice(&self) -> Option<(BorrowedFd<'_>, Vec<u8>)> {
        let negotiated = self.acked_protocol.contains(Pf::BACKEND_REQ | Pf::CONFIG);
        let fd = self.backend_req.as_ref().filter(|_| negotiated)?;
        Some((fd.as_fd(), encode_backend_request(BACKEND_CONFIG_CHANGE_MSG)))
    }

    /// The device reset of `SET_STATUS` 0: rings stopped (their positions kept for
    /// `GET_VRING_BASE`) and disabled, features and status cleared. The memory table, the
    /// protocol features and the back-end channel belong to the connection and stay, unless
    /// the memory lost its pages.
    ///
    /// So do the dirty log and the `SET_LOG_FD` eventfd: they belong to the migration, not to
    /// the device state (QEMU stops the device with status 0 and syncs the log after it).
    /// With the features cleared `VHOST_F_LOG_ALL` is off, so the data path has no log until
    /// the next `SET_FEATURES` asks for it again.
    fn reset_status(&mut self) {
        for v in &mut self.vrings {
            v.stop();
            v.set_enabled(false);
        }
        self.acked_features = VirtioFeatures::empty();
        self.features_set = false;
        self.status = 0;
        self.update_log();
        if self.memory_fault.is_some() {
            self.mem = None;
            self.memory_fault = None;
        }
    }

    /// Applies one request. `msg` is the decode result for `header` (decode errors are
    /// handled here too, so that the reply policy is in one place).
    pub fn handle(&mut self, header: &Header, msg: Result<FrontendMessage, MessageError>) -> Response {
        let request = header.request().ok();
        let name = request.map(|r| r.name()).unwrap_or("UNKNOWN");
        let result = msg.map_err(RequestError::Message).and_then(|m| self.apply(m));
        let reply_mandatory = request.is_some_and(|r| r.reply_required(0, self.acked_protocol));
        // "REPLY_ACK": an ack only where the feature was negotiated and the request asked.
        let ack = header.need_reply() && self.acked_protocol.contains(Pf::REPLY_ACK);
        let response = match result {
            Ok(Some(reply)) => Response { reply: Some(reply), close: false },
            Ok(None) if ack => Response { reply: request.map(|r| encode_ack(r, true)), close: false },
            Ok(None) => Response::default(),
            Err(e) => {
                limited!(warn, "vhost-user: {name} failed: {e}");
                match request {
                    Some(r) if ack && !reply_mandatory => Response { reply: Some(encode_ack(r, false)), close: false },
                    Some(Request::GetConfig) => Response { reply: Some(encode_get_config_error()), close: false },
                    _ => Response { reply: None, close: true },
                }
            }
        };
        self.update_ready();
        response
    }

    fn vring(&mut self, index: u32) -> Result<&mut Vring, RequestError> {
        self.vrings.get_mut(index as usize).ok_or(RequestError::VringIndex(index))
    }

    /// Installs a new memory table (refused, and unmapped, if it must be sealed and is not).
    fn set_memory(&mut self, map: GuestMemoryMap) -> Result<(), RequestError> {
        let unsealed: Vec<_> = map.regions().iter().filter(|r| !r.shrink_sealed()).map(|r| r.desc()).collect();
        if let Some(&region) = unsealed.first() {
            if self.config.require_sealed_memory {
                return Err(RequestError::Memory(MemoryError::NotSealed { region }));
            }
            debug!(
                "vhost-user: {} of {} memory regions are not sealed against shrinking (F_SEAL_SHRINK)",
                unsealed.len(),
                map.len()
            );
        }
        let map = Arc::new(map);
        for v in &mut self.vrings {
            v.set_memory(&map);
        }
        self.mem = Some(map);
        Ok(())
    }

    fn apply(&mut self, msg: FrontendMessage) -> Result<Option<Vec<u8>>, RequestError> {
        use FrontendMessage as M;
        Ok(match msg {
            M::GetFeatures => Some(encode_u64_reply(Request::GetFeatures, self.config.offered_features().bits())),
            M::SetFeatures(bits) => {
                let f = VirtioFeatures::from_bits_retain(bits);
                // The core's negotiation (§2.2 subset, §5.1.3.1 dependencies), with the
                // control queue on the front-end's side as vhost-user has it.
                VirtioFeatures::negotiate_net_external_ctrl_vq(self.config.offered_features(), f)
                    .map_err(RequestError::Features)?;
                // "To start/stop logging of data/used ring writes, the front-end may send
                // messages VHOST_USER_SET_FEATURES with VHOST_F_LOG_ALL": during a migration
                // the rings run, so that bit alone may change.
                if self.vrings.iter().any(|v| v.started())
                    && !(f ^ self.acked_features).difference(VHOST_F_LOG_ALL).is_empty()
                {
                    return Err(RequestError::FeaturesWhileStarted);
                }
                self.acked_features = f;
                self.features_set = true;
                self.update_log();
                if !f.contains(VHOST_USER_F_PROTOCOL_FEATURES) {
                    // vhost-user.rst: "the back-end must enable all rings immediately".
                    for (i, v) in self.vrings.iter_mut().enumerate() {
                        if v.set_enabled(true) {
                            self.events.push(DeviceEvent::VringStateChanged { index: i as u16, enabled: true });
                        }
                    }
                }
                limited!(info, "vhost-user: features {bits:#x}");
                self.events.push(DeviceEvent::FeaturesChanged(f));
                None
            }
            M::SetOwner => None,
            M::ResetOwner => {
                // Deprecated; "recommended that back-ends … use it to disable all rings".
                for v in &mut self.vrings {
                    v.stop();
                    v.set_enabled(false);
                }
                None
            }
            M::SetMemTable { regions, fds } => {
                let map = GuestMemoryMap::from_table(&regions, fds).map_err(RequestError::Memory)?;
                debug!("vhost-user: memory table with {} regions", regions.len());
                self.set_memory(map)?;
                None
            }
            M::SetVringNum { index, num } => {
                self.vring(index)?.set_num(num).map_err(RequestError::Vring)?;
                None
            }
            M::SetVringAddr { index, flags, desc_user_addr, used_user_addr, avail_user_addr, log_guest_addr } => {
                let addrs = VringAddrs {
                    desc: desc_user_addr,
                    avail: avail_user_addr,
                    used: used_user_addr,
                    log: (flags & VRING_F_LOG != 0).then_some(log_guest_addr),
                };
                self.vring(index)?.set_addrs(addrs).map_err(RequestError::Vring)?;
                None
            }
            M::SetVringBase { index, num } => {
                self.vring(index)?.set_base(num).map_err(RequestError::Vring)?;
                None
            }
            M::GetVringBase { index } => {
                let base = self.vring(index)?.stop();
                Some(encode_vring_state_reply(Request::GetVringBase, index, base as u32))
            }
            M::SetVringKick { index, fd } => {
                let features = self.acked_features;
                let mem = self.mem.clone();
                self.vring(index as u32)?.set_kick(fd, mem.as_ref(), features).map_err(RequestError::Vring)?;
                None
            }
            M::SetVringCall { index, fd } => {
                self.vring(index as u32)?.set_call(fd);
                None
            }
            M::SetVringErr { index, fd } => {
                self.vring(index as u32)?.set_err(fd);
                None
            }
            M::GetProtocolFeatures => {
                Some(encode_u64_reply(Request::GetProtocolFeatures, self.config.protocol_features.bits()))
            }
            M::SetProtocolFeatures(bits) => {
                let f = Pf::from_bits_retain(bits);
                let extra = f.difference(self.config.protocol_features);
                if !extra.is_empty() {
                    return Err(RequestError::FeaturesNotOffered(extra));
                }
                self.acked_protocol = f;
                None
            }
            // "Query how many queues the back-end supports": virtqueues, as libvhost-user and
            // rust-vmm answer. QEMU's net client compares it with its queue pairs and DPDK
            // answers pairs; the virtqueue count satisfies both.
            M::GetQueueNum => Some(encode_u64_reply(Request::GetQueueNum, self.vrings.len() as u64)),
            M::SetVringEnable { index, enable } => {
                if self.vring(index)?.set_enabled(enable) {
                    self.events.push(DeviceEvent::VringStateChanged { index: index as u16, enabled: enable });
                }
                None
            }
            M::SendRarp(mac) if self.acked_protocol.contains(Pf::RARP) => {
                self.events.push(DeviceEvent::Announce(mac));
                None
            }
            M::NetSetMtu(mtu) => {
                if mtu > self.config.net.mtu {
                    return Err(RequestError::Mtu(mtu));
                }
                None
            }
            M::SetBackendReqFd(fd) => {
                self.backend_req = Some(fd);
                None
            }
            M::GetConfig { offset, size, flags } => {
                let space = self.config_space();
                let start = offset as usize;
                let end = start.checked_add(size as usize).ok_or(RequestError::Config)?;
                let data = space.get(start..end).ok_or(RequestError::Config)?;
                Some(encode_get_config_reply(offset, flags, data))
            }
            M::SetConfig { offset, payload: data, .. } => {
                // §5.1.4: only `mac` is ever written by a driver (legacy drivers may; a
                // front-end such as DPDK's virtio-user sets it this way). Every other field is
                // read-only.
                let start = offset as usize;
                let end = start.checked_add(data.len()).ok_or(RequestError::Config)?;
                if !NET_CONFIG_MAC.contains(&start) || end > NET_CONFIG_MAC.end || start >= end {
                    return Err(RequestError::Config);
                }
                self.config.net.mac[start..end].copy_from_slice(&data);
                limited!(info, "vhost-user: MAC set to {:02x?}", self.config.net.mac);
                None
            }
            M::ResetDevice => {
                // "disable all rings and reset all internal device state to the initial
                // state": positions too. Protocol features and the back-end channel belong to
                // the connection ("The back-end retains ownership of the device").
                let (protocol, channel) = (self.acked_protocol, self.backend_req.take());
                self.reset();
                self.acked_protocol = protocol;
                self.backend_req = channel;
                None
            }
            M::GetMaxMemSlots => Some(encode_u64_reply(Request::GetMaxMemSlots, self.config.max_mem_slots as u64)),
            M::AddMemReg { region, fd } => {
                let mut map = match &self.mem {
                    Some(m) => {
                        let mut m = (**m).clone();
                        if m.max_slots() < self.config.max_mem_slots {
                            m.set_max_slots(self.config.max_mem_slots).map_err(RequestError::Memory)?;
                        }
                        m
                    }
                    None => GuestMemoryMap::new(self.config.max_mem_slots),
                };
                map.add_region(region, fd).map_err(RequestError::Memory)?;
                self.set_memory(map)?;
                None
            }
            M::RemMemReg { region } => {
                let mut map = match &self.mem {
                    Some(m) => (**m).clone(),
                    None => return Err(RequestError::Memory(MemoryError::NoRegions)),
                };
                map.remove_region(region.guest_phys_addr, region.userspace_addr, region.memory_size)
                    .map_err(RequestError::Memory)?;
                self.set_memory(map)?;
                None
            }
            M::SetStatus(0) => {
                self.reset_status();
                None
            }
            M::SetStatus(s) => {
                let mut s = s & !STATUS_NEEDS_RESET;
                if s & STATUS_FEATURES_OK != 0 && !self.features_set {
                    s &= !STATUS_FEATURES_OK;
                }
                self.status = s | (self.status & STATUS_NEEDS_RESET);
                None
            }
            M::GetStatus => Some(encode_get_status_reply(self.status)),
            M::SetLogBase { size, offset, fd } => {
                // Only the shared-memory form exists across processes; without LOG_SHMFD the
                // front-end would not wait for the reply below.
                if !self.acked_protocol.contains(Pf::LOG_SHMFD) {
                    return Err(RequestError::NotNegotiated(Request::SetLogBase));
                }
                let log = DirtyLog::new(size, offset, fd).map_err(RequestError::Log)?;
                // The previous log is unmapped once no ring holds it (`update_log` replaces it
                // in every ring before the reply goes out).
                self.log = Some(Arc::new(log));
                self.log_fault_reported = false;
                self.update_log();
                debug!("vhost-user: dirty log of {size:#x} bytes at offset {offset:#x}");
                // "VHOST_USER_SET_LOG_BASE (if VHOST_USER_PROTOCOL_F_LOG_SHMFD)" must be
                // answered. The spec gives the reply no body; QEMU only checks the request
                // code, libvhost-user sends a u64: a REPLY_ACK-shaped 0. A failure closes the
                // connection instead (see the error policy): a status QEMU does not read would
                // have it migrate without a log.
                Some(encode_ack(Request::SetLogBase, true))
            }
            M::SetLogFd(fd) => {
                self.log_fd = Some(fd);
                None
            }
            other => return Err(RequestError::NotSupported(other.request())),
        })
    }

    /// `struct virtio_net_config` bytes (little-endian, VERSION_1).
    fn config_space(&self) -> Vec<u8> {
        let n = &self.config.net;
        let mut c = Vec::with_capacity(12);
        c.extend_from_slice(&n.mac);
        // A device whose memory was lost carries no traffic: its link reads down.
        let status = if self.status & STATUS_NEEDS_RESET != 0 { n.status & !NET_S_LINK_UP } else { n.status };
        c.extend_from_slice(&status.to_le_bytes());
        c.extend_from_slice(&self.config.queue_pairs.to_le_bytes());
        c.extend_from_slice(&n.mtu.to_le_bytes());
        c
    }

    /// Ready while at least one queue pair (both its rings) is started and enabled, whichever
    /// it is: a driver may use fewer pairs than offered (`ethtool -L eth0 combined 1` disables
    /// the others), and nothing requires pair 0 to be among them. Which pairs can receive is
    /// [`crate::net::NetDevice::rx_pairs`].
    fn update_ready(&mut self) {
        let ready = self.vrings.chunks_exact(2).any(|pair| pair.iter().all(|v| v.started() && v.enabled()));
        if ready != self.ready {
            self.ready = ready;
            self.events.push(if ready { DeviceEvent::Ready } else { DeviceEvent::NotReady });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryRegionDesc;
    use crate::message::{FLAG_NEED_REPLY, VERSION_1};
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd};

    fn memfd(name: &str, size: u64) -> OwnedFd {
        let cname = CString::new(name).unwrap();
        // SAFETY: `cname` is NUL-terminated.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `fd` is open.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) }, 0);
        fd
    }

    fn maps_of(name: &str) -> usize {
        let needle = format!("/memfd:{name} (deleted)");
        std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| l.ends_with(&needle)).count()
    }

    fn send(dev: &mut VhostUserDevice, msg: FrontendMessage, flags: u32) -> Response {
        let header = Header { request: msg.request() as u32, flags: VERSION_1 | flags, size: 0 };
        dev.handle(&header, Ok(msg))
    }

    fn ok(dev: &mut VhostUserDevice, msg: FrontendMessage) -> Option<Vec<u8>> {
        let r = send(dev, msg, 0);
        assert!(!r.close, "request refused");
        r.reply
    }

    const UADDR: u64 = 0x1000_0000;
    const FEATURES: u64 = (1 << 32) | VHOST_USER_F_PROTOCOL_FEATURES.bits();
    const LOG_ALL: u64 = VHOST_F_LOG_ALL.bits();

    fn addr(index: u32, flags: u32, log_guest_addr: u64) -> FrontendMessage {
        FrontendMessage::SetVringAddr {
            index,
            flags,
            desc_user_addr: UADDR,
            avail_user_addr: UADDR + 0x1000,
            used_user_addr: UADDR + 0x2000,
            log_guest_addr,
        }
    }

    /// A device with LOG_SHMFD + REPLY_ACK negotiated, VERSION_1 acked, memory, and ring 0
    /// started (polling) with used-ring logging at guest address 0x2000.
    fn started(mem: &str) -> VhostUserDevice {
        let mut dev = VhostUserDevice::new(DeviceConfig::net_default());
        assert!(dev.config().offered_features().contains(VHOST_F_LOG_ALL), "LOG_ALL offered");
        assert!(dev.config().protocol_features.contains(Pf::LOG_SHMFD), "LOG_SHMFD offered");
        ok(&mut dev, FrontendMessage::SetProtocolFeatures((Pf::LOG_SHMFD | Pf::REPLY_ACK).bits()));
        ok(&mut dev, FrontendMessage::SetFeatures(FEATURES));
        let region =
            MemoryRegionDesc { guest_phys_addr: 0, memory_size: 0x10000, userspace_addr: UADDR, mmap_offset: 0 };
        ok(&mut dev, FrontendMessage::SetMemTable { regions: vec![region], fds: vec![memfd(mem, 0x10000)] });
        ok(&mut dev, FrontendMessage::SetVringNum { index: 0, num: 8 });
        ok(&mut dev, addr(0, VRING_F_LOG, 0x2000));
        ok(&mut dev, FrontendMessage::SetVringKick { index: 0, fd: None });
        assert!(dev.vrings[0].started());
        dev
    }

    fn ring_log(dev: &VhostUserDevice) -> (Option<Arc<DirtyLog>>, Option<u64>) {
        let s = dev.vring_shared()[0].lock().unwrap().log.clone();
        let a = dev.vring_shared()[0].lock().unwrap().log_guest_addr;
        (s, a)
    }

    fn log_base(name: &str) -> FrontendMessage {
        FrontendMessage::SetLogBase { size: 0x1000, offset: 0, fd: memfd(name, 0x1000) }
    }

    #[test]
    fn the_rings_see_the_log_exactly_while_log_all_is_negotiated_and_a_log_is_set() {
        let (mem, log_a, log_b) = ("virtq-dev-log-mem", "virtq-dev-log-a", "virtq-dev-log-b");
        let mut dev = started(mem);
        let (l, a) = ring_log(&dev);
        assert!(l.is_none());
        assert_eq!(a, Some(0x2000));

        // SET_LOG_BASE alone: mapped and answered (u64 0), but not handed to the rings.
        let reply = ok(&mut dev, log_base(log_a)).expect("SET_LOG_BASE is answered with LOG_SHMFD");
        assert_eq!(reply, encode_ack(Request::SetLogBase, true));
        assert_eq!(maps_of(log_a), 1);
        assert!(ring_log(&dev).0.is_none() && dev.dirty_log().is_none());

        // LOG_ALL switched on while the ring runs.
        ok(&mut dev, FrontendMessage::SetFeatures(FEATURES | LOG_ALL));
        let log = ring_log(&dev).0.expect("log handed to the ring");
        assert!(Arc::ptr_eq(&log, dev.dirty_log().unwrap()));
        drop(log);
        // Any other change while started is still refused.
        let r = send(&mut dev, FrontendMessage::SetFeatures(VHOST_USER_F_PROTOCOL_FEATURES.bits() | LOG_ALL), 0);
        assert!(r.close);
        let r = send(&mut dev, FrontendMessage::SetFeatures(FEATURES | LOG_ALL | (1 << 15)), FLAG_NEED_REPLY);
        assert_eq!(r.reply, Some(encode_ack(Request::SetFeatures, false)));

        // A new log replaces the old one in every ring; the old one is unmapped.
        ok(&mut dev, log_base(log_b));
        assert_eq!((maps_of(log_a), maps_of(log_b)), (0, 1));
        assert!(Arc::ptr_eq(&ring_log(&dev).0.unwrap(), dev.dirty_log().unwrap()));

        // Used-ring logging on a started ring: the same addresses, with or without the flag.
        ok(&mut dev, addr(0, 0, 0x2000));
        assert_eq!(ring_log(&dev).1, None);
        ok(&mut dev, addr(0, VRING_F_LOG, 0x3000));
        assert_eq!(ring_log(&dev).1, Some(0x3000));
        let mut moved = addr(0, VRING_F_LOG, 0x3000);
        if let FrontendMessage::SetVringAddr { desc_user_addr, .. } = &mut moved {
            *desc_user_addr += 0x100;
        }
        assert_eq!(send(&mut dev, moved, FLAG_NEED_REPLY).reply, Some(encode_ack(Request::SetVringAddr, false)));
        let overflow = addr(0, VRING_F_LOG, u64::MAX - 0x1000);
        assert_eq!(send(&mut dev, overflow, FLAG_NEED_REPLY).reply, Some(encode_ack(Request::SetVringAddr, false)));
        assert_eq!(ring_log(&dev).1, Some(0x3000), "refused requests change nothing");
        // Without the flag, log_guest_addr is ignored, however large.
        ok(&mut dev, addr(0, 0, u64::MAX));

        // LOG_ALL off: the rings have no log; the mapping stays for the next switch-on.
        ok(&mut dev, FrontendMessage::SetFeatures(FEATURES));
        assert!(ring_log(&dev).0.is_none());
        assert_eq!(maps_of(log_b), 1);
        ok(&mut dev, FrontendMessage::SetFeatures(FEATURES | LOG_ALL));
        assert!(ring_log(&dev).0.is_some());

        // Status 0 clears the features (LOG_ALL with them) but keeps the log of the migration.
        ok(&mut dev, FrontendMessage::SetStatus(0));
        assert!(ring_log(&dev).0.is_none() && dev.dirty_log().is_none());
        assert_eq!(maps_of(log_b), 1);
        ok(&mut dev, FrontendMessage::SetFeatures(FEATURES | LOG_ALL));
        assert!(ring_log(&dev).0.is_some());

        // RESET_DEVICE forgets it.
        ok(&mut dev, FrontendMessage::ResetDevice);
        let (l, a) = ring_log(&dev);
        assert!(l.is_none() && a.is_none());
        assert_eq!(maps_of(log_b), 0);
        // So does a disconnect.
        ok(&mut dev, FrontendMessage::SetProtocolFeatures(Pf::LOG_SHMFD.bits()));
        ok(&mut dev, log_base(log_a));
        assert_eq!(maps_of(log_a), 1);
        dev.reset();
        assert_eq!((maps_of(log_a), maps_of(mem)), (0, 0));
    }

    #[test]
    fn log_all_without_a_log_runs_unlogged_and_set_log_base_needs_log_shmfd() {
        let mut dev = started("virtq-dev-nolog-mem");
        ok(&mut dev, FrontendMessage::SetFeatures(FEATURES | LOG_ALL));
        assert!(ring_log(&dev).0.is_none() && dev.dirty_log().is_none());
        assert_eq!(ok(&mut dev, FrontendMessage::GetStatus), Some(encode_get_status_reply(0)));
        assert_eq!(
            ok(&mut dev, FrontendMessage::GetFeatures),
            Some(encode_u64_reply(Request::GetFeatures, dev.config().offered_features().bits()))
        );

        // Without LOG_SHMFD: refused (acked where asked), the fd closed, nothing mapped.
        let name = "virtq-dev-nolog-log";
        ok(&mut dev, FrontendMessage::SetProtocolFeatures(Pf::REPLY_ACK.bits()));
        let r = send(&mut dev, log_base(name), FLAG_NEED_REPLY);
        assert_eq!(r.reply, Some(encode_ack(Request::SetLogBase, false)));
        assert_eq!(maps_of(name), 0);
        // With it, a refused log closes the connection (a mandatory reply carries no status).
        ok(&mut dev, FrontendMessage::SetProtocolFeatures((Pf::REPLY_ACK | Pf::LOG_SHMFD).bits()));
        let small = FrontendMessage::SetLogBase { size: 0x2000, offset: 0, fd: memfd(name, 0x1000) };
        assert_eq!(send(&mut dev, small, FLAG_NEED_REPLY), Response { reply: None, close: true });
        assert_eq!(maps_of(name), 0);
    }

    #[test]
    fn set_log_fd_is_kept_until_replaced_or_reset() {
        let mut dev = VhostUserDevice::new(DeviceConfig::net_default());
        let (a, b) = (memfd("virtq-dev-logfd", 0), memfd("virtq-dev-logfd", 0));
        let (ra, rb) = (a.as_raw_fd(), b.as_raw_fd());
        ok(&mut dev, FrontendMessage::SetLogFd(a));
        assert_eq!(dev.log_fd().map(|f| f.as_raw_fd()), Some(ra));
        ok(&mut dev, FrontendMessage::SetLogFd(b));
        assert_eq!(dev.log_fd().map(|f| f.as_raw_fd()), Some(rb));
        ok(&mut dev, FrontendMessage::SetStatus(0));
        assert!(dev.log_fd().is_some(), "status 0 keeps it");
        ok(&mut dev, FrontendMessage::ResetDevice);
        assert!(dev.log_fd().is_none());
    }
}
