//! virtio-net device obligations (VIRTIO 1.2 §5.1.6; spec-obligations §6.2) and hostile-input
//! families 6, 9, 10 and 11 (shared/reference/hostile-inputs.md), driven by the in-tree test
//! driver: TX chains parsed with `parse_tx`, RX frames placed with `receive`, and every result
//! checked in guest memory (used ring entries, `used.idx`, bytes read back).

mod common;

use common::{queue, setup, Guest, GPA};
use virtq::avail::AvailIndexError;
use virtq::desc::{DescFlags, Descriptor};
use virtq::net::header::*;
use virtq::net::mergeable::MAX_RX_BUFFERS;
use virtq::net::tx::validate_tx_header;
use virtq::net::{
    header_len, parse_tx, parse_tx_copied, receive, receive_burst, receive_burst_logged, FrameSource, Gather, RxBurst,
    RxError, RxOutcome, RxScratch, TxError, TxPacket, VirtioNetHdr, RX_BURST,
};
use virtq::testing::{layout, Buf, TestDriver};
use virtq::{Chain, CopiedChain, PopError, RegionTable, Segments, SplitQueue, VirtioFeatures, WriteLog};
use zerocopy::little_endian::U16;
use zerocopy::IntoBytes;

type Driver<'g> = TestDriver<'g, RegionTable<8>>;

/// Modern header (12 bytes), no mergeable buffers.
const V1: VirtioFeatures = VirtioFeatures::VERSION_1;
/// Modern header with mergeable receive buffers.
const MRG: VirtioFeatures = VirtioFeatures::VERSION_1.union(VirtioFeatures::NET_MRG_RXBUF);
/// Byte the tests pre-fill receive buffers with, to see what the device left untouched.
const FILL: u8 = 0xEE;
/// Byte pattern of device-readable buffers that `receive` must never write.
const RO: u8 = 0x5A;

fn feats(extra: VirtioFeatures) -> VirtioFeatures {
    V1 | extra
}

/// A header with the given `flags` and `gso_type`, every other field 0.
fn hdr(flags: u8, gso_type: u8) -> VirtioNetHdr {
    VirtioNetHdr { flags, gso_type, ..VirtioNetHdr::default() }
}

/// `hdr` with checksum fields.
fn csum_hdr(start: u16, offset: u16) -> VirtioNetHdr {
    VirtioNetHdr {
        csum_start: U16::new(start),
        csum_offset: U16::new(offset),
        ..hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE)
    }
}

/// A TCPv4 GSO header with a valid checksum request for a frame of at least 54 bytes.
fn tso4_hdr(gso_size: u16) -> VirtioNetHdr {
    VirtioNetHdr {
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
        gso_size: U16::new(gso_size),
        hdr_len: U16::new(54),
        ..csum_hdr(34, 16)
    }
}

/// A recognisable frame (a position-dependent byte pattern).
fn frame(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 1) as u8 ^ (i >> 8) as u8).collect()
}

/// The header bytes a driver puts in front of a TX frame (first `len` bytes of `h`).
fn hdr_bytes(h: &VirtioNetHdr, len: usize) -> Vec<u8> {
    h.as_bytes()[..len].to_vec()
}

/// The 12 header bytes the device must write on RX: `h` with `num_buffers` replaced.
fn rx_hdr(h: &VirtioNetHdr, num_buffers: u16) -> Vec<u8> {
    let mut h = *h;
    h.num_buffers = U16::new(num_buffers);
    h.as_bytes().to_vec()
}

fn read(drv: &Driver<'_>, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    drv.read(addr, &mut v);
    v
}

/// Builds `bufs` as one chain and publishes it; returns the head and each buffer's address.
fn add(drv: &mut Driver<'_>, bufs: &[Buf<'_>]) -> (u16, Vec<u64>) {
    let mut addrs = vec![0u64; bufs.len()];
    let head = drv.build_chain(bufs, &mut addrs);
    drv.publish(head);
    (head, addrs)
}

/// Publishes a one-descriptor receive buffer of `len` bytes pre-filled with `FILL`.
fn add_rx(drv: &mut Driver<'_>, len: u32) -> (u16, u64) {
    let (head, addrs) = add(drv, &[Buf::writable(len)]);
    drv.write(addrs[0], &vec![FILL; len as usize]);
    (head, addrs[0])
}

/// Publishes a 100-byte receive chain whose `next` is out of range (family 1); returns its
/// head.
fn add_broken_rx(drv: &mut Driver<'_>) -> u16 {
    let mut addr = [0u64];
    let broken = drv.build_chain(&[Buf::writable(100)], &mut addr);
    drv.write_desc(
        broken,
        Descriptor { addr: addr[0], len: 100, flags: DescFlags::WRITE | DescFlags::NEXT, next: 200 },
    );
    drv.publish(broken);
    broken
}

