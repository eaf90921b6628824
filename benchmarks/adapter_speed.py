"""MTL-LoRA adapter speed: a training step against PEFT LoRA and the reference approach; scoring cost.

    python benchmarks/adapter_speed.py --threads 1                     # CPU: small LLaMA-shaped model
    python benchmarks/adapter_speed.py --threads 1 --compile --iters 30 --compile-cases mtl_lora,peft_lora
    python benchmarks/adapter_speed.py --device cpu --preset tiny --iters 3 --compile   # smoke, all paths
    python benchmarks/adapter_speed.py --device cuda --dtype bf16 --preset llama-0.5b \
        --batch 128 --seq 128 --tasks 8 --rank 8 --compile                # the GPU run (gpu_adapter.sh)

First the host-side proxies (benchmarks/adapter_ops.py; --no-ops skips them): aten operations dispatched
per training step, optimizer step and scoring forward, MTL-LoRA next to PEFT LoRA on the same model
(--explain adds torch._dynamo.explain of the training forward). Then the timings.

Training cases, one step = forward + backward + AdamW on one mixed-scenario batch, same random base
model, rank, targets (q, k, v, o), dropout and optimizer (the project's: training.ds_config, fused):
    peft_lora   PEFT's LoRA (one shared adapter; adapter weights kept in the model dtype)
    mtl_lora    modeling.mtl_lora (eager: the written-out autograd node per layer; compiled: plain ops)
    reference   the reference code's approach (benchmarks/reference_mtl_lora.py): per-row copies of A,
                per-row Λ_t and pre-mixed B̃_t gathered per row, three batched matmuls
Scoring cases (inference mode, the same mixed batch):
    merged      a merged checkpoint for one scenario (modeling.merge): exactly the base model's cost
    unmerged    the MTL-LoRA model scoring the mixed batch per row
With --compile each case also runs compiled: by default the whole model forward with fullgraph=True
(static shapes, as the length-bucketing sampler gives; --compile-mode reduce-overhead adds CUDA graphs);
--compile-scope blocks compiles each transformer block instead (regional: one compiled block reused by all
layers, much faster to compile). Cases are interleaved in rounds (A B C A B C ...) so machine noise hits
all alike; medians are printed, with the ratios the targets are stated in.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

from benchmarks import adapter_ops
from benchmarks.adapter_models import (
    build_base,
    make_batch,
    make_optimizer,
    parse_args,
    with_merged,
    with_mtl_lora,
    with_peft,
    with_reference,
)


def check_agreement(base: nn.Module, args, batch) -> None:
    """Same adapter values in the fused, gather and reference layouts: the scores must agree."""
    from modeling.inject import adapter_layers

    models = {"fused": with_mtl_lora(base, args, "fused"), "gather": with_mtl_lora(base, args, "gather"),
              "reference": with_reference(base, args), "base": (copy.deepcopy(base), lambda ids: None)}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in adapter_layers(models["fused"][0]).items():
            layer.B.copy_(0.2 * torch.randn(layer.B.shape, generator=g).to(layer.B.device))
            layer.lam.add_(0.1 * torch.randn(layer.lam.shape, generator=g).to(layer.lam.device))
            layer.w.copy_(torch.randn(layer.w.shape, generator=g).to(layer.w.device))
            for other in ("gather", "reference"):
                twin = models[other][0].get_submodule(name)
                for p in ("A", "B", "lam", "w"):
                    getattr(twin, p).copy_(getattr(layer, p).view_as(getattr(twin, p)))
    ids, mask, tasks, _ = batch
    scores = {}
    for key, (model, set_ids) in models.items():
        model.eval()
        set_ids(tasks)
        with torch.inference_mode():
            scores[key] = model(input_ids=ids, attention_mask=mask).logits.float().squeeze(-1)
    scale = scores["fused"].abs().max().item()
    diffs = ", ".join(f"{k} {(scores[k] - scores['fused']).abs().max().item():.2e}" for k in scores if k != "fused")
    print(f"max |score - fused layout's| (max |score| {scale:.3f}; 'base' shows the adapters' effect): {diffs}")


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the longest ModuleList in the model."""
    return max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)


