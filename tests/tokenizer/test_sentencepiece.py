"""SentencePieceBPE (lmforge.tokenizer.sentencepiece) against HF `tokenizers` on the same tokenizer.json: Llama 2's
layout (Prepend + Replace normalizer) and Metaspace's (prepend_scheme first / always / never, split or not), byte
fallback and <unk>, added tokens (lstrip / rstrip / normalized / not special), Llama 2's <s> post_processor; decode
and streaming (StreamDecoder) equal to decoding all ids; load_tokenizer, save and refusals."""

from __future__ import annotations

import json
import random
import re

import pytest

from lmforge.errors import DataError
from lmforge.infer.detok import StreamDecoder, special_ids
from lmforge.tokenizer.load import load_tokenizer
from lmforge.tokenizer.sentencepiece import SentencePieceBPE, merge_all

from .sp_files import added, hf, sp_doc

pytest.importorskip("tokenizers")

TEXTS = ["Hello world", " Hello  world ", "   ", " ", "", "\n\nthe king\n", "trailing  ", "  leading", "\t tab\r\n",
         "café naïve über", "日本語 東京 😀 👍🏽", "Ω ÿ \x00 \x7f", "the king the queen " * 30,
         "thou art</s>my lord", "<s>x", "a<s>b", "<s><s></s>", "<unk> here", "▁▁x ▁", "中" * 5 + " 東京日本"]
STYLES = [dict(style="llama"), dict(style="metaspace", prepend="first"), dict(style="metaspace", prepend="first",
          split=True), dict(style="metaspace", prepend="always", split=True), dict(style="metaspace", prepend="never"),
          dict(style="gemma")]
ALPHABET = [*"the king queen lord  \n\t", "日", "本", "語", "😀", "é", "ü", "▁", "<s>", "</s>", "<x>", "<y>", "Ω",
            "\u3000", "\xa0", "東京"]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 30))) for _ in range(n)]


def assert_same(doc: dict, texts: list[str], ordinary: bool = False) -> SentencePieceBPE:
    ref, ours = hf(doc), SentencePieceBPE(doc)
    ref.encode_special_tokens = ordinary  # HF's split_special_tokens: special tokens' text stays text
    for text in texts:
        for add in (False, True):
            want = ref.encode(text, add_special_tokens=add).ids
            got = ours.encode_ordinary(text) if ordinary else ours.encode(text, add_special_tokens=add)
            if ordinary and add:
                continue
            assert got == want, (text, add, ref.encode(text, add_special_tokens=add).tokens)
            assert ours.decode(want) == ref.decode(want, skip_special_tokens=False), (text, want)
    return ours


@pytest.mark.parametrize("style", STYLES, ids=lambda s: "-".join(map(str, s.values())))
def test_encode_and_decode_equal_hf_tokenizers(style):
    tok = assert_same(sp_doc(**style), TEXTS + random_texts(150))
    assert tok.bos_id == 1 and tok.prefix_tokens == ("<s>",) and tok.eot_id == 2 and tok.vocab_size == 400 + 256


def test_byte_fallback_unknown_characters_and_unk():
    doc = sp_doc()
    tok = SentencePieceBPE(doc)
    ids = tok.encode("語")  # absent from the vocabulary: its three UTF-8 bytes
    assert [tok._pieces[i] for i in ids] == ["▁", "<0xE8>", "<0xAA>", "<0x9E>"] and tok.decode(ids) == "語"
    for b in range(0x80, 0xA0):  # bytes missing too: <unk> (fused over a run), placed as HF places it
        doc["model"]["vocab"].pop(f"<0x{b:02X}>")
    assert_same(doc, TEXTS + random_texts(100, seed=1))
    doc["model"]["fuse_unk"] = False
    assert_same(doc, TEXTS + random_texts(100, seed=2))
    no_fallback = sp_doc(byte_fallback=False)  # unknown characters are <unk>
    tok = SentencePieceBPE(no_fallback)
    assert tok.encode("語😀") == [tok.pieces["▁"], 0] and tok.decode([0]) == "<unk>"
    assert_same(no_fallback, TEXTS + random_texts(100, seed=3))


