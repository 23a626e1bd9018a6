"""LayerNorm, and the residual add feeding it, -> fxopt::layer_norm.

Pattern (as Dynamo captures nn.LayerNorm and F.layer_norm):
    s   = a + b                                   optional residual add, folded into the op (as rms_norm's)
    out = F.layer_norm(s, (N,), weight, bias, eps)    weight and bias each optional
F.layer_norm computes its statistics and the affine in fp32 and rounds once to the input's dtype, with
weights of the input's dtype or fp32: fxopt::layer_norm does the same.

Also the LayerNorm written out (Cohere), in fp32 whatever the input's dtype:
    h = x.to(float32)?;  mu = h.mean(-1, keepdim=True)
    var = (h - mu).pow(2).mean(-1, keepdim=True);  n = (h - mu) * rsqrt(var + eps)
    out = (w.to(float32)? * n  [+ b.to(float32)?]).to(x.dtype)?        weight and bias each optional

Guards (reported when they fail): a float input, normalisation over the last dimension only (normalized_shape
of one static size equal to the input's last dimension), weight and bias 1-D of that size, float, on the
input's device, a constant eps, and an output of the input's dtype; written out: statistics in fp32 and no
intermediate value used outside the pattern.
The residual add is folded under rms_norm's rule: a plain same-shape, same-dtype add whose sum is read again
after the norm; the backward then saves the sum, the per-row mean and rstd only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.passes.graph_utils import (
    ADD_TARGETS, FLOATS, MUL_TARGETS, SUB_TARGETS, Reject, cast_dtype, is_call, is_method, module_path, only_user,
    static_int, value)
from fxopt.passes.rms_norm import (
    MEAN_TARGETS, RSQRT_TARGETS, _call, _check_mean, _is_number, _other, _single_user, fp32_input, residual_add,
    rewrite_norm, squared_deviation)
from fxopt.report import MatchRecord

NAME = "layer_norm"
DESCRIPTION = "LayerNorm (F.layer_norm: weight and bias optional) + residual add -> fxopt::layer_norm"
LAYER_NORM_TARGETS = (F.layer_norm, torch.layer_norm)
_PARAMS = ("input", "normalized_shape", "weight", "bias", "eps")


@dataclass
class LayerNormMatch:
    x: fx.Node
    residual: fx.Node | None
    add: fx.Node | None  # the folded residual add, whose value becomes the op's second output
    weight: fx.Node | None
    bias: fx.Node | None
    eps: float
    out: fx.Node  # the layer_norm call, which the op's first output replaces
    consumed: list
    location: str
    written_out: bool = False


def _arguments(node) -> dict:
    """The call's arguments by name (F.layer_norm's signature; torch.layer_norm's trailing cudnn flag aside)."""
    if len(node.args) > len(_PARAMS) + 1:
        raise Reject(f"layer_norm with {len(node.args)} positional arguments")
    got = dict(zip(_PARAMS, node.args))
    for k, v in node.kwargs.items():
        if k == "cudnn_enable":
            continue
        if k not in _PARAMS or k in got:
            raise Reject(f"layer_norm with an unexpected argument {k!r}")
        got[k] = v
    got.setdefault("weight", None)
    got.setdefault("bias", None)
    got.setdefault("eps", 1e-5)
    if "input" not in got or "normalized_shape" not in got:
        raise Reject("layer_norm without its input or normalized_shape")
    return got


