"""Hypothesis strategies and input builders shared by the CPU and GPU tests.

``problems()`` draws a :class:`Case` (sizes, dtype, mask, layout, rank and memory view);
``make_inputs(case, xp, seed)`` builds fresh random q, k, v for it with ``xp`` = numpy, cupy or
torch, in the case's own layout, rank and strides. ``to_bshd4`` brings any of them (or an output)
to the canonical ``(B, S, H, D)`` order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from hypothesis import strategies as st

from tests.accuracy import round_to


def examples(default: int) -> int:
    """Hypothesis examples for a property suite: `default`, or ``CUFLASH_FUZZ_EXAMPLES`` where
    it is set (a long fuzz run: ``CUFLASH_FUZZ_EXAMPLES=2000 pytest tests/test_gpu_*.py``)."""
    text = os.environ.get("CUFLASH_FUZZ_EXAMPLES")
    if not text:
        return default
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"CUFLASH_FUZZ_EXAMPLES: expected a positive integer, got {text!r}")
    return count


LAYOUTS = ("bshd", "bhsd")
VIEWS = ("contiguous", "qkv_packed", "transposed")
SHORT_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}

# Sequence lengths that tend to break tiled code: empty, single, primes, and one either side of the
# GPU kernels' tile sizes.
TILES = (64, 128)
AWKWARD_SEQLENS = tuple(
    sorted({0, 1, 2, 3, 5, 7, 13, 31, 97, 251} | {t + o for t in TILES for o in (-1, 0, 1)})
)
AWKWARD_HEAD_DIMS = (1, 7, 32, 63, 64, 80, 96, 127, 128, 160, 192, 255, 256)


@dataclass(frozen=True)
class Case:
    """One attention problem: sizes, dtype name, mask, layout, rank and how q, k, v are stored.

    ``view`` is "contiguous", "qkv_packed" (q, k, v are slices of one packed ``(B, S, 3, H, D)``
    array; needs ``seqlen_q == seqlen_k``, ``heads_q == heads_kv`` and one head dim) or
    "transposed" (the leading axes stored in reverse order: non-contiguous, unit-stride last axis).
    ``head_dim_v`` is v's head dim (Dv; None: ``head_dim``), which out and dout have too.
    """

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str = "float32"
    causal: bool = False
    window: tuple[int, int] | None = None  # sliding window (left, right), -1 unbounded
    softcap: float = 0.0  # logit soft-capping, 0 off
    layout: str = "bshd"
    three_d: bool = False  # no batch axis; batch is then 1
    view: str = "contiguous"
    head_dim_v: int | None = None  # v's head dim (Dv); None: head_dim

    def __post_init__(self) -> None:
        if self.heads_q % self.heads_kv:
            raise ValueError(
                f"heads_q {self.heads_q} is not a multiple of heads_kv {self.heads_kv}"
            )
        if self.three_d and self.batch != 1:
            raise ValueError("a 3-D case has batch 1")
        packable = (self.seqlen_q == self.seqlen_k and self.heads_q == self.heads_kv
                    and self.dim_v == self.head_dim)
        if self.view == "qkv_packed" and not packable:
            raise ValueError("qkv_packed needs seqlen_q == seqlen_k, heads_q == heads_kv and "
                             "head_dim_v == head_dim")

    @property
    def id(self) -> str:
        """Readable test id, e.g. ``B2-Sq63-Sk65-H4/2-D60-bf16-causal-bhsd``."""
        parts = [
            "3d" if self.three_d else f"B{self.batch}",
            f"Sq{self.seqlen_q}",
            f"Sk{self.seqlen_k}",
            f"H{self.heads_q}/{self.heads_kv}",
            f"D{self.head_dim}" + ("" if self.dim_v == self.head_dim else f"v{self.dim_v}"),
            SHORT_DTYPE[self.dtype],
        ]
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append("w{}:{}".format(*self.window))
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        parts.append(self.layout)
        if self.view != "contiguous":
            parts.append({"qkv_packed": "packed", "transposed": "strided"}[self.view])
        return "-".join(parts)

    @property
    def mask(self) -> dict[str, Any]:
        """The mask and score options as `cuflash.attention` and the reference take them."""
        return {"causal": self.causal, "window": self.window, "softcap": self.softcap}

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def dim_v(self) -> int:
        """v's head dim (Dv)."""
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    @property
    def q_shape(self) -> tuple[int, ...]:
        return self._shape(self.seqlen_q, self.heads_q)

    @property
    def kv_shape(self) -> tuple[int, ...]:
        """k's shape (and v's when Dv == D)."""
        return self._shape(self.seqlen_k, self.heads_kv)

    @property
    def v_shape(self) -> tuple[int, ...]:
        return self._shape(self.seqlen_k, self.heads_kv, self.dim_v)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """out's and dout's: q's with v's head dim."""
        return self._shape(self.seqlen_q, self.heads_q, self.dim_v)

    def _shape(self, s: int, h: int, d: int | None = None) -> tuple[int, ...]:
        inner = (s, h) if self.layout == "bshd" else (h, s)
        d = self.head_dim if d is None else d
        return (*inner, d) if self.three_d else (self.batch, *inner, d)


