//! Block requests (VIRTIO 1.2 §5.2.6 "Device Operation"): `struct virtio_blk_req`, the request
//! types, the status byte, and the device's checks on a request chain.
//!
//! A request is one descriptor chain (§5.2.6):
//!
//! ```text
//! struct virtio_blk_req {
//!     le32 type;          // device-readable header, 16 bytes
//!     le32 reserved;
//!     le64 sector;
//!     u8 data[];          // device-readable (OUT, DISCARD, WRITE_ZEROES) or -writable (IN, GET_ID)
//!     u8 status;          // the last device-writable byte
//! };
//! ```
//!
//! With `VIRTIO_F_VERSION_1` (ANY_LAYOUT) the driver may split these parts over descriptors as
//! it likes (§2.7.4): the header over several descriptors, the data sharing a descriptor with
//! the header or the status byte. So the rules are on byte offsets in the chain's readable and
//! writable parts, never on descriptor boundaries: the header is the first 16 readable bytes,
//! the status byte the last writable byte, the data what lies between.
//!
//! Everything the device takes from guest memory (the header, each discard / write-zeroes
//! segment) is copied out once and validated on the copy; a guest rewriting it afterwards
//! changes nothing (hostile-inputs family 7, DPDK CVE-2020-14375).

use core::fmt;

use super::config::{BlkConfig, ID_BYTES, SECTOR_SIZE};
use crate::chain::{Chain, ChainError, Segment};
use crate::features::VirtioFeatures;
use crate::mem::GuestMemory;
use crate::queue::SplitQueue;

/// Bytes of the request header (`type`, `reserved`, `sector`).
pub const REQ_HEADER_LEN: usize = 16;

/// Bytes of one `struct virtio_blk_discard_write_zeroes` segment (§5.2.6).
pub const SEGMENT_LEN: usize = 16;

/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`: bit 0 of a segment's `flags` (§5.2.6).
const FLAG_UNMAP: u32 = 1;

/// The request types this core serves (§5.2.6). Others (`GET_LIFETIME`, `SECURE_ERASE`, the
/// zoned commands) belong to features it does not offer: [`RequestError::UnknownType`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN` (0): read sectors into the device-writable data.
    In,
    /// `VIRTIO_BLK_T_OUT` (1): write the device-readable data to sectors.
    Out,
    /// `VIRTIO_BLK_T_FLUSH` (4): make completed writes stable.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID` (8): the device ID string into the device-writable data.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD` (11): the data is a list of segments the device may deallocate.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES` (13): the data is a list of segments to read as zeroes.
    WriteZeroes,
}

impl RequestType {
    /// The `type` field value.
    pub const fn code(self) -> u32 {
        match self {
            RequestType::In => 0,
            RequestType::Out => 1,
            RequestType::Flush => 4,
            RequestType::GetId => 8,
            RequestType::Discard => 11,
            RequestType::WriteZeroes => 13,
        }
    }

    /// The type with this `type` field value, if it is one this core serves.
    pub const fn from_code(code: u32) -> Option<RequestType> {
        Some(match code {
            0 => RequestType::In,
            1 => RequestType::Out,
            4 => RequestType::Flush,
            8 => RequestType::GetId,
            11 => RequestType::Discard,
            13 => RequestType::WriteZeroes,
            _ => return None,
        })
    }

    /// Whether the data is device-writable (IN, GET_ID) rather than device-readable.
    const fn data_writable(self) -> bool {
        matches!(self, RequestType::In | RequestType::GetId)
    }
}

/// The status byte (§5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum Status {
    /// `VIRTIO_BLK_S_OK`.
    Ok = 0,
    /// `VIRTIO_BLK_S_IOERR`.
    IoErr = 1,
    /// `VIRTIO_BLK_S_UNSUPP`.
    Unsupp = 2,
}

/// Limits of discard or write-zeroes requests (§5.2.4 `max_*_sectors`, `max_*_seg`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentLimits {
    /// Sectors per segment at most.
    pub max_sectors: u32,
    /// Segments per request at most.
    pub max_segments: u32,
}

/// What a device checks requests against: its size and what was negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `capacity` in 512-byte sectors.
    pub capacity: u64,
    /// The device offered `VIRTIO_BLK_F_RO`: every write is refused (§5.2.6.2 "MUST set the
    /// status byte to VIRTIO_BLK_S_IOERR for a write request if the VIRTIO_BLK_F_RO feature if
    /// offered, and MUST NOT write any data"), whether or not the driver accepted the bit.
    pub read_only: bool,
    /// Discard limits, `Some` when `VIRTIO_BLK_F_DISCARD` was negotiated.
    pub discard: Option<SegmentLimits>,
    /// Write-zeroes limits, `Some` when `VIRTIO_BLK_F_WRITE_ZEROES` was negotiated.
    pub write_zeroes: Option<SegmentLimits>,
}

