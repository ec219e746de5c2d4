//! "Front-end message types": every request's payload decoded into a [`FrontendMessage`],
//! enforcing the request table's payload size and fd rules ([`Request::spec`]) first. Fds the
//! message does not keep are closed before the decoder returns (family 13).

use std::os::fd::OwnedFd;

use super::{
    FdRule, Header, Inflight, IotlbMessage, MessageError, PayloadRule, Request, CONFIG_HEADER_SIZE, MAX_CONFIG_SIZE,
    MAX_MEM_REGIONS, MEMORY_REGION_SIZE, VRING_INDEX_MASK, VRING_INVALID_FD_FLAG,
};
use crate::memory::MemoryRegionDesc;

/// A decoded front-end request, owning the file descriptors it keeps.
///
/// Values the device must range-check are left as received: vring indices are `u32`
/// (except the 8-bit index field of `SET_VRING_KICK/CALL/ERR`), ring sizes and bases are raw.
#[derive(Debug)]
pub enum FrontendMessage {
    /// `GET_FEATURES`.
    GetFeatures,
    /// `SET_FEATURES`: virtio feature bits.
    SetFeatures(u64),
    /// `SET_OWNER`.
    SetOwner,
    /// `RESET_OWNER` (deprecated).
    ResetOwner,
    /// `SET_MEM_TABLE`: `1..=8` regions as received, and one fd per region in the same order.
    /// The memory map validates the regions ([`MemoryRegionDesc::validate`]).
    SetMemTable {
        /// The regions.
        regions: Vec<MemoryRegionDesc>,
        /// `fds[i]` backs `regions[i]`.
        fds: Vec<OwnedFd>,
    },
    /// `SET_LOG_BASE` (shared-memory form): the log starts `offset` bytes into `fd` and is
    /// `size` bytes long. `offset ≤ size` and `offset + size` fits in 64 bits (family 16).
    SetLogBase {
        /// "log size: size of area used for logging".
        size: u64,
        /// "log offset: offset from start of supplied file descriptor where logging starts".
        offset: u64,
        /// The log memory.
        fd: OwnedFd,
    },
    /// `SET_LOG_FD`: eventfd signalling log updates.
    SetLogFd(OwnedFd),
    /// `SET_VRING_NUM`: "vring state description".
    SetVringNum {
        /// Vring index, untruncated.
        index: u32,
        /// Requested ring size (device checks power of two, bounds: family 17).
        num: u32,
    },
    /// `SET_VRING_ADDR`: "vring address description" (40 bytes).
    SetVringAddr {
        /// Vring index, untruncated.
        index: u32,
        /// Flags; [`VRING_F_LOG`](super::VRING_F_LOG) is the only one defined.
        flags: u32,
        /// Descriptor table address (user address, or IOVA with `VIRTIO_F_IOMMU_PLATFORM`).
        desc_user_addr: u64,
        /// Used ring address.
        used_user_addr: u64,
        /// Available ring address.
        avail_user_addr: u64,
        /// Guest physical address used for used-ring dirty logging.
        log_guest_addr: u64,
    },
    /// `SET_VRING_BASE`: "vring descriptor index/indices".
    SetVringBase {
        /// Vring index, untruncated.
        index: u32,
        /// Split: next available index in bits 0–15 (bits 16–31 reserved; the device rejects
        /// values above 0xFFFF). Packed: the four fields of "Vring descriptor indices".
        num: u32,
    },
    /// `GET_VRING_BASE`. The request's `num` "is currently reserved and must be set to 0"; it
    /// is ignored.
    GetVringBase {
        /// Vring index, untruncated.
        index: u32,
    },
    /// `SET_VRING_KICK`: `fd` is `None` when the invalid FD flag is set (poll instead).
    SetVringKick {
        /// Vring index: bits 0–7 of the payload.
        index: u8,
        /// The kick eventfd, or `None` for polling.
        fd: Option<OwnedFd>,
    },
    /// `SET_VRING_CALL`: `fd` is `None` when the invalid FD flag is set.
    SetVringCall {
        /// Vring index: bits 0–7 of the payload.
        index: u8,
        /// The call eventfd, or `None`.
        fd: Option<OwnedFd>,
    },
    /// `SET_VRING_ERR`: `fd` is `None` when the invalid FD flag is set.
    SetVringErr {
        /// Vring index: bits 0–7 of the payload.
        index: u8,
        /// The error eventfd, or `None`.
        fd: Option<OwnedFd>,
    },
    /// `GET_PROTOCOL_FEATURES`.
    GetProtocolFeatures,
    /// `SET_PROTOCOL_FEATURES`: protocol feature bits as received (see
    /// [`ProtocolFeatures`](super::ProtocolFeatures)).
    SetProtocolFeatures(u64),
    /// `GET_QUEUE_NUM`.
    GetQueueNum,
    /// `SET_VRING_ENABLE`: the state's `num` must be 0 or 1.
    SetVringEnable {
        /// Vring index, untruncated.
        index: u32,
        /// `num == 1`.
        enable: bool,
    },
    /// `SEND_RARP`: "The first 6 bytes of the payload contain the mac address".
    SendRarp([u8; 6]),
    /// `NET_SET_MTU`: the `u64` payload, which must fit in 16 bits.
    NetSetMtu(u16),
    /// `SET_BACKEND_REQ_FD`: the back-end request socket.
    SetBackendReqFd(OwnedFd),
    /// `IOTLB_MSG`.
    IotlbMsg(IotlbMessage),
    /// `SET_VRING_ENDIAN`: "Little-endian is indicated with state.num set to 0 and big-endian
    /// is indicated with state.num set to 1. Other values are invalid."
    SetVringEndian {
        /// Vring index, untruncated.
        index: u32,
        /// `num == 1`.
        big_endian: bool,
    },
    /// `GET_CONFIG`: read `size` bytes at `offset`. The request's `size` placeholder bytes are
    /// checked for length and dropped.
    GetConfig {
        /// Offset into the device config space.
        offset: u32,
        /// Access size, `≤ 256`.
        size: u32,
        /// Flags, raw ([`CONFIG_FLAGS_WRITABLE`](super::CONFIG_FLAGS_WRITABLE),
        /// [`CONFIG_FLAGS_MIGRATION`](super::CONFIG_FLAGS_MIGRATION)).
        flags: u32,
    },
    /// `SET_CONFIG`: write `payload` at `offset`.
    SetConfig {
        /// Offset into the device config space.
        offset: u32,
        /// Access size, `== payload.len() ≤ 256`.
        size: u32,
        /// Flags, raw ([`CONFIG_FLAGS_WRITABLE`](super::CONFIG_FLAGS_WRITABLE),
        /// [`CONFIG_FLAGS_MIGRATION`](super::CONFIG_FLAGS_MIGRATION)).
        flags: u32,
        /// The bytes to write.
        payload: Vec<u8>,
    },
    /// `CLOSE_CRYPTO_SESSION`: session id.
    CloseCryptoSession(u64),
    /// `POSTCOPY_ADVISE`.
    PostcopyAdvise,
    /// `POSTCOPY_LISTEN`.
    PostcopyListen,
    /// `POSTCOPY_END`.
    PostcopyEnd,
    /// `GET_INFLIGHT_FD`: the front-end's `num_queues` and `queue_size` (sizes are zero).
    GetInflightFd(Inflight),
    /// `SET_INFLIGHT_FD`: `mmap_offset + mmap_size` fits in 64 bits.
    SetInflightFd {
        /// The description.
        inflight: Inflight,
        /// The inflight buffer.
        fd: OwnedFd,
    },
    /// `GPU_SET_SOCKET`: the vhost-user-gpu protocol socket.
    GpuSetSocket(OwnedFd),
    /// `RESET_DEVICE`.
    ResetDevice,
    /// `VRING_KICK` (in-band kick). The state's `num` is reserved and ignored.
    VringKick {
        /// Vring index, untruncated.
        index: u32,
    },
    /// `GET_MAX_MEM_SLOTS`.
    GetMaxMemSlots,
    /// `ADD_MEM_REG`: a region as received (validated by the memory map) and its fd.
    AddMemReg {
        /// The region.
        region: MemoryRegionDesc,
        /// The memory.
        fd: OwnedFd,
    },
    /// `REM_MEM_REG`: identified by guest address, user address and size ("The mmap offset is
    /// ignored"). An fd sent with it has already been closed. Not validated: it names a region
    /// the map already holds, so a size 0 or an overflowing end matches none.
    RemMemReg {
        /// The region.
        region: MemoryRegionDesc,
    },
    /// `SET_STATUS`: the virtio device status byte (the `u64` payload must fit in 8 bits).
    SetStatus(u8),
    /// `GET_STATUS`.
    GetStatus,
    /// `GET_SHARED_OBJECT`: the 16-byte UUID, as sent.
    GetSharedObject {
        /// UUID bytes (first three components big endian, per the spec).
        uuid: [u8; 16],
    },
    /// `SET_DEVICE_STATE_FD`: "Device state transfer parameters", raw.
    SetDeviceStateFd {
        /// 0 = save, 1 = load.
        direction: u32,
        /// 0 = stopped.
        phase: u32,
        /// The transfer channel.
        fd: OwnedFd,
    },
    /// `CHECK_DEVICE_STATE`.
    CheckDeviceState,
    /// `GET_SHMEM_CONFIG`.
    GetShmemConfig,
}

