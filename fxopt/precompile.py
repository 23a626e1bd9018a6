"""Compile fxopt's Triton kernels in a background thread while Inductor compiles the rest of the graph.

A cold first step spends seconds compiling fxopt's own kernels at their first launch, in the main thread and one
after another: Triton's code generation, ptxas, and a C launcher built with gcc per kernel signature (H100, qlora
workload: ~15 s of its 35 s first step). The kernels' arguments are known once the passes have rewritten the graph:
each fused op's inputs have the shapes, strides and dtypes of the values the graph was traced with. So, before
Inductor compiles the graph, a thread calls each distinct fused op (and its backward) on stand-in tensors of those
layouts with every Triton launch replaced by a compile-only warmup (common.launch under `compiling_only`): the
kernels (all configs of a tuned one) are compiled and loaded, nothing is launched (every fxopt kernel goes through
common.launch), so the stand-ins' values never
matter (they are zeros). The graph's compiled function joins the thread before its first call, so no real work
ever runs beside it; the autotuners then only time the configs, already compiled.

Best effort: an op whose inputs cannot be built (a symbolic size without a hint) is skipped, and any error stops the
thread and is reported; the real first call then compiles what is missing, as without this.
"""
from __future__ import annotations

import functools
import threading

import torch

from fxopt.kernels import common


def _concrete(n) -> int:
    if isinstance(n, torch.SymInt):
        hint = n.node.hint
        if hint is None:
            raise LookupError("a symbolic size without a hint")
        return int(hint)
    return int(n)


def _stand_in(v, real: bool):
    """A tensor with v's layout (zeros, so that index math outside the kernels stays in bounds), requiring grad where
    v does; a real input is detached (the warmup must not reach the model's autograd graph). Lists elementwise."""
    if isinstance(v, (list, tuple)):
        return type(v)(_stand_in(x, real) for x in v)
    if not isinstance(v, torch.Tensor):
        return v
    if real:
        t = v.detach()
    else:
        size = [_concrete(s) for s in v.shape]
        stride = [_concrete(s) for s in v.stride()]
        numel = 1 + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else 0
        t = torch.zeros(numel, dtype=v.dtype, device=v.device).as_strided(size, stride)
    if v.requires_grad and t.is_floating_point():
        t = t.detach().requires_grad_()
    return t


def _in_place(node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def _node(node, inputs: dict, memo: dict):
    """A stand-in for what `node` holds: the real example input of a placeholder (detached), else zeros shaped as
    the node's recorded fake value; a node the passes inserted without one (a reshape before a fused op) is
    evaluated on its inputs' stand-ins, unless it is in place."""
    if node not in memo:
        if node in inputs:
            memo[node] = _stand_in(inputs[node], real=True)
        elif (v := node.meta.get("example_value", node.meta.get("val"))) is not None:
            memo[node] = _stand_in(v, real=False)
        elif node.op in ("call_function", "call_method") and not _in_place(node):
            args, kwargs = _args(node.args, inputs, memo), _args(node.kwargs, inputs, memo)
            with torch.enable_grad():
                if node.op == "call_method":
                    memo[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    memo[node] = node.target(*args, **kwargs)
        else:
            raise LookupError(f"no value recorded for {node.name}")
    return memo[node]


def _args(a, inputs: dict, memo: dict):
    if isinstance(a, torch.fx.Node):
        return _node(a, inputs, memo)
    if isinstance(a, (list, tuple)):
        return type(a)(_args(x, inputs, memo) for x in a)
    if isinstance(a, dict):
        return {k: _args(x, inputs, memo) for k, x in a.items()}
    return a


def _signature(target, args, kwargs):
    """What makes two calls compile the same kernels: the op and its arguments' layouts and values."""
    def sig(a):
        if isinstance(a, torch.Tensor):
            return ("T", tuple(a.shape), tuple(a.stride()), a.dtype, a.device, a.requires_grad, a.data_ptr() % 16)
        if isinstance(a, (list, tuple)):
            return tuple(sig(x) for x in a)
        if isinstance(a, dict):
            return tuple((k, sig(x)) for k, x in sorted(a.items()))
        return repr(a)
    return (str(target), sig(args), sig(kwargs))


def fused_calls(gm: torch.fx.GraphModule) -> list:
    """The graph's calls of fxopt's ops (torch.ops.fxopt.*)."""
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and getattr(n.target, "namespace", None) == "fxopt"]


def _warm(calls, inputs: dict, done: list, errors: list) -> None:
    seen, memo = set(), {}
    with common.compiling_only():
        for node in calls:
            try:
                args, kwargs = _args(node.args, inputs, memo), _args(node.kwargs, inputs, memo)
            except LookupError:
                continue  # its inputs cannot be built: its kernels compile at the first real call
            key = _signature(node.target, args, kwargs)
            if key in seen:
                continue
            seen.add(key)
            try:
                with torch.enable_grad():
                    out = node.target(*args, **kwargs)
                    outs = [o for o in (out if isinstance(out, (list, tuple)) else [out])
                            if isinstance(o, torch.Tensor) and o.requires_grad]
                    leaves = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
                    for a in (*args, *kwargs.values()):  # lists of tensors (the grouped LoRA op)
                        if isinstance(a, (list, tuple)):
                            leaves += [t for t in a if isinstance(t, torch.Tensor) and t.requires_grad]
                    if outs and leaves:  # the backward's kernels
                        torch.autograd.grad(outs, leaves, [torch.zeros_like(o) for o in outs], allow_unused=True)
                done.append(str(node.target))
            except Exception as e:  # never the real run's problem: it compiles what is missing itself
                errors.append(f"{node.target}: {type(e).__name__}: {str(e)[:200]}")
                return


class Precompile:
    """The background compile of one graph's fused ops `calls`; `join` waits for it."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs, calls: list):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.inputs = inputs = dict(zip(placeholders, example_inputs))
        self.done: list[str] = []
        self.errors: list[str] = []
        self.calls = calls
        self.thread = threading.Thread(target=_warm, args=(self.calls, inputs, self.done, self.errors),
                                       name="fxopt-precompile", daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join()


def joined_before_first_call(compiled, pre: Precompile, on_join=None):
    """`compiled`, which waits for `pre` before its first call (then calls `on_join(pre)`). Attributes such as
    Inductor's `_boxed_call` are kept, so Dynamo calls it as it would call `compiled`."""
    state = {"pending": True}

    @functools.wraps(compiled)
    def run(*args, **kwargs):
        if state["pending"]:
            pre.join()
            state["pending"] = False
            if on_join is not None:
                on_join(pre)
        return compiled(*args, **kwargs)

    return run
