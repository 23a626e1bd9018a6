"""fxopt::linear_4bit and fxopt::lora_linear_4bit: a linear layer over a bitsandbytes 4-bit (nf4 / fp4) weight,
dequantized inside the GEMM, optionally with a LoRA adapter in the same accumulator.

    y = x @ W^T (+ bias)                                   fxopt::linear_4bit
    y = x @ W^T (+ bias) + s * (x_l @ A^T) @ B^T           fxopt::lora_linear_4bit   x_l = x_lora (dropout(x)) or x
    W = dequant(qweight): never materialised on the Triton path

The weight format is bitsandbytes' (checked against bnb's own quantize_4bit / dequantize_4bit in
tests/kernels/test_nf4.py, never assumed): the [N, K] weight is flattened row-major, element e sits in byte
e // 2 of the packed uint8 tensor, in the high nibble for even e and the low nibble for odd e (an odd N*K leaves
the last low nibble as padding); its 4-bit code indexes a 16-entry fp32 table (nf4 or fp4) and is multiplied
by absmax[e // blocksize], one fp32 scale per block of `blocksize` consecutive flat elements (blocks may run
over a row's end when K is not a multiple of blocksize). With double quantization (bnb's compress_statistics)
absmax is itself uint8 and its value is code2[absmax[b]] * absmax2[b // 256] + offset (fp32). Any other
quant_storage dtype is read as its bytes.

Triton path (CUDA, or the interpreter on CPU): each K-step of the GEMM loads the packed bytes of a weight tile
once, splits every byte into its (even k, odd k) pair of codes, looks them up in the table, scales them (one
scale per row of the tile when the blocks line up with the tile, else per element) and feeds two tl.dot calls:
the x tile is de-interleaved into its even and odd columns to match. fp32 accumulation; the low-rank term and
the bias go into the same accumulator; output in x's dtype. Backward (the weight is frozen, no dW):
dX = dY @ W by a second kernel with the same in-loop dequantization (two accumulators for the even and odd
output columns, interleaved at the store), plus s * (dY @ B) @ A in the same accumulators for the LoRA form;
dA = s (dY B)^T x_l, dB = s dY^T t by torch. Saved for backward: x_l (x without dropout) and t = x_l A^T.
For M <= GEMV_MAX_M rows (decoding) a GEMV-style kernel reads each packed byte once and applies each block's
scale to the partial sums instead of to every weight: for M <= WORDS_MAX_M the word GEMV (the weight as int32
words, CUDA-core products), else (more rows when GEMV_MAX_M is raised, or packed bytes not on a 4-byte boundary)
the tile GEMV (tensor-core dots, K split over programs).

CPU without the interpreter: `dequantize` (a per-call transient copy) and torch matmuls, the same math as
`reference`.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): every call runs the torch math
    triton = None

from fxopt.kernels import lora as lora_kernels
from fxopt.kernels.common import interpreted, launch, new_output, sm_count, use_triton, with_fallback

# The two 16-entry tables, as bitsandbytes defines them (tests check they are equal to bnb's get_4bit_type).
# nf4: quantiles of N(0, 1) scaled to [-1, 1]; fp4: 1 sign bit, 2 exponent bits, 1 mantissa bit, in bit-pattern
# order, divided by the largest magnitude 12.
_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
        1.0]
_FP4 = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bnb's quantize_4bit accepts
ABSMAX2_BLOCK = 256  # bnb quantizes the absmax blockwise in blocks of 256 under double quantization

# Inputs of at most this many rows take a GEMV-style kernel. 4: at M = 8 and 16 dequantize + cuBLAS measured
# faster than the tile GEMV on every decoder shape (H100, CUDA graphs, benchmarks/results/*-s12-decode: 13.9 vs
# 21.3 us at 2048 x 2048, 36.3 vs 55.3 at 8192 x 2048, M = 16). Tests raise it to 16 to reach the tile GEMV.
GEMV_MAX_M = 4
# Of those, inputs of at most this many rows take the word GEMV (CUDA-core products, weight read as int32 words);
# more rows, and packed bytes off a 4-byte boundary, take the tile GEMV with tensor-core dots.
WORDS_MAX_M = 4
# The word GEMV splits K over programs (an fp32 workspace summed after) for 3-4 rows of x and weights of at least
# this many elements (see _words_split); tests lower it to reach the split on small shapes.
WORDS_SPLIT_MIN_NK = 1 << 24
# The dequantization kernel's launch: packed bytes per program (whole quantization blocks: raised to blocksize / 2
# where that is larger) and warps. Not tuned yet: benchmarks/bench_nf4.py --dequant-sweep times the alternatives.
DEQUANT_BLOCK_BYTES = 2048
DEQUANT_WARPS = 4
# Inputs of at least this many rows (and more than GEMV_MAX_M) take dequantize-then-GEMM (see _dequantized_gemm).
DEQUANT_MIN_M = 1 << 62 if os.environ.get("FXOPT_NF4_GEMM", "dequant") == "fused" else 0

_INTERPRETED = False
_code_cache: dict = {}


def code_table(quant_type: str, device) -> Tensor:
    """The fp32 [16] lookup table of quant_type ("nf4" or "fp4") on device (cached)."""
    key = (quant_type, str(device))
    if key not in _code_cache:
        if quant_type == "nf4":
            t = torch.tensor(_NF4, dtype=torch.float32)
        elif quant_type == "fp4":
            t = torch.tensor(_FP4, dtype=torch.float32) / 12.0
        else:
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # a real tensor even when first asked for while tracing
            _code_cache[key] = t.to(device)
    return _code_cache[key]


if triton is not None:

    @triton.jit
    def _block_scale(ABSMAX, ABSMAX2, CODE2, OFFSET, blk, mask, DOUBLE_QUANT: tl.constexpr):
        """fp32 scale of the quantization blocks `blk` (any shape); 0 (or offset) where masked."""
        if DOUBLE_QUANT:
            a8 = tl.load(ABSMAX + blk, mask=mask, other=0).to(tl.int32)
            s = tl.load(CODE2 + a8).to(tl.float32) * tl.load(ABSMAX2 + blk // 256, mask=mask, other=0).to(tl.float32)
            s = s + tl.load(OFFSET).to(tl.float32)
        else:
            s = tl.load(ABSMAX + blk, mask=mask, other=0).to(tl.float32)
        return s

    @triton.jit
    def _codes(P, CODE, n, j, k0, K, PAIRED: tl.constexpr, MASKED: tl.constexpr):
        """Table values (fp32, unscaled) of W[n, k0 + 2j] and W[n, k0 + 2j + 1] for broadcastable index tensors
        n (int64 rows) and j (column pairs); past K they are finite garbage that the caller's zeros cancel.
        Also returns the element index of the first of each pair. MASKED off: the caller knows every pair is
        inside K (unmasked byte loads vectorize)."""
        k_e = k0 + 2 * j
        e = n * K + k_e
        if PAIRED:
            # K even: a row starts on a byte and each (even k, odd k) pair is one byte, even k in the high nibble
            kb = k0 // 2 + j
            if MASKED:
                b = tl.load(P + n * (K // 2) + kb, mask=kb < K // 2, other=0).to(tl.int32)
            else:
                b = tl.load(P + n * (K // 2) + kb).to(tl.int32)
            c_e = tl.load(CODE + (b >> 4))
            c_o = tl.load(CODE + (b & 15))
        else:
            # K odd: a pair may straddle two bytes; an even flat index is a high nibble, an odd one a low nibble
            b_e = tl.load(P + e // 2, mask=k_e < K, other=0).to(tl.int32)
            b_o = tl.load(P + (e + 1) // 2, mask=k_e + 1 < K, other=0).to(tl.int32)
            c_e = tl.load(CODE + ((b_e >> (4 - 4 * (e % 2))) & 15))
            c_o = tl.load(CODE + ((b_o >> (4 * (e % 2))) & 15))
        return c_e, c_o, e

    @triton.jit
    def _dequant_pair(P, CODE, ABSMAX, ABSMAX2, CODE2, OFFSET, n, j, k0, K, BS: tl.constexpr,
                      PAIRED: tl.constexpr, ALIGNED: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
        """fp32 W[n, k0 + 2j] and W[n, k0 + 2j + 1] (see _codes). ALIGNED: blocks never cross a row end and the
        tile [k0, k0 + 2 * len(j)) lies in one block, so each row needs one scale."""
        if ALIGNED:  # then K % BLOCK_K == 0: every pair of the tile is inside K
            c_e, c_o, e = _codes(P, CODE, n, j, k0, K, PAIRED, False)
            s_e = _block_scale(ABSMAX, ABSMAX2, CODE2, OFFSET, n * (K // BS) + k0 // BS, n >= 0, DOUBLE_QUANT)
            s_o = s_e
        else:
            c_e, c_o, e = _codes(P, CODE, n, j, k0, K, PAIRED, True)
            k_e = k0 + 2 * j
            s_e = _block_scale(ABSMAX, ABSMAX2, CODE2, OFFSET, e // BS, k_e < K, DOUBLE_QUANT)
            if PAIRED:  # e even, blocksize even: e and e + 1 are in one block
                s_o = s_e
            else:
                s_o = _block_scale(ABSMAX, ABSMAX2, CODE2, OFFSET, (e + 1) // BS, k_e + 1 < K, DOUBLE_QUANT)
        return c_e * s_e, c_o * s_o

    @triton.jit
    def _dequant_kernel(P, CODE, ABSMAX, ABSMAX2, CODE2, OFFSET, OUT, NK, BS: tl.constexpr,
                        DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr):
        """OUT[e] = W[e] for the flat row-major [N, K] weight, BLOCK packed bytes (whole quantization blocks:
        BLOCK % (BS // 2) == 0) per program: byte j holds elements 2j (high nibble) and 2j + 1 (low nibble). Each
        block's scale is loaded once, the two nibbles' values are interleaved in registers and stored as one
        contiguous run. The program's base is applied to the pointers once (int64) and offsets inside it are
        int32; EVEN (every program full: NK % (2 * BLOCK) == 0) drops the masks, whose 64-bit compares per
        element kept the byte loads and the stores scalar (sm_90 SASS: 16 LDG.U8 and 16 STG.U16 per thread)."""
        H: tl.constexpr = BS // 2  # bytes per block
        R: tl.constexpr = BLOCK // H  # blocks per program
        pid = tl.program_id(0).to(tl.int64)
        P += pid * BLOCK
        OUT += pid * (2 * BLOCK)
        r = tl.arange(0, R)
        j = r[:, None] * H + tl.arange(0, H)[None, :]  # [R, H] byte offset in the program
        e = 2 * j[:, :, None] + tl.arange(0, 2)[None, None, :]  # [R, H, 2] element offset in the program
        blk = pid * R + r
        if EVEN:
            b = tl.load(P + j).to(tl.int32)
            scale = _block_scale(ABSMAX, ABSMAX2, CODE2, OFFSET, blk, r >= 0, DOUBLE_QUANT)
        else:
            left = NK - pid * (2 * BLOCK)  # elements from the program's first to the weight's end
            b = tl.load(P + j, mask=2 * j < left, other=0).to(tl.int32)
            scale = _block_scale(ABSMAX, ABSMAX2, CODE2, OFFSET, blk, r * BS < left, DOUBLE_QUANT)
        v = tl.join(tl.load(CODE + (b >> 4)), tl.load(CODE + (b & 15))) * scale[:, None, None]  # [R, H, 2]
        v = tl.reshape(v, (BLOCK * 2,)).to(OUT.dtype.element_ty)
        e = tl.reshape(e, (BLOCK * 2,))
        if EVEN:
            tl.store(OUT + e, v)
        else:
            tl.store(OUT + e, v, mask=e < left)

    @triton.jit
    def _add_adapter(acc, T, L, load_m, load_n, R, stride_tm, stride_tr, stride_lr, stride_ln, scale,
                     USE_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
        """acc [BLOCK_M, BLOCK_N] + scale * T[load_m, :R] @ L[:R, load_n]. USE_DOT: tensor cores, the scale folded
        into the T tile as in fxopt/kernels/lora.py; else a broadcast multiply-sum in fp32 (few rows)."""
        rr = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            mr = (r0 + rr) < R
            t = tl.load(T + load_m[:, None] * stride_tm + (r0 + rr)[None, :] * stride_tr, mask=mr[None, :], other=0.0)
            lo = tl.load(L + (r0 + rr)[:, None] * stride_lr + load_n[None, :] * stride_ln, mask=mr[:, None],
                         other=0.0)
            if USE_DOT:
                acc = tl.dot((t.to(tl.float32) * scale).to(t.dtype), lo, acc, input_precision=PRECISION)
            else:
                acc += tl.sum((t.to(tl.float32) * scale)[:, :, None] * lo.to(tl.float32)[None, :, :], axis=1)
        return acc

    @triton.jit
    def _grouped_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # GROUP_M row-blocks share their column-blocks of the weight while they sit in L2
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % group) % rows, (pid % group) // rows

    @triton.jit
    def _fwd_kernel(
        X, P, CODE, ABSMAX, ABSMAX2, CODE2, OFFSET, T, L, BIAS, OUT,
        M, N, K, R, M_BUCKET,
        stride_xm, stride_xk, stride_tm, stride_tr, stride_lr, stride_ln, stride_om, stride_on,
        scale,
        BS: tl.constexpr, PAIRED: tl.constexpr, ALIGNED: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """OUT[M, N] = X[M, K] @ dequant(P)[N, K]^T + scale * T[M, R] @ L[R, N] + BIAS[N]; fp32 accumulator."""
        pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows/columns past the edge wrap onto valid ones (modulo) instead of being masked; the masked store
        # drops them. int64: M * stride and N * K exceed 2^31 for large inputs.
        load_m = (offs_m % M).to(tl.int64)
        load_n = (offs_n % N).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        jj = tl.arange(0, BLOCK_K // 2)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kx = k0 + rk
            x = tl.load(X + load_m[:, None] * stride_xm + kx[None, :] * stride_xk, mask=kx[None, :] < K, other=0.0)
            # even and odd columns of x meet the high and low nibbles of the weight's bytes
            x_e, x_o = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            w_e, w_o = _dequant_pair(P, CODE, ABSMAX, ABSMAX2, CODE2, OFFSET, load_n[None, :], jj[:, None], k0, K,
                                     BS, PAIRED, ALIGNED, DOUBLE_QUANT)
            acc = tl.dot(x_e, w_e.to(x.dtype), acc, input_precision=PRECISION)
            acc = tl.dot(x_o, w_o.to(x.dtype), acc, input_precision=PRECISION)

        if HAS_LORA:  # the low-rank term in the same accumulator
            acc = _add_adapter(acc, T, L, load_m, load_n, R, stride_tm, stride_tr, stride_lr, stride_ln, scale,
                               True, PRECISION, BLOCK_R)

        mask_n = offs_n < N
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < M) & mask_n[None, :])

    @triton.jit
    def _dx_kernel(
        DY, P, CODE, ABSMAX, ABSMAX2, CODE2, OFFSET, U, A, DX,
        M, N, K, R, M_BUCKET,
        stride_ym, stride_yn, stride_um, stride_ur, stride_ar, stride_ak, stride_dm, stride_dk,
        scale,
        BS: tl.constexpr, PAIRED: tl.constexpr, ALIGNED: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        HAS_LORA: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """DX[M, K] = DY[M, N] @ dequant(P)[N, K] + scale * U[M, R] @ A[R, K]; fp32 accumulators.
        The output tile's even and odd columns are accumulated apart (each byte holds one of each) and
        interleaved at the store."""
        pid_m, pid_k = _grouped_pid(M, K, BLOCK_M, BLOCK_K, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        load_m = (offs_m % M).to(tl.int64)
        k0 = pid_k * BLOCK_K
        jj = tl.arange(0, BLOCK_K // 2)
        rn = tl.arange(0, BLOCK_N)
        acc_e = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
        acc_o = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            nn = n0 + rn
            # the reduction runs over N: rows of dY past N are zeros (the weight rows there wrap onto valid ones)
            dy = tl.load(DY + load_m[:, None] * stride_ym + nn[None, :] * stride_yn, mask=nn[None, :] < N, other=0.0)
            w_e, w_o = _dequant_pair(P, CODE, ABSMAX, ABSMAX2, CODE2, OFFSET, (nn % N).to(tl.int64)[:, None],
                                     jj[None, :], k0, K, BS, PAIRED, ALIGNED, DOUBLE_QUANT)
            acc_e = tl.dot(dy, w_e.to(dy.dtype), acc_e, input_precision=PRECISION)
            acc_o = tl.dot(dy, w_o.to(dy.dtype), acc_o, input_precision=PRECISION)

        if HAS_LORA:
            rr = tl.arange(0, BLOCK_R)
            k_e = k0 + 2 * jj
            for r0 in range(0, R, BLOCK_R):
                mr = (r0 + rr) < R
                u = tl.load(U + load_m[:, None] * stride_um + (r0 + rr)[None, :] * stride_ur, mask=mr[None, :],
                            other=0.0)
                u = (u.to(tl.float32) * scale).to(u.dtype)
                a_ptrs = A + (r0 + rr)[:, None] * stride_ar + k_e[None, :] * stride_ak
                a_e = tl.load(a_ptrs, mask=mr[:, None] & (k_e[None, :] < K), other=0.0)
                a_o = tl.load(a_ptrs + stride_ak, mask=mr[:, None] & (k_e[None, :] + 1 < K), other=0.0)
                acc_e = tl.dot(u, a_e, acc_e, input_precision=PRECISION)
                acc_o = tl.dot(u, a_o, acc_o, input_precision=PRECISION)

        acc = tl.reshape(tl.join(acc_e, acc_o), (BLOCK_M, BLOCK_K))
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ptrs = DX + offs_m[:, None].to(tl.int64) * stride_dm + offs_k[None, :] * stride_dk
        tl.store(ptrs, acc.to(DX.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))

    @triton.jit
    def _gemv_kernel(
        X, P, CODE, ABSMAX, ABSMAX2, CODE2, OFFSET, T, L, BIAS, OUT,
        M, N, K, R, SPLIT,
        stride_xm, stride_xk, stride_tm, stride_tr, stride_lr, stride_ln, stride_om, stride_on,
        scale, stride_os,
        BS: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
        PRECISION: tl.constexpr, SUB_K: tl.constexpr, MASK_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """OUT[M, N] = X[M, K] @ dequant(P)^T + scale * T @ L + BIAS for M <= BLOCK_M <= 16 and K % BS == 0.
        Each program owns BLOCK_N rows of the weight and reads their bytes once, SUB_K columns (inside one
        quantization block) at a time: the block's scale multiplies the [M, BLOCK_N] partial sum, not each
        weight. BLOCK_K // SUB_K sub-steps are unrolled so that their loads are in flight together. Tensor
        cores (M padded to 16; the table values are rounded to x's dtype and scaled in fp32 after the dot, an
        error of the size of the GEMM path's rounding of the weights). The word GEMV takes fewer rows.
        Split K: program (i, s) of the grid (cdiv(N, BLOCK_N), SPLIT) sums the s-th of SPLIT equal runs of
        K-steps into OUT + s * stride_os (an fp32 workspace the caller sums when SPLIT > 1; the LoRA term and
        the bias go into run 0): without it a weight of N rows gives only N / BLOCK_N programs, too few to keep
        enough loads in flight to read the weight at HBM speed."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT)
        k_lo = pid_k * steps * BLOCK_K
        k_hi = tl.minimum(K, k_lo + steps * BLOCK_K)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        load_n = (offs_n % N).to(tl.int64)
        rm = tl.arange(0, BLOCK_M)
        load_m = (rm % M).to(tl.int64)
        jj = tl.arange(0, SUB_K // 2)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            for i in tl.static_range(BLOCK_K // SUB_K):
                ks = k0 + i * SUB_K  # K % SUB_K == 0: a sub-step is wholly inside K or wholly past it
                k_e = ks + 2 * jj
                x_ptrs = X + load_m[:, None] * stride_xm + k_e[None, :] * stride_xk
                x_e = tl.load(x_ptrs, mask=k_e[None, :] < K, other=0.0)
                x_o = tl.load(x_ptrs + stride_xk, mask=k_e[None, :] < K, other=0.0)
                # [SUB_K / 2, BLOCK_N]; past K only in a last, partial K-step
                c_e, c_o, e = _codes(P, CODE, load_n[None, :], jj[:, None], ks, K, True, MASK_K)
                part = tl.dot(x_e, c_e.to(x_e.dtype), input_precision=PRECISION)
                part = tl.dot(x_o, c_o.to(x_o.dtype), part, input_precision=PRECISION)
                s = _block_scale(ABSMAX, ABSMAX2, CODE2, OFFSET, load_n * (K // BS) + ks // BS,
                                 load_n * 0 + ks < K, DOUBLE_QUANT)
                acc += part * s[None, :]

        mask_n = offs_n < N
        if pid_k == 0:
            if HAS_LORA:
                acc = _add_adapter(acc, T, L, load_m, load_n, R, stride_tm, stride_tr, stride_lr, stride_ln, scale,
                                   True, PRECISION, BLOCK_R)
            if HAS_BIAS:
                acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = OUT + pid_k * stride_os + rm[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(rm[:, None] < M) & mask_n[None, :])

    @triton.jit
    def _gemv_words_kernel(
        X, W32, CODE, ABSMAX, ABSMAX2, CODE2, OFFSET, T, L, BIAS, OUT,
        M, N, K, KW, R, SPLIT,
        stride_xm, stride_xk, stride_tm, stride_tr, stride_lr, stride_ln, stride_om, stride_on, scale, stride_os,
        BS: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr,
        EVEN_W: tl.constexpr,
    ):
        """OUT[M, N] = X[M, K] @ dequant(W)^T + scale * T @ L + BIAS for M <= BLOCK_M (few rows) and K % BS == 0, the
        weight read as int32 words (W32): word w of row n holds W[n, 8w .. 8w + 7], its byte i (bits 8i .. 8i + 7,
        little-endian) W[n, 8w + 2i] in the high nibble and W[n, 8w + 2i + 1] in the low one. A program owns
        BLOCK_N rows and walks their words BLOCK_W at a time: 16-byte loads, each word's 8 codes multiplied with
        x on the CUDA cores in fp32, the quantization block's scale applied to the block's partial sum. At M = 1-2
        a few rows per program give enough programs (and loads in flight), and SPLIT is 1: the output is written
        once, by the program that owns it. With more rows of x the products per word grow and a large weight is
        split over K as in the tile GEMV (program (i, s) sums the s-th of SPLIT runs of steps into
        OUT + s * stride_os, an fp32 workspace the caller sums; LoRA term and bias in run 0). KW = K // 8 is an
        argument of its own so that Triton sees its divisibility (rows start 16-byte aligned: vector loads);
        EVEN_W (BLOCK_W divides KW) drops the masks, which would split the vector loads."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        steps = tl.cdiv(tl.cdiv(KW, BLOCK_W), SPLIT)
        w_lo = pid_k * steps * BLOCK_W
        w_hi = tl.minimum(KW, w_lo + steps * BLOCK_W)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        load_n = (offs_n % N).to(tl.int64)
        WPB: tl.constexpr = BS // 8  # words per quantization block
        C: tl.constexpr = WPB if WPB < BLOCK_W else BLOCK_W  # words of one block in one step
        G: tl.constexpr = BLOCK_W // C  # blocks in one step
        g = tl.arange(0, G)
        c = tl.arange(0, C)
        rm = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for w0 in range(w_lo, w_hi, BLOCK_W):
            wi = w0 + g[:, None] * C + c[None, :]  # [G, C] word index within the row
            inside = wi < KW  # K % BS == 0: a block is wholly inside the row or wholly past it
            if EVEN_W:
                words = tl.load(W32 + load_n[:, None, None] * KW + wi[None, :, :])
            else:
                words = tl.load(W32 + load_n[:, None, None] * KW + wi[None, :, :], mask=inside[None, :, :], other=0)
            blk = w0 // WPB + g  # [G] the steps' blocks (one block when it is wider than the step)
            s = _block_scale(ABSMAX, ABSMAX2, CODE2, OFFSET, load_n[:, None] * (K // BS) + blk[None, :],
                             blk[None, :] * WPB < KW, DOUBLE_QUANT)  # [BLOCK_N, G]
            # the 8 codes of each word along a last axis, gathered once for all rows of x; x read in runs of 8
            # contiguous elements (vector loads: per-element scalar loads of x made the kernel 2x slower)
            j = tl.arange(0, 8)
            shift = 8 * (j // 2) + 4 * (1 - j % 2)  # element 8w + j: byte j // 2, high nibble for even j
            codes = tl.load(CODE + ((words[:, :, :, None] >> shift[None, None, None, :]) & 15))  # [BN, G, C, 8]
            k8 = 8 * wi[:, :, None] + j[None, None, :]  # [G, C, 8]
            for mi in tl.static_range(BLOCK_M):
                xp = X + (mi % M) * stride_xm + k8 * stride_xk
                if EVEN_W:
                    xv = tl.load(xp).to(tl.float32)
                else:
                    xv = tl.load(xp, mask=inside[:, :, None], other=0.0).to(tl.float32)
                part = tl.sum(codes * xv[None, :, :, :], axis=3)  # [BN, G, C]
                row = tl.sum(tl.sum(part, axis=2) * s, axis=1)  # [BLOCK_N]
                acc += tl.where(rm[:, None] == mi, row[None, :], 0.0)

        load_m = (rm % M).to(tl.int64)
        mask_n = offs_n < N
        if pid_k == 0:
            if HAS_LORA:
                acc = _add_adapter(acc, T, L, load_m, load_n, R, stride_tm, stride_tr, stride_lr, stride_ln, scale,
                                   False, "ieee", BLOCK_R)
            if HAS_BIAS:
                acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = OUT + pid_k * stride_os + rm[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(rm[:, None] < M) & mask_n[None, :])

    _INTERPRETED = interpreted(_fwd_kernel)

    # ALIGNED (one scale per weight row per K-step) depends on the tile width the autotuner picks.
    def _aligned(args):
        return args["K"] % args["BS"] == 0 and args["BS"] % args["BLOCK_K"] == 0

    _fwd = triton.heuristics({"ALIGNED": _aligned})(_fwd_kernel)
    _dx = triton.heuristics({"ALIGNED": _aligned})(_dx_kernel)
    # MASK_K: the last K-step of the GEMV is partial (its sub-steps past K load nothing)
    _gemv = triton.heuristics({"MASK_K": lambda args: args["K"] % args["BLOCK_K"] != 0})(_gemv_kernel)
    _gemv_words = triton.heuristics({"EVEN_W": lambda args: args["KW"] % args["BLOCK_W"] == 0})(_gemv_words_kernel)

    # Hopper-sized tiles. The in-loop dequantization costs per weight element, the tensor-core work per weight
    # element times BLOCK_M: tall tiles amortise it. M, the token count, is symbolic in the compiled graph and
    # varies: tune on a power-of-two bucket of it. BLOCK_K 64 keeps the default blocksize 64 ALIGNED; the
    # 128-wide tiles take the per-element scales.
    _FWD_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
            (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3), (128, 128, 128, 8, 3),
        ]
    ]
    _DX_CONFIGS = [  # BLOCK_K is the output tile's width here, BLOCK_N the reduction step
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bk, bn, w, s in [
            (128, 64, 64, 4, 4), (256, 64, 64, 8, 3), (128, 128, 64, 8, 3), (256, 128, 64, 8, 3),
            (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3), (128, 128, 128, 8, 3),
        ]
    ]
    _GEMV_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [
            (16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 4, 3), (64, 256, 4, 3),
            (64, 512, 8, 3), (128, 256, 8, 3), (32, 1024, 8, 2),
        ]
    ]
    # rows per program x words per step: 16-byte loads per thread, enough programs for N = 512 rows. Of the last
    # three, 8 and 4 rows of 256 words (16 words per thread) were the fastest unsplit configs at M = 1-4 on every
    # shape from 2048 x 2048 to 28672 x 8192 with the weight read from HBM (H200, session 18, sweep on branch s18-gemv-sweep: 5-25%
    # faster than the ones before them), 8 rows of 64 words on one warp the fastest split over K (M = 3-4)
    _WORDS_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_W": bw}, num_warps=w, num_stages=st)
        for bn, bw, w, st in [(1, 128, 1, 3), (2, 128, 2, 3), (4, 128, 4, 3), (4, 64, 2, 3), (8, 64, 4, 3),
                              (2, 256, 4, 3), (8, 256, 4, 2), (4, 256, 2, 2), (8, 64, 1, 2)]
    ]
    _fwd_tuned = _dx_tuned = _gemv_tuned = _words_tuned = None
    if not _INTERPRETED:
        _fwd_tuned = triton.autotune(configs=_FWD_CONFIGS, key=["N", "K", "M_BUCKET", "BS"])(_fwd)
        _dx_tuned = triton.autotune(configs=_DX_CONFIGS, key=["N", "K", "M_BUCKET", "BS"])(_dx)
        _gemv_tuned = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "M", "BS"])(_gemv)
        _words_tuned = triton.autotune(configs=_WORDS_CONFIGS, key=["N", "K", "M", "BS"])(_gemv_words)


class _Quant(NamedTuple):
    """The packed weight as flat bytes and its quantization state, checked."""
    data: Tensor  # uint8 [>= ceil(n*k/2)]
    code: Tensor  # fp32 [16]
    absmax: Tensor  # fp32 [blocks], or uint8 under double quantization
    absmax2: Optional[Tensor]  # fp32 [ceil(blocks / 256)]
    code2: Optional[Tensor]  # fp32 [256]
    offset: Optional[Tensor]  # fp32 scalar
    n: int
    k: int
    blocksize: int

    @property
    def double(self) -> bool:
        return self.absmax2 is not None


def _quant(qweight, absmax, absmax2, code2, offset, code, n, k, blocksize, quant_type) -> _Quant:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if code is None:
        code = code_table(quant_type, qweight.device)
    elif code.numel() != 16:
        raise ValueError(f"code must have 16 entries, got {code.numel()}")
    double = [t is not None for t in (absmax2, code2, offset)]
    if any(double) and not all(double):
        raise ValueError("double quantization needs absmax2, code2 and offset together")
    data = qweight.contiguous().reshape(-1).view(torch.uint8)
    blocks = -(-n * k // blocksize)
    if data.numel() < (n * k + 1) // 2 or absmax.numel() != blocks:
        raise ValueError(f"packed weight of {data.numel()} bytes / absmax of {absmax.numel()} entries do not fit "
                         f"a [{n}, {k}] weight in blocks of {blocksize}")
    if all(double) and absmax2.numel() != -(-blocks // ABSMAX2_BLOCK):
        raise ValueError(f"absmax2 has {absmax2.numel()} entries for {blocks} blocks")
    return _Quant(data, code.float().contiguous(), absmax.reshape(-1).contiguous(),
                  None if absmax2 is None else absmax2.reshape(-1).float().contiguous(),
                  None if code2 is None else code2.float().contiguous(),
                  None if offset is None else offset.reshape(()).float(), n, k, blocksize)


def _block_scales(q: _Quant) -> Tensor:
    """fp32 absmax per block (double quantization undone)."""
    if not q.double:
        return q.absmax.float()
    a2 = q.absmax2.repeat_interleave(ABSMAX2_BLOCK)[: q.absmax.numel()]
    return q.code2[q.absmax.long()] * a2 + q.offset


def _dequantize(q: _Quant, dtype) -> Tensor:
    nk = q.n * q.k
    data = q.data[: (nk + 1) // 2]
    codes = torch.stack([data >> 4, data & 15], dim=-1).reshape(-1)[:nk].long()  # high nibble first
    scales = _block_scales(q).repeat_interleave(q.blocksize)[:nk]
    return (q.code[codes] * scales).reshape(q.n, q.k).to(dtype)


def dequantize(qweight: Tensor, absmax: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
               offset: Optional[Tensor], code: Optional[Tensor], n: int, k: int, blocksize: int, quant_type: str,
               dtype=torch.float32) -> Tensor:
    """The [n, k] weight in dtype, in plain PyTorch: fp32 table value * fp32 block scale, rounded once to dtype
    (what bnb's dequantize_4bit computes)."""
    return _dequantize(_quant(qweight, absmax, absmax2, code2, offset, code, n, k, blocksize, quant_type), dtype)


def quant_args(qweight: Tensor, quant_state) -> tuple:
    """(qweight, absmax, absmax2, code2, offset, code, n, k, blocksize, quant_type) from a bnb QuantState (read
    by attribute, bitsandbytes is not imported): the tensor and plain arguments the ops take after x."""
    nested = getattr(quant_state, "state2", None) is not None
    s2 = quant_state.state2 if nested else None
    if nested and s2.blocksize != ABSMAX2_BLOCK:
        raise ValueError(f"double quantization with state2.blocksize {s2.blocksize} (expected {ABSMAX2_BLOCK})")
    n, k = (int(d) for d in quant_state.shape)
    return (qweight, quant_state.absmax, s2.absmax if nested else None, s2.code if nested else None,
            quant_state.offset if nested else None, quant_state.code, n, k, int(quant_state.blocksize),
            quant_state.quant_type)


# the interpreter's one small config per kernel (autotuning it is pointless)
_INTERPRETER_GEMM = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
_INTERPRETER_DX = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2)
_new_output = new_output  # tests poison this module's outputs through it


def _use_triton(*tensors) -> bool:
    return use_triton(_INTERPRETED, *tensors, family=__name__)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _quant_ptrs(q: _Quant):
    # the double-quantization pointers are never read without it: any tensor will do
    return (q.data, q.code, q.absmax, q.absmax2 if q.double else q.absmax, q.code2 if q.double else q.code,
            q.offset if q.double else q.code)


def _block_r(r):
    return 16 if r <= 16 else (32 if r <= 32 else 64)


def _dequantize_triton(q: _Quant, dtype) -> Tensor:
    """The [n, k] weight in dtype by the Triton dequantization kernel (the same math as _dequantize)."""
    nk = q.n * q.k
    w = _new_output((q.n, q.k), dtype, q.data.device)
    if nk:
        block = max(256 if _INTERPRETED else DEQUANT_BLOCK_BYTES, q.blocksize // 2)  # whole blocks per program
        # enable_fp_fusion=False: bit-exact with bnb, which undoes double quantization as code2 * absmax2, rounded,
        # then + offset, rounded. Triton contracts the two into one FMA by default (one rounding): about 8% of the
        # block scales then differ in their last bit, and so does every fp32 weight in those blocks. (The
        # interpreter never contracts and drops the option; only a GPU run of the bit-exact tests sees this.)
        launch(_dequant_kernel, None, lambda meta: (triton.cdiv((nk + 1) // 2, meta["BLOCK"]),),
               (*_quant_ptrs(q), w, nk),
               dict(BS=q.blocksize, DOUBLE_QUANT=q.double, EVEN=nk % (2 * block) == 0, enable_fp_fusion=False),
               dict(BLOCK=block, num_warps=DEQUANT_WARPS), q.data.device)
    return w


def _dequantized_gemm(m: int) -> bool:
    """Whether an input of m rows (more than GEMV_MAX_M) takes dequantize-then-cuBLAS instead of the fused GEMM
    kernels. Measured on the H200 (benchmarks/results/*-nf4-kernel.md): at the training shapes the fused kernels
    reach 18% (forward) and 5% (dX) of the bf16 peak while bnb's dequantize + cuBLAS reaches 80%, so a transient
    [N, K] copy per call (freed when the call returns, never kept across the step) is the faster path.
    FXOPT_NF4_GEMM=fused selects the fused kernels (tests also set DEQUANT_MIN_M)."""
    return m >= DEQUANT_MIN_M


def _as_words(q: _Quant) -> Optional[Tensor]:
    """The packed weight as int32 words (8 codes each) for the word GEMV, or None where its bytes cannot be
    viewed so (they do not start on a 4-byte boundary). K % blocksize == 0 (blocksize >= 32) makes every row a
    whole number of words."""
    data = q.data[: q.n * q.k // 2]
    return None if data.data_ptr() % 4 else data.view(torch.int32)


def _gemv_split(n: int, k: int, device: torch.device) -> int:
    """How many runs of K the GEMV splits into: enough programs for ~4 per SM at 32 rows each, at most one run
    per 256 columns (the smallest tuned BLOCK_K; 128 in the interpreter) and 16 runs (the workspace sum stays
    small next to the weight's read). The interpreter takes an 8-SM device, so that CI's small shapes run the
    split too."""
    sms = sm_count(device) if device.type == "cuda" else 8
    return max(1, min(16, (4 * sms) // triton.cdiv(n, 32), triton.cdiv(k, 256 if device.type == "cuda" else 128)))


def _words_split(m: int, n: int, k: int) -> int:
    """How many runs of K the word GEMV splits into: 1 for one or two rows of x and for weights under
    WORDS_SPLIT_MIN_NK elements; else 2, or 4 from K = 8192 on. Measured (H200, weight read from HBM, M = 4):
    2048 x 2048 gained nothing (8.1 vs 8.2 us); 8192 x 2048 25.1 -> 20.8 us, 2048 x 8192 24.1 -> 19.7, 28672 x 8192
    284 -> 220 (session 18, sweep on branch s18-gemv-sweep; the workspace sum included only as a memset there)."""
    if m < 3 or n * k < WORDS_SPLIT_MIN_NK:
        return 1
    return 4 if k >= 8192 else 2


def _split_dest(out: Tensor, split: int, scale: float):
    """Where a GEMV split over K into `split` runs writes, and the kernel's trailing arguments (output strides,
    adapter scale, run stride): out itself for one run, else an fp32 [split, M, N] workspace whose runs each write
    every element, summed into out by the caller."""
    dest = out if split == 1 else torch.empty((split, *out.shape), dtype=torch.float32, device=out.device)
    return dest, (dest.stride(-2), dest.stride(-1), float(scale), dest.stride(0) if split > 1 else 0)


def _matmul(x: Tensor, q: _Quant, t: Optional[Tensor], lo: Optional[Tensor], scale: float,
            bias: Optional[Tensor], out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """x [M, K] @ dequant(q)^T + scale * t [M, R] @ lo [R, N] + bias -> [M, N] in out_dtype (default x.dtype; lo
    any strides)."""
    M, K = x.shape
    N = q.n
    out = _new_output((M, N), out_dtype or x.dtype, x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(torch.zeros_like(out) if bias is None else bias.to(out.dtype).expand_as(out))
    if not _use_triton(x, t):
        acc_dtype = torch.promote_types(torch.promote_types(x.dtype, out.dtype), torch.float32)
        acc = x.to(acc_dtype) @ _dequantize(q, x.dtype).to(acc_dtype).t()  # a per-call transient copy
        if t is not None:
            acc += scale * (t @ lo).to(acc_dtype)
        if bias is not None:
            acc += bias.to(acc_dtype)
        return out.copy_(acc)

    has_lora = t is not None and t.shape[1] > 0
    R = t.shape[1] if has_lora else 0
    if not has_lora:  # the pointers are never read: any tensor will do
        t, lo = x, x
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else out
    # fp32 inputs get exact fp32 products (tl.dot on fp32 would use tf32 on the GPU); with half precision
    # inputs, fp32 adapter operands in tf32 err far below the half precision base term's rounding.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    ptrs = _quant_ptrs(q)
    strides = (x.stride(0), x.stride(1), t.stride(0), t.stride(1), lo.stride(0), lo.stride(1),
               out.stride(0), out.stride(1), float(scale))
    base = dict(BS=q.blocksize, DOUBLE_QUANT=q.double, HAS_LORA=has_lora, HAS_BIAS=has_bias, BLOCK_R=_block_r(R))
    flags = dict(base, PRECISION=precision)
    words = _as_words(q) if M <= min(WORDS_MAX_M, GEMV_MAX_M) and K % q.blocksize == 0 else None
    if words is not None:
        split = _words_split(M, N, K)
        dest, dest_strides = _split_dest(out, split, scale)
        args = (x, words, *ptrs[1:], t, lo, bias, dest, M, N, K, K // 8, R, split, *strides[:6], *dest_strides)
        launch(_gemv_words, _words_tuned, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), split), args,
               dict(base, BLOCK_M=triton.next_power_of_2(M)), dict(BLOCK_N=2, BLOCK_W=8), x.device)
        return out if dest is out else out.copy_(dest.sum(0))
    if M <= GEMV_MAX_M and K % q.blocksize == 0:  # tensor-core dots, M padded to 16
        sub_k = min(q.blocksize, 64)
        split = _gemv_split(N, K, x.device)
        dest, dest_strides = _split_dest(out, split, scale)
        args = (x, *ptrs, t, lo, bias, dest, M, N, K, R, split, *strides[:6], *dest_strides)
        launch(_gemv, _gemv_tuned, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), split), args,
               dict(flags, SUB_K=sub_k, BLOCK_M=16), dict(BLOCK_N=16, BLOCK_K=2 * sub_k),
               x.device)
        return out if dest is out else out.copy_(dest.sum(0))

    if _dequantized_gemm(M):
        y = x @ _dequantize_triton(q, x.dtype).t()
        if has_lora and t.dtype == lo.dtype == out.dtype:
            # the adapter in the output's dtype (the QLoRA recipe's fp32 sum): the base result copied into out,
            # then one GEMM adding the low-rank term in its epilogue, instead of an [M, N] pass per operation
            out.copy_(y)
            if has_bias:
                out.add_(bias)
            return out.addmm_(t, lo, alpha=scale)
        y = y.to(out.dtype)
        if has_lora:  # added in the promoted dtype and rounded once, as PEFT adds its adapter
            y = y + scale * (t @ lo)
        if has_bias:
            y = y + bias
        return out.copy_(y)

    args = (x, *ptrs, t, lo, bias, out, M, N, K, R, min(triton.next_power_of_2(M), 8192), *strides)
    flags["PAIRED"] = K % 2 == 0
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    launch(_fwd, _fwd_tuned, grid, args, flags, _INTERPRETER_GEMM, x.device)
    return out


def _matmul_dx(dy: Tensor, q: _Quant, u: Optional[Tensor], a: Optional[Tensor], scale: float) -> Tensor:
    """dy [M, N] @ dequant(q) + scale * u [M, R] @ a [R, K] -> [M, K] in dy.dtype."""
    M, N = dy.shape
    K = q.k
    dx = _new_output((M, K), dy.dtype, dy.device)
    if M == 0 or K == 0:
        return dx
    if not _use_triton(dy, u):
        acc_dtype = torch.promote_types(dy.dtype, torch.float32)
        acc = dy.to(acc_dtype) @ _dequantize(q, dy.dtype).to(acc_dtype)
        if u is not None:
            acc += scale * (u @ a).to(acc_dtype)
        return dx.copy_(acc)

    has_lora = u is not None and u.shape[1] > 0
    R = u.shape[1] if has_lora else 0
    if _dequantized_gemm(M):
        g = dy @ _dequantize_triton(q, dy.dtype)
        if has_lora:
            g = g + scale * (u @ a)
        return dx.copy_(g)
    if not has_lora:
        u, a = dy, dy
    precision = "ieee" if dx.dtype == torch.float32 else "tf32"
    args = (dy, *_quant_ptrs(q), u, a, dx, M, N, K, R, min(triton.next_power_of_2(M), 8192),
            dy.stride(0), dy.stride(1), u.stride(0), u.stride(1), a.stride(0), a.stride(1), dx.stride(0),
            dx.stride(1), float(scale))
    flags = dict(BS=q.blocksize, PAIRED=K % 2 == 0, DOUBLE_QUANT=q.double, HAS_LORA=has_lora,
                 PRECISION=precision, BLOCK_R=_block_r(R))
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)

    launch(_dx, _dx_tuned, grid, args, flags, _INTERPRETER_DX, dy.device)
    return dx


# ---------------------------------------------------------------------------------------------------------
# fxopt::linear_4bit


@torch.library.custom_op("fxopt::linear_4bit", mutates_args=())
@with_fallback
def linear_4bit(x: Tensor, qweight: Tensor, absmax: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
                offset: Optional[Tensor], code: Optional[Tensor], bias: Optional[Tensor], n: int, k: int,
                blocksize: int, quant_type: str) -> Tensor:
    """x [..., k] @ dequant(qweight)[n, k]^T (+ bias [n]) -> [..., n] in x.dtype. absmax2, code2 and offset are
    given together under double quantization, else None; code None means quant_type's standard table."""
    q = _quant(qweight, absmax, absmax2, code2, offset, code, n, k, blocksize, quant_type)
    return _matmul(_flat(x), q, None, None, 1.0, bias).view(*x.shape[:-1], n)


@linear_4bit.register_fake
def _(x, qweight, absmax, absmax2, code2, offset, code, bias, n, k, blocksize, quant_type):
    return x.new_empty(*x.shape[:-1], n)


@torch.library.custom_op("fxopt::linear_4bit_dx", mutates_args=())
@with_fallback
def linear_4bit_dx(grad: Tensor, qweight: Tensor, absmax: Tensor, absmax2: Optional[Tensor],
                   code2: Optional[Tensor], offset: Optional[Tensor], code: Optional[Tensor], n: int, k: int,
                   blocksize: int, quant_type: str) -> Tensor:
    """grad [..., n] @ dequant(qweight)[n, k] -> [..., k] in grad.dtype (the input gradient of linear_4bit)."""
    q = _quant(qweight, absmax, absmax2, code2, offset, code, n, k, blocksize, quant_type)
    return _matmul_dx(_flat(grad), q, None, None, 1.0).view(*grad.shape[:-1], k)


@linear_4bit_dx.register_fake
def _(grad, qweight, absmax, absmax2, code2, offset, code, n, k, blocksize, quant_type):
    return grad.new_empty(*grad.shape[:-1], k)


def _setup_linear(ctx, inputs, output):
    x, qweight, absmax, absmax2, code2, offset, code, bias, n, k, blocksize, quant_type = inputs
    # dX needs only the (frozen) weight and its state: x itself is not saved
    ctx.save_for_backward(qweight, absmax, absmax2, code2, offset, code)
    ctx.meta = (n, k, blocksize, quant_type)


def _backward_linear(ctx, grad):
    need = ctx.needs_input_grad
    dx = db = None
    if need[0]:
        dx = torch.ops.fxopt.linear_4bit_dx(grad, *ctx.saved_tensors, *ctx.meta)
    if need[7]:
        db = grad.reshape(-1, grad.shape[-1]).sum(0)
    return dx, None, None, None, None, None, None, db, None, None, None, None


linear_4bit.register_autograd(_backward_linear, setup_context=_setup_linear)


# ---------------------------------------------------------------------------------------------------------
# fxopt::lora_linear_4bit


@torch.library.custom_op("fxopt::lora_linear_4bit", mutates_args=())
@with_fallback
def lora_linear_4bit(x: Tensor, qweight: Tensor, absmax: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
                     offset: Optional[Tensor], code: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor,
                     lora_b: Tensor, scaling: float, x_lora: Optional[Tensor], n: int, k: int, blocksize: int,
                     quant_type: str, out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """(out, t): out = x @ dequant(qweight)^T (+ bias) + scaling * (x_l @ lora_a^T) @ lora_b^T in out_dtype
    (default x.dtype), x_l = x_lora (dropout(x)) or x; t = x_l @ lora_a^T [M, r] in the adapter's dtype, returned
    only to be saved for backward. The adapter branch runs in the adapter's dtype, like PEFT. out_dtype wider
    than x.dtype is PEFT on bnb with an fp32 input and a half precision compute dtype: bnb returns the base
    result in the input's dtype and the adapter is added there, so a small adapter term is not rounded away."""
    q = _quant(qweight, absmax, absmax2, code2, offset, code, n, k, blocksize, quant_type)
    x2 = _flat(x)
    adt = lora_a.dtype
    if _as_dense_lora(x2, q, out_dtype):  # the dense LoRA op's forward on the dequantized transient
        outs, t = lora_kernels._forward(x, [_dequantize_triton(q, x.dtype)], [] if bias is None else [bias],
                                        [lora_a], [lora_b], [scaling], x_lora, [bias is not None])
        return outs[0], t
    t = (x2 if x_lora is None else _flat(x_lora)).to(adt) @ lora_a.t()
    out = _matmul(x2, q, t, lora_b.to(adt).t(), scaling, bias, out_dtype)
    return out.view(*x.shape[:-1], n), t


def dense_backward_weight(grad: Tensor, x_dtype: torch.dtype, qweight, absmax, absmax2, code2, offset, code, n: int,
                          k: int, blocksize: int, quant_type: str) -> Optional[Tensor]:
    """The 4-bit weight dequantized to x_dtype (a transient) where a backward of `grad` runs as the dense LoRA
    op's (a gradient in the base's dtype, training-sized: _as_dense_lora), else None (the 4-bit kernels)."""
    q = _quant(qweight, absmax, absmax2, code2, offset, code, n, k, blocksize, quant_type)
    if grad.dtype == x_dtype and _as_dense_lora(_flat(grad), q, None):
        return _dequantize_triton(q, x_dtype)
    return None


def _as_dense_lora(x2: Tensor, q: _Quant, out_dtype: Optional[torch.dtype]) -> bool:
    """Training-sized half precision input, the sum in that dtype (QLoRA on a bf16 residual stream): the weight
    dequantized to a transient, then the dense LoRA op's products (kernels.lora): the adapter's fp32 products
    on tensor cores without an fp32 copy of the activation (_adapter_mm), the low-rank term written first and
    the base GEMM accumulating into it (_linear_sum). The plain path below (an fp32 copy of x, fp32 GEMMs on
    CUDA cores, an fp32 [M, N] sum) measured 100 of a 214 ms qlora step on the H100 (2026-11-27 profile)."""
    m = x2.shape[0]
    return (x2.dtype in (torch.bfloat16, torch.float16) and out_dtype in (None, x2.dtype) and _use_triton(x2)
            and not (m <= GEMV_MAX_M and q.k % q.blocksize == 0) and _dequantized_gemm(m))


@lora_linear_4bit.register_fake
def _(x, qweight, absmax, absmax2, code2, offset, code, bias, lora_a, lora_b, scaling, x_lora, n, k, blocksize,
      quant_type, out_dtype=None):
    m = 1
    for d in x.shape[:-1]:
        m = m * d
    return (x.new_empty(*x.shape[:-1], n, dtype=out_dtype or x.dtype),
            x.new_empty(m, lora_a.shape[0], dtype=lora_a.dtype))


@torch.library.custom_op("fxopt::lora_linear_4bit_backward", mutates_args=())
@with_fallback
def lora_linear_4bit_backward(grad: Tensor, x_l: Tensor, t: Tensor, qweight: Tensor, absmax: Tensor,
                              absmax2: Optional[Tensor], code2: Optional[Tensor], offset: Optional[Tensor],
                              code: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scaling: float, n: int, k: int,
                              blocksize: int, quant_type: str, x_dtype: torch.dtype, dropout: bool, need_dx: bool,
                              need_db: bool) -> list[Tensor]:
    """[dx?] + [dx_lora? (dropout)] + [db?] + [dA, dB]. x_l is the adapter's input (x_lora, or x without
    dropout); with dropout dx is the 4-bit path only and dx_lora = s * (dY B) A."""
    q = _quant(qweight, absmax, absmax2, code2, offset, code, n, k, blocksize, quant_type)
    adt = lora_a.dtype
    weight = dense_backward_weight(grad, x_dtype, qweight, absmax, absmax2, code2, offset, code, n, k, blocksize,
                                   quant_type)
    if weight is not None:
        # the dense LoRA op's backward on the weight dequantized again. It reads its base input x only for dx's
        # shape and dtype (no dW here): with dropout, where x itself is not saved, a zero-stride stand-in
        x = torch.empty((), dtype=x_dtype, device=x_l.device).expand(x_l.shape) if dropout else x_l
        return lora_kernels.lora_linear_backward([grad], x, x_l if dropout else None, t, [weight], [lora_a],
                                                 [lora_b], [scaling], need_dx, [False], [need_db])
    dy = _flat(grad).to(x_dtype)  # the base path's gradient runs in the base's dtype
    dy_a = _flat(grad).to(adt)  # the adapter's gradients from the output's gradient, in the adapter's dtype
    u = dy_a @ lora_b.to(adt)  # [M, r]
    lead = grad.shape[:-1]
    result = []
    if need_dx:
        low = (None, None) if dropout else (u, lora_a.to(adt))
        result.append(_matmul_dx(dy, q, low[0], low[1], scaling).view(*lead, k))
    # the scale multiplies the small operand ([M, r]), not a product of the activation's size
    su = u * scaling
    if dropout:
        result.append((su @ lora_a.to(adt)).to(x_l.dtype).view(x_l.shape))
    if need_db:
        result.append(dy.sum(0))
    xl = _flat(x_l).to(adt)
    result.append((su.t() @ xl).to(lora_a.dtype))
    result.append((dy_a.t() @ (t * scaling)).to(lora_b.dtype))
    return result


@lora_linear_4bit_backward.register_fake
def _(grad, x_l, t, qweight, absmax, absmax2, code2, offset, code, lora_a, lora_b, scaling, n, k, blocksize,
      quant_type, x_dtype, dropout, need_dx, need_db):
    result = [grad.new_empty(*grad.shape[:-1], k, dtype=x_dtype)] if need_dx else []
    if dropout:
        result.append(torch.empty_like(x_l))
    if need_db:
        result.append(grad.new_empty(n, dtype=x_dtype))
    return result + [torch.empty_like(lora_a), torch.empty_like(lora_b)]


def _setup_lora(ctx, inputs, output):
    x, qweight, absmax, absmax2, code2, offset, code, bias, lora_a, lora_b, scaling, x_lora, n, k, blocksize, \
        quant_type, _out_dtype = inputs
    # saved: the adapter's input (x_lora, or x itself without dropout) and t; the rest are frozen weights
    ctx.save_for_backward(x if x_lora is None else x_lora, output[1], qweight, absmax, absmax2, code2, offset, code,
                          lora_a, lora_b)
    ctx.meta = (scaling, n, k, blocksize, quant_type, x.dtype, x_lora is not None)


def _backward_lora(ctx, grad, _grad_t):
    x_l, t, qweight, absmax, absmax2, code2, offset, code, lora_a, lora_b = ctx.saved_tensors
    scaling, n, k, blocksize, quant_type, x_dtype, dropout = ctx.meta
    need = ctx.needs_input_grad
    need_dx, need_db = bool(need[0]), bool(need[7])
    flat = iter(torch.ops.fxopt.lora_linear_4bit_backward(
        grad, x_l, t, qweight, absmax, absmax2, code2, offset, code, lora_a, lora_b, scaling, n, k, blocksize,
        quant_type, x_dtype, dropout, need_dx, need_db))
    dx = next(flat) if need_dx else None
    dxl = next(flat) if dropout else None
    db = next(flat) if need_db else None
    da, dB = next(flat), next(flat)
    return dx, None, None, None, None, None, None, db, da, dB, None, dxl, None, None, None, None, None


lora_linear_4bit.register_autograd(_backward_lora, setup_context=_setup_lora)


# ---------------------------------------------------------------------------------------------------------


def reference(x, qweight, absmax, absmax2, code2, offset, code, bias, n, k, blocksize, quant_type, lora_a=None,
              lora_b=None, scaling=1.0, x_lora=None, out_dtype=None) -> Tensor:
    """The ops' math in plain PyTorch (differentiable in x, bias, lora_a, lora_b, x_lora): the weight dequantized
    to x's dtype by `dequantize`, then F.linear, plus the LoRA branch in the adapter's dtype as PEFT computes."""
    w = dequantize(qweight, absmax, absmax2, code2, offset, code, n, k, blocksize, quant_type, x.dtype)
    base = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    if lora_a is None:
        return base
    xl = x if x_lora is None else x_lora
    adapter = F.linear(F.linear(xl.to(lora_a.dtype), lora_a), lora_b) * scaling
    return (base.to(torch.promote_types(base.dtype, adapter.dtype)) + adapter).to(out_dtype or x.dtype)


def linear_4bit_fn(x, qweight, quant_state, bias=None) -> Tensor:
    """fxopt::linear_4bit on a bnb packed weight and its QuantState."""
    qw, am, am2, c2, off, code, n, k, bs, qt = quant_args(qweight, quant_state)
    return torch.ops.fxopt.linear_4bit(x, qw, am, am2, c2, off, code, bias, n, k, bs, qt)


def lora_linear_4bit_fn(x, qweight, quant_state, bias, lora_a, lora_b, scaling, x_lora=None, out_dtype=None) -> Tensor:
    """fxopt::lora_linear_4bit on a bnb packed weight and its QuantState; returns out only."""
    qw, am, am2, c2, off, code, n, k, bs, qt = quant_args(qweight, quant_state)
    return torch.ops.fxopt.lora_linear_4bit(x, qw, am, am2, c2, off, code, bias, lora_a, lora_b, float(scaling),
                                            x_lora, n, k, bs, qt, out_dtype)[0]
