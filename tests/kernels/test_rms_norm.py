"""fxopt::rms_norm against its plain-PyTorch reference in float64: forward (out and s) and every gradient
(x, weight, residual), both variants, residual on and off.

On CPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) in fp32
and fp16; bf16 is tested on the GPU. Every buffer a kernel writes is poisoned with NaN first, so an
element left unwritten fails the test. MAX_BLOCK_N is lowered in some cases so that small rows take the
chunked path meant for rows longer than a register tile."""
import contextlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxopt.kernels import rms_norm as rk
from fxopt.kernels.rms_norm import reference, rms_norm_fn
from tests.kernels.numerics import TOL, rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def max_block(n, one_row_tiles=False):
    """Rows longer than n take the chunked path; one_row_tiles: one row per tile, so that each backward
    program walks several tiles and accumulates dweight over them."""
    old = rk.MAX_BLOCK_N, rk.TILE
    rk.MAX_BLOCK_N = n or old[0]
    rk.TILE = 1 if one_row_tiles else old[1]
    try:
        yield
    finally:
        rk.MAX_BLOCK_N, rk.TILE = old


def run_case(lead, n, dtype, residual, cast_then_scale, w_dtype=None, w_grad=True, use_s=True,
             layout="contiguous", eps=1e-6, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    w_dtype = w_dtype or dtype
    offset = 0.0 if cast_then_scale else 1.0

    def rnd(*shape, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dt)

    if layout == "transposed":  # features are not the fastest dimension: the op copies
        x = rnd(n, *lead).movedim(0, -1)
    elif layout == "sliced":  # rows further apart than n: read in place through the row stride
        x = rnd(*lead, n + 3)[..., 1:n + 1]
    else:
        x = rnd(*lead, n)
    x.requires_grad_()
    r = rnd(*lead, n).requires_grad_() if residual else None
    # around 1 (cast_then_scale) or around 0 + offset 1 (scale_then_cast), as models initialise them
    w = rnd(n, dt=w_dtype, scale=0.2, shift=1.0 - offset).requires_grad_(w_grad)
    named = [(name, t) for name, t in (("x", x), ("weight", w), ("residual", r)) if t is not None and t.requires_grad]
    leaves = [t for _, t in named]

    res = rms_norm_fn(x, w, eps, r, offset, cast_then_scale)
    outs = list(res) if residual else [res]
    x64, w64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, w))
    r64 = r.detach().double().requires_grad_() if residual else None
    refs = reference(x64, w64, eps, r64, offset, cast_then_scale)
    refs = list(refs) if residual else [refs]
    tol = TOL[dtype]
    out_dtype = torch.promote_types(w_dtype, dtype) if cast_then_scale else dtype
    assert outs[0].dtype == out_dtype and outs[0].shape == x.shape
    for o, ref in zip(outs, refs):
        assert rel(o, ref) < tol
    if residual:
        assert outs[1].dtype == dtype

    if not use_s:  # s unused downstream: its gradient is None
        outs, refs = outs[:1], refs[:1]
    grads_out = [torch.randn(o.shape, generator=g).to(device=device, dtype=o.dtype) for o in outs]
    got = torch.autograd.grad(outs, leaves, grads_out)
    leaves64 = [t64 for t, t64 in zip((x, w, r), (x64, w64, r64)) if t is not None and t.requires_grad]
    want = torch.autograd.grad(refs, leaves64, [gr.double() for gr in grads_out])
    # dx is rstd * (dn - n * mean(dn * n)): for rows of 1 or 2 elements the two terms can nearly cancel
    # (for n = 1, dx is about eps / x^2 of either), which leaves fp32 rounding of the terms (a few 1e-7 of
    # their size, in any fp32 implementation) as the error: floor ||ref|| at a tenth of the first term's
    # size. For longer random rows ||dx|| is about that size, so the floor changes nothing there.
    with torch.no_grad():
        h = (x64 if r64 is None else x64 + r64)
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        w_eff = w64 + offset
        dx_scale = (rstd * grads_out[0].double() * w_eff).norm().item()
    for a, b, (name, t) in zip(got, want, named):
        assert a.dtype == t.dtype and a.shape == t.shape, f"gradient of {name}"
        floor = 0.1 * dx_scale if name != "weight" else 0.0
        assert rel(a, b, floor) < tol, f"gradient of {name}"


