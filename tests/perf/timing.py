"""The one timing helper of the perf scripts: CUDA events around each call, median, after warm-up.

Each timed call is synchronised, so per-call host work counts fully (stricter than
`python -m cuflash bench`, which lets calls queue).
"""

import numpy as np
import torch


def median_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` over `iters` event-timed, synchronised calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return float(np.median(times))
