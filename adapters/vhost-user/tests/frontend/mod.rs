//! An in-tree vhost-user front-end for tests: real unix socket, real memfd guest memory, real
//! eventfds, and the core's test driver for the rings. It encodes messages itself (not with the
//! library's codec) so that the two check each other, and it can send anything, including the
//! malformed messages of hostile-inputs families 12–18.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::time::Duration;

use virtq::testing::{layout, TestDriver};
use virtq::{QueueConfig, Region, RegionTable};

pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const RESET_OWNER: u32 = 4;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_LOG_BASE: u32 = 6;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const GET_VRING_BASE: u32 = 11;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const SET_VRING_ERR: u32 = 14;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const GET_QUEUE_NUM: u32 = 17;
pub const SET_VRING_ENABLE: u32 = 18;
pub const SET_BACKEND_REQ_FD: u32 = 21;
pub const GET_CONFIG: u32 = 24;
pub const GET_INFLIGHT_FD: u32 = 31;
pub const RESET_DEVICE: u32 = 34;
pub const GET_MAX_MEM_SLOTS: u32 = 36;
pub const ADD_MEM_REG: u32 = 37;
pub const REM_MEM_REG: u32 = 38;
pub const SET_STATUS: u32 = 39;
pub const GET_STATUS: u32 = 40;

pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const PF_MQ: u64 = 1 << 0;
pub const PF_REPLY_ACK: u64 = 1 << 3;
pub const PF_CONFIG: u64 = 1 << 9;
pub const PF_CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
pub const PF_STATUS: u64 = 1 << 16;

pub const NEED_REPLY: u32 = 0x8;

/// Guest RAM: a memfd mapped shared, guest physical address `GPA`; the front-end's virtual
/// address of it is the mapping's address (as with QEMU and DPDK virtio-user).
pub struct GuestRam {
    pub fd: OwnedFd,
    pub ptr: *mut u8,
    pub len: usize,
    pub table: RegionTable<1>,
}

pub const GPA: u64 = 0x4000_0000;

impl GuestRam {
    pub fn new(len: usize) -> GuestRam {
        Self::named(len, "virtq-test-guest")
    }

    /// Guest RAM whose memfd is called `name`, so that a test can find its fds and mappings
    /// in `/proc/self/fd` and `/proc/self/maps` ([`fds_named`], [`maps_named`]).
    pub fn named(len: usize, name: &str) -> GuestRam {
        Self::from_fd(memfd(name, len), len)
    }

    /// Guest RAM in a memfd sealed against shrinking and growing (`F_SEAL_SHRINK |
    /// F_SEAL_GROW`), as QEMU's `memory-backend-memfd` makes it.
    pub fn sealed(len: usize, name: &str) -> GuestRam {
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned at once.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain syscalls on our own fd.
        unsafe {
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), len as i64), 0);
            assert_eq!(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW), 0);
        }
        Self::from_fd(fd, len)
    }

    /// Guest RAM in a hugetlbfs memfd (`MFD_HUGETLB`, 2 MiB pages), or `None` where the machine
    /// has no free huge pages for `len` bytes.
    pub fn hugetlb(len: usize, name: &str) -> Option<GuestRam> {
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned at once.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_HUGETLB) };
        if fd < 0 {
            return None;
        }
        // SAFETY: fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain syscall on our own fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) } != 0 {
            return None;
        }
        // Reserve the pages now: a pool too small fails here, not with SIGBUS in the test.
        // SAFETY: fallocate on our own fd.
        if unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, len as i64) } != 0 {
            return None;
        }
        Some(Self::from_fd(fd, len))
    }

    fn from_fd(fd: OwnedFd, len: usize) -> GuestRam {
        // SAFETY: a fresh shared mapping of our own fd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let mut table = RegionTable::new();
        // SAFETY: the mapping lives until Drop and is only accessed through raw pointers.
        table.add(unsafe { Region::new(GPA, NonNull::new(ptr.cast()).unwrap(), len as u64) }).unwrap();
        GuestRam { fd, ptr: ptr.cast(), len, table }
    }

    /// The front-end's virtual address of guest physical address `gpa`.
    pub fn uaddr(&self, gpa: u64) -> u64 {
        self.ptr as u64 + (gpa - GPA)
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: the mapping created in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd returns a fresh fd, owned at once.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: fresh fd.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Reads an eventfd's counter (0 if not signalled).
pub fn eventfd_read(fd: &OwnedFd) -> u64 {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into `v` from a non-blocking eventfd.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    if n == 8 {
        v
    } else {
        0
    }
}

pub fn eventfd_write(fd: &OwnedFd) {
    let v = 1u64;
    // SAFETY: writes 8 bytes from `v` to an eventfd.
    unsafe { libc::write(fd.as_raw_fd(), (&v as *const u64).cast(), 8) };
}

/// Sends bytes with fds attached.
pub fn send(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
    let mut control = [0u64; 32];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
    // SAFETY: msghdr built over live buffers; the control buffer is large enough for up to 16 fds.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE((fds.len() * 4) as u32) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, &f) in fds.iter().enumerate() {
                data.add(i).write_unaligned(f);
            }
        }
        let n = libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        assert_eq!(n as usize, bytes.len(), "sendmsg: {}", std::io::Error::last_os_error());
    }
}

