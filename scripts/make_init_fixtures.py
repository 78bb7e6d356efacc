#!/usr/bin/env python3
"""Writes the fixtures of pre-training initialisation under tests/fixtures/init/.

Run from the repository root with the pinned environment of scripts/requirements.txt:

    .venv/bin/python scripts/make_init_fixtures.py

Tiny random unimodal checkpoints in the layouts BLIP's pre-training starts from, each a
directory with `config.json` and `model.safetensors` as `save_pretrained` writes them:

* `vit/`: a transformers `ViTModel` (width 32, 2 layers, 4 heads, 32 px in 8-px patches,
  LayerNorm eps 1e-6 as the original BLIP ViT uses).
* `deit/`: a transformers `DeiTModel` (distilled: class and distillation tokens) holding the
  same weights as `vit/` plus a distillation token and its position row: initialising from
  it must give the ViT of `vit/`.
* `timm/`: the same weights in timm's `VisionTransformer` layout (`blocks.N.attn.qkv`,
  `pos_embed`, ...), with a classifier `head` a loader must ignore.
* `bert/`: a transformers `BertModel` (vocabulary 40, width 32, 2 layers, 4 heads, 80
  positions) whose token-type embeddings are zero, since BLIP's text transformer has none.
* `bert-mlm/`: a `BertForMaskedLM` with the same encoder and a random LM head.

`expected.safetensors` holds what transformers computes on fixed inputs, in float64 (stored
as f32): the ViT's `last_hidden_state` at 32 px and, with `interpolate_pos_encoding`, at
48 px; BERT's `last_hidden_state` for fixed ids and mask. Inputs are stored beside them.
"""

import json
import pathlib

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    DeiTConfig,
    DeiTModel,
    ViTConfig,
    ViTModel,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "init"

torch.manual_seed(0)


def randomise(model, std=0.2):
    """Every parameter random (LayerNorms around 1), so that no loading mistake hides."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight") or "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))


def vision_config(cls):
    return cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
    )


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    expected = {}

    # ViT.
    vit = ViTModel(vision_config(ViTConfig), add_pooling_layer=False).eval()
    randomise(vit)
    vit.save_pretrained(OUT / "vit")
    pixels32 = torch.randn(2, 3, 32, 32)
    pixels48 = torch.randn(2, 3, 48, 48)
    vit64 = vit.double()
    with torch.no_grad():
        expected["vit.out32"] = vit64(pixels32.double()).last_hidden_state.float()
        expected["vit.out48"] = vit64(
            pixels48.double(), interpolate_pos_encoding=True
        ).last_hidden_state.float()
    expected["pixels32"] = pixels32
    expected["pixels48"] = pixels48
    # The keys as written (transformers 5 may name modules differently in memory).
    vit_state = load_file(OUT / "vit" / "model.safetensors")

    # DeiT (distilled): the ViT's weights plus a distillation token and position row.
    deit = DeiTModel(vision_config(DeiTConfig), add_pooling_layer=False).eval()
    deit.save_pretrained(OUT / "deit")
    state = load_file(OUT / "deit" / "model.safetensors")
    for key in state:
        if key in vit_state and key != "embeddings.position_embeddings":
            state[key] = vit_state[key].clone()
    pos = vit_state["embeddings.position_embeddings"]
    state["embeddings.position_embeddings"] = torch.cat(
        [pos[:, :1], torch.randn(1, 1, 32), pos[:, 1:]], dim=1
    )
    state["embeddings.distillation_token"] = torch.randn(1, 1, 32)
    save_file(state, OUT / "deit" / "model.safetensors", metadata={"format": "pt"})

    # timm layout of the same weights.
    timm = {
        "cls_token": vit_state["embeddings.cls_token"],
        "pos_embed": vit_state["embeddings.position_embeddings"],
        "patch_embed.proj.weight": vit_state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": vit_state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": vit_state["layernorm.weight"],
        "norm.bias": vit_state["layernorm.bias"],
        "head.weight": torch.randn(10, 32),
        "head.bias": torch.randn(10),
    }
    for i in range(2):
        hf = f"encoder.layer.{i}."
        t = f"blocks.{i}."
        for leaf in ["weight", "bias"]:
            timm[t + "attn.qkv." + leaf] = torch.cat(
                [vit_state[hf + f"attention.attention.{p}.{leaf}"] for p in ["query", "key", "value"]]
            )
            for ours, theirs in [
                ("norm1", "layernorm_before"),
                ("attn.proj", "attention.output.dense"),
                ("norm2", "layernorm_after"),
                ("mlp.fc1", "intermediate.dense"),
                ("mlp.fc2", "output.dense"),
            ]:
                timm[t + ours + "." + leaf] = vit_state[hf + theirs + "." + leaf]
    (OUT / "timm").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in timm.items()}, OUT / "timm" / "model.safetensors")
    (OUT / "timm" / "config.json").write_text(
        json.dumps({"architecture": "vit_tiny_test_patch8_32", "num_classes": 10}, indent=2)
    )

    # BERT.
    bert_config = BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=80,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    mlm = BertForMaskedLM(bert_config).eval()
    randomise(mlm)
    with torch.no_grad():
        mlm.bert.embeddings.token_type_embeddings.weight.zero_()
    mlm.save_pretrained(OUT / "bert-mlm")
    bert = BertModel(bert_config, add_pooling_layer=True).eval()
    bert.load_state_dict(mlm.bert.state_dict(), strict=False)
    bert.save_pretrained(OUT / "bert")
    ids = torch.tensor([[1, 7, 8, 9, 2, 0], [1, 10, 39, 2, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected["bert.out"] = bert.double()(
            input_ids=ids, attention_mask=mask
        ).last_hidden_state.float()
    expected["bert.ids"] = ids
    expected["bert.mask"] = mask

    save_file({k: v.contiguous() for k, v in expected.items()}, OUT / "expected.safetensors")
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(p.relative_to(ROOT), p.stat().st_size)


if __name__ == "__main__":
    main()
