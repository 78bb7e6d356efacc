#!/usr/bin/env python3
"""Writes the whole-step reference of blip-train under tests/fixtures/step/.

Run from the repository root with the pinned environment of scripts/requirements.txt:

    .venv/bin/python scripts/step_reference.py

One training step of the original salesforce/BLIP code, transcribed here in plain torch (no
import of the original repository): `BLIP_Pretrain.forward` (models/blip_pretrain.py) and
`BLIP_Retrieval.forward` (models/blip_retrieval.py, the version after its 2022-03-26 fix
where the ITC targets come from image-id equality), with the ViT of models/vit.py and the
MED BERT of models/med.py, dropout off; then `loss.backward()` and one step of
`torch.optim.AdamW` (betas 0.9/0.999, eps 1e-8, weight decay 0.05 on every parameter, as
pretrain.py / train_retrieval.py build it). Everything runs in float64 from the stored f32
weights, and the results are stored as f32.

The step, in the original's order: clamp `temp` to [0.001, 0.5]; ViT, unimodal text
encoder, ITC features; momentum update `θ_m ← 0.995·θ_m + 0.005·θ` of (ViT, vision_proj,
text encoder, text_proj), then momentum features; ITC against momentum features + queues
with distillation weight `alpha` (pre-training: identity targets; retrieval: targets
spread over every column of the same image id, batch and `idx_queue`); dequeue/enqueue;
ITM with one hard negative image per text, then one hard negative text per image, on
`[ENC]`-first ids; LM (pre-training only) on `[DEC]`-first ids with pads ignored and label
smoothing 0.1; `L = itc + itm (+ lm)`, backward, AdamW.

Hard negatives are drawn the way blip-train draws them (`blip_train::losses::
sample_negatives` → `blip_text::Rng::weighted_index`, SplitMix64 seeded with the
TrainConfig seed; all text→image draws, one per text, then all image→text draws), so both
sides pick the same indices from the same weights; the script checks that no draw lies
within 1e-4 of a decision boundary.

Files (sizes of scripts/make_pth_fixtures.py, whose key layout and initialisation this
reuses: vision width 16, text width 8, 2 layers, 16 px images in 4 px patches, vocab 40,
ITC width 8, queues of 16; batch of 4 captions of 8 tokens):

* `pretrain.pth`: the initial state in the `model_base.pth` layout (encoder, decoder whose
  tensors outside `/attention` are the encoder's, LM head, heads, `temp`, momentum copies,
  `image_queue`, `text_queue`, `queue_ptr` 12 so that the enqueue wraps).
* `retrieval.pth`: the same weights with the retrieval distillation state (`idx_queue`
  holding some of the batch's image ids, `ptr_queue` 8, its own queues, `temp` 0.6, which
  the step clamps to 0.5). Written in the pre-training layout, which is what
  `OriginalCheckpoint::pretrain` loads into a `BlipPretrain`; the decoder's own tensors
  take no part in retrieval fine-tuning (no LM loss, so no gradient, so AdamW leaves them).
* `batch.safetensors`: `pixel_values` [4,3,16,16], `input_ids` and `attention_mask` [4,8]
  (`[CLS]` first, padded), `image_ids` [4] (two captions of image 7).
* `expected.safetensors`, per task (`pretrain.` / `retrieval.` prefixes): the losses
  (`loss_itc`, `loss_itm`, `loss_lm`), the `alpha` and `lr` used, the drawn negatives
  (`negative_images`, `negative_texts`), and under `state.<original key>` every tensor the
  step changes or keeps, after the step: parameters (each shared tensor once, under its
  `text_encoder.*` name; the decoder's own self-attention and LM head under
  `text_decoder.*`; `temp` as [1]), momentum parameters (`*_m.*`), `image_queue`,
  `text_queue`, the queue pointer (`queue_ptr` / `ptr_queue`) and `idx_queue` (retrieval).

The Rust side is crates/blip-train/tests/step_reference.rs, whose configs match the
constants below (TrainConfig seed, lr schedule position, alpha ramp position). Attention key
biases have an exactly zero gradient (softmax ignores a shift shared by all keys): here they
move by weight decay alone, while an f32 trainer's first AdamW step `g/(|g| + 1e-8)·lr` turns
its rounding noise into a move of up to `lr`; the test holds those elements to that bound.
"""

import math
import pathlib
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import make_pth_fixtures as mpf  # noqa: E402  (key layout and tiny random initialisation)

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "step"

