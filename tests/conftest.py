# TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it must be set before fxopt's
# kernels are imported: on a machine without CUDA, tests run the real Triton kernels in the interpreter.
import os

# Under pytest-xdist (`-n 2`, the README's command) each worker is one process on one core: one torch thread each,
# or the two workers' OpenMP pools oversubscribe the cores and spin against each other. The variable reaches the
# processes a test starts (CLI, distributed); set_num_threads below covers a torch imported before this file.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch as _torch

    _HAS_CUDA = _torch.cuda.is_available()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _torch.set_num_threads(1)
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# The property tests draw the same examples every run (CI must not turn red on a draw nobody saw before);
# FXOPT_HYPOTHESIS_RANDOM=1 explores new ones (a failure found that way is pinned by a test of its own).
settings.register_profile("fxopt-fixed", derandomize=True, deadline=None)
settings.register_profile("fxopt-explore", derandomize=False, deadline=None)
settings.load_profile("fxopt-explore" if os.environ.get("FXOPT_HYPOTHESIS_RANDOM") else "fxopt-fixed")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_silent_kernel_fallback():
    """A Triton kernel that fails to compile switches its family to the torch math for the rest of the process
    (fxopt.kernels.common.FAILED), with one warning: a GPU test would then pass on the fallback, and every later
    test of that family too. Fail the test in which it happened instead (a test that provokes the failure on
    purpose monkeypatches FAILED, which leaves the module's set empty)."""
    yield
    if not _HAS_CUDA:
        return
    from fxopt.kernels import common

    failed = set(common.FAILED)
    common.FAILED.clear()
    assert not failed, f"Triton kernels failed to compile (families switched to torch math): {sorted(failed)}"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own models: it starts from empty Dynamo caches, so one test's compiled code (or a
    size or float Dynamo made dynamic after seeing two values, or cache entries counting toward the recompile
    limit of code the tests share) never leaks into the next. Under xdist the order of tests in a worker varies
    from run to run: a test that passed only after another had compiled the same code once turned CI red."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
