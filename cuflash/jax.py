"""JAX integration: :func:`attention` (a ``jax.custom_vjp`` backed by cuflash's own backward) and
:func:`dot_product_attention`, shaped like ``jax.nn.dot_product_attention``.

Where it runs:

- **Under jax.jit on a GPU** (and ``jax.grad``, ``jax.value_and_grad``, ``jax.vmap``,
  ``jax.checkpoint``, ``shard_map``, ``lax.scan``, ...): the CUDA kernels run inside the compiled
  function, on XLA's stream and XLA's buffers, with no host round trip and no synchronisation.
  Each forward and backward is an XLA buffer callback (``jax.experimental.buffer_callback``)
  whose kernels were compiled and whose launches were planned while JAX traced the function; a
  run only reads the buffers' addresses and launches. The backward's scratch is an output of
  its callback, allocated by XLA. The callbacks may be recorded into XLA's command buffers (CUDA
  graphs). ``jax.vmap`` folds the mapped axis into the batch: one launch for the whole stack.
- **Under jax.jit on the CPU backend**: ``jax.pure_callback`` into cuflash's NumPy path (float16
  and bfloat16 computed in float32).
- **Eager** (concrete arrays, including inside an eager ``jax.grad`` / ``jax.vjp``): GPU arrays
  take the compiled path above, jitted once per options and shape (a call is then JAX's
  dispatch of a compiled function, not a validation and plan per call); CPU arrays go through
  DLPack to the NumPy path without a copy, and the results come back as JAX arrays.

The platform is chosen per compiled function with ``jax.lax.platform_dependent``, so a function
jitted onto the CPU of a GPU machine runs the NumPy path. Compiling for any other platform fails
when XLA lowers the function, with a ``NotImplementedError`` naming the platform. Shape, dtype
and option errors are raised while tracing, naming the argument.

Tracing plans the GPU launches wherever CuPy sees a GPU (so a function to run on a GPU must be
traced in a process that has one), compiling each kernel variant on its first use (CuPy's disk
cache makes that a load in later processes). A new shape is a new trace: it plans again.

Context parallelism: :func:`ring_attention`, inside ``jax.shard_map``, computes attention over a
sequence sharded along a mesh axis, passing keys and values around the ring with
``jax.lax.ppermute``; :func:`zigzag_order` / :func:`zigzag_unorder` put a sequence into (and
back from) the causal load-balanced order before sharding.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from cuflash import _checks, _core, _dropout, _dtypes, _interop, _jax_trace, _user_mods, _variant
from cuflash._jax_ring import ring_attention, zigzag_order, zigzag_unorder
from cuflash._jax_trace import NO_ARRAYS, Options, ScoreArrays

__all__ = ["attention", "attention_varlen", "attention_varlen_backward",
           "dot_product_attention", "ring_attention", "zigzag_order", "zigzag_unorder"]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
              window: tuple[int, int] | None = None, scale: float | None = None,
              softcap: float = 0.0, alibi_slopes: jax.Array | None = None,
              sinks: jax.Array | None = None, bias: jax.Array | None = None,
              mask: jax.Array | None = None, score_mod=None, mask_mod=None,
              aux: dict | None = None, dropout_p: float = 0.0, rng=None,
              layout: str = "bshd") -> jax.Array:
    """Exact attention for JAX arrays, differentiable with respect to q, k, v, the sinks and
    the bias.

    Args:
        q: queries, ``(B, Sq, Hq, D)`` for layout ``"bshd"`` or ``(B, Hq, Sq, D)`` for ``"bhsd"``;
            a 3-D array (no batch axis) is accepted in either layout.
        k: keys, ``(B, Sk, Hkv, D)`` (``"bhsd"``: ``(B, Hkv, Sk, D)``), ``Hq % Hkv == 0``.
        v: values, shaped like `k` but for its head dim ``Dv``, which may differ from ``D`` (as
            for :func:`cuflash.attention`; on CUDA q, k and v then run zero-padded to the wider
            head dim).
        causal: bottom-right aligned causal mask (query i sees key j iff ``j <= i + Sk - Sq``).
        window: sliding window ``(left, right)``, -1 unbounded, as for :func:`cuflash.attention`.
        scale: softmax scale, a Python number > 0; defaults to ``1 / sqrt(D)``.
        softcap: ``> 0``: logit soft-capping, as for :func:`cuflash.attention`, on every
            backend, eager and under jit (on CUDA not with `alibi_slopes`, `bias` or `mask`:
            compiling that for CUDA raises NotImplementedError naming softcap).
        alibi_slopes: ALiBi, a float32 or float64 array ``(Hq,)`` or ``(B, Hq)``, as for
            :func:`cuflash.attention`. Traced, not differentiated: its cotangent is zero.
        sinks: attention sinks (gpt-oss), a float32 or float64 array ``(Hq,)``: each row's
            softmax denominator gains ``exp(sinks[h])``, as for :func:`cuflash.attention`.
            Differentiable (a traced value, not static); one set for the whole batch, so under
            ``jax.vmap`` it must not be mapped.
        bias: an additive float16/32/64 array broadcastable to ``(B, Hq, Sq, Sk)`` (this order
            in both layouts), as for :func:`cuflash.attention`. Differentiable: its gradient is
            summed over the axes it was broadcast along, in its shape and dtype (on CUDA from
            the kernels' dS, an Accum ``(B, Hq, Sk, Sq)`` buffer); a bias that is not
            differentiated (a constant, or under ``jax.lax.stop_gradient``) forms none.
        mask: a bool array broadcastable like `bias`, True = attend; a row it hides entirely
            gets zeros. Not differentiated.
        score_mod, mask_mod, aux: your own modifications, a `cuflash.ScoreMod` / a
            `cuflash.MaskMod` and ``{name: array}``, as for :func:`cuflash.attention` (a
            score_mod needs its ``grad`` for gradients). Static, but for the aux arrays, which
            are traced and not differentiated (zero cotangents), and not mapped by
            ``jax.vmap`` (nor may the C++ read ``b`` there: the mapped axis joins the batch).
            On the CPU backend eager and under ``jax.jit`` (the NumPy forms); on a GPU eagerly
            only (compiling them for CUDA under jit raises NotImplementedError).
        dropout_p, rng: attention dropout, as for :func:`cuflash.attention`: `dropout_p`
            static, `rng` a JAX PRNG key (its two key words are the seed, the offset 0; traced,
            so a new key per step does not recompile) or ``(seed, offset)`` Python ints. The
            CPU backend, eager and under jit (the CUDA kernels do not apply dropout yet); not
            under ``jax.vmap`` (the mask is drawn by the batch index).
        layout: ``"bshd"`` or ``"bhsd"``.

    `causal`, `window`, `scale`, `softcap` and `layout` are static (not differentiated, not
    traced). Under ``jax.vmap`` the slopes, the bias and the mask may be mapped or not (the
    mapped axis joins the batch, as q's does); the sinks may not.

    Returns:
        the attention output, shaped like q but with v's head dim ``Dv``, q's dtype and device.

    dtypes: on a GPU float16, bfloat16, float32, float64 (eager or under ``jax.jit``); on the CPU
    float16 and bfloat16 (computed in float32), float32, float64 (float64 needs
    ``jax_enable_x64``). See the module docstring for where each part runs.

    See also: `dot_product_attention` (``jax.nn.dot_product_attention``'s arguments),
    `cuflash.attention` (any framework, no autodiff), `cuflash.attention_backward`.
    """
    q, k, v = (_as_array(x) for x in (q, k, v))
    score_mod, mask_mod, _ = _user_mods.check_mods(score_mod, mask_mod, aux)
    user, aux_arrays = _user_mods.register(score_mod, mask_mod, aux)
    p, words = _dropout_stream(dropout_p, rng)
    options = Options(causal, _variant.check_window(window), scale, layout,
                      _variant.check_softcap(softcap), user, p)
    mods = ScoreArrays(*(None if x is None else _as_array(x)
                         for x in (sinks, alibi_slopes, bias, mask)), rng=words,
                       aux=tuple(_as_array(x) for x in aux_arrays) if aux_arrays else None)
    if _concrete(q, k, v, *jax.tree.leaves(mods)):
        # No transformation is running (it would pass tracers), so nothing asks for a
        # gradient: the forward runs without the custom_vjp, whose per-call bookkeeping
        # (argument signatures, debug info) cost more host time than the launch on the H100.
        return _forward(q, k, v, options, mods)[0]
    # Inside shard_map: operands that vary over fewer mesh axes than the others are marked as
    # varying over all of them, outside the custom_vjp, so that JAX sums their gradients.
    axes = _jax_trace.varying_axes(q, k, v, *jax.tree.leaves(mods))
    q, k, v = (_jax_trace.vary(x, axes) for x in (q, k, v))
    mods = jax.tree.map(lambda x: _jax_trace.vary(x, axes), mods)
    if not mods.given():
        return _attention(q, k, v, options)
    return _attention_mods(q, k, v, mods, options)


def attention_varlen(q: jax.Array, k: jax.Array, v: jax.Array, cu_seqlens_q: jax.Array,
                     cu_seqlens_k: jax.Array, *, max_seqlen_q: int | None = None,
                     max_seqlen_k: int | None = None, seqused_k: jax.Array | None = None,
                     causal: bool = False, window: tuple[int, int] | None = None,
                     scale: float | None = None, softcap: float = 0.0,
                     alibi_slopes: jax.Array | None = None, sinks: jax.Array | None = None,
                     return_lse: bool = False):
    """:func:`cuflash.attention_varlen` for JAX arrays whose prefix sums may be traced: under
    ``jax.jit`` (and ``jax.grad``, which differentiates q, k, v and the sinks).

    The packed batch runs as one :func:`attention` over ``(1, total_q)`` queries and
    ``(1, total_k)`` keys with a boolean document mask built on the device from the prefix
    sums: query row r of sequence b sees key c iff c belongs to sequence b, lies within its
    first ``seqused_k[b]`` keys, and passes `causal` / `window` on the sequence's own positions
    (bottom-right aligned on its used keys, as :func:`cuflash.attention_varlen`). The mask has
    ``total_q * total_k`` bytes and the kernels visit every tile: the cost of the dense problem,
    not of the sequences' own lengths (:func:`cuflash.attention_varlen` with concrete prefix
    sums schedules by the lengths, one call per sequence). On CUDA a softcap does not combine
    with the mask (NotImplementedError naming softcap when XLA lowers for CUDA).

    Args: as :func:`cuflash.attention_varlen`. The prefix sums (int32 ``(B + 1,)``) and
    `seqused_k` may be traced, so their values are not checked: ``cu[0] == 0``, non-decreasing
    and ending at the total are the caller's to keep. `max_seqlen_q` / `max_seqlen_k` are
    checked for type only. `alibi_slopes` needs each sequence's own positions, which one
    packed call does not have: NotImplementedError.

    Returns:
        ``out`` ``(total_q, Hq, Dv)``, or ``(out, lse)`` with the float32 lse ``(Hq, total_q)``
        (not differentiated; it costs a second forward pass).
    """
    _checks.check_flag("causal", causal)
    _checks.check_flag("return_lse", return_lse)
    left, right = _variant.check_window(window)
    if causal:
        right = 0
    if alibi_slopes is not None:
        raise NotImplementedError(
            "alibi_slopes: ALiBi needs each sequence's own positions, which the packed call "
            "under jax.jit does not have; call cuflash.attention_varlen with concrete "
            "(NumPy) prefix sums outside jax.jit")
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            raise ValueError(f"{name}: expected (total, heads, head_dim), got shape {x.shape}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v: expected the shape of k {k.shape} but for the last axis (v's head "
                         f"dim Dv may differ), got {v.shape}")
    cu_q, cu_k = (_int32_vector(x, name) for x, name in ((cu_seqlens_q, "cu_seqlens_q"),
                                                         (cu_seqlens_k, "cu_seqlens_k")))
    if cu_q.shape[0] < 1:
        raise ValueError("cu_seqlens_q: expected B + 1 >= 1 entries, got none")
    if cu_k.shape != cu_q.shape:
        raise ValueError(f"cu_seqlens_k: expected {cu_q.shape[0]} entries like cu_seqlens_q "
                         f"(B + 1), got {cu_k.shape[0]}")
    for name, given in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if given is not None and (isinstance(given, bool)
                                  or not isinstance(given, numbers.Integral)):
            raise TypeError(f"{name}: expected an int or None, got {given!r}")
    batch = cu_q.shape[0] - 1
    used = None
    if seqused_k is not None:
        used = _int32_vector(seqused_k, "seqused_k")
        if used.shape != (batch,):
            raise ValueError(f"seqused_k: expected shape ({batch},) (B), got {used.shape}")
    visible = _document_mask(cu_q, cu_k, used, q.shape[0], k.shape[0], left, right)
    mods = {"sinks": sinks, "mask": visible[None, None]}
    out = attention(q[None], k[None], v[None], scale=scale, softcap=softcap, **mods)[0]
    if not return_lse:
        return out
    options = Options(False, (-1, -1), scale, "bshd", _variant.check_softcap(softcap))
    fixed = [jax.lax.stop_gradient(x[None]) for x in (q, k, v)]
    arrays = ScoreArrays(sinks=None if sinks is None else jax.lax.stop_gradient(
        jnp.asarray(sinks)), mask=mods["mask"])
    _, lse = _forward(*fixed, options, arrays)
    return out, lse[0].astype(jnp.float32)


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *,
                              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                              seqused_k=None, causal: bool = False,
                              window: tuple[int, int] | None = None, scale: float | None = None,
                              softcap: float = 0.0, alibi_slopes=None, sinks=None,
                              deterministic: bool = False, return_dsinks: bool = False):
    """:func:`cuflash.attention_varlen_backward` for JAX arrays whose prefix sums may be
    traced: the vjp of :func:`attention_varlen` (`out` and `lse` are checked for shape, not
    read: the forward runs again). Under ``jax.grad`` of :func:`attention_varlen` this is not
    needed; it serves code written against the framework-agnostic pair."""
    _checks.check_flag("deterministic", deterministic)
    _checks.check_varlen_grad_inputs(q, v, dout, out, lse, return_dsinks, sinks)

    def forward(q, k, v, sinks):
        return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                max_seqlen_k=max_seqlen_k, seqused_k=seqused_k, causal=causal,
                                window=window, scale=scale, softcap=softcap,
                                alibi_slopes=alibi_slopes, sinks=sinks)

    _, vjp = jax.vjp(forward, q, k, v, sinks)
    dq, dk, dv, dsinks = vjp(jnp.asarray(dout))
    return (dq, dk, dv, dsinks) if return_dsinks else (dq, dk, dv)


def _dropout_stream(dropout_p, rng) -> tuple[float, jax.Array | None]:
    """``(p, words)``: the checked `dropout_p` and its stream as uint32 ``(seed_lo, seed_hi,
    offset_lo, offset_hi)`` (None without dropout), from a JAX PRNG key or a pair of ints."""
    if rng is not None and isinstance(rng, jax.Array):
        data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) \
            else rng
        if data.shape != (2,) or data.dtype != jnp.uint32:
            raise TypeError(f"rng: expected a JAX PRNG key of two uint32 words (threefry) or "
                            f"(seed, offset) ints, got {data.dtype} {data.shape}")
        p, _ = _dropout.check(dropout_p, (0, 0))
        return p, jnp.concatenate([data, jnp.zeros(2, jnp.uint32)]) if p else None
    p, pair = _dropout.check(dropout_p, rng)
    if not p:
        return p, None
    seed, offset = pair
    return p, jnp.asarray([seed & 0xFFFFFFFF, seed >> 32, offset & 0xFFFFFFFF, offset >> 32],
                          dtype=jnp.uint32)


def _int32_vector(x, name: str) -> jax.Array:
    """`x` as a 1-D int32 JAX array (traced or not), or TypeError/ValueError naming it."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or _dtypes.dtype_name(dtype) != "int32":
        raise TypeError(f"{name}: expected an int32 array (flash-attn's convention), got "
                        f"{'dtype ' + str(dtype) if dtype is not None else type(x).__name__}")
    x = jnp.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {x.shape}")
    return x


def _document_mask(cu_q, cu_k, used, total_q: int, total_k: int, left: int,
                   right: int) -> jax.Array:
    """``(total_q, total_k)`` bool: row r sees key c iff both lie in the same sequence, c is
    within its used keys and within the window (-1: unbounded) of r's bottom-right aligned
    position in the sequence."""
    batch = cu_q.shape[0] - 1
    if batch == 0:
        return jnp.zeros((total_q, total_k), bool)
    rows = jnp.arange(total_q, dtype=jnp.int32)
    keys = jnp.arange(total_k, dtype=jnp.int32)
    # The sequence of a row: the last whose start is at or before it (empty ones are skipped).
    doc_q = jnp.clip(jnp.searchsorted(cu_q, rows, side="right") - 1, 0, batch - 1)
    doc_k = jnp.clip(jnp.searchsorted(cu_k, keys, side="right") - 1, 0, batch - 1)
    len_q = cu_q[doc_q + 1] - cu_q[doc_q]
    len_k = cu_k[doc_q + 1] - cu_k[doc_q]
    seen = len_k if used is None else used[doc_q]
    position = rows - cu_q[doc_q] + seen - len_q  # i + Sk - Sq on the used keys
    local = keys - cu_k[doc_k]
    visible = (doc_q[:, None] == doc_k[None, :]) & (local[None, :] < seen[:, None])
    if right >= 0:
        visible &= local[None, :] <= position[:, None] + right
    if left >= 0:
        visible &= local[None, :] >= position[:, None] - left
    return visible


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          bias: jax.Array | None = None, mask: jax.Array | None = None, *,
                          scale: float | None = None, is_causal: bool = False,
                          query_seq_lengths: jax.Array | None = None,
                          key_value_seq_lengths: jax.Array | None = None,
                          local_window_size: int | tuple[int, int] | None = None,
                          implementation: str | None = None,
                          return_residual: bool = False) -> jax.Array:
    """``jax.nn.dot_product_attention`` computed by cuflash: same arguments, same masks.

    Args:
        query: ``(B, T, N, H)`` or ``(T, N, H)``.
        key: ``(B, S, K, H)`` or ``(S, K, H)``, ``N % K == 0`` (GQA / MQA).
        value: shaped like `key`.
        bias: an array added to the scaled logits, broadcastable to ``(B, N, T, S)`` (JAX's
            convention, which is cuflash's ``(B, Hq, Sq, Sk)``; fewer than 4 axes get leading
            ones, as in JAX), float16, bfloat16 (passed on as float32, exactly), float32 or
            float64. Differentiable, on the CPU only: see `attention`'s `bias`.
        mask: a bool array broadcastable like `bias`, True = take part in attention.
        query_seq_lengths, key_value_seq_lengths: not supported yet: each must be None
            (NotImplementedError naming it otherwise).
        scale: softmax scale, a Python number > 0; defaults to ``1 / sqrt(H)``.
        is_causal: JAX's causal mask, aligned top-left: query i sees key j iff ``j <= i``.
        local_window_size: ``(left, right)`` ints >= 0, or one int for both: query i sees key j
            iff ``i - left <= j <= i + right`` (top-left aligned, as JAX defines it).
        implementation: must be None (cuflash is the implementation).
        return_residual: must be False.

    Returns:
        the attention output, shaped like `query`, in its dtype.

    JAX's masks are mapped onto cuflash's bottom-right aligned window (`cuflash.attention`'s
    `window`), keys no query sees being cut off (and the bias's and the mask's columns with
    them). One case has no such window: a left window with more queries than ``S + left``, whose
    last queries would see no key (JAX gives them the mean of all values); it raises ValueError.
    A row that `mask` (with the causal and window masks) hides entirely gets zeros, where JAX
    gives it the mean of all values. Differentiable with respect to query, key, value and bias;
    works under every transform :func:`attention` does.

    See also: `attention` (cuflash's own arguments: bottom-right causal, windows, "bhsd").
    """
    for name, given in (("query_seq_lengths", query_seq_lengths),
                        ("key_value_seq_lengths", key_value_seq_lengths)):
        if given is not None:
            raise NotImplementedError(f"{name}: not supported by cuflash.jax."
                                      f"dot_product_attention yet; expected None, got "
                                      f"{type(given).__name__}")
    if implementation is not None:
        raise ValueError(f"implementation: expected None (cuflash is the implementation), "
                         f"got {implementation!r}")
    if return_residual is not False:
        raise NotImplementedError(f"return_residual: not supported by cuflash.jax."
                                  f"dot_product_attention; expected False, got "
                                  f"{return_residual!r}")
    _checks.check_flag("is_causal", is_causal)
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    for name, x, axes in (("query", query, "T, N"), ("key", key, "S, K"),
                          ("value", value, "S, K")):
        if x.ndim not in (3, 4):
            raise ValueError(f"{name}: expected (B, {axes}, H) or ({axes}, H), got shape "
                             f"{x.shape}")
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.dtype == jnp.bfloat16:  # JAX takes any float; cuflash float16/32/64
            bias = bias.astype(jnp.float32)
    mask = None if mask is None else jnp.asarray(mask)
    left, right = _local_window(local_window_size)
    if is_causal:
        right = 0
    seqlen_k = key.shape[-3]
    window, keys = _variant.from_top_left(left, right, query.shape[-3], seqlen_k)
    if keys < seqlen_k:
        key, value = key[..., :keys, :, :], value[..., :keys, :, :]
        # Columns of keys no query sees go with them (a column axis of 1 broadcasts as it is).
        bias, mask = (x[..., :keys] if x is not None and x.ndim and x.shape[-1] == seqlen_k
                      else x for x in (bias, mask))
    return attention(query, key, value, window=window, scale=scale, bias=bias, mask=mask,
                     layout="bshd")


def _local_window(size) -> tuple[int, int]:
    """`local_window_size` as (left, right) ints >= 0, or (-1, -1) for None."""
    if size is None:
        return -1, -1
    pair = (size, size) if isinstance(size, numbers.Integral) else size
    valid = (isinstance(pair, (tuple, list)) and len(pair) == 2
             and all(isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))
                     and x >= 0 for x in pair))
    if not valid:
        raise ValueError(f"local_window_size: expected None, an int >= 0 or a pair (left, right) "
                         f"of ints >= 0, got {size!r}")
    return int(pair[0]), int(pair[1])


