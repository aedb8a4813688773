"""Byte-level BPE file formats other tools use: GPT-2's `vocab.json` + `merges.txt` and tiktoken's rank files.
Each reader returns the arguments of `lmforge.tokenizer.bpe.Tokenizer` ((vocab, merges, specials, pattern)); each
writer takes a Tokenizer. Hugging Face's `tokenizer.json` is in hf_json.py, which writes token bytes with the tables
and codecs here (its names, which lived here before, still import from here: MOVED_TO_HF_JSON).

GPT-2 and HF store token bytes as printable unicode strings: every byte value is mapped to one
character (printable Latin-1 bytes to themselves, the rest to U+0100 onwards), so a byte string
becomes a string without spaces or control characters and a merge fits on one line as "a b".
"""

from __future__ import annotations

import base64
import json
from contextlib import ExitStack
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmforge.errors import DataError
from lmforge.utils import atomic_path

Vocab = dict[int, bytes]
Merges = list[tuple[bytes, bytes]]


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (documented in its encoder.py)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


def bytes_to_str(b: bytes) -> str:
    t = byte_to_char()
    return "".join(t[x] for x in b)


@lru_cache(maxsize=1)
def _to_latin1() -> dict[int, int]:
    """str.translate table: each printable character -> its byte's code point, and every other code point
    below 256 -> one above it, so a character outside the table cannot pass latin-1 encoding unchanged."""
    out = {ord(c): b for c, b in char_to_byte().items()}
    return {**{x: 0x100 for x in range(256) if x not in out}, **out}


def str_to_bytes(s: str, where: str = "token") -> bytes:
    try:  # C-speed (a GPT-2 load parses 150k tokens); any character outside the table fails the encode
        return s.translate(_to_latin1()).encode("latin-1")
    except UnicodeEncodeError:
        pass
    t = char_to_byte()
    try:
        return bytes(t[c] for c in s)
    except KeyError as e:
        raise DataError(f"{where} {s!r} holds {e.args[0]!r}, which is not a byte-level BPE character") from e


def byte_level_decoded(token: str) -> bytes:
    """The bytes HF's ByteLevel decoder gives an added token's text: each character's byte where every character is
    in GPT-2's table ("ĠĊ" is a space and a newline, "é" the lone byte 0xE9), else the text's UTF-8 ("<|a b|>": no
    byte prints as a space; "日本")."""
    try:
        return str_to_bytes(token)
    except DataError:
        return token.encode()


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{what} not found: {path}") from e
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {path} is corrupt: {e}") from e


def parse_merge(m: Any, where: str) -> tuple[bytes, bytes]:
    """One merge as "a b" (GPT-2, older HF) or ["a", "b"] (newer HF) -> a pair of byte strings."""
    parts = m.split(" ") if isinstance(m, str) else m
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
        raise DataError(f"{where}: merge {m!r} is not two tokens")
    return str_to_bytes(parts[0], where), str_to_bytes(parts[1], where)


def encode_vocab(vocab: Vocab, specials: dict[str, int]) -> dict[str, int]:
    """id -> bytes to GPT-2's {printable string: id}, the specials whose bytes are their own text left out (a
    Tokenizer gives them those again); one spelled as the entry whose id it shares (byte 0xC3's "Ã") is kept."""
    own_text = {i for s, i in specials.items() if vocab.get(i) == s.encode()}
    return {bytes_to_str(b): i for i, b in sorted(vocab.items()) if i not in own_text}


def decode_vocab(raw: Any, where: str) -> Vocab:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: vocab must be a JSON object of token -> id")
    out: Vocab = {}
    for s, i in raw.items():
        if not isinstance(i, int) or i < 0:
            raise DataError(f"{where}: token {s!r} has invalid id {i!r}")
        if i in out:
            raise DataError(f"{where}: id {i} is given to two tokens")
        out[i] = str_to_bytes(s, where)
    return out


def vocab_entries(raw: dict[str, int], specials: dict[str, int], where: str) -> Vocab:
    """A vocab.json-style {printable string: id} -> id -> bytes, the entries naming added tokens included where they
    are byte-level spellings: HF's model keeps such an entry (an added "Ã" is byte 0xC3's id, BPE emits it, and HF
    decodes it as that byte; GPT-2's "<|endoftext|>" is its own bytes). Those written in other characters ("<|a b|>":
    no byte prints as a space) are left to the added token's own text."""
    if not isinstance(raw, dict):
        return decode_vocab(raw, where)  # (which refuses it)
    to_byte = char_to_byte()
    return decode_vocab({s: i for s, i in raw.items() if s not in specials or all(c in to_byte for c in s)}, where)


