"""A tokenizer.json's added_tokens as HF `tokenizers` reads them: a malformed entry is a one-line error naming the
file, the token and the fix, in both readers (byte-level and SentencePiece-style)."""

from __future__ import annotations

import json
import re
from functools import lru_cache

import pytest

from lmforge.errors import DataError
from lmforge.tokenizer.load import load_tokenizer
from lmforge.tokenizer.train import train_bpe
from tests.tokenizer.sp_files import sp_doc


@lru_cache(maxsize=1)
def _byte_level_doc() -> str:
    import tempfile
    from pathlib import Path

    tok = train_bpe(iter(["the cat sat on the mat " * 20]), 269, ["<|endoftext|>"], progress=False, workers=1)
    with tempfile.TemporaryDirectory() as d:
        return tok.save_hf(Path(d)).read_text()


def _write(tmp_path, doc: dict):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc))
    return path


BAD_ENTRIES = [  # (change to the first added token, what the error says)
    (lambda t: t.pop("id"), r"added token '<\|endoftext\|>' has no id, not an integer >= 0; set its \"id\""),
    (lambda t: t.update(id="256"), r"added token '<\|endoftext\|>' has id '256', not an integer >= 0"),
    (lambda t: t.update(id=-1), r"added token '<\|endoftext\|>' has id -1, not an integer >= 0"),
    (lambda t: t.update(id=True), r"added token '<\|endoftext\|>' has id True, not an integer >= 0"),
    (lambda t: t.pop("content"), r"added token with id \d+ has no content, not its text .*; set its \"content\""),
    (lambda t: t.update(content=5), r"added token with id \d+ has content 5, not its text"),
    (lambda t: t.update(special="yes"), r"added token '<\|endoftext\|>' has special='yes', not true or false; set"),
    (lambda t: t.update(normalized="no"), r"added token '<\|endoftext\|>' has normalized='no', not true or false"),
]


@pytest.mark.parametrize("change, words", BAD_ENTRIES)
def test_a_malformed_byte_level_added_token_is_a_one_line_error(tmp_path, change, words):
    """A missing or string id was a KeyError/TypeError traceback, a string flag read as true ("no" normalized)."""
    doc = json.loads(_byte_level_doc())
    change(doc["added_tokens"][0])
    path = _write(tmp_path, doc)
    with pytest.raises(DataError, match=f"^{path}: {words}") as e:
        load_tokenizer(path)
    assert "\n" not in str(e.value)


def test_malformed_added_tokens_lists_are_refused(tmp_path):
    """An entry that is no object, or added_tokens that is no list, was skipped (the tokens silently gone)."""
    doc = json.loads(_byte_level_doc())
    doc["added_tokens"] = ["<|endoftext|>"]
    with pytest.raises(DataError, match=r"added_tokens entry '<\|endoftext\|>' is not an object; write it as"):
        load_tokenizer(_write(tmp_path, doc))
    doc["added_tokens"] = {"<|endoftext|>": 256}
    with pytest.raises(DataError, match=r"added_tokens is a dict, not a list; write it as a list"):
        load_tokenizer(_write(tmp_path, doc))


@pytest.mark.parametrize("change, words", BAD_ENTRIES[1:2] + BAD_ENTRIES[3:4] + BAD_ENTRIES[6:7])
def test_a_malformed_sentencepiece_added_token_is_refused_alike(tmp_path, change, words):
    """The SentencePiece-style reader took id True as 1 and a string flag as true: the same check now."""
    doc = sp_doc()
    t = doc["added_tokens"][0]
    change(t)
    words = words.replace(r"'<\|endoftext\|>'", repr(t["content"]))
    path = _write(tmp_path, doc)
    with pytest.raises(DataError, match=f"^{path}: {words}"):
        load_tokenizer(path)


BYTE_LEVEL_ADDED = ["Ġhello", "ĊĠ", "café", "ĠÃ©", "<|a b|>", "日本"]  # GPT-2 table characters only, then not


