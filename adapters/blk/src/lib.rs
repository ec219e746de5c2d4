//! # virtq-blk — a vhost-user-blk back-end over a raw image file
//!
//! The second device type on the `virtq` core and the `virtq-vhost-user` library, with no
//! network code: the library's protocol state machine serves it through its device model
//! ([`model::BlkModel`]), the core parses and validates every request (`virtq::blk`), and
//! this crate does the I/O.
//!
//! | module | what |
//! |---|---|
//! | [`image`] | the raw image file: vectored reads and writes straight into guest buffers, flush, discard, write zeroes |
//! | [`model`] | the virtio-blk device model: features, `virtio_blk_config`, `writeback`, queues, ready rule, `GET/SET_INFLIGHT_FD` |
//! | [`inflight`] | inflight I/O tracking in the front-end's area (vhost-user.rst "Inflight I/O tracking", split layout) |
//! | [`device`] | the data path: one burst per ring, each request parsed by the core and served from the image |
//!
//! The binary (`src/main.rs`) follows the conventions of vhost-user back-end programs
//! (vhost-user.rst "Backend program conventions"): `--socket-path` or `--fd`,
//! `--print-capabilities` (type `block`, features `read-only` and `blk-file`), no
//! daemonizing, a clean exit on SIGTERM/SIGINT.
#![deny(missing_docs, unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod device;
pub mod image;
pub mod inflight;
pub mod model;

pub use device::{run_data_path, BlkCounters, BlkDevice};
pub use image::Image;
pub use model::{BlkEvent, BlkModel};
