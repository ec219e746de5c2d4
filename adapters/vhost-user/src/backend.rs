//! The control loop: many vhost-user sockets in one process on one mio poll, each a device
//! with its own protocol state and device model ([`crate::model`]); devices of different types
//! can share one loop. The data path runs on other threads through the handles the models
//! build ([`DeviceModel::DataPath`], e.g. [`crate::net::NetDevice`]); the control loop only
//! handles messages.
//!
//! A connection that breaks or misbehaves is torn down alone: its device is reset (rings
//! stopped, fds closed, memory unmapped once the data path lets go), the handler is told, and
//! the socket goes back to listening (server) or reconnects with backoff (client).
//!
//! A front-end that shrinks its guest memory file under a running device costs only that
//! device: the `SIGBUS` handler ([`crate::memory::fault`]) wakes this loop through an eventfd,
//! and the loop stops the device whose memory faulted
//! ([`VhostUserDevice::check_memory`]), logs one line and tells the front-end where it can.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use virtq::VirtioFeatures;

use crate::connection::{self, ConnectionError, Listener, MessageReader, Reconnect};
use crate::device::{DeviceConfig, DeviceEvent, Response, VhostUserDevice};
use crate::memory::{fault, MemoryFault};
use crate::message::{FrontendMessage, Header, MessageError};
use crate::model::DeviceModel;
use crate::ratelimit::RateLimit;
use crate::{limited, limited_by};

/// Where a device's socket comes from.
#[derive(Debug)]
pub enum SocketSpec {
    /// Listen on a path (the back-end is the server; QEMU `-chardev socket,path=…` without
    /// `server=on`). The socket file is replaced if stale, and removed on shutdown.
    Server {
        /// Socket path.
        path: PathBuf,
        /// File mode to apply, e.g. `0o660`.
        mode: Option<u32>,
    },
    /// Connect to a front-end that listens (QEMU `server=on`, DPDK virtio-user `server=1`).
    Client {
        /// Socket path.
        path: PathBuf,
        /// Reconnect policy (on by default).
        reconnect: Reconnect,
    },
    /// An inherited listening socket (`--fd`; see [`SocketSpec::inherited`]).
    ListenFd(OwnedFd),
}

impl SocketSpec {
    /// [`SocketSpec::ListenFd`] over the listening socket a parent passed as fd number `fd`
    /// (QEMU's back-end program convention `--fd`, libvirt, systemd socket activation), once
    /// `fd` is known to be one: an `OwnedFd` must never hold -1, nor a number that is not open
    /// (a later `open` would reuse it, and dropping the `OwnedFd` would close that file), and a
    /// socket that does not listen would fail every `accept`. `InvalidInput` for a negative
    /// number, a socket that does not listen or is not a unix stream socket (vhost-user passes
    /// fds, `SCM_RIGHTS`); the OS error (`EBADF`, `ENOTSOCK`) otherwise.
    ///
    /// # Safety
    /// `fd` must be owned by nothing else in this process (as a number a parent passed at exec
    /// is): the returned spec closes it when dropped.
    pub unsafe fn inherited(fd: std::os::fd::RawFd) -> std::io::Result<SocketSpec> {
        use std::io::{Error, ErrorKind};
        if fd < 0 {
            return Err(Error::new(ErrorKind::InvalidInput, "not a file descriptor"));
        }
        let option = |name: libc::c_int| -> std::io::Result<libc::c_int> {
            let mut value: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into the local `value`; any fd
            // number may be asked (EBADF if it is not open, ENOTSOCK if it is not a socket).
            let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, name, (&raw mut value).cast(), &mut len) };
            if r != 0 {
                return Err(Error::last_os_error());
            }
            Ok(value)
        };
        if option(libc::SO_DOMAIN)? != libc::AF_UNIX || option(libc::SO_TYPE)? != libc::SOCK_STREAM {
            return Err(Error::new(ErrorKind::InvalidInput, "not a unix stream socket"));
        }
        if option(libc::SO_ACCEPTCONN)? == 0 {
            return Err(Error::new(ErrorKind::InvalidInput, "the socket is not listening"));
        }
        // SAFETY: `fd` is an open socket (getsockopt succeeded), and by the caller's promise
        // nothing else in this process owns the number.
        Ok(SocketSpec::ListenFd(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }
}