@pytest.mark.parametrize("special", [True, False])
def test_an_added_token_of_byte_level_characters_decodes_as_hf_decodes_it(tmp_path, special):
    """HF's ByteLevel decoder maps an added token's characters through GPT-2's table where all are in it ("Ġhello"
    is " hello", "café" ends in the lone byte 0xE9); lmforge decoded every added token as its UTF-8 text."""
    tokenizers = pytest.importorskip("tokenizers")
    doc = json.loads(_byte_level_doc())
    n = max(doc["model"]["vocab"].values()) + 1
    doc["added_tokens"] += [{"id": n + k, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": special} for k, s in enumerate(BYTE_LEVEL_ADDED)]
    path = _write(tmp_path, doc)
    hf, ours = tokenizers.Tokenizer.from_file(str(path)), load_tokenizer(path)
    text = "the cat" + "".join(f"{s}sat" for s in BYTE_LEVEL_ADDED)
    ids = ours.encode(text)
    assert ids == hf.encode(text).ids
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False) == (
        "the cat hellosat\n sat" + "caf\ufffdsat ésat<|a b|>sat日本sat")
    for i in range(n, n + len(BYTE_LEVEL_ADDED)):
        assert ours.decode([i]) == hf.decode([i], skip_special_tokens=False)
    assert ours.token_bytes(n) == b" hello"  # what streaming detokenization reads


def test_a_special_of_byte_level_characters_decodes_alike_in_lmforge_and_its_hf_export(tmp_path):
    """One rule for every byte-level Tokenizer: a trained tokenizer's special "ĠĊ" decodes as its export does."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = train_bpe(iter(["the cat sat on the mat " * 20]), 269, ["<|endoftext|>", "ĠĊ"], progress=False, workers=1)
    ids = tok.encode("the ĠĊcat<|endoftext|>")
    hf = tokenizers.Tokenizer.from_file(str(tok.save_hf(tmp_path)))
    assert ids == hf.encode("the ĠĊcat<|endoftext|>").ids
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False) == "the  \ncat<|endoftext|>"


def _token(content: str, i: int) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
            "special": True}


def test_added_token_ids_are_those_hf_gives_not_those_the_file_lists(tmp_path):
    """HF numbers added tokens that are no vocab entry itself, in order, past the vocabulary and the added tokens before
    them: a file listing a gap (300 after a vocabulary of 269) or two ids swapped gave other ids than HF, or (an id
    a vocab entry holds) a ConfigError; now HF's ids, with a warning naming the change."""
    tokenizers = pytest.importorskip("tokenizers")
    doc = json.loads(_byte_level_doc())
    n = len(doc["model"]["vocab"])
    doc["added_tokens"] += [_token("<a>", 300), _token("<c>", n + 2), _token("<b>", n + 1), _token("<d>", 5)]
    path = _write(tmp_path, doc)
    with pytest.warns(UserWarning, match=rf"4 added token\(s\) have other ids in HF tokenizers than the file lists "
                                         rf"\('<a>' 300 -> {n}, '<c>' {n + 2} -> {n + 1}, '<b>' {n + 1} -> {n + 2}, "):
        ours = load_tokenizer(path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert {s: ours.special_tokens[s] for s in "<a> <b> <c> <d>".split()} == {
        s: hf.token_to_id(s) for s in "<a> <b> <c> <d>".split()} == {"<a>": n, "<c>": n + 1, "<b>": n + 2, "<d>": n + 3}
    text = "the<a>cat<b><c> sat<d>"
    assert ours.encode(text) == hf.encode(text).ids


def test_sentencepiece_added_token_ids_are_those_hf_gives(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    doc = sp_doc()
    n = max([*doc["model"]["vocab"].values(), *(t["id"] for t in doc["added_tokens"])]) + 1
    doc["added_tokens"] += [_token("<b>", n + 1), _token("<a>", n)]
    path = _write(tmp_path, doc)
    with pytest.warns(UserWarning, match="2 added token"):
        ours = load_tokenizer(path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert ours.special_tokens["<b>"] == hf.token_to_id("<b>") == n
    assert ours.encode("king<a>queen<b>") == hf.encode("king<a>queen<b>", add_special_tokens=False).ids


def test_an_added_id_hf_gives_a_vocab_entry_too_is_refused_naming_the_gap(tmp_path):
    """A vocabulary whose ids leave a gap (its last entry moved from n - 1 to n): HF numbers an added token from the
    entry count, n, the id that entry holds (HF gives the id two meanings). It was 'special token ... collides with
    token ...' naming no fix; now one line naming the file's id, HF's, the entry and the fix."""
    doc = json.loads(_byte_level_doc())
    vocab = doc["model"]["vocab"]
    n = len(vocab)
    last = max(vocab, key=vocab.get)
    vocab[last] = n
    doc["added_tokens"] += [_token("<b>", n + 1)]
    with pytest.raises(DataError, match=rf"added token '<b>' \(id {n + 1} in the file\) takes id {n} in HF tokenizers"
                                        rf".* is the vocabulary's {re.escape(repr(last))}: the vocabulary's ids "
                                        r"leave a gap; number model.vocab 0..N-1 without gaps$"):
        load_tokenizer(_write(tmp_path, doc))
