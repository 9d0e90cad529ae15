#!/usr/bin/env bash
# GPU check 3: the whole test suite on a CUDA machine (tests/test_cuda.py runs instead of
# skipping, and every test that leaves the device to "auto" meets the GPU), then the solver
# benchmark and the DEQ training step on CUDA. Writes logs and results under OUT (default
# benchmarks/results/gpu). Wheels in .whl/ (torchdeq, submitit, ruff: what the image lacks) are
# installed into /tmp/site first; the tests that run or read the notebook are left out (the image
# has no Jupyter). Every step runs even if an earlier one failed; the exit status is 1 if any
# step failed. STEPS picks steps (default suite,solvers,step).
#
#   bash benchmarks/gpu_suite.sh [OUT]
#   STEPS=suite bash benchmarks/gpu_suite.sh [OUT]
set -uo pipefail
out=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
steps=",${STEPS:-suite,solvers,step},"
failed=()
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site" \
        PATH="/tmp/site/bin:$PATH"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    echo "cpus $(nproc)"
} 2>&1 | tee "$out/gpu_env.txt" || failed+=("environment")

if [[ $steps == *,suite,* ]]; then
    echo "== the whole suite (12 workers, one file per worker at a time)"
    start=$SECONDS
    timeout 290 python3 -m pytest -p no:cacheprovider -o addopts="-q --doctest-modules" \
        -n 12 --dist loadfile --ignore tests/harness/test_notebook.py -k "not notebook" \
        --deselect tests/harness/test_figures_draw_the_results.py::test_extrapolation_title_reads_the_image_size_from_the_results_rows \
        -rfE > "$out/full_suite_gpu.log" 2>&1 || failed+=("test suite")
    echo "suite: $((SECONDS - start)) s" | tee -a "$out/full_suite_gpu.log"
    tail -25 "$out/full_suite_gpu.log"
fi
if [[ $steps == *,solvers,* ]]; then
    echo "== solver benchmark on CUDA"
    timeout 150 python3 -m benchmarks.solvers --device cuda --repeats 5 --out "$out" \
        --tag cuda > "$out/solvers_cuda.log" 2>&1 || failed+=("solver benchmark")
    grep -v -e '^USDT' -e 'profiler' "$out/solvers_cuda.log" | tail -20
fi
if [[ $steps == *,step,* ]]; then
    echo "== DEQ training step on CUDA"
    timeout 90 python3 -m benchmarks.step_time --device cuda --models deq_s \
        --batch-sizes 128,512 --variants base,amp --steps 10 --out "$out" \
        || failed+=("step time deq_s")
fi
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
