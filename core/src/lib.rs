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
//! gets its buffer back and the queue keeps moving; see [`queue::PopError`].
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
pub mod packed;
pub mod queue;
pub mod ring;
pub mod used;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use chain::{Chain, ChainError, Segment};
pub use dirty::{NoLog, WriteLog};
pub use features::VirtioFeatures;
pub use mem::{GuestMemory, HostRange, MemError, Region, RegionError, RegionTable};
pub use packed::{DetachedPackedQueue, PackedQueue, RingPosition};
pub use queue::{CopiedChain, DetachedQueue, PopError, QueueConfig, QueueError, SplitQueue};
pub use ring::Virtqueue;
