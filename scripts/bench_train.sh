#!/usr/bin/env bash
# Training throughput, ours and PyTorch's, side by side in one run: one BLIP pre-training
# step (ITC with momentum encoders and queue, ITM with hard negatives, LM, AdamW; text
# dropout 0.1) on the same machine, same threads, same batch and caption length.
#
#   scripts/bench_train.sh [--python PATH] [--base] [--runs N]
#
# Rows: tiny with a 264-token vocabulary, tiny with BLIP's 30524-token vocabulary, and with
# --base BLIP-base at 224 px, batch 4 (0.9 GB of weights, a few minutes). Ours is
# `examples/pretrain --augment none` on generated images and 24-28-word captions; PyTorch is
# scripts/bench_pretrain_torch.py (transformers' BLIP modules) on random ids of the same
# length. Both skip the first (warm-up) step. Prints a Markdown table with samples/s and peak
# resident memory; PyTorch needs torch and transformers (scripts/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=python3
BASE=0
RUNS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYTHON="$2"; shift 2 ;;
    --base) BASE=1; shift ;;
    --runs) RUNS="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
THREADS=2
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS

TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release --quiet --example pretrain --features train
BIN="$TARGET/release/examples/pretrain"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Images, captions and the small vocabulary (scripts/bench_data.py).
"$PYTHON" scripts/bench_data.py "$WORK"

# samples/s over the steps after the first, and the peak memory of training (MB, before the
# final checkpoint is written), from our metrics file.
ours_rate() {
  "$PYTHON" scripts/bench_metrics.py "$1" | cut -d' ' -f1,3,4
}

ours() { # size batch data [tokenizer]
  local size=$1 batch=$2 data=$3 tok=${4:-}
  local out="$WORK/ours" args=()
  [ -n "$tok" ] && args=(--tokenizer "$tok")
  rm -rf "$out" "$WORK/metrics.jsonl"
  /usr/bin/time -f "%M" -o "$WORK/rss" "$BIN" --annotations "$WORK/$data.json" --size "$size" \
    --batch-size "$batch" --max-steps "$STEPS" --augment none --checkpoint-dir "$out" \
    --checkpoint-every 100000 --metrics "$WORK/metrics.jsonl" "${args[@]}" >/dev/null 2>&1
  # samples/s, training's peak, the median step's samples/s, the whole run's peak (with
  # the final save) in MB.
  echo "$(ours_rate "$WORK/metrics.jsonl") $(( $(cat "$WORK/rss") / 1024 ))"
}

torch() { # size batch vocab
  # Its --steps counts the timed steps after its warm-up step: STEPS in all, as ours.
  "$PYTHON" scripts/bench_pretrain_torch.py --size "$1" --batch-size "$2" --vocab "$3" \
    --steps "$((STEPS - 1))" --threads "$THREADS" 2>/dev/null | "$PYTHON" -c '
import json, statistics, sys
d = json.loads(sys.stdin.read())
median = d["batch_size"] / statistics.median(d["step_seconds"])
print("%.4f %.0f %.4f" % (d["samples_per_second"], d["peak_rss_mb"], median))'
}

# One figure of a run: samples/s, or with PER_STEP set, seconds per step of batch $1 over
# the timed steps, then that of the median step in brackets.
figure() { # batch rate median-rate
  if [ -n "${PER_STEP:-}" ]; then
    awk -v b="$1" -v r="$2" -v m="$3" 'BEGIN { printf "%.1f (%.1f)", b / r, b / m }'
  else
    awk -v r="$2" 'BEGIN { printf "%.1f", r }'
  fi
}

row() { # label size batch data vocab [tokenizer]
  local label=$1 size=$2 batch=$3 data=$4 vocab=$5 tok=${6:-}
  local a=() b=() ra=0 rs=0 rb=0
  for _ in $(seq "$RUNS"); do
    read -r r m d s < <(ours "$size" "$batch" "$data" "$tok"); a+=("$(figure "$batch" "$r" "$d")"); ra=$m rs=$s
    read -r r m d < <(torch "$size" "$batch" "$vocab"); b+=("$(figure "$batch" "$r" "$d")"); rb=$m
  done
  echo "| $label | $batch | ${a[*]} | ${b[*]} | $ra MB ($rs MB with the final save) / $rb MB |"
}

echo "| model | batch | ours (samples/s, or s/step and the median step's, per run) | PyTorch $("$PYTHON" -c 'import torch; print(torch.__version__)') | peak RSS of training, ours / PyTorch |"
echo "|---|---|---|---|---|"
STEPS=12
row "tiny, 264-token vocabulary" tiny 32 tiny world "$WORK/vocab.txt"
row "tiny, 30524-token vocabulary" tiny 32 tiny bert
if [ "$BASE" = 1 ]; then
  STEPS=4 PER_STEP=1
  row "BLIP-base, 224 px" base 4 base bert
fi
