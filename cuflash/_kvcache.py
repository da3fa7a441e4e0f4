"""`attention_with_kvcache`: new queries against a KV cache, contiguous or paged, with new keys
and values appended in place first (flash-attn's meaning).

On CUDA, float16/bfloat16 calls of up to 16 query steps run the split-KV decoding kernels
(`_decode`): `decode_append` writes the new keys (rotated) and values into the cache rows or
pages and rotates q, then the attention reads contiguous caches and pages where they lie. Other
calls append by the framework's own indexed assignment, rotate in the framework, and run each
sequence as one `cuflash.attention` call, on a view of a contiguous cache or on its pages
gathered in order (a copy). `cache_seqlens`, `block_table`, `cache_batch_idx` and
`cache_leftpad` are read on the host for the checks (for device arrays, one small copy that
waits for the stream).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from cuflash import _interop
from cuflash._checks import (
    check_alibi,
    check_flag,
    check_scale,
    check_sinks,
    refuse_capped_mods_on_cuda,
)
from cuflash._core import compute_capability
from cuflash._merge import ops_for
from cuflash._variant import Variant, check_softcap
from cuflash._varlen import int32_vector, to_host
from cuflash.api import attention
from cuflash.cuda import _decode

log = logging.getLogger("cuflash")


def attention_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, k=None, v=None,
                           block_table=None, cache_batch_idx=None, cache_leftpad=None,
                           rotary_cos=None, rotary_sin=None, rotary_interleaved: bool = False,
                           causal: bool = True, window: tuple[int, int] | None = None,
                           scale: float | None = None, softcap: float = 0.0, alibi_slopes=None,
                           sinks=None, return_lse: bool = False, num_splits: int = 0):
    """Attention of new queries against a KV cache, after appending new keys and values to it.

    Args:
        q: ``(B, Sq, Hq, D)``, the new queries (Sq = 1 for plain decoding).
        k_cache, v_cache: contiguous ``(B_cache, S_cache, Hkv, D)``, or paged ``(num_pages,
            page_size, Hkv, D)`` with `block_table` (any page size). Same framework, device
            and dtype as q.
        cache_seqlens: an int, or int32 ``(B,)``: keys already in each sequence's cache.
        k, v: optional new keys and values ``(B, Snew, Hkv, D)``: **written into the caches in
            place** at positions ``cache_seqlens[b] .. + Snew - 1`` of each sequence before
            attending (the only write cuflash makes to its arguments). Both or neither.
        block_table: int32 ``(B, max_pages)``: page ``block_table[b, p]`` holds keys
            ``p * page_size .. (p + 1) * page_size - 1`` of sequence b.
        cache_batch_idx: int32 ``(B,)``: sequence b uses row ``cache_batch_idx[b]`` of a
            contiguous cache (default: row b). Rows must be distinct where new keys are written.
        cache_leftpad: int32 ``(B,)``: sequence b's keys start at this position of its
            (contiguous) cache row; it has ``cache_seqlens[b] - cache_leftpad[b]`` cached keys.
        rotary_cos, rotary_sin: ``(seqlen_ro, rotary_dim / 2)`` (q's framework): rotary
            embedding of the new keys (rotated before they are written) and of q, at positions
            counted from the sequence's first key: new key i at ``cache_seqlens[b] -
            cache_leftpad[b] + i``; query i likewise with causal or a window, else every query
            at ``cache_seqlens[b] - cache_leftpad[b]`` (flash-attn's convention). Only with new
            keys. The first ``rotary_dim`` features rotate in pairs: ``j`` with ``j +
            rotary_dim / 2``, or ``2j`` with ``2j + 1`` when `rotary_interleaved`. Computed in
            float32 (float64 for float64 inputs).
        causal, window, scale: as for `cuflash.attention`, bottom-right aligned on the
            ``cache_seqlens[b] + Snew`` keys of each sequence; `causal` defaults to True.
        softcap, alibi_slopes, sinks: as for `cuflash.attention` (slopes ``(Hq,)`` or
            ``(B, Hq)``, row b for sequence b; ALiBi distances over each sequence's keys), every
            path (on CUDA not a softcap with ALiBi): checked before any write.
        return_lse: also return the float32 lse ``(B, Hq, Sq)``.
        num_splits: how many runs the keys of a sequence are split into, across SMs, on the
            split-KV decoding kernel (merged by their lse); 0 (the default) picks the count
            from the device's SMs and the problem, 1 is no split. Any count gives the same
            result up to float rounding.

    On CUDA, float16/bfloat16 calls with up to 16 query steps (decoding, speculative
    decoding) run one split-KV kernel over every sequence, reading the cache, contiguous or
    paged (page sizes: powers of two), in place; each KV head's query heads share one read of
    it. Other calls run each sequence through `cuflash.attention`.

    Returns:
        ``out`` ``(B, Sq, Hq, D)`` in q's framework, device and dtype, or ``(out, lse)``.

    Raises (before any write): TypeError / ValueError naming the argument for shapes, dtypes
    and frameworks that do not fit, a `cache_seqlens` past the cache's capacity once the new
    keys are added, a `block_table` entry outside the pages, repeated cache rows written to,
    and new keys for JAX caches (immutable).

    See also: `cuflash.reference.attention_with_kvcache` (the float64 oracle).
    """
    plan = _Plan.of(q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx,
                    cache_leftpad)
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    check_flag("rotary_interleaved", rotary_interleaved)
    if isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer)):
        raise TypeError(f"num_splits: expected an int >= 0 (0: chosen for the device), got "
                        f"{type(num_splits).__name__} {num_splits!r}")
    if num_splits < 0:
        raise ValueError(f"num_splits: expected an int >= 0 (0: chosen for the device), got "
                         f"{num_splits!r}")
    slopes, sink_values = _check_mods(q, softcap, alibi_slopes, sinks)
    variant = Variant.of(causal=causal, window=window, softcap=softcap,
                         alibi=alibi_slopes is not None, sinks=sinks is not None)
    scale_value = check_scale(scale, int(q.shape[-1]))
    ops = ops_for(q)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos, rotary_sin: pass both or neither")
    per_row = causal or window is not None
    rotary_dim = 0
    if rotary_cos is not None:
        rotary_dim = plan.check_rotary(q, k, rotary_cos, rotary_sin, per_row)
    src = _interop.source_of(q, "q")
    if src.device == "cuda" and plan.batch:
        with _interop.stream_scope(src):
            qb, kb, vb = (_interop.to_backend(x, src) for x in (q, k_cache, v_cache))
            cc = compute_capability(src.device_id)
            why = _decode.reason(qb, kb, vb, variant=variant, src=src, page_size=plan.page_size,
                                 paged=plan.table is not None, cc=cc)
            if why is None:
                append = None
                if k is not None:
                    append = _decode.Append(
                        k=_unit_last(_interop.to_backend(k, src)),
                        v=_unit_last(_interop.to_backend(v, src)),
                        cos=None if rotary_cos is None else _float32_table(rotary_cos, ops, src),
                        sin=None if rotary_sin is None else _float32_table(rotary_sin, ops, src),
                        rotary_dim=rotary_dim, interleaved=rotary_interleaved, per_row=per_row)
                out, lse = _decode.run(
                    q, qb, kb, vb, variant=variant, scale=scale_value, src=src, cc=cc,
                    seqlens_k=plan.lengths + plan.new,
                    leftpad=plan.start if cache_leftpad is not None else None,
                    rows=plan.rows if cache_batch_idx is not None else None, table=plan.table,
                    page_size=plan.page_size, sinks=sink_values, alibi=slopes,
                    num_splits=int(num_splits), return_lse=return_lse, append=append)
                return (out, lse) if return_lse else out
        log.debug("attention_with_kvcache: each sequence on its own (%s)", why)
    if rotary_cos is not None:
        q, k = plan.rotate(q, k, rotary_cos, rotary_sin, rotary_interleaved, per_row, ops)
    if k is not None:
        plan.append(k_cache, v_cache, k, v)
    outs, lses = [], []
    for b in range(plan.batch):
        keys, values = plan.keys_of(k_cache, b), plan.keys_of(v_cache, b)
        out, lse = attention(q[b:b + 1], keys[None], values[None], causal=causal,
                             window=window, scale=scale, softcap=softcap, sinks=sinks,
                             alibi_slopes=_slopes_of(alibi_slopes, b),
                             return_lse=True)
        outs.append(out)
        lses.append(lse)
    if not outs:
        out = ops.zeros(tuple(q.shape), q)
        lse = ops.cast(ops.zeros((0, q.shape[2], q.shape[1]), q), "float32")
    else:
        out, lse = ops.concat(outs, 0), ops.concat(lses, 0)
    return (out, lse) if return_lse else out


def _check_mods(q, softcap, alibi_slopes, sinks):
    """The score modifications checked as `cuflash.attention` will check them (a softcap with
    ALiBi refused on CUDA too), but before the caches are written: the slopes as ``(B, Hq)``
    and the sinks as `_checks` returns them (None where not given)."""
    src = _interop.source_of(q, "q")
    cap = check_softcap(softcap)
    batch, heads_q = int(q.shape[0]), int(q.shape[2])
    slopes = sink_values = None
    if alibi_slopes is not None:
        slopes = check_alibi(alibi_slopes, src, batch, heads_q)
    if sinks is not None:
        sink_values = check_sinks(sinks, src, heads_q)
    if src.device == "cuda":
        refuse_capped_mods_on_cuda(cap, alibi_slopes is not None, False, False,
                                   f"{src.describe()} inputs")
    return slopes, sink_values


def _unit_last(x):
    """A CuPy view with a unit last stride (a copy where it has none)."""
    if x.strides[-1] == x.dtype.itemsize:
        return x
    import cupy

    return cupy.ascontiguousarray(x)


def _float32_table(table, ops, src):
    """A rotary table as a contiguous float32 CuPy array (cast in the caller's framework)."""
    import cupy

    return cupy.ascontiguousarray(_interop.to_backend(ops.cast(table, "float32"), src))


def _slopes_of(alibi_slopes, b: int):
    """Sequence b's ALiBi slopes as the caller's array: ``(Hq,)`` slopes serve every sequence,
    ``(B, Hq)`` ones give row b, as ``(1, Hq)``."""
    if alibi_slopes is None or len(alibi_slopes.shape) == 1:
        return alibi_slopes
    return alibi_slopes[b:b + 1]


class _Plan:
    """The checked cache layout of one call: where each sequence's keys are, and how many."""

    def __init__(self, batch: int, lengths: np.ndarray, new: int, table: np.ndarray | None,
                 rows: np.ndarray, page_size: int, start: np.ndarray):
        self.batch, self.lengths, self.new = batch, lengths, new
        self.table, self.rows, self.page_size, self.start = table, rows, page_size, start

    @classmethod
    def of(cls, q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx,
           cache_leftpad) -> _Plan:
        shapes = {name: _shape4(x, name) for name, x in
                  (("q", q), ("k_cache", k_cache), ("v_cache", v_cache))}
        batch, _, heads_q, dim = shapes["q"]
        # One head dim for q and both caches: v's own head dim (Dv, which `cuflash.attention`
        # takes on the CPU) is not taken here yet.
        if shapes["v_cache"] != shapes["k_cache"]:
            raise ValueError(f"v_cache: expected the shape of k_cache {shapes['k_cache']}, got "
                             f"{shapes['v_cache']}")
        n_rows, slots, heads_kv, cache_dim = shapes["k_cache"]
        if cache_dim != dim or heads_kv < 1 or heads_q % heads_kv:
            raise ValueError(f"k_cache: expected (.., .., Hkv, {dim}) with Hq={heads_q} a "
                             f"multiple of Hkv, got {shapes['k_cache']}")
        for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
            _same_place(name, x, q)
        new = 0
        if (k is None) != (v is None):
            raise ValueError("k, v: pass both new keys and new values, or neither")
        if k is not None:
            for name, x in (("k", k), ("v", v)):
                shape = _shape4(x, name)
                if shape[0] != batch or shape[2:] != (heads_kv, dim):
                    raise ValueError(f"{name}: expected (B={batch}, Snew, {heads_kv}, {dim}), "
                                     f"got {shape}")
                _same_place(name, x, q)
            if _shape4(v, "v") != _shape4(k, "k"):
                raise ValueError(f"v: expected the shape of k {_shape4(k, 'k')}, got "
                                 f"{_shape4(v, 'v')}")
            if type(k_cache).__module__.split(".")[0] in ("jax", "jaxlib"):
                raise TypeError("k_cache: JAX arrays are immutable; new k, v cannot be written "
                                "into the cache (append them yourself and pass k=None)")
            new = _shape4(k, "k")[1]
        if isinstance(cache_seqlens, (int, np.integer)) and not isinstance(cache_seqlens, bool):
            lengths = np.full(batch, int(cache_seqlens), np.int64)
        else:
            lengths = int32_vector(cache_seqlens, "cache_seqlens")
            if lengths.shape != (batch,):
                raise ValueError(f"cache_seqlens: expected an int or shape ({batch},) (B), got "
                                 f"{lengths.shape}")
        table, rows, page_size = None, np.arange(batch), slots
        if block_table is not None:
            if cache_batch_idx is not None:
                raise ValueError("cache_batch_idx: not with a paged cache (block_table names "
                                 "each sequence's pages)")
            table = _int32_table(block_table, batch)
            if table.size and (table.min() < 0 or table.max() >= n_rows):
                raise ValueError(f"block_table: expected page indices in [0, {n_rows}), got "
                                 f"{table.min()}..{table.max()}")
            capacity = table.shape[1] * page_size
        else:
            if cache_batch_idx is not None:
                rows = int32_vector(cache_batch_idx, "cache_batch_idx")
                if rows.shape != (batch,) or (rows.size and (rows.min() < 0
                                                              or rows.max() >= n_rows)):
                    raise ValueError(f"cache_batch_idx: expected shape ({batch},) with rows in "
                                     f"[0, {n_rows}), got {rows.tolist()}")
            elif n_rows != batch:
                raise ValueError(f"k_cache: expected batch {batch} like q (or cache_batch_idx), "
                                 f"got shape {shapes['k_cache']}")
            capacity = slots
        if np.any(lengths < 0) or np.any(lengths + new > capacity):
            raise ValueError(f"cache_seqlens: expected 0 <= cache_seqlens[b] and cache_seqlens[b]"
                             f" + {new} new keys <= the cache's capacity {capacity}, got "
                             f"{lengths.tolist()}")
        start = np.zeros(batch, np.int64)
        if cache_leftpad is not None:
            if table is not None:
                raise ValueError("cache_leftpad: not with a paged cache")
            start = int32_vector(cache_leftpad, "cache_leftpad")
            if start.shape != (batch,) or np.any(start < 0) or np.any(start > lengths):
                raise ValueError(f"cache_leftpad: expected shape ({batch},) with 0 <= "
                                 f"cache_leftpad[b] <= cache_seqlens[b] ({lengths.tolist()}), "
                                 f"got {start.tolist()}")
        plan = cls(batch, lengths, new, table, rows, page_size, start)
        if new and table is None and len(set(rows.tolist())) != batch:
            raise ValueError(f"cache_batch_idx: rows must be distinct where new keys are "
                             f"written, got {rows.tolist()}")
        if new:
            targets = [tuple(x) for x in plan._slots()]
            if len(set(targets)) != len(targets):
                raise ValueError("block_table: two sequences would write their new keys to the "
                                 "same cache slot")
        return plan

    def _slots(self) -> np.ndarray:
        """(cache row or page, position) of every new key, sequence by sequence: (B * Snew, 2)."""
        pos = self.lengths[:, None] + np.arange(self.new)[None, :]  # (B, Snew)
        if self.table is None:
            return np.stack([np.broadcast_to(self.rows[:, None], pos.shape), pos], -1)\
                .reshape(-1, 2)
        pages = np.take_along_axis(self.table, pos // self.page_size, axis=1)
        return np.stack([pages, pos % self.page_size], -1).reshape(-1, 2)

    def append(self, k_cache, v_cache, k, v) -> None:
        """Write the new keys and values into the caches (the framework's indexed assignment)."""
        where = self._slots()
        first, second = _index(where[:, 0], k_cache), _index(where[:, 1], k_cache)
        flat = (self.batch * self.new, *tuple(k.shape[2:]))
        for cache, new in ((k_cache, k), (v_cache, v)):
            cache[first, second] = new.reshape(flat)

    def check_rotary(self, q, k, cos, sin, per_row: bool) -> int:
        """The rotary tables checked against q, the new keys and the positions they rotate
        (`per_row`: query i at the first new position + i); returns rotary_dim."""
        if k is None:
            raise ValueError("rotary_cos: rotary embedding needs new keys k, v")
        shapes = [tuple(int(n) for n in getattr(x, "shape", ())) for x in (cos, sin)]
        dim = int(q.shape[-1])
        if len(shapes[0]) != 2 or shapes[0] != shapes[1] or not 0 < 2 * shapes[0][1] <= dim:
            raise ValueError(f"rotary_cos: expected (seqlen_ro, rotary_dim / 2) like rotary_sin "
                             f"with rotary_dim <= D = {dim}, got {shapes[0]}, {shapes[1]}")
        for name, x in (("rotary_cos", cos), ("rotary_sin", sin)):
            if type(x).__module__.split(".")[0] != type(q).__module__.split(".")[0]:
                raise TypeError(f"{name}: expected an array of q's framework, got "
                                f"{type(x).__name__}")
        first = self.lengths - self.start
        last = max(self.new - 1, int(q.shape[1]) - 1 if per_row else 0)
        reach = int((first + last).max(initial=0))
        if reach >= shapes[0][0]:
            raise ValueError(f"rotary_cos: {shapes[0][0]} positions, but positions up to {reach} "
                             f"are rotated")
        return 2 * shapes[0][1]

    def rotate(self, q, k, cos, sin, interleaved: bool, per_row: bool, ops):
        """q and the new keys with the rotary embedding at their positions (module docstring),
        in the caller's framework."""
        first = self.lengths - self.start
        key_pos = first[:, None] + np.arange(self.new)[None]
        sq = int(q.shape[1])
        q_pos = (first[:, None] + np.arange(sq)[None] if per_row
                 else np.broadcast_to(first[:, None], (self.batch, sq)))
        return (_rotary(q, cos, sin, q_pos, interleaved, ops),
                _rotary(k, cos, sin, key_pos, interleaved, ops))

    def keys_of(self, cache, b: int):
        """Sequence b's ``cache_seqlens[b] - cache_leftpad[b] + Snew`` keys: a view (contiguous)
        or a gather."""
        count = int(self.lengths[b]) + self.new
        if self.table is None:
            return cache[int(self.rows[b]), int(self.start[b]):count]
        pages = -(-count // self.page_size)
        gathered = cache[_index(self.table[b, :pages], cache)]
        return gathered.reshape(pages * self.page_size, *tuple(cache.shape[2:]))[:count]


def _rotary(x, cos, sin, positions: np.ndarray, interleaved: bool, ops):
    """`x (B, S, H, D)` rotated by ``cos, sin (seqlen_ro, rotary_dim / 2)`` at `positions`
    ``(B, S)``, in float32 (float64 for float64), returned in x's dtype."""
    dtype = ops.dtype_name(x)
    accum = "float64" if dtype == "float64" else "float32"
    at = _index(np.ascontiguousarray(positions), cos)
    c, s = (ops.cast(t[at], accum)[:, :, None, :] for t in (cos, sin))
    half = int(cos.shape[-1])
    x32 = ops.cast(x, accum)
    part = x32[..., :2 * half]
    if interleaved:
        x1, x2 = part[..., 0::2], part[..., 1::2]
        turned = ops.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).reshape(tuple(part.shape))
    else:
        x1, x2 = part[..., :half], part[..., half:]
        turned = ops.concat([x1 * c - x2 * s, x1 * s + x2 * c], -1)
    return ops.cast(ops.concat([turned, x32[..., 2 * half:]], -1), dtype)


def _shape4(x: Any, name: str) -> tuple[int, ...]:
    shape = tuple(int(n) for n in getattr(x, "shape", ()))
    if len(shape) != 4:
        raise ValueError(f"{name}: expected 4 dimensions, got "
                         f"{shape if hasattr(x, 'shape') else type(x).__name__}")
    return shape


def _same_place(name: str, x, q) -> None:
    if type(x).__module__.split(".")[0] != type(q).__module__.split(".")[0]:
        raise TypeError(f"{name}: expected an array of q's framework "
                        f"({type(q).__module__.split('.')[0]}), got {type(x).__name__}")
    if str(getattr(x, "dtype", "")) != str(getattr(q, "dtype", "")):
        raise TypeError(f"{name}: expected dtype {q.dtype} like q, got {x.dtype}")


def _int32_table(x: Any, batch: int) -> np.ndarray:
    dtype = getattr(x, "dtype", None)
    if dtype is None or str(dtype).removeprefix("torch.") != "int32":
        raise TypeError(f"block_table: expected an int32 array, got "
                        f"{dtype if dtype is not None else type(x).__name__}")
    table = to_host(x, "block_table").astype(np.int64)
    if table.ndim != 2 or table.shape[0] != batch:
        raise ValueError(f"block_table: expected shape (B={batch}, max_pages), got "
                         f"{table.shape}")
    return table


def _index(values: np.ndarray, like):
    """Host indices as an index array of `like`'s framework and device."""
    top = type(like).__module__.split(".")[0]
    if top == "torch":
        import torch

        return torch.as_tensor(np.array(values), device=like.device)  # writable: no warning
    if top == "cupy":
        import cupy

        return cupy.asarray(values)
    return values
