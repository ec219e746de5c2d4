//! "Message Specification" → "Header": the 12-byte header every message starts with, its flag
//! bits, and the payload size limit enforced before any payload byte is read (family 12).

use super::{MessageError, Request};

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
