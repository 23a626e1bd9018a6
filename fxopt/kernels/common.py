"""What every kernel family shares: when the Triton kernels run (compiled on CUDA, interpreted on the CPU under
TRITON_INTERPRET=1), where their outputs come from, and how they are launched."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
import warnings

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): every op runs its torch math
    triton = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreted(kernel) -> bool:
    """With TRITON_INTERPRET=1 set before import, @triton.jit returns the interpreter's InterpretedFunction
    (triton 3.x). Each family asks its own kernel object, not the environment at call time (DESIGN.md)."""
    return type(kernel).__name__ == "InterpretedFunction"


def use_triton(is_interpreted: bool, *tensors: Tensor | None, bf16_interpreted: bool = False,
               family: str | None = None) -> bool:
    """Whether an op runs its Triton kernels on these tensors: always on CUDA, on the CPU only when its kernels
    are interpreted. There, bf16 takes the torch math unless the family says its kernels are right in bf16
    (the interpreter's tl.dot on bf16 operands is wrong and its fp32 -> bf16 cast truncates): those are
    tested on the GPU. Dtypes the kernels do not take (e.g. float64) always take the torch math, and so does
    a family (its module's __name__) whose kernel failed to compile here (FAILED)."""
    ts = [t for t in tensors if t is not None]
    if triton is None or family in FAILED or any(t.dtype not in KERNEL_DTYPES for t in ts):
        return False
    if ts[0].is_cuda:
        return True
    return (is_interpreted and ts[0].device.type == "cpu"
            and (bf16_interpreted or all(t.dtype != torch.bfloat16 for t in ts)))


def new_output(shape, dtype, device) -> Tensor:
    """Every buffer a kernel writes is allocated through its module's `_new_output` (this function): tests
    replace it there to poison outputs with NaN, so an element left unwritten fails."""
    return torch.empty(shape, dtype=dtype, device=device)


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (nothing to do on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


FAILED: set[str] = set()  # kernel families (module names) whose Triton kernel failed to compile in this process


class KernelFailed(RuntimeError):
    """A Triton kernel failed to compile (its family is in FAILED now); `with_fallback` reruns the op."""


def _triton_errors(*names: tuple[str, str]) -> tuple[type, ...]:
    """The exception classes (module, name) this Triton version has."""
    errors = []
    for module, name in names:
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _compile_errors() -> tuple[type, ...]:
    return _triton_errors(("triton.compiler.errors", "CompilationError"), ("triton.runtime.errors", "OutOfResources"))


@contextlib.contextmanager
def kernel_scope(kernel, device: torch.device):
    """Around a kernel launch: on the tensors' device, and a compile failure (a Triton version or GPU the
    kernel does not suit) becomes one warning naming the kernel, the family's switch to its PyTorch math
    (FAILED) and KernelFailed, which `with_fallback` turns into a rerun of the op on that math."""
    try:
        with on_device(device):
            yield
    except _compile_errors() as e:
        fn = getattr(kernel, "fn", kernel)
        fn = getattr(fn, "fn", fn)  # an autotuner wraps the jitted function
        family, name = getattr(fn, "__module__", "?"), getattr(fn, "__name__", "?")
        FAILED.add(family)
        warnings.warn(f"fxopt: Triton kernel {name} ({family}) failed to compile here ({type(e).__name__}: "
                      f"{str(e)[:300]}); the ops of {family} run their PyTorch reference math from now on")
        raise KernelFailed(family) from e


def with_fallback(op):
    """Decorates an op's body (under torch.library.custom_op): after a kernel compile failure, run it again,
    now on its family's PyTorch math."""

    @functools.wraps(op)
    def run(*args, **kwargs):
        try:
            return op(*args, **kwargs)
        except KernelFailed:
            return op(*args, **kwargs)

    # custom_op reads the schema from the signature: give it the op's, its string annotations resolved in the
    # op's module (this module lacks the names they use)
    del run.__wrapped__
    run.__signature__ = inspect.signature(op, eval_str=True)
    return run


def split_bf16(v: Tensor) -> tuple[Tensor, Tensor]:
    """v (fp32) = hi + lo + O(2^-17 |v|), hi and lo bf16: two bf16 operands carry ~16 bits of v's mantissa."""
    hi = v.to(torch.bfloat16)
    return hi, (v - hi.float()).to(torch.bfloat16)  # v - hi is exact in fp32


@functools.cache
def has_out_dtype_mm(device_index: int) -> bool:
    """torch.mm(bf16, bf16, out_dtype=float32) (fp32 result of a bf16 tensor-core GEMM) is newer than some
    torch releases we run on: probe once per device."""
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=f"cuda:{device_index}")
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


DETERMINISTIC = False  # set by fxopt.optimize(deterministic=True): no autotuning (see OptimizeConfig)


def set_deterministic() -> None:
    global DETERMINISTIC
    DETERMINISTIC = True
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for deterministic GEMMs
    torch.use_deterministic_algorithms(True, warn_only=True)


_WARMING: contextvars.ContextVar = contextvars.ContextVar("fxopt_warming", default=None)  # see warming()
_WARMING_BACKWARD: tuple | None = None  # (sink, autograd nodes): see warming()


@contextlib.contextmanager
def warming(sink: list, backward_of=()):
    """Inside: every `launch` of this thread compiles its kernel without running it (Triton's `warmup`, one per
    config the autotuner would try) and appends what the warmup returns to `sink`; so does every launch made,
    on any thread, by the autograd nodes of the graph behind the tensors `backward_of` (autograd runs a CUDA
    backward on a thread of its own). Any other launch runs as usual. For fxopt.precompile only: outputs of
    the skipped kernels stay unwritten."""
    global _WARMING_BACKWARD
    token = _WARMING.set(sink)
    nodes, stack = [], [t.grad_fn for t in backward_of if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is not None and not any(node is n for n in nodes):
            nodes.append(node)
            stack.extend(f for f, _ in node.next_functions)
    prev = _WARMING_BACKWARD
    if nodes:
        _WARMING_BACKWARD = (sink, nodes)
    try:
        yield sink
    finally:
        _WARMING.reset(token)
        _WARMING_BACKWARD = prev


def _warming_sink():
    sink = _WARMING.get()
    if sink is None and _WARMING_BACKWARD is not None:
        node = torch._C._current_autograd_node()
        if node is not None and any(node is n for n in _WARMING_BACKWARD[1]):
            sink = _WARMING_BACKWARD[0]
    return sink


def _config_meta(cfg) -> dict:
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _first_fitting(tuned, run):
    """DETERMINISTIC: run(meta) with the first config of the tuning list that fits this GPU and these dtypes. A
    config over the shared-memory or register limit raises OutOfResources when it is loaded, before anything runs
    (on an H200 with fp32 inputs the 4-bit GEMM's first tile needed 256 KiB of its 227), so the next one is
    tried, in list order: the same choice on every run. The autotuner skips such configs the same way. Only
    when none fits does the error propagate."""
    for cfg in tuned.configs[:-1]:
        try:
            return run(_config_meta(cfg))
        except _triton_errors(("triton.runtime.errors", "OutOfResources")):
            pass
    return run(_config_meta(tuned.configs[-1]))


def _warm(kernel, tuned, args, flags: dict, fixed: dict) -> list:
    """Compile (without running) what `launch` would run with these arguments."""
    if tuned is not None and not DETERMINISTIC:
        return list(tuned.warmup(*args, grid=(1,), **flags))
    if tuned is not None:
        return [_first_fitting(tuned, lambda meta: kernel.warmup(*args, grid=(1,), **flags, **meta))]
    return [kernel.warmup(*args, grid=(1,), **flags, **fixed)]


def launch(kernel, tuned, grid, args, flags: dict, fixed: dict, device: torch.device) -> None:
    """Launch over grid(meta): the autotuned kernel `tuned` when there is one, else `kernel` with the fixed
    meta-parameters `fixed` (block sizes, optionally num_warps / num_stages): what the interpreter runs, where
    autotuning is pointless, and what a caller gets that turned tuning off. Under DETERMINISTIC, the first
    config of the tuning list that fits the GPU: the same every run. Every Triton kernel of fxopt is launched
    through here."""
    with kernel_scope(tuned if tuned is not None else kernel, device):
        sink = _warming_sink()
        if sink is not None:
            sink.extend(_warm(kernel, tuned, args, flags, fixed))
            return
        if tuned is not None and DETERMINISTIC:
            _first_fitting(tuned, lambda meta: kernel[grid(meta)](*args, **flags, **meta))
            return
        if tuned is not None:
            fn, meta = tuned, {}  # the autotuner calls grid with the config it runs
        else:
            fn, meta = kernel, fixed
        fn[grid if fn is tuned else grid(meta)](*args, **flags, **meta)


if triton is not None:

    @triton.jit
    def tanh(u):
        """(tanh(u), 1 - tanh(u)^2), both to fp32 relative precision, for the kernels' logit softcaps. No tl.tanh
        on every Triton version. (1 - e) / (1 + e) with e = exp(-2|u|) cancels near 0: there, the odd Taylor
        series to u^9 (its next term is below fp32 rounding for |u| < 0.25). The derivative as 4e / (1 + e)^2:
        1 - t*t would be all rounding where tanh saturates (gradients there are then tiny, but right)."""
        a = tl.abs(u)
        e = tl.exp(-2.0 * a)
        far = (1.0 - e) / (1.0 + e)
        a2 = a * a
        near = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
        t = tl.where(a < 0.25, near, far)
        return tl.where(u < 0, -t, t), 4.0 * e / ((1.0 + e) * (1.0 + e))

    @triton.jit
    def hi_lo_columns(s, dtype, ROWS: tl.constexpr, COLS: tl.constexpr):
        """fp32 s [ROWS, COLS] as [ROWS, 2 COLS] in a half dtype: column 2j = hi_j = s_j rounded, 2j + 1 =
        s_j - hi_j rounded (hi + lo keeps ~16 significant bits, ~2^-17 relative). A product with a half-precision
        activation then runs on tensor cores as one product of twice the width; pair_sum adds the halves."""
        hi = s.to(dtype)
        lo = (s - hi.to(tl.float32)).to(dtype)
        return tl.reshape(tl.join(hi, lo), (ROWS, 2 * COLS))

    @triton.jit
    def pair_sum(p, ROWS: tl.constexpr, COLS: tl.constexpr):
        """[ROWS, 2 COLS] -> [ROWS, COLS]: columns 2j and 2j + 1 added (the hi and lo halves of a product)."""
        return tl.sum(tl.reshape(p, (ROWS, COLS, 2)), 2)

    @triton.jit
    def act_and_grad(g, ACT: tl.constexpr):
        """act(g) and act'(g) in fp32 (ACT: 0 silu, 1 gelu with erf, 2 gelu with the tanh approximation)."""
        if ACT == 0:
            s = tl.sigmoid(g)
            a = g * s
            da = s * (1.0 + g * (1.0 - s))
        elif ACT == 1:
            cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
            a = g * cdf
            da = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
        else:
            # tanh(z) = 2 sigmoid(2z) - 1: tl has no tanh that both triton 3.6 and the interpreter provide
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
            a = 0.5 * g * (1.0 + t)
            da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        return a, da
else:
    tanh = act_and_grad = hi_lo_columns = pair_sum = None  # the kernels that call them are not defined either


# The gated activations of MLPs and MoE experts (transformers' "silu", "gelu", "gelu_pytorch_tanh"); index = the
# kernels' ACT constexpr.
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def act_reference(g: torch.Tensor, activation: str) -> torch.Tensor:
    """act(g) by PyTorch's own functions: what the references compare `act_and_grad` with."""
    if activation == "silu":
        return torch.nn.functional.silu(g)
    return torch.nn.functional.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device: what the kernels size their grids by (splits, persistent
    programs)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def shared_memory_limit(t: torch.Tensor | None) -> int:
    """Bytes of shared memory one program may use on t's GPU (0 off CUDA): what the kernels' tuning-list
    pruners compare a config's tiles with."""
    if t is None or not t.is_cuda:
        return 0
    return getattr(torch.cuda.get_device_properties(t.device), "shared_memory_per_block_optin", 0)


def act_and_grad_torch(g: torch.Tensor, activation: str):
    """act(g) and act'(g): the torch version of `act_and_grad`."""
    if activation == "silu":
        s = torch.sigmoid(g)
        return g * s, s * (1 + g * (1 - s))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(g * 0.7071067811865476))
        return g * cdf, cdf + g * 0.3989422804014327 * torch.exp(-0.5 * g * g)
    t = torch.tanh(0.7978845608028654 * (g + 0.044715 * g ** 3))
    return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * 0.7978845608028654 * (1 + 0.134145 * g * g)
