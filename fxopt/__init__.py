"""fxopt: fast, lean LoRA / QLoRA / MoE fine-tuning of Hugging Face models by compiling, not hand-patching.

    model = fxopt.optimize(model)        # same object, compiled in place; train as before
    fxopt.explain(model, **batch)        # the match report: what matched, where, why a near-miss did not
"""
from fxopt.api import explain, optimize, report
from fxopt.backend import fxopt_backend, make_backend
from fxopt.config import OptimizeConfig
from fxopt.passes import pass_names
from fxopt.report import MatchRecord, Report

__all__ = ["optimize", "explain", "report", "OptimizeConfig", "Report", "MatchRecord", "pass_names",
           "fxopt_backend", "make_backend"]
__version__ = "0.1.0"
