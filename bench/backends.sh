#!/usr/bin/env bash
# `resnet bench` on every CPU-capable backend of one binary, in one run, alternating backends
# round by round so that machine noise spreads over all of them.
#
#   bench/backends.sh                     # builds with --features ndarray,wgpu,tch (see below)
#   RESNET_BIN=target/release/resnet BACKENDS="flex wgpu" ROUNDS=3 ITERS=5 bench/backends.sh
#
# tch needs libtorch 2.9: `eval "$(scripts/libtorch.sh)"` first (the script installs it from
# PyPI). wgpu runs on whatever adapter wgpu picks: on a machine without a GPU, Mesa's lavapipe
# (Debian `mesa-vulkan-drivers`, 25.x from bookworm-backports); its first run compiles and
# autotunes kernels for minutes, so a warm-up round runs first and is not reported.
# Workload: $WORKLOAD (default ResNet-50, batch 8, 224x224), $WARMUP untimed and $ITERS timed
# passes per round (each round reports the mean of its passes); 2 threads unless
# RAYON_NUM_THREADS says.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${RESNET_BIN:-}"
if [[ -z "$bin" ]]; then
  cargo build --release -p resnet-cli --features ndarray,wgpu,tch
  bin=target/release/resnet
fi
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
workload="${WORKLOAD:---arch resnet50 --batch-size 8}"
args="$workload --warmup ${WARMUP:-1} --iters ${ITERS:-3}"
rounds="${ROUNDS:-2}"
backends="${BACKENDS:-$("$bin" backends | grep -vx 'tch-cuda\|cuda\|vulkan\|metal' | tr '\n' ' ')}"
echo "binary $bin; backends: $backends; $args; $RAYON_NUM_THREADS threads; $rounds rounds"

for backend in $backends; do
  # Untimed: kernel compilation and autotune (wgpu), libtorch's first-call costs.
  "$bin" --backend "$backend" bench $workload --warmup 1 --iters 1 --json >/dev/null
done
declare -A means
for round in $(seq "$rounds"); do
  for backend in $backends; do
    line="$("$bin" --backend "$backend" bench $args --json 2>/dev/null)"
    mean="$(sed -E 's/.*"mean_ms":([0-9.]+).*/\1/' <<<"$line")"
    means[$backend]="${means[$backend]:-} $mean"
    printf 'round %s %-8s mean %8.1f ms\n' "$round" "$backend" "$mean"
  done
done
echo
printf '%-8s %s\n' backend "mean ms per batch, each round"
for backend in $backends; do
  printf '%-8s%s\n' "$backend" "${means[$backend]}"
done
