"""fxopt::swiglu_lora_linear (and its elementwise ops) against the plain-PyTorch reference in float64:
forward and every gradient (gate, up, A, B, and W / bias where they require grad), odd sizes, M = 1, ranks 1 to
64, non-contiguous gate/up, fp32 and fp16 in Triton's interpreter on CPU, bf16 on the GPU. Every buffer the
kernels write is poisoned with NaN (tests/kernels/conftest.py)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxopt.kernels import common
from fxopt.kernels import swiglu as sk
from fxopt.kernels.common import act_reference
from fxopt.kernels.swiglu import reference, swiglu_lora_linear_fn
from tests.kernels.numerics import SPLIT_TOL, TOL, rel

try:  # the 4-bit form's weights are quantized by bitsandbytes, as in test_nf4
    from tests.kernels.test_nf4 import bnb_weight, kernel_path, quantize
except ImportError:
    bnb_weight = None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(M, K, N, R, dtype, adapter_dtype, bias, layout, train_base, g, device=DEVICE):
    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    if layout == "sliced":  # gate and up as column slices of one wider buffer (non-contiguous)
        both = rnd(M, 2 * K + 3)
        gate, up = both[:, 1:K + 1], both[:, K + 3:]
    else:
        gate, up = rnd(M, K), rnd(M, K)
    w = rnd(N, K, scale=K ** -0.5)
    b = rnd(N) if bias else None
    a = rnd(R, K, dt=adapter_dtype, scale=K ** -0.5)
    bm = rnd(N, R, dt=adapter_dtype, scale=0.5)
    leaves = [gate.requires_grad_(), up.requires_grad_(), a.requires_grad_(), bm.requires_grad_()]
    if train_base:
        leaves.append(w.requires_grad_())
        if b is not None:
            leaves.append(b.requires_grad_())
    return gate, up, w, b, a, bm, leaves


def run_case(M, K, N, R, dtype, adapter_dtype=None, bias=False, layout="contiguous", train_base=False, seed=0,
             scaling=0.5, device=DEVICE, activation="silu"):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    gate, up, w, b, a, bm, leaves = make(M, K, N, R, dtype, adapter_dtype, bias, layout, train_base, g, device)
    out = swiglu_lora_linear_fn(gate, up, w, b, a, bm, scaling, activation)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    by_id = {id(t): r for t, r in zip(leaves, ref_leaves)}
    ref_args = [by_id.get(id(t), t.detach().double() if t is not None else None) for t in (gate, up, w, b, a, bm)]
    ref = reference(*ref_args, scaling, h_dtype=dtype, t_dtype=adapter_dtype, activation=activation)  # its roundings
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (M, N)
    # an output that cancels (a bias against the sum, one output drawn) is known to any implementation in the
    # dtype only relative to the terms it sums: their size, 10% of it, is the floor under ||ref|| (as the
    # attention tests do); where nothing cancels, ||ref|| is far above it and the floor changes nothing
    with torch.no_grad():
        g64, u64, w64, a64, bm64 = (t.detach().double() for t in (gate, up, w, a, bm))
        h = (act_reference(g64, activation) * u64).abs()
        terms = h @ w64.abs().t() + scaling * (h @ a64.abs().t()) @ bm64.abs().t()
        if b is not None:
            terms = terms + b.detach().double().abs()
    assert rel(out, ref, 0.1 * terms.norm().item()) < tol, "output"
    dy = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype)
    got = torch.autograd.grad(out, leaves, dy)
    want = torch.autograd.grad(ref, ref_leaves, dy.double())
    split = device == "cuda" and dtype == torch.bfloat16  # fp32 adapter grads by the hi/lo split GEMM
    for i, (x, y, t) in enumerate(zip(got, want, leaves)):
        assert x.dtype == t.dtype and x.shape == t.shape, f"gradient {i}"
        tol = SPLIT_TOL if split and t.dtype == torch.float32 else TOL[t.dtype]
        assert rel(x, y) < tol, f"gradient {i}"


@settings(max_examples=30, deadline=None)
@given(M=st.one_of(st.just(1), st.integers(1, 70)), K=st.one_of(st.sampled_from([1, 16, 33]), st.integers(1, 80)),
       N=st.integers(1, 48), R=st.sampled_from([1, 4, 16, 64]), dtype=st.sampled_from([torch.float32, torch.float16]),
       fp32_adapter=st.booleans(), bias=st.booleans(), layout=st.sampled_from(["contiguous", "sliced"]),
       train_base=st.booleans(), seed=st.integers(0, 2**16),
       activation=st.sampled_from(["silu", "silu", "gelu", "gelu_tanh"]))
def test_op_matches_reference(M, K, N, R, dtype, fp32_adapter, bias, layout, train_base, seed, activation):
    run_case(M, K, N, R, dtype, torch.float32 if fp32_adapter else None, bias, layout, train_base, seed,
             activation=activation)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_geglu(activation, dtype):
    """GeGLU (Gemma's MLP: gelu with the tanh approximation; BERT-style erf gelu) at a few shapes."""
    for i, (M, K, N, R) in enumerate([(1, 16, 8, 4), (37, 50, 21, 16), (64, 96, 32, 1)]):
        run_case(M, K, N, R, dtype, torch.float32, bias=i == 1, layout="sliced" if i else "contiguous", seed=i,
                 activation=activation)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_large_activations(activation):
    """|g| up to 30: sigmoid / the gelu's cdf saturate (derivatives underflow); values stay finite and exact."""
    g = torch.Generator().manual_seed(3)
    gate = (torch.randn(5, 40, generator=g) * 30).to(DEVICE)
    up = torch.randn(5, 40, generator=g).to(DEVICE)
    h = sk.swiglu(gate, up, activation)
    assert rel(h, act_reference(gate.double(), activation) * up.double()) < TOL[torch.float32]
    dh = torch.randn(5, 40, generator=g).to(DEVICE)
    dg, du = sk.swiglu_grads(dh, gate, up, torch.empty_like(gate), torch.empty_like(gate), activation)
    gd, ud = gate.double().requires_grad_(), up.double().requires_grad_()
    want = torch.autograd.grad(act_reference(gd, activation) * ud, (gd, ud), dh.double())
    assert rel(dg, want[0]) < TOL[torch.float32] and rel(du, want[1]) < TOL[torch.float32]


def test_h_is_not_saved():
    """What the op exists for: its autograd keeps gate, up and the small t, not h (no [M, K] tensor besides
    gate and up)."""
    g = torch.Generator().manual_seed(0)
    gate, up, w, b, a, bm, leaves = make(64, 96, 32, 4, torch.float32, torch.float32, False, "contiguous", False, g)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu_lora_linear_fn(gate, up, w, b, a, bm, 0.5)
    big = [t for t in saved if t.shape == (64, 96)]
    assert len(big) == 2 and all(any(t is x for x in (gate, up)) for t in big)


def test_backward_reuses_its_temporaries(monkeypatch):
    """The backward allocates two [M, K] buffers (dh and du; or dh and h where h is recomputed into memory) and
    returns dg and du in them, instead of allocating dg and du besides (on the Triton and torch-math paths)."""
    from fxopt.kernels import lora as lk

    sizes = []
    for mod in (sk, lk):
        real = mod._new_output

        def counting(shape, dtype, device, real=real):
            sizes.append(tuple(shape))
            return real(shape, dtype, device)

        monkeypatch.setattr(mod, "_new_output", counting)
    g = torch.Generator().manual_seed(0)
    gate, up, w, b, a, bm, leaves = make(24, 40, 16, 4, torch.float32, torch.float32, False, "contiguous", False, g)
    out = swiglu_lora_linear_fn(gate, up, w, b, a, bm, 0.5)
    sizes.clear()
    dg, du, *_ = torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=g).to(DEVICE))
    assert sizes.count((24, 40)) == 2, sizes


