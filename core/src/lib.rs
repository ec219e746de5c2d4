//! # virtq — device-side virtio virtqueues (split and packed) for hostile guests
//!
//! `#![no_std]`, no `alloc`: the same code serves virtqueues on bare metal (a DPU or SmartNIC
//! presenting virtio to a host, a hypervisor without an OS) and in a hosted vhost-user backend.
//!
//! The modules mirror the VIRTIO 1.2 specification:
//!
//! | module | spec | what |
//! |---|---|---|
//! | [`mem`] | 2.7 | guest-address translation trait, region table, atomic ring accessors |
//! | [`desc`] | 2.7.5 | descriptor layout and flags, descriptors copied out once |
//! | [`avail`] | 2.7.6 | driver → device half: available ring, `avail_event`, kick suppression |
//! | [`used`] | 2.7.8 | device → driver half: used ring, `used_event`, interrupt suppression |
//! | [`chain`] | 2.7.5.3, 2.7.13 | descriptor chain walk (direct and indirect), typed [`chain::ChainError`] |
//! | [`event`] | 2.7.7, 2.7.10 | `vring_need_event` |
//! | [`queue`] | 2.7 | a split queue: validated set-up + both halves + in-order batching |
//! | [`packed`] | 2.8 | a packed queue: descriptor ring, wrap counters, buffer ids, event suppression |
//! | [`ring`] | 2.7, 2.8 | [`ring::Virtqueue`]: one device API over both layouts |
//! | [`owned`] | 2.7, 2.8 | queues that own their memory: a device keeps memory and queues in one struct |
//! | [`features`] | 6, 5.1.3 | feature bits and negotiation |
//! | [`dirty`] | — | write tracking: every guest range the device writes, for live migration |
//! | [`net`] | 5.1.6 | virtio-net header, TX parse, RX placement, mergeable RX buffers |
//! | [`blk`] | 5.2 | virtio-blk features, configuration, request parsing and completion |
//!
//! ## Trust model
//! Everything read from guest memory is untrusted. Ring indices and flags are read with single
//! atomic loads, each descriptor is copied out exactly once before it is validated, and every
//! malformed input yields a typed error rather than a panic or an access outside guest memory.
//! A malformed chain whose head index is valid is still completed (used `len` 0) so the driver
//! gets its buffer back and the queue keeps moving; see [`queue::PopError`]. What the queue
//! does with each kind of malformed input, for both ring layouts, and what the vhost-user
//! back-end does with a ring that cannot go on, is one table: the *Error policy* section of
//! the repository's README.
//!
//! ## Example
//! A complete device serving one split queue. The in-tree test driver (`virtq::testing`, feature
//! `testing`) plays the driver's side and a `Vec` is the guest's memory; a real device has its
//! driver on the other side of a DMA window or a vhost-user memory table instead. The README's
//! *Using the core* section shows this same example (CI checks that the two stay identical:
//! `ci/readme-example.sh`).
//!
//! ```
//! use std::ptr::NonNull;
//!
//! use virtq::testing::{layout, Buf, TestDriver};
//! use virtq::{PopError, Region, RegionTable, SplitQueue, VirtioFeatures};
//!
//! // 1. Guest memory: 64 KiB of host memory that the driver sees at guest address 0x10_0000.
//! //    A device describes its own the same way: a DMA window, a vhost-user memory table.
//! const GPA: u64 = 0x10_0000;
//! const LEN: usize = 64 * 1024;
//! let mut ram = vec![0u64; LEN / 8]; // u64: 8-byte aligned
//! let host = NonNull::new(ram.as_mut_ptr().cast::<u8>()).unwrap();
//! let mut mem = RegionTable::<8>::new();
//! // SAFETY: `ram` outlives `mem` and is accessed only through the table from here on.
//! mem.add(unsafe { Region::new(GPA, host, LEN as u64) }).expect("one region fits");
//!
//! // 2. The driver places a 16-entry queue at GPA and makes one chain available: 5 bytes for
//! //    the device to read, then 64 bytes for it to write.
//! let (cfg, data) = layout(GPA, 16);
//! let mut driver = TestDriver::new(&mem, cfg, data, GPA + LEN as u64 - data);
//! let head = driver.add_chain(&[Buf::readable(b"hello"), Buf::writable(64)]);
//!
//! // 3. The device sets the queue up where the driver placed it, with the negotiated features
//! //    (validated: size, alignment, bounds, overlap).
//! let features = VirtioFeatures::VERSION_1 | VirtioFeatures::RING_EVENT_IDX;
//! let mut q = SplitQueue::new(&mem, cfg, features).expect("a valid queue");
//!
//! // 4. It serves the queue: pop (validate and copy in one pass), process, complete, and
//! //    publish once per batch.
//! let mut buf = [0u8; 1514];
//! loop {
//!     match q.pop_read(&mut buf) {
//!         Ok(Some(chain)) => {
//!             assert_eq!(&buf[..chain.bytes as usize], b"hello");
//!             q.push(chain.head, 0); // bytes written into the chain's writable part
//!         }
//!         Ok(None) => break, // the ring is empty
//!         // The driver's index is broken: stop serving this queue (or reset the device).
//!         Err(e @ PopError::AvailIndex(_)) => {
//!             eprintln!("queue stopped: {e}");
//!             break;
//!         }
//!         // A malformed chain, already given back to the driver (used len 0): log it, go on.
//!         Err(e) => eprintln!("{e}"),
//!     }
//! }
//! if q.publish() {
//!     // Notify the driver: an interrupt, the vhost-user call eventfd, a doorbell register.
//! }
//!
//! // The driver sees its chain completed.
//! assert_eq!(driver.used_idx(), 1);
//! assert_eq!(driver.used_elem(0), (u32::from(head), 0));
//! ```
#![no_std]
#![deny(missing_docs, unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

#[cfg(test)]
extern crate std;

mod log;

pub mod avail;
pub mod blk;
pub mod chain;
pub mod desc;
pub mod dirty;
pub mod event;
pub mod features;
pub mod mem;
pub mod net;
pub mod owned;
pub mod packed;
pub mod queue;
pub mod ring;
pub mod used;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use chain::{Chain, ChainError, Segment, Segments};
pub use dirty::{NoLog, WriteLog};
pub use features::VirtioFeatures;
pub use mem::{GuestMemory, HostRange, MemError, Region, RegionError, RegionTable};
pub use owned::{OwnedPackedQueue, OwnedSplitQueue, StableMemory};
pub use packed::{DetachedPackedQueue, PackedQueue, RingPosition};
pub use queue::{CopiedChain, DetachedQueue, PopError, QueueConfig, QueueError, SplitQueue};
pub use ring::Virtqueue;
