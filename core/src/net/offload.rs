//! Checksum and segmentation offloads between a frame's sender and its receivers (VIRTIO 1.2
//! §5.1.6.2 "Packet Transmission", §5.1.6.4 "Processing of Incoming Packets"): what a switch
//! does with a frame one driver sent with a partial checksum or as a GSO super-frame, for
//! another driver that may lack the matching receive offload.
//!
//! 1. [`check_frame`] validates the `struct virtio_net_hdr` a driver sent against the frame's
//!    own headers. [`parse_tx`](super::parse_tx) has already checked the header against the
//!    sender's features (§5.1.6.2.2); here every field that describes the frame must agree
//!    with it, because a receiver's kernel and the software fallback rely on them. A lie is an
//!    [`OffloadError`]: drop the frame and count it.
//! 2. [`OffloadFrame::delivery`] (or [`rx_delivery`] for a header alone) decides per receiver,
//!    from the features it negotiated, whether the frame goes through as it is, with a
//!    rewritten header, with its checksum completed ([`complete_csum`]), or cut into segments
//!    ([`Segmenter`](super::gso::Segmenter)).
//!
//! Everything is bounded: the parse looks at no more than [`MAX_HEADERS_LEN`] bytes, walks at
//! most two VLAN tags and [`MAX_IPV6_EXT_HEADERS`] IPv6 extension headers, and a GSO frame's
//! IP packet (IP header to the frame's end) is at most [`MAX_GSO_IP_LEN`] bytes, so it has at
//! most `65535 / gso_size` segments (rounded up), each of whose lengths fits its IP header.
//!
//! ## What is accepted
//!
//! | | accepted | refused |
//! |---|---|---|
//! | L2 | Ethernet II, up to two 802.1Q / 802.1ad tags | other ethertypes under a GSO type |
//! | IPv4 | any header length (options are copied into every segment) | IHL < 5, fragments |
//! | IPv6 | hop-by-hop and destination options headers (copied into every segment) | routing (its final destination would change the pseudo-header), fragment, AH, ESP and every other extension header |
//! | TCP | any header length (options are copied into every segment) | data offset < 5 |
//! | GSO | `TCPV4`, `TCPV6`, `UDP_L4` (USO), legacy `UDP` (UFO, validated and passed through to a driver with `GUEST_UFO` only) | UDP-tunnel bits, unknown types, GSO without `NEEDS_CSUM` |
//!
//! UFO is not segmented in software: the spec deprecates it in favour of `UDP_L4`, Linux has
//! not sent it since 4.14, and its fallback is IP fragmentation (IPv6 would need a fragment
//! header and identification the switch would have to invent), whose fragments a lost piece
//! wastes whole. virtq-net offers neither `HOST_UFO` nor `GUEST_UFO`.
//!
//! The length fields of the GSO frame's IP and UDP headers and its IPv4 header checksum are
//! never read: segmentation writes them anew for every segment.

use core::fmt;

use zerocopy::little_endian::U16;

use super::csum::Checksum;
use super::header::*;
use crate::features::VirtioFeatures;

/// Most header bytes (Ethernet, VLAN tags, IP with options or extension headers, TCP with
/// options) a GSO frame may have. Every segment repeats them, and the segmenter keeps a copy.
/// The largest ordinary stack is 22 + 60 + 60 = 142 bytes (two VLAN tags, IPv4 and TCP with
/// full options).
pub const MAX_HEADERS_LEN: usize = 256;

/// Most bytes of a GSO frame's IP packet, from its IP header to the frame's end: what an IPv4
/// total length can describe (a 64 KiB TSO frame from Linux is below it). Every segment's IP
/// and UDP length then fits 16 bits, and there are at most `65535 / gso_size` segments.
pub const MAX_GSO_IP_LEN: usize = 0xFFFF;

/// Most IPv6 extension headers walked before the transport header.
pub const MAX_IPV6_EXT_HEADERS: usize = 4;

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86DD;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88A8;
const MAX_VLAN_TAGS: usize = 2;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_DSTOPTS: u8 = 60;
/// IPv6 extension headers (RFC 8200 §4, IANA "IPv6 Extension Header Types") other than the
/// two accepted ones: routing, fragment, ESP, AH, mobility, HIP, shim6, experimental.
const IPV6_OTHER_EXT: [u8; 8] = [43, 44, 50, 51, 135, 139, 140, 253];

