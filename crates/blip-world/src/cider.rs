//! CIDEr-D (Vedantam et al. 2015) as computed by pycocoevalcap's `Cider` scorer.
//!
//! For each image with candidate `c` and references `S`, with n-gram vectors
//! `g_n(x)[w] = tf(w, x) · (ln N − ln max(1, df(w)))` (N = number of images, df(w) = number of
//! images whose references contain w):
//!
//! ```text
//! CIDEr-D_n(c, S) = 10/|S| · Σ_s  exp(−(ℓ(c) − ℓ(s))² / (2σ²)) ·
//!                   Σ_w min(g_n(c)[w], g_n(s)[w]) · g_n(s)[w] / (‖g_n(c)‖ ‖g_n(s)‖)
//! CIDEr-D(c, S)   = mean over n = 1..4 of CIDEr-D_n,  σ = 6
//! ```
//!
//! As in pycocoevalcap: a zero norm leaves the unnormalised (zero) dot product; the corpus
//! score is the mean over images; and the length ℓ of the Gaussian penalty is, by an
//! accident of that code which every published number carries, the number of *bigrams*
//! (words − 1, or 0 for an empty or one-word sentence).

use std::collections::HashMap;

const N: usize = 4;
const SIGMA: f64 = 6.0;

/// pycocoevalcap's PTB tokenizer, approximately: lower case, with the punctuation it drops
/// (`. , : ; ! ? " ( ) [ ] { }`, backticks, lone dashes) removed.
///
/// ```
/// use blip_world::cider_tokenize;
///
/// assert_eq!(cider_tokenize("A red circle, on the LEFT."), ["a", "red", "circle", "on", "the", "left"]);
/// assert_eq!(cider_tokenize("well - done"), ["well", "done"]); // lone dashes are dropped
/// ```
pub fn cider_tokenize(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    lower
        .split(|c: char| c.is_whitespace() || ".,:;!?\"()[]{}`".contains(c))
        .filter(|t| !t.is_empty() && !t.chars().all(|c| c == '-'))
        .map(str::to_string)
        .collect()
}

/// n-gram counts of a token list, one map per n (keys are the n-grams joined by spaces).
fn ngrams(tokens: &[String]) -> [HashMap<String, f64>; N] {
    let mut counts: [HashMap<String, f64>; N] = Default::default();
    for (k, map) in counts.iter_mut().enumerate() {
        for window in tokens.windows(k + 1) {
            *map.entry(window.join(" ")).or_insert(0.0) += 1.0;
        }
    }
    counts
}

/// A tf-idf vector per n, its norms and pycocoevalcap's "length" (the bigram count).
struct TfIdf {
    vec: [HashMap<String, f64>; N],
    norm: [f64; N],
    length: f64,
}

fn tfidf(counts: &[HashMap<String, f64>; N], df: &HashMap<String, f64>, log_images: f64) -> TfIdf {
    let mut vec: [HashMap<String, f64>; N] = Default::default();
    let mut norm = [0.0; N];
    for n in 0..N {
        for (gram, &tf) in &counts[n] {
            let d = df.get(gram).copied().unwrap_or(0.0).max(1.0).ln();
            let v = tf * (log_images - d);
            norm[n] += v * v;
            vec[n].insert(gram.clone(), v);
        }
    }
    let length = counts[1].values().sum();
    TfIdf {
        vec,
        norm: norm.map(f64::sqrt),
        length,
    }
}

fn similarity(hyp: &TfIdf, reference: &TfIdf) -> [f64; N] {
    let delta = hyp.length - reference.length;
    let penalty = (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
    std::array::from_fn(|n| {
        let mut val = 0.0;
        for (gram, &h) in &hyp.vec[n] {
            let r = reference.vec[n].get(gram).copied().unwrap_or(0.0);
            val += h.min(r) * r;
        }
        if hyp.norm[n] != 0.0 && reference.norm[n] != 0.0 {
            val /= hyp.norm[n] * reference.norm[n];
        }
        val * penalty
    })
}

/// Per-image CIDEr-D scores (see the module docs) of `candidates[i]` against
/// `references[i]`; document frequencies are taken over all `references`. Texts are
/// tokenised with [`cider_tokenize`]. An image with no references scores 0.
///
/// # Panics
/// If the two slices differ in length.
///
/// ```
/// use blip_world::cider_scores;
///
/// let references = vec![
///     vec!["a red circle on the left".to_string()],
///     vec!["a blue square at the top".to_string()],
/// ];
/// let candidates = ["a red circle on the left".to_string(), "a green star".to_string()];
/// let scores = cider_scores(&candidates, &references);
/// assert!((scores[0] - 10.0).abs() < 1e-9); // a perfect match scores 10
/// assert_eq!(scores[1], 0.0); // nothing in common with its reference
/// ```
pub fn cider_scores(candidates: &[String], references: &[Vec<String>]) -> Vec<f64> {
    assert_eq!(
        candidates.len(),
        references.len(),
        "cider: {} candidates but {} reference lists",
        candidates.len(),
        references.len()
    );
    let refs: Vec<Vec<[HashMap<String, f64>; N]>> = references
        .iter()
        .map(|rs| rs.iter().map(|r| ngrams(&cider_tokenize(r))).collect())
        .collect();
    let mut df: HashMap<String, f64> = HashMap::new();
    for image in &refs {
        let mut seen: std::collections::HashSet<&String> = std::collections::HashSet::new();
        for r in image {
            for map in r {
                seen.extend(map.keys());
            }
        }
        for gram in seen {
            *df.entry(gram.clone()).or_insert(0.0) += 1.0;
        }
    }
    let log_images = (references.len() as f64).ln();
    candidates
        .iter()
        .zip(&refs)
        .map(|(c, image_refs)| {
            if image_refs.is_empty() {
                return 0.0;
            }
            let hyp = tfidf(&ngrams(&cider_tokenize(c)), &df, log_images);
            let mut score = [0.0; N];
            for r in image_refs {
                let sim = similarity(&hyp, &tfidf(r, &df, log_images));
                for (s, v) in score.iter_mut().zip(sim) {
                    *s += v;
                }
            }
            score.iter().sum::<f64>() / N as f64 / image_refs.len() as f64 * 10.0
        })
        .collect()
}

/// Corpus CIDEr-D: the mean of [`cider_scores`] (0 for no images), as pycocoevalcap's
/// `Cider().compute_score` returns it (×10 scale: COCO papers print it ×100 again, e.g.
/// BLIP's 129.7 is 1.297 here).
///
/// # Panics
/// If the two slices differ in length.
///
/// ```
/// use blip_world::cider;
///
/// let references = vec![
///     vec!["a red circle on the left".to_string(), "a crimson ball on the left side".to_string()],
///     vec!["a blue square at the top".to_string()],
/// ];
/// let exact = ["a red circle on the left".to_string(), "a blue square at the top".to_string()];
/// let short = ["a red circle".to_string(), "a blue square".to_string()];
/// let (exact, short) = (cider(&exact, &references), cider(&short, &references));
/// assert!(exact > short && short > 0.0);
/// assert_eq!(cider(&[], &[]), 0.0);
/// ```
pub fn cider(candidates: &[String], references: &[Vec<String>]) -> f64 {
    let scores = cider_scores(candidates, references);
    if scores.is_empty() {
        0.0
    } else {
        scores.iter().sum::<f64>() / scores.len() as f64
    }
}