@settings(max_examples=40, deadline=None)
@given(lead=st.sampled_from([(), (1,), (7,), (2, 5), (33,)]), n=st.integers(1, 80),
       dtype=st.sampled_from([torch.float32, torch.float16]), residual=st.booleans(),
       cast_then_scale=st.booleans(), fp32_weight=st.booleans(), w_grad=st.booleans(), use_s=st.booleans(),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]), chunk=st.sampled_from([None, 16]),
       one_row_tiles=st.booleans(), seed=st.integers(0, 2**16))
def test_op_matches_reference(lead, n, dtype, residual, cast_then_scale, fp32_weight, w_grad, use_s, layout,
                              chunk, one_row_tiles, seed):
    with max_block(chunk, one_row_tiles):
        run_case(lead, n, dtype, residual, cast_then_scale, torch.float32 if fp32_weight else None, w_grad,
                 use_s, layout, seed=seed)


@settings(max_examples=6, deadline=None)
@given(n=st.sampled_from([128, 257, 1000]), residual=st.booleans(), cast_then_scale=st.booleans(),
       chunk=st.sampled_from([None, 64]), seed=st.integers(0, 2**16))
def test_longer_rows(n, residual, cast_then_scale, chunk, seed):
    with max_block(chunk):
        run_case((3,), n, torch.float32, residual, cast_then_scale, seed=seed)


@pytest.mark.parametrize("cast_then_scale", [True, False])
@pytest.mark.parametrize("chunk", [None, 16])
def test_dweight_summed_over_tiles_and_programs(cast_then_scale, chunk):
    """Many one-row tiles over a few backward programs: each program sums its tiles, then programs are summed
    (the one-tile path in registers, the chunked path through its buffer row)."""
    with max_block(chunk, one_row_tiles=True):
        run_case((2, 9), 37, torch.float32, True, cast_then_scale)


@pytest.mark.parametrize("cast_then_scale", [True, False])
def test_cpu_torch_path(monkeypatch, cast_then_scale):
    """Without the interpreter, CPU runs the torch math of the kernels: the same results."""
    monkeypatch.setattr(rk, "_use_triton", lambda t: False)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        run_case((4, 3), 24, dtype, True, cast_then_scale, device="cpu")
        run_case((5,), 9, dtype, False, cast_then_scale, w_dtype=torch.float32, layout="transposed", device="cpu")


def test_interpreter_runs_the_triton_kernel():
    if DEVICE == "cpu":
        assert rk._INTERPRETED, "on CPU the tests must run the Triton kernels through the interpreter"
        assert rk._use_triton(torch.empty(1)) and rk._use_triton(torch.empty(1, dtype=torch.float16))
        assert not rk._use_triton(torch.empty(1, dtype=torch.bfloat16))  # the interpreter truncates to bf16


