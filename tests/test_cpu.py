"""cuflash._cpu, the NumPy FlashAttention path: accuracy against the reference and the properties
the path must have (metamorphic relations, fully-masked rows, the NaN policy, untouched inputs,
O(S) memory)."""

from __future__ import annotations

import contextlib
import math
import tracemalloc
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from cuflash import _cpu, reference
from cuflash._variant import Variant
from tests.accuracy import (
    LSE_DTYPE,
    assert_matches_reference,
    backward_eps,
    naive_attention,
    naive_attention_backward,
)
from tests.strategies import Case, examples, make_dout, make_inputs, problems, seeds, to_bshd4

CPU_DTYPES = ("float16", "float32", "float64")

# The shipped tiles, and small ones that put many tile edges inside small problems (uneven ones
# too, so the causal block skipping and masking meet every alignment).
TILES = ((_cpu.BLOCK_Q, _cpu.BLOCK_K), (16, 32), (32, 16), (5, 7))

ACCURACY = settings(deadline=None, max_examples=examples(60),
                    suppress_health_check=[HealthCheck.too_slow])
PROPERTY = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])


def small_problems(**kwargs) -> st.SearchStrategy[Case]:
    """float32 / float64 problems small enough for many examples."""
    return problems(
        dtypes=("float32", "float64"), max_seqlen=150, max_head_dim=64, max_batch=2, **kwargs
    )


@contextlib.contextmanager
def _tiles(block_q: int, block_k: int):
    with mock.patch.multiple(_cpu, BLOCK_Q=block_q, BLOCK_K=block_k):
        yield


def _canonical_inputs(case: Case, seed: int) -> list[np.ndarray]:
    """q, k, v, dout for ``case`` as 4-D (B, S, H, D) views (strides as built)."""
    q, k, v = make_inputs(case, np, seed)
    return [to_bshd4(x, case) for x in (q, k, v, make_dout(case, np, seed))]


def _scale(case: Case) -> float:
    return 1 / math.sqrt(case.head_dim)


def _forward(case: Case, q, k, v):
    return _cpu.forward(q, k, v, variant=Variant.of(**case.mask), scale=_scale(case))


def _backward(case: Case, dout, q, k, v, out):
    return _cpu.backward(dout, q, k, v, out, variant=Variant.of(**case.mask), scale=_scale(case))


@ACCURACY
@given(
    case=problems(dtypes=CPU_DTYPES, windows=True, softcaps=True),
    seed=seeds(),
    tiles=st.sampled_from(TILES),
    scale=st.one_of(st.none(), st.floats(0.05, 2.0)),
)
def test_forward_and_backward_match_reference(
    case: Case, seed: int, tiles: tuple[int, int], scale: float | None
):
    note(f"{case.id}, tiles {tiles}, scale {scale}")
    _check_against_reference(case, seed, tiles, scale)


@settings(deadline=None, max_examples=examples(30), suppress_health_check=[HealthCheck.too_slow])
@given(
    case=problems(dtypes=CPU_DTYPES, max_seqlen=150, windows=True, softcaps=True,
                  value_dims=True),
    seed=seeds(),
    tiles=st.sampled_from(TILES),
)
def test_value_head_dim_of_its_own_matches_reference(case: Case, seed: int,
                                                     tiles: tuple[int, int]):
    note(f"{case.id}, tiles {tiles}")
    _check_against_reference(case, seed, tiles, None)


# v with a head dim of its own (Dv != D): GQA, causal, windows, both layouts, 3-D, strided.
VALUE_DIM_CASES = [
    Case(2, 37, 53, 4, 2, 192, head_dim_v=128, dtype="float32", causal=True),
    Case(1, 29, 17, 6, 2, 16, head_dim_v=40, dtype="float64", window=(5, 3), layout="bhsd"),
    Case(1, 21, 33, 3, 1, 64, head_dim_v=1, dtype="float16", causal=True, three_d=True),
    Case(2, 40, 40, 2, 2, 16, head_dim_v=40, dtype="float32", window=(-1, 4), layout="bhsd",
         view="transposed"),
    Case(1, 15, 9, 4, 1, 64, head_dim_v=1, dtype="float64", window=(3, 0), layout="bhsd",
         three_d=True),
    Case(2, 19, 26, 4, 2, 192, head_dim_v=128, dtype="float64", causal=True, window=(7, -1),
         softcap=2.0, layout="bhsd"),
]


