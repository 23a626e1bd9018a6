"""fxopt::moe_experts against its plain-PyTorch reference in float64: forward and every gradient (x, the
routing weights, gate_up, down).

On CPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), in fp32
and fp16 (the interpreter's bf16 tl.dot is wrong: bf16 on the CPU runs the op's torch path, and the bf16
kernels are tested on the GPU). Every buffer the kernels write is poisoned with NaN first, so an element left
unwritten fails the test. Routing: random distinct experts per token, every token to the same k experts,
every slot to one expert; with E up to 64 and few tokens most experts get none."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxopt.kernels import moe as mk
from fxopt.kernels.moe import ACTIVATIONS, reference
from tests.kernels import numerics
from tests.kernels.numerics import TOL

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def fixed_tiles(request, monkeypatch):
    """On a GPU, the tests that sweep many shapes use one fixed config per kernel (autotuning every drawn
    shape would take minutes); the gpu-marked tests run the autotuned kernels, as training does."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(mk, "AUTOTUNE", False)


def rel(a, b):
    """||b|| floored at 1% of the RMS that the test data gives its values (about 1: inputs are unit-variance,
    weights scaled by fan-in). The floor only matters for a degenerate draw whose whole output is one
    near-cancelling dot product (e.g. T = 1, E = 1, I = 1), where even torch's fp32 math of the reference is
    off by more than the fp32 tolerance."""
    return numerics.rel(a, b, floor=1e-2 * max(1, int(torch.count_nonzero(b))) ** 0.5)


def make_ids(T, E, k, routing, g):
    if routing == "random":  # k distinct experts per token, as top-k of a router gives
        return torch.rand(T, E, generator=g).topk(k, -1).indices
    if routing == "same_k":  # every token to the same k experts (each of them gets all T tokens), any order
        experts = torch.randperm(E, generator=g)[:k]
        return torch.stack([experts[torch.randperm(k, generator=g)] for _ in range(T)])
    assert routing == "single"  # every slot of every token to one expert (repeated ids are allowed)
    return torch.full((T, k), int(torch.randint(E, (1,), generator=g)), dtype=torch.long)


def run_case(T, H, I, E, k, dtype, w_dtype, act, routing="random", noncontig=False,
             grads=(True, True, True, True), seed=0, device=DEVICE, saving=False):
    """grads: which of (x, topk_weights, gate_up, down) require grad; saving: the op that keeps the gate_up
    projection for its backward (moe_experts_saving) instead of the one that recomputes it."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    ids = make_ids(T, E, k, routing, g).to(device)
    if noncontig:  # transposed / strided views of every float input
        x = rnd(H, T).t()
        w = torch.rand(T, 2 * k, generator=g).to(device=device, dtype=w_dtype)[:, ::2]
        gu = rnd(E, H, 2 * I, scale=H ** -0.5).transpose(1, 2)
        dn = rnd(E, I, H, scale=I ** -0.5).transpose(1, 2)
        ids = torch.stack([ids, ids], -1)[..., 0]
    else:
        x = rnd(T, H)
        w = (torch.rand(T, k, generator=g) + 0.1).to(device=device, dtype=w_dtype)
        gu = rnd(E, 2 * I, H, scale=H ** -0.5)
        dn = rnd(E, H, I, scale=I ** -0.5)
    leaves = [x, w, gu, dn]
    for t, r in zip(leaves, grads):
        t.requires_grad_(r)
    trained = [t for t in leaves if t.requires_grad]

    if saving:
        y, kept = torch.ops.fxopt.moe_experts_saving(x, ids, w, gu, dn, act)
        assert kept.shape == (T * k, 2 * I) and kept.dtype == gu.dtype
    else:
        y = torch.ops.fxopt.moe_experts(x, ids, w, gu, dn, act)
    l64 = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    ref = reference(l64[0], ids, *l64[1:], act)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (T, H)
    assert rel(y, ref) < tol, "forward"
    if not trained:
        return
    dy = rnd(T, H)
    got = torch.autograd.grad(y, trained, dy)
    want = torch.autograd.grad(ref, [t64 for t64 in l64 if t64.requires_grad], dy.double())
    names = [n for n, t in zip(["x", "topk_weights", "gate_up", "down"], leaves) if t.requires_grad]
    # The same math by torch in the test dtype: where a sum over tokens cancels (e.g. H = I = 1), rounding the
    # per-token terms to fp16 alone moves the result past the tolerance; the kernel may not do worse than 2x that.
    same = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    torch_grads = torch.autograd.grad(reference(same[0], ids, *same[1:], act), [t for t in same if t.requires_grad], dy)
    for name, a, b, c, t in zip(names, got, want, torch_grads, trained):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        assert rel(a, b) < max(tol, 2 * rel(c, b)), f"gradient of {name}"


@settings(max_examples=25, deadline=None)
@given(T=st.sampled_from([1, 2, 5, 7, 16, 33]), H=st.integers(1, 40), I=st.integers(1, 40),
       E=st.sampled_from([1, 2, 3, 8, 17, 64]), k=st.sampled_from([1, 2, 3, 8]),
       dtype=st.sampled_from([torch.float32, torch.float16]), act=st.sampled_from(ACTIVATIONS),
       routing=st.sampled_from(["random", "random", "same_k", "single"]), noncontig=st.booleans(),
       grads=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()), saving=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_op_matches_reference(T, H, I, E, k, dtype, act, routing, noncontig, grads, saving, seed):
    if routing != "single":
        k = min(k, E)
    k = max(1, min(k, 64 // T))  # at most 64 (token, slot) rows: the interpreter's cost is per tile
    w_dtype = torch.float32 if seed % 2 else dtype  # routers give fp32 weights (Mixtral) or the model dtype
    run_case(T, H, I, E, k, dtype, w_dtype, act, routing, noncontig, grads, seed, saving=saving)


@pytest.mark.parametrize("case", [
    dict(T=1, H=9, I=5, E=64, k=8),  # one token: 56 experts without rows
    dict(T=1, H=3, I=1, E=1, k=1),  # every dimension tiny
    dict(T=33, H=20, I=17, E=4, k=1, routing="single"),  # every token to one expert, 3 experts empty
    dict(T=19, H=33, I=35, E=8, k=8),  # top-8 of 8: every expert gets every token
    dict(T=7, H=16, I=16, E=64, k=8, routing="same_k", noncontig=True),
])
@pytest.mark.parametrize("saving", [False, True], ids=["recompute", "saving"])
def test_routing_edge_cases(case, saving):
    run_case(dtype=torch.float32, w_dtype=torch.float32, act="silu", saving=saving, **case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_torch_path(dtype):
    """bf16 and fp64 on the CPU take the op's torch math (the Triton path does not handle them there)."""
    for act in ACTIVATIONS:
        w_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        run_case(9, 24, 10, 6, 2, dtype, w_dtype, act, device="cpu", noncontig=dtype == torch.float64)
        run_case(9, 24, 10, 6, 2, dtype, w_dtype, act, device="cpu", saving=True)


