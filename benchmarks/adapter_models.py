"""The models the adapter benchmarks compare, built one way for all of them, and their shared options.

``benchmarks/adapter_speed.py`` (timings) and ``benchmarks/adapter_ops.py`` (operation counts) take the same
command-line options (``parse_args``) and build every case here, on one random LLaMA-shaped base model
(``PRESETS``), with the same targets (q, k, v, o), rank, dropout, batch and optimizer:

    with_peft        PEFT's LoRA (one shared adapter; adapter weights kept in the model dtype)
    with_mtl_lora    modeling.mtl_lora on the same base (method "lora" / "per_task_lora": the baselines)
    with_reference   the reference code's approach (benchmarks/reference_mtl_lora.py)
    with_merged      a merged checkpoint for one scenario (modeling.merge)

Each builder returns (model, set_ids): set_ids(task_ids) routes the next batch.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

if __package__ in (None, ""):  # imported by a benchmark run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

DESCRIPTION = "MTL-LoRA adapter speed: a training step against PEFT LoRA and the reference approach; scoring cost."
PRESETS = {  # LLaMA-shaped; speed does not depend on the (random) weights
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1000},
    "llama-small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32000},
    # Qwen2-0.5B's shape as a LLaMA (hidden 896, 24 layers, GQA 14/2): ~0.49B parameters.
    "llama-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options of benchmarks/adapter_speed.py, which benchmarks/adapter_ops.py shares."""
    p = argparse.ArgumentParser(prog="python benchmarks/adapter_speed.py", description=DESCRIPTION)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--preset", choices=PRESETS, default="llama-small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--n-up", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--iters", type=int, default=15, help="timed rounds (each runs every case once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case before the rounds")
    p.add_argument("--compile", action="store_true", help="also time every case compiled (--compile-scope)")
    p.add_argument("--compile-scope", choices=("model", "blocks"), default="model",
                   help="model: the whole model's forward, fullgraph=True (default); blocks: each transformer "
                        "block on its own (regional: one compiled block reused by all layers, compiles fast)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs")
    p.add_argument("--no-ops", dest="ops", action="store_false",
                   help="skip the operation-count proxies (benchmarks/adapter_ops.py) printed before the timings")
    p.add_argument("--explain", action="store_true", help="with the proxies: torch._dynamo.explain of the "
                   "training forward of every adapter (graphs and graph breaks under fullgraph)")
    p.add_argument("--compile-cases", default="mtl_lora,peft_lora,reference,unmerged,merged",
                   help="which cases to compile, in order (compiling stops when --time-budget is spent)")
    p.add_argument("--paths", default="", help="also time the layer's update paths forced, e.g. fused,gather")
    p.add_argument("--profile", default="", help="cases to profile one step of (e.g. peft_lora,mtl_lora); "
                   "prints the top kernels by device time")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--time-budget", type=float, default=0, help="seconds; 0 = no limit on compiled cases")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the chip's dense bf16 peak for MFU on CUDA (H100/H200: 989)")
    return p.parse_args(argv)


def build_base(args) -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(**PRESETS[args.preset], num_labels=1, pad_token_id=0, use_cache=False,
                      max_position_embeddings=max(2048, args.seq))
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForSequenceClassification(cfg)
    return model.to(DTYPES[args.dtype]).requires_grad_(False)


def with_peft(base: nn.Module, args):
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout, target_modules=TARGETS)
    model = get_peft_model(copy.deepcopy(base), lcfg, autocast_adapter_dtype=False)  # adapters in bf16 too
    return model, lambda ids: None


def _mtl_lora_model(base: nn.Module, args, method: str = "mtl_lora"):
    from kernel.config import AdapterConfig
    from modeling.inject import inject_adapters

    model = copy.deepcopy(base)
    acfg = AdapterConfig(method=method, r=args.rank, alpha=2 * args.rank, n_up=args.n_up, dropout=args.dropout,
                         targets=TARGETS)
    router, _ = inject_adapters(model, acfg, args.tasks)
    return model, router


def with_mtl_lora(base: nn.Module, args, path: str = "auto", method: str = "mtl_lora"):
    """modeling.mtl_lora on the same base; ``method`` "lora" / "per_task_lora" gives the baselines."""
    from modeling.inject import adapter_layers

    model, router = _mtl_lora_model(base, args, method)
    for layer in adapter_layers(model).values():
        layer.update_path = path
    return model, lambda ids: setattr(router, "task_ids", ids)


def with_reference(base: nn.Module, args):
    from benchmarks.reference_mtl_lora import inject_gather_adapters

    model = copy.deepcopy(base)
    router = inject_gather_adapters(model, TARGETS, args.tasks, args.rank, 2 * args.rank, args.n_up, 0.1,
                                    args.dropout)
    return model, lambda ids: setattr(router, "task_ids", ids)


def with_merged(base: nn.Module, args):
    from modeling.merge import merged_backbone
    from modeling.model import RelevanceModel

    model, router = _mtl_lora_model(base, args)
    return merged_backbone(RelevanceModel(model, "last", router), task=0), lambda ids: None


def adapter_groups(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.0) -> list[dict]:
    """The trainer's optimizer groups for this model: MTL-LoRA's (adapters, task) by parameter name
    (``training.ds_config.optimizer_groups``); PEFT's model has one adapters group. One lr for all groups:
    the default config (task_lr 0 means "same as lr")."""
    from training.ds_config import optimizer_groups

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any(n.endswith((".A", ".B")) for n, _ in named):
        return optimizer_groups(named, {"adapters": lr, "task": lr}, weight_decay)
    return [{"params": [p for _, p in named], "lr": lr, "weight_decay": weight_decay, "name": "adapters"}]


def make_optimizer(model: nn.Module, on_gpu: bool, task_lr: float | None = None) -> torch.optim.Optimizer:
    """The project's AdamW (multi-tensor: fused) over ``adapter_groups``, for every case alike;
    ``task_lr`` gives Λ/w a learning rate of their own."""
    from training.ds_config import make_optimizer as project_optimizer

    groups = adapter_groups(model)
    for g in groups:
        if task_lr is not None and g["name"] == "task":
            g["lr"] = task_lr
    return project_optimizer(groups, on_gpu)


def make_batch(args, vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=g)
    tasks = torch.randint(0, args.tasks, (args.batch,), generator=g)
    labels = torch.randint(0, 2, (args.batch,), generator=g).float()
    mask = torch.ones_like(ids)
    return tuple(t.to(args.device) for t in (ids, mask, tasks, labels))
