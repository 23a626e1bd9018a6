"""The LoRA pass on tiny real HF models: what it matches (count), what it must not, and equal numerics."""
import torch
import pytest

import fxopt
from tests.models import (
    TARGETS, assert_no_less_accurate, assert_no_recompile, assert_same_training, batch, rel_err, tiny_lora_model,
    twin)

torch._dynamo.config.cache_size_limit = 64


def _compare(model, **opts):
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager", **opts)
    assert_same_training(model, ref, batch())
    return fxopt.report(model)


def _matched_modules(report):
    return {r.location for r in report.matched("lora")}


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen2"])
def test_every_lora_linear_matched_and_numerics_equal(family):
    model = tiny_lora_model(family)
    report = _compare(model)
    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith(tuple(TARGETS)))
    assert n_lora == 14
    # regional: the two blocks share one compiled block, reported once as "layers.*"
    assert _matched_modules(report) == {f"base_model.model.model.layers.*.{kind}.{t}" for t in TARGETS
                                        for kind in ("self_attn", "mlp") if (t in ("gate_proj", "up_proj", "down_proj")) == (kind == "mlp")}
    assert not report.rejected("lora")


def test_regional_off_matches_whole_graph():
    model = tiny_lora_model("llama")
    report = _compare(model, regional=False)
    assert len(_matched_modules(report)) == 14


def test_horizontal_fusion_groups_qkv_and_gate_up():
    model = tiny_lora_model("llama")
    report = _compare(model)
    q = [r for r in report.matched("lora") if r.location.endswith("q_proj")][0]
    gate = [r for r in report.matched("lora") if r.location.endswith("gate_proj")][0]
    o = [r for r in report.matched("lora") if r.location.endswith("o_proj")][0]
    assert "k_proj" in q.reason and "v_proj" in q.reason
    assert "up_proj" in gate.reason
    assert "one op with" not in o.reason


def test_rslora_scale():
    model = tiny_lora_model("llama", use_rslora=True, r=8, lora_alpha=16)
    report = _compare(model)
    assert len(_matched_modules(report)) == 7
    assert "scale=5.65685" in report.matched("lora")[0].reason  # 16 / sqrt(8)


def test_bf16_base_with_fp32_adapters():
    model = tiny_lora_model("llama", dtype=torch.bfloat16)
    eager, ref32 = twin(model), twin(model).float()
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    fxopt.optimize(model, inner_backend="aot_eager")
    assert_no_less_accurate(model, eager, ref32, batch())
    assert len(_matched_modules(fxopt.report(model))) == 7


def test_dropout_is_kept_train_drops_eval_does_not():
    model = tiny_lora_model("llama", lora_dropout=0.5)
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    b = batch()
    model.train()
    torch.manual_seed(0)
    train_a = model(**b).loss.detach()
    torch.manual_seed(1)
    train_b = model(**b).loss.detach()
    report = fxopt.report(model)
    assert len(_matched_modules(report)) == 7
    assert all("dropout kept" in r.reason for r in report.matched("lora"))
    assert train_a != train_b  # dropout draws differ: it was kept in train mode
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert rel_err(model(**b).loss, ref(**b).loss) < 1e-5


def test_dora_is_not_matched_and_reported():
    model = tiny_lora_model("llama", use_dora=True)
    report = _compare(model)
    assert not report.matched("lora")
    assert report.rejected("lora") and all("DoRA" in r.reason for r in report.rejected("lora"))


def test_multiple_active_adapters_not_matched():
    from peft import LoraConfig

    model = tiny_lora_model("llama", target_modules=["q_proj"])
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.base_model.set_adapter(["default", "second"])
    report = _compare(model)
    assert not report.matched("lora")
    assert any("several active adapters" in r.reason for r in report.rejected("lora"))


def test_disable_by_name_leaves_graph_alone():
    model = tiny_lora_model("llama")
    report = _compare(model, disable=["lora"])
    assert not report.matched("lora") and not report.rejected("lora")
    assert report.matched("cross_entropy")  # the other passes still run


def test_no_recompile_when_sequence_length_changes():
    model = tiny_lora_model("llama")
    fxopt.optimize(model, inner_backend="aot_eager")
    assert_no_recompile(model, (16, 24, 32, 17, 40, 9))


def test_no_graph_break_added():
    from torch._dynamo.utils import counters

    def breaks(backend):
        torch._dynamo.reset()
        counters.clear()
        model = tiny_lora_model("llama")
        torch.compile(model, backend=backend)(**batch()).loss.backward()
        return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]

    assert breaks(fxopt.make_backend(fxopt.OptimizeConfig(inner_backend="aot_eager"))) == breaks("aot_eager")


def test_dump_dir_writes_code_and_report(tmp_path):
    model = tiny_lora_model("llama")
    fxopt.optimize(model, inner_backend="aot_eager", dump_dir=str(tmp_path))
    model(**batch()).loss.backward()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith(".before.py") for n in names) and any(n.endswith(".after.py") for n in names)
    after = "".join(p.read_text() for p in tmp_path.glob("*.after.py"))
    assert "fxopt.lora_linear" in after
    md = "".join(p.read_text() for p in tmp_path.glob("*.report.md"))
    assert "self_attn.q_proj" in md and "matched" in md


def test_explain_does_not_compile_the_model(capsys):
    model = tiny_lora_model("llama")
    b = batch()
    report = fxopt.explain(model, **b)
    assert len(_matched_modules(report)) == 14
    assert "fxopt match report" in capsys.readouterr().out
    assert getattr(model, "_fxopt_report", None) is None
    # options as keywords go to the config, as optimize takes them; the rest is the batch
    report = fxopt.explain(model, disable=["lora"], verbose=False, **b)
    assert not report.matched("lora") and report.matched("attention")
    # an optimized model is explained as it was optimized: options there are an error, not ignored
    fxopt.optimize(model, inner_backend="aot_eager")
    with pytest.raises(ValueError, match="explain it without options"):
        fxopt.explain(model, disable=["lora"], **b)


