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
//! [`MemoryRegionDesc`]: crate::memory::MemoryRegionDesc
//! [`MemoryRegionDesc::validate`]: crate::memory::MemoryRegionDesc::validate
//! [`OwnedFd`]: std::os::fd::OwnedFd
//!
//! ## Layout of a round trip
//! ```text
//! read 12 bytes ─► Header::parse ─► read header.size bytes (+ SCM_RIGHTS fds)
//!              ─► FrontendMessage::decode(&header, payload, fds) ─► device
//!              ─► Request::reply_required(header.flags, acked protocol features)
//!              ─► encode_* reply ─► write
//! ```
//!
//! ## Modules, one concern each
//! | module | vhost-user.rst | what |
//! |---|---|---|
//! | [`header`] | "Message Specification" → "Header" | the 12-byte header, flags, size limits |
//! | [`features`] | "Protocol features" | `VHOST_USER_PROTOCOL_F_*`, the vhost-user virtio feature bits |
//! | [`request`] | "Front-end message types", "Communication" | **the** request table: codes, names, payload / fd / reply rules, from one list |
//! | [`payload`] | "Payload" | payload structures and their wire forms |
//! | [`decode`] | "Front-end message types" | [`FrontendMessage`]: each request's payload decoded, fds owned |
//! | [`reply`] | "Communication", "Back-end message types" | reply and back-end message encoding |
//! | [`error`] | — | [`MessageError`] |
//!
//! Everything is re-exported here, so `crate::message::X` names every item.

pub mod decode;
pub mod error;
pub mod features;
pub mod header;
pub mod payload;
pub mod reply;
pub mod request;

pub use decode::FrontendMessage;
pub use error::MessageError;
pub use features::{ProtocolFeatures, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES};
pub use header::{
    Header, CONFIG_HEADER_SIZE, FLAGS_KNOWN, FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION_MASK, HEADER_SIZE,
    MAX_CONFIG_SIZE, MAX_FDS, MAX_MEM_REGIONS, MAX_PAYLOAD, MEMORY_REGION_SIZE, VERSION_1,
};
pub use payload::{
    Inflight, IotlbMessage, CONFIG_FLAGS_MIGRATION, CONFIG_FLAGS_WRITABLE, VRING_F_LOG, VRING_INDEX_MASK,
    VRING_INVALID_FD_FLAG,
};
pub use reply::{
    encode_ack, encode_backend_request, encode_get_config_error, encode_get_config_reply, encode_get_inflight_fd_reply,
    encode_get_status_reply, encode_reply, encode_u64_reply, encode_vring_state_reply, BACKEND_CONFIG_CHANGE_MSG,
};
pub use request::{FdRule, PayloadRule, ReplyRule, Request, RequestSpec};

#[cfg(test)]
mod tests;
