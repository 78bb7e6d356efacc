#!/usr/bin/env python3
"""Writes the parity fixtures under tests/fixtures/, with HuggingFace transformers as the oracle.

Run from the repository root with the pinned environment of scripts/requirements.txt:

    python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements.txt
    .venv/bin/python scripts/make_fixtures.py

What it writes (all small enough to commit):

* `tests/fixtures/<config>-<family>/`: a HF model directory (`config.json`, `model.safetensors`)
  of a tiny random BLIP of one family (captioning, retrieval, vqa), and `expected.safetensors`
  with the inputs fed to transformers and every output the Rust tests compare against.
  `tiny` has equal vision and text widths; `asym` has vision width 48 vs text width 32,
  different head and layer counts and LayerNorm eps 1e-6, so any width mix-up in
  cross-attention shows. (transformers' VQA model only runs with equal widths, so there is no
  `asym-vqa`.)
* `tests/fixtures/tokenizer/expected.json`: ids, masks and decodes of transformers'
  bert-base-uncased tokenizer with BLIP's `[DEC]` and `[ENC]` added, on awkward text.
* `tests/fixtures/images/`: scikit-image sample images (photographs, greyscale, RGBA, JPEG) and
  `expected.safetensors` with `BlipImageProcessor`'s resized pixels for each (as the uint8
  levels its output is normalised from).

HF's own initialisation makes a random BLIP blind to its image, so every tensor is re-drawn
(`perturb`): nothing is 0 or 1, attention is sharp, outputs differ per image and per token.
"""

import json
import math
import pathlib
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import transformers
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipImageProcessor,
    BlipImageProcessorPil,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

# Tiny vocabulary keeping BLIP's special ids: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102,
# [MASK] 103, [DEC] = vocab - 2, [ENC] = vocab - 1.
VOCAB = 120
DEC, ENC = VOCAB - 2, VOCAB - 1
PAD, CLS, SEP = 0, 101, 102

CONFIGS = {
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, image_size=32, patch_size=8, layer_norm_eps=1e-5),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4),
        proj=16,
    ),
    "asym": dict(
        vision=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                    num_attention_heads=6, image_size=32, patch_size=8, layer_norm_eps=1e-6),
        text=dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                  num_attention_heads=2),
        proj=24,
    ),
}

FAMILIES = {
    "captioning": BlipForConditionalGeneration,
    "retrieval": BlipForImageTextRetrieval,
    "vqa": BlipForQuestionAnswering,
}


# The tiny vocabulary as words: "a picture of" are ids 11 22 33 (the fixtures' prompt), every
# other id i is "tok<i>". vocab.txt holds ids 0..VOCAB-3; [DEC] and [ENC] are added after it.
WORDS = {11: "a", 22: "picture", 33: "of", PAD: "[PAD]", 100: "[UNK]", CLS: "[CLS]",
         SEP: "[SEP]", 103: "[MASK]"}


def write_vocab(d):
    words = [WORDS.get(i, f"tok{i}") for i in range(VOCAB - 2)]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(vocab=str(d / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert tok.convert_tokens_to_ids("[DEC]") == DEC and tok.convert_tokens_to_ids("[ENC]") == ENC
    return tok


def text_of(ids):
    """The text whose encoding is `ids` ([CLS] ... [SEP] [PAD]...) under the tiny vocabulary."""
    return " ".join(WORDS.get(i, f"tok{i}") for i in ids if i not in (PAD, CLS, SEP))


def blip_config(spec):
    text = dict(vocab_size=VOCAB, max_position_embeddings=40, bos_token_id=DEC, pad_token_id=PAD,
                sep_token_id=SEP, eos_token_id=2, layer_norm_eps=1e-12, **spec["text"])
    return BlipConfig(text_config=text, vision_config=dict(spec["vision"]),
                      image_text_hidden_size=spec["proj"])


def perturb(model, seed):
    """Re-draws every parameter so that nothing is trivially 0 or 1 and attention is sharp."""
    g = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm)}

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    with torch.no_grad():
        for name, p in model.named_parameters():  # tied tensors appear once
            if id(p) in norms:
                p.copy_(normal(p.shape, 0.2, 1.0))
            elif name.endswith("bias"):
                p.copy_(normal(p.shape, 0.2))
            elif "word_embeddings" in name:
                p.copy_(normal(p.shape, 2.0 / math.sqrt(p.shape[-1])))
            elif "position_embeddings" in name:
                p.copy_(normal(p.shape, 3.0 / math.sqrt(p.shape[-1])))
            elif "class_embedding" in name or "position_embedding" in name:
                p.copy_(normal(p.shape, 0.5))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                if any(k in name for k in (".query.", ".key.", ".qkv.")):
                    gain = 3.5
                elif any(k in name for k in ("output.dense", "projection", "fc2")):
                    gain = 0.5
                else:
                    gain = 1.0
                p.copy_(normal(p.shape, gain / math.sqrt(fan_in)))


