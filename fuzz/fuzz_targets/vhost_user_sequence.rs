//! The back-end's protocol state machine driven by arbitrary message sequences with real fds
//! (memfd regions, eventfds), for both device models the library ships: virtio-net
//! (`NetModel`) and virtio-blk (`virtq_blk::BlkModel`, over a small image file); the first
//! input byte picks one.
//!
//! Besides raw requests, steps build the dirty log messages of a migration with real memfds
//! (`SET_LOG_BASE` of any size and offset over a file of any length, `SET_LOG_FD`, LOG_SHMFD
//! and LOG_ALL negotiated, `SET_VRING_ADDR` with `VHOST_VRING_F_LOG`) and the in-flight
//! tracking messages of virtio-blk (`GET_INFLIGHT_FD` / `SET_INFLIGHT_FD` with any
//! description over a memfd of any length, `INFLIGHT_SHMFD` negotiated), which random bytes
//! would rarely assemble.
//!
//! Invariants: no panic; after the device is reset and dropped, no fd and no mapping created
//! for the run remains (memfds are named so that /proc/self/maps and /proc/self/fd lines can
//! be attributed, the back-end's in-flight areas included).
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtq_blk::image::Image;
use virtq_blk::model::BlkModel;
use virtq_vhost_user::device::{DeviceConfig, VhostUserDevice};
use virtq_vhost_user::message::{FrontendMessage, Header, ProtocolFeatures as Pf, Request, VHOST_F_LOG_ALL};
use virtq_vhost_user::model::DeviceModel;
use virtq_vhost_user::net::NetModel;

const NAME: &str = "virtq-fuzz-seq";

#[derive(Arbitrary, Debug)]
enum Fd {
    None,
    Eventfd,
    /// A memfd of this many pages (0..16).
    Memfd(u8),
}

#[derive(Arbitrary, Debug)]
struct Msg {
    request: u8,
    flags: u8,
    payload: Vec<u8>,
    fds: Vec<Fd>,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// Any request code, flags, payload and fds.
    Raw(Msg),
    /// SET_PROTOCOL_FEATURES with LOG_SHMFD (and REPLY_ACK), then SET_FEATURES of VERSION_1
    /// and PROTOCOL_FEATURES, with or without LOG_ALL (also while rings run).
    Negotiate { log_all: bool, reply_ack: bool },
    /// SET_LOG_BASE: a log of `size` bytes at `offset` in a memfd of `pages` pages (0..16).
    LogBase { size: u16, offset: u16, pages: u8, need_reply: bool },
    /// SET_LOG_BASE with a description far out of range.
    LogBaseHuge { size: u64, offset: u64, pages: u8 },
    /// SET_LOG_FD with this fd.
    LogFd(Fd),
    /// SET_VRING_ADDR with VHOST_VRING_F_LOG (or not) and this log address.
    VringAddrLog { index: u8, flags: u8, addrs: [u16; 3], log_guest_addr: u64 },
    /// SET_PROTOCOL_FEATURES with INFLIGHT_SHMFD (and REPLY_ACK), then GET_INFLIGHT_FD
    /// (`get`) or SET_INFLIGHT_FD over a memfd of `pages` pages, with this description.
    Inflight { get: bool, mmap_size: u16, mmap_offset: u16, num_queues: u8, queue_size: u16, pages: u8 },
}

fn memfd(pages: u8) -> OwnedFd {
    let name = std::ffi::CString::new(NAME).unwrap();
    // SAFETY: memfd_create with a valid name; the fd is owned at once.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: resizing our own memfd.
    unsafe { libc::ftruncate(fd.as_raw_fd(), (pages as i64 % 16) * 4096) };
    fd
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd returns a fresh fd, owned at once.
    unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) }
}

/// Mappings and fds of the memfds this target creates, and of the in-flight areas the blk
/// back-end creates.
fn ours() -> (usize, usize) {
    let mine = |s: &str| s.contains(NAME) || s.contains("virtq-blk-inflight");
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let m = maps.lines().filter(|l| mine(l)).count();
    let f = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|p| mine(&p.to_string_lossy())))
                .count()
        })
        .unwrap_or(0);
    (m, f)
}

/// The image the blk model serves: 1 MiB, made once per process.
fn image() -> std::sync::Arc<Image> {
    static IMAGE: std::sync::OnceLock<std::sync::Arc<Image>> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let path = std::env::temp_dir().join(format!("virtq-fuzz-image-{}.img", std::process::id()));
            std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
            let image = Image::open(&path, false).unwrap();
            let _ = std::fs::remove_file(&path);
            std::sync::Arc::new(image)
        })
        .clone()
}

