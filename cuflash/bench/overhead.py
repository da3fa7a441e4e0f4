"""``python -m cuflash bench --overhead``: the host time of one call, per framework, against SDPA.

At a shape whose GPU work is a few microseconds (B=1, S=128, H=8, D=64, fp16 by default) the
wall time of a call is its host path. Each row times `calls` back-to-back calls (inputs built
once, results dropped) and reports the median over `repeats` of the time per call; the GPU's own
time per call (kernel durations from the CUDA profiler) is reported beside it. Rows whose
framework is missing are skipped with the reason.

Only cuflash's public API is used, so the same file times an older tree by path:
``PYTHONPATH=old python3 cuflash/bench/overhead.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import cuflash


def _wall_us(fn: Callable[[], object], sync: Callable[[], None], calls: int,
             repeats: int) -> float:
    """Median over `repeats` of the wall time per call of `calls` back-to-back calls, in us."""
    for _ in range(20):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def _gpu_us(fn: Callable[[], object], calls: int = 20) -> float | None:
    """Kernel time per call in us (torch's CUDA profiler), or None where it is unavailable."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages()
                if getattr(e, "device_type", None) is not None
                and str(e.device_type).endswith("CUDA"))
    return total / calls


def run(batch: int, seqlen: int, heads: int, dim: int, dtype: str, calls: int,
        repeats: int) -> list[dict]:
    """Every row that can run here: ``{"call", "impl", "us", "gpu_us"}`` (or ``"skipped"``)."""
    rows: list[dict] = []

    def add(call: str, impl: str, fn: Callable[[], object] | None, sync, *, gpu: bool = True,
            skipped: str | None = None) -> None:
        if skipped is not None or fn is None:
            rows.append({"call": call, "impl": impl, "skipped": skipped})
            print(f"  {call:44s} {impl:16s} skipped: {skipped}", flush=True)
            return
        try:
            us = _wall_us(fn, sync, calls, repeats)
            gpu_us = _gpu_us(fn) if gpu else None
        except Exception as err:  # a peer that cannot run this shape is reported, not fatal
            rows.append({"call": call, "impl": impl, "skipped": f"{type(err).__name__}: {err}"})
            print(f"  {call:44s} {impl:16s} failed: {type(err).__name__}: {err}", flush=True)
            return
        rows.append({"call": call, "impl": impl, "us": us, "gpu_us": gpu_us})
        gpu_text = "" if gpu_us is None else f"  (GPU {gpu_us:7.1f} us)"
        print(f"  {call:44s} {impl:16s} {us:8.1f} us{gpu_text}", flush=True)

    shape = (batch, heads, seqlen, dim)  # SDPA's order; cuflash takes it as layout="bhsd"
    try:
        import torch
        have_torch = torch.cuda.is_available()
    except ImportError:
        have_torch = False
    if have_torch:
        _torch_rows(add, torch, shape, dtype)
    else:
        add("forward, torch tensors", "cuflash", None, None, skipped="torch sees no CUDA GPU")
    _cupy_rows(add, shape, dtype)
    _jax_rows(add, shape, dtype)
    return rows


