"""`merge_attention`: exact attention over a union of key sets from the attention over each set.

Attention over disjoint key sets K_1 .. K_n, each with its log-sum-exp, combines exactly: with
``m = max_i lse_i`` and weights ``w_i = exp(lse_i - m)``, the union's ``lse = m + log(sum w_i)``
and its output is ``sum_i (w_i / sum w) * out_i``. This is what split-KV decoding, cascade
attention over a shared prefix and ring attention need. It runs in the caller's own framework
(NumPy, CuPy, torch, JAX; under ``jax.jit`` and torch autograd too), so every byte comes from
that framework's allocator.
"""

from __future__ import annotations

from collections.abc import Sequence

from cuflash import _dtypes

LAYOUTS = ("bshd", "bhsd")


def merge_attention(outs: Sequence, lses: Sequence, *, layout: str = "bshd"):
    """Merge attention outputs computed over disjoint key sets into the output over their union.

    Args:
        outs: n >= 1 outputs of `cuflash.attention` for the same queries, each over its own key
            set: ``(B, Sq, Hq, Dv)`` for layout ``"bshd"``, ``(B, Hq, Sq, Dv)`` for ``"bhsd"``, or
            3-D without the batch axis; one framework, device, dtype and shape.
        lses: their log-sum-exps (``return_lse=True``): float32 ``(B, Hq, Sq)`` (``(Hq, Sq)``
            for 3-D outputs), natural log, ``-inf`` for a row that saw no key in its set.
        layout: ``"bshd"`` or ``"bhsd"``, as the outputs were computed.

    Returns:
        ``(out, lse)``: the output over the union, in the dtype, framework and device of `outs`,
        and its float32 lse. A row that saw no key in any set gets zeros and ``lse = -inf``,
        exactly as attention over the union gives it. The arithmetic is in float32 (float64
        for float64 outputs).

    See also: `cuflash.attention`.
    """
    if isinstance(outs, (str, bytes)) or not isinstance(outs, Sequence):
        raise TypeError(f"outs: expected a sequence of arrays, got {type(outs).__name__}")
    if isinstance(lses, (str, bytes)) or not isinstance(lses, Sequence):
        raise TypeError(f"lses: expected a sequence of arrays, got {type(lses).__name__}")
    if len(outs) == 0:
        raise ValueError("outs: expected at least one output, got an empty sequence")
    if len(lses) != len(outs):
        raise ValueError(f"lses: expected one lse per output ({len(outs)}), got {len(lses)}")
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    ops = ops_for(outs[0])
    _check(outs, lses, layout, ops)

    accum = "float64" if ops.dtype_name(outs[0]) == "float64" else "float32"
    lse_parts = [ops.cast(x, accum) for x in lses]
    top = lse_parts[0]
    for x in lse_parts[1:]:
        top = ops.maximum(top, x)
    # Rows that saw no key anywhere have top = -inf: shift by 0 there, so their weights are 0.
    shift = ops.where(ops.isfinite(top), top, ops.zeros_like(top))
    weights = [ops.exp(x - shift) for x in lse_parts]
    total = weights[0]
    for w in weights[1:]:
        total = total + w
    seen = total > 0
    safe_total = ops.where(seen, total, ops.ones_like(total))
    lse = ops.where(seen, shift + ops.log(safe_total), top)  # -inf (or NaN) where nothing seen
    out = None
    for w, part in zip(weights, outs, strict=True):
        scale = ops.where(seen, w / safe_total, ops.zeros_like(w))
        if layout == "bshd":
            scale = ops.swap_last_two(scale)
        term = ops.expand_last(scale) * ops.cast(part, accum)
        out = term if out is None else out + term
    return ops.cast(out, ops.dtype_name(outs[0])), ops.cast(lse, "float32")


def _check(outs, lses, layout: str, ops) -> None:
    """Every output like the first, every lse float32 of the matching shape, one framework."""
    first = outs[0]
    shape = tuple(int(n) for n in first.shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"outs[0]: expected 3 or 4 dimensions, got shape {shape}")
    dtype = ops.dtype_name(first)
    if dtype not in _dtypes.GPU_DTYPES:
        raise TypeError(f"outs[0]: dtype {dtype} is not supported; expected one of "
                        f"{', '.join(_dtypes.GPU_DTYPES)}")
    for i, x in enumerate(outs):
        _check_place(f"outs[{i}]", x, first, ops)
        seen = tuple(int(n) for n in x.shape)
        if seen != shape:
            raise ValueError(f"outs[{i}]: expected the shape of outs[0] {shape}, got {seen}")
        if ops.dtype_name(x) != dtype:
            raise TypeError(f"outs[{i}]: expected dtype {dtype} (that of outs[0]), "
                            f"got {ops.dtype_name(x)}")
    rows = shape[:-1]
    if layout == "bshd":
        rows = (*rows[:-2], rows[-1], rows[-2])
    for i, x in enumerate(lses):
        _check_place(f"lses[{i}]", x, first, ops)
        seen = tuple(int(n) for n in x.shape)
        if seen != rows:
            raise ValueError(f"lses[{i}]: expected shape {rows} ((B, Hq, Sq) for outs of shape "
                             f"{shape}, layout {layout}), got {seen}")
        if ops.dtype_name(x) != "float32":
            raise TypeError(f"lses[{i}]: expected dtype float32, got {ops.dtype_name(x)}")


