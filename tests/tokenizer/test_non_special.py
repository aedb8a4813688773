"""Added tokens a HF tokenizer.json marks "special": false (Qwen3's <think>, Qwen2.5's <tool_call>) stay in texts
decoded with skip_special_tokens, as HF's decode(skip_special_tokens=True) keeps them: the byte-level Tokenizer took
every added token for a special one, so a sample's reasoning and tool-call tags were left out of its text."""

from __future__ import annotations

import pytest

from lmforge.errors import ConfigError
from lmforge.infer.detok import StreamDecoder, special_ids
from lmforge.tokenizer.load import load_tokenizer

TEXT = "<think>the cat</think> sat on the mat<|im_end|>"


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
    """A byte-level tokenizer.json (HF tokenizers) with <|im_end|> special and <think>, </think> not."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["the cat sat on the mat"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf.add_tokens([AddedToken("<think>", special=False, normalized=False),
                   AddedToken("</think>", special=False, normalized=False)])
    path = tmp_path_factory.mktemp("qwen")
    hf.save(str(path / "tokenizer.json"))
    return hf, path


def _streamed(tok, ids) -> str:
    d = StreamDecoder(tok, special_ids(tok))
    return "".join(d.push(i) for i in ids) + d.flush()


def test_skip_special_tokens_keeps_non_special_added_tokens(qwen_like):
    hf, path = qwen_like
    tok = load_tokenizer(path)
    ids = tok.encode(TEXT)
    assert ids == hf.encode(TEXT).ids and tok.non_special == ("<think>", "</think>")
    want = hf.decode(ids, skip_special_tokens=True)
    assert want == "<think>the cat</think> sat on the mat"
    assert _streamed(tok, ids) == want


def test_non_special_survives_save_and_hf_export(qwen_like, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    tok = load_tokenizer(qwen_like[1])
    assert load_tokenizer(tok.save(tmp_path / "lmforge")).non_special == tok.non_special
    exported = HFTokenizer.from_file(str(tok.save_hf(tmp_path / "hf")))
    ids = tok.encode(TEXT)
    assert exported.decode(ids, skip_special_tokens=True) == "<think>the cat</think> sat on the mat"
    assert load_tokenizer(tmp_path / "hf").non_special == tok.non_special


def test_non_special_must_be_a_special_token(qwen_like):
    tok = load_tokenizer(qwen_like[1])
    with pytest.raises(ConfigError, match="non_special token '<tool>' is not one of the special tokens"):
        type(tok)(tok.vocab, tok.merges, tok.special_tokens, non_special=["<tool>"])


def test_both_tokenizer_kinds_hold_non_special_added_tokens_alike(qwen_like):
    """One representation: special_tokens holds every added token (what a text's matches become) and non_special
    names those HF marks "special": false, in the byte-level Tokenizer and in SentencePieceBPE alike (which kept them
    out of special_tokens, in an added_tokens table of its own); texts decoded with skip_special_tokens still keep
    them, as HF's decode does."""
    from lmforge.tokenizer.sentencepiece import SentencePieceBPE
    from tests.tokenizer.sp_files import added, hf, sp_doc

    byte_level = load_tokenizer(qwen_like[1])
    doc = sp_doc()
    think = added(doc, "<think>", special=False, normalized=False)
    end = added(doc, "<|im_end|>")
    sp = SentencePieceBPE(doc)
    for tok, names in ((byte_level, ("<think>", "</think>")), (sp, ("<think>",))):
        assert tok.non_special == names and set(names) <= set(tok.special_tokens)
        assert special_ids(tok) == {i for s, i in tok.special_tokens.items() if s not in names}
    assert sp.special_tokens["<think>"] == think and sp.eot_id == sp.special_tokens["</s>"] == 2
    ids = sp.encode("<think>the king<|im_end|>")
    assert ids == hf(doc).encode("<think>the king<|im_end|>", add_special_tokens=False).ids and think in ids
    assert end in ids and _streamed(sp, ids) == hf(doc).decode(ids, skip_special_tokens=True) == "<think> the king"


def _hf_ordinary(hf, text: str) -> list[int]:
    """HF's ids with special tokens' text kept as text (encode_special_tokens): what encode_ordinary must give."""
    hf.encode_special_tokens = True
    try:
        return hf.encode(text, add_special_tokens=False).ids
    finally:
        hf.encode_special_tokens = False


ORDINARY = "a<think>the cat</think> sat<|im_end|> on<|endoftext|><think></think>mat"


def test_encode_ordinary_matches_non_special_added_tokens_as_hf_does(qwen_like):
    """encode_ordinary (what pretraining shards are tokenized with) split Qwen3's <think> into "<", "think", ">"
    in the byte-level Tokenizer, where HF matches an added token that is not special as a unit and leaves only the
    special ones' text as text (encode_special_tokens); encode's allowed/disallowed sets are about special tokens."""
    hf, path = qwen_like
    tok = load_tokenizer(path)
    want = _hf_ordinary(hf, ORDINARY)
    think, end, im_end = (tok.special_tokens[s] for s in ("<think>", "</think>", "<|im_end|>"))
    assert want.count(think) == 2 and want.count(end) == 2 and im_end not in want
    assert tok.encode_ordinary(ORDINARY) == want
    assert tok.encode(ORDINARY, allowed_special=set(), disallowed_special=()) == want
    assert tok.encode("<think>x", allowed_special=set()) == [think] + tok.encode_ordinary("x")
    assert list(tok.encode_iterable(ORDINARY.splitlines(keepends=True))) == tok.encode(ORDINARY)


def test_pretraining_shards_keep_non_special_added_tokens_whole(qwen_like, tmp_path):
    """The shards lmforge.data.tokenize writes (through encode_ordinary): <think> one id, <|im_end|> text."""
    import numpy as np

    from lmforge.data.shards import TokenFile
    from lmforge.data.tokenize import tokenize_to_shards

    hf, path = qwen_like
    (tmp_path / "doc.txt").write_text(ORDINARY)
    tokenize_to_shards(tmp_path / "doc.txt", str(path), tmp_path / "out")
    ids = np.asarray(TokenFile(tmp_path / "out" / "train.bin").tokens).tolist()
    eot = hf.token_to_id("<|endoftext|>")  # (the file's two documents, each after the separator)
    docs = ORDINARY.split("<|endoftext|>")
    assert ids == [eot, *_hf_ordinary(hf, docs[0]), eot, *_hf_ordinary(hf, docs[1])]
    assert ids.count(hf.token_to_id("<think>")) == 2


@pytest.mark.parametrize("flags", [dict(normalized=False), dict(normalized=True), dict(lstrip=True),
                                   dict(rstrip=True, normalized=False)])
def test_sentencepiece_encode_ordinary_matches_hf(flags):
    """SentencePieceBPE's encode_ordinary agrees with HF's encode_special_tokens on added tokens that are not
    special, with their lstrip / rstrip / normalized flags, and keeps special ones' text as text."""
    from lmforge.tokenizer.sentencepiece import SentencePieceBPE
    from tests.tokenizer.sp_files import added, hf, sp_doc

    doc = sp_doc()
    think = added(doc, "<think>", special=False, **flags)
    added(doc, "<|im_end|>")
    sp, ref = SentencePieceBPE(doc), hf(doc)
    for text in ("<think>the king<|im_end|> sweet", "my lord <think> speak </s>", " <think>  <think>"):
        want = _hf_ordinary(ref, text)
        assert think in want and sp.encode_ordinary(text) == want, text
