//! Guest memory whose backing disappears under a running device.
//!
//! A region is a `MAP_SHARED` mapping of a file the front-end owns. If the front-end shrinks
//! that file (`ftruncate` of a memfd, a truncated hugetlbfs file) or its pages cannot be
//! supplied any more (a punched hole in a hugetlbfs file whose pool is empty), the next access
//! to a page past the new end raises `SIGBUS` in whichever thread touched it: usually the
//! data-plane thread that serves every device of the process. Its default action kills the
//! process, so one front-end would take every other VM's network with it (DPDK 22.11 has this
//! hole).
//!
//! This module turns that signal into a fault of one device:
//! - Every mapped region is registered here ([`register`]) in a fixed table that the signal
//!   handler can read without locks or allocation.
//! - The `SIGBUS` handler looks the faulting address up. If it lies in a registered region, it
//!   maps anonymous zero pages over the *whole* region (`MAP_FIXED`, `MAP_NORESERVE`, so
//!   nothing is committed), which lets the faulting access complete (a read sees zeroes, a
//!   write goes nowhere) and keeps every later access to that region from faulting again. It
//!   then flags the region, bumps a global generation counter and writes to every registered
//!   notification eventfd ([`add_notifier`]), and returns.
//! - Anything else goes to the disposition that was there before, and the process dies as it
//!   would have without this handler: an address outside every region, a fault other than
//!   `BUS_ADRERR` (which zero pages would not cure), a second fault in a region already
//!   replaced, a signal sent with `kill`.
//!
//! The owner learns of the fault out of band: data paths compare [`generation`] once per burst
//! and look at their map only when it moved; the control loop reads its eventfd and marks the
//! owning device broken (rings stopped, error eventfds signalled, `NEEDS_RESET`). The replaced
//! region is never trusted again: a device restarts only on a new memory table or a reset.
//! What the device and its front-end see then is in the one error-policy table, the *Error
//! policy* section of the repository's README.
//!
//! What a front-end should do instead: seal its memory (`memfd_create(MFD_ALLOW_SEALING)` then
//! `F_SEAL_SHRINK`; QEMU's `memory-backend-memfd` seals by default), so that the file cannot
//! shrink at all. [`MappedRegion`](super::MappedRegion) records whether a region is sealed.
//!
//! Only the handler and the table are process-global; they are installed on the first
//! registration and stay installed.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Regions that can be registered at once in this process (mappings of every device). A device
/// has at most `VHOST_USER_GET_MAX_MEM_SLOTS` regions (32 by default), so this covers 256
/// devices at the largest slot count. The table is 320 KiB of zeroed static memory.
pub const MAX_REGIONS: usize = 8192;

/// Eventfds the handler writes to on a fault (one per control loop).
const MAX_NOTIFIERS: usize = 64;

const FREE: u8 = 0;
const CLAIMED: u8 = 1;
const LIVE: u8 = 2;

struct Entry {
    state: AtomicU8,
    /// A sequence count, odd while the slot is being rewritten, moved by every registration
    /// and release: the handler reads it before and after the fields and trusts them only if
    /// it did not change (a seqlock), so a slot released and reused for another mapping while
    /// the handler looks at it is never taken for the old one.
    seq: AtomicU64,
    faulted: AtomicBool,
    start: AtomicUsize,
    len: AtomicUsize,
    /// The first faulting address (0 until a fault).
    addr: AtomicUsize,
}

impl Entry {
    const fn new() -> Entry {
        Entry {
            state: AtomicU8::new(FREE),
            seq: AtomicU64::new(0),
            faulted: AtomicBool::new(false),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            addr: AtomicUsize::new(0),
        }
    }
}

