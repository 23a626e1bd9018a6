"""DDP and FSDP2 with fxopt on the CPU: benchmarks/multi_gpu.py in 2 processes (torchrun, gloo) on the tiny fp32
dense model, fxopt's inner backend aot_eager.

Per mode, the script's fxopt run must train (3 AdamW steps) to the losses of one process training the whole
global batch eagerly, computed here independently of the script's own --reference (one forward over the
global batch, not its micro-batches), within 1e-4 relative; every LoRA linear must be matched on every rank.
The comparison can fail: the same check rejects the losses of a run that trained on the wrong rows or without
synchronised gradients. The adapters are given rank 320 so that a block holds 1.3 MB of them, more than DDP's
1 MB first bucket: Dynamo's DDPOptimizer would then cut fxopt's block graph (as on the full workload), which
the script prevents for fxopt; a run that leaves it on shows the loss of matches.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "multi_gpu.py"

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD, STEPS, LR, RANK_R, TOL = 2, 3, 1e-2, 320, 1e-4
ARGS = SimpleNamespace(workload="dense", size="tiny", dtype="float32", lora_r=RANK_R, lr=LR)
TARGETS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"}
BLOCKS = "base_model.model.model.layers"


def _script():
    spec = importlib.util.spec_from_file_location("multi_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _launch(mode, out, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), str(SCRIPT),
           "--mode", mode, "--device", "cpu", "--size", "tiny", "--dtype", "float32", "--lora-r", str(RANK_R),
           "--lr", str(LR), "--warmup", "1", "--steps", str(STEPS - 2), "--ref-steps", str(STEPS),
           "--inner-backend", "aot_eager", "--compile-backend", "aot_eager", "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # fxopt's ops run their torch math on the CPU (the interpreted Triton kernels are tested in tests/kernels)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (path,) = Path(out).glob(f"*-multi-gpu-{mode}.json")
    payload = json.loads(path.read_text())
    assert "| setup | tokens/s per GPU |" in proc.stdout  # the table is printed at the end
    return payload, {r["setup"]: r for r in payload["rows"]}


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    cache = {}

    def run(mode, *extra):
        if (mode, extra) not in cache:
            cache[mode, extra] = _launch(mode, tmp_path_factory.mktemp(mode), extra)
        return cache[mode, extra]

    return run


def _train(model_ids, steps=STEPS):
    """Eager training in this process: each (model, ids) pair takes its own AdamW steps on its own rows; the
    loss of a step is the mean over the pairs (one pair: one process on those rows)."""
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR) for m, _ in model_ids]
    losses = []
    for _ in range(steps):
        step = []
        for (model, ids), opt in zip(model_ids, opts):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step.append(loss.item())
        losses.append(sum(step) / len(step))
    return losses


@pytest.fixture(scope="module")
def one_process():
    """Losses of one process: `ref` on the whole global batch; and what two wrong distributed runs would give:
    `wrong_rows` (every rank trained on rank 0's rows), `unsynced` (each rank on its rows, gradients not
    averaged)."""
    mg = _script()
    cpu = torch.device("cpu")
    model, cfg, bsz, seq = mg.build_model(ARGS, cpu)
    ids = mg.global_ids(cfg.vocab_size, WORLD, bsz, seq)
    shards = [ids[r * bsz:(r + 1) * bsz] for r in range(WORLD)]
    return {"ref": _train([(model, ids)]),
            "wrong_rows": _train([(mg.build_model(ARGS, cpu)[0], shards[0])]),
            "unsynced": _train([(mg.build_model(ARGS, cpu)[0], s) for s in shards])}


def _max_rel(losses, ref):
    assert len(losses) >= len(ref)
    return max(abs(a - b) / abs(b) for a, b in zip(losses, ref))


def test_a_wrong_run_would_be_detected(one_process):
    ref = one_process["ref"]
    # the steps change the loss, so the later losses test the gradients and the optimizer steps
    assert max(abs(x - ref[0]) for x in ref[1:]) > 100 * TOL * ref[0]
    assert _max_rel(one_process["wrong_rows"], ref) > 10 * TOL
    assert _max_rel(one_process["unsynced"], ref) > 10 * TOL


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_losses_equal_one_process(launch, one_process, mode):
    payload, rows = launch(mode)
    ref = one_process["ref"]
    assert _max_rel(payload["reference_losses"], ref) < TOL  # the script's own reference agrees
    for setup in ("eager", "fxopt"):
        assert not rows[setup].get("error"), rows[setup]["error"]
        assert len(rows[setup]["losses"]) == STEPS
        assert _max_rel(rows[setup]["losses"], ref) < TOL, (setup, rows[setup]["losses"], ref)
        assert rows[setup]["ref_max_rel_diff"] < TOL
    assert payload["world_size"] == WORLD and payload["backend"] == "gloo"


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_every_lora_linear_matched_on_every_rank(launch, mode):
    _, rows = launch(mode)
    reports = rows["fxopt"]["fxopt_report_per_rank"]
    assert len(reports) == WORLD
    for rep in reports:
        assert rep["summary"]["lora"] == {"matched": len(TARGETS), "rejected": 0}, rep
        assert {loc.rsplit(".", 2)[-2] + "." + loc.rsplit(".", 1)[-1] for loc in rep["lora_matched"]} == TARGETS
        if mode == "ddp":  # named by module path ("*": the blocks share one compiled block)
            assert set(rep["lora_matched"]) == {f"{BLOCKS}.*.{t}" for t in TARGETS}
            assert not rep["warning"]


def test_ddp_fxopt_blocks_exceed_ddp_first_bucket(launch):
    """The DDP runs above are the case DDPOptimizer cuts: a block's adapters fill DDP's first bucket."""
    _, rows = launch("ddp")
    per_block = rows["fxopt"]["trainable_params"] * 4 / 2  # fp32 adapters, 2 blocks
    assert per_block > torch.distributed._DEFAULT_FIRST_BUCKET_BYTES


def test_fsdp2_report_names_module_paths(launch):
    """FSDP2 registers new unsharded parameters for each forward: the report still names every match by its
    module path and counts the block graphs (fxopt looks names up when a graph compiles)."""
    _, rows = launch("fsdp2")
    for rep in rows["fxopt"]["fxopt_report_per_rank"]:
        assert set(rep["lora_matched"]) == {f"{BLOCKS}.*.{t}" for t in TARGETS}
        assert not rep["warning"]
