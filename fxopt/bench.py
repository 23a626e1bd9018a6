"""`python -m fxopt bench`: the training-step benchmark (benchmarks/train_step.py of the repository) for chosen
workloads and setups, with a progress bar, the markdown table at the end and a PNG plot of the results.

Each (workload, setup) pair runs in its own process through train_step.py's `run_one` (so compile caches and
monkey patches never leak between setups); its `write_results` writes <out>/<date>-<device>[-tag].json and .md
after every pair, so a run cut short keeps what it measured. The plot (tokens/s and peak GiB per setup, one
group of bars per workload) goes next to them as .png; it needs matplotlib (`pip install fxopt[bench]`), and
is skipped with a message without it.

    python -m fxopt bench                                    # dense workload: eager, compile, liger, fxopt
    python -m fxopt bench --workloads dense,moe --setups eager,compile,fxopt --out results/
    python -m fxopt bench --device cpu --size tiny --setups eager,fxopt --steps 2 --warmup 1   # smoke test

train_step.py is part of the source checkout, not of the installed package: this command runs from a clone
(`pip install -e .`), and says where it looked when the script is not there.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import re
import sys
from pathlib import Path

DEFAULT_WORKLOADS = "dense"
DEFAULT_SETUPS = "eager,compile,liger,fxopt"
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_step.py"


def load_train_step(path: Path | None = None):
    """benchmarks/train_step.py as a module (imported by path: benchmarks/ is not a package), or None."""
    path = Path(path or SCRIPT)
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("fxopt_bench_train_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # stdlib imports only at its top level: cheap, no torch
    return module


def add_arguments(p: argparse.ArgumentParser) -> None:
    ts = load_train_step()
    known_w = list(ts.WORKLOADS) if ts else "(benchmarks/train_step.py not found)"
    known_s = ts.SETUPS if ts else "(benchmarks/train_step.py not found)"
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                   help=f"comma-separated workloads to run, of {known_w} (default: %(default)s)")
    p.add_argument("--setups", default=DEFAULT_SETUPS,
                   help=f"comma-separated setups to compare on each workload, of {known_s} (default: %(default)s); "
                        "a setup whose library is missing (liger) is reported as skipped")
    p.add_argument("--size", choices=["full", "tiny"], default=None,
                   help="full: the workloads' real configs (a GPU job); tiny: the same architectures, small "
                        "enough for a CPU smoke test (default: full on CUDA, tiny on the CPU)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="where the workers train (default: cuda if available, else cpu)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run; the median is reported (default: 8)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps after the first (compiling) step (default: 3)")
    p.add_argument("--out", default=None,
                   help="directory for the .json, .md and .png results (default: benchmarks/results of the checkout)")
    p.add_argument("--tag", default="", help="suffix of the result file names (letters, digits, '_', '.', '-')")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per (workload, setup) run (default: 900)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write the PNG plot")


def _split(value: str, known, flag: str, what: str, parser) -> list[str]:
    names = [n.strip() for n in value.split(",")]
    if not all(names):
        parser.error(f"{flag}: empty name in {value!r}; give comma-separated names of {list(known)}")
    for name in names:
        if name not in known:
            parser.error(f"{flag}: unknown {what} {name!r}; known: {list(known)}")
    return list(dict.fromkeys(names))  # drop repeats, keep the order


def _progress(pairs):
    """(iterator over pairs, write function): a tqdm bar when tqdm is importable, else plain lines."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        def plain():
            for i, (wl, setup) in enumerate(pairs, 1):
                print(f"[{i}/{len(pairs)}] {wl}/{setup} ...", flush=True)
                yield wl, setup
        return plain(), print
    bar = tqdm(pairs, desc="bench", unit="run", dynamic_ncols=True)

    def with_label():
        for wl, setup in bar:
            bar.set_postfix_str(f"{wl}/{setup}")
            yield wl, setup
    return with_label(), tqdm.write


def _brief(res: dict) -> str:
    if res.get("error"):
        return "error: " + str(res["error"])[:160]
    parts = [f"{res['tokens_per_s']:,.0f} tokens/s", f"first step {res['first_step_s']:.1f} s"]
    if res.get("peak_gib") is not None:
        parts.append(f"peak {res['peak_gib']:.1f} GiB")
    return ", ".join(parts)


