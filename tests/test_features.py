"""Tokenised features: exact tokenizer output per row, dynamic padding, cache hits, a tiny model on top."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import features.tokenize as tokenize_mod
from features.tokenize import ad_text, build_features
from kernel.config import SyntheticConfig, config_from_dict
from kernel.errors import UnknownScenario
from kernel.task_map import TaskMap
from modeling.base import resolve_model_path
from modeling.model import build_model
from pipeline.synthetic import generate

TASKS = TaskMap(["de", "jp", "uk", "us"])


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("minilm"))


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pa.Table:
    path = generate(tmp_path_factory.mktemp("f") / "s.parquet", SyntheticConfig(rows_per_scenario=60, seed=4))
    t = pq.read_table(path)
    weights = pa.array(np.linspace(0.5, 2.0, t.num_rows, dtype=np.float32))
    return t.append_column("weight", weights)


def test_ad_text_joins_nonempty_parts():
    t = pa.table({"title": ["T1", "T2", "T3"], "description": ["D1", "", None], "url": ["u1", "u2", ""]})
    assert ad_text(t).to_pylist() == ["T1 | D1 | u1", "T2 | u2", "T3"]
    assert ad_text(t.select(["title"])).to_pylist() == ["T1", "T2", "T3"]


def test_features_are_the_tokenizers_pair_encoding(table, tokenizer):
    fs = build_features(table, tokenizer, TASKS, max_length=24, batch_size=50)
    assert len(fs) == table.num_rows
    ads = ad_text(table).to_pylist()
    for i in range(0, table.num_rows, 7):
        enc = tokenizer(table["query"][i].as_py(), ads[i], truncation=True, max_length=24)
        assert fs.table["input_ids"][i].as_py() == enc["input_ids"]
        assert fs.table["token_type_ids"][i].as_py() == enc["token_type_ids"]
        assert fs.lengths[i] == len(enc["input_ids"]) <= 24
    assert np.array_equal(fs.task_ids, TASKS.ids(table["scenario"]))
    assert np.array_equal(fs.labels, table["label"].to_numpy().astype(np.float32))
    assert fs.table.schema.field("input_ids").type == pa.list_(pa.int32())


def test_collate_pads_to_the_longest_row_of_the_batch(table, tokenizer):
    fs = build_features(table, tokenizer, TASKS, max_length=40)
    rng = np.random.default_rng(0)
    pad = tokenizer.pad_token_id
    for _ in range(5):
        idx = rng.choice(len(fs), size=9, replace=False)
        b = fs.collate(idx, pad)
        width = int(fs.lengths[idx].max())
        assert b["input_ids"].shape == b["attention_mask"].shape == b["token_type_ids"].shape == (9, width)
        assert all(b[k].dtype == torch.long for k in ("input_ids", "attention_mask", "token_type_ids", "task_ids"))
        assert b["labels"].dtype == b["weights"].dtype == torch.float32
        assert np.array_equal(b["attention_mask"].sum(1).numpy(), fs.lengths[idx])
        for row, i in enumerate(idx):
            n = fs.lengths[i]
            assert b["input_ids"][row, :n].tolist() == fs.table["input_ids"][int(i)].as_py()
            assert (b["input_ids"][row, n:] == pad).all() and (b["token_type_ids"][row, n:] == 0).all()
        assert np.allclose(b["weights"].numpy(), table["weight"].to_numpy()[idx])
    assert fs.collate(np.array([], dtype=np.int64), pad)["input_ids"].shape == (0, 0)


def test_cache_hit_skips_tokenising_and_the_key_tracks_its_inputs(table, tokenizer, tmp_path, monkeypatch):
    first = build_features(table, tokenizer, TASKS, max_length=32, cache_dir=tmp_path)
    assert len([p for p in tmp_path.iterdir()]) == 1

    def no_tokenising(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenise")

    with monkeypatch.context() as m:
        m.setattr(tokenize_mod, "_tokenize", no_tokenising)
        again = build_features(table, tokenizer, TASKS, max_length=32, cache_dir=tmp_path)
        rechunked = pa.Table.from_batches(table.to_batches(max_chunksize=17))  # same content, other chunks
        build_features(rechunked, tokenizer, TASKS, max_length=32, cache_dir=tmp_path)
    assert again.table.equals(first.table)
    build_features(table, tokenizer, TASKS, max_length=16, cache_dir=tmp_path)
    build_features(table.slice(1), tokenizer, TASKS, max_length=32, cache_dir=tmp_path)
    build_features(table, tokenizer, TaskMap(["us", "uk", "jp", "de"]), max_length=32, cache_dir=tmp_path)
    entries = [p for p in tmp_path.iterdir()]
    assert len(entries) == 4 and all((p / "manifest.json").is_file() for p in entries)


def test_unknown_scenario_is_named(table, tokenizer):
    with pytest.raises(UnknownScenario, match="fr"):
        build_features(table.set_column(5, "scenario", pa.array(["fr"] * table.num_rows)), tokenizer, TASKS, 16)


def test_tokenizer_without_token_types():
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "red": 4, "shoes": 5, "Acme": 6, "|": 7}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A </s> $B",
                                                      special_tokens=[("<s>", 2), ("</s>", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  model_input_names=["input_ids", "attention_mask"])
    t = pa.table({"query": ["red shoes", "shoes"], "title": ["Acme shoes", "Acme"], "description": ["", "red"],
                  "url": ["", ""], "label": pa.array([1, 0], pa.int8()), "scenario": ["us", "us"]})
    fs = build_features(t, tok, TASKS, max_length=16)
    assert "token_type_ids" not in fs.table.column_names
    b = fs.collate(np.array([1, 0]), pad_id=0)
    assert "token_type_ids" not in b
    assert b["input_ids"].tolist() == [[2, 5, 3, 6, 7, 4], [2, 4, 5, 3, 6, 5]]
    assert b["weights"].tolist() == [1.0, 1.0]


def test_a_padded_batch_scores_like_each_row_alone(table, tokenizer, tiny_bert):
    cfg = config_from_dict({"model": {"init": "random", "pooling": "mean", "random_config": tiny_bert}})
    model = build_model(cfg, num_tasks=len(TASKS)).eval()
    fs = build_features(table, tokenizer, TASKS, max_length=48)
    # The shortest row and each scenario's longest: lengths and task ids mixed in one batch.
    longest = [int(np.flatnonzero(fs.task_ids == t)[np.argmax(fs.lengths[fs.task_ids == t])]) for t in range(4)]
    idx = np.array([int(np.argmin(fs.lengths))] + longest)
    with torch.no_grad():
        b = fs.collate(idx, tokenizer.pad_token_id)
        together = model(b["input_ids"], b["attention_mask"], b["task_ids"], b["token_type_ids"])
        alone = []
        for i in idx:
            one = fs.collate(np.array([i]), tokenizer.pad_token_id)
            alone.append(model(one["input_ids"], one["attention_mask"], one["task_ids"], one["token_type_ids"]))
    assert together.shape == (len(idx),)
    assert torch.allclose(together, torch.cat(alone), atol=1e-5)
    assert sorted(set(b["task_ids"].tolist())) == [0, 1, 2, 3]


def test_unlabelled_rows_for_scoring_get_nan_labels(tokenizer):
    t = pa.table({"query": ["a", "b"], "title": ["x", "y"], "scenario": ["us", "de"],
                  "label": pa.nulls(2, pa.int8())})
    for table in (t, t.drop_columns(["label"])):
        fs = build_features(table, tokenizer, TASKS, max_length=16)
        assert np.isnan(fs.labels).all() and fs.task_ids.tolist() == [3, 0]
        assert torch.isnan(fs.collate(np.array([1, 0]), tokenizer.pad_token_id)["labels"]).all()