/// Builds `bufs` as the only chain of a fresh TX queue, pops it and parses it with `f`. On
/// success also returns the frame as `read_frame` copies it (checked to be `frame_len` bytes).
fn tx(bufs: &[Buf<'_>], f: VirtioFeatures) -> Result<(TxPacket, Vec<u8>), TxError> {
    tx_chain(bufs, f, false)
}

/// `tx`, with the buffers either direct or in an indirect table (RING_INDIRECT_DESC added to
/// the queue's features).
///
/// Every case also runs through the fused path (`pop_read` + `parse_tx_copied`, what the
/// vhost-user data path runs), which must give the same verdict and the same frame: the TX
/// rules have one owner whichever way the chain is taken.
fn tx_chain(bufs: &[Buf<'_>], f: VirtioFeatures, indirect: bool) -> Result<(TxPacket, Vec<u8>), TxError> {
    let via_segments = tx_chain_segments(bufs, f, indirect);
    let via_copy = tx_chain_copied(bufs, f, indirect);
    assert_eq!(via_copy, via_segments, "parse_tx_copied agrees with parse_tx");
    via_segments
}

fn tx_queue<'g>(g: &'g Guest, bufs: &[Buf<'_>], f: VirtioFeatures, indirect: bool) -> SplitQueue<'g, RegionTable<8>> {
    let (cfg, mut drv) = setup(g, 16);
    let q = queue(g, cfg, f | VirtioFeatures::RING_INDIRECT_DESC);
    if indirect {
        drv.add_indirect_chain(bufs);
    } else {
        add(&mut drv, bufs);
    }
    q
}

fn tx_chain_segments(bufs: &[Buf<'_>], f: VirtioFeatures, indirect: bool) -> Result<(TxPacket, Vec<u8>), TxError> {
    let g = Guest::new(1 << 20);
    let mut q = tx_queue(&g, bufs, f, indirect);
    let mut chain = Chain::<32>::new();
    assert!(matches!(q.pop_into(&mut chain), Ok(Some(_))), "TX chain should walk");
    let pkt = parse_tx(&chain, f)?;
    // A larger buffer shows `read_frame` stops at the end of the frame.
    let mut out = vec![0u8; pkt.frame_len as usize + 64];
    let n = pkt.read_frame(&chain, &mut out);
    assert_eq!(n, pkt.frame_len as usize, "read_frame copies exactly the frame");
    out.truncate(n);
    Ok((pkt, out))
}

fn tx_chain_copied(bufs: &[Buf<'_>], f: VirtioFeatures, indirect: bool) -> Result<(TxPacket, Vec<u8>), TxError> {
    let g = Guest::new(1 << 20);
    let mut q = tx_queue(&g, bufs, f, indirect);
    let mut buf = vec![0u8; 1 << 17];
    let c = q.pop_read(&mut buf).expect("TX chain should walk").expect("a chain");
    let pkt = parse_tx_copied(&c, &buf, f)?;
    Ok((pkt, buf[pkt.header_len..pkt.header_len + pkt.frame_len as usize].to_vec()))
}

/// `parse_tx_copied` refuses a chain whose copy was cut short by a small buffer.
#[test]
fn tx_copied_chain_longer_than_the_buffer_is_refused() {
    let g = Guest::new(1 << 20);
    let (hb, fr) = (hdr_bytes(&hdr(0, 0), 12), frame(100));
    let mut q = tx_queue(&g, &[Buf::readable(&hb), Buf::readable(&fr)], V1, false);
    let mut buf = vec![0u8; 64];
    let c = q.pop_read(&mut buf).unwrap().unwrap();
    assert_eq!(parse_tx_copied(&c, &buf, V1), Err(TxError::TooLong { len: 112, capacity: 64 }));
}

/// A TX chain of a 12-byte header `h` and a `frame_len`-byte frame, in two descriptors.
fn tx_hdr(h: &VirtioNetHdr, frame_len: usize, f: VirtioFeatures) -> Result<TxPacket, TxError> {
    let (hb, fr) = (hdr_bytes(h, 12), frame(frame_len));
    tx(&[Buf::readable(&hb), Buf::readable(&fr)], f).map(|(p, _)| p)
}

// ---- TX: §5.1.6.2 and family 9 -----------------------------------------------------------

/// §5.1.6.2: header in one descriptor, frame in the next; frame bytes come back exactly.
#[test]
fn tx_header_and_frame_in_two_descriptors() {
    let h = VirtioNetHdr { gso_size: U16::new(1448), ..csum_hdr(34, 16) };
    let fr = frame(60);
    let hb = hdr_bytes(&h, 12);
    let f = feats(VirtioFeatures::NET_CSUM);
    let (pkt, got) = tx(&[Buf::readable(&hb), Buf::readable(&fr)], f).unwrap();
    assert_eq!(pkt, TxPacket { header: h, header_len: 12, frame_len: 60 });
    assert_eq!(pkt.header.csum_start.get(), 34);
    assert_eq!(pkt.header.csum_offset.get(), 16);
    assert_eq!(got, fr);
}

/// Family 9: the header split 5+4+3 over three descriptors (gso_size straddles the first
/// boundary, csum_start the second) parses exactly as the two-descriptor layout; also with the
/// last header byte sharing a descriptor with the frame's start.
#[test]
fn tx_header_split_over_three_descriptors_family9() {
    let h = VirtioNetHdr { hdr_len: U16::new(0x0136), gso_size: U16::new(0x05A8), ..csum_hdr(0x0122, 0x0010) };
    let f = feats(VirtioFeatures::NET_CSUM);
    let fr = frame(400);
    let hb = hdr_bytes(&h, 12);
    let reference = tx(&[Buf::readable(&hb), Buf::readable(&fr)], f).unwrap();
    assert_eq!(reference.0.header, h);

    let split =
        tx(&[Buf::readable(&hb[..5]), Buf::readable(&hb[5..9]), Buf::readable(&hb[9..]), Buf::readable(&fr)], f)
            .unwrap();
    assert_eq!(split, reference);

    // 5 + 4 + (3 header bytes + 10 frame bytes) + rest of frame.
    let mut mixed = hb[9..].to_vec();
    mixed.extend_from_slice(&fr[..10]);
    let mixed =
        tx(&[Buf::readable(&hb[..5]), Buf::readable(&hb[5..9]), Buf::readable(&mixed), Buf::readable(&fr[10..])], f)
            .unwrap();
    assert_eq!(mixed, reference);
    assert_eq!(mixed.1, fr);

    // One byte per descriptor for the whole header.
    let mut bufs: Vec<Buf<'_>> = hb.chunks(1).map(Buf::readable).collect();
    bufs.push(Buf::readable(&fr));
    assert_eq!(tx(&bufs, f).unwrap(), reference);

    // Zero-length descriptors between the pieces, and the same split inside an indirect table.
    let with_empty = [
        Buf::readable(&hb[..5]),
        Buf::readable(&[]),
        Buf::readable(&hb[5..9]),
        Buf::readable(&[]),
        Buf::readable(&hb[9..]),
        Buf::readable(&fr),
    ];
    assert_eq!(tx(&with_empty, f).unwrap(), reference);
    assert_eq!(tx_chain(&with_empty, f, true).unwrap(), reference);
}

/// DPDK CVE-2022-2132: a chain no longer than the header holds no packet; `len` is the chain's
/// readable length, whether the bytes are in one descriptor or several.
#[test]
fn tx_chain_not_longer_than_header_is_too_short_cve_2022_2132() {
    let hb = hdr_bytes(&hdr(0, 0), 12);
    assert_eq!(tx(&[Buf::readable(&hb)], V1), Err(TxError::TooShort { len: 12 }));
    assert_eq!(tx(&[Buf::readable(&hb[..6]), Buf::readable(&hb[6..])], V1), Err(TxError::TooShort { len: 12 }));
    assert_eq!(tx(&[Buf::readable(&hb[..11])], V1), Err(TxError::TooShort { len: 11 }));
    assert_eq!(tx(&[Buf::readable(&hb[..1])], V1), Err(TxError::TooShort { len: 1 }));
    // A chain of one zero-length descriptor.
    assert_eq!(tx(&[Buf::readable(&[])], V1), Err(TxError::TooShort { len: 0 }));
    // One byte more than the header is a 1-byte frame.
    let mut one = hb.clone();
    one.push(0xAB);
    let (pkt, got) = tx(&[Buf::readable(&one)], V1).unwrap();
    assert_eq!((pkt.header_len, pkt.frame_len), (12, 1));
    assert_eq!(got, [0xAB]);
}

/// Family 9 / §5.1.6.2: the driver MUST set `num_buffers` to 0 on TX; the device tolerates
/// other values and reports the header as written.
#[test]
fn tx_nonzero_num_buffers_is_tolerated_family9() {
    for n in [1u16, 5, 0xFFFF] {
        let h = VirtioNetHdr { num_buffers: U16::new(n), ..hdr(0, 0) };
        let pkt = tx_hdr(&h, 60, V1).unwrap();
        assert_eq!(pkt.header.num_buffers.get(), n);
        assert_eq!(pkt.frame_len, 60);
    }
}

/// Family 6: a TX chain is device-readable only; a writable descriptor rejects the chain (even
/// one that also holds no frame, and one that is all writable).
#[test]
fn tx_chain_with_writable_descriptor_is_rejected_family6() {
    let hb = hdr_bytes(&hdr(0, 0), 12);
    let fr = frame(60);
    assert_eq!(tx(&[Buf::readable(&hb), Buf::readable(&fr), Buf::writable(64)], V1), Err(TxError::WritableBuffers));
    assert_eq!(tx(&[Buf::readable(&hb), Buf::writable(64)], V1), Err(TxError::WritableBuffers));
    assert_eq!(tx(&[Buf::writable(100)], V1), Err(TxError::WritableBuffers));
}

// ---- TX header validation: §5.1.6.2.2 and family 10 --------------------------------------

/// Family 10 (DPDK CVE-2024-11614): NEEDS_CSUM with `csum_start` at or past the end of the
/// frame; the u16 fields must not wrap when added.
#[test]
fn tx_needs_csum_with_csum_start_beyond_frame_family10() {
    let f = feats(VirtioFeatures::NET_CSUM);
    for (start, offset) in [(60u16, 0u16), (61, 0), (1000, 6), (0xFFFF, 0), (0xFFFF, 0xFFFF), (0xFFFE, 0)] {
        assert_eq!(
            tx_hdr(&csum_hdr(start, offset), 60, f),
            Err(TxError::CsumOutOfRange { start, offset, frame_len: 60 }),
            "csum_start {start} csum_offset {offset}"
        );
    }
}

/// Family 10: the 2-byte checksum field at `csum_start + csum_offset` must lie inside the
/// frame; ending exactly at the frame's end is accepted.
#[test]
fn tx_needs_csum_field_must_fit_in_frame_family10() {
    let f = feats(VirtioFeatures::NET_CSUM);
    // 34 + 24 + 2 == 60: the last two bytes of the frame.
    assert!(tx_hdr(&csum_hdr(34, 24), 60, f).is_ok());
    assert!(tx_hdr(&csum_hdr(58, 0), 60, f).is_ok());
    assert!(tx_hdr(&csum_hdr(0, 58), 60, f).is_ok());
    for (start, offset) in [(34u16, 25u16), (59, 0), (0, 59), (30, 0xFFFF)] {
        assert_eq!(
            tx_hdr(&csum_hdr(start, offset), 60, f),
            Err(TxError::CsumOutOfRange { start, offset, frame_len: 60 })
        );
    }
    // The same boundary straight through `validate_tx_header`.
    assert_eq!(validate_tx_header(&csum_hdr(10, 6), 18, f), Ok(()));
    assert_eq!(
        validate_tx_header(&csum_hdr(10, 6), 17, f),
        Err(TxError::CsumOutOfRange { start: 10, offset: 6, frame_len: 17 })
    );
}

/// §5.1.6.2.1: without VIRTIO_NET_F_CSUM the driver must leave `flags` 0; NEEDS_CSUM is
/// rejected even with in-range checksum fields.
#[test]
fn tx_needs_csum_without_net_csum_is_rejected() {
    assert_eq!(tx_hdr(&csum_hdr(34, 16), 60, V1), Err(TxError::CsumNotNegotiated));
    assert_eq!(tx_hdr(&csum_hdr(0xFFFF, 0xFFFF), 60, V1), Err(TxError::CsumNotNegotiated));
    assert!(tx_hdr(&csum_hdr(34, 16), 60, feats(VirtioFeatures::NET_CSUM)).is_ok());
}

/// §5.1.6.2.2: the device "MUST ignore flag bits that it does not recognize" and without
/// NEEDS_CSUM "MUST NOT use the csum_start and csum_offset" (garbage there is harmless).
#[test]
fn tx_unknown_flags_ignored_and_csum_fields_unused_without_needs_csum() {
    for flags in [VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_RSC_INFO, 0x08, 0x80, 0xFE] {
        let h = VirtioNetHdr { csum_start: U16::new(0xFFFF), csum_offset: U16::new(0xFFFF), ..hdr(flags, 0) };
        let pkt = tx_hdr(&h, 60, V1).unwrap_or_else(|e| panic!("flags {flags:#x}: {e:?}"));
        assert_eq!(pkt.header.flags, flags);
        assert_eq!(pkt.frame_len, 60);
    }
}

/// Family 10 (DPDK 7023f3e532): a GSO packet with `gso_size` 0 (TCPv4 negotiated, with the
/// NET_CSUM it depends on).
#[test]
fn tx_gso_tcpv4_with_gso_size_zero_family10() {
    let f = feats(VirtioFeatures::NET_CSUM | VirtioFeatures::NET_HOST_TSO4);
    assert_eq!(tx_hdr(&tso4_hdr(0), 60, f), Err(TxError::GsoSizeZero));
    assert_eq!(tx_hdr(&tso4_hdr(1448), 60, f).unwrap().header, tso4_hdr(1448));
    assert!(tx_hdr(&tso4_hdr(1), 60, f).is_ok());
}

/// Family 10: GSO types the spec does not define (2, 6, 7, 0x10, 0x1f) are rejected even with
/// every HOST_* GSO feature negotiated.
#[test]
fn tx_unknown_gso_type_is_rejected_family10() {
    let f = feats(
        VirtioFeatures::NET_CSUM
            | VirtioFeatures::NET_HOST_TSO4
            | VirtioFeatures::NET_HOST_TSO6
            | VirtioFeatures::NET_HOST_UFO
            | VirtioFeatures::NET_HOST_USO
            | VirtioFeatures::NET_HOST_ECN,
    );
    for gso_type in [2u8, 6, 7, 0x10, 0x1F, 0x82, 0x86] {
        let h = VirtioNetHdr { gso_type, ..tso4_hdr(1448) };
        assert_eq!(tx_hdr(&h, 60, f), Err(TxError::GsoType { gso_type }), "gso_type {gso_type:#x}");
    }
}

/// §5.1.6.2.2: each GSO type is accepted only with its HOST_* feature negotiated.
#[test]
fn tx_gso_type_not_negotiated_is_rejected() {
    let cases = [
        (VIRTIO_NET_HDR_GSO_TCPV4, VirtioFeatures::NET_HOST_TSO4),
        (VIRTIO_NET_HDR_GSO_TCPV6, VirtioFeatures::NET_HOST_TSO6),
        (VIRTIO_NET_HDR_GSO_UDP, VirtioFeatures::NET_HOST_UFO),
        (VIRTIO_NET_HDR_GSO_UDP_L4, VirtioFeatures::NET_HOST_USO),
    ];
    let all = cases.iter().fold(VirtioFeatures::empty(), |a, c| a | c.1);
    for (gso_type, needed) in cases {
        let h = VirtioNetHdr { gso_type, ..tso4_hdr(1448) };
        let without = feats(VirtioFeatures::NET_CSUM | (all - needed));
        assert_eq!(tx_hdr(&h, 60, without), Err(TxError::GsoType { gso_type }), "gso_type {gso_type}");
        let with = feats(VirtioFeatures::NET_CSUM | needed);
        assert!(tx_hdr(&h, 60, with).is_ok(), "gso_type {gso_type} with its feature");
    }
}

/// Family 10: the ECN bit needs VIRTIO_NET_F_HOST_ECN; the error reports the whole byte.
#[test]
fn tx_ecn_bit_without_host_ecn_is_rejected_family10() {
    let ecn = VirtioNetHdr { gso_type: VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, ..tso4_hdr(1448) };
    let tso = VirtioFeatures::NET_CSUM | VirtioFeatures::NET_HOST_TSO4;
    assert_eq!(tx_hdr(&ecn, 60, feats(tso)), Err(TxError::GsoType { gso_type: 0x81 }));
    assert!(tx_hdr(&ecn, 60, feats(tso | VirtioFeatures::NET_HOST_ECN)).is_ok());
}

/// The ECN bit on a frame without GSO names no segmentation to apply it to: refused even with
/// `HOST_ECN`, as Linux's `virtio_net_hdr_to_skb` refuses it.
#[test]
fn tx_ecn_bit_without_a_gso_type_is_rejected_family10() {
    let h = VirtioNetHdr { gso_type: VIRTIO_NET_HDR_GSO_ECN, ..hdr(0, 0) };
    let f = feats(VirtioFeatures::NET_CSUM | VirtioFeatures::NET_HOST_TSO4 | VirtioFeatures::NET_HOST_ECN);
    assert_eq!(tx_hdr(&h, 60, f), Err(TxError::GsoType { gso_type: 0x80 }));
}

/// §5.1.6.2.2: with both UDP-tunnel bits set the device "MUST NOT accept the packet", whatever
/// else the header says; a single tunnel bit is a GSO type this core never offers.
#[test]
fn tx_both_udp_tunnel_bits_are_rejected_family10() {
    let f = feats(VirtioFeatures::NET_CSUM | VirtioFeatures::NET_HOST_TSO4 | VirtioFeatures::NET_HOST_ECN);
    for gso_type in [0x60u8, 0x61, 0x64, 0xE1] {
        let h = VirtioNetHdr { gso_type, ..tso4_hdr(1448) };
        assert_eq!(tx_hdr(&h, 60, f), Err(TxError::TunnelBothBits), "gso_type {gso_type:#x}");
        // Even with gso_size 0 and no checksum request.
        let bare = VirtioNetHdr { gso_type, ..hdr(0, 0) };
        assert_eq!(tx_hdr(&bare, 60, f), Err(TxError::TunnelBothBits));
    }
    for gso_type in [0x21u8, 0x41] {
        let h = VirtioNetHdr { gso_type, ..tso4_hdr(1448) };
        assert_eq!(tx_hdr(&h, 60, f), Err(TxError::GsoType { gso_type }));
    }
}

/// Family 10 / §5.1.6.2.2: the device "MUST NOT rely on hdr_len to be correct": 0 and values
/// beyond the frame are accepted and change neither the frame length nor its bytes.
#[test]
fn tx_hdr_len_zero_or_beyond_frame_is_accepted_family10() {
    let f = feats(VirtioFeatures::NET_CSUM | VirtioFeatures::NET_HOST_TSO4);
    let fr = frame(60);
    for hdr_len in [0u16, 61, 1000, 0xFFFF] {
        let h = VirtioNetHdr { hdr_len: U16::new(hdr_len), ..tso4_hdr(1448) };
        let hb = hdr_bytes(&h, 12);
        let (pkt, got) = tx(&[Buf::readable(&hb), Buf::readable(&fr)], f).unwrap();
        assert_eq!((pkt.header.hdr_len.get(), pkt.header_len, pkt.frame_len), (hdr_len, 12, 60));
        assert_eq!(got, fr);
    }
}

/// §5.1.6.1 legacy interface: without VERSION_1 and MRG_RXBUF the header is 10 bytes, the frame
/// starts at byte 10 and `num_buffers` reads as 0; MRG_RXBUF alone brings back 12 bytes.
#[test]
fn tx_legacy_10_byte_header_without_version_1_or_mrg_rxbuf() {
    let legacy = VirtioFeatures::NET_CSUM;
    assert_eq!(header_len(legacy), 10);
    let h = VirtioNetHdr { gso_size: U16::new(0x1234), ..csum_hdr(20, 6) };
    let hb = hdr_bytes(&h, 10);
    let fr = frame(30);
    // Two frame bytes sit where a modern header's num_buffers would be.
    let mut first = hb.clone();
    first.extend_from_slice(&fr[..2]);
    let (pkt, got) = tx(&[Buf::readable(&first), Buf::readable(&fr[2..])], legacy).unwrap();
    assert_eq!(pkt.header_len, 10);
    assert_eq!(pkt.frame_len, 30);
    assert_eq!(pkt.header, h);
    assert_eq!(pkt.header.num_buffers.get(), 0);
    assert_eq!(got, fr);
    // 10 bytes is header only.
    assert_eq!(tx(&[Buf::readable(&hb)], legacy), Err(TxError::TooShort { len: 10 }));
    // MRG_RXBUF without VERSION_1 (legacy mergeable): 12 bytes.
    let lm = VirtioFeatures::NET_MRG_RXBUF;
    let hb12 = hdr_bytes(&hdr(0, 0), 12);
    let (pkt, got) = tx(&[Buf::readable(&hb12), Buf::readable(&fr)], lm).unwrap();
    assert_eq!((pkt.header_len, pkt.frame_len), (12, 30));
    assert_eq!(got, fr);
}

// ---- RX without MRG_RXBUF: §5.1.6.3, §5.1.6.4 --------------------------------------------

/// §5.1.6.4.1: one buffer, header with `num_buffers` = 1 (whatever the caller passed), frame
/// right after it, used len = 12 + frame, published by one `used.idx` update; the rest of the
/// buffer is not written.
#[test]
fn rx_single_buffer_without_mrg_rxbuf() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, V1);
    let mut s: RxScratch<'_> = RxScratch::new();
    let (head, addr) = add_rx(&mut drv, 1526);
    let h = VirtioNetHdr { num_buffers: U16::new(99), ..hdr(0, 0) };
    let fr = frame(60);
    let out = receive(&mut q, &mut s, V1, &h, &fr).unwrap();
    assert_eq!(out, RxOutcome { buffers: 1, bytes: 72, bad_chains: 0, completed_empty: 0 });
    assert_eq!(drv.used_idx(), 0, "nothing visible before publish");
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.used_elem(0), (head as u32, 72));
    assert_eq!(read(&drv, addr, 12), rx_hdr(&hdr(0, 0), 1));
    assert_eq!(read(&drv, addr + 12, 60), fr);
    assert_eq!(read(&drv, addr + 72, 1526 - 72), vec![FILL; 1526 - 72]);
}

/// §5.1.6.4: without MRG_RXBUF one buffer may still be several descriptors (Linux "big
/// packets"): header in the first, the frame continuing across the others.
#[test]
fn rx_single_buffer_spanning_several_descriptors() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, V1);
    let mut s: RxScratch<'_> = RxScratch::new();
    let (head, a) = add(&mut drv, &[Buf::writable(12), Buf::writable(4080), Buf::writable(4096)]);
    let fr = frame(4100);
    let out = receive(&mut q, &mut s, V1, &hdr(0, 0), &fr).unwrap();
    assert_eq!((out.buffers, out.bytes), (1, 4112));
    assert!(q.publish());
    assert_eq!(drv.used_elem(0), (head as u32, 4112));
    assert_eq!(read(&drv, a[0], 12), rx_hdr(&hdr(0, 0), 1));
    let mut got = read(&drv, a[1], 4080);
    got.extend(read(&drv, a[2], 20));
    assert_eq!(got, fr);
}