def _mixed(awkward: tuple[int, ...], low: int, high: int) -> st.SearchStrategy[int]:
    """Half awkward values in ``[low, high]``, half uniform."""
    return st.one_of(
        st.sampled_from([x for x in awkward if low <= x <= high]), st.integers(low, high)
    )


@st.composite
def problems(
    draw: st.DrawFn,
    *,
    dtypes: tuple[str, ...] = ("float32",),
    max_batch: int = 3,
    max_heads_kv: int = 3,
    max_group: int = 4,
    max_seqlen: int = 300,
    max_head_dim: int = 256,
    causal: bool | None = None,
    layouts: tuple[str, ...] = LAYOUTS,
    views: tuple[str, ...] = VIEWS,
    allow_3d: bool = True,
    windows: bool = False,
    softcaps: bool = False,
    value_dims: bool = False,
) -> Case:
    """Draw a :class:`Case`; the keyword arguments bound it (``causal=None`` draws both).
    With `windows`, about half the cases get a sliding window (`window_sides`); with `softcaps`,
    about half get a logit softcap (`SOFTCAPS`); with `value_dims`, about half of those not
    packed get v a head dim of its own (1..max_head_dim, drawn like the head dim)."""
    view = draw(st.sampled_from(views))
    three_d = allow_3d and draw(st.booleans())
    batch = 1 if three_d else draw(st.integers(1, max_batch))
    heads_kv = draw(st.integers(1, max_heads_kv))
    seqlen_q = draw(_mixed(AWKWARD_SEQLENS, 0, max_seqlen))
    if view == "qkv_packed":  # one packed tensor: same length and head count for q, k, v
        group, seqlen_k = 1, seqlen_q
    else:
        group = draw(st.integers(1, max_group))
        seqlen_k = draw(_mixed(AWKWARD_SEQLENS, 0, max_seqlen))
    head_dim_v = None
    if value_dims and view != "qkv_packed" and draw(st.booleans()):
        head_dim_v = draw(_mixed(AWKWARD_HEAD_DIMS, 1, max_head_dim))
    return Case(
        batch=batch,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        heads_q=heads_kv * group,
        heads_kv=heads_kv,
        head_dim=draw(_mixed(AWKWARD_HEAD_DIMS, 1, max_head_dim)),
        dtype=draw(st.sampled_from(dtypes)),
        causal=draw(st.booleans()) if causal is None else causal,
        window=draw(st.one_of(st.none(), window_sides(max_seqlen))) if windows else None,
        softcap=draw(st.sampled_from((0.0,) * len(SOFTCAPS) + SOFTCAPS)) if softcaps else 0.0,
        layout=draw(st.sampled_from(layouts)),
        three_d=three_d,
        view=view,
        head_dim_v=head_dim_v,
    )


# Logit softcaps: tight enough to bend most scores (0.5), Gemma's 30 and 50, and between.
SOFTCAPS = (0.5, 2.0, 30.0, 50.0)


# Fixed masks for the tile-edge tests: none, causal, and windows cut on one or both sides, wide
# and narrower than a tile (so tiles are cut by the left edge, the diagonal, or both); two with
# a softcap.
MASKS = (
    {"causal": False},
    {"causal": True},
    {"causal": False, "window": (37, 0)},
    {"causal": False, "window": (100, 20)},
    {"causal": False, "window": (-1, 70)},
    {"causal": True, "window": (200, 9)},
    {"causal": True, "softcap": 2.0},
    {"causal": False, "window": (100, 20), "softcap": 0.5},
)
MASK_IDS = ("none", "causal", "w37:0", "w100:20", "w-1:70", "causal-w200", "causal-cap2",
            "w100:20-cap0.5")


