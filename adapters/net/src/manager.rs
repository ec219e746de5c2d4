//! The ports of a running virtq-net: added at start-up and at run time (the control socket,
//! [`crate::control`]), removed at run time, and reported (`ports`, `stats`, the periodic log
//! lines). One path adds every port, whenever it comes: [`Manager::add_port`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use log::{info, warn};
use serde_json::{json, Value};
use virtq_vhost_user::backend::{BackendHandle, DeviceHandler, SocketSpec};
use virtq_vhost_user::connection::Reconnect;
use virtq_vhost_user::limited_by;
use virtq_vhost_user::net::{NetDevice, NetEvent, NetModel};
use virtq_vhost_user::ratelimit::RateLimit;

use crate::dataplane::{Announcements, Fabric, Port, PortBackend, TapCounters, ThreadStats};
use crate::nic::{Nic, NicSpec};
use crate::port::{device_config, PortSpec};
use crate::switch::PortId;
use crate::tap;

/// What a vhost-user port's handler learned of its connection, for `ports` and `stats`.
#[derive(Debug, Default)]
pub struct PortState {
    /// A front-end is connected.
    pub connected: AtomicBool,
    /// The device's ready rule holds (a queue pair runs).
    pub ready: AtomicBool,
    /// The features the front-end set (0: none yet).
    pub features: AtomicU64,
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
    /// What `stats` and `ports` report of the connection.
    state: Arc<PortState>,
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
    fn new(tap: Vec<tap::TapQueue>, announce: Arc<Announcements>, state: Arc<PortState>) -> PortHandler {
        let attached = vec![true; tap.len()];
        PortHandler { tap, attached, announce, limits: PortLimits::default(), state }
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
        self.state.ready.store(true, Ordering::Relaxed);
        limited_by!(self.limits.ready, info, "{}: ready", dev.name());
    }
    fn device_destroyed(&mut self, dev: &NetDevice) {
        self.state.ready.store(false, Ordering::Relaxed);
        limited_by!(self.limits.stopped, info, "{}: stopped", dev.name());
    }
    fn connected(&mut self, _dev: &NetDevice) {
        self.state.connected.store(true, Ordering::Relaxed);
    }
    fn disconnected(&mut self, _dev: &NetDevice) {
        self.state.connected.store(false, Ordering::Relaxed);
        self.state.features.store(0, Ordering::Relaxed);
    }