pub fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(12 + payload.len());
    m.extend_from_slice(&request.to_ne_bytes());
    m.extend_from_slice(&(1 | flags).to_ne_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
    m.extend_from_slice(payload);
    m
}

pub fn u64p(v: u64) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

pub fn state(index: u32, num: u32) -> Vec<u8> {
    let mut p = index.to_ne_bytes().to_vec();
    p.extend_from_slice(&num.to_ne_bytes());
    p
}

/// One virtqueue of the front-end: its layout and the guest-side driver.
pub struct FrontQueue {
    pub cfg: QueueConfig,
    pub kick: OwnedFd,
    pub call: OwnedFd,
    pub data_base: u64,
    pub data_len: u64,
}

/// A vhost-user front-end connected to a back-end.
pub struct Frontend {
    pub sock: UnixStream,
    pub ram: GuestRam,
    pub queues: Vec<FrontQueue>,
}

impl Frontend {
    /// Connects to a back-end listening on `path` (retrying for up to 5 s while it starts).
    pub fn connect(path: &Path, queues: usize, size: u16) -> Frontend {
        Self::connect_named(path, queues, size, "virtq-test-guest")
    }

    pub fn with_socket(sock: UnixStream, queues: usize, size: u16) -> Frontend {
        Self::with_socket_named(sock, queues, size, "virtq-test-guest")
    }

