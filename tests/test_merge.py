"""cuflash.merge_attention: attention over disjoint key sets, merged by lse, equals attention over
their union (NumPy, torch CPU, JAX CPU, and under jax.jit); rows that see no key stay zeros with
lse = -inf; bad input names the argument."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash


def _split_points(sk, parts, rng):
    cuts = np.sort(rng.choice(np.arange(0, sk + 1), size=parts - 1, replace=True))
    return [0, *cuts.tolist(), sk]


@settings(max_examples=40, deadline=None)
@given(sq=st.integers(1, 9), sk=st.integers(1, 40), parts=st.integers(1, 4),
       layout=st.sampled_from(["bshd", "bhsd"]), causal=st.booleans(),
       dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**32 - 1))
def test_merged_parts_equal_attention_over_the_union(sq, sk, parts, layout, causal, dtype, seed):
    rng = np.random.default_rng(seed)
    b, hq, hkv, d = 2, 4, 2, 8
    shape_q = (b, sq, hq, d) if layout == "bshd" else (b, hq, sq, d)
    shape_k = (b, sk, hkv, d) if layout == "bshd" else (b, hkv, sk, d)
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in (shape_q, shape_k, shape_k))
    seq_axis = 1 if layout == "bshd" else 2
    want, want_lse = cuflash.reference.attention(q, k, v, layout=layout, return_lse=True)
    cuts = _split_points(sk, parts, rng)
    outs, lses = [], []
    for lo, hi in itertools.pairwise(cuts):
        take = [slice(None)] * 4
        take[seq_axis] = slice(lo, hi)
        out, lse = cuflash.attention(q, k[tuple(take)], v[tuple(take)], layout=layout,
                                     return_lse=True)
        outs.append(out)
        lses.append(lse)
    out, lse = cuflash.merge_attention(outs, lses, layout=layout)
    assert out.dtype == q.dtype and lse.dtype == np.float32
    tol = 1e-5 if dtype == "float32" else 1e-6
    np.testing.assert_allclose(out, want, atol=tol, rtol=tol)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_rows_that_see_no_key_anywhere_stay_empty():
    rng = np.random.default_rng(1)
    out = rng.standard_normal((1, 3, 2, 4)).astype(np.float32)
    lse = rng.standard_normal((1, 2, 3)).astype(np.float32)
    empty_lse = np.full_like(lse, -np.inf)
    lse_a = lse.copy()
    lse_a[0, 1, 2] = -np.inf  # head 1, row 2 saw nothing in either part
    merged, merged_lse = cuflash.merge_attention([out, np.zeros_like(out)], [lse_a, empty_lse])
    assert merged_lse[0, 1, 2] == -np.inf
    np.testing.assert_array_equal(merged[0, 2, 1], 0)
    # Elsewhere the empty part has weight 0: the first part comes back unchanged.
    keep = np.isfinite(lse_a)
    np.testing.assert_allclose(merged_lse[keep], lse_a[keep], rtol=1e-6)
    np.testing.assert_allclose(merged[0, :2], out[0, :2], rtol=1e-6)


def test_torch_and_jax_compute_in_their_own_framework():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    outs = [rng.standard_normal((2, 5, 3, 4)).astype(np.float32) for _ in range(3)]
    lses = [rng.standard_normal((2, 3, 5)).astype(np.float32) for _ in range(3)]
    want, want_lse = cuflash.merge_attention(outs, lses)
    got, got_lse = cuflash.merge_attention([torch.from_numpy(x) for x in outs],
                                           [torch.from_numpy(x) for x in lses])
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_lse.numpy(), want_lse, rtol=1e-6, atol=1e-6)
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    merged = jax.jit(cuflash.merge_attention)([jnp.asarray(x) for x in outs],
                                              [jnp.asarray(x) for x in lses])
    np.testing.assert_allclose(np.asarray(merged[0]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(merged[1]), want_lse, rtol=1e-5, atol=1e-6)


def test_bad_input_names_the_argument():
    out = np.zeros((1, 3, 2, 4), np.float32)
    lse = np.zeros((1, 2, 3), np.float32)
    with pytest.raises(ValueError, match="outs: expected at least one"):
        cuflash.merge_attention([], [])
    with pytest.raises(ValueError, match="lses: expected one lse per output"):
        cuflash.merge_attention([out, out], [lse])
    with pytest.raises(ValueError, match=r"outs\[1\]: expected the shape"):
        cuflash.merge_attention([out, out[:, :2]], [lse, lse])
    with pytest.raises(ValueError, match=r"lses\[0\]: expected shape \(1, 2, 3\)"):
        cuflash.merge_attention([out], [lse.swapaxes(1, 2)])
    with pytest.raises(TypeError, match=r"lses\[0\]: expected dtype float32"):
        cuflash.merge_attention([out], [lse.astype(np.float64)])
    with pytest.raises(TypeError, match=r"outs\[1\]: expected dtype float32"):
        cuflash.merge_attention([out, out.astype(np.float64)], [lse, lse])
    with pytest.raises(ValueError, match="layout"):
        cuflash.merge_attention([out], [lse], layout="bsdh")
    with pytest.raises(TypeError, match="outs: expected a sequence"):
        cuflash.merge_attention(out, [lse])
    with pytest.raises(TypeError, match="expected NumPy, CuPy, torch or JAX"):
        cuflash.merge_attention([[1.0]], [lse])
