#!/usr/bin/env python3
"""Reads a `pretrain --metrics` file of a benchmark run and prints, for the steps after the
first (warm-up), the samples/s and the seconds per step spent averaging gradients, then the
peak resident memory (MB) at the last step: training's, before the final checkpoint is
written (0 where the metrics do not have it), then the median step's samples/s (the
steady state, without a slow step's weight in the mean).

    python3 scripts/bench_metrics.py METRICS.jsonl
"""
import json
import statistics
import sys

steps = [json.loads(line) for line in open(sys.argv[1])][1:]
if not steps:
    sys.exit("no timed steps in " + sys.argv[1])
# Every step has the same batch B: samples/s = steps·B / Σ(B / rate) = steps / Σ(1 / rate).
rate = len(steps) / sum(1.0 / s["samples_per_second"] for s in steps)
communication = sum(s.get("communication_seconds", 0.0) for s in steps) / len(steps)
peak = steps[-1].get("peak_rss_mb") or 0
median = statistics.median(s["samples_per_second"] for s in steps)
print(f"{rate:.4f} {communication:.4f} {peak:.0f} {median:.4f}")
