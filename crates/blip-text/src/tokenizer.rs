//! [`BlipTokenizer`]: bert-base-uncased WordPiece plus BLIP's `[DEC]` and `[ENC]`.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// The special tokens BLIP relies on, registered as special so that literal occurrences in a
/// text match them and decoding can drop them.
pub const SPECIAL_TOKENS: [&str; 7] = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]",
];

/// How a batch is padded.
///
/// ```
/// use blip_text::{BlipTokenizer, Padding};
///
/// # let path = std::env::temp_dir().join(format!("blip-text-doc-{}-{}.txt", "padding", std::process::id()));
/// # std::fs::write(&path, "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nred\nblue\ncircle\nsquare\npicture\n")?;
/// // A tokenizer over a tiny vocab.txt ([PAD] a red blue circle ...).
/// let tokenizer = BlipTokenizer::from_vocab(&path)?;
/// let texts = ["a red", "a blue circle"];
/// assert_eq!(tokenizer.encode_batch(&texts, None, Padding::Longest)?.shape(), [2, 5]);
/// assert_eq!(tokenizer.encode_batch(&texts, Some(8), Padding::MaxLength)?.shape(), [2, 8]);
/// // Truncation keeps the final [SEP].
/// let cut = tokenizer.encode_batch(&texts, Some(4), Padding::Longest)?;
/// assert_eq!(cut.input_ids[1], [tokenizer.cls_token_id, 5, 7, tokenizer.sep_token_id]);
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// To the longest row (captioning and VQA fine-tuning, questions).
    Longest,
    /// To `max_length` (pre-training 30, retrieval/ITM 35).
    MaxLength,
}

/// A tokenized batch, right-padded with `[PAD]`.
///
/// ```
/// use blip_text::Encoded;
/// use burn::tensor::Device;
///
/// let text = Encoded {
///     input_ids: vec![vec![101, 7, 8, 102], vec![101, 9, 102, 0]],
///     attention_mask: vec![vec![1, 1, 1, 1], vec![1, 1, 1, 0]],
/// };
/// assert_eq!(text.shape(), [2, 4]);
/// let (ids, mask) = text.to_tensors(&Device::flex());
/// assert_eq!((ids.dims(), mask.dims()), ([2, 4], [2, 4]));
/// assert_eq!(mask.sum().into_scalar::<i64>(), 7); // real tokens
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids, `[CLS] … [SEP] [PAD]…` per row.
    pub input_ids: Vec<Vec<u32>>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<Vec<u32>>,
}

impl Encoded {
    /// Rows and columns.
    pub fn shape(&self) -> [usize; 2] {
        [
            self.input_ids.len(),
            self.input_ids.first().map_or(0, Vec::len),
        ]
    }

    /// The same rows with the first token of each replaced by `token` (`[CLS]` → `[ENC]`
    /// for the image-grounded encoder, → `[DEC]` for the decoder); the mask is unchanged.
    ///
    /// ```
    /// use blip_text::Encoded;
    /// let text = Encoded { input_ids: vec![vec![101, 7, 102]], attention_mask: vec![vec![1, 1, 1]] };
    /// assert_eq!(text.with_first_token(30523).input_ids, vec![vec![30523, 7, 102]]);
    /// ```
    pub fn with_first_token(&self, token: u32) -> Self {
        Self {
            input_ids: with_first_token(&self.input_ids, token),
            attention_mask: self.attention_mask.clone(),
        }
    }

    /// The ids and mask as `[B, L]` int tensors.
    pub fn to_tensors(&self, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
        (
            ids_tensor(&self.input_ids, device),
            ids_tensor(&self.attention_mask, device),
        )
    }
}

