"""OptimizeConfig.deterministic: fxopt's kernels skip autotuning (the first config of each tuning list) and torch's
deterministic algorithms are on; two runs of the same training give bitwise-identical losses (on the GPU in
fresh processes, where autotuning would otherwise time the configs anew)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fxopt
from fxopt.kernels import common


@pytest.fixture
def restore_determinism():
    yield
    common.DETERMINISTIC = False
    torch.use_deterministic_algorithms(False)


def test_deterministic_turns_on_fixed_configs_and_torch_switch(restore_determinism):
    from tests.models import tiny_lora_model

    fxopt.optimize(tiny_lora_model("llama"), inner_backend="aot_eager", deterministic=True)
    assert common.DETERMINISTIC and torch.are_deterministic_algorithms_enabled()
    with pytest.raises(TypeError, match="deterministic"):
        fxopt.OptimizeConfig(deterministic="yes")


def test_launch_takes_the_first_config_when_deterministic(monkeypatch):
    """launch() with a tuner: the tuner itself by default; under DETERMINISTIC the plain kernel with the tuner's
    first config (meta-parameters, num_warps, num_stages), whatever timing would pick."""
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append(("kernel", grid, kw))

    class Config:
        kwargs, num_warps, num_stages = {"BLOCK": 64}, 4, 3

    class Tuner:
        configs = [Config()]

        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append(("tuner", kw))

    grid = lambda meta: (meta["BLOCK"],)  # noqa: E731
    common.launch(Kernel(), Tuner(), grid, (1,), {"FLAG": 1}, {"BLOCK": 16}, torch.device("cpu"))
    monkeypatch.setattr(common, "DETERMINISTIC", True)
    common.launch(Kernel(), Tuner(), grid, (1,), {"FLAG": 1}, {"BLOCK": 16}, torch.device("cpu"))
    assert calls == [("tuner", {"FLAG": 1}),
                     ("kernel", (64,), {"FLAG": 1, "BLOCK": 64, "num_warps": 4, "num_stages": 3})]


def test_deterministic_launch_skips_configs_over_the_gpus_resources(monkeypatch):
    """Under DETERMINISTIC a config that does not fit the GPU (OutOfResources when loaded, before it runs: on an
    H200 the 4-bit GEMM's first tile with fp32 inputs) is skipped for the next in list order, as the autotuner
    does; when none fits, the launch fails as a compile failure does (the family falls back to its math)."""
    from triton.runtime.errors import OutOfResources

    calls = []

    class Kernel:
        def __init__(self, too_big):
            self.too_big = too_big

        def __getitem__(self, grid):
            def run(*args, **kw):
                if kw["BLOCK"] in self.too_big:
                    raise OutOfResources(262144, 232448, "shared memory")
                calls.append((grid, kw["BLOCK"], kw["num_stages"]))
            return run

    class Config:
        def __init__(self, block, stages):
            self.kwargs, self.num_warps, self.num_stages = {"BLOCK": block}, 4, stages

    class Tuner:
        configs = [Config(128, 4), Config(64, 3), Config(32, 2)]

    grid = lambda meta: (meta["BLOCK"],)  # noqa: E731
    monkeypatch.setattr(common, "DETERMINISTIC", True)
    common.launch(Kernel({128}), Tuner(), grid, (1,), {}, {"BLOCK": 16}, torch.device("cpu"))
    common.launch(Kernel({128, 64}), Tuner(), grid, (1,), {}, {"BLOCK": 16}, torch.device("cpu"))
    assert calls == [((64,), 64, 3), ((32,), 32, 2)]
    with pytest.warns(UserWarning, match="failed to compile"), pytest.raises(common.KernelFailed):
        common.launch(Kernel({128, 64, 32}), Tuner(), grid, (1,), {}, {"BLOCK": 16}, torch.device("cpu"))
    common.FAILED.clear()


_RUN = r"""
import json, torch, fxopt
from tests.models import tiny_lora_model, batch
torch.manual_seed(0)
model = tiny_lora_model("llama", dtype=torch.bfloat16, lora_dropout=0.1).cuda()
fxopt.optimize(model, deterministic=True)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
b = {k: v.cuda() for k, v in batch(seq=256, bsz=4).items()}
losses = []
for step in range(4):
    torch.manual_seed(step)  # the dropout masks
    loss = model(**b).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    losses.append(loss.float().item())
print("LOSSES", json.dumps([float(x).hex() for x in losses]))
"""


@pytest.mark.gpu
def test_two_gpu_runs_give_bitwise_identical_losses():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    runs = []
    for _ in range(2):  # fresh processes: nothing cached between them but what is on disk
        out = subprocess.run([sys.executable, "-c", _RUN], cwd=root, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.split("LOSSES", 1)[1]))
    print("losses (hex):", runs)
    assert runs[0] == runs[1]
