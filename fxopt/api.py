"""The user-facing entry points: optimize(model) and explain(model, **batch)."""
from __future__ import annotations

import torch
import torch.nn as nn

from fxopt.backend import make_backend
from fxopt.config import CHECKPOINTING_POLICIES, OptimizeConfig
from fxopt.precision import apply_frozen_fp32
from fxopt.recompute import in_graph
from fxopt.regions import compile_blocks, find_blocks
from fxopt.report import Report


def _check_model(model, fn):
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxopt.{fn}: model must be a torch.nn.Module, got {type(model).__name__}")


def optimize(model: nn.Module, config: OptimizeConfig | None = None, **options) -> nn.Module:
    """Compile `model` in place with fxopt's passes and return the same object.

    Options are the fields of `OptimizeConfig` (pass `config=` or keywords, e.g. `dump_dir="dumps"`).
    The model keeps its class, state_dict keys, save_pretrained, merge_and_unload and generate; train it
    as before (your own loop, HF Trainer with torch_compile left off, TRL). The match report fills in as
    graphs are compiled (on the first forward): `fxopt.report(model)`.
    """
    _check_model(model, "optimize")
    config = OptimizeConfig.from_kwargs(config, **options)
    if getattr(model, "_fxopt_report", None) is not None:
        raise ValueError("fxopt.optimize: this model was already optimized; optimize it once")
    report = Report()
    if config.deterministic:
        from fxopt.kernels.common import set_deterministic

        set_deterministic()
    # A training forward must not build a KV cache: it is never read, and with regional compilation the
    # per-layer cache state would make every block compile anew.
    hf_config = getattr(model, "config", None)
    if hf_config is not None and getattr(hf_config, "use_cache", None):
        hf_config.use_cache = False
    _room_to_recompile()
    _experts_in_one_graph(model, config, report)
    apply_frozen_fp32(model, config.frozen_fp32, report)
    found = find_blocks(model) if config.regional else None
    backend = make_backend(config, report, model)
    if found is not None:
        report.set_blocks(found[0], len(found[1]), type(found[1][0]).__name__)
        compile_blocks(found[1], backend, config.dynamic, config.memory, in_graph(config))
    elif config.memory in CHECKPOINTING_POLICIES:
        import warnings

        warnings.warn(f"fxopt: memory={config.memory!r} was asked for, but no repeated block (a ModuleList of "
                      "one class) was found in the model: no activation is recomputed or offloaded", stacklevel=2)
    model.register_forward_pre_hook(_same_device_as_weights, with_kwargs=True)
    model.compile(backend=backend, dynamic=config.dynamic)
    model._compiled_call_impl = _floats_static(model._compiled_call_impl)
    model._fxopt_report = report
    model._fxopt_config = config
    return model


def _experts_in_one_graph(model: nn.Module, config: OptimizeConfig, report: Report) -> None:
    """transformers' MoE experts with experts_implementation="eager" run a Python loop over the experts that
    got tokens (data-dependent indexing: the graph breaks in it, and the moe pass has nothing to match).
    "grouped_mm" is the same math as one graph, the form the pass matches: switch to it through transformers'
    own setter, unless the moe pass is disabled; the report says so."""
    if "moe" in config.disable:
        return
    cfg = getattr(model, "config", None)
    setter = getattr(model, "set_experts_implementation", None)
    if cfg is None or setter is None or getattr(cfg, "_experts_implementation", None) != "eager":
        return
    # transformers sets "eager" on dense models too (a 4-bit Llama loaded by from_pretrained). The modules the
    # setter switches are the experts classes its use_experts_implementation decorator built (they carry its
    # layout flags); with none, there is nothing to switch
    if not any(hasattr(m, "is_concatenated") and hasattr(m, "has_gate") for m in model.modules()):
        return
    try:
        setter("grouped_mm")
    except Exception as e:  # an older transformers, or a model that cannot take it: the loop stays (reported)
        report.note(f'experts_implementation "eager" could not be switched to "grouped_mm" ({type(e).__name__}: '
                    f"{e}): the experts loop is not fused")
        return
    report.note('experts_implementation "eager" switched to "grouped_mm" (the same math in one graph, which the moe '
                'pass fuses; disable=["moe"] keeps the eager loop)')


RECOMPILE_LIMIT = 64


