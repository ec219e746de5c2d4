//! "Front-end message types" and "Communication": **the** request table. One list below names
//! every request once, with its code, its spec name, its payload size, the file descriptors it
//! carries and when the back-end replies; the `requests!` macro turns it into [`Request`], the code
//! mapping, [`Request::name`], [`Request::spec`] and [`FrontendMessage::request`]. The decoder
//! ([`super::decode`]) enforces the payload and fd columns, the device the reply column
//! ([`Request::reply_required`]).
//!
//! Sources: "Front-end message types" (payloads, fds), "Communication" (the always-reply list
//! and the fd list), `REPLY_ACK`, and QEMU's `hw/virtio/vhost-user.c` for the exact `hdr.size`
//! QEMU puts on the wire.

use std::fmt;

use super::{FrontendMessage, MessageError, ProtocolFeatures, FLAG_NEED_REPLY};

/// Builds everything that is per request from one table. A row is
///
/// ```text
/// /// docs
/// Name = code, "SPEC_NAME", PayloadRule, FdRule, ReplyRule [=> FrontendMessage variant];
/// ```
///
/// Rules are written without their type (`Exact(8)`, not `PayloadRule::Exact(8)`). The
/// `FrontendMessage` variant is absent only for a request that is never decoded.
macro_rules! requests {
    ($(
        $(#[$doc:meta])*
        $name:ident = $code:literal, $wire:literal,
        $payload:ident $(($payload_arg:expr))?,
        $fds:ident $(($fds_arg:expr))?,
        $reply:ident $(($reply_arg:expr))?
        $(=> $message:ident)?;
    )*) => {
        /// A front-end request code ("Front-end message types"). Names drop the `VHOST_USER_`
        /// prefix.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Request {
            $($(#[$doc])* $name = $code,)*
        }

        impl Request {
            /// Every request code, in code order.
            pub const ALL: [Request; [$(Request::$name),*].len()] = [$(Request::$name),*];

            /// The request with wire code `code`, if it is one.
            pub const fn from_code(code: u32) -> Option<Request> {
                match code {
                    $($code => Some(Request::$name),)*
                    _ => None,
                }
            }

            /// The spec's name without the `VHOST_USER_` prefix, e.g. `"SET_MEM_TABLE"`.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Request::$name => $wire,)*
                }
            }

            /// This request's row of the table: request payload size, file descriptors
            /// carried, and when the back-end must reply. [`FrontendMessage::decode`] enforces
            /// the first two; the device uses the third through [`Request::reply_required`].
            pub const fn spec(self) -> RequestSpec {
                match self {
                    $(Request::$name => RequestSpec {
                        payload: PayloadRule::$payload $(($payload_arg))?,
                        fds: FdRule::$fds $(($fds_arg))?,
                        reply: ReplyRule::$reply $(($reply_arg))?,
                    },)*
                }
            }
        }

        impl FrontendMessage {
            /// The request this message decodes.
            pub fn request(&self) -> Request {
                match self {
                    $($(FrontendMessage::$message { .. } => Request::$name,)?)*
                }
            }
        }
    };
}