def match_at(node: fx.Node, ctx) -> LayerNormMatch:
    """Try to match the layer_norm call `node`; raise Reject(reason) if fxopt::layer_norm cannot replace it."""
    a = _arguments(node)
    xin, shape, weight, bias, eps = a["input"], a["normalized_shape"], a["weight"], a["bias"], a["eps"]
    xv, ov = value(xin), value(node)
    if xv is None or ov is None:
        raise Reject("no recorded tensor metadata")
    if xv.dtype not in FLOATS:
        raise Reject(f"input dtype {xv.dtype} not supported")
    if isinstance(eps, fx.Node) or not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise Reject("eps is not a constant number")
    n = static_int(xv.shape[-1]) if xv.dim() >= 1 else None
    if n is None:
        raise Reject("symbolic or missing hidden size")
    dims = list(shape) if isinstance(shape, (list, tuple, torch.Size)) else [shape]
    if len(dims) != 1 or static_int(dims[0]) != n:
        raise Reject(f"normalized_shape {dims} is not the last dimension ({n}) alone")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        tv = value(t) if isinstance(t, fx.Node) else None
        if tv is None:
            raise Reject(f"{name} is not a tensor of the graph")
        if tv.dim() != 1 or static_int(tv.shape[0]) != n:
            raise Reject(f"{name} of shape {list(tv.shape)} for a hidden size of {n}")
        if tv.dtype not in FLOATS or tv.device != xv.device:
            raise Reject(f"{name} of dtype {tv.dtype} on {tv.device} (input: {xv.dtype} on {xv.device})")
    if ov.dtype != xv.dtype or tuple(ov.shape) != tuple(xv.shape):
        raise Reject(f"output {ov.dtype} where the op gives the input's {xv.dtype}")

    add_ops = residual_add(xin)
    x, residual, add = (xin, None, None) if add_ops is None else (add_ops[0], add_ops[1], xin)
    return LayerNormMatch(x, residual, add, weight, bias, float(eps), node, [node],
                          ctx.locate(weight if weight is not None else node, module_path(node, ctx.prefix)))


def deviation(var_mean: fx.Node):
    """(h, mu, d) when `var_mean` is a mean of the square of d = h - mean(h) (a LayerNorm's variance), else None."""
    if not _call(var_mean, MEAN_TARGETS, "mean") or not var_mean.args:
        return None
    return squared_deviation(var_mean.args[0])


def _affine_operand(node, n, width):
    """(tensor, absorbed cast nodes) when `node` is n * t, t * n, n + t or t + n for a 1-D tensor t of `width`
    elements (an up-cast of it to fp32 absorbed: the op computes in fp32); else None (then node is not the
    norm's weight or bias: e.g. the next residual add, or a product with the block input)."""
    t = _other(node, n)
    if not isinstance(t, fx.Node) or value(t) is None:
        return None
    absorbed = []
    if cast_dtype(t) == torch.float32 and len(t.users) == 1 and value(t.args[0]) is not None:
        t, absorbed = t.args[0], [t]
    tv = value(t)
    if tv.dim() != 1 or static_int(tv.shape[0]) != width:
        return None
    return t, absorbed


