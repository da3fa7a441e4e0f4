"""The split-KV decoding path's host side on the CPU: how many splits it picks, which calls it
refuses and why, and `num_splits` checked on every path (the kernel itself: test_gpu_decode.py,
and its compile in test_compile.py)."""

from __future__ import annotations

import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import cuflash
from cuflash import _decode
from cuflash._interop import Source
from cuflash._variant import Variant
from tests import decode_cases
from tests.strategies import examples


@pytest.fixture
def h100(monkeypatch):
    """An H100's shape: 132 SMs of 228 KB."""
    monkeypatch.setattr(_decode, "_device_shape", lambda device_id: (132, 233472))


@pytest.mark.parametrize("blocks, tiles", [(8, 128), (8, 2048), (1, 128), (128, 128), (512, 64),
                                           (8, 1), (64, 3), (64, 512), (1, 7)])
def test_splits_fill_one_wave_without_a_second(h100, blocks, tiles):
    smem = _decode.decode_spec("bfloat16", 128, "none", "none").smem_bytes
    resident = 132 * (233472 // (smem + 1024))
    splits = _decode.num_splits_for(blocks, tiles, smem, 0)
    most = min(-(-tiles // _decode.MIN_TILES_PER_SPLIT), _decode.MAX_SPLITS)
    assert 1 <= splits <= max(most, 1)
    if blocks * 2 > resident:
        assert splits == 1  # a second split would start a second wave
        return
    assert blocks * splits <= resident  # one wave
    # The longest split is as short as one wave allows, and no split is empty: more splits
    # would need a second wave, a one-tile split or MAX_SPLITS, or leave the longest as long.
    allowed = min(most, resident // blocks)
    longest = -(-tiles // splits)
    assert longest == -(-tiles // allowed)
    assert splits == 1 or -(-tiles // (splits - 1)) > longest


def test_the_split_counts_measured_best_on_the_h100(h100):
    """bf16 D 128 cells of docs/performance.md's sweep (blocks = batch x KV heads), where the
    old rule (a ceiling, so a second wave; no evening out) lost: 32/8 B8 32k took 5 splits
    (440 us) where 4 took 365 us; 8/1 B64 4k took 5 (64 us) where 4 took 54 us; 8/1 B1 8k took
    128 (12.2 us) where 64 took 10.9 us."""
    smem = _decode.decode_spec("bfloat16", 128, "none", "none").smem_bytes
    assert _decode.num_splits_for(64, 512, smem, 0) == 4
    assert _decode.num_splits_for(64, 64, smem, 0) == 4
    assert _decode.num_splits_for(1, 128, smem, 0) == 64
    # 32/8 B1 8k: 33 splits (4 tiles in the longest) took 21.9 us, 32 (4 each) 20.0 us
    assert _decode.num_splits_for(8, 128, smem, 0) == 32


def _view(shape, dtype="float16", ptr=4096, strides=None):
    """A stand-in for a CuPy view: what `reason` reads."""
    itemsize = np.dtype(dtype).itemsize
    if strides is None:
        strides = tuple(int(np.prod(shape[i + 1:])) * itemsize for i in range(len(shape)))
    return types.SimpleNamespace(shape=shape, dtype=np.dtype(dtype), strides=strides,
                                 data=types.SimpleNamespace(ptr=ptr))


CUDA = Source("cupy", "cuda", 0)


@pytest.fixture
def smem(monkeypatch):
    """The shared memory a block may have: an H100's unless a test says otherwise."""
    limit = {"bytes": 232448}
    monkeypatch.setattr(_decode._compile, "smem_limit", lambda device_id: limit["bytes"])
    return limit


@pytest.mark.parametrize("change, fragment", [
    ({}, None),
    ({"smem": 101376}, "102400 bytes of shared memory"),
    ({"smem": 101376, "dim": 64}, None),
    ({"batch": 65536}, "batch 65536"),
    ({"steps": 0}, "nothing to compute"),
    ({"cc": 75}, "compute capability 7.5"),
    ({"dtype": "float32"}, "dtype float32"),
    ({"dim": 320}, "head dim 320"),
    ({"steps": 17}, "17 query steps"),
    ({"variant": Variant.of(bias=True)}, "score modification 'mods'"),
    ({"page_size": 48}, "page size 48"),
    ({"ptr": 4104}, "not 16-byte aligned"),
    ({"dim": 36}, "not 16-byte aligned"),
])
def test_reason_names_what_the_kernel_cannot_take(change, fragment, smem, monkeypatch):
    monkeypatch.delenv(_decode.SWITCH_ENV, raising=False)
    dim, steps, dtype = change.get("dim", 128), change.get("steps", 1), change.get("dtype",
                                                                                   "float16")
    smem["bytes"] = change.get("smem", smem["bytes"])
    q = _view((change.get("batch", 2), steps, 8, dim), dtype)
    cache = _view((2, 64, 2, dim), dtype, ptr=change.get("ptr", 4096))
    why = _decode.reason(q, cache, cache, variant=change.get("variant", Variant.of()), src=CUDA,
                         page_size=change.get("page_size", 64), paged="page_size" in change,
                         cc=change.get("cc", 90))
    if fragment is None:
        assert why is None
    else:
        assert why is not None and fragment in why


def test_the_kernels_can_be_switched_off(smem, monkeypatch):
    """CUFLASH_DECODE_KERNEL=0 sends every call to the per-sequence path (any other value, or
    none, leaves the kernels on)."""
    q, cache = _view((2, 1, 8, 128)), _view((2, 64, 2, 128))

    def why():
        return _decode.reason(q, cache, cache, variant=Variant.of(), src=CUDA, page_size=64,
                              paged=False, cc=90)

    monkeypatch.delenv(_decode.SWITCH_ENV, raising=False)
    assert why() is None
    monkeypatch.setenv(_decode.SWITCH_ENV, "1")
    assert why() is None
    monkeypatch.setenv(_decode.SWITCH_ENV, "0")
    assert "CUFLASH_DECODE_KERNEL=0" in why()


@pytest.mark.parametrize(("bad", "kind"), [(-1, ValueError), (1.5, TypeError),
                                           (True, TypeError), ("2", TypeError)])
def test_num_splits_is_checked_before_any_write(bad, kind):
    q = np.zeros((1, 1, 2, 8))
    k_cache, v_cache = np.zeros((1, 4, 1, 8)), np.zeros((1, 4, 1, 8))
    new = np.ones((1, 1, 1, 8))
    with pytest.raises(kind, match="num_splits"):
        cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=1, k=new, v=new,
                                       num_splits=bad)
    assert not k_cache.any()


def test_num_splits_does_not_change_the_cpu_result():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 4, 8))
    k_cache, v_cache = (rng.standard_normal((2, 20, 2, 8)) for _ in range(2))
    outs = [cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=17,
                                           num_splits=n) for n in (0, 1, 7)]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


@settings(max_examples=examples(40), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(decode_cases.decode_cases())
def test_the_gpu_suites_oracle_agrees_with_the_cpu_path(case):
    """tests/test_gpu_decode.py's expected values (windows, softcap, ALiBi, sinks, rotary,
    leftpad, cache rows, pages, appends) against the CPU path on the same case in float32: a
    failure there is then the kernel's, not the oracle's."""
    case = {**case, "dtype": "float32"}
    host, dev, opts = decode_cases.build(case, lambda x, dtype: x.astype(np.float32))
    want, want_lse, k_after, v_after, written = decode_cases.expected(case, host, opts)
    out, lse = cuflash.attention_with_kvcache(dev["q"], dev["k_cache"], dev["v_cache"],
                                              k=dev["k"], v=dev["v"],
                                              num_splits=case["splits"], **opts)
    np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-4)
    seen = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isfinite(lse), seen)
    np.testing.assert_allclose(lse[seen], want_lse[seen], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(dev["v_cache"], v_after)
    np.testing.assert_array_equal(dev["k_cache"][~written], k_after[~written])
    np.testing.assert_allclose(dev["k_cache"][written], k_after[written], rtol=1e-5, atol=1e-5)
