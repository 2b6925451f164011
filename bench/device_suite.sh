#!/usr/bin/env bash
# One H200 lease for the full GPU benchmark suite (issue 8): install, carried peer build, a quick SSD
# correctness gate for the default forward kernels (falls back to SSMCORE_SSD_FWD=v2 if it fails), the SSD
# kernel bench, then bench/run_gpu.sh into $OUT/bench (RESULTS.md, bench.json, bench.txt, plots).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-device_out}; mkdir -p "$OUT"
LOG="$OUT/log.txt"
T0=$(date +%s)
[ -f .commit ] && export SSMCORE_BENCH_COMMIT=$(cat .commit)  # a `git archive` copy: name its commit in RESULTS.md
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || { stamp "install failed"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv >> "$LOG" 2>&1
if ls .peers/peerbuild.tgz.* >/dev/null 2>&1; then cat .peers/peerbuild.tgz.* | tar -xzf - -C .peers && stamp "peer build unpacked"; fi
rm -f .peers/*.tar.gz
eval "$(python3 .peers/build_peers.py .peers .peers/build 2>&1 | grep '^export PYTHONPATH')"
stamp "peer: $(python3 -c 'import mamba_ssm, selective_scan_cuda, causal_conv1d_cuda; print("importable")' 2>&1 | tail -1)"
if [ -n "${GATE:-}" ]; then
  eval "timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -x $GATE" >> "$LOG" 2>&1 || { export SSMCORE_SSD_FWD=v2; stamp "gate failed: SSMCORE_SSD_FWD=v2"; }
  stamp "gate done"
fi
[ -n "${SSD_QUICK:-}" ] && { timeout ${SSD_QUICK_S:-150} python3 bench/gpu_ssd.py --quick >> "$LOG" 2>&1; stamp "ssd quick rc=$?"; }
left=$(( ${DEADLINE:-570} - ($(date +%s) - T0) ))
stamp "suite (limit $left s)"
timeout $left bash bench/run_gpu.sh "$OUT/bench" ${SUITE_ARGS:-} > /dev/null 2>&1
stamp "suite rc=$?"
tail -60 "$OUT/bench/bench.txt" >> "$LOG"
