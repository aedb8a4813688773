"""Exact, line-level, MinHash and Bloom dedup, and decontamination, against known answers."""

from __future__ import annotations

import collections
import json
import random

import numpy as np
import pytest

from lmforge.data.bloom import BloomDedupConfig, BloomFilter, bloom_dedup
from lmforge.data.decontam import DecontamConfig, decontam
from lmforge.data.document import Document
from lmforge.data.exact import ExactDedupConfig, LineDedupConfig, exact_dedup, line_dedup
from lmforge.data.hashing import batch_word_ngram_hashes, normalize_words, text_ngram_hashes
from lmforge.data.minhash import (MinHashConfig, choose_bands_rows, cluster, jaccard, minhash_dedup,
                                  signatures)
from lmforge.data.stage import StageContext
from lmforge.errors import DataError
from lmforge.data.synthetic import near_duplicate_corpus
from tests.data.conftest import shared


def _groups(roots: list[int]) -> list[list[int]]:
    g = collections.defaultdict(list)
    for i, r in enumerate(roots):
        g[r].append(i)
    return sorted(sorted(v) for v in g.values() if len(v) > 1)


def test_exact_dedup_keeps_first():
    docs = [Document(id="a", text="Hello  World"), Document(id="b", text="hello world"),
            Document(id="c", text="other"), Document(id="d", text="Hello World")]
    out = exact_dedup(ExactDedupConfig(), docs, StageContext())
    assert [d.drop for d in out] == [None, "exact_duplicate", None, "exact_duplicate"]
    assert out[1].meta["dup_of"] == "a"
    docs = [Document(id="a", text="Hello  World"), Document(id="b", text="hello world")]
    assert [d.drop for d in exact_dedup(ExactDedupConfig(normalize=False), docs, StageContext())] == [None, None]


def test_exact_dedup_folds_full_width_and_ligature_copies():
    # the same text on screen: full-width letters and space, an "fi" ligature, a decomposed (NFD) accent
    docs = [Document(id="a", text="A naïve file, finished."),
            Document(id="b", text="Ａ　ｎａｉ\u0308ｖｅ \ufb01le, \ufb01nished."),
            Document(id="c", text="A naive file, finished.")]  # no accent: another text
    out = exact_dedup(ExactDedupConfig(), docs, StageContext())
    assert [d.drop for d in out] == [None, "exact_duplicate", None]
    assert out[1].meta["dup_of"] == "a"
    docs = [Document(id="a", text="A naïve file, finished."),
            Document(id="b", text="Ａ　ｎａｉ\u0308ｖｅ file, finished.")]
    assert [d.drop for d in exact_dedup(ExactDedupConfig(normalize=False), docs, StageContext())] == [None, None]


def test_line_dedup_normalize_folds_full_width_lines():
    docs = [Document(id="1", text="Home | About\nFirst story."),
            Document(id="2", text="Ｈｏｍｅ ｜ Ａｂｏｕｔ\nSecond story.")]
    out = line_dedup(LineDedupConfig(mode="first", normalize=True), docs, StageContext())
    assert [d.text for d in out] == ["Home | About\nFirst story.", "Second story."]


def _line_docs() -> list[Document]:
    return [Document(id="1", text="Home | About\nFirst story text.\nCopyright 2021"),
            Document(id="2", text="Home | About\nSecond story text.\nCopyright 2023"),
            Document(id="3", text="home |  about\ncopyright 1999")]


def test_line_dedup_all_mode_drops_every_copy():
    ctx = StageContext()
    out = line_dedup(LineDedupConfig(mode="all", normalize=True), _line_docs(), ctx)
    assert [d.text for d in out] == ["First story text.", "Second story text.", ""]
    assert [d.drop for d in out] == [None, None, "line_dedup:empty"]
    assert ctx.counters["line_dedup.lines_removed"] == 6  # digits normalised: the copyright lines match


def test_line_dedup_first_mode_keeps_first_occurrence():
    out = line_dedup(LineDedupConfig(mode="first", normalize=True), _line_docs(), StageContext())
    assert [d.text for d in out] == ["Home | About\nFirst story text.\nCopyright 2021", "Second story text.", ""]
    assert out[1].meta["lines_removed"] == 2 and out[2].drop == "line_dedup:empty"


def test_line_dedup_is_exact_by_default():
    """CCNet/C4 compare lines exactly: lines differing in one digit or in case are distinct."""
    docs = [Document(id="1", text="Intro one.\nsee doc3.txt\nHome | About\n"),
            Document(id="2", text="Intro two.\nsee doc4.txt\nHome | About\n"),
            Document(id="3", text="home |  about\nSEE DOC3.TXT\n")]
    ctx = StageContext()
    out = line_dedup(LineDedupConfig(), docs, ctx)
    assert [d.text for d in out] == ["Intro one.\nsee doc3.txt\n", "Intro two.\nsee doc4.txt\n",
                                     "home |  about\nSEE DOC3.TXT\n"]
    assert ctx.counters["line_dedup.lines_removed"] == 2
    normed = line_dedup(LineDedupConfig(normalize=True), [Document(id=d.id, text=t) for d, t in zip(docs, [
        "Intro one.\nsee doc3.txt\nHome | About\n", "Intro two.\nsee doc4.txt\nHome | About\n",
        "home |  about\nSEE DOC3.TXT\n"])], StageContext())
    assert [d.text for d in normed] == ["Intro one.\n", "Intro two.\n", ""]  # digits -> 0, case folded


