//! Checksum completion, software segmentation and the per-receiver offload rules
//! (`virtq::net::{offload, gso, csum}`; VIRTIO 1.2 §5.1.6.2, §5.1.6.4.1; hostile-input family
//! 22), checked against an independent implementation: frames are built with `etherparse`,
//! and every segment is parsed back with it and its lengths, identification, sequence number,
//! flags and both checksums compared with what `etherparse` computes. The payloads of all
//! segments must reassemble to the original.
//!
//! Property tests: `arbitrary_headers_and_frames_never_panic_and_stay_bounded` (header fields
//! and frames, random or valid frames with bytes flipped) and
//! `valid_frames_segment_like_etherparse_says` (random stacks, sizes and MSS). Under Miri
//! they run a few cases each, and the 64 KiB frames shrink (the same code paths).

use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6Extensions, Ipv6FlowLabel, Ipv6Header, Ipv6RawExtHeader,
    NetHeaders, PacketHeaders, SingleVlanHeader, TcpHeader, TransportHeader, UdpHeader, VlanId, VlanPcp,
};
use proptest::prelude::*;
use virtq::net::csum::{checksum, Checksum};
use virtq::net::gso::Segmenter;
use virtq::net::header::*;
use virtq::net::offload::{
    check_frame, complete_csum, csum_field, rx_delivery, Delivery, IpVersion, L4Csum, Layer, OffloadError, Transport,
    MAX_GSO_IP_LEN, MAX_HEADERS_LEN,
};
use virtq::VirtioFeatures;
use zerocopy::little_endian::U16;

/// A 64 KiB TSO frame natively; Miri interprets every byte, so it gets a smaller one.
const BIG: usize = if cfg!(miri) { 3000 } else { 65_000 };

/// Under Miri, loops over many variants take every `MIRI_STEP`-th only (the same code paths).
const MIRI_STEP: usize = if cfg!(miri) { 3 } else { 1 };

// ---- an independent reference checksum, and frames built with etherparse -------------------

/// RFC 1071 by the book: big-endian words, byte pairs, end-around carry; not complemented.
fn ref_sum(pieces: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
    let mut s: u32 = 0;
    for pair in bytes.chunks(2) {
        s += (pair[0] as u32) << 8 | pair.get(1).copied().unwrap_or(0) as u32;
        s = (s & 0xFFFF) + (s >> 16);
    }
    s as u16
}

#[derive(Clone, Debug)]
enum Ip {
    /// IPv4 with this many bytes of options (a multiple of 4, at most 40).
    V4 { options: usize },
    /// IPv6 with optional hop-by-hop and destination options headers (payload bytes each:
    /// 6, 14, 22, ...).
    V6 { hbh: Option<usize>, dst: Option<usize> },
}

#[derive(Clone, Debug)]
enum L4 {
    /// TCP with this many bytes of options (a multiple of 4, at most 40) and these flags.
    Tcp {
        options: usize,
        fin: bool,
        psh: bool,
        cwr: bool,
        ece: bool,
        urg: bool,
    },
    Udp,
}

#[derive(Clone, Debug)]
struct Spec {
    vlans: usize,
    ip: Ip,
    l4: L4,
    payload: usize,
    mss: u16,
    /// The IP ECN codepoint (copied into every segment).
    ecn: u8,
}

impl Spec {
    fn tcp4(payload: usize, mss: u16) -> Spec {
        Spec {
            vlans: 0,
            ip: Ip::V4 { options: 0 },
            l4: L4::Tcp { options: 12, fin: false, psh: true, cwr: false, ece: false, urg: false },
            payload,
            mss,
            ecn: 0,
        }
    }
    fn tcp6(payload: usize, mss: u16) -> Spec {
        Spec { ip: Ip::V6 { hbh: None, dst: None }, ..Spec::tcp4(payload, mss) }
    }
    fn udp4(payload: usize, mss: u16) -> Spec {
        Spec { l4: L4::Udp, ..Spec::tcp4(payload, mss) }
    }
    fn udp6(payload: usize, mss: u16) -> Spec {
        Spec { l4: L4::Udp, ..Spec::tcp6(payload, mss) }
    }
}

/// A GSO frame as a Linux guest hands it over, and what the tests know about it.
struct Built {
    frame: Vec<u8>,
    hdr: VirtioNetHdr,
    payload: Vec<u8>,
    l3: usize,
    l4: usize,
    headers_len: usize,
}

const SRC4: [u8; 4] = [10, 0, 0, 1];
const DST4: [u8; 4] = [10, 0, 0, 2];
const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const SEQ: u32 = 0xFFFF_F000; // wraps within a 64 KiB frame
const IP_ID: u16 = 0xFFF0; // wraps too

fn payload_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8).collect()
}

