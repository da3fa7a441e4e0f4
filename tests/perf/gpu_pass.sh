#!/usr/bin/env bash
# One GPU pass for what is held back on CUDA (_checks.UNVERIFIED_ON_CUDA: softcap, sinks, ALiBi,
# bias, mask): the suites that draw them, in parallel (each cut at $LIM seconds, $EX Hypothesis
# examples), then bench --softcap, --softcap --cap 0 --sinks, --softcap --cap 0 --alibi and
# --overhead. Logs and tables under $OUT (the device tool's output folder); NOBENCH=1 runs the
# suites only. About 8 minutes on an H100: bash tests/perf/gpu_pass.sh
set -u
export PYTHONPATH=. CUFLASH_FUZZ_EXAMPLES=${EX:-25} PYTHONUNBUFFERED=1 CUFLASH_UNVERIFIED_CUDA=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee $OUT/gpu.txt
git log --oneline -1 > $OUT/commit.txt 2>/dev/null; git status --short >> $OUT/commit.txt
T0=$(date +%s)
suite() { name=$1; shift; ( timeout ${LIM:-210} python3 -m pytest -q --maxfail=4 --tb=short -p no:cacheprovider "$@" > $OUT/$name.log 2>&1; echo "rc=$?" >> $OUT/$name.log ) & }
suite fwd tests/test_gpu_forward.py -k "matches_reference or (tile_edges and cap)"
suite bwd tests/test_gpu_backward.py -k "matches_reference or (tile_edges and cap)"
suite sm90 tests/test_gpu_sm90.py
suite bwd90 tests/test_gpu_bwd_sm90.py -k "cap"
suite jax tests/test_gpu_jax.py
suite misc tests/test_score_mods.py tests/test_gpu_ring.py tests/test_gpu_replay.py -k "cuda or ring or torch_program"
suite sinks tests/test_gpu_sinks.py
suite alibi tests/test_gpu_alibi.py
suite biasmask tests/test_gpu_bias_mask.py
wait
echo "suites done in $(( $(date +%s) - T0 )) s"
for f in fwd bwd sm90 bwd90 jax misc sinks alibi biasmask; do echo "== $f: $(tail -3 $OUT/$f.log | tr '\n' ' ')"; done
if [ -z "${NOBENCH:-}" ]; then
  timeout 95 python3 -m cuflash bench --softcap --seqlens 4k,16k --head-dims 64,128 --repeats 5 --budget 70 --out $OUT/softcap > $OUT/bench_softcap.log 2>&1; echo "softcap bench rc=$?"
  timeout 50 python3 -m cuflash bench --softcap --cap 0 --sinks --seqlens 4k,16k --head-dims 64,128 --repeats 5 --budget 35 --out $OUT/sinks > $OUT/bench_sinks.log 2>&1; echo "sinks bench rc=$?"
  timeout 80 python3 -m cuflash bench --softcap --cap 0 --alibi --seqlens 4k,16k --head-dims 64,128 --repeats 5 --budget 60 --out $OUT/alibi > $OUT/bench_alibi.log 2>&1; echo "alibi bench rc=$?"
  timeout 75 python3 -m cuflash bench --overhead --repeats 5 > $OUT/bench_overhead.log 2>&1; echo "overhead bench rc=$?"
fi
echo "total $(( $(date +%s) - T0 )) s"
tail -22 $OUT/softcap/softcap.md 2>/dev/null; tail -12 $OUT/sinks/softcap.md 2>/dev/null; tail -22 $OUT/alibi/softcap.md 2>/dev/null; tail -5 $OUT/bench_softcap.log $OUT/bench_sinks.log $OUT/bench_alibi.log; grep -E "us|call" $OUT/bench_overhead.log | tail -16
