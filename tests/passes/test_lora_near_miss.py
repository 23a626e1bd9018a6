"""LoRA-shaped modules that must match, and near-misses that must not (left alone, reason reported);
in every case the compiled module computes what the eager one does, forward and gradients."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from tests.models import rel_err


class LoraLike(nn.Module):
    def __init__(self, variant, k=24, n=20, r=3):
        super().__init__()
        self.variant = variant
        self.w = nn.Parameter(torch.randn(n, k) / k**0.5, requires_grad=False)
        self.a = nn.Parameter(torch.randn(r, k) / k**0.5)
        self.b = nn.Parameter(torch.randn(n, r) / r**0.5)
        self.bias = nn.Parameter(torch.randn(n), requires_grad=False)
        self.s = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        v = self.variant
        lora = F.linear(F.linear(x, self.a), self.b)
        if v == "plain":
            return F.linear(x, self.w) + lora * 0.5
        if v == "no_scale":
            return F.linear(x, self.w) + lora
        if v == "scale_left_bias_right":
            return (0.25 * lora) + F.linear(x, self.w, self.bias)
        if v == "two_share_input":
            y1 = F.linear(x, self.w) + lora * 0.5
            y2 = F.linear(x, self.w * 1) + F.linear(F.linear(x, self.a * 2), self.b) * 3.0
            return y1 * y2
        if v == "lora_used_twice":
            return F.linear(x, self.w) + lora * 0.5 + lora.sum()
        if v == "base_used_twice":
            base = F.linear(x, self.w)
            return (base + lora * 0.5) * base
        if v == "different_inputs":
            return F.linear(x * 2, self.w) + lora * 0.5
        if v == "tensor_scale":
            return F.linear(x, self.w) + lora * self.s
        if v == "view_between":
            return F.linear(x, self.w) + lora.view(-1, lora.shape[-1]).view_as(lora) * 0.5
        if v == "dropout_on_base":
            return F.linear(F.dropout(x, 0.0, True), self.w) + lora * 0.5
        # a linear written out (Falcon's): canonicalize makes x @ W.T a linear; a bias added after the product
        # goes into the op when it is a 1-D vector of the output's width
        if v == "matmul_t_bias_after":
            return (x @ self.w.T + self.bias) + lora * 0.5
        if v == "matmul_dot_t":
            return self.bias + torch.matmul(x, self.w.t()) + lora * 0.5
        if v == "matmul_transpose":
            return x @ self.w.transpose(-1, -2) + lora * 0.5
        if v == "matmul_untransposed":  # x @ (a [K, N] tensor): a copy of W.T is not recognised as W (left alone)
            return x @ self.w.T.contiguous() + lora * 0.5
        if v == "bias_2d_after":  # a [1, N] addend is not a bias the op takes
            return (F.linear(x, self.w) + self.bias[None]) + lora * 0.5
        if v == "base_with_bias_then_add":  # linear(x, W, b) + c: two biases, not absorbed
            return (F.linear(x, self.w, self.bias) + self.bias) + lora * 0.5
        raise ValueError(v)


CASES = {  # variant: (matched, rejected)
    "plain": (1, 0),
    "no_scale": (1, 0),
    "scale_left_bias_right": (1, 0),
    "two_share_input": (2, 0),
    "lora_used_twice": (0, 1),
    "base_used_twice": (0, 1),
    "different_inputs": (0, 1),
    "tensor_scale": (0, 1),
    "view_between": (0, 1),
    "dropout_on_base": (0, 1),
    "matmul_t_bias_after": (1, 0),
    "matmul_dot_t": (1, 0),
    "matmul_transpose": (1, 0),
    "matmul_untransposed": (0, 1),
    "bias_2d_after": (0, 1),
    "base_with_bias_then_add": (0, 1),
}


@pytest.mark.parametrize("variant", sorted(CASES))
@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24), (1, 24)])
def test_match_or_leave_alone(variant, shape):
    torch.manual_seed(0)
    mod = LoraLike(variant)
    x = torch.randn(*shape, requires_grad=True)
    report = fxopt.Report()
    compiled = torch.compile(mod, backend=fxopt.make_backend(fxopt.OptimizeConfig(inner_backend="aot_eager"), report))
    out = compiled(x)
    ref = mod(x)
    assert rel_err(out, ref) < 1e-5
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, [x, mod.a, mod.b], g)
    ref_grads = torch.autograd.grad(ref, [x, mod.a, mod.b], g)
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-5
    matched, rejected = CASES[variant]
    assert (len(report.matched("lora")), len(report.rejected("lora"))) == (matched, rejected), report.records
    torch._dynamo.reset()
