"""fxopt.precompile: the kernels of a block graph compiled before its first run.

On the CPU there is nothing to compile (warm_graph returns {}), so the pieces are tested apart: launches under
`common.warming` compile and never run, in the calling thread and in the warmed graph's backward on another;
the stand-in calls reach every fxopt op of real block graphs (forward and backward) without touching the
model's gradients. The GPU test checks the whole path."""
import threading

import pytest
import torch

import fxopt
from fxopt import precompile
from fxopt.kernels import common
from tests.models import assert_same_training, batch, tiny_lora_model, train_step, twin
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


class LaunchesInBackward(torch.autograd.Function):
    kernel = None

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        common.launch(LaunchesInBackward.kernel, None, lambda meta: (1,), (g,), {}, {}, torch.device("cpu"))
        return g * 2


def in_thread(fn):
    """fn() on another thread (as autograd runs a CUDA backward); returns its exception, if any."""
    errors = []

    def run():
        try:
            fn()
        except Exception as e:
            errors.append(e)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return errors[0] if errors else None


def test_warming_reaches_the_backward_on_another_thread():
    """A launch on another thread warms only inside the autograd nodes of the tensors named: there it compiles
    and does not run; any other launch there, and every launch after the context, runs for real."""
    LaunchesInBackward.kernel, sink = FakeKernel(), []
    x = torch.ones(3, requires_grad=True)
    y = LaunchesInBackward.apply(x)
    with common.warming(sink, backward_of=[y]):
        assert in_thread(lambda: torch.autograd.grad(y, x, torch.ones(3), retain_graph=True)) is None
        other = in_thread(lambda: common.launch(FakeKernel(), None, lambda m: (1,), (), {}, {}, torch.device("cpu")))
        assert isinstance(other, AssertionError)  # not a node of the warmed graph: launched
        y2 = LaunchesInBackward.apply(x)  # a graph made after the context was entered is not warmed either
        assert isinstance(in_thread(lambda: torch.autograd.grad(y2, x, torch.ones(3))), AssertionError)
    assert sink == ["compiled 1"] and len(LaunchesInBackward.kernel.warmups) == 1
    assert isinstance(in_thread(lambda: torch.autograd.grad(y, x, torch.ones(3))), AssertionError)
    assert common._WARMING.get() is None and common._WARMING_BACKWARD is None


BLOCK_OPS = {"flash_attention", "lora_linear", "rms_norm"}


@pytest.mark.parametrize("make, ops", [(lambda: tiny_lora_model("llama"), BLOCK_OPS | {"swiglu_lora_linear"}),
                                       (lambda: tiny_moe_model("qwen3_moe"), BLOCK_OPS | {"moe_experts"})],
                         ids=["llama", "qwen3_moe"])
def test_stand_ins_reach_every_op_of_the_block_graph(monkeypatch, make, ops):
    """The stand-in calls (here run for real: the CPU has no compile to warm) cover every fxopt op of the block
    graph, forward and backward, and leave the model's training exactly as without them."""
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


def test_a_failing_warm_up_is_a_warning_and_training_goes_on(monkeypatch):
    """Whatever goes wrong in the warm-up itself (here: Triton refuses the async compile mode, as it does when
    one is active already) costs the head start, never the compile: one warning, the same training."""

    class Refused:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            raise RuntimeError("Another AsyncCompileMode is already active")

        def __exit__(self, *exc):
            return False

    class FakeTriton:
        AsyncCompileMode = Refused

    monkeypatch.setattr(precompile, "_applies", lambda example_inputs: True)
    monkeypatch.setattr(common, "triton", FakeTriton)
    model = tiny_lora_model("llama")
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    with pytest.warns(UserWarning, match="compiling the kernels ahead failed"):
        assert_same_training(model, ref, batch())


def norm_graph():
    """A graph holding one fxopt op (the rms_norm kernel's)."""
    from fxopt.kernels import rms_norm  # noqa: F401  (registers the op)
    return torch.fx.symbolic_trace(lambda x, w: torch.ops.fxopt.rms_norm.default(x, w, None, 1e-6, 0.0, False))


def test_nothing_to_warm_on_cpu():
    """A graph of CPU tensors is left alone: no stand-in call, nothing compiled (the same graph on a "CUDA"
    graph is warmed: the guard, not the graph, decides)."""
    x, w = torch.ones(3, 8), torch.ones(8)
    assert precompile.warm_graph(norm_graph(), [x, w], threads=2) == {}


def test_a_graph_with_fused_ops_is_warmed(monkeypatch):
    monkeypatch.setattr(precompile, "_applies", lambda example_inputs: True)
    calls = []
    monkeypatch.setattr(precompile, "_call", lambda node, gm, inputs: calls.append(str(node.target)))
    got = precompile.warm_graph(norm_graph(), [torch.ones(3, 8), torch.ones(8)], threads=2)
    assert calls == ["fxopt.rms_norm.default"] and got["ops"] == 1 and not got["skipped"]


@pytest.mark.gpu
def test_block_kernels_compiled_before_the_first_run():
    """On the GPU: the attention kernels, forward and backward (they live in the block only), are compiled
    while the block graph is warmed, never at their first real launch; training is the same as with
    compile_threads=0."""
    import triton

    compiled, warming = [], [0]
    real = triton.compiler.compile

    def counting(src, *a, **k):
        fn = getattr(src, "fn", None)
        compiled.append((getattr(fn, "__name__", ""), warming[0] > 0))
        return real(src, *a, **k)

    def warm(*a, **k):
        warming[0] += 1
        try:
            warmed.append(real_warm(*a, **k))
        finally:
            warming[0] -= 1
        return warmed[-1]

    torch._dynamo.reset()
    mp = pytest.MonkeyPatch()
    mp.setattr(triton.compiler, "compile", counting)
    # first configs and no atomic partial sums (fxopt's deterministic mode, for this test only): the two models
    # run the same kernels in the same order, so their losses and gradients must be equal to the bit
    mp.setattr(common, "DETERMINISTIC", True)
    warmed, real_warm = [], precompile.warm_graph
    mp.setattr(precompile, "warm_graph", warm)
    try:
        model = tiny_lora_model("llama", dtype=torch.bfloat16, seed=7).cuda()
        ref = twin(model)
        # without CUDA graphs: the two models' steps alternate, and a replay would overwrite the other's loss
        fxopt.optimize(model, compile_threads=4, cudagraphs=False)
        fxopt.optimize(ref, compile_threads=0, cudagraphs=False)
        b = {k: v.cuda() for k, v in batch(seq=72, bsz=3).items()}  # shapes no other test compiles for
        (loss, grads), (ref_loss, ref_grads) = train_step(model, b), train_step(ref, b)
    finally:
        mp.undo()
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    print(warmed, compiled)
    assert warmed and warmed[0]["kernels"] > 0 and not warmed[0]["skipped"], warmed
    attention = {"_fwd_kernel", "_dq_kernel", "_dkdv_kernel"}
    assert attention <= {n for n, during in compiled if during}
    assert not attention & {n for n, during in compiled if not during}
