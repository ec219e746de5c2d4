//! An L2 learning switch: learns which port each source MAC address lives behind, forwards
//! unicast frames to that port, and floods broadcast, multicast and unknown destinations to
//! every other port. Entries age out, so a VM that moves (or a port that goes away) is
//! relearned.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use virtq_vhost_user::limited;

/// A switch port number.
pub type PortId = usize;

/// Where a frame goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Forward {
    /// To one port.
    Port(PortId),
    /// To every port but the ingress one.
    Flood,
    /// Nowhere (destination behind the ingress port, or a runt frame).
    Drop,
}

/// The MAC table.
///
/// The table is a `HashMap` with std's keyed SipHash: source addresses are chosen by guests,
/// and a predictable hash would let one guest make every lookup slow. A lookup then costs
/// about 100 instructions, which was a third of a 64-byte frame's cost between two guests
/// (`benches/switchbench.sh`); the frames of a burst mostly share their source and
/// destination, so the switch remembers the last source it learned and the last destination
/// it looked up, valid for one `now` (the burst's) and until the table changes.
#[derive(Debug)]
pub struct Switch {
    table: HashMap<[u8; 6], (PortId, Instant)>,
    aging: Duration,
    capacity: usize,
    /// Most addresses one port may hold.
    per_port: u32,
    /// Addresses each port holds (index: port).
    counts: Vec<u32>,
    /// Addresses not learned because of the limits.
    refused: u64,
    /// The last source learned: `(mac, port, now)`; learning it again at the same `now` would
    /// change nothing. Addresses as [`mac_key`]s: one compare.
    last_learned: Option<(u64, PortId, Instant)>,
    /// The last destination looked up: `(mac, where it is, now, generation)`.
    last_lookup: Option<(u64, Option<PortId>, Instant, u64)>,
    /// Bumped whenever an address is added, moves or is removed: a remembered lookup is valid
    /// only in the generation it was made in.
    generation: u64,
}

impl Switch {
    /// A switch whose entries expire after `aging`, whose table holds at most `capacity`
    /// addresses, and where one port holds at most `per_port` of them: a guest spraying
    /// random source addresses fills its own share and nothing else.
    pub fn new(aging: Duration, capacity: usize, per_port: u32) -> Switch {
        Switch {
            table: HashMap::new(),
            aging,
            capacity,
            per_port,
            counts: Vec::new(),
            refused: 0,
            last_learned: None,
            last_lookup: None,
            generation: 0,
        }
    }

    /// Learns the frame's source and decides where it goes.
    pub fn forward(&mut self, ingress: PortId, frame: &[u8], now: Instant) -> Forward {
        if frame.len() < 14 {
            return Forward::Drop;
        }
        let dst: [u8; 6] = frame[0..6].try_into().expect("6 bytes");
        let src: [u8; 6] = frame[6..12].try_into().expect("6 bytes");
        let (dst_key, src_key) = (mac_key(dst), mac_key(src));
        if src[0] & 1 == 0 && self.last_learned != Some((src_key, ingress, now)) {
            self.learn(src, ingress, now);
            self.last_learned = Some((src_key, ingress, now));
        }
        if dst[0] & 1 != 0 {
            return Forward::Flood; // broadcast or multicast
        }
        let at = match self.last_lookup {
            Some((mac, at, t, g)) if mac == dst_key && t == now && g == self.generation => at,
            _ => {
                let at = match self.table.get(&dst) {
                    Some(&(port, seen)) if now.duration_since(seen) < self.aging => Some(port),
                    _ => None,
                };
                self.last_lookup = Some((dst_key, at, now, self.generation));
                at
            }
        };
        match at {
            Some(port) if port == ingress => Forward::Drop,
            Some(port) => Forward::Port(port),
            None => Forward::Flood,
        }
    }

    /// Records that `mac` is behind `port`, within the limits: a new address is not learned
    /// while the table holds `capacity` addresses or `port` holds `per_port` (frames to it are
    /// flooded, as to any unknown address, until entries age out). So one guest spraying
    /// source addresses can neither push other ports' addresses out nor make learning cost
    /// more than a lookup: nothing on this path scans the table.
    fn learn(&mut self, mac: [u8; 6], port: PortId, now: Instant) {
        let aging = self.aging;
        if self.counts.len() <= port {
            self.counts.resize(port + 1, 0);
        }
        match self.table.get_mut(&mac) {
            Some((was, seen)) if *was == port => {
                // Back after aging out (not yet expired): lookups find it again.
                if now.duration_since(*seen) >= aging {
                    self.generation += 1;
                }
                *seen = now;
            }
            Some(entry) => {
                let was = entry.0;
                if self.counts[port] >= self.per_port {
                    // Moved to a port that holds its share: not learned, and the old place is
                    // forgotten (frames to it would go to the wrong port).
                    self.table.remove(&mac);
                    self.counts[was] -= 1;
                    self.refuse(port);
                } else {
                    *entry = (port, now);
                    self.counts[was] -= 1;
                    self.counts[port] += 1;
                }
                self.generation += 1;
            }
            None => {
                if self.table.len() >= self.capacity || self.counts[port] >= self.per_port {
                    self.refuse(port);
                    return;
                }
                self.table.insert(mac, (port, now));
                self.counts[port] += 1;
                self.generation += 1;
            }
        }
    }

