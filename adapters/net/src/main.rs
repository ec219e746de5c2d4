//! `virtq-net`: a vhost-user-net back-end. It connects VMs' virtio-net devices (QEMU, libvirt,
//! DPDK virtio-user) to each other through an L2 learning switch, to host TAP devices, or back
//! to themselves.
//!
//! Without arguments it listens on one socket, `/tmp/virtq-net.sock`, in switch mode. It follows
//! the conventions of QEMU's vhost-user back-end programs (docs/interop/vhost-user.rst
//! "Backend program conventions"): `--socket-path` or `--fd`, `--print-capabilities`, no
//! daemonizing, and a clean exit on SIGTERM/SIGINT (rings stopped, socket files removed).
//!
//! Ports with a `tap:NAME` back-end offer checksum and TCP segmentation offloads (CSUM,
//! GUEST_CSUM, HOST/GUEST_TSO4/6, HOST/GUEST_ECN): the guest's virtio-net header goes to the
//! TAP unchanged, the TAP's header goes to the guest, and the TAP's offloads
//! (`TUNSETOFFLOAD`) follow what the guest negotiated. Switch ports offer the same and UDP
//! segmentation (USO): a frame keeps its header through the switch to a receiver that
//! negotiated its offloads, and is completed or segmented in software for one that did not
//! (`dataplane`). Reflect ports offer none.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use log::{error, info};
use virtq_vhost_user::backend::{Backend, SocketSpec};
use virtq_vhost_user::connection::Reconnect;

use virtq_net::control::{self, ControlSocket};
use virtq_net::dataplane::{Dataplane, Fabric};
use virtq_net::manager::Manager;
use virtq_net::nic::parse_nic;
use virtq_net::port::{parse_backend, parse_cpu_list, parse_port, PortSpec};

/// Command line.
#[derive(Parser, Debug)]
#[command(name = "virtq-net", version, about = "vhost-user-net back-end: L2 switch, TAP or reflector for VM NICs")]
struct Args {
    /// vhost-user socket to listen on (repeat for several ports). Default: /tmp/virtq-net.sock.
    #[arg(long = "socket-path", value_name = "PATH")]
    socket_path: Vec<PathBuf>,

    /// An inherited listening socket fd (libvirt / systemd socket activation).
    #[arg(long, value_name = "FD")]
    fd: Option<i32>,

    /// Connect to the socket paths instead of listening (the front-end is the server:
    /// QEMU `server=on`, DPDK virtio-user `server=1`); reconnects with backoff.
    #[arg(long)]
    client: bool,

    /// With --client: give up after the first disconnect instead of reconnecting.
    #[arg(long)]
    no_reconnect: bool,

    /// A fully specified port (repeatable): `path=P[,client][,backend=switch|reflect|tap:NAME|sink|source:BYTES]
    /// [,queues=N][,mac=52:54:00:00:00:01][,mtu=1500][,mrg=on|off][,packed=on|off][,offload=on|off]`. `offload=off`: a tap
    /// or switch port offers no checksum/TSO offloads (other back-ends never do). `mtu=`: the
    /// MTU the guest is told (VIRTIO_NET_F_MTU) and the largest frame a switch port delivers
    /// to it (a larger frame that is not a GSO frame is dropped and counted).
    #[arg(long = "port", value_name = "SPEC")]
    ports: Vec<String>,

    /// Back-end of the --socket-path/--fd ports: the L2 switch, back to the sender, a host TAP,
    /// or for benchmarks a sink (count and discard what the guest sends) or a source (the guest
    /// receives BYTES-byte UDP frames as fast as it posts buffers). Tap and switch ports offer
    /// checksum and segmentation offloads to the guest; the switch completes checksums and
    /// segments in software for receivers without them.
    #[arg(long, default_value = "switch", value_name = "switch|reflect|tap:NAME|sink|source:BYTES")]
    backend: String,

    /// Attach a host TAP device to the switch (repeatable). The kernel takes offloaded frames
    /// from the switch and finishes them itself; it hands over plain frames.
    #[arg(long = "tap", value_name = "NAME")]
    taps: Vec<String>,
    /// Attach a host network interface to the switch (repeatable):
    /// `IFNAME[,mode=auto|xdp|packet][,queues=N]`. AF_XDP (an XDP program redirects the
    /// interface's frames to the switch; removed on every exit), or AF_PACKET with a
    /// memory-mapped ring where XDP cannot attach (`auto`, the default, says which it took).
    #[arg(long = "nic", value_name = "SPEC")]
    nics: Vec<String>,

