"""fxopt::lora_linear: base linear plus LoRA adapter in one accumulator, for one or several adapters that
read the same input (q/k/v, gate/up).

    out_i = x @ W_i^T + b_i + s_i * (x_l @ A_i^T) @ B_i^T          x_l = x_lora (dropout(x)) or x

Forward: t = x_l @ [A_1; ...; A_n]^T is one small GEMM for all adapters; then for each i one Triton kernel
computes x @ W_i^T and adds s_i * t_i @ B_i^T into the same fp32 accumulator (a short extra K-loop of
length R_i), plus the bias, and stores once: the base and adapter outputs are never written separately.
Backward (W frozen): u_i = dY_i @ B_i; dX = sum_i dY_i @ W_i + s_i * u_i @ A_i, by the same kernel (X=dY_i,
weight W_i, low-rank u_i and A_i, accumulating over i); dA_i = s_i u_i^T x_l; dB_i = s_i dY_i^T t_i.
Saved for backward: x, x_lora (if any) and t; weights and adapters are parameters.

The adapter branch runs in the adapter's dtype, like PEFT (which keeps adapters in fp32 over a bf16 base).
On CUDA the op launches the Triton kernel; on CPU it runs `reference`-equivalent torch math, except when
the kernel is interpreted (TRITON_INTERPRET=1 set before import), where the same Triton code runs in
Triton's interpreter: that is how CI tests the kernel without a GPU.
"""
from __future__ import annotations

import os

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): every call runs the torch math
    triton = None

from fxopt.kernels import skinny_mm
from fxopt.kernels.common import (has_out_dtype_mm, interpreted, launch, new_output, split_bf16, use_triton,
                                  with_fallback)

_INTERPRETED = False

if triton is not None:

    @triton.jit
    def _lora_matmul_kernel(
        X, W, T, L, BIAS, OUT,
        M, N, K, R, M_BUCKET,
        stride_xm, stride_xk, stride_wk, stride_wn, stride_tm, stride_tr, stride_lr, stride_ln,
        stride_om, stride_on,
        scale,
        HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """OUT[M, N] (+)= X[M, K] @ W[K, N] + scale * T[M, R] @ L[R, N] + BIAS[N]; fp32 accumulator."""
        # Grouped launch order: GROUP_M row-blocks share their column-blocks of W while they sit in L2.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % rows
        pid_n = (pid % group) // rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Operand loads wrap rows/columns past the edge onto valid ones (modulo) instead of masking them, so
        # they stay unmasked in M and N; the extra rows/columns are dropped by the masked store.
        # int64: M * stride exceeds 2^31 for long inputs.
        load_m = (offs_m % M).to(tl.int64)
        load_n = (offs_n % N).to(tl.int64)

        rk = tl.arange(0, BLOCK_K)
        x_ptrs = X + load_m[:, None] * stride_xm + rk[None, :] * stride_xk
        w_ptrs = W + rk[:, None] * stride_wk + load_n[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        if HAS_LORA:
            # The low-rank term goes into the same accumulator (a second one would double the registers of
            # the tile), so the scale is folded into the T tile, multiplied in fp32 before the cast back.
            rr = tl.arange(0, BLOCK_R)
            t_ptrs = T + load_m[:, None] * stride_tm + rr[None, :] * stride_tr
            l_ptrs = L + rr[:, None] * stride_lr + load_n[None, :] * stride_ln
            for r in range(0, tl.cdiv(R, BLOCK_R)):
                r_left = R - r * BLOCK_R
                t = tl.load(t_ptrs, mask=rr[None, :] < r_left, other=0.0)
                t = (t.to(tl.float32) * scale).to(t.dtype)
                lo = tl.load(l_ptrs, mask=rr[:, None] < r_left, other=0.0)
                acc = tl.dot(t, lo, acc, input_precision=PRECISION)
                t_ptrs += BLOCK_R * stride_tr
                l_ptrs += BLOCK_R * stride_lr

        mask_n = offs_n < N
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
        mask = (offs_m[:, None] < M) & mask_n[None, :]
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)

    _INTERPRETED = interpreted(_lora_matmul_kernel)

    # Hopper-sized tiles (a config that does not fit shared memory, e.g. the largest in fp32, is skipped by
    # the autotuner). M, the token count, is symbolic in the compiled graph and varies: tune on a
    # power-of-two bucket of it. stride_wn is in the key because the same (N, K) comes as W^T (forward) and
    # as W (backward dX). restore_value: the backward accumulates into OUT, tuning runs must not stack up.
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4), (64, 64, 64, 4, 3),
        ]
    ]
    _tuned_kernel = None if _INTERPRETED else triton.autotune(
        configs=_CONFIGS, key=["N", "K", "M_BUCKET", "stride_wn"], restore_value=["OUT"])(_lora_matmul_kernel)


