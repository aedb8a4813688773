"""Data made by sampling: sequence-level / verifier-filtered distillation records, verifier-made
preference pairs, KTO records, and Constitutional AI's critique-revise and AI-preference steps, with
scripted models behind the LLM.generate front door (and once with the real engine on a tiny model)."""

import math

import pytest
import torch

from lmforge.align.cai import CONSTITUTION, ai_preferences, sl_cai_records
from lmforge.align.sampled import chat_prompt, distillation_records, kto_records, preference_pairs
from lmforge.errors import ConfigError
from lmforge.infer.outputs import CompletionOutput, RequestOutput
from lmforge.infer.sampling import SamplingParams
from lmforge.tasks import TASKS
from lmforge.tokenizer.load import load_tokenizer


class Scripted:
    """An LLM stand-in: reply(prompt, sample_index) -> text, or -> {token_id: logprob} for judge calls."""

    def __init__(self, reply):
        self.reply, self.tokenizer, self.calls = reply, load_tokenizer("byte"), []

    def generate(self, prompts, params):
        prompts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts]  # text or token ids
        self.calls.append((prompts, params))
        outs = []
        for p in prompts:
            samples = []
            for j in range(params.n):
                r = self.reply(p, j)
                top = [r] if isinstance(r, dict) else None
                samples.append(CompletionOutput(j, "" if top else r, [], "stop", top_logprobs=top))
            outs.append(RequestOutput(p, [], samples))
        return outs


def _task_model(task, right):
    """Answers correctly on samples j in right(example_index), wrongly otherwise."""
    exs = task.examples("test", 4, seed=0)
    by_prompt = {chat_prompt()(e): (i, e) for i, e in enumerate(exs)}

    def reply(prompt, j):
        i, e = by_prompt[prompt]
        return e.solution if j in right(i) else "Answer: -1"
    return exs, Scripted(reply)


def test_distillation_records_keep_verified_outputs_only():
    task = TASKS["arithmetic"]()
    exs, llm = _task_model(task, lambda i: {0, 1} if i < 2 else set())
    params = SamplingParams(n=3, max_tokens=32, seed=0)
    plain, stats = distillation_records(llm, exs, params, per_prompt=3)
    assert len(plain) == 12 and stats["rejected_by_verifier"] == 0
    kept, stats = distillation_records(llm, exs, params, task=task, per_prompt=5)
    assert [r["completion"] for r in kept] == [exs[0].solution] * 2 + [exs[1].solution] * 2
    assert stats == {"prompts": 4, "samples": 12, "rejected_by_verifier": 8, "prompts_without_output": 2,
                     "records": 4}
    assert kept[0]["prompt"] == "User: " + exs[0].prompt + "\nAssistant: "


def test_preference_pairs_and_kto_records_follow_the_verifier():
    task = TASKS["sort"]()
    exs, llm = _task_model(task, lambda i: [{0}, {0, 1, 2}, set(), {1}][i])
    pairs, stats = preference_pairs(llm, task, exs, SamplingParams(n=3, seed=0))
    assert stats == {"prompts": 4, "samples": 12, "correct": 5, "all_correct": 1, "all_wrong": 1, "pairs": 2,
                     "from_reference": 0}
    for p in pairs:
        ex = next(e for e in exs if chat_prompt()(e) == p["prompt"])
        assert task.verify(ex, p["chosen"]) and not task.verify(ex, p["rejected"])
    with_ref, stats = preference_pairs(llm, task, exs, SamplingParams(n=3, seed=0), reference_fallback=True)
    assert stats["pairs"] == 3 and stats["from_reference"] == 1 and stats["all_wrong"] == 0
    assert with_ref[1]["chosen"] == exs[2].solution
    recs, stats = kto_records(llm, task, exs, SamplingParams(n=3, seed=0))
    assert stats == {"prompts": 4, "records": 6, "desirable": 3, "undesirable": 3}  # distinct samples only
    with pytest.raises(ConfigError, match="n >= 2"):
        preference_pairs(llm, task, exs, SamplingParams(n=1))


def test_preference_pairs_through_the_real_engine():
    from lmforge.infer.llm import LLM
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=257, d_model=16, n_layers=1, n_heads=2, max_seq_len=128))
    llm = LLM(model, load_tokenizer("byte"))
    task = TASKS["count"]()
    exs = task.examples("test", 3, seed=0)
    pairs, stats = preference_pairs(llm, task, exs, SamplingParams(n=4, max_tokens=8, seed=1))
    # an untrained model is never right: every prompt is counted as all-wrong, none silently lost
    assert stats["samples"] == 12 and stats["all_wrong"] + stats["all_correct"] + stats["pairs"] == 3


def test_sl_cai_critique_then_revision_against_principles():
    def reply(prompt, j):
        last = prompt.rsplit("User: ", 1)[-1]
        if last.startswith("Critique request"):
            return "critique: too rude"
        if last.startswith("Revision request"):
            return "revised " + prompt.count("Revision request").__str__()
        return "initial answer"
    llm = Scripted(reply)
    recs = sl_cai_records(llm, ["q1", "q2"], SamplingParams(temperature=0.0), rounds=2, seed=0)
    assert [r["completion"] for r in recs] == ["revised 1", "revised 1"]
    assert recs[0]["initial"] == "initial answer" and recs[0]["critiques"] == ["critique: too rude"] * 2
    assert len(llm.calls) == 1 + 2 * 2  # one batched call per step
    revise_prompt = llm.calls[2][0][0]
    assert "Assistant: initial answer" in revise_prompt and "Assistant: critique: too rude" in revise_prompt
    assert any(p.revision in revise_prompt for p in CONSTITUTION)


def test_ai_preferences_average_both_orders():
    """The judge likes 'good' with P = 0.8 in either position but also has a position bias toward (A)."""
    A, B = ord("A"), ord("B")

    def reply(prompt, j):
        a = prompt.split("(A) ")[1].split("\n")[0]
        p_a = (0.8 if a == "good" else 0.2) if "q-bias" not in prompt else 0.9  # q-bias: always says (A)
        return {A: math.log(p_a), B: math.log(1 - p_a), ord("x"): -5.0}
    llm = Scripted(reply)
    recs, stats = ai_preferences(llm, ["q1", "q2", "q-bias"], [("good", "bad"), ("bad", "good"), ("u", "v")])
    assert stats == {"pairs": 3, "labelled": 2, "ties": 1}  # pure position bias cancels to a tie
    assert all(r["chosen"] == "good" and r["rejected"] == "bad" for r in recs)
    assert recs[0]["p_chosen"] == pytest.approx(0.8)
    prompts, params = llm.calls[0]
    assert params.max_tokens == 1 and params.temperature == 0 and len(prompts) == 6
