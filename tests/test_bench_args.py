"""The kernel microbenchmarks' --shapes / --cases arguments: checked before the GPU check, so a wrong name is a
usage error naming the flag and the known names on any machine."""
import importlib
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.append(BENCH)  # after the project: a benchmark module name never shadows another

from kernel_results import parser, subset  # noqa: E402


def test_subset_default_all_and_explicit():
    p = parser("doc")
    known = {"a": 1, "b": 2, "c": 3}
    assert subset(p, "--shapes", "", known) == ["a", "b", "c"]
    assert subset(p, "--shapes", "", known, default=["b"]) == ["b"]
    assert subset(p, "--shapes", "all", known, default=["b"]) == ["a", "b", "c"]
    assert subset(p, "--shapes", " c, a ,", known) == ["c", "a"]


@pytest.mark.parametrize("script, flag", [("bench_attention", "--cases"), ("bench_rms_norm", "--cases"),
                                          ("bench_lora", "--shapes"), ("bench_moe", "--shapes"),
                                          ("bench_nf4", "--shapes")])
def test_unknown_name_is_a_usage_error(script, flag, monkeypatch, capsys):
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [script + ".py", flag, "nope"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag}: unknown 'nope'; known: [" in err
