"""fxopt::layer_norm: LayerNorm over the last dimension (weight and bias each optional), optionally fused with
the residual add before it.

    s    = x + residual                 (in x's dtype; s = x when there is no residual)
    h    = float32(s);  mean = mean(h, -1);  rstd = rsqrt(mean((h - mean)^2, -1) + eps)  (biased variance)
    n    = (h - mean) * rstd
    out  = (n * float32(weight) + float32(bias)).to(x.dtype)

That is F.layer_norm's math on CUDA and CPU (fp32 statistics and affine, one rounding to the input's dtype,
weights of the input's dtype or fp32). The op returns [out, mean, rstd], or [out, s, mean, rstd] with a
residual: s is the sum the next residual add reads; mean and rstd (fp32, one per row) are returned only to be
saved for backward.

Forward: one Triton program per tile of BLOCK_M rows; a row of up to MAX_BLOCK_N columns is held in registers
(one read, one write), a longer row is walked in chunks three times (sum, sum of squared deviations, output).
Backward (its own op): dn = dout * weight, dx = rstd * (dn - mean(dn) - n * mean(dn * n)) + d s;
d residual = dx. dweight = sum(dout * n) and dbias = sum(dout), when wanted, are summed per program into fp32
[programs, N] buffers, then over programs. Saved for backward: x (or s), mean and rstd; n is recomputed.

The row tiling, the residual load and the CPU/interpreter rules are rms_norm's (fxopt/kernels/rms_norm.py).
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

from fxopt.kernels.common import interpreted, launch, new_output, use_triton, with_fallback
from fxopt.kernels.rms_norm import _programs, _rows, block_shape

_INTERPRETED = False
MAX_BLOCK_N = 8192  # longest row kept in registers (tests lower it to reach the chunked path)
TILE = 4096  # elements of one tile of BLOCK_M rows

if triton is not None:
    from fxopt.kernels.rms_norm import _load_input

    @triton.jit
    def _affine(n, W, B, cc, N, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
        if HAS_W:
            n = n * tl.load(W + cc, mask=cc < N, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            n = n + tl.load(B + cc, mask=cc < N, other=0.0).to(tl.float32)[None, :]
        return n

    @triton.jit
    def _stored_input(X, S, x_row, o_row, cc, mask, HAS_RES: tl.constexpr):
        """The normalised input in fp32 in a later sweep: the sum the first sweep stored, or x."""
        if HAS_RES:
            return tl.load(S + o_row + cc[None, :], mask=mask, other=0.0).to(tl.float32)
        return tl.load(X + x_row + cc[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _layer_norm_fwd_kernel(X, R, W, B, OUT, S, MEAN, RSTD, M, N, stride_x, stride_r, eps,
                               HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows = rows.to(tl.int64)  # rows * stride exceeds 2^31 for long inputs
        cols = tl.arange(0, BLOCK_N)
        x_row = rows[:, None] * stride_x
        r_row = rows[:, None] * stride_r
        o_row = rows[:, None] * N  # OUT and S are contiguous
        if ONE_TILE:
            mask = row_ok[:, None] & (cols[None, :] < N)
            h = _load_input(X, R, S, x_row + cols[None, :], r_row + cols[None, :], o_row + cols[None, :],
                            mask, HAS_RES)
            mean = tl.sum(h, axis=1) / N
            d = tl.where(mask, h - mean[:, None], 0.0)
            rstd = tl.rsqrt(tl.sum(d * d, axis=1) / N + eps)
            out = _affine(d * rstd[:, None], W, B, cols, N, HAS_W, HAS_B)
            tl.store(OUT + o_row + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for c in range(0, N, BLOCK_N):
                cc = c + cols
                mask = row_ok[:, None] & (cc[None, :] < N)
                acc += _load_input(X, R, S, x_row + cc[None, :], r_row + cc[None, :], o_row + cc[None, :],
                                   mask, HAS_RES)
            mean = tl.sum(acc, axis=1) / N
            # the squared deviations in a second sweep (not E[h^2] - mean^2, which cancels for large means)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for c in range(0, N, BLOCK_N):
                cc = c + cols
                mask = row_ok[:, None] & (cc[None, :] < N)
                h = _stored_input(X, S, x_row, o_row, cc, mask, HAS_RES)
                d = tl.where(mask, h - mean[:, None], 0.0)
                acc += d * d
            rstd = tl.rsqrt(tl.sum(acc, axis=1) / N + eps)
            for c in range(0, N, BLOCK_N):
                cc = c + cols
                mask = row_ok[:, None] & (cc[None, :] < N)
                h = _stored_input(X, S, x_row, o_row, cc, mask, HAS_RES)
                out = _affine((h - mean[:, None]) * rstd[:, None], W, B, cc, N, HAS_W, HAS_B)
                tl.store(OUT + o_row + cc[None, :], out.to(OUT.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _dn(DY, XS, W, rows, cc, mask, N, stride_dy, stride_xs, mean, rstd, HAS_W: tl.constexpr):
        """n (recomputed as in the forward, 0 where masked), dn = d loss / d n and dy, in fp32, for one tile."""
        h = tl.load(XS + rows[:, None] * stride_xs + cc[None, :], mask=mask, other=0.0).to(tl.float32)
        n = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cc[None, :], mask=mask, other=0.0).to(tl.float32)
        dn = dy
        if HAS_W:
            dn = dy * tl.load(W + cc, mask=cc < N, other=0.0).to(tl.float32)[None, :]
        return n, dn, dy

    @triton.jit
    def _store_dx(DX, DS, rows, cc, mask, N, stride_ds, rstd, n, dn, mean_dn, mean_dnn, HAS_DS: tl.constexpr):
        dx = rstd[:, None] * (dn - mean_dn[:, None] - n * mean_dnn[:, None])
        if HAS_DS:  # the gradient reaching s through its other uses (the next residual add)
            dx += tl.load(DS + rows[:, None] * stride_ds + cc[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * N + cc[None, :], dx.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _layer_norm_bwd_kernel(DY, DS, XS, W, MEAN, RSTD, DX, DW, DB, M, N, stride_dy, stride_ds, stride_xs,
                               HAS_DS: tl.constexpr, HAS_W: tl.constexpr, NEED_DX: tl.constexpr,
                               NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr):
        pid = tl.program_id(0)
        num_tiles = tl.cdiv(M, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        # grid-stride over row tiles: each program sums its rows' dweight / dbias terms into one buffer row
        for tile in range(pid, num_tiles, tl.num_programs(0)):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            rows = rows.to(tl.int64)
            if ONE_TILE:
                mask = row_ok[:, None] & (cols[None, :] < N)
                n, dn, dy = _dn(DY, XS, W, rows, cols, mask, N, stride_dy, stride_xs, mean, rstd, HAS_W)
                if NEED_DX:
                    _store_dx(DX, DS, rows, cols, mask, N, stride_ds, rstd, n, dn, tl.sum(dn, axis=1) / N,
                              tl.sum(dn * n, axis=1) / N, HAS_DS)
                if NEED_DW:
                    dw_acc += tl.sum(dy * n, axis=0)
                if NEED_DB:
                    db_acc += tl.sum(dy, axis=0)
            else:
                mean_dn = tl.zeros([BLOCK_M], dtype=tl.float32)
                mean_dnn = tl.zeros([BLOCK_M], dtype=tl.float32)
                if NEED_DX:
                    for c in range(0, N, BLOCK_N):
                        cc = c + cols
                        mask = row_ok[:, None] & (cc[None, :] < N)
                        n, dn, dy = _dn(DY, XS, W, rows, cc, mask, N, stride_dy, stride_xs, mean, rstd, HAS_W)
                        mean_dn += tl.sum(dn, axis=1)
                        mean_dnn += tl.sum(dn * n, axis=1)
                    mean_dn = mean_dn / N
                    mean_dnn = mean_dnn / N
                for c in range(0, N, BLOCK_N):
                    cc = c + cols
                    mask = row_ok[:, None] & (cc[None, :] < N)
                    n, dn, dy = _dn(DY, XS, W, rows, cc, mask, N, stride_dy, stride_xs, mean, rstd, HAS_W)
                    if NEED_DX:
                        _store_dx(DX, DS, rows, cc, mask, N, stride_ds, rstd, n, dn, mean_dn, mean_dnn, HAS_DS)
                    # this program alone owns its buffer rows: plain read-modify-writes
                    if NEED_DW:
                        dw_ptr = DW + pid * N + cc
                        tl.store(dw_ptr, tl.load(dw_ptr, mask=cc < N, other=0.0) + tl.sum(dy * n, axis=0),
                                 mask=cc < N)
                    if NEED_DB:
                        db_ptr = DB + pid * N + cc
                        tl.store(db_ptr, tl.load(db_ptr, mask=cc < N, other=0.0) + tl.sum(dy, axis=0),
                                 mask=cc < N)
        if ONE_TILE and NEED_DW:
            tl.store(DW + pid * N + cols, dw_acc, mask=cols < N)
        if ONE_TILE and NEED_DB:
            tl.store(DB + pid * N + cols, db_acc, mask=cols < N)

    _INTERPRETED = interpreted(_layer_norm_fwd_kernel)


def _use_triton(t: Tensor) -> bool:
    """t: the normalised input; every rounding the kernels do is to its dtype."""
    return use_triton(_INTERPRETED, t, family=__name__)


_new_output = new_output  # tests poison this module's outputs through it


def _blocks(n: int):
    return block_shape(n, MAX_BLOCK_N, TILE)


def _check(x, weight, bias, residual):
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != x.shape[-1]):
            raise ValueError(f"layer_norm: {name} of shape {tuple(t.shape)} for rows of {x.shape[-1]}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("layer_norm: residual must have x's shape and dtype")


def _torch_forward(x2, r2, weight, bias, eps):
    """The kernel's math in torch (CPU without the interpreter): (out, s or None, mean, rstd) on [rows, N]."""
    s = None if r2 is None else x2 + r2
    h = (x2 if s is None else s).float()
    mean = h.mean(-1)
    d = h - mean[:, None]
    rstd = torch.rsqrt(d.pow(2).mean(-1) + eps)
    out = d * rstd[:, None]
    if weight is not None:
        out = out * weight.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x2.dtype), s, mean, rstd


