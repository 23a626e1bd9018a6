"""fxopt::lora_linear against its plain-PyTorch reference in float64: forward and every gradient.

On CPU the Triton kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), in fp32
and fp16 (the interpreter's bf16 tl.dot is wrong, so bf16 is tested on the GPU). Every buffer the kernel
writes is poisoned with NaN first, so an element left unwritten fails the test."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxopt.kernels import lora as lk
from fxopt.kernels.lora import lora_linear_fn, reference
from tests.kernels.numerics import SPLIT_TOL, TOL, rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def d64(ts, absolute=False):
    return [None if t is None else (t.detach().double().abs() if absolute else t.detach().double()).requires_grad_(t.requires_grad)
            for t in ts]


def run_case(lead, k, ns, rs, dtype, adapter_dtype, bias, dropout_input, noncontig, w_grad, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt).requires_grad_(grad)

    if noncontig:  # a transposed view: x's features are not its fastest dimension
        x = rnd(k, *lead, grad=False).movedim(0, -1).requires_grad_()
    else:
        x = rnd(*lead, k)
    x_lora = rnd(*lead, k, dt=adapter_dtype) if dropout_input else None
    ws = [rnd(n, k, scale=k**-0.5, grad=w_grad) for n in ns]
    bs = [rnd(n) if bias and i % 2 == 0 else None for i, n in enumerate(ns)]  # biased next to unbiased
    as_ = [rnd(r, k, dt=adapter_dtype, scale=k**-0.5) for r in rs]
    bms = [rnd(n, r, dt=adapter_dtype, scale=r**-0.5) for n, r in zip(ns, rs)]
    scal = [0.5 + i for i in range(len(ns))]
    leaves = [x, x_lora] + ws + bs + as_ + bms
    trained = [t for t in leaves if t is not None and t.requires_grad]

    outs = lora_linear_fn(x, ws, bs, as_, bms, scal, x_lora)
    l64 = d64(leaves)
    n = len(ns)
    x64, xl64, rest = l64[0], l64[1], l64[2:]
    refs = reference(x64, rest[:n], rest[n:2 * n], rest[2 * n:3 * n], rest[3 * n:], scal, xl64)
    # The same quantities from the inputs' absolute values (the op is multilinear: they sum the magnitudes of
    # each result's terms). A result that cancels to far below its terms is known to fp32 only relative to
    # them: its error is measured against 10% of that scale (a flake at M=1 found by CI).
    a64 = d64(leaves, absolute=True)
    xa, xla, resta = a64[0], a64[1], a64[2:]
    refs_abs = reference(xa, resta[:n], resta[n:2 * n], resta[2 * n:3 * n], resta[3 * n:], scal, xla)
    tol = TOL[dtype]
    for o, r, ra in zip(outs, refs, refs_abs):
        assert o.dtype == dtype and o.shape == r.shape
        assert rel(o, r, floor=0.1 * ra.norm().item()) < tol
    grads_out = [torch.randn(o.shape, generator=g).to(device=device, dtype=dtype) for o in outs]
    got = torch.autograd.grad(outs, trained, grads_out)
    trained64 = [t64 for t, t64 in zip(leaves, l64) if t is not None and t.requires_grad]
    want = torch.autograd.grad(refs, trained64, [gr.double() for gr in grads_out])
    trained_abs = [ta for t, ta in zip(leaves, a64) if t is not None and t.requires_grad]
    want_abs = torch.autograd.grad(refs_abs, trained_abs, [gr.double().abs() for gr in grads_out])
    for i, (a, b, ba, t) in enumerate(zip(got, want, want_abs, trained)):
        assert a.dtype == t.dtype and a.shape == t.shape
        # x's gradient is summed over the adapters in x's dtype: one rounding per adapter
        assert rel(a, b, floor=0.1 * ba.norm().item()) < tol * (n if t is x else 1), f"gradient {i}"


@settings(max_examples=40, deadline=None)
@given(lead=st.sampled_from([(1,), (7,), (2, 5), (33,)]), k=st.integers(1, 80),
       ns=st.lists(st.integers(1, 70), min_size=1, max_size=3), rank=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.float16]), bias=st.booleans(), dropout_input=st.booleans(),
       noncontig=st.booleans(), w_grad=st.booleans(), seed=st.integers(0, 2**16))
def test_op_matches_reference(lead, k, ns, rank, dtype, bias, dropout_input, noncontig, w_grad, seed):
    rs = [max(1, rank - 3 * i) for i in range(len(ns))]
    adapter = torch.float32 if seed % 2 else dtype  # PEFT keeps fp32 adapters over a half base
    run_case(lead, k, ns, rs, dtype, adapter, bias, dropout_input, noncontig, w_grad, seed)


@settings(max_examples=5, deadline=None)
@given(rank=st.sampled_from([64, 129, 256]), seed=st.integers(0, 2**16))
def test_large_ranks(rank, seed):
    run_case((3,), 20, [9, 5], [rank, rank // 2], torch.float32, torch.float32, True, False, False, False, seed)


def test_interpreter_runs_the_triton_kernel():
    if DEVICE == "cpu":
        assert lk._INTERPRETED, "on CPU the tests must run the Triton kernel through the interpreter"
        assert lk._use_triton(torch.empty(1)) and not lk._use_triton(torch.empty(1, dtype=torch.bfloat16))


def test_broken_kernel_is_caught(monkeypatch):
    """The property test can fail: a wrong sign of the low-rank term is caught."""
    real = lk._fused_matmul
    monkeypatch.setattr(lk, "_fused_matmul", lambda x, w, t, lo, s, b, out, accumulate=False: real(x, w, t, lo, -s, b, out, accumulate))
    with pytest.raises(AssertionError):
        run_case((5,), 16, [12], [4], torch.float32, torch.float32, False, False, False, False, 0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_under_torch_compile(backend):
    x = torch.randn(6, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(10, 24, device=DEVICE)
    a = torch.randn(3, 24, device=DEVICE, requires_grad=True)
    b = torch.randn(10, 3, device=DEVICE, requires_grad=True)

    def fn(x, a, b):
        return lora_linear_fn(x, [w], [None], [a], [b], [0.5])[0].sin().sum()

    out = torch.compile(fn, backend=backend)(x, a, b)
    grads = torch.autograd.grad(out, [x, a, b])
    want = torch.autograd.grad(fn(x, a, b), [x, a, b])
    for g1, g2 in zip(grads, want):
        assert rel(g1, g2) < 1e-5


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 24)
        outs = torch.ops.fxopt.lora_linear(x, [torch.empty(10, 24), torch.empty(7, 24)], [torch.empty(7)],
                                           [torch.empty(3, 24), torch.empty(2, 24)],
                                           [torch.empty(10, 3), torch.empty(7, 2)], [1.0, 2.0], None, [False, True])
        assert [tuple(o.shape) for o in outs] == [(2, 5, 10), (2, 5, 7), (10, 5)]


@pytest.mark.gpu
@pytest.mark.parametrize("adapter", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", [((512,), 2048, [2048, 512, 512], [16, 16, 16]), ((3, 37), 1000, [777], [5]),
                                  ((1,), 2048, [8192, 8192], [16, 16]), ((300,), 512, [256], [256])])
def test_bf16_gpu(adapter, dims):
    lead, k, ns, rs = dims
    for dropout_input in (False, True):
        run_case(lead, k, ns, rs, torch.bfloat16, adapter, True, dropout_input, False, False, 0, device="cuda")


@pytest.mark.gpu
def test_fp32_fp16_gpu():
    for dtype in (torch.float32, torch.float16):
        run_case((129,), 300, [200, 64], [16, 8], dtype, torch.float32, True, True, True, True, 1, device="cuda")


@pytest.mark.gpu
def test_fp32_adapter_keeps_fp32_accuracy_gpu():
    """fp32 adapters over a bf16 base: the adapter terms run on bf16 tensor cores through a hi/lo split
    (_adapter_mm), which must stay near fp32 accuracy, far inside the bf16 tolerance: dA and dB come from
    bf16-exact x and dY, so their fp64 values are known to fp32 rounding."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 2048, generator=g).cuda().bfloat16()
    w = (torch.randn(1024, 2048, generator=g) * 2048**-0.5).cuda().bfloat16()
    a = (torch.randn(16, 2048, generator=g) * 2048**-0.5).cuda().requires_grad_()
    b = (torch.randn(1024, 16, generator=g) * 0.25).cuda().requires_grad_()
    dy = torch.randn(4096, 1024, generator=g).cuda().bfloat16()
    out = lora_linear_fn(x, [w], [None], [a], [b], [2.0])[0]
    da, db = torch.autograd.grad(out, [a, b], dy)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = reference(x.double(), [w.double()], [None], [a64], [b64], [2.0])[0]
    da64, db64 = torch.autograd.grad(ref, [a64, b64], dy.double())
    assert rel(da, da64) < SPLIT_TOL and rel(db, db64) < SPLIT_TOL
    assert rel(out, ref) < 1e-2


