"""Microbenchmark of fxopt's 4-bit linear kernels (fxopt/kernels/nf4.py) against bitsandbytes, on CUDA.

Weights: bf16 [N, K] quantized by bitsandbytes on the GPU (nf4, blocksize 64, double quantization: the QLoRA
default), Llama-3.2-1B projection shapes (N, K) in {(2048, 2048) q/o, (512, 2048) k/v, (8192, 2048) gate/up,
(2048, 8192) down}.

1. Training-sized, M = 8192 tokens (batch 4 x 2048), in TFLOP/s (2 M N K per product) against the ~798 TFLOP/s
   bf16 ceiling, forward y = x W^T and dX = dY W:
   - bnb: what bitsandbytes' MatMul4Bit does in training, dequantize_4bit (a full bf16 copy of W) + cuBLAS;
   - fxopt: fxopt::linear_4bit / linear_4bit_dx as training calls them (Triton dequantization to a transient
     + cuBLAS: see nf4._dequantized_gemm);
   - fxopt_fused: the same ops with the dequantization inside the GEMM's K-loop (FXOPT_NF4_GEMM=fused);
   - dense: cuBLAS on an already dequantized bf16 W (what no 4-bit path can beat unless dequantization is free);
   and the dequantization alone (bnb's vs fxopt's Triton kernel) in GB/s, bit-exactness against bnb
   included (--dequant-sweep: every launch of DEQUANT_SWEEP, on every named shape, the large ones too).
2. Decode-sized, M = 1, 2, 4, 8, 16, forward under no_grad, in GB/s of packed weight read (N K / 2 bytes)
   against the ~3000 GB/s of the H100: fxopt::linear_4bit (its GEMV kernel) vs bnb.matmul_4bit (bitsandbytes'
   own small-M kernel, or dequantize + linear where its heuristic prefers that). Timed both with plain launches
   (triton.testing.do_bench) and replayed in a CUDA graph (do_bench_cudagraph: no launch overhead, what a
   compiled decoding loop sees).
Timing: median of do_bench (it warms up and clears L2 between runs). rel err: ||out - ref|| / ||ref|| against
fp32 math on bitsandbytes' dequantized weight.

    python benchmarks/bench_nf4.py [--out DIR] [--tag TAG] [--shapes A,B] [--skip-decode] [--skip-train]
                                   [--dequant-sweep]
CUDA only: on a machine without a GPU it prints a message and exits 0.
"""
from __future__ import annotations

import functools
import json

import torch

from kernel_results import environment, gpu_ready, md_cell, parser, subset, write
import torch.nn.functional as F

CEILING_TFLOPS = 798.0  # bf16 matrix units, measured on the H100 of the device machine
CEILING_GBS = 3000.0  # HBM3 bandwidth measured on the H100
M_TRAIN = 8192
M_DECODE = [1, 2, 4, 8, 16]
BLOCKSIZE, QUANT_TYPE, DOUBLE = 64, "nf4", True
SHAPES = {"q_o": (2048, 2048), "k_v": (512, 2048), "gate_up": (8192, 2048), "down": (2048, 8192)}  # (N, K)
# decode only: Llama-3.1-8B's gate/up and down, Llama-3.1-70B's gate/up (weights of 29 and 117 MB)
LARGE_SHAPES = {"gate_up_8b": (14336, 4096), "down_8b": (4096, 14336), "gate_up_70b": (28672, 8192)}
# --dequant-sweep: the dequantization kernel's launches, (packed bytes per program, warps)
DEQUANT_SWEEP = [(b, w) for b in (1024, 2048, 4096, 8192) for w in (4, 8)]
L2_EVICT_BYTES = 160 << 20  # > 3x the 50 MB L2 of the H100 / H200


def ceiling_gbs() -> float:
    """HBM bandwidth the decode GB/s are read against: measured 3000 on the H100; the H200's nominal 4800."""
    return 4800.0 if "H200" in torch.cuda.get_device_name() else CEILING_GBS


def rel_err(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def quantized(n, k, dev="cuda"):
    import bitsandbytes.functional as BF

    gen = torch.Generator(device=dev).manual_seed(0)
    w = (torch.randn(n, k, device=dev, generator=gen) * k ** -0.5).to(torch.bfloat16)
    qweight, state = BF.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, compress_statistics=DOUBLE)
    return qweight, state, BF.dequantize_4bit(qweight, state)  # the last: bnb's dequantized bf16 weight


def _fused(fn):
    """fn run with the fused dequant-in-the-K-loop kernels (fxopt's default at these sizes is dequantize + cuBLAS)."""
    from fxopt.kernels import nf4

    def run():
        saved, nf4.DEQUANT_MIN_M = nf4.DEQUANT_MIN_M, 1 << 62
        try:
            return fn()
        finally:
            nf4.DEQUANT_MIN_M = saved
    return run


