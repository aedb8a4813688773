"""Data made by sampling: sequence-level / verifier-filtered distillation records, verifier-made
preference pairs, KTO records, and Constitutional AI's critique-revise and AI-preference steps, with
scripted models behind the LLM.generate front door (and once with the real engine on a tiny model)."""

import dataclasses
import math

import pytest
import torch

from lmforge.align.cai import CONSTITUTION, ai_preferences, sl_cai_records
from lmforge.align.sampled import chat_prompt, conversation, distillation_records, kto_records, preference_pairs
from lmforge.errors import ConfigError
from lmforge.infer.chat_template import get_template
from lmforge.infer.outputs import CompletionOutput, RequestOutput
from lmforge.infer.sampling import SamplingParams
from lmforge.tasks import TASKS
from lmforge.tokenizer.load import load_tokenizer


class Scripted:
    """An LLM stand-in: reply(prompt, sample_index) -> text, or -> {token_id: logprob} for judge calls. chat
    encodes conversations with the template, as LLM.chat does; a text sample's tokens end with end-of-text,
    as an engine sample that stopped on it."""

    def __init__(self, reply):
        self.reply, self.tokenizer, self.calls = reply, load_tokenizer("byte"), []

    def chat(self, conversations, params, template="plain"):
        return self.generate([get_template(template).encode(self.tokenizer, c)[0] for c in conversations], params)

    def generate(self, prompts, params):
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        prompts = [self.tokenizer.decode(p) for p in ids]
        self.calls.append((prompts, params))
        outs = []
        for p, p_ids in zip(prompts, ids):
            samples = []
            for j in range(params.n):
                r = self.reply(p, j)
                top = [r] if isinstance(r, dict) else None
                tokens = [] if top else self.tokenizer.encode(r) + [self.tokenizer.eot_id]
                samples.append(CompletionOutput(j, "" if top else r, tokens, "stop", top_logprobs=top))
            outs.append(RequestOutput(p, p_ids, samples))
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
    assert len(plain) == 6 and stats["rejected_by_verifier"] == 0  # repeated samples count once
    assert stats["duplicates"] == 6
    kept, stats = distillation_records(llm, exs, params, task=task, per_prompt=5)
    assert [r["completion"] for r in kept] == [[{"role": "assistant", "content": exs[i].solution}] for i in (0, 1)]
    assert stats == {"prompts": 4, "samples": 12, "truncated": 0, "duplicates": 6, "rejected_by_verifier": 4,
                     "prompts_without_output": 2, "records": 2}
    assert kept[0]["prompt"] == [{"role": "user", "content": exs[0].prompt}]
    tok = llm.tokenizer
    assert kept[0]["prompt_ids"] == tok.encode("User: " + exs[0].prompt + "\nAssistant: ")
    assert kept[0]["completion_ids"] == tok.encode(exs[0].solution) + [tok.eot_id]
    assert kept[0]["finish_reason"] == "stop"


def test_preference_pairs_and_kto_records_follow_the_verifier():
    task = TASKS["sort"]()
    exs, llm = _task_model(task, lambda i: [{0}, {0, 1, 2}, set(), {1}][i])
    pairs, stats = preference_pairs(llm, task, exs, SamplingParams(n=3, seed=0))
    assert stats == {"prompts": 4, "samples": 12, "truncated": 0, "duplicates": 6, "correct": 5, "all_correct": 1,
                     "all_wrong": 1, "prompts_without_output": 0, "pairs": 2, "from_reference": 0}
    for p in pairs:
        ex = next(e for e in exs if conversation(e) == p["prompt"])
        assert task.verify(ex, p["chosen"][0]["content"]) and not task.verify(ex, p["rejected"][0]["content"])
        assert p["chosen_ids"] == llm.tokenizer.encode(p["chosen"][0]["content"]) + [llm.tokenizer.eot_id]
    with_ref, stats = preference_pairs(llm, task, exs, SamplingParams(n=3, seed=0), reference_fallback=True)
    assert stats["pairs"] == 3 and stats["from_reference"] == 1 and stats["all_wrong"] == 0
    assert with_ref[1]["chosen"] == [{"role": "assistant", "content": exs[2].solution}]
    assert "chosen_ids" not in with_ref[1] and "rejected_ids" in with_ref[1]  # the reference is text only
    recs, stats = kto_records(llm, task, exs, SamplingParams(n=3, seed=0))
    assert stats == {"prompts": 4, "samples": 12, "truncated": 0, "duplicates": 6, "records": 6, "desirable": 3,
                     "undesirable": 3}  # distinct samples only
    with pytest.raises(ConfigError, match="n >= 2"):
        preference_pairs(llm, task, exs, SamplingParams(n=1))



