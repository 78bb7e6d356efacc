//! The optimiser settings of the original training scripts.

use burn::optim::AdamWConfig;

/// AdamW as BLIP trains: betas (0.9, 0.999), eps 1e-8, weight decay 0.05 applied to every
/// parameter (the original builds no parameter groups). burn's own defaults differ
/// (eps 1e-5, decay 1e-4), hence this constructor.
pub fn blip_adamw() -> AdamWConfig {
    AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(0.05)
}