def test_backend_by_name():
    model = tiny_lora_model("llama")
    ref = twin(model)
    b = batch()
    out = torch.compile(model, backend="fxopt")(**b).loss
    assert rel_err(out, ref(**b).loss) < 1e-5


def test_bad_input_errors():
    model = tiny_lora_model("llama")
    with pytest.raises(TypeError, match="nn.Module"):
        fxopt.optimize("not a model")
    with pytest.raises(TypeError, match="frobnicate"):
        fxopt.optimize(model, frobnicate=True)
    with pytest.raises(ValueError, match="nope"):
        fxopt.optimize(model, disable=["nope"])
    with pytest.raises(ValueError, match="inner_backend"):
        fxopt.OptimizeConfig(inner_backend="tvm")
    with pytest.raises(TypeError, match="config"):
        fxopt.optimize(model, config={"disable": []})
    fxopt.optimize(model, inner_backend="aot_eager")
    with pytest.raises(ValueError, match="already optimized"):
        fxopt.optimize(model)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("enable_after_optimize", [False, True])
def test_gradient_checkpointing_keeps_the_blocks_compiled(reentrant, enable_after_optimize):
    """HF gradient checkpointing (on by default in prepare_model_for_kbit_training and TRL's SFTConfig, and
    possibly enabled after optimize, as SFTTrainer does): the blocks still run fxopt's compiled code, inside the
    block's own checkpoint function (called once per block per step: the recompute is HF's), and training
    equals the unoptimized checkpointed model's. Both HF layouts are covered by the transformers versions CI
    and the GPU machine run (checkpoint around forward in 5.24, around __call__ in 5.17)."""
    model = tiny_lora_model("llama")
    ref = twin(model)

    def enable(m):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            m.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
        m.train()

    enable(ref)
    if not enable_after_optimize:
        enable(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    if enable_after_optimize:
        enable(model)
    calls = []
    for layer in model.base_model.model.model.layers:
        real = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, real=real, **k: (calls.append(1), real(*a, **k))[1]
    assert_same_training(model, ref, batch())
    report = fxopt.report(model)
    assert len(calls) == 2 and report.block_graphs > 0 and report.block_uncompiled() is None
    assert len({r.location for r in report.matched("lora")}) == 7


def test_report_says_when_the_blocks_never_compiled():
    """Regional compilation counts the graphs compiled for the repeated block; when none was (here: the blocks'
    original forward put back after optimize, run with Dynamo disabled) the report warns. Either way the
    training step equals the unoptimized model's."""
    plain = tiny_lora_model("llama")
    fxopt.optimize(plain, inner_backend="aot_eager")
    plain(**batch()).loss.backward()
    assert fxopt.report(plain).block_graphs > 0
    assert "WARNING" not in fxopt.report(plain).to_markdown()

    model = tiny_lora_model("llama")
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    for layer in model.base_model.model.model.layers:
        layer.forward = torch._dynamo.disable(type(layer).forward.__get__(layer))
    assert_same_training(model, ref, batch())
    report = fxopt.report(model)
    assert report.block_graphs == 0
    assert "WARNING: no graph of the LlamaDecoderLayer blocks" in report.to_markdown()


def test_one_warning_where_no_kernels_run(monkeypatch):
    """Without Triton (here: fxopt's view of it removed) the fused ops run their PyTorch math: one warning per model
    says so (not one per graph), the report repeats it, and training equals the unoptimized model's."""
    import warnings

    from fxopt.kernels import common

    monkeypatch.setattr(common, "triton", None)
    model = tiny_lora_model("llama")
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert_same_training(model, ref, batch())
    said = [w for w in seen if str(w.message).startswith("fxopt: no Triton kernels on cpu")]
    report = fxopt.report(model)
    assert len(said) == 1 and len(report.graphs) > 1
    assert "NOTE: no Triton kernels on cpu" in report.to_markdown() and report.matched("lora")


def test_old_gpu_leaves_graphs_unchanged(monkeypatch):
    from fxopt.backend import kernel_support

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    supported, note = kernel_support(torch.device("cuda"))
    assert not supported and "sm_70" in note and "unchanged" in note
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kernel_support(torch.device("cuda"))[0]


def test_cuda_graphs_are_refused_under_checkpointing_only_when_active():
    from fxopt.backend import no_cudagraphs_reason

    model = tiny_lora_model("llama")
    assert no_cudagraphs_reason(model) is None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert "gradient checkpointing" in no_cudagraphs_reason(model)
    model.eval()  # HF checkpoints only in training mode
    assert no_cudagraphs_reason(model) is None


def test_autocast_bf16_lora_linears_fused_and_no_less_accurate():
    """Mixed precision by autocast (HF Trainer's bf16=True on an fp32 model): the LoRA linears compute in bf16
    as autocast would (fxopt casts x, W, A, B to bf16 for its op) and are fused; loss and every gradient are
    no less accurate against the fp32 model than the unoptimized model under the same autocast."""
    import functools

    model = tiny_lora_model("llama")
    eager, ref32 = twin(model), twin(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    b = batch()
    assert_no_less_accurate(model, eager, ref32, b,
                            context=functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16))
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    report = fxopt.report(model)
    matched = report.matched("lora")
    assert len({r.location for r in matched}) == 7 and all("under autocast to bfloat16" in r.reason for r in matched)
    # without autocast the same model's graphs compile again (autocast state is guarded), in fp32
    assert_same_training(model, twin(ref32), b)
