//! Packets to the driver (VIRTIO 1.2 §5.1.6.3, §5.1.6.4): one receive buffer per packet, or,
//! with `VIRTIO_NET_F_MRG_RXBUF`, as many as the packet needs with `num_buffers` set.
//!
//! Device rules implemented here (§5.1.6.4.1):
//! - "MUST use only a single descriptor if VIRTIO_NET_F_MRG_RXBUF was not negotiated" and set
//!   `num_buffers` to 1 (12-byte header).
//! - With MRG_RXBUF: "MUST use all buffers but the last (i.e. the first num_buffers - 1
//!   buffers) completely up to the full length of each buffer"; `num_buffers` is the number of
//!   buffers; all buffers of one packet are published together by one used-index update.
//! - Never a partial packet: every buffer is reserved before the packet is committed; when the
//!   ring runs short the reserved heads are given back ([`crate::SplitQueue::rewind`],
//!   [`crate::PackedQueue::rewind`]) and [`RxError::NoBuffers`] is returned, so the caller can
//!   wait for a kick or drop the frame.
//!
//! The functions take either ring layout ([`crate::SplitQueue`], [`crate::PackedQueue`]): the
//! queue's head index or buffer id is what is completed. The dirty-log variants report buffer
//! writes for both; only the split ring reports its used-ring writes so far
//! (`SplitQueue::publish_logged`).
//! - Without `VIRTIO_NET_F_GUEST_CSUM` the header's `flags` must be 0, and only negotiated GSO
//!   types may be set ([`RxError::OffloadNotNegotiated`]); the rules are
//!   [`offload::rx_delivery`]'s.
//!
//! A malformed receive chain (one the chain walk rejects, one with device-readable buffers, or a
//! first buffer shorter than the header, families 6 and 11) is completed with len 0 and skipped.
//! Buffers already reserved for the packet before it are completed with len 0 too, so used
//! entries stay in ring order (which IN_ORDER requires); this only ever happens to a driver
//! that broke the spec. A chain with no id to complete it (a head or buffer id out of range,
//! a buffer id in flight) is skipped the same way on a split ring without IN_ORDER; on a
//! packed or IN_ORDER ring that loses the driver's place ([`PopError::unreturnable_on`]), so
//! the buffers reserved before it are completed with len 0 and the receive stops with
//! [`RxError::Ring`]: the queue cannot go on.

use core::fmt;

use zerocopy::little_endian::U16;
use zerocopy::IntoBytes;

use super::gather::FrameSource;
use super::header::*;
use super::offload::{self, Delivery};
use crate::chain::{Chain, WalkSummary, DEFAULT_SEGMENTS};
use crate::dirty::{NoLog, WriteLog};
use crate::features::VirtioFeatures;
use crate::log::log_warn;
use crate::mem::{copy_bytes, store_header};
use crate::packed::BATCH;
use crate::queue::{BatchBuffer, FirstWritable, PopError};
use crate::ring::sealed::RxOps;

/// Most buffers one merged packet may use (a 64 KiB GSO packet in 1526-byte buffers needs 44).
pub const MAX_RX_BUFFERS: usize = 256;

/// Why a frame was not placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RxError {
    /// Not enough receive buffers are available yet; the buffers reserved for the frame were
    /// given back. Malformed chains met on the way were consumed and completed with len 0 (not
    /// yet published: call [`Virtqueue::publish`](crate::Virtqueue::publish) before waiting for a kick).
    NoBuffers,
    /// The frame does not fit: without MRG_RXBUF the next buffer is too small, or with it even
    /// a full ring of buffers is too small. The buffers were given back; drop the frame (and
    /// count it). Waiting would not help.
    FrameTooLarge {
        /// Header plus frame bytes needed.
        needed: u32,
        /// Writable bytes in the buffer.
        available: u32,
    },
    /// The frame needs more than [`MAX_RX_BUFFERS`] buffers; nothing was consumed.
    TooManyBuffers,
    /// The header asks for an offload the driver did not negotiate.
    OffloadNotNegotiated,
    /// The ring cannot go on: stop serving it. Either the available index is broken
    /// ([`PopError::AvailIndex`]; nothing was consumed, the buffers reserved for the frame
    /// were given back), or a chain has no id to complete it on a queue where that loses the
    /// driver's place ([`PopError::HeadOutOfRange`] or [`PopError::IdInUse`] on a packed or
    /// IN_ORDER ring, as [`PopError::unreturnable_on`] decides): its slot was consumed and the
    /// buffers reserved for the frame before it were completed with len 0, in ring order
    /// (not yet published). Either way the frame was not placed.
    Ring(PopError),
}

