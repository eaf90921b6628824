"""Host-side cost proxies: aten operations dispatched per training step, MTL-LoRA against PEFT LoRA.

    python benchmarks/adapter_ops.py                          # tiny LLaMA: 4 layers, 8 tasks, r=8, q,k,v,o
    python benchmarks/adapter_ops.py --dtype bf16 --explain   # the GPU run's dtype; torch._dynamo.explain too

Eager PyTorch dispatches and launches every operation from the host one by one; on a GPU with small
adapter kernels the host, not the device, sets the pace, so the count of operations predicts the gap to
PEFT LoRA without a GPU. Every aten operation is counted with a ``TorchDispatchMode`` (views, transposes,
detaches and allocations included: each costs host time), on the same base model, targets, rank and batch:

    fwd+bwd    forward + backward of one mixed-scenario training step (train mode, dropout on)
    optimizer  one ``optimizer.step()`` of the project's AdamW (``training.ds_config.make_optimizer``:
               multi-tensor, fused) over the adapters' groups as the trainer builds them
    scoring    one no-grad forward of the unmerged model on the mixed batch (eval mode, caches warm)

Task ids are set before the counted region: on CPU setting them checks their range (4 operations per
forward), which an accelerator skips. Counts are deterministic for a given torch version; the ratios are
what tests/test_adapter_ops.py holds to the targets.
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.adapter_models import (
    DTYPES,
    TARGETS,
    build_base,
    make_batch,
    make_optimizer,
    parse_args,
    with_mtl_lora,
    with_peft,
)

TARGET_RATIO = 1.10  # every proxy: MTL-LoRA / PEFT LoRA


class OpCounter(TorchDispatchMode):
    """Counts every aten operation dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_step(model: nn.Module, set_ids, batch, warm: int = 2, task_lr: float | None = None) -> dict[str, OpCounter]:
    """Operations of one training step (fwd+bwd, optimizer) and one scoring forward, in steady state."""
    ids, mask, tasks, labels = batch
    opt = make_optimizer(model, on_gpu=ids.is_cuda, task_lr=task_lr)
    model.train()

    def forward_backward():
        logits = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()
        F.binary_cross_entropy_with_logits(logits, labels).backward()

    for _ in range(warm):  # optimizer state, lazy initialisations, persistent views
        set_ids(tasks)
        forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    counts = {k: OpCounter() for k in ("fwd+bwd", "optimizer", "scoring")}
    set_ids(tasks)
    with counts["fwd+bwd"]:
        forward_backward()
    with counts["optimizer"]:
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        set_ids(tasks)
        model(input_ids=ids, attention_mask=mask)  # fills the scoring cache of the factors
        with counts["scoring"]:
            model(input_ids=ids, attention_mask=mask)
    return counts


def count_layer(method: str, in_f: int, out_f: int, args, dtype: torch.dtype) -> dict[str, int]:
    """Operations of one adapted layer alone (q_proj-shaped, input requiring grad): fwd, bwd, no-grad fwd."""
    from modeling.mtl_lora import MTLLoRALinear, TaskRouter

    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, in_f, dtype=dtype, device=args.device, requires_grad=True)
    base = nn.Linear(in_f, out_f, bias=False, dtype=dtype, device=args.device)
    if method == "peft_lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout, target_modules=["q_proj"])
        peft = get_peft_model(_OneLinear(base), lcfg, autocast_adapter_dtype=False)
        layer = peft.base_model.model.q_proj
    else:
        router = TaskRouter(args.tasks)
        router.task_ids = torch.arange(args.batch, device=args.device) % args.tasks
        layer = MTLLoRALinear(base, args.tasks, router, method, r=args.rank, alpha=2 * args.rank, n_up=args.n_up,
                              dropout=args.dropout)
    layer.train()
    params = [p for p in layer.parameters() if p.requires_grad]
    for _ in range(2):
        layer(x).sum().backward()
    x.grad = None
    for p in params:
        p.grad = None
    fwd, bwd, score = OpCounter(), OpCounter(), OpCounter()
    with fwd:
        y = layer(x)
    with bwd:
        y.backward(torch.ones_like(y))
    layer.eval()
    with torch.no_grad():
        layer(x)
        with score:
            layer(x)
    return {"fwd": fwd.total, "bwd": bwd.total, "scoring": score.total, "params": len(params)}


class _OneLinear(nn.Module):
    def __init__(self, q_proj: nn.Linear) -> None:
        super().__init__()
        self.q_proj = q_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x)


def explain(model: nn.Module, set_ids, batch):
    """``torch._dynamo.explain`` of the training forward (task ids set inside, as RelevanceModel does)."""
    import torch._dynamo

    ids, mask, tasks, _ = batch
    model.train()

    def forward(ids, mask, tasks):
        set_ids(tasks)
        return model(input_ids=ids, attention_mask=mask).logits

    torch._dynamo.reset()
    return torch._dynamo.explain(forward)(ids, mask, tasks)