def test_line_dedup_keeps_trailing_newline_consistently():
    docs = [Document(id="a", text="kept a\nshared\n"), Document(id="b", text="kept b\n\n"),
            Document(id="c", text="shared\nkept c"), Document(id="d", text="kept d\n")]
    out = line_dedup(LineDedupConfig(), docs, StageContext())
    # changed (a, c) and unchanged (b, d) documents both end exactly as they did
    assert [d.text for d in out] == ["kept a\n", "kept b\n\n", "kept c", "kept d\n"]
    assert [d.meta.get("lines_removed") for d in out] == [1, None, 1, None]


def test_line_dedup_matches_crlf_and_lf_copies_of_a_line():
    """Text splits on "\n", so a CRLF document's lines end in "\r": the comparison leaves it out, the kept
    lines keep it."""
    docs = [Document(id="a", text="Body A\r\nShare this article\r\nBody A2\r\n"),
            Document(id="b", text="Share this article\nBody B")]
    ctx = StageContext()
    out = line_dedup(LineDedupConfig(), docs, ctx)
    assert [d.text for d in out] == ["Body A\r\nBody A2\r\n", "Body B"]
    assert ctx.counters["line_dedup.lines_removed"] == 2
    first = line_dedup(LineDedupConfig(mode="first"), [Document(id="a", text="x\r\nShared line\r\n"),
                                                       Document(id="b", text="Shared line\ny")], StageContext())
    assert [d.text for d in first] == ["x\r\nShared line\r\n", "y"]


@pytest.mark.parametrize("mode", ["all", "first"])
def test_line_dedup_hashes_each_line_once(monkeypatch, mode):
    """Mode "all" counts every line before removing any; it hashed each line in both passes (2x the stage's main
    cost). The result is that of the known answer either way."""
    from lmforge.data import exact

    calls = []
    monkeypatch.setattr(exact, "line_key", lambda ln, normalize=False: calls.append(ln) or exact.hashlib.blake2b(
        ln.rstrip("\r").encode(), digest_size=8).digest())
    docs = [Document(id="a", text="nav\nbody a\n\nx"), Document(id="b", text="nav\nbody b\nnav")]
    out = line_dedup(LineDedupConfig(mode=mode, min_chars=2), docs, StageContext())
    assert sorted(calls) == ["body a", "body b", "nav", "nav", "nav"]  # eligible lines, once each ("x" is short)
    assert [d.text for d in out] == (["body a\n\nx", "body b"] if mode == "all" else ["nav\nbody a\n\nx", "body b"])


def test_bands_rows_match_datasketch_choice():
    lsh = pytest.importorskip("datasketch.lsh")
    for t in (0.5, 0.7, 0.8, 0.9):
        for n in (64, 128, 256):
            assert choose_bands_rows(t, n) == lsh._optimal_param(t, n, 0.5, 0.5)
    assert choose_bands_rows(0.8, 128) == (9, 13)


def test_signature_agreement_estimates_jaccard():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=2000, dtype=np.uint64)
    other = np.concatenate([base[:1500], rng.integers(0, 2**63, size=500, dtype=np.uint64)])
    true = jaccard(np.unique(base), np.unique(other))  # 1500 / 2500 = 0.6
    sig = signatures([base, other], num_perm=1024)
    assert true == pytest.approx(0.6)
    assert (sig[0] == sig[1]).mean() == pytest.approx(true, abs=0.05)  # std ~ sqrt(.24/1024) = .015


def test_lsh_candidate_rate_follows_the_s_curve():
    """Seeded Monte Carlo: pairs of sets at Jaccard s become LSH candidates (share a band key) at the rate
    P(s) = 1 - (1 - s^r)^b of the chosen (b, r) = (9, 13), within 4 standard deviations."""
    from lmforge.data.minhash import band_keys

    rng = np.random.default_rng(0)
    b, r = choose_bands_rows(0.8, 128)
    for inter in (120, 140, 160, 180):  # of 200-element sets: s = 0.43, 0.54, 0.67, 0.82
        pairs = 400
        sets = []
        for _ in range(pairs):
            x = rng.integers(0, 2**63, size=400 - inter, dtype=np.uint64)
            sets += [x[:200], x[200 - inter:]]
        keys = band_keys(signatures(sets, num_perm=128), b, r)
        rate = (keys[0::2] == keys[1::2]).any(axis=1).mean()
        s = inter / (400 - inter)
        p = 1 - (1 - s ** r) ** b
        assert abs(rate - p) <= 4 * np.sqrt(p * (1 - p) / pairs) + 1e-3, (s, rate, p)


def test_signatures_of_structured_keys_are_unbiased():
    """Consecutive integers as keys (ids rather than hashed shingles): the plain multiply-shift family's minima
    were correlated and the estimates ran 0.063 low on average; mixing the keys first removes the bias."""
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(200):
        off = int(rng.integers(1, 200))
        a, b = np.arange(200, dtype=np.uint64), np.arange(off, off + 200, dtype=np.uint64)
        sig = signatures([a, b], num_perm=256)
        errors.append((sig[0] == sig[1]).mean() - (200 - off) / (200 + off))
    assert abs(np.mean(errors)) < 0.015  # std of the mean over 200 pairs ~ 0.002