def test_added_tokens_lstrip_rstrip_normalized_and_not_special():
    for style in STYLES[:2]:
        doc = sp_doc(**style)
        added(doc, "<x>", lstrip=True)
        added(doc, "<y>", rstrip=True, special=False)
        added(doc, "Ω", normalized=True, special=False)  # matched in the normalized text ("▁Ω" in Llama 2's)
        texts = TEXTS + ["a  <x>  b", "<y>  c <y>", " <x><y> ", "Ω aΩ a Ω"] + random_texts(150, seed=4)
        tok = assert_same(doc, texts)
        assert tok.non_special == ("<y>", "Ω") and {"<x>", "<y>", "Ω"} <= set(tok.special_tokens)
        assert special_ids(tok) == {i for s, i in tok.special_tokens.items() if s not in ("<y>", "Ω")}
        assert_same(doc, texts, ordinary=True)  # encode_ordinary: special tokens' text as text, others still split


def test_metaspace_decoder():
    doc = sp_doc(style="metaspace", prepend="first")
    doc["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {
        "type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}]}
    assert_same(doc, TEXTS + random_texts(100, seed=5))


def test_invalid_utf8_decodes_per_invalid_stretch():
    tok = SentencePieceBPE(sp_doc())
    e4, b8, ff, a = (tok.pieces[s] for s in ("<0xE4>", "<0xB8>", "<0xFF>", "<0x41>"))
    assert tok.decode([e4, b8, a, a, ff]) == "\ufffdAA\ufffd"  # (HF: one U+FFFD per byte token of the run)
    assert tok.decode([10**6, -1]) == "\ufffd\ufffd"  # ids that are no token


def stream(tok, ids, skip=()) -> str:
    d = StreamDecoder(tok, skip)
    return "".join(d.push(i) for i in ids) + d.flush()


def test_streaming_equals_decoding_all_ids():
    rng = random.Random(6)
    for style in STYLES:
        tok = SentencePieceBPE(sp_doc(**style))
        for text in TEXTS + random_texts(60, seed=7):
            ids = tok.encode(text, add_special_tokens=True)
            assert stream(tok, ids) == tok.decode(ids)
            assert stream(tok, ids, special_ids(tok)) == tok.decode([i for i in ids if i not in (0, 1, 2)])
        for _ in range(60):  # any ids: byte tokens split across steps, invalid UTF-8, lone "▁"
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
            assert stream(tok, ids) == tok.decode(ids)
    tok = SentencePieceBPE(sp_doc())
    ids = tok.encode("日本語 😀")  # 語 and 😀: byte tokens, one character over three and four steps
    d = StreamDecoder(tok)
    assert [d.push(i) for i in ids] == ["日本", "", "", "語", " ", "", "", "", "😀"] and d.flush() == ""


R = {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}
BF, FUSE = {"type": "ByteFallback"}, {"type": "Fuse"}
META = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}


def strip(start: int, stop: int) -> dict:
    return {"type": "Strip", "content": " ", "start": start, "stop": stop}


@pytest.mark.parametrize("chain, streamable", [
    ([R, BF, FUSE, strip(1, 0)], True), ([R, BF, FUSE], True), ([R, BF, FUSE, strip(2, 0)], True),
    ([META], True), ([R, strip(1, 0), BF, FUSE], True), ([META, BF, FUSE, strip(1, 0)], True),
    ([BF, META], False), ([BF, R, FUSE], False)])
