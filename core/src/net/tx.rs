//! Packets from the driver (VIRTIO 1.2 §5.1.6.2, device requirements §5.1.6.2.2).

use core::fmt;

use zerocopy::FromZeros;
use zerocopy::IntoBytes;

use super::header::*;
use crate::chain::Chain;
use crate::features::VirtioFeatures;
use crate::queue::CopiedChain;

/// A transmit chain that cannot be accepted. The chain should be completed with len 0 and the
/// packet dropped (and counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TxError {
    /// The chain has device-writable buffers; a TX chain is read-only (family 6).
    WritableBuffers,
    /// The chain holds no more than the header: there is no packet (DPDK CVE-2022-2132).
    TooShort {
        /// Readable bytes in the chain.
        len: u32,
    },
    /// `NEEDS_CSUM` without `VIRTIO_NET_F_CSUM` negotiated (§5.1.6.2.1: flags must be 0).
    CsumNotNegotiated,
    /// `NEEDS_CSUM` with `csum_start + csum_offset + 2` beyond the frame (DPDK CVE-2024-11614).
    CsumOutOfRange {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// Frame length (without the virtio-net header).
        frame_len: u32,
    },
    /// An unknown GSO type, or one whose HOST_* feature was not negotiated.
    GsoType {
        /// The `gso_type` byte.
        gso_type: u8,
    },
    /// A GSO packet with `gso_size` 0 (DPDK 7023f3e532).
    GsoSizeZero,
    /// Both UDP-tunnel GSO bits set: "MUST NOT accept the packet" (§5.1.6.2.2).
    TunnelBothBits,
    /// The chain holds more bytes than the device's frame buffer ([`parse_tx_copied`]): the
    /// copy was cut short, so the frame is not whole.
    TooLong {
        /// Readable bytes in the chain.
        len: u32,
        /// Bytes the buffer holds.
        capacity: usize,
    },
}

impl fmt::Display for TxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TxError::WritableBuffers => f.write_str("TX chain has device-writable buffers"),
            TxError::TooShort { len } => write!(f, "TX chain of {len} bytes holds no frame"),
            TxError::CsumNotNegotiated => f.write_str("NEEDS_CSUM without VIRTIO_NET_F_CSUM"),
            TxError::CsumOutOfRange { start, offset, frame_len } => {
                write!(f, "checksum at {start}+{offset} outside a {frame_len}-byte frame")
            }
            TxError::GsoType { gso_type } => write!(f, "GSO type {gso_type:#x} not acceptable"),
            TxError::GsoSizeZero => f.write_str("GSO packet with gso_size 0"),
            TxError::TunnelBothBits => f.write_str("both UDP tunnel GSO bits set"),
            TxError::TooLong { len, capacity } => {
                write!(f, "TX chain of {len} bytes exceeds a {capacity}-byte frame buffer")
            }
        }
    }
}

/// A validated transmit packet: the header (copied out once) and where the frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxPacket {
    /// The header as the driver wrote it (for the 10-byte layout, `num_buffers` is 0).
    pub header: VirtioNetHdr,
    /// Bytes of header at the start of the chain (10 or 12); the frame starts here.
    pub header_len: usize,
    /// Frame length in bytes.
    pub frame_len: u32,
}

impl TxPacket {
    /// Copies the frame (without the virtio-net header) into `buf`; returns bytes copied.
    pub fn read_frame<const N: usize>(&self, chain: &Chain<'_, N>, buf: &mut [u8]) -> usize {
        chain.read_at(self.header_len, buf)
    }
}

/// Parses and validates the virtio-net header of a TX chain (the header may be split across
/// any number of descriptors). `hdr_len` is never relied upon (§5.1.6.2.2, "prevent a malicious
/// driver from attacking the device by setting an incorrect hdr_len"); unknown flag bits are
/// ignored; a non-zero `num_buffers` is tolerated.
pub fn parse_tx<const N: usize>(chain: &Chain<'_, N>, features: VirtioFeatures) -> Result<TxPacket, TxError> {
    let header_len = header_len(features);
    let len = chain.readable_len();
    check_chain(chain.writable_len(), len, header_len)?;
    let mut header = VirtioNetHdr::new_zeroed();
    chain.read_at(0, &mut header.as_mut_bytes()[..header_len]);
    let frame_len = len - header_len as u32;
    validate_tx_header(&header, frame_len, features)?;
    Ok(TxPacket { header, header_len, frame_len })
}

