"""PyTorch side of `cargo xtask bench-train`: one SGD training step of a CIFAR-stem ResNet-18.

Usage: python bench/train_step.py [--steps N] [--warmup N] [--batch-size 64] [--threads 2]

Builds torchvision's resnet18(num_classes=10) with the CIFAR stem (3x3 stride-1 conv1, no
max-pool), SGD (lr 0.05, momentum 0.9, weight decay 5e-4), random 32x32 inputs, and times
forward + backward + optimizer step (reading the loss back), after warm-up. Prints one JSON line:
{"median_ms": ..., "images_per_second": ..., "torch": version, "threads": n}.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torchvision


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.train()
    optim = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))

    def step():
        start = time.perf_counter()
        optim.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optim.step()
        loss.item()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    median = statistics.median(times)
    print(
        json.dumps(
            {
                "median_ms": median * 1e3,
                "images_per_second": args.batch_size / median,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
