"""fxopt::flash_attention against its plain-PyTorch reference in float64: forward and every gradient (q, k, v),
grouped heads (ratios 1, 2, 4), causal, sliding window, softcap, key padding (with rows that see no key),
padded head dims and non-contiguous layouts (HF's [B, S, H, D] transposes, slices of a fused qkv projection).
The reference itself is checked against PyTorch's SDPA and transformers' mask functions.

On CPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), in fp32
and fp16 (the interpreter's bf16 tl.dot is wrong: bf16 is tested on the GPU). Every buffer the kernels write is
poisoned with NaN first, so an element left unwritten fails the test: tests/kernels/conftest.py poisons the
modules in its KERNEL_MODULES list, which predates this one, so the fixture below does it for this module."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fxopt.kernels import attention as ak
from fxopt.kernels.attention import flash_attention_fn, reference
from tests.kernels.numerics import TOL, rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]
# (fwd, dq, dkdv) interpreter tiles: equal, and query / key blocks of different sizes (loop bounds that are
# multiples of one block size but not of the other)
TILES = {
    "16/16": None,
    "32q/16k": {"fwd": dict(BLOCK_M=32, BLOCK_N=16), "dq": dict(BLOCK_M=32, BLOCK_N=16),
                "dkdv": dict(BLOCK_M=32, BLOCK_N=16)},
    "16q/32k": {"fwd": dict(BLOCK_M=16, BLOCK_N=32), "dq": dict(BLOCK_M=16, BLOCK_N=32),
                "dkdv": dict(BLOCK_M=16, BLOCK_N=32)},
}


def _nan_output(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison_and_fixed_tiles(monkeypatch):
    monkeypatch.setattr(ak, "_new_output", _nan_output)
    # On a GPU, tests that sweep many shapes use one fixed config per kernel (autotuning every drawn shape
    # would take minutes); tests that take the `autotuned` fixture run the autotuned kernels, as training does.
    monkeypatch.setattr(ak, "AUTOTUNE", False)


@pytest.fixture
def autotuned(monkeypatch):
    monkeypatch.setattr(ak, "AUTOTUNE", True)


def make_padding(kind, B, S, g):
    """key_padding [B, S] (True = real key) of a kind, or None."""
    if kind is None:
        return None
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    j = torch.arange(S)[None, :]
    if kind == "right":
        return j < lengths[:, None]
    if kind == "left":  # under a causal mask the first queries of a short row see no key
        return j >= (S - lengths)[:, None]
    if kind == "empty_row":  # batch entry 0 has no key at all
        pad = torch.rand(B, S, generator=g) < 0.7
        pad[0] = False
        return pad
    return torch.rand(B, S, generator=g) < 0.6  # "random"


def make_qkv(B, hq, hkv, S, D, dtype, layout, g, device):
    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if layout == "contiguous":
        q, k, v = rnd(B, hq, S, D), rnd(B, hkv, S, D), rnd(B, hkv, S, D)
    elif layout == "bshd":  # what HF attention gets: projections viewed [B, S, H, D], transposed
        q, k, v = (rnd(B, S, h, D).transpose(1, 2) for h in (hq, hkv, hkv))
    elif layout == "fused":  # slices of one fused qkv projection output
        qkv = rnd(B, S, (hq + 2 * hkv) * D)
        q = qkv[..., :hq * D].view(B, S, hq, D).transpose(1, 2)
        k = qkv[..., hq * D:(hq + hkv) * D].view(B, S, hkv, D).transpose(1, 2)
        v = qkv[..., (hq + hkv) * D:].view(B, S, hkv, D).transpose(1, 2)
    else:  # "d_strided": rows further apart than D
        q, k, v = (rnd(B, h, S, D + 3)[..., 1:D + 1] for h in (hq, hkv, hkv))
    return [t.detach().requires_grad_() for t in (q, k, v)]  # detach keeps the strides


def grad_scales(q, k, v, do, scale, causal, window, softcap, key_padding, mask=None):
    """The size of the terms that dq and dk sum (float64): dS = P * (dP - delta) cancels to ~0 when a row sees
    one key (P = 1, dP = delta = dO . v; window 1, S = 1) or when P is nearly one-hot, and then dq, dk are known
    to any fp32 implementation only relative to |P| (|dO| |V|^T + |dO| |O|) (dP and delta are sums of those
    products), propagated like dS. Used as a floor (10%) under ||ref|| for dq and dk; for rows that see several
    keys with comparable weights ||dq|| is far above it, so the floor changes nothing there."""
    g = q.shape[1] // k.shape[1]
    K, V = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ K.transpose(-1, -2) * scale
    deriv = 1 - torch.tanh(s / softcap) ** 2 if softcap else torch.ones_like(s)
    out = reference(q, k, v, scale, causal, window, softcap, key_padding, mask)
    # P from the reference itself: out = P V for V = identity
    S = q.shape[2]
    eye = torch.eye(S, dtype=q.dtype, device=q.device).expand(q.shape[0], k.shape[1], S, S)
    P = reference(q, k, eye, scale, causal, window, softcap, key_padding, mask)
    term = P * (do.abs() @ V.abs().transpose(-1, -2) + (do.abs() * out.abs()).sum(-1, keepdim=True)) * deriv
    dq = scale * term @ K.abs()
    dk = (scale * term.transpose(-1, -2) @ q.abs()).unflatten(1, (k.shape[1], g)).sum(2)
    return dq.norm().item(), dk.norm().item()


def make_mask(kind, B, S, g):
    """A dense bool mask [B or 1, 1, S, S] (True = visible) of a kind, or None."""
    if kind is None:
        return None
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    causal = (j <= i)[None, None]
    if kind == "causal":
        return causal.expand(B, 1, S, S)  # HF's form: one mask expanded over the batch (stride 0)
    if kind == "causal_left_pad":  # HF's causal mask and an attention_mask with left padding
        return causal & make_padding("left", B, S, g)[:, None, None, :]
    if kind == "window":
        w = int(torch.randint(1, S + 1, (1,), generator=g))
        return (causal & (j > i - w)).expand(B, 1, S, S)
    if kind == "bidirectional_window":
        w = int(torch.randint(0, S, (1,), generator=g))
        return ((j - i).abs() <= w)[None, None].expand(B, 1, S, S)
    if kind == "packed":  # causal within each packed sequence (position_ids restarting)
        doc = torch.cumsum(torch.rand(B, S, generator=g) < 0.15, 1)
        return causal & (doc[:, :, None] == doc[:, None, :])[:, None]
    if kind == "transposed":  # a non-contiguous mask: a [B, 1, S(keys), S(queries)] buffer transposed
        buf = torch.rand(B, 1, S, S, generator=g) < 0.5
        return buf.transpose(2, 3)
    if kind == "empty_row":  # batch entry 0 sees nothing; entry 1 random
        m = (torch.rand(B, 1, S, S, generator=g) < 0.6)
        m[0] = False
        return m
    if kind == "full":
        return torch.ones(1, 1, S, S, dtype=torch.bool)
    return torch.rand(B, 1, S, S, generator=g) < 0.6  # "random"


MASKS = ["causal", "causal_left_pad", "window", "bidirectional_window", "packed", "transposed", "empty_row", "full",
         "random"]


def run_case(B, hq, hkv, S, D, dtype, causal=False, window=0, softcap=0.0, padding=None, layout="contiguous",
             seed=0, device=DEVICE, scale=None, tol=None, mask=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(B, hq, hkv, S, D, dtype, layout, g, device)
    pad = make_padding(padding, B, S, g)
    pad = None if pad is None else pad.to(device)
    if isinstance(mask, str) or mask is None:
        mask = make_mask(mask, B, S, g)
    mask = None if mask is None else mask.to(device)
    scale = D ** -0.5 if scale is None else scale
    out = flash_attention_fn(q, k, v, scale, causal, window, softcap, pad, mask)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, scale, causal, window, softcap, pad, mask)
    tol = tol or TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert rel(out, ref) < tol, "output"

    do = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype)
    got = torch.autograd.grad(out, [q, k, v], do)
    want = torch.autograd.grad(ref, [q64, k64, v64], do.double())
    with torch.no_grad():
        floors = grad_scales(q64, k64, v64, do.double(), scale, causal, window, softcap, pad, mask)
    for name, a, b, t, floor in zip("qkv", got, want, (q, k, v), (*floors, 0.0)):
        assert a.dtype == t.dtype and a.shape == t.shape, f"gradient of {name}"
        assert rel(a, b, 0.1 * floor) < tol, f"gradient of {name}"
    return out, got, pad


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), heads=st.sampled_from([(1, 1), (2, 2), (2, 1), (4, 2), (4, 1)]),
       S=st.one_of(st.sampled_from([1, 2, 15, 16, 17, 33]), st.integers(1, 40)),
       D=st.sampled_from([16, 24, 64, 80]), dtype=st.sampled_from(DTYPES), causal=st.booleans(),
       window=st.sampled_from([0, 0, 1, 3, 17]), softcap=st.sampled_from([0.0, 0.0, 1.5, 20.0]),
       padding=st.sampled_from([None, None, "right", "left", "empty_row", "random"]),
       layout=st.sampled_from(["contiguous", "bshd", "fused", "d_strided"]), tiles=st.sampled_from(list(TILES)),
       unit_scale=st.booleans(), seed=st.integers(0, 2**16))
def test_op_matches_reference(B, heads, S, D, dtype, causal, window, softcap, padding, layout, tiles, unit_scale,
                              seed):
    hq, hkv = heads
    window = window if causal else 0  # a window is causal (tested to raise otherwise)
    with pytest.MonkeyPatch.context() as mp:
        if TILES[tiles] is not None:
            mp.setattr(ak, "INTERPRETER_TILES", TILES[tiles])
        run_case(B, hq, hkv, S, D, dtype, causal, window, softcap, padding, layout, seed,
                 scale=1.0 if unit_scale else None)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       S=st.one_of(st.sampled_from([1, 16, 17, 33]), st.integers(1, 50)), D=st.sampled_from([16, 24, 64]),
       dtype=st.sampled_from(DTYPES), mask=st.sampled_from(MASKS), softcap=st.sampled_from([0.0, 0.0, 1.5]),
       layout=st.sampled_from(["contiguous", "bshd", "fused"]), tiles=st.sampled_from(list(TILES)),
       seed=st.integers(0, 2**16))
def test_dense_mask_matches_reference(B, heads, S, D, dtype, mask, softcap, layout, tiles, seed):
    """A dense bool mask (what HF passes SDPA) of every kind, on sequences of several tiles: the kernels visit
    the tiles the mask summary names, read the mask outside the fully visible run, and must equal the
    reference with the same mask."""
    hq, hkv = heads
    with pytest.MonkeyPatch.context() as mp:
        if TILES[tiles] is not None:
            mp.setattr(ak, "INTERPRETER_TILES", TILES[tiles])
        run_case(B, hq, hkv, S, D, dtype, softcap=softcap, layout=layout, seed=seed, mask=mask)


@pytest.mark.parametrize("tiles", list(TILES))
@pytest.mark.parametrize("mask", MASKS)
def test_dense_mask_kinds(tiles, mask, monkeypatch):
    """Each mask kind at a length of several tiles of 16 plus a ragged end."""
    if TILES[tiles] is not None:
        monkeypatch.setattr(ak, "INTERPRETER_TILES", TILES[tiles])
    run_case(2, 2, 1, 70, 16, torch.float32, seed=len(mask), mask=mask)


def as_additive(mask, dtype, bias=False, g=None):
    """HF's eager form of a bool mask: 0 where visible, the dtype's minimum where not; with bias=True a random
    additive bias (an ALiBi-like term) where visible."""
    vis = torch.zeros(mask.shape, dtype=dtype)
    if bias:
        vis = torch.randn(mask.shape, generator=g).to(dtype)
    return torch.where(mask.cpu(), vis, torch.finfo(dtype).min).to(mask.device)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       S=st.sampled_from([1, 17, 40, 70]), D=st.sampled_from([16, 24]), dtype=st.sampled_from(DTYPES),
       mask=st.sampled_from(MASKS), bias=st.booleans(), softcap=st.sampled_from([0.0, 1.5]),
       tiles=st.sampled_from(list(TILES)), seed=st.integers(0, 2**16))
def test_additive_mask_matches_reference(B, heads, S, D, dtype, mask, bias, softcap, tiles, seed):
    """A float (additive) mask, what HF's eager attention adds to the scores (after a softcap): the dtype's
    minimum hides a key, other values are added (a random bias here, or HF's zeros). Forward and gradients
    against the float64 reference with the same mask."""
    hq, hkv = heads
    g = torch.Generator().manual_seed(seed)
    m = as_additive(make_mask(mask, B, S, g), dtype, bias, g).to(DEVICE)
    with pytest.MonkeyPatch.context() as mp:
        if TILES[tiles]:
            mp.setattr(ak, "INTERPRETER_TILES", TILES[tiles])
        run_case(B, hq, hkv, S, D, dtype, softcap=softcap, seed=seed, mask=m)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hf_additive_mask_equals_bool_mask(dtype):
    """HF's eager mask (0 / the dtype's minimum) gives exactly what the same bool mask gives, fully masked rows
    (0) included."""
    g = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(2, 4, 2, 70, 16, dtype, "bshd", g, DEVICE)
    mask = make_mask("empty_row", 2, 70, g).to(DEVICE)
    a = flash_attention_fn(q, k, v, mask=mask)
    b = flash_attention_fn(q, k, v, mask=as_additive(mask, dtype))
    assert torch.equal(a, b)


def test_additive_mask_on_the_torch_path():
    """float64 takes the op's torch math: an additive mask there equals the reference too (values added, the
    minimum hiding the key, fully masked rows 0)."""
    g = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(2, 4, 2, 20, 8, torch.float64, "contiguous", g, DEVICE)
    m = as_additive(make_mask("empty_row", 2, 20, g), torch.float64, True, g).to(DEVICE)
    out = flash_attention_fn(q, k, v, mask=m)
    assert rel(out, reference(q, k, v, 8 ** -0.5, mask=m)) < 1e-12
    assert out[0].abs().max() == 0  # batch entry 0 sees no key


def test_dense_causal_mask_equals_causal_flag():
    """The dense causal mask HF builds gives the causal kernel's result (same tiles visited, same sums)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(2, 4, 2, 50, 16, torch.float32, "bshd", g, DEVICE)
    mask = make_mask("causal", 2, 50, g).to(DEVICE)
    a = flash_attention_fn(q, k, v, causal=True)
    b = flash_attention_fn(q, k, v, mask=mask)
    assert torch.equal(a, b)


