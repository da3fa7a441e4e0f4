"""The checked build (``CUFLASH_DEBUG=1``, core/check.cuh): its options, that every kernel
source compiles with the checks in (CPU, NVRTC), and on a GPU that a launch which reaches outside
its tensors stops with a message naming the tensor and the source line.

The GPU suites themselves pass in this mode: ``CUFLASH_DEBUG=1 pytest tests/test_gpu_*.py``
(docs/reliability.md has the last run).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cuflash.cuda import _compile, _decode, _launch, _launch_bwd, _launch_sm90
from tests.gpu_support import gpu_skip_reason

REPO = Path(__file__).resolve().parent.parent


def test_debug_switch_sets_the_options(monkeypatch):
    monkeypatch.delenv("CUFLASH_DEBUG", raising=False)
    monkeypatch.delenv("CUFLASH_LINEINFO", raising=False)
    release = _compile.nvrtc_options("sm_90a")
    assert "-DCUFLASH_DEBUG" not in release and "-lineinfo" not in release
    monkeypatch.setenv("CUFLASH_DEBUG", "")
    assert _compile.nvrtc_options("sm_90a") == release
    monkeypatch.setenv("CUFLASH_DEBUG", "1")
    checked = _compile.nvrtc_options("sm_90a")
    assert "-DCUFLASH_DEBUG" in checked and "-lineinfo" in checked
    assert set(release) < set(checked), "the checked build adds options; it changes none"


@pytest.mark.parametrize("source", sorted({s.source for s in _launch.all_fwd_specs()
                                             + _launch_bwd.all_bwd_specs()
                                             + _decode.all_decode_specs()
                                             + _launch_sm90.all_fwd_sm90_specs()}))
def test_expanded_source_names_true_lines(source):
    """Every line NVRTC sees is attributed (#line) to its own file and line: compile errors and
    the checked build's messages point at the real source."""
    text = _compile.expanded_source(source)
    files: dict[str, list[str]] = {}
    where, number, checked = None, 0, 0
    for line in text.split("\n"):
        directive = re.fullmatch(r'#line (\d+) "([^"]+)"', line)
        if directive:
            number, where = int(directive.group(1)), directive.group(2)
            continue
        if where not in files:
            files[where] = (_compile.kernels_dir() / where).read_text().split("\n")
        original = files[where][number - 1]
        if not re.match(r"\s*#\s*(include|pragma once)", original):
            assert line == original, f"{where}:{number}"
            checked += 1
        number += 1
    assert checked > 100


def _one_spec_per_kernel_function():
    specs = (_launch.all_fwd_specs() + _launch_bwd.all_bwd_specs() + _decode.all_decode_specs()
             + _launch_sm90.all_fwd_sm90_specs() + _launch_bwd.all_bwd_sm90_specs())
    chosen = {}
    for spec in specs:
        # One instantiation per (kernel function, alignment): every checked code path.
        function = spec.name.split("<")[0]
        key = (function, spec.name.endswith("true>"))
        chosen.setdefault(key, spec)
    return sorted(chosen.values(), key=lambda s: s.name)


@pytest.mark.slow
@pytest.mark.parametrize("spec", _one_spec_per_kernel_function(), ids=lambda s: s.name)
def test_checked_build_compiles(spec, monkeypatch):
    monkeypatch.setenv("CUFLASH_DEBUG", "1")
    arch = "sm_90a"
    report = _compile.compile_report(spec, arch)
    assert report.registers > 0, report.line()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CUFLASH_NVRTC_FLOOR"),
                    reason="CUFLASH_NVRTC_FLOOR not set: no NVRTC 13.0 to compile with "
                           "(.ci/run unpacks one)")
def test_checked_build_compiles_with_the_oldest_nvrtc(monkeypatch):
    """The GPU machines' CuPy compiles with NVRTC 13.0: the checked build must too."""
    from tests import sass

    monkeypatch.setenv("CUFLASH_DEBUG", "1")
    lib = sass.load_nvrtc(os.environ["CUFLASH_NVRTC_FLOOR"])
    assert sass.nvrtc_version(lib) == "13.0"
    for spec in _one_spec_per_kernel_function():
        report = sass.ptxas_report(spec, "sm_90a", lib=lib)
        assert report.registers > 0, spec.name


_WRONG_LAUNCH = textwrap.dedent("""
    import cupy
    from cuflash.cuda import _compile, _launch
    from cuflash.cuda._kernel_call import KernelCall
    from cuflash._variant import Variant
    from cuflash._core import compute_capability

    shape = (1, 64, 2, 32)
    q, k, v = (cupy.random.standard_normal(shape, dtype=cupy.float32) for _ in range(3))
    out = cupy.full(shape, cupy.nan, dtype=cupy.float32)
    lse = cupy.empty((1, 2, 64), dtype=cupy.float32)
    variant = Variant.of(causal=False)
    call = _launch.plan_forward(q, k, v, out, variant=variant, scale=0.2, device_id=0,
                                cc=compute_capability(0))
    # One batch more than the tensors hold: the blocks of batch 1 address past every tensor.
    grid = (call.grid[0], call.grid[1], call.grid[2] + 1)
    wrong = KernelCall(call.function, 0, grid=grid, threads=call.threads,
                       smem_bytes=call.smem_bytes,
                       params=_launch.fwd_params(q, k, v, out, variant=variant, scale=0.2),
                       pointer_fields=_launch.FWD_POINTERS)
    wrong(_launch.forward_pointers(q, k, v, out, lse), cupy.cuda.get_current_stream().ptr)
    cupy.cuda.runtime.deviceSynchronize()
    print("the wrong launch completed")
""")


@pytest.mark.gpu
@pytest.mark.slow
def test_out_of_bounds_launch_stops_with_a_message(tmp_path):
    reason = gpu_skip_reason()
    if reason is not None:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    env = {**os.environ, "CUFLASH_DEBUG": "1", "PYTHONPATH": str(REPO),
           "CUPY_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _WRONG_LAUNCH], env=env, capture_output=True,
                          text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0, f"the launch should have trapped:\n{output}"
    assert "the wrong launch completed" not in output
    # e.g. "CUFLASH_DEBUG fwd_simt.cu:101 (access at simt_common.cuh:137): block (0, 1, 1)
    # thread 3: 16 bytes at 0x7f.. are outside q [0x7f.., 0x7f..)"
    message = re.compile(r"CUFLASH_DEBUG \w+\.cu:\d+ \(access at \w+\.cuh?:\d+\): "
                         r"block \(\d+, \d+, (\d+)\) thread \d+: \d+ bytes at \S+ are outside "
                         r"(q|k|v|out|lse) \[")
    found = [message.search(line) for line in output.splitlines()]
    found = [m for m in found if m]
    assert found, f"no CUFLASH_DEBUG message in the output:\n{output[-3000:]}"
    assert all(m.group(1) == "1" for m in found), "only batch 1's blocks reach outside"
