//! Frames placed straight from where they are: a slice, or a frame still in the buffers of the
//! transmit chain that carried it ([`Gather`]), so that a device forwarding between two
//! drivers copies each frame once, from one driver's transmit buffers into the other's
//! receive buffers ([`receive_burst`](super::receive_burst)).
//!
//! A [`Gather`] starts with a private copy of the frame's first bytes (the headers the device
//! made its decisions on: [`check_frame`](super::check_frame), a switch's forwarding) and
//! takes the rest from the sender's buffers. A sender that rewrites its buffers while the copy
//! runs changes only its own payload: the headers that land are the ones that were checked.
//! Its buffers are the segments of a chain the walk validated ([`Chain`]), so every byte read
//! is inside guest memory the driver offered for reading.

use crate::chain::{copy_segments, Chain, Segment};
use crate::mem::{copy_bytes, move_bytes};

/// The bytes of a frame the receive path places: a slice (`&[u8]`), or a [`Gather`].
///
/// Sealed: the copy behind it is the crate's own contract with the receive path.
pub trait FrameSource: Copy + sealed::CopyOut {
    /// The frame's length in bytes.
    fn len(&self) -> usize;

    /// Whether the frame is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub(crate) mod sealed {
    /// See [`FrameSource`](super::FrameSource).
    pub trait CopyOut {
        /// Copies bytes `[at, at + n)` of the frame to `dst`.
        ///
        /// # Safety
        /// `dst` valid for writes of `n` bytes of guest memory, `at + n <= len()`.
        unsafe fn copy_out(&self, at: usize, dst: *mut u8, n: usize);
    }
}

impl FrameSource for &[u8] {
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
}

impl sealed::CopyOut for &[u8] {
    #[cfg_attr(not(feature = "small"), inline(always))]
    unsafe fn copy_out(&self, at: usize, dst: *mut u8, n: usize) {
        // SAFETY: `at + n <= self.len()` and `dst` valid for `n` bytes (the caller); the slice
        // is Rust memory, never overlapping guest memory.
        unsafe { copy_bytes(self.as_ptr().add(at), dst, n) }
    }
}

/// A frame whose first bytes are a private copy ([`head`](Self::head)) and whose rest is
/// still in guest memory: the device-readable buffers of a chain the walk validated.
///
/// Built from a [`Chain`] ([`Gather::from_chain`]) or a slice ([`Gather::slice`], for frames
/// the device holds itself, so that one burst can mix both).
#[derive(Clone, Copy, Debug)]
pub struct Gather<'a> {
    head: &'a [u8],
    /// The chain's device-readable segments; the frame's bytes after `head` start at byte
    /// `skip` of them.
    rest: &'a [Segment<'a>],
    // 32-bit, as a chain's length is (§2.7.5.2): a frame crosses a burst by value.
    skip: u32,
    len: u32,
}

impl<'a> Gather<'a> {
    /// A frame the device holds in `bytes`.
    #[inline]
    pub const fn slice(bytes: &'a [u8]) -> Gather<'a> {
        // A slice longer than 4 GiB is cut (no frame is; the chain's limit, §2.7.5.2).
        let len = if bytes.len() > u32::MAX as usize { u32::MAX } else { bytes.len() as u32 };
        Gather { head: bytes, rest: &[], skip: 0, len }
    }

    /// The device-readable part of `chain` from byte `offset` on (e.g. past a virtio-net
    /// header), whose first `head.len()` bytes are `head` instead: the caller's copy of those
    /// bytes, which it made its decisions on. A `head` longer than the frame is cut to it.
    ///
    /// The bytes after `head` are read from the chain's buffers when the frame is placed, so
    /// the chain must not be completed before then: its buffers still belong to the device.
    pub fn from_chain<const N: usize>(chain: &'a Chain<'a, N>, offset: usize, head: &'a [u8]) -> Gather<'a> {
        Gather::new(chain.readable(), chain.readable_len() as usize, offset, head)
    }

    /// [`Gather::from_chain`] over a chain's device-readable segments kept elsewhere (a
    /// device that takes a burst of chains with
    /// [`SplitQueue::pop_gather_uncompleted`](crate::SplitQueue::pop_gather_uncompleted) and
    /// keeps their segments in one [`Segments`](crate::Segments) list). `readable_len` is
    /// their total length ([`CopiedChain::readable_len`](crate::CopiedChain::readable_len));
    /// were it larger, the bytes past the segments would not be written where the frame is
    /// placed (whatever the receiver's buffer held stays there), never read from elsewhere.
    #[inline]
    pub fn new(readable: &'a [Segment<'a>], readable_len: usize, offset: usize, head: &'a [u8]) -> Gather<'a> {
        debug_assert_eq!(readable.iter().map(Segment::len).sum::<usize>(), readable_len);
        let readable_len = readable_len.min(u32::MAX as usize);
        let len = readable_len.saturating_sub(offset);
        let head = &head[..head.len().min(len)];
        // `offset + head.len() <= readable_len` whenever `len > 0`; otherwise unused.
        Gather { head, rest: readable, skip: (offset + head.len()).min(readable_len) as u32, len: len as u32 }
    }

    /// The frame's length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the frame is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The frame's first bytes, from the private copy (all of it for [`Gather::slice`]).
    #[inline]
    pub fn head(&self) -> &'a [u8] {
        self.head
    }

    /// The whole frame as one slice, if the device holds it ([`Gather::slice`], or a frame no
    /// longer than its head).
    #[inline]
    pub fn contiguous(&self) -> Option<&'a [u8]> {
        (self.head.len() == self.len as usize).then_some(self.head)
    }

    /// Copies the frame's first `min(self.len(), buf.len())` bytes into `buf` (for a device
    /// that needs the frame in one piece: checksum completion, segmentation, a host
    /// interface); returns how many.
    pub fn read_into(&self, buf: &mut [u8]) -> usize {
        let n = self.len().min(buf.len());
        // SAFETY: `buf` is valid for writes of `n` bytes, `n <= self.len`; guest memory never
        // overlaps a Rust buffer.
        unsafe { sealed::CopyOut::copy_out(self, 0, buf.as_mut_ptr(), n) };
        n
    }
}

impl FrameSource for Gather<'_> {
    #[inline]
    fn len(&self) -> usize {
        self.len as usize
    }
}

impl sealed::CopyOut for Gather<'_> {
    #[cfg_attr(not(feature = "small"), inline(always))]
    unsafe fn copy_out(&self, at: usize, dst: *mut u8, n: usize) {
        let h = self.head.len();
        let mut done = 0;
        if at < h {
            done = (h - at).min(n);
            // SAFETY: `at + done <= h`: within the head, Rust memory; `dst` valid for `n >=
            // done` bytes (the caller) and never overlapping Rust memory.
            unsafe { copy_bytes(self.head.as_ptr().add(at), dst, done) };
        }
        if done < n {
            // `at + done >= h` here: either `at >= h`, or the head was copied to its end.
            let from = self.skip as usize + (at + done - h);
            copy_segments(self.rest, from, n - done, |seg, o, k, d| {
                // SAFETY: `seg` is a device-readable segment of a validated chain, valid for
                // reads of `seg.len()` bytes for the chain's memory lifetime, which outlives
                // 'a (GuestMemory contract), and `o + k <= seg.len()`; `done + d + k <= n`
                // (copy_segments), so the write stays within `dst`'s `n` bytes. Both are
                // guest memory and may overlap (a driver's own buffers): `move_bytes`.
                unsafe { move_bytes(seg.as_ptr().add(o), dst.add(done + d), k) }
            });
        }
    }
}
