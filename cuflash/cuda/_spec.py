"""KernelSpec: one frozen record per kernel instantiation.

Its `name` renders the C++ template name expression (``cuflash::fwd_sm80<cuflash::bf16, 128, 128,
32, 4, cuflash::CausalMask, cuflash::NoScore, true>``); that single string is the compile-cache
key, the log line and the test id.
Sequence lengths are never part of a spec: they are kernel arguments, so the cache does not grow
with shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from cuflash import _dtypes, _variant


@dataclass(frozen=True)
class KernelSpec:
    """One kernel instantiation.

    Attributes:
        source: file in ``kernels_cu/`` holding the template, e.g. ``"sm80/fwd_sm80.cu"``.
        entry: kernel template name inside namespace ``cuflash``, e.g. ``"fwd_sm80"``.
        dtype: canonical dtype name of q/k/v (a key of ``_dtypes``).
        head_dim: compiled head-dim width (the true head dim is <= this and a kernel argument).
        block_m: query rows per thread block.
        block_n: key rows per inner-loop tile.
        warps: warps per thread block.
        mask: the mask kind compiled in (a `_variant.MASK_KINDS` name; attention/mask.cuh).
        aligned: 16-byte vector loads allowed (pointers and strides are multiples of 16 bytes).
        smem_bytes: dynamic shared memory the launch must provide.
        min_arch: lowest compute capability (e.g. 80) the kernel compiles for.
        score: the score modification compiled in (a `_variant.SCORE_KINDS` name;
            attention/score.cuh, or a `_user_mods.UserKind`, whose generated C++ is compiled
            after `source`: see `code`), rendered after the mask.
        sinks: whether attention sinks are compiled in (attention/sink.cuh), rendered last;
            None for the kernels that take them at run time or not at all (no such argument).
    """

    source: str
    entry: str
    dtype: str
    head_dim: int
    block_m: int
    block_n: int
    warps: int
    mask: str
    aligned: bool
    smem_bytes: int
    min_arch: int = 80
    score: object = "none"  # str, or a _user_mods.UserKind
    sinks: bool | None = None

    @property
    def threads(self) -> int:
        return self.warps * 32

    @property
    def name(self) -> str:
        flag = {True: "true", False: "false"}
        args = (
            _dtypes.cpp_type(self.dtype),
            str(self.head_dim),
            str(self.block_m),
            str(self.block_n),
            str(self.warps),
            _variant.cpp_mask(self.mask),
            _variant.cpp_score(self.score),
            flag[self.aligned],
        )
        if self.sinks is not None:
            args = (*args, flag[self.sinks])
        return f"cuflash::{self.entry}<{', '.join(args)}>"

    @property
    def user_source(self) -> str:
        """The C++ compiled after `source`: a user score kind's type and specialisation."""
        return "" if isinstance(self.score, str) else self.score.source()

    @property
    def causal(self) -> bool:
        return self.mask == "causal"

    def __str__(self) -> str:
        return self.name
