"""Config sweep of the decode-sized 4-bit GEMV (what chose nf4._WORDS_CONFIGS and nf4._words_split in session 18).

Variants of the word GEMV (fxopt/kernels/nf4.py), standalone here: `words_v` with PAIRS off is that kernel's math
(one table lookup per 4-bit code) plus a split over K into an fp32 output by atomics; PAIRS on looks up one
256-entry table of bf16 pairs per byte instead (measured no faster: kept out of fxopt); `tc_v` dequantizes a
tile and multiplies on tensor cores with x padded to 16 rows (2-3x slower at M = 4: kept out). Each candidate
runs over enough copies of the weight that every read comes from HBM (L2-cold), in a CUDA graph, with its
relative error against fp32 math on bitsandbytes' dequantized weight; against bnb.matmul_4bit and fxopt's op.
Rows go to $OUT/gemv_exp.jsonl (results: benchmarks/results/*-s18a-gemv-sweep.jsonl, s18b with TARGETED=1).

    python benchmarks/sweep_nf4_gemv.py            full sweep (long: hundreds of compiles)
    TARGETED=1 MS=1,2,4,8,16 python benchmarks/sweep_nf4_gemv.py   eight configs, every shape
    TRITON_INTERPRET=1 python benchmarks/sweep_nf4_gemv.py --check  tiny shape, correctness only (CPU)"""
import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl

from fxopt.kernels import nf4
from fxopt.kernels.nf4 import _block_scale


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """int32 [256]: byte b -> bf16(code[b >> 4]) in the upper 16 bits, bf16(code[b & 15]) in the lower."""
    b = torch.arange(256)
    hi = code.cpu()[b >> 4].to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    lo = code.cpu()[b & 15].to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return ((hi << 16) | lo).to(code.device)


