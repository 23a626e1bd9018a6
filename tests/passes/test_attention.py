"""The attention pass on tiny real HF models (sdpa attention): every SDPA call matched (repeat_kv looked
through, HF's bool mask taken as it is), loss and gradients equal the unoptimized model's with causal,
padded, sliding-window and packed masks; eager attention (HF's additive mask, Gemma 2's logit softcap)
matched the same way; near-misses (dropout, per-head masks, a KV cache, eager attention whose probabilities are
returned) left to PyTorch and reported."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config

import fxopt
from fxopt.passes import pass_names
from tests.kernels.numerics import rel
from tests.kernels.test_attention import make_mask
from tests.models import (
    COMMON, TARGETS, assert_no_less_accurate, assert_no_recompile, assert_same_training, batch, rel_err,
    tiny_lora_model, twin, with_lora)

torch._dynamo.config.cache_size_limit = 64
LAYERS = COMMON["num_hidden_layers"]
OTHERS = [p for p in pass_names() if p != "attention"]  # the other passes' interpreted kernels are slow here
EXTRA = {  # families beyond tests/models.py: Gemma 3 (sliding-window layers, q/k norms), Phi-3 (fused qkv)
    "gemma3": lambda: Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8),
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=16, sliding_window=8),  # logit softcap 50 (its default)
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0),
    "mistral_window": lambda: MistralConfig(**COMMON, sliding_window=8),
}


def model_of(family, dtype=torch.float32, attn="sdpa", **cfg):
    if family not in EXTRA:
        return tiny_lora_model(family, dtype=dtype, attn=attn)
    torch.manual_seed(0)
    config = EXTRA[family]()
    for k, v in cfg.items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    return with_lora(model, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if family == "phi3" else TARGETS)


def padded_batch(seq=40, left=True):
    b = batch(seq=seq)
    mask = torch.ones_like(b["input_ids"])
    if left:
        mask[0, :7] = 0
    else:
        mask[1, -9:] = 0
    b["attention_mask"] = mask
    b["labels"] = b["labels"].masked_fill(mask == 0, -100)
    return b


def compare(model, b, **opts):
    ref = twin(model)
    fxopt.optimize(model, **{"inner_backend": "aot_eager", "disable": OTHERS, **opts})
    assert_same_training(model, ref, b)
    return fxopt.report(model)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen2", "gemma3", "phi3", "mistral_window"])
def test_every_attention_matched_and_equal(family):
    """Whole-model graph: one match per layer; left padding (rows that see no key: their loss is ignored)."""
    report = compare(model_of(family), padded_batch(), regional=False)
    matched = report.matched("attention")
    assert len(matched) == LAYERS and not report.rejected("attention"), report.records
    assert all("bool mask" in r.reason for r in matched)
    if family != "phi3":  # Phi-3's repeat_kv is the same code; its 4/2 heads are looked through as well
        assert all("repeat_kv looked through" in r.reason for r in matched)


@pytest.mark.parametrize("family", ["llama", "mistral_window"])
def test_regional_with_right_padding(family):
    """The default (one compiled block reused by every layer): matched once for the shared block graph."""
    report = compare(model_of(family), padded_batch(left=False))
    matched = report.matched("attention")
    assert matched and all(".*." in r.location for r in matched) and not report.rejected("attention")


def test_packed_sequences_and_new_lengths():
    """Packed sequences (position_ids restarting per sequence: HF masks them apart) and lengths that change
    (the mask is a runtime input: no pass guard on its values, no recompile after the first dynamic one)."""
    model = model_of("llama")
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager", disable=OTHERS)
    b = batch(seq=37)
    b["position_ids"] = torch.cat([torch.arange(20), torch.arange(17)]).expand(2, -1)
    ref.config.use_cache = False  # optimize sets it on the optimized model; HF then masks packed rows apart
    assert_same_training(model, ref, b)
    assert_no_recompile(model)
    assert fxopt.report(model).matched("attention")


def test_bf16_no_less_accurate():
    model = model_of("qwen3", dtype=torch.bfloat16)
    eager, ref32 = twin(model), twin(model).float()
    fxopt.optimize(model, inner_backend="aot_eager", disable=OTHERS)
    assert_no_less_accurate(model, eager, ref32, padded_batch())
    assert fxopt.report(model).matched("attention")


def test_inductor_all_passes():
    """Every pass on, Inductor: the attention op beside the fused LoRA linears, norms and loss."""
    model = model_of("llama")
    ref = twin(model)
    fxopt.optimize(model)
    assert_same_training(model, ref, padded_batch())
    report = fxopt.report(model)
    assert report.matched("attention") and report.matched("lora")


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "mistral_window"])
def test_eager_attention_matched_and_equal(family):
    """attn_implementation="eager" (matmul, scale, [softcap], + HF's additive mask, softmax in fp32, matmul):
    one match per layer, the float mask taken as an additive bias, right padding, loss and gradients equal;
    Gemma 2's logit softcap (50) goes into the op, its sliding-window layers through their masks."""
    report = compare(model_of(family, attn="eager"), padded_batch(left=False), regional=False)
    matched = report.matched("attention")
    assert len(matched) == LAYERS and not report.rejected("attention"), report.records
    assert all("from eager attention, torch.float32 mask" in r.reason for r in matched)
    assert all(r.location.endswith("self_attn") for r in matched)
    if family == "gemma2":
        assert all("softcap 50" in r.reason for r in matched)


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # Gemma 2 has no sdpa attention to compare with
def test_eager_left_padding_gives_sdpas_result(family):
    """Left padding: the padded queries see no key. There HF's eager softmax spreads each such row evenly over
    every key, future ones included (the mask adds the dtype's minimum to all of them), SDPA gives 0, and so
    does the op. The last padded position's output predicts the first real token, so the loss reads it: the
    optimized eager model trains exactly as the unoptimized SDPA model does."""
    model = model_of(family, attn="eager")
    sdpa = model_of(family, attn="sdpa")  # same seed: the same weights
    fxopt.optimize(model, inner_backend="aot_eager", disable=OTHERS, regional=False)
    assert_same_training(model, sdpa, padded_batch())
    assert len(fxopt.report(model).matched("attention")) == LAYERS


def test_eager_attention_bf16_no_less_accurate():
    model = model_of("gemma2", dtype=torch.bfloat16, attn="eager")
    eager, ref32 = twin(model), twin(model).float()
    fxopt.optimize(model, inner_backend="aot_eager", disable=OTHERS, regional=False)
    assert_no_less_accurate(model, eager, ref32, padded_batch(left=False))
    assert len(fxopt.report(model).matched("attention")) == LAYERS


def test_eager_attention_returning_probabilities_is_left_alone():
    """output_attentions=True returns the probabilities, which a fused kernel never forms: not matched, and
    the report says why; the model still trains as before."""
    b = dict(padded_batch(), output_attentions=True)
    report = compare(model_of("llama", attn="eager"), b, regional=False)
    assert not report.matched("attention")
    rejected = report.rejected("attention")
    assert len(rejected) == LAYERS and all("output_attentions" in r.reason for r in rejected), rejected


def test_disable():
    report = compare(model_of("llama"), padded_batch(), disable=pass_names())
    assert not report.matched("attention") and not report.rejected("attention")


def test_generate_with_kv_cache():
    """generate() with a KV cache gives the unoptimized model's tokens (a query of length 1 against cached
    keys is not matched: see the "decode" near-miss below)."""
    model = model_of("llama").eval()
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager", disable=OTHERS)
    ids = batch(seq=8)["input_ids"]
    with torch.no_grad():
        got = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=True)
        want = ref.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(got, want)


