"""Byte-level BPE `Tokenizer`: encode/decode with special tokens, a tiktoken fast path checked against
the pure-Python reference, streaming and batch encoding, and loading/saving in several formats.

Ids: any id -> bytes table works. Encoding needs all 256 single bytes in the vocabulary. tiktoken
merges the adjacent pair whose *concatenation* has the lowest rank, while BPE proper merges the
earliest *pair* in the merge list; the two agree when ranks follow merge order and every token is
built by its own merge. The fast path is used only after that is checked (`agreement`, remembered on
disk once passed), and falls back to the reference encoder otherwise.

Unicode versions: a pattern's classes (\\p{L}, \\p{N}, \\s) are read from each regex engine's own tables. The
reference's `regex` module knows Unicode 17; tiktoken's Rust engine an older version (4,644 code points that
`regex` calls letters are not letters there, among them CJK extension ideographs added since), and HF
tokenizers' Oniguruma yet another. A text holding such characters can pre-tokenize differently in the two
paths (as it does between tiktoken and HF tokenizers); lmforge does not pick one, since for a tiktoken
encoding tiktoken's own split is the one its users expect.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AbstractSet, Collection, Iterable, Iterator, Literal

import numpy as np

from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import agreement, formats, hf_json
from lmforge.tokenizer.added import AddedVocabulary
from lmforge.tokenizer.byte import FILE_NAME, end_of_text, without_surrogates
from lmforge.tokenizer.hf_json import NORMAL_FORMS
from lmforge.tokenizer.pretokenize import (PATTERNS, check_specials, last_safe_cut, pieces_pattern,
                                           resolve_pattern, wraps_alone)
from lmforge.tokenizer.reference import ReferenceEncoder
from lmforge.utils import write_json_atomic

FORMAT_VERSION = 1
_REPLACEMENT = "\ufffd".encode()


def _check_text(text) -> None:
    """encode's argument must be a str: bytes failed deep inside the pattern matching with a message about str."""
    if not isinstance(text, str):
        hint = "; decode the bytes first (data.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"encode takes a str, got {type(text).__name__}{hint}")


