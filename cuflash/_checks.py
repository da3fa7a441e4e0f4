"""The checks every entry point makes of its arguments (the core API, varlen, the KV cache, the
torch and JAX integrations): each raises TypeError or ValueError naming the argument, before any
work."""

from __future__ import annotations

import math
import numbers

import numpy as np

from cuflash import _interop

MAX_SCALE = float(np.finfo(np.float32).max) / math.log2(math.e)  # about 2.3587e38


def refuse_capped_mods_on_cuda(softcap: float, alibi: bool, bias: bool, mask: bool,
                               where: str, user: bool = False) -> None:
    """The CUDA kernels do not combine a softcap with ALiBi, a bias, a mask array or a user's
    score_mod / mask_mod (attention/score.cuh's Mods and the user kinds carry no softcap):
    raise NotImplementedError naming them. `where`: the inputs, described."""
    others = [name for name, given in (("alibi_slopes", alibi), ("bias", bias), ("mask", mask),
                                       ("score_mod / mask_mod", user)) if given]
    if softcap and others:
        raise NotImplementedError(
            f"softcap: the CUDA kernels do not combine a softcap with {', '.join(others)} yet "
            f"(got both for {where}); the CPU path and cuflash.reference compute the "
            f"combination")


# The kernels index rows and keys in 32-bit ints and reach seqlen_q + 2 * seqlen_k (the window
# edges of an unbounded side); CUDA grids are at most 65535 blocks along y (heads) and z (batch).
MAX_ROW_REACH = 2**31 - 1
MAX_GRID_YZ = 65535


def check_sizes(batch: int, seqlen_q: int, seqlen_k: int, heads_q: int, cuda: bool,
                 shapes: str) -> None:
    if seqlen_q + 2 * seqlen_k > MAX_ROW_REACH:
        raise ValueError(f"q, k: sequence lengths too long for the kernels' 32-bit row indices: "
                         f"seqlen_q + 2 * seqlen_k must be at most {MAX_ROW_REACH}, got "
                         f"{seqlen_q} + 2 * {seqlen_k} ({shapes})")
    if cuda and (batch > MAX_GRID_YZ or heads_q > MAX_GRID_YZ):
        name, n = ("q batch", batch) if batch > MAX_GRID_YZ else ("q heads", heads_q)
        raise ValueError(f"{name}: at most {MAX_GRID_YZ} on CUDA (a grid dimension of the "
                         f"kernels), got {n} ({shapes}); split the call")


def check_flag(name: str, value: object) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")


def check_varlen_grad_inputs(q, v, dout, out, lse, return_dsinks: object,
                             sinks: object) -> None:
    """The arguments a varlen backward takes beside the forward's: `dout` and `out` shaped
    ``(total_q, Hq, Dv)``, `lse` ``(Hq, total_q)``, and `return_dsinks` a flag that needs
    `sinks`."""
    total_q, heads_q = int(q.shape[0]), int(q.shape[1])
    out_shape = (total_q, heads_q, int(v.shape[-1]))
    for name, x, shape in (("dout", dout, out_shape), ("out", out, out_shape),
                           ("lse", lse, (heads_q, total_q))):
        got = tuple(getattr(x, "shape", ()))
        if tuple(int(n) for n in got) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {got or type(x).__name__}")
    check_flag("return_dsinks", return_dsinks)
    if return_dsinks and sinks is None:
        raise ValueError("return_dsinks: True needs sinks (the gradient of which sinks?)")


def check_aux(name: str, x: object, src: _interop.Source) -> _interop.Source:
    """One aux array of a score_mod / mask_mod: NumPy or of q's framework and device, of a
    dtype the kernels read (`_user_mods.AUX_TYPES`); where it lives. Reads no data (a traced
    tensor passes), so the backend view is made where it is used (`aux_view`)."""
    from cuflash._user_mods import AUX_TYPES

    return check_side_array(f"aux[{name!r}]", x, src, tuple(AUX_TYPES))


def aux_view(x: object, where: _interop.Source):
    """The backend view (NumPy or CuPy, no copy) of an aux array `check_aux` placed."""
    return _interop.to_backend(x, where)


def check_alibi(slopes: object, src: _interop.Source, batch: int, heads_q: int):
    """ALiBi slopes ``(Hq,)`` or ``(B, Hq)``, float32 or float64: a float64 NumPy ``(B, Hq)``
    view with finite values, or, for slopes on q's CUDA device, the device array itself as
    given (its values are not read on the host: that would wait for the device). Raises naming
    ``alibi_slopes``."""
    shapes = [(heads_q,), (batch, heads_q)]
    expected = f"({heads_q},) or ({batch}, {heads_q}) (Hq, or B and Hq)"
    where = check_side_array("alibi_slopes", slopes, src, ("float32", "float64"))
    shape = tuple(int(n) for n in slopes.shape)
    if shape not in shapes:
        raise ValueError(f"alibi_slopes: expected shape {expected}, got {shape}")
    if where.device == "cuda":
        return _interop.to_backend(slopes, where)
    values = check_head_values("alibi_slopes", slopes, where, shapes, expected)
    return np.broadcast_to(values, (batch, heads_q))


