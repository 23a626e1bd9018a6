"""bitsandbytes 4-bit linear (nf4 / fp4, with or without double quantization) -> fxopt::linear_4bit, and with a
PEFT LoRA adapter added on top -> ONE fxopt::lora_linear_4bit (the adapter in the same accumulator).

Pattern (as Dynamo captures bitsandbytes' Linear4bit, after canonicalize):
    xc = x.to(compute dtype)?                            Linear4bit casts its input
    o = autograd_function_apply(fwd_body, bwd_body, packed_weight_bytes, xc, <quant-state tensors>, [bias])
    g = o[0]
    r = g.to(x dtype)?.clone()?                          cast back; PEFT's defensive clone
    out = r + (linear(linear(dropout?(x.to?(adt)), A), B) * s).to?(r dtype)        optional PEFT LoRA
bitsandbytes' autograd.Function (MatMul4Bit) is traced into the apply node; the node is recognised by the
bitsandbytes ops inside its bodies, never by names: the forward body is one `bitsandbytes::gemm_4bit`
(bitsandbytes 0.50, CPU and CUDA) or `dequantize_4bit` -> `linear` / `matmul` (older versions), the backward
body dequantizes the weight (`dequantize_4bit`) and returns a gradient for the input (and bias) only.
Where no gradient flows through the matmul (its input does not require grad, e.g. the first block's q/k/v when
the embeddings are frozen) bitsandbytes calls `gemm_4bit` directly: that bare call is matched the same way.
The constants the kernel needs (N, K, blocksize, quant type, double quantization) are the arguments of those
ops; the tensors (packed bytes, absmax, and under double quantization absmax2 / code2 / offset) are the
apply node's inputs that the body feeds them. The 16-entry table is the quant type's standard one: that is
what bitsandbytes' ops use too (the QuantState's `code` is not read by them).

Semantics kept: the kernel computes in the compute dtype (xc's) with fp32 accumulation, as bitsandbytes does;
the result is cast to the dtype of the node it replaces. When the adapter reads values other than xc (a
down-cast to the compute dtype, or lora_dropout) it gets its own input (x_lora). A LoRA-looking add that does
not qualify (DoRA, several adapters, an intermediate used elsewhere) leaves the adapter as it is and the base
still becomes fxopt::linear_4bit (both recorded). Not matched (recorded): a weight quantized in [K, N]
orientation, a weight rounded to a lower precision than the input before the matmul, symbolic weight sizes,
blocksizes / quant types the kernel does not support, a custom backward that is not bitsandbytes'.
No dequantized weight is saved: both ops keep only the packed bytes and the quant state for backward.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from fxopt.passes.graph_utils import (
    FLOATS, ADD_TARGETS, LINEAR_TARGETS, Reject, cast_dtype, is_call, is_method, linear_args, module_path, only_user,
    static_int, value)
from fxopt.passes.lora import adapter_branch, adapter_root, adapter_scale
from fxopt.report import MatchRecord

NAME = "qlora"
DESCRIPTION = ("bitsandbytes 4-bit linear -> fxopt::linear_4bit; with its PEFT LoRA adapter -> "
               "fxopt::lora_linear_4bit")
QUANT_TYPES = ("nf4", "fp4")
APPLY = torch.ops.higher_order.autograd_function_apply
VIEW_METHODS = ("view", "reshape", "t", "transpose", "flatten", "squeeze", "unsqueeze")
MATMUL_TARGETS = (torch.matmul, torch.ops.aten.matmul.default)


@dataclass
class Base:
    """The 4-bit matmul of one apply node: outer-graph nodes for the tensors, ints/strs for the constants."""
    apply: fx.Node | None  # None: a bare gemm_4bit call
    g: fx.Node  # the 4-bit matmul's result in the outer graph (the apply's output, or the gemm_4bit call)
    x: fx.Node
    qweight: fx.Node
    absmax: fx.Node
    absmax2: fx.Node | None  # double quantization: absmax2, code2, offset all set
    code2: fx.Node | None
    offset: fx.Node | None
    bias: fx.Node | None
    n: int
    k: int
    blocksize: int
    quant_type: str


@dataclass
class Adapter:
    lora_a: fx.Node
    lora_b: fx.Node
    scaling: float
    x_lora: fx.Node | None  # the adapter's own input when it differs from the base's x (dropout, casts)
    xl: fx.Node  # the node the adapter's first linear reads
    dropout: bool
    out: fx.Node  # the add whose value the op replaces
    consumed: list  # pattern nodes that die with the rewrite


# ---------------------------------------------------------------------------------------------------------
# reading the bodies


def _bnb(node) -> str | None:
    """The op name of a call to a `bitsandbytes::` operator ("gemm_4bit", ...), else None."""
    t = getattr(node, "target", None)
    if isinstance(node, fx.Node) and node.op == "call_function" and isinstance(t, torch._ops.OpOverload):
        if t.namespace == "bitsandbytes":
            return t._opname
    return None


def _kwargs(node) -> dict:
    """The call's arguments by schema name, however they were passed."""
    pair = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if pair is None:
        raise Reject(f"cannot read the arguments of {node.target}")
    return pair.kwargs


