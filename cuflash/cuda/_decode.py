"""Split-KV decoding (kernels_cu/sm80/fwd_decode.cu): the kernel `attention_with_kvcache` runs on
CUDA for a few query rows against a contiguous or paged cache, read in place.

`reason` says why a call cannot take it (then the caller runs each sequence through
`cuflash.attention`; ``CUFLASH_DECODE_KERNEL=0`` sends every call there); `run` plans and
launches it. The grid
is (splits, KV heads x row tiles, batch): each block packs the query rows of the heads that
share one KV head, and walks one split of the sequence's visible keys. With more than one split
the blocks write float32 partial rows and `decode_merge` combines them by their log-sum-exp.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from cuflash import _dtypes, _interop
from cuflash._checks import MAX_GRID_YZ
from cuflash._side_arrays import on_device
from cuflash._variant import MASK_KINDS, Variant
from cuflash.cuda import _compile
from cuflash.cuda._kernel_call import KernelCall
from cuflash.cuda._launch_common import (
    DECODE_PARAMS,
    Tile,
    is_aligned,
    pack_params,
    param_strides,
    width_for,
)
from cuflash.cuda._spec import KernelSpec

# Packed query rows x keys per tile x warps, by head-dim width: 16 keys a warp. D 256 keeps two
# warps, so that three blocks' stages fit an SM.
DECODE_TILES: dict[int, Tile] = {
    64: Tile(block_m=16, block_n=64, warps=4),
    128: Tile(block_m=16, block_n=64, warps=4),
    256: Tile(block_m=16, block_n=32, warps=2),
}
DECODE_SCORES = ("none", "softcap", "alibi")
MAX_SEQLEN_Q = 16  # query steps a call may have to take this path (speculative decoding)
# "0" turns the decoding kernels off: every call takes the per-sequence path (an A/B switch).
SWITCH_ENV = "CUFLASH_DECODE_KERNEL"
MAX_SPLITS = 128
MIN_TILES_PER_SPLIT = 2  # a split of one tile spends more on its prologue and partials than keys
_MERGE_WARPS = 4  # decode_merge gives each split a thread: MAX_SPLITS <= its threads
assert MAX_SPLITS <= _MERGE_WARPS * 32


@dataclass(frozen=True)
class Append:
    """What `decode_append` writes before the attention: new keys and values ``(B, Snew, Hkv,
    D)`` (CuPy views, unit last stride) into the caches, and, with `cos` (float32 device
    ``(positions, rotary_dim / 2)``, `sin` likewise), the rotary embedding of the new keys and
    of q (`per_row`: query i at the first new position + i, else every query at it)."""

    k: Any = None
    v: Any = None
    cos: Any = None
    sin: Any = None
    rotary_dim: int = 0
    interleaved: bool = False
    per_row: bool = False


def _stages(width: int) -> int:
    return 3 if width <= 128 else 2  # mirrors DecodeTraits::kStages


@functools.cache
def decode_spec(dtype: str, head_dim: int, mask: str, score: str) -> KernelSpec:
    """The decoding kernel for one problem class (memoised)."""
    width = width_for(head_dim, DECODE_TILES)
    tile = DECODE_TILES[width]
    # Q tile, then the stages of K and V tiles (DecodeTraits::kSmemBytes; the kernel traps on less)
    smem = (tile.block_m + _stages(width) * 2 * tile.block_n) * width * 2
    return KernelSpec("sm80/fwd_decode.cu", "fwd_decode", dtype, width, tile.block_m, tile.block_n,
                      tile.warps, mask, True, smem, score=score)


@functools.cache
def append_spec(dtype: str, head_dim: int) -> KernelSpec:
    """The kernel that appends new keys and values and applies the rotary embedding."""
    width = width_for(head_dim, DECODE_TILES)
    return KernelSpec("sm80/fwd_decode.cu", "decode_append", dtype, width, 1, 1, _MERGE_WARPS,
                      "none", True, 0)


@functools.cache
def merge_spec(dtype: str, head_dim: int) -> KernelSpec:
    """The kernel that merges the splits' partial rows (one block a row, a thread a split)."""
    width = width_for(head_dim, DECODE_TILES)
    return KernelSpec("sm80/fwd_decode.cu", "decode_merge", dtype, width, 1, 1,
                      _MERGE_WARPS, "none", True, 0)


