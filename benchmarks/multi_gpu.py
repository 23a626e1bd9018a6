"""Multi-GPU training benchmark: the dense LoRA workload of train_step.py under DDP or FSDP2, for eager,
torch.compile and fxopt, launched with torchrun (one process per GPU):

    torchrun --standalone --nproc_per_node 2 benchmarks/multi_gpu.py --mode ddp --out benchmarks/results
    torchrun --standalone --nproc_per_node 2 benchmarks/multi_gpu.py --mode fsdp2 \
        --setups eager,compile,fxopt,fxopt_no_cudagraphs --out benchmarks/results
    torchrun --standalone --nproc_per_node 2 benchmarks/multi_gpu.py --mode ddp --device cpu --size tiny \\
        --dtype float32 --setups eager,fxopt --inner-backend aot_eager        # CPU smoke test (gloo)

Every rank builds the same model (train_step.py's workload config, seed 0, PEFT LoRA on the 7 linears) and
trains on its own rows of one global batch: world size x the workload's batch (dense: 4 x 2048 per GPU), the
same batch every step (as train_step.py). One step = forward with labels, backward, AdamW step on the
trainable parameters, zero_grad. How each setup is wrapped:

  ddp    eager    DDP(model)
         compile  torch.compile(DDP(model))  (Dynamo's DDPOptimizer splits the graph at DDP's buckets)
         fxopt    fxopt.optimize(model), then DDP(model). (fxopt compiles its blocks with Dynamo's
                  DDPOptimizer off: it would cut a block's graph where DDP's 1 MB first bucket fills, and LoRA
                  linears cut apart would go unmatched. A block is already one unit of DDP's overlap.)
  fsdp2  all      fully_shard(each decoder block), then fully_shard(model)  (torch.distributed.fsdp, torch
                  >= 2.6), no MixedPrecisionPolicy: the model is built in the workload's dtype with PEFT's fp32
                  adapters, which is what one GPU computes in (param_dtype=bf16 would round the adapters too);
         compile  then torch.compile(model);   fxopt  then fxopt.optimize(model)
  Frozen base weights take no gradient, so neither mode needs find_unused_parameters; DDP keeps its other
  defaults (as accelerate's DDP does).

Reported per setup: tokens/s per GPU (the per-rank batch's tokens over the median step time of the slowest
rank, --steps timed steps after --warmup steps), peak GiB (the highest rank's torch.cuda.max_memory_allocated
from just before the first step), first-step seconds (slowest rank; includes compilation), the loss of every
step (mean over ranks), Dynamo's graph / break counts (rank 0), and fxopt's match summary of every rank.

The reference (skipped with --no-reference): before the setups, rank 0 alone trains, eagerly and without any distribution,
--ref-steps steps on the whole global batch (its N per-rank micro-batches with gradients accumulated, each
loss / N: the global batch's mean loss and gradient within one GPU's memory), and each setup's row gives
its largest loss difference to that, over those steps.

Each setup runs in the same processes, one after another (Dynamo reset, memory freed between them; the
memory still allocated when a setup starts is recorded as `start_gib`). A setup that raises on every rank
is recorded with its error and the next one runs. Rank 0 writes <out>/<date>-<gpu>-multi-gpu-<mode>[-tag]
.json and .md after every setup (a run cut short keeps its rows) and prints the table at the end.
"""
from __future__ import annotations

import datetime
import gc
import io
import json
import os
import statistics
import sys
import time
from contextlib import redirect_stdout

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (HERE, os.path.dirname(HERE)) if p not in sys.path]  # train_step, kernel_results; fxopt

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from kernel_results import md_cell, parser, write  # noqa: E402
from train_step import (  # noqa: E402
    QUANTIZED, TINY, TINY_BATCH, TINY_MOE, TINY_SEQ, WORKLOADS, _git_state, _versions, timed_steps)

MODES = ["ddp", "fsdp2"]
SETUPS = ["eager", "compile", "fxopt", "fxopt_no_cudagraphs"]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


# ------------------------------------------------------------------------------------------- the workload

