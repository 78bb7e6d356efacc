#!/usr/bin/env python3
"""Times one BLIP pre-training step in PyTorch (transformers modules, CPU) for comparison
with blip-train's `compute_losses` + AdamW step (samples/second).

    .venv/bin/python scripts/bench_pretrain_torch.py [--size tiny|base] [--batch-size N]
        [--steps N] [--threads N] [--vocab world|bert]
    mpirun -np 2 .venv/bin/python scripts/bench_pretrain_torch.py --distributed ...

With --distributed (started by mpirun: rank and world size from Open MPI's environment),
the ranks form a torch.distributed gloo group and train data-parallel as blip-train does:
--batch-size is the global batch, each rank takes its share, the gradients are averaged
after the backward pass in one flattened all-reduce, and the queues take every rank's
momentum features (all_gather). --threads is then per rank.

The step, as in blip-spec.md sections 1.3, 1.4 and 2.1-2.3 (written from the spec, not
copied from salesforce/BLIP): clamp temp; ViT; online ITC features; momentum update
(m = 0.995) then momentum features; ITC with soft targets (alpha 0.4) against [momentum
batch | queue]; ITM with one hard negative image per text and one hard negative text per
image, as ONE forward of 3B rows; LM with the decoder (`[DEC]` first, pads -> -100, label
smoothing 0.1); total = itc + itm + lm; backward; AdamW (3e-4, (0.9, 0.999), 1e-8, wd 0.05);
enqueue. The decoder shares every parameter with the text encoder except the self-attention
blocks (`encoder.layer.N.attention.*`). Text dropout is the original's 0.1 on hidden states
and attention probabilities (online and momentum encoders, both in train mode), as our
trainer's presets; ViT-B has no drop-path in pre-training.

One warm-up step (whose losses are reported) precedes the timed steps. Prints one JSON line
on stdout; peak RSS is in it and also written to stderr.
"""

import argparse
import copy
import json
import re
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipTextConfig, BlipTextLMHeadModel, BlipTextModel, BlipVisionConfig
from transformers import BlipVisionModel

SIZES = {
    "tiny": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, image_size=64, patch_size=8),
        text=dict(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64),
        # [PAD], [CLS], [SEP], [DEC], [ENC] of a small vocabulary
        tokens=dict(pad=0, cls=1, sep=2, dec=262, enc=263, first_word=5),
        projection=32, queue=256, batch_size=32, steps=5),
    "base": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, image_size=224, patch_size=16),
        text=dict(vocab_size=30524, hidden_size=768, intermediate_size=3072,
                  num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512),
        # bert-base-uncased + BLIP's [DEC] (30522) and [ENC] (30523)
        tokens=dict(pad=0, cls=101, sep=102, dec=30522, enc=30523, first_word=1000),
        projection=256, queue=57600, batch_size=4, steps=2),
}
MAX_LENGTH = 30
MOMENTUM = 0.995
ALPHA = 0.4

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
parser.add_argument("--batch-size", type=int, default=None,
                    help="default 32 tiny, 4 base")
parser.add_argument("--steps", type=int, default=None,
                    help="timed steps after 1 warm-up step (default 5 tiny, 2 base)")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--distributed", action="store_true",
                    help="one rank of a gloo group started by mpirun")
parser.add_argument("--vocab", choices=["world", "bert"], default=None,
                    help="text vocabulary: the world's 264 tokens (tiny's default) or BLIP's "
                         "30524 (bert-base-uncased + [DEC], [ENC]; base's)")
args = parser.parse_args()

size = SIZES[args.size]
if args.vocab == "bert":
    size["text"]["vocab_size"] = 30524
    size["tokens"] = dict(pad=0, cls=101, sep=102, dec=30522, enc=30523, first_word=1000)
elif args.vocab == "world":
    size["text"]["vocab_size"] = 264
    size["tokens"] = dict(pad=0, cls=1, sep=2, dec=262, enc=263, first_word=5)
