"""optimize-then-Trainer: an optimized model trains, evaluates, saves checkpoints and resumes under HF Trainer as it
is (torch_compile left off), and under TRL's SFTTrainer; save_pretrained, generate and merge_and_unload work
afterwards and agree with the unoptimized model holding the same weights."""
import pytest
import torch

import fxopt
from tests.models import tiny_lora_model, twin


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=16, vocab=128, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out, **over):
    from transformers import TrainingArguments

    opts = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, per_device_eval_batch_size=4,
                report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                logging_steps=1, learning_rate=1e-2, seed=0, data_seed=0)
    opts.update(over)
    return TrainingArguments(**opts)


def _trained(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_trains_evaluates_saves_and_resumes(tmp_path):
    from transformers import Trainer

    model = tiny_lora_model("llama", lora_dropout=0.1)  # dropout: eval mode must turn it off
    eager = twin(model)
    before = _trained(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    trainer = Trainer(model=model, args=_args(tmp_path / "run"), train_dataset=Tokens(), eval_dataset=Tokens(4, seed=1))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert len({r.location for r in fxopt.report(model).matched("lora")}) == 7  # "layers.*" rows cover both blocks
    after = _trained(model)
    assert all(not torch.equal(after[n], before[n]) for n in before)  # every adapter weight was trained
    assert (tmp_path / "run" / "checkpoint-2").is_dir() and (tmp_path / "run" / "checkpoint-4").is_dir()

    # evaluate: eval mode (dropout off) and no_grad; the same loss as the unoptimized model with these weights
    eval_loss = trainer.evaluate()["eval_loss"]
    eager.load_state_dict(model.state_dict())  # the optimized model's state_dict keys are unchanged
    eager.eval()
    ids = Tokens(4, seed=1).ids
    with torch.no_grad():
        want = eager(input_ids=ids, labels=ids).loss.item()
    assert abs(eval_loss - want) < 1e-5 * abs(want)

    # resume from the step-2 checkpoint in a fresh process-like setup: the same final weights
    again = tiny_lora_model("llama", lora_dropout=0.1)
    fxopt.optimize(again, inner_backend="aot_eager")
    Trainer(model=again, args=_args(tmp_path / "run"), train_dataset=Tokens(), eval_dataset=Tokens(4, seed=1)).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    resumed = _trained(again)
    assert all(torch.allclose(resumed[n], after[n], rtol=1e-5, atol=1e-6) for n in after)


def test_save_generate_merge_after_optimize(tmp_path):
    from peft import PeftModel

    model = tiny_lora_model("llama")
    eager = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    ids = Tokens(2).ids[:, :8]
    model(input_ids=ids, labels=ids).loss.backward()  # compiled and trained through once

    model.save_pretrained(tmp_path / "adapter")
    base = tiny_lora_model("llama").get_base_model()  # same seed: the same base weights
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    saved = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert saved and all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in saved.items())

    model.eval()
    eager.eval()
    got = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=True)
    want = eager.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(got, want)

    with torch.no_grad():
        logits = eager(input_ids=ids).logits
    merged = model.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-5)


def _tokenizer(vocab=128):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def test_trl_sft_trainer_trains_optimized_model(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = tiny_lora_model("llama")
    before = _trained(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    data = Dataset.from_dict({"input_ids": [row.tolist() for row in Tokens(8).ids]})
    # SFTConfig's defaults: gradient checkpointing on (the trainer enables it after optimize: the blocks must
    # stay compiled) and bf16 autocast on this fp32 model (the LoRA linears fused under autocast)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                         use_cpu=True, save_strategy="no", logging_steps=1, learning_rate=1e-2, max_length=16)
    assert args.gradient_checkpointing and args.bf16
    result = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer()).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert len({r.location for r in fxopt.report(model).matched("lora")}) == 7
    after = _trained(model)
    assert all(not torch.equal(after[n], before[n]) for n in before)