def window_sides(max_seqlen: int) -> st.SearchStrategy[tuple[int, int]]:
    """(left, right) pairs: unbounded (-1), 0, small, around a tile, and beyond any sequence
    (so rows may see nothing, or everything)."""
    side = st.one_of(st.sampled_from((-1, 0, 1, 63, 64, 65, 127, 128, 2 * max_seqlen + 5)),
                     st.integers(-1, max_seqlen))
    return st.tuples(side, side)


def seeds() -> st.SearchStrategy[int]:
    """Seeds for :func:`make_inputs`: fresh random values for every example."""
    return st.integers(0, 2**32 - 1)


def make_inputs(case: Case, xp: ModuleType, seed: int) -> tuple[Any, Any, Any]:
    """Fresh standard-normal q, k, v for ``case`` as ``xp`` arrays (numpy, cupy or torch).

    They have the case's layout, rank, dtype and memory view. Values are drawn in NumPy, so one
    seed gives the same numbers whatever ``xp`` is.
    """
    rng = np.random.default_rng(seed)
    if case.view == "qkv_packed":
        # (B, S, 3, H, D): q, k, v interleaved per token, as a fused qkv projection writes them.
        packed = _to_xp(
            rng.standard_normal(_bshd_shape(case, case.seqlen_q, case.heads_q, 3)), xp, case.dtype
        )
        q, k, v = (packed[..., i, :, :] for i in range(3))
        if case.layout == "bhsd":
            q, k, v = (xp.moveaxis(x, -3, -2) for x in (q, k, v))
        return q, k, v
    q = _array(case.q_shape, case, xp, rng)
    k = _array(case.kv_shape, case, xp, rng)
    v = _array(case.v_shape, case, xp, rng)
    return q, k, v


def make_dout(case: Case, xp: ModuleType, seed: int) -> Any:
    """A fresh standard-normal, contiguous incoming gradient of out's shape (q's, with v's head
    dim)."""
    rng = np.random.default_rng((seed, 1))  # a different stream from make_inputs' for one seed
    return _to_xp(rng.standard_normal(case.out_shape), xp, case.dtype)


def to_bshd4(x: Any, case: Case) -> Any:
    """An array of q's, k's, v's or out's layout and rank in ``case`` as a 4-D ``(B, S, H, D)``
    view."""
    if case.three_d:
        x = x[None]
    return x.swapaxes(1, 2) if case.layout == "bhsd" else x


def _array(shape: tuple[int, ...], case: Case, xp: ModuleType, rng: np.random.Generator) -> Any:
    if case.view == "contiguous":
        return _to_xp(rng.standard_normal(shape), xp, case.dtype)
    # "transposed": store the leading axes in reverse order, then view them back.
    lead = len(shape) - 1
    base = _to_xp(rng.standard_normal((*shape[-2::-1], shape[-1])), xp, case.dtype)
    return xp.moveaxis(base, tuple(range(lead)), tuple(reversed(range(lead))))


def _bshd_shape(case: Case, s: int, h: int, packed: int) -> tuple[int, ...]:
    inner = (s, packed, h, case.head_dim)
    return inner if case.three_d else (case.batch, *inner)


def _to_xp(x64: np.ndarray, xp: ModuleType, dtype: str) -> Any:
    """float64 NumPy values -> an ``xp`` array of ``dtype`` (values first rounded to it)."""
    values = round_to(x64, dtype)
    if dtype != "bfloat16":
        return xp.asarray(values.astype(dtype))
    if xp.__name__ == "numpy":
        import ml_dtypes  # NumPy's bfloat16 comes from ml_dtypes (a JAX dependency)

        return values.astype(ml_dtypes.bfloat16)
    if not hasattr(xp, "bfloat16"):
        raise TypeError(f"{xp.__name__} has no bfloat16 arrays; build bfloat16 inputs with torch")
    return xp.asarray(values, dtype=xp.bfloat16)
