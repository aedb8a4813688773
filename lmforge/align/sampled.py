"""Training data made by sampling a model (through LLM.generate) and checking the samples with a verifier.

  distillation_records   sequence-level distillation (Kim & Rush 2016): the teacher's own outputs become
                         the student's SFT data; with a task, only outputs its verifier accepts are kept
                         (a verifier-augmented teacher, West et al. 2022's critic-filtered distillation)
  preference_pairs       verifier-made DPO pairs: a correct and an incorrect sample of the same prompt
  kto_records            the same samples unpaired, labelled by the verifier (KTO)

Records are plain dicts in the prompt/completion (and prompt/chosen/rejected) layout of TRL datasets, so
they go through lmforge.align.data like any JSONL. Every function returns (records, stats), stats counting
what was sampled, kept and why the rest was not: nothing is dropped silently.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from lmforge.errors import ConfigError
from lmforge.infer.chat_template import get_template
from lmforge.infer.sampling import SamplingParams
from lmforge.tasks.base import Example, Task

Render = Callable[[Example], str]


def chat_prompt(template: str = "plain") -> Render:
    """Example -> the prompt text a chat model sees: one user turn, opened for the assistant."""
    tmpl = get_template(template)
    return lambda ex: tmpl.render([{"role": "user", "content": ex.prompt}])


def sample(llm, examples: Sequence[Example], params: SamplingParams, render: Render) -> list[list[str]]:
    """params.n completions per example, through the engine's front door."""
    outs = llm.generate([render(ex) for ex in examples], params)
    return [[o.text for o in out.outputs] for out in outs]


def distillation_records(teacher, examples: Sequence[Example], params: SamplingParams, *,
                         task: Task | None = None, render: Render | None = None,
                         per_prompt: int = 1) -> tuple[list[dict], dict[str, int]]:
    """Teacher outputs as SFT records {"prompt", "completion"}; at most `per_prompt` per example.
    With `task`, only verified outputs are kept (and prompts with none are counted, not filled)."""
    render = render or chat_prompt()
    records, stats = [], {"prompts": len(examples), "samples": 0, "rejected_by_verifier": 0,
                          "prompts_without_output": 0}
    for ex, texts in zip(examples, sample(teacher, examples, params, render)):
        stats["samples"] += len(texts)
        kept = [t for t in texts if task is None or task.verify(ex, t)]
        stats["rejected_by_verifier"] += len(texts) - len(kept)
        stats["prompts_without_output"] += not kept
        records += [{"prompt": render(ex), "completion": t} for t in kept[:per_prompt]]
    stats["records"] = len(records)
    return records, stats


def preference_pairs(policy, task: Task, examples: Sequence[Example], params: SamplingParams, *,
                     render: Render | None = None, pairs_per_prompt: int = 1, seed: int = 0,
                     reference_fallback: bool = False) -> tuple[list[dict], dict[str, int]]:
    """{"prompt", "chosen", "rejected"}: a verified-correct and a verified-wrong sample of one prompt.
    Needs params.n >= 2; prompts whose samples are all right or all wrong give no pair (counted), unless
    reference_fallback: then an all-wrong prompt's chosen side is the example's reference solution
    (counted as from_reference; off-policy, so not what "sampled pairs" measure)."""
    if params.n < 2:
        raise ConfigError(f"preference_pairs needs SamplingParams(n >= 2) samples per prompt, got n={params.n}")
    render = render or chat_prompt()
    rng = random.Random(seed)
    pairs, stats = [], {"prompts": len(examples), "samples": 0, "correct": 0, "all_correct": 0, "all_wrong": 0,
                        "from_reference": 0}
    for ex, texts in zip(examples, sample(policy, examples, params, render)):
        good = list(dict.fromkeys(t for t in texts if task.verify(ex, t)))
        bad = list(dict.fromkeys(t for t in texts if not task.verify(ex, t)))
        stats["samples"] += len(texts)
        stats["correct"] += sum(task.verify(ex, t) for t in texts)
        if not bad:
            stats["all_correct"] += 1
        elif not good and not reference_fallback:
            stats["all_wrong"] += 1
        else:
            if not good:
                good = [ex.solution]
                stats["from_reference"] += 1
            for _ in range(pairs_per_prompt):
                pairs.append({"prompt": render(ex), "chosen": rng.choice(good), "rejected": rng.choice(bad)})
    stats["pairs"] = len(pairs)
    return pairs, stats


def kto_records(policy, task: Task, examples: Sequence[Example], params: SamplingParams, *,
                render: Render | None = None) -> tuple[list[dict], dict[str, int]]:
    """{"prompt", "completion", "label"} for every distinct sample, label = the verifier's verdict."""
    render = render or chat_prompt()
    records = []
    for ex, texts in zip(examples, sample(policy, examples, params, render)):
        records += [{"prompt": render(ex), "completion": t, "label": task.verify(ex, t)}
                    for t in dict.fromkeys(texts)]
    good = sum(r["label"] for r in records)
    return records, {"prompts": len(examples), "records": len(records), "desirable": good,
                     "undesirable": len(records) - good}
