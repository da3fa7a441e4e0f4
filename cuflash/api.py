"""The public functions `attention` and `attention_backward`.

torch tensors that autograd must differentiate (or that torch.compile is tracing) go to the
autograd node in `cuflash.torch`; every other call runs the framework-agnostic core
(`cuflash._core`: validation, replay, the CPU or GPU path), which `cuflash.torch` also calls.
So the core never imports a framework integration and the import graph has no cycle.
"""

from __future__ import annotations

import sys

import numpy as np

from cuflash import _core, _dropout
from cuflash._checks import MAX_SCALE  # noqa: F401 (docs/api.md names cuflash.api.MAX_SCALE)


def attention(q, k, v, *, causal: bool = False, window: tuple[int, int] | None = None,
              scale: float | None = None, softcap: float = 0.0, alibi_slopes=None, sinks=None,
              bias=None, mask=None, score_mod=None, mask_mod=None, aux=None, block_map=None,
              dropout_p: float = 0.0, rng=None, layout: str = "bshd", return_lse: bool = False,
              out=None):
    """Exact scaled dot-product attention, softmax(scale * q k^T) v, without an N x N matrix.

    Args:
        q: queries, ``(B, Sq, Hq, D)`` for layout ``"bshd"`` or ``(B, Hq, Sq, D)`` for ``"bhsd"``;
            a 3-D array (no batch axis) is accepted in either layout. Any array with
            ``__dlpack__``: NumPy, CuPy, torch (CPU or CUDA), JAX.
        k: keys, ``(B, Sk, Hkv, D)`` (``"bhsd"``: ``(B, Hkv, Sk, D)``), same framework, device
            and dtype as `q`. ``Hq % Hkv == 0`` (multi-query / grouped-query attention).
        v: values, ``(B, Sk, Hkv, Dv)`` (``"bhsd"``: ``(B, Hkv, Sk, Dv)``): shaped like `k` but
            for its head dim ``Dv`` (1..256), which may differ from ``D`` (on CUDA q, k and v
            then run zero-padded to the wider head dim: one copy of each narrower array).
        causal: bottom-right aligned causal mask: query i sees key j iff ``j <= i + Sk - Sq``.
            A query that sees no key gets an all-zero output and ``lse = -inf``.
        window: sliding-window (local) attention, ``(left, right)`` ints, -1 meaning unbounded
            (flash-attn's convention): query i sees key j iff
            ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``. ``window=(-1, 0)`` is
            ``causal=True`` and ``(-1, -1)`` no mask; with `causal`, `right` is clipped to 0.
            Work is skipped tile by tile: time grows with the window, not with Sk.
        scale: softmax scale, a number in ``(0, MAX_SCALE]`` (about 2.3587e38: scale * log2(e)
            must be finite in float32); defaults to ``1 / sqrt(D)``.
        softcap: ``> 0``: logit soft-capping (Gemma 2, Grok): the scaled scores become
            ``softcap * tanh(s / softcap)`` before the softmax; 0 (the default) is off. Every
            path computes it, forward and backward.
        alibi_slopes: ALiBi (BLOOM, MPT; flash-attn's convention): a float32 or float64 array
            ``(Hq,)`` or ``(B, Hq)`` of finite slopes; ``-slope * |i + Sk - Sq - j|`` is added
            to the (scaled, capped) score of query i and key j. A NumPy array, or an array of
            q's framework and device. Every path (on CUDA not with a softcap). The slopes get
            no gradient.
        sinks: attention sinks (gpt-oss): a float32 or float64 array ``(Hq,)`` of finite
            logits, one per query head, of a virtual key with no value: every row's softmax
            denominator gains ``exp(sinks[h])`` and ``lse`` includes it (a row that sees no key
            gets zeros and ``lse = sinks[h]``). Every path; on CUDA, sinks on q's device are
            not read on the host (no wait for the device), so a NaN there is not refused: it
            gives NaN rows. Its gradient: `attention_backward`'s ``return_dsinks``, or torch
            autograd.
        bias: an additive float16/32/64 array broadcastable to ``(B, Hq, Sq, Sk)`` (any of B,
            Hq of size 1, SDPA's attn_mask shape in both layouts), added to the scores after
            ALiBi; read block by block, never expanded. Gradient: `attention_backward`'s
            ``return_dbias``, or torch autograd. Every path (on CUDA not with a softcap).
        mask: a boolean array broadcastable like `bias`, True = attend (SDPA's meaning); keys
            it hides behave as causal ones do (a row that sees no key: zeros, ``lse = -inf``).
            Every path (on CUDA not with a softcap).
        score_mod: your own modification of each scaled score, a `cuflash.ScoreMod`: C++
            compiled by NVRTC into the kernels (FlexAttention's idea, for every framework),
            with a NumPy form for the CPU path. Not with softcap, ALiBi, bias or mask (write
            them into it); sinks are fine. Calls with one are planned anew each time (not
            replayed); torch autograd and torch.compile take one.
        mask_mod: your own mask, a `cuflash.MaskMod`: a C++ boolean of ``b, h, q_idx, kv_idx``
            (True = attend), beside `causal` and `window`. On CUDA it is evaluated once into
            a block map (`block_map`) that the kernels skip hidden tiles by, then per score
            on the tiles the map shows partly visible.
        aux: ``{name: array}``: read-only arrays the score_mod and mask_mod read under those
            names, at most 8, each of at most 4 axes, float16/bfloat16/float32/float64/int32/
            int64/bool, NumPy or of q's framework and device. In C++ ``name(i, j)`` reads
            element (i, j); the NumPy forms get every array as a keyword argument.
        block_map: the mask_mod's `cuflash.BlockMap`, built once by `cuflash.block_map` for
            this call's q, k, mask_mod, aux, causal and window and reused (every layer of a
            step); None builds one per call on CUDA (one kernel over the band's pairs; the
            CPU path needs none). Its aux arrays must hold the values the map was built from.
        dropout_p: attention dropout (flash-attn's meaning): each softmax probability is
            dropped with probability `dropout_p` (in [0, 1)) and the kept ones scaled by
            ``1 / (1 - dropout_p)`` before they weight the values; lse is without it. The
            mask is a pure function of `rng` and the position (`cuflash.dropout_mask` returns
            it), so the backward draws it again rather than storing it. The CPU path (CUDA
            raises NotImplementedError for now).
        rng: ``(seed, offset)``, two ints in [0, 2**64): the random stream of a call with
            dropout (required with ``dropout_p > 0``). Pass the same to `attention_backward`;
            a new offset (or seed) draws a new mask.
        layout: ``"bshd"`` (flash-attn / JAX order) or ``"bhsd"`` (PyTorch SDPA order).
        return_lse: also return the log-sum-exp of each query row.
        out: optional array of the output's shape and dtype, in the caller's framework and on
            its device, written in place (not supported for JAX, whose arrays are immutable).

    Returns:
        ``out``, shaped like `q` but with v's head dim ``Dv`` last, in q's framework, device
        and dtype; with `return_lse`, ``(out, lse)`` where lse is float32 ``(B, Hq, Sq)``
        (``(Hq, Sq)`` for 3-D input), natural log.

    dtypes: float16, bfloat16, float32, float64 on CUDA (fp32/fp64 at full precision, no tf32);
    float16 (computed in float32), float32, float64 on the CPU. Inputs are never modified.
    torch tensors that require grad get gradients through cuflash's backward kernels.

    See also: `attention_backward`, `cuflash.reference.attention`, `cuflash.jax.attention`.
    """
    user = (score_mod is not None or mask_mod is not None or aux is not None
            or block_map is not None)
    dropout = not _dropout.is_off(dropout_p, rng)
    if out is None and _wants_autograd(q, k, v, sinks, bias):
        from cuflash import torch as cuflash_torch

        if sys.modules["torch"].compiler.is_compiling():
            # Validated as plain Python on shapes and dtypes, folded into the traced graph.
            _core.validate(q, k, v, causal=causal, window=window, scale=scale, layout=layout,
                           softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, bias=bias,
                           mask=mask, score_mod=score_mod, mask_mod=mask_mod, aux=aux,
                           block_map=block_map)
        return cuflash_torch.attention(q, k, v, causal=causal, window=window, scale=scale,
                                       softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                                       bias=bias, mask=mask, score_mod=score_mod,
                                       mask_mod=mask_mod, aux=aux, block_map=block_map,
                                       dropout_p=dropout_p, rng=rng, layout=layout,
                                       return_lse=return_lse)
    if out is None and not return_lse and not user and not dropout and _jax_on_gpu(q, k, v):
        # One memoised compiled call (cuflash.jax), not validation and DLPack at every call.
        from cuflash import jax as cuflash_jax

        return cuflash_jax.attention(q, k, v, causal=causal, window=window, scale=scale,
                                     softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                                     bias=bias, mask=mask, layout=layout)
    return _core.attention(q, k, v, causal=causal, window=window, scale=scale, softcap=softcap,
                           alibi_slopes=alibi_slopes, sinks=sinks, bias=bias, mask=mask,
                           score_mod=score_mod, mask_mod=mask_mod, aux=aux, block_map=block_map,
                           dropout_p=dropout_p, rng=rng, layout=layout, return_lse=return_lse,
                           out=out)


