//! The learning-rate schedules of the original training scripts, as plain functions of the
//! step or epoch (pass the result to the optimiser's `step`).

/// Pre-training warm-up (epoch 0 only): linear from `warmup_lr` to `max_lr` over
/// `warmup_steps`, then flat: `min(max_lr, warmup_lr + (max_lr − warmup_lr)·step / warmup_steps)`.
///
/// ```
/// use blip_train::warmup_lr;
///
/// // BLIP's pre-training warm-up: 1e-6 to 3e-4 over 3000 steps.
/// assert_eq!(warmup_lr(0, 3000, 1e-6, 3e-4), 1e-6);
/// assert!((warmup_lr(1500, 3000, 1e-6, 3e-4) - 1.505e-4).abs() < 1e-12);
/// assert_eq!(warmup_lr(3000, 3000, 1e-6, 3e-4), 3e-4);
/// assert_eq!(warmup_lr(9000, 3000, 1e-6, 3e-4), 3e-4); // flat afterwards
/// ```
pub fn warmup_lr(step: usize, warmup_steps: usize, warmup_lr: f64, max_lr: f64) -> f64 {
    let progress = step as f64 / warmup_steps.max(1) as f64;
    max_lr.min(warmup_lr + (max_lr - warmup_lr) * progress)
}

/// Pre-training per-epoch step decay: `max(min_lr, init_lr · decay_rate^epoch)` (the code's
/// rate is 0.9; the paper says 0.85).
///
/// ```
/// use blip_train::step_decay_lr;
///
/// assert_eq!(step_decay_lr(0, 3e-4, 1e-6, 0.9), 3e-4);
/// assert!((step_decay_lr(2, 3e-4, 1e-6, 0.9) - 2.43e-4).abs() < 1e-12); // 3e-4 · 0.9²
/// assert_eq!(step_decay_lr(200, 3e-4, 1e-6, 0.9), 1e-6); // down to the floor
/// ```
pub fn step_decay_lr(epoch: usize, init_lr: f64, min_lr: f64, decay_rate: f64) -> f64 {
    min_lr.max(init_lr * decay_rate.powi(epoch as i32))
}

/// Fine-tuning cosine decay per epoch, no warm-up:
/// `(init_lr − min_lr)·½·(1 + cos(π·epoch / max_epoch)) + min_lr`.
///
/// ```
/// use blip_train::cosine_lr;
///
/// // Captioning fine-tuning: from 1e-5 to 0 over 5 epochs.
/// assert_eq!(cosine_lr(0, 5, 1e-5, 0.0), 1e-5);
/// assert!((cosine_lr(5, 10, 1e-5, 0.0) - 5e-6).abs() < 1e-15); // half-way
/// assert!(cosine_lr(5, 5, 1e-5, 0.0).abs() < 1e-18);
/// ```
pub fn cosine_lr(epoch: usize, max_epoch: usize, init_lr: f64, min_lr: f64) -> f64 {
    let phase = std::f64::consts::PI * epoch as f64 / max_epoch.max(1) as f64;
    (init_lr - min_lr) * 0.5 * (1.0 + phase.cos()) + min_lr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_linear_then_flat() {
        assert_eq!(warmup_lr(0, 3000, 1e-6, 3e-4), 1e-6);
        assert!((warmup_lr(1500, 3000, 1e-6, 3e-4) - 1.505e-4).abs() < 1e-12);
        assert_eq!(warmup_lr(3000, 3000, 1e-6, 3e-4), 3e-4);
        assert_eq!(warmup_lr(9000, 3000, 1e-6, 3e-4), 3e-4);
    }

    #[test]
    fn step_decay_multiplies_per_epoch_down_to_the_floor() {
        assert_eq!(step_decay_lr(0, 3e-4, 1e-6, 0.9), 3e-4);
        assert!((step_decay_lr(2, 3e-4, 1e-6, 0.9) - 2.43e-4).abs() < 1e-12);
        assert_eq!(step_decay_lr(200, 3e-4, 1e-6, 0.9), 1e-6);
    }

    #[test]
    fn cosine_goes_from_init_to_min() {
        assert!((cosine_lr(0, 5, 1e-5, 0.0) - 1e-5).abs() < 1e-18);
        assert!((cosine_lr(5, 10, 1e-5, 0.0) - 5e-6).abs() < 1e-15);
        assert!(cosine_lr(10, 10, 1e-5, 0.0).abs() < 1e-18);
    }
}
