"""Pre-tokenization helpers: the ASCII `re` twins of the named patterns split exactly like the
`regex` originals, and the cut points used for parallel and streamed work do not change the splits."""

from __future__ import annotations

import itertools
import random

import pytest
import regex

from lmforge.tokenizer.pretokenize import LLAMA3, PATTERNS, ascii_pattern, last_safe_cut, safe_byte_cut, safe_pieces

ALPHABET = [chr(i) for i in range(128)] + ["'s", "'ll", "'VE", "  ", "\n", "\r\n", "\n\n", "abc", "123"] * 6


@pytest.mark.parametrize("name", ["gpt2", "cl100k"])
def test_ascii_twin_splits_like_regex(name):
    fast, slow = ascii_pattern(PATTERNS[name]), regex.compile(PATTERNS[name])
    assert fast is not None
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60)))
        assert fast.findall(text) == slow.findall(text), text


@pytest.mark.parametrize("name", ["gpt2", "cl100k", "o200k", "llama3"])
def test_safe_pieces_do_not_change_pretokens(name):
    """Cut points are pre-token boundaries for every named pattern, and the str and bytes cut rules find the
    same points. o200k's ` ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*` takes "!\\n/" whole, so a newline before "/" is no cut
    (it was: training counts, encode_iterable and corpus shards changed for o200k; found 2026-12 by a sweep)."""
    rng = random.Random(1)
    words = ["x", "y\n", "\n", " ", "  ", "\t", "é", "日本", "🙂", "'s", "12", ".", "(", "\r\n", "<|endoftext|>",
             "/", "!", "\n/", "!\n", "//", "\r", "A", "Ab", "'", "#", "~", "\\", "a\r\n", "9\r\n", "\r\n\r\n", " \r\n"]
    pat = LLAMA3 if name == "llama3" else PATTERNS[name]
    rx = regex.compile(pat)
    for _ in range(1000):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 80)))
        pieces = safe_pieces(text, pat)
        assert "".join(pieces) == text
        assert [t for p in pieces for t in rx.findall(p)] == rx.findall(text), text
        byte_cuts = [0]
        while (c := safe_byte_cut(text.encode(), byte_cuts[-1] + 1, pat, ())) != -1:
            byte_cuts.append(c)
        assert byte_cuts[1:] == list(itertools.accumulate(len(p.encode()) for p in pieces[:-1]))


def test_o200k_newline_before_slash_is_not_cut():
    """The o200k pieces of "a!\\n/b" are ['a', '!\\n/', 'b'] (regex, tiktoken): streaming and training keep them."""
    from lmforge.tokenizer.train import count_text, train_bpe

    text = "a!\n/b"
    pat = PATTERNS["o200k"]
    assert safe_pieces(text, pat) == [text]
    assert count_text(text, pat, ()) == {p.encode(): 1 for p in regex.findall(pat, text)}
    tok = train_bpe(iter(["a!\n/b " * 50]), 262, pattern="o200k", progress=False, workers=1)
    assert list(tok.encode_iterable(["a!\n", "/b"], buffer_chars=1)) == tok.encode(text)


def test_last_safe_cut_respects_specials():
    specials = ("<|a|>", "<|a|><|a|>")
    text = "x\ny<|a|><|a|>z\nw tail"
    end = len(text) - max(map(len, specials))
    cut = last_safe_cut(text, PATTERNS["gpt2"], specials, end)
    assert text[:cut] == "x\ny<|a|><|a|>"  # after the complete longer special, not inside it
    assert last_safe_cut("no cut here", "custom(regex)", (), 5) == 0


def test_a_file_with_windows_line_ends_is_cut_into_chunks(tmp_path):
    """A CRLF file had no safe cut ("\\r\\n" after a line is no "\\n" between printable characters), so training and
    encoding read it as one chunk in one worker however large; now it is cut before each "\\r\\n" after a letter or
    digit, and the counts, the shards' ids and encode_iterable's ids are those of the whole text."""
    from collections import Counter

    from lmforge.tokenizer import train as tr

    lines = [f"line {i} of the corpus, about rivers and towns {i * 7}" for i in range(400)]
    text = "\r\n".join(lines) + "\r\n"
    path = tmp_path / "crlf.txt"
    path.write_bytes(text.encode())
    for name in ("gpt2", "cl100k", "o200k"):
        ranges = tr.file_ranges(path, PATTERNS[name], (), chunk=1000)
        assert len(ranges) > 10 and ranges[0][0] == 0 and ranges[-1][1] == len(text)
        assert all(text.encode()[a:a + 2] == b"\r\n" for a, _ in ranges[1:])
        counts = sum((tr.count_text(text[a:b], PATTERNS[name], ()) for a, b in ranges), start=Counter())
        assert counts == tr.count_text(text, PATTERNS[name], ())
    tok = tr.train_bpe(iter([text]), 300, ["<|endoftext|>"], progress=False, workers=1)
    chunks = [text[i:i + 37] for i in range(0, len(text), 37)]
    assert list(tok.encode_iterable(chunks, buffer_chars=64)) == tok.encode(text)


def test_a_llama3_tokenizer_json_corpus_is_cut_into_chunks(tmp_path):
    """Llama-3's split regex, read from its tokenizer.json, is cut where the named patterns are (it was one chunk per
    file: one worker read a whole corpus file, and encode_iterable buffered its whole stream)."""
    from lmforge.tokenizer.bpe import Tokenizer
    from lmforge.tokenizer.train import file_ranges, train_bpe

    text = "".join(f"Line {i}: the rivers' towns, {i * 7} of them!\n" for i in range(300))
    tok = Tokenizer.from_hf(train_bpe(iter([text]), 300, ["<|begin_of_text|>"], pattern=LLAMA3, progress=False,
                                      workers=1).save_hf(tmp_path))
    assert tok.pattern == LLAMA3
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    assert len(file_ranges(path, tok.pattern, (), chunk=1000)) > 10
    chunks = [text[i:i + 37] for i in range(0, len(text), 37)]
    assert list(tok.encode_iterable(chunks, buffer_chars=64)) == tok.encode(text)
