"""The fast-path agreement check (`lmforge.tokenizer.agreement`): a pass is remembered on disk so a second
load skips it and behaves the same; a failure is never remembered; changed merges, ids or code miss the record;
an unreadable record re-runs the check. Plus the table-free GPT-2 character parsing used by every load."""

from __future__ import annotations

import json
import string

import pytest

from lmforge.errors import DataError
from lmforge.tokenizer import agreement
from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.formats import char_to_byte, str_to_bytes

pytest.importorskip("tiktoken")

ALPHABET = (string.ascii_uppercase + "bcdefghijklmno").encode()  # 40 letters, no "a"
TEXTS = ["AB CD bcde ONMLK aaa aaaa", "the quick brown fox, 12 aaaaa!", "AAAA BBbb\n\nZ"]


def _tokenizer(extra: list[tuple[bytes, bytes]] = (), offset: int = 0) -> Tokenizer:
    """Bytes at ids offset..offset+255, then every two-letter token over ALPHABET (1,600 merges, enough to be
    remembered) and `extra` merges, ids in merge order."""
    vocab = {offset + i: bytes([i]) for i in range(256)}
    merges = [(bytes([x]), bytes([y])) for x in ALPHABET for y in ALPHABET] + list(extra)
    for k, (a, b) in enumerate(merges):
        vocab[offset + 256 + k] = a + b
    return Tokenizer(vocab, merges, ["<|endoftext|>"])


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Records in tmp_path; counts runs of the check (one per tokenizer that runs it) and their answers."""
    monkeypatch.setenv(agreement.CACHE_ENV, str(tmp_path))
    seen: list[bool] = []
    check = agreement.check

    def counted(*args):
        seen.append(check(*args))
        return seen[-1]

    monkeypatch.setattr(agreement, "check", counted)
    return seen


# "aaa" is made from ("a", "aa"), but BPE turns "aaa" into ("aa", "a") first: tiktoken would disagree
DISAGREEING = [(b"a", b"a"), (b"a", b"aa")]


def test_second_load_skips_the_check_and_encodes_the_same(calls, tmp_path):
    first = _tokenizer()
    path = first.save(tmp_path / "tok")
    assert calls == [True] and len(list(tmp_path.glob("*.json"))) == 1
    second, third = Tokenizer.load(path), _tokenizer()
    assert calls == [True]  # neither ran it again
    for tok in (first, second, third):
        assert tok.fast
        for t in TEXTS:
            assert tok.encode(t) == first.encode(t) == first.encode_reference(t), t


def test_a_tokenizer_failing_the_check_fails_on_every_load(calls, tmp_path):
    for _ in range(3):
        tok = _tokenizer(DISAGREEING)
        assert not tok.fast
        aa = tok.encode("aa")
        assert aa == [tok._by_bytes[b"aa"]] and tok.encode("aaa") == aa + [97]
    assert calls == [False, False, False] and not list(tmp_path.glob("*.json"))


def test_changed_merges_or_ids_miss_the_record(calls):
    assert _tokenizer().fast and _tokenizer([(b"AB", b"C")]).fast and _tokenizer(offset=7).fast
    assert calls == [True, True, True]
    assert not _tokenizer(DISAGREEING).fast  # one pair more, and this one fails
    assert calls == [True, True, True, False]


def test_changed_code_misses_the_record(calls, monkeypatch):
    _tokenizer()
    monkeypatch.setattr(agreement, "CHECK_VERSION", agreement.CHECK_VERSION + 1)
    _tokenizer()
    assert calls == [True, True]


@pytest.mark.parametrize("record", ["{not json", '{"agrees": true}', "[true]", None])
def test_an_unreadable_or_foreign_record_reruns_the_check(calls, tmp_path, record):
    _tokenizer()
    (path,) = tmp_path.glob("*.json")
    if record is None:  # the right file name holding another key's pass
        record = json.dumps({"key": "0" * 64, "agrees": True})
    path.write_text(record)
    assert _tokenizer().fast and calls == [True, True]
    assert json.loads(path.read_text())["key"] == path.stem  # rewritten whole


def test_a_small_tokenizer_is_checked_without_a_record(calls, tmp_path):
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[256], vocab[257] = b"ab", b"abc"
    for _ in range(2):
        assert Tokenizer(vocab, [(b"a", b"b"), (b"ab", b"c")]).fast
    assert calls == [True, True] and not list(tmp_path.iterdir())


def test_an_unwritable_cache_still_answers(calls, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(agreement.CACHE_ENV, str(blocker / "below"))  # a folder below a file cannot exist
    assert _tokenizer().fast and not _tokenizer(DISAGREEING).fast


def test_str_to_bytes_accepts_exactly_the_byte_level_characters():
    table = char_to_byte()
    every = "".join(table)
    assert str_to_bytes(every) == bytes(table[c] for c in every)
    for c in map(chr, range(0x800)):
        if c in table:
            assert str_to_bytes("x" + c) == b"x" + bytes([table[c]])
        else:
            with pytest.raises(DataError, match="not a byte-level BPE character"):
                str_to_bytes("x" + c)
