"""Training-step speed: DeepSpeed engine overhead vs a plain torch loop, process scaling, GPU tokens/s + MFU.

    python benchmarks/train_speed.py                                  # CPU: overhead (ZeRO-2 and 0) + 1 vs 2 procs
    python benchmarks/train_speed.py --device cuda --preset llama-0.5b --dtype bf16 --batch 128 --seq 128

Same model (frozen base + MTL-LoRA), same batches, same optimizer (torch AdamW) in both loops; the cases
are interleaved in rounds (A B A B ...) so machine noise hits both alike; medians are reported.
MFU counts 4 × non-embedding parameters × tokens FLOPs per step (forward 2, backward through activations
only 2: the base is frozen) against the chip's dense bf16 peak (--peak-tflops).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.nn.functional as F

from kernel.config import config_from_dict
from modeling.model import build_model
from training.ds_config import build_optimizer, deepspeed_config

PRESETS = {
    "tiny": {"model_type": "bert", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 256},
    # all-MiniLM-L6-v2's shape (random weights: speed does not depend on them).
    "minilm": {"model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
               "num_attention_heads": 12, "intermediate_size": 1536},
    "llama-0.5b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 896, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
                   "max_position_embeddings": 2048},
}
TARGETS = {"bert": ["query", "key", "value", "attention.output.dense"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def make_cfg(args, zero_stage: int):
    preset = dict(PRESETS[args.preset])
    return config_from_dict({
        "model": {"init": "random", "random_config": preset,
                  "pooling": "last" if preset["model_type"] == "llama" else "mean"},
        "adapter": {"r": args.rank, "targets": TARGETS[preset["model_type"]], "dropout": 0.0},
        "train": {"zero_stage": zero_stage, "precision": args.dtype, "micro_batch_size": args.batch,
                  "max_steps": 10**6, "warmup_steps": 0, "lr": 1e-4},
    })


def make_batches(args, vocab: int, device, n: int = 4):
    g = torch.Generator().manual_seed(0)
    return [{
        "input_ids": torch.randint(3, vocab, (args.batch, args.seq), generator=g).to(device),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device),
        "task_ids": torch.randint(0, args.tasks, (args.batch,), generator=g).to(device),
        "labels": torch.randint(0, 2, (args.batch,), generator=g).float().to(device),
    } for _ in range(n)]


def plain_step(model, opt, batch, dtype):
    with torch.autocast(batch["input_ids"].device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
    F.binary_cross_entropy_with_logits(logits.float(), batch["labels"]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def engine_step(engine, batch, dtype):
    with torch.autocast(batch["input_ids"].device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = engine(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
    engine.backward(F.binary_cross_entropy_with_logits(logits.float(), batch["labels"]))
    engine.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_rounds(cases: dict, batches, device, rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    for fn in cases.values():
        for i in range(warmup):
            fn(batches[i % len(batches)])
    sync(device)
    times = {k: [] for k in cases}
    for r in range(rounds):
        for name, fn in cases.items():
            sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                fn(batches[i % len(batches)])
            sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def init_single_process():
    import deepspeed

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", "29701")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def overhead(args, device) -> None:
    import deepspeed

    init_single_process()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    on_gpu = device.type == "cuda"
    base_cfg = make_cfg(args, 0)
    torch.manual_seed(0)
    model = build_model(base_cfg, args.tasks).to(device)
    batches = make_batches(args, PRESETS[args.preset]["vocab_size"], device)
    cases = {}
    plain = copy.deepcopy(model)
    if dtype == torch.bfloat16:
        plain.to(dtype)  # the engines hold bf16 weights too: compare like with like
    opt = build_optimizer(plain, base_cfg, on_gpu)
    cases["torch loop"] = lambda b: plain_step(plain, opt, b, dtype)
    for stage in args.stages:
        cfg = make_cfg(args, stage)
        m = copy.deepcopy(model)
        engine, *_ = deepspeed.initialize(model=m, optimizer=build_optimizer(m, cfg, on_gpu),
                                          config=deepspeed_config(cfg, 1, on_gpu))
        cases[f"deepspeed zero-{stage}"] = lambda b, e=engine: engine_step(e, b, dtype)
    times = time_rounds(cases, batches, device, args.rounds, args.steps, args.warmup)
    base = statistics.median(times["torch loop"])
    tokens = args.batch * args.seq
    non_emb = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    print(f"\nstep time, {args.preset} {args.dtype} batch {args.batch}×{args.seq}, {args.tasks} tasks, r={args.rank}, "
          f"{device.type}, medians of {args.rounds} rounds × {args.steps} steps")
    for name, ts in times.items():
        med = statistics.median(ts)
        line = f"  {name:<18} {med * 1000:9.1f} ms   ×{med / base:5.2f} vs torch loop   {tokens / med:10.0f} tokens/s"
        if on_gpu:
            line += f"   MFU {4 * non_emb * tokens / med / (args.peak_tflops * 1e12) * 100:5.1f}%"
        print(line)


def _scaling_worker(rank: int, world: int, args, port: int, queue) -> None:
    import deepspeed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = make_cfg(args, 2)
    torch.manual_seed(0)
    model = build_model(cfg, args.tasks)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg, False),
                                      config=deepspeed_config(cfg, world, False))
    batches = make_batches(args, PRESETS[args.preset]["vocab_size"], torch.device("cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    times = time_rounds({"s": lambda b: engine_step(engine, b, dtype)}, batches, torch.device("cpu"),
                        args.rounds, args.steps, args.warmup)["s"]
    if rank == 0:
        queue.put(statistics.median(times))
    torch.distributed.destroy_process_group()


def scaling(args) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    rates = {}
    for world in (1, 2):
        q = ctx.Queue()
        procs = [ctx.Process(target=_scaling_worker, args=(r, world, args, 29720 + world, q)) for r in range(world)]
        for p in procs:
            p.start()
        step = q.get()
        for p in procs:
            p.join()
        rates[world] = args.batch * world / step
    print(f"\nscaling (CPU, gloo, ZeRO-2, micro-batch {args.batch} per process; threads split between processes)")
    for world, rate in rates.items():
        print(f"  {world} process{'es' if world > 1 else ''}: {rate:8.1f} samples/s   ×{rate / rates[1]:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="minilm", choices=PRESETS)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the chip (H100/H200: 989)")
    p.add_argument("--skip-scaling", action="store_true")
    args = p.parse_args(argv)
    overhead(args, torch.device(args.device))
    if args.device == "cpu" and not args.skip_scaling:
        scaling(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