fn build(spec: &Spec) -> Built {
    let payload = payload_bytes(spec.payload);
    let mut f = Vec::new();
    let ip_ethertype = match spec.ip {
        Ip::V4 { .. } => EtherType::IPV4,
        Ip::V6 { .. } => EtherType::IPV6,
    };
    let tags: Vec<EtherType> = match spec.vlans {
        0 => vec![],
        1 => vec![EtherType::VLAN_TAGGED_FRAME],
        _ => vec![EtherType::PROVIDER_BRIDGING, EtherType::VLAN_TAGGED_FRAME],
    };
    let eth = Ethernet2Header {
        source: [0x52, 0x54, 0, 0, 0, 1],
        destination: [0x52, 0x54, 0, 0, 0, 2],
        ether_type: tags.first().copied().unwrap_or(ip_ethertype),
    };
    eth.write(&mut f).unwrap();
    for (k, _) in tags.iter().enumerate() {
        let next = tags.get(k + 1).copied().unwrap_or(ip_ethertype);
        let tag = SingleVlanHeader {
            pcp: VlanPcp::ZERO,
            drop_eligible_indicator: false,
            vlan_id: VlanId::try_new(100 + k as u16).unwrap(),
            ether_type: next,
        };
        tag.write(&mut f).unwrap();
    }
    let l3 = f.len();
    let (proto, l4hdr_len) = match &spec.l4 {
        L4::Tcp { options, .. } => (IpNumber::TCP, 20 + options),
        L4::Udp => (IpNumber::UDP, 8),
    };
    let l4_len = l4hdr_len + payload.len();
    match &spec.ip {
        Ip::V4 { options } => {
            let mut ip = Ipv4Header::new(0, 64, proto, SRC4, DST4).unwrap();
            let opts: Vec<u8> = (0..*options).map(|i| if i + 1 == *options { 0 } else { 1 }).collect();
            ip.options = etherparse::Ipv4Options::try_from(&opts[..]).unwrap();
            ip.set_payload_len(l4_len).unwrap();
            ip.identification = IP_ID;
            ip.dont_fragment = true;
            ip.ecn = etherparse::IpEcn::try_new(spec.ecn).unwrap();
            ip.header_checksum = ip.calc_header_checksum();
            ip.write(&mut f).unwrap();
        }
        Ip::V6 { hbh, dst } => {
            let opt = |n: usize| {
                // PadN option filling n bytes (n ≥ 2): type 1, length n - 2.
                let mut p = vec![0u8; n];
                p[0] = 1;
                p[1] = (n - 2) as u8;
                Ipv6RawExtHeader::new_raw(IpNumber(0), &p).unwrap()
            };
            let mut exts = Ipv6Extensions {
                hop_by_hop_options: hbh.map(opt),
                destination_options: dst.map(opt),
                ..Default::default()
            };
            let first = exts.set_next_headers(proto);
            let ip = Ipv6Header {
                traffic_class: spec.ecn,
                flow_label: Ipv6FlowLabel::try_new(0x12345).unwrap(),
                payload_length: (exts.header_len() + l4_len) as u16,
                next_header: first,
                hop_limit: 64,
                source: SRC6,
                destination: DST6,
            };
            ip.write(&mut f).unwrap();
            exts.write(&mut f, first).unwrap();
        }
    }
    let l4 = f.len();
    // The partial checksum Linux leaves for NEEDS_CSUM: the pseudo-header sum, not
    // complemented (§5.1.6.2 "set to the sum of the TCP pseudo header").
    let len16 = (l4_len as u16).to_be_bytes();
    let pseudo = match spec.ip {
        Ip::V4 { .. } => ref_sum(&[&SRC4, &DST4, &[0, proto.0], &len16]),
        Ip::V6 { .. } => ref_sum(&[&SRC6, &DST6, &(l4_len as u32).to_be_bytes(), &[0, 0, 0, proto.0]]),
    };
    let (gso_type, csum_offset) = match &spec.l4 {
        &L4::Tcp { options, fin, psh, cwr, ece, urg } => {
            let mut t = TcpHeader::new(40000, 5201, SEQ, 512);
            t.set_options_raw(&(0..options).map(|i| if i + 1 == options { 0 } else { 1 }).collect::<Vec<_>>()).unwrap();
            t.ack = true;
            t.acknowledgment_number = 77;
            (t.fin, t.psh, t.cwr, t.ece, t.urg) = (fin, psh, cwr, ece, urg);
            t.urgent_pointer = if urg { 3 } else { 0 };
            t.checksum = pseudo;
            t.write(&mut f).unwrap();
            let base = match spec.ip {
                Ip::V4 { .. } => VIRTIO_NET_HDR_GSO_TCPV4,
                Ip::V6 { .. } => VIRTIO_NET_HDR_GSO_TCPV6,
            };
            (base | if cwr { VIRTIO_NET_HDR_GSO_ECN } else { 0 }, 16)
        }
        L4::Udp => {
            // The datagram's length field is meaningless above 64 KiB; Linux writes it anyway.
            let u = UdpHeader { source_port: 4000, destination_port: 5000, length: l4_len as u16, checksum: pseudo };
            u.write(&mut f).unwrap();
            (VIRTIO_NET_HDR_GSO_UDP_L4, 6)
        }
    };
    let headers_len = f.len();
    f.extend_from_slice(&payload);
    let hdr = VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type,
        hdr_len: U16::new(headers_len as u16),
        gso_size: U16::new(spec.mss),
        csum_start: U16::new(l4 as u16),
        csum_offset: U16::new(csum_offset),
        num_buffers: U16::new(0),
    };
    Built { frame: f, hdr, payload, l3, l4, headers_len }
}