impl fmt::Display for RxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RxError::NoBuffers => f.write_str("no receive buffers"),
            RxError::FrameTooLarge { needed, available } => {
                write!(f, "frame needs {needed} bytes, buffer has {available}")
            }
            RxError::TooManyBuffers => f.write_str("frame needs too many receive buffers"),
            RxError::OffloadNotNegotiated => f.write_str("offload not negotiated by the driver"),
            RxError::Ring(e) => write!(f, "{e}"),
        }
    }
}

/// What [`receive`] placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RxOutcome {
    /// Buffers used (`num_buffers`).
    pub buffers: u16,
    /// Bytes written including the header.
    pub bytes: u32,
    /// Malformed chains met on the way (already logged), including out-of-range heads on a
    /// split ring without IN_ORDER (elsewhere they stop the receive, [`RxError::Ring`]).
    pub bad_chains: u16,
    /// Used entries written with len 0 on the way: malformed chains with a valid head, and
    /// buffers reserved for this frame before a malformed chain interrupted it (returned
    /// empty so that used entries stay in ring order). The used index moved by
    /// `buffers + completed_empty`.
    pub completed_empty: u16,
}

/// Reusable working space for [`receive`]: two chains and the list of used entries. Keep one
/// per receive queue; it holds nothing between calls. `N` bounds the segments of one receive
/// chain: Linux without MRG_RXBUF but with guest TSO posts "big packet" chains of
/// `2 + MAX_SKB_FRAGS` (19, or more with a larger MAX_SKB_FRAGS) descriptors.
pub struct RxScratch<'m, const N: usize = DEFAULT_SEGMENTS> {
    first: Chain<'m, N>,
    cur: Chain<'m, N>,
    used: heapless::Vec<(u16, u32), MAX_RX_BUFFERS>,
}

impl<const N: usize> Default for RxScratch<'_, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> RxScratch<'_, N> {
    /// Empty scratch space.
    pub const fn new() -> Self {
        RxScratch { first: Chain::new(), cur: Chain::new(), used: heapless::Vec::new() }
    }
}

/// Checks a device-built header against what the driver negotiated (§5.1.6.4.1), and makes
/// it what the driver may see. A header without flags and GSO, the usual case, needs nothing
/// negotiated.
#[cfg_attr(not(feature = "small"), inline(always))]
fn check_offloads(h: &mut VirtioNetHdr, features: VirtioFeatures) -> Result<(), RxError> {
    if h.flags == 0 && h.gso_type == VIRTIO_NET_HDR_GSO_NONE {
        return Ok(());
    }
    check_offload_fields(h, features)
}

/// The rest of [`check_offloads`], for a header that sets flags or a GSO type: the rules of
/// §5.1.6.4.1 as [`offload::rx_delivery`] states them. A frame that would need its checksum
/// completed or to be segmented cannot be placed as it is: that is the caller's software
/// fallback ([`offload`]), not this function's. `DATA_VALID` without `GUEST_CSUM` (a hint) is
/// cleared and the frame delivered.
#[inline(never)]
fn check_offload_fields(h: &mut VirtioNetHdr, features: VirtioFeatures) -> Result<(), RxError> {
    match offload::rx_delivery(h, features) {
        Delivery::Pass(out) => {
            *h = out;
            Ok(())
        }
        Delivery::CompleteCsum(_) | Delivery::Segment(_) | Delivery::Drop => Err(RxError::OffloadNotNegotiated),
    }
}

