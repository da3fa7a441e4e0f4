"""GPU: the split-KV decoding kernel (sm80/fwd_decode.cu) behind `attention_with_kvcache`.

Contiguous caches (with `cache_batch_idx` and `cache_leftpad`) and paged ones (shuffled block
tables, page sizes 1 to 256), appends, GQA packing, 1 to 16 query steps, causal, windows,
softcap, ALiBi and sinks, every `num_splits`: against the float64 reference on each sequence's
keys by the accuracy rule, with the dense kernels (each sequence through `cuflash.attention`) as
the baseline error; every split count against one split; the caches outside the appended slots
unchanged bit for bit. float16 through CuPy, bfloat16 through torch. Skipped, with the reason
printed, where no CUDA GPU is usable.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from tests.gpu_support import require_gpu, to_numpy

require_gpu()

import cupy  # noqa: E402

import cuflash  # noqa: E402
from cuflash.cuda import _decode  # noqa: E402
from tests import decode_cases  # noqa: E402
from tests.accuracy import LSE_DTYPE, assert_matches_reference  # noqa: E402
from tests.strategies import examples  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, scope="module")
def _decode_kernels_on():
    """The decoding kernels on, even where the environment switches them off
    (``CUFLASH_DECODE_KERNEL=0``, `_decode.SWITCH_ENV`)."""
    import os

    before = os.environ.pop(_decode.SWITCH_ENV, None)
    yield
    if before is not None:
        os.environ[_decode.SWITCH_ENV] = before


def _to_device(x: np.ndarray, dtype: str):
    """float16 as CuPy, bfloat16 as torch (CuPy has none)."""
    if dtype == "bfloat16":
        torch = pytest.importorskip("torch")
        return torch.asarray(x.astype(np.float32), device="cuda").to(torch.bfloat16)
    return cupy.asarray(x.astype(np.float16))


def _call(case, dev, opts, *, decode: bool, splits: int | None = None):
    fresh = {name: None if x is None else x.clone() if hasattr(x, "clone") else x.copy()
             for name, x in dev.items()}
    calls = []
    real_run = _decode.run

    def spy(*a, **kw):
        calls.append(kw["num_splits"])
        return real_run(*a, **kw)

    with contextlib.ExitStack() as scope:
        scope.enter_context(mock.patch.object(_decode, "run", spy))
        if not decode:
            scope.enter_context(mock.patch.object(_decode, "reason", lambda *a, **kw: "forced"))
        out, lse = cuflash.attention_with_kvcache(
            fresh["q"], fresh["k_cache"], fresh["v_cache"], k=fresh["k"], v=fresh["v"],
            num_splits=case["splits"] if splits is None else splits, **opts)
    assert bool(calls) == decode, f"decode kernel used: {bool(calls)}, expected {decode}"
    return to_numpy(out), to_numpy(lse), to_numpy(fresh["k_cache"]), to_numpy(fresh["v_cache"])


@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(decode_cases.decode_cases())
def test_decode_kernel_matches_the_reference(case):
    host, dev, opts = decode_cases.build(case, _to_device)
    want, want_lse, k_after, v_after, written = decode_cases.expected(case, host, opts)
    out, lse, k_cache, v_cache = _call(case, dev, opts, decode=True)
    dense, dense_lse, k_dense, _ = _call(case, dev, opts, decode=False)
    assert_matches_reference("out", out, want, dense, dtype=case["dtype"])
    assert_matches_reference("lse", lse, want_lse, dense_lse, dtype=LSE_DTYPE)
    # the new keys where they belong (rotated as the framework rotates them, to one rounding),
    # every other slot as it was, bit for bit
    np.testing.assert_array_equal(v_cache, v_after)
    np.testing.assert_array_equal(k_cache[~written], k_after[~written])
    ulp = {"float16": 2**-10, "bfloat16": 2**-7}[case["dtype"]]
    np.testing.assert_allclose(k_cache[written], k_dense[written], rtol=ulp, atol=ulp)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("seqlen_q, heads", [(1, (32, 8)), (4, (8, 1)), (16, (16, 2))])
def test_every_split_count_equals_one_split(paged, seqlen_q, heads):
    case = dict(dtype="float16", dim=128, heads_kv=heads[1], group=heads[0] // heads[1],
                seqlen_q=seqlen_q, batch=2, new=1, paged=paged, page_size=16 if paged else 0,
                lengths=[3000, 517], mask={"causal": True}, score={}, sinks=True, splits=1,
                extra={}, seed=7)
    _, dev, opts = decode_cases.build(case, _to_device)
    one, one_lse, _, _ = _call(case, dev, opts, decode=True, splits=1)
    for splits in (2, 5, 16, 47, 128):
        out, lse, _, _ = _call(case, dev, opts, decode=True, splits=splits)
        np.testing.assert_allclose(out, one, rtol=0, atol=2e-3)
        np.testing.assert_allclose(lse, one_lse, rtol=1e-5, atol=1e-5)


def test_num_splits_is_checked():
    case = dict(dtype="float16", dim=64, heads_kv=1, group=1, seqlen_q=1, batch=1, new=0,
                paged=False, page_size=0, lengths=[10], mask={}, score={}, sinks=False,
                splits=0, extra={}, seed=1)
    _, dev, opts = decode_cases.build(case, _to_device)
    for bad, kind in ((-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(kind, match="num_splits"):
            cuflash.attention_with_kvcache(dev["q"], dev["k_cache"], dev["v_cache"],
                                           num_splits=bad, **opts)
