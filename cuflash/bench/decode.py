"""``python -m cuflash bench --decode``: decoding against a KV cache, cuflash's split-KV kernel
against SDPA's cuDNN and flash backends.

Cells: bf16, D 128, Hq/Hkv 32/8 and 8/1, Sq 1 and 4 query steps, (B, Sk) from one long sequence
to many short ones; the cache full (Sk keys a sequence), no mask (SDPA's causal mask is top-left
aligned, so Sq > 1 would not be the same problem). The figure of merit is the KV cache bytes read
per second (2 B Sk Hkv D itemsize bytes a call).

Timing is of the GPU: each library's calls are captured into one CUDA graph (cuflash's prepared
launches, `cuflash.cuda._decode.prepare`; SDPA's calls with ``enable_gqa``) that cycles through
enough caches to exceed the L2 cache, and the graph is replayed between CUDA events after
warm-up; the median of `repeats` replays. Paged caches (pages of 16 and 64, shuffled block
tables) are timed beside the contiguous one. ``host us`` is the wall time of one eager
`cuflash.attention_with_kvcache` call (host work included), for comparison with the GPU time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

CELLS = ((1, 8192), (1, 131072), (16, 8192), (64, 4096), (8, 32768))
HEADS = ((32, 8), (8, 1))
STEPS = (1, 4)
L2_BYTES = 50 * 2**20


def _graph_ms(torch, launches, calls: int, repeats: int) -> float:
    """Median ms per launch of `launches` (callables of the stream, cycled) captured `calls`
    times into one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in launches:  # warm: compile, allocate
            fn(stream)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        capture = torch.cuda.current_stream()
        for i in range(calls):
            launches[i % len(launches)](capture)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def _cell(torch, batch: int, seqlen_k: int, heads_q: int, heads_kv: int, steps: int,
          args) -> list[dict]:
    import cuflash
    from cuflash import _interop
    from cuflash._core import compute_capability
    from cuflash._variant import Variant
    from cuflash.cuda import _decode

    dim, dtype = 128, torch.bfloat16
    cache_bytes = 2 * batch * seqlen_k * heads_kv * dim * 2
    sets = max(1, min(args.max_sets, -(-4 * L2_BYTES // cache_bytes)))
    rng = np.random.default_rng(args.seed)
    qs = [torch.randn(batch, steps, heads_q, dim, device="cuda", dtype=dtype)
          for _ in range(sets)]
    ks = [torch.randn(batch, seqlen_k, heads_kv, dim, device="cuda", dtype=dtype)
          for _ in range(sets)]
    vs = [torch.randn(batch, seqlen_k, heads_kv, dim, device="cuda", dtype=dtype)
          for _ in range(sets)]
    seqlens = np.full(batch, seqlen_k, np.int32)
    src = _interop.source_of(qs[0], "q")
    cc = compute_capability(src.device_id)
    variant = Variant.of(causal=False)
    rows = []

    def record(impl: str, ms: float, **extra):
        rows.append({"impl": impl, "batch": batch, "seqlen_k": seqlen_k, "heads_q": heads_q,
                     "heads_kv": heads_kv, "steps": steps, "ms": ms,
                     "gbps": cache_bytes / ms / 1e6, **extra})

    def prepared(q, k, v, table=None, page_size=0, splits=args.splits):
        with _interop.stream_scope(src):
            qb, kb, vb = (_interop.to_backend(x, src) for x in (q, k, v))
            return _decode.prepare(q, qb, kb, vb, variant=variant, scale=dim ** -0.5, src=src,
                                   cc=cc, seqlens_k=seqlens, leftpad=None, rows=None,
                                   table=table, page_size=page_size, num_splits=splits)

    preps = [prepared(q, k, v) for q, k, v in zip(qs, ks, vs, strict=True)]
    record("cuflash", _graph_ms(torch, [lambda s, p=p: p.launch(s.cuda_stream) for p in preps],
                                args.calls, args.repeats), splits=preps[0].splits)
    del preps
    for splits in args.sweep:
        preps = [prepared(q, k, v, splits=splits) for q, k, v in zip(qs, ks, vs, strict=True)]
        record(f"cuflash splits {splits}",
               _graph_ms(torch, [lambda s, p=p: p.launch(s.cuda_stream) for p in preps],
                         args.calls, args.repeats), splits=preps[0].splits)
        del preps
    for page in args.pages:
        pages = batch * seqlen_k // page
        paged = []
        for q, k, v in zip(qs, ks, vs, strict=True):
            order = rng.permutation(pages)
            table = order.reshape(batch, seqlen_k // page).astype(np.int32)
            # page p of the shuffled cache holds the keys the table says it holds
            kp, vp = (torch.empty(pages, page, heads_kv, dim, device="cuda", dtype=dtype)
                      for _ in range(2))
            index = torch.as_tensor(order, device="cuda")
            kp[index] = k.reshape(pages, page, heads_kv, dim)
            vp[index] = v.reshape(pages, page, heads_kv, dim)
            paged.append(prepared(q, kp, vp, table, page))
        record(f"cuflash paged {page}",
               _graph_ms(torch, [lambda s, p=p: p.launch(s.cuda_stream) for p in paged],
                         args.calls, args.repeats))
        del paged

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    for name, backend in (("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa flash", SDPBackend.FLASH_ATTENTION)):
        def launch(stream, i=[0], backend=backend):  # noqa: B006 (a counter across calls)
            j = i[0] % sets
            i[0] += 1
            with sdpa_kernel(backend):
                sdpa(qs[j].transpose(1, 2), ks[j].transpose(1, 2), vs[j].transpose(1, 2),
                     enable_gqa=heads_q != heads_kv)
        try:
            record(name, _graph_ms(torch, [launch] * sets, args.calls, args.repeats))
        except Exception as err:  # a backend that refuses the shape: say so, go on
            print(f"{name} B{batch} Sk{seqlen_k} {heads_q}/{heads_kv} Sq{steps}: "
                  f"{type(err).__name__}: {str(err)[:200]}", file=sys.stderr)

    # host time of the public call (eager, synchronised each time)
    walls = []
    for i in range(args.repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        cuflash.attention_with_kvcache(qs[i % sets], ks[i % sets], vs[i % sets],
                                       cache_seqlens=seqlens, causal=False)
        walls.append(time.perf_counter() - start)
    rows[0]["host_us"] = statistics.median(walls) * 1e6
    return rows


def table(rows: list[dict], copy_gbps: float | None) -> str:
    """Markdown: one line per cell, GB/s of each implementation and cuflash's ratios."""
    cells = sorted({(r["heads_q"], r["heads_kv"], r["steps"], r["batch"], r["seqlen_k"])
                    for r in rows}, key=lambda c: (-c[0], c[2], c[3] * c[4], c[3]))
    get = {(r["impl"], r["heads_q"], r["heads_kv"], r["steps"], r["batch"], r["seqlen_k"]): r
           for r in rows}
    lines = ["| Hq/Hkv | Sq | B | Sk | splits | cuflash us | cuflash GB/s | paged 16 | paged 64 "
             "| cuDNN GB/s | flash GB/s | vs best SDPA | vs copy | host us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        hq, hkv, sq, b, sk = cell

        def gbps(impl, cell=cell):
            r = get.get((impl, *cell))
            return None if r is None else r["gbps"]

        ours = get.get(("cuflash", hq, hkv, sq, b, sk))
        peers = [x for x in (gbps("sdpa cudnn"), gbps("sdpa flash")) if x]
        best = max(peers) if peers else None

        def f(x, spec=".0f"):
            return "-" if x is None else format(x, spec)

        lines.append(
            f"| {hq}/{hkv} | {sq} | {b} | {sk} | {ours['splits'] if ours else '-'} "
            f"| {f(ours and ours['ms'] * 1e3, '.1f')} | {f(gbps('cuflash'))} "
            f"| {f(gbps('cuflash paged 16'))} | {f(gbps('cuflash paged 64'))} "
            f"| {f(gbps('sdpa cudnn'))} | {f(gbps('sdpa flash'))} "
            f"| {f(ours and best and ours['gbps'] / best, '.2f')} "
            f"| {f(ours and copy_gbps and ours['gbps'] / copy_gbps, '.2f')} "
            f"| {f(ours and ours.get('host_us'))} |")
    return "\n".join(lines)


def sweep_table(rows: list[dict], sweep: tuple[int, ...]) -> str:
    """Markdown: microseconds of each cell at each split count of `--sweep` (the count used
    where the keys have fewer tiles), beside the chosen count's."""
    cells = sorted({(r["heads_q"], r["heads_kv"], r["steps"], r["batch"], r["seqlen_k"])
                    for r in rows}, key=lambda c: (-c[0], c[2], c[3] * c[4], c[3]))
    get = {(r["impl"], r["heads_q"], r["heads_kv"], r["steps"], r["batch"], r["seqlen_k"]): r
           for r in rows}
    lines = ["| Hq/Hkv | Sq | B | Sk | chosen | us | "
             + " | ".join(f"{n} splits us" for n in sweep) + " | best |",
             "|---|---|---|---|---|---|" + "---|" * (len(sweep) + 1)]
    for cell in cells:
        ours = get.get(("cuflash", *cell))
        if ours is None:
            continue
        swept = [get.get((f"cuflash splits {n}", *cell)) for n in sweep]
        timed = [(r["ms"], r["splits"]) for r in swept if r is not None] + [
            (ours["ms"], ours["splits"])]
        best = min(timed)
        hq, hkv, sq, b, sk = cell
        lines.append(f"| {hq}/{hkv} | {sq} | {b} | {sk} | {ours['splits']} "
                     f"| {ours['ms'] * 1e3:.1f} | "
                     + " | ".join("-" if r is None else f"{r['ms'] * 1e3:.1f}" for r in swept)
                     + f" | {best[1]} |")
    return "\n".join(lines)


def copy_bandwidth(torch, args) -> float:
    """GB/s of a device-to-device copy of 1 GiB (read plus write), the yardstick."""
    n = 2**29
    a = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = _graph_ms(torch, [lambda s: b.copy_(a)], 4, args.repeats)
    return 2 * a.numel() * 2 / ms / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuflash bench --decode",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="calls per graph")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--splits", type=int, default=0, help="num_splits (0: chosen)")
    parser.add_argument("--sweep", type=lambda t: tuple(int(x) for x in t.split(",") if x),
                        default=(), help="also time these split counts, e.g. 1,8,32,128")
    parser.add_argument("--pages", type=lambda t: tuple(int(x) for x in t.split(",") if x),
                        default=(16, 64))
    parser.add_argument("--max-sets", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="two cells")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write decode.json into this directory")
    args = parser.parse_args(argv)
    from cuflash.bench.torch_gpu import cuda_torch

    torch = cuda_torch("--decode")
    if torch is None:
        return 2
    copy = copy_bandwidth(torch, args)
    rows = []
    cells = CELLS[:2] if args.quick else CELLS
    for heads_q, heads_kv in HEADS:
        for steps in STEPS:
            for batch, seqlen_k in cells:
                rows += _cell(torch, batch, seqlen_k, heads_q, heads_kv, steps, args)
                torch.cuda.empty_cache()
                print(f"done Hq/Hkv {heads_q}/{heads_kv} Sq {steps} B {batch} Sk {seqlen_k}",
                      file=sys.stderr, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                "copy_gbps": copy, "argv": sys.argv}
        (args.out / "decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"device-to-device copy: {copy:.0f} GB/s")
    print(table(rows, copy))
    if args.sweep:
        print(sweep_table(rows, args.sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
