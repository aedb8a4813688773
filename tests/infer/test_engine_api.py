"""The engine's interface for evaluation, RL rollouts, EAGLE-style drafters and servers, against plain
references (fp32, CPU, tiny models): prompt log-probs and LLM.score against log_softmax of one full
forward; update_weights against a freshly built engine on the new weights; hidden states against the
model's own trunk; per-request streaming and abort on the asyncio front."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.async_engine import AsyncEngine
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import NGramDrafter

from .infer_helpers import full_greedy, run_requests, tiny_model


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T, V) log_softmax of one uncached forward over ids."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


run = run_requests  # (the tests here call it run)


def check_prompt_logprobs(model, prompt: list[int], got, k: int, start: int = 1) -> None:
    logp = full_logprobs(model, prompt)
    assert len(got) == len(prompt) and got[:start] == [None] * start
    for t in range(start, len(prompt)):
        want_top = logp[t - 1].topk(k)
        want = {prompt[t]: float(logp[t - 1, prompt[t]]),
                **dict(zip(want_top.indices.tolist(), want_top.values.tolist()))}
        assert got[t].keys() == want.keys(), t
        assert list(got[t].values()) == pytest.approx(list(want.values()), abs=1e-4), t


class NoCacheSpec(torch.nn.Module):
    """A model without cache_spec(): the engine's plain recompute runner."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.max_seq_len, self.vocab_size = model, model.cfg.max_seq_len, model.cfg.vocab_size

    def forward(self, ids, positions=None, cache=None, meta=None, *, return_hidden=False):
        return self.inner(ids, return_hidden=return_hidden)


# prompt log-probs and scoring ------------------------------------------------------------------------
@pytest.mark.parametrize("arch,config", [
    ("llama", dict(block_size=4, max_num_batched_tokens=7, num_kv_tokens=64)),  # chunks, preemption
    ("gpt2", dict(block_size=4, max_num_batched_tokens=64)),
    ("mqa-softcap", dict(block_size=8, max_num_batched_tokens=5, max_num_seqs=2)),
])
def test_prompt_logprobs_equal_a_full_forward(arch, config, tok):
    """Under chunked prefill, preemption and prefix-cache hits of other requests: every prompt token
    after the first gets log p(token | prefix) and the top-k, as log_softmax of one full forward."""
    model = tiny_model(arch, init_std=0.3)
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(1, 250, (13,), generator=g).tolist()
    prompts = [shared + torch.randint(1, 250, (n,), generator=g).tolist() for n in (5, 11, 2)] + [[7], shared]
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    asks = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=k, n=n, logprobs=lp)
            for k, n, lp in [(2, 1, None), (0, 2, 1), (3, 1, None), (1, 1, None)]]
    # the first request fills the prefix cache; the others ask for prompt log-probs on the same prefix
    engine = Engine(model, tok, EngineConfig(**config))
    outs = run(engine, [(prompts[0], plain)] + list(zip(prompts[1:], asks)))
    assert outs[0].prompt_logprobs is None
    for prompt, sp, out in zip(prompts[1:], asks, outs[1:]):
        check_prompt_logprobs(model, prompt, out.prompt_logprobs, sp.prompt_logprobs)
        assert all(o.token_ids == full_greedy(model, prompt, 6) for o in out.outputs)
    assert engine.pool.num_used == 0
    if arch == "llama":
        assert engine.stats()["preemptions"] > 0


@pytest.mark.parametrize("kw", [dict(beam_width=2, n=2), dict(draft="ngram")])
def test_prompt_logprobs_beside_beam_search_and_speculative_decoding(kw, tok):
    model = tiny_model("llama", init_std=0.3)
    draft = kw.pop("draft", None)
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=8), draft=draft)
    prompt = tok.encode("the cat and the cat and the")
    out, = run(engine, [(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=2,
                                                 **kw))])
    check_prompt_logprobs(model, prompt, out.prompt_logprobs, 2)
    if draft is not None:  # speculative greedy is the target's greedy
        assert out.token_ids == full_greedy(model, prompt, 12) and out.metrics["drafted"] > 0
    else:
        assert len(out.outputs) == 2


def test_prompt_logprobs_from_a_start_token_reuse_the_cached_prefix_before_it(tok):
    model = tiny_model("llama", init_std=0.3)
    shared = list(range(1, 23))
    prompt = shared + [40, 41, 42, 43, 44]
    engine = Engine(model, tok, EngineConfig(block_size=4))
    run(engine, [(shared + [9], SamplingParams(max_tokens=1))])
    sp = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1, prompt_logprobs_start=10)
    out, = run(engine, [(prompt, sp)])
    assert engine.stats()["prefix_hit_blocks"] == 2  # of 5 cached: those ending before position 9 (token 10's)
    check_prompt_logprobs(model, prompt, out.prompt_logprobs, 1, start=10)
    assert out.token_ids == full_greedy(model, prompt, 3)


