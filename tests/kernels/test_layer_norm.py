"""fxopt::layer_norm against its plain-PyTorch reference in float64: forward (out and s) and every gradient
(x, weight, bias, residual), weight and bias each absent, of x's dtype or fp32, residual on and off.

On CPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) in fp32
and fp16; bf16 is tested on the GPU. Every buffer a kernel writes is poisoned with NaN first, so an
element left unwritten fails the test. MAX_BLOCK_N is lowered in some cases so that small rows take the
chunked path meant for rows longer than a register tile. Rows have means of either sign about as large as
their spread, so that a wrong (or missing) mean subtraction is far outside every tolerance."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fxopt.kernels import layer_norm as lk
from fxopt.kernels.layer_norm import layer_norm_fn, reference
from tests.kernels.numerics import TOL, rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PARAM_MODES = [None, "x", "fp32"]  # weight / bias: absent, of x's dtype, fp32 (as F.layer_norm allows)


@contextlib.contextmanager
def max_block(n, one_row_tiles=False):
    """Rows longer than n take the chunked path; one_row_tiles: one row per tile, so that each backward
    program walks several tiles and accumulates dweight and dbias over them."""
    old = lk.MAX_BLOCK_N, lk.TILE
    lk.MAX_BLOCK_N = n or old[0]
    lk.TILE = 1 if one_row_tiles else old[1]
    try:
        yield
    finally:
        lk.MAX_BLOCK_N, lk.TILE = old


def _laid_out(vals, layout, pad):
    """vals ([*lead, n]) in a tensor of the given layout: "transposed" (features not the fastest dimension: the
    op copies), "sliced" (rows further apart than n: read in place through the row stride) or "contiguous"."""
    *lead, n = vals.shape
    if layout == "transposed":
        t = torch.empty(n, *lead, dtype=vals.dtype, device=vals.device).movedim(0, -1)
    elif layout == "sliced":
        t = torch.full((*lead, n + pad), 7.0, dtype=vals.dtype, device=vals.device)[..., 1:n + 1]
    else:
        t = torch.empty_like(vals)
    return t.copy_(vals)


def run_case(lead, n, dtype, residual, weight="x", bias="x", x_grad=True, w_grad=True, b_grad=True, r_grad=True,
             use_s=True, layout="contiguous", eps=1e-5, seed=0, device=DEVICE):
    """weight, bias: a PARAM_MODES entry. *_grad: whether that leaf requires grad. use_s: whether s (with a
    residual) is used downstream, so that its gradient reaches the op."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dt)

    def param(mode, shift):
        if mode is None:
            return None
        return rnd(n, dt=dtype if mode == "x" else torch.float32, scale=0.3, shift=shift)

    # each row its own mean, of either sign and about its spread: rows normalised without subtracting it, or
    # with another row's, are wrong by O(1)
    x = _laid_out(rnd(*lead, n) + rnd(*lead, 1), layout, pad=3).requires_grad_(x_grad)
    r = _laid_out(rnd(*lead, n, scale=0.5) + rnd(*lead, 1, scale=0.5), layout, pad=5) if residual else None
    w, b = param(weight, 1.0), param(bias, 0.0)
    leaves = [("x", x), ("weight", w), ("bias", b), ("residual", r)]
    for (name, t), req in zip(leaves[1:], (w_grad, b_grad, r_grad)):
        if t is not None:
            t.requires_grad_(req)
    named = [(name, t) for name, t in leaves if t is not None and t.requires_grad]

    res = layer_norm_fn(x, w, b, eps, r)
    outs = list(res) if residual else [res]
    leaves64 = [(name, None if t is None else t.detach().double().requires_grad_(t.requires_grad))
                for name, t in leaves]
    x64, w64, b64, r64 = (t for _, t in leaves64)
    s_rounding = None
    if residual:
        # The op's s is x + residual rounded to x's dtype (what the model's residual add gives): normalise that
        # s in the reference too (the rounding added as a constant, so that gradients pass through as they do in
        # the op). After the mean is subtracted, that rounding is |mean| / spread times larger relative to the
        # output: rows whose elements are close to each other (of 3 elements, say) would be off by more than
        # x's tolerance in any implementation of the op, F.layer_norm after the add in fp16 too (measured: dx 14
        # times fp16's tolerance off the unrounded s's reference, for rows of 3 in fp16).
        s_rounding = ((x64 + r64).to(dtype).double() - (x64 + r64)).detach()
    refs = reference(x64, w64, b64, eps, None if r64 is None else r64 + s_rounding)
    refs = [refs[0], x64 + r64] if residual else [refs]
    tol = TOL[dtype]
    for o in outs:  # out and s: in x's dtype and shape
        assert o.dtype == dtype and o.shape == x.shape
    for o, ref, name in zip(outs, refs, ("out", "s")):  # s against the exact sum
        assert rel(o, ref) < tol, name
    if not named:
        return

    if not use_s or not refs[-1].requires_grad:  # s unused downstream (or of no leaf that wants a gradient)
        outs, refs = outs[:1], refs[:1]
    grads_out = [_laid_out(torch.randn(o.shape, generator=g).to(device=device, dtype=o.dtype), layout, pad=2)
                 for o in outs]
    got = torch.autograd.grad(outs, [t for _, t in named], grads_out)
    want = torch.autograd.grad(refs, [t for _, t in leaves64 if t is not None and t.requires_grad],
                               [gr.double() for gr in grads_out])
    # dx is rstd * (dn - mean(dn) - nrm * mean(dn * nrm)) (dn = dout * weight, nrm the normalised row): dn's
    # part orthogonal to both 1 and nrm, times rstd. A row of 2 elements has nothing left: its nrm is about
    # (+1, -1) (LayerNorm's output over 2 elements hardly depends on x), so the terms cancel to about
    # eps / (x1 - x2)^2 of their size, and what is left is the terms' rounding. That is more than fp32's 6e-8
    # of their size: nrm = (h - mean) * rstd is known to 6e-8 of |mean| * rstd (the deviation loses the digits
    # of the mean), in any fp32 implementation (F.layer_norm's too), and a row of 2 close elements has |mean| *
    # rstd of 10 to 100 (measured: 1.4e-6 of the terms at 36). So floor ||ref|| at a tenth of the terms' size
    # ||rstd * dn||, for rows of 2 each row's scaled by 1 + |mean| * rstd. For rows of 3 or more random elements
    # ||dx|| is about the terms' size, so the floor changes nothing there (and scaling it there too would:
    # one ill-conditioned row would set it for all). A row of 1 element needs none: its h - mean is exactly 0,
    # and so are nrm and dx, in the kernel and the reference.
    with torch.no_grad():
        h = x64 if r64 is None else x64 + r64 + s_rounding
        mean = h.mean(-1, keepdim=True)
        rstd = torch.rsqrt((h - mean).pow(2).mean(-1, keepdim=True) + eps)
        dn = grads_out[0].double() * (1.0 if w64 is None else w64)
        dx_scale = (rstd * dn * (1.0 + mean.abs() * rstd if n == 2 else 1.0)).norm().item()
    for a, bb, (name, t) in zip(got, want, named):
        assert a.dtype == t.dtype and a.shape == t.shape, f"gradient of {name}"
        floor = 0.1 * dx_scale if name in ("x", "residual") else 0.0
        assert rel(a, bb, floor) < tol, f"gradient of {name}"


