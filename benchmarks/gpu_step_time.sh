#!/usr/bin/env bash
# GPU check 2: the CUDA tests and where a training step's time goes (benchmarks.step_time).
#   bash benchmarks/gpu_step_time.sh [OUT]
set -uo pipefail
out=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()
timeout 120 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider -o addopts="" \
    > "$out/test_cuda.log" 2>&1 || failed+=("CUDA tests")
tail -3 "$out/test_cuda.log"
timeout 200 python3 -m benchmarks.step_time --device cuda --models wt_s --batch-sizes 128,512 \
    --variants base,channels_last,amp,compile,compile_graphs --out "$out" \
    || failed+=("step time wt_s")
timeout 120 python3 -m benchmarks.step_time --device cuda --models deq_s --batch-sizes 128,512 \
    --variants base,channels_last,amp --steps 10 --out "$out" || failed+=("step time deq_s")
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
