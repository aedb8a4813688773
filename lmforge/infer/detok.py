"""Incremental detokenization: token ids in, text pieces out, never splitting a UTF-8 character.

A byte-level tokenizer can end a step in the middle of a multi-byte character (or produce bytes that
are not UTF-8 at all). Streaming must hold the incomplete tail back until it completes, and show invalid
bytes as U+FFFD instead of raising.
"""

from __future__ import annotations

import codecs


class StreamDecoder:
    """push(id) -> the new complete text; flush() -> whatever was held back (U+FFFD if never completed).

    Uses the tokenizer's `token_bytes(id)` when it has one (exact bytes, fed through an incremental UTF-8
    decoder), or `stream_bytes(id, first)` where it is `streamable` (SentencePieceBPE: a token's bytes depend on
    whether it comes first, and `stream_lead` = (character, count) is stripped from the text's start); otherwise
    decodes a window of recent ids each step and holds back trailing U+FFFD, which is how
    tokenizers render an incomplete character. The window opens where the text before last stood complete
    (as vLLM's incremental detokenizer), so a step costs the last piece or two, not the whole text; a decode
    that treats its first token apart (SentencePiece's leading "▁" stripped, byte tokens joined into one
    character) treats it so in both the window's old and new text, and the difference is what the whole
    text gained. (Ids that decode to invalid UTF-8 may show a different number of U+FFFD than decoding them
    all at once.) A tokenizer with `has_text = False` (IdTokenizer) makes no
    text: nothing is decoded (host time per token at large batches). skip: ids that add no text
    (SamplingParams.skip_special_tokens: `special_ids(tokenizer)`).
    context: the ids the text continues (`continuation_context(prompt ids)`): a completion's text is what it adds
    to its prompt's, as vLLM's detokenizer gives it, so a SentencePiece "▁the" that follows a prompt keeps its
    space (decoded alone it is the text's start and loses it: prompt + completion read "the kingthe"); empty or
    None: the text starts here."""

    def __init__(self, tokenizer, skip: frozenset[int] | tuple = (), context: list[int] | None = None):
        self.tok = tokenizer
        self.skip = skip
        self.has_text = getattr(tokenizer, "has_text", True)
        self.by_bytes = callable(getattr(tokenizer, "token_bytes", None))
        self.by_pieces = not self.by_bytes and getattr(tokenizer, "streamable", False)
        self.first = not context  # (by_pieces) the next id is the text's first
        # left to strip from the text's start
        self.lead = getattr(tokenizer, "stream_lead", None) if self.by_pieces and self.first else None
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # the window path decodes the context's ids with the new ones and returns only what they add
        window = not self.by_bytes and not self.by_pieces and bool(context)
        self.ids, text = _decoded_context(tokenizer, context) if window else ([], "")
        self.start = 0  # the window: ids[start:] is decoded each step
        self.done = len(self.ids)  # ids[:done] were all shown, their text complete: where the next window opens
        self.emitted = len(text) if self.has_text else 0  # (window text)

    def push(self, token_id: int) -> str:
        if not self.has_text or self.skip and token_id in self.skip:
            return ""
        if self.by_bytes:
            return self.utf8.decode(self.tok.token_bytes(int(token_id)))
        if self.by_pieces:
            first, self.first = self.first, False
            return self._strip_lead(self.utf8.decode(self.tok.stream_bytes(int(token_id), first)))
        self.ids.append(int(token_id))
        text = safe_decode(self.tok, self.ids[self.start:])
        stable = len(text.rstrip("\ufffd"))
        piece = text[self.emitted:stable]
        self.emitted = max(self.emitted, stable)
        if stable == len(text):  # all shown: the next window opens at the last one's complete point
            self.start, self.done = self.done, len(self.ids)
            self.emitted = len(safe_decode(self.tok, self.ids[self.start:]))
        return piece

    def flush(self) -> str:
        if not self.has_text:
            return ""
        if self.by_bytes or self.by_pieces:
            return self._strip_lead(self.utf8.decode(b"", final=True))
        text = safe_decode(self.tok, self.ids[self.start:])
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def _strip_lead(self, text: str) -> str:
        """The text's start loses up to `lead`'s count of its character (a Strip decoder step after Fuse)."""
        if self.lead is None or not text:
            return text
        char, n = self.lead
        k = 0
        while k < min(n, len(text)) and text[k] == char:
            k += 1
        self.lead = (char, n - k) if k == len(text) and n > k else None
        return text[k:]


