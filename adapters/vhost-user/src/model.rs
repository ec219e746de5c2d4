//! Device models: what makes a vhost-user device a virtio-net, a virtio-blk, … device.
//!
//! The protocol state machine ([`crate::device::VhostUserDevice`]) is the same for every
//! device type: memory table, vrings, feature and protocol-feature negotiation, status, dirty
//! log, reply policy. What differs per device type is a [`DeviceModel`]:
//!
//! | concern | vhost-user.rst / VIRTIO 1.2 | trait item |
//! |---|---|---|
//! | virtio features offered, and which selections are valid | §2.2, device-type "Feature bits" | [`features`](DeviceModel::features), [`negotiate`](DeviceModel::negotiate) |
//! | protocol features offered beyond the common ones | "Protocol features" | [`protocol_features`](DeviceModel::protocol_features) |
//! | the configuration space | `GET_CONFIG` / `SET_CONFIG`, device-type "Device configuration layout" | [`read_config`](DeviceModel::read_config), [`write_config`](DeviceModel::write_config) |
//! | how many virtqueues, and when the device can work | `GET_QUEUE_NUM`, "Ring states" | [`num_queues`](DeviceModel::num_queues), [`is_ready`](DeviceModel::is_ready) |
//! | device-type requests (`SEND_RARP`, `NET_SET_MTU`, `GET/SET_INFLIGHT_FD`, …) | "Front-end message types" | [`request`](DeviceModel::request) |
//! | what a reset forgets | §2.1 status 0, `RESET_DEVICE` | [`reset`](DeviceModel::reset) |
//! | the data path's handle on the rings | — | [`DataPath`](DeviceModel::DataPath), [`data_path`](DeviceModel::data_path), [`sync`](DeviceModel::sync) |
//!
//! [`crate::net::NetModel`] is the virtio-net model.
//!
//! ## Design
//! rust-vmm's `VhostUserBackend` has the device own its data path: the library calls
//! `handle_event` on worker threads when a kick arrives. A polling data plane owns its threads
//! and decides when to look at a ring, so here the model only *builds* the data path's handle
//! ([`DeviceModel::DataPath`], e.g. [`crate::net::NetDevice`]) over the rings' shared state and
//! hands it to the owner, as DPDK's `rte_vhost` hands a `vid` to the application that polls
//! it. The model runs on the control thread only; whatever the data path needs from the
//! control state reaches it in [`DeviceModel::sync`], after every request.
//!
//! Like DPDK (whose ready rule differs between its built-in net device and the external
//! devices SPDK serves), the ready rule belongs to the device type.
//!
//! ## Protocol features
//! [`COMMON_PROTOCOL_FEATURES`] are honoured by the state machine for every model; a model
//! offers the subset it wants (`LOG_SHMFD` only if its data path logs every write to guest
//! memory). Any other bit a model offers must be honoured by its [`DeviceModel::request`]
//! (`RARP` → `SEND_RARP`, `NET_MTU` → `NET_SET_MTU`, `INFLIGHT_SHMFD` → `GET/SET_INFLIGHT_FD`):
//! a protocol feature is offered only where it is honoured end to end.

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use virtq::features::FeatureError;
use virtq::VirtioFeatures;

use crate::device::RequestError;
use crate::message::{FrontendMessage, ProtocolFeatures};
use crate::vring::{Vring, VringShared};

