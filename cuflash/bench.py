"""Benchmarks: ``python -m cuflash bench`` (see ``--help``).

Sweeps attention problems in the FlashAttention convention (``B*S`` tokens and ``Hq*D`` fixed, so
every cell does the same work per token) and times, in one process and on the same inputs:

- ``cuflash``: :func:`cuflash.attention` / :func:`cuflash.attention_backward` (on torch CUDA
  tensors when torch is present, else CuPy arrays; on NumPy arrays for the CPU path);
- PyTorch SDPA with one backend forced at a time (``sdpa-flash``, ``sdpa-cudnn``,
  ``sdpa-efficient``, ``sdpa-math``), each where it exists and accepts the problem;
- standard attention (``cupy-standard`` / ``numpy-standard``): matmul, softmax, matmul with the
  S x S matrices in memory, and its textbook backward.

Timing: CUDA events around each call, after warm-up (compile, autotune, first touch), median of up
to ``--max-reps`` calls or about ``--min-time-ms``; input sets are rotated where they are small
enough that the L2 cache would otherwise serve them. The implementations of a case take turns in
rounds, in an order rotated each round, since a GPU at its power cap clocks by what ran before.
Each cell's cuflash / best-peer ratio comes with a 95% bootstrap interval from the two
implementations' timed calls; a cell whose interval holds 1 is reported as level, not as a win
or a loss.
Also measured: workspace memory vs S (peak minus inputs and outputs, until each implementation
runs out of memory) and cuflash's cold-cache compile time per kernel (a subprocess with an empty
``CUPY_CACHE_DIR``).

Writes ``bench.json`` (every figure and the environment), PNG plots and ``performance_table.md``
(for docs/performance.md) to ``--out``, then prints a short table. Without a CUDA GPU it
benchmarks the CPU path against NumPy standard attention at small sizes, and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import cuflash

SCHEMA = "cuflash-bench/1"
PASSES = ("fwd", "bwd", "fwd+bwd")

# ---- FLOPs -----------------------------------------------------------------------------------

# Backward = 2.5 forwards (FlashAttention papers: 2 matmuls forward, 5 backward); fwd+bwd = 3.5.
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
FLOP_FORMULA = "fwd = 4*B*Hq*Sq*Sk*D (x0.5 causal); bwd = 2.5*fwd; fwd+bwd = 3.5*fwd"


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, *,
                    causal: bool, pass_: str = "fwd") -> float:
    """FLOPs of one attention pass as the FlashAttention papers count them.

    Forward: two matmuls of ``2*Sq*Sk*D`` per head, ``4*B*Hq*Sq*Sk*D``, halved when causal
    (half the score matrix is masked). Backward: 2.5x the forward; forward plus backward: 3.5x.
    """
    forward = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        forward *= 0.5
    return forward * PASS_FLOP_FACTOR[pass_]


# ---- configuration ---------------------------------------------------------------------------

DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                 "fp64": "float64", "bfloat16": "bfloat16", "float16": "float16",
                 "float32": "float32", "float64": "float64"}
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
CPU_DTYPES = ("float16", "float32", "float64")

CUFLASH = "cuflash"
SDPA_BACKENDS = {  # our name -> torch.nn.attention.SDPBackend member
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-math": "MATH",
}
IMPLS = (CUFLASH, *SDPA_BACKENDS, "cupy-standard", "numpy-standard")
IMPL_ALIASES = {"flash": "sdpa-flash", "cudnn": "sdpa-cudnn", "efficient": "sdpa-efficient",
                "math": "sdpa-math", "standard": "standard"}

# Timing: at least MIN_REPS timed calls in ROUNDS rounds of rotated turns; at most MAX_INPUT_SETS
# rotated input sets.
MIN_REPS = 3
ROUNDS = 4
MAX_INPUT_SETS = 8
# Implementations that hold the S x S matrices are skipped in the timing sweep where those would
# need more than this (or half the device); the memory sweep lets them run into the device limit.
TIMING_MEMORY_LIMIT = 40e9
# Stands in for the CPU's last-level cache when deciding how many input sets to rotate.
CPU_CACHE_BYTES = 32 * 2**20
COMPILE_TIMEOUT_S = 1800

KIB, MIB, GIB = 2**10, 2**20, 2**30


@dataclass(frozen=True)
class MemoryConfig:
    """The memory sweep: workspace vs S at one problem shape."""

    seqlens: tuple[int, ...]
    batch: int
    heads: int
    head_dim: int
    dtype: str
    passes: tuple[str, ...]
    causal: bool = True


@dataclass(frozen=True)
class Config:
    """Everything one run measures (the presets, overridden by explicit flags)."""

    seqlens: tuple[int, ...]
    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]
    causal: tuple[bool, ...]
    passes: tuple[str, ...]
    tokens: int  # B*S
    model_dim: int  # Hq*D
    impls: tuple[str, ...] | None  # None: every implementation available here
    memory: MemoryConfig | None
    compile: bool
    min_time_ms: float
    max_reps: int
    seed: int
    quick: bool
    out: Path


# Presets per (device, --quick). The GPU sweep follows docs/performance.md's convention; the CPU
# one is small because the NumPy path runs at GFLOP/s.
_PRESETS = {
    ("cuda", False): dict(seqlens=(512, 1024, 2048, 4096, 8192, 16384), head_dims=(64, 128, 256),
                          dtypes=("bfloat16", "float16"), passes=PASSES, tokens=16384,
                          model_dim=2048),
    ("cuda", True): dict(seqlens=(1024, 4096, 16384), head_dims=(64, 128, 256),
                         dtypes=("bfloat16",), passes=("fwd",), tokens=16384, model_dim=2048),
    ("cpu", False): dict(seqlens=(256, 512, 1024, 2048), head_dims=(64, 128),
                         dtypes=("float32",), passes=PASSES, tokens=1024, model_dim=128),
    ("cpu", True): dict(seqlens=(128, 256), head_dims=(32,), dtypes=("float32",),
                        passes=("fwd",), tokens=256, model_dim=64),
}
# Memory sweep shapes: B=1, causal; on the GPU H=16, D=128, bf16, S up to 128k.
_MEMORY_PRESETS = {
    ("cuda", False): dict(seqlens=tuple(2**i for i in range(10, 18)), heads=16, head_dim=128,
                          dtype="bfloat16"),
    ("cuda", True): dict(seqlens=tuple(2**i for i in range(10, 18)), heads=16, head_dim=128,
                         dtype="bfloat16"),
    ("cpu", False): dict(seqlens=(256, 512, 1024, 2048, 4096), heads=2, head_dim=64,
                         dtype="float32"),
    ("cpu", True): dict(seqlens=(256, 512, 1024, 2048), heads=2, head_dim=32, dtype="float32"),
}


@dataclass(frozen=True)
class Case:
    """One measured problem: B x S tokens, Hq = Hkv heads of width D, Sq = Sk = S."""

    dtype: str
    pass_: str
    head_dim: int
    causal: bool
    seqlen: int
    batch: int
    heads: int

    @property
    def flops(self) -> float:
        return attention_flops(self.batch, self.heads, self.seqlen, self.seqlen, self.head_dim,
                               causal=self.causal, pass_=self.pass_)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, S, H, D): every input is allocated in cuflash's default layout "bshd"."""
        return (self.batch, self.seqlen, self.heads, self.head_dim)

    @property
    def scores(self) -> int:
        """Elements of the B x H x S x S score matrix standard attention materialises."""
        return self.batch * self.heads * self.seqlen * self.seqlen

    @property
    def label(self) -> str:
        mask = "causal" if self.causal else "full"
        return (f"{self.pass_} {SHORT_DTYPE[self.dtype]} D{self.head_dim} {mask} "
                f"S{fmt_seqlen(self.seqlen)}")

    def record(self) -> dict:
        """The fields every JSON row about this case starts with."""
        return {"dtype": self.dtype, "pass": self.pass_, "head_dim": self.head_dim,
                "causal": self.causal, "seqlen": self.seqlen, "batch": self.batch,
                "heads": self.heads, "flops": self.flops}


