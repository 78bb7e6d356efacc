//! Half-precision inference: which float types a model may compute in, and the few places
//! where a half-precision model still computes in f32.
//!
//! A model loaded in f16 or bf16 keeps its weights and activations in that type. LayerNorm's
//! moments, softmax and loss reductions are computed in f32 and cast back: their sums over a
//! row lose digits in half precision that the next layer cannot recover (BERT's ε of 1e-12
//! alone is zero in f16).
//!
//! ```
//! use blip_core::precision::{check_dtype, float_dtype};
//! use burn::tensor::{Device, FloatDType};
//!
//! assert_eq!(float_dtype("bf16")?, FloatDType::BF16);
//! assert!(float_dtype("f8").is_err());
//! check_dtype(&Device::flex(), FloatDType::F16)?;
//! // f64 is no inference precision of this crate's models.
//! assert!(check_dtype(&Device::flex(), FloatDType::F64).is_err());
//! # Ok::<(), blip_core::Error>(())
//! ```

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Device, FloatDType, Tensor};

use crate::{Error, Result};

/// The precisions a model can be loaded in, by the names the command lines take.
pub const DTYPES: [(&str, FloatDType); 3] = [
    ("f32", FloatDType::F32),
    ("f16", FloatDType::F16),
    ("bf16", FloatDType::BF16),
];

/// The precision named `name` (`f32`, `f16`, `bf16`), or [`Error::UnknownDType`].
pub fn float_dtype(name: &str) -> Result<FloatDType> {
    DTYPES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|&(_, dtype)| dtype)
        .ok_or_else(|| Error::UnknownDType {
            name: name.to_string(),
        })
}

/// The name of one of [`DTYPES`], as the command lines take it.
///
/// ```
/// assert_eq!(blip_core::precision::dtype_name(burn::tensor::FloatDType::BF16), "bf16");
/// ```
pub fn dtype_name(dtype: FloatDType) -> String {
    DTYPES
        .iter()
        .find(|(_, d)| *d == dtype)
        .map_or_else(|| format!("{dtype:?}"), |(n, _)| n.to_string())
}

/// Checks that a model can run on `device` in `dtype`: one of [`DTYPES`], with arithmetic on
/// that device (a Vulkan device may store bf16 without computing in it), else
/// [`Error::UnsupportedDType`].
pub fn check_dtype(device: &Device, dtype: FloatDType) -> Result<()> {
    let unsupported = |reason| Error::UnsupportedDType {
        dtype: dtype_name(dtype),
        device: format!("{device:?}"),
        reason,
    };
    if !DTYPES.iter().any(|&(_, d)| d == dtype) {
        return Err(unsupported("the models compute in f32, f16 or bf16"));
    }
    if !device.supports_dtype(dtype) {
        return Err(unsupported(
            "the backend has no arithmetic in this type here; use f32 (or f16 for bf16)",
        ));
    }
    Ok(())
}

/// `module` with every float parameter cast to `dtype`: a model built or trained in f32, for
/// inference in half precision. (A checkpoint is better loaded in `dtype` directly, with
/// [`crate::checkpoint::load_safetensors_as`]: no f32 copy of the whole model.)
///
/// ```
/// use blip_core::precision::cast_module;
/// use burn::nn::LinearConfig;
/// use burn::tensor::{DType, Device, FloatDType};
///
/// let linear = cast_module(LinearConfig::new(3, 2).init(&Device::flex()), FloatDType::F16);
/// assert_eq!(linear.weight.val().dtype(), DType::F16);
/// ```
pub fn cast_module<M: Module>(module: M, dtype: FloatDType) -> M {
    struct Cast(FloatDType);
    impl ModuleMapper for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dtype = self.0;
            param.map(|t| t.cast(dtype))
        }
    }
    module.map(&mut Cast(dtype))
}

/// Whether `dtype` is a half-precision float type.
///
/// ```
/// use burn::tensor::DType;
/// assert!(blip_core::precision::is_half(DType::F16) && !blip_core::precision::is_half(DType::F32));
/// ```
pub fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
}

