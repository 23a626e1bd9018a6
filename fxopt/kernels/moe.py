"""fxopt::moe_experts: the experts of a top-k mixture-of-experts block (3D expert weights), forward and backward.

    y_t = sum_j w_tj * D_e @ (act(G_e @ x_t) * (U_e @ x_t)),     e = topk_ids[t, j],  j < k

with gate_up [E, 2I, H] = [G_e; U_e] stacked per expert (the gate is the first I rows, as `chunk(2, -1)` of
the projection splits it), down D [E, H, I], act one of silu, gelu (erf) and gelu_tanh. This is the math
and the layout of the grouped experts in Hugging Face transformers 5.x: x is cast to the weights' dtype, the
routing weight multiplies the down projection's output in the dtype both promote to, the k slots of a token
are summed in that dtype (fp32 accumulation) and the sum is cast back to x's dtype.

Forward. The S = T*k (token, slot) pairs are sorted by expert once, on the device (a stable sort of the
expert ids and `searchsorted` for the per-expert row offsets: no host sync, no loop over experts). Then
  1. a grouped GEMM reads the rows of x by token (gathered in the kernel, never copied), multiplies them by
     both halves of its expert's gate_up and stores h = act(gate) * up [S, I] (the epilogue fuses the
     activation: the [S, 2I] projection is never written);
  2. a grouped GEMM h @ D_e^T multiplies each row by its routing weight in the epilogue and stores it at the
     row's (token, slot) position of a [T*k, H] buffer; y is that buffer summed over k (a deterministic
     reduction: no atomics).
Both kernels are persistent and tile-scheduled: each program computes, from the per-expert offsets in device
memory, how many row tiles each expert has, and walks the (expert, row tile, column tile) list; an expert
with no tokens has no tiles and costs nothing.

Backward (its own custom op). Saved for it: only the inputs (x, ids, weights, gate_up, down); the sort is
redone (an argsort of S ints). Neither the [S, 2I] projection nor h [S, I] is kept: the projection is
recomputed, fused with the backward of the activation. That costs one extra GEMM (2*S*H*2I flops, +22% on
the 18*S*H*I of a forward+backward that trains the experts) and keeps 3*S*I fewer elements alive per layer
until its backward (288 MiB per layer at 8192 tokens, k=8, I=768 in bf16; the autograd graph of the torch
grouped_mm path keeps S*(2H + 3I): gathered x, projection, h and the down output, 800 MiB there).
  3. one kernel computes, per row tile and column tile of I, with one pass over H, three accumulators:
     gate and up (recomputed from x) and q = dy_t @ D_e. Its epilogue forms h = act(gate) * up, the routing
     weight's gradient partials sum_i q*h (one per column tile, summed after: deterministic), and
     dgate = w q up act'(gate), dup = w q act(gate) [S, 2I], and w*h [S, I] for dD.
     From hidden size ROWS_GEMM_RECOMPUTE_MIN_H (2048) on, the projection is instead recomputed by the rows GEMM
     into a buffer freed when the backward ends, and q by another rows GEMM; the epilogue then runs as an
     elementwise pass over whole rows (the same path as a projection kept by the forward, see
     moe_experts_saving / OptimizeConfig.moe_keep_projection).
  4. dD_e = sum_rows dy_t^T (w h) and dGU_e = sum_rows [dgate, dup]^T x_t: grouped "weight-gradient" GEMMs
     (one tile grid over the expert's fixed output, the reduction runs over the expert's rows).
  5. dx: [dgate, dup] @ GU_e into the (token, slot) buffer, summed over k.
GEMMs for a gradient nobody asked for are skipped (frozen experts: no step 4; no dx: no step 5).

On CUDA the op launches the Triton kernels. On CPU it runs the same steps with torch math (a loop over the
experts there), except when the kernels are interpreted (TRITON_INTERPRET=1 set before import), where the
Triton code runs in Triton's interpreter: that is how CI tests the kernels without a GPU.
Expert ids must lie in [0, E) (expert-parallel sentinels are not supported).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): every call runs the torch math
    triton = None

from fxopt.kernels.common import (ACTIVATIONS, interpreted, launch, new_output, shared_memory_limit, sm_count,
                                  use_triton, with_fallback)
from fxopt.kernels.common import act_and_grad as _act  # noqa: F401  (the kernels call it)
from fxopt.kernels.common import act_and_grad_torch as _act_torch
from fxopt.kernels.common import act_reference as _act_ref
_INTERPRETED = False

if triton is not None:

    @triton.jit
    def _expert_tiles(OFFS, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
        """Per expert: its rows [lo, hi) of the sorted pairs, its count of BLOCK_M row tiles, and the running
        end of those counts. Read from device memory by every program: the host never sees the counts."""
        eids = tl.arange(0, BLOCK_E)
        lo = tl.load(OFFS + eids, mask=eids < E, other=0)
        hi = tl.load(OFFS + eids + 1, mask=eids < E, other=0)
        tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
        ends = tl.cumsum(tiles, 0)
        return eids, lo, hi, tiles, ends

    @triton.jit
    def _locate(row_tile, eids, lo, hi, tiles, ends, BLOCK_M: tl.constexpr):
        """Which expert a global row tile belongs to, and the rows it covers: [row0, row0 + BLOCK_M) clipped to
        the expert's end. A vector compare over the experts, no search loop."""
        e = tl.sum((ends <= row_tile).to(tl.int32), 0)
        sel = eids == e
        first = tl.sum(tl.where(sel, ends - tiles, 0), 0)
        row0 = tl.sum(tl.where(sel, lo, 0), 0) + (row_tile - first) * BLOCK_M
        row_end = tl.sum(tl.where(sel, hi, 0), 0)
        return e, row0, row_end

    @triton.jit
    def _rows_kernel(
        A, W, OUT, PERM, WTS, OFFS, GU_OUT,
        E, N, K, TOPK, S_BUCKET,
        stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_om, stride_on, stride_gum,
        GATHER_A: tl.constexpr, SCATTER_OUT: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
        HAS_SCALE: tl.constexpr, SAVE_GU: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        """For each expert e and each of its sorted rows r (OFFS[e] <= r < OFFS[e+1]):
             OUT[o(r), :N] = scale(r) * epi(A[a(r), :K] @ W[e][:K, :N])
        a(r) = PERM[r] // TOPK (the token) if GATHER_A else r; o(r) = PERM[r] (the slot) if SCATTER_OUT else r;
        GATED: epi(v) = act(v) * (A[a(r)] @ W[e][:, N:2N]) (gate columns first, up after), else identity;
        scale(r) = WTS[PERM[r]] if HAS_SCALE. W[e] is read through strides as [K, N]; fp32 accumulation.
        SAVE_GU (gated): also GU_OUT[r, :N] = gate, GU_OUT[r, N:] = up, before the activation (saved for the
        backward instead of recomputed)."""
        eids, lo, hi, tiles, ends = _expert_tiles(OFFS, E, BLOCK_M, BLOCK_E)
        n_col = tl.cdiv(N, BLOCK_N)
        total = tl.sum(tiles, 0) * n_col
        rk = tl.arange(0, BLOCK_K)
        for tile in range(tl.program_id(0), total, tl.num_programs(0)):
            # consecutive tiles share a row tile (its A rows stay in L2 across the columns)
            row_tile = tile // n_col
            pid_n = tile % n_col
            e, row0, row_end = _locate(row_tile, eids, lo, hi, tiles, ends, BLOCK_M)
            rows = row0 + tl.arange(0, BLOCK_M)
            # Rows past the expert's end load its last row (unmasked loads) and are dropped at the store;
            # the same for columns past N (modulo).
            slot = tl.load(PERM + tl.minimum(rows, row_end - 1)).to(tl.int64)
            if GATHER_A:
                a_rows = slot // TOPK
            else:
                a_rows = tl.minimum(rows, row_end - 1).to(tl.int64)
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            cols_ld = (cols % N).to(tl.int64)
            a_ptrs = A + a_rows[:, None] * stride_am + rk[None, :] * stride_ak
            w_ptrs = W + e.to(tl.int64) * stride_we + rk[:, None] * stride_wk + cols_ld[None, :] * stride_wn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, tl.cdiv(K, BLOCK_K)):
                k_left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0).to(W.dtype.element_ty)
                b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                if GATED:
                    bu = tl.load(w_ptrs + N * stride_wn, mask=rk[:, None] < k_left, other=0.0)
                    acc_up = tl.dot(a, bu, acc_up, input_precision=PRECISION)
                a_ptrs += BLOCK_K * stride_ak
                w_ptrs += BLOCK_K * stride_wk
            if GATED:
                if SAVE_GU:
                    gu_ptrs = GU_OUT + rows.to(tl.int64)[:, None] * stride_gum + cols[None, :]
                    gu_mask = (rows < row_end)[:, None] & (cols < N)[None, :]
                    tl.store(gu_ptrs, acc.to(GU_OUT.dtype.element_ty), mask=gu_mask)
                    tl.store(gu_ptrs + N, acc_up.to(GU_OUT.dtype.element_ty), mask=gu_mask)
                act, _ = _act(acc, ACT)
                acc = act * acc_up
            if HAS_SCALE:
                acc = acc * tl.load(WTS + slot).to(tl.float32)[:, None]
            if SCATTER_OUT:
                o_rows = slot
            else:
                o_rows = rows.to(tl.int64)
            mask = (rows < row_end)[:, None] & (cols < N)[None, :]
            tl.store(OUT + o_rows[:, None] * stride_om + cols[None, :] * stride_on,
                     acc.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_act_kernel(
        X, DY, GU, D, PERM, WTS, DGU, HW, DWP, OFFS,
        E, I, H, TOPK, S_BUCKET,
        stride_xm, stride_xk, stride_dym, stride_dyk, stride_ge, stride_gk, stride_gn,
        stride_de, stride_dk, stride_dn, stride_dgum, stride_dgun, stride_hwm, stride_hwn, stride_dwpm,
        ACT: tl.constexpr, NEED_Q: tl.constexpr, STORE_DGU: tl.constexpr, STORE_HW: tl.constexpr,
        STORE_DW: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        """Per sorted row r (token t = PERM[r] // TOPK, weight w = WTS[PERM[r]]) and column tile of I, one pass
        over H with three accumulators: gate = x_t @ GU[e][:, c], up = x_t @ GU[e][:, I + c] (GU[e] read as
        [H, 2I]) and q = dy_t @ D[e][:, c] (D[e] read as [H, I]). Epilogue, with h = act(gate) * up:
          DWP[PERM[r], pid_n] = sum_c q * h                (partial d w, summed over column tiles after)
          DGU[r, c] = w q up act'(gate), DGU[r, I + c] = w q act(gate)
          HW[r, c] = w h"""
        eids, lo, hi, tiles, ends = _expert_tiles(OFFS, E, BLOCK_M, BLOCK_E)
        n_col = tl.cdiv(I, BLOCK_N)
        total = tl.sum(tiles, 0) * n_col
        rk = tl.arange(0, BLOCK_K)
        for tile in range(tl.program_id(0), total, tl.num_programs(0)):
            row_tile = tile // n_col
            pid_n = tile % n_col
            e, row0, row_end = _locate(row_tile, eids, lo, hi, tiles, ends, BLOCK_M)
            rows = row0 + tl.arange(0, BLOCK_M)
            slot = tl.load(PERM + tl.minimum(rows, row_end - 1)).to(tl.int64)
            tok = slot // TOPK
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            cols_ld = (cols % I).to(tl.int64)
            e64 = e.to(tl.int64)
            x_ptrs = X + tok[:, None] * stride_xm + rk[None, :] * stride_xk
            dy_ptrs = DY + tok[:, None] * stride_dym + rk[None, :] * stride_dyk
            g_ptrs = GU + e64 * stride_ge + rk[:, None] * stride_gk + cols_ld[None, :] * stride_gn
            d_ptrs = D + e64 * stride_de + rk[:, None] * stride_dk + cols_ld[None, :] * stride_dn
            gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            q = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, tl.cdiv(H, BLOCK_K)):
                k_left = H - k * BLOCK_K
                kmask_a = rk[None, :] < k_left
                kmask_b = rk[:, None] < k_left
                xa = tl.load(x_ptrs, mask=kmask_a, other=0.0).to(GU.dtype.element_ty)
                gate = tl.dot(xa, tl.load(g_ptrs, mask=kmask_b, other=0.0), gate, input_precision=PRECISION)
                up = tl.dot(xa, tl.load(g_ptrs + I * stride_gn, mask=kmask_b, other=0.0), up,
                            input_precision=PRECISION)
                if NEED_Q:
                    dya = tl.load(dy_ptrs, mask=kmask_a, other=0.0).to(D.dtype.element_ty)
                    q = tl.dot(dya, tl.load(d_ptrs, mask=kmask_b, other=0.0), q, input_precision=PRECISION)
                x_ptrs += BLOCK_K * stride_xk
                dy_ptrs += BLOCK_K * stride_dyk
                g_ptrs += BLOCK_K * stride_gk
                d_ptrs += BLOCK_K * stride_dk
            row_ok = rows < row_end
            col_ok = cols < I
            mask = row_ok[:, None] & col_ok[None, :]
            r64 = rows.to(tl.int64)
            a, da = _act(gate, ACT)
            h = a * up
            w = tl.load(WTS + slot).to(tl.float32)[:, None]
            if STORE_DW:
                part = tl.sum(tl.where(col_ok[None, :], q * h, 0.0), 1)
                tl.store(DWP + slot * stride_dwpm + pid_n, part, mask=row_ok)
            if STORE_HW:
                tl.store(HW + r64[:, None] * stride_hwm + cols[None, :] * stride_hwn,
                         (w * h).to(HW.dtype.element_ty), mask=mask)
            if STORE_DGU:
                dh = w * q
                dgu_ptrs = DGU + r64[:, None] * stride_dgum + cols[None, :] * stride_dgun
                tl.store(dgu_ptrs, (dh * up * da).to(DGU.dtype.element_ty), mask=mask)
                tl.store(dgu_ptrs + I * stride_dgun, (dh * a).to(DGU.dtype.element_ty), mask=mask)

    @triton.jit
    def _saved_act_bwd_kernel(
        Q, GU_IN, PERM, WTS, DGU, HW, DWP,
        S, I,
        stride_qm, stride_gim, stride_dgum, stride_hwm, stride_dwpm,
        ACT: tl.constexpr, NEED_Q: tl.constexpr, STORE_DGU: tl.constexpr, STORE_HW: tl.constexpr,
        STORE_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """_bwd_act_kernel's epilogue when the forward kept its projection: per sorted row r (weight w =
        WTS[PERM[r]]), with q = Q[r] (dy_t @ D_e, formed before by the rows GEMM) and gate, up = GU_IN[r]:
          DWP[PERM[r], 0] = sum_c q * h,  DGU[r] = [w q up act'(gate), w q act(gate)],  HW[r] = w h.
        A program walks its rows' whole width, so the d w sum is complete (one column). Unit column strides."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < S
        r64 = rows.to(tl.int64)
        slot = tl.load(PERM + rows, mask=row_ok, other=0).to(tl.int64)
        w = tl.load(WTS + slot, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        part = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, I, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < I)[None, :]
            gi_ptrs = GU_IN + r64[:, None] * stride_gim + cols[None, :]
            gate = tl.load(gi_ptrs, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(gi_ptrs + I, mask=mask, other=0.0).to(tl.float32)
            a, da = _act(gate, ACT)
            h = a * up
            if NEED_Q:
                q = tl.load(Q + r64[:, None] * stride_qm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                if STORE_DW:
                    part += tl.sum(q * h, 1)  # masked entries: q = 0
                if STORE_DGU:
                    dh = w * q
                    dgu_ptrs = DGU + r64[:, None] * stride_dgum + cols[None, :]
                    tl.store(dgu_ptrs, (dh * up * da).to(DGU.dtype.element_ty), mask=mask)
                    tl.store(dgu_ptrs + I, (dh * a).to(DGU.dtype.element_ty), mask=mask)
            if STORE_HW:
                tl.store(HW + r64[:, None] * stride_hwm + cols[None, :], (w * h).to(HW.dtype.element_ty), mask=mask)
        if STORE_DW:
            tl.store(DWP + slot * stride_dwpm, part, mask=row_ok)

    @triton.jit
    def _wgrad_kernel(
        A, B, PERM, OUT, OFFS,
        M, N, TOPK, S_BUCKET,
        stride_ar, stride_am, stride_br, stride_bn, stride_oe, stride_om, stride_on,
        GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """OUT[e] = sum over expert e's sorted rows r of A[a(r), :M]^T B[b(r), :N]  ([M, N] per expert), with
        a(r) = PERM[r] // TOPK if GATHER_A else r (the same for b). One program per (expert, tile of the
        output); an expert without rows writes zeros (its gradient) and reads nothing."""
        pid = tl.program_id(0)
        n_m = tl.cdiv(M, BLOCK_M)
        n_n = tl.cdiv(N, BLOCK_N)
        e = pid // (n_m * n_n)
        t = pid % (n_m * n_n)
        pid_m = t // n_n
        pid_n = t % n_n
        lo = tl.load(OFFS + e)
        hi = tl.load(OFFS + e + 1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ld_m = (offs_m % M).to(tl.int64)
        ld_n = (offs_n % N).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(lo, hi, BLOCK_K):
            rows = r0 + rk
            r_ok = rows < hi
            rows_ld = tl.minimum(rows, hi - 1)
            tok = tl.load(PERM + rows_ld).to(tl.int64) // TOPK  # every use gathers one of the two
            if GATHER_A:
                a_rows = tok
            else:
                a_rows = rows_ld.to(tl.int64)
            if GATHER_B:
                b_rows = tok
            else:
                b_rows = rows_ld.to(tl.int64)
            # rows past the expert's end must add nothing: zero them in both operands
            a = tl.load(A + a_rows[None, :] * stride_ar + ld_m[:, None] * stride_am, mask=r_ok[None, :], other=0.0)
            b = tl.load(B + b_rows[:, None] * stride_br + ld_n[None, :] * stride_bn, mask=r_ok[:, None], other=0.0)
            acc = tl.dot(a.to(OUT.dtype.element_ty), b.to(OUT.dtype.element_ty), acc, input_precision=PRECISION)
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        out_ptrs = (OUT + e.to(tl.int64) * stride_oe + offs_m[:, None].to(tl.int64) * stride_om
                    + offs_n[None, :] * stride_on)
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)

    _INTERPRETED = interpreted(_rows_kernel)

    def _configs(shapes):
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bm, bn, bk, w, s in shapes]

    # Hopper-sized tiles; a config that does not fit shared memory is skipped by the autotuner. S (the
    # number of pairs) is symbolic in a compiled graph and varies: tune on a power-of-two bucket of it.
    _ROWS_CONFIGS = _configs([(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                              (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 64, 64, 4, 3)])
    # The backward's column block is fixed (the d-weight partials buffer has one column per column tile).
    _BWD_BLOCK_N = 64
    _BWD_CONFIGS = _configs([(bm, _BWD_BLOCK_N, bk, w, s) for bm, bk, w, s in
                             [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4)]])
    _WGRAD_CONFIGS = _configs([(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4),
                               (64, 128, 64, 4, 4), (128, 256, 64, 8, 3)])
    # The config that won on the H100 for every key of the moe and moe-big workloads (2026-11-27: hidden 1024 /
    # 2048, expert width 512 / 768, 32 / 64 experts): the gated forward (128, 128, 64, 8, 3), the other row
    # GEMMs (128, 256, 64, 8, 3), the backward (128, 64, 64, 8, 3). Autotuning the whole lists cost 19 s of
    # the moe workload's first step (each config is a compile); where the preferred config fits the GPU's
    # shared memory only it is kept, elsewhere the list is tuned. wgrad (trained experts) is tuned in full.
    _PREFERRED = {
        "rows": lambda kw: (128, 128, 64, 8, 3) if kw.get("GATED") else (128, 256, 64, 8, 3),
        "bwd": lambda kw: (128, _BWD_BLOCK_N, 64, 8, 3),
    }

    def _smem_bytes(name, bm, bn, bk, stages, gated) -> int:
        """Rough shared memory of a config, 2-byte operands: per stage the A tile and the W tile(s) (rows: two
        W tiles when gated; bwd: x and dy tiles, gate, up and down tiles)."""
        per_stage = {"rows": bm * bk + (2 if gated else 1) * bk * bn, "bwd": 2 * bm * bk + 3 * bk * bn}[name]
        return per_stage * stages * 2

    def _pruner(name):
        def prune(configs, nargs, **kwargs):
            want = _PREFERRED[name](kwargs)
            fits = _smem_bytes(name, *want[:3], want[4], kwargs.get("GATED", False)) <= shared_memory_limit(
                nargs.get("A", nargs.get("X")))
            keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                           c.num_warps, c.num_stages) == want]
            return keep if fits and keep else configs
        return prune

    if not _INTERPRETED:
        # kernel: (plain, autotuned, the config used when AUTOTUNE is off)
        _KERNELS = {
            "rows": (_rows_kernel, triton.autotune(_ROWS_CONFIGS, key=["N", "K", "S_BUCKET", "GATED", "SCATTER_OUT",
                                                                       "stride_wk"],
                                                   prune_configs_by={"early_config_prune": _pruner("rows")})(
                _rows_kernel), _ROWS_CONFIGS[-1]),
            "bwd": (_bwd_act_kernel, triton.autotune(_BWD_CONFIGS, key=["I", "H", "S_BUCKET", "NEED_Q", "STORE_DGU"],
                                                     prune_configs_by={"early_config_prune": _pruner("bwd")})(
                _bwd_act_kernel), _BWD_CONFIGS[2]),
            "wgrad": (_wgrad_kernel, triton.autotune(_WGRAD_CONFIGS, key=["M", "N", "S_BUCKET", "GATHER_A"])(
                _wgrad_kernel), _WGRAD_CONFIGS[3]),
            "saved_act": (_saved_act_bwd_kernel, None, {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 4}),
        }
    else:
        # One small config per kernel: the interpreter is slow (its cost is per tile, not per element) and
        # autotuning it is pointless. Small enough that the tests' shapes span several tiles of each kind.
        _BWD_BLOCK_N = 16
        _KERNELS = {
            "rows": (_rows_kernel, None, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}),
            "bwd": (_bwd_act_kernel, None, {"BLOCK_M": 16, "BLOCK_N": _BWD_BLOCK_N, "BLOCK_K": 32}),
            "wgrad": (_wgrad_kernel, None, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}),
            "saved_act": (_saved_act_bwd_kernel, None, {"BLOCK_M": 16, "BLOCK_N": 16}),
        }

# On CUDA each kernel is autotuned per shape (a few seconds the first time a shape is seen). Tests that sweep
# many shapes turn this off and get one fixed config per kernel.
AUTOTUNE = True
# From this hidden size on, the backward recomputes the gate_up projection with the rows GEMM into a buffer freed
# at the end of the backward (the fused three-accumulator kernel below it). Measured on H200s, within one call each:
# moe-big (H 2048) 102,910 -> 106,768 tokens/s (s16d) and, both with cold caches, 102,948 -> 108,376 at a first step
# of 35.3 s both (s17b; +0.2 GiB peak); moe (H 1024) slower, 425,016 -> 413,872 (s16d).
ROWS_GEMM_RECOMPUTE_MIN_H = 2048


def _launch(name: str, grid, args, flags, device) -> None:
    kernel, tuned, fixed = _KERNELS[name]
    if isinstance(fixed, triton.Config):
        fixed = dict(fixed.kwargs, num_warps=fixed.num_warps, num_stages=fixed.num_stages)
    launch(kernel, tuned if AUTOTUNE else None, grid, args, flags, fixed, device)


def _use_triton(*tensors: Tensor) -> bool:
    return use_triton(_INTERPRETED, *tensors, family=__name__)


_new_output = new_output  # tests poison this module's outputs through it


def _precision(dtype) -> str:
    # fp32 weights get exact fp32 products (tl.dot on fp32 would use tf32 on the GPU)
    return "ieee" if dtype == torch.float32 else "tf32"


def _s_bucket(s: int) -> int:
    return min(triton.next_power_of_2(max(s, 1)), 65536)




def _max_programs(device) -> int:
    """Programs of a persistent launch: a few per SM (the interpreter: a few, so that each walks several
    tiles)."""
    if device.type != "cuda":
        return 3
    return 2 * sm_count(device)


def _block_e(e: int) -> int:
    # the kernels hold one lane per expert (at least 16: no degenerate 1-wide vectors)
    return max(16, triton.next_power_of_2(e))


def _row_tile_bound(s: int, e: int, block_m: int) -> int:
    """Most row tiles S sorted rows can make over E experts (each non-empty expert adds at most one partial)."""
    return triton.cdiv(s, block_m) + min(e, s)


def _rows_gemm(a: Tensor, w_kn: Tensor, out: Tensor, perm: Tensor, offs: Tensor, topk: int, *,
               gather_a: bool, scatter_out: bool, gated: bool = False, act: str = "silu",
               wts: Tensor | None = None, gu_out: Tensor | None = None) -> Tensor:
    """out[o(r)] = scale(r) * epi(a[a(r)] @ w_kn[e(r)]) for the sorted rows r (see `_rows_kernel`);
    w_kn is [E, K, N] (or [E, K, 2N] when gated), any strides. gu_out [S, 2N] contiguous (gated only): also
    the projection before the activation, by sorted row."""
    E, K = w_kn.shape[0], w_kn.shape[1]
    N = w_kn.shape[2] // 2 if gated else w_kn.shape[2]
    S = perm.shape[0]
    if S == 0 or N == 0:
        return out
    if not _use_triton(a, w_kn):
        acc_dt = torch.promote_types(w_kn.dtype, torch.float32)
        bounds = offs.tolist()
        for e in range(E):
            lo, hi = bounds[e], bounds[e + 1]
            if lo == hi:
                continue
            slot = perm[lo:hi].long()
            rows = a[slot // topk] if gather_a else a[lo:hi]
            v = rows.to(w_kn.dtype).to(acc_dt) @ w_kn[e].to(acc_dt)
            if gu_out is not None:
                gu_out[lo:hi] = v.to(gu_out.dtype)
            if gated:
                v = _act_torch(v[:, :N], act)[0] * v[:, N:]
            if wts is not None:
                v = v * wts[slot].to(acc_dt)[:, None]
            if scatter_out:
                out[slot] = v.to(out.dtype)
            else:
                out[lo:hi] = v.to(out.dtype)
        return out
    gu_t = gu_out if gu_out is not None else out  # never written without SAVE_GU
    args = (a, w_kn, out, perm, wts if wts is not None else out, offs, gu_t, E, N, K, topk, _s_bucket(S),
            a.stride(0), a.stride(1), w_kn.stride(0), w_kn.stride(1), w_kn.stride(2), out.stride(0), out.stride(1),
            gu_t.stride(0))
    flags = dict(GATHER_A=gather_a, SCATTER_OUT=scatter_out, GATED=gated, ACT=ACTIVATIONS.index(act),
                 HAS_SCALE=wts is not None, SAVE_GU=gu_out is not None, PRECISION=_precision(w_kn.dtype),
                 BLOCK_E=_block_e(E))
    cap = _max_programs(a.device)

    def grid(meta):
        return (min(cap, _row_tile_bound(S, E, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    _launch("rows", grid, args, flags, a.device)
    return out


def _bwd_act(x, dy, gate_up, down, perm, wts, offs, topk, act, dgu, hw, dwp, saved_gu=None):
    """Recomputes gate/up (or reads them from saved_gu [S, 2I], the forward's by sorted row) and backpropagates
    through act(gate) * up and the routing weight (see `_bwd_act_kernel`); dgu [S, 2I], hw [S, I],
    dwp [S, n_col] may each be None (not needed)."""
    E, I2, H = gate_up.shape
    I = I2 // 2
    S = perm.shape[0]
    if S == 0:
        return
    if not _use_triton(x, gate_up):
        acc_dt = torch.promote_types(gate_up.dtype, torch.float32)
        bounds = offs.tolist()
        for e in range(E):
            lo, hi = bounds[e], bounds[e + 1]
            if lo == hi:
                continue
            slot = perm[lo:hi].long()
            tok = slot // topk
            if saved_gu is not None:
                gu = saved_gu[lo:hi].to(acc_dt)
            else:
                gu = x[tok].to(gate_up.dtype).to(acc_dt) @ gate_up[e].to(acc_dt).t()
            gate, up = gu[:, :I], gu[:, I:]
            a, da = _act_torch(gate, act)
            h = a * up
            w = wts[slot].to(acc_dt)[:, None]
            q = dy[tok].to(down.dtype).to(acc_dt) @ down[e].to(acc_dt)
            if dwp is not None:  # one column: the kernel's per-column-tile partials, summed already
                dwp[slot, 0] = (q * h).sum(1).to(dwp.dtype)
            if hw is not None:
                hw[lo:hi] = (w * h).to(hw.dtype)
            if dgu is not None:
                dgu[lo:hi] = torch.cat([w * q * up * da, w * q * a], 1).to(dgu.dtype)
        return
    need_q = dgu is not None or dwp is not None
    dummy = x  # pointers of outputs that are not stored are never read
    dgu_t, hw_t, dwp_t = (dgu if dgu is not None else dummy), (hw if hw is not None else dummy), \
        (dwp if dwp is not None else dummy)
    flags = dict(ACT=ACTIVATIONS.index(act), NEED_Q=need_q, STORE_DGU=dgu is not None, STORE_HW=hw is not None,
                 STORE_DW=dwp is not None)
    if saved_gu is not None:
        # q = dy_t @ D_e by the rows GEMM (the forward's down-projection kernel, gathered rows, fp32 out), then
        # the epilogue as an elementwise pass: a plain GEMM, tiled as one (the fused kernel's three-accumulator
        # tiles left this GEMM alone at 169 TFLOP/s on an H200)
        q = _new_output((S, I), torch.float32, x.device) if need_q else dummy
        if need_q:
            _rows_gemm(dy, down, q, perm, offs, topk, gather_a=True, scatter_out=False)
        gi = saved_gu.contiguous()
        args = (q, gi, perm, wts, dgu_t, hw_t, dwp_t, S, I, q.stride(0), gi.stride(0), dgu_t.stride(0),
                hw_t.stride(0), dwp_t.stride(0))
        _launch("saved_act", lambda meta: (triton.cdiv(S, meta["BLOCK_M"]),), args, flags, x.device)
        return
    gu_kn = gate_up.transpose(1, 2)  # [E, H, 2I]
    args = (x, dy, gu_kn, down, perm, wts, dgu_t, hw_t, dwp_t, offs, E, I, H, topk, _s_bucket(S),
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), gu_kn.stride(0), gu_kn.stride(1), gu_kn.stride(2),
            down.stride(0), down.stride(1), down.stride(2), dgu_t.stride(0), dgu_t.stride(1),
            hw_t.stride(0), hw_t.stride(1), dwp_t.stride(0))
    flags.update(PRECISION=_precision(gate_up.dtype), BLOCK_E=_block_e(E))
    cap = _max_programs(x.device)

    def grid(meta):
        return (min(cap, _row_tile_bound(S, E, meta["BLOCK_M"]) * triton.cdiv(I, meta["BLOCK_N"])),)

    _launch("bwd", grid, args, flags, x.device)


def _wgrad(a: Tensor, b: Tensor, perm: Tensor, offs: Tensor, topk: int, out: Tensor, *,
           gather_a: bool, gather_b: bool) -> Tensor:
    """out[e] = a[a(r)]^T @ b[b(r)] summed over expert e's sorted rows r; out [E, M, N] in the weights' dtype."""
    E, M, N = out.shape
    S = perm.shape[0]
    if not _use_triton(a, b, out):
        acc_dt = torch.promote_types(out.dtype, torch.float32)
        bounds = offs.tolist()
        for e in range(E):
            lo, hi = bounds[e], bounds[e + 1]
            if lo == hi:
                out[e] = 0
                continue
            tok = perm[lo:hi].long() // topk
            ra = a[tok] if gather_a else a[lo:hi]
            rb = b[tok] if gather_b else b[lo:hi]
            out[e] = (ra.to(out.dtype).to(acc_dt).t() @ rb.to(out.dtype).to(acc_dt)).to(out.dtype)
        return out
    args = (a, b, perm, out, offs, M, N, topk, _s_bucket(S), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(0), out.stride(1), out.stride(2))
    flags = dict(GATHER_A=gather_a, GATHER_B=gather_b, PRECISION=_precision(out.dtype))

    def grid(meta):
        return (E * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _launch("wgrad", grid, args, flags, out.device)
    return out


def _route(topk_ids: Tensor, num_experts: int):
    """Sorts the S = T*k (token, slot) pairs by expert, on the device: perm[r] = the slot (t*k + j) of sorted
    row r, offs[e] = the first sorted row of expert e (offs[E] = S). A stable sort keeps each expert's rows in
    token order: the result does not depend on the sort's tie-breaking. The ids are sorted as the narrowest
    integer that holds 0..E: a radix sort makes one pass per byte of the key, 8 for topk's int64 ids (0.7 ms
    of the moe workload's ~20 ms of GPU time per step on the H100 went to those passes)."""
    key = torch.uint8 if num_experts < 255 else (torch.int16 if num_experts < 32767 else topk_ids.dtype)
    flat = topk_ids.reshape(-1).to(key)
    sorted_ids, perm = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts + 1, device=flat.device, dtype=sorted_ids.dtype)
    offs = torch.searchsorted(sorted_ids, bounds, out_int32=True)
    return perm.to(torch.int32), offs


def _check(x, topk_ids, topk_weights, gate_up, down, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    torch._check(x.dim() == 2 and topk_ids.dim() == 2 and topk_weights.shape == topk_ids.shape,
                 lambda: "x [T, H], topk_ids and topk_weights [T, k]")
    torch._check(gate_up.dim() == 3 and down.dim() == 3 and gate_up.shape[1] == 2 * down.shape[2]
                 and gate_up.shape[2] == x.shape[1] and down.shape[1] == x.shape[1]
                 and down.shape[0] == gate_up.shape[0], lambda: "gate_up [E, 2I, H], down [E, H, I]")


def _slot_dtype(down: Tensor, topk_weights: Tensor):
    # HF multiplies the down projection's output (weights' dtype) by the routing weight: the product, and
    # the sum over k, are in the dtype the two promote to (fp32 for an fp32 router over bf16 experts).
    return torch.promote_types(down.dtype, topk_weights.dtype)


def _forward(x, topk_ids, topk_weights, gate_up, down, activation, save_gate_up: bool):
    _check(x, topk_ids, topk_weights, gate_up, down, activation)
    T, H = x.shape
    k = topk_ids.shape[1]
    E, I = down.shape[0], down.shape[2]
    S = T * k
    perm, offs = _route(topk_ids, E)
    wts = topk_weights.reshape(-1).contiguous()  # the kernels index it by slot
    h = _new_output((S, I), down.dtype, x.device)
    gu = _new_output((S, 2 * I), gate_up.dtype, x.device) if save_gate_up else None
    _rows_gemm(x, gate_up.transpose(1, 2), h, perm, offs, k, gather_a=True, scatter_out=False, gated=True,
               act=activation, gu_out=gu)
    slots = _new_output((S, H), _slot_dtype(down, topk_weights), x.device)
    _rows_gemm(h, down.transpose(1, 2), slots, perm, offs, k, gather_a=False, scatter_out=True, wts=wts)
    return slots.view(T, k, H).sum(1).to(x.dtype), gu


@torch.library.custom_op("fxopt::moe_experts", mutates_args=())
@with_fallback
def moe_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up: Tensor, down: Tensor,
                activation: str) -> Tensor:
    """y [T, H] in x's dtype; see the module docstring."""
    return _forward(x, topk_ids, topk_weights, gate_up, down, activation, False)[0]


@moe_experts.register_fake
def _(x, topk_ids, topk_weights, gate_up, down, activation):
    _check(x, topk_ids, topk_weights, gate_up, down, activation)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fxopt::moe_experts_saving", mutates_args=())
@with_fallback
def moe_experts_saving(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up: Tensor, down: Tensor,
                       activation: str) -> tuple[Tensor, Tensor]:
    """(y, gu): moe_experts' y, and the gate_up projection [T*k, 2I] before the activation (weights' dtype, by
    sorted row), kept for the backward, which then does not recompute it (OptimizeConfig.moe_keep_projection)."""
    return _forward(x, topk_ids, topk_weights, gate_up, down, activation, True)


@moe_experts_saving.register_fake
def _(x, topk_ids, topk_weights, gate_up, down, activation):
    _check(x, topk_ids, topk_weights, gate_up, down, activation)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((x.shape[0] * topk_ids.shape[1], gate_up.shape[1]), dtype=gate_up.dtype))


