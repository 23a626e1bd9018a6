"""benchmarks/kernel_resources.py: compiles an attention kernel for sm_90 without a GPU and reads back its
registers, spills and shared memory (a subprocess: the kernels must not be interpreted there)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it; compiled kernels are what the tool reads
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_resources.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_reports_one_config_of_each_variant():
    pytest.importorskip("triton.backends.nvidia.compiler")
    res = _run("--kernels", "dq", "--configs", "64,32,4,2")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| dq")]
    assert [r[2].strip() for r in rows] == ["causal", "mask"], res.stdout
    for r in rows:
        regs, spilled, smem, per_sm = int(r[3]), int(r[4]), float(r[5]), int(r[6])
        assert 0 < regs <= 255 and spilled >= 0 and smem > 0 and per_sm >= 1
    # the mask variant really compiles the mask walk in (flags not taking effect would give two equal rows)
    assert [c.strip() for c in rows[0][3:6]] != [c.strip() for c in rows[1][3:6]], res.stdout


def test_interpreted_kernels_are_refused():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_resources.py")], cwd=ROOT,
                         env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "interpreted" in res.stdout and "| dq" not in res.stdout


def test_bad_config_is_named():
    res = _run("--kernels", "dq", "--configs", "64,32,4")
    assert res.returncode != 0 and "BLOCK_M,BLOCK_N,num_warps,num_stages" in res.stderr + res.stdout