requests! {
    /// 1 `GET_FEATURES`: reply `u64` virtio feature bits.
    GetFeatures = 1, "GET_FEATURES", Exact(0), None, Always => GetFeatures;
    /// 2 `SET_FEATURES`: `u64` negotiated virtio feature bits.
    SetFeatures = 2, "SET_FEATURES", Exact(8), None, OnNeedReply => SetFeatures;
    /// 3 `SET_OWNER`: "session start".
    SetOwner = 3, "SET_OWNER", Exact(0), None, OnNeedReply => SetOwner;
    /// 4 `RESET_OWNER`: deprecated; ignore or disable all rings.
    ResetOwner = 4, "RESET_OWNER", Exact(0), None, OnNeedReply => ResetOwner;
    /// 5 `SET_MEM_TABLE`: memory regions, one fd each.
    // Reply with the mapped bases only after POSTCOPY_LISTEN.
    SetMemTable = 5, "SET_MEM_TABLE", MemoryTable, OnePerRegion, Postcopy => SetMemTable;
    /// 6 `SET_LOG_BASE`: dirty-log shared memory (size, offset, fd).
    // "VHOST_USER_SET_LOG_BASE (if VHOST_USER_PROTOCOL_F_LOG_SHMFD)" in both the reply
    // list and the fd list; without LOG_SHMFD the message is meaningless across
    // processes, so only the shared-memory form (16-byte log description + fd) decodes.
    SetLogBase = 6, "SET_LOG_BASE", Exact(16), Exactly(1), IfProtocolFeature(ProtocolFeatures::LOG_SHMFD) => SetLogBase;
    /// 7 `SET_LOG_FD`: eventfd to signal log updates.
    SetLogFd = 7, "SET_LOG_FD", Exact(0), Exactly(1), OnNeedReply => SetLogFd;
    /// 8 `SET_VRING_NUM`: ring size.
    SetVringNum = 8, "SET_VRING_NUM", Exact(8), None, OnNeedReply => SetVringNum;
    /// 9 `SET_VRING_ADDR`: ring addresses.
    SetVringAddr = 9, "SET_VRING_ADDR", Exact(40), None, OnNeedReply => SetVringAddr;
    /// 10 `SET_VRING_BASE`: next available index (split) / both indices (packed).
    SetVringBase = 10, "SET_VRING_BASE", Exact(8), None, OnNeedReply => SetVringBase;
    /// 11 `GET_VRING_BASE`: stop the ring, reply its base.
    GetVringBase = 11, "GET_VRING_BASE", Exact(8), None, Always => GetVringBase;
    /// 12 `SET_VRING_KICK`: kick eventfd (or polling).
    SetVringKick = 12, "SET_VRING_KICK", Exact(8), ZeroOrOneByInvalidFdFlag, OnNeedReply => SetVringKick;
    /// 13 `SET_VRING_CALL`: call eventfd (or polling).
    SetVringCall = 13, "SET_VRING_CALL", Exact(8), ZeroOrOneByInvalidFdFlag, OnNeedReply => SetVringCall;
    /// 14 `SET_VRING_ERR`: error eventfd.
    SetVringErr = 14, "SET_VRING_ERR", Exact(8), ZeroOrOneByInvalidFdFlag, OnNeedReply => SetVringErr;
    /// 15 `GET_PROTOCOL_FEATURES`: reply `u64` protocol feature bits.
    GetProtocolFeatures = 15, "GET_PROTOCOL_FEATURES", Exact(0), None, Always => GetProtocolFeatures;
    /// 16 `SET_PROTOCOL_FEATURES`: `u64` negotiated protocol feature bits.
    SetProtocolFeatures = 16, "SET_PROTOCOL_FEATURES", Exact(8), None, OnNeedReply => SetProtocolFeatures;
    /// 17 `GET_QUEUE_NUM`: reply `u64` maximum queue count.
    GetQueueNum = 17, "GET_QUEUE_NUM", Exact(0), None, Always => GetQueueNum;
    /// 18 `SET_VRING_ENABLE`: enable or disable a ring.
    SetVringEnable = 18, "SET_VRING_ENABLE", Exact(8), None, OnNeedReply => SetVringEnable;
    /// 19 `SEND_RARP`: broadcast a fake RARP for a MAC address.
    SendRarp = 19, "SEND_RARP", Exact(8), None, OnNeedReply => SendRarp;
    /// 20 `NET_SET_MTU`: host MTU exposed to the guest.
    NetSetMtu = 20, "NET_SET_MTU", Exact(8), None, OnNeedReply => NetSetMtu;
    /// 21 `SET_BACKEND_REQ_FD` (formerly `SET_SLAVE_REQ_FD`): back-end request channel.
    SetBackendReqFd = 21, "SET_BACKEND_REQ_FD", Exact(0), Exactly(1), OnNeedReply => SetBackendReqFd;
    /// 22 `IOTLB_MSG`: IOTLB update / invalidate.
    // `struct vhost_iotlb_msg`: 3 × u64 + 2 × u8, padded to 32 by C alignment.
    IotlbMsg = 22, "IOTLB_MSG", Exact(32), None, Always => IotlbMsg;
    /// 23 `SET_VRING_ENDIAN`: ring endianness for legacy devices.
    SetVringEndian = 23, "SET_VRING_ENDIAN", Exact(8), None, OnNeedReply => SetVringEndian;
    /// 24 `GET_CONFIG`: read device config space.
    GetConfig = 24, "GET_CONFIG", DeviceConfig, None, Always => GetConfig;
    /// 25 `SET_CONFIG`: write device config space.
    SetConfig = 25, "SET_CONFIG", DeviceConfig, None, OnNeedReply => SetConfig;
    /// 26 `CREATE_CRYPTO_SESSION`.
    CreateCryptoSession = 26, "CREATE_CRYPTO_SESSION", Unspecified, None, Always;
    /// 27 `CLOSE_CRYPTO_SESSION`.
    CloseCryptoSession = 27, "CLOSE_CRYPTO_SESSION", Exact(8), None, OnNeedReply => CloseCryptoSession;
    /// 28 `POSTCOPY_ADVISE`.
    PostcopyAdvise = 28, "POSTCOPY_ADVISE", Exact(0), None, Always => PostcopyAdvise;
    /// 29 `POSTCOPY_LISTEN`.
    PostcopyListen = 29, "POSTCOPY_LISTEN", Exact(0), None, OnNeedReply => PostcopyListen;
    /// 30 `POSTCOPY_END`.
    PostcopyEnd = 30, "POSTCOPY_END", Exact(0), None, Always => PostcopyEnd;
    /// 31 `GET_INFLIGHT_FD`: back-end allocates the inflight buffer.
    // "Inflight description": 2 × u64 + 2 × u16, padded to 24 by C alignment.
    // No fd on the request (CVE-2022-0669); the reply carries one.
    GetInflightFd = 31, "GET_INFLIGHT_FD", Exact(24), None, IfProtocolFeature(ProtocolFeatures::INFLIGHT_SHMFD) => GetInflightFd;
    /// 32 `SET_INFLIGHT_FD`: front-end hands the inflight buffer back.
    SetInflightFd = 32, "SET_INFLIGHT_FD", Exact(24), Exactly(1), OnNeedReply => SetInflightFd;
    /// 33 `GPU_SET_SOCKET`: vhost-user-gpu protocol socket.
    GpuSetSocket = 33, "GPU_SET_SOCKET", Exact(0), Exactly(1), OnNeedReply => GpuSetSocket;
    /// 34 `RESET_DEVICE`: reset all device state.
    ResetDevice = 34, "RESET_DEVICE", Exact(0), None, OnNeedReply => ResetDevice;
    /// 35 `VRING_KICK`: in-band kick.
    VringKick = 35, "VRING_KICK", Exact(8), None, OnNeedReply => VringKick;
    /// 36 `GET_MAX_MEM_SLOTS`: reply `u64` memory slot count.
    GetMaxMemSlots = 36, "GET_MAX_MEM_SLOTS", Exact(0), None, Always => GetMaxMemSlots;
    /// 37 `ADD_MEM_REG`: add one memory region (one fd).
    // "Single memory region description": u64 padding + region.
    AddMemReg = 37, "ADD_MEM_REG", Exact(40), Exactly(1), Postcopy => AddMemReg;
    /// 38 `REM_MEM_REG`: remove one memory region.
    RemMemReg = 38, "REM_MEM_REG", Exact(40), ZeroOrOneClosed, OnNeedReply => RemMemReg;
    /// 39 `SET_STATUS`: virtio device status.
    SetStatus = 39, "SET_STATUS", Exact(8), None, OnNeedReply => SetStatus;
    /// 40 `GET_STATUS`: reply `u64` device status.
    GetStatus = 40, "GET_STATUS", Exact(0), None, Always => GetStatus;
    /// 41 `GET_SHARED_OBJECT`: dma-buf for a UUID.
    GetSharedObject = 41, "GET_SHARED_OBJECT", Exact(16), None, Always => GetSharedObject;
    /// 42 `SET_DEVICE_STATE_FD`: migration state channel.
    SetDeviceStateFd = 42, "SET_DEVICE_STATE_FD", Exact(8), Exactly(1), Always => SetDeviceStateFd;
    /// 43 `CHECK_DEVICE_STATE`: result of the state transfer.
    CheckDeviceState = 43, "CHECK_DEVICE_STATE", Exact(0), None, Always => CheckDeviceState;
    /// 44 `GET_SHMEM_CONFIG`: VIRTIO Shared Memory Regions (protocol feature `SHMEM`, newer than
    /// QEMU 7.2).
    GetShmemConfig = 44, "GET_SHMEM_CONFIG", Exact(0), None, Always => GetShmemConfig;
}