def test_mask_summary():
    """The summary of a causal mask over 40 positions (3 strips of 16, the last ragged: positions past the end
    do not count against a full tile): strip i sees key tiles 0..i, the tiles before i fully; key strip j is
    seen by query tiles j.., fully by j+1..; a padded key is seen by nobody. Every strip of the causal mask is
    flagged causal; with the padded key, the strips of its tile (query and key) are not."""
    S = 40
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    summary = ak._mask_summary((j <= i)[None, None])
    first, end, full_first, full_end, tri = summary[:5, 0]
    assert first.tolist() == [0, 0, 0] and end.tolist() == [1, 2, 3]
    assert full_first.tolist() == [3, 0, 0] and full_end.tolist() == [3, 1, 2] and tri.tolist() == [1, 1, 1]
    first, end, full_first, full_end, tri = summary[5:, 0]
    assert first.tolist() == [0, 1, 2] and end.tolist() == [3, 3, 3]
    assert full_first.tolist() == [1, 2, 3] and full_end.tolist() == [3, 3, 3] and tri.tolist() == [1, 1, 1]
    mask = (j <= i)[None, None] & (j != 20)  # key 20 padded: its tile is no longer full for anyone
    summary = ak._mask_summary(mask)
    first, end, full_first, full_end, tri = summary[:5, 0]
    assert full_first.tolist() == [3, 0, 0] and full_end.tolist() == [3, 1, 1]
    assert tri.tolist() == [1, 0, 0] and summary[9, 0].tolist() == [1, 0, 1]  # query strips 1, 2 would see key 20


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("S", [1, 16, 37, 100, 300])  # 300: 19 strips, more than one chunk of 16
def test_summary_kernel_matches_reference(mask, S):
    """The Triton summary (what the op uses) equals the torch reference, for every mask kind and layout."""
    m = make_mask(mask, 2, S, torch.Generator().manual_seed(S)).to(DEVICE)
    if m.shape[0] > 1 and m.stride(0) == 0:
        m = m[:1]
    assert torch.equal(ak._summarise(m), ak._mask_summary(m))


