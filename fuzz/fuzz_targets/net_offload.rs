//! Offloads between drivers (family 22): `check_frame` over an arbitrary header and frame,
//! the per-receiver `Delivery` for arbitrary features, checksum completion, and software
//! segmentation of whatever is accepted, in both checksum modes.
//!
//! Input: byte 0 picks the checksum mode and whether the frame is given whole or as a
//! 256-byte snapshot; bytes 1..9 are the receiver's features (little endian); bytes 9..21 the
//! `virtio_net_hdr`; the rest the frame.
//!
//! Invariants: no panic; an accepted GSO frame has at most `ceil(65535 / gso_size)` segments,
//! whose payload ranges cover its payload exactly once, each written into a buffer of exactly
//! its length; with complete checksums, every segment's IPv4 header checksum and transport
//! checksum verify (by a byte-wise RFC 1071 sum, independent of the core's); a completed
//! partial checksum verifies the same way; a delivered header never carries flag bits the
//! receiver may not see.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtq::net::gso::Segmenter;
use virtq::net::header::*;
use virtq::net::offload::{
    check_frame, complete_csum, Delivery, IpVersion, L4Csum, OffloadError, Transport, MAX_GSO_IP_LEN, MAX_HEADERS_LEN,
};
use virtq::VirtioFeatures;
use zerocopy::FromBytes;

/// RFC 1071 byte by byte; not complemented.
fn ref_sum(pieces: &[&[u8]]) -> u16 {
    let mut s: u32 = 0;
    let mut hi = None;
    for &b in pieces.iter().flat_map(|p| p.iter()) {
        match hi.take() {
            None => hi = Some(b),
            Some(h) => {
                s += (h as u32) << 8 | b as u32;
                s = (s & 0xFFFF) + (s >> 16);
            }
        }
    }
    if let Some(h) = hi {
        s += (h as u32) << 8;
        s = (s & 0xFFFF) + (s >> 16);
    }
    s as u16
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 21 {
        return;
    }
    let mode = data[0];
    let features = VirtioFeatures::from_bits_retain(u64::from_le_bytes(data[1..9].try_into().unwrap()));
    let h = VirtioNetHdr::read_from_bytes(&data[9..21]).unwrap();
    let frame = &data[21..];

    // Delivery for a header alone: never a flag the driver may not see.
    if let Delivery::Pass(out) | Delivery::CompleteCsum(out) = virtq::net::offload::rx_delivery(&h, features) {
        let allowed = if features.contains(VirtioFeatures::NET_GUEST_CSUM) {
            VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID
        } else {
            0
        };
        assert_eq!(out.flags & !allowed, 0);
    }

    // Completion: with the field zeroed first (a pseudo-header sum of 0) and at an even
    // offset, the frame from csum_start on must sum to all ones.
    let mut copy = frame.to_vec();
    let (start, offset) = (h.csum_start.get() as usize, h.csum_offset.get() as usize);
    if start + offset + 2 <= copy.len() {
        copy[start + offset..start + offset + 2].fill(0);
    }
    if let Ok(true) = complete_csum(&h, &mut copy) {
        if offset % 2 == 0 {
            assert_eq!(ref_sum(&[&copy[start..]]), 0xFFFF);
        }
    }

    let head = if mode & 2 != 0 { &frame[..frame.len().min(MAX_HEADERS_LEN)] } else { frame };
    let Ok(of) = check_frame(&h, head, frame.len()) else { return };
    let _ = of.delivery(features);
    let Some(layout) = of.layout else {
        assert_eq!(of.segments(), 1);
        return;
    };
    let mss = of.header.gso_size.get() as usize;
    assert!(of.segments() as usize <= MAX_GSO_IP_LEN.div_ceil(mss));
    let csum = if mode & 1 != 0 { L4Csum::Partial } else { L4Csum::Complete };
    let seg = match Segmenter::new(&of, head, csum) {
        Ok(s) => s,
        Err(e) => {
            assert_eq!(e, OffloadError::UfoUnsupported);
            return;
        }
    };
    assert_eq!(seg.count(), of.segments());
    let (hl, l3, l4) = (layout.headers_len as usize, layout.l3_offset as usize, layout.l4_offset as usize);
    let mut covered = 0;
    let mut out = vec![0u8; hl + mss];
    for i in 0..seg.count() {
        let len = seg.segment_len(i);
        assert_eq!(seg.write_segment(i, frame, &mut out[..len]), Ok(len));
        let r = seg.payload_range(i);
        assert_eq!(r.start, hl + covered);
        assert_eq!(&out[hl..len], &frame[r.clone()]);
        covered += r.len();
        if csum == L4Csum::Partial {
            continue;
        }
        let s = &out[..len];
        let l4_len = ((len - l4) as u16).to_be_bytes();
        let pseudo_ok = match layout.ip {
            IpVersion::V4 => {
                assert_eq!(ref_sum(&[&s[l3..l4]]), 0xFFFF, "IPv4 header checksum");
                let proto = s[l3 + 9];
                ref_sum(&[&s[l3 + 12..l3 + 20], &[0, proto], &l4_len, &s[l4..]])
            }
            IpVersion::V6 => {
                let proto = match layout.transport {
                    Transport::Tcp => 6,
                    Transport::Udp => 17,
                };
                ref_sum(&[&s[l3 + 8..l3 + 40], &[0, 0], &l4_len, &[0, 0, 0, proto], &s[l4..]])
            }
        };
        assert_eq!(pseudo_ok, 0xFFFF, "transport checksum of segment {i}");
    }
    assert_eq!(covered, frame.len() - hl);
});
