"""Variant: which kind of attention a problem asks for, described once, as data.

A variant has a compile-time part, which picks the kernel (its mask *kind* becomes a C++ template
type argument, ``cuflash::WindowMask``), and run-time values that travel in the kernel's parameter
block (the window's sizes). Everything that needs to know the mask asks the variant: the kernel
specs, the launch planners, the Hopper schedule, the CPU path and the FLOP count. The CUDA side
of the same rule is ``attention/mask.cuh``; ``cuflash.reference`` keeps its own naive formula on
purpose, as the oracle both are tested against.

The mask is a band around the bottom-right aligned diagonal (flash-attn's convention): with
``shift = Sk - Sq``, query i sees key j iff ``0 <= j < Sk`` and
``i + shift - left <= j <= i + shift + right``, where -1 means that side is unbounded.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

MASK_KINDS = ("none", "causal", "window")
# C++ type of each mask kind (kernels_cu/attention/mask.cuh).
_CPP_MASK = {"none": "cuflash::NoMask", "causal": "cuflash::CausalMask",
             "window": "cuflash::WindowMask"}
# The score modifications the kernels compile in, and their C++ types (attention/score.cuh).
SCORE_KINDS = ("none", "softcap", "alibi", "mods")
_CPP_SCORE = {"none": "cuflash::NoScore", "softcap": "cuflash::Softcap", "alibi": "cuflash::Alibi",
              "mods": "cuflash::Mods"}


def cpp_mask(kind: str) -> str:
    """The C++ type of mask kind `kind` (a `MASK_KINDS` name)."""
    return _CPP_MASK[kind]


def cpp_score(kind) -> str:
    """The C++ type of score kind `kind`: a `SCORE_KINDS` name, or a user kind
    (`_user_mods.UserKind`), which names its generated type."""
    return _CPP_SCORE[kind] if isinstance(kind, str) else kind.cpp


@dataclass(frozen=True)
class Variant:
    """The kind of attention: its mask and its score modifications.

    Attributes:
        mask: ``"none"``, ``"causal"`` or ``"window"``: the compile-time mask kind.
        left, right: the window's reach before and after the diagonal (-1: unbounded). Only
            ``"window"`` reads them; the other kinds hold (-1, -1) and (-1, 0).
        softcap: ``> 0``: scores (after scaling) become ``softcap * tanh(s / softcap)``; 0: off.
        alibi: whether ALiBi biases are added (``-slope * |i + Sk - Sq - j|``, the slopes a
            run-time array that travels beside the variant).
        sinks: whether each query head's softmax has a sink, a virtual key with a logit of its
            own and no value (its logits travel beside the variant).
        bias: whether an additive bias tensor is added to the scores (last, after ALiBi).
        mask_array: whether a boolean mask tensor hides keys (besides the mask kind).
        user: the caller's own modifications (`cuflash.ScoreMod`, `cuflash.MaskMod`) as their
            compile-time kind (`_user_mods.UserKind`), or None. The score_mod applies after
            the built-ins (softcap, ALiBi, bias); the mask_mod hides beside the mask array.
    Every path computes all of them: on CUDA the sinks fold into each finished row, and the
    others are the compile-time score kind `score` (ALiBi, the bias and the mask array as the
    kinds ``"alibi"`` and ``"mods"``, or inside a user kind). The CUDA kernels take a softcap
    alone or with sinks only (validation refuses the rest there).

    Build one with `Variant.of`, which normalises equal masks to one variant: a window of
    (-1, -1) is ``"none"`` and (-1, 0) is ``"causal"``, so they share kernels bit for bit.
    """

    mask: str = "none"
    left: int = -1
    right: int = -1
    softcap: float = 0.0
    alibi: bool = False
    sinks: bool = False
    bias: bool = False
    mask_array: bool = False
    user: object = None  # a _user_mods.UserKind

    @staticmethod
    def of(*, causal: bool = False, window=None, softcap=0.0, alibi: bool = False,
           sinks: bool = False, bias: bool = False, mask_array: bool = False,
           user=None) -> Variant:
        """The variant of `attention`'s ``causal``, ``window`` and ``softcap`` arguments (all
        validated) and whether it has ALiBi slopes, sinks, a bias and a mask array."""
        left, right = check_window(window)
        cap = check_softcap(softcap)
        if causal:
            right = 0  # causal clips the window's right side to the diagonal
        if left < 0 and right < 0:
            return Variant("none", -1, -1, cap, alibi, sinks, bias, mask_array, user)
        if left < 0 and right == 0:
            return Variant("causal", -1, 0, cap, alibi, sinks, bias, mask_array, user)
        return Variant("window", left, right, cap, alibi, sinks, bias, mask_array, user)

    @property
    def causal(self) -> bool:
        return self.mask == "causal"

    @property
    def window(self) -> tuple[int, int] | None:
        """(left, right) as the caller would pass it, or None for no mask."""
        return None if self.mask == "none" else (self.left, self.right)

    @property
    def cpp_mask(self) -> str:
        return _CPP_MASK[self.mask]

    @property
    def score(self):
        """The compile-time score kind (a `SCORE_KINDS` name, or the user's kind): what the
        kernels modify. ``"alibi"`` is ALiBi alone; ``"mods"`` a bias and/or a mask array, with
        ALiBi where the parameter block has slopes (each tested at run time). Neither takes a
        softcap."""
        if self.user is not None:
            return self.user
        if self.bias or self.mask_array:
            return "mods"
        if self.alibi:
            return "alibi"
        return "softcap" if self.softcap else "none"

    @property
    def reads_arrays(self) -> bool:
        """Whether the kernels read the ALiBi slopes, a bias or a mask array
        (`_launch_common.Mods`), by their kind ``"alibi"``, ``"mods"`` or a user kind's."""
        return self.alibi or self.bias or self.mask_array

    def window_params(self, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
        """(window_left, window_right) for the parameter block: an unbounded side, and any
        reach past both sequences, becomes seqlen_q + seqlen_k (no row reaches it). The kernels'
        sums reach seqlen_q + 2 * seqlen_k, which validation keeps within int32."""
        reach = seqlen_q + seqlen_k
        return tuple(reach if x < 0 else min(x, reach) for x in (self.left, self.right))

    # ---- the mask, in Python (the CPU path, schedules and FLOP counts) ---------------------

    def key_bounds(self, rows: np.ndarray, seqlen_q: int, seqlen_k: int):
        """Each row's visible keys as ``(first, end)`` int64 arrays: keys ``first <= j < end``
        (``end <= first`` when the row sees none)."""
        rows = np.asarray(rows, dtype=np.int64)
        shift = seqlen_k - seqlen_q
        first = np.zeros_like(rows)
        end = np.full_like(rows, seqlen_k)
        if self.right >= 0:
            end = np.clip(rows + shift + self.right + 1, 0, seqlen_k)
        if self.left >= 0:
            first = np.clip(rows + shift - self.left, 0, seqlen_k)
        return first, end

    def key_span(self, row_begin: int, row_end: int, seqlen_q: int, seqlen_k: int):
        """Keys some row of [row_begin, row_end) sees, as a half-open (begin, end)."""
        first, end = self.key_bounds(np.array([row_begin, row_end - 1]), seqlen_q, seqlen_k)
        begin, stop = int(first[0]), int(end[1])
        return min(begin, stop), stop

    def visible_pairs(self, seqlen_q: int, seqlen_k: int) -> int:
        """How many (query, key) pairs the mask lets through: the work a kernel must do."""
        if self.mask == "none":
            return seqlen_q * seqlen_k
        first, end = self.key_bounds(np.arange(seqlen_q), seqlen_q, seqlen_k)
        return int(np.maximum(end - first, 0).sum())

    def key_tiles(self, seqlen_q: int, seqlen_k: int, block_m: int, block_n: int) -> np.ndarray:
        """Key tiles each query tile (by m_block) visits: its cost, for the Hopper schedule."""
        m_blocks = -(-seqlen_q // block_m)
        starts = np.arange(m_blocks, dtype=np.int64) * block_m
        first, _ = self.key_bounds(starts, seqlen_q, seqlen_k)
        # A tile's last rows may lie past seqlen_q; the kernels count them as rows, so do we.
        _, end = self.key_bounds(starts + block_m - 1, seqlen_q, seqlen_k)
        first = np.minimum(first, end)
        return np.where(end > first, -(-end // block_n) - first // block_n, 0)


def diagonal_distance(rows: np.ndarray, cols: np.ndarray, seqlen_q: int,
                      seqlen_k: int) -> np.ndarray:
    """``|i + Sk - Sq - j|``: how far key j lies from query i's bottom-right aligned diagonal,
    for every pair of `rows` x `cols` (ALiBi's distance)."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    return np.abs(rows[:, None] + (seqlen_k - seqlen_q) - cols[None, :])


def from_top_left(left: int, right: int, seqlen_q: int,
                  seqlen_k: int) -> tuple[tuple[int, int], int]:
    """A band aligned top-left as cuflash's bottom-right window: ``(window, keys)``.

    Top-left (``jax.nn.dot_product_attention``'s ``is_causal`` and ``local_window_size``): query
    i sees key j iff ``i - left <= j <= i + right`` (-1: that side unbounded). The same band is
    `window` over the first `keys` keys: keys no query sees are cut off, so that a right side
    moved onto the bottom-right diagonal never falls below it. Raises ValueError where a left side
    would (more queries than ``seqlen_k + left``: the last queries would see no key).
    """
    keys = seqlen_k if right < 0 else min(seqlen_k, seqlen_q + right)
    shift = keys - seqlen_q  # the bottom-right diagonal of the kept keys, from the top-left one
    new_left = -1 if left < 0 else left + shift
    if left >= 0 and new_left < 0:
        raise ValueError(f"a left window of {left} with {seqlen_q} queries and {seqlen_k} keys "
                         f"leaves queries {seqlen_k + left} and later with no key to see, which "
                         f"cuflash's bottom-right aligned window cannot express")
    return (new_left, -1 if right < 0 else right - shift), keys


# The largest softcap: scores are capped in the compute dtype, float32 included.
MAX_SOFTCAP = float(np.finfo(np.float32).max)


def check_softcap(softcap) -> float:
    """`softcap` as a float in [0, MAX_SOFTCAP] (0: off). Raises naming ``softcap``."""
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected a real number >= 0 (0: off), got {softcap!r}")
    value = float(softcap)
    if not 0.0 <= value <= MAX_SOFTCAP:  # NaN fails too
        raise ValueError(f"softcap: expected a finite number >= 0 and at most {MAX_SOFTCAP:.5g} "
                         f"(0: off), got {value!r}")
    return value


def check_window(window) -> tuple[int, int]:
    """`window` as (left, right) ints >= -1; (-1, -1) for None. Raises naming ``window``."""
    if window is None:
        return -1, -1
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
        raise TypeError(f"window: expected None or a pair (left, right) of ints, got {window!r}")
    out = []
    for side, x in zip(("left", "right"), window, strict=True):
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
            raise TypeError(f"window: {side} must be an int (-1 for unbounded), got {x!r} in "
                            f"{window!r}")
        if x < -1:
            raise ValueError(f"window: {side} must be >= -1 (-1 for unbounded), got {int(x)} in "
                             f"{tuple(window)!r}")
        out.append(int(x))
    return out[0], out[1]
