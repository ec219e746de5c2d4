//! Feature bits (VIRTIO 1.2 §6 reserved bits, §5.1.3 network device bits) and negotiation.

use core::fmt;

use bitflags::bitflags;

bitflags! {
    /// Device feature bits: the transport/ring bits of §6 and the virtio-net bits of §5.1.3.
    /// Unknown bits are retained so that negotiation can report them.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct VirtioFeatures: u64 {
        /// Device handles packets with partial checksum (net, bit 0).
        const NET_CSUM = 1 << 0;
        /// Driver handles packets with partial checksum (net, bit 1).
        const NET_GUEST_CSUM = 1 << 1;
        /// Control channel offloads reconfiguration (net, bit 2).
        const NET_CTRL_GUEST_OFFLOADS = 1 << 2;
        /// Device reports its maximum MTU (net, bit 3).
        const NET_MTU = 1 << 3;
        /// Device has a MAC address (net, bit 5).
        const NET_MAC = 1 << 5;
        /// Driver can receive TSOv4 (net, bit 7).
        const NET_GUEST_TSO4 = 1 << 7;
        /// Driver can receive TSOv6 (net, bit 8).
        const NET_GUEST_TSO6 = 1 << 8;
        /// Driver can receive TSO with ECN (net, bit 9).
        const NET_GUEST_ECN = 1 << 9;
        /// Driver can receive UFO (net, bit 10).
        const NET_GUEST_UFO = 1 << 10;
        /// Device can receive TSOv4 (net, bit 11).
        const NET_HOST_TSO4 = 1 << 11;
        /// Device can receive TSOv6 (net, bit 12).
        const NET_HOST_TSO6 = 1 << 12;
        /// Device can receive TSO with ECN (net, bit 13).
        const NET_HOST_ECN = 1 << 13;
        /// Device can receive UFO (net, bit 14).
        const NET_HOST_UFO = 1 << 14;
        /// Driver can merge receive buffers (net, bit 15).
        const NET_MRG_RXBUF = 1 << 15;
        /// Configuration status field is available (net, bit 16).
        const NET_STATUS = 1 << 16;
        /// Control channel is available (net, bit 17).
        const NET_CTRL_VQ = 1 << 17;
        /// Control channel RX mode support (net, bit 18).
        const NET_CTRL_RX = 1 << 18;
        /// Control channel VLAN filtering (net, bit 19).
        const NET_CTRL_VLAN = 1 << 19;
        /// Driver can send gratuitous packets (net, bit 21).
        const NET_GUEST_ANNOUNCE = 1 << 21;
        /// Multiqueue with automatic receive steering (net, bit 22).
        const NET_MQ = 1 << 22;
        /// Set MAC address through the control channel (net, bit 23).
        const NET_CTRL_MAC_ADDR = 1 << 23;
        /// Notify when the device runs out of available buffers (legacy/transitional, bit 24).
        const NOTIFY_ON_EMPTY = 1 << 24;
        /// Any descriptor layout (legacy, bit 27; implied by VERSION_1).
        const ANY_LAYOUT = 1 << 27;
        /// Indirect descriptors (§2.7.5.3, bit 28).
        const RING_INDIRECT_DESC = 1 << 28;
        /// `used_event` / `avail_event` notification suppression (§2.7.7, bit 29).
        const RING_EVENT_IDX = 1 << 29;
        /// vhost-user: the back-end supports protocol features (bit 30, vhost-user only).
        const VHOST_USER_PROTOCOL_FEATURES = 1 << 30;
        /// VIRTIO 1.0+ compliance (bit 32).
        const VERSION_1 = 1 << 32;
        /// Device accesses memory through a platform IOMMU (bit 33).
        const ACCESS_PLATFORM = 1 << 33;
        /// Packed virtqueue layout (bit 34). Not supported by this core.
        const RING_PACKED = 1 << 34;
        /// Buffers are used in the order they were made available (§2.7.9, bit 35).
        const IN_ORDER = 1 << 35;
        /// Memory ordering as for a real device on the platform (bit 36).
        const ORDER_PLATFORM = 1 << 36;
        /// Device supports single-root I/O virtualization (bit 37).
        const SR_IOV = 1 << 37;
        /// Driver passes extra data in notifications (bit 38).
        const NOTIFICATION_DATA = 1 << 38;
        /// Individual queues can be reset (bit 40).
        const RING_RESET = 1 << 40;
        /// Driver can receive USOv4 (net, bit 54).
        const NET_GUEST_USO4 = 1 << 54;
        /// Driver can receive USOv6 (net, bit 55).
        const NET_GUEST_USO6 = 1 << 55;
        /// Device can receive USO (net, bit 56).
        const NET_HOST_USO = 1 << 56;
        /// Device reports its link speed and duplex (net, bit 63).
        const NET_SPEED_DUPLEX = 1 << 63;
    }
}

