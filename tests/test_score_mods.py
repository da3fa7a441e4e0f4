"""Score modifications on the CPU path, logit soft-capping (``softcap``), ALiBi
(``alibi_slopes``), attention sinks (``sinks``), an additive ``bias`` (the last two with their
gradients) and a boolean ``mask``, alone and together:
forward and backward against the float64 oracle by the accuracy rule, through NumPy and through
torch autograd (the autograd node and the custom op); argument validation; the variant they make;
and the refusal on CUDA, where the kernels do not compute them yet."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import _checks, reference
from cuflash._variant import Variant
from tests.accuracy import (
    EPS,
    assert_matches_reference,
    backward_eps,
    naive_attention,
    naive_attention_backward,
    naive_bias_gradient,
    naive_sinks_gradient,
)
from tests.strategies import examples

BAD_SLOPES = [
    (np.ones(4, np.int32), TypeError, "dtype float32 or float64"),
    (np.ones(4, np.float16), TypeError, "dtype float32 or float64"),
    ([0.1, 0.2, 0.3, 0.4], TypeError, "alibi_slopes"),
    (np.ma.masked_array(np.ones(4, np.float32)), TypeError, "alibi_slopes"),
    (np.ones(3, np.float32), ValueError, r"shape \(4,\) or \(1, 4\)"),
    (np.ones((2, 4), np.float32), ValueError, r"shape \(4,\) or \(1, 4\)"),
    (np.array([0.1, np.nan, 0.1, 0.1], np.float32), ValueError, "finite"),
]

BAD_SOFTCAPS = [
    (True, TypeError, "real number"),
    ("1", TypeError, "real number"),
    (None, TypeError, "real number"),
    (-0.5, ValueError, ">= 0"),
    (float("nan"), ValueError, ">= 0"),
    (float("inf"), ValueError, ">= 0"),
    (1e39, ValueError, "at most"),
]


def _inputs(rng, b, sq, sk, hq, hkv, d, dtype, spread):
    q = (rng.standard_normal((b, sq, hq, d)) * spread).astype(dtype)
    k = (rng.standard_normal((b, sk, hkv, d)) * spread).astype(dtype)
    v = rng.standard_normal((b, sk, hkv, d)).astype(dtype)
    return q, k, v


@settings(max_examples=examples(80), deadline=None)
@given(data=st.data())
def test_score_mods_match_the_reference(data):
    """Random shapes, GQA, masks, scales, caps (from tight, where most scores saturate, to
    loose; or none) and ALiBi slopes (per head or per batch and head; or none), every CPU dtype:
    out, lse, dq, dk, dv by the accuracy rule."""
    draw = data.draw
    dtype = draw(st.sampled_from(["float16", "float32", "float64"]))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    b, sq, sk = draw(st.integers(1, 2)), draw(st.integers(0, 40)), draw(st.integers(0, 40))
    d = draw(st.sampled_from([1, 8, 16, 33]))
    mask = draw(st.sampled_from([{}, {"causal": True},
                                 {"window": (draw(st.integers(-1, 9)), draw(st.integers(-1, 9)))}]))
    softcap = draw(st.sampled_from([0.0, 0.3, 1.0, 5.0, 50.0]))
    alibi = draw(st.sampled_from([None, (hq,), (b, hq)]))
    with_sinks = draw(st.booleans())
    bias_shape = draw(st.sampled_from([None, (b, hq, sq, sk), (hq, 1, sk), (1, 1, sq, 1), (sk,)]))
    mask_shape = draw(st.sampled_from([None, (b, 1, sq, sk), (sq, sk)]))
    if softcap == 0.0 and alibi is None and not with_sinks and bias_shape is None:
        softcap = 1.0
    scale = draw(st.sampled_from([None, 0.2, 1.7]))
    spread = draw(st.sampled_from([1.0, 4.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, k, v = _inputs(rng, b, sq, sk, hq, hkv, d, dtype, spread)
    dout = rng.standard_normal(q.shape).astype(dtype)
    slopes = None if alibi is None else rng.uniform(0.0, 1.0, alibi).astype(np.float32)
    sinks = (rng.standard_normal(hq) * 3).astype(np.float32) if with_sinks else None
    bias = None if bias_shape is None else (rng.standard_normal(bias_shape) * 2).astype(dtype)
    keep = None if mask_shape is None else rng.random(mask_shape) < 0.7
    opts = {**mask, "scale": scale, "softcap": softcap, "alibi_slopes": slopes, "sinks": sinks,
            "bias": bias, "mask": keep}

    out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    ref, ref_lse = reference.attention(q64, k64, v64, return_lse=True, **opts)
    s = 1.0 / np.sqrt(d) if scale is None else scale
    naive_opts = {"causal": mask.get("causal", False), "window": mask.get("window"), "scale": s,
                  "softcap": softcap, "alibi_slopes": slopes, "sinks": sinks, "bias": bias,
                  "mask": keep}
    naive, naive_lse = naive_attention(q64, k64, v64, dtype=dtype, **naive_opts)
    assert_matches_reference("out", out, ref, naive, dtype=dtype)
    assert_matches_reference("lse", lse, ref_lse, naive_lse, dtype="float32")

    grads = cuflash.attention_backward(dout, q, k, v, out, lse, return_dsinks=with_sinks,
                                       return_dbias=bias is not None, **opts)
    refs = reference.attention_grads(do64, q64, k64, v64, **opts)
    naives = naive_attention_backward(do64, q64, k64, v64, dtype=dtype, **naive_opts)
    eps = backward_eps(do64, q64, k64, v64, dtype=dtype, **naive_opts)
    for name, g, n, e in zip(("dq", "dk", "dv"), grads, naives, eps, strict=False):
        assert_matches_reference(name, g, refs[name[1:]], n, dtype=dtype, eps=e)
    if with_sinks:
        assert grads[3].dtype == np.float32 and grads[3].shape == (hq,)
        naive_dsinks = naive_sinks_gradient(do64, q64, k64, v64, dtype=dtype, **naive_opts)
        # |dsinks_h| <= sum over rows of p_sink * |delta|: the rule's floor scales with it.
        floor = max(1.0, float(np.sum(np.abs(do64)) * np.max(np.abs(ref), initial=0.0)))
        sink_dtype = "float32" if dtype == "float64" else dtype  # dsinks come back as float32
        assert_matches_reference("dsinks", grads[3], refs["sinks"], naive_dsinks,
                                 dtype=sink_dtype, eps=EPS[sink_dtype] * floor)
    if bias is not None:
        dbias = grads[-1]
        assert dbias.dtype == bias.dtype and dbias.shape == bias.shape
        naive_dbias = naive_bias_gradient(do64, q64, k64, v64, dtype=dtype, **naive_opts)
        # |dS| <= p * (|dP| + |delta|), |dP| <= sum |dout| |v|: the floor scales with that sum.
        floor = max(1.0, 2 * float(np.sum(np.abs(do64))) * float(np.max(np.abs(v64), initial=0)))
        assert_matches_reference("dbias", dbias, refs["bias"], naive_dbias, dtype=dtype,
                                 eps=EPS[dtype] * floor)


def test_softcap_changes_the_result_and_bounds_the_scores():
    """A tight cap differs from no cap; every capped score lies in (-cap, cap), so lse is at most
    cap + log(Sk) (a check that cannot pass by ignoring the argument)."""
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, 1, 20, 30, 2, 2, 16, np.float64, 5.0)
    plain, plain_lse = cuflash.attention(q, k, v, return_lse=True)
    capped, capped_lse = cuflash.attention(q, k, v, softcap=0.5, return_lse=True)
    assert np.max(np.abs(plain - capped)) > 1e-2
    assert np.all(capped_lse <= 0.5 + np.log(30) + 1e-12)
    assert np.any(plain_lse > 0.5 + np.log(30))


def test_alibi_penalises_distant_keys():
    """With equal scores (q = 0) the weights follow ALiBi alone: each row's are
    softmax(-slope * distance), largest on its diagonal key (a check that cannot pass by ignoring
    the slopes), and zero slopes are no ALiBi bit for bit."""
    rng = np.random.default_rng(6)
    v = np.eye(10)[None, :, None, :].repeat(2, axis=2)  # out = the weights themselves
    q = np.zeros((1, 6, 2, 10))
    k = rng.standard_normal((1, 10, 2, 10))
    slopes = np.array([0.5, 2.0])
    out = cuflash.attention(q, k, v, alibi_slopes=slopes)
    distance = np.abs(np.arange(6)[:, None] + 4 - np.arange(10)[None, :])
    for h, slope in enumerate(slopes):
        want = np.exp(-slope * distance)
        want /= want.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(out[0, :, h], want, rtol=1e-12, atol=1e-15)
        assert np.all(out[0, :, h].argmax(axis=1) == np.arange(6) + 4)
    np.testing.assert_array_equal(cuflash.attention(q, k, v, alibi_slopes=np.zeros(2)),
                                  cuflash.attention(q, k, v))


def test_sinks_take_weight_and_fill_blind_rows():
    """A sink adds exp(sink) to every row's denominator: with one key per row, out = v *
    e^s / (e^s + e^sink) exactly; a row that sees no key gets zeros and lse = its head's sink."""
    q = np.ones((1, 3, 2, 1))
    k = np.full((1, 1, 2, 1), 2.0)
    v = np.full((1, 1, 2, 1), 5.0)
    sinks = np.array([1.0, -3.0])
    # causal with Sq 3 > Sk 1: rows 0 and 1 see no key, row 2 sees key 0 with score 2 * scale.
    out, lse = cuflash.attention(q, k, v, causal=True, sinks=sinks, scale=1.0, return_lse=True)
    for h, sink in enumerate(sinks):
        np.testing.assert_array_equal(out[0, :2, h], 0.0)
        np.testing.assert_array_equal(lse[0, h, :2], np.float32(sink))
        want = 5.0 * np.exp(2.0) / (np.exp(2.0) + np.exp(sink))
        np.testing.assert_allclose(out[0, 2, h, 0], want, rtol=1e-14)
        np.testing.assert_allclose(lse[0, h, 2], np.logaddexp(2.0, sink), rtol=1e-7)


