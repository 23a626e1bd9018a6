"""Microbenchmark of torch.ops.fxopt.flash_attention against PyTorch's SDPA with its flash backend forced
(`sdpa_kernel(SDPBackend.FLASH_ATTENTION)`, `enable_gqa=True`), bf16, causal, at the dense workload's attention
shapes: 32 query heads, 8 kv heads, head dim 64; B=4 x S=2048 and B=1 x S=8192. q, k, v are given as HF gives
them: [B, S, H, D] projections transposed to [B, H, S, D] views. Also the call the attention pass rewrites:
SDPA with transformers' bool [B, 1, S, S] causal mask and repeat_kv's expanded K/V (SDPA picks its backend;
flash takes no mask) against fxopt's op given that mask.

Per implementation: forward ms (grad enabled, as in training) and forward+backward ms (triton.testing.do_bench
median, .grad cleared between runs), and TFLOP/s counted on the causal attention's useful work: forward
4 * B * Hq * D * S (S + 1) / 2 (QK^T and PV over the visible pairs), backward 2.5x that (five GEMMs of the same
size instead of two), against the ~798 TFLOP/s bf16 dense ceiling of the H100. Accuracy: ||x - ref|| / ||ref|| of
out, dq, dk, dv against float64 math on the first kv head's group (query heads 0-3 of batch 0: every gradient
of that kv head is a function of that group alone), for both implementations.

    python benchmarks/bench_attention.py [--out DIR] [--tag TAG] [--cases NAME,...|all]
CUDA only: on a machine without a GPU it prints a message and exits 0.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from kernel_results import environment, gpu_ready, md_cell, parser, subset, write

CEILING_TFLOPS = 798.0  # bf16 dense GEMM measured on the H100 of the device machine
# name: (B, S, Hq, Hkv, D, window, softcap); the first two are the dense workload's (run by default)
CASES = {
    "B4 S2048": (4, 2048, 32, 8, 64, 0, 0.0),
    "B1 S8192": (1, 8192, 32, 8, 64, 0, 0.0),
    "B4 S2048 D128": (4, 2048, 32, 8, 128, 0, 0.0),
    "B1 S8192 window 4096": (1, 8192, 32, 8, 64, 4096, 0.0),
}
DEFAULT = ["B4 S2048", "B1 S8192"]
DTYPE = torch.bfloat16  # --dtype float32: the QLoRA recipe's fp32 attention


def hf_causal_mask(q):
    """The bool [B, 1, S, S] causal mask transformers hands SDPA in a compiled model (one mask expanded over
    the batch)."""
    B, _, S, _ = q.shape
    return torch.ones(S, S, dtype=torch.bool, device=q.device).tril()[None, None].expand(B, 1, S, S)


def sdpa_hf_mask(q, k, v, window, softcap):
    """What HF's sdpa attention runs inside a compiled model: SDPA's own backend choice with the bool mask
    (flash cannot take a mask) and repeat_kv's expanded K/V."""
    if window or softcap:
        raise NotImplementedError("causal only")
    g = q.shape[1] // k.shape[1]
    B, hkv, S, D = k.shape
    k = k[:, :, None].expand(B, hkv, g, S, D).reshape(B, hkv * g, S, D)
    v = v[:, :, None].expand(B, hkv, g, S, D).reshape(B, hkv * g, S, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=hf_causal_mask(q))


def fxopt_hf_mask(q, k, v, window, softcap):
    """fxopt's attention pass on that call: the op with the mask itself (summarised in tiles, see the op)."""
    from fxopt.kernels.attention import flash_attention_fn

    if window or softcap:
        raise NotImplementedError("causal only")
    return flash_attention_fn(q, k, v, mask=hf_causal_mask(q))


def sdpa_flash(q, k, v, window, softcap):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if window or softcap:
        raise NotImplementedError("SDPA's flash backend has no sliding window or softcap")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def fxopt_op(q, k, v, window, softcap):
    from fxopt.kernels.attention import flash_attention_fn

    return flash_attention_fn(q, k, v, causal=True, window=window, softcap=softcap)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference_group(q, k, v, do, window, softcap, group):
    """out, dq, dk, dv in float64 for batch 0, kv head 0 and its query heads 0 .. group - 1."""
    from fxopt.kernels.attention import reference

    leaves = [t[:1, :n].detach().double().requires_grad_() for t, n in ((q, group), (k, 1), (v, 1))]
    out = reference(*leaves, q.shape[-1] ** -0.5, True, window, softcap)
    grads = torch.autograd.grad(out, leaves, do[:1, :group].double())
    return [out.detach(), *grads]


