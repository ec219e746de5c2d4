//! The block data path: bursts on a device's request queues.
//!
//! Each burst locks the ring's shared state once, takes up to a batch of request chains
//! through the core's chain walk (`SplitQueue::pop_into`), and serves each one completely
//! before the next: the core parses and validates it (`virtq::blk::parse`, one owner for
//! every request rule), the data moves between the image and the guest's buffers with one
//! `preadv`/`pwritev` over the buffers' host pieces, and the status byte is written. The used
//! index is published once per burst and the guest signalled at most once.
//!
//! With `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` every request is recorded in the front-end's
//! inflight area ([`crate::inflight`]) from the moment it is taken until its completion is in
//! the used ring, and a ring that starts with requests in flight serves them again.
//!
//! Requests complete in the order they were made available. Malformed requests get
//! `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP` in their status byte, chains the walk refused
//! included (`virtq::blk::complete_malformed`); only a chain without a usable status byte
//! gets used length 0. Each costs a rate-limited log line; the queue keeps moving.
//!
//! Discard and write-zeroes requests are bounded by the limits the configuration space
//! advertises (one segment of at most 16 MiB), and a burst ends early after
//! [`BURST_ZEROES`] of them, so a guest cannot hold the thread that serves every ring.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use virtq::blk::{self, BlkConfig, DiscardSegment, Limits, Request, RequestError, RequestType, Status, ID_BYTES};
use virtq::{Chain, PopError, VirtioFeatures};
use virtq_vhost_user::limited;
use virtq_vhost_user::vring::{finish_burst, RingFault, VringShared};

use crate::image::Image;
use crate::inflight::InflightArea;
use crate::model::MAX_SEGMENTS;

/// `seg_max` (§5.2.4): data segments per request the driver may use. Linux adds a descriptor
/// for the header and one for the status byte, and the whole chain (an indirect table
/// included) may not be longer than the queue size (§2.7.5.2; the chain walk refuses a longer
/// indirect table): 126 fits queues of 128 entries and more, QEMU's vhost-user-blk default
/// (QEMU's own virtio-blk advertises queue size − 2 the same way). The configuration space is
/// read before the queue size is known, so this is fixed.
pub const SEG_MAX: u32 = 126;

/// Segments a request chain may have in the walk's list: `seg_max` data buffers, the header
/// and the status byte, and room for buffers that span two memory regions (each such buffer
/// is one more segment).
pub const CHAIN_SEGMENTS: usize = 160;

/// Requests served per ring per burst.
pub const BURST: usize = 32;

/// Bytes of discard / write-zeroes ranges after which a burst ends early: 64 MiB, four
/// requests at the advertised limit ([`crate::model::MAX_WRITE_ZEROES_SECTORS`]). Where the file
/// system cannot zero a range in its metadata the zeroes are written, and the one data-path
/// thread serves every ring of every device: the other rings get their turn first.
pub const BURST_ZEROES: u64 = 64 << 20;

/// Per-queue counters.
#[derive(Debug, Default)]
struct QueueStats {
    requests: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    errors: AtomicU64,
}

/// A snapshot of a queue's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkCounters {
    /// Requests completed (any status).
    pub requests: u64,
    /// Bytes read from the image into the guest.
    pub read_bytes: u64,
    /// Bytes written from the guest to the image.
    pub written_bytes: u64,
    /// Requests completed with an error status, or malformed chains.
    pub errors: u64,
    /// Times the ring faulted and stopped being served until set up again.
    pub faults: u64,
}

struct Queue {
    shared: Arc<Mutex<VringShared>>,
    stats: QueueStats,
    /// The ring, started, was looked at by [`BlkDevice::sync_rings`] (inflight recovery done):
    /// the data path serves it only then. Read and written under the ring's lock.
    ready: AtomicBool,
    /// Requests of this start are recorded in the inflight area.
    tracking: AtomicBool,
    /// The next `counter` for the inflight area (the order requests were taken in).
    counter: AtomicU64,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, VringShared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A vhost-user-blk device as the data path sees it. Cheap to clone; stays valid across
/// front-end reconnects (bursts do nothing while the rings are stopped).
#[derive(Clone)]
pub struct BlkDevice {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    queues: Vec<Queue>,
    image: Arc<Image>,
    /// The limits requests are checked against (capacity, discard and write-zeroes limits).
    config: BlkConfig,
    id: [u8; ID_BYTES],
    /// `writeback` as the driver set it ([`crate::model::BlkModel`] keeps it up to date).
    writeback: AtomicBool,
    /// The inflight area of `SET_INFLIGHT_FD`, while there is one.
    inflight: Mutex<Option<Arc<InflightArea>>>,
}

impl std::fmt::Debug for BlkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDevice").field("name", &self.inner.name).field("queues", &self.inner.queues.len()).finish()
    }
}

