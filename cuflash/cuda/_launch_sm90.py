"""Hopper forward (kernels_cu/sm90/fwd_sm90.cu): tile table, TMA tensor maps, qualification, launch.

`forward_sm90` launches the warp-specialised wgmma + TMA kernel when the problem qualifies and
returns True; otherwise it returns False without launching (the reason logged at debug level on
logger ``cuflash``) and the caller takes the sm80 kernel. It qualifies on compute capability 9.0,
fp16/bf16, head dim <= 256, seqlen_k >= 1 and TMA-legal q/k/v (16-byte aligned base addresses and
strides) with an out whose base and strides are 16-byte aligned too.
"""

from __future__ import annotations

import ctypes
import functools
import heapq
import logging
import math

import numpy as np

from cuflash import _dtypes, _variant
from cuflash._variant import Variant
from cuflash.cuda import _compile
from cuflash.cuda._kernel_call import KernelCall
from cuflash.cuda._launch_common import Tile, width_for
from cuflash.cuda._spec import KernelSpec

log = logging.getLogger("cuflash")

# Forward, wgmma + TMA, fp16/bf16. block_m = 64 rows per consumer warpgroup x 2 or 3
# consumers; warps = 4 per warpgroup x (1 producer + the consumers). block_n is bounded by the
# consumers' registers (240 each with two, 160 with three): S (block_n / 2 floats per thread) +
# O (width / 2) + P (block_n / 4), and by shared memory: at D=256, block_n 80 (FA3's choice)
# fills 230 KB of the H100's 227 KB limit and ran 4-15% faster than 64. D=64 runs three consumers
# (FA3's 192 x 128), or two with softmax turns (128 x 128, Q in registers) where 192-row tiles
# would pad the queries with too many rows: `takes_short_tile` (kernel_notes_sm90.md, steps 5-6,
# 18 and 22).
FWD_SM90_TILES: dict[int, Tile] = {
    64: Tile(block_m=192, block_n=128, warps=16),
    128: Tile(block_m=128, block_n=128, warps=12),
    256: Tile(block_m=128, block_n=80, warps=12),
}
FWD_SM90_SHORT_TILES: dict[int, Tile] = {64: Tile(block_m=128, block_n=128, warps=12)}
# D=64's short tile: always up to SHORT_ALWAYS_SEQLEN_Q queries, never past SHORT_MAX_SEQLEN_Q,
# and in between where the long tile would pad the queries to more than LONG_TILE_MAX_PADDING
# times the short tile's rows.
SHORT_ALWAYS_SEQLEN_Q = 1024
SHORT_MAX_SEQLEN_Q = 4096
LONG_TILE_MAX_PADDING = 1.02
STAGES = 2  # K/V shared-memory slots; mirrors FwdSm90Traits::kStages
SMEM_LIMIT = 232448  # opt-in shared memory per block on an H100; mirrors FwdSm90Traits::kSmemLimit
_TENSOR_DTYPES = ("float16", "bfloat16")
_CAUSAL = Variant("causal", -1, 0)


def q_stages(width: int, tile: Tile, itemsize: int = 2) -> int:
    """Q buffers of one block: two where they fit (the next tile's Q loads during this one), else
    one; mirrors FwdSm90Traits::kQStages."""
    return 2 if _smem_bytes_for(2, 0, width, tile, itemsize) <= SMEM_LIMIT else 1


def tma_store(width: int, tile: Tile, itemsize: int = 2) -> bool:
    """Whether the epilogue stages O in shared memory for TMA stores (where it fits: not at
    D=256); mirrors FwdSm90Traits::kTmaStore."""
    o_bytes = tile.block_m * width * itemsize
    return _smem_bytes_for(q_stages(width, tile, itemsize), o_bytes, width, tile,
                           itemsize) <= SMEM_LIMIT


def stores_o(width: int, tile: Tile, itemsize: int = 2) -> bool:
    """Whether the epilogue writes O through TMA stores (and so takes the output's tensor map):
    from the O buffer (tma_store), or, where that does not fit, from the last key tile's K and V
    slots, with two consumers whose 64 rows fit in a slot; mirrors FwdSm90Traits::kStoreO."""
    consumers = tile.warps // 4 - 1
    return tma_store(width, tile, itemsize) or (consumers == 2 and tile.block_n >= 64)


