"""Fused LoRA linear: base `linear(x, W[, b])` plus `s * linear(linear(dropout?(x), A), B)` -> fxopt::lora_linear.

Pattern (as Dynamo captures a PEFT LoRA linear, after canonicalize):
    r = linear(x, W[, b])                   base layer
    xl = dropout?(x.to(adapter dtype)?)     optional cast and dropout (PEFT's lora_dropout)
    u = linear(linear(xl, A), B)            the adapter
    v = u * s                               optional scale (lora_alpha / r, or rslora's)
    y = (r + v).to?(x.dtype)                PEFT sums in the adapter dtype, then casts back
Horizontal fusion: matches that read the same x with no dropout (q/k/v, gate/up) become ONE op, which
computes x @ [A_q; A_k; A_v]^T as one GEMM and reads x once for the adapters.
Not matched (reported): DoRA (the adapter output is rescaled by a tensor), several active adapters on one
layer, a bias on an adapter matrix, and any intermediate value used elsewhere.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxopt.passes.graph_utils import (
    FLOATS, ADD_TARGETS, DROPOUT_TARGETS, LINEAR_TARGETS, MUL_TARGETS, Reject, cast_dtype, is_call, linear_args,
    module_path, only_user, static_int, value)
from fxopt.report import MatchRecord

NAME = "lora"
DESCRIPTION = "PEFT LoRA linear (base + scaled low-rank adapter) -> fxopt::lora_linear, q/k/v and gate/up fused"


@dataclass
class LoraMatch:
    x: fx.Node
    x_lora: fx.Node | None  # input of the adapter when it differs from x (dropout); None: the adapter reads x
    weight: fx.Node
    bias: fx.Node | None
    lora_a: fx.Node
    lora_b: fx.Node
    scaling: float
    out: fx.Node  # the node whose value the op replaces
    consumed: list  # nodes of the pattern that die once `out` is replaced, in graph order
    location: str
    compute: torch.dtype | None = None  # under autocast: its dtype, which the op's operands are cast to


def adapter_root(xl, stop=None):
    """Walk back from an adapter's input through casts and at most one dropout. Returns (root, exact,
    has_dropout); exact: no down-cast on the way, so the root holds the values the adapter reads.
    With `stop`: the walk ends there (root = stop), and None is returned when it never passes it.
    Shared with the qlora pass, which matches the same adapter on a 4-bit base."""
    node, has_dropout, exact = xl, False, True
    while True:
        if node is stop:
            return node, exact, has_dropout
        dtype = cast_dtype(node)
        if dtype is not None:
            src = value(node.args[0])
            if src is None or not src.dtype.is_floating_point or dtype.itemsize < src.dtype.itemsize:
                exact = False  # a down-cast rounds: the kernel must see the rounded values
            node = node.args[0]
            continue
        if is_call(node, DROPOUT_TARGETS):
            if has_dropout:
                raise Reject("two dropouts on the adapter input")
            inplace = node.kwargs.get("inplace", node.args[3] if len(node.args) > 3 else False)
            if inplace:
                raise Reject("in-place dropout on the adapter input")
            has_dropout = True
            node = node.args[0]
            continue
        return (node, exact, has_dropout) if stop is None else None


def adapter_branch(node):
    """If `node` looks like an adapter output `(linear(linear(_, A), B) * s).to?(dtype)`, return its nodes
    (cast or None, mul or None, u = linear(_, B)); else None. Only says "an adapter is here": checks come later."""
    cast = None
    if cast_dtype(node) is not None:
        cast, node = node, node.args[0]
    mul = None
    if is_call(node, MUL_TARGETS) and len(node.args) == 2:
        for i in (0, 1):
            if is_call(node.args[i], LINEAR_TARGETS) and is_call(linear_args(node.args[i])[0], LINEAR_TARGETS):
                mul, node = node, node.args[i]
                break
    if is_call(node, LINEAR_TARGETS) and is_call(linear_args(node)[0], LINEAR_TARGETS):
        return cast, mul, node
    return None


def adapter_scale(mul, u) -> float:
    """The constant s of `mul = u * s`; Reject for a scale the kernels cannot take as a constant."""
    other = mul.args[1] if mul.args[0] is u else mul.args[0]
    if isinstance(other, fx.Node) and value(other) is None:
        raise Reject("adapter scale is a runtime number (Dynamo made the float dynamic, e.g. after a "
                     "change of lora_alpha): not supported")
    if not isinstance(other, (int, float)) or isinstance(other, bool):
        raise Reject("adapter output is scaled by a tensor (DoRA or a custom scale): not supported")
    return float(other)


def autocast_dtype(x: fx.Node):
    """The dtype autocast computes x's linears in, when this graph is compiled under an active autocast (its
    state is global while Dynamo traces, and guarded by the compiled code) and no autocast region starts or
    ends inside the graph; else None."""
    xv = value(x)
    if xv is None or not torch.is_autocast_enabled(xv.device.type):
        return None
    if any(n.op == "call_function" and "autocast" in getattr(n.target, "__name__", "") for n in x.graph.nodes):
        return None
    return torch.get_autocast_dtype(xv.device.type)


def _separate_bias(r):
    """(linear(x, W), the add) when r = linear(x, W) + b for a 1-D b of the linear's dtype and output width (the
    op adds it in its epilogue, rounding once where the graph rounds the product and then the sum), else None."""
    if not is_call(r, ADD_TARGETS) or len(r.args) != 2 or r.kwargs:
        return None
    for lin, b in (r.args, r.args[::-1]):
        if is_call(lin, LINEAR_TARGETS) and linear_args(lin)[2] is None and len(lin.users) == 1:
            lv, bv = value(lin), value(b)
            if lv is not None and bv is not None and bv.dim() == 1 and bv.dtype == lv.dtype \
                    and lv.dim() >= 1 and bv.shape[0] == lv.shape[-1] and not adapter_branch(lin):
                return lin, r
    return None


def _check_single_use(node, what):
    if len(node.users) != 1:
        raise Reject(f"{what} is also used elsewhere ({len(node.users)} users)")


def match_at(u: fx.Node, ctx) -> LoraMatch:
    """Try to match a LoRA linear whose adapter output is `u = linear(t, B)`; raise Reject(reason) if not."""
    t, lora_b, b_bias = linear_args(u)
    xl, lora_a, a_bias = linear_args(t)
    if a_bias is not None or b_bias is not None:
        raise Reject("adapter matrix with a bias")
    _check_single_use(t, "adapter hidden x@A^T")
    x, exact, has_dropout = adapter_root(xl)
    x_lora = xl if has_dropout or not exact else None
    consumed = [t, u]

    v, scale = u, 1.0
    user = only_user(u)
    if user is None:
        raise Reject("adapter output is used more than once")
    if is_call(user, MUL_TARGETS):
        v, scale = user, adapter_scale(user, u)
        consumed.append(v)
        user = only_user(v)
        if user is None:
            raise Reject("scaled adapter output is used more than once")
    if not is_call(user, ADD_TARGETS) or len(user.args) != 2 or user.kwargs:
        raise Reject(f"adapter output feeds {user.target if isinstance(user.target, str) else getattr(user.target, '__name__', user.target)}, not an add onto a base linear (DoRA?)")
    add = user
    r = add.args[0] if add.args[1] is v else add.args[1]
    base_bias = _separate_bias(r)  # linear(x, W) + b, the bias added after the product (Falcon's linear)
    if base_bias is not None:
        r, bias_add = base_bias
    if not is_call(r, LINEAR_TARGETS):
        if is_call(r, ADD_TARGETS) and any(adapter_branch(a) for a in r.args):
            raise Reject("several active adapters on one layer: not supported")
        raise Reject("the adapter is not added to a linear of the same input")
    rx, weight, bias = linear_args(r)
    if base_bias is not None:
        bias = bias_add.args[1] if bias_add.args[0] is r else bias_add.args[0]
        _check_single_use(bias_add, "base output with its bias")
        consumed.append(bias_add)
    if rx is not x:
        # the base may read a node on the adapter input's chain (x itself a cast, or a dropout output of an
        # earlier layer): then that node is x, and only the part of the chain after it belongs to the adapter
        seg = adapter_root(xl, stop=rx)
        if seg is None:
            raise Reject("base linear and adapter read different inputs")
        x, exact, has_dropout = seg
        x_lora = xl if has_dropout or not exact else None
    _check_single_use(r, "base linear output")
    consumed += [r, add]

    out = add
    xv, addv = value(x), value(add)
    if xv is None or addv is None:
        raise Reject("no recorded tensor metadata")
    compute = autocast_dtype(x)  # under autocast every linear here computes in its dtype
    want = compute or xv.dtype
    if addv.dtype != want:
        cast = only_user(add)
        if cast is None or cast_dtype(cast) != want:
            raise Reject(f"the {addv.dtype} sum is used before being cast back to {want}")
        out = cast
        consumed.append(cast)
    for a in out.users:
        if is_call(a, ADD_TARGETS) and any(adapter_branch(arg) for arg in a.args if arg is not out):
            raise Reject("several active adapters on one layer: not supported")
    _guard(x, x_lora, weight, bias, lora_a, lora_b, compute)
    return LoraMatch(x, x_lora, weight, bias, lora_a, lora_b, scale, out, consumed,
                     ctx.locate(weight, module_path(add, ctx.prefix)), compute)


def _guard(x, x_lora, weight, bias, lora_a, lora_b, compute=None):
    """What fxopt::lora_linear supports; decided on static sizes only (the token count stays symbolic).
    compute: the autocast dtype, when the op will get every operand cast to it (as autocast casts them)."""
    xv, wv, av, bv = value(x), value(weight), value(lora_a), value(lora_b)
    if any(v is None for v in (xv, wv, av, bv)):
        raise Reject("no recorded tensor metadata")
    if compute is not None:
        if compute not in FLOATS or any(v.dtype not in FLOATS for v in (xv, wv, av, bv)):
            raise Reject(f"autocast to {compute} with operands {xv.dtype}/{wv.dtype}/{av.dtype} not supported")
    elif xv.dtype not in FLOATS or wv.dtype != xv.dtype:
        raise Reject(f"input/weight dtypes {xv.dtype}/{wv.dtype} not supported (need equal fp32/fp16/bf16)")
    if av.dtype not in FLOATS or bv.dtype != av.dtype:
        raise Reject(f"adapter dtypes {av.dtype}/{bv.dtype} not supported")
    if wv.dim() != 2 or av.dim() != 2 or bv.dim() != 2 or xv.dim() < 1:
        raise Reject("unexpected ranks of weight or adapter matrices")
    n, k = (static_int(s) for s in wv.shape)
    r, ka = (static_int(s) for s in av.shape)
    nb, rb = (static_int(s) for s in bv.shape)
    kx = static_int(xv.shape[-1])
    if None in (n, k, r, ka, nb, rb, kx):
        raise Reject("symbolic weight or feature sizes")
    if not (k == ka == kx and n == nb and r == rb):
        raise Reject(f"shape mismatch W{[n, k]} A{[r, ka]} B{[nb, rb]} x[..., {kx}]")
    if bias is not None:
        biasv = value(bias)
        if biasv is None or (compute is None and biasv.dtype != xv.dtype) or tuple(biasv.shape) != (n,):
            raise Reject("bias of unexpected dtype or shape")
    if len({t.device for t in (xv, wv, av, bv)}) != 1:
        raise Reject("tensors on different devices")
    if x_lora is not None and (value(x_lora) is None or tuple(value(x_lora).shape) != tuple(xv.shape)):
        raise Reject("adapter input of another shape")


def _group(matches, order):
    """Matches that read the same x without dropout share one op (horizontal fusion); others stay alone.
    The op goes after the last of its group's inputs, so a member joins a group only if that point still
    precedes every use of every member's output (else it starts a new group: e.g. one output is read before
    the other linear's weight is computed)."""
    groups, current = [], {}
    for m in sorted(matches, key=lambda m: order[m.out]):
        key = (m.x, value(m.lora_a).dtype) if m.x_lora is None else None
        g = current.get(key) if key is not None else None
        if g is not None and _fits(g + [m], order):
            g.append(m)
            continue
        groups.append([m])
        if key is not None:
            current[key] = groups[-1]
    return groups


