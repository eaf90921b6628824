"""The quality benchmark's protocol as pure functions: budgets, variants, the plan, lr selection, pairing.

No training here (``benchmarks.quality_runner`` runs the trials); everything below works on the command's
options or on the rows of its results.json, so the rules that decide the reported numbers are tested in
isolation:

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
    methods    mtl_lora, lora, per_task_lora as configured; lora_matched is shared LoRA whose r makes its
               adapter parameters closest to MTL-LoRA's (only r changes: alpha stays, so s = alpha / r).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import typing
from dataclasses import dataclass

from kernel.config import AdapterConfig, Config
from kernel.errors import ConfigError

DEFAULT_ES_MAX_STEPS = 2000
DEFAULT_LRS = (5e-4, 1e-3, 2e-3)
BASE_METHODS = ("mtl_lora", "lora", "lora_matched", "per_task_lora")
# Any further adapter.method the config knows (a method outside the paper lives there, never as mtl_lora).
METHODS = BASE_METHODS + tuple(m for m in typing.get_args(typing.get_type_hints(AdapterConfig)["method"])
                               if m not in BASE_METHODS)

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


# --- methods, parameter matching and the plan ----------------------------------------------------------------

def adapter_shapes(cfg: Config, num_tasks: int) -> list[tuple[int, int]]:
    """(in, out) of every layer the config's targets adapt."""
    from modeling.inject import adapter_layers
    from modeling.model import build_model

    model = build_model(cfg, num_tasks)
    return [(m.base_layer.in_features, m.base_layer.out_features) for m in adapter_layers(model).values()]


def mtl_adapter_params(shapes: list[tuple[int, int]], cfg: Config, num_tasks: int) -> int:
    from modeling.mtl_lora import expected_trainable_params

    a = cfg.adapter
    return sum(expected_trainable_params(i, o, a.r, num_tasks, a.n_up, "mtl_lora", a.lambda_type) for i, o in shapes)


def matched_lora_rank(shapes: list[tuple[int, int]], target: int) -> int:
    """The rank r >= 1 whose shared-LoRA adapter count, r · Σ(in + out), is closest to ``target``."""
    from modeling.mtl_lora import expected_trainable_params

    per_rank = sum(expected_trainable_params(i, o, 1, 1, 1, "lora") for i, o in shapes)
    low = max(1, target // per_rank)
    return min((low, low + 1), key=lambda r: (abs(r * per_rank - target), r))


def method_overrides(method: str, cfg: Config, matched_r: int) -> list[str]:
    if method not in METHODS:
        raise ConfigError(f"--methods: unknown method {method!r}; known: {', '.join(METHODS)}")
    if method == "lora_matched":  # only r changes; alpha stays, as with PEFT's LoraConfig(r=..., lora_alpha=...)
        return ["adapter.method=lora", f"adapter.r={matched_r}"]
    return [f"adapter.method={method}"]


def trial_overrides(method: str, variants: dict[str, Variant], cfg: Config, matched_r: int, lr: float,
                    seed: int, diagnostics_every: int) -> list[str]:
    """What one trial adds to the dataset's overrides: lr, the method (or MTL-LoRA variant), seed, diagnostics.

    The variant's overrides come after train.lr, so that a variant's own train.task_lr (say) applies.
    """
    method_args = ([*method_overrides("mtl_lora", cfg, matched_r), *variants[method].resolved(lr)]
                   if method in variants else method_overrides(method, cfg, matched_r))
    return [f"train.lr={lr!r}", *method_args, f"train.seed={seed}", f"train.diagnostics_every={diagnostics_every}"]


class Plan(typing.NamedTuple):
    datasets: list[str]
    methods: list[str]
    variants: dict[str, Variant]
    budgets: list[Budget]
    lrs: list[float]
    seeds: list[int]
    shard: tuple[int, int] = (1, 1)  # (K, N): this command runs trials K-1, K-1+N, ... of ``trials()``

    def trials(self) -> list[tuple[str, Budget, str, float, int]]:
        """Every (dataset, budget, method, lr, seed) of the plan, in run order (the shards' numbering)."""
        return [(d, b, m, lr, s) for d in self.datasets for b in self.budgets for m in self.methods
                for lr in self.lrs for s in self.seeds]

    def mine(self) -> set[tuple[str, str, str, float, int]]:
        """This shard's trials, as results.json keys."""
        k, n = self.shard
        return {(d, b.name, m, lr, s) for i, (d, b, m, lr, s) in enumerate(self.trials()) if i % n == k - 1}


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


def chosen(results: dict) -> dict[tuple[str, str, str], dict[int, dict]]:
    """(dataset, budget, method) -> seed -> the trial at the lr chosen on validation, once it has its test."""
    out: dict[tuple[str, str, str], dict[int, dict]] = {}
    for t in results["trials"]:
        sel = results["selected"].get(f"{t['dataset']}|{t['budget']}|{t['method']}")
        if sel and t["lr"] == sel["lr"] and t["seed"] in sel["seeds"] and "test_auc_macro" in t:
            out.setdefault((t["dataset"], t["budget"], t["method"]), {})[t["seed"]] = t
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def paired_macro(a: dict[int, dict], b: dict[int, dict]) -> dict[int, float]:
    """seed -> macro test AUC of a minus b (both chosen trials)."""
    return {s: a[s]["test_auc_macro"] - b[s]["test_auc_macro"] for s in a if s in b}


def paired_scenario(a: dict[int, dict], b: dict[int, dict], scenario: str) -> dict[int, float]:
    """seed -> test AUC of a minus b in one scenario (seeds where either has no AUC are left out)."""
    out = {}
    for s in a:
        if s in b:
            x, y = a[s]["test_auc"].get(scenario), b[s]["test_auc"].get(scenario)
            if x is not None and y is not None:
                out[s] = x - y
    return out
