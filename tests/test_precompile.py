"""fxopt.precompile: fxopt's kernels compiled in a background thread while the inner backend compiles the graph.
On the CPU the thread runs each fused op (and its backward) on stand-in inputs, as on the GPU, with the kernels'
launches compile-only; what it must never do is change the training (same loss, same gradients, nothing
accumulated into the model's .grad)."""
from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt import backend, precompile
from fxopt.kernels import common
from tests.models import batch, lora_grads, tiny_lora_model, twin


def _recorded(monkeypatch) -> list:
    """Every Precompile the backend starts from now on, recorded."""
    started = []
    real = backend.Precompile

    def record(*args):
        started.append(real(*args))
        return started[-1]

    monkeypatch.setattr(backend, "Precompile", record)
    return started


@pytest.fixture
def on_cpu(monkeypatch):
    """Precompile on CPU graphs too, and every Precompile the backend starts, recorded."""
    monkeypatch.setattr(backend, "_PRECOMPILE_ON_CPU", True)
    return _recorded(monkeypatch)


def _step(model, b):
    model.zero_grad(set_to_none=True)
    out = model(**b)
    out.loss.backward()
    return out.loss.detach(), lora_grads(model)


def test_training_unchanged_and_every_fused_op_warmed(on_cpu):
    model = tiny_lora_model("llama")
    ref = twin(model)
    b = batch()
    opt = fxopt.optimize(model, precompile=True, cudagraphs=False)
    plain = fxopt.optimize(ref, precompile=False, cudagraphs=False)
    for _ in range(2):  # the second step runs the compiled graphs without a precompile in flight
        loss, grads = _step(opt, b)
        want_loss, want = _step(plain, b)
        assert torch.equal(loss, want_loss)
        assert grads.keys() == want.keys() and all(torch.equal(grads[k], want[k]) for k in want)
    assert on_cpu, "no graph started a precompile"
    for pre in on_cpu:
        assert not pre.thread.is_alive() and not pre.errors, pre.errors
    warmed = {t for pre in on_cpu for t in pre.done}
    called = {str(n.target) for pre in on_cpu for n in pre.calls}
    assert warmed == called  # every fused op's kind ran in the thread
    assert any("lora" in t for t in warmed) and any("rms_norm" in t for t in warmed)
    # identical calls (same op, same layouts: e.g. two blocks' linears in one graph) run once
    pre = max(on_cpu, key=lambda p: len(p.calls))
    done, errors = [], []
    precompile._warm(pre.calls + pre.calls, pre.inputs, done, errors)
    assert not errors and len(done) == len(pre.calls)


def test_off_by_default_and_env(monkeypatch):
    assert fxopt.OptimizeConfig().precompile is False
    monkeypatch.setenv("FXOPT_PRECOMPILE", "1")
    assert fxopt.OptimizeConfig().precompile is True
    with pytest.raises(TypeError, match="precompile"):
        fxopt.OptimizeConfig(precompile="yes")


def test_compile_only_launch_writes_nothing():
    """Under compiling_only, launch compiles and does not run: the output keeps what it was allocated with."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def fill(OUT, BLOCK: tl.constexpr):
        tl.store(OUT + tl.arange(0, BLOCK), tl.full((BLOCK,), 7.0, tl.float32))

    out = torch.zeros(16)
    with common.compiling_only():
        if not hasattr(fill, "warmup"):
            pytest.skip("this Triton's jitted functions have no warmup")
        try:
            common.launch(fill, None, lambda meta: (1,), (out,), {}, dict(BLOCK=16), out.device)
        except Exception as e:  # a CPU tensor to a compiled (not interpreted) kernel: compiling needs a GPU
            if common.interpreted(fill):
                raise
            pytest.skip(f"no GPU to compile for: {type(e).__name__}")
    assert torch.equal(out, torch.zeros(16))
    if common.interpreted(fill):  # and outside the context the same call runs
        common.launch(fill, None, lambda meta: (1,), (out,), {}, dict(BLOCK=16), out.device)
        assert torch.equal(out, torch.full((16,), 7.0))


def test_inputs_without_a_value_are_skipped():
    """A fused call whose input has no recorded value, is no placeholder and cannot be evaluated (in place) is left
    to the first real call."""
    import fxopt.kernels.rms_norm  # noqa: F401  (registers the op)

    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.Tensor.relu_, (x,))  # no example value recorded, and in place: never evaluated
    z = g.call_function(torch.ops.fxopt.rms_norm.default, (y, x, None, 1e-6, 0.0, True))
    g.output(z)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    calls = precompile.fused_calls(gm)
    assert calls == [z]
    with pytest.raises(LookupError):
        precompile._args((y,), {x: torch.ones(3)}, {})
    done, errors = [], []
    precompile._warm(calls, {x: torch.ones(3)}, done, errors)
    assert done == [] and errors == []


def test_stand_ins_keep_layout_and_grad():
    v = torch.empty_strided((6, 4), (1, 6), dtype=torch.bfloat16).requires_grad_()  # a transposed layout
    t = precompile._stand_in(v, real=False)
    assert t.shape == v.shape and t.stride() == v.stride() and t.dtype == v.dtype
    assert t.requires_grad and t.is_leaf and not t.any()
    i = precompile._stand_in(torch.empty(5, dtype=torch.long), real=False)
    assert not i.requires_grad and not i.any()  # index math stays in bounds
    real = torch.randn(3, requires_grad=True)
    r = precompile._stand_in(real, real=True)
    assert r.is_leaf and r.requires_grad and r is not real and r.data_ptr() == real.data_ptr()


@pytest.mark.gpu
def test_gpu_bf16_same_training_every_op_warmed(monkeypatch):
    """On the GPU (real compile-only warmups): a bf16 Llama with LoRA trains bit for bit as without precompile,
    and the thread warms every fused op kind without errors."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    started = _recorded(monkeypatch)
    model = tiny_lora_model("llama", dtype=torch.bfloat16).cuda()
    ref = twin(model)
    b = {k: v.cuda() for k, v in batch(seq=64, bsz=4).items()}
    opt = fxopt.optimize(model, precompile=True)
    plain = fxopt.optimize(ref, precompile=False)
    for _ in range(2):
        loss, grads = _step(opt, b)
        want_loss, want = _step(plain, b)
        assert torch.equal(loss, want_loss)
        assert all(torch.equal(grads[k], want[k]) for k in want)
    assert started and all(not p.errors for p in started), [p.errors for p in started]
    assert {t for p in started for t in p.done} == {str(n.target) for p in started for n in p.calls}
