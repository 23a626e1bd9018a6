"""The match report: what each pass matched, where in the model, and why a near-miss was rejected."""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass


@dataclass
class MatchRecord:
    pass_name: str
    location: str  # module path in the model, e.g. "model.layers.0.self_attn.q_proj"
    status: str  # "matched" or "rejected"
    reason: str = ""  # for "rejected": why; for "matched": what it became
    graph: str = ""  # which captured graph (region) it was found in


class Report:
    """Collects MatchRecords across every graph fxopt compiles for one model."""

    def __init__(self):
        self.records: list[MatchRecord] = []
        self.graphs: list[str] = []
        self.blocks: tuple[str, int, str] | None = None  # (ModuleList path, number of blocks, class name)
        self.block_graphs = 0  # graphs compiled for the repeated block (regional compilation)
        self.notes: list[str] = []  # said once per model: where the kernels cannot run (see backend.kernel_support)

    def set_blocks(self, path: str, count: int, cls: str):
        """Regional compilation: the blocks under `path` share one compiled block, so Dynamo compiles (and
        the passes see) only the first block(s); every other block runs that same rewritten code."""
        self.blocks = (path, count, cls)

    def add(self, records):
        for r in records:
            if self.blocks is not None:
                # "model.layers.3.mlp.up_proj" -> "model.layers.*.mlp.up_proj": the record holds for every
                # block that runs this compiled code, whichever block it was compiled for.
                r.location = re.sub(rf"^{re.escape(self.blocks[0])}\.\d+\.", self.blocks[0] + ".*.", r.location)
            key = (r.pass_name, r.location, r.status, r.reason)
            if all((o.pass_name, o.location, o.status, o.reason) != key for o in self.records):
                self.records.append(r)

    def matched(self, pass_name: str | None = None) -> list[MatchRecord]:
        return [r for r in self.records if r.status == "matched" and (pass_name is None or r.pass_name == pass_name)]

    def rejected(self, pass_name: str | None = None) -> list[MatchRecord]:
        return [r for r in self.records if r.status == "rejected" and (pass_name is None or r.pass_name == pass_name)]

    def note(self, text: str) -> None:
        """Tell the user `text` once per model: a warning now, a NOTE line in the report."""
        if text not in self.notes:
            self.notes.append(text)
            warnings.warn(f"fxopt: {text}", stacklevel=3)

    def block_uncompiled(self) -> str | None:
        """Why the repeated block looks uncompiled (graphs of the rest of the model were compiled, none of the
        block), or None."""
        if self.blocks is None or self.block_graphs or not self.graphs:
            return None
        return (f"no graph of the {self.blocks[2]} blocks was compiled: they ran eagerly, unfused. Either "
                "something called their original forward around fxopt's compiled one (a wrapper or hook installed "
                "after fxopt.optimize, or Dynamo disabled for them): optimize the model after installing it; or "
                "Dynamo reached torch._dynamo.config.recompile_limit for code the blocks share with models "
                "compiled earlier in this process (its log says 'hit config.recompile_limit'): raise it.")

    def summary(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self.records:
            out.setdefault(r.pass_name, {"matched": 0, "rejected": 0})[r.status] += 1
        return out

    def to_json(self) -> str:
        return json.dumps({"graphs": self.graphs, "blocks": self.blocks, "summary": self.summary(), "records": [asdict(r) for r in self.records]}, indent=2)

    def to_markdown(self) -> str:
        lines = [f"fxopt match report: {len(self.graphs)} graph(s) compiled", ""]
        if self.blocks is not None:
            path, count, cls = self.blocks
            lines += [f"Regional compilation: the {count} {cls} blocks of `{path}` share one compiled block; "
                      f"`{path}.*` rows hold for every block.", ""]
            if self.block_uncompiled():
                lines += [f"WARNING: {self.block_uncompiled()}", ""]
        lines += [f"NOTE: {note}" for note in self.notes] + ([""] if self.notes else [])
        if not self.records:
            lines.append("No pass matched anything and no near-miss was found: the model runs unchanged.")
            return "\n".join(lines)
        lines += ["| pass | where | status | detail |", "|---|---|---|---|"]
        for r in self.records:
            lines.append(f"| {r.pass_name} | {r.location} | {r.status} | {r.reason} |")
        lines.append("")
        for name, c in self.summary().items():
            lines.append(f"- {name}: {c['matched']} matched, {c['rejected']} rejected")
        return "\n".join(lines)

    def __str__(self):
        return self.to_markdown()

    def __repr__(self):
        return f"Report({self.summary()})"
