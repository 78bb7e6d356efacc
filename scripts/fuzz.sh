#!/usr/bin/env bash
# Fuzzes the input parsers (crates/blip-train/tests/fuzz.rs) for a fixed time:
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TEST_NAME_FILTER]
#
# SECONDS_PER_TARGET defaults to 300; the five targets run one after another (safetensors
# header + HF loader, original .pth reader, config.json, tokenizer.json, tokenizer
# encode/decode), each first replaying its corpus in crates/blip-train/tests/fuzz-corpus/.
# TEST_NAME_FILTER picks targets by test name, e.g. `fuzz_pth`.
# Environment (optional): BLIP_FUZZ_SEED (repeat a run), BLIP_FUZZ_CASE_TIMEOUT (seconds a
# case may run before it counts as a hang, 30), BLIP_FUZZ_MAX_ALLOC (largest single
# allocation a case may ask for, 256 MiB), BLIP_FUZZ_SHRINK_SECONDS (30), BLIP_FUZZ_TRACE=1
# (print why each input was refused, to see how deep the mutations get).
#
# A failing input is shrunk and saved by the test itself as
# crates/blip-train/tests/fuzz-corpus/<target>/crash-<hash>.<ext>. An input that aborts the
# process (an allocation over 4 GiB) is copied there by this script from the work directory.
# To keep a crasher as a regression input: fix the bug, give the file a telling name
# (e.g. `bug-header-len-overflow.safetensors`), and commit it; the normal
# `cargo test --workspace` replays the whole corpus (BLIP_FUZZ_SECONDS=3 per target there).
set -uo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-300}"
filter="${2:-fuzz_}"  # a substring of the test names below
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/blip-ci-target"
fi
workdir="$(mktemp -d "${TMPDIR:-/tmp}/blip-fuzz.XXXXXX")"
corpus=crates/blip-train/tests/fuzz-corpus

# One process per target, so that an abort in one does not stop the others.
status=0
for test in fuzz_safetensors fuzz_pth fuzz_config fuzz_tokenizer_json fuzz_tokenizer_io; do
  case "$test" in *"$filter"*) ;; *) continue ;; esac
  BLIP_FUZZ_SECONDS="$seconds" BLIP_FUZZ_WORKDIR="$workdir" \
    cargo test -p blip-train --test fuzz -- --exact "$test" --nocapture || status=1
done

# Inputs still in the work directory belong to a case that never finished (an abort).
declare -A ext=([safetensors]=safetensors [pth]=pth [config]=json [tokenizer]=json [tokenizer-io]=json)
for dir in "$workdir"/*/; do
  [ -d "$dir" ] || continue
  target="$(basename "$dir")"
  for input in "$dir"*; do
    [ -f "$input" ] || continue
    case "$(basename "$input")" in config-again.json) continue ;; esac
    if [ "$target" = safetensors ] && [ "$(basename "$input")" = config.json ]; then
      continue
    fi
    dest="$corpus/$target/crash-abort-$(sha256sum "$input" | cut -c1-16).${ext[$target]:-bin}"
    cp "$input" "$dest"
    echo "fuzz: a case of $target did not finish (abort); its input is saved as $dest" >&2
    status=1
  done
done
rm -rf "$workdir"

if [ "$status" -ne 0 ]; then
  echo "fuzz: failures found; new inputs are under $corpus/*/crash-*" >&2
else
  echo "fuzz: no failures in ${seconds}s per target"
fi
exit "$status"
