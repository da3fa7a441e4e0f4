"""Backward: tile tables, kernel specs and the launch sequence.

FlashAttention-2's backward in up to three launches on the current stream:

Two kernel families share the sequence: SIMT for fp32/fp64 (kernels_cu/simt/bwd_simt.cu) and tensor
cores for fp16/bf16 (kernels_cu/sm80/bwd_sm80.cu, entry names suffixed ``_sm80``). On Hopper the
fp16/bf16 dK/dV step is ``bwd_dkdv_sm90`` (sm90/bwd_sm90.cu: TMA + wgmma) when every array
is aligned and q, k, v and dout are TMA-legal (``_sm90_reason``); the other launches stay the sm80
kernels.

1. ``bwd_preprocess``: ``delta = rowsum(dout * out)`` (Accum) and zeroes the dq scratch.
2. ``bwd_dkdv_simt``: one block per (key tile, kv head, batch) accumulates dK, dV in registers over
   the group's query heads and query tiles, and adds dS K into the Accum scratch ``dq_accum`` with
   atomics.
3. ``bwd_convert_dq`` (``dq = scale * dq_accum`` in the input dtype) or, deterministic,
   ``bwd_dq_simt`` (dQ per query tile over the key tiles in a fixed order, no atomics and no
   scratch).

Tile sizes live in the tables below, one row per head-dim width; the C++ traits
(``BwdSimtTraits`` in simt/bwd_simt.cu) derive every other size from them. The parameter block
is ``_launch_common.BWD_PARAMS`` (mirrors ``BwdParams`` in kernels_cu/core/common.cuh).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
from dataclasses import dataclass

import numpy as np

from cuflash import _dtypes, _variant
from cuflash._variant import Variant
from cuflash.cuda import _compile
from cuflash.cuda._kernel_call import KernelCall
from cuflash.cuda._launch_common import (
    BWD_MOD_POINTERS,
    BWD_PARAMS,
    NO_AUX,
    NO_MODS,
    Mods,
    Tile,
    is_aligned,
    pack_params,
    param_strides,
    width_for,
)
from cuflash.cuda._spec import KernelSpec

# Backward, SIMT, fp32/fp64 (simt/bwd_simt.cu): block_m query rows per step, block_n keys per
# dK/dV block. Chosen so that dK + dV (2 * block_n * width / threads registers per thread) and the
# shared memory leave 2+ blocks per SM on an H100 where the width allows; the deterministic dQ
# kernel reuses the same tile.
BWD_SIMT_TILES: dict[str, dict[int, Tile]] = {
    "float32": {
        32: Tile(block_m=64, block_n=64, warps=4),
        64: Tile(block_m=32, block_n=64, warps=4),
        128: Tile(block_m=32, block_n=32, warps=4),
        256: Tile(block_m=16, block_n=32, warps=4),
    },
    "float64": {
        32: Tile(block_m=32, block_n=32, warps=4),
        64: Tile(block_m=32, block_n=32, warps=4),
        128: Tile(block_m=16, block_n=16, warps=4),
        256: Tile(block_m=16, block_n=16, warps=4),
    },
}

# The row-wise kernels (preprocess, convert): one warp per query row, block_m rows per block. They
# have no key tile; block_n = 0 only fills the shared template signature.
ROWWISE_TILE = Tile(block_m=32, block_n=0, warps=4)

# Backward, tensor cores, fp16/bf16 (sm80/bwd_sm80.cu): per width, the dK/dV kernel's tile
# (block_m query rows per step, block_n keys per block) and the deterministic dQ kernel's tile
# (block_m query rows per block, block_n keys per step). Bounded by 255 registers without spills
# (the D=128/256 dK/dV kernels sit at 249-255) and by 163 KB of shared memory per block.
BWD_SM80_DKDV_TILES: dict[int, Tile] = {
    64: Tile(block_m=128, block_n=128, warps=8),
    128: Tile(block_m=64, block_n=128, warps=8),
    256: Tile(block_m=64, block_n=64, warps=8),
}
BWD_SM80_DQ_TILES: dict[int, Tile] = {
    64: Tile(block_m=128, block_n=64, warps=8),
    128: Tile(block_m=128, block_n=64, warps=8),
    256: Tile(block_m=64, block_n=32, warps=4),
}
# The same kernels on GPUs whose blocks get at most ~99 KB of shared memory (cc 8.6, 8.9, 12.0:
# 101376 bytes), taken when the tables above need more than the device allows: dK/dV 91 KB at
# D=64 and, single-buffered, 96 KB at D=128 (a dK/dV tile whose single-buffered size fits 99 KB
# and double-buffered one does not stays single, on every GPU); the deterministic dQ 72 / 68 KB.
# D=256 has no such tile: its sm80 dK/dV kernel splits D across two warps per key slice and needs
# >= 107 KB even at 32 x 32. (32 x 64 with 4 warps fits at D=128 too but spills 4-12 bytes.)
BWD_SM80_SMALL_DKDV_TILES: dict[int, Tile] = {
    64: Tile(block_m=64, block_n=128, warps=8),
    128: Tile(block_m=32, block_n=128, warps=8),
}
BWD_SM80_SMALL_DQ_TILES: dict[int, Tile] = {
    64: Tile(block_m=128, block_n=64, warps=8),
    128: Tile(block_m=64, block_n=32, warps=4),
}
# With a score modification at D=256 the dK/dV kernel keeps fewer query rows a step: the regular
# tile sits at 255 registers and the modification's values spill (ptxas: 4-20 bytes).
BWD_SM80_SCORED_DKDV_TILES: dict[int, Tile] = {256: Tile(block_m=32, block_n=64, warps=8)}
BWD_SM80_ROWWISE_TILE = Tile(block_m=64, block_n=0, warps=4)
# Backward dK/dV on Hopper, fp16/bf16 (kernels_cu/sm90/bwd_sm90.cu): block_n keys per block, block_m
# query rows per step, 12 warps (one producer and two consumer warpgroups). Up to D=128 each
# consumer owns 64 keys; at D=256 they share 64 keys and split the head dim. Bounded by the
# consumers' 240 registers: dK + dV (width, or width / 2, floats per thread), S^T and dP^T, dQ.
BWD_SM90_TILES: dict[int, Tile] = {
    64: Tile(block_m=128, block_n=128, warps=12),
    128: Tile(block_m=64, block_n=128, warps=12),
    256: Tile(block_m=64, block_n=64, warps=12),
}
# Widths whose Hopper dK/dV kernel takes a softcap: at D=64 its 128-query steps spill with one
# (ptxas: 4-20 bytes; the capped score stays live past dP for its slope), so those problems take
# the sm80 kernels. The additive kinds (ALiBi, bias, mask) form P at once and take every width.
SM90_SOFTCAP_WIDTHS = (128, 256)


def _adds(score) -> bool:
    """Whether score kind `score` (a name or a user kind) only adds terms (derivative 1)."""
    return score != "softcap" if isinstance(score, str) else score.additive


def sm90_takes_score(score, width: int) -> bool:
    """Whether the Hopper dK/dV kernel of head-dim width `width` takes score kind `score` (a
    user kind whose derivative is not 1 keeps its modified score live as a softcap does)."""
    return _adds(score) or width in SM90_SOFTCAP_WIDTHS


_SM90_STAGES = 2  # Q/dO slots; mirrors BwdSm90Traits::kStages
log = logging.getLogger("cuflash")

# Shared-memory budget the sm80 backward plans its pipeline stages against (A100's per-block max).
_SM80_SMEM_BUDGET = 163 * 1024
# What cc 8.6 / 8.9 / 12.0 GPUs allow a block (the small tables must fit it).
_SMALL_SMEM_LIMIT = 99 * 1024


@dataclass(frozen=True)
class BwdKernels:
    """The kernels of one backward problem class."""

    preprocess: KernelSpec
    dkdv: KernelSpec
    dq: KernelSpec  # deterministic mode
    convert: KernelSpec  # atomic mode

    @property
    def width(self) -> int:
        return self.dkdv.head_dim


def _simt_smem(dtype: str, width: int, tile: Tile) -> tuple[int, int]:
    """(dkdv, dq) dynamic shared memory in bytes, as ``BwdSimtTraits`` lays it out."""
    itemsize = _dtypes.itemsize(dtype)
    vec = 16 // itemsize
    m, n = tile.block_m, tile.block_n
    # Q, dO, K, V rows padded by one 16-byte vector; dS rows padded by 8; lse and delta per row.
    dq = (2 * m + 2 * n) * (width + vec) + m * (n + 8) + 2 * m
    # Plus P^T and dS^T, rows padded by one vector.
    dkdv = dq + 2 * n * (m + vec)
    return dkdv * itemsize, dq * itemsize


def _sm80_smem(width: int, dkdv: Tile, dq: Tile) -> tuple[int, int]:
    """(dkdv, dq) dynamic shared memory in bytes, as the traits of bwd_sm80.cu lay it out.

    Rows are padded by 16 bytes; Q/dO are double-buffered when two stages fit the budget.
    """

    def row(cols: int) -> int:
        return 2 * cols + 16

    m, n = dkdv.block_m, dkdv.block_n
    fixed = 2 * n * row(width) + (1 if width <= 128 else 2) * n * row(m) + 16 * m
    one, two = fixed + 2 * m * row(width), fixed + 4 * m * row(width)
    single_to_fit_small = one <= _SMALL_SMEM_LIMIT < two
    stages = 2 if two <= _SM80_SMEM_BUDGET and not single_to_fit_small else 1
    smem_dkdv = fixed + 2 * stages * m * row(width)
    m, n = dq.block_m, dq.block_n
    stages = 2 if 2 * m * row(width) + 4 * n * row(width) <= _SM80_SMEM_BUDGET else 1
    smem_dq = 2 * m * row(width) + 2 * stages * n * row(width)
    return smem_dkdv, smem_dq


def _sm90_smem(width: int, tile: Tile) -> int:
    """Dynamic shared memory of bwd_dkdv_sm90; mirrors BwdSm90Traits::kSmemBytes (the kernel
    traps on less): K, V; Q, dO per stage; two dS^T (and, split D, P^T) buffers; the fp32 dQ
    tile (not with split D); lse and delta per stage; barriers; 1024 bytes of alignment slack."""
    kv = tile.block_n * width * 2
    q = tile.block_m * width * 2
    split_d = width > 128
    ds = (tile.block_m // 64) * tile.block_n * 128 * (2 if split_d else 1)
    dq = 0 if split_d else tile.block_m * width * 4  # the fp32 dQ tile of the TMA reduction
    stats = 2 * _SM90_STAGES * tile.block_m * 4
    barriers = 8 * (3 + 2 * _SM90_STAGES)
    return 2 * kv + 2 * _SM90_STAGES * q + 2 * ds + dq + stats + barriers + 1024


@functools.cache
def dkdv_sm90_spec(dtype: str, head_dim: int, mask: str, score: str = "none") -> KernelSpec:
    """The Hopper dK/dV kernel for one problem class (memoised: per call)."""
    width = width_for(head_dim, BWD_SM90_TILES)
    tile = BWD_SM90_TILES[width]
    return KernelSpec("sm90/bwd_sm90.cu", "bwd_dkdv_sm90", dtype, width, tile.block_m, tile.block_n,
                      tile.warps, mask, True, _sm90_smem(width, tile), min_arch=90,
                      score=score)


def all_bwd_sm90_specs() -> list[KernelSpec]:
    """Every Hopper backward instantiation (for the compile test)."""
    return [dkdv_sm90_spec(dtype, width, mask, score) for dtype in ("float16", "bfloat16")
            for width in BWD_SM90_TILES for mask in _variant.MASK_KINDS
            for score in _variant.SCORE_KINDS if sm90_takes_score(score, width)]


def _sm90_reason(dtype: str, head_dim: int, aligned: bool, cc: int, arrays,
                 score: str = "none") -> str | None:
    """Why the Hopper dK/dV kernel does not take this problem (None when it does): the Hopper
    TMA kernels' shared conditions, every array (outputs too) 16-byte aligned, and a score
    modification only at the widths that take one."""
    from cuflash.cuda import _launch_sm90

    if os.environ.get("CUFLASH_FORCE_SM80"):
        return "CUFLASH_FORCE_SM80 is set"
    if not aligned:
        return "an operand is not 16-byte aligned"
    if head_dim <= max(BWD_SM90_TILES) and not sm90_takes_score(
            score, width_for(head_dim, BWD_SM90_TILES)):
        return f"a {score} at head dim {head_dim} (the Hopper dK/dV kernel spills with one)"
    return _launch_sm90.tma_kernel_reason(cc, dtype, head_dim, max(BWD_SM90_TILES), arrays)


def _sm80_kernels(dtype: str, head_dim: int, mask: str, aligned: bool,
                  smem_limit: int | None, score: str) -> BwdKernels:
    width = width_for(head_dim, BWD_SM80_DKDV_TILES)
    dkdv, dq = BWD_SM80_DKDV_TILES[width], BWD_SM80_DQ_TILES[width]
    if score != "none":
        dkdv = BWD_SM80_SCORED_DKDV_TILES.get(width, dkdv)
    smem_dkdv, smem_dq = _sm80_smem(width, dkdv, dq)
    if (smem_limit is not None and max(smem_dkdv, smem_dq) > smem_limit
            and width in BWD_SM80_SMALL_DKDV_TILES):
        dkdv, dq = BWD_SM80_SMALL_DKDV_TILES[width], BWD_SM80_SMALL_DQ_TILES[width]
        smem_dkdv, smem_dq = _sm80_smem(width, dkdv, dq)
    rows = BWD_SM80_ROWWISE_TILE

    def spec(entry: str, tile: Tile, masked: str, smem: int, scored: str) -> KernelSpec:
        return KernelSpec("sm80/bwd_sm80.cu", entry, dtype, width, tile.block_m, tile.block_n,
                          tile.warps, masked, aligned, smem, score=scored)

    return BwdKernels(
        preprocess=spec("bwd_preprocess_sm80", rows, "none", 0, "none"),
        dkdv=spec("bwd_dkdv_sm80", dkdv, mask, smem_dkdv, score),
        dq=spec("bwd_dq_sm80", dq, mask, smem_dq, score),
        convert=spec("bwd_convert_dq_sm80", rows, "none", 0, "none"),
    )


def _row_spec(entry: str, dtype: str, width: int) -> KernelSpec:
    t = ROWWISE_TILE
    return KernelSpec("simt/bwd_simt.cu", entry, dtype, width, t.block_m, t.block_n, t.warps,
                      "none", False, 0, min_arch=60)


@functools.cache
def bwd_kernels(dtype: str, head_dim: int, mask: str, aligned: bool,
                smem_limit: int | None = None, score: str = "none") -> BwdKernels:
    """The backward kernels the dispatcher picks for one problem class (memoised: per call):
    `mask` and `score` are the variant's compile-time kinds.

    `smem_limit`: the device's shared memory per block (bytes); the fp16/bf16 kernels take their
    small tiles when the regular ones need more (None: the regular tiles).
    """
    if _dtypes.uses_tensor_cores(dtype):
        return _sm80_kernels(dtype, head_dim, mask, aligned, smem_limit, score)
    tiles = BWD_SIMT_TILES[dtype]
    width = width_for(head_dim, tiles)
    tile = tiles[width]
    smem_dkdv, smem_dq = _simt_smem(dtype, width, tile)

    def spec(entry: str, smem: int) -> KernelSpec:
        return KernelSpec("simt/bwd_simt.cu", entry, dtype, width, tile.block_m, tile.block_n,
                          tile.warps, mask, aligned, smem, min_arch=60, score=score)

    return BwdKernels(
        preprocess=_row_spec("bwd_preprocess", dtype, width),
        dkdv=spec("bwd_dkdv_simt", smem_dkdv),
        dq=spec("bwd_dq_simt", smem_dq),
        convert=_row_spec("bwd_convert_dq", dtype, width),
    )


def all_bwd_specs() -> list[KernelSpec]:
    """Every backward instantiation the dispatcher can choose (for the compile test)."""
    specs: dict[KernelSpec, None] = {}
    widths = {dtype: tuple(tiles) for dtype, tiles in BWD_SIMT_TILES.items()}
    widths |= {dtype: tuple(BWD_SM80_DKDV_TILES) for dtype in ("float16", "bfloat16")}
    small = _SMALL_SMEM_LIMIT  # the small-shared-memory tables too
    for dtype, dtype_widths in widths.items():
        for width in dtype_widths:
            for mask, score in itertools.product(_variant.MASK_KINDS, _variant.SCORE_KINDS):
                for aligned in (False, True):
                    for limit in (None, small):
                        kernels = bwd_kernels(dtype, width, mask, aligned, limit, score)
                        for spec in (kernels.preprocess, kernels.dkdv, kernels.dq,
                                     kernels.convert):
                            specs[spec] = None
    return list(specs)


def accum_dtype(dtype: str) -> np.dtype:
    """Softmax-statistics dtype (``AccumOf<T>`` in common.cuh): float64 for fp64, else float32."""
    return np.dtype(np.float64 if dtype == "float64" else np.float32)


# The pointer fields of BwdParams a backward fills, in their order in the block (so a replay
# writes them in one go): the caller's arrays, then the scratch, then (with the run-time
# modifications) BWD_MOD_POINTERS.
BWD_POINTERS = ("q", "k", "v", "o", "dout", "lse", "dq", "dk", "dv", "dq_accum", "delta")
_CALLER_POINTERS = 9  # q .. dv: what `BackwardCall` is given before the scratch
_SCRATCH_ALIGN = 256


@dataclass(frozen=True)
class BackwardCall:
    """The backward's launches for one call signature, replayable for new arrays.

    The scratch (delta per query row, then, in atomic mode, the dq accumulator) comes from the
    `alloc` each call is given, that is from the caller's framework, and is needed only until the
    launches on that stream are done (stream-ordered allocators reuse it after them).
    """

    launches: tuple[KernelCall, ...]
    dq_accum_offset: int  # bytes from the scratch's start; 0: no dq accumulator (deterministic)
    scratch_bytes: int

    def __call__(self, pointers, stream: int, alloc) -> None:
        """`pointers`: q, k, v, out, dout, lse, dq, dk, dv (BWD_POINTERS without the scratch),
        then BWD_MOD_POINTERS where the variant reads arrays (`backward_pointers`)."""
        owner, base = alloc(self.scratch_bytes)
        accum = base + self.dq_accum_offset if self.dq_accum_offset else 0
        pointers = (*pointers[:_CALLER_POINTERS], accum, base, *pointers[_CALLER_POINTERS:])
        for launch in self.launches:
            launch(pointers, stream)
        del owner  # freed to the stream-ordered pool after the launches


def backward_pointers(dout, q, k, v, out, lse, dq, dk, dv,
                      mods: Mods | None = None) -> tuple[int, ...]:
    """The caller's pointers as `BackwardCall` takes them (`mods`: the arrays of a variant with
    the run-time modifications, else None)."""
    found = tuple(a.data.ptr for a in (q, k, v, out, dout, lse, dq, dk, dv))
    return found if mods is None else (*found, *mods.bwd_pointers())


def backward(dout, q, k, v, out, lse, dq, dk, dv, *, variant: Variant, scale: float,
             deterministic: bool, device_id: int, cc: int, mods: Mods | None = None) -> None:
    """Plan and launch the backward on CuPy's current stream, scratch from CuPy's pool
    (`mods`: the arrays where `variant` has the run-time modifications)."""
    import cupy

    from cuflash._interop import cupy_alloc

    call = plan_backward(dout, q, k, v, out, lse, dq, dk, dv, variant=variant, scale=scale,
                         deterministic=deterministic, device_id=device_id, cc=cc,
                         mods=mods or NO_MODS)
    if call is not None:
        call(backward_pointers(dout, q, k, v, out, lse, dq, dk, dv, mods),
             cupy.cuda.get_current_stream().ptr, cupy_alloc)


def plan_backward(dout, q, k, v, out, lse, dq, dk, dv, *, variant: Variant, scale: float,
                  deterministic: bool, device_id: int, cc: int,
                  mods: Mods = NO_MODS) -> BackwardCall | None:
    """The backward's replayable launches for these views (None: nothing to compute).

    q, dq (B, Sq, Hq, D); k, v, dk, dv (B, Sk, Hkv, D); out, dout like q: CuPy arrays in "bshd"
    order with any strides and a unit last stride; dq, dk, dv are written. lse (B, Hq, Sq) in the
    Accum dtype (float64 for float64 inputs, else float32), unit last stride, as the forward
    wrote it. Valid for any arrays of the same shapes, strides and 16-byte alignment (and,
    for a variant with the run-time modifications, `mods` of the same strides: see
    `backward_pointers`).
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    _, seqlen_k, heads_kv, _ = k.shape
    dtype = _dtypes.dtype_name(q.dtype)
    aligned = is_aligned((q, k, v, out, dout, dq, dk, dv), head_dim)
    kernels = bwd_kernels(dtype, head_dim, variant.mask, aligned, _compile.smem_limit(device_id),
                          variant.score)
    if batch == 0 or heads_q == 0:
        return None
    accum = accum_dtype(dtype)
    if lse.dtype != accum:
        raise TypeError(f"lse must be {accum} for {dtype} inputs, got {lse.dtype}")
    # The Hopper dK/dV kernel where it applies (it logs why not), else sm80/SIMT.
    operands = (("q", q), ("k", k), ("v", v), ("dout", dout))
    reason = _sm90_reason(dtype, head_dim, aligned, cc, operands, variant.score)
    if mods.dbias is not None:  # where the kernels write dS (score.cuh's Mods::record)
        if reason is None and width_for(head_dim, BWD_SM90_TILES) == 64:
            reason = "dbias at head dim 64 (the Hopper dK/dV kernel spills with its store)"
        if reason is None and not _adds(variant.score):
            reason = ("dbias through a score_mod whose derivative is not 1 (the Hopper dK/dV "
                      "kernel records dS only for added terms)")
        if reason is not None and _dtypes.uses_tensor_cores(dtype):
            deterministic = True  # bwd_dq_sm80 writes it: bwd_dkdv_sm80 has no registers left

    # Scratch in the Accum dtype: delta per query row; dq_accum (B, Hq, Sq, width) only in
    # atomic mode, after delta at an aligned offset.
    delta_bytes = batch * heads_q * seqlen_q * accum.itemsize
    offset = 0 if deterministic else -(-max(delta_bytes, 1) // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
    accum_shape = (batch, heads_q, seqlen_q, kernels.width)
    scratch = delta_bytes if deterministic else offset + math.prod(accum_shape) * accum.itemsize

    params = pack_params(BWD_PARAMS, {
        **dict.fromkeys((*BWD_POINTERS, *BWD_MOD_POINTERS), 0), **NO_AUX, **mods.fields(),
        **param_strides("q", q), **param_strides("k", k), **param_strides("v", v),
        **param_strides("o", out), **param_strides("do", dout), **param_strides("dq", dq),
        **param_strides("dk", dk), **param_strides("dv", dv),
        "lse_batch_stride": lse.strides[0] // lse.itemsize,
        "lse_head_stride": lse.strides[1] // lse.itemsize,
        "scale": scale, "scale_log2": scale * math.log2(math.e),
        "batch": batch, "heads_q": heads_q, "heads_kv": heads_kv, "group": heads_q // heads_kv,
        "seqlen_q": seqlen_q, "seqlen_k": seqlen_k, "head_dim": head_dim,
        "head_dim_rounded": kernels.width, "deterministic": int(deterministic),
        **dict(zip(("window_left", "window_right"), variant.window_params(seqlen_q, seqlen_k),
                   strict=True)),
        "softcap": variant.softcap,
    })
    launches = []
    pointer_fields = (*BWD_POINTERS, *BWD_MOD_POINTERS) if variant.reads_arrays else BWD_POINTERS

    def launch(spec: KernelSpec, rows: int, block_rows: int, heads: int, maps=()) -> None:
        grid = (math.ceil(rows / block_rows), heads, batch)
        if grid[0] == 0:
            return
        launches.append(KernelCall(
            _compile.get_function(spec, device_id, cc), device_id, grid, spec.threads,
            spec.smem_bytes, params, pointer_fields, tensor_maps=maps))

    launch(kernels.preprocess, seqlen_q, kernels.preprocess.block_m, heads_q)
    # With seqlen_q == 0 the sm80/SIMT dK/dV kernel still runs and writes dk = dv = 0.
    if reason is None:
        from cuflash.cuda._launch_sm90 import encode_at

        spec = dkdv_sm90_spec(dtype, head_dim, variant.mask, variant.score)
        rows = {"q": spec.block_m, "dout": spec.block_m, "k": spec.block_n, "v": spec.block_n}

        def tensor_map(field: str, shape, strides, map_dtype: str, block_rows: int):
            return field, functools.partial(encode_at, shape=tuple(shape),
                                            byte_strides=tuple(strides), dtype=map_dtype,
                                            block_rows=block_rows)

        maps = [tensor_map(name, a.shape, a.strides, dtype, rows[name]) for name, a in operands]
        # dq_accum (B, Hq, Sq, width) seen as (B, S, H, D) for the kernel's TMA reductions.
        # Deterministic mode has no dq_accum and never touches the map: q's stands in.
        if deterministic:
            maps.append(maps[0])
        else:
            item = accum.itemsize
            view_strides = (heads_q * seqlen_q * kernels.width * item, kernels.width * item,
                            seqlen_q * kernels.width * item, item)
            maps.append(tensor_map("dq_accum", (batch, seqlen_q, heads_q, kernels.width),
                                   view_strides, "float32", spec.block_m))
        launch(spec, seqlen_k, spec.block_n, heads_kv, maps)
    else:
        if _dtypes.uses_tensor_cores(dtype) and cc == 90:
            log.debug("bwd_dkdv_sm90 not taken, falling back to sm80: %s", reason)
        launch(kernels.dkdv, seqlen_k, kernels.dkdv.block_n, heads_kv)
    if deterministic:
        launch(kernels.dq, seqlen_q, kernels.dq.block_m, heads_q)
    else:
        launch(kernels.convert, seqlen_q, kernels.convert.block_m, heads_q)
    return BackwardCall(tuple(launches), offset, scratch)
