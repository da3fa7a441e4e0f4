"""PyTorch integration: cuflash attention as ``torch.library`` custom ops with autograd.

Two ops, registered under the ``cuflash`` namespace, work on CPU and CUDA tensors (the core picks
the path; CUDA kernels run on torch's current stream):

- ``torch.ops.cuflash.attention_fwd(q, k, v, causal, scale, layout, window_left=-1,
  window_right=-1, softcap=0.0, alibi_slopes=None, sinks=None, bias=None, mask=None,
  user_mod="", aux=None, dropout_p=0.0, rng=None) -> (out, lse)``
- ``torch.ops.cuflash.attention_bwd(dout, q, k, v, out, lse, causal, scale, layout,
  deterministic, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
  sinks=None, bias=None, mask=None, user_mod="", aux=None, dropout_p=0.0, rng=None,
  want_dbias=False) -> (dq, dk, dv, dsinks, dbias)`` (dsinks empty without sinks, dbias
  without `want_dbias`; `rng`: dropout's (seed, offset) as an int64 tensor of two)

Each runs the framework-agnostic core (``cuflash._core``, what :func:`cuflash.attention` and
:func:`cuflash.attention_backward` run, on detached tensors), has a fake (meta) implementation for
tracing, and the forward's autograd formula calls the backward op, so gradients come from
cuflash's own backward. ``lse`` is not differentiable (as in flash-attn).

Eager autograd does not go through the ops: :func:`attention` applies a plain
``torch.autograd.Function`` that calls the same core, because the dispatcher's custom-op
machinery costs several times the whole host path of a small call. The ops are what
torch.compile traces.

torch.compile (``fullgraph=True``, static and dynamic shapes):

- :func:`attention` here compiles to the op without graph breaks, with or without grad. The
  forward and the backward (traced by AOTAutograd) are single opaque graph nodes, and both can
  be captured in CUDA graphs (``mode="reduce-overhead"``).
- :func:`cuflash.attention` compiles too: under tracing it validates (plain Python on shapes and
  dtypes, folded to constants and guards) and routes to the same op, with or without grad.
  ``out=`` is not supported under torch.compile.

Context parallelism: :func:`ring_attention` computes attention over a sequence sharded along S
across the ranks of a ``torch.distributed`` group (NCCL for CUDA tensors, gloo for CPU ones),
with :func:`zigzag_split` / :func:`zigzag_merge` for the causal load-balanced order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist

from cuflash import _checks, _core, _dropout, _user_mods, _variant

__all__ = ["attention", "attention_bwd", "attention_fwd", "ring_attention", "zigzag_merge",
           "zigzag_split"]

Tensor = torch.Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
              window: tuple[int, int] | None = None, scale: float | None = None,
              softcap: float = 0.0, alibi_slopes: Tensor | None = None,
              sinks: Tensor | None = None, bias: Tensor | None = None,
              mask: Tensor | None = None, score_mod=None, mask_mod=None, aux=None,
              block_map=None, dropout_p: float = 0.0, rng: tuple[int, int] | None = None,
              layout: str = "bshd", return_lse: bool = False):
    """Exact attention on torch tensors, differentiable with respect to q, k and v.

    Args:
        q: queries, ``(B, Sq, Hq, D)`` for layout ``"bshd"`` or ``(B, Hq, Sq, D)`` for ``"bhsd"``;
            a 3-D tensor (no batch axis) is accepted in either layout. CPU or CUDA, any strides.
        k: keys, ``(B, Sk, Hkv, D)`` (``"bhsd"``: ``(B, Hkv, Sk, D)``), same device and dtype as
            q, ``Hq % Hkv == 0``.
        v: values, shaped like `k` but for its head dim ``Dv``, which may differ from ``D`` on
            the CPU, as for :func:`cuflash.attention`.
        causal: bottom-right aligned causal mask (query i sees key j iff ``j <= i + Sk - Sq``).
        window: sliding window ``(left, right)``, -1 unbounded, as for :func:`cuflash.attention`.
        scale: softmax scale, a number > 0; defaults to ``1 / sqrt(D)``.
        softcap: ``> 0``: scores become ``softcap * tanh(s / softcap)`` after scaling, as for
            :func:`cuflash.attention`.
        alibi_slopes: ALiBi slopes ``(Hq,)`` or ``(B, Hq)``, float32 or float64, as for
            :func:`cuflash.attention` (no gradient).
        sinks: attention sinks ``(Hq,)``, float32 or float64, as for :func:`cuflash.attention`;
            a tensor that requires grad gets its gradient.
        bias: an additive tensor broadcastable to ``(B, Hq, Sq, Sk)``, as for
            :func:`cuflash.attention`; one that requires grad gets its gradient, summed over
            the axes it was broadcast along (on CUDA through a float32 ``(B, Hq, Sk, Sq)``
            scratch that the backward kernels write).
        mask: a bool tensor broadcastable like `bias`, True = attend.
        score_mod, mask_mod, aux: your own modifications in C++, as for
            :func:`cuflash.attention` (a score_mod needs its ``grad``). Under torch.compile they
            reach the ops by a key of a process-wide registry (`_user_mods.register`) and the
            aux tensors as a list. The aux tensors get no gradient.
        block_map: a mask_mod's `cuflash.BlockMap`, as for :func:`cuflash.attention`; eagerly
            without one a CUDA call builds one that its backward reuses. Not under
            torch.compile, where each op builds its own.
        dropout_p, rng: attention dropout, as for :func:`cuflash.attention`; without `rng`
            the stream is drawn from torch's default CPU generator (``torch.manual_seed``
            rules it), once per call (under torch.compile by a ``torch.randint`` in the graph,
            so each run draws anew), and the backward draws the same mask again.
        layout: ``"bshd"`` or ``"bhsd"``.
        return_lse: also return the float32 log-sum-exp ``(B, Hq, Sq)`` (``(Hq, Sq)`` for 3-D);
            it carries no gradient.

    Returns:
        ``out`` shaped like q but with v's head dim ``Dv`` (q's device and dtype), or
        ``(out, lse)``.

    This is what :func:`cuflash.attention` runs for tensors that require grad. Unlike it, this
    function is always the ``cuflash::attention_fwd`` op, so it is the one to call from code
    compiled with ``torch.compile`` that may run without grad (see the module docstring).
    Backward uses ``deterministic=True`` when ``torch.are_deterministic_algorithms_enabled()``.

    See also: `cuflash.attention`, `cuflash.attention_backward`.
    """
    _checks.check_flag("causal", causal)
    _checks.check_flag("return_lse", return_lse)
    left, right = _variant.check_window(window)
    cap = _variant.check_softcap(softcap)
    user = {"score_mod": score_mod, "mask_mod": mask_mod, "aux": aux, "block_map": block_map}
    p, rng = _dropout.check(dropout_p, rng, needs_rng=False)
    if p and rng is None and not torch.compiler.is_compiling():
        rng = _drawn_rng()
    if p:
        user |= {"dropout_p": p, "rng": rng}
    if torch.compiler.is_compiling():
        if block_map is not None:
            raise NotImplementedError("block_map: not under torch.compile (the op builds the "
                                      "mask_mod's map per call); pass None there")
        key, tensors = _user_mods.register(score_mod, mask_mod, aux)
        # the stream as an int64 tensor the op reads: drawn in the graph (a new one each run)
        # or the caller's
        stream = None
        if p:
            stream = (_random_stream() if rng is None
                      else torch.tensor([_signed(x) for x in rng], dtype=torch.int64))
        out, lse = attention_fwd(q, k, v, causal, scale, layout, left, right, cap, alibi_slopes,
                                 sinks, bias, mask, key, tensors, p, stream)
    else:
        out, lse = _Attention.apply(q, k, v, causal, scale, layout, (left, right), cap,
                                    alibi_slopes, sinks, bias, mask, user)
    return (out, lse) if return_lse else out


def _random_stream() -> Tensor:
    """A dropout stream ``(seed, offset)`` from torch's default CPU generator, as an int64
    tensor of two."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64)