impl Request {
    /// Whether the back-end must send a reply to this request.
    ///
    /// - [`ReplyRule::Always`]: yes ("Communication" list and every request with a defined
    ///   reply payload).
    /// - [`ReplyRule::IfProtocolFeature`]: yes when that feature is in `acked_protocol_features`.
    /// - Otherwise only when the front-end set [`FLAG_NEED_REPLY`] **and** `REPLY_ACK` was
    ///   negotiated ("With this protocol extension negotiated, the sender (QEMU) can set the
    ///   need_reply [Bit 3] flag to any command"). The reply is then a `u64`, 0 on success
    ///   ([`encode_ack`](super::encode_ack)); for requests that already have a reply body, `need_reply` "brings no
    ///   behavioural change" — send the body once.
    ///
    /// [`ReplyRule::Postcopy`] replies (after `POSTCOPY_LISTEN`) are not covered: this back-end
    /// does not offer `PAGEFAULT`.
    pub const fn reply_required(self, flags: u32, acked_protocol_features: ProtocolFeatures) -> bool {
        let ack = flags & FLAG_NEED_REPLY != 0 && acked_protocol_features.contains(ProtocolFeatures::REPLY_ACK);
        match self.spec().reply {
            ReplyRule::Always => true,
            ReplyRule::IfProtocolFeature(feature) => acked_protocol_features.intersects(feature) || ack,
            ReplyRule::OnNeedReply | ReplyRule::Postcopy => ack,
        }
    }
}

impl TryFrom<u32> for Request {
    type Error = MessageError;

    fn try_from(code: u32) -> Result<Request, MessageError> {
        Request::from_code(code).ok_or(MessageError::UnknownRequest(code))
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
    /// Always when this protocol feature is negotiated.
    IfProtocolFeature(ProtocolFeatures),
    /// With a reply body only in postcopy mode (after `POSTCOPY_LISTEN`); otherwise as
    /// [`ReplyRule::OnNeedReply`].
    Postcopy,
    /// Only a `REPLY_ACK` `u64` status, when `need_reply` is set and `REPLY_ACK` negotiated.
    OnNeedReply,
}