fn fd(f: &Fd) -> Option<OwnedFd> {
    match f {
        Fd::None => None,
        Fd::Eventfd => Some(eventfd()),
        Fd::Memfd(p) => Some(memfd(*p)),
    }
}

/// Frames one request as the wire has it and hands it to the device through the decoder.
fn send<M: DeviceModel>(dev: &mut VhostUserDevice<M>, request: u32, flags: u32, payload: &[u8], fds: Vec<OwnedFd>) {
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&request.to_ne_bytes());
    h[4..8].copy_from_slice(&(1 | (flags & 0x8)).to_ne_bytes());
    h[8..12].copy_from_slice(&(payload.len() as u32).to_ne_bytes());
    let Ok(header) = Header::parse(&h) else { return };
    let decoded = FrontendMessage::decode(&header, payload, fds);
    let _ = dev.handle(&header, decoded);
    let _ = dev.take_events();
}

fn u64s(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

fuzz_target!(|input: (bool, Vec<Step>)| {
    let (blk, steps) = input;
    if blk {
        run(VhostUserDevice::new(DeviceConfig::new(BlkModel::new(image(), 2, "fuzz"))), &steps);
    } else {
        run(VhostUserDevice::new(DeviceConfig::new(NetModel::default())), &steps);
    }
    assert_eq!(ours(), (0, 0), "a mapping or fd outlived the device");
});

fn run<M: DeviceModel>(mut dev: VhostUserDevice<M>, steps: &[Step]) {
    let dev = &mut dev;
    for step in steps.iter().take(32) {
        match step {
            Step::Raw(m) => {
                let payload: Vec<u8> = m.payload.iter().copied().take(300).collect();
                let fds = m.fds.iter().take(9).filter_map(fd).collect();
                send(dev, m.request as u32 % 48, m.flags as u32, &payload, fds);
            }
            Step::Negotiate { log_all, reply_ack } => {
                let protocol = (Pf::LOG_SHMFD | if *reply_ack { Pf::REPLY_ACK } else { Pf::empty() }).bits();
                send(dev, Request::SetProtocolFeatures as u32, 0, &u64s(&[protocol]), vec![]);
                let features = (1 << 32) | (1 << 30) | if *log_all { VHOST_F_LOG_ALL.bits() } else { 0 };
                send(dev, Request::SetFeatures as u32, 0, &u64s(&[features]), vec![]);
            }
            Step::LogBase { size, offset, pages, need_reply } => {
                let flags = if *need_reply { 0x8 } else { 0 };
                let payload = u64s(&[u64::from(*size), u64::from(*offset)]);
                send(dev, Request::SetLogBase as u32, flags, &payload, vec![memfd(*pages)]);
            }
            Step::LogBaseHuge { size, offset, pages } => {
                send(dev, Request::SetLogBase as u32, 0, &u64s(&[*size, *offset]), vec![memfd(*pages)]);
            }
            Step::LogFd(f) => {
                send(dev, Request::SetLogFd as u32, 0, &[], fd(f).into_iter().collect());
            }
            Step::VringAddrLog { index, flags, addrs, log_guest_addr } => {
                let mut p = (u32::from(*index) % 4).to_ne_bytes().to_vec();
                p.extend_from_slice(&u32::from(*flags).to_ne_bytes());
                let [desc, used, avail] = addrs.map(u64::from);
                p.extend_from_slice(&u64s(&[desc, used, avail, *log_guest_addr]));
                send(dev, Request::SetVringAddr as u32, 0, &p, vec![]);
            }
            Step::Inflight { get, mmap_size, mmap_offset, num_queues, queue_size, pages } => {
                let protocol = (Pf::INFLIGHT_SHMFD | Pf::REPLY_ACK).bits();
                send(dev, Request::SetProtocolFeatures as u32, 0, &u64s(&[protocol]), vec![]);
                // struct vhost_user_inflight: mmap_size, mmap_offset (u64), num_queues,
                // queue_size (u16), 4 bytes of padding.
                let mut p = u64s(&[u64::from(*mmap_size), u64::from(*mmap_offset)]);
                p.extend_from_slice(&u16::from(*num_queues).to_ne_bytes());
                p.extend_from_slice(&queue_size.to_ne_bytes());
                p.extend_from_slice(&[0; 4]);
                if *get {
                    send(dev, Request::GetInflightFd as u32, 0, &p, vec![]);
                } else {
                    send(dev, Request::SetInflightFd as u32, 0x8, &p, vec![memfd(*pages)]);
                }
            }
        }
        // What the data path would mark, where logging is on.
        if let Some(log) = dev.dirty_log() {
            log.mark(0, 0x10_0000);
            log.mark(u64::MAX - 0xfff, 0x2000);
        }
    }
    dev.reset();
}