def test_streaming_token_by_token_equals_decoding_all_ids(chain, streamable, monkeypatch):
    """Where the decoder chain allows, StreamDecoder adds each token's stream_bytes (as the first token or not) and
    strips the text's start, never decoding a window: the pieces join to HF's decode of all ids (valid UTF-8) and to
    ours (any ids); other chains keep the window. (A Strip of the text's end cannot stream: a space shown would
    be taken back when the text ends; HF's own Strip panics on a one-space token when stop > 0.)"""
    doc = sp_doc()
    doc["decoder"] = {"type": "Sequence", "decoders": chain}
    tok, ref = SentencePieceBPE(doc), hf(doc)
    assert tok.streamable is streamable
    texts = TEXTS + random_texts(40, seed=9) + ["  two leading", " ▁ x", "▁▁▁"]
    encoded = [tok.encode(text, add_special_tokens=True) for text in texts]
    rng = random.Random(10)
    anything = [[rng.randrange(tok.vocab_size + 2) for _ in range(rng.randint(1, 30))] for _ in range(60)]
    byte_space = [[tok.pieces["<0x20>"]] * k + ids for k in (1, 2, 3) for ids in encoded[:4]]
    want = [tok.decode(ids) for ids in encoded + anything + byte_space]
    for ids in encoded:
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False), ids
    if streamable:  # never a window
        monkeypatch.setattr(tok, "decode", lambda ids: pytest.fail("decoded a window"))
    assert [stream(tok, ids) for ids in encoded + anything + byte_space] == want
    ids = encoded[10]  # 日本語 😀: a character over three and four byte tokens
    d = StreamDecoder(tok)
    assert "".join(d.push(i) for i in ids) + d.flush() == want[10]


def test_stream_decoder_window_costs_no_more_per_step_as_text_grows():
    """Without token_bytes, StreamDecoder decoded every id so far at each step: O(n^2) for an n-token answer."""
    tok = SentencePieceBPE(sp_doc())
    decoded = []

    class Counting:
        def decode(self, ids):
            decoded.append(len(ids))
            return tok.decode(ids)

    ids = tok.encode("the king the queen " * 200)
    assert stream(Counting(), ids) == tok.decode(ids)
    assert max(decoded) <= 8 and sum(decoded) < 10 * len(ids)


def test_long_text_is_one_piece_and_merges_like_hf():
    tok, ref = SentencePieceBPE(sp_doc()), hf(sp_doc())
    text = " ".join(random_texts(400, seed=8))
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
    merges = {(1, 2): (0, 12), (12, 3): (1, 123), (2, 3): (2, 23)}  # lowest rank first, leftmost on ties
    assert merge_all([1, 2, 3], merges) == [123] and merge_all([2, 3, 1, 2, 3], merges) == [23, 123]
    assert merge_all([1, 2, 1, 2], merges) == [12, 12]


def test_words_no_merge_crosses_are_merged_alone_and_cached(monkeypatch):
    """Llama 2's files have no pre_tokenizer, so a text is one piece; BPE ran over all of it (~100 kB/s). Where no
    merge makes a piece with "▁" after another character (SentencePiece's own vocabularies), the text is cut before
    each such "▁" and each word's ids are cached: the same ids, far less merging."""
    from lmforge.tokenizer import sentencepiece

    for style in STYLES[:2]:
        doc = sp_doc(**style)
        crossing = re.compile("[^▁]▁")
        doc["model"]["merges"] = [m for m in doc["model"]["merges"] if not crossing.search("".join(m))]
        assert SentencePieceBPE(sp_doc(**style))._words is None  # (its merges make "e▁": never cut)
        merged = []
        monkeypatch.setattr(sentencepiece, "merge_all", lambda syms, m: merged.append(len(syms)) or merge_all(syms, m))
        text = " ".join(random_texts(300, seed=9)) + " the king the queen" * 300
        assert_same(doc, [*TEXTS, text] + random_texts(100, seed=10))
        merged.clear()
        SentencePieceBPE(doc).encode(text)
        assert sum(merged) < len(text) // 2


