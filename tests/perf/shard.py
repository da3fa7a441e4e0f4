"""pytest plugin: with SHARD=i/n in the environment, keep every n-th collected test from the i-th.

    SHARD=0/4 python -m pytest -p tests.perf.shard ... &  SHARD=1/4 ... &  (and so on)

runs a GPU suite as n processes side by side, which the compile-bound GPU tests need (one
process compiles and checks one case at a time). Round robin over the collection order mixes
the files, so each shard draws a similar share of the slow ones.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    spec = os.environ.get("SHARD")
    if not spec:
        return
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        raise pytest.UsageError(f"SHARD: expected i/n such as 0/4, got {spec!r}") from None
    if not 0 <= index < count:
        raise pytest.UsageError(f"SHARD: expected 0 <= i < n, got {spec!r}")
    keep = items[index::count]
    kept = set(map(id, keep))
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
    items[:] = keep