PAD, CLS, SEP, DEC, ENC = mpf.PAD, mpf.CLS, mpf.SEP, mpf.DEC, mpf.ENC
IMAGE = 16
VISION, TEXT = mpf.VISION, mpf.TEXT
VIT_EPS, TEXT_EPS = VISION["layer_norm_eps"], 1e-12
MOMENTUM = 0.995
ALPHA = 0.4
LABEL_SMOOTHING = 0.1
ADAMW = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)

# The step's position in training, and what the schedules give there (both sides compute
# them the same way; the Rust test sets the same TrainConfig and Progress).
SEED = 7  # TrainConfig::seed: the negative-sampling generator
PRETRAIN = dict(
    init_lr=2e-4, decay=0.9, epoch=1, batch=1, batches_per_epoch=2, ramp_epochs=2)
RETRIEVAL = dict(init_lr=1e-4, epoch=0, batch=1, batches_per_epoch=4)


def pretrain_alpha(c):
    # pretrain.py: alpha·min(1, (epoch·S + i) / (2·S))
    s = c["batches_per_epoch"]
    return ALPHA * min(1, (c["epoch"] * s + c["batch"]) / (c["ramp_epochs"] * s))


def pretrain_lr(c):
    # pretrain.py: epoch 0 warms up per step; later epochs step_lr_schedule:
    # max(min_lr, init_lr · decay^epoch)
    assert c["epoch"] > 0
    return max(1e-6, c["init_lr"] * c["decay"] ** c["epoch"])


def retrieval_alpha(c):
    # train_retrieval.py: alpha·min(1, i / len(loader)) in epoch 0, then alpha
    return ALPHA * min(1, c["batch"] / c["batches_per_epoch"]) if c["epoch"] == 0 else ALPHA


def retrieval_lr(c):
    # train_retrieval.py: cosine_lr_schedule(epoch, max_epoch 6, init_lr, min_lr 0) per epoch
    return 0.5 * c["init_lr"] * (1 + math.cos(math.pi * c["epoch"] / 6))


# ---------------------------------------------------------------------------------------
# blip-train's negative sampler (blip_text::Rng, SplitMix64), draw for draw.

MASK64 = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed):
        self.state = seed & MASK64

    def next_f64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
        return (z >> 11) / float(1 << 53)

    def weighted_index(self, weights, margins):
        """Index drawn in proportion to `weights` (a list of floats), as Rng::weighted_index;
        records how far the draw lay from the nearest boundary, relative to the total."""
        total = sum(weights)
        u = self.next_f64() * total
        cumulative = 0.0
        for i, w in enumerate(weights):
            low = cumulative
            cumulative += w
            if u < cumulative:
                margins.append(min(u - low if i > 0 else math.inf, cumulative - u) / total)
                return i
        raise AssertionError("draw beyond the total")


def sample_rows(weights, rng, margins):
    """One index per row of `weights` ([B, B], float64, no gradient)."""
    return [rng.weighted_index(row.tolist(), margins) for row in weights]


# ---------------------------------------------------------------------------------------
# The networks, as functions of a parameter dict in the original key layout.

def linear(p, prefix, x):
    return F.linear(x, p[f"{prefix}.weight"], p[f"{prefix}.bias"])


def layer_norm(p, prefix, x, eps):
    return F.layer_norm(x, x.shape[-1:], p[f"{prefix}.weight"], p[f"{prefix}.bias"], eps)


