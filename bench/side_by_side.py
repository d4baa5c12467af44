"""Side by side: resnet-rs against PyTorch and ONNX Runtime on the same work, same machine.

Usage (from the repository root, after `cargo build --release -p resnet-cli -p xtask`):
  python bench/side_by_side.py [--rounds 3] [--iters 10] [--warmup 3] [--threads 2]
                               [--workloads r50b8,r50b1,r18b1,train] [--ours-arg=--no-fold]

For each workload and each of `--rounds` rounds it runs, in this order and each in a fresh
process under `/usr/bin/time -v`: our `resnet bench` (flex), PyTorch (`bench/peer_infer.py torch`)
and ONNX Runtime (`bench/peer_infer.py onnx`), so the sides alternate A B C A B C and share
whatever else the machine is doing. Every process does `--warmup` untimed passes and reports the
median of `--iters` timed ones; the table shows, per side, the median over rounds of those
medians, the peak resident memory (median over rounds), and the ratios ours/peer of the time.
Inference is eval mode, no autograd, float32, random weights and inputs, `--threads` threads.

The training workload is one SGD step of a CIFAR-stem ResNet-18 at 32x32, batch 64:
`xtask bench-train --only ours` against `bench/train_step.py` (no ONNX Runtime side).

The ONNX models are exported once per architecture by `bench/peer_infer.py export` into
`$CARGO_TARGET_DIR/bench-onnx/` (default `target/bench-onnx/`).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORKLOADS = {
    # name: (architecture, batch size) or None for the training step.
    "r50b8": ("resnet50", 8),
    "r50b1": ("resnet50", 1),
    "r18b1": ("resnet18", 1),
    "train": None,
}

ROOT = Path(__file__).resolve().parent.parent


def find_python(explicit):
    candidates = [explicit, os.environ.get("RESNET_PYTHON"), ".venv/bin/python", sys.executable]
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import torch, torchvision, onnxruntime"],
            capture_output=True,
            cwd=ROOT,
        )
        if probe.returncode == 0:
            return candidate
    sys.exit(
        "no Python with torch, torchvision and onnxruntime (pip install torch torchvision onnx "
        "onnxruntime onnxscript; pass --python or set RESNET_PYTHON)"
    )


def measure(cmd, env):
    """Run `cmd` under /usr/bin/time -v; return (last stdout line as JSON, peak RSS in MiB)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        proc = subprocess.run(
            ["/usr/bin/time", "-v", "-o", stats.name, *cmd],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stats.read())
    lines = proc.stdout.strip().splitlines()
    if not lines or match is None:
        sys.exit(f"{' '.join(cmd)}: no JSON output or no peak memory")
    return json.loads(lines[-1]), int(match.group(1)) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--python", help="Python with torch, torchvision and onnxruntime")
    parser.add_argument(
        "--ours-arg",
        action="append",
        default=[],
        help="extra argument for `resnet bench` (repeatable), e.g. --ours-arg=--no-fold",
    )
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        sys.exit(f"unknown workloads {unknown}; known: {list(WORKLOADS)}")

    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    resnet = target / "release" / "resnet"
    xtask = target / "release" / "xtask"
    for binary in (resnet, xtask):
        if not binary.exists():
            sys.exit(f"{binary} missing: cargo build --release -p resnet-cli -p xtask")
    python = find_python(args.python)
    env = dict(os.environ)
    threads = str(args.threads)
    env.update(RAYON_NUM_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)

    onnx_dir = target / "bench-onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    common = ["--iters", str(args.iters), "--warmup", str(args.warmup)]
    results = {}
    for workload in workloads:
        sides = {}
        if WORKLOADS[workload] is None:
            sides["resnet-rs"] = [
                str(xtask), "bench-train", "--only", "ours", "--json", "--rounds", "1",
                "--steps", str(args.iters), "--warmup", str(args.warmup),
            ]
            sides["pytorch"] = [
                python, "bench/train_step.py", "--steps", str(args.iters),
                "--warmup", str(args.warmup), "--threads", threads,
            ]
        else:
            arch, batch = WORKLOADS[workload]
            model = onnx_dir / f"{arch}.onnx"
            if not model.exists():
                print(f"exporting {model}", file=sys.stderr)
                subprocess.run(
                    [python, "bench/peer_infer.py", "export", "--arch", arch, "--out", str(model)],
                    check=True,
                    cwd=ROOT,
                    capture_output=True,
                )
            sides["resnet-rs"] = [
                str(resnet), "bench", "--arch", arch, "--batch-size", str(batch), "--json",
                *common, *args.ours_arg,
            ]
            peer = [python, "bench/peer_infer.py"]
            sides["pytorch"] = [
                *peer, "torch", "--arch", arch, "--batch-size", str(batch),
                "--threads", threads, *common,
            ]
            sides["onnxruntime"] = [
                *peer, "onnx", "--model", str(model), "--batch-size", str(batch),
                "--threads", threads, *common,
            ]
        runs = {side: [] for side in sides}
        for round_ in range(1, args.rounds + 1):
            for side, cmd in sides.items():
                out, rss = measure(cmd, env)
                ms = out.get("median_ms", out.get("ours_median_ms"))
                runs[side].append((ms, rss))
                print(
                    f"{workload} round {round_}/{args.rounds}: {side} {ms:.1f} ms, {rss:.0f} MiB",
                    file=sys.stderr,
                )
        results[workload] = {
            side: {
                "median_ms": statistics.median(ms for ms, _ in r),
                "peak_rss_mib": statistics.median(rss for _, rss in r),
                "runs_ms": [ms for ms, _ in r],
            }
            for side, r in runs.items()
        }

    print(
        f"\n{args.threads} threads, median over {args.rounds} rounds of the median of "
        f"{args.iters} timed passes after {args.warmup} warm-up"
        + (f"; resnet bench {' '.join(args.ours_arg)}" if args.ours_arg else "")
    )
    header = (
        "| workload | resnet-rs ms | PyTorch ms | ORT ms | ours/PyTorch | ours/ORT "
        "| resnet-rs MiB | PyTorch MiB | ORT MiB | mem ours/PyTorch |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for workload, r in results.items():
        ours, torch, ort = (r.get(s) for s in ("resnet-rs", "pytorch", "onnxruntime"))

        def ms(side):
            return f"{side['median_ms']:.1f}" if side else "-"

        def mib(side):
            return f"{side['peak_rss_mib']:.0f}" if side else "-"

        def ratio(peer, key="median_ms"):
            return f"{ours[key] / peer[key]:.2f}" if peer else "-"

        print(
            f"| {workload} | {ms(ours)} | {ms(torch)} | {ms(ort)} | {ratio(torch)} | {ratio(ort)} "
            f"| {mib(ours)} | {mib(torch)} | {mib(ort)} | {ratio(torch, 'peak_rss_mib')} |"
        )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
