"""`python -m fxopt demo`: LoRA fine-tuning of a Llama-architecture model, unoptimized vs fxopt, side by side.

Builds the model from its transformers config (random weights, nothing downloaded), adds PEFT LoRA, trains
the same steps on the same batches twice (as is, then after fxopt.optimize), and prints the match report,
both loss curves and both step times.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

SIZES = {
    # name: (LlamaConfig kwargs, batch, seq)
    "tiny": (dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512), 2, 64),
    "small": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=8192), 4, 256),
    # the dense workload of BASELINES.md (the Llama-3.2-1B shape)
    "dense": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True), 4, 2048),
}


def build(size: str, device: str, dtype: torch.dtype, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg_kwargs, bsz, seq = SIZES[size]
    model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg_kwargs), attn_implementation="sdpa", dtype=dtype)
    model = get_peft_model(model.to(device), LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.config.use_cache = False
    return model, bsz, seq, cfg_kwargs["vocab_size"]


def train(model, batches, label: str, device: str):
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, times = [], []
    for b in tqdm(batches, desc=label, unit="step"):
        t0 = time.perf_counter()
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return losses, times


def run_demo(size: str | None = None, steps: int | None = None, device: str | None = None) -> dict:
    import fxopt

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = size or ("dense" if device == "cuda" else "tiny")
    if size not in SIZES:
        raise ValueError(f"--size must be one of {sorted(SIZES)}, got {size!r}")
    steps = steps or (30 if device == "cpu" else 20)
    if steps < 3:
        raise ValueError(f"--steps must be at least 3, got {steps}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, bsz, seq, vocab = build(size, device, dtype)
    baseline = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (bsz, seq), generator=g).to(device)
        batches.append(dict(input_ids=ids, labels=ids))
    print(f"fxopt demo: Llama-architecture model ({size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"params, LoRA r=16 on q,k,v,o,gate,up,down), batch {bsz} x {seq} tokens, {steps} steps on {device}")
    base_losses, base_times = train(baseline, batches, "unoptimized", device)
    del baseline
    fxopt.optimize(model)
    fx_losses, fx_times = train(model, batches, "fxopt", device)

    print()
    print(fxopt.report(model).to_markdown())
    print()
    print("step | loss unoptimized | loss fxopt")
    for i in sorted({0, 1, steps // 2, steps - 1}):
        print(f"{i:4d} | {base_losses[i]:16.5f} | {fx_losses[i]:10.5f}")
    max_diff = max(abs(a - b) for a, b in zip(base_losses, fx_losses))
    # the first fxopt step includes compilation: time the steady state only
    base_step = statistics.median(base_times[2:])
    fx_step = statistics.median(fx_times[2:])
    tokens = bsz * seq
    print(f"\nmax |loss difference| over {steps} steps: {max_diff:.2e}")
    print(f"step time (median, steady state): unoptimized {base_step * 1e3:.1f} ms ({tokens / base_step:,.0f} tokens/s), "
          f"fxopt {fx_step * 1e3:.1f} ms ({tokens / fx_step:,.0f} tokens/s), {base_step / fx_step:.2f}x")
    print(f"fxopt first step (compile included): {fx_times[0]:.1f} s")
    return dict(base_losses=base_losses, fx_losses=fx_losses, base_step=base_step, fx_step=fx_step,
                first_step=fx_times[0], matched=len(fxopt.report(model).matched()))