def bench_train(name, n, k, do_bench):
    import bitsandbytes.functional as BF

    from fxopt.kernels.nf4 import quant_args

    qweight, state, w = quantized(n, k)
    args = quant_args(qweight, state)
    x = torch.randn(M_TRAIN, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(M_TRAIN, n, device="cuda", dtype=torch.bfloat16)
    ref_y = x.float() @ w.float().t()
    ref_dx = dy.float() @ w.float()
    fx_fwd = lambda: torch.ops.fxopt.linear_4bit(x, *args[:6], None, *args[6:])  # noqa: E731
    fx_dx = lambda: torch.ops.fxopt.linear_4bit_dx(dy, *args)  # noqa: E731
    impls = {
        "bnb": (lambda: F.linear(x, BF.dequantize_4bit(qweight, state).to(x.dtype)),
                lambda: dy @ BF.dequantize_4bit(qweight, state).to(dy.dtype)),
        "fxopt": (fx_fwd, fx_dx),
        "fxopt_fused": (_fused(fx_fwd), _fused(fx_dx)),
        "dense": (lambda: F.linear(x, w), lambda: dy @ w),
    }
    flop = 2 * M_TRAIN * n * k
    rows = []
    for impl, (fwd, dx) in impls.items():
        row = dict(part="train", shape=name, N=n, K=k, M=M_TRAIN, impl=impl, gflop=flop / 1e9)
        try:
            row.update(rel_err_out=rel_err(fwd(), ref_y), rel_err_dx=rel_err(dx(), ref_dx))
            row["fwd_ms"] = do_bench(fwd, warmup=25, rep=100, return_mode="median")
            row["dx_ms"] = do_bench(dx, warmup=25, rep=100, return_mode="median")
            row["fwd_tflops"] = flop / (row["fwd_ms"] * 1e-3) / 1e12
            row["dx_tflops"] = flop / (row["dx_ms"] * 1e-3) / 1e12
        except Exception as e:  # a failing impl is recorded; the other shapes still run
            row["error"] = f"{type(e).__name__}: {e}"[:1000]
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r["impl"]: r for r in rows if r["part"] == "train"}
    for impl in ("fxopt", "fxopt_fused"):
        if all("error" not in by[i] for i in ("bnb", impl)):
            by[impl]["speedup_fwd"] = by["bnb"]["fwd_ms"] / by[impl]["fwd_ms"]
            by[impl]["speedup_dx"] = by["bnb"]["dx_ms"] / by[impl]["dx_ms"]
    return rows


def bench_dequant(name, n, k, do_bench, launches):
    """The dequantization alone (packed bytes read + bf16 weight written, GB/s): bnb's dequantize_4bit and fxopt's
    Triton kernel with each (packed bytes per program, warps) of `launches`; `exact`: bit-equal to bnb's output
    (`w` of quantized())."""
    import bitsandbytes.functional as BF

    from fxopt.kernels import nf4
    from fxopt.kernels.nf4 import quant_args

    qweight, state, w = quantized(n, k)
    q = nf4._quant(*quant_args(qweight, state))
    moved = n * k / 2 + 2 * n * k
    impls = [("bnb", None, lambda: BF.dequantize_4bit(qweight, state))]
    impls += [("fxopt", launch, lambda: nf4._dequantize_triton(q, torch.bfloat16)) for launch in launches]
    rows = []
    default = nf4.DEQUANT_BLOCK_BYTES, nf4.DEQUANT_WARPS
    try:
        for impl, launch, fn in impls:
            row = dict(part="dequant", shape=name, N=n, K=k, impl=impl)
            if launch is not None:
                row["block_bytes"], row["warps"] = nf4.DEQUANT_BLOCK_BYTES, nf4.DEQUANT_WARPS = launch
            try:
                out = fn()
                row["rel_err"] = rel_err(out.float(), w.float())
                row["exact"] = bool(torch.equal(out, w))
                row["us"] = 1e3 * do_bench(fn, warmup=25, rep=100, return_mode="median")
                row["gbs"] = moved / (row["us"] * 1e-6) / 1e9
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:1000]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        nf4.DEQUANT_BLOCK_BYTES, nf4.DEQUANT_WARPS = default
    return rows


def _with(setting, value, x, args):
    """The op with nf4.<setting> (WORDS_MAX_M or GEMV_MAX_M) set to value: which kernel path an M takes."""
    from fxopt.kernels import nf4

    old = getattr(nf4, setting)
    setattr(nf4, setting, value)
    try:
        return torch.ops.fxopt.linear_4bit(x, *args[:6], None, *args[6:])
    finally:
        setattr(nf4, setting, old)