    /// [`Frontend::connect`] with guest RAM in a memfd called `name` ([`GuestRam::named`]).
    pub fn connect_named(path: &Path, queues: usize, size: u16, name: &str) -> Frontend {
        let mut tries = 0;
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if tries < 500 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("connect {}: {e}", path.display()),
            }
        };
        Self::with_socket_named(sock, queues, size, name)
    }

    pub fn with_socket_named(sock: UnixStream, queues: usize, size: u16, name: &str) -> Frontend {
        Self::with_ram(sock, queues, size, GuestRam::named(16 << 20, name))
    }

    /// A front-end on `sock` whose guest memory is `ram` (at least 16 MiB).
    pub fn with_ram(sock: UnixStream, queues: usize, size: u16, ram: GuestRam) -> Frontend {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut next = GPA;
        let mut qs = Vec::new();
        let data_per_queue = (8 << 20) / queues.max(1) as u64;
        for _ in 0..queues {
            let (cfg, end) = layout(next, size);
            qs.push(FrontQueue { cfg, kick: eventfd(), call: eventfd(), data_base: 0, data_len: 0 });
            next = end;
        }
        let data_start = (next + 0xfff) & !0xfff;
        for (i, q) in qs.iter_mut().enumerate() {
            q.data_base = data_start + i as u64 * data_per_queue;
            q.data_len = data_per_queue;
        }
        Frontend { sock, ram, queues: qs }
    }

    /// A driver for each queue (zeroes the rings: create them before traffic starts).
    pub fn drivers(&self) -> Vec<TestDriver<'_, RegionTable<1>>> {
        self.queues.iter().map(|q| TestDriver::new(&self.ram.table, q.cfg, q.data_base, q.data_len)).collect()
    }

    pub fn send(&self, request: u32, flags: u32, payload: &[u8], fds: &[RawFd]) {
        send(&self.sock, &message(request, flags, payload), fds);
    }

    /// Reads one reply: (request, flags, payload). Panics on timeout.
    pub fn reply(&self) -> (u32, u32, Vec<u8>) {
        self.try_reply().expect("reply")
    }

    pub fn try_reply(&self) -> std::io::Result<(u32, u32, Vec<u8>)> {
        let mut h = [0u8; 12];
        (&self.sock).read_exact(&mut h)?;
        let req = u32::from_ne_bytes(h[0..4].try_into().unwrap());
        let flags = u32::from_ne_bytes(h[4..8].try_into().unwrap());
        let size = u32::from_ne_bytes(h[8..12].try_into().unwrap());
        let mut p = vec![0; size as usize];
        (&self.sock).read_exact(&mut p)?;
        Ok((req, flags, p))
    }

    /// Sends a request that has a u64 reply and returns the value.
    pub fn get_u64(&self, request: u32) -> u64 {
        self.send(request, 0, &[], &[]);
        let (req, flags, p) = self.reply();
        assert_eq!(req, request);
        assert_eq!(flags & 0x7, 0x5, "version 1 + REPLY");
        u64::from_ne_bytes(p[..8].try_into().unwrap())
    }

    /// Sends with NEED_REPLY and returns the REPLY_ACK status (0 = success).
    pub fn acked(&self, request: u32, payload: &[u8], fds: &[RawFd]) -> u64 {
        self.send(request, NEED_REPLY, payload, fds);
        let (req, _, p) = self.reply();
        assert_eq!(req, request);
        u64::from_ne_bytes(p[..8].try_into().unwrap())
    }

    pub fn mem_table_payload(&self) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&1u32.to_ne_bytes());
        p.extend_from_slice(&0u32.to_ne_bytes());
        p.extend_from_slice(&GPA.to_ne_bytes());
        p.extend_from_slice(&(self.ram.len as u64).to_ne_bytes());
        p.extend_from_slice(&self.ram.uaddr(GPA).to_ne_bytes());
        p.extend_from_slice(&0u64.to_ne_bytes());
        p
    }

    pub fn vring_addr_payload(&self, i: usize) -> Vec<u8> {
        let q = &self.queues[i];
        let mut p = (i as u32).to_ne_bytes().to_vec();
        p.extend_from_slice(&0u32.to_ne_bytes());
        p.extend_from_slice(&self.ram.uaddr(q.cfg.desc_table).to_ne_bytes());
        p.extend_from_slice(&self.ram.uaddr(q.cfg.used_ring).to_ne_bytes());
        p.extend_from_slice(&self.ram.uaddr(q.cfg.avail_ring).to_ne_bytes());
        p.extend_from_slice(&0u64.to_ne_bytes());
        p
    }

    /// Starts queue `i`: NUM, BASE 0, ADDR, KICK, CALL (the part both QEMU and DPDK send).
    pub fn start_queue(&self, i: usize) {
        self.start_queue_at(i, 0);
    }

    /// [`start_queue`](Self::start_queue) with `SET_VRING_BASE` `base` (a packed ring's start
    /// is 0x8000_8000: both wrap counters 1).
    pub fn start_queue_at(&self, i: usize, base: u32) {
        let size = self.queues[i].cfg.size as u32;
        self.send(SET_VRING_NUM, 0, &state(i as u32, size), &[]);
        self.send(SET_VRING_BASE, 0, &state(i as u32, base), &[]);
        self.send(SET_VRING_ADDR, 0, &self.vring_addr_payload(i), &[]);
        let kick = self.queues[i].kick.as_raw_fd();
        let call = self.queues[i].call.as_raw_fd();
        self.send(SET_VRING_KICK, 0, &u64p(i as u64), &[kick]);
        self.send(SET_VRING_CALL, 0, &u64p(i as u64), &[call]);
    }

    /// QEMU 7.2's order (peers.md): negotiation, enables before SET_FEATURES, then DRIVER_OK:
    /// SET_FEATURES, SET_MEM_TABLE (acked), per ring NUM/BASE/ADDR/KICK/CALL, no enable after.
    pub fn qemu_start(&self, features: u64) -> u64 {
        let offered = self.get_u64(GET_FEATURES);
        assert!(offered & F_PROTOCOL_FEATURES != 0);
        let pf = self.get_u64(GET_PROTOCOL_FEATURES);
        let want = pf & (PF_MQ | PF_REPLY_ACK | PF_CONFIG | PF_STATUS);
        self.send(SET_PROTOCOL_FEATURES, 0, &u64p(want), &[]);
        let nq = self.get_u64(GET_QUEUE_NUM);
        assert!(nq as usize >= self.queues.len());
        self.send(SET_OWNER, 0, &[], &[]);
        for i in 0..self.queues.len() {
            let call = self.queues[i].call.as_raw_fd();
            self.send(SET_VRING_CALL, 0, &u64p(i as u64), &[call]);
            let err = eventfd();
            self.send(SET_VRING_ERR, 0, &u64p(i as u64), &[err.as_raw_fd()]);
        }
        for i in 0..self.queues.len() {
            self.send(SET_VRING_ENABLE, 0, &state(i as u32, 1), &[]);
        }
        let acked = (features & offered) | F_PROTOCOL_FEATURES;
        self.send(SET_FEATURES, 0, &u64p(acked), &[]);
        let mt = self.mem_table_payload();
        let fd = self.ram.fd.as_raw_fd();
        assert_eq!(self.acked(SET_MEM_TABLE, &mt, &[fd]), 0, "SET_MEM_TABLE acked");
        for i in 0..self.queues.len() {
            self.start_queue(i);
        }
        acked
    }

    /// DPDK virtio-user's order (peers.md): SET_VRING_CALL before SET_FEATURES and
    /// SET_MEM_TABLE, enables after the rings are set up.
    pub fn dpdk_start(&self, features: u64) -> u64 {
        let offered = self.get_u64(GET_FEATURES);
        let pf = self.get_u64(GET_PROTOCOL_FEATURES);
        self.send(SET_PROTOCOL_FEATURES, 0, &u64p(pf & (PF_MQ | PF_REPLY_ACK)), &[]);
        self.send(SET_OWNER, 0, &[], &[]);
        for i in 0..self.queues.len() {
            let call = self.queues[i].call.as_raw_fd();
            self.send(SET_VRING_CALL, 0, &u64p(i as u64), &[call]);
        }
        let acked = (features & offered) | F_PROTOCOL_FEATURES;
        self.send(SET_FEATURES, 0, &u64p(acked), &[]);
        let mt = self.mem_table_payload();
        let fd = self.ram.fd.as_raw_fd();
        self.send(SET_MEM_TABLE, 0, &mt, &[fd]);
        // A packed ring starts with both wrap counters 1 (§2.8.1), as QEMU sends it.
        let base = if acked & F_RING_PACKED != 0 { 0x8000_8000 } else { 0 };
        for i in 0..self.queues.len() {
            self.start_queue_at(i, base);
        }
        for i in 0..self.queues.len() {
            self.send(SET_VRING_ENABLE, 0, &state(i as u32, 1), &[]);
        }
        acked
    }

    /// GET_VRING_BASE: stops the ring and returns the next avail index.
    pub fn get_vring_base(&self, i: usize) -> u32 {
        self.send(GET_VRING_BASE, 0, &state(i as u32, 0), &[]);
        let (req, _, p) = self.reply();
        assert_eq!(req, GET_VRING_BASE);
        assert_eq!(u32::from_ne_bytes(p[0..4].try_into().unwrap()), i as u32);
        u32::from_ne_bytes(p[4..8].try_into().unwrap())
    }

    pub fn kick(&self, i: usize) {
        eventfd_write(&self.queues[i].kick);
    }

    /// Waits up to `timeout` for queue `i`'s call eventfd.
    pub fn wait_call(&self, i: usize, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd { fd: self.queues[i].call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        n == 1 && eventfd_read(&self.queues[i].call) > 0
    }

    /// True once the back-end has closed the connection (reads EOF within `timeout`).
    pub fn closed_by_backend(&self, timeout: Duration) -> bool {
        self.sock.set_read_timeout(Some(timeout)).unwrap();
        let mut b = [0u8; 64];
        loop {
            match (&self.sock).read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    }

    pub fn write_raw(&self, bytes: &[u8]) {
        (&self.sock).write_all(bytes).unwrap();
    }
}

/// A memfd called `name` of `len` bytes (not mapped here).
pub fn memfd(name: &str, len: usize) -> OwnedFd {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned at once.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscall on our own fd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
    fd
}

/// How `/proc/self/fd` and `/proc/self/maps` name a memfd called `name` (the trailing space
/// keeps `a` from matching `ab`: the kernel appends " (deleted)").
fn memfd_tag(name: &str) -> String {
    format!("/memfd:{name} ")
}

/// Open fds of this process (any thread, the back-end's included) on memfds called `name`.
pub fn fds_named(name: &str) -> usize {
    let tag = memfd_tag(name);
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| format!("{} ", l.display()).starts_with(&tag))
        .count()
}

