#!/usr/bin/env bash
# Issue 20's GPU check as one prepared run (about 8 minutes on an H100/H200), for `device`'s `run`:
#   run(command="bash bench/gpu_check.sh", timeout_s=590)
# The GPU machine has torch with CUDA; it lacks this project's other packages, so they travel as
# wheels in .whl (see /work/.library/device/README.md) and are installed to /tmp/site first.
# Writes every log and JSON under $OUT (or bench/results without it).
set -uo pipefail
out="${OUT:-bench/results}"
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)|Flags" >> "$out/gpu.txt"
common=(--bge-m3-shape --device cuda --rounds 2)
# 1: one process, in-process reference, sentence-transformers fp16, the profiler summary
timeout 260 $py -m bench.overhead "${common[@]}" --texts 2000 --profile --out "$out/gpu-w1.json" 2>&1 | tee "$out/gpu-w1.log"
# 2: four HTTP workers in front of one engine
timeout 150 $py -m bench.overhead "${common[@]}" --texts 1000 --workers 4 --no-sentence-transformers \
    --out "$out/gpu-w4.json" 2>&1 | tee "$out/gpu-w4.log"
# 3: two engines sharing the one GPU (Arctic's replicas), one worker
timeout 150 $py -m bench.overhead "${common[@]}" --texts 1000 --devices cuda:0,cuda:0 --no-sentence-transformers \
    --out "$out/gpu-2engines.json" 2>&1 | tee "$out/gpu-2engines.log"