def test_preference_pairs_per_prompt_are_distinct():
    """pairs_per_prompt draws distinct (chosen, rejected) pairs: a prompt with one right and one wrong sample gives
    one pair, not the same pair repeated (which would weigh it twice); one right and three wrong give three."""
    task = TASKS["sort"]()
    exs, llm = _task_model(task, lambda i: [{0}, {0, 1}, set(), {1}][i])
    params = SamplingParams(n=2, seed=0)

    def distinct_answers(reply):  # sample j of a prompt: its own text (the wrong answer made distinct per sample)
        return lambda prompt, j: reply(prompt, j) + (f" {j}" if reply(prompt, j) == "Answer: -1" else "")
    llm.reply = distinct_answers(llm.reply)
    pairs, stats = preference_pairs(llm, task, exs, params, pairs_per_prompt=3)
    keys = [(p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs]
    assert len(keys) == len(set(keys)) == stats["pairs"] == 2  # prompts 0 and 3: one right, one wrong sample each
    exs, llm = _task_model(task, lambda i: {0})
    llm.reply = distinct_answers(llm.reply)
    three = preference_pairs(llm, task, exs[:1], SamplingParams(n=4, seed=0), pairs_per_prompt=9)[0]
    assert len({(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in three}) == len(three) == 3
    with pytest.raises(ConfigError, match="pairs_per_prompt=0 must be an int >= 1"):
        preference_pairs(llm, task, exs, params, pairs_per_prompt=0)


def test_preference_pairs_through_the_real_engine():
    from lmforge.infer.llm import LLM
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=257, d_model=16, n_layers=1, n_heads=2, max_seq_len=128))
    llm = LLM(model, load_tokenizer("byte"))
    task = TASKS["count"]()
    exs = task.examples("test", 3, seed=0)
    pairs, stats = preference_pairs(llm, task, exs, SamplingParams(n=4, max_tokens=8, seed=1), keep_truncated=True)
    # an untrained model is never right: every prompt is counted as all-wrong, none silently lost
    assert stats["samples"] == 12 and stats["all_wrong"] + stats["all_correct"] + stats["pairs"] == 3
    _, stats = preference_pairs(llm, task, exs, SamplingParams(n=4, max_tokens=8, seed=1))
    assert stats["samples"] == 12 and stats["all_wrong"] + stats["all_correct"] + stats["pairs"] + \
        stats["prompts_without_output"] == 3 and stats["truncated"] > 0


def test_sl_cai_critique_then_revision_against_principles():
    def reply(prompt, j):
        last = prompt.rsplit("User: ", 1)[-1]
        if last.startswith("Critique request"):
            return "critique: too rude"
        if last.startswith("Revision request"):
            return "revised " + prompt.count("Revision request").__str__()
        return " initial answer\n"
    llm = Scripted(reply)
    recs = sl_cai_records(llm, ["q1", "q2"], SamplingParams(temperature=0.0), rounds=2, seed=0)
    assert [r["completion"] for r in recs] == [[{"role": "assistant", "content": "revised 1"}]] * 2
    assert recs[0]["prompt"] == [{"role": "user", "content": "q1"}]
    assert recs[0]["prompt_ids"] == llm.tokenizer.encode("User: q1\nAssistant: ")
    assert recs[0]["completion_ids"] == llm.tokenizer.encode("revised 1") + [llm.tokenizer.eot_id]
    assert recs[0]["initial"] == " initial answer\n"  # kept as generated, not stripped
    assert recs[0]["critiques"] == ["critique: too rude"] * 2
    assert len(llm.calls) == 1 + 2 * 2  # one batched call per step
    revise_prompt = llm.calls[2][0][0]
    assert "Assistant:  initial answer\n\n" in revise_prompt and "Assistant: critique: too rude" in revise_prompt
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
    assert all(r["chosen"] == [{"role": "assistant", "content": "good"}] for r in recs)
    assert all(r["rejected"] == [{"role": "assistant", "content": "bad"}] for r in recs)
    assert recs[0]["prompt"] == [{"role": "user", "content": "q1"}]
    assert recs[0]["p_chosen"] == pytest.approx(0.8)
    prompts, params = llm.calls[0]
    assert params.max_tokens == 1 and params.temperature == 0 and len(prompts) == 6


