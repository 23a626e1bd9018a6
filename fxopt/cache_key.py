"""fxopt's code in Inductor's compile-cache keys.

Inductor and AOTAutograd cache compiled graphs on disk, keyed by the captured graph and Inductor's config.
A fused op's autograd formula is Python in fxopt/kernels, not in the graph: after an fxopt upgrade that
changed one, a cached backward still called the old ops (seen: a removed op, "'fxopt' object has no attribute
'swiglu_backward'"). The joint-graph post-pass's uuid, a hash of fxopt's sources, is part of
the cache key, so a changed fxopt compiles anew.
"""
from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass


@functools.lru_cache(1)
def source_hash() -> str:
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class JointPostPass(CustomGraphPass):
    """Inductor's config.joint_custom_post_pass: fxopt's source hash in the key; the pass itself folds the
    gradient adds of norm inputs into the norm backward (passes/norm_grad_add.py)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        from fxopt.passes.norm_grad_add import fold_norm_grad_adds

        try:  # each fold rewrites only after all its checks passed: an error leaves a valid graph
            fold_norm_grad_adds(graph)
        except Exception as e:
            if os.environ.get("FXOPT_DEBUG_PASSES"):
                raise
            warnings.warn(f"fxopt: the joint-graph pass norm_grad_add failed and was skipped: {e!r}")

    def uuid(self):
        return f"fxopt-{source_hash()}"