def fmt_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_seqlen(seqlen: int) -> str:
    """512 -> "512", 16384 -> "16k"."""
    return f"{seqlen // 1024}k" if seqlen >= 1024 and seqlen % 1024 == 0 else str(seqlen)


def parse_seqlen(text: str) -> int:
    """ "512" -> 512, "16k" -> 16384."""
    text = text.strip().lower()
    value = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    if value < 1:
        raise ValueError(f"sequence length must be >= 1, got {text!r}")
    return value


def sweep_cases(config: Config) -> list[Case]:
    """The timing sweep's cases, in the order they run (and the tables list them)."""
    cases = []
    for dtype in config.dtypes:
        for pass_ in config.passes:
            for head_dim in config.head_dims:
                for causal in config.causal:
                    for seqlen in config.seqlens:
                        cases.append(Case(dtype, pass_, head_dim, causal, seqlen,
                                          batch=max(1, config.tokens // seqlen),
                                          heads=config.model_dim // head_dim))
    return cases


# ---- command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cuflash bench",
        description="Time cuflash against PyTorch SDPA's backends and standard attention "
                    "(TFLOP/s, " + FLOP_FORMULA + "), measure workspace memory vs S and "
                    "cold-cache compile time; write JSON, PNG plots and a Markdown table.",
    )
    parser.add_argument("--overhead", action="store_true",
                        help="time the host path of one small call per framework against SDPA "
                             "instead (see python -m cuflash bench --overhead --help)")
    parser.add_argument("--quick", action="store_true",
                        help="preset of ~2 minutes on an H100: S 1k/4k/16k, D 64/128/256, bf16, "
                             "fwd, causal and not (CPU: a few seconds at tiny sizes)")
    parser.add_argument("--seqlens", type=_list_of(parse_seqlen),
                        help="comma list, e.g. 512,1k,16k (default 512..16k; CPU 256..2048)")
    parser.add_argument("--head-dims", type=_list_of(int), help="comma list (default 64,128,256)")
    parser.add_argument("--dtypes", type=_list_of(_dtype),
                        help="comma list of bf16, fp16, fp32, fp64 (default bf16,fp16; CPU fp32)")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both",
                        help="causal mask, no mask, or both (default)")
    parser.add_argument("--passes", type=_passes,
                        help="comma list of fwd, bwd, fwd+bwd, or 'all' (default all)")
    parser.add_argument("--impls", type=_list_of(_impl),
                        help="comma list of " + ", ".join(IMPLS) + " (short: flash, cudnn, "
                             "efficient, math, standard; default every one available)")
    parser.add_argument("--tokens", type=int, help="B*S (default 16384; CPU 1024)")
    parser.add_argument("--model-dim", type=int, help="Hq*D (default 2048; CPU 128)")
    parser.add_argument("--memory-seqlens", type=_list_of(parse_seqlen),
                        help="S of the memory sweep (default 1k..128k; CPU 256..4k)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory sweep")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the cold-cache compile measurement")
    parser.add_argument("--min-time-ms", type=float, default=100.0,
                        help="time each cell for about this long (default 100)")
    parser.add_argument("--max-reps", type=int, default=30,
                        help="at most this many timed calls per cell (default 30)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="default: CUDA when a GPU is usable, else the CPU path")
    parser.add_argument("--framework", choices=("auto", "torch", "cupy"), default="auto",
                        help="GPU arrays cuflash runs on (default torch when it sees the GPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--out", type=Path, default=Path("bench-out"),
                        help="output directory (default bench-out/)")
    return parser


def _list_of(item: Callable[[str], object]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        values = tuple(item(part) for part in text.split(",") if part.strip())
        if not values:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return values

    return parse


def _dtype(text: str) -> str:
    try:
        return DTYPE_ALIASES[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; expected one of "
                                         "bf16, fp16, fp32, fp64") from None


def _passes(text: str) -> tuple[str, ...]:
    if text.strip() == "all":
        return PASSES
    passes = tuple(part.strip() for part in text.split(","))
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown pass {unknown[0]!r}; expected fwd, bwd, "
                                         "fwd+bwd or all")
    return passes


def _impl(text: str) -> str:
    name = IMPL_ALIASES.get(text.strip(), text.strip())
    if name not in (*IMPLS, "standard"):
        raise argparse.ArgumentTypeError(f"unknown implementation {text!r}; expected one of "
                                         + ", ".join(IMPLS))
    return name


def make_config(args: argparse.Namespace, mode: str) -> Config:
    """The preset for `mode` and --quick, with every explicit flag taking precedence."""
    preset = _PRESETS[(mode, args.quick)]

    def pick(name: str):
        value = getattr(args, name)
        return preset[name] if value is None else value

    dtypes = pick("dtypes")
    if mode == "cpu":
        dropped = [d for d in dtypes if d not in CPU_DTYPES]
        dtypes = tuple(d for d in dtypes if d in CPU_DTYPES) or ("float32",)
        if dropped:
            print(f"note: the CPU path has no {', '.join(dropped)}; benchmarking "
                  f"{', '.join(dtypes)}")
    head_dims, model_dim = pick("head_dims"), pick("model_dim")
    for d in head_dims:
        if not 1 <= d <= 256 or model_dim % d:
            raise ValueError(f"head dim {d} must be in 1..256 and divide the model dim "
                             f"Hq*D = {model_dim} (--model-dim)")
    passes = pick("passes")
    memory = None
    if not args.no_memory:
        m = _MEMORY_PRESETS[(mode, args.quick)]
        # The memory sweep measures inference, and training as well where backward is swept.
        memory_passes = ("fwd", "fwd+bwd") if set(passes) - {"fwd"} else ("fwd",)
        memory = MemoryConfig(seqlens=args.memory_seqlens or m["seqlens"], batch=1,
                              heads=m["heads"], head_dim=m["head_dim"], dtype=m["dtype"],
                              passes=memory_passes)
    return Config(
        seqlens=pick("seqlens"), head_dims=head_dims, dtypes=dtypes,
        causal={"both": (False, True), "yes": (True,), "no": (False,)}[args.causal],
        passes=passes, tokens=pick("tokens"), model_dim=model_dim, impls=args.impls,
        memory=memory, compile=not args.no_compile and mode == "cuda",
        min_time_ms=args.min_time_ms, max_reps=max(MIN_REPS, args.max_reps), seed=args.seed,
        quick=args.quick, out=args.out,
    )


# ---- implementations -------------------------------------------------------------------------


@dataclass
class Inputs:
    """One set of random inputs, ``(B, S, H, D)`` in the sweep's framework."""

    q: object
    k: object
    v: object
    dout: object

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in (self.q, self.k, self.v, self.dout))


class Impl:
    """An attention implementation: ``prepare`` does the untimed setup of one input set and
    returns the call to time, which returns the arrays it produced."""

    name = ""
    peer = True  # compared against cuflash; its failures are "n/a", not errors

    def context(self):
        return contextlib.nullcontext()

    def skip_reason(self, case: Case, limit_bytes: float) -> str | None:
        return None

    def prepare(self, case: Case, x: Inputs) -> Callable[[], tuple]:
        raise NotImplementedError

    def explain(self, err: BaseException) -> str:
        return _describe(err)


class Cuflash(Impl):
    """cuflash's public API on the caller's arrays (bwd: `attention_backward` from a saved
    forward; fwd+bwd: both, the lse kept between them counting as workspace)."""

    name = CUFLASH
    peer = False

    def prepare(self, case: Case, x: Inputs) -> Callable[[], tuple]:
        q, k, v, dout, causal = x.q, x.k, x.v, x.dout, case.causal
        if case.pass_ == "fwd":
            return lambda: (cuflash.attention(q, k, v, causal=causal),)
        if case.pass_ == "bwd":
            out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
            return lambda: cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal)

        def forward_backward():
            out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
            return (out, *cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal))

        return forward_backward


