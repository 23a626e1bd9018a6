"""Training-step benchmark of the ../shared/BASELINES.md workloads for each setup:

    eager          HF eager (attn "sdpa") + PEFT LoRA
    compile        torch.compile(model), default backend (Inductor)
    liger          Liger-Kernel (apply_liger_kernel_to_<family>, its defaults) + PEFT LoRA
    liger_compile  Liger-Kernel + torch.compile(model)
    fxopt          fxopt.optimize(model)  (CUDA graphs on, the default)
    fxopt_no_cudagraphs   fxopt.optimize(model, cudagraphs=False)
    fxopt_no_attention    fxopt.optimize(model, disable=["attention"]) (what the attention pass adds)
    fxopt_no_swiglu       fxopt.optimize(model, disable=["swiglu"]) (what the SwiGLU pass adds)
    fxopt_none / fxopt_norms / fxopt_recompute / fxopt_offload   fxopt.optimize(model, memory=...) ("norms" is the
                                                                 default, what setup fxopt runs)
    eager_compute_dtype   HF eager, with what frozen_fp32="compute_dtype" does done by hand (no fxopt)
    fxopt_compute_dtype   fxopt.optimize(model, frozen_fp32="compute_dtype") (qlora: the recipe's fp32 upcast undone)
    fxopt_moe_keep        fxopt.optimize(model, moe_keep_projection=True) (MoE: the experts' projection kept for the
                          backward instead of recomputed)
    fxopt_serial / fxopt_compute_dtype_serial   as fxopt / fxopt_compute_dtype with compile_threads=0 (each kernel
                          compiled at its first launch: what fxopt.precompile saves of the first step)

One step = forward with labels (the model computes the loss), backward, AdamW step, zero_grad. Reported per
(workload, setup): first-step seconds (includes compilation), then the median of --steps timed steps after
--warmup steps, tokens/s, peak GiB (torch.cuda.max_memory_allocated from just before the first step), the loss
of the first and the last step, and Dynamo's graph / graph-break / recompile counts.

Each (workload, setup) runs in its own process (`--worker`, which prints one JSON line), so that compile
caches, monkey patches (Liger patches transformers' classes) and allocator state never leak between setups.
A setup that crashes or runs out of memory is recorded with its error and the others still run. Results go
to <out>/<YYYY-MM-DD>-<gpu>[-tag].json and .md (rewritten after every setup, so a run cut short keeps what
it measured), and the table is printed at the end.

    python benchmarks/train_step.py --workloads dense --setups eager,compile,liger,liger_compile,fxopt
    python benchmarks/train_step.py --device cpu --size tiny --setups eager,compile,fxopt   # smoke test
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LORA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

# The exact configs of BASELINES.md. rope_theta is accepted by transformers 5's LlamaConfig and moved into
# config.rope_parameters (checked with transformers 5.23).
DENSE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, rope_theta=500000, tie_word_embeddings=True)
MOE = dict(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=512, num_hidden_layers=8,
           num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
           vocab_size=32000, norm_topk_prob=True)
MOE_BIG = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=12,
               num_attention_heads=32, num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=8,
               vocab_size=32000)

# name: (transformers config class, config kwargs, LoRA target modules, batch, sequence length)
WORKLOADS = {
    "dense": ("LlamaConfig", DENSE, LORA_ALL, 4, 2048),
    "dense8k": ("LlamaConfig", DENSE, LORA_ALL, 1, 8192),
    "moe": ("Qwen3MoeConfig", MOE, LORA_ATTN, 4, 2048),
    "moe-big": ("Qwen3MoeConfig", MOE_BIG, LORA_ATTN, 4, 2048),
    # the dense model saved with save_pretrained, reloaded in 4 bits (nf4, double quant, bf16 compute) and
    # prepared with peft's prepare_model_for_kbit_training: the recipe of BASELINES.md
    "qlora": ("LlamaConfig", DENSE, LORA_ALL, 4, 2048),
    # the same recipe with prepare_model_for_kbit_training(model, use_gradient_checkpointing=False): as Unsloth's
    # qlora row runs (no checkpointing), for the fxopt_compute_dtype setup
    "qlora-nogc": ("LlamaConfig", DENSE, LORA_ALL, 4, 2048),
}
QUANTIZED = {"qlora", "qlora-nogc"}

# --size tiny: the same architecture, small enough for a CPU smoke test in seconds.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)
TINY_MOE = dict(TINY, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16)
TINY_BATCH, TINY_SEQ = 2, 32

NO_PASS_SETUPS = ["fxopt_no_attention", "fxopt_no_swiglu"]  # fxopt with that pass disabled
MEMORY_SETUPS = ["fxopt_none", "fxopt_norms", "fxopt_recompute", "fxopt_offload"]  # fxopt with that memory policy
# fxopt with frozen_fp32="compute_dtype": the QLoRA recipe's fp32-upcast frozen parameters back in bf16
PRECISION_SETUPS = ["fxopt_compute_dtype"]
# fxopt with compile_threads=0: each kernel compiled at its first launch, one by one (the first step's difference)
SERIAL_SETUPS = ["fxopt_serial", "fxopt_compute_dtype_serial"]
SETUPS = (["eager", "eager_compute_dtype", "compile", "liger", "liger_compile", "fxopt", "fxopt_no_cudagraphs"]
          + NO_PASS_SETUPS + MEMORY_SETUPS + PRECISION_SETUPS + ["fxopt_moe_keep"] + SERIAL_SETUPS)
BASELINE_SETUPS = ["eager", "compile", "liger", "liger_compile"]  # "best baseline" = the fastest of these

# Liger-Kernel 0.8.5 public API: one apply_liger_kernel_to_<family>(rope, cross_entropy,
# fused_linear_cross_entropy, rms_norm, swiglu, model) per family, keyed here by config.model_type (the
# same mapping its AutoLigerKernelForCausalLM uses, which only offers from_pretrained, not from_config).
LIGER_APPLY = {"llama": "apply_liger_kernel_to_llama", "qwen3_moe": "apply_liger_kernel_to_qwen3_moe"}


# ----------------------------------------------------------------------------------------------- worker

class _RecompileCounter:
    """Counts Dynamo's "Recompiling function ..." messages. Dynamo keeps no counter of recompiles in
    torch._dynamo.utils.counters, but logs each one on the `recompiles` artifact logger when TORCH_LOGS
    includes "recompiles" (the worker sets that before importing torch)."""

    def __init__(self):
        import logging

        self.reasons = []
        counter = self

        class Handler(logging.Handler):
            def emit(self, record):
                msg = record.getMessage()
                if msg.startswith("Recompiling function"):
                    counter.reasons.append(" ".join(msg.split())[:300])

        # getArtifactLogger(module, "recompiles") is logging.getLogger(module + ".__recompiles")
        logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(Handler(logging.DEBUG))


def _versions():
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "transformers", "peft", "liger-kernel", "bitsandbytes", "fxopt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _build_model(args, torch):
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cls_name, cfg_kwargs, targets, bsz, seq = WORKLOADS[args.workload]
    if args.size == "tiny":
        cfg_kwargs = {**cfg_kwargs, **(TINY_MOE if cls_name == "Qwen3MoeConfig" else TINY)}
        bsz, seq = TINY_BATCH, TINY_SEQ
    cfg = getattr(transformers, cls_name)(**cfg_kwargs)
    # A training step never reads the KV cache; building it costs time and memory (fxopt turns it off too),
    # so it is off for every setup alike.
    cfg.use_cache = False

    if args.setup.startswith("liger"):
        import liger_kernel.transformers as lk  # ImportError -> "skipped" (caught by the caller)

        # Called before the model is built: with model=None it patches transformers' modeling module
        # (RMSNorm / MLP / experts classes, rotary function, CausalLM.forward with the fused linear cross
        # entropy), so the model built next uses Liger's modules. Defaults as documented: rope, rms_norm,
        # swiglu and fused_linear_cross_entropy on, plain cross_entropy off.
        getattr(lk, LIGER_APPLY[cfg.model_type])()

    # Same seed in every setup: identical initial weights and LoRA init, so the step-1 losses must agree.
    torch.manual_seed(0)
    # Built directly on the device: random init of 1.2B parameters on the CPU would take longer than the
    # benchmark. transformers 5 takes `dtype=` (`torch_dtype=` is deprecated and warns; checked on 5.23).
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    if args.workload in QUANTIZED:
        model = _reload_4bit(model, args, torch)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    return model, cfg, bsz, seq


def _reload_4bit(model, args, torch):
    """save_pretrained, then from_pretrained with bitsandbytes nf4 (double quant, bf16 compute) and
    prepare_model_for_kbit_training with its defaults (gradient checkpointing enabled), as a QLoRA user does.
    The step does not call train() itself, like the BASELINES.md runs; the mode the model is in is recorded
    in the results (`training_mode`; True in the 2026-11-26 H200 runs, after get_peft_model)."""
    import tempfile

    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = os.path.join(tempfile.gettempdir(), f"fxopt-bench-{args.workload}-{args.size}")
    if not os.path.exists(os.path.join(path, "config.json")):
        model.save_pretrained(path)
    del model
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True)
    device_map = {"": torch.cuda.current_device()} if args.device == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map=device_map)
    model.config.use_cache = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.workload != "qlora-nogc")


def worker(args, res: dict) -> None:
    """Fills `res` (the caller prints it, with the error if this raises)."""
    # Before torch is imported: TORCH_LOGS is read at import (see _RecompileCounter).
    logs = os.environ.get("TORCH_LOGS", "")
    if "recompiles" not in logs:
        os.environ["TORCH_LOGS"] = ",".join(x for x in (logs, "recompiles") if x)
    import torch
    from torch._dynamo.utils import counters

    recompiles = _RecompileCounter()
    res["env"] = _versions()
    cuda = args.device == "cuda"
    if cuda:
        res["env"].update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    else:
        res["env"].update(gpu="cpu")

    t0 = time.perf_counter()
    try:
        model, cfg, bsz, seq = _build_model(args, torch)
    except ModuleNotFoundError as e:
        # Only a missing liger_kernel itself is a skip; a broken install (a dependency of it missing) is an error.
        if e.name in ("liger_kernel", "bitsandbytes"):
            res["error"] = f"skipped: {e.name} not installed"
            return
        raise
    if args.setup == "eager_compute_dtype":  # unoptimized, the frozen fp32 parameters cast to bf16 by hand
        from fxopt.precision import apply_frozen_fp32
        from fxopt.report import Report

        apply_frozen_fp32(model, "compute_dtype", Report())
    if args.setup in ("compile", "liger_compile"):
        model = torch.compile(model)
    elif args.setup.startswith("fxopt"):
        import fxopt

        # fxopt_no_<pass>: what that pass adds, measured beside fxopt
        extra = {"disable": (args.setup[len("fxopt_no_"):],)} if args.setup in NO_PASS_SETUPS else {}
        if args.setup in MEMORY_SETUPS:  # fxopt_<policy>: the memory policy's cost and saving
            extra = {"memory": args.setup[len("fxopt_"):]}
        if args.setup.removesuffix("_serial") in PRECISION_SETUPS:
            extra = {"frozen_fp32": "compute_dtype"}
        if args.setup == "fxopt_moe_keep":
            extra = {"moe_keep_projection": True}
        if args.setup in SERIAL_SETUPS:
            extra["compile_threads"] = 0
        model = fxopt.optimize(model, cudagraphs=args.setup != "fxopt_no_cudagraphs", **extra)
    res["build_s"] = time.perf_counter() - t0
    res["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    res["experts_implementation"] = getattr(cfg, "_experts_implementation", None)
    res["training_mode"] = model.training

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)  # CPU generator: the same ids on every device
    ids = torch.randint(0, cfg.vocab_size, (bsz, seq), generator=gen).to(args.device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().clone()  # a copy: under CUDA graphs the next step overwrites the loss

    if cuda:
        torch.cuda.reset_peak_memory_stats()  # peak of the training steps (weights included), as BASELINES
    first = _profiled(args, step, torch) if args.profile_compile else step
    losses, first_s, times = timed_steps(step, sync, args.warmup, args.steps, first=first)
    if args.profile:
        _profile_step(args, step, torch)
    losses = [x.item() for x in losses]  # .item() only now: a sync inside the timed loop would cost time

    med = statistics.median(times)
    res.update(
        tokens_per_step=bsz * seq, step_ms=med * 1e3, step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
        tokens_per_s=bsz * seq / med, first_step_s=first_s,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        loss_first=losses[0], loss_last=losses[-1], losses=losses,
        # Dynamo's view: graphs compiled, graph breaks (and their reasons), recompiles (and their reasons).
        graphs=counters["stats"]["unique_graphs"], frames_compiled=counters["frames"]["ok"],
        graph_breaks=sum(counters["graph_break"].values()),
        graph_break_reasons=[" ".join(k.split())[:300] for k in list(counters["graph_break"])[:5]],
        recompiles=len(recompiles.reasons), recompile_reasons=recompiles.reasons[:5],
    )
    if args.setup.startswith("fxopt"):
        try:  # fxopt's report API is young: a change there must not lose the measurement
            import fxopt

            res["fxopt_report"] = fxopt.report(model).summary()
            res["fxopt_notes"] = fxopt.report(model).notes
        except Exception as e:
            res["fxopt_report"] = f"unavailable: {type(e).__name__}: {e}"


def timed_steps(step, sync, warmup: int, steps: int, first=None):
    """(losses of every step, first step s, the timed steps' s): one first step (compilation included; run by
    `first` when given), warmup untimed steps, then `steps` steps each timed between device syncs."""
    sync()
    t0 = time.perf_counter()
    losses = [(first or step)()]
    sync()
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        losses.append(step())
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t0)
    return losses, first_s, times


def _profiled(args, step, torch):
    """The first step under cProfile (host time: where compilation goes), written with Dynamo's phase times."""
    import cProfile
    import io
    import pstats

    def first():
        prof = cProfile.Profile()
        prof.enable()
        try:
            return step()
        finally:
            prof.disable()
            os.makedirs(args.profile_compile, exist_ok=True)
            buf = io.StringIO()
            for key in ("cumulative", "tottime"):
                pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(60)
            try:
                from torch._dynamo.utils import compile_times

                buf.write("\n" + compile_times(repr="str", aggregate=True))
            except Exception as e:  # a private helper: its absence must not lose the measurement
                buf.write(f"\ncompile_times unavailable: {e}")
            with open(os.path.join(args.profile_compile, f"{args.workload}-{args.setup}-first-step.txt"), "w") as f:
                f.write(buf.getvalue())

    return first