@pytest.mark.parametrize("tiles", [TILES[0], (5, 7)], ids=lambda t: f"tiles{t[0]}x{t[1]}")
@pytest.mark.parametrize("case", VALUE_DIM_CASES, ids=lambda c: c.id)
def test_value_head_dim_of_its_own(case: Case, tiles: tuple[int, int]):
    _check_against_reference(case, seed=21, tiles=tiles, scale=None)


def _check_against_reference(case: Case, seed: int, tiles: tuple[int, int],
                             scale: float | None) -> None:
    """The CPU forward and backward of `case` against the float64 reference by the accuracy
    rule: shapes, dtypes, contiguity, and inputs and outputs left untouched."""
    q, k, v = make_inputs(case, np, seed)
    dout = make_dout(case, np, seed)
    q4, k4, v4, do4 = (to_bshd4(x, case) for x in (q, k, v, dout))
    inputs = {"q": q, "k": k, "v": v, "dout": dout}
    originals = {name: x.copy() for name, x in inputs.items()}
    scale_used = _scale(case) if scale is None else scale
    opts = {"variant": Variant.of(**case.mask), "scale": scale_used}
    with _tiles(*tiles):
        out, lse = _cpu.forward(q4, k4, v4, **opts)
        inputs |= {"out": out, "lse": lse}
        originals |= {"out": out.copy(), "lse": lse.copy()}
        grads = _cpu.backward(do4, q4, k4, v4, out, **opts)

    b, sq, hq, _ = q4.shape
    assert out.dtype == q.dtype and out.shape == (b, sq, hq, case.dim_v)
    assert out.flags.c_contiguous
    assert lse.dtype == np.float32 and lse.shape == (b, hq, sq)
    for name, g, x in zip(("dq", "dk", "dv"), grads, (q4, k4, v4), strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape and g.flags.c_contiguous, name

    ref_opts = {**case.mask, "scale": scale, "layout": case.layout}
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **ref_opts)
    ref_grads = reference.attention_backward(dout, q, k, v, **ref_opts)
    naive_opts = {**case.mask, "scale": scale_used, "dtype": case.dtype}
    naive_out, naive_lse = naive_attention(q4, k4, v4, **naive_opts)
    naive_grads = naive_attention_backward(do4, q4, k4, v4, **naive_opts)
    grad_eps = backward_eps(do4, q4, k4, v4, **naive_opts)

    assert_matches_reference("out", out, to_bshd4(ref_out, case), naive_out, dtype=case.dtype)
    ref_lse = ref_lse[None] if case.three_d else ref_lse
    assert_matches_reference("lse", lse, ref_lse, naive_lse, dtype=LSE_DTYPE)
    for name, got, ref, naive_g, eps in zip(
        ("dq", "dk", "dv"), grads, ref_grads, naive_grads, grad_eps, strict=True
    ):
        ref = to_bshd4(ref, case)
        assert_matches_reference(name, got, ref, naive_g, dtype=case.dtype, eps=eps)
    for name, x in inputs.items():
        np.testing.assert_array_equal(x, originals[name], err_msg=f"{name} was modified")


