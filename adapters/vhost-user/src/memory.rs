//! Guest memory shared by the front-end: the vhost-user memory table.
//!
//! The front-end (QEMU, DPDK virtio-user, ...) shares guest RAM as file descriptors (memfd,
//! tmpfs or hugetlbfs files) and describes each region with four numbers (vhost-user.rst,
//! "Memory regions description"): `guest_phys_addr`, `memory_size`, `userspace_addr` (where the
//! region sits in the front-end's own address space) and `mmap_offset` (where it starts in the
//! fd). Regions arrive either all at once in `VHOST_USER_SET_MEM_TABLE` (at most
//! [`SET_MEM_TABLE_MAX_REGIONS`], one fd each, replacing the whole table: see
//! [`GuestMemoryMap::from_table`]), or, once `VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS` is
//! negotiated, one at a time in `VHOST_USER_ADD_MEM_REG` / `VHOST_USER_REM_MEM_REG`
//! ([`GuestMemoryMap::add_region`] / [`GuestMemoryMap::remove_region`]), up to the number of slots
//! the back-end reported in `VHOST_USER_GET_MAX_MEM_SLOTS` ([`GuestMemoryMap::max_slots`]).
//!
//! Two address spaces point into the same memory (vhost-user.rst, "Memory access"): descriptor
//! buffers carry guest physical addresses, translated by [`GuestMemoryMap`] itself, while the
//! ring addresses of `VHOST_USER_SET_VRING_ADDR` are front-end virtual ("user") addresses,
//! translated by [`GuestMemoryMap::frontend`]:
//!
//! ```ignore
//! let queue = SplitQueue::with_ring_memory(&map, map.frontend(), config, features)?;
//! ```
//!
//! (With `VIRTIO_F_IOMMU_PLATFORM` guest addresses are IOVAs translated through the IOTLB; that
//! is not handled here.)
//!
//! ## Hostile input
//! Every region is validated before anything is mapped (hostile-inputs family 15): size 0,
//! `guest_phys_addr + memory_size`, `userspace_addr + memory_size` and `mmap_offset +
//! memory_size` overflowing, the page rounding of the mapping length overflowing (the DPDK
//! `0fe99cf73e` / `c6420a3632` zero-length mmap), overlap with another region in either address
//! space, more regions than slots, and a file too small for `mmap_offset + memory_size` (a
//! mapping past EOF would raise SIGBUS on the first access). Building a table is all-or-nothing:
//! on any error every region mapped so far is unmapped and every fd is closed.
//!
//! ## Sharing between threads
//! Regions are held as `Arc<MappedRegion>`, so cloning a [`GuestMemoryMap`] is cheap and shares
//! the mappings. The control thread builds the next table (`clone()` then `add_region` /
//! `remove_region`, or `from_table`) while data-path threads keep translating through the
//! current one behind an `Arc<GuestMemoryMap>`; a region is unmapped when the last map holding it
//! is dropped, never under a reader.

use std::fmt;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::Arc;

use virtq::{GuestMemory, HostRange, MemError};

pub mod dirty;
pub mod fault;
pub mod mapping;

use mapping::MapError;

/// Regions a `VHOST_USER_SET_MEM_TABLE` message can carry (`VHOST_MEMORY_BASELINE_NREGIONS`),
/// and the slot limit of a map built by [`GuestMemoryMap::from_table`].
pub const SET_MEM_TABLE_MAX_REGIONS: usize = 8;

/// A reasonable answer to `VHOST_USER_GET_MAX_MEM_SLOTS` when
/// `VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS` is offered (QEMU caps it at what its platform
/// supports). Pass it to [`GuestMemoryMap::new`].
pub const DEFAULT_MAX_MEM_SLOTS: usize = 32;

/// One memory region as the front-end describes it (vhost-user.rst "Memory regions
/// description"; the payload of `VHOST_USER_ADD_MEM_REG` / `VHOST_USER_REM_MEM_REG` is one of
/// these after 8 bytes of padding). Plain numbers, not yet validated.
///
/// This is the crate's one region type: the message layer decodes it from the wire
/// ([`crate::message::FrontendMessage::SetMemTable`], `AddMemReg`, `RemMemReg`; the wire form
/// is [`MemoryRegionDesc::from_bytes`]) and hands it to the map unchanged. Its rules are
/// checked in one place, [`MemoryRegionDesc::validate`], when the map takes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemoryRegionDesc {
    /// Guest physical address of the first byte ("guest address").
    pub guest_phys_addr: u64,
    /// Length of the region in bytes ("size").
    pub memory_size: u64,
    /// Address of the first byte in the front-end's virtual address space ("user address").
    pub userspace_addr: u64,
    /// Offset of the first byte in the file descriptor ("mmap offset"); need not be
    /// page-aligned.
    pub mmap_offset: u64,
}

impl MemoryRegionDesc {
    /// Checks everything that can be checked without the fd (hostile-inputs family 15):
    /// `memory_size ≠ 0`, and `guest_phys_addr + memory_size`, `userspace_addr + memory_size`
    /// and `mmap_offset + memory_size` representable in 64 bits (the exclusive end of each
    /// range must exist, or the overlap and translation arithmetic would wrap), the last also
    /// in `usize`. Returns `mmap_offset + memory_size`, the file length the region needs.
    ///
    /// The single owner of these rules: [`GuestMemoryMap::from_table`] and
    /// [`GuestMemoryMap::add_region`] call it before anything is mapped, and the message layer
    /// does not repeat it (every region reaches the map, and the map is also public API that
    /// must check what it is given). Overlaps, slot limits and the fd's size need the table or
    /// the fd and are checked by the map.
    pub fn validate(&self) -> Result<u64, MemoryError> {
        let overflow = |field| MemoryError::Overflow { region: *self, field };
        if self.memory_size == 0 {
            return Err(MemoryError::ZeroSize { region: *self });
        }
        self.guest_phys_addr.checked_add(self.memory_size).ok_or(overflow(OverflowField::GuestPhysAddr))?;
        self.userspace_addr.checked_add(self.memory_size).ok_or(overflow(OverflowField::UserspaceAddr))?;
        let file_end = self.mmap_offset.checked_add(self.memory_size).ok_or(overflow(OverflowField::MmapOffset))?;
        // Translation works in `usize` offsets inside the mapping.
        usize::try_from(file_end).map_err(|_| overflow(OverflowField::MappingLength))?;
        Ok(file_end)
    }

