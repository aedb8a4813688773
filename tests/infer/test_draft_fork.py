"""A draft model on the engine's pool computes a prompt's draft keys once for all n samples of a request: the
prefill step computes them (PagedDraftModel.prefill) before the samples fork from the prompt's blocks, and each
sample's first catch-up starts after the prompt. Outputs are the target's, as without the sharing."""

from __future__ import annotations

import pytest
from .infer_helpers import full_greedy, run_requests, tiny_model

from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.token_tree import TreeDrafter


def _count_draft_chunks(engine) -> list[list[int]]:
    """Record the chunk lengths of every forward the draft model runs."""
    runner, seen = engine.draft_model.runner, []
    logits_at = runner.logits_at

    def counting(batch, at):
        seen.append([n for _, n in batch.chunks])
        return logits_at(batch, at)

    runner.logits_at = counting
    return seen


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_forked_samples_inherit_the_prompts_draft_keys(tok, shape):
    """n = 3 samples of a 21-token prompt (block size 4: the prompt's last block is shared, then copied on write
    with its draft keys): the draft model computes the prompt in one chunk, once, and every later chunk is a
    sample's catch-up of a few tokens or a draft round. The draft is the target itself, so every draft is
    accepted only if each sample's inherited keys are the prompt's; each sample is the target's greedy output."""
    target = tiny_model("llama", init_std=0.3)
    draft = TreeDrafter(target, widths=(2, 1, 1)) if shape == "tree" else target
    prompt = tok.encode("the quick brown fox j")
    engine = Engine(target, tok, EngineConfig(block_size=4), draft=draft, num_draft_tokens=3)
    seen = _count_draft_chunks(engine)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=3)
    out = run_requests(engine, [(prompt, sp), (tok.encode("abcabc"), SamplingParams(temperature=0, max_tokens=9,
                                                                                    ignore_eos=True))])
    want = full_greedy(target, prompt, 12)
    assert [o.token_ids for o in out[0].outputs] == [want] * 3
    assert out[1].outputs[0].token_ids == full_greedy(target, tok.encode("abcabc"), 9)
    long = [n for chunks in seen for n in chunks if n >= len(prompt)]
    assert long == [len(prompt)]  # once, not once per sample
    assert [r.metrics["acceptance_rate"] for r in out] == [1.0, 1.0]
    assert engine.pool.num_used == 0 and not engine.draft_model.known and not engine.draft_model.before_fork


def test_forked_samples_inherit_under_preemption(tok):
    """A small pool preempts samples (a preempted sample recomputes its draft keys itself, its blocks gone);
    with the target as its own draft every draft is still accepted: no sample reads keys it does not have."""
    target = tiny_model("llama", init_std=0.3)
    prompts = [tok.encode("the quick brown fox j"), tok.encode("hello there"), tok.encode("q")]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, n=3)
    config = EngineConfig(block_size=4, num_kv_tokens=64, max_num_batched_tokens=12)
    engine = Engine(target, tok, config, draft=target, num_draft_tokens=2)
    out = run_requests(engine, [(p, sp) for p in prompts])
    assert engine.stats()["preemptions"] > 0
    for p, r in zip(prompts, out):
        assert [o.token_ids for o in r.outputs] == [full_greedy(target, p, 10)] * 3
        assert r.metrics["acceptance_rate"] == 1.0  # the draft's keys, inherited or not, are the target's
    assert engine.pool.num_used == 0
