"""The SwiGLU pass on tiny real HF models: every gated MLP whose down projection has a LoRA adapter becomes
fxopt::swiglu_lora_linear (counted), loss and gradients equal the unoptimized model's, GeGLU (Gemma's gelu with
the tanh approximation) included; LoRA dropout on the down projection and a down projection without LoRA are
left alone (the first reported)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

import fxopt
from fxopt.passes import pass_names
from tests.models import COMMON, TARGETS, assert_same_training, batch, rel_err, tiny_lora_model, twin

torch._dynamo.config.cache_size_limit = 64
LAYERS = COMMON["num_hidden_layers"]
ONLY = [p for p in pass_names() if p not in ("lora", "swiglu")]  # the pass needs the lora pass's ops


def compare(model, b=None, seed=None, **opts):
    ref = twin(model)
    fxopt.optimize(model, **{"inner_backend": "aot_eager", "disable": ONLY, "regional": False, **opts})
    assert_same_training(model, ref, b or batch(seq=24), seed=seed)
    return fxopt.report(model)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen2"])
def test_every_gated_mlp_matched(family):
    report = compare(tiny_lora_model(family))
    matched = report.matched("swiglu")
    assert len(matched) == LAYERS and not report.rejected("swiglu"), report.records
    assert all(r.location.endswith("mlp.down_proj") for r in matched)


def test_regional_inductor_all_passes():
    report = compare(tiny_lora_model("llama"), inner_backend="inductor", disable=[], regional=True)
    assert len(report.matched("swiglu")) == 1 and len(report.matched("lora")) >= 1


@pytest.mark.parametrize("config", [Gemma3TextConfig, Gemma2Config])
def test_geglu_matched(config):
    """Gemma's MLP gates with gelu (tanh approximation, hidden_activation="gelu_pytorch_tanh"): matched as the
    same op with that activation, loss and gradients equal."""
    torch.manual_seed(0)
    attn = "eager" if config is Gemma2Config else "sdpa"
    model = AutoModelForCausalLM.from_config(config(**COMMON, head_dim=16), attn_implementation=attn)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    report = compare(model)
    matched = report.matched("swiglu")
    assert len(matched) == LAYERS and not report.rejected("swiglu"), report.records
    assert all("gelu (tanh)(gate)" in r.reason for r in matched)


def test_lora_dropout_reported():
    report = compare(tiny_lora_model("llama", lora_dropout=0.1), seed=7)
    assert not report.matched("swiglu")
    assert all("dropout" in r.reason for r in report.rejected("swiglu")) and report.rejected("swiglu")


def test_down_without_lora_left_alone():
    """No adapter on down_proj: its base linear needs no saved input (W is frozen): nothing to gain."""
    report = compare(tiny_lora_model("llama", target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"]))
    assert not report.matched("swiglu") and not report.rejected("swiglu")


def test_bf16_and_disable():
    model = tiny_lora_model("qwen3", dtype=torch.bfloat16)
    eager, ref32 = twin(model), twin(model).float()
    fxopt.optimize(model, inner_backend="aot_eager", disable=ONLY, regional=False)
    from tests.models import assert_no_less_accurate

    assert_no_less_accurate(model, eager, ref32, batch(seq=24))
    assert len(fxopt.report(model).matched("swiglu")) == LAYERS
    report = compare(tiny_lora_model("llama"), disable=pass_names())
    assert not report.matched("swiglu") and not report.rejected("swiglu")


class GatedMLP(torch.nn.Module):
    """A PEFT-like gated MLP built by hand, with features that must or must not block the fusion."""

    def __init__(self, h, i, r, act, swap, extra_reader, down_dropout, down_bias, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.act, self.swap, self.extra_reader, self.down_dropout = act, swap, extra_reader, down_dropout

        def p(*shape, scale=0.3, grad=True):
            return torch.nn.Parameter(torch.randn(*shape, generator=g) * scale, requires_grad=grad)

        self.w_gate, self.w_up, self.w_down = p(i, h, grad=False), p(i, h, grad=False), p(h, i, grad=False)
        self.b_down = p(h, grad=False) if down_bias else None
        self.a_gate, self.bm_gate, self.a_down, self.bm_down = p(r, h), p(i, r), p(r, i), p(h, r)

    def forward(self, x):
        gate = F.linear(x, self.w_gate) + F.linear(F.linear(x, self.a_gate), self.bm_gate) * 2.0
        up = F.linear(x, self.w_up)
        a = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate="tanh" if "tanh" in self.act else "none")
        h = up * a if self.swap else a * up
        hl = F.dropout(h, 0.3, training=True) if self.down_dropout else h
        out = F.linear(h, self.w_down, self.b_down) + F.linear(F.linear(hl, self.a_down), self.bm_down) * 0.5
        return out + h.sum() if self.extra_reader else out


@settings(max_examples=20, deadline=None)
@given(act=st.sampled_from(["silu", "silu", "gelu", "gelu_tanh"]), swap=st.booleans(),
       extra_reader=st.sampled_from([False, False, True]),
       down_dropout=st.sampled_from([False, False, True]), down_bias=st.booleans(), lead=st.sampled_from([(1,), (3,), (2, 5)]),
       h=st.integers(1, 24), i=st.integers(1, 40), r=st.sampled_from([1, 4]), seed=st.integers(0, 2**16))
def test_random_gated_mlps(act, swap, extra_reader, down_dropout, down_bias, lead, h, i, r, seed):
    """Matched exactly when nothing blocks it; outputs and gradients (x, adapters) equal eager either way."""
    torch._dynamo.reset()
    mod = GatedMLP(h, i, r, act, swap, extra_reader, down_dropout, down_bias, seed)
    x = torch.randn(*lead, h, generator=torch.Generator().manual_seed(seed + 1), requires_grad=True)
    report = fxopt.Report()
    compiled = torch.compile(mod, backend=fxopt.make_backend(fxopt.OptimizeConfig(inner_backend="aot_eager"), report))
    torch.manual_seed(seed)
    out = compiled(x)
    torch.manual_seed(seed)
    ref = mod(x)
    should = not extra_reader and not down_dropout
    assert len(report.matched("swiglu")) == int(should), report.records
    assert rel_err(out, ref) < 1e-5
    leaves = [x] + [p for p in mod.parameters() if p.requires_grad]
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 2))
    for a, b in zip(torch.autograd.grad(out, leaves, dy), torch.autograd.grad(ref, leaves, dy)):
        assert rel_err(a, b) < 1e-5