/// The protocol features the state machine honours for every device model: `MQ`
/// (`GET_QUEUE_NUM`), `LOG_SHMFD` (`SET_LOG_BASE`), `REPLY_ACK`, `CONFIG` (`GET/SET_CONFIG`,
/// answered by [`DeviceModel::read_config`] / [`DeviceModel::write_config`]), `STATUS`,
/// `BACKEND_REQ`, `CONFIGURE_MEM_SLOTS` and `RESET_DEVICE`.
pub const COMMON_PROTOCOL_FEATURES: ProtocolFeatures = ProtocolFeatures::MQ
    .union(ProtocolFeatures::LOG_SHMFD)
    .union(ProtocolFeatures::REPLY_ACK)
    .union(ProtocolFeatures::CONFIG)
    .union(ProtocolFeatures::STATUS)
    .union(ProtocolFeatures::BACKEND_REQ)
    .union(ProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(ProtocolFeatures::RESET_DEVICE);

/// A virtio device type served over vhost-user: everything the protocol state machine leaves
/// to the device type. See the [module documentation](self).
///
/// Every method runs on the control thread, between two front-end requests.
pub trait DeviceModel: Send + 'static {
    /// The data path's handle on the device: built once over the rings
    /// ([`data_path`](Self::data_path)), returned by [`crate::backend::Backend::add_device`] and
    /// passed to every [`crate::backend::DeviceHandler`] callback. It stays valid across
    /// front-end reconnects.
    type DataPath: Clone + Send + 'static;

    /// What the model tells the device's owner besides the common events (for virtio-net:
    /// announce a migrated guest, the receive pairs changed).
    type Event: fmt::Debug + Send + 'static;

    /// The number of virtqueues, fixed for the device's life (`GET_QUEUE_NUM` answers it;
    /// vring indices are checked against it).
    fn num_queues(&self) -> usize;

    /// The virtio features offered: device-type bits, the ring features the data path
    /// honours, and [`crate::message::VHOST_F_LOG_ALL`] if it logs its writes.
    /// `VHOST_USER_F_PROTOCOL_FEATURES` is added by the state machine.
    fn features(&self) -> VirtioFeatures;

    /// Accepts or refuses the front-end's `SET_FEATURES` selection `acked` (§3.1.1 step 5–6),
    /// `offered` being what `GET_FEATURES` answered, and returns the features the device works
    /// with: `acked`, or less where the model chooses not to use a bit the driver should not
    /// have acked (virtio-net: an offload without the feature it requires, which Linux acks
    /// behind QEMU's `guest_csum=off`). The default accepts any subset of what was offered
    /// (§2.2); a device type with dependency rules between its bits (virtio-net §5.1.3.1)
    /// checks them here.
    fn negotiate(&self, offered: VirtioFeatures, acked: VirtioFeatures) -> Result<VirtioFeatures, FeatureError> {
        let extra = acked.difference(offered);
        if extra.is_empty() {
            Ok(acked)
        } else {
            Err(FeatureError::NotOffered { bits: extra.bits() })
        }
    }

    /// The protocol features offered: a subset of [`COMMON_PROTOCOL_FEATURES`] plus the
    /// device-type ones this model honours in [`request`](Self::request).
    fn protocol_features(&self) -> ProtocolFeatures;

    /// `GET_CONFIG`: fills `buf` with the configuration space bytes at `offset`
    /// (little-endian, as the device-type "Device configuration layout" has them). An access
    /// outside the space is refused. `device` is the state machine's side, e.g. the status
    /// with `NEEDS_RESET` (virtio-net shows its link down then).
    fn read_config(&self, offset: u32, buf: &mut [u8], device: &DeviceView) -> Result<(), ConfigError>;

    /// `SET_CONFIG`: writes `data` at `offset`. `flags` is the message's
    /// ([`crate::message::CONFIG_FLAGS_WRITABLE`] for a driver's write,
    /// [`crate::message::CONFIG_FLAGS_MIGRATION`] during live migration). The default refuses:
    /// most of a configuration space is read-only to the driver.
    fn write_config(&mut self, offset: u32, data: &[u8], flags: u32, device: &DeviceView) -> Result<(), ConfigError> {
        let _ = (flags, device);
        Err(ConfigError::ReadOnly { offset, len: data.len() })
    }

    /// The ready rule: whether the device can do its work with its rings in these states
    /// (index = virtqueue index; [`Vring::started`], [`Vring::enabled`]). Evaluated after
    /// every request; a change becomes [`crate::device::DeviceEvent::Ready`] / `NotReady`.
    fn is_ready(&self, rings: &[Vring]) -> bool;

    /// A request the state machine leaves to the device type: `SEND_RARP`, `NET_SET_MTU`,
    /// `GET_INFLIGHT_FD`, `SET_INFLIGHT_FD`, and any other it does not handle itself. Returns
    /// the reply, if the request has one (with its fds, e.g. `GET_INFLIGHT_FD`'s buffer);
    /// `events` takes what the owner should learn ([`crate::backend::DeviceHandler::event`]).
    /// The default refuses every request as not supported.
    fn request(
        &mut self,
        msg: FrontendMessage,
        device: &DeviceView,
        events: &mut Vec<Self::Event>,
    ) -> Result<Option<Reply>, RequestError> {
        let _ = (device, events);
        Err(RequestError::NotSupported(msg.request()))
    }

    /// The device is reset: forget what the front-end set that `kind` resets.
    fn reset(&mut self, kind: ResetKind) {
        let _ = kind;
    }

    /// Builds the data path's handle over the device's rings (index = virtqueue index), once,
    /// when the device is added. `name` is the device's name for logs.
    fn data_path(&self, name: &str, rings: Vec<Arc<Mutex<VringShared>>>) -> Self::DataPath;

    /// Brings the data path up to date after a request or a reset, before the owner's
    /// callbacks run, and returns what changed for the owner, if anything (virtio-net: which
    /// pairs can receive).
    fn sync(&mut self, data_path: &Self::DataPath) -> Option<Self::Event> {
        let _ = data_path;
        None
    }
}