/// §5.1.6.4 / §5.1.6.3.1: Linux's "big packets" receive mode (guest GSO without MRG_RXBUF)
/// posts one chain of 2 + MAX_SKB_FRAGS = 19 descriptors: the header, the rest of a page, then
/// 17 pages. With a scratch of enough segments it takes a 64 KiB frame.
#[test]
fn rx_single_buffer_linux_big_packets_chain_of_19_descriptors() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 32);
    let f = feats(VirtioFeatures::NET_GUEST_CSUM | VirtioFeatures::NET_GUEST_TSO4);
    let mut q = queue(&g, cfg, f);
    let mut s: RxScratch<'_, 32> = RxScratch::new();
    let mut bufs = vec![Buf::writable(12), Buf::writable(4096 - 12)];
    bufs.extend((0..17).map(|_| Buf::writable(4096)));
    let (head, a) = add(&mut drv, &bufs);
    let fr = frame(65535 - 12);
    let h = tso4_hdr(1448);
    let out = receive(&mut q, &mut s, f, &h, &fr).unwrap();
    assert_eq!((out.buffers, out.bytes, out.bad_chains), (1, 65535, 0));
    assert!(q.publish());
    assert_eq!(drv.used_elem(0), (head as u32, 65535));
    assert_eq!(read(&drv, a[0], 12), rx_hdr(&h, 1));
    let mut got = Vec::new();
    let mut left = fr.len();
    for (addr, b) in a.iter().zip(&bufs).skip(1) {
        let n = left.min(b.len as usize);
        got.extend(read(&drv, *addr, n));
        left -= n;
    }
    assert_eq!(got, fr);
}

/// §5.1.6.1 legacy: without VERSION_1 and MRG_RXBUF the RX header is 10 bytes (no
/// `num_buffers`) and the frame starts at byte 10.
#[test]
fn rx_legacy_10_byte_header() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let legacy = VirtioFeatures::empty();
    let mut q = queue(&g, cfg, legacy);
    let mut s: RxScratch<'_> = RxScratch::new();
    let (head, addr) = add_rx(&mut drv, 100);
    let fr = frame(50);
    let out = receive(&mut q, &mut s, legacy, &hdr(0, 0), &fr).unwrap();
    assert_eq!((out.buffers, out.bytes), (1, 60));
    assert!(q.publish());
    assert_eq!(drv.used_elem(0), (head as u32, 60));
    assert_eq!(read(&drv, addr, 10), vec![0u8; 10]);
    assert_eq!(read(&drv, addr + 10, 50), fr);
    assert_eq!(read(&drv, addr + 60, 40), vec![FILL; 40]);
}

/// §5.1.6.4.1: a frame too large for the single buffer is refused with exact sizes; nothing is
/// published and the buffer is given back, so the next (fitting) frame takes the same head.
#[test]
fn rx_frame_too_large_without_mrg_rxbuf_gives_buffer_back() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, V1);
    let mut s: RxScratch<'_> = RxScratch::new();
    let (head, addr) = add_rx(&mut drv, 100);
    let _second = add_rx(&mut drv, 1000);
    assert_eq!(
        receive(&mut q, &mut s, V1, &hdr(0, 0), &frame(89)),
        Err(RxError::FrameTooLarge { needed: 101, available: 100 })
    );
    assert_eq!((q.next_avail(), q.next_used()), (0, 0));
    assert!(!q.publish());
    assert_eq!(drv.used_idx(), 0);
    assert_eq!(read(&drv, addr, 100), vec![FILL; 100], "refused buffer untouched");
    // 12 + 88 == 100 exactly fits the same buffer.
    let fr = frame(88);
    let out = receive(&mut q, &mut s, V1, &hdr(0, 0), &fr).unwrap();
    assert_eq!((out.buffers, out.bytes, out.bad_chains), (1, 100, 0));
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.used_elem(0), (head as u32, 100));
    assert_eq!(read(&drv, addr + 12, 88), fr);
}

// ---- RX header offloads: §5.1.6.4.1 ------------------------------------------------------

/// §5.1.6.4.1: without VIRTIO_NET_F_GUEST_CSUM the device MUST set `flags` to 0: NEEDS_CSUM
/// (a checksum still to complete) is refused before any buffer is taken, DATA_VALID (a hint)
/// is cleared and the frame delivered; both pass through once negotiated.
#[test]
fn rx_checksum_flags_need_guest_csum() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, V1);
    let mut s: RxScratch<'_> = RxScratch::new();
    let fr = frame(60);
    for h in [csum_hdr(34, 16), hdr(3, 0)] {
        assert_eq!(receive(&mut q, &mut s, V1, &h, &fr), Err(RxError::OffloadNotNegotiated));
        assert_eq!((q.next_avail(), q.next_used()), (0, 0));
    }
    let (head, addr) = add_rx(&mut drv, 200);
    let out = receive(&mut q, &mut s, V1, &hdr(VIRTIO_NET_HDR_F_DATA_VALID, 0), &fr).unwrap();
    assert_eq!(out.buffers, 1);
    assert!(q.publish());
    assert_eq!(drv.used_elem(0), (head as u32, 72));
    assert_eq!(read(&drv, addr, 12), rx_hdr(&hdr(0, 0), 1), "DATA_VALID cleared");
    let (head, addr) = add_rx(&mut drv, 200);
    // RSC_INFO is never offered by this core.
    let rsc = hdr(VIRTIO_NET_HDR_F_RSC_INFO, 0);
    let f = feats(VirtioFeatures::NET_GUEST_CSUM);
    assert_eq!(receive(&mut q, &mut s, f, &rsc, &fr), Err(RxError::OffloadNotNegotiated));
    assert_eq!(q.next_avail(), 1);

    let h = csum_hdr(34, 16);
    let out = receive(&mut q, &mut s, f, &h, &fr).unwrap();
    assert_eq!((out.buffers, out.bytes), (1, 72));
    assert!(q.publish());
    assert_eq!(drv.used_elem(1), (head as u32, 72));
    assert_eq!(read(&drv, addr, 12), rx_hdr(&h, 1));
}