@triton.jit
def words_v(X, W32, CODE, PAIR, ABSMAX, ABSMAX2, CODE2, OFFSET, OUT, M, N, K, KW, stride_xm, stride_om,
            BS: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PAIRS: tl.constexpr, SPLIT: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    load_n = (offs_n % N).to(tl.int64)
    WPB: tl.constexpr = BS // 8
    C: tl.constexpr = WPB if WPB < BLOCK_W else BLOCK_W
    G: tl.constexpr = BLOCK_W // C
    g = tl.arange(0, G)
    c = tl.arange(0, C)
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    per = KW // SPLIT
    for w0 in range(pid_k * per, pid_k * per + per, BLOCK_W):
        wi = w0 + g[:, None] * C + c[None, :]
        words = tl.load(W32 + load_n[:, None, None] * KW + wi[None, :, :])
        blk = w0 // WPB + g
        s = _block_scale(ABSMAX, ABSMAX2, CODE2, OFFSET, load_n[:, None] * (K // BS) + blk[None, :],
                         blk[None, :] >= 0, DOUBLE_QUANT)
        if PAIRS:
            b4 = tl.arange(0, 4)
            byt = (words[:, :, :, None] >> (8 * b4)[None, None, None, :]) & 255
            pv = tl.load(PAIR + byt)
            v_e = (pv & -65536).to(tl.float32, bitcast=True)
            v_o = (pv << 16).to(tl.float32, bitcast=True)
            j2 = tl.arange(0, 8)
            k8 = 8 * wi[:, :, None] + j2[None, None, :]
            for mi in tl.static_range(BLOCK_M):
                xv = tl.load(X + (mi % M) * stride_xm + k8).to(tl.float32)
                x_e, x_o = tl.split(tl.reshape(xv, (G, C, 4, 2)))
                part = tl.sum(v_e * x_e[None] + v_o * x_o[None], axis=3)
                row = tl.sum(tl.sum(part, axis=2) * s, axis=1)
                acc += tl.where(rm[:, None] == mi, row[None, :], 0.0)
        else:
            j = tl.arange(0, 8)
            shift = 8 * (j // 2) + 4 * (1 - j % 2)
            codes = tl.load(CODE + ((words[:, :, :, None] >> shift[None, None, None, :]) & 15))
            k8 = 8 * wi[:, :, None] + j[None, None, :]
            for mi in tl.static_range(BLOCK_M):
                xv = tl.load(X + (mi % M) * stride_xm + k8).to(tl.float32)
                part = tl.sum(codes * xv[None, :, :, :], axis=3)
                row = tl.sum(tl.sum(part, axis=2) * s, axis=1)
                acc += tl.where(rm[:, None] == mi, row[None, :], 0.0)
    mask = (rm[:, None] < M) & (offs_n[None, :] < N)
    ptrs = OUT + rm[:, None] * stride_om + offs_n[None, :]
    if SPLIT == 1:
        tl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


@triton.jit
def tc_v(X, W32, PAIR, ABSMAX, ABSMAX2, CODE2, OFFSET, OUT, M, N, K, KW, stride_xm, stride_om,
         BS: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SPLIT: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """tensor cores: the weight tile dequantized (pair table, scaled in fp32, rounded to bf16) then one dot with
    x padded to 16 rows."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    load_n = (offs_n % N).to(tl.int64)
    WPB: tl.constexpr = BS // 8
    C: tl.constexpr = WPB if WPB < BLOCK_W else BLOCK_W
    G: tl.constexpr = BLOCK_W // C
    g = tl.arange(0, G)
    c = tl.arange(0, C)
    rm = tl.arange(0, 16)
    kk = tl.arange(0, BLOCK_W * 8)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    per = KW // SPLIT
    for w0 in range(pid_k * per, pid_k * per + per, BLOCK_W):
        wi = w0 + g[:, None] * C + c[None, :]
        words = tl.load(W32 + load_n[:, None, None] * KW + wi[None, :, :])
        blk = w0 // WPB + g
        s = _block_scale(ABSMAX, ABSMAX2, CODE2, OFFSET, load_n[:, None] * (K // BS) + blk[None, :],
                         blk[None, :] >= 0, DOUBLE_QUANT)
        b4 = tl.arange(0, 4)
        byt = (words[:, :, :, None] >> (8 * b4)[None, None, None, :]) & 255
        pv = tl.load(PAIR + byt)
        v_e = (pv & -65536).to(tl.float32, bitcast=True) * s[:, :, None, None]
        v_o = (pv << 16).to(tl.float32, bitcast=True) * s[:, :, None, None]
        w = tl.reshape(tl.join(v_e, v_o), (BLOCK_N, BLOCK_W * 8)).to(X.dtype.element_ty)
        xv = tl.load(X + (rm[:, None] % M) * stride_xm + 8 * w0 + kk[None, :])
        acc = tl.dot(xv, tl.trans(w), acc)
    mask = (rm[:, None] < M) & (offs_n[None, :] < N)
    ptrs = OUT + rm[:, None] * stride_om + offs_n[None, :]
    if SPLIT == 1:
        tl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


def run_words(x, q, pair, bn, bw, warps, stages, split, pairs):
    M, K = x.shape
    N = q.n
    out = torch.zeros((M, N), dtype=torch.float32, device=x.device) if split > 1 else torch.empty(
        (M, N), dtype=x.dtype, device=x.device)
    words = q.data[: N * K // 2].view(torch.int32)
    ptrs = nf4._quant_ptrs(q)
    words_v[(triton.cdiv(N, bn), split)](
        x, words, q.code, pair, *ptrs[2:], out, M, N, K, K // 8, x.stride(0), out.stride(0),
        BS=q.blocksize, DOUBLE_QUANT=q.double, PAIRS=pairs, SPLIT=split, BLOCK_M=triton.next_power_of_2(M),
        BLOCK_N=bn, BLOCK_W=bw, num_warps=warps, num_stages=stages)
    return out


def run_tc(x, q, pair, bn, bw, warps, stages, split):
    M, K = x.shape
    N = q.n
    out = torch.zeros((M, N), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    words = q.data[: N * K // 2].view(torch.int32)
    ptrs = nf4._quant_ptrs(q)
    tc_v[(triton.cdiv(N, bn), split)](
        x, words, pair, *ptrs[2:], out, M, N, K, K // 8, x.stride(0), out.stride(0),
        BS=q.blocksize, DOUBLE_QUANT=q.double, SPLIT=split, BLOCK_N=bn, BLOCK_W=bw, num_warps=warps,
        num_stages=stages)
    return out


def make_q(n, k, dev):
    import bitsandbytes.functional as BF
    gen = torch.Generator(device=dev).manual_seed(0)
    w = (torch.randn(n, k, device=dev, generator=gen) * k ** -0.5).to(torch.bfloat16)
    qweight, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    a = nf4.quant_args(qweight, state)
    q = nf4._quant(*a[:6], *a[6:])
    return qweight, state, q, BF.dequantize_4bit(qweight, state)


def copies_of(q, nbytes):
    """enough copies of the packed weight (and its scales) that cycling through them evicts each from L2
    (50 MB) before it is read again: what decoding through a real model sees."""
    count = max(1, min(64, (160 << 20) // nbytes))
    return [q._replace(data=q.data.clone(), absmax=q.absmax.clone()) for _ in range(count)]


def main():
    check = "--check" in sys.argv
    if not check and not torch.cuda.is_available():
        print("sweep_nf4_gemv.py: no CUDA device here (--check runs the tiny case in the interpreter). Nothing done.")
        return
    dev = "cpu" if check else "cuda"
    shapes = {"q_o": (2048, 2048), "k_v": (512, 2048), "gate_up": (8192, 2048), "down": (2048, 8192),
              "gate_up_8b": (14336, 4096), "down_8b": (4096, 14336), "gate_up_70b": (28672, 8192)}
    only = os.environ.get("SHAPES")
    if only:
        shapes = {k: v for k, v in shapes.items() if k in only.split(",")}
    if check:
        shapes = {"tiny": (64, 512)}
    ms = [int(v) for v in os.environ.get("MS", "1,4,16").split(",")] if not check else [1, 3]
    dt = torch.float32 if check else torch.bfloat16
    out_path = os.path.join(os.environ.get("OUT", "/tmp"), "gemv_exp.jsonl")
    f = open(out_path, "a")
    for name, (n, k) in shapes.items():
        qweight, state, q, w = make_q(n, k, dev)
        pair = pair_table(q.code)
        nbytes = n * k // 2
        qs = [q] if check else copies_of(q, nbytes)
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=dt)
            ref = x.float() @ w.float().t()
            cands = []
            if check:
                cands = [("words", dict(bn=2, bw=16, warps=1, stages=1, split=1, pairs=False)),
                         ("words", dict(bn=2, bw=16, warps=1, stages=1, split=2, pairs=True))]
                cands += [("tc", dict(bn=16, bw=16, warps=1, stages=1, split=2))]
            elif os.environ.get("TARGETED"):
                for bn, bw, warps, split in [(2, 128, 2, 1), (4, 128, 4, 1), (8, 256, 4, 1), (4, 256, 2, 1),
                                             (8, 64, 1, 4), (8, 64, 2, 4), (8, 64, 1, 2), (4, 64, 1, 4)]:
                    if bw * 8 * split <= k:
                        cands.append(("words", dict(bn=bn, bw=bw, warps=warps, stages=2, split=split, pairs=False)))
            else:
                for bn, bw, warps, split, pairs in itertools.product(
                        [1, 2, 4, 8], [64, 128, 256], [1, 2, 4], [1, 4], [False, True]):
                    per_thread = (bn * bw) // (warps * 32)
                    if bw * 8 * split > k or per_thread > 32 or per_thread < 2:
                        continue
                    if m > 4 and not pairs:
                        continue
                    cands.append(("words", dict(bn=bn, bw=bw, warps=warps, stages=2, split=split, pairs=pairs)))
                if m >= 4:
                    for bn, bw, warps, split in itertools.product([16, 32, 64], [32, 64, 128], [2, 4], [1, 4]):
                        if bw * 8 * split > k:
                            continue
                        cands.append(("tc", dict(bn=bn, bw=bw, warps=warps, stages=3, split=split)))
            best = {}
            with torch.no_grad():
                a = nf4.quant_args(qweight, state)
                rows = [("current", {}, lambda qq: torch.ops.fxopt.linear_4bit(
                    x, qq.data, *a[1:6], None, *a[6:]) if qq is q else torch.ops.fxopt.linear_4bit(
                    x, qq.data, qq.absmax, *a[2:6], None, *a[6:]))]
                if not check:
                    import bitsandbytes as bnb
                    import copy
                    states = []
                    for qq in qs:
                        st = copy.copy(state)
                        st.absmax = qq.absmax
                        states.append((qq.data, st))
                    rows.append(("bnb", {}, None))
                for kind, cfg in cands:
                    fn = (lambda qq, cfg=cfg: run_words(x, qq, pair, **cfg)) if kind == "words" else (
                        lambda qq, cfg=cfg: run_tc(x, qq, pair, **cfg))
                    rows.append((kind, cfg, fn))
                for kind, cfg, fn in rows:
                    rec = dict(shape=name, N=n, K=k, M=m, kind=kind, **cfg)
                    try:
                        if kind == "bnb":
                            got = bnb.matmul_4bit(x, qweight, state)
                            def run_all():
                                for d, st in states:
                                    bnb.matmul_4bit(x, d.view(qweight.dtype).view(qweight.shape), st)
                        else:
                            got = fn(q)
                            def run_all(fn=fn):
                                for qq in qs:
                                    fn(qq)
                        rec["err"] = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
                        if not check:
                            run_all()
                            rec["us"] = 1e3 * triton.testing.do_bench_cudagraph(run_all, rep=20,
                                                                                return_mode="median") / len(qs)
                            rec["gbs"] = nbytes / rec["us"] / 1e3
                    except Exception as e:
                        rec["error"] = f"{type(e).__name__}: {e}"[:200]
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    if check:
                        print(rec)
                    key = kind if kind in ("current", "bnb") else f"{kind}-{cfg.get('pairs', 'tc')}"
                    if "us" in rec and rec.get("err", 1) < 2e-2 and (key not in best or rec["us"] < best[key]["us"]):
                        best[key] = rec
            for key, rec in sorted(best.items()):
                print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
