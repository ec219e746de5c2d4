//! virtio-blk (VIRTIO 1.2 §5.2): feature bits, the configuration layout, and the device side
//! of a request: parsing and validating a request chain, locating its data, reading its
//! discard / write-zeroes segments, and completing it with a status byte.
//!
//! | module | spec |
//! |---|---|
//! | [`config`] | §5.2.3 feature bits, §5.2.4 `struct virtio_blk_config` |
//! | [`request`] | §5.2.6 `struct virtio_blk_req`, request types, status, device requirements (§5.2.6.2) |
//!
//! The core does no I/O: a device (a vhost-user back-end over an image file, firmware over
//! flash) parses a chain with [`parse`], moves the data between its storage and the pieces
//! [`data_pieces`] yields (straight into guest buffers, e.g. with `preadv`/`pwritev`), and
//! finishes with [`complete`] (or [`complete_error`]). Every malformed request is a typed
//! [`RequestError`] that names the status byte the driver gets ([`RequestError::status`]); a
//! chain the queue's walk refused is answered in its last byte too ([`complete_malformed`]),
//! so every request that has a status byte gets one written.

pub mod config;
pub mod request;

pub use config::{BlkConfig, CONFIG_SIZE, ID_BYTES, SECTOR_SIZE};
pub use request::{
    complete, complete_error, complete_malformed, data_pieces, parse, read_segments, DataPieces, DiscardSegment,
    Limits, Request, RequestError, RequestType, SegmentLimits, Status, REQ_HEADER_LEN, SEGMENT_LEN,
};
