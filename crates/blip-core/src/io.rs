//! Bounded, checked reading of the small files a model directory holds (configs, tokenizer),
//! and the size limits every config is held to before anything is built from it.

use std::path::Path;

use crate::error::{Error, Result};

/// The largest width (hidden or feed-forward size, vocabulary) a config may declare.
pub const MAX_WIDTH: usize = 1 << 20;

/// The largest number of layers a config may declare; loaders also compare it with the
/// layers the checkpoint holds before building the model.
pub const MAX_LAYERS: usize = 1024;

/// The bounds every config is held to before anything is built from it: each
/// `(name, value, max)` of `part` ("vision", "text") in `1..=max`, and a positive
/// `layer_norm_eps`.
///
/// ```
/// use std::path::Path;
/// use blip_core::{MAX_LAYERS, MAX_WIDTH, check_sizes};
///
/// let path = Path::new("config.json");
/// let sizes = [("hidden_size", 768, MAX_WIDTH), ("num_hidden_layers", 12, MAX_LAYERS)];
/// check_sizes("vision", &sizes, 1e-5, path)?;
/// let none = [("num_hidden_layers", 0, MAX_LAYERS)];
/// let err = check_sizes("vision", &none, 1e-5, path).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "invalid config config.json: vision num_hidden_layers 0 is outside 1..=1024"
/// );
/// // `layer_norm_eps` must be positive.
/// assert!(check_sizes("text", &[], 0.0, path).is_err());
/// # Ok::<(), blip_core::Error>(())
/// ```
pub fn check_sizes(
    part: &str,
    sizes: &[(&str, usize, usize)],
    layer_norm_eps: f64,
    path: &Path,
) -> Result<()> {
    for &(name, value, max) in sizes {
        check_size(part, name, value, max, path)?;
    }
    if !(layer_norm_eps.is_finite() && layer_norm_eps > 0.0) {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: format!("{part} layer_norm_eps {layer_norm_eps} must be a positive number"),
        });
    }
    Ok(())
}

/// One size of `part` held to `1..=max`, as [`check_sizes`] holds each of its sizes.
///
/// ```
/// use std::path::Path;
///
/// let path = Path::new("state.json");
/// blip_core::check_size("pre-training", "queue_size", 57600, 1 << 20, path)?;
/// let err = blip_core::check_size("pre-training", "queue_size", 0, 1 << 20, path).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "invalid config state.json: pre-training queue_size 0 is outside 1..=1048576"
/// );
/// # Ok::<(), blip_core::Error>(())
/// ```
pub fn check_size(part: &str, name: &str, value: usize, max: usize, path: &Path) -> Result<()> {
    if value == 0 || value > max {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: format!("{part} {name} {value} is outside 1..={max}"),
        });
    }
    Ok(())
}

/// Opens `path` for reading if it is a regular file (or a link to one). A FIFO, device or
/// directory is refused before it is opened: opening a FIFO blocks until a writer comes.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("vocab.txt");
/// std::fs::write(&path, "[CLS]")?;
/// let file = blip_core::open_file(&path)?;
/// assert_eq!(file.metadata()?.len(), 5);
/// // A directory is refused before it is opened.
/// let err = blip_core::open_file(dir.path()).unwrap_err();
/// assert!(err.to_string().contains("not a regular file"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn open_file(path: &Path) -> Result<std::fs::File> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(io)?;
    if !metadata.is_file() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    std::fs::File::open(path).map_err(io)
}

/// The whole content of a regular file ([`open_file`]), naming the file in any error.
///
/// ```
/// use blip_core::Error;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("tokenizer.json");
/// std::fs::write(&path, b"{}")?;
/// assert_eq!(blip_core::read_file(&path)?, b"{}");
/// let missing = dir.path().join("missing.json");
/// let err = blip_core::read_file(&missing).unwrap_err();
/// assert!(matches!(err, Error::Io { path, .. } if path == missing));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut open_file(path)?, &mut bytes).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(bytes)
}

/// Reads and parses a JSON file, naming the file in any error.
///
/// ```
/// use blip_core::Error;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("config.json");
/// std::fs::write(&path, r#"{"vision_config": {"hidden_size": 768}}"#)?;
/// let value = blip_core::read_json(&path)?;
/// assert_eq!(value["vision_config"]["hidden_size"].as_u64(), Some(768));
/// // Malformed JSON is a config error naming the file.
/// std::fs::write(&path, "{not json")?;
/// assert!(matches!(blip_core::read_json(&path), Err(Error::Config { .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    serde_json::from_slice(&read_file(path)?).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// This process's peak resident memory in bytes (Linux's `VmHWM`); `None` where the
/// system does not report it. Training metrics and benchmarks record it.
///
/// ```
/// if cfg!(target_os = "linux") {
///     assert!(blip_core::peak_rss().unwrap() > 0);
/// }
/// ```
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