def _drawn_rng() -> tuple[int, int]:
    """`_random_stream` as Python ints."""
    seed, offset = _random_stream().tolist()
    return seed, offset


def _signed(x: int) -> int:
    """A uint64 as the int64 with its bits (the ops' schemas have no unsigned ints)."""
    return x - 2**64 if x >= 2**63 else x


def _stream(rng: Tensor | None) -> tuple[int, int] | None:
    """The ``(seed, offset)`` an op's int64 `rng` tensor holds (as `_signed` wrote it)."""
    return None if rng is None else tuple(int(x) & (2**64 - 1) for x in rng.tolist())


class _Attention(torch.autograd.Function):
    """The eager autograd node: what the custom op's autograd does, without the dispatcher's
    per-call cost (several hundred microseconds for a forward and backward). torch.compile
    traces the op instead."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, layout, window, softcap, alibi_slopes, sinks, bias,
                mask, user=None):
        # Grad mode is off in here, so the replay signature takes these tensors as they are.
        mods = {"softcap": softcap, "alibi_slopes": alibi_slopes, "sinks": sinks, "bias": bias,
                "mask": mask, **(user or {})}
        if mods.get("mask_mod") is not None and mods["block_map"] is None and q.is_cuda:
            # one map for the forward and the backward (per_call: neither is replayed, as the
            # aux arrays' values may differ next time)
            built = _core.block_map(q, k, mask_mod=mods["mask_mod"], aux=mods["aux"],
                                    causal=causal, window=window, layout=layout)
            mods["block_map"] = dataclasses.replace(built, per_call=True)
        out, lse = _core.attention(q, k, v, causal=causal, window=window, scale=scale,
                                 layout=layout, return_lse=True, **mods)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        ctx.options = (causal, window, scale, layout, mods)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, window, scale, layout, mods = ctx.options
        if dout.stride(-1) != 1:
            dout = dout.contiguous()  # an expanded gradient (of a sum): one copy, then replayable
        want_dsinks, want_dbias = (bool(ctx.needs_input_grad[i]) for i in (9, 10))
        grads = list(_core.attention_backward(
            dout, q, k, v, out, lse, causal=causal, window=window, scale=scale, layout=layout,
            deterministic=torch.are_deterministic_algorithms_enabled(),
            return_dsinks=want_dsinks, return_dbias=want_dbias, **mods))
        dbias = grads.pop() if want_dbias else None
        dsinks = grads.pop() if want_dsinks else None
        return (*grads, None, None, None, None, None, None, dsinks, dbias, None, None)


# The schemas are written out: inference has no optional list of tensors (`aux`).
_FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, bool causal, float? scale, str layout, int window_left=-1, "
    "int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, Tensor? sinks=None, "
    "Tensor? bias=None, Tensor? mask=None, str user_mod=\"\", Tensor[]? aux=None, "
    "float dropout_p=0.0, Tensor? rng=None) -> (Tensor, Tensor)")
_BWD_SCHEMA = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
    "float? scale, str layout, bool deterministic, int window_left=-1, int window_right=-1, "
    "float softcap=0.0, Tensor? alibi_slopes=None, Tensor? sinks=None, Tensor? bias=None, "
    "Tensor? mask=None, str user_mod=\"\", Tensor[]? aux=None, float dropout_p=0.0, "
    "Tensor? rng=None, bool want_dbias=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("cuflash::attention_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None,
                  layout: str, window_left: int = -1, window_right: int = -1,
                  softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                  sinks: Tensor | None = None, bias: Tensor | None = None,
                  mask: Tensor | None = None, user_mod: str = "",
                  aux: Sequence[Tensor] | None = None, dropout_p: float = 0.0,
                  rng: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The forward op: ``(out, lse)`` as :func:`cuflash.attention` with ``return_lse=True``
    (`user_mod`: the registry key of a score_mod / mask_mod, `aux` their arrays in the order
    it names them; "" for none; `rng`: dropout's (seed, offset) as an int64 tensor of two)."""
    # Detached: the core exports the tensors through DLPack, which refuses ones needing grad.
    return _core.attention(q.detach(), k.detach(), v.detach(), causal=causal,
                         window=(window_left, window_right), scale=scale, softcap=softcap,
                         alibi_slopes=alibi_slopes, sinks=_detached(sinks),
                         bias=_detached(bias), mask=mask, layout=layout, return_lse=True,
                         dropout_p=dropout_p, rng=_stream(rng),
                         **_user_mods.registered(user_mod, aux))


