"""HF Trainer on the GPU, with and without fxopt: the dense workload of train_step.py (Llama-3.2-1B shape, bf16,
LoRA r=16 on all 7 linears, 4 x 2048 tokens per step) trained by `transformers.Trainer` as a user runs it
(`fxopt.optimize(model)` then `Trainer(model=model, ...)`, torch_compile off, the model already in bf16 so no
autocast). Per setup: tokens/s from the median step time after the warm-up steps (a TrainerCallback times each
step with a CUDA sync), peak GiB, first step s, the logged losses. `--size tiny` runs on the CPU in seconds.

    PYTHONPATH=$PWD python benchmarks/trainer_gpu.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import kernel_results  # noqa: E402
from benchmarks.train_step import _build_model  # noqa: E402


class _Timer:
    def __init__(self, cuda):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.sync()
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.sync()
                timer.times.append(time.perf_counter() - timer.t0)

        self.cuda, self.times, self.callback = cuda, [], Callback()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run(args, setup) -> dict:
    import fxopt
    from transformers import Trainer, TrainingArguments

    cuda = args.device == "cuda"
    ns = argparse.Namespace(workload="dense", size=args.size, device=args.device, setup="eager")
    model, cfg, bsz, seq = _build_model(ns, torch)
    if setup == "fxopt":
        fxopt.optimize(model)
    timer = _Timer(cuda)
    steps = args.warmup + args.steps + 1
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=bsz,
                              learning_rate=1e-4, report_to=[], save_strategy="no", logging_steps=1, bf16=False,
                              use_cpu=not cuda, dataloader_num_workers=0, seed=0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=targs, train_dataset=_Rows(bsz * steps, seq, cfg.vocab_size),
                      callbacks=[timer.callback])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = timer.times[1 + args.warmup:]
    res = dict(setup=setup, tokens_per_s=bsz * seq / statistics.median(timed), first_step_s=timer.times[0],
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None, losses=losses)
    if setup == "fxopt":
        res["fxopt"] = ", ".join(f"{k} {v['matched']}" for k, v in fxopt.report(model).summary().items())
    del trainer, model
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return res


def main():
    p = kernel_results.parser(__doc__)
    p.add_argument("--setups", default="eager,fxopt")
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--steps", type=int, default=6, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="steps after the first, not timed")
    args = p.parse_args()
    rows = []
    for setup in args.setups.split(","):
        print(f"[trainer / {setup}] running ...", flush=True)
        rows.append(run(args, setup))
        print(rows[-1], flush=True)
    base = rows[0]["tokens_per_s"]
    lines = ["| setup | tokens/s | vs first | peak GiB | first step s | loss first / last | fxopt matches |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| Trainer + {r['setup']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x | {peak} | "
                     f"{r['first_step_s']:.1f} | {r['losses'][0]:.4f} / {r['losses'][-1]:.4f} | "
                     f"{kernel_results.md_cell(r.get('fxopt', ''))} |")
    env = kernel_results.environment() if args.device == "cuda" else {"gpu": "cpu"}
    kernel_results.write(args.out, "trainer", args.tag, {"env": env, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
