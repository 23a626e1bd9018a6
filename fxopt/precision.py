"""The QLoRA recipe's fp32 upcast, and the option to run those parts in the 4-bit layers' compute dtype.

peft's prepare_model_for_kbit_training casts every parameter that is not 4-bit (the norms, the embedding, the
tied lm_head) to fp32. The embedding's output then starts an fp32 residual stream: the norms, q/k/v (bitsandbytes
returns its result in the input's dtype), attention, the MLP's activation and the loss all run in fp32, on CUDA
cores or as split products, while only the 4-bit GEMMs run in the compute dtype (bf16). On the qlora workload
that is most of the step's time and memory.

frozen_fp32="compute_dtype" casts those parameters back to the compute dtype when that loses nothing: frozen
(no optimizer state, no gradient) and every value exactly representable in it, which holds after the recipe's
upcast of a bf16 or fp16 checkpoint. No parameter value changes; the activations are then computed as in a bf16
LoRA run of the same weights (the loss differs from the fp32 recipe's at bf16 rounding). Trainable parameters
(the LoRA adapters, fp32 by PEFT's default) are left alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def four_bit_compute_dtypes(model: nn.Module) -> set[torch.dtype]:
    """The compute dtypes of the model's bitsandbytes 4-bit linears (a Linear4bit: a weight carrying a
    quant_state, and a compute_dtype; found by attributes, so bitsandbytes need not be importable)."""
    found = set()
    for m in model.modules():
        if getattr(getattr(m, "weight", None), "quant_state", None) is not None and hasattr(m, "compute_dtype"):
            found.add(m.compute_dtype)
    return found


def _frozen_fp32_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every frozen fp32 parameter that is not 4-bit, tied ones once."""
    seen, out = set(), []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or p.dtype != torch.float32 or p.requires_grad or hasattr(p, "quant_state"):
            continue
        seen.add(id(p))
        out.append((name, p))
    return out


def _gib(params) -> float:
    return sum(p.numel() * p.element_size() for p in params) / 2**30


def apply_frozen_fp32(model: nn.Module, policy: str, report) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """policy "keep": leave the parameters; if the recipe's upcast is there, the report says what it costs and
    how to avoid it. "compute_dtype": cast the frozen fp32 parameters that are exact in the compute dtype to it
    (in place: the same Parameter objects, so tied weights stay tied and optimizers built before still hold
    them); the report says how many and which could not be. Returns (parameter, its fp32 data) of each cast
    one, for a caller that puts them back (fxopt.explain leaves the model as it was)."""
    dtypes = four_bit_compute_dtypes(model)
    params = _frozen_fp32_params(model)
    half = dtypes <= {torch.bfloat16, torch.float16} and len(dtypes) == 1
    if not half or not params:
        if policy == "compute_dtype":
            why = ("no bitsandbytes 4-bit linear" if not dtypes else "no frozen fp32 parameter" if half else
                   f"the 4-bit linears compute in {', '.join(sorted(str(d) for d in dtypes))}, not one half dtype")
            report.note(f'frozen_fp32="compute_dtype" changed nothing: {why}')
        return []
    dtype = next(iter(dtypes))
    if policy == "keep":
        report.note(f"{len(params)} frozen parameters ({_gib(p for _, p in params):.2f} GiB) are fp32 in a model "
                    f"whose 4-bit linears compute in {dtype} (prepare_model_for_kbit_training's upcast): the residual "
                    f"stream, attention and the loss run in fp32. frozen_fp32=\"compute_dtype\" runs them in {dtype} "
                    "(parameter values unchanged; the loss then differs at bf16 rounding; with float16, values past "
                    "its range overflow where fp32 would not)")
        return []
    cast, inexact = [], []
    with torch.no_grad():
        for name, p in params:
            low = p.data.to(dtype)
            if torch.equal(low.to(torch.float32), p.data):
                cast.append((p, p.data))
                p.data = low
            else:
                inexact.append(name)
    text = f"frozen_fp32=\"compute_dtype\": {len(cast)} frozen fp32 parameters cast to {dtype} (values unchanged, " \
           f"{_gib(p for p, _ in cast):.2f} GiB freed)"  # fp32 -> 16 bits frees what is left
    if inexact:
        text += f"; {len(inexact)} kept in fp32, their values not exact in {dtype} (e.g. {inexact[0]})"
    report.note(text)
    return cast