# the real engine under chatml: a BPE tokenizer with its markers as special tokens, and a tiny model whose
# answers a logits processor scripts token by token
@pytest.fixture(scope="module")
def chatml():
    from lmforge.infer.engine import EngineConfig
    from lmforge.infer.llm import LLM
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.train import train_bpe

    tok = train_bpe(iter(["user assistant hello there Answer: 12 " * 30]), 320,
                    special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], progress=False, workers=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, max_seq_len=256))
    return LLM(model, tok, config=EngineConfig(num_kv_tokens=4096))


def scripted(script: list[int], **kw) -> SamplingParams:
    """Greedy sampling that writes `script` (then its last token forever)."""
    def force(out_ids, logits):
        z = torch.full_like(logits, float("-inf"))
        z[script[min(len(out_ids), len(script) - 1)]] = 0.0
        return z
    return SamplingParams(temperature=0.0, logits_processors=(force,), **kw)


def _fake_turn(tok):
    """An answer, its end of turn, then a next user turn the model writes itself."""
    return tok.encode("Answer: 7<|im_end|>\n<|im_start|>user\nfake user turn<|im_end|>") + [tok.eot_id]


def test_samples_end_with_the_assistant_turn_as_llm_chat_ends_them(chatml):
    """The template's end-of-turn markers stop every sample (LLM.chat's stop / stop_token_ids): the records hold
    the answer, not the fake user turn after it, and their tokens end on <|im_end|>."""
    tok = chatml.tokenizer
    params = scripted(_fake_turn(tok), max_tokens=40)
    assert chatml.chat([{"role": "user", "content": "hi"}], params, template="chatml")[0].text == "Answer: 7"
    im_end = tok.encode("<|im_end|>")
    recs = sl_cai_records(chatml, ["hi"], params, template="chatml")
    assert recs[0]["initial"] == "Answer: 7" and recs[0]["critiques"] == ["Answer: 7"]
    assert recs[0]["completion"] == [{"role": "assistant", "content": "Answer: 7"}]
    assert recs[0]["completion_ids"] == tok.encode("Answer: 7") + im_end
    ex = TASKS["arithmetic"]().examples("train", 1, seed=0)[0]
    recs, stats = distillation_records(chatml, [ex], params, template="chatml")
    assert recs[0]["completion"] == [{"role": "assistant", "content": "Answer: 7"}]
    assert recs[0]["completion_ids"] == tok.encode("Answer: 7") + im_end and stats["records"] == 1


def test_sampled_records_train_what_was_generated_in_its_context(chatml):
    """The prompt the SFT / DPO data path builds from a record is the context the sample was generated in
    (the templated user turn), and the trained tokens are the sampled ones: for SL-CAI and distillation
    records, and an AI-preference pair of sampled answers."""
    from lmforge.align.data import Encoder

    tok = chatml.tokenizer
    enc = Encoder(tok, "chatml")
    params = scripted(_fake_turn(tok), max_tokens=40)
    context = get_template("chatml").encode(tok, [{"role": "user", "content": "hello"}])[0]
    out = chatml.chat([{"role": "user", "content": "hello"}], params, template="chatml")[0]
    assert out.prompt_token_ids == context
    rec = sl_cai_records(chatml, ["hello"], params, template="chatml")[0]
    ids, mask = enc.prompt_completion(rec["prompt"], rec["completion"], "x", ids=(rec["prompt_ids"],
                                                                                  rec["completion_ids"]))
    n = len(out.outputs[0].token_ids)
    assert ids == context + out.outputs[0].token_ids and mask == [False] * len(context) + [True] * n
    text_ids, _ = enc.prompt_completion(rec["prompt"], rec["completion"], "x")  # the text alone: the same context
    assert text_ids[:len(context)] == context and tok.decode(text_ids[len(context):]) == "Answer: 7<|im_end|>\n"
    ex = TASKS["arithmetic"]().examples("train", 1, seed=0)[0]
    rec = distillation_records(chatml, [ex], params, template="chatml")[0][0]
    want = get_template("chatml").encode(tok, [{"role": "user", "content": ex.prompt}])[0]
    assert rec["prompt_ids"] == want and rec["prompt"] == [{"role": "user", "content": ex.prompt}]