def test_signatures_of_a_long_document_in_bounded_memory():
    """The signature buffer was sized for the longest document: 320 MB for one of 300k shingles (a book) at 128
    perms. Documents longer than a block now go through in pieces, with the signatures of the plain formula."""
    import tracemalloc

    from lmforge.data.hashing import mix64
    from lmforge.data.minhash import permutations, signatures_flat

    rng = np.random.default_rng(0)
    counts = np.array([3, 200_000, 0, 5000, 7], dtype=np.int64)
    hashes = rng.integers(0, 2**63, size=int(counts.sum()), dtype=np.uint64)
    tracemalloc.start()
    sig = signatures_flat(hashes, counts, num_perm=64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20e6, peak  # 64 perms x 200k x 8 bytes = 102 MB before
    a, b = permutations(64, 1)
    x = mix64(hashes) & np.uint64(0xFFFFFFFF)
    ends = np.cumsum(counts)
    for i, (e, c) in enumerate(zip(ends, counts)):
        want = [((a[p] * x[e - c:e] + b[p]) >> np.uint64(32)).min() if c else 2**32 - 1 for p in range(64)]
        assert sig[i].tolist() == want, i


def test_batch_shingles_match_per_document_sets():
    texts = ["The cat sat on the mat, and the dog sat on the log.", "", "one two", "Ünïcode wörds ça va très bien ok"]
    hashes, counts = batch_word_ngram_hashes(texts, 3)
    assert counts.tolist() == [11, 0, 1, 5]
    assert len(np.unique(hashes[:11])) == len(text_ngram_hashes(texts[0], 3)) == 10  # "sat on the" twice


_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x ^= x >> 30
    x = x * 0xBF58476D1CE4E5B9 & _M64
    x ^= x >> 27
    x = x * 0x94D049BB133111EB & _M64
    return x ^ (x >> 31)


def _reference_shingles(text: str, n: int) -> list[int]:
    """Plain-Python reference for the batch shingles: the n-grams of `normalize_words(text)` (one
    n-gram of all words when there are fewer than n), each word hashed as splitmix64 of
    sum_k b_k P^k over its UTF-8 bytes, an n-gram as the polynomial sum (acc P + h + 1) of its words."""
    p = 0x100000001B3
    words = [_splitmix64(sum(b * pow(p, k, 1 << 64) for k, b in enumerate(w.encode("utf-8"))) & _M64)
             for w in normalize_words(text)]
    out = []
    for i in range(max(len(words) - n + 1, 1 if words else 0)):
        acc = 0
        for h in words[i:i + n]:
            acc = (acc * p + h + 1) & _M64
        out.append(_splitmix64(acc))
    return out


def test_batch_shingles_are_the_ngrams_of_normalize_words_for_unicode_text():
    """The vectorised byte path must split and lowercase words exactly as `normalize_words` (the
    word definition decontamination and Bloom dedup use), also where bytes alone cannot tell: curly
    quotes, guillemets, dashes, no-break spaces and ellipses split words, accented capitals lower."""
    pieces = ["the", "Cat", "x1", "a_b", "ÉCOLE", "Ärger", "naïve", "ΣΟΦΙΑ", "İstanbul", "straße", "日本語",
              "e\u0301", "x²", "½", "😀", "K", "ﬁne", "\ud800", "\x00", "“", "”", "’", "«", "»", "—", "…",
              "\u00a0", "\u3000", " ", ". ", ",", "-", "\n", "'", "(", ")"]
    rng = random.Random(0)
    for _ in range(40):
        texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 60))) for _ in range(rng.randint(1, 30))]
        n = rng.randint(1, 6)
        hashes, counts = batch_word_ngram_hashes(texts, n, block_chars=rng.choice([50, 1 << 16]))
        ends = np.cumsum(counts)
        for t, e, c in zip(texts, ends, counts):
            assert hashes[e - c:e].tolist() == _reference_shingles(t, n), repr(t)


def test_curly_quoted_copy_is_a_near_duplicate():
    """A page and its copy with typographic punctuation (“ ” ’ — … no-break spaces) and capitals
    have the same words, so MinHash must put them in one cluster."""
    plain = ("He said hello world to them and then the committee of the école normale supérieure "
             "met again on Tuesday to discuss the cost benefit analysis of the new library plan "
             "which it's fair to say nobody had read before the meeting began in earnest")
    fancy = ("He said “Hello World” to them\u00a0— and then the committee of the ÉCOLE NORMALE "
             "SUPÉRIEURE met again on Tuesday… to discuss the cost—benefit analysis of the «new library "
             "plan», which it’s fair to say nobody had read before the meeting began in earnest")
    assert normalize_words(plain) == normalize_words(fancy)
    other = " ".join(f"unrelated{i}" for i in range(40))
    assert _groups(cluster([plain, other, fancy], MinHashConfig(threshold=0.8))) == [[0, 2]]


def test_decomposed_and_compatibility_forms_are_the_same_text(tmp_path):
    """A decomposed (NFD) copy of a text shows the same characters: its accents are combining marks, which split
    words ("naïve" -> "nai", "ve"), so the copy was neither a near-duplicate nor a Bloom duplicate and matched 2 of
    an eval item's 18 8-grams. NFKC first: also full-width letters and ligatures read as their plain forms."""
    import unicodedata

    item = ("Le café de la rue Émile Zola sert un déjeuner à douze euros, et Hélène y mange chaque jour de la "
            "semaine avec ses collègues.")
    nfd = unicodedata.normalize("NFD", item)
    assert normalize_words(nfd) == normalize_words(item) and len(normalize_words(item)) == 25
    assert normalize_words("Ｔｈｅ ﬁne print") == ["the", "fine", "print"]
    assert _groups(cluster([item * 3, "x y z " * 20, nfd * 3])) == [[0, 2]]
    assert _groups(cluster([item, nfd], MinHashConfig(unit="char"))) == [[0, 1]]
    out = bloom_dedup(BloomDedupConfig(capacity=100), [Document(id="a", text=item), Document(id="b", text=nfd)],
                      StageContext())
    assert [d.drop for d in out] == [None, "bloom:empty"]
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"q": item}) + "\n", encoding="utf-8")
    out = decontam(DecontamConfig(eval_paths=(str(path),), ngram=8, min_matches=18),
                   [Document(id="nfd", text=nfd), Document(id="fw", text="Ｌｅ ｃａｆé " + item[8:])], StageContext())
    assert [(d.drop, d.meta["eval_ngram_matches"]) for d in out] == [("decontam", 18), ("decontam", 18)]