class Attn(nn.Module):
    """SDPA calls that must match, and near-misses that must not."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant

    def forward(self, q, k, v, mask):
        kw = dict(attn_mask=mask) if mask is not None else {}
        if self.variant == "dropout":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, **kw)
        if self.variant == "gqa":
            return F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True, scale=0.3, **kw)
        if self.variant == "multi_query":  # one kv head broadcast by SDPA itself (Falcon), no enable_gqa
            return F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], **kw)
        if self.variant == "decode":  # one new query against the cached keys
            return F.scaled_dot_product_attention(q[:, :, -1:], k, v)
        if self.variant == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, **kw)


S = 21
CAUSAL = torch.ones(S, S, dtype=torch.bool).tril()
NEAR = {  # variant, mask: (matched, reason of the rejection)
    ("plain", "bool"): (1, None),
    ("plain", "none"): (1, None),
    ("gqa", "bool"): (1, None),
    ("multi_query", "bool"): (1, None),
    ("multi_query", "none"): (1, None),
    ("causal", "none"): (1, None),
    ("dropout", "none"): (0, "dropout"),
    ("decode", "none"): (0, "lengths not known equal"),
    ("plain", "additive"): (1, None),  # an ALiBi-like bias, added by the kernels
    ("plain", "additive_inf"): (1, None),  # a bool mask as 0 / -inf
    ("plain", "per_head"): (0, "one mask for all heads"),
    ("plain", "2d"): (0, "[B or 1, 1, S, S]"),
}


def _mask(kind, B=2, H=4):
    if kind == "bool":
        return CAUSAL[None, None].expand(B, 1, S, S) & (torch.rand(B, 1, 1, S) < 0.8)
    if kind == "additive":  # an ALiBi-like bias: dropping it would be wrong
        return -0.1 * (torch.arange(S)[:, None] - torch.arange(S)[None, :]).abs().float()[None, None]
    if kind == "additive_inf":
        return torch.zeros(S, S).masked_fill(~CAUSAL, float("-inf"))[None, None]
    if kind == "per_head":
        return torch.rand(B, H, S, S) < 0.7
    if kind == "2d":
        return CAUSAL
    return None


@pytest.mark.parametrize("variant,mask", sorted(NEAR))
def test_match_or_leave_alone(variant, mask):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, S, 16, requires_grad=True) for _ in range(3))
    m = _mask(mask)
    report = fxopt.Report()
    mod = Attn(variant)
    compiled = torch.compile(mod, backend=fxopt.make_backend(fxopt.OptimizeConfig(inner_backend="aot_eager"), report))
    torch.manual_seed(1)
    out = compiled(q, k, v, m)
    matched, reason = NEAR[(variant, mask)]
    assert len(report.matched("attention")) == matched, report.records
    if reason:
        assert reason in report.rejected("attention")[0].reason
    if variant != "dropout":
        ref = mod(q, k, v, m)
        assert rel_err(out, ref) < 1e-5
        g = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            assert rel_err(a, b) < 1e-5
    torch._dynamo.reset()


class HFLikeAttention(nn.Module):
    """HF's sdpa attention: repeat_kv'd K/V (or enable_gqa), the model's bool mask, a scale."""

    def __init__(self, n_rep, gqa_flag, scale):
        super().__init__()
        self.n_rep, self.gqa_flag, self.scale = n_rep, gqa_flag, scale

    def forward(self, q, k, v, mask):
        if self.gqa_flag:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        B, H, S, D = k.shape
        k = k[:, :, None, :, :].expand(B, H, self.n_rep, S, D).reshape(B, H * self.n_rep, S, D)
        v = v[:, :, None, :, :].expand(B, H, self.n_rep, S, D).reshape(B, H * self.n_rep, S, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), hkv=st.sampled_from([1, 2]), n_rep=st.sampled_from([1, 2, 4]),
       S=st.integers(1, 40), D=st.sampled_from([8, 16, 24]), gqa_flag=st.booleans(),
       mask=st.sampled_from(["causal", "causal_left_pad", "window", "packed", "random", "none"]),
       scale=st.sampled_from([None, 0.3]), seed=st.integers(0, 2**16))