def _detached(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach()


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, causal, scale, layout, window_left=-1, window_right=-1,
                        softcap=0.0, alibi_slopes=None, sinks=None, bias=None, mask=None,
                        user_mod="", aux=None, dropout_p=0.0, rng=None):
    # The core allocates both results contiguous: out like q with v's head dim, lse (B, Hq, Sq)
    # float32.
    if layout == "bhsd":
        lse_shape = q.shape[:-1]
    else:
        lse_shape = (*q.shape[:-3], q.shape[-2], q.shape[-3])
    return (q.new_empty((*q.shape[:-1], v.shape[-1])),
            q.new_empty(lse_shape, dtype=torch.float32))


@torch.library.custom_op("cuflash::attention_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  causal: bool, scale: float | None, layout: str, deterministic: bool,
                  window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                  alibi_slopes: Tensor | None = None, sinks: Tensor | None = None,
                  bias: Tensor | None = None, mask: Tensor | None = None,
                  user_mod: str = "", aux: Sequence[Tensor] | None = None,
                  dropout_p: float = 0.0, rng: Tensor | None = None,
                  want_dbias: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward op: ``(dq, dk, dv, dsinks, dbias)`` as :func:`cuflash.attention_backward`
    (``dsinks`` empty without sinks; ``dbias`` empty unless `want_dbias` with a bias: on CUDA
    it costs a float32 ``(B, Hq, Sk, Sq)`` scratch)."""
    tensors = (x.detach() for x in (dout, q, k, v, out, lse))
    want_dbias = want_dbias and bias is not None
    grads = list(_core.attention_backward(
        *tensors, causal=causal, window=(window_left, window_right), scale=scale,
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=_detached(sinks), bias=_detached(bias),
        mask=mask, layout=layout, deterministic=deterministic, return_dsinks=sinks is not None,
        return_dbias=want_dbias, dropout_p=dropout_p, rng=_stream(rng),
        **_user_mods.registered(user_mod, aux)))

    def empty():  # one each: results may not alias one another
        return q.new_empty((0,), dtype=torch.float32)

    dbias = grads.pop() if want_dbias else empty()
    dsinks = grads.pop() if sinks is not None else empty()
    return (*grads, dsinks, dbias)


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, causal, scale, layout, deterministic,
                        window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
                        sinks=None, bias=None, mask=None, user_mod="", aux=None,
                        dropout_p=0.0, rng=None, want_dbias=False):
    def like(x):
        return q.new_empty((0,), dtype=torch.float32) if x is None else x.new_empty(x.shape)

    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), like(sinks),
            like(bias if want_dbias else None))


# attention_fwd's trailing arguments' defaults, for a call that left some out
_TRAILING_DEFAULTS = (-1, -1, 0.0, None, None, None, None, "", None, 0.0, None)


def _setup_context(ctx, inputs, output) -> None:
    # trailing: window_left, window_right, softcap, alibi_slopes, sinks, bias, mask, user_mod,
    # aux, dropout_p, rng
    q, k, v, causal, scale, layout, *trailing = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.options = (causal, scale, layout, *trailing)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    causal, scale, layout, *trailing = ctx.options
    want_dbias = len(ctx.needs_input_grad) > 11 and bool(ctx.needs_input_grad[11])  # the bias
    dq, dk, dv, dsinks, dbias = attention_bwd(dout, q, k, v, out, lse, causal, scale, layout,
                                              torch.are_deterministic_algorithms_enabled(),
                                              *trailing, *_TRAILING_DEFAULTS[len(trailing):],
                                              want_dbias=want_dbias)
    # A gradient for the sinks and the bias where given (trailing 4 and 5), none for options.
    grads = [None] * len(ctx.options)
    for at, grad in ((3 + 4, dsinks), (3 + 5, dbias)):
        if at < len(ctx.options) and ctx.options[at] is not None:
            grads[at] = grad
    aux_at = 3 + 8  # the aux tensors: a list, whose gradient is a list (of none)
    if aux_at < len(ctx.options) and ctx.options[aux_at] is not None:
        grads[aux_at] = [None] * len(ctx.options[aux_at])
    # One gradient per argument the caller passed: with a tensor list in the schema, torch
    # holds the result to the call's own structure (arguments left at their defaults are not
    # in it), while `inputs` above had every default filled in.
    return (dq, dk, dv, *grads)[:len(ctx.needs_input_grad)]


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- ring attention: a sequence sharded across the ranks of a torch.distributed group -----------
#
# Each rank keeps its queries and passes its keys and values around the ring (point-to-point
# sends to the next rank, receives from the previous one, the next block in flight while this one
# is computed). Every (query chunk, key chunk) pair is one cuflash call with ``return_lse``; the
# partial results merge exactly by their log-sum-exp. With ``causal`` the sequence is split in the
# zigzag order (`zigzag_split`): rank r holds chunks r and 2W - 1 - r of 2W equal chunks, so that
# every rank sees as many (query, key) pairs as every other; a pair is then either wholly visible,
# the causal diagonal, or skipped.
#
# The backward sends the keys and values around again (the next block in flight while this one's
# gradients are computed), with their dK and dV following them and accumulating (in float32,
# float64 for float64 inputs); after a full turn each block's gradients are back at its owner. A
# pair's gradients come from cuflash's backward of that pair alone, given ``w * dout`` with
# ``w = exp(lse_pair - lse)`` per query row and the merged ``out``: then its ``P (dP - delta)``
# is the merged softmax's, so no kernel needs the merged statistics.
#
# The merge reads cuflash's lse, which is float32 for every input dtype: float64 results agree
# with one-process attention to about 1e-7 relative, not to float64's precision.


def zigzag_split(x: torch.Tensor, world: int, *, dim: int = 1) -> list[torch.Tensor]:
    """`x` cut along `dim` into `world` shards in the zigzag order: 2 * world equal chunks, shard
    r = chunks r and 2 * world - 1 - r (views concatenated, so new tensors). The sequence length
    must be a multiple of 2 * world."""
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"world: expected an int >= 1, got {world!r}")
    length = x.shape[dim]
    if length % (2 * world):
        raise ValueError(f"x: the sequence axis (dim {dim}) has {length} positions, not a "
                         f"multiple of 2 * world = {2 * world}")
    chunks = x.chunk(2 * world, dim=dim)
    return [torch.cat((chunks[r], chunks[2 * world - 1 - r]), dim=dim) for r in range(world)]


def zigzag_merge(shards: list[torch.Tensor], *, dim: int = 1) -> torch.Tensor:
    """The inverse of `zigzag_split`: the whole sequence from its `world` shards, in order."""
    world = len(shards)
    if world < 1:
        raise ValueError("shards: expected at least one shard")
    halves = [s.chunk(2, dim=dim) for s in shards]
    ordered = [halves[r][0] for r in range(world)] + [halves[r][1] for r in reversed(range(world))]
    return torch.cat(ordered, dim=dim)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None,
                   causal: bool = False, window=None, scale: float | None = None,
                   softcap: float = 0.0, layout: str = "bshd") -> torch.Tensor:
    """Attention of this rank's queries over the keys of every rank of `group`.

    Args:
        q, k, v: this rank's shard of the sequence, 4-D in `layout` (``"bshd"`` or ``"bhsd"``),
            every rank the same shape; GQA as for `cuflash.attention`. With `causal` the shards
            must be in the zigzag order (`zigzag_split`) and their length even; without it any
            split works (contiguous shards, in rank order or not).
        group: the ``torch.distributed`` process group (None: the default one).
        causal: causal attention over the whole sequence (positions in the zigzag order).
        window: not supported yet (raises NotImplementedError unless None).
        scale: softmax scale; defaults to ``1 / sqrt(D)``.
        softcap: ``> 0``: logit soft-capping, as for :func:`cuflash.attention` (each pair's
            scores are capped before the merge, so the result is the capped attention).
        layout: axis order of q, k, v and the output.

    Returns:
        This rank's output, shaped like `q`; differentiable (autograd sends dK and dV around the
        ring back to their owners).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    _checks.check_ring_shards(q, k, v, causal=causal, window=window, layout=layout,
                              holder="rank")
    cap = _variant.check_softcap(softcap)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _Ring.apply(q, k, v, group, bool(causal), float(scale), cap, layout)


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, softcap, layout):
        ring = _Geometry(q, group, causal, layout)
        q, k, v = (x.detach().contiguous() for x in (q, k, v))
        outs, lses = [None] * ring.chunks, [None] * ring.chunks
        pair_lses = []
        blocks = (k, v)
        for step in range(ring.world):
            owner = (ring.rank - step) % ring.world
            pending = ring.pass_on(blocks) if step + 1 < ring.world else None
            kc, vc = (ring.split(x) for x in blocks)
            for i, j in ring.pairs(owner):
                out, lse = _core.attention(ring.split(q)[i], kc[j], vc[j], causal=ring.diagonal(
                    owner, i, j), scale=scale, softcap=softcap, layout=layout, return_lse=True)
                pair_lses.append(lse)
                outs[i], lses[i] = ring.merge(outs[i], lses[i], out, lse)
            if pending is not None:
                blocks = ring.received(pending)
        out = ring.join([o.to(q.dtype) for o in outs])
        lse = torch.cat(lses, dim=-1)
        ctx.ring, ctx.scale, ctx.softcap, ctx.pair_lses = ring, scale, softcap, pair_lses
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        ring, scale = ctx.ring, ctx.scale
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        qs, outs, douts = ring.split(q), ring.split(out), ring.split(dout)
        row_lses = lse.chunk(ring.chunks, dim=-1)
        acc = ring.accum_dtype
        dq = [torch.zeros_like(x, dtype=acc) for x in qs]
        kb, vb = k, v
        dkb, dvb = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
        pair_lses = iter(ctx.pair_lses)
        for step in range(ring.world):
            owner = (ring.rank - step) % ring.world
            # K and V do not change: the next ones travel while this block's gradients are
            # computed; its dK and dV follow once they hold this rank's share.
            next_kv = ring.pass_on((kb, vb)) if step + 1 < ring.world else None
            kc, vc = ring.split(kb), ring.split(vb)
            dkc, dvc = ring.split(dkb), ring.split(dvb)  # views: add_ writes the travelling block
            for i, j in ring.pairs(owner):
                pair_lse = next(pair_lses)
                weight = ring.row_weight(torch.exp(pair_lse.double() - row_lses[i].double()))
                grads = _core.attention_backward(
                    (douts[i].to(acc) * weight).to(q.dtype), qs[i], kc[j], vc[j], outs[i],
                    pair_lse, causal=ring.diagonal(owner, i, j), scale=scale,
                    softcap=ctx.softcap, layout=ring.layout)
                dq[i] += grads[0].to(acc)
                dkc[j].add_(grads[1].to(acc))
                dvc[j].add_(grads[2].to(acc))
            if ring.world > 1:
                dkb, dvb = ring.received(ring.pass_on((dkb, dvb)))
            if next_kv is not None:
                kb, vb = ring.received(next_kv)
        # after a full turn dK, dV are this rank's own block's, with every rank's share
        dk, dv = dkb, dvb
        return (ring.join([x.to(q.dtype) for x in dq]), dk.to(k.dtype), dv.to(v.dtype),
                None, None, None, None, None)