def vit(p, prefix, image):
    """models/vit.py VisionTransformer.forward: patch conv, [CLS], positions, pre-norm blocks
    with a fused qkv (split outer 3, then heads), exact GELU MLP, final norm on all tokens."""
    d, heads, patch = VISION["hidden_size"], VISION["num_attention_heads"], VISION["patch_size"]
    x = F.conv2d(image, p[f"{prefix}.patch_embed.proj.weight"],
                 p[f"{prefix}.patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    b = x.shape[0]
    x = torch.cat([p[f"{prefix}.cls_token"].expand(b, -1, -1), x], dim=1)
    x = x + p[f"{prefix}.pos_embed"][:, : x.shape[1]]
    n, hd = x.shape[1], d // heads
    for i in range(VISION["num_hidden_layers"]):
        blk = f"{prefix}.blocks.{i}"
        h = layer_norm(p, f"{blk}.norm1", x, VIT_EPS)
        qkv = linear(p, f"{blk}.attn.qkv", h).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax((q @ k.transpose(-2, -1)) * hd ** -0.5, dim=-1)
        h = (att @ v).transpose(1, 2).reshape(b, n, d)
        x = x + linear(p, f"{blk}.attn.proj", h)
        h = layer_norm(p, f"{blk}.norm2", x, VIT_EPS)
        x = x + linear(p, f"{blk}.mlp.fc2", F.gelu(linear(p, f"{blk}.mlp.fc1", h)))
    return layer_norm(p, f"{prefix}.norm", x, VIT_EPS)


def attention(p, prefix, x, additive_mask, source=None):
    """med.py BertAttention: q from `x`, k/v from `x` (self) or `source` (cross); scores over
    sqrt(head_dim) plus the additive mask; softmax; dense, residual, post-LayerNorm."""
    heads = TEXT["num_attention_heads"]
    kv = x if source is None else source
    b, l, h = x.shape
    hd = h // heads

    def split(t):
        return t.reshape(b, t.shape[1], heads, hd).permute(0, 2, 1, 3)

    q = split(linear(p, f"{prefix}.self.query", x))
    k = split(linear(p, f"{prefix}.self.key", kv))
    v = split(linear(p, f"{prefix}.self.value", kv))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if additive_mask is not None:
        scores = scores + additive_mask
    ctx = (torch.softmax(scores, dim=-1) @ v).permute(0, 2, 1, 3).reshape(b, l, h)
    return layer_norm(p, f"{prefix}.output.LayerNorm",
                      linear(p, f"{prefix}.output.dense", ctx) + x, TEXT_EPS)


def bert(p, prefix, ids, mask, image=None, decoder=False):
    """med.py BertModel.forward (word embeddings with `padding_idx` [PAD], as BertEmbeddings
    builds them): `mode='text'` when `image` is None (no cross-attention),
    else multimodal with an all-ones image mask (its inverted mask is 0, left out).
    `decoder`: the causal mask of `get_extended_attention_mask(is_decoder=True)`.
    Masked positions get −10000."""
    l = ids.shape[1]
    x = F.embedding(ids, p[f"{prefix}.embeddings.word_embeddings.weight"], padding_idx=PAD)
    x = x + p[f"{prefix}.embeddings.position_embeddings.weight"][:l]
    x = layer_norm(p, f"{prefix}.embeddings.LayerNorm", x, TEXT_EPS)
    m = mask.to(x.dtype)[:, None, None, :]
    if decoder:
        causal = torch.tril(torch.ones(l, l, dtype=x.dtype))
        m = causal[None, None] * m
    additive = (1.0 - m) * -10000.0
    for i in range(TEXT["num_hidden_layers"]):
        layer = f"{prefix}.encoder.layer.{i}"
        x = attention(p, f"{layer}.attention", x, additive)
        if image is not None:
            x = attention(p, f"{layer}.crossattention", x, None, source=image)
        h = F.gelu(linear(p, f"{layer}.intermediate.dense", x))
        x = layer_norm(p, f"{layer}.output.LayerNorm", linear(p, f"{layer}.output.dense", h) + x,
                       TEXT_EPS)
    return x


def lm_logits(p, hidden):
    """BertOnlyMLMHead: transform (dense, GELU, LayerNorm), then the decoder matrix tied to the
    word embeddings plus the head's own bias."""
    t = "text_decoder.cls.predictions"
    h = F.gelu(linear(p, f"{t}.transform.dense", hidden))
    h = layer_norm(p, f"{t}.transform.LayerNorm", h, TEXT_EPS)
    return F.linear(h, p[f"{t}.decoder.weight"], p[f"{t}.bias"])


def features(p, suffix, image, ids, mask):
    """L2-normalised ITC features of the online (`suffix=''`) or momentum (`'_m'`) encoders."""
    image_embeds = vit(p, f"visual_encoder{suffix}", image)
    image_feat = F.normalize(linear(p, f"vision_proj{suffix}", image_embeds[:, 0]), dim=-1)
    text = bert(p, f"text_encoder{suffix}", ids, mask)
    text_feat = F.normalize(linear(p, f"text_proj{suffix}", text[:, 0]), dim=-1)
    return image_embeds, image_feat, text_feat


# ---------------------------------------------------------------------------------------
# The state: leaves for what the optimiser sees, aliases for what the original ties.

MOMENTUM_PAIRS = ["visual_encoder", "vision_proj", "text_encoder", "text_proj"]


def alias_of(key):
    """The key whose tensor `key` is in BLIP_Pretrain (tie_encoder_decoder_weights shares every
    decoder BERT tensor outside `/attention` with the encoder; the LM head's decoder matrix is
    the word embedding and its `decoder.bias` the head's `bias`), or `key` itself."""
    if key == "text_decoder.cls.predictions.decoder.weight":
        key = "text_decoder.bert.embeddings.word_embeddings.weight"
    if key == "text_decoder.cls.predictions.decoder.bias":
        return "text_decoder.cls.predictions.bias"
    if key.startswith("text_decoder.bert.") and ".attention." not in key:
        return key.replace("text_decoder.bert.", "text_encoder.", 1)
    return key


def is_buffer(key, value):
    return not value.is_floating_point() or "queue" in key or key.endswith("position_ids")


def build(sd, with_decoder):
    """(leaves, momentum, view): trainable f64 leaves (one per distinct tensor), momentum
    tensors (no gradient), and a dict resolving every original key to its tensor."""
    leaves, momentum = {}, {}
    for key, value in sd.items():
        if is_buffer(key, value) or alias_of(key) != key:
            continue
        if not with_decoder and key.startswith("text_decoder."):
            continue  # BLIP_Retrieval has no decoder
        top = key.split(".", 1)[0]
        t = value.detach().double().clone()
        if top.endswith("_m"):
            momentum[key] = t
        else:
            leaves[key] = t.requires_grad_()

    class View(dict):
        def __missing__(self, key):
            target = alias_of(key)
            if target == key:
                raise KeyError(key)
            return self[target]

    def view():
        v = View(leaves)
        v.update(momentum)
        return v

    return leaves, momentum, view


def momentum_update(leaves, momentum):
    """`_momentum_update`: every momentum parameter of the four pairs, from its online twin."""
    for key in momentum:
        top, rest = key.split(".", 1)
        assert top[:-2] in MOMENTUM_PAIRS, key
        momentum[key] = momentum[key] * MOMENTUM + leaves[f"{top[:-2]}.{rest}"].detach() * (
            1.0 - MOMENTUM)


def itc(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp,
        alpha, sim_targets):
    image_all = torch.cat([image_feat_m.t(), image_queue], dim=1)
    text_all = torch.cat([text_feat_m.t(), text_queue], dim=1)
    with torch.no_grad():
        sim_i2t_m = image_feat_m @ text_all / temp
        sim_t2i_m = text_feat_m @ image_all / temp
        i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_all / temp
    sim_t2i = text_feat @ image_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i


def itm(p, image_embeds, ids, mask, w_t2i, w_i2t, rng, margins):
    """Hard negatives (an image per text, then a text per image, from the seeded sampler),
    the positive and negative passes of the image-grounded encoder on `[ENC]` ids, itm_head,
    cross-entropy against B ones then 2B zeros."""
    b = ids.shape[0]
    enc_ids = ids.clone()
    enc_ids[:, 0] = ENC
    neg_images = sample_rows(w_t2i, rng, margins)
    neg_texts = sample_rows(w_i2t, rng, margins)
    pos = bert(p, "text_encoder", enc_ids, mask, image=image_embeds)
    text_ids_all = torch.cat([enc_ids, enc_ids[neg_texts]], dim=0)
    text_atts_all = torch.cat([mask, mask[neg_texts]], dim=0)
    images_all = torch.cat([image_embeds[neg_images], image_embeds], dim=0)
    neg = bert(p, "text_encoder", text_ids_all, text_atts_all, image=images_all)
    logits = linear(p, "itm_head", torch.cat([pos[:, 0], neg[:, 0]], dim=0))
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)])
    return F.cross_entropy(logits, labels), neg_images, neg_texts


