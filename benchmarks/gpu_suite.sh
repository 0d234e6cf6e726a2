#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md: ViT-S/16, 2x224 + 10x96 crops, bf16.
# Usage: benchmarks/gpu_suite.sh OUTPUT_FOLDER [tables|levers|scale]
#   tables  the recorded tables: model only at batch 64 and 128, end to end, the switches and
#           torch.compile (about 6 minutes on one H100)
#   levers  the CUDA tests first, then the open levers of issue 6 side by side: prefetched
#           views and GPU JPEG decoding end to end with host syncs counted, and the compiled
#           step end to end with a profile (about 7 minutes)
#   scale   the augmentation's cost (against $AUGMENT_BEFORE when set), the data pipeline with
#           GPU decoding, CUDA graphs (torch.compile's reduce-overhead), and ViT-B/16's MFU
#           (about 5 minutes)
# Each part fits the device tool's 10 minutes per command; run levers first.
set -uo pipefail
out=${1:-bench-out}
part=${2:-tables}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
common=(--preset imagenet_vit_small --set data.num_local_crops=10 --precision bf16)
bench() { python3 benchmarks/throughput.py "${common[@]}" "$@" 2>&1 | grep -v -i warn; }
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
if [ "$part" = levers ]; then  # most telling first: a session may run out of time
    python3 -m pytest -q -p no:warnings tests/test_cuda.py 2>&1 | tail -5 | tee "$out/cuda_tests.txt"
    jpeg=(--batch 128 --no-peer --data jpeg --images 2000 --jpeg-dir /tmp/dinolab-jpeg
          --workers 14 --steps 30 --warmup 10)
    bench "${jpeg[@]}" --modes e2e --sync-debug \
        --augmentation batched,batched+prefetch,batched+decode,batched+prefetch+decode \
        --json "$out/e2e_levers.json" | tee "$out/e2e_levers.txt"
    bench "${jpeg[@]}" --modes model,e2e --compile --flops --profile 3 \
        --augmentation batched,batched+prefetch+decode \
        --json "$out/e2e_compiled.json" | tee "$out/e2e_compiled.txt"
    exit 0
fi
if [ "$part" = scale ]; then
    # AUGMENT_BEFORE: an older batched_augment.py to compare with (git show REV:path > file)
    python3 benchmarks/augmentation_ops.py --device cuda --repeat 20 --all-rows \
        ${AUGMENT_BEFORE:+--compare-with "$AUGMENT_BEFORE"} 2>&1 | grep -v -i warn \
        | tee "$out/augmentation_ops.txt"
    bench --batch 128 --modes data --data jpeg --images 2000 --jpeg-dir /tmp/dinolab-jpeg \
        --workers 14 --steps 20 --warmup 5 --augmentation batched,batched+decode \
        --json "$out/data.json" | tee "$out/data.txt"
    bench --batch 128 --modes model --compile --compile-modes default,reduce-overhead --no-peer \
        --flops --steps 20 --warmup 5 --json "$out/cuda_graphs.json" | tee "$out/cuda_graphs.txt"
    bench --set model.backbone=vit_base_patch16_224 --batch 128 --modes model --compile \
        --no-peer --flops --steps 20 --warmup 5 --json "$out/vit_base.json" \
        | tee "$out/vit_base.txt"
    exit 0
fi
bench --batch 64 128 --modes model --flops --steps 20 --warmup 5 --json "$out/model.json" \
    | tee "$out/model.txt"
bench --batch 128 --modes e2e --data jpeg --images 2000 --workers 14 --steps 30 --warmup 10 \
    --json "$out/e2e.json" | tee "$out/e2e.txt"
bench --batch 128 --modes model --switches --no-peer --flops --steps 20 --warmup 5 \
    --json "$out/switches.json" | tee "$out/switches.txt"
bench --batch 128 --modes model --compile --no-peer --flops --steps 20 --warmup 5 \
    --json "$out/compile.json" | tee "$out/compile.txt"