def _output(body: fx.GraphModule):
    return next(n for n in body.graph.nodes if n.op == "output").args[0]


def _body_inputs(apply: fx.Node, fwd: fx.GraphModule) -> dict:
    """Forward-body placeholder -> the outer node passed in its place (a leading ctx placeholder is skipped)."""
    outer = list(apply.args[2:])
    ph = [n for n in fwd.graph.nodes if n.op == "placeholder"]
    if len(ph) == len(outer) + 1:  # some torch versions give the body a ctx argument first
        ph = ph[1:]
    if len(ph) != len(outer):
        raise Reject("forward body inputs do not line up with the apply node's")
    return dict(zip(ph, outer))


def _input(node, inputs, what):
    """The outer node that feeds the body placeholder `node` (inputs None: `node` is in the outer graph)."""
    if inputs is None and isinstance(node, fx.Node):
        return node
    if not isinstance(node, fx.Node) or node not in inputs:
        raise Reject(f"{what} is computed inside the autograd.Function, not passed in")
    return inputs[node]


def _flat_bytes(node, inputs):
    """Walk the packed weight back through views that keep its flat byte order (bitsandbytes views the
    [bytes, 1] parameter as [-1, 1] or transposes it: vector-shaped, so the order is unchanged)."""
    while inputs is not None and node not in inputs:
        if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target in VIEW_METHODS):
            raise Reject("the packed weight is transformed inside the autograd.Function")
        v = value(node)
        if v is None or sum(1 for d in v.shape if static_int(d) != 1) > 1:
            raise Reject("the packed weight is reshaped to a matrix inside the autograd.Function")
        node = node.args[0]
    return _input(node, inputs, "the packed weight")


def _same_values(node):
    """Strip `.to(...)` / `.float()` calls that change neither dtype nor device (e.g. code.to(device))."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("to", "float"):
        src, out = value(node.args[0]), value(node)
        if src is None or out is None or src.dtype != out.dtype or src.device != out.device:
            break
        node = node.args[0]
    return node


def _scales(node, inputs):
    """(absmax, absmax2, code2, offset) outer nodes from the absmax argument of dequantize_4bit: a plain fp32
    absmax, or bitsandbytes' double quantization `dequantize_blockwise(absmax8, absmax2, code2, 256) + offset`."""
    node = _same_values(node)
    if isinstance(node, fx.Node) and (node in inputs if inputs is not None else node.op == "placeholder"):
        return _input(node, inputs, "absmax"), None, None, None
    if not (is_call(node, ADD_TARGETS) or is_call(node, (operator.iadd,))) or len(node.args) != 2:
        raise Reject("absmax is computed in an unknown way inside the autograd.Function")
    deq, off = node.args
    deq = _same_values(deq)
    if _bnb(deq) != "dequantize_blockwise":
        raise Reject("absmax is computed in an unknown way inside the autograd.Function")
    kw = _kwargs(deq)
    if kw["blocksize"] != 256 or kw["dtype"] != torch.float32:
        raise Reject(f"double quantization with blocksize {kw['blocksize']} / {kw['dtype']} (kernel: 256, fp32)")
    return (_input(_same_values(kw["A"]), inputs, "absmax"), _input(_same_values(kw["absmax"]), inputs, "absmax2"),
            _input(_same_values(kw["code"]), inputs, "code2"), _input(_same_values(off), inputs, "offset"))


