"""Bits per byte of pretraining's evaluator, one convention on every path: the nats of the tokens that stand for text
over the UTF-8 bytes of that text. A special token (the end-of-text separator) counts in neither, whether the bytes
are measured per token (token_byte_lengths) or given as a fixed ratio (data.bytes_per_token); an added token HF marks
"special": false (Qwen3's <think>) is text and counts its bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.byte import ByteTokenizer
from lmforge.train.pretrain import LMEvaluator, token_byte_lengths


class Uniform(torch.nn.Module):
    """Logits giving every one of V ids the same weight: each target costs ln V nats."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.w = torch.nn.Parameter(torch.zeros(()))  # (the evaluator finds the device through it)

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab_size)


def _bpb(targets: list[int], id_bytes, vocab_size: int, bytes_per_token: float = 0.0) -> dict:
    y = torch.tensor([targets])
    with torch.no_grad():
        return LMEvaluator([(torch.zeros_like(y), y)], id_bytes, bytes_per_token)(Uniform(vocab_size))


def _thinking_tokenizer() -> Tokenizer:
    """Bytes 0..255, then <|endoftext|> (special, id 256) and <think> (an added token HF marks not special, 257)."""
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>", "<think>"], non_special=["<think>"])


def test_a_non_special_added_token_counts_its_text_bytes():
    """<think> is text (HF keeps it in a decoded text, skip_special_tokens or not): its 7 bytes are counted, where
    it counted 0 (every added token was taken for a special one), and its loss with them."""
    tok = _thinking_tokenizer()
    lengths = token_byte_lengths(tok, 260)
    think, eot = tok.special_tokens["<think>"], tok.eot_id
    assert lengths[think] == 7 and lengths[eot] == 0 and lengths[65] == 1 and lengths[258:].sum() == 0
    # targets 'A', <think>, <|endoftext|>: 'A' and <think> cost ln 258 nats each over 1 + 7 bytes; the separator
    # neither. It was ln 258 / (ln 2 * 1): <think>'s loss and bytes both left out
    out = _bpb([65, think, eot], lengths, 258)
    assert out["val_bpb"] == pytest.approx(2 * math.log(258) / (math.log(2) * 8), rel=1e-6)


def test_a_sentencepiece_non_special_added_token_counts_its_text_bytes():
    from lmforge.tokenizer.sentencepiece import SentencePieceBPE
    from tests.tokenizer.sp_files import added, sp_doc

    doc = sp_doc()
    think = added(doc, "<think>", special=False, normalized=False)
    end = added(doc, "<|im_end|>")
    sp = SentencePieceBPE(doc)
    lengths = token_byte_lengths(sp, sp.vocab_size)
    assert lengths[think] == 7 and lengths[end] == 0 and lengths[sp.eot_id] == 0 and lengths[sp.bos_id] == 0
    assert lengths[3 + 0x41] == 1  # the byte-fallback piece <0x41>: one byte


def test_special_tokens_are_told_by_id_not_by_their_text():
    """A special token's ids count no bytes, and a text token is never left out for spelling a special's name."""
    tok = ByteTokenizer(("<|endoftext|>", "<pad>"))
    lengths = token_byte_lengths(tok, 260)
    assert lengths[:256].tolist() == [1.0] * 256 and lengths[256:].tolist() == [0.0] * 4


def test_a_fixed_bytes_per_token_leaves_the_separator_out_as_the_measured_bytes_do():
    """Targets 'A', 'B', <|endoftext|>, 'C' of the byte tokenizer under logits giving the separator 3x the weight
    of each byte (a byte costs ln 259 nats, the separator ln(259/3)). With data.bytes_per_token = 1, the eval text's
    true ratio of bytes to text tokens, bits per byte is the measured one: 3 ln 259 / (3 ln 2) = log2 259. It was
    the mean over all four tokens over the ratio, (3 ln 259 + ln(259/3)) / (4 ln 2): the separator's loss averaged
    in as if it stood for text."""
    tok = ByteTokenizer()
    lengths = token_byte_lengths(tok, 257)

    class Cheap(Uniform):
        def forward(self, x):
            logits = super().forward(x)
            logits[..., tok.eot_id] = math.log(3)
            return logits

    y = torch.tensor([[65, 66, tok.eot_id, 67]])
    with torch.no_grad():
        measured = LMEvaluator([(torch.zeros_like(y), y)], lengths)(Cheap(257))
        fixed = LMEvaluator([(torch.zeros_like(y), y)], lengths, bytes_per_token=1.0)(Cheap(257))
        halved = LMEvaluator([(torch.zeros_like(y), y)], lengths, bytes_per_token=2.0)(Cheap(257))
    assert measured["val_bpb"] == pytest.approx(math.log2(259), rel=1e-6)
    assert fixed["val_bpb"] == pytest.approx(math.log2(259), rel=1e-6)
    assert halved["val_bpb"] == pytest.approx(math.log2(259) / 2, rel=1e-6)
    assert fixed["val_loss"] == measured["val_loss"] == pytest.approx((3 * math.log(259) + math.log(259 / 3)) / 4)