class Case:
    """One model + how to run one timed unit of work with it (a train step or a scoring forward)."""

    def __init__(self, name: str, model: nn.Module, set_ids, train: bool, args):
        self.name, self.model, self.set_ids, self.train = name, model, set_ids, train
        self.sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        self.times: list[float] = []
        self.peak_mib = float("nan")
        self.non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
        if train:
            model.train()
            # The project's AdamW for every case (training.ds_config): fused, groups stepped together.
            self.opt = make_optimizer(model, on_gpu=args.device.startswith("cuda"))
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        else:
            model.eval()
            self.trainable = 0

    def run(self, batch) -> None:
        ids, mask, tasks, labels = batch
        self.set_ids(tasks)
        if self.train:
            logits = self.model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()
            F.binary_cross_entropy_with_logits(logits, labels).backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                self.model(input_ids=ids, attention_mask=mask)

    def timed(self, batch) -> float:
        self.sync()
        t0 = time.perf_counter()
        self.run(batch)
        self.sync()
        return time.perf_counter() - t0

    def warm(self, batch, steps: int) -> float:
        """Untimed steps (compilation happens here); records peak device memory; returns seconds spent."""
        t0 = time.perf_counter()
        cuda = torch.cuda.is_available() and next(self.model.parameters()).is_cuda
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        for _ in range(steps):
            self.timed(batch)
        if cuda:
            self.peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
        return time.perf_counter() - t0


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def profile_cases(cases: list[Case], names: list[str], batch, top: int = 14) -> None:
    """One profiled step per named case: host time, device busy time, kernel launches, top host ops.

    When the host cannot keep the device fed (many small launches), wall time follows host time and
    device busy time shows what the kernels themselves cost.
    """
    from torch.profiler import ProfilerActivity, profile

    for case in cases:
        if case.name not in names:
            continue
        cuda = next(case.model.parameters()).is_cuda
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            case.timed(batch)
        events = prof.key_averages()
        host = sum(e.self_cpu_time_total for e in events) / 1e3
        device = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3
        launches = sum(e.count for e in events if "LaunchKernel" in e.key or "launchKernel" in e.key)
        aten = sum(e.count for e in events if e.key.startswith("aten::"))
        print(f"\n-- profile of one {case.name} step: host {host:.1f} ms, device busy {device:.1f} ms, "
              f"{launches} kernel launches, {aten} aten calls --")
        rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        for e in rows:
            print(f"  {e.key[:64]:64s} calls {e.count:6d}   host {e.self_cpu_time_total / 1e3:8.2f} ms")


def run_rounds(cases: list[Case], batch, args, title: str) -> None:
    """Interleave the cases for args.iters rounds, then print medians and the target ratios."""
    for _ in range(args.iters):
        for case in list(cases):
            try:
                case.times.append(case.timed(batch))
            except Exception:  # one broken case must not lose the others' figures
                print(f"  {case.name}: failed while timing\n{traceback.format_exc()}")
                cases.remove(case)
    med = {c.name: statistics.median(c.times) * 1e3 for c in cases if c.times}
    print(f"\n== {title}: median ms over {args.iters} interleaved rounds ==")
    tokens = args.batch * args.seq
    for c in cases:
        if c.name in med:
            spread = (max(c.times) - min(c.times)) * 1e3
            peak = "" if c.peak_mib != c.peak_mib else f"   peak +{c.peak_mib:,.0f} MiB"  # NaN on CPU
            rate = ""
            if c.train:  # MFU: 4 × non-embedding parameters × tokens (forward 2, backward through activations 2)
                rate = f"   {tokens / med[c.name] * 1e3:9,.0f} tokens/s"
                if args.device.startswith("cuda"):
                    flops_per_s = 4 * c.non_embedding * tokens / (med[c.name] / 1e3)
                    rate += f"   MFU {flops_per_s / (args.peak_tflops * 1e12):6.1%}"
            print(f"  {c.name:26s} {med[c.name]:9.2f} ms   spread {spread:8.2f}   trainable {c.trainable:>10,d}"
                  f"{rate}{peak}")
    sfx = " (compiled)" if "compile" in title else ""
    for num, den, label, target in (
        ("mtl_lora", "peft_lora", "MTL-LoRA step / PEFT LoRA step", "<= 1.10" if sfx else "<= 1.05"),
        ("reference", "mtl_lora", "speed-up over the reference approach", ">= 2 GPU"),
        ("unmerged", "merged", "unmerged mixed-batch scoring / merged forward", "<= 1.10"),
    ):
        keys = [k + ("/compile" if sfx else "") for k in (num, den)]
        if all(k in med for k in keys):
            print(f"  {label + sfx:58s} {med[keys[0]] / med[keys[1]]:6.3f}   target {target}")