def _recompute_gate_up(x, gate_up, perm, offs, topk):
    """The projection [S, 2I] by sorted row, as the forward's kept one (a plain rows GEMM, gathered x rows)."""
    out = _new_output((perm.shape[0], gate_up.shape[1]), gate_up.dtype, x.device)
    return _rows_gemm(x, gate_up.transpose(1, 2), out, perm, offs, topk, gather_a=True, scatter_out=False)


@torch.library.custom_op("fxopt::moe_experts_backward", mutates_args=())
@with_fallback
def moe_experts_backward(dy: Tensor, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up: Tensor,
                         down: Tensor, activation: str, need_dx: bool, need_dw: bool, need_dgate_up: bool,
                         need_ddown: bool, saved_gate_up: Optional[Tensor] = None) -> list[Tensor]:
    """Returns [dx if need_dx] + [d topk_weights if need_dw] + [d gate_up if need_dgate_up]
    + [d down if need_ddown], each in its input's dtype."""
    T, H = x.shape
    k = topk_ids.shape[1]
    E, I = down.shape[0], down.shape[2]
    S = T * k
    dev = x.device
    perm, offs = _route(topk_ids, E)
    wts = topk_weights.reshape(-1).contiguous()
    need_dgu_rows = need_dx or need_dgate_up
    dgu = _new_output((S, 2 * I), gate_up.dtype, dev) if need_dgu_rows else None
    hw = _new_output((S, I), down.dtype, dev) if need_ddown else None
    if saved_gate_up is None and H >= ROWS_GEMM_RECOMPUTE_MIN_H and _use_triton(x, gate_up):
        # recompute the projection by the rows GEMM into a buffer that lives only in this backward, then run
        # the kept-projection path (faster from H 2048 on, slower at H 1024: see the constant)
        saved_gate_up = _recompute_gate_up(x, gate_up, perm, offs, k)
    # d w partials: one per column tile of the fused kernel; the kept-projection path sums whole rows
    n_col = triton.cdiv(I, _BWD_BLOCK_N) if _use_triton(x, gate_up) and saved_gate_up is None else 1
    dwp = _new_output((S, n_col), torch.promote_types(gate_up.dtype, torch.float32), dev) if need_dw else None
    if need_dgu_rows or need_ddown or need_dw:
        _bwd_act(x, dy, gate_up, down, perm, wts, offs, k, activation, dgu, hw, dwp, saved_gate_up)
    result = []
    if need_dx:
        dx_slots = _new_output((S, H), torch.promote_types(x.dtype, gate_up.dtype), dev)
        _rows_gemm(dgu, gate_up, dx_slots, perm, offs, k, gather_a=False, scatter_out=True)
        result.append(dx_slots.view(T, k, H).sum(1).to(x.dtype))
    if need_dw:
        result.append(dwp.sum(1).view(T, k).to(topk_weights.dtype))
    if need_dgate_up:
        result.append(_wgrad(dgu, x, perm, offs, k, _new_output(gate_up.shape, gate_up.dtype, dev),
                             gather_a=False, gather_b=True))
    if need_ddown:
        result.append(_wgrad(dy, hw, perm, offs, k, _new_output(down.shape, down.dtype, dev),
                             gather_a=True, gather_b=False))
    return result