    #[cold]
    fn refuse(&mut self, port: PortId) {
        self.refused += 1;
        limited!(
            warn,
            "virtq-net: switch port {port}: address not learned (the port holds {} of {} addresses, the table {} of {})",
            self.counts[port],
            self.per_port,
            self.table.len(),
            self.capacity
        );
    }

    /// Addresses not learned because of the limits (see [`Switch::new`]).
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Drops entries older than the aging time.
    pub fn expire(&mut self, now: Instant) {
        let aging = self.aging;
        let before = self.table.len();
        let counts = &mut self.counts;
        self.table.retain(|_, (port, seen)| {
            let keep = now.duration_since(*seen) < aging;
            if !keep {
                counts[*port] -= 1;
            }
            keep
        });
        if self.table.len() != before {
            self.generation += 1;
        }
    }

    /// Forgets every address behind `port` (the port was removed): frames to them are
    /// flooded until they are learned elsewhere, and a new port that gets the same number
    /// starts with none.
    pub fn forget_port(&mut self, port: PortId) {
        let before = self.table.len();
        self.table.retain(|_, (p, _)| *p != port);
        if let Some(c) = self.counts.get_mut(port) {
            *c = 0;
        }
        if self.table.len() != before {
            self.generation += 1;
        }
        self.last_learned = None;
        self.last_lookup = None;
    }

    /// Number of learned addresses.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.len()
    }
}