def match_written_out(var_mean: fx.Node, ctx) -> LayerNormMatch:
    """The LayerNorm written out whose variance is `var_mean` (see deviation); raise Reject(reason) if not."""
    h, mu, d = deviation(var_mean)
    hv = value(h)
    if hv is None or value(var_mean) is None:
        raise Reject("no recorded tensor metadata")
    _check_mean(mu, h)
    _check_mean(var_mean, d)
    up, xin, xv = fp32_input(h)
    sq = var_mean.args[0]
    consumed = [mu, d, sq, var_mean]
    _single_user(sq, "the squared deviation")
    ve = _single_user(var_mean, "the variance")
    eps = _other(ve, var_mean) if is_call(ve, ADD_TARGETS) else None
    if not _is_number(eps):
        raise Reject("the variance is not added to a constant eps")
    root = _single_user(ve, "variance + eps")
    n = _single_user(root, "the reciprocal root")
    if not (_call(root, RSQRT_TARGETS, "rsqrt") and len(root.args) == 1 and is_call(n, MUL_TARGETS)):
        raise Reject("variance + eps does not go through rsqrt into a multiply")
    d2 = _other(n, root)
    if d2 is not d and not ((is_call(d2, SUB_TARGETS) or is_method(d2, "sub")) and d2.args == (h, mu)
                            and not d2.kwargs):
        raise Reject("the reciprocal root does not multiply the deviation from the mean")
    consumed += [ve, root, n] + ([d2] if d2 is not d else [])
    checks = [(d, {sq, n} if d2 is d else {sq}, "the deviation"), (mu, {d, d2}, "the mean")]
    if d2 is not d:
        checks.append((d2, {n}, "the deviation"))
    for node, allowed, what in checks:
        if not set(node.users) <= allowed:
            raise Reject(f"{what} is also used elsewhere")
    if up is not None:
        if not set(h.users) <= {mu, d, d2}:
            raise Reject("the fp32 input is also used elsewhere")
        consumed.insert(0, h)

    width = static_int(xv.shape[-1])
    if width is None:
        raise Reject("symbolic or missing hidden size")
    weight = bias = None
    out = n
    nxt = only_user(n)  # None when n is read more than once: then n itself is the output
    affine = _affine_operand(nxt, n, width) if is_call(nxt, MUL_TARGETS) else None
    if affine is not None:
        (weight, absorbed), out = affine, nxt
        consumed += absorbed + [nxt]
        nxt = only_user(nxt)
    affine = _affine_operand(nxt, out, width) if is_call(nxt, ADD_TARGETS) else None
    if affine is not None:
        (bias, absorbed), out = affine, nxt
        consumed += absorbed + [nxt]
        nxt = only_user(nxt)
    if nxt is not None and cast_dtype(nxt) == xv.dtype and xv.dtype != torch.float32:
        consumed.append(nxt)
        out = nxt
    elif xv.dtype != torch.float32:
        raise Reject(f"the fp32 result is not cast back to {xv.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        tv = None if t is None else value(t)
        if t is not None and (tv.dtype not in FLOATS or tv.device != xv.device):
            raise Reject(f"{name} of dtype {tv.dtype} on {tv.device} (input: {xv.dtype} on {xv.device})")
    if value(out).dtype != xv.dtype:
        raise Reject(f"output {value(out).dtype} where the op gives the input's {xv.dtype}")

    add_ops = residual_add(xin)
    x, residual, add = (xin, None, None) if add_ops is None else (add_ops[0], add_ops[1], xin)
    return LayerNormMatch(x, residual, add, weight, bias, float(eps), out, consumed,
                          ctx.locate(weight, module_path(var_mean, ctx.prefix)), written_out=True)


def run(gm: fx.GraphModule, ctx) -> list[MatchRecord]:
    from fxopt.kernels import layer_norm as _ln_kernels  # noqa: F401  (registers torch.ops.fxopt.layer_norm)

    records = []
    changed = False
    erased = set()
    for node in list(gm.graph.nodes):
        if node in erased:
            continue
        try:
            if is_call(node, LAYER_NORM_TARGETS):
                m = match_at(node, ctx)
            elif deviation(node) is not None:
                m = match_written_out(node, ctx)
            else:
                continue
        except Reject as e:
            records.append(MatchRecord(NAME, module_path(node, ctx.prefix), "rejected", str(e), ctx.graph_name))
            continue
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        folded, gone = rewrite_norm(gm, m, order, torch.ops.fxopt.layer_norm.default,
                                    lambda x, residual, m=m: (x, m.weight, m.bias, residual, m.eps),
                                    [m.weight, m.bias], stats=2)
        erased |= gone
        changed = True
        parts = [p for p, t in (("weight", m.weight), ("bias", m.bias)) if t is not None]
        detail = (f"fxopt::layer_norm{' (written out)' if m.written_out else ''}, "
                  f"{' + '.join(parts) or 'no affine'}, eps={m.eps:g}")
        records.append(MatchRecord(NAME, m.location, "matched",
                                   detail + (", residual add folded" if folded else ""), ctx.graph_name))
    if changed:
        gm.graph.lint()
        gm.recompile()
    return records