CONTEXT_IDS = 6
"""prompt ids a window-decoded completion is decoded after (vLLM's incremental detokenizer reads 5)"""


def continuation_context(prompt_ids, specials: frozenset[int] | set[int]) -> list[int]:
    """The prompt ids a completion's text continues: its last CONTEXT_IDS ids that are no special token, or none
    where every prompt id is one (a lone BOS: the completion's text starts the text, as decoding with
    skip_special_tokens gives it)."""
    tail: list[int] = []
    for i in reversed(prompt_ids):
        if int(i) not in specials:
            tail.append(int(i))
            if len(tail) == CONTEXT_IDS:
                break
    return tail[::-1]


def complete_context(tokenizer, context: list[int]) -> list[int]:
    """`context` less the ids at its end whose text is an incomplete character (a prompt continuing an output cut
    inside one): the completion's first bytes then show as U+FFFD, as the byte-wise paths show them, instead of
    finishing a character neither text shows. Told by the ids' bytes where the tokenizer gives them
    (`exact_bytes`): a U+FFFD the text truly holds (bytes EF BF BD) is a whole character and stays. A tokenizer
    read through decode alone shows both as U+FFFD: its ids are dropped while the text ends in one."""
    return _decoded_context(tokenizer, context)[0]


def _decoded_context(tokenizer, context: list[int]) -> tuple[list[int], str]:
    """complete_context's ids and their text, decoded once (a decode-only tokenizer's again per dropped id)."""
    context = [int(i) for i in context]
    parts = [exact_bytes(tokenizer, i) for i in context]
    if context and None not in parts:
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        utf8.decode(b"".join(parts))
        tail = len(utf8.getstate()[0])  # the bytes of a character still incomplete at the end
        while tail > 0:
            tail -= len(parts.pop())
            context.pop()
        return context, safe_decode(tokenizer, context) if context else ""
    text = safe_decode(tokenizer, context) if context else ""
    while text.endswith("\ufffd"):
        context.pop()
        text = safe_decode(tokenizer, context) if context else ""
    return context, text


def decode_after(tokenizer, context: list[int], ids: list[int]) -> str:
    """The text `ids` add after `context` (continuation_context): decoded alone, a SentencePiece text would lose
    its first token's space (StreamDecoder's `context`, for callers that decode whole lists, as beam search)."""
    return _after(tokenizer, *_decoded_context(tokenizer, context), ids)


def _after(tokenizer, context: list[int], head: str, ids: list[int]) -> str:
    """decode_after past the completed context and its text `head` (decoded once for every `ids` after it)."""
    if not context:
        return safe_decode(tokenizer, ids)
    whole = safe_decode(tokenizer, [*context, *ids])
    return whole[len(head):] if whole.startswith(head) else safe_decode(tokenizer, ids)


def exact_bytes(tokenizer, token: int, first: bool = False) -> bytes | None:
    """The bytes `token` adds to a text where the tokenizer tells them: `token_bytes`, or `stream_bytes` where it is
    `streamable` (SentencePieceBPE; first: the token opens the text, whose start loses `stream_lead`, as
    StreamDecoder._strip_lead strips it); None for a tokenizer read through decode alone."""
    token = int(token)
    if callable(getattr(tokenizer, "token_bytes", None)):
        return tokenizer.token_bytes(token)
    if not getattr(tokenizer, "streamable", False):
        return None
    raw = tokenizer.stream_bytes(token, first)
    if first and getattr(tokenizer, "stream_lead", None):
        char, n = tokenizer.stream_lead
        while n and raw.startswith(char.encode()):
            raw, n = raw[len(char.encode()):], n - 1
    return raw


def token_text(tokenizer, before: list[int], token: int) -> tuple[str, list[int] | None]:
    """What `token` adds to a text after the ids `before` (a completion's continuation_context and the tokens before
    it; only the last CONTEXT_IDS are read), and its bytes: OpenAI's logprobs "token" and "bytes" of a top-k
    alternative, made as the completion's own text is (StreamDecoder), so a SentencePiece "▁the" after text keeps its
    space (decoded alone it loses it). A token whose bytes are no whole UTF-8 text (one byte of a character split
    over tokens) reads as those bytes escaped ("\\xe6\\x97"), as OpenAI's API shows them, never U+FFFD, and `bytes`
    holds them. A tokenizer that gives no token bytes (decoded in a window: decode_after) gives None for bytes where
    its text shows U+FFFD (the bytes are not known)."""
    return _row_texts(tokenizer, before, [token])[0][1:]