def test_sampled_tokens_are_trained_as_they_are(chatml, tmp_path):
    """A sample whose tokens the tokenizer would split otherwise (single characters where it has merges):
    the SFT example holds the sampled ids, not a re-encoding of the text; nothing is appended after the
    <|im_end|> that ended it. A record sampled under another template is refused."""
    import json

    from lmforge.align.data import Encoder, load_records
    from lmforge.errors import DataError

    tok = chatml.tokenizer
    chars = [tok.encode(c)[0] for c in "hello there"]
    assert tok.encode("hello there") != chars  # the tokenizer merges them
    im_end = tok.encode("<|im_end|>")[0]
    ex = TASKS["arithmetic"]().examples("train", 1, seed=0)[0]
    recs, _ = distillation_records(chatml, [ex], scripted(chars + [im_end], max_tokens=40), template="chatml")
    assert recs[0]["completion_ids"] == chars + [im_end]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(recs[0]) + "\n")
    (ids, mask), = load_records((str(path),), Encoder(tok, "chatml"), "sft", 128, "raise")[0]
    n = len(recs[0]["prompt_ids"])
    assert ids == recs[0]["prompt_ids"] + chars + [im_end] and mask == [False] * n + [True] * (len(chars) + 1)
    with pytest.raises(DataError, match="prompt_ids.*sampled under another template"):
        load_records((str(path),), Encoder(tok, "plain"), "sft", 128, "raise")


def test_samples_cut_at_max_tokens_are_dropped_and_counted_or_kept_without_an_end(chatml):
    """finish_reason 'length': no complete answer. Dropped by default (stats["truncated"]); keep_truncated
    keeps it with its finish_reason, and its example ends where the sample was cut (no end appended)."""
    from lmforge.align.data import Encoder

    tok = chatml.tokenizer
    exs = TASKS["arithmetic"]().examples("train", 2, seed=0)
    params = scripted(tok.encode("hello there hello there"), max_tokens=3)
    recs, stats = distillation_records(chatml, exs, params, template="chatml")
    assert recs == [] and stats["truncated"] == 2 and stats["samples"] == 2 and stats["records"] == 0
    recs, stats = distillation_records(chatml, exs, params, template="chatml", keep_truncated=True)
    assert stats["truncated"] == 2 and [r["finish_reason"] for r in recs] == ["length", "length"]
    ids, mask = Encoder(tok, "chatml").prompt_completion(recs[0]["prompt"], recs[0]["completion"], "x",
                                                         ids=(recs[0]["prompt_ids"], recs[0]["completion_ids"]))
    assert ids[-3:] == tok.encode("hello there hello there")[:3] and sum(mask) == 3
    pairs, stats = preference_pairs(chatml, TASKS["arithmetic"](), exs, dataclasses.replace(params, n=2))
    assert stats["truncated"] == 4 and stats["samples"] == 4 and stats["prompts_without_output"] == 2 and pairs == []


def test_ai_preferences_read_the_option_tokens_that_follow_the_open_parenthesis():
    """A SentencePiece-style judge continues "The answer is: (" with "A", not with "▁A" (what "A" encodes to as a
    text of its own, Llama 2's tokenizers): the options' probabilities are read from the tokens it writes there."""
    pytest.importorskip("tokenizers")
    from lmforge.tokenizer.sentencepiece import SentencePieceBPE
    from tests.tokenizer.sp_files import sp_doc

    tok = SentencePieceBPE(sp_doc())
    prompt = tok.encode("The answer is: (")
    A, B = (tok.encode("The answer is: (" + x)[len(prompt)] for x in ("A", "B"))
    assert tok.encode("A")[0] != A  # "▁A": a token the judge does not write after "("

    def reply(prompt, j):
        a = prompt.split("(A) ")[1].split("\n")[0]
        p_a = 0.8 if a == "good" else 0.2
        return {A: math.log(p_a), B: math.log(1 - p_a), tok.encode("A")[0]: -9.0}
    llm = Scripted(reply)
    llm.tokenizer = tok
    recs, stats = ai_preferences(llm, ["q1", "q2"], [("good", "bad"), ("bad", "good")])
    assert stats == {"pairs": 2, "labelled": 2, "ties": 0}
    assert [r["chosen"][0]["content"] for r in recs] == ["good", "good"]
    assert [r["p_chosen"] for r in recs] == pytest.approx([0.8, 0.8])
