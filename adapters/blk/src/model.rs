//! The virtio-blk device model (VIRTIO 1.2 §5.2): what the vhost-user protocol state machine
//! asks of a block device. Features (§5.2.3), `struct virtio_blk_config` (§5.2.4) with the
//! driver-writable `writeback` (§5.2.5, `VIRTIO_BLK_F_CONFIG_WCE`), the request queues and
//! their ready rule, and `GET/SET_INFLIGHT_FD` ([`crate::inflight`]). The data path is
//! [`BlkDevice`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtq::blk::config::WRITEBACK_OFFSET;
use virtq::blk::{BlkConfig, ID_BYTES};
use virtq::VirtioFeatures;
use virtq_vhost_user::device::RequestError;
use virtq_vhost_user::limited;
use virtq_vhost_user::message::{encode_get_inflight_fd_reply, FrontendMessage, ProtocolFeatures};
use virtq_vhost_user::model::{config_range, ConfigError, DeviceModel, DeviceView, Reply, ResetKind};
use virtq_vhost_user::vring::{Vring, VringShared};

use crate::device::{BlkDevice, SEG_MAX};
use crate::image::Image;
use crate::inflight::{self, InflightArea};

/// `max_write_zeroes_sectors` (§5.2.4): 16 MiB per segment. A WRITE_ZEROES request is 16
/// bytes from the guest and, where the file system cannot zero a range in its metadata
/// (`FALLOC_FL_ZERO_RANGE`), that many bytes of zeroes written by the one data-path thread
/// that serves every ring: the limit bounds what one request costs the others. 32768 sectors
/// and one segment are what QEMU's own vhost-user-blk export advertises; Linux splits larger
/// ranges (`mkfs`, `blkdiscard -z`) into requests of this size.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 32768;

/// `max_write_zeroes_seg` (§5.2.4): one segment per request.
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;

/// `max_discard_sectors` (§5.2.4): 16 MiB per segment, as write zeroes. A discard is a hole
/// punched synchronously on the same thread (on a block device, a zeroing command to the
/// device), whose cost also grows with the range.
pub const MAX_DISCARD_SECTORS: u32 = 32768;

/// `max_discard_seg` (§5.2.4): one segment per request.
pub const MAX_DISCARD_SEG: u32 = 1;

/// Segments the data path reads from one DISCARD or WRITE_ZEROES request, into a buffer of
/// this many on its stack: the larger of the two `*_seg` limits. A request with more is
/// refused (`VIRTIO_BLK_S_IOERR`; §5.2.6.1: the driver must not send more) before any is
/// acted on.
pub const MAX_SEGMENTS: usize =
    if MAX_DISCARD_SEG > MAX_WRITE_ZEROES_SEG { MAX_DISCARD_SEG as usize } else { MAX_WRITE_ZEROES_SEG as usize };

/// What the block model tells the device's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkEvent {
    /// The write cache mode the data path uses changed: `true` writeback (completed writes
    /// become stable at the next FLUSH), `false` writethrough (every write is stable when it
    /// completes). Writethrough while the driver chose it, and until the front-end has read
    /// `writeback` on this connection (see [`BlkModel`]).
    WriteCache(bool),
}

/// A virtio-blk device over an [`Image`]: `queues` request queues (§5.2.2), read-only or not.
#[derive(Debug)]
pub struct BlkModel {
    image: Arc<Image>,
    queues: u16,
    read_only: bool,
    id: [u8; ID_BYTES],
    /// `writeback` as the driver last wrote it (1 after a reset).
    writeback: u8,
    /// The front-end read or wrote `writeback` on this connection, so the driver knows the
    /// cache mode. A front-end that reconnects to a running guest does not read the
    /// configuration space again (QEMU reads it once, when the device is created) and may hold
    /// a `writeback` of 0 the driver wrote to the back-end that died: until this is set, the
    /// data path makes every write stable before completing it, which §5.2.6.2 always allows.
    /// Set from `read_config` (`&self`), hence atomic.
    writeback_seen: AtomicBool,
    /// What the data path was last told ([`DeviceModel::sync`]).
    synced_writeback: Option<bool>,
    /// The inflight area of the last `SET_INFLIGHT_FD`, until a full reset.
    inflight: Option<Arc<InflightArea>>,
}