def all_decode_specs() -> list[KernelSpec]:
    """Every decoding instantiation (for the compile test)."""
    specs = []
    for dtype in _dtypes.GPU_DTYPES:
        if not _dtypes.uses_tensor_cores(dtype):
            continue
        for width in DECODE_TILES:
            specs.append(merge_spec(dtype, width))
            specs.append(append_spec(dtype, width))
            for mask in MASK_KINDS:
                for score in DECODE_SCORES:
                    specs.append(decode_spec(dtype, width, mask, score))
    return specs


def reason(qb, kb, vb, *, variant: Variant, src: _interop.Source, page_size: int,
           paged: bool, cc: int) -> str | None:
    """Why this call cannot take the decoding kernel, or None when it can: q and the caches as
    CuPy views (`_interop.to_backend`); only their shapes, dtypes, addresses and strides are
    read."""
    if src.device != "cuda":
        return "not on CUDA"
    if os.environ.get(SWITCH_ENV) == "0":
        return f"{SWITCH_ENV}=0 turns the decoding kernels off"
    if cc < 80:
        return f"compute capability {cc / 10:.1f} < 8.0"
    dtype = _dtypes.dtype_name(qb.dtype)
    if not _dtypes.uses_tensor_cores(dtype):
        return f"dtype {dtype} (the kernel takes float16 and bfloat16)"
    head_dim = int(qb.shape[-1])
    if head_dim > max(DECODE_TILES):
        return f"head dim {head_dim} > {max(DECODE_TILES)}"
    if 0 in tuple(qb.shape):
        return "nothing to compute"
    if int(qb.shape[0]) > MAX_GRID_YZ:
        return f"batch {int(qb.shape[0])} > {MAX_GRID_YZ} (the grid's z)"
    smem = decode_spec(dtype, head_dim, variant.mask, "none").smem_bytes
    limit = _compile.smem_limit(src.device_id)
    if smem > limit:
        return f"{smem} bytes of shared memory; this GPU allows {limit} a block"
    if int(qb.shape[1]) > MAX_SEQLEN_Q:
        return f"{int(qb.shape[1])} query steps > {MAX_SEQLEN_Q}: the prefill kernels are faster"
    if variant.score not in DECODE_SCORES:
        return f"score modification {variant.score!r}"
    if paged and page_size & (page_size - 1):
        return f"page size {page_size} is not a power of two"
    if any(x.strides[-1] != x.dtype.itemsize for x in (qb, kb, vb)):
        return "a last axis is strided"
    if not is_aligned((qb, kb, vb), head_dim):
        return "not 16-byte aligned"
    return None