# the interpreter's one small config (autotuning it is pointless)
_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
_new_output = new_output  # tests poison this module's outputs through it


def _use_triton(*tensors: Tensor) -> bool:
    return use_triton(_INTERPRETED, *tensors, family=__name__)


# Which GEMM runs the op on CUDA: "triton" (the fused kernel above), "cublas" (the low-rank term by one small
# cuBLAS GEMM into the output, then the base GEMM accumulating into it with beta=1: _cublas_linear_sum), or
# "auto" (the fused kernel for wide outputs, N >= 4096, where it measured 1.2-2x faster than cuBLAS alone).
# Default "cublas": on the dense workload (H100, 2026-11-24) it trained as fast as "auto" (48.4k vs 47.7k
# tokens/s) with a first step of 8 s instead of 33 s (the Triton autotuning). FXOPT_LORA_GEMM overrides it.
GEMM = os.environ.get("FXOPT_LORA_GEMM", "cublas")
if GEMM not in ("triton", "cublas", "auto"):
    raise ValueError(f"FXOPT_LORA_GEMM must be 'triton', 'cublas' or 'auto', got {GEMM!r}")


def _cublas_linear_sum(out: Tensor, products, lows, bias: Optional[Tensor]) -> Tensor:
    """out = sum_i x_i @ w_i + sum_j s_j * t_j @ lo_j + bias on cuBLAS. The low-rank terms go first, as one
    GEMM over their concatenated ranks that writes out; then each base GEMM accumulates into it (beta = 1),
    whose read of out sits in the epilogue of a compute-bound GEMM. Adding the low-rank term after the base
    GEMM instead costs a memory-bound pass of its own over the output (read + write): 5.6 ms of addmm_ passes
    in the dense workload's forward on the H100 (2026-11-27 trace)."""
    if lows:
        # The low-rank term lands in a half-precision output: rounding its operands (scale folded into t) to
        # that precision first costs about one output rounding (within the bf16 tolerance against fp64).
        first = (torch.cat([(tj if sj == 1.0 else tj * sj).to(out.dtype) for tj, _, sj in lows], 1),
                 torch.cat([loj.to(out.dtype) for _, loj, _ in lows], 0))
        rest = products
    else:
        first, rest = products[0], products[1:]
    if bias is not None:
        torch.addmm(bias.to(out.dtype), *first, out=out)
    else:
        torch.mm(*first, out=out)
    for x, w in rest:
        out.addmm_(x, w)
    return out


def _linear_sum(out: Tensor, products, lows, bias: Optional[Tensor] = None) -> Tensor:
    """out = sum_i x_i @ w_i + sum_j s_j * t_j @ lo_j + bias (products [(x, w)], lows [(t, lo, s)], at most one
    low-rank term per product): on CUDA's default path by cuBLAS (_cublas_linear_sum), else one fused
    matmul per product accumulating into out."""
    x0, w0 = products[0]
    if x0.is_cuda and x0.shape[0] > 0 and _use_triton(x0, *(t for t, _, _ in lows)) and (
            GEMM == "cublas" or (GEMM == "auto" and w0.shape[1] < 4096)):
        return _cublas_linear_sum(out, products, lows, bias)
    for i, (x, w) in enumerate(products):
        t, lo, s = lows[i] if i < len(lows) else (None, None, 1.0)
        _fused_matmul(x, w, t, lo, s, bias if i == 0 else None, out, accumulate=i > 0)
    return out


