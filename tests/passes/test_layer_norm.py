"""The LayerNorm pass on tiny real HF models of LayerNorm families (with PEFT LoRA, and without it so that the
norm weights and biases train): what it matches (count, residual adds folded), what it must not (near-misses,
reported), equal loss and gradients, and no recompile when the sequence length changes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import fxopt
from fxopt.passes import pass_names
from tests.models import COMMON, assert_no_less_accurate, assert_no_recompile, assert_same_training, batch, rel_err
from tests.models import twin, with_lora

torch._dynamo.config.cache_size_limit = 64

# model_type: (LayerNorms per decoder layer, of them folded with the residual add before them, affine).
# StableLM / StarCoder2: pre-norm blocks, the post-attention norm reads the first residual sum (folded).
# GPT-NeoX: parallel residual, both norms read the block input (nothing to fold). OLMo: no weight or bias.
# Cohere: one norm per (parallel) block, written out in fp32 with a weight and no bias.
LN_FAMILIES = {"stablelm": (2, 1, "weight + bias"), "starcoder2": (2, 1, "weight + bias"),
               "gpt_neox": (2, 0, "weight + bias"), "olmo": (2, 1, "no affine"),
               "cohere": (1, 0, "(written out), weight,")}


def tiny_model(model_type, lora=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, pad_token_id=0, **COMMON)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    with torch.no_grad():  # LayerNorm weights start at 1 and biases at 0: randomise them so that they matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return with_lora(model, target_modules="all-linear") if lora else model


def _compare(model, b=None, **opts):
    ref = twin(model)
    fxopt.optimize(model, **{"inner_backend": "aot_eager", **opts})
    assert_same_training(model, ref, b or batch(seq=24))
    return fxopt.report(model)


@pytest.mark.parametrize("model_type", sorted(LN_FAMILIES))
def test_every_block_norm_matched(model_type):
    per_layer, folded, affine = LN_FAMILIES[model_type]
    report = _compare(tiny_model(model_type))
    block = [r for r in report.matched("layer_norm") if ".layers.*." in r.location]  # regional: one block graph
    assert len(block) == len({r.location for r in block}) == per_layer, report.records
    assert sum("residual add folded" in r.reason for r in block) == folded
    assert all(affine in r.reason for r in block)
    assert not report.rejected("layer_norm")


def test_full_finetune_weight_and_bias_grads():
    """Without LoRA the norm weights and biases train: their gradients (the kernel's dweight, dbias) equal
    eager's."""
    report = _compare(tiny_model("stablelm", lora=False))
    assert len([r for r in report.matched("layer_norm") if ".layers.*." in r.location]) == 2


def test_whole_model_graph():
    """One graph for the whole model: every block's norms, and the residual sums across block boundaries folded
    (each layer's output feeds the next layer's input norm and its residual add)."""
    report = _compare(tiny_model("starcoder2"), regional=False)
    layers = COMMON["num_hidden_layers"]
    matched = report.matched("layer_norm")
    assert len(matched) == 2 * layers + 1  # + the final norm
    assert sum("residual add folded" in r.reason for r in matched) == 2 * layers - 1


def test_bf16_model():
    model = tiny_model("stablelm", dtype=torch.bfloat16)
    eager, ref32 = twin(model), twin(model).float()
    fxopt.optimize(model, inner_backend="aot_eager")
    assert_no_less_accurate(model, eager, ref32, batch(seq=24))
    assert len(fxopt.report(model).matched("layer_norm")) >= 2


def test_op_in_graph_and_disable(tmp_path):
    model = tiny_model("stablelm")
    fxopt.optimize(model, inner_backend="aot_eager", dump_dir=str(tmp_path))
    model(**batch()).loss.backward()
    after = "".join(p.read_text() for p in tmp_path.glob("*.after.py"))
    assert after.count("fxopt.layer_norm") >= 2 and "functional.layer_norm" not in after

    report = _compare(tiny_model("stablelm"), disable=["layer_norm"])
    assert not report.matched("layer_norm") and not report.rejected("layer_norm")


def test_no_recompile_when_sequence_length_changes():
    model = tiny_model("stablelm")
    fxopt.optimize(model, inner_backend="aot_eager", disable=[p for p in pass_names() if p != "layer_norm"])
    assert_no_recompile(model, (16, 24, 32, 17, 40, 9))
    assert fxopt.report(model).matched("layer_norm")


class LayerNormLike(nn.Module):
    """LayerNorm calls that must match, and near-misses that must not."""

    def __init__(self, variant, n=24):
        super().__init__()
        self.variant = variant
        self.ln = nn.LayerNorm(n)
        self.ln2d = nn.LayerNorm((5, n))
        self.w32 = nn.Parameter(1 + 0.1 * torch.randn(n))
        self.b32 = nn.Parameter(0.1 * torch.randn(n))
        with torch.no_grad():
            self.ln.weight.add_(0.1 * torch.randn(n))
            self.ln.bias.add_(0.1 * torch.randn(n))

    def forward(self, x, r):
        v, n = self.variant, x.shape[-1]
        if v == "module":
            return self.ln(x.float()).to(x.dtype)
        if v == "functional_no_affine":
            return F.layer_norm(x, (n,), eps=1e-6)
        if v == "fp32_params":  # a half input with fp32 weight and bias, as F.layer_norm allows
            return F.layer_norm(x, (n,), self.w32, self.b32, 1e-5)
        if v == "weight_only":
            return F.layer_norm(x, (n,), self.w32.to(x.dtype), None, 1e-5)
        if v == "residual":
            s = x + r
            return F.layer_norm(s, (n,), self.w32, self.b32) * s  # s used again after the norm
        if v == "residual_read_once":  # the sum feeds only the norm: the norm matches, the add stays
            return F.layer_norm(x + r, (n,), self.w32, self.b32)
        if v == "two_dims":  # normalised over the last two dimensions: not the op's per-row statistics
            return F.layer_norm(x, (5, n), self.ln2d.weight.to(x.dtype), self.ln2d.bias.to(x.dtype))
        if v == "half_precision_norm":  # a half-precision input cast down first: still F.layer_norm, matches
            return F.layer_norm(x.half(), (n,)).to(x.dtype)
        # written out (as Cohere does): statistics in fp32, weight (and bias) applied in fp32, cast back
        h = x.to(torch.float32)
        mu = h.mean(-1, keepdim=True)
        if v == "written_out":
            var = (h - mu).pow(2).mean(-1, keepdim=True)
            return (self.w32.to(torch.float32) * ((h - mu) * torch.rsqrt(var + 1e-5))).to(x.dtype)
        if v == "written_out_bias_one_deviation":
            d = h - mu
            return ((d * torch.rsqrt((d * d).mean(-1, keepdim=True) + 1e-6)) * self.w32 + self.b32).to(x.dtype)
        if v == "written_out_no_affine":
            d = h - mu
            return (d * torch.rsqrt(d.square().mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        if v == "written_out_residual":
            s = x + r
            hs = s.float()
            d = hs - hs.mean(-1, keepdim=True)
            return (d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + 1e-5) * self.w32).to(x.dtype) * s
        if v == "written_out_times_input":  # no affine: the product with the input is not a weight (fuzz-found)
            d = h - mu
            return (d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * x
        if v == "written_out_mean_used_elsewhere":
            d = h - mu
            return (d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) + mu.to(x.dtype)
        if v == "written_out_mean_not_last_dim":
            mu0 = h.mean(0, keepdim=True)
            d = h - mu0
            return (d * torch.rsqrt(d.pow(2).mean(0, keepdim=True) + 1e-5)).to(x.dtype)
        if v == "written_out_half_precision":  # statistics in x's own (half) dtype: not the op's fp32 math
            xh = x.half()
            d = xh - xh.mean(-1, keepdim=True)
            return (d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + 1e-3)).to(x.dtype)
        raise ValueError(v)


CASES = {  # variant: (matched, rejected, folded)
    "module": (1, 0, 0),
    "functional_no_affine": (1, 0, 0),
    "fp32_params": (1, 0, 0),
    "weight_only": (1, 0, 0),
    "residual": (1, 0, 1),
    "residual_read_once": (1, 0, 0),
    "two_dims": (0, 1, 0),
    "half_precision_norm": (1, 0, 0),
    "written_out": (1, 0, 0),
    "written_out_bias_one_deviation": (1, 0, 0),
    "written_out_no_affine": (1, 0, 0),
    "written_out_residual": (1, 0, 1),
    "written_out_times_input": (1, 0, 0),
    "written_out_mean_used_elsewhere": (0, 1, 0),
    "written_out_mean_not_last_dim": (0, 1, 0),
    "written_out_half_precision": (0, 1, 0),
}
REASONS = {"two_dims": "not the last dimension", "written_out_mean_used_elsewhere": "the mean is also used",
           "written_out_mean_not_last_dim": "not the last dimension", "written_out_half_precision": "not in fp32"}


@pytest.mark.parametrize("variant", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_match_or_leave_alone(variant, dtype):
    if variant == "fp32_params" and dtype == torch.float32:
        pytest.skip("the same as module in fp32")
    torch.manual_seed(0)
    mod = LayerNormLike(variant)
    x = (torch.randn(2, 5, 24) * 2 + 0.5).to(dtype).requires_grad_()
    r = torch.randn(x.shape, dtype=dtype, requires_grad=True)
    report = fxopt.Report()
    compiled = torch.compile(mod, backend=fxopt.make_backend(fxopt.OptimizeConfig(inner_backend="aot_eager"), report))
    out = compiled(x, r)
    ref = mod(x, r)
    # by the dtype the norm runs in (half_precision_norm: fp16 whatever x is)
    tol = 1e-5 if dtype == torch.float32 and "half_precision" not in variant else 2e-3
    assert out.dtype == ref.dtype and rel_err(out, ref) < tol
    g = torch.randn_like(ref)
    leaves = [x, r, mod.ln.weight, mod.ln.bias, mod.w32, mod.b32, mod.ln2d.weight]
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, leaves, g, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < tol
    matched, rejected, folded = CASES[variant]
    recs = report.matched("layer_norm"), report.rejected("layer_norm")
    assert (len(recs[0]), len(recs[1])) == (matched, rejected), report.records
    assert sum("residual add folded" in m.reason for m in recs[0]) == folded
    if rejected:
        assert REASONS[variant] in recs[1][0].reason
    assert not report.rejected("rms_norm")  # a LayerNorm's variance is not an RMSNorm near-miss


def test_pass_would_fail_without_the_kernel(monkeypatch):
    """The model comparison can fail: a layer_norm op that forgets the bias is caught."""
    from fxopt.kernels import layer_norm as lk

    real = lk._torch_forward
    monkeypatch.setattr(lk, "_use_triton", lambda t: False)
    monkeypatch.setattr(lk, "_torch_forward", lambda x2, r2, w, b, eps: real(x2, r2, w, None, eps))
    with pytest.raises(AssertionError):
        _compare(tiny_model("stablelm"))
