#!/usr/bin/env bash
# One H200 lease, everything at once: install, the peer (carried build or background build), GPU tests,
# benchmarks. Everything goes to one log ($OUT/log.txt) to stay within the device tool's 8 returned files.
#   TESTS="tests/gpu/..." BENCH="scan ops" bash bench/device_session.sh
# TESTS: pytest paths for the GPU tests ("" to skip). BENCH: words among scan scanq conv ssd ssdq ssd_bwd ops blocks
# e2e det mgpu ovh prof ovp gen hprof pblock dec cmd (runs $CMD). A PAR_TESTS group may start with NAME=value words.
# PACK_PEER=1 returns the built peer extensions as $OUT/peerbuild.tgz.* (carry them back in .peers/).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-device_out}; mkdir -p "$OUT"
LOG="$OUT/log.txt"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
left() { echo $(( ${DEADLINE:-570} - ($(date +%s) - T0) )); }
python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || { stamp "install failed"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv >> "$LOG" 2>&1
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)" >> "$LOG" 2>&1
if ls .peers/peerbuild.tgz.* >/dev/null 2>&1; then cat .peers/peerbuild.tgz.* | tar -xzf - -C .peers && stamp "peer build unpacked"; fi
rm -f .peers/*.tar.gz  # build_peers.py globs mamba_ssm-*: only the source trees may match
( MAX_JOBS=16 python3 .peers/build_peers.py .peers .peers/build > /tmp/peer_build.txt 2>&1 ) &
PEER=$!
if [ -n "${TESTS-tests}" ]; then
  stamp "GPU tests: ${TESTS-tests}"
  eval "timeout $(( $(left) - ${BENCH_RESERVE:-0} )) python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS-tests} ${PYTEST_ARGS:-}" > /tmp/gpu_tests.txt 2>&1
  rc=$?
  grep -E "FAILED|ERROR|Error|error:" /tmp/gpu_tests.txt | head -60 >> "$LOG"
  stamp "GPU tests rc=$rc: $(tail -1 /tmp/gpu_tests.txt)"
  cp /tmp/gpu_tests.txt "$OUT/gpu_tests.txt"
fi
if [ -n "${PAR_TESTS:-}" ]; then  # groups of test paths separated by ';', one pytest process each, in parallel
  stamp "GPU tests in parallel groups: $PAR_TESTS"
  i=0; pids=()
  IFS=';' read -ra groups <<< "$PAR_TESTS"
  for g in "${groups[@]}"; do
    i=$((i + 1))
    # leading NAME=value words of a group set environment variables for that group's pytest only
    envs=""; rest="$g"
    while [[ "$rest" =~ ^[[:space:]]*([A-Z_][A-Z0-9_]*=[^[:space:]]*)[[:space:]]+(.*)$ ]]; do
      envs="$envs ${BASH_REMATCH[1]}"; rest="${BASH_REMATCH[2]}"
    done
    ( eval "$envs timeout $(( $(left) - ${BENCH_RESERVE:-0} )) python3 -m pytest -q -m gpu -p no:cacheprovider -rfE $rest ${PYTEST_ARGS:-}" > /tmp/gpu_tests_$i.txt 2>&1; echo "exit $?" >> /tmp/gpu_tests_$i.txt ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  for j in $(seq 1 $i); do
    grep -E "^(FAILED|ERROR)" /tmp/gpu_tests_$j.txt | head -30 >> "$LOG"
    stamp "group $j (${groups[$((j - 1))]}): $(grep -E "passed|failed|error" /tmp/gpu_tests_$j.txt | tail -1) $(tail -1 /tmp/gpu_tests_$j.txt)"
  done
  cat /tmp/gpu_tests_*.txt > "$OUT/gpu_tests.txt"
fi
wait $PEER
cat /tmp/peer_build.txt >> "$LOG"
eval "$(grep '^export PYTHONPATH' /tmp/peer_build.txt)"
python3 -c "import mamba_ssm, selective_scan_cuda, causal_conv1d_cuda; print('peer importable')" >> "$LOG" 2>&1
stamp "peer ready"
if [ -n "${PACK_PEER:-}" ]; then
  (cd .peers && strip -g build/conv/*.so build/scan/*.so 2>/dev/null; tar -czf - build/conv/*.so build/scan/*.so) | split -b 15m - "$OUT/peerbuild.tgz."
  ls -la "$OUT" >> "$LOG"; stamp "peer packed"
fi
for b in ${BENCH:-}; do
  t=$(left); [ "$t" -lt 20 ] && { stamp "no time left for $b"; continue; }
  stamp "bench $b (limit $t s)"
  case $b in
    scan) timeout $t python3 bench/gpu_scan.py --warm --peer --variants >> "$LOG" 2>&1 ;;
    conv) timeout $t python3 bench/gpu_mamba1_misc.py --only conv >> "$LOG" 2>&1 ;;
    ssd) timeout $t python3 bench/gpu_ssd.py ${SSD_ARGS:-} >> "$LOG" 2>&1 ;;
    ssd_bwd) timeout $t python3 bench/gpu_ssd_bwd.py ${SSDB_ARGS:-} >> "$LOG" 2>&1 ;;
    ops|blocks|e2e) BENCH_SUITES=$b timeout $t bash bench/run_gpu.sh /tmp/bench_$b ${BENCH_ARGS:-} > /dev/null 2>&1
       tail -40 /tmp/bench_$b/bench.txt >> "$LOG"; cp /tmp/bench_$b/bench.json "$OUT/bench_$b.json" 2>/dev/null ;;
    ovh) timeout $t python3 bench/overhead.py --device cuda --repeat 5 --number 100 >> "$LOG" 2>&1 ;;
    prof) timeout $t python3 bench/profile_decode.py >> "$LOG" 2>&1 ;;
    ovp) timeout $t python3 bench/overhead_parts.py ${OVP_ARGS:-} >> "$LOG" 2>&1 ;;
    gen) timeout $t python3 bench/gen_breakdown.py ${GEN_ARGS:-} >> "$LOG" 2>&1 ;;
    dec) timeout $t python3 bench/gpu_decode_kernels.py ${DEC_ARGS:-} >> "$LOG" 2>&1 ;;
    pblock) timeout $t python3 bench/profile_block.py ${PBLOCK_ARGS:-} >> "$LOG" 2>&1 ;;
    hprof) timeout $t python3 bench/host_profile.py ${HPROF_ARGS:-} >> "$LOG" 2>&1 ;;
    ssdq) timeout $t python3 bench/gpu_ssd.py --quick >> "$LOG" 2>&1 ;;
    scanq) timeout $t python3 bench/gpu_scan.py --warm --peer >> "$LOG" 2>&1 ;;
    cmd) timeout $t bash -c "$CMD" >> "$LOG" 2>&1 ;;  # CMD: any shell command line (its output goes to the log)
    det) timeout $t python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/gpu/test_determinism_gpu.py >> "$LOG" 2>&1 ;;
    mgpu) export NCCL_NVLS_ENABLE=0
       timeout $t torchrun --standalone --nproc_per_node=1 bench/multi_gpu_train.py ddp --steps 20 --out /tmp/mg >> "$LOG" 2>&1
       timeout $(left) torchrun --standalone --nproc_per_node=1 bench/multi_gpu_train.py tp --out /tmp/mg >> "$LOG" 2>&1 ;;
  esac
  stamp "bench $b rc=$?"
done
stamp "done"