@torch.library.custom_op("fxopt::layer_norm", mutates_args=())
@with_fallback
def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
               eps: float) -> list[Tensor]:
    """Returns [out, mean, rstd], or [out, s, mean, rstd] with a residual; mean and rstd have x's leading shape
    (fp32)."""
    _check(x, weight, bias, residual)
    lead, n = x.shape[:-1], x.shape[-1]
    x2 = _rows(x)
    r2 = None if residual is None else _rows(residual)
    m = x2.shape[0]
    if not _use_triton(x):
        out, s, mean, rstd = _torch_forward(x2, r2, weight, bias, eps)
    else:
        out = _new_output((m, n), x.dtype, x.device)
        s = None if residual is None else _new_output((m, n), x.dtype, x.device)
        mean = _new_output((m,), torch.float32, x.device)
        rstd = _new_output((m,), torch.float32, x.device)
        if m > 0 and n > 0:
            block_m, block_n, one_tile, warps = _blocks(n)
            launch(_layer_norm_fwd_kernel, None, lambda meta: (triton.cdiv(m, block_m),),
                   (x2, x2 if r2 is None else r2, x2 if weight is None else weight, x2 if bias is None else bias,
                    out, out if s is None else s, mean, rstd, m, n, x2.stride(0), 0 if r2 is None else r2.stride(0),
                    float(eps)),
                   dict(HAS_RES=r2 is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                        BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=one_tile), dict(num_warps=warps), x.device)
    result = [out.view(*lead, n)]
    if s is not None:
        result.append(s.view(*lead, n))
    return result + [mean.view(lead), rstd.view(lead)]


@layer_norm.register_fake
def _(x, weight, bias, residual, eps):
    result = [x.new_empty(x.shape)] + ([x.new_empty(x.shape)] if residual is not None else [])
    return result + [x.new_empty(x.shape[:-1], dtype=torch.float32) for _ in range(2)]


def _torch_backward(dy2, ds2, xs2, weight, mean, rstd, need_dx, need_dw, need_db):
    n = (xs2.float() - mean[:, None]) * rstd[:, None]
    dy = dy2.float()
    dn = dy if weight is None else dy * weight.float()
    dx = dw = db = None
    if need_dx:
        dx = rstd[:, None] * (dn - dn.mean(-1, keepdim=True) - n * (dn * n).mean(-1, keepdim=True))
        if ds2 is not None:
            dx = dx + ds2.float()
        dx = dx.to(xs2.dtype)
    if need_dw:
        dw = (dy * n).sum(0).to(weight.dtype)
    if need_db:
        db = dy.sum(0)
    return dx, dw, db


@torch.library.custom_op("fxopt::layer_norm_backward", mutates_args=())
@with_fallback
def layer_norm_backward(grad_out: Tensor, grad_s: Optional[Tensor], xs: Tensor, weight: Optional[Tensor],
                        mean: Tensor, rstd: Tensor, bias_dtype: Optional[torch.dtype], need_dx: bool, need_dw: bool,
                        need_db: bool) -> list[Tensor]:
    """Returns [dx if need_dx] + [dweight if need_dw] + [dbias (in bias_dtype) if need_db]; xs is the normalised
    input (x, or s with a residual), grad_s the gradient reaching s through its other uses (None when there is
    none); dresidual = dx."""
    n = xs.shape[-1]
    dy2, xs2 = _rows(grad_out), _rows(xs)
    ds2 = None if grad_s is None else _rows(grad_s)
    mean1, rstd1 = mean.reshape(-1), rstd.reshape(-1)
    m = xs2.shape[0]
    if not _use_triton(xs):
        dx, dw, db = _torch_backward(dy2, ds2, xs2, weight, mean1, rstd1, need_dx, need_dw, need_db)
    else:
        dx = _new_output((m, n), xs.dtype, xs.device) if need_dx else None
        block_m, block_n, one_tile, warps = _blocks(max(n, 1))
        programs = _programs(m, block_m, xs.device) if m > 0 and n > 0 else 0

        def partials(wanted):
            # one fp32 row per program; the chunked path accumulates into it, so it starts at zero
            if not wanted:
                return None
            return (_new_output((programs, n), torch.float32, xs.device) if one_tile
                    else torch.zeros((programs, n), dtype=torch.float32, device=xs.device))

        dw_part, db_part = partials(need_dw), partials(need_db)
        if programs > 0 and (need_dx or need_dw or need_db):
            launch(_layer_norm_bwd_kernel, None, lambda meta: (programs,),
                   (dy2, dy2 if ds2 is None else ds2, xs2, dy2 if weight is None else weight, mean1, rstd1,
                    dx if need_dx else dy2, dw_part if need_dw else dy2, db_part if need_db else dy2, m, n,
                    dy2.stride(0), 0 if ds2 is None else ds2.stride(0), xs2.stride(0)),
                   dict(HAS_DS=ds2 is not None, HAS_W=weight is not None, NEED_DX=need_dx, NEED_DW=need_dw,
                        NEED_DB=need_db, BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=one_tile),
                   dict(num_warps=warps), xs.device)
        dw = dw_part.sum(0).to(weight.dtype) if need_dw else None
        db = db_part.sum(0) if need_db else None
    result = [dx.view(xs.shape)] if need_dx else []
    return result + ([dw] if need_dw else []) + ([db.to(bias_dtype)] if need_db else [])


