//! CIDEr-D against values computed with pycocoevalcap 1.2 (`Cider().compute_score`, the
//! texts already tokenised) on the same inputs.

use blip_world::{cider, cider_scores, cider_tokenize};

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn close(a: f64, b: f64) {
    approx::assert_relative_eq!(a, b, epsilon = 1e-9, max_relative = 1e-9);
}

fn check(cands: &[&str], refs: &[&[&str]], corpus: f64, per_image: &[f64]) {
    let cands = s(cands);
    let refs: Vec<Vec<String>> = refs.iter().map(|r| s(r)).collect();
    close(cider(&cands, &refs), corpus);
    let scores = cider_scores(&cands, &refs);
    assert_eq!(scores.len(), per_image.len());
    for (a, b) in scores.iter().zip(per_image) {
        close(*a, *b);
    }
}

#[test]
fn matches_pycocoevalcap() {
    check(
        &[
            "a red circle on the left",
            "two shapes a blue square above a green star",
            "a small yellow triangle",
        ],
        &[
            &[
                "a red circle on the left",
                "a big red ball on the left side",
            ],
            &[
                "a blue square above a green star",
                "two shapes a blue box over a green star",
            ],
            &["a tiny yellow triangle in the middle", "a yellow triangle"],
        ],
        5.038476938649771,
        &[6.377206627465917, 6.40635594062581, 2.3318682478575865],
    );
}

#[test]
fn single_image_has_zero_idf() {
    // ln(1 image) − ln(df = 1) = 0: every weight vanishes.
    check(
        &["a red circle"],
        &[&["a red circle", "a red ball"]],
        0.0,
        &[0.0],
    );
}

#[test]
fn clipping_of_repeated_ngrams() {
    check(
        &["the the the the cat", "a dog"],
        &[&["the cat sat on the mat"], &["a dog runs", "the dog"]],
        2.171777420440088,
        &[1.5814357658819236, 2.7621190749982527],
    );
}

#[test]
fn short_empty_and_long_candidates() {
    // One-word and empty candidates, and the bigram-count length of the Gaussian penalty.
    check(
        &["dog", "", "a cat on a mat with a hat and a bat near a rat"],
        &[&["a dog"], &["a cat"], &["a cat on a mat", "the cat"]],
        1.0877603712217911,
        &[2.465517791859791, 0.0, 0.797763321805583],
    );
}

#[test]
fn tokenisation_and_edge_cases() {
    assert_eq!(
        cider_tokenize("A Red circle, on the LEFT. -- two-tone"),
        ["a", "red", "circle", "on", "the", "left", "two-tone"]
    );
    let refs = vec![s(&["a red circle"]), s(&["a blue square"])];
    let plain = cider(&s(&["a red circle", "a blue square"]), &refs);
    let noisy = cider(&s(&["A red Circle.", "a blue, square!"]), &refs);
    close(noisy, plain);
    // Exact matches of 3-word captions: n = 1..3 score 1, no 4-grams: 10 · 3/4.
    close(plain, 7.5);
    assert_eq!(cider(&[], &[]), 0.0);
    assert_eq!(cider_scores(&s(&["x"]), &[vec![]]), [0.0]);
}
