"""fxopt's sources are part of Inductor's compile-cache key (fxopt/cache_key.py): an unchanged fxopt reuses a
cached compile, a changed one compiles anew (a cached backward of an older fxopt had called a removed op)."""
import torch
from torch._dynamo.utils import counters

from fxopt import cache_key
from fxopt.backend import make_backend


def cache_hits(fn, x) -> int:
    """Compile hits of the on-disk caches (AOTAutograd's and Inductor's) while compiling and running fn."""
    torch._dynamo.reset()
    before = counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"]
    torch.compile(fn, backend=make_backend())(x).backward()
    return counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"] - before


def test_changed_fxopt_compiles_anew(monkeypatch):
    from torch._inductor.utils import fresh_cache

    def fn(x):
        return (x.sin() * 3).sum()

    x = torch.randn(16, requires_grad=True)
    with fresh_cache():
        cache_hits(fn, x)  # fills the cache
        assert cache_hits(fn, x) > 0  # the same fxopt: a hit
        monkeypatch.setattr(cache_key, "source_hash", lambda: "another fxopt")
        assert cache_hits(fn, x) == 0  # changed sources: compiled anew
