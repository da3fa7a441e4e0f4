"""`python -m cuflash bench`: the FLOP formula, the flags, the baselines, and a whole --quick run
on the CPU path (what CI without a GPU runs) down to the files it writes."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest

from cuflash import bench, reference
from tests.gpu_support import gpu_skip_reason

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_flops_follow_the_flashattention_papers():
    # B=2, H=16, S=1024, D=128: forward 4*B*H*S*S*D.
    forward = 4 * 2 * 16 * 1024 * 1024 * 128
    assert bench.attention_flops(2, 16, 1024, 1024, 128, causal=False) == forward
    assert bench.attention_flops(2, 16, 1024, 1024, 128, causal=True) == forward * 0.5
    assert bench.attention_flops(2, 16, 1024, 1024, 128, causal=False, pass_="bwd") == \
        forward * 2.5
    assert bench.attention_flops(2, 16, 1024, 1024, 128, causal=True, pass_="bwd") == \
        forward * 0.5 * 2.5
    assert bench.attention_flops(2, 16, 1024, 1024, 128, causal=False, pass_="fwd+bwd") == \
        forward * 3.5
    # Sq != Sk counts Sq*Sk; a Case (Sq = Sk = S) uses the same formula.
    assert bench.attention_flops(1, 1, 3, 5, 7, causal=False) == 4 * 3 * 5 * 7
    case = bench.Case("bfloat16", "bwd", 64, True, 4096, batch=4, heads=32)
    assert case.flops == 4 * 4 * 32 * 4096 * 4096 * 64 * 0.5 * 2.5


def test_sweep_follows_the_convention():
    args = bench.build_parser().parse_args(["--seqlens", "512,1k,16k", "--head-dims", "64,256",
                                            "--dtypes", "bf16,fp16", "--passes", "all",
                                            "--causal", "yes"])
    config = bench.make_config(args, "cuda")
    assert config.seqlens == (512, 1024, 16384)
    assert config.dtypes == ("bfloat16", "float16")
    assert config.passes == ("fwd", "bwd", "fwd+bwd")
    assert config.causal == (True,)
    assert config.memory.passes == ("fwd", "fwd+bwd")
    cases = bench.sweep_cases(config)
    assert len(cases) == 3 * 2 * 2 * 3
    for case in cases:  # B*S = 16384 tokens, Hq*D = 2048
        assert case.batch * case.seqlen == 16384
        assert case.heads * case.head_dim == 2048


def test_quick_preset():
    gpu = bench.make_config(bench.build_parser().parse_args(["--quick"]), "cuda")
    assert gpu.seqlens == (1024, 4096, 16384)
    assert gpu.head_dims == (64, 128, 256)
    assert gpu.dtypes == ("bfloat16",)
    assert gpu.passes == ("fwd",)
    assert gpu.causal == (False, True)
    assert gpu.memory.seqlens[-1] == 131072
    assert (gpu.memory.batch, gpu.memory.heads, gpu.memory.head_dim) == (1, 16, 128)
    # Explicit flags win over the preset.
    cpu = bench.make_config(bench.build_parser().parse_args(["--quick", "--seqlens", "64",
                                                             "--dtypes", "bf16,fp64"]),
                            "cpu")
    assert cpu.seqlens == (64,)
    assert cpu.dtypes == ("float64",)  # no bfloat16 on the CPU path


def test_bad_flags_fail_clearly(capsys):
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--dtypes", "int8"])
    assert "unknown dtype 'int8'" in capsys.readouterr().err
    assert bench.main(["--device", "cpu", "--head-dims", "48", "--model-dim", "64"]) == 2
    assert "divide the model dim" in capsys.readouterr().err


def test_input_sets_rotate_only_below_twice_the_cache():
    l2 = 50 * 2**20
    assert bench.input_sets(256 * 2**20, l2) == 1
    assert bench.input_sets(2 * l2, l2) == 1
    assert bench.input_sets(60 * 2**20, l2) == 2
    assert bench.input_sets(2**20, l2) == bench.MAX_INPUT_SETS


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_standard_attention_baseline_is_exact(causal):
    rng = np.random.default_rng(7)
    b, s, h, d = 2, 37, 3, 16
    q, k, v, dout = (rng.standard_normal((b, s, h, d)) for _ in range(4))
    case = bench.Case("float64", "fwd+bwd", d, causal, s, b, h)
    call = bench.Standard("numpy-standard", np, lambda x: x).prepare(
        case, bench.Inputs(q, k, v, dout))
    out, dq, dk, dv = (x.transpose(0, 2, 1, 3) for x in call())  # (B, H, S, D) -> (B, S, H, D)
    np.testing.assert_allclose(out, reference.attention(q, k, v, causal=causal), atol=1e-12)
    for got, want in zip((dq, dk, dv), reference.attention_backward(dout, q, k, v,
                                                                    causal=causal), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)


def test_quick_run_on_the_cpu_path(tmp_path, capsys):
    argv = ["--quick", "--out", str(tmp_path)]
    gpu_present = gpu_skip_reason() is None
    if gpu_present:  # this is the CPU test; the GPU run is the same command without the flag
        argv += ["--device", "cpu"]
    start = time.perf_counter()
    assert bench.main(argv) == 0
    seconds = time.perf_counter() - start
    stdout = capsys.readouterr().out
    print(f"bench --quick on the CPU path: {seconds:.1f} s")
    if not gpu_present:
        assert "no CUDA GPU: benchmarking the CPU path" in stdout

    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["schema"] == bench.SCHEMA
    assert result["mode"] == "cpu"
    assert "benchmarking the CPU path" in result["note"]
    env = result["environment"]
    for key in ("date", "numpy", "python", "git_commit", "cuflash"):
        assert key in env
    assert env["source_digest"] == bench.source_digest()
    assert f"sources {env['source_digest']}" in (tmp_path / "performance_table.md").read_text()
    assert result["flops"] == bench.FLOP_FORMULA

    timings = result["timings"]
    for impl in ("cuflash", "numpy-standard"):
        mine = [r for r in timings if r["impl"] == impl]
        assert len(mine) == 4  # S 128/256 x full/causal, D 32, fp32, fwd
        for r in mine:
            assert r["status"] == "ok", r
            assert r["ms"] > 0 and r["tflops"] > 0 and r["reps"] >= bench.MIN_REPS
            assert r["flops"] == bench.attention_flops(r["batch"], r["heads"], r["seqlen"],
                                                       r["seqlen"], r["head_dim"],
                                                       causal=r["causal"], pass_=r["pass"])
            assert r["batch"] * r["seqlen"] == 256 and r["heads"] * r["head_dim"] == 64
    for cell in result["comparisons"]:
        assert cell["best_peer"] == "numpy-standard"
        assert cell["ratio"] == pytest.approx(cell["cuflash_tflops"] / cell["best_peer_tflops"])
        assert cell["verdict"] in ("ahead", "level", "behind")
        assert 0 < cell["ratio_low"] <= cell["ratio_high"]
    assert all(len(r["times_ms"]) == r["reps"] for r in timings if r["status"] == "ok")

    memory = result["memory"]["results"]
    for impl in ("cuflash", "numpy-standard"):
        mine = [r for r in memory if r["impl"] == impl and r["status"] == "ok"]
        assert [r["seqlen"] for r in mine] == list(result["memory"]["config"]["seqlens"])
        assert all(r["output_bytes"] > 0 and "workspace_bytes" in r for r in mine)
    # Standard attention's S x S scores grow 4x per doubling of S; cuflash's tiles do not.
    standard = {r["seqlen"]: r["workspace_bytes"] for r in memory
                if r["impl"] == "numpy-standard"}
    assert standard[2048] > 3 * standard[1024]
    flash = {r["seqlen"]: r["workspace_bytes"] for r in memory if r["impl"] == "cuflash"}
    assert flash[2048] < standard[2048] / 4

    plots = sorted(tmp_path.glob("*.png"))
    assert {p.name for p in plots} == {"tflops-fp32-fwd-d32.png", "memory.png"}
    for p in plots:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 10_000
    table = (tmp_path / "performance_table.md").read_text()
    assert "| pass | D | mask | S=128 | 256 |" in table
    assert "| fwd | 32 | causal |" in table
    assert stdout.rstrip().splitlines()[-1].startswith("fwd   32  causal")  # the table is last


def test_source_digest_names_the_code(tmp_path, monkeypatch):
    """The digest is stable, and changes when a kernel source changes."""
    import shutil

    from cuflash.cuda import _compile

    first = bench.source_digest()
    assert first == bench.source_digest() and len(first) == 12
    copy = tmp_path / "kernels_cu"
    shutil.copytree(_compile.kernels_dir(), copy)
    monkeypatch.setattr(_compile, "kernels_dir", lambda: copy)
    assert bench.source_digest() == first
    (copy / "core/common.cuh").write_text((copy / "core/common.cuh").read_text() + "\n// edited\n")
    assert bench.source_digest() != first


class _FakeDevice:
    """Times every call as `ms` of its implementation and logs (event, name) pairs."""

    def __init__(self, log: list):
        self.log = log

    def synchronize(self) -> None:
        pass

    timing = False  # inside elapsed_ms: the calls being made are timed

    def elapsed_ms(self, calls) -> list[float]:
        self.log.append(("batch", calls[0].impl_name, len(calls)))
        _FakeDevice.timing = True
        try:
            return [call() for call in calls]
        finally:
            _FakeDevice.timing = False

    def release(self, collect: bool = False) -> None:
        self.log.append(("release", collect))


class _FakeImpl(bench.Impl):
    """A call that returns its own duration; raises on call number `fail_at` (0-based) if set."""

    def __init__(self, name: str, ms: float, fail_at: int | None = None, skip: str | None = None):
        self.name, self.ms, self.fail_at, self.skip, self.count = name, ms, fail_at, skip, 0
        self.sets_used: list[tuple[int, bool]] = []  # (input set, timed) of every call

    def skip_reason(self, case, limit_bytes):
        return self.skip

    def prepare(self, case, x):
        index = x  # _measure passes the set's index as its inputs

        def call():
            self.sets_used.append((index, _FakeDevice.timing))
            self.count += 1
            if self.fail_at is not None and self.count - 1 == self.fail_at:
                raise RuntimeError(f"{self.name} broke")
            return self.ms

        call.impl_name = self.name
        return call


def _measure(impls, min_time_ms=1e9, max_reps=20, sets=2):
    import io
    import types

    log = []
    case = bench.Case("float32", "fwd", 32, False, 256, 1, 2)
    config = types.SimpleNamespace(min_time_ms=min_time_ms, max_reps=max_reps)
    rows = bench.measure_case(_FakeDevice(log), impls, case, list(range(sets)), config, 1e9,
                              bench.Progress("sweep", len(impls), stream=io.StringIO()))
    return rows, [e for e in log if e[0] == "batch"]


def test_implementations_take_turns_in_rotated_rounds():
    rows, batches = _measure([_FakeImpl("a", 1.0), _FakeImpl("b", 2.0), _FakeImpl("c", 3.0)])
    # Round 0: MIN_REPS each in order a, b, c; then ROUNDS - 1 rounds, each starting one later.
    order = [name for _, name, _ in batches]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert bench.ROUNDS == 4
    for row, ms in zip(rows, (1.0, 2.0, 3.0), strict=True):
        assert row["status"] == "ok" and row["ms"] == ms and row["ms_min"] == ms
        assert row["reps"] == 20 and row["rounds"] == 4  # max_reps, spread 3 + 6 + 6 + 5
    assert [n for _, name, n in batches if name == "a"] == [3, 6, 6, 5]


def test_no_input_set_is_used_twice_in_a_row():
    """Rotated input sets stop the L2 cache serving a call its inputs; the untimed call before
    each batch must not break the rotation."""
    impl = _FakeImpl("a", 1.0)
    _measure([impl, _FakeImpl("b", 1.0)], sets=3)
    used = impl.sets_used
    assert len(used) == 3 + 4 + 20  # warm-up of each set, one refill a round, 20 timed
    assert [s for s, timed in used if timed] == [i % 3 for i in range(20)]
    for (before, _), (now, timed) in itertools.pairwise(used):
        assert not timed or now != before, used  # a timed call never follows its own set


def test_rounds_stop_once_the_time_is_spent():
    # 3 calls of 10 ms exceed min_time_ms = 25: round 0 is all a gets; b adds 22 calls of 1 ms.
    rows, batches = _measure([_FakeImpl("a", 10.0), _FakeImpl("b", 1.0)], min_time_ms=25,
                             max_reps=100)
    assert rows[0]["reps"] == bench.MIN_REPS and rows[0]["rounds"] == 1
    assert rows[1]["reps"] == 25 and rows[1]["rounds"] == 4
    assert [name for _, name, _ in batches] == ["a", "b", "b", "b", "b"]


def test_a_failure_or_skip_leaves_the_others_timed():
    # Calls 0-1 warm up (two input sets), 2-5 are round 0 (a cache refill and 3 timed), 6 fails:
    # round 1's refill.
    broken = _FakeImpl("broken", 1.0, fail_at=6)
    rows, batches = _measure([broken, _FakeImpl("skipped", 1.0, skip="too big"),
                              _FakeImpl("fine", 2.0)])
    assert rows[0]["status"] == "n/a" and "broken broke" in rows[0]["note"]
    assert rows[1] == {**rows[1], "status": "skip", "note": "too big"}
    assert rows[2]["status"] == "ok" and rows[2]["reps"] == 20
    assert [r["impl"] for r in rows] == ["broken", "skipped", "fine"]
    assert [name for _, name, _ in batches] == ["broken", "fine", "fine", "fine", "fine"]


def test_split_reps_and_rotation():
    assert bench.split_reps(17, 3) == [6, 6, 5]
    assert bench.split_reps(0, 3) == [0, 0, 0]
    assert sum(bench.split_reps(101, 7)) == 101
    assert bench.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]


def _cells(ours_ms, peer_ms):
    case = bench.Case("bfloat16", "fwd", 64, True, 1024, 16, 32)
    rows = [{**case.record(), "impl": name, "status": "ok", "ms": float(np.median(ms)),
             "tflops": case.flops / float(np.median(ms)) / 1e9, "times_ms": list(ms)}
            for name, ms in (("cuflash", ours_ms), ("sdpa-cudnn", peer_ms))]
    return bench.compare(rows)


def test_ratio_interval_separates_a_win_from_a_tie():
    rng = np.random.default_rng(0)
    noise = lambda: rng.normal(0, 0.002, 20)  # noqa: E731  (0.2% per call)
    ahead = _cells(0.150 + noise(), 0.153 + noise())[0]  # 2% faster
    assert ahead["verdict"] == "ahead" and 1 < ahead["ratio_low"] < ahead["ratio"] \
        < ahead["ratio_high"] < 1.04
    behind = _cells(0.153 + noise(), 0.150 + noise())[0]
    assert behind["verdict"] == "behind" and behind["ratio_high"] < 1
    level = _cells(0.150 + noise(), 0.150 + noise())[0]
    assert level["verdict"] == "level" and level["ratio_low"] < 1 < level["ratio_high"]
    # Seeded: the same times give the same interval.
    assert bench.ratio_interval([1.0, 1.1, 0.9], [1.0, 1.2, 1.1]) == \
        bench.ratio_interval([1.0, 1.1, 0.9], [1.0, 1.2, 1.1])


def test_cells_without_call_times_get_no_interval():
    """A JSON from before the calls' times were kept (rows without times_ms) still compares."""
    case = bench.Case("bfloat16", "fwd", 64, True, 1024, 16, 32)
    rows = [{**case.record(), "impl": name, "status": "ok", "tflops": t}
            for name, t in (("cuflash", 350.0), ("sdpa-cudnn", 340.0))]
    cell = bench.compare(rows)[0]
    assert cell["ratio"] == pytest.approx(350 / 340)
    assert cell["verdict"] is None and cell["ratio_low"] is None


