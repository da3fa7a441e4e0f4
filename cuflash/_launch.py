"""Tile choice, parameter blocks, grids and launches of the GPU kernels.

Every tile size lives in the tables below (one row per (kernel family, head-dim width)); the C++
templates receive them as template arguments through `KernelSpec`. Sequence lengths, strides and
the true head dim travel in the parameter block (`FWD_PARAMS`, mirroring ``FwdParams`` in
kernels_cu/common.cuh).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np

from cuflash import _compile, _dtypes, _variant
from cuflash._kernel_call import KernelCall
from cuflash._spec import KernelSpec
from cuflash._variant import Variant

_STRIDE_FIELDS = ("batch_stride", "row_stride", "head_stride")


def _params_dtype(pointers: tuple[str, ...], strided: tuple[str, ...], ints: tuple[str, ...]):
    fields = [(name, np.uint64) for name in pointers]
    fields += [(f"{t}_{s}", np.int64) for t in strided for s in _STRIDE_FIELDS]
    fields += [("lse_batch_stride", np.int64), ("lse_head_stride", np.int64)]
    fields += [("scale", np.float64), ("scale_log2", np.float32)]
    fields += [(name, np.int32) for name in ints]
    return np.dtype(fields, align=True)


_SHAPE_INTS = ("batch", "heads_q", "heads_kv", "group", "seqlen_q", "seqlen_k", "head_dim")

_WINDOW_INTS = ("window_left", "window_right")

FWD_PARAMS = _params_dtype(
    ("q", "k", "v", "o", "lse"), ("q", "k", "v", "o"), (*_SHAPE_INTS, *_WINDOW_INTS)
)
BWD_PARAMS = _params_dtype(
    ("q", "k", "v", "o", "dout", "lse", "dq", "dk", "dv", "dq_accum", "delta"),
    ("q", "k", "v", "o", "do", "dq", "dk", "dv"),
    (*_SHAPE_INTS, "head_dim_rounded", "deterministic", *_WINDOW_INTS),
)


@dataclass(frozen=True)
class Tile:
    """Tile sizes of one kernel family at one head-dim width."""

    block_m: int
    block_n: int
    warps: int


# Forward, tensor cores (mma.sync m16n8k16), fp16/bf16. Warps split along M so each warp owns
# whole query rows. Sizes are bounded by 255 registers per thread without spills (ptxas report):
# 128x128 at D=64 (FA2's choice) spills ~100 B and 128x64 at D=128 ~10 B, so those halve
# block_n; D=256 drops to 64 rows.
FWD_SM80_TILES: dict[int, Tile] = {
    64: Tile(block_m=128, block_n=64, warps=4),
    128: Tile(block_m=128, block_n=32, warps=4),
    256: Tile(block_m=64, block_n=64, warps=4),
}
# Unaligned inputs (element loads instead of 16-byte cp.async) need more registers per load:
# one m16 tile per warp keeps them spill-free. This is the correctness fallback, not the fast path.
FWD_SM80_UNALIGNED_TILES: dict[int, Tile] = {
    64: Tile(block_m=64, block_n=64, warps=4),
    128: Tile(block_m=64, block_n=64, warps=4),
    256: Tile(block_m=64, block_n=32, warps=4),
}

# Forward, SIMT, fp32/fp64 (kernels_cu/fwd_simt.cu). Rows per block x keys per tile.
FWD_SIMT_TILES: dict[str, dict[int, Tile]] = {
    "float32": {
        32: Tile(block_m=64, block_n=64, warps=4),
        64: Tile(block_m=64, block_n=64, warps=4),
        128: Tile(block_m=64, block_n=32, warps=4),
        256: Tile(block_m=32, block_n=32, warps=4),
    },
    "float64": {
        32: Tile(block_m=64, block_n=32, warps=4),
        64: Tile(block_m=64, block_n=32, warps=4),
        128: Tile(block_m=32, block_n=32, warps=4),
        256: Tile(block_m=32, block_n=16, warps=4),
    },
}


def width_for(head_dim: int, widths) -> int:
    """Smallest compiled head-dim width that holds `head_dim` (the rest is padded in registers)."""
    for width in sorted(widths):
        if head_dim <= width:
            return width
    raise ValueError(f"head dim {head_dim} exceeds the largest kernel width {max(widths)}")


@functools.cache
def fwd_spec(dtype: str, head_dim: int, mask: str, aligned: bool) -> KernelSpec:
    """The forward kernel the dispatcher picks for one problem class (memoised: hot path)."""
    if _dtypes.uses_tensor_cores(dtype):
        width = width_for(head_dim, FWD_SM80_TILES)
        tile = (FWD_SM80_TILES if aligned else FWD_SM80_UNALIGNED_TILES)[width]
        itemsize = _dtypes.itemsize(dtype)
        # Q tile plus one K tile and one V tile, each row `width` elements.
        smem = (tile.block_m + 2 * tile.block_n) * width * itemsize
        return KernelSpec("fwd_sm80.cu", "fwd_sm80", dtype, width, tile.block_m, tile.block_n,
                          tile.warps, mask, aligned, smem)
    tiles = FWD_SIMT_TILES[dtype]
    width = width_for(head_dim, tiles)
    tile = tiles[width]
    itemsize = _dtypes.itemsize(dtype)
    # Q, K and V tiles with rows padded by one 16-byte vector against bank conflicts, plus the
    # P tile (rows padded by 8) that carries probabilities from the S layout to the P V layout.
    # Mirrors FwdSimtTraits::kSmemBytes; the kernel traps if given less.
    vec = 16 // itemsize
    smem = ((tile.block_m + 2 * tile.block_n) * (width + vec)
            + tile.block_m * (tile.block_n + 8)) * itemsize
    return KernelSpec("fwd_simt.cu", "fwd_simt", dtype, width, tile.block_m, tile.block_n,
                      tile.warps, mask, aligned, smem, min_arch=60)


def all_fwd_specs() -> list[KernelSpec]:
    """Every forward instantiation the dispatcher can choose (for the compile test)."""
    specs = []
    for dtype in _dtypes.GPU_DTYPES:
        widths = FWD_SM80_TILES if _dtypes.uses_tensor_cores(dtype) else FWD_SIMT_TILES[dtype]
        for width in widths:
            for mask in _variant.MASK_KINDS:
                for aligned in (False, True):
                    specs.append(fwd_spec(dtype, width, mask, aligned))
    return specs


def is_aligned(arrays, head_dim: int) -> bool:
    """True when 16-byte vector loads/stores are legal on every array.

    Needs each base address, each non-unit stride and the head dim (in bytes) to be multiples of
    16 bytes; the last axis is unit-stride by construction (the API copies otherwise).
    """
    for a in arrays:
        itemsize = a.dtype.itemsize
        if a.data.ptr % 16 or (head_dim * itemsize) % 16:
            return False
        if any((s * itemsize) % 16 for s in _elem_strides(a)[:-1]):
            return False
    return True


def _elem_strides(a) -> tuple[int, ...]:
    return tuple(s // a.dtype.itemsize for s in a.strides)


def param_strides(name: str, a) -> dict[str, int]:
    b, s, h, _ = _elem_strides(a)
    return {f"{name}_batch_stride": b, f"{name}_row_stride": s, f"{name}_head_stride": h}


def pack_params(dtype: np.dtype, fields: dict[str, float | int]):
    """One structured scalar from a dict of every field (built in one call: this is per launch)."""
    return np.array(tuple(fields[name] for name in dtype.names), dtype=dtype)[()]


# The pointer fields of FwdParams a forward launch fills, in the order `KernelCall` takes them.
FWD_POINTERS = ("q", "k", "v", "o", "lse")


def forward_pointers(q, k, v, out, lse) -> tuple[int, ...]:
    """FWD_POINTERS of CuPy arrays (lse may be None)."""
    return (q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr, 0 if lse is None else lse.data.ptr)


def plan_forward(q, k, v, out, *, variant: Variant, scale: float, device_id: int,
                 cc: int) -> KernelCall | None:
    """The forward's replayable `KernelCall` for these views (None when there is nothing to
    compute): the Hopper kernel where it applies (it logs why not), else sm80 or SIMT.

    q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), out like q: CuPy arrays with any strides and a unit
    last stride; the call is valid for any arrays of the same shapes, strides and 16-byte
    alignment. Call inside the device's scope.
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    if batch == 0 or seqlen_q == 0 or heads_q == 0:
        return None
    dtype = _dtypes.dtype_name(q.dtype)
    if cc == 90 and _dtypes.uses_tensor_cores(dtype) and not os.environ.get("CUFLASH_FORCE_SM80"):
        from cuflash._launch_sm90 import plan_sm90

        call = plan_sm90(q, k, v, out, variant=variant, scale=scale, device_id=device_id, cc=cc)
        if call is not None:
            return call
    aligned = is_aligned((q, k, v, out), head_dim)
    spec = fwd_spec(dtype, head_dim, variant.mask, aligned)
    return KernelCall(
        _compile.get_function(spec, device_id, cc), device_id,
        grid=(math.ceil(seqlen_q / spec.block_m), heads_q, batch),
        threads=spec.threads,
        smem_bytes=spec.smem_bytes,
        params=fwd_params(q, k, v, out, variant=variant, scale=scale),
        pointer_fields=FWD_POINTERS,
    )


