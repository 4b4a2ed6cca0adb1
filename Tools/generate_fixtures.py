#!/usr/bin/env python3
"""Generate NormKit's golden fixtures from PyTorch in float64.

Run by hand, never at test time:

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
    /tmp/torchenv/bin/python Tools/generate_fixtures.py Tests/Fixtures

Each case is one safetensors file, Tests/Fixtures/<layer>/<case>.safetensors. Its
__metadata__ records the generator, the torch version, the seed and the layer's configuration;
its tensors are:

    x.0 … x.{k-1}   earlier training batches (k = metadata "steps"), applied in order
    x, dy           the final call's input and output gradient
    y, dx           PyTorch's output and input gradient of L = sum(y * dy)
    dweight, dbias  parameter gradients (affine layers only)
    weight, bias    parameters (affine layers only)
    running_mean.in, running_var.in, num_batches_tracked.in     buffers before the first call
    running_mean.out, running_var.out, num_batches_tracked.out  buffers after the last call

Every input value is rounded to float32 first, so the Swift Float path sees exactly the values
PyTorch saw and the comparison measures computation only. Channels-last cases store x, dy, y
and dx permuted to [N, spatial..., C]; PyTorch computes on the channels-first view.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

torch.set_default_dtype(torch.float64)
GENERATOR = "Tools/generate_fixtures.py"


def f32(t):
    """Round to float32 and back, so both precisions start from identical inputs."""
    return t.float().double()


def to_last(t):
    """[N, C, S...] -> [N, S..., C]."""
    if t.dim() < 3:
        return t
    return t.permute(0, *range(2, t.dim()), 1).contiguous()


def make_module(spec, shape):
    layer = spec["layer"]
    eps = spec.get("eps", 1e-5)
    momentum = spec.get("momentum", 0.1)
    affine = spec.get("affine", True)
    c = shape[1] if len(shape) >= 2 else None
    if layer == "batchnorm":
        return nn.BatchNorm1d(c, eps=eps, momentum=momentum, affine=affine,
                              track_running_stats=spec.get("track", True))
    if layer == "instancenorm":
        return nn.InstanceNorm1d(c, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=spec.get("track", False))
    if layer == "groupnorm":
        return nn.GroupNorm(spec["groups"], c, eps=eps, affine=affine)
    k = spec.get("normalized_dims", 1)
    if layer == "layernorm":
        return nn.LayerNorm(list(shape[-k:]), eps=eps, elementwise_affine=affine)
    if layer == "rmsnorm":
        return nn.RMSNorm(list(shape[-k:]), eps=spec.get("eps"), elementwise_affine=affine)
    if layer == "layernorm2d":
        return nn.LayerNorm([c], eps=eps, elementwise_affine=affine)
    raise ValueError(layer)


def call(module, spec, x):
    """Apply the module to a channels-first x, the way NormKit's layer is defined."""
    layer = spec["layer"]
    if layer in ("batchnorm", "instancenorm"):
        # BatchNorm1d/InstanceNorm1d accept any rank once the spatial axes are flattened;
        # the math does not depend on how the spatial axes are shaped.
        n, c = x.shape[0], x.shape[1]
        flat = x.reshape(n, c, -1) if x.dim() > 2 else x
        if layer == "instancenorm" and x.dim() == 2:
            raise ValueError("InstanceNorm needs a spatial axis")
        return module(flat).reshape(x.shape)
    if layer == "layernorm2d":
        return module(to_last(x)).permute(0, x.dim() - 1, *range(1, x.dim() - 1))
    return module(x)


