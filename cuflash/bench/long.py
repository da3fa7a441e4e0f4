"""``python -m cuflash bench --long``: causal attention up to a million tokens on one GPU.

For each S (default 128k, 256k, 512k, 1M), B=1, H=16 (Hkv=16), D=128, bf16, causal: one
forward (`cuflash.attention`, ``return_lse=True``, into a NaN-poisoned ``out=``) then one
backward (`cuflash.attention_backward`), timed separately with CUDA events, after a warm-up at a
small S (compiles); 3 timed repetitions at S <= 128k, 2 at 256k, 1 above (the median is
reported). Inputs are fresh standard-normal values made on the GPU. Every result must come back
finite: the forward's ``out=`` and every buffer cuflash allocates (lse, dq, dk, dv, its scratch)
start as 0xFF bytes (NaN), so an element no kernel wrote shows.

Memory, per S, from the allocator in the same process:

- cuflash (CuPy arrays): ``peak`` is the high-water mark of the bytes in use in CuPy's memory
  pool (a `cupy.cuda.MemoryHook` counting every allocation and free of the pool, starting from
  what the pool held in use when the point began, after all cached blocks were freed) over input
  creation, forward and backward: q, k, v, dout, out, lse, dq, dk, dv and cuflash's scratch
  (delta, the float32 dq accumulator). Also recorded in the JSON: ``pool_bytes`` (what the pool
  held from the driver at the end, cached blocks included: >= peak) and ``device_used_bytes``
  (``cudaMemGetInfo`` total - free at the end: every process's allocations and the CUDA
  contexts).
- SDPA (torch): ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, the same
  tensors through torch's caching allocator.

``tensor bytes`` are those of q, k, v, out, lse, dout, dq, dk, dv themselves; ``peak / S`` (bytes
per token) stays constant when memory is linear in S. TFLOP/s: causal forward ``2*2*B*H*S*S*D/2``,
backward 2.5 times that (the FlashAttention papers' count, `cuflash.bench.attention_flops`).

PyTorch SDPA's flash backend (``torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)``)
runs the same problems in the same process where torch is importable and sees the GPU, on
(B, S, H, D) tensors viewed as (B, H, S, D) as in the main sweep, backward through autograd;
where it fails (out of memory, no kernel) its cells read "-" and the reason is kept. The backward
timings of cuflash include filling its fresh buffers with 0xFF (about 20 GiB written at 1M
tokens: a few ms of tens of seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cuflash.bench.config import DTYPE_ALIASES, GIB, KIB, SHORT_DTYPE, attention_flops
from cuflash.bench.devices import poisoning_allocator, pool_peak_hook

DEFAULT_SEQLENS = (131072, 262144, 524288, 1048576)
WARMUP_SEQLEN = 4096
CHUNK = 1 << 26  # elements per step of the whole-tensor passes (random fill, finite check)


# ---- sizes and formatting (no GPU needed) ----------------------------------------------------


def parse_seqlen(text: str) -> int:
    """ "131072" -> 131072, "128k" -> 131072, "1M" -> 1048576."""
    text = text.strip().lower()
    scale = {"k": 2**10, "m": 2**20}.get(text[-1:], 1)
    value = int(text[:-1] if scale > 1 else text) * scale
    if value < 1:
        raise argparse.ArgumentTypeError(f"sequence length must be >= 1, got {text!r}")
    return value


def fmt_seqlen(seqlen: int) -> str:
    """1048576 -> "1M", 131072 -> "128k", 1000 -> "1000"."""
    if seqlen % 2**20 == 0:
        return f"{seqlen // 2**20}M"
    if seqlen % 2**10 == 0:
        return f"{seqlen // 2**10}k"
    return str(seqlen)


def default_repeats(seqlen: int) -> int:
    """Timed repetitions at `seqlen`: a 1M backward alone takes tens of seconds."""
    return 3 if seqlen <= 131072 else 2 if seqlen <= 262144 else 1


def tensor_bytes(batch: int, heads: int, seqlen: int, head_dim: int, itemsize: int) -> int:
    """q, k, v, out, dout, dq, dk, dv (the input dtype) and lse (float32 per query row)."""
    return 8 * batch * seqlen * heads * head_dim * itemsize + 4 * batch * heads * seqlen


def pass_flops(batch: int, heads: int, seqlen: int, head_dim: int, pass_: str) -> float:
    """Causal forward 2*2*B*H*S*S*D/2; backward 2.5x."""
    return attention_flops(batch, heads, seqlen, seqlen, head_dim, causal=True, pass_=pass_)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cuflash bench --long",
        description="Causal forward and backward at up to a million tokens on one GPU: time "
                    "(CUDA events), TFLOP/s, peak memory and memory per token, against PyTorch "
                    "SDPA's flash backend where torch sees the GPU.")
    seqlens = lambda text: tuple(parse_seqlen(x) for x in text.split(",") if x.strip())  # noqa: E731
    parser.add_argument("--seqlens", type=seqlens, default=DEFAULT_SEQLENS,
                        help="comma list, e.g. 128k,1M (default 128k,256k,512k,1M)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16, help="query and key/value heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--repeats", type=int,
                        help="timed repetitions per S (default 3 up to 128k, 2 at 256k, 1 above)")
    parser.add_argument("--warmup-seqlen", type=parse_seqlen, default=WARMUP_SEQLEN,
                        help=f"S of the untimed warm-up call (default {WARMUP_SEQLEN})")
    parser.add_argument("--no-sdpa", action="store_true", help="time cuflash only")
    parser.add_argument("--sdpa-max-seqlen", type=parse_seqlen,
                        help="run SDPA only up to this S (default: every S)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write long.json and long.md into this directory")
    return parser


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """Markdown, one line per (S, implementation)."""
    lines = ["| S | impl | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | peak GiB | tensors GiB "
             "| peak - tensors GiB | peak KiB/token | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak, tensors = r.get("peak_bytes"), r.get("tensor_bytes")
        extra = None if peak is None or tensors is None else (peak - tensors) / GIB
        per_token = None if peak is None else peak / (r["batch"] * r["seqlen"]) / KIB
        note = r.get("note") or ""
        lines.append(
            f"| {fmt_seqlen(r['seqlen'])} | {r['impl']} | {_number(r.get('fwd_ms'), '.1f')} "
            f"| {_number(r.get('fwd_tflops'), '.0f')} | {_number(r.get('bwd_ms'), '.1f')} "
            f"| {_number(r.get('bwd_tflops'), '.0f')} "
            f"| {_number(None if peak is None else peak / GIB, '.2f')} "
            f"| {_number(None if tensors is None else tensors / GIB, '.2f')} "
            f"| {_number(extra, '.2f')} | {_number(per_token, '.2f')} | {note} |")
    return "\n".join(lines)


def linearity(rows: list[dict], impl: str) -> str | None:
    """One line: the spread of peak bytes per token over S (1.00x: exactly linear)."""
    per_token = {r["seqlen"]: r["peak_bytes"] / (r["batch"] * r["seqlen"])
                 for r in rows if r["impl"] == impl and r.get("peak_bytes")}
    if len(per_token) < 2:
        return None
    low, high = min(per_token.values()), max(per_token.values())
    span = ", ".join(fmt_seqlen(s) for s in sorted(per_token))
    return (f"{impl}: peak per token {low / KIB:.2f}-{high / KIB:.2f} KiB over S = {span} "
            f"(max/min {high / low:.3f}: memory linear in S)")


def timing_fields(fwd_ms: list[float], bwd_ms: list[float], batch: int, heads: int,
                  seqlen: int, head_dim: int) -> dict:
    """Median ms and TFLOP/s of each pass, plus every timed repetition."""
    fields = {"fwd_times_ms": fwd_ms, "bwd_times_ms": bwd_ms}
    for pass_, times in (("fwd", fwd_ms), ("bwd", bwd_ms)):
        if times:
            ms = statistics.median(times)
            fields[f"{pass_}_ms"] = ms
            fields[f"{pass_}_tflops"] = pass_flops(batch, heads, seqlen, head_dim, pass_) / ms / 1e9
    return fields


# ---- cuflash on CuPy arrays ------------------------------------------------------------------


def _random_cupy(cupy, rng, shape, dtype: str):
    """Standard-normal values in `dtype` made on the GPU a chunk at a time (no full float32
    copy); bfloat16 rounded to nearest even from float32 bits (needs ml_dtypes for the dtype)."""
    if dtype == "bfloat16":
        import ml_dtypes

        x = cupy.empty(shape, dtype=cupy.uint16)
    else:
        x = cupy.empty(shape, dtype=dtype)
    flat = x.reshape(-1)
    for begin in range(0, flat.size, CHUNK):
        part = rng.standard_normal(min(CHUNK, flat.size - begin), dtype=cupy.float32)
        if dtype == "bfloat16":
            bits = part.view(cupy.uint32)
            part = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cupy.uint16)
        flat[begin:begin + part.size] = part
    return x.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else x


def _finite_cupy(cupy, x) -> bool:
    """Whether every element of a contiguous float16/bfloat16/float32 array is finite (from its
    bits, a chunk at a time)."""
    itemsize = x.dtype.itemsize
    flat = x.view(cupy.uint16 if itemsize == 2 else cupy.uint32).reshape(-1)
    magnitude, exponent = {("float16", 2): (0x7FFF, 0x7C00), ("bfloat16", 2): (0x7FFF, 0x7F80),
                           ("float32", 4): (0x7FFFFFFF, 0x7F800000)}[(str(x.dtype), itemsize)]
    return all(not bool(((flat[b:b + CHUNK] & magnitude) >= exponent).any())
               for b in range(0, flat.size, CHUNK))


def _release_cupy(cupy) -> None:
    cupy.cuda.Device().synchronize()
    cupy.get_default_memory_pool().free_all_blocks()


def run_cuflash(cupy, args, seqlen: int, repeats: int) -> dict:
    """One cuflash point: `repeats` timed forwards and backwards, peak pool memory, finiteness."""
    import cuflash

    dtype = DTYPE_ALIASES[args.dtype]
    shape = (args.batch, seqlen, args.heads, args.head_dim)
    row = {"impl": "cuflash", "seqlen": seqlen, "batch": args.batch, "heads": args.heads,
           "head_dim": args.head_dim, "dtype": dtype, "repeats": repeats}
    _release_cupy(cupy)
    pool = cupy.get_default_memory_pool()
    hook = pool_peak_hook(pool.used_bytes())
    event = cupy.cuda.Event
    fwd_ms, bwd_ms, finite = [], [], True
    with hook, cupy.cuda.using_allocator(poisoning_allocator(cupy)):
        rng = cupy.random.default_rng(args.seed)
        q, k, v, dout = (_random_cupy(cupy, rng, shape, dtype) for _ in range(4))
        out = cupy.empty_like(q)  # poisoned by the allocator
        for _ in range(repeats):
            start, middle, stop = event(), event(), event()
            start.record()
            _, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, out=out)
            middle.record()
            grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
            stop.record()
            stop.synchronize()
            fwd_ms.append(cupy.cuda.get_elapsed_time(start, middle))
            bwd_ms.append(cupy.cuda.get_elapsed_time(middle, stop))
            finite = finite and all(_finite_cupy(cupy, x) for x in (out, lse, *grads))
            del grads
            cupy.cuda.runtime.memset(out.data.ptr, 0xFF, out.nbytes)  # poisoned again
        free, total = cupy.cuda.runtime.memGetInfo()
        item = q.dtype.itemsize
        del q, k, v, dout, out, lse
    row.update(timing_fields(fwd_ms, bwd_ms, args.batch, args.heads, seqlen, args.head_dim))
    row.update(peak_bytes=int(hook.peak), pool_bytes=int(pool.total_bytes()),
               device_used_bytes=int(total - free),
               tensor_bytes=tensor_bytes(args.batch, args.heads, seqlen, args.head_dim, item),
               finite=finite, note="" if finite else "NON-FINITE RESULTS")
    _release_cupy(cupy)
    return row


# ---- PyTorch SDPA, flash backend ---------------------------------------------------------------


def run_sdpa(torch, args, seqlen: int, repeats: int) -> dict:
    """One SDPA (flash backend) point, or a row whose note says why it did not run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    dtype = DTYPE_ALIASES[args.dtype]
    row = {"impl": "sdpa-flash", "seqlen": seqlen, "batch": args.batch, "heads": args.heads,
           "head_dim": args.head_dim, "dtype": dtype, "repeats": repeats}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    shape = (args.batch, seqlen, args.heads, args.head_dim)
    generator = torch.Generator(device="cuda")
    generator.manual_seed(args.seed)
    fwd_ms, bwd_ms, finite = [], [], True
    try:
        q, k, v, dout = (torch.randn(shape, generator=generator, device="cuda",
                                     dtype=getattr(torch, dtype)) for _ in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            for _ in range(repeats):
                start, middle, stop = (torch.cuda.Event(enable_timing=True) for _ in range(3))
                start.record()
                out = sdpa(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)
                middle.record()
                grads = torch.autograd.grad(out, (q, k, v), dout.transpose(1, 2))
                stop.record()
                stop.synchronize()
                fwd_ms.append(start.elapsed_time(middle))
                bwd_ms.append(middle.elapsed_time(stop))
                finite = finite and all(_finite_torch(torch, x) for x in (out, *grads))
                del out, grads
        item = q.element_size()
        del q, k, v, dout
    except Exception as err:  # out of memory, no kernel for the problem: a "-" with the reason
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        row["note"] = f"{type(err).__name__}: {text}"[:200]
        torch.cuda.empty_cache()
        return row
    row.update(timing_fields(fwd_ms, bwd_ms, args.batch, args.heads, seqlen, args.head_dim))
    row.update(peak_bytes=int(torch.cuda.max_memory_allocated()),
               tensor_bytes=tensor_bytes(args.batch, args.heads, seqlen, args.head_dim, item),
               finite=finite, note="" if finite else "NON-FINITE RESULTS")
    torch.cuda.empty_cache()
    return row


def _finite_torch(torch, x) -> bool:
    flat = x.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[b:b + CHUNK]).all()) for b in range(0, flat.numel(), CHUNK))


