"""The forward's dispatch, tile tables, grids and launches (sm80 and SIMT here, Hopper in
`_launch_sm90`).

Every forward tile size lives in the tables below (one row per (kernel family, head-dim width));
the C++ templates receive them as template arguments through `KernelSpec`. Sequence lengths,
strides and the true head dim travel in the parameter block (`_launch_common.FWD_PARAMS`,
mirroring ``FwdParams`` in kernels_cu/core/common.cuh).
"""

from __future__ import annotations

import functools
import math
import os

from cuflash import _dtypes, _variant
from cuflash._variant import Variant
from cuflash.cuda import _compile
from cuflash.cuda._kernel_call import KernelCall
from cuflash.cuda._launch_common import (  # the shared names stay reachable through _launch too
    BWD_PARAMS,  # noqa: F401
    FWD_PARAMS,  # noqa: F401
    FWD_POINTERS,  # noqa: F401
    NO_MODS,
    Mods,
    Tile,
    forward_pointers,
    fwd_params,
    fwd_pointer_fields,
    is_aligned,
    pack_params,  # noqa: F401
    param_strides,  # noqa: F401
    width_for,
)
from cuflash.cuda._spec import KernelSpec

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

# Forward, SIMT, fp32/fp64 (kernels_cu/simt/fwd_simt.cu). Rows per block x keys per tile.
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


@functools.cache
def fwd_spec(dtype: str, head_dim: int, mask: str, aligned: bool,
             score: str = "none") -> KernelSpec:
    """The forward kernel the dispatcher picks for one problem class (memoised: hot path):
    `mask` and `score` are the variant's compile-time kinds."""
    if _dtypes.uses_tensor_cores(dtype):
        width = width_for(head_dim, FWD_SM80_TILES)
        tile = (FWD_SM80_TILES if aligned else FWD_SM80_UNALIGNED_TILES)[width]
        itemsize = _dtypes.itemsize(dtype)
        # Q tile plus one K tile and one V tile, each row `width` elements.
        smem = (tile.block_m + 2 * tile.block_n) * width * itemsize
        return KernelSpec("sm80/fwd_sm80.cu", "fwd_sm80", dtype, width, tile.block_m, tile.block_n,
                          tile.warps, mask, aligned, smem, score=score)
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
    return KernelSpec("simt/fwd_simt.cu", "fwd_simt", dtype, width, tile.block_m, tile.block_n,
                      tile.warps, mask, aligned, smem, min_arch=60, score=score)


def all_fwd_specs() -> list[KernelSpec]:
    """Every forward instantiation the dispatcher can choose (for the compile test)."""
    specs = []
    for dtype in _dtypes.GPU_DTYPES:
        widths = FWD_SM80_TILES if _dtypes.uses_tensor_cores(dtype) else FWD_SIMT_TILES[dtype]
        for width in widths:
            for mask in _variant.MASK_KINDS:
                for score in _variant.SCORE_KINDS:
                    for aligned in (False, True):
                        specs.append(fwd_spec(dtype, width, mask, aligned, score))
    return specs


def plan_forward(q, k, v, out, *, variant: Variant, scale: float, device_id: int,
                 cc: int, sinks: bool = False, mods: Mods = NO_MODS) -> KernelCall | None:
    """The forward's replayable `KernelCall` for these views (None when there is nothing to
    compute): the Hopper kernel where it applies (it logs why not), else sm80 or SIMT.

    q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), out like q: CuPy arrays with any strides and a unit
    last stride; the call is valid for any arrays of the same shapes, strides and 16-byte
    alignment. `sinks`: the call has attention sinks (Accum ``(Hq,)``), whose address each
    launch passes after lse (`forward_pointers`), and after it the arrays of `mods` where the
    variant reads arrays (`Variant.reads_arrays`; `mods` gives the plan their strides). Call
    inside the device's scope.
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    if batch == 0 or seqlen_q == 0 or heads_q == 0:
        return None
    dtype = _dtypes.dtype_name(q.dtype)
    if cc == 90 and _dtypes.uses_tensor_cores(dtype) and not os.environ.get("CUFLASH_FORCE_SM80"):
        from cuflash.cuda._launch_sm90 import plan_sm90

        call = plan_sm90(q, k, v, out, variant=variant, scale=scale, device_id=device_id, cc=cc,
                         sinks=sinks, mods=mods)
        if call is not None:
            return call
    aligned = is_aligned((q, k, v, out), head_dim)
    spec = fwd_spec(dtype, head_dim, variant.mask, aligned, variant.score)
    return KernelCall(
        _compile.get_function(spec, device_id, cc), device_id,
        grid=(math.ceil(seqlen_q / spec.block_m), heads_q, batch),
        threads=spec.threads,
        smem_bytes=spec.smem_bytes,
        params=fwd_params(q, k, v, out, variant=variant, scale=scale, mods=mods),
        pointer_fields=fwd_pointer_fields(sinks, variant.reads_arrays),
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