def test_a_fixed_bytes_per_token_without_a_tokenizer_divides_every_tokens_nats():
    """With no tokenizer to say which ids are special, every token is text: bpb = val_loss / ln 2 / ratio."""
    out = _bpb([1, 2, 3, 4], None, 50, bytes_per_token=4.0)
    assert out["val_bpb"] == pytest.approx(math.log(50) / math.log(2) / 4, rel=1e-6)
    assert "val_bpb" not in _bpb([1, 2, 3, 4], None, 50)  # no tokenizer, no ratio: no bytes to divide by


DOCS = ("The king speaks.", "my lord<think>sweet love</think>\nnight", "日本 東京 café!", "x")
"""(none opens with a space, or has one after an added token: Metaspace puts no "▁" before such a text, and gives
the ids it gives the text without the space, which are taken for those with the "▁" put first)"""


@pytest.mark.parametrize("style,prepend", [("llama", "first"), ("metaspace", "first"), ("metaspace", "always"),
                                           ("gemma", "never")])
def test_sentencepiece_documents_count_their_own_bytes(tmp_path, style, prepend):
    """A SentencePiece-style tokenizer puts "▁" before each document (Llama 2's Prepend, Metaspace's
    prepend_scheme; Prepend and "always" after each added token too), a space no document holds: val_bpb counted
    its byte, one more per document than its text (~0.1% on short documents). The measured bytes of shards written
    by tokenize_to_shards are now the documents' own UTF-8 bytes."""
    import numpy as np

    from lmforge.data.shards import TokenFile
    from lmforge.data.tokenize import tokenize_to_shards
    from lmforge.tokenizer.corpus import corpus_stats
    from lmforge.tokenizer.sentencepiece import SentencePieceBPE
    from lmforge.train.pretrain import prefix_bytes
    from tests.tokenizer.sp_files import added, sp_doc

    doc = sp_doc(style, prepend)
    added(doc, "<think>", special=False, normalized=False)
    added(doc, "</think>", special=False)
    sp = SentencePieceBPE(doc)
    for k, text in enumerate(DOCS):
        (tmp_path / f"{k}.txt").write_text(text)
    tokenize_to_shards(sorted(tmp_path.glob("*.txt")), sp, tmp_path / "out")
    ids = torch.tensor(np.asarray(TokenFile(tmp_path / "out" / "train.bin").tokens).astype(np.int64))
    assert (ids == sp.eot_id).sum() == len(DOCS)
    x, y = ids[None, :-1], ids[None, 1:]
    lengths, prefix = token_byte_lengths(sp, sp.vocab_size), prefix_bytes(sp, sp.vocab_size)
    assert (prefix is None) == (prepend == "never")
    out = LMEvaluator([(x, y)], lengths, prefix=prefix)(Uniform(sp.vocab_size))
    text_tokens = int((lengths[y] > 0).sum())
    n_bytes = text_tokens * math.log(sp.vocab_size) / (math.log(2) * out["val_bpb"])
    assert n_bytes == pytest.approx(sum(len(t.encode()) for t in DOCS), rel=1e-6)  # (float32 losses)
    # `lmforge tokenizer stats`' bytes_per_token (the ratio data.bytes_per_token takes) counts them alike
    stats = corpus_stats(sp, sorted(map(str, tmp_path.glob("*.txt"))), progress=False)
    assert stats["bytes_per_token"] * text_tokens == pytest.approx(stats["bytes"]) and stats["bytes"] == 75


