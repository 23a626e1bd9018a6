"""Microbenchmark of torch.ops.fxopt.moe_experts against the torch grouped-GEMM path, MoE workload shapes.

    y_t = sum_j w_tj * down_e @ (silu(gate_e @ x_t) * (up_e @ x_t)),   e = topk_ids[t, j]

torch path: what the "grouped_mm" experts of transformers 5.x do, written out here: sort the (token, slot)
pairs by expert, gather the rows of x, one `grouped_mm` (F.grouped_mm, else torch._grouped_mm) for gate_up,
silu(gate) * up, one for down, multiply by the routing weights, un-permute, sum over k; backward by autograd.
Shapes (../shared/BASELINES.md): moe (T=8192 tokens, H=1024, I=512, E=32, k=4) and moe-big (T=8192, H=2048,
I=768, E=64, k=8); bf16 experts and activations, routing weights from a softmax router (renormalised top-k,
cast to bf16 as the Qwen-MoE router does). Two training modes: experts trained (grads for x, the routing
weights, gate_up and down) and experts frozen (x and the routing weights only, as under LoRA on attention).

Timed with triton.testing.do_bench (median; it warms up and clears L2 between runs), on random data.
TFLOP/s counts useful flops only (fxopt's recomputation of the gate_up GEMM in backward is not counted),
against the ~798 TFLOP/s bf16 ceiling measured on the H100. Memory: `saved` is what the forward leaves
allocated for the backward (output included), `peak` the peak over one forward+backward, both above what
was allocated before (inputs, weights, the incoming gradient).

    python benchmarks/bench_moe.py [--out DIR] [--tag TAG] [--shapes moe,moe-big] [--skew S]
CUDA only: on a machine without a GPU it prints a message and exits 0.
"""
from __future__ import annotations

import json
import time

import torch

from kernel_results import environment, gpu_ready, md_cell, parser, subset, write
import torch.nn.functional as F

CEILING_TFLOPS = 798.0  # bf16 matrix units, measured on the H100 of the device machine
SHAPES = {  # name: (T, H, I, E, k)
    "moe": (8192, 1024, 512, 32, 4),
    "moe-big": (8192, 2048, 768, 64, 8),
}
GIB = 2 ** 30


def flops(T, H, I, k, experts_trained):
    """Useful flops with S = T*k rows (a matmul [a, b] x [b, c] counts 2abc).
    forward: gate_up 2*S*H*2I + down 2*S*I*H = 6 SHI.
    backward: dh = dy D (2 SHI) and dx = [dgate, dup] GU (4 SHI), plus, when the experts are trained,
    dD (2 SHI) and dGU (4 SHI)."""
    shi = T * k * H * I
    return 6 * shi, (12 if experts_trained else 6) * shi


def _grouped_mm(a, b, offs):
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


