"""Seams a server on the AsyncEngine meets (found by a sweep emulating an OpenAI-compatible server, 2026-12-06):
steps on their own thread, never queued behind prompt encodes; per-request caps (n, beams, top log-probs) and the
pool counting n samples' blocks; token-id prompts checked without a Python loop; one shared prompt id list per
request; max_tokens=None and EngineConfig.strict_admission; prompt_index in errors; skip_special_tokens;
RequestOutput.usage; SamplingParams.cache_key. fp32, CPU, tiny models."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import pickle
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

import lmforge.infer.request as request_module
from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.async_engine import AsyncEngine
from lmforge.infer.blocks import BlockPool
from lmforge.infer.detok import StreamDecoder, special_ids
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.outputs import PromptIds
from lmforge.infer.request import encode_prompt
from lmforge.infer.sampling import GREEDY_IGNORES, SamplingParams
from lmforge.tokenizer.byte import ByteTokenizer

from .infer_helpers import run_requests, tiny_model

GREEDY = dict(temperature=0, ignore_eos=True)


def engine(tok=None, **config) -> Engine:
    return Engine(tiny_model("llama"), tok or ByteTokenizer(), EngineConfig(**{"block_size": 4, **config}))


def steps(eng: Engine, prompt, params: SamplingParams) -> list:
    """Every output of one request, in order."""
    rid, outs = eng.add_request(prompt, params), []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.request_id == rid]
    return outs


# 1. steps and encodes on their own executors ----------------------------------------------------------------------
class BlockingTokenizer(ByteTokenizer):
    """Prompts starting 'slow' block in encode until `release` is set; `entered` counts those that began."""

    def __init__(self):
        super().__init__()
        self.release, self.entered, self.lock = threading.Event(), 0, threading.Lock()

    def encode(self, text: str) -> list[int]:
        if text.startswith("slow"):
            with self.lock:
                self.entered += 1
            self.release.wait(60)
        return super().encode(text)


def test_a_stream_steps_on_while_a_burst_of_prompts_is_being_encoded():
    """40 text prompts whose encoding blocks: with steps and encodes on the loop's default executor (a few
    workers) the step queued behind them and the running stream stalled for the whole burst (0.5 s for 60 prompts
    of 50 ms). Steps now run on the AsyncEngine's own thread: the stream runs to its end while every encode is
    still blocked, and only encode_threads encodes run at once. shutdown() closes both executors."""
    tok = BlockingTokenizer()
    eng = engine(tok, max_num_seqs=64)
    threads = []
    step = eng.step
    eng.step = lambda *a, **k: (threads.append(threading.current_thread().name), step(*a, **k))[1]

    async def main():
        aeng = AsyncEngine(eng, encode_threads=2)
        assert aeng._step_pool is not aeng._encode_pool and aeng._step_pool._max_workers == 1
        rid = await aeng.add_request("stream me", SamplingParams(max_tokens=8, **GREEDY))
        burst = [asyncio.ensure_future(aeng.add_request(f"slow {i}", SamplingParams(max_tokens=1)))
                 for i in range(40)]
        try:
            async def read():
                return [o async for o in aeng.stream(rid)]
            outs = await asyncio.wait_for(read(), 60)  # (a guard: without the fix this never returned)
            assert outs[-1].finished and len(outs[-1].token_ids) == 8
            assert not any(b.done() for b in burst) and tok.entered == 2  # all blocked, two at a time
        finally:
            tok.release.set()
        rids = await asyncio.gather(*burst)
        for r in rids:
            assert [o async for o in aeng.stream(r)][-1].finished
        await aeng.shutdown()
        assert aeng._step_pool._shutdown and aeng._encode_pool._shutdown

    asyncio.run(main())
    assert threads and set(threads) == {"lmforge-step_0"}


def test_encode_threads_must_be_a_positive_int():
    with pytest.raises(LmforgeError, match="encode_threads must be an int >= 1, got 0"):
        AsyncEngine(engine(), encode_threads=0)


# 2. per-request caps ----------------------------------------------------------------------------------------------
def test_strict_admission_refuses_n_and_beam_width_above_max_num_seqs():
    """n=5000 was accepted: its samples all joined the running batch at the fork (28.8 s of steps for 2 tokens).
    A server's engine (strict_admission) refuses it; offline, samples still fork past max_num_seqs."""
    lenient = engine(max_num_seqs=2)
    out = run_requests(lenient, [("hello", SamplingParams(n=3, max_tokens=2, seed=0))])[0]
    assert [len(o.token_ids) for o in out.outputs] == [2, 2, 2]
    eng = engine(max_num_seqs=8, strict_admission=True)
    with pytest.raises(LmforgeError, match=r"^n=9 runs 9 sequences, more than EngineConfig.max_num_seqs=8; lower n"):
        eng.add_request("hello", SamplingParams(n=9, max_tokens=2))
    with pytest.raises(LmforgeError, match=r"^beam_width=9 runs 9 sequences, .*lower beam_width or raise"):
        eng.add_request("hello", SamplingParams(beam_width=9, temperature=0, max_tokens=2))
    assert not eng.requests
    out = run_requests(eng, [("hello", SamplingParams(n=8, max_tokens=2, seed=0))])[0]
    assert len(out.outputs) == 8 and all(len(o.token_ids) == 2 for o in out.outputs)


