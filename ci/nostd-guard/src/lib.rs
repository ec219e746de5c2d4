//! Built by `ci/nostd.sh` for thumbv7em-none-eabihf, aarch64-unknown-none and
//! riscv64gc-unknown-none-elf, which have no `std`: if virtq or any dependency (with any
//! feature the firmware may enable) links `std` or `alloc`, this crate fails to build.
#![no_std]
#![forbid(unsafe_code)]

use virtq::net::{self, RxScratch, VirtioNetHdr};
use virtq::{Chain, GuestMemory, PopError, QueueConfig, SplitQueue, VirtioFeatures};

/// Monomorphises the whole data path for a generic memory, so every code path is compiled.
pub fn reflect_once<M: GuestMemory>(
    mem: &M,
    tx: QueueConfig,
    rx: QueueConfig,
    features: VirtioFeatures,
    frame: &mut [u8],
) -> Result<(bool, bool), PopError> {
    let (Ok(mut txq), Ok(mut rxq)) = (SplitQueue::new(mem, tx, features), SplitQueue::new(mem, rx, features)) else {
        return Ok((false, false));
    };
    let mut chain = Chain::<16>::new();
    let mut scratch = RxScratch::<8>::new();
    while txq.pop_into(&mut chain)?.is_some() {
        if let Ok(pkt) = net::parse_tx(&chain, features) {
            let n = pkt.read_frame(&chain, frame);
            let _ = net::receive(&mut rxq, &mut scratch, features, &VirtioNetHdr::default(), &frame[..n]);
        }
        txq.push(chain.head(), 0);
    }
    Ok((txq.publish(), rxq.publish()))
}
