"""fxopt::rms_norm: RMSNorm over the last dimension, optionally fused with the residual add before it.

    s   = x + residual                  (in x's dtype; s = x when there is no residual)
    h   = float32(s);  rstd = rsqrt(mean(h^2, -1) + eps);  n = h * rstd
    out = weight * n.to(x.dtype)                       cast_then_scale: dtype promote(weight, x)
    out = (n * (offset + float32(weight))).to(x.dtype)  scale_then_cast (offset 1.0 or 0.0)

The two variants are the two orders of rounding found in Hugging Face models: cast the normalised value
to the input dtype, then multiply by the weight; or multiply in fp32 (with an offset added to the
weight), then cast. The op returns [out, rstd], or [out, s, rstd] with a residual: s is the sum the next
residual add reads, rstd (fp32, one per row) is returned only to be saved for backward.

Forward: one Triton program per tile of BLOCK_M rows; a row of up to MAX_BLOCK_N columns is held in
registers (one read, one write), a longer row is walked in chunks twice (sum of squares, then scale).
Backward (its own op): dn = dout * weight (rounded to x's dtype first in cast_then_scale, as autograd
does through the cast), dx = rstd * (dn - n * mean(dn * n)) + d s; d residual = dx. dweight, when
weight needs a gradient, is summed per program into an fp32 [programs, N] buffer, then over programs.
Saved for backward: x (or s) and rstd only; n is recomputed from them, bit for bit as in the forward.

On CUDA the op launches the Triton kernels; on CPU it runs the same math in torch, except when the
kernels are interpreted (TRITON_INTERPRET=1 set before import), where the Triton code runs in Triton's
interpreter: that is how CI tests the kernels without a GPU (in fp32 and fp16: the interpreter truncates
fp32 -> bf16 casts, so bf16 on the CPU takes the torch math).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): every call runs the torch math
    triton = None

from fxopt.kernels.common import interpreted, launch, new_output, sm_count, use_triton, with_fallback

_INTERPRETED = False
# Longest row kept in registers; longer rows are processed in chunks of this size (tests lower it to
# exercise the chunked path on small shapes).
MAX_BLOCK_N = 8192
# Elements of one tile (BLOCK_M rows x BLOCK_N columns): short rows (per-head q/k norms) share a program.
TILE = 4096

if triton is not None:

    @triton.jit
    def _load_input(X, R, S, x_off, r_off, s_off, mask, HAS_RES: tl.constexpr):
        """The normalised input in fp32: x, or s = x + residual rounded to x's dtype (and stored to S)."""
        x = tl.load(X + x_off, mask=mask, other=0.0)
        if HAS_RES:
            s = (x.to(tl.float32) + tl.load(R + r_off, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(S + s_off, s, mask=mask)
            return s.to(tl.float32)
        return x.to(tl.float32)

    @triton.jit
    def _scaled(h, rstd, w, offset, X_DTYPE: tl.constexpr, CAST_THEN_SCALE: tl.constexpr):
        n = h * rstd[:, None]
        if CAST_THEN_SCALE:
            return w[None, :] * n.to(X_DTYPE).to(tl.float32)
        return n * (w[None, :] + offset)

    @triton.jit
    def _rms_norm_fwd_kernel(X, R, W, OUT, S, RSTD, M, N, stride_x, stride_r, eps, offset,
                             HAS_RES: tl.constexpr, CAST_THEN_SCALE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows = rows.to(tl.int64)  # rows * stride exceeds 2^31 for long inputs
        cols = tl.arange(0, BLOCK_N)
        x_row = rows[:, None] * stride_x
        r_row = rows[:, None] * stride_r
        o_row = rows[:, None] * N  # OUT and S are contiguous
        x_dtype = X.dtype.element_ty
        if ONE_TILE:
            mask = row_ok[:, None] & (cols[None, :] < N)
            h = _load_input(X, R, S, x_row + cols[None, :], r_row + cols[None, :], o_row + cols[None, :],
                            mask, HAS_RES)
            rstd = tl.rsqrt(tl.sum(h * h, axis=1) / N + eps)
            w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
            out = _scaled(h, rstd, w, offset, x_dtype, CAST_THEN_SCALE)
            tl.store(OUT + o_row + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for c in range(0, N, BLOCK_N):
                cc = c + cols
                mask = row_ok[:, None] & (cc[None, :] < N)
                h = _load_input(X, R, S, x_row + cc[None, :], r_row + cc[None, :], o_row + cc[None, :],
                                mask, HAS_RES)
                acc += h * h
            rstd = tl.rsqrt(tl.sum(acc, axis=1) / N + eps)
            for c in range(0, N, BLOCK_N):
                cc = c + cols
                mask = row_ok[:, None] & (cc[None, :] < N)
                if HAS_RES:  # the sum stored by the first sweep
                    h = tl.load(S + o_row + cc[None, :], mask=mask, other=0.0).to(tl.float32)
                else:
                    h = tl.load(X + x_row + cc[None, :], mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cc, mask=cc < N, other=0.0).to(tl.float32)
                out = _scaled(h, rstd, w, offset, x_dtype, CAST_THEN_SCALE)
                tl.store(OUT + o_row + cc[None, :], out.to(OUT.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _dn(DY, XS, W, rows, cc, mask, N, stride_dy, stride_xs, rstd, offset, X_DTYPE: tl.constexpr,
            CAST_THEN_SCALE: tl.constexpr):
        """n (recomputed as in the forward), dn = d loss / d n and dy, in fp32, for one tile."""
        n = tl.load(XS + rows[:, None] * stride_xs + cc[None, :], mask=mask, other=0.0).to(tl.float32)
        n = n * rstd[:, None]
        dy = tl.load(DY + rows[:, None] * stride_dy + cc[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cc, mask=cc < N, other=0.0).to(tl.float32)
        if CAST_THEN_SCALE:
            # autograd rounds d(loss)/d(n.to(x.dtype)) to x's dtype before it reaches the fp32 n
            dn = (dy * w[None, :]).to(X_DTYPE).to(tl.float32)
        else:
            dn = dy * (w[None, :] + offset)
        return n, dn, dy

    @triton.jit
    def _dw_term(dy, n, X_DTYPE: tl.constexpr, CAST_THEN_SCALE: tl.constexpr):
        if CAST_THEN_SCALE:
            return dy * n.to(X_DTYPE).to(tl.float32)
        return dy * n

    @triton.jit
    def _store_dx(DX, DS, rows, cc, mask, N, stride_ds, rstd, n, dn, dot, HAS_DS: tl.constexpr):
        dx = rstd[:, None] * (dn - n * dot[:, None])
        if HAS_DS:  # the gradient reaching s through its other uses (the next residual add)
            dx += tl.load(DS + rows[:, None] * stride_ds + cc[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * N + cc[None, :], dx.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(DY, DS, XS, W, RSTD, DX, DW, M, N, stride_dy, stride_ds, stride_xs, offset,
                             HAS_DS: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
                             CAST_THEN_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             ONE_TILE: tl.constexpr):
        pid = tl.program_id(0)
        num_tiles = tl.cdiv(M, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        x_dtype = XS.dtype.element_ty
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        # grid-stride over row tiles: each program sums its rows' dweight terms into one buffer row
        for tile in range(pid, num_tiles, tl.num_programs(0)):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            rows = rows.to(tl.int64)
            if ONE_TILE:
                mask = row_ok[:, None] & (cols[None, :] < N)
                n, dn, dy = _dn(DY, XS, W, rows, cols, mask, N, stride_dy, stride_xs, rstd, offset, x_dtype,
                                CAST_THEN_SCALE)
                if NEED_DX:
                    dot = tl.sum(dn * n, axis=1) / N
                    _store_dx(DX, DS, rows, cols, mask, N, stride_ds, rstd, n, dn, dot, HAS_DS)
                if NEED_DW:
                    dw_acc += tl.sum(_dw_term(dy, n, x_dtype, CAST_THEN_SCALE), axis=0)
            else:
                dot = tl.zeros([BLOCK_M], dtype=tl.float32)
                if NEED_DX:
                    for c in range(0, N, BLOCK_N):
                        cc = c + cols
                        mask = row_ok[:, None] & (cc[None, :] < N)
                        n, dn, dy = _dn(DY, XS, W, rows, cc, mask, N, stride_dy, stride_xs, rstd, offset,
                                        x_dtype, CAST_THEN_SCALE)
                        dot += tl.sum(dn * n, axis=1)
                    dot = dot / N
                for c in range(0, N, BLOCK_N):
                    cc = c + cols
                    mask = row_ok[:, None] & (cc[None, :] < N)
                    n, dn, dy = _dn(DY, XS, W, rows, cc, mask, N, stride_dy, stride_xs, rstd, offset, x_dtype,
                                    CAST_THEN_SCALE)
                    if NEED_DX:
                        _store_dx(DX, DS, rows, cc, mask, N, stride_ds, rstd, n, dn, dot, HAS_DS)
                    if NEED_DW:  # this program alone owns its buffer row: a plain read-modify-write
                        dw_ptr = DW + pid * N + cc
                        part = tl.sum(_dw_term(dy, n, x_dtype, CAST_THEN_SCALE), axis=0)
                        tl.store(dw_ptr, tl.load(dw_ptr, mask=cc < N, other=0.0) + part, mask=cc < N)
        if ONE_TILE and NEED_DW:
            tl.store(DW + pid * N + cols, dw_acc, mask=cols < N)

    _INTERPRETED = interpreted(_rms_norm_fwd_kernel)


def _use_triton(t: Tensor) -> bool:
    """t: the normalised input; every rounding the kernels do is to its dtype."""
    return use_triton(_INTERPRETED, t, family=__name__)


_new_output = new_output  # tests poison this module's outputs through it


def _rows(t: Tensor) -> Tensor:
    """t as [rows, N] with unit column stride (a copy only for layouts that have no such view)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def block_shape(n: int, max_block_n: int, tile: int):
    """(BLOCK_M, BLOCK_N, ONE_TILE, num_warps) for rows of n columns (also layer_norm's)."""
    block_n = min(triton.next_power_of_2(n), max_block_n)
    block_m = max(1, min(64, tile // block_n))
    warps = min(16, max(4, block_m * block_n // 512))
    return block_m, block_n, n <= block_n, warps


def _blocks(n: int):
    return block_shape(n, MAX_BLOCK_N, TILE)


def _out_dtype(x: Tensor, weight: Tensor, cast_then_scale: bool) -> torch.dtype:
    return torch.promote_types(weight.dtype, x.dtype) if cast_then_scale else x.dtype


def _check(x, weight, residual, offset, cast_then_scale):
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for rows of {x.shape[-1]}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("rms_norm: residual must have x's shape and dtype")
    if cast_then_scale and offset != 0.0:
        raise ValueError("rms_norm: the weight offset is only defined for scale_then_cast")


def _torch_forward(x2, r2, weight, eps, offset, cast_then_scale, out_dtype):
    """The kernel's math in torch (CPU without the interpreter): (out, s or None, rstd) on [rows, N]."""
    s = None if r2 is None else x2 + r2
    h = (x2 if s is None else s).float()
    rstd = torch.rsqrt(h.pow(2).mean(-1) + eps)
    n = h * rstd[:, None]
    if cast_then_scale:
        out = weight * n.to(x2.dtype)
    else:
        out = n * (offset + weight.float())
    return out.to(out_dtype), s, rstd


@torch.library.custom_op("fxopt::rms_norm", mutates_args=())
@with_fallback
def rms_norm(x: Tensor, weight: Tensor, residual: Optional[Tensor], eps: float, offset: float,
             cast_then_scale: bool) -> list[Tensor]:
    """Returns [out, rstd], or [out, s, rstd] with a residual; rstd has x's leading shape (fp32)."""
    _check(x, weight, residual, offset, cast_then_scale)
    lead, n = x.shape[:-1], x.shape[-1]
    out_dtype = _out_dtype(x, weight, cast_then_scale)
    x2 = _rows(x)
    r2 = None if residual is None else _rows(residual)
    m = x2.shape[0]
    if not _use_triton(x):
        out, s, rstd = _torch_forward(x2, r2, weight, eps, offset, cast_then_scale, out_dtype)
    else:
        out = _new_output((m, n), out_dtype, x.device)
        s = None if residual is None else _new_output((m, n), x.dtype, x.device)
        rstd = _new_output((m,), torch.float32, x.device)
        if m > 0 and n > 0:
            block_m, block_n, one_tile, warps = _blocks(n)
            launch(_rms_norm_fwd_kernel, None, lambda meta: (triton.cdiv(m, block_m),),
                   (x2, x2 if r2 is None else r2, weight, out, out if s is None else s, rstd, m, n,
                    x2.stride(0), 0 if r2 is None else r2.stride(0), float(eps), float(offset)),
                   dict(HAS_RES=r2 is not None, CAST_THEN_SCALE=cast_then_scale, BLOCK_M=block_m, BLOCK_N=block_n,
                        ONE_TILE=one_tile), dict(num_warps=warps), x.device)
    result = [out.view(*lead, n)]
    if s is not None:
        result.append(s.view(*lead, n))
    return result + [rstd.view(lead)]


@rms_norm.register_fake
def _(x, weight, residual, eps, offset, cast_then_scale):
    result = [x.new_empty(x.shape, dtype=_out_dtype(x, weight, cast_then_scale))]
    if residual is not None:
        result.append(x.new_empty(x.shape))
    return result + [x.new_empty(x.shape[:-1], dtype=torch.float32)]


def _torch_backward(dy2, ds2, xs2, weight, rstd, offset, cast_then_scale, need_dx, need_dw):
    n = xs2.float() * rstd[:, None]
    dy = dy2.float()
    if cast_then_scale:
        dn = (dy * weight.float()).to(xs2.dtype).float()
        dw_term = dy * n.to(xs2.dtype).float()
    else:
        dn = dy * (offset + weight.float())
        dw_term = dy * n
    dx = dw = None
    if need_dx:
        dx = rstd[:, None] * (dn - n * (dn * n).mean(-1, keepdim=True))
        if ds2 is not None:
            dx = dx + ds2.float()
        dx = dx.to(xs2.dtype)
    if need_dw:
        dw = dw_term.sum(0).to(weight.dtype)
    return dx, dw


def _programs(m: int, block_m: int, device) -> int:
    tiles = triton.cdiv(m, block_m)
    if device.type != "cuda":
        return min(tiles, 3)  # interpreter: a few programs, so that one program walks several tiles
    # enough programs to fill the GPU; fewer makes the [programs, N] dweight buffer smaller
    return min(tiles, 4 * sm_count(device))


@torch.library.custom_op("fxopt::rms_norm_backward", mutates_args=())
@with_fallback
def rms_norm_backward(grad_out: Tensor, grad_s: Optional[Tensor], xs: Tensor, weight: Tensor, rstd: Tensor,
                      offset: float, cast_then_scale: bool, need_dx: bool, need_dw: bool) -> list[Tensor]:
    """Returns [dx if need_dx] + [dweight if need_dw]; xs is the normalised input (x, or s with a residual),
    grad_s the gradient reaching s through its other uses (None when there is none); dresidual = dx."""
    n = xs.shape[-1]
    dy2, xs2 = _rows(grad_out), _rows(xs)
    ds2 = None if grad_s is None else _rows(grad_s)
    rstd1 = rstd.reshape(-1)
    m = xs2.shape[0]
    if not _use_triton(xs):
        dx, dw = _torch_backward(dy2, ds2, xs2, weight, rstd1, offset, cast_then_scale, need_dx, need_dw)
    else:
        dx = _new_output((m, n), xs.dtype, xs.device) if need_dx else None
        dw = None
        block_m, block_n, one_tile, warps = _blocks(max(n, 1))
        programs = _programs(m, block_m, xs.device) if m > 0 and n > 0 else 0
        if need_dw:
            # one fp32 row per program; the chunked path accumulates into it, so it starts at zero
            shape = (programs, n)
            part = (_new_output(shape, torch.float32, xs.device) if one_tile
                    else torch.zeros(shape, dtype=torch.float32, device=xs.device))
        if programs > 0 and (need_dx or need_dw):
            launch(_rms_norm_bwd_kernel, None, lambda meta: (programs,),
                   (dy2, dy2 if ds2 is None else ds2, xs2, weight, rstd1, dx if need_dx else dy2,
                    part if need_dw else dy2, m, n, dy2.stride(0), 0 if ds2 is None else ds2.stride(0),
                    xs2.stride(0), float(offset)),
                   dict(HAS_DS=ds2 is not None, NEED_DX=need_dx, NEED_DW=need_dw, CAST_THEN_SCALE=cast_then_scale,
                        BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=one_tile), dict(num_warps=warps), xs.device)
        if need_dw:
            dw = part.sum(0).to(weight.dtype)
    result = [dx.view(xs.shape)] if need_dx else []
    return result + ([dw] if need_dw else [])


@rms_norm_backward.register_fake
def _(grad_out, grad_s, xs, weight, rstd, offset, cast_then_scale, need_dx, need_dw):
    # contiguous, as the real op returns them (empty_like would copy a transposed input's strides)
    return ([xs.new_empty(xs.shape)] if need_dx else []) + ([weight.new_empty(weight.shape)] if need_dw else [])


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps, offset, cast_then_scale = inputs
    xs = x if residual is None else output[1]
    ctx.save_for_backward(xs, weight, output[-1])
    ctx.has_res = residual is not None
    ctx.offset = offset
    ctx.cast_then_scale = cast_then_scale


def _backward(ctx, grads):
    xs, weight, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad  # (x, weight, residual, eps, offset, cast_then_scale)
    need_dx = bool(need[0]) or bool(need[2])
    need_dw = bool(need[1])
    grad_out = grads[0]
    grad_s = grads[1] if ctx.has_res else None
    if not (need_dx or need_dw):
        return None, None, None, None, None, None
    if grad_out is None:  # only s was used downstream
        grad_out = torch.zeros(xs.shape, dtype=_out_dtype(xs, weight, ctx.cast_then_scale), device=xs.device)
    flat = iter(rms_norm_backward(grad_out, grad_s, xs, weight, rstd, ctx.offset, ctx.cast_then_scale,
                                  need_dx, need_dw))
    dx = next(flat) if need_dx else None
    dw = next(flat) if need_dw else None
    return (dx if need[0] else None), dw, (dx if need[2] else None), None, None, None


rms_norm.register_autograd(_backward, setup_context=_setup_context)


def reference(x, weight, eps, residual=None, offset=0.0, cast_then_scale=True):
    """The op's math in plain PyTorch (differentiable), as Hugging Face writes it: returns out, or (out, s).
    It computes in promote(x.dtype, float32), so float64 inputs give a float64 reference."""
    s = x if residual is None else x + residual
    h = s.to(torch.promote_types(s.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if cast_then_scale:
        out = weight * h.to(s.dtype)
    else:
        out = (h * (offset + weight.to(h.dtype))).to(s.dtype)
    return out if residual is None else (out, s)


def rms_norm_fn(x, weight, eps, residual=None, offset=0.0, cast_then_scale=True):
    """Call the op: returns out, or (out, s) with a residual (s = x + residual, the next block's input)."""
    res = torch.ops.fxopt.rms_norm(x, weight, residual, float(eps), float(offset), bool(cast_then_scale))
    return res[0] if residual is None else (res[0], res[1])
