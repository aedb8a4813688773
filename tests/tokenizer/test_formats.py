"""File formats: own JSON, GPT-2 vocab/merges, HF tokenizer.json (checked with HF `tokenizers`),
tiktoken rank files, and refusal of corrupt files."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from lmforge.errors import DataError
from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.load import load_tokenizer
from lmforge.tokenizer.pretokenize import PATTERNS
from lmforge.tokenizer.train import train_bpe

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SAMPLES = ["Hello world! It's 2024.\n\n  indented\tcode()", "emoji 🙂 日本語 naïve", "a<|endoftext|>b<|pad|>",
           "   leading spaces", "x" * 300, "numbers 1234567 and 3.14", "ends with newline\n"]


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not found: {p}")
    return p


@pytest.fixture(scope="module", params=["gpt2", "cl100k"])
def tok(request):
    text = shared("tinyshakespeare", "input.txt").read_text()[:150_000]
    return train_bpe(iter([text]), 800, ["<|endoftext|>", "<|pad|>"], pattern=request.param, progress=False)


def _texts() -> list[str]:
    text = shared("tinyshakespeare", "input.txt").read_text()
    rng = random.Random(0)
    return SAMPLES + [text[i:i + rng.randint(1, 2000)] for i in rng.sample(range(len(text) - 2000), 40)]


def test_own_format_roundtrip(tmp_path, tok):
    path = tok.save(tmp_path / "tk")
    assert path.name == "lmforge_tokenizer.json" and json.loads(path.read_text())["type"] == "bpe"
    back = load_tokenizer(tmp_path / "tk")
    assert isinstance(back, Tokenizer) and back.vocab == tok.vocab and back.merges == tok.merges
    assert back.special_tokens == tok.special_tokens and back.pattern == tok.pattern
    assert back.spec() == str(path.resolve())
    for t in _texts():
        assert back.encode(t) == tok.encode(t)
    assert tok.save(tmp_path / "x.json").name == "x.json"


def test_gpt2_files_roundtrip(tmp_path, tok):
    import contextlib

    lost = tok.pattern != PATTERNS["gpt2"]  # the files cannot hold another pattern: saving says so
    with pytest.warns(UserWarning, match="cannot record") if lost else contextlib.nullcontext():
        v, m = tok.save_gpt2(tmp_path)
    back = Tokenizer.from_gpt2_files(v, m)
    assert back.vocab == tok.vocab and back.merges == tok.merges and back.special_tokens == tok.special_tokens
    assert back.pattern == PATTERNS["gpt2"]  # GPT-2 files carry no pattern: they always mean GPT-2's
    gpt2 = Tokenizer.from_gpt2_files(shared("gpt2", "vocab.json"), shared("gpt2", "merges.txt"))
    v2, m2 = gpt2.save_gpt2(tmp_path / "g")
    assert json.loads(v2.read_text()) == json.loads(shared("gpt2", "vocab.json").read_text())
    def merge_lines(p: Path) -> list[str]:
        return [ln for ln in p.read_text().splitlines() if ln and not ln.startswith("#version")]

    assert merge_lines(m2) == merge_lines(shared("gpt2", "merges.txt"))


def test_hf_export_loads_in_tokenizers_with_identical_ids(tmp_path, tok):
    tokenizers = pytest.importorskip("tokenizers")
    path = tok.save_hf(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    for t in _texts():
        assert hf.encode(t).ids == tok.encode(t), t
        assert hf.decode(tok.encode(t), skip_special_tokens=False) == t
    back = Tokenizer.from_hf(path)
    assert back.vocab == tok.vocab and back.merges == tok.merges and back.pattern == tok.pattern


def test_hf_trained_tokenizer_imports_with_identical_ids(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([shared("tinyshakespeare", "input.txt").read_text()[:150_000]], trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_hf(tmp_path)
    assert ours.fast and ours.vocab_size == hf.get_vocab_size()
    for t in _texts():
        assert ours.encode(t) == hf.encode(t).ids, t


def test_tiktoken_rank_file_roundtrip(tmp_path, tok):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    # the file holds neither another pattern nor <|pad|> (only <|endoftext|> at the first free id): saving says so
    with pytest.warns(UserWarning, match="cannot record") as caught:
        path = tok.save_tiktoken(tmp_path / "t.tiktoken")
    message = str(caught[0].message)
    assert "<|pad|>" in message and ("pattern" in message) == (tok.pattern != PATTERNS["gpt2"])
    ranks = load_tiktoken_bpe(str(path))
    enc = tiktoken.Encoding("t", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens=tok.special_tokens)
    back = Tokenizer.from_tiktoken(path, tok.special_tokens, pattern=tok.pattern)
    assert back.merges == tok.merges and back.vocab == tok.vocab
    for t in _texts():
        assert enc.encode(t, allowed_special="all") == tok.encode(t)


@pytest.mark.parametrize("content, words", [
    ("{not json", "corrupt"),
    ('{"type": "bpe", "version": 1, "pattern": "gpt2", "special_tokens": {}}', "corrupt"),
    ('{"type": "bpe", "version": 99}', "version"),
    ('{"type": "bpe", "version": 1, "pattern": "gpt2", "special_tokens": {}, "vocab": {"a": 0}, "merges": []}',
     "single-byte"),
    ('{"type": "bpe", "version": 1, "pattern": "gpt2", "special_tokens": {}, "vocab": {"\\u0001": 0}, "merges": []}',
     "not a byte-level BPE character"),
])
def test_corrupt_tokenizer_file(tmp_path, content, words):
    from lmforge.errors import LmforgeError

    f = tmp_path / "lmforge_tokenizer.json"
    f.write_text(content)
    with pytest.raises(LmforgeError, match=words):
        load_tokenizer(tmp_path)


def test_colliding_specials():
    from lmforge.errors import ConfigError

    vocab = {i: bytes([i]) for i in range(256)}
    with pytest.raises(ConfigError, match="collides"):
        Tokenizer(vocab, [], {"<|x|>": 65})
    with pytest.raises(ConfigError, match="share an id"):
        Tokenizer(vocab, [], {"<|x|>": 300, "<|y|>": 300})  # same id twice
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load("/nonexistent/dir")


def test_hf_normalizer_is_applied_kept_and_written(tmp_path):
    """A tokenizer.json with a Unicode normalizer (Qwen2's NFC) encodes decomposed text as HF does (it was
    ignored: 'é' as e + U+0301 got other ids); lmforge's own file and the HF export keep it; other normalizers
    are refused in one line (found by random HF-trained tokenizers, 2026-12-05)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERNS["cl100k"]), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    corpus = "café naïve résumé Ångström déjà vu the cat sat on the mat 1234 " * 200
    hf.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                         show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_hf(tmp_path)
    texts = ["cafe\u0301 re\u0301sume\u0301", "A\u030angstro\u0308m<|endoftext|>de\u0301ja\u0300", "\u212b plain"]
    assert ours.normalization == "NFC"
    for t in texts:
        assert ours.encode(t) == hf.encode(t).ids == ours.encode_reference(t), t
    assert ours.reference.encode(texts[0]) != ours.encode(texts[0])  # the raw text's ids: normalizing matters
    again = Tokenizer.load(ours.save(tmp_path / "own"))
    written = tokenizers.Tokenizer.from_file(str(ours.save_hf(tmp_path / "out")))
    for t in texts:
        assert again.encode(t) == written.encode(t).ids == hf.encode(t).ids
    doc = json.loads((tmp_path / "tokenizer.json").read_text())
    doc["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "Lowercase"}]}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="normalizer NFD \\+ Lowercase is not supported"):
        Tokenizer.from_hf(tmp_path / "bad.json")


DIGITS = ["123456", "x 1234567890123 y", "2024-12-05 10:30:00", "9" * 40 + "\n" + "12 345 6789 ", "v1.23456e+78"]


@pytest.mark.parametrize("name", ["gpt2", "cl100k", "o200k", r"(?:[^\s0-9]|x)+|(?i:[0-9]){1,2}+|\s+"])
def test_hf_export_splits_long_digit_runs_alike(tmp_path, name):
    """The export writes an Oniguruma equivalent of the pattern: Oniguruma read cl100k's possessive
    `\\p{N}{1,3}+` as `(?:\\p{N}{1,3})+`, so HF made "123456" one piece (found by a sweep, 2026-12)."""
    tokenizers = pytest.importorskip("tokenizers")
    corpus = " ".join(str(n) for n in range(0, 30000, 7)) + " the cat sat 12:34 " * 50
    tok = train_bpe(iter([corpus]), 400, ["<|endoftext|>"], pattern=name, progress=False, workers=1)
    hf = tokenizers.Tokenizer.from_file(str(tok.save_hf(tmp_path)))
    back = Tokenizer.from_hf(tmp_path)  # a named pattern reads back by name, a custom one as written for HF
    assert back.pattern == tok.pattern or name not in PATTERNS
    for t in DIGITS + SAMPLES:
        assert hf.encode(t).ids == tok.encode(t) == back.encode(t), t


def test_hf_ignore_merges_is_applied_kept_and_written(tmp_path):
    """`model.ignore_merges: true` (Llama-3's tokenizer.json): a pre-token that is in the vocabulary is one
    token, even one no merge builds ("xyz") or one BPE would build otherwise ("aaa" -> "aa" + "a"). It was
    ignored (found by a sweep against HF tokenizers, 2026-12)."""
    tokenizers = pytest.importorskip("tokenizers")
    from lmforge.tokenizer.hf_json import hf_tokenizer_json

    vocab = {i: bytes([i]) for i in range(256)} | {256: b"aa", 257: b"aaa", 258: b"xyz"}
    doc = hf_tokenizer_json(Tokenizer(vocab, [(b"a", b"a"), (b"a", b"aa")], ["<|endoftext|>"]))
    doc["model"]["ignore_merges"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_hf(tmp_path)
    texts = ["aaa", "xyz", "aaa\nxyz\naaaa xyzxyz<|endoftext|>aaa", "xy aaaaa"]
    assert ours.ignore_merges and not ours.fast  # tiktoken cannot hold "xyz" without merging into it
    for t in texts:
        assert ours.encode(t) == hf.encode(t).ids == ours.encode_reference(t), t
    assert ours.encode("aaa\nxyz") == [257, 10, 258]
    again = Tokenizer.load(ours.save(tmp_path / "own"))
    written = tokenizers.Tokenizer.from_file(str(ours.save_hf(tmp_path / "out")))
    for t in texts:
        assert again.encode(t) == written.encode(t).ids == hf.encode(t).ids
    # every token built by its own merge (what the fast path needs): tiktoken's whole-piece lookup is
    # ignore_merges, so the fast path stays
    small = train_bpe(iter(["the cat sat on the mat, naïve 1234 " * 40]), 320, progress=False, workers=1)
    fast = Tokenizer(small.vocab, small.merges, small.special_tokens, ignore_merges=True)
    written = tokenizers.Tokenizer.from_file(str(fast.save_hf(tmp_path / "fast")))
    assert fast.fast and json.loads((tmp_path / "fast" / "tokenizer.json").read_text())["model"]["ignore_merges"]
    for t in SAMPLES + ["the cat", "mat, naïve"]:
        assert fast.encode(t) == written.encode(t).ids == fast.encode_reference(t), t


def test_text_between_pattern_matches_is_kept_as_hf_does(tmp_path):
    """A pattern that does not match every character: the text between its matches is a piece of its own,
    as in HF's Split(behavior="isolated") (lmforge used findall and dropped it: "a, b" encoded as "ab";
    found by a sweep, 2026-12). Training counts, the fast path and the reference keep it alike."""
    tokenizers = pytest.importorskip("tokenizers")
    from lmforge.tokenizer.train import count_text

    pat = r"\p{L}+|\p{N}"
    assert count_text("ab, 12!", pat, ()) == {b"ab": 1, b", ": 1, b"1": 1, b"2": 1, b"!": 1}
    tok = train_bpe(iter(["the cat, the hat; 1984 -- ok! 🙂 " * 40]), 300, ["<|endoftext|>"], pattern=pat,
                    progress=False, workers=1)
    hf = tokenizers.Tokenizer.from_file(str(tok.save_hf(tmp_path)))
    assert tok.fast
    for t in SAMPLES + ["the cat, the hat; 1984 -- ok! 🙂", ", ;", " "]:
        assert tok.encode(t) == hf.encode(t).ids == tok.encode_reference(t), t
        assert tok.decode(tok.encode(t)) == t
    assert Tokenizer.from_hf(tmp_path).pattern == pat


def test_custom_patterns_with_groups_or_empty_matches_split_as_hf(tmp_path):
    """Custom patterns with capture groups gave tuples of groups (findall), and ones that can match the empty
    string lost text ("x?" kept nothing) and, on tiktoken, every gap (found 2026-12-05). The pieces now follow
    HF's Split(behavior="isolated") on 1,500 seeded combinations (an empty match is a boundary; after one the
    search moves a character on); such patterns encode on the reference path, equal to HF. Oniguruma's ^ and $
    are line anchors where `regex`'s are the text's ends, so they are left out."""
    tokenizers = pytest.importorskip("tokenizers")
    from lmforge.tokenizer.pretokenize import can_match_empty, findall

    atoms = [r"\w*", r"x?", r"(\w+)", r"\s", r"(a)(b)", r".", r" ?\p{L}+", r"\p{N}{1,3}", r"(?<=a)b*", r"[^\s\p{L}]+",
             r"b+", r"(?=c)", r"\s+(?!\S)", r"a|", r"(?:ab)*", r"\b"]
    texts = ["ab cd ab", "aab  c1234 xyz!!", "", "c", "  a\nb\tc d", "abcabc", "x yx xx", "é ü 12ab"]
    rng = random.Random(0)
    for _ in range(1500):
        pat = "|".join(rng.sample(atoms, rng.randint(1, 3)))
        split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(pat), behavior="isolated")
        for t in texts:
            assert findall(pat, t) == [p for p, _ in split.pre_tokenize_str(t)], (pat, t)
    assert can_match_empty(r"a|b*") and can_match_empty(r"(?=c)") and not can_match_empty(r"(\w+)|\s")
    for pat in (r"(\p{L}+)|(\p{N})", r"\p{L}*|\p{N}?"):
        tok = train_bpe(iter(["the cat, the hat; 1984 -- ok! " * 40]), 290, ["<|endoftext|>"], pattern=pat,
                        progress=False, workers=1)
        hf = tokenizers.Tokenizer.from_file(str(tok.save_hf(tmp_path / str(len(pat)))))
        assert tok.fast == (not can_match_empty(pat))
        for t in SAMPLES + ["the cat, the hat; 1984 -- ok!", ", ;", " "]:
            assert tok.encode(t) == hf.encode(t).ids == tok.encode_reference(t), (pat, t)
            assert tok.decode(tok.encode(t)) == t


def test_a_pattern_with_a_back_reference_keeps_its_pieces_on_every_path(tmp_path):
    """The fast path's one regex repeats the pattern for the gaps, so a back-reference there pointed at a group
    of the other copy: "(a)\\1| " split "xaay b" as ['xaay', ' ', 'b'] on tiktoken and ['x', 'aa', 'y', ' ', 'b']
    on the reference (review, 2026-12-05). Such patterns encode on the reference path, equal to HF."""
    tokenizers = pytest.importorskip("tokenizers")
    from lmforge.tokenizer.pretokenize import findall

    pat = r"(a)\1| "
    assert findall(pat, "xaay b") == ["x", "aa", "y", " ", "b"]
    tok = train_bpe(iter(["xaay baa aab " * 40]), 270, ["<|endoftext|>"], pattern=pat, progress=False, workers=1)
    hf = tokenizers.Tokenizer.from_file(str(tok.save_hf(tmp_path)))
    assert not tok.fast
    for t in ["xaay b", "aaaa  ab", "ba a aa"]:
        assert tok.encode(t) == hf.encode(t).ids == tok.encode_reference(t), t


@pytest.mark.parametrize("change, words", [
    ({"behavior": "Removed"}, "Split behavior 'Removed'"), ({"invert": True}, "Split invert=true"),
    ({"use_regex": True}, "ByteLevel use_regex=true after Split"),
])
def test_hf_split_that_lmforge_would_misread_is_refused(tmp_path, change, words):
    """Split behaviours other than "Isolated", inverted matches and a second GPT-2 split were read as plain
    isolated splits (found by a sweep, 2026-12): now refused in one line naming the value."""
    tok = train_bpe(iter(["the cat sat " * 20]), 270, pattern="cl100k", progress=False, workers=1)
    doc = json.loads(tok.save_hf(tmp_path).read_text())
    split, byte_level = doc["pre_tokenizer"]["pretokenizers"]
    (byte_level if "use_regex" in change else split).update(change)
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=f"{words} is not supported"):
        Tokenizer.from_hf(tmp_path)


