"""Microbenchmark of torch.ops.fxopt.lora_linear against the plain torch path (cuBLAS), dense-workload shapes.

    out_i = x W_i^T + s_i (x A_i^T) B_i^T       torch path: F.linear(x, W) + s * F.linear(F.linear(x, A), B)

M = 8192 tokens (batch 4 x 2048), r = 16, s = lora_alpha / r = 1, bf16 base weights (frozen), adapters in fp32
(what PEFT makes by default over a bf16 base) and in bf16. Shapes (K, N) of the Llama-3.2-1B-shaped dense
workload, alone and in the fused forms the LoRA pass builds (q/k/v sharing one input: n=3; gate/up: n=2).
Forward and forward+backward (dX, dA, dB; W frozen), timed with triton.testing.do_bench (median; it warms
up and clears L2 between runs), on random data. Achieved TFLOP/s is given against the ~798 TFLOP/s bf16
ceiling measured on the H100 (../shared/BASELINES.md).

    python benchmarks/bench_lora.py [--out DIR] [--tag TAG]
CUDA only: on a machine without a GPU it prints a message and exits 0.
"""
from __future__ import annotations

import json

import torch

from kernel_results import environment, gpu_ready, md_cell, parser, subset, write
import torch.nn.functional as F

CEILING_TFLOPS = 798.0  # bf16 matrix units, measured on the H100 of the device machine
M, R, SCALE = 8192, 16, 1.0
# name: the (K, N) of each projection sharing one input x [M, K]. q and o have the same shape: one row.
SHAPES = {
    "q_o": [(2048, 2048)],
    "k_v": [(2048, 512)],
    "gate_up": [(2048, 8192)],
    "down": [(8192, 2048)],
    "qkv_fused": [(2048, 2048), (2048, 512), (2048, 512)],  # n=3, one input
    "gate_up_fused": [(2048, 8192), (2048, 8192)],  # n=2, one input
}


def flops(shapes):
    """Useful flops, summed over the projections (a matmul [a, b] x [b, c] counts 2abc).
    forward:  x W^T (2MKN) + x A^T (2MKr) + t B^T (2MrN)
    backward, W frozen (no dW): dX = dY W (2MNK); u = dY B (2MNr); dX += u A (2MrK); dA = u^T x (2rMK);
              dB = dY^T t (2NMr)"""
    fwd = sum(2 * M * K * N + 2 * M * R * (K + N) for K, N in shapes)
    bwd = sum(2 * M * N * K + 4 * M * R * (K + N) for K, N in shapes)
    return fwd, bwd


def torch_path(x, ws, lora_as, lora_bs, scalings):
    """What PEFT's LoRA Linear computes per projection: the adapter branch in the adapter dtype, added to
    the base output, the sum cast back to x.dtype. Each F.linear is one cuBLAS GEMM."""
    outs = []
    for w, a, b, s in zip(ws, lora_as, lora_bs, scalings):
        base = F.linear(x, w)
        lora = F.linear(F.linear(x.to(a.dtype), a), b) * s
        outs.append((base + lora).to(x.dtype))
    return outs


def fxopt_path(x, ws, lora_as, lora_bs, scalings):
    from fxopt.kernels.lora import lora_linear_fn

    return lora_linear_fn(x, ws, [None] * len(ws), lora_as, lora_bs, scalings)


def rel_err(got, ref):
    return max(((g.double() - r.double()).norm() / r.double().norm()).item() for g, r in zip(got, ref))


