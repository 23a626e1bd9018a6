"""SDPA -> fxopt::flash_attention (FlashAttention-2-style Triton kernels, GQA without repeated K/V).

Pattern (HF's sdpa attention as Dynamo captures it inside a decoder block):
    k = repeat_kv(k_states)   optional: k_states[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hq, S, D),
    v = repeat_kv(v_states)   looked through so that the kernel reads each KV head once (same for v)
    out = scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.0, scale=s, is_causal=c[, enable_gqa])
Rewrite: out = fxopt::flash_attention(q, k_states, v_states, s, c, 0, 0.0, None, m)[0].

The mask. HF builds the causal (sliding-window, padding, packed-sequence) mask once in the outer model and
hands it to every block as a bool [B or 1, 1, S, S] tensor (True = attend). A pass cannot prove from the
block's graph which mask that is, and does not need to: the op takes the mask itself, summarises it in
tiles of 16 (which tiles any query sees, which it sees fully) and visits only the visible tiles, reading the
mask only where a tile is partly visible. A causal mask costs what the kernel's own causal bounds cost, and
every other mask stays exact. `is_causal=True` without a mask becomes the kernel's causal flag.

Eager attention (HF's attn_implementation="eager", the default of some families, e.g. Gemma 2 with its logit
softcap) becomes the same op:
    s = matmul(q, repeat_kv(k).transpose(2, 3)) * scale    (or / d, or no scale when q is pre-scaled)
    s = tanh(s / c) * c                                     optional softcap
    s = s + mask                                            optional: HF's additive mask (0 / the dtype's minimum)
    p = softmax(s, dim=-1, dtype=float32).to(q.dtype)       dropout with p = 0 looked through
    out = matmul(p, repeat_kv(v))
-> fxopt::flash_attention(q, k_states, v_states, scale, False, 0, c, None, mask)[0]; the kernels add the float
mask in the tiles where it is neither 0 nor the minimum, so any additive bias stays exact. Only where the
scores and probabilities feed nothing else (with output_attentions the probabilities are returned: a fused
kernel never forms them). Rows that see no key give 0 where HF's eager softmax spreads them evenly over the
masked keys: those are padding queries, whose outputs no loss reads.

A float (additive) mask given to SDPA is taken the same way (its values added, -inf and the dtype's minimum
hiding the key): an ALiBi-style bias stays exact.

Not matched (reported): attention dropout, masks that differ per head, query and key lengths that are not known equal
(decoding with a KV cache), head dims above 256, float64 (PyTorch's math is as good) and dtypes that differ.
Rows that see no key at all (a fully padded query) give 0, as PyTorch's SDPA does since 2.5.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxopt.kernels import attention as _kernel
from fxopt.passes.graph_utils import (ADD_TARGETS, DROPOUT_TARGETS, FLOATS, MUL_TARGETS, Reject, cast_dtype, is_call,
                                      is_method, module_path, only_user, static_int, value)
from fxopt.report import MatchRecord

NAME = "attention"
DESCRIPTION = "scaled_dot_product_attention (+ repeat_kv, any bool mask) -> fxopt::flash_attention"
SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention,
                torch.ops.aten.scaled_dot_product_attention.default)
SDPA_ARGS = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]


def _sdpa_args(node) -> dict:
    args = dict(zip(SDPA_ARGS, node.args))
    args.update(node.kwargs)
    return {name: args.get(name, default) for name, default in
            zip(SDPA_ARGS, (None, None, None, None, 0.0, False, None, False))}


def _unrepeated(node):
    """(kv_states, n_rep) when node is HF's repeat_kv of kv_states (the expanded view reshaped to Hkv * n_rep
    heads) and nothing else reads the intermediate views; else (node, 1)."""
    if not (is_method(node, "reshape") or is_method(node, "view")):
        return node, 1
    expand = node.args[0]
    if not is_method(expand, "expand") or len(expand.users) != 1:
        return node, 1
    index = expand.args[0]
    if not is_call(index, (operator.getitem,)) or len(index.users) != 1:
        return node, 1
    src, idx = index.args
    full = slice(None, None, None)
    if not isinstance(idx, tuple) or len(idx) != 5 or idx[2] is not None or any(i != full for i in idx[:2] + idx[3:]):
        return node, 1
    vs, ve, vo = value(src), value(expand), value(node)
    if vs is None or ve is None or vo is None or vs.dim() != 4 or ve.dim() != 5 or vo.dim() != 4:
        return node, 1
    n_rep = static_int(ve.shape[2])
    same = all(statically_known_true(a == b) for a, b in zip(
        (ve.shape[0], ve.shape[1], ve.shape[3], ve.shape[4], vo.shape[1]),
        (vs.shape[0], vs.shape[1], vs.shape[2], vs.shape[3], vs.shape[1] * ve.shape[2])))
    if n_rep is None or not same:
        return node, 1
    return src, n_rep


def _match(node, ctx) -> dict:
    a = _sdpa_args(node)
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    if not isinstance(a["dropout_p"], (int, float)) or a["dropout_p"] != 0.0:
        raise Reject(f"attention dropout (dropout_p={a['dropout_p']}): not supported")
    if not isinstance(a["is_causal"], bool) or not isinstance(a["enable_gqa"], bool):
        raise Reject("is_causal / enable_gqa are not constants")
    if a["scale"] is not None and not isinstance(a["scale"], (int, float)):
        raise Reject("the scale is not a constant")
    k_states, v_states, n_rep, hq, hkv, D = _check_qkv(q, k, v, mask, a["enable_gqa"])
    if mask is not None and a["is_causal"]:
        raise Reject("a mask and is_causal together")
    scale = float(a["scale"]) if a["scale"] is not None else D ** -0.5
    kind = "causal" if a["is_causal"] else ("no mask" if mask is None else (
        "bool mask" if value(mask).dtype == torch.bool else f"{value(mask).dtype} (additive) mask"))
    repeats = [n for n in (k, v) if n_rep > 1]
    return dict(node=node, q=q, k=k_states, v=v_states, repeats=repeats, scale=scale, causal=a["is_causal"],
                softcap=0.0, mask=mask, remove=[],
                detail=f"fxopt::flash_attention, {kind}, {hq}/{hkv} heads, head dim {D}"
                       + (", repeat_kv looked through" if n_rep > 1 else ""))


def _check_qkv(q, k, v, mask, enable_gqa: bool):
    """(k_states, v_states, n_rep, query heads, kv heads, head dim) when q, k, v (k, v possibly HF's repeat_kv)
    and the mask are what the kernels take; else Reject."""
    vq, vk, vv = value(q), value(k), value(v)
    if vq is None or vk is None or vv is None:
        raise Reject("no example values on the graph")
    if vq.dim() != 4 or vk.dim() != 4 or vv.dim() != 4:
        raise Reject("q, k, v are not [B, H, S, D]")
    if vq.dtype not in FLOATS or not (vq.dtype == vk.dtype == vv.dtype):
        raise Reject(f"dtypes {vq.dtype}/{vk.dtype}/{vv.dtype}: the kernels take one of fp16, bf16, fp32")
    D = static_int(vq.shape[3])
    if D is None or D > _kernel.MAX_HEAD_DIM or static_int(vk.shape[3]) != D or static_int(vv.shape[3]) != D:
        raise Reject(f"head dim {vq.shape[3]} (k {vk.shape[3]}, v {vv.shape[3]}): equal, static and <= "
                     f"{_kernel.MAX_HEAD_DIM} required")
    if not statically_known_true(vq.shape[2] == vk.shape[2]) or vk.shape != vv.shape:
        raise Reject("query and key lengths not known equal (a KV cache): not supported")
    if not statically_known_true(vq.shape[0] == vk.shape[0]):
        raise Reject("q and k batch sizes differ")
    k_states, n_rep = _unrepeated(k)
    v_states, v_rep = _unrepeated(v)
    if n_rep != v_rep:
        k_states, v_states, n_rep = k, v, 1
    hq, hkv = static_int(vq.shape[1]), static_int(value(k_states).shape[1])
    if hq is None or hkv is None or hq % hkv != 0:
        raise Reject(f"{vq.shape[1]} query heads and {value(k_states).shape[1]} kv heads")
    # One kv head without enable_gqa: SDPA broadcasts it to every query head (Falcon's multi-query attention),
    # which is GQA with one group. Any other count is an error in SDPA itself.
    if n_rep == 1 and hkv not in (hq, 1) and not enable_gqa:
        raise Reject("kv heads differ from query heads without enable_gqa")
    if mask is not None:
        vm = value(mask)
        if vm is None:
            raise Reject("the mask is not a tensor")
        if not (vm.dtype == torch.bool or vm.is_floating_point()):
            raise Reject(f"{vm.dtype} mask: bool or float (additive) masks only")
        if vm.requires_grad:
            raise Reject("the mask requires grad (a trained bias): the op gives masks no gradient")
        if vm.dim() != 4 or static_int(vm.shape[1]) != 1:
            raise Reject(f"mask of shape {tuple(vm.shape)}: [B or 1, 1, S, S] required (one mask for all heads)")
        if not (statically_known_true(vm.shape[2] == vq.shape[2]) and statically_known_true(vm.shape[3] == vq.shape[2])):
            raise Reject(f"mask of shape {tuple(vm.shape)} is not [.., S, S] for S = {vq.shape[2]}")
        if not (static_int(vm.shape[0]) == 1 or statically_known_true(vm.shape[0] == vq.shape[0])):
            raise Reject(f"mask batch {vm.shape[0]} is neither 1 nor the batch size")
    return k_states, v_states, n_rep, hq, hkv, D


def _where(node, ctx, eager: bool = False) -> str:
    """The attention module's path for the report: the parent of the nearest weight matrix upstream of q (its
    q projection), else the graph's module stack."""
    seen, todo = set(), [node if eager else _sdpa_args(node)["query"]]
    while todo and len(seen) < 64:
        n = todo.pop(0)
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        v = value(n)
        name = ctx.locate(n, "") if n.op == "placeholder" and v is not None and v.dim() == 2 else ""
        if name:
            return name.split(".lora_")[0].rsplit(".", 1)[0]
        todo.extend(n.all_input_nodes)
    return module_path(node, ctx.prefix)


