"""SentencePiece-style BPE read from a Hugging Face `tokenizer.json`: Llama 2, Mistral, Gemma, TinyLlama.

Where byte-level BPE (bpe.py) maps every byte to a printable character and merges those, SentencePiece BPE
merges *characters*: a space is written "▁" (U+2581) and kept inside tokens ("▁the"), and a character the
vocabulary lacks falls back to one token per UTF-8 byte, "<0xE6>" ("byte fallback"), or to the unknown token.
The same steps as HF tokenizers, read from the file and applied in its order:

    encode: split out added tokens (<s>, </s>, ...)  -> normalizer (Prepend "▁", Replace " " -> "▁", NFKC)
            -> added tokens marked normalized -> pre_tokenizer (Metaspace: " " -> "▁", prepend "▁", split at "▁")
            -> BPE over characters, lowest merge rank first -> post_processor (Llama 2's <s> before the text,
            with add_special_tokens=True)
    decode: ids -> pieces -> decoder steps (Replace "▁" -> " ", ByteFallback, Fuse, Strip one leading " ",
            Metaspace) -> text

The steps around the BPE (added tokens, normalizer, pre_tokenizer, decoder) are read and run by sentencepiece_steps;
the model (merges, byte fallback, <unk>), the post_processor and the tokenizer interface are here.

What a file asks for that is not read here (a regex normalizer, BPE dropout, a word-bounded added token) is
refused when the file is opened, naming the field. decode(ids) is HF's decode(ids, skip_special_tokens=False),
except that an id that is no token gives U+FFFD (HF drops it), as in lmforge's other tokenizers, and that byte
tokens that are no valid UTF-8 give U+FFFD per invalid stretch (HF: per token of their run;
sentencepiece_steps._byte_fallback).

Pieces of a longer text (a chat template's runs between special tokens): HF normalizes and pre-tokenizes each
stretch between added tokens on its own, so where "▁" goes before a piece depends on where it sits; encode_ordinary
takes `where` ("input", "split", "inside") to give the ids HF gives the whole text, and encode_ordinary_spans the
characters each id stands for (HF's offsets: what SFT masks use).

Streaming: a token's text depends on where it stands (the first token's "▁" dropped, the text's leading space
stripped, byte tokens joined into one character), so there is no position-free `token_bytes`. Where the decoder
chain allows (every step before ByteFallback acts token by token; after it only Fuse and a Strip of the text's
start: Llama 2's, Mistral's and Gemma's files), `stream_bytes(id, first)` gives a token's bytes and `stream_lead`
the characters to strip from the text's start, which lmforge.infer.detok.StreamDecoder joins through an incremental
UTF-8 decoder; for other chains (`streamable` false) it decodes a short window of recent ids. Either way the pieces
join to decode(all ids); after a prompt (StreamDecoder's `context`) to what the ids add to the prompt's text.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
from pathlib import Path
from typing import Any, Iterable

from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer.byte import FILE_NAME, end_of_text, without_surrogates
from lmforge.tokenizer.formats import _read_json
from lmforge.tokenizer.hf_json import hf_added_specials, hf_added_tokens, hf_eos_token, write_hf
from lmforge.tokenizer.sentencepiece_steps import (BYTE_PIECE, DECODERS, UNREAD, normalize, pre_tokenize,
                                                   read_decoder, read_normalizer, read_pre_tokenizer, split_added,
                                                   stream_steps)
from lmforge.utils import write_json_atomic

TYPE = "sentencepiece_bpe"
"""the "type" of the lmforge_tokenizer.json `save` writes (load_tokenizer dispatches on it)"""
FORMAT_VERSION = 1

WHERE = ("input", "split", "inside")
"""where a text encode_ordinary takes sits in a longer input (see encode_ordinary)"""


def _merge_pair(m: Any) -> tuple[str, str]:
    """One merge as "a b" (older files) or ["a", "b"]; ValueError when it is not two pieces."""
    a, b = m.split(" ") if isinstance(m, str) else m
    return a, b


def put_prefix_bytes(tokenizer, size: int) -> tuple[list[int], list[bool]] | None:
    """What bits per byte takes off the bytes of tokens that open a text a SentencePiece-style tokenizer put "▁"
    before (SentencePieceBPE.dummy_prefix; Llama 2 puts one before every document): (lead, the bytes of the put "▁"
    token v holds when it opens one; opens, whether the token after u opens one: the document separator (eot_id),
    and added tokens where the tokenizer puts one after each), one entry per id < `size`. None for tokenizers that
    put nothing before a text (byte-level BPE, bytes). Read by val_bpb (lmforge.train.pretrain.prefix_bytes) and
    `lmforge tokenizer stats` (tokenizer.corpus.corpus_stats)."""
    described = getattr(tokenizer, "dummy_prefix", None)
    if described is None:
        return None
    at_input, after, lead = described()
    eot = getattr(tokenizer, "eot_id", None)
    openers = [*after, *([eot] if at_input and eot is not None else [])]
    if not openers or not lead:
        return None
    leads, opens = [0] * size, [False] * size
    for i, n in lead.items():
        if i < size:
            leads[i] = n
    for i in openers:
        if i < size:
            opens[i] = True
    return leads, opens


def merge_all(symbols: list[int], merges: dict[tuple[int, int], tuple[int, int]]) -> list[int]:
    """BPE over one word's symbols: repeatedly merge the adjacent pair of lowest rank (leftmost on ties), as HF's
    `Word::merge_all`: a heap of candidate merges over a linked list, O(n log n) for a text of any length.
    merges: (left id, right id) -> (rank, merged id). A heap entry is stale once its left symbol was merged away
    or the pair there now makes another token; it is skipped when popped."""
    n = len(symbols)
    if n < 2:
        return symbols
    syms: list[int | None] = list(symbols)
    nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
    heap = [(m[0], i, m[1]) for i in range(n - 1) if (m := merges.get((symbols[i], symbols[i + 1])))]
    heapq.heapify(heap)
    while heap:
        _, i, new = heapq.heappop(heap)
        j = nxt[i]
        if syms[i] is None or j >= n:
            continue
        m = merges.get((syms[i], syms[j]))
        if m is None or m[1] != new:
            continue
        syms[i], syms[j] = new, None
        k = nxt[i] = nxt[j]
        if k < n:
            prv[k] = i
        if prv[i] >= 0 and (m := merges.get((syms[prv[i]], new))):
            heapq.heappush(heap, (m[0], prv[i], m[1]))
        if k < n and (m := merges.get((new, syms[k]))):
            heapq.heappush(heap, (m[0], i, m[1]))
    return [s for s in syms if s is not None]


class SentencePieceBPE:
    """A SentencePiece-style BPE tokenizer.json (see the module docstring), with lmforge's tokenizer interface:
    encode / encode_ordinary (+ _spans) / decode, vocab_size, special_tokens, eot_id, bos_id, prefix/suffix_tokens,
    save, spec. `doc`: the parsed tokenizer.json, kept whole (save and save_hf write it back); eos_token: the added
    token that ends a text (eot_id), where it is not the first of byte.EOT_NAMES the special tokens hold (a HF
    directory's tokenizer_config.json eos_token: from_hf reads it)."""

    def __init__(self, doc: dict, where: str = "tokenizer.json", eos_token: str | None = None):
        if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict) or doc["model"].get("type") != "BPE":
            raise DataError(f"{where}: not a BPE tokenizer.json (model.type must be 'BPE')")
        self.doc, self.path = doc, None
        self._read_model(doc["model"], where)
        self._read_added(doc.get("added_tokens"), where)
        if eos_token is not None and eos_token not in self.special_tokens:
            raise DataError(f"{where}: eos_token {eos_token!r} is not one of the added tokens "
                            f"{list(self.special_tokens)[:8]}; name one of them")
        self.eos_token = eos_token
        self._normalizer = read_normalizer(doc.get("normalizer"), where)
        self._pre_tokenizer = read_pre_tokenizer(doc.get("pre_tokenizer"), where)
        self._decoder = read_decoder(doc.get("decoder"), where)
        self._per_token, self.stream_lead = stream_steps(self._decoder)
        self.streamable = self._per_token is not None
        self._bytes_joined = any(s[0] == "bytefallback" for s in self._decoder)
        """whether stream_bytes + stream_lead give decode's text token by token (see the module docstring)"""
        self._streamed: dict[tuple[int, bool], bytes] = {}
        # what a space becomes ("▁"): the Metaspace replacement, or what the normalizer replaces " " with
        self._spaces = {s[1] for s in self._pre_tokenizer if s[0] == "metaspace"}
        self._spaces |= {s[2] for s in self._normalizer if s[0] == "replace" and s[1] == " "}
        before, after = hf_added_specials(doc.get("post_processor"), self.special_tokens, where)
        self.prefix_tokens, self.suffix_tokens = tuple(before), tuple(after)
        # the added tokens split out of the raw text, and (normalized=true) out of the normalized text, whose
        # contents are matched normalized (HF's AddedVocabulary); encode_ordinary leaves the special ones' matches in
        # the text (sentencepiece_steps.split_added), so it searches a table only where a token there is not special
        raw = [t for t in self._added if not t["normalized"]]
        norm = [dict(t, content=normalize(self._normalizer, t["content"])) for t in self._added if t["normalized"]]
        tables = tuple({t["content"]: t for t in ts} for ts in (raw, norm))
        self._tables = {False: tables,
                        True: tuple(tb if any(not t["special"] for t in tb.values()) else {} for tb in tables)}
        # id -> its piece, what decode starts from; an added token matched normalized is its normalized content
        self._pieces: list[str | None] = [None] * (max([*self.pieces.values(), *self.special_tokens.values()],
                                                       default=-1) + 1)
        for s, i in self.pieces.items():
            self._pieces[i] = s
        for t in raw + norm:
            self._pieces[t["id"]] = t["content"]
        self._chars: dict[str, list[int]] = {}  # a character's symbols (its id, or its bytes' ids), cached
        self._words = self._word_cut({self._pieces[new] for _, new in self._merges.values()})
        self._cache: dict[str, list[int]] = {}  # a word's ids (HF's BPE keeps such a cache too)

    # ---- reading the file ------------------------------------------------------------------------

    def _read_model(self, model: dict, where: str) -> None:
        refused = [f"model.{k}={model.get(k)!r}" for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix")
                   if model.get(k)]
        if refused:
            raise DataError(f"{where}: {', '.join(refused)} is not supported{UNREAD}")
        vocab = model.get("vocab")
        if not isinstance(vocab, dict) or not all(isinstance(i, int) and i >= 0 for i in vocab.values()):
            raise DataError(f"{where}: model.vocab must be a JSON object of piece -> id")
        self.pieces: dict[str, int] = dict(vocab)
        """model.vocab: piece ("▁the", "<0x0A>") -> id"""
        self.byte_fallback = bool(model.get("byte_fallback"))
        self.fuse_unk = bool(model.get("fuse_unk"))
        self.ignore_merges = bool(model.get("ignore_merges"))
        unk = model.get("unk_token")
        if unk is not None and unk not in self.pieces:
            raise DataError(f"{where}: model.unk_token {unk!r} is not in model.vocab")
        self.unk_id = self.pieces.get(unk) if unk is not None else None
        self._merges: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, m in enumerate(model.get("merges") or []):
            try:
                a, b = _merge_pair(m)
                # a pair listed twice takes its last rank, as HF builds its merge map from the list
                self._merges[self.pieces[a], self.pieces[b]] = (rank, self.pieces[a + b])
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{where}: merge #{rank} {m!r} is not two pieces whose join is in model.vocab "
                                f"({type(e).__name__}: {e})") from e

    def _read_added(self, added: list, where: str) -> None:
        self._added: list[dict] = []
        for t in hf_added_tokens(added, where, self.pieces):
            if t.get("single_word"):
                raise DataError(f"{where}: added token {t['content']!r} has single_word=true, which lmforge does not "
                                f"apply; set it false in the file{UNREAD}")
            # HF's defaults: a special token is matched in the raw text, any other after normalization (the id: HF's,
            # a piece of model.vocab that piece's, whatever id the file lists)
            self._added.append({"content": t["content"], "id": t["id"],
                                "special": bool(t.get("special")),
                                "normalized": bool(t.get("normalized", not t.get("special"))),
                                "lstrip": bool(t.get("lstrip")), "rstrip": bool(t.get("rstrip"))})
        self.special_tokens = {t["content"]: t["id"] for t in self._added}
        """every added token, name -> id (a text's matches become their ids), as bpe.Tokenizer's special_tokens"""
        self.non_special = tuple(t["content"] for t in self._added if not t["special"])
        """the added tokens HF marks "special": false, as bpe.Tokenizer's non_special: kept in a text decoded with
        skip_special_tokens (lmforge.infer.detok.special_ids leaves the others out, as HF's decode does)"""

    # ---- properties ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def eot_id(self) -> int | None:
        """The id that ends a text: generation stops there, SFT completions and token shards' documents end with it."""
        return end_of_text(self.special_tokens, self.eos_token)

    @property
    def bos_id(self) -> int | None:
        """The first token encode(text, add_special_tokens=True) puts before a text (Llama 2's <s>), or None."""
        return self.special_tokens[self.prefix_tokens[0]] if self.prefix_tokens else None

    @property
    def vocab(self) -> dict[int, bytes]:
        """id -> the UTF-8 bytes the token stands for in a text: its piece with "▁" as a space, a byte token's one
        byte, an added token's content (bits per byte counts these: lmforge.train.pretrain.token_byte_lengths)."""
        out = {}
        for i, piece in enumerate(self._pieces):
            if piece is not None:
                m = BYTE_PIECE.fullmatch(piece) if self.byte_fallback else None
                out[i] = bytes([int(m.group(1), 16)]) if m else "".join(
                    " " if c in self._spaces else c for c in piece).encode()
        return out

    def dummy_prefix(self) -> tuple[bool, frozenset[int], dict[int, int]]:
        """The "▁" this tokenizer puts before a text (SentencePiece's dummy prefix: Prepend, Metaspace's
        prepend_scheme), a space no document holds, which bits per byte leaves out (lmforge.train.pretrain.
        prefix_bytes): (whether a text encoded alone (a document) gets one; the added tokens after which each
        stretch between them gets one (Prepend: those matched in the raw text; "always": all); id -> the bytes of
        the put "▁" a token holds when it opens such a text (its piece starts with it)). Metaspace puts none before
        a text that opens with a space, whose ids are the same: its first token is taken for one with "▁" put."""
        prepend = [s[1] for s in self._normalizer if s[0] == "prepend"]
        schemes = {s[2]: s[1] for s in self._pre_tokenizer if s[0] == "metaspace" and s[2] != "never"}
        after = frozenset(t["id"] for t in self._added if "always" in schemes or prepend and not t["normalized"])
        lead: dict[int, int] = {}
        for put in [*prepend, *schemes.values()]:
            size = len("".join(" " if c in self._spaces else c for c in put).encode())  # (as `vocab` counts it)
            for piece, i in self.pieces.items():
                if piece.startswith(put):
                    lead[i] = max(lead.get(i, 0), size)
        return bool(prepend or schemes), after, lead

    def spec(self) -> str:
        """What token shards record: the file it was saved to or read from (load_tokenizer), else a content hash."""
        if self.path is not None:
            return str(self.path)
        return "sentencepiece:" + hashlib.sha1(json.dumps(self.doc, sort_keys=True).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"SentencePieceBPE(vocab_size={self.vocab_size}, merges={len(self._merges)}, "
                f"byte_fallback={self.byte_fallback}, specials={list(self.special_tokens)[:8]})")

    # ---- encoding --------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = False, where: str = "input") -> list[int]:
        """Text -> ids, as HF's encode(text, add_special_tokens=...).ids. Added tokens in the text become their
        ids. add_special_tokens: put prefix_tokens (Llama 2's <s>) before and suffix_tokens after the ids; lmforge's
        default is False, as for its byte-level Tokenizer: prompts get the BOS where they are made (LLM.encode).
        where: as encode_ordinary's ("inside": a completion or a step continuing a text encoded before it)."""
        ids = self._encode(text, False, where)
        if add_special_tokens:
            ids = ([self.special_tokens[s] for s in self.prefix_tokens] + ids
                   + [self.special_tokens[s] for s in self.suffix_tokens])
        return ids

    def encode_ordinary(self, text: str, *, where: str = "input") -> list[int]:
        """Encode with special tokens' text as plain text (added tokens not marked special still split out, as
        in HF with split_special_tokens=True). `where` the text sits in a longer input that HF tokenizes whole
        (a chat template's rendering: lmforge.infer.chat_template), so that the pieces' ids join into HF's:
        "input" opens it (as a text encoded alone), "split" follows an added token (Llama 2's Prepend and
        Metaspace prepend_scheme "always" put "▁" before it, "first" does not), "inside" continues the text
        before it (no "▁" put before it)."""
        return self._encode(text, True, where)

    def encode_ordinary_spans(self, text: str, *, where: str = "input") -> tuple[list[int], list[tuple[int, int]]]:
        """encode_ordinary's ids and, per id, the (start, stop) characters of `text` it stands for (HF's
        Encoding.offsets): a "▁" put before the text shares its first character's, each byte token its
        character's, <unk> its characters'. What SFT's masks use to find the tokens of an assistant's text
        (decode([id]) drops a token's leading space, so the tokens' texts are no walk along the text)."""
        spans: list[tuple[int, int]] = []
        return self._encode(text, True, where, spans), spans

    def _encode(self, text: str, ordinary: bool, where: str = "input",
                spans: list[tuple[int, int]] | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        if where not in WHERE:
            raise ConfigError(f"where={where!r} is not one of {', '.join(map(repr, WHERE))}: 'input' (the text opens "
                              "an input), 'split' (it follows an added token), 'inside' (it continues the text before)")
        raw, norm = self._tables[ordinary]
        out: list[int] = []
        for seg, start, added in split_added(without_surrogates(text), raw, ordinary):  # (1:1 in characters)
            if added is not None:
                out.append(added)
                if spans is not None:
                    spans.append((start, start + len(seg)))
                continue
            opens = start > 0 or where != "inside"  # the segment opens a split (HF normalizes each on its own)
            # each normalized character's (start, stop) in `text`, kept only where spans are asked for
            align = [(i, i + 1) for i in range(start, start + len(seg))] if spans is not None else None
            for piece, at, added in split_added(normalize(self._normalizer, seg, opens, align), norm, ordinary):
                if added is not None:
                    out.append(added)
                    if spans is not None:
                        spans.append((align[at][0], align[at + len(piece) - 1][1]))
                    continue
                first = where == "input" and start == 0 and at == 0
                for word, w_at, inserted in pre_tokenize(self._pre_tokenizer, piece, first, opens=opens or at > 0):
                    ids = self._bpe(word)
                    out.extend(ids)
                    if spans is not None:  # (a word of inserted "▁" alone: the next character's span)
                        lo = at + w_at
                        spans.extend(self._spans(word, ids, align[lo:max(lo + len(word) - inserted, lo + 1)],
                                                 inserted))
        return out

    def _spans(self, word: str, ids: list[int], align: list[tuple[int, int]], inserted: int) -> list[tuple[int, int]]:
        """The spans of one word's ids: `align` holds its characters' spans, less the `inserted` "▁" before
        them (which share the first one's). A token is its piece's characters, a byte token a part of its
        character, <unk> one unknown character (fuse_unk: a run of them)."""
        k, pending, out = 0, 0, []  # k: the word's next character; pending: its bytes already taken
        for t in ids:
            piece = self._pieces[t]
            if not pending and word.startswith(piece, k):
                a, k = k, k + len(piece)
            elif pending or (self.byte_fallback and BYTE_PIECE.fullmatch(piece) and k < len(word)):
                a, pending = k, pending + 1
                if pending == len(word[k].encode()):
                    k, pending = k + 1, 0
            elif t == self.unk_id and k < len(word):
                a, k = k, k + 1
                while self.fuse_unk and k < len(word) and not self._chars.get(word[k], True):
                    k += 1
            else:  # (HF's order of a pending <unk> and a byte-fallback character's bytes: the word's span)
                return [(align[0][0], align[-1][1])] * len(ids)
            lo, hi = max(a - inserted, 0), max(max(k, a + 1) - inserted, 1) - 1
            out.append((align[lo][0], align[hi][1]))
        return out

    def _word_cut(self, merged: set[str]) -> re.Pattern | None:
        """Where a text may be cut into words that BPE merges alone, giving the ids of merging it whole: before
        each "▁" that follows another character, when no merge makes a piece holding such a pair (SentencePiece
        trained with split_by_whitespace, its default, makes none), so no merge ever crosses the cut. Llama 2's
        files have no pre_tokenizer: a text is one piece, and without the cut BPE ran over all of it each time
        (~100 kB/s); cut, each word's ids come from a cache. None when a merge crosses (the test tokenizers)."""
        if len(self._spaces) != 1 or self.ignore_merges:
            return None
        rep = next(iter(self._spaces))
        crossing = re.compile(f"[^{re.escape(rep)}]{re.escape(rep)}")
        if rep not in self.pieces or any(crossing.search(m) for m in merged):
            return None
        return re.compile(f"(?<=[^{re.escape(rep)}])(?={re.escape(rep)})")

    def _bpe(self, text: str) -> list[int]:
        if self._words is None or len(text) < 2:
            return self._merge(text)
        out: list[int] = []
        cache = self._cache
        for word in self._words.split(text):
            ids = cache.get(word)
            if ids is None:
                ids = self._merge(word)
                if len(word) <= 256:  # (a long run without spaces - CJK text - is seldom seen again: as HF's cache)
                    if len(cache) >= 1 << 16:
                        cache.clear()
                    cache[word] = ids
            out.extend(ids)
        return out

    def _merge(self, word: str) -> list[int]:
        if self.ignore_merges and word in self.pieces:
            return [self.pieces[word]]
        symbols: list[int] = []
        unk = False  # unknown characters are pending (fuse_unk: one <unk> stands for a run of them)
        for ch in word:
            ids = self._chars[ch] if ch in self._chars else self._symbols(ch)
            if not ids:
                if unk and not self.fuse_unk:
                    symbols.append(self.unk_id)
                unk = True
                continue
            if unk and ch in self.pieces:  # HF puts a pending <unk> before a known character's id, but after
                symbols.append(self.unk_id)  # a byte-fallback character's bytes (BPE::merge_word)
                unk = False
            symbols.extend(ids)
        if unk:
            symbols.append(self.unk_id)
        return merge_all(symbols, self._merges)

    def _symbols(self, ch: str) -> list[int]:
        """A character's symbols before merging: its piece, else (byte fallback) its UTF-8 bytes' <0xXX> pieces
        when all are in the vocabulary; [] for the unknown token (an error when the file has none)."""
        ids = [self.pieces[ch]] if ch in self.pieces else []
        if not ids and self.byte_fallback:
            ids = [self.pieces.get(f"<0x{b:02X}>") for b in ch.encode("utf-8")]
            ids = [] if None in ids else ids
        if not ids and self.unk_id is None:
            raise ValueError(f"character {ch!r} is not in the vocabulary, and the tokenizer has no byte fallback "
                             "or unk_token to stand for it")
        self._chars[ch] = ids
        return ids

    # ---- decoding --------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text through the file's decoder steps; byte tokens that are no valid UTF-8, and an id that is
        no token, become U+FFFD."""
        if isinstance(ids, (str, bytes, bytearray)):
            raise TypeError(f"decode takes token ids (a list of ints), got {type(ids).__name__}")
        table, n = self._pieces, len(self._pieces)
        tokens = [(table[i] if 0 <= i < n else None) or "\ufffd" for i in map(int, ids)]
        for step in self._decoder:
            tokens = DECODERS[step[0]](tokens, *step[1:])
        return "".join(tokens)

    def stream_bytes(self, i: int, first: bool = False) -> bytes:
        """The bytes token `i` adds to decode's text, as the first token or after others (only where `streamable`):
        its piece through the decoder's per-token steps, a byte token's one byte. The text's start then loses up to
        `stream_lead`'s count of its character (the Strip after Fuse), which the caller applies to the text."""
        key = (i, first)
        out = self._streamed.get(key)
        if out is None:
            if not self.streamable:
                raise ValueError(f"this tokenizer's decoder {[s[0] for s in self._decoder]} does not decode token "
                                 f"by token; decode a window of ids instead (lmforge.infer.detok.StreamDecoder does)")
            piece = (self._pieces[i] if 0 <= i < len(self._pieces) else None) or "\ufffd"
            tokens = [piece] if first else ["", piece]  # (an empty first token: the steps' rule for later ones)
            for step in self._per_token:
                tokens = DECODERS[step[0]](tokens, *step[1:])
            m = BYTE_PIECE.fullmatch(tokens[-1]) if self._bytes_joined and tokens[-1].startswith("<0") else None
            out = bytes([int(m.group(1), 16)]) if m else tokens[-1].encode("utf-8", "surrogatepass")
            if len(self._streamed) < 1 << 20:
                self._streamed[key] = out
        return out

    # ---- formats ---------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write lmforge_tokenizer.json (`path` itself if it ends in .json, else in the directory `path`): the
        tokenizer.json document, whole, under a "type" load_tokenizer reads."""
        path = Path(path)
        target = path / FILE_NAME if path.suffix != ".json" else path
        write_json_atomic(target, {"type": TYPE, "version": FORMAT_VERSION, "tokenizer.json": self.doc,
                                   **({"eos_token": self.eos_token} if self.eos_token is not None else {})})
        self.path = target.resolve()
        return target

    def save_hf(self, path: str | Path, *, chat_template=None, config: dict | None = None) -> Path:
        """Write the tokenizer.json it was read from (into the directory `path`, or the .json file `path`) and the
        tokenizer_config.json beside it that keeps eos_token, bos_token and a chat template
        (hf_json.write_hf_config); the tokenizer.json's path."""
        return write_hf(self, path, self.doc, chat_template, config)

    @classmethod
    def from_hf(cls, path: str | Path, doc: dict | None = None) -> "SentencePieceBPE":
        """Open a SentencePiece-style tokenizer.json (or the directory holding one; `doc`: its parsed text, where the
        caller has read it), with the eos_token of a tokenizer_config.json beside it (hf_json.hf_eos_token)."""
        path = Path(path)
        path = path / "tokenizer.json" if path.is_dir() else path
        doc = _read_json(path, "HF tokenizer file") if doc is None else doc
        added = doc.get("added_tokens") if isinstance(doc, dict) else None
        names = {t.get("content"): t.get("id") for t in added or [] if isinstance(t, dict)}
        return cls(doc, str(path), eos_token=hf_eos_token(path, names))

    @classmethod
    def from_dict(cls, d: dict, where: str = "tokenizer") -> "SentencePieceBPE":
        """Read what `save` wrote (a parsed lmforge_tokenizer.json)."""
        if d.get("type") != TYPE or d.get("version") != FORMAT_VERSION:
            raise DataError(f"{where} is not a version-{FORMAT_VERSION} {TYPE} tokenizer (type {d.get('type')!r}, "
                            f"version {d.get('version')!r})")
        return cls(d.get("tokenizer.json"), where, eos_token=d.get("eos_token"))
