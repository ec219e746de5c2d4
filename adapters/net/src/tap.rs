//! Linux TAP devices with `IFF_VNET_HDR`: every frame read or written carries a 12-byte
//! `struct virtio_net_hdr` in front, the same header the guest uses, so offload metadata can
//! pass between guest and host stack unchanged. With several queue pairs the TAP is opened
//! with `IFF_MULTI_QUEUE`, one fd per pair.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Bytes of virtio-net header on every TAP frame.
pub const TAP_HDR_LEN: usize = 12;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// One queue of a TAP device.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
}

/// Opens `queues` queues of the TAP device `name` (created if it does not exist; needs
/// CAP_NET_ADMIN). The interface is not brought up here: that is the administrator's (or the
/// test's) job, as with QEMU's `-netdev tap`.
pub fn open(name: &str, queues: usize) -> io::Result<Vec<TapQueue>> {
    if name.is_empty() || name.len() > 15 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "TAP name must be 1 to 15 bytes"));
    }
    let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if queues > 1 {
        flags |= IFF_MULTI_QUEUE;
    }
    (0..queues.max(1))
        .map(|_| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")?;
            let fd = OwnedFd::from(file);
            let mut req = IfReq { name: [0; 16], flags, _pad: [0; 22] };
            req.name[..name.len()].copy_from_slice(name.as_bytes());
            // SAFETY: TUNSETIFF reads/writes a struct ifreq, which `IfReq` lays out (name[16],
            // flags, padding to 40 bytes); the fd is a fresh /dev/net/tun.
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
                return Err(io::Error::last_os_error());
            }
            let hdr = TAP_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int.
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(TapQueue { fd })
        })
        .collect()
}

impl TapQueue {
    /// Reads one frame (header + frame) into `buf`; `Ok(None)` when none is waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: reads at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        }
    }

    /// Writes one frame with the given 12-byte virtio-net header. A full TAP queue drops the
    /// frame (returns `Ok(false)`), as a NIC would.
    pub fn write(&self, hdr: &[u8; TAP_HDR_LEN], frame: &[u8]) -> io::Result<bool> {
        let iov = [
            libc::iovec { iov_base: hdr.as_ptr() as *mut _, iov_len: hdr.len() },
            libc::iovec { iov_base: frame.as_ptr() as *mut _, iov_len: frame.len() },
        ];
        // SAFETY: two iovecs over live buffers.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        if n >= 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
            _ => Err(e),
        }
    }
}
