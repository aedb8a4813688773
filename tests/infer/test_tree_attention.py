"""Tree attention (lmforge.model.meta, Medusa / EAGLE candidate trees): scoring a tree of candidate
tokens in one forward gives, at every node, the logits of its root-to-node branch run alone (full
recompute, fp32 CPU) - without a cache (DENSE), through the contiguous KVCache and through the paged
cache among other sequences' decode rows; after compacting the accepted branch's K/V, decoding goes on
as if only that branch had been written."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.kv import new_paged_cache
from lmforge.model.cache import KVCache
from lmforge.model.config import MLAConfig
from lmforge.model.meta import AttnMetadata, accepted_slots, check_tree, tree_positions

from .infer_helpers import tiny_model
from .test_paged_prefill import BS, step_meta

PROMPT, OTHER = [5, 17, 99, 3, 42, 7], [8, 1, 64, 30, 2]
TOKENS = [11, 23, 8, 40, 2, 77, 31]
PARENTS = [-1, 0, 0, 1, 1, 2, 5]  # two roots' worth of branching: 0 -> {1 -> {3, 4}, 2 -> 5 -> 6}
PATH = [0, 2, 5, 6]  # the branch a verifier accepts
MLA = dict(attention="mla", rope_layout="interleaved", n_kv_heads=None,
           mla=MLAConfig(kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8))
VARIANTS = {"full": dict(), "sliding": dict(sliding_window=3),
            "softcap-sinks": dict(attn_softcap=5.0, attn_sinks=True, sliding_window=4),
            "mla-sliding": {**MLA, "sliding_window": 3}}


def model_for(name: str):
    model = tiny_model("llama", **VARIANTS[name], init_std=0.3)
    with torch.no_grad():
        for b in model.blocks:
            if getattr(b.attn, "sinks", None) is not None:
                b.attn.sinks.normal_()
    return model


def branch(t: int) -> list[int]:
    path = []
    while t >= 0:
        path.append(t)
        t = PARENTS[t]
    return path[::-1]


def branch_logits(model, prompt=PROMPT) -> torch.Tensor:
    """(len(TOKENS), V): each node's logits from running prompt + its branch alone."""
    with torch.no_grad():
        return torch.stack([model(torch.tensor([prompt + [TOKENS[u] for u in branch(t)]]))[0, -1]
                            for t in range(len(TOKENS))])


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_dense_tree_row_matches_each_branch(name):
    """No cache: the prompt is a chain (parent = the previous token), the candidates hang off its end."""
    model = model_for(name)
    P = len(PROMPT)
    parents = list(range(-1, P - 1)) + [P - 1 if p < 0 else P + p for p in PARENTS]
    meta = AttnMetadata.tree(parents)
    with torch.no_grad():
        got = model(torch.tensor([PROMPT + TOKENS]), tree_positions(meta.tree_parents, 0), meta=meta)[0]
    torch.testing.assert_close(got[P:], branch_logits(model), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[P - 1], full_logits(model, PROMPT), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in VARIANTS if not n.startswith("mla")])