/// Places one frame (`header` + `frame`) into the receive queue: one buffer, or with
/// `VIRTIO_NET_F_MRG_RXBUF` in `features` as many as needed. The used entries are written but
/// not published: call [`Virtqueue::publish`](crate::Virtqueue::publish) once per batch.
///
/// `header.num_buffers` is overwritten. The header length follows [`header_len`].
///
/// Inlined into the caller's loop: the usual packet takes the fast path, and only the rest
/// calls the general path (`receive_spread`). Measured with `IR=1 benches/vs-dpdk.sh`
/// (rx64-mrg): a call per frame into one large function cost about 40 instructions per frame
/// in its prologue, epilogue and offload checks. For a burst of frames, [`receive_burst`]
/// is faster.
#[cfg_attr(not(feature = "small"), inline(always))]
pub fn receive<'m, Q: RxOps<'m>, const N: usize>(
    queue: &mut Q,
    scratch: &mut RxScratch<'m, N>,
    features: VirtioFeatures,
    header: &VirtioNetHdr,
    frame: &[u8],
) -> Result<RxOutcome, RxError> {
    receive_logged(queue, scratch, features, header, frame, &NoLog)
}

/// [`receive`], reporting every byte written into the guest's buffers (header, `num_buffers`,
/// frame) to `log` as guest ranges ([`crate::dirty`]). The used ring is reported by
/// [`SplitQueue::publish_logged`](crate::SplitQueue::publish_logged).
#[cfg_attr(not(feature = "small"), inline(always))]
pub fn receive_logged<'m, Q: RxOps<'m>, L: WriteLog, const N: usize>(
    queue: &mut Q,
    scratch: &mut RxScratch<'m, N>,
    features: VirtioFeatures,
    header: &VirtioNetHdr,
    frame: &[u8],
    log: &L,
) -> Result<RxOutcome, RxError> {
    receive_with(queue, scratch, features, header, frame, log, &mut OneByOne, 1, |dst, addr, hdr, hdr_len| {
        // SAFETY: `receive_with` passes the start of a validated device-writable buffer,
        // valid for reads and writes of `hdr_len + frame.len()` bytes of guest memory for 'm
        // (GuestMemory contract; `hdr_len` is 10 or 12, as `store_header` needs); header and
        // frame are Rust memory, never overlapping guest memory.
        unsafe {
            store_header(hdr.as_bytes().as_ptr(), dst, hdr_len);
            copy_bytes(frame.as_ptr(), dst.add(hdr_len), frame.len());
        }
        if L::ENABLED {
            log.buffer(addr, (hdr_len + frame.len()) as u64);
        }
    })
}

/// Frames whose copies [`receive_burst`] defers to the end of its pass.
pub const RX_BURST: usize = 32;

/// What [`receive_burst`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RxBurst {
    /// Frames placed: always the first `placed` frames of the burst that were not refused.
    pub placed: usize,
    /// Frame bytes placed (without virtio-net headers).
    pub bytes: u64,
    /// Frames refused and dropped: too large for the buffers ([`RxError::FrameTooLarge`],
    /// [`RxError::TooManyBuffers`]) or with an offload the driver did not negotiate
    /// ([`RxError::OffloadNotNegotiated`]). The burst goes on with the next frame.
    pub refused: usize,
    /// Malformed chains met on the way (already logged and completed with len 0).
    pub bad_chains: u32,
    /// Why the burst stopped before its last frame: [`RxError::NoBuffers`] or
    /// [`RxError::Ring`]. The frames from `placed + refused` on were not placed. A chain that
    /// stopped it ([`RxError::Ring`] with [`PopError::HeadOutOfRange`] or
    /// [`PopError::IdInUse`]) is not counted in `bad_chains`.
    pub stopped: Option<RxError>,
}

/// A fast-path frame whose copy is deferred: destination in guest memory, header, frame.
struct PendingCopy<S> {
    dst: *mut u8,
    /// `dst`'s guest address, for the dirty log.
    addr: u64,
    hdr: VirtioNetHdr,
    frame: S,
}

