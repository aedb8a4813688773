"""Train a byte-level BPE tokenizer (Sennrich et al. 2016, with GPT-2's byte-level twist).

Two phases:
1. Count pre-tokens. Input is cut into chunks at special tokens, document ends, or newlines that are
   pre-token boundaries (`pretokenize.safe_byte_cut`); worker processes count the pre-tokens of each
   chunk and the parent adds the counts up, so memory holds one chunk per worker plus the table of
   distinct pre-tokens, however large the corpus. Within a chunk, identical pieces (lines) are
   pre-tokenized once.
2. Merge. Each distinct pre-token is a list of token ids with a count. Pair counts live in a dict, an
   index maps each pair to the pre-tokens that contain it, and a heap ordered by (count, pair bytes)
   gives the next merge. A merge rewrites only the pre-tokens in the index of the merged pair and
   updates the counts of the pairs that changed, instead of recounting everything.

The most frequent pair wins; ties go to the lexicographically greater pair of byte strings, so the
same corpus always gives the same merges.
"""

from __future__ import annotations

import heapq
import operator
import os
import re
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Iterable, Iterator

from lmforge.data.shards import MAGIC as SHARD_MAGIC
from lmforge.errors import ConfigError, DataError
from lmforge.utils import INLINE_BYTES, process_pool
from lmforge.tokenizer.pretokenize import (check_specials, findall, resolve_pattern, safe_byte_cut, safe_pieces,
                                           split_specials)

CHUNK_BYTES = 4 << 20  # per worker task: big enough to amortise process overhead, small for memory


# ---- phase 1: pre-token counts ----------------------------------------------------------------------

def text_codec(path: str | Path) -> tuple[bytes, str]:
    """The byte-order mark a text file opens with and the codec it names (data.readers.BOMS), or (b"", "utf-8")."""
    from lmforge.data.readers import BOMS

    with open(path, "rb") as f:
        head = f.read(3)
    return next(((bom, codec) for bom, codec in BOMS if head.startswith(bom)), (b"", "utf-8"))