impl FrontendMessage {
    /// Decodes a request whose header was accepted by [`Header::parse`].
    ///
    /// `payload` must be the `header.size` bytes that followed the header and `fds` every file
    /// descriptor received with them. The vector is consumed: fds the message does not keep
    /// are closed before this returns, on success and on error alike.
    pub fn decode(header: &Header, payload: &[u8], fds: Vec<OwnedFd>) -> Result<FrontendMessage, MessageError> {
        let request = header.request()?;
        if usize::try_from(header.size).ok() != Some(payload.len()) {
            return Err(MessageError::HeaderSizeMismatch { header: header.size, payload: payload.len() });
        }
        FrontendMessage::decode_payload(request, payload, fds)
    }

    /// Decodes the payload of `request`: [`FrontendMessage::decode`] without the header.
    pub fn decode_payload(
        request: Request,
        payload: &[u8],
        mut fds: Vec<OwnedFd>,
    ) -> Result<FrontendMessage, MessageError> {
        let spec = request.spec();
        let got = payload.len();

        // 1. Payload size ("Front-end message types": request payload).
        match spec.payload {
            PayloadRule::Exact(expected) if got != expected => {
                return Err(MessageError::PayloadSize { request, expected, got });
            }
            PayloadRule::MemoryTable if got < 8 => {
                return Err(MessageError::PayloadSize { request, expected: 8, got });
            }
            PayloadRule::DeviceConfig if got < CONFIG_HEADER_SIZE => {
                return Err(MessageError::PayloadSize { request, expected: CONFIG_HEADER_SIZE, got });
            }
            PayloadRule::Unspecified => return Err(MessageError::UnsupportedRequest(request)),
            _ => {}
        }

        // 2. File descriptors (family 13). `OnePerRegion` is checked once `num_regions` is read.
        let max_fds = match spec.fds {
            FdRule::None => Some(0),
            FdRule::Exactly(n) => Some(n),
            FdRule::ZeroOrOneByInvalidFdFlag | FdRule::ZeroOrOneClosed => Some(1),
            FdRule::OnePerRegion => None,
        };
        if let Some(expected) = max_fds {
            let exact = matches!(spec.fds, FdRule::None | FdRule::Exactly(_));
            if fds.len() > expected || (exact && fds.len() != expected) {
                return Err(MessageError::FdCount { request, expected, got: fds.len() });
            }
        }

        // 3. The payload itself.
        let mut r = Reader { request, bytes: payload, pos: 0 };
        let message = match request {
            Request::GetFeatures => FrontendMessage::GetFeatures,
            Request::SetFeatures => FrontendMessage::SetFeatures(r.u64()?),
            Request::SetOwner => FrontendMessage::SetOwner,
            Request::ResetOwner => FrontendMessage::ResetOwner,
            Request::SetMemTable => decode_mem_table(&mut r, std::mem::take(&mut fds))?,
            Request::SetLogBase => {
                let size = r.u64()?;
                let offset = r.u64()?;
                // Family 16 / CVE-2020-10722: a log that starts past its own end, or whose
                // mapping length `size + offset` wraps, would map less than is written.
                if offset > size {
                    return Err(MessageError::LogOffsetBeyondSize { size, offset });
                }
                if size.checked_add(offset).is_none() {
                    return Err(MessageError::LogRangeOverflow { size, offset });
                }
                FrontendMessage::SetLogBase { size, offset, fd: take_one(request, &mut fds)? }
            }
            Request::SetLogFd => FrontendMessage::SetLogFd(take_one(request, &mut fds)?),
            Request::SetVringNum => FrontendMessage::SetVringNum { index: r.u32()?, num: r.u32()? },
            Request::SetVringAddr => FrontendMessage::SetVringAddr {
                index: r.u32()?,
                flags: r.u32()?,
                desc_user_addr: r.u64()?,
                used_user_addr: r.u64()?,
                avail_user_addr: r.u64()?,
                log_guest_addr: r.u64()?,
            },
            Request::SetVringBase => FrontendMessage::SetVringBase { index: r.u32()?, num: r.u32()? },
            Request::GetVringBase => FrontendMessage::GetVringBase { index: r.u32()? },
            Request::SetVringKick | Request::SetVringCall | Request::SetVringErr => {
                let (index, fd) = decode_vring_fd(request, r.u64()?, fds.pop())?;
                match request {
                    Request::SetVringKick => FrontendMessage::SetVringKick { index, fd },
                    Request::SetVringCall => FrontendMessage::SetVringCall { index, fd },
                    _ => FrontendMessage::SetVringErr { index, fd },
                }
            }
            Request::GetProtocolFeatures => FrontendMessage::GetProtocolFeatures,
            Request::SetProtocolFeatures => FrontendMessage::SetProtocolFeatures(r.u64()?),
            Request::GetQueueNum => FrontendMessage::GetQueueNum,
            Request::SetVringEnable => {
                let index = r.u32()?;
                let enable = bool_state(request, index, r.u32()?)?;
                FrontendMessage::SetVringEnable { index, enable }
            }
            Request::SendRarp => {
                let word = r.array::<8>()?;
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&word[..6]);
                FrontendMessage::SendRarp(mac)
            }
            Request::NetSetMtu => {
                let value = r.u64()?;
                let mtu = u16::try_from(value).map_err(|_| MessageError::InvalidMtu(value))?;
                FrontendMessage::NetSetMtu(mtu)
            }
            Request::SetBackendReqFd => FrontendMessage::SetBackendReqFd(take_one(request, &mut fds)?),
            Request::IotlbMsg => {
                let iova = r.u64()?;
                let size = r.u64()?;
                let user_addr = r.u64()?;
                let perm = r.u8()?;
                let msg_type = r.u8()?;
                FrontendMessage::IotlbMsg(IotlbMessage { iova, size, user_addr, perm, msg_type })
            }
            Request::SetVringEndian => {
                let index = r.u32()?;
                let big_endian = bool_state(request, index, r.u32()?)?;
                FrontendMessage::SetVringEndian { index, big_endian }
            }
            Request::GetConfig | Request::SetConfig => {
                let offset = r.u32()?;
                let size = r.u32()?;
                let flags = r.u32()?;
                let data = r.rest();
                if size > MAX_CONFIG_SIZE || usize::try_from(size).ok() != Some(data.len()) {
                    return Err(MessageError::ConfigSize { request, size, data: data.len() });
                }
                if offset.checked_add(size).is_none() {
                    return Err(MessageError::ConfigRangeOverflow { offset, size });
                }
                if request == Request::GetConfig {
                    FrontendMessage::GetConfig { offset, size, flags }
                } else {
                    FrontendMessage::SetConfig { offset, size, flags, payload: data.to_vec() }
                }
            }
            Request::CreateCryptoSession => return Err(MessageError::UnsupportedRequest(request)),
            Request::CloseCryptoSession => FrontendMessage::CloseCryptoSession(r.u64()?),
            Request::PostcopyAdvise => FrontendMessage::PostcopyAdvise,
            Request::PostcopyListen => FrontendMessage::PostcopyListen,
            Request::PostcopyEnd => FrontendMessage::PostcopyEnd,
            Request::GetInflightFd => FrontendMessage::GetInflightFd(r.inflight()?),
            Request::SetInflightFd => {
                let inflight = r.inflight()?;
                if inflight.mmap_offset.checked_add(inflight.mmap_size).is_none() {
                    return Err(MessageError::InflightRangeOverflow {
                        mmap_size: inflight.mmap_size,
                        mmap_offset: inflight.mmap_offset,
                    });
                }
                FrontendMessage::SetInflightFd { inflight, fd: take_one(request, &mut fds)? }
            }
            Request::GpuSetSocket => FrontendMessage::GpuSetSocket(take_one(request, &mut fds)?),
            Request::ResetDevice => FrontendMessage::ResetDevice,
            Request::VringKick => FrontendMessage::VringKick { index: r.u32()? },
            Request::GetMaxMemSlots => FrontendMessage::GetMaxMemSlots,
            Request::AddMemReg => {
                FrontendMessage::AddMemReg { region: r.single_region()?, fd: take_one(request, &mut fds)? }
            }
            // `fds` holds at most one fd here; it is closed when `fds` drops below.
            Request::RemMemReg => FrontendMessage::RemMemReg { region: r.single_region()? },
            Request::SetStatus => {
                let value = r.u64()?;
                let status = u8::try_from(value).map_err(|_| MessageError::InvalidStatus(value))?;
                FrontendMessage::SetStatus(status)
            }
            Request::GetStatus => FrontendMessage::GetStatus,
            Request::GetSharedObject => FrontendMessage::GetSharedObject { uuid: r.array::<16>()? },
            Request::SetDeviceStateFd => FrontendMessage::SetDeviceStateFd {
                direction: r.u32()?,
                phase: r.u32()?,
                fd: take_one(request, &mut fds)?,
            },
            Request::CheckDeviceState => FrontendMessage::CheckDeviceState,
            Request::GetShmemConfig => FrontendMessage::GetShmemConfig,
        };
        // Whatever is left in `fds` (only REM_MEM_REG's optional fd can be) is closed here.
        drop(fds);
        Ok(message)
    }
}

