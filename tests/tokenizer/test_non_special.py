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
