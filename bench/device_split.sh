#!/usr/bin/env bash
# One lease of a 2-GPU machine (nvidia-h200-x2), both GPUs busy: the GPU tests (and then $AFTER_TESTS) on GPU 0,
# the peer build and the benchmarks ($BENCH_CMD, a command file) on GPU 1, at the same time. Everything goes to
# $OUT/log.txt (the device tool returns a few files only); the tests' full outputs to $OUT/gpu_tests.txt.
#   PAR_TESTS="a.py; B=1 b.py -k x" BENCH_CMD=bench.sh AFTER_TESTS=after.sh bash bench/device_split.sh
# PAR_TESTS: groups separated by ';', one pytest process each (leading NAME=value words set its environment).
# TEST_GPU / BENCH_GPU (default 0 / 1) pick the GPUs (both 0 on a one-GPU machine).
# Timings on GPU 1 run beside the tests on GPU 0 (separate GPUs, shared host CPUs: host-bound rows may move).
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-device_out}; mkdir -p "$OUT"
LOG="$OUT/log.txt"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
left() { echo $(( ${DEADLINE:-570} - ($(date +%s) - T0) )); }
python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || { stamp "install failed"; exit 1; }
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv >> "$LOG" 2>&1
[ -e .commit ] && export SSMCORE_BENCH_COMMIT=$(cat .commit)  # bench.report: the copy's commit (no .git in a git archive copy)
stamp "commit $(cat .commit 2>/dev/null)"
if ls .peers/peerbuild.tgz.* >/dev/null 2>&1; then cat .peers/peerbuild.tgz.* | tar -xzf - -C .peers; fi
rm -f .peers/*.tar.gz /tmp/peer_done

tests() {
  export CUDA_VISIBLE_DEVICES=${TEST_GPU:-0}
  local i=0 pids=() g envs rest
  IFS=';' read -ra groups <<< "${PAR_TESTS:-}"
  for g in "${groups[@]}"; do
    i=$((i + 1))
    envs=""; rest="$g"
    while [[ "$rest" =~ ^[[:space:]]*([A-Z_][A-Z0-9_]*=[^[:space:]]*)[[:space:]]+(.*)$ ]]; do
      envs="$envs ${BASH_REMATCH[1]}"; rest="${BASH_REMATCH[2]}"
    done
    ( eval "$envs timeout $(( $(left) - ${AFTER_RESERVE:-0} )) python3 -m pytest -q -m gpu -p no:cacheprovider -rfE $rest" > /tmp/gpu_tests_$i.txt 2>&1; echo "exit $?" >> /tmp/gpu_tests_$i.txt ) &
    pids+=($!)
  done
  [ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
  for j in $(seq 1 $i); do
    grep -E "^(FAILED|ERROR)" /tmp/gpu_tests_$j.txt | head -30 >> "$LOG"
    stamp "GPU0 group $j (${groups[$((j - 1))]}): $(grep -E "passed|failed|error" /tmp/gpu_tests_$j.txt | tail -1) $(tail -1 /tmp/gpu_tests_$j.txt)"
  done
  [ $i -gt 0 ] && cat /tmp/gpu_tests_*.txt > "$OUT/gpu_tests.txt"
  if [ -n "${AFTER_TESTS:-}" ]; then
    while [ ! -e /tmp/peer_done ] && [ "$(left)" -gt 30 ]; do sleep 2; done  # the peer (its build runs on GPU1's side)
    eval "$(grep '^export PYTHONPATH' /tmp/peer_build.txt 2>/dev/null)"
    stamp "GPU0: $AFTER_TESTS"
    timeout $(left) bash "$AFTER_TESTS" > /tmp/after.txt 2>&1
    stamp "GPU0: $AFTER_TESTS rc=$?"
  fi
}

benches() {
  export CUDA_VISIBLE_DEVICES=${BENCH_GPU:-1}
  MAX_JOBS=16 python3 .peers/build_peers.py .peers .peers/build > /tmp/peer_build.txt 2>&1
  touch /tmp/peer_done
  eval "$(grep '^export PYTHONPATH' /tmp/peer_build.txt)"
  python3 -c "import mamba_ssm, selective_scan_cuda, causal_conv1d_cuda; print('peer importable')" > /tmp/bench.txt 2>&1
  stamp "GPU1: peer ready; $BENCH_CMD"
  [ -n "${BENCH_CMD:-}" ] && timeout $(left) bash "$BENCH_CMD" >> /tmp/bench.txt 2>&1
  stamp "GPU1: $BENCH_CMD rc=$?"
}

tests &
TP=$!
benches &
BP=$!
wait $TP $BP
{ echo "=== GPU1 benches"; cat /tmp/bench.txt; echo "=== GPU0 after the tests"; cat /tmp/after.txt 2>/dev/null; } >> "$LOG"
stamp "done"
