"""Training data made by sampling a model (through LLM.chat) and checking the samples with a verifier.

  distillation_records   sequence-level distillation (Kim & Rush 2016): the teacher's own outputs become
                         the student's SFT data; with a task, only outputs its verifier accepts are kept
                         (a verifier-augmented teacher, West et al. 2022's critic-filtered distillation)
  preference_pairs       verifier-made DPO pairs: a correct and an incorrect sample of the same prompt
  kto_records            the same samples unpaired, labelled by the verifier (KTO)

Each example's prompt is one user turn, sampled through `llm.chat` under a chat template: the template's
end-of-turn markers stop each sample (as in LLM.chat), so an answer never runs on into a turn the model writes
for the user. Records are conversational, in the prompt/completion (and prompt/chosen/rejected) layout of TRL
datasets: "prompt" the user turn, "completion" (chosen, rejected) the assistant turn, so any loader applies
its chat template and end marker to them. They also carry the sampled tokens as they were: "prompt_ids" (the
templated prompt), "completion_ids" ("chosen_ids", "rejected_ids"), and a completion's "finish_reason";
lmforge.align.data trains on those ids rather than re-encoding the text (which may split differently, or not
round-trip at all where a sample holds an incomplete character), checking that the prompt ids are its own
template's encoding of the prompt. A sample that stopped holds what ended it (the end-of-turn token, or the
tokens that spelled a stop string), so nothing is appended; one cut at max_tokens ('length') is no complete
answer: dropped unless keep_truncated, and then trained without an end.

Every function returns (records, stats), stats counting what was sampled, kept and why the rest was not:
nothing is dropped silently. Repeated samples of one prompt (the same text) count once.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from lmforge.errors import ConfigError
from lmforge.infer.chat_template import get_template
from lmforge.infer.outputs import CompletionOutput
from lmforge.infer.sampling import SamplingParams
from lmforge.tasks.base import Example, Task

Render = Callable[[Example], str]


def chat_prompt(template: str = "plain") -> Render:
    """Example -> the prompt text a chat model sees: one user turn, opened for the assistant."""
    tmpl = get_template(template)
    return lambda ex: tmpl.render(conversation(ex))


def conversation(ex: Example) -> list[dict[str, str]]:
    """The example's prompt as one user turn: a record's "prompt"."""
    return [{"role": "user", "content": ex.prompt}]


def reply(out: CompletionOutput, name: str = "completion") -> dict:
    """A sample as the record fields `name` (one assistant turn) and `name`_ids (its tokens)."""
    return {name: [{"role": "assistant", "content": out.text}], f"{name}_ids": list(out.token_ids)}


def sample(llm, examples: Sequence[Example], params: SamplingParams, template: str, stats: dict[str, int], *,
           keep_truncated: bool = False) -> list[tuple[list[int], list[CompletionOutput]]]:
    """(prompt ids, samples) per example: params.n samples through llm.chat; stats["samples"] counts them,
    stats["truncated"] those cut at max_tokens (dropped unless keep_truncated)."""
    outs = llm.chat([conversation(ex) for ex in examples], params, template=template)
    res = []
    for out in outs:
        stats["samples"] += len(out.outputs)
        stats["truncated"] += sum(o.finish_reason != "stop" for o in out.outputs)
        res.append((list(out.prompt_token_ids),
                    [o for o in out.outputs if keep_truncated or o.finish_reason == "stop"]))
    return res


def distinct(outs: list[CompletionOutput], stats: dict[str, int]) -> list[CompletionOutput]:
    """The first sample of each text, in order; stats["duplicates"] counts the rest."""
    first: dict[str, CompletionOutput] = {}
    for o in outs:
        first.setdefault(o.text, o)
    stats["duplicates"] += len(outs) - len(first)
    return list(first.values())


def _counts(n: int, *names: str) -> dict[str, int]:
    return {"prompts": n, "samples": 0, "truncated": 0, "duplicates": 0, **dict.fromkeys(names, 0)}


def distillation_records(teacher, examples: Sequence[Example], params: SamplingParams, *,
                         task: Task | None = None, template: str = "plain", per_prompt: int = 1,
                         keep_truncated: bool = False) -> tuple[list[dict], dict[str, int]]:
    """Teacher outputs as SFT records {"prompt", "completion", "prompt_ids", "completion_ids",
    "finish_reason"}; at most `per_prompt` distinct ones per example. With `task`, only verified outputs are
    kept (and prompts with none are counted, not filled)."""
    records, stats = [], _counts(len(examples), "rejected_by_verifier", "prompts_without_output")
    for ex, (ids, outs) in zip(examples, sample(teacher, examples, params, template, stats,
                                                keep_truncated=keep_truncated)):
        outs = distinct(outs, stats)
        kept = [o for o in outs if task is None or task.verify(ex, o.text)]
        stats["rejected_by_verifier"] += len(outs) - len(kept)
        stats["prompts_without_output"] += not kept
        records += [{"prompt": conversation(ex), "prompt_ids": ids, **reply(o), "finish_reason": o.finish_reason}
                    for o in kept[:per_prompt]]
    stats["records"] = len(records)
    return records, stats


def preference_pairs(policy, task: Task, examples: Sequence[Example], params: SamplingParams, *,
                     template: str = "plain", pairs_per_prompt: int = 1, seed: int = 0,
                     reference_fallback: bool = False, keep_truncated: bool = False
                     ) -> tuple[list[dict], dict[str, int]]:
    """{"prompt", "chosen", "rejected"} (+ their ids): a verified-correct and a verified-wrong sample of one
    prompt, up to `pairs_per_prompt` distinct such pairs per prompt (fewer where its samples make fewer). Needs
    params.n >= 2; prompts whose samples are all right, all wrong or all truncated give no pair
    (counted), unless reference_fallback: then an all-wrong prompt's chosen side is the example's reference
    solution (counted as from_reference; off-policy, so not what "sampled pairs" measure; text only, no
    chosen_ids)."""
    if params.n < 2:
        raise ConfigError(f"preference_pairs needs SamplingParams(n >= 2) samples per prompt, got n={params.n}")
    if not isinstance(pairs_per_prompt, int) or pairs_per_prompt < 1:
        raise ConfigError(f"pairs_per_prompt={pairs_per_prompt!r} must be an int >= 1")
    rng = random.Random(seed)
    pairs, stats = [], _counts(len(examples), "correct", "all_correct", "all_wrong", "prompts_without_output",
                               "from_reference")
    for ex, (ids, outs) in zip(examples, sample(policy, examples, params, template, stats,
                                                keep_truncated=keep_truncated)):
        stats["correct"] += sum(task.verify(ex, o.text) for o in outs)
        outs = distinct(outs, stats)
        good = [reply(o, "chosen") for o in outs if task.verify(ex, o.text)]
        bad = [reply(o, "rejected") for o in outs if not task.verify(ex, o.text)]
        if not outs:
            stats["prompts_without_output"] += 1
        elif not bad:
            stats["all_correct"] += 1
        elif not good and not reference_fallback:
            stats["all_wrong"] += 1
        else:
            if not good:
                good = [{"chosen": [{"role": "assistant", "content": ex.solution}]}]
                stats["from_reference"] += 1
            combos = [(g, b) for g in good for b in bad]  # distinct pairs: a repeated one would weigh twice
            for g, b in rng.sample(combos, min(pairs_per_prompt, len(combos))):
                pairs.append({"prompt": conversation(ex), "prompt_ids": ids, **g, **b})
    stats["pairs"] = len(pairs)
    return pairs, stats


def kto_records(policy, task: Task, examples: Sequence[Example], params: SamplingParams, *,
                template: str = "plain", keep_truncated: bool = False) -> tuple[list[dict], dict[str, int]]:
    """{"prompt", "completion", "label"} (+ ids, finish_reason) for every distinct sample, label = the
    verifier's verdict."""
    records, stats = [], _counts(len(examples))
    for ex, (ids, outs) in zip(examples, sample(policy, examples, params, template, stats,
                                                keep_truncated=keep_truncated)):
        records += [{"prompt": conversation(ex), "prompt_ids": ids, **reply(o), "finish_reason": o.finish_reason,
                     "label": task.verify(ex, o.text)} for o in distinct(outs, stats)]
    good = sum(r["label"] for r in records)
    return records, {**stats, "records": len(records), "desirable": good, "undesirable": len(records) - good}