/// Offset of the checksum field in a TCP header (RFC 9293 §3.1).
pub const TCP_CSUM_OFFSET: u16 = 16;
/// Offset of the checksum field in a UDP header (RFC 768).
pub const UDP_CSUM_OFFSET: u16 = 6;

/// A header a driver sent that does not describe its frame. The frame must be dropped (and
/// counted); nothing of it was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum OffloadError {
    /// `NEEDS_CSUM` with the 2-byte checksum field at `csum_start + csum_offset` not inside
    /// the frame (DPDK CVE-2024-11614).
    CsumOutOfRange {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// Frame length.
        frame_len: u32,
    },
    /// An unknown GSO type, a UDP-tunnel bit, or the ECN bit on a UDP type.
    GsoType {
        /// The `gso_type` byte.
        gso_type: u8,
    },
    /// A GSO frame with `gso_size` 0.
    GsoSizeZero,
    /// A GSO frame without `NEEDS_CSUM`: "the driver MUST also set the
    /// VIRTIO_NET_HDR_F_NEEDS_CSUM bit" (§5.1.6.2.1), and the checksum field's content is
    /// then unknown.
    GsoWithoutCsum,
    /// The frame's headers end before `needed` bytes (the frame, or the snapshot of its
    /// headers, holds `have`).
    Truncated {
        /// The header that is cut short.
        layer: Layer,
        /// Bytes needed from the frame's start.
        needed: u32,
        /// Bytes there are.
        have: u32,
    },
    /// The frame is not the IP version the GSO type names (an ethertype other than IPv4 or
    /// IPv6 after the VLAN tags, or an IP header whose version disagrees with its ethertype
    /// or the GSO type).
    IpMismatch {
        /// The `gso_type` byte.
        gso_type: u8,
        /// The ethertype after the VLAN tags.
        ethertype: u16,
    },
    /// The transport protocol is not the one the GSO type names (TCP for `TCPV4`/`TCPV6`,
    /// UDP for `UDP`/`UDP_L4`).
    L4Mismatch {
        /// The `gso_type` byte.
        gso_type: u8,
        /// The IPv4 protocol or final IPv6 next header.
        protocol: u8,
    },
    /// An IPv4 header length (IHL) below 5 words.
    Ipv4HeaderLength {
        /// IHL in 32-bit words.
        ihl: u8,
    },
    /// An IPv4 fragment (MF set or a fragment offset): it cannot be segmented.
    Ipv4Fragment,
    /// An IPv6 extension header this module does not walk (see the module docs), or more
    /// than [`MAX_IPV6_EXT_HEADERS`].
    Ipv6ExtensionHeader {
        /// Its next-header number.
        next_header: u8,
    },
    /// A TCP data offset below 5 words.
    TcpHeaderLength {
        /// Data offset in 32-bit words.
        data_offset: u8,
    },
    /// `csum_start`/`csum_offset` of a GSO frame do not name its transport checksum field.
    CsumMismatch {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// Where the transport header really starts.
        l4_offset: u16,
    },
    /// The headers are longer than [`MAX_HEADERS_LEN`].
    HeadersTooLong {
        /// Bytes up to the end of the headers parsed so far.
        len: u32,
    },
    /// A GSO frame whose IP packet is longer than [`MAX_GSO_IP_LEN`].
    TooLarge {
        /// Bytes from the IP header to the frame's end.
        ip_len: u32,
    },
    /// Software segmentation was asked for a frame that is not a GSO frame.
    NotGso,
    /// Software segmentation was asked for a legacy UFO frame (see the module docs).
    UfoUnsupported,
    /// A segment index at or beyond the segment count.
    NoSuchSegment {
        /// The index asked for.
        index: u32,
        /// Segments the frame has.
        count: u32,
    },
    /// The output buffer is smaller than the segment.
    BufferTooSmall {
        /// Bytes needed.
        needed: u32,
        /// Bytes given.
        have: u32,
    },
    /// The source frame given to the segmenter is not the length that was validated.
    FrameLength {
        /// The validated length.
        expected: u32,
        /// The length given.
        got: u32,
    },
}