global_batch = args.batch_size or size["batch_size"]
rank, world = 0, 1
if args.distributed:
    import os
    import torch.distributed as dist
    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    world = int(os.environ["OMPI_COMM_WORLD_SIZE"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if global_batch % world:
        parser.error(f"{world} ranks do not divide the global batch {global_batch}")
batch_size = global_batch // world
steps = args.steps if args.steps is not None else size["steps"]
queue_size = size["queue"]
tok = size["tokens"]
if steps < 1:
    parser.error("--steps must be at least 1")
if queue_size % global_batch != 0:
    parser.error(f"the batch size ({batch_size}) must divide the queue size ({queue_size})")

torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)  # the same initial weights on every rank


class BlipPretrain(nn.Module):
    """Trainable parameters only; the momentum encoders live outside (no gradients)."""

    def __init__(self):
        super().__init__()
        vision_config = BlipVisionConfig(**size["vision"])
        text_config = BlipTextConfig(
            **size["text"], encoder_hidden_size=vision_config.hidden_size,
            label_smoothing=0.1, pad_token_id=tok["pad"], sep_token_id=tok["sep"],
            bos_token_id=tok["dec"], is_decoder=True,  # is_decoder: layers get cross-attention
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        self.visual_encoder = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(text_config)
        d_v, d_t, d_p = vision_config.hidden_size, text_config.hidden_size, size["projection"]
        self.vision_proj = nn.Linear(d_v, d_p)
        self.text_proj = nn.Linear(d_t, d_p)
        self.itm_head = nn.Linear(d_t, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.tie_decoder_to_encoder()

    def tie_decoder_to_encoder(self):
        """Every decoder `bert` parameter becomes the encoder's object, except the causal
        self-attention blocks; the LM head's weight is the (shared) word-embedding matrix."""
        unshared = re.compile(r"^encoder\.layer\.\d+\.attention\.")
        encoder = dict(self.text_encoder.named_parameters())
        dec = self.text_decoder.bert
        for name, _ in list(dec.named_parameters()):
            if unshared.match(name):
                continue
            *path, leaf = name.split(".")
            module = dec.get_submodule(".".join(path))
            setattr(module, leaf, encoder[name])
        predictions = self.text_decoder.cls.predictions
        predictions.decoder.weight = dec.embeddings.word_embeddings.weight
        assert dec.embeddings.word_embeddings.weight is encoder["embeddings.word_embeddings.weight"]

    def image_features(self, image_embeds):
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, ids, mask):
        out = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return F.normalize(self.text_proj(out[:, 0]), dim=-1)


class Momentum(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.visual_encoder = copy.deepcopy(model.visual_encoder)
        self.vision_proj = copy.deepcopy(model.vision_proj)
        self.text_encoder = copy.deepcopy(model.text_encoder)  # untied from the decoder
        self.text_proj = copy.deepcopy(model.text_proj)
        self.requires_grad_(False)
        self.pairs = [(m, getattr(model, name)) for name, m in self.named_children()]

    @torch.no_grad()
    def update(self):
        for m, online in self.pairs:
            mp, op = list(m.parameters()), list(online.parameters())
            assert len(mp) == len(op)
            torch._foreach_lerp_(mp, op, 1.0 - MOMENTUM)  # m*θ_m + (1-m)*θ

    @torch.no_grad()
    def features(self, pixel_values, ids, mask):
        image_embeds = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        v = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        t = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return v, F.normalize(self.text_proj(t[:, 0]), dim=-1)


def random_batch():
    """Random normal images and random captions: [CLS] words... [SEP] then 1-4 pads."""
    s = size["vision"]["image_size"]
    pixel_values = torch.randn(batch_size, 3, s, s)
    ids = torch.randint(tok["first_word"], tok["dec"], (batch_size, MAX_LENGTH))
    ids[:, 0] = tok["cls"]
    mask = torch.ones_like(ids)
    for row, pads in enumerate(torch.randint(1, 5, (batch_size,)).tolist()):
        ids[row, MAX_LENGTH - pads - 1] = tok["sep"]
        ids[row, MAX_LENGTH - pads:] = tok["pad"]
        mask[row, MAX_LENGTH - pads:] = 0
    return pixel_values, ids, mask


model = BlipPretrain().train()
momentum = Momentum(model).train()
dim = size["projection"]
image_queue = F.normalize(torch.randn(dim, queue_size), dim=0)
text_queue = F.normalize(torch.randn(dim, queue_size), dim=0)
queue_ptr = 0
params = list(model.parameters())  # deduplicated: shared tensors appear once
optimizer = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)


communication = []


def average_gradients():
    """DDP's average, after the backward pass: one flattened all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    start = time.perf_counter()
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    communication.append(time.perf_counter() - start)


def gather(x):
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def train_step(pixel_values, ids, mask):
    global queue_ptr
    b = ids.shape[0]
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    temp = model.temp

    image_embeds = model.visual_encoder(pixel_values=pixel_values).last_hidden_state
    image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    v = model.image_features(image_embeds)
    t = model.text_features(ids, mask)

    # ITC with momentum distillation
    momentum.update()
    v_m, t_m = momentum.features(pixel_values, ids, mask)
    with torch.no_grad():
        v_all = torch.cat([v_m.t(), image_queue], dim=1)
        t_all = torch.cat([t_m.t(), text_queue], dim=1)
        hard = torch.zeros(b, b + queue_size)
        hard.fill_diagonal_(1)
        i2t_targets = ALPHA * F.softmax(v_m @ t_all / temp, dim=1) + (1 - ALPHA) * hard
        t2i_targets = ALPHA * F.softmax(t_m @ v_all / temp, dim=1) + (1 - ALPHA) * hard
    sim_i2t = v @ t_all / temp
    sim_t2i = t @ v_all / temp
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * i2t_targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t2i_targets).sum(1).mean()
    loss_itc = (loss_i2t + loss_t2i) / 2

    # ITM with hard negatives, one forward of 3B rows
    enc_ids = ids.clone()
    enc_ids[:, 0] = tok["enc"]
    with torch.no_grad():
        w_t2i = F.softmax(sim_t2i[:, :b], dim=1) + 1e-4
        w_t2i.fill_diagonal_(0)
        w_i2t = F.softmax(sim_i2t[:, :b], dim=1) + 1e-4
        w_i2t.fill_diagonal_(0)
        neg_image = torch.multinomial(w_t2i, 1).squeeze(1)  # one negative image per text
        neg_text = torch.multinomial(w_i2t, 1).squeeze(1)  # one negative text per image
    itm_images = torch.cat([image_embeds, image_embeds[neg_image], image_embeds], dim=0)
    itm_ids = torch.cat([enc_ids, enc_ids, enc_ids[neg_text]], dim=0)
    itm_mask = torch.cat([mask, mask, mask[neg_text]], dim=0)
    itm_out = model.text_encoder(
        input_ids=itm_ids, attention_mask=itm_mask, encoder_hidden_states=itm_images,
        encoder_attention_mask=torch.ones(itm_images.shape[:2], dtype=torch.long),
    ).last_hidden_state
    itm_logits = model.itm_head(itm_out[:, 0])
    itm_labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)])
    loss_itm = F.cross_entropy(itm_logits, itm_labels)

    # LM: [DEC] first, pads ignored, label smoothing 0.1 (config), mean over kept positions
    dec_ids = ids.clone()
    dec_ids[:, 0] = tok["dec"]
    labels = dec_ids.masked_fill(dec_ids == tok["pad"], -100)
    loss_lm = model.text_decoder(
        input_ids=dec_ids, attention_mask=mask, encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts, labels=labels, reduction="mean",
    ).loss

    loss = loss_itc + loss_itm + loss_lm
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if world > 1:
        average_gradients()
    optimizer.step()

    with torch.no_grad():
        v_m, t_m = gather(v_m), gather(t_m)
        n = v_m.shape[0]
        image_queue[:, queue_ptr:queue_ptr + n] = v_m.t()
        text_queue[:, queue_ptr:queue_ptr + n] = t_m.t()
        queue_ptr = (queue_ptr + n) % queue_size
    return {"itc": loss_itc.item(), "itm": loss_itm.item(), "lm": loss_lm.item(),
            "total": loss.item()}


torch.manual_seed(args.seed + 1000 * rank)  # each rank's own data and draws
first_losses = train_step(*random_batch())  # warm-up
times = []
for _ in range(steps):
    batch = random_batch()
    start = time.perf_counter()
    train_step(*batch)
    times.append(time.perf_counter() - start)

seconds_per_step = sum(times) / len(times)
peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
if rank != 0:
    sys.exit(0)
print(json.dumps({
    "size": args.size,
    "batch_size": global_batch,
    "ranks": world,
    "communication_seconds_per_step": round(sum(communication[1:]) / max(1, len(communication) - 1), 4),
    "threads": args.threads,
    "seconds_per_step": round(seconds_per_step, 4),
    "samples_per_second": round(global_batch / seconds_per_step, 3),
    "losses": {k: round(v, 5) for k, v in first_losses.items()},
    "torch": torch.__version__,
    "step_seconds": [round(s, 4) for s in times],
    "trainable_parameters": sum(p.numel() for p in params),
    "peak_rss_mb": round(peak_rss_mb, 1),
}))
print(f"peak RSS {peak_rss_mb:.1f} MB", file=sys.stderr)