def _profile_step(args, step, torch):
    """One more step under torch.profiler: the top kernels by device time, to see where a step goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if args.device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    os.makedirs(args.profile, exist_ok=True)
    with open(os.path.join(args.profile, f"{args.workload}-{args.setup}-profile.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=70, max_name_column_width=110))


# ----------------------------------------------------------------------------------------------- driver

def _git_state():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "") if head else None
    except Exception:
        return None


def run_one(args, workload, setup) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--workload", workload, "--setup", setup,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device, "--size", args.size]
    if args.profile:
        cmd += ["--profile", args.profile]
    if getattr(args, "profile_compile", ""):  # fxopt.bench's namespace has no such option
        cmd += ["--profile-compile", args.profile_compile]
    # The repository first on the path, so `import fxopt` is this checkout even when not installed; the
    # caller's PYTHONPATH (e.g. /tmp/site holding liger-kernel) stays behind it.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout: no result after {args.timeout} s (--timeout)"}
    res = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                res = json.loads(line)
                break
            except json.JSONDecodeError:
                pass
    if res is None:  # the process died without reporting (segfault, CUDA fault, killed)
        tail = (proc.stderr or proc.stdout)[-1500:]
        res = {"error": f"worker exited with code {proc.returncode} and no result; output tail: {tail}"}
    res["wall_s"] = time.perf_counter() - t0
    return res


def _fmt_ratio(value, ref):
    return f"{value / ref:.2f}x" if value and ref else ""


def _md_cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows) -> str:
    head = ("| workload | setup | tokens/s | peak GiB | first step s | vs eager | vs compile | vs best baseline "
            "| loss first / last | graphs / breaks / recompiles |")
    ncols = head.count(" | ") + 1
    lines = [head, "|" + "---|" * ncols]
    for r in rows:
        if r.get("error"):
            err = _md_cell(r["error"])
            lines.append(f"| {r['workload']} | {r['setup']} | {err[:200]} |" + " |" * (ncols - 3))
            continue
        same = {b["setup"]: b for b in rows if b["workload"] == r["workload"] and not b.get("error")}
        tps = {k: b["tokens_per_s"] for k, b in same.items()}
        best = max((k for k in tps if k in BASELINE_SETUPS), key=tps.get, default=None)
        vs_best = f"{_fmt_ratio(r['tokens_per_s'], tps[best])} ({best})" if best else ""
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
        lines.append(
            f"| {r['workload']} | {r['setup']} | {r['tokens_per_s']:,.0f} | {peak} | {r['first_step_s']:.1f} | "
            f"{_fmt_ratio(r['tokens_per_s'], tps.get('eager'))} | {_fmt_ratio(r['tokens_per_s'], tps.get('compile'))} "
            f"| {vs_best} | {r['loss_first']:.4f} / {r['loss_last']:.4f} | "
            f"{r['graphs']} / {r['graph_breaks']} / {r['recompiles']} |")
    return "\n".join(lines)


def write_results(args, rows, meta):
    env = next((r["env"] for r in rows if "env" in r), {})
    gpu = env.get("gpu") or "unknown-device"
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    base = os.path.join(args.out, f"{meta['date']}-{slug}{'-' + args.tag if args.tag else ''}")
    os.makedirs(args.out, exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump({**meta, "env": env, "rows": rows}, f, indent=2)
    md = table(rows)
    with open(base + ".md", "w") as f:
        f.write(f"Measured {meta['date']} on {gpu} ({args.device}, size {args.size}): torch {env.get('torch')}, "
                f"triton {env.get('triton')}, transformers {env.get('transformers')}, peft {env.get('peft')}, "
                f"liger-kernel {env.get('liger-kernel')}, fxopt {env.get('fxopt')} at {meta['git']}. "
                f"Median of {args.steps} steps after {args.warmup} warm-up steps; first step includes compilation; "
                f"peak = torch.cuda.max_memory_allocated. Best baseline = fastest of "
                f"{', '.join(BASELINE_SETUPS)} measured in this run.\n\n{md}\n")
    return base, md


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="dense", help=f"comma-separated, of {list(WORKLOADS)}")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {SETUPS}")
    p.add_argument("--steps", type=int, default=8, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="steps after the first, not timed")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: a small config for smoke tests")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per (workload, setup) process")
    p.add_argument("--profile", default="", help="directory: also profile one step per setup (top kernels)")
    p.add_argument("--profile-compile", default="",
                   help="directory: run the first step under cProfile (where compilation time goes; slows it)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--setup", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        res = {}
        try:
            worker(args, res)
        except Exception as e:  # OOM or a crash: report it; the driver goes on with the other setups
            res["error"] = f"{type(e).__name__}: {e}"[:2000]
            import traceback

            traceback.print_exc()  # to stderr: the driver keeps the JSON line; a worker run by hand shows where
        print(json.dumps(res), flush=True)
        return

    workloads, setups = args.workloads.split(","), args.setups.split(",")
    for name in workloads:
        if name not in WORKLOADS:
            p.error(f"--workloads: unknown workload {name!r}; known: {list(WORKLOADS)}")
    for name in setups:
        if name not in SETUPS:
            p.error(f"--setups: unknown setup {name!r}; known: {SETUPS}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.tag):
        p.error("--tag: letters, digits, '_', '.', '-' only (it goes into a file name)")
    if args.device == "cuda":
        import torch  # only to check; the CUDA context is created in the workers, not here

        if not torch.cuda.is_available():
            p.error("no CUDA device here: use --device cpu --size tiny for a smoke test")

    meta = {"date": datetime.date.today().isoformat(), "git": _git_state(), "argv": sys.argv[1:],
            "args": {k: v for k, v in vars(args).items() if k not in ("worker", "workload", "setup")}}
    rows = []
    for wl in workloads:
        for setup in setups:
            print(f"[{wl} / {setup}] running ...", flush=True)
            res = run_one(args, wl, setup)
            res.update(workload=wl, setup=setup)
            rows.append(res)
            brief = {k: res.get(k) for k in ("tokens_per_s", "peak_gib", "first_step_s", "loss_first", "loss_last",
                                              "graphs", "graph_breaks", "recompiles", "error") if res.get(k) is not None}
            print(f"[{wl} / {setup}] {json.dumps(brief)}", flush=True)
            base, md = write_results(args, rows, meta)  # after every setup: a run cut short keeps its rows
    print()
    print(md)
    print(f"\nwritten: {base}.json, {base}.md")


if __name__ == "__main__":
    main()