def test_minhash_finds_exactly_the_planted_clusters():
    texts, clusters = near_duplicate_corpus(n_unique=400, n_clusters=40, copies=3, edit_frac=0.005, seed=1)
    assert _groups(cluster(texts, MinHashConfig(threshold=0.8))) == clusters
    docs = [Document(id=str(i), text=t) for i, t in enumerate(texts)]
    before = [d.text for d in docs]
    out = minhash_dedup(MinHashConfig(), docs, StageContext())
    kept = [d for d in out if d.drop is None]
    assert len(kept) == 400 + 40
    assert all(d.text == t for d, t in zip(out, before))  # kept (and dropped) texts unchanged
    assert all(d.meta == {} for d in kept)
    for c in clusters:
        assert out[c[0]].drop is None and all(out[i].meta["dup_of"] == str(c[0]) for i in c[1:])


def test_minhash_verification_rejects_false_candidates():
    """With bands of 1 row every shared shingle makes a candidate; true Jaccard must then decide."""
    a = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    b = "alpha beta gamma delta epsilon omega psi chi phi upsilon"
    cfg = MinHashConfig(threshold=0.8, num_perm=64, ngram=1, bands=64, rows=1)
    assert _groups(cluster([a, b], cfg)) == []
    assert _groups(cluster([a, b], MinHashConfig(threshold=0.8, num_perm=64, ngram=1, bands=64, rows=1,
                                                  verify=False))) == [[0, 1]]


def test_minhash_clusters_equal_datasketch():
    ds = pytest.importorskip("datasketch")
    texts, clusters = near_duplicate_corpus(n_unique=150, n_clusters=20, copies=2, edit_frac=0.005, seed=2)
    b, r = choose_bands_rows(0.8, 128)
    lsh = ds.MinHashLSH(threshold=0.8, num_perm=128, params=(b, r))
    sigs = []
    for i, t in enumerate(texts):
        m = ds.MinHash(num_perm=128)
        w = t.lower().split()
        m.update_batch([" ".join(w[k:k + 5]).encode() for k in range(len(w) - 4)])
        lsh.insert(str(i), m)
        sigs.append(m)
    parent = list(range(len(texts)))
    for i, m in enumerate(sigs):
        for j in map(int, lsh.query(m)):
            lo, hi = sorted((i, j))
            while parent[hi] != hi:
                hi = parent[hi]
            while parent[lo] != lo:
                lo = parent[lo]
            parent[max(lo, hi)] = min(lo, hi)
    def root(x):
        while parent[x] != x:
            x = parent[x]
        return x
    assert _groups([root(i) for i in range(len(texts))]) == clusters == _groups(cluster(texts))


def test_bloom_filter_false_positive_rate():
    bf = BloomFilter(capacity=20_000, fp_rate=0.01)
    rng = np.random.default_rng(0)
    bf.add(rng.integers(0, 2**63, size=20_000, dtype=np.uint64))
    assert bf.k == 7 and bf.m == 191_702  # m = -n ln p / ln(2)^2, k = m/n ln 2
    fp = bf.contains(rng.integers(0, 2**63, size=50_000, dtype=np.uint64)).mean()
    assert 0.005 < fp < 0.02


def test_small_bloom_filters_keep_their_false_positive_rate():
    """Filters of a few hundred bits. Plain double hashing (h1 + i h2) made items sharing h2 mod m set shifted copies
    of one bit sequence: 6.6x the target rate (3 items at 1e-3); and the asymptotic size left the expected rate
    2.3x the target at 5 items (the spread of the set bits). The exact expectation, checked here against a
    simulation, now sizes such filters; the mean over 300 filters stays at the target."""
    from lmforge.data.bloom import expected_fp_rate

    rng = np.random.default_rng(0)
    bits = np.zeros(72 * 4000, dtype=bool).reshape(4000, 72)  # 4,000 filters of 72 bits, 5 items x 10 random bits
    bits[np.arange(4000)[:, None], rng.integers(0, 72, size=(4000, 50))] = True
    simulated = (bits.mean(axis=1) ** 10).mean()
    assert expected_fp_rate(72, 10, 5) == pytest.approx(simulated, rel=0.05)
    for capacity, fp_rate in ((3, 1e-3), (5, 1e-3), (13, 1e-3), (8, 0.01)):
        rates = []
        for _ in range(300):
            bf = BloomFilter(capacity=capacity, fp_rate=fp_rate)
            bf.add(rng.integers(0, 2**63, size=capacity, dtype=np.uint64))
            rates.append(bf.contains(rng.integers(0, 2**63, size=10_000, dtype=np.uint64)).mean())
        assert expected_fp_rate(bf.m, bf.k, capacity) <= fp_rate
        assert np.mean(rates) < 1.25 * fp_rate, (capacity, fp_rate, np.mean(rates))


