"""Mixture-of-experts experts block (3D expert weights, gated MLP) -> fxopt::moe_experts.

The router (linear -> softmax -> topk -> optional renormalise) is left as it is: it is cheap, and the op takes
its outputs, topk_ids [T, k] and topk_weights [T, k], so the router's gradient flows through the op's
d topk_weights. What is replaced is everything from (x [T, H], topk_ids, topk_weights, gate_up [E, 2I, H],
down [E, H, I]) to the experts' output y [T, H]. Two graph shapes compute it (Hugging Face transformers 5.x
picks one by `config._experts_implementation`; they are recognised by their ops, never by module names):

  grouped (tokens sorted by expert, one grouped GEMM per projection):
    ids = topk_ids.reshape(-1); sw = topk_weights.reshape(-1)
    sorted_ids, perm = sort(ids); offs = cumsum(histc(sorted_ids.float(), bins=E, min=0, max=E-1))
    p = grouped_mm(x[perm // k].to?(dt), gate_up.transpose(-2, -1), offs)
    gate, up = p.chunk(2, -1); h = act(gate) * up
    o = grouped_mm(h.to?(dt), down.transpose(-2, -1), offs) * sw[perm].unsqueeze(-1)
    inv = empty_like(perm); inv[perm] = arange(T*k); y = o[inv].view(T, k, H).sum(1)
  batched (one weight matrix gathered per (token, slot) pair):
    p = bmm(gate_up[ids], x.repeat_interleave(k, 0).unsqueeze(-1)).squeeze(-1)
    gate, up = p.chunk(2, -1); h = act(gate) * up
    o = bmm(down[ids], h.unsqueeze(-1)).squeeze(-1) * sw.unsqueeze(-1)
    y = o.view(T, k, H).sum(1)
  then, in both, y.to(x.dtype) when the sum is in another dtype.
Some transformers versions (seen with 5.17) also mask expert-parallel "sentinel" slots in the grouped form:
    mask = (sorted_ids >= E).unsqueeze(-1); sorted_ids.clamp_(max=E-1); xg.masked_fill_(mask, 0)
    p = grouped_mm(...).masked_fill(mask, 0); o = grouped_mm(...).masked_fill(mask, 0) * ...
Those are no-ops when every id is < E, which the pass proves from the graph (the ids are topk indices over
a last dim of size E) and then drops with the rest of the block; otherwise it does not match. The same
version's batched form gathers the weights by ids.clamp(0, E - 1), handled the same way.
grouped_mm is any of torch.nn.functional.grouped_mm, torch._grouped_mm and the grouped-mm fallback custom op
transformers uses where those are unavailable under torch.compile (CPU, non-bf16 weights).

Guards (else the block is left alone and the report says why): the expert MLP is act(gate) * up with the gate
in the first half (act: silu, gelu, gelu with tanh), no expert bias and no other use of an intermediate (a
bias is added in place onto the projection), E/H/I/k static, topk ids integer, equal float dtypes of the two
expert weights. The token count stays symbolic. The "eager" implementation (a Python loop over the experts
that were hit) is data-dependent: Dynamo breaks the graph there; its expert-mask computation
(one_hot -> permute -> sum -> > 0) is reported as not supported.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.passes.graph_utils import (
    FLOATS, ADD_TARGETS, MUL_TARGETS, Reject, cast_dtype, is_call, is_method, module_path, static_int, value)
from fxopt.report import MatchRecord

NAME = "moe"
DESCRIPTION = "MoE experts (top-k routed, gated 3D expert weights; grouped or batched) -> fxopt::moe_experts"
_FALLBACK_GROUPED_MM = "transformers::grouped_mm_fallback"  # a library's op (not a model family)


def _is_grouped_mm(node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    t = node.target
    if t in tuple(f for f in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f):
        return True
    name = getattr(t, "_qualified_op_name", None) or getattr(getattr(t, "_schema", None), "name", None)
    return name == _FALLBACK_GROUPED_MM


def _arg(node, i, name, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[i] if len(node.args) > i else default


def _same_dim(a, b) -> bool:
    """Equal sizes, decided without adding a guard (a symbolic size equals only the same expression)."""
    ea = a.node.expr if isinstance(a, torch.SymInt) else a
    eb = b.node.expr if isinstance(b, torch.SymInt) else b
    return bool(ea == eb)  # sympy's == is structural: no guard


def _uncast(node, seen):
    """Walk back through dtype casts (`.to(dtype)`, `.float()`, `.int()`, ...); records them in `seen`."""
    while isinstance(node, fx.Node) and (cast_dtype(node) is not None or (
            is_method(node, "int") or is_method(node, "long")) and len(node.args) == 1):
        seen.append(node)
        node = node.args[0]
    return node


def _flat(node, seen, what):
    """`t.reshape(-1)` / `t.view(-1)`: returns t."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("reshape", "view")
            and list(node.args[1:]) in ([-1], [(-1,)])):
        raise Reject(f"{what} is not a flattened [T, k] tensor")
    seen.append(node)
    return node.args[0]


