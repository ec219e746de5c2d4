//! vhost-user connections: unix sockets, message framing over a non-blocking stream, and
//! SCM_RIGHTS file-descriptor passing (vhost-user.rst "Communication").
//!
//! A message is a 12-byte header and `size` payload bytes; file descriptors ride as
//! `SCM_RIGHTS` ancillary data on any of its bytes. [`MessageReader`] assembles messages from
//! a non-blocking socket incrementally, so a front-end that sends half a message cannot stall
//! the control loop that serves every other device. Every fd received is owned (`OwnedFd`)
//! from the moment `recvmsg` returns, so an fd that no handler takes is closed, never leaked
//! (DPDK CVE-2019-14818, CVE-2022-0669). Truncated ancillary data (`MSG_CTRUNC`: more fds than
//! any message may carry) is an error (DPDK 218daf1664).

use std::fs;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::message::{Header, MessageError, HEADER_SIZE, MAX_FDS};

/// A complete message as received: header, payload bytes, and the fds that came with it.
#[derive(Debug)]
pub struct RawMessage {
    /// The validated header.
    pub header: Header,
    /// `header.size` payload bytes.
    pub payload: Vec<u8>,
    /// File descriptors received with the message, in order.
    pub fds: Vec<OwnedFd>,
}

/// Why reading from a connection failed. Any of these ends the connection.
#[derive(Debug)]
pub enum ConnectionError {
    /// The peer closed the connection (at a message boundary).
    Closed,
    /// The peer closed the connection in the middle of a message (short read).
    Truncated {
        /// Bytes of the message received before the end.
        got: usize,
    },
    /// More file descriptors than a message may carry: the kernel truncated the ancillary data.
    TooManyFds,
    /// The header is invalid (version, flags, size).
    Header(MessageError),
    /// A socket error.
    Io(io::Error),
}

impl std::fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectionError::Closed => f.write_str("connection closed by the front-end"),
            ConnectionError::Truncated { got } => write!(f, "connection closed after {got} bytes of a message"),
            ConnectionError::TooManyFds => write!(f, "more than {MAX_FDS} file descriptors on one message"),
            ConnectionError::Header(e) => write!(f, "bad message header: {e}"),
            ConnectionError::Io(e) => write!(f, "socket error: {e}"),
        }
    }
}

impl std::error::Error for ConnectionError {}

impl From<io::Error> for ConnectionError {
    fn from(e: io::Error) -> Self {
        ConnectionError::Io(e)
    }
}

/// Assembles messages from a non-blocking stream socket.
#[derive(Debug, Default)]
pub struct MessageReader {
    header: [u8; HEADER_SIZE],
    header_got: usize,
    parsed: Option<Header>,
    payload: Vec<u8>,
    payload_got: usize,
    fds: Vec<OwnedFd>,
}

impl MessageReader {
    /// A reader at a message boundary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads as much as is available. `Ok(Some(msg))` for a complete message (call again for
    /// the next one), `Ok(None)` if the socket has no more data for now.
    pub fn read(&mut self, fd: RawFd) -> Result<Option<RawMessage>, ConnectionError> {
        loop {
            if self.parsed.is_none() {
                let got = self.header_got;
                match recv_with_fds(fd, &mut self.header[got..], &mut self.fds)? {
                    None => return Ok(None),
                    Some(0) if got == 0 => return Err(ConnectionError::Closed),
                    Some(0) => return Err(ConnectionError::Truncated { got }),
                    Some(n) => self.header_got += n,
                }
                if self.header_got < HEADER_SIZE {
                    continue;
                }
                let header = Header::parse(&self.header).map_err(ConnectionError::Header)?;
                self.payload = vec![0; header.size as usize];
                self.payload_got = 0;
                self.parsed = Some(header);
            }
            let header = self.parsed.expect("set above");
            if self.payload_got < self.payload.len() {
                let got = self.payload_got;
                match recv_with_fds(fd, &mut self.payload[got..], &mut self.fds)? {
                    None => return Ok(None),
                    Some(0) => return Err(ConnectionError::Truncated { got: HEADER_SIZE + got }),
                    Some(n) => self.payload_got += n,
                }
                continue;
            }
            self.parsed = None;
            self.header_got = 0;
            return Ok(Some(RawMessage {
                header,
                payload: mem::take(&mut self.payload),
                fds: mem::take(&mut self.fds),
            }));
        }
    }
}

/// Space for the ancillary data of `n` fds (`CMSG_SPACE(n * sizeof(int))`).
fn cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure computation.
    unsafe { libc::CMSG_SPACE((n * mem::size_of::<RawFd>()) as u32) as usize }
}