@moe_experts_backward.register_fake
def _(dy, x, topk_ids, topk_weights, gate_up, down, activation, need_dx, need_dw, need_dgate_up, need_ddown,
      saved_gate_up=None):
    result = []
    if need_dx:
        result.append(torch.empty_like(x, memory_format=torch.contiguous_format))
    if need_dw:
        result.append(torch.empty_like(topk_weights, memory_format=torch.contiguous_format))
    if need_dgate_up:
        result.append(torch.empty_like(gate_up, memory_format=torch.contiguous_format))
    if need_ddown:
        result.append(torch.empty_like(down, memory_format=torch.contiguous_format))
    return result


def _setup_context(ctx, inputs, output):
    x, topk_ids, topk_weights, gate_up, down, activation = inputs
    saved = output[1] if isinstance(output, (tuple, list)) else None
    ctx.save_for_backward(x, topk_ids, topk_weights, gate_up, down, saved)
    ctx.activation = activation


def _backward(ctx, dy, dgu_out=None):
    """dgu_out: the saving op's second output is kept for the backward only; no gradient flows into it."""
    x, topk_ids, topk_weights, gate_up, down, saved = ctx.saved_tensors
    need = [bool(n) for n in ctx.needs_input_grad]  # (x, ids, weights, gate_up, down, activation)
    need_dx, need_dw, need_dgu, need_dd = need[0], need[2], need[3], need[4]
    grads = iter(moe_experts_backward(dy, x, topk_ids, topk_weights, gate_up, down, ctx.activation,
                                      need_dx, need_dw, need_dgu, need_dd, saved))
    dx = next(grads) if need_dx else None
    dw = next(grads) if need_dw else None
    dgu = next(grads) if need_dgu else None
    dd = next(grads) if need_dd else None
    return dx, None, dw, dgu, dd, None


moe_experts.register_autograd(_backward, setup_context=_setup_context)
moe_experts_saving.register_autograd(_backward, setup_context=_setup_context)


def reference(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up: Tensor, down: Tensor,
              activation: str) -> Tensor:
    """The op's math in plain PyTorch (differentiable), a loop over the experts with the dtypes of the
    transformers experts: x cast to the weights' dtype, the routing weight multiplied in the promoted dtype,
    the k slots summed, the sum cast to x's dtype."""
    T, H = x.shape
    k = topk_ids.shape[1]
    I = down.shape[2]
    xs = x.to(gate_up.dtype)
    slots = torch.zeros(T, k, H, dtype=_slot_dtype(down, topk_weights), device=x.device)
    for e in range(gate_up.shape[0]):
        tok, j = torch.where(topk_ids == e)
        if tok.numel() == 0:
            continue
        gu = F.linear(xs[tok], gate_up[e])
        h = _act_ref(gu[:, :I], activation) * gu[:, I:]
        o = F.linear(h.to(down.dtype), down[e])
        slots = slots.index_put((tok, j), o * topk_weights[tok, j, None])
    return slots.sum(1).to(x.dtype)
