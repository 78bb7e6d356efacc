"""How fast a BLIP-style ViT learns the world's shapes: the measurement behind the world's
object sizes and the demo's training (docs/world.md, "The demo models").

A PyTorch shape classifier (ViT of width 96, 3 blocks, 8-px patches at 64 px, a linear head
on [CLS] naming each grid cell's shape or "empty") on scenes drawn like blip-world's (same
shapes, colours, cells, sizes and speckle; not byte-identical renders). It prints the shape
accuracy on 1,000 held-out scenes every 32k samples, overall and for small and large
objects.

    SMALL=0.085 python scripts/world_shapes_torch.py THREADS 64 8 9000 2e-3:108000:300:96:3
    SMALL=0.11  python scripts/world_shapes_torch.py THREADS 64 8 9000 2e-3:108000:300:96:3

Arguments: threads, image size, patch size, training images, then runs as
lr:samples:warmup_steps:width:layers (warm-up 1: none). Measured (1 thread, 2026-12-02):
radius 0.085: small 50.7 %, large 97.8 %; radius 0.11: small 79.0 %, large 99.6 %;
radius 0.11 without warm-up: 25.1 % overall after 32k samples against 62.3 % with it.
"""
# Diagnostic only: can a BLIP-style ViT (width 96, 3 blocks) learn the world's shapes?
import math, sys, time, numpy as np, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
COL = np.array([[215,40,40],[40,165,60],[45,85,220],[240,205,35],[140,60,185],[245,135,25]])
BG = np.array([[242,242,238],[128,128,132],[22,22,26]])
import os
SMALL = float(os.environ.get('SMALL', '0.085'))
CELLS = [(0,1),(2,1),(1,0),(1,2),(1,1)]
k = np.arange(10); ang = -math.pi/2 + k*math.pi/5; rad = np.where(k%2==0, .94, .42)
STAR = np.stack([rad*np.cos(ang), rad*np.sin(ang)+0.0], 1)
def contains(shape, u, v):
    if shape == 0: return u*u+v*v <= 1
    if shape == 1: return (abs(u) <= .7) & (abs(v) <= .7)
    if shape == 2: return (v >= -.95) & (v <= .7) & (abs(u) <= (v+.95)*.4327)
    if shape == 4: return abs(u)/.72 + abs(v) <= 1
    inside = np.zeros_like(u, dtype=bool); j = 9
    for i in range(10):
        xi, yi = STAR[i]; xj, yj = STAR[j]
        c = ((yi > v) != (yj > v)) & (u < (xj-xi)*(v-yi)/(yj-yi+1e-12)+xi)
        inside ^= c; j = i
    return inside
def scene(rng, size):
    n = rng.choice([1,2,3], p=[.35,.4,.25]); cells = rng.permutation(5)[:n]
    img = np.tile(BG[rng.integers(3)], (size, size, 1)).astype(np.float64)
    if rng.random() < .5: img += rng.integers(-14, 15, (size, size, 1))
    label = np.full(5, 5)  # per cell: shape or 5 = empty
    ys, xs = np.mgrid[0:size, 0:size]
    for c in cells:
        shape = rng.integers(5); col = COL[rng.integers(6)] + rng.integers(-12, 13, 3)
        small = rng.random() < .5; r = (SMALL if small else 0.15) * rng.uniform(.93, 1.07)
        cx0, cy0 = CELLS[c]; jit = max(1/6 - r - .015, 0)
        cx = ((cx0+.5)/3 + rng.uniform(-jit, jit))*size; cy = ((cy0+.5)/3 + rng.uniform(-jit, jit))*size; rr = r*size
        inside = np.zeros((size, size))
        for sy in range(3):
            for sx in range(3):
                inside += contains(shape, (xs+(sx+.5)/3-cx)/rr, (ys+(sy+.5)/3-cy)/rr)
        img = (img*(9-inside[...,None]) + col*inside[...,None])/9
        label[c] = shape + (10 if small else 0)
    return np.clip(img, 0, 255), label
def data(n, size, seed):
    rng = np.random.default_rng(seed); X = np.zeros((n, 3, size, size), np.float32); Y = np.zeros((n, 5), np.int64)
    for i in range(n):
        im, y = scene(rng, size); X[i] = im.transpose(2,0,1)/255; Y[i] = y
    return torch.tensor((X-.5)/.25), torch.tensor(Y)
class ViT(nn.Module):
    def __init__(s, size, patch, width, layers):
        super().__init__(); s.pe = nn.Conv2d(3, width, patch, patch); n = (size//patch)**2
        s.cls = nn.Parameter(torch.zeros(1,1,width)); s.pos = nn.Parameter(torch.randn(1,n+1,width)*.02)
        s.blocks = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 4, 2*width, 0.0, 'gelu', batch_first=True, norm_first=True), layers)
        s.ln = nn.LayerNorm(width); s.head = nn.Linear(width, 5*6)
    def forward(s, x):
        x = s.pe(x).flatten(2).transpose(1,2); x = torch.cat([s.cls.expand(len(x),-1,-1), x], 1) + s.pos
        return s.head(s.ln(s.blocks(x))[:,0]).view(-1,5,6)
def run(size, patch, width, layers, lr, samples, warm, Xtr, Ytr, Xte, Yte):
    torch.manual_seed(0); m = ViT(size, patch, width, layers)
    opt = torch.optim.AdamW(m.parameters(), lr, weight_decay=.05); steps = samples//32; t0 = time.time()
    for step in range(steps):
        f = min(1, (step+1)/warm) * .5*(1+math.cos(math.pi*step/steps))
        for g in opt.param_groups: g['lr'] = lr*f
        idx = torch.randint(len(Xtr), (32,)); loss = F.cross_entropy(m(Xtr[idx]).reshape(-1,6), (Ytr[idx] % 10).reshape(-1))
        opt.zero_grad(); loss.backward(); opt.step()
        if (step+1) % 1000 == 0: evaluate(m, Xte, Yte, size, patch, lr, (step+1)*32, t0)
    evaluate(m, Xte, Yte, size, patch, lr, steps*32, t0)
def evaluate(m, Xte, Yte, size, patch, lr, samples, t0):
    m.eval()
    with torch.no_grad(): p = m(Xte).argmax(-1)
    y = Yte % 10; present = y < 5; acc = (p[present] == y[present]).float().mean().item(); sm = Yte >= 10; lg = present & ~sm; acc_s = (p[sm] == y[sm]).float().mean().item(); acc_l = (p[lg] == y[lg]).float().mean().item()
    print(f"size {size} patch {patch} lr {lr} samples {samples}: shape acc {acc:.3f} small {acc_s:.3f} large {acc_l:.3f} ({time.time()-t0:.0f} s)", flush=True)
    m.train()
if __name__ == '__main__':
    size = int(sys.argv[2]); patch = int(sys.argv[3]); n = int(sys.argv[4])
    Xtr, Ytr = data(n, size, 1); Xte, Yte = data(1000, size, 2)
    for spec in sys.argv[5:]:
        lr, samples, warm, w, L = spec.split(':')
        run(size, patch, int(w), int(L), float(lr), int(samples), int(warm), Xtr, Ytr, Xte, Yte)
