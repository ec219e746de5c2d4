//! Test traffic for the `source` back-end: one well-formed Ethernet/IPv4/UDP frame of a chosen
//! size, built once and offered to the guest over and over (as DPDK testpmd's `txonly` mode
//! does), so that a benchmark measures the data path and not a packet generator.

/// Smallest frame the generator builds: Ethernet (14) + IPv4 (20) + UDP (8) + 18 bytes of
/// payload = 60, the Ethernet minimum without the FCS.
pub const MIN_FRAME: usize = 60;

/// Largest frame: the 9000-byte jumbo MTU plus the Ethernet header.
pub const MAX_FRAME: usize = 9014;

/// Source MAC of generated frames (locally administered).
pub const SOURCE_MAC: [u8; 6] = [0x02, 0x76, 0x71, 0x00, 0x00, 0x01];

/// A UDP datagram from 198.18.0.1:9 to 198.18.0.2:9 (the RFC 2544 benchmarking range) to the
/// broadcast MAC, `size` bytes long without FCS, with valid IPv4 and UDP checksums.
/// `size` is clamped to [`MIN_FRAME`]..=[`MAX_FRAME`].
pub fn udp_frame(size: usize) -> Vec<u8> {
    let size = size.clamp(MIN_FRAME, MAX_FRAME);
    let mut f = vec![0u8; size];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&SOURCE_MAC);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (size - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45; // IPv4, 5 words
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&[198, 18, 0, 1]);
    ip[16..20].copy_from_slice(&[198, 18, 0, 2]);
    let csum = checksum(0, ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let udp_len = ip_len - 20;
    f[34..36].copy_from_slice(&9u16.to_be_bytes());
    f[36..38].copy_from_slice(&9u16.to_be_bytes());
    f[38..40].copy_from_slice(&udp_len.to_be_bytes());
    for (i, b) in f[42..].iter_mut().enumerate() {
        *b = i as u8;
    }
    // UDP checksum over the pseudo-header (addresses, protocol, length) and the datagram.
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&[198, 18, 0, 1]);
    pseudo[4..8].copy_from_slice(&[198, 18, 0, 2]);
    pseudo[9] = 17;
    pseudo[10..12].copy_from_slice(&udp_len.to_be_bytes());
    let sum = checksum(sum_words(0, &pseudo), &f[34..]);
    let sum = if sum == 0 { 0xffff } else { sum };
    f[40..42].copy_from_slice(&sum.to_be_bytes());
    f
}

fn sum_words(mut acc: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u32) << 8;
    }
    acc
}

/// The Internet checksum (RFC 1071) of `bytes`, continuing from a partial sum.
fn checksum(acc: u32, bytes: &[u8]) -> u16 {
    let mut s = sum_words(acc, bytes);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_asked_size_and_valid_checksums() {
        for size in [64, 1518, 60, 9014] {
            let f = udp_frame(size);
            assert_eq!(f.len(), size);
            // A header whose checksum is right sums to 0xffff (checksum 0).
            assert_eq!(checksum(0, &f[14..34]), 0, "IPv4 header checksum, size {size}");
            let udp_len = (size - 34) as u16;
            let mut pseudo = [0u8; 12];
            pseudo[0..4].copy_from_slice(&f[26..30]);
            pseudo[4..8].copy_from_slice(&f[30..34]);
            pseudo[9] = 17;
            pseudo[10..12].copy_from_slice(&udp_len.to_be_bytes());
            assert_eq!(checksum(sum_words(0, &pseudo), &f[34..]), 0, "UDP checksum, size {size}");
        }
        assert_eq!(udp_frame(10).len(), MIN_FRAME);
        assert_eq!(udp_frame(1 << 20).len(), MAX_FRAME);
    }
}
