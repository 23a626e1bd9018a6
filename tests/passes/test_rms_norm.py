"""The RMSNorm pass on tiny real HF models (with and without PEFT LoRA): what it matches (count, residual adds
folded), what it must not (near-misses, reported), equal loss and gradients, and no recompile when the
sequence length changes."""
import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

import fxopt
from fxopt.passes import pass_names
from fxopt.kernels import rms_norm as rms_kernels  # noqa: F401
from tests.models import (
    COMMON, FAMILIES, TARGETS, assert_no_less_accurate, assert_no_recompile, assert_same_training, batch, rel_err,
    tiny_lora_model, twin)

torch._dynamo.config.cache_size_limit = 64

# Gemma families here (not in tests/models.py): RMSNorm as (n * (1 + w.float())).type_as(x), four norms
# per layer, q/k norms for Gemma3. Gemma2 has no sdpa attention in transformers.
GEMMA = {
    "gemma2": (lambda: Gemma2Config(**COMMON, head_dim=16), "eager"),
    "gemma3": (lambda: Gemma3TextConfig(**COMMON, head_dim=16), "sdpa"),
}
# RMSNorms per decoder layer: input/post-attention (+ q/k norms, + Gemma's pre/post-feedforward)
NORMS_PER_LAYER = {"llama": 2, "mistral": 2, "qwen2": 2, "qwen3": 4, "gemma2": 4, "gemma3": 6}
LAYERS = COMMON["num_hidden_layers"]


def tiny_model(family, lora=True, dtype=torch.float32, seed=0):
    """A tiny model of any family above; with lora, PEFT LoRA on every projection (B randomised)."""
    if family not in GEMMA:
        if lora:
            return tiny_lora_model(family, dtype=dtype, seed=seed)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation="sdpa", dtype=dtype)
    else:
        torch.manual_seed(seed)
        cfg, attn = GEMMA[family]
        model = AutoModelForCausalLM.from_config(cfg(), attn_implementation=attn, dtype=dtype)
        if lora:
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():  # norm weights start at 1 (or 0 for Gemma): randomise them so that they matter
        for name, p in model.named_parameters():
            if "norm" in name or "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _compare(model, b=None, **opts):
    ref = twin(model)
    fxopt.optimize(model, **{"inner_backend": "aot_eager", **opts})
    assert_same_training(model, ref, b or batch())
    return fxopt.report(model)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen2", "gemma2", "gemma3"])
def test_every_norm_matched_with_lora(family):
    report = _compare(tiny_model(family), regional=False)
    matched = report.matched("rms_norm")
    assert len(matched) == len({r.location for r in matched}) == NORMS_PER_LAYER[family] * LAYERS + 1
    assert not report.rejected("rms_norm")
    # whole-model graph: every residual add that feeds a norm and the next residual add is folded: one
    # inside each layer, and each layer's output into the next layer's input norm; the last layer's
    # output feeds only the final norm (not folded)
    folded = [r.location for r in matched if "residual add folded" in r.reason]
    assert len(folded) == 2 * LAYERS - 1
    assert not any(r.location.endswith("model.norm") for r in matched if r.location in folded)
    variant = "scale_then_cast, offset=1" if family.startswith("gemma") else "cast_then_scale"
    assert all(variant in r.reason for r in matched)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_full_finetune_norm_weight_grads(family):
    """Without LoRA the norm weights train: their gradients (the kernel's dweight) equal eager's."""
    model = tiny_model(family, lora=False)
    report = _compare(model)
    n_blocks = NORMS_PER_LAYER[family] + 1  # regional: one block graph (rows "layers.*") + the final norm
    assert len(report.matched("rms_norm")) == n_blocks
    assert any(".*." in r.location for r in report.matched("rms_norm"))


def test_bf16_model():
    model = tiny_model("llama", dtype=torch.bfloat16)
    eager, ref32 = twin(model), twin(model).float()
    fxopt.optimize(model, inner_backend="aot_eager")
    assert_no_less_accurate(model, eager, ref32, batch())
    report = fxopt.report(model)
    assert len(report.matched("rms_norm")) == 3
    assert all("cast_then_scale" in r.reason for r in report.matched("rms_norm"))


def test_inductor_end_to_end():
    model = tiny_model("qwen3")
    report = _compare(model, inner_backend="inductor")
    assert len(report.matched("rms_norm")) == NORMS_PER_LAYER["qwen3"] + 1


def test_op_in_graph_and_disable(tmp_path):
    model = tiny_model("llama")
    fxopt.optimize(model, inner_backend="aot_eager", dump_dir=str(tmp_path))
    model(**batch()).loss.backward()
    after = "".join(p.read_text() for p in tmp_path.glob("*.after.py"))
    assert after.count("fxopt.rms_norm") >= 3 and "rsqrt" not in after

    report = _compare(tiny_model("llama"), disable=["rms_norm"])
    assert not report.matched("rms_norm") and not report.rejected("rms_norm")


def test_no_recompile_when_sequence_length_changes():
    model = tiny_model("qwen3")
    # the other passes off: this is about the norm pass's guards, and their interpreted kernels are slow
    fxopt.optimize(model, inner_backend="aot_eager", disable=[p for p in pass_names() if p != "rms_norm"])
    assert_no_recompile(model, (16, 24, 32, 17, 40, 9))
    assert fxopt.report(model).matched("rms_norm")


def _rstd(h, dim=-1, keepdim=True):
    return torch.rsqrt(h.pow(2).mean(dim, keepdim=keepdim) + 1e-6)


