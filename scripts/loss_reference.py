#!/usr/bin/env python3
"""Reference values for blip-train's losses, from the original BLIP formulas
(`BLIP_Pretrain.forward` of salesforce/BLIP, rewritten here), on fixed random tensors.

    .venv/bin/python scripts/loss_reference.py

Writes tests/fixtures/losses/expected.safetensors: the inputs, each loss, and the gradients
of each loss with respect to its differentiable inputs (features, temperature, logits).
"""

import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "losses"
B, D, K, V, L = 4, 8, 12, 11, 6

g = torch.Generator().manual_seed(1234)
rand = lambda *shape: torch.randn(*shape, generator=g)
norm = lambda x, dim=-1: F.normalize(x, dim=dim)

out = {}
# ITC with momentum distillation: online features against momentum features + queues.
image_feat = norm(rand(B, D)).requires_grad_()
text_feat = norm(rand(B, D)).requires_grad_()
image_feat_m = norm(rand(B, D))
text_feat_m = norm(rand(B, D))
image_queue = norm(rand(D, K), dim=0)
text_queue = norm(rand(D, K), dim=0)
temp = torch.tensor(0.07).requires_grad_()
alpha = 0.4

image_feat_m_all = torch.cat([image_feat_m.t(), image_queue], dim=1)
text_feat_m_all = torch.cat([text_feat_m.t(), text_queue], dim=1)
sim_i2t_m = image_feat_m @ text_feat_m_all / temp.detach()
sim_t2i_m = text_feat_m @ image_feat_m_all / temp.detach()
sim_targets = torch.zeros(B, B + K)
sim_targets.fill_diagonal_(1)
i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
sim_i2t = image_feat @ text_feat_m_all / temp
sim_t2i = text_feat @ image_feat_m_all / temp
loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * i2t_targets, dim=1).mean()
loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * t2i_targets, dim=1).mean()
loss_itc = (loss_i2t + loss_t2i) / 2
loss_itc.backward()
out.update({
    "itc.image_feat": image_feat.detach(), "itc.text_feat": text_feat.detach(),
    "itc.image_feat_m": image_feat_m, "itc.text_feat_m": text_feat_m,
    "itc.image_queue": image_queue, "itc.text_queue": text_queue,
    "itc.temp": temp.detach().reshape(1), "itc.alpha": torch.tensor([alpha]),
    "itc.loss": loss_itc.detach().reshape(1),
    "itc.grad.image_feat": image_feat.grad, "itc.grad.text_feat": text_feat.grad,
    "itc.grad.temp": temp.grad.reshape(1),
})

# ITM hard-negative sampling weights (the original, diagonal excluded, +1e-4 smoothing).
with torch.no_grad():
    weights_t2i = F.softmax(sim_t2i[:, :B], dim=1) + 1e-4
    weights_t2i.fill_diagonal_(0)
    weights_i2t = F.softmax(sim_i2t[:, :B], dim=1) + 1e-4
    weights_i2t.fill_diagonal_(0)
out["itm.weights_t2i"] = weights_t2i
out["itm.weights_i2t"] = weights_i2t

# ITM: positives, then (text, negative image), then (negative text, image).
itm_logits = rand(3 * B, 2).requires_grad_()
itm_labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
loss_itm = F.cross_entropy(itm_logits, itm_labels)
loss_itm.backward()
out.update({"itm.logits": itm_logits.detach(), "itm.loss": loss_itm.detach().reshape(1),
            "itm.grad.logits": itm_logits.grad})

# LM with label smoothing 0.1, padding ignored.
lm_logits = (rand(B, L, V) * 2).requires_grad_()
labels = torch.randint(0, V, (B, L), generator=g)
labels[1, 4:] = -100
labels[3, 2:] = -100
loss_lm = F.cross_entropy(lm_logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                          ignore_index=-100, label_smoothing=0.1)
loss_lm.backward()
out.update({"lm.logits": lm_logits.detach(), "lm.labels": labels,
            "lm.loss": loss_lm.detach().reshape(1), "lm.grad.logits": lm_logits.grad})

# Two AdamW steps as BLIP configures it (torch's AdamW, eps 1e-8, weight decay 0.05) on a
# Linear 3 -> 2 with loss sum(linear(x) * c).
lin = torch.nn.Linear(3, 2)
with torch.no_grad():
    lin.weight.copy_(rand(2, 3))
    lin.bias.copy_(rand(2))
x, c = rand(5, 3), rand(5, 2)
out.update({"adamw.weight0": lin.weight.detach().clone(), "adamw.bias0": lin.bias.detach().clone(),
            "adamw.x": x, "adamw.c": c})
opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                        weight_decay=0.05)
for step in range(2):
    opt.zero_grad()
    (lin(x) * c).sum().backward()
    opt.step()
    out[f"adamw.weight{step + 1}"] = lin.weight.detach().clone()
    out[f"adamw.bias{step + 1}"] = lin.bias.detach().clone()

# Global-norm clipping (clip_grad_norm_, max norm 0.5) of the same Linear's gradients.
opt.zero_grad()
(lin(x) * c).sum().backward()
out["clip.weight"] = lin.weight.detach().clone()
out["clip.bias"] = lin.bias.detach().clone()
out["clip.norm"] = torch.nn.utils.clip_grad_norm_(lin.parameters(), 0.5).reshape(1)
out["clip.grad.weight"] = lin.weight.grad.clone()
out["clip.grad.bias"] = lin.bias.grad.clone()

OUT.mkdir(parents=True, exist_ok=True)
save_file({k: v.contiguous() for k, v in out.items()}, OUT / "expected.safetensors")
print(f"wrote {len(out)} tensors to {OUT / 'expected.safetensors'}")