@pytest.mark.parametrize("style,prepend", [("llama", "first"), ("metaspace", "always"), ("gemma", "never")])
def test_documents_written_back_to_back_count_their_own_bytes(tmp_path, style, prepend):
    """The tokenize stage with doc_sep = false writes documents back to back: no separator tells where the "▁" put
    before each document is, and val_bpb counted its byte. The shard now records where each document starts
    (TokenFile.doc_starts) and eval_windows marks those targets, so the bytes are the documents' own again."""
    import numpy as np

    from lmforge.data.document import Document
    from lmforge.data.shards import TokenFile
    from lmforge.data.stage import StageContext
    from lmforge.data.tokenize import TokenizeConfig, tokenize
    from lmforge.tokenizer.sentencepiece import SentencePieceBPE
    from lmforge.train.data import Split, eval_windows
    from lmforge.train.pretrain import prefix_bytes
    from tests.tokenizer.sp_files import added, sp_doc

    doc = sp_doc(style, prepend)
    added(doc, "<think>", special=False, normalized=False)
    added(doc, "</think>", special=False)
    sp = SentencePieceBPE(doc)
    spec = str(sp.save(tmp_path / "tok"))
    docs = [Document(id=str(k), text=t) for k, t in enumerate(DOCS)]
    tokenize(TokenizeConfig(tokenizer=spec, doc_sep=False), docs, StageContext(workdir=tmp_path))
    shard = TokenFile(tmp_path / "tokens" / "shard-00000.bin")
    ids = np.asarray(shard.tokens).tolist()
    assert shard.doc_sep is None and sp.eot_id not in ids
    assert ids == [i for t in DOCS for i in sp.encode_ordinary(t)]
    assert shard.doc_starts.tolist() == np.cumsum([0] + [len(sp.encode_ordinary(t)) for t in DOCS[:-1]]).tolist()
    [(x, y, opens)] = eval_windows([Split(shard, 0, len(shard))], 1, 1, len(shard) - 1)
    assert opens.sum() == len(DOCS) - 1  # (the first document's first token is no target)
    lengths, prefix = token_byte_lengths(sp, sp.vocab_size), prefix_bytes(sp, sp.vocab_size)
    out = LMEvaluator([(x, y, opens)], lengths, prefix=prefix)(Uniform(sp.vocab_size))
    n_bytes = int((lengths[y] > 0).sum()) * math.log(sp.vocab_size) / (math.log(2) * out["val_bpb"])
    first_token_text = lengths[ids[0]] - (prefix[0][ids[0]] if prefix is not None else 0)  # (x only: not counted)
    assert n_bytes == pytest.approx(sum(len(t.encode()) for t in DOCS) - float(first_token_text), rel=1e-6)


def test_a_shard_records_starts_only_for_documents_and_says_when_it_is_too_new(tmp_path):
    """Every shard without a separator was written with a starts section (version 1 still: lmforge before it refused
    the file as truncated), even one of bare tokens with no documents; a newer format was read as a corrupt one."""
    import json
    import struct

    from lmforge.data.shards import MAGIC, TokenFile, TokenShardWriter, write_tokens
    from lmforge.errors import DataError

    bare = write_tokens(tmp_path / "bare.bin", np.arange(10), vocab_size=257, tokenizer="byte", doc_sep=None)
    shard = TokenFile(bare)
    assert shard.header["version"] == 1 and "doc_starts" not in shard.header and shard.doc_starts is None
    assert bare.stat().st_size == shard.offset + 10 * 2  # (the version-1 layout: tokens end the file)
    with TokenShardWriter(tmp_path / "docs.bin", vocab_size=257, tokenizer="byte", doc_sep=None) as w:
        w.add_document([1, 2, 3])
        w.add_document([4])
    shard = TokenFile(tmp_path / "docs.bin")
    assert shard.header["version"] == 2 and shard.doc_starts.tolist() == [0, 3]
    raw = bytearray(bare.read_bytes())
    (n,) = struct.unpack("<I", raw[len(MAGIC):len(MAGIC) + 4])
    header = json.loads(raw[len(MAGIC) + 4:len(MAGIC) + 4 + n])
    text = json.dumps({**header, "version": 3}).encode().ljust(n, b" ")
    raw[len(MAGIC) + 4:len(MAGIC) + 4 + n] = text
    bare.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="version 3 token shard, newer than this lmforge reads .up to 2.; upgrade"):
        TokenFile(bare)


def test_a_shard_version_that_is_no_integer_is_a_corrupt_header_not_a_newer_format(tmp_path):
    import json
    import struct

    from lmforge.data.shards import MAGIC, TokenFile, write_tokens
    from lmforge.errors import DataError

    path = write_tokens(tmp_path / "s.bin", np.arange(10), vocab_size=257, tokenizer="byte")
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<I", raw[len(MAGIC):len(MAGIC) + 4])
    header = json.loads(raw[len(MAGIC) + 4:len(MAGIC) + 4 + n])
    for version in ("2", None, 2.0, True, 0):
        raw[len(MAGIC) + 4:len(MAGIC) + 4 + n] = json.dumps({**header, "version": version}).encode().ljust(n, b" ")
        path.write_bytes(bytes(raw))
        with pytest.raises(DataError, match="corrupt header: version .* is no format version"):
            TokenFile(path)