def _adapter_mm(a: Tensor, b: Tensor, dtype: torch.dtype, scale: float = 1.0, out: Optional[Tensor] = None) -> Tensor:
    """scale * a @ b in the adapter's dtype, where one operand is an activation (bf16 base model) and the other
    an adapter-sized fp32 tensor (A, B, t = x A^T, u = dY B). PEFT computes this in fp32 after casting the
    activation to fp32, i.e. an fp32 (FFMA, no tensor core) GEMM plus a full fp32 copy of the activation.
    On CUDA the small fp32 operand is split into bf16 hi + lo and multiplied on tensor cores with an fp32
    result (the activation is exact in bf16): same values to ~2^-17 relative, no copy of the activation. The
    skinny_mm kernel does that in one launch (the split on the tile); torch ops, where it does not apply.
    `out`: the result is written into it (any strides, e.g. columns of a wider buffer) and returned."""
    small_fp32 = {a.dtype, b.dtype} == {torch.bfloat16, torch.float32}
    if dtype == torch.float32 and small_fp32 and a.dim() == 2 and b.dim() == 2:
        if b.dtype == torch.float32 and skinny_mm.supported(a, b):
            return skinny_mm.skinny_mm(a, b, scale, out=out)
        if a.dtype == torch.float32 and skinny_mm.supported(b.t(), a.t()):  # (b^T a^T)^T, into [R, K] rows
            if out is None:
                out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
            skinny_mm.skinny_mm(b.t(), a.t(), scale, out=out.t())
            return out
    if a.is_cuda and dtype == torch.float32 and small_fp32 and has_out_dtype_mm(a.device.index or 0):
        if a.dtype == torch.float32:
            hi, lo = split_bf16(a)
            r = torch.mm(torch.cat([hi, lo], 0), b, out_dtype=torch.float32)
            r = r[:a.shape[0]] + r[a.shape[0]:]
        else:
            hi, lo = split_bf16(b)
            r = torch.mm(a, torch.cat([hi, lo], 1), out_dtype=torch.float32)
            r = r[:, :b.shape[1]] + r[:, b.shape[1]:]
    else:
        r = a.to(dtype) @ b.to(dtype)
    r = r if scale == 1.0 else scale * r
    return r if out is None else out.copy_(r)


def _fused_matmul(x: Tensor, w: Tensor, t: Optional[Tensor], lo: Optional[Tensor], scale: float,
                  bias: Optional[Tensor], out: Tensor, accumulate: bool = False) -> Tensor:
    """out (+)= x @ w + scale * t @ lo + bias;  x [M, K], w [K, N], t [M, R], lo [R, N], any strides.
    t and lo are None for no low-rank term. x, w share a dtype; t, lo share one (possibly another)."""
    M, K = x.shape
    N = w.shape[1]
    if M == 0 or N == 0:
        return out
    if not _use_triton(x, t):
        acc_dtype = torch.promote_types(out.dtype, torch.float32)
        acc = x.to(acc_dtype) @ w.to(acc_dtype)
        if t is not None:
            acc += scale * (t @ lo).to(acc_dtype)
        if bias is not None:
            acc += bias.to(acc_dtype)
        if accumulate:
            acc += out
        return out.copy_(acc)
    has_lora = t is not None and t.shape[1] > 0
    R = t.shape[1] if has_lora else 0
    if not has_lora:  # the pointers are never read: any tensor will do
        t, lo = x, w
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else out
    # An fp32 result gets exact fp32 products (tl.dot on fp32 would use tf32 on the GPU); for a half
    # precision result, fp32 adapter operands in tf32 are within that result's rounding.
    precision = "ieee" if out.dtype == torch.float32 else "tf32"
    args = (x, w, t, lo, bias, out, M, N, K, R, min(triton.next_power_of_2(M), 8192),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), t.stride(0), t.stride(1),
            lo.stride(0), lo.stride(1), out.stride(0), out.stride(1), float(scale))
    flags = dict(HAS_LORA=has_lora, HAS_BIAS=has_bias, ACCUMULATE=accumulate, PRECISION=precision,
                 BLOCK_R=16 if R <= 16 else (32 if R <= 32 else 64))
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    launch(_lora_matmul_kernel, _tuned_kernel, grid, args, flags, _INTERPRETER_CONFIG, x.device)
    return out


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _adapter_input(x2, x_lora):
    """The adapter's input, uncast: _adapter_mm casts (or avoids casting) it."""
    return x2 if x_lora is None else _flat(x_lora)


def _per_adapter_bias(biases, has_bias):
    it = iter(biases)
    return [next(it) if hb else None for hb in has_bias]


def _forward(x, weights, biases, lora_as, lora_bs, scalings, x_lora, has_bias):
    biases = _per_adapter_bias(biases, has_bias)
    x2 = _flat(x)
    adt = lora_as[0].dtype
    a_cat = torch.cat([a.to(adt) for a in lora_as]) if len(lora_as) > 1 else lora_as[0]
    t = _adapter_mm(_adapter_input(x2, x_lora), a_cat.t(), adt)  # [M, sum R_i]: one GEMM for every adapter
    outs, r0 = [], 0
    for w, b, a, bm, s in zip(weights, biases, lora_as, lora_bs, scalings):
        r = a.shape[0]
        out = _new_output((x2.shape[0], w.shape[0]), x.dtype, x.device)
        _linear_sum(out, [(x2, w.t())], [(t[:, r0:r0 + r], bm.to(adt).t(), s)], b)
        outs.append(out.view(*x.shape[:-1], w.shape[0]))
        r0 += r
    return outs, t