/// §5.1.6.4.1 (the rules are `offload::rx_delivery`'s): flag bits the core does not know
/// (e.g. 0x08, `UDP_TUNNEL_CSUM`, which "the device MUST NOT set" without its feature) never
/// reach a driver, with GUEST_CSUM as without; a lone ECN bit without a GSO type is cleared.
#[test]
fn rx_unknown_flag_bits_and_a_lone_ecn_bit_are_cleared() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let f = feats(VirtioFeatures::NET_GUEST_CSUM);
    let mut q = queue(&g, cfg, f);
    let mut s: RxScratch<'_> = RxScratch::new();
    let fr = frame(60);
    let sent = [csum_hdr(34, 16), hdr(VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_GSO_ECN)];
    let seen = [csum_hdr(34, 16), hdr(VIRTIO_NET_HDR_F_DATA_VALID, 0)];
    for (i, (h, want)) in sent.iter().zip(seen).enumerate() {
        let (_, addr) = add_rx(&mut drv, 200);
        let h = VirtioNetHdr { flags: h.flags | 0x08 | 0x40, ..*h };
        receive(&mut q, &mut s, f, &h, &fr).unwrap();
        assert!(q.publish());
        assert_eq!(read(&drv, addr, 12), rx_hdr(&want, 1), "frame {i}");
    }
}

/// §5.1.6.4.1: the device must not set GSO types the driver did not negotiate (GUEST_TSO4 for
/// TCPV4, GUEST_ECN for the ECN bit; unknown types never).
#[test]
fn rx_gso_type_needs_guest_tso() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let csum = feats(VirtioFeatures::NET_GUEST_CSUM);
    let mut q = queue(&g, cfg, csum);
    let mut s: RxScratch<'_> = RxScratch::new();
    let (head, addr) = add_rx(&mut drv, 2000);
    let fr = frame(1000);
    let tso = tso4_hdr(1448);
    let ecn = VirtioNetHdr { gso_type: VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, ..tso };
    let tso4 = csum | VirtioFeatures::NET_GUEST_TSO4;
    let refused = [
        (tso, csum),
        (tso, csum | VirtioFeatures::NET_GUEST_TSO6),
        (ecn, tso4),
        (hdr(0, 2), tso4 | VirtioFeatures::NET_GUEST_ECN),
        (hdr(0, 0x21), tso4),
    ];
    for (h, f) in refused {
        assert_eq!(
            receive(&mut q, &mut s, f, &h, &fr),
            Err(RxError::OffloadNotNegotiated),
            "gso_type {:#x} with {f:?}",
            h.gso_type
        );
        assert_eq!(q.next_avail(), 0);
    }
    let out = receive(&mut q, &mut s, tso4 | VirtioFeatures::NET_GUEST_ECN, &ecn, &fr).unwrap();
    assert_eq!((out.buffers, out.bytes), (1, 1012));
    assert!(q.publish());
    assert_eq!(drv.used_elem(0), (head as u32, 1012));
    assert_eq!(read(&drv, addr, 12), rx_hdr(&ecn, 1));
}

// ---- RX with MRG_RXBUF: §5.1.6.4.1 and family 11 -----------------------------------------

/// Collects what a driver reassembles from used entries `[from, from + n)`: the first
/// buffer's bytes after the header, then every following buffer, each up to its used len.
fn reassemble(drv: &Driver<'_>, bufs: &[(u16, u64)], from: u16, n: u16) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let (id, len) = drv.used_elem(from + i);
        let &(_, addr) = bufs.iter().find(|b| b.0 as u32 == id).expect("used id is a buffer");
        let skip = if i == 0 { 12 } else { 0 };
        out.extend(read(drv, addr + skip, len as usize - skip as usize));
    }
    out
}

/// §5.1.6.4.1: a 250-byte frame in 100-byte buffers: `num_buffers` 3 in the first buffer's
/// header, used lens 100, 100, 62 (all but the last full), contiguous entries in ring order,
/// all published by one `used.idx` update; the spare buffer stays available.
#[test]
fn rx_mergeable_frame_in_100_byte_buffers() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, MRG);
    let mut s: RxScratch<'_> = RxScratch::new();
    let bufs: Vec<_> = (0..4).map(|_| add_rx(&mut drv, 100)).collect();
    let fr = frame(250);
    let out = receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr).unwrap();
    assert_eq!(out, RxOutcome { buffers: 3, bytes: 262, bad_chains: 0, completed_empty: 0 });
    assert_eq!(drv.used_idx(), 0);
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 3);
    for (i, len) in [100u32, 100, 62].into_iter().enumerate() {
        assert_eq!(drv.used_elem(i as u16), (bufs[i].0 as u32, len), "used entry {i}");
    }
    assert_eq!(read(&drv, bufs[0].1, 12), rx_hdr(&hdr(0, 0), 3));
    assert_eq!(reassemble(&drv, &bufs, 0, 3), fr);
    assert_eq!(read(&drv, bufs[2].1 + 62, 38), vec![FILL; 38]);
    assert_eq!(read(&drv, bufs[3].1, 100), vec![FILL; 100]);
    assert_eq!(q.next_avail(), 3);
}

/// §5.1.6.3.1: with MRG_RXBUF a buffer may be exactly header-sized; it then holds only the header.
#[test]
fn rx_mergeable_first_buffer_header_only() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, MRG);
    let mut s: RxScratch<'_> = RxScratch::new();
    let bufs = [add_rx(&mut drv, 12), add_rx(&mut drv, 100), add_rx(&mut drv, 100)];
    let fr = frame(150);
    let out = receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr).unwrap();
    assert_eq!((out.buffers, out.bytes, out.bad_chains), (3, 162, 0));
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 3);
    assert_eq!(drv.used_elem(0), (bufs[0].0 as u32, 12));
    assert_eq!(drv.used_elem(1), (bufs[1].0 as u32, 100));
    assert_eq!(drv.used_elem(2), (bufs[2].0 as u32, 50));
    assert_eq!(read(&drv, bufs[0].1, 12), rx_hdr(&hdr(0, 0), 3));
    assert_eq!(reassemble(&drv, &bufs, 0, 3), fr);

    // An empty frame is a header alone: one header-sized buffer, num_buffers 1.
    let (head, addr) = add_rx(&mut drv, 12);
    let out = receive(&mut q, &mut s, MRG, &hdr(0, 0), &[]).unwrap();
    assert_eq!((out.buffers, out.bytes), (1, 12));
    assert!(q.publish());
    assert_eq!(drv.used_elem(3), (head as u32, 12));
    assert_eq!(read(&drv, addr, 12), rx_hdr(&hdr(0, 0), 1));
}

/// Family 11: a first buffer smaller than the header is completed with len 0 (and counted);
/// the packet goes into the following buffers with `num_buffers` counting only those.
#[test]
fn rx_mergeable_first_buffer_smaller_than_header_family11() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, MRG);
    let mut s: RxScratch<'_> = RxScratch::new();
    let small = add_rx(&mut drv, 4);
    let bufs = [small, add_rx(&mut drv, 100), add_rx(&mut drv, 100)];
    let fr = frame(150);
    let out = receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr).unwrap();
    assert_eq!(out, RxOutcome { buffers: 2, bytes: 162, bad_chains: 1, completed_empty: 1 });
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 3);
    assert_eq!(drv.used_elem(0), (small.0 as u32, 0));
    assert_eq!(drv.used_elem(1), (bufs[1].0 as u32, 100));
    assert_eq!(drv.used_elem(2), (bufs[2].0 as u32, 62));
    assert_eq!(read(&drv, small.1, 4), vec![FILL; 4], "too-small buffer not written");
    assert_eq!(read(&drv, bufs[1].1, 12), rx_hdr(&hdr(0, 0), 2));
    assert_eq!(reassemble(&drv, &bufs, 1, 2), fr);
}

/// Family 11: 1-byte buffers after a header-only first buffer: every buffer full, one used
/// entry per byte, in order.
#[test]
fn rx_mergeable_one_byte_buffers_family11() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 32);
    let mut q = queue(&g, cfg, MRG);
    let mut s: RxScratch<'_> = RxScratch::new();
    let mut bufs = vec![add_rx(&mut drv, 12)];
    bufs.extend((0..25).map(|_| add_rx(&mut drv, 1)));
    let fr = frame(20);
    let out = receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr).unwrap();
    assert_eq!((out.buffers, out.bytes, out.bad_chains), (21, 32, 0));
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 21);
    assert_eq!(drv.used_elem(0), (bufs[0].0 as u32, 12));
    for i in 1..21u16 {
        assert_eq!(drv.used_elem(i), (bufs[i as usize].0 as u32, 1), "used entry {i}");
    }
    assert_eq!(read(&drv, bufs[0].1, 12), rx_hdr(&hdr(0, 0), 21));
    assert_eq!(reassemble(&drv, &bufs, 0, 21), fr);
    assert_eq!(read(&drv, bufs[21].1, 1), [FILL]);
    assert_eq!(q.next_avail(), 21);
}

/// Family 11: fewer buffers than the packet needs: `NoBuffers`, nothing published (no partial
/// packet with a wrong `num_buffers`), every taken head given back; once the driver adds a
/// buffer the same packet lands in the original buffers first.
#[test]
fn rx_mergeable_not_enough_buffers_publishes_nothing_family11() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, MRG);
    let mut s: RxScratch<'_> = RxScratch::new();
    let mut bufs = vec![add_rx(&mut drv, 100), add_rx(&mut drv, 100)];
    let fr = frame(250);
    assert_eq!(receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr), Err(RxError::NoBuffers));
    assert_eq!((q.next_avail(), q.next_used()), (0, 0));
    assert!(!q.publish());
    assert_eq!(drv.used_idx(), 0);
    assert_eq!(read(&drv, bufs[0].1, 100), vec![FILL; 100], "no header written");
    // Still short on a second try.
    assert_eq!(receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr), Err(RxError::NoBuffers));
    assert_eq!(q.next_avail(), 0);

    bufs.push(add_rx(&mut drv, 100));
    let out = receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr).unwrap();
    assert_eq!((out.buffers, out.bytes, out.bad_chains), (3, 262, 0));
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 3);
    assert_eq!(drv.used_elem(0), (bufs[0].0 as u32, 100));
    assert_eq!(drv.used_elem(1), (bufs[1].0 as u32, 100));
    assert_eq!(drv.used_elem(2), (bufs[2].0 as u32, 62));
    assert_eq!(read(&drv, bufs[0].1, 12), rx_hdr(&hdr(0, 0), 3));
    assert_eq!(reassemble(&drv, &bufs, 0, 3), fr);
}