@settings(max_examples=40, deadline=None)
@given(lead=st.sampled_from([(), (1,), (7,), (2, 5), (33,)]), n=st.integers(1, 80),
       dtype=st.sampled_from([torch.float32, torch.float16]), residual=st.booleans(),
       weight=st.sampled_from(PARAM_MODES), bias=st.sampled_from(PARAM_MODES),
       grads=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()), use_s=st.booleans(),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]), eps=st.sampled_from([1e-5, 1e-6, 0.1]),
       chunk=st.sampled_from([None, 16]), one_row_tiles=st.booleans(), seed=st.integers(0, 2**16))
def test_op_matches_reference(lead, n, dtype, residual, weight, bias, grads, use_s, layout, eps, chunk,
                              one_row_tiles, seed):
    with max_block(chunk, one_row_tiles):
        run_case(lead, n, dtype, residual, weight, bias, *grads, use_s=use_s, layout=layout, eps=eps, seed=seed)


@settings(max_examples=6, deadline=None)
@given(n=st.sampled_from([128, 257, 1000]), residual=st.booleans(), weight=st.sampled_from(PARAM_MODES),
       bias=st.sampled_from(PARAM_MODES), eps=st.sampled_from([1e-5, 0.1]), chunk=st.sampled_from([None, 64]),
       seed=st.integers(0, 2**16))
def test_longer_rows(n, residual, weight, bias, eps, chunk, seed):
    with max_block(chunk):
        run_case((3,), n, torch.float32, residual, weight, bias, eps=eps, seed=seed)