def test_return_dsinks_needs_sinks_and_a_flag():
    q, k, v = _inputs(np.random.default_rng(0), 1, 4, 4, 2, 2, 8, np.float32, 1.0)
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"^return_dsinks: True needs sinks"):
        cuflash.attention_backward(out, q, k, v, out, lse, return_dsinks=True)
    with pytest.raises(TypeError, match=r"^return_dsinks: expected True or False"):
        cuflash.attention_backward(out, q, k, v, out, lse, sinks=np.zeros(2, np.float32),
                                   return_dsinks=1)
    grads = cuflash.attention_backward(out, q, k, v, out, lse, sinks=np.zeros(2, np.float32))
    assert len(grads) == 3


def test_softcap_zero_is_no_cap_bit_for_bit():
    rng = np.random.default_rng(4)
    q, k, v = _inputs(rng, 2, 11, 17, 4, 2, 8, np.float32, 1.0)
    for mask in ({}, {"causal": True}, {"window": (3, 1)}):
        np.testing.assert_array_equal(cuflash.attention(q, k, v, softcap=0.0, **mask),
                                      cuflash.attention(q, k, v, **mask))


def test_score_mods_through_torch_autograd_on_the_cpu():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, 1, 9, 12, 4, 2, 8, np.float64, 3.0)
    dout = rng.standard_normal(q.shape)
    leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    slopes = np.array([0.25, 0.5, 1.0, 2.0])
    sinks = np.array([0.5, -1.0, 2.0, 0.0])
    mods = {"causal": True, "softcap": 1.5, "alibi_slopes": slopes, "sinks": sinks}
    bias = rng.standard_normal((4, 1, 12))
    keep = rng.random((9, 12)) < 0.8
    mods |= {"bias": bias, "mask": keep}
    sink_leaf = torch.tensor(sinks, requires_grad=True)
    bias_leaf = torch.tensor(bias, requires_grad=True)
    refs = reference.attention_grads(dout, q, k, v, **mods)
    call = {"causal": True, "softcap": 1.5, "alibi_slopes": torch.tensor(slopes),
            "sinks": sink_leaf, "bias": bias_leaf, "mask": torch.tensor(keep)}
    ops = torch.ops.cuflash

    def op_entry(q, k, v, **options):  # the custom op (what torch.compile traces) and its grads
        return ops.attention_fwd(q, k, v, True, None, "bshd", -1, 0, 1.5,
                                 options["alibi_slopes"], options["sinks"], options["bias"],
                                 options["mask"])[0]

    for entry in (cuflash.attention, cuflash.torch.attention, op_entry):
        for x in (*leaves, sink_leaf, bias_leaf):
            x.grad = None
        out = entry(*leaves, **call)
        out.backward(torch.tensor(dout))
        np.testing.assert_allclose(out.detach().numpy(), reference.attention(q, k, v, **mods),
                                   rtol=0, atol=1e-12)
        for x, name in zip((*leaves, sink_leaf, bias_leaf), ("q", "k", "v", "sinks", "bias"),
                           strict=True):
            np.testing.assert_allclose(x.grad.numpy(), refs[name], rtol=0, atol=1e-12)


