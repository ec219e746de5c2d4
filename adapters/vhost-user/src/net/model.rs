//! The virtio-net device model (VIRTIO 1.2 §5.1): what the protocol state machine asks of a
//! network device. Features and their §5.1.3.1 dependencies, `struct virtio_net_config`, the
//! queue pairs and their ready rule, `SEND_RARP` and `NET_SET_MTU`. The data path is
//! [`NetDevice`].

use std::sync::{Arc, Mutex};

use virtq::features::FeatureError;
use virtq::VirtioFeatures;

use super::NetDevice;
use crate::device::{RequestError, STATUS_NEEDS_RESET};
use crate::limited;
use crate::message::{FrontendMessage, ProtocolFeatures, VHOST_F_LOG_ALL};
use crate::model::{config_range, ConfigError, DeviceModel, DeviceView, Reply, ResetKind};
use crate::vring::{Vring, VringShared};

/// `VIRTIO_NET_S_LINK_UP` in the virtio-net config `status` (§5.1.4).
const NET_S_LINK_UP: u16 = 1;
/// Offset and length of `mac` in `struct virtio_net_config` (§5.1.4).
const NET_CONFIG_MAC: std::ops::Range<usize> = 0..6;
/// Bytes of `struct virtio_net_config` presented: `mac`, `status`, `max_virtqueue_pairs`,
/// `mtu` (§5.1.4; the fields after `mtu` belong to features not offered).
const NET_CONFIG_SIZE: usize = 12;

/// The virtio-net configuration space the back-end presents (`GET_CONFIG`, VIRTIO 1.2
/// §5.1.4 `struct virtio_net_config`). `max_virtqueue_pairs` is [`NetModel::queue_pairs`].
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

/// What the virtio-net model tells the device's owner
/// ([`crate::backend::DeviceHandler::event`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetEvent {
    /// `SEND_RARP` (after a live migration): announce this MAC address into the network the
    /// device is attached to ([`super::rarp_announce`]), so that switches learn the guest's
    /// new location. Only with the `RARP` protocol feature, which a device offers only if its
    /// owner does that.
    Announce([u8; 6]),
    /// The pairs the guest can receive on changed ([`NetDevice::rx_pairs`]: bit `n` for pair
    /// `n`, whose receive queue is started and enabled). Reported after any request that
    /// starts, stops, enables or disables a ring, and after a reset; the data path already
    /// uses the new set. A vring callback alone would miss rings that start after being
    /// enabled (QEMU enables them before `SET_VRING_KICK`) and rings stopped by
    /// `GET_VRING_BASE` or a reset.
    RxPairsChanged(u64),
}

/// A virtio-net device: queue pair `n` has its receive queue at index `2n` and its transmit
/// queue at `2n + 1` (§5.1.2). The control queue stays with the front-end (QEMU answers the
/// guest's control commands), as vhost-user has it.
#[derive(Clone, Debug)]
pub struct NetModel {
    /// Virtio features offered. `VIRTIO_NET_F_MQ` is added when there is more than one pair.
    pub features: VirtioFeatures,
    /// Protocol features offered: the common ones ([`crate::model::COMMON_PROTOCOL_FEATURES`])
    /// and `NET_MTU`; `RARP` only where the owner announces (see [`NetEvent::Announce`]).
    pub protocol_features: ProtocolFeatures,
    /// Queue pairs.
    pub queue_pairs: u16,
    /// Configuration space contents, as configured.
    pub config: NetConfig,
    /// The MAC the driver wrote with `SET_CONFIG`, until a full reset: the next front-end on
    /// the socket gets the configured one, not the last one's.
    written_mac: Option<[u8; 6]>,
}

impl Default for NetModel {
    /// The features a virtio-net back-end on this library supports by default, one queue
    /// pair, the default [`NetConfig`].
    ///
    /// Live migration: `VHOST_F_LOG_ALL` and `LOG_SHMFD` are offered, so that a front-end can
    /// have the device's writes logged ([`crate::memory::dirty`]); the data path marks the log
    /// it finds in [`VringShared::log`].
    ///
    /// `VIRTIO_F_RING_PACKED` (§2.8) is offered: [`NetDevice`] serves either layout (the
    /// core's one API over both, [`crate::with_ring!`]); packed rings up to
    /// [`crate::vring::MAX_PACKED_QUEUE_SIZE`] entries.
    ///
    /// `VIRTIO_F_IN_ORDER` (§2.7.8.2) is offered because [`NetDevice`] uses every buffer in the
    /// order it was made available (bad chains included: they are completed with len 0 in
    /// place). A driver that negotiates it (DPDK virtio-user) recycles its descriptors without
    /// a free list. An application that completes chains out of order through its own queue
    /// views must remove it.
    fn default() -> NetModel {
        NetModel {
            features: VirtioFeatures::VERSION_1
                | VirtioFeatures::IN_ORDER
                | VirtioFeatures::RING_PACKED
                | VirtioFeatures::RING_INDIRECT_DESC
                | VirtioFeatures::RING_EVENT_IDX
                | VirtioFeatures::NET_MRG_RXBUF
                | VirtioFeatures::NET_MAC
                | VirtioFeatures::NET_MTU
                | VirtioFeatures::NET_STATUS
                | VirtioFeatures::NOTIFY_ON_EMPTY
                | VHOST_F_LOG_ALL,
            // Each of these is honoured end to end (see the module documentation of
            // `crate::device`). `RARP` only where the owner announces.
            protocol_features: ProtocolFeatures::MQ
                | ProtocolFeatures::LOG_SHMFD
                | ProtocolFeatures::REPLY_ACK
                | ProtocolFeatures::CONFIG
                | ProtocolFeatures::STATUS
                | ProtocolFeatures::BACKEND_REQ
                | ProtocolFeatures::CONFIGURE_MEM_SLOTS
                | ProtocolFeatures::NET_MTU
                | ProtocolFeatures::RESET_DEVICE,
            queue_pairs: 1,
            config: NetConfig::default(),
            written_mac: None,
        }
    }
}

