"""How the kernel tests compare an op with its float64 reference (DESIGN.md: ||out - ref|| / ||ref||, with
these tolerances by dtype)."""
import torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel(a, b, floor: float = 0.0) -> float:
    """||a - b|| / max(||b||, floor). A caller passes a floor only where b can cancel to far below the terms
    it sums (then it is known only relative to those terms): the floor is that scale, and the caller says why."""
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite output (an element left unwritten?)"
    return ((a - b).norm() / max(b.norm().item(), floor, 1e-30)).item()
