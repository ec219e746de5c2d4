//! virtio-blk feature bits (VIRTIO 1.2 §5.2.3) and configuration layout (§5.2.4).
//!
//! The device-type bits below 24 are shared between device types (bit 9 is
//! `VIRTIO_BLK_F_FLUSH` here and `VIRTIO_NET_F_GUEST_ECN` for a network device), so they are
//! defined with the device type that owns them, as associated constants of
//! [`VirtioFeatures`] named `BLK_*`.

use crate::features::VirtioFeatures;

/// Bytes per sector: `sector` and `capacity` count 512-byte sectors whatever `blk_size` is
/// (§5.2.4, §5.2.6).
pub const SECTOR_SIZE: u64 = 512;

/// Length of the `VIRTIO_BLK_T_GET_ID` answer: a NUL-padded string of up to 20 bytes
/// (§5.2.6, `VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;

/// Bytes of `struct virtio_blk_config` presented: every field of VIRTIO 1.2 §5.2.4 through
/// the zoned characteristics (96 bytes). Fields of features not offered read as 0, so that a
/// front-end that reads the whole structure its headers know (QEMU reads
/// `sizeof(struct virtio_blk_config)`, which grew over releases) is answered.
pub const CONFIG_SIZE: usize = 96;

/// Field offsets in `struct virtio_blk_config` (§5.2.4).
mod offset {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const WRITEBACK: usize = 32;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
}

/// Offset of `writeback` in `struct virtio_blk_config`: the one field a driver writes (with
/// `VIRTIO_BLK_F_CONFIG_WCE`, §5.2.5).
pub const WRITEBACK_OFFSET: u32 = offset::WRITEBACK as u32;

/// §5.2.3 feature bits, owned by the block device type.
impl VirtioFeatures {
    /// Maximum size of any single segment is in `size_max` (blk, bit 1).
    pub const BLK_SIZE_MAX: Self = Self::from_bits_retain(1 << 1);
    /// Maximum number of segments in a request is in `seg_max` (blk, bit 2).
    pub const BLK_SEG_MAX: Self = Self::from_bits_retain(1 << 2);
    /// Disk-style geometry specified in `geometry` (blk, bit 4).
    pub const BLK_GEOMETRY: Self = Self::from_bits_retain(1 << 4);
    /// Device is read-only (blk, bit 5).
    pub const BLK_RO: Self = Self::from_bits_retain(1 << 5);
    /// Block size of disk is in `blk_size` (blk, bit 6).
    pub const BLK_BLK_SIZE: Self = Self::from_bits_retain(1 << 6);
    /// Cache flush command support (blk, bit 9).
    pub const BLK_FLUSH: Self = Self::from_bits_retain(1 << 9);
    /// Device exports information on optimal I/O alignment (blk, bit 10).
    pub const BLK_TOPOLOGY: Self = Self::from_bits_retain(1 << 10);
    /// Device can toggle its cache between writeback and writethrough modes (blk, bit 11).
    pub const BLK_CONFIG_WCE: Self = Self::from_bits_retain(1 << 11);
    /// Device supports multiqueue; the queue count is in `num_queues` (blk, bit 12).
    pub const BLK_MQ: Self = Self::from_bits_retain(1 << 12);
    /// Discard command, limits in `max_discard_sectors` and `max_discard_seg` (blk, bit 13).
    pub const BLK_DISCARD: Self = Self::from_bits_retain(1 << 13);
    /// Write-zeroes command, limits in `max_write_zeroes_sectors` and `max_write_zeroes_seg`
    /// (blk, bit 14).
    pub const BLK_WRITE_ZEROES: Self = Self::from_bits_retain(1 << 14);
}