def test_wrong_mask_summary_is_caught(monkeypatch):
    """The mask tests can fail: a summary that calls every tile fully visible (the mask never read) is caught."""
    real = ak._summarise

    def all_full(mask):
        summary = real(mask).clone()
        T = summary.shape[-1]
        summary[[0, 5]], summary[[1, 6]], summary[[2, 7]], summary[[3, 8]] = 0, T, 0, T
        return summary

    monkeypatch.setattr(ak, "_summarise", all_full)
    with pytest.raises(AssertionError, match="output"):
        run_case(2, 2, 1, 70, 16, torch.float32, mask="packed")


def test_wrong_causal_flag_is_caught(monkeypatch):
    """The causal fast path can fail: a summary that calls a padded causal mask causal (the partly visible tiles
    then ignore the padding) is caught."""
    real = ak._summarise

    def all_causal(mask):
        summary = real(mask).clone()
        summary[[4, 9]] = 1
        return summary

    monkeypatch.setattr(ak, "_summarise", all_causal)
    with pytest.raises(AssertionError, match="output"):
        run_case(2, 2, 1, 70, 16, torch.float32, mask="causal_left_pad")


@pytest.mark.parametrize("tiles", list(TILES))
def test_causal_window_block_bounds(tiles, monkeypatch):
    """Windows narrower than, equal to and wider than the tiles, on a sequence of several blocks: the loop
    bounds skip the invisible blocks and the unmasked middle range must be exactly the fully visible blocks."""
    if TILES[tiles] is not None:
        monkeypatch.setattr(ak, "INTERPRETER_TILES", TILES[tiles])
    for window in (1, 15, 16, 17, 40):
        run_case(1, 2, 1, 70, 16, torch.float32, True, window, seed=window)


