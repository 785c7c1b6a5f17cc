#!/usr/bin/env bash
# The GPU measurements still owed (see the last closing note and benchmarks/RESULTS.md),
# batched for two device calls of at most 10 minutes each, the more important first (a
# machine is handed back 30 s after a call, and the next start may be refused):
#   bash benchmarks/device_run.sh first    whole training steps: the trainer and the plain
#                                          baseline in bf16 (eager, compile), then the
#                                          transformers model (plain, wrap, wrap with CUDA
#                                          graphs, wrap with compile_experts); the gpu-1b
#                                          layer with compile_experts against the plain
#                                          grouped_mm module (eager and compiled)
#   bash benchmarks/device_run.sh second   GPU tests of the layer and inference, the
#                                          gpu-1b layer's trace, fine256 / olmoe layers
# Each command runs under its own timeout; its output and "rc=... t=..." go to
# $OUT/<name>.log (OUT defaults to ./.device_out, ignored by git).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
out=${OUT:-.device_out}
mkdir -p "$out"
run() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "rc=$? t=$((SECONDS - start))" >> "$out/$name.log"
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" > "$out/versions.txt" 2>&1
case "${1:-}" in
    first)
        run train_ab 230 python -m benchmarks.train_step --parts a,b --precisions bf16 \
            --modes eager,compile --warmup 3 --steps 6
        run train_c 240 python -m benchmarks.train_step --parts c --warmup 2 --steps 5
        run layer_gpu1b 95 python -m benchmarks.layer --shapes gpu1b --ffn swiglu \
            --kernels default,grouped_mm,scatter --peers grouped_mm,grouped_mm_compiled \
            --master fp32 --compile-experts ;;
    second)
        run gpu_tests 290 python -m pytest -q -p no:cacheprovider -m gpu -n 4 \
            --timeout 280 tests/test_gpu_layer.py tests/test_gpu_inference.py
        run trace_gpu1b 50 python -m benchmarks.trace_layer --shape gpu1b --ffn swiglu \
            --master fp32 --kernel grouped_mm --compile-experts --sort cpu --steps 5 --rows 30
        run layer_fine 150 python -m benchmarks.layer --shapes fine256,olmoe \
            --ffn swiglu,gelu --kernels default,grouped_mm --compile-experts ;;
    *)
        echo "usage: bash benchmarks/device_run.sh first|second" >&2
        exit 2 ;;
esac
