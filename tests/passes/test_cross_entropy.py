"""The fused-loss pass on tiny real HF models: lm_head + cross-entropy become fxopt::linear_cross_entropy
(count), the loss and every gradient equal the unoptimized model's, and what must not match does not."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Gemma2Config

import fxopt
from tests.models import COMMON, TARGETS, assert_same_training, batch, rel_err, tiny_lora_model, twin

torch._dynamo.config.cache_size_limit = 64


def _ce_records(model):
    rep = fxopt.report(model)
    return rep.matched("cross_entropy"), rep.rejected("cross_entropy")


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen2"])
def test_loss_fused_and_equal(family):
    model = tiny_lora_model(family)
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    b = batch()
    b["labels"][0, :5] = -100  # ignored positions count neither in the sum nor in the mean
    assert_same_training(model, ref, b)
    out = model(**b)
    matched, rejected = _ce_records(model)
    assert len(matched) == 1 and not rejected
    assert "lm_head" in matched[0].location
    # training forward: the full logits are not computed; an empty [B, 0, V] stands in (loud if used)
    assert out.logits.shape == (2, 0, 128)


def test_eval_returns_real_logits_and_is_not_fused():
    model = tiny_lora_model("llama")
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    b = batch()
    with torch.no_grad():
        out, want = model(**b), ref(**b)
    assert out.logits.shape == want.logits.shape == (2, 16, 128)
    assert rel_err(out.logits, want.logits) < 1e-5 and rel_err(out.loss, want.loss) < 1e-5
    matched, rejected = _ce_records(model)
    assert not matched and "evaluation" in rejected[0].reason


def test_keep_logits_leaves_the_loss_unfused():
    model = tiny_lora_model("llama")
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager", keep_logits=True)
    b = batch()
    assert_same_training(model, ref, b)
    out = model(**b)
    assert out.logits.shape == (2, 16, 128)
    matched, rejected = _ce_records(model)
    assert not matched and "keep_logits" in rejected[0].reason


def test_sum_reduction_with_num_items_in_batch():
    """Trainer passes num_items_in_batch: HF's loss is then a sum divided by it (reduction="sum")."""
    model = tiny_lora_model("llama")
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    assert_same_training(model, ref, dict(batch(), num_items_in_batch=torch.tensor(27)))
    matched, _ = _ce_records(model)
    assert "reduction=sum" in matched[0].reason


