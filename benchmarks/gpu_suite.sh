#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md: ViT-S/16, 2x224 + 10x96 crops, bf16, batch 64 and 128.
# Usage: benchmarks/gpu_suite.sh OUTPUT_FOLDER   (about 6 minutes on one H100/H200)
set -uo pipefail
out=${1:-bench-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
common=(--preset imagenet_vit_small --set data.num_local_crops=10 --precision bf16)
bench() { python3 benchmarks/throughput.py "${common[@]}" "$@" 2>&1 | grep -v -i warn; }
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
bench --batch 64 128 --modes model --flops --steps 20 --warmup 5 --json "$out/model.json" \
    | tee "$out/model.txt"
bench --batch 128 --modes e2e --data jpeg --images 2000 --workers 14 --steps 30 --warmup 10 \
    --json "$out/e2e.json" | tee "$out/e2e.txt"
bench --batch 128 --modes model --switches --no-peer --flops --steps 20 --warmup 5 \
    --json "$out/switches.json" | tee "$out/switches.txt"
bench --batch 128 --modes model --compile --no-peer --flops --steps 20 --warmup 5 \
    --json "$out/compile.json" | tee "$out/compile.txt"