    /// True if `[a, a + len)` of this region and of `other` intersect, `a` chosen by `start`.
    /// Both ends were checked by `validate`, so the additions do not overflow.
    fn overlaps(&self, other: &MemoryRegionDesc, start: fn(&MemoryRegionDesc) -> u64) -> bool {
        start(self) < start(other) + other.memory_size && start(other) < start(self) + self.memory_size
    }
}

impl fmt::Display for MemoryRegionDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "region gpa {:#x} size {:#x} uaddr {:#x} mmap_offset {:#x}",
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )
    }
}

/// A region of guest memory whose backing file shrank under the mapping: an access raised
/// `SIGBUS`, and the region now holds zero pages (see [`fault`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryFault {
    /// The region as the front-end described it.
    pub region: MemoryRegionDesc,
    /// Guest physical address of the first access that faulted (`None` if it fell in the part
    /// of the mapping before `mmap_offset`).
    pub guest_addr: Option<u64>,
}

impl fmt::Display for MemoryFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: its file shrank under the mapping", self.region)?;
        if let Some(a) =
            self.guest_addr.filter(|a| a.wrapping_sub(self.region.guest_phys_addr) < self.region.memory_size)
        {
            write!(f, " (SIGBUS at guest address {a:#x})")?;
        }
        Ok(())
    }
}

/// Which computation of a region overflowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OverflowField {
    /// `guest_phys_addr + memory_size` does not fit in 64 bits.
    GuestPhysAddr,
    /// `userspace_addr + memory_size` does not fit in 64 bits.
    UserspaceAddr,
    /// `mmap_offset + memory_size` does not fit in 64 bits.
    MmapOffset,
    /// The mapping length (`mmap_offset + memory_size` rounded up to the page size, or to the
    /// huge page size on hugetlbfs) overflows, or does not fit in the host address space.
    MappingLength,
}

impl fmt::Display for OverflowField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OverflowField::GuestPhysAddr => "guest_phys_addr + memory_size",
            OverflowField::UserspaceAddr => "userspace_addr + memory_size",
            OverflowField::MmapOffset => "mmap_offset + memory_size",
            OverflowField::MappingLength => "page-rounded mapping length",
        })
    }
}

/// Why a region or a memory table was refused. Nothing stays mapped after any of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryError {
    /// `VHOST_USER_SET_MEM_TABLE` with `num_regions == 0`.
    NoRegions,
    /// `VHOST_USER_SET_MEM_TABLE` whose fd count differs from its region count ("the size and
    /// ordering of the fds matches the number and ordering of memory regions").
    FdCountMismatch {
        /// Regions in the table.
        regions: usize,
        /// File descriptors received with it.
        fds: usize,
    },
    /// More regions than slots: more than [`SET_MEM_TABLE_MAX_REGIONS`] in a table, or an
    /// `VHOST_USER_ADD_MEM_REG` beyond what `VHOST_USER_GET_MAX_MEM_SLOTS` reported.
    TooManyRegions {
        /// Number of regions the operation would have produced.
        requested: usize,
        /// The slot limit.
        max: usize,
    },
    /// `memory_size == 0`.
    ZeroSize {
        /// The offending region.
        region: MemoryRegionDesc,
    },
    /// An address or length computation overflowed.
    Overflow {
        /// The offending region.
        region: MemoryRegionDesc,
        /// Which computation.
        field: OverflowField,
    },
    /// The region overlaps another one in guest physical address space.
    GuestPhysOverlap {
        /// The offending region.
        region: MemoryRegionDesc,
        /// The region already in the table (or earlier in the same table).
        existing: MemoryRegionDesc,
    },
    /// The region overlaps another one in front-end virtual address space (which would make
    /// ring-address translation ambiguous).
    FrontendVirtOverlap {
        /// The offending region.
        region: MemoryRegionDesc,
        /// The region already in the table (or earlier in the same table).
        existing: MemoryRegionDesc,
    },
    /// `VHOST_USER_REM_MEM_REG` names no region (matched on guest address, user address and
    /// size; "the mmap offset is ignored").
    UnknownRegion {
        /// Guest physical address given.
        guest_phys_addr: u64,
        /// Front-end virtual address given.
        userspace_addr: u64,
        /// Size given.
        memory_size: u64,
    },
    /// `fstat` on the region's fd failed.
    Fstat {
        /// The `errno` value.
        errno: i32,
    },
    /// The fd is a file shorter than `mmap_offset + memory_size`: touching the tail would raise
    /// SIGBUS.
    FdTooSmall {
        /// The offending region.
        region: MemoryRegionDesc,
        /// `st_size` of the fd.
        file_size: u64,
    },
    /// `mmap` failed.
    Mmap {
        /// The offending region.
        region: MemoryRegionDesc,
        /// The `errno` value.
        errno: i32,
    },
    /// The region's fd is not a memfd sealed with `F_SEAL_SHRINK`, and the device requires
    /// sealed memory (`DeviceConfig::require_sealed_memory`).
    NotSealed {
        /// The offending region.
        region: MemoryRegionDesc,
    },
    /// The process already maps [`fault::MAX_REGIONS`] regions, the most the `SIGBUS` handler
    /// can tell apart; a region it cannot protect is not mapped.
    FaultTableFull {
        /// The offending region.
        region: MemoryRegionDesc,
    },
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let os = |errno: i32| std::io::Error::from_raw_os_error(errno);
        match self {
            MemoryError::NoRegions => f.write_str("memory table has no regions"),
            MemoryError::FdCountMismatch { regions, fds } => {
                write!(f, "memory table has {regions} regions but came with {fds} fds")
            }
            MemoryError::TooManyRegions { requested, max } => {
                write!(f, "{requested} memory regions exceed the limit of {max}")
            }
            MemoryError::ZeroSize { region } => write!(f, "{region}: memory_size is 0"),
            MemoryError::Overflow { region, field } => write!(f, "{region}: {field} overflows"),
            MemoryError::GuestPhysOverlap { region, existing } => {
                write!(f, "{region}: overlaps ({existing}) in guest physical address space")
            }
            MemoryError::FrontendVirtOverlap { region, existing } => {
                write!(f, "{region}: overlaps ({existing}) in front-end virtual address space")
            }
            MemoryError::UnknownRegion { guest_phys_addr, userspace_addr, memory_size } => write!(
                f,
                "no region with gpa {guest_phys_addr:#x} uaddr {userspace_addr:#x} size {memory_size:#x} to remove"
            ),
            MemoryError::Fstat { errno } => write!(f, "fstat on a memory region fd failed: {}", os(*errno)),
            MemoryError::FdTooSmall { region, file_size } => {
                write!(f, "{region}: fd holds only {file_size:#x} bytes")
            }
            MemoryError::Mmap { region, errno } => write!(f, "{region}: mmap failed: {}", os(*errno)),
            MemoryError::NotSealed { region } => {
                write!(f, "{region}: not sealed against shrinking (F_SEAL_SHRINK), and sealed memory is required")
            }
            MemoryError::FaultTableFull { region } => {
                write!(f, "{region}: the process already maps {} guest memory regions", fault::MAX_REGIONS)
            }
        }
    }
}

