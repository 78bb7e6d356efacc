//! Crash-safe file writes: temp file in the same directory, fsync, rename. The rename is
//! the commit, so a reader (or a restarted run) sees the old file or the whole new one.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::Error;

/// Suffix of the temp files; a run removes leftovers from killed runs with it.
pub(crate) const TEMP_SUFFIX: &str = ".tmp";

/// `dir/.name.tmp`: hidden, and in the same directory so that the rename is atomic.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}{TEMP_SUFFIX}"))
}

/// Writes `path` atomically and durably, directory entry included.
pub(crate) fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), Error> {
    write_atomic_no_dir_sync(path, write)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// As [`write_atomic`] but leaves the directory fsync to the caller, who batches it when
/// writing many files into one directory (a chunk's images).
pub(crate) fn write_atomic_no_dir_sync(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), Error> {
    let mut file = AtomicFile::create(path)?;
    let result = match file.out.as_mut() {
        Some(out) => write(out),
        None => Ok(()),
    };
    result.map_err(Error::io(&file.temp))?;
    file.finish()
}

/// A file written under a temp name and renamed into place by [`AtomicFile::commit`];
/// dropped uncommitted, the temp file is removed.
pub(crate) struct AtomicFile {
    path: PathBuf,
    temp: PathBuf,
    out: Option<BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<AtomicFile, Error> {
        let temp = temp_path(path);
        let file = File::create(&temp).map_err(Error::io(&temp))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            temp,
            out: Some(BufWriter::new(file)),
        })
    }

    /// The writer; errors of writes through it should name [`AtomicFile::temp`].
    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.out
            .as_mut()
            .expect("an AtomicFile has its writer until committed")
    }

    /// The temp file being written.
    pub fn temp(&self) -> &Path {
        &self.temp
    }

    /// Flushes, fsyncs and renames into place, then fsyncs the directory.
    pub fn commit(self) -> Result<(), Error> {
        let dir = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        self.finish()?;
        sync_dir(&dir)
    }

    fn finish(mut self) -> Result<(), Error> {
        if let Some(mut out) = self.out.take() {
            let synced = out.flush().and_then(|()| out.get_ref().sync_all());
            drop(out);
            if let Err(source) = synced {
                let _ = fs::remove_file(&self.temp);
                return Err(Error::Io {
                    path: self.temp.clone(),
                    source,
                });
            }
        }
        fs::rename(&self.temp, &self.path).map_err(Error::io(&self.path))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.is_some() {
            // Uncommitted: the temp file is garbage (best effort; a restart removes it too).
            self.out = None;
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Makes renames and creations in `dir` durable (a no-op where directories cannot be opened).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(Error::io(dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Removes `.*.tmp` files that a killed run left in `dir` (not recursive).
pub(crate) fn remove_stale_temps(dir: &Path) -> Result<(), Error> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                source: e,
            });
        }
    };
    for entry in entries {
        let entry = entry.map_err(Error::io(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(TEMP_SUFFIX) {
            let path = entry.path();
            fs::remove_file(&path).map_err(Error::io(path))?;
        }
    }
    Ok(())
}

pub(crate) fn create_dir_all(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(Error::io(dir))
}
