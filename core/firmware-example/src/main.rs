//! virtq in firmware: a virtio-net device served from a static memory window.
//!
//! On a DPU or SmartNIC, the host's virtio driver places its rings and buffers in memory the
//! device reaches through a fixed window (a BAR or DMA aperture). Here that window is a static
//! array described to virtq as one [`Region`]; the device "reflects" every transmitted frame
//! back on the receive queue, which is the smallest complete virtio-net data path. The driver
//! chooses the ring layout (`VIRTIO_F_RING_PACKED` or not); the device code is written once,
//! generic over [`virtq::ring::Virtqueue`], and both layouts are linked in.
//!
//! - Bare metal (`--target thumbv7em-none-eabihf`): `reset` runs `poll` forever; notifications
//!   go to a doorbell register (here a static).
//! - Host build (`cargo run -p virtq-firmware-example`): the in-tree test driver plays the host
//!   driver over the same static window and checks that frames come back.
#![cfg_attr(target_os = "none", no_std, no_main)]

use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering};

use virtq::net::{self, RxScratch, VirtioNetHdr};
use virtq::ring::{RxQueue, Virtqueue};
use virtq::{Chain, PackedQueue, QueueConfig, Region, RegionTable, SplitQueue, VirtioFeatures};

/// Guest address at which the host sees the window.
const WINDOW_GPA: u64 = 0x8000_0000;
/// Window size.
const WINDOW_LEN: usize = 48 * 1024;

/// The shared window. Only accessed through raw pointers (by virtq) and by the "host".
#[repr(C, align(4096))]
struct Window(UnsafeCell<[u8; WINDOW_LEN]>);
// SAFETY: the window is never accessed through references; virtq uses raw-pointer atomic and
// copy accesses, the same discipline the host driver follows.
unsafe impl Sync for Window {}

static WINDOW: Window = Window(UnsafeCell::new([0; WINDOW_LEN]));

/// Doorbell registers: bit 0 = RX queue interrupt, bit 1 = TX queue interrupt.
static DOORBELL: AtomicU32 = AtomicU32::new(0);

/// Features this device offers and, in this example, the driver accepts, but for the ring
/// layout, which the driver chooses ([`DRIVER_PACKED`]).
const FEATURES: VirtioFeatures = VirtioFeatures::VERSION_1
    .union(VirtioFeatures::RING_EVENT_IDX)
    .union(VirtioFeatures::RING_INDIRECT_DESC)
    .union(VirtioFeatures::NET_MRG_RXBUF);

/// Whether the driver negotiated `VIRTIO_F_RING_PACKED`: a register the transport writes when
/// the driver sets FEATURES_OK (exported, so the compiler cannot assume it stays 0 and drop
/// either layout's code).
#[no_mangle]
static DRIVER_PACKED: AtomicU32 = AtomicU32::new(0);

/// Queue size, and the packed queues' in-flight table.
const QUEUE_SIZE: u16 = 64;

fn memory() -> RegionTable<1> {
    let mut t = RegionTable::new();
    let host = NonNull::new(WINDOW.0.get().cast::<u8>()).expect("static is non-null");
    // SAFETY: the static window is valid for WINDOW_LEN bytes for the program's lifetime and
    // is only accessed through raw pointers.
    let region = unsafe { Region::new(WINDOW_GPA, host, WINDOW_LEN as u64) };
    t.add(region).expect("one region fits");
    t
}

/// Device statistics.
#[derive(Default, Debug, Clone, Copy)]
pub struct Stats {
    /// Frames reflected.
    pub frames: u32,
    /// Frames dropped (no RX buffer, malformed TX).
    pub drops: u32,
    /// Malformed chains seen.
    pub errors: u32,
}

/// Serves the device on the negotiated layout: sets up both queues, then runs `poll` on them
/// until `keep_going` says stop. `false` if the driver's rings do not fit the window.
fn serve(
    mem: &RegionTable<1>,
    rx: QueueConfig,
    tx: QueueConfig,
    stats: &mut Stats,
    keep_going: impl FnMut() -> bool,
) -> bool {
    if DRIVER_PACKED.load(Ordering::Acquire) != 0 {
        let f = FEATURES.union(VirtioFeatures::RING_PACKED);
        let q = |c| PackedQueue::<_, { QUEUE_SIZE as usize }>::new(mem, c, f);
        let (Ok(mut rxq), Ok(mut txq)) = (q(rx), q(tx)) else { return false };
        run(&mut rxq, &mut txq, f, stats, keep_going);
    } else {
        let (Ok(mut rxq), Ok(mut txq)) = (SplitQueue::new(mem, rx, FEATURES), SplitQueue::new(mem, tx, FEATURES))
        else {
            return false;
        };
        run(&mut rxq, &mut txq, FEATURES, stats, keep_going);
    }
    true
}

fn run<'m, R: RxQueue<'m>, T: Virtqueue<'m>>(
    rxq: &mut R,
    txq: &mut T,
    features: VirtioFeatures,
    stats: &mut Stats,
    mut keep_going: impl FnMut() -> bool,
) {
    while keep_going() {
        poll(rxq, txq, features, stats);
    }
}

