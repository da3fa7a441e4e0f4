"""Attention dropout's random stream: which probabilities a call keeps, as a pure function of the
call's ``rng = (seed, offset)`` and each score's position, so that a backward regenerates the
forward's mask instead of storing it, and every path (the CPU path, the reference, the kernels)
draws the same one.

The stream is Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011), keyed by the 64-bit seed. Element ``(b, h, i, j)`` of a call with Hq heads, Sq query
rows and Sk keys reads word ``j % 4`` of the block at counter ``(n, offset)``: the 64-bit group
index ``n = ((b * Hq + h) * Sq + i) * ceil(Sk / 4) + j // 4`` in the counter's low words, the
64-bit offset in its high words (so one offset is one independent stream, and a row's groups
never straddle rows). A probability is kept where that word is at least
``threshold(p) = floor(p * 2^32)``, and the kept ones are scaled by ``1 / (1 - p)``.
"""

from __future__ import annotations

import numbers

import numpy as np

# Philox4x32's multipliers and Weyl key increments (Random123).
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_MASK32 = np.uint64(0xFFFFFFFF)
# The largest seed and offset: 64-bit counters and keys.
_MAX_64 = 2**64 - 1


def philox4x32(counter: tuple, key: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 of broadcasting uint32 counter words ``(c0, c1, c2, c3)`` under the key
    ``(k0, k1)``: four uint32 arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (int(k) & 0xFFFFFFFF for k in key)
    for _ in range(_ROUNDS):
        p0, p1 = _M0 * c0, _M1 * c2  # exact: both factors < 2^32
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0, c1, c2, c3 = (hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0)
        k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def threshold(p: float) -> int:
    """The uint32 a word must reach to keep its probability: ``floor(p * 2^32)``."""
    return min(int(p * 2.0**32), 2**32 - 1)


def keep(shape: tuple[int, int, int, int], p: float, rng: tuple[int, int], *,
         rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> np.ndarray:
    """Which probabilities a call of scores ``shape = (B, Hq, Sq, Sk)`` keeps: bool
    ``(B, Hq, len(rows), len(cols))`` (rows and keys default to all)."""
    batch, heads, seqlen_q, seqlen_k = shape
    seed, offset = rng
    rows = np.arange(seqlen_q) if rows is None else np.asarray(rows)
    cols = np.arange(seqlen_k) if cols is None else np.asarray(cols)
    groups = (seqlen_k + 3) // 4
    bh = np.arange(batch * heads, dtype=np.uint64).reshape(batch, heads, 1, 1)
    n = ((bh * np.uint64(seqlen_q) + rows.astype(np.uint64).reshape(1, 1, -1, 1))
         * np.uint64(groups) + (cols.astype(np.uint64) // np.uint64(4)).reshape(1, 1, 1, -1))
    words = philox4x32((n & _MASK32, n >> np.uint64(32), offset & 0xFFFFFFFF, offset >> 32),
                       (seed & 0xFFFFFFFF, seed >> 32))
    lane = (cols % 4).reshape(1, 1, 1, -1)
    word = np.choose(np.broadcast_to(lane, n.shape), words)
    return word >= np.uint32(threshold(p))


def scaled(shape: tuple[int, int, int, int], p: float, rng: tuple[int, int],
           dtype=np.float64, **where) -> np.ndarray:
    """`keep`'s mask as the factor dropout multiplies each probability by: ``1 / (1 - p)``
    where kept, 0 elsewhere, in `dtype` (`where`: `keep`'s rows and cols)."""
    dtype = np.dtype(dtype)
    return np.where(keep(shape, p, rng, **where), dtype.type(1.0 / (1.0 - p)), dtype.type(0))


def of_sequence(rng: tuple[int, int] | None, b: int) -> tuple[int, int] | None:
    """The stream of sequence `b` of a packed (varlen) call: ``(seed, offset + b)``, so that a
    call of B sequences takes offsets ``offset .. offset + B - 1``."""
    return None if rng is None else (rng[0], (rng[1] + b) % 2**64)


def is_off(dropout_p: object, rng: object) -> bool:
    """Whether a call's dropout arguments are the defaults (p 0 as a plain int or float, no
    rng): what a replayed call may have, before anything is validated."""
    return type(dropout_p) in (int, float) and dropout_p == 0 and rng is None


def check(dropout_p: object, rng: object, *, needs_rng: bool = True) -> tuple[float, tuple | None]:
    """Validate `dropout_p` (a real number in [0, 1)) and `rng` (a pair of ints ``(seed,
    offset)``, each in [0, 2^64)); ``(p, rng)``, rng None for p = 0. Raises naming the argument.
    `needs_rng`: whether a p > 0 without `rng` is an error (callers that draw one pass False)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a real number in [0, 1), got {dropout_p!r}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p: expected a number in [0, 1) (the probability of dropping "
                         f"each attention probability), got {dropout_p!r}")
    if rng is None:
        if p > 0.0 and needs_rng:
            raise ValueError("rng: dropout_p > 0 needs rng=(seed, offset), two ints: the "
                             "random stream the forward draws and the backward draws again")
        return p, None
    valid = (isinstance(rng, (tuple, list)) and len(rng) == 2
             and all(isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))
                     and 0 <= x <= _MAX_64 for x in rng))
    if not valid:
        raise TypeError(f"rng: expected (seed, offset), two ints in [0, 2**64), got {rng!r}")
    return p, (int(rng[0]), int(rng[1]))
