#!/usr/bin/env bash
# GPU check in one go (well under 8 minutes): what the machine has, the TensorRT / ONNX tests with their GPU
# cases live, CUDA bf16 recovery training, and the quick GPU speed-up benchmark. Meant for a copy of the repository on a GPU machine that may
# have no internet: it installs nothing but tries `pip install -e .[trt,dev]` once if tensorrt is missing (and
# says so if that fails; the GPU tests then skip with their reason).
#
# Usage: tools/gpu_check.sh [RESULTS_DIR]      (default: gpu_results/)
#   PYTHON=python3 (the interpreter to use), INSTALL=0 (never try pip; it is only tried where nvidia-smi works)
# Writes RESULTS_DIR/{env.txt,pytest.txt,bench_gpu.txt,summary.txt}; exits non-zero if the tests failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_results}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)

{
    echo "== nvidia-smi"
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
    echo "== python / packages"
    "$py" - <<'EOF' 2>&1
import importlib, sys
print(sys.version.split()[0], sys.executable)
for name in ("torch", "tensorrt", "onnx", "onnxruntime", "onnxscript", "transformers"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # report, don't stop
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
import torch
print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
try:
    import onnxruntime as ort
    print("onnxruntime providers:", ort.get_available_providers())
except Exception as exc:
    print("onnxruntime providers: -", exc)
EOF
} >"$out/env.txt"

if [[ "${INSTALL:-1}" == 1 ]] && nvidia-smi >/dev/null 2>&1 && ! "$py" -c "import tensorrt" >/dev/null 2>&1; then
    echo "== tensorrt missing: trying pip install -e .[trt,dev] (needs a package index or cache)" >>"$out/env.txt"
    if timeout 120 "$py" -m pip install -q --retries 0 --timeout 10 -e ".[trt,dev]" >>"$out/env.txt" 2>&1; then
        echo "pip install: ok" >>"$out/env.txt"
    else
        echo "pip install failed: TensorRT tests will skip (no tensorrt package)" >>"$out/env.txt"
    fi
fi
cat "$out/env.txt"

echo "== tests"
timeout 300 "$py" -m pytest -q -rs -p no:cacheprovider tests/test_tensorrt.py tests/test_onnx.py \
    tests/test_distill.py::test_bf16_recovery_on_cuda_lowers_perplexity_and_returns_the_model_to_the_cpu \
    2>&1 | tee "$out/pytest.txt"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark (GPU rows)"
remaining=$((450 - ($(date +%s) - start)))
if ((remaining > 60)); then
    timeout "$remaining" "$py" benchmarks/bench_speedup.py --gpu --runs 20 --variants dense,2:4,50% \
        --out "$out/bench_gpu.txt" 2>&1 | grep -v "torch.onnx\]\|torchvision" | tee "$out/bench_log.txt"
    bench_rc=${PIPESTATUS[0]}
else
    echo "skipped: too little time left" | tee "$out/bench_gpu.txt"
    bench_rc=124
fi

{
    echo "tests exit code: $tests_rc"
    echo "benchmark exit code: $bench_rc (124: timed out)"
    echo "total: $(($(date +%s) - start)) s"
    tail -n 1 "$out/pytest.txt"
} | tee "$out/summary.txt"
exit "$tests_rc"