/// Segments `b` with `mode` through `write_segment`, and checks every segment with
/// etherparse. Returns the segment count.
fn segment_and_verify(spec: &Spec, b: &Built, mode: L4Csum) -> u32 {
    let of = check_frame(&b.hdr, &b.frame, b.frame.len()).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
    let layout = of.layout.expect("GSO layout");
    assert_eq!(
        (layout.l3_offset as usize, layout.l4_offset as usize, layout.headers_len as usize),
        (b.l3, b.l4, b.headers_len)
    );
    let seg = Segmenter::new(&of, &b.frame, mode).unwrap();
    let mss = spec.mss as usize;
    let want = spec.payload.div_ceil(mss).max(1) as u32;
    assert_eq!(seg.count(), want, "{spec:?}");
    assert_eq!(of.segments(), want);
    let mut out = vec![0u8; b.headers_len + mss];
    let mut reassembled = Vec::new();
    let original = PacketHeaders::from_ethernet_slice(&b.frame).unwrap();
    for i in 0..seg.count() {
        let n = seg.write_segment(i, &b.frame, &mut out).unwrap();
        assert_eq!(n, seg.segment_len(i));
        let mut s = out[..n].to_vec();
        let last = i + 1 == seg.count();
        if mode == L4Csum::Partial {
            // The field holds the pseudo-header sum; completing it as a receiver would (with
            // the reference sum) must give what etherparse computes below.
            let h = seg.segment_header();
            assert_eq!(h.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
            assert_eq!(h.gso_type, VIRTIO_NET_HDR_GSO_NONE);
            assert_eq!(h.csum_start.get() as usize, b.l4);
            let at = b.l4 + h.csum_offset.get() as usize;
            let v = !ref_sum(&[&s[b.l4..]]);
            let v = if v == 0 && matches!(spec.l4, L4::Udp) { 0xFFFF } else { v };
            s[at..at + 2].copy_from_slice(&v.to_be_bytes());
        } else {
            assert_eq!(seg.segment_header(), VirtioNetHdr::default());
        }
        let p = PacketHeaders::from_ethernet_slice(&s).unwrap_or_else(|e| panic!("segment {i}: {e:?}"));
        assert_eq!(p.vlan_ids().len(), spec.vlans);
        let body = p.payload.slice();
        let ip_len = n - b.l3;
        let ctx = format!("{spec:?} segment {i}/{}", seg.count());
        match (p.net.as_ref().unwrap(), p.transport.as_ref().unwrap()) {
            (NetHeaders::Ipv4(ip, _), t) => {
                assert_eq!(ip.total_len as usize, ip_len, "{ctx}");
                assert_eq!(ip.identification, IP_ID.wrapping_add(i as u16), "{ctx}");
                assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "{ctx}");
                assert!(ip.dont_fragment && !ip.more_fragments, "{ctx}");
                assert_eq!(ip.ecn.value(), spec.ecn);
                if let Some(NetHeaders::Ipv4(orig, _)) = &original.net {
                    assert_eq!(&ip.options[..], &orig.options[..]);
                }
                match t {
                    TransportHeader::Tcp(t) => {
                        assert_eq!(t.checksum, t.calc_checksum_ipv4(ip, body).unwrap(), "{ctx}");
                        check_tcp(spec, t, i, last, &original, &ctx);
                    }
                    TransportHeader::Udp(u) => {
                        assert_eq!(u.length as usize, n - b.l4, "{ctx}");
                        assert_eq!(u.checksum, u.calc_checksum_ipv4(ip, body).unwrap(), "{ctx}");
                    }
                    other => panic!("{other:?}"),
                }
            }
            (NetHeaders::Ipv6(ip, exts), t) => {
                assert_eq!(ip.payload_length as usize, ip_len - 40, "{ctx}");
                assert_eq!(ip.traffic_class, spec.ecn);
                if let Some(NetHeaders::Ipv6(_, orig)) = &original.net {
                    assert_eq!(exts, orig);
                }
                match t {
                    TransportHeader::Tcp(t) => {
                        assert_eq!(t.checksum, t.calc_checksum_ipv6(ip, body).unwrap(), "{ctx}");
                        check_tcp(spec, t, i, last, &original, &ctx);
                    }
                    TransportHeader::Udp(u) => {
                        assert_eq!(u.length as usize, n - b.l4, "{ctx}");
                        assert_eq!(u.checksum, u.calc_checksum_ipv6(ip, body).unwrap(), "{ctx}");
                    }
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
        assert!(body.len() <= mss && (last || body.len() == mss), "{ctx}: {} payload bytes", body.len());
        reassembled.extend_from_slice(body);
    }
    assert!(reassembled == b.payload, "{spec:?}: reassembled payload differs");
    seg.count()
}

/// Sequence number, flags (FIN/PSH last only, CWR first only, the rest copied) and options.
fn check_tcp(spec: &Spec, t: &TcpHeader, i: u32, last: bool, original: &PacketHeaders<'_>, ctx: &str) {
    let L4::Tcp { fin, psh, cwr, ece, urg, .. } = spec.l4 else { unreachable!() };
    assert_eq!(t.sequence_number, SEQ.wrapping_add(i * spec.mss as u32), "{ctx}");
    assert_eq!((t.fin, t.psh), (fin && last, psh && last), "{ctx}: FIN/PSH");
    assert_eq!(t.cwr, cwr && i == 0, "{ctx}: CWR");
    assert_eq!((t.ece, t.urg, t.ack, t.syn, t.rst), (ece, urg, true, false, false), "{ctx}");
    assert_eq!((t.acknowledgment_number, t.window_size), (77, 512));
    let Some(TransportHeader::Tcp(o)) = &original.transport else { unreachable!() };
    assert_eq!(t.options.as_slice(), o.options.as_slice(), "{ctx}: options");
}

// ---- segmentation against etherparse ------------------------------------------------------

/// A 64 KiB TSOv4 frame at MSS 1448 (what iperf3 between two guests sends), and the edge
/// sizes: an exact multiple of the MSS, one byte over, one segment, less than one MSS
/// ("too small packets are not really GSO ones": one segment), and no payload at all.
#[test]
fn tso4_segments_check_out_with_etherparse() {
    let k = if cfg!(miri) { 2 } else { 4 };
    for (payload, mss) in [(BIG, 1448), (1448 * k, 1448), (1448 * k + 1, 1448), (1448, 1448), (100, 1448), (0, 1448)] {
        for mode in [L4Csum::Complete, L4Csum::Partial] {
            let s = Spec::tcp4(payload, mss);
            segment_and_verify(&s, &build(&s), mode);
        }
    }
    let s = Spec::tcp4(BIG, 1448);
    assert_eq!(segment_and_verify(&s, &build(&s), L4Csum::Complete) as usize, BIG.div_ceil(1448));
}

/// IPv4 options and TCP options of every length are copied into every segment (the header
/// length varies; IHL and data offset are read, never assumed).
#[test]
fn tso4_with_ip_and_tcp_options_and_vlan_tags() {
    for ip_opt in [0, 4, 12, 40] {
        for tcp_opt in [0, 4, 12, 40].into_iter().step_by(MIRI_STEP) {
            for vlans in (0..=2).step_by(MIRI_STEP) {
                let s = Spec {
                    vlans,
                    ip: Ip::V4 { options: ip_opt },
                    l4: L4::Tcp { options: tcp_opt, fin: true, psh: true, cwr: false, ece: false, urg: false },
                    ..Spec::tcp4(if cfg!(miri) { 2500 } else { 5000 }, 1000)
                };
                let b = build(&s);
                assert_eq!(b.headers_len, 14 + 4 * vlans + 20 + ip_opt + 20 + tcp_opt);
                segment_and_verify(&s, &b, L4Csum::Complete);
            }
        }
    }
}

/// ECN (§5.1.6.2: the GSO_ECN bit marks a TCP frame with CWR set; RFC 3168 §6.1.2): CWR on
/// the first segment only, ECE and the IP ECN codepoint on every segment, FIN and PSH on the
/// last only, URG copied.
#[test]
fn tso_flags_cwr_first_fin_psh_last_ece_and_ecn_codepoint_everywhere() {
    for ip in [Ip::V4 { options: 0 }, Ip::V6 { hbh: None, dst: None }] {
        let s = Spec {
            ip,
            l4: L4::Tcp { options: 12, fin: true, psh: true, cwr: true, ece: true, urg: true },
            ecn: 2,
            ..Spec::tcp4(if cfg!(miri) { 4000 } else { 10_000 }, 1448)
        };
        let b = build(&s);
        assert_ne!(b.hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN, 0);
        assert_eq!(segment_and_verify(&s, &b, L4Csum::Complete) as usize, s.payload.div_ceil(1448));
        segment_and_verify(&s, &b, L4Csum::Partial);
    }
}

/// TSOv6, also behind hop-by-hop and destination options headers (copied into every
/// segment; the pseudo-header names TCP, not the first next header) and VLAN tags.
#[test]
fn tso6_segments_check_out_with_etherparse() {
    for (hbh, dst) in [(None, None), (Some(6), None), (None, Some(14)), (Some(22), Some(6))] {
        for vlans in [0, 2].into_iter().step_by(MIRI_STEP) {
            let s = Spec { vlans, ip: Ip::V6 { hbh, dst }, ..Spec::tcp6(BIG, 1440) };
            for mode in [L4Csum::Complete, L4Csum::Partial] {
                segment_and_verify(&s, &build(&s), mode);
            }
        }
    }
    let s = Spec::tcp6(3 * 1440 - 1, 1440);
    assert_eq!(segment_and_verify(&s, &build(&s), L4Csum::Complete), 3);
}

/// USO (`GSO_UDP_L4`): every segment a whole UDP datagram with its own length and checksum,
/// over IPv4 (ids increment) and IPv6.
#[test]
fn uso_segments_are_whole_datagrams() {
    for s in
        [Spec::udp4(BIG / 2, 1472), Spec::udp6(BIG / 2, 1452), Spec::udp4(1000, 1472), Spec::udp6(BIG / 2 + 1000, 1000)]
    {
        for mode in [L4Csum::Complete, L4Csum::Partial] {
            segment_and_verify(&s, &build(&s), mode);
        }
    }
}

/// A UDP checksum that computes to 0 is sent as 0xFFFF (RFC 768), in segments and in
/// completed frames alike.
#[test]
fn udp_checksum_zero_is_sent_as_all_ones() {
    // Find a 2-byte payload tail that makes the datagram sum to 0xFFFF.
    let s = Spec::udp4(100, 100);
    let mut b = build(&s);
    let n = b.frame.len();
    b.frame[n - 2..].fill(0);
    let seg = Segmenter::new(&check_frame(&b.hdr, &b.frame, n).unwrap(), &b.frame, L4Csum::Complete).unwrap();
    let mut out = vec![0u8; n];
    seg.write_segment(0, &b.frame, &mut out).unwrap();
    let c = u16::from_be_bytes([out[b.l4 + 6], out[b.l4 + 7]]);
    // Adding the checksum value as data turns the datagram's sum into 0xFFFF, the value that
    // computes to a zero checksum.
    b.frame[n - 2..].copy_from_slice(&c.to_be_bytes());
    b.payload[98..].copy_from_slice(&c.to_be_bytes());
    let seg = Segmenter::new(&check_frame(&b.hdr, &b.frame, n).unwrap(), &b.frame, L4Csum::Complete).unwrap();
    seg.write_segment(0, &b.frame, &mut out).unwrap();
    assert_eq!(&out[b.l4 + 6..b.l4 + 8], &[0xFF, 0xFF]);
    segment_and_verify(&s, &b, L4Csum::Complete);
    // The same datagram through checksum completion.
    let h = VirtioNetHdr { gso_type: 0, gso_size: U16::new(0), ..b.hdr };
    let mut f = b.frame.clone();
    assert_eq!(complete_csum(&h, &mut f), Ok(true));
    assert_eq!(&f[b.l4 + 6..b.l4 + 8], &[0xFF, 0xFF]);
}

/// The scatter path: the payload summed in pieces of odd sizes (as if copied straight from
/// several guest buffers), headers written by `write_headers`, gives the bytes
/// `write_segment` gives.
#[test]
fn headers_from_a_piecewise_payload_sum_match_write_segment() {
    let n = if cfg!(miri) { 2 } else { 1 };
    for s in [Spec::tcp4(20_000 / n, 1448), Spec::tcp6(9000 / n, 1000), Spec::udp4(5000 / n, 1400)] {
        let b = build(&s);
        let of = check_frame(&b.hdr, &b.frame, b.frame.len()).unwrap();
        for mode in [L4Csum::Complete, L4Csum::Partial] {
            let seg = Segmenter::new(&of, &b.frame[..MAX_HEADERS_LEN], mode).unwrap();
            let mut whole = vec![0u8; 2000];
            let mut parts = vec![0u8; 2000];
            for i in 0..seg.count() {
                let n = seg.write_segment(i, &b.frame, &mut whole).unwrap();
                let r = seg.payload_range(i);
                let mut sum = Checksum::new();
                let mut at = r.start;
                for piece in [1, 3, 500, 7, usize::MAX] {
                    let end = at.saturating_add(piece).min(r.end);
                    sum.add(&b.frame[at..end]);
                    at = end;
                }
                let hl = seg.write_headers(i, &sum, &mut parts).unwrap();
                parts[hl..hl + r.len()].copy_from_slice(&b.frame[r.clone()]);
                assert_eq!(hl + r.len(), n);
                assert!(parts[..n] == whole[..n], "{s:?} {mode:?} segment {i}");
            }
        }
    }
}

/// The segmenter keeps its own validated copy of the headers: a source whose headers change
/// afterwards (a guest rewriting its buffer) changes only payload bytes.
#[test]
fn segmenter_reads_headers_once() {
    let s = Spec::tcp4(4000, 1000);
    let b = build(&s);
    let of = check_frame(&b.hdr, &b.frame, b.frame.len()).unwrap();
    let seg = Segmenter::new(&of, &b.frame, L4Csum::Complete).unwrap();
    let mut changed = b.frame.clone();
    changed[..b.headers_len].fill(0xEE);
    let (mut x, mut y) = (vec![0u8; 1100], vec![0u8; 1100]);
    for i in 0..seg.count() {
        let n = seg.write_segment(i, &b.frame, &mut x).unwrap();
        assert_eq!(seg.write_segment(i, &changed, &mut y).unwrap(), n);
        assert!(x[..n] == y[..n]);
    }
    // Headers that no longer pass are refused when the segmenter is built from them.
    assert!(Segmenter::new(&of, &changed, L4Csum::Complete).is_err());
}

// ---- checksum completion -------------------------------------------------------------------

/// NEEDS_CSUM without GSO, TCP and UDP over IPv4 and IPv6 with odd payload lengths: the
/// completed frame's checksum is what etherparse computes, `csum_field` does not write, and
/// a frame without NEEDS_CSUM is left alone.
#[test]
fn completing_a_partial_checksum_gives_what_etherparse_computes() {
    for s in [Spec::tcp4(1, 1), Spec::tcp4(1447, 1448), Spec::tcp6(333, 1448), Spec::udp4(1471, 1472), Spec::udp6(9, 9)]
    {
        let mut b = build(&s);
        b.hdr.gso_type = VIRTIO_NET_HDR_GSO_NONE;
        b.hdr.gso_size = U16::new(0);
        let before = b.frame.clone();
        let field = csum_field(&b.hdr, &b.frame).unwrap().unwrap();
        assert_eq!(b.frame, before);
        assert_eq!(complete_csum(&b.hdr, &mut b.frame), Ok(true));
        assert_eq!(&b.frame[field.offset..field.offset + 2], &field.value);
        let p = PacketHeaders::from_ethernet_slice(&b.frame).unwrap();
        let body = p.payload.slice();
        let ok = match (p.net.unwrap(), p.transport.unwrap()) {
            (NetHeaders::Ipv4(ip, _), TransportHeader::Tcp(t)) => {
                t.checksum == t.calc_checksum_ipv4(&ip, body).unwrap()
            }
            (NetHeaders::Ipv6(ip, _), TransportHeader::Tcp(t)) => {
                t.checksum == t.calc_checksum_ipv6(&ip, body).unwrap()
            }
            (NetHeaders::Ipv4(ip, _), TransportHeader::Udp(u)) => {
                u.checksum == u.calc_checksum_ipv4(&ip, body).unwrap()
            }
            (NetHeaders::Ipv6(ip, _), TransportHeader::Udp(u)) => {
                u.checksum == u.calc_checksum_ipv6(&ip, body).unwrap()
            }
            other => panic!("{other:?}"),
        };
        assert!(ok, "{s:?}");
    }
    let mut f = vec![1u8; 60];
    assert_eq!(complete_csum(&VirtioNetHdr::default(), &mut f), Ok(false));
    assert_eq!(csum_field(&VirtioNetHdr::default(), &f), Ok(None));
    assert_eq!(f, vec![1u8; 60]);
}

/// The field may sit anywhere in the frame, up to its last two bytes; one byte further is
/// refused, never written (DPDK CVE-2024-11614).
#[test]
fn checksum_field_at_the_frame_end_and_one_past_it() {
    let h = |start: u16, offset: u16| VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        csum_start: U16::new(start),
        csum_offset: U16::new(offset),
        ..VirtioNetHdr::default()
    };
    let mut f = payload_bytes(61);
    f[59..].fill(0); // a pseudo-header sum of 0
    assert_eq!(complete_csum(&h(1, 58), &mut f), Ok(true));
    assert_eq!(!ref_sum(&[&f[1..]]), 0, "from csum_start on, the frame sums to all ones");
    assert_eq!(complete_csum(&h(59, 0), &mut f), Ok(true));
    let before = f.clone();
    for (s, o) in [(60, 0), (0, 60), (61, 0), (0xFFFF, 0xFFFF)] {
        assert_eq!(
            complete_csum(&h(s, o), &mut f),
            Err(OffloadError::CsumOutOfRange { start: s, offset: o, frame_len: 61 })
        );
        assert_eq!(
            check_frame(&h(s, o), &f, f.len()).unwrap_err(),
            OffloadError::CsumOutOfRange { start: s, offset: o, frame_len: 61 }
        );
    }
    assert_eq!(f, before);
    assert_eq!(checksum(&[]), 0xFFFF);
}

// ---- the header after validation -----------------------------------------------------------

/// `check_frame` normalises the header: only NEEDS_CSUM of the flags (a driver must not set
/// DATA_VALID or RSC_INFO; unknown bits are ignored), num_buffers 0, a lone ECN bit cleared,
/// and the ECN bit set for a TSO frame with CWR.
#[test]
fn validated_headers_are_normalised() {
    let mut h = VirtioNetHdr { flags: 0xFF, gso_type: VIRTIO_NET_HDR_GSO_ECN, ..VirtioNetHdr::default() };
    h.num_buffers = U16::new(9);
    let f = check_frame(&h, &[0u8; 60], 60).unwrap();
    assert_eq!(f.header.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
    assert_eq!((f.header.gso_type, f.header.num_buffers.get(), f.layout, f.segments()), (0, 0, None, 1));
    let f = check_frame(&VirtioNetHdr { flags: 0xFE, ..h }, &[0u8; 60], 60).unwrap();
    assert_eq!(f.header.flags, 0);

    let s = Spec {
        l4: L4::Tcp { options: 0, fin: false, psh: false, cwr: true, ece: false, urg: false },
        ..Spec::tcp4(3000, 1000)
    };
    let mut b = build(&s);
    b.hdr.gso_type = VIRTIO_NET_HDR_GSO_TCPV4; // the sender left the ECN bit out
    let f = check_frame(&b.hdr, &b.frame, b.frame.len()).unwrap();
    assert_eq!(f.header.gso_type, VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN);
    let l = f.layout.unwrap();
    assert_eq!(
        (l.ip, l.transport, l.l3_offset, l.l4_offset, l.headers_len),
        (IpVersion::V4, Transport::Tcp, 14, 34, 54)
    );
    assert_eq!(f.segments(), 3);
    // hdr_len larger than the headers is a hint, not a lie.
    b.hdr.hdr_len = U16::new(500);
    assert!(check_frame(&b.hdr, &b.frame, b.frame.len()).is_ok());
    // A snapshot of the headers is as good as the frame.
    assert_eq!(
        check_frame(&b.hdr, &b.frame[..MAX_HEADERS_LEN], b.frame.len()),
        check_frame(&b.hdr, &b.frame, b.frame.len())
    );
}

// ---- per-receiver rules: §5.1.6.4.1 --------------------------------------------------------

fn feat(f: &[VirtioFeatures]) -> VirtioFeatures {
    f.iter().fold(VirtioFeatures::VERSION_1, |a, b| a | *b)
}

/// What each receiver gets for each kind of frame, per §5.1.6.4.1.
#[test]
fn delivery_follows_the_receivers_features() {
    use VirtioFeatures as F;
    let csum = F::NET_GUEST_CSUM;
    let tso = |g: u8| VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type: g,
        gso_size: U16::new(1448),
        ..VirtioNetHdr::default()
    };
    let partial = VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        csum_start: U16::new(34),
        csum_offset: U16::new(16),
        ..VirtioNetHdr::default()
    };
    let plain = VirtioNetHdr::default();
    let valid = VirtioNetHdr { flags: VIRTIO_NET_HDR_F_DATA_VALID, ..plain };
    let none = feat(&[]);
    let cases: Vec<(VirtioNetHdr, VirtioFeatures, Delivery)> = vec![
        (plain, none, Delivery::Pass(plain)),
        (valid, none, Delivery::Pass(plain)),
        (valid, feat(&[csum]), Delivery::Pass(valid)),
        (partial, none, Delivery::CompleteCsum(plain)),
        // Without GSO, leftovers in hdr_len, gso_size and (without NEEDS_CSUM) the checksum
        // fields reach no receiver.
        (
            VirtioNetHdr { hdr_len: U16::new(54), gso_size: U16::new(1448), csum_start: U16::new(34), ..plain },
            feat(&[csum]),
            Delivery::Pass(plain),
        ),
        (partial, feat(&[csum]), Delivery::Pass(partial)),
        // Unknown flag bits (e.g. UDP_TUNNEL_CSUM, 0x08) never reach a driver.
        (VirtioNetHdr { flags: 0x09, ..partial }, feat(&[csum]), Delivery::Pass(partial)),
        (VirtioNetHdr { flags: VIRTIO_NET_HDR_F_RSC_INFO, ..plain }, feat(&[csum]), Delivery::Drop),
        (VirtioNetHdr { gso_type: VIRTIO_NET_HDR_GSO_ECN, ..plain }, none, Delivery::Pass(plain)),
        // TSO to a driver that has it, lacks it, or lacks checksum offload altogether.
        (tso(1), feat(&[csum, F::NET_GUEST_TSO4]), Delivery::Pass(tso(1))),
        (tso(1), feat(&[csum, F::NET_GUEST_TSO6]), Delivery::Segment(L4Csum::Partial)),
        (tso(1), none, Delivery::Segment(L4Csum::Complete)),
        (tso(1), feat(&[F::NET_GUEST_TSO4]), Delivery::Segment(L4Csum::Complete)),
        (tso(4), feat(&[csum, F::NET_GUEST_TSO6]), Delivery::Pass(tso(4))),
        (tso(4), feat(&[csum, F::NET_GUEST_TSO4]), Delivery::Segment(L4Csum::Partial)),
        // ECN needs GUEST_ECN.
        (tso(0x81), feat(&[csum, F::NET_GUEST_TSO4]), Delivery::Segment(L4Csum::Partial)),
        (tso(0x81), feat(&[csum, F::NET_GUEST_TSO4, F::NET_GUEST_ECN]), Delivery::Pass(tso(0x81))),
        // USO: either USO feature for a header alone.
        (tso(5), feat(&[csum, F::NET_GUEST_USO6]), Delivery::Pass(tso(5))),
        (tso(5), feat(&[csum]), Delivery::Segment(L4Csum::Partial)),
        // UFO: passed to GUEST_UFO, else no fallback.
        (tso(3), feat(&[csum, F::NET_GUEST_UFO]), Delivery::Pass(tso(3))),
        (tso(3), feat(&[csum, F::NET_GUEST_TSO4]), Delivery::Drop),
        // Tunnel bits and unknown types.
        (tso(0x21), F::all(), Delivery::Drop),
        (tso(2), F::all(), Delivery::Drop),
    ];
    for (h, f, want) in cases {
        assert_eq!(rx_delivery(&h, f), want, "flags {:#x} gso {:#x} features {f:?}", h.flags, h.gso_type);
    }
}

/// With the frame parsed, USO needs the feature of its own IP version.
#[test]
fn uso_delivery_follows_the_ip_version() {
    use VirtioFeatures as F;
    let b4 = build(&Spec::udp4(3000, 1000));
    let b6 = build(&Spec::udp6(3000, 1000));
    let f4 = check_frame(&b4.hdr, &b4.frame, b4.frame.len()).unwrap();
    let f6 = check_frame(&b6.hdr, &b6.frame, b6.frame.len()).unwrap();
    let uso4 = feat(&[F::NET_GUEST_CSUM, F::NET_GUEST_USO4]);
    let uso6 = feat(&[F::NET_GUEST_CSUM, F::NET_GUEST_USO6]);
    assert_eq!(f4.delivery(uso4), Delivery::Pass(f4.header));
    assert_eq!(f4.delivery(uso6), Delivery::Segment(L4Csum::Partial));
    assert_eq!(f6.delivery(uso6), Delivery::Pass(f6.header));
    assert_eq!(f6.delivery(uso4), Delivery::Segment(L4Csum::Partial));
}

// ---- hostile headers: every OffloadError ---------------------------------------------------

fn err(b: &Built) -> OffloadError {
    check_frame(&b.hdr, &b.frame, b.frame.len()).expect_err("must be refused")
}

/// Family 22 and §5.1.6.2.2: GSO type, gso_size, NEEDS_CSUM, csum_start/csum_offset, hdr_len.
#[test]
fn lying_gso_fields_are_refused() {
    let good = || build(&Spec::tcp4(3000, 1448));
    let mut b = good();
    for g in [2, 6, 0x21, 0x41, 0x61, VIRTIO_NET_HDR_GSO_UDP_L4 | VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_UDP | 0x80]
    {
        b.hdr.gso_type = g;
        assert_eq!(err(&b), OffloadError::GsoType { gso_type: g });
    }
    let mut b = good();
    b.hdr.gso_size = U16::new(0);
    assert_eq!(err(&b), OffloadError::GsoSizeZero);
    let mut b = good();
    b.hdr.flags = 0;
    assert_eq!(err(&b), OffloadError::GsoWithoutCsum);
    let mut b = good();
    b.hdr.csum_start = U16::new(30);
    assert_eq!(err(&b), OffloadError::CsumMismatch { start: 30, offset: 16, l4_offset: 34 });
    let mut b = good();
    b.hdr.csum_offset = U16::new(6);
    assert_eq!(err(&b), OffloadError::CsumMismatch { start: 34, offset: 6, l4_offset: 34 });
    // hdr_len is a hint (§5.1.6.2.2): whatever the driver wrote, receivers get the true
    // length of the headers, 14 + 20 + 32 (12 bytes of TCP options) = 66.
    let len = good().frame.len() as u16;
    for hint in [0, 1, 53, 65, 66, 67, len, len + 1, 0xFFFF] {
        let mut b = good();
        b.hdr.hdr_len = U16::new(hint);
        assert_eq!(check_frame(&b.hdr, &b.frame, b.frame.len()).unwrap().header.hdr_len.get(), 66, "hdr_len {hint}");
    }
    // gso_size larger than the payload is one segment, not an error (Linux alike).
    let mut b = good();
    b.hdr.gso_size = U16::new(0xFFFF);
    assert_eq!(check_frame(&b.hdr, &b.frame, b.frame.len()).unwrap().segments(), 1);
}

/// The frame is not what the GSO type says: IP version, ethertype, transport protocol.
#[test]
fn gso_type_not_matching_the_frame_is_refused() {
    let mut b = build(&Spec::tcp6(3000, 1000));
    b.hdr.gso_type = VIRTIO_NET_HDR_GSO_TCPV4;
    assert_eq!(err(&b), OffloadError::IpMismatch { gso_type: 1, ethertype: 0x86DD });
    let mut b = build(&Spec::tcp4(3000, 1000));
    b.hdr.gso_type = VIRTIO_NET_HDR_GSO_TCPV6;
    assert_eq!(err(&b), OffloadError::IpMismatch { gso_type: 4, ethertype: 0x0800 });
    let mut b = build(&Spec::tcp4(3000, 1000));
    b.frame[12..14].copy_from_slice(&[0x08, 0x06]); // ARP
    assert_eq!(err(&b), OffloadError::IpMismatch { gso_type: 1, ethertype: 0x0806 });
    let mut b = build(&Spec::tcp4(3000, 1000));
    b.frame[14] = 0x65; // version 6 in an IPv4 ethertype
    assert_eq!(err(&b), OffloadError::IpMismatch { gso_type: 1, ethertype: 0x0800 });
    let mut b = build(&Spec::tcp6(3000, 1000));
    b.frame[14] = 0x45;
    assert_eq!(err(&b), OffloadError::IpMismatch { gso_type: 4, ethertype: 0x86DD });
    // A third VLAN tag is not walked.
    let mut b = build(&Spec { vlans: 2, ..Spec::tcp4(3000, 1000) });
    b.frame[20..22].copy_from_slice(&[0x81, 0x00]);
    assert_eq!(err(&b), OffloadError::IpMismatch { gso_type: 1, ethertype: 0x8100 });
    // TCP GSO on UDP, USO on TCP.
    let mut b = build(&Spec::udp4(3000, 1000));
    b.hdr.gso_type = VIRTIO_NET_HDR_GSO_TCPV4;
    b.hdr.csum_offset = U16::new(16);
    assert_eq!(err(&b), OffloadError::L4Mismatch { gso_type: 1, protocol: 17 });
    let mut b = build(&Spec::tcp6(3000, 1000));
    b.hdr.gso_type = VIRTIO_NET_HDR_GSO_UDP_L4;
    assert_eq!(err(&b), OffloadError::L4Mismatch { gso_type: 5, protocol: 6 });
}

/// Headers cut short at every layer, by the frame's end or by the snapshot's.
#[test]
fn truncated_headers_are_refused_at_every_layer() {
    // The frame is whole but only its first `at` bytes are given (a snapshot cut short, or
    // a frame whose end comes first: then the checksum field is outside it too, which is
    // reported first, as below).
    let cut = |s: &Spec, at: usize| {
        let b = build(s);
        check_frame(&b.hdr, &b.frame[..at], b.frame.len()).expect_err("must be refused")
    };
    let t = |layer, needed, have| OffloadError::Truncated { layer, needed, have };
    let v4 = Spec { ip: Ip::V4 { options: 8 }, ..Spec::tcp4(0, 1000) };
    assert_eq!(cut(&v4, 10), t(Layer::Ethernet, 14, 10));
    assert_eq!(cut(&v4, 30), t(Layer::Ipv4, 34, 30));
    assert_eq!(cut(&v4, 40), t(Layer::Ipv4, 42, 40));
    assert_eq!(cut(&v4, 50), t(Layer::Tcp, 62, 50));
    assert_eq!(cut(&v4, 70), t(Layer::Tcp, 74, 70)); // inside the TCP options
    let vlan = Spec { vlans: 2, ..Spec::tcp4(0, 1000) };
    assert_eq!(cut(&vlan, 20), t(Layer::Ethernet, 22, 20));
    let v6 = Spec { ip: Ip::V6 { hbh: Some(14), dst: None }, ..Spec::tcp6(0, 1000) };
    assert_eq!(cut(&v6, 50), t(Layer::Ipv6, 54, 50));
    assert_eq!(cut(&v6, 55), t(Layer::Ipv6Extension, 56, 55));
    assert_eq!(cut(&v6, 60), t(Layer::Ipv6Extension, 70, 60));
    let u = Spec::udp6(0, 1000);
    assert_eq!(cut(&u, 60), t(Layer::Udp, 62, 60));
    // A frame that really ends inside its headers.
    let mut b = build(&Spec::tcp4(0, 1000));
    b.frame.truncate(50);
    assert_eq!(err(&b), OffloadError::CsumOutOfRange { start: 34, offset: 16, frame_len: 50 });
    b.hdr.csum_offset = U16::new(0);
    assert_eq!(err(&b), t(Layer::Tcp, 54, 50));
}

/// Header lengths that cannot be: IHL < 5, TCP data offset < 5; IPv4 fragments.
#[test]
fn impossible_header_lengths_and_fragments_are_refused() {
    for ihl in 0..5u8 {
        let mut b = build(&Spec::tcp4(3000, 1000));
        b.frame[14] = 0x40 | ihl;
        assert_eq!(err(&b), OffloadError::Ipv4HeaderLength { ihl });
    }
    for doff in 0..5u8 {
        let mut b = build(&Spec::tcp4(3000, 1000));
        b.frame[34 + 12] = doff << 4;
        assert_eq!(err(&b), OffloadError::TcpHeaderLength { data_offset: doff });
    }
    for frag in [[0x20, 0x00], [0x00, 0x01], [0x5F, 0xFF]] {
        let mut b = build(&Spec::tcp4(3000, 1000));
        b.frame[20..22].copy_from_slice(&frag);
        assert_eq!(err(&b), OffloadError::Ipv4Fragment);
    }
}

/// IPv6 extension headers: hop-by-hop and destination options are walked (up to four),
/// routing, fragment, AH, ESP and the rest are refused.
#[test]
fn ipv6_extension_headers_other_than_options_are_refused() {
    for nh in [43u8, 44, 50, 51, 135, 139, 140, 253] {
        let mut b = build(&Spec::tcp6(3000, 1000));
        b.frame[14 + 6] = nh;
        assert_eq!(err(&b), OffloadError::Ipv6ExtensionHeader { next_header: nh });
    }
    // Behind an options header too.
    let mut b = build(&Spec { ip: Ip::V6 { hbh: Some(6), dst: None }, ..Spec::tcp6(3000, 1000) });
    b.frame[54] = 44;
    assert_eq!(err(&b), OffloadError::Ipv6ExtensionHeader { next_header: 44 });
    // Five destination options headers in a row: one more than walked.
    let mut b = build(&Spec::tcp6(3000, 1000));
    let mut ext = Vec::new();
    for k in 0..5 {
        ext.extend_from_slice(&[if k == 4 { 6 } else { 60 }, 0, 1, 4, 0, 0, 0, 0]);
    }
    b.frame[20] = 60;
    b.frame.splice(54..54, ext);
    b.hdr.csum_start = U16::new(54 + 40);
    b.hdr.hdr_len = U16::new(b.hdr.hdr_len.get() + 40);
    assert_eq!(err(&b), OffloadError::Ipv6ExtensionHeader { next_header: 60 });
    // An unknown next header is not TCP.
    let mut b = build(&Spec::tcp6(3000, 1000));
    b.frame[20] = 200;
    assert_eq!(err(&b), OffloadError::L4Mismatch { gso_type: 4, protocol: 200 });
}

/// Headers longer than MAX_HEADERS_LEN; an IP packet longer than MAX_GSO_IP_LEN.
#[test]
fn oversized_headers_and_frames_are_refused() {
    let mut b = build(&Spec::tcp6(3000, 1000));
    // A destination options header of 256 bytes (hdr ext len 31).
    let mut ext = vec![6u8, 31, 1, 252];
    ext.resize(256, 0);
    b.frame[20] = 60;
    b.frame.splice(54..54, ext);
    assert_eq!(err(&b), OffloadError::HeadersTooLong { len: 310 });

    let s = Spec::tcp4(MAX_GSO_IP_LEN - 20 - 32, 1448);
    let mut b = build(&s);
    assert!(check_frame(&b.hdr, &b.frame, b.frame.len()).is_ok(), "a 64 KiB - 1 IP packet is fine");
    b.frame.push(0);
    assert_eq!(err(&b), OffloadError::TooLarge { ip_len: MAX_GSO_IP_LEN as u32 + 1 });
    // The same through a snapshot, with a frame length that does not fit u32.
    assert!(matches!(check_frame(&b.hdr, &b.frame[..MAX_HEADERS_LEN], usize::MAX), Err(OffloadError::TooLarge { .. })));
}

/// The segmenter's own refusals: not GSO, UFO, index, buffer, source length.
#[test]
fn segmenter_misuse_is_an_error_not_a_panic() {
    let plain = check_frame(&VirtioNetHdr::default(), &[0u8; 60], 60).unwrap();
    assert_eq!(Segmenter::new(&plain, &[0u8; 60], L4Csum::Complete).unwrap_err(), OffloadError::NotGso);
    let mut b = build(&Spec::udp4(3000, 1000));
    b.hdr.gso_type = VIRTIO_NET_HDR_GSO_UDP;
    let ufo = check_frame(&b.hdr, &b.frame, b.frame.len()).expect("UFO frames are validated");
    assert_eq!(
        ufo.delivery(feat(&[VirtioFeatures::NET_GUEST_CSUM, VirtioFeatures::NET_GUEST_UFO])),
        Delivery::Pass(ufo.header)
    );
    assert_eq!(Segmenter::new(&ufo, &b.frame, L4Csum::Complete).unwrap_err(), OffloadError::UfoUnsupported);

    let b = build(&Spec::tcp4(3000, 1000));
    let f = check_frame(&b.hdr, &b.frame, b.frame.len()).unwrap();
    let seg = Segmenter::new(&f, &b.frame, L4Csum::Complete).unwrap();
    let mut out = vec![0u8; 2000];
    assert_eq!(seg.write_segment(3, &b.frame, &mut out), Err(OffloadError::NoSuchSegment { index: 3, count: 3 }));
    assert_eq!(
        seg.write_headers(3, &Checksum::new(), &mut out),
        Err(OffloadError::NoSuchSegment { index: 3, count: 3 })
    );
    assert_eq!(
        seg.write_segment(0, &b.frame, &mut out[..1065]),
        Err(OffloadError::BufferTooSmall { needed: 1066, have: 1065 })
    );
    assert_eq!(
        seg.write_headers(0, &Checksum::new(), &mut out[..65]),
        Err(OffloadError::BufferTooSmall { needed: 66, have: 65 })
    );
    assert_eq!(
        seg.write_segment(0, &b.frame[1..], &mut out),
        Err(OffloadError::FrameLength { expected: b.frame.len() as u32, got: b.frame.len() as u32 - 1 })
    );
    assert_eq!((seg.segment_len(3), seg.payload_range(u32::MAX)), (0, b.frame.len()..b.frame.len()));
}

/// Every error has a message.
#[test]
fn errors_display() {
    let e = OffloadError::Truncated { layer: Layer::Tcp, needed: 54, have: 40 };
    assert_eq!(e.to_string(), "Tcp header needs 54 bytes, frame has 40");
    assert!(OffloadError::UfoUnsupported.to_string().contains("UFO"));
}

// ---- properties ---------------------------------------------------------------------------

fn config() -> ProptestConfig {
    ProptestConfig {
        // Miri interprets every byte: a handful of cases exercises the same paths.
        cases: if cfg!(miri) { 4 } else { 512 },
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    let ip = prop_oneof![
        (0usize..=10).prop_map(|w| Ip::V4 { options: w * 4 }),
        (prop::option::of(0usize..3), prop::option::of(0usize..3))
            .prop_map(|(h, d)| Ip::V6 { hbh: h.map(|n| 6 + 8 * n), dst: d.map(|n| 6 + 8 * n) }),
    ];
    let l4 = prop_oneof![
        ((0usize..=10), any::<[bool; 5]>()).prop_map(|(w, f)| L4::Tcp {
            options: w * 4,
            fin: f[0],
            psh: f[1],
            cwr: f[2],
            ece: f[3],
            urg: f[4]
        }),
        Just(L4::Udp),
    ];
    let max = if cfg!(miri) { 3000 } else { 60_000 };
    (0usize..=2, ip, l4, 0usize..max, 1u16..=9000, 0u8..4).prop_map(|(vlans, ip, l4, payload, mss, ecn)| Spec {
        vlans,
        ip,
        l4,
        payload,
        // Keep the segment count sensible for the test's run time; tiny MSS has its own case.
        mss: mss.max((payload / 200) as u16).max(1),
        ecn,
    })
}

proptest! {
    #![proptest_config(config())]

    /// Random stacks (VLAN tags, IPv4 options, IPv6 options headers, TCP options, flags, ECN
    /// codepoint), sizes and MSS: every segment checks out with etherparse, both checksum
    /// modes.
    #[test]
    fn valid_frames_segment_like_etherparse_says(spec in spec_strategy(), partial in any::<bool>()) {
        let b = build(&spec);
        segment_and_verify(&spec, &b, if partial { L4Csum::Partial } else { L4Csum::Complete });
    }

    /// Arbitrary header fields over random bytes, or over a valid frame with bytes
    /// overwritten: no panic, and whatever is accepted segments within bounds, its payloads
    /// covering the frame's payload exactly once.
    #[test]
    fn arbitrary_headers_and_frames_never_panic_and_stay_bounded(
        valid in prop::option::of(spec_strategy()),
        random in prop::collection::vec(any::<u8>(), 0..400),
        flips in prop::collection::vec((any::<u16>(), any::<u8>()), 0..6),
        fields in any::<(u8, u8, u16, u16, u16, u16)>(),
        keep_fields in any::<bool>(),
        cut in any::<u16>(),
    ) {
        let (mut frame, mut h) = match &valid {
            Some(s) => { let b = build(s); (b.frame, b.hdr) }
            None => (random, VirtioNetHdr::default()),
        };
        if !keep_fields || valid.is_none() {
            let (flags, gso_type, hdr_len, gso_size, start, offset) = fields;
            let gso_type = [0, 1, 3, 4, 5, 0x81, 0x84, gso_type][gso_type as usize % 8];
            h = VirtioNetHdr {
                flags,
                gso_type,
                hdr_len: U16::new(hdr_len),
                gso_size: U16::new(gso_size),
                csum_start: U16::new(start),
                csum_offset: U16::new(offset),
                num_buffers: U16::new(0),
            };
        }
        for (at, v) in &flips {
            if !frame.is_empty() {
                let i = *at as usize % frame.len().min(MAX_HEADERS_LEN);
                frame[i] = *v;
            }
        }
        if cut % 4 == 0 {
            frame.truncate(cut as usize % (frame.len() + 1));
        }
        let mut copy = frame.clone();
        let _ = complete_csum(&h, &mut copy);
        let _ = rx_delivery(&h, VirtioFeatures::from_bits_retain(fields.2 as u64 | (fields.3 as u64) << 32));
        let Ok(of) = check_frame(&h, &frame, frame.len()) else { return Ok(()); };
        let _ = of.delivery(VirtioFeatures::all());
        let Some(layout) = of.layout else {
            prop_assert_eq!(of.segments(), 1);
            return Ok(());
        };
        let mss = of.header.gso_size.get() as usize;
        prop_assert!(of.segments() as usize <= MAX_GSO_IP_LEN.div_ceil(mss));
        for mode in [L4Csum::Complete, L4Csum::Partial] {
            let seg = match Segmenter::new(&of, &frame, mode) {
                Ok(s) => s,
                Err(e) => { prop_assert_eq!(e, OffloadError::UfoUnsupported); continue; }
            };
            let mut out = vec![0u8; layout.headers_len as usize + mss];
            let mut covered = 0;
            for i in 0..seg.count() {
                let n = seg.write_segment(i, &frame, &mut out).unwrap();
                prop_assert_eq!(n, seg.segment_len(i));
                prop_assert_eq!(seg.payload_range(i).start, layout.headers_len as usize + covered);
                covered += n - layout.headers_len as usize;
            }
            prop_assert_eq!(covered, frame.len() - layout.headers_len as usize);
        }
    }
}

/// The smallest MSS on the largest frame: 65 K one-byte segments, all valid (bounded work,
/// no overflow in sequence numbers or ids). Natively only: it is the same loop 65 K times.
#[test]
#[cfg_attr(miri, ignore = "65 K segments through the interpreter")]
fn mss_one_on_a_64k_frame() {
    let s = Spec {
        l4: L4::Tcp { options: 0, fin: true, psh: true, cwr: true, ece: false, urg: false },
        ..Spec::tcp4(MAX_GSO_IP_LEN - 40, 1)
    };
    let b = build(&s);
    assert_eq!(segment_and_verify(&s, &b, L4Csum::Complete), (MAX_GSO_IP_LEN - 40) as u32);
}