def test_prompt_logprobs_on_the_recompute_runner_and_a_padded_vocabulary(tok):
    model = tiny_model("llama", vocab_size=300)
    prompt = tok.encode("scoring on the plain path")
    out, = run(Engine(NoCacheSpec(model), tok), [(prompt, SamplingParams(max_tokens=2, prompt_logprobs=2))])
    logp = full_logprobs(model, prompt)  # the model's distribution: ids past the tokenizer keep their mass
    for t in range(1, len(prompt)):
        assert out.prompt_logprobs[t][prompt[t]] == pytest.approx(float(logp[t - 1, prompt[t]]), abs=1e-4)
        assert max(out.prompt_logprobs[t]) < 257  # but are never listed


def test_score_is_lm_eval_loglikelihood(tok):
    model = tiny_model("llama", init_std=0.3)
    llm = LLM(model, tok, config=EngineConfig(block_size=4, max_num_batched_tokens=16))
    greedy = full_greedy(model, tok.encode("abc"), 5)
    abc = tok.encode("abc")
    pairs = [(abc, greedy), (abc, [5, 6, 7]), ("Question: 2+2 =", " 4"), ([9] * 130, [1, 2])]
    got = llm.score(pairs)
    # strings: the context's trailing whitespace moves to the continuation; too long: oldest context dropped
    refs = [(tok.encode("abc"), greedy), (tok.encode("abc"), [5, 6, 7]),
            (tok.encode("Question: 2+2 ="), tok.encode(" 4")), ([9] * 127, [1, 2])]  # a window of 128 + 1
    # multiple choice: the shared context is computed once, the others take it from the prefix cache
    context = tok.encode("Which of these is a colour? Answer:")
    choices = [tok.encode(c) for c in (" red", " seven", " quickly")]
    got += llm.score([(context, c) for c in choices])
    refs += [(context, c) for c in choices]
    assert llm.engine.stats()["prefix_hit_blocks"] >= 2 * ((len(context) - 1) // 4)
    roomy = LLM(model, tok, config=EngineConfig(block_size=4))  # all pairs fit one step's budget at once
    roomy_got = roomy.score([(context, c) for c in choices])  # (approx compares (float, bool) pairs exactly)
    assert [g for _, g in roomy_got] == [g for _, g in got[-3:]]
    assert [lp for lp, _ in roomy_got] == pytest.approx([lp for lp, _ in got[-3:]], abs=1e-5)
    assert roomy.engine.stats()["prefix_hit_blocks"] == 2 * (len(context) // 4)  # the first computed it
    for (ctx, cont), (lp, is_greedy) in zip(refs, got):
        logp = full_logprobs(model, (ctx + cont)[:-1])[len(ctx) - 1:]  # the last token is only a target
        assert lp == pytest.approx(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()), abs=1e-4)
        assert is_greedy == (logp.argmax(-1).tolist() == cont)
    assert got[0][1] and not got[1][1]
    assert llm.score([("abc ", "d")])[0][0] == pytest.approx(llm.score([("abc", " d")])[0][0])
    assert llm.score([("", "x")]) == llm.score([([tok.eot_id], tok.encode("x"))])  # lm-eval's empty context
    for bad, msg in [(("x", ""), "empty continuation"), (("x", [1]), "both be strings"),
                     (([1], [2] * 129), "no context")]:
        with pytest.raises(LmforgeError, match=msg):
            llm.score([bad])


@pytest.mark.parametrize("config,draft", [
    (dict(block_size=4, max_num_batched_tokens=7, num_kv_tokens=136), None),  # chunks, preemption
    (dict(block_size=4), "ngram"),
    (dict(block_size=4, async_scheduling=False), None),
])
def test_score_only_requests_compute_the_prompt_and_sample_nothing(config, draft, tok):
    """max_tokens=0 (the OpenAI completions API's echo scoring; LLM.score, an RL reference's log-probs): the
    prompt's log-probs as a full forward's, no token sampled, finish_reason 'length'; the last prompt token
    is never run, so a prompt of max_seq_len + 1 tokens fits; generating requests beside them are unchanged."""
    model = tiny_model("llama", init_std=0.3)
    engine = Engine(model, tok, EngineConfig(**config), draft=draft)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 250, (n,), generator=g).tolist() for n in (129, 20, 1, 9)]
    score = SamplingParams(max_tokens=0, prompt_logprobs=2)
    gen = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)  # grows beside the long prefill
    reqs = [(prompts[0], score), (prompts[1], gen), (prompts[1], score), (prompts[2], score),
            (prompts[3], SamplingParams(max_tokens=0))]
    outs = run(engine, reqs[::-1])[::-1]  # (the generating request admitted first: it preempts the long one)
    for i, out in zip((0, 1, 2), (outs[0], outs[2], outs[3])):
        c = out.outputs[0]
        assert c.token_ids == [] and c.text == "" and c.finish_reason == "length" and out.finished
        check_prompt_logprobs(model, prompts[i][:128], out.prompt_logprobs[:128], 2)
        if i == 0:  # the 129th token's log-prob, from position 127's logits: a full forward over 128 tokens
            last = full_logprobs(model, prompts[0][:128])[-1]
            assert out.prompt_logprobs[128][prompts[0][128]] == pytest.approx(float(last[prompts[0][128]]), abs=1e-4)
    assert outs[3].prompt_logprobs == [None] and outs[4].outputs[0].token_ids == []
    assert outs[1].token_ids == full_greedy(model, prompts[1], 60)
    assert engine.pool.num_used == 0 and not engine.scheduler.has_work()
    if config.get("num_kv_tokens"):
        assert engine.stats()["preemptions"] > 0
    with pytest.raises(LmforgeError, match="max_seq_len \\+ 1"):
        engine.add_request([5] * 130, score)
    for bad in (dict(n=2), dict(beam_width=2, temperature=0)):
        with pytest.raises(Exception, match="max_tokens=0 scores the prompt"):
            SamplingParams(max_tokens=0, **bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_score_only_requests_arrive_beside_decodes_on_the_default_backends(tok):
    """Score-only requests added while greedy decodes run on the GPU defaults (CUDA graphs, async scheduling,
    the fused view): their prompt log-probs are a full forward's (the same weights on the CPU) and the decodes
    keep the tokens of a plain CPU run."""
    model, cpu = tiny_model("llama", init_std=0.3).cuda(), tiny_model("llama", init_std=0.3)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 250, (n,), generator=g).tolist() for n in (5, 9, 13, 30, 129, 17)]
    engine = Engine(model, tok, EngineConfig(block_size=4))
    gen = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ids = [engine.add_request(p, gen) for p in prompts[:3]]
    done = {}
    for _ in range(4):  # the decodes are under way (graphs captured, steps overlapping)
        done.update({o.request_id: o for o in engine.step() if o.finished})
    ids += [engine.add_request(p, SamplingParams(max_tokens=0, prompt_logprobs=1)) for p in prompts[3:]]
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.async_scheduling and engine.runner.graphs.entries
    for p, rid in zip(prompts[:3], ids[:3]):
        assert done[rid].outputs[0].token_ids == full_greedy(cpu, p, 24)
    for p, rid in zip(prompts[3:], ids[3:]):
        assert done[rid].outputs[0].token_ids == [] and len(done[rid].prompt_logprobs) == len(p)
        check_prompt_logprobs(cpu, p[:128], done[rid].prompt_logprobs[:128], 1)


