"""The QLoRA pass on tiny real HF models quantized by bitsandbytes (Linear4bit, nf4 / fp4, double quantization on
and off) with PEFT LoRA: what it matches (count), what it must not fuse, and equal numerics.

Models are saved from a tiny config and reloaded with a BitsAndBytesConfig, as a user loads a QLoRA model.
intermediate_size is 128 instead of tests/models.py's 96: bitsandbytes 0.50.2's CPU dequantize_4bit (which the
unoptimized model's backward runs) is wrong for N > 1, K % 16 == 0 and K % blocksize != 0 (down_proj's K = 96
with blocksize 64); every K here (64, 128) is a multiple of the blocksize.
prepare_model_for_kbit_training is called with use_gradient_checkpointing=False: with checkpointing on (its
default) and the model in train mode, the decoder blocks run inside torch.utils.checkpoint and no block is
compiled at all here (torch 2.13, regional or not), so there is nothing for a pass to see.

Most tests run fxopt's 4-bit ops on their torch math path (`fxopt.kernels.nf4._INTERPRETED` off: dequantize and
matmul, a per-call transient) because the interpreted kernels take ~7 s per training step of this model; the
Triton kernels themselves are tested against bnb in tests/kernels/test_nf4.py, and the `-triton` case here runs
them through the interpreter end to end. DoRA is not among the near-misses: on a 4-bit model PEFT's DoRA breaks
the block into ~35 graphs (slow to compile here); two active adapters and an adapter intermediate kept alive by
a hook cover the "adapter there but not fusable" path.
"""

import pytest
import torch

import fxopt
from fxopt.kernels import nf4
from tests.models import (
    optimize_and_check_on_gpu,
    FAMILIES, TARGETS, assert_no_less_accurate, assert_no_recompile, assert_same_training, batch, rel_err, train_step)

bnb = pytest.importorskip("bitsandbytes")
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

torch._dynamo.config.cache_size_limit = 64
INTERMEDIATE = 128  # a multiple of the blocksize (see the docstring)
WEIGHT_SHAPES = {(64, 64), (32, 64), (128, 64), (64, 128)}  # q/o, k/v, gate/up, down as [N, K]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> a saved tiny fp32 model (random weights, no download)."""
    paths = {}

    def get(family, dtype=torch.float32):
        key = (family, dtype)
        if key not in paths:
            torch.manual_seed(0)
            cfg = FAMILIES[family]()
            cfg.intermediate_size = INTERMEDIATE
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
            paths[key] = tmp_path_factory.mktemp(family)
            model.save_pretrained(paths[key])
        return paths[key]

    return get


def qlora_model(path, quant_type="nf4", double_quant=True, compute_dtype=torch.float32, lora=True, dtype=torch.float32,
                device="cpu", **lora_opts):
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=dtype,
                                                 attn_implementation="sdpa", device_map=device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if lora:
        torch.manual_seed(0)
        opts = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
        opts.update(lora_opts)
        model = get_peft_model(model, LoraConfig(**opts))
        # PEFT initialises B to zero, which would make every adapter gradient but B's vanish: randomise it
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


@pytest.fixture
def torch_math(monkeypatch):
    """fxopt's 4-bit ops take their torch math path on the CPU (fast) instead of the interpreted kernels."""
    monkeypatch.setattr(nf4, "_INTERPRETED", False)


def _compare(model, ref, b=None, **opts):
    fxopt.optimize(model, inner_backend="aot_eager", **opts)
    assert_same_training(model, ref, b or batch(), seed=0)  # the same dropout draws in both models
    return fxopt.report(model)


def _ops(report, op):
    """module path -> detail of the qlora matches that became `op`."""
    return {r.location: r.reason for r in report.matched("qlora") if r.reason.startswith(f"fxopt::{op},")}


def _all_layers():
    mlp = ("gate_proj", "up_proj", "down_proj")
    return {f"base_model.model.model.layers.*.{'mlp' if t in mlp else 'self_attn'}.{t}" for t in TARGETS}