def tune_eos(model, pixel_values):
    """Raises the LM-head bias of [SEP] until free greedy decoding ends early in one row (of
    two) and runs to max_length in the other, so that EOS handling is exercised."""
    bias = model.text_decoder.cls.predictions.bias
    with torch.no_grad():
        for _ in range(200):
            seqs = model.generate(pixel_values=pixel_values, max_length=20)
            ended = [(row[1:] == SEP).any().item() for row in seqs]
            if any(ended) and not all(ended):
                return
            bias[SEP] += 0.25 if not any(ended) else -0.1
    raise RuntimeError("could not make exactly one row stop early")


def strip(seqs, pad):
    """Rows of a padded output as lists: cut after the first [SEP] following [DEC]."""
    out = []
    for row in seqs.tolist():
        for i in range(1, len(row)):
            if row[i] == SEP:
                row = row[: i + 1]
                break
        out.append(row)
    return out


def record_generation(name, out, generate, **kwargs):
    """Runs transformers' generate and records sequences, beam scores and, for greedy
    decoding, the smallest top-1 - top-2 margin of the processed scores over the steps."""
    o = generate(return_dict_in_generate=True, output_scores=True, **kwargs)
    width = max(len(r) for r in strip(o.sequences, 0))
    rows = [r + [-1] * (width - len(r)) for r in strip(o.sequences, 0)]
    out[f"gen.{name}.sequences"] = torch.tensor(rows)
    if getattr(o, "sequences_scores", None) is not None:
        out[f"gen.{name}.scores"] = o.sequences_scores.float()
    else:
        margins = torch.full((o.sequences.shape[0],), float("inf"))
        for step in o.scores:
            top = step.float().topk(2, dim=-1).values
            margins = torch.minimum(margins, top[:, 0] - top[:, 1])
        out[f"gen.{name}.min_margin"] = margins


CAPTION_GENERATION = {
    # name: generate() arguments (lengths count [DEC] and the prompt, as transformers)
    "greedy_fixed": dict(max_length=10, min_length=10),
    "greedy_free": dict(max_length=20),
    "greedy_processors": dict(max_length=16, min_length=6, repetition_penalty=1.5),
    "greedy_prompt": dict(max_length=14, prompt=True),
    "beam_free": dict(num_beams=3, max_length=20, num_return_sequences=3),
    "beam_forced": dict(num_beams=3, min_length=12, max_length=12),
    "beam_prompt": dict(num_beams=3, max_length=16, min_length=8, prompt=True,
                        repetition_penalty=1.3, length_penalty=0.6),
}
PROMPT = [CLS, 11, 22, 33, SEP]  # as the processor encodes "a picture of"


def vision_outputs(model, pixel_values, out):
    vo = model.vision_model(pixel_values=pixel_values, output_hidden_states=True)
    out["vision.last_hidden_state"] = vo.last_hidden_state
    for i, h in enumerate(vo.hidden_states):
        out[f"vision.hidden_states.{i}"] = h
    # Position-table interpolation: larger, smaller and non-square grids.
    g = torch.Generator().manual_seed(7)
    for h, w in [(48, 48), (24, 24), (24, 40)]:
        px = torch.randn((1, 3, h, w), generator=g)
        out[f"interp.{h}x{w}.pixel_values"] = px
        out[f"interp.{h}x{w}.last_hidden_state"] = model.vision_model(
            pixel_values=px, interpolate_pos_encoding=True).last_hidden_state
    return vo.last_hidden_state


