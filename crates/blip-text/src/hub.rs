//! Finding a model given as a local directory or a HuggingFace hub id (`Salesforce/blip-…`)
//! in the standard HF cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), laid out as `huggingface_hub` writes it:
//! `models--{org}--{name}/refs/main` names a snapshot, `snapshots/{rev}/` holds the files
//! (links into `blobs/`). With the `download` feature, [`find_or_download`] fetches an
//! uncached model into that layout, so Python tools and this crate share one cache.
//!
//! Why not the `hf-hub` crate: its 0.4 cache joins the server's `etag` header and commit
//! hash, and the contents of `refs/main`, into paths unchecked, so a hostile endpoint or a
//! planted cache entry writes or reads outside the cache. Here every such name must be a
//! hash and every directory written to must resolve inside the repo's cache entry, or
//! nothing is written (see `store_file`); the writes go through
//! [`blip_core::fs::write_atomic`].

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Files a BLIP model directory must hold.
pub const MODEL_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// The HF hub cache directory from the environment, as `huggingface_hub` computes it.
///
/// ```
/// let cache = blip_text::hub::cache_dir();
/// match std::env::var_os("HF_HUB_CACHE") {
///     Some(dir) => assert_eq!(cache, std::path::PathBuf::from(dir)),
///     // `$HF_HOME/hub` or `~/.cache/huggingface/hub`
///     None => assert!(cache.ends_with("hub")),
/// }
/// ```
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

/// A hub repo id, `org/name`, as `huggingface_hub` accepts it: letters, digits, `-`, `_`
/// and `.`, at most 96 characters a part, no `--` or `..`, no leading or trailing `-`/`.`.
/// Anything else (`./model`, `/abs/path`, `a/b/c`, `~/m`) is not an id: it is a path.
///
/// ```
/// use blip_text::hub::parse_repo_id;
///
/// assert_eq!(
///     parse_repo_id("Salesforce/blip-image-captioning-base"),
///     Some(("Salesforce", "blip-image-captioning-base"))
/// );
/// // Paths are not ids.
/// assert_eq!(parse_repo_id("./model"), None);
/// assert_eq!(parse_repo_id("models/blip/base"), None);
/// assert_eq!(parse_repo_id("/abs/path"), None);
/// ```
pub fn parse_repo_id(spec: &str) -> Option<(&str, &str)> {
    let (org, name) = spec.split_once('/')?;
    let part_ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 96
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !part.contains("--")
            && !part.contains("..")
            && !part.starts_with(['-', '.'])
            && !part.ends_with(['-', '.'])
    };
    (part_ok(org) && part_ok(name) && !name.ends_with(".git")).then_some((org, name))
}

