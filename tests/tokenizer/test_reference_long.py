"""The reference encoder on long pre-tokens: the heap merges exactly as the plain scan does, in O(n log n) (counted
in rank lookups)."""

from __future__ import annotations

import random
import string

from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.reference import ReferenceEncoder


def test_heap_merges_as_the_scan_does_on_random_merge_tables():
    rng = random.Random(0)
    for _ in range(1500):
        # a few "bytes" and merges of any two tokens made so far; some tables shuffled so that a pair can rank
        # before the merge that makes one of its parts (a hand-edited file), and pairs listed twice
        n_bytes = rng.randrange(1, 4)
        tokens, ranks, merged = list(range(n_bytes)), {}, {}
        for r in range(rng.randrange(15)):
            pair = (rng.choice(tokens), rng.choice(tokens))
            ranks[pair], merged[pair] = r, 100 + r
            tokens.append(100 + r)
        if rng.random() < 0.3:
            shuffled = list(ranks.values())
            rng.shuffle(shuffled)
            ranks = dict(zip(ranks, shuffled))
        enc = ReferenceEncoder("gpt2", ranks, merged, list(range(256)))
        ids = [rng.randrange(n_bytes) for _ in range(rng.randrange(40))]
        assert enc.bpe_heap(list(ids)) == enc.bpe_scan(list(ids)), (ranks, ids)
    enc = ReferenceEncoder("gpt2", {(0, 0): 0}, {(0, 0): 1}, list(range(256)))
    assert enc.bpe_heap([0, 0, 0]) == [1, 0] and enc.bpe_heap([0] * 4) == [1, 1]  # runs pair from the left


class _CountingRanks(dict):
    """The merge-rank table, counting its lookups: the encoder's work, free of the machine's speed."""

    lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)


def test_a_long_word_encodes_in_linearithmic_time_on_the_reference():
    # every pair of lowercase letters is a merge: the scan made one pass over the word per pair (676 passes,
    # a rank lookup per position each), 9.6 s for these 20k letters (2 shared cores), the heap 0.2 s. Counted
    # in rank lookups, not seconds: a wall-clock bound fails on a loaded machine and passes a slow path on a fast one
    letters = string.ascii_lowercase.encode()
    merges = [(bytes([a]), bytes([b])) for a in letters for b in letters]
    vocab = {**{i: bytes([i]) for i in range(256)}, **{256 + k: a + b for k, (a, b) in enumerate(merges)}}
    tok = Tokenizer(vocab, merges, pattern="gpt2")
    ranks = tok.reference.ranks = _CountingRanks(tok.reference.ranks)
    rng = random.Random(1)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(20_000))
    ids = tok.reference.encode(word)
    assert ids == tok.encode(word)  # tiktoken's
    assert tok.decode(ids) == word and len(ids) < 15_000
    # the heap: one lookup per pair at the start, and a few per merge (<= 10k merges); the scan took 676 * 20k
    assert ranks.lookups < 5 * len(word), f"{ranks.lookups} rank lookups for a {len(word)}-letter word"
