"""fastText supervised models (`.bin`, and quantized `.ftz`) read and run in numpy, with no `fasttext`
package (it does not work with NumPy 2). Predicts the same labels and probabilities as fastText for
the classifiers the field uses: lid.176 (language ID), DCLM's quality classifier, Dolma's Jigsaw
toxicity / NSFW classifiers.

A text is featurised as fastText's `Dictionary::getLine` does (Joulin et al. 2017; Bojanowski et al.
2017): whitespace tokens plus the end-of-sentence token `</s>`; an in-vocabulary word contributes its
own row and the rows of its character n-grams (minn..maxn, on "<word>"), an unknown word its n-grams
only; word n-grams up to `wordNgrams` are hashed into `bucket` rows. Hashes are 32-bit FNV-1a over the
UTF-8 bytes, each byte sign-extended as fastText's `int8_t` cast does. The hidden vector is the mean
of those input rows (float32); the output layer is a softmax, one-vs-all sigmoids (fastText's 512-entry
table sigmoid) or a hierarchical softmax over the Huffman tree of label counts. Like fastText, the
probability reported for label p is exp(log(p + 1e-5)).

A quantized input (`fasttext quantize`, Jegou et al. 2011 product quantization) stores each row as
`nsubq` one-byte codes into 256-centroid codebooks per sub-vector, optionally times a quantized norm;
rows are decoded when used. `cutoff` pruning keeps a subset of n-gram buckets (`pruneidx`).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import DataError
from lmforge.utils import once_per_file

MAGIC = 793712314
_TOKEN_CACHE = 1 << 16  # words whose features a model keeps
VERSIONS = (11, 12)  # 12 = fastText >= 0.2; 11 = older supervised files (no character n-grams)
EOS, BOW, EOW = "</s>", "<", ">"
LOSSES = {1: "hs", 2: "ns", 3: "softmax", 4: "ova"}
_SPLIT = re.compile(r"[ \n\r\t\v\f\0]+")  # fastText's readWord separators
_SIGMOID_TABLE = 512
_MAX_SIGMOID = 8.0


@dataclass(frozen=True)
class FastTextArgs:
    """The training arguments fastText stores in a model file (the subset prediction needs, plus
    what identifies the model)."""

    dim: int
    word_ngrams: int
    loss: str
    model: int
    bucket: int
    minn: int
    maxn: int


class _Reader:
    """Little-endian cursor over the file bytes; running out of bytes is a one-line DataError."""

    def __init__(self, data: bytes, path: str):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise DataError(f"{self.path}: truncated fastText file ({len(self.data)} bytes; ends inside "
                            f"the {what}); download it again")
        view = memoryview(self.data)[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(count * np.dtype(dtype).itemsize, what), dtype=dtype)

    def cstring(self, what: str) -> bytes:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise DataError(f"{self.path}: truncated fastText file (ends inside the {what}); download it again")
        s = self.data[self.pos:end]
        self.pos = end + 1
        return s


def _product_quantizer(r: _Reader, what: str) -> tuple[int, int, int, np.ndarray]:
    dim, nsubq, dsub, lastdsub = r.unpack("iiii", what)
    return nsubq, dsub, lastdsub, r.array("<f4", dim * 256, what)


def _pq_decode(codes: np.ndarray, nsubq: int, dsub: int, lastdsub: int, centroids: np.ndarray) -> np.ndarray:
    """(rows, nsubq) uint8 codes -> (rows, dim) float32. Sub-quantizer m's 256 centroids have dsub
    floats each (lastdsub for the last one) and start at m * 256 * dsub in the flat centroid array."""
    parts = []
    for m in range(nsubq):
        d = lastdsub if m == nsubq - 1 else dsub
        book = centroids[m * 256 * dsub: m * 256 * dsub + 256 * d].reshape(256, d)
        parts.append(book[codes[:, m]])
    return np.concatenate(parts, axis=1)


class _Matrix:
    """A dense float32 matrix, or a product-quantized one decoded row by row on demand."""

    def __init__(self, r: _Reader, quantized: bool, what: str):
        self.dense: np.ndarray | None = None
        if not quantized:
            m, n = r.unpack("qq", what)
            self.dense = r.array("<f4", m * n, what).reshape(m, n)
            self.shape = (m, n)
            return
        (qnorm,) = r.unpack("?", what)
        m, n = r.unpack("qq", what)
        (codesize,) = r.unpack("i", what)
        self.shape = (m, n)
        codes = r.array("u1", codesize, what)
        self.pq = _product_quantizer(r, what)
        if codesize != m * self.pq[0]:
            raise DataError(f"{r.path}: corrupt quantized {what} ({codesize} codes for {m} rows); download it again")
        self.codes = codes.reshape(m, self.pq[0])
        self.norms: np.ndarray | None = None
        if qnorm:
            norm_codes = r.array("u1", m, what)
            _, _, _, norm_centroids = _product_quantizer(r, what)
            self.norms = norm_centroids[norm_codes]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        if self.dense is not None:
            return self.dense[ids]
        out = _pq_decode(self.codes[ids], *self.pq)
        return out * self.norms[ids, None] if self.norms is not None else out

    def full(self) -> np.ndarray:
        return self.rows(np.arange(self.shape[0]))


def fnv1a(data: bytes) -> int:
    """fastText's 32-bit FNV-1a; bytes >= 0x80 enter sign-extended (its `int8_t` cast)."""
    h = 2166136261
    for b in data:
        h = ((h ^ (b | 0xFFFFFF00 if b & 0x80 else b)) * 16777619) & 0xFFFFFFFF
    return h


