"""The joint-graph pass folding the add of a norm input's two gradients into the norm backward: on hand-made
graphs (what it folds, what it must not) and inside Inductor on tiny real HF models (one fold per block, loss
and gradients equal the unoptimized model's)."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fxopt
from fxopt.kernels import layer_norm as ln_kernels  # noqa: F401 (registers the ops)
from fxopt.kernels import rms_norm as rms_kernels  # noqa: F401
from fxopt.passes import norm_grad_add
from tests.models import assert_same_training, batch, tiny_lora_model, twin
from tests.passes.test_layer_norm import tiny_model as tiny_ln_model

N = 24


def _rms_dx(dy, xs, w, rstd):
    return torch.ops.fxopt.rms_norm_backward(dy, None, xs, w, rstd, 0.0, True, True, False)[0]


def _inputs(m=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(m, N, generator=g, dtype=dtype)
    rstd = torch.rsqrt(xs.float().pow(2).mean(-1) + 1e-6)
    return (torch.randn(m, N, generator=g, dtype=dtype), xs, torch.randn(N, generator=g, dtype=dtype), rstd,
            torch.randn(m, N, generator=g, dtype=dtype))


def _fold(fn, args):
    gm = make_fx(fn, tracing_mode="fake")(*args)
    count = norm_grad_add.fold_norm_grad_adds(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm, count


def test_folds_the_add_and_keeps_the_value():
    def fn(dy, xs, w, rstd, other):
        return other + _rms_dx(dy, xs, w, rstd)

    args = _inputs()
    gm, count = _fold(fn, args)
    assert count == 1
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor]
    bwd = next(n for n in gm.graph.nodes if n.target is torch.ops.fxopt.rms_norm_backward.default)
    assert bwd.args[1] is not None
    torch.testing.assert_close(gm(*args), fn(*args), rtol=1e-6, atol=1e-6)


def test_layer_norm_backward_folded_too():
    def fn(dy, xs, w, rstd, other):
        mean = xs.mean(-1)
        dx = torch.ops.fxopt.layer_norm_backward(dy, None, xs, w, mean, rstd, None, True, False, False)[0]
        return dx + other  # the other operand order

    args = _inputs()
    gm, count = _fold(fn, args)
    assert count == 1
    torch.testing.assert_close(gm(*args), fn(*args), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["dx_read_twice", "promotes", "broadcasts", "alpha", "other_after", "has_grad_s"])
def test_must_not_fold(case):
    def fn(dy, xs, w, rstd, other):
        if case == "has_grad_s":
            dx = torch.ops.fxopt.rms_norm_backward(dy, other, xs, w, rstd, 0.0, True, True, False)[0]
            return other + dx
        dx = _rms_dx(dy, xs, w, rstd)
        if case == "dx_read_twice":
            return other + dx, dx * 2
        if case == "promotes":
            return other.double() + dx
        if case == "broadcasts":
            return other[0] + dx
        if case == "alpha":
            return torch.add(other, dx, alpha=2.0)
        return (other * 2) + dx  # other_after: computed after the backward in trace order

    gm, count = _fold(fn, _inputs())
    assert count == 0


def _folds_in(model, b, monkeypatch):
    """The folds of every joint graph compiled for `model` (compile caches off: a cached graph skips the pass)."""
    counts = []
    real = norm_grad_add.fold_norm_grad_adds
    monkeypatch.setattr(norm_grad_add, "fold_norm_grad_adds", lambda graph: counts.append(real(graph)))
    with torch._inductor.config.patch(force_disable_caches=True):
        ref = twin(model)
        fxopt.optimize(model, inner_backend="inductor")
        assert_same_training(model, ref, b)
    return counts


def test_llama_block_input_gradient_folded(monkeypatch):
    """Each block's input feeds its first norm and the second norm's residual: one fold in the block graph
    (compiled once for every block), loss and LoRA gradients as the unoptimized model."""
    counts = _folds_in(tiny_lora_model("llama"), batch(seq=24), monkeypatch)
    assert sum(counts) == 1, counts


def test_layer_norm_family_folded(monkeypatch):
    counts = _folds_in(tiny_ln_model("stablelm"), batch(seq=24), monkeypatch)
    assert sum(counts) == 1, counts


def test_parallel_block_folds_both_norms(monkeypatch):
    """GPT-NeoX's parallel block: x + attn(ln1(x)) + mlp(ln2(x)). x's gradient is the sum of three: the block
    output's, ln1's dx and ln2's dx, added in a chain; each norm backward absorbs one add."""
    counts = _folds_in(tiny_ln_model("gpt_neox"), batch(seq=24), monkeypatch)
    assert sum(counts) == 2, counts


def test_a_failing_fold_is_skipped_with_a_warning(monkeypatch):
    """A bug in the joint pass costs the fold, not the compile: training runs and equals the unoptimized model."""
    def broken(graph):
        raise RuntimeError("boom")

    monkeypatch.setattr(norm_grad_add, "fold_norm_grad_adds", broken)
    monkeypatch.delenv("FXOPT_DEBUG_PASSES", raising=False)
    model = tiny_lora_model("llama")
    ref = twin(model)
    with torch._inductor.config.patch(force_disable_caches=True), pytest.warns(UserWarning, match="norm_grad_add"):
        fxopt.optimize(model, inner_backend="inductor")
        assert_same_training(model, ref, batch(seq=24))
