"""Scoring a main-content extraction against snippet annotations (the method of trafilatura's own
evaluation): per page, snippets that must appear ("with": headline, body, lists, tables) and
snippets that must not ("without": comments, related boxes, share widgets, sidebars, navigation).
A found "with" snippet is a true positive, a missing one a false negative, a found "without"
snippet a false positive. bench/extract_eval.py and the tests use it on bench/extract_annotations.json.
"""

from __future__ import annotations

import unicodedata
from typing import Iterable


def normalize(text: str) -> str:
    """NFC, soft hyphens removed, whitespace collapsed: snippets match across line breaks."""
    return " ".join(unicodedata.normalize("NFC", text).replace("\u00ad", "").split())


def score(text: str, wanted: Iterable[str], unwanted: Iterable[str]) -> dict[str, int]:
    """{tp, fn, fp, tn} of one extraction."""
    t = normalize(text)
    found = [normalize(s) in t for s in wanted]
    leaked = [normalize(s) in t for s in unwanted]
    return {"tp": sum(found), "fn": len(found) - sum(found), "fp": sum(leaked), "tn": len(leaked) - sum(leaked)}


def precision_recall_f1(counts: dict[str, int]) -> dict[str, float]:
    p = counts["tp"] / max(counts["tp"] + counts["fp"], 1)
    r = counts["tp"] / max(counts["tp"] + counts["fn"], 1)
    return {"precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-12)}


def total(per_page: Iterable[dict[str, int]]) -> dict[str, int]:
    out = {"tp": 0, "fn": 0, "fp": 0, "tn": 0}
    for c in per_page:
        for k in out:
            out[k] += c[k]
    return out
