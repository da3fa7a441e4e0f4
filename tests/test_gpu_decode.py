"""GPU: the split-KV decoding kernel (kernels_cu/fwd_decode.cu) behind `attention_with_kvcache`.

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
from hypothesis import strategies as st

from tests.gpu_support import require_gpu, to_numpy

require_gpu()

import cupy  # noqa: E402

import cuflash  # noqa: E402
from cuflash import _decode, reference  # noqa: E402
from tests.accuracy import LSE_DTYPE, assert_matches_reference  # noqa: E402
from tests.strategies import examples  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, scope="module")
def _decode_kernels_on():
    """The decoding kernels, whatever their default (`_decode.VERIFIED_ON_GPU`)."""
    import os

    before = os.environ.get(_decode.ENABLE_ENV)
    os.environ[_decode.ENABLE_ENV] = "1"
    yield
    if before is None:
        del os.environ[_decode.ENABLE_ENV]
    else:
        os.environ[_decode.ENABLE_ENV] = before


def _to_device(x: np.ndarray, dtype: str):
    """float16 as CuPy, bfloat16 as torch (CuPy has none)."""
    if dtype == "bfloat16":
        torch = pytest.importorskip("torch")
        return torch.asarray(x.astype(np.float32), device="cuda").to(torch.bfloat16)
    return cupy.asarray(x.astype(np.float16))


@st.composite
def decode_cases(draw):
    dtype = draw(st.sampled_from(["float16", "bfloat16"]))
    dim = draw(st.sampled_from([64, 128, 128, 256, 40, 96]))
    heads_kv = draw(st.sampled_from([1, 2, 8]))
    group = draw(st.sampled_from([1, 4, 8]))
    seqlen_q = draw(st.sampled_from([1, 1, 2, 4, 16]))
    batch = draw(st.integers(1, 3))
    new = draw(st.sampled_from([0, 0, 1, 3]))
    paged = draw(st.booleans())
    page_size = draw(st.sampled_from([1, 16, 64, 256])) if paged else 0
    longest = draw(st.sampled_from([0, 5, 70, 300, 2100]))
    lengths = [draw(st.integers(0, longest)) for _ in range(batch)]
    mask = draw(st.sampled_from([{"causal": True}, {"causal": False}, {"window": (40, 0)},
                                 {"window": (7, 3)}, {"window": (200, -1)}]))
    score = draw(st.sampled_from([{}, {"softcap": 5.0}, {"alibi": True}]))
    sinks = draw(st.booleans())
    splits = draw(st.sampled_from([0, 0, 1, 3, 17]))
    extra = draw(st.sampled_from([{}, {"leftpad": True}, {"rows": True}])) if not paged else {}
    rotary = None
    if new:  # (rotary_dim, interleaved): rotary needs new keys
        rotary = draw(st.sampled_from([None, (dim, False), (dim, True), (dim // 2, False),
                                       (16, True)]))
    return dict(dtype=dtype, dim=dim, heads_kv=heads_kv, group=group, seqlen_q=seqlen_q,
                batch=batch, new=new, paged=paged, page_size=page_size, lengths=lengths,
                mask=mask, score=score, sinks=sinks, splits=splits, extra=extra, rotary=rotary,
                seed=draw(st.integers(0, 2**31 - 1)))


def _build(case):
    """The call's arguments as host float64 values and as the device arrays the call takes."""
    rng = np.random.default_rng(case["seed"])
    b, hkv, d, sq, new = (case[n] for n in ("batch", "heads_kv", "dim", "seqlen_q", "new"))
    hq = hkv * case["group"]
    lengths = np.asarray(case["lengths"], np.int32)
    table = rows = leftpad = None
    if case["paged"]:
        ps = case["page_size"]
        max_pages = max(1, -(-(int(lengths.max()) + new) // ps))
        pages = b * max_pages + 3
        table = rng.permutation(pages)[:b * max_pages].reshape(b, max_pages).astype(np.int32)
        shape = (pages, ps, hkv, d)
    else:
        capacity = int(lengths.max()) + new + int(rng.integers(0, 9))
        n_rows = b + (2 if case["extra"].get("rows") else 0)
        shape = (n_rows, max(capacity, 1), hkv, d)
        if case["extra"].get("rows"):
            rows = rng.permutation(n_rows)[:b].astype(np.int32)
        if case["extra"].get("leftpad"):
            leftpad = np.asarray([rng.integers(0, n + 1) for n in lengths], np.int32)
    host = {
        "q": rng.standard_normal((b, sq, hq, d)),
        "k_cache": rng.standard_normal(shape),
        "v_cache": rng.standard_normal(shape),
        "k": rng.standard_normal((b, new, hkv, d)) if new else None,
        "v": rng.standard_normal((b, new, hkv, d)) if new else None,
    }
    dev = {name: None if x is None else _to_device(x, case["dtype"])
           for name, x in host.items()}
    # the values the kernels see: the inputs rounded to the dtype
    host = {name: None if x is None else to_numpy(dev[name]) for name, x in host.items()}
    opts = {**case["mask"], "cache_seqlens": lengths, "block_table": table,
            "cache_batch_idx": rows, "cache_leftpad": leftpad, "return_lse": True}
    if "softcap" in case["score"]:
        opts["softcap"] = case["score"]["softcap"]
    if case["score"].get("alibi"):
        opts["alibi_slopes"] = rng.uniform(0, 0.3, (b, hq)).astype(np.float32)
    if case["sinks"]:
        opts["sinks"] = rng.standard_normal(hq).astype(np.float32)
    if case.get("rotary"):
        rotary_dim, interleaved = case["rotary"]
        positions = int(lengths.max()) + new + sq + 1
        angles = rng.uniform(0, 6.3, (positions, rotary_dim // 2))
        for name, table in (("rotary_cos", np.cos(angles)), ("rotary_sin", np.sin(angles))):
            opts[name] = _to_device(table, case["dtype"])
            host[name] = to_numpy(opts[name])
        opts["rotary_interleaved"] = interleaved
    return host, dev, opts


def _rotated(case, host, opts):
    """q and the new keys with the rotary embedding at their positions, in float64."""
    q, k = host["q"], host["k"]
    if not case.get("rotary"):
        return q, k
    n = opts["cache_seqlens"].astype(np.int64)
    first = n - (0 if opts["cache_leftpad"] is None else opts["cache_leftpad"])
    key_pos = first[:, None] + np.arange(case["new"])[None]
    per_row = case["mask"].get("causal", True) or "window" in case["mask"]  # causal: default
    q_pos = first[:, None] + (np.arange(case["seqlen_q"])[None] if per_row else 0) \
        + np.zeros((1, case["seqlen_q"]), np.int64)
    cos, sin, inter = host["rotary_cos"], host["rotary_sin"], case["rotary"][1]
    return (reference.rotary(q, cos[q_pos], sin[q_pos], interleaved=inter),
            reference.rotary(k, cos[key_pos], sin[key_pos], interleaved=inter))


def _expected(case, host, opts):
    """Each sequence against its keys after the append, by the float64 reference; the caches
    after it, and which slots were written."""
    b, new, ps = case["batch"], case["new"], case["page_size"]
    k_cache, v_cache = host["k_cache"].copy(), host["v_cache"].copy()
    written = np.zeros(k_cache.shape[:2], bool)
    q_all, k_new = _rotated(case, host, opts)
    outs, lses = [], []
    for i in range(b):
        n = int(opts["cache_seqlens"][i])
        start = 0 if opts["cache_leftpad"] is None else int(opts["cache_leftpad"][i])
        if case["paged"]:
            table = opts["block_table"][i]
            where = [(table[j // ps], j % ps) for j in range(n + new)]
            for j in range(new):
                k_cache[where[n + j]], v_cache[where[n + j]] = k_new[i, j], host["v"][i, j]
                written[where[n + j]] = True
            keys = np.stack([k_cache[w] for w in where]) if where else k_cache[:0, 0]
            values = np.stack([v_cache[w] for w in where]) if where else v_cache[:0, 0]
        else:
            row = i if opts["cache_batch_idx"] is None else int(opts["cache_batch_idx"][i])
            if new:
                k_cache[row, n:n + new], v_cache[row, n:n + new] = k_new[i], host["v"][i]
                written[row, n:n + new] = True
            keys, values = k_cache[row, start:n + new], v_cache[row, start:n + new]
        slopes = opts.get("alibi_slopes")
        out, lse = reference.attention(
            q_all[i:i + 1], keys[None], values[None],
            causal=case["mask"].get("causal", True), window=case["mask"].get("window"),
            softcap=opts.get("softcap", 0.0),
            alibi_slopes=None if slopes is None else slopes[i].astype(np.float64),
            sinks=None if opts.get("sinks") is None else opts["sinks"].astype(np.float64),
            return_lse=True)
        outs.append(out)
        lses.append(lse)
    return np.concatenate(outs), np.concatenate(lses), k_cache, v_cache, written


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
@given(decode_cases())
def test_decode_kernel_matches_the_reference(case):
    host, dev, opts = _build(case)
    want, want_lse, k_after, v_after, written = _expected(case, host, opts)
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
    _, dev, opts = _build(case)
    one, one_lse, _, _ = _call(case, dev, opts, decode=True, splits=1)
    for splits in (2, 5, 16, 47, 128):
        out, lse, _, _ = _call(case, dev, opts, decode=True, splits=splits)
        np.testing.assert_allclose(out, one, rtol=0, atol=2e-3)
        np.testing.assert_allclose(lse, one_lse, rtol=1e-5, atol=1e-5)


def test_num_splits_is_checked():
    case = dict(dtype="float16", dim=64, heads_kv=1, group=1, seqlen_q=1, batch=1, new=0,
                paged=False, page_size=0, lengths=[10], mask={}, score={}, sinks=False,
                splits=0, extra={}, seed=1)
    _, dev, opts = _build(case)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_splits"):
            cuflash.attention_with_kvcache(dev["q"], dev["k_cache"], dev["v_cache"],
                                           num_splits=bad, **opts)
