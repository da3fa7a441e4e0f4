"""GPU out of memory: a call that cannot get its memory raises the framework's out-of-memory
error naming the size asked for, and the process keeps working once memory is freed.

Skipped, with the reason printed, where no CUDA GPU is usable.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu_support import require_gpu, to_numpy

require_gpu()

import cupy  # noqa: E402

import cuflash  # noqa: E402
from cuflash import reference  # noqa: E402

pytestmark = pytest.mark.gpu


def _fill_cupy() -> list:
    """Hold all but a few MB of the device's memory in CuPy's pool."""
    pool = cupy.get_default_memory_pool()
    held, chunk = [], 1 << 34
    while chunk >= 1 << 20:
        try:
            held.append(cupy.empty(chunk, dtype=cupy.uint8))
        except cupy.cuda.memory.OutOfMemoryError:
            chunk //= 2
    assert pool.used_bytes() > 0
    return held


def _inputs(xp, seqlen=4096):
    rng = np.random.default_rng(0)
    return [xp.asarray(rng.standard_normal((1, seqlen, 8, 64)).astype(np.float16))
            for _ in range(4)]


def test_cupy_out_of_memory_raises_and_recovers():
    q, k, v, dout = _inputs(cupy)
    held = _fill_cupy()
    with pytest.raises(cupy.cuda.memory.OutOfMemoryError, match="bytes"):
        cuflash.attention(q, k, v, causal=True)
    with pytest.raises(cupy.cuda.memory.OutOfMemoryError, match="bytes"):
        # Forward results fit in nothing either; the backward asks for its scratch first.
        cuflash.attention_backward(dout, q, k, v, q, cupy.zeros((1, 8, 4096), cupy.float32))
    del held
    cupy.get_default_memory_pool().free_all_blocks()
    out = cuflash.attention(q[:, :300], k[:, :300], v[:, :300], causal=True)
    want = reference.attention(*(to_numpy(x[:, :300]) for x in (q, k, v)), causal=True)
    np.testing.assert_allclose(to_numpy(out), want, atol=5e-3)


def test_torch_out_of_memory_raises_and_recovers():
    torch = pytest.importorskip("torch")
    q, k, v, dout = (torch.as_tensor(to_numpy(x), device="cuda").half()
                     for x in _inputs(cupy, 2048))
    held, chunk = [], 1 << 34
    while chunk >= 1 << 20:
        try:
            held.append(torch.empty(chunk, dtype=torch.uint8, device="cuda"))
        except torch.OutOfMemoryError:
            chunk //= 2
    try:
        with pytest.raises(torch.OutOfMemoryError, match="allocate"):
            qg = q.requires_grad_()
            cuflash.attention(qg, k, v, causal=True).backward(dout)
    finally:
        del held
        torch.cuda.empty_cache()
    q = q.detach()
    out = cuflash.attention(q, k, v, causal=True)
    want = reference.attention(*(x.double().cpu().numpy() for x in (q, k, v)), causal=True)
    np.testing.assert_allclose(out.double().cpu().numpy(), want, atol=5e-3)
