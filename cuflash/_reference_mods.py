"""The float64 oracle of the score and mask modifications (`cuflash.reference` calls it when any
is given): softcap, ALiBi, attention sinks, an additive bias, a boolean mask and a user's
score_mod / mask_mod (by their NumPy forms), forward and backward, computed naively on the whole
``(B, Hq, Sq, Sk)`` score tensor.

Order of operations (flash-attn's where it has one): ``s = scale * q k^T``; ``s = softcap *
tanh(s / softcap)``; ``s += -slope_h * |i + Sk - Sq - j|`` (ALiBi); ``s += bias``; ``s =
score_mod(s, ...)``; keys hidden by causal, window, ``mask == False`` or the mask_mod are
dropped; the softmax runs over the visible keys plus, with sinks, one virtual key of logit
``sinks[h]`` and no value. ``lse`` includes the sink, so a row that sees no key has zeros and
``lse = sinks[h]`` (``-inf`` without sinks). Dropout then scales each probability by
``keep / (1 - p)`` (`cuflash._dropout.keep`'s mask) before it weights the values; lse is the
softmax's, without it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from cuflash import _dropout


@dataclass(frozen=True)
class Mods:
    """The modifications of one call, as float64 arrays broadcast to ``(B, Hq, Sq, Sk)``."""

    softcap: float
    alibi: np.ndarray | None  # (B, Hq) slopes
    sinks: np.ndarray | None  # (Hq,)
    bias: np.ndarray | None  # broadcastable to (B, Hq, Sq, Sk)
    bias_shape: tuple[int, ...] | None  # the caller's, for dbias
    mask: np.ndarray | None  # bool, broadcastable
    score_mod: Any = None  # a cuflash.ScoreMod, by its NumPy forms
    mask_mod: Any = None  # a cuflash.MaskMod, by its NumPy form
    aux: dict | None = None  # their arrays, float64 or as given (integers, bools)
    dropout: np.ndarray | None = None  # keep / (1 - p), (B, Hq, Sq, Sk); None: no dropout

    @property
    def any(self) -> bool:
        return bool(self.softcap) or any(
            x is not None for x in (self.alibi, self.sinks, self.bias, self.mask,
                                    self.score_mod, self.mask_mod, self.dropout))

    def positions(self, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
        """``b, h, q_idx, kv_idx`` broadcasting to scores of `shape` ``(B, Hq, Sq, Sk)``."""
        return tuple(np.arange(n).reshape([-1 if a == i else 1 for a in range(4)])
                     for i, n in enumerate(shape))


def mods(shape: tuple[int, int, int, int], *, softcap: Any = 0.0, alibi_slopes: Any = None,
         sinks: Any = None, bias: Any = None, mask: Any = None, score_mod: Any = None,
         mask_mod: Any = None, aux: Any = None, dropout_p: Any = 0.0, rng: Any = None) -> Mods:
    """Checked modifications for scores of ``shape = (B, Hq, Sq, Sk)``."""
    b, hq = shape[:2]
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected a real number >= 0, got {softcap!r}")
    if not np.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap: expected a finite number >= 0 (0: off), got {softcap!r}")
    alibi = None
    if alibi_slopes is not None:
        slopes = _real(alibi_slopes, "alibi_slopes")
        if slopes.shape not in ((hq,), (b, hq)):
            raise ValueError(f"alibi_slopes: expected shape ({hq},) or ({b}, {hq}), got "
                             f"{slopes.shape}")
        alibi = np.broadcast_to(slopes, (b, hq))
    sink = None
    if sinks is not None:
        sink = _real(sinks, "sinks")
        if sink.shape != (hq,):
            raise ValueError(f"sinks: expected shape ({hq},), got {sink.shape}")
    bias_arr = bias_shape = None
    if bias is not None:
        bias_arr = _real(bias, "bias")
        bias_shape = bias_arr.shape
        _check_broadcast(bias_arr, "bias", shape)
    mask_arr = None
    if mask is not None:
        mask_arr = np.asarray(mask)
        if mask_arr.dtype != np.bool_:
            raise TypeError(f"mask: expected a boolean array (True = attend), got dtype "
                            f"{mask_arr.dtype}")
        _check_broadcast(mask_arr, "mask", shape)
    for name, mod in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if mod is not None and not callable(getattr(mod, "numpy", None)):
            kind = "ScoreMod" if name == "score_mod" else "MaskMod"
            raise TypeError(f"{name}: expected a cuflash.{kind} with a NumPy form "
                            f"(numpy=...), got {mod!r}")
    arrays = {name: _host(x, f"aux[{name!r}]") for name, x in (aux or {}).items()}
    p, rng = _dropout.check(dropout_p, rng)
    dropout = _dropout.scaled(shape, p, rng) if p else None
    return Mods(float(softcap), alibi, sink, bias_arr, bias_shape, mask_arr, score_mod,
                mask_mod, arrays, dropout)


def _host(x: Any, name: str) -> np.ndarray:
    """An aux array (already on the host: `cuflash.reference` reads device arrays) as NumPy:
    floats as float64, integers and bools as they are."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name}: expected real numbers or bools, got dtype {arr.dtype}")
    return arr.astype(np.float64) if arr.dtype.kind == "f" else arr


def forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, visible: np.ndarray | None,
            scale: float, m: Mods) -> tuple[np.ndarray, np.ndarray]:
    """``out (B, Hq, Sq, Dv)`` and ``lse (B, Hq, Sq)`` from ``q (B, Hq, Sq, D)``, ``k (B, Hq, Sk,
    D)`` and ``v (B, Hq, Sk, Dv)`` (kv heads already repeated over their query heads)."""
    p, _, lse, _, _ = _softmax(q, k, visible, scale, m)
    if m.dropout is not None:
        p = p * m.dropout
    nan_v = np.isnan(v)
    if not nan_v.any():
        return p @ v, lse
    # As the plain reference: a NaN in v reaches exactly the rows that see its key.
    out = p @ np.where(nan_v, 0.0, v)
    seen = _seen(visible, m, p.shape)
    out[(seen.astype(np.float64) @ nan_v.astype(np.float64)) > 0] = np.nan
    return out, lse


def backward(dout: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
             visible: np.ndarray | None, scale: float, m: Mods) -> dict[str, np.ndarray]:
    """Gradients ``q, k, v`` (per query head: the caller sums k, v over each group) and, where
    given, ``bias`` (reduced to the caller's shape) and ``sinks``."""
    p, p_sink, _, tanh, modified = _softmax(q, k, visible, scale, m)
    dp = dout @ v.swapaxes(-1, -2)
    dropped = p if m.dropout is None else p * m.dropout
    if m.dropout is not None:  # through the kept, rescaled probabilities
        dp = dp * m.dropout
    delta = np.sum(p * dp, axis=-1, keepdims=True)  # the sink has no value: its dP is 0
    ds = p * (dp - delta)
    grads = {"v": dropped.swapaxes(-1, -2) @ dout}
    if m.sinks is not None:
        grads["sinks"] = -np.sum(p_sink * delta[..., 0], axis=(0, 2))
    # Back through the modifications in reverse order: the score_mod, the bias (its gradient is
    # dS there), then the softcap.
    if m.score_mod is not None and not m.score_mod.additive:
        if m.score_mod.numpy_grad is None:
            raise NotImplementedError("score_mod.numpy_grad: the reference's gradients need "
                                      "the score_mod's derivative in NumPy")
        slope = m.score_mod.numpy_grad(modified, *m.positions(ds.shape), **m.aux)
        ds = np.where(p > 0, ds * slope, 0.0)
    if m.bias is not None:
        grads["bias"] = _reduce_to(ds, m.bias_shape)
    if m.softcap:
        ds = ds * (1.0 - tanh**2)
    grads["q"] = scale * ds @ k
    grads["k"] = scale * ds.swapaxes(-1, -2) @ q
    return grads


def _softmax(q, k, visible, scale: float, m: Mods):
    """Probabilities over the keys, the sink's probability, lse, and tanh(s / softcap)."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    s = scale * (q @ k.swapaxes(-1, -2))
    tanh = None
    if m.softcap:
        tanh = np.tanh(s / m.softcap)
        s = m.softcap * tanh
    if m.alibi is not None:
        s = s - m.alibi[:, :, None, None] * alibi_distance(sq, sk)
    if m.bias is not None:
        s = s + m.bias
    if m.score_mod is not None:
        s = np.broadcast_to(m.score_mod.numpy(s, *m.positions(s.shape), **m.aux),
                            s.shape).astype(np.float64)
    modified = s
    seen = _seen(visible, m, s.shape)
    s = np.where(seen, s, -np.inf)
    sink = (np.full((b, hq, sq, 1), -np.inf) if m.sinks is None
            else np.broadcast_to(m.sinks[None, :, None, None], (b, hq, sq, 1)))
    top = np.maximum(np.max(s, axis=-1, keepdims=True, initial=-np.inf), sink)
    top = np.where(np.isneginf(top), 0.0, top)
    e, e_sink = np.exp(s - top), np.exp(sink - top)
    total = e.sum(axis=-1, keepdims=True) + e_sink
    p = np.divide(e, total, out=np.zeros_like(e), where=total != 0)
    p = np.where(seen, p, 0.0)
    p_sink = np.divide(e_sink, total, out=np.zeros_like(e_sink), where=total != 0)[..., 0]
    with np.errstate(divide="ignore"):
        lse = (top + np.log(total))[..., 0]
    return p, p_sink, lse, tanh, modified


def alibi_distance(seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """``|i + Sk - Sq - j|`` for every query i and key j, ``(Sq, Sk)``: ALiBi's distance."""
    return np.abs(np.arange(seqlen_q)[:, None] + (seqlen_k - seqlen_q)
                  - np.arange(seqlen_k)[None, :])


def _seen(visible: np.ndarray | None, m: Mods, shape: tuple[int, ...]) -> np.ndarray:
    """Which keys each row sees: causal/window and the user's mask, ``(B, Hq, Sq, Sk)``."""
    seen = np.ones((1, 1, *shape[2:]), dtype=bool) if visible is None else visible[None, None]
    if m.mask is not None:
        seen = seen & m.mask
    if m.mask_mod is not None:
        seen = seen & np.asarray(m.mask_mod.numpy(*m.positions(shape), **m.aux), dtype=bool)
    return np.broadcast_to(seen, shape)


def _real(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name}: expected an array of real numbers, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _check_broadcast(x: np.ndarray, name: str, shape: tuple[int, ...]) -> None:
    if x.ndim > 4 or any(n not in (1, want) for n, want in zip(x.shape[::-1], shape[::-1],
                                                                strict=False)):
        raise ValueError(f"{name}: expected a shape broadcastable to (B, Hq, Sq, Sk) = {shape}, "
                         f"got {x.shape}")


def _reduce_to(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum `x` over the axes a tensor of `shape` was broadcast along."""
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x