@pytest.mark.parametrize("softcap, error, words", BAD_SOFTCAPS)
def test_bad_softcap_is_refused_naming_it(softcap, error, words):
    q, k, v = _inputs(np.random.default_rng(0), 1, 4, 4, 2, 2, 8, np.float32, 1.0)
    out = np.zeros_like(q)
    for call in (lambda: cuflash.attention(q, k, v, softcap=softcap),
                 lambda: cuflash.attention_backward(out, q, k, v, out,
                                                    np.zeros((1, 2, 4), np.float32),
                                                    softcap=softcap),
                 lambda: Variant.of(softcap=softcap)):
        with pytest.raises(error, match=words) as raised:
            call()
        assert str(raised.value).startswith("softcap: ")


@pytest.mark.parametrize("slopes, error, words", BAD_SLOPES)
def test_bad_alibi_slopes_are_refused_naming_them(slopes, error, words):
    q, k, v = _inputs(np.random.default_rng(0), 1, 4, 4, 4, 2, 8, np.float32, 1.0)
    out = np.zeros_like(q)
    for call in (lambda: cuflash.attention(q, k, v, alibi_slopes=slopes),
                 lambda: cuflash.attention_backward(out, q, k, v, out,
                                                    np.zeros((1, 4, 4), np.float32),
                                                    alibi_slopes=slopes)):
        with pytest.raises(error, match=words) as raised:
            call()
        assert str(raised.value).startswith("alibi_slopes: ")


