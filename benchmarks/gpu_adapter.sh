#!/usr/bin/env bash
# MTL-LoRA adapter speed on one GPU: training step vs PEFT LoRA and the reference approach, scoring
# merged vs unmerged, eager and torch.compile (each transformer block). A random-init 0.5B LLaMA-shaped
# model, bf16, batch 128 x 128 tokens, 8 tasks, r=8 on q,k,v,o.
#
#     bash benchmarks/gpu_adapter.sh          # from the repository root; OUT=dir also writes dir/adapter_gpu.txt
#
# Needs python3 with torch (CUDA), transformers, peft and pyyaml; installs nothing (the repository is put
# on PYTHONPATH). Budget: about 8 minutes; compiled cases that would start after --time-budget seconds
# are skipped, and each case fails on its own without losing the others' figures.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log=/dev/null
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && log="$OUT/adapter_gpu.txt"; fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name(0))"
  timeout 470 python3 benchmarks/adapter_speed.py --device cuda --dtype bf16 --preset llama-0.5b \
    --batch 128 --seq 128 --tasks 8 --rank 8 --iters 20 --warmup 3 --paths fused --profile peft_lora,mtl_lora \
    --compile --compile-cases mtl_lora,peft_lora,reference,unmerged,merged --time-budget 300
  echo "exit status $?"
} 2>&1 | tee "$log"