def _single_use(node, what):
    if len(node.users) != 1:
        raise Reject(f"{what} has another use ({len(node.users)} users): an expert bias or a mask?")


def _sentinel_masked(node, masks):
    """t.masked_fill(mask, 0) with mask = cmp.unsqueeze(-1): returns t and records mask (checked later by
    _check_sentinels); any other node is returned as it is."""
    if is_method(node, "masked_fill") and len(node.args) == 3 and node.args[2] == 0 and _unsqueeze_last(node.args[1]):
        masks.append(node)
        return node.args[0]
    return node


def _check_sentinels(masks, xg, ids, sort, e, seen):
    """The sentinel masks of the grouped form (see the module docstring) are all (sorted_ids >= E).unsqueeze(-1)
    and are no-ops: the ids are topk indices over a last dim of size E, so none is >= E. Also accepts the
    in-place xg.masked_fill_(mask, 0) and sorted_ids.clamp_(max=E-1) that go with them, and records all of it
    in `seen` (dropped with the block)."""
    sorted_ids = next((u for u in sort.users if is_call(u, (operator.getitem,)) and u.args[1] == 0), None)
    inplace = [u for u in xg.users if is_method(u, "masked_fill_")]
    clamps = [u for u in (sorted_ids.users if sorted_ids is not None else ()) if is_method(u, "clamp_")]
    if not (masks or inplace or clamps):
        return
    mask_nodes = {m.args[1] for m in masks} | {u.args[1] for u in inplace if len(u.args) == 3}
    for m in mask_nodes:
        cmp = m.args[0]
        if not ((is_call(cmp, (operator.ge, torch.ge)) or is_method(cmp, "ge")) and cmp.args[0] is sorted_ids
                and len(cmp.args) == 2 and cmp.args[1] == e and len(cmp.users) == 1):
            raise Reject("the grouped rows are masked by something other than (sorted ids >= E)")
        seen += [m, cmp]
    for u in inplace:
        if len(u.args) != 3 or u.args[2] != 0 or u.users:
            raise Reject("the gathered tokens are masked in place by something other than a sentinel mask")
    for c in clamps:
        if c.users or c.args[1:] or c.kwargs != {"max": e - 1}:
            raise Reject("the sorted expert ids are clamped in an unexpected way")
    _ids_below(ids, e, "expert-parallel sentinel masks")
    seen += masks + inplace + clamps


def _ids_below(ids, e, what):
    """Reject unless ids [T, k] are provably in [0, E): topk indices over a last dim of size E."""
    top = _uncast(ids, [])
    src = top.args[0] if is_call(top, (operator.getitem,)) and top.args[1] == 1 else None
    if not (is_call(src, (torch.topk,)) and _arg(src, 2, "dim", -1) in (-1, value(src.args[0]).dim() - 1)
            and static_int(value(src.args[0]).shape[-1]) == e):
        raise Reject(f"{what}, and the expert ids are not provably < E (not topk indices over E scores)")


def _unclamped_ids(node, e, seen):
    """ids.clamp(0, E - 1) -> ids (a no-op on ids in [0, E), which the caller proves); any other node as is."""
    if is_method(node, "clamp") or is_call(node, (torch.clamp,)):
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
        if lo in (0, None) and hi == e - 1:
            seen.append(node)
            return node.args[0]
    return node


def _unsqueeze_last(node):
    return is_method(node, "unsqueeze") and list(node.args[1:]) == [-1]