def test_alibi_slopes_of_another_framework_are_refused():
    torch = pytest.importorskip("torch")
    q, k, v = _inputs(np.random.default_rng(0), 1, 4, 4, 2, 2, 8, np.float32, 1.0)
    with pytest.raises(TypeError, match=r"^alibi_slopes: expected a NumPy array or an array of q"):
        cuflash.attention(q, k, v, alibi_slopes=torch.ones(2))
    # NumPy slopes are fine with torch CPU tensors.
    out = cuflash.attention(torch.tensor(q), torch.tensor(k), torch.tensor(v),
                            alibi_slopes=np.array([0.5, 1.0], np.float32))
    np.testing.assert_allclose(out.numpy(), cuflash.attention(
        q, k, v, alibi_slopes=np.array([0.5, 1.0], np.float32)), rtol=0, atol=0)


@pytest.mark.parametrize("sinks, error, words", [
    (np.ones(3, np.float32), ValueError, r"shape \(4,\) \(Hq\)"),
    (np.ones((1, 4), np.float32), ValueError, r"shape \(4,\) \(Hq\)"),
    (np.ones(4, np.int64), TypeError, "dtype float32 or float64"),
    (np.array([0, 0, np.inf, 0], np.float32), ValueError, "finite"),
    ([0.0] * 4, TypeError, "sinks"),
])
def test_bad_sinks_are_refused_naming_them(sinks, error, words):
    q, k, v = _inputs(np.random.default_rng(0), 1, 4, 4, 4, 2, 8, np.float32, 1.0)
    with pytest.raises(error, match=words) as raised:
        cuflash.attention(q, k, v, sinks=sinks)
    assert str(raised.value).startswith("sinks: ")


