//! The back-end's protocol state machine for one vhost-user connection: every front-end
//! request decoded by [`crate::message`] is applied here to the device state (features, memory
//! table, vrings, status, config space) and answered.
//!
//! The state machine is the same for every device type; what differs is its
//! [`DeviceModel`] ([`crate::model`]): the features offered and their negotiation, the
//! configuration space, the number of queues and the ready rule, device-type requests and
//! protocol features. [`crate::net::NetModel`] is virtio-net.
//!
//! No I/O happens here: [`VhostUserDevice::handle`] takes a decoded message and returns what to
//! send and whether to close, so tests and fuzzers drive it directly.
//!
//! ## Error policy
//! This section is the rule for failed requests. What happens to a device whose ring or memory
//! cannot go on ([`crate::vring::RingFault`], guest memory lost, a refused or shrunk dirty log)
//! is in the one error-policy table, the *Error policy* section of the repository's README.
//!
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
//!   eventfd ([`VhostUserDevice::log_fd`]), closing the previous one; while logging is on, the
//!   data path signals it once after each burst that marked the log ([`VringShared::log_kick`]).
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
//!   (status 0, `RESET_DEVICE`, or a new connection). The model sees it in the status it is
//!   given ([`DeviceView::status`]; virtio-net shows its link down). Where `CONFIG` and
//!   `BACKEND_REQ` are
//!   negotiated the front-end is also sent `BACKEND_CONFIG_CHANGE_MSG` ("the device MUST send
//!   a device configuration change notification to the driver").

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
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
use crate::model::{ConfigError, DeviceModel, DeviceView, Reply, ResetKind};
use crate::vring::{RingFault, Vring, VringAddrs, VringError, VringShared};

/// `VIRTIO_CONFIG_S_DRIVER_OK` in the device status byte (§2.1).
pub const STATUS_DRIVER_OK: u8 = 4;
/// `VIRTIO_CONFIG_S_FEATURES_OK` (§2.1).
pub const STATUS_FEATURES_OK: u8 = 8;
/// `VIRTIO_CONFIG_S_NEEDS_RESET` (§2.1): the device hit an error it cannot recover from.
pub const STATUS_NEEDS_RESET: u8 = 0x40;

/// A device: its model (the device type, [`crate::model`]) and the options of the protocol
/// state machine that do not depend on it.
#[derive(Clone, Debug)]
pub struct DeviceConfig<M> {
    /// The device type and its configuration, e.g. [`crate::net::NetModel`].
    pub model: M,
    /// Memory slots for `CONFIGURE_MEM_SLOTS`.
    pub max_mem_slots: usize,
    /// Refuse guest memory that the front-end could shrink: every region must be a memfd
    /// sealed with `F_SEAL_SHRINK` (QEMU's `memory-backend-memfd` seals by default). A lost
    /// region cannot happen by truncation (a hole punched in a hugetlbfs file whose pool is
    /// empty still can, and still costs only the device: [`crate::memory::fault`]).
    pub require_sealed_memory: bool,
}

impl<M> DeviceConfig<M> {
    /// `model` with the default options: [`DEFAULT_MAX_MEM_SLOTS`], unsealed memory accepted.
    pub fn new(model: M) -> DeviceConfig<M> {
        DeviceConfig { model, max_mem_slots: DEFAULT_MAX_MEM_SLOTS, require_sealed_memory: false }
    }
}

