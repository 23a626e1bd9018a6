"""Canonicalize the graph before matching, so that each fusion needs one pattern, not one per variant.

Drops ops that do nothing: `t * 1.0` / `1.0 * t`, `t.to(dtype)` to the dtype t already has, `t.contiguous()`
on a value whose recorded layout is already contiguous. Each such node is replaced by its input.
"""
from __future__ import annotations

import torch

from fxopt.passes.graph_utils import MUL_TARGETS, cast_dtype, is_call, is_method, value


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
    """Rewrite no-op nodes away in place; returns how many were removed."""
    removed = 0
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
