//! Finding a model given as a local directory or a HuggingFace hub id (`Salesforce/blip-…`)
//! in the standard HF cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), laid out as `huggingface_hub` writes it:
//! `models--{org}--{name}/refs/main` names a snapshot, `snapshots/{rev}/` holds the files
//! (links into `blobs/`). With the `download` feature, [`find_or_download`] fetches an
//! uncached model into that layout, so Python tools and this crate share one cache.

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
/// When the id is not cached, the error says which files to fetch and where to put them
/// ([`find_or_download`] fetches them).
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

/// Records one downloaded file in the cache layout: the content goes to `blobs/{etag}`
/// (written beside it and renamed, so a broken download leaves nothing behind), the
/// snapshot entry links to it, and `refs/main` names the snapshot.
pub fn store_file(
    repo: &Path,
    commit: &str,
    etag: &str,
    file: &str,
    content: &mut dyn std::io::Read,
) -> Result<PathBuf> {
    let io = |path: &Path, source| {
        Error::Vision(blip_vision::Error::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let blobs = repo.join("blobs");
    let snapshot = repo.join("snapshots").join(commit);
    let refs = repo.join("refs");
    for dir in [&blobs, &snapshot, &refs] {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let blob = blobs.join(etag);
    if !blob.is_file() {
        let partial = blobs.join(format!("{etag}.incomplete"));
        let mut out = std::fs::File::create(&partial).map_err(|e| io(&partial, e))?;
        std::io::copy(content, &mut out)
            .and_then(|_| out.sync_all())
            .map_err(|e| {
                let _ = std::fs::remove_file(&partial);
                io(&partial, e)
            })?;
        std::fs::rename(&partial, &blob).map_err(|e| io(&blob, e))?;
    }
    let entry = snapshot.join(file);
    let _ = std::fs::remove_file(&entry);
    #[cfg(unix)]
    std::os::unix::fs::symlink(Path::new("../../blobs").join(etag), &entry)
        .map_err(|e| io(&entry, e))?;
    #[cfg(not(unix))]
    std::fs::copy(&blob, &entry).map_err(|e| io(&entry, e))?;
    let main = refs.join("main");
    std::fs::write(&main, commit).map_err(|e| io(&main, e))?;
    Ok(entry)
}

/// [`resolve_model`], and with the `download` feature, a hub id that is not cached is
/// downloaded from `$HF_ENDPOINT` (default `https://huggingface.co`, token from
/// `$HF_TOKEN`) into `cache` first.
pub fn find_or_download(spec: &str, cache: &Path) -> Result<PathBuf> {
    let not_cached = match resolve_model(spec, cache) {
        Ok(dir) => return Ok(dir),
        Err(e) => e,
    };
    #[cfg(feature = "download")]
    if spec.split_once('/').is_some() && !Path::new(spec).exists() {
        return download::model(spec, cache).map_err(|e| match (e, &not_cached) {
            (Error::ModelNotFound { detail, .. }, Error::ModelNotFound { detail: hint, .. }) => {
                Error::ModelNotFound {
                    spec: spec.to_string(),
                    detail: format!("{detail}; and {hint}"),
                }
            }
            (e, _) => e,
        });
    }
    Err(not_cached)
}

#[cfg(feature = "download")]
mod download {
    use super::*;

    fn header(response: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim_start_matches("W/").trim_matches('"').to_string())
    }

    /// Downloads [`MODEL_FILES`] of `spec` at `main` into the cache.
    pub fn model(spec: &str, cache: &Path) -> Result<PathBuf> {
        let endpoint =
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
        let token = std::env::var("HF_TOKEN").ok();
        let (org, name) = spec.split_once('/').expect("checked by the caller");
        let repo = cache.join(format!("models--{org}--{name}"));
        // Redirects are followed by hand: the commit and the content hash are headers of the
        // hub's own answer, not of the storage it redirects large files to.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .build()
            .into();
        let failed = |detail: String| Error::ModelNotFound {
            spec: spec.to_string(),
            detail,
        };
        let mut snapshot = None;
        for file in MODEL_FILES {
            let url = format!("{endpoint}/{spec}/resolve/main/{file}");
            let get = |url: &str| {
                let mut request = agent.get(url);
                if let Some(token) = &token {
                    request = request.header("Authorization", format!("Bearer {token}"));
                }
                request
                    .call()
                    .map_err(|e| failed(format!("downloading {url}: {e}")))
            };
            let mut response = get(&url)?;
            let commit = header(&response, "x-repo-commit");
            let etag = header(&response, "x-linked-etag").or_else(|| header(&response, "etag"));
            let mut hops = 0;
            while response.status().is_redirection() && hops < 5 {
                let location = header(&response, "location")
                    .ok_or_else(|| failed(format!("{url}: redirect without a location")))?;
                let next = if location.starts_with('/') {
                    format!("{endpoint}{location}")
                } else {
                    location
                };
                response = get(&next)?;
                hops += 1;
            }
            if !response.status().is_success() {
                return Err(failed(format!(
                    "downloading {url}: HTTP {}",
                    response.status()
                )));
            }
            let (Some(commit), Some(etag)) = (commit, etag) else {
                return Err(failed(format!("{url}: the hub sent no commit or etag")));
            };
            let mut body = response.into_body().into_reader();
            let entry = store_file(&repo, &commit, &etag, file, &mut body)?;
            snapshot = entry.parent().map(Path::to_path_buf);
        }
        snapshot.ok_or_else(|| failed("nothing downloaded".into()))
    }
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
    fn stored_files_are_found_by_resolve() {
        let cache = scratch("stored");
        let repo = cache.join("models--org--model");
        for (i, file) in MODEL_FILES.iter().enumerate() {
            store_file(&repo, "c0ffee", &format!("etag{i}"), file, &mut &b"{}"[..]).unwrap();
        }
        let dir = resolve_model("org/model", &cache).unwrap();
        assert_eq!(dir, repo.join("snapshots/c0ffee"));
        assert_eq!(
            std::fs::read_to_string(dir.join("config.json")).unwrap(),
            "{}"
        );
        assert!(!repo.join("blobs/etag0.incomplete").exists());
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
