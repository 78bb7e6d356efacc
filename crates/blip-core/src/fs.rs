//! Crash-safe file writes: a temp file in the same directory, fsync, rename. The rename is
//! the commit, so a reader (or a restarted run) sees the old file or the whole new one,
//! never a half-written one.
//!
//! Checkpoints, tokenizers, CapFilt's outputs, the generated world and the hub cache all
//! write through here. The temp file is `tempfile`'s (unique name, removed if dropped
//! uncommitted); this module adds the fsyncs and the error that names the file.
//!
//! ```
//! use std::io::Write;
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("state.json");
//! blip_core::fs::write_atomic(&path, |out| out.write_all(b"{}"))?;
//! assert_eq!(std::fs::read(&path)?, b"{}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

/// Suffix of the temp files: `.{name}.{random}.tmp`. [`remove_stale_temps`] removes the
/// leftovers of killed runs by it.
pub const TEMP_SUFFIX: &str = ".tmp";

/// A write that failed, with the file it was writing.
///
/// ```
/// use std::path::Path;
///
/// let path = Path::new("/nonexistent-blip-dir/out.json");
/// let err = blip_core::fs::write_atomic(path, |_| Ok(())).unwrap_err();
/// assert_eq!(err.path, path);
/// assert!(err.to_string().starts_with("cannot write /nonexistent-blip-dir/out.json"));
/// // It converts into the crate's error, for `?` in functions returning `blip_core::Result`.
/// assert!(matches!(blip_core::Error::from(err), blip_core::Error::Io { .. }));
/// ```
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct WriteError {
    /// The file (or, for a directory sync, the directory).
    pub path: PathBuf,
    /// The underlying I/O error.
    #[source]
    pub source: std::io::Error,
}

impl From<WriteError> for crate::Error {
    fn from(e: WriteError) -> Self {
        crate::Error::Io {
            path: e.path,
            source: e.source,
        }
    }
}

fn fail(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |source| WriteError {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `path` atomically and durably, its directory entry included.
///
/// ```
/// use std::io::Write;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("config.json");
/// std::fs::write(&path, "old")?;
/// blip_core::fs::write_atomic(&path, |out| out.write_all(b"new"))?;
/// assert_eq!(std::fs::read_to_string(&path)?, "new");
/// // A failed write leaves the old file, and no temp file, behind.
/// let failed = blip_core::fs::write_atomic(&path, |out| {
///     out.write_all(b"half")?;
///     Err(std::io::Error::other("disk full"))
/// });
/// assert!(failed.is_err());
/// assert_eq!(std::fs::read_to_string(&path)?, "new");
/// assert_eq!(std::fs::read_dir(dir.path())?.count(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), WriteError> {
    write_atomic_no_dir_sync(path, write)?;
    sync_dir(parent(path))
}

/// As [`write_atomic`] but leaves the directory fsync to the caller, who batches it when
/// writing many files into one directory ([`sync_dir`] once at the end).
///
/// ```
/// use std::io::Write;
/// use blip_core::fs::{sync_dir, write_atomic_no_dir_sync};
///
/// let dir = tempfile::tempdir()?;
/// for name in ["a.json", "b.json"] {
///     write_atomic_no_dir_sync(&dir.path().join(name), |out| out.write_all(name.as_bytes()))?;
/// }
/// sync_dir(dir.path())?; // one directory fsync for the whole batch
/// assert_eq!(std::fs::read_to_string(dir.path().join("b.json"))?, "b.json");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_atomic_no_dir_sync(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), WriteError> {
    write_file(path, write, true)
}

/// Atomic but not durable: as [`write_atomic`] without any fsync, so after a power loss the
/// file may be missing or empty (never a mix of old and new). For files a run regenerates
/// deterministically, where thousands of fsyncs would dominate (the world's images).
///
/// ```
/// use std::io::Write;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("image_0.png");
/// blip_core::fs::write_atomic_unsynced(&path, |out| out.write_all(&[1, 2, 3]))?;
/// assert_eq!(std::fs::read(&path)?, [1, 2, 3]);
/// assert_eq!(std::fs::read_dir(dir.path())?.count(), 1); // no temp file left
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_atomic_unsynced(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), WriteError> {
    write_file(path, write, false)
}

/// Writes `path` through an [`AtomicFile`], fsyncing the file when `sync`.
fn write_file(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    sync: bool,
) -> Result<(), WriteError> {
    let mut file = AtomicFile::create(path)?;
    let temp = file.temp().to_path_buf();
    write(file.writer()).map_err(fail(&temp))?;
    file.persist(sync)
}

