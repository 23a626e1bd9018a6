"""The torch.compile backend: fxopt's passes on the Dynamo graph, then the inner backend (Inductor by default).

Registered with Dynamo as "fxopt" through the `torch_dynamo_backends` entry point, so
`torch.compile(model, backend="fxopt")` works once fxopt is installed.
"""
from __future__ import annotations

import copy
import functools
import itertools
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fxopt.cache_key import JointPostPass
from fxopt import precompile
from fxopt.config import OptimizeConfig
from fxopt.passes import PASSES
from fxopt.passes.canonicalize import canonicalize
from fxopt.recompute import joint_pass
from fxopt.report import MatchRecord, Report

_graph_ids = itertools.count()


@dataclass
class PassContext:
    graph_name: str
    tensor_names: dict  # placeholder node -> the model's name of the parameter it was called with
    prefix: str = ""
    config: OptimizeConfig = field(default_factory=OptimizeConfig)

    def locate(self, node, fallback: str = "") -> str:
        """Where a parameter node lives in the model, e.g. "model.layers.0.self_attn.q_proj" (report only)."""
        name = self.tensor_names.get(node)
        if not name:
            return fallback
        for suffix in (".weight", ".base_layer"):
            name = name.removesuffix(suffix)
        return name


def _inner(name: str, cudagraphs: bool = False, joint=None):
    """The inner backend. `joint` (Inductor only, see recompute.joint_pass): a joint-graph pre-pass choosing what
    the graph's backward recomputes instead of saving (memory="recompute": its whole forward; "norms": its norms)."""
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = {"joint_custom_post_pass": JointPostPass()}  # norm_grad_add; fxopt's code in the cache key
        if cudagraphs:
            patches["triton.cudagraphs"] = True
        if joint is not None:
            patches["joint_custom_pre_pass"] = joint
        return functools.partial(compile_fx, config_patches=patches)
    return torch._dynamo.lookup_backend(name)


