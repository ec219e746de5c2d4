//! # `reflect` — a vhost-user virtio-net back-end that sends every frame back
//!
//! **To run a reflector, use `virtq-net --backend reflect`** (or `--port
//! path=...,backend=reflect`): the product, with statistics, packed rings, live migration and
//! the rest of its options. This example stays for two reasons:
//!
//! - It is the smallest complete back-end on `virtq-vhost-user`, about 290 lines of code that
//!   use nothing but the library's public API (plus `libc` for signals and `log`): the place to
//!   read how a back-end is put together, from `Backend::add_device` to the burst calls.
//! - `ci/peer-testpmd.sh` builds it and runs it against DPDK testpmd's `net_virtio_user`
//!   front-end, checking its `--stats-file` counters against testpmd's, frame for frame. That
//!   tests the library against a real peer apart from virtq-net's own data plane.
//!
//! The [`Backend`] control loop runs in one thread, and one data-path thread busy-polls every
//! queue pair, taking the frames the guest transmitted (`dequeue_burst` on TX queue `2n + 1`)
//! and giving the same frames back on the receive queue of the same pair (`enqueue_burst` on
//! RX queue `2n`). Frames are not modified (no MAC swap): whatever the front-end sends, it
//! receives.
//!
//! ```text
//! reflect --socket-path PATH [--client] [--queues N] [--no-mrg-rxbuf]
//!         [--stats-file PATH] [--duration SECS] [--verbose]
//! ```
//!
//! * `--socket-path PATH`: the vhost-user socket. By default the back-end listens on it
//!   (the front-end is the client: QEMU without `server=on`, DPDK virtio-user `server=0`).
//! * `--client`: connect to a front-end that listens on PATH instead (QEMU `server=on`,
//!   virtio-user `server=1`), retrying with backoff and reconnecting after a disconnect.
//! * `--queues N`: queue pairs offered (default 1; more than one offers `VIRTIO_NET_F_MQ`).
//! * `--no-mrg-rxbuf`: do not offer `VIRTIO_NET_F_MRG_RXBUF`.
//! * `--stats-file PATH`: on exit, write the counters as `key value` lines (see below).
//! * `--duration SECS`: exit after this long (otherwise on SIGTERM or SIGINT).
//! * `--verbose`: debug-level logging: the memory table, and each pair's counters and ring
//!   state once a second.
//!
//! Counters, per pair `p`: `pair{p}.rx_packets` (frames received from the guest, i.e.
//! dequeued from its TX queue), `pair{p}.tx_packets` (frames given back to the guest on its RX
//! queue), `pair{p}.tx_dropped` (reflected frames that found no receive buffers); the
//! library's own counters per virtqueue `q`: `vq{q}.packets`, `vq{q}.bytes`, `vq{q}.drops`,
//! `vq{q}.errors`; and the totals `rx_packets`, `tx_packets`, `tx_dropped`.
//!
//! Example, with DPDK testpmd as the front-end (see `ci/peer-testpmd.sh`):
//!
//! ```text
//! cargo run --release -p virtq-vhost-user --example reflect -- --socket-path /tmp/vu.sock
//! dpdk-testpmd --no-huge -m 64 --no-pci --lcores 0@1,1@1 \
//!     --vdev 'net_virtio_user0,path=/tmp/vu.sock' -- -i --forward-mode=flowgen --total-num-mbufs=8192
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use virtq_vhost_user::backend::{Backend, DeviceHandler, SocketSpec};
use virtq_vhost_user::connection::Reconnect;
use virtq_vhost_user::device::DeviceConfig;
use virtq_vhost_user::net::{NetDevice, NetModel, TxFrame};

/// Frames moved per burst.
const BURST: usize = 32;
/// Largest frame (with its virtio-net header) the reflector takes: a jumbo frame. Longer
/// (GSO) chains are dropped by the library and counted as errors.
const FRAME_CAPACITY: usize = 9216 + 12;

/// Set by SIGTERM/SIGINT.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::Release);
}

fn install_signal_handlers() -> std::io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is an
        // `extern "C" fn(c_int)` that only stores to an atomic, which is async-signal-safe.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A minimal `log` sink on stderr (the library logs through the `log` facade).
