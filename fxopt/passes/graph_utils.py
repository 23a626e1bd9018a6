"""Small helpers the passes share to read a Dynamo FX graph (torch-level ops, parameters as placeholders)."""
from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx

from fxopt.kernels.common import KERNEL_DTYPES as FLOATS  # noqa: F401  (the dtypes fxopt's kernels take)

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
DROPOUT_TARGETS = (torch.nn.functional.dropout, torch.dropout, torch.ops.aten.dropout.default)
MUL_TARGETS = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)
ADD_TARGETS = (operator.add, torch.add, torch.ops.aten.add.Tensor)
SUB_TARGETS = (operator.sub, torch.sub, torch.ops.aten.sub.Tensor)


class Reject(Exception):
    """Raised by a pass's matcher: this subgraph is left as it is, and the message is the report's reason."""


def value(node) -> torch.Tensor | None:
    """The example (fake) tensor Dynamo recorded for a node, or None."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_method(node, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def linear_args(node):
    """(input, weight, bias) of a linear node, bias None when absent."""
    args = list(node.args) + [None] * 3
    x, w, b = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
    return x, w, b


def cast_dtype(node):
    """The target dtype of `t.to(dtype)` / `t.to(dtype=...)` / `t.float()` etc. with no other effect, else None."""
    if is_method(node, "to"):
        extra = [a for a in node.args[1:] if not isinstance(a, torch.dtype)]
        kw = {k: v for k, v in node.kwargs.items() if k != "dtype"}
        dev = kw.pop("device", None)
        if extra or kw:
            return None
        if dev is not None and (value(node.args[0]) is None or torch.device(dev) != value(node.args[0]).device):
            return None
        dtypes = [a for a in node.args[1:] if isinstance(a, torch.dtype)] + (
            [node.kwargs["dtype"]] if "dtype" in node.kwargs else [])
        return dtypes[0] if len(dtypes) == 1 else None
    named = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}
    if node is not None and isinstance(node, fx.Node) and node.op == "call_method" and node.target in named and len(node.args) == 1 and not node.kwargs:
        return named[node.target]
    return None


def static_int(d) -> int | None:
    """A dimension as a plain int when it is not symbolic; None for a SymInt (never guard on it)."""
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        expr = d.node.expr
        return int(expr) if getattr(expr, "is_number", False) else None
    return None


_MODULES = re.compile(r"(?:\.__dict__\['_modules'\]|\._modules)\['([^']+)'\]")
_INDEX = re.compile(r"\[(\d+)\]")


def module_path(node, prefix: str = "") -> str:
    """The innermost module a node was traced in, as a dotted path (for the report only, never for matching)."""
    stack = node.meta.get("nn_module_stack") if isinstance(node, fx.Node) else None
    if not stack:
        return (prefix or "<graph>") + (f":{node.name}" if isinstance(node, fx.Node) else "")
    path = list(stack.values())[-1][0]
    path = _MODULES.sub(lambda m: "." + m.group(1), path)
    path = _INDEX.sub(lambda m: "." + m.group(1), path)
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"^L\['(\w+)'\]\.?", r"\1.", path).strip(".")
    return ".".join(p for p in (prefix, path) if p) or "<root>"


def only_user(node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None