/// Places up to `count` frames, `frame(i)` giving the header and bytes of the `i`-th, like
/// [`receive`] called for each in turn (the bytes as a slice, or as a [`Gather`](super::Gather):
/// a frame still in the buffers of the chain that carried it, copied from there once), and stops at the first frame that finds no buffers
/// or a broken ring. Used entries are written but not published: call
/// [`Virtqueue::publish`](crate::Virtqueue::publish) after it.
///
/// Frames that fit the first buffer of their chain (the usual case) are copied after the
/// chains of the whole pass are taken, in one tight loop, as DPDK's vhost does for small
/// copies (`batch_copy_elems`): the driver has just read those cache lines (the header for
/// `num_buffers`, the frame for its statistics), so each store needs the line back from the
/// driver's CPU, and stores issued back to back wait for those lines together instead of
/// one after the other behind the ring reads. Measured with `benches/vs-dpdk.sh` (rx64-mrg),
/// see CHANGELOG. Nothing is visible to the driver before `publish`, so the order of the
/// copies does not matter.
#[cfg_attr(not(feature = "small"), inline(always))]
pub fn receive_burst<'m, Q: RxOps<'m>, S: FrameSource, const N: usize>(
    queue: &mut Q,
    scratch: &mut RxScratch<'m, N>,
    features: VirtioFeatures,
    count: usize,
    frame: impl Fn(usize) -> (VirtioNetHdr, S),
) -> RxBurst {
    receive_burst_logged(queue, scratch, features, count, frame, &NoLog)
}

/// [`receive_burst`], reporting every byte written into the guest's buffers to `log` as guest
/// ranges ([`crate::dirty`]), each after its copy. The used ring is reported by
/// [`SplitQueue::publish_logged`](crate::SplitQueue::publish_logged). With [`NoLog`] this is `receive_burst`, instruction for
/// instruction.
pub fn receive_burst_logged<'m, Q: RxOps<'m>, S: FrameSource, L: WriteLog, const N: usize>(
    queue: &mut Q,
    scratch: &mut RxScratch<'m, N>,
    features: VirtioFeatures,
    count: usize,
    frame: impl Fn(usize) -> (VirtioNetHdr, S),
    log: &L,
) -> RxBurst {
    // The split ring's burst takes its chains one by one, with nothing else in its loop.
    if Q::BATCHES {
        burst_from(queue, scratch, features, count, frame, log, &mut Reserved::new())
    } else {
        burst_from(queue, scratch, features, count, frame, log, &mut OneByOne)
    }
}

/// The body of [`receive_burst_logged`], taking chains from `src`.
#[cfg_attr(not(feature = "small"), inline(always))]
fn burst_from<'m, Q: RxOps<'m>, S: FrameSource, L: WriteLog, R: ChainSource, const N: usize>(
    queue: &mut Q,
    scratch: &mut RxScratch<'m, N>,
    features: VirtioFeatures,
    count: usize,
    frame: impl Fn(usize) -> (VirtioNetHdr, S),
    log: &L,
    src: &mut R,
) -> RxBurst {
    let hdr_len = header_len(features);
    let mut out = RxBurst::default();
    let mut pending: heapless::Vec<PendingCopy<S>, RX_BURST> = heapless::Vec::new();
    for i in 0..count {
        if pending.is_full() {
            flush_copies(&mut pending, hdr_len, log);
        }
        let (header, f) = frame(i);
        let placed = receive_with(queue, scratch, features, &header, f, log, src, count - i, |dst, addr, hdr, _| {
            // Cannot fail: a full list was flushed above, and one frame adds one entry.
            let _ = pending.push(PendingCopy { dst, addr, hdr: *hdr, frame: f });
        });
        match placed {
            Ok(o) => {
                out.placed += 1;
                out.bytes += f.len() as u64;
                out.bad_chains += u32::from(o.bad_chains);
            }
            Err(RxError::FrameTooLarge { .. } | RxError::TooManyBuffers | RxError::OffloadNotNegotiated) => {
                out.refused += 1
            }
            Err(e) => {
                out.stopped = Some(e);
                break;
            }
        }
    }
    // Chains a batch took for frames that did not come (refused, or the burst stopped):
    // given back, they are the last taken.
    src.rewind(queue, 0);
    flush_copies(&mut pending, hdr_len, log);
    out
}

