//! How well a score separates two sets: the area under the ROC curve.

/// The probability that a score drawn from `positive` is above one drawn from `negative`,
/// ties counting half (the area under the ROC curve, Mann–Whitney's U over the product of
/// the sizes); `None` when either set is empty or a score is NaN.
///
/// It grades the CapFilt filter without its threshold: the share of (clean, noisy) pairs of
/// web texts whose ITM probabilities it ranks the right way round. 0.5 is chance.
///
/// ```
/// use blip_world::ranking_auc;
///
/// assert_eq!(ranking_auc(&[0.9, 0.8], &[0.1, 0.2]), Some(1.0));
/// assert_eq!(ranking_auc(&[0.1], &[0.9]), Some(0.0));
/// // 0.5 beats 0.4, ties 0.5 and loses to 0.6: (1 + 0.5 + 0) / 3.
/// assert_eq!(ranking_auc(&[0.5], &[0.4, 0.5, 0.6]), Some(0.5));
/// assert_eq!(ranking_auc(&[], &[0.5]), None);
/// assert_eq!(ranking_auc(&[f64::NAN], &[0.5]), None);
/// ```
pub fn ranking_auc(positive: &[f64], negative: &[f64]) -> Option<f64> {
    if positive.is_empty()
        || negative.is_empty()
        || positive.iter().chain(negative).any(|x| x.is_nan())
    {
        return None;
    }
    let mut sorted = negative.to_vec();
    sorted.sort_by(f64::total_cmp);
    let wins: f64 = positive
        .iter()
        .map(|&p| {
            let below = sorted.partition_point(|&n| n < p);
            let equal = sorted[below..].partition_point(|&n| n == p);
            below as f64 + 0.5 * equal as f64
        })
        .sum();
    Some(wins / (positive.len() as f64 * negative.len() as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_counting_every_pair() {
        // Scores with ties, checked against the definition pair by pair.
        let pos: Vec<f64> = (0..37).map(|i| ((i * 7) % 11) as f64 / 10.0).collect();
        let neg: Vec<f64> = (0..29).map(|i| ((i * 5) % 9) as f64 / 8.0).collect();
        let pairs: f64 = pos
            .iter()
            .flat_map(|p| neg.iter().map(move |n| (p, n)))
            .map(|(p, n)| match p.total_cmp(n) {
                std::cmp::Ordering::Greater => 1.0,
                std::cmp::Ordering::Equal => 0.5,
                std::cmp::Ordering::Less => 0.0,
            })
            .sum();
        let expected = pairs / (pos.len() * neg.len()) as f64;
        let got = ranking_auc(&pos, &neg).unwrap();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        // Swapping the sets mirrors the area.
        let mirrored = ranking_auc(&neg, &pos).unwrap();
        assert!((got + mirrored - 1.0).abs() < 1e-12);
    }
}