/// The header an [`OffloadError::Truncated`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Layer {
    /// Ethernet header or a VLAN tag.
    Ethernet,
    /// IPv4 header (with options).
    Ipv4,
    /// IPv6 fixed header.
    Ipv6,
    /// An IPv6 extension header.
    Ipv6Extension,
    /// TCP header (with options).
    Tcp,
    /// UDP header.
    Udp,
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use OffloadError::*;
        match *self {
            CsumOutOfRange { start, offset, frame_len } => {
                write!(f, "checksum at {start}+{offset} outside a {frame_len}-byte frame")
            }
            GsoType { gso_type } => write!(f, "GSO type {gso_type:#x} not supported"),
            GsoSizeZero => f.write_str("GSO frame with gso_size 0"),
            GsoWithoutCsum => f.write_str("GSO frame without NEEDS_CSUM"),
            Truncated { layer, needed, have } => {
                write!(f, "{layer:?} header needs {needed} bytes, frame has {have}")
            }
            IpMismatch { gso_type, ethertype } => {
                write!(f, "GSO type {gso_type:#x} on ethertype {ethertype:#06x}")
            }
            L4Mismatch { gso_type, protocol } => write!(f, "GSO type {gso_type:#x} on IP protocol {protocol}"),
            Ipv4HeaderLength { ihl } => write!(f, "IPv4 header length {ihl} words"),
            Ipv4Fragment => f.write_str("GSO frame is an IPv4 fragment"),
            Ipv6ExtensionHeader { next_header } => write!(f, "IPv6 extension header {next_header} not supported"),
            TcpHeaderLength { data_offset } => write!(f, "TCP data offset {data_offset} words"),
            CsumMismatch { start, offset, l4_offset } => {
                write!(f, "checksum at {start}+{offset}, transport header at {l4_offset}")
            }
            HeadersTooLong { len } => write!(f, "headers of {len} bytes or more"),
            TooLarge { ip_len } => write!(f, "GSO frame with a {ip_len}-byte IP packet"),
            NotGso => f.write_str("not a GSO frame"),
            UfoUnsupported => f.write_str("UFO frames are not segmented"),
            NoSuchSegment { index, count } => write!(f, "segment {index} of {count}"),
            BufferTooSmall { needed, have } => write!(f, "segment needs {needed} bytes, buffer has {have}"),
            FrameLength { expected, got } => write!(f, "frame of {got} bytes, {expected} validated"),
        }
    }
}

/// IP version of a GSO frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum IpVersion {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// Transport protocol of a GSO frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Transport {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// Where a GSO frame's headers are, as [`check_frame`] found them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Layout {
    /// IP version.
    pub ip: IpVersion,
    /// Transport protocol.
    pub transport: Transport,
    /// Offset of the IP header (after Ethernet and VLAN tags).
    pub l3_offset: u16,
    /// Offset of the transport header (after IPv4 options or IPv6 extension headers).
    pub l4_offset: u16,
    /// Length of all headers: where the transport payload starts.
    pub headers_len: u16,
}

impl Layout {
    /// Offset of the transport checksum field from the transport header.
    pub fn csum_offset(&self) -> u16 {
        match self.transport {
            Transport::Tcp => TCP_CSUM_OFFSET,
            Transport::Udp => UDP_CSUM_OFFSET,
        }
    }
}

/// A frame whose header [`check_frame`] accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffloadFrame {
    /// The header, normalised: `flags` holds only `NEEDS_CSUM` (a driver "MUST NOT set"
    /// `DATA_VALID` or `RSC_INFO`, and the device "MUST ignore flag bits that it does not
    /// recognize", §5.1.6.2), `num_buffers` is 0, a lone ECN bit without a GSO type is
    /// cleared, and a TCP GSO frame whose TCP header has CWR set carries the ECN bit (CWR is
    /// what "the ECN bit" of §5.1.6.2 is: Linux sets `SKB_GSO_TCP_ECN` exactly then).
    pub header: VirtioNetHdr,
    /// Frame length in bytes (without the virtio-net header).
    pub frame_len: u32,
    /// For a GSO frame, where its headers are; `None` otherwise.
    pub layout: Option<Layout>,
}

impl OffloadFrame {
    /// Segments this frame becomes when cut in software: 1 unless it is a GSO frame with more
    /// than `gso_size` bytes of payload, and never more than `65535 / gso_size` (rounded up,
    /// [`MAX_GSO_IP_LEN`]).
    pub fn segments(&self) -> u32 {
        match self.layout {
            Some(l) => {
                // Neither can underflow or be 0 for what check_frame returned; the fields are
                // public, so a hand-made value must not panic either.
                let payload = self.frame_len.saturating_sub(l.headers_len as u32);
                let mss = self.header.gso_size.get() as u32;
                payload.div_ceil(mss.max(1)).max(1)
            }
            None => 1,
        }
    }