    fn features_changed(&mut self, dev: &NetDevice, features: virtq::VirtioFeatures) {
        self.state.features.store(features.bits(), Ordering::Relaxed);
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

/// A port the manager added.
struct Managed {
    id: PortId,
    /// Its name: the socket path of a vhost-user port, the TAP's name.
    name: String,
    kind: Kind,
}

enum Kind {
    Vhost {
        dev: NetDevice,
        backend: PortBackend,
        state: Arc<PortState>,
    },
    SwitchTap {
        counters: Arc<TapCounters>,
    },
    /// Its queues and counters are read through the fabric's entry.
    Nic,
}

/// The running ports: adds them (to the vhost-user loop and the data plane), removes them,
/// reports them. Lives on the main thread; the vhost-user loop and the data-plane threads
/// are reached through their handles.
pub struct Manager {
    backend: BackendHandle,
    fabric: Arc<Fabric>,
    reconnect: Reconnect,
    require_sealed_memory: bool,
    ports: Vec<Managed>,
    /// vhost-user ports added with a spec so far: the next one's default MAC.
    added: usize,
}

impl Manager {
    /// A manager adding ports to `backend` (which must be running: adding waits for it) and
    /// `fabric`; `reconnect` is the policy of client ports, `require_sealed_memory` the
    /// memory policy of every port.
    pub fn new(
        backend: BackendHandle,
        fabric: Arc<Fabric>,
        reconnect: Reconnect,
        require_sealed_memory: bool,
    ) -> Manager {
        Manager { backend, fabric, reconnect, require_sealed_memory, ports: Vec::new(), added: 0 }
    }

    /// Adds a vhost-user port as `spec` says (`--port`, `add-port`): it listens on, or
    /// connects to, `spec.path`, and its rings join the data plane. Refused if a port of that
    /// name exists or its TAP cannot be opened; nothing is left behind by a refusal.
    pub fn add_port(&mut self, spec: &PortSpec) -> Result<PortId, String> {
        let socket = if spec.client {
            SocketSpec::Client { path: spec.path.clone(), reconnect: self.reconnect }
        } else {
            SocketSpec::Server { path: spec.path.clone(), mode: None }
        };
        let id = self.add_vhost(spec.path.display().to_string(), spec, socket, self.added + 1)?;
        self.added += 1;
        Ok(id)
    }

    /// Adds the port of an inherited listening socket (`--fd`), named `name`.
    pub fn add_inherited(&mut self, name: String, spec: &PortSpec, socket: SocketSpec) -> Result<PortId, String> {
        self.add_vhost(name, spec, socket, 0)
    }

    fn add_vhost(&mut self, name: String, spec: &PortSpec, socket: SocketSpec, i: usize) -> Result<PortId, String> {
        if self.ports.iter().any(|p| p.name == name) {
            return Err(format!("{name}: a port of that name exists"));
        }
        let tap = match &spec.backend {
            PortBackend::Tap(t) => tap::open(t, spec.queues as usize).map_err(|e| format!("TAP {t}: {e}"))?,
            _ => Vec::new(),
        };
        let control =
            tap.iter().map(|q| q.try_clone()).collect::<Result<Vec<_>, _>>().map_err(|e| format!("TAP: {e}"))?;
        let announce = Arc::new(Announcements::default());
        let state = Arc::new(PortState::default());
        let mut config = device_config(spec, i);
        config.require_sealed_memory = self.require_sealed_memory;
        let handler = Box::new(PortHandler::new(control, Arc::clone(&announce), Arc::clone(&state)));
        let n = name.clone();
        let dev = self
            .backend
            .call(move |b| b.add_device(&n, config, socket, handler))
            .map_err(|e| format!("{name}: {e}"))?
            .map_err(|e| format!("{name}: {e}"))?;
        let id = self.fabric.add(Port::Vhost {
            dev: dev.clone(),
            backend: spec.backend.clone(),
            tap,
            announce,
            mtu: spec.mtu,
        });
        info!("{name}: {:?} back-end, {} queue pair(s)", spec.backend, spec.queues);
        self.ports.push(Managed { id, name, kind: Kind::Vhost { dev, backend: spec.backend.clone(), state } });
        Ok(id)
    }

    /// Attaches the host TAP `name` to the switch (`--tap`).
    pub fn add_switch_tap(&mut self, name: &str) -> Result<PortId, String> {
        if self.ports.iter().any(|p| p.name == name) {
            return Err(format!("{name}: a port of that name exists"));
        }
        let queues = tap::open(name, 1).map_err(|e| format!("TAP {name}: {e}"))?;
        let counters = Arc::new(TapCounters::default());
        let id = self.fabric.add(Port::SwitchTap { name: name.to_string(), queues, counters: Arc::clone(&counters) });
        info!("TAP {name} attached to the switch");
        self.ports.push(Managed { id, name: name.to_string(), kind: Kind::SwitchTap { counters } });
        Ok(id)
    }
    /// Attaches the host interface of `spec` to the switch (`--nic`, `add-nic`): AF_XDP, or
    /// AF_PACKET where XDP cannot attach (see [`crate::nic`]); the mode it runs in is logged
    /// and reported by `ports`.
    pub fn add_nic(&mut self, spec: &NicSpec) -> Result<PortId, String> {
        let name = spec.ifname.clone();
        if self.ports.iter().any(|p| p.name == name) {
            return Err(format!("{name}: a port of that name exists"));
        }
        let nic = Nic::open(spec).map_err(|e| format!("nic {name}: {e}"))?;
        info!("nic {name} attached to the switch: {}, {} queue(s), MTU {}", nic.mode(), nic.queues().len(), nic.mtu());
        let id = self.fabric.add(Port::Nic(nic));
        self.ports.push(Managed { id, name, kind: Kind::Nic });
        Ok(id)
    }

    /// Removes the port named `name` (a socket path, a TAP's or a NIC's name): a vhost-user port's
    /// front-end is disconnected and the device reset (its memory and fds released, its
    /// socket file removed), then every data-plane thread lets go of it at its next pass and
    /// the switch forgets its addresses. The other ports are not touched.
    pub fn remove_port(&mut self, name: &str) -> Result<(), String> {
        let Some(at) = self.ports.iter().position(|p| p.name == name) else {
            return Err(format!("no port named {name:?}"));
        };
        if let Kind::Vhost { .. } = self.ports[at].kind {
            let n = name.to_string();
            let removed = self.backend.call(move |b| b.remove_device(&n)).map_err(|e| format!("{name}: {e}"))?;
            if !removed {
                warn!("{name}: not known to the vhost-user loop");
            }
        }
        let p = self.ports.remove(at);
        self.fabric.remove(p.id);
        info!("{name}: port removed");
        Ok(())
    }

    /// Names of the ports, in the order they were added.
    pub fn names(&self) -> Vec<&str> {
        self.ports.iter().map(|p| p.name.as_str()).collect()
    }

    /// The ports and their configuration and state (the `ports` command).
    pub fn ports_json(&self) -> Value {
        Value::Array(self.ports.iter().map(|p| self.port_json(p, false)).collect())
    }

    /// Counters of every port and queue and of every data-plane thread (the `stats`
    /// command).
    pub fn stats_json(&self) -> Value {
        let threads: Vec<Value> =
            (0..self.fabric.threads()).map(|i| thread_json(i, self.fabric.thread_stats(i))).collect();
        json!({
            "threads": threads,
            "switch": { "refused_addresses": self.fabric.refused_addresses() },
            "ports": self.ports.iter().map(|p| self.port_json(p, true)).collect::<Vec<_>>(),
        })
    }
    fn port_json(&self, p: &Managed, counters: bool) -> Value {
        let entry = self.fabric.ports().get(p.id).cloned().flatten();
        let threads: Vec<usize> = entry.as_ref().map(|e| e.threads.clone()).unwrap_or_default();
        match &p.kind {
            Kind::Vhost { dev, backend, state } => {
                let features = virtq::VirtioFeatures::from_bits_retain(state.features.load(Ordering::Relaxed));
                let mut v = json!({
                    "id": p.id,
                    "name": p.name,
                    "type": "vhost-user",
                    "backend": describe_backend(backend),
                    "queue_pairs": dev.queue_pairs(),
                    "threads": threads,
                    "connected": state.connected.load(Ordering::Relaxed),
                    "ready": state.ready.load(Ordering::Relaxed),
                    "features": format!("{:#x}", features.bits()),
                    "feature_names": features.iter_names().map(|(n, _)| n).collect::<Vec<_>>(),
                });
                if counters {
                    let queues: Vec<Value> = (0..dev.queue_pairs() as usize * 2)
                        .map(|i| {
                            let c = dev.stats(i);
                            json!({
                                "queue": i,
                                "direction": if i % 2 == 0 { "rx" } else { "tx" },
                                "packets": c.packets,
                                "bytes": c.bytes,
                                "drops": c.drops,
                                "errors": c.errors,
                                "bursts": c.bursts,
                                "faults": c.faults,
                            })
                        })
                        .collect();
                    v["queues"] = Value::Array(queues);
                }
                v
            }
            Kind::Nic => {
                let Some(Port::Nic(nic)) = entry.as_deref().map(|e| &e.port) else { return Value::Null };
                let mut v = json!({
                    "id": p.id,
                    "name": p.name,
                    "type": "nic",
                    "backend": "switch",
                    "mode": nic.mode().to_string(),
                    "mtu": nic.mtu(),
                    "threads": threads,
                });
                if counters {
                    let queues: Vec<Value> = nic
                        .queues()
                        .iter()
                        .map(|q| {
                            let c = q.counters();
                            json!({
                                "queue": q.index(),
                                "rx_packets": c.rx.load(Ordering::Relaxed),
                                "tx_packets": c.tx.load(Ordering::Relaxed),
                                "rx_drops": c.rx_drops.load(Ordering::Relaxed),
                                "tx_drops": c.tx_drops.load(Ordering::Relaxed),
                                "kernel_drops": q.kernel_drops(),
                            })
                        })
                        .collect();
                    v["queues"] = Value::Array(queues);
                }
                v
            }
            Kind::SwitchTap { counters: c } => {
                let mut v =
                    json!({ "id": p.id, "name": p.name, "type": "tap", "backend": "switch", "threads": threads });
                if counters {
                    v["rx_packets"] = c.rx.load(Ordering::Relaxed).into();
                    v["tx_packets"] = c.tx.load(Ordering::Relaxed).into();
                    v["drops"] = c.drops.load(Ordering::Relaxed).into();
                }
                v
            }
        }
    }

    /// Follows changes of the ports' environment that nothing signals: a NIC's MTU (`ip link
    /// set mtu`), read again and logged when it changed. A system call per NIC: call it about
    /// once a second from the control thread.
    pub fn refresh(&self) {
        let ports = self.fabric.ports();
        for p in &self.ports {
            let Kind::Nic = p.kind else { continue };
            let Some(Some(e)) = ports.get(p.id) else { continue };
            let Port::Nic(nic) = &e.port else { continue };
            if let Some((old, new)) = nic.refresh_mtu() {
                info!("nic {}: MTU {old} -> {new}", p.name);
            }
        }
    }

    /// Per-port, per-queue and per-thread statistics as log lines (periodic, SIGUSR1, exit).
    pub fn log_stats(&self) {
        for p in &self.ports {
            match &p.kind {
                Kind::Vhost { dev, .. } => {
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
                Kind::SwitchTap { counters: c } => info!(
                    "stats tap {}: rx {} tx {} drops {}",
                    p.name,
                    c.rx.load(Ordering::Relaxed),
                    c.tx.load(Ordering::Relaxed),
                    c.drops.load(Ordering::Relaxed)
                ),
                Kind::Nic => {
                    let ports = self.fabric.ports();
                    let Some(Some(e)) = ports.get(p.id) else { continue };
                    let Port::Nic(nic) = &e.port else { continue };
                    for q in nic.queues() {
                        let c = q.counters();
                        info!(
                            "stats nic {} q{}: rx {} tx {} rx_drops {} tx_drops {} kernel_drops {}",
                            p.name,
                            q.index(),
                            c.rx.load(Ordering::Relaxed),
                            c.tx.load(Ordering::Relaxed),
                            c.rx_drops.load(Ordering::Relaxed),
                            c.tx_drops.load(Ordering::Relaxed),
                            q.kernel_drops()
                        );
                    }
                }
            }
        }
        if self.fabric.threads() > 1 {
            for i in 0..self.fabric.threads() {
                let t = thread_json(i, self.fabric.thread_stats(i));
                info!(
                    "stats thread {i} (cpu {}): rings {} frames {} busy {}% ({} {})",
                    t["cpu"],
                    t["rings"],
                    t["frames"],
                    t["busy_percent"],
                    t["busy"],
                    ThreadStats::CLOCK
                );
            }
        }
    }
}

/// A thread's counters as JSON.
fn thread_json(i: usize, s: &ThreadStats) -> Value {
    let (busy, idle) = (s.busy.load(Ordering::Relaxed), s.idle.load(Ordering::Relaxed));
    let frames = s.frames.load(Ordering::Relaxed);
    let pct = if busy + idle == 0 { 0.0 } else { (1000.0 * busy as f64 / (busy + idle) as f64).round() / 10.0 };
    json!({
        "thread": i,
        "cpu": s.cpu,
        "rings": s.rings.load(Ordering::Relaxed),
        "frames": frames,
        "busy": busy,
        "idle": idle,
        "clock": ThreadStats::CLOCK,
        "busy_percent": pct,
        "busy_per_frame": busy.checked_div(frames).unwrap_or(0),
    })
}

/// A back-end as `--port` writes it.
fn describe_backend(b: &PortBackend) -> String {
    match b {
        PortBackend::Switch => "switch".into(),
        PortBackend::Reflect => "reflect".into(),
        PortBackend::Tap(t) => format!("tap:{t}"),
        PortBackend::Sink => "sink".into(),
        PortBackend::Source(n) => format!("source:{n}"),
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