def test_rows_that_see_no_key():
    """Left padding under a causal mask and one batch entry without any real key: those rows give exactly 0,
    their dq is 0 and padded keys get zero dk, dv (SDPA gives 0 there too; no NaN anywhere)."""
    pad = make_padding("left", 3, 21, torch.Generator().manual_seed(3))
    pad[0] = False
    out, (dq, dk, dv) = _run_with_padding(pad)
    empty = ~torch.tril(pad[:, None, :].expand(-1, 21, -1)).any(-1).to(DEVICE)  # [B, S]: rows that see nothing
    pad = pad.to(DEVICE)
    assert empty[0].all() and not empty.all()
    assert torch.count_nonzero(out.transpose(1, 2)[empty]) == 0
    assert torch.count_nonzero(dq.transpose(1, 2)[empty]) == 0
    assert torch.count_nonzero(dk.transpose(1, 2)[~pad]) == 0 and torch.count_nonzero(dv.transpose(1, 2)[~pad]) == 0
    assert torch.count_nonzero(dk.transpose(1, 2)[pad]) > 0


def _run_with_padding(pad):
    g = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(pad.shape[0], 4, 2, pad.shape[1], 24, torch.float32, "bshd", g, DEVICE)
    pad = pad.to(DEVICE)
    out = flash_attention_fn(q, k, v, 0.5, True, 0, 0.0, pad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, 0.5, True, 0, 0.0, pad)
    assert rel(out, ref) < TOL[torch.float32]
    do = torch.randn(out.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(out, [q, k, v], do)
    want = torch.autograd.grad(ref, [q64, k64, v64], do.double())
    for a, b in zip(grads, want):
        assert rel(a, b) < TOL[torch.float32]
    return out, grads


def test_reference_matches_sdpa_and_hf_masks():
    """The reference's semantics: equal to PyTorch's SDPA (math, float64) with enable_gqa and the same boolean
    mask, fully masked rows included; its window mask equal to transformers' sliding-window causal mask."""
    from transformers import masking_utils as mu

    g = torch.Generator().manual_seed(0)
    B, hq, hkv, S, D = 2, 4, 2, 13, 8
    q, k, v = (torch.randn(B, h, S, D, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    pad = make_padding("left", B, S, g)
    pad[1] = False
    i, j, b = torch.arange(S)[:, None], torch.arange(S)[None, :], torch.arange(B)[:, None, None]
    for window in (0, 1, 4):
        causal_fn = mu.sliding_window_causal_mask_function(window) if window else mu.causal_mask_function
        hf = mu.and_masks(causal_fn, mu.padding_mask_function(pad))(b, 0, i[None], j[None])  # [B, S, S]
        assert torch.equal(hf, ak._visible(S, True, window, pad, "cpu"))
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=hf[:, None], scale=0.3, enable_gqa=True)
        got = reference(q, k, v, 0.3, True, window, 0.0, pad)
        assert torch.allclose(got, want, atol=1e-12, rtol=0)
        assert got[1].abs().sum() == 0  # a batch entry without keys: zeros, as SDPA gives
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    assert torch.allclose(reference(q, k, v, 0.3, True), want, atol=1e-12, rtol=0)


def test_float64_takes_the_torch_path(monkeypatch):
    """float64 inputs never launch a kernel (the kernels take fp16/bf16/fp32) and give the reference's values."""
    def no_kernel(*a, **kw):
        raise AssertionError("a kernel was launched for float64 inputs")

    monkeypatch.setattr(ak, "_launch", no_kernel)
    monkeypatch.setattr(ak, "_delta_kernel", None)
    g = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(2, 4, 2, 9, 16, torch.float64, "bshd", g, DEVICE)
    pad = make_padding("empty_row", 2, 9, g).to(DEVICE)
    assert not ak._use_triton(q, k, v)
    out = flash_attention_fn(q, k, v, 0.4, True, 3, 2.0, pad)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = reference(q2, k2, v2, 0.4, True, 3, 2.0, pad)
    assert out.dtype == torch.float64 and rel(out, ref) < TOL[torch.float64]
    do = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    for a, b in zip(torch.autograd.grad(out, [q, k, v], do), torch.autograd.grad(ref, [q2, k2, v2], do)):
        assert a.dtype == torch.float64 and rel(a, b) < TOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_torch_path(monkeypatch, dtype):
    """Without the interpreter, the CPU runs the torch math of the kernels: the same results."""
    monkeypatch.setattr(ak, "_use_triton", lambda q, k, v: False)
    run_case(2, 4, 2, 19, 24, dtype, True, 5, 3.0, "empty_row", "fused", device="cpu")
    run_case(1, 2, 2, 7, 16, dtype, False, 0, 0.0, "random", "bshd", device="cpu")


def test_interpreter_runs_the_triton_kernels():
    if DEVICE == "cpu":
        assert ak._INTERPRETED, "on CPU the tests must run the Triton kernels through the interpreter"
        t = torch.empty(1, 1, 1, 16)
        assert ak._use_triton(t, t, t) and ak._use_triton(*(t.half(),) * 3)
        assert not ak._use_triton(*(t.bfloat16(),) * 3)  # the interpreter's bf16 tl.dot is wrong


def test_unwritten_rows_are_caught(monkeypatch):
    """The poisoned outputs catch kernels that leave rows unwritten (one program fewer than blocks)."""
    real = ak._num_blocks
    monkeypatch.setattr(ak, "_num_blocks", lambda n, block: max(1, real(n, block) - 1))
    with pytest.raises(AssertionError, match="non-finite"):
        run_case(1, 2, 1, 40, 16, torch.float32, True)


def test_wrong_backward_is_caught(monkeypatch):
    """The gradient comparison can fail: a backward that forgets the softcap's derivative is caught."""
    real = ak.flash_attention_backward
    monkeypatch.setattr(ak, "flash_attention_backward",
                        lambda do, q, k, v, o, lse, scale, causal, window, softcap, pad, mask, summary:
                        real(do, q, k, v, o, lse, scale, causal, window, 0.0, pad, mask, summary))
    with pytest.raises(AssertionError, match="gradient"):
        run_case(1, 2, 1, 20, 16, torch.float32, True, softcap=1.5)


def test_bad_arguments():
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="causal"):
        flash_attention_fn(q, k, k, window=2)
    with pytest.raises(ValueError, match="multiple"):
        flash_attention_fn(q, torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16))
    with pytest.raises(ValueError, match="key_padding"):
        flash_attention_fn(q, k, k, key_padding=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="dtype"):
        flash_attention_fn(q, k.half(), k)
    with pytest.raises(ValueError, match="mask must be a bool"):
        flash_attention_fn(q, k, k, mask=torch.ones(1, 1, 5, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="mask must be a bool"):
        flash_attention_fn(q, k, k, mask=torch.ones(1, 2, 5, 5))
    with pytest.raises(ValueError, match="mask is the whole mask"):
        flash_attention_fn(q, k, k, causal=True, mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, Hq, S, D\]"):
        flash_attention_fn(q, torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16))