def _huffman(counts: list[int]) -> list[tuple[int, int]]:
    """(left, right) children of the 2n-1 tree nodes, built from label counts (sorted descending, as
    fastText's dictionary stores them) with fastText's two-queue merge; leaves are (-1, -1)."""
    n = len(counts)
    count = list(counts) + [10 ** 15] * (n - 1)
    tree = [(-1, -1)] * (2 * n - 1)
    leaf, node = n - 1, n
    for i in range(n, 2 * n - 1):
        pick = []
        for _ in range(2):
            if leaf >= 0 and count[leaf] < count[node]:
                pick.append(leaf)
                leaf -= 1
            else:
                pick.append(node)
                node += 1
        tree[i] = (pick[0], pick[1])
        count[i] = count[pick[0]] + count[pick[1]]
    return tree


def _table_sigmoid(x: np.ndarray) -> np.ndarray:
    """fastText's sigmoid for one-vs-all: 0 / 1 outside [-8, 8], else a 513-entry lookup table."""
    grid = np.arange(_SIGMOID_TABLE + 1, dtype=np.float32) * np.float32(2 * _MAX_SIGMOID / _SIGMOID_TABLE)
    table = (1.0 / (1.0 + np.exp(-(grid - np.float32(_MAX_SIGMOID))))).astype(np.float32)
    idx = ((x + np.float32(_MAX_SIGMOID)) * np.float32(_SIGMOID_TABLE / _MAX_SIGMOID / 2)).astype(np.int64)
    out = table[np.clip(idx, 0, _SIGMOID_TABLE)]
    return np.where(x < -_MAX_SIGMOID, 0.0, np.where(x > _MAX_SIGMOID, 1.0, out)).astype(np.float32)


