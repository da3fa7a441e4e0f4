#!/usr/bin/env bash
# One GPU pass for the split-KV decoding kernels: the decode and fp16/bf16 Hopper forward kernels
# compiled into CuPy's cache on all cores first (prewarm.py --only), then tests/test_gpu_decode.py
# in shards ($EX Hypothesis examples), then
# bench --decode alone on the GPU, with a sweep of split counts ($SWEEP). Logs under $OUT (the
# device tool's output folder). About six minutes on an H100: bash tests/perf/decode_pass.sh
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 CUFLASH_FUZZ_EXAMPLES=${EX:-20}
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
git log --oneline -1
T0=$(date +%s)
timeout 100 python3 tests/perf/prewarm.py --deadline 80 --workers 15 --only 'decode|fwd_sm90<cuflash::(f16|bf16)' > $OUT/prewarm.log 2>&1; tail -3 $OUT/prewarm.log
echo "prewarm at $(( $(date +%s) - T0 )) s"
N=8; L=$(mktemp -d)
for i in $(seq 0 $((N-1))); do
  ( SHARD=$i/$N timeout -s INT ${LIM:-100} python3 -m pytest -q -p tests.perf.shard --tb=short -rfE -p no:cacheprovider tests/test_gpu_decode.py > $L/s$i.log 2>&1; echo "rc=$?" >> $L/s$i.log ) &
done
wait
cat $L/*.log > $OUT/suites.log
echo "suites at $(( $(date +%s) - T0 )) s"
grep -a -h -E "^(FAILED|ERROR)|Error|assert" $L/*.log | sort | uniq | head -30
grep -a -h -E "^[0-9]+ (passed|failed)|rc=" $L/*.log | paste -sd ' '
timeout ${BENCH_LIM:-240} python3 -m cuflash bench --decode --repeats 3 --sweep ${SWEEP:-4,16,32,64,128} --out $OUT/decode > $OUT/bench_decode.log 2>&1; echo "decode bench rc=$?"
grep -v "^done" $OUT/bench_decode.log | tail -50
echo "total $(( $(date +%s) - T0 )) s"
