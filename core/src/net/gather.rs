//! Frames placed straight from where they are: a slice, or a frame still in the buffers of the
//! transmit chain that carried it ([`Gather`]), so that a device forwarding between two
//! drivers copies each frame once, from one driver's transmit buffers into the other's
//! receive buffers ([`receive_burst`](super::receive_burst)).
//!
//! A [`Gather`] starts with a private copy of the frame's first bytes (the headers the device
//! made its decisions on: [`check_frame`](super::check_frame), a switch's forwarding) and
//! takes the rest from the sender's buffers. A sender that rewrites its buffers while the copy
//! runs changes only its own payload: the headers that land are the ones that were checked.
//! Its buffers are the segments of a chain the walk validated ([`Chain`](crate::Chain)), so every byte read
//! is inside guest memory the driver offered for reading.

use core::fmt;
use core::marker::PhantomData;
use core::ptr::NonNull;

use crate::chain::{copy_segments, Segment};
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

    /// The frame's first bytes, those the device holds itself: all of a slice, a
    /// [`Gather`]'s private copy ([`Gather::head`]). What every decision about the frame
    /// reads, so that a sender rewriting its buffers cannot change it.
    fn head(&self) -> &[u8];

    /// The whole frame as one slice, if the device holds it all (a slice; a [`Gather`] no
    /// longer than its head).
    fn contiguous(&self) -> Option<&[u8]>;

    /// Copies the frame's first `min(self.len(), buf.len())` bytes into `buf` (for a device
    /// that needs the frame in one piece: checksum completion, segmentation, a host
    /// interface); returns how many.
    fn read_into(&self, buf: &mut [u8]) -> usize {
        let n = self.len().min(buf.len());
        // SAFETY: `buf` is valid for writes of `n` bytes, `n <= self.len()`; a Rust buffer
        // never overlaps guest memory or another Rust buffer borrowed here.
        unsafe { sealed::CopyOut::copy_out(self, 0, buf.as_mut_ptr(), n) };
        n
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

        /// Copies the first `n` bytes of the frame to `dst`: [`copy_out`](Self::copy_out)
        /// from 0, which a frame may do its own faster way (a whole frame into one buffer).
        ///
        /// # Safety
        /// As for `copy_out` with `at` 0.
        #[cfg_attr(not(feature = "small"), inline(always))]
        unsafe fn copy_from_start(&self, dst: *mut u8, n: usize) {
            // SAFETY: the caller's contract.
            unsafe { self.copy_out(0, dst, n) }
        }
    }
}

impl FrameSource for &[u8] {
    #[cfg_attr(not(feature = "small"), inline(always))]
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    #[cfg_attr(not(feature = "small"), inline(always))]
    fn head(&self) -> &[u8] {
        self
    }

    #[cfg_attr(not(feature = "small"), inline(always))]
    fn contiguous(&self) -> Option<&[u8]> {
        Some(self)
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
/// Built from a copy and the pieces past it ([`Gather::new`], what
/// [`SplitQueue::pop_gather_uncompleted`](crate::SplitQueue::pop_gather_uncompleted) gives) or
/// a slice ([`Gather::slice`], for frames the device holds itself, so that one burst can mix
/// both). Three words: a burst of them is passed around by value.
#[derive(Clone, Copy)]
pub struct Gather<'a> {
    /// The copy of the frame's first bytes: valid for reads of `head_len` bytes for 'a.
    head: NonNull<u8>,
    /// The pieces past the copy: `count` segments valid for 'a (dangling when none).
    rest: NonNull<Segment<'a>>,
    // 32-bit, as a chain's length is (§2.7.5.2).
    len: u32,
    /// `head_len` in the low 24 bits, the number of pieces in the high 8.
    meta: u32,
    _borrow: PhantomData<(&'a [u8], &'a [Segment<'a>])>,
}

/// Longest head a [`Gather`] keeps (24 bits: a slice longer than any frame).
const MAX_HEAD: usize = (1 << 24) - 1;
/// Most pieces a [`Gather`] keeps past its head.
const MAX_PIECES: usize = u8::MAX as usize;

/// An empty frame ([`Gather::slice`] of no bytes), to fill arrays of frames.
impl Default for Gather<'_> {
    fn default() -> Self {
        Gather::slice(&[])
    }
}

impl fmt::Debug for Gather<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gather")
            .field("len", &self.len)
            .field("head", &self.head().len())
            .field("rest", &self.rest())
            .finish()
    }
}

