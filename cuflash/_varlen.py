"""Variable-length batches in flash-attn's packed layout: `attention_varlen` and its backward.

Sequence b of a packed batch holds rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` of ``q (total_q, Hq,
D)`` and of ``k, v (total_k, Hkv, D)``. Today each sequence runs as one dense call on views of
the packed arrays (no copy of the inputs), and the results are concatenated in the caller's
framework, so every path, dtype and variant of `cuflash.attention` serves it, torch autograd
included. The prefix sums are read on the host (for device arrays, one small copy that waits
for the stream). A kernel that walks the packed batch itself, scheduled by the actual lengths,
is not written yet.

Traced JAX values (under jax.jit or jax.grad), whose prefix sums cannot be read, go to
`cuflash.jax.attention_varlen`: one call over the packed batch with a document mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cuflash import _dropout, _dtypes
from cuflash._checks import check_flag, check_varlen_grad_inputs
from cuflash._merge import ops_for
from cuflash.api import attention, attention_backward


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q: int | None = None,
                     max_seqlen_k: int | None = None, seqused_k=None, causal: bool = False,
                     window: tuple[int, int] | None = None, scale: float | None = None,
                     softcap: float = 0.0, alibi_slopes=None, sinks=None,
                     dropout_p: float = 0.0, rng=None, return_lse: bool = False):
    """Attention over a packed batch of sequences of different lengths (flash-attn's varlen).

    Args:
        q: ``(total_q, Hq, D)``: the queries of every sequence, one after the other. Any
            framework `cuflash.attention` takes (NumPy, CuPy, torch, JAX).
        k, v: ``(total_k, Hkv, D)`` and ``(total_k, Hkv, Dv)``, likewise, ``Hq % Hkv == 0``;
            v's head dim ``Dv`` may differ from ``D`` as `cuflash.attention` allows.
        cu_seqlens_q, cu_seqlens_k: int32 ``(B + 1,)`` prefix sums (NumPy, or the framework
            and device of q): sequence b holds rows ``cu[b]:cu[b + 1]``; ``cu[0] == 0``,
            non-decreasing, ``cu[B]`` the total. Sequences of length 0 are legal.
        max_seqlen_q, max_seqlen_k: optional; if given, at least the longest sequence (they
            are checked, not needed).
        seqused_k: optional int32 ``(B,)``: sequence b attends to its first ``seqused_k[b]``
            keys only.
        causal, window, scale: as for `cuflash.attention`, per sequence: the masks are
            bottom-right aligned on each sequence's own lengths.
        softcap, sinks: as for `cuflash.attention` (sinks ``(Hq,)``), in every sequence.
        alibi_slopes: as for `cuflash.attention`: ``(Hq,)``, or ``(B, Hq)`` with row b for
            sequence b; distances on each sequence's own positions.
        dropout_p, rng: as for `cuflash.attention`; sequence b draws the stream ``(seed,
            offset + b)`` (a call takes B offsets), its mask that of a one-sequence call. Not
            for traced JAX prefix sums.
        return_lse: also return the float32 lse, ``(Hq, total_q)``.

    Returns:
        ``out`` ``(total_q, Hq, Dv)`` in q's framework, device and dtype, or ``(out, lse)``.

    torch tensors that require grad get gradients through each sequence's call.

    See also: `attention_varlen_backward`, `cuflash.reference.attention_varlen`.
    """
    p, rng = _dropout.check(dropout_p, rng)
    if _traced(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, sinks):
        from cuflash import jax as cuflash_jax

        _refuse_traced_dropout(p)
        return cuflash_jax.attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, seqused_k=seqused_k, causal=causal, window=window,
            scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
            return_lse=return_lse)
    pack = _Packed.of(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      seqused_k)
    check_flag("return_lse", return_lse)
    ops = ops_for(q)
    outs, lses = [], []
    for b, (rows, keys) in enumerate(pack.sequences()):
        out, lse = attention(q[rows][None], k[keys][None], v[keys][None], causal=causal,
                             window=window, scale=scale, softcap=softcap, sinks=sinks,
                             alibi_slopes=pack.slopes_of(alibi_slopes, b), return_lse=True,
                             dropout_p=p, rng=_dropout.of_sequence(rng, b))
        outs.append(out[0])
        lses.append(lse[0])
    if not outs:  # B = 0
        out = ops.zeros((*q.shape[:-1], v.shape[-1]), q)
        lse = ops.cast(ops.zeros((q.shape[1], 0), q), "float32")
    else:
        out, lse = ops.concat(outs, 0), ops.concat(lses, 1)
    return (out, lse) if return_lse else out


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *,
                              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                              seqused_k=None, causal: bool = False,
                              window: tuple[int, int] | None = None, scale: float | None = None,
                              softcap: float = 0.0, alibi_slopes=None, sinks=None,
                              dropout_p: float = 0.0, rng=None, deterministic: bool = False,
                              return_dsinks: bool = False):
    """Gradients of `attention_varlen` with respect to q, k and v (and the sinks).

    Args:
        dout: gradient of the output, ``(total_q, Hq, Dv)``.
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, causal,
            window, scale, softcap, alibi_slopes, sinks, dropout_p, rng: exactly as passed to
            `attention_varlen`.
        out, lse: its output and float32 lse ``(Hq, total_q)`` (``return_lse=True``).
        deterministic: as for `cuflash.attention_backward`.
        return_dsinks: also return the sinks' gradient, summed over the sequences.

    Returns:
        ``(dq, dk, dv)`` shaped like q, k, v (keys past ``seqused_k[b]`` get zero gradients),
        and ``dsinks`` with `return_dsinks`.
    """
    p, rng = _dropout.check(dropout_p, rng)
    if _traced(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes,
               sinks):
        from cuflash import jax as cuflash_jax

        _refuse_traced_dropout(p)
        return cuflash_jax.attention_varlen_backward(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, seqused_k=seqused_k, causal=causal, window=window,
            scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
            deterministic=deterministic, return_dsinks=return_dsinks)
    pack = _Packed.of(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      seqused_k)
    check_varlen_grad_inputs(q, v, dout, out, lse, return_dsinks, sinks)
    ops = ops_for(q)
    dqs, dks, dvs, dsinks = [], [], [], []
    for b, ((rows, keys), unused) in enumerate(zip(pack.sequences(), pack.unused_keys(),
                                                    strict=True)):
        dq, dk, dv, *dsink = attention_backward(
            dout[rows][None], q[rows][None], k[keys][None], v[keys][None], out[rows][None],
            ops.contiguous(lse[:, rows])[None], causal=causal, window=window, scale=scale,
            softcap=softcap, alibi_slopes=pack.slopes_of(alibi_slopes, b), sinks=sinks,
            dropout_p=p, rng=_dropout.of_sequence(rng, b), deterministic=deterministic,
            return_dsinks=return_dsinks)
        dsinks += dsink
        dqs.append(dq[0])
        dks.append(dk[0])
        dvs.append(dv[0])
        if unused:
            dks.append(ops.zeros((unused, *k.shape[1:]), k))
            dvs.append(ops.zeros((unused, *v.shape[1:]), v))
    if not dqs:
        grads = (ops.zeros(tuple(q.shape), q), ops.zeros(tuple(k.shape), k),
                 ops.zeros(tuple(v.shape), v))
    else:
        grads = ops.concat(dqs, 0), ops.concat(dks, 0), ops.concat(dvs, 0)
    if not return_dsinks:
        return grads
    dsink = sinks * 0 if not dsinks else ops.stack(dsinks, 0).sum(0)
    return (*grads, dsink)


def _refuse_traced_dropout(p: float) -> None:
    if p:
        raise NotImplementedError(
            "dropout_p: not with traced JAX prefix sums (the packed call there is one dense call "
            "with a document mask, whose mask would differ from the per-sequence streams); pass "
            "concrete prefix sums")


class _Packed:
    """The checked sequence boundaries of one packed batch."""

    def __init__(self, cu_q: np.ndarray, cu_k: np.ndarray, used: np.ndarray):
        self.cu_q, self.cu_k, self.used = cu_q, cu_k, used

    def slopes_of(self, alibi_slopes, b: int):
        """Sequence b's ALiBi slopes: all of ``(Hq,)`` slopes, row b of ``(B, Hq)`` ones."""
        if alibi_slopes is None or len(getattr(alibi_slopes, "shape", ())) != 2:
            return alibi_slopes  # None, (Hq,), or wrong: cuflash.attention names it
        if int(alibi_slopes.shape[0]) != len(self.cu_q) - 1:
            raise ValueError(f"alibi_slopes: expected ({len(self.cu_q) - 1}, Hq) (one row per "
                             f"sequence) or (Hq,), got {tuple(alibi_slopes.shape)}")
        return alibi_slopes[b]

    @classmethod
    def of(cls, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
           seqused_k) -> _Packed:
        shapes = {}
        for name, x in (("q", q), ("k", k), ("v", v)):
            shape = tuple(int(n) for n in getattr(x, "shape", ()))
            if len(shape) != 3:
                raise ValueError(f"{name}: expected (total, heads, head_dim), got shape "
                                 f"{shape if hasattr(x, 'shape') else type(x).__name__}")
            shapes[name] = shape
        if shapes["v"][:-1] != shapes["k"][:-1]:
            raise ValueError(f"v: expected the shape of k {shapes['k']} but for the last axis "
                             f"(v's head dim Dv may differ), got {shapes['v']}")
        cu_q = _prefix_sums(cu_seqlens_q, "cu_seqlens_q", shapes["q"][0], "q")
        cu_k = _prefix_sums(cu_seqlens_k, "cu_seqlens_k", shapes["k"][0], "k")
        if len(cu_k) != len(cu_q):
            raise ValueError(f"cu_seqlens_k: expected {len(cu_q)} entries like cu_seqlens_q "
                             f"(B + 1), got {len(cu_k)}")
        lengths_k = np.diff(cu_k)
        used = lengths_k
        if seqused_k is not None:
            used = int32_vector(seqused_k, "seqused_k")
            if used.shape != lengths_k.shape:
                raise ValueError(f"seqused_k: expected shape ({len(lengths_k)},) (B), got "
                                 f"{used.shape}")
            if np.any(used < 0) or np.any(used > lengths_k):
                raise ValueError(f"seqused_k: expected 0 <= seqused_k[b] <= the key length of "
                                 f"sequence b ({lengths_k.tolist()}), got {used.tolist()}")
        for name, given, lengths in (("max_seqlen_q", max_seqlen_q, np.diff(cu_q)),
                                     ("max_seqlen_k", max_seqlen_k, lengths_k)):
            if given is None:
                continue
            if isinstance(given, bool) or not isinstance(given, (int, np.integer)):
                raise TypeError(f"{name}: expected an int or None, got {given!r}")
            longest = int(lengths.max(initial=0))
            if given < longest:
                raise ValueError(f"{name}: {given} is shorter than the longest sequence "
                                 f"({longest})")
        return cls(cu_q, cu_k, used)

    def sequences(self):
        """(rows, keys) slices of each sequence, in order."""
        for b in range(len(self.cu_q) - 1):
            start_k = int(self.cu_k[b])
            yield (slice(int(self.cu_q[b]), int(self.cu_q[b + 1])),
                   slice(start_k, start_k + int(self.used[b])))

    def unused_keys(self):
        """How many keys of each sequence lie past its seqused_k."""
        return (int(n) for n in np.diff(self.cu_k) - self.used)


def int32_vector(x: Any, name: str) -> np.ndarray:
    """A 1-D int32 array of the host values of `x` (a device array is copied back)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name}: expected an int32 array, got {type(x).__name__}")
    if _dtypes.dtype_name(dtype) != "int32":
        raise TypeError(f"{name}: expected dtype int32 (flash-attn's convention), got {dtype}")
    host = to_host(x, name)
    if host.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {host.shape}")
    return host.astype(np.int64)


def _prefix_sums(x: Any, name: str, total: int, of: str) -> np.ndarray:
    cu = int32_vector(x, name)
    if len(cu) < 1:
        raise ValueError(f"{name}: expected B + 1 >= 1 entries, got none")
    if cu[0] != 0:
        raise ValueError(f"{name}: expected {name}[0] == 0, got {int(cu[0])}")
    if np.any(np.diff(cu) < 0):
        at = int(np.argmax(np.diff(cu) < 0))
        raise ValueError(f"{name}: expected non-decreasing prefix sums, got {int(cu[at])} then "
                         f"{int(cu[at + 1])} at entries {at}, {at + 1}")
    if cu[-1] != total:
        raise ValueError(f"{name}: last entry {int(cu[-1])} must equal {of}'s total rows "
                         f"({total})")
    return cu


def _traced(*arrays) -> bool:
    """Whether any of `arrays` is a traced JAX value (under jax.jit, jax.grad, ...)."""
    return any(type(x).__module__.split(".")[0] == "jax" and type(x).__name__.endswith("Tracer")
               for x in arrays)


def to_host(x: Any, name: str = "") -> np.ndarray:
    if _traced(x):
        raise TypeError(f"{name}: got a traced JAX value ({type(x).__name__}); its values are "
                        f"read on the host, so it must be a concrete array")
    top = type(x).__module__.split(".")[0]
    if top == "torch":
        return x.detach().cpu().numpy()
    if top == "cupy":
        return x.get()
    return np.asarray(x)
