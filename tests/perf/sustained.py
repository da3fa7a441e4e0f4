"""Sustained forward throughput, cuflash vs SDPA cuDNN, with the clock and power they ran at.

An H100 runs attention at its power cap (700 W): clocks fall from 1980 MHz to 1400-1900 MHz
within a fraction of a second, by an amount that depends on the kernel. A short timing window
per implementation (as `cuflash bench` uses) meets the power controller in whatever state the
previous implementation left it. Here each implementation runs back to back for `SECONDS`, the
first `SETTLE` seconds are left out, and nvidia-smi samples the SM clock and board power every
50 ms; each cell runs twice, in opposite orders. Prints a Markdown table.

Run on a GPU: PYTHONPATH=. python3 tests/perf/sustained.py [D:mask:S ...]   (mask: full|causal)
"""

import datetime
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import cuflash

F = torch.nn.functional.scaled_dot_product_attention
SECONDS, SETTLE = 2.0, 0.4
DEFAULT_CELLS = [
    "64:full:1024",
    "64:causal:1024",
    "64:causal:2048",
    "128:full:1024",
    "128:full:2048",
    "128:full:16384",
    "256:causal:1024",
    "256:full:16384",
]


def parse(cell: str) -> tuple[int, bool, int]:
    d, mask, s = cell.split(":")
    if mask not in ("full", "causal"):
        raise SystemExit(f"cell {cell!r}: mask must be full or causal, got {mask!r}")
    return int(d), mask == "causal", int(s)


def implementations(D: int, causal: bool, S: int):
    """FLOPs of one call and [(name, call)] for cuflash and SDPA cuDNN on fresh bf16 inputs
    (B*S = 16384, H*D = 2048, BSHD for cuflash, the same tensors as BHSD views for SDPA)."""
    B, H = 16384 // S, 2048 // D
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))

    def ours():
        cuflash.attention(q, k, v, causal=causal)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F(qh, kh, vh, is_causal=causal)

    return 4 * B * H * S * S * D * (0.5 if causal else 1), [("cuflash", ours), ("cudnn", cudnn)]


def run_for(fn, seconds: float) -> tuple[float, float, int, float]:
    """Calls fn back to back (synchronising every 10 calls) for about `seconds`: wall-clock start
    and end (to match nvidia-smi's samples), the number of calls, and their GPU seconds between
    two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0, calls = time.time(), 0
    start.record()
    while time.time() - t0 < seconds:
        for _ in range(10):
            fn()
        calls += 10
        torch.cuda.synchronize()
    end.record()
    end.synchronize()
    return t0, time.time(), calls, start.elapsed_time(end) / 1e3


def samples(path: str) -> np.ndarray:
    """(timestamp, MHz, W) rows of the nvidia-smi log."""
    rows = []
    for line in open(path):
        parts = [x.strip() for x in line.split(",")]
        try:
            ts = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            rows.append((ts, float(parts[1].split()[0]), float(parts[2].split()[0])))
        except (ValueError, IndexError):
            continue
    return np.array(rows).reshape(-1, 3)


def main(cells: list[str]) -> None:
    log = tempfile.NamedTemporaryFile(suffix=".csv", delete=False).name
    sampler = subprocess.Popen(
        [
            "nvidia-smi",
            "--query-gpu=timestamp,clocks.sm,power.draw",
            "--format=csv,noheader",
            "-lms",
            "50",
        ],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    windows = []
    try:
        for cell in cells:
            flops, impls = implementations(*parse(cell))
            for order in (impls, impls[::-1]):
                for name, fn in order:
                    fn()
                    torch.cuda.synchronize()
                    time.sleep(0.5)  # back to idle clocks between windows
                    t0, t1, calls, gpu_s = run_for(fn, SECONDS)
                    windows.append((cell, name, t0 + SETTLE, t1, flops * calls / gpu_s / 1e12))
    finally:
        sampler.terminate()
        sampler.wait()
    smi = samples(log)
    print("| cell | impl | TFLOP/s | mean SM MHz | mean W |")
    print("|---|---|---|---|---|")
    for cell, name, a, b, tflops in windows:
        sel = smi[(smi[:, 0] >= a) & (smi[:, 0] <= b)]
        mhz, watts = (sel[:, 1].mean(), sel[:, 2].mean()) if len(sel) else (float("nan"),) * 2
        print(f"| {cell} | {name} | {tflops:.0f} | {mhz:.0f} | {watts:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT_CELLS)
