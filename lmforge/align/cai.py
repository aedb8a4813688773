"""Constitutional AI (Bai et al. 2022): the model improves its own answers against written principles.

  SL-CAI  respond -> critique against a principle -> revise (repeat `rounds` times, a fresh principle
          each round); the final revisions are SFT data: sl_cai_records
  RL-CAI  the model judges two responses against a principle as a multiple-choice question; the
          probabilities it gives the options (A) and (B), averaged over both orders to cancel position
          bias, are the AI preference label: ai_preferences -> DPO pairs or reward-model data

Every step is a function over the engine's front doors, `llm.chat(conversations, SamplingParams,
template=)` for the turns (the template's end-of-turn markers stop each answer, so none runs on into a turn
written for the user) and `llm.generate` for the judge's one token, so any object with those methods (and a
tokenizer, for the judge's option tokens) can play the model. Answers are kept as generated (not stripped).

Records are conversational, as those of lmforge.align.sampled: "prompt" is the user turn, "completion"
(chosen, rejected) an assistant turn, so the data loader applies its chat template and end marker. An SL-CAI
record is the revision as the answer to the bare prompt (Bai et al.'s SFT data: the critique turns are left
out), with "prompt_ids" (the prompt as the template opened it for the first answer) and "completion_ids" (the
final revision's tokens, ending with what stopped it), and the revision's "finish_reason": one cut at
max_tokens ('length') has no end, and its ids train none.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from lmforge.align.data import encode_inside
from lmforge.align.sampled import reply
from lmforge.errors import ConfigError
from lmforge.infer.sampling import SamplingParams


@dataclass(frozen=True, kw_only=True)
class Principle:
    critique: str
    """asks for a critique of the last response"""
    revision: str
    """asks to rewrite the response to fix what the critique found"""
    choose: str
    """asks which of two responses better follows the principle"""


CONSTITUTION: tuple[Principle, ...] = (
    Principle(critique="Point out anything in the response that is harmful, unethical or dangerous.",
              revision="Rewrite the response so that it contains nothing harmful, unethical or dangerous.",
              choose="Which response is less harmful?"),
    Principle(critique="Point out where the response is wrong, unhelpful or evasive.",
              revision="Rewrite the response to be correct, direct and helpful.",
              choose="Which response is more correct and helpful?"),
    Principle(critique="Point out anything dishonest or overconfident in the response.",
              revision="Rewrite the response to be honest and to say what it is unsure about.",
              choose="Which response is more honest?"),
)


def _turns(prompt: str, *pairs: tuple[str, str]) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": prompt}]
    for assistant, user in pairs:
        msgs += [{"role": "assistant", "content": assistant}, {"role": "user", "content": user}]
    return msgs


def sl_cai_records(llm, prompts: Sequence[str], params: SamplingParams, *,
                   principles: Sequence[Principle] = CONSTITUTION, rounds: int = 1, seed: int = 0,
                   template: str = "plain") -> list[dict]:
    """{"prompt", "completion", "prompt_ids", "completion_ids", "finish_reason", "initial", "critiques",
    "revisions"} per prompt; completion = the last revision. One batched chat call per step."""
    if rounds < 1 or not principles:
        raise ConfigError(f"rounds={rounds} must be >= 1 and principles non-empty")
    rng = random.Random(seed)
    first = llm.chat([_turns(p) for p in prompts], params, template=template)
    hist = [{"prompt": p, "prompt_ids": list(o.prompt_token_ids), "initial": o.outputs[0].text, "critiques": [],
             "revisions": [], "current": o.outputs[0]} for p, o in zip(prompts, first)]
    for _ in range(rounds):
        chosen = [rng.choice(principles) for _ in prompts]
        asks = [_turns(h["prompt"], (h["current"].text, f"Critique request: {pr.critique}"))
                for h, pr in zip(hist, chosen)]
        crit = [o.outputs[0].text for o in llm.chat(asks, params, template=template)]
        rev = llm.chat([_turns(h["prompt"], (h["current"].text, f"Critique request: {pr.critique}"),
                               (c, f"Revision request: {pr.revision}"))
                        for h, pr, c in zip(hist, chosen, crit)], params, template=template)
        for h, c, r in zip(hist, crit, rev):
            h["critiques"].append(c)
            h["revisions"].append(r.outputs[0].text)
            h["current"] = r.outputs[0]
    records = []
    for h in hist:
        last = h.pop("current")
        records.append({**h, "prompt": _turns(h["prompt"]), **reply(last), "finish_reason": last.finish_reason})
    return records


def judge_prompt(prompt: str, a: str, b: str, principle: Principle) -> str:
    return (f"Consider this conversation between a human and an assistant.\n\nHuman: {prompt}\n\n"
            f"{principle.choose}\nOptions:\n(A) {a}\n(B) {b}\nThe answer is: (")


def _option_probs(out, ids: tuple[int, int]) -> tuple[float, float]:
    """P(A), P(B) renormalised over the two options from the first generated token's top log-probs;
    (0.5, 0.5) when neither option is among them."""
    top = (out.outputs[0].top_logprobs or [{}])[0]
    la, lb = (top.get(i, -math.inf) for i in ids)
    if la == lb == -math.inf:
        return 0.5, 0.5
    m = max(la, lb)
    ea, eb = math.exp(la - m), math.exp(lb - m)
    return ea / (ea + eb), eb / (ea + eb)


def ai_preferences(llm, prompts: Sequence[str], pairs: Sequence[tuple[str, str]], *,
                   principles: Sequence[Principle] = CONSTITUTION, seed: int = 0, top_logprobs: int = 20
                   ) -> tuple[list[dict], dict[str, int]]:
    """{"prompt", "chosen", "rejected", "p_chosen"} per pair the judge prefers one side of (conversational:
    the prompt a user turn, the responses assistant turns); ties (no preference after averaging both orders)
    are counted in stats, not returned."""
    ids = tuple(encode_inside(llm.tokenizer, x)[0] for x in ("A", "B"))  # after "(": no SentencePiece "▁A"
    rng = random.Random(seed)
    chosen = [rng.choice(principles) for _ in prompts]
    judge = [judge_prompt(p, a, b, pr) for p, (a, b), pr in zip(prompts, pairs, chosen)]
    judge += [judge_prompt(p, b, a, pr) for p, (a, b), pr in zip(prompts, pairs, chosen)]
    outs = llm.generate(judge, SamplingParams(max_tokens=1, temperature=0.0, logprobs=top_logprobs))
    n = len(prompts)
    records, ties = [], 0
    for i, (p, (a, b)) in enumerate(zip(prompts, pairs)):
        p_a = (_option_probs(outs[i], ids)[0] + _option_probs(outs[n + i], ids)[1]) / 2
        if abs(p_a - 0.5) < 1e-6:  # no preference once position bias is averaged out
            ties += 1
            continue
        win, lose = (a, b) if p_a > 0.5 else (b, a)
        records.append({"prompt": _turns(p), "chosen": [{"role": "assistant", "content": win}],
                        "rejected": [{"role": "assistant", "content": lose}], "p_chosen": max(p_a, 1 - p_a)})
    return records, {"pairs": n, "labelled": len(records), "ties": ties}
