"""BPE training against a naive trainer (full recount each merge, written from the textbook
definition), plus determinism, parallel/streamed counting and bad-input errors."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
import regex

from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer.pretokenize import PATTERNS
from lmforge.tokenizer.train import count_pretokens, train_bpe

from ..conftest import shared_data as shared


def naive_train(texts: list[str], num_merges: int, specials: list[str], pat: str) -> list[tuple[bytes, bytes]]:
    """Recount every pair after every merge; most frequent wins, ties to the greater byte pair."""
    words: Counter = Counter()
    split = regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))) if specials else None
    for t in texts:
        for seg in (split.split(t) if split else [t]):
            for m in regex.findall(pat, seg):
                words[tuple(bytes([b]) for b in m.encode())] += 1
    merges = []
    while len(merges) < num_merges:
        pairs: Counter = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new_words: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return merges


def _corpus() -> list[str]:
    rng = random.Random(0)
    syll = ["ab", "ba", "aa", "the", "an", " ", "  ", "\n", "é", "ü", "日本", "🙂", "x1", "42", "'s", "!?"]
    return ["".join(rng.choice(syll) for _ in range(400)) + "<|endoftext|>" + "".join(rng.choice(syll) for _ in range(50))
            for _ in range(6)]


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k"])
def test_matches_naive_trainer(pattern):
    texts = _corpus()
    tok = train_bpe(iter(texts), 256 + 1 + 120, ["<|endoftext|>"], pattern=pattern, progress=False)
    ref = naive_train(texts, 120, ["<|endoftext|>"], PATTERNS[pattern])
    assert tok.merges == ref
    assert tok.vocab[256] == b"<|endoftext|>"
    assert all(tok.vocab[257 + k] == a + b for k, (a, b) in enumerate(ref))


def test_ties_go_to_greater_pair_and_specials_never_merge():
    # "ab" and "cd" occur equally often; ("c", "d") is the greater pair, so it is merged first.
    tok = train_bpe(iter(["ab cd ab cd<|x|><|x|>"]), 256 + 1 + 2, ["<|x|>"], progress=False)
    assert tok.merges[0] == (b"c", b"d")
    assert not any(b"<|" in a + b for a, b in tok.merges)


def test_tinyshakespeare_against_naive_and_deterministic():
    text = shared("tinyshakespeare", "input.txt").read_text()[:60_000]
    a = train_bpe(iter([text]), 256 + 60, progress=False)
    assert a.merges == naive_train([text], 60, [], PATTERNS["gpt2"])
    b = train_bpe(iter([text]), 256 + 60, progress=False)
    assert a.merges == b.merges and a.vocab == b.vocab


def test_130kb_to_500_tokens_is_fast(tmp_path):
    text = shared("tinyshakespeare", "input.txt").read_text()[:130_000]
    f = tmp_path / "a.txt"
    f.write_text(text)
    train_bpe([f], 300, progress=False)  # warm imports and regex compilation
    t0 = time.perf_counter()
    tok = train_bpe([f], 500, ["<|endoftext|>"], progress=False)
    elapsed = time.perf_counter() - t0
    assert len(tok.merges) == 500 - 257
    assert elapsed < 1.0, f"training took {elapsed:.2f}s"


def test_parallel_chunked_counting_equals_inline(tmp_path, monkeypatch):
    import lmforge.tokenizer.train as tr

    text = shared("tinyshakespeare", "input.txt").read_text()[:300_000]
    f = tmp_path / "a.txt"
    f.write_text(text.replace("\n\n", "\n\n<|endoftext|>", 50))
    specials = ("<|endoftext|>",)
    inline, _ = count_pretokens([f], PATTERNS["gpt2"], specials, workers=1)
    monkeypatch.setattr(tr, "CHUNK_BYTES", 20_000)
    monkeypatch.setattr(tr, "INLINE_BYTES", 0)
    assert len(tr.file_ranges(f, PATTERNS["gpt2"], specials)) > 10
    parallel, stats = count_pretokens([f], PATTERNS["gpt2"], specials, workers=2)
    streamed, _ = count_pretokens(iter(text.split("\n\n")), PATTERNS["gpt2"], specials, workers=2)
    assert parallel == inline and stats["bytes"] == f.stat().st_size
    whole = Counter(m.encode() for seg in f.read_text().split("<|endoftext|>") for m in regex.findall(PATTERNS["gpt2"], seg))
    assert inline == whole
    assert sum(streamed.values()) > 0


def test_undecodable_bytes_are_counted(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"hello \xff\xfe world\n" * 10)
    stats: dict = {}
    tok = train_bpe([f], 262, progress=False, stats=stats)
    assert stats["undecodable_bytes"] == 20
    assert tok.vocab_size == 262 and tok.decode(tok.encode("hello \ufffd")) == "hello \ufffd"


@pytest.mark.parametrize("kwargs, err, words", [
    (dict(vocab_size=256, special_tokens=["<|endoftext|>"]), ConfigError, "vocab_size=256"),
    (dict(vocab_size=300, special_tokens=["<|a|>", "<|a|>"]), ConfigError, "twice"),
    (dict(vocab_size=300, special_tokens=[""]), ConfigError, "non-empty"),
    (dict(vocab_size=300, pattern="(unclosed"), ConfigError, "not a valid regex"),
])
def test_bad_config(tmp_path, kwargs, err, words):
    f = tmp_path / "a.txt"
    f.write_text("some text")
    with pytest.raises(err, match=words):
        train_bpe([f], progress=False, **kwargs)


def test_missing_and_empty_input(tmp_path):
    with pytest.raises(DataError, match="not found"):
        train_bpe([tmp_path / "nope.txt"], 300, progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        train_bpe([tmp_path / "empty.txt"], 300, progress=False)


def test_bytes_not_utf8_are_said_once_and_as_what_they_became(tmp_path, capsys):
    """train_bpe printed "undecodable byte(s) ... were replaced by U+FFFD" while the bytes were read as Windows-1252
    (data.readers.decode_utf8), and `lmforge tokenizer train` then printed its own note saying so: two lines that
    contradicted each other."""
    import warnings

    from lmforge.cli import main as lmforge_main

    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\u00e9 na\u00efve r\u00e9sum\u00e9\n".encode("cp1252") * 5)
    with pytest.warns(UserWarning, match=r"^20 byte\(s\) of the input are not UTF-8 and were read as Windows-1252"):
        tok = train_bpe([f], 262, progress=False)
    assert "\u00e9" in tok.decode(tok.encode("caf\u00e9"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # given the stats, the caller says it
        train_bpe([f], 262, progress=False, stats={})
    capsys.readouterr()
    assert lmforge_main(["tokenizer", "train", "--input", str(f), "--vocab-size", "262", "--out", str(tmp_path / "t"),
                         "--workers", "1", "--progress", "False"]) == 0
    out = capsys.readouterr()
    said = out.out + out.err
    assert "U+FFFD" not in said and said.count("Windows-1252") == 1


def test_counting_shows_a_bar_of_the_bytes_read(tmp_path, capsys):
    """Counting pre-tokens (most of a large corpus's training time) showed no progress: nothing was printed before
    the merges' bar."""
    f = tmp_path / "c.txt"
    f.write_text("the cat sat on the mat\n" * 100)  # 2,300 bytes
    train_bpe([f], 270, progress=True, workers=1)
    err = capsys.readouterr().err
    assert "count pre-tokens:   0%|          | 0.00/2.30k" in err and "bpe merges" in err
    train_bpe([f], 270, progress=False, workers=1)
    assert capsys.readouterr().err == ""
