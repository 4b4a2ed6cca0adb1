#!/usr/bin/env python3
"""Golden fixtures for the conditional and LLM-era normalizers, from PyTorch float64.

Run by hand (see Tools/README.md):

    /work/venv/bin/python Tools/generate_conditional_fixtures.py Tests/Fixtures

Each method below is a PyTorch version written for this repository following the reference
code's conventions, as normalizers-spec.md section 3 and issue 13 describe them:

- AdaIN: naoto0804/pytorch-AdaIN's calc_mean_std (content and style sigma = sqrt(unbiased var +
  1e-5); the default) and the original Torch code xunhuang1995/AdaIN-style (content sigma =
  sqrt(biased var + 1e-5), style sigma = sqrt(biased var), no eps); alpha * AdaIN + (1 - alpha) *
  content.
- Conditional BN: BatchNorm without affine, then gamma, beta per class from two embeddings
  (keys weights.weight, biases.weight, init 1 and 0) or from a conditioning vector by two linear
  maps (keys gain.*, bias.*), optionally BigGAN's gain = 1 + Linear(y).
- SPADE: NVlabs/SPADE's normalization.py SPADE: a parameter-free BatchNorm or InstanceNorm, the
  segmentation map resized to x's size by nearest interpolation, Conv(label -> hidden, k) + ReLU,
  separate gamma and beta Conv(hidden -> C, k), out = norm(x) * (1 + gamma) + beta.
- adaLN / FiLM: DiT's modulate, x * (1 + scale) + shift with (shift, scale[, gate]) =
  Linear(SiLU(c)).chunk(k), LayerNorm without affine (eps 1e-6) first, and the gated residual
  r + gate * branch.
- DyT: DynamicTanh, weight * tanh(alpha * x) + bias, scalar alpha, channels-last or first.
- Fused add + RMSNorm: h = x + r, y = RMSNorm(h) * w (or * (1 + w)); both outputs are returned,
  so the loss is sum(y * dy) + sum(h * dh).
- (1 + w) RMSNorm, QK-norm (RMSNorm over head_dim of [B, heads, T, head_dim]) and the nGPT
  unit-norm projection x / ||x|| (no eps).

Every case is one safetensors file Tests/Fixtures/conditional/<layer>_<case>.safetensors in the
format of generate_fixtures.py (metadata: generator, torch version, command, spec). Inputs and
parameters are rounded to float32 first; dL/d(anything) is autograd's gradient of
L = sum(y * dy) (+ sum(h * dh) for the second outputs). Parameter tensors use the reference
code's state_dict keys; their gradients are stored as "d" + key.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from generate_fixtures import f32, write_safetensors  # noqa: E402

torch.set_default_dtype(torch.float64)
GENERATOR = "Tools/generate_conditional_fixtures.py"


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# MARK: - Reference versions


def calc_mean_std(feat, unbiased, eps):
    """pytorch-AdaIN's calc_mean_std, with the variance estimator and eps made explicit."""
    n, c = feat.shape[:2]
    var = feat.reshape(n, c, -1).var(dim=2, unbiased=unbiased) + eps
    std = var.sqrt().reshape(n, c, *([1] * (feat.dim() - 2)))
    mean = feat.reshape(n, c, -1).mean(dim=2).reshape(n, c, *([1] * (feat.dim() - 2)))
    return mean, std


def adain(content, style, unbiased, alpha):
    if unbiased:  # PyTorch port: both sigma = sqrt(var_u + 1e-5)
        c_mean, c_std = calc_mean_std(content, True, 1e-5)
        s_mean, s_std = calc_mean_std(style, True, 1e-5)
    else:  # original Torch: content sqrt(var_b + 1e-5), style sqrt(var_b), no eps
        c_mean, c_std = calc_mean_std(content, False, 1e-5)
        s_mean, s_std = calc_mean_std(style, False, 0.0)
    t = (content - c_mean) / c_std * s_std + s_mean
    return alpha * t + (1 - alpha) * content