impl std::error::Error for MemoryError {}

/// One region of guest memory mapped into this process: `mmap(NULL, round_up(mmap_offset +
/// memory_size), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0)`, the region
/// starting `mmap_offset` bytes into the mapping. Unmapped when dropped.
///
/// The file is mapped from offset 0 because `mmap_offset` need not be page-aligned (as in DPDK
/// and libvhost-user). The fd is closed as soon as the mapping exists: the mapping keeps the
/// file alive, and a back-end with many devices and memory slots would otherwise hold one fd
/// per slot.
///
/// The memory is shared with the guest and the front-end, which may write it at any time; this
/// type never forms a Rust reference into it and only hands out raw pointers.
///
/// The front-end may also shrink the file under the mapping. Every region is registered with
/// the [`fault`] handler, which turns the resulting `SIGBUS` into zero pages and a flag
/// ([`faulted`](Self::faulted)) instead of the death of the process. A region whose file is
/// sealed against shrinking ([`shrink_sealed`](Self::shrink_sealed)) cannot lose its pages
/// that way.
#[derive(Debug)]
pub struct MappedRegion {
    desc: MemoryRegionDesc,
    /// The mapping of the whole file up to the region's end (`mapping::FileMapping`: size
    /// checks, `SIGBUS` registration, unmapped when dropped).
    map: mapping::FileMapping,
    /// `base + mmap_offset`: host address of guest byte `desc.guest_phys_addr`.
    host: NonNull<u8>,
}

// SAFETY: a `MappedRegion` exclusively owns its mapping; `munmap` may run on any thread, and
// `&MappedRegion` only exposes the descriptor and raw pointers, never references into the
// shared memory (dereferencing those is the caller's `unsafe` responsibility, and that memory
// is already written concurrently by the guest).
unsafe impl Send for MappedRegion {}
// SAFETY: as above; no method mutates through `&self`.
unsafe impl Sync for MappedRegion {}

impl MappedRegion {
    /// Validates `desc`, checks it against the fd (`fstat`) and maps it. `fd` is closed before
    /// this returns, whether or not mapping succeeded.
    ///
    /// The mapping length is `mmap_offset + memory_size` rounded up to the page size, or to
    /// `st_blksize` when that is a larger power of two (the huge page size on hugetlbfs, whose
    /// mappings must be unmapped in whole huge pages). For a regular file (memfd, tmpfs,
    /// hugetlbfs) `st_size` must cover `mmap_offset + memory_size`; other fd types are left to
    /// `mmap` to accept or refuse.
    pub fn new(desc: MemoryRegionDesc, fd: OwnedFd) -> Result<MappedRegion, MemoryError> {
        let file_end = desc.validate()?;
        let map = mapping::FileMapping::new(fd, file_end, libc::MAP_NORESERVE, false).map_err(|e| match e {
            MapError::Fstat { errno } => MemoryError::Fstat { errno },
            MapError::TooSmall { file_size } => MemoryError::FdTooSmall { region: desc, file_size },
            MapError::Length | MapError::NotAFile { .. } => {
                MemoryError::Overflow { region: desc, field: OverflowField::MappingLength }
            }
            MapError::Mmap { errno } => MemoryError::Mmap { region: desc, errno },
            MapError::FaultTableFull => MemoryError::FaultTableFull { region: desc },
        })?;
        // `file_end` fits in usize (validate) and `mmap_offset < file_end <= mapping length`.
        // SAFETY: `mmap_offset` is inside the mapping, so the result is too (hence non-null).
        let host = unsafe { map.base().add(desc.mmap_offset as usize) };
        log::debug!("mapped {desc} at {host:p} (mapping {:p}+{:#x})", map.base(), map.len());
        Ok(MappedRegion { desc, map, host })
    }

    /// The region as the front-end described it.
    pub fn desc(&self) -> MemoryRegionDesc {
        self.desc
    }

    /// Host address of the region's first byte (guest address `guest_phys_addr`), i.e. the
    /// mapping's start plus `mmap_offset`. What a back-end reports as the region's base in the
    /// postcopy reply to `VHOST_USER_SET_MEM_TABLE` / `VHOST_USER_ADD_MEM_REG`.
    pub fn host_addr(&self) -> NonNull<u8> {
        self.host
    }

    /// Length of the whole mapping (from file offset 0, page-rounded), for diagnostics.
    pub fn mapping_len(&self) -> usize {
        self.map.len()
    }

    /// Whether the file was sealed against shrinking (`F_SEAL_SHRINK`) when it was mapped, so
    /// that the front-end cannot take the pages away.
    pub fn shrink_sealed(&self) -> bool {
        self.map.shrink_sealed()
    }

    /// `Some(host address)` of the first access that found the file's pages gone (the file
    /// shrank under the mapping). The region then holds zero pages, not guest memory, and the
    /// device using it must stop until it gets a new memory table or is reset.
    pub fn faulted(&self) -> Option<usize> {
        self.map.faulted()
    }
}

/// The translation data of one region, kept flat so the per-buffer lookup scans one small
/// array instead of chasing an `Arc` per region.
#[derive(Clone, Copy, Debug)]
struct Slot {
    gpa: u64,
    uaddr: u64,
    size: u64,
    /// Host address of the first byte; valid for `size` bytes while the owning region lives.
    host: NonNull<u8>,
    /// How many `ADD_MEM_REG`s of this exact region are outstanding (see `add_region`).
    refs: u32,
}

/// The guest memory table: mapped regions, non-overlapping in guest physical and in front-end
/// virtual address space, sorted by guest physical address, at most [`max_slots`] of them.
///
/// Implements [`virtq::GuestMemory`] for guest physical addresses (descriptor buffers);
/// [`frontend`](Self::frontend) gives the translator for front-end virtual addresses (ring
/// addresses). `Clone` shares the mappings (see the module documentation).
///
/// [`max_slots`]: Self::max_slots
#[derive(Clone, Debug)]
pub struct GuestMemoryMap {
    /// Owners of the mappings, in the same order as `slots`.
    regions: Vec<Arc<MappedRegion>>,
    slots: Vec<Slot>,
    max_slots: usize,
}

