//! "Protocol features": the `VHOST_USER_PROTOCOL_F_*` bits exchanged by
//! `GET/SET_PROTOCOL_FEATURES`, and the two virtio feature bits vhost-user itself defines.

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
