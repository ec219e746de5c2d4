//! Ports as configured: the `--port` spec, and the vhost-user device each one becomes.

use std::path::PathBuf;

use virtq_vhost_user::device::DeviceConfig;
use virtq_vhost_user::net::NetModel;

use crate::dataplane::PortBackend;
use crate::generate;

/// One port as configured.
#[derive(Clone, Debug, PartialEq)]
pub struct PortSpec {
    /// Its vhost-user socket.
    pub path: PathBuf,
    /// Connect to the socket instead of listening on it.
    pub client: bool,
    /// Where its frames go.
    pub backend: PortBackend,
    /// Queue pairs.
    pub queues: u16,
    /// The MAC in its config space ([`default_mac`] if none).
    pub mac: Option<[u8; 6]>,
    /// The MTU in its config space (`VIRTIO_NET_F_MTU`).
    pub mtu: u16,
    /// Offer `VIRTIO_NET_F_MRG_RXBUF`.
    pub mrg: bool,
    /// Offer `VIRTIO_F_RING_PACKED` (packed virtqueues, §2.8).
    pub packed: bool,
    /// Offer checksum/TSO offloads (tap ports only).
    pub offload: bool,
}

/// Parses a MAC address written `52:54:00:00:00:01`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("bad MAC address {s:?}"));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC address {s:?}"))?;
    }
    Ok(mac)
}

/// Parses a port back-end: `switch`, `reflect`, `tap:NAME`, `sink` or `source:BYTES`.
pub fn parse_backend(s: &str) -> Result<PortBackend, String> {
    match s {
        "switch" => Ok(PortBackend::Switch),
        "reflect" => Ok(PortBackend::Reflect),
        "sink" => Ok(PortBackend::Sink),
        _ => {
            if let Some(name) = s.strip_prefix("tap:").filter(|n| !n.is_empty()) {
                return Ok(PortBackend::Tap(name.to_string()));
            }
            if let Some(size) = s.strip_prefix("source:") {
                return match size.parse::<usize>() {
                    Ok(n) if (generate::MIN_FRAME..=generate::MAX_FRAME).contains(&n) => Ok(PortBackend::Source(n)),
                    _ => Err(format!(
                        "source frame size {size:?} must be {}..={} bytes",
                        generate::MIN_FRAME,
                        generate::MAX_FRAME
                    )),
                };
            }
            Err(format!("unknown back-end {s:?} (switch, reflect, tap:NAME, sink or source:BYTES)"))
        }
    }
}

/// Parses a `--port` spec (see `virtq-net --help`); options not given keep `defaults`.
pub fn parse_port(spec: &str, defaults: &PortSpec) -> Result<PortSpec, String> {
    let mut p = PortSpec { path: PathBuf::new(), ..defaults.clone() };
    for item in spec.split(',') {
        let (k, v) = item.split_once('=').unwrap_or((item, ""));
        match k {
            "path" => p.path = PathBuf::from(v),
            "client" => p.client = true,
            "backend" => p.backend = parse_backend(v)?,
            "queues" => p.queues = v.parse().map_err(|_| format!("bad queues {v:?}"))?,
            "mac" => p.mac = Some(parse_mac(v)?),
            "mtu" => p.mtu = v.parse().map_err(|_| format!("bad mtu {v:?}"))?,
            "mrg" => p.mrg = v != "off",
            "packed" => p.packed = v != "off",
            "offload" => p.offload = v != "off",
            _ => return Err(format!("unknown port option {k:?}")),
        }
    }
    if p.path.as_os_str().is_empty() {
        return Err(format!("port {spec:?} has no path="));
    }
    if p.queues == 0 || p.queues > 16 {
        return Err(format!("port {spec:?}: queues must be 1..=16"));
    }
    Ok(p)
}