    /// What delivering this frame to a driver that negotiated `features` takes
    /// ([`rx_delivery`], with the IP version known for `UDP_L4`).
    pub fn delivery(&self, features: VirtioFeatures) -> Delivery {
        delivery(&self.header, self.layout.map(|l| l.ip), features)
    }
}

/// Validates `header` against the frame it came with, in the sender-to-device direction of
/// §5.1.6.2, and returns the normalised header and, for a GSO frame, its header layout.
///
/// `head` is the frame, or a prefix of it holding at least its first `min(frame_len,
/// MAX_HEADERS_LEN)` bytes (a private snapshot of a frame still in guest memory: validate the
/// copy, segment from the copy, and what the guest changes afterwards reaches only its own
/// payload). `frame_len` is the whole frame's length.
///
/// A frame without a GSO type needs only its checksum field inside the frame: completing a
/// checksum is the same sum whatever the protocol. A GSO frame is parsed down to its transport
/// header, and must agree with its header on every point listed in [`OffloadError`].
/// `hdr_len` is rewritten to the true length of the headers for GSO frames (a hint, §5.1.6.2).
pub fn check_frame(header: &VirtioNetHdr, head: &[u8], frame_len: usize) -> Result<OffloadFrame, OffloadError> {
    let frame_len32 = u32::try_from(frame_len).unwrap_or(u32::MAX);
    let head = &head[..head.len().min(frame_len)];
    let mut h = *header;
    h.flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM;
    h.num_buffers = U16::new(0);
    let needs_csum = h.flags != 0;
    if needs_csum && !csum_field_fits(&h, frame_len) {
        return Err(OffloadError::CsumOutOfRange {
            start: h.csum_start.get(),
            offset: h.csum_offset.get(),
            frame_len: frame_len32,
        });
    }
    let gso_type = h.gso_type;
    let ecn = gso_type & VIRTIO_NET_HDR_GSO_ECN != 0;
    let transport = match gso_type & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => {
            h.gso_type = VIRTIO_NET_HDR_GSO_NONE;
            return Ok(OffloadFrame { header: h, frame_len: frame_len32, layout: None });
        }
        VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6 => Transport::Tcp,
        VIRTIO_NET_HDR_GSO_UDP | VIRTIO_NET_HDR_GSO_UDP_L4 if !ecn => Transport::Udp,
        _ => return Err(OffloadError::GsoType { gso_type }),
    };
    if h.gso_size.get() == 0 {
        return Err(OffloadError::GsoSizeZero);
    }
    if !needs_csum {
        return Err(OffloadError::GsoWithoutCsum);
    }
    let layout = parse_headers(gso_type, transport, head)?;
    let (start, offset) = (h.csum_start.get(), h.csum_offset.get());
    if start != layout.l4_offset || offset != layout.csum_offset() {
        return Err(OffloadError::CsumMismatch { start, offset, l4_offset: layout.l4_offset });
    }
    // `hdr_len` "is a hint to the device as to how much of the header needs to be kept to
    // copy into each packet" (§5.1.6.2); only with VIRTIO_NET_F_GUEST_HDRLEN, never offered,
    // is it exact. A wrong hint is no reason to drop the frame: receivers get the true length
    // of the headers, which the segmenter uses anyway.
    h.hdr_len = U16::new(layout.headers_len);
    let ip_len = frame_len - layout.l3_offset as usize;
    if ip_len > MAX_GSO_IP_LEN {
        return Err(OffloadError::TooLarge { ip_len: u32::try_from(ip_len).unwrap_or(u32::MAX) });
    }
    if transport == Transport::Tcp && head[layout.l4_offset as usize + 13] & TCP_CWR != 0 {
        h.gso_type |= VIRTIO_NET_HDR_GSO_ECN;
    }
    Ok(OffloadFrame { header: h, frame_len: frame_len32, layout: Some(layout) })
}

/// TCP flag bits (RFC 9293 §3.1, RFC 3168 §23.2) in byte 13 of the header.
pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_PSH: u8 = 0x08;
pub(crate) const TCP_CWR: u8 = 0x80;

