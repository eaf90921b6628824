"""How a (query, ad text) pair becomes one token sequence: the tokenizer's pair template, or a text format.

    fmt = resolve_pair_format(tokenizer, "auto")         # PairFormat(kind="template") for BERT-style tokenizers
    ids, types = encode_pairs(tokenizer, queries, ads, max_length=128, fmt=fmt)

Encoder tokenizers (BERT, MiniLM, ...) have a pair template that puts a separator between the two texts
(``[CLS] q [SEP] ad [SEP]``, token types 0/1). Many decoder tokenizers (GPT-2 style byte-level BPE, such as
SmolLM2's) have none: ``tokenizer(q, ad)`` simply joins the two id lists, and the query/ad boundary is lost
(``'cheap running shoesNike Air Zoom'``). For those the pair is written out as text::

    <the tokenizer's own special prefix> "Query: " q "\\nAd: " ad <its own special suffix>

Query and ad are tokenised on their own (no special tokens), cut "longest first" to fit ``max_length``
(the longer side loses a token until both fit; a tie costs the ad), then joined with the tokenised labels.
Token types, when the model takes them, are all 0. Training, export and scoring all encode through
``encode_pairs``, and the export manifest records the resolved format (``PairFormat.describe``).

``kind``: "auto" (template when the tokenizer separates a pair, else text), "template" or "text".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("auto", "template", "text")
QUERY_LABEL = "Query: "
AD_LABEL = "\nAd: "


@dataclass(frozen=True)
class PairFormat:
    kind: str  # "template" or "text" (resolved)
    query_label: str = QUERY_LABEL
    ad_label: str = AD_LABEL

    def describe(self) -> dict:
        if self.kind == "template":
            return {"kind": "template", "call": "tokenizer(query, ad_text, truncation='longest_first')"}
        return {"kind": "text", "query_label": self.query_label, "ad_label": self.ad_label,
                "layout": "specials_prefix + ids(query_label) + ids(query) + ids(ad_label) + ids(ad_text) + "
                          "specials_suffix; query and ad_text cut longest-first (tie: ad_text) to max_length"}


def pair_format_from(description: dict | None) -> PairFormat:
    """The PairFormat an export manifest recorded (``describe()``); none recorded: the template (format 1)."""
    d = description or {"kind": "template"}
    if d.get("kind") == "text":
        return PairFormat("text", d.get("query_label", QUERY_LABEL), d.get("ad_label", AD_LABEL))
    return PairFormat("template")


def separates_pairs(tokenizer) -> bool:
    """Whether ``tokenizer(a, b)`` puts anything between the ids of ``a`` and those of ``b``."""
    a = tokenizer("alpha", add_special_tokens=False)["input_ids"]
    b = tokenizer("omega", add_special_tokens=False)["input_ids"]
    pair = tokenizer("alpha", "omega")["input_ids"]
    for i in range(len(pair) - len(a) + 1):
        if pair[i:i + len(a)] == a:
            return pair[i + len(a):i + len(a) + len(b)] != b
    return True  # the template rewrote the texts themselves: trust it


def resolve_pair_format(tokenizer, kind: str = "auto") -> PairFormat:
    if kind not in KINDS:
        raise ValueError(f"features.pair_format {kind!r} is not one of {KINDS}")
    if kind == "auto":
        kind = "template" if separates_pairs(tokenizer) else "text"
    return PairFormat(kind)


def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds around a single text (e.g. BOS before, EOS after)."""
    plain = tokenizer("alpha", add_special_tokens=False)["input_ids"]
    full = tokenizer("alpha")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


def longest_first(q_len: np.ndarray, a_len: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the kept lengths of (query, ad) under "longest first" truncation to ``budget`` tokens."""
    q_len, a_len = np.asarray(q_len, np.int64), np.asarray(a_len, np.int64)
    budget = max(int(budget), 0)
    excess = np.maximum(q_len + a_len - budget, 0)
    gap = np.abs(q_len - a_len)
    from_longer = np.minimum(excess, gap)  # first the longer side comes down to the shorter one
    rest = excess - from_longer  # then both lose tokens in turn, the ad first
    q_cut = np.where(q_len > a_len, from_longer, 0) + rest // 2
    a_cut = np.where(q_len > a_len, 0, from_longer) + rest - rest // 2
    return q_len - q_cut, a_len - a_cut


def encode_pairs(tokenizer, queries: list[str], ads: list[str], max_length: int, fmt: PairFormat,
                 with_types: bool = False) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token ids (and token types when ``with_types``) of each (query, ad) pair under ``fmt``."""
    if fmt.kind == "template":
        enc = tokenizer(queries, ads, truncation=True, max_length=max_length, return_attention_mask=False,
                        return_token_type_ids=with_types)
        return enc["input_ids"], enc["token_type_ids"] if with_types else None
    q_ids = tokenizer(queries, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(ads, add_special_tokens=False)["input_ids"]
    pre, post = _special_affixes(tokenizer)
    q_label = tokenizer(fmt.query_label, add_special_tokens=False)["input_ids"]
    a_label = tokenizer(fmt.ad_label, add_special_tokens=False)["input_ids"]
    fixed = len(pre) + len(post) + len(q_label) + len(a_label)
    if fixed >= max_length:
        raise ValueError(f"features.max_length {max_length} leaves no room for text: the pair format itself "
                         f"takes {fixed} tokens")
    q_keep, a_keep = longest_first([len(q) for q in q_ids], [len(a) for a in a_ids], max_length - fixed)
    ids = [pre + q_label + q[:qk] + a_label + a[:ak] + post
           for q, a, qk, ak in zip(q_ids, a_ids, q_keep.tolist(), a_keep.tolist())]
    return ids, ([[0] * len(x) for x in ids] if with_types else None)
