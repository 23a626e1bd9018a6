"""Tiny real HF models built from their transformers config classes (random weights, no download)."""
from __future__ import annotations

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
    cfg = FAMILIES[family]()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    opts = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    opts.update(lora)
    model = get_peft_model(model, LoraConfig(**opts))
    # PEFT initialises B to zero, which would make every adapter gradient but B's vanish: randomise it
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
