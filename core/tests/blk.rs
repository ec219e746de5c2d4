//! virtio-blk requests (VIRTIO 1.2 §5.2.6) and their hostile-input family: request chains built
//! by the in-tree test driver, popped by the queue, parsed with `blk::parse`, their data found
//! with `blk::data_pieces` and completed with `blk::complete`; every result checked in guest
//! memory (status byte, used length, bytes).
//!
//! Families (shared/reference/hostile-inputs.md, block view): 6 direction (data the wrong way
//! for the type), 7 TOCTOU (header and segments copied once), 9 short chains (header too
//! short, split header, no status byte, CH #8401's head-only chain), plus the block rules:
//! sector overflow and capacity, whole sectors, segment count / size / flags, GET_ID buffer.

mod common;

use common::{queue, setup, Guest};
use proptest::prelude::*;
use virtq::blk::{
    self, complete, complete_error, complete_malformed, data_pieces, parse, read_segments, BlkConfig, DiscardSegment,
    Limits, Request, RequestError, RequestType, Status, SECTOR_SIZE,
};
use virtq::desc::{DescFlags, Descriptor};
use virtq::testing::{Buf, TestDriver};
use virtq::{Chain, ChainError, PopError, RegionTable, VirtioFeatures};

const IN: u32 = 0;
const OUT: u32 = 1;
const FLUSH: u32 = 4;
const GET_ID: u32 = 8;
const DISCARD: u32 = 11;
const WRITE_ZEROES: u32 = 13;

/// A 1 MiB device (2048 sectors) with discard (8 segments of 64 sectors) and write zeroes
/// (4 segments of 128 sectors) negotiated.
const CAPACITY: u64 = 2048;

fn config() -> BlkConfig {
    BlkConfig {
        capacity: CAPACITY,
        max_discard_sectors: 64,
        max_discard_seg: 8,
        max_write_zeroes_sectors: 128,
        max_write_zeroes_seg: 4,
        ..BlkConfig::default()
    }
}

fn limits() -> Limits {
    Limits::new(&config(), VirtioFeatures::BLK_DISCARD | VirtioFeatures::BLK_WRITE_ZEROES, false)
}

fn hdr(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&0xdead_beefu32.to_le_bytes()); // `reserved`: ignored
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn seg(sector: u64, num_sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = sector.to_le_bytes().to_vec();
    s.extend_from_slice(&num_sectors.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 + 7) as u8 ^ (i >> 9) as u8).collect()
}

/// What the device did with one request chain.
#[derive(Debug)]
struct Outcome {
    result: Result<Request, RequestError>,
    /// The data as `data_pieces` located it (OUT: read from guest memory).
    data: Vec<u8>,
    /// Used length in the used ring.
    used_len: u32,
    /// The byte at the chain's last writable byte after completion, if it has one.
    status: Option<u8>,
    segments: Option<Result<Vec<DiscardSegment>, RequestError>>,
}