# What a file opens with when it holds compressed, columnar or token data rather than text. Read as text, its bytes
# became Windows-1252 characters that were trained on and encoded, with only a note counting them (found 2026-12-07:
# a data pipeline's kept documents, data/*.jsonl.gz, given to `lmforge tokenizer train`).
NOT_TEXT = ((re.compile(rb"\x1f\x8b"), "gzip-compressed"), (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd-compressed"),
            # (bzip2: "BZh", the block size, then a block's or the end's magic: a text may open with "BZh")
            (re.compile(rb"BZh[1-9](?:1AY&SY|\x17rE8P\x90)"), "bzip2-compressed"),
            (re.compile(rb"\xfd7zXZ\x00"), "xz-compressed"), (re.compile(rb"PK\x03\x04"), "a zip archive"),
            (re.compile(re.escape(SHARD_MAGIC)), "an lmforge token shard"))


def check_text_file(path: str | Path) -> None:
    """Refuse, in one line, a file whose first bytes say it is compressed or token data (`NOT_TEXT`), Parquet (its
    magic at both ends; a text may open with "PAR1" or "BZh") or other binary data (data.readers.looks_binary, the
    pipeline's readers' test): the tokenizer reads text files as they are and cannot look inside one."""
    from lmforge.data.readers import looks_binary

    with open(path, "rb") as f:
        head = f.read(4096)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    kind = next((kind for magic, kind in NOT_TEXT if magic.match(head)), None)
    if kind is None and head.startswith(b"PAR1") and size >= 8 and tail == b"PAR1":  # (Parquet: the magic at both ends)
        kind = "Parquet"
    if kind is None and looks_binary(head):  # (random bytes, token ids in a .txt: the data pipeline's test)
        kind = "binary data (NUL bytes or many control characters in its first 4 KiB)"
    if kind is not None:
        raise DataError(f"tokenizer input {str(path)!r} is {kind}, not text: the tokenizer reads plain text files; "
                        "leave it out, or, for a data pipeline's JSONL or Parquet, train on its documents from Python "
                        "(lf.train_bpe((d.text for d in read_documents(path)), vocab_size=8192) with read_documents "
                        "from lmforge.data.readers) and encode them with a pipeline's tokenize stage")


def read_range(path: str | Path, start: int, end: int) -> tuple[bytes, str, int]:
    """Bytes [start, end) of a text file -> (its text as UTF-8 bytes, the text, undecodable bytes). A file that opens
    with a byte-order mark is decoded as the mark says, the mark dropped (data.readers.decode_text: a UTF-16 file
    read as UTF-8 was NULs and U+FFFD, a UTF-8 mark a U+FEFF trained into the vocabulary); others as UTF-8, a byte
    sequence that is not UTF-8 read as Windows-1252 and counted (data.readers.decode_utf8, as the data pipeline's
    readers do). A UTF-16 file's ranges start at character boundaries (file_ranges: `_utf16_cut`)."""
    bom, codec = text_codec(path)
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    raw = raw[len(bom):] if start == 0 else raw
    from lmforge.data.readers import decode_text, decode_utf8

    if codec == "utf-8":
        return (raw, *decode_utf8(raw))
    text, bad = decode_text(bom + raw)
    return text.encode("utf-8"), text, bad


def count_text(text: str, pat: str, specials: tuple[str, ...]) -> Counter:
    """Pre-token (bytes) -> count for one text; specials are cut out and not counted."""
    pieces: Counter = Counter()
    for seg, is_special in split_specials(text, specials):
        if not is_special:
            pieces.update(safe_pieces(seg, pat))
    counts: Counter = Counter()
    for piece, n in pieces.items():
        toks = findall(pat, piece)
        if n == 1:
            counts.update(toks)  # C-level counting for the common case
        else:
            for tok in toks:
                counts[tok] += n
    return Counter({t.encode("utf-8"): n for t, n in counts.items()})


def _count_range(task: tuple[str, int, int, str, tuple[str, ...]]) -> tuple[Counter, int, int]:
    path, start, end, pat, specials = task
    raw, text, bad = read_range(path, start, end)
    return count_text(text, pat, specials), len(raw), bad  # (the text's UTF-8 bytes: a lone byte-order mark is none)


def _count_texts(task: tuple[list[str], str, tuple[str, ...]]) -> tuple[Counter, int, int]:
    texts, pat, specials = task
    total: Counter = Counter()
    size = 0
    for t in texts:
        total.update(count_text(t, pat, specials))
        size += len(t)
    return total, size, 0


def _utf16_cut(window: bytes, codec: str, pat: str, specials: tuple[str, ...]) -> int:
    """`safe_byte_cut` for a window of a UTF-16 file that starts at a code unit (an even offset): the first safe cut
    of its text, found in the text's UTF-8 and given as an offset into the window, or -1. A surrogate pair cut by the
    window's edges is left out of the text, so the cut is a character boundary; lone surrogates pass through."""
    body = window[: len(window) - len(window) % 2]
    unit = 0xFC00  # a code unit masked with it: 0xD800 opens a surrogate pair, 0xDC00 closes one
    order = "little" if codec == "utf-16-le" else "big"
    skip = 2 if len(body) >= 2 and int.from_bytes(body[:2], order) & unit == 0xDC00 else 0
    if len(body) >= skip + 2 and int.from_bytes(body[-2:], order) & unit == 0xD800:
        body = body[:-2]
    utf8 = body[skip:].decode(codec, "surrogatepass").encode("utf-8", "surrogatepass")
    cut = safe_byte_cut(utf8, 0, pat, specials)
    if cut == -1:
        return -1
    return skip + len(utf8[:cut].decode("utf-8", "surrogatepass").encode(codec, "surrogatepass"))


def file_ranges(path: Path, pat: str, specials: tuple[str, ...], chunk: int | None = None,
                start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Cut bytes [start, end) of a file into ranges of about `chunk` bytes at safe points (see
    `safe_byte_cut`); with no safe point (e.g. a custom pattern and no specials) it stays whole. A UTF-16 file (its
    byte-order mark says so) is cut at the same points of its text (`_utf16_cut`); it was one range, read whole."""
    chunk = chunk or CHUNK_BYTES
    end = path.stat().st_size if end is None else end
    codec = text_codec(path)[1]
    bounds, pos = [start], start + chunk
    with open(path, "rb") as f:
        while pos < end:
            pos += pos % 2 if codec != "utf-8" else 0  # UTF-16 code units sit at even offsets (the mark is one)
            f.seek(pos)
            window = f.read(min(1 << 20, end - pos))
            if not window:  # (an odd end: the aligned position is the end)
                break
            cut = safe_byte_cut(window, 0, pat, specials) if codec == "utf-8" else _utf16_cut(window, codec, pat,
                                                                                              specials)
            if cut == -1:
                pos += len(window)  # nothing safe here: look further on
                continue
            bounds.append(pos + cut)
            pos = pos + cut + chunk
    bounds.append(end)
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _path_kind(path: Path) -> str | None:
    """'file', 'directory' or None (nothing there); None, not an OSError, for a string no file can be named by: a
    document passed in a list where paths belong is longer than the OS allows a name (ENAMETOOLONG) or holds a NUL."""
    try:
        return "file" if path.is_file() else "directory" if path.is_dir() else None
    except (OSError, ValueError):
        return None


def _tasks(source, pat: str, specials: tuple[str, ...]) -> tuple[Iterator, int | None]:
    """Worker tasks and the total input size in bytes (None for a stream of texts)."""
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    if isinstance(source, (list, tuple)) and all(isinstance(s, (str, os.PathLike)) for s in source):
        paths = [Path(s) for s in source]
        for p in paths:
            kind = _path_kind(p)
            if kind == "directory":
                raise DataError(f"training input {str(p)!r} is a directory: pass the files in it, e.g. "
                                f"sorted(Path({str(p)!r}).glob('*.txt'))")
            if kind is None:
                raise DataError(f"training input not found: {str(p)[:80]!r} (strings in a list are file paths; "
                                "pass texts as an iterator, e.g. iter(texts))")
            check_text_file(p)
        total = sum(p.stat().st_size for p in paths)
        tasks = ((str(p), a, b, pat, specials) for p in paths for a, b in file_ranges(p, pat, specials))
        return ((_count_range, t) for t in tasks), total

    def batches() -> Iterator:
        batch, size = [], 0
        for text in source:
            if not isinstance(text, str):
                hint = " (file paths go in a list or tuple: train_bpe([path, ...]))" if isinstance(
                    text, os.PathLike) else ""
                raise DataError(f"training texts must be str, got {type(text).__name__}{hint}")
            batch.append(text)
            size += len(text)
            if size >= CHUNK_BYTES // 4:  # smaller than file chunks: texts often come in a few MB
                yield _count_texts, (batch, pat, specials)
                batch, size = [], 0
        if batch:
            yield _count_texts, (batch, pat, specials)

    return batches(), None


def _call(fn_task):
    fn, task = fn_task
    return fn(task)


MAX_DEFAULT_WORKERS = 8
"""worker processes pre-token counting takes when none are asked for: one per core, this many at most"""


def count_pretokens(source, pat: str, specials: tuple[str, ...], workers: int | None = None,
                    progress: bool = False) -> tuple[Counter, dict]:
    """Pre-token counts over files (paths) or an iterable of texts, with worker processes. `progress`: a bar of the
    bytes counted (of the files' total; a stream's has none). Counting is most of a large corpus's training time,
    and it showed nothing before the merges' bar."""
    from tqdm.auto import tqdm

    tasks, total = _tasks(source, pat, specials)
    workers = workers or min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS)
    counts: Counter = Counter()
    stats = {"bytes": 0, "undecodable_bytes": 0}
    with tqdm(total=total, desc="count pre-tokens", unit="B", unit_scale=True, disable=not progress,
              leave=False) as bar:

        def add(result: tuple[Counter, int, int]) -> None:
            c, size, bad = result
            counts.update(c)
            stats["bytes"] += size
            stats["undecodable_bytes"] += bad
            bar.update(size)

        if workers <= 1 or (total is not None and total < INLINE_BYTES):
            for t in tasks:
                add(_call(t))
            return counts, stats

        # At most 2 tasks per worker in flight, so a long stream of texts is never all in memory.
        with process_pool(workers) as pool:
            pending: deque = deque()
            for t in tasks:
                pending.append(pool.apply_async(_call, (t,)))
                while len(pending) >= 2 * workers:
                    add(pending.popleft().get())
            while pending:
                add(pending.popleft().get())
    return counts, stats


# ---- phase 2: merges ------------------------------------------------------------------------------

def _desc_key(b: bytes) -> tuple[int, ...]:
    """A key that sorts byte strings in *descending* order under Python's tuple comparison (the heap is
    a min-heap and ties must go to the greater pair): bytes inverted, and a terminator above any
    inverted byte so that a prefix sorts after the longer string."""
    return tuple(255 - x for x in b) + (256,)


class _MergeState:
    """Distinct pre-tokens as id lists with counts, pair counts, the pair -> pre-tokens index, the heap."""

    def __init__(self, word_counts: dict[bytes, int]):
        self.words = [list(w) for w in word_counts if len(w) > 1]
        self.counts = [n for w, n in word_counts.items() if len(w) > 1]
        self.tokens = [bytes([i]) for i in range(256)]
        self.keys = [_desc_key(t) for t in self.tokens]
        self.pairs: dict[tuple[int, int], int] = defaultdict(int)
        self.where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for wi, (w, n) in enumerate(zip(self.words, self.counts)):
            for p in zip(w, w[1:]):
                self.pairs[p] += n
                self.where[p].add(wi)
        self.heap = [(-n, self.keys[a], self.keys[b], a, b) for (a, b), n in self.pairs.items()]
        heapq.heapify(self.heap)

    def pop_best(self) -> tuple[int, int] | None:
        """The most frequent pair (ties: greater bytes), skipping heap entries that went stale."""
        while self.heap:
            neg, _, _, a, b = heapq.heappop(self.heap)
            if -neg > 0 and self.pairs.get((a, b)) == -neg:
                return a, b
        return None

    def merge(self, a: int, b: int) -> int:
        new = len(self.tokens)
        self.tokens.append(self.tokens[a] + self.tokens[b])
        self.keys.append(_desc_key(self.tokens[new]))
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for wi in self.where.pop((a, b), ()):
            out = self._merge_word(wi, a, b, new, delta)
            if out is not None:
                self.words[wi] = out
        self.pairs.pop((a, b), None)
        for p, d in delta.items():
            if d and p != (a, b):
                n = self.pairs[p] = self.pairs[p] + d
                if n > 0:
                    heapq.heappush(self.heap, (-n, self.keys[p[0]], self.keys[p[1]], p[0], p[1]))
        return new

    def _merge_word(self, wi: int, a: int, b: int, new: int, delta: dict) -> list[int] | None:
        """Word wi with every (a, b), left to right, replaced by `new`; records pair-count changes in
        `delta`. Only neighbours of a merged occurrence change: (L, a) -> (L, new), (b, R) -> (new, R);
        between two adjacent occurrences the old pair (b, a) is counted once, as the second's left side.
        None when the pair is no longer in the word (a stale index entry)."""
        w, where = self.words[wi], self.where
        try:
            j = w.index(a)
        except ValueError:
            return None
        n, size, i, out, merged = self.counts[wi], len(w), 0, [], False
        while True:
            if j + 1 < size and w[j + 1] == b:
                out.extend(w[i:j])
                if out:
                    left = out[-1]
                    delta[(b if left == new else left, a)] -= n
                    delta[(left, new)] += n
                    where[(left, new)].add(wi)
                out.append(new)
                i, merged = j + 2, True
                if i < size and not (w[i] == a and i + 1 < size and w[i + 1] == b):
                    right = w[i]
                    delta[(b, right)] -= n
                    delta[(new, right)] += n
                    where[(new, right)].add(wi)
            else:
                out.extend(w[i:j + 1])
                i = j + 1
            try:
                j = w.index(a, i)
            except ValueError:
                break
        if not merged:
            return None
        out.extend(w[i:])
        return out


def learn_merges(word_counts: dict[bytes, int], num_merges: int, progress: bool = True) -> list[tuple[bytes, bytes]]:
    """The first `num_merges` BPE merges of a pre-token -> count table (fewer if pairs run out)."""
    from tqdm.auto import tqdm

    state = _MergeState(word_counts)
    merges: list[tuple[bytes, bytes]] = []
    with tqdm(total=num_merges, desc="bpe merges", unit="merge", disable=not progress, leave=False) as bar:
        while len(merges) < num_merges:
            best = state.pop_best()
            if best is None:
                break
            state.merge(*best)
            merges.append((state.tokens[best[0]], state.tokens[best[1]]))
            bar.update(1)
    return merges


# ---- entry point ----------------------------------------------------------------------------------

def train_bpe(files_or_iterator: str | os.PathLike | Iterable[str] | Iterable[os.PathLike], vocab_size: int,
              special_tokens: Iterable[str] = (), pattern: str = "gpt2", *, workers: int | None = None,
              progress: bool = True, stats: dict | None = None):
    """Train a byte-level BPE `Tokenizer` with `vocab_size` tokens: 256 bytes, the specials, then merges.

    files_or_iterator: a path, a list/tuple of paths, or any other iterable of texts (each a document): strings in
        a list or tuple are paths, so texts held in a list are passed as `iter(texts)` (a list of texts is refused
        in one line saying so, never trained on as if each text were a file's name).
    pattern: "gpt2", "cl100k", "o200k" or a custom pre-tokenization regex.
    stats: if given, filled with bytes read and undecodable bytes (not UTF-8: read as Windows-1252 and counted;
        without stats a warning says how many).
    """
    from lmforge.tokenizer.bpe import Tokenizer

    specials = tuple(check_specials(special_tokens))
    pat = resolve_pattern(pattern)
    try:
        vocab_size = operator.index(vocab_size)  # a numpy integer (a sweep's value) too
    except TypeError:
        raise ConfigError(f"vocab_size={vocab_size!r} must be an integer") from None
    if vocab_size < 256 + len(specials):
        raise ConfigError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least 256 + "
                          f"{len(specials)} special tokens = {256 + len(specials)}")
    counts, info = count_pretokens(files_or_iterator, pat, specials, workers, progress)
    if info["bytes"] == 0 or not counts:
        raise DataError("training input is empty: no text to learn merges from")
    if info["undecodable_bytes"] and stats is None:  # (a caller given the stats says it: the CLI's note)
        from lmforge.errors import warn_caller

        warn_caller(f"{info['undecodable_bytes']:,} byte(s) of the input are not UTF-8 and were read as Windows-1252 "
                    "(Latin-1) characters")
    if stats is not None:
        stats.update(info, distinct_pretokens=len(counts))
    merges = learn_merges(counts, vocab_size - 256 - len(specials), progress)
    if len(merges) < vocab_size - 256 - len(specials):
        from lmforge.errors import warn_caller

        warn_caller(f"vocab_size={vocab_size} asked for {vocab_size - 256 - len(specials)} merges, but the corpus "
                    f"holds only {len(merges)} (every pre-token is one token): the tokenizer has "
                    f"{256 + len(specials) + len(merges)} tokens; train on more text for a larger vocabulary")
    vocab = {i: bytes([i]) for i in range(256)}
    for k, s in enumerate(specials):
        vocab[256 + k] = s.encode("utf-8")
    for k, (a, b) in enumerate(merges):
        vocab[256 + len(specials) + k] = a + b
    return Tokenizer(vocab, merges, {s: 256 + k for k, s in enumerate(specials)}, pattern=pattern)