def case_builders(args) -> dict[str, tuple]:
    """name -> (builder, trains): every timed case, plus the layer's update paths forced (--paths)."""
    builders = {"peft_lora": (with_peft, True), "mtl_lora": (with_mtl_lora, True),
                "reference": (with_reference, True), "merged": (with_merged, False),
                "unmerged": (with_mtl_lora, False)}
    for path in filter(None, args.paths.split(",")):  # the layer's two update paths, forced
        builders[f"mtl_lora[{path}]"] = (lambda base, args, path=path: with_mtl_lora(base, args, path), True)
        builders[f"unmerged[{path}]"] = (lambda base, args, path=path: with_mtl_lora(base, args, path), False)
    return builders


def make_case(name: str, compiled: bool, builders: dict, base: nn.Module, batch, args) -> Case | None:
    """Build one case (compiled: --compile-scope, fullgraph) and warm it up; None, with the trace, if it fails."""
    build, train = builders[name]
    label = name + ("/compile" if compiled else "")
    try:
        model, set_ids = build(base, args)
        if compiled:
            opts = {"fullgraph": True, "mode": None if args.compile_mode == "default" else args.compile_mode}
            if args.compile_scope == "model":  # the whole forward: one graph (0 breaks), its backward
                model.compile(**opts)
            else:
                for block in blocks(model):
                    block.compile(**opts)
        case = Case(label, model, set_ids, train, args)
        graphs = _compiled_graphs()
        spent = case.warm(batch, args.warmup + (1 if compiled else 0))
        extra = f", compile included, {_compiled_graphs() - graphs} graphs" if compiled else ""
        print(f"  {label}: ready ({spent:.1f} s warm-up{extra})")
        return case
    except Exception:
        print(f"  {label}: failed\n{traceback.format_exc()}")
        return None


def _profile(cases: list[Case], names: list[str], batch) -> None:
    try:
        profile_cases(cases, names, batch)
    except Exception:
        print(f"profiling failed\n{traceback.format_exc()}")


def run_compiled(builders: dict, base: nn.Module, batch, args, start: float) -> None:
    """The --compile-cases compiled, in order, until --time-budget is spent; then their rounds."""
    scope = "the whole model, fullgraph" if args.compile_scope == "model" else "each transformer block"
    print(f"\n-- torch.compile ({scope}, mode {args.compile_mode}) --")
    compiled: list[Case] = []
    for name in args.compile_cases.split(","):
        if args.time_budget and time.perf_counter() - start > args.time_budget:
            print(f"  {name}/compile: skipped, time budget of {args.time_budget:.0f} s spent")
            continue
        case = make_case(name.strip(), True, builders, base, batch, args)
        if case is not None:
            compiled.append(case)
    if compiled:
        run_rounds(compiled, batch, args, "torch.compile")
        if args.profile:
            _profile(compiled, [n + "/compile" for n in args.profile.split(",")], batch)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_float32_matmul_precision("high")
    torch._dynamo.config.recompile_limit = 64  # every case shares the decoder block's code object
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, preset {args.preset}, "
          f"batch {args.batch} x {args.seq}, tasks {args.tasks}, r {args.rank}, n {args.n_up}, "
          f"threads {torch.get_num_threads()}")
    base = build_base(args)
    batch = make_batch(args, base.config.vocab_size)
    builders = case_builders(args)
    try:
        check_agreement(base, args, batch)
    except Exception:
        print(f"agreement check failed\n{traceback.format_exc()}")
    if args.ops:  # the CPU-side proxies: operations dispatched per step, next to PEFT LoRA
        try:
            adapter_ops.report(args, base, batch, explain_graphs=args.explain)
        except Exception:
            print(f"operation counts failed\n{traceback.format_exc()}")
    print("\n-- eager --")
    eager = [c for c in (make_case(n, False, builders, base, batch, args) for n in builders) if c is not None]
    run_rounds(eager, batch, args, "eager")
    if args.profile:
        _profile(eager, args.profile.split(","), batch)
    if args.compile:
        del eager
        run_compiled(builders, base, batch, args, start)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
