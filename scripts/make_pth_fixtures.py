#!/usr/bin/env python3
"""Writes the fixtures of the original-checkpoint loader under tests/fixtures/original/.

Run from the repository root with the pinned environment of scripts/requirements.txt:

    .venv/bin/python scripts/make_pth_fixtures.py

Each `.pth` is a tiny random BLIP state dict in the key layout of the salesforce/BLIP
checkpoints (spec §6.2), written here key by key from the original module names (timm ViT
with its fused `qkv`, BERT with `self`/`LayerNorm`, `cls.predictions`, momentum copies,
feature queues, a 0-d `temp`), and saved as `torch.save({"model": state_dict})`:

* `pretrain.pth`: the `model_base.pth` layout. `text_encoder.*` and `text_decoder.bert.*`
  share every tensor but the self-attention blocks (the same storages, as
  `tie_encoder_decoder_weights` leaves them), the LM head's `decoder.weight` is the word
  embedding and `decoder.bias` the head's `bias`; momentum copies, `image_queue`,
  `text_queue`, `queue_ptr`, `temp`; beside `model`, an `optimizer`, a `config` and an `epoch`
  as training checkpoints have.
* `captioning.pth`: the `model_*_caption*.pth` layout (ViT + decoder), with the position
  table of a smaller image than the model runs at (224 px into 384).
* `retrieval.pth`: the `model_*_retrieval_*.pth` layout (ViT + encoder + ITC/ITM heads,
  queues, `idx_queue`, `ptr_queue`, `temp`; the momentum copies are left out for size).
* `vqa.pth`: the `model_vqa.pth` layout (ViT + question encoder + answer decoder whose
  cross-attention is text-wide), with the position table of a larger image (480 px into 384).
* `pretrain_unshared.pth`: `pretrain.pth` without its distillation state, as a raw state dict
  (no `model` key) in PyTorch's pre-1.6 (non-zip) container, in which one tensor the decoder
  shares with the encoder differs: a loader must refuse it.

The reference outputs (`expected.safetensors`) come from transformers, run in float64 (the
exact outputs of the stored f32 weights; stored as f32): each state dict is converted as
transformers' BLIP conversion script did (drop momentum, queues and `temp`;
interpolate `pos_embed` bicubically to the model's grid with the original
`interpolate_pos_embed`; rename keys by `rename_key`, spec §6.3), loaded strictly into the HF
model, and run on fixed inputs.
"""

import math
import pathlib
import re

import torch
from safetensors.torch import save_file
from torch import nn

import transformers
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "original"

# Tiny vocabulary: [PAD] 0, [CLS] 1, [SEP] 2, [DEC] 3, [ENC] 4.
VOCAB = 40
PAD, CLS, SEP, DEC, ENC = 0, 1, 2, 3, 4
MAX_POS = 16
PROJ = 8  # ITC projection width
QUEUE = 16  # feature queue length

# Vision width 16 vs text width 8, so a cross-attention width mix-up shows; VQA needs equal
# widths in transformers (its answer decoder is built with the vision width).
VISION = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
              patch_size=4, layer_norm_eps=1e-6)
TEXT = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2)
VQA_VISION = dict(VISION, hidden_size=TEXT["hidden_size"], intermediate_size=16)


# ---------------------------------------------------------------------------------------
# The original key layout (spec §6.2), as (name, shape) lists.