def test_markdown_names_the_level_and_behind_cells():
    rng = np.random.default_rng(1)
    cells = (_cells(0.150 + rng.normal(0, 0.002, 20), 0.150 + rng.normal(0, 0.002, 20)))
    line = bench.verdict_line(cells, "bfloat16")
    assert line.startswith("Against the best peer, by the 95% interval")
    assert "ahead 0; level 1: fwd D=64 causal S=1k " in line and line.endswith("behind 0.")
    assert bench.verdict_line(cells, "float16") is None


def test_window_bench_table_counts_visible_pairs_and_compares(capsys):
    from cuflash.bench import window

    rows = [
        {"impl": "cuflash", "pass": "fwd", "head_dim": 64, "seqlen": 4096, "window": None,
         "tflops": 500.0},
        {"impl": "cuflash", "pass": "fwd", "head_dim": 64, "seqlen": 4096, "window": 1024,
         "tflops": 450.0},
        {"impl": "flex", "pass": "fwd", "head_dim": 64, "seqlen": 4096, "window": 1024,
         "tflops": 300.0},
    ]
    text = window.table(rows)
    assert "| fwd | 64 | 4096 | 1024 | 450 | 300 | 1.50 | 0.90 |" in text
    assert "| fwd | 64 | 4096 | causal | 500 | - | - | - |" in text