def test_generate_command_writes_prompt_logprobs(tok):
    from lmforge.cli.generate import result_row

    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    row = result_row(LLM(model, tok).generate("hey", sp)[0], sp, tok)
    logp = full_logprobs(model, tok.encode("hey"))
    assert row["prompt_logprobs"][0] is None and len(row["prompt_logprobs"]) == 3
    e = next(e for e in row["prompt_logprobs"][1] if e["token"] == "e")
    assert e["logprob"] == pytest.approx(float(logp[0, tok.encode("e")[0]]), abs=1e-4)


def test_prompt_logprobs_must_be_non_negative():
    with pytest.raises(LmforgeError, match="prompt_logprobs must be None or >= 0, got -1"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(LmforgeError, match="prompt_logprobs_start must be >= 1"):
        SamplingParams(prompt_logprobs=0, prompt_logprobs_start=0)


def test_a_tokenizer_larger_than_the_model_is_refused_naming_the_fix(tok):
    """A tokenizer with more ids than the model's vocabulary is refused at the engine's start, and the line says
    what to give instead (it named only the mismatch)."""
    with pytest.raises(LmforgeError, match=r"tokenizer vocab_size=257 is larger than the model's vocab_size=64: .*"
                                           r"give the model's own \(the one saved with it, or --tokenizer"):
        Engine(tiny_model("llama", vocab_size=64), tok, EngineConfig(block_size=4))


def test_an_engine_without_a_tokenizer_is_refused_in_one_line():
    """LLM(model, None) started, then failed at the first prompt or step in detok.py ('NoneType' object has no
    attribute 'decode'): the engine needs one to give outputs their text."""
    with pytest.raises(LmforgeError, match=r"^the engine needs a tokenizer with decode\(\), got NoneType; pass the "
                                           r"model's own"):
        LLM(tiny_model("llama"), None)


def test_prompt_logprobs_start_past_the_prompt_is_refused(tok):
    """A start past the prompt's last token gave no prompt log-probs at all, silently (request.py cut it to the
    prompt); the engine knows the prompt's length, so it refuses it naming both, and queues nothing."""
    engine = Engine(tiny_model("llama"), tok, EngineConfig(block_size=4))
    prompt = [5, 6, 7, 8, 9]
    for start in (5, 12):
        with pytest.raises(LmforgeError, match=rf"^prompt 2: prompt_logprobs_start={start} is past the last token of "
                                               r"the 5-token prompt \(position 4\); give 1 to 4$"):
            engine.add_request(prompt, SamplingParams(max_tokens=1, prompt_logprobs=0, prompt_logprobs_start=start),
                               prompt_index=2)
    assert not engine.has_unfinished()
    out, = run(engine, [(prompt, SamplingParams(max_tokens=1, prompt_logprobs=0, prompt_logprobs_start=4))])
    assert out.prompt_logprobs[:4] == [None] * 4 and out.prompt_logprobs[4] is not None
    out, = run(engine, [([5], SamplingParams(max_tokens=1, prompt_logprobs=0))])  # the default 1: still [None]
    assert out.prompt_logprobs == [None]


def test_a_request_refused_halfway_through_a_batch_leaves_nothing_queued(tok):
    llm = LLM(tiny_model("llama"), tok, config=EngineConfig(block_size=4, num_kv_tokens=32))
    with pytest.raises(LmforgeError, match="KV blocks"):
        llm.generate(["ok", "x" * 40], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished() and llm.engine.pool.num_used == 0


# weight updates (RL rollouts) ------------------------------------------------------------------------
def sgd_step(model, lr: float = 0.5) -> None:
    """One optimizer step on the very module the engine holds, in train mode (as a Trainer does)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ids = torch.arange(1, 40, device=next(model.parameters()).device)[None]
    torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:]).backward()
    opt.step()


@pytest.mark.parametrize("config", [dict(block_size=4), dict(block_size=4, cuda_graphs=True)])
def test_update_weights_after_an_optimizer_step_equals_a_fresh_engine(config, tok):
    model = tiny_model("llama", init_std=0.3)
    prompts = ["a shared system prompt, then one", "a shared system prompt, then two"]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    engine, stale = Engine(model, tok, EngineConfig(**config)), Engine(model, tok, EngineConfig(**config))
    before = [run(engine, [(p, sp)])[0].logprobs for p in prompts]  # one after the other: prefix hits
    run(stale, [(prompts[0], sp)])
    assert engine.stats()["prefix_hit_blocks"] > 0

    sgd_step(model)  # leaves the model in train mode: the engine runs it in eval mode regardless
    engine.update_weights()
    assert engine.stats()["prefix_hit_blocks"] == 0 and not engine.pool.cached
    first = run(engine, [(prompts[0], sp)])
    assert engine.stats()["prefix_hit_blocks"] == 0 and model.training  # nothing cached came from old weights
    after = first + run(engine, [(prompts[1], sp)])
    fresh = run(Engine(copy.deepcopy(model).eval(), tok, EngineConfig(**config)), [(p, sp) for p in prompts])
    for a, f, b in zip(after, fresh, before):
        assert a.token_ids == f.token_ids and a.logprobs == pytest.approx(f.logprobs, abs=1e-5)
        assert a.logprobs != pytest.approx(b, abs=1e-3)  # the step did change the model
    # without the update, the cached prefix keys from the old weights leak into the new model's output
    leaked = run(stale, [(prompts[1], sp)])[0]
    assert stale.stats()["prefix_hit_blocks"] > 0 and leaked.logprobs != pytest.approx(fresh[1].logprobs, abs=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_weights_keeps_captured_cuda_graphs_and_the_kernel_step_valid(tok):
    """On a GPU: decode steps replay captured graphs (and the batch-1 kernel step where it runs); an
    in-place optimizer step leaves them valid, so after update_weights they decode the new weights."""
    model = tiny_model("llama", init_std=0.3).cuda()
    prompts = ["one prompt", "and another one"]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True))
    run(engine, [(p, sp) for p in prompts])
    run(engine, [(prompts[0], sp)])  # batch 1: the kernel step, where it can run
    graphs = engine.runner.graphs
    assert graphs.entries
    sgd_step(model)
    engine.update_weights()
    assert engine.runner.graphs is graphs  # nothing recaptured
    for batch in ([(p, sp) for p in prompts], [(prompts[0], sp)]):
        got = run(engine, batch)
        fresh = run(Engine(copy.deepcopy(model).eval(), tok, EngineConfig(cuda_graphs=False, kernel_step=False)), batch)
        for a, f in zip(got, fresh):
            assert a.token_ids == f.token_ids and a.logprobs == pytest.approx(f.logprobs, abs=1e-3)


def test_update_weights_from_a_state_dict_or_module_and_refused_while_running(tok):
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(model, tok, config=EngineConfig(block_size=4, cuda_graphs=True))
    graphs = llm.engine.runner.graphs
    llm.update_weights(other.state_dict())
    assert llm.generate("hello", sp)[0].token_ids == full_greedy(other, tok.encode("hello"), 6)
    assert llm.engine.runner.graphs is graphs  # copied in place: captured graphs stay valid
    for p in model.parameters():  # new storage: the decode backends are rebuilt
        p.data = p.data.clone()
    llm.update_weights(tiny_model("llama", seed=2))
    assert llm.engine.runner.graphs is not graphs
    model.register_buffer("codes", torch.zeros(3))  # a buffer (where a quantized layer keeps its codes)
    llm.update_weights()
    graphs = llm.engine.runner.graphs
    llm.update_weights()
    assert llm.engine.runner.graphs is graphs
    model.codes = torch.ones(3)  # new storage: rebuilt
    llm.update_weights()
    assert llm.engine.runner.graphs is not graphs
    del model.codes
    assert llm.generate("hello", sp)[0].token_ids == full_greedy(tiny_model("llama", seed=2), tok.encode("hello"), 6)
    with pytest.raises(LmforgeError, match=r"do not fit the engine's model \(tok_emb.weight has shape"):
        llm.update_weights(tiny_model("llama", d_model=64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    partial = tiny_model("llama", seed=3).state_dict()
    partial.pop("tok_emb.weight")
    with pytest.raises(LmforgeError, match=r"missing \['tok_emb.weight'\].*nothing was changed"):
        llm.update_weights(partial)  # checked whole first: torch would have copied the tensors that fit
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    llm.update_weights(partial, partial=True)  # asked for (an RL policy's trainable tensors): those only
    assert torch.equal(model.tok_emb.weight, before["tok_emb.weight"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in partial.items())
    with pytest.raises(LmforgeError, match="unexpected"):
        llm.update_weights({**partial, "extra.weight": torch.zeros(1)}, partial=True)
    # a compiled module's names: the fix is named (an engine on PolicyWithValue: the prefix 'backbone.' to add)
    compiled = {"_orig_mod." + k: v for k, v in tiny_model("llama", seed=3).state_dict().items()}
    with pytest.raises(LmforgeError, match=r"its names carry the prefix '_orig_mod.': drop it from every name"):
        llm.update_weights(compiled)
    with pytest.raises(LmforgeError, match=r"\); pass a state_dict of the same architecture; nothing was changed$"):
        llm.update_weights({"weight": torch.zeros(1)})  # a one-name dict ending like a model's names: no prefix told
    model.to(torch.float64)
    with pytest.raises(LmforgeError, match="dtype changed from torch.float32 to torch.float64 after the engine"):
        llm.update_weights()
    model.to(torch.float32)
    rid = llm.engine.add_request("busy", sp)
    with pytest.raises(LmforgeError, match="update_weights with 1 request.*abort") as e:
        llm.update_weights()
    assert "\n" not in str(e.value)
    llm.engine.abort(rid)
    llm.update_weights()


# hidden states (EAGLE-style drafters) ----------------------------------------------------------------
def reference_hidden(model, ids: list[int]) -> torch.Tensor:
    """(T, d) the trunk's last hidden states through the final norm, computed by hand."""
    with torch.no_grad():
        h, _ = model.hidden(torch.tensor([ids]))
        return model.final_norm(h)[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_returns_the_final_hidden_states_at_logits_indices(arch):
    from lmforge.model.meta import AttnMetadata

    model = tiny_model(arch)
    ids = torch.randint(1, 250, (1, 12), generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([0, 5, 11])
    logits, hidden = model(ids, meta=AttnMetadata(logits_indices=idx), return_hidden=True)
    assert torch.allclose(hidden[0], reference_hidden(model, ids[0].tolist())[idx], atol=1e-6)
    assert torch.allclose(logits, model(ids)[:, idx], atol=1e-6)
    assert torch.allclose(model.lm_head(hidden), logits, atol=1e-6)  # the LM head's input


class HiddenProbe(NGramDrafter):
    """Prompt lookup that also records the hidden state the engine hands it with each context."""

    uses_hidden_states = True

    def __init__(self):
        super().__init__(vocab_size=257)
        self.seen: list[tuple[list[int], torch.Tensor]] = []

    def propose(self, ctx, k, procs, greedy, gen, hidden=None):
        self.seen.append((list(ctx), hidden.clone()))
        return super().propose(ctx, k, procs, greedy, gen)


@pytest.mark.parametrize("no_spec", [False, True])
def test_drafters_get_the_target_hidden_state_of_their_context(no_spec, tok):
    model = tiny_model("llama", init_std=0.3)
    probe = HiddenProbe()
    engine = Engine(NoCacheSpec(model) if no_spec else model, tok, EngineConfig(block_size=4), draft=probe,
                    num_draft_tokens=3)
    prompts = ["abcabcabcabc", "the cat and the cat and the"]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = run(engine, [(p, sp) for p in prompts])
    for p, o in zip(prompts, outs):
        assert o.token_ids == full_greedy(model, tok.encode(p), 12)
    assert len(probe.seen) > 4 and any(o.metrics["accepted"] > 0 for o in outs)
    for ctx, hidden in probe.seen:  # features at ctx[-2], whose logits gave ctx[-1]
        assert torch.allclose(hidden, reference_hidden(model, ctx[:-1])[-1], atol=1e-5)


def test_a_hidden_state_drafter_needs_a_model_that_returns_them(tok):
    class LogitsOnly(NoCacheSpec):
        def forward(self, ids, positions=None, cache=None, meta=None):
            return self.inner(ids)

    with pytest.raises(LmforgeError, match="no return_hidden option"):
        Engine(LogitsOnly(tiny_model("llama")), tok, draft=HiddenProbe())


# the asyncio front, as a server uses it ---------------------------------------------------------------
def test_async_streams_per_request_and_abort_leaves_the_others_running(tok):
    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def main():
        engine = AsyncEngine(Engine(model, tok, EngineConfig(block_size=4)))
        seen: dict[str, list] = {"a": [], "b": [], "c": []}

        async def consume(rid, prompt):
            async for out in engine.generate(prompt, sp, request_id=rid):
                seen[rid].append(out)
                if rid == "a" and len(out.token_ids) == 3:
                    await engine.abort("b")

        await asyncio.gather(consume("a", "first"), consume("b", "second"), consume("c", "third"))
        return seen, engine.engine

    seen, engine = asyncio.run(main())
    assert [len(o.token_ids) for o in seen["a"]] == list(range(1, 13))  # one output per step, in order
    assert seen["a"][-1].token_ids == full_greedy(model, tok.encode("first"), 12)
    assert seen["c"][-1].token_ids == full_greedy(model, tok.encode("third"), 12) and seen["c"][-1].finished
    b = seen["b"][-1]
    assert b.finished and b.finish_reason == "abort" and 2 <= len(b.token_ids) < 12
    assert b.token_ids == full_greedy(model, tok.encode("second"), 12)[:len(b.token_ids)]
    assert not engine.has_unfinished() and engine.pool.num_used == 0


def test_the_engine_runs_a_model_left_in_train_mode_in_eval_mode(tok):
    """A Trainer sharing the module leaves it in train mode: the engine's steps run without dropout and
    hand the module back in train mode."""
    model = tiny_model("llama", dropout=0.5)
    want = full_greedy(model, tok.encode("hi"), 6)
    llm = LLM(model, tok)
    model.train()
    model.blocks[0].mlp.eval()  # a part the trainer keeps in eval mode stays so
    assert llm.generate("hi", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].token_ids == want
    assert model.training and model.blocks[1].mlp.training and not model.blocks[0].mlp.training


# fused kernels on a view of the model -----------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "mqa-softcap"])
def test_fused_kernel_view_decodes_like_the_plain_model_and_leaves_it_untouched(arch, tok):
    """EngineConfig(fused_kernels=True): forwards run Triton RMSNorm / RoPE / SwiGLU (Triton's interpreter
    on a CPU) on a copy sharing the model's weights; tokens and log-probs equal the plain engine's, the
    caller's modules keep their classes, and an in-place weight update reaches the view."""
    from lmforge.kernels.decode import available

    if not available("cpu"):
        pytest.skip("needs triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")
    model = tiny_model(arch, init_std=0.3)
    classes = [type(m) for m in model.modules()]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    # short prompts of 5 and 14 tokens (2 and 4 blocks): the interpreter runs the fused kernels a program per token
    reqs = [(p, sp) for p in ("first", "the second one")]
    cfg = dict(block_size=4, cuda_graphs=True)
    fused = Engine(model, tok, EngineConfig(**cfg, fused_kernels=True))
    view = fused.runner.model
    assert view is not model and [type(m) for m in model.modules()] == classes
    assert any(type(m).__name__ == "FusedRMSNorm" for m in view.modules())
    assert all(a is b for a, b in zip(view.parameters(), model.parameters()))  # shared, not copied
    want = run(Engine(model, tok, EngineConfig(**cfg, fused_kernels=False)), reqs)
    for got, ref in zip(run(fused, reqs), want):
        assert got.token_ids == ref.token_ids and got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    sgd_step(model)
    fused.update_weights()
    want = run(Engine(copy.deepcopy(model).eval(), tok, EngineConfig(**cfg, fused_kernels=False)), reqs)
    for got, ref in zip(run(fused, reqs), want):
        assert got.token_ids == ref.token_ids and got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)



def test_fused_kernel_view_keeps_lora_adapters(tok):
    """The fused view swaps norms, SwiGLU and RoPE but calls the projections as modules, so an unmerged LoRA
    adapter (B A non-zero) is in its forwards: tokens and log-probs equal the plain engine's on the same model."""
    from lmforge.adapt.lora import LoRAConfig, LoRALinear, apply_lora
    from lmforge.kernels.decode import available

    if not available("cpu"):
        pytest.skip("needs triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")
    model = apply_lora(tiny_model("llama", init_std=0.3), LoRAConfig(r=2, alpha=4, targets=("wq", "up", "down")))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.5)
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0)
    reqs = [(p, sp) for p in ("first", "the second one")]  # short: see the test above
    cfg = dict(block_size=4, cuda_graphs=True, kernel_step=False)
    fused = Engine(model, tok, EngineConfig(**cfg, fused_kernels=True))
    assert any(type(m).__name__ == "FusedSwiGLUMLP" for m in fused.runner.model.modules())
    want = run(Engine(model, tok, EngineConfig(**cfg, fused_kernels=False)), reqs)
    for got, ref in zip(run(fused, reqs), want):
        assert got.token_ids == ref.token_ids and got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)