def vit_keys(prefix, v, image_size):
    d, i, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    n = (image_size // p) ** 2 + 1
    keys = [(f"{prefix}.cls_token", (1, 1, d)), (f"{prefix}.pos_embed", (1, n, d)),
            (f"{prefix}.patch_embed.proj.weight", (d, 3, p, p)),
            (f"{prefix}.patch_embed.proj.bias", (d,))]
    for b in range(v["num_hidden_layers"]):
        blk = f"{prefix}.blocks.{b}"
        keys += [(f"{blk}.norm1.weight", (d,)), (f"{blk}.norm1.bias", (d,)),
                 (f"{blk}.attn.qkv.weight", (3 * d, d)), (f"{blk}.attn.qkv.bias", (3 * d,)),
                 (f"{blk}.attn.proj.weight", (d, d)), (f"{blk}.attn.proj.bias", (d,)),
                 (f"{blk}.norm2.weight", (d,)), (f"{blk}.norm2.bias", (d,)),
                 (f"{blk}.mlp.fc1.weight", (i, d)), (f"{blk}.mlp.fc1.bias", (i,)),
                 (f"{blk}.mlp.fc2.weight", (d, i)), (f"{blk}.mlp.fc2.bias", (d,))]
    keys += [(f"{prefix}.norm.weight", (d,)), (f"{prefix}.norm.bias", (d,))]
    return keys


def attention_keys(prefix, h, width):
    return [(f"{prefix}.self.query.weight", (h, h)), (f"{prefix}.self.query.bias", (h,)),
            (f"{prefix}.self.key.weight", (h, width)), (f"{prefix}.self.key.bias", (h,)),
            (f"{prefix}.self.value.weight", (h, width)), (f"{prefix}.self.value.bias", (h,)),
            (f"{prefix}.output.dense.weight", (h, h)), (f"{prefix}.output.dense.bias", (h,)),
            (f"{prefix}.output.LayerNorm.weight", (h,)),
            (f"{prefix}.output.LayerNorm.bias", (h,))]


def bert_keys(prefix, t, encoder_width):
    """`BertModel(add_pooling_layer=False)` with a cross-attention block in every layer."""
    h, i = t["hidden_size"], t["intermediate_size"]
    keys = [(f"{prefix}.embeddings.word_embeddings.weight", (VOCAB, h)),
            (f"{prefix}.embeddings.position_embeddings.weight", (MAX_POS, h)),
            (f"{prefix}.embeddings.LayerNorm.weight", (h,)),
            (f"{prefix}.embeddings.LayerNorm.bias", (h,))]
    for n in range(t["num_hidden_layers"]):
        layer = f"{prefix}.encoder.layer.{n}"
        keys += attention_keys(f"{layer}.attention", h, h)
        keys += attention_keys(f"{layer}.crossattention", h, encoder_width)
        keys += [(f"{layer}.intermediate.dense.weight", (i, h)),
                 (f"{layer}.intermediate.dense.bias", (i,)),
                 (f"{layer}.output.dense.weight", (h, i)), (f"{layer}.output.dense.bias", (h,)),
                 (f"{layer}.output.LayerNorm.weight", (h,)),
                 (f"{layer}.output.LayerNorm.bias", (h,))]
    return keys


def lm_head_keys(prefix, t):
    h = t["hidden_size"]
    return [(f"{prefix}.cls.predictions.bias", (VOCAB,)),
            (f"{prefix}.cls.predictions.transform.dense.weight", (h, h)),
            (f"{prefix}.cls.predictions.transform.dense.bias", (h,)),
            (f"{prefix}.cls.predictions.transform.LayerNorm.weight", (h,)),
            (f"{prefix}.cls.predictions.transform.LayerNorm.bias", (h,))]


def linear_keys(prefix, out, inp):
    return [(f"{prefix}.weight", (out, inp)), (f"{prefix}.bias", (out,))]


def perturb(keys, seed):
    """Random values for every key, scaled as scripts/make_fixtures.py does (nothing is 0 or
    1, outputs differ per image and per token) but with a milder query/key gain (2.5, not
    3.5): attention stays peaked while f32 outputs stay within 1e-5 of the f64 reference,
    a tenth of the tests' tolerance."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in keys:
        def normal(std, mean=0.0):
            return torch.randn(shape, generator=g) * std + mean
        if "LayerNorm.weight" in name or re.search(r"norm\d?\.weight$", name):
            sd[name] = normal(0.2, 1.0)
        elif name.endswith("bias"):
            sd[name] = normal(0.2)
        elif "word_embeddings" in name:
            sd[name] = normal(2.0 / math.sqrt(shape[-1]))
        elif "position_embeddings" in name:
            sd[name] = normal(3.0 / math.sqrt(shape[-1]))
        elif name.endswith(("cls_token", "pos_embed")):
            sd[name] = normal(0.5)
        else:
            fan_in = math.prod(shape[1:])
            if any(k in name for k in (".query.", ".key.", ".qkv.")):
                gain = 2.5
            elif any(k in name for k in ("output.dense", "attn.proj", "fc2")):
                gain = 0.5
            else:
                gain = 1.0
            sd[name] = normal(gain / math.sqrt(fan_in))
    return sd


def add_buffers_and_ties(sd, bert_prefixes, decoder):
    """The `position_ids` buffers of the BERT stacks and, for a decoder, the LM head's tied
    `decoder.weight` (the word embeddings) and `decoder.bias` (the head's bias), as the
    original modules' `state_dict()` lists them (the same tensors under two names)."""
    for p in bert_prefixes:
        sd[f"{p}.embeddings.position_ids"] = torch.arange(MAX_POS).unsqueeze(0)
    if decoder:
        sd[f"{decoder}.cls.predictions.decoder.weight"] = \
            sd[f"{decoder}.bert.embeddings.word_embeddings.weight"]
        sd[f"{decoder}.cls.predictions.decoder.bias"] = sd[f"{decoder}.cls.predictions.bias"]


def unit_queue(g):
    q = torch.randn((PROJ, QUEUE), generator=g)
    return nn.functional.normalize(q, dim=0)


def momentum_of(sd, prefixes, g):
    """`*_m` copies: the online tensor nudged, so that a loader mixing them up shows."""
    out = {}
    for key, value in list(sd.items()):
        top, rest = key.split(".", 1)
        if top in prefixes and value.is_floating_point():
            out[f"{top}_m.{rest}"] = value + 0.05 * torch.randn(value.shape, generator=g)
        elif top in prefixes:
            out[f"{top}_m.{rest}"] = value.clone()
    return out


# ---------------------------------------------------------------------------------------
# The HF conversion (transformers' convert_blip_original_pytorch_to_hf.py, spec §6.3).

def interpolate_pos_embed(pos_embed, num_patches):
    """The original `models/vit.py::interpolate_pos_embed`: keep the class row, resize the
    square patch grid bicubically (align_corners=False)."""
    d = pos_embed.shape[-1]
    orig = int((pos_embed.shape[-2] - 1) ** 0.5)
    new = int(num_patches ** 0.5)
    if orig == new:
        return pos_embed
    extra, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(-1, orig, orig, d).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra, grid), dim=1)


