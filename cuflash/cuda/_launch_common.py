"""What the launch modules share: the kernels' parameter blocks (`FWD_PARAMS`, `BWD_PARAMS`,
mirroring ``FwdParams`` and ``BwdParams`` in kernels_cu/core/common.cuh) and their packing, the tile
record, the choice of a compiled head-dim width, and the 16-byte alignment test.

It sits below `_compile` (which passes the blocks' sizes to NVRTC) and every launch module
(`_launch`, `_launch_sm90`, `_launch_bwd`), so that none of them needs another's internals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cuflash._variant import Variant

# A user modification's auxiliary arrays (kMaxAux, kMaxAuxDims in kernels_cu/core/common.cuh).
MAX_AUX = 8
MAX_AUX_DIMS = 4
_STRIDE_FIELDS = ("batch_stride", "row_stride", "head_stride")
_SIDE_AXES = ("batch", "head", "row", "col")  # the bias's and the mask's (B, H, Sq, Sk) strides


def _params_dtype(pointers: tuple[str, ...], strided: tuple[str, ...], ints: tuple[str, ...]):
    fields = [(name, np.uint64) for name in pointers]
    fields += [(f"{t}_{s}", np.int64) for t in strided for s in _STRIDE_FIELDS]
    fields += [("lse_batch_stride", np.int64), ("lse_head_stride", np.int64)]
    fields += [(f"{t}_{axis}_stride", np.int64) for t in ("bias", "mask") for axis in _SIDE_AXES]
    fields += [("scale", np.float64), ("scale_log2", np.float32)]
    fields += [(name, np.int32) for name in (*ints, "bias_dtype")]
    fields += [("softcap", np.float64)]
    fields += [("aux", np.uint64, (MAX_AUX,)), ("aux_strides", np.int64, (MAX_AUX, MAX_AUX_DIMS))]
    fields += [("block_map", np.uint64), ("block_map_batch_stride", np.int64),
               ("block_map_head_stride", np.int64), ("block_map_rows", np.int32)]
    return np.dtype(fields, align=True)


_SHAPE_INTS = ("batch", "heads_q", "heads_kv", "group", "seqlen_q", "seqlen_k", "head_dim")

_WINDOW_INTS = ("window_left", "window_right")

FWD_PARAMS = _params_dtype(
    ("q", "k", "v", "o", "lse", "sinks", "alibi", "bias", "mask"), ("q", "k", "v", "o"),
    (*_SHAPE_INTS, *_WINDOW_INTS)
)
BWD_PARAMS = _params_dtype(
    ("q", "k", "v", "o", "dout", "lse", "dq", "dk", "dv", "dq_accum", "delta", "alibi", "bias",
     "mask", "dbias"),
    ("q", "k", "v", "o", "do", "dq", "dk", "dv"),
    (*_SHAPE_INTS, "head_dim_rounded", "deterministic", *_WINDOW_INTS),
)


# DecodeParams of kernels_cu/sm80/fwd_decode.cu, field for field.
DECODE_PARAMS = np.dtype(
    [(name, np.uint64) for name in ("q", "k", "v", "o", "lse", "sinks", "alibi", "o_partial",
                                     "lse_partial", "seqlens_k", "leftpad", "cache_rows",
                                     "block_table", "k_new", "v_new", "rotary_cos",
                                     "rotary_sin", "q_in")]
    + [(f"{t}_{s}", np.int64) for t in ("q", "k", "v", "o") for s in _STRIDE_FIELDS]
    + [(name, np.int64) for name in ("lse_batch_stride", "lse_head_stride",
                                     "block_table_stride")]
    + [(f"{t}_{s}", np.int64) for t in ("kn", "vn", "qi") for s in _STRIDE_FIELDS]
    + [("scale", np.float64), ("scale_log2", np.float32)]
    + [(name, np.int32) for name in ("batch", "heads_q", "heads_kv", "group", "seqlen_q",
                                     "head_dim", "window_left", "window_right", "cache_batch",
                                     "cache_len", "page_shift", "num_splits", "new_keys",
                                     "rotary_dim", "rotary_interleaved", "rotary_per_row")]
    + [("softcap", np.float64)],
    align=True,
)

@dataclass(frozen=True)
class Tile:
    """Tile sizes of one kernel family at one head-dim width."""

    block_m: int
    block_n: int
    warps: int


def width_for(head_dim: int, widths) -> int:
    """Smallest compiled head-dim width that holds `head_dim` (the rest is padded in registers)."""
    for width in sorted(widths):
        if head_dim <= width:
            return width
    raise ValueError(f"head dim {head_dim} exceeds the largest kernel width {max(widths)}")


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


# The pointer fields of FwdParams a forward launch fills, in the order `KernelCall` takes them;
# a launch with sinks fills theirs too, and one of a variant with the run-time modifications
# (`Variant.reads_arrays`) the sinks', the slopes', the bias's and the mask's
# (`fwd_pointer_fields`).
FWD_POINTERS = ("q", "k", "v", "o", "lse")
MOD_POINTERS = ("alibi", "bias", "mask")
BWD_MOD_POINTERS = (*MOD_POINTERS, "dbias")  # the backward's: where dbias goes, when asked for


@dataclass(frozen=True)
class Mods:
    """The arrays of the run-time modifications as the kernels read them (score.cuh's Mods),
    each a CuPy array on q's device or None: the ALiBi slopes, Accum ``(B, Hq)`` contiguous; the
    bias (float16/32/64) and the mask (bool), views of shape ``(B, Hq, Sq, Sk)`` with any
    strides (0 where broadcast); a user kind's aux arrays, which the parameter block carries
    (pointers and strides: such a call is planned anew each time, never replayed)."""

    alibi: Any = None
    bias: Any = None
    mask: Any = None
    dbias: Any = None  # the backward's: Accum (B, Hq, Sk, Sq), zeroed, when dbias is asked for
    aux: tuple = ()  # a user kind's arrays (CuPy), in its slots' order: pointers and strides
    # a user mask_mod's block map on q's device (`_block_map.BlockMap`)
    block_map: Any = None

    def pointers(self) -> tuple[int, ...]:
        """The forward's MOD_POINTERS."""
        return tuple(0 if a is None else a.data.ptr for a in (self.alibi, self.bias, self.mask))

    def bwd_pointers(self) -> tuple[int, ...]:
        """The backward's BWD_MOD_POINTERS."""
        return (*self.pointers(), 0 if self.dbias is None else self.dbias.data.ptr)

    def fields(self) -> dict[str, int]:
        """The parameter blocks' strides of the bias and the mask (elements), and the bias's
        itemsize."""
        found = {"bias_dtype": 4 if self.bias is None else self.bias.dtype.itemsize}
        for name, a in (("bias", self.bias), ("mask", self.mask)):
            strides = (0,) * 4 if a is None else tuple(s // a.dtype.itemsize for s in a.strides)
            found |= {f"{name}_{axis}_stride": s for axis, s in zip(_SIDE_AXES, strides,
                                                                    strict=True)}
        if self.aux:
            found |= aux_fields(self.aux)
        return found | block_map_fields(self.block_map)


def block_map_fields(block_map=None) -> dict[str, int]:
    """The parameter blocks' block map fields for a `_block_map.BlockMap` on the device (its
    `data`, CuPy int32 ``(Bm, Hm, plane)``, Bm and Hm 1 where broadcast; strides in planes),
    or none."""
    if block_map is None:
        return {"block_map": 0, "block_map_batch_stride": 0, "block_map_head_stride": 0,
                "block_map_rows": 0}
    batches, heads, _ = block_map.data.shape
    return {"block_map": block_map.data.data.ptr,
            "block_map_batch_stride": 0 if batches == 1 else heads,
            "block_map_head_stride": 0 if heads == 1 else 1,
            "block_map_rows": block_map.row_blocks}


def aux_fields(arrays=()) -> dict[str, np.ndarray]:
    """The parameter blocks' ``aux`` and ``aux_strides`` for a user kind's arrays (CuPy), in
    slot order; zeros where unused."""
    pointers = np.zeros(MAX_AUX, dtype=np.uint64)
    strides = np.zeros((MAX_AUX, MAX_AUX_DIMS), dtype=np.int64)
    for slot, a in enumerate(arrays):
        pointers[slot] = a.data.ptr
        strides[slot, :a.ndim] = [s // a.dtype.itemsize for s in a.strides]
    return {"aux": pointers, "aux_strides": strides}


NO_AUX = aux_fields()


NO_MODS = Mods()


def fwd_pointer_fields(sinks: bool, mods: bool = False) -> tuple[str, ...]:
    """FWD_POINTERS, then "sinks" with sinks or `mods` (a null sinks pointer is no sinks),
    then MOD_POINTERS with `mods`."""
    if mods:
        return (*FWD_POINTERS, "sinks", *MOD_POINTERS)
    return (*FWD_POINTERS, "sinks") if sinks else FWD_POINTERS


def forward_pointers(q, k, v, out, lse, sinks=None, mods: Mods | None = None) -> tuple[int, ...]:
    """The forward's pointer fields of CuPy arrays, as `fwd_pointer_fields` names them (lse
    and sinks may be None; `mods` for a variant with the run-time modifications)."""
    found = (q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr, 0 if lse is None else lse.data.ptr)
    if mods is not None:
        return (*found, 0 if sinks is None else sinks.data.ptr, *mods.pointers())
    return found if sinks is None else (*found, sinks.data.ptr)


def fwd_params(q, k, v, out, *, variant: Variant, scale: float, mods: Mods = NO_MODS):
    """The FwdParams block for (B, S, H, D) views, pointer fields zero (`KernelCall` fills the
    ones it launches with; a null sinks pointer is no sinks); `mods` gives the bias's and the
    mask's strides."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    _, seqlen_k, heads_kv, _ = k.shape
    fields = {**dict.fromkeys(fwd_pointer_fields(True, True), 0), **NO_AUX, **mods.fields(),
              **param_strides("q", q), **param_strides("k", k), **param_strides("v", v),
              **param_strides("o", out),
              "lse_batch_stride": heads_q * seqlen_q, "lse_head_stride": seqlen_q,
              "scale": scale, "scale_log2": scale * math.log2(math.e),
              "batch": batch, "heads_q": heads_q, "heads_kv": heads_kv,
              "group": heads_q // heads_kv, "seqlen_q": seqlen_q, "seqlen_k": seqlen_k,
              "head_dim": head_dim}
    fields["window_left"], fields["window_right"] = variant.window_params(seqlen_q, seqlen_k)
    fields["softcap"] = variant.softcap
    return pack_params(FWD_PARAMS, fields)