def num_splits_for(streams: int, row_tiles: int, tiles: int, smem_bytes: int, device_id: int,
                   *, paged: bool = False) -> int:
    """How many splits of the keys to run: one split of each of the `streams` (batch x KV
    heads: the K/V a block reads) per SM, the blocks of a stream's `row_tiles` sharing its
    reads; for a paged cache one per block slot instead (its page-table reads want a second
    block on each SM to hide them). No more than one wave of the blocks the SMs hold at once,
    two tiles a split at least and MAX_SPLITS at most. Then the fewest splits that keep the
    longest as short (128 tiles in 33 splits is 4 tiles in the longest, as in 32: take 32, all
    equal, and merge less). On the H100 this was the fastest count of each swept cell
    (docs/performance.md)."""
    sms, smem_per_sm = _device_shape(device_id)
    resident = sms * max(1, smem_per_sm // (smem_bytes + 1024))
    most = min(MAX_SPLITS, -(-tiles // MIN_TILES_PER_SPLIT),
               (resident if paged else sms) // max(streams, 1),
               resident // max(streams * row_tiles, 1))
    longest = -(-max(tiles, 1) // max(most, 1))  # tiles in the longest split
    return -(-max(tiles, 1) // longest)


def run(q, qb, kb, vb, **kwargs):
    """Attention of q ``(B, Sq, Hq, D)`` against the caches, launched on the caller's current
    stream: ``(out, lse)`` in q's framework (lse None unless asked for). Call inside
    `_interop.stream_scope(src)`; the arguments are `prepare`'s."""
    prepared = prepare(q, qb, kb, vb, **kwargs)
    prepared.launch(_interop.current_stream(kwargs["src"]))
    return prepared.out, prepared.lse


class Prepared:
    """The launches of one decoding call with their buffers: `launch` queues them again, on
    the same arrays (what a CUDA graph captures)."""

    def __init__(self, calls: list[KernelCall], pointers: tuple[int, ...], keep: tuple,
                 out, lse, splits: int):
        self.calls, self.pointers, self._keep = calls, pointers, keep
        self.out, self.lse, self.splits = out, lse, splits

    def launch(self, stream: int) -> None:
        """Queue the kernel (and the merge, with splits) on `stream`."""
        for call in self.calls:
            call(self.pointers, stream)


def prepare(q, qb, kb, vb, *, variant: Variant, scale: float, src: _interop.Source, cc: int,
            seqlens_k: np.ndarray, leftpad: np.ndarray | None, rows: np.ndarray | None,
            table: np.ndarray | None, page_size: int, sinks=None, alibi=None,
            num_splits: int = 0, return_lse: bool = False,
            append: Append | None = None) -> Prepared:
    """The decoding call's output buffers, metadata on the device and launches, not launched.
    Call inside `_interop.stream_scope(src)`: the small copies go on the current stream.
    `qb`, `kb`, `vb` are the CuPy views of q and the caches.

    `seqlens_k`: each sequence's cache positions in use (after any append), `leftpad` its first
    one, `rows` its contiguous cache row, `table` its pages (int NumPy arrays, None where not
    given); `sinks` ``(Hq,)`` and `alibi` ``(B, Hq)`` as `_checks` returns them; `num_splits`
    0 picks the count (`num_splits_for`); `append`: new keys to write and the rotary embedding,
    launched first (`seqlens_k` counts the new keys already)."""
    batch, seqlen_q, heads_q, head_dim = (int(n) for n in qb.shape)
    n_rows, cache_len, heads_kv, _ = (int(n) for n in kb.shape)
    dtype = _dtypes.dtype_name(qb.dtype)
    spec = decode_spec(dtype, head_dim, variant.mask, variant.score)
    group = heads_q // heads_kv
    row_tiles = -(-seqlen_q * group // spec.block_m)
    lengths = seqlens_k - (0 if leftpad is None else leftpad)
    longest = int(lengths.max(initial=0))
    reach = longest
    if variant.mask == "window" and variant.left >= 0:
        reach = min(longest, seqlen_q + variant.left + max(variant.right, 0))
    tiles = -(-reach // spec.block_n)
    splits = num_splits or num_splits_for(batch * heads_kv, row_tiles, tiles, spec.smem_bytes,
                                          src.device_id, paged=table is not None)
    splits = max(1, min(splits, max(tiles, 1), MAX_SPLITS))

    out_native, ob = _interop.empty((batch, seqlen_q, heads_q, head_dim), qb, src, q)
    lse_native = lse_b = None
    if return_lse:
        lse_native, lse_b = _float32_buffer((batch, heads_q, seqlen_q), src)
    ints = _upload_ints([seqlens_k, leftpad, rows, table], src)
    side = _Side(src)
    sinks_b = on_device(sinks, (heads_q,), side)
    alibi_b = on_device(alibi, (batch, heads_q), side)
    o_part = lse_part = None
    if splits > 1:
        o_part = _interop.empty_backend((splits, batch, heads_q, seqlen_q, head_dim), "float32",
                                        src)
        lse_part = _interop.empty_backend((splits, batch, heads_q, seqlen_q), "float32", src)
    capacity = cache_len * (1 if table is None else table.shape[1])
    window = variant.window_params(seqlen_q, capacity)
    q_in = None
    if append is not None and append.cos is not None:  # the attention reads q rotated
        q_in, qb = qb, _interop.empty(tuple(qb.shape), qb, src, q)[1]
    new_keys = 0 if append is None or append.k is None else int(append.k.shape[1])
    fields = {
        **dict.fromkeys(POINTERS, 0),
        **param_strides("q", qb), **param_strides("k", kb), **param_strides("v", vb),
        **param_strides("o", ob),
        **param_strides("qi", q_in if q_in is not None else qb),
        **param_strides("kn", append.k if new_keys else qb),
        **param_strides("vn", append.v if new_keys else qb),
        "lse_batch_stride": heads_q * seqlen_q, "lse_head_stride": seqlen_q,
        "block_table_stride": 0 if table is None else table.shape[1],
        "scale": scale, "scale_log2": scale * math.log2(math.e), "batch": batch,
        "heads_q": heads_q, "heads_kv": heads_kv, "group": group, "seqlen_q": seqlen_q,
        "head_dim": head_dim, "window_left": window[0], "window_right": window[1],
        "cache_batch": n_rows, "cache_len": cache_len,
        "page_shift": page_size.bit_length() - 1 if table is not None else 0,
        "num_splits": splits, "softcap": variant.softcap, "new_keys": new_keys,
        "rotary_dim": append.rotary_dim if q_in is not None else 0,
        "rotary_interleaved": int(bool(append and append.interleaved)),
        "rotary_per_row": int(bool(append and append.per_row)),
    }
    params = pack_params(DECODE_PARAMS, fields)
    extra = (None,) * 5 if append is None else (append.k, append.v, append.cos, append.sin, q_in)
    pointers = tuple(0 if a is None else a.data.ptr for a in (
        qb, kb, vb, ob, lse_b, sinks_b, alibi_b, o_part, lse_part, *ints, *extra))
    # The launches depend on the parameter block (pointer fields zero) and the kernels alone:
    # a repeated call reuses them with its own pointers.
    key = (src.device_id, cc, spec, params.tobytes())
    calls = _planned.get(key)
    if calls is None:
        calls = _plan_calls(spec, params, src.device_id, cc,
                            append=new_keys > 0 or q_in is not None)
        if len(_planned) >= _PLANNED_MAX:
            _planned.clear()
        _planned[key] = calls
    out = _interop.from_backend(out_native, ob, src)
    lse = _interop.from_backend(lse_native, lse_b, src) if return_lse else None
    keep = (qb, kb, vb, ob, lse_b, sinks_b, alibi_b, o_part, lse_part, *ints, *extra)
    return Prepared(calls, pointers, keep, out, lse, splits)


POINTERS = DECODE_PARAMS.names[:18]  # the pointer fields, in the order of `prepare`'s
_planned: dict[tuple, list[KernelCall]] = {}
_PLANNED_MAX = 256


def _plan_calls(spec: KernelSpec, params, device_id: int, cc: int, *,
                append: bool) -> list[KernelCall]:
    """The launches of one parameter block: the append (when it writes keys or rotates q),
    the attention, and the merge (with splits)."""
    f = {name: int(params[name]) for name in ("batch", "heads_q", "heads_kv", "group",
                                               "seqlen_q", "head_dim", "num_splits",
                                               "new_keys", "rotary_dim")}
    row_tiles = -(-f["seqlen_q"] * f["group"] // spec.block_m)
    calls = []
    if append:
        spec_a = append_spec(spec.dtype, f["head_dim"])
        rows = max(f["new_keys"], f["seqlen_q"] if f["rotary_dim"] else 0)
        calls.append(KernelCall(_compile.get_function(spec_a, device_id, cc), device_id,
                                grid=(rows, f["batch"], 1), threads=spec_a.threads,
                                smem_bytes=0, params=params, pointer_fields=POINTERS))
    calls.append(KernelCall(_compile.get_function(spec, device_id, cc), device_id,
                            grid=(f["num_splits"], f["heads_kv"] * row_tiles, f["batch"]),
                            threads=spec.threads, smem_bytes=spec.smem_bytes, params=params,
                            pointer_fields=POINTERS))
    if f["num_splits"] > 1:
        merge = merge_spec(spec.dtype, f["head_dim"])
        rows = f["batch"] * f["heads_q"] * f["seqlen_q"]
        calls.append(KernelCall(_compile.get_function(merge, device_id, cc), device_id,
                                grid=(rows, 1, 1), threads=merge.threads,
                                smem_bytes=0, params=params, pointer_fields=POINTERS))
    return calls


def _float32_buffer(shape: tuple[int, ...], src: _interop.Source):
    """``(native, backend)``: a float32 array for the caller (torch's allocator for torch)."""
    if src.framework == "torch":
        import torch

        native = torch.empty(shape, dtype=torch.float32, device=src.device_id)
        return native, _interop.to_backend(native, src)
    return None, _interop.empty_backend(shape, "float32", src)


class _Side:
    """What `_side_arrays.on_device` reads of a problem: the Accum dtype and the source."""

    dtype = "float32"

    def __init__(self, source: _interop.Source):
        self.source = source


def _upload_ints(arrays, src: _interop.Source) -> list:
    """Host int arrays (None kept) as int32 device arrays, in one copy on the current stream
    from the caller's allocator."""
    present = [np.ascontiguousarray(a, dtype=np.int32).ravel() for a in arrays if a is not None]
    if not present:
        return [None] * len(arrays)
    host = np.concatenate(present)
    device = _interop.empty_backend(host.shape, "int32", src)
    import cupy

    device.set(host, stream=cupy.cuda.get_current_stream())
    found, at = [], 0
    for a in arrays:
        if a is None:
            found.append(None)
            continue
        found.append(device[at:at + a.size])
        at += a.size
    return found


@functools.cache
def _device_shape(device_id: int) -> tuple[int, int]:
    """(SMs, shared memory per SM in bytes) of a device."""
    import cupy

    runtime = cupy.cuda.runtime
    return (runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device_id),
            runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                                       device_id))
