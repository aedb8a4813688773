"""StreamingLLM with positions within the cache (the paper's §3.2; lmforge.infer.kv.policy): a query takes the
position of its slot and each compaction turns the keys it moves by their shift, so a stream runs past the
model's max_seq_len. Against the independent reference (tests/infer/kv_policy_ref.py, CachePositionsRef): every
visible key turned from position 0 to its rank among the visible keys at each attention, the engine's schedule
replayed - greedy tokens and every log-prob agree."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.kv.policy import StreamingLLM
from lmforge.infer.sampling import SamplingParams
from lmforge.model.config import MLAConfig

from .infer_helpers import tiny_model
from .kv_policy_ref import MLA, PROMPT, STREAM, check_against, replay, run

WINDOW = 24
"""the models' max_seq_len: the prompt (43 tokens) and its 40 new tokens run well past it"""
CACHE = StreamingLLM(**STREAM, positions="cache")


def model_of(arch: str, **kw):
    if arch == "mla":
        return tiny_model("llama", max_seq_len=WINDOW, **MLA, **kw,
                          mla=MLAConfig(kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                        v_head_dim=8))
    return tiny_model("llama", max_seq_len=WINDOW, **kw)


@pytest.mark.parametrize("arch,config", [
    ("llama", dict()),
    ("llama", dict(max_num_batched_tokens=7)),  # small chunks: evictions between many chunks of the prompt
    ("llama", dict(cuda_graphs=True, async_scheduling=True)),
    ("mla", dict(max_num_batched_tokens=10)),  # MLA: its rope keys turned, latents untouched
])
def test_positions_within_the_cache_equal_the_reference_past_the_window(tok, arch, config):
    model = model_of(arch, **({"rope_layout": "half"} if arch == "llama" else {}))
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0)
    engine, reqs, log = run(model, tok, EngineConfig(block_size=4, kv_policy=CACHE, **config), [PROMPT, "short"], sp)
    assert check_against(replay(model, log, CACHE), reqs, greedy=True) == 80
    assert all(len(seq.tokens) > WINDOW for r in reqs for seq in r.seqs)  # past max_seq_len
    assert max(c[1] + c[2] - c[0].pos_shift for step in log for c in step) <= WINDOW  # no position past it
    assert engine.pool.num_used == 0


