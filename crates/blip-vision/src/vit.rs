//! [`VisionTransformer`]: BLIP's ViT image encoder (timm-style, pre-norm, fused qkv).
//!
//! Field names equal the keys of HF checkpoints under `vision_model.` (LayerNorm
//! `weight`/`bias` are burn's `gamma`/`beta`, renamed by burn's PyTorch adapter), so the
//! vision part of every checkpoint family loads without a remapping rule.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, FloatDType, Tensor, TensorData};

use crate::config::VisionConfig;
use blip_core::dropout::drop_path;
use blip_core::ops::dense;
use blip_core::{Error, Result, fused, precision};

/// Patch embedding, class token and learned absolute position embedding.
///
/// ```
/// use blip_vision::VisionConfig;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let vit = VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16).init(&device);
/// let embeddings = &vit.embeddings;
/// let tokens = embeddings.forward(Tensor::<4>::zeros([1, 3, 32, 32], &device))?;
/// assert_eq!(tokens.dims(), [1, 5, 32]); // class token + 2 × 2 patches, width 32
/// // For 48 px inputs the 2 × 2 position table is resized to the 3 × 3 grid.
/// assert_eq!(embeddings.position_embedding_for(3, 3).dims(), [1, 10, 32]);
/// // A side that is not a multiple of the patch is an error.
/// assert!(embeddings.forward(Tensor::<4>::zeros([1, 3, 30, 32], &device)).is_err());
/// # Ok::<(), blip_vision::Error>(())
/// ```
#[derive(Module, Debug)]
pub struct VisionEmbeddings {
    /// The class token, `[1, 1, D]`.
    pub class_embedding: Param<Tensor<3>>,
    /// Conv2d `3 → D`, kernel = stride = patch size, with bias.
    pub patch_embedding: Conv2d,
    /// Position table `[1, 1 + grid², D]` for the configured image size.
    pub position_embedding: Param<Tensor<3>>,
    /// Side of a patch in pixels.
    pub patch_size: usize,
}

/// Multi-head self-attention with one fused `qkv` projection (rows `[q; k; v]`).
///
/// ```
/// use blip_vision::VisionConfig;
/// use burn::tensor::{Device, Distribution, Tensor};
///
/// let device = Device::flex();
/// let vit = VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16).init(&device);
/// let attention = &vit.encoder.layers[0].self_attn;
/// assert_eq!(attention.num_heads, 2);
/// assert_eq!(attention.qkv.weight.val().dims(), [32, 96]); // burn's [in, out]: D → 3·D
/// let x = Tensor::<3>::random([2, 5, 32], Distribution::Normal(0.0, 1.0), &device);
/// assert_eq!(attention.forward(x).dims(), [2, 5, 32]);
/// ```
#[derive(Module, Debug)]
pub struct VisionAttention {
    /// `D → 3·D`, with bias.
    pub qkv: Linear,
    /// Output projection `D → D`.
    pub projection: Linear,
    /// Number of heads.
    pub num_heads: usize,
}

/// The feed-forward block: `fc2(gelu(fc1(x)))`.
///
/// ```
/// use blip_vision::VisionConfig;
/// use burn::tensor::activation::gelu;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let vit = VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16).init(&device);
/// let mlp = &vit.encoder.layers[0].mlp;
/// assert_eq!(mlp.fc1.weight.val().dims(), [32, 64]); // D → intermediate_size
/// let y = mlp.fc2.forward(gelu(mlp.fc1.forward(Tensor::<3>::ones([1, 5, 32], &device))));
/// assert_eq!(y.dims(), [1, 5, 32]);
/// ```
#[derive(Module, Debug)]
pub struct VisionMlp {
    /// `D → 4·D`.
    pub fc1: Linear,
    /// `4·D → D`.
    pub fc2: Linear,
}

/// One pre-norm transformer block.
///
/// ```
/// use blip_vision::VisionConfig;
/// use burn::tensor::{Device, Distribution, Tensor};
///
/// let device = Device::flex();
/// let vit = VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16).init(&device);
/// let layer = &vit.encoder.layers[0];
/// let x = Tensor::<3>::random([2, 5, 32], Distribution::Normal(0.0, 1.0), &device);
/// let y = layer.forward(x.clone());
/// assert_eq!(y.dims(), [2, 5, 32]);
/// // Outside a dropout scope the block's index changes nothing.
/// let diff: f32 = (y - layer.forward_at(x, 11, 12)).abs().max().into_scalar();
/// assert!(diff < 1e-5);
/// ```
#[derive(Module, Debug)]
pub struct VisionLayer {
    /// Norm before attention.
    pub layer_norm1: LayerNorm,
    /// Self-attention.
    pub self_attn: VisionAttention,
    /// Norm before the MLP.
    pub layer_norm2: LayerNorm,
    /// Feed-forward block.
    pub mlp: VisionMlp,
    /// The LayerNorms' epsilon (the config's `layer_norm_eps`; burn keeps `LayerNorm`'s own
    /// private, and the fused LayerNorm of training needs it).
    pub layer_norm_eps: f64,
}