def test_overhead_bench_stands_alone():
    """``--overhead`` times older trees too (``PYTHONPATH=old python3 cuflash/bench/overhead.py``):
    its file imports nothing of cuflash but the public API, and runs by path and as a module."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    from cuflash.bench import overhead

    path = Path(overhead.__file__)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
            assert not [n for n in names if n.startswith("cuflash.")], names
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("cuflash"), node.module
    root = path.parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for command in ([str(path)], ["-m", "cuflash.bench.overhead"]):
        proc = subprocess.run([sys.executable, *command, "--help"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        assert "python -m cuflash bench --overhead" in proc.stdout


def test_window_bench_without_a_gpu_says_so(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the command would run the benchmark")
    assert bench.main(["--window", "--seqlens", "4096"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# ---- bench --softcap (cuflash.bench.softcap): everything but the GPU run -----------------------


def test_softcap_bench_flags_and_cells():
    """``--softcap``: its flags, the cells (B*S and H*D fixed) and the flag's place in bench."""
    from cuflash.bench import softcap

    args = softcap.build_parser().parse_args([])
    assert (args.cap, args.head_dims, args.seqlens, args.causal) == (
        30.0, (64, 128), (1024, 2048, 4096, 8192, 16384), "both")
    assert (args.tokens, args.model_dim, args.calls, args.repeats) == (16384, 2048, 5, 7)
    assert args.budget is None and not args.no_flex and args.out is None
    cells = softcap.cells(args)
    assert len(cells) == 2 * 5 * 2 and cells[:2] == [(64, 1024, False), (64, 1024, True)]
    for head_dim, seqlen, _ in cells:  # bhsd, B*S = 16384 tokens, H*D = 2048
        batch, heads, s, d = softcap.shape(args, head_dim, seqlen)
        assert (s, d, batch * seqlen, heads * head_dim) == (seqlen, head_dim, 16384, 2048)
    args = softcap.build_parser().parse_args(["--cap", "50", "--head-dims", "128", "--seqlens",
                                              "1k,16k", "--causal", "yes", "--budget", "200",
                                              "--no-flex", "--out", "o"])
    assert (args.cap, args.head_dims, args.seqlens, args.budget) == (50.0, (128,),
                                                                     (1024, 16384), 200.0)
    assert softcap.cells(args) == [(128, 1024, True), (128, 16384, True)]
    assert args.no_flex and str(args.out) == "o"
    assert softcap.cells(softcap.build_parser().parse_args(["--causal", "no", "--seqlens",
                                                             "2k"])) == [(64, 2048, False),
                                                                         (128, 2048, False)]
    for bad in (["--cap", "-1"], ["--cap", "nan"], ["--seqlens", "1x"],
                ["--head-dims", "0"], ["--causal", "maybe"]):
        with pytest.raises(SystemExit):
            softcap.build_parser().parse_args(bad)
    with pytest.raises(SystemExit):  # a head dim that does not divide the model width
        softcap.main(["--head-dims", "96"])
    with pytest.raises(SystemExit):  # no softcap and no sinks: nothing to compare
        softcap.main(["--cap", "0"])
    sinks_only = softcap.build_parser().parse_args(["--cap", "0", "--sinks"])
    assert sinks_only.cap == 0.0 and sinks_only.sinks and not args.sinks
    assert "and sinks" in softcap.caption({**vars(sinks_only), "out": None})
    assert "flex not timed" in softcap.caption({**vars(sinks_only), "out": None})
    alibi_only = softcap.build_parser().parse_args(["--cap", "0", "--alibi"])
    caption = softcap.caption({**vars(alibi_only), "out": None})
    assert "and ALiBi" in caption and "alibi_slopes=slopes" in caption
    assert "score_mod score - slope[h] * |q - kv|" in caption
    assert softcap.alibi_slopes(8)[0] == 0.5 and softcap.alibi_slopes(8)[-1] == 2.0 ** -8