@pytest.mark.parametrize("path", ["fused dA", "h recomputed"])
def test_wrong_backward_is_caught(path, monkeypatch):
    """The gradient checks can fail: a backward that drops silu's derivative term is caught, on the default path
    (dA formed with dg and du, h never in memory) and on the one where the base weight trains (h recomputed)."""
    if path == "fused dA":
        real = sk.swiglu_grads_and_da

        def wrong(dh, g, u, u_a, activation="silu"):
            dg, du, da = real(dh, g, u, u_a, activation)
            return du * u / g.clamp_min(1e-3), du, da

        monkeypatch.setattr(sk, "swiglu_grads_and_da", wrong)
    else:
        real = sk.swiglu_grads

        def wrong(dh, g, u, dg, du, activation="silu"):
            dg, du = real(dh, g, u, dg, du, activation)
            return du * u / g.clamp_min(1e-3), du

        monkeypatch.setattr(sk, "swiglu_grads", wrong)
    with pytest.raises(AssertionError, match="gradient"):
        run_case(9, 17, 5, 4, torch.float32, train_base=path == "h recomputed")


def test_wrong_fused_da_is_caught(monkeypatch):
    """dA of the fused path is checked: 1% off is caught."""
    real = sk.swiglu_grads_and_da
    monkeypatch.setattr(sk, "swiglu_grads_and_da", lambda *a, **k: (lambda r: (r[0], r[1], r[2] * 1.01))(real(*a, **k)))
    with pytest.raises(AssertionError, match="gradient 2"):
        run_case(9, 17, 5, 4, torch.float32)