# ---- the custom_vjp ----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, options: Options):
    return _forward(q, k, v, options)[0]


def _attention_fwd(q, k, v, options: Options):
    out, lse = _forward(q, k, v, options)
    return out, (q, k, v, out, lse)


def _attention_bwd(options: Options, residuals, dout):
    return _backward(dout, *residuals, options)


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_mods(q, k, v, mods: ScoreArrays, options: Options):
    return _forward(q, k, v, options, mods)[0]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Wants:
    """Which gradients the backward forms beyond q's, k's, v's and the sinks': a residual of
    no leaves (static: part of the residuals' tree structure)."""

    dbias: bool


def _attention_mods_fwd(q, k, v, mods, options: Options):
    # symbolic_zeros: every array comes as a CustomVJPPrimal (.value, .perturbed). A bias that
    # is not differentiated gets no gradient formed (on CUDA, no O(S^2) dS buffer).
    wants = _Wants(dbias=mods.bias is not None and mods.bias.perturbed)
    q, k, v = (x.value for x in (q, k, v))
    mods = jax.tree.map(lambda x: x.value, mods, is_leaf=lambda x: isinstance(x, CustomVJPPrimal))
    out, lse = _forward(q, k, v, options, mods)
    return out, (q, k, v, mods, out, lse, wants)


