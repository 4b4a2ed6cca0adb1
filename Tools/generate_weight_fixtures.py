#!/usr/bin/env python3
"""Golden fixtures for the weight-space normalizers, from PyTorch float64.

Run by hand (see Tools/README.md):

    /work/venv/bin/python Tools/generate_weight_fixtures.py Tests/Fixtures

Weight Norm and Spectral Norm are PyTorch's own: torch.nn.utils.parametrizations.weight_norm and
spectral_norm (u = normalize(W v) first, then v = normalize(Wᵀ u); 15 iterations at creation),
and the legacy hook forms torch.nn.utils.weight_norm / spectral_norm (v first; keys weight_g,
weight_v, weight_orig, weight_u). Centered Weight Norm and both Weight Standardization
conventions are written here as parametrizations registered through torch.nn.utils.parametrize,
following the official code as normalizers-spec.md section 2 describes it:

    CWN (huangleiBuaa/CenteredWN, CWNorm): per output row c = v − mean(v),
        w = s · c / (‖c‖ + 1e-5); s = 1.414 fixed (not in the state_dict) or the learnable
        parameter WNScale of shape [out, 1, …].
    WS official (joe-siyuan-qiao/WeightStandardization): w = (v − mean) / (std_unbiased + 1e-5).
    WS BiT (google-research/big_transfer, StdConv2d): w = (v − mean) / sqrt(var_biased + 1e-10).

Each case is Tests/Fixtures/weightnorm/<case>.safetensors; __metadata__ holds the generator,
torch version and the case's spec (JSON). Tensors:

    x.0 … x.{k-1}    earlier training-mode forwards (k = spec "steps"; no backward)
    x, dy            the final call's input and output gradient
    y, dx            PyTorch's output and dL/dx for L = sum(y * dy)
    weight.eff       the normalized weight the final call used
    dweight.eff      dL/d(weight.eff), what the layer hands to the parametrization's backward
    in/<key>         the module's state_dict before the first call
    out/<key>        the state_dict after the final call (SN's u, v advanced in training only)
    grad/<key>       dL/d(parameter) under the parameter's state_dict key (buffers have none)

Inputs and initial parameters are rounded to float32 first, so the Swift Float path starts from
identical values.
"""
import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

sys.path.insert(0, os.path.dirname(__file__))
from generate_fixtures import f32, write_safetensors  # noqa: E402

torch.set_default_dtype(torch.float64)
warnings.filterwarnings("ignore", category=FutureWarning)
GENERATOR = "Tools/generate_weight_fixtures.py"


class CWNorm(nn.Module):
    """Centered Weight Normalization as the official CWNorm, times the scale s."""

    def __init__(self, out_channels, rank, nscale=1.414, learnable=False, eps=1e-5):
        super().__init__()
        self.eps = eps
        scale = torch.full([out_channels] + [1] * (rank - 1), nscale)
        if learnable:
            self.WNScale = nn.Parameter(scale)
        else:
            # The official module keeps a fixed buffer; the state_dict lists the scale
            # only when it is a parameter, so the fixed scale is not persistent here.
            self.register_buffer("WNScale", scale, persistent=False)

    def forward(self, weight):
        flat = weight.reshape(weight.size(0), -1)
        c = flat - flat.mean(dim=1, keepdim=True)
        norm = c.norm(dim=1, keepdim=True) + self.eps
        return (c / norm).reshape(weight.shape) * self.WNScale


class WSOfficial(nn.Module):
    """Weight Standardization as the official Conv2d: unbiased std, eps added to the std."""

    def __init__(self, eps=1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, weight):
        flat = weight.reshape(weight.size(0), -1)
        c = flat - flat.mean(dim=1, keepdim=True)
        std = c.std(dim=1, keepdim=True) + self.eps
        return (c / std).reshape(weight.shape)