def test_fused_kernels_default_off_on_a_cpu_and_refused_where_they_cannot_run(tok, monkeypatch):
    model = tiny_model("llama")
    assert Engine(model, tok, EngineConfig()).runner.model is model
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(LmforgeError, match="fused_kernels=True but the Triton kernels cannot run on this device "
                                           r"\(each Triton kernel needs a CUDA GPU and Triton .*got device cpu\)"):
        Engine(model, tok, EngineConfig(fused_kernels=True))


def test_block_accounting_survives_prefix_cache_resets(tok):
    """update_weights resets the prefix cache every RL iteration: idle cached blocks go back to the fresh
    list empty, so the tokens-held count (kv utilization) never drifts."""
    model = tiny_model("llama")
    engine = Engine(model, tok, EngineConfig(block_size=4, num_kv_tokens=64))  # 16 blocks: every one reused
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    held = []
    for _ in range(4):
        for prompt in ("a prompt that fills several blocks", "another prompt, also long"):
            engine.add_request(prompt, sp)
            while engine.has_unfinished():
                engine.step()
                held.append(engine.pool.tokens_held)
            assert engine.pool.tokens_held == 0
        assert engine.pool.idle
        engine.update_weights()
    assert min(held) >= 0 and 0 < engine.stats()["kv_utilization_at_peak"] <= 1