def test_random_sdpa_calls_match_and_equal(B, hkv, n_rep, S, D, gqa_flag, mask, scale, seed):
    """Random shapes, GQA ratios and HF mask kinds: matched once, output and q/k/v gradients equal SDPA's."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hkv * n_rep, S, D, generator=g, requires_grad=True)
    k, v = (torch.randn(B, hkv, S, D, generator=g, requires_grad=True) for _ in range(2))
    m = None if mask == "none" else make_mask(mask, B, S, g)
    mod = HFLikeAttention(n_rep, gqa_flag, scale)
    report = fxopt.Report()
    compiled = torch.compile(mod, backend=fxopt.make_backend(fxopt.OptimizeConfig(inner_backend="aot_eager"), report))
    out, ref = compiled(q, k, v, m), mod(q, k, v, m)
    assert len(report.matched("attention")) == 1, report.records
    # rows that see no key: SDPA's math gives 0 on torch >= 2.5, as the op does
    assert rel_err(out, ref) < 1e-5
    do = torch.randn(ref.shape, generator=g)
    # dq and dk cancel to ~0 where a row sees one key (S = 1, or a mask row with one visible key): there they
    # are known only relative to the terms they sum, of the size of dO (q, k, v are unit normal): floor 0.1|dO|
    floor = 0.1 * do.norm().item()
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        assert rel(a, b, floor) < 1e-5


@pytest.mark.parametrize("model_type", ["granite", "cohere", "olmo2", "olmo3", "starcoder2", "stablelm", "gpt_neox",
                                        "phi", "glm", "smollm3", "exaone4"])
def test_families_no_test_above_names(model_type):
    """Decoder families beyond the named ones (built from their config classes, full fine-tuning): every
    layer's attention matched, loss and every gradient equal. No file of fxopt names any of them."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, pad_token_id=0, **COMMON)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    report = compare(model, batch(seq=24), regional=False)
    assert len(report.matched("attention")) == LAYERS and not report.rejected("attention"), report.records