@torch.library.custom_op("fxopt::lora_linear", mutates_args=())
@with_fallback
def lora_linear(x: Tensor, weights: list[Tensor], biases: list[Tensor], lora_as: list[Tensor],
                lora_bs: list[Tensor], scalings: list[float], x_lora: Optional[Tensor],
                has_bias: list[bool]) -> list[Tensor]:
    """Returns [out_1, ..., out_n, t]; t = x_l @ [A_1; ...; A_n]^T is returned only to be saved for backward.
    `biases` holds only the biases that exist, `has_bias[i]` says whether adapter i's base has one (a list of
    optional tensors would be one opaque leaf to the custom-op autograd, with no way to return its grads)."""
    outs, t = _forward(x, weights, biases, lora_as, lora_bs, scalings, x_lora, has_bias)
    return outs + [t]


@lora_linear.register_fake
def _(x, weights, biases, lora_as, lora_bs, scalings, x_lora, has_bias):
    lead = x.shape[:-1]
    m = 1
    for d in lead:
        m = m * d
    rsum = sum(a.shape[0] for a in lora_as)
    return [x.new_empty(*lead, w.shape[0]) for w in weights] + [x.new_empty(m, rsum, dtype=lora_as[0].dtype)]


@torch.library.custom_op("fxopt::lora_linear_backward", mutates_args=())
@with_fallback
def lora_linear_backward(grads: list[Tensor], x: Tensor, x_lora: Optional[Tensor], t: Tensor, weights: list[Tensor],
                         lora_as: list[Tensor], lora_bs: list[Tensor], scalings: list[float], need_dx: bool,
                         need_dw: list[bool], need_db: list[bool]) -> list[Tensor]:
    """Returns [dx?] + [dx_lora?] + [dW_i where need_dw[i]] + [db_i where need_db[i]] + [dA_i] + [dB_i]."""
    result, u_all, d_bs = backward_parts(grads, x, x_lora, t, weights, lora_as, lora_bs, scalings, need_dx, need_dw,
                                         need_db)
    adt = lora_as[0].dtype
    ranks = [a.shape[0] for a in lora_as]
    # copies: the op's outputs may not alias each other (the rows are [r, K], small next to the product)
    d_as = [d.to(a.dtype, copy=True) for d, a in
            zip(_adapter_mm(u_all.t(), _adapter_input(_flat(x), x_lora), adt).split(ranks, 0), lora_as)]
    return result + d_as + [d.to(a.dtype) for d, a in zip(d_bs, lora_as)]


def backward_parts(grads, x, x_lora, t, weights, lora_as, lora_bs, scalings, need_dx, need_dw, need_db):
    """lora_linear_backward without dA: ([dx?] + [dx_lora?] + [dW_i?] + [db_i?], u_all = [s_1 dY_1 B_1 | ...]
    [M, sum of ranks] (dA = u_all^T x_l, split by rank), [dB_i] in the adapter dtype). For a caller that forms
    dA itself (swiglu: from g and u, without h); x is read only for dx's shape and dtype unless a dW is asked."""
    x2 = _flat(x)
    adt = lora_as[0].dtype
    dys = [g.reshape(-1, g.shape[-1]) for g in grads]
    # the adapter's gradients are computed in its dtype, as PEFT does (see _adapter_mm); u_i = s_i dY_i B_i, as
    # column blocks of one [M, sum r] tensor: dA of all the adapters (they share x) is then one product reading x
    # once, instead of once per adapter
    u_all, d_bs = _dy_products(dys, lora_bs, t, scalings, adt)
    ranks = [a.shape[0] for a in lora_as]
    us = list(u_all.split(ranks, 1))
    result = []
    if need_dx:
        dx = _new_output(x2.shape, x.dtype, x.device)
        lows = [(u, a.to(adt), 1.0) for u, a in zip(us, lora_as)] if x_lora is None else []
        _linear_sum(dx, list(zip(dys, weights)), lows)
        result.append(dx.view(x.shape))
    if x_lora is not None:
        dxl = sum(_adapter_mm(u, a, adt) for u, a in zip(us, lora_as))
        result.append(dxl.to(x_lora.dtype).view(x_lora.shape))
    result += [dy.t() @ x2 for dy, nw in zip(dys, need_dw) if nw]
    result += [dy.sum(0) for dy, nb in zip(dys, need_db) if nb]
    return result, u_all, d_bs