def _dequant_operand(w, inputs):
    """Follow the weight operand of the forward's linear/matmul back to dequantize_4bit; returns (the
    dequantize_4bit node, number of transposes on the way)."""
    flips = 0
    while _bnb(w) != "dequantize_4bit":
        if not isinstance(w, fx.Node):
            raise Reject("the weight operand is not a dequantized 4-bit weight")
        if cast_dtype(w) is not None or is_method(w, "contiguous") or _same_values(w) is not w:
            w = w.args[0]
        elif is_method(w, "t") or (is_method(w, "transpose") and len(w.args) == 3) or (
                is_method(w, "permute") and tuple(w.args[1:]) in ((1, 0), ((1, 0),))):
            flips += 1
            w = w.args[0]
        else:
            raise Reject("the weight operand is not a dequantized 4-bit weight")
    return w, flips


def parse_apply(apply: fx.Node, gm: fx.GraphModule) -> Base:
    """Read one autograd_function_apply node; raise Reject(reason) unless it is bitsandbytes' 4-bit matmul
    that the kernels support."""
    fwd, bwd = (getattr(gm, a.target, None) if isinstance(a, fx.Node) and a.op == "get_attr" else None
                for a in apply.args[:2])
    if not isinstance(fwd, fx.GraphModule) or not isinstance(bwd, fx.GraphModule):
        raise Reject("autograd.Function bodies are not graphs")
    inputs = _body_inputs(apply, fwd)

    # the forward's result: ((out, *extra), saved) in torch 2.1x, (out, saved) in older versions. On CUDA
    # (torch 2.11, bnb 0.50) Dynamo also returns the packed weight's view that the backward reads:
    # ((out, B.view(-1, 1)), saved). Extra outputs are fine as long as the outer graph only reads out (checked
    # below: the apply's only user must be getitem 0).
    res = _output(fwd)
    res = res[0] if isinstance(res, (tuple, list)) else res
    if isinstance(res, (tuple, list)):
        if not res:
            raise Reject("the autograd.Function returns nothing")
        res = res[0]
    x, qweight, scales, bias, n, k, blocksize, quant_type = _read_matmul(res, inputs)
    _check_backward(bwd, list(inputs.values()), x, bias)

    # the outer node that carries the result
    if isinstance(value(apply), torch.Tensor):
        g = apply
    else:
        g = only_user(apply)
        if g is None or not (is_call(g, (operator.getitem,)) and g.args[1] == 0):
            raise Reject("the autograd.Function's output is used in an unknown way")
    base = Base(apply, g, x, qweight, *scales, bias, n, k, blocksize, quant_type)
    _guard(base)
    return base


def parse_gemm(node: fx.Node) -> Base:
    """A bare gemm_4bit call in the graph: bitsandbytes takes it when no gradient is needed through the matmul
    (an input that does not require grad, e.g. the first block's q/k/v); the adapter may still be trained."""
    xv = value(node.args[0]) if node.args else None
    if xv is None or xv.requires_grad:
        raise Reject("gemm_4bit on an input that requires grad: bitsandbytes gives it no backward")
    x, qweight, scales, bias, n, k, blocksize, quant_type = _read_matmul(node, None)
    base = Base(None, node, x, qweight, *scales, bias, n, k, blocksize, quant_type)
    _guard(base)
    return base


