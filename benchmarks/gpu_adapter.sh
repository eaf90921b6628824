#!/usr/bin/env bash
# MTL-LoRA adapter speed on one GPU, one command, under 8 minutes. A random-init 0.5B LLaMA-shaped model,
# bf16, batch 128 x 128 tokens, 8 tasks, r=8 on q,k,v,o. It reports, in this order:
#   1. the host-side proxies on the GPU itself: aten operations per step / optimizer step / scoring forward,
#      MTL-LoRA next to PEFT LoRA (benchmarks/adapter_ops.py)
#   2. eager training step vs PEFT LoRA, the speed-up over the reference approach, unmerged vs merged
#      scoring, tokens/s and MFU of each training case, a profile of one step (host vs device time)
#   3. the same compiled (torch.compile, fullgraph, each transformer block: compiles in seconds)
#   4. the DeepSpeed ZeRO-2 engine's overhead over a plain torch loop, with tokens/s and MFU
#      (benchmarks/train_speed.py; skipped with a message when deepspeed is not importable)
#
#     bash benchmarks/gpu_adapter.sh          # from anywhere; OUT=dir also writes dir/adapter_gpu.txt
#
# Scoring on the GPU has its own command (about 2 minutes; needs pyarrow besides the above):
#     python3 benchmarks/gpu_score.py --device cuda --preset minilm --rows 65536 --batch 256
#     COMPILE_SCOPE=model bash benchmarks/gpu_adapter.sh   # compile the whole model instead (slow to compile)
#     COMPILE_MODE=reduce-overhead bash benchmarks/gpu_adapter.sh   # CUDA graphs (static shapes, no breaks)
#
# Needs python3 with torch (CUDA), transformers, peft and pyyaml; deepspeed (a wheel on PYTHONPATH is fine)
# for part 4 only. Installs nothing; the repository is put in front of PYTHONPATH. Each part runs under its
# own timeout, compiled cases that would start after --time-budget seconds are skipped, and each case fails
# on its own without losing the others' figures.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export DS_ACCELERATOR=cuda  # benchmarks/train_speed.py defaults DeepSpeed to its CPU accelerator
log=/dev/null
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && log="$OUT/adapter_gpu.txt"; fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name(0))"

  echo; echo "### parts 1-3: operation counts, eager and compiled steps, scoring (benchmarks/adapter_speed.py)"
  timeout 330 python3 benchmarks/adapter_speed.py --device cuda --dtype bf16 --preset llama-0.5b \
    --batch 128 --seq 128 --tasks 8 --rank 8 --iters 20 --warmup 3 --profile peft_lora,mtl_lora \
    --compile --compile-scope "${COMPILE_SCOPE:-blocks}" --compile-mode "${COMPILE_MODE:-default}" \
    --compile-cases mtl_lora,peft_lora,reference,unmerged,merged \
    --time-budget 220
  echo "adapter_speed exit status $?"

  echo; echo "### part 4: DeepSpeed ZeRO-2 engine overhead, tokens/s, MFU (benchmarks/train_speed.py)"
  if python3 -c "import deepspeed" >/dev/null 2>&1; then
    timeout 120 python3 benchmarks/train_speed.py --device cuda --preset llama-0.5b --dtype bf16 \
      --batch 128 --seq 128 --tasks 8 --rank 8 --stages 2 --rounds 5 --steps 3 --warmup 2 --skip-scaling
    echo "train_speed exit status $?"
  else
    echo "skipped: deepspeed is not importable here (the ZeRO-2 overhead and its tokens/s and MFU need it;"
    echo "         part 2 above gives tokens/s and MFU of the plain training step)"
  fi
  date -u
} 2>&1 | tee "$log"