def test_the_pool_check_counts_every_samples_blocks_beyond_the_shared_prompt():
    """n samples share the prompt's full blocks and each own the rest: 12 + 40 tokens in blocks of 4 are 13 blocks
    for one sample, 3 + 2 x 10 for two (the check counted one sample whatever n, and 8 samples of a 16-block pool
    were accepted to preempt each other). strict_admission refuses a request whose samples the pool cannot hold at
    once, and a pool of exactly that many runs them without a preemption; offline they take turns."""
    pool = BlockPool(100, 4)
    assert [pool.request_blocks(12, 52, n) for n in (1, 2, 3)] == [13, 23, 33]
    assert pool.request_blocks(13, 52, 2) == 3 + 2 * 10  # (the prompt's partial block is each sample's own)
    assert pool.request_blocks(12, 52, 2, policy=True) == 26  # (a KV policy's compactions share nothing)
    sp = SamplingParams(n=2, max_tokens=40, seed=0, ignore_eos=True)
    with pytest.raises(LmforgeError, match="12 prompt \\+ 40 new tokens in 2 samples needs 23 KV blocks but the pool "
                                           "has 16; .* or lower max_tokens or n$"):
        engine(num_kv_tokens=64, strict_admission=True).add_request("hello world!", sp)
    lenient = engine(num_kv_tokens=64)
    out = run_requests(lenient, [("hello world!", sp)])[0]
    assert [len(o.token_ids) for o in out.outputs] == [40, 40] and lenient.stats()["preemptions"] > 0
    eng = engine(num_kv_tokens=23 * 4, strict_admission=True)
    out = run_requests(eng, [("hello world!", sp)])[0]
    assert [len(o.token_ids) for o in out.outputs] == [40, 40] and eng.stats()["preemptions"] == 0


def test_top_logprobs_above_max_logprobs_are_refused_and_none_lifts_the_cap():
    eng = engine()
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(LmforgeError, match=rf"^{name}=21 is more than this engine lists \(EngineConfig."
                                               r"max_logprobs=20\); ask for at most 20 or raise max_logprobs"):
            eng.add_request("hi", SamplingParams(**{name: 21}))
    assert not eng.requests
    out = run_requests(eng, [("hi", SamplingParams(max_tokens=2, logprobs=20, prompt_logprobs=20, **GREEDY))])[0]
    assert len(out.outputs[0].top_logprobs[0]) == 20
    free = engine(max_logprobs=None)
    out = run_requests(free, [("hi", SamplingParams(max_tokens=2, logprobs=50, prompt_logprobs=40, **GREEDY))])[0]
    assert len(out.outputs[0].top_logprobs[0]) == 50 and len(out.prompt_logprobs[1]) in (40, 41)
    with pytest.raises(ConfigError, match="max_logprobs must be None"):
        EngineConfig(max_logprobs=-1)