def test_score_refuses_what_is_not_a_pair(tok):
    llm = LLM(tiny_model("llama"), tok)
    with pytest.raises(LmforgeError, match=r"pair 1 must be \(context, continuation\), got 'ab'"):
        llm.score([("a", "b"), "ab"])


def test_the_fused_view_generates_in_eval_mode_whatever_the_model_mode(tok):
    from lmforge.kernels.decode import available

    if not available("cpu"):
        pytest.skip("needs triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")
    model = tiny_model("llama", dropout=0.5).train()  # a Trainer's model, mid-training
    engine = Engine(model, tok, EngineConfig(fused_kernels=True))
    assert not engine.runner.model.training and model.training
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert run(engine, [("same prompt", sp)])[0].token_ids == run(engine, [("same prompt", sp)])[0].token_ids


@pytest.mark.parametrize("draft", [None, "ngram"])
def test_processed_logprobs_are_those_of_the_distribution_sampled_from(tok, draft):
    """logprobs_mode='processed' (RL's behaviour policy): log_softmax of the logits after temperature and
    top-k, by hand over one full forward; a raw request in the same batch keeps the model's log-probs."""
    from lmforge.infer.processors import build_processors, apply_processors

    model = tiny_model("llama")
    engine = Engine(model, tok, draft=draft, num_draft_tokens=3)
    common = dict(top_k=5, max_tokens=8, ignore_eos=True, logprobs=7)
    prompts = ["abcabcab", "hello world", "greedy one"]
    params = [SamplingParams(**common, temperature=0.7, seed=1, logprobs_mode="processed"),
              SamplingParams(**common, temperature=0.7, seed=2),
              SamplingParams(**common, temperature=0, logit_bias={7: 2.0}, logprobs_mode="processed")]
    for out, p, sp in zip(run(engine, list(zip(prompts, params))), prompts, params):
        c, ids = out.outputs[0], tok.encode(p)
        logits = full_logprobs(model, ids + c.token_ids)[len(ids) - 1:-1]  # log_softmax keeps the ranking
        if sp.logprobs_mode == "processed" and not sp.greedy:  # greedy rows report raw log-probs either way
            logits = apply_processors(build_processors(sp), logits, None).log_softmax(-1)
            # the top-k filter's law: the 5 tokens it kept, not 2 more it gave no mass (-inf)
            assert all(len(t) == 5 for t in c.top_logprobs)
        else:
            assert all(len(t) == 7 for t in c.top_logprobs)
        got = torch.tensor(c.logprobs)
        assert torch.allclose(got, logits.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0], atol=1e-4)
        for top, row in zip(c.top_logprobs, logits):
            vals, idx = row.topk(2)
            assert all(abs(top[i] - v) < 1e-4 for i, v in zip(idx.tolist(), vals.tolist()))
    with pytest.raises(Exception, match="logprobs_mode"):
        SamplingParams(logprobs_mode="scaled")
    with pytest.raises(Exception, match="none are asked for: set logprobs=0"):  # it would change nothing
        SamplingParams(logprobs_mode="processed")