// SAFETY: `regions` is Send + Sync (MappedRegion's impls above). `slots` only holds copies of
// addresses and host pointers into mappings owned by `regions`; they are read, never written,
// through `&self`, and changed only through `&mut self`. The memory behind the pointers is
// reached only through raw pointers handed out under the `GuestMemory` contract, which already
// allows for concurrent writers (the guest).
unsafe impl Send for GuestMemoryMap {}
// SAFETY: as above.
unsafe impl Sync for GuestMemoryMap {}

impl Default for GuestMemoryMap {
    /// An empty map with [`SET_MEM_TABLE_MAX_REGIONS`] slots: the state before the first
    /// `VHOST_USER_SET_MEM_TABLE`.
    fn default() -> Self {
        GuestMemoryMap::new(SET_MEM_TABLE_MAX_REGIONS)
    }
}

impl GuestMemoryMap {
    /// An empty map that accepts up to `max_slots` regions: the starting point for
    /// `VHOST_USER_ADD_MEM_REG`, with `max_slots` the value reported for
    /// `VHOST_USER_GET_MAX_MEM_SLOTS` (e.g. [`DEFAULT_MAX_MEM_SLOTS`]).
    pub fn new(max_slots: usize) -> Self {
        GuestMemoryMap { regions: Vec::new(), slots: Vec::new(), max_slots }
    }

    /// Builds the map of a `VHOST_USER_SET_MEM_TABLE`: `regions[i]` is mapped from `fds[i]`,
    /// with a limit of [`SET_MEM_TABLE_MAX_REGIONS`] slots (raise it afterwards with
    /// [`set_max_slots`](Self::set_max_slots) if memory slots were negotiated).
    ///
    /// All-or-nothing: on any error every region mapped so far is unmapped. All fds are closed
    /// before this returns, in every case.
    pub fn from_table(regions: &[MemoryRegionDesc], fds: Vec<OwnedFd>) -> Result<Self, MemoryError> {
        if regions.is_empty() {
            return Err(MemoryError::NoRegions);
        }
        if regions.len() != fds.len() {
            return Err(MemoryError::FdCountMismatch { regions: regions.len(), fds: fds.len() });
        }
        let mut map = GuestMemoryMap::new(SET_MEM_TABLE_MAX_REGIONS);
        if regions.len() > map.max_slots {
            return Err(MemoryError::TooManyRegions { requested: regions.len(), max: map.max_slots });
        }
        // Cheap checks of the whole table first, so a bad last region maps nothing at all.
        for (i, r) in regions.iter().enumerate() {
            r.validate()?;
            check_overlap(r, regions[..i].iter())?;
        }
        for (desc, fd) in regions.iter().zip(fds) {
            // On error `map` drops here, unmapping what it holds; the remaining fds drop with
            // the iterator.
            map.add_region(*desc, fd)?;
        }
        Ok(map)
    }

    /// Maps one region from its fd and adds it (`VHOST_USER_ADD_MEM_REG`). `fd` is closed
    /// before this returns. On error the map is unchanged.
    pub fn add_region(&mut self, desc: MemoryRegionDesc, fd: OwnedFd) -> Result<(), MemoryError> {
        desc.validate()?;
        // QEMU before 8.0 sends every region once per vhost_dev, i.e. once per queue pair of a
        // multiqueue net device. An exact repeat of a region already held is counted, not mapped
        // again (its fd is closed); `remove_region` drops the region with its last count.
        if let Some(pos) = self.regions.iter().position(|r| r.desc == desc) {
            self.slots[pos].refs = self.slots[pos].refs.saturating_add(1);
            return Ok(());
        }
        if self.regions.len() >= self.max_slots {
            return Err(MemoryError::TooManyRegions { requested: self.regions.len() + 1, max: self.max_slots });
        }
        check_overlap(&desc, self.regions.iter().map(|r| &r.desc))?;
        let region = MappedRegion::new(desc, fd)?;
        let slot = Slot {
            gpa: desc.guest_phys_addr,
            uaddr: desc.userspace_addr,
            size: desc.memory_size,
            host: region.host,
            refs: 1,
        };
        let pos = self.slots.partition_point(|s| s.gpa < desc.guest_phys_addr);
        self.slots.insert(pos, slot);
        self.regions.insert(pos, Arc::new(region));
        Ok(())
    }

    /// Removes the region with this guest address, user address and size
    /// (`VHOST_USER_REM_MEM_REG`; "the mmap offset is ignored"). It is unmapped once no clone
    /// of this map holds it any more.
    ///
    /// The triple needs no [`validate`](MemoryRegionDesc::validate) of its own: every region
    /// held passed it, so a zero size or an overflowing end matches nothing and is
    /// [`MemoryError::UnknownRegion`].
    pub fn remove_region(
        &mut self,
        guest_phys_addr: u64,
        userspace_addr: u64,
        memory_size: u64,
    ) -> Result<(), MemoryError> {
        let pos = self
            .slots
            .iter()
            .position(|s| s.gpa == guest_phys_addr && s.uaddr == userspace_addr && s.size == memory_size)
            .ok_or(MemoryError::UnknownRegion { guest_phys_addr, userspace_addr, memory_size })?;
        if self.slots[pos].refs > 1 {
            self.slots[pos].refs -= 1;
            return Ok(());
        }
        self.slots.remove(pos);
        self.regions.remove(pos);
        Ok(())
    }

    /// Changes the slot limit (the value reported for `VHOST_USER_GET_MAX_MEM_SLOTS`). Fails,
    /// changing nothing, if the map already holds more regions than `max_slots`.
    pub fn set_max_slots(&mut self, max_slots: usize) -> Result<(), MemoryError> {
        if self.regions.len() > max_slots {
            return Err(MemoryError::TooManyRegions { requested: self.regions.len(), max: max_slots });
        }
        self.max_slots = max_slots;
        Ok(())
    }

    /// The slot limit: the most regions this map accepts.
    pub fn max_slots(&self) -> usize {
        self.max_slots
    }

