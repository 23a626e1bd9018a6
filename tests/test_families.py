"""Every pass at once on decoder families that no other test (and no file of fxopt) names, built from their
transformers config classes with PEFT LoRA on all linears: loss and every LoRA gradient equal the
unoptimized model's, and the passes that apply to the family match (what they find differs: GLM fuses gate
and up into one projection, Granite scales its logits before the loss, Phi and StableLM use LayerNorm).
The models are optimized one after another in one process with no Dynamo reset between them, as a user's
notebook would: with Dynamo's default recompile limit, the second model's blocks ran eagerly (code shared by
every model, transformers' decorator around a decoder layer's forward, ran out of compiled entries); fxopt
raises the limit (fxopt/api.py, _room_to_recompile)."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fxopt
from tests.models import COMMON, assert_same_training, batch, twin, with_lora

# model_type: passes that must match at least once (regional: one compiled block)
EXPECT = {
    "granite": ("lora", "swiglu", "rms_norm", "attention", "cross_entropy"),
    "glm": ("lora", "swiglu", "rms_norm", "attention", "cross_entropy"),
    "olmo2": ("lora", "swiglu", "rms_norm", "attention", "cross_entropy"),
    "stablelm": ("lora", "swiglu", "layer_norm", "attention", "cross_entropy"),
    "phi": ("lora", "layer_norm", "attention", "cross_entropy"),
    # Falcon: linears written out as x @ W.T (+ bias), multi-query SDPA (one kv head, no enable_gqa)
    "falcon": ("lora", "layer_norm", "attention", "cross_entropy"),
}


@pytest.mark.parametrize("model_type", sorted(EXPECT))
def test_every_pass_on_an_unnamed_family(model_type):
    torch.manual_seed(0)
    # Falcon with its biases on: they are added after the written-out product and go into the LoRA op
    extra = {"bias": True} if model_type == "falcon" else {}
    cfg = AutoConfig.for_model(model_type, pad_token_id=0, **COMMON, **extra)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = with_lora(model, target_modules="all-linear")
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    assert_same_training(model, ref, batch(seq=24))
    report = fxopt.report(model)
    for name in EXPECT[model_type]:
        assert report.matched(name), (name, report.records)
    if model_type == "falcon":  # all four of a block's written-out linears (fused qkv, dense, the two MLP ones)
        assert len(report.matched("lora")) == 4 and not report.rejected("lora"), report.records
    if "rms_norm" in EXPECT[model_type]:  # OLMo2's post-MLP norm reads the SwiGLU op's output: once missed for
        assert not report.rejected("rms_norm"), report.rejected("rms_norm")  # want of the new node's metadata


def test_recompile_limit_raised_not_lowered():
    from fxopt.api import RECOMPILE_LIMIT

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    # config.patch restores the value (pytest's monkeypatch would delete the config entry on undo)
    with cfg.patch(**{name: 8}):
        fxopt.optimize(torch.nn.Linear(2, 2), inner_backend="eager")
        assert getattr(cfg, name) == RECOMPILE_LIMIT
    with cfg.patch(**{name: 500}):
        fxopt.optimize(torch.nn.Linear(2, 2), inner_backend="eager")
        assert getattr(cfg, name) == 500


def test_a_second_model_with_another_norm_eps_is_still_fused():
    """Two models in one process whose norms have different eps: the decoder layers' shared wrapper code had
    Dynamo make eps a graph input on the second model (automatic dynamic), and its norms stayed unfused
    ("eps is a runtime value"); fxopt compiles with floats specialized (fxopt/api.py, _floats_static)."""
    before = torch._dynamo.config.specialize_float
    for eps in (1e-6, 1e-5):
        torch.manual_seed(0)
        cfg = AutoConfig.for_model("llama", pad_token_id=0, rms_norm_eps=eps, **COMMON)
        model = with_lora(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa"))
        fxopt.optimize(model, inner_backend="aot_eager", disable=["attention", "swiglu", "cross_entropy", "lora"])
        model(**batch()).loss.backward()
        report = fxopt.report(model)
        assert not report.rejected("rms_norm"), report.rejected("rms_norm")
        assert all(f"eps={eps:g}" in r.reason for r in report.matched("rms_norm"))
    assert torch._dynamo.config.specialize_float == before  # patched only inside the model's call
