//! Software segmentation of GSO frames (VIRTIO 1.2 §5.1.6.2 point 4, "the metadata indicates
//! how to replicate the packet header to cut it into smaller packets"), for a receiver that
//! did not negotiate the matching `GUEST_TSO4`/`GUEST_TSO6`/`GUEST_USO4`/`GUEST_USO6`/
//! `GUEST_ECN` (§5.1.6.4.1, [`Delivery::Segment`](super::offload::Delivery::Segment)).
//!
//! Segment `i` of a frame with `gso_size` (MSS) `m` carries payload bytes `[i·m, (i+1)·m)`
//! behind a copy of the frame's headers, rewritten the way Linux's `tcp_gso_segment` and
//! `inet_gso_segment` do:
//!
//! - IPv4: total length per segment, identification `id + i` (mod 2¹⁶), header checksum
//!   recomputed; IPv6: payload length per segment (extension headers copied).
//! - TCP (`TCPV4`, `TCPV6`): sequence number `seq + i·m`; FIN and PSH only on the last
//!   segment; CWR only on the first (RFC 3168 §6.1.2: CWR is set once, on the first new
//!   packet after a window reduction; the `GSO_ECN` bit of §5.1.6.2 marks such a frame); ECE,
//!   URG, the ECN codepoint and options copied into every segment.
//! - UDP (`UDP_L4`, USO): every segment is a whole datagram with its own length and checksum.
//! - The transport checksum is computed in full ([`L4Csum::Complete`]) or left partial with
//!   the pseudo-header sum in the field ([`L4Csum::Partial`]). It is computed from the
//!   addresses in the headers, never from the frame's checksum field, so whatever the
//!   sender left there does not matter.
//!
//! The API allocates nothing and copies each payload byte once. [`Segmenter::write_segment`]
//! writes a whole segment into a buffer; for a payload that is not one slice (copied straight
//! from guest buffers), [`Segmenter::payload_range`] tells the bytes to copy and
//! [`Segmenter::write_headers`] writes the headers, given the payload's [`Checksum`] when it
//! must be complete.

use core::ops::Range;

use zerocopy::little_endian::U16;

use super::csum::Checksum;
use super::header::*;
use super::offload::{
    check_frame, IpVersion, L4Csum, Layout, OffloadError, OffloadFrame, Transport, MAX_HEADERS_LEN, TCP_CWR, TCP_FIN,
    TCP_PSH,
};

/// Cuts one validated GSO frame into segments. Holds its own copy of the frame's headers,
/// validated again on the copy, so the source may change under it (guest memory) without
/// changing what it writes beyond the payload bytes.
#[derive(Clone)]
pub struct Segmenter {
    /// The frame's headers with the transport checksum zeroed: the template of every segment.
    headers: [u8; MAX_HEADERS_LEN],
    layout: Layout,
    frame_len: u32,
    mss: u32,
    count: u32,
    csum: L4Csum,
    /// Sum of the pseudo-header's addresses and protocol (RFC 9293 §3.1, RFC 768, RFC 8200
    /// §8.1); the length is added per segment.
    pseudo: Checksum,
    seq: u32,
    ip_id: u16,
    tcp_flags: u8,
}

impl core::fmt::Debug for Segmenter {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Segmenter")
            .field("layout", &self.layout)
            .field("frame_len", &self.frame_len)
            .field("mss", &self.mss)
            .field("count", &self.count)
            .field("csum", &self.csum)
            .finish_non_exhaustive()
    }
}

