//! `struct virtio_net_hdr` (VIRTIO 1.2 §5.1.6).

use zerocopy::little_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::features::VirtioFeatures;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: checksum from `csum_start`, stored at `csum_start + csum_offset`.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: checksum already validated (device → driver).
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_F_RSC_INFO`: coalescing info in `csum_*` (device → driver).
pub const VIRTIO_NET_HDR_F_RSC_INFO: u8 = 4;

/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP` (UFO).
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (USO).
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4` (bit in `gso_type`).
pub const VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4: u8 = 0x20;
/// `VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6` (bit in `gso_type`).
pub const VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6: u8 = 0x40;
/// `VIRTIO_NET_HDR_GSO_ECN` (bit in `gso_type`).
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// The 12-byte header used with `VIRTIO_F_VERSION_1` or `VIRTIO_NET_F_MRG_RXBUF`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VirtioNetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment (a hint; never trusted on TX).
    pub hdr_len: U16,
    /// Maximum segment size (not including headers) for GSO.
    pub gso_size: U16,
    /// Where checksumming starts.
    pub csum_start: U16,
    /// Offset after `csum_start` where the checksum is stored.
    pub csum_offset: U16,
    /// Number of merged receive buffers (RX); 0 on TX.
    pub num_buffers: U16,
}

/// The 10-byte legacy header (no `num_buffers`), used by legacy drivers without
/// `VIRTIO_NET_F_MRG_RXBUF` (§5.1.6.1 "Legacy Interface").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VirtioNetHdrLegacy {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Header length hint.
    pub hdr_len: U16,
    /// GSO segment size.
    pub gso_size: U16,
    /// Checksum start.
    pub csum_start: U16,
    /// Checksum offset.
    pub csum_offset: U16,
}

/// Size of the header in bytes for the negotiated features: 12 with VERSION_1 or MRG_RXBUF,
/// 10 otherwise (§5.1.6.1). The core does not offer HASH_REPORT, so never 20.
pub fn header_len(features: VirtioFeatures) -> usize {
    if features.intersects(VirtioFeatures::VERSION_1 | VirtioFeatures::NET_MRG_RXBUF) {
        core::mem::size_of::<VirtioNetHdr>()
    } else {
        core::mem::size_of::<VirtioNetHdrLegacy>()
    }
}

/// Whether the 2-byte checksum field a `NEEDS_CSUM` header names, at `csum_start +
/// csum_offset`, lies inside a frame of `frame_len` bytes (§5.1.6.2; DPDK CVE-2024-11614 was
/// this check missing). The one place the rule is written, for TX parsing and for offloads.
#[cfg_attr(not(feature = "small"), inline(always))]
pub(crate) fn csum_field_fits(h: &VirtioNetHdr, frame_len: usize) -> bool {
    h.csum_start.get() as usize + h.csum_offset.get() as usize + 2 <= frame_len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_features() {
        assert_eq!(core::mem::size_of::<VirtioNetHdr>(), 12);
        assert_eq!(core::mem::size_of::<VirtioNetHdrLegacy>(), 10);
        assert_eq!(header_len(VirtioFeatures::VERSION_1), 12);
        assert_eq!(header_len(VirtioFeatures::NET_MRG_RXBUF), 12);
        assert_eq!(header_len(VirtioFeatures::empty()), 10);
        // The legacy header is a prefix of the modern one.
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: U16::new(0x1234),
            gso_size: U16::new(1448),
            csum_start: U16::new(34),
            csum_offset: U16::new(16),
            num_buffers: U16::new(3),
        };
        let l = VirtioNetHdrLegacy::read_from_bytes(&h.as_bytes()[..10]).unwrap();
        assert_eq!(l.gso_size.get(), 1448);
        assert_eq!(h.as_bytes()[10..], [3, 0]);
    }
}