def test_vocab_gives_each_tokens_text_bytes():
    tok = SentencePieceBPE(sp_doc())
    vocab = tok.vocab
    assert vocab[tok.pieces["▁the"]] == b" the" and vocab[tok.pieces["<0x0A>"]] == b"\n"
    assert vocab[tok.pieces["<0xE8>"]] == b"\xe8" and vocab[1] == b"<s>"


def test_load_tokenizer_save_and_save_hf(tmp_path):
    doc = sp_doc()
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceBPE)
    assert tok.encode("the king") == hf(doc).encode("the king", add_special_tokens=False).ids
    saved = tok.save(tmp_path / "run")
    again = load_tokenizer(tmp_path / "run")
    assert again.spec() == str(saved.resolve()) and again.doc == doc
    assert SentencePieceBPE(doc).spec() == SentencePieceBPE(sp_doc()).spec()  # a content hash when unsaved
    out = tok.save_hf(tmp_path / "hf")
    assert hf(json.loads(out.read_text())).encode("Hi").ids == tok.encode("Hi", add_special_tokens=True)


def test_byte_level_read_hf_points_to_load_tokenizer(tmp_path):
    from lmforge.tokenizer.bpe import Tokenizer

    (tmp_path / "tokenizer.json").write_text(json.dumps(sp_doc()))
    with pytest.raises(DataError, match="open it with load_tokenizer"):
        Tokenizer.from_hf(tmp_path)


@pytest.mark.parametrize("change, field", [
    (lambda d: d.update(normalizer={"type": "Replace", "pattern": {"Regex": " +"}, "content": "▁"}), "Regex"),
    (lambda d: d["model"].update(dropout=0.1), "model.dropout"),
    (lambda d: d["added_tokens"][0].update(single_word=True), "single_word"),
    (lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer 'Whitespace'"),
    (lambda d: d.update(decoder={"type": "WordPiece"}), "decoder 'WordPiece'"),
    (lambda d: d.update(normalizer={"type": "Lowercase"}), "normalizer 'Lowercase'"),
    (lambda d: d["model"]["merges"].append(["zz", "qq"]), "merge #"),
])
def test_what_is_not_read_is_refused_naming_the_field(change, field):
    doc = sp_doc()
    change(doc)
    with pytest.raises(DataError, match=field):
        SentencePieceBPE(doc)


def test_a_completion_after_a_prompt_cut_inside_a_character_shows_the_same_text_on_every_path():
    """A prompt ending in the first bytes of a character (an output cut at max_tokens, continued): the window path
    (a tokenizer with decode only) counted the prompt's trailing U+FFFD as shown, so the character the completion's
    first byte finished appeared in neither text; the byte-wise path and decode_after show U+FFFD there."""
    from lmforge.infer.detok import continuation_context, decode_after

    tok = SentencePieceBPE(sp_doc())

    class DecodeOnly:
        special_tokens = tok.special_tokens

        def decode(self, ids):
            return tok.decode(ids)

    context = continuation_context(tok.encode("the king ") + [tok.pieces["<0xE8>"], tok.pieces["<0xAA>"]],
                                   special_ids(tok))
    ids = [tok.pieces["<0x9E>"], *tok.encode("the end")]  # ("▁the▁", "e", "n", "d")
    texts = []
    for t in (tok, DecodeOnly()):
        d = StreamDecoder(t, special_ids(tok), context)
        texts += ["".join(d.push(i) for i in ids) + d.flush(), decode_after(t, context, ids)]
    assert texts == ["\ufffd the end"] * 4


def test_an_unknown_where_is_refused_in_one_line_naming_the_allowed_ones():
    # (a bare ValueError, not a lmforge error a caller catches as the user's input)
    from lmforge.errors import ConfigError

    tok = SentencePieceBPE(sp_doc())
    for encode in (tok.encode, tok.encode_ordinary, tok.encode_ordinary_spans):
        with pytest.raises(ConfigError, match=r"^where='middle' is not one of 'input', 'split', 'inside': 'input' "):
            encode("the king", where="middle")
