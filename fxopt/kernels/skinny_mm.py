"""The LoRA adapter's skinny products in one Triton kernel each: OUT[M, R] = scale * X[M, K] @ S[K, R], X a
half-precision activation (any strides: also a transposed one), S a small fp32 operand (R <= 256 columns).

PEFT keeps the adapters in fp32 over a bf16 base, so every adapter product has one bf16 activation and one fp32
operand: t = x A^T, u = dY B (forward and backward), and the adapter gradients dA^T = x^T u, dB = dY^T t (X
transposed). fxopt runs them as bf16 tensor-core products with an fp32 result, splitting the fp32 operand into
bf16 hi + lo (hi + lo carries ~16 of its 24 mantissa bits, ~2^-17 relative; the activation is exact in bf16).
Done with torch ops that split is 5-6 launches per product (cast, subtract, cast, concatenate, GEMM, add of
the halves): ~190 small launches per decoder block on the dense workload, ~6 ms of a 118 ms step. Here the
split happens on the tile in registers, and the kernel reads X once: one launch per product (two when the K
loop is split across programs, see _splits). X in fp32 (interpreter tests) takes exact fp32 products.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: callers take their torch math
    triton = None

from fxopt.kernels.common import FAILED, interpreted, launch, sm_count

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
    def _skinny_mm_kernel(
        X, S, OUT, M, K, R, K_PER_SPLIT,
        stride_xm, stride_xk, stride_sk, stride_sr, stride_op, stride_om, stride_or,
        scale,
        SPLIT_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
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
        tl.store(out, acc * scale, mask=mask_m[:, None] & mask_r[None, :])

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
    the 2048 input features) the K loop (over the tokens) is split and the partial sums added afterwards (a
    second launch; no atomics, so the result is deterministic)."""
    if device.type != "cuda":
        return 2 if k > block_k else 1  # the interpreter: exercise the split path on small shapes too
    sms = sm_count(device)
    if m_blocks >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, m_blocks), triton.cdiv(k, 8 * block_k)))


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
    splits = _splits(m_blocks, K, block_k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    splits = triton.cdiv(K, k_per_split)
    dest = out if splits == 1 else torch.empty(splits, M, R, dtype=torch.float32, device=x.device)
    stride_p, stride_m, stride_r = (0, *out.stride()) if splits == 1 else dest.stride()
    meta = dict(SPLIT_S=x.dtype != torch.float32, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r)
    if not _INTERPRETED:
        meta.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    launch(_skinny_mm_kernel, None, lambda _: (m_blocks, splits),
           (x, s, dest, M, K, R, k_per_split, x.stride(0), x.stride(1), s.stride(0), s.stride(1),
            stride_p, stride_m, stride_r, float(scale)), {}, meta, x.device)
    if splits > 1:
        torch.sum(dest, 0, out=out)
    return out


def reference(x: Tensor, s: Tensor, scale: float = 1.0) -> Tensor:
    """The same product in fp64, for tests."""
    return scale * (x.double() @ s.double())
