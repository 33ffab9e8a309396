#!/usr/bin/env bash
# One command for a GPU machine: the gpu tests, every pytest-benchmark suite at full size, and the
# end-to-end `padfree bench`, each result written as JSON under bench/results/ (or $1) with the
# GPU name and date in the file name. Results are committed as they come out; never edit them.
#   bench/gpu.sh                 # everything (about 20-30 minutes on an H100)
#   bench/gpu.sh /tmp/results    # somewhere else
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
out="${1:-bench/results}"
mkdir -p "$out"
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
stamp="$(date +%F)-$gpu"

echo "== padfree env"
padfree env | tee "$out/env-$stamp.txt"
echo "== gpu tests (a failure is recorded in the log and the benchmarks still run)"
python -m pytest -m gpu -q tests 2>&1 | tee "$out/gpu-tests-$stamp.txt" || echo "GPU TESTS FAILED: see $out/gpu-tests-$stamp.txt"
for suite in attention lora moe; do
    echo "== bench/test_$suite.py"
    python -m pytest "bench/test_$suite.py" -q --bench-size full --benchmark-json "$out/$suite-$stamp.json" \
        || echo "SUITE $suite FAILED"
done
for suite in attention lora moe; do
    echo "== bench/test_$suite.py with PADFREE_AUTOTUNE=1 (tiles timed per shape)"
    PADFREE_AUTOTUNE=1 python -m pytest "bench/test_$suite.py" -q --bench-size full -k padfree \
        --benchmark-json "$out/$suite-autotune-$stamp.json" || echo "SUITE $suite (autotune) FAILED"
done
echo "== attention: measured vs the static model's prediction (padfree.benchmark.predict)"
python -m padfree.benchmark.predict "$out/attention-$stamp.json" | tee "$out/attention-predicted-$stamp.md" \
    || echo "PREDICTION FAILED"
echo "== padfree bench (dense and MoE, the CUDA defaults)"
padfree bench --device cuda --json "$out/e2e-$stamp.json" --plot "$out/e2e-$stamp.png" || echo "E2E DENSE FAILED"
padfree bench --device cuda --moe --json "$out/e2e-moe-$stamp.json" || echo "E2E MOE FAILED"