def batch_norm_noaffine(x, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    """nn.BatchNorm without affine on any rank (spatial axes flattened, as generate_fixtures.py)."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1) if x.dim() > 2 else x
    return F.batch_norm(flat, running_mean, running_var, None, None, training, momentum, eps).reshape(x.shape)


def instance_norm_noaffine(x, eps=1e-5):
    n, c = x.shape[:2]
    return F.instance_norm(x.reshape(n, c, -1), eps=eps).reshape(x.shape)


def spade(x, segmap, p, norm, ks, buffers, training):
    if norm == "batch":
        normalized = batch_norm_noaffine(x, buffers["running_mean"], buffers["running_var"], training)
    else:
        normalized = instance_norm_noaffine(x)
    seg = F.interpolate(segmap, size=x.shape[2:], mode="nearest")
    actv = F.relu(F.conv2d(seg, p["mlp_shared.0.weight"], p["mlp_shared.0.bias"], padding=ks // 2))
    gamma = F.conv2d(actv, p["mlp_gamma.weight"], p["mlp_gamma.bias"], padding=ks // 2)
    beta = F.conv2d(actv, p["mlp_beta.weight"], p["mlp_beta.bias"], padding=ks // 2)
    return normalized * (1 + gamma) + beta


def modulate(x, shift, scale):
    """DiT's modulate; shift and scale are [N, D], broadcast over the tokens of [N, T, D]."""
    if x.dim() == 3:
        return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return x * (1 + scale) + shift


def rms_norm(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


# MARK: - Cases


def generate(spec, out_dir):
    g = torch.Generator().manual_seed(spec["seed"])
    layer = spec["layer"]
    offset = spec.get("offset", 0.0)

    def randn(shape, mean=0.0, std=1.0):
        return f32(mean + std * torch.randn(shape, generator=g))

    def data(shape):
        return randn(shape, offset, 0.05) if offset else randn(shape)

    tensors = {}
    shape = spec["shape"]
    x = leaf(data(shape))
    dy = randn(shape)
    extra_loss = 0
    params = {}

    if layer == "adain":
        style = leaf(randn(spec["style_shape"], spec.get("style_mean", 0.0), spec.get("style_std", 1.0)))
        y = adain(x, style, spec["unbiased"], spec.get("alpha", 1.0))
        inputs = {"style": style}
    elif layer == "conditionalbn":
        c = shape[1]
        k = spec.get("classes", 0)
        running_mean = randn([c]) + offset
        running_var = f32(0.5 + torch.rand([c], generator=g)) * (0.05 ** 2 if offset else 1)
        tensors["running_mean.in"] = running_mean.clone()
        tensors["running_var.in"] = running_var.clone()
        if spec["source"] == "embedding":
            labels = torch.randint(0, k, (shape[0],), generator=g)
            params["weights.weight"] = leaf(randn([k, c], 1.0, 0.5))
            params["biases.weight"] = leaf(randn([k, c], 0.0, 0.5))
            gamma = params["weights.weight"][labels]
            beta = params["biases.weight"][labels]
            tensors["labels"] = labels
            inputs = {}
        else:
            d = spec["condition_dim"]
            cond = leaf(randn([shape[0], d]))
            for name in ("gain", "bias"):
                params[f"{name}.weight"] = leaf(randn([c, d], 0.0, 0.5))
                params[f"{name}.bias"] = leaf(randn([c], 0.0, 0.5))
            gamma = F.linear(cond, params["gain.weight"], params["gain.bias"])
            if spec.get("one_plus", False):
                gamma = 1 + gamma
            beta = F.linear(cond, params["bias.weight"], params["bias.bias"])
            inputs = {"condition": cond}
        tail = [1] * (x.dim() - 2)
        for step in range(spec.get("steps", 0)):
            xs = data(shape)
            tensors[f"x.{step}"] = xs
            with torch.no_grad():
                batch_norm_noaffine(xs, running_mean, running_var, True)
        training = spec.get("mode", "train") == "train"
        normalized = batch_norm_noaffine(x, running_mean, running_var, training)
        y = normalized * gamma.reshape(*gamma.shape, *tail) + beta.reshape(*beta.shape, *tail)
        tensors["running_mean.out"] = running_mean
        tensors["running_var.out"] = running_var
    elif layer == "spade":
        c = shape[1]
        labels_nc, hidden, ks = spec["label_nc"], spec["hidden"], spec["ks"]
        seg_shape = [shape[0], labels_nc] + spec["seg_size"]
        if spec.get("one_hot", False):
            idx = torch.randint(0, labels_nc, [shape[0]] + spec["seg_size"], generator=g)
            segmap = leaf(F.one_hot(idx, labels_nc).permute(0, 3, 1, 2).double())
        else:
            segmap = leaf(randn(seg_shape))
        params["mlp_shared.0.weight"] = leaf(randn([hidden, labels_nc, ks, ks], 0.0, 0.3))
        params["mlp_shared.0.bias"] = leaf(randn([hidden], 0.0, 0.3))
        params["mlp_gamma.weight"] = leaf(randn([c, hidden, ks, ks], 0.0, 0.3))
        params["mlp_gamma.bias"] = leaf(randn([c], 0.0, 0.3))
        params["mlp_beta.weight"] = leaf(randn([c, hidden, ks, ks], 0.0, 0.3))
        params["mlp_beta.bias"] = leaf(randn([c], 0.0, 0.3))
        buffers = {}
        if spec["norm"] == "batch":
            buffers = {"running_mean": randn([c]) + offset,
                       "running_var": f32(0.5 + torch.rand([c], generator=g)) * (0.05 ** 2 if offset else 1)}
            tensors["param_free_norm.running_mean.in"] = buffers["running_mean"].clone()
            tensors["param_free_norm.running_var.in"] = buffers["running_var"].clone()
        for step in range(spec.get("steps", 0)):
            xs = data(shape)
            tensors[f"x.{step}"] = xs
            with torch.no_grad():
                batch_norm_noaffine(xs, buffers["running_mean"], buffers["running_var"], True)
        training = spec.get("mode", "train") == "train"
        y = spade(x, segmap, params, spec["norm"], ks, buffers, training)
        if buffers:
            tensors["param_free_norm.running_mean.out"] = buffers["running_mean"]
            tensors["param_free_norm.running_var.out"] = buffers["running_var"]
        inputs = {"segmap": segmap}
    elif layer == "adaln":
        d = shape[-1]
        chunks = 3 if spec.get("gate", False) else 2
        cond = leaf(randn([shape[0], spec["condition_dim"]]))
        if spec.get("zero_init", False):
            w = torch.zeros([chunks * d, spec["condition_dim"]])
            b = torch.zeros([chunks * d])
        else:
            w = randn([chunks * d, spec["condition_dim"]], 0.0, 0.5)
            b = randn([chunks * d], 0.0, 0.5)
        params["adaLN_modulation.1.weight"] = leaf(w)
        params["adaLN_modulation.1.bias"] = leaf(b)
        hidden = F.silu(cond) if spec.get("silu", True) else cond
        mod = F.linear(hidden, params["adaLN_modulation.1.weight"], params["adaLN_modulation.1.bias"])
        parts = mod.chunk(chunks, dim=1)
        shift, scale = parts[0], parts[1]
        if spec.get("norm", "layernorm") == "layernorm":
            normalized = F.layer_norm(x, (d,), None, None, spec.get("eps", 1e-6))
        else:
            normalized = x
        y = modulate(normalized, shift, scale)
        inputs = {"condition": cond}
        if chunks == 3:
            gate = parts[2]
            residual = leaf(randn(shape))
            branch = leaf(randn(shape))
            dh = randn(shape)
            h = residual + (gate.unsqueeze(1) if x.dim() == 3 else gate) * branch
            extra_loss = (h * dh).sum()
            tensors["dh"] = dh
            tensors["h"] = h.detach()
            inputs.update({"residual": residual, "branch": branch})
    elif layer == "dyt":
        last = spec.get("layout", "nhwc") == "nhwc"
        c = shape[-1] if last else shape[1]
        params["alpha"] = leaf(f32(torch.tensor([spec.get("alpha", 0.5)])))
        params["weight"] = leaf(randn([c], 1.0, 0.5))
        if spec.get("bias", True):
            params["bias"] = leaf(randn([c], 0.0, 0.5))
        t = torch.tanh(params["alpha"] * x)
        tail = [] if last else [1] * (x.dim() - 2)
        y = t * params["weight"].reshape(c, *tail)
        if "bias" in params:
            y = y + params["bias"].reshape(c, *tail)
        inputs = {}
    elif layer in ("addrmsnorm", "rmsnorm1p", "qknorm"):
        d = shape[-1]
        eps = spec.get("eps", 1e-6)
        one_plus = spec.get("unit_offset", layer == "rmsnorm1p")
        params["weight"] = leaf(randn([d], 0.0 if one_plus else 1.0, 0.3))
        weight = 1 + params["weight"] if one_plus else params["weight"]
        inputs = {}
        if layer == "addrmsnorm":
            residual = leaf(randn(shape, offset, 0.05) if offset else randn(shape))
            h = x + residual
            dh = randn(shape)
            extra_loss = (h * dh).sum()
            tensors["dh"] = dh
            tensors["h"] = h.detach()
            inputs = {"residual": residual}
            y = rms_norm(h, weight, eps)
        else:
            y = rms_norm(x, weight, eps)
    elif layer == "unitnorm":
        y = x / x.norm(dim=-1, keepdim=True)
        inputs = {}
    else:
        raise ValueError(layer)

    ((y * dy).sum() + extra_loss).backward()
    tensors.update({"x": x.detach(), "dy": dy, "y": y.detach(), "dx": x.grad})
    for name, t in inputs.items():
        tensors[name] = t.detach()
        tensors["d" + name] = t.grad if t.grad is not None else torch.zeros(t.shape)
    for name, p in params.items():
        tensors[name] = p.detach()
        tensors["d" + name] = p.grad if p.grad is not None else torch.zeros(p.shape)
    meta = {"generator": GENERATOR, "torch": torch.__version__,
            "command": "python Tools/generate_conditional_fixtures.py Tests/Fixtures",
            "spec": json.dumps(spec, sort_keys=True)}
    path = os.path.join(out_dir, "conditional", f"{layer}_{spec['name']}.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_safetensors(path, {k: v.detach().contiguous() for k, v in tensors.items()}, meta)


def cases():
    out = []

    def add(layer, name, **kw):
        kw.update(layer=layer, name=name, seed=2000 + len(out))
        out.append(kw)

    # AdaIN: both conventions, alpha, rank 3-5, content and style of different spatial sizes.
    add("adain", "unbiased_rank4", shape=[2, 3, 4, 5], style_shape=[2, 3, 3, 6], unbiased=True)
    add("adain", "biased_rank4", shape=[2, 3, 4, 5], style_shape=[2, 3, 3, 6], unbiased=False)
    add("adain", "unbiased_alpha06", shape=[2, 4, 3, 3], style_shape=[2, 4, 5, 2], unbiased=True, alpha=0.6)
    add("adain", "biased_rank3_alpha03", shape=[3, 4, 7], style_shape=[3, 4, 5], unbiased=False, alpha=0.3)
    add("adain", "unbiased_rank5", shape=[2, 2, 2, 3, 2], style_shape=[2, 2, 3, 2, 2], unbiased=True)
    add("adain", "unbiased_offset", shape=[2, 3, 5, 5], style_shape=[2, 3, 4, 4], unbiased=True, offset=1000.0,
        style_mean=3.0, style_std=2.0)
    add("adain", "biased_offset", shape=[2, 3, 17], style_shape=[2, 3, 9], unbiased=False, offset=1000.0,
        style_mean=-5.0, style_std=0.5)
    # Conditional BN: embedding per class, linear map, BigGAN's 1 + Linear; training and eval.
    add("conditionalbn", "embedding_rank4", shape=[4, 3, 3, 3], source="embedding", classes=5)
    add("conditionalbn", "embedding_rank2", shape=[6, 4], source="embedding", classes=3)
    add("conditionalbn", "embedding_eval", shape=[3, 3, 2, 2], source="embedding", classes=4, steps=2,
        mode="eval")
    add("conditionalbn", "linear_rank4", shape=[3, 4, 2, 3], source="linear", condition_dim=5)
    add("conditionalbn", "biggan_rank4", shape=[3, 4, 3, 2], source="linear", condition_dim=6, one_plus=True)
    add("conditionalbn", "biggan_rank3_offset", shape=[4, 3, 7], source="linear", condition_dim=3, one_plus=True,
        offset=1000.0)
    add("conditionalbn", "biggan_eval", shape=[2, 3, 2, 2], source="linear", condition_dim=4, one_plus=True, steps=2,
        mode="eval")
    # SPADE: batch and instance, kernel 1/3/5, resize up, down and by a non-integer ratio.
    add("spade", "batch3x3_down", shape=[2, 3, 3, 3], seg_size=[6, 6], label_nc=4, hidden=5, ks=3, norm="batch")
    add("spade", "instance3x3_up", shape=[2, 3, 4, 4], seg_size=[2, 2], label_nc=3, hidden=4, ks=3, norm="instance",
        one_hot=True)
    add("spade", "batch1x1_odd", shape=[3, 2, 3, 5], seg_size=[5, 5], label_nc=2, hidden=3, ks=1, norm="batch")
    add("spade", "instance5x5_same", shape=[1, 2, 4, 3], seg_size=[4, 3], label_nc=3, hidden=3, ks=5,
        norm="instance")
    add("spade", "batch3x3_eval", shape=[2, 2, 3, 3], seg_size=[3, 3], label_nc=2, hidden=4, ks=3, norm="batch",
        steps=2, mode="eval")
    add("spade", "batch3x3_offset", shape=[2, 2, 4, 4], seg_size=[4, 4], label_nc=3, hidden=4, ks=3, norm="batch",
        offset=1000.0)
    add("spade", "instance3x3_hidden128", shape=[1, 2, 3, 3], seg_size=[3, 3], label_nc=2, hidden=128, ks=3,
        norm="instance", one_hot=True)
    # adaLN / FiLM.
    add("adaln", "tokens_gate", shape=[2, 3, 5], condition_dim=4, gate=True)
    add("adaln", "tokens_nogate", shape=[2, 4, 6], condition_dim=3)
    add("adaln", "rank2_gate", shape=[3, 7], condition_dim=5, gate=True)
    add("adaln", "zero_init_gate", shape=[2, 3, 4], condition_dim=3, gate=True, zero_init=True)
    add("adaln", "film_no_norm", shape=[2, 3, 5], condition_dim=4, norm="none", silu=False)
    add("adaln", "offset_eps1e-5", shape=[2, 3, 17], condition_dim=3, offset=1000.0, eps=1e-5)
    # DyT.
    add("dyt", "rank3_last", shape=[2, 3, 7])
    add("dyt", "rank2_last_alpha", shape=[5, 17], alpha=1.3)
    add("dyt", "rank4_first", shape=[2, 3, 4, 5], layout="nchw")
    add("dyt", "rank3_nobias", shape=[2, 4, 6], bias=False)
    add("dyt", "rank4_last", shape=[2, 3, 3, 4])
    # Fused add + RMSNorm, (1 + w) RMSNorm, QK-norm, unit norm.
    add("addrmsnorm", "rank3", shape=[2, 3, 17])
    add("addrmsnorm", "rank2_eps1e-5", shape=[4, 9], eps=1e-5)
    add("addrmsnorm", "rank3_unit_offset", shape=[2, 2, 7], unit_offset=True)
    add("addrmsnorm", "rank2_offset", shape=[3, 65], offset=1000.0)
    add("rmsnorm1p", "rank3", shape=[2, 3, 7])
    add("rmsnorm1p", "rank2_eps1e-5", shape=[3, 17], eps=1e-5)
    add("qknorm", "heads", shape=[2, 3, 4, 8])
    add("qknorm", "one_head_odd", shape=[1, 1, 5, 7], eps=1e-5)
    add("unitnorm", "rank2", shape=[4, 7])
    add("unitnorm", "rank3", shape=[2, 3, 17])
    add("unitnorm", "rank2_offset", shape=[3, 9], offset=1000.0)
    return out


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "Tests/Fixtures"
    specs = cases()
    for spec in specs:
        generate(spec, out_dir)
    print(f"wrote {len(specs)} fixtures to {out_dir}/conditional with torch {torch.__version__}")


if __name__ == "__main__":
    main()