    /// Queue pairs per port.
    #[arg(long, default_value_t = 1)]
    queues: u16,

    /// Do not offer VIRTIO_NET_F_MRG_RXBUF.
    #[arg(long)]
    no_mrg_rxbuf: bool,

    /// Do not offer VIRTIO_F_RING_PACKED (packed virtqueues are offered by default; the
    /// front-end chooses).
    #[arg(long)]
    no_packed: bool,

    /// Busy-poll the rings instead of backing off when idle.
    #[arg(long)]
    busy_poll: bool,

    /// Refuse guest memory that the front-end could shrink under the device: every region
    /// must be a memfd sealed with F_SEAL_SHRINK (QEMU's memory-backend-memfd seals by
    /// default; DPDK's virtio-user does not). Without it, a region whose file shrinks stops
    /// only its own port.
    #[arg(long)]
    require_sealed_memory: bool,

    /// Print per-port and per-queue statistics every N seconds (0: only at exit and on
    /// SIGUSR1).
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    stats_interval: u64,

    /// Log level: error, warn, info, debug, trace (or RUST_LOG).
    #[arg(long, default_value = "info")]
    log_level: String,

    /// Print the back-end's capabilities as JSON (vhost-user.json) and exit.
    #[arg(long)]
    print_capabilities: bool,

    /// Data-plane threads, one pinned to each CPU listed (`0,2`, `1-3`); every ring is polled
    /// by one of them, assigned round-robin as ports are added. Default: one unpinned thread.
    #[arg(long = "pmd-cpus", value_name = "LIST")]
    pmd_cpus: Option<String>,