# the half dtype the fused kernels run: bf16 on the GPU; fp16 in the interpreter (its bf16 tl.dot is wrong)
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def test_fused_da_path_is_taken(monkeypatch):
    """With fp32 adapters and a frozen base the backward forms dA in the dg/du pass and never recomputes h."""
    calls = []
    real_da, real_h = sk.swiglu_grads_and_da, sk.swiglu
    monkeypatch.setattr(sk, "swiglu_grads_and_da", lambda *a, **k: calls.append("da") or real_da(*a, **k))
    g = torch.Generator().manual_seed(0)
    gate, up, w, b, a, bm, leaves = make(24, 40, 16, 4, HALF, torch.float32, False, "contiguous", False, g)
    out = swiglu_lora_linear_fn(gate, up, w, b, a, bm, 0.5)
    monkeypatch.setattr(sk, "swiglu", lambda *a, **k: calls.append("h") or real_h(*a, **k))
    torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=g).to(DEVICE, HALF))
    assert calls == ["da"], calls


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_grads_and_da_against_float64(deterministic, dtype, monkeypatch):
    """swiglu_grads_and_da alone, over enough rows that the dA^T partials of several row ranges are added (by
    atomics, or summed after under deterministic): dg, du (autograd of the float64 reference) and
    dA^T = h^T u_a, h rounded to the dtype as the forward forms it, against float64."""
    monkeypatch.setattr(common, "DETERMINISTIC", deterministic)
    g = torch.Generator().manual_seed(3)
    M, K, R = 70, 40, 5
    gate, up, dh = (torch.randn(M, K, generator=g).to(DEVICE, dtype) for _ in range(3))
    u_a = torch.randn(M, R, generator=g).to(DEVICE)
    g64, u64 = (t.double().requires_grad_() for t in (gate, up))
    h64 = act_reference(g64, "silu") * u64
    want_dg, want_du = torch.autograd.grad(h64, [g64, u64], dh.double())
    want_da = h64.detach().to(dtype).double().t() @ u_a.double()
    dg, du, da = sk.swiglu_grads_and_da(dh.clone(), gate, up, u_a)
    assert rel(dg, want_dg) < TOL[dtype] and rel(du, want_du) < TOL[dtype]
    # dA^T is fp32: exact fp32 products for an fp32 g; from a half g, u_a as hi + lo columns of the half dtype
    # (fp16 in the interpreter keeps ~22 bits: fp32's tolerance; bf16 on CUDA ~16 bits: SPLIT_TOL), as run_case
    split = DEVICE == "cuda" and dtype == torch.bfloat16
    assert da.shape == (K, R) and rel(da, want_da) < (SPLIT_TOL if split else TOL[torch.float32])


