"""The pair format: a tokenizer without a pair template still sees where the query ends and the ad begins,
the same way in training, export and scoring."""
from __future__ import annotations

import itertools

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kernel.config import ServingConfig, SyntheticConfig
from modeling.base import resolve_model_path
from modeling.pairs import encode_pairs, longest_first, resolve_pair_format, separates_pairs
from pipeline.synthetic import generate
from serving.scoring.scorer import BatchScorer
from tests.serving_testkit import canonical, export, sigmoid, trained_folder, training_logits, wdc_raw


@pytest.fixture(scope="module")
def decoder_tokenizer_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer in the style of GPT-2/SmolLM2: no pair template, EOS but no pad."""
    corpus = pq.read_table(generate(tmp_path_factory.mktemp("c") / "s.parquet", SyntheticConfig(300, seed=1)))
    wdc = wdc_raw(per_category=40)
    texts = corpus["query"].to_pylist() + corpus["title"].to_pylist() + wdc["left"].to_pylist() + wdc["right"].to_pylist()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  model_input_names=["input_ids", "attention_mask"])
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return out


def test_longest_first_cuts_like_one_token_at_a_time():
    for q, a, budget in itertools.product(range(9), range(9), range(12)):
        qq, aa = q, a  # the reference loop: drop a token from the longer side (a tie: from the ad)
        while qq + aa > budget:
            if qq > aa:
                qq -= 1
            else:
                aa -= 1
        got = longest_first(np.array([q]), np.array([a]), budget)
        assert (int(got[0][0]), int(got[1][0])) == (qq, aa), (q, a, budget)


def test_a_tokenizer_without_pair_template_gets_the_text_format(decoder_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(decoder_tokenizer_dir)
    assert not separates_pairs(tok)  # tok(q, ad) would join the two id lists
    assert separates_pairs(AutoTokenizer.from_pretrained(resolve_model_path("minilm")))
    fmt = resolve_pair_format(tok, "auto")
    assert fmt.kind == "text" and resolve_pair_format(tok, "template").kind == "template"
    ids, types = encode_pairs(tok, ["cheap running shoes"], ["Nike Air Zoom | sports"], 64, fmt, with_types=True)
    assert tok.decode(ids[0]) == "Query: cheap running shoes\nAd: Nike Air Zoom | sports"
    assert types == [[0] * len(ids[0])]
    # Truncation keeps both sides and the labels between them, within max_length.
    long_q, long_ad = "red shoes " * 40, "blue running sneakers " * 40
    ids, _ = encode_pairs(tok, [long_q, "x"], [long_ad, long_ad], 24, fmt)
    assert all(len(x) == 24 for x in ids)
    text = tok.decode(ids[0])
    assert text.startswith("Query: red") and "\nAd: blue" in text
    with pytest.raises(ValueError, match="no room"):
        encode_pairs(tok, ["q"], ["a"], 4, fmt)


def test_training_export_and_scoring_share_the_text_format(tmp_path, decoder_tokenizer_dir):
    vocab = len(AutoTokenizer.from_pretrained(decoder_tokenizer_dir))
    model_dir = trained_folder(tmp_path, "last", "llama", tokenizer=str(decoder_tokenizer_dir), vocab_size=vocab)
    manifest = export(model_dir, tmp_path / "export")
    assert manifest["input"]["pair_format"]["kind"] == "text"
    table = canonical(wdc_raw(per_category=6))
    ref = sigmoid(training_logits(model_dir, table))
    scored, unknown = BatchScorer(tmp_path / "export", ServingConfig(batch_size=4), "test").score(table)
    assert unknown.num_rows == 0
    np.testing.assert_allclose(scored["score"].to_numpy(), ref, atol=1e-5, rtol=0)


def test_a_gguf_decoder_exports_a_dequantized_safetensors_base(tmp_path):
    """transformers marks a GGUF-loaded model as quantized (save_pretrained refuses); the export writes a plain
    safetensors base and ONNX graphs whose scores, like every scenario's, equal the training model's."""
    from transformers import AutoModelForSequenceClassification

    from kernel.task_map import TaskMap
    from modeling.artifact import save_trained
    from modeling.base import gguf_file
    from modeling.model import build_model
    from tests.gguf_testkit import write_tiny_gguf
    from tests.serving_testkit import tiny_config

    wdc = wdc_raw(per_category=40)
    folder = write_tiny_gguf(tmp_path / "gguf", wdc["left"].to_pylist() + wdc["right"].to_pylist())
    cfg = tiny_config(tmp_path, "last", "llama")
    cfg.model.init, cfg.model.path, cfg.model.tokenizer, cfg.model.random_config = "pretrained", str(folder), "", {}
    assert gguf_file(cfg) == "tiny-llama.gguf"  # the folder's one .gguf file, found without being named
    model = build_model(cfg, 3)
    assert getattr(model.backbone, "hf_quantizer", None) is None
    model_dir = save_trained(model, cfg, TaskMap(["cameras", "computers", "shoes"]), {}, tmp_path / "model")
    manifest = export(model_dir, tmp_path / "export", overrides=["serving.onnx.export=true"])
    base = tmp_path / "export" / "base"
    assert (base / "model.safetensors").is_file() and "quantization_config" not in (base / "config.json").read_text()
    assert manifest["input"]["pair_format"]["kind"] == "text"
    AutoModelForSequenceClassification.from_pretrained(base)  # a plain checkpoint: no gguf needed to load it
    table = canonical(wdc_raw(per_category=4))
    ref = sigmoid(training_logits(model_dir, table))
    for engine in ("torch", "onnxruntime"):  # the decoder's merged graphs too (ONNX Runtime, fp32)
        scored, _ = BatchScorer(tmp_path / "export", ServingConfig(batch_size=4, engine=engine), "test").score(table)
        np.testing.assert_allclose(scored["score"].to_numpy(), ref, atol=1e-5)
