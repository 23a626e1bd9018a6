"""RMSNorm, and the residual add feeding it, -> fxopt::rms_norm.

Pattern (as Dynamo captures it, after canonicalize drops casts to the dtype a value already has):
    s  = a + b                              optional residual add, folded into the op (see below)
    h  = s.to(float32)                      absent when s is already fp32
    q  = h.pow(2) | h * h | h.square()
    r  = rsqrt(q.mean(-1, keepdim=True) + eps)          eps on either side of the add
    n  = h * r | r * h                      (or h / sqrt(...))
  then one of the two rounding orders:
    out = w * n.to(s.dtype)                 cast_then_scale: w is any tensor the graph multiplies by
    out = (n * (offset + w.float())).to(s.dtype)        scale_then_cast: `offset +` and `.float()` optional,
                                            the final cast is `.to` or `type_as` (absent for fp32 inputs)
The normalised value is always computed in fp32 (a norm computed in half precision is not matched).

Guards (reported when they fail): float input dtype, a mean over the last dimension with keepdim, a static
hidden size with a 1-D weight of that size, and no intermediate value (h, q, the mean, r, n, the fp32
product) used outside the pattern. Shapes are never specialised: only the static hidden size and ranks are
read, and the residual operands' shapes are compared with statically_known_true.
The residual add is folded when it is a plain same-shape, same-dtype tensor add whose sum is read again
after the norm (by the next residual add): the op returns the sum as its second output, every other user
reads it from there, and the backward saves only the sum and the per-row rstd. A sum that only the norm
reads is not folded (the op would return an unused sum whose gradient autograd fills with zeros).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxopt.passes.graph_utils import (
    FLOATS, ADD_TARGETS, MUL_TARGETS, SUB_TARGETS, Reject, cast_dtype, is_call, is_method, module_path, static_int,
    value)
from fxopt.report import MatchRecord

NAME = "rms_norm"
DESCRIPTION = "RMSNorm (fp32 normalisation, weight before or after the cast back) + residual add -> fxopt::rms_norm"
MEAN_TARGETS = (torch.mean, torch.ops.aten.mean.dim)
RSQRT_TARGETS = (torch.rsqrt, torch.ops.aten.rsqrt.default)
SQRT_TARGETS = (torch.sqrt, torch.ops.aten.sqrt.default)
POW_TARGETS = (torch.pow, operator.pow, torch.ops.aten.pow.Tensor_Scalar)
DIV_TARGETS = (operator.truediv, torch.div, torch.true_divide)


@dataclass
class NormMatch:
    x: fx.Node
    residual: fx.Node | None
    add: fx.Node | None  # the folded residual add, whose value becomes the op's second output
    weight: fx.Node
    eps: float
    offset: float
    cast_then_scale: bool
    out: fx.Node  # the node whose value the op's first output replaces
    consumed: list  # pattern nodes that die once out (and add) are replaced
    location: str


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _call(node, targets, method: str) -> bool:
    return is_call(node, targets) or is_method(node, method)


def _square_input(node):
    """h if `node` squares h (pow 2, h * h, square), else None."""
    if not isinstance(node, fx.Node) or node.kwargs:
        return None
    if _call(node, POW_TARGETS, "pow") and len(node.args) == 2 and node.args[1] == 2:
        return node.args[0]
    if _call(node, MUL_TARGETS, "mul") and len(node.args) == 2 and node.args[0] is node.args[1]:
        return node.args[0]
    if _call(node, (torch.square,), "square") and len(node.args) == 1:
        return node.args[0]
    return None


def squared_deviation(sq):
    """(h, mu, d) when sq squares d = h - mu with mu a mean of h (a LayerNorm's variance is its mean), else
    None. The rms_norm pass leaves these to the layer_norm pass, which matches them."""
    d = _square_input(sq)
    if not (is_call(d, SUB_TARGETS) or is_method(d, "sub")) or len(d.args) != 2 or d.kwargs:
        return None
    h, mu = d.args
    if not isinstance(h, fx.Node) or not _call(mu, MEAN_TARGETS, "mean") or not mu.args or mu.args[0] is not h:
        return None
    return h, mu, d


def fp32_input(h):
    """(the up-cast node or None, the norm's input, its value) for h, the fp32 value a norm normalises; Reject
    when h is not fp32 (a norm in half precision is not the kernels' math) or the input's dtype is not taken."""
    if value(h).dtype != torch.float32:
        raise Reject(f"normalised in {value(h).dtype}, not in fp32")
    up = cast_dtype(h)
    xin = h.args[0] if up is not None else h
    xv = value(xin)
    if xv is None or xv.dtype not in FLOATS:
        raise Reject(f"input dtype {None if xv is None else xv.dtype} not supported")
    return up, xin, xv


def _other(node, known):
    """The operand of a binary node that is not `known` (None if `known` is not one of exactly two args)."""
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    return b if a is known else (a if b is known else None)


def _single_user(node, what):
    users = list(node.users)
    if len(users) != 1:
        raise Reject(f"{what} is also used elsewhere ({len(users)} users)")
    return users[0]


def _check_mean(mean, h):
    """A mean over the last dimension with keepdim=True, no dtype."""
    args = list(mean.args[1:])
    kw = dict(mean.kwargs)
    dim = kw.pop("dim", args.pop(0) if args else None)
    keepdim = kw.pop("keepdim", args.pop(0) if args else False)
    if args or kw:
        raise Reject(f"mean with extra arguments {args or kw}")
    rank = value(h).dim()
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    if len(dims) != 1 or not isinstance(dims[0], int) or dims[0] % max(rank, 1) != rank - 1:
        raise Reject(f"mean over dim {dim}, not the last dimension")
    if keepdim is not True:
        raise Reject("mean without keepdim")


def _weight_operand(mul, n, cast_then_scale):
    """(weight node, offset, nodes of the weight expression the op absorbs) of `n * <weight expr>`."""
    w = _other(mul, n)
    if not isinstance(w, fx.Node) or value(w) is None:
        raise Reject("the normalised value is not multiplied by a weight tensor")
    absorbed, offset = [], 0.0
    if cast_then_scale:
        return w, offset, absorbed  # any tensor: the op multiplies by it in its own dtype, as the graph does
    # scale_then_cast multiplies in fp32: `offset + w` computed in fp32 and an up-cast of w to fp32 are
    # what the kernel does itself, so they are absorbed; anything else stays the op's weight input.
    if is_call(w, ADD_TARGETS) and len(w.users) == 1 and value(w).dtype == torch.float32:
        num = [a for a in w.args if _is_number(a)]
        tensor = [a for a in w.args if isinstance(a, fx.Node)]
        if len(w.args) == 2 and not w.kwargs and len(num) == 1 and len(tensor) == 1:
            absorbed.append(w)
            offset, w = float(num[0]), tensor[0]
    if cast_dtype(w) == torch.float32 and len(w.users) == 1:
        src = value(w.args[0])
        if src is not None and src.dtype in FLOATS:  # an exact up-cast
            absorbed.append(w)
            w = w.args[0]
    return w, offset, absorbed


def _final_cast(node, dtype):
    """The node that casts `node` to `dtype` (`.to(dtype)` or `.type_as(t)` of a `dtype` tensor), else None."""
    users = list(node.users)
    if len(users) != 1:
        return None
    u = users[0]
    if cast_dtype(u) == dtype:
        return u
    if is_method(u, "type_as") and len(u.args) == 2 and u.args[0] is node and not u.kwargs:
        ref = value(u.args[1])
        if ref is not None and ref.dtype == dtype:
            return u
    return None


def residual_add(xin):
    """(a, b) when xin = a + b is a plain add of two tensors of the same shape and dtype, else None."""
    if not is_call(xin, ADD_TARGETS) or len(xin.args) != 2 or xin.kwargs:
        return None
    a, b = xin.args
    va, vb, vs = value(a), value(b), value(xin)
    if va is None or vb is None or vs is None:
        return None
    if not (va.dtype == vb.dtype == vs.dtype) or va.device != vb.device or va.dim() != vb.dim():
        return None
    if not all(statically_known_true(p == q) for p, q in zip(va.shape, vb.shape)):
        return None  # a broadcasting add (or one whose shapes are not known equal): the norm alone
    return a, b


def match_at(mean: fx.Node, ctx) -> NormMatch:
    """Try to match an RMSNorm whose reduction is `mean` (of a square); raise Reject(reason) if not."""
    sq = mean.args[0]
    h = _square_input(sq)
    hv = value(h)
    if hv is None or value(mean) is None:
        raise Reject("no recorded tensor metadata")
    _check_mean(mean, h)
    _single_user(sq, "the square")
    consumed = [sq, mean]

    up, xin, xv = fp32_input(h)

    # + eps, then rsqrt and a multiply (or sqrt and a divide)
    ve = _single_user(mean, "the mean of squares")
    eps = _other(ve, mean) if is_call(ve, ADD_TARGETS) else None
    if isinstance(eps, fx.Node):
        raise Reject("eps is a runtime value")
    if not _is_number(eps):
        raise Reject("the mean of squares is not added to a constant eps")
    root = _single_user(ve, "mean + eps")
    n = _single_user(root, "the reciprocal root")
    if _call(root, RSQRT_TARGETS, "rsqrt") and len(root.args) == 1 and is_call(n, MUL_TARGETS) and _other(n, root) is h:
        pass
    elif _call(root, SQRT_TARGETS, "sqrt") and len(root.args) == 1 and is_call(n, DIV_TARGETS) and n.args[0] is h and n.args[1] is root and not n.kwargs:
        pass
    else:
        raise Reject("mean + eps does not go through rsqrt into a multiply with the input")
    consumed += [ve, root, n]
    if up is not None:
        if set(h.users) != {sq, n}:
            raise Reject("the fp32 input is also used elsewhere")
        consumed.insert(0, h)

    # the two rounding orders
    nxt = _single_user(n, "the normalised value")
    if cast_dtype(nxt) is not None:
        if cast_dtype(nxt) != xv.dtype:
            raise Reject(f"the normalised value is cast to {cast_dtype(nxt)}, not to the input's {xv.dtype}")
        cast_then_scale, c1 = True, nxt
        consumed.append(c1)
        mul = _single_user(c1, "the normalised value cast back")
        scaled = c1
    else:
        cast_then_scale, mul, scaled = False, nxt, n
    if not is_call(mul, MUL_TARGETS):
        raise Reject("the normalised value is not multiplied by a weight")
    weight, offset, absorbed = _weight_operand(mul, scaled, cast_then_scale)
    if weight in consumed or weight is mul:
        raise Reject("the normalised value is multiplied by itself, not by a weight")
    out = mul
    consumed.append(mul)
    if not cast_then_scale:
        if value(mul).dtype != torch.float32:
            raise Reject(f"the weight product is in {value(mul).dtype}, not fp32")
        cast = _final_cast(mul, xv.dtype)
        if cast is not None:
            out = cast
            consumed.append(cast)
        elif xv.dtype != torch.float32:
            raise Reject(f"the fp32 weight product is not cast back to {xv.dtype}")
    if not cast_then_scale and not absorbed and xv.dtype == value(weight).dtype == torch.float32:
        cast_then_scale = True  # all fp32: the two orders are the same computation; name it as written
    _guard(xin, weight, out, offset, cast_then_scale)

    add_ops = residual_add(xin)
    x, residual, add = (xin, None, None) if add_ops is None else (add_ops[0], add_ops[1], xin)
    return NormMatch(x, residual, add, weight, float(eps), offset, cast_then_scale, out, absorbed + consumed,
                     ctx.locate(weight, module_path(mean, ctx.prefix)))


def _guard(xin, weight, out, offset, cast_then_scale):
    """What fxopt::rms_norm supports; decided on static sizes only (token counts stay symbolic)."""
    xv, wv, ov = value(xin), value(weight), value(out)
    if wv is None or ov is None:
        raise Reject("no recorded tensor metadata")
    n = static_int(xv.shape[-1]) if xv.dim() >= 1 else None
    if n is None:
        raise Reject("symbolic or missing hidden size")
    if wv.dim() != 1 or static_int(wv.shape[0]) != n:
        raise Reject(f"weight of shape {list(wv.shape)} for a hidden size of {n}")
    if wv.dtype not in FLOATS:
        raise Reject(f"weight dtype {wv.dtype} not supported")
    if wv.device != xv.device:
        raise Reject("weight and input on different devices")
    want = torch.promote_types(wv.dtype, xv.dtype) if cast_then_scale else xv.dtype
    if ov.dtype != want or ov.dim() != xv.dim():
        raise Reject(f"output {ov.dtype} of rank {ov.dim()} where the op gives {want} of rank {xv.dim()}")


def rewrite_norm(gm, m, order, op, make_args, operands, stats: int):
    """Replace a matched norm (m: x, residual, add, out, consumed) by `op`(*make_args(x, residual)), which returns
    [out] (+ [s] when the residual add is folded) + `stats` fp32 per-row values for its backward. `operands`:
    the op's other graph inputs (weight, bias), so that it goes after them. Also layer_norm's rewrite.
    Returns (whether the add was folded, the erased nodes)."""
    graph = gm.graph
    # the op goes where the pattern first read its input (or after an operand computed later), so that it
    # reads the values the pattern read
    first = min(m.consumed, key=order.__getitem__).prev
    inputs = [t for t in (m.x, m.residual, *operands, first) if isinstance(t, fx.Node)]
    anchor = max(inputs, key=order.__getitem__)
    add = m.add
    if add is not None:
        # Fold only when the sum is read again (by the next residual add): then the op returns it. A sum
        # that only the norm reads is left as it is, or the unused second output would cost a zero-filled
        # gradient in the backward. The other readers must come after the op.
        outside = [u for u in add.users if u not in m.consumed]
        if not outside or any(order[u] <= order[anchor] for u in outside):
            add = None
    x, residual = (m.x, m.residual) if add is not None else (m.add or m.x, None)
    with graph.inserting_after(anchor):
        node = graph.call_function(op, make_args(x, residual))
    node.meta.update({k: v for k, v in m.out.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    results = [m.out] + ([add] if add is not None else [])
    vals = [value(r) for r in results]
    node.meta["example_value"] = vals + [vals[0].new_empty(vals[0].shape[:-1], dtype=torch.float32)
                                         for _ in range(stats)]
    prev = node
    items = []
    for i, r in enumerate(results):
        with graph.inserting_after(prev):
            item = graph.call_function(operator.getitem, (node, i))
        item.meta.update(r.meta)
        items.append(item)
        prev = item
    m.out.replace_all_uses_with(items[0])
    erased = set()
    for n in sorted(set(m.consumed) - {m.add}, key=order.__getitem__, reverse=True):
        if not n.users:
            graph.erase_node(n)
            erased.add(n)
    if add is not None:
        add.replace_all_uses_with(items[1])
        graph.erase_node(add)
        erased.add(add)
    return add is not None, erased


def _rewrite(gm, m: NormMatch, order):
    return rewrite_norm(gm, m, order, torch.ops.fxopt.rms_norm.default,
                        lambda x, residual: (x, m.weight, residual, m.eps, m.offset, m.cast_then_scale),
                        [m.weight], stats=1)


def run(gm: fx.GraphModule, ctx) -> list[MatchRecord]:
    from fxopt.kernels import rms_norm as _rms_kernels  # noqa: F401  (registers torch.ops.fxopt.rms_norm)

    records = []
    changed, erased = False, set()
    for mean in list(gm.graph.nodes):
        if mean in erased or not _call(mean, MEAN_TARGETS, "mean") or not mean.args:
            continue
        if _square_input(mean.args[0]) is None:
            continue  # not a mean of squares: nothing RMSNorm-like to report
        if squared_deviation(mean.args[0]) is not None:
            continue  # the square of x - mean(x): a LayerNorm's variance (the layer_norm pass's)
        try:
            m = match_at(mean, ctx)
        except Reject as e:
            records.append(MatchRecord(NAME, module_path(mean, ctx.prefix), "rejected", str(e), ctx.graph_name))
            continue
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        folded, gone = _rewrite(gm, m, order)
        erased |= gone
        changed = True
        detail = f"fxopt::rms_norm, {'cast_then_scale' if m.cast_then_scale else 'scale_then_cast'}"
        detail += f", offset={m.offset:g}" if m.offset else ""
        detail += f", eps={m.eps:g}" + (", residual add folded" if folded else "")
        records.append(MatchRecord(NAME, m.location, "matched", detail, ctx.graph_name))
    if changed:
        gm.graph.lint()
        gm.recompile()
    return records
