"""Every Hopper instantiation (sm90/fwd_sm90.cu, kernels_cu/sm90/bwd_sm90.cu) compiles clean for
sm_90a.

No spills, no stack frame, at most 255 registers (ptxas reports the entry cap that
`__launch_bounds__(threads, 1)` sets, 168 for 384 threads; setmaxnreg then moves registers from
the producer warpgroup to the consumers), no ptxas warning, wgmma pipelined (no note that ptxas
serialised them or injected a wait: it does so silently, e.g. when accumulators are read or written
while a wgmma may be in flight, or when registers run short for the pipeline), and no
static shared memory beside the dynamic size the launch mirrors, within an H100 block's limit.
Runs on the CPU: NVRTC and ptxas need no GPU. ``pytest -s`` prints the reports. The selected
instantiations are compiled once, in parallel on every core, by a module fixture.
"""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from cuflash import _variant
from cuflash.cuda import _compile, _launch_bwd, _launch_sm90
from cuflash.cuda._spec import KernelSpec
from tests import compile_pool

SPECS = _launch_sm90.all_fwd_sm90_specs()
BWD_SPECS = _launch_bwd.all_bwd_sm90_specs()
MAX_REGISTERS = 255
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on an H100


def _report(spec: KernelSpec):
    return _compile.compile_report(spec, "sm_90a")


@pytest.fixture(scope="module")
def reports(request) -> dict[KernelSpec, Future]:
    """sm_90a ptxas reports of the specs selected in this session."""
    return compile_pool.run(_report, compile_pool.selected(request, "spec"))


@pytest.mark.parametrize("spec", SPECS + BWD_SPECS, ids=[s.name for s in SPECS + BWD_SPECS])
def test_compiles_without_spills(spec, reports):
    report = reports[spec].result()
    print(report.line())
    assert report.clean, f"spills or stack frame:\n{report.log}"
    assert report.registers <= MAX_REGISTERS
    assert report.smem_bytes == spec.smem_bytes <= SMEM_LIMIT
    assert "warning" not in report.log.lower(), report.log  # e.g. setmaxnreg ignored (C7508)
    assert not report.wgmma_serialized, "\n".join(report.notes)


@pytest.mark.parametrize(("specs", "tiles"), [(SPECS, _launch_sm90.FWD_SM90_TILES),
                                               (BWD_SPECS, _launch_bwd.BWD_SM90_TILES)],
                         ids=["forward", "backward"])
def test_every_width_and_dtype_is_covered(specs, tiles):
    assert {(s.dtype, s.head_dim, s.mask) for s in specs} == {
        (dtype, width, mask)
        for dtype in ("float16", "bfloat16")
        for width in tiles
        for mask in _variant.MASK_KINDS
    }


def test_spec_name_renders_the_template_signature():
    spec = _launch_sm90.fwd_sm90_spec("bfloat16", 100, "causal")
    assert spec.head_dim == 128 and spec.min_arch == 90
    assert spec.name == ("cuflash::fwd_sm90<cuflash::bf16, 128, 128, 128, 12, cuflash::CausalMask, "
                         "cuflash::NoScore, true, false>")
    capped = _launch_sm90.fwd_sm90_spec("bfloat16", 64, "window", False, "softcap", True)
    assert capped.name == ("cuflash::fwd_sm90<cuflash::bf16, 64, 128, 128, 12, "
                           "cuflash::WindowMask, cuflash::Softcap, true, true>")  # the short tile


def test_q_is_double_buffered_where_it_fits():
    """Two Q buffers (the persistent kernel's next tile loads during this one) at D 64 and 128;
    at D 256 a second 64 KB buffer would not fit beside the K/V slots."""
    tiles = _launch_sm90.FWD_SM90_TILES
    assert {width: _launch_sm90.q_stages(width, tile) for width, tile in tiles.items()} == {
        64: 2, 128: 2, 256: 1}
    short = _launch_sm90.FWD_SM90_SHORT_TILES
    assert all(_launch_sm90.q_stages(width, tile) == 2 for width, tile in short.items())


def test_o_goes_out_through_shared_memory_where_it_fits():
    """The TMA-store epilogue's O buffer fits at D 64 (both tiles) and 128, within the 227 KB a
    block may have; not at D 256, whose 80-key slots and Q fill it."""
    tiles = {**{(w, t.block_m): t for w, t in _launch_sm90.FWD_SM90_TILES.items()},
             **{(w, t.block_m): t for w, t in _launch_sm90.FWD_SM90_SHORT_TILES.items()}}
    assert {key: _launch_sm90.tma_store(key[0], tile) for key, tile in tiles.items()} == {
        (64, 192): True, (64, 128): True, (128, 128): True, (256, 128): False}
    for (width, _), tile in tiles.items():
        assert _launch_sm90.smem_bytes(width, tile) <= _launch_sm90.SMEM_LIMIT


