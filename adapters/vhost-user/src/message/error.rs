//! Why a front-end message was rejected ([`MessageError`]).

use std::fmt;

use super::{Request, HEADER_SIZE, MAX_CONFIG_SIZE, MAX_MEM_REGIONS};

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
    /// Flag bits outside [`FLAGS_KNOWN`](super::FLAGS_KNOWN) are set.
    ReservedFlags {
        /// The whole flags word.
        flags: u32,
    },
    /// Header `size` exceeds [`MAX_PAYLOAD`](super::MAX_PAYLOAD).
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