class NormLike(nn.Module):
    """RMSNorm-shaped code that must match, and near-misses that must not (x fp32 or fp16)."""

    def __init__(self, variant, n=24):
        super().__init__()
        self.variant = variant
        self.w = nn.Parameter(1 + 0.1 * torch.randn(n))
        self.w_col = nn.Parameter(1 + 0.1 * torch.randn(n, 1))

    def forward(self, x, r):
        v, w = self.variant, self.w
        h = x.to(torch.float32)
        if v == "llama":
            return w * (h * _rstd(h)).to(x.dtype)
        if v == "square_eps_left_div_sqrt":
            return w * (h / torch.sqrt(1e-5 + torch.mean(h * h, dim=-1, keepdim=True))).to(x.dtype)
        if v == "gemma_offset":
            h = x.float()
            h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6)
            return (h * (1.0 + w.float())).type_as(x)
        if v == "no_offset_scale_then_cast":
            return (h * _rstd(h) * w).to(x.dtype)
        if v == "computed_weight":  # (1 + w) is just the weight tensor the op multiplies by
            return (1 + w) * (h * _rstd(h)).to(x.dtype)
        if v == "residual":
            s = x + r
            hs = s.float()
            return (w * (hs * _rstd(hs)).to(s.dtype)) * s  # s used again after the norm (next residual)
        if v == "residual_read_once":  # the sum feeds only the norm: the norm matches, the add stays
            s = x + r
            hs = s.float()
            return w * (hs * _rstd(hs)).to(s.dtype)
        if v == "residual_broadcast":  # r[0] broadcasts: the norm matches, the add is not folded
            s = x + r[0]
            hs = s.float()
            return w * (hs * _rstd(hs)).to(s.dtype)
        if v == "normalised_used_elsewhere":
            n = h * _rstd(h)
            return w * n.to(x.dtype) + n.sum()
        if v == "rstd_used_elsewhere":
            rs = _rstd(h)
            return w * (h * rs).to(x.dtype) + rs
        if v == "mean_not_last_dim":
            return w * (h * _rstd(h, dim=0)).to(x.dtype)
        if v == "no_keepdim":
            return w * (h * _rstd(h, keepdim=False).unsqueeze(-1)).to(x.dtype)
        if v == "weight_not_1d":  # a [n, 1] weight on a square input is not a per-feature scale
            return self.w_col * (h * _rstd(h)).to(x.dtype)
        if v == "half_precision_norm":  # normalised in fp16 itself: not the kernel's fp32 math
            xh = x.half()
            return (w.half() * (xh * torch.rsqrt(xh.pow(2).mean(-1, keepdim=True) + 1e-3))).float()
        raise ValueError(v)


CASES = {  # variant: (matched, rejected, folded)
    "llama": (1, 0, 0),
    "square_eps_left_div_sqrt": (1, 0, 0),
    "gemma_offset": (1, 0, 0),
    "no_offset_scale_then_cast": (1, 0, 0),
    "computed_weight": (1, 0, 0),
    "residual": (1, 0, 1),
    "residual_read_once": (1, 0, 0),
    "residual_broadcast": (1, 0, 0),
    "normalised_used_elsewhere": (0, 1, 0),
    "rstd_used_elsewhere": (0, 1, 0),
    "mean_not_last_dim": (0, 1, 0),
    "no_keepdim": (0, 1, 0),
    "weight_not_1d": (0, 1, 0),
    "half_precision_norm": (0, 1, 0),
}


@pytest.mark.parametrize("variant", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_match_or_leave_alone(variant, dtype):
    torch.manual_seed(0)
    n = 24
    mod = NormLike(variant, n)
    if variant == "weight_not_1d":  # the [24, 1] weight broadcasts over a square [24, 24] input
        x = torch.randn(24, n, dtype=dtype, requires_grad=True)
    else:
        x = torch.randn(2, 5, n, dtype=dtype, requires_grad=True)
    r = torch.randn(x.shape, dtype=dtype, requires_grad=True)
    report = fxopt.Report()
    compiled = torch.compile(mod, backend=fxopt.make_backend(fxopt.OptimizeConfig(inner_backend="aot_eager"), report))
    out = compiled(x, r)
    ref = mod(x, r)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert out.dtype == ref.dtype and rel_err(out, ref) < tol
    g = torch.randn_like(ref)
    leaves = [x, r, mod.w, mod.w_col]
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, leaves, g, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < tol
    matched, rejected, folded = CASES[variant]
    recs = report.matched("rms_norm"), report.rejected("rms_norm")
    assert (len(recs[0]), len(recs[1])) == (matched, rejected), report.records
    assert sum("residual add folded" in m.reason for m in recs[0]) == folded
    torch._dynamo.reset()


def test_rejection_reasons():
    report = fxopt.Report()
    backend = fxopt.make_backend(fxopt.OptimizeConfig(inner_backend="aot_eager"), report)
    x = torch.randn(3, 24)
    reasons = {}
    for v in ("normalised_used_elsewhere", "mean_not_last_dim", "half_precision_norm"):
        torch._dynamo.reset()
        report.records.clear()
        torch.compile(NormLike(v), backend=backend)(x, x)
        reasons[v] = report.rejected("rms_norm")[0].reason
    assert "used elsewhere" in reasons["normalised_used_elsewhere"]
    assert "not the last dimension" in reasons["mean_not_last_dim"]
    assert "not in fp32" in reasons["half_precision_norm"]
