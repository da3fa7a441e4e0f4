"""Same-process A/B of Hopper forward kernel sources, with SDPA cuDNN beside them.

Each variant is a directory holding a `kernels_cu/` tree (the working tree is `.`; another commit's
is `git archive REV kernels_cu | tar -x -C DIR`). Per cell: fresh random inputs, every variant's
launch planned against its own sources (the same Python host code), outputs poisoned with NaN
first, then timed with CUDA events in rounds of 10 queued calls, the order rotated each round so
that every variant takes every place twice (the H100 runs attention at its power cap, and its
clock follows what ran just before: a fixed order put one 16k cell 5% off). Reports the median
TFLOP/s, ratios to the first variant and to cuDNN, and each variant's largest difference from
float32 SDPA (S <= 4096) or from the first variant (longer S).

A variant may also change the tile of a head-dim width, for every sequence length (the
short tile of that width is then not used): `two=DIR,64=128x128x12` runs D=64 with
block_m 128, block_n 128 and 12 warps.

The same tree may be given twice under two names (`main=DIR new=. main2=DIR`): the control
shows what the run's noise alone does to a ratio (about +-2% per cell, kernel notes step 19).

Run on a GPU: PYTHONPATH=. python3 tests/perf/ab_kernels.py main=DIR new=. [--dims 64,128]
    [--seqlens 1024,4096] [--dtypes bfloat16,float16] [--masks full,causal]
"""

import argparse
import functools
import pathlib

import cupy
import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cuflash.cuda import _compile, _launch_sm90
from cuflash.cuda._launch import Tile

F = torch.nn.functional.scaled_dot_product_attention
CALLS_PER_TURN = 10
REFERENCE_MAX_SEQLEN = 4096


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "variants",
        nargs="+",
        metavar="NAME=DIR[,WIDTH=BMxBNxWARPS...]",
        help="a name, a directory that holds kernels_cu/, and optional tile overrides",
    )
    parser.add_argument("--dims", type=_ints, default=[64, 128, 256])
    parser.add_argument("--seqlens", type=_ints, default=[1024, 2048, 4096, 16384])
    parser.add_argument("--dtypes", type=lambda t: t.split(","), default=["bfloat16"])
    parser.add_argument("--masks", type=lambda t: t.split(","), default=["full", "causal"])
    args = parser.parse_args()
    variants, tiles = {}, {}
    for item in args.variants:
        name, sep, rest = item.partition("=")
        path, *overrides = rest.split(",")
        root = pathlib.Path(path).resolve() / "kernels_cu"
        if not sep or not root.is_dir():
            parser.error(f"variant {item!r}: expected NAME=DIR with DIR/kernels_cu/ present")
        variants[name], tiles[name] = root, {}
        for override in overrides:
            width, _, sizes = override.partition("=")
            try:
                block_m, block_n, warps = (int(x) for x in sizes.split("x"))
                tiles[name][int(width)] = Tile(block_m=block_m, block_n=block_n, warps=warps)
            except ValueError:
                parser.error(f"variant {item!r}: tile override {override!r} is not WIDTH=BMxBNxW")
    return args, variants, tiles


def plan_with_tiles(overrides: dict, *args, **kwargs):
    """_launch_sm90.plan_sm90 with some widths' tiles replaced (for every sequence length)."""
    saved = _launch_sm90.FWD_SM90_TILES, _launch_sm90.FWD_SM90_SHORT_TILES
    _launch_sm90.FWD_SM90_TILES = {**saved[0], **overrides}
    _launch_sm90.FWD_SM90_SHORT_TILES = {
        width: tile for width, tile in saved[1].items() if width not in overrides}
    _launch_sm90.fwd_sm90_spec.cache_clear()
    try:
        return _launch_sm90.plan_sm90(*args, **kwargs)
    finally:
        _launch_sm90.FWD_SM90_TILES, _launch_sm90.FWD_SM90_SHORT_TILES = saved
        _launch_sm90.fwd_sm90_spec.cache_clear()


def use_sources(root: pathlib.Path) -> None:
    """Point cuflash's kernel compiler at `root` (and forget what it compiled from elsewhere)."""
    _compile.kernels_dir = lambda: root
    _compile.expanded_source.cache_clear()
    _compile._functions.clear()


def time_ms(fn, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def cell(variants: dict, tiles: dict, dtype, D: int, causal: bool, S: int) -> str:
    B, H = 16384 // S, 2048 // D
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dtype) for _ in range(3))
    qc, kc, vc = (cupy.from_dlpack(x) for x in (q, k, v))
    outs, runs = {}, {}
    for name, root in variants.items():
        use_sources(root)
        outs[name] = torch.full_like(q, float("nan"))
        oc = cupy.from_dlpack(outs[name])
        plan = plan_with_tiles(
            tiles[name], qc, kc, vc, oc, causal=causal, scale=D**-0.5, device_id=0, cc=90
        )
        if plan is None:
            raise SystemExit(f"{name}: the Hopper forward does not take this problem")
        pointers = {
            "q": qc.data.ptr,
            "k": kc.data.ptr,
            "v": vc.data.ptr,
            "o": oc.data.ptr,
            "lse": 0,
        }
        runs[name] = functools.partial(plan, pointers)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F(qh, kh, vh, is_causal=causal)

    runs["cudnn"] = cudnn
    for run in runs.values():
        run()
    torch.cuda.synchronize()
    first = next(iter(variants))
    if S <= REFERENCE_MAX_SEQLEN:
        ref = F(qh.float(), kh.float(), vh.float(), is_causal=causal).transpose(1, 2)
    else:
        ref = outs[first].float()
    diffs = [(outs[n].float() - ref).abs().max().item() for n in variants]
    flops = 4 * B * H * S * S * D * (0.5 if causal else 1)
    order = list(runs)
    times = {n: [] for n in order}
    for turn in range(2 * len(order)):
        for name in order[turn % len(order) :] + order[: turn % len(order)]:
            times[name].append(time_ms(runs[name], CALLS_PER_TURN))
    tflops = {n: flops / np.median(t) / 1e9 for n, t in times.items()}
    last = list(variants)[-1]
    values = [f"{tflops[n]:.0f}" for n in order]
    values += [f"{tflops[n] / tflops[first]:.3f}" for n in list(variants)[1:]]
    values += [f"{tflops[last] / tflops['cudnn']:.2f}", "/".join(f"{d:.0e}" for d in diffs)]
    mask = "causal" if causal else "full"
    return f"| {str(dtype)[6:]} | {D} | {mask} | {S} | " + " | ".join(values) + " |"


def main() -> None:
    args, variants, tiles = parse_args()
    original = _compile.kernels_dir
    names = list(variants)
    print(
        "| dtype | D | mask | S | "
        + " | ".join(names)
        + " | cudnn | "
        + " | ".join(f"{n}/{names[0]}" for n in names[1:])
        + f" | {names[-1]}/cudnn | max diff |"
    )
    print("|" + "---|" * (7 + 2 * len(names) - 1))
    try:
        for dtype in (getattr(torch, d) for d in args.dtypes):
            for D in args.dims:
                for causal in (m == "causal" for m in args.masks):
                    for S in args.seqlens:
                        print(cell(variants, tiles, dtype, D, causal, S), flush=True)
                        torch.cuda.empty_cache()
    finally:
        _compile.kernels_dir = original


if __name__ == "__main__":
    main()