class Sdpa(Impl):
    """``torch.nn.functional.scaled_dot_product_attention`` with one backend forced.

    Inputs are the same (B, S, H, D) tensors, viewed as (B, H, S, D) (no copy: the layout the
    flash backend itself prefers). Backward goes through autograd, as in training.
    """

    def __init__(self, name: str, torch_module):
        self.name = name
        self.torch = torch_module
        from torch.nn.attention import SDPBackend

        self.backend = getattr(SDPBackend, SDPA_BACKENDS[name], None)
        self.warnings: list[str] = []

    @contextlib.contextmanager
    def context(self):
        from torch.nn.attention import sdpa_kernel

        if self.backend is None:
            raise NotImplementedError(f"torch {self.torch.__version__} has no SDPBackend."
                                      f"{SDPA_BACKENDS[self.name]}")
        # SDPA explains why a backend refuses a problem in warnings, then raises "No available
        # kernel"; keep them for the n/a note.
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel(self.backend):
            warnings.simplefilter("always")
            try:
                yield
            finally:
                self.warnings = [str(w.message) for w in caught]

    def skip_reason(self, case: Case, limit_bytes: float) -> str | None:
        if self.name != "sdpa-math":
            return None
        # The math backend materialises (at least) the fp32 B x H x S x S scores.
        return _too_big(case.scores * 4, limit_bytes)

    def prepare(self, case: Case, x: Inputs) -> Callable[[], tuple]:
        torch, sdpa = self.torch, self.torch.nn.functional.scaled_dot_product_attention
        q, k, v, dout = (t.transpose(1, 2) for t in (x.q, x.k, x.v, x.dout))
        causal = case.causal
        if case.pass_ == "fwd":
            return lambda: (sdpa(q, k, v, is_causal=causal),)
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        if case.pass_ == "bwd":
            out = sdpa(qg, kg, vg, is_causal=causal)
            return lambda: torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)

        def forward_backward():
            out = sdpa(qg, kg, vg, is_causal=causal)
            return (out, *torch.autograd.grad(out, (qg, kg, vg), dout))

        return forward_backward

    def explain(self, err: BaseException) -> str:
        reasons = dict.fromkeys(_first_line(w).split(" (Triggered internally")[0]
                                for w in self.warnings)
        text = _describe(err)
        return f"{'; '.join(reasons)} ({text})"[:400] if reasons else text


class Standard(Impl):
    """Textbook attention with the S x S matrices in memory (NumPy or CuPy): scores by matmul in
    the input dtype, softmax in float32 (float64 for float64), probabilities back to the input
    dtype, matmul with v; backward from the stored probabilities. The causal mask (an additive
    S x S bias) is built in the untimed setup."""

    def __init__(self, name: str, xp, to_xp: Callable):
        self.name, self.xp, self.to_xp = name, xp, to_xp

    def skip_reason(self, case: Case, limit_bytes: float) -> str | None:
        return _too_big(self.bytes_needed(case), limit_bytes)

    def bytes_needed(self, case: Case) -> float:
        item = np.dtype("float64" if case.dtype == "float64" else "float32").itemsize
        low = 2 if case.dtype in ("bfloat16", "float16") else item
        per_score = low + item + low  # scores, softmax in the accumulate dtype, probabilities
        if case.pass_ != "fwd":
            per_score += 2 * item  # dP and dS
        bias = case.seqlen**2 * item if case.causal else 0
        return case.scores * per_score + bias

    def prepare(self, case: Case, x: Inputs) -> Callable[[], tuple]:
        xp = self.xp
        q, k, v, dout = (xp.ascontiguousarray(self.to_xp(t).transpose(0, 2, 1, 3))
                         for t in (x.q, x.k, x.v, x.dout))  # (B, H, S, D)
        scale = 1.0 / math.sqrt(case.head_dim)
        bias = None
        if case.causal:  # -inf above the diagonal
            acc = _accumulate_dtype(xp, q.dtype)
            bias = xp.triu(xp.full((case.seqlen, case.seqlen), -xp.inf, dtype=acc), 1)
        if case.pass_ == "fwd":
            return lambda: (standard_forward(xp, q, k, v, scale, bias)[0],)
        if case.pass_ == "bwd":
            out, p = standard_forward(xp, q, k, v, scale, bias)
            return lambda: standard_backward(xp, dout, q, k, v, out, p, scale)

        def forward_backward():
            out, p = standard_forward(xp, q, k, v, scale, bias)
            return (out, *standard_backward(xp, dout, q, k, v, out, p, scale))

        return forward_backward


def _accumulate_dtype(xp, dtype):
    return xp.float64 if dtype == xp.float64 else xp.float32


def standard_forward(xp, q, k, v, scale: float, bias):
    """softmax(scale * q k^T + bias) v on (B, H, S, D) arrays; returns (out, probabilities)."""
    acc = _accumulate_dtype(xp, q.dtype)
    # -- scores in the input dtype, softmax in the accumulate dtype --
    s = xp.matmul(q, k.swapaxes(-1, -2)).astype(acc, copy=False)
    s *= scale
    if bias is not None:
        s += bias
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    p = s.astype(q.dtype, copy=False)
    return xp.matmul(p, v), p


def standard_backward(xp, dout, q, k, v, out, p, scale: float):
    """dq, dk, dv of `standard_forward` from its probabilities `p` (masked entries are 0)."""
    acc = _accumulate_dtype(xp, q.dtype)
    dv = xp.matmul(p.swapaxes(-1, -2), dout)
    # -- dS = P * (dP - rowsum(dO * O)) --
    ds = xp.matmul(dout, v.swapaxes(-1, -2)).astype(acc, copy=False)
    ds -= (dout.astype(acc) * out.astype(acc)).sum(axis=-1, keepdims=True)
    ds *= p
    ds *= scale
    ds = ds.astype(q.dtype, copy=False)
    return xp.matmul(ds, k), xp.matmul(ds.swapaxes(-1, -2), q), dv


def _too_big(needed: float, limit_bytes: float) -> str | None:
    if needed <= limit_bytes:
        return None
    return (f"needs ~{needed / GIB:.0f} GiB for the S x S matrices "
            f"(limit {limit_bytes / GIB:.0f} GiB)")


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {_first_line(str(err))}"[:300]


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


# ---- devices ---------------------------------------------------------------------------------