impl BlkModel {
    /// A device serving `image` on `queues` request queues (at least 1), read-only if the
    /// image is, answering GET_ID with `id` (cut to 20 bytes, NUL-padded).
    pub fn new(image: Arc<Image>, queues: u16, id: &str) -> BlkModel {
        let mut bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let read_only = image.read_only();
        BlkModel {
            image,
            queues: queues.max(1),
            read_only,
            id: bytes,
            writeback: 1,
            writeback_seen: AtomicBool::new(false),
            synced_writeback: None,
            inflight: None,
        }
    }

    /// The image.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// Whether the device is read-only (`VIRTIO_BLK_F_RO` offered).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The configuration space (§5.2.4) with the current `writeback`.
    pub fn config(&self) -> BlkConfig {
        // A read-only device offers neither DISCARD nor WRITE_ZEROES: their fields read 0.
        let limit = |v: u32| if self.read_only { 0 } else { v };
        BlkConfig {
            capacity: self.image.capacity(),
            size_max: 0,
            seg_max: SEG_MAX,
            blk_size: 512,
            writeback: self.writeback,
            num_queues: self.queues,
            max_discard_sectors: limit(MAX_DISCARD_SECTORS),
            max_discard_seg: limit(MAX_DISCARD_SEG),
            discard_sector_alignment: 1,
            max_write_zeroes_sectors: limit(MAX_WRITE_ZEROES_SECTORS),
            max_write_zeroes_seg: limit(MAX_WRITE_ZEROES_SEG),
            // A write zeroes with UNMAP punches a hole, which reads as zeroes.
            write_zeroes_may_unmap: u8::from(!self.read_only),
        }
    }
}

impl DeviceModel for BlkModel {
    type DataPath = BlkDevice;
    type Event = BlkEvent;

    fn num_queues(&self) -> usize {
        usize::from(self.queues)
    }

    /// Every bit here is honoured by [`BlkDevice`]: indirect descriptors and EVENT_IDX by the
    /// core's queue, SEG_MAX by the chain capacity, FLUSH and CONFIG_WCE by `fdatasync`
    /// (writethrough when the driver asks for it or negotiated no FLUSH), DISCARD and
    /// WRITE_ZEROES by `fallocate`. A read-only device offers RO and neither DISCARD nor
    /// WRITE_ZEROES. No `VHOST_F_LOG_ALL`: the data path does not log its writes.
    fn features(&self) -> VirtioFeatures {
        let mut f = VirtioFeatures::VERSION_1
            | VirtioFeatures::RING_INDIRECT_DESC
            | VirtioFeatures::RING_EVENT_IDX
            | VirtioFeatures::BLK_SEG_MAX
            | VirtioFeatures::BLK_BLK_SIZE
            | VirtioFeatures::BLK_FLUSH
            | VirtioFeatures::BLK_CONFIG_WCE;
        if self.read_only {
            f |= VirtioFeatures::BLK_RO;
        } else {
            f |= VirtioFeatures::BLK_DISCARD | VirtioFeatures::BLK_WRITE_ZEROES;
        }
        if self.queues > 1 {
            f |= VirtioFeatures::BLK_MQ;
        }
        f
    }

