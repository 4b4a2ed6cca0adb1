#!/usr/bin/env python3
"""Random cross-check of `normkit apply` against PyTorch (run by hand, never by CI).

    swift build -c release
    /tmp/torchenv/bin/python Tools/crosscheck_apply.py --cases 200

Draws random layers, ranks, odd sizes, offsets, train/eval, momentum modes, layouts and dtypes;
writes inputs and PyTorch state_dicts, runs `normkit apply`, and compares y, dx, parameter
gradients and updated buffers with PyTorch (float64 reference). Prints the worst relative errors
and exits non-zero if any case exceeds the tolerance (1e-9 for float64, 1e-3 for float32 on
offset data, 1e-4 otherwise).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn


def write_safetensors(path, tensors):
    dtypes = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<i8"): "I64"}
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtypes[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        dt = {"F64": "<f8", "F32": "<f4", "I64": "<i8"}[v["dtype"]]
        b, e = v["data_offsets"]
        out[k] = np.frombuffer(data[8 + n + b:8 + n + e], dtype=dt).reshape(v["shape"])
    return out


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b))))) if a.size else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--binary", default=".build/release/normkit")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    torch.set_default_dtype(torch.float64)
    sizes = [1, 2, 3, 5, 7, 17]
    worst = {}
    failures = 0
    with tempfile.TemporaryDirectory() as d:
        p = lambda n: os.path.join(d, n)
        for case in range(args.cases):
            layer = rng.choice(["batchnorm", "layernorm", "instancenorm", "groupnorm", "rmsnorm"])
            rank = rng.choice([2, 3, 4, 5]) if layer not in ("instancenorm",) else rng.choice([3, 4, 5])
            shape = [rng.choice([2, 3, 4])] + [rng.choice(sizes) for _ in range(rank - 1)]
            if layer == "groupnorm":
                g = rng.choice([1, 2, 3])
                shape[1] = g * rng.choice([1, 2, 3])
            dtype = rng.choice(["f4", "f8"])
            offset = rng.choice([0.0, 0.0, 1000.0])
            scale = 0.05 if offset else 1.0
            evaluate = rng.random() < 0.3
            momentum = rng.choice([0.1, 0.3, None])
            x = offset + scale * torch.randn(shape)
            x = x.float().double()
            dy = torch.randn(shape).float().double()
            flags = [layer]
            c = shape[1]
            if layer == "batchnorm":
                if shape[0] * int(np.prod(shape[2:])) < 2 and not evaluate:
                    continue
                m = nn.BatchNorm1d(c, momentum=momentum)
                run = lambda t: m(t.reshape(shape[0], c, -1) if t.dim() > 2 else t).reshape(t.shape)
            elif layer == "instancenorm":
                if int(np.prod(shape[2:])) < 2:
                    continue
                m = nn.InstanceNorm1d(c, affine=True, track_running_stats=rng.random() < 0.5,
                                      momentum=0.1 if momentum is None else momentum)
                run = lambda t: m(t.reshape(shape[0], c, -1)).reshape(t.shape)
            elif layer == "groupnorm":
                m = nn.GroupNorm(g, c)
                flags += ["--groups", str(g)]
                run = m
            else:
                k = rng.randint(1, rank)
                cls = nn.LayerNorm if layer == "layernorm" else nn.RMSNorm
                m = cls(shape[-k:])
                flags += ["--normalized-dims", str(k)]
                run = m
            with torch.no_grad():
                for name, prm in m.named_parameters():
                    prm.copy_((1 + 0.5 * torch.randn(prm.shape)).float().double())
                if getattr(m, "running_mean", None) is not None:
                    # Round every stored value to float32 (the file may be float32).
                    m.running_mean.copy_((offset + scale * torch.randn(c)).float().double())
                    m.running_var.copy_(((scale ** 2) * (0.5 + torch.rand(c))).float().double())
            state = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
            if momentum is None and layer == "batchnorm":
                flags += ["--momentum", "none"]
            elif layer in ("batchnorm", "instancenorm"):
                flags += ["--momentum", str(momentum if momentum is not None else 0.1)]
            if evaluate:
                flags.append("--eval")
                m.eval()
            xin = x.clone().requires_grad_(True)
            y = run(xin)
            (y * dy).sum().backward()
            np.save(p("x.npy"), x.numpy().astype("<" + dtype))
            np.save(p("dy.npy"), dy.numpy().astype("<" + dtype))
            write_safetensors(p("p.safetensors"), {k: (v.astype("<" + dtype) if v.dtype.kind == "f" else v.astype("<i8"))
                                                    for k, v in state.items()})
            cmd = [args.binary, "apply"] + flags + ["--input", p("x.npy"), "--output", p("y.npy"), "--params",
                                                   p("p.safetensors"), "--grad-output", p("dy.npy"), "--grad-input",
                                                   p("dx.npy"), "--grad-params", p("g.safetensors"),
                                                   "--updated-params", p("u.safetensors")]
            r = subprocess.run(cmd, capture_output=True, text=True)
            label = f"{layer} {shape} {dtype} {'eval' if evaluate else 'train'} offset={offset} momentum={momentum}"
            if r.returncode != 0:
                print("FAILED TO RUN", label, r.stderr.strip())
                failures += 1
                continue
            tol = 1e-9 if dtype == "f8" else (1e-3 if offset else 1e-4)
            checks = {"y": (np.load(p("y.npy")), y.detach().numpy()), "dx": (np.load(p("dx.npy")), xin.grad.numpy())}
            grads = read_safetensors(p("g.safetensors"))
            for name, prm in m.named_parameters():
                checks["d" + name] = (grads[name], prm.grad.numpy())
            upd = read_safetensors(p("u.safetensors"))
            for k, v in m.state_dict().items():
                if k in upd:
                    checks[k] = (upd[k], v.detach().numpy())
            for k, (a, b) in checks.items():
                e = rel(a, b)
                key = (layer, dtype, k)
                worst[key] = max(worst.get(key, 0), e)
                if e > tol:
                    failures += 1
                    print(f"MISMATCH {label} {k}: {e:.3g} > {tol}")
    for key in sorted(worst):
        print(f"{key[0]:12s} {key[1]} {key[2]:22s} worst relative error {worst[key]:.3g}")
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