def test_interpreter_runs_the_triton_kernel():
    if DEVICE == "cpu":
        assert mk._INTERPRETED, "on CPU the tests must run the Triton kernels through the interpreter"
        assert mk._use_triton(torch.empty(1)) and not mk._use_triton(torch.empty(1, dtype=torch.bfloat16))


def test_broken_forward_is_caught(monkeypatch):
    """The property test can fail: a down projection that drops the routing weight is caught."""
    real = mk._rows_gemm
    monkeypatch.setattr(mk, "_rows_gemm", lambda *a, **kw: real(*a, **{**kw, "wts": None}))
    with pytest.raises(AssertionError, match="forward"):
        run_case(5, 8, 6, 4, 2, torch.float32, torch.float32, "silu")


def test_broken_backward_is_caught(monkeypatch):
    """... and a gate_up gradient that pairs the rows of dgate_up with the wrong tokens of x."""
    real = mk._wgrad

    def wrong_tokens(a, b, perm, *args, **kw):
        return real(a, b, perm.flip(0) if kw["gather_b"] else perm, *args, **kw)

    monkeypatch.setattr(mk, "_wgrad", wrong_tokens)
    with pytest.raises(AssertionError, match="gradient of gate_up"):
        run_case(6, 8, 6, 3, 2, torch.float32, torch.float32, "silu", grads=(False, False, True, False))


