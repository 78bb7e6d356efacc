//! Finding a model given as a local directory or a HuggingFace hub id (`Salesforce/blip-…`)
//! in the standard HF cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), laid out as `huggingface_hub` writes it:
//! `models--{org}--{name}/refs/main` names a snapshot, `snapshots/{rev}/` holds the files.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Files a BLIP model directory must hold.
pub const MODEL_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// The HF hub cache directory from the environment, as `huggingface_hub` computes it.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("huggingface").join("hub")
}

/// A local directory as is; otherwise a hub id resolved in `cache` at revision `main`.
///
/// When the id is not cached (this crate does not download), the error says which files to
/// fetch and where to put them.
pub fn resolve_model(spec: &str, cache: &Path) -> Result<PathBuf> {
    let local = Path::new(spec);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    let not_found = |detail: String| Error::ModelNotFound {
        spec: spec.to_string(),
        detail,
    };
    let Some((org, name)) = spec.split_once('/').filter(|(o, n)| {
        !o.is_empty() && !n.is_empty() && !n.contains('/') && !spec.starts_with('.')
    }) else {
        return Err(not_found(
            "it is neither a directory nor a hub id like Salesforce/blip-image-captioning-base"
                .into(),
        ));
    };
    let repo = cache.join(format!("models--{org}--{name}"));
    let download_hint = || {
        format!(
            "it is not in the HF cache {}. On a machine with network: \
             `huggingface-cli download {spec} {}` (or set HF_HUB_CACHE/HF_HOME to a cache that has it), \
             or download those files into a directory and pass that directory",
            cache.display(),
            MODEL_FILES.join(" ")
        )
    };
    let revision = std::fs::read_to_string(repo.join("refs").join("main"))
        .map_err(|_| not_found(download_hint()))?;
    let snapshot = repo.join("snapshots").join(revision.trim());
    if let Some(missing) = MODEL_FILES.iter().find(|f| !snapshot.join(f).is_file()) {
        return Err(not_found(format!(
            "the cached snapshot {} lacks {missing}; {}",
            snapshot.display(),
            download_hint()
        )));
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("blip-hub-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn resolves_a_cached_snapshot_through_refs_main() {
        let cache = scratch("cached");
        let repo = cache.join("models--Salesforce--blip-image-captioning-base");
        let snapshot = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123\n").unwrap();
        // An older snapshot that refs/main does not name must not be picked.
        std::fs::create_dir_all(repo.join("snapshots").join("old")).unwrap();
        for f in MODEL_FILES {
            std::fs::write(snapshot.join(f), "{}").unwrap();
        }
        let dir = resolve_model("Salesforce/blip-image-captioning-base", &cache).unwrap();
        assert_eq!(dir, snapshot);
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn uncached_ids_say_what_to_download_and_where() {
        let cache = scratch("empty");
        let err = resolve_model("Salesforce/blip-vqa-base", &cache).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("huggingface-cli download Salesforce/blip-vqa-base"),
            "{message}"
        );
        assert!(message.contains("model.safetensors"), "{message}");
        assert!(message.contains(&cache.display().to_string()), "{message}");
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn incomplete_snapshots_name_the_missing_file() {
        let cache = scratch("partial");
        let repo = cache.join("models--org--model");
        std::fs::create_dir_all(repo.join("snapshots").join("r1")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "r1").unwrap();
        std::fs::write(repo.join("snapshots/r1/config.json"), "{}").unwrap();
        let err = resolve_model("org/model", &cache).unwrap_err().to_string();
        assert!(err.contains("lacks model.safetensors"), "{err}");
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn local_directories_win_and_nonsense_is_rejected() {
        let dir = scratch("local");
        assert_eq!(
            resolve_model(dir.to_str().unwrap(), Path::new("/nonexistent")).unwrap(),
            dir
        );
        assert!(resolve_model("no-slash-and-no-dir", Path::new("/nonexistent")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