def test_bloom_paragraph_and_ngram_dedup():
    p1 = "The mayor opened the new bridge on Monday morning in front of a large crowd."
    p2 = "Traffic is expected to fall in the old town centre once the bridge is in full use."
    docs = [Document(id="a", text=f"{p1}\n{p2}"), Document(id="b", text=f"Short intro.\n{p1}"),
            Document(id="c", text=p2)]
    ctx = StageContext()
    out = bloom_dedup(BloomDedupConfig(capacity=1000, fp_rate=1e-6), docs, ctx)
    assert [d.text for d in out] == [f"{p1}\n{p2}", "Short intro.", ""]
    assert [d.drop for d in out] == [None, None, "bloom:empty"] and ctx.counters["bloom.paragraphs_removed"] == 2
    near = p1.replace("Monday", "Tuesday")  # 13-grams: most survive the one-word change
    docs = [Document(id="a", text=p1), Document(id="b", text=near)]
    out = bloom_dedup(BloomDedupConfig(unit="ngram", ngram=5, overlap=0.5, capacity=1000), docs, StageContext())
    assert [d.drop for d in out] == [None, "bloom:empty"]
    out = bloom_dedup(BloomDedupConfig(unit="ngram", ngram=5, overlap=0.9, capacity=1000),
                      [Document(id="a", text=p1), Document(id="b", text=near)], StageContext())
    assert [d.drop for d in out] == [None, None]