struct StderrLogger {
    level: log::LevelFilter,
    start: Instant,
}

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.level
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let t = self.start.elapsed();
            let _ = writeln!(
                std::io::stderr().lock(),
                "[{:>4}.{:03} {:<5} {}] {}",
                t.as_secs(),
                t.subsec_millis(),
                r.level(),
                r.target(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

struct Args {
    socket: PathBuf,
    client: bool,
    queues: u16,
    mrg_rxbuf: bool,
    stats_file: Option<PathBuf>,
    duration: Option<Duration>,
    verbose: bool,
}

const USAGE: &str = "usage: reflect --socket-path PATH [--client] [--queues N] [--no-mrg-rxbuf] \
                     [--stats-file PATH] [--duration SECS] [--verbose]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        socket: PathBuf::new(),
        client: false,
        queues: 1,
        mrg_rxbuf: true,
        stats_file: None,
        duration: None,
        verbose: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--socket-path" => a.socket = value("--socket-path")?.into(),
            "--client" => a.client = true,
            "--queues" => {
                a.queues = value("--queues")?.parse().map_err(|e| format!("--queues: {e}"))?;
                if a.queues == 0 {
                    return Err("--queues must be at least 1".into());
                }
            }
            "--no-mrg-rxbuf" => a.mrg_rxbuf = false,
            "--stats-file" => a.stats_file = Some(value("--stats-file")?.into()),
            "--duration" => {
                let s: f64 = value("--duration")?.parse().map_err(|e| format!("--duration: {e}"))?;
                a.duration = Some(Duration::try_from_secs_f64(s).map_err(|e| format!("--duration: {e}"))?);
            }
            "--verbose" => a.verbose = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.socket.as_os_str().is_empty() {
        return Err("--socket-path is required".into());
    }
    Ok(a)
}

/// Bumped by the control loop whenever ring state changes, so that the data path re-applies
/// kick suppression to freshly started rings.
struct Handler {
    generation: Arc<AtomicU64>,
}

impl DeviceHandler<NetModel> for Handler {
    fn device_ready(&mut self, dev: &NetDevice) {
        log::info!("reflect {}: device ready", dev.name());
        self.generation.fetch_add(1, Ordering::Release);
    }
    fn device_destroyed(&mut self, dev: &NetDevice) {
        log::info!("reflect {}: device stopped", dev.name());
        self.generation.fetch_add(1, Ordering::Release);
    }
    fn vring_state_changed(&mut self, _: &NetDevice, _: u16, _: bool) {
        self.generation.fetch_add(1, Ordering::Release);
    }
    fn features_changed(&mut self, dev: &NetDevice, features: virtq::VirtioFeatures) {
        log::info!("reflect {}: features {features:#x}", dev.name());
    }
}

/// Per-pair counters kept by the data path.
#[derive(Clone, Copy, Default)]
struct PairCounters {
    rx: u64,
    tx: u64,
    dropped: u64,
}

/// The data path: until `stop`, busy-poll every pair and reflect what the guest sends.
fn reflect(net: &NetDevice, generation: &AtomicU64, stop: &AtomicBool) -> Vec<PairCounters> {
    let pairs = net.queue_pairs();
    let mut counters = vec![PairCounters::default(); pairs as usize];
    let mut frames: Vec<TxFrame> = (0..BURST).map(|_| TxFrame::with_capacity(FRAME_CAPACITY)).collect();
    let mut seen_generation = u64::MAX;
    let mut idle: u32 = 0;
    let mut loops: u32 = 0;
    let mut tick = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Kick suppression (the data path polls anyway) on every ring state change, and once a
        // second for rings that started without an event (pairs beyond the first).
        loops = loops.wrapping_add(1);
        let g = generation.load(Ordering::Acquire);
        let second = loops.is_multiple_of(4096) && tick.elapsed() >= Duration::from_secs(1);
        if g != seen_generation || second {
            seen_generation = g;
            for p in 0..pairs {
                net.suppress_kicks(2 * p as usize + 1);
            }
        }
        if second {
            tick = Instant::now();
            for (p, c) in counters.iter().enumerate() {
                log::debug!(
                    "reflect: pair {p}: rx {} tx {} dropped {} (RX queue ready {}, TX queue ready {})",
                    c.rx,
                    c.tx,
                    c.dropped,
                    net.queue_ready(2 * p),
                    net.queue_ready(2 * p + 1)
                );
            }
        }
        let mut moved = 0;
        for (p, c) in counters.iter_mut().enumerate() {
            let p = p as u16;
            let n = net.dequeue_burst(p, &mut frames);
            if n == 0 {
                continue;
            }
            let mut refs: [&[u8]; BURST] = [&[]; BURST];
            for (r, f) in refs.iter_mut().zip(&frames[..n]) {
                *r = f.frame();
            }
            let sent = net.enqueue_burst(p, &refs[..n]);
            c.rx += n as u64;
            c.tx += sent as u64;
            c.dropped += (n - sent) as u64;
            moved += n;
        }
        if moved != 0 {
            idle = 0;
        } else {
            // Busy-poll while traffic may come; back off to short sleeps when no ring is
            // started (no front-end, or between connections) so an idle reflector costs nothing.
            idle = idle.saturating_add(1);
            if idle > 1 << 20 && !(0..pairs).any(|p| net.queue_ready(2 * p as usize + 1)) {
                thread::sleep(Duration::from_millis(1));
            } else {
                std::hint::spin_loop();
            }
        }
    }
    counters
}

