"""fxopt.precompile: the forward kernels of a block graph compiled side by side before its first run.

On the CPU there is nothing to compile (warm_graph returns {}), so the pieces are tested apart: launches under
`common.warming` compile and never run; the stand-in calls reach every fxopt op of real block graphs without
touching the model's gradients. The GPU test checks the whole path."""
import threading

import pytest
import torch

import fxopt
from fxopt import precompile
from fxopt.kernels import common
from tests.models import assert_same_training, batch, tiny_lora_model, twin
from tests.passes.test_moe import tiny_moe_model


class FakeKernel:
    """Records warmups; a launch (kernel[grid]) fails the test."""

    def __init__(self):
        self.warmups = []

    def warmup(self, *args, grid, **kwargs):
        self.warmups.append((args, kwargs))
        return f"compiled {len(self.warmups)}"

    def __getitem__(self, grid):
        raise AssertionError("launched")


class FakeTuned:
    configs = []

    def warmup(self, *args, **kwargs):
        return ["config 1", "config 2"]  # one per config left after pruning


def test_warming_compiles_and_never_launches():
    kernel, sink = FakeKernel(), []
    with common.warming(sink):
        common.launch(kernel, None, lambda meta: (1,), (1, 2), {"FLAG": True}, {"BLOCK": 16}, torch.device("cpu"))
        common.launch(kernel, FakeTuned(), lambda meta: (1,), (1, 2), {"FLAG": True}, {}, torch.device("cpu"))
    assert sink == ["compiled 1", "config 1", "config 2"]
    assert kernel.warmups == [((1, 2), {"FLAG": True, "BLOCK": 16})]
    with pytest.raises(AssertionError, match="launched"):  # outside the context: a real launch again
        common.launch(kernel, None, lambda meta: (1,), (1, 2), {}, {"BLOCK": 16}, torch.device("cpu"))


def test_warming_is_per_thread():
    seen = []
    with common.warming([]):
        t = threading.Thread(target=lambda: seen.append(common._WARMING.get()))
        t.start()
        t.join()
    assert seen == [None]


BLOCK_OPS = {"flash_attention", "lora_linear", "rms_norm"}


@pytest.mark.parametrize("make, ops", [(lambda: tiny_lora_model("llama"), BLOCK_OPS | {"swiglu_lora_linear"}),
                                       (lambda: tiny_moe_model("qwen3_moe"), BLOCK_OPS | {"moe_experts"})],
                         ids=["llama", "qwen3_moe"])
def test_stand_ins_reach_every_op_of_the_block_graph(monkeypatch, make, ops):
    """The stand-in calls (here run for real: the CPU has no compile to warm) cover every fxopt op of the block
    graph and leave the model's training exactly as without them."""
    calls = []

    def record(gm, example_inputs, threads=None):
        inputs = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
        for node in precompile._fxopt_calls(gm):
            precompile._call(node, gm, inputs)  # raises on an argument it cannot stand in for
            calls.append(str(node.target))
        return {}

    monkeypatch.setattr(precompile, "warm_graph", record)
    model = make()
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    assert_same_training(model, ref, batch())
    report = fxopt.report(model)
    assert report.block_graphs >= 1
    assert {c.split(".")[1] for c in calls} == ops


def test_compile_threads_validated():
    assert fxopt.OptimizeConfig(compile_threads=0).compile_threads == 0
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="compile_threads"):
            fxopt.OptimizeConfig(compile_threads=bad)


def test_nothing_to_warm_on_cpu():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    assert precompile.warm_graph(gm, [torch.ones(1, 2)], threads=2) == {}


@pytest.mark.gpu
def test_block_kernels_compiled_before_the_first_run():
    """On the GPU: the block graph's forward kernels compile in the pool's threads, not at their first launch,
    and training is the same as with compile_threads=0."""
    import triton

    compiled = []
    real = triton.compiler.compile

    def counting(src, *a, **k):
        fn = getattr(src, "fn", None)
        compiled.append((getattr(fn, "__module__", ""), getattr(fn, "__name__", ""), threading.current_thread().name))
        return real(src, *a, **k)

    torch._dynamo.reset()
    mp = pytest.MonkeyPatch()
    mp.setattr(triton.compiler, "compile", counting)
    warmed = []
    real_warm = precompile.warm_graph
    mp.setattr(precompile, "warm_graph", lambda *a, **k: warmed.append(real_warm(*a, **k)) or warmed[-1])
    try:
        model = tiny_lora_model("llama", dtype=torch.bfloat16).cuda()
        ref = twin(model)
        # without CUDA graphs: the two models' steps alternate, and a replay would overwrite the other's loss
        fxopt.optimize(model, compile_threads=4, cudagraphs=False)
        fxopt.optimize(ref, compile_threads=0, cudagraphs=False)
        b = {k: v.cuda() for k, v in batch(seq=64, bsz=4).items()}
        assert_same_training(model, ref, b, tol=1e-2)  # same kernels; the LoRA partial sums add by atomics
    finally:
        mp.undo()
    assert warmed and warmed[0]["kernels"] > 0 and not warmed[0]["skipped"], warmed
    pooled = {n for m, n, t in compiled if t.startswith("fxopt-compile") and m.startswith("fxopt")}
    elsewhere = {n for m, n, t in compiled if not t.startswith("fxopt-compile") and m.startswith("fxopt")}
    print(warmed, "pool:", sorted(pooled), "elsewhere:", sorted(elsewhere))
    # the attention forward lives in the block only: compiled ahead, in the pool (or by an earlier test of this
    # process), never at its first launch (the backward's kernels still compile at theirs)
    assert pooled
    assert "_fwd_kernel" not in elsewhere
