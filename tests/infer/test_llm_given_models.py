"""LLM never changes the models it is given: a draft model in train mode (a trainer distilling it) stays in train
mode, and drafts as in eval mode (no dropout); a model it cannot serve is refused in one line."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams

from .infer_helpers import full_greedy, tiny_model


def _drafted(draft, tok, params) -> tuple[list[int], dict]:
    target = tiny_model("llama", init_std=0.3)
    out = LLM(target, tok, draft=draft, num_draft_tokens=3).generate(["abcabcabc", "hello there"], params)
    assert out[0].token_ids == full_greedy(target, tok.encode("abcabcabc"), params.max_tokens)
    return [o.token_ids for o in out], [{k: o.metrics[k] for k in ("drafted", "accepted")} for o in out]


def test_a_draft_model_in_train_mode_stays_so_and_drafts_without_dropout(tok):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    train = tiny_model("llama", init_std=0.3, dropout=0.5).train()  # the target's weights: every draft accepted
    train.blocks[0].attn.eval()  # a submodule the trainer keeps in eval mode stays so too
    modes = [m.training for m in train.modules()]
    reference = tiny_model("llama", init_std=0.3, dropout=0.5).eval()
    got, want = _drafted(train, tok, params), _drafted(reference, tok, params)
    assert [m.training for m in train.modules()] == modes and modes.count(False) >= 1 and train.training
    assert all(m["accepted"] == m["drafted"] > 0 for m in want[1])  # (dropout in drafting would reject some)
    assert got == want


def test_a_draft_model_beside_a_target_without_cache_spec_drafts_in_eval_mode(tok):
    """A target with no cache_spec() runs on the recompute path, and its draft model keeps its own KVCache
    (speculative.ModelDrafter): that path too drafts without dropout and leaves the model in train mode."""
    class NoSpec(torch.nn.Module):  # the target's logits, without the paged cache's interface
        def __init__(self, inner):
            super().__init__()
            self.inner, self.max_seq_len, self.vocab_size = inner, inner.cfg.max_seq_len, inner.cfg.vocab_size

        def forward(self, ids):
            return self.inner(ids)

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    target = NoSpec(tiny_model("llama", init_std=0.3))
    train = tiny_model("llama", init_std=0.3, dropout=0.5).train()  # the target's weights: every draft accepted
    out = LLM(target, tok, draft=train, num_draft_tokens=3).generate(["abcabcabc"], params)[0]
    assert train.training and all(m.training for m in train.modules())
    assert out.token_ids == full_greedy(target.inner, tok.encode("abcabcabc"), 12)
    assert out.metrics["accepted"] == out.metrics["drafted"] > 0  # (dropout in drafting would reject some)


def test_a_drafter_that_is_a_module_proposes_in_eval_mode_and_stays_in_train_mode(tok):
    """A user's drafter object that is an nn.Module (Medusa-style heads with their own propose) drafts in eval mode
    (no dropout) and is left in the caller's mode (LLM no longer calls .eval() on drafts)."""
    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.seen = torch.nn.Linear(2, 2), []

        def propose(self, ctx, k, procs, greedy, gen):
            self.seen.append(self.training)
            return [], None

        def accept(self, seq_id, ctx_len):
            pass

    heads = Heads().train()
    LLM(tiny_model("llama"), tok, draft=heads).generate(["abc"], SamplingParams(temperature=0, max_tokens=4))
    assert heads.seen and not any(heads.seen) and heads.training


def test_a_model_without_parameters_is_refused_in_one_line(tok):
    class BufferOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.zeros(257, 257))

        def forward(self, ids, positions=None, cache=None, meta=None):
            return self.table[ids]

    for build in (LLM, Engine):  # (the engine's check, which LLM reaches through it)
        with pytest.raises(ConfigError, match=r"^the model \(BufferOnly\) has no parameters: .* hold the weights "
                                              r"as parameters"):
            build(BufferOnly(), tok)