def report(args, base: nn.Module | None = None, batch=None, explain_graphs: bool = False) -> dict:
    """Print the proxies, MTL-LoRA next to PEFT LoRA (and the baselines on the same machinery)."""
    base = base if base is not None else build_base(args)
    batch = batch if batch is not None else make_batch(args, base.config.vocab_size)
    dtype = DTYPES[args.dtype]
    builders = {"peft_lora": with_peft, "mtl_lora": with_mtl_lora,
                "lora": lambda b, a: with_mtl_lora(b, a, method="lora"),
                "per_task_lora": lambda b, a: with_mtl_lora(b, a, method="per_task_lora")}
    counts = {}
    for name, build in builders.items():
        model, set_ids = build(base, args)
        counts[name] = count_step(model, set_ids, batch)
        if name == "mtl_lora":  # Λ/w with a learning rate of their own: one more fused call
            model, set_ids = build(base, args)
            apart = count_step(model, set_ids, batch, task_lr=3e-4)
            counts["mtl_lora, task_lr != lr"] = {"optimizer": apart["optimizer"]}
    n_layers = sum(1 for n, m in base.named_modules() if isinstance(m, nn.Linear) and n.endswith(tuple(TARGETS)))
    print(f"\n== aten operations per step ({args.preset}, {args.dtype}, batch {args.batch} x {args.seq}, "
          f"{args.tasks} tasks, r {args.rank}, {n_layers} adapted layers; TorchDispatchMode) ==")
    peft = counts["peft_lora"]
    print(f"  {'':26s} {'fwd+bwd':>9s} {'optimizer':>10s} {'scoring':>9s}")
    for name, c in counts.items():
        cells = [f"{c[k].total:9d}" if k in c else f"{'':9s}" for k in ("fwd+bwd", "optimizer", "scoring")]
        print(f"  {name:26s} {cells[0]} {cells[1]:>10s} {cells[2]}")
    ratios = {k: counts["mtl_lora"][k].total / peft[k].total for k in ("fwd+bwd", "optimizer", "scoring")}
    for k, v in ratios.items():
        print(f"  MTL-LoRA / PEFT LoRA, {k:9s} {v:6.3f}   target <= {TARGET_RATIO:.2f}")
    opt_lr = counts["mtl_lora, task_lr != lr"]["optimizer"].total / peft["optimizer"].total
    print(f"  (optimizer with task_lr != lr: {opt_lr:.3f}; one fused call per distinct set of hyperparameters)")
    extra = (counts["mtl_lora"]["fwd+bwd"].total - peft["fwd+bwd"].total) / n_layers
    print(f"  fwd+bwd operations per adapted layer over PEFT's: {extra:+.1f}")
    q = base.get_submodule("model.layers.0.self_attn.q_proj")
    print(f"\n  one adapted layer alone ({q.in_features} -> {q.out_features}, input requiring grad):")
    layer_counts = {m: count_layer(m, q.in_features, q.out_features, args, dtype)
                    for m in ("peft_lora", "mtl_lora", "lora", "per_task_lora")}
    for m, c in layer_counts.items():
        print(f"    {m:14s} fwd {c['fwd']:3d}  bwd {c['bwd']:3d}  total {c['fwd'] + c['bwd']:3d}  "
              f"(base layer included; {c['params']} parameter tensors)   no-grad fwd {c['scoring']:3d}")
    top = counts["mtl_lora"]["fwd+bwd"].counts - peft["fwd+bwd"].counts
    print("  largest differences, fwd+bwd: " + ", ".join(f"{k} +{v}" for k, v in top.most_common(6)))
    fewer = peft["fwd+bwd"].counts - counts["mtl_lora"]["fwd+bwd"].counts
    print("                       fewer: " + ", ".join(f"{k} -{v}" for k, v in fewer.most_common(6)))
    result = {"counts": counts, "ratios": ratios, "layers": layer_counts}
    if explain_graphs:
        for name in ("peft_lora", "mtl_lora", "lora", "per_task_lora"):
            model, set_ids = builders[name](base, args)
            ex = explain(model, set_ids, batch)
            print(f"  torch._dynamo.explain, training forward, {name:14s}: {ex.graph_count} graph(s), "
                  f"{ex.graph_break_count} graph break(s), {ex.op_count} ops"
                  + "".join(f"\n      break: {b.reason}" for b in ex.break_reasons))
            result[f"explain/{name}"] = ex
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # the same options as adapter_speed.py (--preset, --dtype, --batch, --explain, ...)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}")
    report(args, explain_graphs=args.explain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
