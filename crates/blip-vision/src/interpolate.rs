//! Bicubic resizing of the position table, with PyTorch's `interpolate(mode="bicubic",
//! align_corners=False)` semantics: Keys cubic with `A = -0.75`, half-pixel centres, no
//! antialiasing, taps clamped at the border.

/// PyTorch's cubic convolution weights for fractional offset `t` (A = -0.75).
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// For each output index: the four clamped input indices and their weights.
fn taps(input: usize, output: usize) -> Vec<([usize; 4], [f64; 4])> {
    let scale = input as f64 / output as f64;
    (0..output)
        .map(|o| {
            let real = scale * (o as f64 + 0.5) - 0.5;
            let floor = real.floor();
            let weights = cubic_weights(real - floor);
            let at = |k: i64| (floor as i64 + k).clamp(0, input as i64 - 1) as usize;
            ([at(-1), at(0), at(1), at(2)], weights)
        })
        .collect()
}

/// Resizes a row-major `[in_h, in_w, channels]` grid to `[out_h, out_w, channels]`.
///
/// ```
/// use blip_vision::bicubic_resize;
///
/// // A constant 2 × 2 grid of 3 channels stays constant at 4 × 5.
/// let out = bicubic_resize(&[0.5; 2 * 2 * 3], 3, 2, 2, 4, 5);
/// assert_eq!(out.len(), 4 * 5 * 3);
/// assert!(out.iter().all(|v| (v - 0.5).abs() < 1e-6));
/// // At the same size it is the identity.
/// let ramp: Vec<f32> = (0..9).map(|i| i as f32).collect();
/// let same = bicubic_resize(&ramp, 1, 3, 3, 3, 3);
/// assert!(ramp.iter().zip(&same).all(|(a, b)| (a - b).abs() < 1e-5));
/// ```
pub fn bicubic_resize(
    grid: &[f32],
    channels: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
) -> Vec<f32> {
    debug_assert_eq!(grid.len(), in_h * in_w * channels);
    let rows = taps(in_h, out_h);
    let cols = taps(in_w, out_w);
    let mut out = vec![0f32; out_h * out_w * channels];
    let mut acc = vec![0f64; channels];
    for (oy, (ys, wy)) in rows.iter().enumerate() {
        for (ox, (xs, wx)) in cols.iter().enumerate() {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (y, wy) in ys.iter().zip(wy) {
                for (x, wx) in xs.iter().zip(wx) {
                    let w = wy * wx;
                    let src = &grid[(y * in_w + x) * channels..][..channels];
                    acc.iter_mut()
                        .zip(src)
                        .for_each(|(a, &v)| *a += w * v as f64);
                }
            }
            let dst = &mut out[(oy * out_w + ox) * channels..][..channels];
            dst.iter_mut().zip(&acc).for_each(|(d, &a)| *d = a as f32);
        }
    }
    out
}

/// A position table (`1 + side²` rows of width `d`, class row first, flattened) for a
/// `grid_h × grid_w` patch grid: the class row kept, the patch rows resized by
/// [`bicubic_resize`] (transformers' `interpolate_pos_encoding`, the original's
/// `interpolate_pos_embed`).
///
/// ```
/// use blip_vision::resize_position_table;
///
/// // Width 2: a class row of 9s, then a 2 × 2 grid of 1s.
/// let mut table = vec![9.0, 9.0];
/// table.extend([1.0; 2 * 2 * 2]);
/// let out = resize_position_table(&table, 2, 2, 3, 3);
/// assert_eq!(out.len(), (1 + 3 * 3) * 2);
/// assert_eq!(out[..2], [9.0, 9.0]); // the class row is kept
/// assert!(out[2..].iter().all(|v| (v - 1.0).abs() < 1e-6));
/// ```
pub fn resize_position_table(
    table: &[f32],
    d: usize,
    side: usize,
    grid_h: usize,
    grid_w: usize,
) -> Vec<f32> {
    let (class_row, grid) = table.split_at(d);
    let mut out = class_row.to_vec();
    out.extend(bicubic_resize(grid, d, side, side, grid_h, grid_w));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_identity() {
        let grid: Vec<f32> = (0..2 * 3 * 3).map(|i| (i as f32).sin()).collect();
        let out = bicubic_resize(&grid, 2, 3, 3, 3, 3);
        for (a, b) in grid.iter().zip(&out) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn weights_sum_to_one() {
        for t in [0.0, 0.25, 0.5, 0.9] {
            let s: f64 = cubic_weights(t).iter().sum();
            assert!((s - 1.0).abs() < 1e-12, "t={t} sum={s}");
        }
    }

    #[test]
    fn constant_grid_stays_constant_when_upsampled() {
        let grid = vec![0.7f32; 4 * 4];
        let out = bicubic_resize(&grid, 1, 4, 4, 7, 5);
        assert_eq!(out.len(), 35);
        assert!(out.iter().all(|v| (v - 0.7).abs() < 1e-6));
    }
}
