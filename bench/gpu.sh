#!/usr/bin/env bash
# One command for a GPU machine: the gpu tests, the pytest-benchmark suites at full size, and the
# end-to-end `padfree bench`, each result written as JSON under bench/results/ (or OUT) with the
# GPU name and date in the file name. Results are committed as they come out; never edit them.
#   bench/gpu.sh                 # everything (about 20-30 minutes on an H100)
#   bench/gpu.sh /tmp/results    # somewhere else
#   bench/gpu.sh --lease OUT     # the subset that fits a 10-minute lease (below), 8 files in OUT
#
# --lease: the gpu tests; attention (every case), LoRA at hidden 4096 (every rank), MoE at 16k
# tokens (padfree and grouped_mm), the LoRA mixture forward+backward, `padfree bench --quick`, the
# padfree attention cases again with PADFREE_AUTOTUNE=1, and Nsight Compute's counters for the
# attention kernels of one forward+backward (where ncu exists; into the log).
# The Triton JIT compiles first, for every case at once (pytest-xdist, timing off) next to the gpu
# tests, so the timed runs that follow, one at a time, find a warm cache; each stage has a time
# limit, so a slow one costs its own results and not the rest. No autotune runs, no plot.
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
lease=0
if [[ "${1:-}" == "--lease" ]]; then lease=1; shift; fi
out="${1:-bench/results}"
mkdir -p "$out"
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
stamp="$(date +%F)-$gpu"
padfree() { python3 -m padfree.cli "$@"; }  # no install needed: run from the checkout

if [[ $lease == 0 ]]; then
    echo "== padfree env"
    padfree env | tee "$out/env-$stamp.txt"
    echo "== gpu tests (a failure is recorded in the log and the benchmarks still run)"
    python3 -m pytest -m gpu -q tests 2>&1 | tee "$out/gpu-tests-$stamp.txt" || echo "GPU TESTS FAILED: see $out/gpu-tests-$stamp.txt"
    for suite in attention lora moe lora_mixture; do
        echo "== bench/test_$suite.py"
        python3 -m pytest "bench/test_$suite.py" -q --bench-size full --benchmark-json "$out/$suite-$stamp.json" \
            || echo "SUITE $suite FAILED"
    done
    for suite in attention lora moe; do
        echo "== bench/test_$suite.py with PADFREE_AUTOTUNE=1 (tiles timed per shape)"
        PADFREE_AUTOTUNE=1 python3 -m pytest "bench/test_$suite.py" -q --bench-size full -k padfree \
            --benchmark-json "$out/$suite-autotune-$stamp.json" || echo "SUITE $suite (autotune) FAILED"
    done
    echo "== attention: measured vs the static model's prediction (padfree.benchmark.predict)"
    python3 -m padfree.benchmark.predict "$out/attention-$stamp.json" | tee "$out/attention-predicted-$stamp.md" \
        || echo "PREDICTION FAILED"
    echo "== padfree bench (dense and MoE, the CUDA defaults)"
    padfree bench --device cuda --json "$out/e2e-$stamp.json" --plot "$out/e2e-$stamp.png" || echo "E2E DENSE FAILED"
    padfree bench --device cuda --moe --json "$out/e2e-moe-$stamp.json" || echo "E2E MOE FAILED"
    exit 0
fi

# --lease: a stage runs under `timeout`, never past the lease's end (LEASE_SECONDS, default 540)
start=$SECONDS
deadline=${LEASE_SECONDS:-540}
limited() {  # limited SECONDS CMD...: CMD under min(SECONDS, what is left of the lease)
    local left=$((deadline - (SECONDS - start) - 5))
    local limit=$(($1 < left ? $1 : left))
    shift
    if ((limit < 10)); then echo "SKIPPED (lease spent): $*"; return 0; fi
    timeout -k 5 "$limit" "$@" || echo "EXIT $? after $((SECONDS - start)) s (124: stage time limit): $*"
}
exec > >(tee "$out/log-$stamp.txt") 2>&1
export PADFREE_EXT_DIR=${PADFREE_EXT_DIR:-/tmp/padfree-ext} MAX_JOBS=${MAX_JOBS:-8} PYTHONUNBUFFERED=1
declare -A cases=(
    [attention]='test_attention\.py::'
    [lora]='test_lora\.py::.*-h4096-'
    [moe]='test_moe\.py::.*-T16384-(padfree|grouped_mm)-'
    [lora_mixture]='test_lora_mixture\.py::.*-fwd_bwd\]'
)
all_ids=$(python3 -m pytest bench --collect-only -q --bench-size full 2>/dev/null | grep '::')
ids() { grep -E "$1" <<<"$all_ids"; }
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 6" || true)  # serial when absent
echo "== padfree env (it builds padfree._C), the gpu tests and the JIT warm-up of every timed case, at once"
limited 240 python3 -m padfree.cli env >/tmp/env.txt 2>&1 &
env=$!
limited 240 python3 -m pytest -m gpu -q $xdist tests >"$out/gpu-tests-$stamp.txt" 2>&1 &
tests=$!
limited 240 python3 -m pytest -q $xdist --benchmark-disable --bench-size full \
    $(for suite in "${!cases[@]}"; do ids "${cases[$suite]}"; done) >/tmp/warm.txt 2>&1 &
warm=$!
limited 240 python3 -m padfree.cli bench --device cuda --quick --steps 1 --warmup 0 --no-progress >/tmp/warm-e2e.txt 2>&1 || true
wait $env $warm $tests || true  # the timed runs below have the GPU to themselves
cat /tmp/env.txt
tail -n 3 /tmp/warm.txt /tmp/warm-e2e.txt
echo "== gpu tests: $(tail -n 1 "$out/gpu-tests-$stamp.txt") ($((SECONDS - start)) s)"
for suite in attention lora moe lora_mixture; do
    echo "== bench/test_$suite.py, the lease's cases ($((SECONDS - start)) s)"
    # no ids would make pytest run its testpaths (the whole test suite) instead
    if [[ -z "$(ids "${cases[$suite]}")" ]]; then echo "NO CASES COLLECTED for $suite"; continue; fi
    limited 90 python3 -m pytest -q --bench-size full --benchmark-json "$out/$suite-$stamp.json" $(ids "${cases[$suite]}")
done
echo "== padfree bench --device cuda --quick ($((SECONDS - start)) s)"
limited 150 python3 -m padfree.cli bench --device cuda --quick --no-progress --json "$out/e2e-$stamp.json"
echo "== attention with PADFREE_AUTOTUNE=1: every candidate tile timed, the choices logged ($((SECONDS - start)) s)"
limited 150 env PADFREE_AUTOTUNE=1 python3 -m pytest -q --bench-size full -o log_cli=true --log-cli-level=INFO \
    --benchmark-json "$out/attention-autotune-$stamp.json" $(ids 'test_attention\.py::.*padfree_varlen')
echo "== ncu: the attention kernels of one padfree forward+backward at the suite's size ($((SECONDS - start)) s)"
if command -v ncu >/dev/null; then
    limited 120 ncu --clock-control none --target-processes all --kernel-name regex:'attention_(fwd|bwd)' \
        --launch-count 8 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats python3 -m pytest -q --bench-size full --benchmark-disable \
        "bench/test_attention.py::test_attention[forward_backward-padfree_varlen]"
else
    echo "ncu not found: no hardware counters"
fi
echo "== done ($((SECONDS - start)) s)"
sleep 1  # let tee write the log
