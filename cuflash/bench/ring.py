"""``python -m cuflash bench --ring``: ring attention (context parallelism) across the GPUs of one
host, per-GPU efficiency against the single-GPU kernel.

One process per GPU (``--world`` of them, default: every GPU torch sees), joined in an NCCL
group. For each total sequence length S and mask, bf16, B = 1, ``--heads`` heads of ``--head-dim``:

- ``ring``: `cuflash.torch.ring_attention` on each rank's S / world positions (zigzag shards
  with ``causal``), forward without grad, and backward through autograd;
- ``single``: `cuflash.torch.attention` alone on one GPU over S / world positions with the same
  mask: the kernel at the same per-GPU length, the yardstick of per-GPU efficiency;
- ``cp-sdpa``: PyTorch's ``context_parallel`` (``torch.distributed.tensor.experimental``) with
  SDPA over the same mesh, where this torch has it and it runs.

Per-GPU TFLOP/s count the whole problem's FLOPs (`cuflash.bench.attention_flops`: forward
``4*B*H*S*S*D``, halved when causal, backward 2.5 times that) divided by world and by the slowest
rank's time; tokens/s = S / that time. ``efficiency`` = ring's per-GPU TFLOP/s / single's
TFLOP/s (the target: at least 0.9 at 4 GPUs from S = 256k). CUDA events after warm-up, the
median of ``--repeats`` timings, each rank timing its own and the maximum over ranks reported.

``--budget`` (seconds) skips the cells left once it is spent; ``--out DIR`` writes ``ring.json``
(rows, configuration, command, environment) and ``ring.md`` (the table). Needs torch with CUDA
and NCCL: without them it says so and exits with status 2. A world of one runs the same code
path (every step's K/V stays put), which measures the ring's own overhead. ``--device cpu``
runs the same processes on the CPU path over gloo (float32, wall-clock timing): a smoke test of
the benchmark itself, not a measurement.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

from cuflash.bench.config import attention_flops, seqlens_arg
from cuflash.bench.torch_gpu import cuda_torch, environment, provenance

IMPLS = ("ring", "single", "cp-sdpa")
PASSES = ("fwd", "bwd")
SEQLENS = (131072, 262144, 524288, 1048576)
CAUSAL = {"both": (False, True), "yes": (True,), "no": (False,)}
TARGET = 0.9  # ring / single per-GPU efficiency at 4 GPUs, S >= 256k
FLOPS = "fwd = 4*B*H*S*S*D (x0.5 causal); bwd = 2.5*fwd; per GPU = / world"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cuflash bench --ring",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int,
                        help="GPUs (processes) in the ring (default: every GPU torch sees; "
                             "--device cpu: 2)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (NCCL, bf16) or cpu (gloo, float32: a smoke test)")
    parser.add_argument("--seqlens", type=seqlens_arg, default=SEQLENS,
                        help="total sequence lengths, comma list (default 128k,256k,512k,1m); "
                             "each a multiple of 2 * world")
    parser.add_argument("--causal", choices=tuple(CAUSAL), default="both",
                        help="causal mask, no mask, or both (default)")
    parser.add_argument("--heads", type=int, default=8, help="query and key heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="default 128")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timings per cell; the median is kept (default 3)")
    parser.add_argument("--budget", type=float,
                        help="seconds for the sweep; the cells left once it is spent are skipped")
    parser.add_argument("--no-cp", action="store_true",
                        help="skip PyTorch's context_parallel with SDPA")
    parser.add_argument("--out", type=Path, help="write ring.json and ring.md into this directory")
    return parser


def cells(args: argparse.Namespace) -> list[tuple[int, bool]]:
    """(total S, causal) of every cell, in the order they run."""
    return [(s, c) for s in args.seqlens for c in CAUSAL[args.causal]]


def check(args: argparse.Namespace, world: int) -> str | None:
    """Why these flags cannot run on `world` GPUs, or None."""
    if world < 1:
        return f"--world must be >= 1, got {world}"
    for s in args.seqlens:
        if s % (2 * world):
            return f"--seqlens: {s} is not a multiple of 2 * world = {2 * world}"
    if args.heads < 1 or args.head_dim < 1 or args.repeats < 1:
        return "--heads, --head-dim and --repeats must be >= 1"
    return None


# ---- one rank ----------------------------------------------------------------------------------


def _median_ms(torch, fn, repeats: int, cuda: bool) -> float:
    """One warm-up call, then the median of `repeats` timings of one call: CUDA events, or
    wall-clock time on the CPU."""
    fn()
    if cuda:
        torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        if not cuda:
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1e3)
            continue
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop))
    return sorted(samples)[len(samples) // 2]


def _time(torch, fn, inputs, pass_: str, repeats: int, cuda: bool) -> float:
    q, k, v, dout = inputs
    if pass_ == "fwd":
        with torch.no_grad():
            return _median_ms(torch, lambda: fn(q, k, v), repeats, cuda)
    out = fn(*(x.detach().requires_grad_() for x in (q, k, v)))
    return _median_ms(torch, lambda: out.backward(dout, retain_graph=True), repeats, cuda)


def _cp_sdpa(torch, dist, world: int, causal: bool, device: str):
    """``time(inputs, pass_, repeats, cuda) -> ms``: PyTorch's context_parallel with SDPA on
    this rank's shard. context_parallel takes whole-sequence buffers and shards them in place
    on entry, so the shards are gathered first (untimed) and SDPA is timed inside the context
    on the shards it hands back."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.functional import scaled_dot_product_attention

    mesh = init_device_mesh(device, (world,))

    def time_pass(inputs, pass_: str, repeats: int, cuda: bool) -> float:
        full = []
        for x in inputs:  # q, k, v, dout: bshd shards -> whole bhsd sequences
            shard = x.transpose(1, 2).contiguous()
            parts = [torch.empty_like(shard) for _ in range(world)]
            dist.all_gather(parts, shard)
            full.append(torch.cat(parts, dim=2))
        with context_parallel(mesh, buffers=full, buffer_seq_dims=[2] * len(full)):
            return _time(torch, lambda q, k, v: scaled_dot_product_attention(
                q, k, v, is_causal=causal), full, pass_, repeats, cuda)

    return time_pass


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    import torch
    import torch.distributed as dist

    import cuflash.torch as cft

    cuda = args.device == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if cuda:
            torch.cuda.set_device(rank)
            dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world)
        deadline = None if args.budget is None else time.perf_counter() + args.budget
        rows = []
        for seqlen, causal in cells(args):
            base = {"seqlen": seqlen, "world": world, "heads": args.heads,
                    "head_dim": args.head_dim, "causal": causal}
            over = deadline is not None and time.perf_counter() > deadline
            flag = torch.tensor([1.0 if over else 0.0], device=dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank skips alike
            if flag.item():
                rows += [{"impl": i, "pass": p, **base, "status": "budget"}
                         for i in IMPLS for p in PASSES]
                continue
            local = seqlen // world
            g = torch.Generator(device=dev).manual_seed(seqlen + rank)
            inputs = [torch.randn(1, local, args.heads, args.head_dim, device=dev, dtype=dtype,
                                  generator=g) for _ in range(4)]
            timers = {name: functools.partial(_time, torch, fn) for name, fn in (
                ("ring", lambda q, k, v, c=causal: cft.ring_attention(q, k, v, causal=c)),
                ("single", lambda q, k, v, c=causal: cft.attention(q, k, v, causal=c)))}
            if not args.no_cp:
                try:
                    timers["cp-sdpa"] = _cp_sdpa(torch, dist, world, causal, dev.type)
                except Exception as err:  # this torch has no context_parallel
                    rows += [{"impl": "cp-sdpa", "pass": p, **base, "status": "error",
                              "error": _reason(err)} for p in PASSES]
            for name in IMPLS:
                if name not in timers:
                    continue
                for pass_ in PASSES:
                    row = {"impl": name, "pass": pass_, **base}
                    dist.barrier()
                    try:
                        ms = timers[name](inputs, pass_, args.repeats, cuda)
                        status = torch.tensor([ms], device=dev, dtype=torch.float64)
                    except Exception as err:  # out of memory, a refusal: say so, go on
                        row.update(status="error", error=_reason(err))
                        status = torch.tensor([float("nan")], device=dev, dtype=torch.float64)
                    if cuda:
                        torch.cuda.empty_cache()
                    dist.all_reduce(status, op=dist.ReduceOp.MAX)  # NaN wins: any rank failed
                    ms = float(status.item())
                    if "status" not in row:
                        if ms != ms:
                            row.update(status="error", error="failed on another rank")
                        else:
                            row.update(status="ok", ms=ms, **_rates(row, ms))
                    rows.append(row)
            if rank == 0:
                print(progress_line([r for r in rows if r["seqlen"] == seqlen
                                     and r["causal"] == causal]), file=sys.stderr, flush=True)
            del inputs, timers
            if cuda:
                torch.cuda.empty_cache()
        if rank == 0:
            results.put(("rows", rows))
        dist.destroy_process_group()
    except BaseException:
        results.put(("error", f"rank {rank}: {traceback.format_exc()}"))


def _rates(row: dict, ms: float) -> dict:
    """Per-GPU TFLOP/s and tokens/s of a timed row (single: its own one-GPU problem)."""
    world = 1 if row["impl"] == "single" else row["world"]
    seqlen = row["seqlen"] // row["world"] * world  # the positions this timing covered
    flops = attention_flops(1, row["heads"], seqlen, seqlen, row["head_dim"],
                            causal=row["causal"], pass_=row["pass"])
    return {"tflops_per_gpu": flops / world / ms / 1e9, "tokens_per_s": seqlen / ms * 1e3}


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


# ---- the table (no GPU needed) -----------------------------------------------------------------


def _get(rows: list[dict]) -> dict:
    return {(r["impl"], r["pass"], r["seqlen"], r["causal"]): r for r in rows}


def efficiency(ring: dict | None, single: dict | None) -> float | None:
    """ring's per-GPU TFLOP/s / single's, where both ran."""
    if ring and single and ring.get("tflops_per_gpu") and single.get("tflops_per_gpu"):
        return ring["tflops_per_gpu"] / single["tflops_per_gpu"]
    return None


def _value(row: dict | None, field: str, spec: str) -> str:
    if row is None:
        return "-"
    if row.get(field) is not None:
        return format(row[field], spec)
    return row.get("status") or "-"


def table(rows: list[dict]) -> str:
    """Markdown: one line per (pass, S, mask): ring, single and cp-sdpa per-GPU TFLOP/s, ring's
    tokens/s and ms, and the efficiency ring / single."""
    get = _get(rows)
    keys = sorted({(r["pass"], r["seqlen"], r["causal"]) for r in rows},
                  key=lambda k: (PASSES.index(k[0]), k[1], k[2]))
    world = rows[0]["world"] if rows else "-"
    lines = [f"| pass | S | mask | ring TFLOP/s/GPU | ring ms | ring tokens/s | single "
             f"TFLOP/s (S/{world}) | cp-sdpa TFLOP/s/GPU | ring/single |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for p, s, causal in keys:
        ring, single, cp = (get.get((i, p, s, causal)) for i in IMPLS)
        eff = efficiency(ring, single)
        lines.append(f"| {p} | {s} | {'causal' if causal else 'full'} "
                     f"| {_value(ring, 'tflops_per_gpu', '.0f')} | {_value(ring, 'ms', '.1f')} "
                     f"| {_value(ring, 'tokens_per_s', '.3g')} "
                     f"| {_value(single, 'tflops_per_gpu', '.0f')} "
                     f"| {_value(cp, 'tflops_per_gpu', '.0f')} "
                     f"| {'-' if eff is None else format(eff, '.2f')} |")
    return "\n".join(lines)


def progress_line(cell: list[dict]) -> str:
    first = cell[0]
    parts = [f"{r['impl']} {r['pass']} {_value(r, 'tflops_per_gpu', '.0f')}" for r in cell]
    return (f"S{first['seqlen']} world {first['world']} "
            f"{'causal' if first['causal'] else 'full'}: " + ", ".join(parts))


def caption(config: dict, world: int) -> str:
    cuda = config.get("device", "cuda") == "cuda"
    return (f"{'bf16' if cuda else 'float32 on the CPU path (gloo; a smoke test)'}, B = 1, "
            f"H = {config['heads']}, D = {config['head_dim']}, {world} "
            f"{'GPU(s)' if cuda else 'process(es)'}; "
            f"per-GPU TFLOP/s ({FLOPS}) from the slowest rank's median time; ring = "
            "cuflash.torch.ring_attention, single = cuflash.torch.attention on one GPU over "
            "S / world positions, cp-sdpa = torch context_parallel with SDPA")


def write_outputs(out: Path, record: dict) -> list[Path]:
    """``ring.json`` (`record` as is) and ``ring.md`` (caption, table and the provenance line)
    under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    line = provenance(record["environment"], record["command"], record["world"])
    paths = [out / "ring.json", out / "ring.md"]
    paths[0].write_text(json.dumps(record, indent=1) + "\n")
    paths[1].write_text("\n\n".join((caption(record["config"], record["world"]),
                                     table(record["rows"]), line)) + "\n")
    return paths


# ---- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Returns 0; 1 when a rank failed; 2 on a usage error or without torch, CUDA and NCCL."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda:
        torch = cuda_torch("--ring")
        if torch is None:
            return 2
    else:
        try:
            import torch
        except ImportError:
            print("bench --ring needs torch", file=sys.stderr)
            return 2
    import torch.distributed as dist
    import torch.multiprocessing as mp

    backend_ok = dist.is_available() and (dist.is_nccl_available() if cuda
                                          else dist.is_gloo_available())
    if not backend_ok:
        print(f"bench --ring needs torch.distributed with {'NCCL' if cuda else 'gloo'}",
              file=sys.stderr)
        return 2
    available = torch.cuda.device_count() if cuda else None
    world = args.world if args.world is not None else (available if cuda else 2)
    if cuda and world > available:
        parser.error(f"--world {world}: torch sees {available} GPU(s)")
    problem = check(args, world)
    if problem:
        parser.error(problem)
    began = time.perf_counter()
    where = torch.cuda.get_device_name() if cuda else "CPU process"
    print(f"cuflash bench --ring on {world} x {where}: {len(cells(args))} cells",
          file=sys.stderr, flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, args, results))
             for r in range(world)]
    for p in procs:
        p.start()
    rows, errors = None, []
    while rows is None and (any(p.is_alive() for p in procs) or not results.empty()):
        try:
            kind, payload = results.get(timeout=5)
        except Exception:  # queue.Empty: keep waiting while a rank lives
            continue
        if kind == "rows":
            rows = payload
        else:
            errors.append(payload)
            break
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if errors or rows is None:
        print("\n".join(errors) or "bench --ring: no rank reported", file=sys.stderr)
        return 1
    config = {**vars(args), "out": None if args.out is None else str(args.out)}
    if args.out:
        record = {"command": "python -m cuflash bench --ring" + "".join(f" {a}" for a in argv),
                  "environment": environment(torch), "world": world, "config": config,
                  "flops": FLOPS, "rows": rows, "seconds": time.perf_counter() - began}
        paths = write_outputs(args.out, record)
        print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    print(caption(config, world))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
