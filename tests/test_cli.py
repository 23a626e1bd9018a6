"""The command line: `python -m fxopt --help` and each subcommand's help, `bench` end to end on the CPU (tiny
dense workload, eager and fxopt, into a temporary directory: JSON, markdown table, PNG when matplotlib is
there), its argument errors, and `explain` printing a match report with its counts."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fxopt.__main__ as cli
from fxopt import bench

ROOT = Path(__file__).resolve().parent.parent
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_cli(*args, timeout=120, interpret=True):
    """`python -m fxopt ARGS` from the repository root, as a user runs it; returns the CompletedProcess.
    interpret=False drops TRITON_INTERPRET (set by tests/conftest.py): the fxopt ops then run their torch math
    on the CPU, as for a CPU user, instead of the slow interpreted kernels (tested in tests/kernels)."""
    env = dict(os.environ)
    if not interpret:
        env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "fxopt", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, expected", [
    ([], ["demo", "explain", "check", "bench"]),
    (["bench"], ["--workloads", "--setups", "--size", "--device", "--steps", "--warmup", "--out", "--tag",
                 "--timeout", "--no-plot", "dense", "moe", "eager", "compile", "liger", "fxopt", "matplotlib"]),
    (["explain"], ["--model", "--no-lora", "--seq"]),
    (["check"], ["--model", "--steps", "--seq", "--attn", "--device", "model type"]),
])
def test_help(args, expected):
    proc = run_cli(*args, "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    missing = [word for word in expected if word not in proc.stdout]
    assert not missing, (missing, proc.stdout)


def test_bench_tiny_cpu_end_to_end(tmp_path):
    out = tmp_path / "results"
    proc = run_cli("bench", "--size", "tiny", "--device", "cpu", "--workloads", "dense", "--setups", "eager,fxopt",
                   "--steps", "2", "--warmup", "1", "--out", str(out), timeout=600, interpret=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = out.glob("*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [(r["workload"], r["setup"]) for r in rows] == [("dense", "eager"), ("dense", "fxopt")]
    for r in rows:
        assert not r.get("error"), r["error"]
        assert r["tokens_per_s"] > 0 and len(r["losses"]) == 1 + 1 + 2  # first, warm-up, timed steps
    # the same initial weights and batch in both processes: the same first loss (fp32 on the CPU)
    assert abs(rows[0]["loss_first"] - rows[1]["loss_first"]) < 1e-3 * abs(rows[0]["loss_first"])
    assert isinstance(rows[1]["fxopt_report"], dict) and rows[1]["fxopt_report"]["lora"]["matched"] > 0

    md = result.with_suffix(".md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| dense |")]
    assert [line.split("|")[2].strip() for line in table] == ["eager", "fxopt"]
    assert "| workload | setup | tokens/s |" in proc.stdout and all(line in proc.stdout for line in table)
    assert "dense/eager:" in proc.stdout and "dense/fxopt:" in proc.stdout  # a line per run as it finishes

    png = result.with_suffix(".png")
    if HAS_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plot: {png}" in proc.stdout
    else:
        assert not png.exists()
        assert "plot skipped: matplotlib is not installed" in proc.stdout


@pytest.mark.parametrize("flag, value, bad", [
    ("--setups", "eager,bogus", "bogus"),
    ("--setups", "eager,,fxopt", "empty name"),
    ("--workloads", "dense,nope", "nope"),
])
def test_bench_rejects_unknown_names(flag, value, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", flag, value, "--device", "cpu"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert f"{flag}:" in err and bad in err, err


def test_bench_unknown_setup_from_the_shell():
    proc = run_cli("bench", "--setups", "eager,bogus", timeout=60)
    assert proc.returncode != 0
    assert "--setups" in proc.stderr and "'bogus'" in proc.stderr, proc.stderr


def test_bench_without_the_script_names_the_path(monkeypatch, tmp_path, capsys):
    missing = tmp_path / "benchmarks" / "train_step.py"
    monkeypatch.setattr(bench, "SCRIPT", missing)
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--device", "cpu"])
    assert exc.value.code != 0
    assert str(missing) in capsys.readouterr().err


def _row(wl, setup, tps, peak=None, error=None):
    return dict(workload=wl, setup=setup, tokens_per_s=tps, peak_gib=peak, **({"error": error} if error else {}))


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed")
def test_plot_with_peaks_and_a_failed_run(tmp_path):
    rows = [_row("dense", "eager", 1000.0, 30.5), _row("dense", "fxopt", 2500.0, 20.1),
            _row("moe", "eager", 800.0, 40.0), _row("moe", "fxopt", None, error="OutOfMemoryError: ...")]
    path = bench.plot(rows, ["dense", "moe"], ["eager", "fxopt"], str(tmp_path / "p.png"), "title")
    assert path and Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_skipped_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert bench.plot([_row("dense", "eager", 1.0)], ["dense"], ["eager"], str(tmp_path / "p.png")) is None
    assert "plot skipped: matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "p.png").exists()


def test_explain_prints_the_report_with_counts():
    proc = run_cli("explain", "--model", "LlamaConfig", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fxopt match report" in proc.stdout
    counts = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"^- (\w+): (\d+) matched, (\d+) rejected$",
                                                                   proc.stdout, re.M)}
    # 2 decoder layers x 7 LoRA projections (target "all-linear" leaves the lm_head out), 2 norms per layer
    # plus the final one, the loss
    assert counts.get("lora") == (14, 0), proc.stdout
    assert counts.get("rms_norm", (0,))[0] == 5, proc.stdout
    assert counts.get("cross_entropy", (0,))[0] == 1, proc.stdout


def test_check_a_family_no_test_names():
    """`check` trains a tiny model of a model type as is and with fxopt and says whether they agree (Falcon: its
    linears written out, multi-query attention), with the report."""
    proc = run_cli("check", "--model", "falcon", "--steps", "2", timeout=300, interpret=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^OK: falcon \(torch.float32, cpu\)", proc.stdout, re.M), proc.stdout
    assert len(re.findall(r"^step \d: loss", proc.stdout, re.M)) == 2
    assert "- lora: 4 matched, 0 rejected" in proc.stdout


def test_check_says_mismatch_with_exit_status_1(monkeypatch, capsys):
    """A mismatch (here: a tolerance nothing can meet) is said, and the exit status is 1."""
    from fxopt import check

    real = check.run_check
    monkeypatch.setattr(check, "run_check", lambda *a, **k: real(*a, **{**k, "tol": -1.0}))
    assert cli.main(["check", "--model", "LlamaConfig", "--steps", "1", "--seq", "8"]) == 1
    assert "MISMATCH: LlamaConfig" in capsys.readouterr().out


def test_check_bad_model_name():
    proc = run_cli("check", "--model", "no_such_model_type", timeout=120, interpret=False)
    assert proc.returncode != 0 and "--model: 'no_such_model_type'" in proc.stderr


def test_progress_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    it, write = bench._progress([("dense", "eager"), ("dense", "fxopt")])
    assert list(it) == [("dense", "eager"), ("dense", "fxopt")]
    assert capsys.readouterr().out.splitlines() == ["[1/2] dense/eager ...", "[2/2] dense/fxopt ..."]