impl<'a> Gather<'a> {
    /// A frame the device holds in `bytes` (cut to 16 MiB, longer than any frame).
    #[inline]
    pub const fn slice(bytes: &'a [u8]) -> Gather<'a> {
        let n = if bytes.len() > MAX_HEAD { MAX_HEAD } else { bytes.len() };
        // SAFETY: a slice's pointer is never null.
        let head = unsafe { NonNull::new_unchecked(bytes.as_ptr().cast_mut()) };
        Gather { head, rest: NonNull::dangling(), len: n as u32, meta: n as u32, _borrow: PhantomData }
    }

    /// A frame whose first bytes are `head` (the caller's copy of them, which it made its
    /// decisions on) and whose other `rest_len` bytes are those of `rest`, the device-readable
    /// pieces of a chain past the bytes copied: what
    /// [`SplitQueue::pop_gather_uncompleted`](crate::SplitQueue::pop_gather_uncompleted)
    /// appends to a [`Segments`](crate::Segments) list (nothing, for a chain its copy holds
    /// whole). `rest_len` is their total length
    /// ([`CopiedChain::readable_len`](crate::CopiedChain::readable_len) less
    /// [`CopiedChain::bytes`](crate::CopiedChain::bytes)); were it larger, the bytes past the
    /// pieces would not be written where the frame is placed (whatever the receiver's buffer
    /// held stays there), never read from elsewhere, as for pieces past the 255th or a head
    /// longer than 16 MiB (cut).
    ///
    /// The bytes of `rest` are read when the frame is placed, so the chain must not be
    /// completed before then: its buffers still belong to the device.
    #[inline]
    pub fn new(head: &'a [u8], rest: &'a [Segment<'a>], rest_len: usize) -> Gather<'a> {
        debug_assert_eq!(rest.iter().map(Segment::len).sum::<usize>(), rest_len);
        let h = head.len().min(MAX_HEAD);
        let count = rest.len().min(MAX_PIECES);
        let len = (h as u64 + rest_len as u64).min(u64::from(u32::MAX)) as u32;
        // SAFETY: slices' pointers are never null.
        let (head, rest) = unsafe {
            (NonNull::new_unchecked(head.as_ptr().cast_mut()), NonNull::new_unchecked(rest.as_ptr().cast_mut()))
        };
        Gather { head, rest, len, meta: h as u32 | (count as u32) << 24, _borrow: PhantomData }
    }

    /// The pieces past the head.
    #[inline]
    fn rest(&self) -> &'a [Segment<'a>] {
        // SAFETY: `rest` and the count come from a slice borrowed for 'a (`new`), or are
        // dangling and 0 (`slice`).
        unsafe { core::slice::from_raw_parts(self.rest.as_ptr(), (self.meta >> 24) as usize) }
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
        // SAFETY: `head` and its length come from a slice borrowed for 'a, its length cut.
        unsafe { core::slice::from_raw_parts(self.head.as_ptr(), (self.meta & MAX_HEAD as u32) as usize) }
    }

    /// The whole frame as one slice, if the device holds it ([`Gather::slice`], or a frame no
    /// longer than its head).
    #[inline]
    pub fn contiguous(&self) -> Option<&'a [u8]> {
        (self.meta == self.len).then(|| self.head())
    }
}

impl FrameSource for Gather<'_> {
    #[inline]
    fn len(&self) -> usize {
        self.len as usize
    }

    #[inline]
    fn head(&self) -> &[u8] {
        Gather::head(self)
    }

    #[inline]
    fn contiguous(&self) -> Option<&[u8]> {
        Gather::contiguous(self)
    }
}

impl sealed::CopyOut for Gather<'_> {
    #[cfg_attr(not(feature = "small"), inline(always))]
    unsafe fn copy_from_start(&self, dst: *mut u8, n: usize) {
        // The usual copy: a frame whose rest is one piece (a frame the driver sent in one
        // buffer behind the copy of its headers), into one receive buffer: no walk.
        let head = self.head();
        let h = head.len();
        if let [seg] = self.rest() {
            if n > h {
                let k = (n - h).min(seg.len());
                // SAFETY: the head is Rust memory valid for `h < n` bytes; `dst` is valid for
                // `n` bytes (the caller) and never overlaps Rust memory; `seg` is a
                // device-readable segment of a validated chain, valid for reads of
                // `seg.len() >= k` bytes for longer than 'a, written at `dst + h`, `h + k <= n`:
                // both guest memory, possibly overlapping (`move_bytes`).
                unsafe {
                    copy_bytes(head.as_ptr(), dst, h);
                    move_bytes(seg.as_ptr(), dst.add(h), k);
                }
                return;
            }
        }
        // SAFETY: the caller's contract.
        unsafe { self.copy_out(0, dst, n) }
    }

    #[cfg_attr(not(feature = "small"), inline(always))]
    unsafe fn copy_out(&self, at: usize, dst: *mut u8, n: usize) {
        let head = self.head();
        let h = head.len();
        let mut done = 0;
        if at < h {
            done = (h - at).min(n);
            // SAFETY: `at + done <= h`: within the head, Rust memory; `dst` valid for `n >=
            // done` bytes (the caller) and never overlapping Rust memory.
            unsafe { copy_bytes(head.as_ptr().add(at), dst, done) };
        }
        if done < n {
            // `at + done >= h` here: either `at >= h`, or the head was copied to its end.
            copy_segments(self.rest(), at + done - h, n - done, |seg, o, k, d| {
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