/// One `recvmsg`: data into `buf`, any SCM_RIGHTS fds appended to `fds` (owned at once, with
/// close-on-exec). `Ok(None)` on EAGAIN, `Ok(Some(0))` at end of stream.
fn recv_with_fds(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<Option<usize>, ConnectionError> {
    // u64 storage keeps the control buffer aligned for `cmsghdr`.
    let mut control = [0u64; 16];
    let control_len = cmsg_space(MAX_FDS);
    debug_assert!(control_len <= mem::size_of_val(&control));
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control_len as _;
    let n = loop {
        // SAFETY: `msg` describes valid buffers (`buf`, `control`) for the duration of the call.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(e.into()),
        }
    };
    // Take ownership of every fd first, so that nothing leaks on the error paths below.
    // SAFETY: `msg` was filled by the kernel; CMSG_FIRSTHDR/NXTHDR walk its control buffer.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` points at a complete cmsghdr inside `control` (CMSG_* contract).
        let (level, kind, len) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len as usize) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a pure computation.
            let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = len.saturating_sub(header_len) / mem::size_of::<RawFd>();
            // SAFETY: the data part holds `count` ints; read them unaligned.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count` ints are inside this cmsg's data; each is a fresh fd the
                // kernel installed for us, owned by nobody else.
                fds.push(unsafe { OwnedFd::from_raw_fd(data.add(i).read_unaligned()) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS {
        fds.clear();
        return Err(ConnectionError::TooManyFds);
    }
    Ok(Some(n))
}

/// Sends `bytes` with `fds` attached (SCM_RIGHTS) on a blocking or non-blocking socket,
/// retrying on EINTR and waiting out EAGAIN briefly (replies are small; a front-end that does
/// not read its socket for a second is treated as broken).
pub fn send_with_fds(fd: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut sent = 0;
    let mut first = true;
    let mut waited = 0;
    while sent < bytes.len() {
        let mut control = [0u64; 16];
        let mut iov = libc::iovec { iov_base: bytes[sent..].as_ptr() as *mut _, iov_len: bytes.len() - sent };
        // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if first && !fds.is_empty() {
            if fds.len() > MAX_FDS {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many fds"));
            }
            let space = cmsg_space(fds.len());
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: the control buffer has `space` bytes for one cmsghdr with `fds.len()`
            // ints, as CMSG_SPACE computed.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of_val(fds) as u32) as _;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for (i, &f) in fds.iter().enumerate() {
                    data.add(i).write_unaligned(f);
                }
            }
        }
        // SAFETY: `msg` describes valid buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock if waited < 1000 => {
                    std::thread::sleep(Duration::from_millis(1));
                    waited += 1;
                    continue;
                }
                _ => return Err(e),
            }
        }
        first = false;
        sent += n as usize;
    }
    Ok(())
}

/// Sends a whole small message without waiting and without fds: for the back-end request
/// channel, where a front-end that does not read must not stall the control loop
/// (`MSG_DONTWAIT` leaves the descriptor, which the front-end shares, as it is). A full
/// socket or a partial send is an error.
pub fn try_send(fd: RawFd, bytes: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: sends from `bytes`, valid for its length, on a descriptor we hold.
        let n = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n as usize != bytes.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "message cut short"));
        }
        return Ok(());
    }
}

