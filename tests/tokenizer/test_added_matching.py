"""Where added tokens are matched, against HF tokenizers' AddedVocabulary: tokens a tokenizer.json marks
"normalized": true (what HF's add_tokens gives a token that is not special) are matched in the normalized text, by
their normalized content, after the others are split out of the raw text (the byte-level Tokenizer matched them in
the raw text, with the rest, so under NFC "[e" + U+0301 + "]" did not match "[é]"); and with special tokens left as
text (encode_ordinary, HF's encode_special_tokens) a special token's match is text whole, no added token found inside
it but a normalized one (both tokenizer kinds matched a non-special "<|a" inside the special "<|a|>")."""

from __future__ import annotations

import json
import warnings
import random

import pytest

from lmforge.tokenizer.bpe import Tokenizer


@pytest.fixture(scope="module")
def byte_level_doc() -> dict:
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["the café sat on the mat <|a|>"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return json.loads(hf.to_str())


def _with_added(doc: dict, normalizer: dict | None, tokens: list[tuple[str, bool, bool]]) -> dict:
    """`doc` with `normalizer` and added tokens (content, special, normalized) past its vocabulary."""
    doc = json.loads(json.dumps(doc))
    doc["normalizer"] = normalizer
    i = max(doc["model"]["vocab"].values()) + 1
    for k, (content, special, normalized) in enumerate(tokens):
        doc["added_tokens"].append({"id": i + k, "content": content, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": normalized, "special": special})
    return doc


def _hf_ids(hf, text: str, ordinary: bool = False) -> list[int]:
    hf.encode_special_tokens = ordinary
    try:
        return hf.encode(text, add_special_tokens=False).ids
    finally:
        hf.encode_special_tokens = False


def _texts(alphabet: list[str], n: int = 150, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10))) for _ in range(n)]


def _check_byte_level(doc: dict, texts: list[str], tmp_path) -> None:
    """encode, encode_ordinary, the reference path and encode_iterable cut at every character agree with HF, for the
    tokenizer read from `doc`, saved and read back, and exported to tokenizer.json (which HF also agrees with)."""
    from tokenizers import Tokenizer as HF

    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    hf, tok = HF.from_str(json.dumps(doc)), Tokenizer.from_hf(tmp_path)
    exported = tok.save_hf(tmp_path / "out" / "tokenizer.json")
    toks = [tok, Tokenizer.load(tok.save(tmp_path / "lmforge.json")), Tokenizer.from_hf(exported)]
    hf_exported = HF.from_file(str(exported))
    for text in texts:
        want, ordinary = _hf_ids(hf, text), _hf_ids(hf, text, ordinary=True)
        assert _hf_ids(hf_exported, text) == want, ascii(text)
        for t in toks:
            got = (t.encode(text), t.encode_ordinary(text), t.encode_reference(text),
                   list(t.encode_iterable(list(text), buffer_chars=1)))
            assert got == (want, ordinary, want, want), ascii(text)


@pytest.mark.parametrize("form", [None, "NFC", "NFD", "NFKC"])
def test_byte_level_normalized_added_tokens_match_in_the_normalized_text(byte_level_doc, form, tmp_path):
    """Under NFC, "[e" + U+0301 + "]" is "[é]", the normalized token; under NFKC "[ﬁ]" is "[fi]" and matches it; a
    token not normalized matches only its raw text; and with no normalizer the raw-text ones are matched first
    ("b<s>" in "ab<s>", before the normalized "ab")."""
    tokens = [("[\u00e9]", False, True), ("[e\u0301x]", False, False), ("[\ufb01]", False, True),
              ("b<s>", True, False), ("ab", False, True), ("a\nb", False, True)]
    doc = _with_added(byte_level_doc, form and {"type": form}, tokens)
    fixed = ["caf[e\u0301]", "[\u00e9x]", "[\ufb01] [fi]", "ab<s>", "xa\nb\ny"]
    _check_byte_level(doc, fixed + _texts(["[", "]", "e", "\u0301", "\u00e9", "x", "\ufb01", "fi", "a", "b", "<s>",
                                           "\n", " "]), tmp_path)
    if form == "NFC":
        tok = Tokenizer.from_hf(tmp_path)
        assert tok.encode("caf[e\u0301]")[-1] == tok.special_tokens["[\u00e9]"]
        assert tok.normalized == ("[\u00e9]", "[\ufb01]", "ab", "a\nb")


