"""Deterministic, vectorised hashing of words and n-grams (shared by MinHash, Bloom and
decontamination). Python's `hash()` is salted per process, so it cannot be used across workers.

Each word gets a 32-bit CRC; an n-gram's 64-bit hash combines its words' hashes as a polynomial
(computed for all positions at once with numpy, wrapping mod 2^64), then goes through the splitmix64
finaliser so that every output bit depends on every input bit.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

_WORD = re.compile(r"\w+")
_P = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime, used as the polynomial base


def normalize_words(text: str, lowercase: bool = True) -> list[str]:
    """Words as the dedup stages see them: lowercased runs of letters/digits (punctuation dropped)."""
    return _WORD.findall(text.lower() if lowercase else text)


def word_hashes(words: list[str]) -> np.ndarray:
    """(len(words),) uint64: CRC32 of each word's UTF-8 bytes."""
    return np.fromiter((zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in words),
                       dtype=np.uint64, count=len(words))


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (Steele et al. 2014), elementwise on uint64."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def ngram_hashes(wh: np.ndarray, n: int) -> np.ndarray:
    """(max(len-n+1, 1 if len else 0),) uint64 hashes of consecutive n-grams of word hashes `wh`.
    Texts shorter than n words give one hash of the whole text, so they can still match."""
    if len(wh) == 0:
        return np.zeros(0, dtype=np.uint64)
    n_eff = min(n, len(wh))
    m = len(wh) - n_eff + 1
    acc = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n_eff):
            acc = acc * _P + wh[j:j + m] + np.uint64(1)
    return mix64(acc)


def char_ngram_hashes(text: str, n: int) -> np.ndarray:
    """uint64 hashes of character n-grams (code points, whitespace collapsed)."""
    s = " ".join(text.lower().split())
    cps = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    return ngram_hashes(cps, n)


def text_ngram_hashes(text: str, n: int, unit: str = "word") -> np.ndarray:
    """Distinct (sorted) n-gram hashes of a text: its shingle set."""
    h = ngram_hashes(word_hashes(normalize_words(text)), n) if unit == "word" else char_ngram_hashes(text, n)
    return np.unique(h)
