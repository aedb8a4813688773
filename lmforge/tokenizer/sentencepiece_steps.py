"""The steps of a SentencePiece-style `tokenizer.json` around its BPE, read from the file and applied as HF tokenizers
applies them: the added tokens split out of a text (split_added), the normalizer (read_normalizer, normalize), the
pre-tokenizer (read_pre_tokenizer, pre_tokenize) and the decoder (read_decoder, DECODERS; stream_steps: whether it
decodes token by token). Each step is read into a plain tuple ("replace", old, new), ("metaspace", "▁", scheme, ...)
that these functions run; a step the file asks for that is not read here is refused, naming it.

Split out of sentencepiece.py, whose SentencePieceBPE holds the read steps and runs its BPE (characters merged, byte
fallback) between them; its module docstring gives the whole order.
"""

from __future__ import annotations

import json
import re
import unicodedata
from itertools import accumulate
from typing import Any, Iterable

from lmforge.errors import DataError
from lmforge.tokenizer.pretokenize import special_regex

UNREAD = "; give another tokenizer (LLM.load(path, tokenizer=...), --tokenizer)"
_SPACES = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                    + "".join(map(chr, range(0x2000, 0x200b))))
"""Unicode White_Space (Rust's char::is_whitespace): what an added token's lstrip / rstrip takes in"""
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# ---- reading the steps from the file --------------------------------------------------------------

def _steps(node: Any, key: str) -> list[dict]:
    """A normalizer / pre_tokenizer / decoder: its steps, a Sequence flattened."""
    if node is None:
        return []
    if not isinstance(node, dict):
        raise DataError(f"{key} {node!r} is not a JSON object")
    if node.get("type") == "Sequence":
        inner = node.get({"normalizer": "normalizers", "pre_tokenizer": "pretokenizers"}.get(key, "decoders")) or []
        return [s for n in inner for s in _steps(n, key)]
    return [node]


def _string_pattern(step: dict, where: str) -> str:
    pattern = step.get("pattern") or {}
    if "String" not in pattern:
        raise DataError(f"{where}: {step.get('type')} with pattern {pattern!r} is not supported (lmforge reads a "
                        f"String pattern, not a Regex){UNREAD}")
    return pattern["String"]


def _prepend_scheme(step: dict) -> str:
    """Metaspace's prepend_scheme; files written before it existed say add_prefix_space (true: "always")."""
    return step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")


def read_normalizer(node: Any, where: str) -> list[tuple]:
    out: list[tuple] = []
    for s in _steps(node, "normalizer"):
        kind = s.get("type")
        if kind == "Prepend":
            out.append(("prepend", s["prepend"]))
        elif kind == "Replace":
            out.append(("replace", _string_pattern(s, f"{where} normalizer"), s["content"]))
        elif kind in ("NFC", "NFD", "NFKC", "NFKD"):
            out.append(("form", kind))
        else:
            raise DataError(f"{where}: normalizer {kind!r} is not supported (lmforge reads Prepend, Replace, "
                            f"NFC/NFD/NFKC/NFKD){UNREAD}")
    return out


_SPLIT_BEHAVIORS = ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext")


def read_pre_tokenizer(node: Any, where: str) -> list[tuple]:
    out: list[tuple] = []
    for s in _steps(node, "pre_tokenizer"):
        kind = s.get("type")
        if kind == "Metaspace":
            scheme = _prepend_scheme(s)
            if scheme not in ("always", "first", "never"):
                raise DataError(f"{where}: Metaspace prepend_scheme {scheme!r} is not one of always, first, never")
            out.append(("metaspace", s.get("replacement", "▁"), scheme, bool(s.get("split", True))))
        elif kind == "Split" and s.get("behavior") in _SPLIT_BEHAVIORS and not s.get("invert"):
            out.append(("split", _string_pattern(s, f"{where} pre_tokenizer"), s["behavior"]))
        else:
            raise DataError(f"{where}: pre_tokenizer {kind!r} ({json.dumps(s)[:120]}) is not supported (lmforge reads "
                            f"Metaspace, and Split on a String with behavior {', '.join(_SPLIT_BEHAVIORS)}){UNREAD}")
    return out


def read_decoder(node: Any, where: str) -> list[tuple]:
    out: list[tuple] = []
    for s in _steps(node, "decoder"):
        kind = s.get("type")
        if kind == "Replace":
            out.append(("replace", _string_pattern(s, f"{where} decoder"), s["content"]))
        elif kind in ("ByteFallback", "Fuse"):
            out.append((kind.lower(),))
        elif kind == "Strip":
            out.append(("strip", s.get("content", " "), int(s.get("start", 0)), int(s.get("stop", 0))))
        elif kind == "Metaspace":
            out.append(("metaspace", s.get("replacement", "▁"), _prepend_scheme(s)))
        else:
            raise DataError(f"{where}: decoder {kind!r} is not supported (lmforge reads Replace, ByteFallback, Fuse, "
                            f"Strip, Metaspace){UNREAD}")
    return out


