"""The memory policy (OptimizeConfig.memory): "recompute" keeps only each block's inputs and recomputes its
fused forward in the backward; "offload" also moves those inputs to CPU memory until the backward. With
Inductor, "recompute" is inside the compiled graph (fxopt.recompute) and CUDA graphs stay on; otherwise (and
for "offload") it is torch.utils.checkpoint around the compiled block, without CUDA graphs. Both must train
exactly as the unoptimized model (the first block's input does not require grad: frozen embeddings) and keep
far fewer activations; bad values are refused with the option's name."""
import pytest
import torch

import fxopt
from fxopt.backend import no_cudagraphs_reason
from fxopt.recompute import RecomputeForward
from tests.models import assert_no_less_accurate, assert_same_training, batch, tiny_lora_model, twin

OTHERS = ["rms_norm", "attention", "cross_entropy", "swiglu"]  # slow in the interpreter, not what is tested


def saved_bytes(model, b):
    """Bytes of the tensors autograd saves outside any checkpoint during one training forward, the model's
    parameters not counted (saving one costs no memory)."""
    params = {p.data_ptr() for p in model.parameters()}
    total = []

    def pack(t):
        if t.data_ptr() not in params:
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**b).loss
    loss.backward()
    return sum(total)


@pytest.mark.parametrize("inner", ["inductor", "aot_eager"])
@pytest.mark.parametrize("memory", ["recompute", "offload"])
def test_trains_exactly_and_saves_less(memory, inner):
    model = tiny_lora_model("llama")
    ref = twin(model)
    plain = twin(model)
    fxopt.optimize(model, inner_backend=inner, memory=memory, disable=OTHERS)
    fxopt.optimize(plain, inner_backend=inner, disable=OTHERS)
    b = batch(seq=32)
    assert_same_training(model, ref, b)
    assert_same_training(model, ref, batch(seq=32, seed=2))  # a second step: the recompute path again
    assert fxopt.report(model).matched("lora")
    assert saved_bytes(model, b) < 0.3 * saved_bytes(plain, b)
    if memory == "recompute":
        assert no_cudagraphs_reason(model, memory) is None  # in the graph (or not CUDA graphs' concern)
    else:
        assert "offload" in no_cudagraphs_reason(model, memory)
    assert no_cudagraphs_reason(plain, "none") is None


def inductor(recompute: bool):
    """Inductor as a backend, with fxopt's recompute pass on the joint graph or without it."""
    from torch._inductor.compile_fx import compile_fx

    patches = {"joint_custom_pre_pass": RecomputeForward()} if recompute else {}
    return lambda gm, example_inputs: compile_fx(gm, example_inputs, config_patches=patches)