# 4. token-id prompts checked without a Python loop ----------------------------------------------------------------
def test_plain_int_prompts_are_checked_without_a_per_token_loop(monkeypatch):
    """encode_prompt called is_int on every id (65 ms for 32k ids, on an AsyncEngine's event loop under the step
    lock); plain ints are now checked by type and bounds in C. Other ids still take the exact check."""
    calls = []
    real = request_module.is_int
    monkeypatch.setattr(request_module, "is_int", lambda t: calls.append(t) or real(t))
    sp, ids = SamplingParams(max_tokens=1), [i % 250 for i in range(4000)]
    assert encode_prompt(None, ids, sp, 0, 257, 10**6) == ids and calls == []
    got = encode_prompt(None, list(np.arange(5)), sp, 0, 257, 100)  # numpy ints: the exact check, made ints
    assert got == [0, 1, 2, 3, 4] and all(type(t) is int for t in got) and len(calls) == 5
    for bad, said in (([1, 257], "257 outside"), ([-1, 3], "-1 outside"), ([1, True], "True that is not an int"),
                      ([2, 1.0], "1.0 that is not an int")):
        with pytest.raises(LmforgeError, match=f"prompt 2 has token id {said}"):
            encode_prompt(None, bad, sp, 2, 257, 100)


# 5. one prompt id list per request --------------------------------------------------------------------------------
def test_outputs_share_one_read_only_prompt_list():
    """Request.output copied the prompt into every output (95 ms a step at 256 requests of 8k-token prompts, in
    'delta' mode too): one PromptIds now serves the request and all its outputs."""
    outs = steps(engine(), "hello there", SamplingParams(max_tokens=4, **GREEDY))
    ids = outs[0].prompt_token_ids
    assert len(outs) == 4 and all(o.prompt_token_ids is ids for o in outs) and type(ids) is PromptIds
    assert ids == list(b"hello there") and ids + [1] == list(b"hello there") + [1] and list(ids) == ids
    for change in (lambda: ids.append(1), lambda: ids.__setitem__(0, 5), lambda: ids.extend([1]), ids.clear):
        with pytest.raises(LmforgeError, match="shared with the engine .* copy them first"):
            change()
    with pytest.raises(LmforgeError):
        ids += [1]
    assert ids == list(b"hello there")
    for again in (pickle.loads(pickle.dumps(ids)), copy.deepcopy(ids), copy.copy(ids)):
        assert type(again) is PromptIds and again == ids


def test_delta_outputs_carry_the_prompt_first_and_last_only():
    sp = SamplingParams(max_tokens=5, output_kind="delta", **GREEDY)
    outs = steps(engine(), "hello", sp)
    assert [o.prompt_token_ids is not None for o in outs] == [True, False, False, False, True]
    folded = outs[0]
    for o in outs[1:4]:
        folded = folded.then(o)
        assert folded.prompt_token_ids == list(b"hello")  # (then keeps the earlier one's)
    cum = steps(engine(), "hello", dataclasses.replace(sp, output_kind="cumulative"))[-1]
    assert folded.then(outs[-1]).prompt_token_ids == cum.prompt_token_ids
    assert folded.then(outs[-1]).token_ids == cum.token_ids


# 7. max_tokens=None and strict_admission's window check ----------------------------------------------------------
def test_max_tokens_none_runs_up_to_the_window_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = run_requests(engine(), [("hi", SamplingParams(max_tokens=None, **GREEDY))])[0]
    assert len(out.token_ids) == 126 and out.finish_reason == "length"  # the window is 128
    with pytest.raises(ConfigError, match="max_tokens must be >= 0 .*None = up to the context window"):
        SamplingParams(max_tokens=-1)


