#!/usr/bin/env python3
"""Side-by-side timing of NormKit (`normkit bench`) and PyTorch on the standard shapes.

Run by hand (never by CI), after the release build a user gets, holding the build lock so
that no build competes for the cores:

    swift build -c release
    flock /tmp/normkit-build.lock /work/venv/bin/python bench/compare_torch.py --threads 2 \
        > bench/results/DATE.md

Both sides run in the same invocation, at the same thread count, on the same shapes, in float32,
and both report the best of R repeats after warm-up (the minimum: the least disturbed run on a
shared machine). The default is the issue's standard set (`--set standard`); `--set all` is the
older sweep. Forward is a training-mode call without autograd (the kernel alone); inference
(BatchNorm) uses running statistics; backward is torch.autograd.grad of y against x, weight and
bias with a given dy, after one forward with autograd (so it includes the small autograd
overhead PyTorch users pay). The whitening rows time one training step (forward + backward) of
NormKit's DBN, IterNorm and Switchable Whitening against NormKit's (and PyTorch's) BatchNorm
step on the same tensor.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# The standard set of issue 15: (layer, shape in N,C,H,W order, layout).
STANDARD = (
    [("layernorm", s, "nchw") for s in
     [(8192, 1024), (4096, 4096), (512, 768), (2048, 4096), (16384, 4096)]]
    + [("rmsnorm", s, "nchw") for s in [(8192, 1024), (512, 768)]]
    + [("batchnorm", s, "nchw") for s in
       [(32, 64, 56, 56), (8, 256, 28, 28), (2, 64, 112, 112), (256, 512, 7, 7), (64, 128, 56, 56)]]
    + [("batchnorm", s, "nhwc") for s in [(32, 64, 56, 56), (64, 128, 56, 56)]]
    + [("groupnorm", s, "nchw") for s in [(32, 64, 56, 56), (8, 256, 28, 28), (64, 128, 56, 56)]]
    + [("groupnorm", (32, 64, 56, 56), "nhwc")]
    + [("instancenorm", s, "nchw") for s in [(32, 64, 56, 56), (8, 256, 28, 28)]]
    + [("instancenorm", (32, 64, 56, 56), "nhwc")]
)

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


BYTES = {"forward": 8, "inference": 8, "backward": 12, "step": 20}


def machine():
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return model


def time_torch_step(shape, repeats):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) + 0.5).requires_grad_(True)
    dy = torch.randn(shape, generator=g)
    c = shape[1]
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c)
    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
        torch.autograd.grad(y, [x, w, b], dy)
        t1 = time.perf_counter()
        if i >= 3:
            times.append(t1 - t0)
    return min(times) * 1e3


def standard(args):
    rows = []
    print(f"Machine: {machine()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
          f"{args.threads} thread(s) on both sides, float32, best of {args.repeat} "
          f"(after 3 warm-up calls) on both sides, one run. Command: `{' '.join(sys.argv)}`.\n")
    print("| layer | shape | layout | pass | NormKit ms | PyTorch ms | torch/NormKit | "
          "NormKit GB/s | copy GB/s | fraction |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    layers = set(args.layers.split(","))
    layouts = set(args.layouts.split(","))
    shapes = set(args.shapes.split(",")) if args.shapes else None
    for layer, shape, layout in STANDARD:
        if layer not in layers or layout not in layouts:
            continue
        if shapes is not None and "x".join(map(str, shape)) not in shapes:
            continue
        passes = ["forward", "backward"] + (["inference"] if layer == "batchnorm" else [])
        for pass_ in passes:
            if pass_ not in args.passes.split(","):
                continue
            nk = time_normkit(args.binary, layer, shape, layout, pass_, args.threads, args.repeat)
            _, tm = time_torch(layer, shape, layout, pass_, args.repeat)
            count = 1
            for d in shape:
                count *= d
            gbps = count * BYTES[pass_] / (nk["min_ms"] * 1e-3) / 1e9
            ratio = tm / nk["min_ms"]
            rows.append((layer, shape, layout, pass_, ratio, gbps / nk["bandwidth_gbps"], count))
            print(f"| {layer} | {'x'.join(map(str, shape))} | {layout} | {pass_} | "
                  f"{nk['min_ms']:.3f} | {tm:.3f} | {ratio:.2f}x | {gbps:.1f} | "
                  f"{nk['bandwidth_gbps']:.1f} | {gbps / nk['bandwidth_gbps']:.2f} |", flush=True)
    ratios = [r[4] for r in rows]
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    worst = min(rows, key=lambda r: r[4])
    print(f"\nGeometric mean torch/NormKit over {len(rows)} passes: {geo:.2f}; worst "
          f"{worst[4]:.2f} ({worst[0]} {'x'.join(map(str, worst[1]))} {worst[2]} {worst[3]}); "
          f"passes slower than PyTorch by more than 5%: "
          f"{sum(1 for r in ratios if r < 0.95)}.")
    big = [r for r in rows if r[6] * 4 >= 64 << 20]
    if big:
        print("Bandwidth fraction on tensors of 64 MiB or more: "
              + ", ".join(f"{r[0]} {'x'.join(map(str, r[1]))} {r[2]} {r[3]} {r[5]:.2f}"
                          for r in big)
              + ".")
    if args.no_whitening:
        return
    # Whitening: one training step against BatchNorm's, same tensor, same run.
    shape = (32, 64, 28, 28)
    print(f"\n| step on {'x'.join(map(str, shape))}, groups of 16 | NormKit ms | × NormKit BN "
          "| × PyTorch BN |")
    print("|---|---|---|---|")
    torch_bn = time_torch_step(shape, args.repeat)
    base = None
    for layer in ["batchnorm", "dbn", "iternorm", "switchwhiten"]:
        extra = ["--group-size", "16"] if layer != "batchnorm" else []
        out = subprocess.run(
            [args.binary, "bench", layer, "--shape", ",".join(map(str, shape)), "--pass", "step",
             "--threads", str(args.threads), "--repeat", str(args.repeat), "--json"] + extra,
            check=True, capture_output=True, text=True).stdout
        ms = json.loads(out)["min_ms"]
        base = base or ms
        print(f"| {layer} | {ms:.3f} | {ms / base:.1f} | {ms / torch_bn:.1f} |", flush=True)
    print(f"| PyTorch batchnorm | {torch_bn:.3f} | | 1.0 |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--binary", default=".build/release/normkit")
    ap.add_argument("--layers", default=",".join(SHAPES))
    ap.add_argument("--passes", default="forward,inference,backward,residual")
    ap.add_argument("--set", choices=["standard", "all"], default="standard")
    ap.add_argument("--layouts", default="nchw,nhwc", help="standard set: layouts to run")
    ap.add_argument("--shapes", default="",
                    help="standard set: only these shapes, e.g. 8x256x28x28,512x768")
    ap.add_argument("--no-whitening", action="store_true",
                    help="standard set: skip the whitening step table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.set == "standard":
        return standard(args)
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