def test_forks_and_block_slack_turn_only_their_own_keys(tok):
    """n = 3 samples share their parent's compacted blocks; slack of whole blocks (the compactions that would move
    table entries without copying): turned keys are written to private blocks, never a shared one."""
    model = model_of("llama")
    policy = StreamingLLM(sink_tokens=4, window=8, slack=4, positions="cache")
    sp = SamplingParams(temperature=1.0, n=3, seed=2, max_tokens=30, ignore_eos=True, logprobs=0)
    turned = []

    def private_turns(engine):
        cache, real, pool = engine.runner.cache, engine.runner.cache.rotate_keys, engine.pool

        def checked(slots, delta, rotate):
            blocks = set((slots // pool.block_size).tolist())
            turned.append(len(blocks))
            assert all(pool.ref[b] == 1 for b in blocks), "a turn wrote a block another sequence holds"
            return real(slots, delta, rotate)
        cache.rotate_keys = checked

    engine, reqs, log = run(model, tok, EngineConfig(block_size=4, kv_policy=policy, max_num_batched_tokens=9),
                            [PROMPT[:13]], sp, before=private_turns)
    assert check_against(replay(model, log, policy), reqs, greedy=False) == 90
    assert turned and engine.pool.num_used == 0


def test_preempted_streams_restart_from_their_first_position(tok, monkeypatch):
    """A pool too small for three samples preempts (also from a compaction's copies): a preempted sample
    recomputes from token 0 with positions from 0 again (pos_shift reset), its stream past the window again."""
    from lmforge.infer.scheduler import Scheduler

    preempted, real = [], Scheduler._preempt
    monkeypatch.setattr(Scheduler, "_preempt", lambda self, seq, batch: preempted.append(seq.seq_id) or
                        real(self, seq, batch))
    model = model_of("llama")
    sp = SamplingParams(temperature=1.0, n=3, seed=4, max_tokens=30, ignore_eos=True, logprobs=0)
    engine, reqs, log = run(model, tok, EngineConfig(block_size=4, kv_policy=CACHE, num_kv_tokens=48,
                                                      max_num_batched_tokens=8), [PROMPT, "another prompt"], sp)
    assert preempted and engine.stats()["preemptions"] > 0
    assert check_against(replay(model, log, CACHE), reqs, greedy=False) == 180
    assert engine.pool.num_used == 0


@pytest.mark.parametrize("block,kv_tokens", [(2, 20), (4, 24)])
def test_samples_whose_compactions_fail_together_make_progress(tok, monkeypatch, block, kv_tokens):
    """n = 2 samples of a prompt longer than the window share its cached lossless blocks; both compactions find no
    free block for their copies. Each was preempted itself, both were readmitted onto the same blocks (the window
    caps the hit, so at the same point) and failed again: forever, every step running chunks. Now the newest
    running sequence is preempted for the older one's compaction (as a chunk preempts), so the oldest always runs;
    the outputs still follow the policy (the reference replays the schedule)."""
    from lmforge.infer.scheduler import Scheduler

    victims, real = [], Scheduler.preempt
    monkeypatch.setattr(Scheduler, "preempt", lambda self, seq, last=False: victims.append(seq.seq_id) or
                        real(self, seq, last))
    model = tiny_model("llama", max_seq_len=16)
    policy = StreamingLLM(sink_tokens=4, window=8, slack=1, positions="cache")
    sp = SamplingParams(temperature=1.0, n=2, seed=0, max_tokens=6, ignore_eos=True, logprobs=0)
    config = EngineConfig(block_size=block, kv_policy=policy, num_kv_tokens=kv_tokens, max_num_batched_tokens=8)
    engine, reqs, log = run(model, tok, config, [list(range(1, 21))], sp, max_steps=100)
    assert victims and len(log) < 40
    assert check_against(replay(model, log, policy), reqs, greedy=False) == 12
    assert engine.pool.num_used == 0


def test_a_prefix_hit_as_long_as_the_window_leaves_room_for_a_chunk(tok):
    """A first request's prompt fills the whole window before its first eviction, so its lossless blocks (all
    max_seq_len positions) are cached; the same prompt again hits them - trimmed to leave room for a chunk below
    the window (it waited forever, then raised "could not fit any sequence"), with the first request's tokens."""
    model = model_of("llama")
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    engine = Engine(model, tok, EngineConfig(block_size=4, kv_policy=CACHE, max_num_batched_tokens=64))
    outs = []
    for _ in range(2):
        engine.add_request(PROMPT, sp)
        while engine.has_unfinished():
            outs += [o for o in engine.step() if o.finished]
    assert outs[1].metrics["num_cached_tokens"] == 20  # (24 - 1) // 4 blocks of the 24 cached
    assert outs[0].token_ids == outs[1].token_ids
    assert outs[1].logprobs == pytest.approx(outs[0].logprobs, abs=1e-5)


def test_a_long_stream_needs_only_a_window_of_blocks(tok):
    """The pool check sizes a request by the keys it can hold, which positions within the cache bound by the window
    (not by the policy's slots plus a whole step's tokens): 200 tokens on a pool of 32 slots."""
    model = model_of("llama")
    engine = Engine(model, tok, EngineConfig(block_size=4, kv_policy=CACHE, num_kv_tokens=32,
                                             max_num_batched_tokens=64))
    engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    while engine.has_unfinished():
        outs = engine.step()
    assert len(outs[0].token_ids) == 200 and engine.pool.num_used == 0


def test_original_positions_stay_bounded_by_the_window(tok):
    """Without positions within the cache the same request stops at max_seq_len ('length'); with them it runs
    to max_tokens."""
    model = model_of("llama")
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    short = dict(max_num_batched_tokens=8)
    outs = {}
    for positions in ("original", "cache"):
        policy = dataclasses.replace(CACHE, positions=positions)
        eng = Engine(model, tok, EngineConfig(block_size=4, kv_policy=policy, **short))
        if positions == "original":
            with pytest.raises(Exception, match="context window"):
                eng.add_request(PROMPT, sp)
            eng.add_request(PROMPT[:10], sp)
        else:
            eng.add_request(PROMPT, sp)
        while eng.has_unfinished():
            outs[positions] = [o for o in eng.step() if o.finished] or outs.get(positions)
    assert outs["original"][0].finish_reason == "length" and len(outs["original"][0].token_ids) < 40
    assert len(outs["cache"][0].token_ids) == 40


def test_refusals(tok):
    with pytest.raises(ConfigError, match="positions"):
        StreamingLLM(window=8, positions="cached")
    learned = tiny_model("llama", max_seq_len=WINDOW, pos_emb="learned")
    with pytest.raises(ConfigError, match="plain RoPE"):
        Engine(learned, tok, EngineConfig(block_size=4, kv_policy=CACHE))
    with pytest.raises(ConfigError, match="max_seq_len=24"):
        Engine(model_of("llama"), tok, EngineConfig(block_size=4, kv_policy=StreamingLLM(window=30, positions="cache")))
    with pytest.raises(ConfigError, match="chunked_prefill"):
        Engine(model_of("llama"), tok, EngineConfig(block_size=4, kv_policy=CACHE, chunked_prefill=False))


def test_turning_keys_composes_rotations():
    """A key computed at position p and turned by d equals the key computed at p + d (both layouts)."""
    from lmforge.model.layers.rope import RotaryEmbedding, apply_rope, rotate_by

    for layout in ("half", "interleaved"):
        rope = RotaryEmbedding(16, 10000.0, layout)
        x, p, d = torch.randn(6, 2, 16), torch.tensor([0, 3, 7, 2, 9, 40]), torch.tensor([4, -3, 1, 0, 5, -40])

        def at(pos):
            cos, sin = rope.cos_sin(pos[None])
            return apply_rope(x.transpose(0, 1)[None], cos, sin, layout)[0].transpose(0, 1)

        torch.testing.assert_close(rotate_by(at(p), d, rope.inv_freq, layout), at(p + d), atol=1e-5, rtol=1e-5)