/// What one request did, for the counters.
#[derive(Default)]
struct Tally {
    read: u64,
    written: u64,
    errors: u64,
    /// Bytes of discard and write-zeroes ranges acted on in this burst ([`BURST_ZEROES`]).
    zeroed: u64,
}

impl BlkDevice {
    /// Wraps a device's vrings (index = request queue) over `image`.
    pub fn new(
        name: &str,
        rings: Vec<Arc<Mutex<VringShared>>>,
        image: Arc<Image>,
        config: BlkConfig,
        id: [u8; ID_BYTES],
    ) -> BlkDevice {
        let queues = rings
            .into_iter()
            .map(|shared| Queue {
                shared,
                stats: QueueStats::default(),
                ready: AtomicBool::new(false),
                tracking: AtomicBool::new(false),
                counter: AtomicU64::new(0),
            })
            .collect();
        let inner = Inner {
            name: name.to_string(),
            queues,
            image,
            config,
            id,
            writeback: AtomicBool::new(true),
            inflight: Mutex::new(None),
        };
        BlkDevice { inner: Arc::new(inner) }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Number of request queues.
    pub fn num_queues(&self) -> usize {
        self.inner.queues.len()
    }

    /// Sets the write cache mode (`writeback` of the configuration space).
    pub fn set_writeback(&self, writeback: bool) {
        self.inner.writeback.store(writeback, Ordering::Release);
    }

    /// Whether the data path runs in writeback mode (else every write is made stable before
    /// it completes).
    pub fn writeback(&self) -> bool {
        self.inner.writeback.load(Ordering::Acquire)
    }

    /// Sets the inflight area (`SET_INFLIGHT_FD`; `None` after a reset).
    pub fn set_inflight(&self, area: Option<Arc<InflightArea>>) {
        *self.inflight_lock() = area;
    }

    fn inflight_lock(&self) -> MutexGuard<'_, Option<Arc<InflightArea>>> {
        self.inner.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For the control thread after every request: a ring that started since the last call is
    /// handed to the data path, after its inflight region (if there is one for it) was set up
    /// or repaired. Requests the region shows in flight are served again: they are the ones
    /// the available ring holds from the used index on (requests complete in order), so the
    /// ring resumes there. Returns `(queue, requests in flight)` for each ring that resumed
    /// with requests in flight.
    pub fn sync_rings(&self) -> Vec<(usize, u16)> {
        let area = self.inflight_lock().clone();
        let mut resumed = Vec::new();
        for (i, q) in self.inner.queues.iter().enumerate() {
            let mut s = q.lock();
            let Some(active) = s.active.as_mut() else {
                q.ready.store(false, Ordering::Relaxed);
                continue;
            };
            if q.ready.load(Ordering::Relaxed) {
                continue;
            }
            let recovered = area
                .as_ref()
                .and_then(|a| a.queue(i))
                .and_then(|r| r.recover(active.positions().1, active.config.size));
            match recovered {
                Some((inflight, counter)) => {
                    q.tracking.store(true, Ordering::Relaxed);
                    q.counter.store(counter, Ordering::Relaxed);
                    limited!(info, "{}: queue {i}: requests tracked in the inflight area", self.name());
                    if inflight > 0 {
                        let used = active.positions().1;
                        active.set_positions(used, used);
                        resumed.push((i, inflight));
                    }
                }
                None => {
                    if area.is_some() {
                        limited!(
                            warn,
                            "{}: queue {i}: the inflight area does not fit the ring; not tracked",
                            self.name()
                        );
                    }
                    q.tracking.store(false, Ordering::Relaxed);
                }
            }
            q.ready.store(true, Ordering::Relaxed);
        }
        resumed
    }

    /// Counters of request queue `index`.
    pub fn stats(&self, index: usize) -> BlkCounters {
        let Some(q) = self.inner.queues.get(index) else { return BlkCounters::default() };
        let s = &q.stats;
        BlkCounters {
            requests: s.requests.load(Ordering::Relaxed),
            read_bytes: s.read_bytes.load(Ordering::Relaxed),
            written_bytes: s.written_bytes.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            faults: q.lock().faults,
        }
    }

    /// Serves up to `budget` requests (at most [`BURST`]) of queue `index`; returns how many were
    /// completed.
    /// Nothing happens while the ring is stopped, disabled or faulted.
    pub fn process(&self, index: usize, budget: usize) -> usize {
        // The in-flight batch holds one burst.
        let budget = budget.min(BURST);
        let Some(q) = self.inner.queues.get(index) else { return 0 };
        let mut s = q.lock();
        if !q.ready.load(Ordering::Relaxed) {
            return 0;
        }
        let (Some(active), true, _) = s.burst_parts() else { return 0 };
        if active.fault().is_some() {
            return 0;
        }
        let area = if q.tracking.load(Ordering::Relaxed) { self.inflight_lock().clone() } else { None };
        let region = area.as_ref().and_then(|a| a.queue(index));
        let mut counter = q.counter.load(Ordering::Relaxed);
        let mut batch = [0u16; BURST];
        let mut batched = 0;
        let features = active.features;
        let limits = Limits::new(&self.inner.config, features, self.inner.image.read_only());
        // §5.2.6.2: a write is stable at completion without FLUSH negotiated (case 1), or with
        // CONFIG_WCE and `writeback` 0 (case 2); otherwise a FLUSH makes it stable (case 3).
        let writethrough = !features.contains(VirtioFeatures::BLK_FLUSH)
            || (features.contains(VirtioFeatures::BLK_CONFIG_WCE) && !self.inner.writeback.load(Ordering::Acquire));
        let mut done = 0usize;
        let mut tally = Tally::default();
        let mut broken = None;
        let result = active.with_queue(|vq| {
            let mut chain: Chain<'_, CHAIN_SEGMENTS> = Chain::new();
            while done < budget {
                // A malformed chain comes back uncompleted, so that its status byte is written
                // before it is completed, in order with the others.
                let popped = vq.pop_into_uncompleted(&mut chain);
                let taken = match popped {
                    Ok(Some(head)) => Some(head),
                    Err(PopError::Chain { head, .. }) => Some(head),
                    _ => None,
                };
                if let (Some(head), Some(r)) = (taken, &region) {
                    // In flight from here until its completion is in the used ring (a
                    // malformed chain too: it is completed in this batch like the others).
                    r.take(head, counter);
                    counter = counter.wrapping_add(1);
                    batch[batched] = head;
                    batched += 1;
                }
                match popped {
                    Ok(Some(_)) => {
                        let used = self.serve(index, &chain, &limits, writethrough, &mut tally);
                        vq.push(chain.head(), used);
                        done += 1;
                        if tally.zeroed >= BURST_ZEROES {
                            // The other rings get their turn before more zeroing.
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(PopError::Chain { head, error }) => {
                        // §5.2.6: its status byte, if it has one, says IOERR (the core decides
                        // which status and where the byte is); used length 0 otherwise.
                        let used = blk::complete_malformed(vq, head, error);
                        vq.push(head, used);
                        limited!(
                            warn,
                            "{}: queue {index}: head {head}: {}",
                            self.inner.name,
                            RequestError::Malformed { error }
                        );
                        tally.errors += 1;
                        done += 1;
                    }
                    Err(e) => {
                        tally.errors += 1;
                        // An invalid available index, or no valid head to complete where that
                        // loses the driver's place, stops the ring (the same rule as for
                        // virtio-net; the second never on the rings this device serves today:
                        // it offers neither IN_ORDER nor packed rings).
                        if let Some(fault) = RingFault::on_pop_error(vq, &e) {
                            broken = Some(fault);
                            break;
                        }
                        // No valid head to complete: the slot is skipped.
                        limited!(warn, "{}: queue {index}: {e}", self.inner.name);
                        done += 1;
                    }
                }
            }
            let Some(r) = &region else { return vq.publish() };
            // "When supplying used buffers": link the batch, move the used index, then clear.
            r.link_batch(&batch[..batched]);
            let notify = vq.publish();
            r.complete_batch(&batch[..batched], vq.next_used());
            notify
        });
        q.counter.store(counter, Ordering::Relaxed);
        finish_burst(s, result, broken, |s, fault| self.fail(index, s, fault));
        let st = &q.stats;
        if done != 0 {
            st.requests.fetch_add(done as u64, Ordering::Relaxed);
        }
        if tally.read != 0 {
            st.read_bytes.fetch_add(tally.read, Ordering::Relaxed);
        }
        if tally.written != 0 {
            st.written_bytes.fetch_add(tally.written, Ordering::Relaxed);
        }
        if tally.errors != 0 {
            st.errors.fetch_add(tally.errors, Ordering::Relaxed);
        }
        done
    }

    /// Records a fault of queue `index` and logs it once.
    fn fail(&self, index: usize, s: &mut VringShared, fault: RingFault) {
        if s.fail(fault) {
            limited!(
                warn,
                "{}: queue {index} stopped: {fault}; it restarts when the front-end sets it up again or resets the device",
                self.inner.name
            );
        }
    }

    /// Serves one request chain; returns the used length.
    fn serve<const N: usize>(
        &self,
        index: usize,
        chain: &Chain<'_, N>,
        limits: &Limits,
        writethrough: bool,
        tally: &mut Tally,
    ) -> u32 {
        let name = &self.inner.name;
        let req = match blk::parse(chain, limits) {
            Ok(req) => req,
            Err(e) => {
                limited!(warn, "{name}: queue {index}: {e}");
                tally.errors += 1;
                return blk::complete_error(chain, &e);
            }
        };
        match self.execute(chain, &req, limits, writethrough, tally) {
            Ok(written) => blk::complete(chain, written, Status::Ok),
            Err(Failure::Request(e)) => {
                limited!(warn, "{name}: queue {index}: {e}");
                tally.errors += 1;
                blk::complete_error(chain, &e)
            }
            Err(Failure::Io(e)) => {
                limited!(warn, "{name}: queue {index}: {:?} at sector {}: {e}", req.kind, req.sector);
                tally.errors += 1;
                blk::complete(chain, 0, Status::IoErr)
            }
        }
    }

    /// Does what a valid request asks; returns the data bytes written into the guest's
    /// buffers.
    fn execute<const N: usize>(
        &self,
        chain: &Chain<'_, N>,
        req: &Request,
        limits: &Limits,
        writethrough: bool,
        tally: &mut Tally,
    ) -> Result<u32, Failure> {
        let image = &self.inner.image;
        match req.kind {
            RequestType::In | RequestType::Out => {
                let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; CHAIN_SEGMENTS];
                let mut n = 0;
                for (ptr, len) in blk::data_pieces(chain, req) {
                    // A chain has at most CHAIN_SEGMENTS segments, and each piece is (part
                    // of) one of them.
                    iov[n] = libc::iovec { iov_base: ptr.cast(), iov_len: len };
                    n += 1;
                }
                if req.kind == RequestType::In {
                    // SAFETY: the pieces are device-writable guest buffers of this chain, in
                    // the ring's memory map, which the locked ring holds (so they stay mapped
                    // during the call); the kernel writes them, no Rust reference covers guest
                    // memory (GuestMemory contract). A page the guest lost makes the call fail
                    // with EFAULT.
                    let got = unsafe { image.read_vectored_at(&mut iov[..n], req.offset()) }?;
                    tally.read += got as u64;
                    Ok(req.data_len)
                } else {
                    // SAFETY: as above, device-readable buffers, read by the kernel.
                    let put = unsafe { image.write_vectored_at(&mut iov[..n], req.offset()) }?;
                    tally.written += put as u64;
                    if writethrough {
                        image.flush()?;
                    }
                    Ok(0)
                }
            }
            RequestType::Flush => {
                image.flush()?;
                Ok(0)
            }
            RequestType::GetId => {
                // `parse` checked room for the whole ID before the status byte.
                Ok(chain.write_at(0, &self.inner.id) as u32)
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                let mut out = [DiscardSegment::default(); MAX_SEGMENTS];
                // Every segment is copied and checked before any is acted on, against the
                // limits the configuration space advertises too (§5.2.6.1: the driver must not
                // exceed them; IOERR if it does), which bound the work of one request.
                let segs = blk::read_segments(chain, req, limits, &mut out)?;
                for s in segs {
                    tally.zeroed += s.len();
                    if req.kind == RequestType::Discard {
                        image.discard(s.offset(), s.len())?;
                    } else {
                        image.write_zeroes(s.offset(), s.len(), s.unmap)?;
                    }
                }
                if writethrough && req.kind == RequestType::WriteZeroes {
                    image.flush()?;
                }
                Ok(0)
            }
        }
    }
}

/// Why a valid-looking request failed.
enum Failure {
    /// Its segments broke a rule (`read_segments`).
    Request(blk::RequestError),
    /// The image refused.
    Io(std::io::Error),
}

impl From<blk::RequestError> for Failure {
    fn from(e: blk::RequestError) -> Failure {
        Failure::Request(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::Io(e)
    }
}

/// The data path thread's loop: polls every queue of every device in bursts of [`BURST`]
/// until `stop` is set. When idle it backs off with sleeps growing to 1 ms, unless
/// `busy_poll`.
pub fn run_data_path(devices: &[BlkDevice], stop: &AtomicBool, busy_poll: bool) {
    let mut idle = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let mut work = 0;
        for d in devices {
            for q in 0..d.num_queues() {
                work += d.process(q, BURST);
            }
        }
        if work != 0 {
            idle = 0;
            continue;
        }
        idle = idle.saturating_add(1);
        if !busy_poll && idle > 64 {
            std::thread::sleep(Duration::from_micros(u64::from(idle - 64).min(1000)));
        } else {
            std::hint::spin_loop();
        }
    }
}
