"""`attention_with_kvcache`: new queries against a KV cache, contiguous or paged, with new keys
and values appended in place first (flash-attn's meaning).

Today the append is the framework's own indexed assignment into the caller's caches, and each
sequence then runs as one `cuflash.attention` call: on a view of a contiguous cache, or on its
pages gathered in order (a copy). `cache_seqlens` and `block_table` are read on the host (for
device arrays, one small copy that waits for the stream). A split-KV decoding kernel that reads
the pages itself is not written yet.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cuflash._merge import _ops_for
from cuflash._varlen import _check_flag, _int32_vector, _to_host
from cuflash.api import attention


def attention_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, k=None, v=None,
                           block_table=None, cache_batch_idx=None, causal: bool = True,
                           window: tuple[int, int] | None = None, scale: float | None = None,
                           return_lse: bool = False):
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
        causal, window, scale: as for `cuflash.attention`, bottom-right aligned on the
            ``cache_seqlens[b] + Snew`` keys of each sequence; `causal` defaults to True.
        return_lse: also return the float32 lse ``(B, Hq, Sq)``.

    Returns:
        ``out`` ``(B, Sq, Hq, D)`` in q's framework, device and dtype, or ``(out, lse)``.

    Raises (before any write): TypeError / ValueError naming the argument for shapes, dtypes
    and frameworks that do not fit, a `cache_seqlens` past the cache's capacity once the new
    keys are added, a `block_table` entry outside the pages, repeated cache rows written to,
    and new keys for JAX caches (immutable).

    See also: `cuflash.reference.attention_with_kvcache` (the float64 oracle).
    """
    plan = _Plan.of(q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx)
    _check_flag("causal", causal)
    _check_flag("return_lse", return_lse)
    if k is not None:
        plan.append(k_cache, v_cache, k, v)
    ops = _ops_for(q)
    outs, lses = [], []
    for b in range(plan.batch):
        keys, values = plan.keys_of(k_cache, b), plan.keys_of(v_cache, b)
        out, lse = attention(q[b:b + 1], keys[None], values[None], causal=causal,
                             window=window, scale=scale, return_lse=True)
        outs.append(out)
        lses.append(lse)
    if not outs:
        out = ops.zeros(tuple(q.shape), q)
        lse = ops.cast(ops.zeros((0, q.shape[2], q.shape[1]), q), "float32")
    else:
        out, lse = ops.concat(outs, 0), ops.concat(lses, 0)
    return (out, lse) if return_lse else out


class _Plan:
    """The checked cache layout of one call: where each sequence's keys are, and how many."""

    def __init__(self, batch: int, lengths: np.ndarray, new: int, table: np.ndarray | None,
                 rows: np.ndarray, page_size: int):
        self.batch, self.lengths, self.new = batch, lengths, new
        self.table, self.rows, self.page_size = table, rows, page_size

    @classmethod
    def of(cls, q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx) -> _Plan:
        shapes = {name: _shape4(x, name) for name, x in
                  (("q", q), ("k_cache", k_cache), ("v_cache", v_cache))}
        batch, _, heads_q, dim = shapes["q"]
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
            lengths = _int32_vector(cache_seqlens, "cache_seqlens")
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
                rows = _int32_vector(cache_batch_idx, "cache_batch_idx")
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
        plan = cls(batch, lengths, new, table, rows, page_size)
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

    def keys_of(self, cache, b: int):
        """Sequence b's ``cache_seqlens[b] + Snew`` keys: a view (contiguous) or a gather."""
        count = int(self.lengths[b]) + self.new
        if self.table is None:
            return cache[int(self.rows[b]), :count]
        pages = -(-count // self.page_size)
        gathered = cache[_index(self.table[b, :pages], cache)]
        return gathered.reshape(pages * self.page_size, *tuple(cache.shape[2:]))[:count]


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
    table = _to_host(x).astype(np.int64)
    if table.ndim != 2 or table.shape[0] != batch:
        raise ValueError(f"block_table: expected shape (B={batch}, max_pages), got "
                         f"{table.shape}")
    return table


def _index(values: np.ndarray, like):
    """Host indices as an index array of `like`'s framework and device."""
    top = type(like).__module__.split(".")[0]
    if top == "torch":
        import torch

        return torch.as_tensor(values, device=like.device)
    if top == "cupy":
        import cupy

        return cupy.asarray(values)
    return values
