"""Constitutional AI (Bai et al. 2022): the model improves its own answers against written principles.

  SL-CAI  respond -> critique against a principle -> revise (repeat `rounds` times, a fresh principle
          each round); the final revisions are SFT data: sl_cai_records
  RL-CAI  the model judges two responses against a principle as a multiple-choice question; the
          probabilities it gives the options (A) and (B), averaged over both orders to cancel position
          bias, are the AI preference label: ai_preferences -> DPO pairs or reward-model data

Every step is a function over the engine's front door, `llm.generate(prompts, SamplingParams)`, so any
object with that method (and a tokenizer, for the judge's option tokens) can play the model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from lmforge.errors import ConfigError
from lmforge.infer.chat_template import get_template
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


def _generate(llm, conversations: list[list[dict]], params: SamplingParams, template: str) -> list[str]:
    tmpl = get_template(template)
    return [o.text.strip() for o in llm.generate([tmpl.encode(llm.tokenizer, c)[0] for c in conversations], params)]


def sl_cai_records(llm, prompts: Sequence[str], params: SamplingParams, *,
                   principles: Sequence[Principle] = CONSTITUTION, rounds: int = 1, seed: int = 0,
                   template: str = "plain") -> list[dict]:
    """{"prompt", "completion", "initial", "critiques", "revisions"} per prompt; completion = the last
    revision. One batched generate call per step."""
    if rounds < 1 or not principles:
        raise ConfigError(f"rounds={rounds} must be >= 1 and principles non-empty")
    rng = random.Random(seed)
    responses = _generate(llm, [_turns(p) for p in prompts], params, template)
    hist = [{"prompt": p, "initial": r, "critiques": [], "revisions": [], "current": r}
            for p, r in zip(prompts, responses)]
    for _ in range(rounds):
        chosen = [rng.choice(principles) for _ in prompts]
        crit = _generate(llm, [_turns(h["prompt"], (h["current"], f"Critique request: {pr.critique}"))
                               for h, pr in zip(hist, chosen)], params, template)
        rev = _generate(llm, [_turns(h["prompt"], (h["current"], f"Critique request: {pr.critique}"),
                                     (c, f"Revision request: {pr.revision}"))
                              for h, pr, c in zip(hist, chosen, crit)], params, template)
        for h, c, r in zip(hist, crit, rev):
            h["critiques"].append(c)
            h["revisions"].append(r)
            h["current"] = r
    return [{"prompt": h["prompt"], "completion": h.pop("current"), **h} for h in hist]


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
    """{"prompt", "chosen", "rejected", "p_chosen"} per pair the judge prefers one side of; ties (no
    preference after averaging both orders) are counted in stats, not returned."""
    ids = tuple(llm.tokenizer.encode(x)[0] for x in ("A", "B"))
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
        records.append({"prompt": p, "chosen": win, "rejected": lose, "p_chosen": max(p_a, 1 - p_a)})
    return records, {"pairs": n, "labelled": len(records), "ties": ties}