def test_unwritten_columns_are_caught(monkeypatch):
    """The poisoned outputs catch a kernel that leaves elements unwritten (a tile narrower than the row)."""
    real = rk._blocks
    monkeypatch.setattr(rk, "_blocks", lambda n: (lambda bm, bn, one, w: (bm, max(1, bn // 2), True, w))(*real(n)))
    with pytest.raises(AssertionError, match="non-finite"):
        run_case((5,), 20, torch.float32, False, True)


def test_wrong_backward_is_caught(monkeypatch):
    """The gradient comparison can fail: a backward with the wrong weight offset is caught."""
    real = rk.rms_norm_backward
    monkeypatch.setattr(rk, "rms_norm_backward",
                        lambda dy, ds, xs, w, rstd, offset, *a: real(dy, ds, xs, w, rstd, offset + 0.5, *a))
    with pytest.raises(AssertionError, match="gradient"):
        run_case((5,), 20, torch.float32, True, False)


def test_zero_rows():
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    out = rms_norm_fn(x, w, 1e-6)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert x.grad.shape == (0, 16) and torch.equal(w.grad, torch.zeros_like(w))


def test_bad_arguments():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_fn(x, torch.randn(4, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_fn(x, torch.randn(8, device=DEVICE), 1e-6, residual=torch.randn(3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="offset"):
        rms_norm_fn(x, torch.randn(8, device=DEVICE), 1e-6, offset=1.0, cast_then_scale=True)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("residual", [False, True])
def test_under_torch_compile(backend, residual):
    x = torch.randn(6, 24, device=DEVICE, requires_grad=True)
    r = torch.randn(6, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(24, device=DEVICE, requires_grad=True)

    def fn(x, r, w):
        if residual:
            out, s = rms_norm_fn(x, w, 1e-5, r, 1.0, False)
            return (out.sin() * s).sum()
        return rms_norm_fn(x, w, 1e-5).sin().sum()

    out = torch.compile(fn, backend=backend)(x, r, w)
    leaves = [x, r, w] if residual else [x, w]
    grads = torch.autograd.grad(out, leaves)
    want = torch.autograd.grad(fn(x, r, w), leaves)
    for g1, g2 in zip(grads, want):
        assert rel(g1, g2) < 1e-5


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_transposed_input_under_torch_compile(backend):
    """A per-head norm of a transposed view (as some models apply q/k norms): the compiled backward views
    dx as its fake said it is laid out, so the fakes must give the strides the real op returns."""
    x = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(8, device=DEVICE, requires_grad=True)

    def fn(x, w):
        heads = x.view(2, 5, 4, 8).transpose(1, 2)
        return (rms_norm_fn(heads, w, 1e-6, offset=1.0, cast_then_scale=False).sin() * heads).sum()

    # Inductor's FX graph cache does not key on a custom op's fake: a graph cached under an older fake
    # would be reused, so compile afresh
    with torch._inductor.config.patch(force_disable_caches=True):
        grads = torch.autograd.grad(torch.compile(fn, backend=backend)(x, w), [x, w])
    want = torch.autograd.grad(fn(x, w), [x, w])
    for g1, g2 in zip(grads, want):
        assert rel(g1, g2) < 1e-5


@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(residual):
    """torch.library.opcheck: schema, fake tensors (shapes and strides) against the real op, autograd
    registration, AOT dispatch; on a transposed input, whose strides the outputs must not copy."""
    x = torch.randn(3, 4, 10, device=DEVICE).transpose(0, 1).requires_grad_()
    r = torch.randn(4, 3, 10, device=DEVICE, requires_grad=True) if residual else None
    w = torch.randn(10, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.fxopt.rms_norm.default, (x, w, r, 1e-6, 0.0, True))
    dy = torch.randn(4, 3, 10, device=DEVICE).transpose(0, 1)
    torch.library.opcheck(torch.ops.fxopt.rms_norm_backward.default,
                          (dy, None if r is None else r.detach(), x.detach(), w.detach(), torch.rand(4, 3, device=DEVICE) + 0.5, 1.0, False, True, True))


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 24, dtype=torch.float16)
        outs = torch.ops.fxopt.rms_norm(x, torch.empty(24), x, 1e-6, 0.0, True)
        assert [(tuple(o.shape), o.dtype) for o in outs] == [
            ((2, 5, 24), torch.float32), ((2, 5, 24), torch.float16), ((2, 5), torch.float32)]
        outs = torch.ops.fxopt.rms_norm(x, torch.empty(24), None, 1e-6, 1.0, False)
        assert [(tuple(o.shape), o.dtype) for o in outs] == [((2, 5, 24), torch.float16), ((2, 5), torch.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [((512,), 4096), ((3, 37), 1000), ((1,), 2048), ((2, 300, 8), 128),
                                  ((64,), 5120), ((4,), 16384 + 7), ((7,), 7)])
@pytest.mark.parametrize("cast_then_scale", [True, False])
def test_bf16_gpu(dims, cast_then_scale):
    lead, n = dims
    for residual in (False, True):
        for w_dtype in (torch.bfloat16, torch.float32):
            run_case(lead, n, torch.bfloat16, residual, cast_then_scale, w_dtype, device="cuda")
    run_case(lead, n, torch.bfloat16, True, cast_then_scale, w_grad=False, use_s=False, layout="sliced",
             device="cuda")


@pytest.mark.gpu
def test_fp32_fp16_gpu():
    for dtype in (torch.float32, torch.float16):
        for cast_then_scale in (True, False):
            run_case((129,), 300, dtype, True, cast_then_scale, layout="transposed", device="cuda")
            with max_block(64):
                run_case((33,), 300, dtype, False, cast_then_scale, device="cuda")