def forward(q, k, v, out, lse, *, variant: Variant, scale: float, device_id: int,
            cc: int) -> KernelCall | None:
    """Plan and launch the forward on CuPy's current stream; returns
    the `KernelCall` (None when there was nothing to compute). lse: (B, Hq, Sq) C-contiguous in
    the Accum dtype (float64 for float64 inputs, else float32), or None."""
    import cupy

    call = plan_forward(q, k, v, out, variant=variant, scale=scale, device_id=device_id, cc=cc)
    if call is not None:
        call(forward_pointers(q, k, v, out, lse), cupy.cuda.get_current_stream().ptr)
    return call


def fwd_params(q, k, v, out, *, variant: Variant, scale: float):
    """The FwdParams block for (B, S, H, D) views, pointer fields zero (`KernelCall` fills
    them)."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    _, seqlen_k, heads_kv, _ = k.shape
    fields = {"q": 0, "k": 0, "v": 0, "o": 0, "lse": 0,
              **param_strides("q", q), **param_strides("k", k), **param_strides("v", v),
              **param_strides("o", out),
              "lse_batch_stride": heads_q * seqlen_q, "lse_head_stride": seqlen_q,
              "scale": scale, "scale_log2": scale * math.log2(math.e),
              "batch": batch, "heads_q": heads_q, "heads_kv": heads_kv,
              "group": heads_q // heads_kv, "seqlen_q": seqlen_q, "seqlen_k": seqlen_k,
              "head_dim": head_dim}
    fields["window_left"], fields["window_right"] = variant.window_params(seqlen_q, seqlen_k)
    return pack_params(FWD_PARAMS, fields)