def test_softcap_bench_flex_score_mod_matches_the_reference(monkeypatch):
    """FlexAttention's score_mod of `bench --softcap --alibi` is cuflash's modification: the
    capped score minus slope * distance (Sq = Sk: no shift), on CPU tensors."""
    torch = pytest.importorskip("torch")
    from cuflash.bench import softcap

    slopes = torch.tensor(softcap.alibi_slopes(4))
    captured = {}

    def fake_compiled(torch_, seqlen, mask_mod=None, score_mod=None):
        captured["score_mod"] = score_mod

    monkeypatch.setattr(softcap, "compiled_flex", fake_compiled)
    softcap._flex(torch, 16, False, 2.0, slopes)
    score = torch.tensor(3.0)
    got = captured["score_mod"](score, 0, 2, torch.tensor(5), torch.tensor(1))
    want = 2.0 * np.tanh(3.0 / 2.0) - float(slopes[2]) * 4
    assert abs(float(got) - want) < 1e-6
    assert bench.build_parser().parse_args(["--softcap"]).softcap  # listed in bench --help


def _softcap_rows() -> list[dict]:
    def row(impl, pass_, causal, tflops, **extra):
        fields = {"impl": impl, "pass": pass_, "head_dim": 128, "seqlen": 4096, "batch": 4,
                  "heads": 16, "causal": causal, **extra}
        if tflops is None:
            return fields
        return {**fields, "status": "ok", "tflops": tflops, "ms": 100.0 / tflops}

    return [
        row("cuflash", "fwd", False, 570.0, max_abs_diff_flex=0.002),
        row("cuflash-plain", "fwd", False, 600.0),
        row("flex", "fwd", False, 380.0),
        row("cuflash", "bwd", False, 400.0),
        row("cuflash-plain", "bwd", False, 410.0),
        row("flex", "bwd", False, None, status="error", error="RuntimeError: no kernel"),
        row("cuflash", "fwd", True, 500.0),
        row("cuflash-plain", "fwd", True, 500.0),
        row("cuflash", "bwd", True, None, status="budget"),
        row("cuflash-plain", "bwd", True, None, status="budget"),
    ]


def test_softcap_bench_table_and_summary():
    """One Markdown line per (pass, D, S, mask): each implementation's TFLOP/s and ms, then
    cuflash / cuflash-plain and cuflash / flex; statuses where a cell has no number."""
    from cuflash.bench import softcap

    lines = softcap.table(_softcap_rows()).splitlines()
    assert lines[0] == ("| pass | D | S | B | H | mask | cuflash TFLOP/s | cuflash ms "
                        "| plain TFLOP/s | plain ms | flex TFLOP/s | flex ms | cuflash/plain "
                        "| cuflash/flex |")
    assert lines[1].count("|") == lines[0].count("|")
    assert lines[2:] == [  # forward first; full before causal
        "| fwd | 128 | 4096 | 4 | 16 | full | 570 | 0.175 | 600 | 0.167 | 380 | 0.263 | 0.95 "
        "| 1.50 |",
        "| fwd | 128 | 4096 | 4 | 16 | causal | 500 | 0.200 | 500 | 0.200 | - | - | 1.00 | - |",
        "| bwd | 128 | 4096 | 4 | 16 | full | 400 | 0.250 | 410 | 0.244 | error | error | 0.98 "
        "| - |",
        "| bwd | 128 | 4096 | 4 | 16 | causal | budget | budget | budget | budget | - | - | - "
        "| - |",
    ]
    assert softcap.summary(_softcap_rows()) == [
        "fwd: cuflash/plain median 0.97, lowest 0.95; cuflash/flex median 1.50, lowest 1.50; "
        "below 0.95: none",
        "bwd: cuflash/plain median 0.98, lowest 0.98; below 0.95: none",
    ]
    slow = [{**r, "tflops": 300.0} if r["impl"] == "cuflash" and r.get("tflops") else r
            for r in _softcap_rows()]
    assert softcap.summary(slow)[0].endswith("below 0.95: D128 S4096 full 0.50, "
                                             "D128 S4096 causal 0.60")
    assert softcap.progress_line(_softcap_rows()[3:6]) == (
        "D128 S4096 B4 H16 full: cuflash bwd 400, cuflash-plain bwd 410, flex bwd error")