def _activation(node):
    """The kernel's name for an activation node on the gate, or None."""
    if is_call(node, (F.silu,)) and not _arg(node, 1, "inplace", False):
        return "silu"
    if is_call(node, (F.gelu,)):
        approx = _arg(node, 1, "approximate", "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
    return None


def _gated(h, seen):
    """h = act(p.chunk(2, -1)[0]) * p.chunk(2, -1)[1]: returns (p, activation)."""
    if not (is_call(h, MUL_TARGETS) and len(h.args) == 2 and all(isinstance(a, fx.Node) for a in h.args)):
        raise Reject("expert MLP is not gated (act(gate) * up)")
    a, b = h.args
    act = a if _activation(a) else b if _activation(b) else None
    if act is None:
        raise Reject("expert MLP is not act(gate) * up with act one of silu, gelu, gelu_tanh")
    up = b if act is a else a
    gate = act.args[0]
    if not (is_call(gate, (operator.getitem,)) and is_call(up, (operator.getitem,))
            and gate.args[0] is up.args[0] and is_method(gate.args[0], "chunk")):
        raise Reject("gate and up are not the two halves of one projection (chunk(2, -1))")
    chunk = gate.args[0]
    if _arg(chunk, 1, "chunks") != 2 or _arg(chunk, 2, "dim", 0) not in (-1, 1):
        raise Reject("the projection is not split in two halves along its last dim")
    if (gate.args[1], up.args[1]) != (0, 1):
        raise Reject("the gate is not the first half of the projection")
    for n, what in ((gate, "gate"), (up, "up"), (act, "act(gate)")):
        _single_use(n, what)
    if len(chunk.users) != 2:
        raise Reject("the projection's halves have another use")
    seen += [h, act, gate, up, chunk]
    p = chunk.args[0]
    if is_call(p, ADD_TARGETS) or is_method(p, "add") or is_method(p, "add_"):
        raise Reject("expert bias (an add on the gate/up projection): not supported")
    _single_use(p, "the gate/up projection")
    return p, _activation(act)


def _transposed_param(node, seen, what):
    if not (is_method(node, "transpose") and sorted(node.args[1:]) in ([-2, -1], [1, 2])):
        raise Reject(f"{what}: weight is not a transposed [E, out, in] tensor")
    seen.append(node)
    return node.args[0]


def _grouped_mm_args(node, seen, what):
    """(input before casts, weight [E, out, in], offs) of grouped_mm(x.to?(dt), w.transpose(-2, -1), offs)."""
    if _arg(node, 3, "bias") is not None or _arg(node, 4, "out_dtype") is not None:
        raise Reject(f"{what}: grouped GEMM with a bias or out_dtype")
    inp = node.args[0]
    w = _transposed_param(node.args[1] if len(node.args) > 1 else node.kwargs.get("mat_b"), seen, what)
    offs = _arg(node, 2, "offs")
    x = _uncast(inp, seen)
    if x is not inp:
        _single_use(inp, f"{what} input")
    return x, w, offs


def _bmm_args(node, seen, what):
    """bmm(w[ids], v.unsqueeze(-1)).squeeze(-1): returns (v, w, ids)."""
    if not (is_method(node, "squeeze") and list(node.args[1:]) == [-1]):
        raise Reject(f"{what}: not bmm(...).squeeze(-1)")
    bmm = node.args[0]
    if not (is_call(bmm, (torch.bmm,)) and len(bmm.args) == 2):
        raise Reject(f"{what}: not a bmm of gathered expert weights")
    sel, vec = bmm.args
    if not (is_call(sel, (operator.getitem,)) and _unsqueeze_last(vec)):
        raise Reject(f"{what}: not a bmm of gathered expert weights")
    for n in (bmm, sel, vec):
        _single_use(n, what)
    seen += [node, bmm, sel, vec]
    return vec.args[0], sel.args[0], sel.args[1]


def _match(out: fx.Node) -> tuple:
    """`out` is a `.sum(...)`; walk back to the op's inputs. Returns (x, ids, weights, gate_up, down, act, k,
    the [T, k, H] view, the pattern's nodes, kind). Returns None while the subgraph does not look like an
    experts block (a weighted sum of expert projections); raises Reject for a mismatch past that point."""
    seen = [out]
    view = out.args[0]
    if not (is_method(view, "view") or is_method(view, "reshape")) or len(view.users) != 1:
        return None
    o = view.args[0]
    inv = None
    if is_call(o, (operator.getitem,)) and isinstance(o.args[1], fx.Node) and is_call(o.args[1], (torch.empty_like,)):
        inv, o = o.args[1], o.args[0]
    if not (is_call(o, MUL_TARGETS) and len(o.args) == 2):
        return None
    y, sw = o.args
    if _unsqueeze_last(y):
        y, sw = sw, y
    if not _unsqueeze_last(sw):
        return None
    masks = []
    y = _sentinel_masked(y, masks)
    grouped = _is_grouped_mm(y)
    if not grouped and not (is_method(y, "squeeze") and is_call(y.args[0], (torch.bmm,))):
        return None
    # from here on it is an experts block: every mismatch is reported
    seen += [view, o, sw]
    kind = "grouped" if grouped else "batched"
    for n, what in ((o, "the weighted expert output"), (y, "the down projection"), (sw, "routing weights")):
        _single_use(n, what)
    if grouped:
        h, down, offs = _grouped_mm_args(y, seen, "down projection")
        seen.append(y)
        p, act = _gated(h, seen)
        p = _sentinel_masked(p, masks)
        if not _is_grouped_mm(p):
            raise Reject("gate/up projection is not a grouped GEMM")
        xg, gate_up, offs_p = _grouped_mm_args(p, seen, "gate/up projection")
        seen.append(p)
        if offs_p is not offs:
            raise Reject("the two projections use different group offsets")
        # x[perm // k]
        if not (is_call(xg, (operator.getitem,)) and is_call(xg.args[1], (operator.floordiv,))):
            raise Reject("gate/up projection does not read x gathered by perm // k")
        if len([u for u in xg.users if not is_method(u, "masked_fill_")]) != 1:
            raise Reject(f"the gathered tokens have another use ({len(xg.users)} users)")
        x, fd = xg.args
        perm, k = fd.args
        seen += [xg, fd]
        if not (is_call(perm, (operator.getitem,)) and perm.args[1] == 1 and is_call(perm.args[0], (torch.sort,))):
            raise Reject("tokens are not gathered by a sort of the expert ids")
        sort = perm.args[0]
        if _arg(sort, 1, "dim", -1) not in (-1, 0) or _arg(sort, 2, "descending", False):
            raise Reject("unexpected sort of the expert ids")
        ids = _flat(sort.args[0], seen, "sorted expert ids")
        seen += [perm, sort]
        # sw = weights.reshape(-1)[perm]
        swg = sw.args[0]
        if not (is_call(swg, (operator.getitem,)) and swg.args[1] is perm):
            raise Reject("routing weights are not permuted like the tokens")
        seen.append(swg)
        weights = _flat(swg.args[0], seen, "routing weights")
        _check_offsets(offs, sort, gate_up, seen)
        _check_sentinels(masks, xg, ids, sort, static_int(value(gate_up).shape[0]), seen)
        # undo the sort: inv = empty_like(perm); inv[perm] = arange(S); o[inv]
        if inv is None:
            raise Reject("the sorted rows are not put back in token order by an inverse permutation")
        sets = [u for u in inv.users if is_call(u, (operator.setitem,))]
        if len(inv.users) != 2 or len(sets) != 1 or inv.args[0] is not perm:
            raise Reject("unexpected inverse permutation")
        st = sets[0]
        ar = st.args[2]
        if st.args[1] is not perm or not is_call(ar, (torch.arange,)) or len(ar.args) != 1 or any(
                k_ in ar.kwargs for k_ in ("start", "step", "end")):
            raise Reject("unexpected inverse permutation")
        if value(ar) is None or value(perm) is None or not _same_dim(value(ar).shape[0], value(perm).shape[0]):
            raise Reject("the inverse permutation does not cover every (token, slot) pair")
        seen += [view.args[0], inv, st, ar]
    else:
        h, down, ids_d = _bmm_args(y, seen, "down projection")
        p, act = _gated(h, seen)
        xr, gate_up, ids_u = _bmm_args(p, seen, "gate/up projection")
        if ids_d is not ids_u:
            raise Reject("the two projections gather weights by different ids")
        if not (is_method(xr, "repeat_interleave") and _arg(xr, 2, "dim") == 0):
            raise Reject("gate/up projection does not read x repeated k times")
        _single_use(xr, "the repeated tokens")
        seen.append(xr)
        x, k = xr.args[0], _arg(xr, 1, "repeats")
        e = static_int(value(gate_up).shape[0]) if value(gate_up) is not None else None
        unclamped = _unclamped_ids(ids_d, e, seen)
        ids = _flat(unclamped, seen, "expert ids")
        if unclamped is not ids_d:  # transformers 5.17 clamps the ids into [0, E - 1]
            _ids_below(ids, e, "the expert ids are clamped")
        weights = _flat(sw.args[0], seen, "routing weights")
    if _arg(out, 1, "dim") not in (1, [1], (1,)) or _arg(out, 2, "keepdim", False) or "dtype" in out.kwargs:
        raise Reject("the k slots are not summed by sum(dim=1)")
    return x, ids, weights, gate_up, down, act, k, view, seen, kind


def _check_offsets(offs, sort, gate_up, seen):
    """offs = cumsum(histc(sorted_ids.float(), bins=E, min=0, max=E-1), 0): the per-expert row ends."""
    if not is_call(offs, (torch.cumsum,)) or _arg(offs, 1, "dim") != 0:
        raise Reject("group offsets are not a cumsum of per-expert counts")
    hist = offs.args[0]
    if not is_call(hist, (torch.histc,)):
        raise Reject("group offsets are not counted by histc")
    src = _uncast(hist.args[0], seen)
    e = static_int(value(gate_up).shape[0]) if value(gate_up) is not None else None
    if not (is_call(src, (operator.getitem,)) and src.args[0] is sort and src.args[1] == 0):
        raise Reject("group offsets do not count the sorted expert ids")
    if (_arg(hist, 1, "bins", 100), _arg(hist, 2, "min", 0), _arg(hist, 3, "max", 0)) != (e, 0, (e or 0) - 1):
        raise Reject("group offsets do not count each of the E experts")
    seen += [offs, hist, src]


def _guard(x, ids, weights, gate_up, down, k, view):
    xv, iv, wv, gv, dv, vv = (value(n) for n in (x, ids, weights, gate_up, down, view))
    if any(v is None for v in (xv, iv, wv, gv, dv, vv)):
        raise Reject("no recorded tensor metadata")
    if xv.dim() != 2 or iv.dim() != 2 or wv.dim() != 2 or gv.dim() != 3 or dv.dim() != 3:
        raise Reject("unexpected ranks (need x [T, H], ids/weights [T, k], 3D expert weights)")
    if iv.dtype.is_floating_point or iv.dtype.is_complex or iv.dtype == torch.bool:
        raise Reject(f"expert ids of dtype {iv.dtype} (need an integer type)")
    if xv.dtype not in FLOATS or wv.dtype not in FLOATS:
        raise Reject(f"x / routing weights of dtype {xv.dtype} / {wv.dtype} not supported")
    if gv.dtype not in FLOATS or dv.dtype != gv.dtype:
        raise Reject(f"expert weights of dtypes {gv.dtype} / {dv.dtype} (need equal fp32/fp16/bf16)")
    E, I2, H = (static_int(s) for s in gv.shape)
    Ed, Hd, I = (static_int(s) for s in dv.shape)
    Hx, kk, kw = static_int(xv.shape[1]), static_int(iv.shape[1]), static_int(wv.shape[1])
    if None in (E, I2, H, Ed, Hd, I, Hx, kk, kw):
        raise Reject("symbolic expert, hidden or top-k sizes")
    if not (E == Ed and H == Hd == Hx and I2 == 2 * I and kk == kw == k):
        raise Reject(f"shape mismatch gate_up{[E, I2, H]} down{[Ed, Hd, I]} x[T, {Hx}] k={kk}/{kw}/{k}")
    if not (_same_dim(iv.shape[0], xv.shape[0]) and _same_dim(wv.shape[0], xv.shape[0])):
        raise Reject("routing tensors and x have different token counts")
    if not (vv.dim() == 3 and _same_dim(vv.shape[0], xv.shape[0]) and static_int(vv.shape[1]) == k
            and static_int(vv.shape[2]) == H):
        raise Reject("the slots are not viewed as [T, k, H] before the sum")
    if len({t.device for t in (xv, iv, wv, gv, dv)}) != 1:
        raise Reject("tensors on different devices")


def _location(ctx, gate_up, node):
    name = ctx.tensor_names.get(gate_up)
    if name:
        return name.rsplit(".", 1)[0]  # the experts module that owns the 3D weight
    return module_path(node, ctx.prefix)


def _is_expert_mask(node) -> bool:
    """one_hot(topk_ids, E + 1).permute(2, 1, 0) -> sum -> > 0: the hit-experts mask of a per-expert loop."""
    if not is_call(node, (F.one_hot, torch._C._nn.one_hot)):
        return False
    return any(is_method(u, "permute") and list(u.args[1:]) in ([2, 1, 0], [(2, 1, 0)]) for u in node.users)


def _source_line(node, ctx) -> str:
    """Where a node without a module path came from: the last source line of its stack trace (report only;
    Dynamo resumes the experts' forward after a graph break as a frame of its own, with no module stack)."""
    if node.meta.get("nn_module_stack"):
        return module_path(node, ctx.prefix)
    lines = [ln.strip() for ln in node.meta.get("stack_trace", "").splitlines() if ln.strip().startswith("File ")]
    if not lines:
        return module_path(node, ctx.prefix)
    parts = lines[-1].split('"')
    if len(parts) < 3:
        return module_path(node, ctx.prefix)
    rest = parts[2].replace(",", "").split()  # ['line', N, 'in', func]
    return f"{parts[1].rsplit('/', 1)[-1]}:{rest[1]} ({rest[-1]})" if len(rest) >= 4 else parts[1]


def _rewrite(gm, out, x, ids, weights, gate_up, down, act, seen, order, keep_projection):
    graph = gm.graph
    xv, ov = value(x), value(out)
    target = out
    if ov.dtype != xv.dtype:  # the op returns x's dtype, as the experts block does after its final cast
        cast = list(out.users)[0] if len(out.users) == 1 else None
        if cast is None or cast_dtype(cast) != xv.dtype:
            raise Reject(f"the {ov.dtype} sum is used before being cast back to {xv.dtype}")
        target = cast
        seen.append(cast)
    anchor = max((x, ids, weights, gate_up, down), key=order.__getitem__)
    keep = {k: v for k, v in target.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
    with graph.inserting_after(anchor):
        if keep_projection:  # the forward also returns the projection, saved for the backward
            pair = graph.call_function(torch.ops.fxopt.moe_experts_saving.default,
                                       (x, ids, weights, gate_up, down, act))
            with graph.inserting_after(pair):
                op = graph.call_function(operator.getitem, (pair, 0))
            tv = value(target)
            pair.meta.update(keep)
            pair.meta["example_value"] = (tv, tv.new_empty((xv.shape[0] * value(ids).shape[1],
                                                             value(gate_up).shape[1]), dtype=value(gate_up).dtype))
        else:
            op = graph.call_function(torch.ops.fxopt.moe_experts.default, (x, ids, weights, gate_up, down, act))
    op.meta.update(keep)
    op.meta["example_value"] = value(target)
    target.replace_all_uses_with(op)
    for n in sorted(set(seen), key=order.__getitem__, reverse=True):
        if not n.users:
            graph.erase_node(n)


def run(gm: fx.GraphModule, ctx) -> list[MatchRecord]:
    from fxopt.kernels import moe as _moe_kernels  # noqa: F401  (registers torch.ops.fxopt.moe_experts)

    records, changed = [], False
    for node in list(gm.graph.nodes):
        if _is_expert_mask(node):
            records.append(MatchRecord(NAME, _source_line(node, ctx), "rejected",
                                       "experts as a data-dependent loop over the hit experts (experts "
                                       "implementation \"eager\"): not supported, use grouped_mm or batched_mm",
                                       ctx.graph_name))
            continue
        if not is_method(node, "sum"):
            continue
        try:
            m = _match(node)
            if m is None:
                continue
            x, ids, weights, gate_up, down, act, k, view, seen, kind = m
            _guard(x, ids, weights, gate_up, down, k, view)
            where = _location(ctx, gate_up, node)
            # positions now: an earlier rewrite may have added the op that feeds this block
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            _rewrite(gm, node, x, ids, weights, gate_up, down, act, seen, order, ctx.config.keeps_moe_projection)
        except Reject as e:
            records.append(MatchRecord(NAME, module_path(node, ctx.prefix), "rejected", str(e), ctx.graph_name))
            continue
        changed = True
        vg = value(gate_up)
        records.append(MatchRecord(NAME, where, "matched",
                                   f"fxopt::moe_experts ({kind}), E={vg.shape[0]}, k={k}, I={vg.shape[1] // 2}, "
                                   f"act={act}" + (", gate_up projection kept for the backward"
                                                    if ctx.config.keeps_moe_projection else ""), ctx.graph_name))
    if changed:
        gm.graph.lint()
        gm.recompile()
    return records
