"""Regional compilation compiles each repeated block as ONE graph, its residual adds included, also when the
block's class does not wrap its forward (transformers 5.17's decoder layers; 5.2x wraps it for checkpointing).
Skipping the block's own frame instead had compiled every submodule it calls as its own graph (4 per decoder
layer on 5.17), which cost the residual-add fusion and, under memory="recompute", made each of the 4 graphs
save its own inputs."""
import copy

import torch
import torch.nn as nn

import fxopt


class Block(nn.Module):
    """A pre-norm block whose forward is a plain method, as a transformers 5.17 decoder layer's."""

    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Toy(nn.Module):
    def __init__(self, d=16, n=3):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x).square().mean()


def test_block_is_one_graph(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    ref = copy.deepcopy(model)
    fxopt.optimize(model, inner_backend="aot_eager", dump_dir=str(tmp_path))
    x = torch.randn(2, 5, 16)
    loss, ref_loss = model(x), ref(x)
    loss.backward()
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
    # DESIGN.md's fp32 tolerance (||g - ref|| / ||ref||): the norms run fxopt::layer_norm, whose fp32 rounding
    # differs from eager's by ~1e-7 per element (an element-wise atol of 1e-7 would fail on that alone)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert ((p.grad - q.grad).norm() / q.grad.norm()).item() < 1e-5, name
    report = fxopt.report(model)
    assert len(report.matched("layer_norm")) == 2  # the block's two norms, once for every block
    # one graph for all blocks: the first block's input (no grad) is given a copy requiring grad, as the later
    # blocks' inputs do, so Dynamo's guard on requires_grad does not compile the block a second time
    assert report.block_graphs == 1, report.block_graphs
    codes = [f.read_text() for f in tmp_path.glob("*.before.py")]
    whole = [c for c in codes if "modules_attn" in c and "modules_mlp" in c and "modules_norm2" in c]
    assert len(whole) == report.block_graphs  # every block graph holds the whole block


def test_block_calls_do_not_reach_dynamo_after_compiling(monkeypatch):
    """Once compiled, a block call costs no Python-level Dynamo work: the frames fxopt skips around each block
    are skipped in Dynamo's C layer (see regions._skipped_frame). Counted by Dynamo's frame callback, which
    computes first_real_inst_idx for every frame it is asked about (a torch internal: skip where absent)."""
    import torch._dynamo.convert_frame as convert_frame

    if not hasattr(convert_frame, "first_real_inst_idx"):
        import pytest

        pytest.skip("this torch's Dynamo has no first_real_inst_idx to count its frame callbacks by")
    model = Toy(n=4)
    fxopt.optimize(model, inner_backend="aot_eager")
    x = torch.randn(2, 5, 16)
    for _ in range(2):
        model(x).backward()
    asked = []
    real = convert_frame.first_real_inst_idx
    monkeypatch.setattr(convert_frame, "first_real_inst_idx", lambda code: asked.append(code.co_name) or real(code))
    for _ in range(2):
        model(x).backward()
    assert asked == [], asked  # it was 2 frames per block per step (8 per step here) before the codes were marked