/// The stack of blocks.
///
/// ```
/// use blip_vision::VisionConfig;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let vit = VisionConfig::new(32, 64, 2, 2, 32).with_patch_size(16).init(&device);
/// let depth = vit.encoder.layers.len();
/// assert_eq!(depth, 2);
/// let pixels = Tensor::<4>::zeros([1, 3, 32, 32], &device);
/// // The blocks run in order, each as block `i` of `depth`.
/// let mut x = vit.embeddings.forward(pixels.clone())?;
/// for (i, layer) in vit.encoder.layers.iter().enumerate() {
///     x = layer.forward_at(x, i, depth);
/// }
/// let hidden = vit.forward_with_hidden_states(pixels)?.hidden_states;
/// let diff: f32 = (x - hidden[depth].clone()).abs().max().into_scalar();
/// assert!(diff < 1e-5);
/// # Ok::<(), blip_vision::Error>(())
/// ```
#[derive(Module, Debug)]
pub struct VisionEncoder {
    /// Blocks, in order.
    pub layers: Vec<VisionLayer>,
}

/// BLIP's ViT: embeddings → pre-norm blocks → final LayerNorm on every token.
///
/// ```
/// use blip_vision::{Error, VisionConfig};
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let vit = VisionConfig::new(32, 64, 1, 2, 32).with_patch_size(16).init(&device);
/// assert_eq!(vit.hidden_size(), 32);
/// let tokens = vit.forward(Tensor::<4>::zeros([2, 3, 32, 32], &device))?;
/// assert_eq!(tokens.dims(), [2, 5, 32]); // class token + 2 × 2 patches per image
/// // Resized once for 48 px inputs: 3 × 3 patches.
/// let vit = vit.with_image_size(48);
/// assert_eq!(vit.forward(Tensor::<4>::zeros([1, 3, 48, 48], &device))?.dims(), [1, 10, 32]);
/// // A grey (1-channel) input is an error, not a panic.
/// let grey = Tensor::<4>::zeros([1, 1, 32, 32], &device);
/// assert!(matches!(vit.forward(grey), Err(Error::InputShape { .. })));
/// # Ok::<(), blip_vision::Error>(())
/// ```
#[derive(Module, Debug)]
pub struct VisionTransformer {
    /// Patch/class/position embeddings.
    pub embeddings: VisionEmbeddings,
    /// The blocks.
    pub encoder: VisionEncoder,
    /// Final LayerNorm, applied to all tokens.
    pub post_layernorm: LayerNorm,
    /// Its epsilon (the config's `layer_norm_eps`).
    pub layer_norm_eps: f64,
}

/// What [`VisionTransformer::forward_with_hidden_states`] returns.
///
/// ```
/// use blip_vision::VisionConfig;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let vit = VisionConfig::new(32, 64, 2, 2, 32).with_patch_size(16).init(&device);
/// let out = vit.forward_with_hidden_states(Tensor::<4>::zeros([1, 3, 32, 32], &device))?;
/// assert_eq!(out.last_hidden_state.dims(), [1, 5, 32]);
/// assert_eq!(out.hidden_states.len(), 3); // the embeddings, then each of the 2 blocks
/// assert!(out.hidden_states.iter().all(|h| h.dims() == [1, 5, 32]));
/// # Ok::<(), blip_vision::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// `[B, 1 + grid², D]` after the final LayerNorm: what the text model cross-attends to.
    pub last_hidden_state: Tensor<3>,
    /// The embeddings output followed by every block's output (before the final LayerNorm),
    /// `num_hidden_layers + 1` tensors, as transformers' `hidden_states`.
    pub hidden_states: Vec<Tensor<3>>,
}