class WSBiT(nn.Module):
    """Weight Standardization as BiT's StdConv2d: biased variance, eps inside the root."""

    def __init__(self, eps=1e-10):
        super().__init__()
        self.eps = eps

    def forward(self, weight):
        dims = list(range(1, weight.dim()))
        v, m = torch.var_mean(weight, dim=dims, keepdim=True, unbiased=False)
        return (weight - m) / torch.sqrt(v + self.eps)


def make_module(spec, g):
    if spec["layer"] == "linear":
        m = nn.Linear(spec["in"], spec["out"])
    else:
        m = nn.Conv2d(spec["in"], spec["out"], spec["kernel"], stride=spec.get("stride", 1),
                      padding=spec.get("padding", 0))
    offset = spec.get("weight_offset", 0.0)
    with torch.no_grad():
        m.weight.copy_(f32(offset + 0.5 * torch.randn(m.weight.shape, generator=g)))
        m.bias.copy_(f32(0.3 * torch.randn(m.bias.shape, generator=g)))
    method = spec["method"]
    rank = m.weight.dim()
    if method == "wn":
        parametrizations.weight_norm(m, dim=spec.get("dim", 0))
        with torch.no_grad():
            g0 = m.parametrizations.weight.original0
            g0.copy_(f32(g0 * (1 + 0.3 * torch.randn(g0.shape, generator=g))))
    elif method == "wn-legacy":
        torch.nn.utils.weight_norm(m, dim=spec.get("dim", 0))
        with torch.no_grad():
            m.weight_g.copy_(f32(m.weight_g * (1 + 0.3 * torch.randn(m.weight_g.shape, generator=g))))
    elif method == "cwn":
        learnable = spec.get("learnable_scale", False)
        parametrize.register_parametrization(
            m, "weight", CWNorm(spec["out"], rank, spec.get("nscale", 1.414), learnable, spec.get("eps", 1e-5)))
        if learnable:
            with torch.no_grad():
                s = m.parametrizations.weight[0].WNScale
                s.copy_(f32(1.414 + 0.3 * torch.randn(s.shape, generator=g)))
    elif method == "ws":
        parametrize.register_parametrization(m, "weight", WSOfficial(spec.get("eps", 1e-5)))
    elif method == "ws-bit":
        parametrize.register_parametrization(m, "weight", WSBiT(spec.get("eps", 1e-10)))
    elif method == "sn":
        torch.manual_seed(spec["seed"])  # u, v start from the global generator
        parametrizations.spectral_norm(m, n_power_iterations=spec.get("iterations", 1),
                                       dim=spec.get("dim", 0), eps=spec.get("eps", 1e-12))
    elif method == "sn-legacy":
        torch.manual_seed(spec["seed"])
        torch.nn.utils.spectral_norm(m, n_power_iterations=spec.get("iterations", 1),
                                     dim=spec.get("dim", 0), eps=spec.get("eps", 1e-12))
    elif method != "none":
        raise ValueError(method)
    return m