/// A MAC address as one integer, for cheap compares.
#[inline]
fn mac_key(mac: [u8; 6]) -> u64 {
    let mut b = [0u8; 8];
    b[..6].copy_from_slice(&mac);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(60, 0);
        f
    }

    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
    const BCAST: [u8; 6] = [0xff; 6];

    #[test]
    fn learns_floods_unknown_and_broadcast_then_forwards() {
        let mut s = Switch::new(Duration::from_secs(300), 16, 16);
        let t = Instant::now();
        assert_eq!(s.forward(0, &frame(B, A), t), Forward::Flood, "B unknown");
        assert_eq!(s.forward(1, &frame(BCAST, B), t), Forward::Flood, "broadcast");
        assert_eq!(s.forward(0, &frame(B, A), t), Forward::Port(1));
        assert_eq!(s.forward(1, &frame(A, B), t), Forward::Port(0));
        assert_eq!(s.forward(0, &frame(A, B), t), Forward::Drop, "destination behind the ingress");
        assert_eq!(s.forward(0, &[0u8; 13], t), Forward::Drop, "runt");
        assert_eq!(s.forward(0, &frame([1, 0, 0x5e, 0, 0, 1], A), t), Forward::Flood, "multicast");
    }

    #[test]
    fn a_removed_port_is_forgotten_and_its_number_starts_clean() {
        let mut s = Switch::new(Duration::from_secs(300), 16, 1);
        let t = Instant::now();
        s.forward(1, &frame(BCAST, B), t);
        assert_eq!(s.forward(0, &frame(B, A), t), Forward::Port(1), "B behind port 1");
        s.forget_port(1);
        assert_eq!(s.len(), 1, "only A is left");
        // Same `now`: the remembered lookup must not still say port 1.
        assert_eq!(s.forward(0, &frame(B, A), t), Forward::Flood, "B unknown again");
        // Port 1's share (one address) is free for the port that gets the number next.
        let c = [2, 0, 0, 0, 0, 0xc];
        s.forward(1, &frame(BCAST, c), t);
        assert_eq!(s.forward(0, &frame(c, A), t), Forward::Port(1));
    }

    /// Within one burst (one `now`) the remembered source and lookup never hide a change:
    /// an address learned, moved, or back after aging out is seen by the next frame.
    #[test]
    fn what_the_switch_remembers_within_a_burst_follows_the_table() {
        let mut s = Switch::new(Duration::from_secs(10), 16, 16);
        let t = Instant::now();
        assert_eq!(s.forward(1, &frame(A, B), t), Forward::Flood, "A unknown");
        assert_eq!(s.forward(1, &frame(A, B), t), Forward::Flood, "still unknown");
        assert_eq!(s.forward(0, &frame(B, A), t), Forward::Port(1), "A learned, B known");
        assert_eq!(s.forward(1, &frame(A, B), t), Forward::Port(0), "the next frame to A is unicast");
        assert_eq!(s.forward(2, &frame(BCAST, A), t), Forward::Flood, "A moves to port 2");
        assert_eq!(s.forward(1, &frame(A, B), t), Forward::Port(2), "and is found there");
        // A ages out; B's frame floods; A comes back on port 2 in the same burst.
        let later = t + Duration::from_secs(11);
        assert_eq!(s.forward(1, &frame(A, B), later), Forward::Flood, "aged out");
        assert_eq!(s.forward(2, &frame(BCAST, A), later), Forward::Flood);
        assert_eq!(s.forward(1, &frame(A, B), later), Forward::Port(2), "back after aging out");
        s.expire(later + Duration::from_secs(11));
        assert_eq!(s.forward(1, &frame(A, B), later), Forward::Flood, "expired");
    }

    #[test]
    fn entries_age_out_and_moves_are_relearned() {
        let mut s = Switch::new(Duration::from_secs(10), 16, 16);
        let t = Instant::now();
        s.forward(1, &frame(BCAST, B), t);
        assert_eq!(s.forward(0, &frame(B, A), t + Duration::from_secs(5)), Forward::Port(1));
        assert_eq!(s.forward(0, &frame(B, A), t + Duration::from_secs(11)), Forward::Flood, "aged");
        s.forward(2, &frame(BCAST, B), t + Duration::from_secs(12));
        assert_eq!(s.forward(0, &frame(B, A), t + Duration::from_secs(12)), Forward::Port(2), "moved");
    }

    #[test]
    fn table_is_bounded_and_multicast_sources_are_not_learned() {
        let mut s = Switch::new(Duration::from_secs(300), 4, 4);
        let t = Instant::now();
        for i in 0..100u8 {
            s.forward(0, &frame(BCAST, [2, 0, 0, 0, 1, i]), t + Duration::from_millis(i as u64));
        }
        assert_eq!(s.len(), 4);
        assert_eq!(s.refused(), 96);
        // The first four stay; the others are flooded to, as unknown addresses.
        assert_eq!(s.forward(1, &frame([2, 0, 0, 0, 1, 3], B), t + Duration::from_secs(1)), Forward::Port(0));
        assert_eq!(s.forward(1, &frame([2, 0, 0, 0, 1, 99], B), t + Duration::from_secs(1)), Forward::Flood);
        let before = s.len();
        s.forward(0, &frame(BCAST, [3, 0, 0, 0, 0, 1]), t);
        assert_eq!(s.len(), before, "group address as source is not learned");
    }

    /// A guest spraying source addresses fills its port's share: the other ports' addresses
    /// stay, and are still reached by unicast.
    #[test]
    fn a_port_spraying_addresses_cannot_push_out_the_others() {
        let mut s = Switch::new(Duration::from_secs(300), 16, 4);
        let t = Instant::now();
        s.forward(1, &frame(BCAST, B), t);
        s.forward(2, &frame(BCAST, A), t);
        for i in 0..200u8 {
            s.forward(0, &frame(BCAST, [2, 0, 0, 0, 7, i]), t + Duration::from_millis(i as u64));
        }
        assert_eq!(s.len(), 2 + 4, "port 0 holds its four");
        assert_eq!(s.forward(0, &frame(B, [2, 0, 0, 0, 7, 0]), t), Forward::Port(1));
        assert_eq!(s.forward(1, &frame(A, B), t), Forward::Port(2));
        // A moves to port 0, which is full: not learned there, and no longer sent to port 2.
        assert_eq!(s.forward(0, &frame(BCAST, A), t), Forward::Flood);
        assert_eq!(s.forward(1, &frame(A, B), t), Forward::Flood, "A's old place forgotten");
        // Once port 0's addresses age out, it learns again.
        let later = t + Duration::from_secs(301);
        s.forward(1, &frame(BCAST, B), later);
        s.expire(later);
        assert_eq!(s.len(), 1, "only B, refreshed");
        s.forward(0, &frame(BCAST, A), later);
        assert_eq!(s.forward(1, &frame(A, B), later), Forward::Port(0));
    }
}
