#!/usr/bin/env bash
# One prepared GPU session: the CUDA tests, the solver benchmark on CUDA and the training
# throughput variants (bf16 autocast, channels_last, torch.compile). Writes logs and results
# under OUT (default benchmarks/results/gpu). Needs torch with CUDA and torchdeq importable
# (a wheel directory .whl/ is installed into /tmp/site first when present). Every step runs
# even if an earlier one failed; the exit status is 1 if any step failed.
#
#   bash benchmarks/gpu_check.sh [OUT]
set -uo pipefail
out=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/gpu_env.txt" || failed+=("environment")

echo "== CUDA tests"
timeout 150 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider -o addopts="" \
    > "$out/test_cuda.log" 2>&1 || failed+=("CUDA tests")
tail -15 "$out/test_cuda.log"

echo "== solver benchmark on CUDA"
timeout 150 python3 -m benchmarks.solvers --device cuda --repeats 5 --out "$out" \
    --tag cuda > "$out/solvers_cuda.log" 2>&1 || failed+=("solver benchmark")
grep -v -e '^USDT' -e 'profiler' "$out/solvers_cuda.log" | tail -20

echo "== training throughput on CUDA"
timeout 200 python3 -m benchmarks.train_speed --device cuda --image-size 32 --batch-size 128 \
    --train-size 4096 --repeats 2 --out "$out" 2>&1 | tail -20 || failed+=("training throughput")
ls -la "$out"
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