# ---- GPT-2 vocab.json + merges.txt ----------------------------------------------------------------

SPECIALS_FILE = "added_tokens.json"
"""written beside vocab.json: {special token: id}, the record of which entries are specials (Hugging Face's
slow GPT-2 tokenizer reads the same file)"""


WRITING_MARKER = ".gpt2-files.writing"
"""present beside vocab.json while `write_gpt2` renames its three files into place: a writer stopped between two
renames leaves some files new and some old, and this marker, which `read_gpt2` refuses"""


def _merge_products(merges: Merges) -> set[bytes]:
    return {a + b for a, b in merges}


def read_gpt2(vocab_json: str | Path, merges_txt: str | Path) -> tuple[Vocab, Merges, dict[str, int], str]:
    """GPT-2 files. The special tokens are those `added_tokens.json` beside vocab.json names (`write_gpt2`
    writes it). Without that file, entries of vocab.json that are neither one byte nor the product of a merge
    are taken as specials (BPE could never emit them otherwise; GPT-2's only such entry is `<|endoftext|>`),
    with a warning naming any other: an ordinary token no merge makes (a truncated merges.txt, a Llama-3-style
    ignore_merges vocab) cannot be told apart from a special by this rule."""
    marker = Path(vocab_json).parent / WRITING_MARKER
    if marker.exists():
        raise DataError(f"the GPT-2 files in {marker.parent} were being written when their writer stopped ({marker} "
                        f"is left): vocab.json, merges.txt and {SPECIALS_FILE} may come from two tokenizers; write "
                        "them again (Tokenizer.save_gpt2)")
    raw = _read_json(Path(vocab_json), "GPT-2 vocab file")
    if not isinstance(raw, dict):
        raise DataError(f"GPT-2 vocab file {vocab_json} is not a JSON object")
    try:
        lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"GPT-2 merges file {merges_txt} cannot be read: {e}") from e
    lines = [ln for ln in lines if ln.strip() and not ln.startswith("#version")]
    merges = [parse_merge(ln, str(merges_txt)) for ln in lines]
    record = Path(vocab_json).parent / SPECIALS_FILE
    specials: dict[str, int] = {}
    if record.is_file():
        specials = _read_json(record, "GPT-2 special tokens file")
        if not isinstance(specials, dict) or not all(isinstance(i, int) and raw.get(s, i) == i
                                                     for s, i in specials.items()):
            raise DataError(f"{record} must be a JSON object of special token -> id, agreeing with {vocab_json}")
    # write_gpt2's record names every special, each in vocab.json too; Hugging Face's added_tokens.json names only
    # the tokens added past vocab.json (a fine-tune's <pad>), so those that vocab.json holds are still found by rule
    if not record.is_file() or any(s not in raw for s in specials):
        made = {ln.replace(" ", "") for ln in lines}  # each merge's product, printable (no byte prints as a space)
        guessed = {s: i for s, i in raw.items()
                   if s not in made and s not in specials and not (len(s) == 1 and s in char_to_byte())}
        unusual = [s for s in guessed if s != "<|endoftext|>"]
        if unusual:
            from lmforge.errors import warn_caller
            warn_caller(f"{vocab_json}: entries no merge makes are taken as special tokens, as no {SPECIALS_FILE} "
                        f"beside it names every special: {unusual[:20]}{' ...' if len(unusual) > 20 else ''}; if "
                        "some are ordinary tokens (a truncated merges.txt, an ignore_merges vocab), write "
                        f"{SPECIALS_FILE} ({{special: id}}) naming only the specials")
        specials = {**guessed, **specials}
    return vocab_entries(raw, specials, str(vocab_json)), merges, dict(specials), "gpt2"


