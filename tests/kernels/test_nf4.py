"""fxopt::linear_4bit and fxopt::lora_linear_4bit against bitsandbytes' own dequantization, in float64: forward and
every gradient (dX, db; dA, dB and dX_lora for the LoRA form).

Weights are quantized by bitsandbytes (nf4 and fp4, double quantization on and off, every blocksize it takes,
odd shapes) and the truth is a float64 matmul with the weight that bitsandbytes' dequantize_4bit returns. On
CPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), in fp32 and
fp16 (the interpreter's bf16 tl.dot is wrong, so bf16 is tested on the GPU). Every buffer the kernels write is
poisoned with NaN first, so an element left unwritten fails the test.

bitsandbytes 0.50.2's CPU dequantize_4bit (its AVX-512 kernel) gets a [N, K] weight wrong when N > 1, K is a
multiple of 16 and not of the blocksize (it restarts the blocks at each row; its quantize_4bit, its pure-torch
backend and, checked in test_gpu_layout_matches_bnb_cuda, its CUDA kernels use blocks over the flat weight).
So the truth dequantizes the weight viewed as one row of N*K elements, where the layouts agree, and
test_bnb_truth_is_bnb_layout checks that against bnb's pure-torch backend and, where bnb's CPU kernel is right,
against its dequantize_4bit of the real shape."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import bitsandbytes.functional as BF
from fxopt.kernels import common, nf4
from fxopt.kernels.nf4 import linear_4bit_fn, lora_linear_4bit_fn, quant_args
from tests.kernels.numerics import TOL, rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LEADS = [(1,), (3,), (16,), (17,), (2, 5), (33,)]


@pytest.fixture(autouse=True)
def _first_config_on_cuda(request, monkeypatch):
    """On CUDA, the tests not marked gpu (the property tests, every drawn shape a new autotuning key) launch each
    kernel with the first config of its tuning list, as fxopt's deterministic mode does, instead of benchmarking
    every config per shape: with autotuning, test_nf4.py did not finish its first property test in 170 s on the
    H200 (session 18). The gpu-marked tests and the decode benchmark's error column cover the tuned configs. On
    the CPU the kernels are interpreted with fixed configs and this changes nothing."""
    if DEVICE == "cuda" and "gpu" not in request.keywords:
        monkeypatch.setattr(common, "DETERMINISTIC", True)


def quantize(n, k, quant_type, blocksize, double, seed, device=DEVICE, dtype=torch.float32, storage=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(device=device, dtype=dtype)
    return BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double,
                            quant_storage=storage)


def bnb_weight(qweight, state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit of the weight viewed as one row (see the module docstring), reshaped."""
    n, k = state.shape
    one_row = copy.copy(state)
    one_row.shape = torch.Size([1, n * k])
    return BF.dequantize_4bit(qweight, one_row).reshape(n, k)


class kernel_path:
    """Which kernels an input takes, for a block: "gemv" (M <= 16 the GEMV kernel, larger M the fused GEMM),
    "fused" (the fused dequant-in-K-loop GEMM kernels for every M), "dequant" (the dequantization kernel then
    a matmul, for every M where the GEMV kernel does not apply) or "default" (the module's settings)."""
    SETTINGS = {"gemv": (16, 1 << 62), "fused": (0, 1 << 62), "dequant": (0, 0)}

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.old = nf4.GEMV_MAX_M, nf4.DEQUANT_MIN_M
        nf4.GEMV_MAX_M, nf4.DEQUANT_MIN_M = self.SETTINGS.get(self.path, self.old)

    def __exit__(self, *exc):
        nf4.GEMV_MAX_M, nf4.DEQUANT_MIN_M = self.old


def make_case(lead, n, k, quant_type, blocksize, double, dtype, bias, noncontig, lora, seed, device):
    """Leaves (x, bias, lora_a, lora_b, x_lora) and the quantized weight. lora: None or (rank, adapter dtype,
    dropout input)."""
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt).requires_grad_()

    qweight, state = quantize(n, k, quant_type, blocksize, double, seed, device)
    if noncontig:  # a transposed view: x's features are not its fastest dimension
        x = rnd(k, *lead).detach().movedim(0, -1).requires_grad_()
    else:
        x = rnd(*lead, k)
    b = rnd(n) if bias else None
    a = bm = xl = None
    if lora is not None:
        rank, adt, dropout = lora
        a = rnd(rank, k, dt=adt, scale=k ** -0.5)
        bm = rnd(n, rank, dt=adt, scale=rank ** -0.5)
        xl = rnd(*lead, k, dt=adt) if dropout else None
    return qweight, state, x, b, a, bm, xl


