//! Queues that own their memory (`virtq::owned`): a device struct holding memory and queues,
//! moved between uses, serving both layouts; the state survives a panic in the user's code.

mod common;

use common::{features, setup, Guest, GPA};
use virtq::testing::{packed_layout, Buf, PackedDriver};
use virtq::{OwnedPackedQueue, OwnedSplitQueue, RegionTable};

type Mem = RegionTable<8>;

/// A device as a user would write one: its queues in its own struct, no lifetime.
struct Device {
    split: OwnedSplitQueue<Mem>,
    packed: OwnedPackedQueue<Mem, 64>,
    bytes: usize,
}

impl Device {
    /// Reads and completes every available chain of both queues; returns the chains served.
    fn poll(&mut self) -> usize {
        let mut buf = [0u8; 64];
        let mut n = 0;
        let bytes = &mut self.bytes;
        n += self.split.with(|q| {
            let mut n = 0;
            while let Ok(Some(c)) = q.pop_read(&mut buf) {
                *bytes += c.bytes as usize;
                q.push(c.head, 0);
                n += 1;
            }
            let _notify = q.publish();
            n
        });
        let mut q = self.packed.queue();
        while let Ok(Some(c)) = q.pop_read(&mut buf) {
            self.bytes += c.bytes as usize;
            q.push(c.head, 0);
            n += 1;
        }
        let _notify = q.publish();
        n
    }
}

#[test]
fn a_device_owns_its_queues_and_can_be_moved_between_bursts() {
    let g = Guest::new(256 * 1024);
    let (cfg, mut split_driver) = setup(&g, 16);
    let packed_gpa = GPA + 128 * 1024;
    let (pcfg, pdata) = packed_layout(packed_gpa, 16);
    let mut packed_driver = PackedDriver::new(&g.mem, pcfg, pdata, GPA + 256 * 1024 - pdata);
    let dev = Device {
        split: OwnedSplitQueue::new(g.mem.clone(), cfg, features()).unwrap(),
        packed: OwnedPackedQueue::new(g.mem.clone(), pcfg, features() | virtq::VirtioFeatures::RING_PACKED).unwrap(),
        bytes: 0,
    };
    let mut devices = vec![dev];
    for round in 0..3u8 {
        split_driver.add_chain(&[Buf::readable(&[round; 10])]);
        packed_driver.add_chain(&[Buf::readable(&[round; 7]), Buf::readable(&[round; 3])]);
        assert_eq!(devices[0].poll(), 2);
        // Moved (the Vec reallocates, then into a Box and back): the queues keep their place.
        devices.reserve(100);
        let b = Box::new(devices.pop().unwrap());
        devices.push(*b);
    }
    assert_eq!(devices[0].bytes, 60);
    assert_eq!(split_driver.used_idx(), 3);
    for _ in 0..3 {
        assert!(packed_driver.pop_used().is_some());
    }
    assert_eq!(devices[0].split.config().size, 16);
}

#[test]
fn the_split_state_is_put_back_when_the_users_code_panics() {
    let g = Guest::new(64 * 1024);
    let (cfg, mut driver) = setup(&g, 8);
    let mut q = OwnedSplitQueue::new(&g.mem, cfg, features()).unwrap();
    driver.add_chain(&[Buf::readable(b"one")]);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        q.with(|q| {
            let mut buf = [0u8; 8];
            let c = q.pop_read(&mut buf).unwrap().unwrap();
            q.push(c.head, 0);
            panic!("the device's code failed mid-burst");
        })
    }));
    assert!(r.is_err());
    // The position moved past the chain taken before the panic; the next burst goes on.
    driver.add_chain(&[Buf::readable(b"two")]);
    let got = q.with(|q| {
        let mut buf = [0u8; 8];
        let c = q.pop_read(&mut buf).unwrap().unwrap();
        q.push(c.head, 0);
        let _notify = q.publish();
        buf[..c.bytes as usize].to_vec()
    });
    assert_eq!(got, b"two");
    assert_eq!(driver.used_idx(), 2);
    let (mem, state) = q.into_parts();
    assert_eq!((state.next_avail(), state.next_used()), (2, 2));
    assert_eq!(mem.len(), 1);
}
