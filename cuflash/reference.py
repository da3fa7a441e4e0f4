"""Naive float64 attention and its exact backward: the yardstick for every cuflash path.

Plain ``softmax(scale * q @ k^T) @ v`` on the whole ``(Sq, Sk)`` score matrix, in float64 NumPy,
whatever the input dtype or framework. It is O(S^2) in memory on purpose: nothing here is tiled, so
it shares no code (and no bug) with the flash paths. Use it on small problems.

Conventions are those of :func:`cuflash.attention` (docs/api.md, "Conventions"):

- layout ``"bshd"``: q ``(B, Sq, Hq, D)``, k ``(B, Sk, Hkv, D)``, v ``(B, Sk, Hkv, Dv)``;
  layout ``"bhsd"``: q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)``, v ``(B, Hkv, Sk, Dv)``;
  v's head dim ``Dv`` may differ from ``D``, and the output has it;
  3-D inputs (no batch axis) are accepted and answered without the batch axis.
- GQA / MQA: ``Hq % Hkv == 0``; query head ``h`` reads kv head ``h // (Hq // Hkv)``.
- ``causal=True`` is bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + Sk - Sq``.
- A query row that sees no key (causal with ``Sq > Sk``, or ``Sk == 0``) outputs zeros, has
  ``lse = -inf`` and contributes nothing to the gradients, whatever its q holds.
- NaN: a NaN in a query row makes that row's output and lse NaN; a NaN in a key row makes the
  output and lse NaN of exactly the query rows that see that key; a NaN in ``v[j, d]`` makes
  ``out[i, d]`` NaN (not the lse) for exactly the query rows ``i`` that see key ``j``. Nothing
  else changes. The CPU path of :func:`cuflash.attention` follows the same policy.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from cuflash import _dropout
from cuflash import _reference_mods as _mods

__all__ = ["attention", "attention_backward", "attention_varlen", "attention_with_kvcache",
           "visible"]

_LAYOUTS = ("bshd", "bhsd")

# DLPack device types whose memory NumPy can read directly: kDLCPU, kDLCUDAHost, kDLCUDAManaged.
_HOST_DLPACK_DEVICES = (1, 3, 13)


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    scale: float | None = None,
    layout: str = "bshd",
    return_lse: bool = False,
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    sinks: Any = None,
    bias: Any = None,
    mask: Any = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    aux: Any = None,
    dropout_p: float = 0.0,
    rng: Any = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention computed naively in float64.

    Args:
        q: queries, ``(B, Sq, Hq, D)`` for ``layout="bshd"`` or ``(B, Hq, Sq, D)`` for ``"bhsd"``;
            the batch axis may be left out (3-D). Any array-like: a NumPy array, anything with
            ``__dlpack__`` (torch, JAX, CuPy; device arrays are copied to the host through CuPy),
            or a nested sequence. Any real dtype; it is read as float64.
        k: keys, ``(B, Sk, Hkv, D)`` / ``(B, Hkv, Sk, D)``, with ``Hq % Hkv == 0``.
        v: values, the shape of ``k`` but for the last axis: ``(B, Sk, Hkv, Dv)`` /
            ``(B, Hkv, Sk, Dv)``, ``Dv >= 1`` (it may differ from ``D``).
        causal: bottom-right aligned causal mask (query ``i`` sees key ``j`` iff
            ``j <= i + Sk - Sq``).
        window: ``(left, right)`` sliding window, ``-1`` meaning unbounded, bottom-right
            aligned like causal: with ``i' = i + Sk - Sq``, query ``i`` sees key ``j`` iff
            ``i' - left <= j <= i' + right``. ``(-1, 0)`` is causal; with ``causal=True`` too,
            ``right`` is clipped to 0. None: no window.
        scale: softmax scale; ``1 / sqrt(D)`` when None.
        layout: ``"bshd"`` or ``"bhsd"``.
        return_lse: also return the log-sum-exp of the scaled scores of every query row.
        softcap: ``> 0``: scores become ``softcap * tanh(s / softcap)`` after scaling (0: off).
        alibi_slopes: ``(Hq,)`` or ``(B, Hq)``: adds ``-slope * |i + Sk - Sq - j|``.
        sinks: ``(Hq,)`` logits of a virtual key with no value: the softmax denominator gains
            ``exp(sinks[h])``, and lse includes it (a row that sees no key: ``lse = sinks[h]``).
        bias: additive, broadcastable to ``(B, Hq, Sq, Sk)`` (this order in either layout).
        mask: boolean, broadcastable likewise; ``True`` = attend (SDPA's meaning), combined with
            causal and window.
        score_mod, mask_mod, aux: a `cuflash.ScoreMod` and a `cuflash.MaskMod` by their NumPy
            forms (``numpy``, and ``numpy_grad`` for the gradients unless ``grad`` is "1"), on
            the whole score tensor: ``score_mod.numpy(s, b, h, q_idx, kv_idx, **aux)`` of the
            scaled (capped, biased) scores, then ``mask_mod.numpy(b, h, q_idx, kv_idx,
            **aux)`` hides keys.
        dropout_p, rng: dropout (flash-attn's meaning): each probability is kept where
            ``cuflash.dropout_mask`` of ``rng = (seed, offset)`` says and scaled by
            ``1 / (1 - dropout_p)``, the others zeroed; lse is without it.

    Returns:
        ``out``, float64 NumPy array of q's shape with v's head dim ``Dv`` last; with
        ``return_lse``, ``(out, lse)`` where ``lse`` is float64 ``(B, Hq, Sq)`` (``(Hq, Sq)`` for
        3-D input), natural log, ``-inf`` for rows that see no key. (cuflash.attention returns
        lse as float32; float64 here keeps the reference exact.)

    Raises:
        TypeError: complex input, a ``numpy.ma.MaskedArray``, or a scale that is not a real
            number.
        ValueError: unknown layout, shapes that do not fit together, a scale that is not
            finite and > 0, or a window that is not a pair of integers >= -1 (TypeError for a
            non-integer in it).

    See also:
        attention_backward: the gradient of this function.
    """
    q4, k4, v4, three_d = _canonical_inputs(layout, q=q, k=k, v=v)
    scale = _default_scale(scale, q4.shape[-1])
    seen = visible(q4.shape[1], k4.shape[1], causal=causal, window=window)
    options = _mods.mods(_score_shape(q4, k4), softcap=softcap, alibi_slopes=alibi_slopes,
                         sinks=sinks, bias=bias, mask=mask, score_mod=score_mod,
                         mask_mod=mask_mod, aux=_aux_on_host(aux),
                         dropout_p=dropout_p, rng=rng)
    if options.any:
        out, lse = _mods.forward(*_per_head(q4, k4, v4), seen, scale, options)
        out = _from_kv(out.swapaxes(1, 2), layout, three_d)
        return (out, (lse[0] if three_d else lse)) if return_lse else out
    p, lse = _probabilities(q4, k4, seen, scale)
    out = _weighted_values(p, v4, seen)  # (B, Hkv, G, Sq, Dv)
    out = _from_grouped_q(out, layout, three_d)
    if not return_lse:
        return out
    b, hkv, g, sq = lse.shape
    lse = lse.reshape(b, hkv * g, sq)
    return out, (lse[0] if three_d else lse)


def attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    scale: float | None = None,
    layout: str = "bshd",
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    sinks: Any = None,
    bias: Any = None,
    mask: Any = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    aux: Any = None,
    dropout_p: float = 0.0,
    rng: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact float64 gradient of :func:`attention` for the incoming gradient ``dout``.

    Args:
        dout: gradient of the loss with respect to the output; its shape (q's with v's head
            dim ``Dv``).
        q, k, v, causal, window, scale, layout, softcap, alibi_slopes, sinks, bias, mask,
            score_mod, mask_mod, aux, dropout_p, rng: as for :func:`attention` (the gradients
            of bias and sinks: :func:`attention_grads`; dropout's mask drawn again from rng).

    Returns:
        ``(dq, dk, dv)``, float64 NumPy arrays shaped like q, k and v. With GQA the gradient of a kv
        head is summed over the query heads that read it. Rows that see no key contribute nothing.

    Raises:
        TypeError, ValueError: as for :func:`attention`, and for dout.
    """
    grads = attention_grads(dout, q, k, v, causal=causal, window=window, scale=scale,
                            layout=layout, softcap=softcap, alibi_slopes=alibi_slopes,
                            sinks=sinks, bias=bias, mask=mask, score_mod=score_mod,
                            mask_mod=mask_mod, aux=aux, dropout_p=dropout_p, rng=rng)
    return grads["q"], grads["k"], grads["v"]


def attention_grads(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    scale: float | None = None,
    layout: str = "bshd",
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    sinks: Any = None,
    bias: Any = None,
    mask: Any = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    aux: Any = None,
    dropout_p: float = 0.0,
    rng: Any = None,
) -> dict[str, np.ndarray]:
    """Every float64 gradient of :func:`attention`, by name: ``"q"``, ``"k"``, ``"v"``, and
    ``"bias"`` (summed to the bias's own shape over the axes it was broadcast along) and
    ``"sinks"`` ``(Hq,)`` where those were given. Arguments as for :func:`attention_backward`.
    """
    q4, k4, v4, three_d = _canonical_inputs(layout, q=q, k=k, v=v)
    (dout4,) = _canonical_arrays(layout, three_d, dout=dout)
    if dout4.shape != (*q4.shape[:-1], v4.shape[-1]):
        raise ValueError(f"dout has shape {_shape(dout)}; expected the output's shape "
                         f"{(*_shape(q)[:-1], v4.shape[-1])} (q's, with v's head dim last)")
    scale = _default_scale(scale, q4.shape[-1])
    seen = visible(q4.shape[1], k4.shape[1], causal=causal, window=window)
    options = _mods.mods(_score_shape(q4, k4), softcap=softcap, alibi_slopes=alibi_slopes,
                         sinks=sinks, bias=bias, mask=mask, score_mod=score_mod,
                         mask_mod=mask_mod, aux=_aux_on_host(aux),
                         dropout_p=dropout_p, rng=rng)
    if options.any:
        return _mods_backward(dout4, q4, k4, v4, seen, scale, options, layout, three_d)
    p, _ = _probabilities(q4, k4, seen, scale)
    k_g, v_g = _grouped_kv(k4), _grouped_kv(v4)  # (B, Hkv, 1, Sk, D), (.., Dv)
    do_g = _grouped_q(dout4, k4.shape[2])  # (B, Hkv, G, Sq, Dv)

    # -- dv = P^T dO, summed over the query heads of each kv head --
    dv = np.matmul(p.swapaxes(-1, -2), do_g).sum(axis=2)
    # -- softmax backward: dS = P * (dP - rowsum(P * dP)) --
    dp = np.matmul(do_g, v_g.swapaxes(-1, -2))
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
    # -- through s = scale * q k^T --
    dq = scale * np.matmul(ds, k_g)
    dk = scale * np.matmul(ds.swapaxes(-1, -2), _grouped_q(q4, k4.shape[2])).sum(axis=2)

    dq = _from_grouped_q(dq, layout, three_d)
    dk, dv = (_from_kv(x.swapaxes(1, 2), layout, three_d) for x in (dk, dv))
    return {"q": dq, "k": dk, "v": dv}


def _score_shape(q4: np.ndarray, k4: np.ndarray) -> tuple[int, int, int, int]:
    return (q4.shape[0], q4.shape[2], q4.shape[1], k4.shape[1])


def _per_head(*xs: np.ndarray) -> list[np.ndarray]:
    """``(B, S, H, D)`` arrays as ``(B, Hq, S, D)``, kv heads repeated over their query heads."""
    hq = xs[0].shape[2]
    return [np.repeat(x.transpose(0, 2, 1, 3), hq // x.shape[2], axis=1) for x in xs]


def _mods_backward(dout4, q4, k4, v4, seen, scale, options, layout, three_d):
    hkv = k4.shape[2]
    grads = _mods.backward(*_per_head(dout4, q4, k4, v4), seen, scale, options)
    for name in ("k", "v"):  # summed over each kv head's query heads
        b, hq, sk, d = grads[name].shape
        grads[name] = grads[name].reshape(b, hkv, hq // hkv, sk, d).sum(axis=2)
    for name in ("q", "k", "v"):
        grads[name] = _from_kv(grads[name].swapaxes(1, 2), layout, three_d)
    return grads


def attention_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    seqused_k: Any = None,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    dropout_p: float = 0.0,
    rng: Any = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention over a packed batch of sequences of different lengths, in float64 (flash-attn's
    varlen layout), one sequence at a time.

    Args:
        q: ``(total_q, Hq, D)``: the queries of every sequence, one after the other.
        k, v: ``(total_k, Hkv, D)`` and ``(total_k, Hkv, Dv)``, likewise.
        cu_seqlens_q, cu_seqlens_k: integer ``(B + 1,)`` prefix sums: sequence ``b`` holds
            rows ``cu[b]:cu[b+1]``; ``cu[0] == 0``, non-decreasing, ``cu[B]`` the total. Length
            0 is legal.
        seqused_k: optional integer ``(B,)``: sequence ``b`` uses only its first
            ``seqused_k[b]`` keys.
        causal, window, scale: as for :func:`attention`, per sequence (bottom-right aligned on
            each sequence's own lengths).
        return_lse: also return the float64 lse, ``(Hq, total_q)``.
        dropout_p, rng: as for :func:`attention`; sequence ``b`` draws the stream ``(seed,
            offset + b)``.

    Returns:
        ``out`` ``(total_q, Hq, Dv)`` float64, or ``(out, lse)``.
    """
    q3, k3, v3 = (_to_float64(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    for name, x in (("q", q3), ("k", k3), ("v", v3)):
        if x.ndim != 3:
            raise ValueError(f"{name}: expected (total, heads, head_dim), got shape {x.shape}")
    dropout_p, rng = _dropout.check(dropout_p, rng)
    cu_q = _prefix_sums(cu_seqlens_q, "cu_seqlens_q", q3.shape[0])
    cu_k = _prefix_sums(cu_seqlens_k, "cu_seqlens_k", k3.shape[0])
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_k: expected {len(cu_q)} entries like cu_seqlens_q "
                         f"(B + 1), got {len(cu_k)}")
    used = np.diff(cu_k)
    if seqused_k is not None:
        used = _integers(seqused_k, "seqused_k", (len(cu_k) - 1,))
        if np.any(used < 0) or np.any(used > np.diff(cu_k)):
            raise ValueError(f"seqused_k: expected 0 <= seqused_k[b] <= the length of sequence "
                             f"b ({np.diff(cu_k).tolist()}), got {used.tolist()}")
    out = np.zeros((*q3.shape[:-1], v3.shape[-1]))
    lse = np.full((q3.shape[1], q3.shape[0]), -np.inf)
    for b in range(len(cu_q) - 1):
        rows = slice(cu_q[b], cu_q[b + 1])
        keys = slice(cu_k[b], cu_k[b] + used[b])
        out[rows], lse[:, rows] = attention(q3[rows], k3[keys], v3[keys], causal=causal,
                                            window=window, scale=scale, return_lse=True,
                                            dropout_p=dropout_p,
                                            rng=_dropout.of_sequence(rng, b))
    return (out, lse) if return_lse else out


def attention_with_kvcache(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    *,
    cache_seqlens: Any,
    k: Any = None,
    v: Any = None,
    block_table: Any = None,
    cache_leftpad: Any = None,
    rotary_cos: Any = None,
    rotary_sin: Any = None,
    rotary_interleaved: bool = False,
    causal: bool = True,
    window: tuple[int, int] | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention of new queries against a KV cache (flash-attn's meaning), in float64.

    Sequence ``b`` attends to keys ``cache_leftpad[b] .. cache_seqlens[b] - 1`` of its cache
    followed by its new keys `k` (if given): ``L_b = cache_seqlens[b] - cache_leftpad[b] + Snew``
    keys, bottom-right aligned for causal and window. The oracle never writes: the caches are
    left as they are (a fast path appends `k`, `v` in place at ``cache_seqlens``; the attention
    is the same).

    Args:
        q: ``(B, Sq, Hq, D)``.
        k_cache, v_cache: contiguous ``(B, S_cache, Hkv, D)``, or paged ``(num_pages,
            page_size, Hkv, D)`` with `block_table`.
        cache_seqlens: an int, or integers ``(B,)``: keys already in each sequence's cache.
        k, v: optional new keys and values ``(B, Snew, Hkv, D)``, appended after the cache.
        block_table: integers ``(B, max_pages)``: page ``block_table[b, p]`` holds keys
            ``p * page_size`` to ``(p + 1) * page_size - 1`` of sequence ``b``.
        cache_leftpad: integers ``(B,)``: sequence ``b``'s keys start at this cache position
            (contiguous caches; default 0).
        rotary_cos, rotary_sin: ``(seqlen_ro, rotary_dim / 2)``: rotary embedding of the new
            keys and of q, at the positions counted from the sequence's first key: new key
            ``i`` at ``cache_seqlens[b] - cache_leftpad[b] + i``; query ``i`` likewise with
            causal or a window, else every query at ``cache_seqlens[b] - cache_leftpad[b]``.
            Only with new keys. The first ``rotary_dim`` features rotate, pairing ``j`` with
            ``j + rotary_dim / 2``, or ``2j`` with ``2j + 1`` when `rotary_interleaved`.
        causal, window, scale: as for :func:`attention` (causal defaults to True here).
        return_lse: also return the float64 lse ``(B, Hq, Sq)``.

    Returns:
        ``out`` ``(B, Sq, Hq, D)`` float64, or ``(out, lse)``.
    """
    q4 = _to_float64(q, "q")
    kc, vc = _to_float64(k_cache, "k_cache"), _to_float64(v_cache, "v_cache")
    # The caches share one head dim (v's differing from k's is not taken here yet).
    if q4.ndim != 4 or kc.ndim != 4 or kc.shape != vc.shape:
        raise ValueError(f"q: expected (B, Sq, Hq, D) and k_cache, v_cache (B or pages, S, Hkv, "
                         f"D) of one shape; got q {q4.shape}, k_cache {kc.shape}, v_cache "
                         f"{vc.shape}")
    batch = q4.shape[0]
    lengths = _integers(np.broadcast_to(np.asarray(cache_seqlens), (batch,)), "cache_seqlens",
                        (batch,))
    new_k = new_v = np.zeros((batch, 0, *kc.shape[2:]))
    if (k is None) != (v is None):
        raise ValueError("k, v: pass both new keys and new values, or neither")
    if k is not None:
        new_k, new_v = _to_float64(k, "k"), _to_float64(v, "v")
        if new_k.shape != new_v.shape or new_k.shape[0] != batch or new_k.shape[2:] != kc.shape[2:]:
            raise ValueError(f"k: expected (B={batch}, Snew, Hkv, D) like the cache and v, got k "
                             f"{new_k.shape}, v {new_v.shape}")
    if block_table is None:
        if kc.shape[0] != batch:
            raise ValueError(f"k_cache: expected batch {batch} like q, got shape {kc.shape}")
        capacity = kc.shape[1]
        keys_of = [kc[b] for b in range(batch)]
        values_of = [vc[b] for b in range(batch)]
    else:
        pages, page_size = kc.shape[:2]
        table = _integers(block_table, "block_table", None)
        if table.ndim != 2 or table.shape[0] != batch:
            raise ValueError(f"block_table: expected (B={batch}, max_pages), got {table.shape}")
        if table.size and (table.min() < 0 or table.max() >= pages):
            raise ValueError(f"block_table: expected page indices in [0, {pages}), got "
                             f"{table.min()}..{table.max()}")
        capacity = table.shape[1] * page_size
        keys_of = [kc[table[b]].reshape(-1, *kc.shape[2:]) for b in range(batch)]
        values_of = [vc[table[b]].reshape(-1, *kc.shape[2:]) for b in range(batch)]
    if np.any(lengths < 0) or np.any(lengths + new_k.shape[1] > capacity):
        raise ValueError(f"cache_seqlens: expected 0 <= cache_seqlens[b] and cache_seqlens[b] + "
                         f"{new_k.shape[1]} new keys <= the cache's {capacity}, got "
                         f"{lengths.tolist()}")
    start = np.zeros(batch, np.int64)
    if cache_leftpad is not None:
        if block_table is not None:
            raise ValueError("cache_leftpad: not with a paged cache")
        start = _integers(cache_leftpad, "cache_leftpad", (batch,))
        if np.any(start < 0) or np.any(start > lengths):
            raise ValueError(f"cache_leftpad: expected 0 <= cache_leftpad[b] <= "
                             f"cache_seqlens[b] ({lengths.tolist()}), got {start.tolist()}")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos, rotary_sin: pass both or neither")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos: rotary embedding needs new keys k, v")
        cos, sin = _to_float64(rotary_cos, "rotary_cos"), _to_float64(rotary_sin, "rotary_sin")
        if cos.ndim != 2 or cos.shape != sin.shape or not 0 < 2 * cos.shape[1] <= q4.shape[-1]:
            raise ValueError(f"rotary_cos: expected (seqlen_ro, rotary_dim / 2) like rotary_sin "
                             f"with rotary_dim <= D = {q4.shape[-1]}, got {cos.shape}, "
                             f"{sin.shape}")
        first = lengths - start  # the position of the first new key
        key_pos = first[:, None] + np.arange(new_k.shape[1])[None]
        q_pos = (first[:, None] + np.arange(q4.shape[1])[None] if causal or window is not None
                 else np.broadcast_to(first[:, None], (batch, q4.shape[1])))
        if max(key_pos.max(initial=0), q_pos.max(initial=0)) >= cos.shape[0]:
            raise ValueError(f"rotary_cos: {cos.shape[0]} positions, but positions up to "
                             f"{max(key_pos.max(initial=0), q_pos.max(initial=0))} are rotated")
        q4 = rotary(q4, cos[q_pos], sin[q_pos], interleaved=rotary_interleaved)
        new_k = rotary(new_k, cos[key_pos], sin[key_pos], interleaved=rotary_interleaved)
    out = np.zeros(q4.shape)
    lse = np.full((batch, q4.shape[2], q4.shape[1]), -np.inf)
    for b in range(batch):
        keys = np.concatenate([keys_of[b][start[b]:lengths[b]], new_k[b]])
        values = np.concatenate([values_of[b][start[b]:lengths[b]], new_v[b]])
        out[b], lse[b] = attention(q4[b], keys, values, causal=causal, window=window,
                                   scale=scale, return_lse=True)
    return (out, lse) if return_lse else out


def rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, *,
           interleaved: bool = False) -> np.ndarray:
    """Rotary embedding of ``x (B, S, H, D)`` in float64 with ``cos, sin (B, S, rotary_dim / 2)``
    per position: the first ``rotary_dim`` features rotate in pairs (``j`` and
    ``j + rotary_dim / 2``, or ``2j`` and ``2j + 1`` when `interleaved`); the rest pass."""
    half = cos.shape[-1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    x = np.asarray(x, dtype=np.float64)
    part = x[..., :2 * half]
    if interleaved:
        x1, x2 = part[..., 0::2], part[..., 1::2]
        turned = np.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(part.shape)
    else:
        x1, x2 = part[..., :half], part[..., half:]
        turned = np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return np.concatenate([turned, x[..., 2 * half:]], axis=-1)


def _to_float64(x: Any, name: str) -> np.ndarray:
    """`x` as a float64 host array; masked arrays and complex values are refused."""
    x = _to_numpy(x, name)
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name}: expected a plain array, got a numpy.ma.MaskedArray, whose "
                        f"mask would be ignored; fill it ({name}.filled(value)) or compress "
                        "it first")
    if np.iscomplexobj(x):
        raise TypeError(f"{name}: expected real values, got complex dtype {x.dtype}; "
                        f"attention is defined for real inputs (pass {name}.real to drop "
                        "the imaginary part)")
    return np.asarray(x, dtype=np.float64)


def _integers(x: Any, name: str, shape: tuple[int, ...] | None) -> np.ndarray:
    """An integer array (any integer dtype), of `shape` where given."""
    array = np.asarray(_to_numpy(x, name))
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name}: expected integers, got dtype {array.dtype}")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {array.shape}")
    return array.astype(np.int64)


def _prefix_sums(x: Any, name: str, total: int) -> np.ndarray:
    """Validated ``(B + 1,)`` prefix sums ending at `total`."""
    cu = _integers(x, name, None)
    if cu.ndim != 1 or len(cu) < 1:
        raise ValueError(f"{name}: expected a 1-D (B + 1,) array, got shape {cu.shape}")
    if cu[0] != 0 or np.any(np.diff(cu) < 0) or cu[-1] != total:
        raise ValueError(f"{name}: expected prefix sums from 0, non-decreasing, ending at the "
                         f"total {total}; got {cu.tolist()}")
    return cu


def _probabilities(
    q4: np.ndarray, k4: np.ndarray, visible: np.ndarray | None, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities ``(B, Hkv, G, Sq, Sk)`` and lse ``(B, Hkv, G, Sq)``; `visible`
    ``(Sq, Sk)`` is the mask (None: every key)."""
    s = scale * np.matmul(_grouped_q(q4, k4.shape[2]), _grouped_kv(k4).swapaxes(-1, -2))
    if visible is not None:
        s[..., ~visible] = -np.inf
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    # A row that sees no key has m = -inf, and s - m would be -inf - -inf = NaN: subtract 0
    # instead, so every p of that row is exp(-inf) = 0 and its row sum is 0.
    m = np.where(np.isneginf(m), 0.0, m)
    p = np.exp(s - m)
    row_sum = p.sum(axis=-1, keepdims=True)
    # A NaN score makes its row's m, sum, p and lse NaN (row_sum != 0 lets NaN through).
    p = np.divide(p, row_sum, out=np.zeros_like(p), where=row_sum != 0)
    if visible is not None:
        p[..., ~visible] = 0.0  # a NaN row's masked entries are exp(-inf - NaN) = NaN
    with np.errstate(divide="ignore"):  # log(0) = -inf is the lse of a row that sees no key
        lse = (m + np.log(row_sum))[..., 0]
    return p, lse


def _weighted_values(p: np.ndarray, v4: np.ndarray, visible: np.ndarray | None) -> np.ndarray:
    """``p @ v`` ``(B, Hkv, G, Sq, D)``, where a NaN in v reaches exactly the outputs of the
    queries that see its key: p is 0 on masked keys, but 0 * NaN would be NaN."""
    v_g = _grouped_kv(v4)  # (B, Hkv, 1, Sk, D)
    nan_v = np.isnan(v_g)
    if not nan_v.any():
        return np.matmul(p, v_g)
    out = np.matmul(p, np.where(nan_v, 0.0, v_g))
    if visible is None:
        visible = np.ones(p.shape[-2:], dtype=bool)
    sees_nan = np.matmul(visible.astype(np.float64), nan_v.astype(np.float64)) > 0
    out[np.broadcast_to(sees_nan, out.shape)] = np.nan
    return out


def visible(sq: int, sk: int, *, causal: bool = False, window: Any = None) -> np.ndarray | None:
    """The oracle's mask: ``(Sq, Sk)`` bool, True where query i sees key j: the bottom-right
    aligned causal mask and/or window (``i' = i + Sk - Sq`` sees
    ``i' - left <= j <= i' + right``); None where every key is seen."""
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected True or False, got {causal!r}")
    left, right = _window(window)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left < 0 and right < 0:
        return None
    j = np.arange(sk)[None, :]
    diagonal = np.arange(sq)[:, None] + (sk - sq)
    visible = np.ones((sq, sk), dtype=bool)
    if left >= 0:
        visible &= j >= diagonal - left
    if right >= 0:
        visible &= j <= diagonal + right
    return visible


def _window(window: Any) -> tuple[int, int]:
    """``(left, right)`` of a window argument, ``(-1, -1)`` for None."""
    if window is None:
        return -1, -1
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
        raise TypeError(f"window: expected None or a pair (left, right) of ints, got {window!r}")
    for side in window:
        if isinstance(side, (bool, np.bool_)) or not isinstance(side, numbers.Integral):
            raise TypeError(f"window: expected ints (-1 for unbounded), got {window!r}")
    left, right = (int(side) for side in window)
    if left < -1 or right < -1:
        raise ValueError(f"window: expected each side >= -1 (-1: unbounded), got {window!r}")
    return left, right


def _grouped_q(x4: np.ndarray, hkv: int) -> np.ndarray:
    """``(B, S, Hq, D)`` -> ``(B, Hkv, G, S, D)``: query head h = kv_head * G + g."""
    b, s, hq, d = x4.shape
    return x4.transpose(0, 2, 1, 3).reshape(b, hkv, hq // hkv, s, d)


def _grouped_kv(x4: np.ndarray) -> np.ndarray:
    """``(B, Sk, Hkv, D)`` -> ``(B, Hkv, 1, Sk, D)``, broadcasting over the query group."""
    return x4.transpose(0, 2, 1, 3)[:, :, None]


def _from_grouped_q(x: np.ndarray, layout: str, three_d: bool) -> np.ndarray:
    """``(B, Hkv, G, S, D)`` -> q's layout and rank."""
    b, hkv, g, s, d = x.shape
    return _from_kv(x.reshape(b, hkv * g, s, d).swapaxes(1, 2), layout, three_d)


def _from_kv(x4: np.ndarray, layout: str, three_d: bool) -> np.ndarray:
    """Canonical ``(B, S, H, D)`` -> the caller's layout and rank, C-contiguous."""
    if layout == "bhsd":
        x4 = x4.swapaxes(1, 2)
    return np.ascontiguousarray(x4[0] if three_d else x4)


def _canonical_inputs(
    layout: str, *, q: Any, k: Any, v: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Validate q, k, v and return them as float64 ``(B, S, H, D)`` arrays, plus "was 3-D"."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}; got {layout!r}")
    q_np = _to_numpy(q, "q")
    three_d = q_np.ndim == 3
    q4, k4, v4 = _canonical_arrays(layout, three_d, q=q_np, k=k, v=v)
    if k4.shape[:-1] != v4.shape[:-1]:
        raise ValueError(f"v: expected the same shape as k {_shape(k)} but for the last axis "
                         f"(v's head dim may differ); got {_shape(v)}")
    (b, _, hq, d), (bk, _, hkv, dk) = q4.shape, k4.shape
    if d == 0:
        raise ValueError(f"the head dim must be at least 1; got q of shape {_shape(q)}")
    if v4.shape[-1] == 0:
        raise ValueError(f"v: the head dim must be at least 1; got v of shape {_shape(v)}")
    if (b, d) != (bk, dk):
        raise ValueError(
            f"q {_shape(q)} and k {_shape(k)} must agree on batch and head dim "
            f"for layout {layout!r}"
        )
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads ({hq}) must be a multiple of the number of kv heads ({hkv})"
        )
    return q4, k4, v4, three_d


def _canonical_arrays(layout: str, three_d: bool, **arrays: Any) -> list[np.ndarray]:
    """Each named array as float64 ``(B, S, H, D)``; all must be 3-D if ``three_d`` else 4-D."""
    want = 3 if three_d else 4
    result = []
    for name, x in arrays.items():
        x = _to_float64(x, name)
        if x.ndim != want:
            raise ValueError(
                f"{name} must be {want}-D like q (layout {layout!r}); got shape {x.shape}"
            )
        if three_d:
            x = x[None]
        result.append(x.swapaxes(1, 2) if layout == "bhsd" else x)
    return result


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """A host NumPy array with x's values; zero-copy where NumPy can read x in place."""
    if isinstance(x, np.ndarray):
        return x
    if getattr(x, "requires_grad", False):  # torch refuses to export a tensor that requires grad
        x = x.detach()
    if hasattr(x, "__dlpack_device__") and x.__dlpack_device__()[0] not in _HOST_DLPACK_DEVICES:
        try:
            import cupy
        except ImportError as err:
            raise TypeError(
                f"{name} lives on an accelerator; reading it needs CuPy, which did not import"
            ) from err
        return cupy.asnumpy(cupy.from_dlpack(x))
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, TypeError, RuntimeError):
            pass  # e.g. bfloat16, which NumPy's DLPack import lacks; __array__ may still work
    try:
        return np.asarray(x)
    except (TypeError, RuntimeError) as err:
        raise TypeError(
            f"{name}: cannot read {type(x).__name__} as a NumPy array ({err}); "
            "convert it to float32 first"
        ) from err


def _aux_on_host(aux: Any) -> Any:
    """A score_mod's / mask_mod's aux arrays as NumPy (device arrays copied)."""
    if not isinstance(aux, dict):
        return aux
    return {name: _to_numpy(x, f"aux[{name!r}]") for name, x in aux.items()}


def _default_scale(scale: Any, d: int) -> float:
    """``1 / sqrt(d)`` for None, else the scale as a float, which must be finite and > 0."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a real number > 0 or None, got {scale!r}")
    value = float(scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale: expected a finite number > 0, got {value!r}")
    return value


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", np.shape(x)))