/// `rows` with the first token of each replaced by `token`: see [`Encoded::with_first_token`].
///
/// ```
/// use blip_text::with_first_token;
///
/// let rows = with_first_token(&[vec![101, 7, 102], vec![101, 8, 0]], 30522);
/// assert_eq!(rows, [vec![30522, 7, 102], vec![30522, 8, 0]]);
/// assert!(with_first_token(&[vec![]], 30522)[0].is_empty());
/// ```
pub fn with_first_token(rows: &[Vec<u32>], token: u32) -> Vec<Vec<u32>> {
    rows.iter()
        .map(|row| {
            let mut row = row.clone();
            if let Some(first) = row.first_mut() {
                *first = token;
            }
            row
        })
        .collect()
}

/// `[B, L]` int tensor from equal-length rows.
///
/// ```
/// use blip_text::ids_tensor;
/// use burn::tensor::Device;
///
/// let ids = ids_tensor(&[vec![101, 7, 102], vec![101, 8, 0]], &Device::flex());
/// assert_eq!(ids.dims(), [2, 3]);
/// assert_eq!(ids.into_data().try_into_vec_as::<i64>().unwrap(), [101, 7, 102, 101, 8, 0]);
/// ```
pub fn ids_tensor(rows: &[Vec<u32>], device: &Device) -> Tensor<2, Int> {
    let l = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flatten().map(|&v| v as i64).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), l]), device)
}

/// bert-base-uncased WordPiece with `[DEC]` (bos) and `[ENC]` added, as BLIP uses it.
///
/// ```
/// use blip_text::BlipTokenizer;
///
/// # let path = std::env::temp_dir().join(format!("blip-text-doc-tokenizer-{}.txt", std::process::id()));
/// std::fs::write(&path, "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nred\nblue\ncircle\nsquare\npicture\n")?;
/// let tokenizer = BlipTokenizer::from_vocab(&path)?;
/// // [DEC] and [ENC] are added after the file's 11 tokens.
/// assert_eq!((tokenizer.dec_token_id, tokenizer.enc_token_id, tokenizer.vocab_size()), (11, 12, 13));
/// let ids = tokenizer.encode("A red Circle")?;
/// assert_eq!(ids, [2, 5, 6, 8, 3]); // [CLS] a red circle [SEP]
/// assert_eq!(tokenizer.decode(&ids, true)?, "a red circle");
/// assert_eq!(tokenizer.decoder_prompt("a picture")?, [11, 5, 10]); // [DEC] a picture
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct BlipTokenizer {
    inner: Tokenizer,
    /// `[PAD]` id (0).
    pub pad_token_id: u32,
    /// `[CLS]` id (101).
    pub cls_token_id: u32,
    /// `[SEP]` id (102).
    pub sep_token_id: u32,
    /// `[DEC]` id (30522).
    pub dec_token_id: u32,
    /// `[ENC]` id (30523).
    pub enc_token_id: u32,
}

