"""Microbenchmark of fxopt::lora_linear against the plain torch (cuBLAS) path, dense-workload shapes.

    python benchmarks/bench_lora.py            # CUDA only; writes benchmarks/results/<date>-<gpu>-lora-kernel.{json,md}
"""
from __future__ import annotations

import datetime
import json
import os
import re

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M, R = 8192, 16
SHAPES = {  # name: list of (K, N) sharing one input
    "q": [(2048, 2048)], "k/v": [(2048, 512)], "o": [(2048, 2048)], "gate/up": [(2048, 8192)],
    "down": [(8192, 2048)], "qkv fused": [(2048, 2048), (2048, 512), (2048, 512)],
    "gate+up fused": [(2048, 8192), (2048, 8192)],
}


def torch_path(x, ws, as_, bs, s):
    return [F.linear(x, w) + s * F.linear(F.linear(x.to(a.dtype), a), b).to(x.dtype) for w, a, b in zip(ws, as_, bs)]


def main():
    if not torch.cuda.is_available():
        print("bench_lora: needs CUDA; nothing to do on this machine")
        return
    import triton.testing

    from fxopt.kernels.lora import lora_linear_fn

    rows = []
    for adapter_dtype in (torch.float32, torch.bfloat16):
        for name, shapes in SHAPES.items():
            K = shapes[0][0]
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            ws = [torch.randn(n, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for _, n in shapes]
            as_ = [(torch.randn(R, K, device="cuda", dtype=adapter_dtype) / K**0.5).requires_grad_() for _ in shapes]
            bs = [(torch.randn(n, R, device="cuda", dtype=adapter_dtype) / R**0.5).requires_grad_() for _, n in shapes]
            gs = [torch.randn(M, n, device="cuda", dtype=torch.bfloat16) for _, n in shapes]
            flops_fwd = sum(2 * M * K * n + 2 * M * K * R + 2 * M * R * n for _, n in shapes)
            # backward with W frozen: dX = dY W (+ low rank), dA, dB, u = dY B
            flops_bwd = sum(2 * M * n * K + 2 * M * R * (K + n) * 2 for _, n in shapes)
            fns = {
                "torch": lambda: torch_path(x, ws, as_, bs, 2.0),
                "fxopt": lambda: lora_linear_fn(x, ws, [None] * len(ws), as_, bs, [2.0] * len(ws)),
            }
            out_ref = torch_path(x, ws, as_, bs, 2.0)
            out_fx = fns["fxopt"]()
            err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(out_fx, out_ref))
            for impl, fn in fns.items():
                fwd = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

                def fwd_bwd():
                    outs = fn()
                    torch.autograd.backward(outs, gs)

                both = triton.testing.do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median", grad_to_none=[x, *as_, *bs])
                rows.append(dict(shape=name, adapter_dtype=str(adapter_dtype).replace("torch.", ""), impl=impl,
                                 fwd_ms=fwd, fwd_bwd_ms=both, fwd_tflops=flops_fwd / fwd / 1e9,
                                 fwd_bwd_tflops=(flops_fwd + flops_bwd) / both / 1e9, rel_err_vs_torch=err))
                print(rows[-1], flush=True)
    gpu = torch.cuda.get_device_name()
    lines = [f"fxopt::lora_linear vs torch (cuBLAS), M={M} tokens, r={R}, bf16 base, on {gpu} (ceiling ~798 TFLOP/s bf16)", "",
             "| shape | adapters | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | rel err vs torch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['adapter_dtype']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | "
                     f"{r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.0f} | {r['rel_err_vs_torch']:.1e} |")
    md = "\n".join(lines)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    base = os.path.join(ROOT, "benchmarks", "results", f"{datetime.date.today().isoformat()}-{slug}-lora-kernel")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(rows, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