def plot(rows, workloads, setups, path: str, title_text: str = "") -> str | None:
    """Bar charts of tokens/s and peak GiB, one group per workload, one bar per setup; None if it cannot
    (no matplotlib), with the reason printed."""
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib, or fxopt[bench])")
        return None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    by = {(r["workload"], r["setup"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 1.2 * len(workloads) * len(setups)), 4.5))
    width = 0.8 / max(1, len(setups))
    metrics = [("tokens_per_s", "tokens/s", "throughput (higher is better)"),
               ("peak_gib", "peak GiB", "peak memory (lower is better)")]
    for ax, (key, label, title) in zip(axes, metrics):
        measured = False
        for j, setup in enumerate(setups):
            xs, ys = [], []
            for i, wl in enumerate(workloads):
                r = by.get((wl, setup), {})
                if not r.get("error") and r.get(key) is not None:
                    xs.append(i + (j - (len(setups) - 1) / 2) * width)
                    ys.append(r[key])
            if ys:
                measured = True
                bars = ax.bar(xs, ys, width, label=setup)
                ax.bar_label(bars, labels=[f"{y:,.0f}" if y >= 100 else f"{y:.3g}" for y in ys], fontsize=7)
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_xlim(-0.5, len(workloads) - 0.5)
        ax.set_ylabel(label)
        ax.set_title(title)
        if measured:
            ax.legend(fontsize=8)
        else:  # e.g. peak memory on the CPU, which torch does not track
            ax.text(0.5, 0.5, "not measured (CPU runs, or every run failed)", ha="center", va="center",
                    transform=ax.transAxes)
    fig.suptitle(title_text)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args, parser: argparse.ArgumentParser) -> int:
    ts = load_train_step()
    if ts is None:
        parser.error(f"the benchmark script is not there: looked for {SCRIPT} (it is part of the source checkout; "
                     "run from a clone of the repository, installed with `pip install -e .`)")
    workloads = _split(args.workloads, ts.WORKLOADS, "--workloads", "workload", parser)
    setups = _split(args.setups, ts.SETUPS, "--setups", "setup", parser)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.timeout < 1:
        parser.error("--timeout must be >= 1")
    if args.tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.tag):
        parser.error("--tag: letters, digits, '_', '.', '-' only (it goes into a file name)")
    import torch  # to pick the device only: the workers create their own CUDA contexts

    cuda = torch.cuda.is_available()
    if args.device is None:
        args.device = "cuda" if cuda else "cpu"
    elif args.device == "cuda" and not cuda:
        parser.error("--device cuda: no CUDA device here (use --device cpu --size tiny for a smoke test)")
    if args.size is None:
        args.size = "full" if args.device == "cuda" else "tiny"
    args.out = args.out or os.path.join(ts.ROOT, "benchmarks", "results")
    args.profile = ""  # train_step.run_one reads it: no profiling here

    meta = {"date": datetime.date.today().isoformat(), "git": ts._git_state(), "argv": sys.argv[1:],
            "args": {k: v for k, v in vars(args).items() if k not in ("worker", "command", "plot")}}
    pairs = [(wl, setup) for wl in workloads for setup in setups]
    print(f"fxopt bench: {len(pairs)} run(s) on {args.device}, size {args.size}, {args.steps} timed steps after "
          f"{args.warmup} warm-up; each run builds and (for compiled setups) compiles its model first", flush=True)
    rows, base, md = [], None, ""
    it, write = _progress(pairs)
    for wl, setup in it:
        res = ts.run_one(args, wl, setup)
        res.update(workload=wl, setup=setup)
        rows.append(res)
        write(f"{wl}/{setup}: {_brief(res)}")
        base, md = ts.write_results(args, rows, meta)  # after every pair: a run cut short keeps its rows
    print()
    print(md)
    print(f"\nwritten: {base}.json, {base}.md")
    if args.plot:
        png = plot(rows, workloads, setups, base + ".png",
                   f"fxopt bench: {args.device}, size {args.size}, {meta['date']}")
        if png:
            print(f"plot: {png}")
    failed = [r for r in rows if r.get("error") and not str(r["error"]).startswith("skipped")]
    if failed:
        print(f"{len(failed)} of {len(rows)} run(s) failed: " +
              ", ".join(f"{r['workload']}/{r['setup']}" for r in failed), file=sys.stderr)
        return 1
    return 0