impl Limits {
    /// The limits of a device with configuration `config`, `negotiated` features, and
    /// `read_only` if it offered `VIRTIO_BLK_F_RO`.
    pub fn new(config: &BlkConfig, negotiated: VirtioFeatures, read_only: bool) -> Limits {
        let discard = negotiated
            .contains(VirtioFeatures::BLK_DISCARD)
            .then_some(SegmentLimits { max_sectors: config.max_discard_sectors, max_segments: config.max_discard_seg });
        let write_zeroes = negotiated.contains(VirtioFeatures::BLK_WRITE_ZEROES).then_some(SegmentLimits {
            max_sectors: config.max_write_zeroes_sectors,
            max_segments: config.max_write_zeroes_seg,
        });
        Limits { capacity: config.capacity, read_only, discard, write_zeroes }
    }
}

/// A request that cannot be served. Each variant names the rule; [`RequestError::status`]
/// is what the driver gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RequestError {
    /// The chain has no device-writable byte, so there is no status byte to answer in
    /// (§5.2.6: `status` is device-writable). The chain is completed with used length 0.
    NoStatus,
    /// The queue's walk refused the chain (a rule of §2.7.5: a readable buffer after a
    /// writable one, a buffer outside guest memory, more buffers than the device takes, ...),
    /// so it was never parsed. It still gets `VIRTIO_BLK_S_IOERR` in its last byte when it ends
    /// in a device-writable buffer ([`complete_malformed`]), used length 0 otherwise.
    Malformed {
        /// What the walk found.
        error: ChainError,
    },
    /// The device-readable part is shorter than the 16-byte header (family 9).
    HeaderTooShort {
        /// Device-readable bytes in the chain.
        len: u32,
    },
    /// A `type` this device does not serve (§5.2.6.2: `VIRTIO_BLK_S_UNSUPP`).
    UnknownType {
        /// The `type` field.
        code: u32,
    },
    /// DISCARD or WRITE_ZEROES without its feature negotiated (`VIRTIO_BLK_S_UNSUPP`).
    NotNegotiated {
        /// The request type.
        kind: RequestType,
    },
    /// A write (OUT, DISCARD, WRITE_ZEROES) to a read-only device (§5.2.6.2).
    ReadOnly {
        /// The request type.
        kind: RequestType,
    },
    /// Data in the wrong direction for the type: device-readable data after the header of an
    /// IN or GET_ID request, or device-writable bytes before the status byte of an OUT,
    /// DISCARD or WRITE_ZEROES request (family 6).
    DataDirection {
        /// The request type.
        kind: RequestType,
    },
    /// IN or OUT data whose length is not a multiple of 512 (§5.2.6.1 "MUST be a multiple of
    /// 512 bytes").
    NotSectorMultiple {
        /// Data bytes.
        len: u32,
    },
    /// A range that ends beyond `capacity`, or whose end overflows 64 bits (§5.2.6.1 "MUST
    /// NOT submit a request which would cause a read or write beyond capacity").
    BeyondCapacity {
        /// First sector.
        sector: u64,
        /// Sectors.
        sectors: u64,
    },
    /// DISCARD or WRITE_ZEROES data that is empty or not a multiple of the 16-byte segment
    /// (§5.2.6.1).
    SegmentLength {
        /// Data bytes.
        len: u32,
    },
    /// More segments than `max_discard_seg` / `max_write_zeroes_seg`, or than the caller's
    /// segment buffer holds (§5.2.6.1).
    TooManySegments {
        /// Segments in the request.
        count: u32,
        /// Segments allowed.
        max: u32,
    },
    /// A segment with unknown `flags` bits, or `UNMAP` on a discard (§5.2.6.2 "MUST set the
    /// status byte to VIRTIO_BLK_S_UNSUPP ... if any unknown flag is set ... for discard
    /// commands if the unmap flag is set").
    SegmentFlags {
        /// The `flags` field.
        flags: u32,
    },
    /// A segment of more sectors than `max_discard_sectors` / `max_write_zeroes_sectors`.
    SegmentTooLarge {
        /// `num_sectors`.
        num_sectors: u32,
        /// The limit.
        max: u32,
    },
    /// A GET_ID request whose device-writable data is shorter than the 20-byte ID: the driver
    /// could not tell a cut ID from a whole one.
    IdBufferTooShort {
        /// Data bytes.
        len: u32,
    },
}

