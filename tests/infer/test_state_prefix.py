"""Prefix caching on models with recurrent-state layers (lmforge.infer.kv.state, EngineConfig.state_snapshots):
a hit resumes from a state snapshot kept where an earlier prefill was cut (the branch point of a shared
prefix, a prompt's last block boundary), and every output equals the full no-cache forward's, or the same
engine's without prefix caching, under chunked prefill, preemption, n seeded samples, async scheduling and
snapshot eviction; a reset forgets the snapshots."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.sampling import SamplingParams

from .state_models import tiny_state_model
from .test_state_cache import CONFIGS, KINDS, no_leak, reference, run


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_state_model(kind) for kind in KINDS}


def greedy(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)


def check(model, prompt: list[int], out, max_tokens: int = 6) -> None:
    want, lps = reference(model, prompt, max_tokens)
    assert out.outputs[0].token_ids == want
    assert out.outputs[0].logprobs == pytest.approx(lps, abs=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_a_shared_prefix_is_hit_from_the_third_request_on(kind, models, tok):
    """The second request sharing a system prompt finds the first one's blocks but no state after them: it
    computes from token 0, cut at the branch point, where its state is kept; the next ones resume there."""
    model = models[kind]
    system = list(range(30, 44))  # 14 tokens: blocks of 4 -> 3 full ones shared
    prompts = [system + [100 + i, 101 + i, 102 + i] for i in range(4)]
    engine = Engine(model, tok, EngineConfig(block_size=4, state_snapshots=8))
    first = run(engine, [(prompts[0], greedy())])[0]
    second = run(engine, [(prompts[1], greedy())])[0]
    assert engine.stats()["prefix_hit_blocks"] == 0  # the first one's state after 16 tokens is not the second's
    assert len(engine.runner.cache.snapshot_rows) == 3  # first: 16; second: 12 (branch), 16
    rest = run(engine, [(p, greedy()) for p in prompts[2:]])
    assert engine.stats()["prefix_hit_blocks"] == 6  # 3 blocks each, resumed from the branch point's state
    for prompt, out in zip(prompts, [first, second, *rest.values()]):
        check(model, prompt, out)
    no_leak(engine)


@pytest.mark.parametrize("kind", KINDS)
def test_the_next_turn_of_a_conversation_resumes_at_the_last_prompts_boundary(kind, models, tok):
    model = models[kind]
    engine = Engine(model, tok, EngineConfig(block_size=4, state_snapshots=4))
    turn1 = list(range(50, 61))  # 11 tokens: a snapshot at 8
    out1 = run(engine, [(turn1, greedy())])[0]
    turn2 = turn1 + out1.outputs[0].token_ids + [70, 71, 72]
    out2 = run(engine, [(turn2, greedy())])[0]
    assert engine.stats()["prefix_hit_blocks"] == 2  # the 8 tokens before turn 1's snapshot
    check(model, turn1, out1)
    check(model, turn2, out2)


def mix(n_requests: int, seed: int):
    """Prompts made of a few shared prefixes and random tails, greedy and seeded samples."""
    g = torch.Generator().manual_seed(seed)
    heads = [torch.randint(1, 250, (n,), generator=g).tolist() for n in (9, 13, 6)]
    out = []
    for i in range(n_requests):
        tail = torch.randint(1, 250, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
        sp = (greedy(5) if i % 3 else
              SamplingParams(temperature=1.0, n=2, seed=i, max_tokens=5, ignore_eos=True, logprobs=0))
        out.append((heads[i % 3] + tail, sp))
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("snapshots", [2, 16])
def test_waves_equal_the_engine_without_prefix_caching(kind, config, snapshots, models, tok):
    """Three waves of requests on shared prefixes; with two snapshots, states are dropped and taken again."""
    model = models[kind]
    waves = [mix(6, seed) for seed in range(3)]
    plain = Engine(model, tok, EngineConfig(**CONFIGS[config]))
    cached = Engine(model, tok, EngineConfig(**CONFIGS[config], state_snapshots=snapshots))
    assert not plain.pool.prefix_caching and cached.pool.prefix_caching
    for wave in waves:
        want, got = run(plain, wave), run(cached, wave)
        for i in range(len(wave)):
            assert [o.token_ids for o in got[i].outputs] == [o.token_ids for o in want[i].outputs], (i, wave[i])
            for a, b in zip(got[i].outputs, want[i].outputs):
                assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    if snapshots == 2:  # every row taken, older states dropped for newer ones
        assert len(cached.runner.cache.snapshot_rows) == 2
    else:  # (concurrent requests of one prefix miss: its blocks are named after their first step)
        assert cached.stats()["prefix_hit_blocks"] > 0
    no_leak(cached)


def test_a_reset_forgets_the_snapshots_and_the_option_is_checked(models, tok):
    model = models["hybrid"]
    engine = Engine(model, tok, EngineConfig(block_size=4, state_snapshots=4))
    prompt = list(range(20, 33))
    run(engine, [(prompt, greedy())])
    assert engine.runner.cache.snapshot_rows
    engine.reset_prefix_cache()
    assert not engine.runner.cache.snapshot_rows and engine.runner.cache.num_free_snapshots == 4
    again = run(engine, [(prompt + [7], greedy())])[0]
    assert engine.stats()["prefix_hit_blocks"] == 0
    check(model, prompt + [7], again)
    with pytest.raises(ConfigError, match="state_snapshots must be >= 0"):
        EngineConfig(state_snapshots=-1)


def test_snapshots_with_prefix_caching_off_are_a_notice(models, tok):
    """state_snapshots > 0 with prefix_caching=False on a model with recurrent-state layers was accepted and ignored
    without a word (the snapshots serve prefix caching only): one warning, at the user's line, says so; the engine
    runs as without them."""
    import warnings

    model = models["hybrid"]
    with pytest.warns(UserWarning, match=r"^state_snapshots=4 is ignored: prefix_caching=False, and the snapshots "
                                         r"serve prefix caching only; leave it at 0, or prefix_caching unset$") as seen:
        off = Engine(model, tok, EngineConfig(block_size=4, state_snapshots=4, prefix_caching=False))
    assert len(seen) == 1 and seen[0].filename == __file__  # (the user's line)
    assert not off.pool.prefix_caching and off.scheduler.snapshots is None and off.runner.cache.max_snapshots == 0
    prompt = list(range(20, 33))
    check(model, prompt, run(off, [(prompt, greedy())])[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine(model, tok, EngineConfig(block_size=4, prefix_caching=False))
        Engine(model, tok, EngineConfig(block_size=4, state_snapshots=4, prefix_caching=True))


def test_snapshots_for_a_model_without_state_layers_are_a_notice(tok):
    """state_snapshots > 0 on a plain transformer (nothing to snapshot: its prefix caching needs none) was ignored
    without a word: one warning says so, and the engine caches prefixes as without it."""
    import warnings

    from .infer_helpers import tiny_model

    model = tiny_model("llama")
    with pytest.warns(UserWarning, match=r"^state_snapshots=4 is ignored: Transformer has no recurrent-state layers.*"
                                         "leave it at 0 for this model$") as seen:
        engine = Engine(model, tok, EngineConfig(block_size=4, state_snapshots=4))
    assert len(seen) == 1 and seen[0].filename == __file__  # (the user's line)
    assert engine.pool.prefix_caching and engine.scheduler.snapshots is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine(model, tok, EngineConfig(block_size=4))
        Engine(tiny_state_model("hybrid"), tok, EngineConfig(block_size=4, state_snapshots=4))


def test_snapshots_are_refused_where_a_length_dependent_rope_turns_prefix_caching_off(tok):
    """A hybrid whose attention's RoPE follows each sequence's length (dynamic NTK) cannot cache prefixes: its
    state_snapshots rows would be set aside and never used (before, they were, silently)."""
    from lmforge.model.config import RopeScaling
    from lmforge.model.layers.rope import RotaryEmbedding

    model = tiny_state_model("hybrid")
    model.cfg = dataclasses.replace(model.cfg, rope_scaling=RopeScaling(kind="dynamic", factor=2.0))
    model.rope = RotaryEmbedding(model.cfg.rope_dim, model.cfg.rope_theta, scaling=model.cfg.rope_scaling,
                                 max_seq_len=96)
    assert model.rope.length_dependent
    with pytest.raises(ConfigError, match="state_snapshots=4 keeps recurrent states .* 'dynamic'") as e:
        Engine(model, tok, EngineConfig(block_size=4, state_snapshots=4))
    assert "\n" not in str(e.value)
    assert not Engine(model, tok, EngineConfig(block_size=4)).pool.prefix_caching
    with pytest.warns(UserWarning, match="state_snapshots=4 is ignored: prefix_caching=False"):
        off = Engine(model, tok, EngineConfig(block_size=4, state_snapshots=4, prefix_caching=False))
    assert off.runner.cache.max_snapshots == 0
