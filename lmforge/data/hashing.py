"""Deterministic, vectorised hashing of words and n-grams (shared by MinHash, Bloom and
decontamination). Python's `hash()` is salted per process, so it cannot be used across workers.

Each word gets a 32-bit CRC; an n-gram's 64-bit hash combines its words' hashes as a polynomial
(computed for all positions at once with numpy, wrapping mod 2^64), then goes through the splitmix64
finaliser so that every output bit depends on every input bit.
"""

from __future__ import annotations

import re
import unicodedata
import zlib

import numpy as np

_WORD = re.compile(r"\w+")
_P = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime, used as the polynomial base


def nfkc(text: str) -> str:
    """Unicode NFKC form of a non-ASCII text (an ASCII one is its own). Without it a text and its decomposed (NFD)
    copy -- the same characters on screen -- shared no word with an accent: "naïve" spelled n a i U+0308 v e read as
    the words "nai" and "ve", so the copy was no near-duplicate and a decomposed copy of an eval item matched 2 of
    its 18 8-grams. The compatibility forms fold full-width letters, ligatures (ﬁ) and superscripts too."""
    return text if text.isascii() else unicodedata.normalize("NFKC", text)


def normalize_words(text: str, lowercase: bool = True) -> list[str]:
    """Words as the dedup stages see them: lowercased runs of letters/digits (punctuation dropped), of the text's
    NFKC form (`nfkc`)."""
    text = nfkc(text)
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
    """uint64 hashes of character n-grams (code points of the NFKC form, lowercased, whitespace collapsed)."""
    s = " ".join(nfkc(text).lower().split())
    cps = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    return ngram_hashes(cps, n)


def text_ngram_hashes(text: str, n: int, unit: str = "word") -> np.ndarray:
    """Distinct (sorted) n-gram hashes of a text: its shingle set."""
    h = ngram_hashes(word_hashes(normalize_words(text)), n) if unit == "word" else char_ngram_hashes(text, n)
    return np.unique(h)


_BYTES = np.arange(256)
_IS_WORD = (_BYTES >= 0x80) | ((_BYTES | 0x20) >= 97) & ((_BYTES | 0x20) <= 122) | ((_BYTES >= 48) & (_BYTES <= 57)) \
    | (_BYTES == 95)
# bytes.translate table: ASCII letters lowercased, other word bytes kept, every other byte a space. Non-ASCII
# bytes count as word bytes because _block_word_ngram_hashes only lets them through inside normalized words.
_TO_SPACES = bytes((c | 0x20 if 65 <= c <= 90 else c) if _IS_WORD[c] else 32 for c in range(256))
_P_INV = np.uint64(pow(int(_P), -1, 2**64))
_POWERS: dict[str, np.ndarray] = {}


def power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^i and P^-i mod 2^64 for i < n (memoised, grown by doubling)."""
    if len(_POWERS.get("p", ())) < n:
        m = max(n, 2 * len(_POWERS.get("p", ())), 1 << 16)
        with np.errstate(over="ignore"):
            for key, base in (("p", _P), ("inv", _P_INV)):
                t = np.full(m, base, dtype=np.uint64)
                t[0] = 1
                _POWERS[key] = np.cumprod(t, dtype=np.uint64)
    return _POWERS["p"], _POWERS["inv"]


def batch_word_ngram_hashes(texts: list[str], n: int, block_chars: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Word n-gram hashes of many texts, processed in blocks of about `block_chars` characters so the
    byte-level arrays stay in cache (about 2x faster than one pass over a large batch)."""
    hashes, counts = [], []
    i = 0
    while i < len(texts):
        j, size = i, 0
        while j < len(texts) and (j == i or size + len(texts[j]) <= block_chars):
            size += len(texts[j])
            j += 1
        h, c = _block_word_ngram_hashes(texts[i:j], n)
        hashes.append(h)
        counts.append(c)
        i = j
    if not texts:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    return np.concatenate(hashes), np.concatenate(counts)


def _block_word_ngram_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Word n-gram hashes of many texts in one pass of numpy operations over their UTF-8 bytes.

    Words are those of `normalize_words` (lowercased runs of Unicode letters/digits/underscore). An
    ASCII text is read as it is: there word characters are [A-Za-z0-9_] and lowercasing is the byte
    table's. Any other text is first rewritten as its normalized words joined by spaces, so that curly
    quotes, dashes, no-break spaces and the like split words and accented capitals are lowercased
    (byte-level rules cannot see either); after that every non-ASCII byte lies inside a word. Only
    non-ASCII texts pay for the regex (running it on all of an ASCII corpus made shingling ~3.7x
    slower, 2026-12 on the 2-core dev box). A word's hash is sum_k b_k P^k over its bytes, read off one
    prefix sum of the whole buffer: (S[end] - S[start]) P^-start, with P odd hence invertible mod 2^64.
    Returns (hashes, counts): the hashes of all documents concatenated in order (duplicates kept:
    MinHash of a multiset equals that of its set) and the number belonging to each document. A
    document with 1..n-1 words gets one hash of all its words.
    """
    texts = [t if t.isascii() else " ".join(normalize_words(t)) for t in texts]
    joined = "\x00".join(texts)
    buf = (b" " + joined.encode("utf-8", "surrogatepass") + b" ")
    a = np.frombuffer(buf, dtype=np.uint8)
    seps = np.flatnonzero(a == 0)  # document boundaries (NUL never occurs inside a text, checked)
    if len(seps) != len(texts) - 1 and texts:
        seps = np.cumsum([len(t.encode("utf-8", "surrogatepass")) + 1 for t in texts[:-1]], dtype=np.int64)
    a = np.frombuffer(buf.translate(_TO_SPACES), dtype=np.uint8)
    pw, inv = power_tables(len(a))
    isword = a != 32
    # the buffer starts and ends with a space, so word/space transitions alternate start, end, ...
    edges = np.flatnonzero(isword[1:] != isword[:-1]) + 1
    starts, ends = edges[0::2], edges[1::2]  # first byte of each word, one past its last
    prefix = np.empty(len(a), dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.multiply(a, pw[: len(a)], out=prefix)
        np.cumsum(prefix, out=prefix)  # S[i] = sum_{k<=i} a_k P^k
        wh = mix64((prefix[ends - 1] - prefix[starts - 1]) * inv[starts])
    word_doc = np.searchsorted(seps, starts, side="right")
    words_per_doc = np.bincount(word_doc, minlength=len(texts))
    m = max(len(wh) - n + 1, 0)
    acc = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            acc = acc * _P + wh[j:j + m] + np.uint64(1)
    keep = word_doc[:m] == word_doc[n - 1:n - 1 + m]
    hashes, hash_doc = mix64(acc[keep]), word_doc[:m][keep]
    short = np.flatnonzero((words_per_doc > 0) & (words_per_doc < n))
    if len(short):  # documents with fewer than n words: one hash of the whole word sequence
        first_word = np.concatenate([[0], np.cumsum(words_per_doc)[:-1]])
        extra = [ngram_hashes(wh[first_word[d]:first_word[d] + words_per_doc[d]], n) for d in short]
        hashes = np.concatenate([hashes, *extra])
        hash_doc = np.concatenate([hash_doc, short])
        order = np.argsort(hash_doc, kind="stable")
        hashes, hash_doc = hashes[order], hash_doc[order]
    return hashes, np.bincount(hash_doc, minlength=len(texts))
