//! The message layer's tests: header (family 12), the request table, payload decoding with
//! fds (family 13), replies. They use only the public API of [`crate::message`].

use std::io::PipeWriter;
use std::os::fd::OwnedFd;

use super::*;
use crate::fd_probe::{is_closed, is_open, probe as probe_fd};
use crate::memory::{GuestMemoryMap, MemoryError, MemoryRegionDesc, OverflowField};

// --- helpers -----------------------------------------------------------------------------

/// `n` fds and their probes.
fn probes(n: usize) -> (Vec<OwnedFd>, Vec<PipeWriter>) {
    (0..n).map(|_| probe_fd()).unzip()
}

fn all_closed(writers: &mut [PipeWriter]) -> bool {
    writers.iter_mut().all(is_closed)
}

fn header_bytes(request: u32, flags: u32, size: u32) -> [u8; HEADER_SIZE] {
    Header { request, flags, size }.to_bytes()
}

fn decode(request: Request, payload: &[u8], fds: Vec<OwnedFd>) -> Result<FrontendMessage, MessageError> {
    FrontendMessage::decode_payload(request, payload, fds)
}

fn u64_payload(v: u64) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

fn state_payload(index: u32, num: u32) -> Vec<u8> {
    let mut p = index.to_ne_bytes().to_vec();
    p.extend_from_slice(&num.to_ne_bytes());
    p
}

fn region(gpa: u64, size: u64, uaddr: u64, off: u64) -> MemoryRegionDesc {
    MemoryRegionDesc { guest_phys_addr: gpa, memory_size: size, userspace_addr: uaddr, mmap_offset: off }
}

fn mem_table_payload(num_regions: u32, regions: &[MemoryRegionDesc]) -> Vec<u8> {
    let mut p = num_regions.to_ne_bytes().to_vec();
    p.extend_from_slice(&0u32.to_ne_bytes());
    for r in regions {
        p.extend_from_slice(&r.to_bytes());
    }
    p
}

fn single_region_payload(r: &MemoryRegionDesc) -> Vec<u8> {
    let mut p = 0u64.to_ne_bytes().to_vec();
    p.extend_from_slice(&r.to_bytes());
    p
}

fn config_payload(offset: u32, size: u32, flags: u32, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_ne_bytes().to_vec();
    p.extend_from_slice(&size.to_ne_bytes());
    p.extend_from_slice(&flags.to_ne_bytes());
    p.extend_from_slice(data);
    p
}

fn log_payload(size: u64, offset: u64) -> Vec<u8> {
    let mut p = size.to_ne_bytes().to_vec();
    p.extend_from_slice(&offset.to_ne_bytes());
    p
}

fn good_region() -> MemoryRegionDesc {
    region(0, 0x4000_0000, 0x7f00_0000_0000, 0)
}

// --- header (family 12) ------------------------------------------------------------------

#[test]
fn header_is_12_bytes_repr_c() {
    assert_eq!(std::mem::size_of::<Header>(), HEADER_SIZE);
}

#[test]
fn header_parse_accepts_request_and_need_reply() {
    let h = Header::parse(&header_bytes(5, VERSION_1 | FLAG_NEED_REPLY, 40)).unwrap();
    assert_eq!(h, Header { request: 5, flags: 0x9, size: 40 });
    assert!(h.need_reply());
    assert_eq!(h.request(), Ok(Request::SetMemTable));
    let h = Header::parse(&header_bytes(1, VERSION_1, 0)).unwrap();
    assert!(!h.need_reply());
}

#[test]
fn header_short_read() {
    let bytes = header_bytes(1, 1, 0);
    for n in 0..HEADER_SIZE {
        assert_eq!(Header::from_slice(&bytes[..n]), Err(MessageError::ShortHeader { got: n }));
    }
    assert!(Header::from_slice(&bytes).is_ok());
}

#[test]
fn header_bad_version() {
    for version in [0u32, 2, 3] {
        assert_eq!(Header::parse(&header_bytes(1, version, 0)), Err(MessageError::BadVersion { version }));
    }
}

#[test]
fn header_reply_bit_on_request() {
    assert_eq!(Header::parse(&header_bytes(1, VERSION_1 | FLAG_REPLY, 0)), Err(MessageError::ReplyFlagOnRequest));
}

#[test]
fn header_reserved_flags() {
    for bit in 4..32 {
        let flags = VERSION_1 | (1u32 << bit);
        assert_eq!(Header::parse(&header_bytes(1, flags, 0)), Err(MessageError::ReservedFlags { flags }));
    }
}

#[test]
fn header_payload_too_large() {
    assert!(Header::parse(&header_bytes(24, VERSION_1, MAX_PAYLOAD)).is_ok());
    for size in [MAX_PAYLOAD + 1, 4096, u32::MAX] {
        assert_eq!(
            Header::parse(&header_bytes(24, VERSION_1, size)),
            Err(MessageError::PayloadTooLarge { size, max: MAX_PAYLOAD })
        );
    }
}

