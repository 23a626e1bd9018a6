"""The MoE pass on tiny real HF MoE models (LoRA on attention) and on a hand-written MoE: what it matches
(count), what it must not (near-misses, the eager loop), equal loss and gradients, no recompile."""
import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

import fxopt
from fxopt.passes import pass_names
from fxopt.kernels import moe as moe_kernels  # noqa: F401  (registers fxopt::moe_experts)
from tests.models import optimize_and_check_on_gpu, assert_no_less_accurate, assert_no_recompile, assert_same_training, batch, rel_err

torch._dynamo.config.cache_size_limit = 64

@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    # every buffer the kernels write starts as NaN: an element they leave unwritten fails the comparisons
    monkeypatch.setattr(moe_kernels, "_new_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
              max_position_embeddings=256, num_experts_per_tok=2)
FAMILIES = {
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, moe_intermediate_size=32, num_experts=4, head_dim=16),
    # a shared expert (a plain MLP with a sigmoid gate) beside the routed experts: it stays outside the op
    "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                        num_experts=4),
    "mixtral": lambda: MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4),  # renormalised top-k
    "olmoe": lambda: OlmoeConfig(**COMMON, intermediate_size=32, num_experts=4),
}
EXPERTS = "base_model.model.model.layers.*.mlp.experts"


def tiny_moe_model(family, experts="grouped_mm", dtype=torch.float32, train_router=True):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), experts_implementation=experts, dtype=dtype)
    assert model.config._experts_implementation == experts
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT's zero B would leave A's gradient zero
                p.normal_(0, 0.05)
            # the routers (and qwen2-moe's shared-expert gate): their gradient flows through topk_weights
            if train_router and name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                p.requires_grad_(True)
    return model


def _compare(model, **opts):
    ref = copy.deepcopy(model)
    fxopt.optimize(model, inner_backend="aot_eager", **opts)
    # measured on this CPU (fp32, interpreted kernels): at most 1.2e-6 over every LoRA and router gradient
    _, grads = assert_same_training(model, ref, batch())
    return fxopt.report(model), grads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_grouped_mm_experts_matched_and_numerics_equal(family, monkeypatch):
    calls = []
    real = moe_kernels._bwd_act
    monkeypatch.setattr(moe_kernels, "_bwd_act", lambda *a: (calls.append(a[-1] is not None), real(*a))[1])
    report, grads = _compare(tiny_moe_model(family))
    assert calls and not any(calls)  # by default the backward recomputes the projection (issue 4)
    assert {r.location for r in report.matched("moe")} == {EXPERTS}
    assert all("(grouped)" in r.reason and "act=silu" in r.reason for r in report.matched("moe"))
    assert not report.rejected("moe")
    routers = [n for n in grads if n.endswith("mlp.gate.weight")]
    assert len(routers) == 2  # the router gradients were compared too
    if family == "qwen2_moe":
        assert sum(n.endswith("shared_expert_gate.weight") for n in grads) == 2


@pytest.mark.parametrize("family,opts,kept", [
    ("qwen3_moe", dict(moe_keep_projection=True), True),
    ("mixtral", dict(memory="none"), True),  # the policy that recomputes nothing keeps it by default
    ("qwen3_moe", dict(memory="none", moe_keep_projection=False), False),
])
def test_kept_projection_matched_and_numerics_equal(family, opts, kept, monkeypatch):
    """moe_keep_projection: the pass emits moe_experts_saving (the projection kept for the backward) or the
    recomputing op as asked; loss and every LoRA and router gradient equal the unoptimized model's."""
    calls = []
    real = moe_kernels._bwd_act
    monkeypatch.setattr(moe_kernels, "_bwd_act", lambda *a: (calls.append(a[-1] is not None), real(*a))[1])
    report, grads = _compare(tiny_moe_model(family), **opts)
    assert {r.location for r in report.matched("moe")} == {EXPERTS}
    assert calls and all(c == kept for c in calls)  # every backward read the kept projection, or none did
    assert all(("projection kept" in r.reason) == kept for r in report.matched("moe"))
    assert sum(n.endswith("mlp.gate.weight") for n in grads) == 2