/// What the protocol state machine knows that a model may need to answer a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceView {
    /// Virtio features of the last accepted `SET_FEATURES` (empty before one, or after a
    /// reset).
    pub acked_features: VirtioFeatures,
    /// Protocol features of the last `SET_PROTOCOL_FEATURES`.
    pub acked_protocol: ProtocolFeatures,
    /// The device status byte (§2.1), including the device's own `NEEDS_RESET`
    /// ([`crate::device::STATUS_NEEDS_RESET`]).
    pub status: u8,
}

/// Which reset [`DeviceModel::reset`] is told about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetKind {
    /// `SET_STATUS` 0 (§2.1 "Writing 0 into this field resets the device"): the driver starts
    /// over on the same connection. Virtio-net keeps a MAC written with `SET_CONFIG`.
    Status,
    /// `RESET_DEVICE` or a disconnect: back to the initial state, as configured, so that the
    /// next front-end on the socket inherits nothing from the last one.
    Full,
}

/// A configuration space access the model refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// The access lies (partly) outside the configuration space.
    OutOfRange {
        /// Offset of the access.
        offset: u32,
        /// Length of the access.
        len: usize,
        /// Size of the configuration space.
        size: usize,
    },
    /// A write to bytes the driver may not write.
    ReadOnly {
        /// Offset of the write.
        offset: u32,
        /// Length of the write.
        len: usize,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::OutOfRange { offset, len, size } => {
                write!(f, "config access of {len} bytes at {offset:#x} outside the {size}-byte config space")
            }
            ConfigError::ReadOnly { offset, len } => write!(f, "config write of {len} bytes at {offset:#x}: read-only"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The `offset..offset + len` range of a `size`-byte configuration space, or why not: the one
/// bounds check every model's [`DeviceModel::read_config`] can use.
pub fn config_range(offset: u32, len: usize, size: usize) -> Result<std::ops::Range<usize>, ConfigError> {
    let start = offset as usize;
    match start.checked_add(len) {
        Some(end) if end <= size => Ok(start..end),
        _ => Err(ConfigError::OutOfRange { offset, len, size }),
    }
}

/// A reply to send: the encoded message ([`crate::message::encode_reply`] and friends) and
/// the file descriptors that go with it in the same `sendmsg` (`GET_INFLIGHT_FD`'s buffer).
#[derive(Debug)]
pub struct Reply {
    /// Header and payload.
    pub message: Vec<u8>,
    /// Sent as SCM_RIGHTS with the message, then closed here.
    pub fds: Vec<OwnedFd>,
}

impl From<Vec<u8>> for Reply {
    fn from(message: Vec<u8>) -> Reply {
        Reply { message, fds: Vec::new() }
    }
}