def _attention_mods_bwd(options: Options, residuals, dout):
    q, k, v, mods, out, lse, wants = residuals
    if isinstance(dout, SymbolicZero):  # the output takes no part in the differentiated value
        return None, None, None, None
    dq, dk, dv, *rest = _backward(dout, q, k, v, out, lse, options, mods, dbias=wants.dbias)
    dsinks = rest.pop(0).astype(mods.sinks.dtype) if mods.sinks is not None else None
    dbias = rest.pop(0) if wants.dbias else None
    # None: no cotangent (zeros) for the slopes, the mask, the aux arrays and a bias not
    # differentiated.
    return dq, dk, dv, ScoreArrays(sinks=dsinks, bias=dbias)


_attention_mods.defvjp(_attention_mods_fwd, _attention_mods_bwd, symbolic_zeros=True)


def _forward(q, k, v, options: Options, mods: ScoreArrays = NO_ARRAYS):
    """``(out, lse)``: staged for the platform when traced or on a GPU (but for a user
    modification there: the core, eagerly), else the NumPy core."""
    if not _concrete(q, k, v, *jax.tree.leaves(mods)):
        return _jax_trace.forward(q, k, v, options, mods)
    if _on_gpu(q) and not options.user and not options.dropout_p:
        return _compiled(_jax_trace.forward, options)(q, k, v, mods=mods)
    if _on_gpu(q):
        return _eager_forward(q, k, v, options, mods)
    forward = functools.partial(_core.attention, causal=options.causal, window=options.window,
                                scale=options.scale, softcap=options.softcap,
                                layout=options.layout, return_lse=True,
                                **mods.core_kwargs(options))
    if _cpu_computes_in_float32(q):
        out, lse = forward(*(x.astype(jnp.float32) for x in (q, k, v)))
        return out.astype(q.dtype), lse
    return forward(q, k, v)