# fp32 compute: the kernel and bnb compute the same fp32 products (weights dequantized exactly as bnb does), so
# the loss and every LoRA gradient agree to fp32 rounding (1e-5).
@pytest.mark.parametrize("family,quant_type,double_quant,dropout,triton", [
    pytest.param("llama", "nf4", True, 0.0, True, id="llama-nf4-dq-triton"),
    pytest.param("llama", "fp4", False, 0.0, False, id="llama-fp4"),
    pytest.param("qwen3", "nf4", False, 0.0, False, id="qwen3-nf4"),
    pytest.param("qwen3", "fp4", True, 0.25, False, id="qwen3-fp4-dq-dropout"),
])
def test_every_4bit_lora_linear_fused(checkpoints, monkeypatch, tmp_path, family, quant_type, double_quant, dropout,
                                      triton):
    if not triton:
        monkeypatch.setattr(nf4, "_INTERPRETED", False)
    path = checkpoints(family)
    model = qlora_model(path, quant_type, double_quant, lora_dropout=dropout)
    ref = qlora_model(path, quant_type, double_quant, lora_dropout=dropout)
    assert sum(1 for _, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)) == 14
    b = batch(seq=12)  # 24 tokens: no activation shape equals a weight's (see the saved-tensor check below)
    report = _compare(model, ref, b, dump_dir=str(tmp_path))  # train mode, same seed: the same dropout masks
    fused = _ops(report, "lora_linear_4bit")
    assert set(fused) == _all_layers()  # 7 per block; the 2 blocks share one compiled block ("layers.*")
    assert all(f"{quant_type}, blocksize 64" in d and ("double quant" in d) == double_quant and "r=4, scale=2" in d
               and ("dropout kept" in d) == (dropout > 0) for d in fused.values())
    assert not report.rejected("qlora") and not report.rejected("lora")
    # One block graph in training (the first block's input gets a copy requiring grad, as the others', see
    # regions._hidden_requiring_grad): bitsandbytes goes through its autograd.Function there. Without grad
    # (the forward below) it calls gemm_4bit bare. Both forms are rewritten, nothing of bitsandbytes' ops is left.
    with torch.no_grad():
        model(**b)
    before = [p.read_text() for p in sorted(tmp_path.glob("*.before.py"))]
    assert any("torch.ops.bitsandbytes.gemm_4bit" in b for b in before)  # bodies are not in gm.code: bare calls
    assert any("autograd_function_apply" in b for b in before)
    after = [p.read_text() for p in sorted(tmp_path.glob("*.after.py"))]
    # the down projection, fed by silu(gate) * up, then becomes the SwiGLU op's 4-bit form (h recomputed), except
    # with LoRA dropout (the dropped input would have to be saved: rejected, reported)
    fused = 0 if dropout else 1
    assert [(a.count("fxopt.lora_linear_4bit"), a.count("fxopt.swiglu_lora_linear_4bit"))
            for a in after if "lora_linear_4bit" in a] == [(7 - fused, fused)] * 2
    down = ["base_model.model.model.layers.*.mlp.down_proj"]
    assert [r.location for r in (report.rejected if dropout else report.matched)("swiglu")] == down
    assert not any("autograd_function_apply" in a or "bitsandbytes." in a for a in after)

    # no dequantized weight is saved for backward (only activations, the packed bytes and the quant state)
    saved = []

    def pack(t):
        if t.is_floating_point():
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**b).loss
    loss.backward()
    assert saved and not {s for s in saved if len(s) == 2} & (WEIGHT_SHAPES | {s[::-1] for s in WEIGHT_SHAPES})
    if dropout:
        assert train_step(model, b, seed=1)[0] != train_step(model, b, seed=2)[0]  # dropout is live


