"""fxopt::flash_attention: attention without the [S, S] score matrix in memory (FlashAttention-2 style), with
grouped KV heads, causal / sliding-window / key-padding masks and a tanh softcap.

    q [B, Hq, S, D], k and v [B, Hkv, S, D] (Hq % Hkv == 0; query head h reads kv head h // (Hq // Hkv))
    s_ij = scale * q_i . k_j                                       fp32
    s_ij = softcap * tanh(s_ij / softcap)                          only if softcap > 0 (before masking)
    key j is visible from query i iff  (not causal or j <= i) and (window == 0 or j > i - window)
                                       and key_padding[b, j]       (True = a real key)
    with a dense mask instead: key j is visible iff mask[b, 0, i, j] (bool), or, for a float (additive) mask,
    iff mask[b, 0, i, j] > the dtype's minimum (HF's eager masked value), and then s_ij += mask[b, 0, i, j]
    out_i = sum_j softmax_j(s_i) v_j  over the visible keys, in q's dtype;  out_i = 0 where no key is visible

The window is Hugging Face's sliding window: transformers 5.24 `masking_utils` builds it as
`and_masks(sliding_window_overlay(w), causal_mask_function)` with the overlay `kv_idx > q_idx - w` and the
causal `kv_idx <= q_idx`, i.e. query i sees the w keys i - w + 1 .. i. A window is causal by definition here,
so window > 0 requires causal=True (the bidirectional sliding window, |i - j| <= w, is another mask and is not
supported). A window >= S is no window.

Rows that see no key (all their keys padded, e.g. left padding under a causal mask) give out = 0 and zero
gradients. PyTorch's SDPA does the same since torch 2.5 (`_safe_softmax`, pytorch#133882: fully masked rows
give 0; checked on torch 2.13 CPU, output and dq both 0). Hugging Face's eager attention differs: it adds the
dtype's minimum (not -inf) to masked scores, so such a row attends uniformly to all keys. Those rows are padding
queries, whose outputs a loss ignores; a pass rewriting eager attention changes only them.

Forward (one program per BLOCK_M query rows of one query head): the online softmax over key blocks in fp32,
P rounded to the input dtype for the P @ V product (fp32 accumulate). Only the key blocks a query block can
see are visited (loop bounds from the causal / window limits), and only the blocks that cut a mask boundary
(diagonal, window edge, the ragged end) compute the mask. It writes out and the row logsumexp lse [B, Hq, S]
(fp32, +inf for a row with no key, so that exp(s - lse) = 0 in the backward; float64 on the torch path of
float64 inputs).
Backward (its own op): delta_i = rowsum(dO_i * O_i) (one small kernel), then
    dq kernel:   one program per query block: recompute P = exp(s - lse), dP = dO V^T, dS = P (dP - delta),
                 dq = scale * dS (1 - tanh^2 if softcapped) K
    dk/dv kernel: one program per key block of one KV head; it walks every query head of its group, so the
                 group's sum of dK and dV is accumulated in registers (fp32): no repeated K/V, no per-query-head
                 dK/dV copy, no atomics (deterministic). dV = P^T dO, dK = scale * dS^T Q.
The same loop bounds and masked / unmasked split as the forward in both. dS and P are rounded to the input
dtype for their GEMMs (fp32 accumulate), as FlashAttention does.
Saved for backward: q, k, v, out and lse.
Layouts: any strides (HF's [B, S, H, D] -> transpose(1, 2) views are read in place). Outputs (out, dq, dk, dv)
are laid out [B, S, H, D] in memory and returned as [B, H, S, D] views: HF transposes the attention output
back to [B, S, H * D], which is then a free view instead of a copy.

Head dims: any D <= 256 (tiles are padded to a power of two >= 16, the padding masked); D > 256 runs the torch
math. On CUDA the kernels are autotuned (block sizes, warps, stages) per head dim, power-of-two bucket of S,
group size and mask flags. On CPU the op runs the torch math, except when the kernels are interpreted
(TRITON_INTERPRET=1 set before import), where the Triton code runs in Triton's interpreter with small fixed
tiles: that is how CI tests the kernels (fp32 and fp16; the interpreter's bf16 tl.dot is wrong, so bf16 on
the CPU takes the torch math and is tested on the GPU). Dtypes other than fp16/bf16/fp32 (float64) always
take the torch math.
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

from fxopt.kernels.common import (interpreted, launch, new_output, shared_memory_limit, tanh,
                                  use_triton, with_fallback)

_INTERPRETED = False
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # larger head dims run the torch math (the tiles would not fit shared memory)

if triton is not None:

    @triton.jit
    def _load_tile(ptr, rows, offs_d, n_rows, stride_r, stride_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   CHECK_ROWS: tl.constexpr):
        """A [rows, BLOCK_D] tile, zero outside [0, n_rows) x [0, HEAD_DIM); the row check only where a tile can
        cross the end of the sequence, the column check only for a padded head dim."""
        ptrs = ptr + rows[:, None] * stride_r + offs_d[None, :] * stride_d
        if CHECK_ROWS:
            if BLOCK_D == HEAD_DIM:
                x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
            else:
                x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            if BLOCK_D == HEAD_DIM:
                x = tl.load(ptrs)
            else:
                x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        return x

    @triton.jit
    def _store_tile(ptr, x, rows, offs_d, n_rows, stride_r, stride_d, HEAD_DIM: tl.constexpr):
        ptrs = ptr + rows[:, None] * stride_r + offs_d[None, :] * stride_d
        tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))

    @triton.jit
    def _scores(qk, qk_scale, softcap, SOFTCAP: tl.constexpr):
        """(scores in log2 units, d score / d (scale * qk)): qk_scale = scale * log2(e), or scale / softcap with a
        softcap (then softcap here is softcap * log2(e)). The forward ignores the derivative (compiled away)."""
        if SOFTCAP:
            t, dt = tanh(qk * qk_scale)
            return t * softcap, dt
        return qk * qk_scale, qk

    @triton.jit
    def _skipping(j, skip_from, skip_to, MASKED: tl.constexpr):
        """The block start for loop position j of a walk over [start, end) that leaves out [skip_from, skip_to)
        (the loop runs end - start - (skip_to - skip_from) positions). Unmasked walks skip nothing."""
        if MASKED:
            return j + tl.where(j >= skip_from, skip_to - skip_from, 0)
        return j

    @triton.jit
    def _causal_window_mask(s, offs_m, offs_n, S, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
        """s [BLOCK_M queries, BLOCK_N keys] with the invisible (and out-of-range) keys at -inf."""
        ok = offs_n[None, :] < S
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        if WINDOW:
            ok = ok & (offs_n[None, :] > offs_m[:, None] - window)
        return tl.where(ok, s, float("-inf"))

    @triton.jit
    def _key_padding_mask(s, PAD, offs_n, S, stride_ps):
        real = tl.load(PAD + offs_n * stride_ps, mask=offs_n < S, other=0)
        return tl.where(real[None, :] != 0, s, float("-inf"))

    @triton.jit
    def _key_range(m0, S, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
        """Key blocks seen by query rows [m0, m0 + BLOCK_M): [lo, hi), and inside it [full_lo, full_hi), the
        blocks that every one of those rows sees entirely (no mask to compute). All multiples of BLOCK_N."""
        lo = m0 * 0
        hi = m0 * 0 + S
        full_lo = lo
        full_hi = (S // BLOCK_N) * BLOCK_N  # the ragged last block needs the bounds mask
        if CAUSAL:
            hi = tl.minimum(hi, m0 + BLOCK_M)
            full_hi = tl.minimum(full_hi, ((m0 + 1) // BLOCK_N) * BLOCK_N)  # n0 + BLOCK_N - 1 <= m0
        if WINDOW:
            lo = (tl.maximum(m0 - window + 1, 0) // BLOCK_N) * BLOCK_N
            # n0 >= (m0 + BLOCK_M - 1) - window + 1: the last row's window starts at or before the block
            full_lo = ((tl.maximum(m0 + BLOCK_M - window, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        hi = ((hi + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
        return lo, hi, full_lo, full_hi

    @triton.jit
    def _query_range(n0, S, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        """Query blocks that see keys [n0, n0 + BLOCK_N): [lo, hi), and inside it [full_lo, full_hi), the
        blocks whose every row sees all of those keys. All multiples of BLOCK_M."""
        lo = n0 * 0
        hi = n0 * 0 + S
        full_lo = lo
        full_hi = (S // BLOCK_M) * BLOCK_M
        if CAUSAL:
            lo = (n0 // BLOCK_M) * BLOCK_M
            full_lo = ((n0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M) * BLOCK_M  # m0 >= n0 + BLOCK_N - 1
        if WINDOW:
            hi = tl.minimum(hi, n0 + BLOCK_N - 1 + window)  # i <= j + window - 1 for the last key j
            full_hi = tl.minimum(full_hi, ((n0 + window) // BLOCK_M) * BLOCK_M)  # m0 + BLOCK_M <= n0 + window
        full_hi = tl.where(n0 + BLOCK_N <= S, full_hi, 0)  # keys past the end: every block is masked
        hi = ((hi + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
        return lo, hi, full_lo, full_hi

    @triton.jit
    def _mask_range(SUMMARY, first, n_strips, field_stride, strip0, S, BLOCK: tl.constexpr,
                    STRIPS: tl.constexpr, OTHER: tl.constexpr):
        """The blocks (of OTHER positions, multiples of OTHER) to visit for the STRIPS mask strips strip0 ..
        (BLOCK rows of queries, or BLOCK keys): [lo, hi), and inside it [full_lo, full_hi), blocks every one of
        those rows sees entirely. SUMMARY + first is field 0 of the four per-strip fields (_mask_summary:
        first / end of the visible tiles, first / end of the first run of full tiles, in strips of 16).
        Strips past the end of the sequence are neutral; a strip that sees nothing empties the full range."""
        offs = strip0 + tl.arange(0, STRIPS)
        ok = offs < n_strips
        ptr = SUMMARY + first + offs
        big = n_strips + 1
        lo = tl.min(tl.load(ptr, mask=ok, other=big), 0) * 16
        hi = tl.max(tl.load(ptr + field_stride, mask=ok, other=0), 0) * 16
        full_lo = tl.max(tl.load(ptr + 2 * field_stride, mask=ok, other=0), 0) * 16
        full_hi = tl.min(tl.load(ptr + 3 * field_stride, mask=ok, other=big), 0) * 16
        lo = (lo // OTHER) * OTHER
        hi = ((tl.minimum(hi, S) + OTHER - 1) // OTHER) * OTHER
        full_lo = ((full_lo + OTHER - 1) // OTHER) * OTHER
        full_hi = (tl.minimum(full_hi, S) // OTHER) * OTHER  # a ragged last block is never unmasked
        hi = tl.maximum(hi, lo)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
        return lo, hi, full_lo, full_hi

    @triton.jit
    def _row_key_range(SUMMARY, summary_row, n_strips, field_stride, m0, S, window, CAUSAL: tl.constexpr,
                       WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The key blocks of query rows [m0, m0 + BLOCK_M) (forward and dQ): from the mask summary, or from the
        causal / window bounds."""
        if HAS_MASK:
            return _mask_range(SUMMARY, summary_row, n_strips, field_stride, m0 // 16, S, BLOCK_M, BLOCK_M // 16,
                               BLOCK_N)
        return _key_range(m0, S, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)

    @triton.jit
    def _causal_strips(SUMMARY, flag, n_strips, strip0, STRIPS: tl.constexpr):
        """1 when the mask equals the causal mask (key j visible from query i iff j <= i) on every strip
        strip0 .. strip0 + STRIPS (field 4 or 9 of the summary at SUMMARY + flag), else 0: the partly visible
        tiles of those strips then compute the causal mask instead of reading it. (With the HF mask, forward and
        dQ took 25-35% longer than with the causal flag on the H100; this, the parallel summary and the merged
        loop together gave dense +1.5%. Its own share was not separated: the machines of the calls differed.)"""
        offs = strip0 + tl.arange(0, STRIPS)
        return tl.min(tl.load(SUMMARY + flag + offs, mask=offs < n_strips, other=1), 0)

    @triton.jit
    def _bias(ptrs, inside, mask_min):
        """An additive mask's tile in log2 units (as the scores are): its values at or below mask_min (HF's
        masked value, the dtype's minimum) and those outside the sequence at -inf."""
        b = tl.load(ptrs, mask=inside, other=float("-inf")).to(tl.float32)
        return tl.where(b <= mask_min, float("-inf"), b) * 1.4426950408889634

    @triton.jit
    def _dense_mask(s, MASK, offs_m, offs_n, S, stride_mq, stride_mk, mask_min, MASK_BIAS: tl.constexpr):
        """s [BLOCK_M queries, BLOCK_N keys] with the keys the mask hides (and out-of-range ones) at -inf; with
        an additive mask (MASK_BIAS), s plus the mask."""
        ptrs = MASK + offs_m.to(tl.int64)[:, None] * stride_mq + offs_n.to(tl.int64)[None, :] * stride_mk
        inside = (offs_m[:, None] < S) & (offs_n[None, :] < S)
        if MASK_BIAS:
            return s + _bias(ptrs, inside, mask_min)
        vis = tl.load(ptrs, mask=inside, other=0)
        return tl.where(vis != 0, s, float("-inf"))

    @triton.jit
    def _fwd_blocks(acc, l_i, m_i, q, K, V, PAD, MASK, offs_m, start, end, skip_from, skip_to, S, window, stride_kn,
                    stride_kd, stride_vn, stride_vd, stride_ps, stride_mq, stride_mk, qk_scale, softcap, mask_min,
                    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_PAD: tl.constexpr,
                    HAS_MASK: tl.constexpr, MASK_BIAS: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """Online softmax over the key blocks [start, end) except [skip_from, skip_to) (MASKED: the partly visible
        blocks on both sides of the unmasked run; else skip_from = skip_to = end)."""
        offs_d = tl.arange(0, BLOCK_D)
        for j in range(start, end - (skip_to - skip_from), BLOCK_N):
            n0 = _skipping(j, skip_from, skip_to, MASKED)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = _load_tile(K, offs_n, offs_d, S, stride_kn, stride_kd, HEAD_DIM, BLOCK_D, MASKED)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            s, _ = _scores(qk, qk_scale, softcap, SOFTCAP)
            if MASKED:
                if HAS_MASK:
                    s = _dense_mask(s, MASK, offs_m, offs_n, S, stride_mq, stride_mk, mask_min, MASK_BIAS)
                else:
                    s = _causal_window_mask(s, offs_m, offs_n, S, window, CAUSAL, WINDOW)
            if HAS_PAD:
                s = _key_padding_mask(s, PAD, offs_n, S, stride_ps)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row that has seen no key yet keeps max -inf: subtract 0 instead (exp2(-inf) = 0, not NaN)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_tile(V, offs_n, offs_d, S, stride_vn, stride_vd, HEAD_DIM, BLOCK_D, MASKED)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _fwd_kernel(Q, K, V, PAD, MASK, SUMMARY, OUT, LSE,
                    stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                    stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od,
                    stride_pb, stride_ps, stride_mb, stride_mq, stride_mk, stride_sb, field_stride, n_strips,
                    H, S, GROUP, S_BUCKET, qk_scale, softcap, window, mask_min,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                    SOFTCAP: tl.constexpr, HAS_PAD: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BIAS: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # last query blocks first: under a causal mask they see the most keys (shorter tail at the end)
        m_block = tl.num_programs(0) - 1 - tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        kvh = (h // GROUP).to(tl.int64)
        h = h.to(tl.int64)
        Q += b * stride_qb + h * stride_qh
        K += b * stride_kb + kvh * stride_kh
        V += b * stride_vb + kvh * stride_vh
        OUT += b * stride_ob + h * stride_oh
        LSE += bh.to(tl.int64) * S
        PAD += b * stride_pb
        MASK += b * stride_mb
        m0 = m_block * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_tile(Q, offs_m, offs_d, S, stride_qs, stride_qd, HEAD_DIM, BLOCK_D, True)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo, hi, full_lo, full_hi = _row_key_range(SUMMARY, b * stride_sb, n_strips, field_stride, m0, S, window,
                                                  CAUSAL, WINDOW, HAS_MASK, BLOCK_M, BLOCK_N)
        tri = 0
        if HAS_MASK:
            tri = _causal_strips(SUMMARY, b * stride_sb + 4 * field_stride, n_strips, m0 // 16, BLOCK_M // 16)
        # the blocks every row sees whole, then the partly visible ones before and after them in one loop (two
        # loops instead of three: on the H100, dQ with the HF mask 285 -> 251 us, dK/dV causal 433 -> 409 at
        # 4 x 2048; the forward unchanged). The branch on tri is outside the loop: inside it measured slower.
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, PAD, MASK, offs_m, full_lo, full_hi, full_hi, full_hi, S,
                                    window, stride_ks, stride_kd, stride_vs, stride_vd, stride_ps, stride_mq,
                                    stride_mk, qk_scale, softcap, mask_min, CAUSAL, WINDOW, SOFTCAP, HAS_PAD, HAS_MASK,
                                    MASK_BIAS, False, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
        if tri != 0:  # the causal mask: computed, not read (same code as the causal flag's)
            acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, PAD, MASK, offs_m, lo, hi, full_lo, full_hi, S, window,
                                        stride_ks, stride_kd, stride_vs, stride_vd, stride_ps, stride_mq, stride_mk,
                                        qk_scale, softcap, mask_min, True, False, SOFTCAP, HAS_PAD, False, False, True,
                                        HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
        else:
            acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, PAD, MASK, offs_m, lo, hi, full_lo, full_hi, S, window,
                                        stride_ks, stride_kd, stride_vs, stride_vd, stride_ps, stride_mq, stride_mk,
                                        qk_scale, softcap, mask_min, CAUSAL, WINDOW, SOFTCAP, HAS_PAD, HAS_MASK,
                                        MASK_BIAS, True, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
        empty = l_i == 0.0  # no visible key: out 0, lse +inf
        l_safe = tl.where(empty, 1.0, l_i)
        _store_tile(OUT, acc / l_safe[:, None], offs_m, offs_d, S, stride_os, stride_od, HEAD_DIM)
        lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + offs_m, lse, mask=offs_m < S)

    @triton.jit
    def _delta_kernel(OUT, DO, DELTA, H, S, stride_ob, stride_oh, stride_os, stride_od,
                      stride_db, stride_dh, stride_ds, stride_dd,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        """DELTA[b, h, i] = sum_d dO * O (fp32), the softmax backward's row term."""
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        o = _load_tile(OUT + b * stride_ob + h * stride_oh, offs_m, offs_d, S, stride_os, stride_od, HEAD_DIM,
                       BLOCK_D, True)
        do = _load_tile(DO + b * stride_db + h * stride_dh, offs_m, offs_d, S, stride_ds, stride_dd, HEAD_DIM,
                        BLOCK_D, True)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh.to(tl.int64) * S + offs_m, delta, mask=offs_m < S)

    @triton.jit
    def _dq_blocks(dq, q, do, lse2, delta, K, V, PAD, MASK, offs_m, start, end, skip_from, skip_to, S, window,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_ps, stride_mq, stride_mk, qk_scale, softcap,
                   mask_min,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_PAD: tl.constexpr,
                   HAS_MASK: tl.constexpr, MASK_BIAS: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        offs_d = tl.arange(0, BLOCK_D)
        for j in range(start, end - (skip_to - skip_from), BLOCK_N):
            n0 = _skipping(j, skip_from, skip_to, MASKED)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = _load_tile(K, offs_n, offs_d, S, stride_kn, stride_kd, HEAD_DIM, BLOCK_D, MASKED)
            v = _load_tile(V, offs_n, offs_d, S, stride_vn, stride_vd, HEAD_DIM, BLOCK_D, MASKED)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            s, dt = _scores(qk, qk_scale, softcap, SOFTCAP)
            if MASKED:
                if HAS_MASK:
                    s = _dense_mask(s, MASK, offs_m, offs_n, S, stride_mq, stride_mk, mask_min, MASK_BIAS)
                else:
                    s = _causal_window_mask(s, offs_m, offs_n, S, window, CAUSAL, WINDOW)
            if HAS_PAD:
                s = _key_padding_mask(s, PAD, offs_n, S, stride_ps)
            p = tl.exp2(s - lse2[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * dt
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        return dq

    @triton.jit
    def _dq_kernel(Q, K, V, PAD, MASK, SUMMARY, DO, LSE, DELTA, DQ,
                   stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                   stride_vb, stride_vh, stride_vs, stride_vd, stride_db, stride_dh, stride_ds, stride_dd,
                   stride_gb, stride_gh, stride_gs, stride_gd, stride_pb, stride_ps,
                   stride_mb, stride_mq, stride_mk, stride_sb, field_stride, n_strips,
                   H, S, GROUP, S_BUCKET, qk_scale, softcap, window, mask_min, scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                   SOFTCAP: tl.constexpr, HAS_PAD: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BIAS: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dQ for BLOCK_M query rows of one head (strides g*: of dQ, d*: of dO)."""
        m_block = tl.num_programs(0) - 1 - tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        kvh = (h // GROUP).to(tl.int64)
        h = h.to(tl.int64)
        K += b * stride_kb + kvh * stride_kh
        V += b * stride_vb + kvh * stride_vh
        PAD += b * stride_pb
        MASK += b * stride_mb
        m0 = m_block * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, S, stride_qs, stride_qd, HEAD_DIM,
                       BLOCK_D, True)
        do = _load_tile(DO + b * stride_db + h * stride_dh, offs_m, offs_d, S, stride_ds, stride_dd, HEAD_DIM,
                        BLOCK_D, True)
        row_ok = offs_m < S
        lse2 = tl.load(LSE + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo, hi, full_lo, full_hi = _row_key_range(SUMMARY, b * stride_sb, n_strips, field_stride, m0, S, window,
                                                  CAUSAL, WINDOW, HAS_MASK, BLOCK_M, BLOCK_N)
        tri = 0
        if HAS_MASK:
            tri = _causal_strips(SUMMARY, b * stride_sb + 4 * field_stride, n_strips, m0 // 16, BLOCK_M // 16)
        dq = _dq_blocks(dq, q, do, lse2, delta, K, V, PAD, MASK, offs_m, full_lo, full_hi, full_hi, full_hi, S,
                        window, stride_ks, stride_kd, stride_vs, stride_vd, stride_ps, stride_mq, stride_mk, qk_scale,
                        softcap, mask_min, CAUSAL, WINDOW, SOFTCAP, HAS_PAD, HAS_MASK, MASK_BIAS, False, HEAD_DIM,
                        BLOCK_D, BLOCK_N, PRECISION)
        if tri != 0:  # the causal mask: computed, not read
            dq = _dq_blocks(dq, q, do, lse2, delta, K, V, PAD, MASK, offs_m, lo, hi, full_lo, full_hi, S, window,
                            stride_ks, stride_kd, stride_vs, stride_vd, stride_ps, stride_mq, stride_mk, qk_scale,
                            softcap, mask_min, True, False, SOFTCAP, HAS_PAD, False, False, True, HEAD_DIM, BLOCK_D,
                            BLOCK_N, PRECISION)
        else:
            dq = _dq_blocks(dq, q, do, lse2, delta, K, V, PAD, MASK, offs_m, lo, hi, full_lo, full_hi, S, window,
                            stride_ks, stride_kd, stride_vs, stride_vd, stride_ps, stride_mq, stride_mk, qk_scale,
                            softcap, mask_min, CAUSAL, WINDOW, SOFTCAP, HAS_PAD, HAS_MASK, MASK_BIAS, True, HEAD_DIM,
                            BLOCK_D, BLOCK_N, PRECISION)
        _store_tile(DQ + b * stride_gb + h * stride_gh, dq * scale, offs_m, offs_d, S, stride_gs, stride_gd,
                    HEAD_DIM)

    @triton.jit
    def _dkdv_blocks(dk, dv, k, v, real, Q, DO, LSE, DELTA, MASK, offs_n, start, end, skip_from, skip_to, S, window,
                     stride_qm, stride_qd, stride_dm, stride_dd, stride_mq, stride_mk, qk_scale, softcap, mask_min,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_PAD: tl.constexpr,
                     HAS_MASK: tl.constexpr, MASK_BIAS: tl.constexpr, MASKED: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     PRECISION: tl.constexpr):
        """dK, dV of one key block over the query blocks [start, end) of one query head, in the transposed
        orientation ([keys, queries] tiles) so that no tile is transposed in registers."""
        offs_d = tl.arange(0, BLOCK_D)
        for j in range(start, end - (skip_to - skip_from), BLOCK_M):
            m0 = _skipping(j, skip_from, skip_to, MASKED)
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = _load_tile(Q, offs_m, offs_d, S, stride_qm, stride_qd, HEAD_DIM, BLOCK_D, MASKED)
            do = _load_tile(DO, offs_m, offs_d, S, stride_dm, stride_dd, HEAD_DIM, BLOCK_D, MASKED)
            if MASKED:  # rows past the end: lse +inf makes their P zero
                lse2 = tl.load(LSE + offs_m, mask=offs_m < S, other=float("inf")) * 1.4426950408889634
                delta = tl.load(DELTA + offs_m, mask=offs_m < S, other=0.0)
            else:
                lse2 = tl.load(LSE + offs_m) * 1.4426950408889634
                delta = tl.load(DELTA + offs_m)
            qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
            s_t, dt_t = _scores(qk_t, qk_scale, softcap, SOFTCAP)
            if HAS_PAD:  # P of a padded key is 0 (unmasked, exp(s - lse) could overflow: lse excludes it)
                s_t = tl.where(real[:, None], s_t, float("-inf"))
            if MASKED:
                ok = (offs_m[None, :] < S) & (offs_n[:, None] < S)
                if CAUSAL:
                    ok = ok & (offs_m[None, :] >= offs_n[:, None])
                if WINDOW:
                    ok = ok & (offs_n[:, None] > offs_m[None, :] - window)
                if HAS_MASK:
                    ptrs = MASK + offs_n.to(tl.int64)[:, None] * stride_mk + offs_m.to(tl.int64)[None, :] * stride_mq
                    if MASK_BIAS:
                        s_t = s_t + _bias(ptrs, ok, mask_min)
                    else:
                        ok = ok & (tl.load(ptrs, mask=ok, other=0) != 0)
                s_t = tl.where(ok, s_t, float("-inf"))
            p_t = tl.exp2(s_t - lse2[None, :])
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t = ds_t * dt_t
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _dkdv_kernel(Q, K, V, PAD, MASK, SUMMARY, DO, LSE, DELTA, DK, DV,
                     stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                     stride_vb, stride_vh, stride_vs, stride_vd, stride_db, stride_dh, stride_ds, stride_dd,
                     stride_kgb, stride_kgh, stride_kgs, stride_kgd, stride_vgb, stride_vgh, stride_vgs, stride_vgd,
                     stride_pb, stride_ps, stride_mb, stride_mq, stride_mk, stride_sb, field_stride, n_strips,
                     HKV, S, GROUP, S_BUCKET, qk_scale, softcap, window, mask_min, scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                     SOFTCAP: tl.constexpr, HAS_PAD: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BIAS: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dK, dV for BLOCK_N keys of one KV head, summed over the GROUP query heads that read it."""
        bh = tl.program_id(1)
        b = (bh // HKV).to(tl.int64)
        kvh = bh % HKV
        n0 = tl.program_id(0) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        kvh64 = kvh.to(tl.int64)
        k = _load_tile(K + b * stride_kb + kvh64 * stride_kh, offs_n, offs_d, S, stride_ks, stride_kd, HEAD_DIM,
                       BLOCK_D, True)
        v = _load_tile(V + b * stride_vb + kvh64 * stride_vh, offs_n, offs_d, S, stride_vs, stride_vd, HEAD_DIM,
                       BLOCK_D, True)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        tri = 0
        if HAS_MASK:  # fields 5..9 of the summary: the query tiles each key strip is seen by
            lo, hi, full_lo, full_hi = _mask_range(SUMMARY, b * stride_sb + 5 * field_stride, n_strips,
                                                   field_stride, n0 // 16, S, BLOCK_N, BLOCK_N // 16, BLOCK_M)
            tri = _causal_strips(SUMMARY, b * stride_sb + 9 * field_stride, n_strips, n0 // 16, BLOCK_N // 16)
        else:
            lo, hi, full_lo, full_hi = _query_range(n0, S, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
        MASK += b * stride_mb
        real = offs_n < S  # only read with HAS_PAD
        if HAS_PAD:
            real = tl.load(PAD + b * stride_pb + offs_n * stride_ps, mask=offs_n < S, other=0) != 0
        for g in range(0, GROUP):
            h = kvh * GROUP + g
            h64 = h.to(tl.int64)
            Qh = Q + b * stride_qb + h64 * stride_qh
            DOh = DO + b * stride_db + h64 * stride_dh
            row = (b * (HKV * GROUP) + h64) * S
            dk, dv = _dkdv_blocks(dk, dv, k, v, real, Qh, DOh, LSE + row, DELTA + row, MASK, offs_n, full_lo, full_hi,
                                  full_hi, full_hi, S, window, stride_qs, stride_qd, stride_ds, stride_dd, stride_mq,
                                  stride_mk, qk_scale, softcap, mask_min, CAUSAL, WINDOW, SOFTCAP, HAS_PAD, HAS_MASK,
                                  MASK_BIAS, False, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
            if tri != 0:  # the causal mask: computed, not read
                dk, dv = _dkdv_blocks(dk, dv, k, v, real, Qh, DOh, LSE + row, DELTA + row, MASK, offs_n, lo, hi,
                                      full_lo, full_hi, S, window, stride_qs, stride_qd, stride_ds, stride_dd,
                                      stride_mq, stride_mk, qk_scale, softcap, mask_min, True, False, SOFTCAP, HAS_PAD,
                                      False, False, True, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
            else:
                dk, dv = _dkdv_blocks(dk, dv, k, v, real, Qh, DOh, LSE + row, DELTA + row, MASK, offs_n, lo, hi,
                                      full_lo, full_hi, S, window, stride_qs, stride_qd, stride_ds, stride_dd,
                                      stride_mq, stride_mk, qk_scale, softcap, mask_min, CAUSAL, WINDOW, SOFTCAP,
                                      HAS_PAD, HAS_MASK, MASK_BIAS, True, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
        _store_tile(DK + b * stride_kgb + kvh64 * stride_kgh, dk * scale, offs_n, offs_d, S, stride_kgs, stride_kgd,
                    HEAD_DIM)
        _store_tile(DV + b * stride_vgb + kvh64 * stride_vgh, dv, offs_n, offs_d, S, stride_vgs, stride_vgd, HEAD_DIM)

    @triton.jit
    def _tile_count_kernel(MASK, COUNT, S, n_strips, stride_b, stride_r, stride_c, TILES: tl.constexpr):
        """COUNT[b, strip, t] = the visible pairs of the 16 x 16 tile (query rows strip, key columns t) of the mask
        plus 2^16 x the pairs where it is not the causal mask, for
        TILES tiles of one strip: every tile in parallel (one sequential walk per strip was ~19 us a launch at
        S 2048 on the H100, and grew with S^2 / the number of strips)."""
        b = tl.program_id(2).to(tl.int64)
        strip = tl.program_id(0)
        t0 = tl.program_id(1) * TILES
        rows = strip * 16 + tl.arange(0, 16)
        c = t0 * 16 + tl.arange(0, TILES * 16)
        ok = (rows[:, None] < S) & (c[None, :] < S)
        ptrs = MASK + b * stride_b + rows.to(tl.int64)[:, None] * stride_r + c.to(tl.int64)[None, :] * stride_c
        vis = tl.load(ptrs, mask=ok, other=0) != 0
        count = tl.sum(tl.sum(tl.reshape(vis.to(tl.int32), (16, TILES, 16)), 2), 0)  # [TILES]
        # pairs where the mask differs from the causal mask (j <= i): bit 16 up
        odd = ok & (vis != (c[None, :] <= rows[:, None]))
        odd = tl.sum(tl.sum(tl.reshape(odd.to(tl.int32), (16, TILES, 16)), 2), 0)
        t = t0 + tl.arange(0, TILES)
        tl.store(COUNT + (b * n_strips + strip) * n_strips + t, count + (odd << 16), mask=t < n_strips)

    @triton.jit
    def _summary_kernel(COUNT, OUT, S, n_strips, stride_r, stride_c, stride_ob, field_stride, CHUNK: tl.constexpr):
        """Fields 0-4 of _mask_summary for one strip of one batch entry from the tile counts, CHUNK tiles at a
        time, in order (the strip a row of COUNT and its tiles the columns, or the other way round via the
        strides: both orientations from one count grid)."""
        b = tl.program_id(1).to(tl.int64)
        strip = tl.program_id(0)
        base = COUNT + b * n_strips * n_strips + strip * stride_r
        rows_in = tl.minimum(S - strip * 16, 16)
        first = n_strips
        end = n_strips * 0
        full_first = n_strips
        full_end = n_strips
        tri = n_strips * 0 + 1
        for t0 in range(0, n_strips, CHUNK):
            t = t0 + tl.arange(0, CHUNK)
            inside = t < n_strips
            packed = tl.load(base + t * stride_c, mask=inside, other=0)
            count = packed & 0xFFFF
            tri = tl.minimum(tri, tl.min(tl.where(packed >> 16 == 0, 1, 0), 0))
            area = rows_in * tl.minimum(S - t * 16, 16)
            seen = (count > 0) & inside
            full = (count == area) & inside
            first = tl.minimum(first, tl.min(tl.where(seen, t, n_strips), 0))
            end = tl.maximum(end, tl.max(tl.where(seen, t + 1, 0), 0))
            full_first = tl.minimum(full_first, tl.min(tl.where(full, t, n_strips), 0))
            # the run of full tiles starting at the first full one ends at the first tile after it that is not
            # full (full_first only decreases within the chunk that sets it: earlier chunks lie before it)
            after = (t > full_first) & (~full) & inside
            full_end = tl.minimum(full_end, tl.min(tl.where(after, t, n_strips), 0))
        out = OUT + b * stride_ob + strip
        tl.store(out, first)
        tl.store(out + field_stride, end)
        tl.store(out + 2 * field_stride, full_first)
        tl.store(out + 3 * field_stride, full_end)
        tl.store(out + 4 * field_stride, tri)

    _INTERPRETED = interpreted(_fwd_kernel)

    def _configs(shapes):
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]

    # One list for head dims up to 128 and one with narrower tiles for wider heads (fp32 accumulators of
    # BLOCK x D per program). S is symbolic in a compiled graph and varies: tune on a power-of-two bucket of it.
    # The lists are short because every config is a compile (~1.5 s) in the model's first step. Sweeps of 5-11
    # configs each on three H100s (2026-11-27, D 64, the HF causal bool mask, B4 x S2048 and B1 x S8192; the
    # machines differ by up to 20% on one config, the rankings less): the forward is fastest with (128, 64, 4, 3)
    # (245 vs 257 us for (64, 64, 4, 3) at S 2048, 797 vs 894 at S 8192), dq with (64, 32, 4, 3) (253 vs 280 at
    # S 2048, 855 vs 953 at S 8192), dk/dv with (64, 64, 4, 3), in every sweep but one.
    _KEY = ["HEAD_DIM", "S_BUCKET", "GROUP", "CAUSAL", "WINDOW", "SOFTCAP", "HAS_PAD", "HAS_MASK", "MASK_BIAS"]
    _CONFIGS = {  # (kernel, wide head): [(BLOCK_M, BLOCK_N, num_warps, num_stages)]
        ("fwd", False): [(128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2)],
        ("dq", False): [(64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2)],
        ("dkdv", False): [(64, 64, 4, 3), (64, 128, 8, 3), (16, 64, 4, 2)],
        ("fwd", True): [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2)],
        ("dq", True): [(64, 32, 4, 2), (128, 32, 8, 2), (64, 32, 8, 2)],
        ("dkdv", True): [(32, 64, 8, 2), (16, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2)],
    }  # the last of each list is the config used with AUTOTUNE off (it fits at every head dim)
    _KERNELS = {"fwd": _fwd_kernel, "dq": _dq_kernel, "dkdv": _dkdv_kernel}

    def _smem_bytes(kernel, bm, bn, stages, block_d, elem) -> int:
        """Rough shared memory of a config: the tile a program keeps plus the tiles it streams per stage
        (fwd: q; k, v. dq: q, dO; k, v. dkdv: k, v; q, dO)."""
        kept, streamed = {"fwd": (bm, 2 * bn), "dq": (2 * bm, 2 * bn), "dkdv": (2 * bn, 2 * bm)}[kernel]
        return (kept + stages * streamed) * block_d * elem

    def _pruner(kernel):
        def prune(configs, nargs, **kwargs):
            """Drop the list's last config (the small one that fits anywhere) when a larger one fits this GPU's
            shared memory: one compile fewer in the first step. Of the head dims up to 128 keep only the first
            (the fastest at S 2048 and 8192 on the H100, see above), at every length: five compiles fewer in the
            first step at S 8192 (dense8k's cold first step 37.5 -> 32.3 s, `s15e-cold-dense8k-*`). There the
            autotuner had chosen a dQ config that ran 940 us per call in the kernel probe where the first ran 842
            (HF mask, 2026-11-28, `s15-attention-probe.txt`); the dense8k training step was the same either way
            (57,425 / 57,488 tokens/s, `s15d-dense8k-*`)."""
            q = nargs.get("Q")
            limit = shared_memory_limit(q)
            fits = [c for c in configs[:-1] if limit and _smem_bytes(
                kernel, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, kwargs["BLOCK_D"],
                q.element_size()) <= limit]
            if fits and kwargs["BLOCK_D"] <= 128:
                return fits[:1]
            return fits or configs
        return prune

    _TUNED = {} if _INTERPRETED else {
        key: triton.autotune(_configs(shapes), key=_KEY, prune_configs_by={"early_config_prune": _pruner(key[0])})(
            _KERNELS[key[0]]) for key, shapes in _CONFIGS.items()}


# The interpreter's fixed tiles (its cost is per tile: small ones, yet the tests' shapes span several blocks).
# Tests change them to exercise query and key blocks of different sizes.
INTERPRETER_TILES = {"fwd": dict(BLOCK_M=16, BLOCK_N=16), "dq": dict(BLOCK_M=16, BLOCK_N=16),
                     "dkdv": dict(BLOCK_M=16, BLOCK_N=16)}
# On CUDA each kernel is autotuned per key (a few seconds the first time one is seen). Tests that sweep many
# shapes turn this off and get one fixed config per kernel.
AUTOTUNE = True

_new_output = new_output  # tests poison this module's outputs through it


def _use_triton(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return use_triton(_INTERPRETED, q, k, v, family=__name__) and q.shape[-1] <= MAX_HEAD_DIM


def _num_blocks(n: int, block: int) -> int:
    """Programs along a sequence of n rows in tiles of block (tests shrink it to check unwritten rows fail)."""
    return triton.cdiv(n, block)


def _launch(name: str, grid, args, flags, device) -> None:
    wide = flags["BLOCK_D"] > 128
    if _INTERPRETED:
        fixed = INTERPRETER_TILES[name]
    else:
        bm, bn, w, st = _CONFIGS[(name, wide)][-1]
        fixed = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
    launch(_KERNELS[name], _TUNED.get((name, wide)) if AUTOTUNE else None, grid, args, flags, fixed, device)


def _check(q, k, v, scale, causal, window, softcap, key_padding, mask=None):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flash_attention: q, k, v must be [B, H, S, D]")
    B, Hq, S, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        raise ValueError(f"flash_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "must be [B, Hq, S, D], [B, Hkv, S, D], [B, Hkv, S, D]")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"flash_attention: {Hq} query heads are not a multiple of {k.shape[1]} kv heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError("flash_attention: q, k, v must share a dtype")
    if window < 0 or softcap < 0:
        raise ValueError("flash_attention: window and softcap must be >= 0 (0 = none)")
    if window > 0 and not causal:
        raise ValueError("flash_attention: a sliding window (i - window < j <= i) is causal: pass causal=True")
    if key_padding is not None and (key_padding.dtype != torch.bool or tuple(key_padding.shape) != (B, S)):
        raise ValueError(f"flash_attention: key_padding must be a bool [B, S] = [{B}, {S}] tensor")
    if mask is not None:
        if not (mask.dtype == torch.bool or mask.is_floating_point()) or mask.dim() != 4 \
                or mask.shape[0] not in (1, B) or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (S, S):
            raise ValueError(f"flash_attention: mask must be a bool (True = visible) or float (additive) [B or 1, 1, "
                             f"S, S] = [{B}, 1, {S}, {S}] tensor, got {mask.dtype} {tuple(mask.shape)}")
        if causal or window or key_padding is not None:
            raise ValueError("flash_attention: a mask is the whole mask: pass causal=False, window=0 and no "
                             "key_padding with it")


def _empty_bshd(like: Tensor, heads: int) -> Tensor:
    """A [B, heads, S, D] view of a [B, S, heads, D] buffer: the layout the kernels write."""
    B, _, S, D = like.shape
    return _new_output((B, S, heads, D), like.dtype, like.device).transpose(1, 2)


def _fake_bshd(like: Tensor, heads: int) -> Tensor:
    B, _, S, D = like.shape
    return like.new_empty((B, S, heads, D)).transpose(1, 2)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)  # fp32; float64 for float64 inputs (the torch math)


def _strides(t: Tensor) -> tuple:
    return tuple(t.stride())


def _pad_args(key_padding: Optional[Tensor], fallback: Tensor):
    """(tensor, stride_b, stride_s) of the padding mask as uint8 (a view: same bytes as bool)."""
    if key_padding is None:
        return fallback, 0, 0
    pad = key_padding.view(torch.uint8)
    return pad, pad.stride(0), pad.stride(1)


def _summarise(mask: Tensor) -> Tensor:
    """_mask_summary by two Triton kernels: the visible pairs of every 16 x 16 tile (all tiles in parallel, the
    mask read once), then the four fields of every query strip and every key strip from those counts (the
    reference's dozen small torch ops took 0.43 ms per call at S = 2048 on the H100)."""
    Bm, _, S, _ = mask.shape
    T = triton.cdiv(S, 16)
    m = mask.view(torch.uint8)
    count = torch.empty((Bm, T, T), dtype=torch.int32, device=mask.device)
    tiles = 4 if _INTERPRETED else 16
    launch(_tile_count_kernel, None, lambda _: (T, triton.cdiv(T, tiles), Bm),
           (m, count, S, T, m.stride(0), m.stride(2), m.stride(3)), dict(TILES=tiles), {}, mask.device)
    out = torch.empty((10, Bm, T), dtype=torch.int32, device=mask.device)
    chunk = 16 if _INTERPRETED else min(max(16, triton.next_power_of_2(T)), 1024)
    for first, (sr, sc) in ((0, (T, 1)), (5, (1, T))):
        launch(_summary_kernel, None, lambda _: (T, Bm), (count, out[first:], S, T, sr, sc, T, Bm * T),
               dict(CHUNK=chunk), {}, mask.device)
    return out


def _mask_summary(mask: Tensor) -> Tensor:
    """int32 [10, Bm, T] (T = ceil(S / 16)) describing a bool [Bm, 1, S, S] mask in strips of 16: fields 0-4 per
    query strip over key tiles of 16, fields 5-9 per key strip over query tiles: the first tile with a visible
    pair, one past the last, the first tile fully visible, the end of the run of fully visible tiles that
    starts there, and 1 if the whole strip is the causal mask's (j visible from i iff j <= i), else 0. The
    kernels visit only tiles inside [first, end), read the mask only outside the full run (where every row of
    their block sees every key of the block) and not even there on causal strips (the mask computed instead),
    so a causal, sliding-window or padded mask costs what the kernel's own causal / window / padding bounds
    cost, and any other mask stays exact."""
    Bm, _, S, _ = mask.shape
    T = triton.cdiv(S, 16)
    tiles = mask.new_zeros((Bm, T * 16, T * 16))
    tiles[:, :S, :S] = mask[:, 0]
    count = tiles.view(Bm, T, 16, T, 16).sum((2, 4), dtype=torch.int32)  # [Bm, query tile, key tile]
    # a tile is full when every pair inside the sequence is visible (positions past its end do not count: the
    # kernels keep the ragged last block out of the unmasked range themselves)
    inside = (S - torch.arange(T, device=mask.device, dtype=torch.int32) * 16).clamp(max=16)
    seen = count > 0
    full = count == inside[:, None] * inside[None, :]
    idx = torch.arange(T, device=mask.device, dtype=torch.int32)
    pos = torch.arange(S, device=mask.device)
    odd = mask.new_zeros((Bm, T * 16, T * 16))
    odd[:, :S, :S] = mask[:, 0] != (pos[None, :] <= pos[:, None])
    tri = odd.view(Bm, T, 16, T, 16).sum((2, 4)) == 0  # [Bm, query tile, key tile]: the tile is causal

    def runs(seen, full, tri):
        first = torch.where(seen, idx, T).amin(-1)
        end = torch.where(seen, idx + 1, 0).amax(-1)
        full_first = torch.where(full, idx, T).amin(-1)
        full_end = torch.where(~full & (idx >= full_first[..., None]), idx, T).amin(-1)
        return [first, end, full_first, full_end, tri.all(-1)]

    fields = runs(seen, full, tri) + runs(seen.transpose(1, 2), full.transpose(1, 2), tri.transpose(1, 2))
    return torch.stack(fields).to(torch.int32).contiguous()


def _mask_args(mask: Optional[Tensor], fallback: Tensor, summary: Optional[Tensor] = None):
    """(mask as uint8, summary, (the mask's batch / query / key strides, the summary's batch stride, field
    stride, strips)): the kernels' MASK, SUMMARY and stride arguments. `summary`: the forward's (the backward
    reuses it instead of reading the mask twice more)."""
    if mask is None:
        return fallback, fallback, (0,) * 6
    mask = _one_mask(mask)
    if summary is not None:
        m = mask if mask.is_floating_point() else mask.view(torch.uint8)
    elif mask.is_floating_point():
        # an additive mask: a tile is visited where any value is above the dtype's minimum (HF's masked value)
        # and needs no mask read where every value is 0 (fields 2, 3, 7, 8 of that summary); its values are added,
        # so it is always read (never taken as the causal mask: fields 4, 9 are 0)
        seen, zero = _summarise(_additive_visible(mask)), _summarise(mask == 0)
        never = torch.zeros_like(seen[4])
        summary = torch.stack([seen[0], seen[1], zero[2], zero[3], never, seen[5], seen[6], zero[7], zero[8], never])
        m = mask
    else:
        summary = _summarise(mask)
        m = mask.view(torch.uint8)
    # T from the mask: the forward's summary output is wider than its T columns (_summary_shape)
    Bm, T = summary.shape[1], triton.cdiv(mask.shape[2], 16)
    return m, summary, (m.stride(0) if Bm > 1 else 0, m.stride(2), m.stride(3), summary.stride(1) if Bm > 1 else 0,
                        summary.stride(0), T)


def _one_mask(mask: Tensor) -> Tensor:
    """One mask expanded over the batch (stride 0) as its single entry: summarised and read once."""
    return mask[:1] if mask.shape[0] > 1 and mask.stride(0) == 0 else mask


def _summary_shape(mask: Optional[Tensor], S) -> tuple:
    """The shape of the forward's mask summary output: [10, Bm, S] (its first ceil(S / 16) columns hold the
    summary), or [0] without a mask. Not [10, Bm, ceil(S / 16)]: with the sequence length dynamic, a size
    ceil(S / 16) makes Dynamo guard on it being 1 or not (a contiguity check of the fake output), so a packed batch
    of at most 16 tokens recompiled a graph compiled for longer ones; S itself is already assumed >= 2."""
    return (0,) if mask is None else (10, _one_mask(mask).shape[0], S)


def _summary_output(summary: Tensor, S: int) -> Tensor:
    """The [10, Bm, T] summary in the op's [10, Bm, S] output (columns past T unused)."""
    out = summary.new_zeros((10, summary.shape[1], S))
    out[..., :summary.shape[2]] = summary
    return out


def _flags(q, causal, window, softcap, key_padding, mask=None) -> dict:
    D = q.shape[-1]
    return dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=bool(causal), WINDOW=window > 0,
                SOFTCAP=softcap > 0, HAS_PAD=key_padding is not None, HAS_MASK=mask is not None,
                MASK_BIAS=mask is not None and mask.is_floating_point(),
                PRECISION=_fp32_precision(q) if q.dtype == torch.float32 else "tf32")


def _fp32_precision(q: Tensor) -> str:
    """fp32 attention (the QLoRA recipe's: prepare_model_for_kbit_training keeps the residual stream in fp32).
    On CUDA, "tf32x3": each fp32 operand split into tf32 big + small, three tensor-core products (big*big,
    big*small, small*big), ~fp32 accuracy (the dropped small*small term is ~2^-22 relative) at tensor-core
    speed; plain tf32 (10-bit mantissa) would not be fp32 attention any more, and "ieee" runs on CUDA cores
    (SDPA's fp32 kernels do too). The interpreter takes exact fp32 products."""
    return "tf32x3" if q.is_cuda else "ieee"


def _mask_min(mask: Optional[Tensor]) -> float:
    """The value at or below which an additive mask hides a key: its dtype's minimum, what HF's eager masks
    put there (the kernels read -inf too)."""
    return float(torch.finfo(mask.dtype).min) if mask is not None and mask.is_floating_point() else 0.0


def _additive_visible(mask: Tensor) -> Tensor:
    """Bool: which keys an additive mask lets a query see (values above _mask_min)."""
    return mask > _mask_min(mask)


def _score_scales(scale, softcap):
    """(qk_scale, softcap) as the kernels take them: scores in log2 units (exp2 instead of exp)."""
    if softcap > 0:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 0.0


def _window(window: int, s_len: int) -> int:
    return 0 if window >= s_len else window  # a window covering every earlier key is no window


# ---------------------------------------------------------------------------------------------------------------
# torch math (CPU without the interpreter, float64, D > MAX_HEAD_DIM): the kernels' formulas on whole [S, S] tiles,
# grouped heads by broadcasting (no repeated K/V)
# ---------------------------------------------------------------------------------------------------------------

def _visible(s_len: int, causal: bool, window: int, key_padding: Optional[Tensor], device,
             dense: Optional[Tensor] = None) -> Optional[Tensor]:
    """Bool [B or 1, S, S] (query i, key j): which keys each query sees; None when all are seen."""
    if dense is not None:
        return dense[:, 0]
    mask = None
    if causal:
        i = torch.arange(s_len, device=device)[:, None]
        j = torch.arange(s_len, device=device)[None, :]
        mask = j <= i
        if window > 0:
            mask = mask & (j > i - window)
        mask = mask[None]
    if key_padding is not None:
        real = key_padding[:, None, :]
        mask = real if mask is None else mask & real
    return mask


def _split_mask(mask: Optional[Tensor]):
    """(bool mask, additive bias or None): a float mask is an additive bias whose values at or below its
    dtype's minimum (HF's masked value) hide the key; a bool mask is returned as it is, without a bias."""
    if mask is None or not mask.is_floating_point():
        return mask, None
    visible = _additive_visible(mask)
    return visible, mask.masked_fill(~visible, 0.0)


def _torch_probs(q, k, scale, causal, window, softcap, key_padding, mask=None, lse=None):
    """(P or the masked scores, the softcap's derivative, acc dtype, grouped q, grouped k): with lse,
    P = exp(s - lse); without, the masked scores s [B, Hkv, G, S, S]."""
    B, Hq, S, D = q.shape
    hkv = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.unflatten(1, (hkv, Hq // hkv)).to(acc)
    kg = k.unsqueeze(2).to(acc)
    s = (qg @ kg.transpose(-1, -2)) * scale
    dt = None
    if softcap > 0:
        u = s / softcap
        dt = torch.cosh(u).pow(-2)  # 1 - tanh^2 without its cancellation where tanh saturates
        s = softcap * torch.tanh(u)
    mask, bias = _split_mask(mask)
    if bias is not None:
        s = s + bias[:, None].to(acc)
    visible = _visible(S, causal, window, key_padding, q.device, mask)
    if visible is not None:
        s = s.masked_fill(~visible[:, None, None], float("-inf"))
    if lse is not None:
        s = torch.exp(s - lse.unflatten(1, (hkv, Hq // hkv))[..., None].to(acc))
    return s, dt, acc, qg, kg


def _torch_forward(q, k, v, scale, causal, window, softcap, key_padding, mask):
    s, _, acc, _, _ = _torch_probs(q, k, scale, causal, window, softcap, key_padding, mask)
    lse = torch.logsumexp(s, -1)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))  # no visible key: P = exp(s - inf) = 0
    out = torch.exp(s - lse[..., None]) @ v.unsqueeze(2).to(acc)
    return out.flatten(1, 2), lse.flatten(1, 2)


def _torch_backward(dout, q, k, v, out, lse, scale, causal, window, softcap, key_padding, mask):
    p, dt, acc, qg, kg = _torch_probs(q, k, scale, causal, window, softcap, key_padding, mask, lse)
    hkv = k.shape[1]
    dog = dout.unflatten(1, (hkv, -1)).to(acc)
    og = out.unflatten(1, (hkv, -1)).to(acc)
    vg = v.unsqueeze(2).to(acc)
    dv = (p.transpose(-1, -2) @ dog).sum(2)
    ds = p * (dog @ vg.transpose(-1, -2) - (dog * og).sum(-1, keepdim=True))
    if dt is not None:
        ds = ds * dt
    dq = (ds @ kg).flatten(1, 2) * scale
    dk = (ds.transpose(-1, -2) @ qg).sum(2) * scale
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("fxopt::flash_attention", mutates_args=())
@with_fallback
def flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, window: int, softcap: float,
                    key_padding: Optional[Tensor] = None,
                    mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(out [B, Hq, S, D] in q's dtype, lse [B, Hq, S] fp32 (float64 for float64 inputs), the mask's summary
    (int32 [10, Bm, S], the [10, Bm, ceil(S / 16)] of _mask_summary in its first columns; [0] without a mask));
    lse and the summary are returned only to be saved for backward (lse +inf for a row that sees no key): the
    backward's two kernels then need no summary of their own (at S = 2048 each summary read the mask twice,
    ~19 us a launch on the H100)."""
    _check(q, k, v, scale, causal, window, softcap, key_padding, mask)
    B, Hq, S, D = q.shape
    window = _window(window, S)
    out = _empty_bshd(q, Hq)
    lse = _new_output((B, Hq, S), _lse_dtype(q), q.device)
    if not _use_triton(q, k, v) or B * Hq * S * D == 0:
        if B * Hq * S * D:
            o, lse_t = _torch_forward(q, k, v, scale, causal, window, softcap, key_padding, mask)
            out.copy_(o)
            lse.copy_(lse_t)
        # the torch math needs no summary: zeros of its shape (the backward takes the same path and ignores it)
        return out, lse, q.new_zeros(_summary_shape(mask, S), dtype=torch.int32)
    pad, spb, sps = _pad_args(key_padding, lse)
    m, summary, mask_strides = _mask_args(mask, lse)
    qk_scale, sc = _score_scales(scale, softcap)
    args = (q, k, v, pad, m, summary, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out), spb, sps,
            *mask_strides, Hq, S, Hq // k.shape[1], min(triton.next_power_of_2(S), 16384), float(qk_scale), float(sc),
            int(window), _mask_min(mask))

    def grid(meta):
        return (_num_blocks(S, meta["BLOCK_M"]), B * Hq)

    _launch("fwd", grid, args, _flags(q, causal, window, softcap, key_padding, mask), q.device)
    if mask is None:
        return out, lse, q.new_zeros(_summary_shape(None, S), dtype=torch.int32)
    return out, lse, _summary_output(summary, S)


@flash_attention.register_fake
def _(q, k, v, scale, causal, window, softcap, key_padding=None, mask=None):
    _check(q, k, v, scale, causal, window, softcap, key_padding, mask)
    B, Hq, S, D = q.shape
    return _fake_bshd(q, Hq), q.new_empty((B, Hq, S), dtype=_lse_dtype(q)), q.new_empty(
        _summary_shape(mask, S), dtype=torch.int32)


@torch.library.custom_op("fxopt::flash_attention_backward", mutates_args=())
@with_fallback
def flash_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             scale: float, causal: bool, window: int, softcap: float,
                             key_padding: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                             summary: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the forward's out, lse and mask summary (None: summarised here); dk and dv summed over
    each kv head's query heads."""
    B, Hq, S, D = q.shape
    hkv = k.shape[1]
    window = _window(window, S)
    dq, dk, dv = _empty_bshd(q, Hq), _empty_bshd(k, hkv), _empty_bshd(v, hkv)
    if not _use_triton(q, k, v):
        for buf, val in zip((dq, dk, dv),
                            _torch_backward(grad_out, q, k, v, out, lse, scale, causal, window, softcap,
                                            key_padding, mask)):
            buf.copy_(val)
        return dq, dk, dv
    if B * Hq * S * D == 0:
        return dq, dk, dv
    flags = _flags(q, causal, window, softcap, key_padding, mask)
    delta = _new_output((B, Hq, S), torch.float32, q.device)
    # a [rows, BLOCK_D] tile of O and of dO in registers: fewer rows for wide heads
    block = 16 if _INTERPRETED else max(16, min(64, 8192 // flags["BLOCK_D"]))
    launch(_delta_kernel, None, lambda _: (_num_blocks(S, block), B * Hq),
           (out, grad_out, delta, Hq, S, *_strides(out), *_strides(grad_out)),
           dict(HEAD_DIM=D, BLOCK_D=flags["BLOCK_D"], BLOCK_M=block), {}, q.device)
    pad, spb, sps = _pad_args(key_padding, lse)
    m, summary, mask_strides = _mask_args(mask, lse, summary)
    qk_scale, sc = _score_scales(scale, softcap)
    common = (Hq // hkv, min(triton.next_power_of_2(S), 16384), float(qk_scale), float(sc), int(window),
              _mask_min(mask), float(scale))

    def q_grid(meta):
        return (_num_blocks(S, meta["BLOCK_M"]), B * Hq)

    def k_grid(meta):
        return (_num_blocks(S, meta["BLOCK_N"]), B * hkv)

    _launch("dq", q_grid, (q, k, v, pad, m, summary, grad_out, lse, delta, dq, *_strides(q), *_strides(k),
                           *_strides(v), *_strides(grad_out), *_strides(dq), spb, sps, *mask_strides, Hq, S, *common),
            flags, q.device)
    _launch("dkdv", k_grid, (q, k, v, pad, m, summary, grad_out, lse, delta, dk, dv, *_strides(q), *_strides(k),
                             *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv), spb, sps, *mask_strides,
                             hkv, S, *common), flags, q.device)
    return dq, dk, dv


@flash_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, scale, causal, window, softcap, key_padding=None, mask=None, summary=None):
    return _fake_bshd(q, q.shape[1]), _fake_bshd(k, k.shape[1]), _fake_bshd(v, v.shape[1])


def _setup_context(ctx, inputs, output):
    q, k, v, scale, causal, window, softcap, key_padding, mask = inputs
    out, lse, summary = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding, mask, summary)
    ctx.args = (scale, causal, window, softcap)
    ctx.mark_non_differentiable(lse, summary)


def _backward(ctx, grad_out, grad_lse, grad_summary):
    q, k, v, out, lse, key_padding, mask, summary = ctx.saved_tensors
    need = ctx.needs_input_grad  # (q, k, v, scale, causal, window, softcap, key_padding, mask)
    if not any(need[:3]):
        return (None,) * 9
    if grad_out is None:  # out unused downstream
        grad_out = torch.zeros_like(out)
    dq, dk, dv = flash_attention_backward(grad_out, q, k, v, out, lse, *ctx.args, key_padding, mask, summary)
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None) + (None,) * 6


flash_attention.register_autograd(_backward, setup_context=_setup_context)


def reference(q, k, v, scale, causal=False, window=0, softcap=0.0, key_padding=None, mask=None) -> Tensor:
    """The op's math in plain PyTorch (differentiable): repeated K/V heads, an explicit [S, S] mask, softmax in
    promote(dtype, fp32); rows that see no key give 0 (and zero gradients)."""
    g = q.shape[1] // k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    k = k.repeat_interleave(g, 1).to(acc)
    v = v.repeat_interleave(g, 1).to(acc)
    s = (q.to(acc) @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    mask, bias = _split_mask(mask)
    if bias is not None:
        s = s + bias.to(acc)
    mask = _visible(q.shape[2], causal, window, key_padding, q.device, mask)
    if mask is None:
        return (torch.softmax(s, -1) @ v).to(q.dtype)
    mask = mask[:, None]
    empty = ~mask.any(-1, keepdim=True)
    # an empty row's scores are set finite (softmax of all -inf is NaN, and so would its gradient be), its
    # probabilities then zeroed
    s = s.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    p = torch.softmax(s, -1).masked_fill(empty, 0.0)
    return (p @ v).to(q.dtype)


def flash_attention_fn(q, k, v, scale=None, causal=False, window=0, softcap=0.0, key_padding=None,
                       mask=None) -> Tensor:
    """Call the op: returns out [B, Hq, S, D]. scale defaults to D ** -0.5."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.fxopt.flash_attention(q, k, v, float(scale), bool(causal), int(window), float(softcap),
                                           key_padding, mask)[0]