/// Why a driver's feature selection cannot be accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FeatureError {
    /// The driver acknowledged bits the device did not offer (§2.2: "MUST NOT accept a feature
    /// which the device did not offer").
    NotOffered {
        /// The bits not offered.
        bits: u64,
    },
    /// A feature was acknowledged without a feature it depends on (§5.1.3.1).
    MissingDependency {
        /// The feature acknowledged.
        feature: u64,
        /// The feature it requires.
        requires: u64,
    },
}

impl fmt::Display for FeatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeatureError::NotOffered { bits } => write!(f, "features {bits:#x} were not offered"),
            FeatureError::MissingDependency { feature, requires } => {
                write!(f, "feature {feature:#x} requires {requires:#x}")
            }
        }
    }
}

/// The first entries of [`NET_DEPENDENCIES`]: the offloads and what they require.
const NET_OFFLOAD_DEPENDENCIES: usize = 9;

/// §5.1.3.1 "The driver MUST NOT negotiate …" rules: (feature, a feature it requires). The
/// offload rules come first ([`NET_OFFLOAD_DEPENDENCIES`]).
const NET_DEPENDENCIES: &[(VirtioFeatures, VirtioFeatures)] = &[
    (VirtioFeatures::NET_GUEST_TSO4, VirtioFeatures::NET_GUEST_CSUM),
    (VirtioFeatures::NET_GUEST_TSO6, VirtioFeatures::NET_GUEST_CSUM),
    (VirtioFeatures::NET_GUEST_UFO, VirtioFeatures::NET_GUEST_CSUM),
    (VirtioFeatures::NET_HOST_TSO4, VirtioFeatures::NET_CSUM),
    (VirtioFeatures::NET_HOST_TSO6, VirtioFeatures::NET_CSUM),
    (VirtioFeatures::NET_HOST_UFO, VirtioFeatures::NET_CSUM),
    (VirtioFeatures::NET_HOST_USO, VirtioFeatures::NET_CSUM),
    (VirtioFeatures::NET_GUEST_USO4, VirtioFeatures::NET_GUEST_CSUM),
    (VirtioFeatures::NET_GUEST_USO6, VirtioFeatures::NET_GUEST_CSUM),
    (VirtioFeatures::NET_CTRL_RX, VirtioFeatures::NET_CTRL_VQ),
    (VirtioFeatures::NET_CTRL_VLAN, VirtioFeatures::NET_CTRL_VQ),
    (VirtioFeatures::NET_GUEST_ANNOUNCE, VirtioFeatures::NET_CTRL_VQ),
    (VirtioFeatures::NET_MQ, VirtioFeatures::NET_CTRL_VQ),
    (VirtioFeatures::NET_CTRL_MAC_ADDR, VirtioFeatures::NET_CTRL_VQ),
    (VirtioFeatures::NET_CTRL_GUEST_OFFLOADS, VirtioFeatures::NET_CTRL_VQ),
];

/// GUEST_ECN requires one of GUEST_TSO4/TSO6; HOST_ECN one of HOST_TSO4/TSO6 (§5.1.3.1).
const NET_ANY_OF: &[(VirtioFeatures, VirtioFeatures)] = &[
    (VirtioFeatures::NET_GUEST_ECN, VirtioFeatures::NET_GUEST_TSO4.union(VirtioFeatures::NET_GUEST_TSO6)),
    (VirtioFeatures::NET_HOST_ECN, VirtioFeatures::NET_HOST_TSO4.union(VirtioFeatures::NET_HOST_TSO6)),
];