def test_every_forward_tile_stores_o_through_tma():
    """Every tile writes O with TMA stores and so takes the output's tensor map: D 64 and 128
    from the O buffer, D 256 from the last key tile's K and V slots (two consumers, 80-key
    slots that hold a consumer's 64 rows)."""
    tiles = [*_launch_sm90.FWD_SM90_TILES.items(), *_launch_sm90.FWD_SM90_SHORT_TILES.items()]
    assert all(_launch_sm90.stores_o(width, tile) for width, tile in tiles)
    d256 = _launch_sm90.FWD_SM90_TILES[256]
    assert not _launch_sm90.tma_store(256, d256) and d256.block_n >= 64
    # three consumers (D=64's long tile) stage in the O buffer only
    three = _launch_sm90.Tile(192, 128, 16)
    assert _launch_sm90.stores_o(64, three) == _launch_sm90.tma_store(64, three)
    # a 48-key slot (with Q double-buffered, no O buffer) cannot hold a consumer's 64 rows
    assert not _launch_sm90.stores_o(256, _launch_sm90.Tile(128, 48, 12))


def test_short_problems_take_their_own_tile():
    """D=64: two consumers (128-row tiles) up to 1k queries and, up to 4k, where 192-row tiles
    would pad the queries with more rows; three (192-row tiles) otherwise, causal or not. One
    tile at D=128 and D=256."""
    short = _launch_sm90.takes_short_tile
    measured_two = (512, 1024, 2048, 2560, 2816, 4096)  # kernel notes steps 18 and 22
    measured_three = (1536, 2304, 3072, 3584, 4608, 5120, 6016, 6400, 8192, 16384)
    assert all(short(s, 64) for s in measured_two)
    assert not any(short(s, 64) for s in measured_three)
    assert all(short(s, 64) for s in range(1, 1025))  # the padding rule starts past 1k
    assert [short(s, 48) for s in (2048, 2304)] == [True, False]  # head dims round up to 64
    assert not any(short(s, width) for s in (512, 2048, 8192) for width in (128, 256))
    spec = _launch_sm90.fwd_sm90_spec
    for mask in _variant.MASK_KINDS:
        assert spec("bfloat16", 64, mask, short=False).block_m == 192
        assert spec("bfloat16", 64, mask, short=False).warps == 16
        assert spec("bfloat16", 64, mask, short=True).block_m == 128
        assert spec("bfloat16", 64, mask, short=True).warps == 12
        for width in (128, 256):  # no short tile
            assert spec("bfloat16", width, mask, short=True) == spec("bfloat16", width, mask)
    assert {(s.head_dim, s.block_m, s.mask) for s in SPECS if s.head_dim == 64} == {
        (64, block_m, mask) for block_m in (192, 128) for mask in _variant.MASK_KINDS}
    assert all(spec.smem_bytes <= _launch_sm90.SMEM_LIMIT == SMEM_LIMIT for spec in SPECS)


def test_backward_head_dims_round_up_to_a_compiled_width():
    spec = _launch_bwd.dkdv_sm90_spec("float16", 72, "none")
    assert spec.head_dim == 128 and spec.min_arch == 90 and spec.warps == 12
    assert _launch_bwd.dkdv_sm90_spec("bfloat16", 200, "causal").head_dim == 256


# ptxas's notes (NVRTC 13.x) that mean the wgmma were not pipelined, in the words of their reasons.
SERIALISED_NOTES = {
    "C7511": "wgmma.mma_async instructions are serialized due to insufficient register resources "
             "for the wgmma pipeline",
    "C7514": "wgmma.mma_async instructions are serialized due to non wgmma instructions reading "
             "accumulator registers of a wgmma between start and end of the pipeline stage",
    "C7515": "wgmma.mma_async instructions are serialized due to non wgmma instructions defining "
             "accumulator registers of a wgmma between start and end of the pipeline stage",
    "C7517": "wait_group is injected in around line 7 by compiler to allow use of registers "
             "defined by GMMA",
}


@pytest.mark.parametrize("code", sorted(SERIALISED_NOTES))
def test_serialised_wgmma_is_caught(code):
    """ptxas's notes about a function come before its report block; the report keeps the ones
    naming this kernel, and any note that its wgmma were serialised (or a wait injected) marks
    it, whatever the code."""
    spec = SPECS[0]
    lowered = "_Z6kernelv"
    text = (
        f"ptxas info    : ({code}) Potential Performance Loss: {SERIALISED_NOTES[code]} in the "
        f"function '{lowered}'\n"
        f"ptxas info    : ({code}) Potential Performance Loss: ... in the function '_Z5otherv'\n"
        f"ptxas info    : Compiling entry function '{lowered}' for 'sm_90a'\n"
        "ptxas info    : Used 168 registers, used 16 barriers\n"
    )
    report = _compile._parse_ptxas(spec, "sm_90a", lowered, text, 0.0)
    assert report.wgmma_serialized and len(report.notes) == 1
    clean = text.split("ptxas info    : Compiling")[0].replace(lowered, "_Z5otherv")
    clean += f"ptxas info    : Compiling entry function '{lowered}' for 'sm_90a'\n"
    assert not _compile._parse_ptxas(spec, "sm_90a", lowered, clean, 0.0).wgmma_serialized