impl BlipTokenizer {
    /// Loads a HF `tokenizer.json`. Fixed padding/truncation stored in the file are switched
    /// off; `[DEC]`/`[ENC]` are added when absent (HF BLIP repos lack them).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = blip_core::read_file(path)?;
        // Plain JSON first: the tokenizers crate panics on some malformed files (a file cut
        // inside "decoder") instead of returning an error.
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| tokenizer_error(path, format!("not JSON: {e}")))?;
        let inner = guard(path, || {
            Tokenizer::from_bytes(&bytes).map_err(|e| tokenizer_error(path, e))
        })?;
        guard(path, || Self::from_tokenizer(inner, path))
    }

    /// Builds the BERT uncased tokenizer from a `vocab.txt` (one token per line): lowercasing
    /// and accent stripping, CJK split per character, WordPiece with `##` continuations and
    /// words over 100 characters as `[UNK]`.
    pub fn from_vocab(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // Refuses a FIFO or device before the tokenizers crate opens it and blocks.
        drop(blip_core::open_file(path)?);
        let file = path.to_str().ok_or_else(|| Error::Tokenizer {
            path: path.to_path_buf(),
            message: "path is not UTF-8".into(),
        })?;
        let model = WordPiece::from_file(file)
            .unk_token("[UNK]".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| tokenizer_error(path, e))?;
        let id = |token: &str| {
            model_token_id(&model, token).ok_or_else(|| Error::Tokenizer {
                path: path.to_path_buf(),
                message: format!("vocabulary has no {token}"),
            })
        };
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        let mut inner = Tokenizer::new(model);
        inner
            .with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
            .map_err(|e| tokenizer_error(path, e))?;
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        inner.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), sep),
            ("[CLS]".into(), cls),
        )));
        inner.with_decoder(Some(WordPieceDecoder::new("##".into(), true)));
        Self::from_tokenizer(inner, path)
    }

    fn from_tokenizer(mut inner: Tokenizer, path: &Path) -> Result<Self> {
        // Ids beyond any vocabulary a config may declare; near u32::MAX they also made the
        // ids of added tokens wrap around to 0.
        if let Some((token, &id)) = inner
            .get_vocab(true)
            .iter()
            .find(|&(_, &id)| id as usize >= blip_core::MAX_WIDTH)
        {
            return Err(tokenizer_error(
                path,
                format!(
                    "token {token:?} has id {id}, beyond the largest vocabulary ({})",
                    blip_core::MAX_WIDTH
                ),
            ));
        }
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| tokenizer_error(path, e))?;
        inner
            .add_special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)))
            .map_err(|e| tokenizer_error(path, e))?;
        let id = |token: &str| {
            inner.token_to_id(token).ok_or_else(|| Error::Tokenizer {
                path: path.to_path_buf(),
                message: format!("no id for {token}"),
            })
        };
        let tokenizer = Self {
            pad_token_id: id("[PAD]")?,
            cls_token_id: id("[CLS]")?,
            sep_token_id: id("[SEP]")?,
            dec_token_id: id("[DEC]")?,
            enc_token_id: id("[ENC]")?,
            inner,
        };
        // BLIP's texts are `[CLS] … [SEP]`: a tokenizer whose post-processor does not
        // write them (or is missing) would feed the models other inputs than they learnt.
        let empty = tokenizer.encode("")?;
        if empty != [tokenizer.cls_token_id, tokenizer.sep_token_id] {
            return Err(tokenizer_error(
                path,
                format!(
                    "an empty text encodes as {empty:?}, not [CLS] [SEP] ({}, {}): \
                     the post-processor must add them",
                    tokenizer.cls_token_id, tokenizer.sep_token_id
                ),
            ));
        }
        Ok(tokenizer)
    }

    /// Number of ids, added tokens included (30524 for BLIP).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `[CLS] tokens [SEP]` for one text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let failed = |message: String| Error::Encode {
            text: text.to_string(),
            message,
        };
        let encoding = caught(|| self.inner.encode(text, true))
            .map_err(failed)?
            .map_err(|e| failed(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Encodes a batch: each row truncated to `max_length` (keeping the final `[SEP]`, as
    /// transformers' truncation does) and right-padded per `padding`, by the tokenizers
    /// crate's own truncation and padding. A `max_length` below 2 cannot hold `[CLS]` and
    /// `[SEP]` and is an error.
    ///
    /// ```no_run
    /// use blip_text::{BlipTokenizer, Padding};
    /// # fn main() -> blip_text::Result<()> {
    /// let tokenizer = BlipTokenizer::from_file("tokenizer.json")?;
    /// let text = tokenizer.encode_batch(&["a dog", "a cat on a mat"], Some(35), Padding::MaxLength)?;
    /// assert_eq!(text.shape(), [2, 35]);
    /// # Ok(()) }
    /// ```
    pub fn encode_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
        max_length: Option<usize>,
        padding: Padding,
    ) -> Result<Encoded> {
        use tokenizers::utils::padding::{
            PaddingDirection, PaddingParams, PaddingStrategy, pad_encodings,
        };
        use tokenizers::utils::truncation::{TruncationParams, truncate_encodings};

        // The post-processor adds `[CLS]` and `[SEP]` after truncation, so the text keeps
        // `max_length` less those.
        let added = self
            .inner
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
        let truncation = match max_length {
            Some(max) if max < added => {
                return Err(Error::Encode {
                    text: format!("max_length {max}"),
                    message: format!("a row needs room for the {added} special tokens"),
                });
            }
            Some(max) => Some(TruncationParams {
                max_length: max - added,
                ..TruncationParams::default()
            }),
            None => None,
        };
        let mut encodings = texts
            .iter()
            .map(|text| {
                let text = text.as_ref();
                let failed = |message: String| Error::Encode {
                    text: text.to_string(),
                    message,
                };
                caught(|| -> tokenizers::Result<tokenizers::Encoding> {
                    let encoding = self.inner.encode(text, false)?;
                    let encoding = match &truncation {
                        Some(params) => truncate_encodings(encoding, None, params)?.0,
                        None => encoding,
                    };
                    self.inner.post_process(encoding, None, true)
                })
                .map_err(failed)?
                .map_err(|e| failed(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let strategy = match (padding, max_length) {
            (Padding::MaxLength, Some(max)) => PaddingStrategy::Fixed(max),
            _ => PaddingStrategy::BatchLongest,
        };
        let params = PaddingParams {
            strategy,
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.pad_token_id,
            pad_type_id: 0,
            pad_token: "[PAD]".into(),
        };
        pad_encodings(&mut encodings, &params).map_err(|e| Error::Encode {
            text: format!("{} texts", texts.len()),
            message: e.to_string(),
        })?;
        Ok(Encoded {
            input_ids: encodings.iter().map(|e| e.get_ids().to_vec()).collect(),
            attention_mask: encodings
                .iter()
                .map(|e| e.get_attention_mask().to_vec())
                .collect(),
        })
    }

    /// The decoder prompt for `text`, as BLIP builds it: `[DEC]` replaces `[CLS]` and the
    /// trailing `[SEP]` is dropped (`""` gives `[DEC]` alone: unconditional captioning).
    pub fn decoder_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        ids.pop(); // [SEP]
        let Some(first) = ids.first_mut() else {
            return Err(Error::Encode {
                text: text.to_string(),
                message: "the tokenizer wrote no [CLS] to replace by [DEC]".into(),
            });
        };
        *first = self.dec_token_id;
        Ok(ids)
    }

    /// Decodes ids to text: `##` pieces joined, special tokens (`[CLS]`, `[SEP]`, `[PAD]`,
    /// `[DEC]`, `[ENC]`...) dropped when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let failed = |message: String| Error::Encode {
            text: format!("ids {ids:?}"),
            message,
        };
        caught(|| self.inner.decode(ids, skip_special_tokens))
            .map_err(failed)?
            .map_err(|e| failed(e.to_string()))
    }

    /// Writes the tokenizer as a `tokenizer.json` (with `[DEC]`/`[ENC]`) that
    /// [`Self::from_file`] and transformers read, atomically ([`blip_core::fs::write_atomic`]).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| tokenizer_error(path, e))?;
        blip_core::fs::write_atomic(path, |out| out.write_all(json.as_bytes()))
            .map_err(|e| blip_core::Error::from(e).into())
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

fn model_token_id(model: &WordPiece, token: &str) -> Option<u32> {
    use tokenizers::Model;
    model.token_to_id(token)
}

/// Runs a call into the tokenizers crate, turning a panic into an error message. Some of
/// its code paths panic on a malformed `tokenizer.json` (a post-processor naming a token
/// it does not define, a BPE decoder given no tokens) where an error is due; the fuzz
/// corpus in `crates/blip-train/tests/fuzz-corpus/tokenizer/` holds each case.
fn caught<T>(call: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        format!("the tokenizers crate failed: {message}")
    })
}

/// [`caught`] for a tokenizer being built from `path`.
fn guard<T>(path: &Path, call: impl FnOnce() -> Result<T>) -> Result<T> {
    caught(call).map_err(|message| tokenizer_error(path, message))?
}

fn tokenizer_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        path: PathBuf::from(path),
        message: e.to_string(),
    }
}
