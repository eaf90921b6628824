"""Shared by the monitoring tests: the real WDC data and a real, weak relevance model to score it with."""
from __future__ import annotations

import re

import numpy as np

from tests.shared import WDC

DATA = WDC
CATEGORIES = ("cameras", "computers", "shoes", "watches")


def overlap_scores(left: list[str], right: list[str]) -> np.ndarray:
    """A real, weak relevance model in [0, 1]: the mean of two Jaccard overlaps of the offer texts, over
    alphanumeric tokens and over model-code tokens (those holding a digit, e.g. "a2300")."""
    def jaccard(a: set, b: set) -> float:
        return len(a & b) / max(len(a | b), 1)

    out = np.empty(len(left))
    for i, (a, b) in enumerate(zip(left, right)):
        ta, tb = set(re.findall(r"[a-z0-9]+", a.lower())), set(re.findall(r"[a-z0-9]+", b.lower()))
        codes_a = {t for t in ta if any(c.isdigit() for c in t)}
        codes_b = {t for t in tb if any(c.isdigit() for c in t)}
        out[i] = 0.5 * jaccard(ta, tb) + 0.5 * jaccard(codes_a, codes_b)
    return out
