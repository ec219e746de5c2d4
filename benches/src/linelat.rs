//! `linelat [CPU_A CPU_B]` (default `0 1`): the round trip of a cache line between two CPUs, in
//! nanoseconds (the median of 9 batches of 20000 round trips, one line per run on stdout).
//!
//! A thread pinned to `CPU_A` writes a counter into one cache line and waits for a thread
//! pinned to `CPU_B` to echo it back through another line; each round trip moves both lines
//! between the two CPUs' caches. That transfer is what a virtio back-end and its front-end pay
//! for every ring index, descriptor and frame they hand each other, so `benches/vs-dpdk.sh`
//! runs this before and after each sample to tell which state the machine was in. On the
//! shared VMs this project is measured on, the same two vCPUs measure about 50–120 ns or
//! about 500 ns at different times (the host moves them), and the data-path rates follow.
//!
//! Exits with status 1 if a thread cannot be pinned or one thread waits about 5 seconds for
//! the other (that CPU is not running it), 2 on bad arguments.

use std::hint::spin_loop;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BATCHES: usize = 9;
const TRIPS: u64 = 20_000;
const TIMEOUT: Duration = Duration::from_secs(5);

/// One counter alone in its cache line (and the adjacent-line prefetch pair).
#[repr(align(128))]
#[derive(Default)]
struct Line(AtomicU64);

#[derive(Default)]
struct Shared {
    ping: Line,
    pong: Line,
    /// Set by either side when it gives up, so that the other does not wait forever.
    abort: AtomicU64,
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> Result<(), String> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(format!("CPU {cpu} out of range"));
    }
    // SAFETY: `cpu_set_t` is plain data, valid when zeroed; CPU_SET writes inside it since
    // `cpu < CPU_SETSIZE`; sched_setaffinity(0, ...) affects only the calling thread and reads
    // `size_of::<cpu_set_t>()` bytes of `set`.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(format!("cannot pin to CPU {cpu}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Spins until `line` holds `want`; false if the other side aborted or [`TIMEOUT`] passed.
fn wait_for(line: &AtomicU64, want: u64, shared: &Shared) -> bool {
    let mut spins = 0u32;
    let mut since: Option<Instant> = None;
    while line.load(Ordering::Acquire) != want {
        spins = spins.wrapping_add(1);
        // The clock and the abort flag only after many spins: reading the clock costs tens of
        // ns, which would add to every round trip.
        if spins.is_multiple_of(1 << 16) {
            let t = *since.get_or_insert_with(Instant::now);
            if shared.abort.load(Ordering::Relaxed) != 0 || t.elapsed() > TIMEOUT {
                shared.abort.store(1, Ordering::Relaxed);
                return false;
            }
        }
        spin_loop();
    }
    true
}

fn run(a: usize, b: usize) -> Result<f64, String> {
    // Pinned before the peer exists, so that a bad CPU_A is reported as such.
    pin(a)?;
    let shared = Arc::new(Shared::default());
    // The peer's error says whether it got as far as pinning itself.
    let peer = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || -> Result<(), (bool, String)> {
            if let Err(e) = pin(b) {
                shared.abort.store(1, Ordering::Relaxed);
                return Err((false, e));
            }
            for i in 1..=BATCHES as u64 * TRIPS {
                if !wait_for(&shared.ping.0, i, &shared) {
                    return Err((true, format!("no ping from CPU {a} within {TIMEOUT:?}")));
                }
                shared.pong.0.store(i, Ordering::Release);
            }
            Ok(())
        })
    };
    let result = (|| {
        let mut ns = [0f64; BATCHES];
        let mut i = 0u64;
        for slot in &mut ns {
            let start = Instant::now();
            for _ in 0..TRIPS {
                i += 1;
                shared.ping.0.store(i, Ordering::Release);
                if !wait_for(&shared.pong.0, i, &shared) {
                    return Err(format!("no answer from CPU {b} within {TIMEOUT:?}"));
                }
            }
            *slot = start.elapsed().as_nanos() as f64 / TRIPS as f64;
        }
        ns.sort_by(f64::total_cmp);
        Ok(ns[BATCHES / 2])
    })();
    if result.is_err() {
        shared.abort.store(1, Ordering::Relaxed);
    }
    match peer.join() {
        Err(_) => Err("peer thread panicked".into()),
        // A peer that could not pin itself explains the main thread's time-out.
        Ok(Err((false, e))) => Err(e),
        Ok(Err((true, e))) => result.and(Err(e)),
        Ok(Ok(())) => result,
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cpus: Result<Vec<usize>, _> = args.iter().map(|s| s.parse::<usize>()).collect();
    let (a, b) = match cpus.as_deref() {
        Ok([]) => (0, 1),
        Ok([a, b]) if a != b => (*a, *b),
        _ => {
            eprintln!("usage: linelat [CPU_A CPU_B] (two different CPUs; default 0 1)");
            return ExitCode::from(2);
        }
    };
    match run(a, b) {
        Ok(ns) => {
            println!("{ns:.0}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("linelat: {e}");
            ExitCode::FAILURE
        }
    }
}
