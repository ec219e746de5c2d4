//! The vhost-user message layer: header, request codes, the per-request table (payload size,
//! file descriptors, reply), typed payload decoding and reply encoding.
//!
//! Everything here follows QEMU's `docs/interop/vhost-user.rst` ("Message Specification",
//! "Communication", "Front-end message types"); section names are quoted in the comments.
//! A message is a 12-byte [`Header`] followed by `size` payload bytes, plus any file descriptors
//! that arrived in the same `recvmsg` (SCM_RIGHTS). "All numbers are in the machine native byte
//! order."
//!
//! ## Trust model
//! The front-end is untrusted (hostile-inputs families 12–16). Decoding is *structural*: exact
//! payload sizes, the fd count each request carries, flag bits that must be zero, and address
//! arithmetic of payloads that only this layer interprets (log, config and inflight ranges
//! must not overflow). Values whose validity depends on device state — a vring index against
//! the queue count, a `SET_VRING_NUM` size, ring addresses against the memory table — are
//! decoded **untruncated** (indices stay `u32`, CVE-2020-10723) and checked later by the device.
//! Memory regions are decoded as [`MemoryRegionDesc`] and passed on as received: their rules
//! (size 0, `gpa + size` etc. overflowing) belong to [`MemoryRegionDesc::validate`], which the
//! memory map applies to every region it is given, so they are not checked twice.
//!
//! File descriptors are owned ([`OwnedFd`]). [`FrontendMessage::decode`] consumes the
//! `Vec<OwnedFd>` received with the message: fds that the request does not keep — surplus ones,
//! fds on a request that takes none (CVE-2019-14818, CVE-2022-0669), the one `REM_MEM_REG` may
//! carry, or all of them when decoding fails — are closed when the decoder returns.
//!
//! ## Layout of a round trip
//! ```text
//! read 12 bytes ─► Header::parse ─► read header.size bytes (+ SCM_RIGHTS fds)
//!              ─► FrontendMessage::decode(&header, payload, fds) ─► device
//!              ─► Request::reply_required(header.flags, acked protocol features)
//!              ─► encode_* reply ─► write
//! ```

use std::fmt;
use std::os::fd::OwnedFd;

use crate::memory::MemoryRegionDesc;

// ---------------------------------------------------------------------------------------------
// Header ("Message Specification" → "Header")
// ---------------------------------------------------------------------------------------------

/// Size of the message header in bytes (`request`, `flags`, `size`: three `u32`).
pub const HEADER_SIZE: usize = 12;

/// Header flags bits 0–1: the protocol version.
pub const FLAG_VERSION_MASK: u32 = 0x3;
/// The only protocol version defined ("Lower 2 bits are the version (currently 0x01)").
pub const VERSION_1: u32 = 0x1;
/// Header flags bit 2: "the reply flag - needs to be sent on each reply from the back-end".
pub const FLAG_REPLY: u32 = 0x4;
/// Header flags bit 3: the `need_reply` flag (see `REPLY_ACK`).
pub const FLAG_NEED_REPLY: u32 = 0x8;
/// Every flag bit the spec defines; any other bit set is rejected as reserved.
pub const FLAGS_KNOWN: u32 = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY;

/// Memory regions a `SET_MEM_TABLE` message may carry ("Multiple Memory regions description":
/// `region0 … region7`, QEMU's `VHOST_MEMORY_BASELINE_NREGIONS`).
pub const MAX_MEM_REGIONS: usize = 8;

/// Largest number of file descriptors a conforming front-end message carries (`SET_MEM_TABLE`
/// with [`MAX_MEM_REGIONS`] regions). Size the SCM_RIGHTS buffer with room for more so that
/// excess fds are received (and closed) instead of truncated by `MSG_CTRUNC` (family 13).
pub const MAX_FDS: usize = MAX_MEM_REGIONS;

/// Size of one memory region description on the wire (four `u64`).
pub const MEMORY_REGION_SIZE: usize = 32;

/// Largest device configuration access (QEMU's `VHOST_USER_MAX_CONFIG_SIZE`).
pub const MAX_CONFIG_SIZE: u32 = 256;

/// Size of the `offset`, `size`, `flags` header of a "Virtio device config space" payload
/// (QEMU's `VHOST_USER_CONFIG_HDR_SIZE`).
pub const CONFIG_HEADER_SIZE: usize = 12;

const fn max_usize(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// Largest payload a legitimate front-end request carries, enforced by [`Header::parse`] before
/// any payload byte is read (family 12).
///
/// The two variable-size requests set it:
/// - `SET_MEM_TABLE` with 8 regions: `u32 num_regions + u32 padding + 8 × 32` = 264 bytes;
/// - `GET_CONFIG` / `SET_CONFIG` with a full config access: `12 + 256` = **268** bytes.
///
/// Every fixed-size payload is at most 40 bytes (`SET_VRING_ADDR`, `ADD_MEM_REG`). Deliberately
/// excluded, because this back-end never offers the protocol feature that enables them:
/// `CREATE_CRYPTO_SESSION` (QEMU's `VhostUserCryptoSession`, > 600 bytes, `CRYPTO_SESSION`) and
/// `SET_MEM_TABLE` with the 40-byte Xen region layout (`XEN_MMAP`, 8 + 8 × 40 = 328 bytes).
pub const MAX_PAYLOAD: u32 =
    max_usize(8 + MAX_MEM_REGIONS * MEMORY_REGION_SIZE, CONFIG_HEADER_SIZE + MAX_CONFIG_SIZE as usize) as u32;

/// The vhost-user message header: `request`, `flags`, `size` (payload length), native endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// Request code; see [`Request`]. Kept raw so that an unknown code can still be framed
    /// (its payload read and discarded) before it is rejected.
    pub request: u32,
    /// Flag bits: version (bits 0–1), [`FLAG_REPLY`], [`FLAG_NEED_REPLY`].
    pub flags: u32,
    /// Payload length in bytes.
    pub size: u32,
}

impl Header {
    /// Parses and validates a request header received from the front-end.
    ///
    /// Rejects (family 12): a version other than 1, the reply bit (a front-end sends requests,
    /// never replies), reserved flag bits (any bit outside [`FLAGS_KNOWN`]), and a payload
    /// larger than [`MAX_PAYLOAD`]. The request code is *not* checked here: call
    /// [`Header::request`] after reading (and possibly discarding) the payload.
    pub fn parse(bytes: &[u8; HEADER_SIZE]) -> Result<Header, MessageError> {
        let [r0, r1, r2, r3, f0, f1, f2, f3, s0, s1, s2, s3] = *bytes;
        let header = Header {
            request: u32::from_ne_bytes([r0, r1, r2, r3]),
            flags: u32::from_ne_bytes([f0, f1, f2, f3]),
            size: u32::from_ne_bytes([s0, s1, s2, s3]),
        };
        let version = header.flags & FLAG_VERSION_MASK;
        if version != VERSION_1 {
            return Err(MessageError::BadVersion { version });
        }
        if header.flags & FLAG_REPLY != 0 {
            return Err(MessageError::ReplyFlagOnRequest);
        }
        if header.flags & !FLAGS_KNOWN != 0 {
            return Err(MessageError::ReservedFlags { flags: header.flags });
        }
        if header.size > MAX_PAYLOAD {
            return Err(MessageError::PayloadTooLarge { size: header.size, max: MAX_PAYLOAD });
        }
        Ok(header)
    }

    /// Like [`Header::parse`] on the first [`HEADER_SIZE`] bytes of `bytes`; a shorter slice
    /// (a short read, family 12) is [`MessageError::ShortHeader`].
    pub fn from_slice(bytes: &[u8]) -> Result<Header, MessageError> {
        let head = bytes
            .get(..HEADER_SIZE)
            .and_then(|b| <&[u8; HEADER_SIZE]>::try_from(b).ok())
            .ok_or(MessageError::ShortHeader { got: bytes.len() })?;
        Header::parse(head)
    }

    /// The header for a back-end reply to `request`: version 1 with [`FLAG_REPLY`]. QEMU
    /// accepts exactly these flags on a reply (`flags == REPLY | VERSION`).
    pub const fn reply(request: Request, size: u32) -> Header {
        Header { request: request as u32, flags: VERSION_1 | FLAG_REPLY, size }
    }

    /// The wire form (native endian).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..4].copy_from_slice(&self.request.to_ne_bytes());
        out[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        out[8..12].copy_from_slice(&self.size.to_ne_bytes());
        out
    }

    /// The request code, or [`MessageError::UnknownRequest`].
    pub fn request(&self) -> Result<Request, MessageError> {
        Request::try_from(self.request)
    }

    /// Whether the front-end set [`FLAG_NEED_REPLY`]. Whether a reply is then owed also depends
    /// on `REPLY_ACK` having been negotiated: see [`Request::reply_required`].
    pub const fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }
}

// ---------------------------------------------------------------------------------------------
// Protocol features ("Protocol features")
// ---------------------------------------------------------------------------------------------

/// Virtio feature bit 30, `VHOST_USER_F_PROTOCOL_FEATURES`: the back-end supports
/// `GET/SET_PROTOCOL_FEATURES` ("Communication"). A mask, as it appears in `GET_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Virtio feature bit 26, `VHOST_F_LOG_ALL`: the front-end may ask for dirty logging
/// ("Migration"). A mask.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// `VHOST_USER_PROTOCOL_F_*` bits ("Protocol features") as `u64` masks for the value exchanged
/// by `GET_PROTOCOL_FEATURES` / `SET_PROTOCOL_FEATURES`. Each constant documents its bit number.
pub mod protocol_features {
    /// Bit 0, `MQ`: `GET_QUEUE_NUM` ("Multiple queue support").
    pub const MQ: u64 = 1 << 0;
    /// Bit 1, `LOG_SHMFD`: the dirty log is a shared-memory fd sent with `SET_LOG_BASE`.
    pub const LOG_SHMFD: u64 = 1 << 1;
    /// Bit 2, `RARP`: `SEND_RARP`.
    pub const RARP: u64 = 1 << 2;
    /// Bit 3, `REPLY_ACK`: the front-end may set `need_reply` on any request.
    pub const REPLY_ACK: u64 = 1 << 3;
    /// Bit 4, `MTU` (the message text calls it `NET_MTU`): `NET_SET_MTU`.
    pub const NET_MTU: u64 = 1 << 4;
    /// Bit 5, `BACKEND_REQ` (formerly `SLAVE_REQ`): `SET_BACKEND_REQ_FD`.
    pub const BACKEND_REQ: u64 = 1 << 5;
    /// Bit 6, `CROSS_ENDIAN`: `SET_VRING_ENDIAN`.
    pub const CROSS_ENDIAN: u64 = 1 << 6;
    /// Bit 7, `CRYPTO_SESSION`: `CREATE/CLOSE_CRYPTO_SESSION`.
    pub const CRYPTO_SESSION: u64 = 1 << 7;
    /// Bit 8, `PAGEFAULT`: postcopy migration (`POSTCOPY_*`).
    pub const PAGEFAULT: u64 = 1 << 8;
    /// Bit 9, `CONFIG`: `GET_CONFIG` / `SET_CONFIG`.
    pub const CONFIG: u64 = 1 << 9;
    /// Bit 10, `BACKEND_SEND_FD` (formerly `SLAVE_SEND_FD`): fds on back-end requests.
    pub const BACKEND_SEND_FD: u64 = 1 << 10;
    /// Bit 11, `HOST_NOTIFIER`: `BACKEND_VRING_HOST_NOTIFIER_MSG`.
    pub const HOST_NOTIFIER: u64 = 1 << 11;
    /// Bit 12, `INFLIGHT_SHMFD`: `GET_INFLIGHT_FD` / `SET_INFLIGHT_FD`.
    pub const INFLIGHT_SHMFD: u64 = 1 << 12;
    /// Bit 13, `RESET_DEVICE`: `RESET_DEVICE`.
    pub const RESET_DEVICE: u64 = 1 << 13;
    /// Bit 14, `INBAND_NOTIFICATIONS`: `VRING_KICK` and back-end `VRING_CALL/ERR` messages.
    pub const INBAND_NOTIFICATIONS: u64 = 1 << 14;
    /// Bit 15, `CONFIGURE_MEM_SLOTS`: `GET_MAX_MEM_SLOTS`, `ADD_MEM_REG`, `REM_MEM_REG`.
    pub const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
    /// Bit 16, `STATUS`: `SET_STATUS` / `GET_STATUS`.
    pub const STATUS: u64 = 1 << 16;
    /// Bit 17, `XEN_MMAP`: memory regions carry two extra `u32` fields (not supported here).
    pub const XEN_MMAP: u64 = 1 << 17;
    /// Bit 18, `SHARED_OBJECT`: `GET_SHARED_OBJECT` and the back-end shared-object messages.
    pub const SHARED_OBJECT: u64 = 1 << 18;
    /// Bit 19, `DEVICE_STATE`: `SET_DEVICE_STATE_FD` / `CHECK_DEVICE_STATE`.
    pub const DEVICE_STATE: u64 = 1 << 19;
    /// Bit 20, `SHMEM`: `GET_SHMEM_CONFIG` and back-end `SHMEM_MAP/UNMAP` (added to the spec by
    /// the 2025–2026 VIRTIO Shared Memory series; newer than QEMU 7.2).
    pub const SHMEM: u64 = 1 << 20;