# ---- encoding: added tokens, normalizer, pre-tokenizer --------------------------------------------

def split_added(text: str, table: dict[str, dict], ordinary: bool) -> Iterable[tuple[str, int, int | None]]:
    """(piece, its offset, None) for the text between added tokens, (match, offset, id) for each token:
    leftmost-longest matches, widened over the whitespace before (lstrip) and after (rstrip) as HF does.
    ordinary: a special token's match is text, and no added token inside it is matched (HF's
    encode_special_tokens: with special "<|a|>", the non-special "<|a" is not found in "<|a|>")."""
    rx = special_regex(tuple(table)) if table else None
    if rx is None:
        if text:
            yield text, 0, None
        return
    pos = 0
    for m in rx.finditer(text):
        t = table[m.group()]
        if ordinary and t["special"]:
            continue
        start, stop = m.start(), m.end()
        if t["lstrip"]:  # (not into whitespace an rstrip token before took in)
            while start > pos and text[start - 1] in _SPACES:
                start -= 1
        if t["rstrip"]:
            while stop < len(text) and text[stop] in _SPACES:
                stop += 1
        if start < pos:  # (a match inside the whitespace the previous token took in)
            continue
        if start > pos:
            yield text[pos:start], pos, None
        yield text[start:stop], start, t["id"]
        pos = stop
    if pos < len(text):
        yield text[pos:], pos, None


def _split_on(text: str, sep: str, behavior: str) -> list[tuple[str, int]]:
    """HF's split of a string at each `sep`, the separator removed, alone, or joined to the piece before or after:
    (piece, its offset in `text`) pairs."""
    parts = text.split(sep)
    offsets = list(accumulate([len(p) + len(sep) for p in parts[:-1]], initial=0))
    if behavior == "MergedWithNext":  # (Metaspace's: the common case, made in one pass)
        return ([(parts[0], 0)] if parts[0] else []) + [(sep + p, o - len(sep)) for p, o in
                                                        zip(parts[1:], offsets[1:])]
    pairs = list(zip(parts, offsets))
    if behavior == "Removed":
        out = pairs
    elif behavior == "Isolated":
        out = [x for p, o in pairs[:-1] for x in ((p, o), (sep, o + len(p)))] + pairs[-1:]
    else:  # MergedWithPrevious
        out = [(p + sep, o) for p, o in pairs[:-1]] + pairs[-1:]
    return [(p, o) for p, o in out if p]