impl VisionConfig {
    /// Builds a [`VisionTransformer`] with random (lazily initialised) weights.
    pub fn init(&self, device: &Device) -> VisionTransformer {
        let d = self.hidden_size;
        let eps = self.layer_norm_eps;
        let trunc = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        let linear = |i, o| {
            LinearConfig::new(i, o)
                .with_initializer(trunc.clone())
                .init(device)
        };
        let layers = (0..self.num_hidden_layers)
            .map(|_| VisionLayer {
                layer_norm1: LayerNormConfig::new(d).with_epsilon(eps).init(device),
                self_attn: VisionAttention {
                    qkv: linear(d, 3 * d),
                    projection: linear(d, d),
                    num_heads: self.num_attention_heads,
                },
                layer_norm2: LayerNormConfig::new(d).with_epsilon(eps).init(device),
                mlp: VisionMlp {
                    fc1: linear(d, self.intermediate_size),
                    fc2: linear(self.intermediate_size, d),
                },
                layer_norm_eps: eps,
            })
            .collect();
        VisionTransformer {
            embeddings: VisionEmbeddings {
                class_embedding: trunc.init([1, 1, d], device),
                patch_embedding: Conv2dConfig::new([3, d], [self.patch_size; 2])
                    .with_stride([self.patch_size; 2])
                    .init(device),
                position_embedding: trunc.init([1, self.num_positions(), d], device),
                patch_size: self.patch_size,
            },
            encoder: VisionEncoder { layers },
            post_layernorm: LayerNormConfig::new(d).with_epsilon(eps).init(device),
            layer_norm_eps: eps,
        }
    }
}

impl VisionEmbeddings {
    /// `[B, 3, H, W]` → `[B, 1 + (H/P)·(W/P), D]`; the position table is bicubically
    /// resized when the patch grid differs from the one it was trained for.
    pub fn forward(&self, pixel_values: Tensor<4>) -> Result<Tensor<3>> {
        let [b, c, h, w] = pixel_values.dims();
        let p = self.patch_size;
        if c != 3 || h == 0 || w == 0 || h % p != 0 || w % p != 0 {
            return Err(Error::InputShape {
                what: "pixel_values",
                expected: format!("[B, 3, H, W] with H and W positive multiples of {p}"),
                found: vec![b, c, h, w],
            });
        }
        let dtype = self.patch_embedding.weight.val().dtype();
        let patches = if precision::is_half(dtype) {
            // In f32, then the model's type: cubecl's f16 convolution keeps its sums in f16
            // (5 f16 steps off over a 16 × 16 × 3 patch, five times PyTorch's error at the
            // ViT's output on lavapipe), and this one small product is cheap in f32.
            precision::cast_module(self.patch_embedding.clone(), FloatDType::F32)
                .forward(precision::to_f32(pixel_values))
                .cast(FloatDType::from(dtype))
        } else {
            self.patch_embedding
                .forward(precision::to_f32(pixel_values))
        }; // [B, D, h, w]
        let [_, d, gh, gw] = patches.dims();
        let patches = patches.reshape([b, d, gh * gw]).swap_dims(1, 2);
        let class = self.class_embedding.val().expand([b, 1, d]);
        let tokens = Tensor::cat(vec![class, patches], 1);
        Ok(tokens + self.position_embedding_for(gh, gw))
    }

    /// The position table for a `grid_h × grid_w` patch grid: the stored one when it fits,
    /// else its patch part resized bicubically (PyTorch `interpolate(mode="bicubic",
    /// align_corners=False)`, as transformers' `interpolate_pos_encoding`), class row kept.
    pub fn position_embedding_for(&self, grid_h: usize, grid_w: usize) -> Tensor<3> {
        let table = self.position_embedding.val();
        let [_, n, d] = table.dims();
        if n == grid_h * grid_w + 1 {
            return table;
        }
        let side = ((n - 1) as f64).sqrt().round() as usize;
        let (device, dtype) = (table.device(), table.dtype());
        let values: Vec<f32> = table
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("a float table converts to f32");
        let out = crate::interpolate::resize_position_table(&values, d, side, grid_h, grid_w);
        let data = TensorData::new(out, [1, grid_h * grid_w + 1, d]);
        Tensor::from_data(data, (&device, dtype))
    }
}

impl VisionAttention {
    /// `[B, T, D]` → `[B, T, D]`; no mask (every image token sees every other).
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let qkv = dense(&self.qkv, x);
        #[cfg(feature = "flex")]
        let qkv = match blip_core::kernels::self_attention(qkv, self.num_heads) {
            Ok(context) => return dense(&self.projection, context),
            Err(qkv) => qkv,
        };
        // Training on flex reads the heads in place, with their own backward pass; other
        // backends take burn's attention.
        let context = fused::self_attention(qkv, self.num_heads)
            .expect("a validated config's width is a multiple of its heads");
        dense(&self.projection, context)
    }
}