    /// The common protocol features the state machine honours, without `LOG_SHMFD` (no dirty
    /// logging). `CONFIG` is what QEMU's vhost-user-blk needs to read the configuration space.
    /// `INFLIGHT_SHMFD`: [`request`](DeviceModel::request) answers `GET/SET_INFLIGHT_FD` and
    /// the data path records every request in the area and serves again what was in flight.
    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::MQ
            | ProtocolFeatures::INFLIGHT_SHMFD
            | ProtocolFeatures::REPLY_ACK
            | ProtocolFeatures::CONFIG
            | ProtocolFeatures::STATUS
            | ProtocolFeatures::BACKEND_REQ
            | ProtocolFeatures::CONFIGURE_MEM_SLOTS
            | ProtocolFeatures::RESET_DEVICE
    }

    fn read_config(&self, offset: u32, buf: &mut [u8], _device: &DeviceView) -> Result<(), ConfigError> {
        let space = self.config().to_bytes();
        let range = config_range(offset, buf.len(), space.len())?;
        if range.contains(&(WRITEBACK_OFFSET as usize)) {
            self.writeback_seen.store(true, Ordering::Relaxed);
        }
        buf.copy_from_slice(&space[range]);
        Ok(())
    }

    /// §5.2.5: with `VIRTIO_BLK_F_CONFIG_WCE` negotiated the driver may write `writeback`, 0
    /// (writethrough) or 1 (writeback). Every other field is read-only.
    fn write_config(&mut self, offset: u32, data: &[u8], _flags: u32, device: &DeviceView) -> Result<(), ConfigError> {
        let wce = device.acked_features.contains(VirtioFeatures::BLK_CONFIG_WCE);
        match (offset, data) {
            (WRITEBACK_OFFSET, &[mode @ (0 | 1)]) if wce => {
                self.writeback = mode;
                self.writeback_seen.store(true, Ordering::Relaxed);
                limited!(info, "virtq-blk: write cache {}", if mode == 1 { "writeback" } else { "writethrough" });
                Ok(())
            }
            _ => Err(ConfigError::ReadOnly { offset, len: data.len() }),
        }
    }

    /// Block queues are independent: the device works as soon as any one is started and
    /// enabled (a driver may use fewer queues than offered).
    fn is_ready(&self, rings: &[Vring]) -> bool {
        rings.iter().any(|v| v.started() && v.enabled())
    }

    /// `GET_INFLIGHT_FD` (a new sealed memfd area for the queues asked for) and
    /// `SET_INFLIGHT_FD` (the area mapped, after its description was checked against the
    /// device), with `INFLIGHT_SHMFD` negotiated.
    fn request(
        &mut self,
        msg: FrontendMessage,
        device: &DeviceView,
        _events: &mut Vec<BlkEvent>,
    ) -> Result<Option<Reply>, RequestError> {
        let negotiated = device.acked_protocol.contains(ProtocolFeatures::INFLIGHT_SHMFD);
        match msg {
            FrontendMessage::GetInflightFd(_) | FrontendMessage::SetInflightFd { .. } if !negotiated => {
                Err(RequestError::NotNegotiated(msg.request()))
            }
            FrontendMessage::GetInflightFd(req) => {
                let (desc, fd) =
                    inflight::create(&req, self.num_queues()).map_err(|e| RequestError::Device(e.into()))?;
                Ok(Some(Reply { message: encode_get_inflight_fd_reply(&desc), fds: vec![fd] }))
            }
            FrontendMessage::SetInflightFd { inflight, fd } => {
                let area =
                    InflightArea::map(fd, &inflight, self.num_queues()).map_err(|e| RequestError::Device(e.into()))?;
                self.inflight = Some(Arc::new(area));
                Ok(None)
            }
            other => Err(RequestError::NotSupported(other.request())),
        }
    }

    /// Both resets bring `writeback` back to its initial value (§2.1: reset returns the
    /// device to its initial state); a full one (disconnect, `RESET_DEVICE`) also forgets the
    /// inflight area (the next front-end hands its own over).
    fn reset(&mut self, kind: ResetKind) {
        self.writeback = 1;
        if kind == ResetKind::Full {
            self.inflight = None;
            self.writeback_seen.store(false, Ordering::Relaxed);
        }
    }

    fn data_path(&self, name: &str, rings: Vec<Arc<Mutex<VringShared>>>) -> BlkDevice {
        BlkDevice::new(name, rings, Arc::clone(&self.image), self.config(), self.id)
    }

    /// The data path learns the write cache mode and the inflight area before any callback
    /// runs, and rings that started are handed to it (after inflight recovery).
    fn sync(&mut self, data_path: &BlkDevice) -> Option<BlkEvent> {
        let writeback = self.writeback != 0 && self.writeback_seen.load(Ordering::Relaxed);
        data_path.set_writeback(writeback);
        data_path.set_inflight(self.inflight.clone());
        for (queue, requests) in data_path.sync_rings() {
            limited!(
                info,
                "{}: queue {queue}: {requests} request(s) in flight before the restart, served again",
                data_path.name()
            );
        }
        if self.synced_writeback.replace(writeback) == Some(writeback) {
            None
        } else {
            Some(BlkEvent::WriteCache(writeback))
        }
    }
}
