"""Encoding: exact parity with tiktoken's GPT-2 encoding (built from ../shared/data/gpt2), the
tiktoken fast path against the pure-Python reference, specials, streaming, batching, decoding."""

from __future__ import annotations

import json
import random

import pytest

from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.formats import char_to_byte
from lmforge.tokenizer.pretokenize import PATTERNS
from lmforge.tokenizer.train import train_bpe

tiktoken = pytest.importorskip("tiktoken")
from ..conftest import shared_data as shared


@pytest.fixture(scope="module")
def gpt2():
    """(lmforge Tokenizer from GPT-2's files, tiktoken's gpt2 Encoding rebuilt from the same files)."""
    vocab_json, merges_txt = shared("gpt2", "vocab.json"), shared("gpt2", "merges.txt")
    tok = Tokenizer.from_gpt2_files(vocab_json, merges_txt)
    c2b = char_to_byte()
    raw = json.loads(vocab_json.read_text())
    ranks = {bytes(c2b[c] for c in s): i for s, i in raw.items() if s != "<|endoftext|>"}
    # tiktoken_ext.openai_public.gpt2(): r50k regex, ranks from the same files, <|endoftext|> = 50256.
    enc = tiktoken.Encoding("gpt2-ref", pat_str=PATTERNS["gpt2"], mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    return tok, enc


ADVERSARIAL = [
    "", " ", "\n", "   \n\n\n   ", " " * 200 + "x", "\t\t\n \r\n\r\n", "hello world", "Hello, World!!!",
    "emoji 🙂🙃 👩‍👩‍👧‍👦 🇫🇷 family", "日本語のテキスト、中文，한국어", "naïve café Ünïcödé", "I'll we've they're she'd 's 'S",
    "1234567890 3.14159 1e-10", "<|endoftext|>", "a<|endoftext|>b<|endoftext|><|endoftext|>", "<|endoftext",
    "\x00\x01\x1c\x1d\x85\u00a0\u2028\u3000 mixed", "def f(x):\n    return x**2  # comment\n", "\ud800 lone surrogate",
    "ﬁ ﬂ ẞ ǅ", "a" * 1000, "ab" * 500 + " " + "ba" * 333,
]


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = ("abcdefghij ABC  \n\t'sll0123456789.,!?-_()[]{}<>|" + "éüñßæøåçΩπλжщ日本語中文한국🙂🎉\u200b\u00a0\u3000")
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_gpt2_parity_adversarial(gpt2):
    tok, enc = gpt2
    for text in ADVERSARIAL:
        assert tok.encode(text) == enc.encode(text, allowed_special="all"), text
        assert tok.decode(tok.encode(text)) == enc.decode(enc.encode(text, allowed_special="all"))


def test_gpt2_parity_random_and_reference(gpt2):
    tok, enc = gpt2
    rng = random.Random(0)
    for _ in range(200):
        text = _random_text(rng, rng.randint(1, 300))
        want = enc.encode(text, allowed_special="all")
        assert tok.encode(text) == want
        assert tok.encode_reference(text) == want


def test_gpt2_parity_whole_file(gpt2):
    tok, enc = gpt2
    text = shared("tinyshakespeare", "input.txt").read_text()
    ids = tok.encode(text)
    assert ids == enc.encode(text, allowed_special="all") and len(ids) > 300_000
    assert tok.decode(ids) == text
    html = sorted(shared("web_html").glob("*.html"))[:3]
    for f in html:
        t = f.read_text(errors="replace")
        assert tok.encode(t) == enc.encode(t, allowed_special="all")
    assert tok.fast and tok.eot_id == 50256 and tok.vocab_size == 50257


def test_special_semantics_like_tiktoken(gpt2):
    tok, enc = gpt2
    text = "hi <|endoftext|> there"
    with pytest.raises(ValueError):
        enc.encode(text)
    with pytest.raises(ValueError, match="disallowed special"):
        tok.encode(text, allowed_special=set())
    assert tok.encode(text, allowed_special=set(), disallowed_special=()) == enc.encode(text, disallowed_special=())
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == enc.encode(text, allowed_special={"<|endoftext|>"})
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)


@pytest.fixture(scope="module")
def trained():
    text = shared("tinyshakespeare", "input.txt").read_text()[:200_000]
    return train_bpe(iter([text]), 1000, ["<|endoftext|>", "<|endoftext|><|endoftext|>", "<|pad|>"], progress=False)


def test_longest_special_wins(trained):
    eot, double = trained.special_tokens["<|endoftext|>"], trained.special_tokens["<|endoftext|><|endoftext|>"]
    assert trained.encode("<|endoftext|><|endoftext|>") == [double]
    assert trained.encode("<|endoftext|><|endoftext|><|endoftext|>") == [double, eot]
    assert trained.decode(trained.encode("a<|pad|>b<|endoftext|>")) == "a<|pad|>b<|endoftext|>"


