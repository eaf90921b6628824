"""The quality benchmark's protocol as pure functions: budgets, variants, learning-rate selection, pairing.

No training here (``benchmarks.quality`` runs the trials); everything below works on the rows of its
results.json, so the rules that decide the reported numbers are tested in isolation:

    budgets    "250": a fixed 250 optimizer steps, validated once at the end (the final model is tested).
               "es2000": early stopping: up to 2000 steps, validated every ``eval_every`` steps, stopped after
               ``patience`` validations without a macro-AUC gain; the best validated checkpoint is tested.
               ("es" alone: up to DEFAULT_ES_MAX_STEPS.) The lr schedule (warm-up, linear decay) spans
               the budget's maximum steps in both cases.
    lr grid    every method (and variant) trains once per (lr, seed) for the same grid: the same number of
               tuning trials each. The chosen lr is the one with the highest validation macro AUC averaged
               over the seeds (ties: the smaller lr); only its trials are scored on the test split, once.
    pairing    method minus baseline, macro (or per-scenario) test AUC, seed by seed: runs with the same seed
               share the scenario draw order and the head's initialisation.
    variants   MTL-LoRA with extra config overrides, within the paper's method (VARIANTS, or
               ``NAME:key=value;key=value``). A value ``<k>xlr`` is k times the trial's lr. A variant whose
               keys the config does not know (yet) is skipped with a message, never run half-configured.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import typing
from dataclasses import dataclass

DEFAULT_ES_MAX_STEPS = 2000

# MTL-LoRA variants within the paper's method (spec: τ, n, Λ full/diagonal; the optimizer's task group).
# adapter.w_init_scale (the U(±scale/√n) bound of w, 1 = spec) and train.task_warmup_steps (a warm-up of
# the task parameters) are one override each once the config knows them; until then they are skipped.
VARIANTS: dict[str, tuple[str, ...]] = {
    "tau0.3": ("adapter.tau=0.3",),
    "tau1": ("adapter.tau=1.0",),
    "n1": ("adapter.n_up=1",),
    "n2": ("adapter.n_up=2",),
    "n6": ("adapter.n_up=6",),
    "diag": ("adapter.lambda_type=diagonal",),
    "tasklr3x": ("train.task_lr=3xlr",),
    "tasklr10x": ("train.task_lr=10xlr",),
    "winit0.1": ("adapter.w_init_scale=0.1",),
    "winit0.3": ("adapter.w_init_scale=0.3",),
    "taskwarm50": ("train.task_warmup_steps=50",),
    "taskwarm100": ("train.task_warmup_steps=100",),
}
VARIANT_PREFIX = "mtl_lora+"


@dataclass(frozen=True)
class Budget:
    name: str
    max_steps: int
    early_stopping: bool

    def overrides(self, eval_every: int, patience: int) -> list[str]:
        """Trainer overrides: the steps, when to validate and checkpoint, and early stopping."""
        if not self.early_stopping:  # one validation, at the end: the tested model is the final one
            every, stop = self.max_steps, 0
        else:
            every, stop = min(eval_every, self.max_steps), patience
        return [f"train.max_steps={self.max_steps}", f"train.eval_every={every}",
                f"train.checkpoint_every={self.max_steps}", "train.keep_checkpoints=1",
                f"train.early_stopping_patience={stop}"]


def parse_budget(text: str) -> Budget:
    """"250" (fixed steps), "es" or "es2000" (early stopping, up to that many steps)."""
    from kernel.errors import ConfigError

    t = text.strip().lower()
    try:
        if t.startswith("es"):
            steps = int(t[2:]) if t[2:] else DEFAULT_ES_MAX_STEPS
            budget = Budget(f"es{steps}", steps, True)
        else:
            budget = Budget(str(int(t)), int(t), False)
    except ValueError:
        raise ConfigError(f"--budgets: {text!r} is neither a step count (250) nor es / es<max steps>") from None
    if budget.max_steps < 1:
        raise ConfigError(f"--budgets: {text!r} needs at least one step")
    return budget


# --- variants -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]

    @property
    def method(self) -> str:
        return VARIANT_PREFIX + self.name

    def resolved(self, lr: float) -> list[str]:
        """The overrides with ``<k>xlr`` values replaced by k · lr."""
        out = []
        for item in self.overrides:
            key, value = item.split("=", 1)
            if value.endswith("xlr"):
                value = repr(float(value[:-3]) * lr)
            out.append(f"{key}={value}")
        return out


def parse_variant(text: str) -> Variant:
    """A catalogue name (VARIANTS) or ``NAME:key=value;key=value``."""
    from kernel.errors import ConfigError

    name, _, spec = text.partition(":")
    if not spec:
        if name not in VARIANTS:
            raise ConfigError(f"--variants: unknown variant {name!r}; known: {', '.join(VARIANTS)} "
                              "(or NAME:key=value;key=value)")
        return Variant(name, VARIANTS[name])
    items = tuple(s.strip() for s in spec.split(";") if s.strip())
    if not name or not items or any("=" not in s for s in items):
        raise ConfigError(f"--variants: {text!r}: expected NAME:key=value;key=value")
    return Variant(name, items)


def config_knows(key: str) -> bool:
    """Whether the dotted ``key`` is a field of the project config (``kernel.config.Config``)."""
    from kernel.config import Config

    node: typing.Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return False
        hints = typing.get_type_hints(node)
        if part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = hints[part]
    return True


def unknown_keys(variant: Variant) -> list[str]:
    return [item.split("=", 1)[0] for item in variant.overrides if not config_knows(item.split("=", 1)[0])]


# --- selection and pairing ---------------------------------------------------------------------------------

def _val(trial: dict) -> float:
    v = trial.get("val_auc_macro")
    return -math.inf if v is None else v


def lr_table(trials: list[dict], seeds: list[int]) -> dict[float, float | None]:
    """lr -> mean validation macro AUC over ``seeds`` (None while some seed of that lr is missing)."""
    by_lr: dict[float, dict[int, float]] = {}
    for t in trials:
        by_lr.setdefault(t["lr"], {})[t["seed"]] = _val(t)
    return {lr: (statistics.fmean(v[s] for s in seeds) if all(s in v for s in seeds) else None)
            for lr, v in sorted(by_lr.items())}


def select_lr(trials: list[dict], lrs: list[float], seeds: list[int]) -> float | None:
    """The grid lr with the best mean validation macro AUC over ``seeds``; None until every trial is in.

    ``trials`` are one (dataset, budget, method)'s rows. Ties go to the smaller lr. A trial without a
    validation AUC counts as -inf (it cannot be chosen unless every lr failed).
    """
    table = lr_table([t for t in trials if t["lr"] in lrs and t["seed"] in seeds], seeds)
    if any(table.get(lr) is None for lr in lrs):
        return None
    # Rounded so that float noise in the mean (0.8 + 0.9 vs 0.85 + 0.85) cannot break a real tie.
    return max(sorted(lrs), key=lambda lr: (round(table[lr], 12), -lr))


def paired(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    """seed -> a - b, for the seeds both have (values None on either side are left out)."""
    return {s: a[s] - b[s] for s in sorted(a) if s in b and a[s] is not None and b[s] is not None}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
