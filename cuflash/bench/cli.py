"""``python -m cuflash bench``'s command line: the flags, and `main`, which picks the device, runs
the sweeps and writes and prints the results (``--overhead``, ``--window``, ``--decode``,
``--softcap``, ``--long``, ``--ring`` and ``--jax`` hand over to `cuflash.bench.overhead`,
`cuflash.bench.window`, `cuflash.bench.decode`, `cuflash.bench.softcap`, `cuflash.bench.long`,
`cuflash.bench.ring` and `cuflash.bench.jax_jit`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from cuflash.bench.config import (
    CUFLASH,
    DTYPE_ALIASES,
    FLOP_FORMULA,
    IMPL_ALIASES,
    IMPLS,
    PASSES,
    SCHEMA,
    SHORT_DTYPE,
    make_config,
    parse_seqlen,
    sweep_cases,
)
from cuflash.bench.devices import Cpu, Gpu, find_gpu, torch_sees_gpu
from cuflash.bench.measure import Progress, compare, run_compile, run_memory, run_sweep
from cuflash.bench.provenance import environment
from cuflash.bench.report import (
    best_peer_counts,
    json_default,
    ratio_summary,
    summary_lines,
    table_lines,
    write_outputs,
)

# ---- flags -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m cuflash bench`` (``--overhead``, ``--window``, ``--decode``,
    ``--softcap``, ``--mask-mods``, ``--long``, ``--ring`` and ``--jax`` have their own)."""
    parser = argparse.ArgumentParser(
        prog="python -m cuflash bench",
        description="Time cuflash against PyTorch SDPA's backends and standard attention "
                    "(TFLOP/s, " + FLOP_FORMULA + "), measure workspace memory vs S and "
                    "cold-cache compile time; write JSON, PNG plots and a Markdown table.",
    )
    parser.add_argument("--overhead", action="store_true",
                        help="time the host path of one small call per framework against SDPA "
                             "instead (see python -m cuflash bench --overhead --help)")
    parser.add_argument("--window", action="store_true",
                        help="time sliding-window attention against FlexAttention instead (see "
                             "python -m cuflash bench --window --help)")
    parser.add_argument("--decode", action="store_true",
                        help="time decoding against a KV cache (split-KV, paged) against "
                             "SDPA's cuDNN and flash backends instead (see python -m cuflash "
                             "bench --decode --help)")
    parser.add_argument("--softcap", action="store_true",
                        help="time logit soft-capping against cuflash without it and "
                             "FlexAttention instead (see python -m cuflash bench --softcap "
                             "--help)")
    parser.add_argument("--mask-mods", action="store_true",
                        help="time user mask_mods with their block maps against FlexAttention "
                             "instead (see python -m cuflash bench --mask-mods --help)")
    parser.add_argument("--long", action="store_true",
                        help="time causal forward and backward at S = 128k..1M tokens, with peak "
                             "memory, against SDPA's flash backend instead (see python -m "
                             "cuflash bench --long --help)")
    parser.add_argument("--ring", action="store_true",
                        help="time ring attention across this host's GPUs against the "
                             "single-GPU kernel and torch context_parallel instead (see python "
                             "-m cuflash bench --ring --help)")
    parser.add_argument("--jax", action="store_true",
                        help="time cuflash.jax.attention under jax.jit against "
                             "jax.nn.dot_product_attention (cuDNN, XLA) instead (see python -m "
                             "cuflash bench --jax --help)")
    parser.add_argument("--quick", action="store_true",
                        help="preset of ~2 minutes on an H100: S 1k/4k/16k, D 64/128/256, bf16, "
                             "fwd, causal and not (CPU: a few seconds at tiny sizes)")
    parser.add_argument("--seqlens", type=_list_of(parse_seqlen),
                        help="comma list, e.g. 512,1k,16k (default 512..16k; CPU 256..2048)")
    parser.add_argument("--head-dims", type=_list_of(int), help="comma list (default 64,128,256)")
    parser.add_argument("--dtypes", type=_list_of(_dtype),
                        help="comma list of bf16, fp16, fp32, fp64 (default bf16,fp16; CPU fp32)")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both",
                        help="causal mask, no mask, or both (default)")
    parser.add_argument("--passes", type=_passes,
                        help="comma list of fwd, bwd, fwd+bwd, or 'all' (default all)")
    parser.add_argument("--impls", type=_list_of(_impl),
                        help="comma list of " + ", ".join(IMPLS) + " (short: flash, cudnn, "
                             "efficient, math, standard; default every one available)")
    parser.add_argument("--tokens", type=int, help="B*S (default 16384; CPU 1024)")
    parser.add_argument("--model-dim", type=int, help="Hq*D (default 2048; CPU 128)")
    parser.add_argument("--memory-seqlens", type=_list_of(parse_seqlen),
                        help="S of the memory sweep (default 1k..128k; CPU 256..4k)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory sweep")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the cold-cache compile measurement")
    parser.add_argument("--min-time-ms", type=float, default=100.0,
                        help="time each cell for about this long (default 100)")
    parser.add_argument("--max-reps", type=int, default=30,
                        help="at most this many timed calls per cell (default 30)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="default: CUDA when a GPU is usable, else the CPU path")
    parser.add_argument("--framework", choices=("auto", "torch", "cupy"), default="auto",
                        help="GPU arrays cuflash runs on (default torch when it sees the GPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--out", type=Path, default=Path("bench-out"),
                        help="output directory (default bench-out/)")
    return parser


def _list_of(item: Callable[[str], object]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        values = tuple(item(part) for part in text.split(",") if part.strip())
        if not values:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return values

    return parse


def _dtype(text: str) -> str:
    try:
        return DTYPE_ALIASES[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; expected one of "
                                         "bf16, fp16, fp32, fp64") from None


def _passes(text: str) -> tuple[str, ...]:
    if text.strip() == "all":
        return PASSES
    passes = tuple(part.strip() for part in text.split(","))
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown pass {unknown[0]!r}; expected fwd, bwd, "
                                         "fwd+bwd or all")
    return passes


def _impl(text: str) -> str:
    name = IMPL_ALIASES.get(text.strip(), text.strip())
    if name not in (*IMPLS, "standard"):
        raise argparse.ArgumentTypeError(f"unknown implementation {text!r}; expected one of "
                                         + ", ".join(IMPLS))
    return name


# ---- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m cuflash bench``: run, write JSON/plots/Markdown under --out, print a table.

    Returns 0, 1 when cuflash itself failed somewhere (status "error"), 2 on a usage error.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--overhead" in argv:
        from cuflash.bench import overhead

        return overhead.main(argv)
    if "--window" in argv:
        from cuflash.bench import window

        return window.main([a for a in argv if a != "--window"])
    if "--decode" in argv:
        from cuflash.bench import decode

        return decode.main([a for a in argv if a != "--decode"])
    if "--softcap" in argv:
        from cuflash.bench import softcap

        return softcap.main([a for a in argv if a != "--softcap"])
    if "--mask-mods" in argv:
        from cuflash.bench import mask_mods

        return mask_mods.main([a for a in argv if a != "--mask-mods"])
    if "--long" in argv:
        from cuflash.bench import long

        return long.main([a for a in argv if a != "--long"])
    if "--ring" in argv:
        from cuflash.bench import ring

        return ring.main([a for a in argv if a != "--ring"])
    if "--jax" in argv:
        from cuflash.bench import jax_jit

        return jax_jit.main([a for a in argv if a != "--jax"])
    args = build_parser().parse_args(argv)

    no_gpu = None if args.device == "cpu" else find_gpu()
    if args.device == "cuda" and no_gpu:
        print(f"error: --device cuda, but no usable CUDA GPU ({no_gpu})", file=sys.stderr)
        return 2
    mode = "cuda" if args.device != "cpu" and not no_gpu else "cpu"
    note = None
    if mode == "cpu":
        note = ("--device cpu: benchmarking the CPU path" if args.device == "cpu" else
                f"no CUDA GPU: benchmarking the CPU path ({no_gpu})")
        print(note)
        device = Cpu()
    else:
        framework = args.framework
        if framework == "auto":
            framework = "torch" if torch_sees_gpu() else "cupy"
        elif framework == "torch" and not torch_sees_gpu():
            print("error: --framework torch, but torch is not installed or sees no CUDA GPU",
                  file=sys.stderr)
            return 2
        device = Gpu(framework)
    try:
        config = make_config(args, mode)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    impls = [i for i in device.implementations() if _selected(i.name, config.impls)]
    if not any(i.name == CUFLASH for i in impls):
        print("note: cuflash is not among --impls; no ratios will be computed")

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m cuflash bench" + "".join(f" {a}" for a in argv)
    print(f"cuflash bench on {device.describe()}: {len(sweep_cases(config))} cases x "
          f"{len(impls)} implementations -> {out}/", flush=True)

    result: dict = {
        "schema": SCHEMA, "mode": mode, "note": note, "command": command,
        "environment": environment(device),
        "config": asdict(config),
        "flops": FLOP_FORMULA,
        "units": {"ms": "median milliseconds per call", "tflops": "FLOPs / median / 1e12"},
        "implementations": [i.name for i in impls],
    }
    with device.scope():
        cases = sweep_cases(config)
        progress = Progress("sweep", len(cases) * len(impls))
        result["timings"] = run_sweep(device, impls, config, progress)
        progress.close()
        result["comparisons"] = compare(result["timings"])
        if config.memory is not None:
            m = config.memory
            progress = Progress("memory", len(m.passes) * len(impls) * len(m.seqlens))
            result["memory"] = {"config": asdict(m),
                                "results": run_memory(device, impls, m, config.seed, progress)}
            progress.close()
    if config.compile and _selected(CUFLASH, config.impls):
        print("compiling every kernel used, in a fresh process with an empty cache ...",
              file=sys.stderr, flush=True)
        result["compile"] = run_compile(config, device.framework)
    else:
        why = "no CUDA GPU" if mode == "cpu" else "--no-compile or cuflash not in --impls"
        result["compile"] = {"status": "skip", "note": f"{why}: no kernels compiled"}

    files = write_outputs(result, config, device, out, command)
    result["files"] = [str(p) for p in files]
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=json_default) + "\n")

    if note:
        print(note)
    for line in summary_lines(result):
        print(line)
    print(f"wrote {out / 'bench.json'}, {out / 'performance_table.md'} and "
          f"{sum(p.suffix == '.png' for p in files)} plots")
    for dtype in config.dtypes:
        print(f"\n{SHORT_DTYPE[dtype]} {device.unit}, cuflash/best peer "
              f"(B*S={config.tokens}, H*D={config.model_dim}; best: "
              f"{best_peer_counts(result['comparisons'], dtype) or 'none'}; "
              f"{ratio_summary(result['comparisons'], dtype)})")
        for line in table_lines(result["comparisons"], config, device, dtype, markdown=False):
            print(line)
    errors = any(r["impl"] == CUFLASH and r["status"] == "error" for r in result["timings"])
    return 1 if errors else 0


def _selected(name: str, chosen: tuple[str, ...] | None) -> bool:
    if chosen is None:
        return True
    return name in chosen or (name.endswith("-standard") and "standard" in chosen)