def rename_key(key):
    if "visual_encoder" in key:
        key = re.sub("visual_encoder*", "vision_model.encoder", key)
    if "blocks" in key:
        key = re.sub(r"blocks", "layers", key)
    if "attn" in key:
        key = re.sub(r"attn", "self_attn", key)
    if "norm1" in key:
        key = re.sub(r"norm1", "layer_norm1", key)
    if "norm2" in key:
        key = re.sub(r"norm2", "layer_norm2", key)
    if "encoder.norm" in key:
        key = re.sub(r"encoder.norm", "post_layernorm", key)
    if "encoder.patch_embed.proj" in key:
        key = re.sub(r"encoder.patch_embed.proj", "embeddings.patch_embedding", key)
    if "encoder.pos_embed" in key:
        key = re.sub(r"encoder.pos_embed", "embeddings.position_embedding", key)
    if "encoder.cls_token" in key:
        key = re.sub(r"encoder.cls_token", "embeddings.class_embedding", key)
    if "self_attn" in key:
        key = re.sub(r"self_attn.proj", "self_attn.projection", key)
    return key


DROPPED = re.compile(r"(^[a-z_]+_m\.|queue|ptr|^temp$|position_ids$)")


def to_hf(model, sd, image_size, keep):
    """Loads an original state dict into a HF model the way the conversion did; `keep` lists
    the top-level modules the task model has (the rest of a pre-training file is dropped)."""
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()
          if not DROPPED.search(k) and k.split(".")[0] in keep}
    patches = (image_size // VISION["patch_size"]) ** 2
    sd["visual_encoder.pos_embed"] = interpolate_pos_embed(sd["visual_encoder.pos_embed"], patches)
    hf = {rename_key(k): v for k, v in sd.items()}
    model = model.double()  # references in f64: the f32 weights' exact outputs
    missing, unexpected = model.load_state_dict(hf, strict=False)
    tied = {"text_decoder.cls.predictions.decoder.weight",
            "text_decoder.cls.predictions.decoder.bias"}
    assert not unexpected, unexpected
    assert set(missing) <= tied, missing
    return model.eval()


def blip_config(vision, image_size):
    text = dict(TEXT)
    text.update(vocab_size=VOCAB, max_position_embeddings=MAX_POS, bos_token_id=DEC,
                pad_token_id=PAD, sep_token_id=SEP, eos_token_id=SEP, layer_norm_eps=1e-12)
    return BlipConfig(text_config=text, vision_config=dict(vision, image_size=image_size),
                      image_text_hidden_size=PROJ)


# ---------------------------------------------------------------------------------------
# Inputs and reference outputs.

def text_inputs(first):
    """Row 0 padded, row 1 full; `first` replaces [CLS] as the original code does."""
    ids = torch.tensor([[CLS, 5, 17, 22, 9, SEP, PAD, PAD],
                        [CLS, 33, 7, 38, 12, 26, 21, SEP]])
    mask = (ids != PAD).long()
    ids = ids.clone()
    ids[:, 0] = first
    return ids, mask


def pixels(image_size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, 3, image_size, image_size), generator=g).double()