    /// A control socket (mode 0600) to add and remove ports at run time and read statistics
    /// as JSON: `virtq-net ctl PATH add-port SPEC`, `add-tap NAME`, `add-nic SPEC`,
    /// `del-port NAME`, `ports`, `stats`. With it, virtq-net may start without ports.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
enum Command {
    /// Send one request to a running virtq-net's control socket and print the JSON answer
    /// (exit status 1 if it reports an error).
    Ctl {
        /// The control socket (`--control`).
        path: PathBuf,
        /// The request: add-port SPEC, add-tap NAME, add-nic SPEC, del-port NAME, ports, stats.
        #[arg(required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true)]
        words: Vec<String>,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);
static DUMP_STATS: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_usr1(_: libc::c_int) {
    DUMP_STATS.store(true, Ordering::SeqCst);
}

fn install_signals() {
    // SAFETY: the handlers only store to atomics (async-signal-safe); sigaction with an empty
    // mask and SA_RESTART.
    unsafe {
        for (sig, h) in
            [(libc::SIGTERM, on_stop as extern "C" fn(libc::c_int)), (libc::SIGINT, on_stop), (libc::SIGUSR1, on_usr1)]
        {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = h as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let defaults = PortSpec {
        path: PathBuf::new(),
        client: args.client,
        backend: parse_backend(&args.backend)?,
        queues: args.queues,
        mac: None,
        mtu: 1500,
        mrg: !args.no_mrg_rxbuf,
        packed: !args.no_packed,
        offload: true,
    };
    let mut specs: Vec<PortSpec> =
        args.socket_path.iter().map(|p| PortSpec { path: p.clone(), ..defaults.clone() }).collect();
    for s in &args.ports {
        specs.push(parse_port(s, &defaults)?);
    }
    if specs.is_empty() && args.fd.is_none() && args.control.is_none() {
        specs.push(PortSpec { path: PathBuf::from("/tmp/virtq-net.sock"), ..defaults.clone() });
    }
    let cpus = match &args.pmd_cpus {
        Some(list) => parse_cpu_list(list)?,
        None => Vec::new(),
    };
    if let Some(c) = cpus.iter().find(|&&c| !cpu_allowed(c)) {
        return Err(format!(
            "--pmd-cpus: CPU {c} is not one this process may run on (see taskset -p {})",
            std::process::id()
        ));
    }
    let reconnect = Reconnect { enabled: !args.no_reconnect, ..Reconnect::default() };
    // Bound before any thread starts (it sets the umask for a moment).
    let control = match &args.control {
        Some(path) => Some(ControlSocket::bind(path).map_err(|e| format!("--control {}: {e}", path.display()))?),
        None => None,
    };

    let mut backend = Backend::new().map_err(|e| format!("control loop: {e}"))?;
    let handle = backend.handle();
    let vhost =
        thread::Builder::new().name("vhost-user".into()).spawn(move || backend.run()).map_err(|e| e.to_string())?;
    let stop_vhost = |vhost: thread::JoinHandle<std::io::Result<()>>| -> Result<(), String> {
        handle.shutdown();
        vhost.join().map_err(|_| "control loop panicked".to_string())?.map_err(|e| e.to_string())
    };

    let fabric = Fabric::new(cpus.len().max(1), &cpus);
    let mut mgr = Manager::new(handle.clone(), Arc::clone(&fabric), reconnect, args.require_sealed_memory);
    let added = (|| -> Result<(), String> {
        if let Some(fd) = args.fd {
            // SAFETY: `--fd` names a socket the parent passed at exec for this program to
            // serve on; nothing else in the process owns the number.
            let socket = unsafe { SocketSpec::inherited(fd) }.map_err(|e| format!("--fd {fd}: {e}"))?;
            mgr.add_inherited(format!("fd:{fd}"), &defaults, socket)?;
        }
        for spec in &specs {
            mgr.add_port(spec)?;
        }
        for t in &args.taps {
            mgr.add_switch_tap(t)?;
        }
        for n in &args.nics {
            mgr.add_nic(&parse_nic(n)?)?;
        }
        Ok(())
    })();
    if let Err(e) = added {
        stop_vhost(vhost)?;
        return Err(e);
    }

    install_signals();
    let stop = Arc::new(AtomicBool::new(false));
    let mut data = Vec::new();
    for i in 0..fabric.threads() {
        let (fabric, stop) = (Arc::clone(&fabric), Arc::clone(&stop));
        let busy = args.busy_poll;
        let name = if fabric.threads() == 1 { "dataplane".to_string() } else { format!("dataplane-{i}") };
        match thread::Builder::new().name(name).spawn(move || Dataplane::worker(fabric, i, busy).run(&stop)) {
            Ok(t) => data.push(t),
            Err(e) => {
                STOP.store(true, Ordering::SeqCst);
                error!("data-plane thread {i}: {e}");
                break;
            }
        }
    }
    if let Some(c) = cpus.iter().zip(0..).map(|(c, i)| format!("{i}:cpu{c}")).reduce(|a, b| a + " " + &b) {
        info!("{} data-plane threads ({c})", fabric.threads());
    }

    let (mut last_stats, mut last_refresh) = (Instant::now(), Instant::now());
    while !STOP.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(20));
        if let Some(c) = &control {
            c.serve(&mut mgr, &defaults);
        }
        if last_refresh.elapsed() >= Duration::from_secs(1) {
            last_refresh = Instant::now();
            mgr.refresh();
        }
        let periodic = args.stats_interval > 0 && last_stats.elapsed() >= Duration::from_secs(args.stats_interval);
        if DUMP_STATS.swap(false, Ordering::SeqCst) || periodic {
            last_stats = Instant::now();
            mgr.log_stats();
        }
    }
    info!("stopping");
    stop.store(true, Ordering::SeqCst);
    let panicked = data.into_iter().map(|t| t.join()).filter(Result::is_err).count();
    stop_vhost(vhost)?;
    mgr.log_stats();
    drop(control);
    if panicked > 0 {
        return Err("a data-plane thread panicked".into());
    }
    Ok(())
}

/// Whether this process may run on `cpu` (its affinity mask, as `taskset` or a cgroup set it).
fn cpu_allowed(cpu: usize) -> bool {
    // SAFETY: a zeroed `cpu_set_t` is a valid empty set that sched_getaffinity fills (at most
    // its size); CPU_ISSET reads one bit of it, `cpu` bounded by the set's size first.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return true; // cannot tell: pinning will say so if it fails
        }
        cpu < 8 * std::mem::size_of::<libc::cpu_set_t>() && libc::CPU_ISSET(cpu, &set)
    }
}

/// `virtq-net ctl PATH WORDS...`: one request to a running virtq-net's control socket.
fn ctl(path: &std::path::Path, words: &[String]) -> ExitCode {
    match control::request(path, words) {
        Ok(reply) => {
            println!("{reply}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Ctl { path, words }) = &args.command {
        return ctl(path, words);
    }
    if args.print_capabilities {
        println!("{{\n  \"type\": \"net\"\n}}");
        return ExitCode::SUCCESS;
    }
    env_logger::Builder::new()
        .parse_filters(&std::env::var("RUST_LOG").unwrap_or_else(|_| args.log_level.clone()))
        .format_timestamp_millis()
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