impl VisionLayer {
    /// One pre-norm block.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_at(x, 0, 1)
    }

    /// One pre-norm block as block `index` of `depth`: its residual branches take that
    /// block's drop-path rate inside a [`blip_core::dropout::train`] scope.
    pub fn forward_at(&self, x: Tensor<3>, index: usize, depth: usize) -> Tensor<3> {
        let norm = |norm, x| {
            fused::layer_norm(norm, x, self.layer_norm_eps)
                .expect("x has the hidden size the norm was built for")
        };
        let attention = self.self_attn.forward(norm(&self.layer_norm1, x.clone()));
        let x = x + drop_path(attention, index, depth);
        let hidden = fused::gelu(dense(&self.mlp.fc1, norm(&self.layer_norm2, x.clone())));
        x + drop_path(dense(&self.mlp.fc2, hidden), index, depth)
    }
}

impl VisionTransformer {
    /// Encodes normalised pixels `[B, 3, H, W]` into `[B, 1 + (H/16)·(W/16), D]` tokens
    /// (class token first), after the final LayerNorm.
    pub fn forward(&self, pixel_values: Tensor<4>) -> Result<Tensor<3>> {
        // On flex, one image at a time: a batch's activations (57 MB per [8, 577, 3072]
        // buffer) outgrow what the allocator recycles, and fresh pages for every op made
        // batch 8 slower per image than batch 1. Batching gains flex nothing here (each
        // image's products already have 577 rows); the result is the same.
        let device = pixel_values.device();
        blip_core::ops::on_thread_pool(&device, || {
            #[cfg(feature = "flex")]
            if pixel_values.dims()[0] > 1 && blip_core::kernels::is_plain_flex(&device) {
                let images = pixel_values
                    .split(1, 0)
                    .into_iter()
                    .map(|image| self.forward_batch(image))
                    .collect::<Result<Vec<_>>>()?;
                return Ok(Tensor::cat(images, 0));
            }
            self.forward_batch(pixel_values)
        })
    }

    fn forward_batch(&self, pixel_values: Tensor<4>) -> Result<Tensor<3>> {
        let mut x = self.embeddings.forward(pixel_values)?;
        let depth = self.encoder.layers.len();
        for (i, layer) in self.encoder.layers.iter().enumerate() {
            x = layer.forward_at(x, i, depth);
        }
        Ok(self.final_norm(x))
    }

    /// As [`forward`](Self::forward), also returning every block's output.
    pub fn forward_with_hidden_states(&self, pixel_values: Tensor<4>) -> Result<VisionOutput> {
        let mut x = self.embeddings.forward(pixel_values)?;
        let mut hidden_states = vec![x.clone()];
        let depth = self.encoder.layers.len();
        for (i, layer) in self.encoder.layers.iter().enumerate() {
            x = layer.forward_at(x, i, depth);
            hidden_states.push(x.clone());
        }
        Ok(VisionOutput {
            last_hidden_state: self.final_norm(x),
            hidden_states,
        })
    }

    /// The final LayerNorm (in f32 for a half-precision model, fused in training on flex).
    fn final_norm(&self, x: Tensor<3>) -> Tensor<3> {
        fused::layer_norm(&self.post_layernorm, x, self.layer_norm_eps)
            .expect("the blocks keep the norm's width")
    }

    /// Token width `D`.
    pub fn hidden_size(&self) -> usize {
        self.post_layernorm.gamma.shape()[0]
    }

    /// Replaces the position table by one resized for `image_size × image_size` inputs, as
    /// the original code does once at load time; forward passes at that size then skip the
    /// per-call interpolation.
    pub fn with_image_size(mut self, image_size: usize) -> Self {
        let grid = image_size / self.embeddings.patch_size;
        let table = self.embeddings.position_embedding_for(grid, grid);
        self.embeddings.position_embedding = Param::from_tensor(table);
        self
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Device, Distribution, Tensor};

    #[test]
    fn flex_self_attention_equals_burns_attention() {
        let device = Device::flex();
        let (b, t, heads, hd) = (2, 37, 3, 8);
        let d = heads * hd;
        let qkv = Tensor::<3>::random([b, t, 3 * d], Distribution::Normal(0.0, 2.0), &device);
        // burn's attention on the heads split out of [B, T, 3, H, hd].
        let split = qkv
            .clone()
            .reshape([b, t, 3, heads, hd])
            .permute([2, 0, 3, 1, 4]);
        let part = |i: usize| split.clone().narrow(0, i, 1).reshape([b, heads, t, hd]);
        let options = AttentionModuleOptions::default();
        let want = attention(part(0), part(1), part(2), None, None, options)
            .swap_dims(1, 2)
            .reshape([b, t, d]);
        let got = blip_core::kernels::self_attention(qkv, heads).expect("applies on flex");
        let diff: f32 = (got - want).abs().max().into_scalar();
        assert!(diff < 1e-5, "max |Δ| {diff}");
    }
}
