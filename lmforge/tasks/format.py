"""Format compliance: answer a simple question INSIDE the requested tags, and nowhere else.

The verifier accepts exactly one <tag>...</tag> pair of the requested tag holding the right answer; an
answer in the wrong tags, two tagged answers, or a bare answer is wrong (the instruction-following half
of format rewards in R1-style training, DeepSeek-AI 2025).
"""

from __future__ import annotations

import bisect
import random
import re
from typing import Any

from lmforge.tasks.base import Example, Task, reply

TAGS = ("answer", "final", "result")
_TAG = re.compile(r"<(/?)(\w+)>")


def tag_pairs(text: str, name: str | None = None) -> list[str]:
    """The insides of the <t>...</t> pairs (of tag `name`, else of any tag), leftmost first, each open tag closed by
    the nearest close of its name: what re.findall(r"<(t)>(.*?)</\1>", text, re.DOTALL) finds, in linear time (the
    regex rescans the rest of the text from every unclosed open tag: seconds on a rollout of them)."""
    tags = [t for t in _TAG.finditer(text) if name is None or t.group(2) == name]
    closes: dict[str, list[int]] = {}  # tag name -> indices into `tags` of its closing tags
    for i, t in enumerate(tags):
        if t.group(1):
            closes.setdefault(t.group(2), []).append(i)
    out, end = [], 0
    for i, t in enumerate(tags):
        if t.group(1) or t.start() < end:  # a closing tag, or inside the pair found last
            continue
        after = closes.get(t.group(2), [])
        j = bisect.bisect_right(after, i)
        if j < len(after):
            close = tags[after[j]]
            out.append(text[t.end():close.start()])
            end = close.end()
    return out


class FormatCompliance(Task):
    name = "format"
    templates = ("What is {a} + {b}? Put only the answer inside <{tag}></{tag}> tags.",
                 "Add {a} and {b}. Reply with the result wrapped in <{tag}> and </{tag}>.",
                 "Give the sum of {a} and {b} between <{tag}> tags.")
    answer_format = None  # the templates name the tags

    def problem(self, rng: random.Random) -> dict[str, Any]:
        return {"a": rng.randint(0, 99), "b": rng.randint(0, 99), "tag": rng.choice(TAGS)}

    def render(self, problem: dict[str, Any], template: str) -> Example:
        a, b, tag = problem["a"], problem["b"], problem["tag"]
        return Example(prompt=template.format(a=a, b=b, tag=tag), answer=str(a + b),
                       solution=f"<{tag}>{a + b}</{tag}>", key=f"{min(a, b)}+{max(a, b)}:{tag}",  # a+b = b+a
                       meta={"tag": tag})

    def parse(self, completion: str, example: Example | None = None) -> str | None:
        completion = reply(completion)  # R1's format: <think>...</think> then the tagged answer
        found = tag_pairs(completion, example.meta["tag"] if example is not None else None)
        return found[0].strip() if len(found) == 1 and len(tag_pairs(completion)) == 1 else None
