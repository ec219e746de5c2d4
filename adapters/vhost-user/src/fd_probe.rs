//! Test support: fds whose closing a test can observe. A pipe's read end is handed over as
//! "the fd" and its write end kept: writing to a pipe whose every read end is closed fails
//! with EPIPE (the test harness ignores SIGPIPE), so a close is seen without looking at fd
//! numbers, which another test thread could reuse between the close and the check.

use std::io::{ErrorKind, PipeWriter, Write};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// A probe: the read end (hand it over) and the write end (keep it).
pub(crate) fn probe() -> (OwnedFd, PipeWriter) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    (OwnedFd::from(reader), writer)
}

/// Whether every copy of the probe's read end is closed. A pipe is released when its last
/// reference goes, and a process reading `/proc/<pid>/fd` (a CI monitor) holds one for a
/// moment, so EPIPE can come shortly after the close: retried for up to two seconds.
pub(crate) fn is_closed(writer: &mut PipeWriter) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if closed_now(writer) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether the probe's read end is still open, at once (a late release can make a closed fd
/// look open for a moment, never an open one look closed).
pub(crate) fn is_open(writer: &mut PipeWriter) -> bool {
    !closed_now(writer)
}

fn closed_now(writer: &mut PipeWriter) -> bool {
    match writer.write_all(&[0]) {
        Ok(()) => false,
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::BrokenPipe, "unexpected write error {e}");
            true
        }
    }
}
