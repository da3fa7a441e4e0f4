"""A benchmark's results as people read them: the PNG plots, the Markdown table for
docs/performance.md, and the summary and table printed on the terminal."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cuflash.bench.config import (
    CUFLASH,
    FLOP_FORMULA,
    IMPLS,
    KIB,
    SHORT_DTYPE,
    Case,
    Config,
    MemoryConfig,
    fmt_bytes,
    fmt_seqlen,
)
from cuflash.bench.measure import RATIO_CONFIDENCE

_COLORS = dict(zip(IMPLS, ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                           "#8c564b"), strict=True))
_FIGSIZE, _DPI = (9, 5), 100


def plot_tflops(rows: list[dict], config: Config, device, out: Path) -> list[Path]:
    """One PNG per (dtype, pass, head dim): throughput vs S, one line per implementation,
    full and causal side by side."""
    from matplotlib.figure import Figure

    paths = []
    names = [n for n in IMPLS if any(r["impl"] == n for r in rows)]
    for dtype in config.dtypes:
        for pass_ in config.passes:
            for head_dim in config.head_dims:
                fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
                axes = fig.subplots(1, len(config.causal), sharey=True, squeeze=False)[0]
                for ax, causal in zip(axes, config.causal, strict=True):
                    for name in names:
                        points = sorted(
                            (r["seqlen"], r["tflops"] * device.unit_scale) for r in rows
                            if r["impl"] == name and r["status"] == "ok" and r["dtype"] == dtype
                            and r["pass"] == pass_ and r["head_dim"] == head_dim
                            and r["causal"] == causal)
                        if points:
                            ax.plot(*zip(*points, strict=True), marker="o", label=name,
                                    color=_COLORS[name], linewidth=2.5 if name == CUFLASH else 1.2)
                    _seqlen_axis(ax, config.seqlens)
                    ax.set_title("causal" if causal else "full (no mask)")
                    ax.grid(alpha=0.3)
                axes[0].set_ylabel(device.unit)
                axes[0].set_ylim(bottom=0)
                if axes[0].get_legend_handles_labels()[0]:
                    axes[0].legend(fontsize=8)
                fig.suptitle(f"{SHORT_DTYPE[dtype]} {pass_}, D={head_dim}  (B*S={config.tokens}, "
                             f"H*D={config.model_dim})  {device.describe()}", fontsize=10)
                fig.tight_layout()
                path = out / f"tflops-{SHORT_DTYPE[dtype]}-{pass_.replace('+', '')}-d{head_dim}.png"
                fig.savefig(path)
                paths.append(path)
    return paths


def plot_memory(rows: list[dict], memory: MemoryConfig, device, out: Path) -> Path:
    """Workspace vs S, log-log, one panel per pass."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
    axes = fig.subplots(1, len(memory.passes), sharey=True, squeeze=False)[0]
    for ax, pass_ in zip(axes, memory.passes, strict=True):
        for name in [n for n in IMPLS if any(r["impl"] == n for r in rows)]:
            mine = [r for r in rows if r["impl"] == name and r["pass"] == pass_]
            points = [(r["seqlen"], max(r["workspace_bytes"], KIB)) for r in mine
                      if r["status"] == "ok"]
            oom = [r["seqlen"] for r in mine if r["status"] == "oom"]
            label = name + (f" (OOM at {fmt_seqlen(oom[0])})" if oom else "")
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label,
                        color=_COLORS[name], linewidth=2.5 if name == CUFLASH else 1.2)
        _seqlen_axis(ax, memory.seqlens)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_locator(LogLocator(base=2, numticks=10))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: fmt_bytes(y)))
        ax.minorticks_off()
        ax.set_title(pass_)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("workspace: peak - inputs - outputs (floor 1 KiB)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"memory vs S: B={memory.batch}, H={memory.heads}, D={memory.head_dim}, "
                 f"{SHORT_DTYPE[memory.dtype]}, causal  {device.describe()}", fontsize=10)
    fig.tight_layout()
    path = out / "memory.png"
    fig.savefig(path)
    return path


