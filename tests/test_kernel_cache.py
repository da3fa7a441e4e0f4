"""CuPy's kernel cache under faults, as cuflash meets them, on the CPU (CuPy's compile stood in
for): a cache directory that cannot be written (read-only, full) costs a compile in memory, never
the call; each kernel load says at DEBUG (logger ``cuflash``) whether it was loaded from the disk
cache or compiled, and where. The real compile under a corrupted cached binary, two processes
compiling at once and a process killed mid-compile is tests/test_gpu_kernel_cache.py's."""

from __future__ import annotations

import hashlib
import os
import tempfile
import types

import pytest

from cuflash.cuda import _launch


def _use_cache_dir(monkeypatch, path) -> None:
    """Point CuPy's kernel cache at `path`: CuPy 14's disk backend (made when cupy was imported),
    CuPy 13's CUPY_CACHE_DIR (read at each compile)."""
    from cupy.cuda import compiler

    monkeypatch.setenv("CUPY_CACHE_DIR", str(path))
    backend = getattr(compiler, "_kernel_cache_backend", None)
    if backend is not None:
        monkeypatch.setattr(compiler, "_kernel_cache_backend", type(backend)(str(path)))


def _fake_cupy(monkeypatch, tmp_path, module) -> None:
    import cupy

    from cuflash.cuda import _compile

    _use_cache_dir(monkeypatch, tmp_path)
    monkeypatch.setattr(cupy, "RawModule", module)
    monkeypatch.setattr(cupy.cuda, "Device", lambda *a: types.SimpleNamespace(id=0))
    monkeypatch.setattr(_compile, "smem_limit", lambda device_id: 232448)
    monkeypatch.setattr(_compile, "_disk_cache_failed", False)
    monkeypatch.delenv("CUPY_CACHE_IN_MEMORY", raising=False)


def _fake_cupy_compiles(monkeypatch, tmp_path, fail_in_memory=False):
    """cupy.RawModule stand-in whose disk cache write fails as on a read-only CUPY_CACHE_DIR."""
    compiles = []

    class RawModule:
        def __init__(self, code, options, name_expressions):
            self.in_memory = os.environ.get("CUPY_CACHE_IN_MEMORY") == "1"
            compiles.append(self.in_memory)

        def get_function(self, name):
            if not self.in_memory or fail_in_memory:
                raise PermissionError(13, "Permission denied", "/cache/tmpabc")
            return types.SimpleNamespace(name=name, max_dynamic_shared_size_bytes=0)

    _fake_cupy(monkeypatch, tmp_path, RawModule)
    return compiles


def _fake_cupy_caches(monkeypatch, tmp_path):
    """cupy.RawModule stand-in with CuPy's disk cache: a valid `<hash>.cubin` is loaded and left
    alone; a missing or corrupt one is compiled and written to a temporary file renamed into
    place. Returns the list of what each load did."""
    done = []

    class RawModule:
        def __init__(self, code, options, name_expressions):
            self.key = hashlib.sha1(f"{code}{options}{name_expressions}".encode()).hexdigest()

        def get_function(self, name):
            path = tmp_path / f"{self.key}.cubin"
            if path.is_file() and path.read_bytes() == b"cubin " + name.encode():
                done.append("loaded")
            elif os.environ.get("CUPY_CACHE_IN_MEMORY") == "1":
                done.append("in memory")
            else:
                with tempfile.NamedTemporaryFile(dir=tmp_path, delete=False) as tf:
                    tf.write(b"cubin " + name.encode())
                os.replace(tf.name, path)
                done.append("compiled")
            return types.SimpleNamespace(name=name, max_dynamic_shared_size_bytes=0)

    _fake_cupy(monkeypatch, tmp_path, RawModule)
    return done


def _load_lines(caplog, spec) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(spec.name)]


def test_unwritable_kernel_cache_compiles_in_memory(monkeypatch, caplog, tmp_path):
    from cuflash.cuda import _compile

    compiles = _fake_cupy_compiles(monkeypatch, tmp_path)
    spec = _launch.fwd_spec("float16", 64, "causal", True)
    with caplog.at_level("DEBUG", logger="cuflash"):
        fn = _compile._load(spec, 90)
    assert fn.name == spec.name
    assert compiles == [False, True], "one try through the disk cache, then one in memory"
    assert "CUPY_CACHE_IN_MEMORY" not in os.environ, "the switch must not outlive the compile"
    assert any("kernel cache unusable (PermissionError" in r.message for r in caplog.records)
    assert _load_lines(caplog, spec) == [
        f"{spec.name} for cc 90: compiled in memory, without the disk cache in "
        f"{_compile.compile_seconds[spec.name]:.2f} s"]
    # Later kernels of the process go straight to memory: one compile each, not two.
    _compile._load(_launch.fwd_spec("float16", 128, "causal", True), 90)
    assert compiles == [False, True, True]