    /// Every bit defined above.
    pub const ALL_KNOWN: u64 = MQ
        | LOG_SHMFD
        | RARP
        | REPLY_ACK
        | NET_MTU
        | BACKEND_REQ
        | CROSS_ENDIAN
        | CRYPTO_SESSION
        | PAGEFAULT
        | CONFIG
        | BACKEND_SEND_FD
        | HOST_NOTIFIER
        | INFLIGHT_SHMFD
        | RESET_DEVICE
        | INBAND_NOTIFICATIONS
        | CONFIGURE_MEM_SLOTS
        | STATUS
        | XEN_MMAP
        | SHARED_OBJECT
        | DEVICE_STATE
        | SHMEM;
}

// ---------------------------------------------------------------------------------------------
// Request codes ("Front-end message types")
// ---------------------------------------------------------------------------------------------

/// A front-end request code ("Front-end message types"). Names drop the `VHOST_USER_` prefix.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Request {
    /// 1 `GET_FEATURES`: reply `u64` virtio feature bits.
    GetFeatures = 1,
    /// 2 `SET_FEATURES`: `u64` negotiated virtio feature bits.
    SetFeatures = 2,
    /// 3 `SET_OWNER`: "session start".
    SetOwner = 3,
    /// 4 `RESET_OWNER`: deprecated; ignore or disable all rings.
    ResetOwner = 4,
    /// 5 `SET_MEM_TABLE`: memory regions, one fd each.
    SetMemTable = 5,
    /// 6 `SET_LOG_BASE`: dirty-log shared memory (size, offset, fd).
    SetLogBase = 6,
    /// 7 `SET_LOG_FD`: eventfd to signal log updates.
    SetLogFd = 7,
    /// 8 `SET_VRING_NUM`: ring size.
    SetVringNum = 8,
    /// 9 `SET_VRING_ADDR`: ring addresses.
    SetVringAddr = 9,
    /// 10 `SET_VRING_BASE`: next available index (split) / both indices (packed).
    SetVringBase = 10,
    /// 11 `GET_VRING_BASE`: stop the ring, reply its base.
    GetVringBase = 11,
    /// 12 `SET_VRING_KICK`: kick eventfd (or polling).
    SetVringKick = 12,
    /// 13 `SET_VRING_CALL`: call eventfd (or polling).
    SetVringCall = 13,
    /// 14 `SET_VRING_ERR`: error eventfd.
    SetVringErr = 14,
    /// 15 `GET_PROTOCOL_FEATURES`: reply `u64` protocol feature bits.
    GetProtocolFeatures = 15,
    /// 16 `SET_PROTOCOL_FEATURES`: `u64` negotiated protocol feature bits.
    SetProtocolFeatures = 16,
    /// 17 `GET_QUEUE_NUM`: reply `u64` maximum queue count.
    GetQueueNum = 17,
    /// 18 `SET_VRING_ENABLE`: enable or disable a ring.
    SetVringEnable = 18,
    /// 19 `SEND_RARP`: broadcast a fake RARP for a MAC address.
    SendRarp = 19,
    /// 20 `NET_SET_MTU`: host MTU exposed to the guest.
    NetSetMtu = 20,
    /// 21 `SET_BACKEND_REQ_FD` (formerly `SET_SLAVE_REQ_FD`): back-end request channel.
    SetBackendReqFd = 21,
    /// 22 `IOTLB_MSG`: IOTLB update / invalidate.
    IotlbMsg = 22,
    /// 23 `SET_VRING_ENDIAN`: ring endianness for legacy devices.
    SetVringEndian = 23,
    /// 24 `GET_CONFIG`: read device config space.
    GetConfig = 24,
    /// 25 `SET_CONFIG`: write device config space.
    SetConfig = 25,
    /// 26 `CREATE_CRYPTO_SESSION`.
    CreateCryptoSession = 26,
    /// 27 `CLOSE_CRYPTO_SESSION`.
    CloseCryptoSession = 27,
    /// 28 `POSTCOPY_ADVISE`.
    PostcopyAdvise = 28,
    /// 29 `POSTCOPY_LISTEN`.
    PostcopyListen = 29,
    /// 30 `POSTCOPY_END`.
    PostcopyEnd = 30,
    /// 31 `GET_INFLIGHT_FD`: back-end allocates the inflight buffer.
    GetInflightFd = 31,
    /// 32 `SET_INFLIGHT_FD`: front-end hands the inflight buffer back.
    SetInflightFd = 32,
    /// 33 `GPU_SET_SOCKET`: vhost-user-gpu protocol socket.
    GpuSetSocket = 33,
    /// 34 `RESET_DEVICE`: reset all device state.
    ResetDevice = 34,
    /// 35 `VRING_KICK`: in-band kick.
    VringKick = 35,
    /// 36 `GET_MAX_MEM_SLOTS`: reply `u64` memory slot count.
    GetMaxMemSlots = 36,
    /// 37 `ADD_MEM_REG`: add one memory region (one fd).
    AddMemReg = 37,
    /// 38 `REM_MEM_REG`: remove one memory region.
    RemMemReg = 38,
    /// 39 `SET_STATUS`: virtio device status.
    SetStatus = 39,
    /// 40 `GET_STATUS`: reply `u64` device status.
    GetStatus = 40,
    /// 41 `GET_SHARED_OBJECT`: dma-buf for a UUID.
    GetSharedObject = 41,
    /// 42 `SET_DEVICE_STATE_FD`: migration state channel.
    SetDeviceStateFd = 42,
    /// 43 `CHECK_DEVICE_STATE`: result of the state transfer.
    CheckDeviceState = 43,
    /// 44 `GET_SHMEM_CONFIG`: VIRTIO Shared Memory Regions (protocol feature `SHMEM`, newer than
    /// QEMU 7.2).
    GetShmemConfig = 44,
}

impl Request {
    /// Every request code, in code order.
    pub const ALL: [Request; 44] = [
        Request::GetFeatures,
        Request::SetFeatures,
        Request::SetOwner,
        Request::ResetOwner,
        Request::SetMemTable,
        Request::SetLogBase,
        Request::SetLogFd,
        Request::SetVringNum,
        Request::SetVringAddr,
        Request::SetVringBase,
        Request::GetVringBase,
        Request::SetVringKick,
        Request::SetVringCall,
        Request::SetVringErr,
        Request::GetProtocolFeatures,
        Request::SetProtocolFeatures,
        Request::GetQueueNum,
        Request::SetVringEnable,
        Request::SendRarp,
        Request::NetSetMtu,
        Request::SetBackendReqFd,
        Request::IotlbMsg,
        Request::SetVringEndian,
        Request::GetConfig,
        Request::SetConfig,
        Request::CreateCryptoSession,
        Request::CloseCryptoSession,
        Request::PostcopyAdvise,
        Request::PostcopyListen,
        Request::PostcopyEnd,
        Request::GetInflightFd,
        Request::SetInflightFd,
        Request::GpuSetSocket,
        Request::ResetDevice,
        Request::VringKick,
        Request::GetMaxMemSlots,
        Request::AddMemReg,
        Request::RemMemReg,
        Request::SetStatus,
        Request::GetStatus,
        Request::GetSharedObject,
        Request::SetDeviceStateFd,
        Request::CheckDeviceState,
        Request::GetShmemConfig,
    ];

