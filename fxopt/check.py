"""`python -m fxopt check --model MODEL`: does fxopt train this architecture right? A tiny model of the family
(random weights, nothing downloaded), PEFT LoRA on all linears, trained for a few steps as it is and after
`fxopt.optimize`, on the same batches: per-step losses and every LoRA gradient compared, and the match report.

MODEL is a transformers model type ("falcon", "cohere", ...), a config class name ("LlamaConfig") or a local
model directory (loaded as it is, not shrunk). Dropout is set to 0 in the tiny configs (with it the two runs
draw different masks and cannot agree). Exit status 0 when they agree within the tolerance, 1 when not.
"""
from __future__ import annotations

import copy
import time

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=256, max_position_embeddings=256)


def tiny_config(name: str):
    """The transformers config of model type or config class `name`, shrunk to TINY and with dropout off."""
    import transformers
    from transformers import AutoConfig

    if name.endswith("Config") and hasattr(transformers, name):
        cfg = getattr(transformers, name)()
    else:
        try:
            cfg = AutoConfig.for_model(name)
        except ValueError as e:
            first = str(e).split(". ")[0]  # transformers goes on to list every known model type
            raise SystemExit(f"--model: {name!r} is not a transformers model type, config class or local model "
                             f"directory ({first}; e.g. llama, falcon, LlamaConfig)") from None
    for key, val in TINY.items():
        if key in cfg.to_dict():
            try:
                setattr(cfg, key, val)
            except AttributeError:  # a derived size (a property): it follows the others
                pass
    head = TINY["hidden_size"] // TINY["num_attention_heads"]
    if isinstance(getattr(cfg, "rotary_dim", None), int) and cfg.rotary_dim > head:  # GPT-J, CodeGen
        cfg.rotary_dim = head // 2
    for key, val in list(cfg.to_dict().items()):
        if "drop" in key and isinstance(val, float):
            setattr(cfg, key, 0.0)
    if getattr(cfg, "pad_token_id", None) is None or cfg.pad_token_id >= cfg.vocab_size:
        cfg.pad_token_id = 0
    return cfg


def build(model_arg: str, attn: str | None):
    import os

    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn} if attn else {}
    if os.path.isdir(model_arg):
        return AutoModelForCausalLM.from_pretrained(model_arg, local_files_only=True, **kwargs)
    return AutoModelForCausalLM.from_config(tiny_config(model_arg), **kwargs)


def _lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_check(model_arg: str, steps: int = 3, seq: int = 32, attn: str | None = None, seed: int = 0,
              tol: float | None = None, device: str | None = None) -> bool:
    import torch
    from peft import LoraConfig, get_peft_model

    import fxopt

    if steps < 1 or seq < 2:
        raise SystemExit("--steps must be >= 1 and --seq >= 2")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = build(model_arg, attn).to(device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # B starts at 0: randomise it so that the adapters change the output and get gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.train()
    ref = copy.deepcopy(model)
    dtype = next(model.parameters()).dtype
    tol = tol if tol is not None else {torch.float32: 1e-4}.get(dtype, 2e-2)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(1, vocab, (2, seq), generator=gen).to(device) for _ in range(steps)]

    fxopt.optimize(model)
    worst = 0.0
    rows = []
    for i, ids in enumerate(batches):
        results = []
        for m in (ref, model):
            t0 = time.perf_counter()
            m.zero_grad(set_to_none=True)
            try:
                loss = m(input_ids=ids, labels=ids, use_cache=False).loss  # training: no KV cache
                loss.backward()
            except Exception as e:
                if m is not ref:
                    raise
                # not fxopt's to answer for: say so instead of a traceback that looks like fxopt's
                raise SystemExit(f"{model_arg}: the model as it is (not optimized) fails on a tiny config: "
                                 f"{type(e).__name__}: {str(e)[:500]}") from None
            results.append((loss.detach(), _lora_grads(m), time.perf_counter() - t0))
        (l_ref, g_ref, t_ref), (l_opt, g_opt, t_opt) = results
        if set(g_ref) != set(g_opt):
            print(f"step {i + 1}: gradients of different parameters: {sorted(set(g_ref) ^ set(g_opt))[:4]}")
            return False
        loss_err = abs(l_opt.item() - l_ref.item()) / max(abs(l_ref.item()), 1e-30)
        grad_err = max((_rel(g_opt[n], g_ref[n]) for n in g_ref), default=0.0)
        worst = max(worst, loss_err, grad_err)
        rows.append(f"step {i + 1}: loss {l_ref.item():.6f} / {l_opt.item():.6f} (rel diff {loss_err:.1e}), "
                    f"worst LoRA gradient rel diff {grad_err:.1e} over {len(g_ref)}; {t_ref:.1f} s / {t_opt:.1f} s")
        print(rows[-1], flush=True)
        with torch.no_grad():  # the same plain SGD step on both, so later steps compare from the same weights
            for m in (ref, model):
                for p in m.parameters():
                    if p.requires_grad and p.grad is not None:
                        p.add_(p.grad, alpha=-1e-2)
                        p.grad = None
    print()
    print(fxopt.report(model).to_markdown())
    ok = worst <= tol
    print(f"\n{'OK' if ok else 'MISMATCH'}: {model_arg} ({dtype}, {device}), worst relative difference {worst:.1e} "
          f"(tolerance {tol:g}) over {steps} step(s); first step timings include compilation")
    return ok