def _read_matmul(res, inputs):
    """(x, qweight, (absmax, absmax2, code2, offset), bias, n, k, blocksize, quant_type) of the 4-bit matmul
    node `res`, as outer-graph nodes (`inputs`: body placeholder -> outer node; None: res is in the outer graph)."""
    if _bnb(res) == "gemm_4bit":
        kw = _kwargs(res)
        x, bias = kw["A"], kw["bias"]
        qweight = _flat_bytes(kw["B"], inputs)
        n, k = kw["shapeB"]
        blocksize, quant_type = kw["blocksize"], kw["quant_type"]
        if kw["absmax_8bit"] is None:
            scales = (_input(kw["absmax"], inputs, "absmax"), None, None, None)
        else:  # gemm_4bit's double quantization: absmax_code[absmax_8bit[i]] * absmax[i // 256] + absmax_offset
            scales = tuple(_input(kw[a], inputs, a) for a in ("absmax_8bit", "absmax", "absmax_code", "absmax_offset"))
    elif is_call(res, LINEAR_TARGETS) or is_call(res, MATMUL_TARGETS):
        if is_call(res, LINEAR_TARGETS):
            x, w, bias = linear_args(res)
        else:
            (x, w), bias = res.args[:2], None
        deq, flips = _dequant_operand(w, inputs)
        kw = _kwargs(deq)
        n, k = kw["shape"]
        # linear(x, M) computes x @ M^T: M must be dequant(W) itself; matmul(x, M) needs M = dequant(W)^T
        if flips % 2 != (0 if is_call(res, LINEAR_TARGETS) else 1):
            raise Reject("weight quantized in [K, N] orientation: not supported")
        qweight = _flat_bytes(kw["A"], inputs)
        blocksize, quant_type = kw["blocksize"], kw["quant_type"]
        scales = _scales(kw["absmax"], inputs)
        xv = value(x)
        if xv is not None and kw["dtype"] != xv.dtype and kw["dtype"] != torch.float32:
            # the kernel dequantizes straight to x's dtype: it would skip this rounding
            raise Reject(f"the weight is rounded to {kw['dtype']} before a {xv.dtype} matmul")
    else:
        raise Reject("the forward body's result is not the 4-bit matmul")
    x = _input(x, inputs, "the input")
    bias = None if bias is None else _input(bias, inputs, "the bias")
    return x, qweight, scales, bias, n, k, blocksize, quant_type


def _check_backward(bwd: fx.GraphModule, outer: list, x, bias):
    """bitsandbytes' backward: dequantize_4bit, and gradients for the input (and bias) only. A custom
    autograd.Function with another backward is left alone (fxopt's op brings its own backward)."""
    if not any(_bnb(n) == "dequantize_4bit" for n in bwd.graph.nodes):
        raise Reject("the backward body does not dequantize the weight: not bitsandbytes' 4-bit matmul")
    grads = _output(bwd)
    grads = grads if isinstance(grads, (tuple, list)) else (grads,)
    if len(grads) != len(outer):
        raise Reject("the backward's gradients do not line up with the inputs")
    for node, grad in zip(outer, grads):
        if grad is not None and node is not x and node is not bias:
            raise Reject("the backward returns a gradient for the packed weight or its state")
    if grads[outer.index(x)] is None:
        raise Reject("the backward returns no input gradient")


def _static(v, what):
    if v is None:
        raise Reject(f"no recorded tensor metadata for {what}")
    sizes = [static_int(d) for d in v.shape]
    if None in sizes:
        raise Reject(f"symbolic size of {what}")
    return math.prod(sizes)