def test_strict_admission_makes_a_request_past_the_window_an_error():
    sp = SamplingParams(max_tokens=200, **GREEDY)
    with pytest.warns(UserWarning, match="max_tokens=200 after a 2-token prompt passes the context window"):
        engine().add_request("hi", sp)
    eng = engine(strict_admission=True)
    with pytest.raises(LmforgeError, match=r"^max_tokens=200 after a 2-token prompt passes the context "
                                           r"window \(128\); ask for at most 126 new tokens, or max_tokens=None"):
        eng.add_request("hi", sp)
    with pytest.raises(LmforgeError, match=r"^prompt 4: max_tokens=200 after a 2-token prompt"):
        eng.add_request("hi", sp, prompt_index=4)
    assert not eng.requests
    assert len(run_requests(eng, [("hi", dataclasses.replace(sp, max_tokens=126))])[0].token_ids) == 126


# 8. prompt_index in errors ----------------------------------------------------------------------------------------
def test_prompt_index_is_named_in_errors():
    eng = engine()
    with pytest.raises(LmforgeError, match="^prompt 2 has 500 tokens but the context window is 128"):
        eng.add_request("x" * 500, SamplingParams(max_tokens=4), prompt_index=2)

    async def main():
        aeng = AsyncEngine(engine())
        for prompt in ("x" * 500, [1] * 500):  # (a text prompt is encoded in a thread, ids on the loop)
            with pytest.raises(LmforgeError, match="^prompt 3 has 500 tokens"):
                await aeng.add_request(prompt, SamplingParams(max_tokens=4), prompt_index=3)
        with pytest.raises(LmforgeError, match="^prompt 5 has token id 999 outside"):
            await aeng.add_request([1, 999], SamplingParams(max_tokens=4), prompt_index=5)
        await aeng.shutdown()

    asyncio.run(main())


# 9. skip_special_tokens -------------------------------------------------------------------------------------------
def test_skip_special_tokens_leaves_them_out_of_the_text_only():
    eot = ByteTokenizer().eot_id
    bias = {eot: 100.0}
    eng = engine()
    kept = run_requests(eng, [("hi", SamplingParams(max_tokens=3, logit_bias=bias, logprobs=0, **GREEDY))])[0]
    skip = run_requests(eng, [("hi", SamplingParams(max_tokens=3, logit_bias=bias, logprobs=0,
                                                    skip_special_tokens=True, **GREEDY))])[0]
    assert kept.token_ids == skip.token_ids == [eot] * 3
    assert kept.text == "<|endoftext|>" * 3 and skip.text == ""
    assert skip.outputs[0].text_offsets == [0, 0, 0]
    with pytest.raises(ConfigError, match="skip_special_tokens needs beam_width=1"):
        SamplingParams(beam_width=2, temperature=0, skip_special_tokens=True)


class NoBytes(ByteTokenizer):
    """A tokenizer decoded whole each step (no token_bytes)."""

    token_bytes = None


def test_stream_decoder_skips_ids_on_both_paths():
    for tok in (ByteTokenizer(), NoBytes()):
        dec = StreamDecoder(tok, special_ids(tok))
        pieces = [dec.push(i) for i in [*b"a", 256, 0xC3, 256, 0xA9]] + [dec.flush()]
        assert "".join(pieces) == "a\u00e9", type(tok)
    from lmforge.tokenizer.bpe import Tokenizer

    bpe = Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>", "<|im_end|>"])
    assert special_ids(bpe) == frozenset(bpe.special_tokens.values()) and len(special_ids(bpe)) == 2


# 10. usage --------------------------------------------------------------------------------------------------------
def test_usage_counts_prompt_every_samples_tokens_and_cached_prompt_tokens():
    eng = engine()
    sp = SamplingParams(n=3, max_tokens=5, seed=1, ignore_eos=True)
    first = run_requests(eng, [("hello there, friend", sp)])[0]
    assert first.usage == {"prompt_tokens": 19, "completion_tokens": 15, "cached_tokens": 0}
    again = run_requests(eng, [("hello there, friend", sp)])[0]
    assert again.usage == {"prompt_tokens": 19, "completion_tokens": 15, "cached_tokens": 16}
    outs = steps(eng, "hello", dataclasses.replace(sp, n=2, output_kind="delta"))
    assert [o.usage["completion_tokens"] for o in outs] == [2, 4, 6, 8, 10]  # the request's so far, not the piece's
    assert all(o.usage["prompt_tokens"] == 5 for o in outs)
    beams = run_requests(eng, [("hello", SamplingParams(beam_width=3, n=2, max_tokens=4, **GREEDY))])[0]
    assert beams.usage["completion_tokens"] == sum(len(o.token_ids) for o in beams.outputs) == 8