/// `SET_MEM_TABLE`: "Multiple Memory regions description" + one fd per region.
fn decode_mem_table(r: &mut Reader<'_>, fds: Vec<OwnedFd>) -> Result<FrontendMessage, MessageError> {
    let num_regions = r.u32()?;
    let _padding = r.u32()?;
    let count = usize::try_from(num_regions).ok().filter(|n| (1..=MAX_MEM_REGIONS).contains(n));
    let Some(count) = count else {
        return Err(MessageError::RegionCount { num_regions });
    };
    let expected = 8 + count * MEMORY_REGION_SIZE;
    if r.bytes.len() != expected {
        return Err(MessageError::PayloadSize { request: Request::SetMemTable, expected, got: r.bytes.len() });
    }
    if fds.len() != count {
        return Err(MessageError::FdCount { request: Request::SetMemTable, expected: count, got: fds.len() });
    }
    let mut regions = Vec::with_capacity(count);
    for _ in 0..count {
        regions.push(MemoryRegionDesc::from_bytes(&r.array::<MEMORY_REGION_SIZE>()?));
    }
    Ok(FrontendMessage::SetMemTable { regions, fds })
}

/// `SET_VRING_KICK/CALL/ERR`: bits 0–7 index, bit 8 invalid-FD flag, every other bit zero.
fn decode_vring_fd(request: Request, value: u64, fd: Option<OwnedFd>) -> Result<(u8, Option<OwnedFd>), MessageError> {
    if value & !(VRING_INDEX_MASK | VRING_INVALID_FD_FLAG) != 0 {
        return Err(MessageError::VringFdReservedBits { request, value });
    }
    let [index, ..] = value.to_le_bytes();
    let invalid_fd_flag = value & VRING_INVALID_FD_FLAG != 0;
    match (invalid_fd_flag, fd) {
        (false, Some(fd)) => Ok((index, Some(fd))),
        (true, None) => Ok((index, None)),
        // The fd (if any) drops here, closed.
        (invalid_fd_flag, fd) => Err(MessageError::VringFdMismatch { request, invalid_fd_flag, fd: fd.is_some() }),
    }
}

