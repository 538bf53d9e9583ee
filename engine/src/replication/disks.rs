//! The backup's disks (`lockstep backup --disk path=FILE`): the images it keeps the
//! guest's disks in, their initial sync and the epochs' writes, all or nothing through
//! each image's journal (see [`journal`](crate::devices::journal)).
//!
//! The backup's image only ever holds a committed epoch, once its initial sync is done:
//! sync data goes straight in before epoch 1 (like pre-copied memory), an epoch's writes
//! only once the whole epoch is verified. With several disks, each image is all or
//! nothing on its own: a backup process that stops while applying an epoch may leave one
//! image at E and another at E−1 (its memory is gone with it; the next sync compares and
//! repairs every chunk).

use std::path::PathBuf;
use std::time::Instant;

use checkpoint::disk::{image_sums, ChunkSum, DiskSink, StagedWrite};
use checkpoint::protocol::DiskInfo;

use crate::devices::disk::{DiskConfig, DiskError, Image};
use crate::devices::journal::{self, Recovered};
use crate::{info, warn};

/// The backup's open, locked images, in `--disk` order.
pub struct BackupDisks {
    images: Vec<Image>,
    /// The images are marked as being synced (set by the first sync data).
    syncing: bool,
    /// An epoch has been applied (the mid-sync marks are cleared).
    committed: bool,
    /// Applying an epoch failed: its journal may be needed to complete the image.
    failed: bool,
    /// Bytes written by the initial sync, and when it began.
    synced: u64,
    sync_began: Option<Instant>,
}

impl BackupDisks {
    /// Opens each image for the backup (completing a journal left by an earlier run and
    /// saying which epoch it held), reserving its blocks.
    pub fn open(cfgs: &[DiskConfig]) -> Result<BackupDisks, DiskError> {
        let mut images = Vec::with_capacity(cfgs.len());
        for cfg in cfgs {
            let (image, recovered) = Image::open_for_backup(cfg)?;
            if let Some(line) = recovered.describe(&image.path) {
                match recovered {
                    Recovered::Syncing => warn!("{line}; the sync that follows repairs it"),
                    _ => info!("{line}"),
                }
            }
            images.push(image);
        }
        Ok(BackupDisks {
            images,
            syncing: false,
            committed: false,
            failed: false,
            synced: 0,
            sync_began: None,
        })
    }

    /// What `Hello` says of these disks.
    pub fn infos(&self) -> Vec<DiskInfo> {
        self.images
            .iter()
            .map(|i| DiskInfo {
                size: i.size,
                readonly: i.readonly,
            })
            .collect()
    }

    /// The images' paths, in order.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.images.iter().map(|i| i.path.clone()).collect()
    }

    /// The chunk sums of disk `disk`'s image; `progress` gets the bytes read so far.
    pub fn sums(&self, disk: usize, progress: impl FnMut(u64)) -> std::io::Result<Vec<ChunkSum>> {
        let i = &self.images[disk];
        image_sums(&i.file, i.size, progress)
    }

    /// Bytes the initial sync wrote, and how long it has run.
    pub fn sync_figures(&self) -> (u64, std::time::Duration) {
        (
            self.synced,
            self.sync_began.map(|t| t.elapsed()).unwrap_or_default(),
        )
    }

    fn image(&self, disk: u32) -> Result<&Image, String> {
        self.images
            .get(disk as usize)
            .ok_or_else(|| format!("no disk {disk}"))
    }
}

impl DiskSink for BackupDisks {
    fn sync(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<(), String> {
        if !self.syncing {
            for i in &self.images {
                journal::mark_syncing(&i.path).map_err(|e| {
                    format!(
                        "disk {}: cannot mark the image as being synced: {e}",
                        i.path.display()
                    )
                })?;
            }
            self.syncing = true;
            self.sync_began = Some(Instant::now());
        }
        let i = self.image(disk)?;
        std::os::unix::fs::FileExt::write_all_at(&i.file, data, offset).map_err(|e| {
            format!(
                "disk {}: initial sync: writing {} bytes at offset {offset}: {e} (the image \
                 matches no epoch)",
                i.path.display(),
                data.len()
            )
        })?;
        self.synced += data.len() as u64;
        Ok(())
    }

    fn commit(&mut self, epoch: u64, writes: &[StagedWrite]) -> Result<(), String> {
        let images = std::mem::take(&mut self.images);
        let r = self.apply(epoch, writes, &images);
        self.images = images;
        r?;
        self.committed = true;
        Ok(())
    }
}

impl BackupDisks {
    fn apply(
        &mut self,
        epoch: u64,
        writes: &[StagedWrite],
        images: &[Image],
    ) -> Result<(), String> {
        for (d, image) in images.iter().enumerate() {
            let mine: Vec<(u64, &[u8])> = writes
                .iter()
                .filter(|w| w.disk as usize == d)
                .map(|w| (w.offset, &w.data[..]))
                .collect();
            // The first epoch journals every disk: that clears the mid-sync marks.
            if mine.is_empty() && self.committed {
                continue;
            }
            journal::apply(&image.path, &image.file, epoch, &mine).map_err(|e| {
                self.failed = true;
                match e {
                    journal::ApplyError::Journal(e) => format!(
                        "disk {}: cannot write the journal of epoch {epoch}: {e}; the image \
                         is untouched and holds epoch {}",
                        image.path.display(),
                        epoch - 1
                    ),
                    journal::ApplyError::Image(e) => format!(
                        "disk {}: writing epoch {epoch} into the image: {e}; its journal is \
                         complete: the next open of the image finishes epoch {epoch}",
                        image.path.display()
                    ),
                }
            })?;
        }
        Ok(())
    }
}

impl Drop for BackupDisks {
    /// The process goes on (an orderly end, a promotion): every apply finished, so the
    /// journals are not needed; a mid-sync mark stays (the image matches no epoch).
    fn drop(&mut self) {
        if (self.syncing && !self.committed) || self.failed {
            return;
        }
        for i in &self.images {
            if let Err(e) = journal::remove(&i.path) {
                warn!("disk {}: cannot remove its journal: {e}", i.path.display());
            }
        }
    }
}
