"""fxopt::swiglu_lora_linear: the down projection of a gated MLP with its input h = act(gate) * up formed
inside the op, so that h is never saved for backward.

    h   = act(g) * u                        fp32 math, rounded once to g's dtype; act: silu (SwiGLU), gelu
                                            with erf or with the tanh approximation (GeGLU: Gemma's MLPs)
    out = h @ W^T + b + s * (h @ A^T) @ B^T  fxopt::lora_linear's forward (one accumulator)

Why: a LoRA down projection needs its input h for dA, and the gate needs g and u for silu's backward, so an
unfused step keeps g, u and h alive until the backward: on the dense workload (8192 tokens, intermediate 8192,
bf16) that is 3 x 128 MiB per layer. Here the op saves g and u (which the gate's backward needs anyway) and
t = h A^T, and recomputes h in the backward (one elementwise pass): 128 MiB per layer less.
Backward (one op, fxopt::swiglu_lora_linear_backward): h recomputed; dh, dA, dB (and dW, db where they require
grad) by fxopt::lora_linear_backward; then dg = dh * u * act'(g), du = dh * act(g) in one elementwise kernel
that writes dg over dh and du over h, so the MLP's backward holds g, u and two more [tokens x intermediate]
buffers instead of four.

Elementwise kernels: Triton on CUDA (and in the interpreter on CPU, how CI tests them); torch math otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the torch math
    triton = None

from fxopt.kernels import lora as _lora
from fxopt.kernels import nf4 as _nf4
from fxopt.kernels.common import (ACTIVATIONS, act_and_grad, act_and_grad_torch, act_reference, interpreted,
                                  launch, new_output, use_triton, with_fallback)

_INTERPRETED = False
BLOCK = 1024

if triton is not None:

    @triton.jit
    def _swiglu_kernel(G, U, H, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
        a, _ = act_and_grad(g, ACT)  # (the derivative is compiled away)
        tl.store(H + offs, (a * u).to(H.dtype.element_ty), mask=ok)

    @triton.jit
    def _swiglu_backward_kernel(DH, G, U, DG, DU, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        dh = tl.load(DH + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
        a, da = act_and_grad(g, ACT)
        tl.store(DU + offs, (dh * a).to(DU.dtype.element_ty), mask=ok)
        tl.store(DG + offs, (dh * u * da).to(DG.dtype.element_ty), mask=ok)

    _INTERPRETED = interpreted(_swiglu_kernel)

_new_output = new_output  # tests poison this module's outputs through it


def _use_triton(*tensors: Tensor) -> bool:
    return use_triton(_INTERPRETED, *tensors, family=__name__)


def _grid(n: int):
    return (triton.cdiv(n, BLOCK),)


def _check(g: Tensor, u: Tensor, activation: str = "silu"):
    if g.shape != u.shape or g.dtype != u.dtype or g.device != u.device:
        raise ValueError(f"swiglu: gate {tuple(g.shape)} {g.dtype} and up {tuple(u.shape)} {u.dtype} must match")
    if activation not in ACTIVATIONS:
        raise ValueError(f"swiglu: activation must be one of {ACTIVATIONS}, got {activation!r}")


@torch.library.custom_op("fxopt::swiglu", mutates_args=())
@with_fallback
def swiglu(g: Tensor, u: Tensor, activation: str = "silu") -> Tensor:
    """h = act(g) * u in fp32, rounded once to g's dtype (no autograd: used inside the fused ops)."""
    _check(g, u, activation)
    h = _new_output(g.shape, g.dtype, g.device)
    if not _use_triton(g, u) or g.numel() == 0:
        h.copy_(act_and_grad_torch(g.float(), activation)[0] * u.float())
        return h
    g, u = g.contiguous(), u.contiguous()
    launch(_swiglu_kernel, None, lambda _: _grid(g.numel()), (g, u, h, g.numel()),
           dict(ACT=ACTIVATIONS.index(activation), BLOCK=BLOCK), {}, g.device)
    return h


