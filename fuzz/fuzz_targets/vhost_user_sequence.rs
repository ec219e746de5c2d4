//! The back-end's protocol state machine driven by arbitrary message sequences with real fds
//! (memfd regions, eventfds).
//!
//! Invariants: no panic; after the device is reset and dropped, no fd and no mapping created
//! for the run remains (memfds are named so that /proc/self/maps and /proc/self/fd lines can
//! be attributed).
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtq_vhost_user::device::{DeviceConfig, VhostUserDevice};
use virtq_vhost_user::message::{FrontendMessage, Header};

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

/// Mappings and fds of the memfds this target creates.
fn ours() -> (usize, usize) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let m = maps.lines().filter(|l| l.contains(NAME)).count();
    let f = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|p| p.to_string_lossy().contains(NAME)))
                .count()
        })
        .unwrap_or(0);
    (m, f)
}

fuzz_target!(|msgs: Vec<Msg>| {
    let mut dev = VhostUserDevice::new(DeviceConfig::net_default());
    for m in msgs.iter().take(32) {
        let payload: Vec<u8> = m.payload.iter().copied().take(300).collect();
        let mut h = [0u8; 12];
        h[0..4].copy_from_slice(&(m.request as u32 % 48).to_ne_bytes());
        h[4..8].copy_from_slice(&(1 | (m.flags as u32 & 0x8)).to_ne_bytes());
        h[8..12].copy_from_slice(&(payload.len() as u32).to_ne_bytes());
        let Ok(header) = Header::parse(&h) else { continue };
        let fds: Vec<OwnedFd> = m
            .fds
            .iter()
            .take(9)
            .filter_map(|f| match f {
                Fd::None => None,
                Fd::Eventfd => Some(eventfd()),
                Fd::Memfd(p) => Some(memfd(*p)),
            })
            .collect();
        let decoded = FrontendMessage::decode(&header, &payload, fds);
        let _ = dev.handle(&header, decoded);
        let _ = dev.take_events();
    }
    dev.reset();
    drop(dev);
    assert_eq!(ours(), (0, 0), "a mapping or fd outlived the device");
});
