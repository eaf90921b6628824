"""What many tests share: the repository's paths, the real WDC data beside it, the tiny model configs.

The tiny configs are random-init transformers built from a config (2 layers, hidden 32), so tests run in
seconds; ``tests/conftest.py`` hands them out as fixtures.
"""
from __future__ import annotations

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
