//! vhost-user message decoding: arbitrary header, payload and number of attached fds.
//!
//! Invariants: no panic; the decoder accepts only what it can represent; every fd handed to
//! the decoder is either kept in the decoded message or closed — none leaks (checked with
//! pipes: once every read end is closed, writing to the write end fails with EPIPE).
#![no_main]

use std::os::fd::{FromRawFd, OwnedFd};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtq_vhost_user::message::{FrontendMessage, Header};

#[derive(Arbitrary, Debug)]
struct Input {
    header: [u8; 12],
    payload: Vec<u8>,
    fds: u8,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 fills two fresh fds, owned at once.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) }, 0);
    // SAFETY: fresh fds.
    unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
}

fn reader_closed(w: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: a one-byte write to our own pipe write end; SIGPIPE is ignored by the Rust
    // runtime, so a closed read end shows as EPIPE.
    let n = unsafe { libc::write(w.as_raw_fd(), b"x".as_ptr().cast(), 1) };
    n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPIPE)
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
    let (readers, writers): (Vec<_>, Vec<_>) = (0..inp.fds % 11).map(|_| pipe()).unzip();
    let decoded = FrontendMessage::decode(&header, &payload, readers);
    let kept = match &decoded {
        Ok(m) => format!("{m:?}").matches("OwnedFd").count(),
        Err(_) => 0,
    };
    // While the decoded message lives, exactly the fds it kept are open.
    let open = writers.iter().filter(|w| !reader_closed(w)).count();
    assert_eq!(open, kept, "fds kept by the message vs fds still open");
    drop(decoded);
    assert!(writers.iter().all(reader_closed), "an fd leaked");
});