def _room_to_recompile() -> None:
    """Code that every optimized model runs (transformers' decorator wrappers around a decoder layer's
    forward, PEFT's layers) is one code object to Dynamo, holding a compiled entry per model and per block
    variant. With Dynamo's default recompile_limit (8) a process that optimizes a second or third model ran
    that model's blocks eagerly (seen with two tiny models in one process). fxopt raises the limit (process-
    wide: Dynamo has no per-function limit) and never lowers one a user set higher."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < RECOMPILE_LIMIT:
        setattr(cfg, name, RECOMPILE_LIMIT)


def _floats_static(call):
    """`call` (the model's compiled call: every frame of the model compiles inside it, blocks included) with
    Dynamo's specialize_float on while it runs. Code shared by every model (transformers' decorator wrappers
    around a decoder layer's forward) is one code object to Dynamo: once two models with different float
    attributes ran through it (Llama's norm eps 1e-6, then GLM's 1.5625e-7), Dynamo's automatic dynamic made
    the float a graph input, and a norm's eps a runtime value no fused op can take (the norms stayed unfused).
    Specialized, a float is a constant guarded by value, as in one-model processes. Only inside this call:
    the user's other compiles keep their setting."""
    cfg = torch._dynamo.config
    if not hasattr(cfg, "specialize_float"):
        return call
    return cfg.patch(specialize_float=True)(call)


@torch._dynamo.disable
def _same_device_as_weights(module: nn.Module, args, kwargs) -> None:
    """The compiled call is bound to this model. nn.DataParallel copies a module's attributes into per-GPU
    replicas, so each replica would run this model's compiled code with its own GPU's inputs (seen with HF
    Trainer on a 2-GPU host without torchrun: a device mismatch deep inside Dynamo). Say so instead."""
    x = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
    weight = next(module.parameters(), None)
    if isinstance(x, torch.Tensor) and weight is not None and x.device != weight.device:
        raise RuntimeError(
            f"fxopt: the model's input is on {x.device} but its weights are on {weight.device}. fxopt does not "
            "support nn.DataParallel (HF Trainer uses it on several GPUs when not launched by torchrun): launch "
            "with torchrun for DistributedDataParallel, or make one GPU visible (CUDA_VISIBLE_DEVICES=0).")


def report(model: nn.Module) -> Report:
    """The match report of an optimized model (filled in as its graphs are compiled)."""
    _check_model(model, "report")
    rep = getattr(model, "_fxopt_report", None)
    if rep is None:
        raise ValueError("fxopt.report: model was not optimized with fxopt.optimize (use fxopt.explain)")
    return rep


def explain(model: nn.Module, config: OptimizeConfig | None = None, *, verbose: bool = True, **example_batch) -> Report:
    """Run one forward of `model` on `example_batch` through fxopt's passes (gradients on, no backward, no
    optimizer step), and return
    (and print) the match report: what matched, where, and why each near-miss was rejected. Keywords that are
    OptimizeConfig fields (e.g. disable=, frozen_fp32=) are options, as for optimize; the rest is the batch.

    An optimized model is run as it is; any other model is traced whole with the passes and the cheap
    "eager" inner backend, and is left as it was (not compiled)."""
    _check_model(model, "explain")
    # options as keywords, as optimize takes them (no model input shares a name with an OptimizeConfig field)
    import dataclasses

    names = {f.name for f in dataclasses.fields(OptimizeConfig)}
    options = {k: example_batch.pop(k) for k in list(example_batch) if k in names}
    if not example_batch:
        raise TypeError("fxopt.explain: pass an example batch as keywords, e.g. explain(model, input_ids=ids)")
    rep = getattr(model, "_fxopt_report", None)
    # Gradients on, as in training: the graph (and so the report) is the one a training step compiles
    # (an eval forward is another graph: e.g. the fused loss keeps real logits there and is not matched).
    if rep is not None and (options or config is not None):
        raise ValueError("fxopt.explain: this model was optimized: its options are the ones optimize was given "
                         f"(got {sorted(options) or 'config'} here); explain it without options")
    with torch.enable_grad():
        if rep is not None:
            model(**example_batch)
        else:
            config = dataclasses.replace(OptimizeConfig.from_kwargs(config, **options), inner_backend="eager",
                                         verbose=False)
            rep = Report()
            cast = apply_frozen_fp32(model, config.frozen_fp32, rep)  # the graphs optimize would compile ...
            try:
                torch.compile(model, backend=make_backend(config, rep, model))(**example_batch)
            finally:
                for p, fp32 in cast:  # ... and the model as it was
                    p.data = fp32
    if verbose:
        print(rep.to_markdown())
    return rep
