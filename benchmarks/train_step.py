"""Training-step benchmark of the BASELINES.md workloads: HF eager, torch.compile, Liger-Kernel, fxopt.

Each (workload, setup) runs in its own process (no shared compile caches or allocator state), and the
results go to benchmarks/results/<date>-<gpu>[-tag].json plus a markdown table beside it.

    python benchmarks/train_step.py --workloads dense --setups eager,compile,liger,fxopt
    python benchmarks/train_step.py --device cpu --size tiny --setups eager,fxopt     # smoke test
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
DENSE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True)
MOE = dict(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=512, num_hidden_layers=8,
           num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
           vocab_size=32000, norm_topk_prob=True)
WORKLOADS = {  # name: (config class, config kwargs, LoRA targets, batch, seq)
    "dense": ("LlamaConfig", DENSE, LORA_ALL, 4, 2048),
    "dense8k": ("LlamaConfig", DENSE, LORA_ALL, 1, 8192),
    "moe": ("Qwen3MoeConfig", MOE, LORA_ATTN, 4, 2048),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128)
SETUPS = ["eager", "compile", "liger", "liger_compile", "fxopt"]
LIGER_FN = {"LlamaConfig": "apply_liger_kernel_to_llama", "Qwen3MoeConfig": "apply_liger_kernel_to_qwen3_moe"}


def worker(args):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cls_name, cfg_kwargs, targets, bsz, seq = WORKLOADS[args.workload]
    if args.size == "tiny":
        cfg_kwargs = {**cfg_kwargs, **TINY}
        if "moe" in args.workload:
            cfg_kwargs.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16)
        bsz, seq = 2, 32
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.setup.startswith("liger"):
        try:
            import liger_kernel.transformers as lk
        except ImportError:
            return {"error": "skipped: liger_kernel not installed"}
        getattr(lk, LIGER_FN[cls_name])()  # patches the family's modules before the model is built
    torch.manual_seed(0)
    cfg = getattr(transformers, cls_name)(**cfg_kwargs)
    cfg.use_cache = False
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    if args.setup in ("compile", "liger_compile"):
        model = torch.compile(model)
    elif args.setup == "fxopt":
        import fxopt

        fxopt.optimize(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (bsz, seq), generator=g).to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    losses = [step().item()]
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        losses.append(step().item())
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    med = statistics.median(times)
    from torch._dynamo.utils import counters

    out = dict(tokens_per_s=bsz * seq / med, step_ms=med * 1e3, first_step_s=first,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
               loss_first=losses[0], loss_last=losses[-1], graphs=counters["stats"]["unique_graphs"],
               graph_breaks=sum(counters["graph_break"].values()), tokens_per_step=bsz * seq)
    if args.setup == "fxopt":
        import fxopt

        out["fxopt_matched"] = fxopt.report(model).summary()
    return out


def env_info():
    import torch

    info = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for mod in ("triton", "transformers", "peft", "liger_kernel"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


def table(rows):
    lines = ["| workload | setup | tokens/s | peak GiB | first step s | vs eager | vs torch.compile | vs best baseline | loss first / last |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['setup']} | {r['error'][:80]} | | | | | | |")
            continue
        base = {b["setup"]: b["tokens_per_s"] for b in rows if b["workload"] == r["workload"] and "error" not in b}
        best = max((v for k, v in base.items() if k != "fxopt"), default=None)
        ratio = lambda ref: f"{r['tokens_per_s'] / ref:.2f}x" if ref else ""
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else ""
        lines.append(f"| {r['workload']} | {r['setup']} | {r['tokens_per_s']:,.0f} | {peak} | {r['first_step_s']:.1f} | "
                     f"{ratio(base.get('eager'))} | {ratio(base.get('compile'))} | {ratio(best)} | "
                     f"{r['loss_first']:.4f} / {r['loss_last']:.4f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="dense")
    p.add_argument("--setups", default="eager,compile,liger,fxopt")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--timeout", type=int, default=900, help="seconds per setup")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--setup", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        try:
            res = worker(args)
        except Exception as e:  # OOM or a crash: report it, the other setups still run
            res = {"error": f"{type(e).__name__}: {e}"[:500]}
        print("RESULT " + json.dumps(res), flush=True)
        return
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            p.error(f"--workloads: unknown workload {name!r}; known: {sorted(WORKLOADS)}")
    for name in args.setups.split(","):
        if name not in SETUPS:
            p.error(f"--setups: unknown setup {name!r}; known: {SETUPS}")
    rows = []
    for wl in args.workloads.split(","):
        for setup in args.setups.split(","):
            cmd = [sys.executable, __file__, "--worker", "--workload", wl, "--setup", setup, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--device", args.device, "--size", args.size]
            print(f"[{wl} / {setup}] running ...", flush=True)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                      env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
                found = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                res = json.loads(found[-1][7:]) if found else {"error": "no result: " + proc.stderr[-400:]}
            except subprocess.TimeoutExpired:
                res = {"error": f"timeout after {args.timeout}s"}
            res.update(workload=wl, setup=setup)
            rows.append(res)
            print(f"[{wl} / {setup}] {json.dumps(res)}", flush=True)
    info = env_info()
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower()).strip("-")
    base = os.path.join(args.out, f"{datetime.date.today().isoformat()}-{slug}{'-' + args.tag if args.tag else ''}")
    md = table(rows)
    with open(base + ".json", "w") as f:
        json.dump({"env": info, "args": vars(args), "rows": rows}, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(f"Measured {datetime.date.today()} on {info['gpu']} (torch {info['torch']}, triton {info['triton']}, "
                f"transformers {info['transformers']}, peft {info['peft']}, liger-kernel {info['liger_kernel']}); "
                f"median of {args.steps} steps after {args.warmup} warm-up steps.\n\n{md}\n")
    print(md)
    print(f"written: {base}.json, {base}.md")


if __name__ == "__main__":
    main()
