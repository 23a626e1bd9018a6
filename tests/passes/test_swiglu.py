"""The SwiGLU pass on tiny real HF models: every gated MLP whose down projection has a LoRA adapter becomes
fxopt::swiglu_lora_linear (counted), loss and gradients equal the unoptimized model's; GeGLU, LoRA dropout on
the down projection and a down projection without LoRA are left alone (the first two reported)."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Gemma3TextConfig

import fxopt
from fxopt.passes import pass_names
from tests.models import COMMON, TARGETS, assert_same_training, batch, tiny_lora_model, twin

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


def test_geglu_reported():
    """Gemma's MLP gates with gelu (tanh approximation): reported, left to Inductor, still equal."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**COMMON, head_dim=16), attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    report = compare(model)
    assert not report.matched("swiglu")
    assert len(report.rejected("swiglu")) == LAYERS and all("GELU" in r.reason for r in report.rejected("swiglu"))


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
