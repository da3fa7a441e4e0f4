#!/usr/bin/env bash
# One GPU pass for the work written without a GPU on 2026-12-08 (docs/notes/2026-12-07-block-maps.md,
# docs/notes/2026-12-08-user-mods-with-builtins.md), most informative first, each step cut by its
# own timeout so a short lease still returns something:
#   1. tests/test_gpu_block_map.py, both ways (map bounds on and off);
#   2. tests/test_gpu_user_mods.py (user kinds, and user kinds beside ALiBi, bias and mask);
#   3. bench --mask-mods with CUFLASH_MAP_BOUNDS=1 against =0 in the same run (A/B), D 128 and
#      64, S 4k, 16k and 1k (documents and prefix-LM against FlexAttention).
# Logs under $OUT (the device tool's output folder). About 8 minutes on an H100:
#   bash tests/perf/block_map_pass.sh
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
git log --oneline -1 > $OUT/commit.txt 2>/dev/null
T0=$(date +%s)
since() { echo "$(( $(date +%s) - T0 )) s"; }
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_gpu_block_map.py \
  > $OUT/tests_block_map.log 2>&1; echo "block map tests rc=$? $(since)"
tail -2 $OUT/tests_block_map.log
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_gpu_user_mods.py \
  > $OUT/tests_user_mods.log 2>&1; echo "user mods tests rc=$? $(since)"
tail -2 $OUT/tests_user_mods.log
B="--mask-mods --head-dims 128 64 --seqlens 4096 16384 1024"
CUFLASH_MAP_BOUNDS=1 timeout 100 python3 -m cuflash bench $B --out $OUT/bounds_on \
  > $OUT/bench_bounds_on.log 2>&1; echo "bench bounds on rc=$? $(since)"
CUFLASH_MAP_BOUNDS=0 timeout 100 python3 -m cuflash bench $B --out $OUT/bounds_off \
  > $OUT/bench_bounds_off.log 2>&1; echo "bench bounds off rc=$? $(since)"
for side in on off; do
  echo "== bounds $side"
  grep -E "^\| " $OUT/bench_bounds_$side.log | tail -30
done
grep -a -h -E "^(FAILED|ERROR)" $OUT/tests_*.log | head -20
echo "total $(since)"
