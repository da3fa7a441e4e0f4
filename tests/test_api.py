"""cuflash.attention / attention_backward as a caller meets them (NumPy, on the CPU).

Bad input: every class of mistake raises TypeError or ValueError before any work, naming the
argument, what was seen and what was expected. Good input: shapes, ranks, layouts, ``out=``,
``return_lse``, packed and strided views, and inputs left untouched.
"""

from __future__ import annotations

import logging
import math
import re
import types

import numpy as np
import pytest

import cuflash
from cuflash import _checks, _core, _cpu, _interop, reference

B, SQ, SK, HQ, HKV, D = 2, 7, 9, 4, 2, 16


def rand(*shape: int, dtype: str = "float32", seed: int = 0) -> np.ndarray:
    """Fresh standard-normal values (never zeros), in `dtype`."""
    return np.random.default_rng((seed, *shape)).standard_normal(shape).astype(dtype)


def qkv(dtype: str = "float32", layout: str = "bshd", batched: bool = True, seed: int = 0,
        sq: int = SQ, sk: int = SK, hq: int = HQ, hkv: int = HKV, d: int = D,
        dv: int | None = None):
    """q, k, v; v with head dim `dv` (None: `d`)."""
    def shape(s: int, h: int, d: int) -> tuple[int, ...]:
        inner = (s, h, d) if layout == "bshd" else (h, s, d)
        return (B, *inner) if batched else inner

    return (rand(*shape(sq, hq, d), dtype=dtype, seed=seed),
            rand(*shape(sk, hkv, d), dtype=dtype, seed=seed + 1),
            rand(*shape(sk, hkv, d if dv is None else dv), dtype=dtype, seed=seed + 2))


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if validation lets anything reach the compute paths."""

    def forbidden(*args, **kwargs):
        raise AssertionError("bad input reached the compute path; it must fail validation first")

    for name in ("forward_into", "backward_into"):
        monkeypatch.setattr(_core, name, forbidden)
    for name in ("forward", "backward"):
        monkeypatch.setattr(_cpu, name, forbidden)


def raises(kind: type[Exception], *fragments: str):
    """pytest.raises that also checks the message holds every fragment (literal text)."""
    return pytest.raises(kind, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (SQ, D), (B, SQ, HQ, D, 1)], ids=["0d", "2d", "5d"])
def test_wrong_ndim_of_q(no_work, shape):
    _, k, v = qkv()
    with raises(ValueError, "q:", "3 or 4 dimensions", f"got shape {shape}"):
        cuflash.attention(np.asarray(rand(*shape)), k, v)


def test_k_rank_differs_from_q(no_work):
    q, k, v = qkv()
    with raises(ValueError, "k:", "4 dimensions", str(k[0].shape)):
        cuflash.attention(q, k[0], v)


def test_batch_mismatch(no_work):
    q, k, v = qkv()
    with raises(ValueError, "k:", "batch 1", f"batch {B}", str(q.shape), str(k[:1].shape)):
        cuflash.attention(q, k[:1], v[:1])


def test_sequences_past_the_kernels_row_indices_are_refused(no_work):
    # Zero-stride views: a (1, 2^30, 1, 8) q and k cost no memory.
    q = np.broadcast_to(np.ones((1, 1, 1, 8), np.float32), (1, 2**30, 1, 8))
    with raises(ValueError, "q, k:", "seqlen_q + 2 * seqlen_k", str(2**31 - 1),
                f"{2**30} + 2 * {2**30}", str(q.shape)):
        cuflash.attention(q, q, q)


@pytest.mark.parametrize("dim", ["batch", "heads"])
def test_grid_limits_are_refused_on_cuda(dim):
    # The check runs for CUDA sources only (the CPU path has no grid); called directly here.
    big = _core.MAX_GRID_YZ + 1
    batch, heads = (big, 1) if dim == "batch" else (1, big)
    with raises(ValueError, f"q {dim}:", f"at most {_core.MAX_GRID_YZ}", f"got {big}"):
        _checks.check_sizes(batch, 16, 16, heads, True, "shapes ...")
    _checks.check_sizes(batch, 16, 16, heads, False, "shapes ...")  # the CPU path takes them


def test_head_dim_mismatch(no_work):
    q, k, v = qkv()
    with raises(ValueError, "k:", f"head dim {D - 1}", f"head dim {D}"):
        cuflash.attention(q, k[..., :-1], v[..., :-1])


@pytest.mark.parametrize("hq, hkv", [(4, 3), (2, 4), (3, 2)])
def test_query_heads_not_a_multiple_of_kv_heads(no_work, hq, hkv):
    q, k, v = qkv(hq=hq, hkv=hkv)
    with raises(ValueError, "k:", f"query heads ({hq})", f"key/value heads ({hkv})"):
        cuflash.attention(q, k, v)


def test_head_mismatch_in_bhsd_names_the_layout(no_work):
    q, k, v = qkv(layout="bhsd", hq=4, hkv=3)
    with raises(ValueError, "k:", "(4)", "(3)", "bhsd", "(B, H, S, D)"):
        cuflash.attention(q, k, v, layout="bhsd")


def test_v_shape_differs_from_k(no_work):
    q, k, v = qkv()
    with raises(ValueError, "v:", str(k.shape), str(v[:, :-1].shape)):
        cuflash.attention(q, k, v[:, :-1])


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("axis", [0, 1, 2], ids=["batch", "axis1", "axis2"])
def test_v_may_differ_from_k_in_its_last_axis_only(no_work, layout, axis):
    q, k, v = qkv(layout=layout, dv=2 * D)
    wrong = np.concatenate([v, v], axis=axis)  # one more of its other axes doubled
    with raises(ValueError, "v:", f"expected the shape of k {k.shape}", "but for the last axis",
                f"got {wrong.shape}"):
        cuflash.attention(q, k, wrong, layout=layout)
    out = np.empty((*q.shape[:-1], 2 * D), np.float32)
    with raises(ValueError, "v:", f"got {wrong.shape}"):
        cuflash.attention_backward(out, q, k, wrong, out, np.ones((B, HQ, SQ), np.float32),
                                   layout=layout)


@pytest.mark.parametrize("dv", [0, _core.MAX_HEAD_DIM + 1])
@pytest.mark.parametrize("batched", [True, False], ids=["4d", "3d"])
def test_value_head_dim_out_of_range(no_work, dv, batched):
    q, k, v = qkv(dv=dv, batched=batched)
    with raises(ValueError, "v:", "head dim (Dv)", f"1..{_core.MAX_HEAD_DIM}", f"got {dv}",
                str(v.shape)):
        cuflash.attention(q, k, v)


@pytest.mark.parametrize("d", [0, _core.MAX_HEAD_DIM + 1])
def test_head_dim_out_of_range(no_work, d):
    q, k, v = qkv(d=d)
    with raises(ValueError, "q:", f"1..{_core.MAX_HEAD_DIM}", f"got {d}"):
        cuflash.attention(q, k, v)


@pytest.mark.parametrize("name", ["k", "v"])
def test_mixed_dtypes(no_work, name):
    arrays = dict(zip("qkv", qkv(), strict=True))
    arrays[name] = arrays[name].astype(np.float64)
    with raises(TypeError, f"{name}:", "float32", "float64"):
        cuflash.attention(**arrays)


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "bool", "complex64"])
def test_unsupported_dtype(no_work, dtype):
    q, k, v = (x.astype(dtype) for x in qkv())
    with raises(TypeError, "q:", dtype, "float16, float32, float64"):
        cuflash.attention(q, k, v)


def test_bfloat16_is_refused_on_the_cpu(no_work):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q, k, v = (x.astype(ml_dtypes.bfloat16) for x in qkv())
    with raises(TypeError, "q:", "bfloat16", "the CPU", "float32"):
        cuflash.attention(q, k, v)


def test_mixed_frameworks(no_work):
    torch = pytest.importorskip("torch")
    q, k, v = qkv()
    with raises(TypeError, "k:", "numpy on CPU", "torch on CPU"):
        cuflash.attention(q, torch.from_numpy(k), v)


@pytest.mark.parametrize("value", [[[1.0]], "q", None, 3.0], ids=["list", "str", "None", "float"])
def test_not_an_array(no_work, value):
    _, k, v = qkv()
    with raises(TypeError, "q:", "expected an array"):
        cuflash.attention(value, k, v)


@pytest.mark.parametrize("scale", [0, 0.0, -1.0, math.nan, math.inf, -math.inf])
def test_scale_not_positive_finite(no_work, scale):
    with raises(ValueError, "scale:", "finite number > 0", repr(float(scale))):
        cuflash.attention(*qkv(), scale=scale)


def test_the_scale_limit_is_where_the_docs_say():
    from cuflash import api

    assert api.MAX_SCALE == _core.MAX_SCALE == np.finfo(np.float32).max / np.log2(np.e)


@pytest.mark.parametrize("scale", [2.4e38, 1e300, np.float64(_core.MAX_SCALE) * (1 + 2**-52)])
def test_scale_above_the_float32_bound(no_work, scale):
    with raises(ValueError, "scale:", "expected at most 2.3587e+38", "log2(e)", repr(float(scale))):
        cuflash.attention(*qkv(), scale=scale)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
def test_huge_scale_is_exact_on_the_cpu(dtype, causal):
    # scale = 1e38 used to overflow the float32 scores and give all-NaN output.
    q, k, v = qkv(dtype, seed=4)
    out, lse = cuflash.attention(q, k, v, causal=causal, scale=1e38, return_lse=True)
    ref_out, ref_lse = reference.attention(q, k, v, causal=causal, scale=1e38, return_lse=True)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-6)
    # lse beyond float32's range (|lse| > 3.4e38) rounds to +-inf, as the float32 cast does.
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(lse, ref_lse.astype(np.float32), rtol=1e-6)
    out, lse = cuflash.attention(q, k, v, causal=causal, scale=_core.MAX_SCALE, return_lse=True)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("scale", ["0.5", True, 1j, [0.5]], ids=["str", "bool", "complex", "list"])
def test_scale_not_a_real_number(no_work, scale):
    with raises(TypeError, "scale:", "real number > 0 or None", repr(scale)):
        cuflash.attention(*qkv(), scale=scale)


@pytest.mark.parametrize("layout", ["bsdh", "BSHD", "", None, 0])
def test_unknown_layout(no_work, layout):
    with raises(ValueError, "layout:", "('bshd', 'bhsd')", repr(layout)):
        cuflash.attention(*qkv(), layout=layout)


@pytest.mark.parametrize("flag", ["causal", "return_lse"])
@pytest.mark.parametrize("value", [1, 0, "yes", None, 1.0])
def test_flags_must_be_bool(no_work, flag, value):
    with raises(TypeError, f"{flag}:", "True or False", repr(value)):
        cuflash.attention(*qkv(), **{flag: value})


def test_numpy_bool_flags_are_accepted():
    out = cuflash.attention(*qkv(), causal=np.bool_(True), return_lse=np.bool_(False))
    assert isinstance(out, np.ndarray)


def test_out_of_wrong_shape(no_work):
    q, k, v = qkv()
    bad = np.empty((B, SQ, HQ, D + 1), np.float32)
    with raises(ValueError, "out:", f"expected shape {q.shape}", f"got {bad.shape}"):
        cuflash.attention(q, k, v, out=bad)


def test_out_has_the_value_head_dim(no_work):
    # With v's own head dim Dv, out (and dout) are q's shape with Dv last, not q's shape.
    q, k, v = qkv(dv=D + 8)
    want = (B, SQ, HQ, D + 8)
    with raises(ValueError, "out:", f"expected shape {want}", f"got {q.shape}"):
        cuflash.attention(q, k, v, out=np.empty_like(q))
    lse = np.ones((B, HQ, SQ), np.float32)
    right = np.ones(want, np.float32)
    with raises(ValueError, "dout:", f"expected shape {want}", f"got {q.shape}"):
        cuflash.attention_backward(np.ones_like(q), q, k, v, right, lse)
    with raises(ValueError, "out:", f"expected shape {want}", f"got {q.shape}"):
        cuflash.attention_backward(right, q, k, v, np.ones_like(q), lse)


def test_out_of_wrong_dtype(no_work):
    q, k, v = qkv()
    with raises(TypeError, "out:", "float32", "float64"):
        cuflash.attention(q, k, v, out=np.empty(q.shape, np.float64))


def test_out_of_another_framework(no_work):
    torch = pytest.importorskip("torch")
    q, k, v = qkv()
    with raises(TypeError, "out:", "numpy on CPU", "torch on CPU"):
        cuflash.attention(q, k, v, out=torch.empty(q.shape))


def test_out_not_an_array(no_work):
    q, k, v = qkv()
    with raises(TypeError, "out:", "expected an array", "list"):
        cuflash.attention(q, k, v, out=q.tolist())


def test_read_only_out_fails_before_any_work(no_work):
    q, k, v = qkv()
    out = np.empty_like(q)
    out.flags.writeable = False
    with raises(ValueError, "out:", "writable", "read-only"):
        cuflash.attention(q, k, v, out=out)


@pytest.mark.parametrize("name", ["q", "k", "v", "out"])
def test_masked_arrays_are_refused_in_the_forward(no_work, name):
    arrays = dict(zip("qkv", qkv(), strict=True))
    arrays["out"] = np.empty_like(arrays["q"])
    arrays[name] = np.ma.masked_array(arrays[name], mask=np.zeros(arrays[name].shape, bool))
    with raises(TypeError, f"{name}:", "numpy.ma.MaskedArray", "fill", "compress"):
        cuflash.attention(arrays["q"], arrays["k"], arrays["v"], out=arrays["out"])


@pytest.mark.parametrize("name", ["dout", "q", "out", "lse"])
def test_masked_arrays_are_refused_in_the_backward(no_work, name):
    q, k, v = qkv()
    arrays = {"dout": np.ones_like(q), "q": q, "k": k, "v": v, "out": np.ones_like(q),
              "lse": np.ones((B, HQ, SQ), np.float32)}
    arrays[name] = np.ma.masked_array(arrays[name], mask=np.zeros(arrays[name].shape, bool))
    with raises(TypeError, f"{name}:", "numpy.ma.MaskedArray", "fill", "compress"):
        cuflash.attention_backward(*arrays.values())


def test_backward_bad_dout_out_lse(no_work):
    q, k, v = qkv()
    out = np.ones_like(q)
    lse = np.ones((B, HQ, SQ), np.float32)
    with raises(ValueError, "dout:", f"expected shape {q.shape}"):
        cuflash.attention_backward(out[:, :-1], q, k, v, out, lse)
    with raises(TypeError, "out:", "float32", "float64"):
        cuflash.attention_backward(out, q, k, v, out.astype(np.float64), lse)
    with raises(ValueError, "lse:", f"expected shape {(B, HQ, SQ)}", f"got {(B, SQ, HQ)}"):
        cuflash.attention_backward(out, q, k, v, out, lse.swapaxes(1, 2))
    with raises(TypeError, "lse:", "float32", "float64"):
        cuflash.attention_backward(out, q, k, v, out, lse.astype(np.float64))
    with raises(TypeError, "deterministic:", "True or False"):
        cuflash.attention_backward(out, q, k, v, out, lse, deterministic="no")
    k3, v3 = (x[:, :, :1].repeat(3, axis=2) for x in (k, v))
    with raises(ValueError, "k:", "query heads (4)", "key/value heads (3)"):
        cuflash.attention_backward(out, q, k3, v3, out, lse)


# ---- good input ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("batched", [True, False], ids=["4d", "3d"])
@pytest.mark.parametrize("causal", [False, True])
def test_ranks_and_layouts_agree_with_reference(layout, batched, causal):
    q, k, v = qkv("float64", layout=layout, batched=batched, seed=3)
    originals = [x.copy() for x in (q, k, v)]
    out, lse = cuflash.attention(q, k, v, causal=causal, layout=layout, return_lse=True)
    ref, ref_lse = reference.attention(q, k, v, causal=causal, layout=layout, return_lse=True)
    assert type(out) is np.ndarray and out.shape == q.shape and out.dtype == np.float64
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
    assert lse.dtype == np.float32 and lse.shape == ref_lse.shape
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6)

    dout = rand(*q.shape, dtype="float64", seed=4)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal, layout=layout)
    ref_grads = reference.attention_backward(dout, q, k, v, causal=causal, layout=layout)
    for name, got, want, x in zip("qkv", grads, ref_grads, (q, k, v), strict=True):
        assert got.shape == x.shape and got.dtype == x.dtype, f"d{name}"
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10, err_msg=f"d{name}")
    for name, x, original in zip("qkv", (q, k, v), originals, strict=True):
        np.testing.assert_array_equal(x, original, err_msg=f"{name} was modified")


@pytest.mark.parametrize("d, dv", [(192, 128), (16, 40), (64, 1)])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("batched", [True, False], ids=["4d", "3d"])
def test_value_head_dim_of_its_own_agrees_with_reference(d, dv, layout, batched):
    # GQA (Hq 4, Hkv 2), a window and causal, in both layouts and ranks, through the public API.
    q, k, v = qkv("float64", layout=layout, batched=batched, seed=12, d=d, dv=dv)
    opts = {"causal": True, "window": (4, -1), "layout": layout}
    out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **opts)
    assert out.shape == (*q.shape[:-1], dv) == ref.shape and out.dtype == np.float64
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6)
    written = np.full(out.shape, np.nan)
    assert cuflash.attention(q, k, v, out=written, **opts) is written
    np.testing.assert_array_equal(written, out)

    dout = rand(*out.shape, dtype="float64", seed=13)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **opts)
    ref_grads = reference.attention_backward(dout, q, k, v, **opts)
    for name, got, want, x in zip("qkv", grads, ref_grads, (q, k, v), strict=True):
        assert got.shape == x.shape and got.dtype == x.dtype, f"d{name}"
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10, err_msg=f"d{name}")


@pytest.mark.parametrize("dv", [D - 9, D + 9], ids=["Dv<D", "Dv>D"])
def test_value_head_dim_of_its_own_is_zero_padding(dv):
    # Zero columns of q and k leave the scores alone and zero columns of v give zero columns of
    # out, so the CPU path with Dv != D must give the first columns of its Dv == D result.
    q, k, v = qkv("float64", seed=14, dv=dv)
    width = max(D, dv)

    def padded(x):
        return np.concatenate([x, np.zeros((*x.shape[:-1], width - x.shape[-1]))], axis=-1)

    opts = {"causal": True, "scale": 0.3, "softcap": 4.0}
    out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    wide, wide_lse = cuflash.attention(padded(q), padded(k), padded(v), return_lse=True, **opts)
    np.testing.assert_allclose(out, wide[..., :dv], rtol=0, atol=1e-13)
    np.testing.assert_allclose(lse, wide_lse, rtol=1e-7)
    dout = rand(*out.shape, dtype="float64", seed=15)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **opts)
    wide_grads = cuflash.attention_backward(padded(dout), padded(q), padded(k), padded(v), wide,
                                            wide_lse, **opts)
    for name, got, full in zip("qkv", grads, wide_grads, strict=True):
        np.testing.assert_allclose(got, full[..., :got.shape[-1]], rtol=0, atol=1e-12,
                                   err_msg=f"d{name}")


def test_flops_count_each_head_dim_once():
    q, k, v = qkv()
    same = _core.validate(q, k, v, causal=False, scale=None, layout="bshd")
    assert same.head_dim == same.head_dim_v == D
    assert same.flops() == 4.0 * B * HQ * SQ * SK * D
    q, k, v = qkv(dv=3 * D)
    own = _core.validate(q, k, v, causal=False, scale=None, layout="bshd")
    assert (own.head_dim, own.head_dim_v) == (D, 3 * D)
    assert own.flops() == 2.0 * B * HQ * SQ * SK * (D + 3 * D)  # 2 D for q k^T, 2 Dv for P v
    assert own.out_shape() == (B, SQ, HQ, 3 * D)


@pytest.mark.gpu
@pytest.mark.parametrize(("d", "dv"), [(192, 128), (16, 40), (64, 1)])
@pytest.mark.parametrize("mods", ["none", "sinks and bias"])
def test_a_value_head_dim_of_its_own_through_padded_copies_equals_the_direct_path(d, dv, mods):
    """CUDA inputs with Dv != D run zero-padded to the wider head dim (`_core.widened`): on the
    CPU the same route must give what the CPU path gives directly, forward and backward, with
    the sinks' and the bias's gradients."""
    q, k, v = qkv("float64", d=d, dv=dv, seed=3)
    kwargs = {}
    if mods != "none":
        kwargs = {"sinks": rand(HQ, dtype="float64", seed=4),
                  "bias": rand(1, HQ, SQ, SK, dtype="float64", seed=5)}
    problem = _core.validate(q, k, v, causal=True, scale=None, layout="bshd", **kwargs)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, **kwargs)
    dout = rand(*out.shape, dtype="float64", seed=6)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True,
                                       return_dsinks="sinks" in kwargs,
                                       return_dbias="bias" in kwargs, **kwargs)

    out_w, lse_w = np.full_like(out, np.nan), np.full_like(lse, np.nan)
    call = _core._forward_widened(problem, q, k, v, out_w, lse_w)
    assert call is None  # the CPU path launches nothing
    np.testing.assert_allclose(out_w, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse_w, lse, rtol=1e-12, atol=1e-12)
    dq, dk, dv_ = (np.full_like(x, np.nan) for x in (q, k, v))
    replay, dsinks, dbias = _core._backward_widened(
        problem, dout, q, k, v, out, lse, dq, dk, dv_, deterministic=False,
        dsinks="sinks" in kwargs, dbias="bias" in kwargs)
    assert replay is False
    for got, want in zip((dq, dk, dv_, dsinks, dbias), grads, strict=False):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert _core.widened(problem).head_dim == _core.widened(problem).head_dim_v == max(d, dv)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_result_keeps_the_input_dtype(dtype):
    q, k, v = qkv(dtype)
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    assert out.dtype == np.dtype(dtype) and lse.dtype == np.float32


@pytest.mark.parametrize("layout, batched, lse_shape", [
    ("bshd", True, (B, HQ, SQ)), ("bhsd", True, (B, HQ, SQ)),
    ("bshd", False, (HQ, SQ)), ("bhsd", False, (HQ, SQ)),
])
def test_return_lse_shapes(layout, batched, lse_shape):
    q, k, v = qkv(layout=layout, batched=batched)
    plain = cuflash.attention(q, k, v, layout=layout)
    result = cuflash.attention(q, k, v, layout=layout, return_lse=True)
    assert isinstance(plain, np.ndarray)
    assert isinstance(result, tuple) and len(result) == 2
    out, lse = result
    assert lse.shape == lse_shape and lse.dtype == np.float32
    np.testing.assert_array_equal(out, plain)


def test_out_is_written_in_place_and_returned():
    q, k, v = qkv()
    out = np.full(q.shape, np.nan, np.float32)
    result, lse = cuflash.attention(q, k, v, causal=True, out=out, return_lse=True)
    assert result is out and lse.shape == (B, HQ, SQ)
    assert not np.isnan(out).any(), "every element of out= must be written"
    np.testing.assert_array_equal(out, cuflash.attention(q, k, v, causal=True))


def test_out_may_be_a_strided_view():
    q, k, v = qkv()
    storage = np.full((HQ, SQ, B, D), np.nan, np.float32)  # the axes stored in another order
    out = storage.transpose(2, 1, 0, 3)
    assert out.shape == q.shape and not out.flags.c_contiguous
    assert cuflash.attention(q, k, v, out=out) is out
    np.testing.assert_array_equal(out, cuflash.attention(q, k, v))


def test_rows_without_keys_are_zero_with_minus_infinite_lse():
    q, k, v = qkv(sq=6, sk=2)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    # bottom-right causal: query i sees key j iff j <= i + Sk - Sq, so queries 0..3 see nothing.
    assert (out[:, :4] == 0).all() and np.isneginf(lse[:, :, :4]).all()
    assert np.isfinite(out).all() and np.isfinite(lse[:, :, 4:]).all()


@pytest.mark.parametrize("sq, sk", [(0, 5), (5, 0), (0, 0), (1, 1)])
def test_lengths_zero_and_one(sq, sk):
    q, k, v = qkv("float64", sq=sq, sk=sk)
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == (B, HQ, sq)
    np.testing.assert_allclose(out, ref, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))


def test_explicit_scale_matches_reference():
    q, k, v = qkv("float64", seed=9)
    out = cuflash.attention(q, k, v, scale=0.3)
    np.testing.assert_allclose(out, reference.attention(q, k, v, scale=0.3), atol=1e-12)
    assert not np.allclose(out, cuflash.attention(q, k, v))  # the scale is really used


def _backend_of(x: np.ndarray) -> np.ndarray:
    return _core._backend(x, _interop.source_of(x, "q"), "q")


def test_q_sliced_from_packed_qkv_is_used_without_a_copy(caplog):
    packed = rand(B, SQ, 3, HQ, D, dtype="float64", seed=5)  # as a fused qkv projection writes it
    q, k, v = (packed[:, :, i] for i in range(3))
    assert not q.flags.c_contiguous and q.strides[-1] == q.itemsize
    with caplog.at_level(logging.INFO, logger="cuflash"):
        view = _backend_of(q)
        out = cuflash.attention(q, k, v, causal=True)
    assert view.__array_interface__["data"][0] == q.__array_interface__["data"][0]
    assert view.strides == q.strides and np.shares_memory(view, packed)
    assert "copying" not in caplog.text
    np.testing.assert_allclose(out, reference.attention(q, k, v, causal=True), atol=1e-12)
    np.testing.assert_array_equal(packed[:, :, 0], q)


def test_non_unit_last_stride_is_copied_once(caplog):
    wide = rand(B, SQ, HQ, 2 * D, dtype="float64", seed=6)
    q = wide[..., ::2]  # every other element: the last axis has stride 2
    _, k, v = qkv("float64", seed=7)
    with caplog.at_level(logging.INFO, logger="cuflash"):
        view = _backend_of(q)
        caplog.clear()
        out = cuflash.attention(q, k, v)
    assert view.strides[-1] == view.itemsize and not np.shares_memory(view, wide)
    copies = [r for r in caplog.records if "copying" in r.getMessage()]
    assert len(copies) == 1 and copies[0].getMessage().startswith("q:"), caplog.text
    np.testing.assert_allclose(out, reference.attention(q, k, v), atol=1e-12)


def test_inputs_are_never_modified_fp16():
    q, k, v = qkv("float16", seed=8)
    dout = rand(*q.shape, dtype="float16", seed=9)
    originals = [x.copy() for x in (q, k, v, dout)]
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    out_copy, lse_copy = out.copy(), lse.copy()
    cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    for name, x, original in zip(("q", "k", "v", "dout"), (q, k, v, dout), originals,
                                 strict=True):
        np.testing.assert_array_equal(x, original, err_msg=f"{name} was modified")
    np.testing.assert_array_equal(out, out_copy, err_msg="backward modified out")
    np.testing.assert_array_equal(lse, lse_copy, err_msg="backward modified lse")


def test_hopper_gpu_modules_skip_elsewhere(monkeypatch):
    """The sm90 GPU test modules skip, saying why, off compute capability 9.0 (checked here on the
    CPU, since those modules only reach this point on a GPU machine)."""
    from cuflash import _core
    from tests.gpu_support import require_hopper

    monkeypatch.setattr(_core, "compute_capability", lambda device_id: 86)
    with pytest.raises(pytest.skip.Exception, match=re.escape("compute capability 86, not 9.0")):
        require_hopper("sm90 GPU tests")
    monkeypatch.setattr(_core, "compute_capability", lambda device_id: 90)
    assert require_hopper("sm90 GPU tests") == 90


def _device_array(shape, strides_in_items, ptr=4096, dtype="float16"):
    """What the Hopper qualification reads of a CuPy array (shape, byte strides, dtype, base
    address), without a GPU."""
    itemsize = np.dtype(dtype).itemsize
    return types.SimpleNamespace(shape=shape, dtype=np.dtype(dtype),
                                 strides=tuple(s * itemsize for s in strides_in_items),
                                 data=types.SimpleNamespace(ptr=ptr))


def test_hopper_tma_kernels_qualify_on_the_same_conditions(monkeypatch):
    """The forward and the backward's dK/dV take the Hopper kernels on one set of conditions
    (_launch_sm90.tma_kernel_reason); each failing condition is named."""
    from cuflash.cuda import _launch_bwd, _launch_sm90

    monkeypatch.setattr(_launch_sm90, "_driver", lambda: object())
    monkeypatch.delenv("CUFLASH_FORCE_SM80", raising=False)
    good = _device_array((2, 64, 4, 64), (64 * 4 * 64, 4 * 64, 64, 1))
    arrays = (("q", good), ("k", good))
    reason = _launch_sm90.tma_kernel_reason
    assert reason(90, "float16", 64, 256, arrays) is None
    assert reason(80, "float16", 64, 256, arrays) == "compute capability 80 is not 90"
    assert reason(90, "float32", 64, 256, arrays) == "dtype float32 is not float16/bfloat16"
    assert reason(90, "bfloat16", 320, 256, arrays) == "head dim 320 > 256"
    empty = _device_array((2, 0, 4, 64), (0, 4 * 64, 64, 1))
    assert reason(90, "float16", 64, 256, (("q", good), ("k", empty))) == "k is empty"
    odd_base = _device_array((2, 64, 4, 64), (64 * 4 * 64, 4 * 64, 64, 1), ptr=4098)
    assert reason(90, "float16", 64, 256, (("v", odd_base),)) == \
        "v base address is not 16-byte aligned"
    odd_stride = _device_array((2, 64, 4, 60), (64 * 4 * 60, 4 * 60, 60, 1))  # 120-byte rows
    assert "k stride 60 (axis 2)" in reason(90, "float16", 60, 256, (("k", odd_stride),))
    monkeypatch.setattr(_launch_sm90, "_driver", lambda: None)
    assert "cuda.bindings is not installed" in reason(90, "float16", 64, 256, arrays)

    # The backward adds its own conditions, then defers to the shared ones.
    monkeypatch.setattr(_launch_sm90, "_driver", lambda: object())
    assert _launch_bwd._sm90_reason("float16", 64, True, 90, arrays) is None
    assert _launch_bwd._sm90_reason("float16", 64, False, 90, arrays) == \
        "an operand is not 16-byte aligned"
    assert _launch_bwd._sm90_reason("float16", 320, True, 90, arrays) == "head dim 320 > 256"
    # a softcap: only at the widths whose Hopper kernel takes one (D 64 spills)
    assert _launch_bwd._sm90_reason("float16", 64, True, 90, arrays, "softcap") == \
        "a softcap at head dim 64 (the Hopper dK/dV kernel spills with one)"
    assert _launch_bwd._sm90_reason("float16", 100, True, 90, arrays, "softcap") is None
    # the additive kinds form P at once and take every width
    for score in ("alibi", "mods"):
        assert _launch_bwd._sm90_reason("float16", 64, True, 90, arrays, score) is None
    monkeypatch.setenv("CUFLASH_FORCE_SM80", "1")
    assert _launch_bwd._sm90_reason("float16", 64, True, 90, arrays) == \
        "CUFLASH_FORCE_SM80 is set"
