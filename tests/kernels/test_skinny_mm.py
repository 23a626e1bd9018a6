"""skinny_mm (the LoRA adapter's products: half-precision activation times a small fp32 operand, fp32 result)
against float64. On CPU the kernel runs in Triton's interpreter with fp16 (the hi/lo split into fp16) and fp32
(exact products) activations; bf16, the dtype it serves (PEFT's fp32 adapters over a bf16 base), on the GPU.
Shapes include odd sizes, one row, R from 1 to 256, transposed and sliced activations, outputs written through
strides, and K long enough that the loop over K is split across programs. The output is poisoned with NaN
first, so an element left unwritten fails."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxopt.kernels import common
from fxopt.kernels import skinny_mm as sk
from tests.kernels.numerics import TOL, rel

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# The activation is exact in its dtype, so the only error beyond fp32 accumulation is the split of S:
# hi + lo leaves |s| 2^-17 (bf16: 8 + 8 significant bits, the remainder rounded at half an ulp of lo), i.e.
# ~22 bits kept in fp16 (below fp32's TOL). Bound bf16 by 2^-16, twice the split's own relative error
# (measured 2.7e-6 to 4.4e-6 on the H100 at the dense shapes), not by the LoRA op's looser SPLIT_TOL, which
# also covers the op's other roundings.
EXPECTED = {torch.float32: TOL[torch.float32], torch.float16: TOL[torch.float32], torch.bfloat16: 2.0 ** -16}


def activation(m, k, dtype, layout, g):
    if layout == "transposed":  # the adapter gradients read x^T and dY^T
        return torch.randn(k, m, generator=g).to(DEVICE, dtype).t()
    if layout == "sliced":
        return torch.randn(m, k + 5, generator=g).to(DEVICE, dtype)[:, 2:k + 2]
    return torch.randn(m, k, generator=g).to(DEVICE, dtype)


def check(m, k, r, dtype, layout="contiguous", out_layout="rows", scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = activation(m, k, dtype, layout, g)
    s = (torch.randn(k, r, generator=g) * 0.02).to(DEVICE)
    assert sk.supported(x, s)
    out = torch.full((m, r) if out_layout == "rows" else (r, m), float("nan"), device=DEVICE)
    out = out if out_layout == "rows" else out.t()
    got = sk.skinny_mm(x, s, scale, out=out)
    assert got.data_ptr() == out.data_ptr()
    err = rel(got, sk.reference(x, s, scale))
    assert err <= EXPECTED[dtype], (m, k, r, dtype, layout, err)
    return err


interpreted_dtypes = st.sampled_from([torch.float16, torch.float32])


@pytest.mark.skipif(CUDA, reason="the interpreter cases; bf16 runs on the GPU below")
@settings(max_examples=40)
@given(m=st.integers(1, 70), k=st.integers(1, 90), r=st.integers(1, 64), dtype=interpreted_dtypes,
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]), out_layout=st.sampled_from(["rows", "cols"]),
       scale=st.sampled_from([1.0, 0.5, 2.0]))
def test_matches_float64(m, k, r, dtype, layout, out_layout, scale):
    check(m, k, r, dtype, layout, out_layout, scale)


@pytest.mark.skipif(CUDA, reason="the interpreter cases")
@pytest.mark.parametrize("r", [1, 16, 200, 256])
def test_widths(r):
    check(17, 40, r, torch.float16)


@pytest.mark.skipif(CUDA, reason="the interpreter cases")
@pytest.mark.parametrize("deterministic", [False, True])
def test_split_k_sums_partials(deterministic, monkeypatch):
    # K = 40 > BLOCK_K: the interpreter splits the K loop over two programs (see _splits); a partial that is
    # dropped or counted twice is far outside the tolerance. Added by atomics, or (deterministic) summed after.
    monkeypatch.setattr(common, "DETERMINISTIC", deterministic)
    assert sk._splits(1, 40, 16, torch.device("cpu")) == 2
    check(5, 40, 3, torch.float32)


@pytest.mark.parametrize("deterministic", [False, True, "torch"])
def test_partial_buffer(deterministic, monkeypatch):
    """Several parts: the output itself, zeroed, for atomics; under deterministic (fxopt's option or torch's
    switch) a buffer of one part each, summed by add_partials. One part: the output, written directly."""
    monkeypatch.setattr(common, "DETERMINISTIC", deterministic is True)
    if deterministic == "torch":
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    out = torch.full((6, 3), float("nan")).t()  # any strides
    dest, strides, atomic = sk.partial_buffer(out, 1)
    assert dest is out and strides == (0, *out.stride()) and not atomic
    dest, strides, atomic = sk.partial_buffer(out, 4)
    if deterministic:
        assert dest.shape == (4, 3, 6) and strides == dest.stride() and not atomic
        dest.copy_(torch.arange(4.0)[:, None, None].expand(4, 3, 6))
        assert torch.equal(sk.add_partials(dest, out), torch.full((3, 6), 6.0))
    else:
        assert dest is out and atomic and strides == (0, *out.stride()) and torch.equal(out, torch.zeros(3, 6))
        assert sk.add_partials(dest, out) is out


def test_unsupported_operands_are_refused():
    x = torch.randn(4, 8, device=DEVICE, dtype=torch.float16 if not CUDA else torch.bfloat16)
    assert not sk.supported(x, torch.randn(8, sk.MAX_R + 1, device=DEVICE))  # too wide
    assert not sk.supported(x, torch.randn(8, 4, device=DEVICE, dtype=torch.float16))  # S not fp32
    assert not sk.supported(x.double(), torch.randn(8, 4, device=DEVICE))
    if not CUDA:
        assert not sk.supported(x.bfloat16(), torch.randn(8, 4))  # the interpreter's bf16 is wrong


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,r,layout", [
    (8192, 2048, 48, "contiguous"),   # t = x A^T, q/k/v fused
    (8192, 8192, 16, "contiguous"),   # u = dY B, gate
    (2048, 8192, 16, "transposed"),   # dA^T = x^T u
    (8192, 8192, 16, "transposed"),   # dB = dY^T t, gate
    (1, 2048, 16, "contiguous"), (33, 4095, 7, "sliced"), (4095, 33, 256, "transposed"),
])
def test_bf16_gpu(m, k, r, layout):
    check(m, k, r, torch.bfloat16, layout, scale=2.0)


def check_dy_products(m, n, r, dtype, layout="contiguous", u_layout="rows", scale=1.0, seed=0):
    """dy_products' u = scale dY B and dB = scale dY^T t against float64; u written through `u_layout` strides
    into a NaN-poisoned buffer (an unwritten element fails)."""
    g = torch.Generator().manual_seed(seed)
    dy = activation(m, n, dtype, layout, g)
    b = (torch.randn(n, r, generator=g) * 0.02).to(DEVICE)
    t = torch.randn(m, r, generator=g).to(DEVICE)
    assert sk.dy_supported(dy, b, t)
    buf = torch.full((m, r + 3) if u_layout == "columns" else (r, m), float("nan"), device=DEVICE)
    u_out = buf[:, 1:r + 1] if u_layout == "columns" else buf.t()
    u, db = sk.dy_products(dy, b, t, scale, u_out=u_out)
    assert u.data_ptr() == u_out.data_ptr() and db.shape == (n, r) and db.dtype == torch.float32
    err_u = rel(u, sk.reference(dy, b, scale))
    err_db = rel(db, sk.reference(dy.t(), t, scale))
    assert err_u <= EXPECTED[dtype], ("u", m, n, r, dtype, layout, err_u)
    assert err_db <= EXPECTED[dtype], ("db", m, n, r, dtype, layout, err_db)


@pytest.mark.skipif(CUDA, reason="the interpreter cases; bf16 runs on the GPU below")
@settings(max_examples=40)
@given(m=st.integers(1, 70), n=st.integers(1, 90), r=st.integers(1, 64), dtype=interpreted_dtypes,
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       u_layout=st.sampled_from(["columns", "transposed"]), scale=st.sampled_from([1.0, 0.5, 2.0]))
def test_dy_products_match_float64(m, n, r, dtype, layout, u_layout, scale):
    check_dy_products(m, n, r, dtype, layout, u_layout, scale)


@pytest.mark.skipif(CUDA, reason="the interpreter cases")
@pytest.mark.parametrize("deterministic", [False, True])
def test_dy_products_sum_partials(deterministic, monkeypatch):
    # 40 rows of 16 (three row blocks: three dB partials) and 40 columns split over two programs (two u partials):
    # a partial dropped or counted twice is far outside the tolerance
    monkeypatch.setattr(common, "DETERMINISTIC", deterministic)
    assert sk._splits(3, 40, 16, torch.device("cpu")) == 2
    check_dy_products(40, 40, 5, torch.float32)


def test_dy_products_refuse_wide_or_mismatched_operands():
    dt = torch.float16 if not CUDA else torch.bfloat16
    dy = torch.randn(4, 8, device=DEVICE, dtype=dt)
    assert not sk.dy_supported(dy, torch.randn(8, sk.DY_MAX_R + 1, device=DEVICE),
                               torch.randn(4, sk.DY_MAX_R + 1, device=DEVICE))
    assert not sk.dy_supported(dy, torch.randn(8, 4, device=DEVICE), torch.randn(5, 4, device=DEVICE))  # t rows
    assert not sk.dy_supported(dy, torch.randn(8, 4, device=DEVICE), torch.randn(4, 4, device=DEVICE).half())


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,r,layout", [
    (8192, 8192, 16, "contiguous"),   # gate (and up) of the dense workload
    (8192, 2048, 16, "contiguous"),   # q, o, down
    (8192, 512, 16, "contiguous"),    # k, v
    (1, 2048, 16, "contiguous"), (33, 4095, 7, "sliced"), (4095, 33, 64, "transposed"), (300, 700, 40, "contiguous"),
])
def test_dy_products_bf16_gpu(m, n, r, layout):
    check_dy_products(m, n, r, torch.bfloat16, layout, scale=2.0)