def joint_saves(fn, *args, recompute):
    """The tensors (shapes) that fn compiled by Inductor saves for its backward."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=inductor(recompute))
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(*args)
    out.sum().backward()
    return shapes


def test_recompute_pass_saves_only_the_inputs():
    """RecomputeForward on a joint graph: without it Inductor saves intermediates (the product before the
    relu); with it only the inputs x and w, and the gradients are unchanged."""
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 12, requires_grad=True)

    def fn(x, w):
        return torch.relu(torch.sin(x) @ w) @ w.t()

    ref = torch.autograd.grad(fn(x, w).sum(), (x, w))
    assert (8, 12) in joint_saves(fn, x, w, recompute=False)
    saved = joint_saves(fn, x, w, recompute=True)
    assert sorted(saved) == sorted([(8, 16), (16, 12)]), saved
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(fn, backend=inductor(True))(x, w).sum(), (x, w))
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_recompute_pass_keeps_random_draws():
    """A recomputed dropout draws the forward's numbers again (the partitioner replays the saved RNG state):
    the gradient matches the mask the forward applied."""
    x = torch.randn(64, 32, requires_grad=True)

    def fn(x):
        return torch.nn.functional.dropout(x.sin(), p=0.5, training=True) * 3

    torch._dynamo.reset()
    out = torch.compile(fn, backend=inductor(True))(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    kept = out != 0  # where the forward kept the element
    assert torch.allclose(g, torch.where(kept, 6 * x.cos(), torch.zeros_like(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("memory", ["norms", "recompute", "offload"])
def test_bf16_model_under_memory_policy_on_gpu(memory):
    """On the GPU (Inductor, every pass; CUDA graphs under recompute): three training steps with the policy
    are as accurate as the unoptimized bf16 model."""
    model = tiny_lora_model("llama", dtype=torch.bfloat16).cuda()
    eager, ref32 = twin(model), twin(model).float()
    fxopt.optimize(model, memory=memory)
    for seed in range(3):  # the first step records the CUDA graphs, the later ones replay them
        b = {k: v.cuda() for k, v in batch(seq=64, bsz=4, seed=seed).items()}
        assert_no_less_accurate(model, eager, ref32, b)
    assert fxopt.report(model).block_graphs > 0


@pytest.mark.parametrize("inner", ["inductor", "aot_eager"])
def test_offload_moves_the_block_inputs_to_cpu(monkeypatch, inner):
    """What offload saves goes through save_on_cpu's pack hook (on a GPU: into pinned CPU memory)."""
    packed = []
    real = torch.autograd.graph.save_on_cpu

    class Spy(real):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook

            def spy(t):
                packed.append(tuple(t.shape))
                return pack(t)

            self.pack_hook = spy

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Spy)
    model = tiny_lora_model("llama")
    fxopt.optimize(model, inner_backend=inner, memory="offload", disable=OTHERS)
    model(**batch(seq=32)).loss.backward()
    assert packed and all(s == (2, 32, 64) for s in packed)  # the hidden states of each block, nothing else


def test_eval_and_no_grad_run_the_regular_path():
    model = tiny_lora_model("llama")
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager", memory="recompute", disable=OTHERS)
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch()).logits, ref(**batch()).logits, atol=1e-5, rtol=0)


def test_bad_values():
    with pytest.raises(ValueError, match="OptimizeConfig.memory"):
        fxopt.optimize(tiny_lora_model("llama"), memory="fast")
    with pytest.raises(ValueError, match="regional=True"):
        fxopt.optimize(tiny_lora_model("llama"), memory="offload", regional=False)


def test_every_pass_under_recompute():
    """All passes on (attention, SwiGLU, norms, loss) with the blocks recomputed: the fused ops' backward
    runs on the recomputed graph."""
    model = tiny_lora_model("qwen3")
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager", memory="recompute")
    assert_same_training(model, ref, batch(seq=24))
    report = fxopt.report(model)
    for name in ("lora", "swiglu", "attention", "rms_norm"):
        assert report.matched(name), name


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_norms_recomputes_the_norm_outputs(family):
    """memory="norms" (Inductor): the blocks' norm outputs are recomputed in the backward, not saved: exactly two
    [tokens x hidden] tensors per block fewer (Qwen3's per-head q/k norms too: their outputs feed RoPE, which
    saves nothing of them), and the model trains as unoptimized."""
    model = tiny_lora_model(family)
    ref = twin(model)
    plain = twin(model)
    fxopt.optimize(model)  # the default
    fxopt.optimize(plain, memory="none")
    b = batch(seq=32)
    assert_same_training(model, ref, b)
    assert_same_training(model, ref, batch(seq=32, seed=2))
    assert fxopt.report(model).matched("rms_norm")
    cfg = model.config
    tokens, hidden, layers = 2 * 32, cfg.hidden_size, cfg.num_hidden_layers
    two_per_block = 2 * tokens * hidden * 4 * layers
    saved = saved_bytes(plain, b) - saved_bytes(model, b)
    assert two_per_block <= saved <= 1.1 * two_per_block, (saved, two_per_block)


def test_norms_only_with_inductor():
    from fxopt.recompute import RecomputeNorms, joint_pass

    assert isinstance(joint_pass(fxopt.OptimizeConfig(memory="norms")), RecomputeNorms)
    assert joint_pass(fxopt.OptimizeConfig(memory="norms", inner_backend="aot_eager")) is None
    assert joint_pass(fxopt.OptimizeConfig(memory="none")) is None
    assert fxopt.OptimizeConfig().memory == "norms"  # the default: measured to fit the dense workload's 10 GiB