#[test]
fn max_payload_is_the_largest_config_access() {
    assert_eq!(MAX_PAYLOAD, 268);
    assert!(8 + MAX_MEM_REGIONS * MEMORY_REGION_SIZE <= MAX_PAYLOAD as usize);
    for request in Request::ALL {
        if let PayloadRule::Exact(n) = request.spec().payload {
            assert!(n <= MAX_PAYLOAD as usize, "{request}");
        }
    }
}

#[test]
fn header_does_not_reject_unknown_codes_until_asked() {
    let h = Header::parse(&header_bytes(999, VERSION_1, 0)).unwrap();
    assert_eq!(h.request(), Err(MessageError::UnknownRequest(999)));
}

// --- request codes -----------------------------------------------------------------------

#[test]
fn every_request_code_round_trips() {
    for (i, request) in Request::ALL.iter().enumerate() {
        let code = u32::from(*request);
        assert_eq!(code as usize, i + 1, "ALL must be in code order");
        assert_eq!(Request::try_from(code), Ok(*request));
    }
    assert_eq!(Request::try_from(43), Ok(Request::CheckDeviceState));
    assert_eq!(Request::SetMemTable.to_string(), "SET_MEM_TABLE");
}

#[test]
fn each_request_decodes_to_the_message_of_its_row() {
    // The table names the message each request decodes into; a decoded message maps back to
    // the request it came from. Zero payloads decode for every fixed-size request without fds.
    let mut decoded = 0;
    for request in Request::ALL {
        let spec = request.spec();
        let (PayloadRule::Exact(n), FdRule::None) = (spec.payload, spec.fds) else { continue };
        if let Ok(message) = decode(request, &vec![0; n], vec![]) {
            assert_eq!(message.request(), request);
            decoded += 1;
        }
    }
    assert!(decoded >= 25, "{decoded}");
}

#[test]
fn unknown_request_codes() {
    for code in [0u32, 45, 46, 1000, u32::MAX] {
        assert_eq!(Request::try_from(code), Err(MessageError::UnknownRequest(code)));
    }
}

