"""memory="recompute" inside the compiled graph: the block's backward graph recomputes its forward; and
memory="norms": it recomputes only the norms.

AOTAutograd traces a block's forward and backward as one joint graph and then partitions it: what the
forward saves for the backward is chosen by a min-cut, and a node tagged MUST_RECOMPUTE is always placed in
the backward (recomputed there) instead of saved. Tagging every forward node leaves only the graph's inputs
saved (the hidden states; the weights are inputs anyway). Doing this in the partitioner instead of
torch.utils.checkpoint around the compiled block keeps one compiled forward and one compiled backward, so
CUDA graphs stay on and Inductor fuses the recompute with the backward that reads it.

Random ops (dropout) are recomputed too: for a seeded op it recomputes, the partitioner saves the forward's
RNG state and replays it in the backward (run_and_save_rng_state / run_with_rng_state, graph-safe on CUDA),
so the recompute draws the same numbers (tests/test_memory_policy.py checks a dropout mask).
"""
from __future__ import annotations

import operator

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


class RecomputeForward(CustomGraphPass):
    """Inductor's joint-graph pre-pass (config.joint_custom_pre_pass) that tags the forward for recompute."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in forward_nodes(graph):
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            node.meta["ac_graph_id"] = 0  # one region: no boundary inside it is saved

    def uuid(self):  # Inductor's caches key compiled graphs by this
        return "fxopt.recompute.RecomputeForward.v2"


class RecomputeNorms(CustomGraphPass):
    """memory="norms": the joint-graph pre-pass that tags only the forward's norm ops (fxopt::rms_norm,
    fxopt::layer_norm) and the getitems of their outputs for recompute. A norm's output feeds the block's LoRA
    linears, which save it for their dA ([tokens x hidden] per norm); recomputed in the backward from what the
    norm's own backward saves anyway (its input; with the residual add folded, the two addends instead of the sum),
    two such tensors per decoder block are not kept, for one more norm kernel each in the backward."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in forward_nodes(graph):
            norm = node if _is_norm(node) else None
            if norm is None and node.target is operator.getitem and _is_norm(node.args[0]):
                norm = node.args[0]
            if norm is not None:
                node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
                node.meta["ac_graph_id"] = 0

    def uuid(self):
        return "fxopt.recompute.RecomputeNorms.v1"


def _is_norm(node) -> bool:
    from fxopt.kernels import layer_norm, rms_norm  # noqa: F401  (register the ops)

    return (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and node.target in (torch.ops.fxopt.rms_norm.default, torch.ops.fxopt.layer_norm.default))


def joint_pass(config):
    """The joint-graph pre-pass a block graph is compiled with under `config` (an OptimizeConfig), or None."""
    if config.inner_backend != "inductor":
        return None
    return {"recompute": RecomputeForward(), "norms": RecomputeNorms()}.get(config.memory)


def in_graph(config) -> bool:
    """Whether `config` (an OptimizeConfig) recomputes the blocks inside their compiled graphs: memory="recompute"
    with Inductor, the only inner backend that runs joint-graph passes. Otherwise the blocks' recompute is
    torch.utils.checkpoint (fxopt.regions)."""
    return config.memory == "recompute" and config.inner_backend == "inductor"