def test_softcap_bench_without_a_gpu_says_so(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the command would run the benchmark")
    assert bench.main(["--softcap", "--seqlens", "1k"]) == 2
    assert "bench --softcap needs a CUDA GPU" in capsys.readouterr().err


def test_softcap_bench_out_records_the_run(tmp_path, monkeypatch, capsys):
    """``--out``: main's record of a run (the GPU stubbed) is JSON with the command, the
    configuration and the environment, and Markdown with the table and the provenance."""
    torch = pytest.importorskip("torch")
    from cuflash.bench import softcap

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    seen = {}

    def run(args, deadline):
        seen["budget_left"] = deadline - time.perf_counter()
        seen["args"] = args
        return _softcap_rows()

    monkeypatch.setattr(softcap, "run", run)
    out = tmp_path / "o"
    argv = ["--softcap", "--cap", "20", "--seqlens", "4k", "--budget", "300", "--out", str(out)]
    assert bench.main(argv) == 0
    assert 290 < seen["budget_left"] <= 300 and seen["args"].seqlens == (4096,)
    stdout = capsys.readouterr().out
    assert stdout.startswith("bf16, B*S = 16384 tokens, H*D = 2048, softcap 20;")
    assert "| fwd | 128 | 4096 | 4 | 16 | full | 570 |" in stdout
    assert "fwd: cuflash/plain median 0.97" in stdout
    record = json.loads((out / "softcap.json").read_text())
    assert record["command"] == ("python -m cuflash bench --softcap --cap 20 --seqlens 4k "
                                 f"--budget 300 --out {out}")
    env = record["environment"]
    assert env["gpu"] == "Fake GPU" and env["torch"] == torch.__version__ and env["date"]
    assert len(env["source_digest"]) == 12 and "git_commit" in env
    assert record["config"]["cap"] == 20.0 and record["config"]["out"] == str(out)
    assert record["config"]["seqlens"] == [4096] and record["rows"] == _softcap_rows()
    assert record["summary"] == softcap.summary(_softcap_rows())
    md = (out / "softcap.md").read_text()
    assert "| fwd | 128 | 4096 | 4 | 16 | full | 570 | 0.175 |" in md
    assert f"Fake GPU, torch {torch.__version__}, cuflash " in md
    assert md.rstrip().endswith(f"`{record['command']}`")


def test_softcap_bench_sweep_on_the_cpu(monkeypatch):
    """`run` at tiny sizes on CPU tensors (the GPU's timing stubbed): every cell times cuflash
    with the softcap and without, on the same inputs; past the budget cells are skipped."""
    torch = pytest.importorskip("torch")
    from cuflash.bench import softcap

    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, device=None, **kw: randn(*a, **kw))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    calls, inputs_seen = [], []

    def time_pass(torch_, fn, inputs, pass_, calls_, repeats):
        assert all(x.dtype == torch.bfloat16 and bool(x.abs().sum() > 0)  # random, not zeros
                   for x in inputs)
        inputs_seen.append(inputs)
        q, k, v, dout = (x.float() for x in inputs)  # the CPU path has no bfloat16
        if pass_ == "fwd":
            calls.append(fn(q, k, v).float())
        else:
            q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
            fn(q, k, v).backward(dout)
            assert q.grad is not None and k.grad is not None and v.grad is not None
        return 2.0

    monkeypatch.setattr(softcap, "time_pass", time_pass)
    args = softcap.build_parser().parse_args(["--cap", "0.5", "--head-dims", "16", "--seqlens",
                                              "32", "--tokens", "64", "--model-dim", "32",
                                              "--no-flex"])
    rows = softcap.run(args)
    assert [(r["impl"], r["pass"], r["causal"], r["status"]) for r in rows] == [
        (impl, p, causal, "ok") for causal in (False, True) for impl in ("cuflash",
                                                                         "cuflash-plain")
        for p in ("fwd", "bwd")]
    assert {(r["batch"], r["heads"], r["softcap"]) for r in rows} == {(2, 2, 0.5), (2, 2, 0.0)}
    flops = 4 * 2 * 2 * 32 * 32 * 16
    assert rows[0]["tflops"] == pytest.approx(flops / 2.0 / 1e9)
    assert rows[5]["tflops"] == pytest.approx(flops * 0.5 * 2.5 / 2.0 / 1e9)  # causal bwd
    assert "max_abs_diff_flex" in rows[0] and rows[0]["max_abs_diff_flex"] is None  # no flex
    # Within a cell every implementation and pass gets the same inputs; each cell fresh ones.
    assert len({id(x) for x in inputs_seen[:4]}) == 1 and inputs_seen[4] is not inputs_seen[0]
    capped, plain = calls[0], calls[1]  # a tight cap changes the output
    assert capped.shape == (2, 2, 32, 16) and not torch.equal(capped, plain)
    skipped = softcap.run(args, deadline=time.perf_counter() - 1)
    assert [r["status"] for r in skipped] == ["budget"] * 8


def test_long_bench_flags_sizes_and_flops():
    """``--long``: its flags, the 1M-token sizes, the causal FLOP count and the repeats."""
    from cuflash.bench import long

    args = long.build_parser().parse_args([])
    assert args.seqlens == (131072, 262144, 524288, 1048576)
    assert (args.batch, args.heads, args.head_dim, args.dtype) == (1, 16, 128, "bf16")
    assert args.repeats is None and not args.no_sdpa and args.sdpa_max_seqlen is None
    args = long.build_parser().parse_args(["--seqlens", "128k,1M", "--repeats", "2", "--no-sdpa",
                                           "--sdpa-max-seqlen", "512k", "--dtype", "fp16"])
    assert args.seqlens == (131072, 2**20) and args.repeats == 2 and args.no_sdpa
    assert args.sdpa_max_seqlen == 524288 and args.dtype == "fp16"
    assert bench.build_parser().parse_args(["--long"]).long  # listed in bench --help
    assert [long.parse_seqlen(t) for t in ("1000", "4k", "1m", " 2M ")] == [1000, 4096, 2**20,
                                                                          2**21]
    assert [long.fmt_seqlen(s) for s in (1000, 4096, 131072, 2**20)] == ["1000", "4k", "128k",
                                                                        "1M"]
    assert [long.default_repeats(s) for s in long.DEFAULT_SEQLENS] == [3, 2, 1, 1]
    # Causal forward 2*2*B*H*S*S*D/2, backward 2.5x.
    s = 2**20
    assert long.pass_flops(1, 16, s, 128, "fwd") == 2 * 2 * 16 * s * s * 128 / 2
    assert long.pass_flops(1, 16, s, 128, "bwd") == 2.5 * 2 * 2 * 16 * s * s * 128 / 2
    # q, k, v, out, dout, dq, dk, dv of 2^31 bf16 elements each, and a float32 lse.
    assert long.tensor_bytes(1, 16, s, 128, 2) == 8 * 2**32 + 4 * 16 * s
    fields = long.timing_fields([10.0, 30.0, 20.0], [50.0], 1, 16, 4096, 128)
    assert fields["fwd_ms"] == 20.0 and fields["bwd_ms"] == 50.0
    assert fields["fwd_tflops"] == pytest.approx(2 * 16 * 4096 * 4096 * 128 / 20.0 / 1e9)
    assert fields["bwd_times_ms"] == [50.0]