def test_in_memory_compile_restores_the_callers_setting_and_reports_real_failures(
        monkeypatch, tmp_path):
    from cuflash.cuda import _compile

    _fake_cupy_compiles(monkeypatch, tmp_path, fail_in_memory=True)
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "0")
    with pytest.raises(PermissionError):
        _compile._load(_launch.fwd_spec("bfloat16", 128, "none", True), 90)
    assert os.environ["CUPY_CACHE_IN_MEMORY"] == "0"


def test_each_load_says_whether_it_compiled_or_read_the_disk_cache(monkeypatch, caplog, tmp_path):
    from cuflash.cuda import _compile

    done = _fake_cupy_caches(monkeypatch, tmp_path)
    spec = _launch.fwd_spec("float16", 64, "causal", True)
    (tmp_path / "tmpk1lled0").write_bytes(b"half a bin")  # a killed writer's: no binary
    compiled = f"compiled (no valid binary in the disk cache {tmp_path}: missing or corrupt"
    with caplog.at_level("DEBUG", logger="cuflash"):
        _compile._load(spec, 90)  # empty cache: compiled, and written
        _compile._load(spec, 90)  # a later process: loaded
        [cubin] = tmp_path.glob("*.cubin")
        cubin.write_bytes(b"cubin garbage")  # corrupt: CuPy compiles and rewrites the same name
        _compile._load(spec, 90)
        _compile._load(spec, 90)  # healed
    assert done == ["compiled", "loaded", "compiled", "loaded"]
    lines = _load_lines(caplog, spec)
    assert len(lines) == 4, caplog.text
    for line, what in zip(lines, done, strict=True):
        assert line.startswith(f"{spec.name} for cc 90: "), line
        expected = compiled if what == "compiled" else f"loaded from the disk cache {tmp_path} in"
        assert expected in line, line
        assert line.endswith(" s"), line


def test_cupy_cache_in_memory_is_reported_as_a_compile(monkeypatch, caplog, tmp_path):
    from cuflash.cuda import _compile

    done = _fake_cupy_caches(monkeypatch, tmp_path)
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    spec = _launch.fwd_spec("float16", 64, "none", True)
    with caplog.at_level("DEBUG", logger="cuflash"):
        _compile._load(spec, 90)
    assert done == ["in memory"]
    assert "compiled in memory, without the disk cache" in _load_lines(caplog, spec)[0]


def test_the_cache_directory_is_not_read_unless_debug_is_on(monkeypatch, caplog, tmp_path):
    import logging

    from cuflash.cuda import _compile

    done = _fake_cupy_caches(monkeypatch, tmp_path)

    def unexpected(*args):
        raise AssertionError("the cache directory was listed with DEBUG off")

    monkeypatch.setattr(_compile, "_cubins", unexpected)
    monkeypatch.setattr(_compile, "_cache_dir", unexpected)
    with caplog.at_level(logging.INFO, logger="cuflash"):
        _compile._load(_launch.fwd_spec("float16", 64, "none", True), 90)
    assert done == ["compiled"]
    assert not caplog.records


def test_cache_dir_is_cupys(monkeypatch, tmp_path):
    from cupy.cuda import compiler

    from cuflash.cuda import _compile

    _use_cache_dir(monkeypatch, tmp_path)
    assert _compile._cache_dir() == str(tmp_path)
    # CuPy 13 has no backend object: it reads CUPY_CACHE_DIR at each compile.
    monkeypatch.delattr(compiler, "_kernel_cache_backend", raising=False)
    assert _compile._cache_dir() == str(tmp_path)
    monkeypatch.delenv("CUPY_CACHE_DIR")
    assert _compile._cache_dir() == os.path.expanduser("~/.cupy/kernel_cache")
    # A custom CuPy 14 backend need not be a directory.
    monkeypatch.setattr(compiler, "_kernel_cache_backend", object(), raising=False)
    assert _compile._cache_dir() is None
