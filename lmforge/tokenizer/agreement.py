"""The check that lets a `Tokenizer` encode on tiktoken, and where its passes are remembered.

tiktoken merges the adjacent pair whose concatenation has the lowest rank; BPE proper merges the earliest
pair in the merge list. `agrees` runs the pure-Python reference BPE over every merged token's own bytes and
asks that it come out as that one token, as it does from tiktoken; a token the reference builds from other
pairs ("aaa" made by ("a", "aa") while BPE joins "aa" first) fails it, and the tokenizer stays on the
reference. On a GPT-2-size vocabulary (50k merges) that is ~1.4 s of CPU at every load (2026-12-05, 2 shared
cores: a load took 2.0 s against 0.16 s for HF tokenizers), so a pass is remembered on disk
($LMFORGE_TOKENIZER_CACHE, default ~/.cache/lmforge/bpe-agreement/) under a hash of all that the check reads:
each merge as (left id, right id, merged id), each byte's id (together they fix every token's bytes and
tiktoken's ranks), the tiktoken version and the source of the check and of the reference BPE. A failure is
never recorded, so a tokenizer that fails fails again at every load; a missing or unreadable record means
the check runs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from lmforge.tokenizer.reference import ReferenceEncoder
from lmforge.utils import write_json_atomic

CACHE_ENV = "LMFORGE_TOKENIZER_CACHE"
# bump when what the check means changes in a way its source does not show (e.g. a helper it calls)
CHECK_VERSION = 1
# below this many merges the check costs less than hashing and a file (~30 us a merge)
MIN_MERGES_REMEMBERED = 1024


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lmforge" / "bpe-agreement")


def check(enc, made: list[bytes], rank_of: list[int], to_id: Callable[[list[int]], list[int]],
          reference: ReferenceEncoder) -> bool:
    """Each merged token's own bytes come out of tiktoken (`enc`, ranks mapped to ids by `to_id`) and of the
    reference BPE the same way; a token that tiktoken would build from a pair other than its merge shows up here."""
    for k, t in enumerate(made):
        fast = enc._encode_single_piece(t) if hasattr(enc, "_encode_single_piece") else [rank_of[k]]
        if to_id(fast) != reference.encode_bytes(t):
            return False
    return True


def _code_version() -> str:
    import tiktoken

    try:
        code = inspect.getsource(check) + inspect.getsource(ReferenceEncoder)
    except (OSError, TypeError):  # no source shipped: the version number alone
        code = ""
    return f"{CHECK_VERSION}|{tiktoken.__version__}|{hashlib.sha256(code.encode()).hexdigest()}"


def check_key(merges: list[tuple[int, int, int]], byte_ids: list[int]) -> str:
    """What `check` depends on, hashed: merges as (left id, right id, merged id) in order, each byte's id, and
    the code (`_code_version`). The ids fix every token's bytes, so the check's tiktoken ranks and mapping too."""
    h = hashlib.sha256(_code_version().encode())
    h.update(np.asarray(byte_ids, dtype=np.int64).tobytes())
    h.update(np.asarray(merges, dtype=np.int64).reshape(-1, 3).tobytes())
    return h.hexdigest()


def _remembered(path: Path, key: str) -> bool:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("key") == key and record.get("agrees") is True


def agrees(enc, made: list[bytes], rank_of: list[int], to_id: Callable[[list[int]], list[int]],
           reference: ReferenceEncoder, merges: list[tuple[int, int, int]], byte_ids: list[int]) -> bool:
    """`check`, or its remembered pass for these merges (see the module docstring)."""
    if len(made) < MIN_MERGES_REMEMBERED:
        return check(enc, made, rank_of, to_id, reference)
    key = check_key(merges, byte_ids)
    path = cache_dir() / f"{key}.json"
    if _remembered(path, key):
        return True
    if not check(enc, made, rank_of, to_id, reference):
        return False
    try:
        write_json_atomic(path, {"key": key, "agrees": True, "merges": len(made)})
    except OSError:  # a read-only home: the answer is still right, only not remembered
        pass
    return True