def _inputs(group):
    m0 = group[0]
    return [m0.x, m0.x_lora] + [n for m in group for n in (m.weight, m.bias, m.lora_a, m.lora_b)]


def _fits(group, order) -> bool:
    last_input = max(order[n] for n in _inputs(group) if isinstance(n, fx.Node))
    return all(order[u] > last_input for m in group for u in m.out.users)


def _rewrite(gm, group, order):
    graph = gm.graph
    m0 = group[0]
    anchor = max((n for n in _inputs(group) if isinstance(n, fx.Node)), key=order.__getitem__)
    replaced = {}
    with graph.inserting_before(anchor.next):
        cast = functools.partial(_cast, graph, m0.compute)  # autocast: the casts autocast would make
        args = (cast(m0.x), [cast(m.weight) for m in group], [cast(m.bias) for m in group if m.bias is not None],
                [cast(m.lora_a) for m in group], [cast(m.lora_b) for m in group], [m.scaling for m in group],
                cast(m0.x_lora), [m.bias is not None for m in group])
        op = graph.call_function(torch.ops.fxopt.lora_linear.default, args)
    op.meta.update({k: v for k, v in m0.out.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    op.meta["example_value"] = [value(m.out) for m in group]
    prev = op
    for i, m in enumerate(group):
        with graph.inserting_after(prev):
            item = graph.call_function(operator.getitem, (op, i))
        item.meta.update(m.out.meta)
        m.out.replace_all_uses_with(item)
        replaced[m.out] = item
        prev = item
    for m in group:
        dead = list(m.consumed)
        # the adapter-input casts die too when the op reads x directly
        node = linear_args(m.consumed[0])[0]
        while m.x_lora is None and node is not m.x and isinstance(node, fx.Node):
            dead.append(node)
            node = node.args[0]
        for n in sorted(set(dead), key=order.__getitem__, reverse=True):
            if not n.users:
                graph.erase_node(n)
    return replaced


def _cast(graph, dtype, node):
    v = value(node) if isinstance(node, fx.Node) else None
    if dtype is None or v is None or v.dtype == dtype:
        return node
    c = graph.call_method("to", (node, dtype))
    c.meta["example_value"] = v.new_empty(v.shape, dtype=dtype)
    return c


def run(gm: fx.GraphModule, ctx) -> list[MatchRecord]:
    from fxopt.kernels import lora as _lora_kernels  # noqa: F401  (registers torch.ops.fxopt.lora_linear)

    records, matches = [], []
    for node in list(gm.graph.nodes):
        if not (is_call(node, LINEAR_TARGETS) and is_call(linear_args(node)[0], LINEAR_TARGETS)):
            continue
        try:
            matches.append(match_at(node, ctx))
        except Reject as e:
            where = ctx.locate(linear_args(node)[1], module_path(node, ctx.prefix))
            records.append(MatchRecord(NAME, where, "rejected", str(e), ctx.graph_name))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    replaced = {}  # out of an already rewritten match -> the node that now carries its value
    for group in _group(matches, order):
        # a later match may read an earlier one's output (stacked LoRA linears): point it at the new node
        group = [dataclasses.replace(m, **{f: replaced.get(getattr(m, f), getattr(m, f))
                                           for f in ("x", "x_lora", "weight", "bias", "lora_a", "lora_b")})
                 for m in group]
        replaced.update(_rewrite(gm, group, order))
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        names = [m.location for m in group]
        for m in group:
            fused = f" (one op with {', '.join(n.rsplit('.', 1)[-1] for n in names if n != m.location)})" if len(group) > 1 else ""
            detail = f"fxopt::lora_linear, r={static_int(value(m.lora_a).shape[0])}, scale={m.scaling:g}"
            detail += ", dropout kept" if m.x_lora is not None else ""
            detail += f", under autocast to {str(m.compute).removeprefix('torch.')}" if m.compute else ""
            records.append(MatchRecord(NAME, m.location, "matched", detail + fused, ctx.graph_name))
    if matches:
        gm.graph.lint()
        gm.recompile()
    return records
