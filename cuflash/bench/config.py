"""What a benchmark run measures: the presets and the flags applied to them (`Config`), the
cases of the sweep (`Case`) and the FLOP count of each."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

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
    """ "512" -> 512, "16k" -> 16384, "1m" -> 1048576."""
    text = text.strip().lower()
    unit = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
    value = int(text[:-1] if unit > 1 else text) * unit
    if value < 1:
        raise ValueError(f"sequence length must be >= 1, got {text!r}")
    return value


def seqlens_arg(text: str) -> tuple[int, ...]:
    """An argparse type: "1k,4k,1m" -> (1024, 4096, 1048576), errors as argparse's."""
    try:
        values = tuple(parse_seqlen(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. 1k,4k,16k")
    return values


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
