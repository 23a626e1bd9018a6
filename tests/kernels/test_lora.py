"""fxopt::lora_linear against `reference` in float64: forward and every gradient.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before fxopt is imported, so the CPU
tests run the real Triton kernel in Triton's interpreter (fp32 and fp16 only: the interpreter's tl.dot on
bf16 is wrong). bf16 and the large shapes run on the GPU (`-m gpu`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fxopt.kernels import lora

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@dataclasses.dataclass(frozen=True)
class Case:
    lead: tuple            # leading dims of x; M = prod(lead)
    k: int
    ns: tuple              # N_i per adapter
    rs: tuple              # R_i per adapter
    scalings: tuple
    dtype: torch.dtype = F32
    adapter_dtype: torch.dtype = F32
    layout: str = "contiguous"   # "contiguous", "transposed" (K not innermost), "strided" (step 2 on K)
    bias: str = "none"           # "none", "all" (trained), "mixed" (some adapters, frozen)
    x_lora: Optional[torch.dtype] = None  # dtype of a separate adapter input, None: the adapter reads x
    train_w: bool = False
    train_x: bool = True
    seed: int = 0


def _x(case, g, device):
    k, lead = case.k, case.lead
    if case.layout == "transposed":  # K is not the innermost dim: x2d has strides (1, M) or a copy
        x = torch.randn(*lead[:-1], k, lead[-1], generator=g).transpose(-1, -2)
    elif case.layout == "strided":
        x = torch.randn(*lead, 2 * k, generator=g)[..., ::2]
    else:
        x = torch.randn(*lead, k, generator=g)
    return x.to(device=device, dtype=case.dtype)


def build(case: Case, device="cpu"):
    """Leaf tensors of the case in their own dtypes (never zeros: randn, scaled so that the base and the
    adapter terms are of the same size and a wrong adapter term shows)."""
    g = torch.Generator().manual_seed(case.seed)

    def rand(*shape, scale=1.0, dtype=case.dtype, grad=True):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    k = case.k
    x = _x(case, g, device).requires_grad_(case.train_x)
    weights = [rand(n, k, scale=k ** -0.5, grad=case.train_w) for n in case.ns]
    has_bias = {"none": [False] * len(case.ns), "all": [True] * len(case.ns),
                "mixed": [i % 2 == 0 for i in range(len(case.ns))]}[case.bias]
    biases = [rand(n, grad=case.bias == "all") if hb else None for n, hb in zip(case.ns, has_bias)]
    lora_as = [rand(r, k, scale=k ** -0.5, dtype=case.adapter_dtype) for r in case.rs]
    lora_bs = [rand(n, r, scale=r ** -0.5, dtype=case.adapter_dtype) for n, r in zip(case.ns, case.rs)]
    x_lora = None
    if case.x_lora is not None:
        x_lora = _x(case, g, device).to(case.x_lora).requires_grad_()
    return x, weights, biases, lora_as, lora_bs, list(case.scalings), x_lora


def _leaves(inputs):
    x, weights, biases, lora_as, lora_bs, _, x_lora = inputs
    flat = [x, x_lora, *weights, *biases, *lora_as, *lora_bs]
    return [t for t in flat if t is not None and t.requires_grad]


def _to64(inputs):
    """The same values in float64, as new leaves (same requires_grad)."""
    def up(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

    x, weights, biases, lora_as, lora_bs, scalings, x_lora = inputs
    return (up(x), [up(w) for w in weights], [up(b) for b in biases], [up(a) for a in lora_as],
            [up(b) for b in lora_bs], scalings, up(x_lora))


@contextlib.contextmanager
def poisoned():
    """Every buffer the kernels write starts as NaN, so an element the kernel forgets fails the test."""
    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    with mock.patch.object(lora, "_new_output", nan_output):
        yield


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def check(case: Case, device="cpu"):
    inputs = build(case, device)
    n = len(case.ns)
    with poisoned():
        result = torch.ops.fxopt.lora_linear(*inputs)
    assert len(result) == n + 1  # the outputs, then t (saved for backward)
    outs = result[:n]
    inputs64 = _to64(inputs)
    refs = lora.reference(*inputs64)
    tol = TOL[case.dtype]
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.shape == (*case.lead, case.ns[i]) and o.dtype == case.dtype
        assert torch.isfinite(o).all(), f"out[{i}] has unwritten or non-finite elements"
        assert rel_err(o, r) <= tol, f"out[{i}]: {rel_err(o, r):.3g} > {tol}"

    leaves, leaves64 = _leaves(inputs), _leaves(inputs64)
    g = torch.Generator().manual_seed(case.seed + 1)
    grad_outs = [torch.randn(o.shape, generator=g).to(device=device, dtype=o.dtype) for o in outs]
    with poisoned():
        grads = torch.autograd.grad(outs, leaves, grad_outs)
    grads64 = torch.autograd.grad(refs, leaves64, [go.double() for go in grad_outs])
    for leaf, got, want in zip(leaves, grads, grads64):
        name = f"grad of a {tuple(leaf.shape)} {leaf.dtype} input"
        assert got.shape == leaf.shape and got.dtype == leaf.dtype, name
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) <= tol, f"{name}: {rel_err(got, want):.3g} > {tol}"


@st.composite
def cases(draw, dtypes):
    dtype = draw(st.sampled_from(dtypes))
    n = draw(st.integers(1, 3))
    big_rank = draw(st.integers(0, 4)) == 0  # ranks past 64 (up to 256) with tiny other dims
    dim = st.integers(1, 16) if big_rank else st.integers(1, 96)
    rank = st.integers(65, 256) if big_rank else st.integers(1, 40)
    lead = draw(st.one_of(st.tuples(st.integers(1, 8 if big_rank else 40)),
                          st.tuples(st.integers(1, 3), st.integers(1, 4 if big_rank else 13))))
    bias = draw(st.sampled_from(["none", "all", "mixed"] if n > 1 else ["none", "all"]))
    return Case(
        lead=lead, k=draw(dim), ns=tuple(draw(dim) for _ in range(n)), rs=tuple(draw(rank) for _ in range(n)),
        scalings=tuple(draw(st.sampled_from([1.0, 2.0, 0.5, -1.5, 0.3])) for _ in range(n)),
        dtype=dtype, adapter_dtype=draw(st.sampled_from([dtype, F32])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])), bias=bias,
        x_lora=draw(st.sampled_from([None, dtype, F32])), train_w=draw(st.booleans()),
        train_x=draw(st.integers(0, 4)) > 0, seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


# Corner cases that must always run: M = 1, K = N = 1, rank 256 over several rank blocks, 3D non-contiguous
# x with every optional part, three adapters of different widths and ranks.
CORNERS = [
    Case(lead=(1,), k=1, ns=(1,), rs=(1,), scalings=(2.0,)),
    Case(lead=(3,), k=5, ns=(7,), rs=(256,), scalings=(0.5,), bias="all", train_w=True),
    Case(lead=(2, 9), k=33, ns=(65, 17, 17), rs=(8, 3, 40), scalings=(2.0, 0.5, -1.0), layout="transposed",
         bias="mixed", x_lora=F32, train_w=True),
    Case(lead=(37,), k=95, ns=(33, 96), rs=(16, 17), scalings=(1.0, 2.0), layout="strided", bias="all"),
]


@settings(max_examples=30, deadline=None)
@given(cases([F32]))
@example(CORNERS[0])
@example(CORNERS[1])
@example(CORNERS[2])
@example(CORNERS[3])
def test_fp32(case):
    check(case)


@settings(max_examples=20, deadline=None)
@given(cases([F16]))
@example(dataclasses.replace(CORNERS[2], dtype=F16, adapter_dtype=F16, x_lora=F16))
@example(dataclasses.replace(CORNERS[3], dtype=F16))
def test_fp16(case):
    check(case)


def test_torch_path_on_cpu():
    """Without the interpreter, CPU tensors run the torch math: same answers."""
    with mock.patch.object(lora, "_INTERPRETED", False):
        check(CORNERS[2])
        check(dataclasses.replace(CORNERS[3], dtype=F16))


def test_unused_output_gets_no_gradient():
    inputs = build(CORNERS[2])
    outs = torch.ops.fxopt.lora_linear(*inputs)
    ref = lora.reference(*inputs)
    got = torch.autograd.grad(outs[1].sum(), _leaves(inputs), allow_unused=True)
    want = torch.autograd.grad(ref[1].sum(), _leaves(inputs), allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None and b is None) or rel_err(a if a is not None else torch.zeros_like(b), b.double()) < 1e-5


def test_trained_bias_next_to_missing_bias_raises():
    """custom_op autograd sees a list holding None as one non-tensor value and would drop the bias grad."""
    x, weights, biases, lora_as, lora_bs, scalings, x_lora = build(CORNERS[2])
    biases[0].requires_grad_()
    with pytest.raises(NotImplementedError, match="trained bias"):
        torch.ops.fxopt.lora_linear(x, weights, biases, lora_as, lora_bs, scalings, x_lora)


def test_opcheck():
    """Schema, fake (meta) shapes and strides, autograd registration and AOT dispatch with dynamic shapes."""
    for case in (CORNERS[2], dataclasses.replace(CORNERS[3], layout="contiguous")):
        torch.library.opcheck(torch.ops.fxopt.lora_linear.default, build(case))
    x, weights, biases, lora_as, lora_bs, scalings, x_lora = build(CORNERS[2])
    t = torch.ops.fxopt.lora_linear(x, weights, biases, lora_as, lora_bs, scalings, x_lora)[-1].detach()
    grads = [torch.randn(*x.shape[:-1], w.shape[0]) for w in weights]
    needs = [True] * (2 + 4 * len(weights))
    needs[2 + len(weights) + 1] = False  # the adapter without bias
    torch.library.opcheck(torch.ops.fxopt.lora_linear_backward.default,
                          (grads, x.detach(), x_lora.detach(), t, weights, lora_as, lora_bs, scalings, needs))


def _compiled_matches_eager(backend, case, device="cpu"):
    torch._dynamo.reset()
    inputs = build(case, device)

    def f(x, weights, biases, lora_as, lora_bs, x_lora):
        outs = torch.ops.fxopt.lora_linear(x, weights, biases, lora_as, lora_bs, list(case.scalings), x_lora)
        return sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs[:len(weights)]))

    x, weights, biases, lora_as, lora_bs, _, x_lora = inputs
    torch._dynamo.mark_dynamic(x, 0)
    loss = torch.compile(f, backend=backend, fullgraph=True)(x, weights, biases, lora_as, lora_bs, x_lora)
    got = torch.autograd.grad(loss, _leaves(inputs))
    inputs64 = _to64(inputs)
    ref = sum((o * (i + 1)).sum() for i, o in enumerate(lora.reference(*inputs64)))
    want = torch.autograd.grad(ref, _leaves(inputs64))
    tol = TOL[case.dtype]
    assert abs(loss.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    for a, b in zip(got, want):
        assert rel_err(a, b) <= tol


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile(backend):
    _compiled_matches_eager(backend, Case(lead=(2, 7), k=24, ns=(20, 12), rs=(4, 8), scalings=(2.0, 0.5),
                                          bias="all", x_lora=F32, train_w=True))


# --- GPU: bf16 (the interpreter cannot), production-sized shapes, the autotuned configs ---

GPU_CASES = [
    Case(lead=(512,), k=2048, ns=(2048, 512, 512), rs=(16, 16, 16), scalings=(2.0, 2.0, 2.0), dtype=BF16,
         adapter_dtype=F32, bias="all", train_w=True),
    Case(lead=(2, 256), k=2048, ns=(2048,), rs=(16,), scalings=(0.5,), dtype=BF16, adapter_dtype=BF16,
         x_lora=BF16),
    Case(lead=(4, 129), k=2048, ns=(5632, 5632), rs=(64, 64), scalings=(1.0, 1.0), dtype=BF16,
         adapter_dtype=F32, x_lora=F32, layout="transposed"),
    Case(lead=(300,), k=1000, ns=(1000, 333), rs=(256, 7), scalings=(-1.0, 3.0), dtype=BF16, adapter_dtype=F32,
         bias="mixed", layout="strided"),
    Case(lead=(512,), k=2048, ns=(2048, 512), rs=(16, 32), scalings=(2.0, 0.5), dtype=F16, adapter_dtype=F32,
         bias="all"),
    Case(lead=(333,), k=1024, ns=(1024, 77), rs=(16, 200), scalings=(2.0, 0.5), dtype=F32, adapter_dtype=F32,
         bias="all", x_lora=F32, train_w=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c.dtype}-{c.lead}-{c.k}-{c.ns}-{c.rs}")
def test_gpu(case):
    check(case, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_gpu_compile(backend):
    _compiled_matches_eager(backend, GPU_CASES[0], device="cuda")