def _bloom_corpus(seed: int, n_docs: int = 60) -> list[Document]:
    """Documents of repeated and new paragraphs, with the odd cases: blank and punctuation-only lines, one-word
    and non-ASCII paragraphs, CRLF line ends, near copies (one word changed)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(40)] + ["Straße", "café", "ÉTÉ", "naïve"]
    pool = [" ".join(rng.choices(vocab, k=rng.randint(1, 25))) for _ in range(30)]
    docs = []
    for i in range(n_docs):
        paras = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.35:
                paras.append(rng.choice(pool))
            elif r < 0.45:
                paras.append(rng.choice(["", "   ", "--- ***", "x", "Hello\r"]))
            elif r < 0.55:
                words = rng.choice(pool).split()
                words[rng.randrange(len(words))] = rng.choice(vocab)
                paras.append(" ".join(words))
            else:
                paras.append(" ".join(rng.choices(vocab, k=rng.randint(1, 30))))
        docs.append(Document(id=str(i), text="\n".join(paras) + rng.choice(["", "\n"])))
    return docs


@pytest.mark.parametrize("kw", [dict(), dict(min_words=3), dict(capacity=10, fp_rate=0.99),
                                dict(unit="ngram", ngram=4, overlap=0.5), dict(unit="ngram", ngram=13, overlap=0.8),
                                dict(unit="ngram", ngram=3, overlap=0.6, capacity=50, fp_rate=0.9, min_words=2)])
def test_bloom_dedup_equals_its_paragraph_by_paragraph_reference(monkeypatch, kw):
    """bloom_dedup puts blocks of documents through the filter at once; what it keeps, drops and counts is the
    plain loop's, false positives included (the small filters here remove many paragraphs never seen before, and
    fill four or five times, inside blocks and at their ends)."""
    from lmforge.data import bloom

    cfg = BloomDedupConfig(**kw)
    for seed in range(2):
        ref_ctx = StageContext()
        ref = [(d.text, d.drop, d.meta) for d in bloom.bloom_dedup_reference(cfg, _bloom_corpus(seed), ref_ctx)]
        for block_chars in (1 << 18, 300):  # all documents in one block; blocks of a document or two
            monkeypatch.setattr(bloom, "_BLOCK_CHARS", block_chars)
            ctx = StageContext()
            assert [(d.text, d.drop, d.meta) for d in bloom_dedup(cfg, _bloom_corpus(seed), ctx)] == ref
            assert ctx.counters == ref_ctx.counters and ctx.counters["bloom.paragraphs_removed"] > 10
        if cfg.unit == "paragraph":  # paragraphs whose words came before: what a perfect filter removes
            seen, repeats = set(), 0
            for d in _bloom_corpus(seed):
                for para in d.text.split("\n"):
                    words = tuple(normalize_words(para))
                    if words and len(para.split()) >= cfg.min_words:
                        repeats += words in seen
                        seen.add(words)
            removed = ctx.counters["bloom.paragraphs_removed"]
            assert removed > repeats + 20 if cfg.fp_rate > 0.1 else removed == repeats  # false positives or none


@pytest.mark.parametrize("kw", [dict(), dict(unit="ngram", ngram=3)])
def test_bloom_dedup_grows_past_its_capacity_at_its_false_positive_rate(kw):
    """A filter for 100 items fed 2,000 distinct paragraphs silently removed 1,562 of them (its false-positive rate
    near 1); then the stage failed past its capacity, which stopped a first-hour run on the default 1,000,000
    items with unit = "ngram" on a few MB of text. The filter now grows (filters of 100, 200, 400, ... items) and
    removes about what fp_rate allows, in both the block path and the reference."""
    from lmforge.data import bloom

    def corpus() -> list[Document]:
        return [Document(id=str(i), text=f"unique paragraph {i} alpha{i} beta{i * 7}") for i in range(2000)]

    made = []
    grow = bloom.ScalableBloomFilter._grow
    for fn in (bloom_dedup, bloom.bloom_dedup_reference):
        out = fn(BloomDedupConfig(capacity=100, fp_rate=1e-3, **kw), corpus(), StageContext())
        assert sum(d.drop is not None for d in out) <= 5  # fp_rate 1e-3 over 2,000 (6,000 3-grams): ~2 expected
    with pytest.MonkeyPatch.context() as m:
        m.setattr(bloom.ScalableBloomFilter, "_grow", lambda self: made.append(self) or grow(self))
        bloom_dedup(BloomDedupConfig(capacity=100, fp_rate=1e-3, **kw), corpus(), StageContext())
    items = 2000 if not kw else 6000
    assert len(made) == (5 if not kw else 6)  # 100 * (2^5 - 1) = 3,100 >= 2,000; 6,300 >= 6,000
    assert sum(100 * 2 ** i for i in range(len(made) - 1)) < items


def test_scalable_bloom_filter_keeps_its_rate_over_seven_doublings():
    """200,000 items into filters that start at 1,000: eight filters (seven doublings), and the rate of the whole
    stays below the target (each filter's rate a tightening share of it), where one 1,000-item filter would answer
    yes to nearly everything."""
    from lmforge.data.bloom import ScalableBloomFilter

    rng = np.random.default_rng(0)
    sbf = ScalableBloomFilter(capacity=1000, fp_rate=0.01)
    items = rng.integers(0, 2**63, size=200_000, dtype=np.uint64)
    seen = sbf.contains_then_add(items, np.arange(len(items)))
    assert len(sbf.filters) == 8 and sbf.room == 1000 * (2**8 - 1) - (~seen).sum()  # false positives are not added
    assert seen.mean() < 0.01 and sbf.contains(items).all()
    fp = sbf.contains(rng.integers(0, 2**63, size=100_000, dtype=np.uint64)).mean()
    assert 0.002 < fp < 0.01
    one = BloomFilter(capacity=1000, fp_rate=0.01)
    one.add(items)
    assert one.contains(rng.integers(0, 2**63, size=1000, dtype=np.uint64)).mean() > 0.99


def test_dedup_configs_refuse_n_grams_of_no_words_and_negative_bands():
    """bloom_dedup.ngram = 0 and minhash_dedup bands = -2, rows = -3 passed their checks and crashed in numpy
    (IndexError, "can only specify one unknown dimension")."""
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"bloom_dedup.ngram must be >= 1, got 0"):
        BloomDedupConfig(unit="ngram", ngram=0)
    with pytest.raises(ConfigError, match=r"minhash_dedup.bands and rows must be >= 0 \(0: chosen\), got -2 and -3"):
        MinHashConfig(bands=-2, rows=-3)


def test_bloom_dedup_batches_its_numpy_calls(monkeypatch):
    """About 30 numpy calls a paragraph made the stage 17x slower than a batch for each block of documents."""
    calls = []
    positions = BloomFilter._positions
    monkeypatch.setattr(BloomFilter, "_positions", lambda self, h: calls.append(len(h)) or positions(self, h))
    docs = _bloom_corpus(0, n_docs=40)
    paragraphs = sum(len(d.text.split("\n")) for d in docs)
    out = bloom_dedup(BloomDedupConfig(), docs, StageContext())
    assert len(calls) == 1 and paragraphs > 150
    assert sum(d.meta.get("paragraphs_removed", 0) for d in out) > 10
    from lmforge.data import bloom

    monkeypatch.setattr(bloom, "_BLOCK_CHARS", 1000)  # a document larger than a block is split at paragraphs
    calls.clear()
    big = Document(id="big", text="\n".join(d.text for d in _bloom_corpus(0, n_docs=40)))
    size = len(big.text)
    bloom_dedup(BloomDedupConfig(), [big], StageContext())
    assert len(calls) >= size // 1000 > 5 and max(calls) < 100, (size, calls)  # items: one a paragraph


def test_decontamination_against_gsm8k_and_mmlu():
    gsm = shared("gsm8k", "test.jsonl")
    mmlu = shared("mmlu", "test", "astronomy_test.csv")
    q = json.loads(gsm.read_text().splitlines()[5])["question"]
    docs = [Document(id="leak", text=f"Homework help forum. {q} Thanks in advance!"),
            Document(id="clean", text="The committee met on Tuesday to review the annual budget and plans for "
                                      "the new library, and residents asked about opening hours."),
            Document(id="mmlu", text=mmlu.read_text().splitlines()[3])]
    out = decontam(DecontamConfig(eval_paths=(str(gsm), str(mmlu)), ngram=13), docs, StageContext())
    assert [d.drop for d in out] == ["decontam", None, "decontam"]
    assert out[0].meta["eval_ngram_matches"] == len(text_ngram_hashes(q, 13))


def test_decontamination_jsonl_line_separators_and_non_object_records(tmp_path):
    """U+2028/U+2029/U+0085 are legal unescaped inside JSON strings and do not end a JSONL line; a line
    may be a bare string or list, and lists inside a record hold eval text too."""
    a, b, c, d = ("alpha beta gamma delta", "one two three four", "red green blue cyan", "north south east west")
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"q": f"{a}\u2028{b}\u2029{c}\u0085{d}", "id": 7}, ensure_ascii=False) + "\r\n"
                    + json.dumps("sun moon star comet") + "\n"
                    + json.dumps({"choices": ["cat dog cow pig", {"text": "oak elm ash fir"}], "label": 2}) + "\n",
                    encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    docs = [Document(id="sep", text=f"{b} x"), Document(id="str", text="the sun moon star comet"),
            Document(id="list", text="cat dog cow pig"), Document(id="nested", text="oak elm ash fir"),
            Document(id="clean", text="nothing in common here")]
    out = decontam(DecontamConfig(eval_paths=(str(path),), ngram=4), docs, StageContext())
    assert [d.drop for d in out] == ["decontam"] * 4 + [None]
    assert [d.meta.get("eval_ngram_matches") for d in out] == [1, 1, 1, 1, None]


def test_decontamination_sees_an_eval_file_added_or_edited_later_in_the_process(tmp_path):
    """The eval n-grams were memoised on the paths alone: a benchmark added to the eval directory, or an edited
    file, was ignored by every later decontam call in the process, and its leaked items passed as clean."""
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "gsm_test.jsonl").write_text(json.dumps({"q": "one two three four five"}) + "\n")
    cfg = DecontamConfig(eval_paths=(str(evals),), ngram=4)

    def docs() -> list[Document]:
        return [Document(id="a", text="alpha beta gamma delta epsilon"),
                Document(id="b", text="six seven eight nine ten")]

    assert [d.drop for d in decontam(cfg, docs(), StageContext())] == [None, None]
    (evals / "mmlu_test.jsonl").write_text(json.dumps({"q": "alpha beta gamma delta"}) + "\n")
    assert [d.drop for d in decontam(cfg, docs(), StageContext())] == ["decontam", None]
    (evals / "gsm_test.jsonl").write_text(json.dumps({"q": "six seven eight nine and more"}) + "\n")
    assert [d.drop for d in decontam(cfg, docs(), StageContext())] == ["decontam", "decontam"]


def test_minhash_character_shingles():
    base = "Breaking: the city council approved the new budget for parks and libraries on Monday evening."
    texts = [base, base.replace("Monday", "Tuesday"), "A completely different sentence about astronomy."]
    cfg = MinHashConfig(threshold=0.7, unit="char", ngram=5, num_perm=256)
    assert _groups(cluster(texts, cfg)) == [[0, 1]]
    assert _groups(cluster(texts, MinHashConfig(threshold=0.7, unit="word", ngram=5))) == []  # too few words


def test_decontamination_skips_hidden_directories_as_every_input_does(tmp_path):
    # decontam walked directories itself, skipping hidden file names but not hidden directories: a checkout's
    # .git or an editor's .cache/ copy of some text flagged training documents the eval set does not hold
    evals = tmp_path / "evals"
    (evals / ".cache").mkdir(parents=True)
    (evals / "gsm_test.jsonl").write_text(json.dumps({"q": "one two three four five six"}) + "\n")
    (evals / ".cache" / "notes.txt").write_text("seven eight nine ten eleven twelve\n")
    (evals / "README.md").write_text("seven eight nine ten eleven twelve\n")  # not an eval suffix: skipped
    docs = [Document(id="a", text="x one two three four five"), Document(id="b", text="seven eight nine ten")]
    out = decontam(DecontamConfig(eval_paths=(str(evals),), ngram=4), docs, StageContext())
    assert [d.drop for d in out] == ["decontam", None]
    with pytest.raises(DataError, match=r"decontam.eval_paths '.*missing': input not found: .*missing"):
        decontam(DecontamConfig(eval_paths=(str(tmp_path / "missing"),), ngram=4), docs, StageContext())


def _benchmark_folder(root) -> None:
    """A benchmark as downloaded: its test split beside a README, a URL list and its train split."""
    root.mkdir()
    (root / "README.txt").write_text("This dataset is released under the MIT license for research use\n")
    (root / "urls.txt").write_text("see www example com the source of every question here\n")
    (root / "train.jsonl").write_text(json.dumps({"q": "a train question we are allowed to learn from"}) + "\n")
    (root / "test.jsonl").write_text(json.dumps({"q": "a held out test question never to be trained on"}) + "\n")


def _leak_docs() -> list[Document]:
    return [Document(id="test", text="a held out test question never to be trained on"),
            Document(id="train", text="a train question we are allowed to learn from"),
            Document(id="readme", text="This dataset is released under the MIT license for research use"),
            Document(id="urls", text="see www example com the source of every question here")]


def test_decontamination_skips_a_folders_readme_url_list_and_train_split(tmp_path):
    # a folder was read whole: its README, URL list and train split became eval items, and clean training text
    # quoting them (license boilerplate, the train split itself) was rejected as contaminated
    _benchmark_folder(tmp_path / "gsm")
    cfg = DecontamConfig(eval_paths=(str(tmp_path / "gsm"),), ngram=6)
    assert [d.drop for d in decontam(cfg, _leak_docs(), StageContext())] == ["decontam", None, None, None]
    from lmforge.config import from_dict
    from lmforge.data.decontam import _eval_ngrams
    from lmforge.data.pipeline import PipelineConfig, check_stages, release_checked_models

    pipeline = from_dict(PipelineConfig, {"input": {"paths": [str(tmp_path)]}, "output": {"dir": str(tmp_path / "o")},
                                          "stages": [{"stage": "decontam", "eval_paths": cfg.eval_paths, "ngram": 6}]})
    _eval_ngrams.cache_clear()
    with pytest.warns(UserWarning, match=r"decontam skips 3 file\(s\) .*'.*gsm': README.txt, train.jsonl, urls.txt\);"):
        check_stages(pipeline)  # before a run: the eval sets read, what the folder skipped named
    assert _eval_ngrams.cache_info().currsize == 1
    release_checked_models()  # worker processes read their own
    assert _eval_ngrams.cache_info().currsize == 0
    glob = DecontamConfig(eval_paths=(str(tmp_path / "gsm" / "*.jsonl"),), ngram=6)  # a pattern: the same rule
    assert [d.drop for d in decontam(glob, _leak_docs(), StageContext())] == ["decontam", None, None, None]
    named = DecontamConfig(eval_paths=(str(tmp_path / "gsm" / "train.jsonl"),), ngram=6)  # named outright: read
    assert [d.drop for d in decontam(named, _leak_docs(), StageContext())] == [None, "decontam", None, None]


def test_a_folders_readme_license_and_url_list_are_no_eval_files(tmp_path):
    """A folder whose own name is a split word (`mmlu/test/`) gave every eval-format file in it as eval data, its
    README.txt, LICENSE.txt and URL lists too: their boilerplate rejected clean training text that quotes it. Such
    files (README*, LICENSE*/LICENCE*, a name word url/urls) are read only when named outright, as train splits."""
    from lmforge.data.decontam import eval_files

    split = tmp_path / "mmlu" / "test"
    split.mkdir(parents=True)
    _benchmark_folder(split / "gsm")  # (a README and a URL list in a folder below a split folder: the same rule)
    (split / "anatomy_test.csv").write_text("q,a\n")
    (split / "curly_braces.csv").write_text("q,a\n")  # ("url" inside a word is no URL list)
    for name in ("README.txt", "readme_first.txt", "LICENSE.txt", "Licence.txt", "source_urls.jsonl", "url.txt"):
        (split / name).write_text("This dataset is released under the MIT license for research use\n")
    for path in (split, f"{split}/**/*"):
        read, skipped = eval_files((str(path),))
        assert sorted(f.relative_to(split).as_posix() for f in read) == [
            "anatomy_test.csv", "curly_braces.csv", "gsm/test.jsonl"]
        assert sorted(f.name for f in skipped[str(path)]) == [
            "LICENSE.txt", "Licence.txt", "README.txt", "README.txt", "readme_first.txt", "source_urls.jsonl",
            "train.jsonl", "url.txt", "urls.txt"]
    assert eval_files((str(split / "README.txt"),))[0] == [split / "README.txt"]  # named outright: read
    cfg = DecontamConfig(eval_paths=(str(split),), ngram=6)
    assert [d.drop for d in decontam(cfg, _leak_docs(), StageContext())] == ["decontam", None, None, None]


def test_decontamination_split_folders_and_a_folder_with_no_eval_file(tmp_path):
    """MMLU's dev/val/test folders are read and its auxiliary_train split is not; a benchmark that names no split
    (HumanEval.jsonl, mbpp.jsonl: a first rule read only files naming a held-out split) is read: an eval file
    skipped would pass its contamination as clean."""
    from lmforge.data.decontam import eval_files

    mmlu = tmp_path / "mmlu"
    for split in ("test", "val", "dev", "auxiliary_train"):
        (mmlu / split).mkdir(parents=True)
        (mmlu / split / f"anatomy_{split}.csv").write_text("q,a\n")
    (mmlu / "README.txt").write_text("readme\n")
    read, skipped = eval_files((str(mmlu),))
    assert sorted(f.relative_to(mmlu).as_posix() for f in read) == ["dev/anatomy_dev.csv", "test/anatomy_test.csv",
                                                                    "val/anatomy_val.csv"]
    assert sorted(f.name for f in skipped[str(mmlu)]) == ["README.txt", "anatomy_auxiliary_train.csv"]
    assert [f.name for f in eval_files((str(mmlu / "test"),))[0]] == ["anatomy_test.csv"]  # a split folder named
    code = tmp_path / "code"
    code.mkdir()
    for name in ("HumanEval.jsonl.gz", "mbpp.jsonl", "testset.jsonl", "held_out.csv"):
        (code / name).write_bytes(b"")
    assert sorted(f.name for f in eval_files((str(code),))[0]) == [
        "HumanEval.jsonl.gz", "held_out.csv", "mbpp.jsonl", "testset.jsonl"]
    (tmp_path / "only_train").mkdir()
    (tmp_path / "only_train" / "train.jsonl").write_text("{}\n")
    (tmp_path / "only_train" / "README.md").write_text("readme\n")
    with pytest.raises(DataError, match=r"decontam.eval_paths '.*only_train' holds no eval file .* it holds "
                                        r"README.md, train.jsonl\); name the eval files outright"):
        eval_files((str(tmp_path / "only_train"),))


@pytest.mark.parametrize("progress", [True, False])
def test_decontam_says_once_that_it_loads_its_eval_sets(tmp_path, capfd, progress):
    """decontam read its eval sets for 12-20 s in the driver's check and again in each worker, with nothing shown
    (the phase's bar sat at 0). One line before the driver's load names it and that the workers load it again; the
    workers (processes writing to the same stderr) print nothing. progress = false prints it not at all."""
    from lmforge.config import from_dict
    from lmforge.data.decontam import _eval_ngrams
    from lmforge.data.executor import run_local
    from lmforge.data.pipeline import PipelineConfig

    (tmp_path / "evals.jsonl").write_text(json.dumps({"q": "a held out test question never to be trained on"}) + "\n")
    for k in range(3):
        (tmp_path / f"in{k}.jsonl").write_text(json.dumps({"text": f"document {k} of clean training text"}) + "\n")
    cfg = from_dict(PipelineConfig, {
        "workers": 2, "progress": progress, "input": {"paths": [str(tmp_path / f"in{k}.jsonl") for k in range(3)],
                                                      "files_per_shard": 1},
        "output": {"dir": str(tmp_path / "o")},
        "stages": [{"stage": "decontam", "eval_paths": [str(tmp_path / "evals.jsonl")], "ngram": 6}]})
    _eval_ngrams.cache_clear()
    assert run_local(cfg)["balance"]
    err = capfd.readouterr().err
    notice = ("decontam: loading its eval sets' n-gram table (1 file(s), 0.0 MB); each of the 2 workers loads it "
              "again before its first shard\n")
    assert err.count("decontam: loading") == (1 if progress else 0)
    assert (notice in err) == progress
