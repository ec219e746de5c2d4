//! Notification suppression arithmetic (VIRTIO 1.2 §2.7.7, §2.7.10, `virtio_ring.h`).

/// `vring_need_event`: should the other side be notified, given that it asked to be notified
/// when index `event_idx` is reached, and the index just moved from `old_idx` to `new_idx`?
///
/// True iff `event_idx` lies in `[old_idx, new_idx)` modulo 2^16, which is the batched form of
/// "notify when `idx` was equal to `used_event`" (§2.7.10): a device that publishes several
/// entries at once still notifies exactly when the driver's event index was crossed.
#[cfg_attr(not(feature = "small"), inline(always))]
pub fn vring_need_event(event_idx: u16, new_idx: u16, old_idx: u16) -> bool {
    new_idx.wrapping_sub(event_idx).wrapping_sub(1) < new_idx.wrapping_sub(old_idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_the_spec_formula() {
        // Crossing: event 5, moved 3 -> 7.
        assert!(vring_need_event(5, 7, 3));
        // Exactly at the old index (the entry at old_idx is the first new one).
        assert!(vring_need_event(3, 7, 3));
        // new_idx itself is not yet reached.
        assert!(!vring_need_event(7, 7, 3));
        // No movement never notifies.
        assert!(!vring_need_event(3, 3, 3));
        // Wrap-around at 0xffff -> 0.
        assert!(vring_need_event(0xffff, 2, 0xfffe));
        assert!(vring_need_event(0, 2, 0xfffe));
        assert!(!vring_need_event(2, 2, 0xfffe));
        // used_event = 0xffff (family 8) far from the window.
        assert!(!vring_need_event(0xffff, 10, 5));
        // used_event = used.idx - 1: the driver has seen everything, notify on the next one.
        assert!(vring_need_event(9, 10, 9));
    }

    #[test]
    fn need_event_equals_brute_force_window_membership() {
        for old in [0u16, 1, 100, 0xfff0, 0xffff] {
            for n in 0u16..40 {
                let new = old.wrapping_add(n);
                for e in 0u16..64 {
                    let event = old.wrapping_sub(8).wrapping_add(e);
                    let in_window = (0..n).any(|k| old.wrapping_add(k) == event);
                    assert_eq!(vring_need_event(event, new, old), in_window);
                }
            }
        }
    }
}