def test_hf_added_token_with_strip_is_refused(tmp_path):
    """HF's lstrip/rstrip let a special token's match take in the whitespace beside it; lmforge read such
    tokens as exact matches, giving other ids (found by a sweep, 2026-12): refused in one line."""
    tok = train_bpe(iter(["the cat sat " * 20]), 270, ["<|endoftext|>"], progress=False, workers=1)
    doc = json.loads(tok.save_hf(tmp_path).read_text())
    doc["added_tokens"][0]["lstrip"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="added token '<\\|endoftext\\|>' has lstrip=true, which lmforge does not"):
        Tokenizer.from_hf(tmp_path)


def test_hf_possessive_interval_is_read_as_oniguruma_reads_it(tmp_path):
    """A tokenizer.json holding `\\p{N}{1,3}+` (lmforge's cl100k exports before 2026-12) splits in HF as
    `(?:\\p{N}{1,3})+`; the import reads it so, giving HF's ids."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = train_bpe(iter([" ".join(map(str, range(0, 9000, 7)))]), 300, pattern="cl100k", progress=False, workers=1)
    doc = json.loads(tok.save_hf(tmp_path).read_text())
    doc["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = PATTERNS["cl100k"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    hf, ours = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")), Tokenizer.from_hf(tmp_path)
    for t in DIGITS:
        assert ours.encode(t) == hf.encode(t).ids, t


def _with_post_processor(tmp_path: Path, tok, post: dict, extra: list[str]) -> Path:
    """tok's tokenizer.json with `extra` added tokens (ids after the vocabulary) and this post_processor."""
    doc = json.loads(tok.save_hf(tmp_path / "base").read_text())
    for k, s in enumerate(extra):
        doc["added_tokens"].append({"id": tok.vocab_size + k, "content": s, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
    doc["post_processor"] = post
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc))
    return path