def _backward(dout, q, k, v, out, lse, options: Options, mods: ScoreArrays = NO_ARRAYS,
              dbias: bool = False):
    """``(dq, dk, dv)``, then ``dsinks`` with sinks and ``dbias`` with `dbias`: staged for the
    platform when traced or on a GPU, else the NumPy core."""
    if not _concrete(dout, q, k, v, out, lse, *jax.tree.leaves(mods)):
        return _jax_trace.backward(dout, q, k, v, out, lse, options, mods, dbias=dbias)
    if _on_gpu(q) and not options.user and not options.dropout_p:
        return _compiled(_jax_trace.backward, options, dbias=dbias)(dout, q, k, v, out, lse,
                                                                    mods=mods)
    # The core takes the arrays beside q, k, v in q's framework or NumPy: their backend views
    # here (NumPy, or CuPy on a GPU), so that its gradients come back so too.
    side = mods.core_kwargs(options, lambda x: _interop.to_backend(x, _interop.source_of(x, "aux")))
    backward = functools.partial(_core.attention_backward, causal=options.causal,
                                 window=options.window, scale=options.scale,
                                 softcap=options.softcap, layout=options.layout,
                                 return_dsinks=mods.sinks is not None, return_dbias=dbias,
                                 **side)
    if lse.dtype != jnp.float32:
        # A traced forward keeps float64 statistics for float64 inputs; the core recomputes
        # those and takes float32 (it only validates them).
        lse = lse.astype(jnp.float32)
    if _cpu_computes_in_float32(q):
        grads = _eager_backward(backward, *(x.astype(jnp.float32) for x in (dout, q, k, v, out)),
                                lse)
        return (*(g.astype(q.dtype) for g in grads[:3]), *grads[3:])  # dsinks, dbias keep theirs
    return _eager_backward(backward, dout, q, k, v, out, lse)