def test_switching_lora_adapters_off_reaches_the_engines_fast_paths(tok):
    """adapters_disabled (a LoRA run's reference, KL to the base) changes the function without touching a
    weight: the engine's backends built with the adapters on (here the fused view, a copy of the modules;
    on a GPU also captured graphs) are rebuilt, so it generates from the base, and from the policy after."""
    from lmforge.adapt.lora import LoRAConfig, LoRALinear, adapters_disabled, apply_lora
    from lmforge.kernels.decode import available

    if not available("cpu"):
        pytest.skip("needs triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")
    base = tiny_model("llama", init_std=0.3)
    policy = apply_lora(copy.deepcopy(base), LoRAConfig(r=2, alpha=8, targets=("wq", "wv", "up")))
    with torch.no_grad():
        for m in policy.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.5)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    reqs = [("first prompt", sp)]
    cfg = dict(block_size=4, cuda_graphs=True, fused_kernels=True)
    engine = Engine(policy, tok, EngineConfig(**cfg))
    adapted, plain = run(engine, reqs)[0], run(Engine(base, tok, EngineConfig(**cfg)), reqs)[0]
    assert adapted.outputs[0].logprobs != pytest.approx(plain.outputs[0].logprobs, abs=1e-3)
    with adapters_disabled(policy):
        off = run(engine, reqs)[0]
        left = engine.add_request("left running", sp)
    assert off.token_ids == plain.token_ids
    assert off.outputs[0].logprobs == pytest.approx(plain.outputs[0].logprobs, abs=1e-4)
    with pytest.raises(LmforgeError, match="switched on or off .* while 1 request"):
        engine.step()  # the adapters came back on under a request computed with them off
    engine.abort(left)
    again = run(engine, reqs)[0]
    assert again.outputs[0].logprobs == pytest.approx(adapted.outputs[0].logprobs, abs=1e-5)


def test_an_autocast_around_the_engine_does_not_reach_it(tok):
    """A Trainer's evaluation (or an RL source's begin_step) runs under bf16 autocast: the engine generates
    in the model's own dtype anyway, so its log-probs do not depend on where it is called from."""
    model = tiny_model("llama", init_std=0.3)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    plain = LLM(model, tok).generate("the dog", sp)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = LLM(model, tok).generate("the dog", sp)[0]
    assert inside.token_ids == plain.token_ids and inside.logprobs == plain.logprobs
