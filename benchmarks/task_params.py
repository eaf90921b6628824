"""How far did MTL-LoRA's per-scenario parameters train? A diagnostic for trained model folders.

    python -m benchmarks.task_params runs/quality250/wdc/runs/mtl_lora-seed0/model [more model folders]

For each folder (``modeling.artifact`` layout) it rebuilds the initial model from the saved config and seed
(the trainer seeds ``torch`` with ``train.seed`` just before building), then compares, over all adapted
layers:

    w moved          max |w_t - w_t(init)|
    p moved          mean / max |p_t - p_t(init)|, p_t = softmax(w_t / τ): the mixing of the B_i
    top p            mean over layers and scenarios of max_i p_t,i (1: each scenario uses one B_i)
    shared top       layers where every scenario favours the same B_i (no routing left)
    Λ from I         mean / max ||Λ_t - I||_F / ||I||_F (diagonal Λ: the vector against ones)
    ΔW cosine        mean pairwise cosine similarity of the scenarios' updates ΔW_t (1: one shared update)
    entropy          mean H(softmax(w_t / τ)) / log n, at init and trained (0: one-hot routing, 1: uniform)
    tasks per B_i    mean effective number of scenarios using each B_i, at init and trained (training.diagnostics)

Prints one Markdown row per folder.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from modeling.artifact import load_trained
from modeling.inject import adapter_layers
from modeling.model import build_model
from modeling.mtl_lora import MTLLoRALinear
from training.diagnostics import adapter_diagnostics


def _lambda_distance(layer: MTLLoRALinear) -> torch.Tensor:
    lam = layer.lam.detach().float()
    eye = torch.ones_like(lam[0]) if lam.dim() == 2 else torch.eye(lam.shape[-1])
    return (lam - eye).flatten(1).norm(dim=1) / eye.norm()  # (tasks,)


def _delta_cosine(layer: MTLLoRALinear) -> float:
    deltas = [layer.delta_weight(t, dtype=torch.float32).flatten() for t in range(layer.num_tasks)]
    sims = [torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in itertools.combinations(deltas, 2)]
    return sum(sims) / len(sims)


@torch.no_grad()
def describe(model_dir: Path) -> dict[str, float]:
    cfg, task_map, trained = load_trained(model_dir)
    if cfg.adapter.method != "mtl_lora":
        raise SystemExit(f"{model_dir}: adapter.method is {cfg.adapter.method!r}; only mtl_lora has Λ_t and w_t")
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg, len(task_map), dtype=torch.float32)
    now, before = adapter_layers(trained.backbone), adapter_layers(init.backbone)
    w_moved, p_moved, top_p, lam_dist, cosines, shared_top = [], [], [], [], [], 0
    for name, layer in now.items():
        p, p0 = layer.mixing_weights(), before[name].mixing_weights()  # (tasks, n), fp32
        w_moved.append((layer.w - before[name].w).abs().max().item())
        p_moved.append((p - p0).abs().flatten())
        top_p.append(p.max(dim=1).values)
        shared_top += int(p.argmax(dim=1).unique().numel() == 1)
        lam_dist.append(_lambda_distance(layer))
        cosines.append(_delta_cosine(layer))
    p_all, lam_all = torch.cat(p_moved), torch.cat(lam_dist)
    d_now, d_init = adapter_diagnostics(trained.backbone), adapter_diagnostics(init.backbone)
    return {
        "entropy_frac_init": d_init["diag/entropy_frac"], "entropy_frac": d_now["diag/entropy_frac"],
        "tasks_eff_init": d_init["diag/tasks_eff_mean"], "tasks_eff": d_now["diag/tasks_eff_mean"],
        "layers": len(now),
        "task_lr": cfg.train.task_lr or cfg.train.lr,
        "w_moved_max": max(w_moved),
        "p_moved_mean": p_all.mean().item(),
        "p_moved_max": p_all.max().item(),
        "top_p_mean": torch.cat(top_p).mean().item(),
        "shared_top_layers": shared_top,
        "lambda_from_identity_mean": lam_all.mean().item(),
        "lambda_from_identity_max": lam_all.max().item(),
        "delta_cosine_mean": sum(cosines) / len(cosines),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print("| model | task lr | w moved (max) | p moved (mean / max) | top p (mean) | shared top | "
          "Λ from I (mean / max) | ΔW cosine (mean) | entropy / log n (init → trained) | tasks per B_i |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in args.model_dirs:
        r = describe(d)
        print(f"| {d} | {r['task_lr']:g} | {r['w_moved_max']:.3f} | {r['p_moved_mean']:.3f} / {r['p_moved_max']:.3f} | "
              f"{r['top_p_mean']:.2f} | {r['shared_top_layers']} of {r['layers']} | "
              f"{r['lambda_from_identity_mean']:.1%} / {r['lambda_from_identity_max']:.1%} | "
              f"{r['delta_cosine_mean']:.2f} | {r['entropy_frac_init']:.2f} → {r['entropy_frac']:.2f} | "
              f"{r['tasks_eff_init']:.2f} → {r['tasks_eff']:.2f} |")


if __name__ == "__main__":
    main()