/// Publishes `bufs` as one direct chain on a fresh queue, pops it and serves it as a device
/// would: parse, IN/GET_ID data filled with `pattern`, OUT data read, segments read, complete.
fn serve(bufs: &[Buf<'_>], limits: &Limits) -> Outcome {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, VirtioFeatures::VERSION_1);
    let mut addrs = vec![0u64; bufs.len()];
    let head = drv.build_chain(bufs, &mut addrs);
    // The status byte the device must write is pre-set to a value it never writes.
    if let Some(i) = bufs.iter().rposition(|b| b.write && b.len > 0) {
        drv.write(addrs[i] + bufs[i].len as u64 - 1, &[0xEE]);
    }
    drv.publish(head);
    let mut chain: Chain<'_, 16> = Chain::new();
    assert!(q.pop_into(&mut chain).expect("a valid chain").is_some());
    let result = parse(&chain, limits);
    let mut data = Vec::new();
    let mut segments = None;
    let used = match &result {
        Ok(req) => {
            let mut written = 0u32;
            match req.kind {
                RequestType::In | RequestType::GetId => {
                    let fill = pattern(req.data_len as usize);
                    for (ptr, len) in data_pieces(&chain, req) {
                        // SAFETY: a piece of a device-writable buffer in the test's guest
                        // memory, `len` bytes long; `written + len <= data_len`.
                        unsafe { core::ptr::copy_nonoverlapping(fill.as_ptr().add(written as usize), ptr, len) };
                        written += len as u32;
                    }
                    data = fill;
                }
                RequestType::Out => {
                    for (ptr, len) in data_pieces(&chain, req) {
                        // SAFETY: a piece of a device-readable buffer in the test's guest
                        // memory, `len` bytes long.
                        data.extend_from_slice(unsafe { core::slice::from_raw_parts(ptr, len) });
                    }
                }
                RequestType::Discard | RequestType::WriteZeroes => {
                    let mut out = [DiscardSegment::default(); 8];
                    segments = Some(read_segments(&chain, req, limits, &mut out).map(|s| s.to_vec()));
                }
                RequestType::Flush => assert_eq!(data_pieces(&chain, req).count(), 0),
            }
            match &segments {
                Some(Err(e)) => complete_error(&chain, e),
                _ => complete(&chain, written, Status::Ok),
            }
        }
        Err(e) => complete_error(&chain, e),
    };
    q.push(chain.head(), used);
    let _ = q.publish();
    let (id, used_len) = drv.used_elem(0);
    assert_eq!(id, head as u32);
    let status = bufs.iter().rposition(|b| b.write && b.len > 0).map(|i| {
        let mut b = [0u8];
        drv.read(addrs[i] + bufs[i].len as u64 - 1, &mut b);
        b[0]
    });
    Outcome { result, data, used_len, status, segments }
}

fn err(bufs: &[Buf<'_>]) -> RequestError {
    serve(bufs, &limits()).result.expect_err("refused")
}

// ---- well-formed requests -------------------------------------------------------------------

#[test]
fn read_fills_the_writable_data_and_reports_data_plus_status() {
    let h = hdr(IN, 8);
    let o = serve(&[Buf::readable(&h), Buf::writable(1024), Buf::writable(512), Buf::writable(1)], &limits());
    assert_eq!(o.result, Ok(Request { kind: RequestType::In, sector: 8, data_len: 1536 }));
    assert_eq!(o.result.unwrap().offset(), 8 * SECTOR_SIZE);
    assert_eq!((o.used_len, o.status), (1537, Some(Status::Ok as u8)));
}

#[test]
fn write_data_is_found_after_the_header_in_any_layout() {
    let data = pattern(2048);
    // Header, data and status in their own descriptors (Linux).
    let h = hdr(OUT, 100);
    let o = serve(&[Buf::readable(&h), Buf::readable(&data), Buf::writable(1)], &limits());
    assert_eq!(o.result, Ok(Request { kind: RequestType::Out, sector: 100, data_len: 2048 }));
    assert_eq!((o.data, o.used_len, o.status), (data.clone(), 1, Some(0)));
    // Header and data in one descriptor (ANY_LAYOUT, §2.7.4).
    let mut joined = hdr(OUT, 100);
    joined.extend_from_slice(&data);
    let o = serve(&[Buf::readable(&joined), Buf::writable(1)], &limits());
    assert_eq!(o.data, data);
    // Header split over three descriptors, data over two (family 9: split header).
    let (a, b) = joined.split_at(5);
    let (b, c) = b.split_at(7);
    let (c, d) = c.split_at(1000);
    let o =
        serve(&[Buf::readable(a), Buf::readable(b), Buf::readable(c), Buf::readable(d), Buf::writable(1)], &limits());
    assert_eq!(o.result.unwrap().sector, 100);
    assert_eq!(o.data, data);
}

#[test]
fn read_data_may_share_its_last_descriptor_with_the_status_byte() {
    let h = hdr(IN, 0);
    let o = serve(&[Buf::readable(&h), Buf::writable(512 + 1)], &limits());
    assert_eq!(o.result.unwrap().data_len, 512);
    assert_eq!((o.used_len, o.status), (513, Some(0)), "the status is the last byte, after the data");
}

#[test]
fn the_last_sector_is_readable_and_zero_length_requests_are_accepted() {
    let h = hdr(IN, CAPACITY - 1);
    assert!(serve(&[Buf::readable(&h), Buf::writable(512), Buf::writable(1)], &limits()).result.is_ok());
    let h = hdr(OUT, CAPACITY);
    let o = serve(&[Buf::readable(&h), Buf::writable(1)], &limits());
    assert_eq!(o.result, Ok(Request { kind: RequestType::Out, sector: CAPACITY, data_len: 0 }));
}

#[test]
fn flush_has_no_data_and_tolerates_some() {
    let h = hdr(FLUSH, 0);
    let o = serve(&[Buf::readable(&h), Buf::writable(1)], &limits());
    assert_eq!((o.result.unwrap().data_len, o.used_len, o.status), (0, 1, Some(0)));
    // "SHOULD NOT include any data": tolerated, ignored, and the sector is not used.
    let h = hdr(FLUSH, u64::MAX);
    let o = serve(&[Buf::readable(&h), Buf::readable(&[1; 512]), Buf::writable(513)], &limits());
    assert_eq!(o.result.unwrap().data_len, 0);
    assert_eq!(o.used_len, 1);
}

#[test]
fn get_id_takes_a_buffer_of_at_least_twenty_bytes() {
    let h = hdr(GET_ID, 0);
    let o = serve(&[Buf::readable(&h), Buf::writable(20), Buf::writable(1)], &limits());
    assert_eq!((o.result.unwrap().data_len, o.used_len), (20, 21));
    assert_eq!(
        err(&[Buf::readable(&h), Buf::writable(19), Buf::writable(1)]),
        RequestError::IdBufferTooShort { len: 19 }
    );
}

#[test]
fn discard_and_write_zeroes_segments_are_read_once_and_checked() {
    let mut data = hdr(DISCARD, 0);
    data.extend(seg(0, 64, 0));
    data.extend(seg(CAPACITY - 1, 1, 0));
    let o = serve(&[Buf::readable(&data), Buf::writable(1)], &limits());
    assert_eq!(o.result.unwrap().segments(), 2);
    let segs = o.segments.unwrap().unwrap();
    assert_eq!(segs[1], DiscardSegment { sector: CAPACITY - 1, num_sectors: 1, unmap: false });
    assert_eq!((segs[0].offset(), segs[0].len()), (0, 64 * 512));
    assert_eq!(o.status, Some(0));
    // Write zeroes may ask to unmap.
    let mut data = hdr(WRITE_ZEROES, 0);
    data.extend(seg(10, 128, 1));
    let o = serve(&[Buf::readable(&data), Buf::writable(1)], &limits());
    assert_eq!(o.segments.unwrap().unwrap(), [DiscardSegment { sector: 10, num_sectors: 128, unmap: true }]);
}

// ---- hostile: family 9, short chains ---------------------------------------------------------

#[test]
fn a_chain_without_a_writable_byte_has_no_status_and_is_completed_with_len_0() {
    let h = hdr(IN, 0);
    let o = serve(&[Buf::readable(&h)], &limits());
    assert_eq!((o.result, o.used_len, o.status), (Err(RequestError::NoStatus), 0, None));
    // Cloud Hypervisor #8401: a head-only chain still comes back.
    let o = serve(&[Buf::readable(&h[..4])], &limits());
    assert_eq!((o.result, o.used_len), (Err(RequestError::NoStatus), 0));
}

#[test]
fn a_header_shorter_than_16_bytes_is_an_io_error() {
    for len in [0usize, 1, 8, 15] {
        let h = hdr(IN, 0);
        let o = serve(&[Buf::readable(&h[..len]), Buf::writable(513)], &limits());
        assert_eq!(o.result, Err(RequestError::HeaderTooShort { len: len as u32 }));
        assert_eq!((o.used_len, o.status), (1, Some(Status::IoErr as u8)), "only the status is written");
    }
    // A writable-only chain: the status byte is there, the header is not.
    let o = serve(&[Buf::writable(17)], &limits());
    assert_eq!((o.result, o.status), (Err(RequestError::HeaderTooShort { len: 0 }), Some(1)));
}

// ---- hostile: chains the walk refuses ------------------------------------------------------------

/// What became of a chain the walk refused.
#[derive(Debug, PartialEq, Eq)]
struct Refused {
    error: ChainError,
    used_len: u32,
    /// The byte at the end of the chain's last non-empty writable buffer as built (before
    /// `edit`), preset to 0xEE.
    last: Option<u8>,
}

/// Publishes `bufs` as one chain (indirect if `indirect`), lets `edit(driver, head, table)`
/// break it (`table`: the indirect table's address, else the queue's), pops it into a
/// `Chain<N>` without completion, completes it with `complete_malformed` and returns what
/// happened. Panics if the chain is not refused.
fn refuse<const N: usize>(
    bufs: &[Buf<'_>],
    indirect: bool,
    edit: impl FnOnce(&TestDriver<'_, RegionTable<8>>, u16, u64),
) -> Refused {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, VirtioFeatures::VERSION_1 | VirtioFeatures::RING_INDIRECT_DESC);
    let mut addrs = vec![0u64; bufs.len()];
    let (head, table) = if indirect {
        let head = drv.build_indirect_chain(bufs);
        let table = drv.read_desc(head).addr;
        for (i, a) in addrs.iter_mut().enumerate() {
            let mut raw = [0u8; 8];
            drv.read(table + 16 * i as u64, &mut raw);
            *a = u64::from_le_bytes(raw);
        }
        (head, table)
    } else {
        (drv.build_chain(bufs, &mut addrs), cfg.desc_table)
    };
    let last = bufs.iter().rposition(|b| b.write && b.len > 0).map(|i| addrs[i] + bufs[i].len as u64 - 1);
    if let Some(at) = last {
        drv.write(at, &[0xEE]);
    }
    edit(&drv, head, table);
    drv.publish(head);
    let mut chain: Chain<'_, N> = Chain::new();
    let error = match q.pop_into_uncompleted(&mut chain) {
        Err(PopError::Chain { head: h, error }) => {
            assert_eq!(h, head);
            error
        }
        other => panic!("not refused: {other:?}"),
    };
    assert_eq!(drv.used_idx(), 0, "not completed by the pop");
    let used_len = complete_malformed(&q, head, error);
    q.push(head, used_len);
    let _ = q.publish();
    assert_eq!(drv.used_elem(0), (head as u32, used_len));
    let last = last.map(|at| {
        let mut b = [0u8];
        drv.read(at, &mut b);
        b[0]
    });
    Refused { error, used_len, last }
}

/// Rewrites descriptor `i` of `table` with `f`.
fn edit_desc(drv: &TestDriver<'_, RegionTable<8>>, table: u64, i: u16, f: impl FnOnce(&mut Descriptor)) {
    let mut raw = [0u8; 16];
    drv.read(table + 16 * i as u64, &mut raw);
    let mut d = Descriptor {
        addr: u64::from_le_bytes(raw[0..8].try_into().unwrap()),
        len: u32::from_le_bytes(raw[8..12].try_into().unwrap()),
        flags: DescFlags::from_bits_retain(u16::from_le_bytes([raw[12], raw[13]])),
        next: u16::from_le_bytes([raw[14], raw[15]]),
    };
    f(&mut d);
    drv.write_desc_at(table, i, d);
}

const IOERR: Option<u8> = Some(Status::IoErr as u8);
const UNTOUCHED: Option<u8> = Some(0xEE);

#[test]
fn a_refused_chain_that_ends_in_a_writable_buffer_gets_io_error_there() {
    let h = hdr(OUT, 0);
    let d = pattern(512);
    let none = |_: &TestDriver<'_, RegionTable<8>>, _: u16, _: u64| {};
    // A readable buffer after a writable one (§2.7.5.2), direct and in an indirect table; the
    // status byte at the end of a buffer it shares with data.
    for indirect in [false, true] {
        let bufs = [Buf::readable(&h), Buf::writable(512), Buf::readable(&d), Buf::writable(513)];
        let r = refuse::<16>(&bufs, indirect, none);
        assert_eq!(r, Refused { error: ChainError::ReadableAfterWritable, used_len: 1, last: IOERR });
    }
    // More buffers than the device's segment list holds.
    let bufs = [Buf::readable(&h), Buf::readable(&d), Buf::readable(&d), Buf::readable(&d), Buf::writable(1)];
    let r = refuse::<4>(&bufs, false, none);
    assert_eq!(r, Refused { error: ChainError::TooManySegments, used_len: 1, last: IOERR });
    // A data buffer outside guest memory; a zero-length buffer after the status is no buffer.
    let bufs = [Buf::readable(&h), Buf::readable(&d), Buf::writable(1), Buf::writable(0)];
    let r = refuse::<16>(&bufs, false, |drv, head, table| edit_desc(drv, table, head + 1, |d| d.addr = 1 << 40));
    assert_eq!(r, Refused { error: ChainError::Unmapped { addr: 1 << 40 }, used_len: 1, last: IOERR });
    // A chain longer than 2^32 bytes.
    let bufs = [Buf::readable(&h), Buf::writable(1)];
    let r = refuse::<16>(&bufs, false, |drv, head, table| {
        edit_desc(drv, table, head, |d| {
            d.len = u32::MAX;
            d.addr = 0;
        })
    });
    assert!(matches!(r.error, ChainError::Unmapped { .. } | ChainError::TotalLengthOverflow));
    assert_eq!((r.used_len, r.last), (1, IOERR));
}

#[test]
fn a_refused_chain_without_a_usable_last_byte_is_completed_with_len_0() {
    let h = hdr(IN, 0);
    let d = pattern(512);
    let none = |_: &TestDriver<'_, RegionTable<8>>, _: u16, _: u64| {};
    let bufs = [Buf::readable(&h), Buf::writable(513), Buf::readable(&d)];
    // Ends in a readable buffer: the writable one is not the status, and is left alone.
    assert_eq!(
        refuse::<16>(&bufs, false, none),
        Refused { error: ChainError::ReadableAfterWritable, used_len: 0, last: UNTOUCHED }
    );
    let bufs = [Buf::readable(&h), Buf::readable(&d), Buf::writable(513)];
    // The last buffer outside guest memory, or its last byte beyond 2^64.
    for addr in [1u64 << 40, u64::MAX - 100] {
        let r = refuse::<16>(&bufs, false, |drv, head, table| edit_desc(drv, table, head + 2, |d| d.addr = addr));
        assert_eq!((r.used_len, r.last), (0, UNTOUCHED), "{:?}", r.error);
    }
    // No end to find: a loop, a next index out of range, a nested indirect table.
    let r = refuse::<16>(&bufs, false, |drv, head, table| {
        edit_desc(drv, table, head + 2, |d| {
            d.flags |= DescFlags::NEXT;
            d.next = head + 1;
        })
    });
    assert_eq!((r.used_len, r.last), (0, UNTOUCHED), "{:?}", r.error);
    let r = refuse::<16>(&bufs, false, |drv, head, table| {
        edit_desc(drv, table, head + 1, |d| d.next = 16);
    });
    assert_eq!(r, Refused { error: ChainError::NextOutOfRange { index: 16 }, used_len: 0, last: UNTOUCHED });
    let r = refuse::<16>(&bufs, true, |drv, _, table| {
        edit_desc(drv, table, 1, |d| d.flags |= DescFlags::INDIRECT);
    });
    assert_eq!(r, Refused { error: ChainError::NestedIndirect, used_len: 0, last: UNTOUCHED });
    assert_eq!(RequestError::Malformed { error: ChainError::ChainTooLong }.status(), Some(Status::IoErr));
}

// ---- hostile: family 6, direction -------------------------------------------------------------

#[test]
fn data_in_the_wrong_direction_is_refused() {
    let h = hdr(IN, 0);
    assert_eq!(
        err(&[Buf::readable(&h), Buf::readable(&[0; 512]), Buf::writable(1)]),
        RequestError::DataDirection { kind: RequestType::In }
    );
    let h = hdr(GET_ID, 0);
    assert_eq!(
        err(&[Buf::readable(&h), Buf::readable(&[0; 20]), Buf::writable(21)]),
        RequestError::DataDirection { kind: RequestType::GetId }
    );
    for (kind, t) in
        [(OUT, RequestType::Out), (DISCARD, RequestType::Discard), (WRITE_ZEROES, RequestType::WriteZeroes)]
    {
        let mut h = hdr(kind, 0);
        h.extend(seg(0, 1, 0));
        let o = serve(&[Buf::readable(&h), Buf::writable(512), Buf::writable(1)], &limits());
        assert_eq!(o.result, Err(RequestError::DataDirection { kind: t }));
        assert_eq!((o.used_len, o.status), (1, Some(1)));
    }
}

// ---- block rules ------------------------------------------------------------------------------

#[test]
fn lengths_must_be_whole_sectors() {
    let h = hdr(OUT, 0);
    for len in [1usize, 511, 513, 4095] {
        assert_eq!(
            err(&[Buf::readable(&h), Buf::readable(&vec![0; len]), Buf::writable(1)]),
            RequestError::NotSectorMultiple { len: len as u32 }
        );
    }
    let h = hdr(IN, 0);
    assert_eq!(err(&[Buf::readable(&h), Buf::writable(100)]), RequestError::NotSectorMultiple { len: 99 });
}

#[test]
fn sectors_beyond_capacity_or_overflowing_are_refused() {
    let cases = [(CAPACITY, 1u64), (CAPACITY - 1, 2), (u64::MAX, 1), (u64::MAX / 512 + 1, 0), (1 << 63, 1)];
    for (sector, sectors) in cases {
        let h = hdr(IN, sector);
        let len = (sectors * 512) as u32;
        let o = serve(&[Buf::readable(&h), Buf::writable(len + 1)], &limits());
        assert_eq!(o.result, Err(RequestError::BeyondCapacity { sector, sectors }), "{sector} {sectors}");
        assert_eq!(o.status, Some(Status::IoErr as u8));
    }
    // A capacity whose byte size does not fit 64 bits: the offset check still holds.
    let huge = Limits { capacity: u64::MAX, ..limits() };
    let h = hdr(OUT, u64::MAX / 512 + 1);
    let o = serve(&[Buf::readable(&h), Buf::writable(1)], &huge);
    assert!(matches!(o.result, Err(RequestError::BeyondCapacity { .. })));
}

#[test]
fn unknown_and_unnegotiated_types_are_unsupported() {
    for code in [2u32, 3, 10, 14, 0x8000_0000, u32::MAX] {
        let h = hdr(code, 0);
        let o = serve(&[Buf::readable(&h), Buf::writable(1)], &limits());
        assert_eq!(o.result, Err(RequestError::UnknownType { code }));
        assert_eq!(o.status, Some(Status::Unsupp as u8));
    }
    let none = Limits::new(&config(), VirtioFeatures::VERSION_1, false);
    for (code, kind) in [(DISCARD, RequestType::Discard), (WRITE_ZEROES, RequestType::WriteZeroes)] {
        let mut h = hdr(code, 0);
        h.extend(seg(0, 1, 0));
        let o = serve(&[Buf::readable(&h), Buf::writable(1)], &none);
        assert_eq!((o.result, o.status), (Err(RequestError::NotNegotiated { kind }), Some(2)));
    }
}

#[test]
fn a_read_only_device_refuses_every_write_and_serves_reads() {
    let ro = Limits { read_only: true, ..limits() };
    let data = pattern(512);
    for (code, kind) in
        [(OUT, RequestType::Out), (DISCARD, RequestType::Discard), (WRITE_ZEROES, RequestType::WriteZeroes)]
    {
        let h = hdr(code, 0);
        let body = if code == OUT { data.clone() } else { seg(0, 1, 0) };
        let o = serve(&[Buf::readable(&h), Buf::readable(&body), Buf::writable(1)], &ro);
        assert_eq!((o.result, o.status), (Err(RequestError::ReadOnly { kind }), Some(Status::IoErr as u8)));
    }
    let h = hdr(IN, 0);
    assert!(serve(&[Buf::readable(&h), Buf::writable(513)], &ro).result.is_ok());
    let h = hdr(FLUSH, 0);
    assert!(serve(&[Buf::readable(&h), Buf::writable(1)], &ro).result.is_ok());
}

#[test]
fn segment_lengths_counts_sizes_and_flags_are_checked() {
    let body = |code: u32, segs: &[Vec<u8>]| {
        let mut v = hdr(code, 0);
        segs.iter().for_each(|s| v.extend_from_slice(s));
        v
    };
    // Not whole segments, or none.
    for cut in [0usize, 1, 15, 17] {
        let mut b = body(DISCARD, &[seg(0, 1, 0), seg(1, 1, 0)]);
        b.truncate(16 + cut);
        assert_eq!(err(&[Buf::readable(&b), Buf::writable(1)]), RequestError::SegmentLength { len: cut as u32 });
    }
    // More than max_discard_seg (8) / max_write_zeroes_seg (4).
    let nine: Vec<_> = (0..9).map(|i| seg(i, 1, 0)).collect();
    let b = body(DISCARD, &nine);
    assert_eq!(err(&[Buf::readable(&b), Buf::writable(1)]), RequestError::TooManySegments { count: 9, max: 8 });
    let b = body(WRITE_ZEROES, &nine[..5]);
    assert_eq!(err(&[Buf::readable(&b), Buf::writable(1)]), RequestError::TooManySegments { count: 5, max: 4 });
    // Checked per segment, before any is acted on: the bad one is the last.
    let check = |code: u32, bad: Vec<u8>| {
        let b = body(code, &[seg(0, 1, 0), bad]);
        let o = serve(&[Buf::readable(&b), Buf::writable(1)], &limits());
        assert!(o.result.is_ok(), "the request itself is well-formed");
        let e = o.segments.unwrap().unwrap_err();
        assert_eq!(o.status, Some(e.status().unwrap() as u8));
        e
    };
    assert_eq!(check(DISCARD, seg(0, 1, 1)), RequestError::SegmentFlags { flags: 1 }, "UNMAP on a discard");
    assert_eq!(check(DISCARD, seg(0, 1, 2)), RequestError::SegmentFlags { flags: 2 });
    assert_eq!(check(WRITE_ZEROES, seg(0, 1, 0x8000_0001)), RequestError::SegmentFlags { flags: 0x8000_0001 });
    assert_eq!(RequestError::SegmentFlags { flags: 2 }.status(), Some(Status::Unsupp));
    assert_eq!(check(DISCARD, seg(0, 65, 0)), RequestError::SegmentTooLarge { num_sectors: 65, max: 64 });
    assert_eq!(check(WRITE_ZEROES, seg(0, 129, 0)), RequestError::SegmentTooLarge { num_sectors: 129, max: 128 });
    assert_eq!(
        check(DISCARD, seg(CAPACITY - 10, 11, 0)),
        RequestError::BeyondCapacity { sector: CAPACITY - 10, sectors: 11 }
    );
    assert_eq!(check(WRITE_ZEROES, seg(u64::MAX, 1, 0)), RequestError::BeyondCapacity { sector: u64::MAX, sectors: 1 });
}

#[test]
fn a_segment_buffer_smaller_than_the_request_is_too_many_segments() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, VirtioFeatures::VERSION_1);
    let mut b = hdr(DISCARD, 0);
    (0..3).for_each(|i| b.extend(seg(i, 1, 0)));
    drv.add_chain(&[Buf::readable(&b), Buf::writable(1)]);
    let mut chain: Chain<'_, 4> = Chain::new();
    assert!(q.pop_into(&mut chain).unwrap().is_some());
    let req = parse(&chain, &limits()).unwrap();
    let mut two = [DiscardSegment::default(); 2];
    assert_eq!(
        read_segments(&chain, &req, &limits(), &mut two),
        Err(RequestError::TooManySegments { count: 3, max: 2 })
    );
}

// ---- hostile: family 7, TOCTOU ----------------------------------------------------------------

#[test]
fn rewriting_the_header_or_segments_after_parsing_changes_nothing() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, VirtioFeatures::VERSION_1);
    let mut b = hdr(WRITE_ZEROES, 0);
    b.extend(seg(5, 3, 0));
    let mut addrs = [0u64; 2];
    let head = drv.build_chain(&[Buf::readable(&b), Buf::writable(1)], &mut addrs);
    drv.publish(head);
    let mut chain: Chain<'_, 4> = Chain::new();
    assert!(q.pop_into(&mut chain).unwrap().is_some());
    let req = parse(&chain, &limits()).unwrap();
    let mut out = [DiscardSegment::default(); 4];
    let segs = read_segments(&chain, &req, &limits(), &mut out).unwrap();
    // The guest now turns the request into a huge out-of-range read: the copies stand.
    drv.write(addrs[0], &hdr(IN, u64::MAX));
    drv.write(addrs[0] + 16, &seg(u64::MAX, u32::MAX, 0xff));
    assert_eq!(req, Request { kind: RequestType::WriteZeroes, sector: 0, data_len: 16 });
    assert_eq!(segs, [DiscardSegment { sector: 5, num_sectors: 3, unmap: false }]);
}