def check(lead, n, k, quant_type, blocksize, double, dtype, bias, noncontig, lora, seed, device=DEVICE):
    qweight, state, x, b, a, bm, xl = make_case(lead, n, k, quant_type, blocksize, double, dtype, bias, noncontig,
                                                lora, seed, device)
    scaling = 0.75
    leaves = [t for t in (x, b, a, bm, xl) if t is not None]
    if lora is None:
        out = linear_4bit_fn(x, qweight, state, b)
    else:
        out = lora_linear_4bit_fn(x, qweight, state, b, a, bm, scaling, xl)

    # the truth: float64 math on bitsandbytes' dequantized weight
    w64 = bnb_weight(qweight, state).double()
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(l64)
    x64 = next(it)
    b64 = next(it) if b is not None else None
    ref = F.linear(x64, w64, b64)
    if lora is not None:
        a64, bm64 = next(it), next(it)
        xl64 = next(it) if xl is not None else x64
        # the op keeps t = x_l A^T in the adapter's dtype, as PEFT does: the truth rounds it there too (dB = s dY^T t
        # sums that rounded t; a draw with a half adapter and 10 tokens missed the tolerance without this)
        t64 = (xl64 @ a64.t()).to(a.dtype).to(torch.float64)
        ref = ref + scaling * t64 @ bm64.t()

    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    # The GEMV kernel (M <= GEMV_MAX_M rows, Triton) multiplies by the dequantized weight in fp32; the fused and
    # dequant kernels and the torch math round it to x's dtype first, as bitsandbytes' CUDA path does. The two
    # differ by the rounding of each weight, eps * sum |x| |w| per output, far above the tolerance where an output
    # cancels (found by hypothesis: one fp16 output of 0.039 from terms summing to 7.5): the forward truth takes
    # the weight the path used.
    if nf4._use_triton(x) and x.numel() // x.shape[-1] <= nf4.GEMV_MAX_M:
        ref_fwd = ref
    else:
        ref_fwd = F.linear(x64.detach(), w64.to(dtype).double(), None if b64 is None else b64.detach())
        if lora is not None:
            ref_fwd = ref_fwd + (ref - F.linear(x64, w64, b64)).detach()
    assert rel(out, ref_fwd) < tol, "forward"
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 2)).to(device=device, dtype=dtype)
    got = torch.autograd.grad(out, leaves, gy)
    want = torch.autograd.grad(ref, l64, gy.double())
    for i, (gt, wt, leaf) in enumerate(zip(got, want, leaves)):
        assert gt.dtype == leaf.dtype and gt.shape == leaf.shape, f"gradient {i}"
        assert rel(gt, wt) < tol, f"gradient {i}"

    if lora is None and device == "cpu":  # nf4.reference, the CPU path's math, agrees with bitsandbytes too
        r = nf4.reference(x64, *quant_args(qweight, state)[:6], b64, *quant_args(qweight, state)[6:])
        assert rel(r, F.linear(x64, w64, b64)) < 1e-12


def k_for(blocksize, aligned, k_blocks, k_raw):
    return blocksize * k_blocks if aligned else k_raw


COMMON = dict(n=st.integers(1, 70), quant_type=st.sampled_from(["nf4", "fp4"]), double=st.booleans(),
              blocksize=st.sampled_from([32, 64, 128, 256]), aligned=st.booleans(), k_blocks=st.integers(1, 3),
              k_raw=st.integers(1, 150), dtype=st.sampled_from([torch.float32, torch.float16]),
              bias=st.booleans(), noncontig=st.booleans(), path=st.sampled_from(["gemv", "fused", "dequant"]), seed=st.integers(0, 2 ** 16))


@settings(max_examples=25, deadline=None)
@given(lead=st.sampled_from(LEADS), **COMMON)
def test_linear_matches_bnb(lead, n, quant_type, double, blocksize, aligned, k_blocks, k_raw, dtype, bias, noncontig,
                            path, seed):
    k = k_for(blocksize, aligned, k_blocks, k_raw)
    with kernel_path(path):
        check(lead, n, k, quant_type, blocksize, double, dtype, bias, noncontig, None, seed)


