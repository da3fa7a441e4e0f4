"""Compile every kernel the dispatcher can choose into CuPy's disk cache, on all cores.

A GPU test process compiles each kernel at its first use, one at a time; a pass of the suites
then spends most of its time in NVRTC. Filled first, in parallel, the cache turns those compiles
into loads. Needs a CUDA GPU (each worker loads what it compiled, as a call would).

    python tests/perf/prewarm.py [--deadline SECONDS] [--workers N]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from cuflash.cuda import _compile, _decode, _launch, _launch_bwd, _launch_sm90


def specs() -> list:
    """Every instantiation, the Hopper ones first (the slowest to compile), SIMT last."""
    rest = sorted(_launch.all_fwd_specs() + _launch_bwd.all_bwd_specs()
                  + _decode.all_decode_specs(),
                  key=lambda s: ("simt" in s.name, "float64" in s.name))
    hopper = _launch_sm90.all_fwd_sm90_specs() + _launch_bwd.all_bwd_sm90_specs()
    return list(dict.fromkeys(hopper + rest))


def _build(spec, cc: int):
    start = time.perf_counter()
    try:
        _compile._compile_and_load(spec, cc)
        return spec, time.perf_counter() - start, None
    except Exception as err:  # reported; the others still compile
        return spec, time.perf_counter() - start, f"{type(err).__name__}: {str(err)[:300]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deadline", type=float, default=300.0,
                        help="seconds after which no new compile starts (default 300)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--only", default="",
                        help="a regular expression: compile only the kernels whose name has a "
                             "match (default: every kernel)")
    args = parser.parse_args()
    import cupy

    cc = int(cupy.cuda.Device(0).compute_capability)
    chosen = [s for s in specs() if re.search(args.only, s.name)]
    todo = iter(chosen)
    total = len(chosen)
    stop = time.time() + args.deadline
    start, done, slowest, errors = time.time(), 0, 0.0, []
    # spawned, not forked: this process has initialised CUDA, which a forked child cannot use
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        running: set = set()
        while True:
            while len(running) < 2 * args.workers and time.time() < stop:
                spec = next(todo, None)
                if spec is None:
                    break
                running.add(pool.submit(_build, spec, cc))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                spec, seconds, error = future.result()
                done, slowest = done + 1, max(slowest, seconds)
                if error:
                    errors.append((spec.name, error))
    print(f"prewarm: {done}/{total} kernels in {time.time() - start:.0f} s with {args.workers} "
          f"workers, slowest {slowest:.1f} s, {len(errors)} errors")
    for name, error in errors[:10]:
        print(f"  {name}: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
