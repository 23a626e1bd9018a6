"""How the kernel tests compare an op with its float64 reference (DESIGN.md: ||out - ref|| / ||ref||, with
these tolerances by dtype)."""
import torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
# fp32 adapter gradients over a bf16 base on CUDA: lora._adapter_mm runs them as one bf16 tensor-core GEMM on
# a hi + lo split of the fp32 operand (~2^-17 relative per product), near fp32 but not fp32 itself; measured
# 1.2e-5 for dA at 8192 x 8192 on the H100, where the fp32 tolerance above would fail
SPLIT_TOL = 1e-4


def rel(a, b, floor: float = 0.0) -> float:
    """||a - b|| / max(||b||, floor). A caller passes a floor only where b can cancel to far below the terms
    it sums (then it is known only relative to those terms): the floor is that scale, and the caller says why."""
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite output (an element left unwritten?)"
    return ((a - b).norm() / max(b.norm().item(), floor, 1e-30)).item()