static TABLE: [Entry; MAX_REGIONS] = [const { Entry::new() }; MAX_REGIONS];
static NOTIFIERS: [AtomicI32; MAX_NOTIFIERS] = [const { AtomicI32::new(-1) }; MAX_NOTIFIERS];
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// Handlers running now: `remove_notifier` waits for them, so that no handler writes to an fd
/// number that its owner has closed (and the kernel may have reused).
static IN_HANDLER: AtomicUsize = AtomicUsize::new(0);
/// The `SIGBUS` disposition before ours, set once before the handler is installed.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// The number of guest memory faults handled in this process so far. Cheap to read: a data path
/// compares it once per burst and looks for a faulted region only when it changed.
#[inline]
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// The registration of one mapping; unregisters on drop (before the mapping is unmapped, so
/// that a fault in a later mapping at the same address is never charged to this one).
#[derive(Debug)]
pub struct FaultGuard {
    slot: usize,
}

/// Every slot of the table is taken: more than [`MAX_REGIONS`] regions are mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableFull;

/// Registers `[start, start + len)`, a mapping of guest memory, with the `SIGBUS` handler
/// (installed on the first call).
pub fn register(start: *mut u8, len: usize) -> Result<FaultGuard, TableFull> {
    install();
    for (slot, e) in TABLE.iter().enumerate() {
        if e.state.compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            e.seq.fetch_add(1, Ordering::AcqRel); // odd: being written
            e.start.store(start as usize, Ordering::Relaxed);
            e.len.store(len, Ordering::Relaxed);
            e.addr.store(0, Ordering::Relaxed);
            e.faulted.store(false, Ordering::Relaxed);
            e.seq.fetch_add(1, Ordering::Release); // even: consistent
                                                   // Publishes the fields above to the handler, which loads `state` with Acquire.
            e.state.store(LIVE, Ordering::Release);
            return Ok(FaultGuard { slot });
        }
    }
    Err(TableFull)
}

impl FaultGuard {
    /// `Some(address)` of the first access that found the backing gone, once the region has
    /// been replaced by zero pages; `None` while it is intact.
    pub fn faulted(&self) -> Option<usize> {
        let e = &TABLE[self.slot];
        e.faulted.load(Ordering::Acquire).then(|| e.addr.load(Ordering::Relaxed))
    }
}

impl Drop for FaultGuard {
    fn drop(&mut self) {
        let e = &TABLE[self.slot];
        e.state.store(FREE, Ordering::Release);
        // A handler that read the fields before this sees the count move and skips the slot.
        e.seq.fetch_add(2, Ordering::Release);
    }
}

/// Has the handler write 8 bytes (an eventfd increment) to `fd` after every fault it handles.
/// `fd` must stay open until [`remove_notifier`]. Returns `false` if every notifier slot is
/// taken (the caller then learns of faults only through [`generation`]).
pub fn add_notifier(fd: i32) -> bool {
    NOTIFIERS.iter().any(|n| n.compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Relaxed).is_ok())
}

/// Undoes [`add_notifier`]; when it returns, no handler will write to `fd` any more, so the
/// caller may close it.
pub fn remove_notifier(fd: i32) {
    for n in &NOTIFIERS {
        let _ = n.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Relaxed);
    }
    // A handler that loaded `fd` before the store above finishes within a few syscalls.
    while IN_HANDLER.load(Ordering::Acquire) != 0 {
        std::hint::spin_loop();
    }
}

fn install() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // SAFETY: an all-zero sigaction is a valid value (SIG_DFL, empty mask, no flags);
        // `sigaction` only writes the current disposition into `old`.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: reads the current disposition of SIGBUS into `old`.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } != 0 {
            log::error!("guest memory faults: sigaction(SIGBUS) failed: {}", std::io::Error::last_os_error());
            return;
        }
        let _ = PREVIOUS.set(old);
        // SAFETY: as above.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: `sa.sa_mask` is a valid sigset_t to initialise.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: installs a handler that only uses async-signal-safe operations (atomics,
        // mmap, write, sigaction) and reads only statics initialised before this call.
        if unsafe { libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) } != 0 {
            log::error!("guest memory faults: cannot install the SIGBUS handler: {}", std::io::Error::last_os_error());
        }
    });
}