    /// The spec's name without the `VHOST_USER_` prefix, e.g. `"SET_MEM_TABLE"`.
    pub const fn name(self) -> &'static str {
        match self {
            Request::GetFeatures => "GET_FEATURES",
            Request::SetFeatures => "SET_FEATURES",
            Request::SetOwner => "SET_OWNER",
            Request::ResetOwner => "RESET_OWNER",
            Request::SetMemTable => "SET_MEM_TABLE",
            Request::SetLogBase => "SET_LOG_BASE",
            Request::SetLogFd => "SET_LOG_FD",
            Request::SetVringNum => "SET_VRING_NUM",
            Request::SetVringAddr => "SET_VRING_ADDR",
            Request::SetVringBase => "SET_VRING_BASE",
            Request::GetVringBase => "GET_VRING_BASE",
            Request::SetVringKick => "SET_VRING_KICK",
            Request::SetVringCall => "SET_VRING_CALL",
            Request::SetVringErr => "SET_VRING_ERR",
            Request::GetProtocolFeatures => "GET_PROTOCOL_FEATURES",
            Request::SetProtocolFeatures => "SET_PROTOCOL_FEATURES",
            Request::GetQueueNum => "GET_QUEUE_NUM",
            Request::SetVringEnable => "SET_VRING_ENABLE",
            Request::SendRarp => "SEND_RARP",
            Request::NetSetMtu => "NET_SET_MTU",
            Request::SetBackendReqFd => "SET_BACKEND_REQ_FD",
            Request::IotlbMsg => "IOTLB_MSG",
            Request::SetVringEndian => "SET_VRING_ENDIAN",
            Request::GetConfig => "GET_CONFIG",
            Request::SetConfig => "SET_CONFIG",
            Request::CreateCryptoSession => "CREATE_CRYPTO_SESSION",
            Request::CloseCryptoSession => "CLOSE_CRYPTO_SESSION",
            Request::PostcopyAdvise => "POSTCOPY_ADVISE",
            Request::PostcopyListen => "POSTCOPY_LISTEN",
            Request::PostcopyEnd => "POSTCOPY_END",
            Request::GetInflightFd => "GET_INFLIGHT_FD",
            Request::SetInflightFd => "SET_INFLIGHT_FD",
            Request::GpuSetSocket => "GPU_SET_SOCKET",
            Request::ResetDevice => "RESET_DEVICE",
            Request::VringKick => "VRING_KICK",
            Request::GetMaxMemSlots => "GET_MAX_MEM_SLOTS",
            Request::AddMemReg => "ADD_MEM_REG",
            Request::RemMemReg => "REM_MEM_REG",
            Request::SetStatus => "SET_STATUS",
            Request::GetStatus => "GET_STATUS",
            Request::GetSharedObject => "GET_SHARED_OBJECT",
            Request::SetDeviceStateFd => "SET_DEVICE_STATE_FD",
            Request::CheckDeviceState => "CHECK_DEVICE_STATE",
            Request::GetShmemConfig => "GET_SHMEM_CONFIG",
        }
    }

    /// **The** per-request table: request payload size, file descriptors carried, and when the
    /// back-end must reply. [`FrontendMessage::decode`] enforces the first two; the connection
    /// layer uses the third through [`Request::reply_required`].
    ///
    /// Sources: "Front-end message types" (payloads, fds), "Communication" (the always-reply
    /// list and the fd list), `REPLY_ACK`, and QEMU's `hw/virtio/vhost-user.c` for the exact
    /// `hdr.size` QEMU puts on the wire.
    pub const fn spec(self) -> RequestSpec {
        use FdRule as F;
        use PayloadRule as P;
        use ReplyRule as R;
        let (payload, fds, reply) = match self {
            Request::GetFeatures => (P::Exact(0), F::None, R::Always),
            Request::SetFeatures => (P::Exact(8), F::None, R::OnNeedReply),
            Request::SetOwner => (P::Exact(0), F::None, R::OnNeedReply),
            Request::ResetOwner => (P::Exact(0), F::None, R::OnNeedReply),
            // Reply with the mapped bases only after POSTCOPY_LISTEN.
            Request::SetMemTable => (P::MemoryTable, F::OnePerRegion, R::Postcopy),
            // "VHOST_USER_SET_LOG_BASE (if VHOST_USER_PROTOCOL_F_LOG_SHMFD)" in both the reply
            // list and the fd list; without LOG_SHMFD the message is meaningless across
            // processes, so only the shared-memory form (16-byte log description + fd) decodes.
            Request::SetLogBase => (P::Exact(16), F::Exactly(1), R::IfProtocolFeature(protocol_features::LOG_SHMFD)),
            Request::SetLogFd => (P::Exact(0), F::Exactly(1), R::OnNeedReply),
            Request::SetVringNum => (P::Exact(8), F::None, R::OnNeedReply),
            Request::SetVringAddr => (P::Exact(40), F::None, R::OnNeedReply),
            Request::SetVringBase => (P::Exact(8), F::None, R::OnNeedReply),
            Request::GetVringBase => (P::Exact(8), F::None, R::Always),
            Request::SetVringKick | Request::SetVringCall | Request::SetVringErr => {
                (P::Exact(8), F::ZeroOrOneByInvalidFdFlag, R::OnNeedReply)
            }
            Request::GetProtocolFeatures => (P::Exact(0), F::None, R::Always),
            Request::SetProtocolFeatures => (P::Exact(8), F::None, R::OnNeedReply),
            Request::GetQueueNum => (P::Exact(0), F::None, R::Always),
            Request::SetVringEnable => (P::Exact(8), F::None, R::OnNeedReply),
            Request::SendRarp => (P::Exact(8), F::None, R::OnNeedReply),
            Request::NetSetMtu => (P::Exact(8), F::None, R::OnNeedReply),
            Request::SetBackendReqFd => (P::Exact(0), F::Exactly(1), R::OnNeedReply),
            // `struct vhost_iotlb_msg`: 3 × u64 + 2 × u8, padded to 32 by C alignment.
            Request::IotlbMsg => (P::Exact(32), F::None, R::Always),
            Request::SetVringEndian => (P::Exact(8), F::None, R::OnNeedReply),
            Request::GetConfig => (P::DeviceConfig, F::None, R::Always),
            Request::SetConfig => (P::DeviceConfig, F::None, R::OnNeedReply),
            Request::CreateCryptoSession => (P::Unspecified, F::None, R::Always),
            Request::CloseCryptoSession => (P::Exact(8), F::None, R::OnNeedReply),
            Request::PostcopyAdvise => (P::Exact(0), F::None, R::Always),
            Request::PostcopyListen => (P::Exact(0), F::None, R::OnNeedReply),
            Request::PostcopyEnd => (P::Exact(0), F::None, R::Always),
            // "Inflight description": 2 × u64 + 2 × u16, padded to 24 by C alignment.
            // No fd on the request (CVE-2022-0669); the reply carries one.
            Request::GetInflightFd => (P::Exact(24), F::None, R::IfProtocolFeature(protocol_features::INFLIGHT_SHMFD)),
            Request::SetInflightFd => (P::Exact(24), F::Exactly(1), R::OnNeedReply),
            Request::GpuSetSocket => (P::Exact(0), F::Exactly(1), R::OnNeedReply),
            Request::ResetDevice => (P::Exact(0), F::None, R::OnNeedReply),
            Request::VringKick => (P::Exact(8), F::None, R::OnNeedReply),
            Request::GetMaxMemSlots => (P::Exact(0), F::None, R::Always),
            // "Single memory region description": u64 padding + region.
            Request::AddMemReg => (P::Exact(40), F::Exactly(1), R::Postcopy),
            Request::RemMemReg => (P::Exact(40), F::ZeroOrOneClosed, R::OnNeedReply),
            Request::SetStatus => (P::Exact(8), F::None, R::OnNeedReply),
            Request::GetStatus => (P::Exact(0), F::None, R::Always),
            Request::GetSharedObject => (P::Exact(16), F::None, R::Always),
            Request::SetDeviceStateFd => (P::Exact(8), F::Exactly(1), R::Always),
            Request::CheckDeviceState => (P::Exact(0), F::None, R::Always),
            Request::GetShmemConfig => (P::Exact(0), F::None, R::Always),
        };
        RequestSpec { payload, fds, reply }
    }

    /// Whether the back-end must send a reply to this request.
    ///
    /// - [`ReplyRule::Always`]: yes ("Communication" list and every request with a defined
    ///   reply payload).
    /// - [`ReplyRule::IfProtocolFeature`]: yes when that feature is in `acked_protocol_features`.
    /// - Otherwise only when the front-end set [`FLAG_NEED_REPLY`] **and** `REPLY_ACK` was
    ///   negotiated ("With this protocol extension negotiated, the sender (QEMU) can set the
    ///   need_reply [Bit 3] flag to any command"). The reply is then a `u64`, 0 on success
    ///   ([`encode_ack`]); for requests that already have a reply body, `need_reply` "brings no
    ///   behavioural change" — send the body once.
    ///
    /// [`ReplyRule::Postcopy`] replies (after `POSTCOPY_LISTEN`) are not covered: this back-end
    /// does not offer `PAGEFAULT`.
    pub const fn reply_required(self, flags: u32, acked_protocol_features: u64) -> bool {
        let ack = flags & FLAG_NEED_REPLY != 0 && acked_protocol_features & protocol_features::REPLY_ACK != 0;
        match self.spec().reply {
            ReplyRule::Always => true,
            ReplyRule::IfProtocolFeature(feature) => acked_protocol_features & feature != 0 || ack,
            ReplyRule::OnNeedReply | ReplyRule::Postcopy => ack,
        }
    }
}

impl TryFrom<u32> for Request {
    type Error = MessageError;

    fn try_from(code: u32) -> Result<Request, MessageError> {
        // `ALL` is in code order starting at 1, so the code indexes it directly.
        code.checked_sub(1)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| Request::ALL.get(i).copied())
            .ok_or(MessageError::UnknownRequest(code))
    }
}

