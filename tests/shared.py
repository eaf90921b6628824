"""What many tests share: the repository's paths, the real WDC data beside it, the tiny models and batches.

The tiny configs are random-init transformers built from a config (2 layers, hidden 32), so tests run in
seconds; ``tests/conftest.py`` hands them out as fixtures.
"""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
# <repo>/../shared/data/wdc_products: product-offer pairs (left, right, label, category) per category.
WDC = REPO.parent / "shared" / "data" / "wdc_products"

BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "vocab_size": 30522}
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 30522, "pad_token_id": 0}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def tiny_adapted_model(random_config: dict, pooling: str, targets: list[str], num_tasks: int, *, dtype=None,
                       **adapter):
    """A tiny random-init ``RelevanceModel`` whose ``targets`` carry adapters, built as the product builds it
    (``modeling.model.build_model`` from a config); ``adapter`` gives further ``adapter.*`` keys (method, r, ...)."""
    import copy

    import torch

    from kernel.config import config_from_dict
    from modeling.model import build_model

    cfg = config_from_dict({
        "model": {"init": "random", "pooling": pooling, "random_config": copy.deepcopy(random_config)},
        "adapter": {"targets": list(targets), **adapter},
    })
    return build_model(cfg, num_tasks, dtype=dtype or torch.float32)


def padded_batch(model, rows: int = 6, length: int = 7, min_length: int = 2, seed: int = 0):
    """(ids, mask), (rows, length): random token ids right-padded with the model's pad id after each row's
    random length (min_length..length tokens), and the attention mask that goes with them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pad = model.backbone.config.pad_token_id
    ids = torch.randint(3, 1000, (rows, length), generator=g)
    lengths = torch.randint(min_length, length + 1, (rows,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).long()
    return torch.where(mask.bool(), ids, torch.full_like(ids, pad)), mask


def randomize_adapters(model, seed: int = 1, zero_b: bool = False) -> None:
    """Move every adapter parameter off its init, so each task's update is distinct and non-zero.

    A keeps its (random) init; B gets N(0, 0.2²), Λ and w a random perturbation: updates of a size a
    trained adapter has, so the tiny models stay well conditioned (bf16 comparisons stay meaningful).
    """
    import torch

    from modeling.inject import adapter_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for name, p in layer.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g).to(p.dtype)
                if name == "B" and not zero_b:
                    p.copy_(0.2 * noise)
                elif name in ("lam", "w"):
                    p.add_(0.5 * noise)


# One line of kernel.logs' text format: time, level, [step], message.
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) "
                      r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) +\[([^\]]+)\] (.*)$")


def log_message(line: str) -> str | None:
    """The message of a text-format log line (None for any other line)."""
    m = LOG_LINE.match(line.rstrip("\n"))
    return m.group(4) if m else None


def log_messages(text: str) -> list[str]:
    """The messages of every text-format log line in ``text``."""
    return [m for m in map(log_message, text.splitlines()) if m is not None]
