"""GPU guard bands: no kernel reads or writes outside the memory of its tensors.

While a test runs, every CuPy allocation (the inputs the test builds, and everything cuflash
allocates for a CuPy caller: results, lse, the backward's delta and dq accumulator, copies,
float64 scratch) comes from an allocator that surrounds it with bands of 0xFF bytes. Read as any
float dtype those bytes are NaN, so a kernel that reads past a tensor puts NaN into results the
accuracy rule then rejects; a kernel that writes past one changes a band, which the check after
each call finds. Every kernel family and dispatch branch runs: Hopper and (forced) sm80 for
fp16, SIMT for fp32/fp64, forward and both backward modes, with windows, odd head dims, ragged
tails, GQA and strided views drawn by Hypothesis.

Skipped, with the reason printed, where no CUDA GPU is usable.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gpu_support import require_gpu

require_gpu()

import cupy  # noqa: E402

from cuflash.cuda import _replay  # noqa: E402
from tests.strategies import examples, problems, seeds  # noqa: E402
from tests.test_gpu_backward import _check_case as check_backward  # noqa: E402
from tests.test_gpu_forward import _check_case as check_forward  # noqa: E402

pytestmark = pytest.mark.gpu

BAND = 64 * 1024  # bytes before and after each allocation (a multiple of 256: alignment kept)
CANARY = 0xFF


class GuardedAllocator:
    """A CuPy allocator whose every allocation sits between two bands of CANARY bytes."""

    def __init__(self):
        self.live: list[tuple[cupy.cuda.Memory, int]] = []

    def __call__(self, nbytes: int) -> cupy.cuda.MemoryPointer:
        memory = cupy.cuda.Memory(nbytes + 2 * BAND)
        cupy.cuda.runtime.memset(memory.ptr, CANARY, nbytes + 2 * BAND)
        self.live.append((memory, nbytes))
        return cupy.cuda.MemoryPointer(memory, BAND)

    def damaged(self) -> list[str]:
        """The bands that no longer hold CANARY, described."""
        cupy.cuda.Device().synchronize()
        found = []
        # On the host: a comparison on the device would allocate through this very allocator.
        for memory, nbytes in list(self.live):
            raw = cupy.ndarray((nbytes + 2 * BAND,), cupy.uint8, cupy.cuda.MemoryPointer(memory, 0))
            for name, band in (("before", raw[:BAND]), ("after", raw[BAND + nbytes:])):
                bad = np.flatnonzero(band.get() != CANARY)
                if bad.size:
                    found.append(f"{int(bad.size)} bytes {name} a {nbytes}-byte allocation "
                                 f"(first at offset {int(bad[0])} of the band)")
        return found


@contextlib.contextmanager
def guarded():
    allocator = GuardedAllocator()
    previous = cupy.cuda.get_allocator()
    cupy.cuda.set_allocator(allocator)
    _replay.clear()  # plans made under the pool would reuse nothing, but start clean
    try:
        yield allocator
    finally:
        cupy.cuda.Device().synchronize()
        cupy.cuda.set_allocator(previous)
        _replay.clear()


def _check(case, seed: int, deterministic: bool) -> None:
    """The forward and backward GPU suites' own checks of `case`, every allocation guarded."""
    with guarded() as allocator:
        check_forward(case, seed)
        check_backward(case, seed, deterministic=deterministic)
        damaged = allocator.damaged()
    assert not damaged, f"{case.id}: written outside a tensor: {damaged}"


def test_the_allocator_sees_a_write_past_the_end():
    """The harness itself: a one-element overrun is reported."""
    with guarded() as allocator:
        x = cupy.zeros(1000, dtype=cupy.float16)
        assert not allocator.damaged()
        past = cupy.ndarray((1,), cupy.float16, cupy.cuda.MemoryPointer(x.data.mem, BAND + 2000))
        past[...] = 1
        assert allocator.damaged()


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@settings(max_examples=examples(40), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), seed=seeds(), deterministic=st.booleans())
def test_no_kernel_touches_memory_outside_its_tensors(dtype, kernel_path, data, seed,
                                                      deterministic):
    if kernel_path == "sm80" and dtype != "float16":
        pytest.skip("fp32/fp64 have one kernel family")
    case = data.draw(problems(dtypes=(dtype,), max_seqlen=300, windows=True))
    _check(case, seed, deterministic)
