#!/usr/bin/env bash
# One-shot GPU check for a lent GPU machine (docs/benchmarks.md): Ray + jobs.train with use_gpu and bf16,
# and the GPU unit tests. Prepare with `../shared/tools/gpu-bundle pydantic`, then run with .gpu
# carried. Writes run.json and logs to $OUT.
set -uo pipefail
source .gpu/activate
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, ray, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ray', ray.__version__)" | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
timeout 300 python -m jobs.train +experiment=adult_mlp scaling=gpu train.precision=bf16 \
  train.epochs=5 tracking=none ray.include_dashboard=false ray.num_cpus=8 \
  storage.uri=/tmp/gpu_store 2>&1 | grep -v "^\s*$" | tail -25 | tee "$OUT/train.log"
echo "jobs.train exit ${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/train.log"
cp /tmp/gpu_store/runs/*/run.json "$OUT/run.json" 2>/dev/null
timeout 120 python -m pytest -q -p no:cacheprovider tests/unit/test_gpt.py 2>&1 | tail -3 | tee "$OUT/pytest.log"