impl VirtioFeatures {
    /// Accepts a driver's feature selection for a network device: `acked` must be a subset of
    /// `offered` and respect §5.1.3.1's dependencies. Returns the negotiated set.
    pub fn negotiate_net(offered: VirtioFeatures, acked: VirtioFeatures) -> Result<VirtioFeatures, FeatureError> {
        let extra = acked.bits() & !offered.bits();
        if extra != 0 {
            return Err(FeatureError::NotOffered { bits: extra });
        }
        for &(feature, requires) in NET_DEPENDENCIES {
            if acked.contains(feature) && !acked.contains(requires) {
                return Err(FeatureError::MissingDependency { feature: feature.bits(), requires: requires.bits() });
            }
        }
        for &(feature, any_of) in NET_ANY_OF {
            if acked.contains(feature) && !acked.intersects(any_of) {
                return Err(FeatureError::MissingDependency { feature: feature.bits(), requires: any_of.bits() });
            }
        }
        Ok(acked)
    }

    /// This selection without the offload features whose §5.1.3.1 dependency is missing
    /// (`GUEST_TSO4` without `GUEST_CSUM`, `HOST_ECN` without `HOST_TSO4`/`TSO6`, ...), applied
    /// until nothing changes.
    ///
    /// A driver "MUST NOT" accept those, but Linux does when the device offers them and QEMU
    /// forwards it: `-device virtio-net-pci,guest_csum=off` leaves `GUEST_TSO4` offered, the
    /// driver acks it, and QEMU sends it to a vhost-user back-end as is. Failing that guest's
    /// `SET_FEATURES` would leave it without a network; an offload that cannot be used alone
    /// is simply not used (the device sends no GSO frame to a driver without `GUEST_CSUM`,
    /// and takes none from one without `CSUM`).
    #[must_use]
    pub fn without_orphan_offloads(self) -> VirtioFeatures {
        let mut f = self;
        loop {
            let before = f;
            for &(feature, requires) in &NET_DEPENDENCIES[..NET_OFFLOAD_DEPENDENCIES] {
                if f.contains(feature) && !f.contains(requires) {
                    f.remove(feature);
                }
            }
            for &(feature, any_of) in NET_ANY_OF {
                if f.contains(feature) && !f.intersects(any_of) {
                    f.remove(feature);
                }
            }
            if f == before {
                return f;
            }
        }
    }

    /// [`negotiate_net`](Self::negotiate_net) for a device whose control virtqueue is served by
    /// someone else. A vhost-user back-end is one: the front-end keeps `VIRTIO_NET_F_CTRL_VQ`
    /// and the control queue to itself (QEMU answers the guest's control commands) and
    /// acknowledges `MQ`, `CTRL_RX`, `GUEST_ANNOUNCE`, ... to the back-end without it. The
    /// §5.1.3.1 dependencies on `CTRL_VQ` are taken as met there; every other rule applies.
    pub fn negotiate_net_external_ctrl_vq(
        offered: VirtioFeatures,
        acked: VirtioFeatures,
    ) -> Result<VirtioFeatures, FeatureError> {
        let extra = acked.bits() & !offered.bits();
        if extra != 0 {
            return Err(FeatureError::NotOffered { bits: extra });
        }
        let ctrl = VirtioFeatures::NET_CTRL_VQ;
        VirtioFeatures::negotiate_net(offered | ctrl, acked | ctrl).map(|_| acked)
    }

