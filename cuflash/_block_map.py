"""Block maps: a user mask_mod evaluated once into ranges, so that kernels skip what it hides.

A `BlockMap` holds, for each block of 64 query rows, the keys some row of it sees and the keys
every row of it sees, the same for each block of 64 keys, and for each query row its seen keys
where they are one interval (attention/block_map.cuh). The kernels walk only the key tiles
(query tiles, in the backward's dK/dV) the map shows, leave the mask_mod's per-element test out
of the tiles it shows whole, and the Hopper kernels mask rows whose keys are one interval
(documents, prefix-LM, any band) by its bounds instead of calling the mask_mod. The map is
conservative: a mask_mod with holes inside a block's range (a key seen by no row between seen
ones) is walked and tested there, never wrong.

`cuflash.block_map(q, k, mask_mod=...)` builds one to pass to later calls (`block_map=`), for
example every layer of a step; a call with a mask_mod and no map builds its own first. A map
is broadcast over the batch (heads) when the mask_mod's code does not name ``b`` (``h``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np

from cuflash import _interop, _user_mods

# Whether maps keep the row and key bounds ("1"): otherwise every bound is written as
# not-an-interval (-1) and the kernels call the mask_mod on every partial tile, as before the
# bounds. Off by default until the bounds' kernel paths have run on a GPU.
BOUNDS_ENV = "CUFLASH_MAP_BOUNDS"
BOUNDS_DEFAULT = "0"
ROWS = 64  # rows (keys) a map entry covers: BlockMap::kRows in kernels_cu/attention/block_map.cuh
THREADS = 128  # the build kernel's block


@dataclass(frozen=True, eq=False)
class BlockMap:
    """A mask_mod's block map for one problem shape (build it with `cuflash.block_map`).

    Attributes:
        data: int32 ``(Bm, Hm, 132 (R + C))``, on q's device (CuPy) or NumPy for CPU inputs,
            one plane per (batch, head) as the kernels read it: `entries`, `bounds`,
            `key_bounds`. Bm (Hm) is 1 where the mask_mod does not read ``b`` (``h``).
        row_blocks: R, ``ceil(Sq / 64)``.
        signature: what a call must match to use the map: the mask_mod's code and aux arrays'
            dtypes and axes, B, Hq, Sq, Sk, the causal/window band, and the device.
    """

    data: object
    row_blocks: int
    signature: tuple
    per_call: bool = False  # built by a call for itself (not replayed: its aux may change)

    @property
    def entries(self):
        """int32 ``(Bm, Hm, R + C, 4)``: R row blocks, then ``C = ceil(Sk / 64)`` key blocks,
        each ``(begin, end, full_begin, full_end)`` (a view of `data`, or a copy of it)."""
        bm, hm = self.data.shape[:2]
        return self.data[:, :, :4 * self._blocks].reshape(bm, hm, self._blocks, 4)

    @property
    def bounds(self):
        """int32 ``(Bm, Hm, 64 R, 2)``: each query row's seen keys ``[first, end)`` where they
        are one interval (``(0, 0)``: none, also for the rows past Sq), ``(-1, -1)`` where they
        are not (a view of `data`, or a copy of it)."""
        bm, hm = self.data.shape[:2]
        at = 4 * self._blocks
        return self.data[:, :, at:at + 2 * ROWS * self.row_blocks].reshape(
            bm, hm, ROWS * self.row_blocks, 2)

    @property
    def key_bounds(self):
        """int32 ``(Bm, Hm, 64 C, 2)``: each key's queries ``[first, end)`` that see it, as
        `bounds` (a view of `data`, or a copy of it)."""
        bm, hm = self.data.shape[:2]
        at = 4 * self._blocks + 2 * ROWS * self.row_blocks
        return self.data[:, :, at:].reshape(bm, hm, -1, 2)

    @property
    def _blocks(self) -> int:
        return self.data.shape[2] // (4 + 2 * ROWS)

    @property
    def shape(self) -> tuple[int, ...]:
        """`entries`' shape."""
        bm, hm = self.data.shape[:2]
        return (int(bm), int(hm), self._blocks, 4)

    def density(self) -> float:
        """The fraction of 64 x 64 (query, key) blocks the kernels walk: each row block's key
        range, in blocks, over all blocks (reads the map back to the host)."""
        entries = np.asarray(_to_numpy(self.entries))
        rows = entries[:, :, :self.row_blocks]
        key_blocks = self.shape[2] - self.row_blocks
        begin, end = rows[..., 0] // ROWS, -(-rows[..., 1] // ROWS)
        walked = np.where(rows[..., 1] > rows[..., 0], end - begin, 0)
        return float(walked.sum() / max(1, walked.size * key_blocks))

    def __repr__(self) -> str:
        batch, heads, sq, sk, mask, window, _, _ = self.signature[1:]
        band = f"window {window}" if mask == "window" else mask
        return (f"BlockMap(B={batch}, Hq={heads}, Sq={sq}, Sk={sk}, {band}, entries "
                f"{self.shape})")

    def intervals(self) -> float:
        """The fraction of (batch, head, query row) whose seen keys are one interval (or
        none): the rows the Hopper kernels mask by bounds (reads the map back)."""
        sq = self.signature[3]
        bounds = np.asarray(_to_numpy(self.bounds))[:, :, :sq]
        return float((bounds[..., 0] >= 0).mean()) if bounds.size else 1.0


