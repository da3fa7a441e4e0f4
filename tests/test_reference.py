"""cuflash.reference against known answers, an independent loop implementation and finite
differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, note, settings

from cuflash import reference
from tests.strategies import Case, make_dout, make_inputs, problems, seeds, to_bshd4

RNG_SEED = 20240601


def _loop_attention(q4, k4, v4, *, causal, scale):
    """One query row at a time in plain float64: shares no code with cuflash.reference. v may
    have a head dim of its own (out has it)."""
    b, sq, hq, _ = q4.shape
    sk, hkv = k4.shape[1], k4.shape[2]
    out = np.zeros((b, sq, hq, v4.shape[-1]))
    lse = np.full((b, hq, sq), -np.inf)
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(sq):
                keys = [j for j in range(sk) if not causal or j <= i + sk - sq]
                if not keys:
                    continue
                scores = [scale * float(np.dot(q4[bi, i, h], k4[bi, j, kv])) for j in keys]
                top = max(scores)
                weights = [math.exp(x - top) for x in scores]
                total = sum(weights)
                lse[bi, h, i] = top + math.log(total)
                for w, j in zip(weights, keys, strict=True):
                    out[bi, i, h] += (w / total) * v4[bi, j, kv]
    return out, lse


def _random(*shape):
    return np.random.default_rng(RNG_SEED + sum(shape)).standard_normal(shape)


@settings(deadline=None, max_examples=40)
@given(
    case=problems(
        dtypes=("float32", "float64"),
        max_seqlen=12,
        max_head_dim=9,
        max_batch=2,
        max_heads_kv=2,
        max_group=3,
    ),
    seed=seeds(),
)
def test_matches_loop_implementation(case: Case, seed: int):
    note(case.id)
    q, k, v = make_inputs(case, np, seed)
    out, lse = reference.attention(q, k, v, causal=case.causal, layout=case.layout, return_lse=True)
    assert out.dtype == np.float64 and out.shape == case.q_shape
    scale = 1 / math.sqrt(case.head_dim)
    want, want_lse = _loop_attention(
        *(to_bshd4(x, case).astype(np.float64) for x in (q, k, v)), causal=case.causal, scale=scale
    )
    np.testing.assert_allclose(to_bshd4(out, case), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse[None] if case.three_d else lse, want_lse, rtol=1e-12, atol=1e-12)


# v with a head dim of its own (Dv != D): GQA, causal, both layouts, 3-D, a strided view.
@pytest.mark.parametrize(
    "case",
    [
        Case(1, 4, 6, 2, 1, 192, head_dim_v=128, causal=True, dtype="float64"),
        Case(2, 6, 5, 3, 1, 16, head_dim_v=40, layout="bhsd", dtype="float64"),
        Case(1, 5, 5, 4, 2, 64, head_dim_v=1, causal=True, three_d=True, dtype="float64"),
        Case(1, 3, 6, 2, 2, 16, head_dim_v=40, layout="bhsd", three_d=True, view="transposed",
             dtype="float64"),
    ],
    ids=lambda c: c.id,
)
def test_value_head_dim_of_its_own_matches_loop_implementation(case: Case):
    q, k, v = make_inputs(case, np, seed=13)
    out, lse = reference.attention(q, k, v, causal=case.causal, layout=case.layout,
                                   return_lse=True)
    assert out.dtype == np.float64 and out.shape == case.out_shape != case.q_shape
    want, want_lse = _loop_attention(*(to_bshd4(x, case) for x in (q, k, v)), causal=case.causal,
                                     scale=1 / math.sqrt(case.head_dim))
    np.testing.assert_allclose(to_bshd4(out, case), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse[None] if case.three_d else lse, want_lse, rtol=1e-12,
                               atol=1e-12)


def _zero_padded(x: np.ndarray, width: int) -> np.ndarray:
    """`x` with zero columns appended to its last axis, up to `width`."""
    return np.concatenate([x, np.zeros((*x.shape[:-1], width - x.shape[-1]))], axis=-1)


@pytest.mark.parametrize("modified", [False, True], ids=["plain", "every-modification"])
@pytest.mark.parametrize("d, dv", [(6, 3), (3, 6)], ids=["Dv<D", "Dv>D"])
def test_value_head_dim_of_its_own_is_zero_padding(d: int, dv: int, modified: bool):
    # Zero columns added to q and k leave the scores as they are, and zero columns of v give zero
    # columns of out: the problem with Dv != D is the first columns of one with a single head
    # dim, forward and every gradient (the plain path and the modifications' own oracle).
    rng = np.random.default_rng(17)
    q, dout = rng.standard_normal((2, 5, 4, d)), rng.standard_normal((2, 5, 4, dv))
    k, v = rng.standard_normal((2, 7, 2, d)), rng.standard_normal((2, 7, 2, dv))
    opts = {"causal": True, "scale": 0.4}
    if modified:
        opts |= {"softcap": 3.0, "alibi_slopes": rng.random(4), "sinks": rng.standard_normal(4),
                 "bias": rng.standard_normal((4, 5, 7)), "mask": rng.random((5, 7)) < 0.8}
    width = max(d, dv)
    out, lse = reference.attention(q, k, v, return_lse=True, **opts)
    out_p, lse_p = reference.attention(*(_zero_padded(x, width) for x in (q, k, v)),
                                       return_lse=True, **opts)
    assert out.shape == (2, 5, 4, dv)
    np.testing.assert_allclose(out, out_p[..., :dv], rtol=1e-12, atol=1e-13)
    assert not out_p[..., dv:].any()
    np.testing.assert_allclose(lse, lse_p, rtol=1e-12, atol=1e-13)
    grads = reference.attention_grads(dout, q, k, v, **opts)
    padded = reference.attention_grads(*(_zero_padded(x, width) for x in (dout, q, k, v)),
                                       **opts)
    assert set(grads) == ({"q", "k", "v", "bias", "sinks"} if modified else {"q", "k", "v"})
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert grads[name].shape == x.shape, name
        np.testing.assert_allclose(grads[name], padded[name][..., :x.shape[-1]], rtol=1e-10,
                                   atol=1e-12, err_msg=name)
    for name in set(grads) - {"q", "k", "v"}:
        np.testing.assert_allclose(grads[name], padded[name], rtol=1e-10, atol=1e-12,
                                   err_msg=name)


def test_single_key_gives_its_value():
    q, k, v = _random(2, 5, 6, 8), _random(2, 1, 3, 8), _random(2, 1, 3, 8)
    out = reference.attention(q, k, v)
    np.testing.assert_allclose(out, np.repeat(v, 5, axis=1).repeat(2, axis=2), rtol=1e-15)


def test_identical_keys_give_mean_of_values():
    k = np.broadcast_to(_random(1, 1, 2, 16), (1, 9, 2, 16))
    v = _random(1, 9, 2, 16)
    out = reference.attention(_random(1, 4, 2, 16), k, v)
    np.testing.assert_allclose(
        out, np.broadcast_to(v.mean(axis=1, keepdims=True), out.shape), rtol=1e-13
    )


def test_causal_square_matches_triangular_mask():
    q, k, v = _random(1, 7, 1, 4), _random(1, 7, 1, 4), _random(1, 7, 1, 4)
    s = q[0, :, 0] @ k[0, :, 0].T / 2.0
    s[np.triu_indices(7, 1)] = -np.inf
    p = np.exp(s - s.max(axis=1, keepdims=True))
    want = (p / p.sum(axis=1, keepdims=True)) @ v[0, :, 0]
    np.testing.assert_allclose(reference.attention(q, k, v, causal=True)[0, :, 0], want, rtol=1e-13)
    np.testing.assert_array_equal(reference.attention(q, k, v, causal=True)[0, 0], v[0, 0])


def test_causal_is_bottom_right_aligned():
    q, k, v = _random(1, 2, 1, 4), _random(1, 5, 1, 4), _random(1, 5, 1, 4)
    out = reference.attention(q, k, v, causal=True)
    # The last query sees every key; the one before it all but the last.
    np.testing.assert_allclose(out[:, 1], reference.attention(q[:, 1:], k, v)[:, 0], rtol=1e-14)
    np.testing.assert_allclose(
        out[:, 0], reference.attention(q[:, :1], k[:, :4], v[:, :4])[:, 0], rtol=1e-14
    )


def test_rows_that_see_no_key_give_zero_and_minus_inf():
    q, k, v = _random(2, 6, 2, 8), _random(2, 4, 1, 8), _random(2, 4, 1, 8)
    out, lse = reference.attention(q, k, v, causal=True, return_lse=True)
    assert np.all(out[:, :2] == 0) and np.all(np.isneginf(lse[:, :, :2]))
    assert np.all(np.isfinite(lse[:, :, 2:])) and not np.isnan(out).any()
    dq, dk, dv = reference.attention_backward(
        np.where(np.arange(6)[:, None, None] < 2, _random(2, 6, 2, 8), 0), q, k, v, causal=True
    )
    assert not (dq.any() or dk.any() or dv.any())


@pytest.mark.parametrize("sq, sk", [(0, 5), (5, 0), (0, 0), (1, 1)], ids=lambda n: str(n))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_empty_and_single_lengths(sq: int, sk: int, causal: bool):
    q, k, v = _random(2, sq, 4, 8), _random(2, sk, 2, 8), _random(2, sk, 2, 8)
    out, lse = reference.attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 4, sq)
    if sk == 0:
        assert np.all(out == 0) and np.all(np.isneginf(lse))
    grads = reference.attention_backward(_random(*q.shape), q, k, v, causal=causal)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert all(np.isfinite(g).all() for g in grads)


def test_lse_is_logsumexp_of_scaled_scores():
    q, k, v = _random(1, 3, 1, 5), _random(1, 4, 1, 5), _random(1, 4, 1, 5)
    _, lse = reference.attention(q, k, v, scale=0.7, return_lse=True)
    s = 0.7 * q[0, :, 0] @ k[0, :, 0].T
    np.testing.assert_allclose(lse[0, 0], np.log(np.exp(s).sum(axis=1)), rtol=1e-14)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = _random(1, 3, 2, 9), _random(1, 6, 2, 9), _random(1, 6, 2, 9)
    np.testing.assert_array_equal(
        reference.attention(q, k, v), reference.attention(q, k, v, scale=1 / 3)
    )


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_layouts_and_ranks_agree(causal: bool):
    q, k, v = _random(1, 5, 4, 6), _random(1, 7, 2, 6), _random(1, 7, 2, 6)
    out, lse = reference.attention(q, k, v, causal=causal, return_lse=True)
    t = [x.swapaxes(1, 2) for x in (q, k, v)]
    out_t, lse_t = reference.attention(*t, causal=causal, layout="bhsd", return_lse=True)
    np.testing.assert_array_equal(out_t.swapaxes(1, 2), out)
    np.testing.assert_array_equal(lse_t, lse)
    out_3, lse_3 = reference.attention(
        *(x[0] for x in t), causal=causal, layout="bhsd", return_lse=True
    )
    np.testing.assert_array_equal(out_3, out_t[0])
    np.testing.assert_array_equal(lse_3, lse[0])
    grads = reference.attention_backward(out, q, k, v, causal=causal)
    grads_3 = reference.attention_backward(
        out_t[0], *(x[0] for x in t), causal=causal, layout="bhsd"
    )
    for g, g3 in zip(grads, grads_3, strict=True):
        np.testing.assert_array_equal(g3, g[0].swapaxes(0, 1))


def test_gqa_equals_repeated_kv_heads():
    q, k, v = _random(2, 5, 6, 4), _random(2, 7, 2, 4), _random(2, 7, 2, 4)
    k_rep, v_rep = (np.repeat(x, 3, axis=2) for x in (k, v))
    np.testing.assert_array_equal(
        reference.attention(q, k, v), reference.attention(q, k_rep, v_rep)
    )
    dout = _random(2, 5, 6, 4)
    dq, dk, dv = reference.attention_backward(dout, q, k, v)
    dq_r, dk_r, dv_r = reference.attention_backward(dout, q, k_rep, v_rep)
    np.testing.assert_allclose(dq, dq_r, rtol=1e-14)
    np.testing.assert_allclose(dk, dk_r.reshape(2, 7, 2, 3, 4).sum(axis=3), rtol=1e-12)
    np.testing.assert_allclose(dv, dv_r.reshape(2, 7, 2, 3, 4).sum(axis=3), rtol=1e-12)


@pytest.mark.parametrize(
    "case",
    [
        Case(1, 3, 4, 2, 1, 3, causal=False),
        Case(1, 4, 3, 2, 2, 3, causal=True),  # first row sees no key
        Case(2, 3, 3, 3, 1, 2, causal=True, layout="bhsd"),
        Case(1, 2, 5, 4, 2, 3, causal=True, three_d=True),
        Case(1, 3, 4, 2, 1, 3, head_dim_v=5, causal=True),  # v's own head dim
        Case(1, 4, 3, 2, 2, 4, head_dim_v=1, causal=True, layout="bhsd", three_d=True),
    ],
    ids=lambda c: c.id,
)
def test_backward_matches_finite_differences(case: Case):
    q, k, v = make_inputs(case, np, seed=7)
    dout = make_dout(case, np, seed=7)
    opts = {"causal": case.causal, "layout": case.layout, "scale": 0.8}

    def loss(q, k, v):
        return float(np.sum(reference.attention(q, k, v, **opts) * dout))

    grads = reference.attention_backward(dout, q, k, v, **opts)
    h = 1e-6
    args = [np.array(x, dtype=np.float64) for x in (q, k, v)]
    for name, arg, grad in zip("qkv", args, grads, strict=True):
        numeric = np.zeros_like(arg)
        for idx in np.ndindex(arg.shape):
            saved = arg[idx]
            arg[idx] = saved + h
            up = loss(*args)
            arg[idx] = saved - h
            down = loss(*args)
            arg[idx] = saved
            numeric[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=f"d{name}")


def test_accepts_dtypes_sequences_and_dlpack_objects():
    q, k, v = _random(1, 3, 2, 4), _random(1, 3, 2, 4), _random(1, 3, 2, 4)
    want = reference.attention(q, k, v)

    class DLPackOnly:  # what a foreign CPU framework's tensor offers
        def __init__(self, x):
            self._x = x

        def __dlpack__(self, **kwargs):
            return self._x.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self._x.__dlpack_device__()

    np.testing.assert_array_equal(reference.attention(*(DLPackOnly(x) for x in (q, k, v))), want)
    np.testing.assert_array_equal(reference.attention(q.tolist(), k.tolist(), v.tolist()), want)
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    got = reference.attention(q32, k32, v32)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(
        got, reference.attention(*(x.astype(np.float64) for x in (q32, k32, v32)))
    )


def test_accepts_torch_cpu_tensors():
    torch = pytest.importorskip("torch")
    q, k, v = _random(1, 3, 2, 4), _random(1, 5, 1, 4), _random(1, 5, 1, 4)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    np.testing.assert_array_equal(
        reference.attention(tq, tk, tv, causal=True), reference.attention(q, k, v, causal=True)
    )
    bq, bk, bv = (t.detach().to(torch.bfloat16) for t in (tq, tk, tv))
    with pytest.raises(TypeError, match="q: cannot read Tensor"):
        reference.attention(bq, bk, bv)


def test_accepts_jax_cpu_arrays():
    jnp = pytest.importorskip("jax.numpy")
    q, k, v = _random(1, 3, 2, 4), _random(1, 5, 1, 4), _random(1, 5, 1, 4)
    want = reference.attention(q, k, v).astype(np.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        got = reference.attention(*(jnp.asarray(x, dtype=dtype) for x in (q, k, v)))
        np.testing.assert_allclose(got, want, atol=0.05 if dtype == jnp.bfloat16 else 1e-6)


def test_inputs_are_not_modified():
    case = Case(2, 9, 9, 2, 2, 8, causal=True, view="qkv_packed")
    q, k, v = make_inputs(case, np, seed=3)
    dout = make_dout(case, np, seed=3)
    before = [x.copy() for x in (q, k, v, dout)]
    reference.attention(q, k, v, causal=True, return_lse=True)
    reference.attention_backward(dout, q, k, v, causal=True)
    for x, y in zip((q, k, v, dout), before, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layout": "sbhd"}, "layout must be one of"),
        ({"v": _random(1, 4, 2, 4)}, r"v: expected the same shape as k \(1, 5, 2, 4\)"),
        ({"v": _random(1, 5, 1, 4)}, r"v: expected the same shape as k .* got \(1, 5, 1, 4\)"),
        ({"v": _random(1, 5, 2, 0)}, r"v: the head dim must be at least 1"),
        ({"k": _random(1, 5, 2, 3)}, "agree on batch and head dim"),
        (
            {"k": _random(1, 5, 3, 4), "v": _random(1, 5, 3, 4)},
            "multiple of the number of kv heads",
        ),
        ({"k": _random(2, 5, 2, 4), "v": _random(2, 5, 2, 4)}, "agree on batch and head dim"),
        ({"v": _random(5, 2, 4)}, "v must be 4-D like q"),
    ],
    ids=["layout", "v-seqlen", "v-heads", "v-head-dim-0", "k-head-dim", "heads", "batch",
         "rank"],
)
def test_bad_shapes_raise_value_error(kwargs, match):
    args = {"q": _random(1, 3, 4, 4), "k": _random(1, 5, 2, 4), "v": _random(1, 5, 2, 4)}
    args.update(kwargs)
    layout = args.pop("layout", "bshd")
    with pytest.raises(ValueError, match=match):
        reference.attention(**args, layout=layout)


def test_backward_checks_dout_shape():
    q, k, v = _random(1, 3, 2, 4), _random(1, 5, 2, 4), _random(1, 5, 2, 4)
    with pytest.raises(ValueError, match="dout has shape"):
        reference.attention_backward(_random(1, 3, 2, 5), q, k, v)
    # With v's own head dim, dout is shaped like the output, not like q.
    v6 = _random(1, 5, 2, 6)
    with pytest.raises(ValueError, match=r"dout has shape \(1, 3, 2, 4\); expected the "
                                         r"output's shape \(1, 3, 2, 6\)"):
        reference.attention_backward(q, q, k, v6)
    dq, dk, dv = reference.attention_backward(_random(1, 3, 2, 6), q, k, v6)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v6.shape)


@pytest.mark.parametrize("scale", [0, 0.0, -0.5, math.nan, math.inf])
def test_scale_must_be_finite_and_positive(scale):
    q, k, v = _random(1, 3, 2, 4), _random(1, 5, 2, 4), _random(1, 5, 2, 4)
    with pytest.raises(ValueError, match="scale: expected a finite number > 0"):
        reference.attention(q, k, v, scale=scale)
    with pytest.raises(ValueError, match="scale: expected a finite number > 0"):
        reference.attention_backward(q, q, k, v, scale=scale)


@pytest.mark.parametrize("scale", ["0.5", True, 1j], ids=["str", "bool", "complex"])
def test_scale_must_be_a_real_number(scale):
    q, k, v = _random(1, 3, 2, 4), _random(1, 5, 2, 4), _random(1, 5, 2, 4)
    with pytest.raises(TypeError, match="scale: expected a real number"):
        reference.attention(q, k, v, scale=scale)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_complex_input_is_refused(name):
    args = {"q": _random(1, 3, 2, 4), "k": _random(1, 5, 2, 4), "v": _random(1, 5, 2, 4)}
    args[name] = args[name] + 1j
    with pytest.raises(TypeError, match=f"{name}: expected real values, got complex"):
        reference.attention(**args)
    dout = args["q"].real if name != "q" else _random(1, 3, 2, 4)
    with pytest.raises(TypeError, match=f"{name}: expected real values, got complex"):
        reference.attention_backward(dout, **args)


def test_masked_input_is_refused():
    q, k, v = _random(1, 3, 2, 4), _random(1, 5, 2, 4), _random(1, 5, 2, 4)
    masked = np.ma.masked_array(k, mask=np.zeros(k.shape, bool))
    with pytest.raises(TypeError, match=r"k: expected a plain array, got a numpy\.ma\.MaskedArray"):
        reference.attention(q, masked, v)