@settings(max_examples=20, deadline=None)
@given(lead=st.sampled_from(LEADS), rank=st.integers(1, 40), adapter32=st.booleans(), dropout=st.booleans(), **COMMON)
def test_lora_matches_bnb(lead, rank, adapter32, dropout, n, quant_type, double, blocksize, aligned, k_blocks, k_raw,
                          dtype, bias, noncontig, path, seed):
    k = k_for(blocksize, aligned, k_blocks, k_raw)
    adapter = torch.float32 if adapter32 else dtype  # PEFT keeps fp32 adapters over a half base
    with kernel_path(path):
        check(lead, n, k, quant_type, blocksize, double, dtype, bias, noncontig, (rank, adapter, dropout), seed)


@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (4,), (5,), (16,)])
def test_gemv_paths(lead):
    """Every GEMV variant (the word GEMV for M <= 4, the tile GEMV's tensor-core dot above), with a partial last
    K-step (K = 96 in blocks of 32: the word GEMV's last step is partial). The tile GEMV takes M = 5..16 only with
    GEMV_MAX_M raised (by default those rows dequantize)."""
    with kernel_path("gemv"):
        _gemv_cases(lead)


@pytest.mark.parametrize("lead", [(3,), (4,)])
def test_word_gemv_split(lead, monkeypatch):
    """The word GEMV's split over K (3-4 rows of x, large weights) reached on small ones, and checked to be taken:
    K = 64 gives more runs than steps (a run sums nothing), K = 96 a partial last step, K = 384 three steps a run;
    the LoRA term and bias are added by run 0 only."""
    monkeypatch.setattr(nf4, "WORDS_SPLIT_MIN_NK", 1)
    taken = []
    real = nf4._words_split
    monkeypatch.setattr(nf4, "_words_split", lambda m, n, k: taken.append(real(m, n, k)) or taken[-1])
    with kernel_path("gemv"):
        _gemv_cases(lead)
    if nf4._use_triton(torch.empty(1, device=DEVICE)):
        assert taken and set(taken) == {2}


