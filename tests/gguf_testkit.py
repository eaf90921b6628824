"""A tiny LLaMA written as a GGUF file (fp32 tensors, a byte-level BPE tokenizer in its metadata), so that the
decoder path that SmolLM2 takes (transformers' GGUF loader) runs in seconds. Not a test module."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
EOT = "<|endoftext|>"


def _bpe(texts: list[str], vocab_size: int = 400) -> tuple[list[str], list[str]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(tk.to_str())
    tokens = [t for t, _ in sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["model"]["merges"]]
    return tokens, merges


def write_tiny_gguf(folder: Path, texts: list[str], name: str = "tiny-llama.gguf") -> Path:
    """<folder>/<name>: a random 2-layer LLaMA whose tokenizer was trained on ``texts``; returns the folder."""
    import gguf

    folder.mkdir(parents=True, exist_ok=True)
    tokens, merges = _bpe(texts)
    w = gguf.GGUFWriter(str(folder / name), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")  # byte-level BPE, as SmolLM2's: no pair template
    w.add_token_list(tokens)
    w.add_token_types([3 if t == EOT else 1 for t in tokens])  # 3: control token
    w.add_token_merges(merges)
    for add in (w.add_bos_token_id, w.add_eos_token_id, w.add_pad_token_id):
        add(tokens.index(EOT))
    rng = np.random.default_rng(0)

    def tensor(key: str, *shape: int) -> None:
        w.add_tensor(key, (0.05 * rng.standard_normal(shape)).astype(np.float32))

    kv = HIDDEN // HEADS * KV_HEADS
    tensor("token_embd.weight", len(tokens), HIDDEN)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        for key, shape in (("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (kv, HIDDEN)), ("attn_v", (kv, HIDDEN)),
                           ("attn_output", (HIDDEN, HIDDEN)), ("ffn_gate", (INTER, HIDDEN)),
                           ("ffn_up", (INTER, HIDDEN)), ("ffn_down", (HIDDEN, INTER))):
            tensor(f"blk.{i}.{key}.weight", *shape)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    tensor("output.weight", len(tokens), HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return folder