def lm(p, image_embeds, ids, mask):
    """BertLMHeadModel with labels: `[DEC]` first, pads → −100, causal, cross-attending to the
    image; shifted logits vs labels, mean label-smoothed (0.1) cross-entropy."""
    dec_ids = ids.clone()
    dec_ids[:, 0] = DEC
    targets = dec_ids.masked_fill(dec_ids == PAD, -100)
    hidden = bert(p, "text_decoder.bert", dec_ids, mask, image=image_embeds, decoder=True)
    logits = lm_logits(p, hidden)
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), targets[:, 1:].reshape(-1),
                           ignore_index=-100, label_smoothing=LABEL_SMOOTHING)


def enqueue(queue, feats, ptr):
    b = feats.shape[0]
    assert queue.shape[1] % b == 0
    queue = queue.clone()
    queue[:, ptr:ptr + b] = feats.t()
    return queue


def step(sd, batch, task, alpha, lr, seed):
    """One training step of the original on state dict `sd`; returns (losses, negatives,
    the state after the step as an original-layout dict of f64/int tensors)."""
    retrieval = task == "retrieval"
    leaves, momentum, view = build(sd, with_decoder=not retrieval)
    image, ids, mask = batch["pixel_values"].double(), batch["input_ids"], batch["attention_mask"]
    image_queue, text_queue = sd["image_queue"].double(), sd["text_queue"].double()
    ptr_key = "ptr_queue" if retrieval else "queue_ptr"
    ptr = int(sd[ptr_key])
    b = ids.shape[0]
    rng, margins = SplitMix64(seed), []

    with torch.no_grad():
        leaves["temp"].clamp_(0.001, 0.5)
    p = view()
    temp = p["temp"]
    image_embeds, image_feat, text_feat = features(p, "", image, ids, mask)

    if retrieval:
        idx = batch["image_ids"].view(-1, 1)
        idx_all = torch.cat([idx.t(), sd["idx_queue"].clone()], dim=1)
        pos_idx = torch.eq(idx, idx_all).double()
        sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
    else:
        sim_targets = torch.zeros(b, b + image_queue.shape[1], dtype=torch.float64)
        sim_targets.fill_diagonal_(1)

    with torch.no_grad():
        momentum_update(leaves, momentum)
        _, image_feat_m, text_feat_m = features(view(), "_m", image, ids, mask)
    loss_itc, sim_i2t, sim_t2i = itc(image_feat, text_feat, image_feat_m, text_feat_m,
                                     image_queue, text_queue, temp, alpha, sim_targets)

    after = {"image_queue": enqueue(image_queue, image_feat_m, ptr),
             "text_queue": enqueue(text_queue, text_feat_m, ptr),
             ptr_key: torch.tensor([(ptr + b) % image_queue.shape[1]])}
    if retrieval:
        after["idx_queue"] = sd["idx_queue"].clone()
        after["idx_queue"][:, ptr:ptr + b] = batch["image_ids"].view(1, -1)

    with torch.no_grad():
        if retrieval:  # online × online, plain softmax, same-image pairs zeroed
            same = torch.eq(idx, idx.t())
            w_i2t = F.softmax(image_feat @ text_feat.t() / temp, dim=1).masked_fill(same, 0)
            w_t2i = F.softmax(text_feat @ image_feat.t() / temp, dim=1).masked_fill(same, 0)
        else:  # online × momentum block of the ITC logits, +1e-4, diagonal zeroed
            w_t2i = F.softmax(sim_t2i[:, :b], dim=1) + 1e-4
            w_t2i.fill_diagonal_(0)
            w_i2t = F.softmax(sim_i2t[:, :b], dim=1) + 1e-4
            w_i2t.fill_diagonal_(0)
    loss_itm, neg_images, neg_texts = itm(p, image_embeds, ids, mask, w_t2i, w_i2t, rng, margins)
    assert min(margins) > 1e-4, f"{task}: a negative draw lies {min(margins):.2e} from a boundary"

    losses = {"itc": loss_itc, "itm": loss_itm}
    if not retrieval:
        losses["lm"] = lm(p, image_embeds, ids, mask)
    total = sum(losses.values())

    params = list(leaves.values())
    optimizer = torch.optim.AdamW(params, lr=lr, **ADAMW)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()

    for key, value in leaves.items():
        after[key] = value.detach().reshape(1) if key == "temp" else value.detach()
    after.update(momentum)
    if retrieval:  # the decoder-only tensors of the file: untouched
        for key, value in sd.items():
            if key.startswith("text_decoder.") and alias_of(key) == key and not is_buffer(
                    key, value):
                after[key] = value.double()
    negatives = {"negative_images": torch.tensor(neg_images),
                 "negative_texts": torch.tensor(neg_texts)}
    print(f"{task}: " + ", ".join(f"{k} {v.item():.6f}" for k, v in losses.items())
          + f"; negatives {neg_images} {neg_texts}; min draw margin {min(margins):.2e}")
    return {k: v.detach() for k, v in losses.items()}, negatives, after


