"""Regional compilation: compile the repeated decoder block once and reuse it for every block.

The block is found generically: the nn.ModuleList with the most parameters whose children (two or more)
share one class. Each block's forward becomes a torch.compile'd function hidden from the outer trace by
`torch._dynamo.disable(recursive=False)`: the outer model (embeddings, masks, final norm, head and loss)
is compiled as its own graphs and breaks at each block call, and the block's code, compiled for the first
block, is reused by the others (its parameters are graph inputs), so 16 blocks cost one compile.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn


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


def compile_blocks(blocks: nn.ModuleList, backend, dynamic) -> None:
    for block in blocks:
        if getattr(block, "_fxopt_compiled", False):
            continue
        inner = getattr(type(block).forward, "__wrapped__", None)
        if inner is not None and hasattr(block, "gradient_checkpointing"):
            forward = _checkpointed(block, torch.compile(inner.__get__(block), backend=backend, dynamic=dynamic))
        else:
            forward = _plain(torch.compile(block.forward, backend=backend, dynamic=dynamic))
        # Hidden from the outer trace. The disabled function must be a plain one, not the compiled function
        # itself: called inside torch.utils.checkpoint (HF's older layers checkpoint around __call__), a
        # disabled compiled function runs its original code, uncompiled (torch 2.11 and 2.13).
        block.forward = torch._dynamo.disable(forward, recursive=False)
        block._fxopt_compiled = True


def _plain(compiled):
    def forward(*args, **kwargs):
        with _NO_DDP_SPLIT:
            return compiled(*args, **kwargs)

    return forward


# Inside a DistributedDataParallel forward, Dynamo splits every graph it compiles at DDP's gradient-bucket
# boundaries (its DDPOptimizer): a block's LoRA linears would land in different graphs and some go unmatched
# (seen with the tiny model under gloo). A block is already one unit of DDP's overlap, so blocks compile whole.
_NO_DDP_SPLIT = torch._dynamo.config.patch(optimize_ddp=False)


def _checkpointed(block: nn.Module, compiled):
    """The block's forward when its class wraps forward in HF's gradient checkpointing (transformers' layers
    whose `forward` has `__wrapped__`). Compiling that wrapper gets nothing compiled: Dynamo cannot trace the
    checkpoint call around a body it must not inline, so the whole block runs eagerly. Instead the compiled
    region is the unwrapped forward, and the block's own checkpoint function (`_gradient_checkpointing_func`,
    set by gradient_checkpointing_enable, possibly after optimize) runs it, eagerly, around the compiled code:
    the same recompute-in-backward as HF's, over the fused graph. Training forwards build no KV cache under
    fxopt (use_cache is off), which is what HF's wrapper would otherwise strip."""

    def forward(*args, **kwargs):
        with _NO_DDP_SPLIT:
            if block.gradient_checkpointing and block.training and torch.is_grad_enabled():
                return _untraced(block._gradient_checkpointing_func, functools.partial(compiled, **kwargs), *args)
            return compiled(*args, **kwargs)

    return forward


@torch._dynamo.disable
def _untraced(fn, *args):
    # A checkpoint function that is plain Python (a user's wrapper around torch.utils.checkpoint) would
    # otherwise be traced, and Dynamo would inline the compiled block into a checkpoint subgraph that no fxopt
    # pass sees. The compiled block called inside still runs compiled.
    return fn(*args)
