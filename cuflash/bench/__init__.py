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

Modules: `config` (presets, cases, FLOPs), `impls` (what is timed), `devices` (GPU and CPU
timing and memory), `measure` (the sweeps, ratio intervals, compile time), `provenance`
(versions, git state, source digest), `report` (plots, Markdown, terminal), `cli` (the flags
and `main`); `overhead` (``--overhead``), `window` (``--window``), `long` (``--long``: causal
forward and backward up to a million tokens, with peak memory) and `jax_jit` (``--jax``:
`cuflash.jax.attention` under ``jax.jit`` against ``jax.nn.dot_product_attention``) load only
when asked for.
"""

from __future__ import annotations

from cuflash.bench.cli import build_parser, main
from cuflash.bench.config import (
    FLOP_FORMULA,
    MAX_INPUT_SETS,
    MIN_REPS,
    ROUNDS,
    SCHEMA,
    Case,
    Config,
    MemoryConfig,
    attention_flops,
    make_config,
    sweep_cases,
)
from cuflash.bench.devices import Cpu, Gpu, find_gpu
from cuflash.bench.impls import Cuflash, Impl, Inputs, Sdpa, Standard
from cuflash.bench.measure import (
    Progress,
    compare,
    input_sets,
    measure_case,
    ratio_interval,
    rotated,
    split_reps,
    verdict,
)
from cuflash.bench.provenance import environment, source_digest
from cuflash.bench.report import verdict_line

__all__ = [
    "FLOP_FORMULA", "MAX_INPUT_SETS", "MIN_REPS", "ROUNDS", "SCHEMA", "Case", "Config", "Cpu",
    "Cuflash", "Gpu", "Impl", "Inputs", "MemoryConfig", "Progress", "Sdpa", "Standard",
    "attention_flops", "build_parser", "compare", "environment", "find_gpu", "input_sets",
    "main", "make_config", "measure_case", "ratio_interval", "rotated", "source_digest",
    "split_reps", "sweep_cases", "verdict", "verdict_line",
]