def _cut(word: str, at: int, inserted: int, parts: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """A word at offset `at` of the pre-tokenized text, `inserted` "▁" before it, split into `parts` (each with its
    offset in the word): each part with its own offset and count of inserted characters."""
    return [(p, at + o - inserted, 0) if o >= inserted else (p, at, min(inserted - o, len(p))) for p, o in parts]


def _replaced_alignment(text: str, old: str, new: str, align: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The spans of text.replace(old, new)'s characters: each of a replacement takes the span of what it
    replaced."""
    if not old:
        return [(align[0][0], align[-1][1])] * len(text.replace(old, new)) if align else []
    out, i = [], 0
    while (j := text.find(old, i)) >= 0:
        out += align[i:j] + [(align[j][0], align[j + len(old) - 1][1])] * len(new)
        i = j + len(old)
    return out + align[i:]


def _form_alignment(text: str, form: str, align: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The spans of unicodedata.normalize(form, text)'s characters: normalized a character with the combining
    marks after it at a time, each result takes their span (the whole text's where that differs from
    normalizing the text whole)."""
    starts = [i for i, c in enumerate(text) if i == 0 or not unicodedata.combining(c)] + [len(text)]
    out, joined = [], []
    for a, b in zip(starts, starts[1:]):
        part = unicodedata.normalize(form, text[a:b])
        joined.append(part)
        out += [(align[a][0], align[b - 1][1])] * len(part)
    whole = unicodedata.normalize(form, text)
    return out if "".join(joined) == whole else [(align[0][0], align[-1][1])] * len(whole)


def normalize(steps: list[tuple], text: str, opens: bool = True, align: list[tuple[int, int]] | None = None) -> str:
    """The normalizer's `steps` (read_normalizer) on `text`; `opens`: the text opens a split (what Prepend puts "▁"
    before). `align` (each character's span in the input, when given) is changed to the normalized text's."""
    for step in steps:
        if step[0] == "prepend":
            if text and opens:
                if align is not None:
                    align[:0] = [align[0]] * len(step[1])  # (HF: the first character's, as its offsets)
                text = step[1] + text
        elif step[0] == "replace":
            if align is not None and step[1] in text and len(step[1]) + len(step[2]) != 2:
                align[:] = _replaced_alignment(text, step[1], step[2], align)
            text = text.replace(step[1], step[2])
        else:
            if align is not None and not unicodedata.is_normalized(step[1], text):
                align[:] = _form_alignment(text, step[1], align)
            text = unicodedata.normalize(step[1], text)
    return text


def pre_tokenize(steps: list[tuple], text: str, first: bool, opens: bool = True) -> list[tuple[str, int, int]]:
    """The pre-tokenizer's `steps` (read_pre_tokenizer) on `text`: the words BPE runs on, each alone, as (word, its
    offset in `text`, how many "▁" were put before it). `first`: the text opens the input (Metaspace prepend_scheme
    "first" puts "▁" only there); `opens`: it opens a split ("always" puts "▁" before it; not where it continues the
    text before)."""
    words = [(text, 0, 0)] if text else []
    for step in steps:
        if step[0] == "metaspace":
            _, rep, scheme, split = step
            out = []
            for k, (w, at, inserted) in enumerate(words):
                w = w.replace(" ", rep)
                if (scheme == "always" and (opens or k) or scheme == "first" and first and k == 0) \
                        and not w.startswith(rep):
                    w, inserted = rep + w, inserted + len(rep)
                out.extend(_cut(w, at, inserted, _split_on(w, rep, "MergedWithNext") if split else [(w, 0)]))
            words = out
        else:
            words = [x for w, at, inserted in words
                     for x in _cut(w, at, inserted, _split_on(w, step[1], step[2]))]
    return words


# ---- decoder steps: HF's, each on the list of token strings ----------------------------------------

def stream_steps(decoder: list[tuple]) -> tuple[list[tuple] | None, tuple[str, int] | None]:
    """A decoder chain -> (its per-token steps, the (character, count) stripped from the text's start) where the
    chain decodes token by token: Replace / Strip / Metaspace act on each token alone, ByteFallback joins byte
    tokens (an incremental UTF-8 decoder does the same), Fuse joins, and a Strip after Fuse with stop 0 strips the
    text's start. Else (None, None): a step after ByteFallback that would see joined bytes, a strip of the end."""
    per_token: list[tuple] = []
    rest = list(decoder)
    while rest and rest[0][0] in ("replace", "strip", "metaspace"):
        per_token.append(rest.pop(0))
    lead = None
    if rest and rest[0][0] == "bytefallback":
        rest.pop(0)
    if rest and rest[0][0] == "fuse":
        rest.pop(0)
        if rest and rest[0][0] == "strip" and rest[0][3] == 0:
            _, content, start, _ = rest.pop(0)
            lead = (content, start) if start else None
    if rest:
        return None, None
    return per_token, lead


def _byte_fallback(tokens: list[str]) -> list[str]:
    """A run of <0xXX> tokens -> its bytes as one string, each invalid stretch of them U+FFFD (Python's and the
    Unicode standard's "maximal subpart" rule). HF instead makes every token of a run that is not all valid
    U+FFFD, valid characters in it too, which no stream can show as it goes: a character already shown would
    turn into U+FFFD when a bad byte follows; so the two differ on invalid UTF-8 only."""
    out: list[str] = []
    run = bytearray()
    for t in [*tokens, None]:
        m = BYTE_PIECE.fullmatch(t) if t is not None and t.startswith("<0") else None
        if m:
            run.append(int(m.group(1), 16))
            continue
        if run:
            out.append(run.decode("utf-8", errors="replace"))
            run.clear()
        if t is not None:
            out.append(t)
    return out


def _strip(tokens: list[str], content: str, start: int, stop: int) -> list[str]:
    """Each token less up to `start` leading and `stop` trailing `content` characters."""
    out = []
    for t in tokens:
        a, b = 0, len(t)
        while a < min(start, len(t)) and t[a] == content:
            a += 1
        while len(t) - b < stop and b > a and t[b - 1] == content:
            b -= 1
        out.append(t[a:b])
    return out


def _metaspace(tokens: list[str], rep: str, scheme: str) -> list[str]:
    """"▁" -> " ", except in the first token, which loses every "▁" unless prepend_scheme is "never"."""
    return [t.replace(rep, "" if k == 0 and scheme != "never" else " ") for k, t in enumerate(tokens)]


DECODERS = {
    "replace": lambda tokens, a, b: [t.replace(a, b) for t in tokens],
    "bytefallback": _byte_fallback,
    "fuse": lambda tokens: ["".join(tokens)],
    "strip": _strip,
    "metaspace": _metaspace,
}
