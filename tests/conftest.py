"""Fixtures shared by the GPU test modules, and the Hypothesis profile of CI."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# CI (the environment sets CI) draws the same examples on every run: a failure there can be
# reproduced, and whether a commit lands does not hang on a fresh draw. Everywhere else, and in
# the long fuzz runs (CUFLASH_FUZZ_EXAMPLES), each run draws new examples.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(params=["dispatch", "sm80"])
def kernel_path(request, monkeypatch):
    """Run half-precision cases through the dispatcher's choice and, forced, the sm80 kernels
    (on an H100 the dispatcher picks the Hopper kernels, which would leave sm80 untested).
    Function-scoped: it sets the environment once per test, the same for every Hypothesis
    example."""
    from cuflash.cuda import _replay

    # A signature planned under the other path would replay that path's kernels: start clean.
    _replay.clear()
    if request.param == "sm80":
        monkeypatch.setenv("CUFLASH_FORCE_SM80", "1")
    yield request.param
    _replay.clear()