/// `head[..needed]` must exist.
#[inline]
fn need(head: &[u8], layer: Layer, needed: usize) -> Result<(), OffloadError> {
    if needed > MAX_HEADERS_LEN {
        return Err(OffloadError::HeadersTooLong { len: needed as u32 });
    }
    if needed > head.len() {
        return Err(OffloadError::Truncated { layer, needed: needed as u32, have: head.len() as u32 });
    }
    Ok(())
}

#[inline]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Parses Ethernet (+ VLAN), IP and the transport header of a GSO frame of type `gso_type`.
/// Every index is checked by [`need`] first, and every offset stays below
/// [`MAX_HEADERS_LEN`], so the sums below cannot overflow and the reads cannot fail.
fn parse_headers(gso_type: u8, transport: Transport, head: &[u8]) -> Result<Layout, OffloadError> {
    need(head, Layer::Ethernet, ETH_HLEN)?;
    let mut ethertype = be16(head, 12);
    let mut l3 = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            break;
        }
        // A tag: TCI (2 bytes), then the next ethertype.
        need(head, Layer::Ethernet, l3 + 4)?;
        ethertype = be16(head, l3 + 2);
        l3 += 4;
    }
    let base = gso_type & !VIRTIO_NET_HDR_GSO_ECN;
    let ip = match (ethertype, base) {
        (ETHERTYPE_IPV4, VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_UDP | VIRTIO_NET_HDR_GSO_UDP_L4) => {
            IpVersion::V4
        }
        (ETHERTYPE_IPV6, VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_UDP | VIRTIO_NET_HDR_GSO_UDP_L4) => {
            IpVersion::V6
        }
        _ => return Err(OffloadError::IpMismatch { gso_type, ethertype }),
    };
    let (l4, protocol) = match ip {
        IpVersion::V4 => {
            need(head, Layer::Ipv4, l3 + 20)?;
            if head[l3] >> 4 != 4 {
                return Err(OffloadError::IpMismatch { gso_type, ethertype });
            }
            let ihl = head[l3] & 0x0F;
            if ihl < 5 {
                return Err(OffloadError::Ipv4HeaderLength { ihl });
            }
            need(head, Layer::Ipv4, l3 + ihl as usize * 4)?;
            // MF (0x2000) or a fragment offset: this is a piece of a datagram.
            if be16(head, l3 + 6) & 0x3FFF != 0 {
                return Err(OffloadError::Ipv4Fragment);
            }
            (l3 + ihl as usize * 4, head[l3 + 9])
        }
        IpVersion::V6 => {
            need(head, Layer::Ipv6, l3 + 40)?;
            if head[l3] >> 4 != 6 {
                return Err(OffloadError::IpMismatch { gso_type, ethertype });
            }
            let mut next = head[l3 + 6];
            let mut at = l3 + 40;
            let mut walked = 0;
            // Hop-by-hop and destination options change nothing a segment recomputes: they
            // are copied as they are. Every other extension header is refused (module docs).
            while next == IPV6_HOPOPTS || next == IPV6_DSTOPTS {
                if walked == MAX_IPV6_EXT_HEADERS {
                    return Err(OffloadError::Ipv6ExtensionHeader { next_header: next });
                }
                need(head, Layer::Ipv6Extension, at + 2)?;
                let len = (head[at + 1] as usize + 1) * 8;
                need(head, Layer::Ipv6Extension, at + len)?;
                next = head[at];
                at += len;
                walked += 1;
            }
            if IPV6_OTHER_EXT.contains(&next) {
                return Err(OffloadError::Ipv6ExtensionHeader { next_header: next });
            }
            (at, next)
        }
    };
    let (layer, expected) = match transport {
        Transport::Tcp => (Layer::Tcp, IPPROTO_TCP),
        Transport::Udp => (Layer::Udp, IPPROTO_UDP),
    };
    if protocol != expected {
        return Err(OffloadError::L4Mismatch { gso_type, protocol });
    }
    let end = match transport {
        Transport::Tcp => {
            need(head, layer, l4 + 20)?;
            let data_offset = head[l4 + 12] >> 4;
            if data_offset < 5 {
                return Err(OffloadError::TcpHeaderLength { data_offset });
            }
            l4 + data_offset as usize * 4
        }
        Transport::Udp => l4 + 8,
    };
    need(head, layer, end)?;
    // All three are below MAX_HEADERS_LEN (256), checked by `need`.
    Ok(Layout { ip, transport, l3_offset: l3 as u16, l4_offset: l4 as u16, headers_len: end as u16 })
}