def attention_backward(dout, q, k, v, out, lse, *, causal: bool = False,
                       window: tuple[int, int] | None = None, scale: float | None = None,
                       softcap: float = 0.0, alibi_slopes=None, sinks=None, bias=None,
                       mask=None, score_mod=None, mask_mod=None, aux=None, block_map=None,
                       dropout_p: float = 0.0, rng=None, layout: str = "bshd",
                       deterministic: bool = False, return_dsinks: bool = False,
                       return_dbias: bool = False):
    """Gradients of `attention` with respect to q, k and v.

    Args:
        dout: gradient of the output, shaped like it (q's shape with v's head dim ``Dv``).
        q, k, v, causal, window, scale, softcap, alibi_slopes, sinks, bias, mask, score_mod,
            mask_mod, aux, block_map, dropout_p, rng, layout: exactly as passed to `attention`
            (the forward's block map serves the backward too; its rng draws its dropout mask
            again). A score_mod needs its
            ``grad`` here (and ``numpy_grad`` on the CPU unless grad is ``"1"``); the aux
            arrays get no gradient.
        out: the forward's output.
        lse: the forward's log-sum-exp (``return_lse=True``), float32 ``(B, Hq, Sq)``.
        deterministic: on the GPU, compute dq without atomics so results are bit-identical run
            after run (slower). The CPU path is always deterministic.
        return_dsinks: also return the gradient of `sinks` (which must be given), shaped and
            typed like it: ``-sum over batch and rows of exp(sink - lse) * rowsum(dout * out)``.
        return_dbias: also return the gradient of `bias` (which must be given), shaped and
            typed like it: the scores' gradient summed over the axes bias was broadcast along.
            On CUDA the kernels write it into an Accum ``(B, Hq, Sk, Sq)`` scratch first (the
            sm80 path then runs its deterministic dQ kernel, which writes it), and the call is
            not replayed.

    Returns:
        ``(dq, dk, dv)`` shaped like q, k, v, in their framework, device and dtype, followed by
        ``dsinks`` with `return_dsinks` and ``dbias`` with `return_dbias`, in that order. For
        GQA, dk/dv sum over each group's query heads.

    For float64 on the GPU the float32 `lse` would limit gradients to ~1e-7 relative error, so
    the row statistics are recomputed in float64 (one extra forward pass). The CPU path always
    recomputes them, in its compute dtype (one extra pass over the keys), and reads `lse` only
    to validate it: a float32 lse is too coarse for exp(s - lse) once scores reach ~1e4.
    """
    return _core.attention_backward(
        dout, q, k, v, out, lse, causal=causal, window=window, scale=scale, softcap=softcap,
        alibi_slopes=alibi_slopes, sinks=sinks, bias=bias, mask=mask, score_mod=score_mod,
        mask_mod=mask_mod, aux=aux, block_map=block_map, dropout_p=dropout_p, rng=rng,
        layout=layout, deterministic=deterministic, return_dsinks=return_dsinks,
        return_dbias=return_dbias)