#[test]
fn decode_via_header_checks_code_and_size() {
    let h = Header { request: 0, flags: 1, size: 0 };
    assert_eq!(FrontendMessage::decode(&h, &[], vec![]).unwrap_err(), MessageError::UnknownRequest(0));
    let h = Header { request: Request::SetFeatures as u32, flags: 1, size: 8 };
    assert_eq!(
        FrontendMessage::decode(&h, &[0; 4], vec![]).unwrap_err(),
        MessageError::HeaderSizeMismatch { header: 8, payload: 4 }
    );
    match FrontendMessage::decode(&h, &u64_payload(0x1234), vec![]) {
        Ok(FrontendMessage::SetFeatures(0x1234)) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_request_fds_are_dropped_by_caller_contract() {
    // An unknown code fails before the fds are given to the payload decoder; `decode`
    // still consumes (and closes) them.
    let (fds, mut w) = probes(2);
    let h = Header { request: 77, flags: 1, size: 0 };
    assert!(FrontendMessage::decode(&h, &[], fds).is_err());
    assert!(all_closed(&mut w));
}

// --- exact payload sizes -----------------------------------------------------------------

/// Every fixed-size request, with zero fds so that only the size rule can fire: one byte
/// short and one byte long are `PayloadSize`.
#[test]
fn exact_payload_sizes_short_and_long() {
    for request in Request::ALL {
        let PayloadRule::Exact(n) = request.spec().payload else { continue };
        let long = vec![0u8; n + 1];
        assert_eq!(
            decode(request, &long, vec![]).unwrap_err(),
            MessageError::PayloadSize { request, expected: n, got: n + 1 },
            "{request} long"
        );
        if n > 0 {
            let short = vec![0u8; n - 1];
            assert_eq!(
                decode(request, &short, vec![]).unwrap_err(),
                MessageError::PayloadSize { request, expected: n, got: n - 1 },
                "{request} short"
            );
        }
    }
}

#[test]
fn spot_check_sizes() {
    assert_eq!(Request::SetVringAddr.spec().payload, PayloadRule::Exact(40));
    assert_eq!(Request::AddMemReg.spec().payload, PayloadRule::Exact(40));
    assert_eq!(Request::IotlbMsg.spec().payload, PayloadRule::Exact(32));
    assert_eq!(Request::GetInflightFd.spec().payload, PayloadRule::Exact(24));
    assert_eq!(Request::SetLogBase.spec().payload, PayloadRule::Exact(16));
    assert_eq!(Request::GetFeatures.spec().payload, PayloadRule::Exact(0));
    // A no-payload request with a u64 attached is rejected.
    assert_eq!(
        decode(Request::GetFeatures, &[0; 8], vec![]).unwrap_err(),
        MessageError::PayloadSize { request: Request::GetFeatures, expected: 0, got: 8 }
    );
}

#[test]
fn crypto_session_is_unsupported() {
    assert_eq!(
        decode(Request::CreateCryptoSession, &[0; 64], vec![]).unwrap_err(),
        MessageError::UnsupportedRequest(Request::CreateCryptoSession)
    );
}

// --- fd counts (family 13) ---------------------------------------------------------------

#[test]
fn fds_on_a_message_that_takes_none_are_rejected_and_closed() {
    for request in Request::ALL {
        let spec = request.spec();
        let (FdRule::None, PayloadRule::Exact(n)) = (spec.fds, spec.payload) else { continue };
        let (fds, mut w) = probes(1);
        assert_eq!(
            decode(request, &vec![0u8; n], fds).unwrap_err(),
            MessageError::FdCount { request, expected: 0, got: 1 },
            "{request}"
        );
        assert!(all_closed(&mut w), "{request}: fd not closed");
    }
}

#[test]
fn inflight_messages_fd_rules() {
    // CVE-2022-0669: GET_INFLIGHT_FD takes no fd.
    let inflight = Inflight { mmap_size: 0, mmap_offset: 0, num_queues: 2, queue_size: 256 };
    let (fds, mut w) = probes(1);
    assert!(matches!(
        decode(Request::GetInflightFd, &inflight.to_bytes(), fds),
        Err(MessageError::FdCount { expected: 0, got: 1, .. })
    ));
    assert!(all_closed(&mut w));
    match decode(Request::GetInflightFd, &inflight.to_bytes(), vec![]) {
        Ok(FrontendMessage::GetInflightFd(i)) => assert_eq!(i, inflight),
        other => panic!("{other:?}"),
    }
    // SET_INFLIGHT_FD takes exactly one; two are rejected and both closed.
    let set = Inflight { mmap_size: 4096, mmap_offset: 0, num_queues: 2, queue_size: 256 };
    let (fds, mut w) = probes(2);
    assert!(matches!(
        decode(Request::SetInflightFd, &set.to_bytes(), fds),
        Err(MessageError::FdCount { expected: 1, got: 2, .. })
    ));
    assert!(all_closed(&mut w));
    let (fds, mut w) = probes(1);
    match decode(Request::SetInflightFd, &set.to_bytes(), fds) {
        Ok(FrontendMessage::SetInflightFd { inflight, fd }) => {
            assert_eq!(inflight, set);
            assert!(is_open(&mut w[0]));
            drop(fd);
            assert!(is_closed(&mut w[0]));
        }
        other => panic!("{other:?}"),
    }
    let bad = Inflight { mmap_size: u64::MAX, mmap_offset: 1, num_queues: 1, queue_size: 1 };
    let (fds, mut w) = probes(1);
    assert!(matches!(
        decode(Request::SetInflightFd, &bad.to_bytes(), fds),
        Err(MessageError::InflightRangeOverflow { .. })
    ));
    assert!(all_closed(&mut w));
}

#[test]
fn exactly_one_fd_too_few_and_too_many() {
    for request in [Request::SetLogFd, Request::SetBackendReqFd, Request::GpuSetSocket] {
        assert_eq!(decode(request, &[], vec![]).unwrap_err(), MessageError::FdCount { request, expected: 1, got: 0 });
        let (fds, mut w) = probes(3);
        assert_eq!(decode(request, &[], fds).unwrap_err(), MessageError::FdCount { request, expected: 1, got: 3 });
        assert!(all_closed(&mut w), "{request}");
        let (fds, mut w) = probes(1);
        let msg = decode(request, &[], fds).unwrap();
        assert_eq!(msg.request(), request);
        assert!(is_open(&mut w[0]), "{request}: kept fd must stay open");
        drop(msg);
        assert!(is_closed(&mut w[0]));
    }
}

#[test]
fn payload_error_closes_fds_too() {
    let (fds, mut w) = probes(1);
    assert!(matches!(decode(Request::SetBackendReqFd, &[0; 8], fds), Err(MessageError::PayloadSize { .. })));
    assert!(all_closed(&mut w));
}

#[test]
fn set_device_state_fd() {
    let (fds, mut w) = probes(1);
    match decode(Request::SetDeviceStateFd, &state_payload(1, 0), fds) {
        Ok(FrontendMessage::SetDeviceStateFd { direction: 1, phase: 0, fd }) => {
            assert!(is_open(&mut w[0]));
            drop(fd);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        decode(Request::SetDeviceStateFd, &state_payload(0, 0), vec![]),
        Err(MessageError::FdCount { expected: 1, got: 0, .. })
    ));
}

// --- SET_VRING_KICK / CALL / ERR ---------------------------------------------------------

#[test]
fn vring_fd_with_fd_and_flag_clear() {
    for request in [Request::SetVringKick, Request::SetVringCall, Request::SetVringErr] {
        let (fds, mut w) = probes(1);
        let msg = decode(request, &u64_payload(0xff), fds).unwrap();
        match &msg {
            FrontendMessage::SetVringKick { index: 0xff, fd: Some(_) }
            | FrontendMessage::SetVringCall { index: 0xff, fd: Some(_) }
            | FrontendMessage::SetVringErr { index: 0xff, fd: Some(_) } => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(msg.request(), request);
        assert!(is_open(&mut w[0]));
    }
}

#[test]
fn vring_fd_flag_set_without_fd_is_polling() {
    match decode(Request::SetVringKick, &u64_payload(VRING_INVALID_FD_FLAG | 3), vec![]) {
        Ok(FrontendMessage::SetVringKick { index: 3, fd: None }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn vring_fd_flag_set_with_fd_is_rejected_and_closed() {
    let (fds, mut w) = probes(1);
    assert_eq!(
        decode(Request::SetVringCall, &u64_payload(VRING_INVALID_FD_FLAG | 1), fds).unwrap_err(),
        MessageError::VringFdMismatch { request: Request::SetVringCall, invalid_fd_flag: true, fd: true }
    );
    assert!(all_closed(&mut w));
}

#[test]
fn vring_fd_flag_clear_without_fd_is_rejected() {
    assert_eq!(
        decode(Request::SetVringKick, &u64_payload(1), vec![]).unwrap_err(),
        MessageError::VringFdMismatch { request: Request::SetVringKick, invalid_fd_flag: false, fd: false }
    );
}

#[test]
fn vring_fd_upper_bits_are_rejected_and_fd_closed() {
    for value in [1u64 << 9, 0x1_0000 | 1, 1 << 32, 1 << 63, u64::MAX] {
        let (fds, mut w) = probes(1);
        assert_eq!(
            decode(Request::SetVringErr, &u64_payload(value), fds).unwrap_err(),
            MessageError::VringFdReservedBits { request: Request::SetVringErr, value },
            "{value:#x}"
        );
        assert!(all_closed(&mut w));
    }
}

#[test]
fn vring_fd_two_fds_rejected_and_closed() {
    let (fds, mut w) = probes(2);
    assert_eq!(
        decode(Request::SetVringKick, &u64_payload(0), fds).unwrap_err(),
        MessageError::FdCount { request: Request::SetVringKick, expected: 1, got: 2 }
    );
    assert!(all_closed(&mut w));
}

// --- SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG (family 15) -------------------------------

#[test]
fn mem_table_valid_keeps_fds_open_in_order() {
    let regions = [good_region(), region(0x1_0000_0000, 0x1000, 0x7f10_0000_0000, 0x2000)];
    let (fds, mut w) = probes(2);
    let msg = decode(Request::SetMemTable, &mem_table_payload(2, &regions), fds).unwrap();
    match &msg {
        FrontendMessage::SetMemTable { regions: got, fds } => {
            assert_eq!(got.as_slice(), &regions);
            assert_eq!(fds.len(), 2);
        }
        other => panic!("{other:?}"),
    }
    assert!(is_open(&mut w[0]) && is_open(&mut w[1]));
    drop(msg);
    assert!(all_closed(&mut w));
}

#[test]
fn mem_table_region_count_zero_and_nine() {
    assert_eq!(
        decode(Request::SetMemTable, &mem_table_payload(0, &[]), vec![]).unwrap_err(),
        MessageError::RegionCount { num_regions: 0 }
    );
    let nine = vec![good_region(); 9];
    let (fds, mut w) = probes(8);
    assert_eq!(
        decode(Request::SetMemTable, &mem_table_payload(9, &nine), fds).unwrap_err(),
        MessageError::RegionCount { num_regions: 9 }
    );
    assert!(all_closed(&mut w));
    assert_eq!(
        decode(Request::SetMemTable, &mem_table_payload(u32::MAX, &[]), vec![]).unwrap_err(),
        MessageError::RegionCount { num_regions: u32::MAX }
    );
    // Eight is the maximum and decodes.
    let eight: Vec<_> = (0..8u64).map(|i| region(i << 32, 0x1000, (i + 1) << 40, 0)).collect();
    let (fds, _w) = probes(8);
    assert!(decode(Request::SetMemTable, &mem_table_payload(8, &eight), fds).is_ok());
}

#[test]
fn mem_table_payload_must_match_num_regions() {
    let (fds, mut w) = probes(2);
    let payload = mem_table_payload(2, &[good_region(); 3]);
    assert_eq!(
        decode(Request::SetMemTable, &payload, fds).unwrap_err(),
        MessageError::PayloadSize { request: Request::SetMemTable, expected: 72, got: 104 }
    );
    assert!(all_closed(&mut w));
    assert_eq!(
        decode(Request::SetMemTable, &mem_table_payload(2, &[good_region()]), vec![]).unwrap_err(),
        MessageError::PayloadSize { request: Request::SetMemTable, expected: 72, got: 40 }
    );
    assert_eq!(
        decode(Request::SetMemTable, &[0; 4], vec![]).unwrap_err(),
        MessageError::PayloadSize { request: Request::SetMemTable, expected: 8, got: 4 }
    );
}

#[test]
fn mem_table_fd_count_must_match_num_regions() {
    let regions = [good_region(), region(1 << 40, 0x1000, 1 << 41, 0)];
    for n in [0usize, 1, 3] {
        let (fds, mut w) = probes(n);
        assert_eq!(
            decode(Request::SetMemTable, &mem_table_payload(2, &regions), fds).unwrap_err(),
            MessageError::FdCount { request: Request::SetMemTable, expected: 2, got: n }
        );
        assert!(all_closed(&mut w), "{n} fds");
    }
}

/// Family 15, one owner: the decoder passes a region through as received and the memory
/// map refuses it with a typed [`MemoryError`], closing every fd.
#[test]
fn mem_table_regions_decode_as_received_and_the_map_refuses_them() {
    let bad = [
        (region(0, 0, 0, 0), None),
        (region(u64::MAX - 0xfff, 0x1000, 0, 0), Some(OverflowField::GuestPhysAddr)),
        (region(0, 0x1000, u64::MAX, 0), Some(OverflowField::UserspaceAddr)),
        (region(0, 0x1000, 0, u64::MAX - 1), Some(OverflowField::MmapOffset)),
    ];
    for (bad, field) in bad {
        let (fds, mut w) = probes(2);
        let table = [good_region(), bad];
        let Ok(FrontendMessage::SetMemTable { regions, fds }) =
            decode(Request::SetMemTable, &mem_table_payload(2, &table), fds)
        else {
            panic!("{bad:?} must decode");
        };
        assert_eq!(regions, table);
        let err = match field {
            None => MemoryError::ZeroSize { region: bad },
            Some(field) => MemoryError::Overflow { region: bad, field },
        };
        assert_eq!(GuestMemoryMap::from_table(&regions, fds).err(), Some(err));
        assert!(all_closed(&mut w));
    }
}

#[test]
fn add_mem_reg() {
    let r = good_region();
    let (fds, mut w) = probes(1);
    match decode(Request::AddMemReg, &single_region_payload(&r), fds) {
        Ok(FrontendMessage::AddMemReg { region, fd }) => {
            assert_eq!(region, r);
            assert!(is_open(&mut w[0]));
            drop(fd);
            assert!(is_closed(&mut w[0]));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        decode(Request::AddMemReg, &single_region_payload(&r), vec![]).unwrap_err(),
        MessageError::FdCount { request: Request::AddMemReg, expected: 1, got: 0 }
    );
    // Decoded as received; the map refuses it before looking at the fd, and closes it.
    let overflow = region(0, 0x1000, 0, u64::MAX);
    let zero = region(0, 0, 0, 0);
    for (bad, err) in [
        (overflow, MemoryError::Overflow { region: overflow, field: OverflowField::MmapOffset }),
        (zero, MemoryError::ZeroSize { region: zero }),
    ] {
        let (fds, mut w) = probes(1);
        let Ok(FrontendMessage::AddMemReg { region, fd }) =
            decode(Request::AddMemReg, &single_region_payload(&bad), fds)
        else {
            panic!("{bad:?} must decode");
        };
        assert_eq!(region, bad);
        assert_eq!(GuestMemoryMap::new(MAX_MEM_REGIONS).add_region(region, fd), Err(err));
        assert!(all_closed(&mut w));
    }
}

#[test]
fn rem_mem_reg_with_fd_is_accepted_and_fd_closed() {
    let r = region(0x1000, 0x2000, 0x7f00_0000_0000, u64::MAX); // mmap_offset is ignored
    let (fds, mut w) = probes(1);
    match decode(Request::RemMemReg, &single_region_payload(&r), fds) {
        Ok(FrontendMessage::RemMemReg { region }) => assert_eq!(region, r),
        other => panic!("{other:?}"),
    }
    assert!(all_closed(&mut w), "REM_MEM_REG fd must be closed unused");
    assert!(decode(Request::RemMemReg, &single_region_payload(&r), vec![]).is_ok());
    let (fds, mut w) = probes(2);
    assert_eq!(
        decode(Request::RemMemReg, &single_region_payload(&r), fds).unwrap_err(),
        MessageError::FdCount { request: Request::RemMemReg, expected: 1, got: 2 }
    );
    assert!(all_closed(&mut w));
    // An overflowing region decodes as received; it names no region the map can hold
    // (`GuestMemoryMap::remove_region` answers `UnknownRegion`).
    let bad = region(u64::MAX, 2, 0, 0);
    assert!(matches!(
        decode(Request::RemMemReg, &single_region_payload(&bad), vec![]),
        Ok(FrontendMessage::RemMemReg { region }) if region == bad
    ));
}

// --- SET_LOG_BASE (family 16) ------------------------------------------------------------

#[test]
fn set_log_base() {
    let (fds, mut w) = probes(1);
    match decode(Request::SetLogBase, &log_payload(0x10_0000, 0), fds) {
        Ok(FrontendMessage::SetLogBase { size: 0x10_0000, offset: 0, fd }) => {
            assert!(is_open(&mut w[0]));
            drop(fd);
        }
        other => panic!("{other:?}"),
    }
    let (fds, mut w) = probes(1);
    assert_eq!(
        decode(Request::SetLogBase, &log_payload(0x1000, 0x1001), fds).unwrap_err(),
        MessageError::LogOffsetBeyondSize { size: 0x1000, offset: 0x1001 }
    );
    assert!(all_closed(&mut w));
    let (fds, mut w) = probes(1);
    assert_eq!(
        decode(Request::SetLogBase, &log_payload(u64::MAX, u64::MAX / 2 + 1), fds).unwrap_err(),
        MessageError::LogRangeOverflow { size: u64::MAX, offset: u64::MAX / 2 + 1 }
    );
    assert!(all_closed(&mut w));
    // The legacy 8-byte form (a bare log address) and the fd-less form are rejected.
    assert!(matches!(
        decode(Request::SetLogBase, &u64_payload(0), vec![]),
        Err(MessageError::PayloadSize { expected: 16, got: 8, .. })
    ));
    assert!(matches!(
        decode(Request::SetLogBase, &log_payload(0x1000, 0), vec![]),
        Err(MessageError::FdCount { expected: 1, got: 0, .. })
    ));
}

// --- indices stay u32 (family 14, CVE-2020-10723) ----------------------------------------

#[test]
fn vring_index_high_bits_are_preserved() {
    let index = 0x1_0000 + 1;
    match decode(Request::SetVringNum, &state_payload(index, 256), vec![]) {
        Ok(FrontendMessage::SetVringNum { index: i, num: 256 }) => assert_eq!(i, index),
        other => panic!("{other:?}"),
    }
    match decode(Request::SetVringBase, &state_payload(index, 0x1_0000), vec![]) {
        Ok(FrontendMessage::SetVringBase { index: i, num: 0x1_0000 }) => assert_eq!(i, index),
        other => panic!("{other:?}"),
    }
    match decode(Request::GetVringBase, &state_payload(index, 0), vec![]) {
        Ok(FrontendMessage::GetVringBase { index: i }) => assert_eq!(i, index),
        other => panic!("{other:?}"),
    }
    match decode(Request::SetVringEnable, &state_payload(index, 1), vec![]) {
        Ok(FrontendMessage::SetVringEnable { index: i, enable: true }) => assert_eq!(i, index),
        other => panic!("{other:?}"),
    }
    match decode(Request::VringKick, &state_payload(u32::MAX, 0), vec![]) {
        Ok(FrontendMessage::VringKick { index: u32::MAX }) => {}
        other => panic!("{other:?}"),
    }
    let mut addr = state_payload(index, VRING_F_LOG);
    for v in [0x1000u64, 0x2000, 0x3000, 0x4000] {
        addr.extend_from_slice(&v.to_ne_bytes());
    }
    match decode(Request::SetVringAddr, &addr, vec![]) {
        Ok(FrontendMessage::SetVringAddr {
            index: i,
            flags: VRING_F_LOG,
            desc_user_addr: 0x1000,
            used_user_addr: 0x2000,
            avail_user_addr: 0x3000,
            log_guest_addr: 0x4000,
        }) => assert_eq!(i, index),
        other => panic!("{other:?}"),
    }
}

#[test]
fn boolean_vring_states() {
    assert_eq!(
        decode(Request::SetVringEnable, &state_payload(0, 2), vec![]).unwrap_err(),
        MessageError::InvalidVringState { request: Request::SetVringEnable, index: 0, num: 2 }
    );
    assert!(matches!(
        decode(Request::SetVringEnable, &state_payload(1, 0), vec![]),
        Ok(FrontendMessage::SetVringEnable { index: 1, enable: false })
    ));
    assert!(matches!(
        decode(Request::SetVringEndian, &state_payload(0, 1), vec![]),
        Ok(FrontendMessage::SetVringEndian { index: 0, big_endian: true })
    ));
    assert!(matches!(
        decode(Request::SetVringEndian, &state_payload(0, 0x100), vec![]),
        Err(MessageError::InvalidVringState { num: 0x100, .. })
    ));
}

// --- GET_CONFIG / SET_CONFIG -------------------------------------------------------------

#[test]
fn get_config_size_checks() {
    // QEMU sends `size` placeholder bytes with GET_CONFIG.
    match decode(Request::GetConfig, &config_payload(0, 4, 0, &[0; 4]), vec![]) {
        Ok(FrontendMessage::GetConfig { offset: 0, size: 4, flags: 0 }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        decode(Request::GetConfig, &config_payload(0, 8, 0, &[0; 4]), vec![]).unwrap_err(),
        MessageError::ConfigSize { request: Request::GetConfig, size: 8, data: 4 }
    );
    assert_eq!(
        decode(Request::GetConfig, &config_payload(0, 4, 0, &[0; 8]), vec![]).unwrap_err(),
        MessageError::ConfigSize { request: Request::GetConfig, size: 4, data: 8 }
    );
    assert_eq!(
        decode(Request::GetConfig, &config_payload(0, 257, 0, &[0; 257]), vec![]).unwrap_err(),
        MessageError::ConfigSize { request: Request::GetConfig, size: 257, data: 257 }
    );
    assert!(decode(Request::GetConfig, &config_payload(0, 256, 0, &[0; 256]), vec![]).is_ok());
    assert_eq!(
        decode(Request::GetConfig, &config_payload(u32::MAX, 4, 0, &[0; 4]), vec![]).unwrap_err(),
        MessageError::ConfigRangeOverflow { offset: u32::MAX, size: 4 }
    );
    assert_eq!(
        decode(Request::GetConfig, &[0; 11], vec![]).unwrap_err(),
        MessageError::PayloadSize { request: Request::GetConfig, expected: 12, got: 11 }
    );
}

#[test]
fn set_config_keeps_payload() {
    match decode(Request::SetConfig, &config_payload(6, 2, CONFIG_FLAGS_MIGRATION, &[0xab, 0xcd]), vec![]) {
        Ok(FrontendMessage::SetConfig { offset: 6, size: 2, flags: 1, payload }) => {
            assert_eq!(payload, vec![0xab, 0xcd]);
        }
        other => panic!("{other:?}"),
    }
}

// --- other payloads ----------------------------------------------------------------------

#[test]
fn scalar_payloads() {
    assert!(matches!(decode(Request::NetSetMtu, &u64_payload(1500), vec![]), Ok(FrontendMessage::NetSetMtu(1500))));
    assert_eq!(
        decode(Request::NetSetMtu, &u64_payload(0x1_0000), vec![]).unwrap_err(),
        MessageError::InvalidMtu(0x1_0000)
    );
    assert!(matches!(decode(Request::SetStatus, &u64_payload(0xf), vec![]), Ok(FrontendMessage::SetStatus(0xf))));
    assert_eq!(
        decode(Request::SetStatus, &u64_payload(0x10f), vec![]).unwrap_err(),
        MessageError::InvalidStatus(0x10f)
    );
    assert!(matches!(
        decode(Request::SetProtocolFeatures, &u64_payload(ProtocolFeatures::MQ.bits()), vec![]),
        Ok(FrontendMessage::SetProtocolFeatures(m)) if m == ProtocolFeatures::MQ.bits()
    ));
    let mut rarp = [0u8; 8];
    rarp[..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    assert!(matches!(
        decode(Request::SendRarp, &rarp, vec![]),
        Ok(FrontendMessage::SendRarp([0x52, 0x54, 0, 0, 0, 1]))
    ));
    let uuid: [u8; 16] = std::array::from_fn(|i| i as u8);
    assert!(matches!(
        decode(Request::GetSharedObject, &uuid, vec![]),
        Ok(FrontendMessage::GetSharedObject { uuid: u }) if u == uuid
    ));
}

#[test]
fn iotlb_message() {
    let mut p = Vec::new();
    for v in [0x1000u64, 0x2000, 0x7f00_0000_0000] {
        p.extend_from_slice(&v.to_ne_bytes());
    }
    p.extend_from_slice(&[IotlbMessage::PERM_RW, IotlbMessage::UPDATE, 0, 0, 0, 0, 0, 0]);
    match decode(Request::IotlbMsg, &p, vec![]) {
        Ok(FrontendMessage::IotlbMsg(m)) => assert_eq!(
            m,
            IotlbMessage {
                iova: 0x1000,
                size: 0x2000,
                user_addr: 0x7f00_0000_0000,
                perm: IotlbMessage::PERM_RW,
                msg_type: IotlbMessage::UPDATE
            }
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn no_payload_requests_decode() {
    for request in Request::ALL {
        let spec = request.spec();
        if spec.payload != PayloadRule::Exact(0) || spec.fds != FdRule::None {
            continue;
        }
        assert_eq!(decode(request, &[], vec![]).unwrap().request(), request);
    }
}

/// No input panics: every request, every payload length up to past the maximum, pseudo-
/// random bytes, with and without an fd.
#[test]
fn no_panics_on_arbitrary_payloads() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for request in Request::ALL {
        for len in 0..=(MAX_PAYLOAD as usize + 8) {
            let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode(request, &payload, vec![]);
            if len % 8 == 0 {
                let (fds, _w) = probes(1);
                let _ = decode(request, &payload, fds);
            }
        }
    }
    for _ in 0..10_000 {
        let bytes = next().to_ne_bytes();
        let mut h = [0u8; HEADER_SIZE];
        h[..8].copy_from_slice(&bytes);
        h[8..].copy_from_slice(&next().to_ne_bytes()[..4]);
        let _ = Header::parse(&h);
    }
}

// --- reply rules -------------------------------------------------------------------------

#[test]
fn reply_rules() {
    let ack = ProtocolFeatures::REPLY_ACK;
    let none = ProtocolFeatures::empty();
    for request in [
        Request::GetFeatures,
        Request::GetProtocolFeatures,
        Request::GetVringBase,
        Request::GetQueueNum,
        Request::GetConfig,
        Request::GetMaxMemSlots,
        Request::GetStatus,
        Request::IotlbMsg,
        Request::SetDeviceStateFd,
        Request::CheckDeviceState,
    ] {
        assert!(request.reply_required(VERSION_1, none), "{request}");
    }
    assert!(!Request::SetLogBase.reply_required(VERSION_1, none));
    assert!(Request::SetLogBase.reply_required(VERSION_1, ProtocolFeatures::LOG_SHMFD));
    assert!(Request::GetInflightFd.reply_required(VERSION_1, ProtocolFeatures::INFLIGHT_SHMFD));
    // need_reply counts only with REPLY_ACK negotiated.
    assert!(!Request::SetMemTable.reply_required(VERSION_1, none));
    assert!(!Request::SetMemTable.reply_required(VERSION_1 | FLAG_NEED_REPLY, none));
    assert!(Request::SetMemTable.reply_required(VERSION_1 | FLAG_NEED_REPLY, ack));
    assert!(!Request::SetVringKick.reply_required(VERSION_1, ack));
    assert!(Request::SetBackendReqFd.reply_required(VERSION_1 | FLAG_NEED_REPLY, ack));
}

#[test]
fn fd_table() {
    assert_eq!(Request::SetMemTable.spec().fds, FdRule::OnePerRegion);
    assert_eq!(Request::AddMemReg.spec().fds, FdRule::Exactly(1));
    assert_eq!(Request::RemMemReg.spec().fds, FdRule::ZeroOrOneClosed);
    assert_eq!(Request::SetVringCall.spec().fds, FdRule::ZeroOrOneByInvalidFdFlag);
    assert_eq!(Request::GetInflightFd.spec().fds, FdRule::None);
    let with_fds: Vec<_> = Request::ALL.into_iter().filter(|r| r.spec().fds != FdRule::None).collect();
    assert_eq!(
        with_fds,
        [
            Request::SetMemTable,
            Request::SetLogBase,
            Request::SetLogFd,
            Request::SetVringKick,
            Request::SetVringCall,
            Request::SetVringErr,
            Request::SetBackendReqFd,
            Request::SetInflightFd,
            Request::GpuSetSocket,
            Request::AddMemReg,
            Request::RemMemReg,
            Request::SetDeviceStateFd,
        ]
    );
}

// --- reply encoding ----------------------------------------------------------------------

fn expected_reply(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = request.to_ne_bytes().to_vec();
    v.extend_from_slice(&5u32.to_ne_bytes()); // VERSION_1 | REPLY
    v.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
    v.extend_from_slice(payload);
    v
}

#[test]
fn reply_encoding_bytes_exact() {
    let features = 0x1_4000_0000u64;
    assert_eq!(encode_u64_reply(Request::GetFeatures, features), expected_reply(1, &features.to_ne_bytes()));
    assert_eq!(encode_u64_reply(Request::GetQueueNum, 2), expected_reply(17, &2u64.to_ne_bytes()));
    assert_eq!(encode_ack(Request::SetMemTable, true), expected_reply(5, &0u64.to_ne_bytes()));
    assert_eq!(encode_ack(Request::SetMemTable, false), expected_reply(5, &1u64.to_ne_bytes()));
    assert_eq!(
        encode_vring_state_reply(Request::GetVringBase, 1, 0x1234),
        expected_reply(11, &state_payload(1, 0x1234))
    );
    assert_eq!(encode_get_status_reply(0xf), expected_reply(40, &0xfu64.to_ne_bytes()));
    assert_eq!(encode_reply(Request::GetConfig, &[]), expected_reply(24, &[]));
    let inflight = Inflight { mmap_size: 0x2000, mmap_offset: 0, num_queues: 2, queue_size: 256 };
    let reply = encode_get_inflight_fd_reply(&inflight);
    assert_eq!(reply.len(), HEADER_SIZE + 24);
    assert_eq!(reply, expected_reply(31, &inflight.to_bytes()));
    // A reply header is accepted by nothing that parses requests.
    let h: [u8; HEADER_SIZE] = reply[..HEADER_SIZE].try_into().unwrap();
    assert_eq!(Header::parse(&h), Err(MessageError::ReplyFlagOnRequest));
}

#[test]
fn get_config_reply_and_error() {
    let data = [1u8, 2, 3, 4];
    assert_eq!(encode_get_config_reply(8, 0, &data), expected_reply(24, &config_payload(8, 4, 0, &data)));
    assert_eq!(encode_get_config_error(), expected_reply(24, &[]));
    assert_eq!(encode_get_config_reply(0, 0, &[0; 257]), expected_reply(24, &[]));
}

#[test]
fn errors_display() {
    let e = MessageError::FdCount { request: Request::SetMemTable, expected: 2, got: 3 };
    assert_eq!(e.to_string(), "SET_MEM_TABLE: 3 file descriptors, expected 2");
    let _: &dyn std::error::Error = &e;
}