/// Mappings of this process of memfds called `name`.
pub fn maps_named(name: &str) -> usize {
    let tag = memfd_tag(name);
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| format!("{l} ").contains(&tag)).count()
}

/// An fd whose closing can be observed: the read end of a pipe (send it) and the write end
/// (keep it). Once every copy of the read end is closed, writing fails with EPIPE
/// ([`probe_closed`]). Rust ignores SIGPIPE, so the write just fails.
pub fn probe() -> (OwnedFd, std::io::PipeWriter) {
    let (rd, wr) = std::io::pipe().unwrap();
    (OwnedFd::from(rd), wr)
}

/// An eventfd probe: the back-end takes only eventfds for kick, call, error and log fds, so
/// their closing is seen through the counter every copy of an eventfd shares. Its counter
/// starts at a value unique to this probe; [`event_probe_held`] counts the fds of this process
/// (the back-end runs in it) whose eventfd has that value. Returns the fd (send it, then drop
/// it) and the value. The back-end must neither read nor signal it meanwhile.
pub fn event_probe() -> (OwnedFd, u64) {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tag = 0x5eed_0000_0000 + ((std::process::id() as u64) << 20) + NEXT.fetch_add(1, Ordering::Relaxed);
    // SAFETY: eventfd returns a fresh fd, owned at once.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The initial value of eventfd(2) is an unsigned int: add the tag with a write.
    let v = tag;
    // SAFETY: writes 8 bytes from `v` to the eventfd.
    assert_eq!(unsafe { libc::write(fd.as_raw_fd(), (&v as *const u64).cast(), 8) }, 8);
    (fd, tag)
}

