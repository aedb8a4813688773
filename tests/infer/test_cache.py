"""KV caches: cached decoding equals recomputing the full sequence; padding masks; static cache."""

from __future__ import annotations

import torch

from lmforge.model.cache import KVCache, StaticKVCache, padded_causal_mask

from .infer_helpers import full_greedy, tiny_model


def cached_greedy(model, prompt, n, cache_cls=KVCache):
    cache = cache_cls.for_model(model, 1, len(prompt) + n)
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache=cache)
        for _ in range(n):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            logits = model(torch.tensor([[tok]]), cache=cache)
    return out


def test_cached_greedy_equals_full_recompute(arch):
    model = tiny_model(arch)
    prompt = [5, 17, 99, 3, 42, 7]
    assert cached_greedy(model, prompt, 24) == full_greedy(model, prompt, 24)


def test_cached_logits_match_full_forward(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 257, (2, 12))
    cache = KVCache.for_model(model, 2, 12)
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, :5], cache=cache), model(ids[:, 5:9], cache=cache)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_static_cache_equals_contiguous(arch):
    model = tiny_model(arch)
    prompt = [1, 2, 3, 200, 100]
    assert cached_greedy(model, prompt, 16, StaticKVCache) == full_greedy(model, prompt, 16)


def test_left_padded_rows_match_unpadded(arch):
    """Each row of a left-padded batch in the contiguous KVCache gets exactly the logits it gets alone
    (a padded row's token in slot s has position s - pad; pad slots get position 0, never attended)."""
    model = tiny_model(arch)
    prompts = [[7, 8, 9, 10, 11, 12, 13], [50, 60], [1, 2, 3, 4]]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    pad = torch.tensor([T - len(p) for p in prompts])
    cache = KVCache.for_model(model, 3, 12)
    cache.set_padding(pad)
    nxt = torch.tensor([3, 4, 5])
    with torch.no_grad():
        batched = [model(ids, (torch.arange(T) - pad[:, None]).clamp(min=0), cache=cache)[:, -1]]
        for t in (nxt, nxt + 1):
            batched.append(model(t[:, None], (cache.length - pad)[:, None], cache=cache)[:, 0])
    for b, p in enumerate(prompts):
        with torch.no_grad():
            alone = model(torch.tensor([p + [3 + b, 4 + b]]))[0]
        ref = torch.stack([alone[len(p) - 1], alone[len(p)], alone[len(p) + 1]])
        torch.testing.assert_close(torch.stack([x[b] for x in batched]), ref, atol=1e-5, rtol=1e-5)


def test_padded_mask_definition():
    m = padded_causal_mask(torch.tensor([2, 0]), torch.tensor([3, 4]), 5)[:, 0]  # (B, T, S)
    # row 0: keys 2..q; row 1: keys 0..q
    assert m[0, 0].tolist() == [False, False, True, True, False]
    assert m[1, 1].tolist() == [True] * 5
    # a query on a pad slot sees only itself (no all-masked rows, hence no NaN)
    m2 = padded_causal_mask(torch.tensor([3]), torch.tensor([0, 1, 2, 3]), 4)[0, 0]
    assert m2[1].tolist() == [False, True, False, False]


def test_rewind_and_select_rows():
    model = tiny_model("llama")
    ids = torch.randint(0, 257, (2, 8))
    cache = KVCache.for_model(model, 2, 16)
    with torch.no_grad():
        model(ids, cache=cache)
        cache.rewind(5)
        after = model(ids[:, 5:], cache=cache)
        full = model(ids)
    torch.testing.assert_close(after, full[:, 5:], atol=1e-5, rtol=1e-5)
    k_row1 = cache.k[:, 1].clone()
    cache.select_rows(torch.tensor([1, 1]))
    assert torch.equal(cache.k[:, 0], k_row1) and torch.equal(cache.k[:, 1], k_row1)
