"""Prints what PyTorch's BatchNorm module does with an empty batch (N = 0).

The empty-batch tests (Tests/NormalizationTests/EmptyBatchTests.swift) expect this behaviour
from every NormKit normalizer: an empty output of the input's shape, running statistics
untouched, num_batches_tracked counted in training only, an empty dx and zero parameter
gradients. Run: /work/venv/bin/python Tools/empty_batch_pytorch.py
"""

import torch

print("torch", torch.__version__)
for training in (True, False):
    bn = torch.nn.BatchNorm2d(3).double()
    bn.train(training)
    with torch.no_grad():
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.0)
    x = torch.zeros(0, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    y = bn(x)
    y.sum().backward()
    print(
        "training" if training else "eval",
        "output", tuple(y.shape),
        "num_batches_tracked", bn.num_batches_tracked.item(),
        "running_mean", bn.running_mean.tolist(),
        "running_var", bn.running_var.tolist(),
        "dx", tuple(x.grad.shape),
        "dweight", bn.weight.grad.tolist(),
        "dbias", bn.bias.grad.tolist(),
    )