impl RequestError {
    /// The status byte the driver gets, `None` when there is no status byte
    /// ([`RequestError::NoStatus`]: complete with used length 0).
    pub const fn status(&self) -> Option<Status> {
        match self {
            RequestError::NoStatus => None,
            RequestError::UnknownType { .. }
            | RequestError::NotNegotiated { .. }
            | RequestError::SegmentFlags { .. } => Some(Status::Unsupp),
            _ => Some(Status::IoErr),
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::NoStatus => f.write_str("block request without a device-writable status byte"),
            RequestError::Malformed { error } => write!(f, "block request chain refused: {error}"),
            RequestError::HeaderTooShort { len } => write!(f, "block request of {len} readable bytes has no header"),
            RequestError::UnknownType { code } => write!(f, "block request type {code} not supported"),
            RequestError::NotNegotiated { kind } => write!(f, "block request {kind:?} without its feature"),
            RequestError::ReadOnly { kind } => write!(f, "block request {kind:?} on a read-only device"),
            RequestError::DataDirection { kind } => {
                write!(f, "block request {kind:?} with data in the wrong direction")
            }
            RequestError::NotSectorMultiple { len } => {
                write!(f, "block request data of {len} bytes is not whole sectors")
            }
            RequestError::BeyondCapacity { sector, sectors } => {
                write!(f, "block request for {sectors} sectors at {sector} beyond capacity")
            }
            RequestError::SegmentLength { len } => write!(f, "{len} bytes of discard/write-zeroes segments"),
            RequestError::TooManySegments { count, max } => write!(f, "{count} segments, at most {max} allowed"),
            RequestError::SegmentFlags { flags } => write!(f, "segment flags {flags:#x} not supported"),
            RequestError::SegmentTooLarge { num_sectors, max } => {
                write!(f, "segment of {num_sectors} sectors, at most {max} allowed")
            }
            RequestError::IdBufferTooShort { len } => write!(f, "GET_ID buffer of {len} bytes, {ID_BYTES} needed"),
        }
    }
}

/// A validated request: its type, first sector and data length. The data is where
/// [`data_pieces`] finds it; DISCARD / WRITE_ZEROES segments are read with [`read_segments`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The request type.
    pub kind: RequestType,
    /// `sector` as the driver wrote it (checked against capacity for IN and OUT; FLUSH,
    /// GET_ID, DISCARD and WRITE_ZEROES do not use it).
    pub sector: u64,
    /// Data bytes: device-writable bytes before the status byte (IN, GET_ID), device-readable
    /// bytes after the header (OUT, DISCARD, WRITE_ZEROES), 0 for FLUSH.
    pub data_len: u32,
}

impl Request {
    /// Byte offset of an IN or OUT request (`sector * 512`; [`parse`] checked that it does not
    /// overflow).
    pub const fn offset(&self) -> u64 {
        self.sector.wrapping_mul(SECTOR_SIZE)
    }

    /// Segments of a DISCARD or WRITE_ZEROES request.
    pub const fn segments(&self) -> u32 {
        self.data_len / SEGMENT_LEN as u32
    }
}

