//! "Protocol features": the `VHOST_USER_PROTOCOL_F_*` bits exchanged by
//! `GET/SET_PROTOCOL_FEATURES`, and the two virtio feature bits vhost-user itself defines.

use bitflags::bitflags;
use virtq::VirtioFeatures;

/// Virtio feature bit 30, `VHOST_USER_F_PROTOCOL_FEATURES`: the back-end supports
/// `GET/SET_PROTOCOL_FEATURES` ("Communication"). Always offered by this back-end. The core
/// names the bit too ([`VirtioFeatures::VHOST_USER_PROTOCOL_FEATURES`]); this is that bit.
pub const VHOST_USER_F_PROTOCOL_FEATURES: VirtioFeatures = VirtioFeatures::VHOST_USER_PROTOCOL_FEATURES;

/// Virtio feature bit 26, `VHOST_F_LOG_ALL`: the front-end may ask for dirty logging
/// ("Migration"). A device offers it only if its data path logs every write to guest memory.
pub const VHOST_F_LOG_ALL: VirtioFeatures = VirtioFeatures::from_bits_retain(1 << 26);

bitflags! {
    /// `VHOST_USER_PROTOCOL_F_*` ("Protocol features"): the value exchanged by
    /// `GET_PROTOCOL_FEATURES` / `SET_PROTOCOL_FEATURES`. Each constant documents its bit
    /// number. Unknown bits are retained, so that a front-end's acknowledgement of a bit that
    /// was not offered can be reported.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct ProtocolFeatures: u64 {
        /// Bit 0, `MQ`: `GET_QUEUE_NUM` ("Multiple queue support").
        const MQ = 1 << 0;
        /// Bit 1, `LOG_SHMFD`: the dirty log is a shared-memory fd sent with `SET_LOG_BASE`.
        const LOG_SHMFD = 1 << 1;
        /// Bit 2, `RARP`: `SEND_RARP`.
        const RARP = 1 << 2;
        /// Bit 3, `REPLY_ACK`: the front-end may set `need_reply` on any request.
        const REPLY_ACK = 1 << 3;
        /// Bit 4, `MTU` (the message text calls it `NET_MTU`): `NET_SET_MTU`.
        const NET_MTU = 1 << 4;
        /// Bit 5, `BACKEND_REQ` (formerly `SLAVE_REQ`): `SET_BACKEND_REQ_FD`.
        const BACKEND_REQ = 1 << 5;
        /// Bit 6, `CROSS_ENDIAN`: `SET_VRING_ENDIAN`.
        const CROSS_ENDIAN = 1 << 6;
        /// Bit 7, `CRYPTO_SESSION`: `CREATE/CLOSE_CRYPTO_SESSION`.
        const CRYPTO_SESSION = 1 << 7;
        /// Bit 8, `PAGEFAULT`: postcopy migration (`POSTCOPY_*`).
        const PAGEFAULT = 1 << 8;
        /// Bit 9, `CONFIG`: `GET_CONFIG` / `SET_CONFIG`.
        const CONFIG = 1 << 9;
        /// Bit 10, `BACKEND_SEND_FD` (formerly `SLAVE_SEND_FD`): fds on back-end requests.
        const BACKEND_SEND_FD = 1 << 10;
        /// Bit 11, `HOST_NOTIFIER`: `BACKEND_VRING_HOST_NOTIFIER_MSG`.
        const HOST_NOTIFIER = 1 << 11;
        /// Bit 12, `INFLIGHT_SHMFD`: `GET_INFLIGHT_FD` / `SET_INFLIGHT_FD`.
        const INFLIGHT_SHMFD = 1 << 12;
        /// Bit 13, `RESET_DEVICE`: `RESET_DEVICE`.
        const RESET_DEVICE = 1 << 13;
        /// Bit 14, `INBAND_NOTIFICATIONS`: `VRING_KICK` and back-end `VRING_CALL/ERR` messages.
        const INBAND_NOTIFICATIONS = 1 << 14;
        /// Bit 15, `CONFIGURE_MEM_SLOTS`: `GET_MAX_MEM_SLOTS`, `ADD_MEM_REG`, `REM_MEM_REG`.
        const CONFIGURE_MEM_SLOTS = 1 << 15;
        /// Bit 16, `STATUS`: `SET_STATUS` / `GET_STATUS`.
        const STATUS = 1 << 16;
        /// Bit 17, `XEN_MMAP`: memory regions carry two extra `u32` fields (not supported here).
        const XEN_MMAP = 1 << 17;
        /// Bit 18, `SHARED_OBJECT`: `GET_SHARED_OBJECT` and the back-end shared-object messages.
        const SHARED_OBJECT = 1 << 18;
        /// Bit 19, `DEVICE_STATE`: `SET_DEVICE_STATE_FD` / `CHECK_DEVICE_STATE`.
        const DEVICE_STATE = 1 << 19;
        /// Bit 20, `SHMEM`: `GET_SHMEM_CONFIG` and back-end `SHMEM_MAP/UNMAP` (added to the spec by
        /// the 2025–2026 VIRTIO Shared Memory series; newer than QEMU 7.2).
        const SHMEM = 1 << 20;
    }
}