def normalize(x):
    return nn.functional.normalize(x, dim=-1)


def retrieval_outputs(model, px, name, out, itm=True):
    cls_ids, mask = text_inputs(CLS)
    enc_ids, _ = text_inputs(ENC)
    image_embeds = model.vision_model(pixel_values=px).last_hidden_state
    text = model.text_encoder(input_ids=cls_ids, attention_mask=mask).last_hidden_state
    out[f"{name}.image_feat"] = normalize(model.vision_proj(image_embeds[:, 0]))
    out[f"{name}.text_feat"] = normalize(model.text_proj(text[:, 0]))
    if not itm:
        return
    out[f"{name}.itm_logits"] = model(input_ids=enc_ids, pixel_values=px, attention_mask=mask,
                                      use_itm_head=True).itm_score


def captioning_logits(model, px):
    ids, mask = text_inputs(DEC)
    return model(pixel_values=px, input_ids=ids, attention_mask=mask).logits


def pretrain(out):
    size = 16
    keys = (vit_keys("visual_encoder", VISION, size)
            + bert_keys("text_encoder", TEXT, VISION["hidden_size"])
            + linear_keys("vision_proj", PROJ, VISION["hidden_size"])
            + linear_keys("text_proj", PROJ, TEXT["hidden_size"])
            + linear_keys("itm_head", 2, TEXT["hidden_size"]))
    decoder_own = [(k, s) for k, s in bert_keys("text_decoder.bert", TEXT, VISION["hidden_size"])
                   if ".attention." in k] + lm_head_keys("text_decoder", TEXT)
    sd = perturb(keys + decoder_own, seed=1)
    # tie_encoder_decoder_weights: every decoder tensor outside `/attention` IS the encoder's.
    for key, _ in bert_keys("text_decoder.bert", TEXT, VISION["hidden_size"]):
        if ".attention." not in key:
            sd[key] = sd[key.replace("text_decoder.bert.", "text_encoder.", 1)]
    add_buffers_and_ties(sd, ["text_encoder", "text_decoder.bert"], "text_decoder")
    g = torch.Generator().manual_seed(11)
    sd.update(momentum_of(sd, {"visual_encoder", "text_encoder", "vision_proj", "text_proj"}, g))
    sd["image_queue"] = unit_queue(g)
    sd["text_queue"] = unit_queue(g)
    sd["queue_ptr"] = torch.tensor([6])
    sd["temp"] = torch.tensor(0.0634)  # 0-d, as nn.Parameter(0.07 * torch.ones([]))
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                 "param_groups": [{"lr": 3e-4, "weight_decay": 0.05, "params": [0]}]}
    torch.save({"model": sd, "optimizer": optimizer,
                "config": {"image_size": size, "queue_size": QUEUE, "vit": "tiny"}, "epoch": 3},
               OUT / "pretrain.pth")
    # A raw state dict (no "model" key, no distillation state, PyTorch's pre-1.6 container)
    # whose decoder copy of one shared tensor differs.
    bad = {k: v for k, v in sd.items() if not re.match(r"^[a-z_]+_m\.|.*queue", k)}
    key = "text_decoder.bert.encoder.layer.1.intermediate.dense.weight"
    bad[key] = sd[key] + 0.01
    torch.save(bad, OUT / "pretrain_unshared.pth", _use_new_zipfile_serialization=False)

    px = pixels(size, 101)
    out["pretrain.pixel_values"] = px
    cap = to_hf(BlipForConditionalGeneration(blip_config(VISION, size)), sd, size,
                {"visual_encoder", "text_decoder"})
    out["pretrain.decoder_logits"] = captioning_logits(cap, px)
    ret = to_hf(BlipForImageTextRetrieval(blip_config(VISION, size)), sd, size,
                {"visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head"})
    retrieval_outputs(ret, px, "pretrain", out)
    # The momentum encoders, through the same HF retrieval model.
    momentum = {k.replace("_m.", ".", 1): v for k, v in sd.items()
                if re.match(r"^[a-z_]+_m\.", k)}
    momentum.update({k: v for k, v in sd.items() if k.startswith("itm_head.")})  # unused
    ret_m = to_hf(BlipForImageTextRetrieval(blip_config(VISION, size)), momentum, size,
                  {"visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head"})
    retrieval_outputs(ret_m, px, "pretrain_m", out, itm=False)
    for k in ("image_queue", "text_queue", "temp"):
        out[f"pretrain.{k}"] = sd[k].reshape(-1)