def test_words_split_rule():
    """One run for 1-2 rows or weights under WORDS_SPLIT_MIN_NK elements, else 2 runs, 4 from K = 8192 (the split
    test above reaches only the 2-run case on its small shapes)."""
    big = nf4.WORDS_SPLIT_MIN_NK
    assert nf4._words_split(2, big, 8192) == 1 and nf4._words_split(4, 1, big - 1) == 1
    assert nf4._words_split(3, big // 4096, 4096) == 2 and nf4._words_split(4, big // 8192, 8192) == 4


def _gemv_cases(lead):
    for quant_type, double, blocksize, k in [("nf4", True, 64, 64), ("fp4", False, 32, 96), ("nf4", False, 128, 384)]:
        check(lead, 37, k, quant_type, blocksize, double, torch.float32, True, False, None, 0)
        check(lead, 20, k, quant_type, blocksize, double, torch.float16, False, True, (5, torch.float32, False), 1)


def test_gemv_unaligned_weight_bytes(monkeypatch):
    """Packed bytes that do not start on a 4-byte boundary cannot be read as int32 words: the word GEMV is not
    taken there (the tile GEMV is) and the result is the same."""
    qweight, state, x, *_ = make_case((2,), 37, 128, "nf4", 64, True, torch.float32, False, False, None, 3, DEVICE)
    args = quant_args(qweight, state)
    shifted = torch.empty(qweight.numel() + 1, dtype=torch.uint8, device=qweight.device)[1:].view_as(qweight)
    shifted.copy_(qweight)
    taken = []
    real = nf4._as_words
    monkeypatch.setattr(nf4, "_as_words", lambda q: taken.append(real(q)) or taken[-1])
    with torch.no_grad():
        want = torch.ops.fxopt.linear_4bit(x, *args[:6], None, *args[6:])
        got = torch.ops.fxopt.linear_4bit(x, shifted, *args[1:6], None, *args[6:])
    if nf4._use_triton(x):
        assert taken[0] is not None and taken[1] is None
    assert rel(got, want) < TOL[torch.float32]


def test_large_rank():
    check((9,), 21, 64, "nf4", 64, True, torch.float32, True, False, (129, torch.float32, False), 3)


@pytest.mark.parametrize("path", ["gemv", "fused", "dequant", "torch"])
def test_wide_output_keeps_a_small_adapter_term(path, monkeypatch):
    """out_dtype fp32 with a half precision x (PEFT on bnb: fp32 input, half compute dtype): an adapter term ~1e-3
    of the base term, below the half precision base's resolution, survives in the output (out(B) - out(B=0) is
    the adapter term), and dB comes from the fp32 output gradient, not a half precision copy of it. On the
    qlora workload the rounded sum made fxopt's loss curve fall several times slower than eager's."""
    if path == "torch":
        monkeypatch.setattr(nf4, "_INTERPRETED", False)
    half = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter's bf16 tl.dot is wrong
    n, k, rank, scaling = 48, 128, 8, 0.5
    qweight, state = quantize(n, k, "nf4", 64, True, 3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, k, generator=g).to(device=DEVICE, dtype=half).requires_grad_()
    a = (torch.randn(rank, k, generator=g) * k ** -0.5).to(DEVICE).requires_grad_()
    bm = (torch.randn(n, rank, generator=g) * 1e-3).to(DEVICE).requires_grad_()
    with kernel_path("dequant" if path == "torch" else path):
        out = lora_linear_4bit_fn(x, qweight, state, None, a, bm, scaling, out_dtype=torch.float32)
        base = lora_linear_4bit_fn(x, qweight, state, None, a, torch.zeros_like(bm), scaling, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    term = scaling * (x.double() @ a.double().t()) @ bm.double().t()
    assert (term.abs().max() / base.abs().max()) < 2e-3  # the case is the one described: below half's resolution
    assert rel(out - base, term) < 1e-3
    gy = torch.randn(out.shape, generator=g).to(DEVICE)
    db = torch.autograd.grad(out, bm, gy)[0]
    want = scaling * gy.double().t() @ (x.double() @ a.double().t())
    assert rel(db, want) < 1e-4


def test_code_tables_match_bnb():
    for quant_type in ("nf4", "fp4"):
        assert torch.equal(nf4.code_table(quant_type, "cpu"), BF.get_4bit_type(quant_type, device="cpu"))
        # code=None (what a graph pass passes) means this table
        qweight, state = quantize(9, 64, quant_type, 64, True, 0)
        x = torch.randn(20, 64, device=DEVICE)
        args = quant_args(qweight, state)
        given = torch.ops.fxopt.linear_4bit(x, *args[:6], None, *args[6:])
        default = torch.ops.fxopt.linear_4bit(x, *args[:5], None, None, *args[6:])
        assert torch.equal(given, default)


def test_bf16_torch_path():
    """bf16 on the CPU takes the torch math (the interpreter's bf16 tl.dot is wrong); on CUDA, the kernels."""
    for lead, k, lora in [((3,), 64, None), ((20,), 75, (6, torch.float32, True)), ((2, 3), 128, (4, torch.bfloat16, False))]:
        check(lead, 13, k, "nf4", 64, True, torch.bfloat16, True, True, lora, 4)


def test_packing_order():
    """The layout fact the kernels rely on, on a weight whose codes are known: nf4 maps -1 to code 0 and +1 to
    code 15; the first element of each pair is the high nibble, pairs run over the flattened [N, K] weight."""
    w = torch.tensor([[-1.0, 1.0, 1.0], [-1.0, -1.0, 1.0]])
    q, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert q.dtype == torch.uint8 and q.shape == (3, 1)
    assert q.reshape(-1).tolist() == [0x0F, 0xF0, 0x0F]
    assert torch.equal(state.absmax, torch.tensor([1.0]))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 300), quant_type=st.sampled_from(["nf4", "fp4"]), double=st.booleans(),
       blocksize=st.sampled_from(nf4.BLOCKSIZES), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2 ** 16))
def test_dequantize_matches_bnb(n, k, quant_type, double, blocksize, dtype, seed):
    """nf4.dequantize (the CPU path and `reference`) is bit-exact with bitsandbytes' dequantize_4bit."""
    qweight, state = quantize(n, k, quant_type, blocksize, double, seed, "cpu", dtype)
    ours = nf4.dequantize(*quant_args(qweight, state), dtype=dtype)
    assert torch.equal(ours, bnb_weight(qweight, state))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 300), quant_type=st.sampled_from(["nf4", "fp4"]), double=st.booleans(),
       blocksize=st.sampled_from(nf4.BLOCKSIZES), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2 ** 16))