def generate(spec, out_dir):
    g = torch.Generator().manual_seed(spec["seed"])
    m = make_module(spec, g)
    method = spec["method"]
    shape = spec["shape"]

    def data():
        return f32(torch.randn(shape, generator=g))

    state_in = {k: v.detach().clone() for k, v in m.state_dict().items()}
    tensors = {"in/" + k: v for k, v in state_in.items()}
    m.train()
    for k in range(spec.get("steps", 0)):
        xk = data()
        with torch.no_grad():
            m(xk)
        tensors[f"x.{k}"] = xk
    x = data().requires_grad_(True)
    if spec.get("mode", "train") == "eval":
        m.eval()
    if method in ("wn-legacy", "sn-legacy"):
        y = m(x)
        w_eff = m.weight
    else:
        # One evaluation of the parametrization per call, as in the module's own forward.
        with parametrize.cached():
            w_eff = m.weight
            if spec["layer"] == "linear":
                y = F.linear(x, w_eff, m.bias)
            else:
                y = F.conv2d(x, w_eff, m.bias, m.stride, m.padding)
    dy = f32(torch.randn(y.shape, generator=g))
    if w_eff.requires_grad:
        w_eff.retain_grad()
    (y * dy).sum().backward()
    tensors.update({"x": x.detach(), "dy": dy, "y": y.detach(), "dx": x.grad,
                    "weight.eff": w_eff.detach().clone()})
    if w_eff.grad is not None:
        tensors["dweight.eff"] = w_eff.grad.clone()
    named = dict(m.named_parameters())
    for k in state_in:
        if k in named and named[k].grad is not None:
            tensors["grad/" + k] = named[k].grad.clone()
    for k, v in m.state_dict().items():
        tensors["out/" + k] = v.detach().clone()
    meta = {"generator": GENERATOR, "torch": torch.__version__,
            "command": "python Tools/generate_weight_fixtures.py Tests/Fixtures",
            "spec": json.dumps(spec, sort_keys=True)}
    path = os.path.join(out_dir, "weightnorm", spec["name"] + ".safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_safetensors(path, {k: v.detach().contiguous() for k, v in tensors.items()}, meta)


def cases():
    out = []
    lin = dict(layer="linear", **{"in": 5}, out=4, shape=[3, 5])
    conv = dict(layer="conv2d", **{"in": 3}, out=4, kernel=3, stride=2, padding=1, shape=[2, 3, 7, 6])
    conv1 = dict(layer="conv2d", **{"in": 2}, out=3, kernel=1, stride=1, padding=0, shape=[2, 2, 3, 4])

    def add(name, base, method, **kw):
        spec = dict(base)
        spec.update(kw, name=name, method=method, seed=len(out) + 1)
        out.append(spec)

    add("linear_none", lin, "none")
    add("conv_none", conv, "none")
    add("linear_wn", lin, "wn")
    add("linear_wn_dimnone", lin, "wn", dim=None)
    add("linear_wn_dim1", lin, "wn", dim=1)
    add("conv_wn", conv, "wn")
    add("conv_wn_dim1", conv, "wn", dim=1)
    add("conv_wn_legacy", conv, "wn-legacy")
    add("linear_cwn", lin, "cwn")
    add("linear_cwn_learnable", lin, "cwn", learnable_scale=True)
    add("conv_cwn", conv, "cwn")
    add("conv_cwn_learnable", conv, "cwn", learnable_scale=True)
    add("linear_ws", lin, "ws")
    add("conv_ws", conv, "ws")
    add("conv_ws_offset", conv, "ws", weight_offset=1000.0)
    add("conv_ws_eps1e-3", conv, "ws", eps=1e-3)
    add("linear_ws_bit", lin, "ws-bit")
    add("conv_ws_bit", conv, "ws-bit")
    add("conv_ws_bit_offset", conv, "ws-bit", weight_offset=1000.0)
    add("conv1x1_ws_bit", conv1, "ws-bit")
    add("linear_sn", lin, "sn")
    add("linear_sn_steps3", lin, "sn", steps=3)
    add("linear_sn_eval", lin, "sn", steps=2, mode="eval")
    add("linear_sn_dim1", lin, "sn", dim=1, steps=1)
    add("conv_sn", conv, "sn", steps=2)
    add("conv_sn_iter3", conv, "sn", iterations=3, steps=1)
    add("conv_sn_eval", conv, "sn", steps=2, mode="eval")
    add("conv_sn_dim1", conv, "sn", dim=1, steps=1)
    add("linear_sn_legacy", lin, "sn-legacy", steps=2)
    add("conv_sn_legacy", conv, "sn-legacy", steps=2)
    add("conv_sn_legacy_eval", conv, "sn-legacy", steps=2, mode="eval")
    return out


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "Tests/Fixtures"
    for spec in cases():
        generate(spec, out_dir)
        print("wrote", spec["name"])


if __name__ == "__main__":
    main()
