"""CuPy's kernel cache under faults, as cuflash meets them: a cache directory that cannot be
written (read-only, full) costs a compile in memory, never the call. (A corrupted cached binary
fails CuPy's hash check and is recompiled; a concurrent or killed writer leaves only a temporary
file, since CuPy renames a finished binary into place.)"""

from __future__ import annotations

import types

import pytest

from cuflash import _launch


def _fake_cupy_compiles(monkeypatch, fail_in_memory=False):
    """cupy.RawModule stand-in whose disk cache write fails as on a read-only CUPY_CACHE_DIR."""
    import os

    import cupy

    from cuflash import _compile

    compiles = []

    class RawModule:
        def __init__(self, code, options, name_expressions):
            self.in_memory = os.environ.get("CUPY_CACHE_IN_MEMORY") == "1"
            compiles.append(self.in_memory)

        def get_function(self, name):
            if not self.in_memory or fail_in_memory:
                raise PermissionError(13, "Permission denied", "/cache/tmpabc")
            return types.SimpleNamespace(name=name, max_dynamic_shared_size_bytes=0)

    monkeypatch.setattr(cupy, "RawModule", RawModule)
    monkeypatch.setattr(cupy.cuda, "Device", lambda *a: types.SimpleNamespace(id=0))
    monkeypatch.setattr(_compile, "smem_limit", lambda device_id: 232448)
    monkeypatch.setattr(_compile, "_disk_cache_failed", False)
    return compiles


def test_unwritable_kernel_cache_compiles_in_memory(monkeypatch, caplog):
    import os

    from cuflash import _compile

    compiles = _fake_cupy_compiles(monkeypatch)
    monkeypatch.delenv("CUPY_CACHE_IN_MEMORY", raising=False)
    spec = _launch.fwd_spec("float16", 64, "causal", True)
    with caplog.at_level("DEBUG", logger="cuflash"):
        fn = _compile._load(spec, 90)
    assert fn.name == spec.name
    assert compiles == [False, True], "one try through the disk cache, then one in memory"
    assert "CUPY_CACHE_IN_MEMORY" not in os.environ, "the switch must not outlive the compile"
    assert any("kernel cache unusable (PermissionError" in r.message for r in caplog.records)
    # Later kernels of the process go straight to memory: one compile each, not two.
    _compile._load(_launch.fwd_spec("float16", 128, "causal", True), 90)
    assert compiles == [False, True, True]


def test_in_memory_compile_restores_the_callers_setting_and_reports_real_failures(monkeypatch):
    import os

    from cuflash import _compile

    _fake_cupy_compiles(monkeypatch, fail_in_memory=True)
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "0")
    with pytest.raises(PermissionError):
        _compile._load(_launch.fwd_spec("bfloat16", 128, "none", True), 90)
    assert os.environ["CUPY_CACHE_IN_MEMORY"] == "0"