@swiglu.register_fake
def _(g, u, activation="silu"):
    _check(g, u, activation)
    return torch.empty_like(g, memory_format=torch.contiguous_format)


def swiglu_grads(dh: Tensor, g: Tensor, u: Tensor, dg: Tensor, du: Tensor,
                 activation: str = "silu") -> tuple[Tensor, Tensor]:
    """(dg, du) of h = act(g) * u, written into the given contiguous buffers of g's shape and dtype. dg may be
    dh itself (each element is read before it is written); du must not alias dh."""
    _check(g, u, activation)
    if not _use_triton(dh, g, u) or g.numel() == 0:
        dhf, uf = dh.float(), u.float()
        a, da = act_and_grad_torch(g.float(), activation)
        du.copy_(dhf * a)
        dg.copy_(dhf * uf * da)
        return dg, du
    dh, g, u = dh.contiguous(), g.contiguous(), u.contiguous()
    launch(_swiglu_backward_kernel, None, lambda _: _grid(g.numel()), (dh, g, u, dg, du, g.numel()),
           dict(ACT=ACTIVATIONS.index(activation), BLOCK=BLOCK), {}, g.device)
    return dg, du


@torch.library.custom_op("fxopt::swiglu_lora_linear", mutates_args=())
@with_fallback
def swiglu_lora_linear(g: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                       lora_b: Tensor, scaling: float, activation: str = "silu") -> tuple[Tensor, Tensor]:
    """(out [..., N], t = h @ A^T [M, R]); t is returned only to be saved for backward."""
    h = swiglu(g, u, activation)
    outs, t = _lora._forward(h, [weight], [] if bias is None else [bias], [lora_a], [lora_b], [scaling], None,
                             [bias is not None])
    return outs[0], t


@swiglu_lora_linear.register_fake
def _(g, u, weight, bias, lora_a, lora_b, scaling, activation="silu"):
    _check(g, u, activation)
    m = 1
    for d in g.shape[:-1]:
        m = m * d
    return g.new_empty(*g.shape[:-1], weight.shape[0]), g.new_empty(m, lora_a.shape[0], dtype=lora_a.dtype)


def _setup_context(ctx, inputs, output):
    g, u, weight, bias, lora_a, lora_b, scaling, activation = inputs
    ctx.save_for_backward(g, u, output[1], weight, lora_a, lora_b)
    ctx.scaling = scaling
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])


@torch.library.custom_op("fxopt::swiglu_lora_linear_backward", mutates_args=())
@with_fallback
def swiglu_lora_linear_backward(grad_out: Tensor, g: Tensor, u: Tensor, t: Tensor, weight: Tensor,
                                lora_a: Tensor, lora_b: Tensor, scaling: float, need_dw: bool,
                                need_db: bool, activation: str = "silu") -> list[Tensor]:
    """[dg, du] + [dW if need_dw] + [db if need_db] + [dA, dB] of swiglu_lora_linear. h is recomputed here.
    dh and h are this op's own temporaries, read by nothing after swiglu_grads: dg is written over dh and du
    over h, so the MLP's backward holds two [tokens x intermediate] buffers fewer."""
    _check(g, u, activation)
    h = swiglu(g, u, activation)  # recomputed: the reason the forward op exists
    flat = _lora.lora_linear_backward([grad_out], h, None, t, [weight], [lora_a], [lora_b], [scaling], True,
                                      [need_dw], [need_db])
    dh = flat[0].view(g.shape)
    dg, du = swiglu_grads(dh, g, u, dh, h, activation)
    return [dg, du] + flat[1:]


@swiglu_lora_linear_backward.register_fake
def _(grad_out, g, u, t, weight, lora_a, lora_b, scaling, need_dw, need_db, activation="silu"):
    _check(g, u, activation)
    out = [torch.empty_like(g, memory_format=torch.contiguous_format),
           torch.empty_like(u, memory_format=torch.contiguous_format)]
    out += [torch.empty_like(weight)] if need_dw else []
    out += [weight.new_empty(weight.shape[0])] if need_db else []
    return out + [torch.empty_like(lora_a), torch.empty_like(lora_b)]