/// How the transport checksum of each segment is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum L4Csum {
    /// Computed in full: for a driver without `VIRTIO_NET_F_GUEST_CSUM`, which must receive
    /// `flags` 0 and "SHOULD" get "a fully checksummed packet" (§5.1.6.4.1).
    Complete,
    /// Left partial: the pseudo-header sum in the field and `NEEDS_CSUM` in the segment's
    /// header (§5.1.6.4.1 with `GUEST_CSUM`). No payload byte is summed, and a receiving
    /// kernel checks nothing either: the data never crossed a wire.
    Partial,
}

/// What delivering a frame to one driver takes (§5.1.6.4.1). Where a frame goes to several
/// receivers (flooding), each gets its own answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Deliver the frame as it is with this header: the input header, or the input with
    /// what the driver may not see cleared (`DATA_VALID` without `GUEST_CSUM`, unknown flag
    /// bits, a lone ECN bit).
    Pass(VirtioNetHdr),
    /// The frame has a partial checksum and the driver lacks `GUEST_CSUM`: complete it
    /// ([`complete_csum`] or [`csum_field`]), then deliver with this header (`flags` 0).
    CompleteCsum(VirtioNetHdr),
    /// The driver lacks the GSO type's receive feature (`GUEST_TSO4`, `GUEST_TSO6`,
    /// `GUEST_USO4`/`GUEST_USO6`, or `GUEST_ECN` for a frame with the ECN bit): cut it with a
    /// [`Segmenter`](super::gso::Segmenter), checksums as given, and deliver each segment
    /// with [`Segmenter::segment_header`](super::gso::Segmenter::segment_header).
    Segment(L4Csum),
    /// No fallback exists (a UFO frame for a driver without `GUEST_UFO`, a UDP-tunnel or
    /// unknown GSO type, `RSC_INFO`): drop the frame and count it.
    Drop,
}

/// [`Delivery`] of a frame described only by its header (e.g. one a TAP handed over with
/// `IFF_VNET_HDR`): like [`OffloadFrame::delivery`], but a `UDP_L4` frame, whose IP version
/// the header does not tell, passes with either `GUEST_USO4` or `GUEST_USO6`.
pub fn rx_delivery(h: &VirtioNetHdr, features: VirtioFeatures) -> Delivery {
    delivery(h, None, features)
}