@pytest.mark.parametrize("chunk", [None, 64])
def test_large_mean(chunk):
    """Rows whose mean is 32 times their spread: the variance is summed from deviations (on the chunked path in a
    sweep of its own), not as E[h^2] - mean^2, which cancels (measured 5e-5 on the chunked path here, 5 times the
    tolerance). What is left is the fp32 rounding of the mean, 6e-8 * 32 = 2e-6 relative to the deviations, in
    any fp32 implementation."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 1000, generator=g) + 32).to(DEVICE)
    with max_block(chunk):
        out = layer_norm_fn(x, None, None, 1e-5)
    assert rel(out, reference(x.double(), None, None, 1e-5)) < TOL[torch.float32]


@pytest.mark.parametrize("params", ["x", "fp32"])
@pytest.mark.parametrize("chunk", [None, 16])
def test_dweight_dbias_summed_over_tiles_and_programs(params, chunk):
    """Many one-row tiles over a few backward programs: each program sums its tiles, then programs are summed
    (the one-tile path in registers, the chunked path through its buffer row), for dweight and dbias."""
    with max_block(chunk, one_row_tiles=True):
        run_case((2, 9), 37, torch.float32, True, params, params)
        run_case((11,), 37, torch.float16, False, params, params, x_grad=False)  # dweight and dbias alone


def test_cpu_torch_path(monkeypatch):
    """Without the interpreter, CPU runs the torch math of the kernels: the same results."""
    monkeypatch.setattr(lk, "_use_triton", lambda t: False)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        run_case((4, 3), 24, dtype, True, device="cpu")
        run_case((5,), 9, dtype, False, "fp32", "fp32", layout="transposed", device="cpu")
        run_case((6,), 10, dtype, True, None, "x", r_grad=False, use_s=False, layout="sliced", device="cpu")
        run_case((3,), 2, dtype, False, "x", None, b_grad=False, device="cpu")


def test_interpreter_runs_the_triton_kernel():
    if DEVICE == "cpu":
        assert lk._INTERPRETED, "on CPU the tests must run the Triton kernels through the interpreter"
        assert lk._use_triton(torch.empty(1)) and lk._use_triton(torch.empty(1, dtype=torch.float16))
        assert not lk._use_triton(torch.empty(1, dtype=torch.bfloat16))  # the interpreter truncates to bf16


def test_unwritten_columns_are_caught(monkeypatch):
    """The poisoned outputs catch a kernel that leaves elements unwritten (a tile narrower than the row)."""
    real = lk._blocks
    monkeypatch.setattr(lk, "_blocks", lambda n: (lambda bm, bn, one, w: (bm, max(1, bn // 2), True, w))(*real(n)))
    with pytest.raises(AssertionError, match="non-finite"):
        run_case((5,), 20, torch.float32, False)


@pytest.mark.parametrize("perturb", ["mean", "rstd"])
def test_wrong_backward_is_caught(monkeypatch, perturb):
    """The gradient comparison can fail: a backward handed a slightly wrong mean or rstd is caught."""
    real = lk.layer_norm_backward

    def wrong(dy, ds, xs, w, mean, rstd, *a):
        if perturb == "mean":
            return real(dy, ds, xs, w, mean + 0.05 / rstd, rstd, *a)
        return real(dy, ds, xs, w, mean, rstd * 1.01, *a)

    monkeypatch.setattr(lk, "layer_norm_backward", wrong)
    with pytest.raises(AssertionError, match="gradient"):
        run_case((5,), 20, torch.float32, True)


def test_only_s_used():
    """s used downstream and out not: out's gradient is zero (autograd hands the backward zeros), so dx = ds."""
    x, r = (torch.randn(5, 12, device=DEVICE, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(12, device=DEVICE, requires_grad=True) for _ in range(2))
    v = torch.randn(5, 12, device=DEVICE)
    _, s = layer_norm_fn(x, w, b, 1e-5, r)
    gx, gr, gw, gb = torch.autograd.grad((s * v).sum(), [x, r, w, b])
    assert torch.equal(gx, v) and torch.equal(gr, v)
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


@pytest.mark.parametrize("chunk", [None, 4])
def test_zero_rows(chunk):
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    b = torch.randn(16, device=DEVICE, requires_grad=True)
    with max_block(chunk):
        out = layer_norm_fn(x, w, b, 1e-5)
        assert out.shape == (0, 16)
        out.sum().backward()
    assert x.grad.shape == (0, 16)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_broadcast_gradient():
    """A gradient of row stride 0 (out * v summed: v broadcast over the rows) reaches the kernel as is."""
    x = (torch.randn(6, 24, device=DEVICE) + 2).requires_grad_()
    w = torch.randn(24, device=DEVICE, requires_grad=True)
    b = torch.randn(24, device=DEVICE, requires_grad=True)
    v = torch.randn(24, device=DEVICE)
    got = torch.autograd.grad((layer_norm_fn(x, w, b, 1e-5) * v).sum(), [x, w, b])
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = torch.autograd.grad((reference(x64, w64, b64, 1e-5) * v.double()).sum(), [x64, w64, b64])
    for a, bb in zip(got, want):
        assert rel(a, bb) < TOL[torch.float32]


def test_bad_arguments():
    x = torch.randn(3, 8, device=DEVICE)
    w, b = torch.randn(8, device=DEVICE), torch.randn(8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        layer_norm_fn(x, torch.randn(4, device=DEVICE), b, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        layer_norm_fn(x, torch.randn(1, 8, device=DEVICE), None, 1e-5)
    with pytest.raises(ValueError, match="bias"):
        layer_norm_fn(x, w, torch.randn(9, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="bias"):
        layer_norm_fn(x, None, torch.randn(8, 1, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        layer_norm_fn(x, w, b, 1e-5, residual=torch.randn(3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="residual"):
        layer_norm_fn(x, w, b, 1e-5, residual=torch.randn(3, 8, device=DEVICE, dtype=torch.float16))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("residual", [False, True])
def test_under_torch_compile(backend, residual):
    x = (torch.randn(6, 24, device=DEVICE) + 1).requires_grad_()
    r = torch.randn(6, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(24, device=DEVICE, requires_grad=True)
    b = torch.randn(24, device=DEVICE, requires_grad=True)

    def fn(x, r, w, b):
        if residual:
            out, s = layer_norm_fn(x, w, b, 1e-5, r)
            return (out.sin() * s).sum()
        return layer_norm_fn(x, w, b, 1e-5).sin().sum()

    out = torch.compile(fn, backend=backend)(x, r, w, b)
    leaves = [x, r, w, b] if residual else [x, w, b]
    grads = torch.autograd.grad(out, leaves)
    want = torch.autograd.grad(fn(x, r, w, b), leaves)
    for g1, g2 in zip(grads, want):
        assert rel(g1, g2) < 1e-5


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_transposed_input_under_torch_compile(backend):
    """A per-head norm of a transposed view, without weight: the compiled backward views dx as its fake said it
    is laid out, so the fakes must give the strides the real op returns."""
    x = (torch.randn(2, 5, 32, device=DEVICE) - 1).requires_grad_()
    b = torch.randn(8, device=DEVICE, requires_grad=True)

    def fn(x, b):
        heads = x.view(2, 5, 4, 8).transpose(1, 2)
        return (layer_norm_fn(heads, None, b, 1e-6).sin() * heads).sum()

    # Inductor's FX graph cache does not key on a custom op's fake: a graph cached under an older fake
    # would be reused, so compile afresh
    with torch._inductor.config.patch(force_disable_caches=True):
        grads = torch.autograd.grad(torch.compile(fn, backend=backend)(x, b), [x, b])
    want = torch.autograd.grad(fn(x, b), [x, b])
    for g1, g2 in zip(grads, want):
        assert rel(g1, g2) < 1e-5


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(residual, affine):
    """torch.library.opcheck: schema, fake tensors (shapes and strides) against the real op, autograd
    registration, AOT dispatch; on a transposed input, whose strides the outputs must not copy."""
    x = (torch.randn(3, 4, 10, device=DEVICE) + 1).transpose(0, 1).requires_grad_()
    r = torch.randn(4, 3, 10, device=DEVICE, requires_grad=True) if residual else None
    w = torch.randn(10, device=DEVICE, requires_grad=True) if affine else None
    b = torch.randn(10, device=DEVICE, requires_grad=True) if affine else None
    torch.library.opcheck(torch.ops.fxopt.layer_norm.default, (x, w, b, r, 1e-5))
    dy = torch.randn(4, 3, 10, device=DEVICE).transpose(0, 1)
    xs = x.detach()
    mean, rstd = torch.randn(4, 3, device=DEVICE), torch.rand(4, 3, device=DEVICE) + 0.5
    torch.library.opcheck(torch.ops.fxopt.layer_norm_backward.default,
                          (dy, None if r is None else r.detach(), xs, None if w is None else w.detach(), mean, rstd,
                           torch.float32 if affine else None, True, affine, affine))


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 24, dtype=torch.float16)
        w, b = torch.empty(24), torch.empty(24, dtype=torch.float16)
        outs = torch.ops.fxopt.layer_norm(x, w, b, x, 1e-5)
        assert [(tuple(o.shape), o.dtype) for o in outs] == [
            ((2, 5, 24), torch.float16), ((2, 5, 24), torch.float16), ((2, 5), torch.float32),
            ((2, 5), torch.float32)]
        outs = torch.ops.fxopt.layer_norm(x, None, None, None, 1e-5)
        assert [(tuple(o.shape), o.dtype) for o in outs] == [
            ((2, 5, 24), torch.float16), ((2, 5), torch.float32), ((2, 5), torch.float32)]
        mean = torch.empty(2, 5)
        grads = torch.ops.fxopt.layer_norm_backward(x, x, x, w, mean, mean, torch.float16, True, True, True)
        assert [(tuple(t.shape), t.dtype) for t in grads] == [
            ((2, 5, 24), torch.float16), ((24,), torch.float32), ((24,), torch.float16)]
        grads = torch.ops.fxopt.layer_norm_backward(x, None, x, None, mean, mean, torch.float32, False, False, True)
        assert [(tuple(t.shape), t.dtype) for t in grads] == [((24,), torch.float32)]


@pytest.mark.parametrize("dtype, p_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                            (torch.float16, torch.float32), (torch.float32, None)])
@pytest.mark.parametrize("residual", [False, True])
def test_matches_torch_layer_norm(dtype, p_dtype, residual):
    """The op is F.layer_norm's math (fp32 statistics and affine, one rounding to x's dtype), after the residual
    add in x's dtype: forward and gradients agree with F.layer_norm's within x's tolerance, s exactly."""
    g = torch.Generator().manual_seed(3)

    def rnd(*shape, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=DEVICE, dtype=dt).requires_grad_()

    x = rnd(6, 48, shift=1.5)
    r = rnd(6, 48, scale=0.5) if residual else None
    w = None if p_dtype is None else rnd(48, dt=p_dtype, scale=0.3, shift=1.0)
    b = None if p_dtype is None else rnd(48, dt=p_dtype, scale=0.3)
    leaves = [t for t in (x, w, b, r) if t is not None]
    res = layer_norm_fn(x, w, b, 1e-5, r)
    out, s = res if residual else (res, None)
    s_ref = x + r if residual else x
    want_out = F.layer_norm(s_ref, (48,), w, b, 1e-5)
    assert out.dtype == want_out.dtype == dtype
    assert rel(out, want_out) < TOL[dtype]
    if residual:
        assert torch.equal(s, s_ref)  # both the sum rounded once to x's dtype
    dy = torch.randn(out.shape, generator=g).to(device=DEVICE, dtype=dtype)
    got = torch.autograd.grad(out, leaves, dy)
    want = torch.autograd.grad(want_out, leaves, dy)
    for a, bb, t in zip(got, want, leaves):
        assert a.dtype == bb.dtype == t.dtype
        assert rel(a, bb) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [((512,), 4096), ((3, 37), 1000), ((1,), 2048), ((2, 300, 8), 128),
                                  ((64,), 5120), ((4,), 16384 + 7), ((7,), 7)])
def test_bf16_gpu(dims):
    lead, n = dims
    for residual in (False, True):
        for params in ("x", "fp32"):
            run_case(lead, n, torch.bfloat16, residual, params, params, device="cuda")
    run_case(lead, n, torch.bfloat16, True, "fp32", None, w_grad=False, use_s=False, layout="sliced",
             device="cuda")
    run_case(lead, n, torch.bfloat16, False, None, "x", x_grad=False, layout="transposed", device="cuda")


@pytest.mark.gpu
def test_fp32_fp16_gpu():
    for dtype in (torch.float32, torch.float16):
        for params in ("x", "fp32"):
            run_case((129,), 300, dtype, True, params, params, layout="transposed", device="cuda")
            with max_block(64):
                run_case((33,), 300, dtype, False, params, params, device="cuda")
                run_case((33,), 300, dtype, True, params, None, layout="sliced", device="cuda")
            with max_block(64, one_row_tiles=True):
                run_case((2, 300), 300, dtype, True, params, params, device="cuda")