LLAMA3_POST = {"type": "Sequence", "processors": [
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
    {"type": "TemplateProcessing",
     "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
     "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
              {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
     "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [800],
                                              "tokens": ["<|begin_of_text|>"]}}}]}


def test_hf_post_processor_bos_is_read_applied_on_request_and_written(tmp_path, tok):
    """Llama-3's tokenizer.json adds <|begin_of_text|> through its post_processor (HF's encode, whose default is
    add_special_tokens=True): read as prefix_tokens, added by encode(add_special_tokens=True) only (the default
    stays the text's own ids: chat templates and training data add no BOS), and written back by save_hf and save."""
    tokenizers = pytest.importorskip("tokenizers")
    assert tok.vocab_size == 800
    path = _with_post_processor(tmp_path, tok, LLAMA3_POST, ["<|begin_of_text|>"])
    hf = tokenizers.Tokenizer.from_file(str(path))
    ours = Tokenizer.from_hf(path)
    assert ours.prefix_tokens == ("<|begin_of_text|>",) and ours.suffix_tokens == () and ours.bos_id == 800
    for text in _texts()[:20]:
        assert ours.encode(text, add_special_tokens=True) == hf.encode(text).ids
        assert ours.encode(text, add_special_tokens=True)[0] == 800
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids == tok.encode(text)
    written = tokenizers.Tokenizer.from_file(str(ours.save_hf(tmp_path / "out")))
    assert written.encode("Hello world").ids == hf.encode("Hello world").ids == [800] + tok.encode("Hello world")
    assert Tokenizer.from_hf(tmp_path / "out").bos_id == 800
    assert Tokenizer.load(ours.save(tmp_path / "own")).encode("Hi", add_special_tokens=True) == [800] + tok.encode("Hi")
    assert tok.bos_id is None and tok.encode("Hi", add_special_tokens=True) == tok.encode("Hi")  # no rule: no BOS