class Gpu:
    """A CUDA device seen through CuPy, with torch or CuPy as the array framework."""

    mode = "cuda"
    unit, unit_scale = "TFLOP/s", 1.0
    timer = "CUDA events"

    def __init__(self, framework: str):
        import cupy

        self.cupy = cupy
        self.framework = framework
        self.device_id = cupy.cuda.Device().id
        props = cupy.cuda.runtime.getDeviceProperties(self.device_id)
        name = props["name"]
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.props = props
        self.cache_bytes = int(props.get("l2CacheSize", 50 * MIB))
        self.capacity = int(props["totalGlobalMem"])
        self.torch = None
        if framework == "torch":
            import torch

            self.torch = torch

    def scope(self):
        """This device, and CuPy's current stream made torch's (as cuflash does for torch
        tensors), so that CuPy events time SDPA, cuflash and CuPy work alike."""
        from cuflash import _interop

        return _interop.stream_scope(_interop.Source(self.framework, "cuda", self.device_id))

    def implementations(self) -> list[Impl]:
        impls: list[Impl] = [Cuflash()]
        if self.torch is not None:
            impls += [Sdpa(name, self.torch) for name in SDPA_BACKENDS]
        impls.append(Standard("cupy-standard", self.cupy, self._to_cupy))
        return impls

    def _to_cupy(self, x):
        return x if self.torch is None else self.cupy.from_dlpack(x)

    def inputs(self, case: Case, count: int, seed: int) -> list[Inputs]:
        """`count` sets of fresh standard-normal q, k, v, dout."""
        if self.torch is not None:
            torch = self.torch
            device = f"cuda:{self.device_id}"
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
            dtype = getattr(torch, case.dtype)

            def rand():
                return torch.randn(case.shape, generator=generator, dtype=dtype, device=device)
        else:
            rng = self.cupy.random.default_rng(seed)
            normal = "float64" if case.dtype == "float64" else "float32"
            dtype = _numpy_dtype(case.dtype)

            def rand():
                return rng.standard_normal(case.shape, dtype=normal).astype(dtype)

        return [Inputs(rand(), rand(), rand(), rand()) for _ in range(count)]

    def synchronize(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()

    def elapsed_ms(self, calls: list[Callable]) -> list[float]:
        """Milliseconds of each call, from CUDA events around it; one synchronisation at the end."""
        event = self.cupy.cuda.Event
        events = [(event(), event()) for _ in calls]
        for call, (start, end) in zip(calls, events, strict=True):
            start.record()
            call()
            end.record()
        events[-1][1].synchronize()
        return [self.cupy.cuda.get_elapsed_time(start, end) for start, end in events]

    def release(self, collect: bool = False) -> None:
        """Hand cached blocks back to the driver so the next implementation has the device
        (after a failure, `collect` first frees what the exception's frames held)."""
        if collect:
            gc.collect()
        if self.torch is not None:
            self.torch.cuda.empty_cache()
        self.cupy.get_default_memory_pool().free_all_blocks()

    def workspace(self, call: Callable[[], tuple]) -> tuple[int, int]:
        """(peak bytes above the baseline minus the outputs, output bytes) of one call.

        torch's allocator reports its own peak; CuPy's pool is watched by a memory hook. The two
        peaks are added (an upper bound where they happen at different moments).
        """
        self.synchronize()
        self.release()
        hook = _pool_peak_hook()
        torch = self.torch
        if torch is not None:
            torch.cuda.reset_peak_memory_stats(self.device_id)
            base = torch.cuda.memory_allocated(self.device_id)
        with hook:
            outputs = call()
            self.synchronize()
        torch_peak = 0 if torch is None else torch.cuda.max_memory_allocated(self.device_id) - base
        output_bytes = sum(int(x.nbytes) for x in outputs)
        return torch_peak + hook.peak - output_bytes, output_bytes

    def describe(self) -> str:
        return f"{self.name} ({self.framework} arrays)"

    def environment(self) -> dict:
        cupy, props = self.cupy, self.props
        env = {
            "device": "cuda",
            "gpu": self.name,
            "compute_capability": f"{props['major']}.{props['minor']}",
            "sm_count": int(props["multiProcessorCount"]),
            "memory_bytes": self.capacity,
            "l2_bytes": self.cache_bytes,
            "driver": _guard(lambda: _cuda_version(cupy.cuda.runtime.driverGetVersion())),
            "cuda_runtime": _guard(lambda: _cuda_version(cupy.cuda.runtime.runtimeGetVersion())),
            "framework": self.framework,
        }
        if self.torch is not None:
            env["cudnn"] = _guard(lambda: str(self.torch.backends.cudnn.version()))
        return env


class Cpu:
    """The CPU path: NumPy arrays, wall-clock timing, tracemalloc for memory."""

    mode = "cpu"
    unit, unit_scale = "GFLOP/s", 1e3
    timer = "wall clock"
    framework = "numpy"
    cache_bytes = CPU_CACHE_BYTES

    def __init__(self):
        self.name = platform.processor() or platform.machine() or "CPU"
        try:
            self.capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            self.capacity = 8 * GIB

    def scope(self):
        return contextlib.nullcontext()

    def implementations(self) -> list[Impl]:
        return [Cuflash(), Standard("numpy-standard", np, lambda x: x)]

    def inputs(self, case: Case, count: int, seed: int) -> list[Inputs]:
        rng = np.random.default_rng(seed)

        def rand():
            return rng.standard_normal(case.shape, dtype=np.float32).astype(case.dtype)

        return [Inputs(rand(), rand(), rand(), rand()) for _ in range(count)]

    def synchronize(self) -> None:
        pass

    def elapsed_ms(self, calls: list[Callable]) -> list[float]:
        times = []
        for call in calls:
            start = time.perf_counter()
            call()
            times.append(1e3 * (time.perf_counter() - start))
        return times

    def release(self, collect: bool = False) -> None:
        if collect:
            gc.collect()

    def workspace(self, call: Callable[[], tuple]) -> tuple[int, int]:
        """(peak bytes minus the outputs, output bytes); NumPy reports buffers to tracemalloc."""
        tracemalloc.start()
        try:
            outputs = call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        output_bytes = sum(int(x.nbytes) for x in outputs)
        return peak - output_bytes, output_bytes

    def describe(self) -> str:
        return f"CPU {self.name} ({os.cpu_count()} cores, NumPy)"

    def environment(self) -> dict:
        return {"device": "cpu", "cpu": self.name, "cores": os.cpu_count(),
                "memory_bytes": self.capacity}


def _pool_peak_hook():
    """A CuPy memory hook recording the peak of pool memory in use while it is active."""
    import cupy

    class PoolPeak(cupy.cuda.MemoryHook):
        name = "cuflash-bench-peak"

        def __init__(self):
            self.current = 0
            self.peak = 0

        def malloc_postprocess(self, **kwargs):
            self.current += kwargs["mem_size"]
            self.peak = max(self.peak, self.current)

        def free_postprocess(self, **kwargs):
            self.current -= kwargs["mem_size"]

    return PoolPeak()


def _numpy_dtype(name: str):
    """NumPy dtype for CuPy arrays; bfloat16 comes from ml_dtypes."""
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _is_oom(err: BaseException) -> bool:
    return (isinstance(err, MemoryError) or "OutOfMemory" in type(err).__name__
            or "out of memory" in str(err).lower())


def find_gpu() -> str | None:
    """None when CuPy sees a CUDA GPU, else why not."""
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # ImportError, no driver, no device: CuPy raises its own errors
        return f"{type(err).__name__}: {_first_line(str(err))}"
    return None if count else "device count 0"


def _torch_sees_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# ---- timing sweep ----------------------------------------------------------------------------


def input_sets(working_bytes: int, cache_bytes: int) -> int:
    """How many input sets to rotate so that no call finds its inputs in cache.

    One set when the working set is at least twice the cache; otherwise enough sets to cover
    twice the cache, at most MAX_INPUT_SETS.
    """
    if working_bytes >= 2 * cache_bytes:
        return 1
    return min(MAX_INPUT_SETS, math.ceil(2 * cache_bytes / max(working_bytes, 1)))


def split_reps(total: int, batches: int) -> list[int]:
    """`total` calls as `batches` batch sizes that differ by at most one, larger ones first."""
    return [total // batches + (1 if i < total % batches else 0) for i in range(batches)]


def rotated(names: list[str], turn: int) -> list[str]:
    """`names` starting at position `turn` (mod its length): round `turn`'s order."""
    k = turn % len(names)
    return names[k:] + names[:k]


@dataclass
class _Timed:
    """An implementation being timed on one case: its prepared calls (one per input set) and the
    milliseconds measured so far."""

    impl: Impl
    calls: list[Callable]
    times: list[float]

    def batch(self, device, count: int) -> None:
        """`count` more timed calls, continuing the rotation over input sets (so that no set is
        reused back to back), after one untimed call that refills the allocator's cache (on the
        set before the first timed one, which the cache then does not already hold)."""
        done = len(self.times)
        with self.impl.context():
            self.calls[(done - 1) % len(self.calls)]()
            self.times += device.elapsed_ms(
                [self.calls[(done + i) % len(self.calls)] for i in range(count)])


def measure_case(device, impls: list[Impl], case: Case, sets: list[Inputs], config: Config,
                 limit_bytes: float, progress: Progress) -> list[dict]:
    """One timing row per implementation: status "ok" with ms/TFLOP/s, or "skip"/"n/a"/"oom"/
    "error" with a note.

    The implementations take turns. Each is warmed up (compile, autotune, first touch of every
    input set), then all are timed in up to ROUNDS rounds, the order rotated each round: a GPU
    running attention at its power cap (an H100 does) sets its clock by what ran just before, and
    a fixed order would hand every implementation the same neighbour. Round 0 times MIN_REPS
    calls of each; that sizes the rest (about `min_time_ms` in all, at most `max_reps` calls),
    spread over the remaining rounds. The allocators' cached blocks are released between turns,
    so that each implementation has the device to itself.
    """
    rows: dict[str, dict] = {}
    timed: dict[str, _Timed] = {}

    def fail(impl: Impl, err: BaseException) -> None:
        status, note = failure(impl, err)
        rows[impl.name] = {**case.record(), "impl": impl.name, "status": status, "note": note}
        timed.pop(impl.name, None)
        device.release(collect=True)

    for impl in impls:
        reason = impl.skip_reason(case, limit_bytes)
        if reason is not None:
            rows[impl.name] = {**case.record(), "impl": impl.name, "status": "skip",
                               "note": reason}
            continue
        progress.show(f"{case.label} {impl.name} (warm-up)")
        try:
            with impl.context():
                calls = [impl.prepare(case, x) for x in sets]
                for call in calls:
                    call()
            device.synchronize()
            timed[impl.name] = _Timed(impl, calls, [])
        except Exception as err:  # a peer without a kernel for this case, OOM, or a cuflash bug
            fail(impl, err)
        device.release()

    plan: dict[str, list[int]] = {name: [MIN_REPS] for name in timed}
    for turn in range(ROUNDS):
        for name in rotated(list(timed), turn):
            if turn >= len(plan[name]) or plan[name][turn] == 0:
                continue
            run = timed[name]
            progress.show(f"{case.label} {name} (round {turn + 1})")
            try:
                run.batch(device, plan[name][turn])
            except Exception as err:  # e.g. out of memory beside another implementation's data
                fail(run.impl, err)
                continue
            device.release()
            if turn == 0:  # size the remaining rounds from the fastest call so far
                left_ms = config.min_time_ms - sum(run.times)
                more = min(config.max_reps - MIN_REPS,
                           math.ceil(left_ms / max(min(run.times), 1e-3)))
                plan[name] += split_reps(max(more, 0), ROUNDS - 1)

    for name, run in timed.items():
        median = statistics.median(run.times)
        rows[name] = {**case.record(), "impl": name, "status": "ok", "ms": median,
                      "ms_min": min(run.times), "tflops": case.flops / median / 1e9,
                      "reps": len(run.times), "rounds": sum(1 for n in plan[name] if n),
                      "input_sets": len(sets), "times_ms": [float(t) for t in run.times]}
    progress.advance(len(impls))
    return [rows[impl.name] for impl in impls]


def failure(impl: Impl, err: BaseException) -> tuple[str, str]:
    """(status, note) of a failed measurement."""
    note = impl.explain(err)
    if _is_oom(err):
        return "oom", note
    if impl.peer or isinstance(err, NotImplementedError):
        return "n/a", note
    return "error", note


def run_sweep(device, impls: list[Impl], config: Config, progress: Progress) -> list[dict]:
    limit = min(TIMING_MEMORY_LIMIT, device.capacity / 2)
    rows = []
    for index, case in enumerate(sweep_cases(config)):
        working = 4 * math.prod(case.shape) * np.dtype(_numpy_dtype(case.dtype)).itemsize
        count = input_sets(working, device.cache_bytes)
        try:
            sets = device.inputs(case, count, seed=config.seed * 100_003 + index)
        except Exception as err:  # e.g. a dtype this framework cannot make, or no memory
            status = "oom" if _is_oom(err) else "n/a"
            note = f"inputs: {_describe(err)}"
            rows += [{**case.record(), "impl": impl.name, "status": status, "note": note}
                     for impl in impls]
            progress.advance(len(impls))
            continue
        rows += measure_case(device, impls, case, sets, config, limit, progress)
        del sets
    return rows


# The ratio's interval: a percentile bootstrap of the two medians over each side's timed calls
# (resampled independently), 95%, with a fixed seed so that a JSON's figures can be recomputed.
RATIO_CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 4000


def ratio_interval(ours_ms: list[float], peer_ms: list[float],
                   confidence: float = RATIO_CONFIDENCE) -> tuple[float, float]:
    """(low, high) of cuflash's speed over a peer's (peer median ms / ours), from their calls'
    times: how far the run's own timing noise leaves the ratio uncertain. Run-to-run changes (the
    GPU's clock and power state) come on top and show only by repeating the run."""
    rng = np.random.default_rng(20261127)
    a, b = np.asarray(ours_ms, dtype=np.float64), np.asarray(peer_ms, dtype=np.float64)
    ours = np.median(a[rng.integers(0, a.size, (BOOTSTRAP_RESAMPLES, a.size))], axis=1)
    peer = np.median(b[rng.integers(0, b.size, (BOOTSTRAP_RESAMPLES, b.size))], axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(peer / ours, [tail, 100 - tail])
    return float(low), float(high)


def verdict(low: float, high: float) -> str:
    """"ahead", "behind", or "level" where the interval holds 1 (a tie within the timing noise)."""
    return "ahead" if low > 1 else "behind" if high < 1 else "level"


def compare(rows: list[dict]) -> list[dict]:
    """Per case: cuflash's TFLOP/s, the best peer's (by median), their ratio and, where both rows
    carry their calls' times, the ratio's interval (`ratio_interval`) and `verdict`."""
    cells: dict[tuple, dict] = {}
    ours: dict[tuple, dict] = {}  # per case: cuflash's row
    best: dict[tuple, dict] = {}  # per case: the fastest peer's row
    for r in rows:
        key = (r["dtype"], r["pass"], r["head_dim"], r["causal"], r["seqlen"])
        cells.setdefault(key, {
            "dtype": r["dtype"], "pass": r["pass"], "head_dim": r["head_dim"],
            "causal": r["causal"], "seqlen": r["seqlen"], "cuflash_tflops": None,
            "cuflash_status": "missing", "best_peer": None, "best_peer_tflops": None,
            "ratio": None, "ratio_low": None, "ratio_high": None, "verdict": None,
        })
        if r["impl"] == CUFLASH:
            ours[key] = r
        elif r["status"] == "ok" and (key not in best or r["tflops"] > best[key]["tflops"]):
            best[key] = r
    for key, cell in cells.items():
        mine, peer = ours.get(key), best.get(key)
        if mine is not None:
            cell["cuflash_status"], cell["cuflash_tflops"] = mine["status"], mine.get("tflops")
        if peer is not None:
            cell["best_peer"], cell["best_peer_tflops"] = peer["impl"], peer["tflops"]
        if cell["cuflash_tflops"] and cell["best_peer_tflops"]:
            cell["ratio"] = cell["cuflash_tflops"] / cell["best_peer_tflops"]
            if mine.get("times_ms") and peer.get("times_ms"):
                cell["ratio_low"], cell["ratio_high"] = ratio_interval(mine["times_ms"],
                                                                       peer["times_ms"])
                cell["verdict"] = verdict(cell["ratio_low"], cell["ratio_high"])
    return list(cells.values())


# ---- memory sweep ----------------------------------------------------------------------------


def run_memory(device, impls: list[Impl], memory: MemoryConfig, seed: int,
               progress: Progress) -> list[dict]:
    """Workspace (peak minus inputs and outputs) vs S, per pass and implementation, until each
    runs out of memory (estimated from the S x S matrices where those exceed the device)."""
    rows = []
    for pass_ in memory.passes:
        for impl in impls:
            out_of_memory_at = None
            warm = False
            for seqlen in memory.seqlens:
                case = Case(memory.dtype, pass_, memory.head_dim, memory.causal, seqlen,
                            memory.batch, memory.heads)
                progress.show(f"memory {case.label} {impl.name}")
                if out_of_memory_at is None:
                    row = memory_point(device, impl, case, seed, warm)
                    warm = warm or row["status"] == "ok"
                    if row["status"] == "oom":
                        out_of_memory_at = seqlen
                else:
                    row = {**case.record(), "impl": impl.name, "status": "skip",
                           "note": f"out of memory at S={fmt_seqlen(out_of_memory_at)}"}
                rows.append(row)
                progress.advance()
    return rows


def memory_point(device, impl: Impl, case: Case, seed: int, warm: bool) -> dict:
    """One memory row; the first call of an implementation (not `warm`) is run twice so that
    one-time allocations (library handles, autotuning) do not count as workspace."""
    row = {**case.record(), "impl": impl.name}
    reason = impl.skip_reason(case, device.capacity)
    if reason is not None:
        return {**row, "status": "oom", "note": f"estimated: {reason}"}
    device.release(collect=True)  # the previous point's blocks, whichever allocator holds them
    try:
        x = device.inputs(case, 1, seed)[0]
        with impl.context():
            call = impl.prepare(case, x)
            if not warm:
                call()
            workspace, output_bytes = device.workspace(call)
    except Exception as err:  # OOM (the point of the sweep), or a peer without this case
        status, note = failure(impl, err)
        return {**row, "status": status, "note": note}
    return {**row, "status": "ok", "workspace_bytes": int(workspace),
            "input_bytes": x.nbytes if case.pass_ != "fwd" else x.nbytes - int(x.dout.nbytes),
            "output_bytes": int(output_bytes)}


# ---- cold-cache compile time -----------------------------------------------------------------

_PROBE = "import sys; from cuflash import bench; sys.exit(bench._compile_probe(sys.argv[1]))"
_PROBE_SEQLEN, _PROBE_HEADS = 256, 2


def run_compile(config: Config, framework: str) -> dict:
    """Compile time of each cuflash kernel the sweep uses, in a fresh process with an empty
    CuPy kernel cache (``CUPY_CACHE_DIR``); read from ``cuflash._compile.compile_seconds``."""
    backward = bool(set(config.passes) - {"fwd"})
    probes = [[dtype, d, causal, "fwd+bwd" if backward else "fwd"]
              for dtype in config.dtypes for d in config.head_dims for causal in config.causal]
    payload = json.dumps({"framework": framework, "probes": probes})
    package_root = str(Path(cuflash.__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory(prefix="cuflash-bench-cache-") as cache:
        env = {**os.environ, "CUPY_CACHE_DIR": cache,
               "PYTHONPATH": os.pathsep.join(filter(None, (package_root,
                                                           os.environ.get("PYTHONPATH"))))}
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", _PROBE, payload], env=env, text=True,
                                  capture_output=True, timeout=COMPILE_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return {"status": "error", "note": f"timed out after {COMPILE_TIMEOUT_S} s"}
        wall = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"status": "error", "note": f"exit {proc.returncode}: " + " | ".join(tail)}
    result = json.loads(lines[-1])
    kernels = [{"name": name, "seconds": seconds}
               for name, seconds in sorted(result["kernels"].items(), key=lambda kv: -kv[1])]
    return {"status": "ok", "cache": "empty temporary CUPY_CACHE_DIR, fresh process",
            "kernels": kernels, "total_seconds": sum(k["seconds"] for k in kernels),
            "first_calls": result["first_calls"], "process_seconds": wall}


def _compile_probe(payload: str) -> int:
    """Runs in the subprocess of `run_compile`: first calls at a tiny size, then a JSON line."""
    from cuflash import _compile

    request = json.loads(payload)
    device = Gpu(request["framework"])
    first_calls = []
    with device.scope():
        for dtype, head_dim, causal, pass_ in request["probes"]:
            case = Case(dtype, pass_, head_dim, causal, _PROBE_SEQLEN, 1, _PROBE_HEADS)
            x = device.inputs(case, 1, seed=0)[0]
            device.synchronize()
            start = time.perf_counter()
            status, note = "ok", ""
            try:
                Cuflash().prepare(case, x)()
                device.synchronize()
            except Exception as err:  # NotImplementedError for a missing backward, or a bug
                status, note = failure(Cuflash(), err)
            first_calls.append({"dtype": dtype, "head_dim": head_dim, "causal": causal,
                                "pass": pass_, "seconds": time.perf_counter() - start,
                                "status": status, "note": note})
    print(json.dumps({"kernels": dict(_compile.compile_seconds), "first_calls": first_calls}))
    return 0


# ---- environment -----------------------------------------------------------------------------


def environment(device) -> dict:
    """Versions, device and source revision, for the JSON."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cuflash": cuflash.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "cupy": _cupy_version(),
        "torch": _version("torch"),
        "matplotlib": _version("matplotlib"),
        "nvrtc": _guard(_nvrtc_version),
        **_git(),
        "source_digest": _guard(source_digest),
        **device.environment(),
    }
    return env


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cupy_version() -> str | None:
    try:
        import cupy
    except Exception:  # not installed, or a broken CUDA install failing at import
        return None
    return cupy.__version__


def _nvrtc_version() -> str:
    from cupy_backends.cuda.libs import nvrtc

    major, minor = nvrtc.getVersion()
    return f"{major}.{minor}"


def _cuda_version(encoded: int) -> str:
    """CUDA's ``1000 * major + 10 * minor`` as text."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}" if encoded else "none"


def _guard(probe: Callable[[], str]) -> str:
    try:
        return probe()
    except Exception as err:  # a report field, never a crash
        return f"unavailable ({_describe(err)})"


def _git() -> dict:
    root = Path(cuflash.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def source_digest() -> str:
    """12 hex digits of SHA-256 over the package's Python files and the CUDA sources (names and
    bytes). It names the code that ran even where git cannot: a copy of a working tree whose
    .git is stale or absent (the GPU machine's), or an installed wheel."""
    import hashlib

    from cuflash import _compile

    package = Path(cuflash.__file__).resolve().parent
    files = sorted(package.glob("*.py")) + sorted(_compile.kernels_dir().glob("*.cu*"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.parent.name}/{path.name}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# ---- progress --------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr: ``sweep [#####-------] 12/108 fwd bf16 D128 ...``.

    Redrawn in place on a terminal; elsewhere (logs, CI) one line per tenth.
    """

    WIDTH = 24

    def __init__(self, title: str, total: int, stream=None):
        self.title, self.total, self.done = title, max(total, 1), 0
        self.stream = sys.stderr if stream is None else stream
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self._last_tenth = -1
        self._label = ""

    def show(self, label: str) -> None:
        self._label = label
        self._draw()

    def advance(self, steps: int = 1) -> None:
        self.done = min(self.total, self.done + steps)
        self._draw()

    def close(self) -> None:
        self.done = self.total
        self._label = f"done in {time.perf_counter() - self.start:.0f} s"
        self._draw()
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def _draw(self) -> None:
        filled = self.WIDTH * self.done // self.total
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        line = f"{self.title} [{bar}] {self.done}/{self.total} {self._label}"
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
            self.stream.flush()
            return
        tenth = 10 * self.done // self.total
        if tenth != self._last_tenth:
            self._last_tenth = tenth
            self.stream.write(line + "\n")
            self.stream.flush()


# ---- output: JSON, plots, Markdown, terminal ---------------------------------------------------

_COLORS = dict(zip(IMPLS, ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                           "#8c564b"), strict=True))
_FIGSIZE, _DPI = (9, 5), 100


def plot_tflops(rows: list[dict], config: Config, device, out: Path) -> list[Path]:
    """One PNG per (dtype, pass, head dim): throughput vs S, one line per implementation,
    full and causal side by side."""
    from matplotlib.figure import Figure

    paths = []
    names = [n for n in IMPLS if any(r["impl"] == n for r in rows)]
    for dtype in config.dtypes:
        for pass_ in config.passes:
            for head_dim in config.head_dims:
                fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
                axes = fig.subplots(1, len(config.causal), sharey=True, squeeze=False)[0]
                for ax, causal in zip(axes, config.causal, strict=True):
                    for name in names:
                        points = sorted(
                            (r["seqlen"], r["tflops"] * device.unit_scale) for r in rows
                            if r["impl"] == name and r["status"] == "ok" and r["dtype"] == dtype
                            and r["pass"] == pass_ and r["head_dim"] == head_dim
                            and r["causal"] == causal)
                        if points:
                            ax.plot(*zip(*points, strict=True), marker="o", label=name,
                                    color=_COLORS[name], linewidth=2.5 if name == CUFLASH else 1.2)
                    _seqlen_axis(ax, config.seqlens)
                    ax.set_title("causal" if causal else "full (no mask)")
                    ax.grid(alpha=0.3)
                axes[0].set_ylabel(device.unit)
                axes[0].set_ylim(bottom=0)
                if axes[0].get_legend_handles_labels()[0]:
                    axes[0].legend(fontsize=8)
                fig.suptitle(f"{SHORT_DTYPE[dtype]} {pass_}, D={head_dim}  (B*S={config.tokens}, "
                             f"H*D={config.model_dim})  {device.describe()}", fontsize=10)
                fig.tight_layout()
                path = out / f"tflops-{SHORT_DTYPE[dtype]}-{pass_.replace('+', '')}-d{head_dim}.png"
                fig.savefig(path)
                paths.append(path)
    return paths


def plot_memory(rows: list[dict], memory: MemoryConfig, device, out: Path) -> Path:
    """Workspace vs S, log-log, one panel per pass."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
    axes = fig.subplots(1, len(memory.passes), sharey=True, squeeze=False)[0]
    for ax, pass_ in zip(axes, memory.passes, strict=True):
        for name in [n for n in IMPLS if any(r["impl"] == n for r in rows)]:
            mine = [r for r in rows if r["impl"] == name and r["pass"] == pass_]
            points = [(r["seqlen"], max(r["workspace_bytes"], KIB)) for r in mine
                      if r["status"] == "ok"]
            oom = [r["seqlen"] for r in mine if r["status"] == "oom"]
            label = name + (f" (OOM at {fmt_seqlen(oom[0])})" if oom else "")
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label,
                        color=_COLORS[name], linewidth=2.5 if name == CUFLASH else 1.2)
        _seqlen_axis(ax, memory.seqlens)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_locator(LogLocator(base=2, numticks=10))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: fmt_bytes(y)))
        ax.minorticks_off()
        ax.set_title(pass_)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("workspace: peak - inputs - outputs (floor 1 KiB)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"memory vs S: B={memory.batch}, H={memory.heads}, D={memory.head_dim}, "
                 f"{SHORT_DTYPE[memory.dtype]}, causal  {device.describe()}", fontsize=10)
    fig.tight_layout()
    path = out / "memory.png"
    fig.savefig(path)
    return path


def _seqlen_axis(ax, seqlens: Iterable[int]) -> None:
    seqlens = sorted(seqlens)
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqlens)
    ax.set_xticklabels([fmt_seqlen(s) for s in seqlens])
    ax.minorticks_off()
    ax.set_xlabel("sequence length S")


def table_lines(cells: list[dict], config: Config, device, dtype: str,
                markdown: bool) -> list[str]:
    """Rows pass/D/mask, columns S, cells "cuflash/best peer" (ANCHORS.md's format)."""
    header = ["pass", "D", "mask", *(("S=" if i == 0 else "") + fmt_seqlen(s)
                                      for i, s in enumerate(config.seqlens))]
    by_key = {(c["pass"], c["head_dim"], c["causal"], c["seqlen"]): c for c in cells
              if c["dtype"] == dtype}
    body = []
    for pass_ in config.passes:
        for head_dim in config.head_dims:
            for causal in config.causal:
                row = [pass_, str(head_dim), "causal" if causal else "full"]
                for seqlen in config.seqlens:
                    cell = by_key.get((pass_, head_dim, causal, seqlen))
                    row.append(_cell_text(cell, device.unit_scale))
                body.append(row)
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                *("| " + " | ".join(r) + " |" for r in body)]
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in (header, *body)]


