"""Sliding-window attention on the CPU: the variant model (`cuflash._variant`) against the
oracle's mask, argument validation at every entry point, and the metamorphic relations
(``window=(-1, -1)`` is no mask and ``window=(-1, 0)`` is ``causal=True``, bit for bit).

The CPU path's accuracy with random windows is part of tests/test_cpu.py's property; the GPU
kernels' is part of tests/test_gpu_forward.py and tests/test_gpu_backward.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import reference
from cuflash._variant import Variant

BAD_WINDOWS = [
    (3, TypeError, "pair"),
    ("ab", TypeError, "pair"),
    ((1,), TypeError, "pair"),
    ((1, 2, 3), TypeError, "pair"),
    ((1.0, 2), TypeError, "left must be an int"),
    ((1, 2.5), TypeError, "right must be an int"),
    ((True, 0), TypeError, "left must be an int"),
    ((0, np.bool_(False)), TypeError, "right must be an int"),
    ((-2, 0), ValueError, "left must be >= -1"),
    ((0, -5), ValueError, "right must be >= -1"),
]


def _inputs(sq=9, sk=13, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, sq, 4, 16)).astype(dtype)
    k = rng.standard_normal((2, sk, 2, 16)).astype(dtype)
    v = rng.standard_normal((2, sk, 2, 16)).astype(dtype)
    return q, k, v


# ---- the variant model --------------------------------------------------------------------------


@pytest.mark.parametrize("causal, window, expected", [
    (False, None, Variant("none")),
    (False, (-1, -1), Variant("none")),
    (True, None, Variant("causal", -1, 0)),
    (False, (-1, 0), Variant("causal", -1, 0)),
    (True, (-1, -1), Variant("causal", -1, 0)),
    (True, (-1, 7), Variant("causal", -1, 0)),
    (True, (5, 3), Variant("window", 5, 0)),
    (False, (0, 0), Variant("window", 0, 0)),
    (False, (4, -1), Variant("window", 4, -1)),
    (False, (-1, 3), Variant("window", -1, 3)),
    (False, [np.int64(2), 1], Variant("window", 2, 1)),
])
def test_variant_normalises_equal_masks(causal, window, expected):
    assert Variant.of(causal=causal, window=window) == expected


@settings(max_examples=200, deadline=None)
@given(sq=st.integers(0, 70), sk=st.integers(0, 70), causal=st.booleans(),
       left=st.integers(-1, 90), right=st.integers(-1, 90))
def test_variant_mask_is_the_oracles(sq, sk, causal, left, right):
    """key_bounds, key_span, visible_pairs and key_tiles against reference.visible."""
    variant = Variant.of(causal=causal, window=(left, right))
    seen = reference.visible(sq, sk, causal=causal, window=(left, right))
    if seen is None:
        seen = np.ones((sq, sk), dtype=bool)
    first, end = variant.key_bounds(np.arange(sq), sq, sk)
    cols = np.arange(sk)[None, :]
    np.testing.assert_array_equal((cols >= first[:, None]) & (cols < end[:, None]), seen)
    assert variant.visible_pairs(sq, sk) == int(seen.sum())
    for i0 in range(0, sq, 16):
        i1 = min(i0 + 16, sq)
        begin, stop = variant.key_span(i0, i1, sq, sk)
        rows_see = np.flatnonzero(seen[i0:i1].any(axis=0))
        if len(rows_see):
            assert begin <= rows_see[0] and rows_see[-1] < stop
            assert seen[i0:i1, begin].any() and seen[i0:i1, stop - 1].any()
    # Key tiles per query tile, the last tile's rows past sq counted as rows (as the kernels do).
    tiles = variant.key_tiles(sq, sk, 16, 8)
    rows = 16 * ((sq + 15) // 16)
    wide = reference.visible(rows, sk + rows - sq, causal=causal, window=(left, right))
    for m, count in enumerate(tiles):
        want = np.ones(sk, bool) if wide is None else \
            wide[m * 16:(m + 1) * 16, :sk].any(axis=0)
        hit = {j // 8 for j in np.flatnonzero(want)}
        expect = 0 if not hit else max(hit) - min(hit) + 1
        assert count == expect, (m, count, expect)


def test_window_params_stay_inside_int32():
    assert Variant.of(window=(-1, 5)).window_params(100, 300) == (400, 5)
    assert Variant.of(window=(10**12, 0)).window_params(2**30, 2**30) == (2**31, 0)


# ---- validation at every entry point ------------------------------------------------------------


@pytest.mark.parametrize("window, error, words", BAD_WINDOWS)
def test_bad_window_is_refused_naming_it(window, error, words):
    q, k, v = _inputs()
    with pytest.raises(error, match="window") as info:
        cuflash.attention(q, k, v, window=window)
    assert words in str(info.value)
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    with pytest.raises(error, match="window"):
        cuflash.attention_backward(out, q, k, v, out, lse, window=window)
    with pytest.raises(error, match="window"):
        reference.attention(q, k, v, window=window)


@pytest.mark.parametrize("window, error, words", BAD_WINDOWS[:4] + BAD_WINDOWS[-2:])
def test_bad_window_is_refused_by_torch_and_jax(window, error, words):
    q, k, v = _inputs()
    torch = pytest.importorskip("torch")
    from cuflash import torch as cuflash_torch

    with pytest.raises(error, match="window"):
        cuflash_torch.attention(*(torch.from_numpy(x) for x in (q, k, v)), window=window)
    pytest.importorskip("jax")
    from cuflash import jax as cuflash_jax

    with pytest.raises(error, match="window"):
        cuflash_jax.attention(q, k, v, window=window)


def test_bad_window_leaves_out_untouched():
    q, k, v = _inputs()
    out = np.full_like(q, 7.0)
    with pytest.raises(ValueError, match="window"):
        cuflash.attention(q, k, v, window=(-3, 0), out=out)
    assert np.all(out == 7.0)


# ---- metamorphic relations, bit for bit ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("sq, sk", [(9, 13), (13, 9), (1, 40), (130, 130)])
def test_equal_masks_give_equal_bits(dtype, sq, sk):
    q, k, v = _inputs(sq, sk, dtype, seed=sq * 100 + sk)
    dout = np.random.default_rng(1).standard_normal(q.shape).astype(dtype)
    for plain, windowed in (({}, {"window": (-1, -1)}),
                            ({"causal": True}, {"window": (-1, 0)}),
                            ({"causal": True, "window": (6, 4)}, {"window": (6, 0)})):
        a, lse_a = cuflash.attention(q, k, v, return_lse=True, **plain)
        b, lse_b = cuflash.attention(q, k, v, return_lse=True, **windowed)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(lse_a, lse_b)
        grads_a = cuflash.attention_backward(dout, q, k, v, a, lse_a, **plain)
        grads_b = cuflash.attention_backward(dout, q, k, v, b, lse_b, **windowed)
        for ga, gb in zip(grads_a, grads_b, strict=True):
            np.testing.assert_array_equal(ga, gb)


def test_rows_outside_every_window_are_zero_with_gradients_zero():
    # shift = Sk - Sq = -20 and right = 5: the first 15 rows see no key.
    q, k, v = _inputs(40, 20)
    out, lse = cuflash.attention(q, k, v, window=(3, 5), return_lse=True)
    assert np.all(out[:, :15] == 0) and np.all(np.isneginf(lse[:, :, :15]))
    assert np.isfinite(lse[:, :, 15:]).all()
    dq, _, _ = cuflash.attention_backward(np.ones_like(out), q, k, v, out, lse, window=(3, 5))
    assert np.all(dq[:, :15] == 0)


def test_keys_outside_the_window_do_not_matter():
    """Changing keys/values no row's window reaches changes no output bit."""
    q, k, v = _inputs(64, 64)
    out = cuflash.attention(q, k, v, window=(8, 0))
    k2, v2 = k.copy(), v.copy()
    k2[:, :30] = 100.0  # rows >= 38 see keys >= 30 only
    v2[:, :30] = -100.0
    out2 = cuflash.attention(q, k2, v2, window=(8, 0))
    np.testing.assert_array_equal(out2[:, 38:], out[:, 38:])


def test_torch_and_jax_take_window_with_gradients():
    q, k, v = _inputs(20, 20, np.float64)
    dout = np.random.default_rng(3).standard_normal(q.shape)
    want = reference.attention_backward(dout, q, k, v, window=(4, 1))
    torch = pytest.importorskip("torch")
    from cuflash import torch as cuflash_torch

    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    cuflash_torch.attention(tq, tk, tv, window=(4, 1)).backward(torch.from_numpy(dout))
    for got, ref in zip((tq.grad, tk.grad, tv.grad), want, strict=True):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-9)
    jax = pytest.importorskip("jax")
    from cuflash import jax as cuflash_jax

    q32, k32, v32, do32 = (x.astype(np.float32) for x in (q, k, v, dout))
    grads = jax.grad(lambda a, b, c: (cuflash_jax.attention(a, b, c, window=(4, 1)) *
                                      do32).sum(), argnums=(0, 1, 2))(q32, k32, v32)
    for got, ref in zip(grads, want, strict=True):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)