def test_bad_arguments():
    with pytest.raises(ValueError, match="must match"):
        sk.swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="activation must be one of"):
        sk.swiglu(torch.randn(3, 4), torch.randn(3, 4), "relu")


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    gate, up, w, b, a, bm, _ = make(6, 8, 5, 2, torch.float32, torch.float32, True, "contiguous", True, g)
    torch.library.opcheck(torch.ops.fxopt.swiglu_lora_linear.default, (gate, up, w, b, a, bm, 0.5))
    torch.library.opcheck(torch.ops.fxopt.swiglu.default, (gate.detach(), up.detach()))
    t = torch.randn(6, 2)
    for need_dw, need_db in ((False, False), (True, True)):
        torch.library.opcheck(torch.ops.fxopt.swiglu_lora_linear_backward.default,
                              (torch.randn(6, 5), gate.detach(), up.detach(), t, w.detach(), a.detach(), bm.detach(),
                               0.5, need_dw, need_db))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 1000, 8192])
@pytest.mark.parametrize("train_base", [False, True])  # the fused dA path, and h recomputed for dW
def test_bf16_gpu(M, train_base):
    run_case(M, 8192 if M == 8192 else 300, 2048 if M == 8192 else 77, 16, torch.bfloat16, torch.float32,
             device="cuda", train_base=train_base)


# ---------------------------------------------------------------------------------------------------------
# fxopt::swiglu_lora_linear_4bit: the same with a bitsandbytes 4-bit down projection


def run_case_4bit(M, K, N, R, dtype, adapter_dtype, bias, layout, quant_type, double, blocksize, path, seed,
                  activation, scaling=0.5, device=DEVICE):
    """Forward and every gradient (gate, up, bias, A, B) against float64 truth on bitsandbytes' dequantized
    weight (tests/kernels/test_nf4.py's bnb_weight), through the kernel path `path` of the 4-bit op."""
    g = torch.Generator().manual_seed(seed)
    gate, up, _, b, a, bm, _ = make(M, K, N, R, dtype, adapter_dtype, bias, layout, False, g, device)
    qweight, state = quantize(N, K, quant_type, blocksize, double, seed, device)
    leaves = [gate, up] + ([b.requires_grad_()] if b is not None else []) + [a, bm]
    with kernel_path(path):
        q = sk._nf4.quant_args(qweight, state)  # (qweight, absmax, absmax2, code2, offset, code, n, k, bs, type)
        out = torch.ops.fxopt.swiglu_lora_linear_4bit(gate, up, *q[:6], b, a, bm, float(scaling), *q[6:],
                                                      activation)[0]
        dy = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype)
        got = torch.autograd.grad(out, leaves, dy)
        gemv = sk._nf4._use_triton(gate) and M <= sk._nf4.GEMV_MAX_M and K % blocksize == 0
    w64 = bnb_weight(qweight, state).double()
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    g64, u64 = ref_leaves[:2]
    b64 = ref_leaves[2] if b is not None else None
    a64, bm64 = ref_leaves[-2:]

    def rounded(x, dt):  # the op's rounding of x to dt in the forward value, the gradient passing through
        return x + (x.to(dt).double() - x).detach()

    h = rounded(act_reference(g64, activation) * u64, dtype)
    t = rounded(h @ a64.t(), adapter_dtype)
    # the GEMV path multiplies by the dequantized weight in fp32, the others round it to the dtype first (as
    # test_nf4 explains); the gradients' truth takes the exact weight
    w_fwd = w64 if gemv else w64.to(dtype).double()
    lin = torch.nn.functional.linear
    ref = lin(h, w64, b64) + scaling * t @ bm64.t()
    ref_fwd = lin(h.detach(), w_fwd, None if b64 is None else b64.detach()) + scaling * t.detach() @ bm64.detach().t()
    with torch.no_grad():  # the floor under ||ref|| where an output cancels, as in run_case
        terms = h.abs() @ w64.abs().t() + scaling * (h.abs() @ a64.abs().t()) @ bm64.abs().t()
    assert out.dtype == dtype and out.shape == (M, N)
    assert rel(out, ref_fwd, 0.1 * terms.norm().item()) < TOL[dtype], "output"
    if device == "cpu":  # the module's plain-PyTorch reference agrees with the bnb truth too
        r64 = sk.reference_4bit(*(v.detach().double() for v in (gate, up)), *q[:6],
                                None if b is None else b.detach().double(), a.detach().double(),
                                bm.detach().double(), scaling, *q[6:], activation)
        h64 = (act_reference(g64, activation) * u64).detach()  # no roundings: every input is fp64 here
        assert rel(r64, lin(h64, w64, None if b64 is None else b64.detach())
                   + scaling * (h64 @ a64.detach().t()) @ bm64.detach().t()) < 1e-12
    want = torch.autograd.grad(ref, ref_leaves, dy.double())
    for i, (x, y, leaf) in enumerate(zip(got, want, leaves)):
        assert x.dtype == leaf.dtype and x.shape == leaf.shape, f"gradient {i}"
        tol = SPLIT_TOL if device == "cuda" and dtype == torch.bfloat16 and leaf.dtype == torch.float32 else \
            TOL[leaf.dtype]
        assert rel(x, y) < tol, f"gradient {i}"


