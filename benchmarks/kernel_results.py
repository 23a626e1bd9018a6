"""What every kernel microbenchmark (benchmarks/bench_*.py) shares: the environment it records and where its
results go (<out>/<YYYY-MM-DD>-<gpu>-<name>[-tag].json and .md, the markdown also printed)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re

import torch


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
