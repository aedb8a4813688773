"""Hugging Face's `tokenizer.json` for byte-level BPE (GPT-2, RoBERTa, Llama-3, Qwen2 style): `read_hf` turns one
into `lmforge.tokenizer.bpe.Tokenizer` keyword arguments, `hf_tokenizer_json` and `write_hf` write a Tokenizer as one,
with the tokenizer_config.json beside it (write_hf_config). Also the parts the SentencePiece-style reader
(sentencepiece.py) shares: the added tokens and the ids HF gives them (hf_added_tokens), the specials a
post_processor puts around a text (hf_added_specials), the config's eos_token (hf_eos_token), and which of the two
readers a file takes (is_sentencepiece).

Split out of formats.py, which keeps GPT-2's and tiktoken's files and what this module writes token bytes with:
GPT-2's byte <-> printable character table and the vocab / merge codecs both files share.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lmforge.errors import DataError
from lmforge.tokenizer.formats import _read_json, bytes_to_str, encode_vocab, parse_merge, vocab_entries
from lmforge.tokenizer.pretokenize import PATTERNS
from lmforge.utils import write_json_atomic


# ---- Split regexes: the `regex` module's reading <-> Oniguruma's ----------------------------------

_INTERVAL = re.compile(r"\{\d*,?\d*\}")
_ESCAPE = re.compile(r"\\(?:[pPNx]\{[^}]*\}|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.S)


def _rewrite_intervals(pattern: str, possessive) -> str:
    """`pattern` with each `A{n,m}+` (A an atom: a character, escape, class or group) replaced by
    `possessive(A, "{n,m}")`. The `regex` module (and tiktoken) read `{n,m}+` as a possessive interval,
    Oniguruma (HF tokenizers) as the interval repeated, `(?:A{n,m})+`: cl100k's `\\p{N}{1,3}+` made
    "123456" one piece in HF. `*+`, `++` and `?+` mean the same in both."""
    out, groups, atom, i = "", [], None, 0
    while i < len(pattern):
        c, j = pattern[i], i + 1
        if c == "\\":
            esc = _ESCAPE.match(pattern, i)
            j = esc.end() if esc else j
        elif c == "[":
            j = i + 2 if pattern[i + 1:i + 2] == "^" else i + 1
            j += pattern[j:j + 1] == "]"
            while j < len(pattern) and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            j += 1
        elif c == "(":
            groups.append(len(out))
            if pattern[j:j + 1] == "?":  # (?:  (?i:  (?=  (?<!  (?P<name>  (?i) ...: no atom yet
                while j < len(pattern) and pattern[j] not in ":=!>)":
                    j += 1
                j += 1
                if pattern[j - 1] == ")":
                    groups.pop()
            out, atom, i = out + pattern[i:j], None, j
            continue
        elif c == ")":
            atom = groups.pop() if groups else None
            out, i = out + c, j
            continue
        elif c == "{" and atom is not None and (q := _INTERVAL.match(pattern, i)):
            j = q.end()
            if pattern[j:j + 1] == "+":
                out, i = out[:atom] + possessive(out[atom:], q.group()), j + 1
            else:
                out, i = out + q.group(), j
            continue
        elif c in "*+?|":
            out, i = out + c, j
            atom = atom if c != "|" else None
            continue
        atom, out, i = len(out), out + pattern[i:j], j
    return out


def oniguruma_pattern(pattern: str) -> str:
    """`pattern` (as the `regex` module reads it) written so that Oniguruma splits alike: possessive
    intervals become atomic groups, `A{n,m}+` -> `(?>A{n,m})`."""
    return _rewrite_intervals(pattern, lambda atom, interval: f"(?>{atom}{interval})")


# ---- writing: a Tokenizer as tokenizer.json + tokenizer_config.json -------------------------------

def _hf_pre_tokenizer(pattern: str) -> dict[str, Any]:
    # HF's ByteLevel(use_regex=True) splits with GPT-2's regex itself; other regexes go in a Split
    # step ("isolated": each match becomes its own piece, and so does each stretch of text between
    # matches) before a ByteLevel that only maps bytes.
    if pattern == PATTERNS["gpt2"]:
        return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": oniguruma_pattern(pattern)}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]}


def hf_tokenizer_json(tok) -> dict[str, Any]:
    """The tokenizer.json document for a byte-level BPE `Tokenizer`."""
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": s in tok.normalized, "special": s not in tok.non_special}
             for s, i in sorted(tok.special_tokens.items(), key=lambda x: x[1])]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": tok.normalization} if tok.normalization else None,
        "pre_tokenizer": _hf_pre_tokenizer(tok.pattern),
        "post_processor": _hf_post_processor(tok),
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": tok.ignore_merges,
                  # specials sit in the model vocab too (as in GPT-2's own file): HF gives an added token
                  # that is not in the vocab a new id instead of the one listed in added_tokens
                  "vocab": {**encode_vocab(tok.vocab, tok.special_tokens), **tok.special_tokens},
                  "merges": [[bytes_to_str(a), bytes_to_str(b)] for a, b in tok.merges]},
    }


def _hf_post_processor(tok) -> dict[str, Any]:
    """ByteLevel (which adds nothing), then, for a tokenizer with prefix or suffix tokens, a TemplateProcessing
    that adds them, as Llama-3's tokenizer.json does (HF's encode adds them unless add_special_tokens=False)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    before, after = list(tok.prefix_tokens), list(tok.suffix_tokens)
    if not before and not after:
        return byte_level

    def template(*seqs: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for n, seq in enumerate(seqs):
            out += [{"SpecialToken": {"id": s, "type_id": n}} for s in before]
            out.append({"Sequence": {"id": seq, "type_id": n}})
            out += [{"SpecialToken": {"id": s, "type_id": n}} for s in after]
        return out

    ids = {s: {"id": s, "ids": [tok.special_tokens[s]], "tokens": [s]} for s in before + after}
    return {"type": "Sequence", "processors": [byte_level, {
        "type": "TemplateProcessing", "single": template("A"), "pair": template("A", "B"), "special_tokens": ids}]}


HF_CONFIG = "tokenizer_config.json"


def write_hf(tok, path: str | Path, doc: dict[str, Any], chat_template=None, config: dict | None = None) -> Path:
    """Write a tokenizer's tokenizer.json `doc` (into the directory `path`, or the .json file `path`) and the
    tokenizer_config.json beside it (write_hf_config) where the file is named tokenizer.json, the name HF reads a
    config beside; the tokenizer.json's path."""
    path = Path(path)
    target = path / "tokenizer.json" if path.suffix != ".json" else path
    write_json_atomic(target, doc)
    if target.name == "tokenizer.json":  # (HF reads a config only beside that name: another file's would only
        write_hf_config(tok, target.parent / HF_CONFIG, chat_template, config)  # change the folder's own)
    return target


def write_hf_config(tok, path: Path, chat_template=None, config: dict | None = None) -> None:
    """tokenizer_config.json: what tokenizer.json cannot hold, which HF's AutoTokenizer and lmforge's readers
    (hf_eos_token, checkpoint.hf_chat_template) take from beside it: eos_token, the token eot_id names (without it
    a Llama-3-Instruct tokenizer read back ends texts at <|end_of_text|>, not <|eot_id|>), bos_token (the first
    prefix token), and `chat_template` (Jinja, or a ChatTemplate: its jinja()) where given. A config already there
    keeps the keys this does not set (a model directory's own chat template) but those that describe another
    tokenizer's tokens (_describes_other_tokens); `config`: more keys, set last."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    names = {i: s for s, i in tok.special_tokens.items()}
    old = {k: v for k, v in (old if isinstance(old, dict) else {}).items() if not _describes_other_tokens(k, v, tok)}
    conf = {**old, "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False}  # (decode as lmforge does: no spaces removed)
    if tok.eot_id in names:
        conf["eos_token"] = names[tok.eot_id]
    if tok.prefix_tokens:
        conf["bos_token"] = tok.prefix_tokens[0]
    if chat_template is not None:
        conf["chat_template"] = chat_template if isinstance(chat_template, str) else chat_template.jinja()
    write_json_atomic(path, {**conf, **(config or {})})


_TOKEN_TABLES = ("added_tokens_decoder", "additional_special_tokens", "add_bos_token", "add_eos_token", "legacy",
                 "add_prefix_space")
"""tokenizer_config.json keys that describe the tokenizer the config was written for (its added tokens by id, its
specials, how its slow class added them): over another tokenizer they contradict its tokenizer.json"""


def _describes_other_tokens(key: str, value, tok) -> bool:
    """Whether an old tokenizer_config.json's `key` describes a tokenizer other than `tok`: a table of its tokens
    (_TOKEN_TABLES), or a *_token naming a token `tok` does not have (HF would add it as a new token)."""
    if key in _TOKEN_TABLES:
        return True
    if key.endswith("_token") and value is not None:
        content = value.get("content") if isinstance(value, dict) else value
        return content not in tok.special_tokens
    return False


# ---- reading a tokenizer.json ---------------------------------------------------------------------

def _hf_regex(pattern: str) -> str:
    """An Oniguruma Split regex from tokenizer.json -> the `regex` pattern that splits alike (the inverse
    of `oniguruma_pattern`; a named pattern's export reads back as that pattern)."""
    named = {oniguruma_pattern(p): p for p in PATTERNS.values()}
    return named.get(pattern) or _rewrite_intervals(pattern, lambda atom, interval: f"(?:{atom}{interval})+")


def _hf_pattern(pre: Any, where: str) -> str:
    if not isinstance(pre, dict):
        raise DataError(f"{where}: no byte-level pre_tokenizer; only byte-level BPE tokenizers can be imported")
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise DataError(f"{where}: ByteLevel add_prefix_space=true is not supported")
        return PATTERNS["gpt2"] if pre.get("use_regex", True) else r"[\s\S]+"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    kinds = [s.get("type") if isinstance(s, dict) else s for s in steps]
    if kinds == ["Split", "ByteLevel"] and "Regex" in (steps[0].get("pattern") or {}):
        split, byte_level = steps
        # lmforge splits as "Isolated" does (matches and the text between them are pieces); other
        # behaviours, inverted matches, or ByteLevel splitting again with GPT-2's regex would be misread
        what = [w for w, bad in ((f"Split behavior {split.get('behavior')!r}",
                                  str(split.get("behavior")).lower() != "isolated"),
                                 ("Split invert=true", split.get("invert")),
                                 ("ByteLevel use_regex=true after Split", byte_level.get("use_regex", True))) if bad]
        if what:
            raise DataError(f"{where}: pre_tokenizer {' and '.join(what)} is not supported (lmforge reads a Split "
                            "with behavior 'Isolated', invert=false, then ByteLevel use_regex=false); give another "
                            "tokenizer (LLM.load(path, tokenizer=...), --tokenizer)")
        return _hf_regex(split["pattern"]["Regex"])
    raise DataError(f"{where}: unsupported pre_tokenizer {' + '.join(map(str, kinds)) or pre.get('type')!r} "
                    "(lmforge reads ByteLevel, or Sequence of Split + ByteLevel)")


NORMAL_FORMS = (None, "NFC", "NFD", "NFKC", "NFKD")
"""the text normalizations a Tokenizer applies (unicodedata's forms; HF tokenizers' normalizers of the same names)"""


def _hf_normalization(norm: Any, where: str) -> str | None:
    """A tokenizer.json `normalizer` -> the Unicode normal form it applies, or None; others are refused."""
    if norm is None:
        return None
    steps = norm.get("normalizers", []) if isinstance(norm, dict) and norm.get("type") == "Sequence" else [norm]
    kinds = [s.get("type") if isinstance(s, dict) else s for s in steps]
    if not kinds:
        return None
    if len(kinds) == 1 and kinds[0] in NORMAL_FORMS[1:]:
        return kinds[0]
    raise DataError(f"{where}: normalizer {' + '.join(map(str, kinds))} is not supported (lmforge applies one Unicode "
                    f"normal form: {', '.join(NORMAL_FORMS[1:])}, or none); give another tokenizer "
                    "(LLM.load(path, tokenizer=...), --tokenizer)")


def hf_added_specials(post: Any, specials: dict[str, int], where: str) -> tuple[list[str], list[str]]:
    """A tokenizer.json `post_processor` -> the special tokens HF's encode puts before and after every text
    (add_special_tokens=True, its default): Llama-3's TemplateProcessing <|begin_of_text|> before, RoBERTa's <s>
    before and </s> after; ByteLevel adds none. Only the single-text template is read (pairs are BERT's)."""
    if not isinstance(post, dict):
        return [], []
    steps = post.get("processors") or [] if post.get("type") == "Sequence" else [post]
    before: list[str] = []
    after: list[str] = []
    for step in steps:
        kind = step.get("type") if isinstance(step, dict) else step
        if kind == "ByteLevel":
            continue
        if kind in ("RobertaProcessing", "BertProcessing"):
            before.append(str(step["cls"][0]))
            after.append(str(step["sep"][0]))
        elif kind == "TemplateProcessing":
            single = step.get("single") or []
            seq = [i for i, x in enumerate(single) if "Sequence" in x]
            if len(seq) != 1:
                raise DataError(f"{where}: post_processor template {single!r} does not hold the text exactly once")
            table = step.get("special_tokens") or {}
            for i, x in enumerate(single):
                if "SpecialToken" in x:
                    name = x["SpecialToken"]["id"]
                    entry = table.get(name, {"tokens": [name], "ids": [specials.get(name)]})
                    for s, i_s in zip(entry.get("tokens", []), entry.get("ids", [])):
                        if specials.get(s) != i_s:
                            raise DataError(f"{where}: post_processor adds {s!r} as id {i_s}, but it is not that "
                                            "added token; fix the file or give another tokenizer")
                        (before if i < seq[0] else after).append(s)
        else:
            raise DataError(f"{where}: post_processor {kind!r} is not supported (lmforge reads ByteLevel, "
                            "TemplateProcessing, RobertaProcessing and BertProcessing); give another tokenizer "
                            "(LLM.load(path, tokenizer=...), --tokenizer)")
    return before, after


def is_sentencepiece(doc: Any) -> bool:
    """Whether a tokenizer.json is SentencePiece-style BPE (byte fallback, or "▁" for spaces: Llama 2, Mistral,
    Gemma) rather than byte-level BPE: load_tokenizer opens it as a SentencePieceBPE instead of a Tokenizer."""
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return False
    steps = json.dumps([doc.get("normalizer"), doc.get("pre_tokenizer"), doc.get("decoder")])  # ("▁" as \u2581)
    return bool(model.get("byte_fallback")) or "Metaspace" in steps or "\\u2581" in steps


def hf_eos_token(tokenizer_json: str | Path, added: dict[str, int]) -> str | None:
    """The eos_token of the tokenizer_config.json beside a tokenizer.json, where it is one of `added` (its added
    tokens), else None: what HF's tokenizer.eos_token is (tokenizer.json itself names none). A missing or
    unreadable config gives None, as for the chat template it also holds (checkpoint.hf_chat_template)."""
    try:
        config = json.loads((Path(tokenizer_json).parent / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    eos = config.get("eos_token") if isinstance(config, dict) else None
    eos = eos.get("content") if isinstance(eos, dict) else eos  # (an AddedToken is saved as {"content": ...})
    return eos if isinstance(eos, str) and eos in added else None


_ADDED_FLAGS = ("special", "normalized", "lstrip", "rstrip", "single_word")


def hf_added_tokens(added: Any, where: str, vocab: dict[str, int]) -> list[dict]:
    """A tokenizer.json's `added_tokens`, each entry checked as HF tokenizers reads it (a string content, an id that
    is an integer >= 0, flags that are true or false: a malformed entry was a KeyError or TypeError traceback, or
    was skipped; a flag left out takes HF's Python default, which the reader applies, where HF's Rust reader refuses
    it), with the id HF gives it (hf_added_ids) in place of the file's."""
    if added is None:
        return []
    if not isinstance(added, list):
        raise DataError(f"{where}: added_tokens is a {type(added).__name__}, not a list; write it as a list of "
                        '{"id": ..., "content": ...} objects')
    for t in added:
        if not isinstance(t, dict):
            raise DataError(f"{where}: added_tokens entry {t!r} is not an object; write it as "
                            '{"id": ..., "content": ..., "special": ...}')
        content, i = t.get("content"), t.get("id")
        if not isinstance(content, str) or not content:
            got = f"content {content!r}" if "content" in t else "no content"
            raise DataError(f"{where}: added token with id {i!r} has {got}, not its text (a non-empty string); set "
                            'its "content" in the file')
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            got = f"id {i!r}" if "id" in t else "no id"
            raise DataError(f"{where}: added token {content!r} has {got}, not an integer >= 0; set its \"id\" to the "
                            "token's id in the file")
        bad = next((k for k in _ADDED_FLAGS if k in t and not isinstance(t[k], bool)), None)
        if bad:
            raise DataError(f"{where}: added token {content!r} has {bad}={t[bad]!r}, not true or false; set it to "
                            "true or false in the file")
    ids = hf_added_ids([t["content"] for t in added], vocab)
    held = {i: c for c, i in vocab.items() if isinstance(i, int)}
    clash = next((t for t in added if t["content"] not in vocab and ids[t["content"]] in held), None)
    if clash is not None:  # (HF itself gives that id two meanings: its vocabulary's ids have a gap)
        c = clash["content"]
        raise DataError(f"{where}: added token {c!r} (id {clash['id']} in the file) takes id {ids[c]} in HF "
                        f"tokenizers, which numbers added tokens from the vocabulary's entry count ({len(vocab)}), "
                        f"and id {ids[c]} is the vocabulary's {held[ids[c]]!r}: the vocabulary's ids leave a gap; "
                        "number model.vocab 0..N-1 without gaps")
    # (one spelled as a model.vocab entry takes that entry's id silently, as it always did here)
    moved = [f"{t['content']!r} {t['id']} -> {ids[t['content']]}" for t in added
             if t["id"] != ids[t["content"]] and t["content"] not in vocab]
    if moved:
        from lmforge.errors import warn_caller
        warn_caller(f"{where}: {len(moved)} added token(s) have other ids in HF tokenizers than the file lists "
                    f"({', '.join(moved[:5])}{' ...' if len(moved) > 5 else ''}): HF gives each the next id past the "
                    "vocabulary and the added tokens before it; lmforge uses HF's ids, as transformers does")
    return [dict(t, id=ids[t["content"]]) for t in added]


def hf_added_ids(contents: list[str], vocab: dict[str, int]) -> dict[str, int]:
    """The ids HF tokenizers gives added tokens as it reads them, in order (AddedVocabulary.add_tokens), whatever ids
    the file lists: a model.vocab entry's id where the content is one (byte-level "Ã": byte 0xC3's; a piece "king"),
    the earlier one's where the content came before, else the next id past both the vocabulary's size (its entry
    count) and every id given so far."""
    ids: dict[str, int] = {}
    nxt = len(vocab)  # (past the vocabulary and every id given so far: kept as it goes, not a max per token)
    for c in contents:
        if c not in ids:
            ids[c] = vocab[c] if c in vocab else nxt
            nxt = max(nxt, ids[c] + 1)
    return ids


def read_hf(path: str | Path) -> dict[str, Any]:
    """A byte-level BPE tokenizer.json (GPT-2, RoBERTa, Llama-3, Qwen2 style) -> Tokenizer keyword arguments,
    the special tokens its post_processor adds around a text among them (prefix_tokens, suffix_tokens), and the
    eos_token of a tokenizer_config.json beside it (hf_eos_token)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    doc = _read_json(path, "HF tokenizer file")
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise DataError(f"{path}: not a BPE tokenizer.json (model.type must be 'BPE')")
    if is_sentencepiece(doc):
        raise DataError(f"{path}: a SentencePiece-style BPE tokenizer.json ('▁' for spaces, byte fallback: Llama 2, "
                        "Mistral, Gemma), not byte-level BPE; open it with load_tokenizer, which reads it as a "
                        "lmforge.tokenizer.sentencepiece.SentencePieceBPE")
    raw_vocab = model.get("vocab", {})
    added = hf_added_tokens(doc.get("added_tokens"), str(path), raw_vocab if isinstance(raw_vocab, dict) else {})
    for t in added:  # HF lets these tokens' matches take in whitespace or need word bounds; lmforge's do not
        flags = [f"{k}=true" for k in ("lstrip", "rstrip", "single_word") if t.get(k)]
        if flags:
            raise DataError(f"{path}: added token {t.get('content')!r} has {', '.join(flags)}, which lmforge does not "
                            "apply (its special tokens match their text exactly); set it false in the file or give "
                            "another tokenizer (LLM.load(path, tokenizer=...), --tokenizer)")
    specials = {t["content"]: t["id"] for t in added}
    vocab = vocab_entries(raw_vocab, specials, str(path))
    merges = [parse_merge(m, str(path)) for m in model.get("merges", [])]
    before, after = hf_added_specials(doc.get("post_processor"), specials, str(path))
    return {"vocab": vocab, "merges": merges, "special_tokens": specials,
            "pattern": _hf_pattern(doc.get("pre_tokenizer"), str(path)),
            "normalization": _hf_normalization(doc.get("normalizer"), str(path)),
            "ignore_merges": bool(model.get("ignore_merges", False)), "prefix_tokens": before, "suffix_tokens": after,
            "eos_token": hf_eos_token(path, specials),
            "non_special": [t["content"] for t in added if t.get("special") is False],
            # (HF's default, as SentencePieceBPE reads it: a special token matched in the raw text, others normalized)
            "normalized": [t["content"] for t in added if t.get("normalized", not t.get("special"))]}