def test_gemma2_softcap():
    cfg = Gemma2Config(**COMMON, head_dim=16, final_logit_softcapping=3.0, attn_logit_softcapping=None,
                       sliding_window=8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    assert_same_training(model, ref, batch())
    matched, _ = _ce_records(model)
    assert len(matched) == 1 and "softcap=3" in matched[0].reason


def test_inductor_and_no_recompile_on_new_length():
    from torch._dynamo.utils import counters

    model = tiny_lora_model("llama")
    ref = twin(model)
    fxopt.optimize(model)  # Inductor
    for seq in (16, 24, 31, 17, 9):
        assert_same_training(model, ref, batch(seq=seq))
        if seq == 24:  # the first change marks the length dynamic: one more compile, then none
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


class _SmoothedLoss(nn.Module):
    """A near-miss: a head + cross-entropy with label smoothing, which the op does not do."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 11, bias=False)

    def forward(self, h, y):
        return F.cross_entropy(self.head(h).float(), y, label_smoothing=0.1)


class _LogitsUsedTwice(_SmoothedLoss):
    def forward(self, h, y):
        z = self.head(h).float()
        return F.cross_entropy(z, y) + z.mean()


@pytest.mark.parametrize("mod, reason", [(_SmoothedLoss, "label smoothing"), (_LogitsUsedTwice, "also used")])
def test_near_misses_are_not_matched(mod, reason):
    torch.manual_seed(0)
    m = mod()
    h = torch.randn(5, 8, requires_grad=True)
    y = torch.randint(0, 11, (5,))
    report = fxopt.Report()
    compiled = torch.compile(m, backend=fxopt.make_backend(fxopt.OptimizeConfig(inner_backend="aot_eager"), report))
    assert rel_err(compiled(h, y), m(h, y)) < 1e-6
    assert not report.matched("cross_entropy")
    assert reason in report.rejected("cross_entropy")[0].reason


def test_plain_head_and_loss_module_is_matched():
    """Not only HF: any linear -> float -> cross_entropy in a graph is the pattern."""
    torch.manual_seed(0)
    m = _SmoothedLoss()
    m.forward = lambda h, y: F.cross_entropy(m.head(h).float(), y, ignore_index=3)
    h = torch.randn(7, 8, requires_grad=True)
    y = torch.randint(0, 11, (7,))
    report = fxopt.Report()
    compiled = torch.compile(m.forward, backend=fxopt.make_backend(fxopt.OptimizeConfig(inner_backend="aot_eager"), report))
    got = compiled(h, y)
    want = m.forward(h, y)
    assert rel_err(got, want) < 1e-5
    g1 = torch.autograd.grad(got, [h, m.head.weight])
    g2 = torch.autograd.grad(want, [h, m.head.weight])
    for a, b in zip(g1, g2):  # here the head's weight is trained too: its gradient must be right
        assert rel_err(a, b) < 1e-5
    assert len(report.matched("cross_entropy")) == 1


@pytest.mark.parametrize("model_type, options, scale", [("cohere", {"logit_scale": 0.25}, "logit scale=0.25"),
                                                        ("granite", {"logits_scaling": 8.0}, "logit scale=0.125")])
def test_logit_scale(model_type, options, scale):
    """Cohere multiplies the logits by a constant, Granite divides them: the op gets the scale on its input
    (s (h W^T) = (s h) W^T), loss and every gradient equal."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, pad_token_id=0, **COMMON, **options)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager", disable=["attention", "rms_norm", "swiglu"])
    assert_same_training(model, ref, batch())
    matched, rejected = _ce_records(model)
    assert len(matched) == 1 and not rejected and scale in matched[0].reason


class _ScaledHead(nn.Module):
    """head(h) * s (or / s), optionally with a bias and a softcap after the scale."""

    def __init__(self, form, bias=False):
        super().__init__()
        self.form = form
        self.head = nn.Linear(8, 11, bias=bias)

    def forward(self, h, y):
        z = self.head(h)
        z = {"mul": lambda: z * 0.3, "rmul": lambda: 0.3 * z, "div": lambda: z / 4.0}[self.form]()
        if self.form == "div":
            z = torch.tanh(z / 2.0) * 2.0  # a softcap after the scale
        return F.cross_entropy(z.float(), y)


@pytest.mark.parametrize("form", ["mul", "rmul", "div"])
@pytest.mark.parametrize("bias", [False, True])
def test_logit_scale_forms(form, bias):
    torch.manual_seed(0)
    m = _ScaledHead(form, bias)
    h = torch.randn(7, 8, requires_grad=True)
    y = torch.randint(0, 11, (7,))
    report = fxopt.Report()
    compiled = torch.compile(m, backend=fxopt.make_backend(fxopt.OptimizeConfig(inner_backend="aot_eager"), report))
    got, want = compiled(h, y), m(h, y)
    assert rel_err(got, want) < 1e-5
    leaves = [h, m.head.weight] + ([m.head.bias] if bias else [])
    for g1, g2 in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        assert rel_err(g1, g2) < 1e-5
    if bias:  # the scale would also have to scale the bias: left unfused, said why
        assert not report.matched("cross_entropy")
        assert "bias" in report.rejected("cross_entropy")[0].reason
    else:
        assert len(report.matched("cross_entropy")) == 1
        reason = report.matched("cross_entropy")[0].reason
        assert ("logit scale=0.25" in reason and "softcap=2" in reason) if form == "div" else "logit scale=0.3" in reason