/// Whether `s` is a hash as the hub names commits and blobs: 40 (git SHA-1) or 64 (SHA-256)
/// lowercase hexadecimal digits. Only such names are joined into cache paths.
fn is_hash(s: &str, lengths: &[usize]) -> bool {
    lengths.contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A commit id the cache may name a snapshot directory after: 40 lowercase hex digits.
pub(crate) fn is_commit_hash(commit: &str) -> bool {
    is_hash(commit, &[40])
}

/// An etag the cache may name a blob after: a git SHA-1 (40 hex digits, small files) or a
/// SHA-256 (64, LFS files).
#[cfg(any(feature = "download", test))]
pub(crate) fn is_etag_hash(etag: &str) -> bool {
    is_hash(etag, &[40, 64])
}

/// A local directory as is; otherwise a hub id resolved in `cache` at revision `main`.
///
/// When the id is not cached, the error says which files to fetch and where to put them
/// ([`find_or_download`] fetches them). A spec that is not a valid hub id (see
/// [`parse_repo_id`]) is a path, and a path that is not a directory is an error.
///
/// ```
/// use blip_text::hub::{MODEL_FILES, resolve_model};
///
/// # let cache = std::env::temp_dir().join(format!("blip-text-doc-resolve-{}", std::process::id()));
/// // A cache entry as huggingface_hub lays it out.
/// let commit = "0123456789abcdef0123456789abcdef01234567";
/// let repo = cache.join("models--Salesforce--blip-demo");
/// let snapshot = repo.join("snapshots").join(commit);
/// std::fs::create_dir_all(&snapshot)?;
/// std::fs::create_dir_all(repo.join("refs"))?;
/// std::fs::write(repo.join("refs").join("main"), commit)?;
/// for file in MODEL_FILES {
///     std::fs::write(snapshot.join(file), "")?;
/// }
/// assert_eq!(resolve_model("Salesforce/blip-demo", &cache)?, snapshot);
/// assert!(resolve_model("Salesforce/not-cached", &cache).is_err());
/// # std::fs::remove_dir_all(&cache)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn resolve_model(spec: &str, cache: &Path) -> Result<PathBuf> {
    let local = Path::new(spec);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    let not_found = |detail: String| Error::ModelNotFound {
        spec: spec.to_string(),
        detail,
    };
    let Some((org, name)) = parse_repo_id(spec) else {
        return Err(not_found(if local.exists() {
            "it is not a directory (a model directory holds config.json, model.safetensors \
             and tokenizer.json)"
                .into()
        } else {
            "no such directory, and it is not a hub id like Salesforce/blip-image-captioning-base"
                .into()
        }));
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
    let revision = revision.trim();
    if !is_commit_hash(revision) {
        return Err(not_found(format!(
            "{} names {revision:?}, which is not a commit hash: the cache entry is damaged; \
             delete {} and download again",
            repo.join("refs").join("main").display(),
            repo.display()
        )));
    }
    let snapshot = repo.join("snapshots").join(revision);
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
///
/// `commit` and `etag` come from a server: they must be hashes ([`is_commit_hash`],
/// [`is_etag_hash`]) and `file` a plain file name, and every directory written to must
/// resolve inside `repo`, or nothing is written (an [`Error::HubResponse`]).
#[cfg(any(feature = "download", test))]
pub(crate) fn store_file(
    repo: &Path,
    commit: &str,
    etag: &str,
    file: &str,
    content: &mut dyn std::io::Read,
) -> Result<PathBuf> {
    let refuse = |detail: String| Error::HubResponse {
        url: repo.display().to_string(),
        detail,
    };
    if !is_commit_hash(commit) {
        return Err(refuse(format!(
            "commit {commit:?} is not 40 hexadecimal digits"
        )));
    }
    if !is_etag_hash(etag) {
        return Err(refuse(format!(
            "etag {etag:?} is not a SHA-1 or SHA-256 hash"
        )));
    }
    let plain_name = Path::new(file)
        .components()
        .map(|c| matches!(c, std::path::Component::Normal(_)))
        .eq([true]);
    if !plain_name {
        return Err(refuse(format!(
            "file name {file:?} is not a plain file name"
        )));
    }
    let io = |path: &Path, source| {
        Error::Core(blip_core::Error::Io {
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
    // The names are validated; a directory of the repo that is itself a link elsewhere
    // (planted in the cache) must not carry the writes out of it either.
    let root = repo.canonicalize().map_err(|e| io(repo, e))?;
    for dir in [&blobs, &snapshot, &refs] {
        let real = dir.canonicalize().map_err(|e| io(dir, e))?;
        if !real.starts_with(&root) {
            return Err(refuse(format!(
                "{} resolves to {}, outside the cache entry {}",
                dir.display(),
                real.display(),
                root.display()
            )));
        }
    }
    let blob = blobs.join(etag);
    if !blob.is_file() {
        blip_core::fs::write_atomic(&blob, |out| std::io::copy(content, out).map(drop))
            .map_err(|e| io(&e.path, e.source))?;
    }
    let entry = snapshot.join(file);
    let _ = std::fs::remove_file(&entry);
    #[cfg(unix)]
    std::os::unix::fs::symlink(Path::new("../../blobs").join(etag), &entry)
        .map_err(|e| io(&entry, e))?;
    #[cfg(not(unix))]
    std::fs::copy(&blob, &entry).map_err(|e| io(&entry, e))?;
    let main = refs.join("main");
    blip_core::fs::write_atomic(&main, |out| out.write_all(commit.as_bytes()))
        .map_err(|e| io(&e.path, e.source))?;
    Ok(entry)
}

/// [`resolve_model`], and with the `download` feature, a hub id that is not cached is
/// downloaded from `$HF_ENDPOINT` (default `https://huggingface.co`, token from
/// `$HF_TOKEN`) into `cache` first.
///
/// ```
/// use blip_text::hub::find_or_download;
/// use std::path::Path;
///
/// // A local directory is used as it is: neither the cache nor the network is consulted.
/// let dir = std::env::temp_dir();
/// let found = find_or_download(dir.to_str().expect("a UTF-8 temp dir"), Path::new("/no/such/cache"))?;
/// assert_eq!(found, dir);
/// # Ok::<(), blip_text::Error>(())
/// ```
pub fn find_or_download(spec: &str, cache: &Path) -> Result<PathBuf> {
    let not_cached = match resolve_model(spec, cache) {
        Ok(dir) => return Ok(dir),
        Err(e) => e,
    };
    #[cfg(feature = "download")]
    if parse_repo_id(spec).is_some() && !Path::new(spec).exists() {
        let endpoint =
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
        let token = std::env::var("HF_TOKEN").ok();
        return download::model(&endpoint, token.as_deref(), spec, cache).map_err(|e| {
            match (e, &not_cached) {
                (
                    Error::ModelNotFound { detail, .. },
                    Error::ModelNotFound { detail: hint, .. },
                ) => Error::ModelNotFound {
                    spec: spec.to_string(),
                    detail: format!("{detail}; and {hint}"),
                },
                (e, _) => e,
            }
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

    /// Downloads [`MODEL_FILES`] of `spec` at `main` from `endpoint` into the cache.
    pub(super) fn model(
        endpoint: &str,
        token: Option<&str>,
        spec: &str,
        cache: &Path,
    ) -> Result<PathBuf> {
        let failed = |detail: String| Error::ModelNotFound {
            spec: spec.to_string(),
            detail,
        };
        let (org, name) = parse_repo_id(spec).ok_or_else(|| {
            failed("not a hub id like Salesforce/blip-image-captioning-base".into())
        })?;
        let repo = cache.join(format!("models--{org}--{name}"));
        // Redirects are followed by hand: the commit and the content hash are headers of the
        // hub's own answer, not of the storage it redirects large files to.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .build()
            .into();
        let mut snapshot = None;
        for file in MODEL_FILES {
            let url = format!("{endpoint}/{spec}/resolve/main/{file}");
            let get = |url: &str| {
                let mut request = agent.get(url);
                // The token goes to the hub only, never to the storage a redirect names.
                let same_host = url
                    .strip_prefix(endpoint)
                    .is_some_and(|rest| rest.starts_with('/'));
                if let Some(token) = token.filter(|_| same_host) {
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
            // store_file validates the commit and etag before it reads the body; a refusal
            // names the URL that sent them.
            let mut body = response.into_body().into_reader();
            let entry =
                store_file(&repo, &commit, &etag, file, &mut body).map_err(|e| match e {
                    Error::HubResponse { detail, .. } => Error::HubResponse {
                        url: url.clone(),
                        detail,
                    },
                    other => other,
                })?;
            snapshot = entry.parent().map(Path::to_path_buf);
        }
        snapshot.ok_or_else(|| failed("nothing downloaded".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

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
        let snapshot = repo.join("snapshots").join(COMMIT);
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), format!("{COMMIT}\n")).unwrap();
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
        std::fs::create_dir_all(repo.join("snapshots").join(COMMIT)).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), COMMIT).unwrap();
        std::fs::write(
            repo.join("snapshots").join(COMMIT).join("config.json"),
            "{}",
        )
        .unwrap();
        let err = resolve_model("org/model", &cache).unwrap_err().to_string();
        assert!(err.contains("lacks model.safetensors"), "{err}");
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn stored_files_are_found_by_resolve() {
        let cache = scratch("stored");
        let repo = cache.join("models--org--model");
        for (i, file) in MODEL_FILES.iter().enumerate() {
            store_file(
                &repo,
                COMMIT,
                &format!("{i}").repeat(64),
                file,
                &mut &b"{}"[..],
            )
            .unwrap();
        }
        let dir = resolve_model("org/model", &cache).unwrap();
        assert_eq!(dir, repo.join("snapshots").join(COMMIT));
        assert_eq!(
            std::fs::read_to_string(dir.join("config.json")).unwrap(),
            "{}"
        );
        assert!(
            !repo
                .join(format!("blobs/{}.incomplete", "0".repeat(64)))
                .exists()
        );
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

    #[test]
    fn paths_are_never_taken_for_hub_ids() {
        for spec in [
            "./no/such/dir",
            "../model",
            "/abs/model",
            "a/b/c",
            "~/models/x",
            "org/..",
            "../x",
            "org/name.git",
            "org--x/name",
            "org/na me",
        ] {
            assert_eq!(parse_repo_id(spec), None, "{spec}");
            let err = find_or_download(spec, Path::new("/nonexistent")).unwrap_err();
            assert!(matches!(err, Error::ModelNotFound { .. }), "{spec}: {err}");
        }
        assert_eq!(
            parse_repo_id("Salesforce/blip-image-captioning-base"),
            Some(("Salesforce", "blip-image-captioning-base"))
        );
        assert_eq!(parse_repo_id("a_b/c.d-1"), Some(("a_b", "c.d-1")));
    }

    #[test]
    fn a_damaged_refs_main_is_not_followed() {
        let cache = scratch("badref");
        let repo = cache.join("models--org--model");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "../../../../etc").unwrap();
        let err = resolve_model("org/model", &cache).unwrap_err().to_string();
        assert!(err.contains("not a commit hash"), "{err}");
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn store_file_refuses_names_that_are_not_hashes() {
        let root = scratch("names");
        let repo = root.join("cache").join("models--org--model");
        let etag = "a".repeat(64);
        let outside = root.join("outside");
        for (commit, etag, file) in [
            ("../../../outside", etag.as_str(), "config.json"),
            (outside.to_str().unwrap(), etag.as_str(), "config.json"),
            (COMMIT, "../../../outside", "config.json"),
            (COMMIT, outside.to_str().unwrap(), "config.json"),
            (COMMIT, etag.as_str(), "../../x.json"),
            (COMMIT, etag.as_str(), "/tmp/x.json"),
        ] {
            let err = store_file(&repo, commit, etag, file, &mut &b"{}"[..]).unwrap_err();
            assert!(matches!(err, Error::HubResponse { .. }), "{err}");
        }
        assert!(!repo.exists(), "nothing is written for a refused answer");
        assert!(!outside.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn store_file_does_not_follow_a_planted_link_out_of_the_cache() {
        let root = scratch("planted");
        let repo = root.join("cache").join("models--org--model");
        let outside = root.join("outside");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, repo.join("blobs")).unwrap();
        let err = store_file(
            &repo,
            COMMIT,
            &"b".repeat(40),
            "config.json",
            &mut &b"{}"[..],
        )
        .unwrap_err();
        assert!(matches!(err, Error::HubResponse { .. }), "{err}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Requests a test server received, as text.
    #[cfg(feature = "download")]
    type Seen = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

    /// A server on 127.0.0.1 that answers every request with `status` and `headers` and a
    /// `{}` body, for at most `requests` requests or 20 seconds; returns its URL and the
    /// requests it saw.
    #[cfg(feature = "download")]
    fn test_server(status: &str, headers: String, requests: usize) -> (String, Seen) {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let seen = Seen::default();
        let log = seen.clone();
        let status = status.to_string();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let mut served = 0;
            while served < requests && std::time::Instant::now() < deadline {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                };
                stream.set_nonblocking(false).unwrap();
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                    request.push(byte[0]);
                }
                log.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&request).to_lowercase());
                let response = format!(
                    "HTTP/1.1 {status}\r\n{headers}content-length: 2\r\nconnection: close\r\n\r\n{{}}"
                );
                let _ = stream.write_all(response.as_bytes());
                served += 1;
            }
        });
        (format!("http://{address}"), seen)
    }

    #[cfg(feature = "download")]
    fn malicious_hub(headers: String, requests: usize) -> String {
        test_server("200 OK", headers, requests).0
    }

    #[cfg(feature = "download")]
    #[test]
    fn the_token_is_not_sent_where_a_redirect_points() {
        let root = scratch("redirect");
        let (storage, storage_seen) = test_server("200 OK", String::new(), MODEL_FILES.len());
        let (hub, hub_seen) = test_server(
            "302 Found",
            format!(
                "location: {storage}/blob\r\nx-repo-commit: {COMMIT}\r\netag: \"{}\"\r\n",
                "d".repeat(64)
            ),
            MODEL_FILES.len(),
        );
        let snapshot = download::model(&hub, Some("secret"), "org/model", &root).unwrap();
        assert!(snapshot.join("config.json").is_file());
        let hub_seen = hub_seen.lock().unwrap();
        let storage_seen = storage_seen.lock().unwrap();
        assert_eq!(hub_seen.len(), MODEL_FILES.len());
        assert!(
            hub_seen
                .iter()
                .all(|r| r.contains("authorization: bearer secret"))
        );
        assert_eq!(storage_seen.len(), MODEL_FILES.len());
        assert!(storage_seen.iter().all(|r| !r.contains("authorization")));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[cfg(feature = "download")]
    #[test]
    fn downloads_refuse_malicious_commit_and_etag_headers() {
        let root = scratch("malicious");
        let cache = root.join("cache");
        let victim = root.join("victim.txt");
        let escape_dir = root.join("escaped");
        let good_etag = "c".repeat(64);
        let cases = [
            // An absolute etag would have written the blob anywhere.
            (
                COMMIT.to_string(),
                root.join("written-anywhere").display().to_string(),
            ),
            (COMMIT.to_string(), "../../../escaped".to_string()),
            // A commit naming an existing file replaced it with a dangling link.
            (victim.display().to_string(), good_etag.clone()),
            // A `../..` commit created directories and links outside the cache.
            ("../../../escaped".to_string(), good_etag.clone()),
            (
                "0123456789ABCDEF0123456789ABCDEF01234567".to_string(),
                good_etag.clone(),
            ),
        ];
        for (commit, etag) in cases {
            std::fs::write(&victim, "keep me").unwrap();
            let endpoint = malicious_hub(
                format!("x-repo-commit: {commit}\r\netag: \"{etag}\"\r\n"),
                1,
            );
            let err = download::model(&endpoint, None, "org/model", &cache).unwrap_err();
            assert!(
                matches!(err, Error::HubResponse { .. }),
                "{commit} {etag}: {err}"
            );
            assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
            assert!(!victim.is_symlink());
            assert!(!escape_dir.exists());
            assert!(!root.join("written-anywhere").exists());
            assert!(
                !cache.exists(),
                "a refused answer writes nothing into the cache"
            );
        }
        // The same server with honest headers fills the cache.
        let endpoint = malicious_hub(
            format!("x-repo-commit: {COMMIT}\r\netag: \"{good_etag}\"\r\n"),
            MODEL_FILES.len(),
        );
        let snapshot = download::model(&endpoint, None, "org/model", &cache).unwrap();
        assert_eq!(
            snapshot,
            cache.join("models--org--model/snapshots").join(COMMIT)
        );
        assert_eq!(
            std::fs::read_to_string(snapshot.join("config.json")).unwrap(),
            "{}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