class Tokenizer:
    """Byte-level BPE tokenizer.

    vocab: id -> token bytes; merges: ordered pairs of token bytes (each pair's concatenation must be
    in the vocabulary); special_tokens: strings that are never split or merged (reused from the
    vocabulary when their bytes are there, otherwise given the next free ids; a dict may give one the id of the entry
    it spells in GPT-2's byte characters, an ordinary token BPE still emits, as HF's added "Ã" on byte 0xC3);
    pattern: "gpt2", "cl100k", "o200k" or a custom pre-tokenization regex (the text between its matches, if any, is a
    piece too, as in HF's Split "isolated"; tiktoken would drop it); normalization: a Unicode normal form ("NFC",
    "NFD", "NFKC", "NFKD") applied to the text between special tokens before it is split (a HF tokenizer.json
    `normalizer`: Qwen2's NFC), or None; ignore_merges: a pre-token that is itself in the vocabulary is
    emitted as that token instead of being merged (HF's `model.ignore_merges`, set by Llama-3; tiktoken
    always works so); prefix_tokens / suffix_tokens: special tokens that encode(text, add_special_tokens=True)
    puts before / after the text (a HF tokenizer.json post_processor: Llama-3's <|begin_of_text|> before; none
    for lmforge-trained tokenizers); eos_token: the special token that ends a text (eot_id), where it is not the
    first of byte.EOT_NAMES the specials hold (a HF directory's tokenizer_config.json eos_token: Llama-3-Instruct's
    <|eot_id|>); non_special: special tokens a HF tokenizer.json marks "special": false (Qwen3's <think>, Qwen2.5's
    <tool_call>): matched in text as the others (by encode_ordinary too, whatever encode's allowed_special says),
    but kept in texts decoded with skip_special_tokens, as HF keeps them; normalized: added tokens a HF tokenizer.json
    marks "normalized": true (what HF's add_tokens gives a token that is not special), matched as HF's AddedVocabulary
    matches them: after the others are split out of the raw text, in each normalized stretch between those, by their
    own normalized text (under NFKC "ﬁ" matches "fi", under NFC "é" matches "e" + U+0301). A special token BPE does
    not emit decodes as HF's ByteLevel decoder gives it (formats.byte_level_decoded: "Ġhello" is " hello").
    """

    def __init__(self, vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]],
                 special_tokens: Iterable[str] | dict[str, int] | None = None, pattern: str = "gpt2",
                 normalization: str | None = None, ignore_merges: bool = False,
                 prefix_tokens: Iterable[str] = (), suffix_tokens: Iterable[str] = (), eos_token: str | None = None,
                 non_special: Iterable[str] = (), normalized: Iterable[str] = ()):
        if normalization not in NORMAL_FORMS:
            raise ConfigError(f"normalization={normalization!r} is not a Unicode normal form; use one of "
                              f"{NORMAL_FORMS[1:]} or None")
        self.normalization = normalization
        self.ignore_merges = bool(ignore_merges)
        self.pattern = resolve_pattern(pattern)
        self.vocab = {int(i): bytes(b) for i, b in vocab.items()}
        self.merges = [(bytes(a), bytes(b)) for a, b in merges]
        self.special_tokens = self._place_specials(special_tokens)
        self.prefix_tokens, self.suffix_tokens = tuple(prefix_tokens), tuple(suffix_tokens)
        self.non_special, self.normalized = tuple(non_special), tuple(normalized)
        self._specials = tuple(s for s in self.special_tokens if s not in self.non_special)  # what encode may allow
        for what, names in (("prefix/suffix", self.prefix_tokens + self.suffix_tokens),
                            ("non_special", self.non_special), ("normalized", self.normalized)):
            unknown = [t for t in names if t not in self.special_tokens]
            if unknown:
                raise ConfigError(f"{what} token {unknown[0]!r} is not one of the special tokens "
                                  f"{list(self.special_tokens)}; add it to special_tokens")
        if eos_token is not None and eos_token not in self.special_tokens:
            raise ConfigError(f"eos_token {eos_token!r} is not one of the special tokens {list(self.special_tokens)}; "
                              "add it to special_tokens")
        self.eos_token = eos_token
        self.added = AddedVocabulary(self.special_tokens, self.normalized, self.normalization)
        self._check_tables()
        self._decode_table = [_REPLACEMENT] * self.vocab_size
        for i, b in self.vocab.items():
            self._decode_table[i] = b
        for s, i in self.special_tokens.items():  # (only specials: a shared id decodes as the entry BPE emits)
            if i not in self.shared_ids:
                self._decode_table[i] = formats.byte_level_decoded(s)
        self.reference = ReferenceEncoder(self.pattern, self._ranks, self._merged, self._byte_ids,
                                          self._by_bytes if self.ignore_merges else None)
        self._enc, self._rank_to_id = self._build_fast()
        self.path: Path | None = None  # the file it was saved to or read from (load_tokenizer): what spec() names

    # ---- construction ----------------------------------------------------------------------------

    def _place_specials(self, specials: Iterable[str] | dict[str, int] | None) -> dict[str, int]:
        if isinstance(specials, dict):
            check_specials(specials)
            if len(set(specials.values())) != len(specials):
                raise ConfigError(f"two special tokens share an id: {specials}")
            for s, i in specials.items():
                # (an added token spelled as the byte-level entry it shares an id with, as HF's tokenizer.json
                # gives a vocab entry's text that entry's id: "Ã" is byte 0xC3, emitted and decoded as that byte)
                if i in self.vocab and self.vocab[i] != s.encode() and formats.bytes_to_str(self.vocab[i]) != s:
                    raise ConfigError(f"special token {s!r} id {i} collides with token {self.vocab[i]!r}")
                self.vocab.setdefault(i, s.encode())
            return dict(specials)
        by_bytes = {b: i for i, b in self.vocab.items()}
        out: dict[str, int] = {}
        next_id = max(self.vocab, default=-1) + 1
        for s in check_specials(specials):
            if s.encode() in by_bytes:
                out[s] = by_bytes[s.encode()]
            else:
                out[s], next_id = next_id, next_id + 1
                self.vocab[out[s]] = s.encode()
        return out

    def _check_tables(self) -> None:
        if len(set(self.special_tokens.values())) != len(self.special_tokens):
            raise ConfigError(f"two special tokens share an id: {self.special_tokens}")
        # a special's id is an ordinary token too (BPE may emit it) where its bytes are not its text (HF's added
        # "Ã" on byte 0xC3's id) or are ones BPE makes (a byte, a merge's product: an added "at" on the merged "at")
        # that no other id holds (a special "at" beside the merged "at" of another id is only a special, as before)
        made = {a + b for a, b in self.merges}
        holders = Counter(self.vocab.values())
        only_special = {i for s, i in self.special_tokens.items() if self.vocab[i] == s.encode()
                        and (len(self.vocab[i]) > 1 and self.vocab[i] not in made or holders[self.vocab[i]] > 1)}
        self.shared_ids = frozenset(self.special_tokens.values()) - only_special
        """special ids BPE also emits as ordinary tokens (their bytes: vocab), as HF gives an added token spelled as
        a vocab entry that entry's id; their bytes count in bits per byte (detok.token_text_bytes)"""
        self._by_bytes: dict[bytes, int] = {}
        for i, b in sorted(self.vocab.items()):
            if i < 0:
                raise ConfigError(f"token id {i} is negative")
            if i not in only_special:
                if b in self._by_bytes:
                    raise ConfigError(f"token bytes {b!r} appear twice in the vocabulary "
                                      f"(ids {self._by_bytes[b]}, {i})")
                self._by_bytes[b] = i
        missing = [x for x in range(256) if bytes([x]) not in self._by_bytes]
        if missing:
            raise ConfigError(f"vocabulary lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]}); "
                              "byte-level BPE needs all 256")
        self._byte_ids = [self._by_bytes[bytes([x])] for x in range(256)]
        self._ranks: dict[tuple[int, int], int] = {}
        self._merged: dict[tuple[int, int], int] = {}
        for r, (a, b) in enumerate(self.merges):
            try:
                pair, new = (self._by_bytes[a], self._by_bytes[b]), self._by_bytes[a + b]
            except KeyError as e:
                raise ConfigError(f"merge #{r} ({a!r}, {b!r}) uses a token missing from the vocabulary: {e}") from e
            # a pair listed twice takes its last rank, as in HF tokenizers and GPT-2's encoder.py (dicts
            # built from the list); the fast path is off then (one token made by two merges)
            self._ranks[pair], self._merged[pair] = r, new

    def _merge_ids(self) -> list[int]:
        return [self._by_bytes[a + b] for a, b in self.merges]

    def _ids_are_ranks(self) -> bool:
        """Ids usable as tiktoken ranks: merge results' ids grow with merge order and exceed every byte's."""
        ids = self._merge_ids()
        return all(x < y for x, y in zip(ids, ids[1:])) and (not ids or ids[0] > max(self._byte_ids))

    def mergeable_ranks(self) -> dict[bytes, int]:
        """tiktoken ranks, equal to the ids (gaps where specials sit are fine)."""
        if not self._ids_are_ranks():
            raise ConfigError("token ids do not follow merge order, so they cannot serve as tiktoken ranks")
        return {**{bytes([x]): self._byte_ids[x] for x in range(256)},
                **{a + b: i for (a, b), i in zip(self.merges, self._merge_ids())}}

    def _build_fast(self):
        """A tiktoken Encoding whose ranks are merge priorities, plus a rank -> id map when the ids
        cannot be the ranks themselves; (None, None) when tiktoken would disagree with the merges."""
        try:
            import tiktoken
        except ImportError:
            return None, None
        made = [a + b for a, b in self.merges]
        if len(set(made)) != len(made):
            return None, None  # one token made by two merges: tiktoken's ranks cannot express that
        # tiktoken emits a pre-token that is in its ranks whole (that is ignore_merges), but it knows only
        # bytes and merge results; a token made by no merge would be merged into if it were given a rank
        if self.ignore_merges and len(self._by_bytes) > 256 + len(made):
            return None, None
        if self._ids_are_ranks():
            ranks, rank_to_id = self.mergeable_ranks(), None
            rank_of = [ranks[t] for t in made]
        else:  # bytes 0..255, merge k -> 256 + k, mapped back to ids after encoding
            ranks = {bytes([x]): x for x in range(256)}
            ranks.update({t: 256 + k for k, t in enumerate(made)})
            rank_to_id = np.array(self._byte_ids + [self._by_bytes[t] for t in made], dtype=np.int64)
            rank_of = list(range(256, 256 + len(made)))
        if not wraps_alone(self.pattern):
            return None, None  # tiktoken's one regex cannot keep the gaps around empty matches or back-references
        try:
            enc = tiktoken.Encoding(f"lmforge-{id(self)}", pat_str=pieces_pattern(self.pattern),
                                    mergeable_ranks=ranks, special_tokens={})
        except ValueError:  # a pattern tiktoken's engine reads otherwise (e.g. a (?x) comment running to its end)
            return None, None
        to_id = (lambda rs: rs) if rank_to_id is None else (lambda rs: [int(rank_to_id[r]) for r in rs])
        # each token's own bytes must come out of both encoders the same way (remembered on disk once passed)
        by = self._by_bytes
        triples = [(by[a], by[b], by[t]) for (a, b), t in zip(self.merges, made)]
        if not agreement.agrees(enc, made, rank_of, to_id, self.reference, triples, self._byte_ids):
            return None, None
        return enc, rank_to_id

    # ---- properties ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return max(self.vocab, default=-1) + 1

    @property
    def eot_id(self) -> int | None:
        """The id that ends a text: generation stops there, SFT completions and token shards' documents end with it."""
        return end_of_text(self.special_tokens, self.eos_token)

    @property
    def bos_id(self) -> int | None:
        """The first token encode(text, add_special_tokens=True) adds before a text (Llama-3's <|begin_of_text|>),
        or None; what lm-eval scores an empty context after, and prompts open with (LLM)."""
        return self.special_tokens[self.prefix_tokens[0]] if self.prefix_tokens else None

    @property
    def fast(self) -> bool:
        """Whether encoding runs on tiktoken (False: the pure-Python reference)."""
        return self._enc is not None

    def token_bytes(self, i: int) -> bytes:
        """One token's bytes; an id that is no token (past the vocabulary: a model's padded rows, or negative)
        gives U+FFFD's, as in `decode` (streaming detokenization decodes through this, one id at a time)."""
        return self._decode_table[i] if 0 <= i < len(self._decode_table) else _REPLACEMENT

    def spec(self) -> str:
        """What token shards record: the file it was saved to or read from (load_tokenizer), else a content hash."""
        if self.path is not None:
            return str(self.path)
        return "bpe:" + hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"specials={list(self.special_tokens)}, fast={self.fast})")

    # ---- encoding --------------------------------------------------------------------------------

    def _allowed(self, allowed_special, disallowed_special) -> tuple[tuple[str, ...], tuple[str, ...]]:
        # as in tiktoken, allowed names that are not special tokens are ignored, disallowed ones are not
        allowed = set(self._specials) if allowed_special == "all" else set(allowed_special) & set(self._specials)
        if disallowed_special == "all":
            disallowed = set(self._specials) - allowed
        else:
            disallowed = set(disallowed_special)
        return tuple(sorted(allowed)), tuple(sorted(disallowed))

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode treating special-token strings as plain text. Added tokens that are not special (`non_special`:
        Qwen3's <think>) are vocabulary, matched in the text as units all the same, as HF tokenizers matches them
        with encode_special_tokens=True (what lmforge's pretraining shards are tokenized with: lmforge.data.tokenize,
        tokenizer.corpus); a special token's text is text whole (no added token inside it is matched), as in HF."""
        _check_text(text)
        return self._split_encode(text, self.non_special)

    def _split_encode(self, text: str, keep: Iterable[str] | None, plain=None) -> list[int]:
        """`text`'s ids, the added tokens in `keep` (None: all) matched as units as HF's AddedVocabulary matches them
        (added.AddedVocabulary.split), the text between them encoded by `plain` (the fast path, else the reference)
        once normalized."""
        plain = plain or self._plain
        out: list[int] = []
        for piece, i in self.added.split(text, keep):
            if i is not None:
                out.append(i)
                continue
            try:
                out.extend(plain(piece))
            except UnicodeEncodeError:
                out.extend(plain(without_surrogates(piece)))
        return out

    def _plain(self, text: str) -> list[int]:
        """The ids of normalized text that holds no added token."""
        if self._enc is None:
            return self.reference.encode(text)
        ids = self._enc.encode_ordinary(text)
        return ids if self._rank_to_id is None else self._rank_to_id[ids].tolist()

    def encode(self, text: str, *, add_special_tokens: bool = False,
               allowed_special: Literal["all"] | AbstractSet[str] = "all",
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """Text -> ids. Specials are matched longest first. As in tiktoken, a special listed in neither
        set is disallowed (ValueError) when disallowed_special="all", and names in allowed_special that are
        not special tokens are ignored; lmforge's default allows all. Added tokens that are not special
        (`non_special`) are matched as units whatever allowed_special says (encode_ordinary); a disallowed_special
        set naming one raises where the text holds it, as it does for any string it names (a `normalized` added
        token: where the normalized text holds it, as it is matched there). add_special_tokens: put
        prefix_tokens before and suffix_tokens after the ids, as HF's encode does by default; lmforge's default is
        False (as tiktoken, and HF's apply_chat_template): a piece of a longer text (a chat template's, a
        completion, a training document) gets no BOS of its own. Prompts get it where they are made (LLM.encode)."""
        if add_special_tokens and (self.prefix_tokens or self.suffix_tokens):
            ids = self.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
            return ([self.special_tokens[t] for t in self.prefix_tokens] + ids
                    + [self.special_tokens[t] for t in self.suffix_tokens])
        _check_text(text)
        allowed, disallowed = self._allowed(allowed_special, disallowed_special)
        keep = None if len(allowed) == len(self._specials) else frozenset(allowed + self.non_special)
        found = self.added.find(text, disallowed, keep) if disallowed else None
        if found:
            raise ValueError(f"text contains the disallowed special token {found!r}; pass allowed_special={{...}} to "
                             "encode it as a special or disallowed_special=() to encode it as text")
        return self._split_encode(text, keep)

    def encode_reference(self, text: str) -> list[int]:
        """`encode` (all specials allowed) through the pure-Python reference encoder only."""
        return self._split_encode(without_surrogates(text), None, self.reference.encode)

    def encode_batch(self, texts: list[str], *, num_threads: int = 8, **kwargs) -> list[list[int]]:
        """Encode many texts in parallel threads (tiktoken releases the GIL while it works)."""
        if len(texts) < 2 or num_threads <= 1:
            return [self.encode(t, **kwargs) for t in texts]
        with ThreadPoolExecutor(num_threads) as ex:
            return list(ex.map(lambda t: self.encode(t, **kwargs), texts))

    def encode_iterable(self, iterable: Iterable[str], *, buffer_chars: int = 1 << 16) -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. an open file's lines) to exactly the ids of encoding
        their concatenation. Text is cut only where tokenization cannot change (after a special token;
        for named patterns, at a line end where no pre-token crosses it: `pretokenize._SAFE_CUT`), so memory
        stays bounded by the distance between such points."""
        added = self.added.raw  # (non-special ones too: each is matched as a unit; normalized ones are not cuts)
        longest = max((len(s) for s in added), default=0)
        line_cuts = not any("\n" in s or "\r" in s for s in self.added.by_normal)  # (one could cross a line cut)
        parts: list[str] = []
        size, limit = 0, buffer_chars
        for chunk in iterable:
            parts.append(chunk)
            size += len(chunk)
            if size < limit:
                continue
            buf = "".join(parts)
            cut = last_safe_cut(buf, self.pattern, added, len(buf) - longest, line_cuts)
            if cut > 0:
                yield from self.encode(buf[:cut])
                buf = buf[cut:]
                limit = buffer_chars
            else:
                limit *= 2  # no safe point yet: read further before looking again
            parts, size = [buf], len(buf)
        yield from self.encode("".join(parts))

    # ---- decoding --------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        if isinstance(ids, (str, bytes, bytearray)):  # iterating one gave characters (or byte values) as ids
            raise TypeError(f"decode takes token ids (a list of ints), got {type(ids).__name__}")
        table, n = self._decode_table, len(self._decode_table)
        return b"".join([table[i] if 0 <= i < n else _REPLACEMENT for i in map(int, ids)])

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text; bytes that are not valid UTF-8 (a partial character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- formats ---------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        name = next((k for k, v in PATTERNS.items() if v == self.pattern), None)
        return {"type": "bpe", "version": FORMAT_VERSION, "pattern": name or self.pattern,
                **({"normalization": self.normalization} if self.normalization else {}),
                **({"ignore_merges": True} if self.ignore_merges else {}),
                **({"prefix_tokens": list(self.prefix_tokens)} if self.prefix_tokens else {}),
                **({"suffix_tokens": list(self.suffix_tokens)} if self.suffix_tokens else {}),
                **({"eos_token": self.eos_token} if self.eos_token is not None else {}),
                **({"non_special": list(self.non_special)} if self.non_special else {}),
                **({"normalized": list(self.normalized)} if self.normalized else {}),
                "special_tokens": self.special_tokens,
                "vocab": formats.encode_vocab(self.vocab, self.special_tokens),
                "merges": [f"{formats.bytes_to_str(a)} {formats.bytes_to_str(b)}" for a, b in self.merges]}

    def save(self, path: str | Path) -> Path:
        """Write one JSON file: `path` itself if it ends in .json, else `path/lmforge_tokenizer.json`."""
        path = Path(path)
        target = path / FILE_NAME if path.suffix != ".json" else path
        write_json_atomic(target, self.to_dict())
        self.path = target.resolve()
        return target

    @classmethod
    def from_dict(cls, d: dict, where: str = "tokenizer") -> "Tokenizer":
        if not isinstance(d, dict) or d.get("type") != "bpe":
            raise DataError(f"{where} is not an lmforge BPE tokenizer (type must be 'bpe')")
        if d.get("version") != FORMAT_VERSION:
            raise DataError(f"{where} has format version {d.get('version')!r}; this lmforge reads {FORMAT_VERSION}")
        try:
            vocab = formats.decode_vocab(d["vocab"], where)
            merges = [formats.parse_merge(m, where) for m in d["merges"]]
            specials = {str(s): int(i) for s, i in d["special_tokens"].items()}
            return cls(vocab, merges, specials, pattern=d["pattern"], normalization=d.get("normalization"),
                       ignore_merges=bool(d.get("ignore_merges", False)),
                       prefix_tokens=d.get("prefix_tokens", ()), suffix_tokens=d.get("suffix_tokens", ()),
                       eos_token=d.get("eos_token"), non_special=d.get("non_special", ()),
                       normalized=d.get("normalized", ()))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise DataError(f"{where} is corrupt: {type(e).__name__}: {e}") from e

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a file written by `save` (or the directory holding it). Another format (a HF tokenizer.json, GPT-2 or
        tiktoken files) is refused saying that `load_tokenizer` opens it: the message named no way forward."""
        given = path
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        try:
            d = formats._read_json(path, "tokenizer file")
            if not isinstance(d, dict) or d.get("type") != "bpe":
                raise DataError(f"{path} is not an lmforge BPE tokenizer (type must be 'bpe')")
        except DataError as e:
            raise DataError(f"{e}; lf.load_tokenizer({str(given)!r}) opens a HF tokenizer.json, GPT-2 vocab.json + "
                            "merges.txt or a tiktoken file, or a directory holding one") from None
        tok = cls.from_dict(d, str(path))
        tok.path = path.resolve()
        return tok

    @classmethod
    def from_gpt2_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> "Tokenizer":
        vocab, merges, specials, pattern = formats.read_gpt2(vocab_json, merges_txt)
        return cls(vocab, merges, specials, pattern)

    def save_gpt2(self, out_dir: str | Path) -> tuple[Path, Path]:
        self._warn_pattern_lost("GPT-2 vocab.json + merges.txt")
        return formats.write_gpt2(self, out_dir)

    def _warn_pattern_lost(self, fmt: str, read_back_specials: dict[str, int] | None = None) -> None:
        """GPT-2 and tiktoken files hold no pre-tokenization pattern (readers assume GPT-2's), normalization, BOS, or
        added-token flags (every added token is read back special and matched in the raw text); tiktoken's no special
        tokens either (`read_back_specials`: what a reader assumes instead)."""
        specials_lost = read_back_specials is not None and read_back_specials != self.special_tokens
        back = self.special_tokens if read_back_specials is None else read_back_specials
        eos_lost = self.eot_id is not None and end_of_text(back) != self.eot_id  # (a reader takes EOT_NAMES' first)
        lost = [what for what, gone in (("pre-tokenization pattern (not GPT-2's)", self.pattern != PATTERNS["gpt2"]),
                                        (f"{self.normalization} normalization", self.normalization is not None),
                                        ("prefix/suffix tokens (BOS)", bool(self.prefix_tokens or self.suffix_tokens)),
                                        (f"special tokens {self.special_tokens} (read back as {read_back_specials})",
                                         specials_lost),
                                        (f"added tokens {list(self.non_special)} marked not special (read back as "
                                         "specials, which encode_ordinary leaves as text)", bool(self.non_special)),
                                        (f"added tokens {list(self.added.second_pass)} matched in the normalized "
                                         "text (read back as matched in the raw text, first)",
                                         bool(self.added.second_pass)),
                                        (f"end-of-text token {self.eos_token!r} (read back as {end_of_text(back)}, "
                                         "where generation stops)", eos_lost))
                if gone]
        if lost:
            from lmforge.errors import warn_caller

            warn_caller(f"{fmt} cannot record this tokenizer's {' and '.join(lost)}: loaded back it gives other ids "
                        "for some texts or stops elsewhere; share lmforge_tokenizer.json or tokenizer.json (HF), which "
                        "keep it")

    @classmethod
    def from_hf(cls, path: str | Path) -> "Tokenizer":
        """Import a byte-level BPE `tokenizer.json` (or a directory holding one)."""
        return cls(**hf_json.read_hf(path))

    def save_hf(self, path: str | Path, *, chat_template=None, config: dict | None = None) -> Path:
        """Export `tokenizer.json` that HF `tokenizers` loads and encodes to the same ids (its encode's default
        add_special_tokens=True as this encode(text, add_special_tokens=True): prefix/suffix tokens in the
        post_processor), and the tokenizer_config.json beside it that keeps eos_token, bos_token and a chat
        template (hf_json.write_hf_config); the tokenizer.json's path."""
        return hf_json.write_hf(self, path, hf_json.hf_tokenizer_json(self), chat_template, config)

    @classmethod
    def from_tiktoken(cls, path: str | Path, special_tokens: dict[str, int] | None = None,
                      pattern: str = "gpt2") -> "Tokenizer":
        ranks = formats.read_tiktoken(path)
        return cls({r: b for b, r in ranks.items()}, formats.merges_from_ranks(ranks), special_tokens, pattern)

    def save_tiktoken(self, path: str | Path) -> Path:
        self._warn_pattern_lost("a tiktoken rank file", formats.tiktoken_specials(self.mergeable_ranks()))
        return formats.write_tiktoken(self, path)