/// Callbacks from the control loop (all optional), for a device of type `M`. They run on the
/// control thread; keep them short. `dev` is the device's data path handle
/// ([`DeviceModel::DataPath`]).
pub trait DeviceHandler<M: DeviceModel>: Send {
    /// The device's ready rule holds ([`DeviceModel::is_ready`]; virtio-net: a queue pair is
    /// started and enabled, traffic can flow).
    fn device_ready(&mut self, _dev: &M::DataPath) {}
    /// The device stopped (disconnect, reset, rings stopped).
    fn device_destroyed(&mut self, _dev: &M::DataPath) {}
    /// A vring was enabled or disabled.
    fn vring_state_changed(&mut self, _dev: &M::DataPath, _index: u16, _enabled: bool) {}
    /// The front-end set features.
    fn features_changed(&mut self, _dev: &M::DataPath, _features: VirtioFeatures) {}
    /// A front-end connected (server) or the back-end connected to one (client).
    fn connected(&mut self, _dev: &M::DataPath) {}
    /// The connection ended (the device was reset first).
    fn disconnected(&mut self, _dev: &M::DataPath) {}
    /// What the device model reports ([`DeviceModel::Event`]; virtio-net:
    /// [`crate::net::NetEvent`]), in order with the other callbacks of the same request; what
    /// [`DeviceModel::sync`] reports comes last.
    fn event(&mut self, _dev: &M::DataPath, _event: M::Event) {}
}

/// A handler that does nothing.
pub struct NoHandler;
impl<M: DeviceModel> DeviceHandler<M> for NoHandler {}

/// A device as the control loop serves it, whatever its model: the protocol state, the data
/// path handle and the owner's callbacks.
struct Served<M: DeviceModel> {
    name: String,
    device: VhostUserDevice<M>,
    data_path: M::DataPath,
    handler: Box<dyn DeviceHandler<M>>,
}

/// What the control loop needs of a [`Served`] device, so that devices of different models
/// share one loop.
trait ServedDevice: Send {
    fn name(&self) -> &str;
    fn handle(&mut self, header: &Header, msg: Result<FrontendMessage, MessageError>) -> Response;
    fn reset(&mut self);
    fn check_log(&mut self) -> Option<usize>;
    fn check_memory(&mut self) -> Option<MemoryFault>;
    fn config_change_notice(&self) -> Option<(BorrowedFd<'_>, Vec<u8>)>;
    /// Brings the data path up to date, then runs the callbacks for what happened.
    fn dispatch_events(&mut self);
    /// Tells the handler the connection came or went.
    fn connection(&mut self, up: bool);
}

impl<M: DeviceModel> ServedDevice for Served<M> {
    fn name(&self) -> &str {
        &self.name
    }
    fn handle(&mut self, header: &Header, msg: Result<FrontendMessage, MessageError>) -> Response {
        self.device.handle(header, msg)
    }
    fn reset(&mut self) {
        self.device.reset();
    }
    fn check_log(&mut self) -> Option<usize> {
        self.device.check_log()
    }
    fn check_memory(&mut self) -> Option<MemoryFault> {
        self.device.check_memory()
    }
    fn config_change_notice(&self) -> Option<(BorrowedFd<'_>, Vec<u8>)> {
        self.device.config_change_notice()
    }
    fn dispatch_events(&mut self) {
        // Every change of a ring's state comes through here (after each request, and after a
        // reset): the data path learns of it before any callback runs.
        let synced = self.device.model_mut().sync(&self.data_path);
        let (dev, handler) = (&self.data_path, &mut self.handler);
        for ev in self.device.take_events() {
            match ev {
                DeviceEvent::Ready => handler.device_ready(dev),
                DeviceEvent::NotReady => handler.device_destroyed(dev),
                DeviceEvent::VringStateChanged { index, enabled } => handler.vring_state_changed(dev, index, enabled),
                DeviceEvent::FeaturesChanged(f) => handler.features_changed(dev, f),
                DeviceEvent::Model(e) => handler.event(dev, e),
            }
        }
        if let Some(e) = synced {
            handler.event(dev, e);
        }
    }
    fn connection(&mut self, up: bool) {
        if up {
            self.handler.connected(&self.data_path);
        } else {
            self.handler.disconnected(&self.data_path);
        }
    }
}

/// Fields drop in declaration order: the fds of a half-read message go before the socket
/// closes (see `teardown`).
struct Conn {
    reader: MessageReader,
    stream: mio::net::UnixStream,
}

struct Slot {
    spec: SocketSpec,
    listener: Option<Listener>,
    conn: Option<Conn>,
    device: Box<dyn ServedDevice>,
    reconnect_at: Option<Instant>,
    attempts: u32,
    /// This device's limits for the lines every device logs, one per kind: many devices
    /// reconnecting at once each keep theirs, one device looping is still limited.
    limits: SlotLimits,
}

/// See `Slot::limits`.
#[derive(Default)]
struct SlotLimits {
    connected: RateLimit,
    reset: RateLimit,
    fault: RateLimit,
    error: RateLimit,
}

/// Work handed to the loop from another thread ([`BackendHandle::call`]).
type Command = Box<dyn FnOnce(&mut Backend) + Send>;

/// Stops a running [`Backend`], or runs work on its thread, from another thread.
#[derive(Clone)]
pub struct BackendHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    commands: Arc<Mutex<Option<Vec<Command>>>>,
}