def _cpu_computes_in_float32(q) -> bool:
    """bfloat16 on the CPU, which the NumPy path computes in float32 (as it does float16)."""
    return (_dtypes.dtype_name(q.dtype) == _dtypes.BFLOAT16
            and _interop.source_of(q, "q").device == "cpu")


def _eager_forward(q, k, v, options: Options, mods: ScoreArrays):
    """``(out, lse)`` of concrete GPU arrays through the core (its CUDA kernels take a user
    modification eagerly), on JAX's stream; JAX arrays back."""
    src = _interop.source_of(q, "q")
    with _interop.stream_scope(src):
        side = mods.core_kwargs(options, lambda x: _interop.to_backend(x, _interop.source_of(
            x, "aux")))
        out, lse = _core.attention(*(_interop.to_backend(x, src) for x in (q, k, v)),
                                   causal=options.causal, window=options.window,
                                   scale=options.scale, softcap=options.softcap,
                                   layout=options.layout, return_lse=True, **side)
        return _interop.from_backend(None, out, src), _interop.from_backend(None, lse, src)


def _eager_backward(backward, *arrays):
    """`backward` on the NumPy / CuPy views of concrete JAX arrays; JAX gradients back.

    _core.attention_backward rejects JAX arrays: it validates the forward output it is handed with
    the check meant for ``attention(out=...)``, which refuses JAX arrays as immutable. So the
    arrays go in as the backend views the core would make of them anyway; once that check is
    limited to ``out=``, this can call `backward` on the JAX arrays directly.
    """
    src = _interop.source_of(arrays[1], "q")
    with _interop.stream_scope(src):
        views = [_interop.to_backend(x, src) for x in arrays]
        return tuple(_interop.from_backend(None, g, src) for g in backward(*views))


@functools.cache
def _compiled(staged, options: Options, **static):
    """`staged` (`_jax_trace.forward` or `.backward`) jitted for `options` (and the `static`
    keywords, the backward's `dbias`): concrete GPU arrays run the kernels as a compiled call.
    JAX dispatches a compiled call in microseconds, where the eager core would validate, plan
    and pass every array through DLPack each time; a new shape or dtype compiles (and plans)
    once, as under the caller's own jit. Memoised: a new jitted callable each call would
    retrace the function every call (jit's cache is keyed by the callable)."""
    return jax.jit(functools.partial(staged, options=options, **static))


def _as_array(x) -> jax.Array:
    """`x` as a JAX array; a concrete one as it is (jnp.asarray costs microseconds). Traced
    values still go through jnp.asarray, which makes a NumPy primal a JAX one."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return x
    return jnp.asarray(x)


def _on_gpu(x) -> bool:
    return _interop.source_of(x, "q").device == "cuda"


def _concrete(*arrays) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in arrays)