/// The additive attention bias of a masked key in `dtype`: its most negative finite value,
/// as transformers uses (`torch.finfo(dtype).min`). f32's would round to −∞ in f16.
///
/// ```
/// use burn::tensor::DType;
/// assert_eq!(blip_core::precision::masked_bias(DType::F16), -65504.0);
/// assert_eq!(blip_core::precision::masked_bias(DType::F32), f32::MIN as f64);
/// ```
pub fn masked_bias(dtype: DType) -> f64 {
    // Built in f32 and cast: never below f32's own minimum (f64's would be −∞ there).
    let f32_min = f32::MIN as f64;
    dtype.finfo().map_or(f32_min, |info| info.min.max(f32_min))
}

/// `f(x)` computed in f32 when `x` is half precision, cast back to `x`'s type; `f(x)` as is
/// otherwise.
///
/// ```
/// use blip_core::precision::in_f32;
/// use burn::tensor::{DType, Device, FloatDType, Tensor};
///
/// let x = Tensor::<1>::from_floats([1.0, 2.0], &Device::flex()).cast(FloatDType::F16);
/// let y = in_f32(x, |x| {
///     assert_eq!(x.dtype(), DType::F32); // computed in f32 ...
///     x * 2.0
/// });
/// assert_eq!(y.dtype(), DType::F16); // ... returned in f16
/// ```
pub fn in_f32<const D: usize>(x: Tensor<D>, f: impl FnOnce(Tensor<D>) -> Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    if is_half(dtype) {
        f(x.cast(FloatDType::F32)).cast(FloatDType::from(dtype))
    } else {
        f(x)
    }
}

/// `x` in f32, whatever its float type (a no-op for f32).
///
/// ```
/// use burn::tensor::{DType, Device, FloatDType, Tensor};
/// let x = Tensor::<1>::from_floats([1.0], &Device::flex()).cast(FloatDType::BF16);
/// assert_eq!(blip_core::precision::to_f32(x).dtype(), DType::F32);
/// ```
pub fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.cast(FloatDType::F32) // returned as it is when already f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn names_round_trip_and_unknown_ones_are_typed_errors() {
        for (name, dtype) in DTYPES {
            assert_eq!(float_dtype(name).unwrap(), dtype);
            assert_eq!(dtype_name(dtype), name);
        }
        assert_eq!(float_dtype("BF16").unwrap(), FloatDType::BF16);
        let err = float_dtype("fp8").unwrap_err();
        assert!(
            matches!(err, Error::UnknownDType { ref name } if name == "fp8"),
            "{err}"
        );
    }

    #[test]
    fn the_masked_bias_is_finite_in_every_type() {
        let device = Device::flex();
        for (_, dtype) in DTYPES {
            let bias = masked_bias(dtype.into());
            let t = Tensor::<1>::from_data(TensorData::from([bias as f32]), &device).cast(dtype);
            let back = t.into_data().try_into_vec_as::<f32>().unwrap()[0];
            assert!(back.is_finite() && back < -6e4, "{dtype:?}: {back}");
        }
    }

    #[test]
    fn in_f32_computes_in_f32_and_keeps_the_type() {
        let device = Device::flex();
        // 1 + 2^-10 is below bf16's resolution (8 bits of mantissa) but not f32's.
        let x =
            Tensor::<1>::from_data(TensorData::from([1.0f32, 1.0]), &device).cast(FloatDType::BF16);
        let y = in_f32(x.clone(), |x| {
            assert_eq!(x.dtype(), DType::F32);
            (x + 2f32.powi(-10)) * 1024.0 - 1024.0
        });
        assert_eq!(y.dtype(), DType::BF16);
        let v = y.into_data().try_into_vec_as::<f32>().unwrap();
        assert_eq!(v, [1.0, 1.0]);
        // Computed in bf16, the small term is lost.
        let lost = ((x + 2f32.powi(-10)) * 1024.0 - 1024.0)
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        assert_eq!(lost, [0.0, 0.0]);
    }
}
