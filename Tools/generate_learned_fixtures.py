#!/usr/bin/env python3
"""Golden fixtures for the learning-to-normalize family, from PyTorch float64.

Run by hand (see Tools/README.md):

    /tmp/torchenv/bin/python Tools/generate_learned_fixtures.py Tests/Fixtures

The forward passes below follow the official implementations as normalizers-spec.md describes
them (switchablenorms/Switchable-Normalization SwitchNorm2d, switchablenorms/Sparse_SwitchNorm
SSN2d with its sparsestmax, Ioffe 2017 for Batch Renormalization); autograd gives every
gradient, including those of the mixture logits. Inputs are rounded to float32 first. Each case
is one safetensors file under Tests/Fixtures/<layer>/, in the format of generate_fixtures.py,
plus dmean_weight / dvar_weight for the logits.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from generate_fixtures import f32, to_last, write_safetensors  # noqa: E402

torch.set_default_dtype(torch.float64)


def sparsemax(v):
    z, _ = torch.sort(v, descending=True)
    k = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    cs = torch.cumsum(z, 0) - 1
    support = (z - cs / k) > 0
    rho = int(support.nonzero().max()) + 1
    tau = cs[rho - 1] / rho
    return torch.clamp(v - tau, min=0)


def sparsestmax(v, r, u_in=None):
    """The spec's SparsestMax (section 4.2), differentiable by autograd."""
    w = sparsemax(v)
    if float(w.max() - w.min()) >= 1 - 1e-12:
        return w.detach()
    sgn = (w > 0).to(v.dtype)
    u = sgn / sgn.sum()
    rr = r if u_in is None else torch.sqrt(torch.clamp(r * r - ((u - u_in) ** 2).sum(), min=0))
    dist = torch.sqrt(((w - u) ** 2).sum())
    if float(dist) >= float(rr) or float(dist) < 1e-12:
        return w
    p = u + rr * (w - u) / dist
    if float(p.min()) < 0:
        return sparsestmax(p, rr, u)
    return torch.clamp(p, 0, 1)


class SwitchNormRef(torch.nn.Module):
    """SwitchNorm2d of the official repository, generalised to any rank >= 3 by view(N, C, -1)."""

    def __init__(self, c, eps=1e-5, momentum=0.9, using_moving_average=True, using_bn=True, sparse=False,
                 radius=0.0):
        super().__init__()
        k = 3 if using_bn else 2
        self.eps, self.momentum, self.mavg, self.using_bn, self.sparse = eps, momentum, using_moving_average, using_bn, sparse
        self.radius = radius
        self.weight = torch.nn.Parameter(torch.ones(c))
        self.bias = torch.nn.Parameter(torch.zeros(c))
        self.mean_weight = torch.nn.Parameter(torch.ones(k))
        self.var_weight = torch.nn.Parameter(torch.ones(k))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.zeros(c))

    def forward(self, x):
        shape = x.shape
        n, c = shape[0], shape[1]
        x = x.reshape(n, c, -1)
        mean_in = x.mean(-1, keepdim=True)
        var_in = x.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        temp = var_in + mean_in ** 2
        var_ln = temp.mean(1, keepdim=True) - mean_ln ** 2
        if self.using_bn:
            if self.training:
                mean_bn = mean_in.mean(0, keepdim=True)
                var_bn = temp.mean(0, keepdim=True) - mean_bn ** 2
                with torch.no_grad():
                    if self.mavg:
                        self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean_bn.reshape(c))
                        self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var_bn.reshape(c))
                    else:
                        self.running_mean.add_(mean_bn.reshape(c))
                        self.running_var.add_(mean_bn.reshape(c) ** 2 + var_bn.reshape(c))
            else:
                mean_bn = self.running_mean.reshape(1, c, 1)
                var_bn = self.running_var.reshape(1, c, 1)
        if self.sparse:
            mw = sparsestmax(self.mean_weight, self.radius)
            vw = sparsestmax(self.var_weight, self.radius)
        else:
            mw = torch.softmax(self.mean_weight, 0)
            vw = torch.softmax(self.var_weight, 0)
        if self.using_bn:
            mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * mean_bn
            var = vw[0] * var_in + vw[1] * var_ln + vw[2] * var_bn
        else:
            mean = mw[0] * mean_in + mw[1] * mean_ln
            var = vw[0] * var_in + vw[1] * var_ln
        x = (x - mean) / (var + self.eps).sqrt()
        x = x.reshape(shape)
        wshape = [1, c] + [1] * (len(shape) - 2)
        return x * self.weight.reshape(wshape) + self.bias.reshape(wshape)