def _rewrite(gm, m):
    g = gm.graph
    node = m["node"]
    with g.inserting_before(node):
        op = g.call_function(torch.ops.fxopt.flash_attention.default,
                             (m["q"], m["k"], m["v"], m["scale"], m["causal"], 0, m["softcap"], None, m["mask"]))
        out = g.call_function(operator.getitem, (op, 0))
    # the passes after this one read shapes and dtypes from node metadata: the output is SDPA's value
    out.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "val", "nn_module_stack")})
    node.replace_all_uses_with(out)
    g.erase_node(node)
    for n in m["remove"]:  # eager attention's scores and probabilities, last first, now read by nothing
        if not n.users:
            g.erase_node(n)
    for r in m["repeats"]:  # repeat_kv's reshape <- expand <- indexing, now read by nothing
        chain = [r, r.args[0], r.args[0].args[0]]
        for n in chain:
            if n.users:
                break
            g.erase_node(n)


SOFTMAX_TARGETS = (F.softmax, torch.softmax, torch.ops.aten._softmax.default)
MATMUL_TARGETS = (torch.matmul, operator.matmul, torch.bmm)


def _eager_attention(softmax) -> bool:
    """Whether a softmax sits between two matmuls within a few elementwise steps (HF's eager attention:
    matmul(q, k^T) * scale [+ softcap] + mask -> softmax -> [cast, dropout] -> matmul(., v))."""
    def near(node, step, limit=6):
        for _ in range(limit):
            nxt = step(node)
            if nxt is None:
                return False
            if is_call(nxt, MATMUL_TARGETS):
                return True
            node = nxt
        return False

    def up(n):
        first = n.args[0] if n.args else None
        return first if isinstance(first, fx.Node) else None

    def down(n):  # (the probabilities may also be returned: output_attentions)
        users = [u for u in n.users if u.op != "output"]
        return users[0] if len(users) == 1 else None

    return near(softmax, up) and near(softmax, down)


