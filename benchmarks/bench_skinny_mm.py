"""Microbenchmark of the LoRA adapter's skinny products (fxopt/kernels/skinny_mm.py) against the torch ops they
replace (split the fp32 operand into bf16 hi + lo, concatenate, one cuBLAS GEMM with an fp32 result, add the
halves), on the dense workload's shapes (8192 tokens, hidden 2048, intermediate 8192, LoRA r = 16; q/k/v share
one t of 48 columns):

    t  = x @ A^T     [tokens x R]   x bf16, A fp32            (forward)
    u  = dY @ B      [tokens x r]   dY bf16, B fp32           (backward)
    dA = u^T @ x     [r x K]        as (x^T u)^T, x transposed (backward)
    dB = dY^T @ t    [N x r]        dY transposed             (backward)

Per product: microseconds (triton.testing.do_bench median), GB/s on the bf16 operand's bytes (the product
reads it once; against the ~3.0 TB/s HBM ceiling) and the relative error of both against float64. --sweep
also times each launch configuration in SWEEP (the candidates for skinny_mm.CONFIGS).

    python benchmarks/bench_skinny_mm.py [--out DIR] [--tag TAG] [--sweep]
CUDA only: on a machine without a GPU it prints a message and exits 0.
"""
from __future__ import annotations

import json

import torch

from kernel_results import environment, gpu_ready, write

CEILING_GBS = 3000.0
T = 8192
# name: (rows, inner, R, transposed activation); the activation is [rows x inner] (or its transpose)
CASES = {
    "t = x A^T, q/k/v (R 48)": (T, 2048, 48, False),
    "t = x A^T, down (K 8192)": (T, 8192, 16, False),
    "u = dY B, gate (N 8192)": (T, 8192, 16, False),
    "u = dY B, q (N 2048)": (T, 2048, 16, False),
    "dA^T = x^T u (K 2048)": (2048, T, 16, True),
    "dA^T = h^T u (K 8192)": (8192, T, 16, True),
    "dB = dY^T t (N 8192)": (8192, T, 16, True),
    "dB = dY^T t (N 512)": (512, T, 16, True),
}
SWEEP = [dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=s)
         for bm, bk, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3),
                              (256, 64, 8, 3), (128, 32, 4, 4)]]


def torch_split(x, s):
    """What fxopt ran before: s = hi + lo in bf16, one GEMM over [hi, lo], the halves added."""
    hi = s.to(torch.bfloat16)
    lo = (s - hi.float()).to(torch.bfloat16)
    r = torch.mm(x, torch.cat([hi, lo], 1), out_dtype=torch.float32)
    return r[:, :s.shape[1]] + r[:, s.shape[1]:]


def main():
    p = parser_with_sweep()
    args = p.parse_args()
    if not gpu_ready("bench_skinny_mm.py"):
        return
    from triton.testing import do_bench

    from fxopt.kernels import skinny_mm

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    configs = SWEEP if args.sweep else [None]
    default = {w: dict(c) for w, c in skinny_mm.CONFIGS.items()}
    for name, (m, k, r, transposed) in CASES.items():
        x = torch.randn(*((k, m) if transposed else (m, k)), device="cuda", generator=gen).to(torch.bfloat16)
        x = x.t() if transposed else x
        s = torch.randn(k, r, device="cuda", generator=gen) * 0.02
        ref = x.double() @ s.double()
        gb = x.numel() * 2 / 1e9
        impls = [("torch split", lambda: torch_split(x, s), None)]
        impls += [(f"skinny_mm {c or 'default'}", lambda: skinny_mm.skinny_mm(x, s), c) for c in configs]
        for impl, fn, cfg in impls:
            if cfg is not None:  # the swept config for every width
                for c in skinny_mm.CONFIGS.values():
                    c.update(cfg)
            row = dict(case=name, rows=m, inner=k, R=r, transposed=transposed, impl=impl)
            try:
                out = fn()
                row["rel_err"] = ((out.double() - ref).norm() / ref.norm()).item()
                row["us"] = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
                row["gbs"] = gb / (row["us"] * 1e-6)
            except Exception as e:  # a failing config is recorded; the others still run
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
        for w, c in default.items():
            skinny_mm.CONFIGS[w].update(c)
    lines = [f"Adapter skinny products on {environment()['gpu']}: torch ops (bf16 hi/lo split + cuBLAS) against "
             f"fxopt's skinny_mm kernel. GB/s on the bf16 operand read once; % of {CEILING_GBS:.0f} GB/s.", "",
             "| product | impl | us | GB/s (%) | rel err vs fp64 |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['impl']} | {r['error'][:80]} | | |")
        else:
            lines.append(f"| {r['case']} | {r['impl']} | {r['us']:.1f} | {r['gbs']:.0f} "
                         f"({100 * r['gbs'] / CEILING_GBS:.0f}%) | {r['rel_err']:.1e} |")
    write(args.out, "skinny-mm-kernel", args.tag, {"env": environment(), "rows": rows}, "\n".join(lines))


def parser_with_sweep():
    from kernel_results import parser

    p = parser(__doc__)
    p.add_argument("--sweep", action="store_true", help="also time each launch configuration in SWEEP")
    return p


if __name__ == "__main__":
    main()
