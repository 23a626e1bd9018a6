"""Tiny real HF models built from their transformers config classes (random weights, no download)."""
from __future__ import annotations

import contextlib
import copy

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "mistral": lambda: MistralConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),  # q/k/v carry a bias: covers the biased base linear
}


def tiny_lora_model(family="llama", dtype=torch.float32, seed=0, attn="sdpa", **lora):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation=attn, dtype=dtype)
    return with_lora(model, **lora)


def with_lora(model, target_modules=TARGETS, **lora):
    """`model` under PEFT LoRA (r=4, alpha 8, no dropout unless given). PEFT initialises B to zero, which would
    make every adapter gradient but B's vanish: B is randomised."""
    opts = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules)
    opts.update(lora)
    model = get_peft_model(model, LoraConfig(**opts))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def twin(model):
    """An independent copy to run unoptimized beside the optimized one."""
    return copy.deepcopy(model)


def batch(seq=16, bsz=2, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (bsz, seq), generator=g)
    return dict(input_ids=ids, labels=ids.clone())


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def train_step(model, b, seed=None):
    """One forward with labels and backward; returns (loss, {name: grad of each trained parameter}). seed:
    the same dropout draws in the models compared."""
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    loss = model(**b).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def assert_same_training(model, ref, b, tol=1e-5, seed=None):
    """The optimized `model` and the unoptimized `ref` give the same loss and every gradient (fp32: DESIGN's
    1e-5). Returns the optimized model's (loss, grads)."""
    loss, grads = train_step(model, b, seed)
    ref_loss, ref_grads = train_step(ref, b, seed)
    assert rel_err(loss, ref_loss) < tol, (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < tol, (name, rel_err(grads[name], ref_grads[name]))
    return loss, grads


def assert_no_less_accurate(model, eager, ref32, b, factor=1.5, floor=1e-2, context=contextlib.nullcontext):
    """Half precision: the optimized `model` and the unoptimized `eager` both carry the rounding of their dtype,
    so each is measured against `ref32` (the same weights computing in fp32). fxopt must not add to it: its loss
    and every gradient within max(floor, factor x eager's error), floor being DESIGN's bf16 tolerance. Returns
    {name: (fxopt's error, eager's error)}."""
    runs = {}
    with context():  # e.g. autocast: for the two models compared, not the fp32 reference
        runs.update({k: train_step(m, b) for k, m in (("fxopt", model), ("eager", eager))})
    runs["fp32"] = train_step(ref32, b)
    (loss, grads), (e_loss, e_grads), (f_loss, f_grads) = runs["fxopt"], runs["eager"], runs["fp32"]
    assert grads.keys() == e_grads.keys() == f_grads.keys() and grads
    errs = {"loss": (rel_err(loss, f_loss), rel_err(e_loss, f_loss))}
    errs.update({n: (rel_err(grads[n], f_grads[n]), rel_err(e_grads[n], f_grads[n])) for n in grads})
    for name, (fx, ea) in errs.items():
        assert fx <= max(floor, factor * ea), (name, fx, ea)
    return errs


def optimize_and_check_on_gpu(model, eager, ref32, **opts):
    """The bf16 model test on the GPU: optimize `model` (default Inductor backend), train one step of a
    [4, 64] batch beside `eager` and `ref32` (assert_no_less_accurate), print the worst errors and the match
    report, and return the report."""
    import fxopt

    fxopt.optimize(model, **opts)
    b = {k: v.cuda() for k, v in batch(seq=64, bsz=4).items()}
    errs = assert_no_less_accurate(model, eager, ref32, b)
    print("worst (fxopt, eager):", sorted(errs.items(), key=lambda kv: -kv[1][0])[:3])
    report = fxopt.report(model)
    print(report.to_markdown())
    return report


def assert_no_recompile(model, lengths=(16, 24, 32, 17, 40, 9)):
    """Train steps at each sequence length. The first change marks the length dynamic (one more compile);
    after that no length may compile a new graph: no pass specialises a symbolic size (a length of at most 16,
    one kernel strip, included: a size derived from the length may not be 1 vs more)."""
    from torch._dynamo.utils import counters

    train_step(model, batch(seq=lengths[0]))
    train_step(model, batch(seq=lengths[1]))
    before = counters["stats"]["unique_graphs"]
    for seq in lengths[2:]:
        train_step(model, batch(seq=seq))
    assert counters["stats"]["unique_graphs"] == before