# 11. cache_key ----------------------------------------------------------------------------------------------------
def test_cache_key_is_stable_and_greedy_drops_what_it_ignores():
    sp = SamplingParams(temperature=0.7, top_p=0.9, seed=3, stop=("x",), logit_bias={5: 1.0, 2: -1.0})
    assert sp.cache_key() == SamplingParams(temperature=0.7, top_p=0.9, seed=3, stop=["x"],
                                            logit_bias={2: -1.0, 5: 1.0}).cache_key()
    changed = [dataclasses.replace(sp, **kw) for kw in (dict(seed=4), dict(top_p=0.8), dict(max_tokens=65))]
    assert len({sp.cache_key(), *(c.cache_key() for c in changed)}) == 4
    greedy = SamplingParams(temperature=0, max_tokens=9)
    same = dataclasses.replace(greedy, top_p=0.5, top_k=3, min_p=0.1, seed=7, typical_p=0.5, epsilon_cutoff=0.1,
                               eta_cutoff=0.1)
    assert greedy.cache_key() == same.cache_key() != dataclasses.replace(greedy, repetition_penalty=1.2).cache_key()
    assert set(GREEDY_IGNORES) <= {f.name for f in dataclasses.fields(SamplingParams)}
    code = ("from lmforge.infer.sampling import SamplingParams as S; "
            "print(S(temperature=0.7, top_p=0.9, seed=3, stop=('x',), logit_bias={5: 1.0, 2: -1.0}).cache_key())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": "", "PYTHONPATH": ":".join(sys.path)})
    assert other.stdout.strip() == sp.cache_key()
    with pytest.raises(ConfigError, match="^cache_key: logits_processors are functions with no stable digest"):
        SamplingParams(logits_processors=(lambda ids, logits: logits,)).cache_key()


# 12. an abort reads 'abort' ---------------------------------------------------------------------------------------
def test_an_aborted_requests_running_samples_read_abort():
    eng = engine()
    rid = eng.add_request("hello", SamplingParams(n=2, max_tokens=20, seed=0, ignore_eos=True))
    eng.step()
    eng.step()
    out = eng.abort(rid)
    assert out.finished and [o.finish_reason for o in out.outputs] == ["abort", "abort"]


@pytest.mark.parametrize("steps", [0, 1])
def test_a_request_aborted_before_its_samples_fork_still_has_n_samples(steps):
    """Queued, or mid-prefill (its n samples fork from the prompt's last logits): the abort's output holds n empty
    samples, indices 0..n-1, as a refused request's does (outputs.failed_output) and as every output after the fork;
    it held one (a server's n choices, an RL group of n, came back with one). A beam search's is its prompt beam."""
    eng = engine(max_num_batched_tokens=4)
    rid = eng.add_request("hello there", SamplingParams(n=3, max_tokens=20, seed=0, logprobs=0))
    for _ in range(steps):
        assert eng.step() == []  # (the prompt's 11 tokens take 3 steps at 4 a step)
    out = eng.abort(rid)
    assert [(o.index, o.text, o.token_ids, o.finish_reason, o.logprobs) for o in out.outputs] == [
        (j, "", [], "abort", []) for j in range(3)]
    assert out.outputs[1].token_ids is not out.outputs[2].token_ids
    assert eng.pool.num_used == 0 and not eng.requests
    beams = eng.add_request("hello", SamplingParams(temperature=0, beam_width=3, n=3, max_tokens=5))
    assert len(eng.abort(beams).outputs) == 1