@pytest.mark.parametrize("name, x, error, words", [
    ("bias", np.zeros((3, 5)), ValueError, r"broadcastable to \(B, Hq, Sq, Sk\) = \(1, 4, 6, 5\)"),
    ("bias", np.zeros((1, 1, 1, 1, 5)), ValueError, "broadcastable"),
    ("bias", np.zeros((6, 5), np.int32), TypeError, "dtype float16 or float32 or float64"),
    ("bias", [[0.0] * 5] * 6, TypeError, "bias"),
    ("mask", np.ones((6, 5), np.float32), TypeError, "dtype bool"),
    ("mask", np.ones((2, 6, 5), bool), ValueError, "broadcastable"),
])
def test_bad_bias_and_mask_are_refused_naming_them(name, x, error, words):
    q = np.zeros((1, 6, 4, 8), np.float32)
    k = v = np.zeros((1, 5, 2, 8), np.float32)
    with pytest.raises(error, match=words) as raised:
        cuflash.attention(q, k, v, **{name: x})
    assert str(raised.value).startswith(f"{name}: ")


def test_a_mask_hiding_whole_rows_gives_zeros_and_the_bias_is_not_copied_or_written():
    rng = np.random.default_rng(8)
    q, k, v = _inputs(rng, 1, 5, 7, 2, 1, 8, np.float64, 1.0)
    keep = np.ones((5, 7), bool)
    keep[1] = keep[3] = False
    bias = rng.standard_normal((5, 7))
    before = bias.copy()
    out, lse = cuflash.attention(q, k, v, mask=keep, bias=bias, return_lse=True)
    assert np.all(out[0, [1, 3]] == 0) and np.all(np.isneginf(lse[0, :, [1, 3]]))
    np.testing.assert_array_equal(bias, before)
    ref = reference.attention(q, k, v, mask=keep, bias=bias)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-13)


def test_return_dbias_needs_a_bias():
    q, k, v = _inputs(np.random.default_rng(0), 1, 4, 4, 2, 2, 8, np.float32, 1.0)
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"^return_dbias: True needs bias"):
        cuflash.attention_backward(out, q, k, v, out, lse, return_dbias=True)


def test_variant_keeps_the_cap_with_every_mask():
    assert Variant.of(softcap=2) == Variant("none", softcap=2.0)
    assert Variant.of(causal=True, softcap=2) == Variant("causal", -1, 0, 2.0)
    assert Variant.of(window=(3, 1), softcap=np.float32(2)) == Variant("window", 3, 1, 2.0)
    assert Variant.of(causal=True).softcap == 0.0
    assert Variant.of(causal=True, alibi=True) == Variant("causal", -1, 0, 0.0, True)
    assert Variant.of(sinks=True) == Variant("none", sinks=True)