impl NetModel {
    /// The MAC the configuration space shows: the driver's, if it wrote one, else the
    /// configured one.
    pub fn mac(&self) -> [u8; 6] {
        self.written_mac.unwrap_or(self.config.mac)
    }

    /// `struct virtio_net_config` bytes (little-endian, VERSION_1).
    fn config_space(&self, device_status: u8) -> [u8; NET_CONFIG_SIZE] {
        let c = &self.config;
        // A device whose memory was lost carries no traffic: its link reads down.
        let status = if device_status & STATUS_NEEDS_RESET != 0 { c.status & !NET_S_LINK_UP } else { c.status };
        let mut space = [0u8; NET_CONFIG_SIZE];
        space[NET_CONFIG_MAC].copy_from_slice(&self.mac());
        space[6..8].copy_from_slice(&status.to_le_bytes());
        space[8..10].copy_from_slice(&self.queue_pairs.to_le_bytes());
        space[10..12].copy_from_slice(&c.mtu.to_le_bytes());
        space
    }
}

impl DeviceModel for NetModel {
    type DataPath = NetDevice;
    type Event = NetEvent;

    fn num_queues(&self) -> usize {
        usize::from(self.queue_pairs) * 2
    }

    fn features(&self) -> VirtioFeatures {
        let mut f = self.features;
        if self.queue_pairs > 1 {
            f |= VirtioFeatures::NET_MQ;
        }
        f
    }

    /// The core's negotiation (§2.2 subset, §5.1.3.1 dependencies), with the control queue on
    /// the front-end's side as vhost-user has it, after dropping offloads acked without what
    /// they require ([`VirtioFeatures::without_orphan_offloads`]: QEMU forwards them).
    fn negotiate(&self, offered: VirtioFeatures, acked: VirtioFeatures) -> Result<VirtioFeatures, FeatureError> {
        // A bit that was never offered is refused, orphan or not (§2.2).
        let extra = acked.difference(offered);
        if !extra.is_empty() {
            return Err(FeatureError::NotOffered { bits: extra.bits() });
        }
        let usable = acked.without_orphan_offloads();
        VirtioFeatures::negotiate_net_external_ctrl_vq(offered, usable)
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        self.protocol_features
    }

    fn read_config(&self, offset: u32, buf: &mut [u8], device: &DeviceView) -> Result<(), ConfigError> {
        let space = self.config_space(device.status);
        let range = config_range(offset, buf.len(), space.len())?;
        buf.copy_from_slice(&space[range]);
        Ok(())
    }

    /// §5.1.4: only `mac` is ever written by a driver (legacy drivers may; a front-end such as
    /// DPDK's virtio-user sets it this way). Every other field is read-only.
    fn write_config(&mut self, offset: u32, data: &[u8], _flags: u32, _device: &DeviceView) -> Result<(), ConfigError> {
        let read_only = ConfigError::ReadOnly { offset, len: data.len() };
        let range = config_range(offset, data.len(), NET_CONFIG_MAC.end).map_err(|_| read_only)?;
        if range.is_empty() {
            return Err(read_only);
        }
        let mut mac = self.mac();
        mac[range].copy_from_slice(data);
        self.written_mac = Some(mac);
        limited!(info, "vhost-user: MAC set to {mac:02x?}");
        Ok(())
    }

    /// Ready while at least one queue pair (both its rings) is started and enabled, whichever
    /// it is: a driver may use fewer pairs than offered (`ethtool -L eth0 combined 1` disables
    /// the others), and nothing requires pair 0 to be among them. Which pairs can receive is
    /// [`NetDevice::rx_pairs`].
    fn is_ready(&self, rings: &[Vring]) -> bool {
        rings.chunks_exact(2).any(|pair| pair.iter().all(|v| v.started() && v.enabled()))
    }

    fn request(
        &mut self,
        msg: FrontendMessage,
        device: &DeviceView,
        events: &mut Vec<NetEvent>,
    ) -> Result<Option<Reply>, RequestError> {
        match msg {
            FrontendMessage::SendRarp(mac) if device.acked_protocol.contains(ProtocolFeatures::RARP) => {
                events.push(NetEvent::Announce(mac));
                Ok(None)
            }
            FrontendMessage::NetSetMtu(mtu) if mtu > self.config.mtu => Err(RequestError::Mtu(mtu)),
            FrontendMessage::NetSetMtu(_) => Ok(None),
            other => Err(RequestError::NotSupported(other.request())),
        }
    }

    fn reset(&mut self, kind: ResetKind) {
        if kind == ResetKind::Full {
            self.written_mac = None;
        }
    }

    fn data_path(&self, name: &str, rings: Vec<Arc<Mutex<VringShared>>>) -> NetDevice {
        NetDevice::new(name, rings)
    }

    /// The data path learns which pairs can receive before any callback runs.
    fn sync(&mut self, data_path: &NetDevice) -> Option<NetEvent> {
        data_path.update_rx_pairs().map(NetEvent::RxPairsChanged)
    }
}