def _cell_text(cell: dict | None, unit_scale: float) -> str:
    def number(value: float | None) -> str:
        if value is None:
            return "-"
        value *= unit_scale
        return f"{value:.0f}" if value >= 10 else f"{value:.2g}"

    if cell is None:
        return "-"
    ours = {"ok": number(cell["cuflash_tflops"]), "oom": "OOM", "error": "ERR"}.get(
        cell["cuflash_status"], "-")
    return f"{ours}/{number(cell['best_peer_tflops'])}"


def _best_peer_counts(cells: list[dict], dtype: str) -> str:
    counts: dict[str, int] = {}
    for c in cells:
        if c["dtype"] == dtype and c["best_peer"]:
            counts[c["best_peer"]] = counts.get(c["best_peer"], 0) + 1
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _ratio_summary(cells: list[dict], dtype: str) -> str:
    """Geometric mean and range of cuflash / best peer over the cells where both ran."""
    ratios = [c["ratio"] for c in cells if c["dtype"] == dtype and c["ratio"]]
    if not ratios:
        return "no ratios"
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    text = (f"ratio geomean {geomean:.2f}x, {min(ratios):.2f}-{max(ratios):.2f}x "
            f"over {len(ratios)} cells")
    verdicts = [c["verdict"] for c in cells if c["dtype"] == dtype and c.get("verdict")]
    if verdicts:
        text += ", " + " / ".join(f"{name} {verdicts.count(name)}"
                                  for name in ("ahead", "level", "behind"))
    return text


