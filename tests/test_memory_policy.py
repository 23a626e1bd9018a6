"""The memory policy (OptimizeConfig.memory): "recompute" keeps only each block's inputs and recomputes its
fused forward in the backward; "offload" also moves those inputs to CPU memory until the backward. Both must
train exactly as the unoptimized model (the first block's input does not require grad: frozen embeddings),
keep far fewer activations, and turn CUDA graphs off; bad values are refused with the option's name."""
import pytest
import torch

import fxopt
from fxopt.backend import no_cudagraphs_reason
from tests.models import assert_same_training, batch, tiny_lora_model, twin

OTHERS = ["rms_norm", "attention", "cross_entropy", "swiglu"]  # slow in the interpreter, not what is tested


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def saved_bytes(model, b):
    """Bytes of the tensors autograd saves outside any checkpoint during one training forward."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**b).loss
    loss.backward()
    return sum(total)


@pytest.mark.parametrize("memory", ["recompute", "offload"])
def test_trains_exactly_and_saves_less(memory):
    model = tiny_lora_model("llama")
    ref = twin(model)
    plain = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager", memory=memory, disable=OTHERS)
    fxopt.optimize(plain, inner_backend="aot_eager", disable=OTHERS)
    b = batch(seq=32)
    assert_same_training(model, ref, b)
    assert_same_training(model, ref, batch(seq=32, seed=2))  # a second step: the recompute path again
    assert fxopt.report(model).matched("lora")
    assert saved_bytes(model, b) < 0.5 * saved_bytes(plain, b)
    assert memory in no_cudagraphs_reason(model, model._fxopt_config.memory)
    assert no_cudagraphs_reason(plain, plain._fxopt_config.memory) is None


def test_offload_moves_the_block_inputs_to_cpu(monkeypatch):
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
    fxopt.optimize(model, inner_backend="aot_eager", memory="offload", disable=OTHERS)
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
