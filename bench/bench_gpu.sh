#!/usr/bin/env bash
# The GPU training benchmark in one command (bench/README.md, "Training on a GPU"):
#
#   bash bench/bench_gpu.sh [OUT_PREFIX]        # default OUT_PREFIX: bench/results/training_gpu
#
# Needs a CUDA GPU and the package installed (`pip install -e .` or the conda env); runs from anywhere. It
# records the device and the versions, then, with bf16 autocast and channels_last, Conv4 and ResNet-12 at
# 84x84: model-only img/s and trainer img/s for the per-image path (the input pipeline before issue 18:
# torchvision v2 in 8 loader workers, as config/paper.yaml), the batched path with the base split kept in
# device memory, and the batched path streaming batches from the memory map (pinned copies); and from those,
# one epoch and one whole training of each paper cell. A second pass times torch.compile on the batched path.
# Writes OUT_PREFIX.json, OUT_PREFIX_compile.json and OUT_PREFIX.log; about 10-15 minutes on a current GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:-bench/results/training_gpu}"
mkdir -p "$(dirname "$prefix")"
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    uptime
    python bench/bench_training.py --device cuda --amp bf16 --threads 4 --workers 8 --epochs 2 \
        --settings conv4_84 resnet12_84 --paths per-image batched batched-streamed \
        --images conv4_84=25600 resnet12_84=12800 --model-iterations conv4_84=200 resnet12_84=100 \
        --project --out "$prefix.json"
    python bench/bench_training.py --device cuda --amp bf16 --threads 4 --workers 8 --epochs 2 --compile \
        --settings conv4_84 resnet12_84 --paths batched \
        --images conv4_84=25600 resnet12_84=12800 --model-iterations conv4_84=200 resnet12_84=100 \
        --out "${prefix}_compile.json"
} 2>&1 | tee "$prefix.log"
