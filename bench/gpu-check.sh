#!/usr/bin/env bash
# GPU check, a few minutes on an NVIDIA machine: ResNet-50 parity against PyTorch and
# `resnet bench` on each GPU backend of one `resnet` binary, next to PyTorch on the same GPU.
#
#   bench/gpu-check.sh                 # builds `resnet` with `--features cuda,wgpu`, then checks
#   RESNET_BIN=path/to/resnet bench/gpu-check.sh   # checks a binary built elsewhere
#
# Needs: an NVIDIA driver (with its Vulkan ICD for wgpu), a Python with torch and torchvision
# ($PYTHON, default python3) for the reference logits and PyTorch's figures. Backends tested:
# $BACKENDS (default: the GPU backends the binary has among cuda, wgpu, tch-cuda).
# Output: one line per check; exit status 1 if a parity check fails.
set -uo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
bin="${RESNET_BIN:-}"
if [[ -z "$bin" ]]; then
  cargo build --release -p resnet-cli --features cuda,wgpu || exit 1
  bin=target/release/resnet
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$work}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
compiled="$("$bin" backends | tr '\n' ' ')"
echo "binary: $bin; compiled backends: $compiled"
if [[ -z "${BACKENDS:-}" ]]; then
  BACKENDS=""
  for b in cuda wgpu tch-cuda; do
    [[ " $compiled " == *" $b "* ]] && BACKENDS="$BACKENDS $b"
  done
fi
echo "backends under check:$BACKENDS"

# Reference: a full-size resnet50 checkpoint written by torchvision and its logits (64x64 input).
"$python" crates/resnet-import/tests/fixtures/full_size.py "$work" resnet50 || exit 1

status=0
for backend in $BACKENDS; do
  echo "== $backend"
  start=$(date +%s%N)
  if ! "$bin" --backend "$backend" forward --weights "$work/resnet50.pth" \
      --input "$work/input.npy" --output "$work/$backend.npy"; then
    echo "FAIL $backend: forward failed"; status=1; continue
  fi
  echo "first forward (kernel compilation and autotune included): $(( ($(date +%s%N) - start) / 1000000 )) ms"
  "$python" - "$work/$backend.npy" "$work/resnet50.logits.npy" "$backend" <<'PY' || status=1
import sys, numpy as np
ours, ref = np.load(sys.argv[1]), np.load(sys.argv[2])
rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
ok = rel <= 1e-4
print(f"{'PASS' if ok else 'FAIL'} {sys.argv[3]} resnet50 parity: relative error {rel:.3e} (tolerance 1e-4)")
sys.exit(0 if ok else 1)
PY
  for batch in 8 1; do
    "$bin" --backend "$backend" bench --arch resnet50 --batch-size "$batch" --warmup 5 --iters 20
  done
done

echo "== PyTorch on the same GPU (eval, no grad, float32, median of 20 after 5 warm-up)"
"$python" - <<'PY'
import time, torch, torchvision
if not torch.cuda.is_available():
    print("PyTorch sees no CUDA device"); raise SystemExit
torch.backends.cudnn.benchmark = True
model = torchvision.models.resnet50().eval().cuda()
for batch in (8, 1):
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    times = []
    with torch.no_grad():
        for i in range(25):
            torch.cuda.synchronize(); t = time.perf_counter()
            model(x).cpu()
            torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    times = sorted(times[5:])
    print(f"pytorch {torch.__version__} resnet50 batch {batch}: median {times[len(times)//2]*1e3:.2f} ms "
          f"({batch / times[len(times)//2]:.1f} img/s) on {torch.cuda.get_device_name()}")
PY
exit $status