def test_fast_path_agrees_with_reference(trained):
    assert trained.fast
    rng = random.Random(1)
    texts = ADVERSARIAL + [_random_text(rng, rng.randint(1, 400)) for _ in range(300)]
    for t in texts:
        assert trained.encode(t) == trained.encode_reference(t), t


def test_fast_path_refused_when_tiktoken_would_disagree():
    # "aaa" is made from ("a", "aa"), but BPE turns "aaa" into ("aa", "a") first; tiktoken would still
    # join that into "aaa" because it ranks concatenations, not pairs. The reference must take over.
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[256], vocab[257] = b"aa", b"aaa"
    tok = Tokenizer(vocab, [(b"a", b"a"), (b"a", b"aa")])
    assert not tok.fast
    assert tok.encode("aaa") == [256, 97]


def test_vocab_not_in_merge_order_uses_rank_map():
    vocab = {i + 10: bytes([i]) for i in range(256)}
    vocab[5], vocab[3] = b"ab", b"abc"  # ids decreasing with merge order
    tok = Tokenizer(vocab, [(b"a", b"b"), (b"ab", b"c")], ["<|endoftext|>"])
    assert tok.fast
    assert tok.encode("abc ab abd<|endoftext|>") == [3, 42, 5, 42, 5, 110, tok.eot_id]


def test_decode_invalid_utf8_never_raises(gpt2, trained):
    tok, _ = gpt2
    ids = tok.encode("🙂")
    assert len(ids) > 1
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode(ids[1:]).count("\ufffd") >= 1
    assert trained.decode([10**6, -1, 104]) == "\ufffd\ufffdh"


def test_encode_iterable_equals_whole_text(gpt2, trained):
    tok, _ = gpt2
    path = shared("tinyshakespeare", "input.txt")
    text = path.read_text()[:150_000] + "<|endoftext|>tail  \n\n"
    rng = random.Random(2)
    cuts = sorted(rng.sample(range(len(text)), 3000))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    for t in (tok, trained):
        assert list(t.encode_iterable(iter(pieces), buffer_chars=1000)) == t.encode(text)
    with open(path) as f:
        assert list(tok.encode_iterable(f)) == tok.encode(path.read_text())


def test_encode_batch(trained):
    texts = [f"line {i}: " + "to be or not to be " * (i % 7) for i in range(50)]
    assert trained.encode_batch(texts) == [trained.encode(t) for t in texts]


def test_duplicate_merge_pair_takes_its_last_rank(tmp_path):
    """A pair listed twice ranks where it is listed last, as in HF tokenizers and GPT-2's encoder.py (lmforge
    kept the first: "bcc" gave b + cc instead of bc + c; found by a sweep, 2026-12)."""
    tokenizers = pytest.importorskip("tokenizers")
    from lmforge.tokenizer.hf_json import hf_tokenizer_json

    vocab = {i: bytes([i]) for i in range(256)} | {256: b"cc", 257: b"bc"}
    tok = Tokenizer(vocab, [(b"c", b"c"), (b"b", b"c"), (b"c", b"c")])
    hf = tokenizers.Tokenizer.from_str(json.dumps(hf_tokenizer_json(tok)))
    for t in ["bcc", "ccc bccc", "cbcc"]:
        assert tok.encode(t) == hf.encode(t).ids == tok.encode_reference(t), t
    assert tok.encode("bcc") == [257, 99]


def test_unknown_ids_decode_alike_in_both_tokenizers():
    """ByteTokenizer.decode raised ValueError on a negative id though decoding never raises; unknown ids are
    U+FFFD in both tokenizers (found by a sweep, 2026-12). A BPE tokenizer without merges has the same ids."""
    from lmforge.tokenizer.byte import ByteTokenizer

    byte, bpe = ByteTokenizer(), Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    cases = ([104, -1], [-5, 104, 105], [104, 257, 105], [0xE2, -1, 0x82, 0xAC], [0xE2, 0x82, 0xAC, 256, -1])
    for ids in cases:
        assert byte.decode(ids) == bpe.decode(ids), ids
    assert byte.decode([104, -1, 105]) == "h\ufffdi"


def test_allowed_special_names_that_are_not_specials_are_ignored(gpt2):
    """As in tiktoken: a name in allowed_special that is no special token is ignored (lmforge raised KeyError
    when it occurred in the text; found by a sweep, 2026-12)."""
    tok, enc = gpt2
    text = "foo <|endoftext|> foo"
    allowed = {"<|endoftext|>", "foo"}
    assert tok.encode(text, allowed_special=allowed) == enc.encode(text, allowed_special=allowed)
    assert tok.encode("foo", allowed_special={"foo"}) == enc.encode("foo", allowed_special={"foo"})
