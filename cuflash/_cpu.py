"""The CPU path: FlashAttention (forward and FA2 backward) in NumPy, tiled, never N x N.

Internal: :mod:`cuflash._core` validates, picks the scale and brings every tensor to the canonical
4-D ``(B, S, H, D)`` layout (any strides) before calling in here.

The loops run over query blocks and key blocks exactly like the GPU kernels, vectorised over batch
and heads. GQA is handled by folding the ``G = Hq // Hkv`` query heads that share a kv head into the
rows of one block: q ``(B, Hkv, G * block_q, D)`` against k ``(B, Hkv, block_k, D)``, so k and v
are never repeated in memory. The largest temporary is one score tile ``(B, Hq, BLOCK_Q, BLOCK_K)``;
everything else is O(S).

Compute dtype: float64 for float64 inputs, float32 otherwise (float16 is computed in float32).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from cuflash import _dropout
from cuflash._variant import Variant, diagonal_distance

if TYPE_CHECKING:
    from cuflash._user_mods import UserCall

# Tile sizes. Measured on 2 cores (OpenBLAS, fp32, B=1, H=8, D=64, S=4096, not causal): forward
# ~0.85 s with 128 x 512, ~1.35 s with 64 x 256 (per-tile Python overhead); 256 x 512 is no faster
# and doubles the score tile.
BLOCK_Q = 128
BLOCK_K = 512


# With a large scale, scale * (s - m) overflows to -inf where exp must give 0 anyway, and an lse
# beyond float32's range rounds to +-inf: neither is an error worth a RuntimeWarning.
@np.errstate(over="ignore")
def forward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, *, variant: Variant, scale: float,
    alibi_slopes: np.ndarray | None = None, sinks: np.ndarray | None = None,
    bias: np.ndarray | None = None, mask: np.ndarray | None = None,
    user: UserCall | None = None, dropout: tuple | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Attention forward pass.

    Args:
        q: ``(B, Sq, Hq, D)``; k: ``(B, Sk, Hkv, D)``; v: ``(B, Sk, Hkv, Dv)`` (its head dim
            may differ); one dtype among float16/32/64, any strides. ``Hq % Hkv == 0``.
        variant: the mask (`Variant.key_bounds`: the keys each query sees) and the softcap
            (``variant.softcap > 0``: scores become ``softcap * tanh(scale * s / softcap)``).
        scale: softmax scale.
        alibi_slopes: ``(B, Hq)`` or None: ALiBi, ``-slope * |i + Sk - Sq - j|`` added to the
            (scaled, capped) scores.
        sinks: ``(Hq,)`` or None: each head's sink logit, a virtual key with no value in every
            row's softmax (``lse`` includes it; a row that sees no key gets zeros and
            ``lse = sink``).
        bias: None or an array broadcastable to ``(B, Hq, Sq, Sk)``, added to the scores after
            ALiBi; read block by block, never expanded.
        mask: None or a bool array broadcastable to ``(B, Hq, Sq, Sk)``: False hides the key
            from the query (as causal and window do).
        user: the NumPy forms of a score_mod (applied to the scaled scores) and a mask_mod
            (False hides the key), with their aux arrays; None without them.
        dropout: ``(p, (seed, offset))``: each probability kept where `_dropout.keep` says,
            scaled by ``1 / (1 - p)``, before it weights the values (lse is without it); None:
            no dropout.

    Returns:
        ``out`` ``(B, Sq, Hq, Dv)`` C-contiguous in q's dtype, and ``lse`` ``(B, Hq, Sq)`` float32
        (natural log). Rows that see no key have ``out = 0`` and ``lse = -inf``; NaN inputs
        reach exactly the rows :mod:`cuflash.reference` says (docs/api.md, NaN policy).
    """
    b, sq, hq, _ = q.shape
    sk, hkv, dim_v = k.shape[1], k.shape[2], v.shape[3]
    dtype = _compute_dtype(q.dtype)
    q_t = _grouped_q(q, hkv, dtype)  # (B, Hkv, G, Sq, D)
    k_t, v_t = _heads_first(k, dtype), _heads_first(v, dtype)  # (B, Hkv, Sk, D), (.., Dv)

    out = np.empty((b, sq, hq, dim_v), dtype=q.dtype)
    lse = np.empty((b, hq, sq), dtype=np.float32)
    mods = _ScoreMods(variant, scale, dtype, alibi_slopes, sinks, bias, mask,
                      (b, hq, hkv, sq, sk), user)
    for i0 in range(0, sq, BLOCK_Q):
        i1 = min(i0 + BLOCK_Q, sq)
        q_blk = _rows(q_t, i0, i1)  # (B, Hkv, G * bq, D)
        state = _OnlineSoftmax(q_blk.shape[:-1], dim_v, dtype, mods.softmax_scale(scale))
        mods.start(state, i1 - i0)
        for j0, j1, hidden in _key_blocks(i0, i1, sq, sk, variant, mods):
            # -- online softmax of q k^T (modified), and p @ v (p dropped out) --
            s, _ = _scores(q_blk, k_t, i0, j0, j1, hidden, mods)
            state.update(s, v_t[:, :, j0:j1], hidden,
                         _kept(dropout, (b, hq, sq, sk), hkv, i0, i1, j0, j1, dtype))
        o_blk, lse_blk = state.finalize()
        out[:, i0:i1] = _ungroup(o_blk, i1 - i0).swapaxes(1, 2)
        lse[:, :, i0:i1] = lse_blk.reshape(b, hq, i1 - i0)
    return out, lse


