"""Regional compilation: compile the repeated decoder block once and reuse it for every block.

The block is found generically: the nn.ModuleList with the most parameters whose children (two or more)
share one class. Each block's forward is replaced by one that calls the block's (unwrapped) forward from a
frame Dynamo skips (`torch._dynamo.disable(recursive=False)` on that caller): the outer model (embeddings,
masks, final norm, head and loss) is compiled as its own graphs and breaks at each block call, the block's
forward is compiled whole (residual adds included) with the fxopt backend, and that code, compiled for the
first block, is reused by the others (their parameters are graph inputs), so 16 blocks cost one compile.
Under HF gradient checkpointing, and under memory="offload", the block runs a compilation of its own inside
torch.utils.checkpoint instead (see _forward).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
import torch.utils.checkpoint


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        if len({type(c) for c in mod}) != 1:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size > best_size:
            best, best_size = (name, mod), size
    return best


def compile_blocks(blocks: nn.ModuleList, backend, dynamic, memory: str = "none", in_graph: bool = False) -> None:
    """`in_graph` (fxopt.recompute.in_graph): the backend recomputes the blocks inside their compiled graphs,
    so memory="recompute" runs the regular path, without torch.utils.checkpoint."""
    checkpointed = {"none": None, "norms": None, "recompute": None if in_graph else _recompute,
                    "offload": _offloaded}[memory]
    for block in blocks:
        if getattr(block, "_fxopt_compiled", False):
            continue
        inner = getattr(type(block).forward, "__wrapped__", None)
        wraps_checkpoint = inner is not None and hasattr(block, "gradient_checkpointing")
        plain = inner.__get__(block) if wraps_checkpoint else block.forward
        regular = _skipped_frame(_caller(plain))
        compiled = torch.compile(plain, backend=backend, dynamic=dynamic)
        block.forward = _skipped_frame(_forward(block, regular, compiled, wraps_checkpoint, checkpointed,
                                                memory in ("none", "norms")))
        block._fxopt_compiled = True


def _skipped_frame(fn):
    """torch._dynamo.disable(fn, recursive=False), with fn's code marked as skipped up front. The wrapper makes a
    compile that traces a call to fn break the graph there; at run time Dynamo's frame callback would otherwise
    be asked about fn's frame on every call and decide anew to skip it (the skip is not cached for a
    non-recursive disable), at ~0.3-0.7 ms of Python each time (it disassembles the code): with two such frames
    per block that was 12 ms of host time per step of the moe workload, longer than its forward on the GPU
    (H100 cProfile, 2026-11-27). Marking the code skips the frame in Dynamo's C layer, callees still
    compiled: the same semantics, decided once."""
    skip_code = getattr(torch._dynamo.eval_frame, "skip_code", None)
    if skip_code is not None:
        skip_code(fn.__code__)
    return torch._dynamo.disable(fn, recursive=False)


def _caller(forward):
    """A frame that only calls the block's forward. `regular` skips this frame (torch._dynamo.disable with
    recursive=False skips the frames of the function's own code), so the outer model's compile traces the
    forward's frame it calls: the whole block becomes one graph, residual adds included. Skipping the
    forward's own frame instead would compile each submodule it calls as its own graph (4 per decoder layer,
    residual adds run eagerly between them): the forward's code is shared by every block, so one compiled
    graph serves all of them either way."""

    def call(*args, **kwargs):
        return forward(*args, **kwargs)

    return call


def _forward(block: nn.Module, regular, compiled, wraps_checkpoint: bool, checkpointed, copy_first: bool):
    """The block's forward. Not checkpointing: `regular`, the block's forward called from a skipped frame
    (see _caller), which the outer model's compile compiles as one graph (the measured path, CUDA graphs
    included; under memory="recompute" with Inductor, the backend makes that graph's backward recompute it).
    Under HF gradient checkpointing that does not work: torch.utils.checkpoint disables Dynamo for everything
    it calls, so those frames would run eagerly. There the block calls `compiled`, which sets up its own
    compilation and runs compiled inside the checkpoint: through the block's own checkpoint function when its
    class wraps forward in it (transformers 5.2x), or directly when HF checkpoints around __call__
    (transformers 5.17). The recompute in backward is HF's, over the fused graph. `checkpointed` (a memory
    policy without the in-graph recompute: "offload", or "recompute" with another inner backend) runs
    `compiled` inside torch.utils.checkpoint the same way. Training forwards build no KV cache under fxopt
    (use_cache is off), which is what HF's wrapper would otherwise strip. The backend compiles without CUDA
    graphs while checkpointing is on (see backend.no_cudagraphs_reason). `copy_first` (memory="none" only: the
    copy's 32 MB would count against a memory policy's peak): see _hidden_requiring_grad."""

    def forward(*args, **kwargs):
        with _no_ddp_split():
            training = block.training and torch.is_grad_enabled()
            checkpointing = getattr(block, "gradient_checkpointing", False) and training
            if checkpointing:  # HF's own checkpointing is the recompute policy already
                if wraps_checkpoint:
                    return _untraced(block._gradient_checkpointing_func, functools.partial(compiled, **kwargs),
                                     *args)
                return compiled(*args, **kwargs)
            if checkpointed is not None and training:  # a memory policy by torch.utils.checkpoint
                return _untraced(checkpointed, functools.partial(compiled, **kwargs), kwargs, *args)
            if training and copy_first:
                args = _hidden_requiring_grad(args)
            return regular(*args, **kwargs)

    return forward


@torch._dynamo.disable  # called from a skipped frame: Dynamo would otherwise trace it as a frame of its own
def _hidden_requiring_grad(args):
    """args with the block's hidden states (its first tensor argument) replaced by a detached copy that
    requires grad, if they are floating point and do not already. With a frozen embedding the first block's
    hidden states do not, every later block's do, and Dynamo guards on that: the block graph was compiled
    twice (on the H100 the cold first step did not measurably shorten with one compile: 23.8-28.5 s against
    28.0-29.4 s). Reentrant checkpointing (_offloaded) needs an input that requires grad to backpropagate at
    all. The copy's gradient (block 0's last dX GEMM and norm backward) goes nowhere; every other gradient
    is as before."""
    i = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)), None)
    if i is None or args[i].requires_grad or not args[i].is_floating_point():
        return args
    return (*args[:i], args[i].detach().requires_grad_(), *args[i + 1:])


def _no_ddp_split():
    """Inside a DistributedDataParallel forward, Dynamo splits every graph it compiles at DDP's gradient-bucket
    boundaries (its DDPOptimizer): a block's LoRA linears would land in different graphs and some go unmatched
    (seen with the tiny model under gloo). A block is already one unit of DDP's overlap, so blocks compile
    whole. Only inside DDP (no config change per call otherwise)."""
    if torch.nn.parallel.DistributedDataParallel._get_active_ddp_module() is None:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(optimize_ddp=False)


def _recompute(run, kwargs, *args):
    """memory="recompute" without the recompute in the graph (an inner backend other than Inductor): torch's
    non-reentrant activation checkpointing around the compiled block."""
    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def _offloaded(run, kwargs, *args):
    """memory="offload": the reentrant checkpoint saves exactly the block's tensor inputs (the hidden states)
    with save_for_backward, and save_on_cpu moves what is saved to CPU memory (pinned, so the copies back are
    fast) until the backward needs it; the block's activations are recomputed there. Reentrant checkpointing
    only backpropagates if an input requires grad: with a frozen embedding the first block's hidden states do
    not, so they are given a detached copy that does (its gradient goes nowhere, as before). Keyword tensors
    that require grad would get no gradient through a reentrant checkpoint: such a call is only recomputed."""
    if any(isinstance(v, torch.Tensor) and v.requires_grad for v in kwargs.values()):
        return _recompute(run, kwargs, *args)
    if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        args = _hidden_requiring_grad(args)
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=True)


@torch._dynamo.disable
def _untraced(fn, *args):
    # A checkpoint function that is plain Python (a user's wrapper around torch.utils.checkpoint) would
    # otherwise be traced, and Dynamo would inline the compiled block into a checkpoint subgraph that no fxopt
    # pass sees. The compiled block called inside still runs compiled.
    return fn(*args)