def _backward(ctx, grad_out, grad_t):
    g, u, t, weight, lora_a, lora_b = ctx.saved_tensors
    need = ctx.needs_input_grad  # (g, u, weight, bias, lora_a, lora_b, scaling)
    if grad_out is None:
        grad_out = torch.zeros(*g.shape[:-1], weight.shape[0], dtype=g.dtype, device=g.device)
    need_db = bool(need[3]) and ctx.has_bias
    flat = iter(swiglu_lora_linear_backward(grad_out, g, u, t, weight, lora_a, lora_b, ctx.scaling, bool(need[2]),
                                            need_db, ctx.activation))
    dg, du = next(flat), next(flat)
    dw = next(flat) if need[2] else None
    db = next(flat) if need_db else None
    da, dbm = next(flat), next(flat)
    return (dg if need[0] else None), (du if need[1] else None), dw, db, da, dbm, None, None


swiglu_lora_linear.register_autograd(_backward, setup_context=_setup_context)


def reference(g, u, weight, bias, lora_a, lora_b, scaling, h_dtype=None, t_dtype=None, activation="silu") -> Tensor:
    """The op's math in plain PyTorch (differentiable): h = act(g) * u computed in at least fp32 and rounded
    to g's dtype, then PEFT's LoRA (t = h A^T in the adapter's dtype). With float64 inputs (the tests' truth),
    h_dtype / t_dtype apply those roundings as the op would for inputs of those dtypes."""
    acc = torch.promote_types(g.dtype, torch.float32)
    h = (act_reference(g.to(acc), activation) * u.to(acc)).to(h_dtype or g.dtype).to(g.dtype)
    out = torch.nn.functional.linear(h, weight, bias)
    t = torch.nn.functional.linear(h.to(lora_a.dtype), lora_a).to(t_dtype or lora_a.dtype).to(lora_a.dtype)
    adapter = torch.nn.functional.linear(t, lora_b) * scaling
    return (out.to(torch.promote_types(out.dtype, adapter.dtype)) + adapter).to(g.dtype)


def swiglu_lora_linear_fn(g, u, weight, bias, lora_a, lora_b, scaling, activation="silu") -> Tensor:
    return torch.ops.fxopt.swiglu_lora_linear(g, u, weight, bias, lora_a, lora_b, float(scaling), activation)[0]


# ---------------------------------------------------------------------------------------------------------
# the same with a bitsandbytes 4-bit down projection (QLoRA): fxopt::lora_linear_4bit in place of lora_linear


@torch.library.custom_op("fxopt::swiglu_lora_linear_4bit", mutates_args=())
@with_fallback
def swiglu_lora_linear_4bit(g: Tensor, u: Tensor, qweight: Tensor, absmax: Tensor, absmax2: Optional[Tensor],
                            code2: Optional[Tensor], offset: Optional[Tensor], code: Optional[Tensor],
                            bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scaling: float, n: int, k: int,
                            blocksize: int, quant_type: str, activation: str = "silu") -> tuple[Tensor, Tensor]:
    """(out [..., n], t = h @ A^T [M, R]): fxopt::lora_linear_4bit of h = act(g) * u, h formed here and
    recomputed in the backward (the quantized weight's arguments as lora_linear_4bit takes them)."""
    h = swiglu(g, u, activation)
    return _nf4.lora_linear_4bit(h, qweight, absmax, absmax2, code2, offset, code, bias, lora_a, lora_b, scaling,
                                 None, n, k, blocksize, quant_type)


@swiglu_lora_linear_4bit.register_fake
def _(g, u, qweight, absmax, absmax2, code2, offset, code, bias, lora_a, lora_b, scaling, n, k, blocksize,
      quant_type, activation="silu"):
    _check(g, u, activation)
    m = 1
    for d in g.shape[:-1]:
        m = m * d
    return g.new_empty(*g.shape[:-1], n), g.new_empty(m, lora_a.shape[0], dtype=lora_a.dtype)