/// Family 11: a frame larger than every buffer a full ring can hold gets `FrameTooLarge`, not
/// `NoBuffers` (no kick could ever bring more buffers: the caller must drop the frame); nothing
/// is consumed, and a smaller frame still goes through.
#[test]
fn rx_mergeable_frame_larger_than_full_ring_family11() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 4);
    let mut q = queue(&g, cfg, MRG);
    let mut s: RxScratch<'_> = RxScratch::new();
    let bufs: Vec<_> = (0..4).map(|_| add_rx(&mut drv, 100)).collect();
    assert_eq!(
        receive(&mut q, &mut s, MRG, &hdr(0, 0), &frame(389)),
        Err(RxError::FrameTooLarge { needed: 401, available: 400 })
    );
    assert_eq!((q.next_avail(), q.next_used()), (0, 0));
    assert_eq!(q.avail().refresh(), Ok(4), "the ring is full");
    assert!(!q.publish());
    // 12 + 388 = 4 × 100: the whole ring, all buffers full.
    let fr = frame(388);
    let out = receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr).unwrap();
    assert_eq!((out.buffers, out.bytes), (4, 400));
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 4);
    assert_eq!(reassemble(&drv, &bufs, 0, 4), fr);
}

/// Family 11: a ring holding exactly size − 1 buffers, all needed by one packet; then again
/// after the ring and the descriptor indices wrap.
#[test]
fn rx_mergeable_ring_of_size_minus_one_buffers_family11() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 8);
    let mut q = queue(&g, cfg, MRG);
    let mut s: RxScratch<'_> = RxScratch::new();
    let fr = frame(688); // 12 + 688 = 7 × 100
    for round in 0..2u16 {
        let bufs: Vec<_> = (0..7).map(|_| add_rx(&mut drv, 100)).collect();
        let out = receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr).unwrap();
        assert_eq!((out.buffers, out.bytes, out.bad_chains), (7, 700, 0));
        assert!(q.publish());
        assert_eq!(drv.used_idx(), 7 * (round + 1));
        for i in 0..7u16 {
            assert_eq!(drv.used_elem(7 * round + i), (bufs[i as usize].0 as u32, 100));
        }
        assert_eq!(read(&drv, bufs[0].1, 12), rx_hdr(&hdr(0, 0), 7));
        assert_eq!(reassemble(&drv, &bufs, 7 * round, 7), fr);
        // The ring is now empty.
        assert_eq!(receive(&mut q, &mut s, MRG, &hdr(0, 0), &frame(1)), Err(RxError::NoBuffers));
        drv.reset_alloc();
    }
}

/// Family 6: receive chains with device-readable descriptors (readable + writable, readable
/// only) are completed with len 0 and skipped; the packet goes into the next good buffer.
#[test]
fn rx_chain_with_readable_descriptor_is_skipped_family6() {
    for f in [V1, MRG] {
        let g = Guest::new(1 << 20);
        let (cfg, mut drv) = setup(&g, 16);
        let mut q = queue(&g, cfg, f);
        let mut s: RxScratch<'_> = RxScratch::new();
        let ro = [RO; 16];
        let (mixed, _) = add(&mut drv, &[Buf::readable(&ro), Buf::writable(100)]);
        let (ro_only, _) = add(&mut drv, &[Buf::readable(&ro)]);
        let (good, addr) = add_rx(&mut drv, 100);
        let fr = frame(60);
        let out = receive(&mut q, &mut s, f, &hdr(0, 0), &fr).unwrap();
        assert_eq!(out, RxOutcome { buffers: 1, bytes: 72, bad_chains: 2, completed_empty: 2 }, "{f:?}");
        assert!(q.publish());
        assert_eq!(drv.used_idx(), 3);
        assert_eq!(drv.used_elem(0), (mixed as u32, 0));
        assert_eq!(drv.used_elem(1), (ro_only as u32, 0));
        assert_eq!(drv.used_elem(2), (good as u32, 72));
        assert_eq!(read(&drv, addr, 12), rx_hdr(&hdr(0, 0), 1));
        assert_eq!(read(&drv, addr + 12, 60), fr);
    }
}

/// Families 6/11: a malformed chain in the middle of a merged packet: the buffers reserved
/// before it are completed with len 0 in ring order, then the bad one, then the packet starts
/// over in the following buffers.
#[test]
fn rx_mergeable_bad_chain_mid_packet_releases_reserved_buffers_in_order() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, MRG);
    let mut s: RxScratch<'_> = RxScratch::new();
    let a = add_rx(&mut drv, 100);
    let b = add_rx(&mut drv, 100);
    let ro = [RO; 8];
    let (bad, bad_addrs) = add(&mut drv, &[Buf::readable(&ro), Buf::writable(100)]);
    let bufs = [add_rx(&mut drv, 100), add_rx(&mut drv, 100), add_rx(&mut drv, 100)];
    let fr = frame(250);
    let out = receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr).unwrap();
    assert_eq!(out, RxOutcome { buffers: 3, bytes: 262, bad_chains: 1, completed_empty: 3 });
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 6);
    let expect = [(a.0, 0), (b.0, 0), (bad, 0), (bufs[0].0, 100), (bufs[1].0, 100), (bufs[2].0, 62)];
    for (i, (id, len)) in expect.into_iter().enumerate() {
        assert_eq!(drv.used_elem(i as u16), (id as u32, len), "used entry {i}");
    }
    assert_eq!(read(&drv, bufs[0].1, 12), rx_hdr(&hdr(0, 0), 3));
    assert_eq!(reassemble(&drv, &bufs, 3, 3), fr);
    assert_eq!(read(&drv, bad_addrs[0], 8), ro.to_vec());
}

/// Family 11: zero-length buffers after the first hold nothing but are "used completely" (len
/// 0) and counted in `num_buffers`; the frame continues in the next buffer.
#[test]
fn rx_mergeable_zero_length_buffers_after_the_first_family11() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, MRG);
    let mut s: RxScratch<'_> = RxScratch::new();
    let bufs = [add_rx(&mut drv, 100), add_rx(&mut drv, 0), add_rx(&mut drv, 100)];
    let fr = frame(150);
    let out = receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr).unwrap();
    assert_eq!((out.buffers, out.bytes, out.bad_chains), (3, 162, 0));
    assert!(q.publish());
    assert_eq!(drv.used_elem(0), (bufs[0].0 as u32, 100));
    assert_eq!(drv.used_elem(1), (bufs[1].0 as u32, 0));
    assert_eq!(drv.used_elem(2), (bufs[2].0 as u32, 62));
    assert_eq!(read(&drv, bufs[0].1, 12), rx_hdr(&hdr(0, 0), 3));
    assert_eq!(reassemble(&drv, &bufs, 0, 3), fr);
}

/// Families 1/11: a malformed chain met before the ring runs short is completed with len 0 (it
/// cannot be given back), the good buffers taken after it are given back, and the packet
/// later lands in them.
#[test]
fn rx_mergeable_no_buffers_after_a_bad_chain_family11() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, MRG);
    let mut s: RxScratch<'_> = RxScratch::new();
    let small = add_rx(&mut drv, 4);
    let mut bufs = vec![add_rx(&mut drv, 100)];
    let fr = frame(250);
    assert_eq!(receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr), Err(RxError::NoBuffers));
    assert_eq!((q.next_avail(), q.next_used()), (1, 1));
    assert_eq!(drv.used_idx(), 0);
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.used_elem(0), (small.0 as u32, 0));

    bufs.push(add_rx(&mut drv, 100));
    bufs.push(add_rx(&mut drv, 100));
    let out = receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr).unwrap();
    assert_eq!((out.buffers, out.bytes, out.bad_chains), (3, 262, 0));
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 4);
    for (i, len) in [100u32, 100, 62].into_iter().enumerate() {
        assert_eq!(drv.used_elem(1 + i as u16), (bufs[i].0 as u32, len));
    }
    assert_eq!(reassemble(&drv, &bufs, 1, 3), fr);
}

/// Family 1 on RX: a ring slot holding a head ≥ queue size is consumed without a completion
/// (there is no valid id); a chain whose `next` is out of range is completed with len 0. Both
/// count as bad chains, and buffers reserved before them are completed empty, in ring order.
#[test]
fn rx_malformed_chains_are_completed_or_skipped_family1() {
    for f in [V1, MRG] {
        let g = Guest::new(1 << 20);
        let (cfg, mut drv) = setup(&g, 16);
        let mut q = queue(&g, cfg, f);
        let mut s: RxScratch<'_> = RxScratch::new();
        drv.stage(99);
        drv.kick();
        let broken = add_broken_rx(&mut drv);
        let (good, gaddr) = add_rx(&mut drv, 100);
        let fr = frame(60);
        let out = receive(&mut q, &mut s, f, &hdr(0, 0), &fr).unwrap();
        assert_eq!(out, RxOutcome { buffers: 1, bytes: 72, bad_chains: 2, completed_empty: 1 }, "{f:?}");
        assert!(q.publish());
        assert_eq!(drv.used_idx(), 2);
        assert_eq!(drv.used_elem(0), (broken as u32, 0));
        assert_eq!(drv.used_elem(1), (good as u32, 72));
        assert_eq!(read(&drv, gaddr + 12, 60), fr);
    }

    // Mid-packet: the buffer reserved before the out-of-range slot is completed empty.
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, MRG);
    let mut s: RxScratch<'_> = RxScratch::new();
    let first = add_rx(&mut drv, 100);
    drv.stage(0xFFFF);
    drv.kick();
    let bufs = [add_rx(&mut drv, 100), add_rx(&mut drv, 100), add_rx(&mut drv, 100)];
    let fr = frame(250);
    let out = receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr).unwrap();
    assert_eq!((out.buffers, out.bytes, out.bad_chains), (3, 262, 1));
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 4);
    assert_eq!(drv.used_elem(0), (first.0 as u32, 0));
    for (i, len) in [100u32, 100, 62].into_iter().enumerate() {
        assert_eq!(drv.used_elem(1 + i as u16), (bufs[i].0 as u32, len));
    }
    assert_eq!(reassemble(&drv, &bufs, 1, 3), fr);
}