def test_4bit_without_lora_becomes_linear_4bit(checkpoints, torch_math):
    # Qwen2: q/k/v carry a bias. No adapter: the input gradient is what flows through the 4-bit linears.
    path = checkpoints("qwen2")
    model = qlora_model(path, "nf4", True, lora=False)
    ref = qlora_model(path, "nf4", True, lora=False)
    fxopt.optimize(model, inner_backend="aot_eager")
    b = batch()
    ids, labels = b["input_ids"], b["labels"]
    out = {}
    for name, m in (("fxopt", model), ("ref", ref)):
        emb = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = m(inputs_embeds=emb, labels=labels).loss
        loss.backward()
        out[name] = (loss.detach(), emb.grad)
    assert rel_err(out["fxopt"][0], out["ref"][0]) < 1e-5
    assert rel_err(out["fxopt"][1], out["ref"][1]) < 1e-5
    report = fxopt.report(model)
    plain = _ops(report, "linear_4bit")
    assert set(plain) == {p.removeprefix("base_model.model.") for p in _all_layers()}
    assert sum("bias" in d for d in plain.values()) == 3  # q, k, v
    assert not report.rejected("qlora")


def test_adapter_intermediate_used_elsewhere_is_not_fused(checkpoints, torch_math):
    # a forward hook keeps o_proj's x @ A^T alive: the kernel never materialises it, so that adapter stays as it
    # is; its base still becomes the plain 4-bit op
    path = checkpoints("llama")
    model, ref = qlora_model(path), qlora_model(path)
    for m in (model, ref):
        for name, mod in m.named_modules():
            if name.endswith("o_proj.lora_A.default"):
                mod.register_forward_hook(lambda mod, inputs, out: setattr(mod, "seen", out * 2))
    report = _compare(model, ref)
    fused = _ops(report, "lora_linear_4bit")
    plain = _ops(report, "linear_4bit")
    o_proj = "base_model.model.model.layers.*.self_attn.o_proj"
    assert set(fused) == _all_layers() - {o_proj} and set(plain) == {o_proj}
    rejected = report.rejected("qlora")
    assert [r.location for r in rejected] == [o_proj] and "also used elsewhere" in rejected[0].reason


def test_two_active_adapters_not_fused(checkpoints, torch_math):
    path = checkpoints("llama")

    def build():
        m = qlora_model(path, target_modules=["q_proj"])
        m.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B.second" in n:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view(p.shape))
        m.base_model.set_adapter(["default", "second"])
        return m.train()

    report = _compare(build(), build())
    assert not _ops(report, "lora_linear_4bit")
    assert len(_ops(report, "linear_4bit")) == 7
    assert any("several active adapters" in r.reason for r in report.rejected("qlora"))


def test_no_recompile_when_sequence_length_changes(checkpoints, torch_math):
    model = qlora_model(checkpoints("llama"))
    fxopt.optimize(model, inner_backend="aot_eager")
    assert_no_recompile(model, (16, 24, 32, 17, 9))
    assert len(_ops(fxopt.report(model), "lora_linear_4bit")) == 7


def test_bf16_compute_dtype_on_cpu(checkpoints):
    # bnb_4bit_compute_dtype=bf16 with the fp32 hidden states prepare_model_for_kbit_training leaves: the base
    # GEMM runs in bf16, the adapter in fp32 on the fp32 input. Measured against the same quantized model computing
    # in fp32: fxopt must be no less accurate than bnb's own bf16 path (x1.5), and within the bf16 tolerance.
    # (bf16 takes fxopt's torch math on the CPU: the interpreter's bf16 tl.dot is wrong.)
    path = checkpoints("llama")
    model = qlora_model(path, compute_dtype=torch.bfloat16)
    eager = qlora_model(path, compute_dtype=torch.bfloat16)
    ref32 = qlora_model(path, compute_dtype=torch.float32)
    fxopt.optimize(model, inner_backend="aot_eager")
    b = batch()
    errs = assert_no_less_accurate(model, eager, ref32, b)
    print("worst (fxopt, eager):", sorted(errs.items(), key=lambda kv: -kv[1][0])[:3])
    fused = _ops(fxopt.report(model), "lora_linear_4bit")
    assert len(fused) == 7 and all("adapter reads its own input" in d for d in fused.values())
    # the base result is cast back to fp32 before the adapter is added: the op forms the sum in fp32 (rounded
    # to bf16 it erased small adapter terms, see test_wide_output_keeps_a_small_adapter_term)
    assert all(d.endswith("sum in float32") for d in fused.values())
    # the down projection reads h cast to bf16 (and the adapter h itself): not the SwiGLU op's form; the report
    # says why and what fuses it
    assert not fxopt.report(model).matched("swiglu")
    assert 'frozen_fp32="compute_dtype"' in fxopt.report(model).rejected("swiglu")[0].reason


