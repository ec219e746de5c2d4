//! Linux TAP devices with `IFF_VNET_HDR`: every frame read or written carries a 12-byte
//! `struct virtio_net_hdr` in front, the same header the guest uses, so offload metadata can
//! pass between guest and host stack unchanged. With several queue pairs the TAP is opened
//! with `IFF_MULTI_QUEUE`, one fd per pair.
//!
//! A queue whose pair the guest does not use is detached from the TAP (`TUNSETQUEUE`,
//! [`TapQueue::set_attached`]), so that the kernel steers no flow to it.
//!
//! What the kernel may hand over (partial checksums, TSO frames) is set with `TUNSETOFFLOAD`
//! from the offloads the guest negotiated ([`offload_flags`]); what may be written to the TAP
//! needs no set-up: the kernel takes any valid header.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;

/// Bytes of virtio-net header on every TAP frame.
pub const TAP_HDR_LEN: usize = 12;

/// A read buffer that holds any frame the TAP can hand over (header and a 64 KiB GSO frame),
/// plus one byte: a read that fills the whole buffer may have been cut short and is dropped.
pub const TAP_BUF_LEN: usize = TAP_HDR_LEN + virtq_vhost_user::net::MAX_GSO_FRAME + 1;
// IPv6: 65535 bytes of payload behind a 40-byte header, Ethernet + VLAN, the virtio-net
// header, and the spare byte that tells a full frame from a cut one.
const _: () = assert!(TAP_BUF_LEN > TAP_HDR_LEN + 18 + 40 + 65535);

/// `TUN_F_CSUM`: the TAP may hand over frames with `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const TUN_F_CSUM: u32 = 0x01;
/// `TUN_F_TSO4`: ... TCP/IPv4 GSO frames (needs `TUN_F_CSUM`).
pub const TUN_F_TSO4: u32 = 0x02;
/// `TUN_F_TSO6`: ... TCP/IPv6 GSO frames (needs `TUN_F_CSUM`).
pub const TUN_F_TSO6: u32 = 0x04;
/// `TUN_F_TSO_ECN`: ... TSO frames with `VIRTIO_NET_HDR_GSO_ECN` (needs a TSO flag).
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// The `TUNSETOFFLOAD` flags for a guest that negotiated `features`: what the TAP hands over
/// must be what the guest accepts on its receive queues (GUEST_CSUM, GUEST_TSO4/6,
/// GUEST_ECN). The kernel rejects TSO without CSUM and ECN without TSO, so a driver that
/// acknowledged those without their §5.1.3.1 dependencies gets the consistent subset.
pub fn offload_flags(f: virtq::VirtioFeatures) -> u32 {
    if !f.contains(virtq::VirtioFeatures::NET_GUEST_CSUM) {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if f.contains(virtq::VirtioFeatures::NET_GUEST_TSO4) {
        flags |= TUN_F_TSO4;
    }
    if f.contains(virtq::VirtioFeatures::NET_GUEST_TSO6) {
        flags |= TUN_F_TSO6;
    }
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 && f.contains(virtq::VirtioFeatures::NET_GUEST_ECN) {
        flags |= TUN_F_TSO_ECN;
    }
    flags
}

/// `TUN_F_*` flags as text: `csum,tso4,tso6,ecn`, or `none`.
pub fn describe_offloads(flags: u32) -> String {
    let names = [(TUN_F_CSUM, "csum"), (TUN_F_TSO4, "tso4"), (TUN_F_TSO6, "tso6"), (TUN_F_TSO_ECN, "ecn")];
    let v: Vec<&str> = names.iter().filter(|(b, _)| flags & b != 0).map(|(_, n)| *n).collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(",")
    }
}

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
    /// Another fd for this queue (a `dup`), e.g. for the control thread's `TUNSETOFFLOAD`
    /// while the data plane owns the original.
    pub fn try_clone(&self) -> io::Result<TapQueue> {
        Ok(TapQueue { fd: self.fd.try_clone()? })
    }

    /// `TUNSETOFFLOAD`: which offloads the kernel may use in frames it hands over (`TUN_F_*`).
    /// It applies to the whole device, every queue.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long); no memory is
        // passed.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `TUNSETQUEUE`: attaches this queue to its multiqueue TAP (`IFF_ATTACH_QUEUE`) or
    /// detaches it (`IFF_DETACH_QUEUE`). The kernel steers frames only to attached queues; a
    /// detached queue keeps its fd and can be attached again. Doing either twice is an error (`EINVAL`), as is any use on a TAP
    /// without `IFF_MULTI_QUEUE`. The kernel lets the last attached queue go too (the TAP
    /// then drops everything): callers keep one attached.
    pub fn set_attached(&self, attach: bool) -> io::Result<()> {
        let flags = if attach { IFF_ATTACH_QUEUE } else { IFF_DETACH_QUEUE };
        let mut req = IfReq { name: [0; 16], flags, _pad: [0; 22] };
        // SAFETY: TUNSETQUEUE reads a struct ifreq (only its flags), which `IfReq` lays out;
        // the fd is one of our TAP queues.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETQUEUE, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use virtq::VirtioFeatures as F;

    #[test]
    fn offload_flags_follow_the_guest_receive_features() {
        let all = F::NET_GUEST_CSUM | F::NET_GUEST_TSO4 | F::NET_GUEST_TSO6 | F::NET_GUEST_ECN;
        assert_eq!(offload_flags(all), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN);
        assert_eq!(offload_flags(F::NET_GUEST_CSUM), TUN_F_CSUM);
        assert_eq!(offload_flags(F::NET_GUEST_CSUM | F::NET_GUEST_TSO6), TUN_F_CSUM | TUN_F_TSO6);
        // Host-side (TX) offloads and other features do not matter here.
        let tx = F::NET_CSUM | F::NET_HOST_TSO4 | F::NET_HOST_TSO6 | F::NET_HOST_ECN | F::VERSION_1;
        assert_eq!(offload_flags(tx), 0);
        // Without their dependencies, TSO and ECN are left out (the kernel would refuse them).
        assert_eq!(offload_flags(F::NET_GUEST_TSO4 | F::NET_GUEST_ECN), 0);
        assert_eq!(offload_flags(F::NET_GUEST_CSUM | F::NET_GUEST_ECN), TUN_F_CSUM);
        assert_eq!(describe_offloads(offload_flags(all)), "csum,tso4,tso6,ecn");
        assert_eq!(describe_offloads(0), "none");
    }
}
