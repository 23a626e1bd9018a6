"""Edge inputs on an optimized model, each against the unoptimized model: batch 1 and length 1, packed
(padding-free) batches whose lengths vary with position_ids restarting per sequence (no recompile after the
first dynamic one), and NaN/inf in the inputs (propagated where the unoptimized model propagates them)."""
import torch
from torch._dynamo.utils import counters

import fxopt
from tests.models import assert_same_training, batch, rel_err, tiny_lora_model, train_step, twin


def _optimized_pair(**lora):
    model = tiny_lora_model("llama", **lora)
    ref = twin(model)
    fxopt.optimize(model, inner_backend="aot_eager")
    return model, ref


def test_batch_one_and_length_one():
    model, ref = _optimized_pair()
    # the shortest sequence that has a target. Its one target reads position 0, which attends to key 0 alone:
    # softmax is exactly 1 there, so every gradient through q and k (the q/k LoRA weights) is mathematically
    # zero. The reference gets exact zeros; fxopt's attention kernel forms dS = P (dP - delta) with dP and
    # delta summed in different orders, i.e. zeros up to rounding of terms of the size of the other gradients.
    # Those are compared against that size (1e-6 of the largest gradient); every other gradient as usual.
    loss, grads = train_step(model, batch(seq=2, bsz=1))
    ref_loss, ref_grads = train_step(ref, batch(seq=2, bsz=1))
    assert rel_err(loss, ref_loss) < 1e-5
    scale = max(g.norm().item() for g in ref_grads.values())
    zero = [n for n, g in ref_grads.items() if g.norm() == 0]
    assert zero and all(("q_proj" in n or "k_proj" in n) for n in zero)
    for name, g in grads.items():
        if name in zero:
            assert g.norm().item() <= 1e-6 * scale, name
        else:
            assert rel_err(g, ref_grads[name]) < 1e-5, name
    ids = torch.tensor([[5]])
    model.eval()
    ref.eval()
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert got.shape == (1, 1, 128) and rel_err(got, want) < 1e-5
    with torch.no_grad():  # one token, labels: no target after the shift, a NaN loss in both
        assert torch.isnan(model(input_ids=ids, labels=ids).loss) and torch.isnan(ref(input_ids=ids, labels=ids).loss)


def _packed(lengths, vocab=128, seed=0):
    """One row of sequences back to back, position_ids restarting at each, labels -100 at each sequence start
    (what a padding-free collator gives)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[0, torch.cumsum(torch.tensor([0] + list(lengths[:-1])), 0)] = -100
    return dict(input_ids=ids, position_ids=pos, labels=labels)


def test_packed_batches_of_varying_length_compile_once_dynamic():
    """optimize turns the model's use_cache off (no KV cache in training), and transformers masks packed
    sequences apart (from position_ids) only without a cache: so the reference runs with use_cache=False too
    (with the default use_cache=True the unoptimized loss differs: one causal mask over the whole row).
    Lengths on both sides of 16 (the attention kernels' strip): a size derived from the length once made a batch of
    <= 16 tokens recompile (hidden while an earlier test had compiled the same code: conftest resets Dynamo now)."""
    model, ref = _optimized_pair()
    ref.config.use_cache = False
    batches = [_packed(ls, seed=i) for i, ls in enumerate([(7, 9), (5, 6, 12), (30,), (3, 4, 5, 6), (11, 2)])]
    for b in batches[:2]:  # the second length marks the sequence dynamic: one more compile
        assert_same_training(model, ref, b)
    before = counters["stats"]["unique_graphs"]
    for b in batches[2:]:
        assert_same_training(model, ref, b)
    assert counters["stats"]["unique_graphs"] == before


def test_nan_and_inf_propagate_as_the_unoptimized_model():
    model, ref = _optimized_pair()
    model.eval()
    ref.eval()
    emb = ref.get_input_embeddings()(batch(seq=12, bsz=2)["input_ids"]).detach()
    emb[0, 4, 3] = float("nan")
    emb[1, 7, :] = float("inf")
    with torch.no_grad():
        got, want = model(inputs_embeds=emb).logits, ref(inputs_embeds=emb).logits
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.isnan(want).any()  # the case does reach the output
    finite = torch.isfinite(want)
    assert rel_err(got[finite], want[finite]) < 1e-5


def test_module_without_matches_runs_unchanged_and_the_report_says_so():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    ref = twin(net)
    fxopt.optimize(net, inner_backend="aot_eager")
    x = torch.randn(3, 8)
    assert torch.allclose(net(x), ref(x), rtol=1e-6, atol=1e-7)
    report = fxopt.report(net)
    assert not report.records and "No pass matched anything" in report.to_markdown()


def test_float64_model_trains_as_unoptimized():
    """A dtype the kernels do not take: the LoRA pass leaves the linears alone (reported) and the model trains
    exactly as the unoptimized one."""
    model, ref = _optimized_pair()
    model.double()
    ref.double()
    assert_same_training(model, ref, batch(), tol=1e-12)
    rejected = fxopt.report(model).rejected("lora")
    assert rejected and all("float64" in r.reason for r in rejected) and not fxopt.report(model).matched("lora")


def test_input_on_another_device_than_the_weights_is_a_clear_error():
    """What an nn.DataParallel replica does (it runs the optimized model's compiled call with its own GPU's
    inputs): a clear error naming DataParallel, not a device mismatch deep inside Dynamo."""
    import pytest

    model, _ = _optimized_pair()
    with pytest.raises(RuntimeError, match="DataParallel"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"))  # as Trainer calls it