# ---------------------------------------------------------------------------------------
# Fixtures.

def initial_state():
    """The tiny random pre-training state of make_pth_fixtures.py (its layout and scales)."""
    keys = (mpf.vit_keys("visual_encoder", VISION, IMAGE)
            + mpf.bert_keys("text_encoder", TEXT, VISION["hidden_size"])
            + mpf.linear_keys("vision_proj", mpf.PROJ, VISION["hidden_size"])
            + mpf.linear_keys("text_proj", mpf.PROJ, TEXT["hidden_size"])
            + mpf.linear_keys("itm_head", 2, TEXT["hidden_size"]))
    decoder_own = [(k, s) for k, s in mpf.bert_keys("text_decoder.bert", TEXT,
                                                    VISION["hidden_size"])
                   if ".attention." in k] + mpf.lm_head_keys("text_decoder", TEXT)
    sd = mpf.perturb(keys + decoder_own, seed=21)
    for key, _ in mpf.bert_keys("text_decoder.bert", TEXT, VISION["hidden_size"]):
        if ".attention." not in key:
            sd[key] = sd[alias_of(key)]
    mpf.add_buffers_and_ties(sd, ["text_encoder", "text_decoder.bert"], "text_decoder")
    g = torch.Generator().manual_seed(22)
    sd.update(mpf.momentum_of(sd, set(MOMENTUM_PAIRS), g))
    return sd, g