/// The device-side rules of §5.1.6.4.1 ("Processing of Incoming Packets"), one owner for
/// both the header-only check of [`receive`](super::receive) and the switch's fallback:
///
/// - flags: "If VIRTIO_NET_F_GUEST_CSUM is not negotiated, the device MUST set flags to
///   zero": `DATA_VALID` (a hint) is dropped, `NEEDS_CSUM` (a checksum still to complete)
///   means completing it. With `GUEST_CSUM`, `NEEDS_CSUM` and `DATA_VALID` pass; `RSC_INFO`
///   (only with `VIRTIO_NET_F_RSC_EXT`, never offered) drops the frame, other bits (e.g.
///   `UDP_TUNNEL_CSUM`, "MUST NOT set" without its feature) are cleared.
/// - GSO: "If VIRTIO_NET_F_GUEST_TSO4 is not negotiated, the device MUST NOT set gso_type to
///   VIRTIO_NET_HDR_GSO_TCPV4" (likewise TSO6, UFO, USO4/USO6); the ECN bit needs
///   `GUEST_ECN` ("SHOULD NOT send ... unless the VIRTIO_NET_F_GUEST_ECN feature is
///   negotiated"); a GSO frame also needs `GUEST_CSUM`, since it must carry `NEEDS_CSUM`
///   ("the device MUST also set the VIRTIO_NET_HDR_F_NEEDS_CSUM bit", and §5.1.3.1 makes
///   every GUEST_TSO/USO/UFO feature depend on it). Missing any: TCP and USO frames are
///   segmented, UFO frames dropped. UDP-tunnel bits (`GUEST_UDP_TUNNEL_GSO` is never
///   offered) and unknown types are dropped.
fn delivery(h: &VirtioNetHdr, ip: Option<IpVersion>, features: VirtioFeatures) -> Delivery {
    let guest_csum = features.contains(VirtioFeatures::NET_GUEST_CSUM);
    let mut out = *h;
    let needs_csum = h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
    if guest_csum {
        if h.flags & VIRTIO_NET_HDR_F_RSC_INFO != 0 {
            return Delivery::Drop;
        }
        out.flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID;
    } else {
        out.flags = 0;
    }
    let ecn = h.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0;
    let (needed, fallback) = match h.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => {
            out.gso_type = VIRTIO_NET_HDR_GSO_NONE;
            // Without GSO, `hdr_len` and `gso_size` describe nothing; without a checksum
            // request neither do `csum_start`/`csum_offset`: the receiver sees zeroes, not
            // what the sender left there.
            out.hdr_len = U16::new(0);
            out.gso_size = U16::new(0);
            if out.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
                out.csum_start = U16::new(0);
                out.csum_offset = U16::new(0);
            }
            if needs_csum && !guest_csum {
                // The completed frame carries no checksum request: nothing left to describe.
                out.csum_start = U16::new(0);
                out.csum_offset = U16::new(0);
                return Delivery::CompleteCsum(out);
            }
            return Delivery::Pass(out);
        }
        VIRTIO_NET_HDR_GSO_TCPV4 => (VirtioFeatures::NET_GUEST_TSO4, true),
        VIRTIO_NET_HDR_GSO_TCPV6 => (VirtioFeatures::NET_GUEST_TSO6, true),
        VIRTIO_NET_HDR_GSO_UDP_L4 => (
            match ip {
                Some(IpVersion::V4) => VirtioFeatures::NET_GUEST_USO4,
                Some(IpVersion::V6) => VirtioFeatures::NET_GUEST_USO6,
                None => VirtioFeatures::NET_GUEST_USO4 | VirtioFeatures::NET_GUEST_USO6,
            },
            true,
        ),
        VIRTIO_NET_HDR_GSO_UDP => (VirtioFeatures::NET_GUEST_UFO, false),
        _ => return Delivery::Drop,
    };
    let ecn_ok = !ecn || features.contains(VirtioFeatures::NET_GUEST_ECN);
    if guest_csum && features.intersects(needed) && ecn_ok {
        Delivery::Pass(out)
    } else if fallback {
        Delivery::Segment(if guest_csum { L4Csum::Partial } else { L4Csum::Complete })
    } else {
        Delivery::Drop
    }
}

/// Where [`complete_csum`] writes, and what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CsumField {
    /// Offset in the frame: `csum_start + csum_offset`.
    pub offset: usize,
    /// The two bytes to store there.
    pub value: [u8; 2],
}

/// The checksum a frame with `NEEDS_CSUM` lacks (§5.1.6.2: "calculating a ones' complement
/// checksum from csum_start up until the end of the packet and storing the result at offset
/// csum_offset from csum_start will result in a fully checksummed packet"), without writing
/// it: a switch that copies the frame into a receiver's buffer stores these two bytes there,
/// and the frame stays as it was for receivers that take it partial. `None` without
/// `NEEDS_CSUM`.
///
/// The field's current content (the pseudo-header sum, per the spec) is part of the sum. A
/// result of 0 is stored as `0xFFFF`, its ones' complement twin, because a UDP checksum of 0
/// means "none" (RFC 768); TCP accepts either.
pub fn csum_field(h: &VirtioNetHdr, frame: &[u8]) -> Result<Option<CsumField>, OffloadError> {
    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
        return Ok(None);
    }
    if !csum_field_fits(h, frame.len()) {
        return Err(OffloadError::CsumOutOfRange {
            start: h.csum_start.get(),
            offset: h.csum_offset.get(),
            frame_len: u32::try_from(frame.len()).unwrap_or(u32::MAX),
        });
    }
    let start = h.csum_start.get() as usize;
    let mut c = Checksum::new();
    c.add(&frame[start..]);
    let v = match c.finish() {
        0 => 0xFFFF,
        v => v,
    };
    Ok(Some(CsumField { offset: start + h.csum_offset.get() as usize, value: v.to_be_bytes() }))
}

/// Completes a partial checksum in place ([`csum_field`], then the two bytes stored). Returns
/// whether there was one. Completing changes the frame: a receiver that takes it partial
/// (with `NEEDS_CSUM`) must get its copy first, or use [`csum_field`] instead.
pub fn complete_csum(h: &VirtioNetHdr, frame: &mut [u8]) -> Result<bool, OffloadError> {
    match csum_field(h, frame)? {
        Some(f) => {
            frame[f.offset..f.offset + 2].copy_from_slice(&f.value);
            Ok(true)
        }
        None => Ok(false),
    }
}