@pytest.mark.parametrize(
    "case",
    [
        Case(1, sq, sk, 2, 1, 8, dtype=dtype, causal=causal)
        for sq, sk in [(0, 0), (0, 7), (7, 0), (1, 1), (1, 7), (7, 1)]
        for causal in (False, True)
        for dtype in ("float16", "float64")
    ],
    ids=lambda c: c.id,
)
def test_lengths_zero_and_one(case: Case):
    q, k, v, dout = _canonical_inputs(case, seed=11)
    out, lse = _forward(case, q, k, v)
    grads = _backward(case, dout, q, k, v, out)
    ref_out, ref_lse = reference.attention(q, k, v, causal=case.causal, return_lse=True)
    naive = {"dtype": case.dtype, "causal": case.causal, "scale": _scale(case)}
    naive_out, naive_lse = naive_attention(q, k, v, **naive)
    assert_matches_reference("out", out, ref_out, naive_out, dtype=case.dtype)
    assert_matches_reference("lse", lse, ref_lse, naive_lse, dtype=LSE_DTYPE)
    ref_grads = reference.attention_backward(dout, q, k, v, causal=case.causal)
    naive_grads = naive_attention_backward(dout, q, k, v, **naive)
    grad_eps = backward_eps(dout, q, k, v, **naive)
    for name, got, ref, naive_g, eps in zip(
        ("dq", "dk", "dv"), grads, ref_grads, naive_grads, grad_eps, strict=True
    ):
        assert_matches_reference(name, got, ref, naive_g, dtype=case.dtype, eps=eps)


def test_fp32_backward_with_large_scores_sums_p_to_one():
    # Scores 20000 and 19992: lse = 20000.000335 rounds to 20000 in float32, and exp(s - lse)
    # gave dv = (1.0, 0.000335), probabilities summing to 1.00034.
    q = np.full((1, 1, 1, 1), 2000, np.float32)
    k = np.array([10, 9.996], np.float32).reshape(1, 2, 1, 1)
    v = np.array([1, -1], np.float32).reshape(1, 2, 1, 1)
    dout = np.ones_like(q)
    out, _ = _cpu.forward(q, k, v, variant=Variant(), scale=1.0)
    _, _, dv = _cpu.backward(dout, q, k, v, out, variant=Variant(), scale=1.0)
    ref_dv = reference.attention_backward(dout, q, k, v, scale=1.0)[2]
    naive_dv = naive_attention_backward(dout, q, k, v, dtype="float32", causal=False, scale=1.0)[2]
    eps = backward_eps(dout, q, k, v, dtype="float32", causal=False, scale=1.0)[2]
    np.testing.assert_allclose(dv.ravel(), [0.999664, 0.000336], rtol=1e-5, atol=1e-6)
    assert_matches_reference("dv", dv, ref_dv, naive_dv, dtype="float32", eps=eps)


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("causal", [False, True])
def test_fp32_backward_with_q_scaled_by_1000(seed: int, causal: bool):
    rng = np.random.default_rng(seed)
    q = 1000 * rng.standard_normal((1, 24, 2, 16)).astype(np.float32)
    k, v = (rng.standard_normal((1, 24, 1, 16)).astype(np.float32) for _ in range(2))
    dout = rng.standard_normal(q.shape).astype(np.float32)
    opts = {"causal": causal, "scale": 0.25}
    out, _ = _cpu.forward(q, k, v, variant=Variant.of(causal=causal), scale=0.25)
    grads = _cpu.backward(dout, q, k, v, out, variant=Variant.of(causal=causal), scale=0.25)
    ref_grads = reference.attention_backward(dout, q, k, v, **opts)
    naive_grads = naive_attention_backward(dout, q, k, v, dtype="float32", **opts)
    grad_eps = backward_eps(dout, q, k, v, dtype="float32", **opts)
    for name, got, ref, naive_g, eps in zip(
        ("dq", "dk", "dv"), grads, ref_grads, naive_grads, grad_eps, strict=True
    ):
        assert_matches_reference(name, got, ref, naive_g, dtype="float32", eps=eps)