/// How many fds of this process hold the eventfd probe `tag` ([`event_probe`]): those whose
/// `/proc/self/fdinfo` shows it as `eventfd-count` (in hex).
pub fn event_probe_held(tag: u64) -> usize {
    let holds = |info: &str| {
        info.lines()
            .any(|l| l.strip_prefix("eventfd-count:").is_some_and(|v| u64::from_str_radix(v.trim(), 16) == Ok(tag)))
    };
    std::fs::read_dir("/proc/self/fdinfo")
        .map(|d| {
            d.filter_map(|e| e.ok()).filter(|e| std::fs::read_to_string(e.path()).is_ok_and(|i| holds(&i))).count()
        })
        .unwrap_or(0)
}

/// `n` probes: the read ends (to send, then drop) and the write ends.
pub fn probes(n: usize) -> (Vec<OwnedFd>, Vec<std::io::PipeWriter>) {
    (0..n).map(|_| probe()).unzip()
}

/// Whether every read end of the pipe of `w` is closed (our own copy must be dropped first).
pub fn probe_closed(w: &mut std::io::PipeWriter) -> bool {
    match w.write(b"x") {
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => true,
        Err(e) => panic!("probe write: {e}"),
    }
}

/// Raw header bytes, flags as given (no version bit added).
pub fn raw_header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(12);
    h.extend_from_slice(&request.to_ne_bytes());
    h.extend_from_slice(&flags.to_ne_bytes());
    h.extend_from_slice(&size.to_ne_bytes());
    h
}

/// One "Memory region description" (guest address, size, user address, mmap offset).
pub fn region(gpa: u64, size: u64, uaddr: u64, mmap_offset: u64) -> Vec<u8> {
    [gpa, size, uaddr, mmap_offset].iter().flat_map(|v| v.to_ne_bytes()).collect()
}

/// A `SET_MEM_TABLE` payload: `num_regions` (as given, so it can lie), padding, regions.
pub fn mem_table(num_regions: u32, regions: &[Vec<u8>]) -> Vec<u8> {
    let mut p = num_regions.to_ne_bytes().to_vec();
    p.extend_from_slice(&0u32.to_ne_bytes());
    for r in regions {
        p.extend_from_slice(r);
    }
    p
}