def _guard(b: Base):
    """What fxopt::linear_4bit / lora_linear_4bit support, decided on static sizes (the token count stays
    symbolic)."""
    from fxopt.kernels.nf4 import ABSMAX2_BLOCK, BLOCKSIZES

    if b.quant_type not in QUANT_TYPES:
        raise Reject(f"quant type {b.quant_type!r} not supported (nf4, fp4)")
    if b.blocksize not in BLOCKSIZES:
        raise Reject(f"blocksize {b.blocksize} not supported {BLOCKSIZES}")
    if not all(isinstance(d, int) for d in (b.n, b.k)):
        raise Reject("symbolic weight shape")
    xv = value(b.x)
    if xv is None or xv.dtype not in FLOATS or xv.dim() < 1:
        raise Reject(f"input dtype {None if xv is None else xv.dtype} not supported (fp32/fp16/bf16)")
    if static_int(xv.shape[-1]) != b.k:
        raise Reject(f"input features {xv.shape[-1]} != K {b.k}")
    qv = value(b.qweight)
    if _static(qv, "the packed weight") * qv.element_size() < (b.n * b.k + 1) // 2:
        raise Reject("packed weight smaller than N * K / 2 bytes")
    blocks = -(-b.n * b.k // b.blocksize)
    av = value(b.absmax)
    if _static(av, "absmax") != blocks:
        raise Reject(f"absmax has {av.numel()} entries for {blocks} blocks")
    tensors = [xv, qv, av]
    if b.absmax2 is None:
        if av.dtype != torch.float32:
            raise Reject(f"absmax of dtype {av.dtype} (kernel: fp32)")
    else:
        a2, c2, off = value(b.absmax2), value(b.code2), value(b.offset)
        if av.dtype != torch.uint8 or any(v is None or v.dtype != torch.float32 for v in (a2, c2, off)):
            raise Reject("double-quantization state of unexpected dtypes")
        if (_static(a2, "absmax2") != -(-blocks // ABSMAX2_BLOCK) or _static(c2, "code2") != 256
                or _static(off, "offset") != 1):
            raise Reject("double-quantization state of unexpected sizes")
        tensors += [a2, c2, off]
    if b.bias is not None:
        bv = value(b.bias)
        if bv is None or bv.dtype != xv.dtype or tuple(bv.shape) != (b.n,):
            raise Reject("bias of unexpected dtype or shape")
        tensors.append(bv)
    if len({t.device for t in tensors}) != 1:
        raise Reject("tensors on different devices")


# ---------------------------------------------------------------------------------------------------------
# the LoRA adapter on top


def _r_chain(g):
    """The base result after Linear4bit's cast back and PEFT's clone: [g, casts/clones...] while single-use."""
    chain = [g]
    while True:
        user = only_user(chain[-1])
        if user is None or not (cast_dtype(user) is not None or (is_method(user, "clone") and len(user.args) == 1
                                                                  and not user.kwargs)):
            return chain
        chain.append(user)


def match_adapter(b: Base) -> Adapter | None:
    """The PEFT LoRA adapter added onto the base result, None when there is none; Reject(reason) when one is
    there but cannot go into the kernel."""
    chain = _r_chain(b.g)
    r = chain[-1]
    found = [(u, adapter_branch(u.args[1] if u.args[0] is r else u.args[0])) for u in r.users
             if is_call(u, ADD_TARGETS) and len(u.args) == 2 and not u.kwargs]
    found = [(u, br) for u, br in found if br is not None]
    if not found:
        return None
    if len(r.users) != 1:
        raise Reject(f"the base result is also used elsewhere ({len(r.users)} users)")
    add, (cast, mul, u) = found[0]
    t, lora_b, b_bias = linear_args(u)
    xl, lora_a, a_bias = linear_args(t)
    if a_bias is not None or b_bias is not None:
        raise Reject("adapter matrix with a bias")
    scaling = 1.0 if mul is None else adapter_scale(mul, u)
    for node, what in ((t, "adapter hidden x@A^T"), (u, "adapter output"), (mul, "scaled adapter output"),
                       (cast, "cast adapter output")):
        if node is not None and len(node.users) != 1:
            raise Reject(f"{what} is also used elsewhere ({len(node.users)} users)")
    root, exact_l, dropout = adapter_root(xl)
    xroot, exact_x, x_dropout = adapter_root(b.x)
    if root is not xroot or x_dropout:
        raise Reject("base linear and adapter read different inputs")
    nxt = only_user(add)
    if nxt is not None and is_call(nxt, ADD_TARGETS) and any(
            a is not add and adapter_branch(a) for a in nxt.args):
        raise Reject("several active adapters on one layer: not supported")
    gv, addv, av, bv = value(b.g), value(add), value(lora_a), value(lora_b)
    if any(v is None for v in (gv, addv, av, bv)) or tuple(addv.shape) != tuple(gv.shape):
        raise Reject("the adapter sum has another shape than the base result")
    if av.dtype not in FLOATS or bv.dtype != av.dtype or av.dim() != 2 or bv.dim() != 2:
        raise Reject(f"adapter dtypes {av.dtype}/{bv.dtype} or ranks not supported")
    r_a, k_a = (static_int(d) for d in av.shape)
    n_b, r_b = (static_int(d) for d in bv.shape)
    if None in (r_a, k_a, n_b, r_b) or not (k_a == b.k and n_b == b.n and r_a == r_b):
        raise Reject(f"adapter shapes A{list(av.shape)} B{list(bv.shape)} do not fit W[{b.n}, {b.k}]")
    if av.device != gv.device:
        raise Reject("adapter on another device")
    # the kernel's adapter reads x itself only when its input holds exactly x's values
    x_lora = None if (exact_l and exact_x and not dropout) else xl
    if x_lora is not None and (value(xl) is None or tuple(value(xl).shape) != tuple(value(b.x).shape)):
        raise Reject("adapter input of another shape")
    consumed = chain + [t, u] + [n for n in (mul, cast) if n is not None] + [add]
    return Adapter(lora_a, lora_b, scaling, x_lora, xl, dropout, add, consumed)


# ---------------------------------------------------------------------------------------------------------
# rewrite


def _erase(graph, nodes, order):
    for n in sorted(set(nodes), key=order.__getitem__, reverse=True):
        if not n.users:
            graph.erase_node(n)


def _quant_args(b: Base):
    return (b.qweight, b.absmax, b.absmax2, b.code2, b.offset, None, b.bias)


def _rewrite(gm, b: Base, ad: Adapter | None, order):
    graph = gm.graph
    consts = (b.n, b.k, b.blocksize, b.quant_type)
    # The op looks its code table up in a per-device cache. Fill it now, at compile time: created inside the
    # first (CUDA-graph) run, it would be an allocation of the graph's private pool that outlives the run,
    # which Inductor's CUDA graph trees refuse ("tensor(s) in the cudagraph pool not tracked as outputs",
    # seen on the H200 with the qlora workload).
    qv = value(b.qweight)
    if qv is not None and qv.device.type == "cuda":
        from fxopt.kernels.nf4 import code_table

        code_table(b.quant_type, qv.device)
    dead = [b.g] + ([b.apply, *b.apply.args[:2]] if b.apply is not None else [])
    if ad is None:
        with graph.inserting_before(b.g):
            op = graph.call_function(torch.ops.fxopt.linear_4bit.default, (b.x, *_quant_args(b), *consts))
        op.meta.update(b.g.meta)
        b.g.replace_all_uses_with(op)
    else:
        out = ad.out
        # The sum is formed in the outer result's dtype (fp32 when bnb casts an fp32 input down to a bf16
        # compute dtype and its result back up): rounding it to the compute dtype would erase an adapter term
        # below the base term's bf16 resolution, the usual size of a LoRA update early in training.
        out_dtype = value(out).dtype
        with graph.inserting_before(out):
            op = graph.call_function(torch.ops.fxopt.lora_linear_4bit.default,
                                     (b.x, *_quant_args(b), ad.lora_a, ad.lora_b, ad.scaling, ad.x_lora, *consts,
                                      None if out_dtype == value(b.x).dtype else out_dtype))
            y = graph.call_function(operator.getitem, (op, 0))
        gv, xv, av = value(out), value(b.x), value(ad.lora_a)
        rows = math.prod(xv.shape[:-1]) if xv.dim() > 1 else 1
        op.meta.update({k: v for k, v in out.meta.items()
                        if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
        op.meta["example_value"] = (gv, xv.new_empty((rows, av.shape[0]), dtype=av.dtype))
        y.meta.update(out.meta)
        out.replace_all_uses_with(y)
        dead += ad.consumed
        # the adapter-input casts die too when the op reads x directly
        node = ad.xl
        while ad.x_lora is None and isinstance(node, fx.Node) and node is not adapter_root(b.x)[0]:
            dead.append(node)
            node = node.args[0]
    _erase(graph, dead, order)


def run(gm: fx.GraphModule, ctx) -> list[MatchRecord]:
    from fxopt.kernels import nf4 as _nf4  # noqa: F401  (registers torch.ops.fxopt.linear_4bit / lora_linear_4bit)

    records, rewrites = [], []
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is APPLY:
            fwd = getattr(gm, node.args[0].target, None) if isinstance(node.args[0], fx.Node) else None
            if not isinstance(fwd, fx.GraphModule) or not any(_bnb(n) in ("gemm_4bit", "dequantize_4bit")
                                                              for n in fwd.graph.nodes):
                continue  # some other autograd.Function: not ours to report
            parse, args = parse_apply, (node, gm)
        elif _bnb(node) == "gemm_4bit":
            parse, args = parse_gemm, (node,)
        else:
            continue
        where = weight_location(node.args, ctx, module_path(node, ctx.prefix))
        try:
            base = parse(*args)
        except Reject as e:
            records.append(MatchRecord(NAME, where, "rejected", str(e), ctx.graph_name))
            continue
        try:
            adapter = match_adapter(base)
        except Reject as e:
            adapter = None
            records.append(MatchRecord(NAME, where, "rejected", f"adapter not fused: {e}", ctx.graph_name))
        rewrites.append((base, adapter, where))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for base, adapter, where in rewrites:
        sum_dtype = None if adapter is None else value(adapter.out).dtype
        if sum_dtype == value(base.x).dtype:
            sum_dtype = None
        _rewrite(gm, base, adapter, order)
        detail = (f"{base.quant_type}, blocksize {base.blocksize}"
                  f"{', double quant' if base.absmax2 is not None else ''}, W[{base.n}, {base.k}]"
                  f"{', bias' if base.bias is not None else ''}")
        if adapter is None:
            detail = f"fxopt::linear_4bit, {detail}"
        else:
            own = adapter.x_lora is not None and not adapter.dropout  # e.g. fp32 input, bf16 compute dtype
            detail = (f"fxopt::lora_linear_4bit, {detail}, r={static_int(value(adapter.lora_a).shape[0])}, "
                      f"scale={adapter.scaling:g}{', dropout kept' if adapter.dropout else ''}"
                      f"{', adapter reads its own input' if own else ''}"
                      f"{', sum in ' + str(sum_dtype).removeprefix('torch.') if sum_dtype else ''}")
        records.append(MatchRecord(NAME, where, "matched", detail, ctx.graph_name))
    if rewrites:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return records


def weight_location(args, ctx, fallback):
    """The model path of the first argument that is (a view of) a named parameter: the packed weight (Dynamo
    views the Params4bit as [-1, 1]), for the report."""
    for node in args:
        while isinstance(node, fx.Node) and node.op == "call_method" and node.target in VIEW_METHODS:
            node = node.args[0]
        if isinstance(node, fx.Node) and ctx.tensor_names.get(node):
            return ctx.locate(node)
    return fallback
