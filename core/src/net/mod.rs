//! virtio-net (VIRTIO 1.2 §5.1): the packet header, transmit-side parsing, receive-side
//! placement into one buffer or, with `VIRTIO_NET_F_MRG_RXBUF`, several, and the checksum and
//! segmentation offloads a device that forwards frames between drivers needs.
//!
//! | module | spec |
//! |---|---|
//! | [`header`] | §5.1.6 `struct virtio_net_hdr`, its flags and GSO types |
//! | [`tx`] | §5.1.6.2 driver → device packets (device side of "Packet Transmission") |
//! | [`mergeable`] | §5.1.6.3/§5.1.6.4 device → driver packets, single and merged buffers |
//! | [`gather`] | frames placed from where they are: a slice, or another driver's transmit buffers |
//! | [`offload`] | §5.1.6.2 a header checked against its frame; §5.1.6.4.1 what a receiver's features require; checksum completion |
//! | [`gso`] | §5.1.6.2 point 4: software segmentation (TSO4, TSO6, USO) |
//! | [`csum`] | the ones' complement checksum `NEEDS_CSUM` refers to (RFC 1071) |

pub mod csum;
pub mod gather;
pub mod gso;
pub mod header;
pub mod mergeable;
pub mod offload;
pub mod tx;

pub use gather::{FrameSource, Gather};
pub use gso::Segmenter;
pub use header::{header_len, VirtioNetHdr, VirtioNetHdrLegacy};
pub use mergeable::{
    receive, receive_burst, receive_burst_logged, receive_logged, RxBurst, RxError, RxOutcome, RxScratch, RX_BURST,
};
pub use offload::{check_frame, complete_csum, csum_field, rx_delivery, Delivery, L4Csum, OffloadError, OffloadFrame};
pub use tx::{parse_tx, parse_tx_copied, TxError, TxPacket};
