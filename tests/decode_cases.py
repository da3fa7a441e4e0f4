"""The cases of the decoding tests (tests/test_gpu_decode.py) and their float64 oracle: each
sequence against its keys after the append, by `cuflash.reference`. tests/test_decode.py holds
the oracle to the CPU path, so that a GPU failure is the kernel's, not the oracle's."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from cuflash import reference
from tests.gpu_support import to_numpy


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


def build(case, to_device):
    """The call's arguments as host float64 values and as the arrays the call takes
    (`to_device(values, dtype)`: the caller's framework and device), and its options."""
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
    dev = {name: None if x is None else to_device(x, case["dtype"])
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
            opts[name] = to_device(table, case["dtype"])
            host[name] = to_numpy(opts[name])
        opts["rotary_interleaved"] = interleaved
    return host, dev, opts


def rotated(case, host, opts):
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


def expected(case, host, opts):
    """Each sequence against its keys after the append, by the float64 reference; the caches
    after it, and which slots were written."""
    b, new, ps = case["batch"], case["new"], case["page_size"]
    k_cache, v_cache = host["k_cache"].copy(), host["v_cache"].copy()
    written = np.zeros(k_cache.shape[:2], bool)
    q_all, k_new = rotated(case, host, opts)
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
