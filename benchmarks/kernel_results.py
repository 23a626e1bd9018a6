"""What every kernel microbenchmark (benchmarks/bench_*.py) shares: its common arguments, the check for a GPU,
the environment it records, how an error goes into its table, and where its results go
(<out>/<YYYY-MM-DD>-<gpu>-<name>[-tag].json and .md, the markdown also printed)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every microbenchmark takes (--out, --tag); the script adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--tag", default="", help="suffix of the result file names")
    return p


def subset(p: argparse.ArgumentParser, flag: str, value: str, known, default=None) -> list:
    """The names in a comma-separated --shapes / --cases value (`default`, else all of `known`, when empty;
    "all": all of them); an unknown name is a usage error naming the flag and the known names."""
    if value.strip() == "all":
        return list(known)
    names = [s.strip() for s in value.split(",") if s.strip()] or list(default or known)
    for name in names:
        if name not in known:
            p.error(f"{flag}: unknown {name!r}; known: {list(known)}")
    return names


def gpu_ready(script: str) -> bool:
    """False (and says so) without CUDA: the microbenchmarks only run on a GPU. Else puts this checkout's fxopt
    first on the import path (even when it is not installed) and returns True."""
    if not torch.cuda.is_available():
        print(f"{script}: no CUDA device here; this microbenchmark only runs on a GPU. Nothing done.")
        return False
    sys.path.insert(0, ROOT)
    return True


def md_cell(text) -> str:
    """text fit for one markdown table cell (an error message: pipes escaped, one line, at most 200 chars)."""
    return str(text).replace("|", "\\|").replace("\n", " ")[:200]


def environment(**extra) -> dict:
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "python": platform.python_version(), **extra}


def write(out: str, name: str, tag: str, payload: dict, md: str) -> str:
    """Write payload (JSON) and md next to each other; returns the common path stem."""
    slug = re.sub(r"[^a-z0-9]+", "-", payload["env"]["gpu"].lower()).strip("-")
    base = os.path.join(out, f"{datetime.date.today().isoformat()}-{slug}-{name}{'-' + tag if tag else ''}")
    os.makedirs(out, exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(payload, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(md + "\n")
    print()
    print(md)
    print(f"\nwritten: {base}.json, {base}.md")
    return base