impl BackendHandle {
    /// Asks the loop to end: connections are closed, rings stopped, socket files removed.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }

    /// Runs `f` on the loop's thread, between two rounds of messages, and returns its result:
    /// how devices are added ([`Backend::add_device`]) and removed ([`Backend::remove_device`])
    /// while the loop runs. Waits for the loop, so it must not be called from the loop's own
    /// thread (a handler callback); `Err` if the loop has ended or ends before running `f`.
    pub fn call<R: Send + 'static>(&self, f: impl FnOnce(&mut Backend) -> R + Send + 'static) -> io::Result<R> {
        let ended = || io::Error::new(io::ErrorKind::BrokenPipe, "the vhost-user loop has ended");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        match &mut *self.commands.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(queue) => queue.push(Box::new(move |b: &mut Backend| {
                let _ = tx.send(f(b));
            })),
            None => return Err(ended()),
        }
        self.waker.wake()?;
        // A loop that ends drops the commands it did not run, and with them `tx`.
        rx.recv().map_err(|_| ended())
    }
}

const WAKER: Token = Token(usize::MAX);
const FAULTS: Token = Token(usize::MAX - 1);

/// The eventfd the `SIGBUS` handler writes to after it replaced a faulted region; unregistered
/// from the handler before it is closed.
struct FaultNotifier(OwnedFd);

impl FaultNotifier {
    fn new() -> io::Result<FaultNotifier> {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if !fault::add_notifier(fd.as_raw_fd()) {
            warn!("vhost-user: too many control loops for the memory fault notifier; faults are found per burst only");
        }
        Ok(FaultNotifier(fd))
    }