def test_score_mods_on_cuda_alone_and_together():
    """Every modification runs through the CUDA kernels, alone and (but for the softcap)
    together; a softcap together with ALiBi, a bias or a mask is refused on CUDA, naming
    both."""
    from tests.gpu_support import gpu_skip_reason

    reason = gpu_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    import cupy

    q, k, v = (cupy.asarray(x) for x in _inputs(np.random.default_rng(0), 1, 8, 8, 2, 2, 16,
                                                np.float32, 1.0))
    slopes = cupy.ones(2, cupy.float32)
    extras = ({"softcap": 1.0}, {"sinks": cupy.zeros(2, cupy.float32)},
              {"alibi_slopes": slopes}, {"bias": cupy.zeros((8, 8), cupy.float32)},
              {"mask": cupy.ones((8, 8), bool)})
    assert cuflash.attention(q, k, v, sinks=cupy.zeros(2, cupy.float32), alibi_slopes=slopes,
                             bias=cupy.zeros((8, 8)), mask=cupy.ones((8, 8), bool)).shape == \
        q.shape
    with pytest.raises(NotImplementedError, match=r"^softcap: the CUDA kernels do not combine "
                                                  r"a softcap with bias, mask yet"):
        cuflash.attention(q, k, v, softcap=1.0, bias=cupy.zeros((8, 8)),
                          mask=cupy.ones((8, 8), bool))
    for extra in extras:
        assert cuflash.attention(q, k, v, **extra).shape == q.shape


def test_a_softcap_with_the_run_time_modifications_is_refused_on_cuda_naming_both():
    _checks.refuse_capped_mods_on_cuda(0.0, True, True, True, "CUDA inputs")  # no cap
    _checks.refuse_capped_mods_on_cuda(2.0, False, False, False, "CUDA inputs")  # cap alone
    with pytest.raises(NotImplementedError, match=r"^softcap: the CUDA kernels do not combine a "
                                                  r"softcap with alibi_slopes, mask yet \(got "
                                                  r"both for CUDA inputs\); the CPU path"):
        _checks.refuse_capped_mods_on_cuda(2.0, True, False, True, "CUDA inputs")


def test_the_run_time_modifications_take_two_kernel_kinds():
    """ALiBi alone is the lean "alibi" kind; a bias or a mask array, with or without ALiBi,
    is "mods"; both read the modifications' arrays."""
    assert Variant.of().score == "none" and Variant.of(softcap=1.0).score == "softcap"
    assert Variant.of(causal=True, alibi=True).score == "alibi"
    for flags in ({"bias": True}, {"mask_array": True}, {"alibi": True, "bias": True},
                  {"alibi": True, "bias": True, "mask_array": True}):
        assert Variant.of(causal=True, **flags).score == "mods"
    assert all(Variant.of(**f).reads_arrays for f in ({"alibi": True}, {"mask_array": True}))
    assert not Variant.of(softcap=2.0, sinks=True).reads_arrays


def test_mods_give_the_kernels_broadcast_strides():
    """The bias's and the mask's (B, H, Sq, Sk) strides in elements, 0 along broadcast axes, and
    the bias's itemsize, as the parameter blocks take them (no block map: its fields zero)."""
    from cuflash.cuda._launch_common import NO_MODS, Mods

    bias = np.broadcast_to(np.zeros((3, 1, 5), np.float16), (2, 3, 4, 5))
    mask = np.broadcast_to(np.ones((4, 5), bool), (2, 3, 4, 5))
    assert Mods(bias=bias, mask=mask).fields() == {
        "bias_dtype": 2, "bias_batch_stride": 0, "bias_head_stride": 5, "bias_row_stride": 0,
        "bias_col_stride": 1, "mask_batch_stride": 0, "mask_head_stride": 0,
        "mask_row_stride": 5, "mask_col_stride": 1, "block_map": 0,
        "block_map_batch_stride": 0, "block_map_head_stride": 0, "block_map_rows": 0}
    strided = np.zeros((2, 3, 4, 10))[..., ::2]
    assert Mods(bias=strided).fields()["bias_col_stride"] == 2
    assert Mods(bias=strided).fields()["bias_dtype"] == 8
    assert set(NO_MODS.fields().values()) <= {0, 4}