/// A file written under a temp name beside `path` and renamed into place by
/// [`AtomicFile::commit`]; dropped uncommitted, the temp file is removed.
///
/// ```
/// use std::io::Write;
/// use blip_core::fs::AtomicFile;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("model.safetensors");
/// let mut file = AtomicFile::create(&path)?;
/// file.writer().write_all(b"bytes")?;
/// assert!(file.temp().exists() && !path.exists()); // nothing at `path` before the commit
/// file.commit()?;
/// assert_eq!(std::fs::read(&path)?, b"bytes");
/// // Dropped uncommitted, the temp file is removed.
/// drop(AtomicFile::create(&dir.path().join("other.bin"))?);
/// assert_eq!(std::fs::read_dir(dir.path())?.count(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct AtomicFile {
    path: PathBuf,
    out: BufWriter<NamedTempFile>,
}

impl AtomicFile {
    /// Starts writing `path`; nothing at `path` changes until [`Self::commit`].
    pub fn create(path: &Path) -> Result<AtomicFile, WriteError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let prefix = format!(".{name}.");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(TEMP_SUFFIX);
        // tempfile creates 0600 files; a checkpoint or an output gets the permissions
        // `File::create` would give it (0666 less the umask).
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
        let temp = builder.tempfile_in(parent(path)).map_err(fail(path))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            out: BufWriter::new(temp),
        })
    }

    /// The writer; errors of writes through it should name [`AtomicFile::temp`].
    pub fn writer(&mut self) -> &mut dyn Write {
        &mut self.out
    }

    /// The temp file being written.
    pub fn temp(&self) -> &Path {
        self.out.get_ref().path()
    }

    /// Flushes, fsyncs and renames into place, then fsyncs the directory.
    pub fn commit(self) -> Result<(), WriteError> {
        let dir = parent(&self.path).to_path_buf();
        self.persist(true)?;
        sync_dir(&dir)
    }

    fn persist(self, sync: bool) -> Result<(), WriteError> {
        let temp_path = self.temp().to_path_buf();
        let temp = self
            .out
            .into_inner()
            .map_err(|e| fail(&temp_path)(e.into_error()))?;
        if sync {
            temp.as_file().sync_all().map_err(fail(&temp_path))?;
        }
        temp.persist(&self.path)
            .map_err(|e| fail(&self.path)(e.error))?;
        Ok(())
    }
}

/// The directory `path` is in (`.` for a bare name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Makes renames and creations in `dir` durable (a no-op where directories cannot be opened).
///
/// ```
/// use std::path::Path;
///
/// let dir = tempfile::tempdir()?;
/// std::fs::write(dir.path().join("a.txt"), "a")?;
/// blip_core::fs::sync_dir(dir.path())?;
/// if cfg!(unix) {
///     let missing = Path::new("/nonexistent-blip-dir");
///     assert_eq!(blip_core::fs::sync_dir(missing).unwrap_err().path, missing);
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Removes the `.*.tmp` files that a killed run left in `dir` (not recursive). A missing
/// directory has none.
///
/// ```
/// use blip_core::fs::remove_stale_temps;
///
/// let dir = tempfile::tempdir()?;
/// std::fs::write(dir.path().join(".out.json.x1.tmp"), "killed")?;
/// std::fs::write(dir.path().join("out.json"), "{}")?;
/// remove_stale_temps(dir.path())?;
/// assert!(!dir.path().join(".out.json.x1.tmp").exists());
/// assert!(dir.path().join("out.json").exists());
/// // A missing directory has no stale files.
/// remove_stale_temps(&dir.path().join("missing"))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn remove_stale_temps(dir: &Path) -> Result<(), WriteError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(fail(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(fail(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(TEMP_SUFFIX) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(fail(&path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_uncommitted_file_leaves_nothing_and_the_old_file_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        std::fs::write(&path, b"old").unwrap();
        {
            let mut file = AtomicFile::create(&path).unwrap();
            file.writer().write_all(b"new, half").unwrap();
            assert!(file.temp().exists());
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_names_the_temp_file_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        std::fs::write(&path, b"old").unwrap();
        let err = write_atomic(&path, |out| {
            out.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(
            err.path.starts_with(dir.path()) && err.path != path,
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn commit_replaces_the_file_and_stale_temps_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        let mut file = AtomicFile::create(&path).unwrap();
        file.writer().write_all(b"new").unwrap();
        file.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        std::fs::write(dir.path().join(".out.json.x1.tmp"), b"killed").unwrap();
        remove_stale_temps(dir.path()).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out.json"]);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_file() {
        let path = Path::new("/nonexistent-blip-dir/out.json");
        let err = write_atomic(path, |_| Ok(())).unwrap_err();
        assert_eq!(err.path, path);
    }
}
