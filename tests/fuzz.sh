#!/usr/bin/env bash
# A long GPU fuzz run: tests/test_gpu_fuzz.py, one pytest process per (kernel family, dtype) in
# parallel on one GPU (no pytest-xdist needed), each with its own log, Hypothesis seed and fresh
# example database; then a summary. Exits 0 only when every combination that can run here passed
# (skipped ones, e.g. Hopper off compute capability 9.0, are listed as skipped).
#
#   PYTHONPATH=. CUFLASH_FUZZ_EXAMPLES=2000 bash tests/fuzz.sh
#
# Environment:
#   CUFLASH_FUZZ_EXAMPLES  examples per (family, dtype) (default 2000)
#   CUFLASH_FUZZ_SHARDS    processes per combination, each running its share of the examples
#                          with its own seed (default 1: one Hypothesis run of all of them)
#   CUFLASH_FUZZ_COMBOS    which combinations (default: all six, as below)
#   CUFLASH_FUZZ_SEED      base Hypothesis seed (default: random); process i (in the order
#                          of the combinations, then shards) uses seed + i, printed per line
#   CUFLASH_FUZZ_OUT       directory for logs and databases (default: a new one under /tmp)
#   PYTHON                 interpreter (default: .venv/bin/python if present, else python3)
#
# A failure's example stays in its database (OUT/db/COMBO-SHARD): rerun that one process with
# CUFLASH_FUZZ_DB set to it to replay it, or use the @reproduce_failure blob its log prints.
set -u

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

examples=${CUFLASH_FUZZ_EXAMPLES:-2000}
shards=${CUFLASH_FUZZ_SHARDS:-1}
combos=${CUFLASH_FUZZ_COMBOS:-"hopper-fp16 hopper-bf16 sm80-fp16 sm80-bf16 simt-fp32 simt-fp64"}
seed=${CUFLASH_FUZZ_SEED:-$(( (RANDOM << 15 | RANDOM) ))}
out=${CUFLASH_FUZZ_OUT:-${TMPDIR:-/tmp}/cuflash-fuzz-$(date -u +%Y%m%dT%H%M%SZ)}
if ! [[ "$examples" =~ ^[1-9][0-9]*$ && "$shards" =~ ^[1-9][0-9]*$ ]]; then
  echo "fuzz.sh: CUFLASH_FUZZ_EXAMPLES and CUFLASH_FUZZ_SHARDS must be positive integers" >&2
  exit 2
fi
mkdir -p "$out/db" || exit 2

read -r -a combo_list <<< "$combos"
processes=$(( ${#combo_list[@]} * shards ))
cores=$(nproc 2>/dev/null || echo 1)
threads=$(( cores / processes ))
(( threads >= 1 )) || threads=1
per_shard=$(( (examples + shards - 1) / shards ))

echo "fuzz: $examples examples per combination ($shards shard(s) of $per_shard), seed $seed,"
echo "      ${#combo_list[@]} combinations, $processes processes, $threads BLAS thread(s) each"
echo "      $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])' 2>&1)"
echo "      commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(
  git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)'), logs in $out"

start_all=$(date +%s)
pids=()
index=0
for combo in "${combo_list[@]}"; do
  for (( shard = 0; shard < shards; shard++ )); do
    name="$combo-$shard"
    process_seed=$(( seed + index ))
    index=$(( index + 1 ))
    (
      export CUFLASH_FUZZ_EXAMPLES=$per_shard CUFLASH_FUZZ_DB="$out/db/$name"
      export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
      export PYTHONUNBUFFERED=1
      begin=$(date +%s)
      "$PYTHON" -m pytest -q -s -p no:cacheprovider --hypothesis-show-statistics \
        --hypothesis-seed=$process_seed "tests/test_gpu_fuzz.py::test_fuzz[$combo]" \
        > "$out/$name.log" 2>&1
      rc=$?
      echo "$rc $(( $(date +%s) - begin )) $process_seed" > "$out/$name.status"
    ) &
    pids+=($!)
  done
done
for pid in "${pids[@]}"; do wait "$pid"; done
wall_all=$(( $(date +%s) - start_all ))

# A process's outcome from pytest's summary line (a module-level skip exits 4 with a node id).
outcome() {
  if grep -Eq '[0-9]+ (failed|errors?)( |,|$)' "$1"; then echo failed
  elif [[ $2 == 0 ]] && grep -Eq '[0-9]+ passed' "$1"; then echo passed
  elif grep -Eq '[0-9]+ skipped' "$1" && ! grep -Eq '[0-9]+ passed' "$1"; then echo skipped
  else echo failed
  fi
}

failed=0
passed=0
printf '\n%-13s %-8s %9s %8s  %s\n' combination status examples wall seeds
for combo in "${combo_list[@]}"; do
  status=passed count=0 wall=0 seeds=""
  for (( shard = 0; shard < shards; shard++ )); do
    name="$combo-$shard"
    read -r rc seconds process_seed < "$out/$name.status" 2>/dev/null || {
      rc=99; seconds=0; process_seed="?"; }
    seeds="$seeds${seeds:+,}$process_seed"
    (( seconds > wall )) && wall=$seconds
    n=$(sed -n "s/^fuzz $combo: \([0-9]*\) examples.*/\1/p" "$out/$name.log" | tail -n 1)
    count=$(( count + ${n:-0} ))
    case $(outcome "$out/$name.log" "$rc") in
      passed) ;;
      skipped) [[ $status == passed ]] && status=skipped ;;
      *) status=FAILED ;;
    esac
  done
  case $status in
    FAILED) failed=$(( failed + 1 )) ;;
    passed)
      passed=$(( passed + 1 ))
      if (( count < examples )); then status="passed(<$examples)"; fi ;;
  esac
  printf '%-13s %-8s %9d %6d s  %s\n' "$combo" "$status" "$count" "$wall" "$seeds"
done
echo "wall time ${wall_all} s; logs: $out"
for combo in "${combo_list[@]}"; do
  for (( shard = 0; shard < shards; shard++ )); do
    log="$out/$combo-$shard.log"
    read -r rc _ < "$out/$combo-$shard.status" 2>/dev/null || rc=99
    case $(outcome "$log" "$rc") in
      skipped) echo "  $combo-$shard: $(grep -m 1 -o 'SKIPPED.*' "$log")" ;;
      failed)
        echo "  $combo-$shard failed (exit status $rc); the end of its log:"
        tail -n 40 "$log" | sed 's/^/    /' ;;
    esac
  done
done
if (( failed > 0 )); then
  echo "fuzz: $failed combination(s) FAILED"
  exit 1
fi
if (( passed == 0 )); then
  echo "fuzz: nothing ran (every combination skipped)"
  exit 3
fi
echo "fuzz: every combination that runs here passed"
