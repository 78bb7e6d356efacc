#!/usr/bin/env python3
"""Writes tests/fixtures/half/expected.safetensors: transformers' outputs in bf16 and f16.

The committed tiny checkpoints (written by make_fixtures.py) are loaded by transformers in
each half type (`dtype=`), fed the inputs of their own `expected.safetensors`, and their
outputs stored as f32. Their distance to transformers' f32 outputs (the `expected` files) is
PyTorch's own half-precision noise: the figure `tests/precision.rs` holds ours to.

    .venv/bin/python scripts/make_precision_fixtures.py
"""

import pathlib

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def captioning(name, dtype):
    d = FIXTURES / f"{name}-captioning"
    e = load_file(d / "expected.safetensors")
    model = BlipForConditionalGeneration.from_pretrained(d, dtype=dtype).eval()
    o = model(pixel_values=e["inputs.pixel_values"].to(dtype),
              input_ids=e["inputs.decoder_input_ids"],
              attention_mask=e["inputs.decoder_attention_mask"])
    return {f"{name}-captioning.caption.logits": o.logits}


def retrieval(name, dtype):
    d = FIXTURES / f"{name}-retrieval"
    e = load_file(d / "expected.safetensors")
    model = BlipForImageTextRetrieval.from_pretrained(d, dtype=dtype).eval()
    px = e["inputs.pixel_values"].to(dtype)
    ids, mask = e["inputs.input_ids"], e["inputs.attention_mask"]
    image = model.vision_model(pixel_values=px).last_hidden_state
    text = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    odd = e["interp.24x40.pixel_values"].to(dtype)
    return {
        f"{name}-retrieval.itm.logits": model(input_ids=ids, pixel_values=px,
                                              attention_mask=mask, use_itm_head=True).itm_score,
        f"{name}-retrieval.itc.image_embeds":
            nn.functional.normalize(model.vision_proj(image[:, 0]), dim=-1),
        f"{name}-retrieval.itc.text_embeds":
            nn.functional.normalize(model.text_proj(text[:, 0]), dim=-1),
        f"{name}-retrieval.interp.24x40.last_hidden_state": model.vision_model(
            pixel_values=odd, interpolate_pos_encoding=True).last_hidden_state,
    }


def main():
    out = {}
    with torch.no_grad():
        for tag, dtype in DTYPES.items():
            for part in (captioning("tiny", dtype), captioning("asym", dtype),
                         retrieval("tiny", dtype)):
                for key, value in part.items():
                    out[f"{tag}.{key}"] = value.float().contiguous()
    d = FIXTURES / "half"
    d.mkdir(exist_ok=True)
    save_file(out, d / "expected.safetensors")
    print(f"{(d / 'expected.safetensors').relative_to(ROOT)}: {len(out)} tensors")


if __name__ == "__main__":
    main()