def _dump(dump_dir, graph_name, before: str, after: str, records):
    out = Path(dump_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{graph_name}.before.py").write_text(before)
    (out / f"{graph_name}.after.py").write_text(after)
    report = Report()
    report.graphs.append(graph_name)
    report.add(records)
    (out / f"{graph_name}.report.json").write_text(report.to_json())
    (out / f"{graph_name}.report.md").write_text(report.to_markdown() + "\n")


def run_passes(gm: torch.fx.GraphModule, config: OptimizeConfig, ctx: PassContext) -> list[MatchRecord]:
    """Canonicalize, then run every enabled pass. A pass that raises leaves the graph as the previous passes
    left it (it is re-run from a copy) and is reported, so a bug in a pass never costs a wrong answer."""
    canonicalize(gm)
    records: list[MatchRecord] = []
    for p in PASSES:
        if p.NAME in config.disable:
            continue
        snapshot = torch.fx.Graph()
        snapshot._codegen = copy.deepcopy(gm.graph._codegen)
        env = {}
        snapshot.output(snapshot.graph_copy(gm.graph, env))
        for old_node, new_node in env.items():  # AOTAutograd reads where each input came from off the node
            if hasattr(old_node, "_dynamo_source"):
                new_node._dynamo_source = old_node._dynamo_source
        try:
            records += p.run(gm, ctx)
        except Exception as e:  # fall back to the graph before this pass
            if os.environ.get("FXOPT_DEBUG_PASSES"):
                raise
            gm.graph = snapshot
            gm.recompile()
            warnings.warn(f"fxopt: pass {p.NAME!r} failed on {ctx.graph_name} and was skipped: {e!r}")
            records.append(MatchRecord(p.NAME, "<graph>", "rejected", f"pass error, graph left unchanged: {e!r}"[:400], ctx.graph_name))
    return records


def make_backend(config: OptimizeConfig | None = None, report: Report | None = None, model=None):
    """A Dynamo backend running fxopt's passes with `config`, collecting records into `report`; `model`
    (optional) lets the report name each match by its module path."""
    config = config or OptimizeConfig()
    report = report if report is not None else Report()

    def fxopt_compile(gm: torch.fx.GraphModule, example_inputs):
        graph_name = f"graph_{next(_graph_ids)}"
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        # Names by identity, looked up now rather than at optimize: FSDP2 swaps in new unsharded parameters
        # for each forward, so the tensors a graph is compiled with are not the ones optimize saw.
        names = {}
        if model is not None:
            names = {id(t): n for n, t in model.named_parameters(remove_duplicate=False)}
            names.update({id(t): n for n, t in model.named_buffers(remove_duplicate=False)})
        ctx = PassContext(graph_name, {n: names.get(id(t)) for n, t in zip(placeholders, example_inputs)},
                          config=config)
        dump_dir = config.dump_dir or os.environ.get("FXOPT_DUMP")
        before = gm.code if dump_dir else ""
        devices = {t.device for t in example_inputs if isinstance(t, torch.Tensor)}
        supported, note = kernel_support(next(iter(devices)) if len(devices) == 1 else torch.device("cpu"))
        if note:
            report.note(note)
        records = run_passes(gm, config, ctx) if supported else []
        report.graphs.append(graph_name)
        block_graph = report.blocks is not None and any(
            n and n.startswith(report.blocks[0] + ".") for n in ctx.tensor_names.values())
        if block_graph:
            report.block_graphs += 1  # a graph of the repeated block (its parameters are inputs)
            for r in records:  # a match named by its module stack (no parameter of its own, e.g. a LayerNorm
                # without affine): the traced block is the call's first argument
                r.location = re.sub(r"^args\.0(?=\.|$)", report.blocks[0] + ".*", r.location)
        report.add(records)
        if dump_dir:
            _dump(dump_dir, graph_name, before, gm.code, records)
        if config.verbose:
            sub = Report()
            sub.graphs.append(graph_name)
            sub.add(records)
            print(sub.to_markdown())
        cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
        cudagraphs = config.cudagraphs and cuda
        why = cudagraphs and no_cudagraphs_reason(model, config.memory)
        if why:
            cudagraphs = False
            report.note(f"{why}: graphs compile without CUDA graphs")
        if block_graph and records and config.compile_threads != 0:
            # the blocks' kernels compile side by side now, not one by one at their first launch. Block graphs
            # only: they hold most kernels and compile before the first forward; the stand-in calls' buffers
            # would add to the step's peak in the outer graph compiled after the blocks' forward (the loss).
            warmed = precompile.warm_graph(gm, example_inputs, config.compile_threads)
            if warmed and config.verbose:
                print(f"fxopt: {graph_name}: compiled {warmed['kernels']} kernels of {warmed['ops']} ops in "
                      f"{warmed['seconds']} s ahead of the first run" + (
                          f"; not warmed: {warmed['skipped']}" if warmed["skipped"] else ""))
        joint = joint_pass(config) if block_graph else None
        return _inner(config.inner_backend, cudagraphs, joint)(gm, example_inputs)

    fxopt_compile.report = report
    return fxopt_compile


def no_cudagraphs_reason(model, memory: str = "none") -> str | None:
    """Why `model`'s graphs must not be CUDA graphs, or None.
    - memory="offload": the blocks run their own compilation inside torch.utils.checkpoint, as below.
      (memory="recompute" recomputes inside the compiled graph, which CUDA graphs replay like any other.)
    - HF gradient checkpointing active (a training-mode module with it enabled): the blocks' compiled code runs
      inside torch.utils.checkpoint and again in the backward recompute, reading the outer graphs' outputs (the
      rotary embedding) after later replays reused their memory; on the H200 the recompute failed ("accessing
      tensor output of CUDAGraphs that has been overwritten").
    - FSDP2 (fully_shard): it allocates new unsharded parameters every step, which CUDA graphs must copy in or
      re-record; on 2 x H100 fxopt with CUDA graphs ran at 3.8k tokens/s per GPU (torch.compile: 45k)."""
    if memory == "offload":
        return "memory='offload' checkpoints the blocks (the recompute reads outputs that replays overwrite)"
    if model is None:
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        FSDPModule = ()
    for m in model.modules():
        if isinstance(m, FSDPModule):
            return "the model is sharded by FSDP2"
        if getattr(m, "gradient_checkpointing", False) is True and m.training:
            return "gradient checkpointing is on (the recompute reads outputs that replays overwrite)"
    return None


MIN_CAPABILITY = (8, 0)  # bf16 tensor cores, and the oldest GPU the Triton kernels were written for


def kernel_support(device: torch.device) -> tuple[bool, str | None]:
    """(run the passes?, what to tell the user once) for graphs on `device`. A GPU older than MIN_CAPABILITY
    gets its graphs unchanged (the kernels may not compile there); a device without compiled Triton kernels
    (the CPU, MPS, or no Triton installed) gets the fused ops on their PyTorch math: the same results and the
    same graph structure, not the speed."""
    from fxopt.kernels import common

    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            return False, (f"GPU sm_{cap[0]}{cap[1]} is older than fxopt's kernels support (sm_"
                           f"{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]}+): its graphs are compiled unchanged")
        if common.triton is None:
            return True, "Triton is not installed: the fused ops run their PyTorch reference math (no speedup)"
        return True, None
    if common.triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"on {device.type}, the Triton kernels run in Triton's interpreter (correct but slow: for tests)"
    return True, f"no Triton kernels on {device.type}: the fused ops run their PyTorch reference math (no speedup)"


def fxopt_backend(gm: torch.fx.GraphModule, example_inputs):
    """The backend Dynamo finds by the name "fxopt" (default options)."""
    return _default_backend(gm, example_inputs)


_default_backend = make_backend()
