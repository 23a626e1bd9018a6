"""The options of `fxopt.optimize`: one small dataclass, validated on construction."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

INNER_BACKENDS = ("inductor", "aot_eager", "eager")
MEMORY_POLICIES = ("none", "norms", "recompute", "offload")
CHECKPOINTING_POLICIES = ("recompute", "offload")  # the ones that checkpoint whole blocks: they need regional=True
FROZEN_FP32 = ("keep", "compute_dtype")  # fxopt.precision


@dataclass(frozen=True)
class OptimizeConfig:
    """Options for `fxopt.optimize(model, config)`.

    disable:       names of passes to turn off (see `fxopt.pass_names()`), e.g. ("lora",); default: the
                   comma-separated FXOPT_DISABLE environment variable, if set.
    inner_backend: what compiles the graph after fxopt's passes: "inductor" (default), or "aot_eager" /
                   "eager" for debugging.
    dump_dir:      write per captured graph the code before/after the passes and the match report here
                   (the FXOPT_DUMP environment variable does the same).
    regional:      compile the repeated decoder block once and reuse it for every block (short first step);
                   False compiles the whole model as one region.
    dynamic:       passed to torch.compile (None: Dynamo decides, marking sizes dynamic after a change).
    verbose:       print the match report of each graph as it is compiled.
    keep_logits:   in a training forward (gradients on) whose loss fxopt fuses with the lm_head, the model
                   would also return the full [batch, seq, vocab] logits; computing them costs the memory the
                   fusion saves, so by default they are not: `outputs.logits` is an empty [batch, 0, vocab]
                   tensor there (eval/no_grad forwards return real logits). True keeps them (and the loss
                   is then left unfused).
    deterministic: bitwise-identical results run to run (same inputs, same machine): fxopt's Triton kernels take
                   the first config of their tuning list instead of the fastest measured (timing noise could
                   pick another block size, so another summation order), and torch's deterministic algorithms
                   are turned on (warn only), which also makes Inductor filter its reduction configs.
                   Process-wide once set (torch's switch is global). Slower kernels: for debugging and tests.
    cudagraphs:    replay each compiled region as a CUDA graph (Inductor's CUDA graph trees), default on:
                   it removes the CPU cost of launching kernels, which bounds a step once the GPU work is
                   fused (dense workload, H100: 62.0k tokens/s with, 44.5-52.4k without). A graph meeting a
                   new sequence length records a new CUDA graph for it (memory per recorded size).
                   A tensor a step returns (the loss) is overwritten by the next step: torch raises if you
                   read it after that, so read or clone it first. CUDA + Inductor only (ignored elsewhere).
    memory:        activation memory policy of the repeated decoder blocks in training (regional=True):
                   "norms" (default): the blocks' norm outputs (what their LoRA linears save) are recomputed in
                   the backward from what the norms save anyway: two [tokens x hidden] tensors fewer per block,
                   for one more norm kernel each (Inductor only, and without regional blocks: as "none"). The
                   fastest policy that fits the dense workload's 10 GiB target (H100: 9.1 GiB at 71.8k tokens/s,
                   against 10.1 GiB at 72.8k with "none"),
                   "none": every block keeps what its backward needs (the fastest: 0.6-1.4% more tokens/s on
                   the dense workload, 2.7% on moe, where memory is no constraint),
                   "recompute": each block keeps only its inputs and its compiled backward recomputes the
                   fused forward (activation checkpointing, as HF's gradient_checkpointing but for any model;
                   inside the graph with Inductor, so CUDA graphs stay on),
                   "offload": as "recompute", and those inputs wait in (pinned) CPU memory until the backward
                   (torch.utils.checkpoint under save_on_cpu; CUDA graphs off for the model).
    moe_keep_projection: the MoE experts op (`fxopt::moe_experts`) recomputes the experts' gate_up projection
                   [tokens * top_k, 2 * moe_intermediate] in its backward rather than keep it (the default, and
                   what a memory budget wants). True keeps it from the forward (`fxopt::moe_experts_saving`):
                   one GEMM of the activation backward's three, for that tensor per MoE layer (moe-big: ~200 MiB
                   per layer, +2.2 GiB peak, +6.6% tokens/s on an H200). None (default): keep it only under
                   memory="none", the policy that recomputes nothing.
    compile_threads: threads that compile the Triton kernels of each decoder-block graph ahead of the graph's
                   first run (fxopt.precompile: a cold first step compiled them one by one where each was first
                   launched; H200, dense: 25.2 -> 20.4 s). None (default): min(8, CPUs - 1); 0: off.
    frozen_fp32:   a bitsandbytes 4-bit model prepared by peft's prepare_model_for_kbit_training has its other
                   parameters (norms, embedding, lm_head) upcast to fp32, so the residual stream, attention
                   and the loss run in fp32 (most of a QLoRA step's time). "keep" (default) computes as the
                   model is; "compute_dtype" casts the frozen fp32 parameters whose values are exact in the 4-bit
                   compute dtype (bf16/fp16) back to it, in place: no value changes, activations are then
                   computed in that dtype as in a bf16 LoRA run (the loss differs at bf16 rounding). Trainable
                   parameters (the adapters) stay fp32. The report says what was cast.
    """

    disable: tuple[str, ...] = field(default_factory=lambda: tuple(
        n for n in os.environ.get("FXOPT_DISABLE", "").split(",") if n))
    inner_backend: str = "inductor"
    dump_dir: str | None = None
    regional: bool = True
    dynamic: bool | None = None
    verbose: bool = False
    keep_logits: bool = False
    cudagraphs: bool = True
    deterministic: bool = False
    memory: str = "norms"
    frozen_fp32: str = "keep"
    moe_keep_projection: bool | None = None
    compile_threads: int | None = None

    def __post_init__(self):
        from fxopt.passes import pass_names

        names = (self.disable,) if isinstance(self.disable, str) else self.disable
        if not isinstance(names, (list, tuple, set, frozenset)) or not all(isinstance(d, str) for d in names):
            raise TypeError(f"OptimizeConfig.disable must be a list of pass names, got {self.disable!r}")
        unknown = sorted(set(names) - set(pass_names()))
        if unknown:
            raise ValueError(f"OptimizeConfig.disable: unknown pass name(s) {unknown}; known passes: {pass_names()}")
        object.__setattr__(self, "disable", tuple(names))
        if self.inner_backend not in INNER_BACKENDS:
            raise ValueError(f"OptimizeConfig.inner_backend must be one of {INNER_BACKENDS}, got {self.inner_backend!r}")
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str,)) and not hasattr(self.dump_dir, "__fspath__"):
            raise TypeError(f"OptimizeConfig.dump_dir must be a path or None, got {type(self.dump_dir).__name__}")
        for name in ("regional", "verbose", "cudagraphs", "keep_logits", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"OptimizeConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.memory not in MEMORY_POLICIES:
            raise ValueError(f"OptimizeConfig.memory must be one of {MEMORY_POLICIES}, got {self.memory!r}")
        if self.frozen_fp32 not in FROZEN_FP32:
            raise ValueError(f"OptimizeConfig.frozen_fp32 must be one of {FROZEN_FP32}, got {self.frozen_fp32!r}")
        if self.memory in CHECKPOINTING_POLICIES and not self.regional:
            raise ValueError(f"OptimizeConfig.memory={self.memory!r} works per decoder block: it needs regional=True")
        if self.moe_keep_projection is not None and not isinstance(self.moe_keep_projection, bool):
            raise TypeError(f"OptimizeConfig.moe_keep_projection must be True, False or None, "
                            f"got {self.moe_keep_projection!r}")
        if self.compile_threads is not None and (isinstance(self.compile_threads, bool)
                                                 or not isinstance(self.compile_threads, int)
                                                 or self.compile_threads < 0):
            raise ValueError(f"OptimizeConfig.compile_threads must be None or an int >= 0 (0: off), "
                             f"got {self.compile_threads!r}")
        if self.dynamic is not None and not isinstance(self.dynamic, bool):
            raise TypeError(f"OptimizeConfig.dynamic must be True, False or None, got {self.dynamic!r}")

    @property
    def keeps_moe_projection(self) -> bool:
        """Whether the moe pass emits the experts op that keeps its gate_up projection for the backward."""
        if self.moe_keep_projection is None:
            return self.memory == "none"
        return self.moe_keep_projection

    @classmethod
    def from_kwargs(cls, config: "OptimizeConfig | None", **overrides) -> "OptimizeConfig":
        """`config` with `overrides` applied; an unknown option raises TypeError naming it."""
        if config is None:
            config = cls()
        elif not isinstance(config, cls):
            raise TypeError(f"config must be an fxopt.OptimizeConfig or None, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in known:
                raise TypeError(f"unknown option {key!r}; OptimizeConfig options are {sorted(known)}")
        return dataclasses.replace(config, **overrides) if overrides else config
