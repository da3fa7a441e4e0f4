"""GPU: CuPy's kernel cache under faults, with the real NVRTC compile: a corrupted or truncated
cached binary, two processes compiling the same kernel at once, a process killed mid-compile.
Each time the result must be right, the DEBUG log (CUFLASH_VERBOSE) must say what happened, and
the cache must be left healed, not poisoned.

Every run is a fresh child process with its own CUPY_CACHE_DIR, so that no in-process cache of
CuPy or cuflash hides the disk. Skipped, with the reason printed, where no CUDA GPU is usable.
The unwritable (read-only, full) cache is tests/test_kernel_cache.py's, on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gpu_support import require_gpu

require_gpu()

from cupy.cuda import compiler  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.slow]  # fresh interpreters, cold compiles

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds per child: a cold compile takes a few

# One small forward (fp16, causal), checked against the float64 reference by the accuracy rule.
# With CHILD_WAIT set it prints "ready" once CUDA is up and waits for a line on stdin before the
# call, so that a parent can start two compiles together or kill one mid-compile.
CHILD = """
import os, sys
import numpy as np
import cupy
import cuflash
from cuflash import reference
from cuflash._accuracy import compare, naive_attention

rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 64, 2, 64)).astype(np.float16) for _ in range(3))
dq, dk, dv = (cupy.asarray(x) for x in (q, k, v))
cupy.cuda.Device().synchronize()
if os.environ.get("CHILD_WAIT"):
    print("ready", flush=True)
    sys.stdin.readline()
out = cuflash.attention(dq, dk, dv, causal=True)
ref = reference.attention(q, k, v, causal=True)
naive, _ = naive_attention(q, k, v, dtype="float16", causal=True, scale=64 ** -0.5)
result = compare("out", cupy.asnumpy(out), ref, naive, dtype="float16")
print("OK" if result.ok else "WRONG " + result.failure, flush=True)
sys.exit(0 if result.ok else 1)
"""

COMPILED = "compiled (no valid binary in the disk cache"
LOADED = "loaded from the disk cache"
# CuPy before 14 never reads back a module built with name expressions (as cuflash's are): it
# compiles and rewrites the binary in every process. There a healed cache still compiles.
AGAIN = LOADED if hasattr(compiler, "_cache_payload_magic") else COMPILED
STRAY = "tmpk1lled0"  # a killed CuPy writer's NamedTemporaryFile


def _start(cache_dir: Path, wait: bool = False) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUPY_CACHE")}
    env.update(CUPY_CACHE_DIR=str(cache_dir), CUFLASH_VERBOSE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    if wait:
        env["CHILD_WAIT"] = "1"
    return subprocess.Popen([sys.executable, "-c", CHILD], env=env, cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _ready(child: subprocess.Popen) -> None:
    """Wait for the child's "ready" (CUDA up, nothing compiled yet)."""
    lines = []
    while (line := child.stdout.readline()) and line.strip() != "ready":
        lines.append(line)
    assert line, f"child ended before it was ready:\n{''.join(lines)}"


def _go(child: subprocess.Popen) -> None:
    child.stdin.write("go\n")
    child.stdin.flush()


def _finish(child: subprocess.Popen) -> str:
    """The child's output; asserts that it computed a correct result."""
    output, _ = child.communicate(timeout=TIMEOUT)
    assert child.returncode == 0 and "\nOK\n" in f"\n{output}", output
    return output


def _run(cache_dir: Path) -> str:
    return _finish(_start(cache_dir))


def _expect(output: str, *what: str) -> None:
    """Every kernel load the child logged says one of `what`."""
    loads = [line for line in output.splitlines()
             if line.startswith("cuflash: ") and " for cc " in line]
    assert loads, f"no kernel load logged:\n{output}"
    for line in loads:
        assert any(w in line for w in what), f"expected {what}:\n{output}"


@pytest.fixture(scope="module")
def binaries(tmp_path_factory) -> dict[str, bytes]:
    """{name: bytes} of the cache files one cold run writes (cuflash's kernels and CuPy's own)."""
    cache_dir = tmp_path_factory.mktemp("cache")
    _expect(_run(cache_dir), COMPILED)
    found = {p.name: p.read_bytes() for p in cache_dir.iterdir() if p.name.endswith(".cubin")}
    assert found, "the cold run cached nothing"
    return found


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_corrupted_binary_is_recompiled_and_the_cache_healed(tmp_path, binaries, damage):
    for name, data in binaries.items():
        mid = len(data) // 2
        if damage == "flipped":
            data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]
        else:
            data = data[:mid]
        (tmp_path / name).write_bytes(data)
    _expect(_run(tmp_path), COMPILED)  # CuPy's hash check fails: compiled, file rewritten
    _expect(_run(tmp_path), AGAIN)  # healed, not poisoned


def test_two_processes_compiling_one_kernel_at_once(tmp_path):
    children = [_start(tmp_path, wait=True) for _ in range(2)]
    for child in children:
        _ready(child)
    for child in children:  # both look the kernel up in the empty cache at about the same time
        _go(child)
    for child in children:
        _expect(_finish(child), COMPILED, LOADED)
    # Each writer renamed its whole file into place: no temporary file is left, and the binary
    # that won is whole.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".cubin")) == []
    _expect(_run(tmp_path), AGAIN)


def test_a_process_killed_mid_compile(tmp_path, binaries):
    child = _start(tmp_path, wait=True)
    _ready(child)
    _go(child)
    time.sleep(0.5)  # NVRTC takes seconds here: the kill most likely lands mid-compile
    child.kill()
    output, _ = child.communicate(timeout=TIMEOUT)
    cached = sorted(p.name for p in tmp_path.iterdir())
    print(f"killed child: exit {child.returncode}, cache {cached}, output:\n{output}")
    # Whenever the kill landed (before, during or after the write), make the worst a killed writer
    # could leave certain: a stray partial temporary file, and a truncated binary at each real
    # path (CuPy's rename rules that out; a crash of the machine need not).
    truncated = {name: data[:len(data) // 2] for name, data in binaries.items()}
    for name, data in truncated.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / STRAY).write_bytes(next(iter(truncated.values())))
    _expect(_run(tmp_path), COMPILED)
    for name, data in truncated.items():
        assert (tmp_path / name).read_bytes() != data, f"{name} was not rewritten"
    assert (tmp_path / STRAY).exists()  # harmless: CuPy never reads it
