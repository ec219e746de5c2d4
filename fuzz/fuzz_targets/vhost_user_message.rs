//! vhost-user message decoding: arbitrary header, payload and number of attached fds.
//!
//! Invariants: no panic; the decoder accepts only what it can represent; every fd handed to
//! the decoder is either kept in the decoded message or closed — none leaks.
//!
//! Each fd handed over is a pipe's read end; the write end stays here. While the decoded
//! message lives, exactly the fds it kept are open, read from this process's fd table: the
//! number still names the same pipe (`fstat`: device and inode). Once it is dropped, no
//! reference to any of the pipes may be left anywhere in the process (a copy made with `dup`
//! included): a write to each pipe must fail with EPIPE. A pipe is released when its *last*
//! reference goes, and another process reading `/proc/<pid>/fd` holds one for a moment, so
//! EPIPE can come a little after the close (it did in CI): it is waited for, up to 2 s.
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtq_vhost_user::message::{FrontendMessage, Header};

#[derive(Arbitrary, Debug)]
struct Input {
    header: [u8; 12],
    payload: Vec<u8>,
    fds: u8,
}

/// A pipe: its read end (handed to the decoder), its write end, and the read end's identity.
fn probe() -> (OwnedFd, OwnedFd, Identity) {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 fills two fresh fds, owned at once.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) }, 0);
    // SAFETY: fresh fds, owned by nothing else.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    let id = Identity { fd: reader.as_raw_fd(), file: file_of(reader.as_raw_fd()).expect("a fresh fd is open") };
    (reader, writer, id)
}

/// An fd number and the file (device, inode) it named when it was handed to the decoder.
struct Identity {
    fd: RawFd,
    file: (libc::dev_t, libc::ino_t),
}

impl Identity {
    /// Whether this process still has the fd open. If the decoder closed it and another thread
    /// reused the number since, the number names another file.
    fn open(&self) -> bool {
        file_of(self.fd) == Some(self.file)
    }
}

fn file_of(fd: RawFd) -> Option<(libc::dev_t, libc::ino_t)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat only writes the stat buffer; a closed fd number gives EBADF.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstat succeeded, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    Some((st.st_dev, st.st_ino))
}

/// Whether every read end of the pipe of `writer` is gone (EPIPE), waiting up to 2 s for a
/// release that another process's reference delayed.
fn released(writer: &OwnedFd) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        // SAFETY: a one-byte write to our own pipe's write end; SIGPIPE is ignored (below),
        // so a pipe without readers reports EPIPE.
        let n = unsafe { libc::write(writer.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPIPE) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fuzz_target!(|inp: Input| {
    static IGNORE_SIGPIPE: std::sync::Once = std::sync::Once::new();
    // SAFETY: ignoring SIGPIPE (as Rust's own runtime does for normal binaries) so that a
    // write to a pipe without readers reports EPIPE instead of killing the fuzzer.
    IGNORE_SIGPIPE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
    let Ok(header) = Header::parse(&inp.header) else { return };
    let mut payload = inp.payload;
    payload.resize(header.size as usize, 0);
    let (mut fds, mut writers, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..inp.fds % 11 {
        let (r, w, id) = probe();
        fds.push(r);
        writers.push(w);
        ids.push(id);
    }
    let decoded = FrontendMessage::decode(&header, &payload, fds);
    let kept = match &decoded {
        Ok(m) => format!("{m:?}").matches("OwnedFd").count(),
        Err(_) => 0,
    };
    // While the decoded message lives, exactly the fds it kept are open.
    let open = ids.iter().filter(|id| id.open()).count();
    assert_eq!(open, kept, "fds kept by the message vs fds still open");
    drop(decoded);
    assert!(!ids.iter().any(Identity::open), "an fd leaked");
    assert!(writers.iter().all(released), "a reference to a received fd outlived the message");
});