def _verdict_line(cells: list[dict], dtype: str) -> str | None:
    """Cells ahead of, level with and behind the best peer, by the ratio's interval (None where
    no cell has one)."""
    judged = [c for c in cells if c["dtype"] == dtype and c.get("verdict")]
    if not judged:
        return None

    def label(c: dict) -> str:
        mask = "causal" if c["causal"] else "full"
        return (f"{c['pass']} D={c['head_dim']} {mask} S={fmt_seqlen(c['seqlen'])} "
                f"{c['ratio']:.3f} ({c['ratio_low']:.3f}-{c['ratio_high']:.3f})")

    parts = []
    for name in ("ahead", "level", "behind"):
        mine = [c for c in judged if c["verdict"] == name]
        text = f"{name} {len(mine)}"
        if mine and name != "ahead":
            text += ": " + ", ".join(label(c) for c in mine)
        parts.append(text)
    return (f"Against the best peer, by the {RATIO_CONFIDENCE:.0%} interval of the ratio from "
            "this run's calls (level: it holds 1): " + "; ".join(parts) + ".")


def markdown(cells: list[dict], config: Config, device, env: dict, command: str,
             peers: list[str]) -> str:
    lines = [f"<!-- generated by `{command}` on {env['date']}, cuflash {env['cuflash']}, "
             f"commit {(env.get('git_commit') or 'unknown')[:12]}"
             f"{' (dirty)' if env.get('git_dirty') else ''}, "
             f"sources {env.get('source_digest') or 'unknown'} -->", ""]
    if device.mode == "cpu":
        lines += ["No CUDA GPU: these are CPU-path figures (NumPy), not GPU ones.", ""]
    for dtype in config.dtypes:
        lines += [
            f"### {SHORT_DTYPE[dtype]}, {device.describe()}", "",
            f"{device.unit}, cuflash / best peer (the fastest of {', '.join(peers)}; same "
            "process, same inputs). "
            f"B*S = {config.tokens}, H*D = {config.model_dim}; FLOPs {FLOP_FORMULA}. "
            f"Median of calls timed by {device.timer}, after warm-up.", "",
            *table_lines(cells, config, device, dtype, markdown=True), "",
            f"Best peer per cell: {_best_peer_counts(cells, dtype) or 'none ran'}.", "",
        ]
        verdicts = _verdict_line(cells, dtype)
        if verdicts:
            lines += [verdicts, ""]
    return "\n".join(lines)