def _seqlen_axis(ax, seqlens: Iterable[int]) -> None:
    seqlens = sorted(seqlens)
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqlens)
    ax.set_xticklabels([fmt_seqlen(s) for s in seqlens])
    ax.minorticks_off()
    ax.set_xlabel("sequence length S")


def table_lines(cells: list[dict], config: Config, device, dtype: str,
                markdown: bool) -> list[str]:
    """Rows pass/D/mask, columns S, cells "cuflash/best peer" (ANCHORS.md's format)."""
    header = ["pass", "D", "mask", *(("S=" if i == 0 else "") + fmt_seqlen(s)
                                      for i, s in enumerate(config.seqlens))]
    by_key = {(c["pass"], c["head_dim"], c["causal"], c["seqlen"]): c for c in cells
              if c["dtype"] == dtype}
    body = []
    for pass_ in config.passes:
        for head_dim in config.head_dims:
            for causal in config.causal:
                row = [pass_, str(head_dim), "causal" if causal else "full"]
                for seqlen in config.seqlens:
                    cell = by_key.get((pass_, head_dim, causal, seqlen))
                    row.append(_cell_text(cell, device.unit_scale))
                body.append(row)
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                *("| " + " | ".join(r) + " |" for r in body)]
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in (header, *body)]


def _cell_text(cell: dict | None, unit_scale: float) -> str:
    def number(value: float | None) -> str:
        if value is None:
            return "-"
        value *= unit_scale
        return f"{value:.0f}" if value >= 10 else f"{value:.2g}"

    if cell is None:
        return "-"
    ours = {"ok": number(cell["cuflash_tflops"]), "oom": "OOM", "error": "ERR"}.get(
        cell["cuflash_status"], "-")
    return f"{ours}/{number(cell['best_peer_tflops'])}"


def best_peer_counts(cells: list[dict], dtype: str) -> str:
    counts: dict[str, int] = {}
    for c in cells:
        if c["dtype"] == dtype and c["best_peer"]:
            counts[c["best_peer"]] = counts.get(c["best_peer"], 0) + 1
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def ratio_summary(cells: list[dict], dtype: str) -> str:
    """Geometric mean and range of cuflash / best peer over the cells where both ran."""
    ratios = [c["ratio"] for c in cells if c["dtype"] == dtype and c["ratio"]]
    if not ratios:
        return "no ratios"
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    text = (f"ratio geomean {geomean:.2f}x, {min(ratios):.2f}-{max(ratios):.2f}x "
            f"over {len(ratios)} cells")
    verdicts = [c["verdict"] for c in cells if c["dtype"] == dtype and c.get("verdict")]
    if verdicts:
        text += ", " + " / ".join(f"{name} {verdicts.count(name)}"
                                  for name in ("ahead", "level", "behind"))
    return text


def verdict_line(cells: list[dict], dtype: str) -> str | None:
    """Cells ahead of, level with and behind the best peer, by the ratio's interval (None where
    no cell has one)."""
    judged = [c for c in cells if c["dtype"] == dtype and c.get("verdict")]
    if not judged:
        return None

    def label(c: dict) -> str:
        mask = "causal" if c["causal"] else "full"
        return (f"{c['pass']} D={c['head_dim']} {mask} S={fmt_seqlen(c['seqlen'])} "
                f"{c['ratio']:.3f} ({c['ratio_low']:.3f}-{c['ratio_high']:.3f})")

    parts = []
    for name in ("ahead", "level", "behind"):
        mine = [c for c in judged if c["verdict"] == name]
        text = f"{name} {len(mine)}"
        if mine and name != "ahead":
            text += ": " + ", ".join(label(c) for c in mine)
        parts.append(text)
    return (f"Against the best peer, by the {RATIO_CONFIDENCE:.0%} interval of the ratio from "
            "this run's calls (level: it holds 1): " + "; ".join(parts) + ".")


