"""Format compliance: answer a simple question INSIDE the requested tags, and nowhere else.

The verifier accepts exactly one <tag>...</tag> pair of the requested tag holding the right answer; an
answer in the wrong tags, two tagged answers, or a bare answer is wrong (the instruction-following half
of format rewards in R1-style training, DeepSeek-AI 2025).
"""

from __future__ import annotations

import random
import re
from typing import Any

from lmforge.tasks.base import Example, Task, reply

TAGS = ("answer", "final", "result")


class FormatCompliance(Task):
    name = "format"
    templates = ("What is {a} + {b}? Put only the answer inside <{tag}></{tag}> tags.",
                 "Add {a} and {b}. Reply with the result wrapped in <{tag}> and </{tag}>.",
                 "Give the sum of {a} and {b} between <{tag}> tags.")

    def problem(self, rng: random.Random) -> dict[str, Any]:
        return {"a": rng.randint(0, 99), "b": rng.randint(0, 99), "tag": rng.choice(TAGS)}

    def render(self, problem: dict[str, Any], template: str) -> Example:
        a, b, tag = problem["a"], problem["b"], problem["tag"]
        return Example(prompt=template.format(a=a, b=b, tag=tag), answer=str(a + b),
                       solution=f"<{tag}>{a + b}</{tag}>", key=f"{a}+{b}:{tag}", meta={"tag": tag})

    def parse(self, completion: str, example: Example | None = None) -> str | None:
        completion = reply(completion)  # R1's format: <think>...</think> then the tagged answer
        tag = example.meta["tag"] if example is not None else r"\w+"
        found = re.findall(rf"<({tag})>(.*?)</\1>", completion, re.DOTALL)
        any_tags = re.findall(r"<(\w+)>.*?</\1>", completion, re.DOTALL)
        return found[0][1].strip() if len(found) == 1 and len(any_tags) == 1 else None
