"""``python -m cuflash``: info and check run on a machine without a GPU, and check fails loudly.

The broken runs break cuflash itself (a kernel that writes nothing, one that is slightly wrong)
and leave the checker alone, so they show that ``check`` would catch such a bug.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from cuflash import __main__ as cli
from cuflash import _core, _cpu
from tests.gpu_support import gpu_skip_reason

ROOT = Path(__file__).resolve().parent.parent
CPU_DTYPES = ("float16", "float32", "float64")


def run_cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m cuflash ARGS`` (or ``python -c CODE``) in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "cuflash", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300, check=False)


def table_rows(stdout: str) -> list[list[str]]:
    """The data rows of check's table (header, rule, rows, blank line), split into cells."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("case "))
    end = lines.index("", start)
    rows = [line.split() for line in lines[start + 2:end]]
    assert rows and all(len(cells) == 9 for cells in rows), lines[start:end]
    return rows


@pytest.mark.slow
def test_info_runs_without_a_gpu():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    for key in ("cuflash", "numpy", "cupy", "torch", "jax", "NVRTC", "GPU", "kernel sources",
                "kernel cache", "CUFLASH_VERBOSE", "CUFLASH_LINEINFO", "CUFLASH_DEBUG"):
        assert any(line.startswith(key) for line in result.stdout.splitlines()), key
    assert str(ROOT / "kernels_cu") in result.stdout


@pytest.mark.slow
def test_check_on_the_cpu_passes_for_every_dtype():
    result = run_cli("check", "--device", "cpu", "--seed", "1234")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    assert {r[2] for r in rows} == set(CPU_DTYPES)
    assert {r[1] for r in rows} == {"fwd", "bwd"}
    assert all(r[3] == "cpu" and r[-2] == "ok" for r in rows), result.stdout
    assert len(rows) == (2 * len(cli.CASES) + len(cli.DECODE_CASES)) * len(CPU_DTYPES)
    assert sum(r[0].startswith("kvcache-") for r in rows) == len(cli.DECODE_CASES) * len(
        CPU_DTYPES)
    assert "seed 1234" in result.stdout
    assert f"{len(rows)} passed, 0 failed, 0 skipped" in result.stdout


@pytest.mark.slow
def test_check_exits_nonzero_when_cuflash_is_wrong():
    # A forward that is 1% off in the softmax scale: small, but far outside the rule.
    code = textwrap.dedent("""
        import sys
        from cuflash import _cpu, __main__ as cli
        real = _cpu.forward
        _cpu.forward = lambda q, k, v, *, scale, **options: real(q, k, v, scale=scale * 1.01,
                                                                 **options)
        sys.exit(cli.main(["check", "--device", "cpu", "--seed", "7"]))
    """)
    result = run_cli(code=code)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL fwd" in result.stdout and "exceeds the allowed" in result.stdout


def test_unwritten_output_fails(monkeypatch, capsys):
    # Writes nothing, and nothing to replay.
    monkeypatch.setattr(_core, "forward_into", lambda *args, **kwargs: (False, None))
    assert cli.main(["check", "--device", "cpu", "--seed", "1"]) == 1
    stdout = capsys.readouterr().out
    assert "never written (still NaN poison)" in stdout
    # Sk == 0 outputs zeros, so a do-nothing kernel is caught there too (NaN is not 0).
    assert all(r[-2] == "FAIL" for r in table_rows(stdout) if r[1] == "fwd")


def test_wrong_gradient_fails(monkeypatch, capsys):
    real = _cpu.backward

    def wrong(*args, **kwargs):
        dq, dk, dv = real(*args, **kwargs)
        return dq, dk, dv * np.asarray(1.001, dv.dtype)

    monkeypatch.setattr(_cpu, "backward", wrong)
    assert cli.main(["check", "--device", "cpu", "--seed", "2"]) == 1
    stdout = capsys.readouterr().out
    failed = [r for r in table_rows(stdout) if r[-2] == "FAIL"]
    assert failed and all(r[1] == "bwd" and r[4] == "dv" for r in failed), stdout
    assert "FAIL bwd" in stdout


def test_modified_input_fails(monkeypatch, capsys):
    real = _cpu.forward

    def scribbling(q, k, v, **kwargs):
        result = real(q, k, v, **kwargs)
        v[...] = 0  # v is a view of the caller's array: this writes into the caller's input
        return result

    monkeypatch.setattr(_cpu, "forward", scribbling)
    assert cli.main(["check", "--device", "cpu", "--seed", "3"]) == 1
    assert "input v was modified" in capsys.readouterr().out


def test_no_driver_is_said_plainly_before_the_detail(monkeypatch, capsys):
    detail = ("CUDARuntimeError: cudaErrorInsufficientDriver: CUDA driver version is "
              "insufficient for CUDA runtime version")
    monkeypatch.setattr(cli, "_gpus", lambda: ([], detail))
    monkeypatch.setattr(cli, "CASES", cli.CASES[-3:-2])  # one small case is enough
    assert cli.check(seed=1) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("No usable CUDA GPU or driver was found, so the CPU path is checked")
    assert first.index("CPU path") < first.index(detail)


def test_forcing_cuda_without_a_gpu_is_an_error(capsys):
    if gpu_skip_reason() is None:
        pytest.skip("a CUDA GPU is present")
    assert cli.main(["check", "--device", "cuda"]) == 2
    assert "no usable CUDA GPU" in capsys.readouterr().err


def test_bench_gets_the_remaining_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("cuflash.bench")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "cuflash.bench", fake)
    monkeypatch.setattr("cuflash.bench", fake, raising=False)
    assert cli.main(["bench", "--help", "-x", "3"]) == 7
    assert seen == [["--help", "-x", "3"]]


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "{info,check,bench}" in capsys.readouterr().out