def build_model(args, device):
    """train_step.py's workload (config, LoRA targets, batch, sequence) with this script's dtype and rank;
    seed 0, so every rank and the reference start from the same weights. Returns (model, config, bsz, seq)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cls_name, cfg_kwargs, targets, bsz, seq = WORKLOADS[args.workload]
    if args.size == "tiny":
        cfg_kwargs = {**cfg_kwargs, **(TINY_MOE if cls_name == "Qwen3MoeConfig" else TINY)}
        bsz, seq = TINY_BATCH, TINY_SEQ
    cfg = getattr(transformers, cls_name)(**cfg_kwargs)
    cfg.use_cache = False  # a training step never reads the KV cache (as in train_step.py)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=DTYPES[args.dtype])
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0.0, target_modules=targets)  # scale 1
    return get_peft_model(model, lora), cfg, bsz, seq


def global_ids(vocab_size, world, bsz, seq):
    """The global batch [world * bsz, seq]; rank r trains on rows r*bsz .. (r+1)*bsz. A CPU generator: the
    same ids on every device."""
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab_size, (world * bsz, seq), generator=gen)


def reference_losses(args, device, world, steps):
    """One process, eager, no distribution: `steps` AdamW steps on the global batch, as `world` micro-batches
    of the per-rank batch with each loss / world accumulated (every micro-batch has the same number of
    labelled tokens, so this is the global batch's mean loss and gradient). The loss of each step."""
    model, cfg, bsz, seq = build_model(args, device)
    ids = global_ids(cfg.vocab_size, world, bsz, seq).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    for _ in range(steps):
        total = 0.0
        for r in range(world):
            x = ids[r * bsz:(r + 1) * bsz]
            loss = model(input_ids=x, labels=x).loss / world
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    del model, opt
    return losses


# ------------------------------------------------------------------------------------------- one setup

def wrap(args, setup, model, device):
    """The module a training step calls, for this mode and setup (see the docstring)."""
    import fxopt

    fx_opts = dict(inner_backend=args.inner_backend, cudagraphs=setup != "fxopt_no_cudagraphs")
    if args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        kw = dict(device_ids=[device.index] if device.type == "cuda" else None)
        if setup == "eager":
            return DDP(model, **kw)
        if setup == "compile":
            return torch.compile(DDP(model, **kw), backend=args.compile_backend)
        fxopt.optimize(model, **fx_opts)
        return DDP(model, **kw)

    from torch.distributed.fsdp import fully_shard

    from fxopt.regions import find_blocks  # the decoder blocks, found as fxopt finds them (no family names)

    for block in find_blocks(model)[1]:
        fully_shard(block)
    fully_shard(model)
    if setup == "compile":
        return torch.compile(model, backend=args.compile_backend)
    if setup.startswith("fxopt"):
        fxopt.optimize(model, **fx_opts)
    return model


def _report(model):
    import fxopt

    rep = fxopt.report(model)
    return {"summary": rep.summary(), "lora_matched": sorted(r.location for r in rep.matched("lora")),
            "rejected": [f"{r.pass_name} {r.location}: {r.reason}"[:300] for r in rep.rejected()],
            "graphs": len(rep.graphs), "warning": rep.block_uncompiled()}


def run_setup(args, setup, device, rank, world) -> dict:
    """Train one setup on this rank; returns this rank's measurements (losses still per rank)."""
    from torch._dynamo.utils import counters

    cuda = device.type == "cuda"
    counters.clear()  # Dynamo's graph counts of this setup only (torch._dynamo.reset() keeps them)
    res = {"start_gib": torch.cuda.memory_allocated(device) / 2**30 if cuda else None}
    t0 = time.perf_counter()
    model, cfg, bsz, seq = build_model(args, device)
    train = wrap(args, setup, model, device)
    res["build_s"] = time.perf_counter() - t0
    opt = torch.optim.AdamW([p for p in train.parameters() if p.requires_grad], lr=args.lr)
    ids = global_ids(cfg.vocab_size, world, bsz, seq)[rank * bsz:(rank + 1) * bsz].to(device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def step():
        loss = train(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().clone()  # a copy: under CUDA graphs the next step overwrites the loss

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses, first_s, times = timed_steps(step, sync, args.warmup, args.steps)
    losses = torch.stack(losses).float()
    dist.all_reduce(losses)  # the mean over ranks: every rank's batch has the same number of tokens
    res.update(
        tokens_per_step=bsz * seq, step_s=statistics.median(times), first_step_s=first_s,
        losses=(losses / world).tolist(),
        peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    if setup.startswith("fxopt"):
        try:  # a change in fxopt's report API must not lose the measurement
            res["fxopt_report"] = _report(model)
        except Exception as e:
            res["fxopt_report"] = {"error": f"{type(e).__name__}: {e}"}
    return res  # the model, its wrapper and the optimizer go with this frame


def merge(setup, per_rank, ref, args) -> dict:
    """One table row from every rank's results."""
    errors = [f"rank {r}: {res['error']}" for r, res in enumerate(per_rank) if res.get("error")]
    if errors:
        return {"setup": setup, "error": "; ".join(errors)[:2000]}
    r0 = per_rank[0]
    slowest = max(res["step_s"] for res in per_rank)
    row = {
        "setup": setup, "tokens_per_s_per_gpu": r0["tokens_per_step"] / slowest, "step_ms": slowest * 1e3,
        "step_ms_per_rank": [res["step_s"] * 1e3 for res in per_rank],
        "first_step_s": max(res["first_step_s"] for res in per_rank),
        "peak_gib": max(res["peak_gib"] for res in per_rank) if r0["peak_gib"] is not None else None,
        "peak_gib_per_rank": [res["peak_gib"] for res in per_rank],
        "start_gib_per_rank": [res["start_gib"] for res in per_rank],
        "losses": r0["losses"], "loss_first": r0["losses"][0], "loss_last": r0["losses"][-1],
        "graphs": r0["graphs"], "graph_breaks": r0["graph_breaks"], "trainable_params": r0["trainable_params"],
        "build_s": max(res["build_s"] for res in per_rank),
    }
    if ref:
        n = min(len(ref), len(row["losses"]))
        row["ref_max_abs_diff"] = max(abs(a - b) for a, b in zip(row["losses"][:n], ref[:n]))
        row["ref_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(row["losses"][:n], ref[:n]))
    if "fxopt_report" in r0:
        row["fxopt_report_per_rank"] = [res["fxopt_report"] for res in per_rank]
    return row


# ------------------------------------------------------------------------------------------- output

def _fxopt_cell(row):
    reports = row.get("fxopt_report_per_rank")
    if not reports:
        return ""
    if any("error" in r for r in reports):
        return md_cell(next(r["error"] for r in reports if "error" in r))
    text = ", ".join(f"{name} {c['matched']}" + (f" ({c['rejected']} rejected)" if c["rejected"] else "")
                     for name, c in reports[0]["summary"].items())
    same = all(r["summary"] == reports[0]["summary"] and r["lora_matched"] == reports[0]["lora_matched"]
               for r in reports)
    text += f"; {'same on all' if same else 'DIFFERENT on the'} {len(reports)} ranks"
    if any(r["warning"] for r in reports):
        text += "; warning: blocks uncompiled"
    return md_cell(text)


def table(rows, ref_steps) -> str:
    head = (f"| setup | tokens/s per GPU | vs compile | peak GiB | first step s | loss first / last "
            f"| max abs diff vs 1-process ref (steps 1-{ref_steps}) | graphs / breaks | fxopt matches |")
    ncols = head.count(" | ") + 1
    lines = [head, "|" + "---|" * ncols]
    comp = next((r["tokens_per_s_per_gpu"] for r in rows if r["setup"] == "compile" and not r.get("error")), None)
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['setup']} | {md_cell(r['error'])} |" + " |" * (ncols - 2))
            continue
        tps = r["tokens_per_s_per_gpu"]
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        diff = f"{r['ref_max_abs_diff']:.2e}" if "ref_max_abs_diff" in r else "n/a"
        lines.append(f"| {r['setup']} | {tps:,.0f} | {f'{tps / comp:.2f}x' if comp else ''} | {peak} | "
                     f"{r['first_step_s']:.1f} | {r['loss_first']:.4f} / {r['loss_last']:.4f} | {diff} | "
                     f"{r['graphs']} / {r['graph_breaks']} | {_fxopt_cell(r)} |")
    return "\n".join(lines)


def write_results(args, payload, quiet):
    env, rows = payload["env"], payload["rows"]
    head = (f"Measured {payload['date']} on {payload['world_size']} x {env['gpu']} ({args.mode}, "
            f"{payload['backend']}, size {args.size}, {args.dtype}, LoRA r={args.lora_r}): torch {env.get('torch')}, "
            f"triton {env.get('triton')}, transformers {env.get('transformers')}, peft {env.get('peft')}, "
            f"fxopt at {payload['git']}. Per-rank batch {payload['batch_per_rank']}, global batch "
            f"{payload['world_size']} x that. Median of {args.steps} steps after {args.warmup} warm-up steps, "
            f"slowest rank; first step (slowest rank) includes compilation; peak = highest rank's "
            f"torch.cuda.max_memory_allocated; losses are means over ranks. Reference: one process, eager, the "
            f"global batch, losses {['%.4f' % x for x in payload['reference_losses'] or []]}.")
    md = f"{head}\n\n{table(rows, args.ref_steps)}"
    name = f"multi-gpu-{args.mode}"
    if quiet:  # kernel_results.write prints the table; only the last write should
        with redirect_stdout(io.StringIO()):
            return write(args.out, name, args.tag, payload, md)
    return write(args.out, name, args.tag, payload, md)


# ------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--setups", default="eager,compile,fxopt", help=f"comma-separated, of {SETUPS}")
    p.add_argument("--workload", default="dense", choices=[w for w in WORKLOADS if w not in QUANTIZED])
    p.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: train_step.py's small config")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda: nccl; cpu: gloo")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="of the base model (adapters: fp32)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (lora_alpha = r: scale 1)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="steps after the first, not timed")
    p.add_argument("--inner-backend", default="inductor", help="fxopt's inner_backend (aot_eager: quick CPU tests)")
    p.add_argument("--compile-backend", default="inductor", help="the compile setup's torch.compile backend")
    p.add_argument("--no-reference", dest="reference", action="store_false", help="skip the one-process reference")
    p.add_argument("--ref-steps", type=int, default=2, help="steps of the one-process reference")
    p.add_argument("--pg-timeout", type=int, default=300, help="seconds a collective may wait (a rank that failed)")
    args = p.parse_args(argv)
    args.setups = args.setups.split(",")
    for s in args.setups:
        if s not in SETUPS:
            p.error(f"--setups: unknown setup {s!r}; known: {SETUPS}")
    if args.steps < 1 or args.warmup < 0 or args.ref_steps < 1:
        p.error("--steps and --ref-steps must be >= 1, --warmup >= 0")
    if "RANK" not in os.environ:
        p.error("run me with torchrun, e.g. torchrun --nproc_per_node 2 benchmarks/multi_gpu.py --mode ddp")
    return args


def main(argv=None):
    args = parse_args(argv)
    cuda = args.device == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.pg_timeout),
                            **({"device_id": device} if cuda else {}))
    rank, world = dist.get_rank(), dist.get_world_size()

    env = dict(_versions(), gpu=torch.cuda.get_device_name(device) if cuda else "cpu",
               cuda=torch.version.cuda if cuda else None)
    bsz, seq = (TINY_BATCH, TINY_SEQ) if args.size == "tiny" else WORKLOADS[args.workload][3:]
    payload = {"date": datetime.date.today().isoformat(), "git": _git_state(), "argv": sys.argv[1:],
               "args": vars(args), "env": env, "mode": args.mode, "backend": backend, "world_size": world,
               "batch_per_rank": f"{bsz} x {seq}", "reference_losses": None, "rows": []}

    ref = [None]
    if args.reference:
        if rank == 0:
            t0 = time.perf_counter()
            try:
                ref = [reference_losses(args, device, world, args.ref_steps)]
                print(f"[reference] one process, global batch: losses {ref[0]} ({time.perf_counter() - t0:.1f} s)",
                      flush=True)
            except Exception as e:  # e.g. out of memory: the setups still run, without the comparison
                payload["reference_error"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"[reference] failed: {payload['reference_error']}", flush=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        dist.broadcast_object_list(ref, src=0)  # the other ranks wait here
    payload["reference_losses"] = ref[0]

    for setup in args.setups:
        if rank == 0:
            print(f"[{args.mode} / {setup}] running on {world} ranks ...", flush=True)
        try:
            res = run_setup(args, setup, device, rank, world)
        except Exception as e:  # OOM or a crash: recorded; the next setup still runs (if every rank got here)
            res = {"error": f"{type(e).__name__}: {e}"[:2000]}
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        per_rank = [None] * world
        dist.all_gather_object(per_rank, res)
        if rank == 0:
            row = merge(setup, per_rank, ref[0], args)
            payload["rows"].append(row)
            brief = {k: row.get(k) for k in ("tokens_per_s_per_gpu", "peak_gib", "first_step_s", "losses",
                                              "ref_max_abs_diff", "error") if row.get(k) is not None}
            print(f"[{args.mode} / {setup}] {json.dumps(brief)}", flush=True)
            if row.get("fxopt_report_per_rank"):
                print(f"[{args.mode} / {setup}] fxopt: {_fxopt_cell(row)}", flush=True)
            write_results(args, payload, quiet=True)
    if rank == 0:
        write_results(args, payload, quiet=False)
    dist.barrier()  # no rank tears the process group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # The results are written; skip the interpreter's teardown, where a native thread left joinable (gloo/compile
    # workers) has aborted a finished run with "terminate called without an active exception" (seen once in CI).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
