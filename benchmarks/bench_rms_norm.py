"""Microbenchmark of torch.ops.fxopt.rms_norm (and fxopt.layer_norm) against eager PyTorch and torch.compile
(Inductor) of the same Hugging Face math, bf16 activations:

    s = x + residual (optional);  out = w * (s.float() * rsqrt(mean(s.float()^2, -1) + eps)).to(bf16)
    LayerNorm cases: out = F.layer_norm(s, (N,), w, b, eps) (nn.LayerNorm's math, bf16 weight and bias)

Cases (M rows x N hidden): the decoder norms of 1B/8B/70B-shaped models (M = 8192 tokens, N = 2048, 4096,
8192), alone and fused with the residual add before them; per-head q/k norms (M = 8192 tokens x 32 heads,
N = 128); Gemma's scale_then_cast order (offset 1); a row longer than the register tile (N = 16384, the
chunked path). The weight is frozen (LoRA) unless the case says "w trained" (then dweight is computed).

Per implementation: forward ms (with grad enabled, as in training) and forward+backward ms
(median of the kernels replayed in a CUDA graph, as training runs them: triton.testing.do_bench_cudagraph; with
--no-cudagraph, eager launches by triton.testing.do_bench, launch overhead included), the achieved GB/s of forward+backward counted
on the bytes a fused kernel must move (forward: read x [and residual], write out [and s]; backward: read
dy [and ds] and x or s, write dx; rstd and the weight are negligible), against the ~3.0 TB/s measured HBM
ceiling of the H100, and the relative error of out and dx against the same math in float64.

    python benchmarks/bench_rms_norm.py [--out DIR] [--tag TAG] [--cases A,B] [--no-cudagraph]
CUDA only: on a machine without a GPU it prints a message and exits 0.
"""
from __future__ import annotations

import json

import torch

from kernel_results import environment, gpu_ready, md_cell, parser, subset, write

CEILING_GBS = 3000.0  # HBM bandwidth measured on the H100 of the device machine
TOKENS, EPS = 8192, 1e-6
# name: (rows, hidden, residual, cast_then_scale, weight trained[, "layer": a LayerNorm with weight and bias])
CASES = {
    "1B norm": (TOKENS, 2048, False, True, False),
    "1B add+norm": (TOKENS, 2048, True, True, False),
    "1B add+norm, w trained": (TOKENS, 2048, True, True, True),
    "8B norm": (TOKENS, 4096, False, True, False),
    "8B add+norm": (TOKENS, 4096, True, True, False),
    "70B add+norm": (TOKENS, 8192, True, True, False),
    "q/k norm (head_dim 128)": (TOKENS * 32, 128, False, True, False),
    "gemma add+norm (scale_then_cast)": (TOKENS, 2048, True, False, False),
    "chunked row (16384)": (TOKENS // 2, 16384, True, True, False),
    "1B LayerNorm": (TOKENS, 2048, False, True, False, "layer"),
    "1B add+LayerNorm": (TOKENS, 2048, True, True, False, "layer"),
    "8B add+LayerNorm, w trained": (TOKENS, 4096, True, True, True, "layer"),
}


def hf_math(x, w, residual, cast_then_scale, bias=None):
    """What the Hugging Face modules compute (eager, and what torch.compile is given); a bias: LayerNorm."""
    if bias is not None:  # nn.LayerNorm after the residual add
        s = x if residual is None else x + residual
        out = torch.nn.functional.layer_norm(s, (s.shape[-1],), w, bias, EPS)
        return out if residual is None else (out, s)
    from fxopt.kernels.rms_norm import reference

    return reference(x, w, EPS, residual, 0.0 if cast_then_scale else 1.0, cast_then_scale)


def fxopt_op(x, w, residual, cast_then_scale, bias=None):
    if bias is not None:
        from fxopt.kernels.layer_norm import layer_norm_fn

        return layer_norm_fn(x, w, bias, EPS, residual)
    from fxopt.kernels.rms_norm import rms_norm_fn

    return rms_norm_fn(x, w, EPS, residual, 0.0 if cast_then_scale else 1.0, cast_then_scale)


def _as_list(out):
    return list(out) if isinstance(out, tuple) else [out]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bench_case(name, case, do_bench, compiled, dev="cuda"):
    m, n, residual, cts, w_trained = case[:5]
    layer = case[5:] == ("layer",)
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*size, dtype=torch.bfloat16, std=1.0, mean=0.0):
        return (torch.randn(*size, device=dev, generator=gen) * std + mean).to(dtype)

    x = randn(m, n).requires_grad_()
    r = randn(m, n).requires_grad_() if residual else None
    w = randn(n, std=0.1, mean=1.0 if cts else 0.0).requires_grad_(w_trained)
    bias = randn(n, std=0.1).requires_grad_(w_trained) if layer else None
    grads = [randn(m, n)] + ([randn(m, n)] if residual else [])  # d out, and d s (the next residual add)
    leaves = [t for t in (x, r, w, bias) if t is not None and t.requires_grad]

    def d64(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

    x64, r64, w64 = d64(x), d64(r), d64(w)
    ref = _as_list(hf_math(x64, w64, r64, cts, d64(bias)))
    (ref_dx,) = torch.autograd.grad(ref, [x64], [g.double() for g in grads])
    del x64, r64, w64, ref[1:]

    elem = x.element_size()
    fwd_bytes = m * n * elem * (2 + 2 * residual)  # x [, residual] in; out [, s] out
    bwd_bytes = m * n * elem * (3 + residual)  # dy [, ds], x or s in; dx out
    rows = []
    impls = [("eager", hf_math), ("compile", compiled), ("fxopt", fxopt_op)]
    for impl, fn in impls:
        row = dict(case=name, M=m, N=n, residual=residual,
                   variant="layer_norm" if layer else "cast_then_scale" if cts else "scale_then_cast",
                   weight_trained=w_trained, impl=impl, fwd_mb=fwd_bytes / 1e6, bwd_mb=bwd_bytes / 1e6)
        try:
            outs = _as_list(fn(x, w, r, cts, bias))
            (dx,) = torch.autograd.grad(outs, [x], grads)
            row.update(rel_err_out=rel_err(outs[0], ref[0]), rel_err_dx=rel_err(dx, ref_dx))
            del outs, dx

            def fwd():
                fn(x, w, r, cts, bias)

            def fwd_bwd():  # gradients into fresh buffers (as into cleared .grad), so a CUDA graph can replay it
                torch.autograd.grad(_as_list(fn(x, w, r, cts, bias)), leaves, grads)

            fwd_bwd()  # compiles and autotunes outside any graph capture
            row["fwd_ms"] = do_bench(fwd)
            row["fwd_bwd_ms"] = do_bench(fwd_bwd)
            row["fwd_gbs"] = fwd_bytes / (row["fwd_ms"] * 1e-3) / 1e9
            row["fwd_bwd_gbs"] = (fwd_bytes + bwd_bytes) / (row["fwd_bwd_ms"] * 1e-3) / 1e9
        except Exception as e:  # a failing impl is recorded; the others still run
            row["error"] = f"{type(e).__name__}: {e}"[:1000]
        for leaf in leaves:
            leaf.grad = None
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r["impl"]: r for r in rows}
    f = by["fxopt"]
    for base in ("eager", "compile"):
        b = by[base]
        if "error" not in b and "error" not in f:
            f[f"speedup_fwd_bwd_vs_{base}"] = b["fwd_bwd_ms"] / f["fwd_bwd_ms"]
    return rows