@pytest.mark.parametrize("seed", range(30))
def test_fp32_forward_with_a_scale_that_is_not_a_power_of_two(seed: int):
    # scale = 7 rounds when folded into q before the product; with scores of ~100 that rounding
    # took the error past twice naive float32's (7 of these 30 seeds before the fix).
    rng = np.random.default_rng(seed)
    q = 3 * rng.standard_normal((1, 64, 1, 194)).astype(np.float32)
    k, v = (rng.standard_normal((1, 64, 1, 194)).astype(np.float32) for _ in range(2))
    out, lse = _cpu.forward(q, k, v, variant=Variant(), scale=7.0)
    ref_out, ref_lse = reference.attention(q, k, v, scale=7.0, return_lse=True)
    naive_out, naive_lse = naive_attention(q, k, v, dtype="float32", causal=False, scale=7.0)
    assert_matches_reference("out", out, ref_out, naive_out, dtype="float32")
    assert_matches_reference("lse", lse, ref_lse, naive_lse, dtype=LSE_DTYPE)


@pytest.mark.parametrize(
    "case, tiles",
    [
        (Case(2, 9, 4, 4, 2, 16, dtype="float16", causal=True), TILES[0]),
        (Case(1, 40, 7, 3, 1, 8, dtype="float32", causal=True), (16, 32)),
        (Case(1, 130, 3, 2, 2, 8, dtype="float64", causal=True), TILES[0]),
        (Case(2, 6, 0, 2, 1, 5, dtype="float32"), TILES[0]),
    ],
    ids=lambda x: x.id if isinstance(x, Case) else f"tiles{x[0]}x{x[1]}",
)
def test_rows_that_see_no_key_give_zero_and_no_gradient(case: Case, tiles: tuple[int, int]):
    q, k, v, dout = _canonical_inputs(case, seed=5)
    blind = max(0, case.seqlen_q - case.seqlen_k) if case.seqlen_k else case.seqlen_q
    with _tiles(*tiles):
        out, lse = _forward(case, q, k, v)
        assert np.all(out[:, :blind] == 0) and np.all(np.isneginf(lse[:, :, :blind]))
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse[:, :, blind:]))
        # An incoming gradient on the blind rows only must produce no gradient at all.
        dout_blind = np.where(np.arange(case.seqlen_q)[:, None, None] < blind, dout, 0)
        for name, g in zip(
            ("dq", "dk", "dv"), _backward(case, dout_blind, q, k, v, out), strict=True
        ):
            assert not np.any(g), f"{name} is not zero"
        for name, g in zip(
            ("dq", "dk", "dv"), _backward(case, dout, q, k, v, out), strict=True
        ):
            assert np.all(np.isfinite(g)), f"{name} is not finite"