def _row_texts(tokenizer, before: list[int], tokens) -> list[tuple[int, str, list[int] | None]]:
    """(token, text, bytes) of token_text for each of `tokens` after the same ids `before`: a window-decoded
    context is decoded once for the row, not once per alternative."""
    out, head = [], None
    for token in map(int, tokens):
        raw = exact_bytes(tokenizer, token, not before)
        if raw is not None:
            out.append((token, raw.decode("utf-8", errors="backslashreplace"), list(raw)))
            continue
        if head is None:
            head = _decoded_context(tokenizer, list(before[-CONTEXT_IDS:]))
        text = _after(tokenizer, *head, [token])
        out.append((token, text, None if "\ufffd" in text else list(text.encode())))
    return out


def token_texts(tokenizer, context: list[int], ids: list[int], steps: list, skip=frozenset()):
    """For each step j, [(token, text, bytes) for token in steps[j]] (token_text after context + ids[:j]), or None
    where steps[j] is None: the alternatives of a completion's top_logprobs (context: its continuation_context) or
    of a prompt's prompt_logprobs (context empty, ids the prompt). skip: ids that add no text (special ids where
    SamplingParams.skip_special_tokens): they do not count as text before."""
    before = list(context[-CONTEXT_IDS:])
    out = []
    for j, step in enumerate(steps):
        out.append(None if step is None else _row_texts(tokenizer, before, step))
        if j < len(ids) and int(ids[j]) not in skip:
            before = [*before, int(ids[j])][-CONTEXT_IDS:]
    return out


def special_ids(tokenizer) -> frozenset[int]:
    """The ids of a tokenizer's special tokens: lmforge's Tokenizer and SentencePieceBPE (`special_tokens`, every
    added token, name -> id, less those HF marks not special: `non_special`), ByteTokenizer (`special_ids`), a HF
    tokenizer (`all_special_ids`); none for others."""
    for name in ("special_ids", "special_tokens"):
        table = getattr(tokenizer, name, None)
        if isinstance(table, dict):
            kept = set(getattr(tokenizer, "non_special", ()))
            return frozenset(int(i) for s, i in table.items() if s not in kept)
    return frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", None) or ())


def token_text_bytes(tokenizer, size: int) -> list[int]:
    """UTF-8 bytes of the text each token id < `size` stands for, for bits per byte (val_bpb, `lmforge tokenizer
    stats`): a special token (told by its id: special_ids) counts 0, an added token HF marks not special (Qwen3's
    <think>) its text's bytes, and so does a special whose id BPE also emits as an ordinary token (`shared_ids`: HF's
    added "Ã" on byte 0xC3's id is that byte); a tokenizer without a `vocab` table (id -> bytes) is byte-level (ids <
    256: one byte)."""
    out = [0] * size
    vocab = getattr(tokenizer, "vocab", None)
    if isinstance(vocab, dict):
        for i, b in vocab.items():
            if i < size:
                out[i] = len(b)
    else:
        out[:min(256, size)] = [1] * min(256, size)
    for i in special_ids(tokenizer) - getattr(tokenizer, "shared_ids", frozenset()):
        if 0 <= i < size:
            out[i] = 0
    return out


def safe_decode(tokenizer, ids: list[int]) -> str:
    """tokenizer.decode that never raises on invalid UTF-8 (falls back to per-token replacement)."""
    try:
        return tokenizer.decode(ids)
    except UnicodeDecodeError:
        return "".join(_decode_one(tokenizer, i) for i in ids)


def _decode_one(tokenizer, i: int) -> str:
    try:
        return tokenizer.decode([i])
    except UnicodeDecodeError:
        return "\ufffd"


class IdTokenizer:
    """Token ids in, no text out: for benchmarks and token-level callers (RL rollouts, evaluation by ids)
    that never need text. No end-of-text id."""

    has_text = False

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eot_id = vocab_size, None

    def encode(self, text: str) -> list[int]:
        raise TypeError("IdTokenizer takes token ids, not text")

    def decode(self, ids) -> str:
        return ""

    def token_bytes(self, i: int) -> bytes:
        return b""