def _setup_4bit(ctx, inputs, output):
    g, u, *quant, bias, lora_a, lora_b, scaling, n, k, blocksize, quant_type, activation = inputs
    ctx.save_for_backward(g, u, output[1], *quant, lora_a, lora_b)
    ctx.meta = (scaling, n, k, blocksize, quant_type, activation, bias is not None)
    ctx.mark_non_differentiable(output[1])


@torch.library.custom_op("fxopt::swiglu_lora_linear_4bit_backward", mutates_args=())
@with_fallback
def swiglu_lora_linear_4bit_backward(grad_out: Tensor, g: Tensor, u: Tensor, t: Tensor, qweight: Tensor,
                                     absmax: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
                                     offset: Optional[Tensor], code: Optional[Tensor], lora_a: Tensor,
                                     lora_b: Tensor, scaling: float, n: int, k: int, blocksize: int, quant_type: str,
                                     need_db: bool, activation: str = "silu") -> list[Tensor]:
    """[dg, du] + [db if need_db] + [dA, dB]; h recomputed, dg written over dh and du over h (as above)."""
    _check(g, u, activation)
    h = swiglu(g, u, activation)
    flat = _nf4.lora_linear_4bit_backward(grad_out, h, t, qweight, absmax, absmax2, code2, offset, code, lora_a,
                                          lora_b, scaling, n, k, blocksize, quant_type, h.dtype, False, True, need_db)
    dh = flat[0].view(g.shape)
    dg, du = swiglu_grads(dh, g, u, dh, h, activation)
    return [dg, du] + flat[1:]


@swiglu_lora_linear_4bit_backward.register_fake
def _(grad_out, g, u, t, qweight, absmax, absmax2, code2, offset, code, lora_a, lora_b, scaling, n, k, blocksize,
      quant_type, need_db, activation="silu"):
    _check(g, u, activation)
    out = [torch.empty_like(g, memory_format=torch.contiguous_format),
           torch.empty_like(u, memory_format=torch.contiguous_format)]
    out += [g.new_empty(n)] if need_db else []
    return out + [torch.empty_like(lora_a), torch.empty_like(lora_b)]


def _backward_4bit(ctx, grad_out, _grad_t):
    g, u, t, *quant, lora_a, lora_b = ctx.saved_tensors
    scaling, n, k, blocksize, quant_type, activation, has_bias = ctx.meta
    need = ctx.needs_input_grad  # (g, u, qweight, absmax, absmax2, code2, offset, code, bias, lora_a, lora_b, ...)
    if grad_out is None:
        grad_out = torch.zeros(*g.shape[:-1], n, dtype=g.dtype, device=g.device)
    need_db = bool(need[8]) and has_bias
    flat = iter(swiglu_lora_linear_4bit_backward(grad_out, g, u, t, *quant, lora_a, lora_b, scaling, n, k,
                                                 blocksize, quant_type, need_db, activation))
    dg, du = next(flat), next(flat)
    db = next(flat) if need_db else None
    da, dbm = next(flat), next(flat)
    return ((dg if need[0] else None), (du if need[1] else None), *([None] * 6), db, da, dbm,
            *([None] * 6))


swiglu_lora_linear_4bit.register_autograd(_backward_4bit, setup_context=_setup_4bit)


def reference_4bit(g, u, qweight, absmax, absmax2, code2, offset, code, bias, lora_a, lora_b, scaling, n, k,
                   blocksize, quant_type, activation="silu") -> Tensor:
    """swiglu_lora_linear_4bit in plain PyTorch: h = act(g) * u in fp32 rounded to g's dtype, then nf4.reference
    (the weight dequantized by bitsandbytes' rule, PEFT's adapter)."""
    acc = torch.promote_types(g.dtype, torch.float32)
    h = (act_reference(g.to(acc), activation) * u.to(acc)).to(g.dtype)
    return _nf4.reference(h, qweight, absmax, absmax2, code2, offset, code, bias, n, k, blocksize, quant_type,
                          lora_a, lora_b, scaling)
