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

from tests.gpu_support import require_gpu, to_numpy

require_gpu()

import cupy  # noqa: E402

import cuflash  # noqa: E402
from cuflash import _replay, reference  # noqa: E402
from tests.accuracy import (  # noqa: E402
    assert_matches_reference,
    backward_eps,
    naive_attention,
    naive_attention_backward,
)
from tests.strategies import (  # noqa: E402
    examples,
    make_dout,
    make_inputs,
    problems,
    seeds,
    to_bshd4,
)

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
    with guarded() as allocator:
        q, k, v = make_inputs(case, cupy, seed)
        dout = make_dout(case, cupy, seed)
        opts = {**case.mask, "layout": case.layout}
        out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, **opts,
                                           deterministic=deterministic)
        damaged = allocator.damaged()
        host = [to_numpy(x) for x in (q, k, v, dout, out, lse, *grads)]
    assert not damaged, f"{case.id}: written outside a tensor: {damaged}"

    q4, k4, v4, do4 = (to_bshd4(x, case) for x in host[:4])
    scale = 1.0 / np.sqrt(case.head_dim)
    naive_opts = {**case.mask, "dtype": case.dtype, "scale": scale}
    ref_out, ref_lse = reference.attention(q4, k4, v4, **case.mask, return_lse=True)
    naive_out, naive_lse = naive_attention(q4, k4, v4, **naive_opts)
    assert_matches_reference(f"{case.id} out", to_bshd4(host[4], case), ref_out, naive_out,
                             dtype=case.dtype)
    got_lse = host[5][None] if case.three_d else host[5]
    assert_matches_reference(f"{case.id} lse", got_lse, ref_lse, naive_lse, dtype="float32")
    refs = reference.attention_backward(do4, q4, k4, v4, **case.mask)
    naive = naive_attention_backward(do4, q4, k4, v4, **naive_opts)
    eps = backward_eps(do4, q4, k4, v4, **naive_opts)
    for name, got, ref, nv, e in zip(("dq", "dk", "dv"), host[6:], refs, naive, eps,
                                     strict=True):
        assert_matches_reference(f"{case.id} {name}", to_bshd4(got, case), ref, nv,
                                 dtype=case.dtype, eps=e)


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
