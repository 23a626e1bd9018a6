"""Fused loss: lm_head linear + (softcap) + fp32 cross-entropy -> fxopt::linear_cross_entropy (chunked; the
[tokens x vocab] logits are never materialised, nor their fp32 copy).

Pattern (a causal-LM head and HF's loss function, as Dynamo captures them, after canonicalize):
    z = linear(h, W[, b])                              the lm_head; z may also be returned (outputs.logits)
    z = z * s | z / s                                  optional constant logit scale (Cohere, Granite)
    z = (tanh(z / c) * c)?                             optional final-logit softcap (Gemma 2)
    loss = cross_entropy(z.float().view(-1, V), target, ignore_index=i, reduction="mean" | "sum")
Rewrite: loss_sum = fxopt::linear_cross_entropy(h.reshape(-1, H), W, b, target, i, c, need_grads)[0], then
/ count(target != i) for "mean" ("sum" is divided by num_items_in_batch by the graph after it, unchanged).
A logit scale s multiplies h instead: (h s) W^T = s (h W^T) for a head without bias (a head with a bias and a
scale is not matched); the [N, H] input is scaled, not the [N, V] logits.
If z is also a graph output and gradients are on (training), that output becomes an empty [B, 0, V] tensor
unless config.keep_logits, in which case nothing is matched. Without gradients (eval) z stays real and
nothing is matched when it is returned. Not matched: class weights, label smoothing, reduction "none",
a linear whose logits (or an intermediate) are used elsewhere, non-fp32 loss input.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.kernels import cross_entropy as _kernel  # noqa: F401  (registers torch.ops.fxopt.linear_cross_entropy)
from fxopt.passes.graph_utils import (
    LINEAR_TARGETS, Reject, cast_dtype, is_call, is_method, linear_args, module_path, static_int, value)
from fxopt.report import MatchRecord

NAME = "cross_entropy"
DESCRIPTION = "lm_head linear + cross-entropy -> fxopt::linear_cross_entropy (chunked, no full logits)"
CE_TARGETS = (F.cross_entropy, torch.nn.functional.cross_entropy)
TANH_TARGETS = (torch.tanh, torch.ops.aten.tanh.default)
DIV_TARGETS = (operator.truediv, torch.div)


def _ce_options(ce):
    """(input, target, ignore_index, reduction) of a cross_entropy call; Reject for what the op lacks."""
    names = ["input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing"]
    opts = dict(zip(names, ce.args))
    opts.update(ce.kwargs)
    if opts.get("weight") is not None:
        raise Reject("class weights: not supported")
    if opts.get("size_average") is not None or opts.get("reduce") is not None:
        raise Reject("legacy size_average/reduce arguments: not supported")
    if float(opts.get("label_smoothing", 0.0) or 0.0) != 0.0:
        raise Reject("label smoothing: not supported")
    reduction = opts.get("reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise Reject(f"reduction={reduction!r}: not supported")
    ignore = opts.get("ignore_index", -100)
    if not isinstance(ignore, int):
        raise Reject("ignore_index is not a constant")
    return opts["input"], opts["target"], ignore, reduction


def _softcap(node):
    """If node is `tanh(z / c) * c` (or `c * tanh(z * (1/c))`), return (z, c, [chain nodes]); else None."""
    if not is_call(node, (operator.mul, torch.mul)) or len(node.args) != 2:
        return None
    a, b = node.args
    t, c = (a, b) if isinstance(b, (int, float)) else (b, a)
    if not isinstance(c, (int, float)) or c <= 0 or not is_call(t, TANH_TARGETS):
        return None
    d = t.args[0]
    if is_call(d, DIV_TARGETS) and d.args[1] == c:
        return d.args[0], float(c), [d, t, node]
    if is_call(d, (operator.mul, torch.mul)) and isinstance(d.args[1], float) and abs(d.args[1] * c - 1) < 1e-12:
        return d.args[0], float(c), [d, t, node]
    return None


def _scale(node):
    """If node is `z * s`, `s * z` or `z / s` for a constant number s, return (z, s as a multiplier, [node])."""
    if not is_call(node, (operator.mul, torch.mul) + DIV_TARGETS) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    number = (int, float)
    if is_call(node, DIV_TARGETS):
        ok = isinstance(a, fx.Node) and isinstance(b, number) and not isinstance(b, bool) and b != 0
        return (a, 1.0 / float(b), [node]) if ok else None
    z, s = (a, b) if isinstance(b, number) else (b, a)
    if not isinstance(z, fx.Node) or not isinstance(s, number) or isinstance(s, bool):
        return None
    return z, float(s), [node]


def _match(ce, ctx):
    inp, target, ignore, reduction = _ce_options(ce)
    chain = []  # nodes between the loss input and the logits, which must feed nothing else
    node = inp
    while True:
        if is_method(node, "view") or is_method(node, "reshape"):
            chain.append(node)
            node = node.args[0]
        elif cast_dtype(node) is not None:
            chain.append(node)
            node = node.args[0]
        else:
            break
    logits = node  # what the model computes (and may return): after the softcap if any
    softcap, head_chain = 0.0, []
    capped = _softcap(logits)
    if capped is not None:
        node, softcap, head_chain = capped
    scale = 1.0
    scaled = _scale(node)
    if scaled is not None and is_call(scaled[0], LINEAR_TARGETS):
        node, scale, chain_s = scaled
        head_chain = chain_s + head_chain
    if not is_call(node, LINEAR_TARGETS):
        raise Reject("the loss input does not come from a linear (lm_head)")
    linear = node
    h, w, b = linear_args(linear)
    if scale != 1.0 and b is not None:
        raise Reject("a logit scale over a head with a bias: not supported")
    vi, vw, vh, vt = value(inp), value(w), value(h), value(target)
    if vi is None or vw is None or vh is None or vt is None:
        raise Reject("no example values on the graph")
    if vi.dtype != torch.float32 or vi.dim() != 2:
        raise Reject(f"loss input is {vi.dtype} with {vi.dim()} dims; the op computes HF's fp32 loss on [N, V]")
    if vt.dtype != torch.int64 or vt.dim() != 1:
        raise Reject("target is not a flat int64 tensor")
    if vh.dtype not in (torch.float32, torch.float16, torch.bfloat16) or vw.dtype != vh.dtype:
        raise Reject(f"head dtypes {vh.dtype}/{vw.dtype}: not supported")
    V, H = static_int(vw.shape[0]), static_int(vw.shape[1])
    if V is None or H is None or static_int(vi.shape[1]) != V:
        raise Reject("vocab or hidden size is symbolic, or the loss input is not [N, vocab]")
    if vw.device.type == "cuda" and V >= 2**31 // max(1, H):
        raise Reject("weight too large for 32-bit indexing")
    # every intermediate feeds only the next node; the logits (and the softcap's steps) may also be returned
    need_grads = [bool(t.requires_grad) for t in (vh, vw)] + [bool(value(b) is not None and value(b).requires_grad)]
    seq = [linear] + head_chain + list(reversed(chain))  # from the linear to the loss input
    returned = []
    for i, n in enumerate(seq):
        nxt = seq[i + 1] if i + 1 < len(seq) else ce
        others = [u for u in n.users if u is not nxt]
        if any(u.op != "output" for u in others):
            raise Reject(f"{n.name} is also used by {', '.join(u.name for u in others if u.op != 'output')}")
        if others:
            returned.append(n)
    if returned and not any(need_grads):
        raise Reject("the logits are returned and no gradient is taken (evaluation): left unfused")
    if returned and ctx.config.keep_logits:
        raise Reject("the logits are returned and config.keep_logits is set: left unfused")
    where = ctx.locate(w, module_path(linear, ctx.prefix))
    return dict(ce=ce, linear=linear, h=h, w=w, b=b, target=target, ignore=ignore, reduction=reduction,
                softcap=softcap, scale=scale, need_grads=need_grads, returned=returned, dead=seq, H=H, V=V, where=where)


def _rewrite(gm, m):
    g = gm.graph
    ce, h = m["ce"], m["h"]
    with g.inserting_before(ce):
        x2 = g.call_method("reshape", (h, -1, m["H"]))
        if m["scale"] != 1.0:  # s (h W^T) as (s h) W^T: the scale on the [N, H] input, not the [N, V] logits
            x2 = g.call_function(operator.mul, (x2, m["scale"]))
        op = g.call_function(torch.ops.fxopt.linear_cross_entropy.default,
                             (x2, m["w"], m["b"], m["target"], m["ignore"], m["softcap"], m["need_grads"]))
        loss = g.call_function(operator.getitem, (op, 0))
        if m["reduction"] == "mean":  # HF: mean over the rows that are not ignored (0/0 = nan, as F.cross_entropy)
            valid = g.call_method("sum", (g.call_function(operator.ne, (m["target"], m["ignore"])),))
            loss = g.call_function(operator.truediv, (loss, valid))
    ce.replace_all_uses_with(loss)
    g.erase_node(ce)
    for r in m["returned"]:  # the returned logits: an empty [B, 0, V] (loud if used), not a [B, T, V] tensor
        vr = value(r)
        with g.inserting_before(next(n for n in g.nodes if n.op == "output")):
            lead = [g.call_method("size", (h, 0))] if vr.dim() == 3 else []
            stub = g.call_method("new_empty", (h, tuple(lead) + (0, m["V"])), {"dtype": vr.dtype})
        for u in list(r.users):
            if u.op == "output":
                u.replace_input_with(r, stub)
    for n in reversed(m["dead"]):
        if not n.users:
            g.erase_node(n)


def run(gm: fx.GraphModule, ctx) -> list[MatchRecord]:
    records = []
    for ce in [n for n in gm.graph.nodes if is_call(n, CE_TARGETS)]:
        try:
            m = _match(ce, ctx)
        except Reject as e:
            records.append(MatchRecord(NAME, module_path(ce, ctx.prefix), "rejected", str(e), ctx.graph_name))
            continue
        _rewrite(gm, m)
        detail = (f"fxopt::linear_cross_entropy, vocab={m['V']}, reduction={m['reduction']}"
                  + (f", logit scale={m['scale']:g}" if m["scale"] != 1.0 else "")
                  + (f", softcap={m['softcap']:g}" if m["softcap"] else "")
                  + (", returned logits replaced by an empty tensor" if m["returned"] else ""))
        records.append(MatchRecord(NAME, m["where"], "matched", detail, ctx.graph_name))
    if records:
        gm.graph.lint()
        gm.recompile()
    return records
