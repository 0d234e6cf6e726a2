#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md: ViT-S/16, 2x224 + 10x96 crops, bf16, batch 64 and 128.
# Usage: benchmarks/gpu_suite.sh OUTPUT_FOLDER   (about 6 minutes on one H100/H200)
set -euo pipefail
out=${1:-bench-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
common=(--preset imagenet_vit_small --set data.num_local_crops=10 --precision bf16)
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 benchmarks/throughput.py "${common[@]}" --batch 64 128 --modes model --flops --compile \
    --steps 20 --warmup 5 --json "$out/model.json" 2>&1 | grep -v -i warn | tee "$out/model.txt"
python3 benchmarks/throughput.py "${common[@]}" --batch 128 --modes e2e --data jpeg --images 2000 \
    --workers 14 --steps 30 --warmup 10 --json "$out/e2e.json" 2>&1 | grep -v -i warn \
    | tee "$out/e2e.txt"
python3 benchmarks/throughput.py "${common[@]}" --batch 128 --modes model --switches --no-peer \
    --flops --steps 20 --warmup 5 --json "$out/switches.json" 2>&1 | grep -v -i warn \
    | tee "$out/switches.txt"
