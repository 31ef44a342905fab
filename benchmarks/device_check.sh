#!/usr/bin/env bash
# One device check for a lent GPU machine (one NVIDIA GPU, python3 with torch + triton + transformers, nvcc, ninja,
# no network), in at most ~8 minutes, every result in a file under OUTDIR:
#   summary.md               what ran, how long, what was skipped and why
#   env.txt                  GPU, versions, the carried wheels installed
#   build.log                Triton kernel build output + CUDA kernel build (nvcc), run in the background
#   tests.log                GPU-marked tests + the kernel and Triton test files against those builds
#   bench_device.md          full-width 6B stage 1 (dynamic vs static+compile), one DSR / LoPAR pass, offload peak
#   bench_local_attention.md real DSR shape (bf16, 48 heads, batch 4): dense, SDPA, Flex, Triton, CUDA; fwd and fwd+bwd
#
# Usage (repository root):   bash benchmarks/device_check.sh OUTDIR            # on the GPU machine
#                            bash benchmarks/device_check.sh OUTDIR --dry-run  # on a CPU: GPU steps skipped
# Missing packages travel as wheels in .whl/ (git-ignored; see docs/kernels.md for the download command) and are
# installed with pip --no-index into a private folder put first on PYTHONPATH; the project runs from src/.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:?usage: device_check.sh OUTDIR [--dry-run]}"
DRY=0
[[ "${2:-}" == "--dry-run" ]] && DRY=1
PYTHON="${PYTHON:-python3}"
BUDGET_S="${DEVICE_CHECK_BUDGET_S:-470}"  # the whole script, with a margin under 8 minutes
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
SUMMARY="$OUT_DIR/summary.md"
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
skip() { note "- SKIPPED $1: $2"; }
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
# step NAME LIMIT_S LOG CMD...: run CMD with at most min(LIMIT_S, time left) seconds, output appended to LOG.
step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local remaining
  remaining=$(left)
  ((remaining < limit)) && limit=$remaining
  if ((limit < 10)); then
    skip "$name" "out of time (${BUDGET_S}s budget)"
    return 1
  fi
  local t0 rc
  t0=$(date +%s)
  echo "### $name" >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  note "- $name: rc=$rc ($(($(date +%s) - t0)) s$( ((rc == 124)) && echo ", stopped at its ${limit}s limit"))"
  return $rc
}

note "# device check $(date -u +%FT%TZ) $( ((DRY)) && echo '(dry run: CPU, GPU steps skipped)')"