def test_one_match_per_layer_without_regional_compilation():
    report, _ = _compare(tiny_moe_model("qwen3_moe"), regional=False)
    assert {r.location for r in report.matched("moe")} == {
        f"base_model.model.model.layers.{i}.mlp.experts" for i in range(2)}


def test_batched_mm_experts_matched():
    report, _ = _compare(tiny_moe_model("olmoe", experts="batched_mm"))
    assert {r.location for r in report.matched("moe")} == {EXPERTS}
    assert all("(batched)" in r.reason for r in report.matched("moe"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_eager_experts_switched_and_matched(family):
    """experts_implementation="eager" (a loop over the hit experts) is switched to "grouped_mm" (the same math
    in one graph) and matched; loss and gradients equal the unoptimized eager model's; the report says so."""
    model = tiny_moe_model(family, experts="eager")
    report, _ = _compare(model)
    assert {r.location for r in report.matched("moe")} == {EXPERTS} and not report.rejected("moe")
    assert model.config._experts_implementation == "grouped_mm"
    assert any('"eager" switched to "grouped_mm"' in n for n in report.notes)


def test_eager_experts_loop_reported_not_matched(monkeypatch):
    """Where the switch does not happen (here: patched out), the loop is reported with its reason."""
    import fxopt.api

    monkeypatch.setattr(fxopt.api, "_experts_in_one_graph", lambda *a: None)
    report, _ = _compare(tiny_moe_model("qwen3_moe", experts="eager", train_router=False))
    assert not report.matched("moe")
    assert any('"eager"' in r.reason and "data-dependent" in r.reason for r in report.rejected("moe"))


def test_eager_experts_kept_with_the_pass_disabled():
    model = tiny_moe_model("qwen3_moe", experts="eager", train_router=False)
    fxopt.optimize(model, inner_backend="aot_eager", disable=["moe"])
    assert model.config._experts_implementation == "eager"


def test_bf16_grouped_mm_matched_and_close():
    """bf16 experts take torch._grouped_mm under torch.compile (fp32 ones take transformers' fallback op):
    the other graph form. Compared with the fp32 model: the optimized bf16 model is no further from it than
    the unoptimized bf16 model is (both carry bf16 rounding through two layers). The other passes are off: this
    compares the MoE op alone (per parameter, a pass elsewhere in the model changes which bf16 roundings a
    gradient collects, and one token's top-k choice can flip with them)."""
    model = tiny_moe_model("qwen3_moe", dtype=torch.bfloat16)
    eager, ref32 = copy.deepcopy(model), copy.deepcopy(model).float()
    fxopt.optimize(model, inner_backend="aot_eager", disable=[p for p in pass_names() if p != "moe"])
    assert_no_less_accurate(model, eager, ref32, batch())
    assert {r.location for r in fxopt.report(model).matched("moe")} == {EXPERTS}


def test_no_recompile_when_sequence_length_changes(tmp_path):
    model = tiny_moe_model("qwen3_moe", train_router=False)
    fxopt.optimize(model, inner_backend="aot_eager", dump_dir=str(tmp_path))
    assert_no_recompile(model, (8, 12, 5, 16, 9))
    assert fxopt.report(model).matched("moe")
    assert not fxopt.report(model).rejected("moe")
    # every captured graph with a router has the op, the symbolic-length one (SymInt inputs) included
    moe_graphs = [p.read_text() for p in tmp_path.glob("*.after.py") if "torch.topk" in p.read_text()]
    assert moe_graphs and all("fxopt.moe_experts" in g and ".sort(" not in g for g in moe_graphs)
    assert any("torch.SymInt" in g for g in moe_graphs)


class HandMoE(nn.Module):
    """A top-k MoE written by hand in the batched form (router, gathered 3D expert weights, weighted k-sum).
    `gated=False`: act(x W1) expert MLP (no up half); `swap`: act on the second half; `bias`: an expert bias."""

    def __init__(self, H=16, I=8, E=4, k=2, gated=True, swap=False, bias=False, act="silu", clamp=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.k, self.gated, self.swap, self.act, self.clamp, self.E = k, gated, swap, act, clamp, E
        self.router = nn.Linear(H, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, (2 if gated else 1) * I, H, generator=g) * 0.3)
        self.w2 = nn.Parameter(torch.randn(E, H, I, generator=g) * 0.3)
        self.b1 = nn.Parameter(torch.randn(E, self.w1.shape[1], generator=g) * 0.1) if bias else None

    def forward(self, x):
        T, H = x.shape
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        ids, sw = ids.reshape(-1), w.reshape(-1)
        if self.clamp:  # as transformers 5.17 gathers the expert weights (a no-op on topk ids)
            ids = ids.clamp(0, self.E - 1)
        p = torch.bmm(self.w1[ids], x.repeat_interleave(self.k, dim=0).unsqueeze(-1)).squeeze(-1)
        if self.b1 is not None:
            p = p + self.b1[ids]
        act = {"silu": F.silu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "relu": F.relu}[self.act]
        if self.gated:
            gate, up = p.chunk(2, dim=-1)
            if self.swap:
                gate, up = up, gate
            h = act(gate) * up
        else:
            h = act(p)
        o = torch.bmm(self.w2[ids], h.unsqueeze(-1)).squeeze(-1) * sw.unsqueeze(-1)
        return o.view(T, self.k, H).sum(dim=1)


def _hand(**kw):
    model = HandMoE(**kw)
    ref = copy.deepcopy(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 16, generator=g)
    dy = torch.randn(7, 16, generator=g)
    out = []
    for m in (model, ref):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.backward(dy)
        out.append([y.detach(), xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*out):
        assert rel_err(a, b) < 1e-5
    return fxopt.report(model)


@pytest.mark.parametrize("act, clamp", [("silu", False), ("gelu_tanh", False), ("silu", True)])
def test_hand_written_gated_moe_matched_with_every_gradient(act, clamp):
    # experts, router and x all trainable here: every gradient of the op is checked through the pass
    report = _hand(act=act, clamp=clamp)
    assert len(report.matched("moe")) == 1 and f"act={act}" in report.matched("moe")[0].reason


@pytest.mark.parametrize("kw, reason", [
    (dict(gated=False), "not gated"),
    (dict(swap=True), "gate is not the first half"),
    (dict(bias=True), "expert bias"),
    (dict(act="relu"), "silu, gelu, gelu_tanh"),
])
def test_near_misses_not_matched(kw, reason):
    report = _hand(**kw)
    assert not report.matched("moe")
    assert any(reason in r.reason for r in report.rejected("moe")), report.rejected("moe")


def test_two_blocks_in_one_graph_both_matched():
    # the second block reads the first block's output directly: it is matched after the first is rewritten
    model = nn.Sequential(HandMoE(), HandMoE(act="gelu_tanh"))
    ref = copy.deepcopy(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert len(fxopt.report(model).matched("moe")) == 2
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5


class SentinelGroupedMoE(nn.Module):
    """The grouped form as transformers 5.17 writes it (the form the H100 run met): expert-parallel sentinel
    masks around both grouped GEMMs, an in-place mask of the gathered tokens and an in-place clamp of the
    sorted ids. `clone_ids`: the ids pass through a clone, so the pass cannot prove them < E."""

    def __init__(self, H=16, I=8, E=4, k=2, clone_ids=False):
        super().__init__()
        import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

        g = torch.Generator().manual_seed(0)
        self.k, self.E, self.clone_ids = k, E, clone_ids
        self.router = nn.Linear(H, E, bias=False)
        self.gate_up = nn.Parameter(torch.randn(E, 2 * I, H, generator=g) * 0.3)
        self.down = nn.Parameter(torch.randn(E, H, I, generator=g) * 0.3)

    def forward(self, x):
        T, H = x.shape
        gmm = torch.ops.transformers.grouped_mm_fallback
        w, ids = torch.topk(F.softmax(self.router(x), dim=-1, dtype=torch.float32), self.k, dim=-1)
        if self.clone_ids:
            ids = ids.clone()
        sw, ids = w.reshape(-1), ids.reshape(-1)
        sorted_ids, perm = torch.sort(ids)
        xg = x[perm // self.k]
        swg = sw[perm]
        offs = torch.cumsum(torch.histc(sorted_ids.float(), bins=self.E, min=0, max=self.E - 1), dim=0,
                            dtype=torch.int32)
        mask = (sorted_ids >= self.E).unsqueeze(-1)
        sorted_ids.clamp_(max=self.E - 1)
        xg.masked_fill_(mask, 0.0)
        p = gmm(xg.to(x.dtype), self.gate_up.transpose(-2, -1), offs=offs).masked_fill(mask, 0.0)
        gate, up = p.chunk(2, dim=-1)
        o = gmm((F.silu(gate) * up).to(x.dtype), self.down.transpose(-2, -1), offs=offs).masked_fill(mask, 0.0)
        o = o * swg.unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.size(0), device=x.device)
        return o[inv].view(T, self.k, H).sum(dim=1)


@pytest.mark.parametrize("clone_ids", [False, True])
def test_sentinel_masked_grouped_form(clone_ids):
    model = SentinelGroupedMoE(clone_ids=clone_ids)
    ref = copy.deepcopy(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(4))
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    for m, xi in zip((model, ref), xs):
        m(xi).square().sum().backward()
    assert rel_err(xs[0].grad, xs[1].grad) < 1e-5
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5
    report = fxopt.report(model)
    if clone_ids:
        assert not report.matched("moe")
        assert any("not provably < E" in r.reason for r in report.rejected("moe")), report.rejected("moe")
    else:
        assert len(report.matched("moe")) == 1 and not report.rejected("moe")


@pytest.mark.gpu
@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_bf16_moe_model_on_gpu(experts):
    """On the GPU, with the default (Inductor) backend: the bf16 experts are matched (CUDA's graph form:
    torch grouped_mm, histc over int ids) and the loss and gradients are as close to the fp32 model's as the
    unoptimized bf16 model's are."""
    model = tiny_moe_model("qwen3_moe", experts=experts, dtype=torch.bfloat16).cuda()
    eager = copy.deepcopy(model)
    ref32 = copy.deepcopy(model).float()
    ref32.config._experts_implementation = "batched_mm"  # torch's grouped_mm takes bf16 only; same math
    report = optimize_and_check_on_gpu(model, eager, ref32)
    assert {r.location for r in report.matched("moe")} == {EXPERTS} and not report.rejected("moe")


def test_lora_on_experts_by_target_parameters():
    """LoRA on the expert weights themselves (PEFT's target_parameters, peft >= 0.17): the experts op takes the
    adapted weights W + delta as inputs and returns their gradients (its wgrad GEMMs), which autograd carries
    into the adapters: matched, and every gradient (the experts' LoRA A and B included) equals the unoptimized
    model's."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES["qwen3_moe"](), experts_implementation="grouped_mm")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=[
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    report, grads = _compare(model)
    assert report.matched("moe") and not report.rejected("moe"), report.records
    assert sum("mlp.experts" in n and "lora_" in n for n in grads) == 8  # A and B of both weights, 2 layers


def test_keep_projection_option_validated_and_resolved():
    with pytest.raises(TypeError, match="moe_keep_projection"):
        fxopt.OptimizeConfig(moe_keep_projection="yes")
    assert not fxopt.OptimizeConfig().keeps_moe_projection  # the default recomputes (issue 4's memory rule)
    assert fxopt.OptimizeConfig(memory="none").keeps_moe_projection
    assert not fxopt.OptimizeConfig(memory="none", moe_keep_projection=False).keeps_moe_projection
    assert fxopt.OptimizeConfig(moe_keep_projection=True).keeps_moe_projection