impl Segmenter {
    /// A segmenter for `frame` (from [`check_frame`]), whose headers are at the start of
    /// `head` (the frame, or a snapshot of at least its headers), leaving transport checksums
    /// as `csum` says.
    ///
    /// Fails for a frame that is not GSO ([`OffloadError::NotGso`]), a UFO frame
    /// ([`OffloadError::UfoUnsupported`], see [`offload`](super::offload)), or headers in
    /// `head` that no longer pass [`check_frame`] as `frame.header`.
    pub fn new(frame: &OffloadFrame, head: &[u8], csum: L4Csum) -> Result<Segmenter, OffloadError> {
        if frame.layout.is_none() {
            return Err(OffloadError::NotGso);
        }
        if frame.header.gso_type & !VIRTIO_NET_HDR_GSO_ECN == VIRTIO_NET_HDR_GSO_UDP {
            return Err(OffloadError::UfoUnsupported);
        }
        let mut headers = [0u8; MAX_HEADERS_LEN];
        let n = head.len().min(MAX_HEADERS_LEN).min(frame.frame_len as usize);
        headers[..n].copy_from_slice(&head[..n]);
        // Validate the copy: from here on nothing is read from `head`.
        let checked = check_frame(&frame.header, &headers[..n], frame.frame_len as usize)?;
        let layout = checked.layout.ok_or(OffloadError::NotGso)?;
        let (l3, l4) = (layout.l3_offset as usize, layout.l4_offset as usize);
        let (mut pseudo, mut seq, mut ip_id, mut tcp_flags) = (Checksum::new(), 0, 0, 0);
        match layout.ip {
            IpVersion::V4 => {
                pseudo.add(&headers[l3 + 12..l3 + 20]);
                pseudo.add_u16(headers[l3 + 9] as u16);
                ip_id = u16::from_be_bytes([headers[l3 + 4], headers[l3 + 5]]);
            }
            IpVersion::V6 => {
                pseudo.add(&headers[l3 + 8..l3 + 40]);
            }
        }
        let csum_offset = layout.csum_offset() as usize;
        match layout.transport {
            Transport::Tcp => {
                seq = u32::from_be_bytes([headers[l4 + 4], headers[l4 + 5], headers[l4 + 6], headers[l4 + 7]]);
                tcp_flags = headers[l4 + 13];
                if layout.ip == IpVersion::V6 {
                    // The pseudo-header names the upper-layer protocol, not the first next
                    // header (RFC 8200 §8.1).
                    pseudo.add_u16(6);
                }
            }
            Transport::Udp => {
                if layout.ip == IpVersion::V6 {
                    pseudo.add_u16(17);
                }
            }
        }
        headers[l4 + csum_offset..l4 + csum_offset + 2].fill(0);
        Ok(Segmenter {
            headers,
            layout,
            frame_len: checked.frame_len,
            mss: checked.header.gso_size.get() as u32,
            count: checked.segments(),
            csum,
            pseudo,
            seq,
            ip_id,
            tcp_flags,
        })
    }

    /// Number of segments (at least 1; a frame with no more than `gso_size` payload bytes is
    /// one segment, as Linux treats it).
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Length of every segment's headers.
    pub fn header_len(&self) -> usize {
        self.layout.headers_len as usize
    }

    /// Where the frame's headers are.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The payload of segment `i` as a byte range of the source frame; empty for `i` beyond
    /// the last segment.
    pub fn payload_range(&self, i: u32) -> Range<usize> {
        let h = self.layout.headers_len as usize;
        let end = self.frame_len as usize;
        // `i · mss` cannot overflow u64; both ends are clamped to the frame.
        let start = (h as u64 + i as u64 * self.mss as u64).min(end as u64) as usize;
        start..(start + self.mss as usize).min(end)
    }

    /// Length of segment `i`, headers included (0 beyond the last segment).
    pub fn segment_len(&self, i: u32) -> usize {
        if i < self.count {
            self.header_len() + self.payload_range(i).len()
        } else {
            0
        }
    }

    /// The virtio-net header to deliver every segment with: all zero for
    /// [`L4Csum::Complete`]; for [`L4Csum::Partial`], `NEEDS_CSUM` with `csum_start` and
    /// `csum_offset` naming the transport checksum (§5.1.6.4.1: "the packet checksum stored in
    /// the receive buffer" is "the TCP/UDP pseudo header"), and `hdr_len` the headers.
    pub fn segment_header(&self) -> VirtioNetHdr {
        match self.csum {
            L4Csum::Complete => VirtioNetHdr::default(),
            L4Csum::Partial => VirtioNetHdr {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
                gso_type: VIRTIO_NET_HDR_GSO_NONE,
                hdr_len: U16::new(self.layout.headers_len),
                gso_size: U16::new(0),
                csum_start: U16::new(self.layout.l4_offset),
                csum_offset: U16::new(self.layout.csum_offset()),
                num_buffers: U16::new(0),
            },
        }
    }