    /// Features a queue of this core implements and may offer: indirect descriptors, event
    /// index, in-order, notify-on-empty, VERSION_1.
    pub const RING_SUPPORTED: VirtioFeatures = VirtioFeatures::RING_INDIRECT_DESC
        .union(VirtioFeatures::RING_EVENT_IDX)
        .union(VirtioFeatures::IN_ORDER)
        .union(VirtioFeatures::NOTIFY_ON_EMPTY)
        .union(VirtioFeatures::VERSION_1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU with `guest_csum=off` forwards a Linux driver's `GUEST_TSO4` (and `GUEST_ECN`)
    /// without `GUEST_CSUM`: dropped, with everything that depended on them, and the rest
    /// stays.
    #[test]
    fn orphan_offloads_are_dropped_until_nothing_changes() {
        use VirtioFeatures as F;
        let acked =
            F::VERSION_1 | F::NET_CSUM | F::NET_HOST_TSO4 | F::NET_HOST_ECN | F::NET_GUEST_TSO4 | F::NET_GUEST_ECN;
        let f = acked.without_orphan_offloads();
        assert_eq!(f, F::VERSION_1 | F::NET_CSUM | F::NET_HOST_TSO4 | F::NET_HOST_ECN);
        assert_eq!(VirtioFeatures::negotiate_net_external_ctrl_vq(acked, f), Ok(f));
        // HOST_ECN hangs on HOST_TSO4, which hangs on CSUM.
        assert_eq!((F::NET_HOST_TSO4 | F::NET_HOST_ECN | F::NET_MRG_RXBUF).without_orphan_offloads(), F::NET_MRG_RXBUF);
        // A valid selection is unchanged; non-offload rules are not this function's.
        let valid = F::NET_CSUM | F::NET_HOST_TSO6 | F::NET_GUEST_CSUM | F::NET_GUEST_USO4 | F::NET_MQ;
        assert_eq!(valid.without_orphan_offloads(), valid);
    }

    #[test]
    fn spec_bit_positions() {
        assert_eq!(VirtioFeatures::NET_MRG_RXBUF.bits(), 1 << 15);
        assert_eq!(VirtioFeatures::RING_INDIRECT_DESC.bits(), 1 << 28);
        assert_eq!(VirtioFeatures::RING_EVENT_IDX.bits(), 1 << 29);
        assert_eq!(VirtioFeatures::VERSION_1.bits(), 1 << 32);
        assert_eq!(VirtioFeatures::IN_ORDER.bits(), 1 << 35);
        assert_eq!(VirtioFeatures::NET_MQ.bits(), 1 << 22);
    }

    #[test]
    fn negotiation_rejects_unoffered_and_missing_dependencies() {
        let offered = VirtioFeatures::VERSION_1
            | VirtioFeatures::NET_CSUM
            | VirtioFeatures::NET_HOST_TSO4
            | VirtioFeatures::NET_HOST_ECN
            | VirtioFeatures::NET_MRG_RXBUF;
        assert_eq!(
            VirtioFeatures::negotiate_net(offered, VirtioFeatures::VERSION_1 | VirtioFeatures::NET_MQ),
            Err(FeatureError::NotOffered { bits: VirtioFeatures::NET_MQ.bits() })
        );
        assert!(matches!(
            VirtioFeatures::negotiate_net(offered, VirtioFeatures::NET_HOST_TSO4),
            Err(FeatureError::MissingDependency { .. })
        ));
        assert!(matches!(
            VirtioFeatures::negotiate_net(offered, VirtioFeatures::NET_HOST_ECN | VirtioFeatures::NET_CSUM),
            Err(FeatureError::MissingDependency { .. })
        ));
        let ok = VirtioFeatures::VERSION_1
            | VirtioFeatures::NET_CSUM
            | VirtioFeatures::NET_HOST_TSO4
            | VirtioFeatures::NET_HOST_ECN;
        assert_eq!(VirtioFeatures::negotiate_net(offered, ok), Ok(ok));
    }

    #[test]
    fn with_the_control_queue_elsewhere_mq_needs_no_ctrl_vq_but_the_rest_still_applies() {
        let offered = VirtioFeatures::VERSION_1 | VirtioFeatures::NET_MQ | VirtioFeatures::NET_HOST_TSO4;
        let mq = VirtioFeatures::VERSION_1 | VirtioFeatures::NET_MQ;
        assert!(VirtioFeatures::negotiate_net(offered, mq).is_err());
        assert_eq!(VirtioFeatures::negotiate_net_external_ctrl_vq(offered, mq), Ok(mq));
        assert_eq!(
            VirtioFeatures::negotiate_net_external_ctrl_vq(offered, mq | VirtioFeatures::NET_CTRL_VQ),
            Err(FeatureError::NotOffered { bits: VirtioFeatures::NET_CTRL_VQ.bits() })
        );
        assert!(matches!(
            VirtioFeatures::negotiate_net_external_ctrl_vq(offered, VirtioFeatures::NET_HOST_TSO4),
            Err(FeatureError::MissingDependency { .. })
        ));
    }
}