def torch_path(x, ids, w, gate_up, down):
    """The grouped_mm experts of transformers, written out (silu)."""
    T, H = x.shape
    k = ids.shape[1]
    E = gate_up.shape[0]
    sorted_ids, perm = torch.sort(ids.reshape(-1))
    ends = torch.searchsorted(sorted_ids, torch.arange(1, E + 1, device=x.device, dtype=sorted_ids.dtype),
                              out_int32=True)  # cumulative rows per expert, as grouped_mm wants its offs
    proj = _grouped_mm(x[perm // k].to(gate_up.dtype), gate_up.transpose(1, 2), ends)
    gate, up = proj.chunk(2, dim=-1)
    out = _grouped_mm(F.silu(gate) * up, down.transpose(1, 2), ends)
    out = out * w.reshape(-1)[perm, None]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=x.device)
    return out[inv].view(T, k, H).sum(1).to(x.dtype)


def fxopt_path(x, ids, w, gate_up, down):
    return torch.ops.fxopt.moe_experts(x, ids, w, gate_up, down, "silu")


def rel_err(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(T, H, I, E, k, skew, dev="cuda"):
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*size, std=1.0):
        return torch.randn(*size, device=dev, generator=gen).mul_(std)

    x = randn(T, H).bfloat16().requires_grad_()
    # router: softmax in fp32 over random logits (+ a per-expert bias for a skewed load), top-k, renormalised
    logits = randn(T, E) + torch.linspace(0, skew, E, device=dev)
    probs = torch.softmax(logits, -1)
    w, ids = probs.topk(k, -1)
    w = (w / w.sum(-1, keepdim=True)).bfloat16().requires_grad_()
    gate_up = randn(E, 2 * I, H, std=H ** -0.5).bfloat16().requires_grad_()
    down = randn(E, H, I, std=I ** -0.5).bfloat16().requires_grad_()
    dy = randn(T, H).bfloat16()
    return x, ids, w, gate_up, down, dy


def bench_case(name, skew, do_bench):
    T, H, I, E, k = SHAPES[name]
    x, ids, w, gate_up, down, dy = make_inputs(T, H, I, E, k, skew)
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    load = dict(max_rows_per_expert=int(counts.max()), empty_experts=int((counts == 0).sum()))

    # Accuracy of both impls against the same math in fp32 (fxopt's reference, a loop over the experts).
    from fxopt.kernels.moe import reference

    leaves32 = [t.detach().float().requires_grad_() for t in (x, w, gate_up, down)]
    ref = reference(leaves32[0], ids, *leaves32[1:], "silu")
    ref_grads = torch.autograd.grad(ref, leaves32, dy.float())
    ref = ref.detach()

    rows = []
    for experts_trained in (True, False):
        gate_up.requires_grad_(experts_trained)
        down.requires_grad_(experts_trained)
        leaves = [x, w] + ([gate_up, down] if experts_trained else [])
        fwd_flops, bwd_flops = flops(T, H, I, k, experts_trained)
        for impl, fn in (("torch_grouped_mm", torch_path), ("fxopt", fxopt_path)):
            row = dict(shape=name, T=T, H=H, I=I, E=E, k=k, skew=skew, **load, experts_trained=experts_trained,
                       impl=impl, fwd_gflop=fwd_flops / 1e9, bwd_gflop=bwd_flops / 1e9)
            try:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                y = fn(x, ids, w, gate_up, down)
                grads = torch.autograd.grad(y, leaves, dy)
                torch.cuda.synchronize()
                row["first_call_s"] = time.perf_counter() - t0  # includes Triton compile + autotuning
                row["rel_err_out"] = rel_err(y, ref)
                names = ["x", "w", "gate_up", "down"]
                for n, g, r in zip(names, grads, ref_grads):
                    row[f"rel_err_d{n}"] = rel_err(g, r)
                del y, grads

                # memory: what the forward keeps for the backward, and the peak of forward + backward
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                y = fn(x, ids, w, gate_up, down)
                torch.cuda.synchronize()
                row["saved_gib"] = (torch.cuda.memory_allocated() - base) / GIB
                grads = torch.autograd.grad(y, leaves, dy)
                torch.cuda.synchronize()
                row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
                del y, grads

                def fwd():  # with grad enabled, as in training (the op saves what its backward needs)
                    fn(x, ids, w, gate_up, down)

                def fwd_bwd():
                    torch.autograd.backward(fn(x, ids, w, gate_up, down), dy)

                row["fwd_ms"] = do_bench(fwd, warmup=25, rep=100, return_mode="median")
                row["fwd_bwd_ms"] = do_bench(fwd_bwd, warmup=25, rep=100, grad_to_none=leaves,
                                             return_mode="median")
                row["fwd_tflops"] = fwd_flops / (row["fwd_ms"] * 1e-3) / 1e12
                row["fwd_bwd_tflops"] = (fwd_flops + bwd_flops) / (row["fwd_bwd_ms"] * 1e-3) / 1e12
            except Exception as e:  # a failing impl is recorded; the other cases still run
                row["error"] = f"{type(e).__name__}: {e}"[:1000]
            for leaf in leaves:
                leaf.grad = None
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
        t, f = rows[-2:]
        if "error" not in t and "error" not in f:
            f["speedup_fwd"] = t["fwd_ms"] / f["fwd_ms"]
            f["speedup_fwd_bwd"] = t["fwd_bwd_ms"] / f["fwd_bwd_ms"]
    return rows


def table(rows, gpu) -> str:
    lines = [
        f"torch.ops.fxopt.moe_experts vs the torch grouped_mm path on {gpu}: bf16, silu, median of "
        f"triton.testing.do_bench. % = share of the {CEILING_TFLOPS:.0f} TFLOP/s bf16 ceiling (useful flops). "
        "saved: memory the forward keeps for backward; peak: over forward+backward. rel err: ||out - ref|| / "
        "||ref|| against the same math in fp32 (output / dx / d routing weights / d gate_up / d down).",
        "",
        "| shape (T, H, I, E, k) | experts | impl | fwd ms | fwd TFLOP/s (%) | fwd+bwd ms | fwd+bwd TFLOP/s (%) "
        "| speedup fwd / fwd+bwd | saved GiB | peak GiB | first call s | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = f"{r['shape']} ({r['T']}, {r['H']}, {r['I']}, {r['E']}, {r['k']})" + (
            f" skew {r['skew']}" if r["skew"] else "")
        mode = "trained" if r["experts_trained"] else "frozen"
        if "error" in r:
            err = md_cell(r["error"])
            lines.append(f"| {label} | {mode} | {r['impl']} | {err} | | | | | | | | |")
            continue
        speed = f"{r['speedup_fwd']:.2f}x / {r['speedup_fwd_bwd']:.2f}x" if "speedup_fwd" in r else ""
        errs = " / ".join(f"{r[key]:.1e}" for key in ("rel_err_out", "rel_err_dx", "rel_err_dw", "rel_err_dgate_up",
                                                       "rel_err_ddown") if key in r)
        lines.append(
            f"| {label} | {mode} | {r['impl']} | {r['fwd_ms']:.3f} | "
            f"{r['fwd_tflops']:.0f} ({100 * r['fwd_tflops'] / CEILING_TFLOPS:.0f}%) | {r['fwd_bwd_ms']:.3f} | "
            f"{r['fwd_bwd_tflops']:.0f} ({100 * r['fwd_bwd_tflops'] / CEILING_TFLOPS:.0f}%) | {speed} | "
            f"{r['saved_gib']:.2f} | {r['peak_gib']:.2f} | {r['first_call_s']:.1f} | {errs} |")
    return "\n".join(lines)


def main():
    p = parser(__doc__)
    p.add_argument("--shapes", default="", help=f"comma-separated subset of {list(SHAPES)} (default: all)")
    p.add_argument("--skew", type=float, default=0.0,
                   help="router logit bias rising linearly to SKEW over the experts (0: balanced load); "
                        "a second set of rows with this skew is added when nonzero")
    args = p.parse_args()
    names = subset(p, "--shapes", args.shapes, SHAPES)
    if not gpu_ready("bench_moe.py"):
        return
    from triton.testing import do_bench

    import fxopt.kernels.moe  # noqa: F401  (registers torch.ops.fxopt.moe_experts)

    rows = []
    for skew in [0.0] + ([args.skew] if args.skew else []):
        for name in names:
            rows += bench_case(name, skew, do_bench)
            torch.cuda.empty_cache()

    env = environment()
    gpu = env["gpu"]
    write(args.out, "moe-kernel", args.tag, {"env": env, **{"ceiling_tflops": CEILING_TFLOPS, "rows": rows}}, table(rows, gpu))


if __name__ == "__main__":
    main()