def block_map(q, k, *, mask_mod, aux=None, causal: bool = False,
              window: tuple[int, int] | None = None, layout: str = "bshd"):
    """Evaluate a mask_mod once into a `cuflash.BlockMap` for calls on these shapes.

    Args:
        q, k: the queries and keys of the calls the map is for (only their shapes, dtype and
            device are read), as for `attention`.
        mask_mod: the `cuflash.MaskMod`.
        aux: its arrays, as for `attention`; the map holds what they say now.
        causal, window, layout: as the calls will pass them.

    Returns:
        a `cuflash.BlockMap` to pass as ``block_map=`` to `attention` and `attention_backward`
        (and `cuflash.torch.attention`) with the same q/k shapes, mask_mod, aux, causal and
        window; on q's device, built on its current stream (NumPy inputs: built with the
        mask_mod's NumPy form, for the CPU path, which does not need one). A map is broadcast
        over the batch (heads) when the mask_mod's code does not name ``b`` (``h``).

    FlexAttention's ``create_block_mask``: for each block of 64 query rows it keeps the keys
    some row sees and the keys every row sees (and the same for each block of 64 keys); the
    kernels walk only the first and skip the mask_mod's per-element test on the second.
    """
    if mask_mod is None:
        raise TypeError("mask_mod: a block map is built from a cuflash.MaskMod, got None")
    return _core.block_map(q, k, mask_mod=mask_mod, aux=aux, causal=causal, window=window,
                           layout=layout)