# ---------------------------------------------------------------------------------------------------------
# frozen_fp32: the recipe's fp32 upcast of a bf16 checkpoint, run in the compute dtype


def _frozen_fp32(model):
    """name -> a copy of each frozen fp32 parameter that is not 4-bit (what prepare_model_for_kbit_training upcast)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if p.dtype == torch.float32 and not p.requires_grad and not hasattr(p, "quant_state")}


def test_frozen_fp32_compute_dtype_casts_the_upcast_back(checkpoints, torch_math):
    # A bf16 checkpoint loaded in 4 bits, the recipe's upcast to fp32, bf16 compute dtype. With
    # frozen_fp32="compute_dtype" fxopt must equal the same model with those parameters cast to bf16 by hand
    # (unoptimized), in bf16's accuracy against the fp32 recipe; no parameter value may change.
    path = checkpoints("llama", torch.bfloat16)
    model = qlora_model(path, compute_dtype=torch.bfloat16, dtype=torch.bfloat16)
    eager = qlora_model(path, compute_dtype=torch.bfloat16, dtype=torch.bfloat16)
    ref32 = qlora_model(path, compute_dtype=torch.float32, dtype=torch.bfloat16)
    before = _frozen_fp32(model)
    assert {n.split(".")[-2] for n in before} == {"input_layernorm", "post_attention_layernorm", "norm",
                                                  "embed_tokens", "lm_head"}
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if name in before:
                p.data = p.data.to(torch.bfloat16)
    fxopt.optimize(model, inner_backend="aot_eager", frozen_fp32="compute_dtype")
    params = dict(model.named_parameters())
    for name, value in before.items():
        assert params[name].dtype == torch.bfloat16 and torch.equal(params[name].float(), value), name
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)  # the adapters are left alone
    # 256 tokens: with the default 32, single adapter gradients of the two bf16 models scatter by +-50% around
    # each other (0.0064 vs 0.0101 for one, the reverse for others; the same with every fxopt pass but qlora
    # off), so a per-gradient comparison would test the draw, not fxopt
    errs = assert_no_less_accurate(model, eager, ref32, batch(seq=64, bsz=4))
    print("worst (fxopt, eager):", sorted(errs.items(), key=lambda kv: -kv[1][0])[:3])
    report = fxopt.report(model)
    assert any(f"{len(before)} frozen fp32 parameters cast to torch.bfloat16" in n for n in report.notes)
    fused = _ops(report, "lora_linear_4bit")
    assert set(fused) == _all_layers() and not any("sum in" in d for d in fused.values())  # bf16 in, bf16 out
    assert report.matched("attention") and report.matched("rms_norm")  # bf16 stream: the dense passes apply
    assert [r.location for r in report.matched("swiglu")] == ["base_model.model.model.layers.*.mlp.down_proj"]
    assert not any("experts" in n for n in report.notes)  # a dense model: no MoE switch attempted


def test_frozen_fp32_keeps_what_is_not_exact_and_keep_is_the_default(checkpoints, torch_math):
    path = checkpoints("llama", torch.bfloat16)
    model = qlora_model(path, compute_dtype=torch.bfloat16, dtype=torch.bfloat16)
    norm = model.base_model.model.model.norm.weight
    with torch.no_grad():
        norm.add_(1e-4)  # no longer a bf16 value: casting it would change the model
    fxopt.optimize(model, inner_backend="aot_eager", frozen_fp32="compute_dtype")
    assert norm.dtype == torch.float32
    assert model.base_model.model.model.embed_tokens.weight.dtype == torch.bfloat16
    note = next(n for n in fxopt.report(model).notes if n.startswith('frozen_fp32="compute_dtype"'))
    assert "1 kept in fp32" in note and "model.norm.weight" in note

    kept = qlora_model(path, compute_dtype=torch.bfloat16, dtype=torch.bfloat16)
    before = _frozen_fp32(kept)
    fxopt.optimize(kept, inner_backend="aot_eager")
    assert _frozen_fp32(kept).keys() == before.keys()  # default "keep": nothing cast
    assert any("prepare_model_for_kbit_training's upcast" in n for n in fxopt.report(kept).notes)

    fp32_compute = qlora_model(path, compute_dtype=torch.float32, dtype=torch.bfloat16)
    fxopt.optimize(fp32_compute, inner_backend="aot_eager", frozen_fp32="compute_dtype")
    assert _frozen_fp32(fp32_compute).keys() == before.keys()  # fp32 compute dtype: nothing to cast to
    assert any("changed nothing" in n for n in fxopt.report(fp32_compute).notes)


def test_explain_with_frozen_fp32_leaves_the_model(checkpoints, torch_math):
    # explain shows what optimize(frozen_fp32="compute_dtype") would match, and puts the fp32 parameters back
    model = qlora_model(checkpoints("llama", torch.bfloat16), compute_dtype=torch.bfloat16, dtype=torch.bfloat16)
    before = _frozen_fp32(model)
    report = fxopt.explain(model, frozen_fp32="compute_dtype", verbose=False, **batch())
    assert any("frozen fp32 parameters cast to torch.bfloat16" in n for n in report.notes)
    assert {r.location for r in report.matched("swiglu")} == {f"base_model.model.model.layers.{i}.mlp.down_proj"
                                                              for i in (0, 1)}  # traced whole: one per layer
    after = _frozen_fp32(model)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def test_frozen_fp32_bad_value():
    with pytest.raises(ValueError, match="frozen_fp32 must be one of"):
        fxopt.OptimizeConfig(frozen_fp32="bf16")


# ---------------------------------------------------------------------------------------------------------
# the older forward form (dequantize_4bit -> linear / matmul inside the autograd.Function), on hand-made modules


class _Dequant4bit(torch.autograd.Function):
    """bitsandbytes' 4-bit matmul as older versions (and some CUDA paths) trace: dequantize, then linear or
    matmul; the backward dequantizes again. `form` picks the orientation tricks the pass must follow."""

    @staticmethod
    def forward(ctx, x, packed, absmax8, absmax2, code2, offset, shape, quant_type, form):
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax8, absmax2, code2, 256, torch.float32)
        absmax += offset
        w = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, 64, quant_type, shape, torch.float32)
        ctx.save_for_backward(packed, absmax8, absmax2, code2, offset)
        ctx.meta = (shape, quant_type, form)
        if form == "linear":
            return torch.nn.functional.linear(x, w.t().to(x.dtype).t())
        if form == "matmul":
            return torch.matmul(x, w.t())
        return torch.matmul(x, w)  # "kn": a [K, N]-quantized weight, read as x @ W

    @staticmethod
    def backward(ctx, grad):
        packed, absmax8, absmax2, code2, offset = ctx.saved_tensors
        shape, quant_type, form = ctx.meta
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax8, absmax2, code2, 256, torch.float32)
        absmax = absmax + offset
        w = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, 64, quant_type, shape, torch.float32)
        return (grad @ w if form != "kn" else grad @ w.t()), None, None, None, None, None, None, None, None


class _Quantized(torch.nn.Module):
    def __init__(self, n, k, form):
        super().__init__()
        import bitsandbytes.functional as bnbf

        torch.manual_seed(0)
        packed, qs = bnbf.quantize_4bit(torch.randn(n, k), blocksize=64, quant_type="nf4", compress_statistics=True)
        self.register_buffer("packed", packed)
        for name, t in (("absmax8", qs.absmax), ("absmax2", qs.state2.absmax), ("code2", qs.state2.code),
                        ("offset", qs.offset)):
            self.register_buffer(name, t)
        self.shape, self.form = [n, k], form

    def forward(self, x):
        return _Dequant4bit.apply(x, self.packed, self.absmax8, self.absmax2, self.code2, self.offset, self.shape,
                                  "nf4", self.form)


@pytest.mark.parametrize("form,n,k,fused", [("linear", 48, 64, True), ("matmul", 48, 128, True),
                                            ("kn", 64, 48, False)])
def test_dequantize_then_matmul_form(form, n, k, fused):
    # the pass reads N, K, blocksize, quant type and the double-quantization state from the body's ops
    mod = _Quantized(n, k, form)
    kx = k if form != "kn" else n
    x = torch.randn(3, 5, kx, requires_grad=True)
    ref_out = mod(x)
    ref_out.square().sum().backward()
    ref_grad, x.grad = x.grad, None
    opt = fxopt.optimize(_Quantized(n, k, form), inner_backend="aot_eager")
    out = opt(x)
    out.square().sum().backward()
    assert rel_err(out, ref_out) < 1e-5 and rel_err(x.grad, ref_grad) < 1e-5
    report = fxopt.report(opt)
    if fused:
        assert len(report.matched("qlora")) == 1 and not report.rejected("qlora")
        assert f"fxopt::linear_4bit, nf4, blocksize 64, double quant, W[{n}, {k}]" == report.matched("qlora")[0].reason
    else:
        assert not report.matched("qlora")
        assert "[K, N] orientation" in report.rejected("qlora")[0].reason


def test_custom_backward_is_not_replaced():
    # a 4-bit forward whose backward is not bitsandbytes' (here: no input gradient through the weight) is left alone
    class NoGradThroughW(_Dequant4bit):
        @staticmethod
        def backward(ctx, grad):
            return grad[..., :1].expand(*grad.shape[:-1], ctx.meta[0][1]).clone(), *([None] * 8)

    class M(_Quantized):
        def forward(self, x):
            return NoGradThroughW.apply(x, self.packed, self.absmax8, self.absmax2, self.code2, self.offset,
                                        self.shape, "nf4", "linear")

    opt = fxopt.optimize(M(48, 64, "linear"), inner_backend="aot_eager")
    x = torch.randn(2, 64, requires_grad=True)
    opt(x).sum().backward()
    report = fxopt.report(opt)
    assert not report.matched("qlora")
    assert "does not dequantize" in report.rejected("qlora")[0].reason


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_qlora_bf16_on_gpu(checkpoints, family):
    """On the GPU: QLoRA as users run it (bf16 compute dtype, default Inductor backend), every 4-bit LoRA linear
    fused, loss and LoRA gradients as close to the same quantized model computing in fp32 as bnb's own bf16 path."""
    path = checkpoints(family)
    model = qlora_model(path, compute_dtype=torch.bfloat16, dtype=torch.bfloat16, device="cuda")
    eager = qlora_model(path, compute_dtype=torch.bfloat16, dtype=torch.bfloat16, device="cuda")
    ref32 = qlora_model(path, compute_dtype=torch.float32, dtype=torch.bfloat16, device="cuda")
    report = optimize_and_check_on_gpu(model, eager, ref32)
    assert not report.rejected("qlora")
    assert set(_ops(report, "lora_linear_4bit")) == _all_layers()


@pytest.mark.gpu
def test_frozen_fp32_compute_dtype_on_gpu(checkpoints):
    """The qlora workload's recipe on the GPU (bf16 checkpoint, upcast, bf16 compute) with frozen_fp32=
    "compute_dtype" and the default Inductor backend: as accurate as the hand-cast unoptimized model, every
    4-bit LoRA linear fused, and the dense passes (attention, norms, loss) matched on the bf16 stream."""
    path = checkpoints("llama", torch.bfloat16)
    model = qlora_model(path, compute_dtype=torch.bfloat16, dtype=torch.bfloat16, device="cuda")
    eager = qlora_model(path, compute_dtype=torch.bfloat16, dtype=torch.bfloat16, device="cuda")
    ref32 = qlora_model(path, compute_dtype=torch.float32, dtype=torch.bfloat16, device="cuda")
    names = _frozen_fp32(eager)
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if name in names:
                p.data = p.data.to(torch.bfloat16)
    report = optimize_and_check_on_gpu(model, eager, ref32, frozen_fp32="compute_dtype")
    assert set(_ops(report, "lora_linear_4bit")) == _all_layers()
    assert report.matched("attention") and report.matched("rms_norm") and report.matched("cross_entropy")