/// Family 1 on RX, by ring: a slot holding a head ≥ queue size has no id to complete it. On a
/// plain split ring the slot is skipped and the burst goes on (the next frame lands in the next
/// buffer); with `VIRTIO_F_IN_ORDER` a later completion would also complete it
/// (§2.7.8.2), so the burst stops there with the typed error (`PopError::unreturnable_on`),
/// the frames before it placed and the buffer after it not taken.
#[test]
fn rx_out_of_range_head_stops_an_in_order_ring_and_is_skipped_on_a_plain_one() {
    for f in [V1, MRG] {
        for in_order in [false, true] {
            let g = Guest::new(1 << 20);
            let (cfg, mut drv) = setup(&g, 16);
            let qf = if in_order { f | VirtioFeatures::IN_ORDER } else { f };
            let mut q = queue(&g, cfg, qf);
            assert_eq!(q.in_order(), in_order);
            let mut s: RxScratch<'_> = RxScratch::new();
            let a = add_rx(&mut drv, 100);
            drv.stage(99);
            drv.kick();
            let b = add_rx(&mut drv, 100);
            let fr = frame(60);
            let out = receive_burst(&mut q, &mut s, f, 3, |_| (hdr(0, 0), &fr[..]));
            let case = format!("{f:?}, IN_ORDER {in_order}");
            if in_order {
                let stop = RxError::Ring(PopError::HeadOutOfRange { head: 99 });
                assert_eq!(
                    out,
                    RxBurst { placed: 1, bytes: 60, refused: 0, bad_chains: 0, stopped: Some(stop) },
                    "{case}"
                );
                assert_eq!(q.next_avail(), 2, "{case}: the bad slot consumed, the buffer after it not taken");
            } else {
                let stop = Some(RxError::NoBuffers);
                assert_eq!(out, RxBurst { placed: 2, bytes: 120, refused: 0, bad_chains: 1, stopped: stop }, "{case}");
                assert_eq!(q.next_avail(), 3, "{case}");
            }
            assert!(q.publish());
            assert_eq!(drv.used_elem(0), (a.0 as u32, 72), "{case}");
            assert_eq!(read(&drv, a.1 + 12, 60), fr, "{case}");
            if in_order {
                assert_eq!(drv.used_idx(), 1, "{case}: nothing completed for the bad slot or after it");
                assert_eq!(read(&drv, b.1, 100), vec![FILL; 100], "{case}");
            } else {
                assert_eq!(drv.used_idx(), 2, "{case}");
                assert_eq!(drv.used_elem(1), (b.0 as u32, 72), "{case}");
                assert_eq!(read(&drv, b.1 + 12, 60), fr, "{case}");
            }
        }
    }
}

/// The same on an IN_ORDER ring in the middle of a merged packet: the buffer reserved for the
/// frame before the out-of-range slot cannot be given back (the slot after it is consumed), so
/// it is completed with len 0, in ring order, and untouched; `receive` stops with the typed
/// error and the buffers after the slot are not taken. The first frame meets the slot on the
/// fast path, where nothing is reserved.
#[test]
fn rx_out_of_range_head_mid_packet_on_an_in_order_ring_returns_the_reserved_buffer_empty() {
    let f = MRG | VirtioFeatures::IN_ORDER;
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, f);
    let mut s: RxScratch<'_> = RxScratch::new();
    drv.stage(16);
    drv.kick();
    assert_eq!(
        receive(&mut q, &mut s, MRG, &hdr(0, 0), &frame(60)),
        Err(RxError::Ring(PopError::HeadOutOfRange { head: 16 }))
    );
    assert_eq!((q.next_avail(), q.next_used()), (1, 0));
    assert!(!q.publish());

    let first = add_rx(&mut drv, 100);
    drv.stage(0xFFFF);
    drv.kick();
    let bufs = [add_rx(&mut drv, 100), add_rx(&mut drv, 100), add_rx(&mut drv, 100)];
    let fr = frame(250);
    assert_eq!(
        receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr),
        Err(RxError::Ring(PopError::HeadOutOfRange { head: 0xFFFF }))
    );
    assert_eq!((q.next_avail(), q.next_used()), (3, 1));
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.used_elem(0), (first.0 as u32, 0));
    assert_eq!(read(&drv, first.1, 100), vec![FILL; 100], "the returned buffer was not written");
    for (_, addr) in bufs {
        assert_eq!(read(&drv, addr, 100), vec![FILL; 100]);
    }
}

/// Family 3 on RX: `avail.idx` jumping by more than the queue size while a merged packet is
/// being gathered: the error is reported, the buffers already taken are given back, and once
/// the driver repairs the index the packet lands in them.
#[test]
fn rx_mergeable_broken_avail_index_gives_buffers_back_family3() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, MRG);
    let mut s: RxScratch<'_> = RxScratch::new();
    let mut bufs = vec![add_rx(&mut drv, 100), add_rx(&mut drv, 100)];
    // The device has seen avail.idx 2; then the driver scribbles 19 (17 ahead of the device).
    assert_eq!(q.avail().refresh(), Ok(2));
    drv.set_avail_idx(19);
    let fr = frame(250);
    assert_eq!(
        receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr),
        Err(RxError::Ring(PopError::AvailIndex(AvailIndexError { avail_idx: 19, next_avail: 2 })))
    );
    assert_eq!((q.next_avail(), q.next_used()), (0, 0));
    assert!(!q.publish());
    assert_eq!(drv.used_idx(), 0);
    // The driver adds a buffer, which also stores its own (sane) index, 3.
    bufs.push(add_rx(&mut drv, 100));
    let out = receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr).unwrap();
    assert_eq!((out.buffers, out.bytes, out.bad_chains), (3, 262, 0));
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 3);
    for (i, len) in [100u32, 100, 62].into_iter().enumerate() {
        assert_eq!(drv.used_elem(i as u16), (bufs[i].0 as u32, len));
    }
    assert_eq!(reassemble(&drv, &bufs, 0, 3), fr);
}

/// A frame needing more than `MAX_RX_BUFFERS` buffers is refused with nothing consumed; one
/// needing exactly `MAX_RX_BUFFERS` is placed.
#[test]
fn rx_mergeable_more_than_max_rx_buffers_consumes_nothing() {
    assert_eq!(MAX_RX_BUFFERS, 256);
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 512);
    let mut q = queue(&g, cfg, MRG);
    let mut s: RxScratch<'_> = RxScratch::new();
    let bufs: Vec<_> = (0..300).map(|_| add_rx(&mut drv, 16)).collect();
    // 12 + 4085 = 4097 bytes = 257 buffers of 16.
    let big = frame(4085);
    assert_eq!(receive(&mut q, &mut s, MRG, &hdr(0, 0), &big), Err(RxError::TooManyBuffers));
    assert_eq!((q.next_avail(), q.next_used()), (0, 0));
    assert!(!q.publish());
    assert_eq!(drv.used_idx(), 0);
    assert_eq!(read(&drv, bufs[0].1, 16), vec![FILL; 16]);

    // 12 + 4084 = 4096 bytes = exactly 256 buffers.
    let fr = frame(4084);
    let out = receive(&mut q, &mut s, MRG, &hdr(0, 0), &fr).unwrap();
    assert_eq!((out.buffers, out.bytes, out.bad_chains), (256, 4096, 0));
    assert!(q.publish());
    assert_eq!(drv.used_idx(), 256);
    for i in 0..256u16 {
        assert_eq!(drv.used_elem(i), (bufs[i as usize].0 as u32, 16));
    }
    assert_eq!(read(&drv, bufs[0].1, 12), rx_hdr(&hdr(0, 0), 256));
    assert_eq!(reassemble(&drv, &bufs, 0, 256), fr);
}

/// Family 6 / §2.7.5.1: `receive` never writes a device-readable buffer, wherever such a
/// buffer appears (first chain, mid-packet, on the single-buffer path, after a refusal).
#[test]
fn rx_never_writes_device_readable_buffers_family6() {
    for f in [V1, MRG] {
        let g = Guest::new(1 << 20);
        let (cfg, mut drv) = setup(&g, 32);
        let mut q = queue(&g, cfg, f);
        let mut s: RxScratch<'_> = RxScratch::new();
        let ro = [RO; 64];
        let mut readable = Vec::new();
        let mut note = |a: Vec<u64>| readable.push(a[0]);
        note(add(&mut drv, &[Buf::readable(&ro)]).1);
        note(add(&mut drv, &[Buf::readable(&ro), Buf::writable(64)]).1);
        add_rx(&mut drv, 64);
        note(add(&mut drv, &[Buf::readable(&ro), Buf::writable(200)]).1);
        for _ in 0..6 {
            add_rx(&mut drv, 64);
        }
        note(add(&mut drv, &[Buf::readable(&ro[..1]), Buf::writable(4)]).1);
        for len in [40usize, 100, 2000, 30, 120] {
            let _ = receive(&mut q, &mut s, f, &hdr(0, 0), &frame(len));
        }
        let _ = q.publish();
        assert!(drv.used_idx() > 0, "{f:?}: something was received");
        for (i, &addr) in readable.iter().enumerate() {
            let len = if i == 3 { 1 } else { 64 };
            assert_eq!(read(&drv, addr, len), vec![RO; len], "{f:?}: readable buffer {i}");
        }
    }
}

/// RX and TX queues in one guest: a packet the driver transmits with its header split over
/// three descriptors is parsed, completed with len 0 on TX, and looped back into mergeable RX
/// buffers with its checksum request intact.
#[test]
fn tx_to_rx_loopback_two_queues_in_one_guest() {
    let g = Guest::new(1 << 20);
    let (rx_cfg, next) = layout(GPA, 16);
    let (tx_cfg, data) = layout(next, 16);
    let end = GPA + g.mem.regions()[0].len();
    let half = ((end - data) / 2) & !15;
    let mut rx_drv = TestDriver::new(&g.mem, rx_cfg, data, half);
    let mut tx_drv = TestDriver::new(&g.mem, tx_cfg, data + half, half);
    let f = MRG | VirtioFeatures::NET_CSUM | VirtioFeatures::NET_GUEST_CSUM;
    let mut rxq = queue(&g, rx_cfg, f);
    let mut txq = queue(&g, tx_cfg, f);

    let h = csum_hdr(34, 16);
    let hb = hdr_bytes(&h, 12);
    let fr = frame(300);
    let (tx_head, _) = add(
        &mut tx_drv,
        &[Buf::readable(&hb[..5]), Buf::readable(&hb[5..9]), Buf::readable(&hb[9..]), Buf::readable(&fr)],
    );
    let bufs: Vec<_> = (0..4).map(|_| add_rx(&mut rx_drv, 128)).collect();

    let mut chain = Chain::<32>::new();
    assert!(matches!(txq.pop_into(&mut chain), Ok(Some(_))));
    let pkt = parse_tx(&chain, f).unwrap();
    let mut buf = [0u8; 1514];
    let n = pkt.read_frame(&chain, &mut buf);
    assert_eq!(n, 300);
    txq.push(chain.head(), 0);
    assert!(txq.publish());
    assert_eq!(tx_drv.used_idx(), 1);
    assert_eq!(tx_drv.used_elem(0), (tx_head as u32, 0));
    assert_eq!(rx_drv.used_idx(), 0, "TX completions stay in the TX ring");

    let mut s: RxScratch<'_> = RxScratch::new();
    let out = receive(&mut rxq, &mut s, f, &pkt.header, &buf[..n]).unwrap();
    assert_eq!((out.buffers, out.bytes), (3, 312));
    assert!(rxq.publish());
    assert_eq!(rx_drv.used_idx(), 3);
    assert_eq!(rx_drv.used_elem(2), (bufs[2].0 as u32, 56));
    assert_eq!(read(&rx_drv, bufs[0].1, 12), rx_hdr(&h, 3));
    assert_eq!(reassemble(&rx_drv, &bufs, 0, 3), fr);
    assert_eq!(tx_drv.used_idx(), 1, "RX completions stay in the RX ring");
}

