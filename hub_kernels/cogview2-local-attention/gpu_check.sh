#!/usr/bin/env bash
# One-shot GPU check for a machine with an NVIDIA GPU, a CUDA build of torch and nvcc:
#   1. build the CUDA variant of this kernel with build_local.py (serves CPU and CUDA tensors),
#   2. run the local-attention tests, GPU-marked and slow ones included, against that build,
#   3. run the side-by-side benchmark at the real shape (bf16, 48 heads), forward and forward+backward.
# Usage (repository root):  bash hub_kernels/cogview2-local-attention/gpu_check.sh [output dir]
# Logs go to the output dir (default: $OUT or ./gpu_check_out).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KERNEL_DIR="$ROOT/hub_kernels/cogview2-local-attention"
OUT_DIR="${1:-${OUT:-$ROOT/gpu_check_out}}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$PYTHON" -c \
  'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } 2>&1 | tee "$OUT_DIR/env.txt"

start=$(date +%s)
"$PYTHON" "$KERNEL_DIR/build_local.py" --backend cuda 2>&1 | tee "$OUT_DIR/build.log"
echo "build seconds: $(( $(date +%s) - start ))" | tee -a "$OUT_DIR/build.log"
export COGLM_LOCAL_ATTENTION_KERNEL_PATH="$KERNEL_DIR"

"$PYTHON" -m pytest -q -rs "$ROOT/tests/test_local_attention.py" "$ROOT/tests/test_local_attention_kernel.py" \
  2>&1 | tee "$OUT_DIR/tests.log" || true

"$PYTHON" "$ROOT/benchmarks/bench_local_attention.py" --device cuda --dtype bfloat16 --heads 48 \
  --kernel-path "$KERNEL_DIR" 2>&1 | tee "$OUT_DIR/bench_forward.txt" || true
"$PYTHON" "$ROOT/benchmarks/bench_local_attention.py" --device cuda --dtype bfloat16 --heads 48 --backward \
  --kernel-path "$KERNEL_DIR" 2>&1 | tee "$OUT_DIR/bench_backward.txt" || true