@pytest.mark.parametrize("tokens", [
    [("<|a|>", True, False), ("<|a", False, False)],
    [("<|a|>", True, False), ("a|>", False, False), ("|a", False, True)],
    [("<|a|>", True, True), ("<|a", False, False)],
    [("<|a", True, False), ("<|a|>", False, False)]])
def test_byte_level_overlapping_special_and_non_special_tokens_match_hf(byte_level_doc, tokens, tmp_path):
    """encode_ordinary leaves "<|a|>" text whole, as HF's encode_special_tokens does, where it matched the non-special
    "<|a" (or "a|>") inside it; encode with no special allowed alike."""
    doc = _with_added(byte_level_doc, None, tokens)
    _check_byte_level(doc, ["<|a|>", "x<|a|>y", "<|a<|a|>", "<|a|>a|>"] + _texts(["<|a|>", "<|a", "a|>", "|", "a",
                                                                                  "<", ">", " "]), tmp_path)
    tok = Tokenizer.from_hf(tmp_path)
    if tokens == [("<|a|>", True, False), ("<|a", False, False)]:  # (the special's text is text whole)
        ids = tok.encode_ordinary("x<|a|>y")
        assert ids == tok.encode("x<|a|>y", allowed_special=set(), disallowed_special=())
        assert not {tok.special_tokens[c] for c, _, _ in tokens} & set(ids)


@pytest.mark.parametrize("flags", [{}, {"lstrip": True}, {"rstrip": True}, {"normalized": True}])
def test_sentencepiece_overlapping_special_and_non_special_tokens_match_hf(flags):
    """SentencePieceBPE's encode_ordinary matched the non-special "<|a" inside the special "<|a|>" too."""
    from lmforge.tokenizer.sentencepiece import SentencePieceBPE
    from tests.tokenizer.sp_files import added, hf, sp_doc

    doc = sp_doc()
    special = added(doc, "<|a|>")
    inner = [added(doc, "<|a", special=False, **flags), added(doc, "a|>", special=False, **flags)]
    sp, ref = SentencePieceBPE(doc), hf(doc)
    want = _hf_ids(ref, "the <|a|> king", ordinary=True)
    # (a normalized token is matched in the normalized text, which the special's is part of: HF finds it there)
    assert special not in want and bool(set(inner) & set(want)) == bool(flags.get("normalized"))
    assert sp.encode_ordinary("the <|a|> king") == want
    for text in ["<|a<|a|>", " <|a|>a|> "] + _texts(["<|a|>", "<|a", "a|>", "|", "a", " ", "the", "king", "</s>"]):
        assert (sp.encode(text), sp.encode_ordinary(text)) == (_hf_ids(ref, text), _hf_ids(ref, text, True)), text