def bench_case(name, shapes, adapter_dtype, do_bench, dev="cuda"):
    """Times both impls on one shape group; returns one row per impl."""
    K = shapes[0][0]
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*size, dtype, std=1.0):
        return torch.randn(*size, device=dev, dtype=torch.float32, generator=gen).mul_(std).to(dtype)

    # Scaled so that every output has unit-ish variance (no overflow, no underflow; never zeros as data).
    x = randn(M, K, dtype=torch.bfloat16).requires_grad_()  # x needs dX: the layers below it are trained
    ws = [randn(N, K, dtype=torch.bfloat16, std=K ** -0.5) for _, N in shapes]  # frozen base weights
    lora_as = [randn(R, K, dtype=adapter_dtype, std=K ** -0.5).requires_grad_() for _ in shapes]
    lora_bs = [randn(N, R, dtype=adapter_dtype, std=R ** -0.5).requires_grad_() for _, N in shapes]
    grads = [randn(M, N, dtype=torch.bfloat16) for _, N in shapes]
    scalings = [SCALE] * len(shapes)
    leaves = [x, *lora_as, *lora_bs]

    # Accuracy of both impls against the same math in fp32 (forward output and dX).
    x32 = x.detach().float().requires_grad_()
    ref = torch_path(x32, [w.float() for w in ws], [a.detach().float() for a in lora_as],
                     [b.detach().float() for b in lora_bs], scalings)
    (ref_dx,) = torch.autograd.grad(ref, [x32], [g.float() for g in grads])

    fwd_flops, bwd_flops = flops(shapes)
    rows = []
    for impl, fn in (("torch", torch_path), ("fxopt", fxopt_path)):
        row = dict(shape=name, n=len(shapes), K=K, N=[N for _, N in shapes], M=M, r=R, scaling=SCALE,
                   adapter_dtype=str(adapter_dtype).replace("torch.", ""), impl=impl,
                   fwd_gflop=fwd_flops / 1e9, bwd_gflop=bwd_flops / 1e9)
        try:
            outs = fn(x, ws, lora_as, lora_bs, scalings)
            (dx,) = torch.autograd.grad(outs, [x], grads)
            row.update(rel_err_out=rel_err(outs, ref), rel_err_dx=rel_err([dx], [ref_dx]))
            del outs, dx

            def fwd():  # with grad enabled, as in training (the op saves what its backward needs)
                fn(x, ws, lora_as, lora_bs, scalings)

            def fwd_bwd():
                torch.autograd.backward(fn(x, ws, lora_as, lora_bs, scalings), grads)

            # grad_to_none: do_bench sets .grad = None before each run (outside the timing), so the runs do
            # not accumulate into the previous gradients.
            row["fwd_ms"] = do_bench(fwd, warmup=25, rep=100, return_mode="median")
            row["fwd_bwd_ms"] = do_bench(fwd_bwd, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
            row["fwd_tflops"] = fwd_flops / (row["fwd_ms"] * 1e-3) / 1e12
            row["fwd_bwd_tflops"] = (fwd_flops + bwd_flops) / (row["fwd_bwd_ms"] * 1e-3) / 1e12
        except Exception as e:  # a failing impl is recorded; the other shapes still run
            row["error"] = f"{type(e).__name__}: {e}"[:1000]
        for leaf in leaves:
            leaf.grad = None
        rows.append(row)
        print(json.dumps(row), flush=True)
    # speedup of fxopt over torch on this case
    t, f = rows
    if "error" not in t and "error" not in f:
        f["speedup_fwd"] = t["fwd_ms"] / f["fwd_ms"]
        f["speedup_fwd_bwd"] = t["fwd_bwd_ms"] / f["fwd_bwd_ms"]
    return rows


def _label(row):
    return f"{row['shape']} ({row['K']} -> {'+'.join(str(n) for n in row['N'])})"


def table(rows, gpu) -> str:
    lines = [
        f"torch.ops.fxopt.lora_linear vs torch (cuBLAS) on {gpu}: M={M} tokens, r={R}, s={SCALE}, bf16 base (frozen), "
        f"median of triton.testing.do_bench. % = share of the {CEILING_TFLOPS:.0f} TFLOP/s bf16 ceiling. "
        "rel err: ||out - ref|| / ||ref|| against the same math in fp32.",
        "",
        "| shape (K -> N) | adapters | impl | fwd ms | fwd TFLOP/s (%) | fwd+bwd ms | fwd+bwd TFLOP/s (%) | speedup fwd / fwd+bwd "
        "| rel err out / dX |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            err = md_cell(r["error"])
            lines.append(f"| {_label(r)} | {r['adapter_dtype']} | {r['impl']} | {err} | | | | | |")
            continue
        speed = f"{r['speedup_fwd']:.2f}x / {r['speedup_fwd_bwd']:.2f}x" if "speedup_fwd" in r else ""
        lines.append(
            f"| {_label(r)} | {r['adapter_dtype']} | {r['impl']} | {r['fwd_ms']:.3f} | "
            f"{r['fwd_tflops']:.0f} ({100 * r['fwd_tflops'] / CEILING_TFLOPS:.0f}%) | {r['fwd_bwd_ms']:.3f} | "
            f"{r['fwd_bwd_tflops']:.0f} ({100 * r['fwd_bwd_tflops'] / CEILING_TFLOPS:.0f}%) | {speed} | "
            f"{r['rel_err_out']:.1e} / {r['rel_err_dx']:.1e} |")
    return "\n".join(lines)


def main():
    p = parser(__doc__)
    p.add_argument("--shapes", default="", help=f"comma-separated subset of {list(SHAPES)} (default: all)")
    args = p.parse_args()
    names = subset(p, "--shapes", args.shapes, SHAPES)
    if not gpu_ready("bench_lora.py"):
        return
    from triton.testing import do_bench

    import fxopt.kernels.lora  # noqa: F401  (registers torch.ops.fxopt.lora_linear)

    rows = []
    for adapter_dtype in (torch.float32, torch.bfloat16):
        for name in names:
            rows += bench_case(name, SHAPES[name], adapter_dtype, do_bench)
            torch.cuda.empty_cache()

    env = environment()
    gpu = env["gpu"]
    write(args.out, "lora-kernel", args.tag, {"env": env, **{"ceiling_tflops": CEILING_TFLOPS, "rows": rows}}, table(rows, gpu))


if __name__ == "__main__":
    main()