def test_hf_roberta_post_processor_adds_before_and_after(tmp_path, tok):
    tokenizers = pytest.importorskip("tokenizers")
    post = {"type": "RobertaProcessing", "sep": ["</s>", 801], "cls": ["<s>", 800], "trim_offsets": True,
            "add_prefix_space": False}
    path = _with_post_processor(tmp_path, tok, post, ["<s>", "</s>"])
    ours, hf = Tokenizer.from_hf(path), tokenizers.Tokenizer.from_file(str(path))
    assert (ours.prefix_tokens, ours.suffix_tokens) == (("<s>",), ("</s>",))
    assert ours.encode("Hello world", add_special_tokens=True) == hf.encode("Hello world").ids
    assert ours.encode("Hello world", add_special_tokens=True) == [800] + tok.encode("Hello world") + [801]


def test_hf_post_processor_that_is_not_read_is_refused(tmp_path, tok):
    bad = {**LLAMA3_POST["processors"][1], "special_tokens": {
        "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [5], "tokens": ["<|begin_of_text|>"]}}}
    with pytest.raises(DataError, match=re.escape("adds '<|begin_of_text|>' as id 5, but it is not that added token")):
        Tokenizer.from_hf(_with_post_processor(tmp_path, tok, bad, ["<|begin_of_text|>"]))
    with pytest.raises(DataError, match="post_processor 'Mystery' is not supported"):
        Tokenizer.from_hf(_with_post_processor(tmp_path, tok, {"type": "Mystery"}, []))


MOVED = ("HF_CONFIG", "NORMAL_FORMS", "hf_added_ids", "hf_added_tokens", "hf_eos_token", "hf_tokenizer_json",
         "is_sentencepiece", "oniguruma_pattern", "read_hf", "write_hf", "write_hf_config")


def test_the_hf_json_names_still_import_from_formats():
    """The split of HF tokenizer.json into hf_json.py (2026-12-07) left `from lmforge.tokenizer.formats import read_hf`
    an ImportError in user code: every public name that moved is still there (the same object, read lazily: hf_json
    imports formats, so formats importing it back at the top is a cycle), and dir() lists it."""
    import subprocess
    import sys

    from lmforge.tokenizer import formats, hf_json

    assert {name: getattr(formats, name) is getattr(hf_json, name) for name in MOVED} == dict.fromkeys(MOVED, True)
    assert set(MOVED) <= set(dir(formats)) and "read_gpt2" in dir(formats)
    with pytest.raises(AttributeError, match="has no attribute 'read_hff'"):
        formats.read_hff  # noqa: B018
    first = ("import sys; from lmforge.tokenizer.formats import read_hf, HF_CONFIG; "
             "print(read_hf.__module__, HF_CONFIG)")  # (formats imported first, in a fresh interpreter: no cycle)
    r = subprocess.run([sys.executable, "-c", first], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "lmforge.tokenizer.hf_json tokenizer_config.json\n"), r.stderr
