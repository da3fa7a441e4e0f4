"""Every kernel instantiation the dispatcher can choose compiles clean with NVRTC.

For sm_80 and sm_90a: no spills, no stack frame, at most 255 registers. Runs on the CPU (NVRTC
and ptxas need no GPU). ``pytest -s`` prints ptxas's registers and shared memory per kernel.

The selected cases are compiled once, in parallel on every core, by a module fixture (a few
minutes on 2 cores); each test then checks its own report.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor

import pytest

from cuflash import _compile, _launch, _launch_bwd
from cuflash._spec import KernelSpec

ARCHS = ("sm_80", "sm_90a")
SIMT_DTYPES = ("float32", "float64")
SPECS = _launch.all_fwd_specs() + _launch_bwd.all_bwd_specs()
CASES = [(arch, spec) for spec in SPECS for arch in ARCHS]
MAX_REGISTERS = 255


@pytest.fixture(scope="module")
def reports(request) -> dict[tuple[str, KernelSpec], Future]:
    """ptxas reports of the cases selected in this session, keyed by (arch, spec)."""
    selected = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.module is request.module and callspec is not None and "case" in callspec.params:
            selected.append(callspec.params["case"])
    # spawn, not fork: no CUDA state may leak into the workers on a machine that has a GPU.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(os.cpu_count(), mp_context=context) as pool:
        futures = {
            (arch, spec): pool.submit(_compile.compile_report, spec, arch)
            for arch, spec in selected
        }
    return futures


@pytest.mark.parametrize("case", CASES, ids=[f"{arch}-{spec.name}" for arch, spec in CASES])
def test_compiles_without_spills(case, reports):
    report = reports[case].result()
    print(report.line())
    assert report.clean, f"spills or stack frame:\n{report.log}"
    assert report.registers <= MAX_REGISTERS


def test_every_simt_dtype_and_width_is_covered():
    widths = {(s.dtype, s.entry, s.head_dim) for s in SPECS}
    for dtype in SIMT_DTYPES:
        for width in _launch.FWD_SIMT_TILES[dtype]:
            assert (dtype, "fwd_simt", width) in widths
        for width in _launch_bwd.BWD_SIMT_TILES[dtype]:
            for entry in ("bwd_preprocess", "bwd_dkdv_simt", "bwd_dq_simt", "bwd_convert_dq"):
                assert (dtype, entry, width) in widths


def test_every_tensor_core_width_is_covered():
    forward = {(s.dtype, s.head_dim, s.causal, s.aligned) for s in SPECS if s.entry == "fwd_sm80"}
    for dtype in ("float16", "bfloat16"):
        for width in _launch.FWD_SM80_TILES:
            for causal in (False, True):
                for aligned in (False, True):
                    assert (dtype, width, causal, aligned) in forward
