"""Speculative decoding on models with recurrent-state layers (lmforge.infer.kv.state): a drafted chunk runs
token by token through the recurrent layers, the cache keeps the state after each token, and verification
leaves the row at the state after the accepted drafts. Greedy outputs and log-probs equal the full
no-cache forward's with a draft model and with n-gram drafts, accepted and rejected ones alike, under
chunked prefill and preemption; what cannot work is a one-line error."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.token_tree import TreeDrafter

from .infer_helpers import tiny_model
from .state_models import tiny_state_model
from .test_state_cache import KINDS, no_leak, reference, run


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_state_model(kind) for kind in KINDS}


def prompts() -> list[list[int]]:
    """Repetitive prompts (n-gram drafts find matches) and a random one."""
    g = torch.Generator().manual_seed(11)
    motif = torch.randint(1, 250, (5,), generator=g).tolist()
    return [motif * 4, (motif[:3] * 5)[:13], torch.randint(1, 250, (9,), generator=g).tolist(), motif[:2] * 3]


CONFIGS = {
    "roomy": dict(block_size=4, max_num_seqs=4),
    "chunks+preemption": dict(block_size=4, max_num_batched_tokens=10, num_kv_tokens=48, max_num_seqs=4),
}


class Oracle:
    """Drafts the target's own greedy continuation (its full forward), the last draft of every other call
    made wrong: rounds accept k - 1 or all k drafts, so both kinds of rollback run."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def propose(self, ctx, k, procs, greedy, gen):
        drafts = reference(self.model, ctx, k)[0][:k]
        self.calls += 1
        if drafts and self.calls % 2:
            drafts[-1] = drafts[-1] % 250 + 1
        return drafts, torch.nn.functional.one_hot(torch.tensor(drafts, dtype=torch.long), 257).float()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("draft", ["ngram", "model", "oracle"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_greedy_drafts_equal_the_full_forward(kind, draft, config, models, tok):
    model = models[kind]
    drafter = {"model": lambda: tiny_model("llama", seed=5, n_layers=1, max_seq_len=96),
               "ngram": lambda: "ngram", "oracle": lambda: Oracle(model)}[draft]()
    engine = Engine(model, tok, EngineConfig(**CONFIGS[config]), draft=drafter, num_draft_tokens=3)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    done = run(engine, [(p, sp) for p in prompts()])
    drafted = accepted = 0
    for i, prompt in enumerate(prompts()):
        want, lps = reference(model, prompt, 12)
        out = done[i]
        assert out.outputs[0].token_ids == want, (kind, draft, i)
        assert out.outputs[0].logprobs == pytest.approx(lps, abs=1e-4)
        drafted += out.metrics["drafted"]
        accepted += out.metrics["accepted"]
    if draft == "oracle":
        assert 0 < accepted < drafted  # drafts were accepted and rejected: both rollbacks ran
    if config == "chunks+preemption":
        # (a pure state model's pool is bookkeeping unless a draft model's cache shares it: pool_blocks)
        assert (engine.stats()["preemptions"] > 0) == (kind == "hybrid" or draft == "model")
    assert not engine.runner.cache.staged
    no_leak(engine)


def test_rejected_drafts_leave_the_state_untouched(models, tok):
    """A drafter that is always wrong: every drafted chunk keeps only its pending token's state."""

    class Wrong:
        def propose(self, ctx, k, procs, greedy, gen):
            drafts = [(ctx[-1] + 1) % 250 + 1] * k
            return drafts, torch.nn.functional.one_hot(torch.tensor(drafts), 257).float()

    model = models["hybrid"]
    prompt = prompts()[2]
    engine = Engine(model, tok, EngineConfig(block_size=4), draft=Wrong(), num_draft_tokens=4)
    out = run(engine, [(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))])[0]
    want = reference(model, prompt, 10)[0]
    assert out.outputs[0].token_ids == want
    assert out.metrics["accepted"] < out.metrics["drafted"]


def test_what_speculative_decoding_refuses_on_state_models(models, tok):
    model = models["ssm"]
    for draft, match in ((TreeDrafter(tiny_model("llama")), "token tree"),
                         (tiny_state_model("ssm", seed=1), "draft model has recurrent-state layers")):
        with pytest.raises(ConfigError, match=match) as e:
            Engine(model, tok, draft=draft)
        assert "\n" not in str(e.value)

    class Hidden:
        uses_hidden_states = True

        def propose(self, ctx, k, procs, greedy, gen, hidden=None):
            return [], None

    with pytest.raises(ConfigError, match="hidden states"):
        Engine(model, tok, draft=Hidden())
