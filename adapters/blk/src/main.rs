//! `virtq-blk`: a vhost-user-blk back-end over a raw image file.
//!
//! It follows the conventions of QEMU's vhost-user back-end programs (vhost-user.rst "Backend
//! program conventions"): `--socket-path` or `--fd`, `--print-capabilities` (type `block`,
//! features `read-only` and `blk-file`), no daemonizing, and a clean exit on SIGTERM/SIGINT
//! (rings stopped, socket file removed).
//!
//! ```sh
//! virtq-blk --socket-path /tmp/vblk.sock --image disk.img --queues 2
//! qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \
//!   -chardev socket,id=c0,path=/tmp/vblk.sock -device vhost-user-blk-pci,chardev=c0,num-queues=2
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::Parser;
use log::{error, info};
use virtq_blk::{run_data_path, BlkDevice, BlkEvent, BlkModel, Image};
use virtq_vhost_user::backend::{Backend, DeviceHandler, SocketSpec};
use virtq_vhost_user::connection::Reconnect;
use virtq_vhost_user::device::DeviceConfig;

/// Command line.
#[derive(Parser, Debug)]
#[command(name = "virtq-blk", version, about = "vhost-user-blk back-end over a raw image file")]
struct Args {
    /// vhost-user socket to listen on (or, with --client, to connect to).
    #[arg(long = "socket-path", value_name = "PATH")]
    socket_path: Option<PathBuf>,

    /// An inherited listening socket fd (libvirt / systemd socket activation).
    #[arg(long, value_name = "FD")]
    fd: Option<i32>,

    /// The raw image file (or block device) to serve.
    #[arg(long, alias = "blk-file", value_name = "PATH")]
    image: Option<PathBuf>,

    /// Serve the image read-only (VIRTIO_BLK_F_RO; writes, discards and write zeroes fail).
    #[arg(long)]
    read_only: bool,

    /// Request queues (VIRTIO_BLK_F_MQ when more than 1).
    #[arg(long, default_value_t = 1)]
    queues: u16,

    /// The device ID string the guest reads (GET_ID; at most 20 bytes, e.g. /dev/disk/by-id).
    #[arg(long, default_value = "virtq-blk")]
    serial: String,

    /// Connect to the socket path instead of listening (the front-end is the server: QEMU
    /// `server=on`); reconnects with backoff.
    #[arg(long)]
    client: bool,

    /// With --client: give up after the first disconnect instead of reconnecting.
    #[arg(long)]
    no_reconnect: bool,

    /// Busy-poll the rings instead of backing off when idle.
    #[arg(long)]
    busy_poll: bool,

    /// Log level: error, warn, info, debug, trace (or RUST_LOG).
    #[arg(long, default_value = "info")]
    log_level: String,

    /// Print the back-end's capabilities as JSON (vhost-user.json) and exit.
    #[arg(long)]
    print_capabilities: bool,
}

/// `--print-capabilities` (vhost-user.json `VHostUserBackendCapabilitiesBlock`): the
/// `--read-only` and `--blk-file` options are supported.
const CAPABILITIES: &str = "{\n  \"type\": \"block\",\n  \"features\": [\n    \"read-only\",\n    \"blk-file\"\n  ]\n}";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signals() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe); sigaction with an
    // empty mask and SA_RESTART.
    unsafe {
        for sig in [libc::SIGTERM, libc::SIGINT] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Control-thread callbacks: log lines.
struct Handler;

impl DeviceHandler<BlkModel> for Handler {
    fn device_ready(&mut self, dev: &BlkDevice) {
        info!("{}: ready", dev.name());
    }
    fn device_destroyed(&mut self, dev: &BlkDevice) {
        info!("{}: stopped", dev.name());
    }
    fn event(&mut self, dev: &BlkDevice, event: BlkEvent) {
        let BlkEvent::WriteCache(writeback) = event;
        info!("{}: write cache {}", dev.name(), if writeback { "writeback" } else { "writethrough" });
    }
}

fn print_stats(dev: &BlkDevice) {
    for q in 0..dev.num_queues() {
        let c = dev.stats(q);
        info!(
            "stats {} q{q}: requests {} read {} bytes written {} bytes errors {} faults {}",
            dev.name(),
            c.requests,
            c.read_bytes,
            c.written_bytes,
            c.errors,
            c.faults
        );
    }
}

fn run(args: Args) -> Result<(), String> {
    let path = args.image.as_ref().ok_or("--image (or --blk-file) is required")?;
    let image = Image::open(path, args.read_only).map_err(|e| format!("{}: {e}", path.display()))?;
    info!(
        "{}: {} sectors ({} MiB){}, {} queue(s)",
        path.display(),
        image.capacity(),
        image.capacity() / 2048,
        if args.read_only { ", read-only" } else { "" },
        args.queues
    );
    let model = BlkModel::new(Arc::new(image), args.queues, &args.serial);
    let (name, socket) = match (args.fd, &args.socket_path) {
        (Some(fd), None) => (format!("fd:{fd}"), {
            // SAFETY: `--fd` names a socket the parent passed at exec for this program to
            // serve on; nothing else in the process owns the number.
            unsafe { SocketSpec::inherited(fd) }.map_err(|e| format!("--fd {fd}: {e}"))?
        }),
        (None, Some(p)) if args.client => {
            let reconnect = Reconnect { enabled: !args.no_reconnect, ..Reconnect::default() };
            (p.display().to_string(), SocketSpec::Client { path: p.clone(), reconnect })
        }
        (None, Some(p)) => (p.display().to_string(), SocketSpec::Server { path: p.clone(), mode: None }),
        _ => return Err("exactly one of --socket-path and --fd is required".into()),
    };

    let mut backend = Backend::new().map_err(|e| format!("control loop: {e}"))?;
    let dev = backend
        .add_device(&name, DeviceConfig::new(model), socket, Box::new(Handler))
        .map_err(|e| format!("{name}: {e}"))?;

    install_signals();
    let handle = backend.handle();
    let control =
        thread::Builder::new().name("vhost-user".into()).spawn(move || backend.run()).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let dp_stop = Arc::clone(&stop);
    let devs = vec![dev.clone()];
    let busy = args.busy_poll;
    let data = thread::Builder::new()
        .name("dataplane".into())
        .spawn(move || run_data_path(&devs, &dp_stop, busy))
        .map_err(|e| e.to_string())?;

    while !STOP.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(50));
    }
    info!("stopping");
    stop.store(true, Ordering::SeqCst);
    data.join().map_err(|_| "data plane panicked".to_string())?;
    handle.shutdown();
    control.join().map_err(|_| "control loop panicked".to_string())?.map_err(|e| e.to_string())?;
    print_stats(&dev);
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_capabilities {
        println!("{CAPABILITIES}");
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
