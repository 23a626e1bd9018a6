"""On the GPU: a bf16 Llama + PEFT LoRA, optimized with the default (Inductor) backend, with every LoRA linear
matched, gives the loss and LoRA gradients of the same model run in fp32 no less accurately than the
unoptimized bf16 model does (bf16 rounding alone moves the result; fxopt must not add to it)."""
import pytest
import torch

from tests.models import optimize_and_check_on_gpu, tiny_lora_model, twin


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_model_on_gpu(family):
    model = tiny_lora_model(family, dtype=torch.bfloat16).cuda()
    eager, ref32 = twin(model), twin(model).float()
    report = optimize_and_check_on_gpu(model, eager, ref32)
    assert not report.rejected("lora")
    assert len({r.location for r in report.matched("lora")}) == 7  # "layers.*": both blocks run one compiled block
