"""Canonicalize the graph before matching, so that each fusion needs one pattern, not one per variant.

Drops ops that do nothing: `t * 1.0` / `1.0 * t`, `t.to(dtype)` to the dtype t already has, `t.contiguous()`
on a value whose recorded layout is already contiguous. Each such node is replaced by its input.
Writes `x @ W.T` (W a 2-D tensor, transposed by `.T`, `.t()`, `.transpose(0, 1)`, `.mT`) as F.linear(x, W): the
same product (a linear layer written out, as Falcon's), so that the passes see one form of a linear.
"""
from __future__ import annotations

import operator

import torch

from fxopt.passes.graph_utils import MUL_TARGETS, cast_dtype, is_call, is_method, value

MATMUL_TARGETS = (operator.matmul, torch.matmul)


def _transposed(node):
    """W when node is W transposed (W 2-D), else None."""
    if is_call(node, (getattr,)) and len(node.args) == 2 and node.args[1] in ("T", "mT"):
        w = node.args[0]
    elif (is_method(node, "t") or is_call(node, (torch.t,))) and len(node.args) == 1 and not node.kwargs:
        w = node.args[0]
    elif (is_method(node, "transpose") or is_call(node, (torch.transpose,))) and len(node.args) == 3 \
            and not node.kwargs and all(isinstance(a, int) for a in node.args[1:]) \
            and {node.args[1] % 2, node.args[2] % 2} == {0, 1}:
        w = node.args[0]
    else:
        return None
    wv = value(w)
    return w if wv is not None and wv.dim() == 2 else None


def _matmuls_as_linear(gm) -> int:
    """Rewrite `x @ W.T` as F.linear(x, W) (see the module doc); returns how many."""
    done = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, MATMUL_TARGETS) or len(node.args) != 2 or node.kwargs:
            continue
        x, wt = node.args
        w = _transposed(wt)
        xv, wv, ov = value(x), value(w), value(node)
        if w is None or xv is None or ov is None or xv.dim() < 2 or xv.dtype != wv.dtype or xv.device != wv.device:
            continue
        with gm.graph.inserting_before(node):
            linear = gm.graph.call_function(torch._C._nn.linear, (x, w, None))
        linear.meta.update(node.meta)
        node.replace_all_uses_with(linear)
        gm.graph.erase_node(node)
        if not wt.users:
            gm.graph.erase_node(wt)
        done += 1
    return done


def _noop_input(node):
    if is_call(node, MUL_TARGETS) and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if isinstance(b, (int, float)) and not isinstance(b, bool) and b == 1 and value(a) is not None:
            return a
        if isinstance(a, (int, float)) and not isinstance(a, bool) and a == 1 and value(b) is not None:
            return b
    dtype = cast_dtype(node)
    if dtype is not None:
        src = value(node.args[0])
        if src is not None and src.dtype == dtype:
            return node.args[0]
    if is_method(node, "contiguous") and len(node.args) == 1 and not node.kwargs:
        src = value(node.args[0])
        try:
            if src is not None and src.is_contiguous():
                return node.args[0]
        except Exception:  # symbolic strides whose contiguity cannot be decided: keep the op
            return None
    return None


def canonicalize(gm: torch.fx.GraphModule) -> int:
    """Rewrite no-op nodes away and matmuls by a transposed weight as linears, in place; returns how many nodes
    were rewritten."""
    removed = _matmuls_as_linear(gm)
    for node in list(gm.graph.nodes):
        src = _noop_input(node)
        if src is None:
            continue
        out, inp = value(node), value(src)
        if out is None or inp is None or out.dtype != inp.dtype or out.shape != inp.shape:
            continue
        # aliasing the input is only safe when nothing downstream mutates the value in place
        if any(isinstance(u.target, str) and u.target.endswith("_") for u in node.users):
            continue
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        removed += 1
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed
