"""The LoRA adapter's skinny products in one Triton kernel each: OUT[M, R] = scale * X[M, K] @ S[K, R], X a
half-precision activation (any strides: also a transposed one), S a small fp32 operand (R <= 256 columns).

PEFT keeps the adapters in fp32 over a bf16 base, so every adapter product has one bf16 activation and one fp32
operand: t = x A^T, u = dY B (forward and backward), and the adapter gradients dA^T = x^T u, dB = dY^T t (X
transposed). fxopt runs them as bf16 tensor-core products with an fp32 result, splitting the fp32 operand into
bf16 hi + lo (hi + lo carries ~16 of its 24 mantissa bits, ~2^-17 relative; the activation is exact in bf16).
Done with torch ops that split is 5-6 launches per product (cast, subtract, cast, concatenate, GEMM, add of
the halves): ~190 small launches per decoder block on the dense workload, ~6 ms of a 118 ms step. Here the
split happens on the tile in registers, and the kernel reads X once: one launch per product (plus a zeroing
memset where the K loop is split across programs, see _splits and partial_buffer). X in fp32 (interpreter
tests) takes exact fp32 products.

The backward's two products of one output gradient, u = s dY B [M, R] and dB = s dY^T t [N, R], come from one
kernel reading dY once (dy_products): it is the largest activation they read (8192 x 16384 for the dense
workload's gate/up), and read twice it was ~2 ms of the step's 9.4 ms of adapter products.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: callers take their torch math
    triton = None

from fxopt.kernels import common
from fxopt.kernels.common import FAILED, hi_lo_columns, interpreted, launch, pair_sum, sm_count

MAX_R = 256  # widest S the kernel takes (its fp32 accumulator is BLOCK_M x BLOCK_R)
# The GPU launch configuration by S's padded width (BLOCK_R), the fastest of benchmarks/bench_skinny_mm.py's
# sweep on the H100 (2026-11-26) at the dense workload's shapes; wider S takes smaller tiles (shared memory:
# stages x (BLOCK_M x BLOCK_K bf16 + BLOCK_K x BLOCK_R fp32)). Each program re-reads S's rows of its K range
# from L2 (m_blocks x K x R x 4 bytes in all), so programs span many rows and split along K.
CONFIGS = {
    32: dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3),   # r = 16 (u, dA, dB; t of one adapter)
    64: dict(BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3),   # t of q/k/v (3 x 16)
    MAX_R: dict(BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=2),
}


def config(block_r: int) -> dict:
    return CONFIGS[min(w for w in CONFIGS if w >= block_r)]


_INTERPRETED = False

if triton is not None:

    @triton.jit
    def store_part(ptrs, x, mask, ATOMIC: tl.constexpr):
        """A program's partial sum: stored into its own part of partial_buffer's buffer, or (ATOMIC) added to the
        zeroed output by atomics."""
        if ATOMIC:
            tl.atomic_add(ptrs, x, mask=mask, sem="relaxed")
        else:
            tl.store(ptrs, x, mask=mask)

    @triton.jit
    def _skinny_mm_kernel(
        X, S, OUT, M, K, R, K_PER_SPLIT,
        stride_xm, stride_xk, stride_sk, stride_sr, stride_op, stride_om, stride_or,
        scale,
        SPLIT_S: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """OUT[p, M, R] = scale * X[M, Kp] @ S[Kp, R] over program p's range Kp of K (grid: M blocks x splits)."""
        pid_m = tl.program_id(0)
        pid_p = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        rk = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_r = rr < R
        k0 = pid_p * K_PER_SPLIT
        k_end = tl.minimum(k0 + K_PER_SPLIT, K)
        x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(k0, k_end, BLOCK_K):
            kk = k + rk
            mask_k = kk < k_end
            x = tl.load(x_rows + kk[None, :].to(tl.int64) * stride_xk, mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)
            s = tl.load(S + kk[:, None].to(tl.int64) * stride_sk + rr[None, :] * stride_sr,
                        mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if SPLIT_S:  # s = hi + lo (+ ~2^-17 |s|), both in X's dtype: two tensor-core products
                hi = s.to(x.dtype)
                lo = (s - hi.to(tl.float32)).to(x.dtype)
                acc = tl.dot(x, hi, acc)
                acc = tl.dot(x, lo, acc)
            else:  # fp32 X: exact fp32 products
                acc = tl.dot(x, s, acc, input_precision="ieee")
        out = OUT + pid_p * stride_op + offs_m[:, None].to(tl.int64) * stride_om + rr[None, :] * stride_or
        store_part(out, acc * scale, mask_m[:, None] & mask_r[None, :], ATOMIC)

    @triton.jit
    def _dy_products_kernel(
        DY, B, T, U, DB, M, N, R, N_PER_SPLIT,
        stride_ym, stride_yn, stride_bn, stride_br, stride_tm, stride_tr,
        stride_up, stride_um, stride_ur, stride_dp, stride_dn, stride_dr,
        scale,
        SPLIT_S: tl.constexpr, U_ATOMIC: tl.constexpr, DB_ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """For BLOCK_M rows of dY and program p's range of its columns: U[p, rows] = scale * dY @ B over that
        range, and DB[m-block, columns] = scale * dY^T @ T over those rows, each dY tile loaded once."""
        pid_m = tl.program_id(0)
        pid_p = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        rn = tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_r = rr < R
        t = tl.load(T + offs_m[:, None].to(tl.int64) * stride_tm + rr[None, :] * stride_tr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if SPLIT_S:  # fp32 operands as hi + lo in dY's dtype, interleaved columns: one product of twice the width
            t = hi_lo_columns(t, DY.dtype.element_ty, BLOCK_M, BLOCK_R)
            u = tl.zeros((BLOCK_M, 2 * BLOCK_R), dtype=tl.float32)
        else:
            u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        n0 = pid_p * N_PER_SPLIT
        n_end = tl.minimum(n0 + N_PER_SPLIT, N)
        y_rows = DY + offs_m[:, None].to(tl.int64) * stride_ym
        for n in range(n0, n_end, BLOCK_N):
            nn = n + rn
            mask_n = nn < n_end
            dy = tl.load(y_rows + nn[None, :].to(tl.int64) * stride_yn, mask=mask_m[:, None] & mask_n[None, :],
                         other=0.0)
            b = tl.load(B + nn[:, None].to(tl.int64) * stride_bn + rr[None, :] * stride_br,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            if SPLIT_S:
                u = tl.dot(dy, hi_lo_columns(b, dy.dtype, BLOCK_N, BLOCK_R), u)
                db = pair_sum(tl.dot(tl.trans(dy), t), BLOCK_N, BLOCK_R)
            else:  # fp32 dY: exact fp32 products
                u = tl.dot(dy, b, u, input_precision="ieee")
                db = tl.dot(tl.trans(dy), t, input_precision="ieee")
            store_part(DB + pid_m * stride_dp + nn[:, None].to(tl.int64) * stride_dn + rr[None, :] * stride_dr,
                       db * scale, mask_n[:, None] & mask_r[None, :], DB_ATOMIC)
        if SPLIT_S:
            u = pair_sum(u, BLOCK_M, BLOCK_R)
        store_part(U + pid_p * stride_up + offs_m[:, None].to(tl.int64) * stride_um + rr[None, :] * stride_ur,
                   u * scale, mask_m[:, None] & mask_r[None, :], U_ATOMIC)

    _INTERPRETED = interpreted(_skinny_mm_kernel)


def supported(x: Tensor, s: Tensor) -> bool:
    """Whether skinny_mm takes these operands: a bf16 (CUDA) or fp16/fp32 (interpreter) activation and an fp32
    S of at most MAX_R columns, on one device."""
    if triton is None or __name__ in FAILED or s.dtype != torch.float32 or x.dim() != 2 or s.dim() != 2:
        return False
    if s.shape[1] > MAX_R:  # wider adapters (e.g. q/k/v of r = 128 each) take lora._adapter_mm's torch split
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and s.device == x.device
    # the interpreter's tl.dot and fp32 -> bf16 cast are wrong for bf16 (see common.use_triton)
    return _INTERPRETED and x.device.type == "cpu" and x.dtype in (torch.float16, torch.float32)


def _splits(m_blocks: int, k: int, block_k: int, device: torch.device) -> int:
    """Programs along K: a memory-bound product wants about two programs per SM. With few rows (dA^T's rows are
    the 2048 input features) the K loop (over the tokens) is split and the partial sums added (partial_buffer)."""
    if device.type != "cuda":
        return 2 if k > block_k else 1  # the interpreter: exercise the split path on small shapes too
    sms = sm_count(device)
    if m_blocks >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, m_blocks), triton.cdiv(k, 8 * block_k)))


def split_range(blocks: int, length: int, block: int, device: torch.device) -> tuple[int, int]:
    """(programs along a summed dimension of `length`, the length each covers, a multiple of `block`), for a grid
    of `blocks` programs along the other dimension (_splits' count, then rounded so that no program is empty)."""
    per = triton.cdiv(triton.cdiv(length, _splits(blocks, length, block, device)), block) * block
    return triton.cdiv(length, per), per


def partial_buffer(out: Tensor, parts: int) -> tuple[Tensor, tuple, bool]:
    """(where `parts` programs write their partial sums of `out`, its strides with the part's first, whether
    they add them by atomics): `out` itself for one part (any strides, part stride 0); for several, `out`
    zeroed for atomic adds, or under OptimizeConfig.deterministic or torch.use_deterministic_algorithms
    (atomics add in no fixed order) a [parts, *out.shape] buffer that add_partials sums in a second launch.
    The atomics save that launch and its read of the buffer (~5 us each, 272 per step of the dense workload on
    the H100: dense 77,841 -> 79,402 tokens/s in one call, 2026-11-28)."""
    if parts == 1:
        return out, (0, *out.stride()), False
    if not (common.DETERMINISTIC or torch.are_deterministic_algorithms_enabled()):
        return out.zero_(), (0, *out.stride()), True
    dest = torch.empty(parts, *out.shape, dtype=out.dtype, device=out.device)
    return dest, dest.stride(), False


def add_partials(dest: Tensor, out: Tensor) -> Tensor:
    """out = the sum of partial_buffer's parts (nothing to do where they were added by atomics)."""
    if dest is not out:
        torch.sum(dest, 0, out=out)
    return out


def skinny_mm(x: Tensor, s: Tensor, scale: float = 1.0, out: Tensor | None = None) -> Tensor:
    """scale * x @ s as fp32 [M, R] (into `out` if given: any strides, e.g. the transpose of a [R, M] buffer)."""
    M, K = x.shape
    R = s.shape[1]
    if out is None:
        out = torch.empty(M, R, dtype=torch.float32, device=x.device)
    if M == 0 or R == 0:
        return out
    if K == 0:
        return out.zero_()
    block_r = max(16, triton.next_power_of_2(R))
    cfg = config(block_r)
    block_m, block_k = (16, 16) if _INTERPRETED else (cfg["BLOCK_M"], cfg["BLOCK_K"])
    m_blocks = triton.cdiv(M, block_m)
    splits, k_per_split = split_range(m_blocks, K, block_k, x.device)
    dest, strides, atomic = partial_buffer(out, splits)
    meta = dict(SPLIT_S=x.dtype != torch.float32, ATOMIC=atomic, BLOCK_M=block_m, BLOCK_K=block_k,
                BLOCK_R=block_r)
    if not _INTERPRETED:
        meta.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    launch(_skinny_mm_kernel, None, lambda _: (m_blocks, splits),
           (x, s, dest, M, K, R, k_per_split, x.stride(0), x.stride(1), s.stride(0), s.stride(1),
            *strides, float(scale)), {}, meta, x.device)
    return add_partials(dest, out)


# dy_products' launch configuration by R's padded width: the fp32 accumulator u is BLOCK_M x 2 BLOCK_R (hi and lo
# columns) and so is t, so wider adapters take fewer rows. Wider than DY_MAX_R: two skinny_mm calls. A sweep of 6
# configs x 2 grid sizes on the H100 (2026-11-27, dY 8192 x 8192 / 2048 / 512, R 16): (128, 64, 4 warps, 3 stages)
# at two programs per SM, 81.6 / 25.2 / 11.3 us against 100.5 / 26.4 / 14.6 for the two skinny_mm reads of dY.
DY_CONFIGS = {
    32: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    64: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
}
DY_MAX_R = max(DY_CONFIGS)


def dy_products(dy: Tensor, b: Tensor, t: Tensor, scale: float = 1.0, u_out: Tensor | None = None):
    """(u, db) = (scale * dy @ b [M, R], scale * dy^T @ t [N, R]), fp32, dY [M, N] read once (R <= DY_MAX_R);
    u into `u_out` if given (any strides). The partial sums (of u over column ranges, of db over row blocks)
    are added as partial_buffer says (atomics, or a second launch under deterministic)."""
    M, N = dy.shape
    R = b.shape[1]
    u = u_out if u_out is not None else torch.empty(M, R, dtype=torch.float32, device=dy.device)
    if M == 0 or N == 0 or R == 0:
        return u.zero_(), torch.zeros(N, R, dtype=torch.float32, device=dy.device)
    block_r = max(16, triton.next_power_of_2(R))
    cfg = DY_CONFIGS[min(w for w in DY_CONFIGS if w >= block_r)]
    block_m, block_n = (16, 16) if _INTERPRETED else (cfg["BLOCK_M"], cfg["BLOCK_N"])
    m_blocks = triton.cdiv(M, block_m)
    splits, n_per_split = split_range(m_blocks, N, block_n, dy.device)
    db = torch.empty(N, R, dtype=torch.float32, device=dy.device)
    u_dest, su, u_atomic = partial_buffer(u, splits)  # u summed over the column ranges
    db_dest, sd, db_atomic = partial_buffer(db, m_blocks)  # dB summed over the row blocks
    meta = dict(SPLIT_S=dy.dtype != torch.float32, U_ATOMIC=u_atomic, DB_ATOMIC=db_atomic, BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_R=block_r)
    if not _INTERPRETED:
        meta.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    launch(_dy_products_kernel, None, lambda _: (m_blocks, splits),
           (dy, b, t, u_dest, db_dest, M, N, R, n_per_split, dy.stride(0), dy.stride(1), b.stride(0), b.stride(1),
            t.stride(0), t.stride(1), *su, *sd, float(scale)), {}, meta, dy.device)
    return add_partials(u_dest, u), add_partials(db_dest, db)


def dy_supported(dy: Tensor, b: Tensor, t: Tensor) -> bool:
    """Whether dy_products takes these: skinny_mm's operands (dY as the activation, B and t fp32 on its device)
    and R <= DY_MAX_R."""
    return (supported(dy, b) and b.shape[1] <= DY_MAX_R and t.dtype == torch.float32 and t.dim() == 2
            and t.device == dy.device and t.shape == (dy.shape[0], b.shape[1]))


def reference(x: Tensor, s: Tensor, scale: float = 1.0) -> Tensor:
    """The same product in fp64, for tests."""
    return scale * (x.double() @ s.double())