@layer_norm_backward.register_fake
def _(grad_out, grad_s, xs, weight, mean, rstd, bias_dtype, need_dx, need_dw, need_db):
    n = xs.shape[-1]
    return (([xs.new_empty(xs.shape)] if need_dx else []) + ([weight.new_empty(weight.shape)] if need_dw else [])
            + ([xs.new_empty((n,), dtype=bias_dtype)] if need_db else []))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    xs = x if residual is None else output[1]
    ctx.save_for_backward(xs, weight, output[-2], output[-1])
    ctx.has_res = residual is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grads):
    xs, weight, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad  # (x, weight, bias, residual, eps)
    need_dx = bool(need[0]) or bool(need[3])
    need_dw, need_db = bool(need[1]), bool(need[2])
    grad_out = grads[0]
    grad_s = grads[1] if ctx.has_res else None
    if not (need_dx or need_dw or need_db):
        return None, None, None, None, None
    # grad_out and grad_s are never None here: autograd passes zeros for an output that is not used
    flat = iter(layer_norm_backward(grad_out, grad_s, xs, weight, mean, rstd, ctx.bias_dtype, need_dx, need_dw,
                                    need_db))
    dx = next(flat) if need_dx else None
    dw = next(flat) if need_dw else None
    db = next(flat) if need_db else None
    return (dx if need[0] else None), dw, db, (dx if need[3] else None), None


layer_norm.register_autograd(_backward, setup_context=_setup_context)


def reference(x, weight, bias, eps, residual=None):
    """The op's math in plain PyTorch (differentiable): returns out, or (out, s). It computes in
    promote(x.dtype, float32), so float64 inputs give a float64 reference."""
    s = x if residual is None else x + residual
    h = s.to(torch.promote_types(s.dtype, torch.float32))
    d = h - h.mean(-1, keepdim=True)
    out = d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(h.dtype)
    if bias is not None:
        out = out + bias.to(h.dtype)
    out = out.to(s.dtype)
    return out if residual is None else (out, s)


def layer_norm_fn(x, weight, bias, eps, residual=None):
    """Call the op: returns out, or (out, s) with a residual (s = x + residual, the next block's input)."""
    res = torch.ops.fxopt.layer_norm(x, weight, bias, residual, float(eps))
    return res[0] if residual is None else (res[0], res[1])
