"""Gated MLP: act(gate) * up feeding a fused LoRA down projection -> fxopt::swiglu_lora_linear.

Pattern (after the lora pass has fused the LoRA linears):
    h   = act(g) * u           (or u * act(g)); act: silu (SwiGLU: Llama, Qwen, Mistral, ...) or gelu, exact or
                               with the tanh approximation (GeGLU: Gemma's gelu_pytorch_tanh); g, u: any tensors
                               of one dtype and shape (here, the outputs of the fused gate/up LoRA op)
    out = fxopt::lora_linear(h, [W], [b?], [A], [B], [s], x_lora=None)[0]
Rewrite: out = fxopt::swiglu_lora_linear(g, u, W, b, A, B, s, act)[0]. The op forms h itself and recomputes it in
the backward instead of saving it (see fxopt/kernels/swiglu.py): one [tokens x intermediate] tensor per layer
less activation memory. A 4-bit down projection (the qlora pass's fxopt::lora_linear_4bit, its sum in the input's
dtype) becomes fxopt::swiglu_lora_linear_4bit the same way.

Reported when the activation product feeds a LoRA down projection but is not matched: LoRA dropout on the
down projection (its dropped input would have to be saved),
h or silu(g) used elsewhere, gate and up of different dtypes or shapes.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxopt.kernels import swiglu as _kernel  # noqa: F401  (registers torch.ops.fxopt.swiglu_lora_linear)
from fxopt.passes.graph_utils import MUL_TARGETS, Reject, is_call, module_path, value
from fxopt.passes.qlora import weight_location
from fxopt.report import MatchRecord

NAME = "swiglu"
DESCRIPTION = ("silu / gelu(gate) * up -> LoRA down projection as fxopt::swiglu_lora_linear (h recomputed, not "
               "saved)")
SILU_TARGETS = (F.silu, torch.ops.aten.silu.default)
GELU_TARGETS = (F.gelu, torch.ops.aten.gelu.default)


def _activation_product(x):
    """(act node, other factor) when x = act(g) * u or u * act(g) with act a silu or gelu call, else None."""
    if not is_call(x, MUL_TARGETS) or len(x.args) != 2 or x.kwargs:
        return None
    for act, other in ((x.args[0], x.args[1]), (x.args[1], x.args[0])):
        if is_call(act, SILU_TARGETS + GELU_TARGETS) and isinstance(other, fx.Node):
            return act, other
    return None


def _down_projection(op):
    """(x, x_lora, the parameter node naming the layer, the fused op, its arguments after g and u but before the
    activation) of a fused LoRA down projection of one output, else None."""
    if is_call(op, (torch.ops.fxopt.lora_linear.default,)):
        x, weights, biases, lora_as, lora_bs, scalings, x_lora, has_bias = op.args
        if len(weights) != 1:
            return None
        bias = biases[0] if has_bias[0] else None
        return (x, x_lora, weights[0], torch.ops.fxopt.swiglu_lora_linear.default,
                (weights[0], bias, lora_as[0], lora_bs[0], scalings[0]))
    # lora_linear_4bit(x, qweight, absmax, absmax2, code2, offset, code, bias, A, B, s, x_lora, n, k, blocksize,
    # quant_type, out_dtype): a sum widened to out_dtype (the fp32 residual stream of the QLoRA recipe) is not
    # this op's form (no fused op: reported)
    args = op.args
    widened = len(args) > 16 and args[16] is not None
    return (args[0], args[11], args[1], None if widened else torch.ops.fxopt.swiglu_lora_linear_4bit.default,
            (*args[1:11], *args[12:16]))


def _match(op, ctx):
    down = _down_projection(op)
    found = None if down is None else _activation_product(down[0])
    if found is None and down is not None and down[3] is None and _activation_product(down[1]) is not None:
        # the QLoRA recipe as is: h in fp32, cast down for the 4-bit GEMM, the adapter reading h itself
        raise Reject("the 4-bit down projection reads the gated product cast to its compute dtype and sums in fp32 "
                     "(prepare_model_for_kbit_training's fp32 residual stream); frozen_fp32=\"compute_dtype\" runs "
                     "it in that dtype, where it is fused")
    if found is None:
        return None  # not a gated MLP's down projection: nothing to report
    x, x_lora, _, fused, operands = down
    act, u = found
    activation = _activation(act)
    g = act.args[0]
    if x_lora is not None:
        raise Reject("LoRA dropout on the down projection: its dropped input would have to be saved")
    if fused is None:
        raise Reject("the 4-bit down projection sums in a wider dtype than its input (an fp32 residual stream "
                     "over a half precision compute dtype)")
    if len(act.users) != 1 or len(x.users) != 1:
        raise Reject("silu(gate) or the gated product is also used elsewhere")
    vg, vu = value(g), value(u)
    if vg is None or vu is None:
        raise Reject("no example values on the graph")
    if vg.dtype != vu.dtype or vg.dim() != vu.dim() or not all(
            statically_known_true(a == b) for a, b in zip(vg.shape, vu.shape)):
        raise Reject(f"gate {vg.dtype} {tuple(vg.shape)} and up {vu.dtype} {tuple(vu.shape)} differ")
    users = list(op.users)
    if not all(is_call(n, (operator.getitem,)) and n.args[1] == 0 for n in users):
        raise Reject("the adapter's saved product is read outside the op")
    where = _location(op, ctx)
    return dict(op=op, g=g, u=u, fused=fused, operands=operands, act=act, x=x, users=users, where=where,
                activation=activation)


def _location(op, ctx) -> str:
    """The down projection's model path, from (a view of) its weight's parameter, for the report."""
    down = _down_projection(op)
    return weight_location([down[2]] if down else [], ctx, module_path(op, ctx.prefix))


def _activation(act) -> str:
    """The op's name for the activation call act (silu, gelu, gelu_tanh), or Reject."""
    if is_call(act, SILU_TARGETS):
        if act.kwargs.get("inplace", False) or len(act.args) != 1:
            raise Reject("silu with extra arguments")
        return "silu"
    approximate = act.kwargs.get("approximate", act.args[1] if len(act.args) > 1 else "none")
    if len(act.args) > 2 or set(act.kwargs) - {"approximate"} or approximate not in ("none", "tanh"):
        raise Reject(f"gelu with arguments {act.args[1:]} {act.kwargs}")
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def _rewrite(gm, m):
    g = gm.graph
    with g.inserting_before(m["op"]):
        new = g.call_function(m["fused"], (m["g"], m["u"], *m["operands"], m["activation"]))
        out = g.call_function(operator.getitem, (new, 0))
    # the passes after this one read shapes and dtypes from node metadata: the output is the old one's value
    out.meta.update({k: v for k, v in m["users"][0].meta.items() if k in ("example_value", "val", "nn_module_stack")})
    for user in m["users"]:
        user.replace_all_uses_with(out)
        g.erase_node(user)
    g.erase_node(m["op"])
    for n in (m["x"], m["act"]):
        if not n.users:
            g.erase_node(n)


def run(gm: fx.GraphModule, ctx) -> list[MatchRecord]:
    records = []
    downs = (torch.ops.fxopt.lora_linear.default, torch.ops.fxopt.lora_linear_4bit.default)
    for op in [n for n in gm.graph.nodes if is_call(n, downs)]:
        try:
            m = _match(op, ctx)
        except Reject as e:
            records.append(MatchRecord(NAME, _location(op, ctx), "rejected", str(e), ctx.graph_name))
            continue
        if m is None:
            continue
        _rewrite(gm, m)
        act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu (tanh)"}[m["activation"]]
        records.append(MatchRecord(NAME, m["where"], "matched",
                                   f"{m['fused'].name().removesuffix('.default')} (h = {act}(gate) * up "
                                   "recomputed in backward)", ctx.graph_name))
    if any(r.status == "matched" for r in records):
        gm.graph.lint()
        gm.recompile()
    return records