@np.errstate(over="ignore")  # as for forward
def backward(
    dout: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    *,
    variant: Variant,
    scale: float,
    alibi_slopes: np.ndarray | None = None,
    sinks: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    dsinks: np.ndarray | None = None,
    dbias: np.ndarray | None = None,
    user: UserCall | None = None,
    dropout: tuple | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attention backward pass (FlashAttention-2): P is recomputed tile by tile.

    Each query block first recomputes its row statistics (max and sum, in the compute dtype) with
    one pass over the keys, rather than read them back from the forward's float32 lse: with
    scores of ~1e4, lse rounded to float32 is off by ~1e-3, and exp(s - lse) would then miss a
    row sum of one by as much (the float32 gradients failed the accuracy rule; float64 ones would
    carry float32's ~1e-7 everywhere). With its own max and sum every P row sums to one to the
    compute dtype's precision, as in naive attention.

    Args:
        dout, out: ``(B, Sq, Hq, Dv)``; q, k, v: as for :func:`forward`. Any strides.
        variant, scale, alibi_slopes, sinks, bias, mask, user, dropout: as for
            :func:`forward` (a user score_mod's `grad` form gives its derivative; dropout's
            mask is drawn again from its rng).
        dsinks: with sinks, a float64 ``(Hq,)`` array that receives their gradient,
            ``-sum over batch and rows of p_sink * delta`` (``p_sink = exp(sink - lse)``).
        dbias: with bias, a float64 array of bias's shape left-padded to 4 dimensions that
            receives its gradient, dS summed over the axes bias was broadcast along.

    Returns:
        ``(dq, dk, dv)`` shaped like q, k, v, C-contiguous, in the input dtype. With GQA, dk and dv
        are summed over the query heads of each kv head.
    """
    b, sq, hq, d = q.shape
    sk, hkv, dim_v = k.shape[1], k.shape[2], v.shape[3]
    dtype = _compute_dtype(q.dtype)
    scale_t = dtype.type(scale)
    mods = _ScoreMods(variant, scale, dtype, alibi_slopes, sinks, bias, mask,
                      (b, hq, hkv, sq, sk), user)
    softmax_scale = mods.softmax_scale(scale)
    if dbias is not None:
        dbias[...] = 0
    dsinks_t = None if dsinks is None else np.zeros((hkv, hq // hkv), dtype=np.float64)
    q_t = _grouped_q(q, hkv, dtype)
    do_t = _grouped_q(dout, hkv, dtype)
    # -- preprocess: delta = rowsum(dO * O), the softmax-backward term --
    delta_t = np.sum(do_t * _grouped_q(out, hkv, dtype), axis=-1)  # (B, Hkv, G, Sq)
    k_t, v_t = _heads_first(k, dtype), _heads_first(v, dtype)

    dq = np.empty((b, sq, hq, d), dtype=q.dtype)
    dk_t = np.zeros((b, hkv, sk, d), dtype=dtype)
    dv_t = np.zeros((b, hkv, sk, dim_v), dtype=dtype)
    for i0 in range(0, sq, BLOCK_Q):
        i1 = min(i0 + BLOCK_Q, sq)
        q_blk, do_blk = _rows(q_t, i0, i1), _rows(do_t, i0, i1)
        delta_blk = _rows(delta_t[..., None], i0, i1)  # (B, Hkv, G * bq, 1)
        stats = _RowStatistics(q_blk.shape[:-1], dtype, softmax_scale)
        mods.start(stats, i1 - i0)
        for j0, j1, hidden in _key_blocks(i0, i1, sq, sk, variant, mods):
            stats.fold(_scores(q_blk, k_t, i0, j0, j1, hidden, mods)[0])
        m_blk, log_l_blk = stats.normaliser()
        if dsinks_t is not None:  # d lse-weighted sink: -p_sink * delta, p_sink = e^(sink - lse)
            p_sink = np.exp(mods.sink_rows(i1 - i0)[..., None] - m_blk - log_l_blk)
            dsinks_t -= (p_sink * delta_blk).reshape(b, hkv, hq // hkv, i1 - i0).sum(
                axis=(0, 3), dtype=np.float64)
        dq_blk = np.zeros_like(q_blk)
        for j0, j1, hidden in _key_blocks(i0, i1, sq, sk, variant, mods):
            k_blk, v_blk = k_t[:, :, j0:j1], v_t[:, :, j0:j1]
            # -- recompute P = exp(scale * (s - m) - log l) (modified: exp(s' - m - log l)) --
            p, (outer, inner) = _scores(q_blk, k_t, i0, j0, j1, hidden, mods, slope=True)
            np.subtract(p, m_blk, out=p)
            if not mods:
                np.multiply(p, scale_t, out=p)
            np.subtract(p, log_l_blk, out=p)
            np.exp(p, out=p)
            kept = _kept(dropout, (b, hq, sq, sk), hkv, i0, i1, j0, j1, dtype)
            # -- dV += P^T dO (the matmul sums the group's query heads; P dropped out) --
            dropped = p if kept is None else p * kept
            dv_t[:, :, j0:j1] += np.matmul(dropped.swapaxes(-1, -2), do_blk)
            # -- dS = P * (dP - delta), dP through the kept, rescaled probabilities --
            ds = np.matmul(do_blk, v_blk.swapaxes(-1, -2))
            if kept is not None:
                np.multiply(ds, kept, out=ds)
            np.subtract(ds, delta_blk, out=ds)
            np.multiply(ds, p, out=ds)
            # -- back through the modifications: the score_mod, the bias (dS is its gradient
            # there), the softcap --
            if outer is not None:
                np.multiply(ds, outer, out=ds)
            if dbias is not None:
                mods.add_bias_gradient(dbias, ds, i0, j0)
            if inner is not None:
                np.multiply(ds, inner, out=ds)
            # -- dQ += dS K, dK += dS^T Q (both times scale at the end) --
            dq_blk += np.matmul(ds, k_blk)
            dk_t[:, :, j0:j1] += np.matmul(ds.swapaxes(-1, -2), q_blk)
        dq[:, i0:i1] = (_ungroup(dq_blk, i1 - i0) * scale_t).swapaxes(1, 2)
    dk_t *= scale_t
    dk = np.ascontiguousarray(dk_t.swapaxes(1, 2), dtype=k.dtype)
    dv = np.ascontiguousarray(dv_t.swapaxes(1, 2), dtype=v.dtype)
    if dsinks is not None:
        dsinks[...] = dsinks_t.reshape(hq)
    return dq, dk, dv


def _kept(dropout: tuple | None, shape: tuple[int, int, int, int], hkv: int, i0: int, i1: int,
          j0: int, j1: int, dtype: np.dtype) -> np.ndarray | None:
    """Dropout's ``keep / (1 - p)`` for rows ``[i0, i1)`` and keys ``[j0, j1)``, laid out as a
    block's scores ``(B, Hkv, G * bq, bk)``; None without dropout."""
    if dropout is None:
        return None
    b, hq = shape[:2]
    scaled = _dropout.scaled(shape, *dropout, dtype, rows=np.arange(i0, i1),
                             cols=np.arange(j0, j1))
    return scaled.reshape(b, hkv, (hq // hkv) * (i1 - i0), j1 - j0)


def _scores(q_blk: np.ndarray, k_t: np.ndarray, i0: int, j0: int, j1: int,
            hidden: np.ndarray | None, mods: _ScoreMods,
            slope: bool = False) -> tuple[np.ndarray, tuple]:
    """Scores ``(B, Hkv, G * bq, bk)`` of the query block from row `i0` against keys
    ``[j0, j1)``, -inf where ``hidden`` (``(bq, bk)``, None: nothing masked) says the query does
    not see the key, and with `slope` the modifications' derivatives (`_ScoreMods.apply`; 0
    where hidden, None where 1). Without modifications: the raw ``q k^T`` (the scale is applied
    later, inside the exponent); with any, the modified scores in logits (`_ScoreMods.apply`)."""
    s = np.matmul(q_blk, k_t[:, :, j0:j1].swapaxes(-1, -2))
    slopes = mods.apply(s, i0, j0, slope) if mods else (None, None)
    if hidden is not None:
        b, hkv, rows, bk = s.shape
        bq = hidden.shape[-2]
        for x, fill in ((s, -np.inf), *((x, 0.0) for x in slopes)):
            if x is not None:  # slope 0 where hidden: a hidden key's NaN stays out of gradients
                np.copyto(x.reshape(b, hkv, rows // bq, bq, bk), fill, where=hidden)
    return s, slopes


class _ScoreMods:
    """A call's score modifications, in the compute dtype, in flash-attn's order: scale, then
    softcap (``cap * tanh(s / cap)``), then ALiBi (``-slope * |i + Sk - Sq - j|``), then the
    bias, then the user's score_mod; the mask array and the user's mask_mod, which hide keys as
    the variant's mask does; and the sinks, which start
    each row's softmax. False when the scores are unmodified: they then stay raw and the softmax
    scales them inside its exponent."""

    def __init__(self, variant: Variant, scale: float, dtype: np.dtype,
                 alibi_slopes: np.ndarray | None, sinks: np.ndarray | None,
                 bias: np.ndarray | None, mask: np.ndarray | None,
                 sizes: tuple[int, int, int, int, int], user: UserCall | None = None):
        b, hq, hkv, seqlen_q, seqlen_k = sizes
        self.user = user
        self.dtype = dtype
        self.scale = dtype.type(scale)
        self.cap = dtype.type(variant.softcap)
        self.inner = dtype.type(scale / variant.softcap) if variant.softcap else dtype.type(0)
        self.slopes = None  # (B, Hkv, G, 1, 1): query head h = kv * G + g
        if alibi_slopes is not None:
            self.slopes = alibi_slopes.astype(dtype).reshape(b, hkv, hq // hkv, 1, 1)
        self.seqlens = seqlen_q, seqlen_k
        self.sinks = None  # (Hkv, G): query head h = kv * G + g
        if sinks is not None:
            self.sinks = sinks.astype(dtype).reshape(hkv, -1)
        full = (b, hq, seqlen_q, seqlen_k)
        self.grouped = (b, hkv, hq // hkv)
        self.bias = None if bias is None else np.broadcast_to(bias, full)  # a view
        self.bias_shape = None if bias is None else (1,) * (4 - bias.ndim) + bias.shape
        self.mask = None if mask is None else np.broadcast_to(mask, full)

    def __bool__(self) -> bool:
        return (bool(self.cap) or self.slopes is not None or self.sinks is not None
                or self.bias is not None or self.user is not None)

    def _positions(self, i0: int, bq: int, j0: int, bk: int) -> tuple[np.ndarray, ...]:
        """``b, h, q_idx, kv_idx`` broadcasting to a block ``(B, Hkv, G, bq, bk)``."""
        b, hkv, g = self.grouped
        return (np.arange(b).reshape(-1, 1, 1, 1, 1), np.arange(hkv * g).reshape(1, hkv, g, 1, 1),
                np.arange(i0, i0 + bq).reshape(-1, 1), np.arange(j0, j0 + bk))

    def _block(self, x: np.ndarray, i0: int, bq: int, j0: int, bk: int) -> np.ndarray:
        """Rows [i0, i0 + bq) and keys [j0, j0 + bk) of a (B, Hq, Sq, Sk) view, as
        (B, Hkv, G, bq, bk)."""
        return x[:, :, i0:i0 + bq, j0:j0 + bk].reshape(*self.grouped, bq, bk)

    def hide(self, hidden: np.ndarray | None, i0: int, i1: int, j0: int,
             j1: int) -> np.ndarray | None:
        """The keys the block's rows do not see: the variant's `hidden` ``(bq, bk)`` and, with
        a mask, where it is False (then ``(B, Hkv, G, bq, bk)``)."""
        shape = (*self.grouped, i1 - i0, j1 - j0)
        if self.user is not None and self.user.keep is not None:
            keep = self.user.keep(*self._positions(i0, i1 - i0, j0, j1 - j0), **self.user.aux)
            hidden = _union(hidden, ~np.broadcast_to(np.asarray(keep, dtype=bool), shape))
        if self.mask is None:
            return hidden
        return _union(hidden, ~self._block(self.mask, i0, i1 - i0, j0, j1 - j0))

    def add_bias_gradient(self, dbias: np.ndarray, ds: np.ndarray, i0: int, j0: int) -> None:
        """Add the block's dS ``(B, Hkv, G * bq, bk)`` into `dbias` (the bias's padded shape),
        summed over the axes the bias was broadcast along."""
        b, hkv, rows, bk = ds.shape
        g = self.grouped[2]
        bq = rows // g
        blk = ds.reshape(b, hkv * g, bq, bk)
        axes = tuple(a for a in range(4) if self.bias_shape[a] == 1 and blk.shape[a] != 1)
        if axes:
            blk = blk.sum(axis=axes, keepdims=True, dtype=np.float64)
        rows_at = slice(i0, i0 + bq) if self.bias_shape[2] != 1 else slice(0, 1)
        cols_at = slice(j0, j0 + bk) if self.bias_shape[3] != 1 else slice(0, 1)
        dbias[:, :, rows_at, cols_at] += blk

    def sink_rows(self, bq: int) -> np.ndarray:
        """Each row's sink logit, ``(Hkv, G * bq)`` (rows as `_rows` lays them out)."""
        return np.repeat(self.sinks, bq, axis=1)

    def start(self, stats: _RowStatistics, bq: int) -> None:
        """With sinks, every row's softmax starts from its sink: max = sink, sum = 1."""
        if self.sinks is not None:
            stats.m_i = np.broadcast_to(self.sink_rows(bq), stats.m_i.shape).copy()
            stats.l_i = np.ones_like(stats.l_i)

    def softmax_scale(self, scale: float) -> float:
        """The factor the softmax applies to the scores: `scale` for raw ones, 1 for modified
        ones (already scaled)."""
        return 1.0 if self else scale

    def apply(self, s: np.ndarray, i0: int, j0: int,
              slope: bool = False) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Raw scores `s` of rows from `i0` and keys from `j0`, modified in place (softcap, ALiBi,
        bias, then the user's score_mod); with `slope`, the derivatives a backward multiplies
        dS by, outermost first: ``(the score_mod's grad, the softcap's 1 - tanh^2)``, None
        where one is 1. A bias's gradient is dS between the two."""
        outer = inner = None
        if self.cap:
            np.multiply(s, self.inner, out=s)
            np.tanh(s, out=s)
            if slope:
                inner = 1 - s * s
            np.multiply(s, self.cap, out=s)
        else:
            np.multiply(s, self.scale, out=s)
        rows, bk = s.shape[-2:]
        bq = rows // self.grouped[2]
        view = s.reshape(*self.grouped, bq, bk)
        if self.slopes is not None:
            distance = diagonal_distance(np.arange(i0, i0 + bq), np.arange(j0, j0 + bk),
                                         *self.seqlens).astype(self.dtype)
            np.subtract(view, self.slopes * distance, out=view)
        if self.bias is not None:
            np.add(view, self._block(self.bias, i0, bq, j0, bk).astype(self.dtype), out=view)
        if self.user is not None and self.user.score is not None:
            at = self._positions(i0, bq, j0, bk)
            view[...] = np.broadcast_to(self.user.score(view.copy(), *at, **self.user.aux),
                                        view.shape)
            if slope and self.user.grad is not None:
                grad = self.user.grad(view.copy(), *at, **self.user.aux)
                outer = np.broadcast_to(grad, view.shape).astype(self.dtype).reshape(s.shape)
        return outer, inner


def _union(hidden: np.ndarray | None, more: np.ndarray) -> np.ndarray:
    return more if hidden is None else more | hidden


class _RowStatistics:
    """Running row max ``m_i`` of the unscaled scores and row sum ``l_i`` of
    ``exp(scale * (s - m_i))`` over the key blocks of a query block."""

    def __init__(self, rows: tuple[int, ...], dtype: np.dtype, scale: float) -> None:
        self.scale = dtype.type(scale)
        self.m_i = np.full(rows, -np.inf, dtype=dtype)
        self.l_i = np.zeros(rows, dtype=dtype)

    def fold(self, s: np.ndarray) -> np.ndarray:
        """Fold in one key block of raw scores ``s = q k^T`` (masked with -inf).

        ``s`` is overwritten with ``p = exp(scale * (s - m_new))``; returns ``alpha``, the factor
        that rescales sums taken against the previous max. The scale is applied inside the
        exponent, after the product: folded into q first it would round q once more (an extra
        error where the scale is not a power of two) and overflow float32 for large scales.
        """
        m_new = np.maximum(self.m_i, s.max(axis=-1))
        # A row that has seen only masked keys so far still has m_new = -inf, and
        # exp(-inf - -inf) is NaN: subtract 0 instead, which leaves its p (and alpha) exactly 0.
        m_safe = np.where(np.isneginf(m_new), 0, m_new)
        alpha = np.exp(self.scale * (self.m_i - m_safe))
        np.subtract(s, m_safe[..., None], out=s)
        np.multiply(s, self.scale, out=s)
        np.exp(s, out=s)
        self.l_i = self.l_i * alpha + s.sum(axis=-1)
        self.m_i = m_new
        return alpha

    def normaliser(self) -> tuple[np.ndarray, np.ndarray]:
        """``(m, log l)`` shaped ``(*rows, 1)``, so that ``P = exp(scale * (s - m) - log l)``.

        A row that saw no key gets ``(0, +inf)``: its P is exactly 0 (masked scores are -inf).
        """
        blind = self.l_i == 0
        m = np.where(blind, 0, self.m_i)
        with np.errstate(divide="ignore"):
            log_l = np.where(blind, np.inf, np.log(self.l_i))
        return m[..., None], log_l[..., None]


class _OnlineSoftmax(_RowStatistics):
    """Row statistics and the unnormalised output ``acc`` of a query block."""

    def __init__(self, rows: tuple[int, ...], d: int, dtype: np.dtype, scale: float) -> None:
        super().__init__(rows, dtype, scale)
        self.acc = np.zeros((*rows, d), dtype=dtype)

    def update(self, s: np.ndarray, v_blk: np.ndarray, hidden: np.ndarray | None,
               kept: np.ndarray | None = None) -> None:
        """Fold in one key block: raw scores ``s`` (masked by ``hidden``; overwritten) and its
        values; `kept` (dropout's ``keep / (1 - p)``, like s) scales the probabilities that
        weight the values, not the row sums."""
        alpha = self.fold(s)
        if kept is not None:
            np.multiply(s, kept, out=s)
        self.acc *= alpha[..., None]
        if hidden is None or not np.isnan(v_blk).any():
            self.acc += np.matmul(s, v_blk)
            return
        # p is exactly 0 on masked keys, but 0 * NaN is NaN: a NaN value must reach the rows that
        # see its key and no other. Add the values with NaN as 0, then set NaN where seen.
        nan_v = np.isnan(v_blk)
        self.acc += np.matmul(s, np.where(nan_v, 0, v_blk))
        hid = hidden if hidden.ndim == 5 else hidden[None, None, None]  # (.., G, bq, bk)
        sees_nan = np.matmul((~hid).astype(s.dtype), nan_v[:, :, None].astype(s.dtype)) > 0
        b, hkv, rows, d = self.acc.shape
        bq = hidden.shape[-2]
        np.copyto(self.acc.reshape(b, hkv, rows // bq, bq, d), np.nan, where=sees_nan)

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """``out = acc / l_i`` and ``lse = scale * m_i + log(l_i)``; 0 and -inf for rows that saw
        no key."""
        blind = self.l_i == 0  # NaN (a NaN score) is not blind: it gives NaN out and lse
        l_safe = np.where(blind, 1, self.l_i)
        out = self.acc / l_safe[..., None]  # acc is exactly 0 on blind rows
        lse = np.where(blind, -np.inf, self.scale * self.m_i + np.log(l_safe))
        return out, lse


def _key_blocks(
    i0: int, i1: int, sq: int, sk: int, variant: Variant, mods: _ScoreMods
) -> Iterator[tuple[int, int, np.ndarray | None]]:
    """Yield ``(j0, j1, hidden)`` for the key blocks query rows ``[i0, i1)`` must visit.

    Keys no row of the block sees (before a window's left edge, past the diagonal) are skipped.
    ``hidden`` is None for a block every row sees in full, else ``(bq, bk)`` bool, True where
    query ``i0 + r`` does not see key ``j0 + c`` (with a user mask ``(B, Hkv, G, bq, bk)``, its
    False entries hidden too: `_ScoreMods.hide`).
    """
    begin, end = variant.key_span(i0, i1, sq, sk)
    first, stop = variant.key_bounds(np.arange(i0, i1), sq, sk)
    for j0 in range(begin, end, BLOCK_K):
        j1 = min(j0 + BLOCK_K, end)
        hidden = None
        if first.max() > j0 or stop.min() < j1:
            cols = np.arange(j0, j1)[None, :]
            hidden = (cols < first[:, None]) | (cols >= stop[:, None])
        yield j0, j1, mods.hide(hidden, i0, i1, j0, j1)


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _grouped_q(x: np.ndarray, hkv: int, dtype: np.dtype) -> np.ndarray:
    """``(B, S, Hq, D)`` -> contiguous ``(B, Hkv, G, S, D)`` in ``dtype``; head h = kv * G + g."""
    b, s, hq, d = x.shape
    return _heads_first(x, dtype).reshape(b, hkv, hq // hkv, s, d)


def _heads_first(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``(B, S, H, D)`` -> contiguous ``(B, H, S, D)`` in ``dtype`` (always a copy)."""
    return np.array(x.swapaxes(1, 2), dtype=dtype, order="C")


def _rows(x_t: np.ndarray, i0: int, i1: int) -> np.ndarray:
    """Rows ``[i0, i1)`` of ``(B, Hkv, G, S, D)`` as ``(B, Hkv, G * (i1 - i0), D)``."""
    b, hkv, g, _, d = x_t.shape
    return x_t[:, :, :, i0:i1].reshape(b, hkv, g * (i1 - i0), d)


def _ungroup(x: np.ndarray, bq: int) -> np.ndarray:
    """``(B, Hkv, G * bq, D)`` -> ``(B, Hq, bq, D)``."""
    b, hkv, rows, d = x.shape
    return x.reshape(b, hkv * (rows // bq), bq, d)