def bench_decode(name, n, k, do_bench, do_bench_cudagraph):
    import copy

    import bitsandbytes as bnb

    from fxopt.kernels import nf4
    from fxopt.kernels.nf4 import quant_args

    qweight, state, w = quantized(n, k)
    args = quant_args(qweight, state)
    nbytes = n * k // 2

    def call(impl, x, data, st):
        """One decode-sized call of impl on the packed weight `data` with quantization state `st` (the weight's
        or one copy's). Nothing copied or imported here: the eager timing ("us") includes host time."""
        if impl == "bnb":
            return bnb.matmul_4bit(x, data, st)
        if impl == "fxopt":
            return torch.ops.fxopt.linear_4bit(x, data, st.absmax, *args[2:6], None, *args[6:])
        # fxopt_tile, the tile GEMV (tensor cores, split K): where the word GEMV runs, or dequantize + cuBLAS above
        setting, value = ("WORDS_MAX_M", 0) if x.shape[0] <= nf4.WORDS_MAX_M else ("GEMV_MAX_M", 16)
        return _with(setting, value, x, (data, st.absmax, *args[2:]))

    def copied():
        st = copy.copy(state)
        st.absmax = state.absmax.clone()
        return qweight.clone(), st

    # The graph replays one call per copy of the packed weight and its scales, enough copies that each is
    # evicted from L2 before its next read: decoding reads every layer's weight from HBM once per token, and a
    # weight of a few MB replayed alone would be read from L2.
    copies = [copied() for _ in range(max(1, min(64, L2_EVICT_BYTES // nbytes)))]
    rows = []
    for m in M_DECODE:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w.float().t()
        impls = {impl: functools.partial(call, impl, x, qweight, state) for impl in ("bnb", "fxopt", "fxopt_tile")}
        for impl, fn in impls.items():
            row = dict(part="decode", shape=name, N=n, K=k, M=m, impl=impl, weight_mb=nbytes / 1e6,
                       copies=len(copies))
            try:
                with torch.no_grad():
                    row["rel_err_out"] = rel_err(fn(), ref)  # also runs the autotuner before any graph capture
                    tuner = nf4._words_tuned if impl == "fxopt" and m <= nf4.WORDS_MAX_M else None
                    if tuner is not None and getattr(tuner, "best_config", None) is not None:
                        # the autotuner's pick varies from process to process here (session 21: gate_up M = 2
                        # 12.8 us in one process, 22.9 in another): recorded, to find the configs behind both
                        row["tuned"] = str(tuner.best_config)
                    row["us"] = 1e3 * do_bench(fn, warmup=25, rep=100, return_mode="median")
                    row["gbs"] = nbytes / (row["us"] * 1e-6) / 1e9
                    try:
                        def cycle(impl=impl):
                            for data, st in copies:
                                call(impl, x, data, st)
                        row["graph_us"] = 1e3 * do_bench_cudagraph(cycle, rep=100, return_mode="median") / len(copies)
                        row["graph_gbs"] = nbytes / (row["graph_us"] * 1e-6) / 1e9
                    except Exception as e:
                        row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:1000]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _cell(r, key, fmt, ceiling=None):
    if key not in r:
        return ""
    s = format(r[key], fmt)
    return s + (f" ({100 * r[key] / ceiling:.0f}%)" if ceiling else "")


def _err(r):
    return md_cell(r["error"])


def tables(rows, gpu, ceiling=CEILING_GBS) -> str:
    lines = [f"fxopt 4-bit linear vs bitsandbytes on {gpu}: {QUANT_TYPE}, blocksize {BLOCKSIZE}, double quant "
             f"{DOUBLE}, bf16. Median of triton.testing.do_bench.", ""]
    train = [r for r in rows if r["part"] == "train"]
    if train:
        lines += [f"Training-sized, M={M_TRAIN}: TFLOP/s (% of the {CEILING_TFLOPS:.0f} TFLOP/s bf16 ceiling). bnb = "
                  "dequantize_4bit + cuBLAS; fxopt = what training runs (Triton dequantization to a transient + "
                  "cuBLAS); fxopt_fused = the dequant-in-the-K-loop kernels; dense = cuBLAS on a bf16 weight (no "
                  "4-bit). rel err vs fp32.", "",
                  "| shape (N x K) | impl | fwd ms | fwd TFLOP/s | dX ms | dX TFLOP/s | speedup vs bnb fwd / dX "
                  "| rel err out / dX |", "|---|---|---|---|---|---|---|---|"]
        for r in train:
            label = f"{r['shape']} ({r['N']} x {r['K']})"
            if "error" in r:
                lines.append(f"| {label} | {r['impl']} | {_err(r)} | | | | | |")
                continue
            speed = f"{r['speedup_fwd']:.2f}x / {r['speedup_dx']:.2f}x" if "speedup_fwd" in r else ""
            lines.append(f"| {label} | {r['impl']} | {r['fwd_ms']:.3f} | {_cell(r, 'fwd_tflops', '.0f', CEILING_TFLOPS)} "
                         f"| {r['dx_ms']:.3f} | {_cell(r, 'dx_tflops', '.0f', CEILING_TFLOPS)} | {speed} "
                         f"| {r['rel_err_out']:.1e} / {r['rel_err_dx']:.1e} |")
        lines.append("")
    deq = [r for r in rows if r["part"] == "dequant"]
    if deq:
        lines += ["Dequantization alone (packed bytes read + bf16 weight written), GB/s (% of "
                  f"{ceiling:.0f} GB/s); launch: packed bytes per program / warps of fxopt's kernel; bit-exact: "
                  "equal to bnb's output:", "",
                  "| shape (N x K) | impl | launch | us | GB/s | rel err vs bnb | bit-exact |",
                  "|---|---|---|---|---|---|---|"]
        for r in deq:
            label = f"{r['shape']} ({r['N']} x {r['K']})"
            launch = f"{r['block_bytes']} / {r['warps']}" if "block_bytes" in r else ""
            if "error" in r:
                lines.append(f"| {label} | {r['impl']} | {launch} | {_err(r)} | | | |")
                continue
            lines.append(f"| {label} | {r['impl']} | {launch} | {r['us']:.1f} "
                         f"| {_cell(r, 'gbs', '.0f', ceiling)} | {r['rel_err']:.1e} | {r['exact']} |")
        lines.append("")
    decode = [r for r in rows if r["part"] == "decode"]
    if decode:
        lines += [f"Decode-sized forward (no_grad): GB/s of packed weight read (% of {ceiling:.0f} GB/s). bnb = "
                  "bnb.matmul_4bit; fxopt = the op (the word GEMV for M <= 4, dequantize + cuBLAS above); fxopt_tile = "
                  "the tile GEMV (tensor cores, split K) at the same M. 'graph': replayed in a CUDA graph (no launch "
                  "overhead), one call per copy of the weight over enough copies that each is read from HBM, not "
                  "L2 (the plain timing clears L2 before each call).", "",
                  "| shape (N x K) | M | impl | us | GB/s | graph us | graph GB/s | rel err |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in decode:
            label = f"{r['shape']} ({r['N']} x {r['K']})"
            if "error" in r:
                lines.append(f"| {label} | {r['M']} | {r['impl']} | {_err(r)} | | | | |")
                continue
            graph = (f"{r['graph_us']:.1f} | {_cell(r, 'graph_gbs', '.0f', ceiling)}" if "graph_us" in r
                     else f"{r.get('graph_error', '')[:80]} | ")
            lines.append(f"| {label} | {r['M']} | {r['impl']} | {r['us']:.1f} | {_cell(r, 'gbs', '.0f', ceiling)} "
                         f"| {graph} | {r['rel_err_out']:.1e} |")
    return "\n".join(lines)


def main():
    p = parser(__doc__)
    p.add_argument("--shapes", default="", help=f"comma-separated subset of {list(SHAPES) + list(LARGE_SHAPES)} "
                   "(default: all; the large ones decode only)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--dequant-sweep", action="store_true",
                   help="time the dequantization kernel with each launch of DEQUANT_SWEEP, on every named shape "
                        "(by default only its current launch, on the training shapes, with the training part)")
    args = p.parse_args()
    known = {**SHAPES, **LARGE_SHAPES}
    names = subset(p, "--shapes", args.shapes, known)
    if not gpu_ready("bench_nf4.py"):
        return
    import bitsandbytes
    from triton.testing import do_bench, do_bench_cudagraph

    from fxopt.kernels import nf4  # registers the torch.ops.fxopt 4-bit ops

    rows = []
    for name in names:
        n, k = known[name]
        if args.dequant_sweep or (not args.skip_train and name in SHAPES):
            launches = DEQUANT_SWEEP if args.dequant_sweep else [(nf4.DEQUANT_BLOCK_BYTES, nf4.DEQUANT_WARPS)]
            rows += bench_dequant(name, n, k, do_bench, launches)
        if not args.skip_train and name in SHAPES:
            rows += bench_train(name, n, k, do_bench)
        if not args.skip_decode:
            rows += bench_decode(name, n, k, do_bench, do_bench_cudagraph)
        torch.cuda.empty_cache()

    env = environment(bitsandbytes=bitsandbytes.__version__)
    gpu = env["gpu"]
    ceiling = ceiling_gbs()
    write(args.out, "nf4-kernel", args.tag, {"env": env, **{"ceiling_tflops": CEILING_TFLOPS, "ceiling_gbs": ceiling,
                                                          "rows": rows}}, tables(rows, gpu, ceiling))


if __name__ == "__main__":
    main()
