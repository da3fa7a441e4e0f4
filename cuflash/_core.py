"""The framework-agnostic core of `cuflash.attention` and `cuflash.attention_backward`:
validation into a frozen `Problem`, the replay of repeated calls, then the CPU or GPU path.

Every check runs before any allocation or launch, and every error names the argument, what was
seen and what was expected. torch autograd is not routed here: `cuflash.api` sends tensors that
need it to `cuflash.torch`, whose autograd node calls this core on detached tensors, so the core
never imports a framework integration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from cuflash import _block_map, _dropout, _dtypes, _interop, _side_arrays, _user_mods
from cuflash._checks import (  # the size limits stay importable from here, where they apply
    MAX_GRID_YZ,  # noqa: F401
    MAX_ROW_REACH,  # noqa: F401
    MAX_SCALE,  # noqa: F401
    aux_view,
    check_alibi,
    check_aux,
    check_flag,
    check_scale,
    check_score_array,
    check_sinks,
    check_sizes,
    refuse_capped_mods_on_cuda,
    refuse_masked,
)
from cuflash._variant import Variant
from cuflash.cuda import _replay
from cuflash.cuda._compile import compute_capability

log = logging.getLogger("cuflash")

LAYOUTS = ("bshd", "bhsd")
MAX_HEAD_DIM = 256
# The CUDA kernels work in log2 units with scale * log2(e) held in float32: a larger scale would
# make that factor inf and every score NaN. The CPU path could go further; one rule serves both.


@dataclass(frozen=True)
class Problem:
    """A validated attention problem, in canonical (batch, seq, heads, dim) terms."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int  # q's and k's (D)
    head_dim_v: int  # v's and out's (Dv)
    dtype: str
    variant: Variant
    scale: float
    layout: str
    batched: bool  # False: the caller passed 3-D arrays (no batch axis)
    source: _interop.Source
    # Run-time data of the score modifications, not part of the identity: ALiBi slopes when
    # variant.alibi, float64 NumPy (B, Hq), and sink logits (Hq,) when variant.sinks, float64
    # NumPy; either as the caller's float32/float64 device array (a CuPy view, the slopes (Hq,)
    # or (B, Hq)) for CUDA inputs with them on q's device (`check_alibi`, `check_sinks`).
    alibi_slopes: object | None = field(default=None, compare=False)
    sinks: object | None = field(default=None, compare=False)
    # The caller's bias and mask as NumPy views (never copied, never written), when given.
    bias: np.ndarray | None = field(default=None, compare=False)
    mask: np.ndarray | None = field(default=None, compare=False)
    # The caller's own modifications (`variant.user` is their compiled kind): the ScoreMod and
    # MaskMod (for their NumPy forms) and the aux arrays as (name, the caller's array, where it
    # lives) triples (`_checks.aux_view` makes their backend views where they are read).
    score_mod: object | None = field(default=None, compare=False)
    mask_mod: object | None = field(default=None, compare=False)
    aux: tuple = field(default=(), compare=False)
    # The caller's `_block_map.BlockMap` for the mask_mod (None: built per call on CUDA).
    block_map: object | None = field(default=None, compare=False)
    # Dropout: the probability of dropping each attention probability and the call's random
    # stream (seed, offset) (`_dropout`; None when dropout_p is 0).
    dropout_p: float = field(default=0.0, compare=False)
    rng: tuple | None = field(default=None, compare=False)

    def caller_shape(self, seqlen: int, heads: int, head_dim: int | None = None
                     ) -> tuple[int, ...]:
        """Shape of a (seqlen, heads, head_dim) tensor in the caller's layout and rank; the
        head dim defaults to q's and k's."""
        inner = (seqlen, heads) if self.layout == "bshd" else (heads, seqlen)
        shape = (*inner, self.head_dim if head_dim is None else head_dim)
        return (self.batch, *shape) if self.batched else shape

    def out_shape(self) -> tuple[int, ...]:
        """Shape of out (and dout): q's, with v's head dim Dv."""
        return self.caller_shape(self.seqlen_q, self.heads_q, self.head_dim_v)

    def lse_shape(self) -> tuple[int, ...]:
        shape = (self.heads_q, self.seqlen_q)
        return (self.batch, *shape) if self.batched else shape

    def flops(self) -> float:
        """Forward FLOPs as the FlashAttention papers count them (x0.5 causal), in general
        2 D (q k^T) + 2 Dv (P v) per visible (query, key) pair: 4 D when Dv == D."""
        pairs = (0.5 * self.seqlen_q * self.seqlen_k if self.variant.causal
                 else self.variant.visible_pairs(self.seqlen_q, self.seqlen_k))
        # (D + Dv) / 2 after the product: exactly today's 4 D count when Dv == D.
        return 4.0 * self.batch * self.heads_q * pairs * (self.head_dim + self.head_dim_v) / 2