/// Parses a CPU list as `--pmd-cpus` takes it: `0,2`, `0-3`, `1,4-5`. Each CPU once, at
/// most 64 of them, numbers below 1024.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("bad CPU list {s:?} (e.g. 0,2 or 0-3)");
    let mut cpus = Vec::new();
    for item in s.split(',') {
        let (a, b) = item.split_once('-').unwrap_or((item, item));
        let (a, b): (usize, usize) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
        if a > b || b >= 1024 {
            return Err(bad());
        }
        for c in a..=b {
            if cpus.contains(&c) {
                return Err(format!("CPU {c} listed twice in {s:?}"));
            }
            cpus.push(c);
        }
    }
    if cpus.len() > 64 {
        return Err(format!("{s:?}: at most 64 data-plane threads"));
    }
    Ok(cpus)
}

/// A locally administered MAC for port `i` when none was given.
pub fn default_mac(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x9e, (i >> 8) as u8, i as u8]
}

/// The offloads a tap port offers: partial checksums and TSO (with ECN) both ways. The TAP
/// takes whatever the guest sends; what it hands over follows the guest's features
/// (`tap::offload_flags`). UFO and USO are left out (Linux guests no longer send UFO).
pub const TAP_OFFLOADS: virtq::VirtioFeatures = virtq::VirtioFeatures::NET_CSUM
    .union(virtq::VirtioFeatures::NET_GUEST_CSUM)
    .union(virtq::VirtioFeatures::NET_HOST_TSO4)
    .union(virtq::VirtioFeatures::NET_HOST_TSO6)
    .union(virtq::VirtioFeatures::NET_HOST_ECN)
    .union(virtq::VirtioFeatures::NET_GUEST_TSO4)
    .union(virtq::VirtioFeatures::NET_GUEST_TSO6)
    .union(virtq::VirtioFeatures::NET_GUEST_ECN);

/// The offloads a switch port offers: those of a tap port, plus UDP segmentation (`HOST_USO`,
/// `GUEST_USO4/6`) for front-ends that know it. Every receiver that lacks one gets the
/// frame completed or segmented in software (`virtq::net::offload`).
pub const SWITCH_OFFLOADS: virtq::VirtioFeatures = TAP_OFFLOADS
    .union(virtq::VirtioFeatures::NET_HOST_USO)
    .union(virtq::VirtioFeatures::NET_GUEST_USO4)
    .union(virtq::VirtioFeatures::NET_GUEST_USO6);

