"""On the GPU: a bf16 Llama + PEFT LoRA, optimized with the default (Inductor) backend, with every LoRA linear
matched, gives the loss and LoRA gradients of the same model run in fp32 no less accurately than the
unoptimized bf16 model does (bf16 rounding alone moves the result; fxopt must not add to it)."""
import pytest
import torch

from tests.models import assert_no_less_accurate, batch, optimize_and_check_on_gpu, tiny_lora_model, twin


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_model_on_gpu(family):
    model = tiny_lora_model(family, dtype=torch.bfloat16).cuda()
    eager, ref32 = twin(model), twin(model).float()
    report = optimize_and_check_on_gpu(model, eager, ref32)
    assert not report.rejected("lora")
    assert len({r.location for r in report.matched("lora")}) == 7  # "layers.*": both blocks run one compiled block


@pytest.mark.gpu
@pytest.mark.parametrize("reentrant", [False, True])
def test_bf16_model_with_gradient_checkpointing_on_gpu(reentrant):
    """HF gradient checkpointing on the GPU (Inductor, CUDA graphs): the blocks run fxopt's compiled code inside
    the checkpoint and two training steps stay as accurate as the unoptimized checkpointed model."""
    model = tiny_lora_model("llama", dtype=torch.bfloat16).cuda()
    eager, ref32 = twin(model), twin(model).float()
    for m in (model, eager, ref32):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        m.enable_input_require_grads()
        m.train()
    report = optimize_and_check_on_gpu(model, eager, ref32)
    b = {k: v.cuda() for k, v in batch(seq=64, bsz=4).items()}
    assert_no_less_accurate(model, eager, ref32, b)  # a second step: the CUDA graphs replay
    assert report.block_graphs > 0 and len({r.location for r in report.matched("lora")}) == 7