/// An `ADD_MEM_REG` / `REM_MEM_REG` payload: 8 bytes of padding, then one region.
pub fn single_region(r: &[u8]) -> Vec<u8> {
    let mut p = 0u64.to_ne_bytes().to_vec();
    p.extend_from_slice(r);
    p
}

/// A `SET_VRING_ADDR` payload.
pub fn vring_addr(index: u32, flags: u32, desc: u64, used: u64, avail: u64, log: u64) -> Vec<u8> {
    let mut p = index.to_ne_bytes().to_vec();
    p.extend_from_slice(&flags.to_ne_bytes());
    for v in [desc, used, avail, log] {
        p.extend_from_slice(&v.to_ne_bytes());
    }
    p
}

impl Frontend {
    /// Sends raw bytes (a header as [`raw_header`] builds it, and any payload) with fds.
    pub fn send_raw(&self, bytes: &[u8], fds: &[RawFd]) {
        send(&self.sock, bytes, fds);
    }

    /// Like [`Frontend::acked`], also checking the reply header (version 1 + REPLY, an 8-byte
    /// payload).
    pub fn ack_status(&self, request: u32, payload: &[u8], fds: &[RawFd]) -> u64 {
        self.send(request, NEED_REPLY, payload, fds);
        let (req, flags, p) = self.reply();
        assert_eq!(req, request, "REPLY_ACK for the request sent");
        assert_eq!(flags, 0x5, "version 1 + REPLY");
        assert_eq!(p.len(), 8, "REPLY_ACK payload is a u64");
        u64::from_ne_bytes(p[..8].try_into().unwrap())
    }

    /// A round trip that every back-end answers (GET_FEATURES): everything sent before it has
    /// been handled once it returns.
    pub fn sync(&self) {
        self.get_u64(GET_FEATURES);
    }

    /// Asserts that the back-end closes the connection without sending anything first. A
    /// reset counts as closed: a back-end that closes without reading all we sent (a
    /// payload after a refused header) makes the kernel report ECONNRESET instead of EOF.
    pub fn expect_closed_without_reply(&self, what: &str) {
        self.sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 64];
        match (&self.sock).read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(n) => panic!("{what}: expected the connection closed, got {n} bytes: {:02x?}", &b[..n]),
            Err(e) => panic!("{what}: expected the connection closed: {e}"),
        }
    }

    /// Ends the connection from this side and waits until the back-end has closed its end
    /// (so that the device has let go of this connection before anything else connects).
    pub fn hang_up(self) {
        self.sock.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(self.closed_by_backend(Duration::from_secs(2)), "back-end closes after the front-end hangs up");
    }
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Mappings of this process.
pub fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().count()
}

// ---- shared by the integration tests -------------------------------------------------------

/// virtio-net features the tests acknowledge: VERSION_1, INDIRECT_DESC, EVENT_IDX, MRG_RXBUF,
/// MAC.
/// `VIRTIO_F_RING_PACKED`.
pub const F_RING_PACKED: u64 = 1 << 34;

pub const NET_FEATURES: u64 = (1 << 32) | (1 << 28) | (1 << 29) | (1 << 15) | (1 << 5);

/// Polls `f` until it returns `Some`, for at most 20 s (a hang detector, not a timing test).
pub fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A test frame: `len` bytes derived from `i`.
pub fn frame(i: u8, len: usize) -> Vec<u8> {
    (0..len).map(|j| i.wrapping_mul(31) ^ j as u8).collect()
}

/// Counts `device_ready` and `device_destroyed` callbacks.
#[derive(Default)]
pub struct Counting {
    pub ready: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub destroyed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl virtq_vhost_user::backend::DeviceHandler<virtq_vhost_user::net::NetModel> for Counting {
    fn device_ready(&mut self, _: &virtq_vhost_user::net::NetDevice) {
        self.ready.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    fn device_destroyed(&mut self, _: &virtq_vhost_user::net::NetDevice) {
        self.destroyed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The guest side of every queue: drivers and how far the guest has read each used ring.
pub struct Guest<'a> {
    pub drv: Vec<TestDriver<'a, RegionTable<1>>>,
    pub seen: Vec<u16>,
}

impl<'a> Guest<'a> {
    pub fn new(fe: &'a Frontend) -> Self {
        let drv = fe.drivers();
        let seen = vec![0; drv.len()];
        Guest { drv, seen }
    }
}
