//! Chunk files: a header line with the chunk's record count and the SHA-256 of its record
//! bytes, then the records. Verified before a restart trusts a committed chunk and before
//! a merge reads it, so a truncated or edited chunk is an error, never a silently smaller
//! or different data set.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::records::ChunkHeader;
use crate::{Error, ProvenanceRecord};
use blip_core::fs::write_atomic;

/// Lowercase hex of a digest.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Writes chunk `chunk` (`samples` samples, `records` in order) atomically to `path`.
pub(crate) fn write_chunk(
    path: &Path,
    chunk: u64,
    samples: u64,
    records: &[ProvenanceRecord],
) -> Result<(), Error> {
    let mut body = Vec::new();
    for record in records {
        serde_json::to_writer(&mut body, record).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        body.push(b'\n');
    }
    let header = ChunkHeader {
        chunk,
        samples,
        records: records.len() as u64,
        sha256: hex(&Sha256::digest(&body)),
    };
    Ok(write_atomic(path, |out| {
        serde_json::to_writer(&mut *out, &header)?;
        out.write_all(b"\n")?;
        out.write_all(&body)
    })?)
}

/// Checks that `path` is chunk `chunk` with as many record lines and the same SHA-256 as
/// its header says (streaming: a chunk is never held in memory). A failure is
/// [`Error::CorruptOutput`] naming the file, expected and found values, and `recovery`.
pub(crate) fn verify_chunk(path: &Path, chunk: u64, recovery: &str) -> Result<ChunkHeader, Error> {
    let corrupt = |what: String| Error::CorruptOutput {
        path: path.to_path_buf(),
        reason: format!("{what}; {recovery}"),
    };
    // A FIFO would block the open below.
    let meta = std::fs::metadata(path).map_err(Error::io(path))?;
    if !meta.is_file() {
        return Err(corrupt("not a regular file".into()));
    }
    let file = File::open(path).map_err(Error::io(path))?;
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .map_err(Error::io(path))?;
    if !line.ends_with(b"\n") {
        return Err(corrupt("no complete header line".into()));
    }
    let header: ChunkHeader = serde_json::from_slice(&line)
        .map_err(|e| corrupt(format!("first line is not a chunk header: {e}")))?;
    if header.chunk != chunk {
        return Err(corrupt(format!(
            "header names chunk {}, the file name chunk {chunk}",
            header.chunk
        )));
    }
    let mut hasher = Sha256::new();
    let (mut lines, mut unterminated) = (0u64, false);
    loop {
        line.clear();
        if reader
            .read_until(b'\n', &mut line)
            .map_err(Error::io(path))?
            == 0
        {
            break;
        }
        hasher.update(&line);
        lines += 1;
        unterminated = !line.ends_with(b"\n");
    }
    let found = hex(&hasher.finalize());
    let mut problems = Vec::new();
    if lines != header.records {
        problems.push(format!(
            "header says {} record lines, found {lines}",
            header.records
        ));
    }
    if unterminated {
        problems.push("the last line is cut short (truncated file?)".into());
    }
    if found != header.sha256 {
        problems.push(format!(
            "record bytes have SHA-256 {found}, header says {}",
            header.sha256
        ));
    }
    if problems.is_empty() {
        Ok(header)
    } else {
        Err(corrupt(format!(
            "chunk {chunk} fails verification: {}",
            problems.join("; ")
        )))
    }
}

/// `chunks/00000012.jsonl`.
pub(crate) fn chunk_path(chunks_dir: &Path, chunk: u64) -> PathBuf {
    chunks_dir.join(format!("{chunk:08}.jsonl"))
}

/// Ids of the committed chunk files in `chunks_dir`.
pub(crate) fn list_chunks(chunks_dir: &Path) -> Result<BTreeSet<u64>, Error> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(chunks_dir).map_err(Error::io(chunks_dir))? {
        let entry = entry.map_err(Error::io(chunks_dir))?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".jsonl"))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        out.insert(id);
    }
    Ok(out)
}