/// The `SIGBUS` handler. Async-signal-safe: atomics, `mmap`, `write` and `sigaction` only; no
/// lock, no allocation, no logging; errno preserved.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    IN_HANDLER.fetch_add(1, Ordering::AcqRel);
    // SAFETY: `__errno_location` gives this thread's errno; saved and restored around the
    // handler's syscalls, as a handler must.
    let saved_errno = unsafe { *libc::__errno_location() };
    let handled = handle(info);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
    IN_HANDLER.fetch_sub(1, Ordering::AcqRel);
    if !handled {
        chain(sig, info, ctx);
    }
}

/// Replaces the registered region that `info`'s address lies in, if the fault is one zero
/// pages can cure: `BUS_ADRERR` (the page is past the end of the file, or a hugetlbfs page
/// that cannot be supplied) in a region not already replaced. Anything else (another code,
/// a signal sent by a process, a fault in memory that is not guest memory, a second fault in a
/// region already replaced) is not ours: `false`.
fn handle(info: *mut libc::siginfo_t) -> bool {
    // SAFETY: the kernel passes a valid siginfo_t for a handler installed with SA_SIGINFO.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    if code != libc::BUS_ADRERR {
        return false;
    }
    for e in &TABLE {
        // Seqlock read: the count, the state and the fields, then the count again.
        let seq = e.seq.load(Ordering::Acquire);
        if seq % 2 == 1 || e.state.load(Ordering::Acquire) != LIVE {
            continue;
        }
        let start = e.start.load(Ordering::Relaxed);
        let len = e.len.load(Ordering::Relaxed);
        let faulted = e.faulted.load(Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Acquire);
        if e.seq.load(Ordering::Relaxed) != seq || addr.wrapping_sub(start) >= len {
            continue;
        }
        if faulted {
            // Zero pages do not fault: this one is not what we cured.
            return false;
        }
        // SAFETY: `[start, start + len)` is a live mapping of guest memory registered by
        // `register` (it is unregistered before it is unmapped, and the seqlock above saw the
        // registration unchanged). Replacing it with private anonymous pages at the same
        // address is what we want: the faulting access and every later one complete on zero
        // pages. No Rust reference into guest memory exists (the GuestMemory contract), so no
        // reference is invalidated.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return false;
        }
        let _ = e.addr.compare_exchange(0, addr, Ordering::Relaxed, Ordering::Relaxed);
        e.faulted.store(true, Ordering::Release);
        GENERATION.fetch_add(1, Ordering::AcqRel);
        let one = 1u64;
        for n in &NOTIFIERS {
            let fd = n.load(Ordering::Acquire);
            if fd >= 0 {
                // SAFETY: writes 8 bytes from `one` to a registered eventfd, which stays open
                // while this handler runs (`remove_notifier` waits for `IN_HANDLER`).
                unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
            }
        }
        return true;
    }
    false
}

/// Hands a signal that is not ours to the disposition installed before ours.
///
/// A `SIGBUS` another process sent (`kill -BUS`: `si_code <= 0`, `SI_USER`, `SI_QUEUE`,
/// `SI_TKILL`) gets the default action, the end of the process, and is not handed on: the
/// handler before ours is usually Rust std's stack-overflow handler, which for an address
/// outside a guard page resets the disposition to the default and returns, expecting the
/// faulting access to raise the signal again. A sent signal is not raised again, so the
/// process would go on with no handler at all, and the next fault in guest memory would kill
/// it.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a handler installed with SA_SIGINFO.
    if unsafe { (*info).si_code } <= 0 {
        return restore_default_and_raise(sig);
    }
    let Some(prev) = PREVIOUS.get() else {
        return restore_default_and_raise(sig);
    };
    let handler = prev.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        return restore_default_and_raise(sig);
    }
    if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: without SA_SIGINFO the handler takes the signal number only.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}