def test_dequantize_kernel_matches_bnb(n, k, quant_type, double, blocksize, dtype, seed):
    """The Triton dequantization kernel (the dequantize-then-GEMM path) is bit-exact with bitsandbytes too
    (odd n * k included: the last byte holds one element)."""
    qweight, state = quantize(n, k, quant_type, blocksize, double, seed, DEVICE, dtype)
    q = nf4._quant(*quant_args(qweight, state))
    assert torch.equal(nf4._dequantize_triton(q, dtype), bnb_weight(qweight, state))


@pytest.mark.parametrize("n,k,blocksize", [(4, 256, 64), (8, 512, 4096), (3, 100, 64), (16, 128, 32)])
def test_dequantize_kernel_whole_and_partial_programs(n, k, blocksize):
    """Weights that fill every program of the dequantization kernel (its unmasked EVEN form: 4 x 256 and 8 x 512
    elements) and ones that end inside a program, bit-exact with bitsandbytes for both quant types, double
    quantization on and off, fp16 and fp32 (where a last-bit difference of a block scale shows: on a GPU, the
    double-quantized scale computed with one FMA instead of bnb's two roundings)."""
    for quant_type in ("nf4", "fp4"):
        for double in (False, True):
            for dtype in (torch.float16, torch.float32):
                qweight, state = quantize(n, k, quant_type, blocksize, double, 5, DEVICE, dtype)
                q = nf4._quant(*quant_args(qweight, state))
                assert torch.equal(nf4._dequantize_triton(q, dtype), bnb_weight(qweight, state))