def _to_numpy(x):
    return x if isinstance(x, np.ndarray) else x.get()


def signature(problem) -> tuple:
    """What a block map built for `problem` is valid for (see `BlockMap.signature`)."""
    variant = problem.variant
    user = variant.user
    window = None if variant.mask == "none" else (variant.left, variant.right)
    return (("mask_mod", user.mask, user.aux), problem.batch, problem.heads_q,
            problem.seqlen_q, problem.seqlen_k, variant.mask, window,
            problem.source.device, problem.source.device_id)


def check(block_map, problem):
    """`block_map` (a `BlockMap` or None) for a call of `problem`: None where the call has no
    mask_mod to use it, else the map as given. Raises naming ``block_map`` where it was built
    for another problem."""
    if block_map is None:
        return None
    if not isinstance(block_map, BlockMap):
        raise TypeError(f"block_map: expected a cuflash.BlockMap (from cuflash.block_map) or "
                        f"None, got {type(block_map).__name__}")
    user = problem.variant.user
    if user is None or user.mask is None:
        raise ValueError("block_map: given without a mask_mod to use it")
    want = signature(problem)
    if block_map.signature != want:
        names = ("mask_mod code and aux dtypes/axes", "B", "Hq", "Sq", "Sk", "mask",
                 "window", "device", "device id")
        diff = "; ".join(f"{name}: map {got!r}, call {exp!r}" for name, got, exp in
                         zip(names, block_map.signature, want, strict=True) if got != exp)
        raise ValueError(f"block_map: built for another problem ({diff}); build one with "
                         f"cuflash.block_map for this call's q, k, mask_mod, aux, causal and "
                         f"window")
    return block_map


def build(problem, aux_arrays, *, per_call: bool = False) -> BlockMap:
    """The block map of `problem`'s mask_mod, on its device. `aux_arrays`: the aux arrays as
    the kernels (CuPy, on the device) or the NumPy form (NumPy) read them, in slot order.
    On CUDA this launches one kernel on the current stream (call inside the stream scope)."""
    user = problem.variant.user
    batches = problem.batch if _user_mods.reads_index(user.mask, "b") else 1
    heads = problem.heads_q if _user_mods.reads_index(user.mask, "h") else 1
    rows, keys = math.ceil(problem.seqlen_q / ROWS), math.ceil(problem.seqlen_k / ROWS)
    if problem.source.device == "cpu":
        data = _data_numpy(problem, dict(zip((n for n, _, _ in user.aux), aux_arrays,
                                             strict=True)), batches, heads, rows, keys)
    else:
        data = _data_cuda(problem, aux_arrays, batches, heads, rows, keys)
    if os.environ.get(BOUNDS_ENV, BOUNDS_DEFAULT) == "0":
        data[:, :, 4 * (rows + keys):] = -1
    return BlockMap(data, rows, signature(problem), per_call)


def plane_ints(rows: int, keys: int) -> int:
    """Ints of one (batch, head)'s map: the entries, then two a row and two a key
    (BlockMap::plane_ints)."""
    return (4 + 2 * ROWS) * (rows + keys)


def build_spec(variant):
    """The build kernel of `variant`'s mask and user kind (kernels_cu/attention/block_map.cu):
    the kind without the call's ALiBi, bias and mask array, which no map holds."""
    from cuflash.cuda._spec import KernelSpec

    return KernelSpec("attention/block_map.cu", "build_block_map", "float32", 0, ROWS, ROWS,
                      THREADS // 32, variant.mask, False, 0, min_arch=70,
                      score=replace(variant.user, arrays=False))


