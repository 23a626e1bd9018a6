"""Microbenchmark of torch.ops.fxopt.linear_cross_entropy (chunked lm_head + cross-entropy, gradients computed
in the forward) against the unfused paths, at the workload's shape:

    x [8192, 2048] bf16 (requires grad), weight [128256, 2048] bf16 (tied embedding), labels int64 with 10%
    ignore_index -100; loss = sum of the per-row cross-entropy.

Implementations:
  torch      F.cross_entropy(F.linear(x, W).float(), labels, reduction="sum"): full bf16 + fp32 logits
  compile    torch.compile (Inductor) of the same function
  liger      Liger-Kernel's fused linear cross-entropy, if importable (skipped otherwise)
  fxopt      the op, CHUNK_BYTES at its default; plus a sweep of CHUNK_BYTES (what justifies the default), and
             "GEMMs only": the op with its row kernel replaced by nothing (the floor the kernel adds to)
Two cases: the weight frozen (LoRA: only dX) and the weight trained too (dX and dW).

Per implementation: forward+backward ms (triton.testing.do_bench median, .grad cleared between runs), forward
ms under no_grad (eval), peak memory above the inputs for one forward+backward, and the relative error of the
loss and dX (and dW) against the fp32 reference (full fp32 logits from the same bf16 inputs). TFLOP/s counts
the GEMMs (2NVH each: logits, dX, and dW when trained) against the ~798 TFLOP/s bf16 ceiling of the H100.

    python benchmarks/bench_cross_entropy.py [--out DIR] [--tag TAG] [--n 8192]
CUDA only: on a machine without a GPU it prints a message and exits 0.
"""
from __future__ import annotations

import json
import time

import torch

from kernel_results import environment, gpu_ready, md_cell, parser, write
import torch.nn.functional as F

CEILING_TFLOPS = 798.0  # bf16 matrix units, measured on the H100 of the device machine
H, V, IGNORE = 2048, 128256, -100
CHUNK_SWEEP_MIB = [32, 64, 256, 512]


def torch_loss(x, w, labels):
    return F.cross_entropy(F.linear(x, w).float(), labels, ignore_index=IGNORE, reduction="sum")