def summary_lines(result: dict) -> list[str]:
    """Memory and compile notes printed above the table."""
    lines = []
    memory = result.get("memory")
    if memory:
        for pass_ in memory["config"]["passes"]:
            parts = []
            for name in IMPLS:
                mine = [r for r in memory["results"] if r["impl"] == name and r["pass"] == pass_]
                ok = [r for r in mine if r["status"] == "ok"]
                oom = [r for r in mine if r["status"] == "oom"]
                if not mine:
                    continue
                text = name
                if ok:
                    last = ok[-1]
                    text += (f" {fmt_bytes(max(last['workspace_bytes'], 0))}@"
                             f"{fmt_seqlen(last['seqlen'])}")
                if oom:
                    text += f" OOM@{fmt_seqlen(oom[0]['seqlen'])}"
                if not ok and not oom:
                    text += f" {mine[0]['status']}"
                parts.append(text)
            lines.append(f"workspace {pass_}: " + ", ".join(parts))
    comp = result.get("compile")
    if comp and comp.get("status") == "ok":
        kernels = comp["kernels"]
        slowest = f", slowest {kernels[0]['seconds']:.1f} s {kernels[0]['name']}" if kernels \
            else ""
        lines.append(f"compile (cold cache): {len(kernels)} kernels, "
                     f"{comp['total_seconds']:.1f} s{slowest}")
    elif comp:
        lines.append(f"compile (cold cache): {comp['status']}: {comp.get('note', '')}")
    for r in [r for r in result["timings"] if r["impl"] == CUFLASH and r["status"] == "error"][:5]:
        case = Case(r["dtype"], r["pass"], r["head_dim"], r["causal"], r["seqlen"], r["batch"],
                    r["heads"])
        lines.append(f"cuflash ERROR {case.label}: {r['note']}")
    return lines