# --- environment and carried wheels -------------------------------------------------------------------------------
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda",
torch.version.cuda, "gpu", torch.cuda.is_available())'
  command -v nvcc >/dev/null && nvcc --version | tail -1
} >"$OUT_DIR/env.txt" 2>&1
SITE="$WORK/site"
shopt -s nullglob
wheels=("$ROOT"/.whl/*.whl)
if ((${#wheels[@]})); then
  step "install ${#wheels[@]} carried wheels" 60 "$OUT_DIR/env.txt" \
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  skip "install carried wheels" "no .whl/*.whl in the tree (nothing to install; the environment must hold them)"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
step "import the project from the tree" 60 "$OUT_DIR/env.txt" "$PYTHON" -c '
import coglm_hf, diffusers, kernels, transformers, torch
print("coglm_hf", coglm_hf.__file__)
print("diffusers", diffusers.__version__, "kernels", kernels.__version__, "transformers", transformers.__version__)' ||
  note "- (the steps below need these imports)"

# --- kernel builds: Triton (pure Python, instant) now; CUDA (nvcc) in the background while the GPU works ---------
TRITON_DIR="$WORK/triton-kernel"
CUDA_DIR="$WORK/cuda-kernel"
step "build the Triton kernel (noarch variants)" 60 "$OUT_DIR/build.log" \
  "$PYTHON" "$ROOT/hub_kernels/cogview2-local-attention-triton/build_local.py" --out "$TRITON_DIR/build"
export COGLM_LOCAL_ATTENTION_TRITON_KERNEL_PATH="$TRITON_DIR"
CUDA_BUILD_PID=""
if ((DRY)); then
  skip "build the CUDA kernel" "dry run (needs nvcc and a CUDA build of torch)"
else
  TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export TORCH_CUDA_ARCH_LIST MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  (
    t0=$(date +%s)
    timeout 300 "$PYTHON" "$ROOT/hub_kernels/cogview2-local-attention/build_local.py" --backend cuda \
      --out "$CUDA_DIR/build" >"$WORK/cuda_build.log" 2>&1
    echo "rc=$? seconds=$(($(date +%s) - t0))" >>"$WORK/cuda_build.log"
  ) &
  CUDA_BUILD_PID=$!
fi

# Order = priority: a step that would overrun the budget is skipped (and says so), so the last ones may not run.
# --- 6B stage 1 (overlaps the CUDA build) ------------------------------------------------------------------------
BENCH="$OUT_DIR/bench_device.md"
if ((DRY)); then
  step "bench_device (tiny models, CPU)" 120 "$BENCH" "$PYTHON" "$ROOT/benchmarks/bench_device.py" --dry-run \
    --part stage1 pipeline offload
else
  step "6B stage 1: 400 tokens x batch 8, dynamic vs static+compile" 120 "$BENCH" \
    "$PYTHON" "$ROOT/benchmarks/bench_device.py" --part stage1
fi

# --- CUDA kernel build result ----------------------------------------------------------------------------------------
if [[ -n "$CUDA_BUILD_PID" ]]; then
  wait "$CUDA_BUILD_PID"
  cat "$WORK/cuda_build.log" >>"$OUT_DIR/build.log"
  note "- build the CUDA kernel (nvcc, background): $(tail -1 "$WORK/cuda_build.log")"
  if [[ -d "$CUDA_DIR/build" ]]; then
    export COGLM_LOCAL_ATTENTION_KERNEL_PATH="$CUDA_DIR"
  fi
fi

# --- tests -------------------------------------------------------------------------------------------------------------
TESTS="$OUT_DIR/tests.log"
if ((DRY)); then
  step "collect the GPU-marked tests" 120 "$TESTS" "$PYTHON" -m pytest -q --co -m gpu -p no:cacheprovider "$ROOT/tests"
  skip "run the GPU-marked tests" "dry run (no GPU)"
else
  step "GPU-marked tests" 90 "$TESTS" "$PYTHON" -m pytest -q -rs -m gpu -p no:cacheprovider "$ROOT/tests"
  step "kernel + Triton test files on CUDA" 70 "$TESTS" "$PYTHON" -m pytest -q -rs -m "not gpu" -p no:cacheprovider \
    "$ROOT/tests/test_local_attention_kernel.py" "$ROOT/tests/test_local_attention_triton.py"
fi

# --- local-attention benchmark at the real DSR shape, then the full-width pipeline -----------------------------------
LA="$OUT_DIR/bench_local_attention.md"
kernel_args=()
[[ -n "${COGLM_LOCAL_ATTENTION_KERNEL_PATH:-}" ]] && kernel_args=(--kernel-path "$COGLM_LOCAL_ATTENTION_KERNEL_PATH")
LA_BENCH=("$PYTHON" "$ROOT/benchmarks/bench_local_attention.py" --device cuda --dtype bfloat16 --heads 48 --batch 4
  "${kernel_args[@]}" --triton-path "$TRITON_DIR")
if ((DRY)); then
  skip "local-attention benchmark" "dry run (the CPU figures come from the same script, see docs/benchmarks.md)"
else
  step "local attention forward (bf16, 48 heads, batch 4)" 70 "$LA" "${LA_BENCH[@]}"
  step "full-width pipeline: one image (DSR and LoPAR passes)" 60 "$BENCH" \
    "$PYTHON" "$ROOT/benchmarks/bench_device.py" --part pipeline
  step "full-width pipeline with model offload: peak memory" 60 "$BENCH" \
    "$PYTHON" "$ROOT/benchmarks/bench_device.py" --part offload
  step "local attention forward+backward" 70 "$LA" "${LA_BENCH[@]}" --backward
fi

note "- total: $(($(date +%s) - START)) s"
