//! `offloadbench --case {tso4-64k|tso4-64k-partial|csum-1500|complete-1514} --iters N`
//!
//! The software fallback of `virtq::net::{offload, gso, csum}` (issue 16), one operation per
//! iteration on a frame built once:
//!
//! - `tso4-64k`: a 64 KiB TCPv4 GSO frame (45 × 1448 payload bytes, TCP timestamps), as a
//!   Linux guest hands it over with `NEEDS_CSUM`: `check_frame`, `Segmenter::new`, and all 45
//!   segments written with `write_segment` into one output buffer, checksums complete (for a
//!   receiver without `GUEST_CSUM`).
//! - `tso4-64k-partial`: the same with checksums left partial (a receiver with `GUEST_CSUM`
//!   but without `GUEST_TSO4`): no payload byte is summed, only copied.
//! - `csum-1500`: the ones' complement sum of 1500 bytes (`csum::checksum`).
//! - `complete-1514`: `complete_csum` of a 1514-byte TCPv4 frame (1480 bytes summed).
//!
//! Setup and the final check cost the same for any N, so under callgrind
//! `Ir/op = (Ir(N2) - Ir(N1)) / (N2 - N1)`; `benches/offloadbench.sh` runs that.

use std::hint::black_box;
use std::process::ExitCode;

use virtq::net::csum::checksum;
use virtq::net::gso::Segmenter;
use virtq::net::header::{VirtioNetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4};
use virtq::net::offload::{check_frame, complete_csum, L4Csum};

const USAGE: &str = "usage: offloadbench --case {tso4-64k|tso4-64k-partial|csum-1500|complete-1514} --iters N";
const MSS: usize = 1448;
const SEGMENTS: usize = 45;

/// Ethernet + IPv4 + TCP with timestamps (66 bytes) and `payload` bytes, the TCP checksum
/// field holding the pseudo-header sum as for `NEEDS_CSUM`, and its virtio-net header.
fn tcp4_frame(payload: usize, gso: bool) -> (VirtioNetHdr, Vec<u8>) {
    let mut f = vec![0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1, 0x08, 0x00];
    let ip_len = 20 + 32 + payload;
    f.extend_from_slice(&[0x45, 0, (ip_len >> 8) as u8, ip_len as u8, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    let tcp_len = (32 + payload) as u32;
    // Pseudo-header sum: addresses, protocol, length (folded, not complemented).
    let mut s: u32 = 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 6 + tcp_len;
    while s > 0xFFFF {
        s = (s & 0xFFFF) + (s >> 16);
    }
    f.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0, 0, 0x10, 0, 0, 0, 0, 77, 0x80, 0x18, 2, 0]);
    f.extend_from_slice(&(s as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    f.extend((0..payload).map(|i| (i * 7 + 1) as u8));
    let mut h = VirtioNetHdr { flags: VIRTIO_NET_HDR_F_NEEDS_CSUM, ..VirtioNetHdr::default() };
    h.csum_start.set(34);
    h.csum_offset.set(16);
    if gso {
        h.gso_type = VIRTIO_NET_HDR_GSO_TCPV4;
        h.gso_size.set(MSS as u16);
        h.hdr_len.set(66);
    }
    (h, f)
}

fn main() -> ExitCode {
    let mut case = None;
    let mut iters = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--case", Some(v)) => case = Some(v),
            ("--iters", Some(v)) => iters = v.parse::<u64>().ok(),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(case), Some(iters)) = (case, iters) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match case.as_str() {
        "tso4-64k" | "tso4-64k-partial" => {
            let mode = if case == "tso4-64k" { L4Csum::Complete } else { L4Csum::Partial };
            let (h, frame) = tcp4_frame(SEGMENTS * MSS, true);
            let mut out = vec![0u8; 66 + MSS];
            let mut bytes = 0usize;
            for _ in 0..iters {
                let frame = black_box(&frame[..]);
                let of = check_frame(black_box(&h), frame, frame.len()).expect("valid frame");
                let seg = Segmenter::new(&of, frame, mode).expect("GSO frame");
                for i in 0..seg.count() {
                    bytes += seg.write_segment(i, frame, &mut out).expect("segment");
                    black_box(&out);
                }
            }
            if bytes != iters as usize * (SEGMENTS * (66 + MSS)) {
                eprintln!("offloadbench: wrote {bytes} bytes");
                return ExitCode::FAILURE;
            }
        }
        "csum-1500" => {
            let data: Vec<u8> = (0..1500).map(|i| (i * 13 + 5) as u8).collect();
            let mut acc = 0u16;
            for _ in 0..iters {
                acc ^= checksum(black_box(&data));
            }
            black_box(acc);
        }
        "complete-1514" => {
            let (h, mut frame) = tcp4_frame(1514 - 66, false);
            for _ in 0..iters {
                // The field keeps being overwritten: the sum covers it, so restore it first
                // (2 bytes) to measure the same work each time.
                frame[50..52].fill(0);
                complete_csum(black_box(&h), black_box(&mut frame)).expect("in range");
            }
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}