/// One pass over the TX queue: every frame goes back out on the RX queue. Written once for
/// both ring layouts.
fn poll<'m, R: RxQueue<'m>, T: Virtqueue<'m>>(rxq: &mut R, txq: &mut T, features: VirtioFeatures, stats: &mut Stats) {
    let mut chain = Chain::<16>::new();
    let mut scratch = RxScratch::<4>::new();
    let mut frame = [0u8; 1536];
    loop {
        match txq.pop_into(&mut chain) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                stats.errors += 1;
                continue;
            }
        }
        match net::parse_tx(&chain, features) {
            Ok(pkt) if pkt.frame_len as usize <= frame.len() => {
                let n = pkt.read_frame(&chain, &mut frame);
                match net::receive(rxq, &mut scratch, features, &VirtioNetHdr::default(), &frame[..n]) {
                    Ok(_) => stats.frames += 1,
                    Err(_) => stats.drops += 1,
                }
            }
            _ => stats.drops += 1,
        }
        txq.push(chain.head(), 0);
    }
    let mut bell = 0;
    if rxq.publish() {
        bell |= 1;
    }
    if txq.publish() {
        bell |= 2;
    }
    DOORBELL.fetch_or(bell, Ordering::Release);
}

/// Queue placement the host driver reports (fixed here; a real device reads its config space).
fn queues() -> (QueueConfig, QueueConfig, u64) {
    // A split ring's layout; a packed ring of the same size fits in it (descriptors, then the
    // driver and device areas at the avail and used ring addresses, suitably aligned).
    let (rx, next) = virtq_layout(WINDOW_GPA, QUEUE_SIZE);
    let (tx, next) = virtq_layout(next, QUEUE_SIZE);
    (rx, tx, next)
}

fn virtq_layout(base: u64, size: u16) -> (QueueConfig, u64) {
    let desc_table = (base + 15) & !15;
    let avail_ring = desc_table + 16 * size as u64;
    let used_ring = (avail_ring + 6 + 2 * size as u64 + 3) & !3;
    let end = (used_ring + 6 + 8 * size as u64 + 15) & !15;
    (QueueConfig { size, desc_table, avail_ring, used_ring }, end)
}

#[cfg(target_os = "none")]
mod bare_metal {
    /// Entry point (see firmware.ld).
    #[no_mangle]
    #[link_section = ".text.reset"]
    pub extern "C" fn reset() -> ! {
        let mem = super::memory();
        let (rx, tx, _) = super::queues();
        let mut stats = super::Stats::default();
        loop {
            // Returns only if the rings do not fit the window: wait for the driver to reset
            // the device and set them up again.
            super::serve(&mem, rx, tx, &mut stats, || true);
        }
    }

    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    use virtq::testing::{Buf, PackedDriver, TestDriver};
    let mem = memory();
    let (rx, tx, data) = queues();
    let data_len = WINDOW_GPA + WINDOW_LEN as u64 - data;
    let frames = 5u32;
    let packet = |i: u8| {
        let mut pkt = [i; 12 + 60];
        pkt[..12].fill(0);
        pkt
    };
    // Split ring.
    {
        let (mut rxd, txd_base) = (TestDriver::new(&mem, rx, data, data_len / 2), data + data_len / 2);
        let mut txd = TestDriver::new(&mem, tx, txd_base, data_len / 2);
        for _ in 0..8 {
            rxd.add_chain(&[Buf::writable(1526)]);
        }
        for i in 0..frames as u8 {
            let pkt = packet(i);
            txd.add_chain(&[Buf::readable(&pkt[..12]), Buf::readable(&pkt[12..])]);
        }
        let mut stats = Stats::default();
        let mut once = true;
        assert!(serve(&mem, rx, tx, &mut stats, || core::mem::replace(&mut once, false)));
        assert_eq!(stats.frames, frames, "split: {stats:?}");
        assert_eq!(rxd.used_idx(), frames as u16);
        assert_eq!(txd.used_idx(), frames as u16);
        assert_eq!(rxd.used_elem(4).1, 12 + 60);
        println!("firmware example, split ring: reflected {} frames, stats {stats:?}", stats.frames);
    }
    // Packed ring, the same device code.
    {
        DRIVER_PACKED.store(1, Ordering::Release);
        let mut rxd = PackedDriver::new(&mem, rx, data, data_len / 2);
        let mut txd = PackedDriver::new(&mem, tx, data + data_len / 2, data_len / 2);
        for _ in 0..8 {
            rxd.add_chain(&[Buf::writable(1526)]);
        }
        for i in 0..frames as u8 {
            let pkt = packet(i);
            txd.add_chain(&[Buf::readable(&pkt[..12]), Buf::readable(&pkt[12..])]);
        }
        let mut stats = Stats::default();
        let mut once = true;
        assert!(serve(&mem, rx, tx, &mut stats, || core::mem::replace(&mut once, false)));
        assert_eq!(stats.frames, frames, "packed: {stats:?}");
        let rx_used: Vec<_> = core::iter::from_fn(|| rxd.pop_used()).collect();
        let tx_used: Vec<_> = core::iter::from_fn(|| txd.pop_used()).collect();
        assert_eq!((rx_used.len(), tx_used.len()), (frames as usize, frames as usize));
        assert!(rx_used.iter().all(|&(_, len)| len == 12 + 60), "{rx_used:?}");
        println!(
            "firmware example, packed ring: reflected {} frames, doorbell {:#x}, stats {stats:?}",
            stats.frames,
            DOORBELL.load(Ordering::Acquire)
        );
    }
}