def _dy_products(dys: list[Tensor], lora_bs: list[Tensor], t: Tensor, scalings: list[float], adt: torch.dtype):
    """(u_all, [dB_i]): u_all = [s_1 dY_1 B_1 | s_2 dY_2 B_2 | ...] in the adapter dtype, [M, sum of ranks], each
    product written into its columns (no concatenation), and dB_i = s_i dY_i^T t_i. Both products of one dY_i
    from one kernel reading it once where skinny_mm.dy_products takes the operands, else two products."""
    ranks = [b.shape[1] for b in lora_bs]
    u_all = torch.empty(dys[0].shape[0], sum(ranks), dtype=adt, device=dys[0].device)
    d_bs = []
    for cols, t_i, dy, bm, s in zip(u_all.split(ranks, 1), t.split(ranks, 1), dys, lora_bs, scalings):
        if adt == torch.float32 and skinny_mm.dy_supported(dy, bm, t_i):
            d_bs.append(skinny_mm.dy_products(dy, bm, t_i, s, u_out=cols)[1])
        else:
            _adapter_mm(dy, bm, adt, s, out=cols)
            d_bs.append(_adapter_mm(dy.t(), t_i, adt, s))
    return u_all, d_bs


@lora_linear_backward.register_fake
def _(grads, x, x_lora, t, weights, lora_as, lora_bs, scalings, need_dx, need_dw, need_db):
    result = [torch.empty_like(x)] if need_dx else []
    if x_lora is not None:
        result.append(torch.empty_like(x_lora))
    result += [torch.empty_like(w) for w, nw in zip(weights, need_dw) if nw]
    result += [w.new_empty(w.shape[0]) for w, nb in zip(weights, need_db) if nb]
    result += [torch.empty_like(a) for a in lora_as] + [torch.empty_like(b) for b in lora_bs]
    return result


def _setup_context(ctx, inputs, output):
    x, weights, biases, lora_as, lora_bs, scalings, x_lora, has_bias = inputs
    ctx.save_for_backward(x, x_lora, output[-1], *weights, *lora_as, *lora_bs)
    ctx.n = len(weights)
    ctx.scalings = list(scalings)
    ctx.has_bias = list(has_bias)


def _backward(ctx, grads):
    n = ctx.n
    x, x_lora, t, *params = ctx.saved_tensors
    weights, lora_as, lora_bs = params[:n], params[n:2 * n], params[2 * n:]
    need = ctx.needs_input_grad  # (x, weights, biases, lora_as, lora_bs, scalings, x_lora, has_bias)
    need_dx = bool(need[0])
    need_dw = [bool(v) for v in need[1]]
    it = iter(need[2])
    need_db = [bool(next(it)) if hb else False for hb in ctx.has_bias]
    grads = [g if g is not None else torch.zeros(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)
             for g, w in zip(grads[:n], weights)]
    flat = iter(lora_linear_backward(grads, x, x_lora, t, weights, lora_as, lora_bs, ctx.scalings,
                                     need_dx, need_dw, need_db))
    dx = next(flat) if need_dx else None
    dxl = next(flat) if x_lora is not None else None
    dws = [next(flat) if nw else None for nw in need_dw]
    dbs = [next(flat) if nb else None for nb, hb in zip(need_db, ctx.has_bias) if hb]
    d_as = [next(flat) for _ in range(n)]
    d_bs = [next(flat) for _ in range(n)]
    return dx, dws, dbs, d_as, d_bs, None, dxl, None


lora_linear.register_autograd(_backward, setup_context=_setup_context)


def reference(x, weights, biases, lora_as, lora_bs, scalings, x_lora=None) -> list[Tensor]:
    """The op's math in plain PyTorch (differentiable): what PEFT computes for each adapter."""
    xl = x if x_lora is None else x_lora
    outs = []
    for w, b, a, bm, s in zip(weights, biases, lora_as, lora_bs, scalings):
        base = F.linear(x, w, b)
        adapter = F.linear(F.linear(xl.to(a.dtype), a), bm) * s
        outs.append((base.to(torch.promote_types(base.dtype, adapter.dtype)) + adapter).to(x.dtype))
    return outs


def lora_linear_fn(x, weights, biases, lora_as, lora_bs, scalings, x_lora=None) -> list[Tensor]:
    """Call the op with one optional bias per adapter (None where absent); returns [out_1, ..., out_n]."""
    has_bias = [b is not None for b in biases]
    return torch.ops.fxopt.lora_linear(x, list(weights), [b for b in biases if b is not None], list(lora_as),
                                       list(lora_bs), [float(s) for s in scalings], x_lora, has_bias)[:len(weights)]
