"""Ring attention inside ``jax.shard_map``: the sequence sharded along a mesh axis, keys and values
passed around the ring with ``jax.lax.ppermute``.

Each device keeps its queries; at each of the W steps of a ring of W devices it attends to the
key block it holds (one cuflash call with its log-sum-exp) while the next block travels, and the
partial results merge exactly by their log-sum-exp. With ``causal`` the sequence is in the zigzag
order (`zigzag_order`): device r holds chunks r and 2W - 1 - r of 2W equal chunks, so every
device does the same work, and each step is one call of one shape:

- step 0, its own block: causal attention of the shard over itself (the zigzag chunks keep
  their order, so the local causal mask is the global one);
- a block from an earlier device (owner < r): all queries over the block's first chunk;
- a block from a later device: the shard's second chunk over the whole block.

The backward sends the keys and values around again with their dK and dV following them and
accumulating (float32; float64 for float64 inputs), back at their owner after a full turn. A
pair's gradients are cuflash's backward of that pair alone, given ``exp(lse_pair - lse) * dout``
and the merged output, which makes its ``P (dP - delta)`` the merged softmax's.

The pair calls are `cuflash.jax`'s own traced forward and backward, so every platform it
runs on runs this (the CPU path with host devices, CUDA GPUs).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cuflash import _checks, _dtypes, _jax_gpu, _jax_trace, _variant
from cuflash._jax_trace import Options


def zigzag_order(x: jax.Array, world: int, *, axis: int = 1) -> jax.Array:
    """`x` with its sequence axis reordered so that cutting it into `world` equal contiguous
    shards (as ``shard_map`` does) gives the zigzag shards: of 2 * world equal chunks, shard r
    holds chunks r and 2 * world - 1 - r. The length along `axis` must be a multiple of
    2 * world."""
    chunks = _chunks(x, world, axis)
    order = [c for r in range(world) for c in (r, 2 * world - 1 - r)]
    return jnp.concatenate([chunks[c] for c in order], axis=axis)


def zigzag_unorder(x: jax.Array, world: int, *, axis: int = 1) -> jax.Array:
    """The inverse of `zigzag_order`: the sequence in its natural order again."""
    chunks = _chunks(x, world, axis)
    # chunk c of the natural order sits at position 2r (c = r) or 2r + 1 (c = 2W - 1 - r)
    where = [2 * c if c < world else 2 * (2 * world - 1 - c) + 1 for c in range(2 * world)]
    return jnp.concatenate([chunks[p] for p in where], axis=axis)


def _chunks(x, world: int, axis: int) -> list:
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"world: expected an int >= 1, got {world!r}")
    x = jnp.asarray(x)
    if not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis: expected an int in [{-x.ndim}, {x.ndim}), got {axis!r}")
    length = x.shape[axis]
    if length % (2 * world):
        raise ValueError(f"x: the sequence axis ({axis}) has {length} positions, not a multiple "
                         f"of 2 * world = {2 * world}")
    return jnp.split(x, 2 * world, axis=axis)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name, causal: bool = False,
                   window=None, scale: float | None = None, softcap: float = 0.0,
                   layout: str = "bshd") -> jax.Array:
    """Attention of this device's queries over the keys of every device along mesh axis
    `axis_name`, for use inside ``jax.shard_map`` (a sequence sharded along that axis).

    Args:
        q, k, v: this device's shard of the sequence, 4-D in `layout`, every device the same
            shape; GQA as for `cuflash.jax.attention`. With `causal` the sequence must be in the
            zigzag order (`zigzag_order` before sharding) and the shard's length even; without
            it any order works.
        axis_name: the mesh axis the sequence is sharded along (a name bound by ``shard_map``).
        causal: causal attention over the whole sequence.
        window: not supported yet (NotImplementedError unless None).
        scale: softmax scale; defaults to ``1 / sqrt(D)``.
        softcap: ``> 0``: logit soft-capping, as for `cuflash.jax.attention`.
        layout: ``"bshd"`` or ``"bhsd"``.

    Returns:
        this device's output, shaped like `q`; differentiable with respect to q, k and v (a
        ``jax.custom_vjp`` whose backward sends dK and dV around the ring to their owners).
    """
    cap = _variant.check_softcap(softcap)
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    _checks.check_ring_shards(q, k, v, causal=causal, window=window, layout=layout,
                              holder="device")
    try:
        world = jax.lax.axis_size(axis_name)
    except NameError as e:
        raise ValueError(f"axis_name: {axis_name!r} is not a mesh axis bound here; call "
                         f"ring_attention inside jax.shard_map over a mesh with that axis") from e
    ring = _Ring(axis_name, int(world), bool(causal), scale, layout, cap)
    axes = _jax_trace.varying_axes(q, k, v) | {axis_name}
    q, k, v = (_jax_trace.vary(x, frozenset(axes)) for x in (q, k, v))
    return _ring(q, k, v, ring)


@dataclasses.dataclass(frozen=True)
class _Ring:
    """The static description of a ring call (a custom_vjp's non-differentiable argument)."""

    axis_name: object
    world: int
    causal: bool
    scale: float | None
    layout: str
    softcap: float = 0.0

    @property
    def seq(self) -> int:
        return 1 if self.layout == "bshd" else 2

    def options(self, causal: bool) -> Options:
        return Options(causal, (-1, -1), self.scale, self.layout, self.softcap)

    def halves(self, x):
        """The two zigzag chunks of a shard (its lse's halves along the last axis)."""
        return jnp.split(x, 2, axis=self.seq)

    def pass_on(self, arrays):
        """`arrays` sent to the next device on the ring, received from the previous one."""
        perm = [(i, (i + 1) % self.world) for i in range(self.world)]
        return tuple(jax.lax.ppermute(x, self.axis_name, perm) for x in arrays)

    def row_weight(self, w):
        """A (B, H, S) row factor shaped to multiply a (layout) array."""
        return (jnp.swapaxes(w, 1, 2) if self.layout == "bshd" else w)[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ring(q, k, v, ring: _Ring):
    return _forward(q, k, v, ring)[0]


def _ring_fwd(q, k, v, ring: _Ring):
    out, lse, pair_lses = _forward(q, k, v, ring)
    return out, (q, k, v, out, lse, pair_lses)


def _ring_bwd(ring: _Ring, residuals, dout):
    return _backward(dout, *residuals, ring)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _accum(dtype) -> np.dtype:
    return _jax_gpu.accum_dtype(_dtypes.dtype_name(dtype))


def _pair_forward(q, kb, vb, step: int, owner_is_earlier, ring: _Ring):
    """``(out, lse)`` of this device's queries over the key block of step `step`; rows that
    see none of it get lse = -inf (and any output)."""
    forward = _jax_trace.forward
    if not ring.causal:
        return forward(q, kb, vb, ring.options(False))
    if step == 0:
        return forward(q, kb, vb, ring.options(True))

    def earlier(q, kb, vb):  # every query sees the block's first chunk, none its second
        return forward(q, ring.halves(kb)[0], ring.halves(vb)[0], ring.options(False))

    def later(q, kb, vb):  # only the second query chunk sees the block, all of it
        out, lse = forward(ring.halves(q)[1], kb, vb, ring.options(False))
        return (jnp.concatenate((jnp.zeros_like(out), out), axis=ring.seq),
                jnp.concatenate((jnp.full_like(lse, -jnp.inf), lse), axis=-1))

    return jax.lax.cond(owner_is_earlier, earlier, later, q, kb, vb)


def _merge(out, lse, new_out, new_lse, ring: _Ring):
    """Two partial results for the same rows merged exactly (in the accumulation dtype)."""
    new_out = new_out.astype(out.dtype)
    merged = jnp.logaddexp(lse, new_lse)
    finite = jnp.isfinite(merged)  # rows that saw no key yet keep -inf and weight 0, not NaN
    w_old = jnp.where(finite, jnp.exp(lse - jnp.where(finite, merged, 0)), 0)
    w_new = jnp.where(finite, jnp.exp(new_lse - jnp.where(finite, merged, 0)), 0)
    return out * ring.row_weight(w_old) + new_out * ring.row_weight(w_new), merged


def _owner_is_earlier(step: int, ring: _Ring):
    rank = jax.lax.axis_index(ring.axis_name)
    owner = (rank - step) % ring.world
    return owner < rank


def _forward(q, k, v, ring: _Ring):
    accum = _accum(q.dtype)
    out = lse = None
    pair_lses = []
    kb, vb = k, v
    for step in range(ring.world):
        incoming = ring.pass_on((kb, vb)) if step + 1 < ring.world else None
        pair_out, pair_lse = _pair_forward(q, kb, vb, step, _owner_is_earlier(step, ring), ring)
        pair_lse = pair_lse.astype(accum)
        pair_lses.append(pair_lse)
        if out is None:
            out, lse = pair_out.astype(accum), pair_lse
        else:
            out, lse = _merge(out, lse, pair_out, pair_lse, ring)
        if incoming is not None:
            kb, vb = incoming
    return out.astype(q.dtype), lse, tuple(pair_lses)


def _pair_backward(dout_w, q, kb, vb, out, pair_lse, step: int, owner_is_earlier, ring: _Ring):
    """``(dq, dk, dv)`` of one pair, shaped like q and the block (zeros where it has none)."""
    backward = _jax_trace.backward
    if not ring.causal:
        return backward(dout_w, q, kb, vb, out, pair_lse, ring.options(False))
    if step == 0:
        return backward(dout_w, q, kb, vb, out, pair_lse, ring.options(True))

    def earlier(dout_w, q, kb, vb, out, pair_lse):
        (ka, _), (va, _) = ring.halves(kb), ring.halves(vb)
        dq, dk, dv = backward(dout_w, q, ka, va, out, pair_lse, ring.options(False))
        return (dq, jnp.concatenate((dk, jnp.zeros_like(dk)), axis=ring.seq),
                jnp.concatenate((dv, jnp.zeros_like(dv)), axis=ring.seq))

    def later(dout_w, q, kb, vb, out, pair_lse):
        second = (ring.halves(x)[1] for x in (dout_w, q))
        lse_b = jnp.split(pair_lse, 2, axis=-1)[1]
        dq, dk, dv = backward(*second, kb, vb, ring.halves(out)[1], lse_b, ring.options(False))
        return jnp.concatenate((jnp.zeros_like(dq), dq), axis=ring.seq), dk, dv

    return jax.lax.cond(owner_is_earlier, earlier, later, dout_w, q, kb, vb, out, pair_lse)


def _backward(dout, q, k, v, out, lse, pair_lses, ring: _Ring):
    accum = _accum(q.dtype)
    dout_acc = dout.astype(accum)
    dq = jnp.zeros(q.shape, accum)
    dkb, dvb = jnp.zeros(k.shape, accum), jnp.zeros(v.shape, accum)
    kb, vb = k, v
    for step in range(ring.world):
        # K and V do not change: the next block travels while this one's gradients are
        # computed; its dK and dV follow once they hold this device's share.
        incoming = ring.pass_on((kb, vb)) if step + 1 < ring.world else None
        pair_lse = pair_lses[step]
        seen = jnp.isfinite(pair_lse)
        weight = jnp.where(seen, jnp.exp(pair_lse - jnp.where(seen, lse, 0)), 0)
        dout_w = (dout_acc * ring.row_weight(weight)).astype(q.dtype)
        grads = _pair_backward(dout_w, q, kb, vb, out, pair_lse, step,
                               _owner_is_earlier(step, ring), ring)
        dq = dq + grads[0].astype(accum)
        dkb, dvb = dkb + grads[1].astype(accum), dvb + grads[2].astype(accum)
        dkb, dvb = ring.pass_on((dkb, dvb))
        if incoming is not None:
            kb, vb = incoming
    # after a full turn dK and dV are this device's own block's, with every device's share
    return dq.astype(q.dtype), dkb.astype(k.dtype), dvb.astype(v.dtype)