    fn drain(&self) {
        let mut v = 0u64;
        // SAFETY: reads the 8-byte counter of our non-blocking eventfd into `v`.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

impl Drop for FaultNotifier {
    fn drop(&mut self) {
        fault::remove_notifier(self.0.as_raw_fd());
    }
}

/// The vhost-user control loop.
pub struct Backend {
    poll: Poll,
    /// Devices by id (an id is never reused: a removed device leaves `None`, so a poll token
    /// of a removed device can never reach another one).
    slots: Vec<Option<Slot>>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    /// Work from other threads; `None` once the loop has ended.
    commands: Arc<Mutex<Option<Vec<Command>>>>,
    faults: FaultNotifier,
}

impl Drop for Backend {
    fn drop(&mut self) {
        // However the loop ended (or if it never ran), callers waiting in or coming to
        // `BackendHandle::call` are told so instead of waiting forever.
        self.commands.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

impl Backend {
    /// An empty back-end.
    pub fn new() -> io::Result<Backend> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let faults = FaultNotifier::new()?;
        poll.registry().register(&mut SourceFd(&faults.0.as_raw_fd()), FAULTS, Interest::READABLE)?;
        Ok(Backend {
            poll,
            slots: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            waker,
            commands: Arc::new(Mutex::new(Some(Vec::new()))),
            faults,
        })
    }

    /// A handle to stop the loop or run work on it.
    pub fn handle(&self) -> BackendHandle {
        BackendHandle {
            stop: Arc::clone(&self.stop),
            waker: Arc::clone(&self.waker),
            commands: Arc::clone(&self.commands),
        }
    }

    /// Registers a device of model `M` on a socket and returns its data path handle (for
    /// virtio-net a [`crate::net::NetDevice`]). Servers listen at once; clients connect on the
    /// first loop iteration (and keep trying with backoff if the front-end is not there yet).
    /// `name` identifies the device in logs and to [`Backend::remove_device`]; a name already
    /// in use is refused (`AlreadyExists`), before anything is bound, and so is a server
    /// socket path that names another device's socket file under any spelling;
    /// `Listener::bind` also refuses a socket file that another process still listens on.
    pub fn add_device<M: DeviceModel>(
        &mut self,
        name: &str,
        config: DeviceConfig<M>,
        spec: SocketSpec,
        handler: Box<dyn DeviceHandler<M>>,
    ) -> io::Result<M::DataPath> {
        if self.slots.iter().flatten().any(|s| s.device.name() == name) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("a device named {name:?} exists")));
        }
        if let SocketSpec::Server { path, .. } = &spec {
            // The same socket file under another spelling (`dir/./a.sock`, a symlinked
            // directory): refused by name here, before `Listener::bind`'s probe would connect
            // to the other device's listener (which would then accept the probe as a
            // front-end).
            let wanted = resolved(path);
            let other = self.slots.iter().flatten().find(|s| {
                s.listener.as_ref().is_some_and(|l| !l.path().as_os_str().is_empty() && resolved(l.path()) == wanted)
            });
            if let Some(other) = other {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} is the socket of device {:?}", path.display(), other.device.name()),
                ));
            }
        }
        let device = VhostUserDevice::new(config);
        let data_path = device.model().data_path(name, device.vring_shared());
        let id = self.slots.len();
        let listener = match &spec {
            SocketSpec::Server { path, mode } => Some(Listener::bind(path, *mode)?),
            SocketSpec::ListenFd(fd) => Some(Listener::from_fd(fd.try_clone()?)),
            SocketSpec::Client { .. } => None,
        };
        let mut slot = Slot {
            spec,
            listener,
            conn: None,
            device: Box::new(Served { name: name.to_string(), device, data_path: data_path.clone(), handler }),
            reconnect_at: Some(Instant::now()),
            attempts: 0,
            limits: SlotLimits::default(),
        };
        if let Some(l) = slot.listener.as_mut() {
            self.poll.registry().register(l.source(), Token(2 * id), Interest::READABLE)?;
            slot.reconnect_at = None;
        }
        self.slots.push(Some(slot));
        Ok(data_path)
    }

    /// Removes the device named `name`, as if the back-end were shutting down for it alone:
    /// its front-end is disconnected (the device reset first: rings stopped, its memory and
    /// fds released), its socket closed (a listening socket's file removed), and its handler
    /// told ([`DeviceHandler::device_destroyed`] if it was ready,
    /// [`DeviceHandler::disconnected`] if a front-end was connected). Other devices are not
    /// touched. `false` if there is no such device.
    pub fn remove_device(&mut self, name: &str) -> bool {
        let Some(id) = self.slots.iter().position(|s| s.as_ref().is_some_and(|s| s.device.name() == name)) else {
            return false;
        };
        self.teardown(id, "device removed", false);
        if let Some(mut slot) = self.slots[id].take() {
            if let Some(l) = slot.listener.as_mut() {
                let _ = self.poll.registry().deregister(l.source());
            }
            info!("vhost-user {name}: removed");
        }
        true
    }

    /// Names of the devices, in the order they were added.
    pub fn device_names(&self) -> Vec<String> {
        self.slots.iter().flatten().map(|s| s.device.name().to_string()).collect()
    }

    /// Runs the work other threads handed over ([`BackendHandle::call`]).
    fn run_commands(&mut self) {
        let commands = self.commands.lock().unwrap_or_else(|p| p.into_inner()).as_mut().map(std::mem::take);
        for c in commands.into_iter().flatten() {
            c(self);
        }
    }

    /// Runs until [`BackendHandle::shutdown`].
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(64);
        while !self.stop.load(Ordering::Acquire) {
            let timeout = self.next_timer();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                let t = ev.token();
                if t == WAKER {
                    self.run_commands();
                    continue;
                }
                if t == FAULTS {
                    self.faults.drain();
                    self.memory_faults();
                    continue;
                }
                let id = t.0 / 2;
                if t.0 % 2 == 0 {
                    self.accept(id);
                } else {
                    self.serve(id);
                }
            }
            self.reconnect_due();
        }
        for id in 0..self.slots.len() {
            self.teardown(id, "shutdown", false);
        }
        self.slots.clear();
        // Callers waiting in `BackendHandle::call` learn that the loop ended, and later ones
        // are refused.
        self.commands.lock().unwrap_or_else(|p| p.into_inner()).take();
        Ok(())
    }

    /// Stops every device whose guest memory lost its pages, once per fault: one log line, the
    /// rings' error eventfds (in `check_memory`), and a config change message where the
    /// front-end negotiated the back-end channel. A dirty log that lost its pages costs one
    /// log line and nothing else (the device keeps running, unlogged).
    fn memory_faults(&mut self) {
        for slot in self.slots.iter_mut().flatten() {
            if let Some(addr) = slot.device.check_log() {
                limited_by!(
                    slot.limits.fault,
                    error,
                    "vhost-user {}: the dirty log's file shrank under the mapping (SIGBUS at {addr:#x}); the device's writes are no longer logged, so a migration in progress loses pages until the front-end sends a new SET_LOG_BASE",
                    slot.device.name()
                );
            }
            let Some(f) = slot.device.check_memory() else { continue };
            limited_by!(
                slot.limits.fault,
                error,
                "vhost-user {}: {f}; device stopped (NEEDS_RESET) until the front-end sends a new memory table or resets it",
                slot.device.name()
            );
            if let Some((fd, msg)) = slot.device.config_change_notice() {
                if let Err(e) = connection::try_send(fd.as_raw_fd(), &msg) {
                    limited_by!(slot.limits.error, warn, "vhost-user {}: back-end channel: {e}", slot.device.name());
                }
            }
        }
    }

    fn next_timer(&self) -> Option<Duration> {
        let now = Instant::now();
        self.slots.iter().flatten().filter_map(|s| s.reconnect_at).map(|t| t.saturating_duration_since(now)).min()
    }

    fn accept(&mut self, id: usize) {
        loop {
            let Some(slot) = self.slots.get_mut(id).and_then(Option::as_mut) else { return };
            let Some(l) = slot.listener.as_ref() else { return };
            match l.accept() {
                Ok(Some(stream)) => {
                    if slot.conn.is_some() {
                        limited_by!(
                            slot.limits.error,
                            warn,
                            "vhost-user {}: second front-end refused (one connection per device)",
                            slot.device.name()
                        );
                        drop(stream);
                        continue;
                    }
                    limited_by!(slot.limits.connected, info, "vhost-user {}: front-end connected", slot.device.name());
                    self.attach(id, stream);
                }
                Ok(None) => return,
                Err(e) => {
                    limited_by!(slot.limits.error, warn, "vhost-user {}: accept: {e}", slot.device.name());
                    return;
                }
            }
        }
    }

    fn attach(&mut self, id: usize, mut stream: mio::net::UnixStream) {
        if let Err(e) = self.poll.registry().register(&mut stream, Token(2 * id + 1), Interest::READABLE) {
            limited!(warn, "vhost-user: register: {e}");
            return;
        }
        let Some(slot) = self.slots[id].as_mut() else { return };
        slot.conn = Some(Conn { stream, reader: MessageReader::new() });
        slot.attempts = 0;
        slot.reconnect_at = None;
        slot.device.connection(true);
    }

    fn reconnect_due(&mut self) {
        let now = Instant::now();
        for id in 0..self.slots.len() {
            let Some(slot) = self.slots[id].as_mut() else { continue };
            if slot.conn.is_some() || slot.reconnect_at.is_none_or(|t| t > now) {
                continue;
            }
            let SocketSpec::Client { path, reconnect } = &slot.spec else { continue };
            match connection::connect(path) {
                Ok(stream) => {
                    limited_by!(
                        slot.limits.connected,
                        info,
                        "vhost-user {}: connected to the front-end",
                        slot.device.name()
                    );
                    self.attach(id, stream);
                }
                Err(e) => {
                    let delay = reconnect.delay(slot.attempts);
                    slot.attempts = slot.attempts.saturating_add(1);
                    if slot.attempts == 1 || slot.attempts.is_multiple_of(20) {
                        info!("vhost-user {}: connect: {e}; retrying", slot.device.name());
                    }
                    slot.reconnect_at = Some(now + delay);
                }
            }
        }
    }

    fn serve(&mut self, id: usize) {
        loop {
            let Some(slot) = self.slots.get_mut(id).and_then(Option::as_mut) else { return };
            let Some(conn) = slot.conn.as_mut() else { return };
            let raw = match conn.reader.read(conn.stream.as_raw_fd()) {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(ConnectionError::Closed) => {
                    self.teardown(id, "front-end disconnected", true);
                    return;
                }
                Err(e) => {
                    limited_by!(slot.limits.error, warn, "vhost-user {}: {e}", slot.device.name());
                    self.teardown(id, "connection error", true);
                    return;
                }
            };
            let msg = FrontendMessage::decode(&raw.header, &raw.payload, raw.fds);
            let resp = slot.device.handle(&raw.header, msg);
            if let Some(reply) = &resp.reply {
                let fds: Vec<RawFd> = resp.fds.iter().map(|f| f.as_raw_fd()).collect();
                if let Err(e) = connection::send_with_fds(conn.stream.as_raw_fd(), reply, &fds) {
                    limited_by!(slot.limits.error, warn, "vhost-user {}: reply: {e}", slot.device.name());
                    self.teardown(id, "reply failed", true);
                    return;
                }
            }
            self.dispatch_events(id);
            if resp.close {
                self.teardown(id, "protocol error", true);
                return;
            }
        }
    }

    fn dispatch_events(&mut self, id: usize) {
        if let Some(slot) = self.slots[id].as_mut() {
            slot.device.dispatch_events();
        }
    }

    fn teardown(&mut self, id: usize, why: &str, reconnect: bool) {
        let Some(slot) = self.slots[id].as_mut() else { return };
        let mut conn = slot.conn.take();
        if let Some(conn) = &mut conn {
            limited_by!(slot.limits.reset, info, "vhost-user {}: {why}; device reset", slot.device.name());
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
        // Everything the front-end sent (memory table, eventfds, the fds of a half-read
        // message) is released before the socket closes, so a front-end that sees the close
        // can count on it.
        slot.device.reset();
        let was_connected = conn.is_some();
        drop(conn);
        self.dispatch_events(id);
        let Some(slot) = self.slots[id].as_mut() else { return };
        if was_connected {
            slot.device.connection(false);
        }
        if let SocketSpec::Client { reconnect: policy, .. } = &slot.spec {
            if reconnect && policy.enabled {
                slot.reconnect_at = Some(Instant::now() + policy.delay(0));
            } else {
                slot.reconnect_at = None;
            }
        }
    }
}

/// `path` with its directory resolved (`.`/`..`, symlinks): two spellings of one socket file
/// give the same result. The file name itself is kept (the socket may not exist yet); a
/// directory that cannot be resolved is kept as written.
fn resolved(path: &std::path::Path) -> std::path::PathBuf {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    match (std::fs::canonicalize(dir), path.file_name()) {
        (Ok(d), Some(f)) => d.join(f),
        _ => path.to_path_buf(),
    }
}
