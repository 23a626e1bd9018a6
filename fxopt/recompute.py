"""memory="recompute" inside the compiled graph: the block's backward graph recomputes its forward.

AOTAutograd traces a block's forward and backward as one joint graph and then partitions it: what the
forward saves for the backward is chosen by a min-cut, and a node tagged MUST_RECOMPUTE is always placed in
the backward (recomputed there) instead of saved. Tagging every forward node leaves only the graph's inputs
saved (the hidden states; the weights are inputs anyway). Doing this in the partitioner instead of
torch.utils.checkpoint around the compiled block keeps one compiled forward and one compiled backward, so
CUDA graphs stay on and Inductor fuses the recompute with the backward that reads it.

Not recomputed (saved instead): random ops, whose recompute would draw new numbers (dropout masks).
"""
from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import CheckpointPolicy


def forward_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The joint graph's forward computation: call nodes that do not depend on a tangent (an incoming
    gradient). AOTAutograd names the joint graph's inputs primals_* and tangents_*."""
    backward: set[torch.fx.Node] = set()
    out = []
    for node in graph.nodes:  # topological order: a node's inputs come before it
        if node.op == "placeholder":
            if node.name.startswith("tangents"):
                backward.add(node)
            continue
        if any(a in backward for a in node.all_input_nodes):
            backward.add(node)
        elif node.op == "call_function":
            out.append(node)
    return out


def _random(node: torch.fx.Node) -> bool:
    """Draws random numbers: a seeded op, unless its only randomness is a dropout_p argument that is 0 (SDPA's
    aten kernels are seeded ops; without dropout they are deterministic and can be recomputed)."""
    if torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
        return False
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    if "dropout_p" not in names:
        return True
    i = names.index("dropout_p")
    p = node.kwargs["dropout_p"] if "dropout_p" in node.kwargs else node.args[i] if i < len(node.args) else 0.0
    return p != 0


def _save(node: torch.fx.Node) -> None:
    """Saved for the backward: the node, or, for an op with several outputs (a tuple cannot be saved), the
    getitems that read it."""
    if isinstance(node.meta.get("val"), (tuple, list)):
        for user in node.users:
            user.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    else:
        node.meta["recompute"] = CheckpointPolicy.MUST_SAVE


class RecomputeForward(CustomGraphPass):
    """Inductor's joint-graph pre-pass (config.joint_custom_pre_pass) that tags the forward for recompute."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        nodes = forward_nodes(graph)
        for node in nodes:
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            node.meta["ac_graph_id"] = 0  # one region: no boundary inside it is saved
        for node in nodes:  # after: a random op's getitems were tagged above
            if _random(node):
                node.meta.pop("recompute", None)
                _save(node)

    def uuid(self):  # Inductor's caches key compiled graphs by this
        return "fxopt.recompute.RecomputeForward.v1"