/// The vhost-user device port `p` (the `i`-th) is served as: features, MAC, MTU, queue pairs,
/// the announce and offload policy of its back-end.
pub fn device_config(p: &PortSpec, i: usize) -> DeviceConfig<NetModel> {
    let mut c = DeviceConfig::new(NetModel::default());
    c.model.queue_pairs = p.queues;
    c.model.config.mac = p.mac.unwrap_or_else(|| default_mac(i));
    c.model.config.mtu = p.mtu;
    if !p.mrg {
        c.model.features.remove(virtq::VirtioFeatures::NET_MRG_RXBUF);
    }
    if !p.packed {
        c.model.features.remove(virtq::VirtioFeatures::RING_PACKED);
    }
    // A port attached to a network (the switch, a TAP) announces a migrated guest: RARP for
    // QEMU's SEND_RARP, and GUEST_ANNOUNCE passed through so that a guest that can announce
    // itself does (the front-end owns the control queue that carries it).
    if matches!(p.backend, PortBackend::Switch | PortBackend::Tap(_)) {
        c.model.protocol_features |= virtq_vhost_user::message::ProtocolFeatures::RARP;
        c.model.features |= virtq::VirtioFeatures::NET_GUEST_ANNOUNCE;
    }
    // A TAP takes and gives offloaded frames (the kernel finishes checksums and segments
    // where it has to); the switch passes a frame's header through to a receiver that
    // negotiated the same offloads, and completes checksums or segments in software for one
    // that did not (`dataplane`). Reflect and the benchmark back-ends offer none.
    match p.backend {
        PortBackend::Tap(_) if p.offload => c.model.features |= TAP_OFFLOADS,
        PortBackend::Switch if p.offload => c.model.features |= SWITCH_OFFLOADS,
        _ => {}
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> PortSpec {
        PortSpec {
            path: PathBuf::new(),
            client: false,
            backend: PortBackend::Switch,
            queues: 1,
            mac: None,
            mtu: 1500,
            mrg: true,
            packed: true,
            offload: true,
        }
    }

    #[test]
    fn port_specs_parse_and_reject_nonsense() {
        let p =
            parse_port("path=/tmp/a.sock,client,backend=tap:vt0,queues=2,mac=52:54:00:00:00:07,mrg=off", &defaults())
                .unwrap();
        assert_eq!(p.path, PathBuf::from("/tmp/a.sock"));
        assert!(p.client && !p.mrg);
        assert_eq!(p.backend, PortBackend::Tap("vt0".into()));
        assert_eq!((p.queues, p.mac), (2, Some([0x52, 0x54, 0, 0, 0, 7])));
        assert!(parse_port("client", &defaults()).is_err(), "no path");
        assert!(parse_port("path=x,queues=0", &defaults()).is_err());
        assert!(parse_port("path=x,backend=tap:", &defaults()).is_err());
        assert!(parse_port("path=x,mac=1:2:3", &defaults()).is_err());
        assert!(parse_port("path=x,colour=blue", &defaults()).is_err());
        assert_eq!(parse_port("path=x,backend=sink", &defaults()).unwrap().backend, PortBackend::Sink);
        assert_eq!(parse_port("path=x,backend=source:64", &defaults()).unwrap().backend, PortBackend::Source(64));
        assert!(parse_port("path=x,backend=source:20", &defaults()).is_err(), "below the Ethernet minimum");
        assert!(parse_port("path=x,backend=source:", &defaults()).is_err());
    }

    #[test]
    fn cpu_lists_parse_and_reject_nonsense() {
        assert_eq!(parse_cpu_list("0,2").unwrap(), [0, 2]);
        assert_eq!(parse_cpu_list("1,4-6").unwrap(), [1, 4, 5, 6]);
        assert_eq!(parse_cpu_list("3").unwrap(), [3]);
        for bad in ["", "a", "1,,2", "3-1", "0,0", "0-2,1", "2048", "-1"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn device_config_follows_the_port() {
        let mut p = defaults();
        p.mrg = false;
        p.queues = 4;
        let c = device_config(&p, 3);
        assert!(!c.model.features.contains(virtq::VirtioFeatures::NET_MRG_RXBUF));
        assert_eq!(c.model.queue_pairs, 4);
        assert_eq!(c.model.config.mac, default_mac(3));
    }

    #[test]
    fn tap_and_switch_ports_offer_offloads() {
        let mut p = defaults();
        for b in [PortBackend::Reflect, PortBackend::Sink, PortBackend::Source(64)] {
            p.backend = b;
            assert!(
                !device_config(&p, 1).model.features.intersects(TAP_OFFLOADS),
                "{:?} offers no offloads",
                p.backend
            );
        }
        p.backend = PortBackend::Tap("vt0".into());
        assert!(device_config(&p, 1).model.features.contains(TAP_OFFLOADS));
        p.backend = PortBackend::Switch;
        assert!(device_config(&p, 1).model.features.contains(SWITCH_OFFLOADS));
        for spec in ["path=x,backend=tap:vt0,offload=off", "path=x,backend=switch,offload=off"] {
            let off = parse_port(spec, &defaults()).unwrap();
            assert!(!off.offload);
            assert!(!device_config(&off, 1).model.features.intersects(SWITCH_OFFLOADS), "{spec}");
        }
        // What is offered satisfies §5.1.3.1 on its own (every dependency offered too, but
        // the control queue, which the front-end keeps).
        for b in [PortBackend::Tap("vt0".into()), PortBackend::Switch] {
            p.backend = b;
            let f = device_config(&p, 1).model.features;
            assert_eq!(virtq::VirtioFeatures::negotiate_net_external_ctrl_vq(f, f), Ok(f));
        }
    }
}