/// The single-buffer fast path writes nothing before the whole chain has validated: a big
/// writable first buffer followed by a device-readable one (family 6, readable after writable)
/// is completed empty and left untouched, and the frame goes to the next chain.
#[test]
fn rx_fast_path_writes_nothing_into_a_chain_that_fails_later() {
    for f in [V1, MRG] {
        let g = Guest::new(1 << 20);
        let (cfg, mut drv) = setup(&g, 16);
        let mut q = queue(&g, cfg, f);
        let mut s: RxScratch<'_> = RxScratch::new();
        let ro = vec![RO; 64];
        let (bad, addrs) = add(&mut drv, &[Buf::writable(2048), Buf::readable(&ro)]);
        drv.write(addrs[0], &vec![FILL; 2048]);
        let good = add_rx(&mut drv, 2048);
        let fr = frame(1514);
        let out = receive(&mut q, &mut s, f, &hdr(0, 0), &fr).unwrap();
        assert_eq!(out, RxOutcome { buffers: 1, bytes: 1526, bad_chains: 1, completed_empty: 1 });
        assert!(q.publish());
        assert_eq!((drv.used_elem(0), drv.used_elem(1)), ((bad as u32, 0), (good.0 as u32, 1526)));
        assert_eq!(read(&drv, addrs[0], 2048), vec![FILL; 2048], "rejected chain untouched ({f:?})");
        assert_eq!(read(&drv, addrs[1], 64), ro);
        assert_eq!(read(&drv, good.1, 12), rx_hdr(&hdr(0, 0), 1));
        assert_eq!(read(&drv, good.1 + 12, 1514), fr);
    }
}

/// The ring of the burst tests below: 20 buffers of 100 bytes, a chain whose `next` is out of
/// range (family 1), then 23 more buffers. Returns every good buffer's (head, address).
fn burst_ring(drv: &mut Driver<'_>) -> Vec<(u16, u64)> {
    let mut bufs: Vec<_> = (0..20).map(|_| add_rx(drv, 100)).collect();
    add_broken_rx(drv);
    bufs.extend((0..23).map(|_| add_rx(drv, 100)));
    bufs
}

/// The frames of the burst tests: 64-byte frames (each fits one buffer: the deferred-copy
/// path), one with a checksum request the driver did not negotiate (refused), one of 250 bytes
/// (three merged buffers: the general path), and more frames than buffers.
fn burst_frames() -> Vec<(VirtioNetHdr, Vec<u8>)> {
    (0..45)
        .map(|i| {
            let h = if i == 20 { csum_hdr(34, 6) } else { hdr(0, 0) };
            let len = if i == 31 { 250 } else { 64 };
            let f: Vec<u8> = frame(len).iter().map(|b| b ^ i as u8).collect();
            (h, f)
        })
        .collect()
}

/// `receive_burst` leaves the guest exactly what `receive` frame by frame leaves: the same
/// used entries in the same order, the same buffer contents (headers and frames, every byte
/// after them untouched), across a burst longer than `RX_BURST` (its deferred copies are
/// flushed mid-burst), a refused frame, a malformed chain, a merged frame, and a ring that
/// runs out of buffers.
#[test]
fn rx_burst_places_frames_as_receive_does_one_by_one() {
    let frames = burst_frames();
    assert!(frames.len() > RX_BURST);

    // Frame by frame.
    let g1 = Guest::new(1 << 20);
    let (cfg, mut d1) = setup(&g1, 64);
    let b1 = burst_ring(&mut d1);
    let mut q1 = queue(&g1, cfg, MRG);
    let mut s1: RxScratch<'_> = RxScratch::new();
    let mut placed = 0;
    for (h, f) in &frames {
        match receive(&mut q1, &mut s1, MRG, h, f) {
            Ok(_) => placed += 1,
            Err(RxError::OffloadNotNegotiated) => {}
            Err(e) => {
                assert_eq!(e, RxError::NoBuffers);
                break;
            }
        }
    }
    assert!(q1.publish());

    // As one burst.
    let g2 = Guest::new(1 << 20);
    let (cfg, mut d2) = setup(&g2, 64);
    let b2 = burst_ring(&mut d2);
    let mut q2 = queue(&g2, cfg, MRG);
    let mut s2: RxScratch<'_> = RxScratch::new();
    let out = receive_burst(&mut q2, &mut s2, MRG, frames.len(), |i| (frames[i].0, &frames[i].1[..]));
    assert_eq!(
        out,
        RxBurst { placed, bytes: 40 * 64 + 250, refused: 1, bad_chains: 1, stopped: Some(RxError::NoBuffers) }
    );
    assert_eq!(placed, 41, "20 + 10 + the merged frame + 10");
    assert!(q2.publish());

    assert_eq!(d1.used_idx(), d2.used_idx());
    assert_eq!(d2.used_idx(), 44, "41 frames in 43 buffers, and the bad chain");
    for i in 0..d2.used_idx() {
        assert_eq!(d1.used_elem(i), d2.used_elem(i), "used entry {i}");
    }
    for ((_, a1), (_, a2)) in b1.iter().zip(&b2) {
        assert_eq!(read(&d1, *a1, 100), read(&d2, *a2, 100));
    }
    // And what landed is right: frame 0 whole, behind its header.
    assert_eq!(read(&d2, b2[0].1, 12), rx_hdr(&hdr(0, 0), 1));
    assert_eq!(read(&d2, b2[0].1 + 12, 64), frames[0].1);
    assert_eq!(read(&d2, b2[0].1 + 76, 24), vec![FILL; 24]);
}

/// The header is written only where guest memory differs (`store_header`), and then whole: a
/// buffer that already holds the header keeps it, one that differs in any byte gets it.
#[test]
fn rx_header_is_right_whatever_the_buffer_held() {
    let want = rx_hdr(&hdr(0, 0), 1);
    for (case, before) in [
        ("already the header", want.clone()),
        ("num_buffers differs", rx_hdr(&hdr(0, 0), 3)),
        ("first byte differs", rx_hdr(&hdr(VIRTIO_NET_HDR_F_DATA_VALID, 0), 1)),
        ("fill", vec![FILL; 12]),
    ] {
        let g = Guest::new(1 << 20);
        let (cfg, mut drv) = setup(&g, 16);
        let mut q = queue(&g, cfg, MRG);
        let mut s: RxScratch<'_> = RxScratch::new();
        let (_, addr) = add_rx(&mut drv, 100);
        drv.write(addr, &before);
        let fr = frame(64);
        let out = receive_burst(&mut q, &mut s, MRG, 1, |_| (hdr(0, 0), &fr[..]));
        assert_eq!(out.placed, 1, "{case}");
        assert!(q.publish());
        assert_eq!(read(&drv, addr, 12), want, "{case}");
        assert_eq!(read(&drv, addr + 12, 64), fr, "{case}");
    }
}

// ---- RX from another chain's buffers (`Gather`): one copy between two drivers ------------

/// A TX queue and an RX queue in one guest, each with its own driver and half of the data
/// area (as `tx_to_rx_loopback_two_queues_in_one_guest`).
fn tx_rx_pair(
    g: &Guest,
    f: VirtioFeatures,
) -> (SplitQueue<'_, RegionTable<8>>, Driver<'_>, SplitQueue<'_, RegionTable<8>>, Driver<'_>) {
    let (rx_cfg, next) = layout(GPA, 16);
    let (tx_cfg, data) = layout(next, 16);
    let end = GPA + g.mem.regions()[0].len();
    let half = ((end - data) / 2) & !15;
    let rx_drv = TestDriver::new(&g.mem, rx_cfg, data, half);
    let tx_drv = TestDriver::new(&g.mem, tx_cfg, data + half, half);
    (queue(g, tx_cfg, f), tx_drv, queue(g, rx_cfg, f), rx_drv)
}

/// A frame still in its TX chain's buffers (header and frame over five descriptors) is placed
/// from there (`Gather`), before the TX chain is completed: into three merged 128-byte buffers
/// whose boundaries fall inside TX segments (the general path), and whole into one 2 KiB
/// buffer (the deferred-copy fast path), as a switch flooding to two receivers does. The
/// first bytes come from the device's copy (`parse_tx_copied` checked the header there): what
/// the driver writes into its TX buffers after that copy reaches only the rest of the frame.
/// The dirty log gets exactly the bytes written.
#[test]
fn rx_gather_from_a_tx_chain_over_merged_buffers() {
    for logged in [false, true] {
        let g = Guest::new(1 << 20);
        let (mut txq, mut tx_drv, mut rxq, mut rx_drv) = tx_rx_pair(&g, MRG);
        let h = hdr(0, 0);
        let hb = hdr_bytes(&h, 12);
        let fr = frame(300);
        let (tx_head, tx_addrs) = add(
            &mut tx_drv,
            &[
                Buf::readable(&hb[..5]),
                Buf::readable(&hb[5..]),
                Buf::readable(&fr[..100]),
                Buf::readable(&fr[100..137]),
                Buf::readable(&fr[137..]),
            ],
        );
        let bufs: Vec<_> = (0..3).map(|_| add_rx(&mut rx_drv, 128)).collect();
        let big = add_rx(&mut rx_drv, 2048);

        let mut segs: Segments<'_, 8> = Segments::new();
        let mut snap = [0u8; 2048];
        let c = txq.pop_gather_uncompleted(&mut snap, 76, &mut segs).unwrap().unwrap();
        let k = c.bytes as usize;
        // Kept: what is past the copy (36 bytes of the 100-byte piece, then 37 and 163).
        assert_eq!((k, segs.len()), (76, 3));
        // The frame is whole (copy and pieces): the copy path's rules, on the copy.
        let pkt = parse_tx_copied(&CopiedChain { bytes: c.readable_len, ..c }, &snap, MRG).unwrap();
        assert_eq!((pkt.header_len, pkt.frame_len), (12, 300));
        // The driver rewrites the first 100 bytes of its frame after the device's copy.
        tx_drv.write(tx_addrs[2], &[0xC3; 100]);
        let mut want = fr.clone();
        want[64..100].fill(0xC3);

        let gather = Gather::new(&snap[12..k], segs.as_slice(), c.readable_len as usize - k);
        assert_eq!((gather.len(), gather.head().len(), gather.contiguous()), (300, 64, None));
        let mut s: RxScratch<'_> = RxScratch::new();
        let log = RangeLog::default();
        let out = if logged {
            receive_burst_logged(&mut rxq, &mut s, MRG, 2, |_| (pkt.header, gather), &log)
        } else {
            receive_burst(&mut rxq, &mut s, MRG, 2, |_| (pkt.header, gather))
        };
        assert_eq!(out, RxBurst { placed: 2, bytes: 600, refused: 0, bad_chains: 0, stopped: None });
        assert!(rxq.publish());
        assert_eq!(rx_drv.used_idx(), 4);
        for (i, len) in [128u32, 128, 56].into_iter().enumerate() {
            assert_eq!(rx_drv.used_elem(i as u16), (bufs[i].0 as u32, len), "used entry {i}");
        }
        assert_eq!(read(&rx_drv, bufs[0].1, 12), rx_hdr(&h, 3));
        assert_eq!(reassemble(&rx_drv, &bufs, 0, 3), want, "merged buffers (logged: {logged})");
        assert_eq!(rx_drv.used_elem(3), (big.0 as u32, 312));
        assert_eq!(read(&rx_drv, big.1, 12), rx_hdr(&h, 1));
        assert_eq!(read(&rx_drv, big.1 + 12, 300), want, "one buffer (logged: {logged})");
        assert_eq!(read(&rx_drv, big.1 + 312, 8), vec![FILL; 8], "nothing past the frame");
        if logged {
            let want_log = RangeLog::default();
            for (addr, len) in [(bufs[0].1, 128), (bufs[1].1, 128), (bufs[2].1, 56), (big.1, 312)] {
                want_log.buffer(addr, len);
            }
            assert_eq!(log.merged(), want_log.merged());
        }
        // The TX chain is completed after every copy, with len 0.
        assert_eq!(tx_drv.used_idx(), 0, "nothing completed on the TX ring yet");
        txq.push(c.head, 0);
        assert!(txq.publish());
        assert_eq!(tx_drv.used_elem(0), (tx_head as u32, 0));
    }
}

