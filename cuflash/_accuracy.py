"""The accuracy rule (docs/api.md, "Accuracy rule"), shared by the tests and ``python -m cuflash
check``.

A result passes when ``max|got - ref64| <= 2 * max|naive - ref64| + eps``: ``ref64`` is
:mod:`cuflash.reference` (float64), ``naive`` is plain attention computed the way a framework would
compute it in the input dtype. So a kernel may be at most twice as wrong as the obvious
implementation in its own precision, plus a small floor ``eps`` for cases where the naive result is
exact by luck (e.g. ``Sk == 1``: the output is v itself, and the naive backward cancels exactly
where a flash backward keeps a few ulps; see :func:`backward_eps`).

Everything here works on NumPy arrays in the canonical ``(B, S, H, D)`` layout; values of any
float dtype are accepted and rounded to the dtype under test first. bfloat16 is emulated by
rounding float32 bits, so no bfloat16-capable array library is needed.

:func:`compare` measures one output and says whether it passes; :func:`assert_matches_reference`
raises with a readable message when it does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cuflash import _dropout, _reference_mods, reference

# eps, relative to max(1, max|ref64|) so that it follows the magnitude of what is compared
# (gradients of long sequences grow like sqrt(S)). float64: a few hundred ulps of reordering.
# float32: ~100 ulps; still 50x tighter than the ~5e-4 error of plain TF32, which must fail.
# float16 / bfloat16: about two units of roundoff (2**-10, 2**-7), i.e. one rounding of the output.
EPS = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}

# cuflash returns lse as float32 whatever the input dtype; compare it with dtype=LSE_DTYPE.
LSE_DTYPE = "float32"


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """x rounded to ``dtype`` (round to nearest even), held in float32 (float64 for "float64")."""
    if dtype == "float64":
        return np.asarray(x, dtype=np.float64)
    x32 = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x32
    if dtype == "float16":
        return x32.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        # bfloat16 is the top half of a float32: round the low 16 bits to nearest, ties to even.
        bits = x32.view(np.uint32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.view(np.float32)
    raise ValueError(f"unknown dtype {dtype!r}")


def naive_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, *, dtype: str, causal: bool, scale: float,
    window=None, softcap: float = 0.0, alibi_slopes=None, sinks=None, bias=None, mask=None,
    dropout_p: float = 0.0, rng=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Plain attention in ``dtype``: returns ``(out, lse)`` as float64 arrays.

    q ``(B, Sq, Hq, D)``, k ``(B, Sk, Hkv, D)``, v ``(B, Sk, Hkv, Dv)`` (out has ``Dv``). Half
    types follow a tensor-core framework: matmul inputs in the dtype, products accumulated in
    float32, softmax in float32, P rounded to the dtype before P @ V, output rounded to the
    dtype. float32 / float64 compute in the dtype.
    lse ``(B, Hq, Sq)`` is rounded to float32, the dtype cuflash returns it in. ``softcap > 0``
    caps the scaled scores, ``softcap * tanh(s / softcap)``, and ``alibi_slopes`` (``(Hq,)`` or
    ``(B, Hq)``) adds ``-slope * |i + Sk - Sq - j|``, in the compute dtype; ``sinks`` ``(Hq,)``
    adds each head's sink to every row's softmax denominator (and lse); ``bias`` is added last
    and ``mask`` (bool, True = attend) hides keys, both broadcastable to ``(B, Hq, Sq, Sk)``;
    ``dropout_p`` with ``rng`` scales P by dropout's ``keep / (1 - p)`` before P @ V.
    """
    p, lse, _, _ = _naive_probabilities(q, k, dtype, causal, window, scale, softcap, alibi_slopes,
                                        sinks, bias, mask)
    p = p * _kept(p, dropout_p, rng)
    out = np.matmul(round_to(p, dtype), _grouped_kv(round_to(v, dtype)))
    return _ungrouped(round_to(out, dtype)), round_to(lse, LSE_DTYPE).astype(np.float64)