def smem_bytes(width: int, tile: Tile, itemsize: int = 2) -> int:
    """Dynamic shared memory of one block; mirrors FwdSm90Traits::kSmemBytes (the kernel traps on
    less)."""
    o_bytes = tile.block_m * width * itemsize if tma_store(width, tile, itemsize) else 0
    return _smem_bytes_for(q_stages(width, tile, itemsize), o_bytes, width, tile, itemsize)


def _smem_bytes_for(stages_q: int, o_bytes: int, width: int, tile: Tile, itemsize: int) -> int:
    q = tile.block_m * width * itemsize
    kv = tile.block_n * width * itemsize
    barriers = 8 * (2 * stages_q + 4 * STAGES)  # q_full/q_empty per Q buffer, 4 per K/V slot
    return stages_q * q + 2 * STAGES * kv + o_bytes + barriers + 1024  # + 1024: alignment slack


# Causal with a schedule table (takes_table): the last TAIL_ROUNDS rounds of pairs are dealt as
# single tiles, longest first, each onto the block with the least work so far (kernel notes step
# 23).
TAIL_ROUNDS = 2


def takes_table(spec: KernelSpec) -> bool:
    """Whether the kernel walks a schedule table from the host (causal_order) rather than the
    round robin of pairs: causal at D=64; mirrors FwdSm90Traits::kScheduleTable."""
    return spec.causal and spec.head_dim <= 64


def pairs_tiles(spec: KernelSpec) -> bool:
    """Whether the round robin deals pairs of query tiles (long m_blocks-1-j with short j): where
    a tile's cost grows with m_block, as under a causal mask, and a pair's is then about even.
    A window's cost is flat past its first tiles, so single tiles go round robin. Mirrors
    FwdSm90Schedule's kPairs."""
    return spec.mask == "causal"


def grid_size(batch: int, seqlen_q: int, heads_q: int, block_m: int, pairs: bool,
              sms: int) -> int:
    """Blocks of the persistent grid: one per SM, fewer when there are fewer work units (query
    tiles, or with `pairs` (the causal round robin) pairs of them)."""
    m_blocks = math.ceil(seqlen_q / block_m)
    return min((math.ceil(m_blocks / 2) if pairs else m_blocks) * heads_q * batch, sms)


@functools.lru_cache(maxsize=128)
def causal_order(batch: int, seqlen_q: int, seqlen_k: int, heads_q: int, block_m: int,
                 block_n: int, grid: int) -> np.ndarray:
    """The schedule table of a causal kernel that takes one (takes_table; int32, read-only):
    `grid + 1` offsets, then each block's work units, two entries each; block b's units are
    entries order[b] .. order[b + 1] - 1 (FwdSm90Schedule<kBlockM, true, true>). A tile is
    (batch * heads_q + head) * m_blocks + m_block; -1 is none.

    A unit pairs query tile m_blocks-1-j (long) with tile j (short) of one head: with Sq == Sk and
    block_m == block_n the pair costs m_blocks + 1 key tiles whatever j. Units go round robin in
    (batch, head)-major order (the units running at once share few heads, whose K/V stays hot in
    L2), but the last TAIL_ROUNDS * grid, which would leave the last round partly empty, are split
    into single tiles. A round of pairs at a time (so the tiles running at once still come from
    few heads: all the tail's heads at once ran 11% slower at D=256), its tiles go longest first,
    each to the block with the least work so far (cost: key tiles + 1 per tile). Unequal pairs
    (block_n != block_m, Sq != Sk) are evened out there too."""
    m_blocks = math.ceil(seqlen_q / block_m)
    if batch * heads_q * m_blocks >= 2**31:
        raise ValueError(f"{batch * heads_q * m_blocks} query tiles do not fit the kernel's int32")
    cost = _CAUSAL.key_tiles(seqlen_q, seqlen_k, block_m, block_n) + 1
    per_head = math.ceil(m_blocks / 2)
    j = np.arange(per_head)
    bh = np.arange(batch * heads_q)[:, None] * m_blocks
    first = (bh + (m_blocks - 1 - j)).ravel()
    second = np.where(2 * j + 1 == m_blocks, -1, bh + j).ravel()
    units = len(first)
    lead = units - min(units, TAIL_ROUNDS * grid)

    # The lead units round robin: block u % grid, as its (u // grid)-th unit.
    block = np.arange(lead) % grid
    load = np.bincount(block, weights=cost[first[:lead] % m_blocks] +
                       np.where(second[:lead] < 0, 0, cost[second[:lead] % m_blocks]),
                       minlength=grid)
    # The tail as singles, a round of pairs at a time (so that the tiles running at once still
    # come from few heads), each round's longest first to the least loaded block (ties: the
    # lowest block).
    heap = [(load[b], b) for b in range(grid)]
    heapq.heapify(heap)
    rounds = []
    for start in range(lead, units, grid):
        tail_first, tail_second = first[start:start + grid], second[start:start + grid]
        singles = np.concatenate([tail_first, tail_second[tail_second >= 0]])
        rounds.append(singles[np.argsort(-cost[singles % m_blocks], kind="stable")])
    singles = np.concatenate(rounds) if rounds else np.zeros(0, dtype=np.int64)
    single_block = np.empty(len(singles), dtype=np.int64)
    for i, tile in enumerate(singles):
        work, b = heapq.heappop(heap)
        single_block[i] = b
        heapq.heappush(heap, (work + cost[tile % m_blocks], b))

    # Each block's units in order: its lead units, then its singles as dealt.
    unit_block = np.concatenate([block, single_block])
    unit_first = np.concatenate([first[:lead], singles])
    unit_second = np.concatenate([second[:lead], np.full(len(singles), -1)])
    by_block = np.argsort(unit_block, kind="stable")
    offsets = grid + 1 + 2 * np.concatenate(
        [[0], np.cumsum(np.bincount(unit_block, minlength=grid))])
    entries = np.stack([unit_first[by_block], unit_second[by_block]], axis=1).ravel()
    order = np.concatenate([offsets, entries]).astype(np.int32)
    order.flags.writeable = False
    return order


