"""Every Hopper backward instantiation (kernels_cu/bwd_sm90.cu) compiles clean for sm_90a.

No spills, no stack frame, no ptxas warning (setmaxnreg moves registers from the producer
warpgroup to the consumers, so ptxas reports the entry cap of 168 that `__launch_bounds__(384, 1)`
sets), shared memory within an H100 block's limit. Runs on the CPU. ``pytest -s`` prints the
reports.
"""

from __future__ import annotations

import pytest

from cuflash import _compile, _launch_bwd

SPECS = _launch_bwd.all_bwd_sm90_specs()
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on an H100


@pytest.mark.parametrize("spec", SPECS, ids=[spec.name for spec in SPECS])
def test_compiles_without_spills(spec):
    report = _compile.compile_report(spec, "sm_90a")
    print(report.line())
    assert report.clean, f"spills or stack frame:\n{report.log}"
    assert report.registers <= 255
    assert report.smem_bytes == spec.smem_bytes <= SMEM_LIMIT
    assert "warning" not in report.log.lower(), report.log


def test_every_width_and_dtype_is_covered():
    assert {(s.dtype, s.head_dim, s.causal) for s in SPECS} == {
        (dtype, width, causal)
        for dtype in ("float16", "bfloat16")
        for width in _launch_bwd.BWD_SM90_TILES
        for causal in (False, True)
    }


def test_head_dims_round_up_to_a_compiled_width():
    spec = _launch_bwd.dkdv_sm90_spec("float16", 72, False)
    assert spec.head_dim == 128 and spec.min_arch == 90 and spec.warps == 12
    assert _launch_bwd.dkdv_sm90_spec("bfloat16", 200, True).head_dim == 256