@pytest.mark.parametrize("tiles", [TILES[0], (2, 3)], ids=lambda t: f"tiles{t[0]}x{t[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq, sk", [(6, 9), (9, 6)], ids=["Sq<Sk", "Sq>Sk"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_policy_matches_the_reference(where: str, sq: int, sk: int, causal: bool, tiles):
    # NaN in q row i: out and lse of row i NaN. NaN in k (v) at key j: out and lse (out only)
    # NaN in exactly the rows that see key j (v: in the NaN's column). Rows that see no key:
    # zeros and lse = -inf whatever they hold. The reference must say the same, row by row.
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, sq, 4, 8))
    k, v = (rng.standard_normal((1, sk, 2, 8)) for _ in range(2))
    sees = np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq) if causal else (
        np.ones((sq, sk), dtype=bool))
    want_out = np.zeros((1, sq, 4, 8), dtype=bool)
    want_lse = np.zeros((1, 4, sq), dtype=bool)
    if where == "q":  # rows 1 (sees no key when causal with Sq > Sk) and 5, head 2
        q[0, [1, 5], 2, 3] = np.nan
        rows = [i for i in (1, 5) if sees[i].any()]
        want_out[0, rows, 2, :] = True
        want_lse[0, 2, rows] = True
    else:  # key 4 of kv head 1, read by query heads 2 and 3
        (k if where == "k" else v)[0, 4, 1, 3] = np.nan
        rows = sees[:, 4]
        if where == "k":
            want_out[0, rows, 2:, :] = True
            want_lse[0, 2:, rows] = True
        else:
            want_out[0, rows, 2:, 3] = True
    with _tiles(*tiles):
        out, lse = _cpu.forward(q, k, v, variant=Variant.of(causal=causal), scale=0.5)
    ref_out, ref_lse = reference.attention(q, k, v, causal=causal, scale=0.5, return_lse=True)
    np.testing.assert_array_equal(np.isnan(ref_out), want_out, err_msg="reference out NaN")
    np.testing.assert_array_equal(np.isnan(ref_lse), want_lse, err_msg="reference lse NaN")
    np.testing.assert_array_equal(np.isnan(out), want_out, err_msg="cpu out NaN")
    np.testing.assert_array_equal(np.isnan(lse), want_lse, err_msg="cpu lse NaN")
    blind = ~sees.any(axis=1)
    assert np.all(out[:, blind] == 0) and np.all(np.isneginf(lse[:, :, blind]))
    np.testing.assert_allclose(out[~want_out], ref_out[~want_out], rtol=0, atol=1e-12)
    np.testing.assert_allclose(lse[~want_lse], ref_lse[~want_lse], rtol=0, atol=1e-6)


# Tolerances of the metamorphic checks: the transformed problem rounds differently, so results
# agree to a few hundred ulps (more for the key shift, whose scores reach ~100 in magnitude).
SAME_TOL = {"float32": 2e-5, "float64": 1e-12}
SHIFT_TOL = {"float32": 5e-4, "float64": 1e-10}


@PROPERTY
@given(case=small_problems(), seed=seeds())
def test_adding_one_vector_to_every_key_changes_nothing(case: Case, seed: int):
    note(case.id)
    q, k, v, _ = _canonical_inputs(case, seed)
    # Large enough that the scores overflow float32 exp unless the running max is subtracted.
    shift = (40 * np.random.default_rng(seed).standard_normal(case.head_dim)).astype(k.dtype)
    out, _ = _forward(case, q, k, v)
    shifted, _ = _forward(case, q, k + shift, v)
    np.testing.assert_allclose(shifted, out, rtol=0, atol=SHIFT_TOL[case.dtype])


@PROPERTY
@given(case=small_problems(causal=False), seed=seeds())
def test_permuting_keys_and_values_together_changes_nothing(case: Case, seed: int):
    note(case.id)
    q, k, v, dout = _canonical_inputs(case, seed)
    perm = np.random.default_rng(seed).permutation(case.seqlen_k)
    out, lse = _forward(case, q, k, v)
    out_p, lse_p = _forward(case, q, k[:, perm], v[:, perm])
    np.testing.assert_allclose(out_p, out, rtol=0, atol=SAME_TOL[case.dtype])
    np.testing.assert_allclose(lse_p, lse, rtol=1e-6, atol=1e-6)
    dq, dk, dv = _backward(case, dout, q, k, v, out)
    dq_p, dk_p, dv_p = _backward(case, dout, q, k[:, perm], v[:, perm], out_p)
    for name, got, want in (("dq", dq_p, dq), ("dk", dk_p, dk[:, perm]), ("dv", dv_p, dv[:, perm])):
        tol = SAME_TOL[case.dtype] * max(1.0, float(np.abs(want).max(initial=0)))
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=name)


