#!/usr/bin/env python3
"""Times SGD steps of NormKit's harness ConvNet in PyTorch, the way
`normkit train --benchmark-steps N` does: after 5 warm-up steps, N steps on one fixed batch,
one JSON line with examples_per_s.

The network is Models.make(.convnet) in Sources/Training/Models.swift: conv3x3(C→w)-BN-ReLU,
conv3x3(w→2w)-BN-ReLU, max-pool 2, conv3x3(2w→2w)-BN-ReLU, global average pool, linear(2w→10);
convolutions without bias when a normalizer follows. SGD with momentum 0.9 and weight decay 5e-4,
cross-entropy loss. Inputs are random (speed does not depend on the values).

    /work/venv/bin/python bench/train_torch.py --input-shape 1,28,28 --batch-size 32 --threads 1
"""
import argparse
import json
import time

import torch
import torch.nn as nn


def convnet(channels: int, width: int, classes: int, norm: str) -> nn.Module:
    def block(cin, cout):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=(norm == "none"))]
        if norm == "bn":
            layers.append(nn.BatchNorm2d(cout))
        elif norm == "gn":
            layers.append(nn.GroupNorm(min(8, cout), cout))
        layers.append(nn.ReLU())
        return layers

    return nn.Sequential(
        *block(channels, width),
        *block(width, 2 * width),
        nn.MaxPool2d(2),
        *block(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input-shape", default="1,28,28", help="C,H,W")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--normalizer", default="bn", choices=["bn", "gn", "none"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    shape = [int(s) for s in a.input_shape.split(",")]
    model = convnet(shape[0], a.width, 10, a.normalizer)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(a.batch_size, *shape)
    y = torch.randint(0, 10, (a.batch_size,))
    model.train()

    def step():
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(a.warmup):
        step()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    seconds = time.perf_counter() - start
    print(json.dumps({
        "framework": "pytorch " + torch.__version__,
        "model": "convnet",
        "normalizer": a.normalizer,
        "input_shape": shape,
        "batch_size": a.batch_size,
        "threads": a.threads,
        "steps": a.steps,
        "ms_per_step": round(1000 * seconds / a.steps, 3),
        "examples_per_s": round(a.steps * a.batch_size / seconds, 1),
    }))


if __name__ == "__main__":
    main()