# ---- main ------------------------------------------------------------------------------------


def _torch_or_reason():
    """(torch, None) when torch sees the GPU, else (None, why not)."""
    try:
        import torch
    except ImportError as err:
        return None, f"torch is not importable ({err})"
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA GPU"
    return torch, None


def _warm_up(cupy, torch, args) -> None:
    """Compile cuflash's kernels (and load SDPA's) at a small S; untimed."""
    warm = argparse.Namespace(**{**vars(args), "seqlens": (args.warmup_seqlen,)})
    run_cuflash(cupy, warm, args.warmup_seqlen, 1)
    if torch is not None:
        run_sdpa(torch, warm, args.warmup_seqlen, 1)


def run(args, progress: Callable[[str], None]) -> tuple[list[dict], str | None]:
    """Every point, in order of S: cuflash, then SDPA. Returns the rows and why SDPA did not run
    (None when it did)."""
    import cupy

    torch, no_sdpa = (None, "--no-sdpa") if args.no_sdpa else _torch_or_reason()
    progress(f"warm-up at S={fmt_seqlen(args.warmup_seqlen)} (compiles cuflash's kernels)")
    _warm_up(cupy, torch, args)
    rows = []
    for seqlen in args.seqlens:
        repeats = args.repeats or default_repeats(seqlen)
        progress(f"S={fmt_seqlen(seqlen)} cuflash x{repeats}")
        rows.append(run_cuflash(cupy, args, seqlen, repeats))
        if torch is None:
            continue
        if args.sdpa_max_seqlen is not None and seqlen > args.sdpa_max_seqlen:
            rows.append({"impl": "sdpa-flash", "seqlen": seqlen, "batch": args.batch,
                         "heads": args.heads, "head_dim": args.head_dim,
                         "note": f"not run: --sdpa-max-seqlen {args.sdpa_max_seqlen}"})
            continue
        progress(f"S={fmt_seqlen(seqlen)} sdpa-flash x{repeats}")
        rows.append(run_sdpa(torch, args, seqlen, repeats))
    return rows, no_sdpa


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cuflash.bench.devices import Gpu, find_gpu

    no_gpu = find_gpu()
    if no_gpu:
        print(f"bench --long needs a CUDA GPU ({no_gpu})", file=sys.stderr)
        return 2
    device = Gpu("cupy")
    dtype = DTYPE_ALIASES[args.dtype]
    print(f"cuflash bench --long on {device.name}: B={args.batch}, H={args.heads}, "
          f"D={args.head_dim}, {SHORT_DTYPE[dtype]}, causal, S = "
          f"{', '.join(fmt_seqlen(s) for s in args.seqlens)}", flush=True)
    began = time.perf_counter()

    def progress(text: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f} s] {text}", file=sys.stderr, flush=True)

    rows, no_sdpa = run(args, progress)
    text = table(rows)
    lines = [line for line in (linearity(rows, "cuflash"), linearity(rows, "sdpa-flash")) if line]
    if no_sdpa:
        lines.append(f"SDPA not run: {no_sdpa}")
    if args.out:
        from cuflash.bench.provenance import environment

        args.out.mkdir(parents=True, exist_ok=True)
        config = {**vars(args), "out": str(args.out)}
        record = {"command": "python -m cuflash bench --long" + "".join(
                      f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
                  "environment": environment(device), "config": config,
                  "flops": "causal fwd = 2*2*B*H*S*S*D/2; bwd = 2.5*fwd",
                  "memory": "cuflash: CuPy pool bytes in use, high-water (MemoryHook); "
                            "sdpa: torch.cuda.max_memory_allocated",
                  "rows": rows, "summary": lines, "seconds": time.perf_counter() - began}
        (args.out / "long.json").write_text(json.dumps(record, indent=1) + "\n")
        (args.out / "long.md").write_text(text + "\n\n" + "\n".join(lines) + "\n")
    print(text)
    for line in lines:
        print(line)
    print(f"({time.perf_counter() - began:.0f} s)")
    return 1 if any(r["impl"] == "cuflash" and not r.get("finite", False) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