def captioning(out):
    ckpt_size, size = 16, 24  # the file's table is for 16 px (grid 4), the model runs at 24
    keys = (vit_keys("visual_encoder", VISION, ckpt_size)
            + bert_keys("text_decoder.bert", TEXT, VISION["hidden_size"])
            + lm_head_keys("text_decoder", TEXT))
    sd = perturb(keys, seed=2)
    add_buffers_and_ties(sd, ["text_decoder.bert"], "text_decoder")
    torch.save({"model": sd}, OUT / "captioning.pth")
    px = pixels(size, 102)
    out["captioning.pixel_values"] = px
    cap = to_hf(BlipForConditionalGeneration(blip_config(VISION, size)), sd, size,
                {"visual_encoder", "text_decoder"})
    out["captioning.logits"] = captioning_logits(cap, px)


def retrieval(out):
    size = 16
    keys = (vit_keys("visual_encoder", VISION, size)
            + bert_keys("text_encoder", TEXT, VISION["hidden_size"])
            + linear_keys("vision_proj", PROJ, VISION["hidden_size"])
            + linear_keys("text_proj", PROJ, TEXT["hidden_size"])
            + linear_keys("itm_head", 2, TEXT["hidden_size"]))
    sd = perturb(keys, seed=3)
    add_buffers_and_ties(sd, ["text_encoder"], None)
    # (The momentum copies a real retrieval file also holds are left out to keep the fixture
    # small: pretrain.pth has them, and the tests load it as a retrieval model too.)
    g = torch.Generator().manual_seed(13)
    sd["image_queue"] = unit_queue(g)
    sd["text_queue"] = unit_queue(g)
    sd["idx_queue"] = torch.full((1, QUEUE), -100)
    sd["ptr_queue"] = torch.tensor([0])
    sd["temp"] = torch.tensor(0.05)
    torch.save({"model": sd}, OUT / "retrieval.pth")
    px = pixels(size, 103)
    out["retrieval.pixel_values"] = px
    ret = to_hf(BlipForImageTextRetrieval(blip_config(VISION, size)), sd, size,
                {"visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head"})
    retrieval_outputs(ret, px, "retrieval", out)


def vqa(out):
    ckpt_size, size = 24, 16  # the file's table is for 24 px (grid 6), the model runs at 16
    v, t = VQA_VISION, TEXT
    keys = (vit_keys("visual_encoder", v, ckpt_size)
            + bert_keys("text_encoder", t, v["hidden_size"])
            + bert_keys("text_decoder.bert", t, t["hidden_size"])
            + lm_head_keys("text_decoder", t))
    sd = perturb(keys, seed=4)
    add_buffers_and_ties(sd, ["text_encoder", "text_decoder.bert"], "text_decoder")
    torch.save({"model": sd}, OUT / "vqa.pth")
    px = pixels(size, 104)
    model = to_hf(BlipForQuestionAnswering(blip_config(VQA_VISION, size)), sd, size,
                  {"visual_encoder", "text_encoder", "text_decoder"})
    ids, mask = text_inputs(ENC)
    answers = torch.tensor([[DEC, 12, 30, SEP, PAD], [DEC, 27, SEP, PAD, PAD]])
    answer_mask = (answers != PAD).long()
    image_embeds = model.vision_model(pixel_values=px).last_hidden_state
    question = model.text_encoder(input_ids=ids, attention_mask=mask,
                                  encoder_hidden_states=image_embeds).last_hidden_state
    out["vqa.pixel_values"] = px
    out["vqa.answer_ids"] = answers
    out["vqa.logits"] = model.text_decoder(input_ids=answers, attention_mask=answer_mask,
                                           encoder_hidden_states=question).logits


if __name__ == "__main__":
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    OUT.mkdir(parents=True, exist_ok=True)
    out = {}
    with torch.no_grad():
        pretrain(out)
        captioning(out)
        retrieval(out)
        vqa(out)
    out = {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
    save_file({k: v.contiguous() for k, v in out.items()}, OUT / "expected.safetensors")
    for p in sorted(OUT.iterdir()):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size} bytes")