/// Puts back the default action and delivers the signal again: a fault we do not own kills the
/// process (with a core dump) exactly as it would have without our handler.
fn restore_default_and_raise(sig: libc::c_int) {
    // SAFETY: an all-zero sigaction is SIG_DFL with an empty mask.
    let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: sets the default disposition; async-signal-safe.
    unsafe { libc::sigaction(sig, &dfl, std::ptr::null_mut()) };
    // SIGBUS is blocked while its handler runs; re-raising it here delivers it on return, and a
    // hardware fault re-executes the faulting access under the default action anyway.
    // SAFETY: raise is async-signal-safe.
    unsafe { libc::raise(sig) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `kill -BUS` from another process ends this one (the default action) rather than being
    /// handed to std's handler, which would uninstall ours and let the process go on. Run in a
    /// child process: this test binary again, with only the child half selected.
    #[test]
    fn a_sigbus_sent_by_a_process_ends_the_process() {
        const CHILD: &str = "VIRTQ_FAULT_TEST_CHILD";
        if std::env::var_os(CHILD).is_some() {
            // The default action dumps core: not here.
            let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: sets this process's core size limit from a valid rlimit.
            unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
            let len = 4096;
            // SAFETY: a new private anonymous mapping, no MAP_FIXED.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            let _guard = register(p.cast(), len).unwrap();
            // SAFETY: sends SIGBUS to this process (SI_USER, as `kill -BUS` does).
            unsafe { libc::kill(libc::getpid(), libc::SIGBUS) };
            // Any thread may take it (libtest runs this one beside its main thread). Still
            // here after a while: the signal was swallowed.
            std::thread::sleep(std::time::Duration::from_secs(10));
            std::process::exit(3);
        }
        let exe = std::env::current_exe().unwrap();
        let status = std::process::Command::new(exe)
            .args(["--exact", "memory::fault::tests::a_sigbus_sent_by_a_process_ends_the_process", "--nocapture"])
            .env(CHILD, "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGBUS), "child ended with {status:?}");
    }

    /// A shared mapping of a memfd that is then truncated: the access that would have raised
    /// SIGBUS completes on a zero page, the guard reports it, and the generation moves.
    #[test]
    fn a_truncated_file_faults_its_region_only() {
        let len = 4 * 4096;
        let name = c"fault-test";
        // SAFETY: `name` is NUL-terminated.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is our memfd.
        assert_eq!(unsafe { libc::ftruncate(fd, len as libc::off_t) }, 0);
        let map = |fd| {
            // SAFETY: a new shared mapping of our memfd, no MAP_FIXED.
            let p = unsafe {
                libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
            };
            assert_ne!(p, libc::MAP_FAILED);
            p.cast::<u8>()
        };
        let (a, b) = (map(fd), map(fd));
        let ga = register(a, len).unwrap();
        let gb = register(b, len).unwrap();
        // SAFETY: inside mapping `a`; plain byte writes and reads through raw pointers.
        unsafe {
            a.add(3 * 4096).write_volatile(7);
            assert_eq!(b.add(3 * 4096).read_volatile(), 7);
        }
        let before = generation();
        // SAFETY: our memfd.
        assert_eq!(unsafe { libc::ftruncate(fd, 4096) }, 0);
        // SAFETY: inside mapping `a` (page 3, now past the end of the file): the handler
        // replaces the mapping, and the read completes on a zero page.
        let v = unsafe { a.add(3 * 4096).read_volatile() };
        assert_eq!(v, 0);
        assert_eq!(ga.faulted(), Some(a as usize + 3 * 4096));
        assert_eq!(gb.faulted(), None, "the other mapping is untouched until it faults itself");
        assert!(generation() > before);
        // The replaced region stays usable (zero pages), and page 0 of `b` is still the file.
        // SAFETY: inside mapping `a` / `b`.
        unsafe {
            a.add(4096).write_volatile(1);
            b.write_volatile(9);
        }
        drop((ga, gb));
        // SAFETY: unmapping our own mappings and closing our fd.
        unsafe {
            libc::munmap(a.cast(), len);
            libc::munmap(b.cast(), len);
            libc::close(fd);
        }
    }
}