def table(rows, gpu, cudagraph: bool = True) -> str:
    lines = [
        f"torch.ops.fxopt.rms_norm (LayerNorm cases: fxopt.layer_norm) vs eager and torch.compile (Inductor) on "
        f"{gpu}, bf16 activations, median of triton.testing.do_bench{'_cudagraph (CUDA-graph replay)' if cudagraph else ' (eager launches)'}. GB/s on the bytes a fused kernel must move; % of the {CEILING_GBS:.0f} GB/s "
        "ceiling. rel err: ||x - ref|| / ||ref|| against float64.",
        "",
        "| case (M x N) | impl | fwd ms | fwd GB/s (%) | fwd+bwd ms | fwd+bwd GB/s (%) | fxopt speedup vs eager / compile "
        "| rel err out / dx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = f"{r['case']} ({r['M']} x {r['N']})"
        if "error" in r:
            err = md_cell(r["error"])
            lines.append(f"| {label} | {r['impl']} | {err} | | | | | |")
            continue
        speed = ""
        if "speedup_fwd_bwd_vs_eager" in r:
            speed = f"{r['speedup_fwd_bwd_vs_eager']:.2f}x / {r.get('speedup_fwd_bwd_vs_compile', float('nan')):.2f}x"
        lines.append(
            f"| {label} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_gbs']:.0f} ({100 * r['fwd_gbs'] / CEILING_GBS:.0f}%) "
            f"| {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_gbs']:.0f} ({100 * r['fwd_bwd_gbs'] / CEILING_GBS:.0f}%) | {speed} "
            f"| {r['rel_err_out']:.1e} / {r['rel_err_dx']:.1e} |")
    return "\n".join(lines)


def main():
    p = parser(__doc__)
    p.add_argument("--no-cudagraph", dest="cudagraph", action="store_false",
                   help="time eager launches (launch overhead included) instead of CUDA-graph replays")
    p.add_argument("--cases", default="", help=f"comma-separated subset of {list(CASES)} (default: all)")
    args = p.parse_args()
    names = subset(p, "--cases", args.cases, CASES)
    if not gpu_ready("bench_rms_norm.py"):
        return
    from triton.testing import do_bench, do_bench_cudagraph

    def timer(fn):  # replayed in a CUDA graph, as training runs: the kernels' time, not their launch overhead
        return (do_bench_cudagraph(fn, rep=100, return_mode="median") if args.cudagraph
                else do_bench(fn, warmup=25, rep=100, return_mode="median"))

    import fxopt.kernels.layer_norm  # noqa: F401  (registers torch.ops.fxopt.layer_norm)
    import fxopt.kernels.rms_norm  # noqa: F401  (registers torch.ops.fxopt.rms_norm)

    # dynamic=False: one static graph per case, what Inductor does best
    compiled = torch.compile(hf_math, dynamic=False)
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)

    rows = []
    for name in names:
        rows += bench_case(name, CASES[name], timer, compiled)
        torch.cuda.empty_cache()

    env = environment()
    gpu = env["gpu"]
    write(args.out, "rms-norm-kernel", args.tag, {"env": env, **{"ceiling_gbs": CEILING_GBS, "rows": rows}}, table(rows, gpu, args.cudagraph))


if __name__ == "__main__":
    main()