/// Chains a receive burst took with one batch pop ([`RxOps::pop_writable_batch`], packed rings)
/// and has not used yet, in ring order. They are the last chains taken: the fast path uses
/// them before it takes another, and gives them back ([`RxOps::rewind`]) before the general
/// path takes any, as the burst does at its end; so frames meet chains in ring order, as with
/// single pops.
struct Reserved {
    chains: [BatchBuffer; BATCH],
    next: usize,
    len: usize,
}

impl Reserved {
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn new() -> Reserved {
        Reserved { chains: [BatchBuffer::NONE; BATCH], next: 0, len: 0 }
    }
}

/// Where the receive fast path (`receive_with`) takes its next chain from: one pop per frame
/// ([`OneByOne`]), or a burst's batches ([`Reserved`]).
trait ChainSource {
    /// The next chain for a frame, `pop_first_writable`'s answer; `want` is the frames left
    /// in the burst, this one included.
    fn pop<'m, Q: RxOps<'m>>(&mut self, queue: &mut Q, want: usize) -> Result<Option<FirstWritable>, PopError>;
    /// Gives back the chains this source holds and has not handed out, and the last `taken`
    /// it handed out (taken before those).
    fn rewind<'m, Q: RxOps<'m>>(&mut self, queue: &mut Q, taken: u16);
}

/// `pop_first_writable` per frame.
struct OneByOne;

impl ChainSource for OneByOne {
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn pop<'m, Q: RxOps<'m>>(&mut self, queue: &mut Q, _: usize) -> Result<Option<FirstWritable>, PopError> {
        queue.pop_first_writable()
    }

    #[cfg_attr(not(feature = "small"), inline(always))]
    fn rewind<'m, Q: RxOps<'m>>(&mut self, queue: &mut Q, taken: u16) {
        if taken != 0 {
            queue.rewind(taken);
        }
    }
}

impl ChainSource for Reserved {
    /// A reserved chain, or, with none left and more than one frame to come, the first of a
    /// new batch, or the single pop's.
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn pop<'m, Q: RxOps<'m>>(&mut self, queue: &mut Q, want: usize) -> Result<Option<FirstWritable>, PopError> {
        if self.next >= self.len && want > 1 {
            self.len = queue.pop_writable_batch(want, &mut self.chains);
            self.next = 0;
        }
        if let Some(&c) = self.chains.get(self.next).filter(|_| self.next < self.len) {
            self.next += 1;
            let sum = WalkSummary { readable_len: 0, writable_len: c.len };
            return Ok(Some(FirstWritable { head: c.head, sum, first: Some((c.ptr, c.len, c.addr)) }));
        }
        queue.pop_first_writable()
    }

    #[cfg_attr(not(feature = "small"), inline(always))]
    fn rewind<'m, Q: RxOps<'m>>(&mut self, queue: &mut Q, taken: u16) {
        let n = taken + self.len.saturating_sub(self.next) as u16;
        if n != 0 {
            queue.rewind(n);
        }
        self.len = 0;
        self.next = 0;
    }
}

