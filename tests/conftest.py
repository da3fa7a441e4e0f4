"""Fixtures shared by the GPU test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["dispatch", "sm80"])
def kernel_path(request, monkeypatch):
    """Run half-precision cases through the dispatcher's choice and, forced, the sm80 kernels
    (on an H100 the dispatcher picks the Hopper kernels, which would leave sm80 untested).
    Function-scoped: it sets the environment once per test, the same for every Hypothesis
    example."""
    from cuflash import _replay

    # A signature planned under the other path would replay that path's kernels: start clean.
    _replay.clear()
    if request.param == "sm80":
        monkeypatch.setenv("CUFLASH_FORCE_SM80", "1")
    yield request.param
    _replay.clear()