def attention(q, k, v, *, causal: bool = False, window: tuple[int, int] | None = None,
              scale: float | None = None, softcap: float = 0.0, alibi_slopes=None, sinks=None,
              bias=None, mask=None, score_mod=None, mask_mod=None, aux=None, block_map=None,
              dropout_p: float = 0.0, rng=None, layout: str = "bshd", return_lse: bool = False,
              out=None):
    """The core of `cuflash.attention` (`cuflash.api`; its docstring has the arguments): a
    repeated call replays, a first one validates and launches (a call with a score_mod or
    mask_mod always: its aux arrays ride in the parameter block). torch tensors that require
    grad are not differentiated here: they arrive detached from `cuflash.torch`."""
    # The arrays beside q, k, v join the signature by their layout, not their values: a replay
    # reads them again (`_replay.SidePointers`).
    side = (alibi_slopes, sinks, bias, mask)
    plain = alibi_slopes is None and sinks is None and bias is None and mask is None
    user = (score_mod is not None or mask_mod is not None or aux is not None
            or block_map is not None)
    mods = _replay.user_key(q, score_mod, mask_mod, aux, block_map) if user else ()
    # dropout draws a new mask each call: never replayed
    key = None if mods is None or not _dropout.is_off(dropout_p, rng) else _replay.forward_key(
        q, k, v, out, (causal, type(causal), _replay.window_key(window), scale, type(scale),
                       softcap, type(softcap), layout, return_lse, type(return_lse), mods),
        () if plain else side)
    replay = _replay.lookup(key)
    if replay is not None:
        return replay(q, k, v, out) if plain else replay(q, k, v, out, side)
    problem = validate(q, k, v, causal=causal, window=window, scale=scale, layout=layout,
                       softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, bias=bias,
                       mask=mask, score_mod=score_mod, mask_mod=mask_mod, aux=aux,
                       block_map=block_map, dropout_p=dropout_p, rng=rng)
    check_flag("return_lse", return_lse)
    if out is not None:
        if problem.source.framework == "jax":
            raise TypeError("out: JAX arrays are immutable; call without out= and use the result")
        _check_out("out", out, problem, problem.out_shape())
        _check_writable("out", out)

    src = problem.source
    with _interop.stream_scope(src):
        if key is not None:
            _refuse_first_call_in_capture(src)
        qb, kb, vb = (_backend(x, src, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
        if out is None:
            out_native, out_b = _interop.empty(problem.out_shape(), qb, src, q)
        else:
            out_native, out_b = out, _interop.to_backend(out, src)
        lse_native = lse_b = None
        if return_lse:
            lse_native, lse_b = _lse_buffer(problem, qb, src, q)
        replayable, call = forward_into(problem, qb, kb, vb, out_b, lse_b)
        if replayable and key is not None and (plain or _reads_in_place(problem, bias, mask)):
            _replay.record(key, _replay.ForwardReplay(
                call, problem.out_shape(), problem.lse_shape() if return_lse else None,
                _replay.framework_of(q), None if plain else _side_pointers(problem, q)))
        result = _interop.from_backend(out_native, out_b, src)
        if return_lse:
            return result, _interop.from_backend(lse_native, lse_b, src)
        return result


def attention_backward(dout, q, k, v, out, lse, *, causal: bool = False,
                       window: tuple[int, int] | None = None, scale: float | None = None,
                       softcap: float = 0.0, alibi_slopes=None, sinks=None, bias=None,
                       mask=None, score_mod=None, mask_mod=None, aux=None, block_map=None,
                       dropout_p: float = 0.0, rng=None, layout: str = "bshd",
                       deterministic: bool = False, return_dsinks: bool = False,
                       return_dbias: bool = False):
    """The core of `cuflash.attention_backward` (`cuflash.api`; its docstring has the
    arguments)."""
    arrays = (dout, q, k, v, out, lse)
    side = (alibi_slopes, sinks, bias, mask)
    plain = alibi_slopes is None and sinks is None and bias is None and mask is None
    user = (score_mod is not None or mask_mod is not None or aux is not None
            or block_map is not None)
    mods = _replay.user_key(q, score_mod, mask_mod, aux, block_map) if user else ()
    # A call that asks for dsinks or dbias computes them beside the launches: never replayed
    # (nor one whose modifications `user_key` refuses).
    key = None if mods is None or return_dsinks is not False or return_dbias is not False \
        or not _dropout.is_off(dropout_p, rng) else _replay.backward_key(
            arrays, (causal, type(causal), _replay.window_key(window), scale, type(scale),
                     softcap, type(softcap), layout, deterministic, type(deterministic), mods),
            () if plain else side)
    replay = _replay.lookup(key)
    if replay is not None:
        return replay(*arrays) if plain else replay(*arrays, side=side)
    problem = validate(q, k, v, causal=causal, window=window, scale=scale, layout=layout,
                       softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, bias=bias,
                       mask=mask, score_mod=score_mod, mask_mod=mask_mod, aux=aux,
                       block_map=block_map, dropout_p=dropout_p, rng=rng)
    if problem.score_mod is not None and problem.score_mod.grad is None:
        raise ValueError("score_mod: the backward needs its derivative; give the ScoreMod a "
                         "grad (C++ of out, b, h, q_idx, kv_idx; \"1\" for an added term)")
    check_flag("deterministic", deterministic)
    for flag, value, given, what in (("return_dsinks", return_dsinks, sinks, "sinks"),
                                     ("return_dbias", return_dbias, bias, "bias")):
        check_flag(flag, value)
        if value and given is None:
            raise ValueError(f"{flag}: True needs {what} (the gradient of which {what}?)")
    out_shape = problem.out_shape()
    for name, x in (("dout", dout), ("out", out)):
        _check_out(name, x, problem, out_shape)
    _check_lse(lse, problem)

    src = problem.source
    with _interop.stream_scope(src):
        if key is not None:
            _refuse_first_call_in_capture(src)
        qb, kb, vb = (_backend(x, src, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
        dob, ob = _backend(dout, src, "dout"), _backend(out, src, "out")
        lseb = _interop.to_backend(lse, src)
        grads = [_interop.empty(x.shape, x, src, like) for x, like in ((qb, q), (kb, k), (vb, v))]
        call, dsinks, dbias = backward_into(
            problem, dob, qb, kb, vb, ob, lseb, *(g[1] for g in grads),
            deterministic=deterministic, dsinks=return_dsinks, dbias=return_dbias)
        if call is not False and key is not None and (
                plain or _reads_in_place(problem, bias, mask)):
            _replay.record(key, _replay.BackwardReplay(
                call, _replay.framework_of(q),
                None if plain else _side_pointers(problem, q, backward=True)))
        result = tuple(_interop.from_backend(native, b, src) for native, b in grads)
        if return_dsinks:
            result += (_in_framework_of(dsinks, sinks, "sinks"),)
        if return_dbias:
            result += (_in_framework_of(dbias, bias, "bias"),)
        return result


def block_map(q, k, *, mask_mod, aux=None, causal: bool = False, window=None,
              layout: str = "bshd"):
    """The core of `cuflash.block_map` (`cuflash.api`; its docstring has the arguments)."""
    problem = validate(q, k, k, causal=causal, window=window, scale=None, layout=layout,
                       mask_mod=mask_mod, aux=aux)
    src = problem.source
    with _interop.stream_scope(src):
        if src.device == "cpu":
            return _block_map.build(problem, [aux_view(x, where) for _, x, where in problem.aux])
        return _side_arrays.mods_on_device(problem).block_map


def _reads_in_place(problem: Problem, bias, mask) -> bool:
    """Whether the kernels read the caller's bias and mask where the caller's own pointers say
    (device views, as a replay passes them), not a copy."""
    if bias is None and mask is None:
        return True
    fw = _replay.framework_of(bias if bias is not None else mask)
    for given, view in ((bias, problem.bias), (mask, problem.mask)):
        if given is not None and (isinstance(view, np.ndarray)
                                  or view.data.ptr != fw.pointer(given)):
            return False
    return True


def _side_pointers(problem: Problem, like, *, backward: bool = False) -> _replay.SidePointers:
    """How a replay of `problem` passes its arrays beside q, k, v: as `forward_into` and
    `backward_into` (`backward`: no sinks, a null dbias) give them to the kernels."""
    variant = problem.variant
    return _replay.SidePointers(
        _replay.framework_of(like), sinks=not backward and (variant.sinks or variant.reads_arrays),
        mods=variant.reads_arrays, sinks_shape=(problem.heads_q,),
        slopes_shape=(problem.batch, problem.heads_q), float64=problem.dtype == "float64",
        backward=backward)


def _refuse_first_call_in_capture(src: _interop.Source) -> None:
    """A first call of a signature plans: it may compile, upload a schedule table and wait for
    it, none of which CUDA graph capture allows. Say so rather than fail inside the driver."""
    if src.device == "cuda" and _interop.is_capturing(_interop.current_stream(src)):
        raise RuntimeError(
            "cuflash: the first call of this signature (shapes, strides, dtypes, options) came "
            "during CUDA graph capture; run it once before capturing (or call cuflash.warmup) so "
            "that the kernel is compiled and the launch planned, then capture")


# ---- validation ------------------------------------------------------------------------------


def validate(q, k, v, *, causal, scale, layout, window=None, softcap=0.0,
             alibi_slopes=None, sinks=None, bias=None, mask=None, score_mod=None, mask_mod=None,
             aux=None, block_map=None, dropout_p=0.0, rng=None) -> Problem:
    """Check q, k, v and the options; raise TypeError/ValueError naming what is wrong (and
    NotImplementedError for an option the inputs' device does not compute yet)."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    check_flag("causal", causal)
    score_mod, mask_mod, aux_items = _user_mods.check_mods(score_mod, mask_mod, aux)
    dropout_p, rng = _dropout.check(dropout_p, rng)
    variant = Variant.of(causal=bool(causal), window=window, softcap=softcap,
                         alibi=alibi_slopes is not None, sinks=sinks is not None,
                         bias=bias is not None, mask_array=mask is not None)
    for name, x in (("q", q), ("k", k), ("v", v)):
        refuse_masked(name, x)
    sources = {name: _interop.source_of(x, name) for name, x in (("q", q), ("k", k), ("v", v))}
    src = sources["q"]
    for name in ("k", "v"):
        if sources[name] != src:
            raise TypeError(
                f"{name}: expected the same framework and device as q ({src.describe()}), "
                f"got {sources[name].describe()}"
            )

    if src.device == "cuda" and dropout_p:
        raise NotImplementedError(
            f"dropout_p: the CUDA kernels do not apply dropout yet (got {dropout_p} for "
            f"{src.describe()} inputs); the CPU path and cuflash.reference do")
    if src.device == "cuda":
        refuse_capped_mods_on_cuda(variant.softcap, variant.alibi, variant.bias,
                                   variant.mask_array, f"{src.describe()} inputs",
                                   user=score_mod is not None or mask_mod is not None)

    dtypes = {name: _interop.dtype_name(x) for name, x in (("q", q), ("k", k), ("v", v))}
    allowed = _dtypes.GPU_DTYPES if src.device == "cuda" else _dtypes.CPU_DTYPES
    if dtypes["q"] not in allowed:
        where = "CUDA" if src.device == "cuda" else "the CPU"
        raise TypeError(f"q: dtype {dtypes['q']} is not supported on {where}; expected one of "
                        f"{', '.join(allowed)}")
    for name in ("k", "v"):
        if dtypes[name] != dtypes["q"]:
            raise TypeError(f"{name}: expected dtype {dtypes['q']} (the dtype of q), "
                            f"got {dtypes[name]}")

    shapes = {name: tuple(int(n) for n in x.shape) for name, x in (("q", q), ("k", k), ("v", v))}
    ndim = len(shapes["q"])
    if ndim not in (3, 4):
        raise ValueError(f"q: expected 3 or 4 dimensions, got shape {shapes['q']}")
    for name in ("k", "v"):
        if len(shapes[name]) != ndim:
            raise ValueError(f"{name}: expected {ndim} dimensions like q {shapes['q']}, "
                             f"got shape {shapes[name]}")
    axes = "(B, S, H, D)" if layout == "bshd" else "(B, H, S, D)"
    if ndim == 3:
        axes = "(" + axes[4:]
    batch, seqlen_q, heads_q, head_dim = _canonical(shapes["q"], layout)
    _, seqlen_k, heads_kv, k_dim = _canonical(shapes["k"], layout)
    if shapes["v"][:-1] != shapes["k"][:-1]:
        raise ValueError(f"v: expected the shape of k {shapes['k']} but for the last axis (v's "
                         f"head dim Dv may differ), got {shapes['v']}")
    head_dim_v = shapes["v"][-1]
    kv_batch = shapes["k"][0] if ndim == 4 else 1
    if kv_batch != batch:
        raise ValueError(f"k: batch {kv_batch} differs from q's batch {batch} "
                         f"(shapes q {shapes['q']}, k {shapes['k']}, layout {layout} {axes})")
    if k_dim != head_dim:
        raise ValueError(f"k: head dim {k_dim} differs from q's head dim {head_dim} "
                         f"(shapes q {shapes['q']}, k {shapes['k']}, layout {layout} {axes})")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim must be in 1..{MAX_HEAD_DIM}, got {head_dim} "
                         f"(shape {shapes['q']}, layout {layout} {axes})")
    if not 1 <= head_dim_v <= MAX_HEAD_DIM:
        raise ValueError(f"v: head dim (Dv) must be in 1..{MAX_HEAD_DIM}, got {head_dim_v} "
                         f"(shape {shapes['v']}, layout {layout} {axes})")
    if heads_q < 1 or heads_kv < 1 or heads_q % heads_kv:
        raise ValueError(
            f"k: query heads ({heads_q}) must be a positive multiple of key/value heads "
            f"({heads_kv}) (shapes q {shapes['q']}, k {shapes['k']}, layout {layout} {axes})"
        )
    check_sizes(batch, seqlen_q, seqlen_k, heads_q, src.device == "cuda",
                 f"shapes q {shapes['q']}, k {shapes['k']}, layout {layout} {axes}")
    slopes = None if alibi_slopes is None else check_alibi(alibi_slopes, src, batch, heads_q)
    sink = None if sinks is None else check_sinks(sinks, src, heads_q)
    full = (batch, heads_q, seqlen_q, seqlen_k)
    bias_view = None if bias is None else check_score_array(
        "bias", bias, src, full, ("float16", "float32", "float64"))
    mask_view = None if mask is None else check_score_array("mask", mask, src, full, ("bool",))
    aux_views = tuple((name, x, check_aux(name, x, src)) for name, x in aux_items)
    if score_mod is not None or mask_mod is not None:
        kind = _user_mods.kind_of(score_mod, mask_mod,
                                  _user_mods.aux_signature(aux_items, _interop.dtype_name),
                                  arrays=variant.alibi or variant.bias or variant.mask_array)
        variant = replace(variant, user=kind)
    problem = Problem(batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_q=heads_q,
                      heads_kv=heads_kv, head_dim=head_dim, head_dim_v=head_dim_v,
                      dtype=dtypes["q"], variant=variant, scale=check_scale(scale, head_dim),
                      layout=layout, batched=ndim == 4, source=src, alibi_slopes=slopes,
                      sinks=sink, bias=bias_view, mask=mask_view, score_mod=score_mod,
                      mask_mod=mask_mod, aux=aux_views, dropout_p=dropout_p, rng=rng)
    if block_map is None:
        return problem
    return replace(problem, block_map=_block_map.check(block_map, problem))


def _canonical(shape: tuple[int, ...], layout: str) -> tuple[int, int, int, int]:
    """(batch, seqlen, heads, head_dim) of a caller's shape."""
    if len(shape) == 3:
        shape = (1, *shape)
    b, x, y, d = shape
    return (b, x, y, d) if layout == "bshd" else (b, y, x, d)


def _in_framework_of(values, like: object, name: str):
    """`values` (float64 NumPy; on the GPU a torch tensor for torch callers, else a CuPy
    array) as an array of `like`'s (argument `name`'s) framework, dtype and device."""
    dtype = _interop.dtype_name(like)
    if isinstance(like, np.ndarray):
        if not isinstance(values, np.ndarray):  # a device result for host sinks
            values = values.cpu().numpy() if hasattr(values, "cpu") else values.get()
        return np.asarray(values, dtype=like.dtype)
    where = _interop.source_of(like, name)
    if where.device == "cuda":
        if where.framework == "torch":
            return values.to(dtype=like.dtype, device=like.device)
        values = values.astype(dtype)  # a new CuPy array: handed over without a copy
        if where.framework == "jax":
            import jax.numpy as jnp

            return jnp.from_dlpack(values)
        return values
    if where.framework == "torch":
        import torch

        return torch.from_numpy(values).to(like.dtype)
    if where.framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(values, dtype=like.dtype)
    return values.astype(dtype)


def _check_writable(name: str, x: object) -> None:
    """`x` is written in place: a read-only NumPy array must fail now, not after the work."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        raise ValueError(f"{name}: expected a writable array, got a read-only one "
                         "(flags.writeable is False); pass a writable array or leave out= out")


def _check_out(name: str, x: object, problem: Problem, shape: tuple[int, ...]) -> None:
    """`x` must be a plain array living where q lives, with the given shape and q's dtype."""
    refuse_masked(name, x)
    src = _interop.source_of(x, name)
    if src != problem.source:
        raise TypeError(f"{name}: expected {problem.source.describe()} like q, "
                        f"got {src.describe()}")
    seen = tuple(int(n) for n in x.shape)
    if seen != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {seen}")
    dtype = _interop.dtype_name(x)
    if dtype != problem.dtype:
        raise TypeError(f"{name}: expected dtype {problem.dtype}, got {dtype}")


def _check_lse(lse: object, problem: Problem) -> None:
    refuse_masked("lse", lse)
    src = _interop.source_of(lse, "lse")
    if src != problem.source:
        raise TypeError(f"lse: expected {problem.source.describe()} like q, got {src.describe()}")
    seen = tuple(int(n) for n in lse.shape)
    if seen != problem.lse_shape():
        raise ValueError(f"lse: expected shape {problem.lse_shape()} (B, Hq, Sq), got {seen}")
    if _interop.dtype_name(lse) != "float32":
        raise TypeError(f"lse: expected dtype float32, got {_interop.dtype_name(lse)}")


# ---- execution on canonical views ------------------------------------------------------------


def _backend(x: object, src: _interop.Source, name: str):
    """Backend view of an input; one copy (from the caller's allocator) when its last axis is
    not unit-stride."""
    b = _interop.to_backend(x, src)
    if b.ndim and b.shape[-1] > 1 and b.strides[-1] != b.dtype.itemsize:
        log.info("%s: last axis has stride %d bytes, not %d: copying to a contiguous array",
                 name, b.strides[-1], b.dtype.itemsize)
        if src.framework == "torch":
            return _interop.to_backend(x.detach().contiguous(), src)
        b = _interop.backend_module(src).ascontiguousarray(b)
    return b


def to_bshd(x, problem: Problem):
    """View a caller-layout array as (B, S, H, D)."""
    if not problem.batched:
        x = x[None]
    return x if problem.layout == "bshd" else x.swapaxes(1, 2)


def _lse_buffer(problem: Problem, qb, src: _interop.Source, q):
    """float32 lse of the caller's rank, in the caller's framework."""
    shape = problem.lse_shape()
    if src.framework == "torch":
        import torch

        native = torch.empty(shape, dtype=torch.float32, device=q.device)
        return native, _interop.to_backend(native, src)
    return None, _interop.backend_module(src).empty(shape, dtype="float32")


def forward_into(problem: Problem, qb, kb, vb, out_b, lse_b):
    """Run the forward on backend arrays of the caller's layout; writes `out_b` (and `lse_b`).

    Returns ``(replayable, call)``: whether a later call of the same signature may replay
    `call`, the one `KernelCall` that wrote the caller's buffers (None when the problem is
    empty). Not replayable: the CPU path, and float64 with lse (it goes through a float64 copy).
    """
    q4, k4, v4, o4 = (to_bshd(x, problem) for x in (qb, kb, vb, out_b))
    lse3 = None if lse_b is None else (lse_b if problem.batched else lse_b[None])
    if problem.source.device == "cpu":
        from cuflash import _cpu

        o, lse = _cpu.forward(q4, k4, v4, variant=problem.variant, scale=problem.scale,
                              alibi_slopes=problem.alibi_slopes, sinks=problem.sinks,
                              bias=problem.bias, mask=problem.mask, user=_user_call(problem),
                              dropout=_dropout_of(problem))
        o4[...] = o
        if lse3 is not None:
            lse3[...] = lse
        return False, None
    if problem.head_dim_v != problem.head_dim:
        return False, _forward_widened(problem, q4, k4, v4, o4, lse3)
    from cuflash.cuda import _launch

    src = problem.source
    device_id = src.device_id
    lse_k = lse3
    if lse3 is not None and problem.dtype == "float64":
        # fp64 kernels keep their statistics in double; the caller gets a float32 copy.
        lse_k = _interop.empty_backend(lse3.shape, "float64", src)
    sinks, mods = _side_arrays.sinks_on_device(problem), _side_arrays.mods_on_device(problem)
    call = _launch.plan_forward(q4, k4, v4, o4, variant=problem.variant, scale=problem.scale,
                                device_id=device_id, cc=compute_capability(device_id),
                                sinks=sinks is not None, mods=mods or _launch.NO_MODS)
    if call is not None:
        call(_launch.forward_pointers(q4, k4, v4, o4, lse_k, sinks, _pointed(problem, mods)),
             _interop.current_stream(src))
    if lse_k is not lse3:
        lse3[...] = lse_k
        return False, call
    return True, call


def _pointed(problem: Problem, mods):
    """`mods` where the launch passes its arrays as pointer fields (the built-in kinds that
    read arrays), else None: a user kind's aux arrays are in the parameter block already."""
    return mods if problem.variant.reads_arrays else None


def _dropout_of(problem: Problem):
    """The CPU path's dropout: ``(p, (seed, offset))``, or None without dropout."""
    return (problem.dropout_p, problem.rng) if problem.dropout_p else None


def _user_call(problem: Problem, *, backward: bool = False):
    """The CPU path's view of the caller's modifications (None without any)."""
    if problem.variant.user is None:
        return None
    aux = {name: aux_view(x, where) for name, x, where in problem.aux}
    return _user_mods.UserCall.of(problem.score_mod, problem.mask_mod, aux, backward=backward)


def backward_into(problem: Problem, dob, qb, kb, vb, ob, lseb, dqb, dkb, dvb, *,
                  deterministic: bool, dsinks: bool = False, dbias: bool = False):
    """Run the backward on backend arrays of the caller's layout; writes dq, dk, dv.

    Returns ``(call, dsinks, dbias)``. `call`: the `_launch_bwd.BackwardCall` a later call of
    the same signature may replay (None when there was nothing to launch), or False where it
    may not: the CPU path, float64, which recomputes its statistics in float64 first, and a
    call that asks for dsinks or dbias. `dsinks` (with ``dsinks=True``, else None): the sinks'
    gradient ``(Hq,)``; `dbias` (with ``dbias=True``, else None): the bias's, in its shape
    (summed over the axes it was broadcast along). Each float64 NumPy on the CPU; on CUDA a
    torch tensor for torch callers, else a CuPy array, in the Accum dtype.
    """
    do4, q4, k4, v4, o4, dq4, dk4, dv4 = (
        to_bshd(x, problem) for x in (dob, qb, kb, vb, ob, dqb, dkb, dvb))
    if problem.source.device == "cpu":
        from cuflash import _cpu

        # The CPU path recomputes the row statistics itself; lse was only validated.
        sinks_grad = np.zeros(problem.heads_q) if dsinks else None
        bias_grad = np.zeros(_side_arrays.bias_shape4(problem)) if dbias else None
        dq, dk, dv = _cpu.backward(do4, q4, k4, v4, o4, variant=problem.variant,
                                   scale=problem.scale, alibi_slopes=problem.alibi_slopes,
                                   sinks=problem.sinks, bias=problem.bias, mask=problem.mask,
                                   dsinks=sinks_grad, dbias=bias_grad,
                                   user=_user_call(problem, backward=True),
                                   dropout=_dropout_of(problem))
        dq4[...], dk4[...], dv4[...] = dq, dk, dv
        return False, sinks_grad, None if bias_grad is None else \
            bias_grad.reshape(problem.bias.shape)
    lse3 = lseb if problem.batched else lseb[None]
    if problem.head_dim_v != problem.head_dim:
        return _backward_widened(problem, do4, q4, k4, v4, o4, lse3, dq4, dk4, dv4,
                                 deterministic=deterministic, dsinks=dsinks, dbias=dbias)
    from cuflash.cuda import _launch, _launch_bwd

    src = problem.source
    device_id = src.device_id
    cc = compute_capability(device_id)
    alloc = _interop.allocator(src)
    stream = _interop.current_stream(src)
    replayable = not (dsinks or dbias)
    mods = _side_arrays.mods_on_device(problem)
    full_dbias = None
    if dbias:  # the kernels write dS per (row, key) they visit, [key][query]; zeros elsewhere
        full_dbias = _interop.empty_backend(
            (problem.batch, problem.heads_q, problem.seqlen_k, problem.seqlen_q),
            "float64" if problem.dtype == "float64" else "float32", src)
        full_dbias.fill(0)
        mods = replace(mods, dbias=full_dbias)
    if problem.dtype == "float64":
        lse3 = _interop.empty_backend(lse3.shape, "float64", src)
        scratch = _interop.empty_backend(o4.shape, "float64", src)
        sinks = _side_arrays.sinks_on_device(problem)
        forward = _launch.plan_forward(q4, k4, v4, scratch, variant=problem.variant,
                                       scale=problem.scale, device_id=device_id, cc=cc,
                                       sinks=sinks is not None, mods=mods or _launch.NO_MODS)
        if forward is not None:
            forward(_launch.forward_pointers(q4, k4, v4, scratch, lse3, sinks,
                                             _pointed(problem, mods)), stream)
        replayable = False
    elif not lse3.flags.c_contiguous:
        contiguous = _interop.empty_backend(lse3.shape, "float32", src)
        contiguous[...] = lse3
        lse3 = contiguous
        replayable = False
    call = _launch_bwd.plan_backward(do4, q4, k4, v4, o4, lse3, dq4, dk4, dv4,
                                     variant=problem.variant, scale=problem.scale,
                                     deterministic=deterministic, device_id=device_id, cc=cc,
                                     mods=mods or _launch.NO_MODS)
    scratch = []  # with dsinks: the call's scratch, whose first part is delta = rowsum(dO * O)

    def keeping(nbytes: int):
        owner, pointer = alloc(nbytes)
        scratch.append((owner, pointer, nbytes))
        return owner, pointer

    if call is not None:
        call(_launch_bwd.backward_pointers(do4, q4, k4, v4, o4, lse3, dq4, dk4, dv4,
                                           _pointed(problem, mods)),
             stream,
             keeping if dsinks else alloc)
    sinks_grad = _side_arrays.sinks_gradient(problem, lse3, scratch) if dsinks else None
    bias_grad = None if full_dbias is None else _side_arrays.bias_gradient(problem, full_dbias)
    return (call if replayable else False), sinks_grad, bias_grad


# ---- a value head dim of its own -------------------------------------------------------------
# The kernels compile one head-dim width for both products, so q, k and v (and out, dout) run
# zero-padded to the wider of D and Dv: zero columns of q and k add nothing to q k^T, zero
# columns of v give zero columns of out, and the gradients of the real columns are unchanged.
# The padded copies come from the caller's allocator; such a call is not replayed.


def widened(problem: Problem) -> Problem:
    """`problem` with q, k, v and out all at the wider head dim, as canonical (B, S, H, W)."""
    width = max(problem.head_dim, problem.head_dim_v)
    return replace(problem, head_dim=width, head_dim_v=width, layout="bshd", batched=True)


def _wider(x4, width: int, src: _interop.Source, *, copy: bool):
    """`x4` ``(B, S, H, d)`` itself when d is `width`, else a new ``(B, S, H, width)`` array:
    with `copy`, `x4` in its first d columns and zeros past them; without, uninitialised (an
    output the kernels write whole)."""
    d = x4.shape[-1]
    if d == width:
        return x4
    wide = _interop.empty_backend((*x4.shape[:-1], width), _dtypes.dtype_name(x4.dtype), src)
    if copy:
        wide[..., d:] = 0
        wide[..., :d] = x4
    return wide


def _forward_widened(problem: Problem, q4, k4, v4, o4, lse3):
    """`forward_into` for ``Dv != D`` through zero-padded copies; returns the launched call."""
    wide, src = widened(problem), problem.source
    width = wide.head_dim
    qp, kp, vp = (_wider(x, width, src, copy=True) for x in (q4, k4, v4))
    op = _wider(o4, width, src, copy=False)
    _, call = forward_into(wide, qp, kp, vp, op, lse3)
    if op is not o4:
        o4[...] = op[..., :problem.head_dim_v]
    return call


def _backward_widened(problem: Problem, do4, q4, k4, v4, o4, lse3, dq4, dk4, dv4, **options):
    """`backward_into` for ``Dv != D`` through zero-padded copies (never replayed)."""
    wide, src = widened(problem), problem.source
    width = wide.head_dim
    dop, qp, kp, vp, op = (_wider(x, width, src, copy=True) for x in (do4, q4, k4, v4, o4))
    dqp, dkp, dvp = (_wider(x, width, src, copy=False) for x in (dq4, dk4, dv4))
    _, dsinks, dbias = backward_into(wide, dop, qp, kp, vp, op, lse3, dqp, dkp, dvp, **options)
    for grad, padded in ((dq4, dqp), (dk4, dkp), (dv4, dvp)):
        if padded is not grad:
            grad[...] = padded[..., :grad.shape[-1]]
    return False, dsinks, dbias