    /// The regions, sorted by guest physical address.
    pub fn regions(&self) -> &[Arc<MappedRegion>] {
        &self.regions
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// True if the map holds no region.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The first region whose file lost pages under its mapping ([`MappedRegion::faulted`]),
    /// if any. Such a map must not be used for a device any more.
    pub fn faulted(&self) -> Option<MemoryFault> {
        self.regions.iter().find_map(|r| {
            let host = r.faulted()?;
            let offset = (host as u64).wrapping_sub(r.host.as_ptr() as u64);
            Some(MemoryFault { region: r.desc, guest_addr: r.desc.guest_phys_addr.checked_add(offset) })
        })
    }

    /// The translator for front-end virtual addresses ("user addresses"): the ring addresses
    /// of `VHOST_USER_SET_VRING_ADDR` when `VIRTIO_F_IOMMU_PLATFORM` is not negotiated. Borrows
    /// the map, so it can be passed to `SplitQueue::with_ring_memory` next to `&map`.
    pub fn frontend(&self) -> &FrontendAddresses {
        // SAFETY: `FrontendAddresses` is `repr(transparent)` over `GuestMemoryMap`, so both have
        // the same layout and validity; the returned reference has the lifetime of `self`.
        unsafe { &*(self as *const GuestMemoryMap).cast::<FrontendAddresses>() }
    }
}

/// Rejects `desc` if it overlaps any of `others` in either address space. All of them passed
/// `validate`.
fn check_overlap<'a>(
    desc: &MemoryRegionDesc,
    others: impl Iterator<Item = &'a MemoryRegionDesc>,
) -> Result<(), MemoryError> {
    for existing in others {
        if desc.overlaps(existing, |r| r.guest_phys_addr) {
            return Err(MemoryError::GuestPhysOverlap { region: *desc, existing: *existing });
        }
        if desc.overlaps(existing, |r| r.userspace_addr) {
            return Err(MemoryError::FrontendVirtOverlap { region: *desc, existing: *existing });
        }
    }
    Ok(())
}

/// Translates `[addr, addr + len)` in the address space selected by `start`: the host pointer
/// of `addr` and how many of the `len` bytes are contiguous from there within one region.
/// `Overflow` is checked first, so a range running past 2^64 is refused even where `addr` is
/// mapped. (`len == 0`, which the core never asks for, yields a 0-byte range if `addr` is mapped.)
#[inline(always)]
fn translate_in(slots: &[Slot], addr: u64, len: u64, start: impl Fn(&Slot) -> u64) -> Result<HostRange, MemError> {
    if addr.checked_add(len).is_none() {
        return Err(MemError::Overflow { addr, len });
    }
    for s in slots {
        // One unsigned comparison: `addr < start` wraps to a huge offset.
        let off = addr.wrapping_sub(start(s));
        if off < s.size {
            let n = len.min(s.size - off);
            // SAFETY: `off < s.size`, and the slot's host range is valid for `s.size` bytes
            // (inside its mapping, which fits in usize), so the pointer stays in the mapping.
            let ptr = unsafe { s.host.add(off as usize) };
            return Ok(HostRange { ptr, len: n as usize });
        }
    }
    Err(MemError::Unmapped { addr })
}

// SAFETY: every slot's host pointer addresses `size` bytes inside a live mapping owned by an
// `Arc<MappedRegion>` in `self.regions`; slots and regions only change through `&mut self`, so
// for as long as the `&self` borrow lives the mapping stays mapped. `translate_in` returns
// pointers inside one slot and `1 <= len <= requested` (for requested `len >= 1`). This module
// never creates Rust references into the mappings.
unsafe impl GuestMemory for GuestMemoryMap {
    #[inline]
    fn translate(&self, addr: u64, len: u64) -> Result<HostRange, MemError> {
        translate_in(&self.slots, addr, len, |s| s.gpa)
    }

    /// The inverse of `translate`, for write tracking: the guest address of a host address
    /// inside one of the regions.
    #[inline]
    fn guest_address(&self, host: NonNull<u8>) -> Option<u64> {
        let h = host.as_ptr() as usize;
        self.slots.iter().find_map(|s| {
            let off = h.wrapping_sub(s.host.as_ptr() as usize) as u64;
            (off < s.size).then(|| s.gpa + off)
        })
    }
}

/// [`GuestMemoryMap`] seen through front-end virtual addresses (`userspace_addr`), for ring
/// addresses. Obtained from [`GuestMemoryMap::frontend`].
#[derive(Debug)]
#[repr(transparent)]
pub struct FrontendAddresses(GuestMemoryMap);

impl FrontendAddresses {
    /// The underlying map.
    pub fn map(&self) -> &GuestMemoryMap {
        &self.0
    }
}

// SAFETY: as for `GuestMemoryMap`; only the address each slot is matched on differs.
unsafe impl GuestMemory for FrontendAddresses {
    #[inline]
    fn translate(&self, addr: u64, len: u64) -> Result<HostRange, MemError> {
        translate_in(&self.0.slots, addr, len, |s| s.uaddr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};

    const PAGE: u64 = 0x1000;

    /// A memfd named `name` of `size` bytes. Each test uses its own name so the /proc counts
    /// below are not disturbed by tests running in parallel.
    fn memfd(name: &str, size: u64) -> OwnedFd {
        let cname = CString::new(name).unwrap();
        // SAFETY: `cname` is NUL-terminated.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `fd` is open.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) }, 0);
        fd
    }

    fn dup(fd: &OwnedFd) -> OwnedFd {
        fd.try_clone().unwrap()
    }

    fn desc(gpa: u64, size: u64, uaddr: u64, off: u64) -> MemoryRegionDesc {
        MemoryRegionDesc { guest_phys_addr: gpa, memory_size: size, userspace_addr: uaddr, mmap_offset: off }
    }

    /// Lines of /proc/self/maps that map the memfd called `name`.
    fn maps_of(name: &str) -> usize {
        let needle = format!("/memfd:{name} (deleted)");
        std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| l.ends_with(&needle)).count()
    }