def text_inputs():
    # Row 0 is padded, row 1 is full; ids avoid the special range except [CLS]/[SEP].
    ids = torch.tensor([[CLS, 5, 17, 42, 9, SEP, PAD, PAD],
                        [CLS, 33, 7, 88, 12, 64, 21, SEP]])
    mask = (ids != PAD).long()
    return ids, mask


def captioning(model, out):
    ids, mask = text_inputs()
    dec = ids.clone()
    dec[:, 0] = DEC  # the original code's decoder input; HF's forward takes ids as given
    labels = dec.masked_fill(mask == 0, -100)
    out["inputs.decoder_input_ids"] = dec
    out["inputs.decoder_attention_mask"] = mask
    out["inputs.labels"] = labels
    for smoothing in (0.0, 0.1):
        model.text_decoder.label_smoothing = smoothing
        o = model(pixel_values=out["inputs.pixel_values"], input_ids=dec, attention_mask=mask,
                  labels=labels)
        out[f"caption.loss.smoothing_{smoothing}"] = o.loss.reshape(1)
    out["caption.logits"] = o.logits
    model.text_decoder.label_smoothing = 0.0
    px = out["inputs.pixel_values"]
    for name, args in CAPTION_GENERATION.items():
        args = dict(args)
        if args.pop("prompt", False):
            args["input_ids"] = torch.tensor([PROMPT, PROMPT])
            out["inputs.prompt"] = torch.tensor(PROMPT)
        record_generation(name, out, model.generate, pixel_values=px, **args)


def retrieval(model, out):
    ids, mask = text_inputs()
    px = out["inputs.pixel_values"]
    out["inputs.input_ids"] = ids
    out["inputs.attention_mask"] = mask
    # ITM on the paired rows, [CLS] first as transformers does it ...
    out["itm.logits"] = model(input_ids=ids, pixel_values=px, attention_mask=mask,
                              use_itm_head=True).itm_score
    # ... and [ENC] first as the original training and retrieval evaluation do.
    enc = ids.clone()
    enc[:, 0] = ENC
    out["itm_enc.logits"] = model(input_ids=enc, pixel_values=px, attention_mask=mask,
                                  use_itm_head=True).itm_score
    # ITC: cosine similarity of every image with every text, and the embeddings.
    out["itc.cosine"] = model(input_ids=ids, pixel_values=px, attention_mask=mask,
                              use_itm_head=False).itm_score
    image_embeds = model.vision_model(pixel_values=px).last_hidden_state
    text_embeds = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    out["itc.image_embeds"] = nn.functional.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
    out["itc.text_embeds"] = nn.functional.normalize(model.text_proj(text_embeds[:, 0]), dim=-1)
    # The unimodal text encoder's hidden state (no cross-attention).
    out["text.last_hidden_state"] = text_embeds


def vqa(model, out):
    ids, mask = text_inputs()
    px = out["inputs.pixel_values"]
    answers = torch.tensor([[DEC, 12, 40, SEP, PAD],
                            [DEC, 77, SEP, PAD, PAD]])
    answer_mask = (answers != PAD).long()
    labels = answers.masked_fill(answer_mask == 0, -100)
    out["inputs.input_ids"] = ids
    out["inputs.attention_mask"] = mask
    out["inputs.decoder_input_ids"] = answers
    out["inputs.decoder_attention_mask"] = answer_mask
    out["inputs.labels"] = labels
    # BlipForQuestionAnswering.forward returns only the loss; the answer logits are the same
    # path spelled out: question encoder on the image, answer decoder on the question.
    # (transformers 5.24's cross-attention drops encoder_attention_mask, so the question's
    # padding is attended whatever mask is passed; the Rust forward reproduces that.)
    image_embeds = model.vision_model(pixel_values=px).last_hidden_state
    question = model.text_encoder(input_ids=ids, attention_mask=mask,
                                  encoder_hidden_states=image_embeds).last_hidden_state
    out["vqa.question_embeds"] = question
    o = model.text_decoder(input_ids=answers, attention_mask=answer_mask,
                           encoder_hidden_states=question, encoder_attention_mask=mask,
                           labels=labels, reduction="mean")
    out["vqa.logits"] = o.logits
    # (Passing labels alone would feed the -100s to the embedding as decoder input.)
    full = model(input_ids=ids, pixel_values=px, attention_mask=mask, labels=labels,
                 decoder_input_ids=answers, decoder_attention_mask=answer_mask)
    out["vqa.loss"] = full.loss.reshape(1)
    gen = dict(input_ids=ids, pixel_values=px, attention_mask=mask)
    record_generation("vqa_greedy", out, model.generate, max_length=10, **gen)
    record_generation("vqa_beam", out, model.generate, num_beams=3, max_length=10, min_length=2,
                      **gen)


