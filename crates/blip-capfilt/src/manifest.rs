//! `run.json`: the options a shard directory was produced with, compared on every restart
//! and across sibling shards so that outputs of different settings never mix.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::input::{Input, InputFile};
use crate::{Error, RunOptions, Shard};
use blip_core::fs::write_atomic;

/// Version of the on-disk layout; bumped when chunk or manifest formats change (2: chunk
/// headers carry the record count and SHA-256).
pub(crate) const FORMAT_VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunManifest {
    pub format: u32,
    /// `--input` as given.
    pub input: String,
    pub input_kind: String,
    /// The resolved input files and their sizes (a changed input is a changed option).
    pub input_files: Vec<InputFile>,
    /// Image root of JSON inputs (as given or defaulted), `None` for tars.
    pub image_root: Option<String>,
    pub shard: Shard,
    pub chunk_size: usize,
    pub captioner: String,
    pub filter: String,
    pub threshold: f32,
    pub generation: Value,
}

impl RunManifest {
    pub fn new(
        options: &RunOptions,
        input: &Input,
        captioner: String,
        filter: String,
    ) -> Result<RunManifest, Error> {
        Ok(RunManifest {
            format: FORMAT_VERSION,
            input: options.input.clone(),
            input_kind: input.kind().to_string(),
            input_files: input.files()?,
            image_root: match input.image_root() {
                None => None,
                Some(root) => Some(
                    root.to_str()
                        .ok_or_else(|| Error::NonUtf8Path {
                            path: root.to_path_buf(),
                            what: "the image root",
                        })?
                        .to_string(),
                ),
            },
            shard: options.shard,
            chunk_size: options.chunk_size,
            captioner,
            filter,
            threshold: options.threshold,
            generation: options.generation.clone(),
        })
    }

    pub fn read(path: &Path) -> Result<RunManifest, Error> {
        let bytes = std::fs::read(path).map_err(Error::io(path))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::CorruptOutput {
            path: path.to_path_buf(),
            reason: format!("not a CapFilt run.json: {e}"),
        })
    }

    pub fn write(&self, path: &Path) -> Result<(), Error> {
        Ok(write_atomic(path, |out| {
            serde_json::to_writer_pretty(&mut *out, self)?;
            out.write_all(b"\n")
        })?)
    }

    /// `name: recorded X, now Y` for every differing field; `ignore_shard_index` for
    /// siblings, which differ in the index only.
    pub fn differences(&self, recorded: &RunManifest, ignore_shard_index: bool) -> Vec<String> {
        // Through text, so that f32 fields read `0.6` and not `0.6000000238418579`.
        let as_value = |m: &RunManifest| {
            serde_json::to_string(m).and_then(|text| serde_json::from_str::<Value>(&text))
        };
        let (Ok(Value::Object(now)), Ok(Value::Object(then))) =
            (as_value(self), as_value(recorded))
        else {
            return vec!["unserialisable manifest".into()];
        };
        let mut out = Vec::new();
        for (name, value) in &now {
            let old = then.get(name).unwrap_or(&Value::Null);
            let same = if name == "shard" && ignore_shard_index {
                value.get("count") == old.get("count")
            } else {
                value == old
            };
            if !same {
                out.push(format!(
                    "{name}: recorded {}, now {}",
                    abbreviate(old),
                    abbreviate(value)
                ));
            }
        }
        out
    }
}

/// Keeps error messages readable when a long file list differs.
fn abbreviate(value: &Value) -> String {
    let text = value.to_string();
    const MAX: usize = 200;
    if text.len() <= MAX {
        return text;
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Errors unless `recorded` (the manifest at `path`) matches `now`.
pub(crate) fn check(
    path: PathBuf,
    now: &RunManifest,
    recorded: &RunManifest,
    sibling: bool,
) -> Result<(), Error> {
    let differences = now.differences(recorded, sibling);
    if differences.is_empty() {
        Ok(())
    } else {
        Err(Error::OptionsChanged { path, differences })
    }
}