/// A driver can make a receive buffer overlap the transmit buffer its frame is read from (a
/// port that reflects frames to their sender): the bytes that land are unspecified, and the
/// copy is still sound (Miri: no overlapping `copy_nonoverlapping`) and stays in the buffer.
#[test]
fn rx_gather_into_a_buffer_overlapping_the_source() {
    let g = Guest::new(1 << 20);
    let (mut txq, mut tx_drv, mut rxq, mut rx_drv) = tx_rx_pair(&g, V1);
    let hb = hdr_bytes(&hdr(0, 0), 12);
    let fr = frame(1000);
    let (_, tx_addrs) = add(&mut tx_drv, &[Buf::readable(&hb), Buf::readable(&fr)]);
    let (rx_head, _) = add_rx(&mut rx_drv, 2048);
    // The RX buffer starts 4 bytes into the TX frame and runs past it.
    rx_drv.write_desc(rx_head, Descriptor { addr: tx_addrs[1] + 4, len: 1100, flags: DescFlags::WRITE, next: 0 });
    let mut segs: Segments<'_, 4> = Segments::new();
    let mut snap = [0u8; 2048];
    let c = txq.pop_gather_uncompleted(&mut snap, 76, &mut segs).unwrap().unwrap();
    let k = c.bytes as usize;
    let pkt = parse_tx_copied(&CopiedChain { bytes: c.readable_len, ..c }, &snap, V1).unwrap();
    let gather = Gather::new(&snap[12..k], segs.as_slice(), c.readable_len as usize - k);
    let mut s: RxScratch<'_> = RxScratch::new();
    let out = receive_burst(&mut rxq, &mut s, V1, 1, |_| (pkt.header, gather));
    assert_eq!((out.placed, out.bytes), (1, 1000));
    assert!(rxq.publish());
    assert_eq!(rx_drv.used_elem(0), (rx_head as u32, 1012));
    // The header and the device's copy landed as written (nothing overlapped them after).
    assert_eq!(read(&rx_drv, tx_addrs[1] + 4, 12), rx_hdr(&hdr(0, 0), 1));
    assert_eq!(read(&rx_drv, tx_addrs[1] + 16, 64), fr[..64]);
    // Bytes after the RX buffer's 1100 are untouched.
    assert_eq!(read(&rx_drv, tx_addrs[1] + 4 + 1012, 8), vec![0u8; 8]);
}

/// A chain left in place (its pieces past the copy listed) takes `parse_tx`'s verdict through
/// `parse_tx_copied` on the copy, the rules of the copy path: a good header, and the rules
/// that need the frame's length (a checksum field past the frame) and the chain (writable
/// buffers). The copy takes the header's pieces and the frame's first bytes; the rest of the
/// frame's piece is listed.
#[test]
fn tx_gather_copy_takes_the_rules_of_parse_tx() {
    let f = feats(VirtioFeatures::NET_CSUM);
    let fr = frame(100);
    let hb = hdr_bytes(&hdr(0, 0), 12);
    let with_writable = [Buf::readable(&hb), Buf::readable(&fr), Buf::writable(10)];
    let cases: Vec<(VirtioNetHdr, bool)> =
        vec![(hdr(0, 0), false), (csum_hdr(34, 16), false), (csum_hdr(90, 16), false), (hdr(0, 0), true)];
    for (h, writable) in cases {
        let hb = hdr_bytes(&h, 12);
        let split = [Buf::readable(&hb[..3]), Buf::readable(&hb[3..]), Buf::readable(&fr)];
        let bufs: &[Buf<'_>] = if writable { &with_writable } else { &split };
        let (g1, g2) = (Guest::new(1 << 20), Guest::new(1 << 20));
        let mut chain = Chain::<32>::new();
        let mut q1 = tx_queue(&g1, bufs, f, false);
        assert!(matches!(q1.pop_into(&mut chain), Ok(Some(_))));
        let mut q2 = tx_queue(&g2, bufs, f, false);
        let mut snap = [0u8; 256];
        let mut segs: Segments<'_, 8> = Segments::new();
        let c = q2.pop_gather_uncompleted(&mut snap, 40, &mut segs).unwrap().unwrap();
        assert_eq!((c.bytes, c.readable_len), (40, 112));
        // 72 bytes of the frame are left in place.
        assert_eq!(segs.as_slice().iter().map(|s| s.len()).collect::<Vec<_>>(), [72], "readable bytes past the copy");
        let whole = CopiedChain { bytes: c.readable_len, ..c };
        assert_eq!(parse_tx_copied(&whole, &snap, f), parse_tx(&chain, f), "{h:?}");
        assert_eq!(
            parse_tx_copied(&whole, &snap[..100], f),
            if writable { Err(TxError::WritableBuffers) } else { Err(TxError::TooLong { len: 112, capacity: 100 }) },
            "held to the buffer's length, as a copied frame"
        );
    }
}

/// A chain no longer than the copy is copied whole, as `pop_read_uncompleted` copies it, and
/// lists nothing; a chain whose pieces past the copy find no room in the list is copied into
/// the buffer after all (as far as it goes), nothing of it kept; the segments of the chains
/// before it stay. Nothing is completed.
#[test]
fn tx_gather_copies_short_chains_and_chains_the_list_cannot_hold() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 32);
    let mut q = queue(&g, cfg, V1);
    let hb = hdr_bytes(&hdr(0, 0), 12);
    let fr = frame(60);
    let split: Vec<Buf<'_>> = std::iter::once(Buf::readable(&hb)).chain(fr.chunks(20).map(Buf::readable)).collect();
    let (short, _) = add(&mut drv, &split);
    add(&mut drv, &[Buf::readable(&hb), Buf::readable(&fr)]);
    let pieces: Vec<Buf<'_>> = std::iter::once(Buf::readable(&hb)).chain(fr.chunks(10).map(Buf::readable)).collect();
    let (long, _) = add(&mut drv, &pieces);
    let (cut, _) = add(&mut drv, &pieces);
    let mut segs: Segments<'_, 4> = Segments::new();
    let mut buf = [0u8; 128];
    let c = q.pop_gather_uncompleted(&mut buf, 72, &mut segs).unwrap().unwrap();
    assert_eq!((c.head, c.bytes, c.readable_len, segs.len()), (short, 72, 72, 0), "copied whole");
    assert_eq!(buf[12..72], fr[..]);
    let c = q.pop_gather_uncompleted(&mut buf, 32, &mut segs).unwrap().unwrap();
    assert_eq!((c.readable_len, c.bytes, segs.len()), (72, 32, 1));
    // Twelve bytes of header and two 10-byte pieces fill the copy; of the four left the list
    // holds three: the chain is copied into the buffer after all.
    let c = q.pop_gather_uncompleted(&mut buf, 32, &mut segs).unwrap().unwrap();
    assert_eq!((c.head, c.bytes, c.readable_len), (long, 72, 72));
    assert_eq!(segs.len(), 1, "nothing of it kept, the chain before keeps its piece");
    assert_eq!(buf[12..72], fr[..]);
    // The same into a buffer too short for it: cut, as by `pop_read_uncompleted`.
    let c = q.pop_gather_uncompleted(&mut buf[..50], 32, &mut segs).unwrap().unwrap();
    assert_eq!((c.head, c.bytes, c.readable_len, segs.len()), (cut, 50, 72, 1));
    assert_eq!(buf[12..50], fr[..38]);
    assert_eq!(drv.used_idx(), 0);
    assert!(!q.publish(), "nothing completed");
}

/// Every buffer range a receive reported, merged where they touch.
#[derive(Default)]
struct RangeLog(std::cell::RefCell<Vec<(u64, u64)>>);

impl WriteLog for RangeLog {
    fn buffer(&self, addr: u64, len: u64) {
        self.0.borrow_mut().push((addr, len));
    }
    fn used_ring(&self, _: u64, _: u64) {}
    fn descriptor_ring(&self, _: u64, _: u64) {}
    fn device_area(&self, _: u64, _: u64) {}
}

impl RangeLog {
    fn merged(&self) -> Vec<(u64, u64)> {
        let mut v = self.0.borrow().clone();
        v.sort();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (a, l) in v {
            match out.last_mut() {
                Some((b, m)) if *b + *m >= a => *m = (*m).max(a + l - *b),
                _ => out.push((a, l)),
            }
        }
        out
    }
}

/// `Segments::take_front` moves more of a chain into the device's copy: whole pieces leave
/// the list, a piece cut in the middle stays from where the copy stopped, and the frame reads
/// back the same through the longer copy and the shorter list; a list shorter than the
/// buffer gives what it has and is left empty.
#[test]
fn tx_gather_copy_extended_from_the_pieces() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, V1);
    let hb = hdr_bytes(&hdr(0, 0), 12);
    let fr = frame(300);
    add(
        &mut drv,
        &[Buf::readable(&hb), Buf::readable(&fr[..20]), Buf::readable(&fr[20..50]), Buf::readable(&fr[50..])],
    );
    let mut segs: Segments<'_, 8> = Segments::new();
    let mut snap = [0u8; 12 + 256];
    let c = q.pop_gather_uncompleted(&mut snap, 28, &mut segs).unwrap().unwrap();
    assert_eq!(c.bytes, 28);
    let lens = |s: &Segments<'_, 8>| s.as_slice().iter().map(|s| s.len()).collect::<Vec<_>>();
    assert_eq!(lens(&segs), [4, 30, 250]);
    // 4 + 30 whole, 6 of the last piece.
    assert_eq!(segs.take_front(0, &mut snap[28..68]), 40);
    assert_eq!(lens(&segs), [244]);
    assert_eq!(snap[12..68], fr[..56]);
    let gather = Gather::new(&snap[12..68], segs.as_slice(), 244);
    let mut back = vec![0u8; 300];
    assert_eq!(gather.read_into(&mut back), 300);
    assert_eq!(back, fr);
    // More room than bytes left: all of them, and the list is empty.
    let mut rest = [0u8; 256];
    assert_eq!(segs.take_front(0, &mut rest), 244);
    assert!(segs.is_empty());
    assert_eq!(rest[..244], fr[56..]);
    assert_eq!(segs.take_front(0, &mut rest), 0);
}