    /// Open fds of this process that refer to the memfd called `name`.
    fn fds_of(name: &str) -> usize {
        let needle = format!("/memfd:{name} (deleted)");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|t| t.to_str() == Some(needle.as_str()))
            .count()
    }

    /// An independent second mapping of a whole fd, to check what the region wrote.
    struct RawMap {
        ptr: *mut u8,
        len: usize,
    }

    impl RawMap {
        fn new(fd: BorrowedFd<'_>, len: usize) -> RawMap {
            // SAFETY: fresh shared mapping of an open fd, no MAP_FIXED.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            RawMap { ptr: p.cast(), len }
        }

        fn read(&self, off: usize, n: usize) -> Vec<u8> {
            assert!(off + n <= self.len);
            // SAFETY: in bounds of the mapping (checked above); raw-pointer reads only.
            (0..n).map(|i| unsafe { self.ptr.add(off + i).read_volatile() }).collect()
        }
    }

    impl Drop for RawMap {
        fn drop(&mut self) {
            // SAFETY: exactly the range mapped in `new`.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    fn write_host(r: HostRange, bytes: &[u8]) {
        assert!(bytes.len() <= r.len);
        // SAFETY: `r` was translated for at least `bytes.len()` bytes; the map outlives this.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), r.ptr.as_ptr(), bytes.len()) };
    }

    #[test]
    fn writes_through_the_region_reach_the_file_at_mmap_offset() {
        let fd = memfd("virtq-mem-shared", 0x6000);
        let other = RawMap::new(fd.as_fd(), 0x6000);
        // A non-page-aligned mmap_offset, as a front-end may send.
        let off = 0x1234;
        let r = desc(0x10_0000, 0x3000, 0x7f00_0000_0000, off);
        let map = GuestMemoryMap::from_table(&[r], vec![dup(&fd)]).unwrap();
        assert_eq!(map.regions()[0].host_addr().as_ptr() as usize % PAGE as usize, off as usize % PAGE as usize);

        let data: Vec<u8> = (0..64u8).collect();
        write_host(map.translate(0x10_0000 + 0x100, 64).unwrap(), &data);
        assert_eq!(other.read(off as usize + 0x100, 64), data);
        // The last byte of the region, through the front-end address.
        write_host(map.frontend().translate(0x7f00_0000_0000 + 0x2fff, 1).unwrap(), &[0xab]);
        assert_eq!(other.read(off as usize + 0x2fff, 1), [0xab]);
        // And the other way round: the second mapping writes, the region sees it.
        // SAFETY: in bounds of `other`.
        unsafe { other.ptr.add(off as usize + 8).write_volatile(0x5a) };
        let p = map.translate(0x10_0008, 1).unwrap().ptr;
        // SAFETY: translated for 1 byte; the map is alive.
        assert_eq!(unsafe { p.as_ptr().read_volatile() }, 0x5a);
    }

    #[test]
    fn guest_and_frontend_translation_agree_and_report_contiguity() {
        let fd = memfd("virtq-mem-xlate", 0x4000);
        // Adjacent in guest physical space, not in front-end space (QEMU's RAM split around a
        // hole looks like this, with both regions in one memfd).
        let a = desc(0x0, 0x2000, 0x5000_0000, 0);
        let b = desc(0x2000, 0x2000, 0x6000_0000, 0x2000);
        let map = GuestMemoryMap::from_table(&[b, a], vec![dup(&fd), dup(&fd)]).unwrap();
        assert_eq!(map.regions()[0].desc(), a, "sorted by guest address");

        let g = map.translate(0x2010, 8).unwrap();
        let v = map.frontend().translate(0x6000_0010, 8).unwrap();
        assert_eq!(g, v);
        assert_eq!(g.len, 8);

        // A range crossing the end of region `a`: only the part inside it.
        let r = map.translate(0x1ff0, 0x20).unwrap();
        assert_eq!(r.len, 0x10);
        let r = map.frontend().translate(0x5000_1ff0, 0x20).unwrap();
        assert_eq!(r.len, 0x10);
        // Both regions come from one file, so guest 0x1fff and 0x2000 are file bytes 0x1fff and
        // 0x2000, but in two different mappings: not host-contiguous.
        assert_eq!(map.translate_contiguous(0x1ff0, 0x20), Err(MemError::NotContiguous { addr: 0x2000 }));
        assert!(map.translate_contiguous(0x2000, 0x2000).is_ok());

        assert_eq!(map.translate(0x3fff, 1).unwrap().len, 1);
        assert_eq!(map.translate(0x4000, 1), Err(MemError::Unmapped { addr: 0x4000 }));
        assert_eq!(map.frontend().translate(0x5000_2000, 1), Err(MemError::Unmapped { addr: 0x5000_2000 }));
        assert_eq!(map.frontend().translate(0x0, 1), Err(MemError::Unmapped { addr: 0 }));
        assert_eq!(map.translate(u64::MAX, 2), Err(MemError::Overflow { addr: u64::MAX, len: 2 }));
        assert_eq!(map.translate(0x10, u64::MAX), Err(MemError::Overflow { addr: 0x10, len: u64::MAX }));
        assert_eq!(map.frontend().translate(u64::MAX, 2), Err(MemError::Overflow { addr: u64::MAX, len: 2 }));
    }

    #[test]
    fn dpdk_no_huge_shape_gpa_equals_uaddr() {
        let fd = memfd("virtq-mem-dpdk", 0x10000);
        let r = desc(0x7f12_3400_0000, 0x10000, 0x7f12_3400_0000, 0);
        let map = GuestMemoryMap::from_table(&[r], vec![fd]).unwrap();
        assert_eq!(
            map.translate(0x7f12_3400_8000, 16).unwrap(),
            map.frontend().translate(0x7f12_3400_8000, 16).unwrap()
        );
    }

    #[test]
    fn invalid_regions_are_rejected_before_mapping() {
        let fd = memfd("virtq-mem-reject", 0x4000);
        let one = |r: MemoryRegionDesc| GuestMemoryMap::from_table(&[r], vec![dup(&fd)]).err();

        let r = desc(0x1000, 0, 0x1000, 0);
        assert_eq!(one(r), Some(MemoryError::ZeroSize { region: r }));
        let r = desc(u64::MAX - 0xfff, 0x2000, 0x1000, 0);
        assert_eq!(one(r), Some(MemoryError::Overflow { region: r, field: OverflowField::GuestPhysAddr }));
        let r = desc(0x1000, 0x2000, u64::MAX - 0xfff, 0);
        assert_eq!(one(r), Some(MemoryError::Overflow { region: r, field: OverflowField::UserspaceAddr }));
        let r = desc(0x1000, 0x2000, 0x1000, u64::MAX - 0xfff);
        assert_eq!(one(r), Some(MemoryError::Overflow { region: r, field: OverflowField::MmapOffset }));
        // mmap_offset + size fits, its page rounding does not (DPDK c6420a3632: a 0-byte mmap).
        let r = desc(0x1000, 0x1000, 0x1000, u64::MAX - 5 - 0x1000);
        assert_eq!(one(r), Some(MemoryError::Overflow { region: r, field: OverflowField::MappingLength }));
        // The fd holds 0x4000 bytes.
        let r = desc(0x1000, 0x1000, 0x1000, 0x3001);
        assert_eq!(one(r), Some(MemoryError::FdTooSmall { region: r, file_size: 0x4000 }));
        let r = desc(0x1000, 0x4001, 0x1000, 0);
        assert_eq!(one(r), Some(MemoryError::FdTooSmall { region: r, file_size: 0x4000 }));
        // Exactly the file: accepted.
        assert_eq!(one(desc(0x1000, 0x1000, 0x1000, 0x3000)), None);
        // The highest region whose exclusive end is still representable (2^64 - 1).
        assert_eq!(desc(u64::MAX - 0x1000, 0x1000, 0, 0).validate(), Ok(0x1000));

        assert_eq!(GuestMemoryMap::from_table(&[], vec![]).err(), Some(MemoryError::NoRegions));
        assert_eq!(
            GuestMemoryMap::from_table(&[desc(0, 0x1000, 0, 0)], vec![dup(&fd), dup(&fd)]).err(),
            Some(MemoryError::FdCountMismatch { regions: 1, fds: 2 })
        );
        assert_eq!(
            GuestMemoryMap::from_table(&[desc(0, 0x1000, 0, 0), desc(0x1000, 0x1000, 0x1000, 0)], vec![dup(&fd)]).err(),
            Some(MemoryError::FdCountMismatch { regions: 2, fds: 1 })
        );
        assert_eq!(maps_of("virtq-mem-reject"), 0);
        drop(fd);
        assert_eq!(fds_of("virtq-mem-reject"), 0, "every fd handed over was closed");
    }

    #[test]
    fn overlaps_are_rejected_in_both_address_spaces() {
        let fd = memfd("virtq-mem-overlap", 0x4000);
        let a = desc(0x1_0000, 0x2000, 0x7000_0000, 0);
        // Overlaps `a`'s last byte in guest physical space only.
        let g = desc(0x1_1fff, 0x1000, 0x8000_0000, 0);
        assert_eq!(
            GuestMemoryMap::from_table(&[a, g], vec![dup(&fd), dup(&fd)]).err(),
            Some(MemoryError::GuestPhysOverlap { region: g, existing: a })
        );
        // Contains `a` in front-end virtual space only.
        let v = desc(0x9_0000, 0x4000, 0x6fff_f000, 0);
        assert_eq!(
            GuestMemoryMap::from_table(&[a, v], vec![dup(&fd), dup(&fd)]).err(),
            Some(MemoryError::FrontendVirtOverlap { region: v, existing: a })
        );
        // The same checks through ADD_MEM_REG, in either order.
        let mut map = GuestMemoryMap::new(DEFAULT_MAX_MEM_SLOTS);
        map.add_region(g, dup(&fd)).unwrap();
        assert_eq!(map.add_region(a, dup(&fd)), Err(MemoryError::GuestPhysOverlap { region: a, existing: g }));
        let mut map = GuestMemoryMap::new(DEFAULT_MAX_MEM_SLOTS);
        map.add_region(v, dup(&fd)).unwrap();
        assert_eq!(map.add_region(a, dup(&fd)), Err(MemoryError::FrontendVirtOverlap { region: a, existing: v }));
        assert_eq!(map.len(), 1);
        // Touching ranges do not overlap.
        map.add_region(desc(0x9_4000, 0x1000, 0x7000_3000, 0), dup(&fd)).unwrap();
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn slot_limits() {
        let fd = memfd("virtq-mem-slots", 0x1000);
        let r = |i: u64| desc(i * 0x1000, 0x1000, 0x10_0000 + i * 0x1000, 0);
        let nine: Vec<_> = (0..9).map(r).collect();
        let fds = (0..9).map(|_| dup(&fd)).collect();
        assert_eq!(
            GuestMemoryMap::from_table(&nine, fds).err(),
            Some(MemoryError::TooManyRegions { requested: 9, max: SET_MEM_TABLE_MAX_REGIONS })
        );
        assert_eq!(maps_of("virtq-mem-slots"), 0);

        let eight = GuestMemoryMap::from_table(&nine[..8], (0..8).map(|_| dup(&fd)).collect()).unwrap();
        assert_eq!((eight.len(), eight.max_slots()), (8, 8));
        let mut more = eight.clone();
        assert_eq!(more.add_region(r(8), dup(&fd)), Err(MemoryError::TooManyRegions { requested: 9, max: 8 }));
        assert_eq!(more.set_max_slots(7), Err(MemoryError::TooManyRegions { requested: 8, max: 7 }));
        more.set_max_slots(DEFAULT_MAX_MEM_SLOTS).unwrap();
        more.add_region(r(8), dup(&fd)).unwrap();
        assert_eq!(more.len(), 9);

        let mut two = GuestMemoryMap::new(2);
        two.add_region(r(0), dup(&fd)).unwrap();
        two.add_region(r(1), dup(&fd)).unwrap();
        assert_eq!(two.add_region(r(2), dup(&fd)), Err(MemoryError::TooManyRegions { requested: 3, max: 2 }));
        // REM_MEM_REG frees a slot.
        two.remove_region(0, 0x10_0000, 0x1000).unwrap();
        two.add_region(r(2), dup(&fd)).unwrap();
    }

    #[test]
    fn an_exact_repeat_of_add_mem_reg_is_counted_not_mapped_twice() {
        // QEMU 7.2 with a multiqueue net device: one ADD_MEM_REG per queue pair, then one
        // REM_MEM_REG per queue pair.
        let name = "virtq-mem-repeat";
        let fd = memfd(name, 0x2000);
        let a = desc(0x0, 0x2000, 0x10_0000, 0);
        let mut map = GuestMemoryMap::new(DEFAULT_MAX_MEM_SLOTS);
        map.add_region(a, dup(&fd)).unwrap();
        map.add_region(a, dup(&fd)).unwrap();
        assert_eq!((map.len(), maps_of(name)), (1, 1));
        // Not a repeat: another mmap offset overlaps and is still refused.
        let b = desc(0x0, 0x1000, 0x10_0000, 0x1000);
        assert_eq!(map.add_region(b, dup(&fd)), Err(MemoryError::GuestPhysOverlap { region: b, existing: a }));
        map.remove_region(0x0, 0x10_0000, 0x2000).unwrap();
        assert_eq!((map.len(), maps_of(name)), (1, 1), "one count left");
        map.remove_region(0x0, 0x10_0000, 0x2000).unwrap();
        assert_eq!((map.len(), maps_of(name)), (0, 0));
        assert!(map.remove_region(0x0, 0x10_0000, 0x2000).is_err());
    }

    #[test]
    fn remove_region_matches_gpa_uaddr_and_size_and_unmaps_when_unshared() {
        let name = "virtq-mem-remove";
        let fd = memfd(name, 0x3000);
        let a = desc(0x0, 0x1000, 0x10_0000, 0);
        let b = desc(0x1000, 0x2000, 0x20_0000, 0x1000);
        let mut map = GuestMemoryMap::new(DEFAULT_MAX_MEM_SLOTS);
        map.add_region(a, dup(&fd)).unwrap();
        map.add_region(b, dup(&fd)).unwrap();
        assert_eq!(maps_of(name), 2);

        let unknown = |gpa, uaddr, size| MemoryError::UnknownRegion {
            guest_phys_addr: gpa,
            userspace_addr: uaddr,
            memory_size: size,
        };
        assert_eq!(map.remove_region(0x1000, 0x20_0000, 0x1000), Err(unknown(0x1000, 0x20_0000, 0x1000)));
        assert_eq!(map.remove_region(0x1000, 0x30_0000, 0x2000), Err(unknown(0x1000, 0x30_0000, 0x2000)));
        assert_eq!(map.remove_region(0x2000, 0x20_0000, 0x2000), Err(unknown(0x2000, 0x20_0000, 0x2000)));
        // Triples that `validate` would refuse match no held region (family 15).
        assert_eq!(map.remove_region(0x1000, 0x20_0000, 0), Err(unknown(0x1000, 0x20_0000, 0)));
        assert_eq!(map.remove_region(u64::MAX, 0x20_0000, 2), Err(unknown(u64::MAX, 0x20_0000, 2)));
        assert_eq!(map.len(), 2);

        // A reader still holds the old table: the region stays mapped until it lets go.
        let reader = Arc::new(map.clone());
        map.remove_region(0x1000, 0x20_0000, 0x2000).unwrap();
        assert_eq!(map.translate(0x1000, 1), Err(MemError::Unmapped { addr: 0x1000 }));
        assert!(reader.translate(0x1000, 1).is_ok());
        assert_eq!(maps_of(name), 2);
        drop(reader);
        assert_eq!(maps_of(name), 1);
        map.remove_region(0, 0x10_0000, 0x1000).unwrap();
        assert!(map.is_empty());
        assert_eq!(maps_of(name), 0);
    }

    #[test]
    fn from_table_is_all_or_nothing() {
        let name = "virtq-mem-aon";
        let fd = memfd(name, 0x2000);
        let small = memfd("virtq-mem-aon-small", 0x1000);
        let good = desc(0x0, 0x2000, 0x10_0000, 0);
        // Passes every check that needs no fd; only the fstat size check, after `good` has
        // been mapped, refuses it.
        let bad = desc(0x10_0000, 0x2000, 0x20_0000, 0);
        let ok = GuestMemoryMap::from_table(&[good], vec![dup(&fd)]).unwrap();
        assert_eq!(maps_of(name), 1, "the check below can see a mapping");
        drop(ok);
        assert_eq!(maps_of(name), 0);

        assert_eq!(
            GuestMemoryMap::from_table(&[good, bad], vec![dup(&fd), small]).err(),
            Some(MemoryError::FdTooSmall { region: bad, file_size: 0x1000 })
        );
        assert_eq!(maps_of(name), 0, "the first region was unmapped");
        assert_eq!(fds_of("virtq-mem-aon-small"), 0);
        drop(fd);
        assert_eq!(fds_of(name), 0);
    }

    #[test]
    fn mmap_failure_is_reported_with_errno() {
        // A read-only fd of a big enough memfd: fstat accepts it, a shared writable mmap not.
        let fd = memfd("virtq-mem-rdonly", 0x1000);
        let path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        // SAFETY: `path` is NUL-terminated.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor we own.
        let ro = unsafe { OwnedFd::from_raw_fd(raw) };
        let r = desc(0, 0x1000, 0, 0);
        let err = MappedRegion::new(r, ro).unwrap_err();
        assert_eq!(err, MemoryError::Mmap { region: r, errno: libc::EACCES });
        assert!(err.to_string().contains("mmap failed"), "{err}");

        // A pipe is no regular file: no size check, and mmap refuses it.
        let mut p = [0; 2];
        // SAFETY: `p` holds two ints.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors we own.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        drop(rd);
        assert!(matches!(MappedRegion::new(r, wr), Err(MemoryError::Mmap { .. })));
    }

    #[test]
    fn no_mapping_or_fd_leaks() {
        let name = "virtq-mem-leak";
        // Sequentially: map and drop 1000 regions, through every path that maps.
        for i in 0..1000u64 {
            let fd = memfd(name, 0x2000);
            match i % 3 {
                0 => drop(MappedRegion::new(desc(i << 20, 0x1000, i << 20, 0x800), fd).unwrap()),
                1 => drop(GuestMemoryMap::from_table(&[desc(0, 0x2000, 0, 0)], vec![fd]).unwrap()),
                _ => {
                    let mut map = GuestMemoryMap::new(1);
                    map.add_region(desc(0, 0x2000, 0, 0), fd).unwrap();
                    map.remove_region(0, 0, 0x2000).unwrap();
                }
            }
        }
        assert_eq!(maps_of(name), 0);
        assert_eq!(fds_of(name), 0);

        // At once: 1000 live regions hold 1000 mappings and no fds (they are closed after mmap).
        let live: Vec<_> = (0..1000u64)
            .map(|i| MappedRegion::new(desc(i << 20, 0x1000, i << 20, 0), memfd(name, 0x1000)).unwrap())
            .collect();
        assert_eq!(maps_of(name), 1000);
        assert_eq!(fds_of(name), 0);
        drop(live);
        assert_eq!(maps_of(name), 0);
    }

    #[test]
    fn map_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<GuestMemoryMap>();
        assert_send_sync::<Arc<GuestMemoryMap>>();
        assert_send_sync::<MappedRegion>();
        assert_send_sync::<FrontendAddresses>();

        let fd = memfd("virtq-mem-threads", 0x1000);
        let map = Arc::new(GuestMemoryMap::from_table(&[desc(0, 0x1000, 0x1000, 0)], vec![fd]).unwrap());
        let m = Arc::clone(&map);
        let len = std::thread::spawn(move || m.frontend().translate(0x1000, 0x2000).unwrap().len).join().unwrap();
        assert_eq!(len, 0x1000);
    }
}