def naive_attention_backward(
    dout: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    dtype: str,
    causal: bool,
    scale: float,
    window=None,
    softcap: float = 0.0,
    alibi_slopes=None,
    sinks=None,
    bias=None,
    mask=None,
    dropout_p: float = 0.0,
    rng=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain attention backward in ``dtype`` (as autograd of :func:`naive_attention` would do it).

    Returns float64 ``(dq, dk, dv)`` in the canonical layout. Each matmul takes dtype-rounded
    inputs and accumulates in float32 (float64 for "float64"); dS is rounded to the dtype before
    it meets q and k; each gradient is rounded to the dtype at the end.
    """
    hkv = k.shape[2]
    p, _, slope, _ = _naive_probabilities(q, k, dtype, causal, window, scale, softcap,
                                          alibi_slopes, sinks, bias, mask)
    do_g = _grouped_q(round_to(dout, dtype), hkv)
    q_g = _grouped_q(round_to(q, dtype), hkv)
    k_g, v_g = _grouped_kv(round_to(k, dtype)), _grouped_kv(round_to(v, dtype))
    kept = _kept(p, dropout_p, rng)
    dv = np.matmul(round_to(p * kept, dtype).swapaxes(-1, -2), do_g).sum(axis=2)
    dp = np.matmul(do_g, v_g.swapaxes(-1, -2)) * kept
    ds = round_to(p * (dp - np.sum(p * dp, axis=-1, keepdims=True)) * slope, dtype)
    dq = np.matmul(ds, k_g) * p.dtype.type(scale)
    dk = np.matmul(ds.swapaxes(-1, -2), q_g).sum(axis=2) * p.dtype.type(scale)
    dk, dv = (round_to(x, dtype).swapaxes(1, 2).astype(np.float64) for x in (dk, dv))
    return _ungrouped(round_to(dq, dtype)), dk, dv


def naive_sinks_gradient(
    dout: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, dtype: str, causal: bool,
    scale: float, sinks, window=None, softcap: float = 0.0, alibi_slopes=None, bias=None,
    mask=None,
) -> np.ndarray:
    """The sinks' gradient ``(Hq,)`` as plain attention would form it in ``dtype``:
    ``-sum over batch and rows of p_sink * rowsum(P * dP)``, float64."""
    hkv = k.shape[2]
    p, _, _, p_sink = _naive_probabilities(q, k, dtype, causal, window, scale, softcap,
                                           alibi_slopes, sinks, bias, mask)
    do_g = _grouped_q(round_to(dout, dtype), hkv)
    dp = np.matmul(do_g, _grouped_kv(round_to(v, dtype)).swapaxes(-1, -2))
    delta = np.sum(p * dp, axis=-1)
    grad = -np.sum(p_sink * delta, axis=(0, 3))  # (Hkv, G)
    return round_to(grad.reshape(-1), dtype).astype(np.float64)


def naive_bias_gradient(
    dout: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, dtype: str, causal: bool,
    scale: float, bias, window=None, softcap: float = 0.0, alibi_slopes=None, sinks=None,
    mask=None,
) -> np.ndarray:
    """The bias's gradient, shaped like `bias`, as plain attention would form it in ``dtype``:
    dS = P * (dP - rowsum(P * dP)) summed over the axes bias was broadcast along, float64."""
    hkv = k.shape[2]
    p, _, _, _ = _naive_probabilities(q, k, dtype, causal, window, scale, softcap,
                                      alibi_slopes, sinks, bias, mask)
    do_g = _grouped_q(round_to(dout, dtype), hkv)
    dp = np.matmul(do_g, _grouped_kv(round_to(v, dtype)).swapaxes(-1, -2))
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
    b, hkv, g, sq, sk = ds.shape
    ds = ds.reshape(b, hkv * g, sq, sk)
    shape = np.shape(bias)
    padded = (1,) * (4 - len(shape)) + shape
    axes = tuple(a for a in range(4) if padded[a] == 1 and ds.shape[a] != 1)
    grad = ds.sum(axis=axes, keepdims=True) if axes else ds
    return round_to(grad.reshape(shape), dtype).astype(np.float64)


def backward_eps(
    dout: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    dtype: str,
    causal: bool,
    scale: float,
    window=None,
    softcap: float = 0.0,
    alibi_slopes=None,
    sinks=None,
    bias=None,
    mask=None,
    dropout_p: float = 0.0,
    rng=None,
) -> tuple[float, float, float]:
    """eps for dq, dk, dv: ``EPS[dtype]`` times the largest magnitude each gradient is summed from.

    The softmax backward forms dS = P * (dP - delta). Where P is peaked (Sk == 1, large scores) dP
    and delta = rowsum(dO * O) nearly cancel, so a gradient can be ~0 while any implementation
    keeps a few ulps of |dP| + |delta| in it; the naive result may cancel exactly by luck and give
    the rule no room. The magnitudes are the same sums taken over absolute values, in float64.
    """
    hkv = k.shape[2]
    p, _, slope, _ = _naive_probabilities(q, k, "float64", causal, window, scale, softcap,
                                          alibi_slopes, sinks, bias, mask)
    do_g, q_g = (np.abs(_grouped_q(np.asarray(x, dtype=np.float64), hkv)) for x in (dout, q))
    k_g, v_g = (np.abs(_grouped_kv(np.asarray(x, dtype=np.float64))) for x in (k, v))
    kept = _kept(p, dropout_p, rng)
    dp_abs = np.matmul(do_g, v_g.swapaxes(-1, -2)) * kept
    delta_abs = np.sum(p * dp_abs, axis=-1, keepdims=True)  # >= |rowsum(dO * O)|
    ds_abs = p * (dp_abs + delta_abs) * slope
    dq_mag = abs(scale) * np.matmul(ds_abs, k_g)
    dk_mag = abs(scale) * np.matmul(ds_abs.swapaxes(-1, -2), q_g).sum(axis=2)
    dv_mag = np.matmul((p * kept).swapaxes(-1, -2), do_g).sum(axis=2)
    dq_eps, dk_eps, dv_eps = (
        EPS[dtype] * max(1.0, float(np.max(x, initial=0.0))) for x in (dq_mag, dk_mag, dv_mag)
    )
    return dq_eps, dk_eps, dv_eps


@dataclass(frozen=True)
class Comparison:
    """One output measured against the rule.

    Attributes:
        name: what was compared ("out", "lse", "dq", ...).
        max_error: ``max |got - ref64|`` over the reference's finite entries (0 when empty).
        allowed: ``2 * naive_error + eps``.
        failure: None when the output passes, else a sentence saying what is wrong and where.
    """

    name: str
    max_error: float
    allowed: float
    failure: str | None

    @property
    def ok(self) -> bool:
        return self.failure is None


def compare(
    name: str,
    got: np.ndarray,
    ref64: np.ndarray,
    naive: np.ndarray,
    *,
    dtype: str,
    eps: float | None = None,
) -> Comparison:
    """Measure one output against the rule, without raising.

    Args:
        name: what is compared ("out", "dq", ...), for the message.
        got: the result under test (any float dtype; bfloat16 results passed as float32).
        ref64: the float64 reference; ``naive``: :func:`naive_attention` & co. for ``dtype``.
        dtype: the input dtype of the problem, which picks the default eps.
        eps: absolute floor; default ``EPS[dtype] * max(1, max|ref64|)``, right for out and lse;
            pass :func:`backward_eps` for gradients.

    Non-finite reference entries (lse = -inf) must be matched exactly; everywhere else ``got`` must
    be finite.
    """
    got, ref64, naive = (np.asarray(x, dtype=np.float64) for x in (got, ref64, naive))
    if got.shape != ref64.shape or naive.shape != ref64.shape:
        failure = f"{name}: shape {got.shape}, reference {ref64.shape}, naive {naive.shape}"
        return Comparison(name, float("nan"), float("nan"), failure)
    finite = np.isfinite(ref64)
    err = _abs_diff(got, ref64, finite)
    naive_err = float(np.max(_abs_diff(naive, ref64, finite), initial=0.0))
    if eps is None:
        scale = max(1.0, float(np.max(np.abs(ref64), where=finite, initial=0.0)))
        eps = EPS[dtype] * scale
    allowed = 2 * naive_err + eps
    max_error = float(np.max(err, initial=0.0))

    failure = (
        _first_bad(name, "matches the reference's non-finite entries", ~finite, got == ref64,
                   got, ref64)
        or _first_bad(name, "is finite", finite, np.isfinite(got), got, ref64)
        or _first_bad(name + " (naive)", "is finite", finite, np.isfinite(naive), naive, ref64)
    )
    if failure is None and max_error > allowed:
        at = np.unravel_index(np.argmax(err), err.shape)
        failure = (
            f"{name}: max |got - ref64| = {max_error:.3e} at index {tuple(map(int, at))} "
            f"(got {got[at]:.8g}, ref64 {ref64[at]:.8g}) exceeds the allowed {allowed:.3e} "
            f"= 2 * {naive_err:.3e} (naive {dtype} error) + eps {eps:.1e}; "
            f"{int(np.sum(err > allowed))} of {err.size} entries over, shape {err.shape}"
        )
    return Comparison(name, max_error, allowed, failure)


def assert_matches_reference(
    name: str,
    got: np.ndarray,
    ref64: np.ndarray,
    naive: np.ndarray,
    *,
    dtype: str,
    eps: float | None = None,
) -> None:
    """Assert the accuracy rule for one output (see :func:`compare`), with a message that says
    where and by how much."""
    result = compare(name, got, ref64, naive, dtype=dtype, eps=eps)
    if not result.ok:
        raise AssertionError(result.failure)


def _abs_diff(x: np.ndarray, ref64: np.ndarray, where: np.ndarray) -> np.ndarray:
    """|x - ref64| where ``where`` holds, 0 elsewhere (no inf - inf). An output that was never
    written may hold any bits, signalling NaNs too: the difference is then NaN, which the rule
    reports, and not a RuntimeWarning."""
    diff = np.zeros_like(ref64)
    with np.errstate(invalid="ignore"):
        np.subtract(x, ref64, out=diff, where=where)
    return np.abs(diff)


def _first_bad(
    name: str, what: str, where: np.ndarray, ok: np.ndarray, got: np.ndarray, ref64: np.ndarray
) -> str | None:
    """None when ``ok`` holds wherever ``where`` does, else a sentence naming the first miss."""
    bad = where & ~ok
    if not bad.any():
        return None
    at = tuple(int(i) for i in np.argwhere(bad)[0])
    return (
        f"{name}: not every entry {what}: {int(bad.sum())} of {bad.size} fail, first at "
        f"index {at} (got {got[at]:.8g}, ref64 {ref64[at]:.8g})"
    )


def _kept(p: np.ndarray, dropout_p: float, rng) -> np.ndarray | float:
    """Dropout's ``keep / (1 - dropout_p)`` for probabilities `p` ``(B, Hkv, G, Sq, Sk)``, in
    their dtype; 1.0 without dropout."""
    if not dropout_p:
        return 1.0
    b, hkv, g, sq, sk = p.shape
    return _dropout.scaled((b, hkv * g, sq, sk), dropout_p, rng, p.dtype).reshape(p.shape)


def _naive_probabilities(
    q: np.ndarray, k: np.ndarray, dtype: str, causal: bool, window, scale: float,
    softcap: float = 0.0, alibi_slopes=None, sinks=None, bias=None, mask=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | float, np.ndarray | None]:
    """Softmax ``(B, Hkv, G, Sq, Sk)``, lse ``(B, Hq, Sq)``, the softcap's slope
    ``d s' / d s = 1 - tanh^2`` (1.0 without one) and the sinks' probabilities
    ``(B, Hkv, G, Sq)`` (None without sinks) in the compute dtype; the mask is the oracle's
    (`cuflash.reference.visible`)."""
    sq, hkv, sk = q.shape[1], k.shape[2], k.shape[1]
    s = np.matmul(
        _grouped_q(round_to(q, dtype), hkv), _grouped_kv(round_to(k, dtype)).swapaxes(-1, -2)
    )
    s *= s.dtype.type(scale)
    slope = 1.0
    if softcap:
        tanh = np.tanh(s / s.dtype.type(softcap))
        s = s.dtype.type(softcap) * tanh
        slope = 1 - tanh * tanh
    if alibi_slopes is not None:
        b, hkv, g = s.shape[:3]
        slopes = np.broadcast_to(np.asarray(alibi_slopes, dtype=np.float64), (b, hkv * g))
        distance = _reference_mods.alibi_distance(sq, sk)  # the oracle's, as for the mask
        s = s - (slopes.reshape(b, hkv, g, 1, 1) * distance).astype(s.dtype)
    b, hkv, g = s.shape[:3]
    if bias is not None:
        full = np.broadcast_to(np.asarray(bias, dtype=np.float64), (b, hkv * g, sq, sk))
        s = s + full.reshape(b, hkv, g, sq, sk).astype(s.dtype)
    seen = reference.visible(sq, sk, causal=causal, window=window)
    if seen is not None:
        s[..., ~seen] = -np.inf
    if mask is not None:
        hidden = ~np.broadcast_to(np.asarray(mask, dtype=bool), (b, hkv * g, sq, sk))
        s = np.where(hidden.reshape(b, hkv, g, sq, sk), -np.inf, s)
    sink = None
    if sinks is not None:
        b, hkv, g = s.shape[:3]
        sink = np.broadcast_to(np.asarray(sinks, dtype=s.dtype).reshape(1, hkv, g, 1, 1),
                               (b, hkv, g, sq, 1))
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    if sink is not None:
        m = np.maximum(m, sink)
    m = np.where(np.isneginf(m), 0, m)  # a row that sees no key: keep exp(-inf - 0) = 0, not NaN
    e = np.exp(s - m)
    row_sum = e.sum(axis=-1, keepdims=True)
    p_sink = None
    if sink is not None:
        e_sink = np.exp(sink - m)
        row_sum = row_sum + e_sink
        p_sink = (e_sink / row_sum)[..., 0]
    p = np.divide(e, row_sum, out=np.zeros_like(e), where=row_sum > 0)
    with np.errstate(divide="ignore"):  # log(0) = -inf for rows that see no key
        lse = (m + np.log(row_sum))[..., 0]
    b, hkv, g, _ = lse.shape
    return p, lse.reshape(b, hkv * g, sq), slope, p_sink


def _grouped_q(x: np.ndarray, hkv: int) -> np.ndarray:
    """``(B, S, Hq, D)`` -> ``(B, Hkv, G, S, D)``."""
    b, s, hq, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, hkv, hq // hkv, s, d)


def _grouped_kv(x: np.ndarray) -> np.ndarray:
    """``(B, Sk, Hkv, D)`` -> ``(B, Hkv, 1, Sk, D)``."""
    return x.transpose(0, 2, 1, 3)[:, :, None]


def _ungrouped(x: np.ndarray) -> np.ndarray:
    """``(B, Hkv, G, S, D)`` -> ``(B, S, Hq, D)`` float64."""
    b, hkv, g, s, d = x.shape
    return x.reshape(b, hkv * g, s, d).swapaxes(1, 2).astype(np.float64)