/// The configuration space of a block device (§5.2.4 `struct virtio_blk_config`), the fields
/// this core's devices use. Everything else (geometry, topology, secure erase, zoned) reads
/// as 0: the features that give those fields meaning are not offered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// `capacity`: the device's size in 512-byte sectors.
    pub capacity: u64,
    /// `size_max` (with `VIRTIO_BLK_F_SIZE_MAX`).
    pub size_max: u32,
    /// `seg_max` (with `VIRTIO_BLK_F_SEG_MAX`): data segments per request at most.
    pub seg_max: u32,
    /// `blk_size` (with `VIRTIO_BLK_F_BLK_SIZE`): the block size the driver should use.
    pub blk_size: u32,
    /// `writeback` (with `VIRTIO_BLK_F_CONFIG_WCE`): 1 writeback, 0 writethrough.
    pub writeback: u8,
    /// `num_queues` (with `VIRTIO_BLK_F_MQ`).
    pub num_queues: u16,
    /// `max_discard_sectors` (with `VIRTIO_BLK_F_DISCARD`).
    pub max_discard_sectors: u32,
    /// `max_discard_seg` (with `VIRTIO_BLK_F_DISCARD`).
    pub max_discard_seg: u32,
    /// `discard_sector_alignment` (with `VIRTIO_BLK_F_DISCARD`), a hint for splitting.
    pub discard_sector_alignment: u32,
    /// `max_write_zeroes_sectors` (with `VIRTIO_BLK_F_WRITE_ZEROES`).
    pub max_write_zeroes_sectors: u32,
    /// `max_write_zeroes_seg` (with `VIRTIO_BLK_F_WRITE_ZEROES`).
    pub max_write_zeroes_seg: u32,
    /// `write_zeroes_may_unmap`: 1 if a write-zeroes request with `UNMAP` may deallocate.
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// The configuration space as the driver reads it: little-endian (§5.2.4, VERSION_1),
    /// [`CONFIG_SIZE`] bytes.
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut s = [0u8; CONFIG_SIZE];
        put(&mut s, offset::CAPACITY, &self.capacity.to_le_bytes());
        put(&mut s, offset::SIZE_MAX, &self.size_max.to_le_bytes());
        put(&mut s, offset::SEG_MAX, &self.seg_max.to_le_bytes());
        put(&mut s, offset::BLK_SIZE, &self.blk_size.to_le_bytes());
        s[offset::WRITEBACK] = self.writeback;
        put(&mut s, offset::NUM_QUEUES, &self.num_queues.to_le_bytes());
        put(&mut s, offset::MAX_DISCARD_SECTORS, &self.max_discard_sectors.to_le_bytes());
        put(&mut s, offset::MAX_DISCARD_SEG, &self.max_discard_seg.to_le_bytes());
        put(&mut s, offset::DISCARD_SECTOR_ALIGNMENT, &self.discard_sector_alignment.to_le_bytes());
        put(&mut s, offset::MAX_WRITE_ZEROES_SECTORS, &self.max_write_zeroes_sectors.to_le_bytes());
        put(&mut s, offset::MAX_WRITE_ZEROES_SEG, &self.max_write_zeroes_seg.to_le_bytes());
        s[offset::WRITE_ZEROES_MAY_UNMAP] = self.write_zeroes_may_unmap;
        s
    }
}

fn put(space: &mut [u8; CONFIG_SIZE], at: usize, bytes: &[u8]) {
    space[at..at + bytes.len()].copy_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_matches_the_spec_offsets() {
        let c = BlkConfig {
            capacity: 0x0102_0304_0506_0708,
            size_max: 0x1111_1111,
            seg_max: 126,
            blk_size: 4096,
            writeback: 1,
            num_queues: 2,
            max_discard_sectors: 0x2222_2222,
            max_discard_seg: 8,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 0x3333_3333,
            max_write_zeroes_seg: 4,
            write_zeroes_may_unmap: 1,
        };
        let s = c.to_bytes();
        assert_eq!(s[0..8], 0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(s[12..16], 126u32.to_le_bytes());
        assert_eq!(s[16..20], [0; 4], "geometry not offered");
        assert_eq!(s[20..24], 4096u32.to_le_bytes());
        assert_eq!(s[24..32], [0; 8], "topology not offered");
        assert_eq!((s[32], s[33]), (1, 0));
        assert_eq!(s[34..36], 2u16.to_le_bytes());
        assert_eq!(s[40..44], 8u32.to_le_bytes());
        assert_eq!(s[52..56], 4u32.to_le_bytes());
        assert_eq!(s[56], 1);
        assert!(s[57..].iter().all(|&b| b == 0), "secure erase and zoned not offered");
        assert_eq!(WRITEBACK_OFFSET, 32);
    }

    #[test]
    fn blk_bits_are_the_spec_bits() {
        assert_eq!(VirtioFeatures::BLK_FLUSH.bits(), 1 << 9);
        assert_eq!(VirtioFeatures::BLK_MQ.bits(), 1 << 12);
        assert_eq!(VirtioFeatures::BLK_WRITE_ZEROES.bits(), 1 << 14);
        // Bit 9 means GUEST_ECN to a network device: the device type decides.
        assert_eq!(VirtioFeatures::BLK_FLUSH, VirtioFeatures::NET_GUEST_ECN);
    }
}