def test_long_bench_table_shows_memory_per_token_and_missing_cells():
    from cuflash.bench import long

    gib, kib = 2**30, 2**10
    rows = []
    for s in (131072, 1048576):
        tensors = long.tensor_bytes(1, 16, s, 128, 2)
        rows.append({"impl": "cuflash", "seqlen": s, "batch": 1, "fwd_ms": 1000.0,
                     "fwd_tflops": 600.0, "bwd_ms": 2500.0, "bwd_tflops": 420.0,
                     "peak_bytes": 40 * kib * s, "tensor_bytes": tensors, "note": ""})
    rows.append({"impl": "sdpa-flash", "seqlen": 1048576, "batch": 1,
                 "note": "OutOfMemoryError: CUDA out of memory"})
    text = long.table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| S | impl | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s "
                               "| peak GiB |")
    assert len(lines) == 2 + 3
    assert lines[3] == ("| 1M | cuflash | 1000.0 | 600 | 2500.0 | 420 | 40.00 | 32.06 | 7.94 "
                        "| 40.00 |  |")
    assert lines[4] == ("| 1M | sdpa-flash | - | - | - | - | - | - | - | - "
                        "| OutOfMemoryError: CUDA out of memory |")
    assert lines[2].startswith("| 128k | cuflash |")
    assert f"| {40 * 131072 * kib / gib:.2f} |" in lines[2]
    line = long.linearity(rows, "cuflash")
    assert line == ("cuflash: peak per token 40.00-40.00 KiB over S = 128k, 1M (max/min 1.000: "
                    "memory linear in S)")
    assert long.linearity(rows, "sdpa-flash") is None


def test_long_bench_without_a_gpu_says_so(capsys):
    if gpu_skip_reason() is None:
        pytest.skip("a CUDA GPU is present: the command would run the benchmark")
    assert bench.main(["--long", "--seqlens", "4k"]) == 2
    assert "bench --long needs a CUDA GPU" in capsys.readouterr().err


# ---- bench --jax (cuflash.bench.jax_jit): everything but the GPU run ---------------------------


def _jax_sees_a_gpu() -> bool:
    try:
        import jax

        return jax.devices()[0].platform == "gpu"
    except Exception:  # not installed, or no backend at all
        return False


