#!/usr/bin/env bash
# CapFilt bootstrapping (BLIP §3): from a pre-trained checkpoint and a small clean data set,
# fine-tune a captioner and, separately, a filter; run CapFilt over the web data; pre-train a
# new model on clean + the bootstrapped data. Each stage is one of the repository's examples
# and can also be run on its own; a stage whose output exists is skipped, and training
# stages resume from their checkpoints, so rerunning the script after an interruption
# continues it.
#
#   scripts/bootstrap.sh PRETRAINED_CHECKPOINT CLEAN_JSON WEB_INPUT OUT_DIR [TOKENIZER]
#
# PRETRAINED_CHECKPOINT: a checkpoint directory written by the pretrain example
#   (runs/x/step-NNNNNNNN); CLEAN_JSON: BLIP annotations, images relative to its directory;
#   WEB_INPUT: BLIP JSON (images relative to its directory) or WebDataset shards;
#   TOKENIZER: vocab.txt / tokenizer.json the checkpoint was trained with.
# Environment: EPOCHS_CAPTION (5), EPOCHS_FILTER (6), EPOCHS_PRETRAIN (20), BATCH (32),
#   SIZE (tiny|base|large: the new model, trained from scratch as the paper does, Table 13),
#   STRATEGY ("" = nucleus, or "--beam 3"), DEVICE (cpu), EXTRA (more pretrain options).
set -euo pipefail

if [ $# -lt 4 ]; then
  sed -n '2,19p' "$0" >&2
  exit 2
fi
pretrained=$1 clean=$2 web=$3 out=$4 tokenizer=${5:-}
tok=()
[ -n "$tokenizer" ] && tok=(--tokenizer "$tokenizer")
run() { cargo run --release --quiet --features capfilt --example "$@"; }
mkdir -p "$out"

if [ ! -f "$out/captioner/model.safetensors" ]; then
  run pretrain -- --task caption --init "$pretrained" --annotations "$clean" "${tok[@]}" \
    --epochs "${EPOCHS_CAPTION:-5}" --batch-size "${BATCH:-32}" --device "${DEVICE:-cpu}" \
    --checkpoint-dir "$out/captioner-checkpoints" --resume --export-captioner "$out/captioner" ${EXTRA:-}
fi
if [ ! -f "$out/filter/model.safetensors" ]; then
  run pretrain -- --task retrieval --init "$pretrained" --annotations "$clean" "${tok[@]}" \
    --epochs "${EPOCHS_FILTER:-6}" --batch-size "${BATCH:-32}" --device "${DEVICE:-cpu}" \
    --checkpoint-dir "$out/filter-checkpoints" --resume --export-filter "$out/filter" ${EXTRA:-}
fi
# CapFilt resumes by itself from its committed chunks.
run capfilt -- --captioner "$out/captioner" --filter "$out/filter" --input "$web" \
  --out "$out/capfilt" --device "${DEVICE:-cpu}" ${STRATEGY:-}

# The cleaned annotations are relative to the image root CapFilt reports.
web_root=$(sed -n 's/.*"image_root": *"\([^"]*\)".*/\1/p' "$out/capfilt/summary.json")
run pretrain -- --annotations "$clean" --annotations "$out/capfilt/annotations.json" \
  --image-root "$(dirname "$clean")" --image-root "$web_root" "${tok[@]}" \
  --size "${SIZE:-tiny}" --epochs "${EPOCHS_PRETRAIN:-20}" --batch-size "${BATCH:-32}" \
  --device "${DEVICE:-cpu}" --checkpoint-dir "$out/pretrain-checkpoints" --resume ${EXTRA:-}
echo "bootstrapped model: $(cat "$out/pretrain-checkpoints/latest") in $out/pretrain-checkpoints"
