#!/usr/bin/env bash
# One GPU pass for the score modifications (softcap, sinks, ALiBi, bias, mask): every kernel
# compiled into CuPy's cache on all cores first (prewarm.py), then their suites as $N shards side
# by side (shard.py; $EX Hypothesis examples, each shard cut at $LIM seconds), then bench
# --softcap (softcap 30), --cap 0 --sinks, --cap 0 --alibi and --overhead. Logs and tables under
# $OUT (the device tool's output folder); NOBENCH=1 runs the suites only. About 7 minutes on an
# H100 (prewarm 70 s, suites 65 s at EX=10): bash tests/perf/gpu_pass.sh
set -u
export PYTHONPATH=. CUFLASH_FUZZ_EXAMPLES=${EX:-10} PYTHONUNBUFFERED=1
# one BLAS thread per shard: the shards' float64 references otherwise oversubscribe the cores;
# JAX allocating as it goes: preallocating 75% of the GPU per shard ran the others out of memory
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
N=${N:-15}
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee $OUT/gpu.txt
git log --oneline -1 > $OUT/commit.txt 2>/dev/null; git status --short >> $OUT/commit.txt
T0=$(date +%s)
timeout 200 python3 tests/perf/prewarm.py --deadline 180 --workers $N
SUITES=(tests/test_gpu_forward.py tests/test_gpu_backward.py tests/test_gpu_sm90.py
        tests/test_gpu_bwd_sm90.py tests/test_gpu_sinks.py tests/test_gpu_alibi.py
        tests/test_gpu_bias_mask.py tests/test_gpu_jax.py tests/test_score_mods.py
        tests/test_gpu_ring.py tests/test_gpu_replay.py)
# the long general suites: only their reference and softcap cases
K="not (test_gpu_forward or test_gpu_backward or test_gpu_bwd_sm90) or matches_reference or cap"
LOGS=$(mktemp -d)
for i in $(seq 0 $((N - 1))); do
  ( SHARD=$i/$N timeout -s INT ${LIM:-300} python3 -m pytest -q -p tests.perf.shard --tb=short \
      -rfE -p no:cacheprovider "${SUITES[@]}" -k "$K" > $LOGS/shard$i.log 2>&1
    echo "rc=$?" >> $LOGS/shard$i.log ) &
done
wait
cat $LOGS/shard*.log > $OUT/suites.log
echo "suites done in $(( $(date +%s) - T0 )) s"
grep -a -h -E "^(FAILED|ERROR)" $LOGS/shard*.log | sort
grep -a -h -E "^[0-9]+ (passed|failed)|rc=" $LOGS/shard*.log | paste -sd ' '
if [ -z "${NOBENCH:-}" ]; then
  B="--seqlens 4k,16k --head-dims 64,128 --repeats 5"
  timeout 150 python3 -m cuflash bench --softcap $B --budget 130 --out $OUT/softcap > $OUT/bench_softcap.log 2>&1; echo "softcap bench rc=$?"
  timeout 60 python3 -m cuflash bench --softcap --cap 0 --sinks $B --budget 45 --out $OUT/sinks > $OUT/bench_sinks.log 2>&1; echo "sinks bench rc=$?"
  timeout 150 python3 -m cuflash bench --softcap --cap 0 --alibi $B --budget 130 --out $OUT/alibi > $OUT/bench_alibi.log 2>&1; echo "alibi bench rc=$?"
  timeout 75 python3 -m cuflash bench --overhead --repeats 5 > $OUT/bench_overhead.log 2>&1; echo "overhead bench rc=$?"
  for name in softcap sinks alibi; do tail -22 $OUT/$name/softcap.md 2>/dev/null; done
  grep -E "us|call" $OUT/bench_overhead.log | tail -16
fi
echo "total $(( $(date +%s) - T0 )) s"