def _data_cuda(problem, aux_arrays, batches, heads, rows, keys):
    from cuflash.cuda import _compile
    from cuflash.cuda._kernel_call import KernelCall
    from cuflash.cuda._launch_common import FWD_PARAMS, aux_fields, pack_params

    src = problem.source
    data = _interop.empty_backend((batches, heads, plane_ints(rows, keys)), "int32", src)
    variant = problem.variant
    left, right = variant.window_params(problem.seqlen_q, problem.seqlen_k)
    fields = {**dict.fromkeys(FWD_PARAMS.names, 0), **aux_fields(aux_arrays),
              "scale": problem.scale, "batch": problem.batch, "heads_q": problem.heads_q,
              "heads_kv": problem.heads_kv, "group": problem.heads_q // problem.heads_kv,
              "seqlen_q": problem.seqlen_q, "seqlen_k": problem.seqlen_k,
              "head_dim": problem.head_dim, "window_left": left, "window_right": right,
              "bias_dtype": 4, "block_map_rows": rows}
    cc = _compile.compute_capability(src.device_id)
    call = KernelCall(_compile.get_function(build_spec(variant), src.device_id, cc),
                      src.device_id, (rows + keys, heads, batches), THREADS, 0,
                      pack_params(FWD_PARAMS, fields), ("q",),
                      args=(np.uint64(data.data.ptr),))
    call((0,), _interop.current_stream(src))
    return data


def _data_numpy(problem, aux: dict, batches: int, heads: int, rows: int, keys: int):
    """The map by the mask_mod's NumPy form, int for int as the build kernel writes it."""
    from cuflash import _user_mods

    keep = _user_mods.numpy_form(problem.mask_mod.numpy, "mask_mod.numpy", "the mask_mod")
    sq, sk = problem.seqlen_q, problem.seqlen_k
    first, end = problem.variant.key_bounds(np.arange(sq), sq, sk)
    cols = np.arange(sk)
    band = (cols[None, :] >= first[:, None]) & (cols[None, :] < end[:, None])
    b, h, q_idx, kv_idx = _user_mods.positions(batches, heads, np.arange(sq), cols)
    seen = band & np.broadcast_to(np.asarray(keep(b, h, q_idx, kv_idx, **aux), dtype=bool),
                                  (batches, heads, sq, sk))
    entries = np.zeros((batches, heads, rows + keys, 4), dtype=np.int32)
    for bi in range(batches):
        for hi in range(heads):
            plane = seen[bi, hi]
            for r in range(rows):
                entries[bi, hi, r] = _entry(plane[r * ROWS:(r + 1) * ROWS])
            for c in range(keys):
                entries[bi, hi, rows + c] = _entry(plane[:, c * ROWS:(c + 1) * ROWS].T)
    data = np.zeros((batches, heads, plane_ints(rows, keys)), dtype=np.int32)
    data[:, :, :4 * (rows + keys)] = entries.reshape(batches, heads, -1)
    at = 4 * (rows + keys)
    data[:, :, at:at + 2 * sq] = _bounds(seen).reshape(batches, heads, 2 * sq)
    at += 2 * ROWS * rows
    data[:, :, at:at + 2 * sk] = _bounds(seen.swapaxes(-1, -2)).reshape(batches, heads, 2 * sk)
    return data


def _bounds(seen: np.ndarray) -> np.ndarray:
    """Each row's ``(first, end)`` of `seen` (..., Sq, Sk): its seen keys where they are one
    interval, ``(0, 0)`` where none, ``(-1, -1)`` where not one interval."""
    count = seen.sum(axis=-1)
    first = np.argmax(seen, axis=-1)
    last = seen.shape[-1] - 1 - np.argmax(seen[..., ::-1], axis=-1)
    one = count == last - first + 1
    bounds = np.stack([np.where(one, first, -1), np.where(one, last + 1, -1)], axis=-1)
    bounds[count == 0] = 0
    return bounds.astype(np.int32)


def _entry(block: np.ndarray) -> tuple[int, int, int, int]:
    """One entry of a block (its rows by the positions they are tested against)."""
    any_, all_ = block.any(axis=0), block.all(axis=0)
    found = np.flatnonzero(any_)
    begin, end = (int(found[0]), int(found[-1]) + 1) if found.size else (0, 0)
    # the longest run of positions every row sees (the first of equal ones)
    edges = np.diff(np.concatenate(([0], all_.astype(np.int8), [0])))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if starts.size == 0:
        return begin, end, 0, 0
    longest = int(np.argmax(stops - starts))
    return begin, end, int(starts[longest]), int(stops[longest])