def test_kernel_that_fails_to_compile_falls_back_to_the_reference(monkeypatch):
    """A kernel that fails to compile (here: a stand-in raising the compile error type) makes one warning naming
    it, and the op, forward and backward, returns the reference's result on its torch math from then on."""
    import warnings

    from fxopt.kernels import common, lora

    class Broken(Exception):
        pass

    def _lora_matmul_kernel():
        pass

    _lora_matmul_kernel.__module__ = lora.__name__

    class Kernel:
        fn = _lora_matmul_kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise Broken("ptxas: unsupported instruction")
            return run

    monkeypatch.setattr(common, "_compile_errors", lambda: (Broken,))
    monkeypatch.setattr(common, "FAILED", set())
    monkeypatch.setattr(lora, "_lora_matmul_kernel", Kernel())
    monkeypatch.setattr(lora, "_tuned_kernel", None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 24, generator=g).requires_grad_()
    w, a, b = torch.randn(10, 24, generator=g), torch.randn(3, 24, generator=g), torch.randn(10, 3, generator=g)
    a.requires_grad_()
    b.requires_grad_()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = lora_linear_fn(x, [w], [None], [a], [b], [0.5])[0]
        grads = torch.autograd.grad(out.sum(), (x, a, b))
    said = [str(m.message) for m in seen if "failed to compile" in str(m.message)]
    assert len(said) == 1 and "_lora_matmul_kernel" in said[0] and common.FAILED == {lora.__name__}
    want = reference(x, [w], [None], [a], [b], [0.5])[0]
    assert rel(out, want) < 1e-6
    for got, exp in zip(grads, torch.autograd.grad(want.sum(), (x, a, b))):
        assert rel(got, exp) < 1e-6
