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

use clap::Parser;
use log::{error, info};
use virtq_vhost_user::backend::{Backend, DeviceHandler, SocketSpec};
use virtq_vhost_user::connection::Reconnect;
use virtq_vhost_user::limited_by;
use virtq_vhost_user::net::{NetDevice, NetEvent, NetModel};
use virtq_vhost_user::ratelimit::RateLimit;

use virtq_net::dataplane::{Announcements, Dataplane, Port, PortBackend, TapCounters};
use virtq_net::port::{device_config, parse_backend, parse_port, PortSpec};
use virtq_net::tap;

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

/// A port's control-thread callbacks: logs, and for a tap port the TAP's offloads and which of
/// its queues are attached.
struct PortHandler {
    /// Second fds (dups) of the port's TAP queues, one per pair (tap ports; empty otherwise).
    /// `TUNSETOFFLOAD` and `TUNSETQUEUE` are issued here, on the control thread, never on the
    /// data path. Offloads change when the guest sets its features (rings are stopped then,
    /// so no frame of the data plane is in flight).
    tap: Vec<tap::TapQueue>,
    /// Whether each TAP queue is attached (all are when opened).
    attached: Vec<bool>,
    /// Where `SEND_RARP` goes: the data plane sends the announcement into the port's network.
    announce: Arc<Announcements>,
    /// This port's limits for the lines a front-end or guest can make it log, one per line:
    /// ports starting together each keep their lines, one port looping is still limited.
    limits: PortLimits,
}

/// See [`PortHandler::limits`].
#[derive(Default)]
struct PortLimits {
    ready: RateLimit,
    stopped: RateLimit,
    features: RateLimit,
    offloads: RateLimit,
    pairs: RateLimit,
    tap_queue: RateLimit,
}

impl PortHandler {
    fn new(tap: Vec<tap::TapQueue>, announce: Arc<Announcements>) -> PortHandler {
        let attached = vec![true; tap.len()];
        PortHandler { tap, attached, announce, limits: PortLimits::default() }
    }

    /// Attaches the TAP queues of the pairs the guest receives on and detaches the others
    /// (a multiqueue TAP only): the kernel spreads flows over every attached queue, and a
    /// frame read from the queue of a pair the guest disabled could only be moved to another
    /// pair after the fact. One log line per change. Attaching comes first, and the last
    /// attached queue is never detached, so the TAP keeps a queue (a TAP without one drops
    /// every frame, and kernels differ on whether they refuse to detach it).
    fn steer_tap(&mut self, dev: &NetDevice, pairs: u64) {
        if self.tap.len() < 2 {
            return;
        }
        let want = tap_queues_wanted(pairs, &self.attached);
        for (q, t) in self.tap.iter().enumerate() {
            if want[q] && !self.attached[q] {
                match t.set_attached(true) {
                    Ok(()) => {
                        self.attached[q] = true;
                        limited_by!(
                            self.limits.tap_queue,
                            info,
                            "{}: TAP queue {q} attached (the guest receives on pair {q} again)",
                            dev.name()
                        );
                    }
                    Err(e) => limited_by!(self.limits.tap_queue, warn, "{}: TAP queue {q}: attach: {e}", dev.name()),
                }
            }
        }
        for (q, t) in self.tap.iter().enumerate() {
            if !want[q] && self.attached[q] && self.attached.iter().filter(|&&a| a).count() > 1 {
                match t.set_attached(false) {
                    Ok(()) => {
                        self.attached[q] = false;
                        limited_by!(
                            self.limits.tap_queue,
                            info,
                            "{}: TAP queue {q} detached (the guest does not receive on pair {q})",
                            dev.name()
                        );
                    }
                    Err(e) => limited_by!(self.limits.tap_queue, warn, "{}: TAP queue {q}: detach: {e}", dev.name()),
                }
            }
        }
    }
}

/// Which TAP queues should be attached when the guest receives on `pairs` (bit `n`: pair `n`,
/// whose TAP queue is `n`) and `attached` are now: those of its pairs. With none of them
/// (no guest, or one that has not started a receive queue yet) every frame is dropped
/// whichever queue takes it, so the queues stay as they are rather than change twice around a
/// reconnect.
fn tap_queues_wanted(pairs: u64, attached: &[bool]) -> Vec<bool> {
    let want: Vec<bool> = (0..attached.len()).map(|q| q < 64 && pairs & (1 << q) != 0).collect();
    if want.contains(&true) {
        want
    } else {
        attached.to_vec()
    }
}