DIV_TARGETS = (operator.truediv, torch.div, torch.true_divide, torch.ops.aten.div.Tensor)
TANH_TARGETS = (torch.tanh, torch.ops.aten.tanh.default)
TRANSPOSE_TARGETS = (torch.transpose, torch.ops.aten.transpose.int)


def _const(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _tensor_and_const(node, targets, commutes: bool):
    """(tensor operand, constant) of node = tensor <op> constant (or constant <op> tensor where the op commutes),
    else (None, None)."""
    if not is_call(node, targets) or len(node.args) != 2 or node.kwargs:
        return None, None
    a, b = node.args
    if isinstance(a, fx.Node) and _const(b) is not None:
        return a, _const(b)
    if commutes and isinstance(b, fx.Node) and _const(a) is not None:
        return b, _const(a)
    return None, None


def _key_of_transpose(node):
    """k when node is k.transpose over its last two dims ([B, H, S, D] -> [B, H, D, S]), else None."""
    if is_method(node, "transpose") or is_call(node, TRANSPOSE_TARGETS):
        src, *dims = node.args
        v = value(src)
        if v is not None and v.dim() == 4 and len(dims) == 2 and {d % 4 for d in dims if isinstance(d, int)} == {2, 3}:
            return src
    return None


def _softmax_dim_dtype(node):
    if is_call(node, (torch.ops.aten._softmax.default,)):
        return node.args[1], (torch.float32 if node.args[2] else None)
    args = list(node.args) + [None] * 4
    dim = node.kwargs.get("dim", args[1])
    positional = args[3] if node.target is F.softmax else args[2]
    return dim, node.kwargs.get("dtype", positional)


def _match_eager(sm, ctx) -> dict:
    """HF's eager attention around the softmax node sm (see the module docstring), or Reject."""
    dim, dtype = _softmax_dim_dtype(sm)
    if dim not in (-1, 3):
        raise Reject(f"eager attention: softmax over dim {dim}, not the keys' (-1)")
    if dtype not in (None, torch.float32):
        raise Reject(f"eager attention: softmax in {dtype} (the kernels take it in fp32)")
    # downstream: [.to(q's dtype)] [dropout(p=0)] matmul(p, v), each read only by the next
    down, n, cast = [sm], sm, None
    nxt = only_user(n)
    if cast_dtype(nxt) is not None:
        cast, n = cast_dtype(nxt), nxt
        down.insert(0, n)
    nxt = only_user(n)
    if is_call(nxt, DROPOUT_TARGETS):
        p = nxt.kwargs.get("p", nxt.args[1] if len(nxt.args) > 1 else 0.5)
        training = nxt.kwargs.get("training", nxt.args[2] if len(nxt.args) > 2 else True)
        if not (_const(p) == 0.0 or training is False):
            raise Reject(f"eager attention with attention dropout (p={p}): not supported")
        n = nxt
        down.insert(0, n)
    out = only_user(n)
    if out is None:
        raise Reject("eager attention whose probabilities are read elsewhere (output_attentions): a fused kernel "
                     "never forms them")
    if not is_call(out, MATMUL_TARGETS) or out.args[0] is not n or len(out.args) != 2:
        raise Reject("eager attention: the probabilities do not go straight into a matmul with v")
    v = out.args[1]
    # upstream: [+ mask] [tanh(s / c) * c] [* scale or / d] matmul(q, k^T), each read only by the next
    up, n, mask, softcap, scale = [], sm.args[0], None, 0.0, 1.0

    def take(node):
        if len(node.users) != 1:
            raise Reject("eager attention whose scores are read elsewhere: a fused kernel never forms them")
        up.append(node)

    if is_call(n, ADD_TARGETS) and len(n.args) == 2 and not n.kwargs:
        a, b = n.args
        if isinstance(b, fx.Node) and value(b) is not None and value(b).dim() == 4 and value(b).shape[1] == 1:
            scores, mask = a, b
        elif isinstance(a, fx.Node) and value(a) is not None and value(a).dim() == 4 and value(a).shape[1] == 1:
            scores, mask = b, a
        else:
            raise Reject("eager attention: what is added to the scores is not one [B or 1, 1, S, S] mask")
        take(n)
        n = scores
    t, c = _tensor_and_const(n, MUL_TARGETS, True)
    if t is not None and is_call(t, TANH_TARGETS):
        inner, c2 = _tensor_and_const(t.args[0], DIV_TARGETS, False)
        if inner is None or c2 != c or c <= 0:
            raise Reject("eager attention: a tanh on the scores that is not the softcap tanh(s / c) * c")
        take(n), take(t), take(t.args[0])
        softcap, n = c, inner
    t, c = _tensor_and_const(n, MUL_TARGETS, True)
    if t is not None:
        take(n)
        scale, n = c, t
    else:
        t, d = _tensor_and_const(n, DIV_TARGETS, False)
        if t is not None and d:
            take(n)
            scale, n = 1.0 / d, t
    if not is_call(n, MATMUL_TARGETS) or len(n.args) != 2:
        raise Reject("eager attention: the scores are not matmul(q, k^T) times a constant")
    q, kt = n.args
    k = _key_of_transpose(kt)
    if k is None:
        raise Reject("eager attention: the scores' second operand is not k transposed")
    take(n)
    if len(kt.users) == 1:
        up.append(kt)
    k_states, v_states, n_rep, hq, hkv, D = _check_qkv(q, k, v, mask, False)
    if cast is not None and cast != value(q).dtype:
        raise Reject(f"eager attention: probabilities cast to {cast}, not to q's {value(q).dtype}")
    kind = "no mask" if mask is None else f"{value(mask).dtype} mask"
    return dict(node=out, q=q, k=k_states, v=v_states, repeats=[x for x in (k, v) if n_rep > 1], scale=scale,
                causal=False, softcap=softcap, mask=mask, remove=down + up,
                detail=f"fxopt::flash_attention from eager attention, {kind}, {hq}/{hkv} heads, head dim {D}"
                       + (f", softcap {softcap:g}" if softcap else "")
                       + (", repeat_kv looked through" if n_rep > 1 else ""))


def run(gm: fx.GraphModule, ctx) -> list[MatchRecord]:
    eager = [(n, _where(n.args[0], ctx, eager=True), _match_eager) for n in gm.graph.nodes
             if (is_call(n, SOFTMAX_TARGETS) or is_method(n, "softmax")) and _eager_attention(n)]
    sdpa = [(n, _where(n, ctx), _match) for n in gm.graph.nodes if is_call(n, SDPA_TARGETS)]
    records = []
    for node, where, match in eager + sdpa:
        try:
            m = match(node, ctx)
        except Reject as e:
            records.append(MatchRecord(NAME, where, "rejected", str(e), ctx.graph_name))
            continue
        _rewrite(gm, m)
        records.append(MatchRecord(NAME, where, "matched", m["detail"], ctx.graph_name))
    if any(r.status == "matched" for r in records):
        gm.graph.lint()
        gm.recompile()
    return records
