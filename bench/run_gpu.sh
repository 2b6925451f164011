#!/usr/bin/env bash
# The full GPU benchmark suite on one H200, the peer (mamba_ssm + causal_conv1d) built first.
#
#   bash bench/run_gpu.sh [OUTDIR] [extra pytest arguments, e.g. -k "not sweep"]
#   BENCH_SUITES="ops blocks" bash bench/run_gpu.sh OUTDIR      # a subset (default: ops blocks e2e)
#
# Writes OUTDIR/bench.json (the suites' pytest-benchmark runs merged; rewritten after each suite,
# so a run cut short keeps what finished), bench.txt (log), peer_build.txt, RESULTS.md and
# plots/*.png (bench/report.py). Without .peers/ (see ../shared/peers/README.md) or when its build
# fails, ours alone are measured and every benchmark's extra_info says why. An existing
# .peers/build is reused (build_peers.py skips what is built), so a second run skips the ~6 min build.
set -uo pipefail
out=${1:-bench/out}
shift || true
mkdir -p "$out"
parts=$(mktemp -d)
export PYTHONUNBUFFERED=1
if ls -d .peers/mamba_ssm-*/ .peers/causal_conv1d-*/ >/dev/null 2>&1; then
    start=$(date +%s)
    line=$(python3 .peers/build_peers.py .peers .peers/build 2>&1 | tee "$out/peer_build.txt" | grep '^export PYTHONPATH=')
    echo "peer build: $(( $(date +%s) - start )) s" | tee -a "$out/bench.txt"
    if [ -n "$line" ]; then eval "$line"; else echo "peer build failed (see $out/peer_build.txt): ours only"; fi
else
    echo "no .peers/ source trees: ours only" | tee -a "$out/bench.txt"
fi
timeout_arg=()
python3 -c "import pytest_timeout" 2>/dev/null && timeout_arg=(--timeout=240)  # a hung benchmark fails alone
rc=0
for suite in ${BENCH_SUITES:-ops blocks e2e}; do
    start=$(date +%s)
    python3 -m pytest "bench/test_gpu_$suite.py" -p no:cacheprovider "${timeout_arg[@]}" \
        --benchmark-json="$parts/$suite.json" --benchmark-group-by=group \
        --benchmark-columns=min,median,iqr,rounds,iterations "$@" 2>&1 | tee -a "$out/bench.txt"
    status=${PIPESTATUS[0]}
    [ "$status" -ne 0 ] && rc=$status
    echo "suite $suite: $(( $(date +%s) - start )) s, pytest exit $status" | tee -a "$out/bench.txt"
    ls "$parts"/*.json >/dev/null 2>&1 && python3 -m bench.report "$parts"/*.json --merged "$out/bench.json" \
        --out "$out/RESULTS.md" --plots "$out/plots" --title "GPU benchmarks (H200)"
done
rm -rf "$parts"
exit "$rc"