class FastTextModel:
    """A supervised fastText model. `predict(text, k, threshold)` -> [(label, probability)], best
    first, as `fasttext.FastText._FastText.predict` returns them; `label_probs(text)` -> all labels."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"fastText model {path} does not exist; give the path of a .bin or .ftz file")
        r = _Reader(path.read_bytes(), str(path))
        magic, version = r.unpack("ii", "header")
        if magic != MAGIC:
            raise DataError(f"{path}: not a fastText model (magic {magic}, expected {MAGIC}); give the path of a .bin "
                            "or .ftz file saved by fastText")
        if version not in VERSIONS:
            raise DataError(f"{path}: fastText file format version {version} is not supported "
                            f"(supported: {', '.join(map(str, VERSIONS))}); give a model saved by the fastText "
                            "library, or download it again if it is damaged")
        dim, _ws, _epoch, _min_count, _neg, word_ngrams, loss, model, bucket, minn, maxn, _lr_update, _t = \
            r.unpack("iiiiiiiiiiiid", "arguments")
        if model != 3:
            raise DataError(f"{path}: a fastText word-vector model (model={model}), not a supervised "
                            "classifier; the stages need a model trained with `fasttext supervised`")
        if loss not in LOSSES or LOSSES[loss] == "ns":
            raise DataError(f"{path}: fastText loss {LOSSES.get(loss, loss)} is not supported for prediction; give a "
                            "classifier trained with softmax, hs or ova loss")
        if version == 11:  # fastText's loader: old supervised models have no character n-grams
            maxn = 0
        self.args = FastTextArgs(dim=dim, word_ngrams=word_ngrams, loss=LOSSES[loss], model=model,
                                 bucket=bucket, minn=minn, maxn=maxn)
        self._read_dictionary(r)
        (quant_input,) = r.unpack("?", "input matrix flag")
        self.input = _Matrix(r, quant_input, "input matrix")
        (quant_output,) = r.unpack("?", "output matrix flag")
        self.output = _Matrix(r, quant_input and quant_output, "output matrix").full()
        if self.input.shape[1] != dim or self.output.shape != (len(self.labels), dim):
            raise DataError(f"{path}: corrupt fastText file (matrix shapes {self.input.shape}, "
                            f"{self.output.shape} do not match dim {dim} and {len(self.labels)} labels); download "
                            "it again")
        self.tree = _huffman(self.label_counts) if self.args.loss == "hs" else None
        self.path = path
        # each model its own cache of word features (`_token`): an lru_cache on the method is one cache for every
        # instance, whose keys held each model that had scored a text (a freed model stayed in memory) and whose
        # entries the models of one worker evicted from each other; a plain dict, as an lru_cache of the bound method
        # would refer back to the model (freed only by a garbage-collection pass, not when the last name goes)
        self._tokens: dict[str, tuple[tuple[int, ...], int]] = {}

    def _read_dictionary(self, r: _Reader) -> None:
        size, nwords, nlabels = r.unpack("iii", "dictionary")
        _ntokens, prune_size = r.unpack("qq", "dictionary")
        words, labels, self.label_counts = [], [], []
        for _ in range(size):
            word = r.cstring("dictionary").decode("utf-8", "surrogateescape")
            count, kind = r.unpack("qb", "dictionary")
            if kind == 0:
                words.append(word)
            else:
                labels.append(word)
                self.label_counts.append(count)
        if (len(words), len(labels)) != (nwords, nlabels):
            raise DataError(f"{r.path}: corrupt fastText dictionary ({len(words)} words, {len(labels)} labels; "
                            f"header says {nwords}, {nlabels}); download it again")
        self.words, self.labels = words, labels
        self.word_ids = {w: i for i, w in enumerate(words)}
        # -1: no pruning; else the kept n-gram buckets, remapped to consecutive rows
        self.prune: dict[int, int] | None = None
        if prune_size >= 0:
            pairs = r.array("<i4", 2 * prune_size, "pruned n-gram index").reshape(-1, 2)
            self.prune = dict(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist()))

    # --- featurisation (fastText's Dictionary::getLine) -------------------------------------------
    def _bucket_row(self, h: int) -> int | None:
        if self.prune is None:
            return len(self.words) + h
        row = self.prune.get(h)
        return None if row is None else len(self.words) + row

    def _token(self, word: str) -> tuple[tuple[int, ...], int]:
        """`_token_features`, from the model's cache (its first _TOKEN_CACHE distinct words: the frequent ones)."""
        got = self._tokens.get(word)
        if got is None:
            got = self._token_features(word)
            if len(self._tokens) < _TOKEN_CACHE:
                self._tokens[word] = got
        return got

    def _token_features(self, word: str) -> tuple[tuple[int, ...], int]:
        """(input rows, int32 hash) of one token: its own row (if in vocabulary) and its character
        n-gram rows; the hash feeds the word n-grams."""
        h = fnv1a(word.encode("utf-8", "surrogateescape"))
        wid = self.word_ids.get(word)
        ids = [wid] if wid is not None else []
        if word != EOS and self.args.maxn > 0:
            chars = BOW + word + EOW
            for i in range(len(chars)):
                for n in range(max(self.args.minn, 1), self.args.maxn + 1):  # no empty n-gram at minn = 0
                    if i + n > len(chars) or (n == 1 and (i == 0 or i + n == len(chars))):
                        continue
                    gram = fnv1a(chars[i:i + n].encode("utf-8", "surrogateescape"))
                    row = self._bucket_row(gram % self.args.bucket)
                    if row is not None:
                        ids.append(row)
        return tuple(ids), h - (1 << 32) if h >= 1 << 31 else h  # fastText stores it as int32

    def features(self, text: str) -> list[int]:
        """Input-matrix rows of one line of text (newlines count as spaces). A `</s>` token in the text ends
        it, as in fastText's Dictionary::getLine: what follows is not read."""
        tokens = [t for t in _SPLIT.split(text) if t]
        tokens = tokens[:tokens.index(EOS)] if EOS in tokens else tokens
        tokens.append(EOS)
        ids: list[int] = []
        hashes: list[int] = []
        for tok in tokens:
            if tok in self.word_ids or not tok.startswith("__label__"):  # labels are not features
                rows, h = self._token(tok)
                ids.extend(rows)
                hashes.append(h)
        if self.args.word_ngrams > 1:  # int32 hashes sign-extend into the uint64 n-gram state
            for i in range(len(hashes)):
                h = hashes[i] & 0xFFFFFFFFFFFFFFFF
                for j in range(i + 1, min(len(hashes), i + self.args.word_ngrams)):
                    h = (h * 116049371 + (hashes[j] & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
                    row = self._bucket_row(h % self.args.bucket)
                    if row is not None:
                        ids.append(row)
        return ids

    # --- prediction ---------------------------------------------------------------------------------
    def hidden(self, text: str) -> np.ndarray | None:
        ids = self.features(text)
        if not ids:
            return None
        rows = self.input.rows(np.asarray(ids, dtype=np.int64))
        return rows.sum(axis=0, dtype=np.float32) * np.float32(1.0 / len(ids))

    def label_log_probs(self, text: str) -> np.ndarray:
        """(nlabels,) float32 log(p + 1e-5) of every label, fastText's prediction scores."""
        return self._scores(text)[0]

    def _scores(self, text: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(log(p + 1e-5), p) per label; p is None for the hierarchical softmax, whose threshold
        fastText applies to the log score."""
        h = self.hidden(text)
        if h is None:
            return np.full(len(self.labels), -np.inf, dtype=np.float32), np.zeros(len(self.labels), np.float32)
        if self.args.loss == "hs":
            return self._hs_scores(h), None
        z = self.output @ h
        if self.args.loss == "ova":
            p = _table_sigmoid(z)
        else:
            e = np.exp(z - z.max())
            p = e / e.sum(dtype=np.float32)
        return np.log(p + np.float32(1e-5)).astype(np.float32), p

    def _hs_scores(self, h: np.ndarray) -> np.ndarray:
        """Sum of log(sigmoid) branch scores from the root to each leaf (right = sigmoid, left = 1 - it)."""
        n = len(self.labels)
        scores = np.zeros(n, dtype=np.float32)
        if n == 1:
            return scores
        stack = [(2 * n - 2, np.float32(0.0))]
        while stack:
            node, score = stack.pop()
            left, right = self.tree[node]
            if left == -1:
                scores[node] = score
                continue
            f = np.float32(1.0) / (np.float32(1.0) + np.exp(-np.float32(self.output[node - n] @ h)))
            stack.append((left, np.float32(score + np.log(np.float32(1.0) - f + np.float32(1e-5)))))
            stack.append((right, np.float32(score + np.log(f + np.float32(1e-5)))))
        return scores

    def label_probs(self, text: str) -> dict[str, float]:
        """{label: probability} for every label (the `__label__` prefix kept)."""
        return dict(zip(self.labels, np.exp(self.label_log_probs(text)).tolist()))

    def predict(self, text: str, k: int = 1, threshold: float = 0.0) -> list[tuple[str, float]]:
        """The k best labels (k < 0: all) with probability >= threshold, best first; of equal scores the later
        label first, as fastText's findKBest keeps it (its min-heap pops the earlier of two equal entries: the
        one-vs-all loss's table sigmoid gives exact ties)."""
        scores, p = self._scores(text)
        if p is None:
            keep = np.flatnonzero(scores >= np.log(np.float32(threshold) + np.float32(1e-5)))
        else:
            keep = np.flatnonzero(p >= np.float32(threshold))
        order = keep[np.lexsort((-keep, -scores[keep]))]  # score descending, then label index descending
        order = order[:k] if k >= 0 else order
        return [(self.labels[i], float(np.exp(scores[i]))) for i in order if np.isfinite(scores[i])]


@once_per_file
def load_fasttext(path: str) -> FastTextModel:
    """A model per file, loaded once per process however its path is written (the stages call this for every
    batch), and again when the file is rewritten (a model retrained over it: utils.once_per_file). One per file: a
    pipeline's models are a fixed set its every shard uses, and a cache of 4 met 5 fastText
    stages in a cycle, so each batch missed and a worker read every model again for every shard. The executors free
    the parent's copies before workers start (`pipeline.release_checked_models`); `load_fasttext.cache_clear()`
    frees them elsewhere."""
    return FastTextModel(path)