    /// Writes the headers of segment `i` into `out[..header_len()]` and returns their length.
    /// `payload` is the [`Checksum`] of the segment's payload ([`payload_range`]) for
    /// [`L4Csum::Complete`]; it is not used for [`L4Csum::Partial`] (pass
    /// `Checksum::new()`).
    ///
    /// [`payload_range`]: Self::payload_range
    pub fn write_headers(&self, i: u32, payload: &Checksum, out: &mut [u8]) -> Result<usize, OffloadError> {
        if i >= self.count {
            return Err(OffloadError::NoSuchSegment { index: i, count: self.count });
        }
        let hl = self.layout.headers_len as usize;
        if out.len() < hl {
            return Err(OffloadError::BufferTooSmall { needed: hl as u32, have: out.len() as u32 });
        }
        let out = &mut out[..hl];
        out.copy_from_slice(&self.headers[..hl]);
        let plen = self.payload_range(i).len();
        let (l3, l4) = (self.layout.l3_offset as usize, self.layout.l4_offset as usize);
        // A segment's IP packet is no longer than the whole frame's, which check_frame bounds
        // to MAX_GSO_IP_LEN: every length below fits its 16-bit field.
        match self.layout.ip {
            IpVersion::V4 => {
                put16(out, l3 + 2, (hl - l3 + plen) as u16);
                put16(out, l3 + 4, self.ip_id.wrapping_add(i as u16));
                put16(out, l3 + 10, 0);
                let sum = super::csum::checksum(&out[l3..l4]);
                put16(out, l3 + 10, sum);
            }
            IpVersion::V6 => put16(out, l3 + 4, (hl - l3 - 40 + plen) as u16),
        }
        let l4_len = hl - l4 + plen;
        let csum_at = l4 + self.layout.csum_offset() as usize;
        match self.layout.transport {
            Transport::Tcp => {
                let seq = self.seq.wrapping_add(i.wrapping_mul(self.mss));
                out[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
                let mut flags = self.tcp_flags;
                if i + 1 < self.count {
                    flags &= !(TCP_FIN | TCP_PSH);
                }
                if i > 0 {
                    flags &= !TCP_CWR;
                }
                out[l4 + 13] = flags;
            }
            Transport::Udp => put16(out, l4 + 4, l4_len as u16),
        }
        let mut c = self.pseudo;
        c.add_u16(l4_len as u16);
        let value = match self.csum {
            L4Csum::Partial => c.sum(),
            L4Csum::Complete => {
                // The field is zero in the template; header bytes are an even count (TCP: a
                // multiple of 4, UDP: 8), so the payload's sum follows at an even position.
                c.add(&out[l4..hl]);
                c.add_sum(payload);
                match (c.finish(), self.layout.transport) {
                    // RFC 768: a computed 0 is sent as all ones (0 means "no checksum").
                    (0, Transport::Udp) => 0xFFFF,
                    (v, _) => v,
                }
            }
        };
        put16(out, csum_at, value);
        Ok(hl)
    }

    /// Writes segment `i` (headers and payload copied from `frame`, the whole source frame)
    /// into `out` and returns its length. For [`L4Csum::Complete`] the payload is summed as
    /// it lies in `out`, just written.
    pub fn write_segment(&self, i: u32, frame: &[u8], out: &mut [u8]) -> Result<usize, OffloadError> {
        if frame.len() != self.frame_len as usize {
            return Err(OffloadError::FrameLength {
                expected: self.frame_len,
                got: u32::try_from(frame.len()).unwrap_or(u32::MAX),
            });
        }
        if i >= self.count {
            return Err(OffloadError::NoSuchSegment { index: i, count: self.count });
        }
        let r = self.payload_range(i);
        let hl = self.header_len();
        let total = hl + r.len();
        if out.len() < total {
            return Err(OffloadError::BufferTooSmall { needed: total as u32, have: out.len() as u32 });
        }
        let payload = &mut out[hl..total];
        payload.copy_from_slice(&frame[r]);
        let mut sum = Checksum::new();
        if self.csum == L4Csum::Complete {
            sum.add(payload);
        }
        self.write_headers(i, &sum, out)?;
        Ok(total)
    }
}

#[cfg_attr(not(feature = "small"), inline(always))]
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