def _torch_rows(add, torch, shape, dtype: str) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    dt = getattr(torch, dtype)
    q, k, v, dout = (torch.randn(shape, device="cuda", dtype=dt) for _ in range(4))
    sync = torch.cuda.synchronize
    backends = {"SDPA flash": SDPBackend.FLASH_ATTENTION, "SDPA cuDNN": SDPBackend.CUDNN_ATTENTION,
                "SDPA efficient": SDPBackend.EFFICIENT_ATTENTION}

    call = "forward, torch tensors"
    add(call, "cuflash", lambda: cuflash.attention(q, k, v, layout="bhsd"), sync)
    for name, backend in backends.items():
        with sdpa_kernel(backend):
            add(call, name, lambda: sdpa(q, k, v), sync)

    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

    def cuflash_train():
        cuflash.attention(qg, kg, vg, layout="bhsd").backward(dout)

    def sdpa_train():
        sdpa(qg, kg, vg).backward(dout)

    call = "forward + backward, torch autograd"
    add(call, "cuflash", cuflash_train, sync)
    for name, backend in backends.items():
        with sdpa_kernel(backend):
            add(call, name, sdpa_train, sync)

    out, lse = cuflash.attention(q, k, v, layout="bhsd", return_lse=True)
    add("attention_backward, torch tensors", "cuflash",
        lambda: cuflash.attention_backward(dout, q, k, v, out, lse, layout="bhsd"), sync)

    # A captured forward + backward, replayed: host work is one graph launch.
    call = "graph replay of forward + backward, torch"
    for name, train, ctx in (("cuflash", cuflash_train, None),
                             ("SDPA flash", sdpa_train, SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(ctx) if ctx is not None else contextlib.nullcontext():
                graph = _capture(torch, train)
        except Exception as err:
            add(call, name, None, None, skipped=f"capture failed: {type(err).__name__}: {err}")
            continue
        add(call, name, graph.replay, sync)


def _capture(torch, fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _cupy_rows(add, shape, dtype: str) -> None:
    call = "forward, CuPy arrays"
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() == 0:
            raise RuntimeError("no CUDA GPU")
    except Exception as err:
        add(call, "cuflash", None, None, skipped=f"CuPy unusable: {err}")
        return
    rng = np.random.default_rng(0)
    q, k, v = (cupy.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
               for _ in range(3))
    add(call, "cuflash", lambda: cuflash.attention(q, k, v, layout="bhsd"),
        cupy.cuda.get_current_stream().synchronize)


def _jax_rows(add, shape, dtype: str) -> None:
    call = "forward, JAX arrays (eager)"
    try:
        import jax
        import jax.numpy as jnp
        gpus = jax.devices("gpu")
    except Exception as err:
        add(call, "cuflash", None, None, skipped=f"JAX sees no GPU: {type(err).__name__}")
        return
    key = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.device_put(jax.random.normal(kk, shape, getattr(jnp, dtype)), gpus[0])
               for kk in key)
    last = []

    def fn():
        last[:] = [cuflash.attention(q, k, v, layout="bhsd")]

    def sync():
        if last:
            last[0].block_until_ready()

    add(call, "cuflash", fn, sync, gpu=False)
    def staged():  # cuflash.jax's eager call: a compiled call once the shape has been seen
        last[:] = [cuflash.jax.attention(q, k, v, layout="bhsd")]

    add(call, "cuflash.jax", staged, sync, gpu=False)
    try:
        def peer():
            last[:] = [jax.nn.dot_product_attention(
                q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), implementation="cudnn")]
        add(call, "jax cuDNN", peer, sync, gpu=False)
    except Exception as err:
        add(call, "jax cuDNN", None, None, skipped=f"{type(err).__name__}: {err}")


def table(rows: list[dict]) -> str:
    """Markdown: one line per call, cuflash and each peer in microseconds per call."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    calls = list(dict.fromkeys(r["call"] for r in rows))
    lines = ["| call | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
    for call in calls:
        cells = []
        for impl in impls:
            row = next((r for r in rows if r["call"] == call and r["impl"] == impl), None)
            if row is None or "us" not in row:
                cells.append("-")
            else:
                gpu = "" if row.get("gpu_us") is None else f" (GPU {row['gpu_us']:.0f})"
                cells.append(f"{row['us']:.1f}{gpu}")
        lines.append(f"| {call} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuflash bench --overhead",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--overhead", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="1,128,8,64", help="B,S,H,D (default 1,128,8,64)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--calls", type=int, default=200, help="calls per timing (default 200)")
    parser.add_argument("--repeats", type=int, default=15, help="timings (default 15)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"),
                        help="folder for overhead.json and overhead.md")
    args = parser.parse_args(argv)
    try:
        batch, seqlen, heads, dim = (int(x) for x in args.shape.split(","))
    except ValueError:
        print(f"error: --shape: expected B,S,H,D, got {args.shape!r}", file=sys.stderr)
        return 2
    print(f"cuflash {cuflash.__version__} ({Path(cuflash.__file__).parent}): host time per call, "
          f"B={batch} S={seqlen} H={heads} D={dim} {args.dtype}, {args.calls} calls x "
          f"{args.repeats}", flush=True)
    rows = run(batch, seqlen, heads, dim, args.dtype, args.calls, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(
        {"shape": [batch, seqlen, heads, dim], "dtype": args.dtype, "rows": rows}, indent=1))
    markdown = table(rows)
    (args.out / "overhead.md").write_text(markdown + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