/// Something the owner of the device should know about (turned into callbacks by the
/// control loop).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceEvent<E> {
    /// `SET_FEATURES` accepted.
    FeaturesChanged(VirtioFeatures),
    /// A vring was enabled or disabled.
    VringStateChanged {
        /// Vring index.
        index: u16,
        /// New state.
        enabled: bool,
    },
    /// The model's ready rule ([`DeviceModel::is_ready`]) holds: the device can work (for
    /// virtio-net: both rings of at least one queue pair are started and enabled).
    Ready,
    /// The device stopped being ready (rings stopped, reset, or disconnect).
    NotReady,
    /// Something the device model reports ([`DeviceModel::Event`]).
    Model(E),
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
    /// `GET_CONFIG` / `SET_CONFIG` refused by the model: outside the config space, or a
    /// read-only field.
    Config(ConfigError),
    /// `NET_SET_MTU` above the MTU the device offers.
    Mtu(u16),
    /// A device-type request refused by the model for a reason of its own
    /// ([`DeviceModel::request`]).
    Device(Box<dyn std::error::Error + Send + Sync>),
    /// A kick, call, error or log fd that is not an eventfd (vhost-user.rst: these "are
    /// eventfd"). The data path writes call, error and log fds; a pipe or socket there would
    /// fill and block the thread that serves every device.
    NotEventfd(Request),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Message(e) => write!(f, "{e}"),
            RequestError::VringIndex(i) => write!(f, "vring index {i} out of range"),
            RequestError::NotEventfd(r) => write!(f, "{r}: the fd is not an eventfd"),
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
            RequestError::Config(e) => write!(f, "{e}"),
            RequestError::Mtu(m) => write!(f, "MTU {m} is above the device's"),
            RequestError::Device(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for RequestError {}

/// What to do after a request.
#[derive(Debug, Default)]
pub struct Response {
    /// Bytes to send back (a reply or REPLY_ACK), if any.
    pub reply: Option<Vec<u8>>,
    /// File descriptors to send with `reply` (SCM_RIGHTS), e.g. `GET_INFLIGHT_FD`'s buffer.
    pub fds: Vec<OwnedFd>,
    /// Close the connection (after sending `reply`).
    pub close: bool,
}

/// Equal when the same bytes go out with the same descriptors.
impl PartialEq for Response {
    fn eq(&self, other: &Response) -> bool {
        let raw = |fds: &[OwnedFd]| fds.iter().map(|f| f.as_raw_fd()).collect::<Vec<_>>();
        self.reply == other.reply && self.close == other.close && raw(&self.fds) == raw(&other.fds)
    }
}

impl Eq for Response {}

/// Protocol state of one vhost-user device whose device type is `M`.
#[derive(Debug)]
pub struct VhostUserDevice<M: DeviceModel> {
    config: DeviceConfig<M>,
    acked_features: VirtioFeatures,
    features_set: bool,
    acked_protocol: Pf,
    mem: Option<Arc<GuestMemoryMap>>,
    vrings: Vec<Vring>,
    backend_req: Option<OwnedFd>,
    status: u8,
    /// The memory fault already reported by [`check_memory`](Self::check_memory).
    memory_fault: Option<MemoryFault>,
    /// The dirty log of the last `SET_LOG_BASE` (vhost-user.rst "Migration"). Handed to the
    /// rings only while `VHOST_F_LOG_ALL` is negotiated ([`update_log`](Self::update_log)).
    log: Option<Arc<DirtyLog>>,
    /// `SET_LOG_FD`: the eventfd "to inform the front-end that the log has been modified".
    log_fd: Option<Arc<OwnedFd>>,
    /// The log's fault was reported by [`check_log`](Self::check_log).
    log_fault_reported: bool,
    /// `VHOST_F_LOG_ALL` without a log was reported (once until either changes).
    log_missing_reported: bool,
    ready: bool,
    events: Vec<DeviceEvent<M::Event>>,
}

impl<M: DeviceModel> VhostUserDevice<M> {
    /// A device in its initial state: no features, no memory, rings stopped and disabled.
    pub fn new(config: DeviceConfig<M>) -> Self {
        let n = config.model.num_queues();
        VhostUserDevice {
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
    pub fn config(&self) -> &DeviceConfig<M> {
        &self.config
    }

    /// The device model.
    pub fn model(&self) -> &M {
        &self.config.model
    }

    /// The device model, to bring its data path up to date ([`DeviceModel::sync`]).
    pub fn model_mut(&mut self) -> &mut M {
        &mut self.config.model
    }

    /// Virtio features offered on the wire (`GET_FEATURES`): the model's and
    /// `VHOST_USER_F_PROTOCOL_FEATURES`.
    pub fn offered_features(&self) -> VirtioFeatures {
        self.config.model.features() | VHOST_USER_F_PROTOCOL_FEATURES
    }

    /// Protocol features offered (`GET_PROTOCOL_FEATURES`): the model's.
    pub fn offered_protocol_features(&self) -> Pf {
        self.config.model.protocol_features()
    }

    /// Protocol features acknowledged by `SET_PROTOCOL_FEATURES`.
    pub fn acked_protocol_features(&self) -> Pf {
        self.acked_protocol
    }

    /// What the model may need to know of the state machine.
    fn view(&self) -> DeviceView {
        DeviceView { acked_features: self.acked_features, acked_protocol: self.acked_protocol, status: self.status }
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
    pub fn take_events(&mut self) -> Vec<DeviceEvent<M::Event>> {
        std::mem::take(&mut self.events)
    }

    /// Whether the model's ready rule held after the last request.
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
        self.config.model.reset(ResetKind::Full);
        self.update_log();
        self.update_ready();
    }

    /// The dirty log the data path marks, if logging is on: the one in every ring's
    /// [`VringShared::log`].
    pub fn dirty_log(&self) -> Option<&Arc<DirtyLog>> {
        self.log.as_ref().filter(|_| self.acked_features.contains(VHOST_F_LOG_ALL))
    }

    /// The eventfd of `SET_LOG_FD`, if any: the data path signals it after a burst that marked
    /// the log, to "inform the front-end that the log has been modified" (libvhost-user does
    /// the same; QEMU does not send one). Handed to the rings with the log.
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
        let kick = self.log_fd.as_ref().filter(|_| log.is_some());
        for v in &mut self.vrings {
            v.set_log(log, kick);
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
    /// gets `NEEDS_RESET` (which the model may show in its config space), and the fault is returned
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
        self.config.model.reset(ResetKind::Status);
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
        let send = |reply: Vec<u8>| Response { reply: Some(reply), ..Response::default() };
        let response = match result {
            Ok(Some(Reply { message, fds })) => Response { reply: Some(message), fds, close: false },
            Ok(None) if ack => Response { reply: request.map(|r| encode_ack(r, true)), ..Response::default() },
            Ok(None) => Response::default(),
            Err(e) => {
                limited!(warn, "vhost-user: {name} failed: {e}");
                match request {
                    Some(r) if ack && !reply_mandatory => send(encode_ack(r, false)),
                    Some(Request::GetConfig) => send(encode_get_config_error()),
                    _ => Response { close: true, ..Response::default() },
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

    /// A request the model handles ([`DeviceModel::request`]), with the events it reports.
    fn model_request(&mut self, msg: FrontendMessage) -> Result<Option<Reply>, RequestError> {
        let view = self.view();
        let mut events = Vec::new();
        let result = self.config.model.request(msg, &view, &mut events);
        self.events.extend(events.into_iter().map(DeviceEvent::Model));
        result
    }

    fn apply(&mut self, msg: FrontendMessage) -> Result<Option<Reply>, RequestError> {
        use FrontendMessage as M;
        let reply = match msg {
            M::GetFeatures => Some(encode_u64_reply(Request::GetFeatures, self.offered_features().bits())),
            M::SetFeatures(bits) => {
                let acked = VirtioFeatures::from_bits_retain(bits);
                // The device type's rules (§2.2 subset; for virtio-net the §5.1.3.1
                // dependencies), and the features the device then works with.
                let f = self.config.model.negotiate(self.offered_features(), acked).map_err(RequestError::Features)?;
                if f != acked {
                    limited!(
                        warn,
                        "vhost-user: features {bits:#x} acked; {:#x} left unused (acked without what they require)",
                        acked.difference(f).bits()
                    );
                }
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
                let features = self.acked_features;
                self.vring(index)?.set_base(num, features).map_err(RequestError::Vring)?;
                None
            }
            M::GetVringBase { index } => {
                let features = self.acked_features;
                let base = self.vring(index)?.stop_with(features);
                Some(encode_vring_state_reply(Request::GetVringBase, index, base))
            }
            M::SetVringKick { index, fd } => {
                eventfd_only(Request::SetVringKick, fd.as_ref())?;
                let features = self.acked_features;
                let mem = self.mem.clone();
                self.vring(index as u32)?.set_kick(fd, mem.as_ref(), features).map_err(RequestError::Vring)?;
                None
            }
            M::SetVringCall { index, fd } => {
                eventfd_only(Request::SetVringCall, fd.as_ref())?;
                self.vring(index as u32)?.set_call(fd);
                None
            }
            M::SetVringErr { index, fd } => {
                eventfd_only(Request::SetVringErr, fd.as_ref())?;
                self.vring(index as u32)?.set_err(fd);
                None
            }
            M::GetProtocolFeatures => {
                Some(encode_u64_reply(Request::GetProtocolFeatures, self.offered_protocol_features().bits()))
            }
            M::SetProtocolFeatures(bits) => {
                let f = Pf::from_bits_retain(bits);
                let extra = f.difference(self.offered_protocol_features());
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
            M::SetBackendReqFd(fd) => {
                self.backend_req = Some(fd);
                None
            }
            M::GetConfig { offset, size, flags } => {
                let mut data = vec![0; size as usize];
                let view = self.view();
                self.config.model.read_config(offset, &mut data, &view).map_err(RequestError::Config)?;
                Some(encode_get_config_reply(offset, flags, &data))
            }
            M::SetConfig { offset, payload, flags, .. } => {
                let view = self.view();
                self.config.model.write_config(offset, &payload, flags, &view).map_err(RequestError::Config)?;
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
                eventfd_only(Request::SetLogFd, Some(&fd))?;
                self.log_fd = Some(Arc::new(fd));
                self.update_log();
                None
            }
            // SEND_RARP, NET_SET_MTU, GET/SET_INFLIGHT_FD and whatever else the state machine
            // does not handle: the device type's, or not supported.
            other => return self.model_request(other),
        };
        Ok(reply.map(Reply::from))
    }

    /// Evaluates the model's ready rule ([`DeviceModel::is_ready`]) and reports a change.
    fn update_ready(&mut self) {
        let ready = self.config.model.is_ready(&self.vrings);
        if ready != self.ready {
            self.ready = ready;
            self.events.push(if ready { DeviceEvent::Ready } else { DeviceEvent::NotReady });
        }
    }
}

/// Refuses an fd that is not an eventfd ([`RequestError::NotEventfd`]) and makes it
/// non-blocking; `None` (polling, no interrupts) passes.
///
/// The back-end writes call, error and log fds and reads kick fds from the threads that serve
/// every device: a pipe or socket there could fill and block them, and so could an eventfd in
/// blocking mode whose counter the front-end drove to its maximum (or drained between our
/// poll and read). So the fd must be on the anonymous inode eventfds live on (found with
/// `fstat`, compared with an eventfd of our own: no `/proc` needed), and it is set
/// `O_NONBLOCK` (QEMU, DPDK and rust-vmm create theirs so already); a write that would block
/// then fails with `EAGAIN`, which means the counter is already signalled. Other files on
/// that inode (timerfd, signalfd, epoll) fail a write with `EINVAL` and never block.
fn eventfd_only(request: Request, fd: Option<&OwnedFd>) -> Result<(), RequestError> {
    let Some(fd) = fd else { return Ok(()) };
    let inode = |fd: i32| {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes a `stat` into `st` on success; any fd number may be asked.
        (unsafe { libc::fstat(fd, st.as_mut_ptr()) } == 0).then(|| {
            // SAFETY: fstat succeeded, so `st` is initialised.
            let st = unsafe { st.assume_init() };
            (st.st_dev, st.st_ino)
        })
    };
    static EVENTFD_INODE: std::sync::OnceLock<Option<(libc::dev_t, libc::ino_t)>> = std::sync::OnceLock::new();
    let ours = *EVENTFD_INODE.get_or_init(|| {
        // SAFETY: eventfd returns a fresh fd (or -1), owned at once.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        inode(fd.as_raw_fd())
    });
    if ours.is_none() || inode(fd.as_raw_fd()) != ours {
        return Err(RequestError::NotEventfd(request));
    }
    // SAFETY: F_GETFL / F_SETFL on an fd we own; they only read and set file status flags.
    let ok = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        flags >= 0
            && (flags & libc::O_NONBLOCK != 0
                || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0)
    };
    if ok {
        Ok(())
    } else {
        Err(RequestError::NotEventfd(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryRegionDesc;
    use crate::message::{FLAG_NEED_REPLY, VERSION_1};
    use crate::net::NetModel;
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

    fn send<M: DeviceModel>(dev: &mut VhostUserDevice<M>, msg: FrontendMessage, flags: u32) -> Response {
        let header = Header { request: msg.request() as u32, flags: VERSION_1 | flags, size: 0 };
        dev.handle(&header, Ok(msg))
    }

    fn ok<M: DeviceModel>(dev: &mut VhostUserDevice<M>, msg: FrontendMessage) -> Option<Vec<u8>> {
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
    fn started(mem: &str) -> VhostUserDevice<NetModel> {
        let mut dev = VhostUserDevice::new(DeviceConfig::new(NetModel::default()));
        assert!(dev.offered_features().contains(VHOST_F_LOG_ALL), "LOG_ALL offered");
        assert!(dev.offered_protocol_features().contains(Pf::LOG_SHMFD), "LOG_SHMFD offered");
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

    fn ring_log(dev: &VhostUserDevice<NetModel>) -> (Option<Arc<DirtyLog>>, Option<u64>) {
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
            Some(encode_u64_reply(Request::GetFeatures, dev.offered_features().bits()))
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
        assert_eq!(send(&mut dev, small, FLAG_NEED_REPLY), Response { close: true, ..Response::default() });
        assert_eq!(maps_of(name), 0);
    }

    #[test]
    fn set_log_fd_is_kept_until_replaced_or_reset() {
        let mut dev = VhostUserDevice::new(DeviceConfig::new(NetModel::default()));
        let efd = || {
            // SAFETY: eventfd returns a fresh fd, owned at once.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: fresh fd.
            unsafe { OwnedFd::from_raw_fd(fd) }
        };
        // Not an eventfd: refused (the data path writes it).
        let r = send(&mut dev, FrontendMessage::SetLogFd(memfd("virtq-dev-logfd", 0)), 0);
        assert!(r.close, "a failed request without NEED_REPLY closes the connection");
        assert!(dev.log_fd().is_none());
        let (a, b) = (efd(), efd());
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

    /// A device model with no net code, shaped like vhost-user-blk: one queue per vring, ready
    /// with any one ring, a config space with a read-only `capacity` and a writable
    /// `writeback`, `INFLIGHT_SHMFD` with `GET_INFLIGHT_FD` answered with an fd.
    #[derive(Debug, Default)]
    struct BlockLike {
        writeback: u8,
        inflight: Option<OwnedFd>,
    }

    /// `VIRTIO_BLK_F_FLUSH` (bit 9): the same bit as `VIRTIO_NET_F_GUEST_ECN`, which is why a
    /// device type owns its feature bits.
    const BLK_F_FLUSH: VirtioFeatures = VirtioFeatures::from_bits_retain(1 << 9);

    impl DeviceModel for BlockLike {
        type DataPath = Arc<Vec<Arc<Mutex<VringShared>>>>;
        type Event = &'static str;

        fn num_queues(&self) -> usize {
            2
        }
        fn features(&self) -> VirtioFeatures {
            VirtioFeatures::VERSION_1 | BLK_F_FLUSH
        }
        fn protocol_features(&self) -> Pf {
            Pf::MQ | Pf::REPLY_ACK | Pf::CONFIG | Pf::INFLIGHT_SHMFD
        }
        fn read_config(&self, offset: u32, buf: &mut [u8], _: &DeviceView) -> Result<(), ConfigError> {
            let mut space = [0u8; 9];
            space[..8].copy_from_slice(&0x1000u64.to_le_bytes());
            space[8] = self.writeback;
            let range = crate::model::config_range(offset, buf.len(), space.len())?;
            buf.copy_from_slice(&space[range]);
            Ok(())
        }
        fn write_config(&mut self, offset: u32, data: &[u8], _: u32, _: &DeviceView) -> Result<(), ConfigError> {
            match (offset, data) {
                (8, &[w]) => {
                    self.writeback = w;
                    Ok(())
                }
                _ => Err(ConfigError::ReadOnly { offset, len: data.len() }),
            }
        }
        fn is_ready(&self, rings: &[Vring]) -> bool {
            rings.iter().any(|v| v.started() && v.enabled())
        }
        fn request(
            &mut self,
            msg: FrontendMessage,
            _: &DeviceView,
            events: &mut Vec<&'static str>,
        ) -> Result<Option<Reply>, RequestError> {
            match msg {
                FrontendMessage::GetInflightFd(i) => {
                    let inflight = crate::message::Inflight { mmap_size: 0x1000, mmap_offset: 0, ..i };
                    let message = crate::message::encode_get_inflight_fd_reply(&inflight);
                    Ok(Some(Reply { message, fds: vec![memfd("virtq-dev-blk-inflight", 0x1000)] }))
                }
                FrontendMessage::SetInflightFd { fd, .. } => {
                    self.inflight = Some(fd);
                    events.push("inflight");
                    Ok(None)
                }
                other => Err(RequestError::NotSupported(other.request())),
            }
        }
        fn reset(&mut self, kind: ResetKind) {
            if kind == ResetKind::Full {
                *self = BlockLike::default();
            }
        }
        fn data_path(&self, _: &str, rings: Vec<Arc<Mutex<VringShared>>>) -> Self::DataPath {
            Arc::new(rings)
        }
    }

    #[test]
    fn a_device_model_without_net_code_is_served() {
        let mut dev = VhostUserDevice::new(DeviceConfig::new(BlockLike::default()));
        let rings = dev.model().data_path("blk", dev.vring_shared());
        assert_eq!(rings.len(), 2);
        let features = (VirtioFeatures::VERSION_1 | BLK_F_FLUSH | VHOST_USER_F_PROTOCOL_FEATURES).bits();
        assert_eq!(ok(&mut dev, FrontendMessage::GetFeatures), Some(encode_u64_reply(Request::GetFeatures, features)));
        assert_eq!(ok(&mut dev, FrontendMessage::GetQueueNum), Some(encode_u64_reply(Request::GetQueueNum, 2)));
        ok(&mut dev, FrontendMessage::SetProtocolFeatures((Pf::REPLY_ACK | Pf::INFLIGHT_SHMFD).bits()));

        // The default negotiation: a subset of what was offered, no net rules.
        let r = send(&mut dev, FrontendMessage::SetFeatures(features | (1 << 22)), FLAG_NEED_REPLY);
        assert_eq!(r.reply, Some(encode_ack(Request::SetFeatures, false)));
        ok(&mut dev, FrontendMessage::SetFeatures(features));
        assert_eq!(dev.acked_features(), VirtioFeatures::from_bits_retain(features));

        // The config space is the model's, writes included.
        let reply = ok(&mut dev, FrontendMessage::GetConfig { offset: 0, size: 9, flags: 0 });
        assert_eq!(reply, Some(encode_get_config_reply(0, 0, &[0, 0x10, 0, 0, 0, 0, 0, 0, 0])));
        ok(&mut dev, FrontendMessage::SetConfig { offset: 8, size: 1, flags: 0, payload: vec![1] });
        let reply = ok(&mut dev, FrontendMessage::GetConfig { offset: 8, size: 1, flags: 0 });
        assert_eq!(reply, Some(encode_get_config_reply(8, 0, &[1])));
        let r = send(
            &mut dev,
            FrontendMessage::SetConfig { offset: 0, size: 1, flags: 0, payload: vec![1] },
            FLAG_NEED_REPLY,
        );
        assert_eq!(r.reply, Some(encode_ack(Request::SetConfig, false)), "capacity is read-only");
        let r = send(&mut dev, FrontendMessage::GetConfig { offset: 8, size: 2, flags: 0 }, 0);
        assert_eq!(r.reply, Some(encode_get_config_error()), "past the end");

        // Device-type requests reach the model; a reply carries its fd.
        let inflight = crate::message::Inflight { num_queues: 2, queue_size: 8, ..Default::default() };
        let r = send(&mut dev, FrontendMessage::GetInflightFd(inflight), 0);
        assert_eq!(r.fds.len(), 1);
        assert!(!r.close && r.reply.is_some());
        let fd = r.fds.into_iter().next().unwrap();
        ok(&mut dev, FrontendMessage::SetInflightFd { inflight, fd });
        assert!(dev.model().inflight.is_some());
        assert_eq!(
            dev.take_events(),
            [DeviceEvent::FeaturesChanged(VirtioFeatures::from_bits_retain(features)), DeviceEvent::Model("inflight")]
        );
        // Net requests are not this model's.
        let r = send(&mut dev, FrontendMessage::NetSetMtu(1500), FLAG_NEED_REPLY);
        assert_eq!(r.reply, Some(encode_ack(Request::NetSetMtu, false)));

        // Its ready rule: any one ring, here ring 1 alone.
        let region =
            MemoryRegionDesc { guest_phys_addr: 0, memory_size: 0x10000, userspace_addr: UADDR, mmap_offset: 0 };
        ok(
            &mut dev,
            FrontendMessage::SetMemTable { regions: vec![region], fds: vec![memfd("virtq-dev-blk-mem", 0x10000)] },
        );
        ok(&mut dev, FrontendMessage::SetVringNum { index: 1, num: 8 });
        ok(&mut dev, addr(1, 0, 0));
        ok(&mut dev, FrontendMessage::SetVringEnable { index: 1, enable: true });
        ok(&mut dev, FrontendMessage::SetVringKick { index: 1, fd: None });
        assert!(dev.is_ready());
        assert!(dev.take_events().contains(&DeviceEvent::Ready));

        // A full reset resets the model too.
        ok(&mut dev, FrontendMessage::ResetDevice);
        assert!(!dev.is_ready() && dev.model().inflight.is_none() && dev.model().writeback == 0);
    }
}