fn report(net: &NetDevice, counters: &[PairCounters]) -> String {
    let mut out = String::new();
    let mut total = PairCounters::default();
    for (p, c) in counters.iter().enumerate() {
        out += &format!("pair{p}.rx_packets {}\npair{p}.tx_packets {}\npair{p}.tx_dropped {}\n", c.rx, c.tx, c.dropped);
        total.rx += c.rx;
        total.tx += c.tx;
        total.dropped += c.dropped;
    }
    for q in 0..2 * counters.len() {
        let s = net.stats(q);
        out += &format!(
            "vq{q}.packets {}\nvq{q}.bytes {}\nvq{q}.drops {}\nvq{q}.errors {}\n",
            s.packets, s.bytes, s.drops, s.errors
        );
    }
    out += &format!("rx_packets {}\ntx_packets {}\ntx_dropped {}\n", total.rx, total.tx, total.dropped);
    out
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("reflect: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let level = if args.verbose { log::LevelFilter::Debug } else { log::LevelFilter::Info };
    let logger = Box::leak(Box::new(StderrLogger { level, start: Instant::now() }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
    if let Err(e) = install_signal_handlers() {
        eprintln!("reflect: sigaction: {e}");
        return ExitCode::FAILURE;
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reflect: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> std::io::Result<()> {
    let mut config = DeviceConfig::new(NetModel::default());
    config.model.queue_pairs = args.queues;
    if !args.mrg_rxbuf {
        config.model.features.remove(virtq::VirtioFeatures::NET_MRG_RXBUF);
    }
    let spec = if args.client {
        SocketSpec::Client { path: args.socket.clone(), reconnect: Reconnect::default() }
    } else {
        SocketSpec::Server { path: args.socket.clone(), mode: None }
    };
    let generation = Arc::new(AtomicU64::new(0));
    let mut backend = Backend::new()?;
    let name = args.socket.display().to_string();
    let net = backend.add_device(&name, config, spec, Box::new(Handler { generation: Arc::clone(&generation) }))?;
    let handle = backend.handle();
    log::info!(
        "reflect: {} on {name}, {} queue pair(s), mrg_rxbuf {}",
        if args.client { "connecting" } else { "listening" },
        args.queues,
        if args.mrg_rxbuf { "offered" } else { "not offered" }
    );

    let control = thread::Builder::new().name("vhost-control".into()).spawn(move || backend.run())?;
    let data_stop = Arc::new(AtomicBool::new(false));
    let data = {
        let (net, stop, generation) = (net.clone(), Arc::clone(&data_stop), Arc::clone(&generation));
        thread::Builder::new().name("data-path".into()).spawn(move || reflect(&net, &generation, &stop))?
    };

    // The main thread only waits for the end: a signal, `--duration`, or a thread that died.
    let deadline = args.duration.map(|d| Instant::now() + d);
    while !STOP.load(Ordering::Acquire)
        && deadline.is_none_or(|d| Instant::now() < d)
        && !control.is_finished()
        && !data.is_finished()
    {
        thread::sleep(Duration::from_millis(20));
    }
    // Stop the data path first so that its counters are final, then the control loop (closes
    // the connection, stops the rings, removes the socket file of a server).
    data_stop.store(true, Ordering::Release);
    let counters = data.join().map_err(|_| std::io::Error::other("data-path thread panicked"))?;
    handle.shutdown();
    let control_result = control.join().map_err(|_| std::io::Error::other("control thread panicked"))?;

    let text = report(&net, &counters);
    print!("{text}");
    let _ = std::io::stdout().flush();
    if let Some(path) = &args.stats_file {
        std::fs::write(path, &text)?;
    }
    control_result
}
