#!/usr/bin/env bash
# The tiny-fixture parity, generation and half-precision tests on the wgpu backend, run on the CPU by Mesa's
# software Vulkan driver (lavapipe): the GPU code path (cubecl kernels, fusion, autotune)
# checked for correctness on a machine without a GPU. Slow (minutes): not part of .ci/run.
#
#   scripts/wgpu_check.sh            # installs mesa-vulkan-drivers when missing (root)
#
# Environment: CARGO_TARGET_DIR (as .ci/run), WGPU_CHECK_TIMEOUT (seconds, default 3600).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/blip-ci-target"
fi
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  echo "== installing Mesa's software Vulkan (lavapipe)"
  apt-get install -y --no-install-recommends mesa-vulkan-drivers libvulkan1 >/dev/null
fi
# Only lavapipe, even on a machine that also has a GPU driver: this is the CPU check.
VK_ICD_FILENAMES="$(ls /usr/share/vulkan/icd.d/lvp_icd*.json | head -n1)"
export VK_ICD_FILENAMES

echo "== parity, generation, task and half-precision tests on wgpu (lavapipe)"
BLIP_TEST_DEVICE=wgpu timeout "${WGPU_CHECK_TIMEOUT:-3600}" \
  cargo test --features wgpu --test parity --test generation --test tasks \
    --test precision -- --test-threads=1