/// The deferred copies of [`receive_burst`], each reported to `log` once made.
#[cfg_attr(not(feature = "small"), inline(always))]
fn flush_copies<S: FrameSource, L: WriteLog>(
    pending: &mut heapless::Vec<PendingCopy<S>, RX_BURST>,
    hdr_len: usize,
    log: &L,
) {
    for p in pending.iter() {
        // SAFETY: `p.dst` came from `receive_with` during this burst: the start of a validated
        // device-writable buffer, valid for reads and writes of `hdr_len + p.frame.len()`
        // bytes of guest memory for the queue's lifetime, which the burst's borrow of the
        // queue outlives; `hdr_len` is 10 or 12, as `store_header` needs. The header is Rust
        // memory, never overlapping guest memory; the frame's copy is `copy_out`'s (whole:
        // `0 + len <= len`), which allows for a source in guest memory.
        unsafe {
            store_header(p.hdr.as_bytes().as_ptr(), p.dst, hdr_len);
            p.frame.copy_from_start(p.dst.add(hdr_len), p.frame.len());
        }
        if L::ENABLED {
            log.buffer(p.addr, (hdr_len + p.frame.len()) as u64);
        }
    }
    pending.clear();
}

/// [`receive`] with the fast path's write left to `place`: it is called at most once, with
/// the start of a buffer valid for reads and writes of `hdr_len + frame.len()` bytes and its
/// guest address, the
/// header to write (`num_buffers` set) and `hdr_len`, after the chain was taken and its used
/// entry written. Frames that take the general path are written before it returns. The
/// fast path takes its chain from `src` (one pop per frame, or a burst's batches), `want`
/// being the frames left in the burst, this one included.
#[cfg_attr(not(feature = "small"), inline(always))]
// Inlined into its two callers, which hold every argument in locals: a struct of them would
// only be taken apart again.
#[allow(clippy::too_many_arguments)]
fn receive_with<'m, Q: RxOps<'m>, S: FrameSource, L: WriteLog, R: ChainSource, const N: usize>(
    queue: &mut Q,
    scratch: &mut RxScratch<'m, N>,
    features: VirtioFeatures,
    header: &VirtioNetHdr,
    frame: S,
    log: &L,
    src: &mut R,
    want: usize,
    place: impl FnOnce(*mut u8, u64, &VirtioNetHdr, usize),
) -> Result<RxOutcome, RxError> {
    let mut header = *header;
    check_offloads(&mut header, features)?;
    let header = &header;
    let hdr_len = header_len(features);
    let total = hdr_len + frame.len();
    let needed = u32::try_from(total).map_err(|_| RxError::TooManyBuffers)?;
    let mergeable = features.contains(VirtioFeatures::NET_MRG_RXBUF);
    let mut out = RxOutcome::default();

    // Fast path: the packet fits the first buffer of the next chain, the usual case (Linux and
    // DPDK post single buffers of 1526 bytes or more). One pass validates the chain without
    // building a segment list; header and frame are written only once the whole chain has
    // passed. Measured with `IR=1 benches/vs-dpdk.sh` (rx64-mrg): 372 -> see CHANGELOG.
    let mut hdr = *header;
    hdr.num_buffers = U16::new(1);
    loop {
        match src.pop(queue, want) {
            Ok(Some(FirstWritable { head, sum, first })) => {
                if sum.readable_len != 0 || (sum.writable_len as usize) < hdr_len {
                    // Unusable (families 6, 11): completed empty in ring order; next chain.
                    log_warn!("virtq-net: RX chain {=u16} unusable", head);
                    queue.push(head, 0);
                    out.bad_chains += 1;
                    out.completed_empty += 1;
                    continue;
                }
                match first {
                    Some((ptr, len, addr)) if len as usize >= total => {
                        queue.push(head, needed);
                        place(ptr.as_ptr(), addr, &hdr, hdr_len);
                        out.buffers = 1;
                        out.bytes = needed;
                        return Ok(out);
                    }
                    _ => {
                        // Spread over several pieces or buffers: give the chain back (and
                        // those reserved after it) and take the general path (nothing was
                        // written).
                        src.rewind(queue, 1);
                        if !mergeable && (sum.writable_len as usize) < total {
                            return Err(RxError::FrameTooLarge { needed, available: sum.writable_len });
                        }
                        break;
                    }
                }
            }
            Ok(None) => return Err(RxError::NoBuffers),
            // Already completed with len 0 by the queue, in ring order.
            Err(PopError::Chain { .. }) => {
                out.bad_chains += 1;
                out.completed_empty += 1;
            }
            Err(e @ (PopError::HeadOutOfRange { .. } | PopError::IdInUse { .. })) => {
                // No id to complete it with. Where that loses the driver's place the queue
                // stops here (nothing is reserved on this path); elsewhere the slot is
                // consumed and the next chain taken.
                if e.unreturnable_on(queue).is_some() {
                    return Err(RxError::Ring(e));
                }
                out.bad_chains += 1
            }
            Err(e @ PopError::AvailIndex(_)) => return Err(RxError::Ring(e)),
        }
    }
    receive_spread(queue, scratch, features, hdr, frame, out, log)
}