def make_batch():
    g = torch.Generator().manual_seed(23)
    ids = torch.tensor([[CLS, 5, 17, 22, 9, SEP, PAD, PAD],
                        [CLS, 33, 7, 38, 12, 26, 21, SEP],
                        [CLS, 11, 29, SEP, PAD, PAD, PAD, PAD],
                        [CLS, 8, 15, 36, 24, 19, SEP, PAD]])
    return {"pixel_values": torch.randn((4, 3, IMAGE, IMAGE), generator=g),
            "input_ids": ids,
            "attention_mask": (ids != PAD).long(),
            "image_ids": torch.tensor([7, 3, 7, 5])}


def save_initial(sd, name):
    torch.save({"model": sd}, OUT / name)


def main():
    print(f"torch {torch.__version__}")
    OUT.mkdir(parents=True, exist_ok=True)
    batch = make_batch()
    save_file({k: v.contiguous() for k, v in batch.items()}, OUT / "batch.safetensors")
    expected = {}

    sd, g = initial_state()
    pretrain_sd = dict(sd)
    pretrain_sd["image_queue"] = mpf.unit_queue(g)
    pretrain_sd["text_queue"] = mpf.unit_queue(g)
    pretrain_sd["queue_ptr"] = torch.tensor([12])  # 12 + 4 wraps to 0
    pretrain_sd["temp"] = torch.tensor(0.0634)
    save_initial(pretrain_sd, "pretrain.pth")

    retrieval_sd = dict(sd)
    retrieval_sd["image_queue"] = mpf.unit_queue(g)
    retrieval_sd["text_queue"] = mpf.unit_queue(g)
    idx_queue = torch.full((1, mpf.QUEUE), -100)
    idx_queue[0, [1, 5, 13]] = torch.tensor([3, 7, 3])  # positives in the queue
    idx_queue[0, [2, 9]] = torch.tensor([11, 12])  # ids of other images
    retrieval_sd["idx_queue"] = idx_queue
    retrieval_sd["ptr_queue"] = torch.tensor([8])
    retrieval_sd["temp"] = torch.tensor(0.6)  # above the clamp
    save_initial(retrieval_sd, "retrieval.pth")

    runs = [("pretrain", pretrain_alpha(PRETRAIN), pretrain_lr(PRETRAIN)),
            ("retrieval", retrieval_alpha(RETRIEVAL), retrieval_lr(RETRIEVAL))]
    for task, alpha, lr in runs:
        # Reloaded from the file, as the Rust side reads it.
        loaded = torch.load(OUT / f"{task}.pth", weights_only=True)["model"]
        losses, negatives, after = step(loaded, batch, task, alpha, lr, SEED)
        for name, value in losses.items():
            expected[f"{task}.loss_{name}"] = value.reshape(1)
        expected[f"{task}.alpha"] = torch.tensor([alpha], dtype=torch.float64)
        expected[f"{task}.lr"] = torch.tensor([lr], dtype=torch.float64)
        expected.update({f"{task}.{k}": v for k, v in negatives.items()})
        expected.update({f"{task}.state.{k}": v for k, v in after.items()})

    expected = {k: (v.float() if v.is_floating_point() else v.long()).contiguous()
                for k, v in expected.items()}
    save_file(expected, OUT / "expected.safetensors")
    for p in sorted(OUT.iterdir()):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