class BatchRenormRef(torch.nn.Module):
    """Batch Renormalization (Ioffe 2017, Algorithm 1): r and d are constants for autograd; the
    moving mean and standard deviation (eps inside) move by alpha."""

    def __init__(self, c, eps=1e-5, alpha=0.01, rmax=3.0, dmax=5.0):
        super().__init__()
        self.eps, self.alpha, self.rmax, self.dmax = eps, alpha, rmax, dmax
        self.weight = torch.nn.Parameter(torch.ones(c))
        self.bias = torch.nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_std", torch.ones(c))

    def forward(self, x):
        c = x.shape[1]
        axes = [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        if self.training:
            mu = x.mean(axes)
            sigma = torch.sqrt(x.var(axes, unbiased=False) + self.eps)
            r = torch.clamp(sigma.detach() / self.running_std, 1 / self.rmax, self.rmax)
            d = torch.clamp((mu.detach() - self.running_mean) / self.running_std, -self.dmax, self.dmax)
            xhat = (x - mu.reshape(shape)) / sigma.reshape(shape) * r.reshape(shape) + d.reshape(shape)
            with torch.no_grad():
                self.running_mean.add_(self.alpha * (mu - self.running_mean))
                self.running_std.add_(self.alpha * (sigma - self.running_std))
        else:
            xhat = (x - self.running_mean.reshape(shape)) / self.running_std.reshape(shape)
        return xhat * self.weight.reshape(shape) + self.bias.reshape(shape)


def generate_ibn(spec, out_dir):
    """IBN-a as the official module computes it: InstanceNorm2d(h, affine=True) on the first
    h = int(C * ratio) channels, BatchNorm2d on the rest, concatenated."""
    g = torch.Generator().manual_seed(spec["seed"])
    shape = spec["shape"]
    c = shape[1]
    h = int(c * spec.get("ratio", 0.5))
    offset = spec.get("offset", 0.0)
    scale = 0.05 if offset else 1.0
    inorm = torch.nn.InstanceNorm1d(h, affine=True)
    bn = torch.nn.BatchNorm1d(c - h)
    tensors = {}
    with torch.no_grad():
        for prefix, m in (("IN", inorm), ("BN", bn)):
            m.weight.copy_(f32(1 + 0.5 * torch.randn(m.weight.shape, generator=g)))
            m.bias.copy_(f32(0.5 * torch.randn(m.bias.shape, generator=g)))
            tensors[prefix + ".weight"] = m.weight.detach().clone()
            tensors[prefix + ".bias"] = m.bias.detach().clone()
        bn.running_mean.copy_(f32(offset + scale * torch.randn(c - h, generator=g)))
        bn.running_var.copy_(f32(scale * scale * (0.5 + torch.rand(c - h, generator=g))))
        tensors["BN.running_mean.in"] = bn.running_mean.clone()
        tensors["BN.running_var.in"] = bn.running_var.clone()

    def run(x):
        n = x.shape[0]
        flat = x.reshape(n, c, -1)
        return torch.cat([inorm(flat[:, :h]), bn(flat[:, h:])], 1).reshape(x.shape)

    store = to_last if spec.get("layout", "nchw") == "nhwc" else (lambda t: t)

    def data():
        return f32(offset + scale * torch.randn(shape, generator=g))

    inorm.train()
    bn.train()
    for k in range(spec.get("steps", 0)):
        xk = data()
        with torch.no_grad():
            run(xk)
        tensors[f"x.{k}"] = store(xk)
    x = data().requires_grad_(True)
    dy = f32(torch.randn(shape, generator=g))
    if spec.get("mode", "train") == "eval":
        inorm.eval()
        bn.eval()
    y = run(x)
    (y * dy).sum().backward()
    tensors.update({"x": store(x.detach()), "dy": store(dy), "y": store(y.detach()), "dx": store(x.grad)})
    for prefix, m in (("IN", inorm), ("BN", bn)):
        tensors["d" + prefix + ".weight"] = m.weight.grad.clone()
        tensors["d" + prefix + ".bias"] = m.bias.grad.clone()
    tensors["BN.running_mean.out"] = bn.running_mean.clone()
    tensors["BN.running_var.out"] = bn.running_var.clone()
    meta = {"generator": "Tools/generate_learned_fixtures.py", "torch": torch.__version__,
            "command": "python Tools/generate_learned_fixtures.py Tests/Fixtures",
            "spec": json.dumps(spec, sort_keys=True)}
    path = os.path.join(out_dir, "ibn", spec["name"] + ".safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_safetensors(path, {k: v.detach().contiguous() for k, v in tensors.items()}, meta)


def aggregation_matrices(n, c, kind):
    """Ubar (N x N) and Vbar (C x C) of the spec's matrix form (section 8) for one kind."""
    batch, channel = kind.split("/")
    u = torch.eye(n) if batch == "I" else torch.ones(n, n)
    if channel == "I":
        v = torch.eye(c)
    elif channel == "all":
        v = torch.ones(c, c)
    else:
        g = int(channel[1:])
        v = torch.kron(torch.eye(g), torch.ones(c // g, c // g))
    ubar = torch.diag(1 / u.sum(1)) @ u
    vbar = v @ torch.diag(1 / v.sum(0))
    return ubar, vbar


def generate_metanorm(spec, out_dir):
    """MetaNorm in the spec's matrix form: mu_k = Ubar M Vbar, var_k = Ubar Q Vbar - mu_k^2,
    mixed by softmax weights; autograd for every gradient."""
    g = torch.Generator().manual_seed(spec["seed"])
    shape = spec["shape"]
    n, c = shape[0], shape[1]
    kinds = spec["kinds"]
    offset = spec.get("offset", 0.0)
    scale = 0.05 if offset else 1.0
    weight = f32(1 + 0.5 * torch.randn(c, generator=g)).requires_grad_(True)
    bias = f32(0.5 * torch.randn(c, generator=g)).requires_grad_(True)
    mean_weight = f32(1 + torch.randn(len(kinds), generator=g)).requires_grad_(True)
    var_weight = f32(1 + torch.randn(len(kinds), generator=g)).requires_grad_(True)
    x = f32(offset + scale * torch.randn(shape, generator=g)).requires_grad_(True)
    dy = f32(torch.randn(shape, generator=g))
    flat = x.reshape(n, c, -1)
    m = flat.mean(-1)
    q = (flat ** 2).mean(-1)
    w = torch.softmax(mean_weight, 0)
    wv = torch.softmax(var_weight, 0)
    mu = 0
    var = 0
    for k, kind in enumerate(kinds):
        ubar, vbar = aggregation_matrices(n, c, kind)
        mu_k = ubar @ m @ vbar
        var_k = ubar @ q @ vbar - mu_k ** 2
        mu = mu + w[k] * mu_k
        var = var + wv[k] * var_k
    y = (flat - mu[..., None]) / torch.sqrt(var[..., None] + 1e-5)
    y = y * weight[None, :, None] + bias[None, :, None]
    y = y.reshape(shape)
    (y * dy).sum().backward()
    tensors = {"x": x.detach(), "dy": dy, "y": y.detach(), "dx": x.grad, "weight": weight.detach(),
               "bias": bias.detach(), "mean_weight": mean_weight.detach(), "var_weight": var_weight.detach(),
               "dweight": weight.grad, "dbias": bias.grad, "dmean_weight": mean_weight.grad,
               "dvar_weight": var_weight.grad}
    meta = {"generator": "Tools/generate_learned_fixtures.py", "torch": torch.__version__,
            "command": "python Tools/generate_learned_fixtures.py Tests/Fixtures",
            "spec": json.dumps(spec, sort_keys=True)}
    path = os.path.join(out_dir, "metanorm", spec["name"] + ".safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_safetensors(path, {k: v.detach().contiguous() for k, v in tensors.items()}, meta)


def newton(sigma, t):
    tr = torch.trace(sigma)
    sn = sigma / tr
    p = torch.eye(sigma.shape[0])
    for _ in range(t):
        p = 1.5 * p - 0.5 * (p @ p @ p @ sn)
    return p / torch.sqrt(tr)


def whiten_forward(layer, spec, x, params):
    """DBN (ZCA through torch.linalg.eigh), IterNorm and SwitchWhiten2d per normalizers-spec.md."""
    n, c = x.shape[0], x.shape[1]
    flat = x.reshape(n, c, -1)
    l = flat.shape[2]
    eps = spec.get("eps", 1e-5)
    d = spec["group"]
    outs = []
    for g0 in range(0, c, d):
        xg = flat[:, g0:g0 + d, :]
        dg = xg.shape[1]
        if layer in ("dbn", "iternorm"):
            xm = xg.permute(1, 0, 2).reshape(dg, -1)
            mu = xm.mean(1, keepdim=True)
            xc = xm - mu
            sigma = xc @ xc.T / xm.shape[1] + eps * torch.eye(dg)
            if layer == "dbn":
                lam, vec = torch.linalg.eigh(sigma)
                w = vec @ torch.diag(lam ** -0.5) @ vec.T
            else:
                w = newton(sigma, spec.get("T", 5))
            y = (w @ xc).reshape(dg, n, l).permute(1, 0, 2)
            outs.append(y)
        else:
            sw_type = spec["type"]
            wm = torch.softmax(params["sw_mean_weight"], 0)
            wv = torch.softmax(params["sw_var_weight"], 0)
            xm = xg.permute(1, 0, 2).reshape(dg, -1)
            mean_bn = xm.mean(1, keepdim=True)
            xcb = xm - mean_bn
            cov_bn = xcb @ xcb.T / xm.shape[1]
            ys = []
            for b in range(n):
                xn = xg[b]
                mean_in = xn.mean(1, keepdim=True)
                xci = xn - mean_in
                cov_in = xci @ xci.T / l
                mu_ln = flat[b].mean()
                var_ln = flat[b].var()
                if sw_type == 2:
                    mean = wm[0] * mean_bn + wm[1] * mean_in
                    cov = wv[0] * cov_bn + wv[1] * cov_in
                elif sw_type == 3:
                    mean = wm[0] * mean_bn + wm[1] * mean_in + wm[2] * mu_ln
                    cov = wv[0] * cov_bn + wv[1] * cov_in + wv[2] * var_ln * torch.eye(dg)
                else:
                    mean = (wm[0] + wm[2]) * mean_bn + (wm[1] + wm[3]) * mean_in + wm[4] * mu_ln
                    cov = (wv[0] * cov_bn + wv[1] * cov_in + wv[0] * torch.diag(torch.diag(cov_bn))
                           + wv[1] * torch.diag(torch.diag(cov_in)) + wv[4] * var_ln * torch.eye(dg))
                cov = cov + eps * torch.eye(dg)
                ys.append(newton(cov, spec.get("T", 5)) @ (xn - mean))
            outs.append(torch.stack(ys))
    y = torch.cat(outs, 1)
    y = y * params["weight"][None, :, None] + params["bias"][None, :, None]
    return y.reshape(x.shape)


def generate_whitening(spec, out_dir):
    g = torch.Generator().manual_seed(spec["seed"])
    shape = spec["shape"]
    c = shape[1]
    layer = spec["layer"]
    x = f32(torch.randn(shape, generator=g))
    # Correlated channels, as whitening needs something to undo.
    mix = f32(torch.eye(c) + 0.4 * torch.randn(c, c, generator=g))
    x = f32(torch.einsum("ij,nj...->ni...", mix, x) + spec.get("offset", 0.0)).requires_grad_(True)
    params = {"weight": f32(1 + 0.3 * torch.randn(c, generator=g)).requires_grad_(True),
              "bias": f32(0.3 * torch.randn(c, generator=g)).requires_grad_(True)}
    if layer == "switchwhiten":
        k = spec["type"]
        params["sw_mean_weight"] = f32(1 + torch.randn(k, generator=g)).requires_grad_(True)
        params["sw_var_weight"] = f32(1 + torch.randn(k, generator=g)).requires_grad_(True)
    dy = f32(torch.randn(shape, generator=g))
    y = whiten_forward(layer, spec, x, params)
    (y * dy).sum().backward()
    tensors = {"x": x.detach(), "dy": dy, "y": y.detach(), "dx": x.grad}
    for k, v in params.items():
        tensors[k] = v.detach()
        tensors["d" + k] = v.grad
    meta = {"generator": "Tools/generate_learned_fixtures.py", "torch": torch.__version__,
            "command": "python Tools/generate_learned_fixtures.py Tests/Fixtures",
            "spec": json.dumps(spec, sort_keys=True)}
    path = os.path.join(out_dir, layer, spec["name"] + ".safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_safetensors(path, {k: v.detach().contiguous() for k, v in tensors.items()}, meta)


def generate(spec, out_dir):
    if spec["layer"] in ("dbn", "iternorm", "switchwhiten"):
        return generate_whitening(spec, out_dir)
    if spec["layer"] == "ibn":
        return generate_ibn(spec, out_dir)
    if spec["layer"] == "metanorm":
        return generate_metanorm(spec, out_dir)
    g = torch.Generator().manual_seed(spec["seed"])
    shape = spec["shape"]
    offset = spec.get("offset", 0.0)
    scale = 0.05 if offset else 1.0
    layer = spec["layer"]
    c = shape[1]
    if layer in ("switchnorm", "sparseswitchnorm"):
        module = SwitchNormRef(c, momentum=spec.get("keep", 0.9), using_moving_average=spec.get("mavg", True),
                               using_bn=spec.get("using_bn", True), sparse=layer == "sparseswitchnorm",
                               radius=spec.get("radius", 0.0))
    else:
        module = BatchRenormRef(c, alpha=spec.get("alpha", 0.01), rmax=spec.get("rmax", 3.0),
                                dmax=spec.get("dmax", 5.0))
    tensors = {}
    with torch.no_grad():
        module.weight.copy_(f32(1 + 0.5 * torch.randn(c, generator=g)))
        module.bias.copy_(f32(0.5 * torch.randn(c, generator=g)))
        if hasattr(module, "mean_weight"):
            module.mean_weight.copy_(f32(1 + spec.get("logit_spread", 1.0) * torch.randn(module.mean_weight.shape, generator=g)))
            module.var_weight.copy_(f32(1 + spec.get("logit_spread", 1.0) * torch.randn(module.var_weight.shape, generator=g)))
            tensors["mean_weight"] = module.mean_weight.detach().clone()
            tensors["var_weight"] = module.var_weight.detach().clone()
        if layer == "batchrenorm":
            module.running_mean.copy_(f32(offset + scale * 0.3 * torch.randn(c, generator=g)))
            module.running_std.copy_(f32(scale * (0.7 + 0.6 * torch.rand(c, generator=g))))
            tensors["running_mean.in"] = module.running_mean.clone()
            tensors["running_std.in"] = module.running_std.clone()
        else:
            tensors["running_mean.in"] = module.running_mean.clone()
            tensors["running_var.in"] = module.running_var.clone()
        tensors["weight"] = module.weight.detach().clone()
        tensors["bias"] = module.bias.detach().clone()
    last = spec.get("layout", "nchw") == "nhwc"
    store = to_last if last else (lambda t: t)

    def data():
        return f32(offset + scale * torch.randn(shape, generator=g))

    module.train()
    for k in range(spec.get("steps", 0)):
        xk = data()
        with torch.no_grad():
            module(xk)
        tensors[f"x.{k}"] = store(xk)
    x = data().requires_grad_(True)
    dy = f32(torch.randn(shape, generator=g))
    if spec.get("mode", "train") == "eval":
        module.eval()
    y = module(x)
    (y * dy).sum().backward()
    tensors.update({"x": store(x.detach()), "dy": store(dy), "y": store(y.detach()), "dx": store(x.grad),
                    "dweight": module.weight.grad.clone(), "dbias": module.bias.grad.clone()})
    if hasattr(module, "mean_weight"):
        for name in ("mean_weight", "var_weight"):
            grad = getattr(module, name).grad
            tensors["d" + name] = grad.clone() if grad is not None else torch.zeros(getattr(module, name).shape)
        tensors["running_mean.out"] = module.running_mean.clone()
        tensors["running_var.out"] = module.running_var.clone()
    else:
        tensors["running_mean.out"] = module.running_mean.clone()
        tensors["running_std.out"] = module.running_std.clone()
    meta = {"generator": "Tools/generate_learned_fixtures.py", "torch": torch.__version__,
            "command": "python Tools/generate_learned_fixtures.py Tests/Fixtures",
            "spec": json.dumps(spec, sort_keys=True)}
    path = os.path.join(out_dir, layer, spec["name"] + ".safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_safetensors(path, {k: v.detach().contiguous() for k, v in tensors.items()}, meta)


def cases():
    out = []

    def add(layer, name, **kw):
        kw.update(layer=layer, name=name, seed=1000 + len(out))
        out.append(kw)

    for layer in ("switchnorm", "sparseswitchnorm"):
        extra = {} if layer == "switchnorm" else {"radius": 0.3}
        add(layer, "rank4_train", shape=[3, 4, 3, 5], **extra)
        add(layer, "rank3_train", shape=[4, 3, 7], **extra)
        add(layer, "rank5_train", shape=[2, 3, 2, 3, 2], **extra)
        add(layer, "rank4_offset", shape=[3, 2, 4, 4], offset=1000.0, **extra)
        add(layer, "rank4_eval", shape=[2, 3, 3, 3], steps=3, mode="eval", **extra)
        add(layer, "rank4_steps", shape=[2, 3, 3, 3], steps=2, **extra)
        add(layer, "rank4_nhwc", shape=[2, 5, 3, 4], layout="nhwc", steps=1, **extra)
        add(layer, "rank4_no_bn", shape=[1, 4, 3, 3], using_bn=False, **extra)
        add(layer, "rank3_keep0997", shape=[3, 2, 17], keep=0.997, steps=2, **extra)
        add(layer, "rank4_batch_average", shape=[2, 3, 2, 3], mavg=False, steps=2, **extra)
        add(layer, "rank4_n1", shape=[1, 3, 4, 4], **extra)
        add(layer, "rank4_wide_logits", shape=[2, 4, 3, 3], logit_spread=3.0, **extra)
    for radius in (0.0, 0.6, 1.0):
        add("sparseswitchnorm", f"rank4_radius{radius}", shape=[2, 3, 3, 4], radius=radius, logit_spread=2.0)
    add("batchrenorm", "rank4_train", shape=[4, 3, 3, 3])
    add("batchrenorm", "rank2_train", shape=[8, 5])
    add("batchrenorm", "rank3_clipped", shape=[3, 4, 5], rmax=1.1, dmax=0.2)
    add("batchrenorm", "rank4_plain_bn", shape=[3, 2, 3, 3], rmax=1.0, dmax=0.0)
    add("batchrenorm", "rank4_offset", shape=[4, 2, 3, 3], offset=1000.0)
    add("batchrenorm", "rank4_eval", shape=[2, 3, 3, 3], steps=3, mode="eval")
    add("batchrenorm", "rank4_steps", shape=[2, 3, 4, 4], steps=3, alpha=0.1)
    add("batchrenorm", "rank4_nhwc", shape=[2, 3, 3, 4], layout="nhwc", steps=1)
    add("ibn", "rank4_train", shape=[3, 4, 3, 3])
    add("ibn", "rank4_odd_channels", shape=[2, 5, 3, 4])
    add("ibn", "rank3_ratio025", shape=[3, 8, 7], ratio=0.25)
    add("ibn", "rank4_eval", shape=[2, 4, 3, 3], steps=2, mode="eval")
    add("ibn", "rank4_offset", shape=[3, 4, 3, 3], offset=1000.0)
    add("ibn", "rank4_nhwc", shape=[2, 6, 3, 3], layout="nhwc", steps=1)
    default = ["I/I", "all/I", "I/all", "I/G2"]
    add("metanorm", "rank4_default", shape=[3, 4, 3, 3], kinds=default)
    add("metanorm", "rank3_default", shape=[4, 6, 5], kinds=default)
    add("metanorm", "rank4_all_kinds", shape=[2, 4, 2, 3], kinds=default + ["all/all", "all/G2", "I/G4"])
    add("metanorm", "rank4_single_gn", shape=[2, 6, 3, 3], kinds=["I/G3"])
    add("metanorm", "rank4_offset", shape=[3, 4, 3, 3], kinds=default, offset=1000.0)
    add("metanorm", "rank5_default", shape=[2, 4, 2, 2, 2], kinds=default)
    add("dbn", "rank4_group2", shape=[8, 4, 3, 3], group=2)
    add("dbn", "rank4_group3_uneven", shape=[6, 5, 3, 3], group=3)
    add("dbn", "rank2_one_group", shape=[32, 6], group=6)
    add("dbn", "rank3_offset", shape=[8, 4, 7], group=4, offset=10.0)
    add("iternorm", "rank4_T5", shape=[8, 4, 3, 3], group=4, T=5)
    add("iternorm", "rank4_group2_T3", shape=[6, 4, 3, 3], group=2, T=3)
    add("iternorm", "rank2_T7", shape=[32, 6], group=6, T=7)
    add("iternorm", "rank3_offset", shape=[8, 4, 7], group=4, T=5, offset=10.0)
    add("switchwhiten", "type2", shape=[4, 4, 3, 3], group=2, type=2, T=5)
    add("switchwhiten", "type3", shape=[4, 4, 3, 3], group=2, type=3, T=5)
    add("switchwhiten", "type5", shape=[4, 4, 3, 3], group=2, type=5, T=5)
    add("switchwhiten", "type5_group4", shape=[3, 8, 4, 2], group=4, type=5, T=4)
    return out


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "Tests/Fixtures"
    specs = cases()
    for spec in specs:
        generate(spec, out_dir)
    print(f"wrote {len(specs)} fixtures to {out_dir} with torch {torch.__version__}")


if __name__ == "__main__":
    main()