/// [`receive`] for a packet that does not fit the first piece of the next chain: reserves as
/// many chains as it needs (with MRG_RXBUF), then writes them. `out` holds what the fast path
/// met before (malformed chains), `hdr` the header to write.
#[inline(never)]
fn receive_spread<'m, Q: RxOps<'m>, S: FrameSource, L: WriteLog, const N: usize>(
    queue: &mut Q,
    scratch: &mut RxScratch<'m, N>,
    features: VirtioFeatures,
    mut hdr: VirtioNetHdr,
    frame: S,
    mut out: RxOutcome,
    log: &L,
) -> Result<RxOutcome, RxError> {
    let mem = queue.memory();
    let hdr_len = header_len(features);
    let total = hdr_len + frame.len();
    // `receive` checked that the total fits in u32.
    let needed = total as u32;
    let mergeable = features.contains(VirtioFeatures::NET_MRG_RXBUF);
    scratch.used.clear();

    // Phase 1: reserve buffers until the packet fits (nothing is written yet).
    let mut capacity: u64 = 0;
    while capacity < total as u64 {
        let chain = if scratch.used.is_empty() { &mut scratch.first } else { &mut scratch.cur };
        let bad = match queue.pop_uncompleted(chain) {
            Ok(true) => {
                let is_first = scratch.used.is_empty();
                if !chain.readable().is_empty() || (is_first && (chain.writable_len() as usize) < hdr_len) {
                    log_warn!("virtq-net: RX chain {=u16} unusable", chain.head());
                    Some(chain.head())
                } else {
                    None
                }
            }
            Ok(false) => {
                let reserved = scratch.used.len() as u16;
                queue.rewind(reserved);
                if reserved == queue.size() {
                    // The whole ring is reserved and still too small: no kick will ever come.
                    return Err(RxError::FrameTooLarge { needed, available: capacity.min(u32::MAX as u64) as u32 });
                }
                return Err(RxError::NoBuffers);
            }
            Err(PopError::Chain { head, .. }) => Some(head),
            Err(e @ (PopError::HeadOutOfRange { .. } | PopError::IdInUse { .. })) => {
                // Nothing to complete; the slot is consumed. Buffers reserved before it can no
                // longer be given back in order, so return them empty.
                let released = release_empty(queue, scratch);
                if e.unreturnable_on(queue).is_some() {
                    // Where that loses the driver's place the queue stops here.
                    return Err(RxError::Ring(e));
                }
                out.bad_chains += 1;
                out.completed_empty += released;
                capacity = 0;
                continue;
            }
            Err(e @ PopError::AvailIndex(_)) => {
                queue.rewind(scratch.used.len() as u16);
                return Err(RxError::Ring(e));
            }
        };
        if let Some(head) = bad {
            out.bad_chains += 1;
            out.completed_empty += release_empty(queue, scratch) + 1;
            queue.push(head, 0);
            capacity = 0;
            continue;
        }
        let chain = if scratch.used.is_empty() { &scratch.first } else { &scratch.cur };
        let cap = chain.writable_len();
        if !mergeable && (cap as usize) < total {
            queue.rewind(1);
            return Err(RxError::FrameTooLarge { needed, available: cap });
        }
        if scratch.used.push((chain.head(), cap)).is_err() {
            queue.rewind(scratch.used.len() as u16 + 1);
            return Err(RxError::TooManyBuffers);
        }
        // Data for buffers after the first is written as they are reserved: until the used
        // index moves, the driver does not look at them, and on shortage they are given back.
        if scratch.used.len() > 1 {
            let start = (capacity as usize - hdr_len).min(frame.len());
            let n = scratch.cur.write_frame(0, &frame, start, frame.len() - start);
            scratch.cur.log_written(mem, 0, n, log);
            if let Some(last) = scratch.used.last_mut() {
                last.1 = n as u32;
            }
        }
        capacity += cap as u64;
    }

    // Phase 2: the first buffer gets the header (with num_buffers) and the frame's start.
    let count = scratch.used.len() as u16;
    hdr.num_buffers = U16::new(count);
    let first = &scratch.first;
    first.write_at(0, &hdr.as_bytes()[..hdr_len]);
    let n0 = first.write_frame(hdr_len, &frame, 0, frame.len().min(first.writable_len() as usize - hdr_len));
    first.log_written(mem, 0, hdr_len + n0, log);
    scratch.used[0].1 = (hdr_len + n0) as u32;

    for &(head, len) in scratch.used.iter() {
        queue.push(head, len);
        out.bytes += len;
    }
    out.buffers = count;
    Ok(out)
}

