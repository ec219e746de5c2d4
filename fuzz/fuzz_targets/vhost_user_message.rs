//! vhost-user message decoding: arbitrary header, payload and number of attached fds.
//!
//! Invariants: no panic; the decoder accepts only what it can represent; every fd handed to
//! the decoder is either kept in the decoded message or closed — none leaks.
//!
//! Open or closed is read from this process's fd table: the fd number still names the same
//! pipe inode (`fstat`) or not. Not from a pipe's EPIPE: a pipe's read end is released when
//! its *last* reference goes, and another process reading `/proc/<pid>/fd` holds one for a
//! moment, so EPIPE came late now and then in CI and the check failed on a correct decoder.
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtq_vhost_user::message::{FrontendMessage, Header};

#[derive(Arbitrary, Debug)]
struct Input {
    header: [u8; 12],
    payload: Vec<u8>,
    fds: u8,
}

/// A fresh fd (a pipe's read end; the write end is closed at once) and its identity.
fn fresh_fd() -> (OwnedFd, Identity) {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 fills two fresh fds, owned at once.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds, owned by nothing else.
    let (reader, _writer) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    let id = Identity { fd: reader.as_raw_fd(), ino: inode(reader.as_raw_fd()).expect("a fresh fd is open") };
    (reader, id)
}

/// An fd number and the inode it named when it was handed to the decoder.
struct Identity {
    fd: RawFd,
    ino: libc::ino_t,
}

impl Identity {
    /// Whether this process still has the fd open. Nothing in this thread opens an fd between
    /// the decoder's closing one and this check, so a reused number would also show as a
    /// different inode.
    fn open(&self) -> bool {
        inode(self.fd) == Some(self.ino)
    }
}

fn inode(fd: RawFd) -> Option<libc::ino_t> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat only writes the stat buffer; a closed fd number gives EBADF.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstat succeeded, so it filled the buffer.
    Some(unsafe { st.assume_init() }.st_ino)
}

fuzz_target!(|inp: Input| {
    let Ok(header) = Header::parse(&inp.header) else { return };
    let mut payload = inp.payload;
    payload.resize(header.size as usize, 0);
    let (fds, ids): (Vec<_>, Vec<_>) = (0..inp.fds % 11).map(|_| fresh_fd()).unzip();
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
});
