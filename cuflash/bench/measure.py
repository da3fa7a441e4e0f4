"""The measurements: the timing sweep (implementations in rotated rounds, input sets rotated past
the cache, each ratio's bootstrap interval), workspace memory vs S, and cold-cache compile time."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cuflash
from cuflash.bench.config import (
    COMPILE_TIMEOUT_S,
    CUFLASH,
    MAX_INPUT_SETS,
    MIN_REPS,
    ROUNDS,
    TIMING_MEMORY_LIMIT,
    Case,
    Config,
    MemoryConfig,
    fmt_seqlen,
    sweep_cases,
)
from cuflash.bench.devices import Gpu, numpy_dtype
from cuflash.bench.impls import Cuflash, Impl, Inputs, describe

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


def _is_oom(err: BaseException) -> bool:
    return (isinstance(err, MemoryError) or "OutOfMemory" in type(err).__name__
            or "out of memory" in str(err).lower())


def run_sweep(device, impls: list[Impl], config: Config, progress: Progress) -> list[dict]:
    limit = min(TIMING_MEMORY_LIMIT, device.capacity / 2)
    rows = []
    for index, case in enumerate(sweep_cases(config)):
        working = 4 * math.prod(case.shape) * np.dtype(numpy_dtype(case.dtype)).itemsize
        count = input_sets(working, device.cache_bytes)
        try:
            sets = device.inputs(case, count, seed=config.seed * 100_003 + index)
        except Exception as err:  # e.g. a dtype this framework cannot make, or no memory
            status = "oom" if _is_oom(err) else "n/a"
            note = f"inputs: {describe(err)}"
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

_PROBE = ("import sys; from cuflash.bench import measure; "
          "sys.exit(measure.compile_probe(sys.argv[1]))")
_PROBE_SEQLEN, _PROBE_HEADS = 256, 2


def run_compile(config: Config, framework: str) -> dict:
    """Compile time of each cuflash kernel the sweep uses, in a fresh process with an empty
    CuPy kernel cache (``CUPY_CACHE_DIR``); read from ``cuflash.cuda._compile.compile_seconds``."""
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


def compile_probe(payload: str) -> int:
    """Runs in the subprocess of `run_compile`: first calls at a tiny size, then a JSON line."""
    from cuflash.cuda import _compile

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