/// Completes every reserved buffer with len 0 (in ring order) and forgets them.
fn release_empty<'m, Q: RxOps<'m>, const N: usize>(queue: &mut Q, scratch: &mut RxScratch<'m, N>) -> u16 {
    for &(head, _) in scratch.used.iter() {
        queue.push(head, 0);
    }
    let n = scratch.used.len() as u16;
    scratch.used.clear();
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{Region, RegionTable};
    use crate::packed::PackedQueue;
    use crate::testing::{packed_layout, Buf, PackedDriver};
    use core::ptr::NonNull;
    use std::vec;

    /// The receive burst's reservation on a packed ring takes four buffers with one batch pop
    /// and hands them out one by one (what `core/tests/packed_batch.rs` cannot see from
    /// outside: there a burst and frame-by-frame receives must look the same).
    #[test]
    fn a_packed_receive_burst_reserves_four_buffers_at_once() {
        const GPA: u64 = 0x10_0000;
        let mut backing = vec![0u64; 1 << 10];
        let len = (backing.len() * 8) as u64;
        let mut mem: RegionTable<1> = RegionTable::new();
        // SAFETY: `backing` outlives `mem` and every queue over it (declared first, dropped
        // last), and is only accessed through the table's raw pointers from here on.
        let region = unsafe { Region::new(GPA, NonNull::new(backing.as_mut_ptr().cast()).unwrap(), len) };
        mem.add(region).unwrap();
        let (cfg, data) = packed_layout(GPA, 8);
        let mut drv = PackedDriver::new(&mem, cfg, data, GPA + len - data);
        for _ in 0..6 {
            drv.add_chain(&[Buf::writable(128)]);
        }
        let mut q: PackedQueue<'_, _> = PackedQueue::new(&mem, cfg, VirtioFeatures::VERSION_1).unwrap();
        let mut src = Reserved::new();
        let first = src.pop(&mut q, 6).unwrap().unwrap();
        assert_eq!((src.next, src.len), (1, BATCH), "one batch of four");
        assert_eq!(q.next_avail().index, 4, "four descriptors taken");
        assert_eq!(first.head, 0);
        for head in 1..4 {
            assert_eq!(src.pop(&mut q, 6 - head as usize).unwrap().unwrap().head, head);
        }
        assert_eq!(q.next_avail().index, 4, "handed out from the reservation");
        // Two frames left: a batch of two, one of which goes back unused.
        assert_eq!(src.pop(&mut q, 2).unwrap().unwrap().head, 4);
        assert_eq!((src.next, src.len), (1, 2));
        src.rewind(&mut q, 0);
        assert_eq!(q.next_avail().index, 5, "the unused one given back");
        // The last frame of a burst takes no batch.
        assert_eq!(src.pop(&mut q, 1).unwrap().unwrap().head, 5);
        assert_eq!((src.next, src.len), (0, 0));
    }
}