def test_byte_level_added_tokens_spelled_as_vocab_entries_take_their_ids_as_in_hf(byte_level_doc, tmp_path):
    """An added token whose content is also a model-vocab entry under another id ("Ã", byte 0xC3's spelling; the
    merged "at", " the" as "Ġthe") takes that entry's id in HF, which stays the byte or piece BPE emits and decodes to
    those bytes; read_hf removed the entry by its text (byte 0xC3 gone: the file did not load). GPT-2's same-id case
    ("é" listed at byte 0xE9's own id) alike; HF's decode of every id is lmforge's."""
    from tokenizers import Tokenizer as HF

    from lmforge.tokenizer.formats import bytes_to_str

    doc = json.loads(json.dumps(byte_level_doc))
    vocab, new = doc["model"]["vocab"], max(byte_level_doc["model"]["vocab"].values()) + 1
    for content, i, special in [("Ã", new, True), ("é", vocab["é"], True), ("at", new + 1, False),
                                ("Ġthe", vocab["at"], False)]:  # (HF ignores the listed id of an entry in the vocab)
        doc["added_tokens"].append({"id": i, "content": content, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": special})
    _check_byte_level(doc, ["Ã", "Ä", "é", "验", "cat", " the", "Ġthe", "Ã©"] + _texts(
        ["Ã", "Ä", "é", "验", "at", " the", "Ġthe", "c", " ", "<|a|>"]), tmp_path)
    hf, tok = HF.from_str(json.dumps(doc)), Tokenizer.from_hf(tmp_path)
    assert {s: tok.special_tokens[s] for s in ("Ã", "é", "at", "Ġthe")} == {
        "Ã": vocab["Ã"], "é": vocab["é"], "at": vocab["at"], "Ġthe": vocab["Ġthe"]}
    assert tok.encode("Ä") == [vocab["Ã"], vocab[bytes_to_str(b"\x84")]] and tok.decode([vocab["Ã"]]) == "\ufffd"
    with pytest.warns(UserWarning, match=r"\['at', 'Ġthe'\] marked not special"):  # (GPT-2 files cannot say so)
        gpt2 = Tokenizer.from_gpt2_files(*tok.save_gpt2(tmp_path / "gpt2"))  # (read_gpt2 removed them by text too)
    assert [gpt2.encode(t) for t in ("Ã", "Ä", "é", "验", "Ã©")] == [tok.encode(t) for t in ("Ã", "Ä", "é", "验", "Ã©")]
    for t in (tok, Tokenizer.load(tok.save(tmp_path / "again.json")), gpt2):
        assert [t.decode([i]) for i in range(hf.get_vocab_size())] == [
            hf.decode([i], skip_special_tokens=False) for i in range(hf.get_vocab_size())]


def test_disallowed_normalized_specials_are_looked_for_where_encode_matches_them(byte_level_doc, tmp_path):
    """encode(disallowed_special="all") raises where encode would match a special: a normalized one in the normalized
    text (under NFC "[e" + U+0301 + "]" is "[é]"; "xe" + U+0301 is "xé", no "xe"), the others in the raw text. The
    raw text was searched for every one: "[e" + U+0301 + "]" was encoded as text without a word, "xe" + U+0301
    refused."""
    doc = _with_added(byte_level_doc, {"type": "NFC"}, [("[\u00e9]", True, True), ("xe", True, True),
                                                         ("<s>", True, False)])
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    tok = Tokenizer.from_hf(tmp_path)
    special_ids = set(tok.special_tokens.values()) - {tok.special_tokens["<|endoftext|>"]}
    with pytest.raises(ValueError, match=r"disallowed special token '\[\u00e9\]'"):
        tok.encode("ca[e\u0301]", allowed_special=set())
    assert tok.encode("xe\u0301", allowed_special=set()) == tok.encode_ordinary("xe\u0301")
    for text in ["[e\u0301]", "[\u00e9]", "xe\u0301", "xe", "<s>", "x<s>e"] + _texts(
            ["[", "]", "e", "\u0301", "\u00e9", "x", "<s>", " "], n=300):
        matched = bool(special_ids & set(tok.encode(text)))
        try:
            ids = tok.encode(text, allowed_special=set())
        except ValueError:
            assert matched, ascii(text)
        else:
            assert not matched and ids == tok.encode_ordinary(text), ascii(text)


def test_sentencepiece_added_tokens_spelled_as_vocab_pieces_take_their_ids_as_in_hf():
    """SentencePieceBPE gave an added "king" (a piece of model.vocab) the id the file lists; HF gives it the piece's."""
    from lmforge.tokenizer.sentencepiece import SentencePieceBPE
    from tests.tokenizer.sp_files import added, hf, sp_doc

    doc = sp_doc()
    added(doc, "king")
    added(doc, "queen", special=False, normalized=True)
    sp, ref = SentencePieceBPE(doc), hf(doc)
    pieces = doc["model"]["vocab"]
    assert {s: sp.special_tokens[s] for s in ("king", "queen")} == {s: pieces[s] for s in ("king", "queen")}
    for text in ["the king", "kingqueen", "queen"] + _texts(["king", "queen", "the", " ", "k", "q"]):
        assert (sp.encode(text), sp.encode_ordinary(text)) == (_hf_ids(ref, text), _hf_ids(ref, text, True)), text
    ids = range(ref.get_vocab_size())
    assert [sp.decode([i]) for i in ids] == [ref.decode([i], skip_special_tokens=False) for i in ids]


def test_a_special_shared_with_an_ordinary_id_counts_its_bytes_and_a_duplicate_special_stays_special(
        byte_level_doc, tmp_path):
    """A special on the id of the byte-level entry it spells (HF's added "Ã" on byte 0xC3) is a byte BPE emits: its
    byte counts in bits per byte (token_text_bytes counted every special id 0: 'naïve Äpfel' was 11 bytes of 13). A
    special spelled as a merge's product another id holds (a special "at" beside the merged "at") is only a special,
    as before shared ids were read (the constructor refused it: 'appear twice')."""
    from lmforge.infer.detok import token_text_bytes

    doc = json.loads(json.dumps(byte_level_doc))
    doc["added_tokens"].append({"id": max(doc["model"]["vocab"].values()) + 1, "content": "Ã", "single_word": False,
                                "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    tok = Tokenizer.from_hf(tmp_path)
    sizes = token_text_bytes(tok, tok.vocab_size)
    text = "naïve Äpfel"
    assert sum(sizes[i] for i in tok.encode_ordinary(text)) == len(text.encode())
    assert tok.shared_ids == {tok.special_tokens["Ã"]} and sizes[tok.special_tokens["<|endoftext|>"]] == 0
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"at"}
    special = Tokenizer(vocab, [(b"a", b"t")], {"<|endoftext|>": 300, "at": 301})
    assert special.encode_ordinary("cat") == [ord("c"), 256] and special.encode("cat") == [ord("c"), 301]
    assert not special.shared_ids


def test_a_normalized_token_without_a_normalizer_stays_a_cut_point_and_needs_no_export_warning(
        byte_level_doc, tmp_path, monkeypatch):
    """GPT-2's tokenizer.json marks <|endoftext|> "normalized": true and has no normalizer: matched in a second pass,
    it was no cut point of encode_iterable (one line of documents joined by it was encoded whole, 5 MB at once) and
    save_gpt2 warned that the file gives other ids. With no normalizer and no overlap with a raw token, one pass
    finds what HF's two find."""
    from tokenizers import Tokenizer as HF

    doc = _with_added(byte_level_doc, None, [("<|sep|>", True, True)])
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    tok, hf = Tokenizer.from_hf(tmp_path), HF.from_str(json.dumps(doc))
    text = ("the cat sat " * 20 + "<|sep|>") * 40
    assert tok.encode(text) == _hf_ids(hf, text) and tok.encode_ordinary(text) == _hf_ids(hf, text, ordinary=True)
    sizes, encode = [], tok.encode
    monkeypatch.setattr(tok, "encode", lambda t, **kw: sizes.append(len(t)) or encode(t, **kw))
    ids = list(tok.encode_iterable(iter(text[i:i + 100] for i in range(0, len(text), 100)), buffer_chars=500))
    assert ids == _hf_ids(hf, text) and max(sizes) < 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.save_gpt2(tmp_path / "gpt2")


def test_a_byte_level_added_token_counts_the_bytes_of_the_text_it_matches_in_bits_per_byte():
    """Added tokens are matched in the raw text by their spelling: a non-special 'Ġhello' stands for the 7 bytes of
    'Ġhello' in a corpus (text ' hello' never encodes to it), whatever HF's ByteLevel decoder turns it into (' hello'),
    so bits per byte counts its spelling's UTF-8 bytes: the counts of a text's tokens sum to the text's bytes."""
    from lmforge.infer.detok import token_text_bytes

    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], {"<|endoftext|>": 256, "Ġhello": 257, "café": 258},
                    non_special=["Ġhello", "café"])
    sizes = token_text_bytes(tok, tok.vocab_size)
    for text in ("aĠhello b", "I love café", "Ġhello"):
        ids = tok.encode(text)
        assert set(ids) & {257, 258} and sum(sizes[i] for i in ids) == len(text.encode())
