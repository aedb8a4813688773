"""Tokenizer training and corpus encoding follow a text file's byte-order mark, as the data pipeline's readers do
(data.readers.decode_text): a UTF-16 file was read as UTF-8 (NULs and U+FFFD trained and encoded), and a UTF-8 mark
stayed as U+FEFF (its three bytes became a token and the first ids of every shard)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import lmforge as lf
from lmforge.data.shards import TokenFile
from lmforge.errors import DataError
from lmforge.tokenizer.byte import ByteTokenizer
from lmforge.tokenizer.corpus import corpus_stats, encode_to_shards

TEXT = "hello world, the cat sat\r\nsecond line of the text\n" * 30 + "café 日本 end\n"
MARKED = {"utf-8-sig": b"\xef\xbb\xbf" + TEXT.encode(), "utf-16-le": TEXT.encode("utf-16"),
          "utf-16-be": b"\xfe\xff" + TEXT.encode("utf-16-be")}


def _train(path):
    return lf.train_bpe([str(path)], 300, ["<|endoftext|>"], progress=False, workers=1)


@pytest.fixture
def plain(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_bytes(TEXT.encode())
    return path


@pytest.mark.parametrize("kind", sorted(MARKED))
def test_training_follows_the_byte_order_mark(tmp_path, plain, kind):
    marked = tmp_path / "marked.txt"
    marked.write_bytes(MARKED[kind])
    tok = _train(marked)
    assert tok.merges == _train(plain).merges
    assert not any(b"\xef\xbb" in a + b or b"\x00" in a + b for a, b in tok.merges)


@pytest.mark.parametrize("kind", sorted(MARKED))
def test_encoding_follows_the_byte_order_mark(tmp_path, plain, kind):
    tok = _train(plain)
    marked = tmp_path / "marked.txt"
    marked.write_bytes(MARKED[kind])
    rep = encode_to_shards(tok, [str(marked)], tmp_path / "out", val_fraction=0.3, progress=False)
    train, val = (np.asarray(TokenFile(rep.shards[s]).tokens).tolist() for s in ("train", "val"))
    assert train[0] == val[0] == tok.eot_id and val[1:]  # two documents: the file and its validation tail
    assert tok.decode(train[1:]) + tok.decode(val[1:]) == TEXT
    assert rep.undecodable_bytes == 0


def test_byte_tokenizer_encodes_a_utf16_file_as_its_text(tmp_path):
    marked = tmp_path / "marked.txt"
    marked.write_bytes(MARKED["utf-16-le"])
    rep = encode_to_shards(ByteTokenizer(), [str(marked)], tmp_path / "out", progress=False)
    assert np.asarray(TokenFile(rep.shards["train"]).tokens).tolist()[1:] == list(TEXT.encode())


def test_stats_count_the_text_in_utf8_bytes(tmp_path, plain):
    tok = _train(plain)
    marked = tmp_path / "marked.txt"
    marked.write_bytes(MARKED["utf-16-le"])
    assert corpus_stats(tok, [str(marked)], progress=False)["bytes"] == len(TEXT.encode()) == \
        corpus_stats(tok, [str(plain)], progress=False)["bytes"]
    rep = encode_to_shards(tok, [str(marked)], tmp_path / "out", progress=False)
    assert rep.bytes == len(TEXT.encode())


def test_a_file_holding_only_a_byte_order_mark_is_empty(tmp_path):
    marked = tmp_path / "marked.txt"
    marked.write_bytes(b"\xef\xbb\xbf")
    with pytest.raises(DataError, match="training input is empty"):
        _train(marked)


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_a_utf16_file_is_cut_into_ranges_at_the_points_its_utf8_copy_is(tmp_path, monkeypatch, codec):
    """A UTF-16 file was one range, read and decoded whole by one worker, where a UTF-8 file is cut into ranges at safe
    points. It is now cut at the safe points of its text (surrogate pairs whole, ranges at even offsets): the ranges'
    texts join to the whole file's, and training and encoding give what the UTF-8 copy gives."""
    from lmforge.tokenizer import train as train_mod
    from lmforge.tokenizer.pretokenize import PATTERNS

    text = "".join(f"line {i} caf\u00e9 \U0001f600\U0001f680 \u65e5\u672c\r\n" + ("<|endoftext|>" if i % 7 == 0 else "")
                   + ("x" * (i % 5) + "\n") for i in range(400))
    marked, plain = tmp_path / "u16.txt", tmp_path / "u8.txt"
    marked.write_bytes(("\ufeff" + text).encode(codec))
    plain.write_bytes(text.encode())
    monkeypatch.setattr(train_mod, "CHUNK_BYTES", 1000)
    specials = ("<|endoftext|>",)
    ranges = train_mod.file_ranges(marked, PATTERNS["gpt2"], specials)
    assert len(ranges) > 20 and all(a % 2 == 0 for a, _ in ranges) and ranges[-1][1] == marked.stat().st_size
    texts = [train_mod.read_range(marked, a, b)[1] for a, b in ranges]
    assert "".join(texts) == text and all(train_mod.read_range(marked, a, b)[2] == 0 for a, b in ranges)
    whole = train_mod.count_text(text, PATTERNS["gpt2"], specials)
    assert sum((train_mod.count_text(t, PATTERNS["gpt2"], specials) for t in texts), Counter()) == whole
    tok = _train(plain)
    assert _train(marked).merges == tok.merges
    ids = [np.asarray(TokenFile(encode_to_shards(tok, [str(p)], tmp_path / p.stem, progress=False).shards["train"])
                      .tokens).tolist() for p in (marked, plain)]
    assert ids[0] == ids[1]
    window = "\U0001f600ab!\nc\U0001f680".encode(codec)  # the safe cut is before "c", 12 bytes in
    for part, cut in [(window, 12), (window[2:], 10), (window[2:-2], 10)]:  # a surrogate pair cut at either edge
        assert train_mod._utf16_cut(part, codec, PATTERNS["gpt2"], ()) == cut


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_a_utf16_validation_tail_starts_at_a_line_start(tmp_path, codec):
    """The validation tail of a UTF-16 file begins after a line end found by a byte search: never inside a code unit
    or a surrogate pair, where a 0x0A byte is half of another character (U+0A0A, U+0A00, U+010A, U+0D0A, the low
    surrogate DE0A of U+1F60A) or a newline's two bytes straddle two units (U+0A00 U+0A0A), whatever offset (odd or
    even) the fraction gives. (It held already: _utf16_line_start searches from an even offset and skips odd matches;
    this guards it.)"""
    from lmforge.tokenizer.corpus import _split_point
    from lmforge.tokenizer.pretokenize import PATTERNS

    line = "\u0a0a\u0a00\u0a0a \u010a\U0001f60a\u0d0a\u0a0d x\n"
    text = line * 40
    path = tmp_path / "u16.txt"
    path.write_bytes(("\ufeff" + text).encode(codec))
    size = path.stat().st_size
    starts = {2 + len(text[:k].encode(codec)) for k in range(1, len(text)) if text[k - 1] == "\n"} | {size}
    for target in range(size // 2, size // 2 + 2 * len(line.encode(codec))):
        cut = _split_point(path, 1 - (target + 0.5) / size, PATTERNS["gpt2"], ())
        assert cut in starts and cut >= target, (target, cut)
        head = path.read_bytes()[2:cut].decode(codec)  # (strict: no half of a unit or of a pair at the cut)
        assert text.startswith(head) and head.endswith("\n")