impl From<Request> for u32 {
    fn from(request: Request) -> u32 {
        request as u32
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One row of the request table: see [`Request::spec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestSpec {
    /// Size of the request payload.
    pub payload: PayloadRule,
    /// File descriptors the request carries in SCM_RIGHTS.
    pub fds: FdRule,
    /// When the back-end replies.
    pub reply: ReplyRule,
}

/// The request payload size a request must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadRule {
    /// Exactly this many bytes; shorter *or longer* is [`MessageError::PayloadSize`].
    Exact(usize),
    /// "Multiple Memory regions description": `8 + num_regions × 32` bytes.
    MemoryTable,
    /// "Virtio device config space": `12 + size` bytes, `size ≤ 256`.
    DeviceConfig,
    /// Not defined by the spec text (`CREATE_CRYPTO_SESSION`'s "crypto session description" is
    /// a QEMU-internal struct): never decoded, [`MessageError::UnsupportedRequest`].
    Unspecified,
}

/// The file descriptors a request carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdRule {
    /// None. Any fd attached is an error and is closed (CVE-2019-14818, CVE-2022-0669).
    None,
    /// Exactly this many.
    Exactly(usize),
    /// `SET_VRING_KICK/CALL/ERR`: one fd unless bit 8 (invalid FD flag) of the `u64` payload
    /// is set, in which case none.
    ZeroOrOneByInvalidFdFlag,
    /// `REM_MEM_REG`: "No file descriptors SHOULD be passed … the back-end MAY accept messages
    /// with one file descriptor. If a file descriptor is passed, the back-end MUST close it".
    /// Zero or one accepted; the one is closed by the decoder.
    ZeroOrOneClosed,
    /// `SET_MEM_TABLE`: exactly `num_regions` ("The size and ordering of the fds matches the
    /// number and ordering of memory regions").
    OnePerRegion,
}

/// When the back-end must reply to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyRule {
    /// Always: the request has a reply body.
    Always,
    /// Always when this protocol feature (a mask) is negotiated.
    IfProtocolFeature(u64),
    /// With a reply body only in postcopy mode (after `POSTCOPY_LISTEN`); otherwise as
    /// [`ReplyRule::OnNeedReply`].
    Postcopy,
    /// Only a `REPLY_ACK` `u64` status, when `need_reply` is set and `REPLY_ACK` negotiated.
    OnNeedReply,
}

// ---------------------------------------------------------------------------------------------
// Payload structures ("Payload")
// ---------------------------------------------------------------------------------------------

/// The wire form of "Memory region description" (32 bytes: `guest_phys_addr`, `memory_size`,
/// `userspace_addr`, `mmap_offset`, native byte order). The type is the memory map's own
/// ([`MemoryRegionDesc`], one type from the wire to the map); only its encoding lives here,
/// with the rest of the wire layout.
impl MemoryRegionDesc {
    /// Decodes the 32-byte wire form. No check: see [`MemoryRegionDesc::validate`].
    pub fn from_bytes(bytes: &[u8; MEMORY_REGION_SIZE]) -> MemoryRegionDesc {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(w)
        };
        MemoryRegionDesc {
            guest_phys_addr: word(0),
            memory_size: word(1),
            userspace_addr: word(2),
            mmap_offset: word(3),
        }
    }

    /// The 32-byte wire form.
    pub fn to_bytes(&self) -> [u8; MEMORY_REGION_SIZE] {
        let mut out = [0u8; MEMORY_REGION_SIZE];
        for (i, v) in [self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset].iter().enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
        }
        out
    }
}

/// "Inflight description" (`GET_INFLIGHT_FD` request and reply, `SET_INFLIGHT_FD` request).
/// 24 bytes on the wire: C alignment pads the two `u16` to 8 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Inflight {
    /// Size of the inflight tracking area.
    pub mmap_size: u64,
    /// Offset of the area from the start of the fd.
    pub mmap_offset: u64,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Size of each virtqueue.
    pub queue_size: u16,
}

impl Inflight {
    /// Size on the wire.
    pub const SIZE: usize = 24;

    /// The 24-byte wire form (padding zeroed).
    pub fn to_bytes(&self) -> [u8; Inflight::SIZE] {
        let mut out = [0u8; Inflight::SIZE];
        out[0..8].copy_from_slice(&self.mmap_size.to_ne_bytes());
        out[8..16].copy_from_slice(&self.mmap_offset.to_ne_bytes());
        out[16..18].copy_from_slice(&self.num_queues.to_ne_bytes());
        out[18..20].copy_from_slice(&self.queue_size.to_ne_bytes());
        out
    }
}

/// "An IOTLB message" (`struct vhost_iotlb_msg`), 32 bytes on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IotlbMessage {
    /// I/O virtual address programmed by the guest.
    pub iova: u64,
    /// Size of the range.
    pub size: u64,
    /// Front-end virtual address the range maps to.
    pub user_addr: u64,
    /// Permissions: [`IotlbMessage::PERM_NONE`] … [`IotlbMessage::PERM_RW`]. Kept raw.
    pub perm: u8,
    /// Message type: [`IotlbMessage::MISS`] … [`IotlbMessage::ACCESS_FAIL`]. Kept raw.
    pub msg_type: u8,
}

impl IotlbMessage {
    /// Permission: no access.
    pub const PERM_NONE: u8 = 0;
    /// Permission: read.
    pub const PERM_RO: u8 = 1;
    /// Permission: write.
    pub const PERM_WO: u8 = 2;
    /// Permission: read/write.
    pub const PERM_RW: u8 = 3;
    /// Type 1: IOTLB miss (back-end → front-end).
    pub const MISS: u8 = 1;
    /// Type 2: IOTLB update.
    pub const UPDATE: u8 = 2;
    /// Type 3: IOTLB invalidate.
    pub const INVALIDATE: u8 = 3;
    /// Type 4: access failure (back-end → front-end).
    pub const ACCESS_FAIL: u8 = 4;
}

/// Bits 0–7 of the `SET_VRING_KICK/CALL/ERR` payload: the vring index.
pub const VRING_INDEX_MASK: u64 = 0xff;
/// Bit 8 of the `SET_VRING_KICK/CALL/ERR` payload: "the invalid FD flag … set when there is no
/// file descriptor in the ancillary data".
pub const VRING_INVALID_FD_FLAG: u64 = 1 << 8;

/// `SET_VRING_ADDR` flags bit 0, `VHOST_VRING_F_LOG`: log used-ring writes ("Migration").
pub const VRING_F_LOG: u32 = 1 << 0;

/// "Virtio device config space" flags value 0: a front-end write of writable fields.
pub const CONFIG_FLAGS_WRITABLE: u32 = 0;
/// "Virtio device config space" flags value 1: a write for live migration (may touch
/// read-only fields).
pub const CONFIG_FLAGS_MIGRATION: u32 = 1;

// ---------------------------------------------------------------------------------------------
// Decoded messages
// ---------------------------------------------------------------------------------------------

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
        /// Flags; [`VRING_F_LOG`] is the only one defined.
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
    /// `SET_PROTOCOL_FEATURES`: protocol feature bits (see [`protocol_features`]).
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
        /// Flags, raw ([`CONFIG_FLAGS_WRITABLE`], [`CONFIG_FLAGS_MIGRATION`]).
        flags: u32,
    },
    /// `SET_CONFIG`: write `payload` at `offset`.
    SetConfig {
        /// Offset into the device config space.
        offset: u32,
        /// Access size, `== payload.len() ≤ 256`.
        size: u32,
        /// Flags, raw ([`CONFIG_FLAGS_WRITABLE`], [`CONFIG_FLAGS_MIGRATION`]).
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

    /// The request this message decodes.
    pub fn request(&self) -> Request {
        match self {
            FrontendMessage::GetFeatures => Request::GetFeatures,
            FrontendMessage::SetFeatures(_) => Request::SetFeatures,
            FrontendMessage::SetOwner => Request::SetOwner,
            FrontendMessage::ResetOwner => Request::ResetOwner,
            FrontendMessage::SetMemTable { .. } => Request::SetMemTable,
            FrontendMessage::SetLogBase { .. } => Request::SetLogBase,
            FrontendMessage::SetLogFd(_) => Request::SetLogFd,
            FrontendMessage::SetVringNum { .. } => Request::SetVringNum,
            FrontendMessage::SetVringAddr { .. } => Request::SetVringAddr,
            FrontendMessage::SetVringBase { .. } => Request::SetVringBase,
            FrontendMessage::GetVringBase { .. } => Request::GetVringBase,
            FrontendMessage::SetVringKick { .. } => Request::SetVringKick,
            FrontendMessage::SetVringCall { .. } => Request::SetVringCall,
            FrontendMessage::SetVringErr { .. } => Request::SetVringErr,
            FrontendMessage::GetProtocolFeatures => Request::GetProtocolFeatures,
            FrontendMessage::SetProtocolFeatures(_) => Request::SetProtocolFeatures,
            FrontendMessage::GetQueueNum => Request::GetQueueNum,
            FrontendMessage::SetVringEnable { .. } => Request::SetVringEnable,
            FrontendMessage::SendRarp(_) => Request::SendRarp,
            FrontendMessage::NetSetMtu(_) => Request::NetSetMtu,
            FrontendMessage::SetBackendReqFd(_) => Request::SetBackendReqFd,
            FrontendMessage::IotlbMsg(_) => Request::IotlbMsg,
            FrontendMessage::SetVringEndian { .. } => Request::SetVringEndian,
            FrontendMessage::GetConfig { .. } => Request::GetConfig,
            FrontendMessage::SetConfig { .. } => Request::SetConfig,
            FrontendMessage::CloseCryptoSession(_) => Request::CloseCryptoSession,
            FrontendMessage::PostcopyAdvise => Request::PostcopyAdvise,
            FrontendMessage::PostcopyListen => Request::PostcopyListen,
            FrontendMessage::PostcopyEnd => Request::PostcopyEnd,
            FrontendMessage::GetInflightFd(_) => Request::GetInflightFd,
            FrontendMessage::SetInflightFd { .. } => Request::SetInflightFd,
            FrontendMessage::GpuSetSocket(_) => Request::GpuSetSocket,
            FrontendMessage::ResetDevice => Request::ResetDevice,
            FrontendMessage::VringKick { .. } => Request::VringKick,
            FrontendMessage::GetMaxMemSlots => Request::GetMaxMemSlots,
            FrontendMessage::AddMemReg { .. } => Request::AddMemReg,
            FrontendMessage::RemMemReg { .. } => Request::RemMemReg,
            FrontendMessage::SetStatus(_) => Request::SetStatus,
            FrontendMessage::GetStatus => Request::GetStatus,
            FrontendMessage::GetSharedObject { .. } => Request::GetSharedObject,
            FrontendMessage::SetDeviceStateFd { .. } => Request::SetDeviceStateFd,
            FrontendMessage::CheckDeviceState => Request::CheckDeviceState,
            FrontendMessage::GetShmemConfig => Request::GetShmemConfig,
        }
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

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

/// A complete reply message: [`Header::reply`] (version 1 | [`FLAG_REPLY`], `size`) followed by
/// `payload`. A payload longer than `u32::MAX` bytes (never produced by this crate) is cut to
/// `u32::MAX` bytes so that the header always matches what is sent.
pub fn encode_reply(request: Request, payload: &[u8]) -> Vec<u8> {
    let size = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let payload = payload.get(..size as usize).unwrap_or(payload);
    let mut out = Vec::with_capacity(HEADER_SIZE + payload.len());
    out.extend_from_slice(&Header::reply(request, size).to_bytes());
    out.extend_from_slice(payload);
    out
}

/// A `u64` reply: `GET_FEATURES`, `GET_PROTOCOL_FEATURES`, `GET_QUEUE_NUM`,
/// `GET_MAX_MEM_SLOTS`, `POSTCOPY_END`, `CHECK_DEVICE_STATE`, `SET_DEVICE_STATE_FD` (bits 0–7
/// status, bit 8 invalid FD), and `REPLY_ACK` statuses (see [`encode_ack`]).
pub fn encode_u64_reply(request: Request, value: u64) -> Vec<u8> {
    encode_reply(request, &value.to_ne_bytes())
}

/// A `REPLY_ACK` reply ("The payload should be set to zero on success or non-zero on
/// failure"): `u64` 0 on success, 1 on failure. Also the reply to `IOTLB_MSG` and, by this
/// crate's convention, to `SET_LOG_BASE` (whose reply body the spec leaves undefined).
pub fn encode_ack(request: Request, success: bool) -> Vec<u8> {
    encode_u64_reply(request, u64::from(!success))
}

/// A "vring state description" reply `{index, num}`: `GET_VRING_BASE`.
pub fn encode_vring_state_reply(request: Request, index: u32, num: u32) -> Vec<u8> {
    let mut payload = [0u8; 8];
    payload[..4].copy_from_slice(&index.to_ne_bytes());
    payload[4..].copy_from_slice(&num.to_ne_bytes());
    encode_reply(request, &payload)
}

/// A successful `GET_CONFIG` reply: the request's `offset` and `flags`, `size = data.len()`,
/// then `data`. The spec requires "payload size MUST match the front-end's request": pass
/// exactly the requested number of bytes. `data` longer than [`MAX_CONFIG_SIZE`] yields the
/// error reply instead ([`encode_get_config_error`]).
pub fn encode_get_config_reply(offset: u32, flags: u32, data: &[u8]) -> Vec<u8> {
    let size = match u32::try_from(data.len()) {
        Ok(size) if size <= MAX_CONFIG_SIZE => size,
        _ => return encode_get_config_error(),
    };
    let mut payload = Vec::with_capacity(CONFIG_HEADER_SIZE + data.len());
    payload.extend_from_slice(&offset.to_ne_bytes());
    payload.extend_from_slice(&size.to_ne_bytes());
    payload.extend_from_slice(&flags.to_ne_bytes());
    payload.extend_from_slice(data);
    encode_reply(Request::GetConfig, &payload)
}

/// A failed `GET_CONFIG` reply: "vhost-user back-end uses zero length of payload to indicate an
/// error" — a header with `size = 0` and no payload (what libvhost-user and DPDK send).
pub fn encode_get_config_error() -> Vec<u8> {
    encode_reply(Request::GetConfig, &[])
}

/// `GET_STATUS` reply: the device status byte as a `u64`.
pub fn encode_get_status_reply(status: u8) -> Vec<u8> {
    encode_u64_reply(Request::GetStatus, u64::from(status))
}

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (id 2; "Back-end message types"), sent by the back-end
/// on the channel of `SET_BACKEND_REQ_FD`: the device's configuration space changed, and the
/// front-end may re-read it with `GET_CONFIG`. Only with `CONFIG` and `BACKEND_REQ` negotiated.
pub const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;

/// A back-end request without payload and without `NEED_REPLY` (so that the back-end never
/// waits for the front-end): version 1, `size` 0.
pub fn encode_backend_request(request: u32) -> Vec<u8> {
    Header { request, flags: VERSION_1, size: 0 }.to_bytes().to_vec()
}

/// `GET_INFLIGHT_FD` reply: the inflight description (24 bytes); the buffer's fd goes in the
/// ancillary data of the same `sendmsg`.
pub fn encode_get_inflight_fd_reply(inflight: &Inflight) -> Vec<u8> {
    encode_reply(Request::GetInflightFd, &inflight.to_bytes())
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a front-end message was rejected. No variant holds an fd: every fd of a rejected message
/// has been closed by the time the error is returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageError {
    /// Fewer than [`HEADER_SIZE`] bytes (short read, family 12).
    ShortHeader {
        /// Bytes available.
        got: usize,
    },
    /// Header version is not 1.
    BadVersion {
        /// The version bits.
        version: u32,
    },
    /// The reply flag is set on a message from the front-end.
    ReplyFlagOnRequest,
    /// Flag bits outside [`FLAGS_KNOWN`] are set.
    ReservedFlags {
        /// The whole flags word.
        flags: u32,
    },
    /// Header `size` exceeds [`MAX_PAYLOAD`].
    PayloadTooLarge {
        /// Header `size`.
        size: u32,
        /// The limit.
        max: u32,
    },
    /// Unknown request code.
    UnknownRequest(u32),
    /// A request that this crate never decodes (`CREATE_CRYPTO_SESSION`).
    UnsupportedRequest(Request),
    /// Header `size` differs from the payload handed to the decoder.
    HeaderSizeMismatch {
        /// Header `size`.
        header: u32,
        /// Payload bytes given.
        payload: usize,
    },
    /// The payload length is not the one the request defines (shorter or longer).
    PayloadSize {
        /// The request.
        request: Request,
        /// Bytes required.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// Wrong number of file descriptors (family 13). All of them were closed.
    FdCount {
        /// The request.
        request: Request,
        /// Fds required (for zero-or-one requests: the maximum, 1).
        expected: usize,
        /// Fds received.
        got: usize,
    },
    /// `SET_VRING_KICK/CALL/ERR` payload has bits set other than 0–8.
    VringFdReservedBits {
        /// The request.
        request: Request,
        /// The `u64` payload.
        value: u64,
    },
    /// `SET_VRING_KICK/CALL/ERR`: the invalid FD flag (bit 8) disagrees with the ancillary data
    /// (flag set with an fd — which was closed — or flag clear without one).
    VringFdMismatch {
        /// The request.
        request: Request,
        /// Bit 8 of the payload.
        invalid_fd_flag: bool,
        /// Whether an fd came with the message.
        fd: bool,
    },
    /// A boolean vring state (`SET_VRING_ENABLE`, `SET_VRING_ENDIAN`) with `num` not 0 or 1.
    InvalidVringState {
        /// The request.
        request: Request,
        /// Vring index.
        index: u32,
        /// The invalid `num`.
        num: u32,
    },
    /// `SET_MEM_TABLE` `num_regions` is 0 or more than [`MAX_MEM_REGIONS`] (family 15).
    RegionCount {
        /// The value received.
        num_regions: u32,
    },
    /// `GET_CONFIG`/`SET_CONFIG` `size` exceeds [`MAX_CONFIG_SIZE`] or differs from the bytes
    /// that follow the config header.
    ConfigSize {
        /// The request.
        request: Request,
        /// The `size` field.
        size: u32,
        /// Bytes after the 12-byte config header.
        data: usize,
    },
    /// `GET_CONFIG`/`SET_CONFIG` `offset + size` overflows 32 bits.
    ConfigRangeOverflow {
        /// The `offset` field.
        offset: u32,
        /// The `size` field.
        size: u32,
    },
    /// `SET_LOG_BASE` with the log offset past the log size (family 16).
    LogOffsetBeyondSize {
        /// Log size.
        size: u64,
        /// Log offset.
        offset: u64,
    },
    /// `SET_LOG_BASE` with `size + offset` overflowing 64 bits (family 16, CVE-2020-10722).
    LogRangeOverflow {
        /// Log size.
        size: u64,
        /// Log offset.
        offset: u64,
    },
    /// `SET_INFLIGHT_FD` with `mmap_offset + mmap_size` overflowing 64 bits.
    InflightRangeOverflow {
        /// Area size.
        mmap_size: u64,
        /// Area offset.
        mmap_offset: u64,
    },
    /// `NET_SET_MTU` value does not fit in 16 bits.
    InvalidMtu(u64),
    /// `SET_STATUS` value does not fit in 8 bits.
    InvalidStatus(u64),
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageError::ShortHeader { got } => write!(f, "short message header: {got} of {HEADER_SIZE} bytes"),
            MessageError::BadVersion { version } => write!(f, "unsupported protocol version {version}"),
            MessageError::ReplyFlagOnRequest => f.write_str("reply flag set on a front-end request"),
            MessageError::ReservedFlags { flags } => write!(f, "reserved header flag bits set: {flags:#x}"),
            MessageError::PayloadTooLarge { size, max } => write!(f, "payload size {size} exceeds the maximum {max}"),
            MessageError::UnknownRequest(code) => write!(f, "unknown request code {code}"),
            MessageError::UnsupportedRequest(request) => write!(f, "{request} is not supported"),
            MessageError::HeaderSizeMismatch { header, payload } => {
                write!(f, "header size {header} but {payload} payload bytes")
            }
            MessageError::PayloadSize { request, expected, got } => {
                write!(f, "{request}: payload of {got} bytes, expected {expected}")
            }
            MessageError::FdCount { request, expected, got } => {
                write!(f, "{request}: {got} file descriptors, expected {expected}")
            }
            MessageError::VringFdReservedBits { request, value } => {
                write!(f, "{request}: payload {value:#x} has bits set other than index (0-7) and invalid-fd (8)")
            }
            MessageError::VringFdMismatch { request, invalid_fd_flag: true, .. } => {
                write!(f, "{request}: invalid-fd flag set but a file descriptor was sent")
            }
            MessageError::VringFdMismatch { request, invalid_fd_flag: false, .. } => {
                write!(f, "{request}: no file descriptor and the invalid-fd flag is clear")
            }
            MessageError::InvalidVringState { request, index, num } => {
                write!(f, "{request}: vring {index} state {num} is neither 0 nor 1")
            }
            MessageError::RegionCount { num_regions } => {
                write!(f, "memory table with {num_regions} regions (must be 1 to {MAX_MEM_REGIONS})")
            }
            MessageError::ConfigSize { request, size, data } => {
                write!(f, "{request}: config size {size} with {data} data bytes (maximum {MAX_CONFIG_SIZE})")
            }
            MessageError::ConfigRangeOverflow { offset, size } => {
                write!(f, "config offset {offset:#x} + size {size:#x} overflows 32 bits")
            }
            MessageError::LogOffsetBeyondSize { size, offset } => {
                write!(f, "log offset {offset:#x} is beyond log size {size:#x}")
            }
            MessageError::LogRangeOverflow { size, offset } => {
                write!(f, "log size {size:#x} + offset {offset:#x} overflows 64 bits")
            }
            MessageError::InflightRangeOverflow { mmap_size, mmap_offset } => {
                write!(f, "inflight offset {mmap_offset:#x} + size {mmap_size:#x} overflows 64 bits")
            }
            MessageError::InvalidMtu(value) => write!(f, "MTU {value:#x} does not fit in 16 bits"),
            MessageError::InvalidStatus(value) => write!(f, "device status {value:#x} does not fit in 8 bits"),
        }
    }
}

impl std::error::Error for MessageError {}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestMemoryMap, MemoryError, OverflowField};
    use std::io::{ErrorKind, PipeWriter, Write};

    // --- helpers -----------------------------------------------------------------------------

    /// A pipe whose read end is handed to the decoder as "the fd"; the write end stays here to
    /// observe it. Writing to a pipe whose every read end is closed fails with EPIPE (the test
    /// harness ignores SIGPIPE), so closure is detected without looking at fd numbers, which
    /// another test thread could reuse between the close and the check.
    fn probe_fd() -> (OwnedFd, PipeWriter) {
        let (reader, writer) = std::io::pipe().expect("pipe");
        (OwnedFd::from(reader), writer)
    }

    fn is_closed(writer: &mut PipeWriter) -> bool {
        match writer.write_all(&[0]) {
            Ok(()) => false,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::BrokenPipe, "unexpected write error {e}");
                true
            }
        }
    }

    /// `n` fds and their probes.
    fn probes(n: usize) -> (Vec<OwnedFd>, Vec<PipeWriter>) {
        (0..n).map(|_| probe_fd()).unzip()
    }

    fn all_closed(writers: &mut [PipeWriter]) -> bool {
        writers.iter_mut().all(is_closed)
    }

    fn header_bytes(request: u32, flags: u32, size: u32) -> [u8; HEADER_SIZE] {
        Header { request, flags, size }.to_bytes()
    }

    fn decode(request: Request, payload: &[u8], fds: Vec<OwnedFd>) -> Result<FrontendMessage, MessageError> {
        FrontendMessage::decode_payload(request, payload, fds)
    }

    fn u64_payload(v: u64) -> Vec<u8> {
        v.to_ne_bytes().to_vec()
    }

    fn state_payload(index: u32, num: u32) -> Vec<u8> {
        let mut p = index.to_ne_bytes().to_vec();
        p.extend_from_slice(&num.to_ne_bytes());
        p
    }

    fn region(gpa: u64, size: u64, uaddr: u64, off: u64) -> MemoryRegionDesc {
        MemoryRegionDesc { guest_phys_addr: gpa, memory_size: size, userspace_addr: uaddr, mmap_offset: off }
    }

    fn mem_table_payload(num_regions: u32, regions: &[MemoryRegionDesc]) -> Vec<u8> {
        let mut p = num_regions.to_ne_bytes().to_vec();
        p.extend_from_slice(&0u32.to_ne_bytes());
        for r in regions {
            p.extend_from_slice(&r.to_bytes());
        }
        p
    }

    fn single_region_payload(r: &MemoryRegionDesc) -> Vec<u8> {
        let mut p = 0u64.to_ne_bytes().to_vec();
        p.extend_from_slice(&r.to_bytes());
        p
    }

    fn config_payload(offset: u32, size: u32, flags: u32, data: &[u8]) -> Vec<u8> {
        let mut p = offset.to_ne_bytes().to_vec();
        p.extend_from_slice(&size.to_ne_bytes());
        p.extend_from_slice(&flags.to_ne_bytes());
        p.extend_from_slice(data);
        p
    }

    fn log_payload(size: u64, offset: u64) -> Vec<u8> {
        let mut p = size.to_ne_bytes().to_vec();
        p.extend_from_slice(&offset.to_ne_bytes());
        p
    }

    fn good_region() -> MemoryRegionDesc {
        region(0, 0x4000_0000, 0x7f00_0000_0000, 0)
    }

    // --- header (family 12) ------------------------------------------------------------------

    #[test]
    fn header_is_12_bytes_repr_c() {
        assert_eq!(std::mem::size_of::<Header>(), HEADER_SIZE);
    }

    #[test]
    fn header_parse_accepts_request_and_need_reply() {
        let h = Header::parse(&header_bytes(5, VERSION_1 | FLAG_NEED_REPLY, 40)).unwrap();
        assert_eq!(h, Header { request: 5, flags: 0x9, size: 40 });
        assert!(h.need_reply());
        assert_eq!(h.request(), Ok(Request::SetMemTable));
        let h = Header::parse(&header_bytes(1, VERSION_1, 0)).unwrap();
        assert!(!h.need_reply());
    }

    #[test]
    fn header_short_read() {
        let bytes = header_bytes(1, 1, 0);
        for n in 0..HEADER_SIZE {
            assert_eq!(Header::from_slice(&bytes[..n]), Err(MessageError::ShortHeader { got: n }));
        }
        assert!(Header::from_slice(&bytes).is_ok());
    }

    #[test]
    fn header_bad_version() {
        for version in [0u32, 2, 3] {
            assert_eq!(Header::parse(&header_bytes(1, version, 0)), Err(MessageError::BadVersion { version }));
        }
    }

    #[test]
    fn header_reply_bit_on_request() {
        assert_eq!(Header::parse(&header_bytes(1, VERSION_1 | FLAG_REPLY, 0)), Err(MessageError::ReplyFlagOnRequest));
    }

    #[test]
    fn header_reserved_flags() {
        for bit in 4..32 {
            let flags = VERSION_1 | (1u32 << bit);
            assert_eq!(Header::parse(&header_bytes(1, flags, 0)), Err(MessageError::ReservedFlags { flags }));
        }
    }

    #[test]
    fn header_payload_too_large() {
        assert!(Header::parse(&header_bytes(24, VERSION_1, MAX_PAYLOAD)).is_ok());
        for size in [MAX_PAYLOAD + 1, 4096, u32::MAX] {
            assert_eq!(
                Header::parse(&header_bytes(24, VERSION_1, size)),
                Err(MessageError::PayloadTooLarge { size, max: MAX_PAYLOAD })
            );
        }
    }

    #[test]
    fn max_payload_is_the_largest_config_access() {
        assert_eq!(MAX_PAYLOAD, 268);
        assert!(8 + MAX_MEM_REGIONS * MEMORY_REGION_SIZE <= MAX_PAYLOAD as usize);
        for request in Request::ALL {
            if let PayloadRule::Exact(n) = request.spec().payload {
                assert!(n <= MAX_PAYLOAD as usize, "{request}");
            }
        }
    }

    #[test]
    fn header_does_not_reject_unknown_codes_until_asked() {
        let h = Header::parse(&header_bytes(999, VERSION_1, 0)).unwrap();
        assert_eq!(h.request(), Err(MessageError::UnknownRequest(999)));
    }

    // --- request codes -----------------------------------------------------------------------

    #[test]
    fn every_request_code_round_trips() {
        for (i, request) in Request::ALL.iter().enumerate() {
            let code = u32::from(*request);
            assert_eq!(code as usize, i + 1, "ALL must be in code order");
            assert_eq!(Request::try_from(code), Ok(*request));
        }
        assert_eq!(Request::try_from(43), Ok(Request::CheckDeviceState));
        assert_eq!(Request::SetMemTable.to_string(), "SET_MEM_TABLE");
    }

    #[test]
    fn unknown_request_codes() {
        for code in [0u32, 45, 46, 1000, u32::MAX] {
            assert_eq!(Request::try_from(code), Err(MessageError::UnknownRequest(code)));
        }
    }

    #[test]
    fn decode_via_header_checks_code_and_size() {
        let h = Header { request: 0, flags: 1, size: 0 };
        assert_eq!(FrontendMessage::decode(&h, &[], vec![]).unwrap_err(), MessageError::UnknownRequest(0));
        let h = Header { request: Request::SetFeatures as u32, flags: 1, size: 8 };
        assert_eq!(
            FrontendMessage::decode(&h, &[0; 4], vec![]).unwrap_err(),
            MessageError::HeaderSizeMismatch { header: 8, payload: 4 }
        );
        match FrontendMessage::decode(&h, &u64_payload(0x1234), vec![]) {
            Ok(FrontendMessage::SetFeatures(0x1234)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_request_fds_are_dropped_by_caller_contract() {
        // An unknown code fails before the fds are given to the payload decoder; `decode`
        // still consumes (and closes) them.
        let (fds, mut w) = probes(2);
        let h = Header { request: 77, flags: 1, size: 0 };
        assert!(FrontendMessage::decode(&h, &[], fds).is_err());
        assert!(all_closed(&mut w));
    }

    // --- exact payload sizes -----------------------------------------------------------------

    /// Every fixed-size request, with zero fds so that only the size rule can fire: one byte
    /// short and one byte long are `PayloadSize`.
    #[test]
    fn exact_payload_sizes_short_and_long() {
        for request in Request::ALL {
            let PayloadRule::Exact(n) = request.spec().payload else { continue };
            let long = vec![0u8; n + 1];
            assert_eq!(
                decode(request, &long, vec![]).unwrap_err(),
                MessageError::PayloadSize { request, expected: n, got: n + 1 },
                "{request} long"
            );
            if n > 0 {
                let short = vec![0u8; n - 1];
                assert_eq!(
                    decode(request, &short, vec![]).unwrap_err(),
                    MessageError::PayloadSize { request, expected: n, got: n - 1 },
                    "{request} short"
                );
            }
        }
    }

    #[test]
    fn spot_check_sizes() {
        assert_eq!(Request::SetVringAddr.spec().payload, PayloadRule::Exact(40));
        assert_eq!(Request::AddMemReg.spec().payload, PayloadRule::Exact(40));
        assert_eq!(Request::IotlbMsg.spec().payload, PayloadRule::Exact(32));
        assert_eq!(Request::GetInflightFd.spec().payload, PayloadRule::Exact(24));
        assert_eq!(Request::SetLogBase.spec().payload, PayloadRule::Exact(16));
        assert_eq!(Request::GetFeatures.spec().payload, PayloadRule::Exact(0));
        // A no-payload request with a u64 attached is rejected.
        assert_eq!(
            decode(Request::GetFeatures, &[0; 8], vec![]).unwrap_err(),
            MessageError::PayloadSize { request: Request::GetFeatures, expected: 0, got: 8 }
        );
    }

    #[test]
    fn crypto_session_is_unsupported() {
        assert_eq!(
            decode(Request::CreateCryptoSession, &[0; 64], vec![]).unwrap_err(),
            MessageError::UnsupportedRequest(Request::CreateCryptoSession)
        );
    }

    // --- fd counts (family 13) ---------------------------------------------------------------

    #[test]
    fn fds_on_a_message_that_takes_none_are_rejected_and_closed() {
        for request in Request::ALL {
            let spec = request.spec();
            let (FdRule::None, PayloadRule::Exact(n)) = (spec.fds, spec.payload) else { continue };
            let (fds, mut w) = probes(1);
            assert_eq!(
                decode(request, &vec![0u8; n], fds).unwrap_err(),
                MessageError::FdCount { request, expected: 0, got: 1 },
                "{request}"
            );
            assert!(all_closed(&mut w), "{request}: fd not closed");
        }
    }

    #[test]
    fn inflight_messages_fd_rules() {
        // CVE-2022-0669: GET_INFLIGHT_FD takes no fd.
        let inflight = Inflight { mmap_size: 0, mmap_offset: 0, num_queues: 2, queue_size: 256 };
        let (fds, mut w) = probes(1);
        assert!(matches!(
            decode(Request::GetInflightFd, &inflight.to_bytes(), fds),
            Err(MessageError::FdCount { expected: 0, got: 1, .. })
        ));
        assert!(all_closed(&mut w));
        match decode(Request::GetInflightFd, &inflight.to_bytes(), vec![]) {
            Ok(FrontendMessage::GetInflightFd(i)) => assert_eq!(i, inflight),
            other => panic!("{other:?}"),
        }
        // SET_INFLIGHT_FD takes exactly one; two are rejected and both closed.
        let set = Inflight { mmap_size: 4096, mmap_offset: 0, num_queues: 2, queue_size: 256 };
        let (fds, mut w) = probes(2);
        assert!(matches!(
            decode(Request::SetInflightFd, &set.to_bytes(), fds),
            Err(MessageError::FdCount { expected: 1, got: 2, .. })
        ));
        assert!(all_closed(&mut w));
        let (fds, mut w) = probes(1);
        match decode(Request::SetInflightFd, &set.to_bytes(), fds) {
            Ok(FrontendMessage::SetInflightFd { inflight, fd }) => {
                assert_eq!(inflight, set);
                assert!(!is_closed(&mut w[0]));
                drop(fd);
                assert!(is_closed(&mut w[0]));
            }
            other => panic!("{other:?}"),
        }
        let bad = Inflight { mmap_size: u64::MAX, mmap_offset: 1, num_queues: 1, queue_size: 1 };
        let (fds, mut w) = probes(1);
        assert!(matches!(
            decode(Request::SetInflightFd, &bad.to_bytes(), fds),
            Err(MessageError::InflightRangeOverflow { .. })
        ));
        assert!(all_closed(&mut w));
    }

    #[test]
    fn exactly_one_fd_too_few_and_too_many() {
        for request in [Request::SetLogFd, Request::SetBackendReqFd, Request::GpuSetSocket] {
            assert_eq!(
                decode(request, &[], vec![]).unwrap_err(),
                MessageError::FdCount { request, expected: 1, got: 0 }
            );
            let (fds, mut w) = probes(3);
            assert_eq!(decode(request, &[], fds).unwrap_err(), MessageError::FdCount { request, expected: 1, got: 3 });
            assert!(all_closed(&mut w), "{request}");
            let (fds, mut w) = probes(1);
            let msg = decode(request, &[], fds).unwrap();
            assert_eq!(msg.request(), request);
            assert!(!is_closed(&mut w[0]), "{request}: kept fd must stay open");
            drop(msg);
            assert!(is_closed(&mut w[0]));
        }
    }

    #[test]
    fn payload_error_closes_fds_too() {
        let (fds, mut w) = probes(1);
        assert!(matches!(decode(Request::SetBackendReqFd, &[0; 8], fds), Err(MessageError::PayloadSize { .. })));
        assert!(all_closed(&mut w));
    }

    #[test]
    fn set_device_state_fd() {
        let (fds, mut w) = probes(1);
        match decode(Request::SetDeviceStateFd, &state_payload(1, 0), fds) {
            Ok(FrontendMessage::SetDeviceStateFd { direction: 1, phase: 0, fd }) => {
                assert!(!is_closed(&mut w[0]));
                drop(fd);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(Request::SetDeviceStateFd, &state_payload(0, 0), vec![]),
            Err(MessageError::FdCount { expected: 1, got: 0, .. })
        ));
    }

    // --- SET_VRING_KICK / CALL / ERR ---------------------------------------------------------

    #[test]
    fn vring_fd_with_fd_and_flag_clear() {
        for request in [Request::SetVringKick, Request::SetVringCall, Request::SetVringErr] {
            let (fds, mut w) = probes(1);
            let msg = decode(request, &u64_payload(0xff), fds).unwrap();
            match &msg {
                FrontendMessage::SetVringKick { index: 0xff, fd: Some(_) }
                | FrontendMessage::SetVringCall { index: 0xff, fd: Some(_) }
                | FrontendMessage::SetVringErr { index: 0xff, fd: Some(_) } => {}
                other => panic!("{other:?}"),
            }
            assert_eq!(msg.request(), request);
            assert!(!is_closed(&mut w[0]));
        }
    }

    #[test]
    fn vring_fd_flag_set_without_fd_is_polling() {
        match decode(Request::SetVringKick, &u64_payload(VRING_INVALID_FD_FLAG | 3), vec![]) {
            Ok(FrontendMessage::SetVringKick { index: 3, fd: None }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn vring_fd_flag_set_with_fd_is_rejected_and_closed() {
        let (fds, mut w) = probes(1);
        assert_eq!(
            decode(Request::SetVringCall, &u64_payload(VRING_INVALID_FD_FLAG | 1), fds).unwrap_err(),
            MessageError::VringFdMismatch { request: Request::SetVringCall, invalid_fd_flag: true, fd: true }
        );
        assert!(all_closed(&mut w));
    }

    #[test]
    fn vring_fd_flag_clear_without_fd_is_rejected() {
        assert_eq!(
            decode(Request::SetVringKick, &u64_payload(1), vec![]).unwrap_err(),
            MessageError::VringFdMismatch { request: Request::SetVringKick, invalid_fd_flag: false, fd: false }
        );
    }

    #[test]
    fn vring_fd_upper_bits_are_rejected_and_fd_closed() {
        for value in [1u64 << 9, 0x1_0000 | 1, 1 << 32, 1 << 63, u64::MAX] {
            let (fds, mut w) = probes(1);
            assert_eq!(
                decode(Request::SetVringErr, &u64_payload(value), fds).unwrap_err(),
                MessageError::VringFdReservedBits { request: Request::SetVringErr, value },
                "{value:#x}"
            );
            assert!(all_closed(&mut w));
        }
    }

    #[test]
    fn vring_fd_two_fds_rejected_and_closed() {
        let (fds, mut w) = probes(2);
        assert_eq!(
            decode(Request::SetVringKick, &u64_payload(0), fds).unwrap_err(),
            MessageError::FdCount { request: Request::SetVringKick, expected: 1, got: 2 }
        );
        assert!(all_closed(&mut w));
    }

    // --- SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG (family 15) -------------------------------

    #[test]
    fn mem_table_valid_keeps_fds_open_in_order() {
        let regions = [good_region(), region(0x1_0000_0000, 0x1000, 0x7f10_0000_0000, 0x2000)];
        let (fds, mut w) = probes(2);
        let msg = decode(Request::SetMemTable, &mem_table_payload(2, &regions), fds).unwrap();
        match &msg {
            FrontendMessage::SetMemTable { regions: got, fds } => {
                assert_eq!(got.as_slice(), &regions);
                assert_eq!(fds.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(!is_closed(&mut w[0]) && !is_closed(&mut w[1]));
        drop(msg);
        assert!(all_closed(&mut w));
    }

    #[test]
    fn mem_table_region_count_zero_and_nine() {
        assert_eq!(
            decode(Request::SetMemTable, &mem_table_payload(0, &[]), vec![]).unwrap_err(),
            MessageError::RegionCount { num_regions: 0 }
        );
        let nine = vec![good_region(); 9];
        let (fds, mut w) = probes(8);
        assert_eq!(
            decode(Request::SetMemTable, &mem_table_payload(9, &nine), fds).unwrap_err(),
            MessageError::RegionCount { num_regions: 9 }
        );
        assert!(all_closed(&mut w));
        assert_eq!(
            decode(Request::SetMemTable, &mem_table_payload(u32::MAX, &[]), vec![]).unwrap_err(),
            MessageError::RegionCount { num_regions: u32::MAX }
        );
        // Eight is the maximum and decodes.
        let eight: Vec<_> = (0..8u64).map(|i| region(i << 32, 0x1000, (i + 1) << 40, 0)).collect();
        let (fds, _w) = probes(8);
        assert!(decode(Request::SetMemTable, &mem_table_payload(8, &eight), fds).is_ok());
    }

    #[test]
    fn mem_table_payload_must_match_num_regions() {
        let (fds, mut w) = probes(2);
        let payload = mem_table_payload(2, &[good_region(); 3]);
        assert_eq!(
            decode(Request::SetMemTable, &payload, fds).unwrap_err(),
            MessageError::PayloadSize { request: Request::SetMemTable, expected: 72, got: 104 }
        );
        assert!(all_closed(&mut w));
        assert_eq!(
            decode(Request::SetMemTable, &mem_table_payload(2, &[good_region()]), vec![]).unwrap_err(),
            MessageError::PayloadSize { request: Request::SetMemTable, expected: 72, got: 40 }
        );
        assert_eq!(
            decode(Request::SetMemTable, &[0; 4], vec![]).unwrap_err(),
            MessageError::PayloadSize { request: Request::SetMemTable, expected: 8, got: 4 }
        );
    }

    #[test]
    fn mem_table_fd_count_must_match_num_regions() {
        let regions = [good_region(), region(1 << 40, 0x1000, 1 << 41, 0)];
        for n in [0usize, 1, 3] {
            let (fds, mut w) = probes(n);
            assert_eq!(
                decode(Request::SetMemTable, &mem_table_payload(2, &regions), fds).unwrap_err(),
                MessageError::FdCount { request: Request::SetMemTable, expected: 2, got: n }
            );
            assert!(all_closed(&mut w), "{n} fds");
        }
    }

    /// Family 15, one owner: the decoder passes a region through as received and the memory
    /// map refuses it with a typed [`MemoryError`], closing every fd.
    #[test]
    fn mem_table_regions_decode_as_received_and_the_map_refuses_them() {
        let bad = [
            (region(0, 0, 0, 0), None),
            (region(u64::MAX - 0xfff, 0x1000, 0, 0), Some(OverflowField::GuestPhysAddr)),
            (region(0, 0x1000, u64::MAX, 0), Some(OverflowField::UserspaceAddr)),
            (region(0, 0x1000, 0, u64::MAX - 1), Some(OverflowField::MmapOffset)),
        ];
        for (bad, field) in bad {
            let (fds, mut w) = probes(2);
            let table = [good_region(), bad];
            let Ok(FrontendMessage::SetMemTable { regions, fds }) =
                decode(Request::SetMemTable, &mem_table_payload(2, &table), fds)
            else {
                panic!("{bad:?} must decode");
            };
            assert_eq!(regions, table);
            let err = match field {
                None => MemoryError::ZeroSize { region: bad },
                Some(field) => MemoryError::Overflow { region: bad, field },
            };
            assert_eq!(GuestMemoryMap::from_table(&regions, fds).err(), Some(err));
            assert!(all_closed(&mut w));
        }
    }

    #[test]
    fn add_mem_reg() {
        let r = good_region();
        let (fds, mut w) = probes(1);
        match decode(Request::AddMemReg, &single_region_payload(&r), fds) {
            Ok(FrontendMessage::AddMemReg { region, fd }) => {
                assert_eq!(region, r);
                assert!(!is_closed(&mut w[0]));
                drop(fd);
                assert!(is_closed(&mut w[0]));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decode(Request::AddMemReg, &single_region_payload(&r), vec![]).unwrap_err(),
            MessageError::FdCount { request: Request::AddMemReg, expected: 1, got: 0 }
        );
        // Decoded as received; the map refuses it before looking at the fd, and closes it.
        let overflow = region(0, 0x1000, 0, u64::MAX);
        let zero = region(0, 0, 0, 0);
        for (bad, err) in [
            (overflow, MemoryError::Overflow { region: overflow, field: OverflowField::MmapOffset }),
            (zero, MemoryError::ZeroSize { region: zero }),
        ] {
            let (fds, mut w) = probes(1);
            let Ok(FrontendMessage::AddMemReg { region, fd }) =
                decode(Request::AddMemReg, &single_region_payload(&bad), fds)
            else {
                panic!("{bad:?} must decode");
            };
            assert_eq!(region, bad);
            assert_eq!(GuestMemoryMap::new(MAX_MEM_REGIONS).add_region(region, fd), Err(err));
            assert!(all_closed(&mut w));
        }
    }

    #[test]
    fn rem_mem_reg_with_fd_is_accepted_and_fd_closed() {
        let r = region(0x1000, 0x2000, 0x7f00_0000_0000, u64::MAX); // mmap_offset is ignored
        let (fds, mut w) = probes(1);
        match decode(Request::RemMemReg, &single_region_payload(&r), fds) {
            Ok(FrontendMessage::RemMemReg { region }) => assert_eq!(region, r),
            other => panic!("{other:?}"),
        }
        assert!(all_closed(&mut w), "REM_MEM_REG fd must be closed unused");
        assert!(decode(Request::RemMemReg, &single_region_payload(&r), vec![]).is_ok());
        let (fds, mut w) = probes(2);
        assert_eq!(
            decode(Request::RemMemReg, &single_region_payload(&r), fds).unwrap_err(),
            MessageError::FdCount { request: Request::RemMemReg, expected: 1, got: 2 }
        );
        assert!(all_closed(&mut w));
        // An overflowing region decodes as received; it names no region the map can hold
        // (`GuestMemoryMap::remove_region` answers `UnknownRegion`).
        let bad = region(u64::MAX, 2, 0, 0);
        assert!(matches!(
            decode(Request::RemMemReg, &single_region_payload(&bad), vec![]),
            Ok(FrontendMessage::RemMemReg { region }) if region == bad
        ));
    }

    // --- SET_LOG_BASE (family 16) ------------------------------------------------------------

    #[test]
    fn set_log_base() {
        let (fds, mut w) = probes(1);
        match decode(Request::SetLogBase, &log_payload(0x10_0000, 0), fds) {
            Ok(FrontendMessage::SetLogBase { size: 0x10_0000, offset: 0, fd }) => {
                assert!(!is_closed(&mut w[0]));
                drop(fd);
            }
            other => panic!("{other:?}"),
        }
        let (fds, mut w) = probes(1);
        assert_eq!(
            decode(Request::SetLogBase, &log_payload(0x1000, 0x1001), fds).unwrap_err(),
            MessageError::LogOffsetBeyondSize { size: 0x1000, offset: 0x1001 }
        );
        assert!(all_closed(&mut w));
        let (fds, mut w) = probes(1);
        assert_eq!(
            decode(Request::SetLogBase, &log_payload(u64::MAX, u64::MAX / 2 + 1), fds).unwrap_err(),
            MessageError::LogRangeOverflow { size: u64::MAX, offset: u64::MAX / 2 + 1 }
        );
        assert!(all_closed(&mut w));
        // The legacy 8-byte form (a bare log address) and the fd-less form are rejected.
        assert!(matches!(
            decode(Request::SetLogBase, &u64_payload(0), vec![]),
            Err(MessageError::PayloadSize { expected: 16, got: 8, .. })
        ));
        assert!(matches!(
            decode(Request::SetLogBase, &log_payload(0x1000, 0), vec![]),
            Err(MessageError::FdCount { expected: 1, got: 0, .. })
        ));
    }

    // --- indices stay u32 (family 14, CVE-2020-10723) ----------------------------------------

    #[test]
    fn vring_index_high_bits_are_preserved() {
        let index = 0x1_0000 + 1;
        match decode(Request::SetVringNum, &state_payload(index, 256), vec![]) {
            Ok(FrontendMessage::SetVringNum { index: i, num: 256 }) => assert_eq!(i, index),
            other => panic!("{other:?}"),
        }
        match decode(Request::SetVringBase, &state_payload(index, 0x1_0000), vec![]) {
            Ok(FrontendMessage::SetVringBase { index: i, num: 0x1_0000 }) => assert_eq!(i, index),
            other => panic!("{other:?}"),
        }
        match decode(Request::GetVringBase, &state_payload(index, 0), vec![]) {
            Ok(FrontendMessage::GetVringBase { index: i }) => assert_eq!(i, index),
            other => panic!("{other:?}"),
        }
        match decode(Request::SetVringEnable, &state_payload(index, 1), vec![]) {
            Ok(FrontendMessage::SetVringEnable { index: i, enable: true }) => assert_eq!(i, index),
            other => panic!("{other:?}"),
        }
        match decode(Request::VringKick, &state_payload(u32::MAX, 0), vec![]) {
            Ok(FrontendMessage::VringKick { index: u32::MAX }) => {}
            other => panic!("{other:?}"),
        }
        let mut addr = state_payload(index, VRING_F_LOG);
        for v in [0x1000u64, 0x2000, 0x3000, 0x4000] {
            addr.extend_from_slice(&v.to_ne_bytes());
        }
        match decode(Request::SetVringAddr, &addr, vec![]) {
            Ok(FrontendMessage::SetVringAddr {
                index: i,
                flags: VRING_F_LOG,
                desc_user_addr: 0x1000,
                used_user_addr: 0x2000,
                avail_user_addr: 0x3000,
                log_guest_addr: 0x4000,
            }) => assert_eq!(i, index),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn boolean_vring_states() {
        assert_eq!(
            decode(Request::SetVringEnable, &state_payload(0, 2), vec![]).unwrap_err(),
            MessageError::InvalidVringState { request: Request::SetVringEnable, index: 0, num: 2 }
        );
        assert!(matches!(
            decode(Request::SetVringEnable, &state_payload(1, 0), vec![]),
            Ok(FrontendMessage::SetVringEnable { index: 1, enable: false })
        ));
        assert!(matches!(
            decode(Request::SetVringEndian, &state_payload(0, 1), vec![]),
            Ok(FrontendMessage::SetVringEndian { index: 0, big_endian: true })
        ));
        assert!(matches!(
            decode(Request::SetVringEndian, &state_payload(0, 0x100), vec![]),
            Err(MessageError::InvalidVringState { num: 0x100, .. })
        ));
    }

    // --- GET_CONFIG / SET_CONFIG -------------------------------------------------------------

    #[test]
    fn get_config_size_checks() {
        // QEMU sends `size` placeholder bytes with GET_CONFIG.
        match decode(Request::GetConfig, &config_payload(0, 4, 0, &[0; 4]), vec![]) {
            Ok(FrontendMessage::GetConfig { offset: 0, size: 4, flags: 0 }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decode(Request::GetConfig, &config_payload(0, 8, 0, &[0; 4]), vec![]).unwrap_err(),
            MessageError::ConfigSize { request: Request::GetConfig, size: 8, data: 4 }
        );
        assert_eq!(
            decode(Request::GetConfig, &config_payload(0, 4, 0, &[0; 8]), vec![]).unwrap_err(),
            MessageError::ConfigSize { request: Request::GetConfig, size: 4, data: 8 }
        );
        assert_eq!(
            decode(Request::GetConfig, &config_payload(0, 257, 0, &[0; 257]), vec![]).unwrap_err(),
            MessageError::ConfigSize { request: Request::GetConfig, size: 257, data: 257 }
        );
        assert!(decode(Request::GetConfig, &config_payload(0, 256, 0, &[0; 256]), vec![]).is_ok());
        assert_eq!(
            decode(Request::GetConfig, &config_payload(u32::MAX, 4, 0, &[0; 4]), vec![]).unwrap_err(),
            MessageError::ConfigRangeOverflow { offset: u32::MAX, size: 4 }
        );
        assert_eq!(
            decode(Request::GetConfig, &[0; 11], vec![]).unwrap_err(),
            MessageError::PayloadSize { request: Request::GetConfig, expected: 12, got: 11 }
        );
    }

    #[test]
    fn set_config_keeps_payload() {
        match decode(Request::SetConfig, &config_payload(6, 2, CONFIG_FLAGS_MIGRATION, &[0xab, 0xcd]), vec![]) {
            Ok(FrontendMessage::SetConfig { offset: 6, size: 2, flags: 1, payload }) => {
                assert_eq!(payload, vec![0xab, 0xcd]);
            }
            other => panic!("{other:?}"),
        }
    }

    // --- other payloads ----------------------------------------------------------------------

    #[test]
    fn scalar_payloads() {
        assert!(matches!(decode(Request::NetSetMtu, &u64_payload(1500), vec![]), Ok(FrontendMessage::NetSetMtu(1500))));
        assert_eq!(
            decode(Request::NetSetMtu, &u64_payload(0x1_0000), vec![]).unwrap_err(),
            MessageError::InvalidMtu(0x1_0000)
        );
        assert!(matches!(decode(Request::SetStatus, &u64_payload(0xf), vec![]), Ok(FrontendMessage::SetStatus(0xf))));
        assert_eq!(
            decode(Request::SetStatus, &u64_payload(0x10f), vec![]).unwrap_err(),
            MessageError::InvalidStatus(0x10f)
        );
        assert!(matches!(
            decode(Request::SetProtocolFeatures, &u64_payload(protocol_features::MQ), vec![]),
            Ok(FrontendMessage::SetProtocolFeatures(protocol_features::MQ))
        ));
        let mut rarp = [0u8; 8];
        rarp[..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        assert!(matches!(
            decode(Request::SendRarp, &rarp, vec![]),
            Ok(FrontendMessage::SendRarp([0x52, 0x54, 0, 0, 0, 1]))
        ));
        let uuid: [u8; 16] = std::array::from_fn(|i| i as u8);
        assert!(matches!(
            decode(Request::GetSharedObject, &uuid, vec![]),
            Ok(FrontendMessage::GetSharedObject { uuid: u }) if u == uuid
        ));
    }

    #[test]
    fn iotlb_message() {
        let mut p = Vec::new();
        for v in [0x1000u64, 0x2000, 0x7f00_0000_0000] {
            p.extend_from_slice(&v.to_ne_bytes());
        }
        p.extend_from_slice(&[IotlbMessage::PERM_RW, IotlbMessage::UPDATE, 0, 0, 0, 0, 0, 0]);
        match decode(Request::IotlbMsg, &p, vec![]) {
            Ok(FrontendMessage::IotlbMsg(m)) => assert_eq!(
                m,
                IotlbMessage {
                    iova: 0x1000,
                    size: 0x2000,
                    user_addr: 0x7f00_0000_0000,
                    perm: IotlbMessage::PERM_RW,
                    msg_type: IotlbMessage::UPDATE
                }
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_payload_requests_decode() {
        for request in Request::ALL {
            let spec = request.spec();
            if spec.payload != PayloadRule::Exact(0) || spec.fds != FdRule::None {
                continue;
            }
            assert_eq!(decode(request, &[], vec![]).unwrap().request(), request);
        }
    }

    /// No input panics: every request, every payload length up to past the maximum, pseudo-
    /// random bytes, with and without an fd.
    #[test]
    fn no_panics_on_arbitrary_payloads() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for request in Request::ALL {
            for len in 0..=(MAX_PAYLOAD as usize + 8) {
                let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let _ = decode(request, &payload, vec![]);
                if len % 8 == 0 {
                    let (fds, _w) = probes(1);
                    let _ = decode(request, &payload, fds);
                }
            }
        }
        for _ in 0..10_000 {
            let bytes = next().to_ne_bytes();
            let mut h = [0u8; HEADER_SIZE];
            h[..8].copy_from_slice(&bytes);
            h[8..].copy_from_slice(&next().to_ne_bytes()[..4]);
            let _ = Header::parse(&h);
        }
    }

    // --- reply rules -------------------------------------------------------------------------

    #[test]
    fn reply_rules() {
        let ack = protocol_features::REPLY_ACK;
        for request in [
            Request::GetFeatures,
            Request::GetProtocolFeatures,
            Request::GetVringBase,
            Request::GetQueueNum,
            Request::GetConfig,
            Request::GetMaxMemSlots,
            Request::GetStatus,
            Request::IotlbMsg,
            Request::SetDeviceStateFd,
            Request::CheckDeviceState,
        ] {
            assert!(request.reply_required(VERSION_1, 0), "{request}");
        }
        assert!(!Request::SetLogBase.reply_required(VERSION_1, 0));
        assert!(Request::SetLogBase.reply_required(VERSION_1, protocol_features::LOG_SHMFD));
        assert!(Request::GetInflightFd.reply_required(VERSION_1, protocol_features::INFLIGHT_SHMFD));
        // need_reply counts only with REPLY_ACK negotiated.
        assert!(!Request::SetMemTable.reply_required(VERSION_1, 0));
        assert!(!Request::SetMemTable.reply_required(VERSION_1 | FLAG_NEED_REPLY, 0));
        assert!(Request::SetMemTable.reply_required(VERSION_1 | FLAG_NEED_REPLY, ack));
        assert!(!Request::SetVringKick.reply_required(VERSION_1, ack));
        assert!(Request::SetBackendReqFd.reply_required(VERSION_1 | FLAG_NEED_REPLY, ack));
    }

    #[test]
    fn fd_table() {
        assert_eq!(Request::SetMemTable.spec().fds, FdRule::OnePerRegion);
        assert_eq!(Request::AddMemReg.spec().fds, FdRule::Exactly(1));
        assert_eq!(Request::RemMemReg.spec().fds, FdRule::ZeroOrOneClosed);
        assert_eq!(Request::SetVringCall.spec().fds, FdRule::ZeroOrOneByInvalidFdFlag);
        assert_eq!(Request::GetInflightFd.spec().fds, FdRule::None);
        let with_fds: Vec<_> = Request::ALL.into_iter().filter(|r| r.spec().fds != FdRule::None).collect();
        assert_eq!(
            with_fds,
            [
                Request::SetMemTable,
                Request::SetLogBase,
                Request::SetLogFd,
                Request::SetVringKick,
                Request::SetVringCall,
                Request::SetVringErr,
                Request::SetBackendReqFd,
                Request::SetInflightFd,
                Request::GpuSetSocket,
                Request::AddMemReg,
                Request::RemMemReg,
                Request::SetDeviceStateFd,
            ]
        );
    }

    // --- reply encoding ----------------------------------------------------------------------

    fn expected_reply(request: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = request.to_ne_bytes().to_vec();
        v.extend_from_slice(&5u32.to_ne_bytes()); // VERSION_1 | REPLY
        v.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn reply_encoding_bytes_exact() {
        let features = 0x1_4000_0000u64;
        assert_eq!(encode_u64_reply(Request::GetFeatures, features), expected_reply(1, &features.to_ne_bytes()));
        assert_eq!(encode_u64_reply(Request::GetQueueNum, 2), expected_reply(17, &2u64.to_ne_bytes()));
        assert_eq!(encode_ack(Request::SetMemTable, true), expected_reply(5, &0u64.to_ne_bytes()));
        assert_eq!(encode_ack(Request::SetMemTable, false), expected_reply(5, &1u64.to_ne_bytes()));
        assert_eq!(
            encode_vring_state_reply(Request::GetVringBase, 1, 0x1234),
            expected_reply(11, &state_payload(1, 0x1234))
        );
        assert_eq!(encode_get_status_reply(0xf), expected_reply(40, &0xfu64.to_ne_bytes()));
        assert_eq!(encode_reply(Request::GetConfig, &[]), expected_reply(24, &[]));
        let inflight = Inflight { mmap_size: 0x2000, mmap_offset: 0, num_queues: 2, queue_size: 256 };
        let reply = encode_get_inflight_fd_reply(&inflight);
        assert_eq!(reply.len(), HEADER_SIZE + 24);
        assert_eq!(reply, expected_reply(31, &inflight.to_bytes()));
        // A reply header is accepted by nothing that parses requests.
        let h: [u8; HEADER_SIZE] = reply[..HEADER_SIZE].try_into().unwrap();
        assert_eq!(Header::parse(&h), Err(MessageError::ReplyFlagOnRequest));
    }

    #[test]
    fn get_config_reply_and_error() {
        let data = [1u8, 2, 3, 4];
        assert_eq!(encode_get_config_reply(8, 0, &data), expected_reply(24, &config_payload(8, 4, 0, &data)));
        assert_eq!(encode_get_config_error(), expected_reply(24, &[]));
        assert_eq!(encode_get_config_reply(0, 0, &[0; 257]), expected_reply(24, &[]));
    }

    #[test]
    fn errors_display() {
        let e = MessageError::FdCount { request: Request::SetMemTable, expected: 2, got: 3 };
        assert_eq!(e.to_string(), "SET_MEM_TABLE: 3 file descriptors, expected 2");
        let _: &dyn std::error::Error = &e;
    }
}