#[test]
fn indirect_requests_parse_like_direct_ones() {
    let g = Guest::new(1 << 20);
    let (cfg, mut drv) = setup(&g, 16);
    let mut q = queue(&g, cfg, VirtioFeatures::VERSION_1 | VirtioFeatures::RING_INDIRECT_DESC);
    let h = hdr(IN, 3);
    drv.add_indirect_chain(&[Buf::readable(&h), Buf::writable(4096), Buf::writable(1)]);
    let mut chain: Chain<'_, 8> = Chain::new();
    assert!(q.pop_into(&mut chain).unwrap().is_some());
    let req = parse(&chain, &limits()).unwrap();
    assert_eq!(req, Request { kind: RequestType::In, sector: 3, data_len: 4096 });
    let pieces: Vec<usize> = data_pieces(&chain, &req).map(|(_, n)| n).collect();
    assert_eq!(pieces, [4096], "the status byte is not data");
    assert_eq!(complete(&chain, 4096, Status::Ok), 4097);
    assert_eq!(blk::REQ_HEADER_LEN, 16);
}

// ---- properties -------------------------------------------------------------------------------

fn prop_config() -> ProptestConfig {
    ProptestConfig {
        // Miri interprets every case: a handful exercises the same paths.
        cases: if cfg!(miri) { 3 } else { 256 },
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Splits `bytes` at the sorted cut points into readable buffers.
fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    let mut parts = Vec::new();
    let mut at = 0;
    for c in cuts.into_iter().chain([bytes.len()]) {
        parts.push(bytes[at..c].to_vec());
        at = c;
    }
    parts
}

proptest! {
    #![proptest_config(prop_config())]

    /// A valid write split anywhere over up to 6 readable descriptors: the same request and
    /// the same data bytes, whatever the layout.
    #[test]
    fn any_split_of_a_valid_write_gives_the_same_request(
        sectors in 0u64..4, sector in 0u64..CAPACITY, cuts in prop::collection::vec(any::<usize>(), 0..5),
    ) {
        let sector = sector.min(CAPACITY - sectors);
        let data = pattern((sectors * 512) as usize);
        let mut bytes = hdr(OUT, sector);
        bytes.extend_from_slice(&data);
        let parts = split(&bytes, &cuts);
        let mut bufs: Vec<Buf<'_>> = parts.iter().map(|p| Buf::readable(p)).collect();
        bufs.push(Buf::writable(1));
        let o = serve(&bufs, &limits());
        prop_assert_eq!(o.result, Ok(Request { kind: RequestType::Out, sector, data_len: data.len() as u32 }));
        prop_assert_eq!(o.data, data);
        prop_assert_eq!((o.used_len, o.status), (1, Some(0)));
    }

    /// Arbitrary header bytes and data lengths in both directions: never a panic, and the
    /// status byte is always one of the three (or there is none and the used length is 0).
    #[test]
    fn arbitrary_requests_always_get_a_status(
        head in prop::collection::vec(any::<u8>(), 0..24), code in prop_oneof![0u32..16, any::<u32>()],
        readable in 0u32..1100, writable in 0u32..1100,
    ) {
        let mut h = head.clone();
        if h.len() >= 4 {
            h[..4].copy_from_slice(&code.to_le_bytes());
        }
        let extra = vec![0u8; readable as usize];
        let mut bufs = vec![Buf::readable(&h)];
        if readable > 0 { bufs.push(Buf::readable(&extra)); }
        if writable > 0 { bufs.push(Buf::writable(writable)); }
        let o = serve(&bufs, &limits());
        match (o.status, &o.result) {
            (None, r) => {
                prop_assert_eq!(r, &Err(RequestError::NoStatus));
                prop_assert_eq!(o.used_len, 0);
            }
            (Some(s), r) => {
                prop_assert!(s <= 2);
                prop_assert!(o.used_len >= 1 && o.used_len <= writable);
                if let Err(e) = r { prop_assert_eq!(Some(s), e.status().map(|s| s as u8)); }
            }
        }
    }
}
