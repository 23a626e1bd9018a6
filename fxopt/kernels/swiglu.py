"""fxopt::swiglu_lora_linear: the down projection of a gated MLP with its input h = act(gate) * up formed
inside the op, so that h is never saved for backward.

    h   = act(g) * u                        fp32 math, rounded once to g's dtype; act: silu (SwiGLU), gelu
                                            with erf or with the tanh approximation (GeGLU: Gemma's MLPs)
    out = h @ W^T + b + s * (h @ A^T) @ B^T  fxopt::lora_linear's forward (one accumulator)

Why: a LoRA down projection needs its input h for dA, and the gate needs g and u for silu's backward, so an
unfused step keeps g, u and h alive until the backward: on the dense workload (8192 tokens, intermediate 8192,
bf16) that is 3 x 128 MiB per layer. Here the op saves g and u (which the gate's backward needs anyway) and
t = h A^T, and recomputes h in the backward (one elementwise pass): 128 MiB per layer less.
Backward (one op, fxopt::swiglu_lora_linear_backward): dh and dB (and db) by fxopt::lora_linear's backward,
then one kernel over tiles of g, u and dh writes dg = dh * u * act'(g) over dh and du = dh * act(g), and forms
dA = (s dY B)^T h with h recomputed in registers: h is never written again (recomputing it into memory for dA
read g and u, wrote h and read it back: 512 MiB per layer of the dense workload, ~2.7 ms of its step). The MLP's
backward holds g, u and two more [tokens x intermediate] buffers. Where the down projection's weight itself
requires grad (dW = dY^T h) or the kernel does not apply, h is recomputed into memory as a temporary (du is
then written over it).

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
from fxopt.kernels import skinny_mm as _skinny
from fxopt.kernels.common import (ACTIVATIONS, act_and_grad, act_and_grad_torch, act_reference, hi_lo_columns,
                                  interpreted, launch, new_output, pair_sum, use_triton, with_fallback)

_INTERPRETED = False
BLOCK = 1024

if triton is not None:
    store_part = _skinny.store_part

    @triton.jit
    def _swiglu_kernel(G, U, H, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
        a, _ = act_and_grad(g, ACT)  # (the derivative is compiled away)
        tl.store(H + offs, (a * u).to(H.dtype.element_ty), mask=ok)

    @triton.jit
    def _gate_grads(DH, G, U, DG, DU, idx, ok, ACT: tl.constexpr):
        """Stores du = dh * act(g) and dg = dh * u * act'(g) at idx (dg may overwrite dh: read first); returns
        act(g) and u in fp32 (0 where not ok)."""
        dh = tl.load(DH + idx, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(G + idx, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(U + idx, mask=ok, other=0.0).to(tl.float32)
        a, da = act_and_grad(g, ACT)
        tl.store(DU + idx, (dh * a).to(DU.dtype.element_ty), mask=ok)
        tl.store(DG + idx, (dh * u * da).to(DG.dtype.element_ty), mask=ok)
        return a, u

    @triton.jit
    def _swiglu_backward_kernel(DH, G, U, DG, DU, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        _gate_grads(DH, G, U, DG, DU, offs, offs < n, ACT)

    @triton.jit
    def _swiglu_backward_da_kernel(DH, G, U, DG, DU, UA, DA, M, K, R, M_PER_SPLIT,
                                   stride_am, stride_ar, stride_dp, stride_dk, stride_dr,
                                   ACT: tl.constexpr, SPLIT_S: tl.constexpr, ATOMIC: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """For BLOCK_K columns of the [M, K] tensors (contiguous) and program p's range of rows: DG = dh * u *
        act'(g) (over DH), DU = dh * act(g), and DA[p, columns] = h^T @ UA over those rows, h = act(g) * u
        rounded to g's dtype as the forward formed it."""
        pid_k = tl.program_id(0)
        pid_p = tl.program_id(1)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rr = tl.arange(0, BLOCK_R)
        mask_k = offs_k < K
        mask_r = rr < R
        m0 = pid_p * M_PER_SPLIT
        m_end = tl.minimum(m0 + M_PER_SPLIT, M)
        if SPLIT_S:
            acc = tl.zeros((BLOCK_K, 2 * BLOCK_R), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
        for m in range(m0, m_end, BLOCK_M):
            rows = m + tl.arange(0, BLOCK_M)
            mask_m = rows < m_end
            idx = rows[:, None].to(tl.int64) * K + offs_k[None, :]
            a, u = _gate_grads(DH, G, U, DG, DU, idx, mask_m[:, None] & mask_k[None, :], ACT)
            h = (a * u).to(G.dtype.element_ty)  # 0 outside the tile's rows and columns (g = u = 0 there)
            ua = tl.load(UA + rows[:, None].to(tl.int64) * stride_am + rr[None, :] * stride_ar,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            if SPLIT_S:  # fp32 UA as hi + lo columns: tensor-core products, as skinny_mm's
                acc = tl.dot(tl.trans(h), hi_lo_columns(ua, h.dtype, BLOCK_M, BLOCK_R), acc)
            else:  # fp32 g: exact fp32 products
                acc = tl.dot(tl.trans(h), ua, acc, input_precision="ieee")
        if SPLIT_S:
            acc = pair_sum(acc, BLOCK_K, BLOCK_R)
        da_ptrs = DA + pid_p * stride_dp + offs_k[:, None].to(tl.int64) * stride_dk + rr[None, :] * stride_dr
        store_part(da_ptrs, acc, mask_k[:, None] & mask_r[None, :], ATOMIC)

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


# swiglu_grads_and_da's launch configuration (fp32 accumulator BLOCK_K x 2 BLOCK_R; BLOCK_R = 16 for r <= 16): the
# fastest of 8 on the H100 (2026-11-27, 8192 x 8192, r 16): 251 us (2.55 TB/s over dh, g, u, dg, du), against 413 us
# for h recomputed into memory + dA by skinny_mm + the dg/du pass.
DA_CONFIG = dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3)
DA_MAX_R = 64


def da_supported(g: Tensor, lora_a: Tensor) -> bool:
    """Whether swiglu_grads_and_da takes g and the adapter lora_a [R, K]: the Triton path for g (bf16 on CUDA;
    fp16/fp32 in the interpreter), an fp32 adapter of rank <= DA_MAX_R on g's device (then u_a = s dY B is fp32
    [M, R] there too)."""
    return (g.dim() >= 1 and g.numel() > 0 and _use_triton(g) and lora_a.dim() == 2 and lora_a.shape[0] <= DA_MAX_R
            and _skinny.supported(g.reshape(-1, g.shape[-1]), lora_a.t()))


def swiglu_grads_and_da(dh: Tensor, g: Tensor, u: Tensor, u_a: Tensor, activation: str = "silu"):
    """(dg written over dh, du, dA^T = h^T u_a [K, R] fp32) for h = act(g) * u, without h in memory: one pass over
    dh, g and u. u_a = s dY B of the down projection ([M, R], fp32). The partial dA^T of each row range are added
    by atomics, or summed afterwards (see skinny_mm.partial_buffer)."""
    _check(g, u, activation)
    dh, g, u = dh.contiguous(), g.contiguous(), u.contiguous()
    K = g.shape[-1]
    M = g.numel() // K
    R = u_a.shape[1]
    du = _new_output(g.shape, g.dtype, g.device)
    block_r = max(16, triton.next_power_of_2(R))
    cfg = dict(BLOCK_M=16, BLOCK_K=16) if _INTERPRETED else dict(DA_CONFIG)
    block_m, block_k = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_K")
    k_blocks = triton.cdiv(K, block_k)
    splits, m_per_split = _skinny.split_range(k_blocks, M, block_m, g.device)
    da = torch.empty(K, R, dtype=torch.float32, device=g.device)
    dest, strides, atomic = _skinny.partial_buffer(da, splits)
    meta = dict(ACT=ACTIVATIONS.index(activation), SPLIT_S=g.dtype != torch.float32, ATOMIC=atomic,
                BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, **cfg)
    launch(_swiglu_backward_da_kernel, None, lambda _: (k_blocks, splits),
           (dh, g, u, dh, du, u_a, dest, M, K, R, m_per_split, u_a.stride(0), u_a.stride(1), *strides), {}, meta,
           g.device)
    return dh, du, _skinny.add_partials(dest, da)


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
    """[dg, du] + [dW if need_dw] + [db if need_db] + [dA, dB] of swiglu_lora_linear. dh is this op's own
    temporary, read by nothing after the last kernel: dg is written over it."""
    _check(g, u, activation)
    if not need_dw and da_supported(g, lora_a):
        return _fused_da_backward(grad_out, g, u, t, weight, lora_a, lora_b, scaling, need_db, activation)
    h = swiglu(g, u, activation)  # recomputed into memory (dW needs it, or the fused kernel does not apply)
    flat = _lora.lora_linear_backward([grad_out], h, None, t, [weight], [lora_a], [lora_b], [scaling], True,
                                      [need_dw], [need_db])
    dh = flat[0].view(g.shape)
    dg, du = swiglu_grads(dh, g, u, dh, h, activation)
    return [dg, du] + flat[1:]


def _fused_da_backward(grad_out, g, u, t, weight, lora_a, lora_b, scaling, need_db, activation):
    """[dg, du] + [db?] + [dA, dB] with h only in registers: dh and dB by the LoRA backward (its x read only for
    dh's shape), then dA formed in the pass that writes dg and du. `weight`: the dense down projection (for the
    4-bit op, its dequantized transient)."""
    stand_in = torch.empty((), dtype=g.dtype, device=g.device).expand(g.shape)
    result, u_a, d_bs = _lora.backward_parts([grad_out], stand_in, None, t, [weight], [lora_a], [lora_b], [scaling],
                                             True, [False], [need_db])
    dg, du, da_t = swiglu_grads_and_da(result[0].view(g.shape), g, u, u_a, activation)
    return [dg, du] + result[1:] + [da_t.t().contiguous().to(lora_a.dtype), d_bs[0].to(lora_b.dtype)]


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
    """[dg, du] + [db if need_db] + [dA, dB]; dA formed with dg and du where the 4-bit backward takes the dense
    path (the weight dequantized to a transient), else h recomputed, dg written over dh and du over h (as above)."""
    _check(g, u, activation)
    if da_supported(g, lora_a):
        weight = _nf4.dense_backward_weight(grad_out, g.dtype, qweight, absmax, absmax2, code2, offset, code, n, k,
                                            blocksize, quant_type)
        if weight is not None:
            return _fused_da_backward(grad_out, g, u, t, weight, lora_a, lora_b, scaling, need_db, activation)
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
