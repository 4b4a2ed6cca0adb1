#!/usr/bin/env python3
"""Side-by-side timing of NormKit (`normkit bench`) and PyTorch on the standard shapes.

Run by hand (never by CI), after a release build:

    swift build -c release -Xswiftc -target-cpu -Xswiftc x86-64-v3
    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
    /tmp/torchenv/bin/python bench/compare_torch.py --threads 2 > bench/results.md

Both sides run in the same invocation, at the same thread count, on the same shapes, in float32.
PyTorch is timed the same way as `normkit bench`: warm-up, then R repeats, median and minimum.
Forward is a training-mode call without autograd (the kernel alone); residual is h = x + r
followed by the normalization (PyTorch has no fused CPU kernel for it); backward is
torch.autograd.grad of y against x, weight and bias with a given dy, after one forward with
autograd (so it includes the small autograd overhead PyTorch users pay).
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {
    "layernorm": [(8192, 1024), (4096, 4096), (512, 768)],
    "rmsnorm": [(8192, 1024), (4096, 4096), (512, 768)],
    "batchnorm": [(32, 64, 56, 56), (8, 256, 28, 28), (2, 64, 112, 112), (256, 512, 7, 7)],
    "groupnorm": [(32, 64, 56, 56), (8, 256, 28, 28), (2, 64, 112, 112), (256, 512, 7, 7)],
    "instancenorm": [(32, 64, 56, 56), (8, 256, 28, 28), (2, 64, 112, 112), (256, 512, 7, 7)],
    # The LLM-era layers (issue 13): DyT and the fused residual add + RMSNorm, whose NormKit
    # forward is the fused kernel (PyTorch eager: h = x + r, then F.rms_norm).
    "dyt": [(4096, 4096), (8192, 1024)],
    "addrmsnorm": [(4096, 4096), (8192, 1024)],
}
ROW_LAYERS = ("layernorm", "rmsnorm", "dyt", "addrmsnorm")


def torch_call(layer, x, params, training):
    w, b = params.get("weight"), params.get("bias")
    if layer == "batchnorm":
        rm, rv = params["running_mean"], params["running_var"]
        return F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5)
    if layer == "instancenorm":
        return F.instance_norm(x, weight=w, bias=b, eps=1e-5)
    if layer == "groupnorm":
        return F.group_norm(x, 32, w, b, 1e-5)
    if layer == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
    if layer == "rmsnorm":
        return F.rms_norm(x, (x.shape[-1],), w, None)
    if layer == "dyt":  # DynamicTanh, channels-last
        return torch.tanh(params["alpha"] * x) * w + b
    if layer == "addrmsnorm":
        return F.rms_norm(x + params["residual"], (x.shape[-1],), w, 1e-6)
    raise ValueError(layer)


def time_torch(layer, shape, layout, pass_, repeats):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) + 0.5
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1] if layer not in ROW_LAYERS else shape[-1]
    params = {"weight": torch.ones(c, requires_grad=True)}
    if layer not in ("rmsnorm", "addrmsnorm"):
        params["bias"] = torch.zeros(c, requires_grad=True)
    if layer == "dyt":
        params["alpha"] = torch.full((1,), 0.5, requires_grad=True)
    if layer == "addrmsnorm":
        params["residual"] = torch.randn(shape, generator=g).requires_grad_(True)
    if layer == "batchnorm":
        params["running_mean"] = torch.zeros(c)
        params["running_var"] = torch.ones(c)
    dy = torch.randn(shape, generator=g)
    if layout == "nhwc":
        dy = dy.contiguous(memory_format=torch.channels_last)

    if pass_ == "residual":
        r = dy

        def step():
            with torch.no_grad():
                h = x + r
                torch_call(layer, h, params, True)
    elif pass_ == "backward":
        xg = x.clone().requires_grad_(True)
        y = torch_call(layer, xg, params, True)
        inputs = [xg] + [p for k, p in params.items() if k in ("weight", "bias", "alpha", "residual")]

        def step():
            torch.autograd.grad(y, inputs, dy, retain_graph=True)
    else:
        training = pass_ == "forward"

        def step():
            with torch.no_grad():
                torch_call(layer, x, params, training)

    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        if i >= 3:
            times.append(t1 - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def time_normkit(binary, layer, shape, layout, pass_, threads, repeats):
    args = [binary, "bench", layer, "--shape", ",".join(map(str, shape)), "--layout", layout,
            "--pass", pass_, "--threads", str(threads), "--repeat", str(repeats), "--json"]
    if layer in ("layernorm", "rmsnorm"):
        args += ["--normalized-dims", "1"]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--binary", default=".build/release/normkit")
    ap.add_argument("--layers", default=",".join(SHAPES))
    ap.add_argument("--passes", default="forward,inference,backward,residual")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, {args.repeat} repeats; "
          f"times in ms (median); fraction = NormKit effective bandwidth / copy bandwidth\n")
    print("| layer | shape | layout | pass | NormKit ms | PyTorch ms | speed-up | NormKit GB/s | "
          "copy GB/s | fraction |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for layer in args.layers.split(","):
        layouts = ["nchw", "nhwc"] if layer in ("batchnorm", "groupnorm", "instancenorm") else ["nchw"]
        for shape in SHAPES[layer]:
            for layout in layouts:
                for pass_ in args.passes.split(","):
                    if pass_ == "inference" and layer not in ("batchnorm",):
                        continue  # identical to training forward for layers without running stats
                    if pass_ == "residual" and layer not in ("layernorm", "rmsnorm"):
                        continue  # the fused residual add is a transformer (row) kernel
                    nk = time_normkit(args.binary, layer, shape, layout, pass_, args.threads, args.repeat)
                    tm, _ = time_torch(layer, shape, layout, pass_, args.repeat)
                    print(f"| {layer} | {'x'.join(map(str, shape))} | {layout} | {pass_} | "
                          f"{nk['median_ms']:.3f} | {tm:.3f} | {tm / nk['median_ms']:.2f}x | "
                          f"{nk['effective_gbps']:.1f} | {nk['bandwidth_gbps']:.1f} | "
                          f"{nk['bandwidth_fraction']:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