@settings(max_examples=20, deadline=None)
@given(M=st.one_of(st.just(1), st.integers(1, 40)), N=st.integers(1, 40), k_blocks=st.integers(1, 2),
       blocksize=st.sampled_from([32, 64]), R=st.sampled_from([1, 4, 16, 64]),
       dtype=st.sampled_from([torch.float32, torch.float16]), fp32_adapter=st.booleans(), bias=st.booleans(),
       layout=st.sampled_from(["contiguous", "sliced"]), quant_type=st.sampled_from(["nf4", "fp4"]),
       double=st.booleans(), path=st.sampled_from(["gemv", "fused", "dequant"]), seed=st.integers(0, 2**16),
       activation=st.sampled_from(["silu", "gelu", "gelu_tanh"]))
def test_4bit_op_matches_reference(M, N, k_blocks, blocksize, R, dtype, fp32_adapter, bias, layout, quant_type,
                                   double, path, seed, activation):
    if bnb_weight is None:
        pytest.skip("bitsandbytes is not installed")
    run_case_4bit(M, blocksize * k_blocks, N, R, dtype, torch.float32 if fp32_adapter else dtype, bias, layout,
                  quant_type, double, blocksize, path, seed, activation)


def test_4bit_fused_da_path(monkeypatch):
    """The 4-bit op's backward forms dA in the dg/du pass where it takes the dense path (training-sized inputs),
    and still equals the reference; the GEMV path (few rows) recomputes h."""
    if bnb_weight is None:
        pytest.skip("bitsandbytes is not installed")
    calls = []
    real = sk._fused_da_backward
    monkeypatch.setattr(sk, "_fused_da_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    for path, fused in (("dequant", True), ("gemv", False)):
        calls.clear()
        run_case_4bit(20, 64, 24, 16, HALF, torch.float32, True, "contiguous", "nf4", True, 64, path, 0, "silu")
        assert len(calls) == int(fused), path


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [(1, 128, 64), (37, 192, 100), (512, 2048, 512), (8192, 8192, 2048)])
def test_4bit_op_bf16_gpu(dims):
    if bnb_weight is None:
        pytest.skip("bitsandbytes is not installed")
    M, K, N = dims
    for path in ("dequant", "fused") + (("gemv",) if M <= 16 else ()):
        run_case_4bit(M, K, N, 16, torch.bfloat16, torch.float32, True, "sliced", "nf4", True, 64, path, 0, "silu")