def test_bnb_truth_is_bnb_layout():
    """The one-row truth equals bnb's pure-torch backend everywhere, and bnb's dequantize_4bit of the real shape
    wherever bnb's CPU kernel is right (blocks that line up with rows)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    plain = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip its torch.compile
    for n, k, blocksize, double in [(7, 96, 64, False), (3, 33, 32, True), (5, 128, 64, True), (9, 130, 128, False),
                                    (4, 160, 64, True), (2, 256, 256, False)]:
        qweight, state = quantize(n, k, "nf4", blocksize, double, n * k, "cpu")
        truth = bnb_weight(qweight, state)
        absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset if double else state.absmax
        backend = plain(qweight.reshape(-1), absmax.float(), BF.get_4bit_type("nf4", device="cpu"), blocksize,
                        (n, k), torch.float32)
        assert torch.equal(truth, backend)
        if k % blocksize == 0:
            assert torch.equal(truth, BF.dequantize_4bit(qweight, state))


def test_quant_storage_bf16():
    """A packed weight stored as another dtype (bnb's quant_storage, used with FSDP) reads as its bytes."""
    x = torch.randn(5, 128)
    q8, s8 = quantize(6, 128, "nf4", 64, True, 0, "cpu")
    q16, s16 = quantize(6, 128, "nf4", 64, True, 0, "cpu", storage=torch.bfloat16)
    assert q16.dtype == torch.bfloat16
    assert torch.equal(linear_4bit_fn(x, q16, s16), linear_4bit_fn(x, q8, s8))


def test_interpreter_runs_the_triton_kernel():
    if DEVICE == "cpu":
        assert nf4._INTERPRETED, "on CPU the tests must run the Triton kernels through the interpreter"
        assert nf4._use_triton(torch.empty(1)) and not nf4._use_triton(torch.empty(1, dtype=torch.bfloat16))


def test_broken_kernel_is_caught(monkeypatch):
    """The property tests can fail: the wrong table, a wrong sign of the low-rank term, are caught."""
    qweight, state = quantize(12, 64, "nf4", 64, False, 0)
    x = torch.randn(5, 64, device=DEVICE)
    wrong = torch.ops.fxopt.linear_4bit(x, qweight, state.absmax, None, None, None,
                                        nf4.code_table("fp4", DEVICE), None, 12, 64, 64, "nf4")
    assert rel(wrong, x.double() @ bnb_weight(qweight, state).double().t()) > 0.1
    real = nf4._matmul
    monkeypatch.setattr(nf4, "_matmul", lambda x, q, t, lo, s, b, dt=None: real(x, q, t, lo, -s, b, dt))
    with pytest.raises(AssertionError):
        check((5,), 12, 64, "nf4", 64, False, torch.float32, False, False, (4, torch.float32, False), 0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_under_torch_compile(backend):
    qweight, state = quantize(10, 64, "nf4", 64, True, 0)
    args = quant_args(qweight, state)
    x = torch.randn(6, 64, device=DEVICE, requires_grad=True)
    a = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    b = torch.randn(10, 3, device=DEVICE, requires_grad=True)

    def fn(x, a, b):
        y = torch.ops.fxopt.lora_linear_4bit(x, *args[:6], None, a, b, 0.5, None, *args[6:])[0]
        return (y.sin() + torch.ops.fxopt.linear_4bit(x, *args[:6], None, *args[6:])).sum()

    out = torch.compile(fn, backend=backend)(x, a, b)
    grads = torch.autograd.grad(out, [x, a, b])
    want = torch.autograd.grad(fn(x, a, b), [x, a, b])
    for g1, g2 in zip(grads, want):
        assert rel(g1, g2) < 1e-5


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 64)
        q, am = torch.empty(640, 1, dtype=torch.uint8), torch.empty(20, dtype=torch.uint8)
        am2, c2, off = torch.empty(1), torch.empty(256), torch.empty(())
        y = torch.ops.fxopt.linear_4bit(x, q, am, am2, c2, off, None, torch.empty(20), 20, 64, 64, "nf4")
        assert tuple(y.shape) == (2, 5, 20)
        out, t = torch.ops.fxopt.lora_linear_4bit(x, q, am, am2, c2, off, None, None, torch.empty(3, 64),
                                                  torch.empty(20, 3), 2.0, None, 20, 64, 64, "nf4")
        assert tuple(out.shape) == (2, 5, 20) and tuple(t.shape) == (10, 3)
        dx = torch.ops.fxopt.linear_4bit_dx(torch.empty(2, 5, 20), q, am, am2, c2, off, None, 20, 64, 64, "nf4")
        assert tuple(dx.shape) == (2, 5, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("adapter", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", [((512,), 2048, 2048, 64), ((3, 37), 777, 1000, 64), ((300,), 512, 2048, 128),
                                  ((1,), 8192, 2048, 64), ((7,), 2048, 8192, 64), ((16,), 300, 4096, 32),
                                  ((129,), 123, 257, 64)])
def test_bf16_gpu(adapter, dims):
    lead, n, k, blocksize = dims
    rows = 1
    for d in lead:
        rows *= d
    for quant_type, double in (("nf4", True), ("fp4", False)):
        for path in ("gemv", "fused", "dequant") if rows <= 16 else ("fused", "dequant"):
            with kernel_path(path):
                dropout = double  # dropout input with one quant type, none with the other
                lora = None if adapter is None else (16, adapter, dropout)
                check(lead, n, k, quant_type, blocksize, double, torch.bfloat16, True, False, lora, 0, device="cuda")


@pytest.mark.gpu
def test_fp32_fp16_gpu():
    for dtype in (torch.float32, torch.float16):
        for lead in ((1,), (5,), (129,)):
            check(lead, 200, 320, "nf4", 64, True, dtype, True, True, (8, torch.float32, True), 1, device="cuda")
            check(lead, 99, 131, "fp4", 32, False, dtype, False, False, None, 2, device="cuda")


@pytest.mark.gpu
def test_gpu_layout_matches_bnb_cuda():
    """On CUDA, bnb's own quantize_4bit and dequantize_4bit of the real shape (no one-row view) agree with ours,
    bit for bit, odd shapes and blocks across rows included; and the op agrees with bnb.matmul_4bit."""
    import bitsandbytes as bnb

    for n, k, blocksize, double, quant_type in [(7, 96, 64, True, "nf4"), (33, 131, 32, False, "fp4"),
                                                (64, 2048, 64, True, "nf4"), (5, 100, 128, True, "fp4")]:
        qweight, state = quantize(n, k, quant_type, blocksize, double, 0, "cuda", torch.bfloat16)
        assert torch.equal(nf4.dequantize(*quant_args(qweight, state), dtype=torch.bfloat16),
                           BF.dequantize_4bit(qweight, state))
        x = torch.randn(9, k, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            want = bnb.matmul_4bit(x, qweight, state)
        assert rel(linear_4bit_fn(x, qweight, state), want) < TOL[torch.bfloat16]


def test_cancelling_output_found_by_hypothesis():
    """The draw that once failed the forward check (one fp16 output of 0.039 from terms summing to 7.5: the
    fused kernel's fp16-rounded weight against an fp32 reference), on every path."""
    for path in ("fused", "dequant", "gemv"):
        with kernel_path(path):
            check((1,), 1, 128, "nf4", 64, False, torch.float16, False, False, None, 0)