def test_empty_sequence():
    q = torch.randn(2, 4, 0, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 0, 16, device=DEVICE, requires_grad=True)
    out = flash_attention_fn(q, k, k, causal=True)
    assert out.shape == (2, 4, 0, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_under_torch_compile(backend):
    """The op inside a compiled graph, forward and backward, with the layout HF gives it (projections viewed
    [B, S, H, D] and transposed, the output transposed back and flattened)."""
    g = torch.Generator().manual_seed(0)
    B, S, hq, hkv, D = 2, 11, 4, 2, 16
    x = torch.randn(B, S, 32, generator=g).to(DEVICE).requires_grad_()
    wq = (torch.randn(32, hq * D, generator=g) * 0.2).to(DEVICE).requires_grad_()
    wkv = (torch.randn(32, 2 * hkv * D, generator=g) * 0.2).to(DEVICE).requires_grad_()
    pad = make_padding("left", B, S, g).to(DEVICE)

    def fn(x, wq, wkv):
        q = (x @ wq).view(B, S, hq, D).transpose(1, 2)
        k, v = (x @ wkv).view(B, S, 2 * hkv, D).transpose(1, 2).chunk(2, dim=1)
        out = flash_attention_fn(q, k, v, 0.3, True, 4, 5.0, pad)
        return out.transpose(1, 2).reshape(B, S, hq * D).sin().sum()

    with torch._inductor.config.patch(force_disable_caches=True):
        loss = torch.compile(fn, backend=backend)(x, wq, wkv)
        grads = torch.autograd.grad(loss, [x, wq, wkv])
    want_loss = fn(x, wq, wkv)
    want = torch.autograd.grad(want_loss, [x, wq, wkv])
    assert rel(loss, want_loss) < 1e-5
    for a, b in zip(grads, want):
        assert rel(a, b) < 1e-5


def test_opcheck():
    """torch.library.opcheck: schema, fake tensors (shapes and strides) against the real ops, autograd
    registration, AOT dispatch; on transposed inputs with GQA and a padding mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (t.detach() for t in make_qkv(2, 4, 2, 6, 16, torch.float32, "bshd", g, DEVICE))
    pad = make_padding("empty_row", 2, 6, g).to(DEVICE)
    torch.library.opcheck(torch.ops.fxopt.flash_attention.default,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.5, True, 2, 3.0, pad))
    out, lse, _ = torch.ops.fxopt.flash_attention(q, k, v, 0.5, True, 2, 3.0, pad)
    do = torch.randn(2, 4, 6, 16, generator=g).to(DEVICE)
    torch.library.opcheck(torch.ops.fxopt.flash_attention_backward.default,
                          (do, q.detach(), k.detach(), v.detach(), out.detach(), lse, 0.5, True, 2, 3.0, pad))
    mask = make_mask("packed", 2, 6, g).to(DEVICE)
    torch.library.opcheck(torch.ops.fxopt.flash_attention.default,
                          (q, k, v, 0.5, False, 0, 0.0, None, mask))
    out, lse, summary = torch.ops.fxopt.flash_attention(q, k, v, 0.5, False, 0, 0.0, None, mask)
    assert summary.shape == (10, 2, 6) and summary.dtype == torch.int32  # [10, Bm, S]: ceil(6 / 16) = 1 column used
    if ak._use_triton(q, k, v):  # the summary in its first column, zeros after it
        assert torch.equal(summary[..., :1].cpu(), ak._mask_summary(mask.cpu())) and not summary[..., 1:].any()
    torch.library.opcheck(torch.ops.fxopt.flash_attention_backward.default,
                          (do, q.detach(), k.detach(), v.detach(), out.detach(), lse, 0.5, False, 0, 0.0, None, mask, summary))


def test_fake_shapes_and_strides():
    """Outputs are [B, H, S, D] views of [B, S, H, D] buffers, on the real op and its fake alike."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def layout(t):
        return tuple(t.shape), t.stride(), t.dtype

    q, k = torch.randn(2, 4, 5, 24, dtype=torch.float16), torch.randn(2, 2, 5, 24, dtype=torch.float16)
    real = [layout(t) for t in torch.ops.fxopt.flash_attention(q, k, k, 0.5, True, 0, 0.0, None)]
    with FakeTensorMode() as mode:
        fq, fk = mode.from_tensor(q), mode.from_tensor(k)
        fake = [layout(t) for t in torch.ops.fxopt.flash_attention(fq, fk, fk, 0.5, True, 0, 0.0, None)]
    assert real == fake == [((2, 4, 5, 24), (480, 24, 96, 1), torch.float16), ((2, 4, 5), (20, 5, 1), torch.float32),
                            ((0,), (1,), torch.int32)]


# --------------------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 80, 128, 256])
@pytest.mark.parametrize("S", [1, 127, 1000])
def test_bf16_gpu(D, S):
    cases = [dict(causal=True), dict(causal=False), dict(causal=True, window=100, padding="left"),
             dict(causal=True, softcap=50.0, padding="random")]
    for i, kw in enumerate(cases):
        run_case(2, 8, 2, S, D, torch.bfloat16, layout="bshd", seed=i, device="cuda", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_bf16_gpu_autotuned(D, autotuned):
    """The autotuned configs (Hopper-sized tiles, several warps and stages), as training runs them."""
    run_case(2, 32, 8, 1000, D, torch.bfloat16, causal=True, layout="bshd", device="cuda")
    run_case(1, 8, 8, 777, D, torch.bfloat16, causal=True, window=128, softcap=30.0, padding="right",
             layout="fused", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("mask", MASKS)
def test_dense_mask_gpu_autotuned(mask, autotuned):
    """Dense masks with the autotuned (large) tiles: BLOCK_M up to 128 reads 8 strips of the summary."""
    run_case(2, 8, 2, 1000, 64, torch.bfloat16, layout="bshd", device="cuda", mask=mask)
    run_case(1, 4, 4, 333, 128, torch.float16, layout="fused", device="cuda", mask=mask, seed=1)


@pytest.mark.gpu
@pytest.mark.parametrize("mask", ["causal_left_pad", "window", "random"])
def test_additive_mask_gpu_autotuned(mask, autotuned):
    """HF's eager mask (0 / bf16's minimum) and a random additive bias, bf16, with a softcap: the autotuned
    tiles on the GPU (the CPU tests run the interpreter's)."""
    g = torch.Generator().manual_seed(2)
    m = make_mask(mask, 2, 1000, g)
    run_case(2, 8, 2, 1000, 64, torch.bfloat16, layout="bshd", device="cuda", mask=as_additive(m, torch.bfloat16))
    run_case(2, 8, 2, 1000, 64, torch.bfloat16, layout="bshd", device="cuda", softcap=50.0, seed=1,
             mask=as_additive(m, torch.bfloat16, True, g))


@pytest.mark.gpu
def test_dense_causal_mask_equals_causal_flag_gpu(autotuned):
    g = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(2, 32, 8, 2048, 64, torch.bfloat16, "bshd", g, "cuda")
    mask = make_mask("causal", 2, 2048, g).to("cuda")
    a = flash_attention_fn(q, k, v, causal=True)
    b = flash_attention_fn(q, k, v, mask=mask)
    assert rel(a, b) < 1e-6  # the same tiles summed; tuning may pick another block size for each


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp32_fp16_gpu(dtype):
    run_case(2, 4, 1, 300, 80, dtype, True, 0, 0.0, "empty_row", "d_strided", device="cuda")
    run_case(1, 4, 2, 257, 128, dtype, True, 64, 20.0, "left", "fused", device="cuda")


@pytest.mark.gpu
def test_matches_sdpa_flash_gpu(autotuned):
    """Against SDPA's flash kernel (enable_gqa, causal) in bf16: both are within bf16 rounding of each other."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 2048, 32, 64, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(2, 2048, 8, 64, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
            for _ in range(2))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel(flash_attention_fn(q, k, v, causal=True), want) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_fp32_realistic_gpu():
    """fp32 attention at the QLoRA workload's head layout and length (32/8 heads of 64, 2048 causal): the
    tf32x3 products on CUDA (see attention._fp32_precision) must stay within fp32's tolerance, output and
    every gradient."""
    run_case(1, 32, 8, 2048, 64, torch.float32, True, device="cuda")


def test_backward_reuses_the_forward_mask_summary(monkeypatch):
    """The forward returns its mask summary and the backward's kernels use it: the mask is summarised once per
    forward + backward, not again in the backward (the gradients stay right: run_case's comparison)."""
    calls = []
    real = ak._summarise
    monkeypatch.setattr(ak, "_summarise", lambda mask: calls.append(1) or real(mask))
    g = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(1, 2, 1, 20, 16, torch.float32, "bshd", g, DEVICE)
    mask = make_mask("packed", 1, 20, g).to(DEVICE)
    if not ak._use_triton(q, k, v):
        pytest.skip("the torch math needs no summary")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_attention_fn(q, k, v, mask=mask)
    assert len(calls) == 1
    out.backward(torch.randn_like(out))
    assert len(calls) == 1 and q.grad is not None and torch.isfinite(q.grad).all()


def test_pruner_keeps_the_first_fitting_config(monkeypatch):
    """Head dims up to 128: only the list's first config, at S 2048 and 8192 alike (the autotuner chose a slower
    dQ at S 8192 on the H100); wider heads: every config that fits, the fallback last one dropped."""
    if not hasattr(ak, "_pruner"):
        pytest.skip("no Triton")
    monkeypatch.setattr(ak, "shared_memory_limit", lambda q: 232448)  # the H100's
    q = torch.empty(1, dtype=torch.bfloat16)
    for kernel in ("fwd", "dq", "dkdv"):
        narrow = ak._configs(ak._CONFIGS[(kernel, False)])
        for s_bucket in (2048, 8192):
            assert ak._pruner(kernel)(narrow, {"Q": q, "S_BUCKET": s_bucket}, BLOCK_D=64) == narrow[:1]
        wide = ak._configs(ak._CONFIGS[(kernel, True)])
        kept = ak._pruner(kernel)(wide, {"Q": q, "S_BUCKET": 8192}, BLOCK_D=256)
        assert len(kept) > 1 and kept == wide[:len(kept)] and wide[-1] not in kept