def test_contiguous_cache_tree_step_then_compacted_branch(name):
    model = model_for(name)
    P = len(PROMPT)
    cache = KVCache.for_model(model, 1, 32)
    meta = AttnMetadata.tree(PARENTS)
    with torch.no_grad():
        model(torch.tensor([PROMPT]), cache=cache)
        got = model(torch.tensor([TOKENS]), tree_positions(meta.tree_parents, P), cache=cache, meta=meta)[0]
    torch.testing.assert_close(got, branch_logits(model), atol=1e-5, rtol=1e-5)
    cache.keep_path(P, PATH)
    accepted = PROMPT + [TOKENS[t] for t in PATH]
    with torch.no_grad():
        nxt = model(torch.tensor([[9]]), cache=cache)[0, -1]  # positions from the compacted length
    torch.testing.assert_close(nxt, full_logits(model, accepted + [9]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["full", "sliding", "mla-sliding"])
def test_paged_tree_step_beside_a_decode_row(name):
    """Step 1 prefills two sequences; step 2 decodes OTHER (a decode row) and scores the tree of the first
    sequence (a chunk with tree_parents); then the accepted branch is moved to consecutive slots through
    the block table and both sequences decode on."""
    model = model_for(name)
    P, Q, T = len(PROMPT), len(OTHER), len(TOKENS)
    cache = new_paged_cache(model.cache_spec(), 16, BS)  # K/V blocks, or MLA latents
    tables = [[0, 1, 2, 3], [4, 5, 6]]

    def run(ids, pos, meta):
        return model(torch.tensor([ids]), torch.tensor([pos]), cache=cache, meta=meta)[0]

    with torch.no_grad():
        run(PROMPT + OTHER, [*range(P), *range(Q)], step_meta(tables, [0, 0], [P, Q], 0, device="cpu"))
        meta = step_meta(tables[::-1], [Q, P], [1, T], num_decodes=1, device="cpu")
        meta.tree_parents = torch.tensor([[-1] + PARENTS])
        got = run([3] + TOKENS, [Q] + tree_positions(torch.tensor(PARENTS), P).tolist(), meta)
    torch.testing.assert_close(got[1:], branch_logits(model), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], full_logits(model, OTHER + [3]), atol=1e-5, rtol=1e-5)
    src, dst = accepted_slots(PARENTS, PATH, P)  # positions in the sequence -> flat slots by its table
    flat = lambda ps: [tables[0][p // BS] * BS + p % BS for p in ps]  # noqa: E731
    cache.move_slots(flat(src), flat(dst))
    n = P + len(PATH)
    with torch.no_grad():
        got = run([9, 4], [n, Q + 1], step_meta(tables, [n, Q + 1], [1, 1], num_decodes=2, device="cpu"))
    accepted = PROMPT + [TOKENS[t] for t in PATH]
    torch.testing.assert_close(got[0], full_logits(model, accepted + [9]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], full_logits(model, OTHER + [3, 4]), atol=1e-5, rtol=1e-5)


def test_bad_trees_are_named():
    with pytest.raises(ValueError, match="token 2 has parent 3"):
        check_tree(torch.tensor([-1, 0, 3, 1]))
    with pytest.raises(ValueError, match="token 3's parent is 1"):
        accepted_slots(PARENTS, [0, 2, 3], 0)
    with pytest.raises(ValueError, match="holds 7 tokens per row but the forward has 3"), torch.no_grad():
        model_for("full")(torch.tensor([TOKENS[:3]]), meta=AttnMetadata.tree(PARENTS))
    cache = KVCache(1, 1, 1, 4, 8)
    cache.advance(4)
    with pytest.raises(Exception, match="past the cache"):
        cache.keep_path(2, [0, 5])


@pytest.mark.parametrize("kind", ["static", "mla", "sliding"])
def test_caches_that_assume_a_chain_refuse_trees(kind):
    from lmforge.model.cache import StaticKVCache
    from lmforge.model.layers.mla import MLACache
    from lmforge.model.layers.sliding import SlidingWindowCache

    model = model_for({"static": "full", "mla": "mla-sliding", "sliding": "sliding"}[kind])
    if kind == "static":
        cache = StaticKVCache.for_model(model, 1, 16)
        cache.start()
    else:
        cache = (MLACache.for_model(model, 1, 16) if kind == "mla" else SlidingWindowCache.for_model(model))
    where = {"static": "static CUDA-graph cache", "mla": "contiguous MLA latent cache",
             "sliding": "sliding-window ring cache"}[kind]
    with pytest.raises(Exception, match=where), torch.no_grad():
        model(torch.tensor([TOKENS]), cache=cache, meta=AttnMetadata.tree(PARENTS))
