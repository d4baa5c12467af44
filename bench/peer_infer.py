"""Peer side of `bench/side_by_side.py`: eval-mode inference of a torchvision ResNet.

Usage:
  python bench/peer_infer.py torch --arch resnet50 --batch-size 8 [--iters N --warmup N --threads 2]
  python bench/peer_infer.py export --arch resnet50 --out resnet50.onnx
  python bench/peer_infer.py onnx --model resnet50.onnx --batch-size 8 [--iters N --warmup N --threads 2]

`torch`: torchvision's model with its default (random) initialization, `model.eval()`,
`torch.inference_mode()`, float32, `torch.set_num_threads(threads)`. Times `model(x)` (the logits
are already on the host), after warm-up.

`export`: writes the same model to ONNX with `torch.onnx.export` (eval mode, the torch.export
based exporter, a dynamic batch axis). The exporter folds each BatchNorm into the preceding Conv
(checked: the graph has no BatchNormalization node) and ONNX Runtime fuses Conv+ReLU(+Add) when it
loads the model (graph optimization level ALL).

`onnx`: ONNX Runtime's CPU execution provider, `intra_op_num_threads=threads`, one inter-op
thread, sequential execution, all graph optimizations. Imports neither torch nor torchvision, so
its peak memory is ONNX Runtime's own. Times `session.run` after warm-up.

`torch` and `onnx` print one JSON line: {"median_ms", "min_ms", "max_ms", "iters", "threads",
"runtime", "version"}. Inputs are standard-normal noise: speed does not depend on the values.
"""

import argparse
import json
import statistics
import time


def timed(run, warmup, iters):
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def report(times, runtime, version, threads):
    print(
        json.dumps(
            {
                "median_ms": statistics.median(times),
                "min_ms": min(times),
                "max_ms": max(times),
                "iters": len(times),
                "threads": threads,
                "runtime": runtime,
                "version": version,
            }
        )
    )


def build_torchvision(arch):
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    return model.eval()


def run_torch(args):
    import torch

    torch.set_num_threads(args.threads)
    model = build_torchvision(args.arch)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)

    def run():
        with torch.inference_mode():
            return model(x)

    times = timed(run, args.warmup, args.iters)
    report(times, "pytorch", torch.__version__, torch.get_num_threads())


def export(args):
    import torch

    model = build_torchvision(args.arch)
    x = torch.randn(1, 3, args.image_size, args.image_size)
    # The torch.export-based exporter (the default since PyTorch 2.9) folds each eval-mode
    # BatchNorm into the preceding Conv's weight and bias; the graph has no BatchNormalization.
    torch.onnx.export(
        model,
        (x,),
        args.out,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        dynamo=True,
    )
    import onnx

    ops = {node.op_type for node in onnx.load(args.out).graph.node}
    if "BatchNormalization" in ops:
        raise SystemExit(f"{args.out}: the exporter left BatchNormalization nodes")


def run_onnx(args):
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch_size, 3, args.image_size, args.image_size), np.float32)

    def run():
        return session.run(None, {"input": x})

    times = timed(run, args.warmup, args.iters)
    report(times, "onnxruntime", ort.__version__, args.threads)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("torch", "export", "onnx"):
        p = sub.add_parser(name)
        p.add_argument("--image-size", type=int, default=224)
        if name in ("torch", "export"):
            p.add_argument("--arch", default="resnet50")
        if name == "export":
            p.add_argument("--out", required=True)
        else:
            p.add_argument("--batch-size", type=int, default=8)
            p.add_argument("--iters", type=int, default=10)
            p.add_argument("--warmup", type=int, default=3)
            p.add_argument("--threads", type=int, default=2)
        if name == "onnx":
            p.add_argument("--model", required=True)
    args = parser.parse_args()
    {"torch": run_torch, "export": export, "onnx": run_onnx}[args.command](args)


if __name__ == "__main__":
    main()