/// [`parse_tx`] for a chain that [`SplitQueue::pop_read`](crate::SplitQueue::pop_read) walked and
/// copied into `buf` in one pass (the fastest way to take whole TX chains): the same rules, on
/// the copy. The frame is `buf[header_len..header_len + frame_len]`. A chain longer than `buf`
/// is refused ([`TxError::TooLong`]): its frame was cut.
#[inline]
pub fn parse_tx_copied(chain: &CopiedChain, buf: &[u8], features: VirtioFeatures) -> Result<TxPacket, TxError> {
    let header_len = header_len(features);
    let len = chain.readable_len;
    check_chain(chain.writable_len, len, header_len)?;
    if len as usize > buf.len() || chain.bytes != len {
        return Err(TxError::TooLong { len, capacity: buf.len() });
    }
    let mut header = VirtioNetHdr::new_zeroed();
    // Fixed-size copies (a variable-length one is a memcpy call per frame); `len >
    // header_len` was checked, and `len <= buf.len()`.
    if header_len == 12 {
        header.as_mut_bytes().copy_from_slice(&buf[..12]);
    } else {
        header.as_mut_bytes()[..10].copy_from_slice(&buf[..10]);
    }
    let frame_len = len - header_len as u32;
    validate_tx_header(&header, frame_len, features)?;
    Ok(TxPacket { header, header_len, frame_len })
}

/// The chain-level rules of a TX chain (§5.1.6.2): only device-readable buffers (family 6),
/// and more than the header (DPDK CVE-2022-2132).
#[cfg_attr(not(feature = "small"), inline(always))]
fn check_chain(writable_len: u32, readable_len: u32, header_len: usize) -> Result<(), TxError> {
    if writable_len != 0 {
        return Err(TxError::WritableBuffers);
    }
    if readable_len as usize <= header_len {
        return Err(TxError::TooShort { len: readable_len });
    }
    Ok(())
}

/// The §5.1.6.2.2 checks on a driver-supplied header for a frame of `frame_len` bytes.
///
/// Inlined with the usual header (no GSO) decided in a few instructions: the GSO rules are
/// out of line. Measured with `IMPLS=virtq-net benches/ringbench.sh` (1desc 64 tx): 185 -> see
/// CHANGELOG.
#[inline]
pub fn validate_tx_header(h: &VirtioNetHdr, frame_len: u32, features: VirtioFeatures) -> Result<(), TxError> {
    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        if !features.contains(VirtioFeatures::NET_CSUM) {
            return Err(TxError::CsumNotNegotiated);
        }
        if !csum_field_fits(h, frame_len as usize) {
            let (start, offset) = (h.csum_start.get(), h.csum_offset.get());
            return Err(TxError::CsumOutOfRange { start, offset, frame_len });
        }
    }
    if h.gso_type == VIRTIO_NET_HDR_GSO_NONE {
        return Ok(());
    }
    validate_gso(h, features)
}

/// The GSO part of [`validate_tx_header`], for a header whose `gso_type` is not
/// `VIRTIO_NET_HDR_GSO_NONE`.
#[inline(never)]
fn validate_gso(h: &VirtioNetHdr, features: VirtioFeatures) -> Result<(), TxError> {
    let gso_type = h.gso_type;
    let tunnel = VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4 | VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6;
    if gso_type & tunnel == tunnel {
        return Err(TxError::TunnelBothBits);
    }
    if gso_type & VIRTIO_NET_HDR_GSO_ECN != 0 && !features.contains(VirtioFeatures::NET_HOST_ECN) {
        return Err(TxError::GsoType { gso_type });
    }
    // The core does not offer UDP-tunnel GSO, so any tunnel bit is unnegotiated. `GSO_NONE`
    // with only the ECN bit is a GSO type without a protocol: refused.
    let required = match gso_type & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_TCPV4 => VirtioFeatures::NET_HOST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => VirtioFeatures::NET_HOST_TSO6,
        VIRTIO_NET_HDR_GSO_UDP => VirtioFeatures::NET_HOST_UFO,
        VIRTIO_NET_HDR_GSO_UDP_L4 => VirtioFeatures::NET_HOST_USO,
        _ => return Err(TxError::GsoType { gso_type }),
    };
    if !features.contains(required) {
        return Err(TxError::GsoType { gso_type });
    }
    if h.gso_size.get() == 0 {
        return Err(TxError::GsoSizeZero);
    }
    Ok(())
}