/// Parses and validates the request in `chain` (§5.2.6) against `limits`. The header is
/// copied out once; the data stays in guest memory ([`data_pieces`]).
///
/// Rules, in order, each with its own [`RequestError`]: a status byte exists (the last
/// writable byte), the readable part holds the 16-byte header, the type is served and (for
/// DISCARD and WRITE_ZEROES) negotiated, writes are refused on a read-only device, the data
/// is in the type's direction, then the type's own rules (IN/OUT: whole sectors within
/// capacity; GET_ID: room for the 20-byte ID; DISCARD/WRITE_ZEROES: whole segments, not more
/// than the limit). FLUSH tolerates data (the driver "SHOULD NOT" send any) and ignores it.
pub fn parse<const N: usize>(chain: &Chain<'_, N>, limits: &Limits) -> Result<Request, RequestError> {
    let writable = chain.writable_len();
    if writable == 0 {
        return Err(RequestError::NoStatus);
    }
    let readable = chain.readable_len();
    if (readable as usize) < REQ_HEADER_LEN {
        return Err(RequestError::HeaderTooShort { len: readable });
    }
    let mut h = [0u8; REQ_HEADER_LEN];
    chain.read_at(0, &mut h);
    let code = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    let kind = RequestType::from_code(code).ok_or(RequestError::UnknownType { code })?;
    let segment_limits = match kind {
        RequestType::Discard => Some(limits.discard.ok_or(RequestError::NotNegotiated { kind })?),
        RequestType::WriteZeroes => Some(limits.write_zeroes.ok_or(RequestError::NotNegotiated { kind })?),
        _ => None,
    };
    let writes = matches!(kind, RequestType::Out | RequestType::Discard | RequestType::WriteZeroes);
    if writes && limits.read_only {
        return Err(RequestError::ReadOnly { kind });
    }
    let out_data = readable - REQ_HEADER_LEN as u32;
    let in_data = writable - 1;
    let data_len = match kind {
        RequestType::Flush => 0,
        _ if kind.data_writable() && out_data != 0 => return Err(RequestError::DataDirection { kind }),
        _ if !kind.data_writable() && in_data != 0 => return Err(RequestError::DataDirection { kind }),
        _ if kind.data_writable() => in_data,
        _ => out_data,
    };
    match (kind, segment_limits) {
        (RequestType::In | RequestType::Out, _) => check_range(sector, data_len, limits.capacity)?,
        (RequestType::GetId, _) if (data_len as usize) < ID_BYTES => {
            return Err(RequestError::IdBufferTooShort { len: data_len })
        }
        (_, Some(seg)) => {
            if data_len == 0 || !(data_len as usize).is_multiple_of(SEGMENT_LEN) {
                return Err(RequestError::SegmentLength { len: data_len });
            }
            let count = data_len / SEGMENT_LEN as u32;
            if count > seg.max_segments {
                return Err(RequestError::TooManySegments { count, max: seg.max_segments });
            }
        }
        _ => {}
    }
    Ok(Request { kind, sector, data_len })
}

/// Whole sectors, within capacity, at an offset that fits 64 bits.
fn check_range(sector: u64, len: u32, capacity: u64) -> Result<(), RequestError> {
    if !(len as u64).is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::NotSectorMultiple { len });
    }
    within_capacity(sector, len as u64 / SECTOR_SIZE, capacity)
}

/// `sector..sector + sectors` lies within `capacity`, and its byte offsets fit 64 bits.
fn within_capacity(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity && end.checked_mul(SECTOR_SIZE).is_some() => Ok(()),
        _ => Err(RequestError::BeyondCapacity { sector, sectors }),
    }
}