def test_jax_bench_help_runs_without_importing_jax():
    """``python -m cuflash bench --jax --help`` hands over to jax_jit's parser (listed in bench's
    own --help) and needs no JAX."""
    import subprocess
    import sys
    from pathlib import Path

    from cuflash.bench import jax_jit

    root = Path(bench.__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "cuflash", "bench", "--jax", "--help"], cwd=root,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m cuflash bench --jax")
    for flag in ("--budget", "--repeats", "--head-dims", "--seqlens", "--xla-logits-gib", "--out"):
        assert flag in proc.stdout
    code = ("import sys\nfrom cuflash import bench\ntry:\n    bench.main(['--jax', '--help'])\n"
            "except SystemExit as e:\n    print(e.code, 'jax' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0 False"
    assert bench.build_parser().parse_args(["--jax"]).jax  # listed in bench --help
    args = jax_jit.build_parser().parse_args([])
    assert (args.repeats, args.budget, args.head_dims, args.seqlens, args.xla_logits_gib,
            args.out) == (5, 225.0, [128, 64], [1024, 2048, 4096, 8192, 16384], 4.0, None)
    args = jax_jit.build_parser().parse_args(["--budget", "220", "--head-dims", "64",
                                              "--seqlens", "1024", "4096", "--out", "o"])
    assert (args.budget, args.head_dims, args.seqlens, str(args.out)) == (220.0, [64],
                                                                           [1024, 4096], "o")
    with pytest.raises(SystemExit):  # only the head dims of the sweep's model width
        jax_jit.build_parser().parse_args(["--head-dims", "96"])


def test_jax_bench_without_a_gpu_says_so(capsys):
    pytest.importorskip("jax")
    if _jax_sees_a_gpu():
        pytest.skip("JAX sees a GPU: the command would run the benchmark")
    assert bench.main(["--jax", "--budget", "1"]) == 2
    assert "bench --jax needs a CUDA GPU" in capsys.readouterr().err


def test_jax_bench_without_jax_says_so(capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` raises ImportError
    assert bench.main(["--jax"]) == 2
    assert "bench --jax needs JAX with a CUDA GPU; JAX is not importable" in capsys.readouterr().err


def test_jax_bench_flops():
    """Forward 4*B*H*S*S*D, x0.5 causal; the value_and_grad step 3.5x the forward."""
    from cuflash.bench import jax_jit

    b, h, s, d = 16, 16, 1024, 128
    assert jax_jit.pass_flops(b, h, s, d, False, "fwd") == 4 * b * h * s * s * d
    assert jax_jit.pass_flops(b, h, s, d, True, "fwd") == 2 * b * h * s * s * d
    assert jax_jit.pass_flops(b, h, s, d, True, "fwd+bwd") == 3.5 * 2 * b * h * s * s * d
    # Every row of the sweep does the same work per token: B*S and H*D fixed.
    flops = {jax_jit.pass_flops(jax_jit.TOKENS // s, jax_jit.HEADS[d], s, d, False, "fwd") / s
             for s in jax_jit.SEQLENS for d in jax_jit.HEADS}
    assert flops == {4.0 * jax_jit.TOKENS * 2048}


def _jax_rows() -> list[dict]:
    """Two rows of the H100 run of 2026-12-06 (docs/notes/runs/jax-jit-h100-2026-12-06.txt)."""
    return [
        {"D": 128, "S": 2048, "B": 8, "H": 16, "causal": False,
         "fwd cuflash": 661.8, "fwd cuflash first": 1.0, "fwd cudnn": 587.2,
         "fwd cudnn first": 10.3, "fwd xla": 104.1, "fwd xla first": 29.9,
         "fwd+bwd cuflash": 472.3, "fwd+bwd cuflash first": 1.5, "fwd+bwd cudnn": 460.1,
         "fwd+bwd xla": 110.1},
        {"D": 128, "S": 8192, "B": 2, "H": 16, "causal": True,
         "fwd cuflash": 652.9, "fwd cudnn": 567.0, "fwd xla": "skip",
         "fwd+bwd cuflash": 500.4, "fwd+bwd cudnn": 494.3, "fwd+bwd xla": "skip"},
    ]


_JAX_SMALL = [("cuflash", 96.0, 47.0), ("cudnn", 100.0, 51.0), ("xla", 81.0, 39.0)]


def test_jax_bench_table_reproduces_the_recorded_run():
    """The terminal table, line for line as the H100 run printed it."""
    from cuflash.bench import jax_jit

    rows = _jax_rows()
    assert [jax_jit.progress_line(r) for r in rows] == [
        "D128 S2048  B8  full     661.8    587.2    104.1    472.3    460.1    110.1",
        "D128 S8192  B2  causal   652.9    567.0     skip    500.4    494.3     skip"]
    assert jax_jit.table_lines(rows, _JAX_SMALL) == [
        "",
        "TFLOP/s, bf16, B*S = 16384 tokens; fwd = jitted forward, fwd+bwd = jitted value_and_grad "
        "(3.5x the forward's FLOPs); cf = cuflash.jax.attention, cudnn / xla = "
        "jax.nn.dot_product_attention(implementation=...)",
        "                      |              forward               |        forward + backward "
        "        ",
        "   D      S   B mask  |     cf  cudnn    xla cf/cud cf/xla |     cf  cudnn    xla cf/cud "
        "cf/xla",
        "-" * 95,
        " 128   2048   8 full  |  661.8  587.2  104.1   1.13   6.36 |  472.3  460.1  110.1   1.03"
        "   4.29",
        " 128   8192   2 causal|  652.9  567.0   skip   1.15      - |  500.4  494.3   skip   1.01"
        "      -",
        "first calls (trace, plan, compile; cuflash includes NVRTC where the kernel cache is "
        "cold), seconds in all: cuflash 2.5, cudnn 10.3, xla 29.9",
        "small jitted forward (B1 S128 H16 D128 bf16 causal), us per call: cuflash 96 latency / 47 "
        "back-to-back; cudnn 100 latency / 51 back-to-back; xla 81 latency / 39 back-to-back",
    ]
    assert jax_jit.first_seconds(rows) == pytest.approx({"cuflash": 2.5, "cudnn": 10.3,
                                                         "xla": 29.9})
    lines = jax_jit.table_lines([{**rows[1], "fwd cudnn": "error", "fwd+bwd xla": "budget"}], [])
    assert lines[-2] == (" 128   8192   2 causal|  652.9  error   skip      -      - |  500.4  "
                         "494.3 budget   1.01      -")
    assert lines[-1].endswith("seconds in all: ")  # no first call timed, no small call


def test_jax_bench_markdown_and_outputs(tmp_path):
    from cuflash.bench import jax_jit

    rows = _jax_rows()
    text = jax_jit.markdown(rows, _JAX_SMALL, ["a note"])
    lines = text.splitlines()
    assert lines[0].startswith("TFLOP/s, bf16, B*S = 16384 tokens;")
    assert lines[2] == ("| D | S | B | mask | fwd cf | fwd cudnn | fwd xla | fwd cf/cudnn "
                        "| fwd cf/xla | fwd+bwd cf | fwd+bwd cudnn | fwd+bwd xla "
                        "| fwd+bwd cf/cudnn | fwd+bwd cf/xla |")
    assert lines[3].count("|") == lines[2].count("|")
    assert lines[4] == ("| 128 | 2048 | 8 | full | 661.8 | 587.2 | 104.1 | 1.13 | 6.36 | 472.3 "
                        "| 460.1 | 110.1 | 1.03 | 4.29 |")
    assert lines[5] == ("| 128 | 8192 | 2 | causal | 652.9 | 567.0 | skip | 1.15 | - | 500.4 "
                        "| 494.3 | skip | 1.01 | - |")
    assert lines[6:] == ["", jax_jit.firsts_line(rows), "", jax_jit.small_line(_JAX_SMALL), "",
                         "a note"]

    record = {"command": "python -m cuflash bench --jax --budget 220",
              "environment": {"device": "NVIDIA H100 80GB HBM3", "jax": "0.11.2",
                              "cuflash": "0.1.0", "source_digest": "0123456789ab",
                              "date": "2026-12-06T00:00:00+00:00"},
              "correctness": {"ok": True, "in_graph": True,
                              "problem": "bf16, B2 Sq300 Sk357 H8/2 D64 causal", "outputs": []},
              "rows": rows,
              "small_call": [{"impl": i, "latency_us": lat, "back_to_back_us": thr}
                             for i, lat, thr in _JAX_SMALL]}
    paths = jax_jit.write_outputs(tmp_path / "out", record)
    assert [p.name for p in paths] == ["jax_jit.json", "jax_jit.md"]
    assert json.loads(paths[0].read_text()) == record
    md = paths[1].read_text()
    assert "| 128 | 2048 | 8 | full | 661.8 |" in md
    assert "correctness (jitted, bf16, B2 Sq300 Sk357 H8/2 D64 causal): PASS" in md
    assert ("NVIDIA H100 80GB HBM3, jax 0.11.2, cuflash 0.1.0 (source digest 0123456789ab), "
            "2026-12-06T00:00:00+00:00; `python -m cuflash bench --jax --budget 220`") in md


def test_jax_bench_out_records_the_run(tmp_path, monkeypatch, capsys):
    """``--out``: main's record of a run (the GPU parts stubbed) is JSON with the environment."""
    jax = pytest.importorskip("jax")
    import cuflash
    from cuflash.bench import jax_jit

    class FakeGpu:
        platform, device_kind = "gpu", "Fake GPU"

    check = {"ok": True, "in_graph": True, "problem": "bf16, tiny", "outputs": []}
    monkeypatch.setattr(jax, "devices", lambda *a: [FakeGpu()])
    monkeypatch.setattr(jax_jit, "correctness", lambda: check)
    seen = {}

    def sweep(args, deadline):
        seen["budget_left"] = deadline - time.perf_counter()
        return _jax_rows()

    monkeypatch.setattr(jax_jit, "sweep", sweep)
    monkeypatch.setattr(jax_jit, "small_call", lambda repeats: _JAX_SMALL)
    out = tmp_path / "o"
    assert bench.main(["--jax", "--budget", "220", "--out", str(out)]) == 0
    assert 200 < seen["budget_left"] <= 220 - jax_jit.SMALL_CALL_SECONDS
    stdout = capsys.readouterr().out
    assert stdout.startswith(f"cuflash {cuflash.__version__}, jax ") and "Fake GPU (gpu)" in stdout
    assert " 128   2048   8 full  |  661.8" in stdout and "correctness: PASS;" in stdout
    record = json.loads((out / "jax_jit.json").read_text())
    assert record["command"] == f"python -m cuflash bench --jax --budget 220 --out {out}"
    env = record["environment"]
    assert env["jax"] == jax.__version__ and env["device"] == "Fake GPU"
    assert len(env["source_digest"]) == 12 and env["date"]
    assert record["config"]["budget"] == 220.0 and record["config"]["tokens"] == 16384
    assert record["rows"] == _jax_rows() and record["correctness"] == check
    assert record["small_call"][0] == {"impl": "cuflash", "shape": "B1 S128 H16 D128 bf16 causal",
                                       "latency_us": 96.0, "back_to_back_us": 47.0}
    assert record["first_call_seconds"]["cudnn"] == pytest.approx(10.3)
    assert "| 128 | 8192 | 2 | causal | 652.9 |" in (out / "jax_jit.md").read_text()
    monkeypatch.setattr(jax_jit, "correctness", lambda: {**check, "ok": False})
    assert bench.main(["--jax", "--budget", "220"]) == 1  # a failed check fails the run


def test_jax_bench_times_a_jitted_step_on_the_cpu():
    """median_seconds over rotating input sets, on whatever device JAX has (XLA's attention)."""
    pytest.importorskip("jax")
    from cuflash.bench import jax_jit

    sets = jax_jit.input_sets(1, 32, 2, 16, seed=0)
    assert len(sets) == jax_jit.INPUT_SETS and sets[0][0].shape == (1, 32, 2, 16)
    assert str(sets[0][0].dtype) == "bfloat16"
    for mode in jax_jit.MODES:
        first, seconds = jax_jit.median_seconds(jax_jit.jitted("xla", True, mode), sets, 2,
                                                takes_dout=mode != "fwd")
        assert first > 0 and seconds > 0


# ---- bench --ring (cuflash.bench.ring): everything but the GPU run ---------------------------


def test_ring_bench_flags_cells_and_checks():
    """``--ring``: its flags, the cells, what cannot run on a world size, and its place in bench."""
    from cuflash.bench import config, ring

    assert [config.parse_seqlen(t) for t in ("512", "16k", "1m")] == [512, 16384, 2**20]
    args = ring.build_parser().parse_args([])
    assert args.seqlens == (131072, 262144, 524288, 1048576) and args.causal == "both"
    assert (args.world, args.heads, args.head_dim, args.repeats) == (None, 8, 128, 3)
    assert ring.cells(args)[:2] == [(131072, False), (131072, True)]
    assert ring.check(args, 4) is None
    args = ring.build_parser().parse_args(["--seqlens", "96,192", "--causal", "yes"])
    assert ring.cells(args) == [(96, True), (192, True)]
    assert ring.check(args, 3) is None
    assert ring.check(args, 5) == "--seqlens: 96 is not a multiple of 2 * world = 10"
    assert ring.check(args, 0) == "--world must be >= 1, got 0"
    for bad in (["--seqlens", "1x"], ["--causal", "maybe"], ["--world", "two"]):
        with pytest.raises(SystemExit):
            ring.build_parser().parse_args(bad)
    assert bench.build_parser().parse_args(["--ring"]).ring  # listed in bench --help


def test_ring_bench_rates_and_table():
    """Per-GPU TFLOP/s count the whole problem over world GPUs; single is its own one-GPU
    problem over S / world positions; the efficiency is their ratio."""
    from cuflash.bench import config, ring

    base = {"pass": "fwd", "seqlen": 8192, "world": 4, "heads": 8, "head_dim": 128,
            "causal": True}
    rates = ring._rates({"impl": "ring", **base}, 10.0)
    whole = config.attention_flops(1, 8, 8192, 8192, 128, causal=True, pass_="fwd")
    assert rates["tflops_per_gpu"] == pytest.approx(whole / 4 / 10.0 / 1e9)
    assert rates["tokens_per_s"] == pytest.approx(8192 / 10.0 * 1e3)
    single = ring._rates({"impl": "single", **base}, 1.0)
    part = config.attention_flops(1, 8, 2048, 2048, 128, causal=True, pass_="fwd")
    assert single["tflops_per_gpu"] == pytest.approx(part / 1.0 / 1e9)
    rows = [{"impl": "ring", **base, "status": "ok", "ms": 10.0, **rates},
            {"impl": "single", **base, "status": "ok", "ms": 1.0, **single},
            {"impl": "cp-sdpa", **base, "status": "error", "error": "ImportError: no cp"}]
    eff = ring.efficiency(rows[0], rows[1])
    assert eff == pytest.approx(rates["tflops_per_gpu"] / single["tflops_per_gpu"])
    assert ring.efficiency(rows[0], None) is None
    text = ring.table(rows)
    assert "single TFLOP/s (S/4)" in text.splitlines()[0]
    line = text.splitlines()[2]
    assert line.startswith("| fwd | 8192 | causal | ") and "| error |" in line
    assert line.endswith(f"| {eff:.2f} |")
    assert ring.progress_line(rows).startswith("S8192 world 4 causal: ring fwd ")


def test_ring_bench_runs_end_to_end_on_the_cpu(tmp_path, capsys):
    """``--ring --device cpu``: the same processes, group and collection over gloo, at toy
    sizes: every cell comes back from both ranks, cuflash's rows ran, the record is written."""
    pytest.importorskip("torch")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "ring"
    argv = ["--ring", "--device", "cpu", "--world", "2", "--seqlens", "32,64", "--heads", "2",
            "--head-dim", "8", "--repeats", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    record = json.loads((out / "ring.json").read_text())
    assert record["world"] == 2 and record["config"]["device"] == "cpu"
    rows = record["rows"]
    assert {(r["impl"], r["pass"], r["seqlen"], r["causal"]) for r in rows} == {
        (i, p, s, c) for i in ("ring", "single", "cp-sdpa") for p in ("fwd", "bwd")
        for s in (32, 64) for c in (False, True)}
    ours = [r for r in rows if r["impl"] != "cp-sdpa"]
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["tokens_per_s"] > 0 for r in ours), ours
    stdout = capsys.readouterr().out
    assert stdout.startswith("float32 on the CPU path (gloo; a smoke test)")
    assert "| fwd | 32 | full |" in stdout and (out / "ring.md").exists()


# ---- bench --mask-mods (cuflash.bench.mask_mods): everything but the GPU run ------------------


def test_mask_mods_bench_without_a_gpu_says_so(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the command would run the benchmark")
    assert bench.main(["--mask-mods", "--seqlens", "4096"]) == 2
    assert "bench --mask-mods needs a CUDA GPU" in capsys.readouterr().err


def test_mask_mods_bench_table_compares_with_flex(capsys):
    from cuflash.bench import mask_mods

    cell = {"head_dim": 128, "seqlen": 4096, "mask": "docs"}
    rows = [{**cell, "pass": "fwd", "impl": "cuflash map", "ms": 0.5},
            {**cell, "pass": "fwd", "impl": "cuflash", "ms": 1.5},
            {**cell, "pass": "fwd", "impl": "flex", "ms": 0.75},
            {**cell, "pass": "fwd", "impl": "causal, no mask_mod", "ms": 1.0}]
    mask_mods.summary(rows)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == "| 128 | 4096 | docs | fwd | 0.500 | 1.500 | 0.750 | 1.50x | 1.000 |"
