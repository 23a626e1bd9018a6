"""Regional compilation: compile the repeated decoder block once and reuse it for every block.

The block is found generically: the nn.ModuleList with the most parameters whose children (two or more)
share one class. Each block's forward becomes a torch.compile'd function hidden from the outer trace by
`torch._dynamo.disable(recursive=False)`: the outer model (embeddings, masks, final norm, head and loss)
is compiled as its own graphs and breaks at each block call, and the block's code, compiled for the first
block, is reused by the others (its parameters are graph inputs), so 16 blocks cost one compile.
"""
from __future__ import annotations

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
        compiled = torch.compile(block.forward, backend=backend, dynamic=dynamic)
        block.forward = torch._dynamo.disable(compiled, recursive=False)
        block._fxopt_compiled = True