def check_side_array(name: str, x: object, src: _interop.Source,
                      dtypes: tuple[str, ...]) -> _interop.Source:
    """Where an array argument beside q, k, v lives: not a masked array, NumPy or q's own
    framework and device, one of `dtypes`. Raises naming `name`."""
    refuse_masked(name, x)
    where = _interop.source_of(x, name)
    if where.framework != "numpy" and where != src:
        raise TypeError(f"{name}: expected a NumPy array or an array of q's framework and "
                        f"device ({src.describe()}), got {where.describe()}")
    dtype = _interop.dtype_name(x)
    if dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(dtypes)}, got {dtype}")
    return where


def check_head_values(name: str, x: object, src: _interop.Source,
                       shapes: list[tuple[int, ...]], expected: str) -> np.ndarray:
    """A float64 copy of `x`: a float32/float64 array of one of `shapes` with finite values,
    NumPy or on q's framework and device. Raises naming `name`."""
    where = check_side_array(name, x, src, ("float32", "float64"))
    shape = tuple(int(n) for n in x.shape)
    if shape not in shapes:
        raise ValueError(f"{name}: expected shape {expected}, got {shape}")
    values = np.array(_interop.to_backend(x, where), dtype=np.float64)  # a copy
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name}: expected finite values, got NaN or infinity")
    return values


def check_sinks(x: object, src: _interop.Source, heads_q: int):
    """The sinks ``(Hq,)``, float32 or float64: a float64 NumPy copy with finite values, or, for
    CUDA inputs and sinks on q's device, the device array itself (its values are not read on the
    host: that would wait for the device). Raises naming ``sinks``."""
    where = check_side_array("sinks", x, src, ("float32", "float64"))
    shape = tuple(int(n) for n in x.shape)
    if shape != (heads_q,):
        raise ValueError(f"sinks: expected shape ({heads_q},) (Hq), got {shape}")
    if where.device == "cuda":
        return _interop.to_backend(x, where)
    return check_head_values("sinks", x, where, [(heads_q,)], f"({heads_q},) (Hq)")


def check_score_array(name: str, x: object, src: _interop.Source, full: tuple[int, ...],
                       dtypes: tuple[str, ...]) -> np.ndarray:
    """A NumPy view of `x` (no copy): an array of one of `dtypes`, NumPy or of q's framework and
    device, broadcastable to `full` = (B, Hq, Sq, Sk). Raises naming `name`."""
    where = check_side_array(name, x, src, dtypes)
    shape = tuple(int(n) for n in x.shape)
    if len(shape) > 4 or any(n not in (1, want) for n, want in zip(shape[::-1], full[::-1],
                                                                    strict=False)):
        raise ValueError(f"{name}: expected a shape broadcastable to (B, Hq, Sq, Sk) = {full}, "
                         f"got {shape}")
    return _interop.to_backend(x, where)


def refuse_masked(name: str, x: object) -> None:
    """A NumPy masked array would pass as a plain array and its mask be silently ignored."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name}: expected a plain array, got a numpy.ma.MaskedArray, whose mask "
                        f"cuflash would ignore; fill it ({name}.filled(value)) or compress it "
                        "first")


def check_ring_shards(q, k, v, *, causal: object, window: object, layout: object,
                      holder: str) -> int:
    """The arguments both ring attentions share, checked before any communication; returns
    the sequence axis of `layout`. `holder`: who holds a shard, for the messages ("rank",
    "device")."""
    if window is not None:
        raise NotImplementedError(f"window: ring_attention does not take a sliding window yet "
                                  f"(got {window!r}); use causal or no mask")
    check_flag("causal", causal)
    if not isinstance(layout, str) or layout not in ("bshd", "bhsd"):
        raise ValueError(f"layout: expected one of ('bshd', 'bhsd'), got {layout!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise ValueError(f"{name}: expected a 4-D array in layout {layout!r}, got shape "
                             f"{tuple(x.shape)}")
    seq = 1 if layout == "bshd" else 2
    if k.shape[seq] != q.shape[seq]:
        raise ValueError(f"k: expected this {holder}'s shard as long as q's ({q.shape[seq]}), "
                         f"got {k.shape[seq]}")
    if causal and q.shape[seq] % 2:
        raise ValueError(f"q: with causal the shard holds two zigzag chunks, so its length must "
                         f"be even, got {q.shape[seq]}")
    return seq


def check_scale(scale: object, head_dim: int) -> float:
    """The softmax scale: 1 / sqrt(head_dim) for None, else a real number in (0, MAX_SCALE].
    Raises naming ``scale``."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a real number > 0 or None, got {scale!r}")
    value = float(scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale: expected a finite number > 0, got {value!r}")
    if value > MAX_SCALE:
        raise ValueError(f"scale: expected at most {MAX_SCALE:.5g} (float32 max / log2(e), so "
                         f"that scale * log2(e) is finite in float32), got {value!r}")
    return value