def bench_case(name, case, do_bench, dev="cuda"):
    B, S, hq, hkv, D, window, softcap = case
    group = hq // hkv
    gen = torch.Generator(device=dev).manual_seed(0)

    def bshd(h):  # a projection's output viewed [B, S, H, D], transposed as HF does
        return torch.randn(B, S, h, D, device=dev, generator=gen, dtype=DTYPE).transpose(1, 2)

    q, k, v = (bshd(h).requires_grad_() for h in (hq, hkv, hkv))
    do = torch.randn(B, hq, S, D, device=dev, generator=gen, dtype=DTYPE)
    leaves = [q, k, v]
    ref = reference_group(q, k, v, do, window, softcap, group)
    torch.cuda.empty_cache()

    pairs = S * (S + 1) // 2 if not window else sum(min(i + 1, window) for i in range(S))
    fwd_flop = 4 * B * hq * D * pairs
    bwd_flop = 2.5 * fwd_flop
    rows = []
    impls = [("sdpa-flash", sdpa_flash), ("fxopt", fxopt_op), ("sdpa-hf-mask", sdpa_hf_mask),
             ("fxopt-hf-mask", fxopt_hf_mask)]
    for impl, fn in impls:
        row = dict(case=name, B=B, S=S, Hq=hq, Hkv=hkv, D=D, window=window, softcap=softcap, causal=True,
                   impl=impl, fwd_gflop=fwd_flop / 1e9, bwd_gflop=bwd_flop / 1e9)
        try:
            out = fn(q, k, v, window, softcap)  # first call: autotuning (fxopt), not timed
            grads = torch.autograd.grad(out, leaves, do)
            got = [out[:1, :group], grads[0][:1, :group], grads[1][:1, :1], grads[2][:1, :1]]
            for what, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
                row[f"rel_err_{what}"] = rel_err(a, b)
            del out, grads, got

            def fwd():
                fn(q, k, v, window, softcap)

            def fwd_bwd():
                fn(q, k, v, window, softcap).backward(do)

            row["fwd_ms"] = do_bench(fwd, warmup=25, rep=100, return_mode="median")
            row["fwd_bwd_ms"] = do_bench(fwd_bwd, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
            row["fwd_tflops"] = fwd_flop / (row["fwd_ms"] * 1e-3) / 1e12
            row["fwd_bwd_tflops"] = (fwd_flop + bwd_flop) / (row["fwd_bwd_ms"] * 1e-3) / 1e12
        except Exception as e:  # a failing impl is recorded; the other still runs
            row["error"] = f"{type(e).__name__}: {e}"[:1000]
        for leaf in leaves:
            leaf.grad = None
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r["impl"]: r for r in rows}
    for mine, theirs in (("fxopt", "sdpa-flash"), ("fxopt-hf-mask", "sdpa-hf-mask")):
        f, s = by[mine], by[theirs]
        if "error" not in f and "error" not in s:
            f["speedup_fwd_vs_sdpa"] = s["fwd_ms"] / f["fwd_ms"]
            f["speedup_fwd_bwd_vs_sdpa"] = s["fwd_bwd_ms"] / f["fwd_bwd_ms"]
    return rows


def table(rows, gpu) -> str:
    lines = [
        f"torch.ops.fxopt.flash_attention vs SDPA on {gpu}, bf16, causal: fxopt (causal flag) vs sdpa-flash "
        "(flash backend forced, enable_gqa, is_causal); fxopt-hf-mask (the bool [B, 1, S, S] causal mask, as the "
        "attention pass calls it) vs sdpa-hf-mask (what HF runs in a compiled model: that mask, repeat_kv, SDPA's "
        "own backend choice); "
        "median of triton.testing.do_bench. TFLOP/s on the causal work (fwd 4*B*Hq*D*pairs, bwd 2.5x), % of the "
        f"{CEILING_TFLOPS:.0f} TFLOP/s bf16 ceiling. rel err: ||x - ref|| / ||ref|| against float64 on one kv "
        "head's group.",
        "",
        "| case (B, S, Hq/Hkv, D) | impl | fwd ms | fwd TFLOP/s (%) | fwd+bwd ms | fwd+bwd TFLOP/s (%) "
        "| fxopt speedup fwd / fwd+bwd | rel err out / dq / dk / dv |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = f"{r['case']} ({r['B']}, {r['S']}, {r['Hq']}/{r['Hkv']}, {r['D']})"
        if "error" in r:
            err = md_cell(r["error"])
            lines.append(f"| {label} | {r['impl']} | {err} | | | | | |")
            continue
        speed = ""
        if "speedup_fwd_vs_sdpa" in r:
            speed = f"{r['speedup_fwd_vs_sdpa']:.2f}x / {r['speedup_fwd_bwd_vs_sdpa']:.2f}x"
        errs = " / ".join(f"{r[f'rel_err_{w}']:.1e}" for w in ("out", "dq", "dk", "dv"))
        lines.append(
            f"| {label} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} "
            f"({100 * r['fwd_tflops'] / CEILING_TFLOPS:.0f}%) | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.0f} "
            f"({100 * r['fwd_bwd_tflops'] / CEILING_TFLOPS:.0f}%) | {speed} | {errs} |")
    return "\n".join(lines)


def main():
    p = parser(__doc__)
    p.add_argument("--cases", default="", help=f"comma-separated subset of {list(CASES)}, or 'all' "
                                               f"(default: {DEFAULT})")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="q, k, v dtype (float32: the QLoRA recipe's attention)")
    args = p.parse_args()
    names = subset(p, "--cases", args.cases, CASES, DEFAULT)
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    if not gpu_ready("bench_attention.py"):
        return
    from triton.testing import do_bench

    import fxopt.kernels.attention  # noqa: F401  (registers torch.ops.fxopt.flash_attention)

    rows = []
    for name in names:
        rows += bench_case(name, CASES[name], do_bench)
        torch.cuda.empty_cache()

    env = environment()
    tag = args.tag if DTYPE == torch.bfloat16 else "-".join(filter(None, ["fp32", args.tag]))
    write(args.out, "attention-kernel", tag, {"env": env, "ceiling_tflops": CEILING_TFLOPS, "rows": rows},
          table(rows, env["gpu"]))


if __name__ == "__main__":
    main()