def write_gpt2(tok, out_dir: str | Path) -> tuple[Path, Path]:
    """Write vocab.json (specials included, as GPT-2 does), merges.txt, and added_tokens.json (which entries
    are specials) into out_dir. Warns when the vocab holds ordinary tokens no merge makes: BPE never emits
    them, and a reader without added_tokens.json takes them for specials."""
    out = Path(out_dir)
    made = _merge_products(tok.merges)
    special_ids = set(tok.special_tokens.values())
    unreached = [b for i, b in sorted(tok.vocab.items()) if i not in special_ids and len(b) > 1 and b not in made]
    if unreached:
        from lmforge.errors import warn_caller
        warn_caller(f"{len(unreached)} ordinary token(s) no merge makes ({unreached[:10]}"
                    f"{' ...' if len(unreached) > 10 else ''}): BPE without ignore_merges (which GPT-2 files cannot "
                    f"record) never emits them, and a reader of "
                    f"{out / 'vocab.json'} that ignores {SPECIALS_FILE} takes them for special tokens")
    vocab = encode_vocab(tok.vocab, tok.special_tokens)
    vocab.update(tok.special_tokens)
    merges = "\n".join(f"{bytes_to_str(a)} {bytes_to_str(b)}" for a, b in tok.merges)
    texts = {  # renamed in reverse order: vocab.json, which readers are pointed at, comes last into a new folder
        "vocab.json": json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])), indent=2) + "\n",
        "merges.txt": "#version: 0.2\n" + merges + "\n",
        SPECIALS_FILE: json.dumps(dict(sorted(tok.special_tokens.items(), key=lambda kv: kv[1])), indent=2) + "\n"}
    marker = out / WRITING_MARKER
    with ExitStack() as renames:  # each file whole in its temporary before any is renamed onto the old set
        for name, text in texts.items():
            renames.enter_context(atomic_path(out / name)).write_text(text, encoding="utf-8")
        marker.touch()  # until the three renames (as the stack closes) are done: the set may be mixed
    marker.unlink(missing_ok=True)  # (a concurrent writer of the same folder may have removed it)
    return out / "vocab.json", out / "merges.txt"


# ---- tiktoken rank files --------------------------------------------------------------------------

def write_tiktoken(tok, path: str | Path) -> Path:
    """tiktoken's `.tiktoken` format: one "base64(token bytes) rank" line per mergeable token. Ranks are
    merge priorities, so this needs ids that grow with merge order (true for lmforge-trained and
    GPT-2 tokenizers); specials are not part of the format. `path`: the file, or a directory to write
    bpe.tiktoken into (as `write_hf` and `write_gpt2` take one)."""
    ranks = tok.mergeable_ranks()
    path = Path(path) / "bpe.tiktoken" if Path(path).is_dir() else Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{base64.b64encode(b).decode()} {r}\n"
                               for b, r in sorted(ranks.items(), key=lambda x: x[1])))
    return path


def read_tiktoken(path: str | Path) -> dict[bytes, int]:
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"tiktoken rank file {path} cannot be read: {e}") from e
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise DataError(f"{path} line {n} is not 'base64 rank': {line[:60]!r}") from e
    return ranks


def tiktoken_specials(ranks: dict[bytes, int]) -> dict[str, int]:
    """The special tokens a rank file is read back with, as the format holds none: `<|endoftext|>` at the first
    id no rank takes (256 in lmforge-trained files, after the last rank in GPT-2's)."""
    taken = set(ranks.values())
    return {"<|endoftext|>": next(i for i in range(len(taken) + 1) if i not in taken)}


def merges_from_ranks(ranks: dict[bytes, int]) -> Merges:
    """Recover the merge list from ranks: a token of rank r is what BPE makes of its own bytes using
    only tokens of lower rank, which must be exactly two parts (tiktoken's own consistency rule)."""
    merges: list[tuple[int, bytes, bytes]] = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 62))
            joined = parts[best] + parts[best + 1]
            if ranks.get(joined, 1 << 62) >= rank:
                break
            parts[best:best + 2] = [joined]
        if len(parts) != 2:
            raise DataError(f"rank file is inconsistent: token {token!r} (rank {rank}) is not one merge of "
                            f"lower-ranked tokens")
        merges.append((rank, parts[0], parts[1]))
    return [(a, b) for _, a, b in sorted(merges)]


MOVED_TO_HF_JSON = ("HF_CONFIG", "NORMAL_FORMS", "hf_added_ids", "hf_added_tokens", "hf_eos_token", "hf_tokenizer_json",
                    "is_sentencepiece", "oniguruma_pattern", "read_hf", "write_hf", "write_hf_config")
"""the HF tokenizer.json names this module held before hf_json.py split out of it (2026-12-07): user code importing
them from here still finds them (module __getattr__ below)"""


def __getattr__(name: str):
    """A name that moved to hf_json.py, read from there when asked for (hf_json imports this module, so importing it
    at the top would be a cycle)."""
    if name in MOVED_TO_HF_JSON:
        from lmforge.tokenizer import hf_json

        return getattr(hf_json, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *MOVED_TO_HF_JSON])