def _upload(table: np.ndarray):
    """`table` in device memory of its own (not a pool's: it lives as long as the plan that
    holds it, beyond any call's allocations or graph pool). Runs once per table
    (`_causal_table`); the wait makes the copy visible to launches on any stream."""
    import cupy

    memory = cupy.cuda.Memory(table.nbytes)
    device = cupy.ndarray(table.shape, table.dtype, cupy.cuda.MemoryPointer(memory, 0))
    device.set(table)
    cupy.cuda.get_current_stream().synchronize()
    return memory, memory.ptr


# Keyed by what the table depends on, and the device it lives on: calls that plan anew (a new
# signature, or one that never replays) reuse the uploaded table rather than wait for an upload.
@functools.lru_cache(maxsize=64)
def _causal_table(device_id: int, batch: int, seqlen_q: int, seqlen_k: int, heads_q: int,
                  block_m: int, block_n: int, grid: int):
    """`causal_order`'s table uploaded (`_upload`): ``(memory, pointer)``, memoised."""
    return _upload(causal_order(batch, seqlen_q, seqlen_k, heads_q, block_m, block_n, grid))


def schedule(batch: int, seqlen_q: int, seqlen_k: int, heads_q: int, spec: KernelSpec,
             grid: int) -> list[list[tuple[int, int, int]]]:
    """The query tiles (m_block, head, batch) that each of `grid` blocks of `spec` computes, in
    order, as fwd_sm90 walks them (FwdSm90Schedule): the table's units (takes_table), else work
    unit u on block u % grid, a unit being a query tile, or causal a pair of them (tile
    m_blocks-1-j, then j, of one head), (batch, head)-major."""
    block_m = spec.block_m
    m_blocks = math.ceil(seqlen_q / block_m)
    if takes_table(spec):
        order = causal_order(batch, seqlen_q, seqlen_k, heads_q, block_m, spec.block_n, grid)
        tiles = [[int(t) for t in order[order[b]:order[b + 1]] if t >= 0] for b in range(grid)]
    else:
        pairs = pairs_tiles(spec)
        per_head = math.ceil(m_blocks / 2) if pairs else m_blocks
        tiles = [[] for _ in range(grid)]
        for u in range(per_head * heads_q * batch):
            bh, j = divmod(u, per_head)
            pair = [m_blocks - 1 - j, j] if pairs and 2 * j + 1 != m_blocks else \
                [m_blocks - 1 - j] if pairs else [j]
            tiles[u % grid] += [bh * m_blocks + m for m in pair]
    return [[(t % m_blocks, t // m_blocks % heads_q, t // m_blocks // heads_q) for t in block]
            for block in tiles]


@functools.cache
def sm_count(device_id: int) -> int:
    """Streaming multiprocessors of the device: the persistent grid's size."""
    import cupy

    return cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


def takes_short_tile(seqlen_q: int, head_dim: int) -> bool:
    """Whether `seqlen_q` queries take the width's short tile (FWD_SM90_SHORT_TILES: D=64's two
    consumers) rather than its long one (three consumers). Measured three over two (kernel notes
    step 22): 0.88-0.95 at 1k; between 1k and 4k 1.03-1.12 where 192-row tiles pad the queries
    to no more rows than 128-row tiles do (1536, 2304, 3072, 4608) and 0.91-1.00 where they pad
    3-5% more (2048, 2560) or 2.3% (2816: 0.98-0.99); past 4k, 1.02-1.12 however they pad."""
    width = width_for(head_dim, FWD_SM90_TILES)
    short = FWD_SM90_SHORT_TILES.get(width)
    if short is None or seqlen_q > SHORT_MAX_SEQLEN_Q:
        return False
    if seqlen_q <= SHORT_ALWAYS_SEQLEN_Q:
        return True
    long_m = FWD_SM90_TILES[width].block_m
    padded_long = math.ceil(seqlen_q / long_m) * long_m
    padded_short = math.ceil(seqlen_q / short.block_m) * short.block_m
    return padded_long > LONG_TILE_MAX_PADDING * padded_short


@functools.cache
def fwd_sm90_spec(dtype: str, head_dim: int, mask: str, short: bool = False,
                  score: str = "none", sinks: bool = False) -> KernelSpec:
    """The Hopper forward kernel for one problem class (memoised: hot path). `short`: the width's
    short tile where there is one (`takes_short_tile`); `mask`, `score`: the variant's kinds;
    `sinks`: whether the call has attention sinks."""
    width = width_for(head_dim, FWD_SM90_TILES)
    tile = FWD_SM90_TILES[width]
    # A score modification takes the short tile: the long one's three consumers have 128
    # registers a thread, which the modification's values overflow (spills).
    if short or score != "none":
        tile = FWD_SM90_SHORT_TILES.get(width, tile)
    return KernelSpec("sm90/fwd_sm90.cu", "fwd_sm90", dtype, width, tile.block_m, tile.block_n,
                      tile.warps, mask, True, smem_bytes(width, tile, _dtypes.itemsize(dtype)),
                      min_arch=90, score=score, sinks=sinks)


# The widths whose Hopper forward takes the "mods" score kind (a bias, a mask array) and user
# kinds (which may read arrays as freely): at 256 the consumers' 168 registers do not hold the
# per-score loads and branches, and sm80 runs it.
FWD_SM90_MODS_WIDTHS = (64, 128)
# A user kind that also reads ALiBi, a bias or a mask array (`UserKind.arrays`): at 128 its
# two masking paths with the arrays' loads spill hundreds of bytes, and sm80 runs it.
FWD_SM90_USER_ARRAYS_WIDTHS = (64,)


def takes_score(score, head_dim: int) -> bool:
    """Whether the Hopper forward takes score kind `score` at head dim `head_dim`."""
    width = width_for(head_dim, FWD_SM90_TILES)
    if isinstance(score, str):
        return score != "mods" or width in FWD_SM90_MODS_WIDTHS
    return width in (FWD_SM90_USER_ARRAYS_WIDTHS if score.arrays else FWD_SM90_MODS_WIDTHS)


def all_fwd_sm90_specs() -> list[KernelSpec]:
    """Every instantiation forward_sm90 can choose (for the compile test)."""
    specs = {fwd_sm90_spec(dtype, width, mask, short, score, sinks): None
             for dtype in _TENSOR_DTYPES for width in FWD_SM90_TILES
             for mask in _variant.MASK_KINDS for short in (False, True)
             for score in _variant.SCORE_KINDS for sinks in (False, True)
             if takes_score(score, width)}
    return list(specs)


# ---- TMA tensor maps --------------------------------------------------------------------------

# A CUtensorMap as the kernel's `TmaMap` parameter: 128 bytes, 64-byte aligned.
TMA_MAP = np.dtype({"names": ["opaque"], "formats": [(np.uint64, 16)], "offsets": [0],
                    "itemsize": 128})
_UNUSED_MAP = np.zeros(1, dtype=TMA_MAP)[0]  # for a map parameter the kernel does not read


@functools.cache
def _driver():
    """cuda.bindings.driver, or None where it is not installed."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return None
    return driver


# Encoding through cuda.bindings costs tens of microseconds of Python per map, three maps per
# call: most of a small problem's time. A map depends only on these arguments, and caching
# allocators hand the same buffers back call after call, so a small memo hits in steady state.
@functools.lru_cache(maxsize=256)
def _encode(ptr: int, shape: tuple[int, ...], byte_strides: tuple[int, ...], dtype: str,
            block_rows: int) -> bytes:
    """A rank-4 tensor map over a (B, S, H, D) view at `ptr`: dims innermost first (D, S, H, B),
    boxes of 128 bytes of columns (64 16-bit or 32 fp32 ones) x `block_rows` rows, 128-byte
    swizzle, out-of-bounds elements read 0 (and are not written by reductions)."""
    drv = _driver()
    batch, seqlen, heads, head_dim = shape
    dims = (head_dim, seqlen, heads, batch)
    # A stride of an axis of extent 1 is never stepped but must still be legal for TMA.
    strides = tuple(s if n > 1 else 16 for s, n in zip(
        (byte_strides[1], byte_strides[2], byte_strides[0]), dims[1:], strict=True))
    types = drv.CUtensorMapDataType
    data_type = {"float16": types.CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                 "bfloat16": types.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                 "float32": types.CU_TENSOR_MAP_DATA_TYPE_FLOAT32}[dtype]
    box_cols = 128 // _dtypes.itemsize(dtype)
    err, tensor_map = drv.cuTensorMapEncodeTiled(
        data_type, 4, ptr,
        [drv.cuuint64_t(d) for d in dims],
        [drv.cuuint64_t(s) for s in strides],
        [drv.cuuint32_t(b) for b in (box_cols, block_rows, 1, 1)],
        [drv.cuuint32_t(1)] * 4,
        drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        drv.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    if err != drv.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({err}) for shape {shape}, "
                           f"strides {byte_strides}, dtype {dtype}")
    return ctypes.string_at(tensor_map.getPtr(), 128)


def _tma_reason(name: str, array) -> str | None:
    """Why `array` cannot be read through a tensor map (None when it can)."""
    itemsize = array.dtype.itemsize
    if array.data.ptr % 16:
        return f"{name} base address is not 16-byte aligned"
    for axis, (extent, stride) in enumerate(zip(array.shape[:-1], array.strides[:-1],
                                                strict=True)):
        if extent > 1 and (stride <= 0 or stride % 16 or stride >= 1 << 40):
            return f"{name} stride {stride // itemsize} (axis {axis}) is not a positive multiple " \
                   f"of 16 bytes"
    return None


def tma_kernel_reason(cc: int, dtype: str, head_dim: int, max_head_dim: int,
                      arrays) -> str | None:
    """Why a Hopper TMA kernel (this forward, the backward's dK/dV) cannot take these operands,
    None when it can: compute capability 9.0, fp16/bf16, head dim up to `max_head_dim`,
    cuda.bindings present to encode tensor maps, and every (name, array) non-empty and
    TMA-legal."""
    if cc != 90:
        return f"compute capability {cc} is not 90"
    if dtype not in _TENSOR_DTYPES:
        return f"dtype {dtype} is not float16/bfloat16"
    if head_dim > max_head_dim:
        return f"head dim {head_dim} > {max_head_dim}"
    if _driver() is None:
        return "cuda.bindings is not installed (needed to encode TMA tensor maps)"
    for name, array in arrays:
        if 0 in array.shape:
            return f"{name} is empty"
        reason = _tma_reason(name, array)
        if reason is not None:
            return reason
    return None


def _reject(reason: str) -> None:
    """Log why the Hopper kernel does not take a call; None is plan_sm90's "not applicable"."""
    log.debug("fwd_sm90 not taken, falling back to sm80: %s", reason)


def forward_sm90(q, k, v, out, lse, *, variant: Variant, scale: float, device_id: int,
                 cc: int) -> bool:
    """Launch the Hopper forward on CuPy's current stream, or return False when it does not apply.

    q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), out like q: CuPy arrays with any strides and a unit
    last stride. lse: float32 (B, Hq, Sq) C-contiguous, or None. Returns True when the launch was
    made (or there was nothing to compute); False, having launched nothing, when the inputs do not
    qualify.
    """
    import cupy

    from cuflash.cuda._launch_common import forward_pointers

    batch, seqlen_q, heads_q, head_dim = q.shape
    qualifies = (cc == 90 and _dtypes.dtype_name(q.dtype) in _TENSOR_DTYPES
                 and head_dim <= max(FWD_SM90_TILES))
    if qualifies and 0 in (batch, seqlen_q, heads_q):
        return True  # nothing to compute (empty arrays may carry any strides)
    call = plan_sm90(q, k, v, out, variant=variant, scale=scale, device_id=device_id, cc=cc)
    if call is None:
        return False
    call(forward_pointers(q, k, v, out, lse), cupy.cuda.get_current_stream().ptr)
    return True


def plan_sm90(q, k, v, out, *, variant: Variant, scale: float, device_id: int, cc: int,
              sinks: bool = False, mods=None):
    """The replayable `KernelCall` of the Hopper forward for these views, or None (reason
    logged) when they do not qualify. Expects a non-empty problem. `sinks`: the call has
    attention sinks, whose address each launch passes after lse; `mods`: the arrays of the
    run-time modifications (`_launch_common.Mods`), for their strides."""
    from cuflash.cuda._launch_common import NO_MODS, fwd_params, fwd_pointer_fields

    mods = NO_MODS if mods is None else mods

    batch, seqlen_q, heads_q, head_dim = q.shape
    dtype = _dtypes.dtype_name(q.dtype)
    reason = tma_kernel_reason(cc, dtype, head_dim, max(FWD_SM90_TILES),
                               (("q", q), ("k", k), ("v", v), ("out", out)))
    if reason is None and not takes_score(variant.score, head_dim):
        reason = (f"a bias, mask or user modification at head dim {head_dim} (the Hopper "
                  f"forward spills with one there)")
    if reason is not None:
        return _reject(reason)  # an empty k: seqlen_k = 0

    spec = fwd_sm90_spec(dtype, head_dim, variant.mask, takes_short_tile(seqlen_q, head_dim),
                         variant.score, sinks)
    # Persistent: at most one block per SM, each looping over query tiles (as its table says
    # where the kernel takes one; the others take a null pointer).
    table = takes_table(spec)
    grid = grid_size(batch, seqlen_q, heads_q, spec.block_m, pairs_tiles(spec) and not table,
                     sm_count(device_id))
    keep, order = None, 0
    if table:
        keep, order = _causal_table(device_id, batch, seqlen_q, k.shape[1], heads_q,
                                    spec.block_m, spec.block_n, grid)

    def tensor_map(name: str, array, rows: int):
        shape, strides = tuple(array.shape), tuple(array.strides)
        return name, functools.partial(encode_at, shape=shape, byte_strides=strides,
                                       dtype=dtype, block_rows=rows)

    maps = (tensor_map("q", q, spec.block_m), tensor_map("k", k, spec.block_n),
            tensor_map("v", v, spec.block_n))
    # The output's map (64-row boxes) only where the kernel stores through it: encoding one is
    # per-call work whenever the output buffer moves.
    if stores_o(spec.head_dim, Tile(spec.block_m, spec.block_n, spec.warps), q.dtype.itemsize):
        maps, args = (*maps, tensor_map("o", out, 64)), (np.uint64(order),)
    else:
        args = (_UNUSED_MAP, np.uint64(order))
    return KernelCall(
        _compile.get_function(spec, device_id, cc), device_id,
        grid=(grid, 1, 1),
        threads=spec.threads,
        smem_bytes=spec.smem_bytes,
        params=fwd_params(q, k, v, out, variant=variant, scale=scale, mods=mods),
        pointer_fields=fwd_pointer_fields(sinks, variant.reads_arrays),
        tensor_maps=maps,
        args=args,
        keep=keep,
    )


def encode_at(ptr: int, *, shape, byte_strides, dtype: str, block_rows: int) -> bytes:
    return _encode(ptr, shape, byte_strides, dtype, block_rows)
