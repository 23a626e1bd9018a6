"""optimize-then-Trainer: an optimized model trains under HF Trainer as it is (torch_compile left off)."""
import torch

import fxopt
from tests.models import tiny_lora_model


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=16, vocab=128):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_trains_optimized_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_lora_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fxopt.optimize(model, inner_backend="aot_eager")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1, learning_rate=1e-2)
    result = Trainer(model=model, args=args, train_dataset=Tokens()).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert len({r.location for r in fxopt.report(model).matched("lora")}) == 7  # "layers.*" rows cover both blocks
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every adapter weight was trained
