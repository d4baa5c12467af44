#!/usr/bin/env bash
# Data-parallel scaling on one machine: training throughput of 1 process vs a trainer plus
# remote workers (`resnet-train serve-devices`) on 127.0.0.1, alternating, on the flex backend.
#
#   cargo build --release -p resnet-train
#   bench/distributed.sh                       # ResNet-18, CIFAR stem, 32x32, global batch 64
#
# Environment: RESNET_TRAIN_BIN (default target/release/resnet-train), WORKERS (remote workers
# in the second setup, default 1), IMAGES (training images, default 1280), BATCH (global batch,
# default 64), ARCH (default resnet18), ROUNDS (default 2), THREADS (RAYON_NUM_THREADS per
# process, default: all cores for the single process, cores / processes otherwise).
# The images are synthetic CIFAR-10-format records (random pixels): only the speed matters.
# Figures: images per second of the training epoch, from metrics.csv's `seconds` column.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${RESNET_TRAIN_BIN:-target/release/resnet-train}"
workers="${WORKERS:-1}"
images="${IMAGES:-1280}"
batch="${BATCH:-64}"
arch="${ARCH:-resnet18}"
rounds="${ROUNDS:-2}"
cores="$(nproc)"
[ -x "$bin" ] || { echo "no $bin: cargo build --release -p resnet-train" >&2; exit 1; }

work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

python3 - "$work/data" "$images" <<'EOF'
import os, random, sys
out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(out)
rng = random.Random(0)
per = n // 5
def records(count):
    return b"".join(bytes([rng.randrange(10)]) + rng.randbytes(3072) for _ in range(count))
for i in range(1, 6):
    open(f"{out}/data_batch_{i}.bin", "wb").write(records(per))
open(f"{out}/test_batch.bin", "wb").write(records(64))
EOF
echo "token-$$-$RANDOM" >"$work/token"

common=(--format cifar10 --data "$work/data" --arch "$arch" --epochs 1 --warmup-epochs 0
        --batch-size "$batch" --workers 1)

epoch_rate() { # metrics.csv -> images/s of the training epoch
  awk -F, -v n="$images" '$2 == "train" { printf "%.1f", n / $7 }' "$1/metrics.csv"
}

single() {
  local out="$work/single-$1"
  RAYON_NUM_THREADS="${THREADS:-$cores}" "$bin" "${common[@]}" --out "$out" >/dev/null 2>"$out.log" \
    || { cat "$out.log" >&2; exit 1; }
  epoch_rate "$out"
}

group() {
  local out="$work/group-$1" threads="${THREADS:-$(( cores / (workers + 1) > 0 ? cores / (workers + 1) : 1 ))}"
  local urls=() i
  for i in $(seq "$workers"); do
    local fifo="$work/listen-$1-$i"
    RAYON_NUM_THREADS="$threads" "$bin" serve-devices --listen 127.0.0.1:0 --once \
      --token-file "$work/token" >"$fifo" 2>/dev/null &
    pids+=($!)
    for _ in $(seq 300); do grep -q '^listening on' "$fifo" 2>/dev/null && break; sleep 0.1; done
    urls+=("$(awk '/^listening on/ { print $3; exit }' "$fifo")")
  done
  RAYON_NUM_THREADS="$threads" "$bin" "${common[@]}" --out "$out" --token-file "$work/token" \
    --remote "$(IFS=,; echo "${urls[*]}")" >/dev/null 2>"$out.log" || { cat "$out.log" >&2; exit 1; }
  wait
  epoch_rate "$out"
}

echo "$arch, $images images of 32x32, global batch $batch, 1 epoch, $cores cores; images/s"
for round in $(seq "$rounds"); do
  echo "round $round: 1 process $(single "$round"); 1 trainer + $workers worker(s) $(group "$round")"
done
