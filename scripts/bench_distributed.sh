#!/usr/bin/env bash
# Data-parallel training on this machine, ours and PyTorch's side by side in one run: the
# same global batch on 1 rank and on 2 ranks, samples/s and seconds per step spent
# averaging gradients.
#
#   scripts/bench_distributed.sh [--python PATH] [--runs N]
#
# One BLIP pre-training step (ITC + ITM + LM, AdamW) of the tiny model with BLIP's
# 30524-token vocabulary and with a 264-token one, global batch 32, on 2 cores in all:
# 1 rank with 2 threads, or 2 ranks with 1 thread each. Ours: `examples/pretrain` built with
# the `mpi` feature, as 2 MPI processes (`--distributed mpi`) and as 2 thread ranks of one
# process (`--distributed threads`, sharing one pool of 2 threads). PyTorch:
# scripts/bench_pretrain_torch.py, as 2 gloo ranks under mpirun, averaging gradients after
# the backward pass as ours does. Needs Open MPI (openmpi-bin), torch and transformers.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=python3
RUNS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYTHON="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
STEPS=12
BATCH=32
MPIRUN=(mpirun --oversubscribe -np 2)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)

TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release --quiet --example pretrain --features mpi
BIN="$TARGET/release/examples/pretrain"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" scripts/bench_data.py "$WORK"

ours() { # mode threads [tokenizer]: prints "samples/s communication-s"
  local mode=$1 threads=$2 tok=${3:-} args=() launch=()
  [ -n "$tok" ] && args=(--tokenizer "$tok")
  case "$mode" in
    mpi) launch=("${MPIRUN[@]}"); args+=(--distributed mpi) ;;
    threads) args+=(--distributed threads --ranks 2) ;;
  esac
  rm -rf "$WORK/ours" "$WORK/metrics.jsonl"
  RAYON_NUM_THREADS=$threads "${launch[@]}" "$BIN" --annotations "$WORK/tiny.json" --size tiny \
    --batch-size "$BATCH" --max-steps "$STEPS" --augment none --workers 1 \
    --checkpoint-dir "$WORK/ours" --checkpoint-every 100000 --metrics "$WORK/metrics.jsonl" \
    "${args[@]}" >/dev/null 2>&1
  "$PYTHON" scripts/bench_metrics.py "$WORK/metrics.jsonl"
}

torch() { # ranks vocab: prints "samples/s communication-s"
  local launch=() args=()
  [ "$1" = 2 ] && launch=("${MPIRUN[@]}") && args=(--distributed)
  OMP_NUM_THREADS=$((2 / $1)) "${launch[@]}" "$PYTHON" scripts/bench_pretrain_torch.py \
    --size tiny --batch-size "$BATCH" --vocab "$2" --steps "$STEPS" --threads $((2 / $1)) \
    "${args[@]}" 2>/dev/null | "$PYTHON" -c '
import json, sys
d = json.loads(sys.stdin.read())
print("%.1f %.4f" % (d["samples_per_second"], d.get("communication_seconds_per_step", 0.0)))'
}

row() { # label vocab [tokenizer]
  local label=$1 vocab=$2 tok=${3:-}
  local one=() mpi=() thr=() t1=() t2=() comm="" tcomm=""
  for _ in $(seq "$RUNS"); do
    read -r r _ < <(ours single 2 "$tok"); one+=("$r")
    read -r r c < <(ours mpi 1 "$tok"); mpi+=("$r"); comm=$c
    read -r r _ < <(ours threads 2 "$tok"); thr+=("$r")
    read -r r _ < <(torch 1 "$vocab"); t1+=("$r")
    read -r r c < <(torch 2 "$vocab"); t2+=("$r"); tcomm=$c
  done
  echo "| $label | ${one[*]} | ${mpi[*]} | ${thr[*]} | $comm s | ${t1[*]} | ${t2[*]} | $tcomm s |"
}

echo "| tiny model, global batch $BATCH | ours, 1 rank | ours, 2 MPI ranks | ours, 2 thread ranks | ours: averaging per step (MPI) | PyTorch $("$PYTHON" -c 'import torch; print(torch.__version__)'), 1 rank | PyTorch, 2 gloo ranks | PyTorch: averaging per step |"
echo "|---|---|---|---|---|---|---|---|"
row "30524-token vocabulary (samples/s per run)" bert
row "264-token vocabulary (samples/s per run)" world "$WORK/vocab.txt"