def task_texts(model, family, out, tok):
    """What the task APIs see and should return: texts, decoded outputs, VQA rank results."""
    ids, _ = text_inputs()
    texts = {"texts": [text_of(r) for r in ids.tolist()]}
    for row, text in zip(ids.tolist(), texts["texts"]):
        assert tok(text).input_ids == [i for i in row if i != PAD], (row, text)
    if family == "captioning":
        for name in ("greedy_free", "greedy_prompt", "beam_free"):
            rows = out[f"gen.{name}.sequences"].tolist()
            texts[name] = [tok.decode([t for t in r if t >= 0], skip_special_tokens=True)
                           for r in rows]
    if family == "vqa":
        # The original rank mode on question row 1 (unpadded, so the cross-attention mask
        # that transformers drops makes no difference): first-token probabilities after
        # [DEC] pick the k best candidates, scored by -(label-smoothed loss, summed).
        answers = ["tok16", "tok27 tok77", "tok21", "tok8 tok54 tok21", "tok77", "tok99 tok5"]
        k, smoothing = 3, 0.1
        q = out["vqa.question_embeds"][1:2]
        with torch.no_grad():
            first = model.text_decoder(input_ids=torch.tensor([[DEC]]),
                                       encoder_hidden_states=q).logits[0, 0].softmax(-1)
            enc = tok(answers, padding="longest")
            cand = torch.tensor(enc.input_ids)
            cand[:, 0] = DEC
            top = first[cand[:, 1]].topk(k).indices
            chosen = cand[top]
            mask = torch.tensor(enc.attention_mask)[top]
            logits = model.text_decoder(input_ids=chosen, attention_mask=mask,
                                        encoder_hidden_states=q.expand(k, -1, -1)).logits
            labels = chosen.masked_fill(mask == 0, -100)
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                reduction="none", label_smoothing=smoothing).view(k, -1).sum(1)
        order = (-loss).argsort(descending=True)
        texts["rank"] = {"question": texts["texts"][1], "answers": answers, "k": k,
                         "label_smoothing": smoothing,
                         "indices": top[order].tolist(), "scores": (-loss[order]).tolist()}
    return texts


def model_fixtures():
    seed = 0
    for cname, spec in CONFIGS.items():
        for fname, cls in FAMILIES.items():
            if fname == "vqa" and spec["vision"]["hidden_size"] != spec["text"]["hidden_size"]:
                continue
            seed += 1
            torch.manual_seed(seed)
            model = cls(blip_config(spec)).eval()
            perturb(model, seed)
            out = {"inputs.pixel_values": torch.randn(
                (2, 3, 32, 32), generator=torch.Generator().manual_seed(100 + seed))}
            if fname == "captioning":
                tune_eos(model, out["inputs.pixel_values"])
            d = FIXTURES / f"{cname}-{fname}"
            if d.exists():
                shutil.rmtree(d)
            # Outputs come from the saved-and-reloaded model: what a loader sees.
            model.save_pretrained(d, safe_serialization=True)
            model = cls.from_pretrained(d).eval()
            with torch.no_grad():
                vision_outputs(model, out["inputs.pixel_values"], out)
                {"captioning": captioning, "retrieval": retrieval, "vqa": vqa}[fname](model, out)
            tok = write_vocab(d)
            texts = task_texts(model, fname, out, tok)
            (d / "expected_text.json").write_text(json.dumps(texts, indent=1) + "\n")
            save_file({k: v.contiguous() for k, v in out.items()}, d / "expected.safetensors")
            print(f"{d.relative_to(ROOT)}: {len(out)} tensors")