def markdown(cells: list[dict], config: Config, device, env: dict, command: str,
             peers: list[str]) -> str:
    lines = [f"<!-- generated by `{command}` on {env['date']}, cuflash {env['cuflash']}, "
             f"commit {(env.get('git_commit') or 'unknown')[:12]}"
             f"{' (dirty)' if env.get('git_dirty') else ''}, "
             f"sources {env.get('source_digest') or 'unknown'} -->", ""]
    if device.mode == "cpu":
        lines += ["No CUDA GPU: these are CPU-path figures (NumPy), not GPU ones.", ""]
    for dtype in config.dtypes:
        lines += [
            f"### {SHORT_DTYPE[dtype]}, {device.describe()}", "",
            f"{device.unit}, cuflash / best peer (the fastest of {', '.join(peers)}; same "
            "process, same inputs). "
            f"B*S = {config.tokens}, H*D = {config.model_dim}; FLOPs {FLOP_FORMULA}. "
            f"Median of calls timed by {device.timer}, after warm-up.", "",
            *table_lines(cells, config, device, dtype, markdown=True), "",
            f"Best peer per cell: {best_peer_counts(cells, dtype) or 'none ran'}.", "",
        ]
        verdicts = verdict_line(cells, dtype)
        if verdicts:
            lines += [verdicts, ""]
    return "\n".join(lines)


def summary_lines(result: dict) -> list[str]:
    """Memory and compile notes printed above the table."""
    lines = []
    memory = result.get("memory")
    if memory:
        for pass_ in memory["config"]["passes"]:
            parts = []
            for name in IMPLS:
                mine = [r for r in memory["results"] if r["impl"] == name and r["pass"] == pass_]
                ok = [r for r in mine if r["status"] == "ok"]
                oom = [r for r in mine if r["status"] == "oom"]
                if not mine:
                    continue
                text = name
                if ok:
                    last = ok[-1]
                    text += (f" {fmt_bytes(max(last['workspace_bytes'], 0))}@"
                             f"{fmt_seqlen(last['seqlen'])}")
                if oom:
                    text += f" OOM@{fmt_seqlen(oom[0]['seqlen'])}"
                if not ok and not oom:
                    text += f" {mine[0]['status']}"
                parts.append(text)
            lines.append(f"workspace {pass_}: " + ", ".join(parts))
    comp = result.get("compile")
    if comp and comp.get("status") == "ok":
        kernels = comp["kernels"]
        slowest = f", slowest {kernels[0]['seconds']:.1f} s {kernels[0]['name']}" if kernels \
            else ""
        lines.append(f"compile (cold cache): {len(kernels)} kernels, "
                     f"{comp['total_seconds']:.1f} s{slowest}")
    elif comp:
        lines.append(f"compile (cold cache): {comp['status']}: {comp.get('note', '')}")
    for r in [r for r in result["timings"] if r["impl"] == CUFLASH and r["status"] == "error"][:5]:
        case = Case(r["dtype"], r["pass"], r["head_dim"], r["causal"], r["seqlen"], r["batch"],
                    r["heads"])
        lines.append(f"cuflash ERROR {case.label}: {r['note']}")
    return lines


def write_outputs(result: dict, config: Config, device, out: Path, command: str) -> list[Path]:
    """Markdown table and plots (plots need matplotlib; without it, a note in the JSON)."""
    md = out / "performance_table.md"
    peers = [name for name in result["implementations"] if name != CUFLASH]
    md.write_text(markdown(result["comparisons"], config, device, result["environment"],
                           command, peers))
    files = [out / "bench.json", md]
    try:
        import matplotlib  # noqa: F401  (only to learn whether plots can be drawn)
    except ImportError:
        result["plots"] = "skipped: matplotlib is not installed"
        return files
    files += plot_tflops(result["timings"], config, device, out)
    if result.get("memory"):
        files.append(plot_memory(result["memory"]["results"], config.memory, device, out))
    return files


def json_default(value: object):
    """`json.dumps`'s fallback for bench.json: NumPy scalars and paths."""
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