def dropout_mask(q, k, *, dropout_p: float, rng, layout: str = "bshd"):
    """The dropout mask `attention` applies for these q, k, `dropout_p` and `rng`: which
    softmax probabilities it keeps (a debug and test helper; the kernels never store it).

    Args:
        q, k: as for `attention` (only their shapes are read).
        dropout_p, rng: as for `attention`.
        layout: as for `attention`.

    Returns:
        a bool NumPy array ``(B, Hq, Sq, Sk)`` (``(Hq, Sq, Sk)`` for 3-D inputs), True where the
        probability is kept (then scaled by ``1 / (1 - dropout_p)``). A row's mask is drawn for
        every key, seen or not.
    """
    problem = _core.validate(q, k, k, causal=False, scale=None, layout=layout)
    p, rng = _dropout.check(dropout_p, rng)
    shape = (problem.batch, problem.heads_q, problem.seqlen_q, problem.seqlen_k)
    kept = _dropout.keep(shape, p, rng) if p else np.ones(shape, dtype=bool)
    return kept if problem.batched else kept[0]


def _wants_autograd(q, k, v, sinks, bias) -> bool:
    """Whether a call is torch's to differentiate: q a torch tensor, grad mode on and one of q,
    k, v, sinks, bias requiring grad, or torch.compile tracing. Other frameworks never load
    torch here."""
    if type(q).__module__[:5] != "torch":
        return False
    torch = sys.modules["torch"]  # q is a torch tensor: torch is loaded
    if torch.is_grad_enabled() and (
            q.requires_grad or getattr(k, "requires_grad", False)
            or getattr(v, "requires_grad", False)
            or (sinks is not None and getattr(sinks, "requires_grad", False))
            or (bias is not None and getattr(bias, "requires_grad", False))):
        return True
    return torch.compiler.is_compiling()


def _jax_on_gpu(q, k, v) -> bool:
    """Whether q, k and v are all concrete JAX arrays on a GPU."""
    if type(q).__module__[:3] != "jax":
        return False
    jax = sys.modules["jax"]
    if not all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
               for x in (q, k, v)):
        return False
    return all(d.platform == "gpu" for x in (q, k, v) for d in x.devices())