@PROPERTY
@given(case=problems(dtypes=CPU_DTYPES, max_seqlen=150, max_head_dim=64), seed=seeds())
def test_each_output_row_lies_inside_the_values_it_sees(case: Case, seed: int):
    note(case.id)
    q, k, v, _ = _canonical_inputs(case, seed)
    out, _ = _forward(case, q, k, v)
    sq, sk = case.seqlen_q, case.seqlen_k
    if sk == 0:
        return
    # The last key each row sees; prefix min / max over keys then bound that row.
    last = np.arange(sq) + sk - sq if case.causal else np.full(sq, sk - 1)
    rows = np.flatnonzero(last >= 0)
    last = np.minimum(last[rows], sk - 1)
    lo = np.minimum.accumulate(v, axis=1)[:, last].repeat(case.group, axis=2)
    hi = np.maximum.accumulate(v, axis=1)[:, last].repeat(case.group, axis=2)
    tol = 4 * np.finfo(v.dtype).eps * np.abs(v).max()
    assert np.all(out[:, rows] >= lo - tol) and np.all(out[:, rows] <= hi + tol)


@PROPERTY
@given(case=small_problems(causal=True), seed=seeds())
def test_causal_rows_ignore_future_keys(case: Case, seed: int):
    note(case.id)
    q, k, v, dout = _canonical_inputs(case, seed)
    sq, sk = case.seqlen_q, case.seqlen_k
    cut = int(np.random.default_rng(seed).integers(0, sk + 1))
    fresh = np.random.default_rng((seed, 2))
    k2, v2 = k.copy(), v.copy()
    k2[:, cut:] = fresh.standard_normal(k2[:, cut:].shape)
    v2[:, cut:] = fresh.standard_normal(v2[:, cut:].shape)
    # Rows i with i + sk - sq < cut see only keys before the cut.
    rows = slice(0, max(0, min(sq, cut - (sk - sq))))
    out, lse = _forward(case, q, k, v)
    out2, lse2 = _forward(case, q, k2, v2)
    np.testing.assert_array_equal(out2[:, rows], out[:, rows])
    np.testing.assert_array_equal(lse2[:, :, rows], lse[:, :, rows])
    dq = _backward(case, dout, q, k, v, out)[0]
    dq2 = _backward(case, dout, q, k2, v2, out2)[0]
    np.testing.assert_array_equal(dq2[:, rows], dq[:, rows])


@PROPERTY
@given(case=small_problems().filter(lambda c: c.group > 1), seed=seeds())
def test_gqa_equals_repeating_kv_heads(case: Case, seed: int):
    note(case.id)
    q, k, v, dout = _canonical_inputs(case, seed)
    k_rep, v_rep = (np.repeat(x, case.group, axis=2) for x in (k, v))
    out, lse = _forward(case, q, k, v)
    out_r, lse_r = _forward(case, q, k_rep, v_rep)
    np.testing.assert_allclose(out_r, out, rtol=0, atol=SAME_TOL[case.dtype])
    np.testing.assert_allclose(lse_r, lse, rtol=1e-6, atol=1e-6)
    grads = _backward(case, dout, q, k, v, out)
    dq_r, dk_r, dv_r = _backward(case, dout, q, k_rep, v_rep, out_r)
    b, sk, hkv, d = k.shape
    summed = [x.reshape(b, sk, hkv, case.group, d).sum(axis=3) for x in (dk_r, dv_r)]
    for name, got, want in zip(("dq", "dk", "dv"), (dq_r, *summed), grads, strict=True):
        tol = SAME_TOL[case.dtype] * max(1.0, float(np.abs(want).max(initial=0)))
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=name)


def _forward_peak_bytes(seqlen: int) -> int:
    rng = np.random.default_rng(seqlen)
    q, k, v = (rng.standard_normal((1, seqlen, 1, 64), dtype=np.float32) for _ in range(3))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _cpu.forward(q, k, v, variant=Variant(), scale=0.125)
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_forward_memory_grows_linearly():
    small, large = _forward_peak_bytes(4096), _forward_peak_bytes(8192)
    score_matrix = 8192 * 8192 * 4
    assert large < score_matrix / 8, (
        f"peak {large} B at S=8192; an S x S matrix is {score_matrix} B"
    )
    assert large / small < 3, f"peak {small} B at S=4096 but {large} B at S=8192: not O(S)"