# ---- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m cuflash bench``: run, write JSON/plots/Markdown under --out, print a table.

    Returns 0, 1 when cuflash itself failed somewhere (status "error"), 2 on a usage error.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--overhead" in argv:
        from cuflash import bench_overhead

        return bench_overhead.main(argv)
    args = _parser().parse_args(argv)

    no_gpu = None if args.device == "cpu" else find_gpu()
    if args.device == "cuda" and no_gpu:
        print(f"error: --device cuda, but no usable CUDA GPU ({no_gpu})", file=sys.stderr)
        return 2
    mode = "cuda" if args.device != "cpu" and not no_gpu else "cpu"
    note = None
    if mode == "cpu":
        note = ("--device cpu: benchmarking the CPU path" if args.device == "cpu" else
                f"no CUDA GPU: benchmarking the CPU path ({no_gpu})")
        print(note)
        device = Cpu()
    else:
        framework = args.framework
        if framework == "auto":
            framework = "torch" if _torch_sees_gpu() else "cupy"
        elif framework == "torch" and not _torch_sees_gpu():
            print("error: --framework torch, but torch is not installed or sees no CUDA GPU",
                  file=sys.stderr)
            return 2
        device = Gpu(framework)
    try:
        config = make_config(args, mode)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    impls = [i for i in device.implementations() if _selected(i.name, config.impls)]
    if not any(i.name == CUFLASH for i in impls):
        print("note: cuflash is not among --impls; no ratios will be computed")

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m cuflash bench" + "".join(f" {a}" for a in argv)
    print(f"cuflash bench on {device.describe()}: {len(sweep_cases(config))} cases x "
          f"{len(impls)} implementations -> {out}/", flush=True)

    result: dict = {
        "schema": SCHEMA, "mode": mode, "note": note, "command": command,
        "environment": environment(device),
        "config": asdict(config),
        "flops": FLOP_FORMULA,
        "units": {"ms": "median milliseconds per call", "tflops": "FLOPs / median / 1e12"},
        "implementations": [i.name for i in impls],
    }
    with device.scope():
        cases = sweep_cases(config)
        progress = Progress("sweep", len(cases) * len(impls))
        result["timings"] = run_sweep(device, impls, config, progress)
        progress.close()
        result["comparisons"] = compare(result["timings"])
        if config.memory is not None:
            m = config.memory
            progress = Progress("memory", len(m.passes) * len(impls) * len(m.seqlens))
            result["memory"] = {"config": asdict(m),
                                "results": run_memory(device, impls, m, config.seed, progress)}
            progress.close()
    if config.compile and _selected(CUFLASH, config.impls):
        print("compiling every kernel used, in a fresh process with an empty cache ...",
              file=sys.stderr, flush=True)
        result["compile"] = run_compile(config, device.framework)
    else:
        why = "no CUDA GPU" if mode == "cpu" else "--no-compile or cuflash not in --impls"
        result["compile"] = {"status": "skip", "note": f"{why}: no kernels compiled"}

    files = write_outputs(result, config, device, out, command)
    result["files"] = [str(p) for p in files]
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")

    if note:
        print(note)
    for line in summary_lines(result):
        print(line)
    print(f"wrote {out / 'bench.json'}, {out / 'performance_table.md'} and "
          f"{sum(p.suffix == '.png' for p in files)} plots")
    for dtype in config.dtypes:
        print(f"\n{SHORT_DTYPE[dtype]} {device.unit}, cuflash/best peer "
              f"(B*S={config.tokens}, H*D={config.model_dim}; best: "
              f"{_best_peer_counts(result['comparisons'], dtype) or 'none'}; "
              f"{_ratio_summary(result['comparisons'], dtype)})")
        for line in table_lines(result["comparisons"], config, device, dtype, markdown=False):
            print(line)
    errors = any(r["impl"] == CUFLASH and r["status"] == "error" for r in result["timings"])
    return 1 if errors else 0


def write_outputs(result: dict, config: Config, device, out: Path, command: str) -> list[Path]:
    """Markdown table and plots (plots need matplotlib; without it, a note in the JSON)."""
    md = out / "performance_table.md"
    peers = [name for name in result["implementations"] if name != CUFLASH]
    md.write_text(markdown(result["comparisons"], config, device, result["environment"],
                           command, peers))
    files = [out / "bench.json", md]
    try:
        import matplotlib  # noqa: F401  (only to learn whether plots can be drawn)
    except ImportError:
        result["plots"] = "skipped: matplotlib is not installed"
        return files
    files += plot_tflops(result["timings"], config, device, out)
    if result.get("memory"):
        files.append(plot_memory(result["memory"]["results"], config.memory, device, out))
    return files


def _selected(name: str, chosen: tuple[str, ...] | None) -> bool:
    if chosen is None:
        return True
    return name in chosen or (name.endswith("-standard") and "standard" in chosen)


def _json_default(value: object):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