/// A listening vhost-user socket (the back-end as server).
#[derive(Debug)]
pub struct Listener {
    listener: mio::net::UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Binds `path`, removing a stale socket file first (only a socket: any other file is an
    /// error), and applies `mode` (e.g. 0o660) if given.
    pub fn bind(path: &Path, mode: Option<u32>) -> io::Result<Listener> {
        if let Ok(meta) = fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            // A live back-end still listening there would be cut off; refuse instead.
            if StdUnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running back-end", path.display()),
                ));
            }
            fs::remove_file(path)?;
        }
        let listener = mio::net::UnixListener::bind(path)?;
        if let Some(mode) = mode {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        }
        Ok(Listener { listener, path: path.to_path_buf() })
    }

    /// Wraps an already listening socket (e.g. `--fd` from the management layer).
    pub fn from_fd(fd: OwnedFd) -> Listener {
        let std = std::os::unix::net::UnixListener::from(fd);
        let _ = std.set_nonblocking(true);
        Listener { listener: mio::net::UnixListener::from_std(std), path: PathBuf::new() }
    }

    /// Accepts one pending connection, if any.
    pub fn accept(&self) -> io::Result<Option<mio::net::UnixStream>> {
        match self.listener.accept() {
            Ok((s, _)) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The socket path ("" for an inherited fd).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mio source, for registration.
    pub fn source(&mut self) -> &mut mio::net::UnixListener {
        &mut self.listener
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Reconnect policy for a back-end that connects to a front-end listening socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reconnect {
    /// Whether to reconnect at all after the connection ends (on by default).
    pub enabled: bool,
    /// First delay between attempts.
    pub initial: Duration,
    /// Longest delay between attempts (exponential backoff up to this).
    pub max: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect { enabled: true, initial: Duration::from_millis(100), max: Duration::from_secs(5) }
    }
}

impl Reconnect {
    /// Delay before attempt number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// Connects to a front-end's listening socket (the back-end as client), non-blocking.
pub fn connect(path: &Path) -> io::Result<mio::net::UnixStream> {
    let s = StdUnixStream::connect(path)?;
    s.set_nonblocking(true)?;
    Ok(mio::net::UnixStream::from_std(s))
}

/// The raw fd of a stream, for [`MessageReader::read`] and [`send_with_fds`].
pub fn raw(s: &mio::net::UnixStream) -> RawFd {
    s.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{HEADER_SIZE, MAX_PAYLOAD};
    use std::os::fd::AsRawFd;

    fn header(request: u32, size: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&request.to_ne_bytes());
        h.extend_from_slice(&1u32.to_ne_bytes());
        h.extend_from_slice(&size.to_ne_bytes());
        h
    }

    fn pair() -> (StdUnixStream, StdUnixStream) {
        let (a, b) = StdUnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    #[test]
    fn assembles_a_message_sent_in_pieces_with_fds_on_a_later_byte() {
        let (a, b) = pair();
        let mut r = MessageReader::new();
        let mut msg = header(8, 8);
        msg.extend_from_slice(&[1, 0, 0, 0, 0, 1, 0, 0]);
        send_with_fds(a.as_raw_fd(), &msg[..5], &[]).unwrap();
        assert!(r.read(b.as_raw_fd()).unwrap().is_none(), "half a header: wait");
        let (p, _q) = StdUnixStream::pair().unwrap();
        send_with_fds(a.as_raw_fd(), &msg[5..14], &[p.as_raw_fd()]).unwrap();
        assert!(r.read(b.as_raw_fd()).unwrap().is_none(), "half a payload: wait");
        send_with_fds(a.as_raw_fd(), &msg[14..], &[]).unwrap();
        let m = r.read(b.as_raw_fd()).unwrap().expect("complete");
        assert_eq!((m.header.request, m.header.size), (8, 8));
        assert_eq!(m.payload, &msg[HEADER_SIZE..]);
        assert_eq!(m.fds.len(), 1);
        assert!(r.read(b.as_raw_fd()).unwrap().is_none());
    }

    #[test]
    fn short_read_and_close_are_distinguished() {
        let (a, b) = pair();
        let mut r = MessageReader::new();
        send_with_fds(a.as_raw_fd(), &header(1, 0)[..7], &[]).unwrap();
        drop(a);
        assert!(matches!(r.read(b.as_raw_fd()), Err(ConnectionError::Truncated { got: 7 })));
        let (a, b) = pair();
        let mut r = MessageReader::new();
        drop(a);
        assert!(matches!(r.read(b.as_raw_fd()), Err(ConnectionError::Closed)));
    }

    #[test]
    fn more_fds_than_a_message_may_carry_is_an_error_and_nothing_leaks() {
        let (a, b) = pair();
        let mut r = MessageReader::new();
        // Ten pipe read ends on one header: the kernel truncates the control data
        // (MSG_CTRUNC). Our own copies of the read ends are closed right after sending, so a
        // write to a pipe fails with EPIPE once the receiver closed its copy too.
        let pipes: Vec<(OwnedFd, std::io::PipeWriter)> = (0..10).map(|_| crate::fd_probe::probe()).collect();
        let raw: Vec<RawFd> = pipes.iter().map(|(rd, _)| rd.as_raw_fd()).collect();
        send_many_fds(a.as_raw_fd(), &header(1, 0), &raw);
        let writers: Vec<_> = pipes.into_iter().map(|(_, wr)| wr).collect();
        assert!(matches!(r.read(b.as_raw_fd()), Err(ConnectionError::TooManyFds)));
        for mut w in writers {
            assert!(crate::fd_probe::is_closed(&mut w), "a received read end is still open");
        }
    }

    fn send_many_fds(fd: RawFd, bytes: &[u8], fds: &[RawFd]) {
        let mut control = [0u64; 32];
        let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
        // SAFETY: as in send_with_fds, with a control buffer large enough for `fds`.
        unsafe {
            let mut msg: libc::msghdr = mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = cmsg_space(fds.len()) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, &f) in fds.iter().enumerate() {
                data.add(i).write_unaligned(f);
            }
            assert!(libc::sendmsg(fd, &msg, 0) > 0);
        }
    }

    #[test]
    fn oversized_or_bad_headers_are_rejected() {
        let (a, b) = pair();
        let mut r = MessageReader::new();
        send_with_fds(a.as_raw_fd(), &header(1, MAX_PAYLOAD + 1), &[]).unwrap();
        assert!(matches!(r.read(b.as_raw_fd()), Err(ConnectionError::Header(_))));
    }

    #[test]
    fn listener_replaces_a_stale_socket_but_not_a_live_one_or_a_file() {
        let dir = std::env::temp_dir().join(format!("virtq-conn-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        {
            let _stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        }
        // The stale file remains after the std listener is dropped; bind replaces it.
        let l = Listener::bind(&path, Some(0o600)).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(Listener::bind(&path, None).is_err(), "a live listener is not replaced");
        drop(l);
        assert!(!path.exists(), "socket file removed on drop");
        fs::write(&path, b"not a socket").unwrap();
        assert!(Listener::bind(&path, None).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reconnect_backoff_doubles_up_to_the_maximum() {
        let r = Reconnect::default();
        assert_eq!(r.delay(0), Duration::from_millis(100));
        assert_eq!(r.delay(1), Duration::from_millis(200));
        assert_eq!(r.delay(10), Duration::from_secs(5));
        assert_eq!(r.delay(u32::MAX), Duration::from_secs(5));
    }
}