def liger_loss_fn():
    """Liger's fused linear cross-entropy with reduction="sum", or None if Liger is not installed. Its API
    moved between versions: the functional form first, then the loss module (lin_weight, input, target)."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def fn(x, w, labels):
            return liger_fused_linear_cross_entropy(x, w, labels, ignore_index=IGNORE, reduction="sum")
        return fn
    except ImportError:
        pass
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
    return lambda x, w, labels: module(w, x, labels)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out  # some Liger versions return (loss, z_loss, ...)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def measure(name, fn, x, w, labels, ref, train_w, do_bench, extra=None):
    """One row: times, peak memory and errors of loss = fn(x, w, labels)."""
    leaves = [x, w] if train_w else [x]
    n = x.shape[0]
    gemm_flops = 2 * n * V * H * (3 if train_w else 2)
    row = dict(impl=name, case="trained weight" if train_w else "frozen weight", N=n, H=H, V=V, **(extra or {}))
    try:
        t0 = time.perf_counter()
        loss = _first(fn(x, w, labels))
        grads = torch.autograd.grad(loss, leaves)
        torch.cuda.synchronize()
        row["first_call_s"] = time.perf_counter() - t0  # includes torch.compile's compile
        ref_loss, ref_grads = ref
        row["rel_err_loss"] = rel(loss, ref_loss)
        if row["rel_err_loss"] > 0.5 and rel(loss * (labels != IGNORE).sum(), ref_loss) < 0.1:
            row["note"] = "returned the mean, not the sum"
        row["rel_err_dx"] = rel(grads[0], ref_grads[0])
        if train_w:
            row["rel_err_dw"] = rel(grads[1], ref_grads[1])
        del loss, grads

        def fwd_bwd():
            torch.autograd.backward(_first(fn(x, w, labels)))

        def fwd_eval():
            with torch.no_grad():
                fn(x, w, labels)

        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
        for t in leaves:
            t.grad = None

        row["fwd_bwd_ms"] = do_bench(fwd_bwd, warmup=10, rep=50, grad_to_none=leaves, return_mode="median")
        row["fwd_eval_ms"] = do_bench(fwd_eval, warmup=10, rep=50, return_mode="median")
        row["gemm_tflops"] = gemm_flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    except Exception as e:  # a failing impl is recorded; the others still run
        row["error"] = f"{type(e).__name__}: {e}"[:1000]
    for t in leaves:
        t.grad = None
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def row_kernel_bandwidth(ce, x, w, labels, do_bench):
    """The row kernel alone on one default chunk (reads the row twice, writes it once)."""
    rows = ce._chunk_rows(x.shape[0], V, x.element_size())
    buf = torch.mm(x[:rows], w.t())
    lab = labels[:rows]
    loss = torch.empty(rows, device="cuda")
    saved = buf.clone()

    def run():
        ce._ce_rows(buf, lab, loss, IGNORE, 0.0, True)

    ms = do_bench(run, warmup=10, rep=50, return_mode="median")  # rewriting the row is idempotent in cost
    buf.copy_(saved)
    nbytes = 3 * rows * V * buf.element_size()
    return dict(chunk_rows=rows, row_kernel_ms=ms, row_kernel_gbs=nbytes / (ms * 1e-3) / 1e9)


def table(rows, gpu, kernel) -> str:
    lines = [
        f"fxopt::linear_cross_entropy vs unfused paths on {gpu}: x [N, {H}] bf16, weight [{V}, {H}] bf16, "
        "10% of labels ignored, loss = sum. Median of triton.testing.do_bench. Peak = memory above the inputs "
        "for one forward+backward. TFLOP/s counts the GEMMs (logits, dX, and dW when trained) against "
        f"{CEILING_TFLOPS:.0f}. rel err against the fp32 reference.",
        "",
        f"Row kernel alone on one chunk of {kernel['chunk_rows']} rows: {kernel['row_kernel_ms']:.3f} ms, "
        f"{kernel['row_kernel_gbs']:.0f} GB/s (3 passes over the chunk).",
        "",
        "| case | impl | fwd+bwd ms | GEMM TFLOP/s (%) | eval fwd ms | peak GiB | first call s | rel err loss / dX / dW |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            err = md_cell(r["error"])
            lines.append(f"| {r['case']} | {r['impl']} | {err} | | | | | |")
            continue
        errs = f"{r['rel_err_loss']:.1e} / {r['rel_err_dx']:.1e}" + (f" / {r['rel_err_dw']:.1e}" if "rel_err_dw" in r else "")
        note = f" ({r['note']})" if "note" in r else ""
        lines.append(
            f"| {r['case']} | {r['impl']}{note} | {r['fwd_bwd_ms']:.2f} | {r['gemm_tflops']:.0f} "
            f"({100 * r['gemm_tflops'] / CEILING_TFLOPS:.0f}%) | {r['fwd_eval_ms']:.2f} | {r['peak_extra_gib']:.2f} | "
            f"{r['first_call_s']:.1f} | {errs} |")
    return "\n".join(lines)


def main():
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=8192, help="tokens (rows of x)")
    p.add_argument("--no-sweep", action="store_true", help="skip the CHUNK_BYTES sweep")
    args = p.parse_args()
    if not gpu_ready("bench_cross_entropy.py"):
        return
    from triton.testing import do_bench

    from fxopt.kernels import cross_entropy as ce

    gen = torch.Generator(device="cuda").manual_seed(0)
    n = args.n
    # Scaled like a tied embedding (std 0.02) over hidden states of std 2: logits of std ~1.8.
    x = (torch.randn(n, H, device="cuda", generator=gen) * 2.0).to(torch.bfloat16)
    w = (torch.randn(V, H, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, V, (n,), device="cuda", generator=gen)
    labels[torch.rand(n, device="cuda", generator=gen) < 0.1] = IGNORE

    def fxopt_fn(x, w, labels):
        return ce.linear_cross_entropy_fn(x, w, None, labels, IGNORE)

    impls = [("torch", torch_loss), ("compile", torch.compile(torch_loss))]
    impls += [("liger", liger_loss_fn()), ("fxopt", fxopt_fn)]  # liger: None when not installed

    rows = []
    for train_w in (False, True):
        # the fp32 reference of this case: full fp32 logits from the same bf16 inputs
        x32 = x.float().requires_grad_()
        w32 = w.float().requires_grad_(train_w)
        ref_loss = torch_loss(x32, w32, labels)
        ref = (ref_loss.detach(), [g.detach() for g in torch.autograd.grad(ref_loss, [x32, w32] if train_w else [x32])])
        del x32, w32, ref_loss
        torch.cuda.empty_cache()

        xx = x.detach().requires_grad_()
        ww = w.detach().requires_grad_(train_w)
        for name, fn in impls:
            if fn is None:
                rows.append(dict(impl=name, case="trained weight" if train_w else "frozen weight",
                                 error="liger_kernel not importable: skipped"))
                continue
            rows.append(measure(name, fn, xx, ww, labels, ref, train_w, do_bench,
                                extra={"chunk_mib": ce.CHUNK_BYTES / 2**20} if name == "fxopt" else None))
        if not train_w:
            default = ce.CHUNK_BYTES
            real_rows = ce._ce_rows
            ce._ce_rows = lambda *a: None  # the op's GEMMs alone (gradients wrong: timing only)
            r = measure("fxopt GEMMs only (no row kernel)", fxopt_fn, xx, ww, labels, ref, train_w, do_bench)
            for k in [k for k in r if k.startswith("rel_err")]:
                r.pop(k)  # meaningless without the kernel
            rows.append(r)
            ce._ce_rows = real_rows
            for mib in [] if args.no_sweep else CHUNK_SWEEP_MIB:
                ce.CHUNK_BYTES = mib * 2**20
                rows.append(measure(f"fxopt chunk {mib} MiB", fxopt_fn, xx, ww, labels, ref, train_w, do_bench,
                                    extra={"chunk_mib": mib}))
            ce.CHUNK_BYTES = default
        del ref
        torch.cuda.empty_cache()

    kernel = row_kernel_bandwidth(ce, x, w, labels, do_bench)
    print(json.dumps(kernel))
    for r in rows:  # rows without timings (skipped, failed, GEMMs only) still print in the table
        r.setdefault("rel_err_loss", float("nan"))
        r.setdefault("rel_err_dx", float("nan"))
    env = environment(liger=_liger_version())
    gpu = env["gpu"]
    write(args.out, "cross-entropy", args.tag, {"env": env, **{"ceiling_tflops": CEILING_TFLOPS, "row_kernel": kernel, "rows": rows}}, table(rows, gpu, kernel))


def _liger_version():
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:
        return None


if __name__ == "__main__":
    main()
