"""The compiles a test module's selected cases need, run once, in parallel on every core.

A module fixture collects the values of one parameter over the module's tests that this session
selected (``-k`` included), drops repeats, and submits one job per value to a pool of spawned
workers: each test then waits for its own future. Two tests of one module that need the same
compile (same arch, spec and options) share it.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ProcessPoolExecutor


def selected(request, param: str) -> list:
    """The values of parameter `param` of the tests of `request`'s module selected in this
    session, each once, in collection order."""
    values: dict = {}
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.module is request.module and callspec is not None and param in callspec.params:
            values.setdefault(callspec.params[param], None)
    return list(values)


def run(function: Callable, keys: list[Hashable]) -> dict[Hashable, Future]:
    """`function(key)` for each key, in parallel (`function` at a module's top level, so that
    the workers can import it): the futures by key, all done on return."""
    # spawn, not fork: no CUDA state may leak into the workers on a machine that has a GPU.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(os.cpu_count(), mp_context=context) as pool:
        return {key: pool.submit(function, key) for key in keys}