/// A vring state whose `num` is a boolean (`SET_VRING_ENABLE`, `SET_VRING_ENDIAN`).
fn bool_state(request: Request, index: u32, num: u32) -> Result<bool, MessageError> {
    match num {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(MessageError::InvalidVringState { request, index, num }),
    }
}

/// The single fd of an `Exactly(1)` request (the count was checked against the table).
fn take_one(request: Request, fds: &mut Vec<OwnedFd>) -> Result<OwnedFd, MessageError> {
    let got = fds.len();
    match fds.pop() {
        Some(fd) if got == 1 => Ok(fd),
        _ => Err(MessageError::FdCount { request, expected: 1, got }),
    }
}

/// Bounds-checked native-endian reads; a read past the end is [`MessageError::PayloadSize`]
/// (unreachable after the table's size check, but never a panic).
struct Reader<'a> {
    request: Request,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn array<const N: usize>(&mut self) -> Result<[u8; N], MessageError> {
        let short = MessageError::PayloadSize {
            request: self.request,
            expected: self.pos.saturating_add(N),
            got: self.bytes.len(),
        };
        let end = self.pos.checked_add(N).ok_or(short.clone())?;
        let slice = self.bytes.get(self.pos..end).ok_or(short.clone())?;
        let out = <[u8; N]>::try_from(slice).map_err(|_| short)?;
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, MessageError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, MessageError> {
        Ok(u16::from_ne_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, MessageError> {
        Ok(u32::from_ne_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, MessageError> {
        Ok(u64::from_ne_bytes(self.array()?))
    }

    fn rest(&mut self) -> &'a [u8] {
        let rest = self.bytes.get(self.pos..).unwrap_or(&[]);
        self.pos = self.bytes.len();
        rest
    }

    /// "Single memory region description": `u64` padding, then the region.
    fn single_region(&mut self) -> Result<MemoryRegionDesc, MessageError> {
        let _padding = self.u64()?;
        Ok(MemoryRegionDesc::from_bytes(&self.array::<MEMORY_REGION_SIZE>()?))
    }

    /// "Inflight description" (padding ignored).
    fn inflight(&mut self) -> Result<Inflight, MessageError> {
        let mmap_size = self.u64()?;
        let mmap_offset = self.u64()?;
        let num_queues = self.u16()?;
        let queue_size = self.u16()?;
        let _padding = self.array::<4>()?;
        Ok(Inflight { mmap_size, mmap_offset, num_queues, queue_size })
    }
}