/// One `struct virtio_blk_discard_write_zeroes` (§5.2.6), copied out and validated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscardSegment {
    /// First sector.
    pub sector: u64,
    /// Sectors.
    pub num_sectors: u32,
    /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP` (write-zeroes only): the device may deallocate
    /// the range, as long as it reads as zeroes afterwards.
    pub unmap: bool,
}

impl DiscardSegment {
    /// Byte offset of the first sector ([`read_segments`] checked that it does not overflow).
    pub const fn offset(&self) -> u64 {
        self.sector.wrapping_mul(SECTOR_SIZE)
    }

    /// Length in bytes.
    pub const fn len(&self) -> u64 {
        self.num_sectors as u64 * SECTOR_SIZE
    }

    /// Whether the segment covers no sector (allowed: nothing to do).
    pub const fn is_empty(&self) -> bool {
        self.num_sectors == 0
    }
}

/// Copies the segments of a DISCARD or WRITE_ZEROES request (parsed by [`parse`] from the
/// same `chain`) into `out`, each once, and validates every one before the device acts on
/// any: flags (`VIRTIO_BLK_S_UNSUPP` for unknown bits, and for `UNMAP` on a discard), size
/// against the limit, range within capacity. Returns the segments. `out` bounds the count
/// without allocation: a request with more segments than `out` holds is refused as
/// [`RequestError::TooManySegments`] (size `out` to the `max_*_seg` the device offers).
pub fn read_segments<'o, const N: usize>(
    chain: &Chain<'_, N>,
    req: &Request,
    limits: &Limits,
    out: &'o mut [DiscardSegment],
) -> Result<&'o [DiscardSegment], RequestError> {
    let kind = req.kind;
    let seg = match kind {
        RequestType::Discard => limits.discard,
        RequestType::WriteZeroes => limits.write_zeroes,
        _ => None,
    }
    .ok_or(RequestError::NotNegotiated { kind })?;
    let count = req.segments();
    if count as usize > out.len() {
        return Err(RequestError::TooManySegments { count, max: out.len() as u32 });
    }
    for (i, slot) in out[..count as usize].iter_mut().enumerate() {
        let mut raw = [0u8; SEGMENT_LEN];
        if chain.read_at(REQ_HEADER_LEN + i * SEGMENT_LEN, &mut raw) != SEGMENT_LEN {
            // `parse` of this chain counted these bytes: only another chain gets here.
            return Err(RequestError::SegmentLength {
                len: chain.readable_len().saturating_sub(REQ_HEADER_LEN as u32),
            });
        }
        let sector = u64::from_le_bytes([raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7]]);
        let num_sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
        let unmap = flags & FLAG_UNMAP != 0;
        if flags & !FLAG_UNMAP != 0 || (unmap && kind == RequestType::Discard) {
            return Err(RequestError::SegmentFlags { flags });
        }
        if num_sectors > seg.max_sectors {
            return Err(RequestError::SegmentTooLarge { num_sectors, max: seg.max_sectors });
        }
        within_capacity(sector, num_sectors as u64, limits.capacity)?;
        *slot = DiscardSegment { sector, num_sectors, unmap };
    }
    Ok(&out[..count as usize])
}

/// The host pieces of a request's data, in order: `(pointer, length)` of each host-contiguous
/// piece, ready for `preadv`/`pwritev` or a DMA engine. Guest memory: the pointers are for
/// raw access (or the kernel) only, never for Rust references, and valid as long as the
/// chain's memory is.
#[derive(Clone, Debug)]
pub struct DataPieces<'c, 'm> {
    segs: core::slice::Iter<'c, Segment<'m>>,
    skip: usize,
    left: usize,
}

impl Iterator for DataPieces<'_, '_> {
    type Item = (*mut u8, usize);

    fn next(&mut self) -> Option<(*mut u8, usize)> {
        while self.left > 0 {
            let seg = self.segs.next()?;
            if self.skip >= seg.len() {
                self.skip -= seg.len();
                continue;
            }
            let n = (seg.len() - self.skip).min(self.left);
            // `skip < seg.len()`: the pointer stays inside the segment.
            let ptr = seg.as_ptr().wrapping_add(self.skip);
            self.skip = 0;
            self.left -= n;
            return Some((ptr, n));
        }
        None
    }
}

/// The data of `req` (parsed by [`parse`] from `chain`): for IN and GET_ID the device-writable
/// bytes before the status byte, for OUT the device-readable bytes after the header, nothing
/// for FLUSH, DISCARD and WRITE_ZEROES (their segments are read with [`read_segments`]).
pub fn data_pieces<'c, 'm, const N: usize>(chain: &'c Chain<'m, N>, req: &Request) -> DataPieces<'c, 'm> {
    let (segs, skip, left) = match req.kind {
        RequestType::In | RequestType::GetId => (chain.writable(), 0, req.data_len as usize),
        RequestType::Out => (chain.readable(), REQ_HEADER_LEN, req.data_len as usize),
        _ => (chain.readable(), 0, 0),
    };
    DataPieces { segs: segs.iter(), skip, left }
}

/// Completes a request: writes `status` into the status byte (the chain's last writable byte)
/// and returns the used length to report, `written` data bytes plus the status byte (§2.7.8:
/// the bytes written into the buffer). A chain without a writable byte gets 0.
pub fn complete<const N: usize>(chain: &Chain<'_, N>, written: u32, status: Status) -> u32 {
    let writable = chain.writable_len();
    if writable == 0 {
        return 0;
    }
    chain.write_at(writable as usize - 1, &[status as u8]);
    written.min(writable - 1) + 1
}

/// Completes a request that failed with `err`: its status byte, used length 1; or used length
/// 0 when there is no status byte.
pub fn complete_error<const N: usize>(chain: &Chain<'_, N>, err: &RequestError) -> u32 {
    match err.status() {
        Some(status) => complete(chain, 0, status),
        None => 0,
    }
}

/// Completes the chain at `head` that `queue`'s walk refused with `error` (taken with
/// [`SplitQueue::pop_into_uncompleted`]): writes the status of
/// [`RequestError::Malformed`] (`VIRTIO_BLK_S_IOERR`) into the chain's last byte when the
/// chain ends in a device-writable buffer ([`SplitQueue::write_last_byte`]), and returns the
/// used length to push for `head`: 1 for the status byte, or 0 when the chain has no usable
/// status byte (it cannot be followed to its end, ends in a device-readable buffer, or its
/// last byte is not in guest memory).
///
/// §5.2.6: the status is the last device-writable byte, and the driver reads it as the
/// request's outcome whatever else happened. A chain completed without it would leave the
/// driver whatever that byte held before, `VIRTIO_BLK_S_OK` as likely as not.
pub fn complete_malformed<M: GuestMemory + ?Sized>(queue: &SplitQueue<'_, M>, head: u16, error: ChainError) -> u32 {
    match (RequestError::Malformed { error }).status() {
        Some(status) if queue.write_last_byte(head, status as u8).is_some() => 1,
        _ => 0,
    }
}
