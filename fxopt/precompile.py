"""Compile a graph's fxopt kernels side by side before the graph first runs.

A cold first step compiled fxopt's Triton kernels one after another, each where it was first launched: on an
H200 (2026-11-29, s17b), of a dense-workload first step of 33.8 s, 14.9 s went to `triton.compile` in the main
process and 4.3 s to building 22 C launchers with gcc. Most of that runs outside the GIL (MLIR and LLVM passes
in native code, ptxas and gcc as subprocesses), so it can run in threads at once.

`warm_graph` calls each fxopt op of a graph once, forward and backward, on stand-in inputs (the graph's own
inputs where an op reads one, zeros shaped like the recorded example value elsewhere), inside
`common.warming`: every Triton launch becomes a `warmup` (compile without running), the forward's submitted to
a thread pool through Triton's AsyncCompileMode, the backward's compiled on autograd's thread (outside that
mode); then each compiled kernel's launcher is built in the pool. The first real launch finds the kernel in
Triton's cache and its launcher built. Measured with cold caches in one H200 call (s17d): dense first step
25.2 -> 20.4 s, qlora 26.4 -> 18.1 s; warming the forward alone gained nothing (s17e).

Nothing the stand-in calls compute is used (their kernels do not run; their outputs are dropped), so this
cannot change a result; whatever it misses (a Triton without AsyncCompileMode, an op that rejects the
stand-ins, a launch specialised differently at run time) is compiled at its first launch, as without it.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
import warnings

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from fxopt.kernels import common
from fxopt.passes.graph_utils import value


def default_threads() -> int:
    return max(1, min(8, (os.cpu_count() or 1) - 1))


def _fxopt_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "fxopt"]


def _hint(s) -> int:
    if isinstance(s, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import hint_int
        return hint_int(s)
    return int(s)


def _stand_in(node: fx.Node, gm: fx.GraphModule, inputs: dict) -> torch.Tensor:
    """A real tensor for an argument node: the graph's input itself, a module attribute, or zeros with the
    example value's shape, strides and dtype. LookupError when the node has no recorded value."""
    if node in inputs or node.op == "get_attr":
        t = inputs[node] if node in inputs else getattr(gm, node.target)
        if not isinstance(t, torch.Tensor):
            return t
        # requires_grad as the real call has it, detached from the model's graph (autograd.grad of the stand-in
        # call accumulates nothing into the model's .grad either)
        return t.detach().requires_grad_(t.requires_grad and t.is_floating_point())
    v = value(node)
    if v is None:
        raise LookupError(f"no example value for {node.name}")
    t = torch.empty_strided([_hint(s) for s in v.shape], [_hint(s) for s in v.stride()], dtype=v.dtype,
                            device=v.device).zero_()
    return t.requires_grad_(v.requires_grad and v.is_floating_point())


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _call(node: fx.Node, gm: fx.GraphModule, inputs: dict) -> None:
    """The op's forward as training runs it, then its backward from zero output gradients into every input that
    requires grad. Autograd runs a CUDA backward on a thread of its own: there the launches of this graph's
    nodes are warmed too (common.warming's backward_of), but outside Triton's AsyncCompileMode (a context
    variable of the calling thread), so those compile one by one; their launchers are still built in the pool."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: _stand_in(n, gm, inputs))
    sink = common._WARMING.get()
    with torch.enable_grad():
        out = node.target(*args, **kwargs)
    leaves = [t for t in _tensors((args, kwargs)) if t.requires_grad]
    outs = [t for t in _tensors(out) if t.requires_grad]
    if leaves and outs:
        with common.warming(sink, backward_of=outs) if sink is not None else contextlib.nullcontext():
            torch.autograd.grad(outs, leaves, [torch.zeros_like(t) for t in outs], allow_unused=True)


def _build_launcher(kernel) -> None:
    kernel = kernel.result() if hasattr(kernel, "future") else kernel  # a FutureKernel
    from triton.runtime import driver
    driver.active.launcher_cls(kernel.src, kernel.metadata)  # built and cached by its source's hash


def _applies(example_inputs) -> bool:
    """A graph on CUDA (the interpreter and the CPU compile nothing)."""
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def warm_graph(gm: fx.GraphModule, example_inputs, threads: int | None = None) -> dict:
    """Compile, in `threads` threads, the Triton kernels the fxopt ops of `gm` launch in forward and backward.
    Returns what it did (ops called, ops skipped, kernels compiled, seconds), or {} where it does not apply
    (no CUDA input, no Triton, a Triton without AsyncCompileMode). Never raises: a failure of the warm-up
    itself is one warning, and the kernels then compile at their first launch."""
    threads = default_threads() if threads is None else threads
    triton = common.triton
    async_mode = getattr(triton, "AsyncCompileMode", None) if triton is not None else None
    if threads < 1 or async_mode is None or not _applies(example_inputs):
        return {}
    calls = _fxopt_calls(gm)
    if not calls:
        return {}
    try:
        return _warm(gm, example_inputs, calls, threads, async_mode)
    except Exception as e:
        warnings.warn(f"fxopt: compiling the kernels ahead failed ({type(e).__name__}: {str(e)[:200]}); they "
                      f"compile at their first launch instead")
        return {}


def _warm(gm, example_inputs, calls, threads: int, async_mode) -> dict:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(placeholders, example_inputs))
    start = time.perf_counter()
    kernels: list = []
    skipped: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="fxopt-compile") as pool:
        # ignore_errors: a kernel that fails to compile fails at its real launch, reported as any other
        with async_mode(pool, ignore_errors=True):
            with common.warming(kernels):
                for node in calls:
                    try:
                        _call(node, gm, inputs)
                    except Exception as e:  # the op compiles at its first launch instead
                        skipped.append(f"{node.target}: {type(e).__name__}: {str(e)[:120]}")
        # the compiles have finished (AsyncCompileMode's exit waits for them)
        builds = [pool.submit(_build_launcher, k) for k in kernels if k is not None]
        failed_builds = sum(1 for f in builds if f.exception() is not None)
    return dict(ops=len(calls) - len(skipped), skipped=skipped, kernels=len(builds),
                failed_launchers=failed_builds, seconds=round(time.perf_counter() - start, 2))