def test_under_torch_compile_dynamic_tokens():
    """Inside torch.compile (aot_eager) with a router in front: one graph serves two token counts (T is
    symbolic), and the gradients equal eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    g = torch.Generator().manual_seed(0)
    E, H, I, k = 5, 12, 10, 2  # T below differs from every other size (duck sizing would tie them)
    router = torch.randn(E, H, generator=g).to(DEVICE).requires_grad_()
    gu = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(DEVICE).requires_grad_()
    dn = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(DEVICE).requires_grad_()

    def block(x):
        probs = torch.softmax(x @ router.t(), -1, dtype=torch.float32)
        w, ids = probs.topk(k, -1)
        w = w / w.sum(-1, keepdim=True)
        return torch.ops.fxopt.moe_experts(x, ids, w, gu, dn, "silu")

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, dynamic=True)
    for T in (7, 13):
        x = torch.randn(T, H, generator=g).to(DEVICE).requires_grad_()
        out = compiled(x)
        got = torch.autograd.grad(out.sin().sum(), [x, router, gu, dn])
        want = torch.autograd.grad(block(x).sin().sum(), [x, router, gu, dn])
        assert rel(out, block(x)) < 1e-6
        for a, b in zip(got, want):
            assert rel(a, b) < 1e-5
    assert counter.frame_count == 1, "recompiled for a new token count"


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 24)
        ids = torch.empty(5, 3, dtype=torch.long)
        w = torch.empty(5, 3)
        y = torch.ops.fxopt.moe_experts(x, ids, w, torch.empty(4, 20, 24), torch.empty(4, 24, 10), "gelu")
        assert y.shape == (5, 24)
        grads = torch.ops.fxopt.moe_experts_backward(y, x, ids, w, torch.empty(4, 20, 24), torch.empty(4, 24, 10),
                                                     "gelu", True, True, False, True)
        assert [tuple(t.shape) for t in grads] == [(5, 24), (5, 3), (4, 24, 10)]


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", [
    dict(T=512, H=1024, I=512, E=32, k=4),  # the moe workload's layer, fewer tokens
    dict(T=37, H=200, I=77, E=9, k=3, noncontig=True),  # odd everything
    dict(T=300, H=256, I=128, E=16, k=1, routing="single"),  # every token to one expert
    dict(T=1, H=2048, I=768, E=64, k=8),  # one token, 56 experts empty
    dict(T=1000, H=128, I=96, E=64, k=8, routing="same_k"),
    dict(T=256, H=2048, I=768, E=64, k=8),  # the moe-big layer: the backward recomputes by the rows GEMM
])
@pytest.mark.parametrize("saving", [False, True], ids=["recompute", "saving"])
def test_bf16_gpu(dims, w_dtype, saving):
    for act in ACTIVATIONS:
        run_case(dtype=torch.bfloat16, w_dtype=w_dtype, act=act, device="cuda", saving=saving, **dims)


@pytest.mark.gpu
def test_fp32_fp16_gpu():
    for dtype in (torch.float32, torch.float16):
        run_case(129, 300, 200, 12, 4, dtype, torch.float32, "gelu", noncontig=True, device="cuda")
        run_case(129, 300, 200, 12, 4, dtype, torch.float32, "gelu", noncontig=True, device="cuda", saving=True)
        run_case(64, 96, 64, 8, 2, dtype, dtype, "silu", grads=(False, True, False, False), device="cuda")


@pytest.mark.gpu
def test_deterministic_gpu():
    """No atomics: two runs give bitwise equal output and gradients."""
    g = torch.Generator().manual_seed(0)
    T, H, I, E, k = 2048, 512, 256, 16, 4
    x = torch.randn(T, H, generator=g).cuda().bfloat16().requires_grad_()
    ids = torch.rand(T, E, generator=g).topk(k, -1).indices.cuda()
    w = torch.rand(T, k, generator=g).cuda().requires_grad_()
    gu = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).cuda().bfloat16().requires_grad_()
    dn = (torch.randn(E, H, I, generator=g) * I ** -0.5).cuda().bfloat16().requires_grad_()
    dy = torch.randn(T, H, generator=g).cuda().bfloat16()
    runs = []
    for _ in range(2):
        y = torch.ops.fxopt.moe_experts(x, ids, w, gu, dn, "silu")
        runs.append([y] + list(torch.autograd.grad(y, [x, w, gu, dn], dy)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_saving_backward_reads_the_kept_projection(monkeypatch):
    """The saving op's backward runs the activation-backward kernel on the kept projection (SAVED_GU), and a
    corrupted kept projection changes the gradients: it is really read, not recomputed."""
    g = torch.Generator().manual_seed(3)
    T, H, I, E, k = 7, 16, 12, 4, 2
    x = torch.randn(T, H, generator=g).to(DEVICE).requires_grad_()
    ids = make_ids(T, E, k, "random", g).to(DEVICE)
    w = torch.rand(T, k, generator=g).to(DEVICE)
    gu = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(DEVICE)
    dn = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(DEVICE)
    seen = []
    real = mk._bwd_act
    monkeypatch.setattr(mk, "_bwd_act", lambda *a: (seen.append(a[-1] is not None), real(*a))[1])
    y, kept = torch.ops.fxopt.moe_experts_saving(x, ids, w, gu, dn, "silu")
    dx = torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True)[0]
    assert seen == [True]
    want = torch.autograd.grad(mk.reference(x, ids, w, gu, dn, "silu"), x, torch.ones_like(y))[0]
    assert rel(dx, want) < TOL[torch.float32]
    kept.data.mul_(2.0)  # the backward must read what the forward kept
    dx2 = torch.autograd.grad(y, x, torch.ones_like(y))[0]
    assert rel(dx2, want) > 0.1


@pytest.mark.parametrize("saving", [False, True], ids=["recompute", "saving"])
def test_rows_gemm_recompute(monkeypatch, saving):
    """ROWS_GEMM_RECOMPUTE_MIN_H: a backward that recomputes the projection by the rows GEMM (the wide-hidden
    path, taken here at every H) gives the reference's gradients, with and without a kept projection."""
    monkeypatch.setattr(mk, "ROWS_GEMM_RECOMPUTE_MIN_H", 0)
    seen = []
    real = mk._recompute_gate_up
    monkeypatch.setattr(mk, "_recompute_gate_up", lambda *a: (seen.append(1), real(*a))[1])
    run_case(19, 33, 35, 8, 3, torch.float32, torch.float32, "silu", saving=saving)
    run_case(7, 16, 16, 64, 8, torch.float16, torch.float32, "gelu", routing="same_k", noncontig=True, saving=saving)
    assert len(seen) == (0 if saving else 2)  # a kept projection is never recomputed
