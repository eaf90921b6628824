"""The demo data: deterministic, 20-30% positives, and labels that follow each market's rule as read from
the text alone (so a text model can learn them), rules that differ between markets."""
from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from kernel.config import SyntheticConfig
from pipeline import synthetic
from pipeline.synthetic import BRANDS, MARKETS, PRICE_INTENT, PRODUCTS, SHIPPING, generate, main

SYNONYMS = sorted(((s, i) for i, p in enumerate(PRODUCTS) for s in p), key=lambda x: -len(x[0]))
PRICE = re.compile(r"(Now|From|Sale:|Only) [$£€¥]\d+|Save \d+%")


def product_of(text: str) -> int:
    text = text.lower()
    return next(i for s, i in SYNONYMS if s in text)


def brand_of(text: str) -> str | None:
    words = set(text.lower().split())
    found = [b for b in BRANDS if b.lower() in words]
    return found[0] if found else None


def text_rules(row: dict) -> dict[str, bool]:
    """Every market's label for one row, computed only from what the row's text shows."""
    q, title, desc, url = row["query"], row["title"], row["description"], row["url"]
    product_match = product_of(q) == product_of(title)
    q_brand = brand_of(q)
    brand_match = q_brand is not None and title.split()[0] == q_brand
    price_intent = any(re.search(rf"\b{re.escape(p)}\b", q) for p in PRICE_INTENT)
    has_price = PRICE.search(desc) is not None
    ships_de = any(s in desc for s in SHIPPING["de"]) or ".de/" in url
    return {
        "us": product_match and (not price_intent or has_price),
        "uk": product_match and (q_brand is None or brand_match),
        "de": product_match and ships_de,
        "jp": product_match and (has_price or brand_match),
    }


@pytest.fixture(scope="module")
def noiseless(tmp_path_factory) -> list[dict]:
    path = tmp_path_factory.mktemp("syn") / "clean.parquet"
    return pq.read_table(generate(path, SyntheticConfig(rows_per_scenario=1500, seed=11, label_noise=0.0))).to_pylist()


def test_labels_follow_each_markets_rule_as_visible_in_the_text(noiseless):
    for row in noiseless:
        assert text_rules(row)[row["scenario"]] == bool(row["label"]), row


def test_markets_genuinely_disagree_on_the_same_pairs(noiseless):
    verdicts = np.array([[text_rules(r)[m] for m in MARKETS] for r in noiseless])
    for i in range(len(MARKETS)):
        for j in range(i + 1, len(MARKETS)):
            disagreement = np.mean(verdicts[:, i] != verdicts[:, j])
            assert disagreement > 0.05, (MARKETS[i], MARKETS[j], disagreement)
    # The classic conflict: a rival-brand ad for the right product is fine in us, not in uk.
    rival = [r for r in noiseless if text_rules(r)["us"] and not text_rules(r)["uk"]]
    assert len(rival) > 50


def test_positive_rate_noise_and_shape(tmp_path):
    cfg = SyntheticConfig(rows_per_scenario=2000, seed=3, label_noise=0.1)
    table = pq.read_table(generate(tmp_path / "d.parquet", cfg))
    assert table.column_names == ["query", "title", "description", "url", "label", "scenario", "request_id", "ad_id"]
    assert str(table.schema.field("label").type) == "int8"
    rows = table.to_pylist()
    for m in MARKETS:
        labels = np.array([r["label"] for r in rows if r["scenario"] == m])
        assert len(labels) == 2000 and 0.2 <= labels.mean() <= 0.3, (m, labels.mean())
    flipped = np.mean([text_rules(r)[r["scenario"]] != bool(r["label"]) for r in rows])
    assert abs(flipped - 0.1) < 4 * np.sqrt(0.1 * 0.9 / len(rows))
    assert len({r["request_id"] for r in rows}) == len(rows)
    assert all(r["description"] == "" or r["description"].endswith(".") for r in rows)


def test_deterministic_by_seed_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK_ROWS", 500)  # several chunks per market
    cfg = SyntheticConfig(rows_per_scenario=1200, seed=5)
    a = pq.read_table(generate(tmp_path / "a.parquet", cfg))
    b = pq.read_table(generate(tmp_path / "b.parquet", cfg))
    c = pq.read_table(generate(tmp_path / "c.parquet", SyntheticConfig(rows_per_scenario=1200, seed=6)))
    assert a.equals(b) and not a.equals(c)
    assert a.num_rows == 4800 and len(set(a["request_id"].to_pylist())) == 4800


def test_cli_writes_the_file(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x.parquet"), "--rows-per-scenario", "25", "--seed", "1"]) == 0
    assert pq.read_metadata(tmp_path / "x.parquet").num_rows == 100
    assert "wrote 100 rows" in capsys.readouterr().out
