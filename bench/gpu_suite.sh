#!/usr/bin/env bash
# The whole GPU suite on a lent machine, in stages that each fit the device tool's 10-minute limit:
#
#   bench/gpu_suite.sh install      pip install -e . (no deps: the machine's own torch/triton/transformers)
#   bench/gpu_suite.sh arch         the GPU's architecture (sm_80, sm_89, sm_90a, sm_100a, sm_120, gfx942, ...) and
#                                   the kernels' configuration table it runs
#   bench/gpu_suite.sh compile      bench/compile_report.py --arch <this GPU's arch>: every kernel x config x feature
#                                   set (registers, spills, warnings, tensor-core instructions, inner-loop length)
#   bench/gpu_suite.sh tests        CUDA test suite (real kernel compilation, bf16 at realistic sizes)
#   bench/gpu_suite.sh attention    bench/attention.py: GIM kernel vs SDPA flash vs eager, S = 1k…32k
#   bench/gpu_suite.sh explain      bench/explain.py: Llama-3.1-8B config, bf16, up to 128k tokens + longest
#   bench/gpu_suite.sh explain-more bench/explain.py: Qwen2.5-7B and Gemma-2-9B configs
#   bench/gpu_suite.sh throughput   bench/throughput.py --gpu: dataset jobs, 512-token prompts
#   bench/gpu_suite.sh answers      bench/answers.py --gpu: explain_answer, Llama-3.1-8B config, 8k prompt + 64 tokens
#   bench/gpu_suite.sh multi        several GPUs (needs >= 2): models spread over GPUs, over a GPU and CPU memory or
#                                   disk (accelerate device maps) against one GPU, and torchrun dataset jobs whose
#                                   processes each spread their model over their own GPUs; then Llama-3.1-8B (bf16)
#                                   spread over every GPU with device_map="auto", explain of 8k tokens
#   bench/gpu_suite.sh all          every stage in turn (about 20 minutes on an H100; multi only with >= 2 GPUs)
#
# Works on any NVIDIA or AMD GPU the kernels have a table for (kernels/archs.py); every stage starts by printing
# the architecture it runs on. Results go to $OUT (the device tool's fetch folder) or bench/results/gpu-<date>/;
# commit them under bench/results/. Each file carries the device, versions and date.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-$(date -u +%Y%m%d)}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

# The GPU's architecture as the kernels name it (kernels/archs.py), its name, and the configuration table it runs.
ARCH_PY='import torch
from gim_fast.kernels.archs import ARCHS, device_arch
from gim_fast.kernels.attention import config_table
if not torch.cuda.is_available():
    print("none - no GPU visible to torch"); raise SystemExit
arch = device_arch(0)
known = "screened by bench/compile_report.py" if arch in ARCHS else "no compile report for it"
print(f"{arch} {torch.cuda.get_device_name(0)!r}, configuration table {config_table(arch)} ({known})")'
ARCH_LINE=$($PY -c "$ARCH_PY" 2>/dev/null || echo "unknown (gim_fast or torch not importable yet)")
ARCH=${ARCH_LINE%% *}

stage() {
  echo "== $1 on $ARCH_LINE"
  case "$1" in
    install)
      $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail "$OUT/install.log"; return 1; }
      ARCH_LINE=$($PY -c "$ARCH_PY" 2>&1 | tail -1); ARCH=${ARCH_LINE%% *}
      { nvidia-smi 2>/dev/null || rocm-smi 2>/dev/null; echo "arch: $ARCH_LINE"
        $PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"; } > "$OUT/machine.txt" 2>&1
      cat "$OUT/machine.txt" ;;
    arch)
      echo "$ARCH_LINE" | tee "$OUT/arch.txt" ;;
    compile)
      if $PY -c "import sys; from gim_fast.kernels.archs import ARCHS; sys.exit('$ARCH' not in ARCHS)" 2>/dev/null; then
        timeout 560 $PY bench/compile_report.py --arch "$ARCH" --jobs 8 --out "$OUT" 2>&1 | tee "$OUT/compile_report.log" | tail -12
      else
        echo "compile: bench/compile_report.py has no target '$ARCH'; compiling for the table it runs instead"
        timeout 560 $PY bench/compile_report.py --arch "$($PY -c "from gim_fast.kernels.attention import config_table; print(config_table('$ARCH'))")" \
          --jobs 8 --out "$OUT" 2>&1 | tee "$OUT/compile_report.log" | tail -12
      fi ;;
    tests)
      timeout 560 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_triton_attention.py tests/kernels/test_triton_norm.py \
        tests/kernels/test_triton_fallback.py tests/ops/test_ops.py tests/integration/test_model_gim.py \
        tests/integration/test_engine.py tests/api/test_answers.py tests/ops/test_cotangents.py 2>&1 | tee "$OUT/pytest_cuda.txt" | tail -25 ;;
    attention)
      timeout 560 $PY bench/attention.py --seqlens 1024 2048 4096 8192 16384 32768 --head-dims 64 128 \
        --out "$OUT" 2>&1 | tee "$OUT/attention.log" | tail -40 ;;
    explain)
      providers="gim-triton gim-torch plain gim-eager"
      $PY -c "import gim" 2>/dev/null && providers="$providers gim-explain"
      timeout 560 $PY bench/explain.py --config llama-3.1-8b --seqlens 1024 2048 4096 8192 --repeats 3 \
        --providers $providers --longest --longest-limit 131072 --max-seconds 120 --out "$OUT" 2>&1 \
        | tee "$OUT/explain_llama.log" | tail -40 ;;
    explain-more)
      for cfg in qwen2.5-7b gemma-2-9b; do
        timeout 270 $PY bench/explain.py --config "$cfg" --seqlens 2048 8192 --repeats 2 \
          --providers gim-triton plain gim-eager --out "$OUT" 2>&1 | tee "$OUT/explain_$cfg.log" | tail -15
      done ;;
    throughput)
      timeout 560 $PY bench/throughput.py --gpu --out "$OUT" 2>&1 | tee "$OUT/throughput.log" | tail -20 ;;
    answers)
      timeout 560 $PY bench/answers.py --gpu --out "$OUT" 2>&1 | tee "$OUT/answers.log" | tail -20 ;;
    multi)
      gpus=$($PY -c "import torch; print(torch.cuda.device_count())")
      if [ "$gpus" -lt 2 ]; then echo "multi: needs at least 2 GPUs, this machine has $gpus" | tee "$OUT/multi.log"; return 0; fi
      timeout 400 $PY -m pytest -q -p no:cacheprovider tests/integration/test_multi_gpu.py tests/integration/test_offload.py \
        tests/cli/test_cli_attribute.py -k "gpu or offload or torchrun" 2>&1 | tee "$OUT/pytest_multi.txt" | tail -25
      timeout 150 $PY bench/offload.py --multi-gpu --out "$OUT" 2>&1 | tee "$OUT/multi_gpu.log" | tail -20 ;;
    all)
      for s in install compile tests attention explain explain-more throughput answers multi; do stage "$s"; done ;;
    *)
      echo "usage: $0 install|arch|compile|tests|attention|explain|explain-more|throughput|answers|multi|all" >&2; return 2 ;;
  esac
}

stage "${1:-all}"