TEXTS = [
    "A picture of a dog.",
    "Café crème brûlée, naïve résumé!",
    "日本語のテキストと中文混合",
    "emoji 🐶🚀 and symbols ©®",
    "a" * 120 + " longword",
    "supercalifragilisticexpialidocious",
    "[CLS] literal [SEP] tokens [DEC] and [ENC] inside [MASK] [PAD]",
    "punctuation!!! (brackets) {braces} — dashes – and 'quotes' \"double\" ... ",
    "zero\u200bwidth\u200c and control\x07chars\ttab\nnewline",
    "   leading and trailing spaces   ",
    "",
    "UPPER lower MiXeD 123 4.5 6,7",
]


def tokenizer_fixtures():
    d = FIXTURES / "tokenizer"
    # transformers 5's BertTokenizer is the Rust-backed one; the legacy pure-Python one is
    # the cross-check.
    fast = BertTokenizer(vocab=str(d / "vocab.txt"))
    slow = BertTokenizerLegacy(vocab_file=str(d / "vocab.txt"))
    for tok in (fast, slow):
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    ids = [fast(t).input_ids for t in TEXTS]
    slow_ids = [slow(t).input_ids for t in TEXTS]
    for text, a, b in zip(TEXTS, ids, slow_ids):
        if a != b:
            print(f"note: fast and legacy tokenizers disagree on {text!r}: {a} vs {b}")
    batch = fast(TEXTS[:4], padding="longest", truncation=True, max_length=12)
    expected = {
        "transformers": transformers.__version__,
        "dec_token_id": fast.convert_tokens_to_ids("[DEC]"),
        "enc_token_id": fast.convert_tokens_to_ids("[ENC]"),
        "vocab_size": len(fast),
        "texts": TEXTS,
        "ids": ids,
        "decoded": [fast.decode(i, skip_special_tokens=True) for i in ids],
        "batch": {"texts": TEXTS[:4], "max_length": 12, "input_ids": batch.input_ids,
                  "attention_mask": batch.attention_mask},
    }
    (d / "expected.json").write_text(json.dumps(expected, ensure_ascii=False, indent=1) + "\n")
    print(f"{d.relative_to(ROOT)}/expected.json: {len(TEXTS)} texts")


IMAGES = ["chelsea.png", "astronaut.png", "coffee.png", "camera.png", "logo.png", "rocket.jpg"]


def image_fixtures():
    import skimage

    src = pathlib.Path(skimage.__file__).parent / "data"
    d = FIXTURES / "images"
    d.mkdir(parents=True, exist_ok=True)
    tv, pil = BlipImageProcessor(), BlipImageProcessorPil()
    mean = torch.tensor(tv.image_mean)[:, None, None]
    std = torch.tensor(tv.image_std)[:, None, None]
    out, worst = {}, 0.0
    for name in IMAGES:
        shutil.copy(src / name, d / name)
        img = Image.open(d / name)
        a = tv(img, return_tensors="pt").pixel_values[0]
        b = pil(img, return_tensors="pt").pixel_values[0]
        worst = max(worst, ((a - b) * std * 255).abs().max().item())
        # The torchvision backend resizes uint8 images to uint8, so its output is exactly
        # (level / 255 - mean) / std: store the levels, losslessly.
        levels = (a * std + mean) * 255
        assert (levels - levels.round()).abs().max() < 1e-3, name
        out[name] = levels.round().to(torch.uint8)
        print(f"{name}: mode {img.mode}, size {img.size}")
    save_file(out, d / "expected.safetensors")
    print(f"the PIL backend differs from the torchvision one by up to {worst:.2f} grey levels")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    model_fixtures()
    tokenizer_fixtures()
    image_fixtures()