class _Geometry:
    """Where this rank is in the ring and how its shard splits into chunks."""

    def __init__(self, q: torch.Tensor, group, causal: bool, layout: str):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.causal, self.layout = causal, layout
        self.seq = 1 if layout == "bshd" else 2
        self.chunks = 2 if causal else 1
        self.accum_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    def chunk_ids(self, rank: int) -> tuple[int, ...]:
        """Global chunk indices rank `rank` holds (in the causal zigzag order)."""
        return (rank, 2 * self.world - 1 - rank) if self.causal else (rank,)

    def pairs(self, owner: int):
        """(query chunk, key chunk) positions of this rank's queries and `owner`'s keys that
        some query sees."""
        mine, theirs = self.chunk_ids(self.rank), self.chunk_ids(owner)
        for i, qi in enumerate(mine):
            for j, kj in enumerate(theirs):
                if not self.causal or kj <= qi:
                    yield i, j

    def diagonal(self, owner: int, i: int, j: int) -> bool:
        return self.causal and self.chunk_ids(self.rank)[i] == self.chunk_ids(owner)[j]

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.chunk(self.chunks, dim=self.seq)

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=self.seq)

    def row_weight(self, w: torch.Tensor) -> torch.Tensor:
        """A (B, H, S) row factor shaped to multiply a (layout) tensor."""
        return (w.transpose(1, 2) if self.layout == "bshd" else w).unsqueeze(-1)

    def merge(self, out, lse, new_out, new_lse):
        """Two partial results of the same rows merged exactly (in the accumulation dtype)."""
        new_out = new_out.to(self.accum_dtype)
        new_lse = new_lse.to(self.accum_dtype)
        if out is None:
            return new_out, new_lse
        merged = torch.logaddexp(lse, new_lse)
        # rows that saw no key yet keep -inf: their weights are 0, not NaN
        finite = torch.isfinite(merged)
        w_old = torch.where(finite, torch.exp(lse - merged), torch.zeros_like(lse))
        w_new = torch.where(finite, torch.exp(new_lse - merged), torch.zeros_like(lse))
        return out * self.row_weight(w_old) + new_out * self.row_weight(w_new), merged

    def pass_on(self, tensors):
        """Send `tensors` to the next rank and receive as many from the previous one, both
        asynchronous: returns (requests, receive buffers)."""
        to, frm = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        if self.group is not None:  # ranks of the group -> ranks of the default group
            to, frm = dist.get_global_rank(self.group, to), dist.get_global_rank(self.group, frm)
        buffers = [torch.empty_like(t) for t in tensors]
        requests = [dist.isend(t, to, group=self.group) for t in tensors]
        requests += [dist.irecv(b, frm, group=self.group) for b in buffers]
        return requests, buffers

    @staticmethod
    def received(pending):
        requests, buffers = pending
        for r in requests:
            r.wait()
        return tuple(buffers)
