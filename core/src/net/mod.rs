//! virtio-net (VIRTIO 1.2 §5.1): the packet header, transmit-side parsing, and receive-side
//! placement into one buffer or, with `VIRTIO_NET_F_MRG_RXBUF`, several.
//!
//! | module | spec |
//! |---|---|
//! | [`header`] | §5.1.6 `struct virtio_net_hdr`, its flags and GSO types |
//! | [`tx`] | §5.1.6.2 driver → device packets (device side of "Packet Transmission") |
//! | [`mergeable`] | §5.1.6.3/§5.1.6.4 device → driver packets, single and merged buffers |

pub mod header;
pub mod mergeable;
pub mod tx;

pub use header::{header_len, VirtioNetHdr, VirtioNetHdrLegacy};
pub use mergeable::{
    receive, receive_burst, receive_burst_logged, receive_logged, RxBurst, RxError, RxOutcome, RxScratch, RX_BURST,
};
pub use tx::{parse_tx, parse_tx_copied, TxError, TxPacket};