/// `pairs` as a list: `0,1`, or `none`.
fn describe_pairs(pairs: u64) -> String {
    let v: Vec<String> = (0..64).filter(|p| pairs & (1 << p) != 0).map(|p| p.to_string()).collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(",")
    }
}

impl DeviceHandler<NetModel> for PortHandler {
    fn device_ready(&mut self, dev: &NetDevice) {
        limited_by!(self.limits.ready, info, "{}: ready", dev.name());
    }
    fn device_destroyed(&mut self, dev: &NetDevice) {
        limited_by!(self.limits.stopped, info, "{}: stopped", dev.name());
    }

    fn features_changed(&mut self, dev: &NetDevice, features: virtq::VirtioFeatures) {
        limited_by!(self.limits.features, info, "{}: features {features:#x}", dev.name());
        // Any queue will do (offloads are the device's); an attached one for certain.
        if let Some(t) = self.tap.iter().zip(&self.attached).find(|(_, &a)| a).map(|(t, _)| t) {
            // What the kernel hands over must be what the guest accepts; a frame with an
            // offload the guest lacks would be refused (and counted) by the device.
            let flags = tap::offload_flags(features);
            match t.set_offload(flags) {
                Ok(()) => limited_by!(
                    self.limits.offloads,
                    info,
                    "{}: TAP offloads {}",
                    dev.name(),
                    tap::describe_offloads(flags)
                ),
                Err(e) => limited_by!(self.limits.offloads, warn, "{}: TUNSETOFFLOAD {flags:#x}: {e}", dev.name()),
            }
        }
    }
    fn event(&mut self, dev: &NetDevice, event: NetEvent) {
        match event {
            NetEvent::Announce(mac) => self.announce.push(mac),
            NetEvent::RxPairsChanged(pairs) => {
                if dev.queue_pairs() > 1 {
                    limited_by!(
                        self.limits.pairs,
                        info,
                        "{}: guest receives on pair(s) {}",
                        dev.name(),
                        describe_pairs(pairs)
                    );
                }
                self.steer_tap(dev, pairs);
            }
        }
    }
}

