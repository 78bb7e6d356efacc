#!/usr/bin/env python3
"""PyTorch (transformers) figures for the same work as `cargo run --release --example
benchmark`, on the same random BLIP-base checkpoint, with the same thread count.

    .venv/bin/python scripts/bench_torch.py [DIR] [THREADS] [DTYPE]

DIR defaults to target/blip-base-random (written by the Rust benchmark), THREADS to the
number of CPUs, DTYPE (f32, f16, bf16: the benchmark's --dtype) to f32.
"""

import os
import statistics
import sys
import time

import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

directory = sys.argv[1] if len(sys.argv) > 1 else "target/blip-base-random"
threads = int(sys.argv[2]) if len(sys.argv) > 2 else os.cpu_count()
dtype_name = sys.argv[3] if len(sys.argv) > 3 else "f32"
dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
torch.set_num_threads(threads)
runs = 3


def timed(f):
    f()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


with torch.no_grad():
    start = time.perf_counter()
    model = BlipForConditionalGeneration.from_pretrained(directory, dtype=dtype).eval()
    load = time.perf_counter() - start
    px1 = torch.randn(1, 3, 384, 384, dtype=dtype)
    px8 = torch.randn(8, 3, 384, 384, dtype=dtype)
    vit = timed(lambda: model.vision_model(pixel_values=px1))
    forced = dict(min_length=21, max_length=21)  # [DEC] + 20 tokens, as the Rust benchmark
    greedy = timed(lambda: model.generate(pixel_values=px1, **forced))
    beam = timed(lambda: model.generate(pixel_values=px1, num_beams=3, **forced))
    batch8 = timed(lambda: model.generate(pixel_values=px8, **forced))
    itm_model = BlipForImageTextRetrieval(BlipConfig.from_pretrained(directory)).to(dtype).eval()
    ids = torch.ones(1, 35, dtype=torch.long)
    itm = timed(lambda: itm_model(input_ids=ids, pixel_values=px1))

print(f"PyTorch {torch.__version__}, {threads} threads, {dtype_name}")
print(f"checkpoint load                       {load:9.2f} s")
print(f"ViT-B/16 forward at 384 (batch 1)     {vit:9.3f} s")
print(f"caption, greedy, vision + 20 tokens   {greedy:9.3f} s")
print(f"caption, 3 beams, vision + 20 tokens  {beam:9.3f} s    ({beam / greedy:.2f}x greedy)")
print(f"images/s, greedy 20 tokens            {1 / greedy:9.2f} at batch 1, {8 / batch8:.2f} at batch 8")
print(f"ITM, one pair (vision + 35 tokens)    {itm:9.3f} s")
