"""Every kernel instantiation the dispatcher can choose compiles clean with NVRTC.

For sm_80 and sm_90a: no spills, no stack frame, at most 255 registers. Runs on the CPU (NVRTC
and ptxas need no GPU). ``pytest -s`` prints ptxas's registers and shared memory per kernel.

The selected cases are compiled once, in parallel on every core, by a module fixture (a few
minutes on 2 cores); each test then checks its own report.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import tempfile
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest

from cuflash import _variant
from cuflash.cuda import _compile, _decode, _launch, _launch_bwd, _launch_sm90
from cuflash.cuda._spec import KernelSpec
from tests import compile_pool

ARCHS = ("sm_80", "sm_90a")
SIMT_DTYPES = ("float32", "float64")
SPECS = _launch.all_fwd_specs() + _launch_bwd.all_bwd_specs() + _decode.all_decode_specs()
CASES = [(arch, spec) for spec in SPECS for arch in ARCHS]
MAX_REGISTERS = 255
# Spills seen once the reports compile with the options the code runs with (check_options: CuPy's
# RawModule adds -ftz=true). These dK/dV tiles sit at 255 registers and spill 4-52 B under it;
# before 2026-11-27 the test compiled without -ftz=true and did not see them (kernel_notes.md,
# "Spills under -ftz=true"). Strict: a fix makes the case XPASS and fail until it leaves this list.
KNOWN_SPILLS = {
    (arch, f"cuflash::bwd_dkdv_sm80<cuflash::{dtype}, {shape}>")
    for dtype in ("f16", "bf16")
    for arch, shape in (("sm_90a", "128, 64, 128, 8, cuflash::NoMask, cuflash::NoScore, true"),
                        ("sm_90a", "256, 64, 64, 8, cuflash::NoMask, cuflash::NoScore, true"),
                        ("sm_80", "256, 64, 64, 8, cuflash::CausalMask, cuflash::NoScore, true"),
                        ("sm_90a", "256, 64, 64, 8, cuflash::CausalMask, cuflash::NoScore, true"),
                        # The window's left edge is one more live value in a kernel at 255
                        # registers; on H100 it runs only where TMA cannot (bwd_dkdv_sm90 else).
                        ("sm_90a", "256, 64, 64, 8, cuflash::WindowMask, cuflash::NoScore, true"),
                        ("sm_90a", "256, 64, 64, 8, cuflash::WindowMask, cuflash::NoScore, false"),
                        # The run-time modifications' index arithmetic (score.cuh's Mods) in the
                        # unaligned causal D 128 tile: 4 B at 255 registers (the aligned one
                        # takes 248; on H100 aligned inputs take bwd_dkdv_sm90).
                        ("sm_90a", "128, 64, 128, 8, cuflash::CausalMask, cuflash::Mods, false"))
}


# The oldest NVRTC the cuda13 extra meets: 13.0, what the GPU machine's CuPy compiles with. A kernel
# that the wheel's newer NVRTC compiles may crash 13.0 (a segmentation fault, kernel_notes_sm90.md
# step 28), so the kernels are compiled with it too, where CUFLASH_NVRTC_FLOOR names the lib/
# directory of an unpacked nvidia-cuda-nvrtc 13.0 wheel (.ci/run sets it up).
FLOOR_ENV = "CUFLASH_NVRTC_FLOOR"
FLOOR_VERSION = "13.0"
HOPPER_SPECS = _launch_sm90.all_fwd_sm90_specs() + _launch_bwd.all_bwd_sm90_specs()
# What it compiles. The GPU machine (an H100) runs every kernel as 13.0 compiles it for sm_90a, the
# sm80 and SIMT kernels too: every spec, Hopper or not, is compiled for sm_90a. For sm_80 (an A100
# whose CuPy has 13.0) NVRTC's front end reads the same program as for sm_90a but for the
# backward's `__CUDA_ARCH__ >= 900` vector reductions (bwd_sm80.cu's atomic_add_pair,
# bwd_simt.cu's atomic_add_row), so the sm_90a compiles cover it; what sm_80 adds is 13.0's code
# generation for that target, compiled for a subset that holds every kernel's device code:
# - every NoScore spec (the default path: every width, tile, mask and alignment);
# - each score kind of FLOOR_SM80_ONCE once per kernel function, dtype, mask and alignment, at
#   the widest head dim (the most code to allocate);
# - the kinds of FLOOR_SM80_STAND_INS not at all: their code is the stand-in kind's (score.cuh).
#   Alibi's Score is Mods's ALiBi term alone (the slope read in for_head, decay *
#   diagonal.distance subtracted, slope 1) without Mods's run-time bias and mask branches, and
#   the kernels' switches on the kind (kModifies, kPositional, kHides, kAdditive) take for Alibi
#   the arms Mods or NoScore take. Softcap has no stand-in: its tanh_for (tanh.approx.f32 for
#   16-bit inputs, libdevice's tanhf and tanh for fp32 and fp64) and tanh_slope are in no other
#   kind.
FLOOR_SM80_ONCE = ("softcap", "mods")
FLOOR_SM80_STAND_INS = {"alibi": "mods"}


def _floor_sm80_specs(specs: list[KernelSpec]) -> list[KernelSpec]:
    """The specs of `specs` that the floor also compiles for sm_80 (above), in their order."""
    chosen: dict = {}
    for spec in specs:
        if spec.score == "none":
            chosen[spec] = spec
        elif spec.score in FLOOR_SM80_ONCE:
            key = (spec.entry, spec.dtype, spec.mask, spec.score, spec.aligned)
            if key not in chosen or spec.head_dim > chosen[key].head_dim:
                chosen[key] = spec
    kept = set(chosen.values())
    return [spec for spec in specs if spec in kept]


FLOOR_SM80_SPECS = _floor_sm80_specs(SPECS)
FLOOR_CASES = ([("sm_90a", spec) for spec in SPECS + HOPPER_SPECS]
               + [("sm_80", spec) for spec in FLOOR_SM80_SPECS])
# The Hopper kernels run on the GPU machine as NVRTC 13.0 compiles them, and there some of the
# dK/dV kernels spill 4-16 B that 13.5 keeps in registers, all in the producer warpgroup's
# lse/delta warp (kernel_notes_bwd_sm90.md: removing them reordered the consumers). Exact: a
# fix, or a new spill, fails the test until this set is brought up to date.
FLOOR_HOPPER_SPILLS = {
    f"cuflash::bwd_dkdv_sm90<cuflash::{dtype}, {shape}, cuflash::{score}, true>"
    for dtype in ("f16", "bf16")
    for shape, score in (("64, 128, 128, 12, cuflash::NoMask", "NoScore"),
                         ("64, 128, 128, 12, cuflash::CausalMask", "NoScore"),
                         ("64, 128, 128, 12, cuflash::WindowMask", "NoScore"),
                         ("256, 64, 64, 12, cuflash::NoMask", "NoScore"),
                         # D 64 ALiBi (8-16 B under 13.0, none under 13.5): as 13.0 compiles it,
                         # 1.35-1.7x the sm80 kernels it replaced on the H100 (2026-12-07)
                         ("64, 128, 128, 12, cuflash::NoMask", "Alibi"),
                         ("64, 128, 128, 12, cuflash::CausalMask", "Alibi"),
                         ("64, 128, 128, 12, cuflash::WindowMask", "Alibi"))
}


def _report(case: tuple[str, KernelSpec]):
    arch, spec = case
    return _compile.compile_report(spec, arch)


@pytest.fixture(scope="module")
def reports(request) -> dict[tuple[str, KernelSpec], Future]:
    """ptxas reports of the cases selected in this session, keyed by (arch, spec)."""
    return compile_pool.run(_report, compile_pool.selected(request, "case"))


@pytest.mark.parametrize("case", [
    pytest.param((arch, spec), id=f"{arch}-{spec.name}", marks=[pytest.mark.xfail(
        strict=True, reason="spills under -ftz=true (KNOWN_SPILLS)")] if (
            arch, spec.name) in KNOWN_SPILLS else [])
    for arch, spec in CASES])
def test_compiles_without_spills(case, reports):
    report = reports[case].result()
    print(report.line())
    assert report.clean, f"spills or stack frame:\n{report.log}"
    assert report.registers <= MAX_REGISTERS


def test_known_spills_name_real_cases():
    names = {(arch, spec.name) for arch, spec in CASES}
    assert KNOWN_SPILLS <= names, KNOWN_SPILLS - names


def test_every_simt_dtype_and_width_is_covered():
    widths = {(s.dtype, s.entry, s.head_dim) for s in SPECS}
    for dtype in SIMT_DTYPES:
        for width in _launch.FWD_SIMT_TILES[dtype]:
            assert (dtype, "fwd_simt", width) in widths
        for width in _launch_bwd.BWD_SIMT_TILES[dtype]:
            for entry in ("bwd_preprocess", "bwd_dkdv_simt", "bwd_dq_simt", "bwd_convert_dq"):
                assert (dtype, entry, width) in widths


def test_every_tensor_core_width_is_covered():
    forward = {(s.dtype, s.head_dim, s.mask, s.aligned) for s in SPECS if s.entry == "fwd_sm80"}
    for dtype in ("float16", "bfloat16"):
        for width in _launch.FWD_SM80_TILES:
            for mask in _variant.MASK_KINDS:
                for aligned in (False, True):
                    assert (dtype, width, mask, aligned) in forward


def _assert_compiles(source: str, name: str) -> None:
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(_compile.check_options("sm_80")))
        except nvrtc.NVRTCError:
            pytest.fail(f"{name}:\n{nvrtc.getProgramLog(prog)}")
    finally:
        nvrtc.destroyProgram(prog)


def test_sm80_backward_shared_memory_mirrors_the_traits():
    """_launch_bwd's shared-memory formula equals the C++ traits' kSmemBytes for every sm80
    backward tile, the small-shared-memory ones included (the sm80 kernels do not check the
    launch's dynamic size themselves)."""
    tables = [(_launch_bwd.BWD_SM80_DKDV_TILES, _launch_bwd.BWD_SM80_DQ_TILES),
              (_launch_bwd.BWD_SM80_SMALL_DKDV_TILES, _launch_bwd.BWD_SM80_SMALL_DQ_TILES)]
    asserts = []
    for dkdv_tiles, dq_tiles in tables:
        for width, dkdv in dkdv_tiles.items():
            dq = dq_tiles[width]
            smem_dkdv, smem_dq = _launch_bwd._sm80_smem(width, dkdv, dq)
            asserts.append(
                f"static_assert(cuflash::BwdDkdvSm80Traits<{width}, {dkdv.block_m}, "
                f"{dkdv.block_n}, {dkdv.warps}>::kSmemBytes == {smem_dkdv}, \"dkdv {width}\");")
            asserts.append(
                f"static_assert(cuflash::BwdDqSm80Traits<{width}, {dq.block_m}, {dq.block_n}, "
                f"{dq.warps}>::kSmemBytes == {smem_dq}, \"dq {width}\");")
    source = _compile.expanded_source("sm80/bwd_sm80.cu") + "\n" + "\n".join(asserts) + "\n"
    _assert_compiles(source, "smem_mirror.cu")


def test_small_shared_memory_tables_fit_99_kb():
    """On cc 8.6 / 8.9 / 12.0 (101376 bytes per block) the fp16/bf16 backward takes the small
    tiles up to head dim 128, and every kernel of them fits; D=256 keeps tiles that do not."""
    limit = 99 * 1024
    for width in (64, 128):
        kernels = _launch_bwd.bwd_kernels("bfloat16", width, "causal", True, smem_limit=limit)
        assert kernels.dkdv.smem_bytes <= limit and kernels.dq.smem_bytes <= limit
        assert kernels.width == width
    regular = _launch_bwd.bwd_kernels("bfloat16", 128, "causal", True, smem_limit=227 * 1024)
    assert regular.dkdv.block_n == _launch_bwd.BWD_SM80_DKDV_TILES[128].block_n
    wide = _launch_bwd.bwd_kernels("bfloat16", 256, "causal", True, smem_limit=limit)
    assert wide.dkdv.smem_bytes > limit  # refused by _compile with a clear error at first use


def test_floor_compiles_every_kernel_for_sm90a_and_all_device_code_for_sm80():
    """FLOOR_CASES: every spec, Hopper or not, for sm_90a, once; for sm_80 every NoScore spec and
    each kind of FLOOR_SM80_ONCE in every kernel function, dtype, mask and alignment it has; every
    other score kind has its stand-in among those (a new kind must be placed)."""
    assert len(set(FLOOR_CASES)) == len(FLOOR_CASES)
    assert {spec for arch, spec in FLOOR_CASES if arch == "sm_90a"} == set(SPECS + HOPPER_SPECS)
    assert {arch for arch, _ in FLOOR_CASES} == {"sm_80", "sm_90a"}
    assert set(_variant.SCORE_KINDS) == {"none", *FLOOR_SM80_ONCE, *FLOOR_SM80_STAND_INS}
    assert set(FLOOR_SM80_STAND_INS.values()) <= {"none", *FLOOR_SM80_ONCE}
    sm80 = {spec for arch, spec in FLOOR_CASES if arch == "sm_80"}
    assert {s for s in SPECS if s.score == "none"} <= sm80

    def groups(specs):
        return {(s.entry, s.dtype, s.mask, s.score, s.aligned) for s in specs
                if s.score in FLOOR_SM80_ONCE}

    assert groups(sm80) == groups(SPECS)
    assert len(sm80) == len({s for s in SPECS if s.score == "none"}) + len(groups(SPECS))


_floor_lib = None


def _floor_compile(lib_dir: str, log_dir: str, arch: str, spec: KernelSpec):
    """In a worker: `spec` compiled for `arch` by the NVRTC in `lib_dir`: its CompileReport, or
    why there is none. Each compile is bracketed in the worker's log, so that a case that crashes
    the compiler (and the worker with it) can be named afterwards."""
    global _floor_lib
    from tests import sass

    if _floor_lib is None:
        _floor_lib = sass.load_nvrtc(lib_dir)
    version = sass.nvrtc_version(_floor_lib)
    if version != FLOOR_VERSION:
        return f"{lib_dir} holds NVRTC {version}, not {FLOOR_VERSION}"
    with open(os.path.join(log_dir, f"{os.getpid()}.log"), "a") as log:
        log.write(f"start {arch} {spec.name}\n")
        log.flush()
        try:
            return sass.ptxas_report(spec, arch, lib=_floor_lib)
        except RuntimeError as err:
            return str(err)
        finally:
            log.write("done\n")


@pytest.mark.skipif(not os.environ.get(FLOOR_ENV),
                    reason=f"{FLOOR_ENV} not set: no NVRTC {FLOOR_VERSION} to compile with "
                           "(.ci/run unpacks one)")
def test_every_case_compiles_with_the_oldest_nvrtc():
    """FLOOR_CASES compile with NVRTC 13.0: no crash, no compile error; the Hopper kernels
    without serialised wgmma and spilling exactly where FLOOR_HOPPER_SPILLS says."""
    lib_dir = os.environ[FLOOR_ENV]
    context = multiprocessing.get_context("spawn")
    hopper = set(HOPPER_SPECS)
    failures, hopper_spills = [], set()
    with tempfile.TemporaryDirectory() as log_dir:
        try:
            with ProcessPoolExecutor(os.cpu_count(), mp_context=context) as pool:
                futures = [((arch, spec), pool.submit(_floor_compile, lib_dir, log_dir, arch, spec))
                           for arch, spec in FLOOR_CASES]
                for (arch, spec), future in futures:
                    report = future.result()
                    if isinstance(report, str):
                        failures.append(f"{arch} {spec.name}: {report}")
                    elif spec in hopper:
                        if not report.clean:
                            hopper_spills.add(spec.name)
                        if report.wgmma_serialized:
                            failures.append(f"{spec.name}: wgmma serialised\n" +
                                            "\n".join(report.notes))
        except BrokenProcessPool:
            in_flight = []
            for path in glob.glob(os.path.join(log_dir, "*.log")):
                with open(path) as log:
                    lines = log.read().splitlines()
                if lines and lines[-1].startswith("start "):
                    in_flight.append(lines[-1].removeprefix("start "))
            failures.append("a compiler process died (NVRTC crashed) while compiling one of: " +
                            "; ".join(sorted(in_flight)))
    print(f"NVRTC {FLOOR_VERSION}: {len(FLOOR_CASES)} cases ({len(SPECS + HOPPER_SPECS)} sm_90a, "
          f"{len(FLOOR_SM80_SPECS)} sm_80)")
    assert not failures, "\n".join(failures[:20])
    assert hopper_spills == FLOOR_HOPPER_SPILLS, (
        f"Hopper kernels spilling under NVRTC {FLOOR_VERSION}: new "
        f"{sorted(hopper_spills - FLOOR_HOPPER_SPILLS)}, no longer "
        f"{sorted(FLOOR_HOPPER_SPILLS - hopper_spills)}")