/// Per-port and per-queue statistics (packets, bytes, drops, errors); the counters are shared
/// with the data plane, so this runs on the main thread at any time.
fn print_stats(devs: &[NetDevice], taps: &[(String, Arc<TapCounters>)]) {
    for dev in devs {
        for i in 0..dev.queue_pairs() as usize * 2 {
            let c = dev.stats(i);
            let dir = if i % 2 == 0 { "rx" } else { "tx" };
            info!(
                "stats {} q{i}({dir}): packets {} bytes {} drops {} errors {} bursts {} (average {:.1}) faults {}",
                dev.name(),
                c.packets,
                c.bytes,
                c.drops,
                c.errors,
                c.bursts,
                c.packets as f64 / c.bursts.max(1) as f64,
                c.faults
            );
        }
    }
    for (name, c) in taps {
        info!(
            "stats tap {name}: rx {} tx {} drops {}",
            c.rx.load(Ordering::Relaxed),
            c.tx.load(Ordering::Relaxed),
            c.drops.load(Ordering::Relaxed)
        );
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
    if specs.is_empty() && args.fd.is_none() {
        specs.push(PortSpec { path: PathBuf::from("/tmp/virtq-net.sock"), ..defaults.clone() });
    }
    let reconnect = Reconnect { enabled: !args.no_reconnect, ..Reconnect::default() };

    let mut backend = Backend::new().map_err(|e| format!("control loop: {e}"))?;
    let mut ports = Vec::new();
    let mut add = |name: String, spec: &PortSpec, socket: SocketSpec, i: usize| -> Result<(), String> {
        let tap = match &spec.backend {
            PortBackend::Tap(t) => tap::open(t, spec.queues as usize).map_err(|e| format!("TAP {t}: {e}"))?,
            _ => Vec::new(),
        };
        let control =
            tap.iter().map(|q| q.try_clone()).collect::<Result<Vec<_>, _>>().map_err(|e| format!("TAP: {e}"))?;
        let announce = Arc::new(Announcements::default());
        let mut config = device_config(spec, i);
        config.require_sealed_memory = args.require_sealed_memory;
        let dev = backend
            .add_device(&name, config, socket, Box::new(PortHandler::new(control, Arc::clone(&announce))))
            .map_err(|e| format!("{name}: {e}"))?;
        info!("{name}: {:?} back-end, {} queue pair(s)", spec.backend, spec.queues);
        ports.push(Port::Vhost { dev, backend: spec.backend.clone(), tap, announce, mtu: spec.mtu });
        Ok(())
    };
    if let Some(fd) = args.fd {
        // SAFETY: `--fd` names a socket the parent passed at exec for this program to serve on;
        // nothing else in the process owns the number.
        let socket = unsafe { SocketSpec::inherited(fd) }.map_err(|e| format!("--fd {fd}: {e}"))?;
        add(format!("fd:{fd}"), &defaults, socket, 0)?;
    }
    for (i, spec) in specs.iter().enumerate() {
        let socket = if spec.client {
            SocketSpec::Client { path: spec.path.clone(), reconnect }
        } else {
            SocketSpec::Server { path: spec.path.clone(), mode: None }
        };
        add(spec.path.display().to_string(), spec, socket, i + 1)?;
    }
    let mut tap_counters = Vec::new();
    for t in &args.taps {
        let queues = tap::open(t, 1).map_err(|e| format!("TAP {t}: {e}"))?;
        info!("TAP {t} attached to the switch");
        let counters = Arc::new(TapCounters::default());
        tap_counters.push((t.clone(), Arc::clone(&counters)));
        ports.push(Port::SwitchTap { name: t.clone(), queues, counters });
    }
    let devs: Vec<NetDevice> = ports
        .iter()
        .filter_map(|p| match p {
            Port::Vhost { dev, .. } => Some(dev.clone()),
            Port::SwitchTap { .. } => None,
        })
        .collect();

    install_signals();
    let handle = backend.handle();
    let control =
        thread::Builder::new().name("vhost-user".into()).spawn(move || backend.run()).map_err(|e| e.to_string())?;

    let stop = Arc::new(AtomicBool::new(false));
    let dp_stop = Arc::clone(&stop);
    let busy = args.busy_poll;
    let data = thread::Builder::new()
        .name("dataplane".into())
        .spawn(move || {
            let mut dp = Dataplane::new(ports, busy);
            dp.run(&dp_stop);
        })
        .map_err(|e| e.to_string())?;

    let mut last_stats = Instant::now();
    while !STOP.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(50));
        let periodic = args.stats_interval > 0 && last_stats.elapsed() >= Duration::from_secs(args.stats_interval);
        if DUMP_STATS.swap(false, Ordering::SeqCst) || periodic {
            last_stats = Instant::now();
            print_stats(&devs, &tap_counters);
        }
    }
    info!("stopping");
    stop.store(true, Ordering::SeqCst);
    data.join().map_err(|_| "data plane panicked".to_string())?;
    handle.shutdown();
    control.join().map_err(|_| "control loop panicked".to_string())?.map_err(|e| e.to_string())?;
    print_stats(&devs, &tap_counters);
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_queues_follow_the_pairs_the_guest_receives_on() {
        // `ethtool -L combined 1` on two pairs: queue 1 goes; back to two: it returns.
        assert_eq!(tap_queues_wanted(0b01, &[true, true]), [true, false]);
        assert_eq!(tap_queues_wanted(0b11, &[true, false]), [true, true]);
        // Pair 1 alone: queue 0 can go too.
        assert_eq!(tap_queues_wanted(0b10, &[true, true]), [false, true]);
        // No pair (disconnect, or rings not started yet): nothing changes, so the TAP is never
        // left without a queue.
        assert_eq!(tap_queues_wanted(0, &[false, true]), [false, true]);
        assert_eq!(tap_queues_wanted(0, &[true, true]), [true, true]);
        // Pairs the TAP has no queue for do not count.
        assert_eq!(tap_queues_wanted(0b100, &[true, false]), [true, false]);
        assert_eq!(describe_pairs(0b101), "0,2");
        assert_eq!(describe_pairs(0), "none");
    }
}