def generate(spec, out_dir):
    seed = spec["seed"]
    g = torch.Generator().manual_seed(seed)
    shape = spec["shape"]  # channels-first
    steps = spec.get("steps", 0)
    offset = spec.get("offset", 0.0)
    scale = 0.05 if offset else 1.0

    def data():
        return f32(offset + scale * torch.randn(shape, generator=g))

    module = make_module(spec, shape)
    tensors = {}
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(f32(1 + 0.5 * torch.randn(module.weight.shape, generator=g)))
            tensors["weight"] = module.weight.detach().clone()
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(f32(0.5 * torch.randn(module.bias.shape, generator=g)))
            tensors["bias"] = module.bias.detach().clone()
        tracked = getattr(module, "running_mean", None) is not None
        if tracked:
            if spec.get("random_running", True):
                module.running_mean.copy_(f32(torch.randn(module.running_mean.shape, generator=g)))
                module.running_var.copy_(f32(0.5 + torch.rand(module.running_var.shape, generator=g)))
            if offset:
                module.running_mean.add_(offset)
                module.running_var.mul_(scale * scale)
            tensors["running_mean.in"] = module.running_mean.clone()
            tensors["running_var.in"] = module.running_var.clone()
            tensors["num_batches_tracked.in"] = module.num_batches_tracked.clone()

    layout_last = spec.get("layout", "nchw") == "nhwc"
    store = to_last if layout_last else (lambda t: t)
    module.train()
    for k in range(steps):
        xk = data()
        with torch.no_grad():
            call(module, spec, xk)
        tensors[f"x.{k}"] = store(xk)

    x = data().requires_grad_(True)
    dy = f32(torch.randn(shape, generator=g))
    if spec.get("mode", "train") == "eval":
        module.eval()
    y = call(module, spec, x)
    (y * dy).sum().backward()
    tensors["x"] = store(x.detach())
    tensors["dy"] = store(dy)
    tensors["y"] = store(y.detach())
    tensors["dx"] = store(x.grad)
    if getattr(module, "weight", None) is not None:
        tensors["dweight"] = module.weight.grad.clone()
    if getattr(module, "bias", None) is not None and module.bias.grad is not None:
        tensors["dbias"] = module.bias.grad.clone()
    if tracked:
        tensors["running_mean.out"] = module.running_mean.clone()
        tensors["running_var.out"] = module.running_var.clone()
        tensors["num_batches_tracked.out"] = module.num_batches_tracked.clone()

    meta = {
        "generator": GENERATOR,
        "torch": torch.__version__,
        "command": "python Tools/generate_fixtures.py Tests/Fixtures",
        "spec": json.dumps(spec, sort_keys=True),
    }
    path = os.path.join(out_dir, spec["layer"], spec["name"] + ".safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_safetensors(path, {k: v.detach().contiguous() for k, v in tensors.items()}, meta)


def write_safetensors(path, tensors, metadata):
    """A minimal safetensors writer (so the generator needs only torch)."""
    dtypes = {torch.float64: "F64", torch.float32: "F32", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        raw = t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for raw in blobs:
            f.write(raw)


def cases():
    out = []

    def add(layer, name, **kw):
        kw.update(layer=layer, name=name, seed=len(out) + 1)
        out.append(kw)

    # BatchNorm: ranks 2-5, odd sizes, offset data, eval, several steps, both momentum modes, NHWC.
    add("batchnorm", "rank2_train", shape=[5, 3])
    add("batchnorm", "rank2_n2", shape=[2, 7])
    add("batchnorm", "rank3_odd", shape=[3, 7, 17])
    add("batchnorm", "rank3_c1", shape=[4, 1, 3])
    add("batchnorm", "rank4_train", shape=[2, 3, 4, 5])
    add("batchnorm", "rank4_n1", shape=[1, 3, 3, 7])
    add("batchnorm", "rank5_train", shape=[2, 3, 2, 3, 2])
    add("batchnorm", "rank4_offset", shape=[4, 3, 5, 5], offset=1000.0)
    add("batchnorm", "rank2_offset", shape=[17, 3], offset=1000.0)
    add("batchnorm", "rank4_eval", shape=[2, 3, 3, 3], mode="eval", steps=3)
    add("batchnorm", "rank2_eval_initial", shape=[3, 4], mode="eval")
    add("batchnorm", "rank4_steps3", shape=[3, 2, 3, 3], steps=3)
    add("batchnorm", "rank3_cumulative", shape=[3, 4, 5], steps=3, momentum=None)
    add("batchnorm", "rank4_cumulative_eval", shape=[2, 3, 2, 2], steps=2, momentum=None, mode="eval")
    add("batchnorm", "rank4_momentum03", shape=[2, 3, 3, 2], steps=2, momentum=0.3)
    add("batchnorm", "rank4_nhwc", shape=[2, 5, 3, 4], layout="nhwc", steps=1)
    add("batchnorm", "rank5_nhwc_eval", shape=[2, 3, 2, 2, 3], layout="nhwc", steps=2, mode="eval")
    add("batchnorm", "rank3_nhwc_offset", shape=[3, 4, 7], layout="nhwc", offset=1000.0)
    add("batchnorm", "rank4_noaffine", shape=[2, 3, 3, 3], affine=False, steps=1)
    add("batchnorm", "rank4_untracked_eval", shape=[3, 2, 3, 3], track=False, mode="eval")
    add("batchnorm", "rank4_eps1e-3", shape=[2, 3, 3, 3], eps=1e-3)
    add("batchnorm", "rank4_offset_eval", shape=[2, 3, 4, 4], offset=1000.0, steps=2, mode="eval")

    # LayerNorm: normalized over the last K dims.
    add("layernorm", "rank2_k1", shape=[5, 7], normalized_dims=1)
    add("layernorm", "rank2_k2", shape=[3, 17], normalized_dims=2)
    add("layernorm", "rank3_k1", shape=[2, 3, 17], normalized_dims=1)
    add("layernorm", "rank3_k2", shape=[2, 3, 7], normalized_dims=2)
    add("layernorm", "rank4_k3", shape=[2, 3, 4, 5], normalized_dims=3)
    add("layernorm", "rank4_k1", shape=[2, 3, 4, 5], normalized_dims=1)
    add("layernorm", "rank5_k2", shape=[2, 2, 3, 2, 3], normalized_dims=2)
    add("layernorm", "rank2_d1", shape=[4, 1], normalized_dims=1)
    add("layernorm", "rank2_d3", shape=[1, 3], normalized_dims=1)
    add("layernorm", "rank3_offset", shape=[2, 3, 63], normalized_dims=1, offset=1000.0)
    add("layernorm", "rank4_offset_k3", shape=[2, 3, 3, 3], normalized_dims=3, offset=1000.0)
    add("layernorm", "rank2_offset", shape=[3, 65], normalized_dims=1, offset=1000.0)
    add("layernorm", "rank3_eval", shape=[2, 4, 7], normalized_dims=1, mode="eval")
    add("layernorm", "rank3_noaffine", shape=[2, 3, 7], normalized_dims=1, affine=False)
    add("layernorm", "rank2_eps1e-3", shape=[4, 9], normalized_dims=1, eps=1e-3)
    add("layernorm", "rank3_k3_full", shape=[1, 3, 7], normalized_dims=3)
    add("layernorm", "rank2_wide", shape=[2, 1000], normalized_dims=1)
    add("layernorm", "rank4_k2", shape=[3, 2, 3, 4], normalized_dims=2)
    add("layernorm", "rank5_k4", shape=[2, 2, 2, 3, 2], normalized_dims=4)
    add("layernorm", "rank3_steps_ignored", shape=[2, 3, 5], normalized_dims=1, steps=2)

    # LayerNorm over the channel axis ("LayerNorm2d").
    add("layernorm2d", "rank4", shape=[2, 5, 3, 3])
    add("layernorm2d", "rank3", shape=[3, 7, 4])
    add("layernorm2d", "rank5", shape=[2, 3, 2, 2, 3])
    add("layernorm2d", "rank4_offset", shape=[2, 4, 3, 3], offset=1000.0)
    add("layernorm2d", "rank4_nhwc", shape=[2, 3, 4, 2], layout="nhwc")
    add("layernorm2d", "rank4_noaffine", shape=[2, 3, 2, 2], affine=False)
    add("layernorm2d", "rank2", shape=[4, 17])
    add("layernorm2d", "rank4_eps1e-6", shape=[2, 3, 3, 3], eps=1e-6)

    # InstanceNorm: optional affine, optional running statistics.
    add("instancenorm", "rank3_default", shape=[2, 3, 7], affine=False)
    add("instancenorm", "rank4_default", shape=[2, 3, 4, 5], affine=False)
    add("instancenorm", "rank5_default", shape=[2, 2, 2, 3, 3], affine=False)
    add("instancenorm", "rank3_l2", shape=[3, 2, 2], affine=False)
    add("instancenorm", "rank4_affine", shape=[2, 3, 3, 3], affine=True)
    add("instancenorm", "rank3_affine_odd", shape=[1, 7, 17], affine=True)
    add("instancenorm", "rank4_offset", shape=[2, 3, 5, 5], affine=True, offset=1000.0)
    add("instancenorm", "rank3_offset", shape=[3, 2, 63], affine=False, offset=1000.0)
    add("instancenorm", "rank4_tracked", shape=[2, 3, 3, 3], affine=True, track=True, steps=2)
    add("instancenorm", "rank4_tracked_eval", shape=[2, 3, 3, 3], affine=True, track=True, steps=2, mode="eval")
    # PyTorch's InstanceNorm passes momentum=None on as 0 (running statistics never move), unlike
    # BatchNorm's cumulative average; NormKit's `.cumulative` averages, so no such case here.
    add("instancenorm", "rank3_tracked_steps3", shape=[3, 2, 5], affine=False, track=True, steps=3)
    add("instancenorm", "rank4_tracked_momentum02_eval", shape=[2, 2, 3, 3], affine=True, track=True, steps=2,
        momentum=0.2, mode="eval")
    add("instancenorm", "rank4_untracked_eval", shape=[2, 3, 3, 3], affine=True, mode="eval")
    add("instancenorm", "rank4_nhwc", shape=[2, 3, 4, 5], affine=True, layout="nhwc")
    add("instancenorm", "rank5_nhwc_tracked", shape=[2, 3, 2, 2, 2], affine=True, track=True, steps=1,
        layout="nhwc")
    add("instancenorm", "rank4_nhwc_eval", shape=[2, 2, 3, 3], affine=True, track=True, steps=2, layout="nhwc",
        mode="eval")
    add("instancenorm", "rank3_n1", shape=[1, 3, 7], affine=True)
    add("instancenorm", "rank4_eps1e-3", shape=[2, 3, 3, 3], affine=True, eps=1e-3)
    add("instancenorm", "rank4_momentum05", shape=[2, 3, 3, 3], affine=False, track=True, steps=2, momentum=0.5)
    add("instancenorm", "rank3_tracked_offset", shape=[2, 3, 17], affine=True, track=True, steps=2,
        offset=1000.0)

    # GroupNorm: groups dividing channels, G = 1 and G = C, ranks 2-5, NHWC.
    add("groupnorm", "rank4_g2", shape=[2, 4, 3, 3], groups=2)
    add("groupnorm", "rank4_g1", shape=[2, 6, 3, 3], groups=1)
    add("groupnorm", "rank4_gc", shape=[2, 6, 3, 3], groups=6)
    add("groupnorm", "rank3_g3", shape=[3, 9, 7], groups=3)
    add("groupnorm", "rank2_g2", shape=[3, 6], groups=2)
    add("groupnorm", "rank2_gc", shape=[5, 3], groups=3)
    add("groupnorm", "rank5_g2", shape=[2, 4, 2, 2, 3], groups=2)
    add("groupnorm", "rank4_n1", shape=[1, 6, 3, 3], groups=3)
    add("groupnorm", "rank4_odd", shape=[2, 7, 3, 17], groups=7)
    add("groupnorm", "rank4_offset", shape=[2, 4, 5, 5], groups=2, offset=1000.0)
    add("groupnorm", "rank3_offset_g1", shape=[2, 3, 63], groups=1, offset=1000.0)
    add("groupnorm", "rank4_eval", shape=[2, 4, 3, 3], groups=2, mode="eval")
    add("groupnorm", "rank4_noaffine", shape=[2, 4, 3, 3], groups=4, affine=False)
    add("groupnorm", "rank4_nhwc", shape=[2, 6, 3, 4], groups=3, layout="nhwc")
    add("groupnorm", "rank5_nhwc", shape=[2, 4, 2, 3, 2], groups=2, layout="nhwc")
    add("groupnorm", "rank3_nhwc_offset", shape=[2, 6, 7], groups=2, layout="nhwc", offset=1000.0)
    add("groupnorm", "rank4_eps1e-3", shape=[2, 4, 3, 3], groups=2, eps=1e-3)
    add("groupnorm", "rank4_g32", shape=[2, 64, 2, 2], groups=32)
    add("groupnorm", "rank4_spatial1", shape=[3, 4, 1, 1], groups=2)
    add("groupnorm", "rank3_steps_ignored", shape=[2, 4, 5], groups=2, steps=2)

    # RMSNorm: eps None (machine epsilon of float64) or given.
    add("rmsnorm", "rank2_k1", shape=[5, 7], normalized_dims=1)
    add("rmsnorm", "rank3_k1", shape=[2, 3, 17], normalized_dims=1)
    add("rmsnorm", "rank3_k2", shape=[2, 3, 7], normalized_dims=2)
    add("rmsnorm", "rank4_k3", shape=[2, 3, 4, 5], normalized_dims=3)
    add("rmsnorm", "rank5_k2", shape=[2, 2, 3, 2, 3], normalized_dims=2)
    add("rmsnorm", "rank2_d1", shape=[4, 1], normalized_dims=1)
    add("rmsnorm", "rank2_eps1e-6", shape=[3, 9], normalized_dims=1, eps=1e-6)
    add("rmsnorm", "rank3_eps1e-5", shape=[2, 3, 63], normalized_dims=1, eps=1e-5)
    add("rmsnorm", "rank3_offset", shape=[2, 3, 65], normalized_dims=1, offset=1000.0)
    add("rmsnorm", "rank2_offset", shape=[3, 17], normalized_dims=1, offset=1000.0, eps=1e-6)
    add("rmsnorm", "rank3_noaffine", shape=[2, 3, 7], normalized_dims=1, affine=False)
    add("rmsnorm", "rank3_eval", shape=[2, 4, 7], normalized_dims=1, mode="eval")
    add("rmsnorm", "rank2_wide", shape=[2, 1000], normalized_dims=1)
    add("rmsnorm", "rank4_k1", shape=[2, 3, 4, 5], normalized_dims=1)
    add("rmsnorm", "rank4_k2", shape=[3, 2, 3, 4], normalized_dims=2)
    add("rmsnorm", "rank5_k4", shape=[2, 2, 2, 3, 2], normalized_dims=4)
    add("rmsnorm", "rank3_k3_full", shape=[1, 3, 7], normalized_dims=3)
    add("rmsnorm", "rank2_n1", shape=[1, 3], normalized_dims=1)
    add("rmsnorm", "rank3_small_values", shape=[2, 3, 5], normalized_dims=1, offset=1e-3)
    add("rmsnorm", "rank2_eps1e-3", shape=[4, 9], normalized_dims=1, eps=1e-3)
    return out


def write_npy_samples(out_dir):
    """.npy files written by NumPy itself, to test the reader against the real writer."""
    import numpy as np
    from numpy.lib import format as npf

    folder = os.path.join(out_dir, "npy")
    os.makedirs(folder, exist_ok=True)
    values = np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 8 - 1

    def save(name, array, version=None):
        with open(os.path.join(folder, name), "wb") as f:
            npf.write_array(f, array, version=version)

    save("f4_v1.npy", values.astype("<f4"), (1, 0))
    save("f8_v1.npy", values.astype("<f8"), (1, 0))
    save("f8_v2.npy", values.astype("<f8"), (2, 0))
    save("f4_v3.npy", values.astype("<f4"), (3, 0))
    save("scalar.npy", np.array(2.5, dtype="<f8"), (1, 0))
    save("empty.npy", np.zeros((0, 3), dtype="<f4"), (1, 0))
    save("vector.npy", np.array([1.5, -2.0, 3.25], dtype="<f4"), (1, 0))
    save("big_endian.npy", values.astype(">f4"), (1, 0))
    save("int32.npy", values.astype("<i4"), (1, 0))
    save("fortran.npy", np.asfortranarray(values[0]), (1, 0))
    save("float16.npy", values.astype("<f2"), (1, 0))


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "Tests/Fixtures"
    write_npy_samples(out_dir)
    specs = cases()
    for spec in specs:
        generate(spec, out_dir)
    print(f"wrote {len(specs)} fixtures to {out_dir} with torch {torch.__version__}")


if __name__ == "__main__":
    main()
