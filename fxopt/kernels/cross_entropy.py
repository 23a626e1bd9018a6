"""fxopt::linear_cross_entropy: an lm_head linear and the cross-entropy after it, never materialising the
full [tokens x vocab] logits (nor an fp32 copy of them).

    logits = x @ weight^T + bias                   in x's dtype (a GEMM with fp32 accumulate, rounded once)
    z      = float32(logits)
    z      = softcap * tanh(z / softcap)           only if softcap > 0
    loss   = sum over rows i with labels_i != ignore_index of  logsumexp(z_i) - z_i[labels_i]

The loss is a SUM (fp32 scalar): the caller divides by its own count (num_items_in_batch).

How: rows are processed in chunks. For each chunk, cuBLAS (torch.mm / addmm) writes the chunk's logits into
one reused buffer in x's dtype; one Triton program per row reads the row twice (online max / sum-exp, then
the gradient), writes the row's loss, and, when gradients are wanted, overwrites the logits IN PLACE with
d(loss)/d(logits) = (softmax - onehot) * dz/dlogits (0 for ignored rows), cast to x's dtype. Then, still in
the forward, grad_x_chunk = dlogits @ weight (cuBLAS), and grad_weight += dlogits^T @ x_chunk and
grad_bias += column sums (both in fp32 accumulators) only when asked for: a frozen, tied embedding costs no
dW GEMM. The op returns the loss and these gradients; the autograd backward only multiplies them by
grad_output (a scalar).

Chunk size: CHUNK_BYTES (128 MiB) of logits per chunk. On the target workload (x [8192, 2048] bf16, vocab
128256) that is 512 rows, 1/16 of the 2.1 GB bf16 logits (1/32 of the 4.2 GB fp32 ones): small next to
the model, yet every GEMM keeps M = 512 rows (the dX GEMM, [512, V] @ [V, 2048], has the fewest output
tiles: smaller chunks starve it). Larger chunks only cost memory. benchmarks/bench_cross_entropy.py sweeps
CHUNK_BYTES to check the choice on the GPU. A trained weight adds an fp32 dW accumulator of V x H (1 GB on
the workload); the frozen one adds nothing but the chunk and grad_x (the size of x).

Why the op returns its gradients: a custom op's autograd can save only its inputs and outputs, so the
gradients computed in the forward are outputs ([loss, grad_x?, grad_weight?, grad_bias?], which ones set by
need_grads); linear_cross_entropy_fn returns the loss alone.

Labels outside [0, V) that are not ignore_index: F.cross_entropy raises on CPU (IndexError) and asserts on
the device on CUDA. Here a CPU call raises the same IndexError (checking costs no device sync there); on
CUDA the check would need a sync, so none is made: such a row's loss and gradient row are NaN, which makes
the summed loss NaN (visible, no out-of-bounds read).

Numerics vs Hugging Face: the logits GEMM and the fp32 log-softmax are HF's. The softcap is applied in fp32
after the upcast; HF's final_logit_softcapping divides, tanh's and multiplies in the model dtype before the
upcast (three more roundings): within the half-precision tolerance, slightly more exact here.

On CUDA the row kernel is Triton; on CPU the same chunked loop runs the row math in torch, except when the
kernel is interpreted (TRITON_INTERPRET=1 set before import), where the Triton kernel runs in Triton's
interpreter (the kernel has no tl.dot, so bf16 is right there too).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): every call runs the torch math
    triton = None

from fxopt.kernels.common import (has_out_dtype_mm, interpreted, launch, new_output, split_bf16, tanh, use_triton,
                                  with_fallback)

_INTERPRETED = False

# fp32 head GEMMs on CUDA as three bf16 tensor-core GEMMs (see _SplitHead). Tests turn it off to compare.
SPLIT_FP32 = True
# Logits bytes per chunk (see the docstring). Tests set it small to get many chunks out of small inputs.
CHUNK_BYTES = 128 * 2**20
# Vocabulary block of one loop step of the row kernel: on the GPU a row of 128256 bf16 logits is 32 steps
# of 4096; in the interpreter a small block so that small test vocabularies span several blocks.
BLOCK_V_GPU = 4096
BLOCK_V_INTERPRETED = 32

if triton is not None:

    @triton.jit
    def _ce_rows_kernel(
        LOGITS, LABELS, LOSS, V, stride_row, stride_label, ignore_index, softcap,
        HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One program per row of LOGITS [rows, V] (x's dtype): LOSS[row] = logsumexp(z) - z[label] (fp32),
        0 for an ignored row, NaN for a label outside [0, V); with WRITE_GRAD the row is overwritten by
        d(loss)/d(logits) = (softmax(z) - onehot(label)) * dz/dlogits, zeros for an ignored row."""
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride_row
        label = tl.load(LABELS + row * stride_label).to(tl.int64)
        valid = label != ignore_index
        in_range = (label >= 0) & (label < V)
        cols = tl.arange(0, BLOCK_V)

        # Pass 1: running max m and sum of exp(z - m) over the row, one block of the vocabulary at a time.
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            z = tl.load(ptr + c, mask=c < V, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t, _ = tanh(z / softcap)
                z = softcap * t
            z = tl.where(c < V, z, float("-inf"))  # after the softcap, which maps -inf to -softcap
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        # Keep logsumexp as m + log_s, never summed: z - m is exact for the largest logits, so a confident
        # row's small loss (m - z_label) + log_s does not lose its digits to the rounding of m + log_s.
        log_s = tl.log(s)

        # The label's logit, read before pass 2 overwrites the row.
        z_label = tl.load(ptr + tl.where(valid & in_range, label, 0)).to(tl.float32)
        if HAS_SOFTCAP:  # its own names: a `t` here would become a loop-carried scalar in pass 2 (see below)
            t_label, _ = tanh(z_label / softcap)
            z_label = softcap * t_label
        loss = tl.where(in_range, (m - z_label) + log_s, float("nan"))
        tl.store(LOSS + row, tl.where(valid, loss, 0.0))

        if WRITE_GRAD:
            # Pass 2: the gradient of the row's loss, stored over the logits it came from.
            for start in range(0, V, BLOCK_V):
                c = start + cols
                z = tl.load(ptr + c, mask=c < V, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    t, dt = tanh(z / softcap)
                    z = softcap * t
                g = tl.exp((z - m) - log_s) - tl.where(c == label, 1.0, 0.0)
                if HAS_SOFTCAP:
                    g = g * dt
                g = tl.where(in_range, g, float("nan"))
                g = tl.where(valid, g, 0.0)
                tl.store(ptr + c, g.to(LOGITS.dtype.element_ty), mask=c < V)

    _INTERPRETED = interpreted(_ce_rows_kernel)


def _use_triton(x: Tensor) -> bool:
    # the row kernel has no tl.dot and rounds like the GPU: bf16 is right in the interpreter too
    return use_triton(_INTERPRETED, x, bf16_interpreted=True, family=__name__)


_new_output = new_output  # tests poison this module's outputs through it


def _chunk_rows(n: int, v: int, itemsize: int) -> int:
    rows = max(1, CHUNK_BYTES // max(1, v * itemsize))
    if rows >= 256:
        rows -= rows % 128  # whole GEMM tiles
    return min(rows, max(n, 1))


def _loss_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32; fp64 stays fp64 (the torch math)


def _check_labels(labels: Tensor, v: int, ignore_index: int) -> None:
    """F.cross_entropy's CPU error for a label outside [0, V). Only on CPU: on CUDA it would sync."""
    if labels.device.type != "cpu":
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if bool(bad.any()):
        raise IndexError(f"Target {labels[bad][0].item()} is out of bounds.")


def _ce_rows_triton(logits, labels, loss, ignore_index, softcap, write_grad):
    rows, v = logits.shape
    block = min(triton.next_power_of_2(v), BLOCK_V_INTERPRETED if _INTERPRETED else BLOCK_V_GPU)
    args = (logits, labels, loss, v, logits.stride(0), labels.stride(0), ignore_index, float(softcap))
    flags = dict(HAS_SOFTCAP=softcap > 0, WRITE_GRAD=write_grad, BLOCK_V=block)
    launch(_ce_rows_kernel, None, lambda meta: (rows,), args, flags,
           {} if _INTERPRETED else {"num_warps": 8 if block >= 2048 else 4}, logits.device)


def _ce_rows_torch(logits, labels, loss, ignore_index, softcap, write_grad):
    """The row math of the kernel in torch, on one chunk (fp32, or fp64 for fp64 logits)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap > 0:
        t = torch.tanh(z / softcap)
        z = softcap * t
    logp = torch.log_softmax(z, dim=1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).unsqueeze(1)
    loss.copy_(torch.where(valid, -logp.gather(1, safe).squeeze(1), 0.0))
    if write_grad:
        g = logp.exp_()
        g.scatter_add_(1, safe, -torch.ones_like(safe, dtype=g.dtype))
        if softcap > 0:
            g *= 1.0 - t * t
        logits.copy_(g * valid.unsqueeze(1))


def _ce_rows(logits, labels, loss, ignore_index, softcap, write_grad):
    """Per row of the chunk: loss, and (write_grad) the logits overwritten by d(loss)/d(logits)."""
    if _use_triton(logits):
        _ce_rows_triton(logits, labels, loss, ignore_index, softcap, write_grad)
    else:
        _ce_rows_torch(logits, labels, loss, ignore_index, softcap, write_grad)


def _add_dw(acc: Tensor, dlogits: Tensor, xc: Tensor, first: bool) -> None:
    """acc (+)= dlogits^T @ xc, acc in fp32 (fp64 for fp64); beta=0 on the first chunk ignores acc's content."""
    beta = 0 if first else 1
    if dlogits.dtype == acc.dtype:
        torch.addmm(acc, dlogits.t(), xc, beta=beta, out=acc)
    elif dlogits.is_cuda:
        # cuBLAS on the half operands with an fp32 output (out_dtype, torch >= 2.8), accumulating into acc in
        # place. baddbmm, not addmm: some versions' addmm with out_dtype want `self` in the operands' dtype.
        torch.baddbmm(acc[None], dlogits.t()[None], xc[None], out_dtype=acc.dtype, beta=beta, out=acc[None])
    else:  # CPU has no half-to-fp32 GEMM: the chunk upcast (CPU runs are small)
        torch.addmm(acc, dlogits.t().to(acc.dtype), xc.to(acc.dtype), beta=beta, out=acc)


class _SplitHead:
    """The head's GEMMs for an fp32 x and weight on CUDA: the QLoRA recipe (prepare_model_for_kbit_training)
    upcasts the tied 128k-vocabulary lm_head to fp32, and an fp32 GEMM runs on CUDA cores (no TF32 unless the
    user allows it): ~30% of that step. Each fp32 operand is split into bf16 hi + lo (split_bf16) and
    a @ b = a_hi b_hi + a_hi b_lo + a_lo b_hi, three bf16 tensor-core GEMMs accumulating in fp32 (the dropped
    a_lo b_lo and the split's remainder are ~2^-17 relative per product: near fp32, not fp32 itself; the same
    trade as the LoRA adapters' products, tests.kernels.numerics.SPLIT_TOL). The weight is split once per call
    (two bf16 copies, together the size of the fp32 weight, alive during the op)."""

    @staticmethod
    def applies(x: Tensor) -> bool:
        return SPLIT_FP32 and x.is_cuda and x.dtype == torch.float32 and has_out_dtype_mm(x.device.index or 0)

    def __init__(self, weight: Tensor, rows: int = 16384):
        # in slices of rows: split_bf16 of the whole weight would hold an fp32 temporary of its size too
        self.w_hi = torch.empty_like(weight, dtype=torch.bfloat16)
        self.w_lo = torch.empty_like(weight, dtype=torch.bfloat16)
        for i in range(0, weight.shape[0], rows):
            self.w_hi[i:i + rows], self.w_lo[i:i + rows] = split_bf16(weight[i:i + rows])

    @staticmethod
    def _mm3(a: Tensor, b_hi: Tensor, b_lo: Tensor, out: Tensor) -> None:
        a_hi, a_lo = split_bf16(a)
        for i, (p, q) in enumerate(((a_hi, b_hi), (a_hi, b_lo), (a_lo, b_hi))):  # into out, in place (_add_dw)
            torch.baddbmm(out[None], p[None], q[None], out_dtype=torch.float32, beta=0 if i == 0 else 1,
                          out=out[None])

    def logits(self, xc: Tensor, bias: Optional[Tensor], out: Tensor) -> None:
        self._mm3(xc, self.w_hi.t(), self.w_lo.t(), out)
        if bias is not None:
            out += bias

    def grad_x(self, dlogits: Tensor, out: Tensor) -> None:
        self._mm3(dlogits, self.w_hi, self.w_lo, out)


def _forward(x, weight, bias, labels, ignore_index, softcap, need_dx, need_dw, need_db):
    if x.dim() != 2 or weight.dim() != 2 or labels.shape != x.shape[:1] or weight.shape[1] != x.shape[1]:
        raise ValueError(f"linear_cross_entropy: x [N, H], weight [V, H], labels [N] expected, got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"linear_cross_entropy: x, weight, bias must share a dtype, got {x.dtype}, "
                         f"{weight.dtype}, {None if bias is None else bias.dtype}")
    n, h = x.shape
    v = weight.shape[0]
    _check_labels(labels, v, ignore_index)
    dev = x.device
    rows = _chunk_rows(n, v, x.element_size())
    buf = _new_output((rows, v), x.dtype, dev)  # the one chunk of logits, reused
    loss_rows = _new_output((n,), _loss_dtype(x), dev)
    write_grad = need_dx or need_dw or need_db
    dx = _new_output((n, h), x.dtype, dev) if need_dx else None
    # dW and db are sums over chunks, accumulated in fp32 and rounded once at the end, as one GEMM over all
    # the rows would be (a half-precision accumulator would round once per chunk).
    dw = _new_output((v, h), _loss_dtype(x), dev) if need_dw else None
    db = _new_output((v,), _loss_dtype(x), dev) if need_db else None
    wt = weight.t()
    split = _SplitHead(weight) if _SplitHead.applies(x) else None
    for i, start in enumerate(range(0, n, rows)):
        end = min(start + rows, n)
        xc, lg = x[start:end], buf[:end - start]
        if split is not None:
            split.logits(xc, bias, lg)
        elif bias is None:
            torch.mm(xc, wt, out=lg)
        else:
            torch.addmm(bias, xc, wt, out=lg)
        _ce_rows(lg, labels[start:end], loss_rows[start:end], ignore_index, softcap, write_grad)
        if need_dx and split is not None:
            split.grad_x(lg, dx[start:end])
        elif need_dx:
            torch.mm(lg, weight, out=dx[start:end])
        if need_dw:
            _add_dw(dw, lg, xc, first=i == 0)
        if need_db:
            if i == 0:
                torch.sum(lg, 0, dtype=db.dtype, out=db)
            else:
                db += lg.sum(0, dtype=db.dtype)
    if n == 0:  # no chunk ran: zero loss, zero gradients
        for t in (dw, db):
            if t is not None:
                t.zero_()
    grads = [dx, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype)]
    return loss_rows.sum(), [g for g in grads if g is not None]


@torch.library.custom_op("fxopt::linear_cross_entropy", mutates_args=())
@with_fallback
def linear_cross_entropy(x: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
                         softcap: float, need_grads: list[bool]) -> list[Tensor]:
    """Returns [loss] + [grad_x if need_grads[0]] + [grad_weight if need_grads[1]] + [grad_bias if
    need_grads[2]]: the summed cross-entropy (fp32 scalar) and its gradients for grad_output = 1, computed
    in the same pass (the autograd backward scales them). need_grads = [False] * 3 for eval: loss only.
    x [N, H], weight [V, H], bias [V] or None, labels [N] (int64); grads have their input's shape, dtype,
    and contiguous strides."""
    need_dx, need_dw, need_db = _need(need_grads, bias)
    loss, grads = _forward(x, weight, bias, labels, ignore_index, softcap, need_dx, need_dw, need_db)
    return [loss] + grads


def _need(need_grads, bias):
    if len(need_grads) != 3:
        raise ValueError(f"need_grads must be [x, weight, bias] flags, got {need_grads}")
    return bool(need_grads[0]), bool(need_grads[1]), bool(need_grads[2]) and bias is not None


@linear_cross_entropy.register_fake
def _(x, weight, bias, labels, ignore_index, softcap, need_grads):
    need_dx, need_dw, need_db = _need(need_grads, bias)
    out = [x.new_empty((), dtype=_loss_dtype(x))]
    if need_dx:
        out.append(x.new_empty(x.shape))
    if need_dw:
        out.append(weight.new_empty(weight.shape))
    if need_db:
        out.append(bias.new_empty(bias.shape))
    return out


def _setup_context(ctx, inputs, output):
    x, weight, bias, labels, ignore_index, softcap, need_grads = inputs
    ctx.need = _need(need_grads, bias)
    ctx.save_for_backward(*output[1:])


def _backward(ctx, grads):
    g = grads[0]
    saved = iter(ctx.saved_tensors)
    result = []
    for name, computed, wanted in zip(("x", "weight", "bias"), ctx.need, ctx.needs_input_grad[:3]):
        grad = next(saved) if computed else None
        if wanted and grad is None:
            raise RuntimeError(f"fxopt::linear_cross_entropy: a gradient for {name} is needed but need_grads "
                               f"did not ask for it (use linear_cross_entropy_fn, which sets it)")
        # grad_output is a scalar (fp32): scaling in fp32, rounded once to the gradient's dtype
        result.append(grad * g if wanted and g is not None else None)
    return (*result, None, None, None, None)


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int = -100,
              softcap: float = 0.0) -> Tensor:
    """The op's math in plain PyTorch with the full logits (differentiable): HF's lm_head in x's dtype, the
    upcast, the softcap, F.cross_entropy(reduction="sum")."""
    z = F.linear(x, weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum")


def linear_cross_entropy_fn(x: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                            ignore_index: int = -100, softcap: float = 0.0) -> Tensor:
    """The op for x [..., H] and labels [...]: the gradients computed are those autograd will ask for."""
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (x, weight, bias)]
    out = torch.ops.fxopt.linear_cross_entropy(x.reshape(-1, x.shape[-1]), weight, bias, labels.reshape(-1),
                                               int(ignore_index), float(softcap), need)
    return out[0]