def _check_place(name: str, x, first, ops) -> None:
    if ops_for(x) is not ops or not ops.same_place(x, first):
        raise TypeError(f"{name}: expected the framework and device of outs[0] "
                        f"({ops.describe(first)}), got {_describe(x)}")


def _describe(x) -> str:
    return f"{type(x).__module__}.{type(x).__name__}"


class _ArrayOps:
    """NumPy-style namespaces: NumPy, CuPy, jax.numpy."""

    def __init__(self, xp, name: str):
        self.xp = xp
        self.name = name

    def describe(self, x) -> str:
        return f"{self.name} on {getattr(x, 'device', 'cpu')}"

    def same_place(self, x, first) -> bool:
        try:
            return getattr(x, "device", None) == getattr(first, "device", None)
        except Exception:  # a traced JAX value has no device to compare; XLA checks placement
            return True

    @staticmethod
    def dtype_name(x) -> str:
        return _dtypes.dtype_name(x.dtype)

    def cast(self, x, dtype: str):
        if dtype == _dtypes.BFLOAT16:
            import ml_dtypes

            return x.astype(ml_dtypes.bfloat16)
        return x.astype(dtype)

    def maximum(self, a, b):
        return self.xp.maximum(a, b)

    def where(self, cond, a, b):
        return self.xp.where(cond, a, b)

    def isfinite(self, x):
        return self.xp.isfinite(x)

    def exp(self, x):
        return self.xp.exp(x)

    def log(self, x):
        return self.xp.log(x)

    def zeros_like(self, x):
        return self.xp.zeros_like(x)

    def ones_like(self, x):
        return self.xp.ones_like(x)

    def swap_last_two(self, x):
        return self.xp.swapaxes(x, -1, -2)

    @staticmethod
    def expand_last(x):
        return x[..., None]

    def concat(self, parts, axis: int):
        return self.xp.concatenate(parts, axis=axis)

    def stack(self, parts, axis: int):
        return self.xp.stack(parts, axis=axis)

    def zeros(self, shape: tuple[int, ...], like):
        return self.xp.zeros(shape, dtype=like.dtype)

    def contiguous(self, x):
        return getattr(self.xp, "ascontiguousarray", self.xp.asarray)(x)


class _TorchOps(_ArrayOps):
    def __init__(self):
        import torch

        super().__init__(torch, "torch")

    def describe(self, x) -> str:
        return f"torch on {x.device}"

    def same_place(self, x, first) -> bool:
        return x.device == first.device

    def cast(self, x, dtype: str):
        return x.to(getattr(self.xp, dtype))

    def swap_last_two(self, x):
        return x.transpose(-1, -2)

    def concat(self, parts, axis: int):
        return self.xp.cat(parts, dim=axis)

    def stack(self, parts, axis: int):
        return self.xp.stack(parts, dim=axis)

    def zeros(self, shape: tuple[int, ...], like):
        return self.xp.zeros(shape, dtype=like.dtype, device=like.device)

    def contiguous(self, x):
        return x.contiguous()


_OPS: dict[str, _ArrayOps] = {}


def ops_for(x) -> _ArrayOps:
    """The namespace that computes on `x` in its own framework (TypeError if none)."""
    top = type(x).__module__.split(".")[0]
    if top in _OPS:
        return _OPS[top]
    if top == "numpy":
        import numpy

        ops = _ArrayOps(numpy, "numpy")
    elif top == "cupy":
        import cupy

        ops = _ArrayOps(cupy, "cupy")
    elif top == "torch":
        ops = _TorchOps()
    elif top in ("jax", "jaxlib"):
        import jax.numpy as jnp

        ops = _ArrayOps(jnp, "jax")
    else:
        raise TypeError(f"expected NumPy, CuPy, torch or JAX arrays, got {_describe(x)}")
    _OPS[top] = ops
    return ops

