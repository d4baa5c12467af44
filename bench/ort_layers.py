"""ONNX Runtime's time per convolution shape, to set beside `conv_layers` (resnet-rs's).

Usage (from the repository root, after `bench/side_by_side.py` exported the model once):
  python bench/ort_layers.py [--model target/bench-onnx/resnet50.onnx] [--batch-size 8]
                             [--threads 2] [--warmup 3] [--iters 10]

Runs the session as `bench/peer_infer.py onnx` does (same options), with ONNX Runtime's
profiler on for the timed passes, then prints, per operator and shape (weight shape, input and
output sizes), how many nodes the optimized graph runs, the median time of one such node and
their sum per pass. ONNX Runtime fuses each Conv with its ReLU and residual Add and runs them
in its NCHWc layout, so its node names do not match the model's; the shapes do. The profile
JSON is written to a temporary directory and removed.
"""

import argparse
import collections
import json
import os
import statistics
import tempfile


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_dir = os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "bench-onnx")
    parser.add_argument("--model", default=os.path.join(default_dir, "resnet50.onnx"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    if not os.path.exists(args.model):
        raise SystemExit(
            f"{args.model}: no such model (bench/side_by_side.py exports it, or "
            "`python bench/peer_infer.py export --arch resnet50 --out FILE`)"
        )

    import numpy as np
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        size = (args.batch_size, 3, args.image_size, args.image_size)
        x = rng.standard_normal(size, np.float32)
        name = session.get_inputs()[0].name
        for _ in range(args.warmup + args.iters):
            session.run(None, {name: x})
        with open(session.end_profiling()) as f:
            events = json.load(f)

    def spatial(shape):
        return "x".join(map(str, shape[2:])) if shape and len(shape) > 2 else "-"

    # Every node's kernel time per pass; the warm-up passes are the first `warmup` of each.
    per_node = collections.defaultdict(list)
    shapes = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        per_node[event["name"]].append(event["dur"] / 1000.0)
        extra = event["args"]
        inputs = [list(d.values())[0] for d in extra.get("input_type_shape", [])]
        outputs = [list(d.values())[0] for d in extra.get("output_type_shape", [])]
        weight = inputs[1] if len(inputs) > 1 else None
        shapes[event["name"]] = (
            extra.get("op_name", "?"),
            str(weight),
            spatial(inputs[0] if inputs else None),
            spatial(outputs[0] if outputs else None),
        )

    rows = collections.defaultdict(list)
    for node, times in per_node.items():
        rows[shapes[node]].append(statistics.median(times[args.warmup :] or times))
    total = sum(sum(times) for times in rows.values())
    print(
        f"onnxruntime {ort.__version__}, {os.path.basename(args.model)}, batch {args.batch_size}, "
        f"{args.threads} threads, median node times over {args.iters} passes"
    )
    print(f"{'op':<14} {'weight':<22} {'in':>9} {'out':>9} {'n':>3} {'ms each':>8} {'ms':>8}")
    for (op, weight, inp, out), times in sorted(rows.items(), key=lambda kv: -sum(kv[1])):
        each = statistics.median(times)
        print(f"{op:<14} {weight:<22} {inp:>9} {out:>9} {len(times):>3} {each:>8.2f} {sum(times):>8.2f}")
    print(f"sum over the nodes: {total:.1f} ms per pass")


if __name__ == "__main__":
    main()
